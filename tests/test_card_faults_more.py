"""The van's buffer after an independent tester's findings on issue 14, points 1-3.

A card already full when the agent starts, a stop while samples are held in
memory, values the wire cannot carry, damage to the schema itself. Real tmpfs,
real Mosquitto, a receiver process and ``simulator.oracle`` where delivery is
the point. Every test prints what it exercised and asserts that it happened.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from buffer.errors import BufferFullError
from buffer.store import Buffer
from core.sample import Sample, TimeSource
from simulator.oracle import check
from tests.delivery_harness import report
from tests.test_card_faults import card, drive, fill, make_agent, stored_rows, wait_for  # noqa: F401  (card: fixture)
from tests.test_delivery_faults import assert_all_delivered, rx  # noqa: F401  (fixture, used by name)
from core.wire import decode_batch


def _samples(n: int, t0: int = 0) -> list[Sample]:
    return [Sample("pm", 1_795_000_000_000 + t0 + i, t0 + i, TimeSource("gps"), {"v": float(i)}, (), None, "boot")
            for i in range(n)]


def _readable_by_others(path: Path) -> bool:
    """Another process (the oracle, a technician's tool) can read the file: shared mode."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5)
    try:
        db.execute("SELECT count(*) FROM meta").fetchone()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()


# --- A. the agent starts on a full card ------------------------------------------------------


def test_new_buffer_on_a_full_card_opens_holds_and_is_made_when_room_returns(card):
    (card / "d").mkdir()
    fill(card / "filler")
    buf = Buffer(card / "d" / "buffer.sqlite", "van-new")  # raised "database or disk is full" before
    refused = 0
    for _ in range(3):
        try:
            buf.commit(_samples(10))
        except BufferFullError:
            refused += 1
    before = (buf.disk_full, buf.seal(100, 0), buf.pending(10), buf.stats().backlog_samples)
    (card / "filler").unlink()
    seqs = buf.commit(_samples(10))
    buf.housekeep()
    sealed = buf.seal(100, 0)
    report("new-buffer-full-card", refused=refused, disk_full_while_full=before[0], seqs=seqs,
           sealed=sealed and sealed.n_samples, reserve=buf.reserve_path.exists())
    assert refused == 3 and before == (True, None, [], 0)
    assert seqs == list(range(1, 11)) and not buf.disk_full
    assert sealed is not None and sealed.n_samples == 10
    assert buf.path.exists() and _readable_by_others(buf.path)
    buf.close()
    again = Buffer(card / "d" / "buffer.sqlite", "van-new")
    assert again.epoch == buf.epoch and again.pending(10)[0].batch_id == sealed.batch_id
    again.close()


def test_agent_starts_on_a_card_that_filled_while_it_was_down(card, mosquitto, rx):
    # A backlog sealed and committed, the agent stops, someone fills the card.
    agent, link = make_agent(card, mosquitto.port, device="van-fullstart", sensors=4, batch=100)
    agent.run(duration_s=120)  # offline: 480 samples, 4 batches sealed
    epoch = agent.buffer.epoch
    backlog = agent.buffer.last_seq()
    agent.buffer.close()
    fill(card / "filler")
    assert shutil.disk_usage(card).free < 64 * 1024
    # Start on the full card (raised "disk I/O error" in _check_files before).
    agent, link = make_agent(card, mosquitto.port, device="van-fullstart", sensors=4, batch=100, max_pending=100_000)
    buf = agent.buffer
    exclusive_at_start = buf._exclusive
    link.start()
    drive(agent, 30)
    full_status = agent.status()
    delivered_s = wait_for(lambda: len(stored_rows(rx.store, "van-fullstart", epoch)) >= backlog - 80, 60,
                           "the sealed backlog reaching the store while the card is full", lambda: drive(agent, 5))
    full_status2 = agent.status()
    (card / "filler").unlink()
    last_before = buf.last_seq()
    resumed_s = wait_for(lambda: bool(stored_rows(rx.store, "van-fullstart", epoch, "seq > ?", (last_before,))),
                         60, "a sample committed after space returned reaching the store", lambda: drive(agent, 5))
    assert agent.drain(timeout_s=120)
    link.stop()
    (v,) = check(rx.store, [buf.path])
    report("agent-start-full-card", backlog=backlog, exclusive_at_start=exclusive_at_start,
           health_while_full=full_status["health"], at_risk=full_status2["samples_at_risk"],
           refused_commits=agent.stats.buffer_full, delivered_while_full_s=round(delivered_s, 1),
           resumed_after_free_s=round(resumed_s, 1), stored=v.stored, gapped=v.gapped, shared_again=not buf._exclusive)
    assert exclusive_at_start and not buf._exclusive  # opened without a -shm file, shared again with room
    assert full_status["health"] == "disk_full" and full_status2["samples_at_risk"] > 0
    assert agent.stats.buffer_full > 0
    assert_all_delivered([v])
    assert v.gapped == 0 and v.last_seq > backlog and agent.stats.lost_in_memory == 0


# --- B. samples held in memory when the agent ends on a full card ----------------------------


@pytest.mark.parametrize("how", ["graceful-stop", "abandoned"])
def test_samples_held_at_the_end_are_owned_up_to_after_restart(card, mosquitto, rx, how):
    agent, link = make_agent(card, mosquitto.port, device="van-heldstop", sensors=4, batch=100, max_pending=300)
    agent.run(duration_s=60)  # offline, room: 240 committed
    fill(card / "filler")
    drive(agent, 150)  # full: commits refused, samples held (300 at most, the rest discarded and counted)
    if how == "graceful-stop":
        agent.request_stop()
        agent.drain(timeout_s=1)  # cannot commit: the card is still full
    # "abandoned": the object is dropped as a kill would (nothing runs at the end); only the
    # fsynced note written at each refused commit is left.
    held, owed = len(agent._pending), agent._lost_in_memory
    note = agent.buffer._held.read()
    agent.buffer.close()
    taken1, committed1 = agent.stats.taken, agent.stats.committed
    (card / "filler").unlink()
    agent2, link2 = make_agent(card, mosquitto.port, device="van-heldstop", sensors=4, batch=100)
    gaps_at_open = agent2.buffer._db.execute("SELECT first_seq, last_seq, reason FROM gaps").fetchall()
    agent2.run(duration_s=30)
    link2.start()
    assert agent2.drain(timeout_s=120)
    link2.stop()
    (v,) = check(rx.store, [agent2.buffer.path])
    report("held-at-end", how=how, taken=taken1 + agent2.stats.taken, committed_first_run=committed1, held=held,
           owed=owed, note=note and (note.held, note.owed), gaps_at_open=gaps_at_open, stored=v.stored,
           gapped=v.gapped)
    assert_all_delivered([v])
    if how == "graceful-stop":
        # A graceful stop re-commits its held samples in slices down to one sample (the WAL's
        # own pages take them on a full card) and records the discarded ones as a gap: nothing
        # is left held, and every sample is stored or named by a gap record.
        assert held == 0 and owed == 0 and agent2.buffer._held.read() is None
        assert v.gapped > 0 and v.stored + v.gapped == taken1 + agent2.stats.taken
        return
    assert held > 0 and owed > 0 and note is not None and (note.held, note.owed) == (held, owed)
    assert taken1 == committed1 + held + owed  # the first run's ledger: every sample is somewhere
    assert sorted(b - a + 1 for a, b, _ in gaps_at_open) == sorted([held, owed])
    # Every sample taken is stored or named by a gap record: none lost without a record.
    assert v.gapped == held + owed and v.stored + v.gapped == taken1 + agent2.stats.taken
    assert agent2.buffer._held.read() is None  # settled and cleared


_KILLED_AGENT = """
import sys, time
from pathlib import Path
from tests.test_card_faults import fill, make_agent
card, port = Path(sys.argv[1]), int(sys.argv[2])
agent, _ = make_agent(card, port, device="van-kill9", sensors=4, batch=100, max_pending=300)
agent.run(duration_s=60)
fill(card / "filler")
while True:
    agent.run(duration_s=5)
    print("held", len(agent._pending), agent._lost_in_memory, agent.stats.taken, flush=True)
"""


def test_samples_held_when_the_agent_is_killed_are_owned_up_to(card):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from simulator.broker import free_port
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_AGENT, str(card), str(free_port())], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    note_path = card / "buffer.sqlite.held"
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it holds samples and has discarded some
            line = proc.stdout.readline()  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("held") and int(line.split()[2]) > 0:
                break
        os.kill(proc.pid, signal.SIGKILL)  # no stop, no drain, no close: only what is on the card counts
    finally:
        proc.kill()
        proc.wait()
    note = json.loads(note_path.read_bytes().split(b"\n")[0])  # the record; its CRC line follows
    (card / "filler").unlink()
    buf = Buffer(card / "buffer.sqlite", "van-kill9")
    gaps = buf._db.execute("SELECT first_seq, last_seq, reason FROM gaps").fetchall()
    present = {q for (q,) in buf._db.execute("SELECT seq FROM samples")}
    for (payload,) in buf._db.execute("SELECT payload FROM batches"):
        present |= {x.seq for x in decode_batch(payload).samples}  # type: ignore[misc]
    covered = {q for a, b, _ in gaps for q in range(a, b + 1)}
    report("kill9-while-full", last_line=lines[-1].strip(), note=note, gaps=gaps, last_seq=buf.last_seq())
    assert note["held"] > 0 and note["owed"] > 0
    assert sorted(b - a + 1 for a, b, _ in gaps) == sorted([note["held"], note["owed"]])
    # Every number 1..last_seq is a committed sample or named by a gap record; no hole, no overlap.
    assert present | covered == set(range(1, buf.last_seq() + 1)) and not present & covered
    buf.close()


