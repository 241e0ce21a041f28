"""``edge live``: every channel's newest reading, refreshing in place.

Stop the agent first on hardware: a serial port or the microphone has one reader.
"""

from __future__ import annotations

import math
from typing import Any

import click
from rich.live import Live
from rich.table import Table

from core.errors import RecoverableError
from edge.technician.cli_support import Van, console, handle_errors, load_van_config, van_options

# The values worth a glance per kind of reading, in order, known by their keys (a section may
# be called anything); others show the first few they have.
_SHOW = (
    ("pm1", "pm25", "pm10"),
    ("no2_ppb", "no2_we_mv", "no2_ae_mv", "no2_temp_c"),
    ("laeq", "lamax", "lamin"),
    ("lceq", "lcmax", "lcmin"),
    ("lzeq", "lzmax", "lzmin"),
    ("lat", "lon", "speed", "sats_used", "hdop"),
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"  # enough for a GPS position, short for everything else
    return str(v)


def render(van: Van, latest: dict[str, Any], errors: dict[str, str], t0: float) -> Table:
    now = van.clock.monotonic()
    title = f"{van.cfg.device.id} live" + (" (simulated)" if van.simulated else "") + f" — {now - t0:.0f} s"
    t = Table(title=title)
    t.add_column("sensor")
    t.add_column("values")
    t.add_column("flags")
    t.add_column("age", justify="right")
    for d in van.drivers:
        item = latest.get(d.name)
        if item is None:
            t.add_row(d.name, f"[red]{errors.get(d.name, 'no reading yet')}[/]", "", "-")
            continue
        r, at = item
        show = next((ks for ks in _SHOW if ks[0] in r.values), ())
        keys = [k for k in show if k in r.values] or list(r.values)[:5]
        vals = "  ".join(f"{k} {_fmt(r.values[k])}" for k in keys)
        if "cal" in r.values:
            vals += f"  [dim]cal {r.values['cal']}[/]"
        t.add_row(d.name, vals, ",".join(r.flags), f"{now - at:.0f} s")
    return t


def poll(van: Van, latest: dict[str, Any], errors: dict[str, str]) -> None:
    for d in van.drivers:
        try:
            r = d.read()
        except RecoverableError as exc:
            errors[d.name] = str(exc)
            continue
        if r is not None:
            latest[d.name] = (r, van.clock.monotonic())
            errors.pop(d.name, None)


@click.command("live")
@click.option("--once", is_flag=True, help="Print one table (after every sensor answered, or --seconds) and exit.")
@click.option("--seconds", type=click.FloatRange(min=1), help="Run this long, then exit.")
@van_options
@handle_errors
def live(once: bool, seconds: float | None, config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Live readings of every channel, refreshing in place (Ctrl-C to stop).

    \b
    Examples:
      edge live
      edge live --once                 # one table for a script or a ticket
      edge live --seconds 30
      edge live --simulate --once
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    # A person watching a simulated van wants real-time pace; a script wants it fast.
    speedup = 1.0 if cfg.simulation.enabled and not once and seconds is None else None
    latest: dict[str, Any] = {}
    errors: dict[str, str] = {}
    out = console()
    with Van(cfg, speedup=speedup) as van:
        t0 = van.clock.monotonic()
        limit = seconds if seconds is not None else (10.0 if once else math.inf)
        if once:
            while van.clock.monotonic() - t0 < limit:
                poll(van, latest, errors)
                if len(latest) == len(van.drivers):
                    break
                van.wait(1.0)
            out.print(render(van, latest, errors, t0))
            return
        try:
            with Live(render(van, latest, errors, t0), console=out, refresh_per_second=4) as view:
                while van.clock.monotonic() - t0 < limit:
                    poll(van, latest, errors)
                    view.update(render(van, latest, errors, t0))
                    van.wait(1.0)
        except KeyboardInterrupt:
            pass
