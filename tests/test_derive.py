"""The second ingest stage: batches stored raw (``derive=False``) and derived later.

What must hold on both backends: deriving later gives exactly the fixes,
positions, quality flags and calibrated values that deriving in the ingest
transaction gives; a deriver killed mid-way leaves every batch derived or still
queued (never half); several derivers at once do every batch once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.bench_wire import simulated_batch
from core.sample import Sample, TimeSource
from receiver.positions import Fix, locate
from receiver.store import SQLiteStore
from tests.pg import PgCluster, pg_cluster  # noqa: F401  (fixture, used by name)
from core.wire import Batch, content_hash, encode_batch

ROOT = Path(__file__).resolve().parent.parent
RECEIVED = 1_795_600_000_000
DERIVED_TABLES = {
    "fixes": "device, epoch, seq, t_utc_ms, lat, lon, speed_mps, fix_quality",
    "positions": "device, epoch, seq, t_utc_ms, state, lat, lon, speed_mps, fix_quality",
    "quality": "device, epoch, seq, quantity, flags",
}


def shift_batches(n_batches: int = 8, size: int = 200, *, seed: int = 7, device: str = "") -> list[Batch]:
    """A van's first minutes (GPS cold start, warm-up, then driving) cut into sealed batches."""
    run = simulated_batch(n_batches * size, skip_s=5, seed=seed)
    return [
        Batch(device or run.device, run.epoch, part[0].seq or 0, part[-1].seq or 0, part)
        for part in (run.samples[i * size : (i + 1) * size] for i in range(n_batches))
    ]


def two_vans(n_batches: int = 8, size: int = 200) -> list[Batch]:
    """Two vans' batches as they arrive: interleaved."""
    a = shift_batches(n_batches, size, seed=7, device="van-001")
    b = shift_batches(n_batches, size, seed=8, device="van-002")
    return [x for pair in zip(a, b) for x in pair]


Opener = Callable[[], Any]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], tuple[Opener, str]]]:
    """``new()`` makes an empty database and returns (open a store on it, its path or DSN)."""
    made: list[str] = []
    opened: list[Any] = []

    def new() -> tuple[Opener, str]:
        if request.param == "sqlite":
            target = str(tmp_path / f"{uuid.uuid4().hex}.sqlite")

            def open_() -> Any:
                opened.append(SQLiteStore(target))
                return opened[-1]
        else:
            from receiver.store_pg import PostgresStore

            cluster: PgCluster = request.getfixturevalue("pg_cluster")
            name = f"t_{uuid.uuid4().hex[:12]}"
            target = cluster.create_database(name)
            made.append(name)

            def open_() -> Any:
                opened.append(PostgresStore(target))
                return opened[-1]
        return open_, target

    yield new
    for s in opened:
        s.close()
    for name in made:
        request.getfixturevalue("pg_cluster").drop_database(name)


def put(store: Any, b: Batch, *, derive: bool) -> None:
    r = store.ingest(b, content_hash(encode_batch(b)), RECEIVED, derive=derive)
    assert r.status == "stored"


def derived(store: Any) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for table, cols in DERIVED_TABLES.items():
        rows = store.conn.execute(f"SELECT {cols} FROM {table} ORDER BY device, epoch, seq").fetchall()
        out[table] = sorted(tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows)
    return out


def inline_reference(new: Callable[[], tuple[Opener, str]], batches: list[Batch]) -> dict[str, list[tuple[Any, ...]]]:
    open_, _ = new()
    ref = open_()
    for b in batches:
        put(ref, b, derive=True)
    return derived(ref)


def test_deriving_later_gives_what_deriving_inline_gives(backend: Any) -> None:
    batches = two_vans()
    want = inline_reference(backend, batches)
    assert {r[4] for r in want["positions"]} >= {"exact", "no_fix"}  # driving, and the cold start
    assert want["quality"], "the shift start has flagged values (warming up, clock, fix)"

    open_, _ = backend()
    s = open_()
    for b in batches:
        put(s, b, derive=False)
    # stored and acknowledgeable, not derived yet
    assert s.counts()["samples"] == sum(len(b.samples) for b in batches)
    assert s.derive_backlog() == len(batches)
    assert all(not rows for rows in derived(s).values())

    assert s.derive_pending(limit=3) == 3
    assert s.derive_backlog() == len(batches) - 3
    assert s.derive_pending() == len(batches) - 3
    assert s.derive_backlog() == 0 and s.derive_pending() == 0
    assert derived(s) == want
    assert s.counts()["batches_derived"] == len(batches)


