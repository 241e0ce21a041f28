"""``datalab-receiver``: central ingest and a look into the DataLab store."""

from __future__ import annotations

import json
import logging
import signal
import sys

import click

from core.extras import CENTRAL_MODULES, require

# Before any of the receiver's imports: on a van (.[device]) one line, not an orjson traceback.
require(CENTRAL_MODULES, "the centre's", "central")

from core.errors import ConfigError  # noqa: E402
from receiver.config import load_receiver_config  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The DataLab receiver.

    \b
    Examples:
      datalab-receiver run --store /var/lib/datalab/datalab.sqlite --port 1883
      datalab-receiver stats --store /var/lib/datalab/datalab.sqlite
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Receiver TOML ([receiver] table).")
@click.option("--store", help="SQLite store path (overrides the config).")
@click.option("--host", help="Broker host.")
@click.option("--port", type=int, help="Broker port.")
@click.option("--client-id", help="MQTT client id of this worker.")
@click.option("--share-group", help="Shared-subscription group: a secret, best left to share_group in --config "
                                    "(a flag shows in the process list).")
@click.option("--derive", type=click.Choice(["inline", "background", "separate"]),
              help="Where positions and flags are derived (overrides the config; default inline).")
@click.option("--ready-file", type=click.Path(dir_okay=False),
              help="Write this file once subscribed (for supervisors and tests).")
@click.option("--health-file", type=click.Path(dir_okay=False),
              help="Keep the store's and broker's state in this JSON file (see `stats --health-file`).")
@click.option("-v", "--verbose", is_flag=True)
def run(config_path, store, host, port, client_id, share_group, derive, ready_file, health_file, verbose) -> None:  # type: ignore[no-untyped-def]
    """Consume batches from the broker, store them, acknowledge to the devices.

    \b
    Examples:
      datalab-receiver run --store datalab.sqlite --host localhost --port 1883
      datalab-receiver run --config /etc/datalab/receiver.toml --client-id worker-2
      datalab-receiver run --config /etc/datalab/receiver.toml --store postgresql://datalab@db/datalab \\
          --derive separate

    Several workers share the subscription with the share_group of the config file, a random
    name made by `datalab-receiver provision add-receiver`: a van that knows it takes batches.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_receiver_config(
            config_path, store=store, host=host, port=port, client_id=client_id, share_group=share_group,
            derive=derive, health_file=health_file,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    _warn_share_group(cfg.share_group, from_flag=share_group is not None)
    from receiver.mqtt_consumer import ReceiverService

    svc = ReceiverService(cfg, ready_file=ready_file)

    def _stop(*_: object) -> None:
        svc.request_stop()  # not client.disconnect(): paho is written to from its own thread only

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    svc.run_forever()
    svc.stop_threads()
    svc.store.close()
    sys.exit(0)


def _warn_share_group(group: str, *, from_flag: bool) -> None:
    """Loudly, on stderr and in the log: the receivers' group must be a secret."""
    from receiver.config import weak_share_group

    problems = []
    if (weak := weak_share_group(group)) is not None:
        problems.append(weak)
    if group and from_flag:
        problems.append("--share-group shows in the process list (/proc/*/cmdline): set share_group in --config")
    for p in problems:
        logging.getLogger("receiver").warning("INSECURE: %s", p)
        click.echo(f"WARNING: {p}", err=True)


@main.command()
@click.option("--store", required=True, help="SQLite path or postgresql:// URL.")
@click.option("--follow", is_flag=True, help="Keep running: derive batches as they are queued.")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="With --follow: seconds between looks when nothing is queued.")
@click.option("--max-gap-s", type=float, default=10.0, show_default=True,
              help="Longest GPS gap to interpolate a position across.")
@click.option("--retry-parked", is_flag=True,
              help="First queue again the batches parked because they could not be derived (after a fix).")
