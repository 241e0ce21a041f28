"""Quality flags do not depend on where a van's batches split (issue 15, finding 2 of the v5 tester).

The same stream of samples is stored once as one batch and once cut into batches at
random places, through the real ingest with inline derivation; the ``quality`` tables
must be identical. The streams hold what moves the windows: stuck runs (also crossing a
cut), a small whole number repeated with and without its whole frame, steps, spikes,
sentinels, nulls and non-numbers; and the NO2 sensor's RH now and then, so ``humid``
at a cut depends on an RH reading in the batch before or after it.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from core.sample import Sample, TimeSource
from receiver.store import SQLiteStore
from receiver.store_pg import PostgresStore
from tests.pg import PgCluster, pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)
from tests.test_receiver_store import T, put
from core.wire import Batch

# One segment of a stream: (kind, length). Kinds give the pm25 value of step k.
KINDS = ("noise", "stuck", "low_frame", "low_clean", "step", "spike", "sentinel", "null", "text")


def segment_values(kind: str, n: int, rng: random.Random) -> list[tuple[Any, dict[str, Any]]]:
    """(pm25, other values) for ``n`` samples of one segment."""
    out: list[tuple[Any, dict[str, Any]]] = []
    for k in range(n):
        other: dict[str, Any] = {"pm10": round(20 + rng.random(), 1), "n0_3": float(rng.randint(100, 400))}
        if kind == "noise":
            v: Any = round(10 + rng.random(), 2)
        elif kind == "stuck":
            v, other = 12.34, {"pm10": 20.0, "n0_3": 300.0}
        elif kind == "low_frame":  # a PMS5003 stuck at 2: the whole frame repeats
            v, other = 2.0, {"pm10": 3.0, "n0_3": 150.0}
        elif kind == "low_clean":  # a clean street: 2 again and again, the counts move
            v = 2.0
        elif kind == "step":
            v = round(40 + rng.random(), 2)
        elif kind == "spike":
            v = 400.0 if k == n // 2 else round(10 + rng.random(), 2)
        elif kind == "sentinel":
            v = -999.0 if k % 2 else round(10 + rng.random(), 2)
        elif kind == "null":
            v = None
        else:
            v = "n/a" if k % 2 else True
        out.append((v, other))
    return out


def stream(plan: list[tuple[str, int]], seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    seq = 0
    for kind, n in plan:
        for v, other in segment_values(kind, n, rng):
            seq += 1
            samples.append(Sample("pm", T + seq * 1000, seq * 1000, TimeSource.GPS, {"pm25": v, **other}, (), seq))
            if seq % 9 == 0:  # the NO2 sensor's RH (drivers/dgs_no2.py), sometimes fog: humid PM
                seq += 1
                rh = rng.choice((50.0, 70.0, 80.0, 95.0))
                samples.append(Sample("no2", T + seq * 1000, seq * 1000, TimeSource.GPS, {"no2_rh_pct": rh}, (), seq))
    return samples


def store_in_batches(store: Any, samples: list[Sample], cuts: list[int]) -> list[tuple[Any, ...]]:
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(samples))), len(samples)]
    for a, b in zip(edges, edges[1:]):
        part = samples[a:b]
        put(store, Batch("van-q", "e1", part[0].seq, part[-1].seq, list(part)))
    rows = store.conn.execute("SELECT seq, quantity, flags FROM quality ORDER BY seq, quantity").fetchall()
    store.close()
    return [tuple(r) for r in rows]


plans = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 45)), min_size=2, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans, seed=st.integers(0, 1000), cuts=st.lists(st.integers(1, 400), max_size=6))
# a stream's start with 15 nulls in the context: the context holds the start, not 29 real values
@example(plan=[("noise", 1), ("noise", 6), ("null", 15), ("low_frame", 8)], seed=0, cuts=[29])
# nulls longer than the context: the stream's own read reaches back over them
@example(plan=[("noise", 30), ("null", 45), ("null", 45), ("spike", 20)], seed=3, cuts=[100, 121])
def test_flags_do_not_depend_on_batch_splits_sqlite(plan: list[tuple[str, int]], seed: int, cuts: list[int]) -> None:
    samples = stream(plan, seed)
    with tempfile.TemporaryDirectory() as d:
        whole = store_in_batches(SQLiteStore(Path(d) / "a.sqlite"), samples, [])
        split = store_in_batches(SQLiteStore(Path(d) / "b.sqlite"), samples, cuts)
    assert split == whole


def test_named_cases_split_or_whole(tmp_path: Path) -> None:
    """The tester's cases: a 40-long stuck run cut 20/20, a step with 7 values before the cut."""
    run = stream([("noise", 20), ("stuck", 40), ("noise", 20)], 1)
    whole = store_in_batches(SQLiteStore(tmp_path / "a.sqlite"), run, [])
    assert sum("stuck" in r[2] for r in whole if r[1] == "pm25") == 40
    assert store_in_batches(SQLiteStore(tmp_path / "b.sqlite"), run, [40]) == whole
    step = stream([("noise", 20), ("step", 40)], 2)
    whole = store_in_batches(SQLiteStore(tmp_path / "c.sqlite"), step, [])
    assert not any("outlier" in r[2] for r in whole)  # a step is the street
    cut = next(i for i, s in enumerate(step) if s.values.get("pm25", 0) > 30) + 7  # 7 values after the step
    assert store_in_batches(SQLiteStore(tmp_path / "d.sqlite"), step, [cut]) == whole


def test_flags_do_not_depend_on_batch_splits_postgresql(pg_cluster: PgCluster, tmp_path: Path) -> None:  # noqa: F811
    rng = random.Random(15)
    for i in range(3):
        plan = [(rng.choice(KINDS), rng.randint(5, 45)) for _ in range(6)]
        samples = stream(plan, i)
        whole = store_in_batches(SQLiteStore(tmp_path / f"w{i}.sqlite"), samples, [])
        cuts = [rng.randint(1, len(samples) - 1) for _ in range(4)]
        assert store_in_batches(PostgresStore(pg_cluster.create_database()), samples, cuts) == whole