def test_a_deriver_killed_mid_batch_leaves_it_queued(backend: Any) -> None:
    batches = shift_batches(4)
    want = inline_reference(backend, batches)
    open_, target = backend()
    s = open_()
    for b in batches:
        put(s, b, derive=False)
    # A separate process derives, and is SIGKILLed just before committing its second batch.
    code = (  # one batch per transaction, so that the kill falls between two of them
        "import sys; from receiver.store_factory import open_store;"
        "s = open_store(sys.argv[1]); s.derive_pending(limit=1); s.derive_pending(limit=1)"
    )
    env = {**os.environ, "DATALAB_CRASH_AT": "receiver.derive.before:2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, target], env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == -9
    assert s.derive_backlog() == len(batches) - 1  # the first committed, the second rolled back
    assert s.derive_pending() == len(batches) - 1
    assert derived(s) == want


def test_two_derivers_at_once_do_every_batch_once(backend: Any) -> None:
    batches = shift_batches(10, 120)
    want = inline_reference(backend, batches)
    open_, _ = backend()
    s = open_()
    for b in batches:
        put(s, b, derive=False)
    workers = [open_(), open_()]
    done: list[int] = []
    threads = [threading.Thread(target=lambda w=w: done.append(w.derive_pending())) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(done) == len(batches)
    assert s.derive_backlog() == 0
    assert s.counts()["batches_derived"] == len(batches)
    assert derived(s) == want


def test_a_duplicate_of_a_queued_batch_queues_nothing_more(backend: Any) -> None:
    open_, _ = backend()
    s = open_()
    b = shift_batches(1)[0]
    put(s, b, derive=False)
    r = s.ingest(b, content_hash(encode_batch(b)), RECEIVED, derive=False)
    assert r.status == "duplicate"
    assert s.derive_backlog() == 1
    assert s.derive_pending() == 1 and s.derive_backlog() == 0


# -- the receiver's modes, through a real Mosquitto --------------------------------------


@pytest.mark.parametrize("mode", ["background", "separate"])
def test_receiver_acks_after_raw_storage_and_derives_after(tmp_path: Path, mosquitto: Any, mode: str) -> None:
    """``background``: the worker's own thread derives; ``separate``: `datalab-receiver derive` does."""
    from click.testing import CliRunner

    from receiver.cli import main as receiver_cli
    from receiver.config import ReceiverConfig
    from receiver.mqtt_consumer import ReceiverService
    from tests.test_end_to_end import AckListener

    batches = shift_batches(4)
    want = inline_reference(lambda: (lambda: SQLiteStore(tmp_path / "ref.sqlite"), ""), batches)
    store_path = tmp_path / "store.sqlite"
    svc = ReceiverService(ReceiverConfig(store=str(store_path), port=mosquitto.port, client_id="rx", derive=mode))
    svc.start()
    assert svc.subscribed.wait(10)
    dev = AckListener(mosquitto.port, batches[0].device)
    try:
        for b in batches:
            ack = dev.publish(f"datalab/v1/{b.device}/batch", encode_batch(b))
            assert ack.status == "stored" and ack.batch_id == b.batch_id
        s = SQLiteStore(store_path)
        assert s.counts()["samples"] == sum(len(b.samples) for b in batches)
        if mode == "separate":
            assert s.derive_backlog() == len(batches)  # nobody derives until told to
            st = CliRunner().invoke(receiver_cli, ["stats", "--store", str(store_path)])
            assert f"derive_backlog: {len(batches)} batches" in st.output
            r = CliRunner().invoke(receiver_cli, ["derive", "--store", str(store_path)])
            assert r.exit_code == 0, r.output
            assert f"derived {len(batches)} batches; 0 still queued" in r.output
        deadline = time.monotonic() + 20
        while s.derive_backlog() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.derive_backlog() == 0
        assert derived(s) == want
        s.close()
    finally:
        dev.c.loop_stop()
        svc.stop()


def test_derive_mode_is_checked() -> None:
    from core.errors import ConfigError
    from receiver.config import load_receiver_config

    with pytest.raises(ConfigError, match="receiver.derive.*inline, background, separate"):
        load_receiver_config(None, derive="later")


def test_example_receiver_config_is_the_defaults() -> None:
    from receiver.config import ReceiverConfig, load_receiver_config

    assert load_receiver_config(ROOT / "receiver" / "receiver.example.toml") == ReceiverConfig()


def test_an_inline_receiver_drains_what_another_mode_left_queued(tmp_path: Path, mosquitto: Any) -> None:
    from receiver.config import ReceiverConfig
    from receiver.mqtt_consumer import ReceiverService

    store_path = tmp_path / "store.sqlite"
    s = SQLiteStore(store_path)
    for b in shift_batches(3):
        put(s, b, derive=False)  # a worker in "separate" mode stored these, nobody derived them
    assert s.derive_backlog() == 3
    svc = ReceiverService(ReceiverConfig(store=str(store_path), port=mosquitto.port, client_id="rx-inline"))
    svc.start()
    try:
        deadline = time.monotonic() + 20
        while s.derive_backlog() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.derive_backlog() == 0
        assert derived(s)["positions"]
    finally:
        svc.stop()
        s.close()


def _pm(seq: int, t: int) -> Sample:
    return Sample("pm", T0 + t, t, TimeSource.NTP, {"pm25": 3.0}, (), seq, "b")


def _fix(seq: int, t: int, lat: float) -> Sample:
    return Sample("gps", T0 + t, t, TimeSource.GPS, {"lat": lat, "lon": 4.0, "speed": 5.0, "fix_quality": 1},
                  (), seq, "b")


T0 = 1_795_000_000_000


def _positions(store: Any) -> dict[int, tuple[Any, ...]]:
    rows = store.conn.execute("SELECT seq, state, lat FROM positions ORDER BY seq").fetchall()
    return {r[0]: (r[1], None if r[2] is None else round(r[2], 9)) for r in rows}


def test_a_late_fix_places_the_samples_within_its_window_and_only_those(backend: Any) -> None:
    """Positions only reopen near new fixes (issue 13: a van without GPS made every batch
    re-read all it had stored). A fix arriving late (a backlog batch) must still place the
    samples within the join window (10 s) and leave the others; whatever the arrival order,
    every sample ends where a join over all the data at once puts it."""
    open_, _ = backend()
    s = open_()
    # 0-9 s: samples, no fix yet; 100 s: one lone sample; 200-214 s: samples with fixes at 200 s
    # and 205 s, then none: the last ones stay open (pending) until later data closes them.
    early = Batch("van-late", "e", 1, 11, [_pm(i + 1, i * 1000) for i in range(10)] + [_pm(11, 100_000)])
    driving = Batch("van-late", "e", 12, 28, [_fix(12, 200_000, 52.2), _fix(13, 205_000, 52.205)]
                    + [_pm(14 + i, 200_000 + i * 1000) for i in range(15)])
    put(s, early, derive=True)
    put(s, driving, derive=True)
    before = _positions(s)
    assert {before[i][0] for i in range(1, 12)} == {"no_fix"}, before  # newer data says no fix is coming
    assert before[14 + 3][0] == "interpolated"
    assert before[14 + 12][0] == "pending"  # 212 s: within 10 s of the newest data, a fix may still come
    # The late backlog batch: fixes at 0 s and 9.5 s (the van's buffer sent them last).
    late = Batch("van-late", "e", 29, 30, [_fix(29, 0, 52.0), _fix(30, 9_500, 52.0095)])
    put(s, late, derive=True)
    after = _positions(s)
    for i in range(10):  # within the window of the late fixes: placed on the line between them
        assert after[i + 1] == ("exact" if i == 0 else "interpolated", round(52.0 + 0.001 * i, 9)), after[i + 1]
    assert after[11] == ("no_fix", None), "100 s is 90 s from any fix: not placed, not guessed"
    assert {k: v for k, v in after.items() if k > 11} == {k: v for k, v in before.items() if k > 11}
    # A fix-less batch much later closes what was pending (in SQL, not re-read) ...
    put(s, Batch("van-late", "e", 31, 31, [_pm(31, 300_000)]), derive=True)
    final = _positions(s)
    assert final[14 + 12] == ("no_fix", None)
    # ... and the whole equals a join over all the data at once (positions.locate, given the
    # fixes of each sample's neighbourhood: the store joins within twice the window).
    fixes = sorted([x for b in (driving, late) for x in b.samples if x.sensor == "gps"], key=lambda x: x.t_utc_ms)
    newest, gap = T0 + 300_000, s.max_gap_ms
    every = [x for b in (early, driving, late) for x in b.samples if x.sensor != "gps"] + [_pm(31, 300_000)]
    for x in every:
        fx = [Fix(f.t_utc_ms, f.values["lat"], f.values["lon"], 5.0, 1) for f in fixes  # type: ignore[arg-type]
              if abs(f.t_utc_ms - x.t_utc_ms) <= 2 * gap]  # type: ignore[operator]
        p = locate(fx, [f.t_utc_ms for f in fx], x.t_utc_ms, gap, newest)  # type: ignore[arg-type]
        assert final[x.seq] == (p.state, None if p.lat is None else round(p.lat, 9)), (x.seq, final[x.seq], p)
