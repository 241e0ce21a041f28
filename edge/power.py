"""The van's power and the box's face: ignition sense, PM duty cycling, hours, LEDs, button.

Everything here is driven by ``poll()`` calls from the supervised loop
(edge/systemd_supervisor.py), on the agent's own thread: the buffer and the drivers are
only ever touched by that thread. gpiozero's callbacks (the button) only set
flags. GPIO goes through gpiozero with an injected pin factory (tests pass
``gpiozero.pins.mock.MockFactory``), and time through an injected clock.

Configuration: two optional tables in agent.toml, ``[power]`` and ``[panel]``
(documented in docs/install.md); a pin of -1 means "not fitted".
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


log = logging.getLogger(__name__)

NO_PIN = -1


@dataclass(slots=True)
class PowerConfig:
    """``[power]``: ignition sense, shutdown on UPS boards, PM duty cycling."""

    ignition_pin: int = NO_PIN  # BCM number of the ignition-sense input; -1 = none fitted
    ignition_active_high: bool = True  # high = ignition on (pulled down); false: low = on (pulled up)
    ignition_debounce_s: float = 1.0  # cranking the engine dips the line: ignore shorter changes
    # With a UPS / supercapacitor board the Pi outlives the ignition: power off this many
    # seconds after ignition off (0 = never; the Pi simply loses power).
    shutdown_after_s: float = 0.0
    shutdown_command: str = "systemctl poweroff"
    # Parked = ignition off, or GPS speed at most park_speed_mps for park_after_s.
    park_speed_mps: float = 0.5
    park_after_s: float = 600.0
    # While parked the PM sensor sleeps (its laser and fan wear out) and wakes every
    # duty_every_s for duty_measure_s (the first 30 s of which are flagged warming_up).
    duty_every_s: float = 900.0
    duty_measure_s: float = 60.0
    hours_file: str = "pm-hours.json"  # in device.data_dir


@dataclass(slots=True)
class PanelConfig:
    """``[panel]``: status LEDs and the self-test button."""

    heartbeat_led_pin: int = NO_PIN  # green, toggles every sampling tick
    uplink_led_pin: int = NO_PIN  # green, lit while connected to the broker
    backlog_led_pin: int = NO_PIN  # amber, lit while the backlog is above backlog_threshold
    fault_led_pin: int = NO_PIN  # red, lit while a sensor errored within fault_window_s
    button_pin: int = NO_PIN  # to ground, pulled up
    button_hold_s: float = 3.0  # hold this long to run the self-test
    backlog_threshold: int = 10_000  # samples
    fault_window_s: float = 60.0


SERVICE_SECTIONS: dict[str, type] = {"power": PowerConfig, "panel": PanelConfig}


@dataclass(slots=True)
class ServiceConfig:
    power: PowerConfig
    panel: PanelConfig

    @classmethod
    def default(cls) -> "ServiceConfig":
        return cls(PowerConfig(), PanelConfig())


def parse_service_sections(data: Mapping[str, Any]) -> ServiceConfig:
    """``[power]`` and ``[panel]`` of an agent.toml, checked by the one schema (edge/config_schema.py,
    which declares their bounds and rules); other tables are ignored here."""
    from edge.config_schema import parse

    return parse({k: data[k] for k in SERVICE_SECTIONS if k in data}, runnable=False)[1]


def has_sleep(driver: Any) -> bool:
    """A driver that can put its sensor to sleep (PMS, SDS011, SPS30 ...)."""
    return callable(getattr(driver, "sleep", None)) and callable(getattr(driver, "wake", None))


def default_shutdown(command: str) -> Callable[[], None]:
    def run() -> None:
        log.warning("ignition off for long enough: running %r", command)
        subprocess.run(shlex.split(command), check=True, timeout=60)

    return run


# -- ignition and duty cycling -------------------------------------------------------


class PowerManager:
    """Ignition sense and the PM sensor's sleep schedule.

    ``poll()`` reads the (debounced) ignition line and the parked state and
    acts on changes: ignition off commits the buffer at once (the power may be
    gone in a second) and sleeps the PM sensor; ignition on wakes it (the
    driver flags the next 30 s ``warming_up``). A van parked for long keeps
    its PM sensor asleep except for a short measurement every
    ``duty_every_s``. With ``shutdown_after_s`` the Pi is powered off when the
    ignition stayed off that long (UPS boards).
    """

    def __init__(
        self,
        cfg: PowerConfig,
        *,
        clock: Callable[[], float],
        commit: Callable[[], None],
        pm_drivers: Callable[[], list[Any]],
        speed: Callable[[], float | None] = lambda: None,
        pin_factory: Any = None,
        shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self._commit = commit
        self._pm_drivers = pm_drivers
        self._speed = speed
        self._shutdown = shutdown or default_shutdown(cfg.shutdown_command)
        self._input: Any = None
        if cfg.ignition_pin != NO_PIN:
            from gpiozero import DigitalInputDevice

            # Pulled toward "off": an unplugged sense wire reads as ignition off
            # (the safe side: data committed, sensor asleep).
            self._input = DigitalInputDevice(
                cfg.ignition_pin, pull_up=not cfg.ignition_active_high, pin_factory=pin_factory
            )
        now = clock()
        self.ignition_on = self._raw_ignition()
        self._raw_last = self.ignition_on
        self._raw_since = now
        self._parked_since: float | None = None if self.ignition_on else now
        self._duty_mode = False
        self._duty_next_wake = now
        self._duty_awake_until: float | None = None
        self._shutdown_at: float | None = None
        self._shutdown_done = False
        self.pm_awake = True
        self.events: list[tuple[float, str]] = []  # (clock time, what): for the journal and tests
        if not self.ignition_on:
            self._on_ignition_off(now)
            self._apply_pm(now, self._want_pm_awake(now))

    def close(self) -> None:
        if self._input is not None:
            self._input.close()

    def _raw_ignition(self) -> bool:
        return True if self._input is None else bool(self._input.value)

    # -- the one entry point --------------------------------------------------------

    def poll(self) -> None:
        now = self._clock()
        raw = self._raw_ignition()
        if raw != self._raw_last:
            self._raw_last, self._raw_since = raw, now
        if raw != self.ignition_on and now - self._raw_since >= self.cfg.ignition_debounce_s:
            self.ignition_on = raw
            if raw:
                self._on_ignition_on(now)
            else:
                self._on_ignition_off(now)
        self._update_parked(now)
        self._apply_pm(now, self._want_pm_awake(now))
        if (
            self._shutdown_at is not None
            and not self.ignition_on
            and now >= self._shutdown_at
            and not self._shutdown_done
        ):
            self._shutdown_done = True
            self._event(now, "shutdown")
            self._commit()
            try:
                self._shutdown()
            except Exception:
                log.exception("shutdown command failed; trying again in a minute")
                self._shutdown_done = False
                self._shutdown_at = now + 60.0

    # -- transitions -------------------------------------------------------------------

    def _event(self, now: float, what: str) -> None:
        self.events.append((now, what))
        del self.events[:-100]

    def _on_ignition_off(self, now: float) -> None:
        log.info("ignition off: committing, PM sensor to sleep")
        self._event(now, "ignition_off")
        self._commit()
        self._parked_since = now if self._parked_since is None else self._parked_since
        self._enter_duty(now)
        if self.cfg.shutdown_after_s > 0:
            self._shutdown_at = now + self.cfg.shutdown_after_s
            log.info("powering off in %.0f s unless the ignition comes back", self.cfg.shutdown_after_s)

    def _on_ignition_on(self, now: float) -> None:
        log.info("ignition on: PM sensor awake")
        self._event(now, "ignition_on")
        if self._shutdown_at is not None:
            log.info("shutdown cancelled: ignition back on")
        self._shutdown_at = None
        self._shutdown_done = False
        self._parked_since = None
        self._duty_mode = False

    def _update_parked(self, now: float) -> None:
        if not self.ignition_on:
            return
        speed = self._speed()
        if speed is None or speed > self.cfg.park_speed_mps:
            # Moving, or no GPS fix to say otherwise: measure.
            self._parked_since = None
            if self._duty_mode:
                self._event(now, "moving")
            self._duty_mode = False
            return
        if self._parked_since is None:
            self._parked_since = now
        if not self._duty_mode and now - self._parked_since >= self.cfg.park_after_s:
            log.info("parked for %.0f s: PM sensor on a duty cycle", now - self._parked_since)
            self._event(now, "parked")
            self._enter_duty(now)

    def _enter_duty(self, now: float) -> None:
        self._duty_mode = True
        self._duty_awake_until = None
        self._duty_next_wake = now + self.cfg.duty_every_s - self.cfg.duty_measure_s

    def _want_pm_awake(self, now: float) -> bool:
        if not self._duty_mode:
            return True
        if self._duty_awake_until is not None:
            if now < self._duty_awake_until:
                return True
            self._duty_awake_until = None
            self._duty_next_wake = now + self.cfg.duty_every_s - self.cfg.duty_measure_s
            return False
        if now >= self._duty_next_wake:
            self._duty_awake_until = now + self.cfg.duty_measure_s
            self._event(now, "duty_measure")
            return True
        return False

    def _apply_pm(self, now: float, awake: bool) -> None:
        if awake == self.pm_awake:
            return
        self.pm_awake = awake
        for drv in self._pm_drivers():
            try:
                drv.wake() if awake else drv.sleep()
            except Exception as exc:  # a sensor that does not answer must not stop sampling
                log.warning("%s: %s failed: %s", getattr(drv, "name", "pm"), "wake" if awake else "sleep", exc)
        self._event(now, "pm_wake" if awake else "pm_sleep")

    @property
    def parked(self) -> bool:
        return self._duty_mode

    def status(self) -> dict[str, Any]:
        return {
            "ignition": self.ignition_on,
            "parked": self._duty_mode,
            "pm_awake": self.pm_awake,
            "shutdown_in_s": (
                round(max(0.0, self._shutdown_at - self._clock()), 1) if self._shutdown_at is not None else None
            ),
        }


# -- operating hours ------------------------------------------------------------------


class OperatingHours:
    """Hours each PM sensor's fan and laser have run, persisted in the data folder.

    Plantower rates its sensors for about 8000 h of laser life: the heartbeat
    reports the hours so the DataLab can plan replacements. Saved atomically
    every ``save_every_s`` and at close; a power cut loses at most that much.
    Keyed by sensor name; ``reset(name)`` when a sensor is replaced.
    """

    def __init__(self, path: Path, clock: Callable[[], float], *, save_every_s: float = 300.0) -> None:
        self.path = Path(path)
        self._clock = clock
        self.save_every_s = save_every_s
        self.seconds: dict[str, float] = self._load()
        self._last: float | None = None
        self._last_save = clock()

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(k): float(v) for k, v in data.get("seconds", {}).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            # Keep the unreadable file for a person to look at; count on from zero.
            log.warning("operating hours file %s unreadable (%s): starting from 0", self.path, exc)
            try:
                os.replace(self.path, self.path.with_suffix(".bad"))
            except OSError:
                pass
            return {}

    def update(self, awake: Mapping[str, bool]) -> None:
        """Call often: adds the time since the last call to every sensor that is awake."""
        now = self._clock()
        if self._last is not None:
            dt = max(0.0, now - self._last)
            for name, on in awake.items():
                if on:
                    self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self._last = now
        if now - self._last_save >= self.save_every_s:
            self.save()

    def hours(self) -> dict[str, float]:
        return {k: round(v / 3600.0, 3) for k, v in self.seconds.items()}

    def reset(self, name: str) -> None:
        self.seconds.pop(name, None)
        self.save()

    def save(self) -> None:
        self._last_save = self._clock()
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"seconds": self.seconds}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save operating hours to %s: %s", self.path, exc)


# -- LEDs and button ---------------------------------------------------------------------


class StatusPanel:
    """Four LEDs and a button.

    ``update()`` after each tick sets the LEDs from what it is given; the
    button's hold (gpiozero's thread) only raises a flag, and ``service()`` on
    the agent's thread runs the self-test, so it never races the sampling loop.
    """

    def __init__(
        self,
        cfg: PanelConfig,
        *,
        self_test: Callable[[], Any],
        pin_factory: Any = None,
        clock: Callable[[], float],
    ) -> None:
        from gpiozero import LED, Button

        self.cfg = cfg
        self._self_test = self_test
        self._clock = clock

        def led(pin: int) -> Any:
            return LED(pin, pin_factory=pin_factory) if pin != NO_PIN else None

        self.heartbeat = led(cfg.heartbeat_led_pin)
        self.uplink = led(cfg.uplink_led_pin)
        self.backlog = led(cfg.backlog_led_pin)
        self.fault = led(cfg.fault_led_pin)
        self.button: Any = None
        self._test_requested = threading.Event()
        if cfg.button_pin != NO_PIN:
            self.button = Button(cfg.button_pin, pull_up=True, hold_time=cfg.button_hold_s, pin_factory=pin_factory)
            self.button.when_held = self._test_requested.set
        self._errors_seen: dict[str, int] = {}
        self._last_error_at: float | None = None
        self.self_tests = 0

    def update(self, *, sampling: bool, connected: bool, backlog: int, read_errors: Mapping[str, int]) -> None:
        now = self._clock()
        if dict(read_errors) != self._errors_seen:
            if any(v > self._errors_seen.get(k, 0) for k, v in read_errors.items()):
                self._last_error_at = now
            self._errors_seen = dict(read_errors)
        if self.heartbeat is not None:
            if sampling:
                self.heartbeat.toggle()
            else:
                self.heartbeat.off()
        self._set(self.uplink, connected)
        self._set(self.backlog, backlog > self.cfg.backlog_threshold)
        recent = self._last_error_at is not None and now - self._last_error_at < self.cfg.fault_window_s
        self._set(self.fault, recent)

    @staticmethod
    def _set(led: Any, on: bool) -> None:
        if led is not None and bool(led.value) != on:
            led.on() if on else led.off()

    def service(self) -> None:
        """Run a self-test the button asked for (on the caller's thread)."""
        if not self._test_requested.is_set():
            return
        self._test_requested.clear()
        self.self_tests += 1
        log.info("button held: running the self-test")
        leds = [x for x in (self.heartbeat, self.uplink, self.backlog, self.fault) if x is not None]
        for x in leds:  # all lit: the technician sees the test started (and every LED works)
            x.on()
        try:
            result = self._self_test()
            log.info("self-test result: %s", result)
        except Exception:
            log.exception("self-test failed")

    def close(self) -> None:
        for x in (self.heartbeat, self.uplink, self.backlog, self.fault, self.button):
            if x is not None:
                x.close()


class ObservedDriver:
    """Wraps a driver to remember its newest reading (the GPS speed for parking) and count them.

    The count tells the remote-configuration health watch (edge/remote_watch.py) that a
    sensor has read since a change.

    Everything else (``sleep``, ``wake``, ``time_fix`` ...) is passed through.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.last_reading: Any = None
        self.reads = 0

    def read(self) -> Any:
        r = self.inner.read()
        if r is not None:
            self.last_reading = r
            self.reads += 1
        return r

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, item: str) -> Any:
        return getattr(self.inner, item)


def speed_from(drivers: Callable[[], list[Any]]) -> Callable[[], float | None]:
    """A speed source: the ``speed`` value (m/s) of the newest GPS reading among ``drivers``."""

    def speed() -> float | None:
        for d in drivers():
            r = getattr(d, "last_reading", None)
            if r is not None and "speed" in r.values and r.values["speed"] is not None:
                return float(r.values["speed"])
        return None

    return speed
