"""The fleet soak in CI size: real Mosquitto, two receiver workers on a shared
subscription storing raw, one deriver beside them, the delivery oracle.

The full soak (50 ... 20,000 vans on PostgreSQL) is ``python -m bench.bench_soak``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from simulator.soak import SENSORS, run_size


def test_small_fleet_soak_keeps_up_and_everything_is_stored_once_and_derived(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    mosquitto.close()  # the soak starts its own broker
    store = tmp_path / "soak.sqlite"
    r = run_size(20, store_url=str(store), workdir=tmp_path / "run", seconds=6.0, interval_s=2,
                 workers=2, vans_per_process=10, derive_wait_s=60.0)
    assert r.published == 20 * 3 and r.acked == r.published  # 3 batches of 2 s per van in 6 s
    assert r.missing == 0 and r.doubled == 0
    assert r.keeps_up
    assert r.derive_catchup_s is not None  # the deriver caught up after the load
    db = sqlite3.connect(store)
    n_samples = db.execute("SELECT count(*) FROM samples").fetchone()[0]
    assert n_samples == 20 * 3 * 2 * len(SENSORS)
    # derived: every sensor sample has a position row, every gps sample a fix
    assert db.execute("SELECT count(*) FROM positions").fetchone()[0] == 20 * 3 * 2 * (len(SENSORS) - 1)
    assert db.execute("SELECT count(*) FROM fixes").fetchone()[0] == 20 * 3 * 2
    assert db.execute("SELECT count(*) FROM derive_queue").fetchone()[0] == 0