# --- C. values the wire cannot carry -----------------------------------------------------------


def _mk(sensor: str, values: object) -> Sample:
    return Sample(sensor, 1_795_000_000_000, 1, TimeSource("gps"), values, (), None, "boot")  # type: ignore[arg-type]


def test_commit_refuses_or_normalises_what_the_wire_cannot_carry(tmp_path):
    buf = Buffer(tmp_path / "b.sqlite", "van-values", reserve_bytes=0)
    given = [_mk("pm", {"v": 1.0}), _mk("pm", {"v": [1, 2]}), _mk("pm", {"v": float("nan"), "w": 2}),
             _mk("pm", {"v": float("inf")}), _mk("pm", [1.0]), _mk("", {"v": 1.0}), _mk("pm", {"v": "ok"})]
    seqs = buf.commit(given)
    bad = buf._db.execute("SELECT seq, reason FROM bad_rows ORDER BY seq").fetchall()
    gaps = buf._db.execute("SELECT first_seq, last_seq, reason FROM gaps ORDER BY first_seq").fetchall()
    sealed = buf.seal(100, 0)
    assert sealed is not None
    batch = decode_batch(sealed.payload)  # the receiver's decoder accepts the whole batch
    after = buf.commit([_mk("pm", {"v": 3.0})])
    report("commit-values", seqs=seqs, refused=bad, gaps=[(a, b) for a, b, _ in gaps],
           sealed=[(x.seq, x.values, x.flags) for x in batch.samples], next_seq=after)
    assert seqs == [1, 2, 3, 4, 5, 6, 7] and after == [8]  # a refused sample still used its number
    assert [s for s, _ in bad] == [2, 5, 6]
    assert "must be a number" in bad[0][1] and "object" in bad[1][1] and "1 to 128 characters" in bad[2][1]
    assert [(a, b) for a, b, _ in gaps] == [(2, 2), (5, 5), (6, 6)]
    assert [(x.seq, x.values, x.flags) for x in batch.samples] == [
        (1, {"v": 1.0}, ()), (3, {"v": None, "w": 2}, ("non_finite",)), (4, {"v": None}, ("non_finite",)),
        (7, {"v": "ok"}, ())]
    assert buf.unsealed_count == 1 == buf._count_unsealed()
    buf.close()