def derive(store: str, follow: bool, interval: float, max_gap_s: float, retry_parked: bool) -> None:
    """Derive fixes, positions, calibrations and quality flags of queued batches.

    Workers run with ``derive = "separate"`` only store and acknowledge; this
    does the rest, oldest batch first. Several may run at once on PostgreSQL.
    Safe to kill at any moment: a batch is derived whole or stays queued. A batch that
    cannot be derived is parked with the reason (see `stats`) and the others go on.

    \b
    Examples:
      datalab-receiver derive --store datalab.sqlite
      datalab-receiver derive --store postgresql://datalab@db/datalab --follow
    """
    import time

    from receiver.store_factory import open_store

    from core.errors import StoreNotFound
    from receiver.store_check import require_store, require_store_or_exit

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if not follow:
        require_store_or_exit(store)  # a one-off derive never creates a store (issue 17.3)
    else:
        # A deriver service may start before the first worker made the store: wait, never create it.
        waiting_since = None
        while not stopping:
            try:
                require_store(store)
                break
            except StoreNotFound as exc:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    logging.getLogger("receiver.derive").warning("waiting for the store: %s", exc)
                time.sleep(max(interval, 1.0))
        if stopping:
            return
    s = open_store(store, max_gap_s=max_gap_s)
    if retry_parked:
        click.echo(f"queued {s.requeue_parked()} parked batches again")
    total = 0
    while not stopping:
        try:
            n = s.derive_pending(limit=50)
        except Exception as exc:  # the store failed (a bad batch is parked, not raised)
            if not follow:
                raise click.ClickException(f"the store failed: {exc}") from exc
            logging.getLogger("receiver.derive").error("the store failed (%s); trying again", type(exc).__name__)
            time.sleep(max(interval, 5.0))
            continue
        total += n
        if n == 0:
            if not follow:
                break
            time.sleep(interval)
    click.echo(f"derived {total} batches; {s.derive_backlog()} still queued, {len(s.derive_parked())} parked")
    s.close()


@main.command()
@click.option("--store", required=True, help="SQLite path or postgresql:// URL.")
@click.option("--health-file", type=click.Path(dir_okay=False),
              help="A running receiver's health file (run --health-file): store and broker state.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout-s", type=float, default=5.0, show_default=True,
              help="PostgreSQL: give up on a store that does not answer within this (connect, each query).")
def stats(store: str, health_file: str | None, as_json: bool, timeout_s: float) -> None:
    """Counts in the store: samples per device, duplicates ignored, dead letters, derive backlog,
    batches parked (could not be derived, with the reason); with --health-file, whether the
    receiver reaches its store and broker.

    \b
    Examples:
      datalab-receiver stats --store datalab.sqlite
      datalab-receiver stats --store datalab.sqlite --health-file /run/datalab/receiver-health.json
    """
    from core.errors import StoreNotFound, StoreUnreachable
    from receiver.config import ReceiverConfig, pg_timeouts
    from receiver.health import describe, error_text
    from receiver.store_check import NoStoreExit, require_store
    from receiver.store_factory import open_store

    data: dict[str, object] = {}
    if health_file:
        try:
            data["health"] = json.loads(open(health_file, encoding="utf-8").read())
        except (OSError, ValueError) as exc:
            data["health"] = {"error": f"cannot read {health_file}: {exc}"}
    bounds = ReceiverConfig(store=store, store_connect_timeout_s=timeout_s)
    timeouts = pg_timeouts(bounds, statement_s=timeout_s)
    # A PostgreSQL that does not answer is an outage stats reports (exit 1, below); a path or a
    # database that holds no store is a mistake: one line, exit 2, and no empty store made
    # (after what a running receiver's health file says: it may be waiting to make it).
    s = None
    try:
        require_store(store, timeouts=timeouts)
        s = open_store(store, pg_timeouts=timeouts)
    except StoreUnreachable as exc:
        data["store_error"] = error_text(exc)  # its URL has the password as ***
    except StoreNotFound as exc:
        if isinstance(health := data.get("health"), dict):
            for line in [health["error"]] if "error" in health else describe(health):
                click.echo(line)
        raise NoStoreExit(str(exc)) from None
    except Exception as exc:  # stats must say the store is down, not print a traceback
        data["store_error"] = error_text(exc)
    if s is not None:
        try:
            data.update(counters=s.counts(), derive_backlog=s.derive_backlog(), derive_parked=s.derive_parked(),
                        devices=s.device_summary())
        except Exception as exc:  # the store stopped answering mid-way (a timeout): the same
            data["store_error"] = error_text(exc)
        finally:
            try:
                s.close()
            except Exception:  # closing a connection the deadline cut
                pass
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_stats(data, describe)
    if "store_error" in data:
        sys.exit(1)


