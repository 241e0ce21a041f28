"""What every technician command shares: options, the van (real or simulated), confirmation.

A "van" here is the configured sensors with their clock: on a Pi the real drivers on
the real clock; with ``--simulate`` the same drivers over ``SimulatedHardware`` in a
``VanWorld`` on a ``SimClock`` (virtual time: a ten-minute zero takes a second or two).
"""

from __future__ import annotations

import functools
import getpass
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from core.calibration import CalibrationError, CalibrationRecord, record_id
from edge.calibration import CalibrationStore, Proposal
from edge.config import AgentConfig, SensorConfig, parse_config
from core.errors import ConfigError

DEFAULT_CONFIG = "/etc/datalab-edge/agent.toml"
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2

# The simulated van the tool uses with --simulate (the real drivers over simulated devices).
SIM_SENSORS: dict[str, dict[str, Any]] = {
    "pm": {"driver": "pms5003", "port": "sim:pm", "mode": "passive"},
    "no2": {"driver": "no2-b43f", "bus": "sim", "serial": "202-SIM-0001"},
    "gps": {"driver": "nmea-gps", "port": "sim:gps"},
    "noise": {"driver": "sound-module", "bus": "sim"},
}

F = TypeVar("F", bound=Callable[..., Any])


def console() -> Console:
    """Rich output; a fixed width when not on a terminal so scripts and tests see whole lines."""
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def fail(message: str, code: int = EXIT_FAIL) -> None:
    """Print a clear error and exit with ``code``; callers have changed nothing yet."""
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(code)


def van_options(f: F) -> F:
    """--config, --simulate and --data-dir, for every command that needs the van."""
    f = click.option("--data-dir", type=click.Path(file_okay=False),
                     help="Override device.data_dir (where calibration.sqlite lives).")(f)
    f = click.option("--simulate", is_flag=True,
                     help="No hardware: a simulated van (real drivers over simulated devices).")(f)
    f = click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                     envvar="EDGE_CONFIG", show_envvar=True,
                     help=f"Agent configuration (default {DEFAULT_CONFIG}).")(f)
    return f


def handle_errors(f: F) -> F:
    """Configuration errors exit 2, refused calibration steps exit 1: both with a clear message."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except ConfigError as exc:
            fail(f"configuration: {exc}", EXIT_CONFIG)
        except CalibrationError as exc:
            msg = str(exc)
            fail(msg + ("" if msg.endswith((".", "?", "!")) else ".") + " Nothing was changed.", EXIT_FAIL)

    return wrapper  # type: ignore[return-value]


def _uses_sim(sc: SensorConfig) -> bool:
    o = sc.options
    return sc.driver.startswith("sim-") or any(
        str(o.get(k, "")).startswith("sim") for k in ("port", "bus", "device")
    )


def load_van_config(config_path: str | None, simulate: bool, data_dir: str | None) -> AgentConfig:
    """The agent's configuration, adapted for --simulate; ConfigError if it is unusable."""
    path = config_path or DEFAULT_CONFIG
    if Path(path).exists() or config_path:
        # Checked by the agent's schema, except what needs [simulation]: the technician's van
        # brings its simulated world itself (--simulate, or "sim" ports: Van below).
        from edge.config_schema import read_toml

        cfg = parse_config(read_toml(path), source=str(path))
    elif simulate:
        cfg = parse_config({}, source="<simulated van>")
    else:
        raise ConfigError("<file>", f"no configuration at {path} (give --config, or --simulate to try without hardware)")
    if data_dir:
        cfg.device.data_dir = data_dir
    if simulate:
        cfg.simulation.enabled = True
        cfg.simulation.devices = "hardware"
        if not cfg.sensors or not all(_uses_sim(s) for s in cfg.sensors):
            cfg.sensors = [SensorConfig(n, o["driver"], {k: v for k, v in o.items() if k != "driver"})
                           for n, o in SIM_SENSORS.items()]
    return cfg


def open_store(cfg: AgentConfig, clock: Any = None) -> CalibrationStore:
    try:
        return CalibrationStore.for_data_dir(cfg.device.data_dir, clock=clock)
    except OSError as exc:
        raise ConfigError("device.data_dir", f"cannot open the calibration store: {exc}") from exc
    except Exception as exc:  # sqlite3 errors: an unwritable or damaged file
        raise ConfigError("device.data_dir", f"cannot open the calibration store: {exc}") from exc


def find_sensor(cfg: AgentConfig, drivers: Iterable[str], name: str | None = None) -> SensorConfig:
    """The configured sensor of one of ``drivers`` (or the one called ``name``)."""
    cands = [s for s in cfg.sensors if s.driver in drivers and (name is None or s.name == name)]
    if not cands:
        raise ConfigError("sensors", f"no sensor with driver {' or '.join(drivers)} configured"
                          + (f" under the name {name!r}" if name else ""))
    if len(cands) > 1:
        raise ConfigError("sensors", f"several sensors match ({', '.join(s.name for s in cands)}): use --sensor")
    return cands[0]


