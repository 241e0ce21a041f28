"""Assemble an agent from its configuration and run it as a service.

This is the only place that decides between real and simulated parts; the
agent itself only sees the seams. ``Runtime`` holds everything a running van
has (agent, drivers, buffer, uplink, power manager, LEDs, remote
configuration, the supervised loop) and knows how to change its
configuration while running: a SIGHUP reload and a remote request take the
same path (``Runtime.reconfigure``): commit what was sampled, build what
changed, swap it in, keep the same buffer.

The configuration file is agent.toml: edge.config's sections plus the
optional ``[power]`` and ``[panel]`` tables of edge.power.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import tomllib
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from buffer.store import Buffer
from edge.agent import Agent
from core.clock import Clock, SimClock, SystemClock
from edge.calibration import (
    CalibrationAnnouncer,
    attach_calibrations,
    record_from_config,
)
from edge import config_schema
from edge.config import AgentConfig
from edge.config_schema import read_toml
from core.errors import ConfigError
from edge.power import (
    NO_PIN,
    ObservedDriver,
    OperatingHours,
    PowerManager,
    ServiceConfig,
    StatusPanel,
    has_sleep,
    speed_from,
)
from edge.calibration_guard import GuardedStore
from edge.remote_watch import DEFAULT_GRACE_S, HealthWatch
from edge.driver_factory import build_drivers
from edge.measuring import DEFAULT_GRACE_S as DEFAULT_READY_GRACE_S
from edge.systemd_supervisor import Notifier, Supervisor, add_status_fields, watchdog_interval
from core.timekeeping import TimeFixSource
from edge import simulation as edge_simulation
from uplink.mqtt import MqttLink

log = logging.getLogger(__name__)

PM_DRIVERS = {"pms5003", "pms7003", "pmsa003", "sds011", "sps30", "sim-pm"}
# Sections a running agent cannot change: they name its identity, its buffer or its world.
RESTART_SECTIONS = ("device", "buffer", "simulation")


def parse_utc(text: str, key: str) -> float:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(key, f"not an ISO 8601 time with offset: {text!r}") from exc
    if dt.tzinfo is None:
        raise ConfigError(key, "needs a UTC offset, e.g. 2026-11-26T07:00:00+01:00")
    return dt.timestamp()


# -- configuration: agent.toml with [power] and [panel] -------------------------------------------
# One schema (edge/config_schema.py) for `edge config check`, `edge run`, a SIGHUP reload and a
# remote change: the same document gives the same errors on every path.


def parse_full_config(data: dict[str, Any], source: str = "<dict>") -> tuple[AgentConfig, ServiceConfig]:
    return config_schema.parse(data, source)


def load_full_config(path: str | Path) -> tuple[AgentConfig, ServiceConfig]:
    return config_schema.load(path)


def check_config_data(data: dict[str, Any]) -> list[ConfigError]:
    """Every error of a configuration document, not only the first, each naming its key."""
    return config_schema.validate(data).errors


# -- building -------------------------------------------------------------------------------------


def build_context(cfg: AgentConfig) -> tuple[dict[str, Any], float | None]:
    """The clock (and the simulated world), and how long a simulated shift runs (None: until stopped)."""
    ctx: dict[str, Any] = {}
    until: float | None = None
    clock: Clock
    sim = cfg.simulation
    if sim.enabled:
        simulation = edge_simulation.backend()
        start = parse_utc(sim.start_utc, "simulation.start_utc")
        clock = SimClock(
            start,
            speedup=sim.speedup or None,
            trusted_after=sim.ntp_after_s,
            boot_error_s=sim.boot_clock_error_s,
        )
        ctx["world"] = simulation.world(
            clock, shift_start_utc=start, seed=sim.seed, start_offset_m=sim.start_offset_m
        )
        if sim.devices == "hardware":
            ctx["hardware"] = simulation.hardware(
                ctx["world"], clock, seed=sim.seed, noise=sim.noise,
                gps_corrupt_prob=sim.gps_corrupt_prob, pm_corrupt_prob=sim.pm_corrupt_prob,
            )
        until = sim.shift_hours * 3600
    else:
        clock = SystemClock()
    ctx["clock"] = clock
    return ctx, until


def _buffer(cfg: AgentConfig) -> Buffer:
    bc = cfg.buffer
    return Buffer(
        cfg.buffer_path,
        cfg.device.id,
        max_bytes=bc.max_bytes,
        wal_autocheckpoint=bc.wal_autocheckpoint,
        reserve_bytes=bc.reserve_bytes,
        check_on_open=bc.check_on_open,
        quarantine_dir=bc.quarantine_dir or None,
    )


def build_agent(cfg: AgentConfig) -> tuple[Agent, float | None]:
    """The agent, and how long it should run (simulated shifts only; None = until stopped)."""
    ctx, until = build_context(cfg)
    drivers = build_drivers(cfg.sensors, ctx)
    cal_store, announcer = _calibrations(cfg, ctx["clock"])
    drivers = attach_calibrations(drivers, cfg, cal_store) + [announcer]
    agent = Agent(cfg, drivers, ctx["clock"], _buffer(cfg), MqttLink(cfg.uplink, cfg.device.id))
    agent.resources = [r for r in (ctx.get("hardware"), cal_store) if r is not None]
    return agent, until


def _calibrations(cfg: AgentConfig, clock: Clock) -> tuple[GuardedStore, CalibrationAnnouncer]:
    """The van's calibration records, and the pseudo-sensor that uploads them.

    Configured NO2 sheets are recorded once, so every derived value carries the id of
    the calibration that produced it (its provenance), whatever the technician does later.
    A damaged file does not stop the van (edge/calibration_guard.py): sensors run
    uncalibrated and flagged until it is readable again.
    """
    store = GuardedStore.for_data_dir(cfg.device.data_dir, clock=clock,
                                      on_open=lambda s: record_from_config(cfg, s))
    return store, CalibrationAnnouncer(store)


def write_stats(agent: Agent, path: Path) -> None:
    stats = asdict(agent.stats)
    stats["device"] = agent.cfg.device.id
    stats["epoch"] = agent.buffer.epoch
    stats["last_seq"] = agent.buffer.last_seq()
    stats["backlog"] = agent.backlog()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=1))
    os.replace(tmp, path)


@dataclass(slots=True)
class ApplyResult:
    changed: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)  # sensors built anew


class Runtime:
    """One running van: build, run under supervision, reconfigure, close."""

    def __init__(
        self,
        cfg: AgentConfig,
        svc: ServiceConfig | None = None,
        *,
        config_path: str | Path | None = None,
        notifier: Notifier | None = None,
        watchdog_s: float | None = None,
        stall_s: float | None = None,
        pin_factory: Any = None,
        self_test: Callable[[], Any] | None = None,
        shutdown: Callable[[], None] | None = None,
        on_secrets: Callable[[AgentConfig], None] | None = None,
        remote_grace_s: float = DEFAULT_GRACE_S,
        monotonic: Callable[[], float] | None = None,
        ready_grace_s: float = DEFAULT_READY_GRACE_S,
    ) -> None:
        self.svc = svc or ServiceConfig.default()
        path = config_path or (cfg.source if Path(cfg.source).is_file() else None)
        self.config_path: Path | None = Path(path) if path else None
        self.on_secrets = on_secrets
        self.ctx, self.until = build_context(cfg)
        clock: Clock = self.ctx["clock"]
        self.raw_drivers: dict[str, Any] = {}
        drivers = build_drivers(cfg.sensors, self.ctx)
        try:
            self.raw_drivers = {sc.name: d for sc, d in zip(cfg.sensors, drivers)}
            buffer = _buffer(cfg)
        except BaseException:
            for d in drivers:
                d.close()
            raise
        self.cal_store, self.announcer = _calibrations(cfg, clock)
        self.agent = agent = Agent(cfg, drivers, clock, buffer, MqttLink(cfg.uplink, cfg.device.id))
        agent.resources = [r for r in (self.ctx.get("hardware"), self.cal_store) if r is not None]
        agent.drivers = [
            ObservedDriver(d) for d in attach_calibrations(drivers, cfg, self.cal_store)
        ] + [self.announcer]
        data_dir = Path(cfg.device.data_dir)
        self.hours = OperatingHours(data_dir / self.svc.power.hours_file, clock.monotonic)
        self.power = PowerManager(
            self.svc.power, clock=clock.monotonic, commit=agent.commit, pm_drivers=self.pm_drivers,
            speed=speed_from(lambda: self.agent.drivers), pin_factory=pin_factory, shutdown=shutdown,
        )  # fmt: skip
        self.panel: StatusPanel | None = None
        p = self.svc.panel
        if any(x != NO_PIN for x in (p.heartbeat_led_pin, p.uplink_led_pin, p.backlog_led_pin,
                                     p.fault_led_pin, p.button_pin)):  # fmt: skip
            self.panel = StatusPanel(p, self_test=self_test or self.default_self_test,
                                     pin_factory=pin_factory, clock=clock.monotonic)  # fmt: skip
        from edge.remote import RemoteConfig

        self.remote = RemoteConfig(cfg.device.id, cfg.uplink.topic_prefix, data_dir / "remote-config.json")
        self.remote.attach(agent.link)
        # A remote change on probation: confirmed once the van is healthy, else rolled back.
        self.watch = HealthWatch(remote_grace_s, monotonic) if monotonic else HealthWatch(remote_grace_s)
        # agent.toml as last applied: what a reload or a remote change is told apart from, for the log.
        self._file_doc: dict[str, Any] = {}
        if self.config_path is not None:
            try:
                self._file_doc = read_toml(self.config_path)
            except ConfigError:
                pass
        self._resume_probation()
        self._reload = threading.Event()
        self._backlog_at = -1e18
        self._backlog = 0
        wd = watchdog_s if watchdog_s is not None else watchdog_interval()
        self.supervisor = Supervisor(
            agent, notifier=notifier or Notifier(), watchdog_s=wd, stall_s=stall_s,
            tick_hooks=[self._reload_hook, self._remote_hook, self._watch_hook,
                        *([self.panel.service] if self.panel else [])],
            fast_hooks=[self.power.poll], after_tick=[self._after_tick], ready_grace_s=ready_grace_s,
        )  # fmt: skip
        # A remote change on probation decides for itself (it rolls back when its sensors stay silent).
        self.supervisor.measuring.excused = lambda: self.watch.pending is not None
        add_status_fields(agent, self._status_extra)

    # -- pieces --------------------------------------------------------------------------------

    def pm_drivers(self) -> list[Any]:
        names = {sc.name for sc in self.agent.cfg.sensors if sc.driver in PM_DRIVERS}
        return [d for n, d in self.raw_drivers.items() if n in names or has_sleep(d)]

    def _pm_awake(self) -> dict[str, bool]:
        return {
            getattr(d, "name", "pm"): self.power.pm_awake and not getattr(d, "asleep", False)
            for d in self.pm_drivers()
        }

    def _after_tick(self) -> None:
        self.hours.update(self._pm_awake())
        if self.panel is not None:
            now = self.agent.clock.monotonic()
            if now - self._backlog_at >= 5:  # a buffer query: not every tick
                self._backlog_at = now
                self._backlog = self.agent.backlog()
            self.panel.update(sampling=True, connected=self.agent.link.connected, backlog=self._backlog,
                              read_errors=self.agent.stats.read_errors)  # fmt: skip
        self.remote.flush(self.agent.link.connected)

    def _status_extra(self) -> dict[str, Any]:
        ok, reason = self.supervisor.health.check()
        return {
            "pm_hours": self.hours.hours(),
            "power": self.power.status(),
            "config_id": self.remote.last_id,
            # A remote change not yet confirmed healthy (it may still roll back by itself).
            "config_probation": self.watch.pending.request_id if self.watch.pending else None,
            "health": "ok" if ok else reason,
            # Which configured sensors read (the calibration pseudo-sensor not counted), issue #19.4.
            **self.supervisor.measuring.status(),
            # A damaged calibration file: sensors run uncalibrated (readings flagged cal_unavailable).
            "calibration": {**self.cal_store.health(), "uncalibrated_readings": {
                d.name: n for d in self.agent.drivers if (n := getattr(d, "unavailable_readings", 0))}},
        }

    def default_self_test(self) -> dict[str, str]:
        """One read of every sensor (the button's default; the technician's selftest is richer)."""
        out: dict[str, str] = {}
        for d in self.agent.drivers:
            try:
                out[d.name] = "ok" if d.read() is not None else "no data"
            except Exception as exc:
                out[d.name] = f"error: {exc}"
        return out

    # -- reconfiguration ------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Signal-safe: reload the configuration file before the next tick."""
        self._reload.set()

    def _reload_hook(self) -> None:
        if not self._reload.is_set():
            return
        self._reload.clear()
        self.reload()

    def reload(self) -> ApplyResult | None:
        """Re-read the configuration file; an invalid one is logged by key and the old kept."""
        if self.config_path is None:
            log.warning("reload asked for, but the configuration came from no file")
            return None
        notifier = self.supervisor.notifier
        notifier.reloading()
        if self.watch.pending is not None and self.config_path is not None:
            # The technician's file takes over from whatever a remote change left.
            log.info("reload: remote change %s no longer on probation", self.watch.pending.request_id)
            self.watch.pending = None
            self._end_probation()
        try:
            try:
                data = read_toml(self.config_path)
            except ConfigError as exc:
                log.error("reload: %s; keeping the running configuration", exc)
                return None
            report = config_schema.validate(data, source=str(self.config_path), from_file=True)
            if report.errors:
                for exc in report.errors:
                    log.error("reload: %s", exc)
                log.error("reload: %d error(s) in %s; keeping the running configuration", len(report.errors),
                          self.config_path)  # fmt: skip
                return None
            for note in report.warnings:
                log.warning("reload: %s", note)
            try:
                cfg, svc = report.raise_if_invalid()
                result = self.reconfigure(cfg, svc)
            except ConfigError as exc:
                log.error("reload: %s; keeping the running configuration", exc)
                return None
            from edge.remote_policy import describe_changes

            changes = "; ".join(describe_changes(self._file_doc, data)) or "no change"
            log.info("reloaded %s: %s%s", self.config_path, changes,
                     f"; at the next start: {', '.join(result.restart_required)}" if result.restart_required else "")  # fmt: skip
            self._file_doc = data
            return result
        finally:
            notifier.notify("READY=1")

    def reconfigure(self, new: AgentConfig, svc: ServiceConfig) -> ApplyResult:
        """Apply a validated configuration between ticks; raises ``ConfigError`` with nothing changed.

        Everything new is built before anything old is touched, so a driver that
        cannot be built leaves the running van as it was.
        """
        agent = self.agent
        old = agent.cfg
        result = ApplyResult()
        for s in RESTART_SECTIONS:
            if asdict(getattr(old, s)) != asdict(getattr(new, s)):
                result.restart_required.append(s)
                setattr(new, s, getattr(old, s))  # the running van keeps its identity and buffer
        if (svc.power.ignition_pin, svc.power.ignition_active_high) != (
            self.svc.power.ignition_pin, self.svc.power.ignition_active_high
        ) or svc.panel != self.svc.panel:
            result.restart_required.append("power/panel pins")
        # Samples taken so far go to the card before anything changes.
        agent.commit()
        old_sensors = {sc.name: sc for sc in old.sensors}
        to_build = [sc for sc in new.sensors if old_sensors.get(sc.name) != sc]
        built = build_drivers(to_build, self.ctx) if to_build else []
        new_link = None
        try:
            if asdict(old.uplink) != asdict(new.uplink):
                new_link = MqttLink(new.uplink, new.device.id)
        except BaseException:
            for d in built:
                d.close()
            raise
        # -- nothing can fail past this point --
        fresh = {sc.name: d for sc, d in zip(to_build, built)}
        keep = {sc.name for sc in new.sensors} - set(fresh)
        for name, d in self.raw_drivers.items():
            if name not in keep:
                d.close()
        self.raw_drivers = {sc.name: fresh.get(sc.name) or self.raw_drivers[sc.name] for sc in new.sensors}
        wrapped = dict(zip([sc.name for sc in old.sensors], agent.drivers))
        agent.drivers = [
            wrapped[sc.name]
            if sc.name in keep and sc.name in wrapped
            else ObservedDriver(attach_calibrations([self.raw_drivers[sc.name]], new, self.cal_store)[0])
            for sc in new.sensors
        ] + [self.announcer]
        result.rebuilt = [sc.name for sc in to_build]
        if to_build or len(new.sensors) != len(old.sensors):
            result.changed.append("sensors")
            agent.timekeeper.sources = [d for d in self.raw_drivers.values() if isinstance(d, TimeFixSource)]
        for s in ("sampling", "time", "batch"):
            if asdict(getattr(old, s)) != asdict(getattr(new, s)):
                result.changed.append(s)
        agent.timekeeper.gps_valid_s = new.time.gps_valid_s
        agent.timekeeper.tolerance_s = new.time.step_tolerance_s
        agent.timekeeper.confirm_s = new.time.step_confirm_s
        agent.timekeeper.gps_latency_s = new.time.gps_latency_s
        if new_link is not None:
            result.changed.append("uplink")
            agent.link.stop()
            agent.link = new_link
            self.remote.attach(new_link)
            new_link.start()
        if svc.power != self.svc.power:
            # Schedules and thresholds apply now; the pins at the next start.
            for f in ("ignition_debounce_s", "shutdown_after_s", "shutdown_command", "park_speed_mps",
                      "park_after_s", "duty_every_s", "duty_measure_s"):  # fmt: skip
                setattr(self.power.cfg, f, getattr(svc.power, f))
            result.changed.append("power")
        self.svc = ServiceConfig(self.power.cfg, self.svc.panel)
        agent.cfg = new
        if self.on_secrets is not None:
            self.on_secrets(new)
        return result

    def _remote_hook(self) -> None:
        for payload in self.remote.take():
            self.remote.handle(payload, self.apply_remote)

    def apply_remote(self, req: Any) -> Any:
        """A remote request: validate like a local file, refuse local-only keys, apply like a
        reload, persist (agent.toml + .prev), and put the change on probation (edge/remote_watch.py)."""
        from edge.remote import Result, dump_toml, new_document, write_config_atomically
        from edge.remote_policy import describe_changes, keep_local_only, no_working_sensor

        def refuse(errors: list[ConfigError]) -> Result:
            return Result(id=req.id, ok=False, status="refused", reason="; ".join(str(e) for e in errors),
                          errors=[{"key": e.key, "problem": e.problem} for e in errors])  # fmt: skip

        if self.config_path is None:
            return refuse([ConfigError("<file>", "this agent runs without a configuration file")])
        try:
            current = read_toml(self.config_path)
            old_text = self.config_path.read_text(encoding="utf-8")
            doc, text = new_document(req, current)
        except (ConfigError, OSError) as exc:
            return refuse([exc if isinstance(exc, ConfigError) else ConfigError("<file>", str(exc))])
        doc, errors = keep_local_only(current, doc, self._effective())
        if text is not None and tomllib.loads(text) != doc:
            text = None  # local-only values were carried over: write the merged document
        seen = {e.key for e in errors}
        errors += [e for e in check_config_data(doc) if e.key not in seen]
        if errors:
            return refuse(errors)
        try:
            text = text or dump_toml(doc, header=f"# written by remote configuration request {req.id}")
            cfg, svc = parse_full_config(doc, source=str(self.config_path))
        except ConfigError as exc:
            return refuse([exc])
        empty = no_working_sensor(cfg.sensors)
        if empty is not None:
            return refuse([empty])
        old_cfg, old_svc = self.agent.cfg, ServiceConfig(replace(self.svc.power), self.svc.panel)
        try:
            applied = self.reconfigure(cfg, svc)
        except ConfigError as exc:
            return refuse([exc])
        try:
            write_config_atomically(self.config_path, text)
        except OSError as exc:
            # Not on the card means not at the next start either: undo, so both agree.
            self.reconfigure(old_cfg, old_svc)
            return refuse([ConfigError("<file>", f"cannot write {self.config_path}: {exc.strerror or exc}")])
        changes = describe_changes(current, doc)  # logged with the result (RemoteConfig.report)
        self._file_doc = doc
        # Back to the last configuration that proved healthy: a change made while another
        # is on probation goes back to where that one started. That one is kept on the card
        # too, so a restart during probation still knows where to go back to.
        if self.watch.pending:
            base = self.watch.pending.undo[:5]
        else:
            base = (old_cfg, old_svc, old_text, self.remote.last_id, current)
            try:
                write_config_atomically(self._probation_path(), old_text)
            except OSError as exc:
                log.warning("cannot keep %s for a rollback after a restart: %s", self._probation_path(), exc)
        self.remote.begin_probation(req.id, base[3])
        self.watch.start(req.id, self.agent.drivers, applied.rebuilt, uplink_changed="uplink" in applied.changed,
                         undo=(*base, doc))  # fmt: skip
        return Result(id=req.id, ok=True, status="applied", changed=applied.changed, changes=changes,
                      restart_required=applied.restart_required,
                      reason="applied" + (f"; at the next start: {', '.join(applied.restart_required)}"
                                          if applied.restart_required else ""))  # fmt: skip

    def _effective(self) -> dict[str, Any]:
        """The local-only keys' sections as in force (defaults included)."""
        cfg = self.agent.cfg
        return {"device": asdict(cfg.device), "buffer": asdict(cfg.buffer), "uplink": asdict(cfg.uplink),
                "power": asdict(self.svc.power), "simulation": asdict(cfg.simulation)}  # fmt: skip

    def _probation_path(self) -> Path:
        assert self.config_path is not None
        return self.config_path.with_name(self.config_path.name + ".probation")

    def _end_probation(self) -> None:
        self.remote.end_probation()
        for p in (self._probation_path(), self._probation_path().with_name(self._probation_path().name + ".prev")):
            p.unlink(missing_ok=True)

    def _resume_probation(self) -> None:
        """The agent stopped (or crashed) while a remote change was on probation: it is again.

        After a restart every sensor was built anew, so each must read, and the uplink must connect.
        """
        p = self.remote.probation
        if p is None or self.config_path is None:
            return
        try:
            old_text = self._probation_path().read_text(encoding="utf-8")
            before = tomllib.loads(old_text)
            old_cfg, old_svc = parse_full_config(before, source=str(self.config_path))
            after = read_toml(self.config_path)
        except (OSError, ValueError, ConfigError) as exc:
            log.warning("remote change %s was on probation, but the configuration before it cannot be read (%s): "
                        "keeping the current one", p["id"], exc)  # fmt: skip
            self._end_probation()
            return
        log.warning("remote change %s was on probation when the agent stopped: on probation again", p["id"])
        self.watch.start(p["id"], self.agent.drivers, [sc.name for sc in self.agent.cfg.sensors], uplink_changed=True,
                         undo=(old_cfg, old_svc, old_text, p["previous_id"], before, after))  # fmt: skip

    def _watch_hook(self) -> None:
        """Decide a change on probation: confirm it, or roll back to the configuration before it."""
        from edge.remote import Result, write_config_atomically
        from edge.remote_policy import describe_changes

        v = self.watch.poll(self.agent.drivers, self.agent.link.connected)
        if v is None:
            return
        self._end_probation()
        if v.healthy:
            self.remote.report(Result(id=v.request_id, ok=True, status="confirmed", reason=v.reason))
            return
        old_cfg, old_svc, old_text, old_id, before, after = v.undo
        reason = f"rolled back: {v.reason}"
        # Each step on its own: the file is back for the next start even if the live swap fails.
        try:
            self.reconfigure(old_cfg, old_svc)
        except Exception as exc:  # whatever it was, the file below must still go back
            log.exception("rollback of remote change %s: the running van could not go back", v.request_id)
            reason += f"; the running van could not go back ({exc}): at the next start"
        try:
            assert self.config_path is not None
            write_config_atomically(self.config_path, old_text)
        except OSError as exc:
            reason += f"; agent.toml could not be written back: {exc.strerror or exc}"
        else:
            self._file_doc = before
        self.remote.forget(v.request_id, old_id)
        self.remote.report(Result(id=v.request_id, ok=False, status="rolled_back", reason=reason,
                                  changes=describe_changes(after, before)))  # fmt: skip

    # -- life --------------------------------------------------------------------------------------

    def run(self, drain_timeout_s: float = 120.0) -> None:
        agent = self.agent
        agent.link.start()
        log.info("agent %s started, epoch %s, %d sensors", agent.cfg.device.id, agent.buffer.epoch, len(agent.drivers))
        self.supervisor.run(duration_s=self.until)
        if self.until is not None and not agent.stopping:
            # A simulated shift is over: hand everything in before exiting.
            if not agent.drain(drain_timeout_s):
                log.warning("drain incomplete: %d samples still buffered", agent.backlog())

    def request_stop(self) -> None:
        self.supervisor.request_stop()

    def close(self) -> None:
        """Everything released, each step on its own: one failure must not keep the buffer open."""
        agent = self.agent
        steps: list[tuple[str, Callable[[], None]]] = [
            ("stats", lambda: write_stats(agent, Path(agent.cfg.device.data_dir) / "stats.json")),
            ("hours", self.hours.save),
            ("uplink", agent.link.stop),
            *[(f"driver {d.name}", d.close) for d in agent.drivers],
            *[("resource", r.close) for r in agent.resources],
            ("buffer", agent.buffer.close),
            ("power", self.power.close),
            *([("panel", self.panel.close)] if self.panel else []),
            ("notify", self.supervisor.notifier.close),
        ]
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("closing %s failed", what)


