"""v14 probe: a 5 MiB card that frees and fills again and again by a few KiB (commit slices down to one
sample), with the van online (real Mosquitto + receiver): acknowledgements free pages inside the file
while a filler takes and gives back a little room outside it.

My oracle: every value the drivers produced is recorded at the driver (wrapped ``read``: sensor and the
monotonic ms it was read at, which the stored sample's t_mono_ms must equal, the OracleSensor's value being
a function of it); the receiver's store is read directly. Must hold: no (sensor, t_mono) stored twice,
every stored value is one produced, and produced - stored == the numbers owned up to by "card full" gaps
(nothing vanished without a record, nothing owned up to twice). Also: health says disk_full while commits
are refused, and new samples are stored again within 60 s (real) of the card being freed for good.

Run: ATTACK_T14=1 .venv/bin/python -m pytest tests/attack_v14/probe_slices.py -q -s
"""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from simulator.value_sensors import oracle_check
from tests.test_card_faults import card, drive, fill, make_agent  # noqa: F401 (fixture)
from tests.test_delivery_faults import rx  # noqa: F401 (fixture)

DEV = "van-v14slice"


def _wrap_reads(agent, produced: list) -> None:
    for d in agent.drivers if hasattr(agent, "drivers") else agent._drivers:
        orig = d.read

        def read(orig=orig, d=d):
            r = orig()
            if r is not None:
                produced.append((r.sensor, int(round(d.world.clock.monotonic() * 1000))))
            return r
        d.read = read


@pytest.mark.timeout(900)
@pytest.mark.parametrize("step_kib", [4, 16, 64])
def test_card_frees_and_fills_repeatedly(tmp_path, mosquitto, rx, card, step_kib):  # noqa: F811
    agent, link = make_agent(card, mosquitto.port, device=DEV, sensors=4, batch=100, max_age_s=10.0)
    produced: list = []
    _wrap_reads(agent, produced)
    health = set()
    min_slice = 10**9
    drive(agent, 30)
    fillers = []
    for i in range(12):
        f = card / f"filler{i}"
        fill(f)
        fillers.append(f)
        drive(agent, 20, probe=lambda: health.add(agent.status()["health"]))
        with open(fillers[0], "r+b") as fh:  # give back a little, then take it again next cycle
            fh.truncate(max(0, fh.seek(0, 2) - step_kib * 1024))
        drive(agent, 10, probe=lambda: health.add(agent.status()["health"]))
        min_slice = min(min_slice, agent._commit_slice)
    refused = agent.stats.buffer_full
    for f in fillers:
        os.unlink(f)
    t_free = time.monotonic()
    last_seen = _stored(rx.store)
    first_new = None
    for _ in range(120):
        drive(agent, 5, pause_s=0.05)
        if first_new is None and _stored(rx.store) > last_seen:
            first_new = time.monotonic() - t_free
        if not agent._pending and not agent._lost_in_memory and agent.drain(timeout_s=5):
            break
    final_health = agent.status()["health"]
    link.stop()
    agent.buffer.close()
    v = _judge(rx.store, produced)
    print(f"\n[v14 slices {step_kib}KiB] refused_commits={refused} min_slice={min_slice} health_seen={sorted(health)}"
          f" final={final_health} first_new_after_free={first_new} stats_lost_in_memory={agent.stats.lost_in_memory} {v}")
    assert refused > 0, "the card never refused a commit: probe did not exercise a full card"
    assert "disk_full" in health
    assert v["doubled"] == 0 and v["not_produced"] == 0 and v["bad_value"] == 0, v
    assert v["unaccounted"] == 0, v
    assert first_new is not None and first_new < 60, first_new


def _stored(store) -> int:
    c = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return c.execute("SELECT count(*) FROM samples WHERE device=?", (DEV,)).fetchone()[0]
    finally:
        c.close()


def _judge(store, produced: list) -> dict:
    c = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    rows = c.execute("SELECT sensor, t_mono_ms, vals FROM samples WHERE device=?", (DEV,)).fetchall()
    gaps = c.execute("SELECT first_seq, last_seq, reason FROM gaps WHERE device=?", (DEV,)).fetchall()
    c.close()
    import json
    prod = set(produced)
    seen: dict = {}
    bad_value = not_produced = 0
    for sensor, mono, vals in rows:
        seen[(sensor, mono)] = seen.get((sensor, mono), 0) + 1
        if (sensor, mono) not in prod:
            not_produced += 1
        if json.loads(vals).get("check") != oracle_check(mono):
            bad_value += 1
    by_reason: dict = {}
    for a, b, why in gaps:
        by_reason[why[:40]] = by_reason.get(why[:40], 0) + (b - a + 1)
    card_full = sum(n for k, n in by_reason.items() if "card full" in k)
    missing = len(prod - set(seen))
    return {"produced": len(prod), "produced_dups": len(produced) - len(prod), "stored": len(seen),
            "doubled": sum(1 for n in seen.values() if n > 1), "not_produced": not_produced,
            "bad_value": bad_value, "missing": missing, "gap_numbers": by_reason,
            "unaccounted": missing - card_full}
