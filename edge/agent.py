"""The device agent's main loop: sample, commit, seal, publish, act on acks.

One thread owns the loop and the SQLite buffer. Each tick:

1. every sensor is read once and the reading stamped (UTC, monotonic, source);
2. samples wait in memory until the commit interval has passed, then go to the
   buffer in one transaction (one fsync: the SD card sees few writes, and a
   power cut loses at most one interval);
3. committed samples are sealed into batches by count or age;
4. batches are published within a window of un-acknowledged ones, re-sent
   after a timeout with the same id and bytes;
5. acks from the receiver delete batches (committed) or turn them into gap
   records (rejected). A broker PUBACK is never taken as delivery.

Sampling runs on the injected ``clock`` (virtual in simulations); network
timeouts run on ``timer``, which is always real time.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from buffer.errors import BufferFullError
from buffer.heldledger import OWED_REASON
from buffer.store import Buffer
from drivers.base import SensorDriver
from core.clock import Clock
from edge import timeref
from edge.config import AgentConfig
from core.errors import PayloadError, RecoverableError
from core.faultpoints import crash_point
from core.sample import Sample
from core.timekeeping import MEASURED_MONO, MEASURED_UTC, TimeFixSource, TimeKeeper
from uplink.mqtt import Link
from core.wire import content_hash, parse_batch_id

log = logging.getLogger(__name__)


@dataclass
class AgentStats:
    ticks: int = 0
    taken: int = 0
    committed: int = 0
    sealed_batches: int = 0
    published: int = 0
    resent: int = 0
    acked_batches: int = 0
    acked_samples: int = 0
    duplicate_acks: int = 0
    rejected_batches: int = 0
    time_corrected: int = 0
    syncs: int = 0
    buffer_full: int = 0  # commits the full card refused
    lost_in_memory: int = 0  # samples discarded from memory while the card was full
    corrupt_batches: int = 0
    seal_failures: int = 0  # seal() raised; caught in tick so the agent keeps sampling
    heartbeats: int = 0
    read_errors: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class EpochCounted(Protocol):
    """A GPS driver that counts its receiver's epochs (drivers/gps.py NmeaGpsDriver)."""

    def epoch_health(self) -> dict[str, int]: ...