def run_agent(
    cfg: AgentConfig,
    *,
    drain_timeout_s: float = 120.0,
    svc: ServiceConfig | None = None,
    config_path: str | Path | None = None,
    on_secrets: Callable[[AgentConfig], None] | None = None,
) -> int:
    """``edge run``: build, install the signal handlers, run until stopped, close.

    SIGTERM/SIGINT stop after the current tick (then commit, STOPPING=1); SIGHUP
    reloads the configuration file.
    """
    try:
        rt = Runtime(cfg, svc, config_path=config_path, on_secrets=on_secrets)
    except OSError as exc:  # ssl.SSLError too
        # What the schema could not foresee (a path that changed since the check, a file
        # that went unreadable) still comes from the configuration: exit 2 with one line,
        # not exit 1 with a traceback, which systemd would restart in a loop.
        raise ConfigError("<start-up>", f"{_os_reason(exc)}; check the files and folders agent.toml names") from exc
    signal.signal(signal.SIGTERM, lambda *_: rt.request_stop())
    signal.signal(signal.SIGINT, lambda *_: rt.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: rt.request_reload())
    try:
        rt.run(drain_timeout_s)
    finally:
        rt.close()
    return 0


def _os_reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)  # ssl.SSLError: "PEM lib", "KEY_VALUES_MISMATCH"
    text = reason or exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else str(text)