@pytest.mark.parametrize("vals", ['{"v":[1,2]}', '{"v":NaN}', '{"v":1e999}', '[1]', "sensor"])
def test_a_row_that_verifies_but_cannot_travel_is_set_aside_at_sealing(tmp_path, vals):
    from buffer import rowcheck
    buf = Buffer(tmp_path / "b.sqlite", "van-travel", reserve_bytes=0)
    buf.commit([_mk("pm", {"v": float(i)}) for i in range(30)])
    db = sqlite3.connect(buf.path, isolation_level=None)  # what a driver bug or an old file leaves
    col, val = ("sensor", "") if vals == "sensor" else ("vals", vals)
    db.execute(f"UPDATE samples SET {col}=? WHERE seq=10", (val,))
    r = db.execute("SELECT seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags FROM samples WHERE seq=10")
    db.execute("UPDATE samples SET crc=? WHERE seq=10", (rowcheck.row_crc(*r.fetchone()),))  # checksum is right
    db.close()
    sealed = [buf.seal(20, 0), buf.seal(20, 0), buf.seal(20, 0)]
    bad = buf._db.execute("SELECT seq, reason FROM bad_rows").fetchall()
    got = [x.seq for sb in sealed if sb for x in decode_batch(sb.payload).samples]
    gaps = [g for sb in sealed if sb for g in decode_batch(sb.payload).gaps]
    report("travel", vals=vals, set_aside=bad, sealed_seqs=len(got), gaps=gaps)
    assert [s for s, _ in bad] == [10] and got == [s for s in range(1, 31) if s != 10]
    assert [(g.first_seq, g.last_seq) for g in gaps] == [(10, 10)]
    buf.close()


