"""The microphone driver: audio blocks in a background thread, levels out at 1 Hz.

:class:`MicrophoneDriver` implements ``drivers.base.SensorDriver``.  A daemon thread pulls
blocks from a :class:`BlockSource`, feeds them to a :class:`~.levels.LevelMeter` and drops
them; each completed second's levels (and, once a minute, the minute statistics) wait in a
small bounded queue, and ``read()`` hands over the oldest, so the agent's 1 Hz loop never
waits on audio and a late tick loses no second (issue 15, v15 probe): ``backlog`` tells the
agent how many more are waiting, and it reads them in the same tick. Only a stall longer than
the queue (``QUEUE_SECONDS``) drops seconds, oldest first, counted and flagged.

Each second's levels are stamped at the end of that second of audio (issue 15, 1), not when
``read()`` happens to pick them up (0-1 s later): the capture thread times every block as it
arrives (a blocking source returns a block when its last sample is in) and keeps the least
delayed of the recent blocks as the stream's anchor, the monotonic time of its sample 0
(NTP's minimum-delay idea: a late wake-up only ever makes a block look later). Second k
ends ``k + 1`` seconds after the anchor. A gap in the blocks (nothing available, an overrun)
starts a new anchor, as samples may have been lost.

Audio never leaves memory: no block is stored beyond the call that processes it, written to
disk, logged, or put into a Reading.

:class:`AlsaSource` reads an I2S MEMS microphone (ICS-43434, SPH0645, INMP441) through ALSA
with *pyalsaaudio* (``import alsaaudio``), imported lazily so this module imports without it.
Why pyalsaaudio: a thin binding over libasound, which Raspberry Pi OS already ships (also
packaged as ``python3-alsaaudio``); no PortAudio layer as with sounddevice; its blocking
``read()`` of one period maps one-to-one onto ``read_block()``; S32_LE is supported directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from drivers.base import Reading
from drivers.options import DriverOptions, Option
from core.errors import DeviceNotFound, FatalError, ReadError
from core.timekeeping import MEASURED_MONO

from .levels import LevelMeter, MinuteLevels, SecondLevels

log = logging.getLogger(__name__)


@runtime_checkable
class BlockSource(Protocol):
    """Where audio comes from: float blocks, full scale ±1.0, mono, at the meter's rate.

    ``read_block`` returns ``None`` when nothing is available right now (or the stream has
    ended); it may block for about one block's duration.
    """

    def read_block(self) -> NDArray[np.float32] | None: ...


class MicrophoneDriver:
    """SensorDriver for the noise channel: ``Reading(sensor=<section name>, values={laeq, ...})``.

    ``values`` always holds ``laeq``, ``lamax``, ``lamin`` (LAeq,1s, LAFmax, LAFmin of the
    oldest completed second not yet read) and, on the second that completes a minute,
    ``la10``, ``la50``, ``la90`` and ``laeq_1min``.  ``flags``: ``overload``, ``noise_floor``,
    ``warming_up`` (first second), ``audio_gap`` (seconds before this one completed but were
    never read: the agent stalled longer than the queue holds; counted in
    ``seconds_skipped``), ``audio_overrun`` (this second's
    audio has a hole: an ALSA overrun or a source error happened while it was being captured;
    counted in ``audio_health``).  A source error (anything but a ``FatalError``) never stops
    capture: it is counted, and the source is read again after a backoff (``AlsaSource``
    reopens the device).  Minute statistics replaced by a newer minute before they were read
    (a long stall) are counted in ``minutes_dropped``.  ``read()`` returns ``None`` when no
    new second has completed since the last call, and raises ``ReadError`` if capture stopped
    on a fatal error.  ``backlog`` is the number of completed seconds still waiting.
    """

    def __init__(
        self,
        source: BlockSource,
        meter: LevelMeter,
        name: str = "noise",
        *,
        start: bool = True,
        idle_sleep_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.name = name
        self._clock = clock
        # Monotonic time of the meter's sample 0, from the least delayed of the recent blocks.
        self._anchors: deque[float] = deque(maxlen=ANCHOR_BLOCKS)
        self._anchor: float | None = None
        self.source = source
        self.meter = meter
        self._idle_sleep_s = idle_sleep_s
        self._backoff = (backoff_min_s, backoff_max_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._latest: SecondLevels | None = None
        # Completed seconds not yet read, oldest first, each with the end of its audio (monotonic)
        # fixed when it completed: a later anchor (after a gap) must not restamp it.
        self._queue: deque[_Done] = deque()
        self._delivered_index = -1
        self._failure: Exception | None = None
        self._source_error: Exception | None = None  # the last one, until a block arrives again
        self.source_errors = 0  # recoverable errors from the source (e.g. ALSA overruns)
        # Audio lost, never silently (issue 15): seconds the agent read too late to see, and
        # capture losses (source overruns + errors) up to the last delivered reading.
        self.seconds_skipped = 0
        self.minutes_dropped = 0  # minute statistics overwritten by the next minute before a read
        # Seconds (meter index) whose audio has a hole, noted by the capture thread when the loss
        # happens, so the flag lands on the second that lost audio, not on the next one delivered.
        self._lost_seconds: set[int] = set()
        self._thread = threading.Thread(target=self._run, name=f"{name}-capture", daemon=True)
        if start:
            self.start()

    # -- SensorDriver -------------------------------------------------------------------

    def read(self) -> Reading | None:
        with self._lock:
            failure = self._failure
            if not self._queue:
                if failure is not None:
                    raise ReadError(f"{self.name}: capture stopped: {failure!r}")
                if self._source_error is not None:  # no audio now: the agent counts a read error
                    raise ReadError(f"{self.name}: capture failing ({self.source_errors} source errors, "
                                    f"retrying): {self._source_error!r}")
                return None
            done = self._queue.popleft()
            latest, minute = done.levels, done.minute
            skipped = latest.index - self._delivered_index - 1
            self._delivered_index = latest.index
            lost_audio = latest.index in self._lost_seconds
            # Holes in skipped seconds are counted (overruns, source_errors); their levels are gone.
            self._lost_seconds = {i for i in self._lost_seconds if i > latest.index}
        self.seconds_skipped += skipped
        values: dict[str, Any] = {
            "laeq": round(latest.laeq, 2),
            "lamax": round(latest.lafmax, 2),
            "lamin": round(latest.lafmin, 2),
        }
        flags = []
        if latest.overload:
            flags.append("overload")
        if latest.noise_floor:
            flags.append("noise_floor")
        if latest.settling:
            flags.append("warming_up")
        if skipped > 0:
            flags.append("audio_gap")
        if lost_audio:
            flags.append("audio_overrun")
        meta: dict[str, Any] = {"second": latest.index, "seconds_skipped": skipped}
        if minute is not None:
            values.update(
                la10=round(minute.la10, 2),
                la50=round(minute.la50, 2),
                la90=round(minute.la90, 2),
                laeq_1min=round(minute.laeq, 2),
            )
            meta["minute"] = minute.index
        if done.measured_mono is not None:
            meta[MEASURED_MONO] = done.measured_mono  # the end of its second of audio
        return Reading(sensor=self.name, values=values, flags=tuple(flags), meta=meta)

    @property
    def backlog(self) -> int:
        """Completed seconds waiting to be read (the agent reads them all in one tick)."""
        with self._lock:
            return len(self._queue)

    def _overruns(self) -> int:
        return int(getattr(self.source, "overruns", 0) or 0)

    def audio_health(self) -> dict[str, int]:
        """For the heartbeat: audio that never became a level, so a loss is seen, not silent."""
        return {"seconds_skipped": self.seconds_skipped, "overruns": self._overruns(),
                "source_errors": self.source_errors, "minutes_dropped": self.minutes_dropped}

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2.0)
        closer = getattr(self.source, "close", None)
        if closer is not None:
            closer()

    # -- thread -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the capture thread (done by the constructor unless ``start=False``)."""
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def seconds_processed(self) -> int:
        """Seconds of audio whose levels are published (readable through ``read``)."""
        with self._lock:
            return 0 if self._latest is None else self._latest.index + 1

    def _capturing(self) -> int:
        """The meter's index of the second being captured now (the one a loss now holes)."""
        n = getattr(self.meter, "seconds_completed", None)
        if isinstance(n, int):
            return n
        return 0 if self._latest is None else self._latest.index + 1

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            overruns = self._overruns()
            try:
                block = self.source.read_block()
            except FatalError as exc:  # surfaced through read() as ReadError
                with self._lock:
                    self._failure = exc
                log.error("%s: capture thread stopped: %r", self.name, exc)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. ALSAAudioError (-EIO): never stop capture
                self._anchors.clear()  # samples may be lost: the stream needs a new anchor
                self.source_errors += 1
                with self._lock:
                    self._lost_seconds.add(self._capturing())
                    self._source_error = exc
                log.warning("%s: source error %d (%r): reading again in %.1f s", self.name, self.source_errors,
                            exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            if self._overruns() > overruns:  # frames lost before this read: the second in capture
                self._anchors.clear()  # and the stream's time anchor with them
                with self._lock:
                    self._lost_seconds.add(self._capturing())
            if block is None:
                self._anchors.clear()
                self._stop.wait(self._idle_sleep_s)
                continue
            arrived = self._clock()
            delay, self._source_error = self._backoff[0], None
            records = self.meter.process(block)
            self._anchors.append(arrived - self.meter.samples_processed / self.meter.config.sample_rate)
            self._anchor = min(self._anchors)
            del block  # audio is dropped here; only levels survive
            if records:
                self._publish(records)

    def _publish(self, records: list) -> None:
        with self._lock:
            for rec in records:
                if isinstance(rec, SecondLevels):
                    self._latest = rec
                    if len(self._queue) >= QUEUE_SECONDS:  # a stall longer than the queue: the
                        dropped = self._queue.popleft()    # oldest goes (counted at the next read)
                        if dropped.minute is not None:
                            self.minutes_dropped += 1
                    end = None if self._anchor is None else self._anchor + rec.index + 1
                    self._queue.append(_Done(rec, end))
                elif isinstance(rec, MinuteLevels):
                    # A minute completes with its last second: it travels with that second.
                    if self._queue and self._queue[-1].minute is None:
                        self._queue[-1].minute = rec
                    else:  # that second was already read (cannot happen in one process call)
                        self.minutes_dropped += 1


@dataclass(slots=True)
class _Done:
    """One completed second waiting in the queue: its levels, the end of its audio, its minute."""

    levels: SecondLevels
    measured_mono: float | None
    minute: MinuteLevels | None = None


# Seconds the queue holds: an agent stalled longer than this (a seal, a full card) loses the
# oldest, counted and flagged ``audio_gap``; a tick late by a fraction of a second loses none.
QUEUE_SECONDS = 30


# Blocks over which the least delayed arrival anchors the stream (2 s of ALSA periods): long
# enough to ride out a busy moment, short enough that the audio clock's drift does not matter.
ANCHOR_BLOCKS = 20


class AlsaSource:
    """I2S MEMS microphone via ALSA (pyalsaaudio), S32_LE frames converted to float32.

    I2S MEMS microphones deliver 24 (SPH0645: 18) valid bits left-justified in 32-bit words,
    so dividing the int32 by 2^31 gives full scale ±1.0 whatever the valid bit count.  The
    I2S bus is stereo; the microphone sits on the channel its L/R pin selects (``channel``).
    """

    def __init__(
        self,
        device: str = "default",
        sample_rate: int = 48_000,
        channels: int = 2,
        channel: int = 0,
        period_frames: int = 4800,
        periods: int = 4,
        *,
        pcm_factory: Callable[[], Any] | None = None,
        error_types: tuple[type[BaseException], ...] = (),
    ) -> None:
        """``pcm_factory``/``error_types``: the seam to libasound (default: ``alsaaudio.PCM`` and
        ``alsaaudio.ALSAAudioError``), so reopening is testable without a sound card."""
        if not 0 <= channel < channels:
            raise FatalError(f"microphone channel {channel} out of range for {channels} channels")
        if pcm_factory is None:
            try:
                import alsaaudio  # lazy: only the real device needs it
            except ImportError as exc:
                raise FatalError(
                    "pyalsaaudio is not installed (pip install pyalsaaudio, "
                    "or apt install python3-alsaaudio)"
                ) from exc

            def pcm_factory() -> Any:
                return alsaaudio.PCM(
                    type=alsaaudio.PCM_CAPTURE,
                    mode=alsaaudio.PCM_NORMAL,
                    device=device,
                    rate=sample_rate,
                    channels=channels,
                    format=alsaaudio.PCM_FORMAT_S32_LE,
                    periodsize=period_frames,
                    periods=periods,
                )

            error_types = (alsaaudio.ALSAAudioError,)
        self.device = device
        self.sample_rate = sample_rate
        self.channels = channels
        self.channel = channel
        self.overruns = 0
        self.reopens = 0
        self._open_pcm = pcm_factory
        self._errors = error_types or (OSError,)
        try:
            self._pcm: Any = pcm_factory()
        except self._errors as exc:
            raise DeviceNotFound(f"ALSA capture device {device!r}: {exc}") from exc

    def read_block(self) -> NDArray[np.float32] | None:
        """One period (blocking), or None after an overrun (counted) or an empty read.

        Any other ALSA error (-EIO when the I2S clock hiccups, -ENODEV ...) leaves the stream in
        an unknown state: it is closed and ReadError raised; the next call reopens the device
        (MicrophoneDriver waits a growing backoff in between and counts each error).
        """
        if self._pcm is None:
            try:
                self._pcm = self._open_pcm()
            except self._errors as exc:
                raise ReadError(f"reopening ALSA capture device {self.device!r}: {exc}") from exc
            self.reopens += 1
            log.warning("ALSA capture device %r reopened", self.device)
        try:
            length, data = self._pcm.read()
        except self._errors as exc:
            self._close_pcm()
            raise ReadError(f"ALSA read on {self.device!r}: {exc}") from exc
        if length < 0:  # -EPIPE: the kernel buffer overran; ALSA re-prepares the stream
            self.overruns += 1
            return None
        if length == 0:
            return None
        frames = np.frombuffer(data, dtype="<i4", count=length * self.channels)
        mono = frames.reshape(length, self.channels)[:, self.channel]
        return (mono * (1.0 / 2**31)).astype(np.float32)

    def _close_pcm(self) -> None:
        pcm, self._pcm = self._pcm, None
        try:
            pcm.close()
        except self._errors:
            pass  # closing a broken stream: nothing left to release

    def close(self) -> None:
        if self._pcm is not None:
            self._close_pcm()


def wait_for_seconds(driver: MicrophoneDriver, seconds: int, timeout_s: float = 30.0) -> bool:
    """Wait until the driver's meter has completed ``seconds`` seconds (tests, demos)."""
    deadline = time.monotonic() + timeout_s
    while driver.seconds_processed < seconds:
        if time.monotonic() > deadline or not driver.running:
            return driver.seconds_processed >= seconds
        time.sleep(0.005)
    return True


# [sensors.NAME] options of driver = "microphone" (edge/driver_factory.py builds it); the bounds are
# MeterConfig's (drivers/noise/levels.py). serial: the capsule's id its calibration records are
# kept under (edge/calibration.py); "" = <device id>/<sensor name>.
OPTIONS = DriverOptions({
    "device": Option("default", check=lambda v: None if v.strip() else "empty: an ALSA device such as \"default\""),
    "sensitivity_dbfs": Option(-26.0, lo=-80.0, hi=0.0, unit="dBFS"),
    "calibration_offset_db": Option(0.0, lo=-20.0, hi=20.0, unit="dB"),
    "noise_floor_db": Option(29.0),
    "serial": Option(""),
})
