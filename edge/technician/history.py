"""``edge calibration``: the records kept on this van (history, show, confirm, discard)."""

from __future__ import annotations

import json

import click
from rich.table import Table

from core.calibration import CalibrationError
from edge.technician.cli_support import (
    console,
    fmt_time,
    fmt_value,
    handle_errors,
    load_van_config,
    open_store,
    van_options,
)

_STATUS_STYLE = {"active": "green", "pending": "yellow", "superseded": "dim"}


@click.group("calibration")
def calibration() -> None:
    """Calibration records: what is in effect, since when, who made it.

    \b
    Examples:
      edge calibration history
      edge calibration history --serial 202123456
      edge calibration show no2:202123456:v3
      edge calibration confirm no2:202123456:v4
    """


@calibration.command("history")
@click.option("--serial", help="Only this sensor.")
@click.option("--kind", type=click.Choice(["no2", "pm", "noise"]), help="Only this kind of sensor.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: one record per line.")
@van_options
@handle_errors
def history(serial: str | None, kind: str | None, as_json: bool, config_path: str | None, simulate: bool,
            data_dir: str | None) -> None:
    """List calibration records, oldest first.

    \b
    Examples:
      edge calibration history
      edge calibration history --kind no2 --json | jq .
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    recs = open_store(cfg).history(kind, serial)
    if as_json:
        for r in recs:
            click.echo(r.to_json())
        return
    out = console()
    if not recs:
        out.print("No calibration records" + (f" for {serial}" if serial else "") + ".")
        return
    t = Table(title=f"Calibration records on {cfg.device.id}")
    t.add_column("id", no_wrap=True)
    for col in ("method", "status", "valid from", "valid to", "technician"):
        t.add_column(col)
    t.add_column("supersedes", no_wrap=True)
    for r in recs:
        style = _STATUS_STYLE.get(r.status, "")
        t.add_row(r.id, r.method, f"[{style}]{r.status}[/]", fmt_time(r.valid_from), fmt_time(r.valid_to),
                  r.technician, r.supersedes or "-")
    out.print(t)


@calibration.command("show")
@click.argument("record_id")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON (as it travels to the receiver).")
@van_options
@handle_errors
def show(record_id: str, as_json: bool, config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Show one record with all its values.

    \b
    Example:
      edge calibration show no2:202123456:v3
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    rec = open_store(cfg).get(record_id)
    if rec is None:
        raise CalibrationError(f"no record {record_id!r} (see 'edge calibration history')")
    if as_json:
        click.echo(json.dumps(json.loads(rec.to_json()), indent=2))
        return
    t = Table(title=rec.id, show_header=False)
    t.add_column("field")
    t.add_column("value")
    for k, v in (("kind", rec.kind), ("serial", rec.serial), ("version", rec.version), ("method", rec.method),
                 ("status", rec.status), ("technician", rec.technician), ("device", rec.device),
                 ("created", fmt_time(rec.created)), ("valid from", fmt_time(rec.valid_from)),
                 ("valid to", fmt_time(rec.valid_to)), ("supersedes", rec.supersedes or "-"), ("note", rec.note)):
        t.add_row(k, str(v))
    for k, v in sorted(rec.values.items()):
        t.add_row(f"values.{k}", fmt_value(v))
    console().print(t)


@calibration.command("confirm")
@click.argument("record_id")
@click.option("--yes", "-y", is_flag=True, help="Confirm without asking.")
@van_options
@handle_errors
def confirm(record_id: str, yes: bool, config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Make a pending record (stored with --pending) the active one.

    \b
    Example:
      edge calibration confirm no2:202123456:v4
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    store = open_store(cfg)
    rec = store.get(record_id)
    if rec is None or rec.status != "pending":
        raise CalibrationError(f"{record_id} is not a pending record")
    if not yes and not click.confirm(f"Make {record_id} ({rec.method} by {rec.technician}) active?", default=False):
        console().print("[yellow]Not confirmed: nothing was changed.[/]")
        raise SystemExit(1)
    new = store.confirm(record_id)
    console().print(f"[green]{new.id} is now active[/]" + (f", supersedes {new.supersedes}" if new.supersedes else ""))


@calibration.command("discard")
@click.argument("record_id")
@van_options
@handle_errors
def discard(record_id: str, config_path: str | None, simulate: bool, data_dir: str | None) -> None:
    """Drop a pending record (active and superseded ones are history and stay).

    \b
    Example:
      edge calibration discard no2:202123456:v4
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    open_store(cfg).discard(record_id)
    console().print(f"Discarded {record_id}.")