def test_agent_does_not_crash_loop_on_a_row_that_cannot_travel(tmp_path):
    from buffer import rowcheck
    from simulator.broker import free_port
    d = tmp_path / "van"
    agent, _ = make_agent(d, free_port(), device="van-crashloop", batch=50)
    agent.run(duration_s=20)
    db = sqlite3.connect(agent.buffer.path, isolation_level=None)
    seq = db.execute("SELECT max(seq) FROM samples").fetchone()[0]
    db.execute("UPDATE samples SET vals='{\"v\":[1,2]}' WHERE seq=?", (seq,))
    r = db.execute("SELECT seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags FROM samples WHERE seq=?",
                   (seq,)).fetchone()
    db.execute("UPDATE samples SET crc=? WHERE seq=?", (rowcheck.row_crc(*r), seq))
    db.close()
    runs = []
    for _ in range(3):  # it crash-looped here: every start raised from maybe_seal
        agent.run(duration_s=60)
        runs.append(agent.stats.sealed_batches)
        agent.buffer.close()
        agent, _ = make_agent(d, free_port(), device="van-crashloop", batch=50)
    bad = agent.buffer._db.execute("SELECT seq FROM bad_rows").fetchall()
    report("agent-no-crash-loop", sealed_per_run=runs, set_aside=bad)
    assert [s for (s,) in bad] == [seq] and all(n > 0 for n in runs)
    agent.buffer.close()


def test_a_seal_that_fails_is_logged_and_counted_not_a_crash(tmp_path):
    from simulator.broker import free_port
    agent, _ = make_agent(tmp_path / "van", free_port(), device="van-sealguard", batch=50, sensors=0)
    agent.buffer.commit(_samples(60))
    other = sqlite3.connect(agent.buffer.path, isolation_level=None)  # a technician's shell holding a write lock
    other.execute("BEGIN IMMEDIATE")
    agent.run(duration_s=1)  # one tick: seal waits out SQLite's busy timeout and raises "database is locked"
    failures, sealed_locked = agent.stats.seal_failures, agent.stats.sealed_batches
    other.execute("ROLLBACK")
    other.close()
    agent.run(duration_s=1)
    report("seal-guard", seal_failures=failures, sealed_while_locked=sealed_locked,
           sealed_after=agent.stats.sealed_batches, status_failures=agent.status()["seal_failures"])
    assert failures == 1 and sealed_locked == 0  # raised inside tick, caught, counted
    assert agent.stats.sealed_batches == 1 and agent.buffer.unsealed_count == 10  # and sealing went on
    agent.buffer.close()


# --- D. damage to the table definitions and the b-trees: never a crash, never a silent loss -----


def _mk_p3(i: int) -> Sample:
    return Sample("pm%d" % (i % 3), 1_795_000_000_000 + i * 333, 5_000 + i * 333,
                  TimeSource("gps" if i % 5 else "ntp"), {"pm25": round(i * 1.37, 2), "n": i},
                  ("warming_up",) if i % 7 == 0 else (), None, "boot-%04d" % (i % 2))


def _build_p3(d: Path) -> tuple[Buffer, dict[int, Sample], dict[tuple[str, int], int]]:
    """The tester's file (verify-b probes/p3_bitflip.py): 300 samples, 8 batches, the first two delivered."""
    buf = Buffer(d / "b.db", "van-p3")
    ledger: dict[int, Sample] = {}
    for k in range(30):
        ss = [_mk_p3(k * 10 + j) for j in range(10)]
        buf.commit(ss)
        ledger.update({s.seq: s for s in ss})  # type: ignore[misc]
        if k % 3 == 2 and k < 24:
            buf.seal(25, 1)
    delivered: dict[tuple[str, int], int] = {}
    for sb in buf.pending(2):
        for s in decode_batch(sb.payload).samples:
            delivered[(buf.epoch, s.seq)] = delivered.get((buf.epoch, s.seq), 0) + 1  # type: ignore[index]
        buf.acknowledge(sb.batch_id)
    return buf, ledger, delivered


