"""Assemble an agent from its configuration: clock, drivers, buffer, uplink.

This is the only place that decides between real and simulated parts; the
agent itself only sees the seams.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from buffer.store import Buffer
from edge.agent import Agent
from edge.clock import Clock, SimClock, SystemClock
from edge.config import AgentConfig
from edge.errors import ConfigError
from edge.sensors import build_drivers
from uplink.mqtt import MqttLink

log = logging.getLogger(__name__)


def parse_utc(text: str, key: str) -> float:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(key, f"not an ISO 8601 time with offset: {text!r}") from exc
    if dt.tzinfo is None:
        raise ConfigError(key, "needs a UTC offset, e.g. 2026-11-26T07:00:00+01:00")
    return dt.timestamp()


def build_agent(cfg: AgentConfig) -> tuple[Agent, float | None]:
    """The agent, and how long it should run (simulated shifts only; None = until stopped)."""
    ctx: dict[str, Any] = {}
    until: float | None = None
    clock: Clock
    sim = cfg.simulation
    if sim.enabled:
        from simulator.world import VanWorld

        start = parse_utc(sim.start_utc, "simulation.start_utc")
        clock = SimClock(
            start,
            speedup=sim.speedup or None,
            trusted_after=sim.ntp_after_s,
            boot_error_s=sim.boot_clock_error_s,
        )
        ctx["world"] = VanWorld(
            clock, shift_start_utc=start, seed=sim.seed, start_offset_m=sim.start_offset_m
        )
        if sim.devices == "hardware":
            from simulator.hardware import SimulatedHardware

            ctx["hardware"] = SimulatedHardware(
                ctx["world"], clock, seed=sim.seed, noise=sim.noise,
                gps_corrupt_prob=sim.gps_corrupt_prob, pm_corrupt_prob=sim.pm_corrupt_prob,
            )
        until = sim.shift_hours * 3600
    else:
        clock = SystemClock()
    ctx["clock"] = clock
    drivers = build_drivers(cfg.sensors, ctx)
    bc = cfg.buffer
    buffer = Buffer(
        cfg.buffer_path,
        cfg.device.id,
        max_bytes=bc.max_bytes,
        wal_autocheckpoint=bc.wal_autocheckpoint,
        reserve_bytes=bc.reserve_bytes,
        check_on_open=bc.check_on_open,
        quarantine_dir=bc.quarantine_dir or None,
    )
    link = MqttLink(cfg.uplink, cfg.device.id)
    agent = Agent(cfg, drivers, clock, buffer, link)
    agent.resources = [r for r in (ctx.get("hardware"),) if r is not None]
    return agent, until


def write_stats(agent: Agent, path: Path) -> None:
    stats = asdict(agent.stats)
    stats["device"] = agent.cfg.device.id
    stats["epoch"] = agent.buffer.epoch
    stats["last_seq"] = agent.buffer.last_seq()
    stats["backlog"] = agent.backlog()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=1))
    os.replace(tmp, path)


def run_agent(cfg: AgentConfig, *, drain_timeout_s: float = 120.0) -> int:
    agent, until = build_agent(cfg)
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    stats_path = Path(cfg.device.data_dir) / "stats.json"
    agent.link.start()
    log.info("agent %s started, epoch %s, %d sensors", cfg.device.id, agent.buffer.epoch, len(agent.drivers))
    try:
        agent.run(duration_s=until)
        if until is not None and not agent.stopping:
            # A simulated shift is over: hand everything in before exiting.
            if not agent.drain(drain_timeout_s):
                log.warning("drain incomplete: %d samples still buffered", agent.backlog())
    finally:
        write_stats(agent, stats_path)
        agent.link.stop()
        for d in agent.drivers:
            d.close()
        for r in agent.resources:
            r.close()
        agent.buffer.close()
    return 0
