"""Probe v13 (1b): the real van Buffer with poisoned unsealed rows at the start, end, middle or all of a
seal window, external losses (add_gap) and random seal sizes; every sealed payload through the
receiver's door (decode_batch + check_batch, as receiver/ingest.py). Own oracle: every committed number
is, across the batches, a sample or inside a gap row (the van's or the receiver's), never both, never
a number the van did not commit.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/attack_v13/probe_quarantine_edges.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from buffer.store import Buffer
from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.wire import decode_batch
from receiver.validate import check_batch


def mk(n: int) -> list[Sample]:
    return [Sample("pm", 1_700_000_000_000 + i * 1000, i * 1000, TimeSource.NTP, {"pm25": 1.5 + i},
                   boot_id="boot1") for i in range(n)]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 40), bad=st.sets(st.integers(0, 39), max_size=12),
       how=st.sampled_from(["vals", "seq_flag", "sensor", "delete"]),
       lost=st.lists(st.tuples(st.integers(1, 60), st.integers(0, 5)), max_size=3),
       sizes=st.lists(st.integers(1, 17), min_size=1, max_size=8))
def test_honest_batches_pass_the_door(n, bad, how, lost, sizes):
    with tempfile.TemporaryDirectory() as d:
        b = Buffer(Path(d) / "b.sqlite", "van-x")
        seqs = b.commit(mk(n))
        for i in sorted(bad):
            if i >= n:
                continue
            q = seqs[i]
            if how == "vals":
                b._db.execute("UPDATE samples SET vals='{\"pm25\":9e9}' WHERE seq=?", (q,))
            elif how == "sensor":
                b._db.execute("UPDATE samples SET sensor=? WHERE seq=?", ("p\x00m", q))
            elif how == "seq_flag":
                b._db.execute("UPDATE samples SET flags='[\"x\"' WHERE seq=?", (q,))
            else:
                b._db.execute("DELETE FROM samples WHERE seq=?", (q,))
        for a, ln in lost:
            try:
                b.add_gap(a, a + ln, "lost upstream")
            except Exception as exc:  # noqa: BLE001  a refusal by the van is fine, not the point
                print("add_gap refused", a, a + ln, type(exc).__name__)
        covered: dict[int, str] = {}
        refused = []
        i = 0
        while True:
            sb = b.seal(sizes[i % len(sizes)], 0)
            i += 1
            if sb is None:
                if b._db.execute("SELECT count(*) FROM samples").fetchone()[0] == 0:
                    break
                if i > 200:
                    raise AssertionError("seal makes no progress")
                continue
            try:
                batch = check_batch(decode_batch(sb.payload))
            except PayloadError as e:
                refused.append(str(e))
                continue
            for s in batch.samples:
                assert s.seq not in covered or covered[s.seq] != "sample", f"seq {s.seq} twice"
                covered[s.seq] = "sample"
            for g in batch.gaps:
                for q in range(g.first_seq, min(g.last_seq, seqs[-1] + 100) + 1):
                    covered.setdefault(q, "gap")
        assert not refused, refused
        missing = [q for q in seqs if q not in covered]
        # numbers deleted from the card without trace are the one case the van cannot know about
        # except through its own checks (gaps); report them, they are not a receiver rejection
        if missing and how != "delete":
            raise AssertionError(f"committed numbers neither sample nor gap: {missing}")
        b.close()
