"""Issue 13, point 2: a batch whose sequence numbers contradict each other is refused (or gapped) at the door.

Through the real decoders (every wire version) and the receiver's admission schema
(receiver/validate.py -> receiver/batch_consistency.py); the oracle here is set
arithmetic on the numbers, not the module's own code. Then the honest van's side: the
real Buffer seals what the receiver must take (a loss in memory, a WAL loss whose gap
travels alone before the samples that straddle it), and one end-to-end run through a
real Mosquitto and the real receiver process.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buffer.gaps import WAL_LOST_REASON
from buffer.store import Buffer
from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.wire import Batch, Gap, batch_topic, content_hash, decode_ack, decode_batch, encode_batch
from receiver.batch_consistency import RECEIVER_GAP_REASON
from receiver.ingest import Ingestor
from receiver.store import SQLiteStore
from receiver.validate import check_batch
from tests.delivery_harness import Receiver
from tests.hostile import COLS, T0, body_of, ordinary_rows, v1_bytes

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
VERSIONS = st.sampled_from([1, 2, 3])
DEVICE, TOPIC = "van-a", "datalab/v1/van-a/batch"


def sample(seq: int) -> Sample:
    return Sample("pm", T0 + seq * 1000, seq * 1000, TimeSource.NTP, {"pm25": float(seq % 97)}, (), seq, "boot")


def admit(batch: Batch, version: int) -> Batch:
    """What the receiver admits of ``batch``'s bytes in ``version``: decoder, then schema."""
    return check_batch(decode_batch(encode_batch(batch, version)))


def numbers(ranges: list[tuple[int, int]]) -> set[int]:
    return {q for a, b in ranges for q in range(a, b + 1)}


@st.composite
def honest_shape(draw: st.DrawFn) -> tuple[Batch, set[int], set[int]]:
    """A batch as a van seals it: named after its first and last sample; gap rows (its own
    losses, earlier or later numbers) never over a sample. Returns it, its sample numbers and
    the numbers its gap rows hold."""
    base = draw(st.integers(1, 10**12))
    picked = sorted(draw(st.sets(st.integers(0, 300), min_size=1, max_size=60)))
    seqs = [base + i for i in picked]
    gaps: list[Gap] = []
    free = [q for q in range(max(1, base - 50), seqs[-1] + 50) if q not in set(seqs)]
    for _ in range(draw(st.integers(0, 4))):
        if not free:
            break
        a = draw(st.sampled_from(free))
        b = a
        while b + 1 in free and b - a < draw(st.integers(0, 20)):
            b += 1
        gaps.append(Gap(a, b, "buffer full"))
    batch = Batch(DEVICE, "e1", seqs[0], seqs[-1], [sample(q) for q in seqs], gaps)
    return batch, set(seqs), numbers([(g.first_seq, g.last_seq) for g in gaps])


@FUZZ
@given(honest_shape(), VERSIONS)
def test_honest_batches_pass_and_every_declared_number_is_accounted_for(shape: Any, version: int) -> None:
    batch, seqs, gapped = shape
    out = admit(batch, version)
    assert [s.seq for s in out.samples] == sorted(seqs)
    van_gaps = out.gaps[: len(batch.gaps)]
    assert van_gaps == batch.gaps  # the van's own rows untouched
    added = [(g.first_seq, g.last_seq) for g in out.gaps[len(batch.gaps):]]
    assert all(g.reason == RECEIVER_GAP_REASON for g in out.gaps[len(batch.gaps):])
    declared = set(range(batch.first_seq, batch.last_seq + 1))
    # Exactly the numbers that were neither a sample nor in a van gap row are gapped, once each.
    assert numbers(added) == declared - seqs - gapped
    assert sum(b - a + 1 for a, b in added) == len(numbers(added))
    assert declared <= seqs | gapped | numbers(added)


