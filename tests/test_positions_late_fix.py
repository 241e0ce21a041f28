"""Issue 13 re-test (v13b): fixes delivered out of order must give the same positions as in order.

A sample interpolated between two fixes must be placed again when a fix arrives later that lies
between those two (v13b: 13,045 of 80,000 samples left on the farther pair, worst ~810 m, with
shuffled fix uploads). CI-sized version of the tester's probe, on SQLite and PostgreSQL: a GPS-less
backlog, then the fixes cut into uploads delivered in three ingest groups, once in time order and
once shuffled; after the deriver's deferred pass both stores hold what this file's own
nearest-fix oracle gives, and no ingest group placed more samples again than REPLACE_BUDGET.
"""
from __future__ import annotations

import bisect
import random
from typing import Any

import pytest

from core.sample import Sample, TimeSource
from core.wire import Batch, content_hash, encode_batch
from receiver import store as store_mod
from tests.pg import PgCluster, pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_derive import backend  # noqa: F401  (fixture: SQLite and PostgreSQL)

T0 = 1_795_000_000_000
DEVICE = "van-late"
SAMPLES = 12_000  # GPS-less samples, 5 ms apart: one minute
STEP_MS = 5
GAP = 10_000  # the store's default join window (max_gap_s = 10)
# REPLACE_BUDGET for this test: a third of the samples, so the bound and the deferral both happen
BUDGET = 4_000


def backlog() -> Batch:
    s = [Sample("pm", T0 + i * STEP_MS, i, TimeSource.NTP, {"pm2_5": 1.0}, (), i + 1, "b")
         for i in range(SAMPLES)]
    return Batch(DEVICE, "e-late", 1, SAMPLES, s)


def fix_times(rng: random.Random) -> list[int]:
    """Spacings inside and beyond the join window (as the tester's), some exactly on samples."""
    times: set[int] = set()
    t = T0 - 3_000
    while t < T0 + SAMPLES * STEP_MS + 5_000:
        times.add(t)
        t += rng.choice([1_300, 7_000, 9_999, 10_000, 10_001, 12_000]) + rng.choice((0, 1, -1, 3))
    times.update(T0 + STEP_MS * rng.randrange(SAMPLES) for _ in range(10))
    return sorted(times)


def fix_uploads(times: list[int], where: dict[int, tuple[float, float]]) -> list[Batch]:
    out, first, per = [], SAMPLES + 1, len(times) // 8 + 1
    for u in range(0, len(times), per):
        chunk = times[u:u + per]
        s = [Sample("gps", t, 0, TimeSource.GPS, {"lat": where[t][0], "lon": where[t][1], "fix_quality": 1},
                    (), first + i, "b") for i, t in enumerate(chunk)]
        out.append(Batch(DEVICE, "e-late", first, first + len(s) - 1, s))
        first += len(s)
    return out


Placed = tuple[str, float | None, float | None]


def oracle(fixes: dict[int, tuple[float, float]], newest: int, t: int) -> Placed:
    """Written from the rule, not from receiver.positions: exact, else linear between the nearest
    fix before and after when at most GAP apart, else pending (no later fix yet, recent) or no_fix."""
    if t in fixes:
        return ("exact", *fixes[t])
    ft = sorted(fixes)
    i = bisect.bisect_left(ft, t)
    b = ft[i - 1] if i > 0 else None
    a = ft[i] if i < len(ft) else None
    if a is not None and b is not None:
        if a - b > GAP:
            return ("no_fix", None, None)
        w = (t - b) / (a - b)
        return ("interpolated", fixes[b][0] + w * (fixes[a][0] - fixes[b][0]),
                fixes[b][1] + w * (fixes[a][1] - fixes[b][1]))
    if a is None and newest - t <= GAP and (b is None or t - b <= GAP):
        return ("pending", None, None)
    return ("no_fix", None, None)


def _close(x: float | None, y: float | None) -> bool:
    return x == y if x is None or y is None else abs(x - y) < 1e-9


def deliver(store: Any, uploads: list[Batch]) -> list[int]:
    """Backlog, then the fix uploads in three ingest groups; rows placed again per group."""
    b = backlog()
    assert store.ingest(b, content_hash(encode_batch(b)), T0, derive=True).status == "stored"
    per_group: list[int] = []
    join = store._join_inputs

    def counting(*args: Any) -> Any:  # how many earlier samples this batch had placed again
        out = join(*args)
        per_group[-1] += len(out[1])
        return out

    store._join_inputs = counting
    for group in (uploads[:2], uploads[2:4], uploads[4:]):
        per_group.append(0)
        res = store.ingest_many([(u, content_hash(encode_batch(u)), T0) for u in group], derive=True)
        assert all(r.status == "stored" for r in res)
    passes = 0
    while store.positions_deferred() and passes < 1_000:
        store.derive_pending(limit=5)
        passes += 1
    assert store.positions_deferred() == 0
    return per_group


def placed(store: Any) -> dict[int, tuple[int, str, float | None, float | None]]:
    return {seq: (t, st, lat, lon) for seq, t, st, lat, lon in store.conn.execute(
        f"SELECT seq, t_utc_ms, state, lat, lon FROM positions WHERE device = '{DEVICE}'").fetchall()}


def test_shuffled_fixes_give_the_in_order_positions(backend: Any,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "REPLACE_BUDGET", BUDGET)
    rng = random.Random(1313)
    times = fix_times(rng)
    where = {t: (48.0 + rng.uniform(-0.01, 0.01), 11.0 + rng.uniform(-0.01, 0.01)) for t in times}
    shuffled = list(times)
    rng.shuffle(shuffled)
    results = {}
    for order, ts in (("in_order", times), ("shuffled", shuffled)):
        open_, _ = backend()
        store = open_()
        store._replace_left = BUDGET  # the class default was read before the monkeypatch
        per_group = deliver(store, fix_uploads(ts, where))
        rows = placed(store)
        newest = max(t for t, _, _, _ in rows.values())
        wrong = []
        for seq, (t, st, lat, lon) in rows.items():
            w = oracle(where, newest, t)
            if w[0] != st or not (_close(lat, w[1]) and _close(lon, w[2])):
                wrong.append((seq, t - T0, (st, lat, lon), w))
        c = store.counts()
        states: dict[str, int] = {}
        for _, st, _, _ in rows.values():
            states[st] = states.get(st, 0) + 1
        print(f"\n{order}: {len(times)} fixes in {len(fix_uploads(ts, where))} uploads over {SAMPLES}"
              " samples;"
              f" placed again per group {per_group} (budget {BUDGET}); windows deferred"
              f" {c.get('position_windows_deferred', 0)}, placed later {c.get('positions_placed_later', 0)};"
              f" states {states}; wrong {len(wrong)}")
        assert len(rows) == SAMPLES
        assert not wrong, wrong[:5]
        assert all(n <= BUDGET for n in per_group)
        assert states.get("interpolated", 0) > SAMPLES // 2  # the shape places most samples between fixes
        results[order] = (rows, per_group, c)
    assert results["shuffled"][0] == results["in_order"][0]
    # Shuffled delivery splits brackets already interpolated: more than one group's budget of
    # placing again, so the bound held by deferring (counted), not because there was little to do.
    assert results["shuffled"][2].get("position_windows_deferred", 0) > 0
    assert results["shuffled"][2].get("positions_placed_later", 0) > 0
