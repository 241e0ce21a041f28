"""``datalab-receiver grant-reader`` and ``retention``: the store's administration for a city's team."""

from __future__ import annotations

import time

import click

from core.errors import ConfigError


@click.group()
def admin_commands() -> None:
    """(A holder for the commands; cli.py adds them to ``datalab-receiver``.)"""


@admin_commands.command("grant-reader")
@click.option("--store", required=True, help="postgresql:// URL of the store, as a role that owns its schema.")
@click.option("--schema", default="datalab", show_default=True)
@click.argument("role")
def grant_reader_cmd(store: str, schema: str, role: str) -> None:
    """Make ROLE a read-only analyst of the PostgreSQL store (select on every table and view,
    also those made later; nothing else). Safe to run again.

    \b
    Examples:
      datalab-receiver grant-reader --store postgresql://datalab@db/datalab analyst
      psql -h db -d datalab -c '\\password analyst'      # then, as an administrator
    """
    from receiver.pg_roles import RoleRefused, grant_reader
    from receiver.pg_timeouts import PgTimeouts, connect
    from receiver.store_factory import is_postgres_url

    if not is_postgres_url(store):
        raise click.UsageError("grant-reader is for PostgreSQL stores (a SQLite file is read with its file rights)")
    try:
        with connect(store, PgTimeouts(), autocommit=True) as conn:
            for line in grant_reader(conn, role, schema):
                click.echo(line)
    except RoleRefused as exc:
        click.echo(f"Error: grant-reader {role}: {exc.problem}", err=True)
        raise SystemExit(2) from exc
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{role} can now read {schema}; set its password with psql's \\password {role}")


@admin_commands.command()
@click.option("--store", required=True, help="SQLite path or postgresql:// URL.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Receiver TOML: positions_keep_days (default 90).")
@click.option("--keep-days", type=int, help="Overrides positions_keep_days of the config.")
@click.option("--apply/--dry-run", "do_apply", default=False, show_default=True,
              help="--dry-run (the default) only says what would be dropped.")
def retention(store: str, config_path: str | None, keep_days: int | None, do_apply: bool) -> None:
    """Drop vans' raw positions older than the retention period, once the maps have used them
    (docs/privacy.md). Published maps and the measured values stay.

    \b
    Examples:
      datalab-receiver retention --store datalab.sqlite --dry-run
      datalab-receiver retention --config /etc/datalab/receiver.toml --store postgresql://datalab@db/datalab --apply
    """
    from receiver import dbapi
    from receiver import retention as ret
    from receiver.config import load_receiver_config

    try:
        cfg = load_receiver_config(config_path, positions_keep_days=keep_days)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    from receiver.store_check import require_store_or_exit

    # the same store check as every read command (v17 finding 7): it never creates one, a missing,
    # foreign or unreachable store is one line (secrets masked), exit 2
    require_store_or_exit(store)
    conn = dbapi.connect(store, readonly=not do_apply)
    try:
        now = int(time.time() * 1000)
        if do_apply:
            p = ret.apply(conn, cfg.positions_keep_days, now, vacuum=_vacuum)
        else:
            p = ret.plan(conn, cfg.positions_keep_days, now)
    finally:
        conn.close()
    for line in p.lines():
        click.echo(line)
    click.echo("dropped" if do_apply and p.cutoff_ms is not None else "dry run: nothing changed"
               if not do_apply else "nothing dropped")


def _vacuum(conn: object) -> None:
    from receiver import dbapi

    if dbapi.is_sqlite(conn):
        # secure_delete would cost every write; an incremental VACUUM after the delete frees the pages
        dbapi.execute(conn, "VACUUM")