def _p3_flips(trial: int, seed: int = 11, size: int = 65536) -> list[tuple[int, int]]:
    """The (offset, bit) flips of the tester's trial ``trial`` (its random stream, replayed)."""
    import random
    rng = random.Random(seed)
    for t in range(trial + 1):
        flips = [(rng.randrange(size), rng.randrange(8)) for _ in range(rng.choice([1, 1, 2, 8]))]
    return flips


def _drain_and_account(d: Path, epoch0: str, ledger: dict[int, Sample],
                       delivered: dict[tuple[str, int], int]) -> dict[str, Any]:
    """Open the damaged file as the agent would, deliver everything, and account for every number."""
    buf = Buffer(d / "b.db", "van-p3")
    gaps: list[tuple[int, int, str]] = []
    altered = 0
    for _ in range(50):
        while buf.seal(100, 2):
            pass
        pend = buf.pending(20)
        if not pend:
            break
        for sb in pend:
            b = decode_batch(sb.payload)
            for s in b.samples:
                delivered[(b.epoch, s.seq)] = delivered.get((b.epoch, s.seq), 0) + 1  # type: ignore[index]
                exp = ledger.get(s.seq) if b.epoch == epoch0 else None  # type: ignore[arg-type]
                if b.epoch == epoch0 and (exp is None or (s.values, s.t_utc_ms, s.boot_id) !=
                                          (exp.values, exp.t_utc_ms, exp.boot_id)):
                    altered += 1
            gaps += [(g.first_seq, g.last_seq, g.reason) for g in b.gaps if b.epoch == epoch0]
            buf.acknowledge(sb.batch_id)
    reasons = [p.read_text().strip()[:80] for p in (d / "quarantine").rglob("reason.txt")]
    out = {"new_epoch": buf.epoch != epoch0, "quarantine": reasons, "altered": altered,
           "doubled": [q for q in ledger if delivered.get((epoch0, q), 0) > 1],
           "silent": [q for q in ledger if not delivered.get((epoch0, q)) and not any(a <= q <= b for a, b, _ in gaps)],
           "gapped": sum(1 for q in ledger if not delivered.get((epoch0, q))),
           "gap_reasons": sorted({r[:50] for _, _, r in gaps})}
    buf.close()
    return out


@pytest.mark.parametrize("trial", [54, 149, 162, 191])
def test_bit_flips_that_crashed_or_lost_silently_now_quarantine_and_name_the_loss(tmp_path, trial):
    buf, ledger, delivered = _build_p3(tmp_path)
    epoch0 = buf.epoch
    buf.close()
    data = bytearray((tmp_path / "b.db").read_bytes())
    assert len(data) == 65536  # the tester's layout, so the replayed flips land where theirs did
    flips = _p3_flips(trial)
    for off, bit in flips:
        data[off] ^= 1 << bit
    (tmp_path / "b.db").write_bytes(bytes(data))
    out = _drain_and_account(tmp_path, epoch0, ledger, delivered)
    report("bitflip", trial=trial, flips=flips, **out)
    assert out["new_epoch"] and out["quarantine"]  # the damage was found and the file set aside
    assert not out["silent"] and not out["doubled"] and out["altered"] == 0


def test_garbled_table_definitions_salvage_the_rest_and_name_the_loss(tmp_path):
    buf, ledger, delivered = _build_p3(tmp_path)
    epoch0 = buf.epoch
    buf.close()
    data = bytearray((tmp_path / "b.db").read_bytes())
    at = data.find(b"CREATE TABLE batches")
    data[at + 14] ^= 0x40  # "batches" -> "bAtches": the schema no longer has the table the code reads
    (tmp_path / "b.db").write_bytes(bytes(data))
    out = _drain_and_account(tmp_path, epoch0, ledger, delivered)
    report("schema-damage", **out)
    assert out["new_epoch"] and out["quarantine"]
    assert not out["silent"] and not out["doubled"] and out["altered"] == 0
    assert out["gapped"] < len(ledger)  # the tables that still read were salvaged, not given up