@dataclass
class _InFlight:
    batch_id: str
    last_seq: int
    n_samples: int
    sha256: str
    sent_at: float
    retry_s: float  # re-send after this long without an ack (short until the path is proven)


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        drivers: list[SensorDriver],
        clock: Clock,
        buffer: Buffer,
        link: Link,
        *,
        timer: Callable[[], float] = time.monotonic,
        boot_id: str | None = None,
        timekeeper: TimeKeeper | None = None,
        max_pending: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.drivers = drivers
        self.clock = clock
        self.buffer = buffer
        self.link = link
        self.timer = timer
        self.boot_id = boot_id or _boot_id()
        self.timekeeper = timekeeper or TimeKeeper(
            clock,
            [d for d in drivers if isinstance(d, TimeFixSource)],
            gps_valid_s=cfg.time.gps_valid_s,
            tolerance_s=cfg.time.step_tolerance_s,
            confirm_s=cfg.time.step_confirm_s,
            gps_latency_s=cfg.time.gps_latency_s,
        )
        # The spine of an earlier run of this boot: a clock step made meanwhile is judged, not
        # trusted at once (edge/timeref.py).
        self._spine_path = Path(cfg.device.data_dir) / timeref.FILE_NAME
        rec = timeref.load(self._spine_path, self.boot_id, int(clock.monotonic() * 1000))
        if rec is not None and self.timekeeper.spine() is None:
            self.timekeeper.resume(rec.offset_ms, rec.last_ms)
            log.info("time: resumed this boot's spine (offset %+d ms) from the previous run", rec.offset_ms)
        self._spine_saved: tuple[int, float] | None = None  # (offset ms, monotonic s) last written
        self.stats = AgentStats()
        # Things to close when the agent ends (simulated hardware, ...).
        self.resources: list[Any] = []
        # Samples of this boot stamped before the clock was trusted, waiting to be corrected.
        self._unsync = buffer.count_unsync(self.boot_id)
        self._unsync_since: float | None = clock.monotonic() if self._unsync else None
        self._pending: list[Sample] = []
        self._commit_slice = COMMIT_SLICE  # shrinks while a full card refuses slices (see commit)
        # Samples a full card refused are held here up to this many (then the oldest go).
        self.max_pending = MAX_PENDING_IN_MEMORY if max_pending is None else max_pending
        self._lost_in_memory = 0  # discarded from memory, gap record not yet written
        self._last_commit = clock.monotonic()
        self._first_unsealed_mono: float | None = None
        self._in_flight: dict[str, _InFlight] = {}  # by batch id (salvaged batches keep their epoch)
        self._last_heartbeat = -1e18
        self._hold_uploads_until = -1e18
        # (seals + acks seen, holding for a resync) when the last look at the buffer found every
        # sealed batch in flight: until one of them changes there is nothing new to send, and the
        # two queries a tick are skipped (issue #18: the van's CPU budget).
        self._all_sent_at: tuple[int, bool] | None = None
        self._acks_seen = 0
        self._sync_named: frozenset[str] = frozenset()  # batch ids the last resync asked about
        self._path_proven = False  # an ack came back since the last (re)connection
        self._stop = threading.Event()
        self._error_logged: dict[str, float] = {}

    # -- control --------------------------------------------------------------

    def request_stop(self) -> None:
        """Safe from a signal handler or another thread: the loop ends after this tick."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, duration_s: float | None = None) -> None:
        """Sample until stopped (or for ``duration_s`` of monotonic time), then commit.

        The duration runs on the monotonic clock: the wall clock may step.
        """
        period = 1.0 / self.cfg.sampling.rate_hz
        start = next_tick = self.clock.monotonic()
        try:
            while not self._stop.is_set():
                if duration_s is not None and self.clock.monotonic() - start >= duration_s - 1e-9:
                    break
                self.tick()
                next_tick += period
                delay = next_tick - self.clock.monotonic()
                if delay < -period:
                    # We fell behind (a stalled bus, a suspended process): skip, don't burst.
                    next_tick = self.clock.monotonic()
                    delay = 0.0
                self.clock.sleep(delay)
        finally:
            self.commit()

    def tick(self) -> None:
        self.stats.ticks += 1
        self.sample()
        now = self.clock.monotonic()
        if now - self._last_commit >= self.cfg.sampling.commit_interval_s:
            self.commit()
        # Deletes acks a full card refused and re-creates the space reserve once there is room.
        self.buffer.housekeep()
        try:
            self.maybe_seal()
        except Exception as exc:  # noqa: BLE001  one bad seal must not become a crash loop at every start
            # The buffer sets aside what it can name (bad_rows + gap); anything else is
            # logged (once a minute), counted, and tried again next tick while sampling goes on.
            self.stats.seal_failures += 1
            self._count_error("seal", exc, unexpected=True)
        self.pump()

    # -- sampling -------------------------------------------------------------

    def sample(self) -> None:
        self.timekeeper.update()
        for drv in self.drivers:
            # A driver with a queue (the microphone: one level per second of audio) says how many
            # more wait; they are read now, so a late tick loses none (issue 15, v15 probe).
            for _ in range(MAX_READS_PER_TICK):
                if not self._read_one(drv):
                    break
                backlog = getattr(drv, "backlog", 0)
                if not isinstance(backlog, int) or backlog <= 0:
                    break

    def _read_one(self, drv: Any) -> bool:
        """Read ``drv`` once into the pending samples; False when it had nothing (or failed)."""
        try:
            reading = drv.read()
        except RecoverableError as exc:
            self._count_error(drv.name, exc)
            return False
        except Exception as exc:  # a driver bug must not stop the other sensors
            self._count_error(drv.name, exc, unexpected=True)
            return False
        if reading is None:
            return False
        # A driver that knows when its value was measured says so in its meta (a GPS epoch's
        # arrival, the end of a second of audio); anything else is stamped at its read.
        stamp = self.timekeeper.stamp(reading.meta.get(MEASURED_MONO), reading.meta.get(MEASURED_UTC))
        values, flags = _finite(reading.values, (*reading.flags, *stamp.flags))
        self._pending.append(
            Sample(
                sensor=reading.sensor,
                t_utc_ms=stamp.t_utc_ms,
                t_mono_ms=stamp.t_mono_ms,
                time_src=stamp.source,
                values=values,
                flags=flags,
                boot_id=self.boot_id,
            )
        )
        self.stats.taken += 1
        return True

    def _count_error(self, name: str, exc: BaseException, unexpected: bool = False) -> None:
        self.stats.read_errors[name] = self.stats.read_errors.get(name, 0) + 1
        now = self.timer()
        # At most one log line per sensor per minute: a dead sensor must not fill the journal.
        if now - self._error_logged.get(name, -1e9) >= 60:
            self._error_logged[name] = now
            if unexpected:
                log.exception("sensor %s: unexpected error (%d so far)", name, self.stats.read_errors[name])
            else:
                log.warning("sensor %s: %s (%d so far)", name, exc, self.stats.read_errors[name])

    def commit(self) -> None:
        self._last_commit = self.clock.monotonic()
        self._save_spine()
        if not self._pending:
            return
        held, self._pending = self._pending, []
        crash_point("agent.commit.before")
        while held:
            # Normally one transaction; what a full card held back goes in slices, oldest
            # first, so each fits in the pages that acknowledgements freed meanwhile. A slice
            # refused is halved down to one sample: any real room left is used, so delivery
            # resumes as soon as some room returns, not only when a whole slice fits (t14, 5).
            batch = held[:self._commit_slice]
            try:
                self.buffer.commit(batch)
            except BufferFullError as exc:
                if len(batch) > 1:
                    self._commit_slice = max(1, len(batch) // 2)
                    continue
                self._hold(held, exc)
                return
            held = held[len(batch):]
            # Room was found: grow back towards the normal slice (one transaction per interval).
            self._commit_slice = min(COMMIT_SLICE, self._commit_slice * 2)
            crash_point("agent.commit.after")
            self._committed(batch)
        if self._lost_in_memory:
            self._own_up_to_memory_loss()
        self.buffer.note_held(0, self._lost_in_memory)  # settled: clears the note (if one was written)

    def _save_spine(self) -> None:
        """Persist the decided spine for a restart of this boot: at once when it moved, else every
        ``timeref.SAVE_EVERY_S`` (its newest stamp grows); the spine follows its reference by ms."""
        sp = self.timekeeper.spine()
        if sp is None:
            return
        now = self.clock.monotonic()
        last = self._spine_saved
        if last is not None and abs(sp[0] - last[0]) < SPINE_MOVED_MS and now - last[1] < timeref.SAVE_EVERY_S:
            return
        if timeref.save(self._spine_path, timeref.SpineRecord(self.boot_id, sp[0], sp[1], int(now * 1000))):
            self._spine_saved = (sp[0], now)

    def _hold(self, held: list[Sample], exc: BufferFullError) -> None:
        """Nothing of ``held`` was stored (a full card; committed data is never dropped for new).

        Keep it in memory and try again next interval. Bounded: past the bound
        the oldest go, counted, and a gap record owns up once there is room.
        """
        held = held + self._pending
        over = len(held) - self.max_pending
        if over > 0:
            self._lost_in_memory += over
            self.stats.lost_in_memory += over
            held = held[over:]
        self._pending = held
        # Their count goes outside the database (which refuses writes): if the agent ends
        # now, the next start owns up to them with a gap record (buffer.heldledger).
        self.buffer.note_held(len(held), self._lost_in_memory)
        self.stats.buffer_full += 1
        self._count_error("buffer", exc)

    def _committed(self, batch: list[Sample]) -> None:
        self.stats.committed += len(batch)
        unsync = sum(1 for x in batch if not x.time_src.trusted)
        if unsync:
            self._unsync += unsync
            if self._unsync_since is None:
                self._unsync_since = self.clock.monotonic()
        if self._first_unsealed_mono is None:
            self._first_unsealed_mono = batch[0].t_mono_ms / 1000.0

    def _own_up_to_memory_loss(self) -> None:
        # Only after a commit went through: the card has room again. One reason text for
        # every such loss, so losses in a row merge into one gap record.
        n = self._lost_in_memory
        try:
            first, last = self.buffer.record_lost(n, OWED_REASON)
        except BufferFullError:
            return  # owned up to at a later commit
        self._lost_in_memory = 0
        log.error("card full: %d samples discarded from memory, owned up to as gap %d-%d", n, first, last)

    @property
    def samples_at_risk(self) -> int:
        """While the card refuses commits: the samples held in memory (lost if the agent stops now)."""
        if not (self.buffer.disk_full or self._lost_in_memory):
            return 0  # what waits for the next commit interval is not at risk
        return len(self._pending)

    def _hold_for_time(self, force: bool) -> bool:
        """Correct unsynchronised samples if trusted time is known; else say whether to wait."""
        if not self._unsync:
            return False
        offset = self.timekeeper.correction_offset_ms()
        if offset is not None:
            n = self.buffer.correct_unsync(self.boot_id, offset)
            self.stats.time_corrected += n
            log.info("corrected %d samples stamped before the clock was trusted", n)
            self._unsync, self._unsync_since = 0, None
            return False
        if force:
            return False
        waited = self.clock.monotonic() - (self._unsync_since or self.clock.monotonic())
        if waited < self.cfg.time.hold_unsync_s:
            return True
        # Waited long enough: they go out flagged "unsync" (or with time unknown).
        self._unsync, self._unsync_since = 0, None
        return False

    def maybe_seal(self, force: bool = False) -> None:
        bc = self.cfg.batch
        if self._hold_for_time(force):
            return
        while self.buffer.unsealed_count > 0:
            age = (
                self.clock.monotonic() - self._first_unsealed_mono
                if self._first_unsealed_mono is not None
                else 0.0
            )
            # Sealing by age is for freshness; with no link there is nobody to be fresh for,
            # and fewer, fuller batches drain faster when coverage returns.
            aged = age >= bc.max_age_s and self.link.connected
            if not (force or self.buffer.unsealed_count >= bc.max_samples or aged):
                return
            sealed = self.buffer.seal(bc.max_samples, int(self.clock.utc() * 1000))
            if sealed is None:
                return
            crash_point("agent.seal.after")
            self.stats.sealed_batches += 1
            self._first_unsealed_mono = self.clock.monotonic() if self.buffer.unsealed_count else None
        if force:
            # Gap records with no samples to ride on still go out.
            if self.buffer.seal(bc.max_samples, int(self.clock.utc() * 1000)):
                self.stats.sealed_batches += 1

    # -- uplink ---------------------------------------------------------------

    def pump(self) -> None:
        self._handle_acks()
        if not self.link.connected:
            return
        now = self.timer()
        if self.link.take_connected_event():
            self._on_connected()
        if now - self._last_heartbeat >= self.cfg.uplink.heartbeat_s:
            self.send_heartbeat()
        timeout = self.cfg.uplink.ack_timeout_s
        for key, f in list(self._in_flight.items()):
            if now - f.sent_at < f.retry_s:
                continue
            sb = self.buffer.get(key)
            if sb is None:  # acknowledged meanwhile
                del self._in_flight[key]
            elif self.link.publish(sb.batch_id, sb.payload):
                # Same id, same bytes: the receiver deduplicates if the first one did arrive.
                f.sent_at = now
                f.retry_s = timeout if self._path_proven else min(max(FAST_RETRY_S, 2 * f.retry_s), timeout)
                self.stats.resent += 1
        room = self.cfg.uplink.window - len(self._in_flight)
        if room <= 0:
            return
        holding = now < self._hold_uploads_until
        state = (self.stats.sealed_batches + self._acks_seen, holding)
        if state == self._all_sent_at:
            return
        # Batches named in a resync wait a moment for the receiver's answer; batches sealed
        # since cannot be in the store and go at once (fresh data right after a reconnect).
        exclude = frozenset(self._in_flight)
        if holding:
            exclude |= self._sync_named
        # Newest data flows while an old backlog drains: part of the window goes to the
        # newest batches, the rest to the oldest, so the backlog still drains.
        fresh = self.buffer.newest(max(1, room // 4), exclude=exclude)
        todo = fresh + self.buffer.pending(room, exclude=exclude | {b.batch_id for b in fresh})
        # Fewer than room: the buffer holds nothing else to send (unless a publish fails below).
        self._all_sent_at = state if len(todo) < room else None
        for sb in todo[:room]:
            if content_hash(sb.payload) != sb.sha256:
                # Bit rot on the card since sealing: never send it as data; own up with a gap.
                log.error("batch %s is corrupt on the device (hash mismatch); recorded as a gap", sb.batch_id)
                self.buffer.reject(sb.batch_id, sb.last_seq, "corrupt on the device: content hash mismatch", by="device")
                self.stats.corrupt_batches += 1
                continue
            if not self.link.publish(sb.batch_id, sb.payload):
                self._all_sent_at = None
                break
            retry = timeout if self._path_proven else min(FAST_RETRY_S, timeout)
            self._in_flight[sb.batch_id] = _InFlight(sb.batch_id, sb.last_seq, sb.n_samples, sb.sha256, now, retry)
            self.stats.published += 1
            crash_point("agent.publish.after")

    def _on_connected(self) -> None:
        """A new connection: name what we hold, so acks lost meanwhile heal themselves."""
        self._all_sent_at = None
        held = [b.batch_id for b in self.buffer.pending(SYNC_BATCHES)]
        if held and self.link.publish_sync(self.buffer.epoch, held):
            self.stats.syncs += 1
            # Give the receiver a moment to answer before uploading what it may hold.
            self._hold_uploads_until = self.timer() + SYNC_GRACE_S
            self._sync_named = frozenset(held)
        # What was in flight may or may not have arrived (a restarted broker forgets what it
        # held): re-send it now, not after the ack timeout, and again soon if no ack comes, as
        # the receiver may subscribe again only after us. The sync covers the rest of the
        # backlog; the receiver drops what it already has as a duplicate.
        self._path_proven = False
        for f in self._in_flight.values():
            f.retry_s = 0.0  # due now; then 1 s, 2 s, 4 s ... up to the ack timeout
        self.send_heartbeat()

    def status(self) -> dict[str, Any]:
        """The heartbeat: enough for a dashboard to tell a healthy van from a silent one."""
        st = self.buffer.stats()
        stamp = self.timekeeper.stamp()
        now_ms = stamp.t_utc_ms
        oldest = st.oldest_unsent_utc_ms
        return {
            "online": True,
            "device": self.cfg.device.id,
            "t_utc_ms": now_ms,
            "epoch": self.buffer.epoch,
            "last_seq": st.last_seq,
            "backlog_samples": st.backlog_samples + len(self._pending),
            "backlog_batches": st.batches,
            "oldest_unsent_age_s": (now_ms - oldest) / 1000 if oldest and now_ms else None,
            "buffer_bytes": st.file_bytes,
            "sensor_errors": dict(self.stats.read_errors),
            # Per GPS: epochs, fixes, dropped (no usable fix, or never seen), incomplete ...
            "gps_epochs": {d.name: d.epoch_health() for d in self.drivers if isinstance(d, EpochCounted)},
            "time_source": str(stamp.source),
            "time_steps": self.timekeeper.steps_seen,  # GPS or system clock steps seen this run
            "gps_minus_ntp_ms": self.timekeeper.stats.gps_minus_system_ms,  # ~ -receiver latency (docs: Time)
            "gps_time_disagrees": self.timekeeper.gps_time_disagrees,  # beyond that latency for a minute
            "disk_free_bytes": _disk_free(self.cfg.device.data_dir),
            "cpu_temp_c": _cpu_temp_c(),
            "taken": self.stats.taken,
            "rejected_batches": self.stats.rejected_batches,
            "samples_dropped": st.samples_dropped,
            "quarantined": st.quarantined,
            "gaps_undelivered": st.gaps_undelivered,  # gap records the receiver refused: loss unsaid in the store
            "buffer_full": self.stats.buffer_full,
            "seal_failures": self.stats.seal_failures,
            # A full card: commits refused, samples held in memory (or lost) until it has room.
            "health": "disk_full" if self.buffer.disk_full or self._lost_in_memory else "ok",
            "samples_at_risk": self.samples_at_risk,
            "samples_lost_in_memory": self.stats.lost_in_memory,
            "samples_held_unnoted": self.buffer.held_unnoted,  # held, and no file can say so (0 bytes free)
            # Microphones: seconds of audio skipped by late reads, ALSA overruns (never silent).
            "audio": {d.name: h() for d in self.drivers if callable(h := getattr(d, "audio_health", None))},
        }

    def send_heartbeat(self) -> None:
        self._last_heartbeat = self.timer()
        if self.link.publish_status(self.status()):
            self.stats.heartbeats += 1

    def _handle_acks(self) -> None:
        for ack in self.link.acks():
            self._acks_seen += 1  # an ack may free room or (rejected) add a gap record to send
            if not self._path_proven:
                # The receiver hears us: back to the normal ack timeout, so a slow ack is not re-sent.
                self._path_proven = True
                for f in self._in_flight.values():
                    f.retry_s = self.cfg.uplink.ack_timeout_s
            key = ack.batch_id
            try:
                device, _epoch, _first, last = parse_batch_id(ack.batch_id)
            except PayloadError:
                # The receiver could not even read the batch id: match by content hash.
                match = [k for k, f in self._in_flight.items() if ack.names_payload(f.sha256)]
                if not match:
                    continue
                key, device, last = match[0], self.cfg.device.id, self._in_flight[match[0]].last_seq
            if device != self.cfg.device.id:
                continue  # not ours (the broker's ACL should make this impossible)
            flight = self._in_flight.pop(key, None)
            if ack.committed:
                crash_point("agent.ack.before_delete")
                if self.buffer.acknowledge(key):
                    crash_point("agent.ack.after_delete")
                    self.stats.acked_batches += 1
                    self.stats.acked_samples += flight.n_samples if flight else 0
                if ack.status == "duplicate":
                    self.stats.duplicate_acks += 1
            else:
                log.error("receiver rejected batch %s: %s", ack.batch_id, ack.reason)
                if self.buffer.reject(key, last, ack.reason):
                    self.stats.rejected_batches += 1

    def backlog(self) -> int:
        """Samples committed or waiting that the receiver has not yet confirmed."""
        return self.buffer.stats().backlog_samples + len(self._pending)

    def drain(self, timeout_s: float, poll_s: float = 0.02) -> bool:
        """Commit and seal everything, then upload until all is acknowledged (real time)."""
        self.commit()
        self.maybe_seal(force=True)
        deadline = self.timer() + timeout_s
        while self.timer() < deadline:
            self.pump()
            if self._pending:
                self.commit()  # held while the card was full: acks may have made room
            self.buffer.housekeep()
            self.maybe_seal(force=True)
            if self.buffer.stats().batches == 0 and self.buffer.unsealed_count == 0 and not (
                self._pending or self._lost_in_memory
            ):
                return True
            time.sleep(poll_s)
        return False


def _finite(values: Mapping[str, Any], flags: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """NaN and infinity are no measurement: store them as unknown, and say so."""
    out = dict(values)
    bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return out, flags
    for k in bad:
        out[k] = None
    return out, (*flags, "non_finite")


MAX_READS_PER_TICK = 64  # bounds one driver's share of a tick (the microphone queue holds 30)
SPINE_MOVED_MS = 100  # a move of the time spine worth writing at once (its slews are smaller)
COMMIT_SLICE = 1000  # samples per transaction when committing what a full card held back
MAX_PENDING_IN_MEMORY = 4 * 3600  # an hour of four sensors at 1 Hz, if the disk stays full
SYNC_BATCHES = 256  # batch ids named in a resync request
SYNC_GRACE_S = 2.0  # real seconds to wait for the receiver's answer to a resync
FAST_RETRY_S = 1.0  # first re-send after a (re)connection until an ack proves the path, doubling


def _disk_free(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _cpu_temp_c() -> float | None:
    """The SoC temperature on a Pi (thermal zone 0), None elsewhere."""
    try:
        with open("/sys/class/thermal/thermal_zone0/temp", encoding="ascii") as f:
            return round(int(f.read().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def _boot_id() -> str:
    """The kernel's id for this boot, so a monotonic time can be tied to its boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return uuid.uuid4().hex
