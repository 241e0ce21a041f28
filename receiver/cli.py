"""``datalab-receiver``: central ingest and a look into the DataLab store."""

from __future__ import annotations

import json
import logging
import signal
import sys

import click

from edge.errors import ConfigError
from receiver.config import load_receiver_config


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
@click.option("-v", "--verbose", is_flag=True)
def run(config_path, store, host, port, client_id, share_group, derive, ready_file, verbose) -> None:  # type: ignore[no-untyped-def]
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
            derive=derive,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    _warn_share_group(cfg.share_group, from_flag=share_group is not None)
    from receiver.service import ReceiverService

    svc = ReceiverService(cfg, ready_file=ready_file)

    def _stop(*_: object) -> None:
        svc.client.disconnect()

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
def derive(store: str, follow: bool, interval: float, max_gap_s: float) -> None:
    """Derive fixes, positions, calibrations and quality flags of queued batches.

    Workers run with ``derive = "separate"`` only store and acknowledge; this
    does the rest, oldest batch first. Several may run at once on PostgreSQL.
    Safe to kill at any moment: a batch is derived whole or stays queued.

    \b
    Examples:
      datalab-receiver derive --store datalab.sqlite
      datalab-receiver derive --store postgresql://datalab@db/datalab --follow
    """
    import time

    from receiver.store_factory import open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = open_store(store, max_gap_s=max_gap_s)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    total = 0
    while not stopping:
        n = s.derive_pending(limit=50)
        total += n
        if n == 0:
            if not follow:
                break
            time.sleep(interval)
    click.echo(f"derived {total} batches; {s.derive_backlog()} still queued")
    s.close()


@main.command()
@click.option("--store", required=True, help="SQLite path or postgresql:// URL.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats(store: str, as_json: bool) -> None:
    """Counts in the store: samples per device, duplicates ignored, dead letters, derive backlog.

    \b
    Example:
      datalab-receiver stats --store datalab.sqlite
    """
    from receiver.store_factory import open_store

    s = open_store(store)
    data = {"counters": s.counts(), "derive_backlog": s.derive_backlog(), "devices": s.device_summary()}
    s.close()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for k, v in sorted(data["counters"].items()):
        click.echo(f"{k:>20}: {v}")
    click.echo(f"{'derive_backlog':>20}: {data['derive_backlog']} batches stored, positions and flags still to come")
    for d in data["devices"]:
        click.echo(f"{d['device']:>12} epoch {d['epoch']}: {d['samples']} samples, seq {d['min_seq']}-{d['max_seq']}")


from receiver.provision import provision  # noqa: E402  (a command group of its own)

main.add_command(provision)

from receiver.commands import datalab_commands  # noqa: E402  (aggregate, export, serve)

for _cmd in datalab_commands.commands.values():
    main.add_command(_cmd)

from edge.remote import device_config_cli  # noqa: E402  (send a van a new configuration)

main.add_command(device_config_cli())

if __name__ == "__main__":
    main()
