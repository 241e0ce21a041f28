"""The agent as a systemd service: sd_notify, the watchdog, and the supervised loop.

systemd (``Type=notify``, ``WatchdogSec=``) is told:

* ``READY=1`` once a sampling tick has produced a reading of a configured sensor
  (not merely when the process started: a driver that hangs at start, or a van
  with no working sensor, must not look like a running service), or at the
  latest after the start grace period (``edge.measuring.DEFAULT_GRACE_S``, 60 s),
  then with a status line that says the van is not measuring;
* ``WATCHDOG=1`` every third of the watchdog interval, but only while the loop
  is healthy: it made progress recently (a tick or a sleep step finished
  within ``stall_s``), the buffer takes data (the last commit succeeded, or
  it only failed because the buffer is full and the data folder is still
  writable, which the buffer's cap policy deals with), and after the grace
  period samples of real sensors are committed (``edge/measuring.py``; sensors
  asleep in the parked duty cycle are excused). A hung driver, a failing SD card
  or a van whose every sensor is silent therefore stops the pings, and systemd
  kills and restarts us;
* ``STOPPING=1`` as soon as a stop was asked for, ``RELOADING=1`` around a
  configuration reload, and a human ``STATUS=`` line (``systemctl status``).

The protocol is one datagram per message to the unix socket named by
``NOTIFY_SOCKET`` (a leading ``@`` is the abstract namespace); no library needed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from edge.agent import Agent
from edge.measuring import DEFAULT_GRACE_S, PSEUDO_SENSORS, Measuring
from edge.power import ObservedDriver

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify(3) over a unix datagram socket; a no-op outside systemd."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.sent: list[str] = []  # every message, for tests and debugging

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def notify(self, *lines: str) -> bool:
        if not self.path:
            return False
        msg = "\n".join(lines)
        addr = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        with self._lock:
            self.sent.append(msg)
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(msg.encode(), addr)
                return True
            except OSError as exc:
                # systemd gone or restarting: nothing to be done, and nothing to crash over.
                log.debug("sd_notify %r failed: %s", msg, exc)
                return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping: committing the buffer")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """The watchdog interval systemd asked for (``WATCHDOG_USEC``), in seconds, or None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by the service's main process)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Health:
    """Is the loop making progress, and does the buffer take data? (real time)."""

    def __init__(self, stall_s: float, *, writable: Callable[[], bool] = lambda: True,
                 now: Callable[[], float] = time.monotonic,
                 measuring: Measuring | None = None) -> None:  # fmt: skip
        self.stall_s = stall_s
        self._now = now
        self._writable = writable
        self.measuring = measuring
        self._progress = now()
        self._busy_since: float | None = None
        self.commit_failed = False  # the last commit raised or found the buffer full
        self.commit_full_only = False  # ... and only because the buffer was full
        self.last_error = ""

    def busy(self) -> None:
        """A tick (or other step that may block) starts now."""
        self._busy_since = self._now()

    def progress(self) -> None:
        """The loop came back: a tick, a sleep step or a hook finished."""
        self._progress = self._now()
        self._busy_since = None

    def commit_result(self, ok: bool, *, full: bool = False, error: str = "") -> None:
        self.commit_failed = not ok
        self.commit_full_only = full and not ok
        if error:
            self.last_error = error

    def check(self) -> tuple[bool, str]:
        now = self._now()
        if self._busy_since is not None and now - self._busy_since > self.stall_s:
            return False, f"sampling tick stuck for {now - self._busy_since:.0f} s"
        if now - self._progress > self.stall_s:
            return False, f"sampling loop silent for {now - self._progress:.0f} s"
        if self.commit_failed:
            if self.commit_full_only and self._writable():
                # Keep the watchdog fed: a restart would not make room, and would lose what is held.
                return True, self.last_error or "disk_full"
            return False, f"buffer commit failing: {self.last_error or 'unknown error'}"
        if self.measuring is not None:
            return self.measuring.check()
        return True, "ok"