class Van:
    """The configured sensors (all, or those named) with their clock, ready to read."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        only: Iterable[str] | None = None,
        speedup: float | None = None,
        noise: str = "module",
    ) -> None:
        from core.clock import SimClock, SystemClock
        from edge.driver_factory import build_drivers

        self.cfg = cfg
        self.hardware: Any = None
        self.world: Any = None
        ctx: dict[str, Any] = {}
        sim = cfg.simulation
        if sim.enabled:
            from edge import simulation
            from edge.runtime import parse_utc

            backend = simulation.backend()
            start = parse_utc(sim.start_utc, "simulation.start_utc")
            self.clock: Any = SimClock(start, speedup=speedup)
            self.world = backend.world(self.clock, shift_start_utc=start, seed=sim.seed)
            ctx["world"] = self.world
            if sim.devices == "hardware":
                self.hardware = backend.hardware(self.world, self.clock, seed=sim.seed, noise=noise)
                ctx["hardware"] = self.hardware
        else:
            self.clock = SystemClock()
        ctx["clock"] = self.clock
        wanted = set(only) if only is not None else None
        self.sensors = [s for s in cfg.sensors if wanted is None or s.name in wanted]
        try:
            self.drivers = build_drivers(self.sensors, ctx)
        except BaseException:
            if self.hardware is not None:
                self.hardware.close()
            raise

    @property
    def simulated(self) -> bool:
        return self.cfg.simulation.enabled

    def driver(self, name: str) -> Any:
        return next(d for d in self.drivers if d.name == name)

    def wait(self, seconds: float = 1.0) -> None:
        self.clock.sleep(seconds)

    def close(self) -> None:
        for d in self.drivers:
            try:
                d.close()
            except Exception:  # closing must not hide the command's own result
                pass
        if self.hardware is not None:
            self.hardware.close()

    def __enter__(self) -> Van:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def technician_option(f: F) -> F:
    f = click.option("--technician", default=lambda: os.environ.get("DATALAB_TECHNICIAN") or getpass.getuser(),
                     show_default="$DATALAB_TECHNICIAN or your login",
                     help="Who made this calibration (kept in the record).")(f)
    return f


def confirm_options(f: F) -> F:
    f = click.option("--pending", is_flag=True,
                     help="Store the proposal only; confirm later with 'edge calibration confirm ID'.")(f)
    f = click.option("--yes", "-y", is_flag=True, help="Confirm without asking (scripts).")(f)
    return technician_option(f)


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%MZ")


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "-" if v is None else str(v)


def diff_table(proposal: Proposal, new_id: str) -> Table:
    old = proposal.previous.values if proposal.previous else (proposal.old_values or {})
    t = Table(title=f"{proposal.previous.id if proposal.previous else '(configured)' if proposal.old_values else '(none)'} → {new_id} ({proposal.method})")
    t.add_column("value")
    t.add_column("old", justify="right")
    t.add_column("new", justify="right")
    for k in sorted(set(old) | set(proposal.values)):
        o, n = old.get(k), proposal.values.get(k)
        changed = fmt_value(o) != fmt_value(n)
        t.add_row(k, fmt_value(o), f"[bold yellow]{fmt_value(n)}[/]" if changed else fmt_value(n))
    return t


def propose_and_confirm(
    store: CalibrationStore,
    proposal: Proposal,
    *,
    technician: str,
    device: str,
    yes: bool,
    pending: bool,
    out: Console,
) -> CalibrationRecord | None:
    """Show old -> new and ask. Nothing is written unless confirmed (or --pending asked for).

    Returns the active record, the pending one with --pending, or None when declined.
    """
    top = max((r.version for r in store.history(proposal.kind, proposal.serial)), default=0)
    new_id = record_id(proposal.kind, proposal.serial, top + 1)
    out.print(diff_table(proposal, new_id))
    if proposal.note:
        out.print(proposal.note)
    if not pending and not yes:
        if not click.confirm(f"Make {new_id} the active calibration of {proposal.serial}?", default=False):
            out.print("[yellow]Not confirmed: nothing was changed.[/]")
            return None
    rec = store.add(proposal.kind, proposal.serial, proposal.method, proposal.values, technician=technician,
                    valid_from=proposal.valid_from, device=device, note=proposal.note)
    if pending:
        out.print(f"Stored [bold]{rec.id}[/] as pending: it has no effect until "
                  f"'edge calibration confirm {rec.id}'.")
        return rec
    active = store.confirm(rec.id)
    out.print(f"[green]{active.id} is now active[/] (from {fmt_time(active.valid_from)}"
              + (f", supersedes {active.supersedes}" if active.supersedes else "") + ").")
    return active


def declined_exit(rec: CalibrationRecord | None) -> None:
    """Scripts can tell a declined confirmation (exit 1) from a done one (exit 0)."""
    if rec is None:
        raise SystemExit(EXIT_FAIL)