def _print_stats(data: dict, describe) -> None:  # type: ignore[no-untyped-def, type-arg]
    health = data.get("health")
    if isinstance(health, dict):
        for line in [health["error"]] if "error" in health else describe(health):
            click.echo(line)
    if "store_error" in data:
        click.echo(f"store: does not answer now ({data['store_error']})")
        return
    for k, v in sorted(data["counters"].items()):
        click.echo(f"{k:>20}: {v}")
    click.echo(f"{'derive_backlog':>20}: {data['derive_backlog']} batches stored, positions and flags still to come")
    parked = data["derive_parked"]
    click.echo(f"{'derive_parked':>20}: {len(parked)} batches that could not be derived"
               + (" (datalab-receiver derive --retry-parked to try them again)" if parked else ""))
    for p in parked[:20]:
        click.echo(f"{'':>22}{p['batch_id']}: {p['reason']}")
    for d in data["devices"]:
        click.echo(f"{d['device']:>12} epoch {d['epoch']}: {d['samples']} samples, seq {d['min_seq']}-{d['max_seq']}")


@main.command()
@click.option("--store", required=True, help="SQLite path or postgresql:// URL of the store to create.")
def init(store: str) -> None:
    """Create an empty DataLab store (tables, views) if there is none; an existing one is kept.

    The read commands (stats, derive, aggregate, export, serve) never create a store: they
    stop with "no store at ..." (exit 2). `run` creates its store too.

    \b
    Examples:
      datalab-receiver init --store /var/lib/datalab/datalab.sqlite
      datalab-receiver init --store postgresql://datalab@db/datalab
    """
    from receiver.store_check import safe_url
    from receiver.store_factory import open_store

    try:
        open_store(store).close()
    except Exception as exc:  # a path we may not write, a database that refuses us: one line
        from receiver.health import error_text

        raise click.ClickException(f"cannot create a store at {safe_url(store)}: {error_text(exc)}") from None
    click.echo(f"store ready at {safe_url(store)}")


@main.command()
@click.option("--store", required=True, help="SQLite path or postgresql:// URL of an existing store.")
def migrate(store: str) -> None:
    """Bring an existing store to this version's schema now, rather than at the next receiver start.

    Every schema step runs whenever a store opens; this command only opens it (and never creates
    one: a missing store is one line, exit 2). On PostgreSQL a plain `samples` table is moved into
    the monthly partitions in batches (docs/datalab.md); a migration cut off goes on next time.

    \b
    Example:
      runuser -u datalab -- datalab-receiver migrate --store 'postgresql:///datalab?host=/var/run/postgresql'
    """
    from receiver.store import SCHEMA_VERSION
    from receiver.store_check import require_store_or_exit, safe_url
    from receiver.store_factory import open_store

    require_store_or_exit(store)
    s = open_store(store)
    try:
        layout = ""
        if getattr(s, "partitioned", None) is not None:
            layout = "; samples partitioned by month" if s.partitioned else "; samples a plain table"
        click.echo(f"store at {safe_url(store)}: schema version {SCHEMA_VERSION}{layout}")
    finally:
        s.close()


from receiver.provision import provision  # noqa: E402  (a command group of its own)

main.add_command(provision)

from receiver.datalab_commands import datalab_commands  # noqa: E402  (aggregate, export, serve)

for _cmd in datalab_commands.commands.values():
    main.add_command(_cmd)

from receiver.admin_commands import admin_commands  # noqa: E402  (grant-reader, retention)

for _cmd in admin_commands.commands.values():
    main.add_command(_cmd)

from receiver.device_config import device_config_cli  # noqa: E402  (send a van a new configuration)

main.add_command(device_config_cli())

if __name__ == "__main__":
    main()