def test_the_outside_testers_four_shapes_are_refused() -> None:
    six = ordinary_rows(1, 6)
    shapes = {
        # (a) seqs 1-100 declared, 3 samples, no gap rows
        "range of 100, 3 samples": body_of(DEVICE, ordinary_rows(1, 3), 1, 100),
        # (b) samples 1-6 and a gap row 1-6
        "sample and gap at once": body_of(DEVICE, six, 1, 6, [[1, 6, "lost"]]),
        # (c) last = 2^62 with 6 samples, a gap row to 2^62
        "last 2^62": body_of(DEVICE, six, 1, 2**62, [[7, 2**62, "lost"]]),
        # (d) a cols header shorter than the rows
        "short cols": {**body_of(DEVICE, six, 1, 6), "cols": COLS[:5]},
    }
    reasons = {}
    for name, body in shapes.items():
        with pytest.raises(PayloadError) as err:
            check_batch(decode_batch(v1_bytes({**body, "epoch": "e1"})))
        reasons[name] = str(err.value)
    print("\nrefused:", reasons)
    assert "samples span 1-3" in reasons["range of 100, 3 samples"]
    assert "both a sample and in a gap row" in reasons["sample and gap at once"]
    assert "samples span 1-6" in reasons["last 2^62"]
    assert "cols must be" in reasons["short cols"]


@FUZZ
@given(honest_shape(), VERSIONS, st.data())
def test_contradictory_batches_are_refused(shape: Any, version: int, data: st.DataObject) -> None:
    batch, seqs, _ = shape
    kind = data.draw(st.sampled_from(["first_low", "last_high", "sample_in_gap", "sampleless"]))
    b = Batch(batch.device, batch.epoch, batch.first_seq, batch.last_seq, list(batch.samples), list(batch.gaps))
    if kind == "first_low" and b.first_seq > 1:
        b.first_seq = data.draw(st.integers(1, b.first_seq - 1))
        if data.draw(st.booleans()):  # owning up to the extra numbers does not make them the batch's
            b.gaps.append(Gap(b.first_seq, batch.first_seq - 1, "lost"))
    elif kind in ("first_low", "last_high"):
        b.last_seq = data.draw(st.integers(b.last_seq + 1, 2**63 - 1))
        if data.draw(st.booleans()):
            b.gaps.append(Gap(batch.last_seq + 1, b.last_seq, "lost"))
    elif kind == "sample_in_gap":
        q = data.draw(st.sampled_from(sorted(seqs)))
        b.gaps.append(Gap(max(1, q - data.draw(st.integers(0, 9))), q + data.draw(st.integers(0, 9)), "lost"))
    else:
        gaps = b.gaps or [Gap(b.first_seq, b.last_seq, "lost")]
        lo, hi = min(g.first_seq for g in gaps), max(g.last_seq for g in gaps)
        first = data.draw(st.integers(max(1, lo - 5), lo))
        last = data.draw(st.integers(hi, hi + 5).filter(lambda x: (first, x) != (lo, hi) and x != first))
        b = Batch(b.device, b.epoch, first, last, [], data.draw(st.sampled_from([gaps, []])))
    with pytest.raises(PayloadError):
        admit(b, version)


def test_gaps_only_and_carrier_batches_pass() -> None:
    """What a van sends without samples: gap rows named after their hull, or a dead epoch's
    carrier named after one number (buffer/recover.py), even inside an open-ended gap."""
    gaps = [Gap(10, 20, "WAL lost"), Gap(30, 31, "dropped")]
    assert admit(Batch(DEVICE, "e1", 10, 31, [], gaps), 3).gaps == gaps
    end = [Gap(5, 1 << 60, "to the end of this epoch")]
    assert admit(Batch(DEVICE, "e1", 1_000_000_005, 1_000_000_005, [], end), 3).gaps == end
    assert admit(Batch(DEVICE, "e1", (1 << 60) + 10**9, (1 << 60) + 10**9, [], end), 1).gaps == end
    with pytest.raises(PayloadError, match="neither samples nor gap rows"):
        admit(Batch(DEVICE, "e1", 7, 7, [], []), 3)


def _commit(buf: Buffer, seqs: range) -> None:
    buf.commit([Sample("pm", T0 + q * 1000, q * 1000, TimeSource.NTP, {"pm25": 1.0}) for q in seqs])