class Watchdog:
    """A thread that pings systemd while ``health`` says so, and stops pinging when not."""

    def __init__(self, notifier: Notifier, interval_s: float, health: Health) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.health = health
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.withheld = 0
        self._unhealthy_logged = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A third of the interval: two pings may be late before systemd acts.
        period = max(0.05, self.interval_s / 3)
        while not self._stop.wait(period):
            ok, reason = self.health.check()
            if ok:
                self.notifier.watchdog()
                self.pings += 1
                if self._unhealthy_logged:
                    log.warning("healthy again: watchdog pings resumed")
                    self._unhealthy_logged = False
            else:
                self.withheld += 1
                if not self._unhealthy_logged:
                    # systemd will kill and restart us if this lasts WatchdogSec.
                    log.error("unhealthy, withholding the watchdog ping: %s", reason)
                    self.notifier.status(f"unhealthy: {reason}")
                    self._unhealthy_logged = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


Hook = Callable[[], None]


class Supervisor:
    """Runs the agent's loop (the same pacing as ``Agent.run``) with hooks and health.

    ``tick_hooks`` run on the loop thread before each tick (reloads, remote
    configuration, the self-test button); ``fast_hooks`` also between sleep
    steps (the ignition line: it must be acted on within a fraction of a
    second even at slow sampling rates); ``after_tick`` after each tick (LEDs,
    operating hours). Exceptions of ticks and hooks are logged and counted:
    the loop goes on, and the health check decides whether systemd should
    restart us.
    """

    SLEEP_STEP_S = 0.25  # clock seconds per sleep step: how fast a stop or the ignition is seen

    def __init__(
        self,
        agent: Agent,
        *,
        notifier: Notifier | None = None,
        watchdog_s: float | None = None,
        stall_s: float | None = None,
        tick_hooks: list[Hook] | None = None,
        fast_hooks: list[Hook] | None = None,
        after_tick: list[Hook] | None = None,
        data_dir: str | None = None,
        ready_grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self.agent = agent
        self.notifier = notifier or Notifier("")
        self.watchdog_s = watchdog_s
        # Half the watchdog interval: a stuck tick is reported (by silence) well before
        # systemd's deadline; 60 s without a watchdog (a tick may wait on slow sensors).
        self.stall_s = stall_s or (watchdog_s / 2 if watchdog_s else 60.0)
        self.tick_hooks = tick_hooks or []
        self.fast_hooks = fast_hooks or []
        self.after_tick = after_tick or []
        self._data_dir = data_dir or agent.cfg.device.data_dir
        # Samples of real sensors committed within the stall time plus a commit interval or two.
        self.measuring = Measuring(grace_s=ready_grace_s, now=time.monotonic,
                                   window_s=self.stall_s + 2 * agent.cfg.sampling.commit_interval_s)
        # Every driver counts its readings (the runtime's are wrapped already).
        agent.drivers = [d if isinstance(getattr(d, "reads", None), int) or d.name in PSEUDO_SENSORS
                         else ObservedDriver(d) for d in agent.drivers]  # fmt: skip
        self.health = Health(self.stall_s, writable=self._data_dir_writable, measuring=self.measuring)
        self.watchdog: Watchdog | None = None
        self.ready = threading.Event()
        self.tick_errors = 0
        self.hook_errors = 0
        self._error_logged_at = -1e18
        self._status_at = -1e18

    def _data_dir_writable(self) -> bool:
        return os.access(self._data_dir, os.W_OK)

    # -- control -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Signal-safe: the loop ends after the current tick or sleep step."""
        self.agent.request_stop()

    # -- the loop ------------------------------------------------------------------------

    def run(self, duration_s: float | None = None) -> None:
        agent = self.agent
        clock = agent.clock
        if self.notifier.enabled and self.watchdog_s:
            self.watchdog = Watchdog(self.notifier, self.watchdog_s, self.health)
            self.watchdog.start()
        start = next_tick = clock.monotonic()
        try:
            while not agent.stopping:
                if duration_s is not None and clock.monotonic() - start >= duration_s - 1e-9:
                    break
                self._run_hooks(self.tick_hooks + self.fast_hooks)
                if agent.stopping:
                    break
                self._tick()
                self._run_hooks(self.after_tick)
                self._report()
                # Re-read every tick: a reload may have changed the rate.
                period = 1.0 / agent.cfg.sampling.rate_hz
                next_tick += period
                delay = next_tick - clock.monotonic()
                if delay < -period:
                    next_tick = clock.monotonic()  # fell behind: skip, don't burst
                    delay = 0.0
                self._sleep(delay, next_tick)
        finally:
            if agent.stopping:
                self.notifier.stopping()
            if self.watchdog is not None:
                self.watchdog.stop()
            # Whatever happened above, what was sampled goes to the card.
            agent.commit()

    def _sleep(self, delay: float, until: float) -> None:
        clock = self.agent.clock
        while delay > 0 and not self.agent.stopping:
            clock.sleep(min(delay, self.SLEEP_STEP_S))
            self.health.progress()
            self._run_hooks(self.fast_hooks)
            delay = until - clock.monotonic()

    def _tick(self) -> None:
        agent = self.agent
        full_before, committed_before = agent.stats.buffer_full, agent.stats.committed
        self.health.busy()
        try:
            agent.tick()
        except Exception as exc:
            self.tick_errors += 1
            self.health.commit_result(False, error=f"{type(exc).__name__}: {exc}")
            self._log_error("sampling tick failed", exc)
        else:
            if agent.stats.buffer_full > full_before:
                at_risk = agent.samples_at_risk
                self.health.commit_result(False, full=True, error=f"disk_full: {at_risk} samples at risk")
            elif agent.stats.committed > committed_before:
                self.health.commit_result(True)
        self.health.progress()
        self.measuring.observe(agent.drivers, agent.stats.committed)
        if not self.ready.is_set() and self.measuring.ready:
            self.ready.set()
            self.notifier.ready(self._status_line())
            if self.measuring.has_read:
                log.info("sampling: ready")
            else:
                log.error("ready after %.0f s without a single reading: %s", self.measuring.grace_s,
                          self._status_line())  # fmt: skip

    def _run_hooks(self, hooks: list[Hook]) -> None:
        for hook in hooks:
            self.health.busy()
            try:
                hook()
            except Exception as exc:
                self.hook_errors += 1
                self._log_error(f"hook {getattr(hook, '__qualname__', hook)} failed", exc)
            self.health.progress()

    def _log_error(self, what: str, exc: BaseException) -> None:
        # Once a minute at most: a failing card must not fill the journal too.
        now = time.monotonic()
        if now - self._error_logged_at >= 60:
            self._error_logged_at = now
            log.error("%s: %s", what, exc, exc_info=exc)

    def _status_line(self) -> str:
        a = self.agent
        m = self.measuring.status()
        if not m["sensors"]:
            what = "NOT MEASURING: no sensor configured"
        elif not m["measuring"] and not self.measuring.in_grace:
            what = f"NOT MEASURING: none of {m['sensors']} sensors reads ({', '.join(m['sensors_silent'])} silent)"
        else:
            what = f"{len(m['sensors_reading'])} of {m['sensors']} sensors reading"
            if m["sensors_asleep"]:
                what += f", {len(m['sensors_asleep'])} asleep"
        return (
            f"sampling {a.cfg.sampling.rate_hz:g} Hz, {what}, "
            f"{'connected' if a.link.connected else 'offline'}, {a.stats.committed} committed"
        )

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._status_at >= 30 and self.notifier.enabled:
            self._status_at = now
            self.notifier.status(self._status_line())


def add_status_fields(agent: Agent, extra: Callable[[], dict[str, Any]]) -> None:
    """Add fields to the agent's heartbeat without touching Agent.

    (The lead may prefer a ``status_hooks`` list in ``Agent.status``; this does the
    same from outside: ``send_heartbeat`` calls ``self.status()``.)
    """
    base = agent.status

    def status() -> dict[str, Any]:
        out = base()
        try:
            out.update(extra())
        except Exception:  # the heartbeat must go out even if an extra field breaks
            log.exception("extra heartbeat fields failed")
        return out

    agent.status = status  # type: ignore[method-assign]
