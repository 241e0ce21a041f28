"""Real power cuts (issue 14, point 6): unsynced writes are lost, not only the process.

The van's data directory is a power-cut file system (simulator/powercut.py):
at each cut the agent is SIGKILLed and every write it had not fsynced is thrown
away (all of it, or a random part of it as a cache that wrote some pages back),
the file system is unmounted and mounted again, and the agent restarts on what
is left. At the end the van drains to a real receiver through a real Mosquitto
and the oracle counts every committed sample.

"Committed" is what the agent treated as durable, seen from outside the van:
every batch it published (the receiver stored it) and every heartbeat's
``last_seq`` (read from its buffer after the commit returned). After each cut
the buffer must still hold at least that much, so a lost commit is caught at
the cut where it happened, not hidden by the sequence numbers being reused.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from simulator.oracle import check, device_side
from simulator.powercut import PAGE as PAGE_SIZE
from simulator.powercut import PowerCutMount
from tests.delivery_harness import Receiver, Van, finish_and_check, report, store_counters
from tests.test_delivery_faults import assert_all_delivered, rx  # noqa: F401 (rx: the receiver fixture)
from core.wire import decode_status


class HeartbeatWitness:
    """Every heartbeat the van sends: the highest ``last_seq`` it called committed, per epoch."""

    def __init__(self, port: int, device: str) -> None:
        self.max_seq: dict[str, int] = {}
        self.heartbeats = 0
        self._lock = threading.Lock()
        self._c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="hb-witness")
        self._c.on_message = self._on_message
        self._c.on_connect = lambda c, *_: c.subscribe(f"datalab/v1/{device}/status", qos=1)
        self._c.connect("127.0.0.1", port)
        self._c.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        st = decode_status(msg.payload)  # what the receiver reads: compact (v2) or JSON (v1)
        if "last_seq" not in st or "epoch" not in st:
            return  # a last will: online false
        with self._lock:
            self.heartbeats += 1
            self.max_seq[st["epoch"]] = max(self.max_seq.get(st["epoch"], 0), int(st["last_seq"]))

    def seen(self, epoch: str) -> int:
        with self._lock:
            return self.max_seq.get(epoch, 0)

    def close(self) -> None:
        self._c.loop_stop()
        self._c.disconnect()


def settle(store: Path, quiet_s: float = 0.15, limit_s: float = 5.0) -> None:
    """Wait until the receiver has stored what was on its way (its counters stop moving)."""
    last, still_since, deadline = None, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = store_counters(store) if store.exists() else {}
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet_s:
            return
        time.sleep(0.03)


def wait_for_line(log: Path, offset: int, text: str, timeout: float = 60.0) -> None:
    """Until ``text`` appears in ``log`` after ``offset`` (the run started then)."""
    deadline = time.monotonic() + timeout
    while True:
        if log.exists():  # the forked run creates it
            with open(log, "rb") as f:
                f.seek(offset)
                if text.encode() in f.read():
                    return
        assert time.monotonic() < deadline, f"{text!r} not in {log} after {timeout} s"
        time.sleep(0.02)


def wait_for_uploads(store: Path, timeout: float = 10.0) -> bool:
    """Until the receiver stores another batch (True), or ``timeout`` (False: nothing to send)."""
    before = store_counters(store).get("batches_stored", 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store_counters(store).get("batches_stored", 0) > before:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def card(tmp_path):
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this machine: a power-cut file system cannot be mounted")
    if not shutil.which("fusermount3"):
        pytest.fail("fusermount3 is not installed: run scripts/test, which installs fuse3")
    m = PowerCutMount(tmp_path / "card", seed=14)
    yield m
    m.close()


# How long a cut waits for the receiver to store a batch before it falls anyway. The van samples
# at 200 a second meanwhile: with a receiver that slows as its store grows (docs/durability.md)
# a 10 s wait made late cuts ~2,000 samples each, and the backlog fed the slowdown.
UPLOAD_WAIT_S = 4.0
# The final drain's window (batches in flight); see the drain below.
DRAIN_WINDOW = 16
# DATALAB_POWER_CUTS=200 runs the slow parameter shorter (a loaded machine); the default is the brief's.
SLOW_CUTS = int(os.environ.get("DATALAB_POWER_CUTS", "1000"))


@pytest.mark.parametrize("cuts", [pytest.param(100, id="ci", marks=pytest.mark.timeout(1200)),  # >300 s loaded
                                  pytest.param(SLOW_CUTS, id="slow", marks=[pytest.mark.slow,
                                                                       pytest.mark.timeout(3 * 3600)])])
def test_power_cuts_at_random_moments_lose_nothing_committed(tmp_path, mosquitto, rx, card, cuts):  # noqa: F811 (rx: the imported fixture)
    rng = random.Random(20261206)
    van = Van("van-pc", tmp_path / "vans", mosquitto.port, forked=True, data_dir=card.path)
    # A heartbeat a second (the minimum): one more outside witness of what was committed.
    van.config.write_text(van.config.read_text().replace("keepalive_s = 5", "keepalive_s = 5\nheartbeat_s = 1"))
    witness = HeartbeatWitness(mosquitto.port, van.device)
    t0 = time.monotonic()
    mid_run = partial = in_startup = in_upload = 0
    epochs: set[str] = set()
    try:
        for i in range(cuts):
            offset = van.log.stat().st_size if van.log.exists() else 0
            van.start()
            moment = rng.random()
            if moment < 0.1:  # while it starts: opening and recovering the buffer
                in_startup += 1
                time.sleep(rng.uniform(0.0, 0.3))
            else:  # however slow the start on a busy machine, then at a random moment ...
                wait_for_line(van.log, offset, " started, epoch ")
                if moment < 0.7:  # ... while it samples, commits and seals
                    time.sleep(rng.uniform(0.05, 1.0))
                else:  # ... while batches go up and acks come back (uploads wait for the resync)
                    in_upload += wait_for_uploads(rx.store, timeout=UPLOAD_WAIT_S)
                    time.sleep(rng.uniform(0.0, 0.4))
            mid_run += van.kill()  # False: the short shift had ended (drained) before the cut
            settle(rx.store)
            keep = 0.0 if i % 2 == 0 else 0.5  # all unsynced pages lost, or half of them written back
            partial += keep > 0
            card.cut(keep)
            try:
                _device, epoch, last_seq, integrity = device_side(van.buffer)
            except sqlite3.Error as exc:
                pytest.fail(f"cut {i}: the buffer is unreadable after a power cut: {exc}")
            epochs.add(epoch)
            assert integrity == "ok", f"cut {i}: the buffer is damaged after a power cut: {integrity}"
            assert len(epochs) == 1, f"cut {i}: the buffer started a new epoch (quarantined?): {epochs}"
            # Nothing the agent treated as committed is gone: not what it published ...
            v = check(rx.store, [van.buffer])[0]
            assert not v.extra, f"cut {i}: the store holds seqs the buffer lost: {v.extra[:10]}"
            assert not v.doubled and not v.altered, v
            # ... nor what it said it had committed.
            assert witness.seen(epoch) <= last_seq, (
                f"cut {i}: a heartbeat reported last_seq {witness.seen(epoch)}, the buffer has {last_seq}")
            if (i + 1) % 100 == 0:  # progress of long runs (pytest -s)
                report("power-cuts-progress", cuts=i + 1, last_seq=last_seq, stored=v.stored,
                       unsynced_bytes_lost=card.bytes_lost, wall_s=round(time.monotonic() - t0))
        # Runs cut short leave a backlog (uploads wait for the resync's answer): time to hand it in.
        # With 4 batches of 40 samples in flight per ack round trip, the van's drain is bound by
        # the round trip through this FUSE card and a loaded receiver, whose per-batch cost grows
        # with the store (docs/durability.md). A van back in coverage may use a wider window
        # (uplink.window is per van), with an ack timeout that a deep queue does not outrun (else
        # re-sends): the drain and the final oracle are what is tested here, not the pace.
        van.config.write_text(van.config.read_text().replace("window = 4", f"window = {DRAIN_WINDOW}")
                              .replace("ack_timeout_s = 2.0", "ack_timeout_s = 10.0"))
        drain_t0 = time.monotonic()
        verdicts = finish_and_check([van], rx.store, timeout=120.0 if cuts <= 100 else 1800.0)
        drain_s = round(time.monotonic() - drain_t0, 1)
    finally:
        van.kill()  # a failed run must not keep the card busy
        witness.close()
    fs = card.stats()
    counters = store_counters(rx.store)
    report("power-cuts", cuts=card.cuts, mid_run=mid_run, in_startup=in_startup, in_upload=in_upload,
           partial_writeback=partial,
           unsynced_bytes_lost=card.bytes_lost, entries_lost=card.entries_lost, fsyncs=fs["fsyncs"],
           dir_fsyncs=fs["dir_fsyncs"], heartbeats=witness.heartbeats, committed=verdicts[0].last_seq,
           stored=verdicts[0].stored, gapped=verdicts[0].gapped, duplicates=counters.get("batches_duplicate", 0),
           resync_acks=counters.get("resync_acks", 0), drain_s=drain_s, wall_s=round(time.monotonic() - t0))
    # The cuts happened and cost something: the agent was running and lost unsynced writes.
    assert card.cuts == cuts
    assert mid_run >= cuts * 0.9, f"only {mid_run} of {cuts} cuts found the agent running"
    assert card.bytes_lost > 0, "no cut ever found unsynced data: nothing was tested"
    assert witness.heartbeats > 0
    assert in_upload > 0, "no cut fell while batches were going up"
    assert_all_delivered(verdicts)
    # Nothing committed was lost, so nothing may be owned up to as lost either: the WAL
    # high-water record (buffer/highwater.py) lags the database at a cut, it never leads it.
    assert verdicts[0].gapped == 0, verdicts[0]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_the_card_keeps_only_what_was_synced(card):
    """The file system itself: the POSIX rules SQLite relies on, and nothing more."""
    root = card.path
    (root / "kept").write_bytes(b"durable")
    _fsync(root / "kept")
    (root / "old").write_bytes(b"x")
    _fsync(root / "old")
    (root / "db").mkdir()  # SQLite's directory syncs must not make the names below durable
    _fsync(root)  # names made durable: kept, old, db
    with open(root / "kept", "ab") as f:
        f.write(b" and lost")  # never fsynced
    (root / "unnamed").write_bytes(b"synced, but its name never was")
    _fsync(root / "unnamed")
    os.rename(root / "old", root / "new")  # no directory fsync after it
    # SQLite in WAL mode as the buffer uses it (synchronous=FULL), and the same without syncs.
    for name, sync in (("full.sqlite", "FULL"), ("off.sqlite", "OFF")):
        db = sqlite3.connect(root / "db" / name)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync}")
        with db:
            db.execute("CREATE TABLE t (x)")
        for i in range(50):
            with db:
                db.execute("INSERT INTO t VALUES (?)", (i,))
        db.close()  # a clean close (checkpoint) too: with OFF it still syncs nothing
    # SQLite maps its -shm file shared: that must work on this mount.
    with open(root / "map", "w+b") as f:
        f.truncate(PAGE_SIZE)
        with mmap.mmap(f.fileno(), PAGE_SIZE, mmap.MAP_SHARED) as m:
            m[:5] = b"shmok"
        assert (root / "map").read_bytes()[:5] == b"shmok"

    lost_bytes, lost_entries = card.cut()

    names = set(os.listdir(root))
    report("card-rules", lost_bytes=lost_bytes, lost_entries=lost_entries, after_cut=sorted(names))
    assert (root / "kept").read_bytes() == b"durable"
    assert "unnamed" not in names and "new" not in names and "old" in names
    full = sqlite3.connect(root / "db" / "full.sqlite")
    assert full.execute("SELECT count(*) FROM t").fetchone()[0] == 50
    assert full.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    full.close()
    off_rows = 0
    if (root / "db" / "off.sqlite").exists():
        off = sqlite3.connect(root / "db" / "off.sqlite")
        off_rows = off.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        off.close()
    assert off_rows == 0, "unsynced SQLite commits must not survive a cut"
    assert lost_bytes > 0 and lost_entries >= 2


def test_a_cut_whose_fuse_loop_never_ends_does_not_hang(card):
    """t14 finding 6: after ``fusermount3 -u`` the daemon's FUSE loop can sit on in
    ``fuse_dev_do_read`` and never say ``unmounted``; the harness waited for ever. Now it waits a
    bounded time, sees the mount gone, has the daemon abandon the loop, and the card's durable
    state survives into the next mount."""
    root = card.path
    (root / "kept").write_bytes(b"durable")
    _fsync(root / "kept")
    _fsync(root)
    card.unmount_wait = 1.0  # the stalled loop below never reports: do not wait the default
    card.stall_next_unmount()
    card.cut()
    report("stalled-unmount", abandoned=card.abandoned, cuts=card.cuts)
    assert card.abandoned == 1
    assert os.path.ismount(root) and (root / "kept").read_bytes() == b"durable"
    (root / "after").write_bytes(b"y")  # the new mount serves writes
    _fsync(root / "after")
    _fsync(root)
    card.cut()  # a normal cut: the loop reports its end, nothing abandoned
    assert card.abandoned == 1 and (root / "after").read_bytes() == b"y"


def test_receiver_power_cuts_lose_nothing_acked(tmp_path, mosquitto, card):
    rng = random.Random(11)
    r = Receiver(card.path / "store.sqlite", mosquitto.port, client_id="rx-pc")
    r.log = tmp_path / "rx-pc.log"  # the log is the operator's, not the card's
    r.start()
    vans = [Van(f"van-rc{i}", tmp_path / "vans", mosquitto.port, forked=True, speedup=40.0) for i in range(2)]
    for v in vans:
        v.config.write_text(v.config.read_text().replace("shift_hours = 0.05", "shift_hours = 0.1"))
        v.start()
    try:
        while any(v.proc.poll() is None for v in vans) and card.cuts < 5:
            time.sleep(rng.uniform(0.2, 1.0))
            r.kill()
            card.cut()
            r.start()
        for v in vans:  # the shift ends and each van drains what the receiver has not acked
            assert v.wait(120) == 0, v.log.read_text()[-2000:]
        verdicts = check(r.store, [v.buffer for v in vans])
    finally:
        r.stop()
    report("receiver-power-cuts", cuts=card.cuts, unsynced_bytes_lost=card.bytes_lost,
           committed=sum(v.last_seq for v in verdicts), stored=sum(v.stored for v in verdicts),
           lost=sum(len(v.missing) for v in verdicts))
    assert card.cuts >= 3, "the vans finished before the receiver was cut often enough"
    assert_all_delivered(verdicts)


def test_partial_write_back_keeps_whole_pages_of_unsynced_writes():
    """The model alone (no mount): with ``keep`` a cut keeps each unsynced page or loses it whole."""
    from simulator.powercut import PowerCutFS

    fs = PowerCutFS(seed=3)
    fh = fs.create("/f", 0o644)
    fs.write("/f", b"a" * PAGE_SIZE, 0, fh)
    fs.fsync("/f", 0, fh)
    fs.fsyncdir("/", 0, fs.opendir("/"))
    for page in range(1, 41):  # 40 unsynced pages after the synced one
        fs.write("/f", bytes([page]) * PAGE_SIZE, page * PAGE_SIZE, fh)
    fs.cut(keep=0.5)
    fs.thaw()
    data = fs.read("/f", 41 * PAGE_SIZE, 0, fs.open("/f", os.O_RDONLY))
    pages = [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    kept = [i for i, pg in enumerate(pages) if i and pg == bytes([i]) * PAGE_SIZE]
    report("partial-write-back", unsynced_pages=40, kept=len(kept), file_pages=len(pages))
    assert pages[0] == b"a" * PAGE_SIZE, "the synced page survives"
    assert all(pg in (bytes([i]) * PAGE_SIZE, bytes(PAGE_SIZE)) for i, pg in enumerate(pages) if i), "torn page"
    assert 5 < len(kept) < 35, "about half the unsynced pages survive"
    fs.cut(keep=0.0)
    fs.thaw()
    assert fs.getattr("/f")["st_size"] == len(data), "what the first cut kept is on the card now"
