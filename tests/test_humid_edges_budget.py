"""Issue 13 re-test, point 3: work per upload for ``humid`` at batch edges must not grow with the backlog.

The tester's shape, CI-sized: uploads packed in time (interleaved, one ms apart) put the van's
whole backlog within +-30 s of every batch's edges, and ``humid_edges`` re-read all of it, with
values, for each upload (22 -> 82 s per group, RSS growing). Counted here: the sample rows the
humid re-read takes from the store per upload (not wall clock). With the budget each upload
reads at most HUMID_BUDGET; the windows beyond it wait in ``humid_redo`` (counted) and the
deriver judges them in slices, after which every ``humid`` flag is what the unbounded judgement
gives. Both stores.
"""
from __future__ import annotations

from typing import Any

import pytest

from core.sample import Sample, TimeSource
from receiver import quality, requality
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_derive import backend  # noqa: F401  (fixture: SQLite and PostgreSQL)
from core.wire import Batch, content_hash, encode_batch

T0 = 1_795_000_000_000
N = 1_000  # samples per upload
UPLOADS = 6
BUDGET = 1_500  # HUMID_BUDGET for the test: the backlog grows to 4 x that


def packed(k: int) -> Batch:
    first = k * N + 1
    # Upload k's RH is humid on odd k: a PM value's nearest RH is a neighbouring upload's sample.
    rh = 99.0 if k % 2 else 40.0
    s = [Sample("pm", T0 + i * UPLOADS + k, i, TimeSource.NTP, {"pm25": 10.0, "rh": rh} if i % 3 == 0
                else {"pm25": 10.0}, (), first + i, "b") for i in range(N)]
    return Batch("van-h", "e-h", first, first + N - 1, s)


class Counting:
    """A cursor whose rows are counted as they are taken (``fetchall`` or iteration)."""

    def __init__(self, cur: Any, read: list[int]) -> None:
        self.cur, self.read = cur, read

    def fetchall(self) -> list[Any]:
        rows = self.cur.fetchall()
        self.read[-1] += len(rows)
        return rows

    def fetchone(self) -> Any:
        return self.cur.fetchone()

    def __iter__(self) -> Any:
        for r in self.cur:
            self.read[-1] += 1
            yield r


def humid_bits(store: Any) -> dict[tuple[str, int], bool]:
    rows = store.conn.execute("SELECT epoch, seq, flags FROM quality WHERE device = 'van-h' AND quantity = 'pm25'"
                              ).fetchall()
    return {(e, q): "humid" in (f or "").split(",") for e, q, f in rows if "humid" in (f or "")}


def ingest_all(store: Any, read: list[int]) -> None:
    for k in range(UPLOADS):
        read.append(0)
        b = packed(k)
        assert store.ingest(b, content_hash(encode_batch(b)), T0, derive=True).status == "stored"


def test_humid_reads_per_upload_do_not_grow_with_the_backlog(backend: Any,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    real_exec = requality._exec

    def counting_exec(conn: Any, sql: str, args: tuple[Any, ...] = ()) -> Any:
        cur = real_exec(conn, sql, args)
        return Counting(cur, read) if "JOIN samples" in sql and read else cur  # the window's read, with values

    monkeypatch.setattr(requality, "_exec", counting_exec)

    # Control: the judgement without a budget (what the flags must end as).
    monkeypatch.setattr(requality, "HUMID_BUDGET", 10**9, raising=False)
    open_, _ = backend()
    control = open_()
    ingest_all(control, read)
    unbounded = list(read)
    want = humid_bits(control)

    monkeypatch.setattr(requality, "HUMID_BUDGET", BUDGET, raising=False)
    read.clear()
    open_, _ = backend()
    store = open_()
    ingest_all(store, read)
    counts = store.counts()
    print(f"\nhumid rows read per upload: unbounded {unbounded}, with budget {BUDGET}: {read};"
          f" windows deferred {counts.get('humid_windows_deferred')}")
    assert N * UPLOADS < quality.HUMID_WITHIN_MS  # the whole backlog within +-30 s of every edge
    assert unbounded[-1] >= UPLOADS * N  # the shape does re-read the whole backlog without a budget
    assert max(read) <= BUDGET  # the old code read 1,000, 2,000 ... 6,000 here
    assert counts["humid_windows_deferred"] >= 1 and store.positions_deferred() >= 1

    read.append(0)
    store.derive_pending()
    assert store.positions_deferred() == 0
    assert store.counts()["humid_slices_later"] >= 1
    got = humid_bits(store)
    print(f"humid PM values: {len(got)} (unbounded control {len(want)}); deriver read {read[-1]} rows")
    assert want and got == want
    assert 0 < len(want) < UPLOADS * N  # both humid and dry values: the judgement was exercised
