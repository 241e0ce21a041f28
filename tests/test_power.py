"""Ignition, PM duty cycling, operating hours, LEDs and the button, on gpiozero's MockFactory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from core.errors import ConfigError
from edge.power import (
    ObservedDriver,
    OperatingHours,
    PanelConfig,
    PowerConfig,
    PowerManager,
    StatusPanel,
    parse_service_sections,
    speed_from,
)
from drivers.base import Reading


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakePM:
    name = "pm"

    def __init__(self) -> None:
        self.asleep = False
        self.calls: list[str] = []

    def sleep(self) -> None:
        self.asleep = True
        self.calls.append("sleep")

    def wake(self) -> None:
        self.asleep = False
        self.calls.append("wake")


@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.reset()


def make(factory, **over):
    cfg = PowerConfig(ignition_pin=17, ignition_debounce_s=0.0, **over)
    clock, pm, commits, shutdowns = FakeClock(), FakePM(), [], []
    speed: list[float | None] = [None]
    pmgr = PowerManager(cfg, clock=clock, commit=lambda: commits.append(clock.t), pm_drivers=lambda: [pm],
                        speed=lambda: speed[0], pin_factory=factory, shutdown=lambda: shutdowns.append(clock.t))  # fmt: skip
    # The input is pulled toward "off": a van starts with the ignition off until the line rises.
    assert not pmgr.ignition_on and pm.asleep and len(commits) == 1
    pin = factory.pin(17)
    pin.drive_high()
    pmgr.poll()
    assert pmgr.ignition_on and not pm.asleep
    commits.clear()
    pm.calls.clear()
    return pmgr, pin, clock, pm, commits, shutdowns, speed


def test_ignition_off_commits_sleeps_and_powers_off_after_grace(factory) -> None:
    pmgr, pin, clock, pm, commits, shutdowns, _ = make(factory, shutdown_after_s=120)
    pmgr.poll()
    assert pmgr.ignition_on and not pm.asleep and commits == []
    pin.drive_low()
    clock.t += 0.1
    pmgr.poll()
    assert not pmgr.ignition_on
    assert commits == [clock.t], "ignition off must commit at once"
    assert pm.asleep
    clock.t += 119
    pmgr.poll()
    assert shutdowns == []
    clock.t += 2
    pmgr.poll()
    assert shutdowns == [clock.t] and len(commits) == 2  # committed again right before
    pmgr.poll()
    assert len(shutdowns) == 1
    pmgr.close()


def test_ignition_back_cancels_shutdown_and_wakes_pm(factory) -> None:
    pmgr, pin, clock, pm, commits, shutdowns, _ = make(factory, shutdown_after_s=60)
    pin.drive_low()
    pmgr.poll()
    assert pm.asleep
    clock.t += 30
    pin.drive_high()
    pmgr.poll()
    assert pmgr.ignition_on and not pm.asleep and pm.calls == ["sleep", "wake"]
    clock.t += 600
    pmgr.poll()
    assert shutdowns == []
    pmgr.close()


def test_active_low_and_debounce(factory) -> None:
    cfg = PowerConfig(ignition_pin=4, ignition_active_high=False, ignition_debounce_s=2.0)
    clock, pm = FakeClock(), FakePM()
    pmgr = PowerManager(cfg, clock=clock, commit=lambda: None, pm_drivers=lambda: [pm], pin_factory=factory)
    assert not pmgr.ignition_on  # pulled up = off
    pin = factory.pin(4)
    pin.drive_low()  # active low: low = ignition on
    pmgr.poll()
    clock.t += 2.5
    pmgr.poll()
    assert pmgr.ignition_on
    pin.drive_high()  # cranking dip
    pmgr.poll()
    clock.t += 1.0
    pin.drive_low()
    pmgr.poll()
    assert pmgr.ignition_on and not pm.asleep, "a dip shorter than the debounce is ignored"
    pin.drive_high()
    pmgr.poll()
    clock.t += 2.5
    pmgr.poll()
    assert not pmgr.ignition_on and pm.asleep
    pmgr.close()


def test_duty_cycle_when_parked(factory) -> None:
    pmgr, pin, clock, pm, _, _, speed = make(factory, park_after_s=600, duty_every_s=900, duty_measure_s=60)
    speed[0] = 12.0
    pmgr.poll()
    assert not pm.asleep
    speed[0] = 0.1  # parked, engine running
    for _ in range(59):
        clock.t += 10
        pmgr.poll()
    assert not pm.asleep, "not parked long enough yet"
    clock.t += 21  # parked since the first slow poll: 600 s now
    pmgr.poll()
    assert pm.asleep and pmgr.parked
    # Asleep for 840 s, awake for 60 s, again and again.
    awake_times = []
    for _ in range(2000):
        clock.t += 1
        pmgr.poll()
        if not pm.asleep:
            awake_times.append(clock.t)
    assert 115 <= len(awake_times) <= 125  # two windows of 60 s in 2000 s
    speed[0] = 8.0  # drives off: awake at once
    clock.t += 1
    pmgr.poll()
    assert not pm.asleep and not pmgr.parked
    pmgr.close()


def test_no_pin_means_always_on_and_speed_from_gps() -> None:
    gps = ObservedDriver(type("G", (), {"name": "gps", "read": lambda self: Reading("gps", {"speed": 0.0}),
                                        "close": lambda self: None})())  # fmt: skip
    speed = speed_from(lambda: [gps])
    assert speed() is None
    gps.read()
    assert speed() == 0.0
    pmgr = PowerManager(PowerConfig(), clock=FakeClock(), commit=lambda: None, pm_drivers=lambda: [], speed=speed)
    pmgr.poll()
    assert pmgr.ignition_on


def test_operating_hours_persist(tmp_path: Path) -> None:
    clock = FakeClock()
    h = OperatingHours(tmp_path / "pm-hours.json", clock, save_every_s=300)
    h.update({"pm": True})
    clock.t += 3600
    h.update({"pm": True})
    clock.t += 1800
    h.update({"pm": False})  # asleep: not counted
    h.save()
    h2 = OperatingHours(tmp_path / "pm-hours.json", clock)
    assert h2.hours() == {"pm": 1.0}
    (tmp_path / "pm-hours.json").write_text("{garbage")
    assert OperatingHours(tmp_path / "pm-hours.json", clock).hours() == {}
    assert (tmp_path / "pm-hours.bad").exists()


def test_leds_follow_state(factory) -> None:
    cfg = PanelConfig(heartbeat_led_pin=5, uplink_led_pin=6, backlog_led_pin=13, fault_led_pin=19,
                      backlog_threshold=100, fault_window_s=60)  # fmt: skip
    clock = FakeClock()
    panel = StatusPanel(cfg, self_test=lambda: "ok", pin_factory=factory, clock=clock)
    hb, up, bl, ft = (factory.pin(p) for p in (5, 6, 13, 19))
    panel.update(sampling=True, connected=False, backlog=0, read_errors={})
    first = hb.state
    panel.update(sampling=True, connected=True, backlog=500, read_errors={"pm": 1})
    assert hb.state != first, "heartbeat toggles every tick"
    assert up.state and bl.state and ft.state
    clock.t += 61
    panel.update(sampling=True, connected=False, backlog=10, read_errors={"pm": 1})
    assert not up.state and not bl.state and not ft.state, "no new errors for a minute: red off"
    panel.update(sampling=False, connected=False, backlog=10, read_errors={"pm": 1})
    assert not hb.state
    panel.close()


def test_button_hold_runs_self_test(factory) -> None:
    ran: list[int] = []
    cfg = PanelConfig(button_pin=26, button_hold_s=0.1, heartbeat_led_pin=5)
    panel = StatusPanel(cfg, self_test=lambda: ran.append(1), pin_factory=factory, clock=FakeClock())
    btn = factory.pin(26)
    btn.drive_low()  # pressed (to ground)
    deadline = time.monotonic() + 3
    while not panel._test_requested.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    btn.drive_high()
    panel.service()  # on the agent's thread
    assert ran == [1] and panel.self_tests == 1
    assert factory.pin(5).state, "LEDs lit while testing"
    panel.service()
    assert ran == [1], "one hold, one test"
    panel.close()


def test_short_press_does_not_run_self_test(factory) -> None:
    ran: list[int] = []
    panel = StatusPanel(PanelConfig(button_pin=26, button_hold_s=0.5), self_test=lambda: ran.append(1),
                        pin_factory=factory, clock=FakeClock())  # fmt: skip
    btn = factory.pin(26)
    btn.drive_low()
    time.sleep(0.1)
    btn.drive_high()
    time.sleep(0.6)
    panel.service()
    assert ran == []
    panel.close()


def test_service_sections_validated() -> None:
    svc = parse_service_sections({"power": {"ignition_pin": 17, "shutdown_after_s": 90}})
    assert svc.power.ignition_pin == 17 and svc.power.shutdown_after_s == 90.0
    with pytest.raises(ConfigError) as e:
        parse_service_sections({"power": {"ignition_pin": 17}, "panel": {"button_pin": 17}})
    assert e.value.key == "panel.button_pin"
    with pytest.raises(ConfigError) as e:
        parse_service_sections({"power": {"duty_measure_s": 5000}})
    assert e.value.key == "power.duty_measure_s"
    with pytest.raises(ConfigError) as e:
        parse_service_sections({"power": {"ignition_pn": 3}})
    assert e.value.key == "power.ignition_pn"
