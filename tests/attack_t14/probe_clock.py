"""t14 probe: clock steps the fault suite does not make: a step while the agent is down (a restart
in the same boot), a restart inside the confirmation window of a step it had seen, and a GPS week
rollover that happens while the agent runs. Real agent, real Mosquitto and receiver (fixtures).

My own time oracle: every stored sensor sample (not gps) of the van, its error against the truth
(SimClock: true UTC = T0 + monotonic - 1000 s), and whether it is flagged clock_step; unflagged
samples off the truth by more than 1.5 s, and unflagged ones earlier than a sample committed before.

Run: ATTACK_T14=1 .venv/bin/python -m pytest tests/attack_t14/probe_clock.py -q -s
"""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest

from buffer.store import Buffer
from core.clock import SimClock
from core.timekeeping import GPS_ROLLOVER_S
from edge.agent import Agent
from edge.config import parse_config
from edge.driver_factory import build_drivers
from simulator.hardware import SimulatedHardware
from simulator.world import VanWorld
from tests.test_delivery_faults import rx  # noqa: F401 (fixture)
from uplink.mqtt import MqttLink

T0 = 1_795_000_000.0
DEV = "van-t14clk"


class Van:
    def __init__(self, tmp_path, port: int, *, ntp: bool, gps: bool) -> None:
        sensors = {"oracle1": {"driver": "sim-oracle"}, "oracle2": {"driver": "sim-oracle"}}
        if gps:
            sensors["gps"] = {"driver": "nmea-gps", "port": "sim:gps"}
        self.cfg = parse_config({
            "device": {"id": DEV, "data_dir": str(tmp_path / DEV)},
            "batch": {"max_samples": 200, "max_age_s": 60.0},
            "uplink": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2},
            "sensors": sensors,
        })
        self.clock = SimClock(T0, trusted_after=0.0 if ntp else 1e12, boot_error_s=0.0 if ntp else -365 * 86400.0)
        self.world = VanWorld(self.clock, shift_start_utc=T0)
        self.ctx = {"clock": self.clock, "world": self.world}
        self.hw = None
        if gps:
            self.ctx["hardware"] = self.hw = SimulatedHardware(self.world, self.clock)
        self.drivers = build_drivers(self.cfg.sensors, self.ctx)
        self.agent: Agent | None = None
        self.runs = 0

    def start(self) -> Agent:
        """A new agent process in the same boot: same monotonic clock and boot id, fresh memory."""
        self.link = MqttLink(self.cfg.uplink, self.cfg.device.id)
        self.agent = Agent(self.cfg, self.drivers, self.clock, Buffer(self.cfg.buffer_path, DEV), self.link,
                           boot_id="boot-1")
        self.link.start()
        self.runs += 1
        return self.agent

    def stop(self, drain: bool = True) -> None:
        assert self.agent is not None
        if drain:
            assert self.agent.drain(timeout_s=60)
        self.link.stop()
        self.agent.buffer.close()

    def close(self) -> None:
        for d in self.drivers:
            d.close()
        if self.hw is not None:
            self.hw.close()


def judge(store, tol_ms: int = 1500) -> dict:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    rows = db.execute("SELECT sensor, seq, t_utc_ms, t_mono_ms, flags FROM samples WHERE device=?"
                      " AND sensor NOT IN ('gps','calibration') ORDER BY sensor, seq", (DEV,)).fetchall()
    obs_flag = db.execute("SELECT count(*) FROM observations WHERE device=? AND ',' || flags || ',' LIKE '%,clock_step,%'",
                          (DEV,)).fetchone()[0]
    db.close()
    out = {"samples": len(rows), "flagged": 0, "wrong_unflagged": 0, "disorder_unflagged": 0, "max_err_unflagged_s": 0.0,
           "null_time": 0, "obs_flagged": obs_flag}
    newest: dict[str, int] = {}
    for sensor, seq, t, mono, flags in rows:
        flagged = "clock_step" in (flags or "").split(",")
        out["flagged"] += flagged
        if t is None:
            out["null_time"] += 1
            continue
        err = t - (int(T0 * 1000) + mono - 1_000_000)
        if not flagged:
            if abs(err) > tol_ms:
                out["wrong_unflagged"] += 1
                out["max_err_unflagged_s"] = max(out["max_err_unflagged_s"], abs(err) / 1000)
            if sensor in newest and t < newest[sensor]:
                out["disorder_unflagged"] += 1
        newest[sensor] = max(t, newest.get(sensor, t))
    return out


CASES = {
    # system (NTP) clock stepped while the agent is down, same boot
    "system-2h-while-down": dict(ntp=True, gps=False, step="system", s=-7200.0, when="down"),
    "system+1d-while-down": dict(ntp=True, gps=False, step="system", s=86400.0, when="down"),
    # GPS time stepped while the agent is down (no NTP): the new agent's first fix is the stepped one
    "gps+1h-while-down": dict(ntp=False, gps=True, step="gps", s=3600.0, when="down"),
    # a step seen by the running agent, which is restarted 20 s later (inside its 60 s confirmation)
    "system-2h-restart-in-window": dict(ntp=True, gps=False, step="system", s=-7200.0, when="restart20"),
    "gps-1d-restart-in-window": dict(ntp=False, gps=True, step="gps", s=-86400.0, when="restart20"),
    # the receiver's week counter rolls over while the agent runs
    "gps-rollover-mid-run": dict(ntp=False, gps=True, step="gps", s=-GPS_ROLLOVER_S, when="running"),
    "gps-rollover-mid-run-under-ntp": dict(ntp=True, gps=True, step="gps", s=-GPS_ROLLOVER_S, when="running"),
    # GPS steps backwards 1 day while running, no NTP (the suite has only forward GPS steps alone)
    "gps-1d-running": dict(ntp=False, gps=True, step="gps", s=-86400.0, when="running"),
}


def make_step(van: Van, c: dict):
    """The case's step: the system clock's, or the GPS receiver's UTC."""
    def step() -> None:
        if c["step"] == "system":
            van.clock.step(c["s"])
        else:
            van.hw.gps.utc_origin += dt.timedelta(seconds=c["s"])
    return step


@pytest.mark.parametrize("name", list(CASES))
def test_clock_probe(tmp_path, mosquitto, rx, name):
    c = CASES[name]
    van = Van(tmp_path, mosquitto.port, ntp=c["ntp"], gps=c["gps"])
    step = make_step(van, c)
    try:
        a = van.start()
        a.run(duration_s=300)
        if c["when"] == "down":
            van.stop()
            step()
            van.clock.advance(30)  # the agent is down for 30 s
            a = van.start()
            a.run(duration_s=300)
        elif c["when"] == "restart20":
            step()
            a.run(duration_s=20)
            van.stop()  # restarted (an update, a crash) inside the confirmation window
            van.clock.advance(5)
            a = van.start()
            a.run(duration_s=300)
        else:
            step()
            a.run(duration_s=300)
        steps = a.timekeeper.stats
        van.stop()
    finally:
        van.close()
    v = judge(rx.store)
    print(f"\n[t14 clock {name}] {v} last_run_stats: gps_steps={steps.gps_steps} system_steps={steps.system_steps}"
          f" rebases={steps.rebases} rollovers={steps.gps_rollovers}")
    assert v["wrong_unflagged"] == 0 and v["disorder_unflagged"] == 0, v
