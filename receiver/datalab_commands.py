"""DataLab commands for ``datalab-receiver``: ``aggregate``, ``export``, ``serve``.

They live in their own click group so the receiver's CLI can take them in one line::

    from receiver.datalab_commands import datalab_commands
    for cmd in datalab_commands.commands.values():
        main.add_command(cmd)

``python -m receiver.datalab_commands --help`` runs the group on its own.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from receiver.aggregate import (
    DEFAULT_MAX_GAP_S,
    DEFAULT_MIN_DAYS,
    DEFAULT_MIN_PASSES,
    DEFAULT_TZ,
    QUANTITIES,
    Period,
    Rule,
    months_in_data,
    parse_period,
)
from receiver.mapunits import DEFAULT_PIECE_M, DEFAULT_SNAP_M

TOKEN_ENV = "DATALAB_API_TOKEN"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def datalab_commands() -> None:
    """DataLab street maps, exports and the read-only API.

    \b
    Examples:
      datalab-receiver aggregate --store datalab.sqlite --monthly
      datalab-receiver export aggregates --store datalab.sqlite --format geojson --out map.geojson
      datalab-receiver serve --store datalab.sqlite --token-file /etc/datalab/api-token
    """


def _store_option(f):  # type: ignore[no-untyped-def]
    return click.option("--store", required=True,
                        help="SQLite path (or sqlite:///...) or postgresql:// URL of the DataLab store.")(f)


def _policy_option(f, only: str = ""):  # type: ignore[no-untyped-def]
    return click.option("--config", "config", type=click.Path(exists=True, dir_okay=False),
                        help=f"{only}Receiver TOML whose exclude_flags / exclude_flags_pm set the flag policy "
                             "(default: the documented policy, docs/datalab.md).")(f)


def _measurements_policy_option(f):  # type: ignore[no-untyped-def]
    return _policy_option(f, "measurements only (aggregates carry the policy of their build): ")


def _flag_policy(config: str | None):  # type: ignore[no-untyped-def]
    from core.errors import ConfigError
    from receiver.config import load_receiver_config

    try:
        return load_receiver_config(config).flag_policy()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _connect(store: str, readonly: bool = False):  # type: ignore[no-untyped-def]
    from receiver import dbapi
    from receiver.store_check import require_store_or_exit

    require_store_or_exit(store)  # these commands read a store: never create one (issue 17.3)
    try:
        return dbapi.connect(store, readonly=readonly)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@datalab_commands.command()
@_store_option
@click.option("--scheme", "schemes", multiple=True, default=("segment", "h3:10"), show_default=True,
              help="Map units: 'segment' (~30 m road pieces) or 'h3:<resolution>'. Repeatable.")
@click.option("--period", "periods", multiple=True, default=("all",), show_default=True,
              help="all, YYYY, YYYY-MM, YYYY-MM-DD or FROM..TO (local days, inclusive). Repeatable.")
@click.option("--monthly", is_flag=True, help="Also build every calendar month that has data.")
@click.option("--min-passes", default=DEFAULT_MIN_PASSES, show_default=True,
              help="Publish a unit only with at least this many passes ...")
@click.option("--min-days", default=DEFAULT_MIN_DAYS, show_default=True, help="... on at least this many days.")
@click.option("--max-gap-s", default=DEFAULT_MAX_GAP_S, show_default=True,
              help="A longer pause in a van's samples starts a new pass.")
@click.option("--tz", default=DEFAULT_TZ, show_default=True, help="Time zone of days and months.")
@click.option("--roads", type=click.Path(exists=True, dir_okay=False),
              help="GeoJSON of street LineStrings (default: the pilot route shipped with the simulator).")
@click.option("--piece-m", default=DEFAULT_PIECE_M, show_default=True, help="Road segment length (m).")
@click.option("--snap-m", default=DEFAULT_SNAP_M, show_default=True,
              help="Samples farther than this from any road are left out (m).")
@_policy_option
def aggregate(store: str, schemes: tuple[str, ...], periods: tuple[str, ...], monthly: bool, min_passes: int,
              min_days: int, max_gap_s: float, tz: str, roads: str | None, piece_m: float, snap_m: float,
              config: str | None) -> None:
    """(Re)build the aggregates table: street-map values per segment or H3 cell.

    Each van's track is split into passes through a unit; the value is the median of
    the per-pass means (noise: energy means). A unit is published only with enough
    passes on enough days; the rows of each scheme and period are replaced.

    \b
    Examples:
      datalab-receiver aggregate --store datalab.sqlite
      datalab-receiver aggregate --store datalab.sqlite --scheme h3:11 --period 2026-11 --min-days 4
      datalab-receiver aggregate --store postgresql://datalab@db/datalab --monthly
    """
    from receiver.aggregate import build, why_nothing
    from receiver.mapunits import make_snapper

    try:
        chosen: list[Period] = [parse_period(p, tz) for p in periods]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--period") from exc
    policy = _flag_policy(config)
    conn = _connect(store)
    if monthly:
        chosen += [p for p in months_in_data(conn, tz) if p.label not in {c.label for c in chosen}]
    rule = Rule(min_passes, min_days)
    t0 = time.perf_counter()
    for scheme in schemes:
        try:
            snapper = make_snapper(scheme, roads=roads, piece_m=piece_m, snap_m=snap_m)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--scheme") from exc
        for rep in build(conn, snapper, chosen, rule=rule, tz=tz, max_gap_s=max_gap_s, policy=policy):
            click.echo(f"{rep.scheme:8} {rep.period:24} {rep.samples:>9,} samples {rep.passes:>8,} passes "
                       f"{rep.rows:>7,} rows {rep.published:>7,} published  {rep.elapsed_s:6.2f} s")
            if (why := why_nothing(rep, rule)) is not None:
                click.echo(f"  {why}")
    click.echo(f"done in {time.perf_counter() - t0:.2f} s (publication rule: {min_passes} passes on {min_days} days)")
    conn.close()


@datalab_commands.command()
@click.argument("kind", type=click.Choice(["aggregates", "measurements"]))
@_store_option
@click.option("--format", "fmt", type=click.Choice(["csv", "geojson", "gpkg"]), default="csv", show_default=True,
              help="gpkg: a GeoPackage for QGIS (needs --out FILE).")
@click.option("--out", default="-", show_default=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Output file ('-' for standard output).")
@click.option("--scheme", help="aggregates: only this scheme (segment, h3:10 ...).")
@click.option("--period", help="aggregates: a built period label; measurements: a time window "
                               "(YYYY-MM, YYYY-MM-DD, FROM..TO).")
@click.option("--quantity", "quantities", multiple=True, type=click.Choice(list(QUANTITIES)),
              help="Only these quantities (repeatable; default all four).")
@click.option("--device", help="measurements: only this van.")
@click.option("--all-positions", is_flag=True,
              help="measurements: also values without a trusted position (empty lat/lon).")
@click.option("--tz", default=DEFAULT_TZ, show_default=True)
@_measurements_policy_option
def export(kind: str, store: str, fmt: str, out: str, scheme: str | None, period: str | None,
           quantities: tuple[str, ...], device: str | None, all_positions: bool, tz: str,
           config: str | None) -> None:
    """Export published aggregates (public) or raw measurements (internal) as CSV or GeoJSON.

    Aggregates: only units that meet the publication rule are written, always.
    Measurements: one row per value with its position; raw per-van data, for the
    team inside, not for publication.

    \b
    Examples:
      datalab-receiver export aggregates --store datalab.sqlite --format geojson --period all --out map.geojson
      datalab-receiver export aggregates --store datalab.sqlite --scheme segment --quantity laeq > noise.csv
      datalab-receiver export measurements --store datalab.sqlite --period 2026-11-24 --device van-001 --out van1.csv
    """
    from receiver.export import build_policies, export_aggregates, export_measurements

    if kind == "aggregates" and config is not None:
        # the maps were built with a policy (aggregate build); an export cannot change it
        raise click.UsageError("--config sets the flag policy of measurement exports only: aggregates carry "
                               "the policy their maps were built with (rebuild with `aggregate --config`)")
    policy = _flag_policy(config)
    if fmt == "gpkg" and out == "-":
        raise click.UsageError("a GeoPackage is a database file: give --out FILE.gpkg")
    conn = _connect(store, readonly=True)
    if fmt == "gpkg":  # receiver/geopackage.py: a file, not a stream
        _export_gpkg(conn, kind, out, scheme, period, quantities, device, all_positions, tz, policy)
        return
    stream = sys.stdout if out == "-" else open(out, "w", encoding="utf-8", newline="")
    try:
        if kind == "aggregates":
            n = export_aggregates(conn, stream, fmt, scheme=scheme, period=period,
                                  quantity=_one_quantity(quantities))
            for build, used in build_policies(conn, scheme=scheme, period=period).items():
                click.echo(f"{build}: built with flag policy {json.dumps(used) if used else '(none recorded)'}",
                           err=True)
        else:
            window = _export_window(period, tz)
            n = export_measurements(conn, stream, fmt, period=window, device=device,
                                    quantities=quantities or tuple(QUANTITIES), positioned_only=not all_positions,
                                    policy=policy)
    finally:
        if stream is not sys.stdout:
            stream.close()
        conn.close()
    click.echo(f"{n:,} {'rows' if fmt == 'csv' else 'features'} written", err=True)


def _one_quantity(quantities: tuple[str, ...]) -> str | None:
    """The aggregates export takes one quantity or all of them (None)."""
    if len(quantities) > 1:
        raise click.UsageError("aggregates: give at most one --quantity (or none for all)")
    return quantities[0] if quantities else None


def _export_window(period: str | None, tz: str) -> Period:
    """The measurements export's --period, parsed (all time when not given)."""
    try:
        return parse_period(period, tz) if period else Period("all")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--period") from exc