def test_a_file_with_nothing_readable_still_names_its_epoch_and_loss(tmp_path):
    from buffer.recovery import EPOCH_END
    buf, ledger, delivered = _build_p3(tmp_path)
    epoch0 = buf.epoch
    buf.close()
    data = bytearray((tmp_path / "b.db").read_bytes())
    data[100:4096] = bytes(range(256)) * 15 + bytes(range(236))  # page 1: header tail and sqlite_master
    (tmp_path / "b.db").write_bytes(bytes(data))
    nb = Buffer(tmp_path / "b.db", "van-p3")
    carriers = [decode_batch(sb.payload) for sb in nb.pending(50) if sb.epoch == epoch0]
    gaps = [(g.first_seq, g.last_seq, g.reason) for b in carriers for g in b.gaps]
    report("nothing-readable", new_epoch=nb.epoch, gaps=gaps)
    assert nb.epoch != epoch0
    assert (1, EPOCH_END) in [(a, b) for a, b, _ in gaps] or any(
        a <= 51 and b == EPOCH_END for a, b, _ in gaps)  # named: epoch X, rows after N unreadable
    nb.close()


def test_values_the_receiver_would_refuse_are_set_aside_at_commit_not_the_whole_batch(tmp_path):
    """A number beyond 64 bits or +-1e15, an over-long string or key: the receiver's schema
    (receiver/validate.py) refuses a batch holding one, so the good samples around it would be
    lost with it. The buffer refuses such a sample alone, at commit, and the batch passes."""
    from receiver.validate import check_batch

    buf = Buffer(tmp_path / "b.sqlite", "van-bounds", reserve_bytes=0)
    given = [_mk("pm", {"v": 1.0}), _mk("pm", {"v": 10**30}), _mk("pm", {"v": -(10**19)}),
             _mk("pm", {"v": 2e15}), _mk("pm", {"v": "x" * 20_000}), _mk("pm", {"k" * 200: 1.0}),
             _mk("pm", {f"k{i}": 1.0 for i in range(300)}), _mk("pm", {"v": 2**62}), _mk("pm", {"v": -1e15})]
    buf.commit(given)
    refused = [s for s, in buf._db.execute("SELECT seq FROM bad_rows ORDER BY seq")]
    sealed = buf.seal(100, 0)
    assert sealed is not None
    batch = check_batch(decode_batch(sealed.payload))  # the receiver's own door: no PayloadError
    report("commit-bounds", refused=refused, sealed=[x.seq for x in batch.samples],
           gaps=[(g.first_seq, g.last_seq) for g in batch.gaps])
    assert refused == [2, 3, 4, 5, 6, 7]
    assert [x.seq for x in batch.samples] == [1, 8, 9]
    covered = sorted(s for g in batch.gaps for s in range(g.first_seq, g.last_seq + 1))
    assert covered == refused  # every refused sample owned up to, once
    buf.close()


def test_a_flipped_bit_in_the_meta_index_quarantines_instead_of_stopping_the_agent(tmp_path):
    """tests/data/buffer-meta-index-flip.sqlite: a buffer (300 samples committed, 1-50 acked, six
    sealed batches of 25 pending, 201-300 unsealed) with one bit flipped in the index of `meta`
    (offset 12285, bit 4; found by an independent tester's bit-flip run). The epoch row can no
    longer be found through the index, and writing a new one hit a UNIQUE error: the agent could
    not start, for good. Now it is damage like any other: quarantine, salvage, a new epoch."""
    from pathlib import Path

    src = Path(__file__).parent / "data" / "buffer-meta-index-flip.sqlite"
    path = tmp_path / "b.db"
    path.write_bytes(src.read_bytes())
    buf = Buffer(path, "van-p3")
    pending = list(buf.pending(100))
    samples = [s.seq for sb in pending for s in decode_batch(sb.payload).samples]
    report("meta-index-flip", quarantined=sorted(p.name for p in (tmp_path / "quarantine").iterdir()),
           new_epoch=buf.epoch, pending_batches=len(pending), salvaged_samples=len(samples))
    assert (tmp_path / "quarantine").is_dir() and any((tmp_path / "quarantine").iterdir())
    # Everything not yet delivered (51-300) comes back: the sealed batches as they were, the
    # unsealed rows salvaged; nothing is silently gone.
    assert sorted(samples) == list(range(51, 301))
    buf.close()