def test_what_the_real_buffer_seals_is_admitted_and_stored(tmp_path: Path) -> None:
    """Honest vans: a loss in memory (its gap rides with the samples around it) and a WAL loss
    (its gap travels first, alone; the next batch's samples straddle it and are taken, the
    numbers gapped once: the van's row, with its reason, whichever batch came first)."""
    store = SQLiteStore(tmp_path / "d.sqlite")
    try:
        for case, reason, reorder in (("memory", "held in memory, lost", False),
                                      ("wal", WAL_LOST_REASON, False), ("wal-late", WAL_LOST_REASON, True)):
            buf = Buffer(tmp_path / f"{case}.sqlite", DEVICE)
            _commit(buf, range(5))
            lost = buf.record_lost(3, reason)
            _commit(buf, range(4))
            sealed = []
            while (s := buf.seal(100, T0)) is not None:
                sealed.append(s)
            # memory: one batch 1-12 with the gap inside; WAL: the gap alone first, then 1-12 around it
            assert [s.n_samples for s in sealed] == ([9] if case == "memory" else [0, 9]), case
            assert (sealed[-1].first_seq, sealed[-1].last_seq) == (1, 12)
            if reorder:
                sealed.reverse()
            for s in sealed:
                out = Ingestor(store).handle(TOPIC, s.payload, T0)
                assert out.ack is not None and out.ack.status == "stored", (case, out.ack)
            rows = store.conn.execute("SELECT first_seq, last_seq, reason FROM gaps WHERE epoch = ?",
                                      (buf.epoch,)).fetchall()
            assert rows == [(lost[0], lost[1], reason)], (case, rows)
            n = store.conn.execute("SELECT count(*) FROM samples WHERE epoch = ?", (buf.epoch,)).fetchone()[0]
            assert n == 9, case
            buf.close()
    finally:
        store.close()


def test_end_to_end_contradictory_batch_is_dead_lettered_and_the_van_goes_on(tmp_path: Path,
                                                                             mosquitto: Any) -> None:
    store_path = tmp_path / "store.sqlite"
    acks: dict[str, Any] = {}
    van = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="van-consistency", clean_session=True)
    van.on_message = lambda c, u, m: acks.setdefault(decode_ack(m.payload, DEVICE).sha256, decode_ack(m.payload, DEVICE))
    van.connect("127.0.0.1", mosquitto.port)
    van.subscribe(f"datalab/v1/{DEVICE}/ack", qos=1)
    van.loop_start()
    rx = Receiver(store_path, mosquitto.port, client_id="rx-consistency")
    uploads = {
        "range beyond samples": v1_bytes(body_of(DEVICE, ordinary_rows(1, 3), 1, 100) | {"epoch": "e2e"}),
        "sample in gap": encode_batch(Batch(DEVICE, "e2e", 4, 9, [sample(q) for q in range(4, 10)],
                                            [Gap(4, 9, "lost")])),
        "short cols": v1_bytes(body_of(DEVICE, ordinary_rows(10, 6), 10, 15) | {"epoch": "e2e", "cols": COLS[:7]}),
        # honest: samples 20 and 25 (a hole the van's gap row does not cover) -> stored, 21-24 gapped
        "hole": encode_batch(Batch(DEVICE, "e2e", 20, 25, [sample(20), sample(25)], [Gap(21, 22, "full")])),
    }
    try:
        rx.start()
        for p in uploads.values():
            van.publish(batch_topic("datalab/v1", DEVICE), p, qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 60
        while len(acks) < len(uploads) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        van.loop_stop()
        van.disconnect()
        rx.stop()
    got = {name: next((a for a in acks.values() if a.names_payload(content_hash(p))), None)
           for name, p in uploads.items()}  # a binary ack names its payload by a digest prefix
    print("\nend to end:", {k: (a.status, a.reason) if a else None for k, a in got.items()})
    assert all(got.values()), got
    assert {k for k, a in got.items() if a.status == "rejected"} == {"range beyond samples", "sample in gap",
                                                                     "short cols"}
    assert got["hole"].status == "stored"
    db = sqlite3.connect(store_path)
    try:
        dead = {r[0] for r in db.execute("SELECT sha256 FROM dead_letters")}
        assert dead == {content_hash(uploads[k]) for k in ("range beyond samples", "sample in gap", "short cols")}
        assert db.execute("SELECT seq FROM samples ORDER BY seq").fetchall() == [(20,), (25,)]
        assert db.execute("SELECT first_seq, last_seq, reason FROM gaps ORDER BY first_seq").fetchall() == [
            (21, 22, "full"), (23, 24, RECEIVER_GAP_REASON)]
    finally:
        db.close()