def _export_gpkg(conn, kind, out, scheme, period, quantities, device, all_positions, tz, policy) -> None:  # type: ignore[no-untyped-def]
    from receiver.geopackage import export_geopackage

    try:
        if kind == "aggregates":
            n = export_geopackage(conn, out, kind, scheme=scheme, period=period,
                                  quantity=_one_quantity(quantities))
        else:
            window = _export_window(period, tz)
            n = export_geopackage(conn, out, kind, period=window, device=device,
                                  quantities=quantities or tuple(QUANTITIES), positioned_only=not all_positions,
                                  policy=policy)
    finally:
        conn.close()
    click.echo(f"{n:,} features written to {out}", err=True)


@datalab_commands.command()
@_store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True)
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help=f"File holding the token for the fleet page and raw tracks (else ${TOKEN_ENV}).")
@click.option("--public-url", help="Base URL as seen by clients behind a proxy (for SensorThings links).")
@click.option("--tz", default=DEFAULT_TZ, show_default=True)
@click.option("--threads", default=8, show_default=True,
              help="Worker threads (and so the most store connections held at once).")
@click.option("--connection-limit", default=200, show_default=True,
              help="Open connections at most, idle ones included; beyond it new ones wait in the kernel's queue.")
@click.option("--idle-timeout", default=30, show_default=True, help="Close a connection idle this many seconds.")
@click.option("--request-timeout", default=10.0, show_default=True,
              help="Close a connection whose request is not complete this many seconds after its first byte.")
@click.option("--per-address-limit", default=16, show_default=True,
              help="Open connections per client address (0: no cap; behind a proxy raise it or use 0).")
@click.option("--tile-url", envvar="DATALAB_TILE_URL",
              help="Map tiles under the dashboard's data, https://.../{z}/{x}/{y}.png (else: the streets of "
                   "--roads, drawn offline).")
@click.option("--tile-attribution", envvar="DATALAB_TILE_ATTRIBUTION", default="",
              help="The tile server's required credit line, shown under the map.")
@click.option("--roads", type=click.Path(exists=True, dir_okay=False),
              help="GeoJSON of the streets drawn under the data without tiles (default: the shipped pilot route).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def serve(store: str, host: str, port: int, token_file: str | None, public_url: str | None, tz: str,
          threads: int, connection_limit: int, idle_timeout: int, request_timeout: float, per_address_limit: int,
          tile_url: str | None, tile_attribution: str, roads: str | None, verbose: bool) -> None:
    """Serve the read-only API, the SensorThings view and the dashboard.

    Public: published aggregates (/api/v1/aggregates, /sta/v1.1/...) and the dashboard
    (/web/). With a token (Authorization: Bearer): /api/v1/fleet and /api/v1/tracks/<van>.
    Without a token configured, those stay closed. Served by waitress with a fixed thread
    pool, a connection cap and an idle timeout; put TLS and rate limits in the proxy in front.

    \b
    Examples:
      datalab-receiver serve --store datalab.sqlite
      DATALAB_API_TOKEN=$(cat /etc/datalab/api-token) datalab-receiver serve --store datalab.sqlite --port 8081
      datalab-receiver serve --store datalab.sqlite --host 0.0.0.0 --token-file /etc/datalab/api-token \\
          --public-url https://datalab.example.org --threads 16 --connection-limit 500
    """
    import signal

    from receiver.api import make_server
    from receiver.api_server import ServerLimits

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in (("--threads", threads), ("--connection-limit", connection_limit),
                        ("--idle-timeout", idle_timeout)):
        if value < 1:
            raise click.BadParameter("must be at least 1", param_hint=name)
    if not request_timeout > 0:
        raise click.BadParameter("must be above 0", param_hint="--request-timeout")
    if per_address_limit < 0:
        raise click.BadParameter("must be 0 (no cap) or more", param_hint="--per-address-limit")
    from receiver.store_check import require_store_or_exit

    require_store_or_exit(store)  # refuse to start rather than answer 500 (or 503) to everything
    from receiver.basemap import Basemap

    try:
        basemap = Basemap(tile_url=tile_url or None, attribution=tile_attribution, roads=roads)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tile-url") from None
    token = Path(token_file).read_text().strip() if token_file else os.environ.get(TOKEN_ENV, "").strip()
    limits = ServerLimits(threads=threads, connection_limit=connection_limit, channel_timeout_s=idle_timeout,
                          cleanup_interval_s=max(1, min(5, idle_timeout // 2, int(request_timeout // 2))),
                          request_timeout_s=request_timeout, per_address_limit=per_address_limit)
    try:
        server = make_server(store, host, port, token=token or None, public_url=public_url, tz=tz, limits=limits,
                             basemap=basemap)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
    h, p = server.server_address[:2]
    click.echo(f"DataLab API on http://{h}:{p}/  (dashboard /web/, SensorThings /sta/v1.1); "
               f"protected routes {'enabled' if token else 'closed: no token configured'}; "
               f"{threads} threads, at most {connection_limit} connections, idle ones closed after {idle_timeout} s, "
               f"requests complete within {request_timeout:g} s, "
               f"{per_address_limit or 'no cap on'} connections per client address")
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())  # systemd stops us cleanly
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    datalab_commands()
