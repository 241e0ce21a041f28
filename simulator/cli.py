"""``datalab-sim``: simulated vans and fleets."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from core.extras import SIM_MODULES, require

# Before any of the simulator's imports: without the sim extra one line, not a traceback.
require(SIM_MODULES, "the simulator's", "sim")

from rich.console import Console  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.table import Table  # noqa: E402

from simulator.fleet import FleetResult, run_fleet  # noqa: E402

SAMPLES_PER_VAN_HOUR = 4 * 3600  # four sensors at 1 Hz


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Simulated vans and fleets for trying datalab-edge without hardware.

    \b
    Examples:
      datalab-sim fleet                      # 3 vans, one 8-hour shift
      datalab-sim fleet --vans 10 --hours 2 --out /tmp/fleet
    """


def _table(state: dict[str, dict], counts: dict[str, int], hours: float) -> Table:
    t = Table(title="simulated fleet")
    t.add_column("van")
    t.add_column("agent")
    t.add_column("samples in the store", justify="right")
    t.add_column("of a shift", justify="right")
    for device, st in state.items():
        n = counts.get(device, 0)
        t.add_row(device, "driving" if st["running"] else "done", f"{n:,}",
                  f"{100 * n / (SAMPLES_PER_VAN_HOUR * hours):.0f} %")
    return t


def summary(res: FleetResult, console: Console) -> None:
    t = Table(title=f"summary ({res.elapsed_s:.0f} s, broker: {res.broker})")
    for col in ("van", "taken", "committed", "delivered", "stored", "gap-recorded", "lost"):
        t.add_column(col, justify="right")
    for v in res.vans:
        t.add_row(v.device, f"{v.taken:,}", f"{v.committed:,}", f"{v.delivered:,}", f"{v.stored:,}",
                  f"{v.gapped:,}", f"{v.lost:,}")
    tot = lambda f: sum(getattr(v, f) for v in res.vans)  # noqa: E731
    t.add_row("all", *(f"{tot(f):,}" for f in ("taken", "committed", "delivered", "stored", "gapped", "lost")))
    console.print(t)
    console.print(f"duplicates ignored by the receiver: {res.duplicates_ignored:,}")
    console.print(f"dead letters: {res.dead_letters:,}")
    pct = 100 * res.positioned / res.sensor_samples if res.sensor_samples else 0
    console.print(f"sensor samples with a position: {res.positioned:,} of {res.sensor_samples:,} ({pct:.1f} %)")
    if res.store is None:
        console.print("\nThe samples are in your receiver's store (counted above by its acknowledgements).")
        return
    console.print(f"\nThe store is [bold]{res.store}[/bold]. Look inside with (after source .venv/bin/activate):")
    console.print(f"  datalab-receiver stats --store {res.store}")
    console.print(f"  sqlite-utils tables {res.store} --counts")
    console.print(
        f"  sqlite-utils {res.store} \"select device, time_utc, quantity, value, quality, lat, lon, position"
        " from observations limit 10\" --table"
    )
    console.print("Street maps and the dashboard (one shift is one day, so publish with --min-days 1):")
    console.print(f"  datalab-receiver aggregate --store {res.store} --min-days 1")
    console.print(f"  datalab-receiver serve --store {res.store}     # then open http://127.0.0.1:8080/web/")


@main.command()
@click.option("--vans", default=3, show_default=True, help="Number of vans.")
@click.option("--hours", default=8.0, show_default=True, help="Shift length in simulated hours.")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the store, the van buffers and the logs.")
@click.option("--broker", "broker_kind", type=click.Choice(["auto", "mosquitto", "amqtt"]),
              default="auto", show_default=True, help="Broker to start (auto: Mosquitto if installed).")
@click.option("--seed", default=1, show_default=True)
@click.option("--devices", type=click.Choice(["hardware", "values"]), default="hardware", show_default=True,
              help="hardware: the real drivers over simulated devices; values: value-level sensors (fast).")
@click.option("--microphones", default=1, show_default=True,
              help="How many vans measure noise with the 48 kHz microphone meter (the rest: I2C module).")
@click.option("--fresh", is_flag=True,
              help="Empty the store in --out first (without it an existing store is kept and added to).")
@click.option("--receiver-url", metavar="mqtt[s]://[USER[:PASSWORD]@]HOST[:PORT]",
              help="Feed the broker of a receiver of your own instead of starting a broker and a receiver.")
@click.option("--store", "store", type=click.Path(dir_okay=False),
              help="With --receiver-url: that receiver's SQLite store, to check every sample arrived "
                   "(else its acknowledgements are the check).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False),
              help="With an mqtts:// --receiver-url: the CA that signed the broker's certificate.")
@click.option("--van-ca-dir", type=click.Path(exists=True, file_okay=False),
              help="With an mqtts:// --receiver-url: the centre's CA (provision init-ca); every van gets its own "
                   "identity from it as provision add-device makes one (a client certificate; with --passwd-file "
                   "an account). The broker lets a van publish only as itself.")
@click.option("--passwd-file", type=click.Path(dir_okay=False),
              help="With --van-ca-dir: password mode, each van's account in this broker device password file.")
@click.option("--reload-command", default="",
              help="With --passwd-file: run once after the accounts are written, e.g. "
                   "'systemctl reload mosquitto' (the broker reads the file again).")
def fleet(vans: int, hours: float, out: str, broker_kind: str, seed: int, devices: str, microphones: int,
          fresh: bool, receiver_url: str | None, store: str | None, ca_file: str | None,
          van_ca_dir: str | None, passwd_file: str | None, reload_command: str) -> None:
    """Run a simulated fleet through agents, broker, receiver and store; print a summary.

    \b
    Examples:
      datalab-sim fleet
      datalab-sim fleet --vans 5 --hours 1 --broker amqtt
      datalab-sim fleet --vans 50 --devices values --microphones 0
      datalab-sim fleet --fresh --out demo-output          # start from an empty store
      datalab-sim fleet --receiver-url mqtt://127.0.0.1:1883 --store /var/lib/datalab/datalab.sqlite
      datalab-sim fleet --receiver-url mqtts://mqtt.example.org:8884 --ca-file ca.crt --van-ca-dir /root/datalab-ca
    """
    from simulator.broker_url import parse_broker_url
    from simulator.van_accounts import AccountError, VanAccounts

    if (passwd_file or reload_command) and not van_ca_dir:
        raise click.UsageError("--passwd-file and --reload-command go with --van-ca-dir")
    if van_ca_dir and not receiver_url:
        raise click.UsageError("--van-ca-dir goes with --receiver-url (the fleet's own broker has no accounts)")
    accounts = VanAccounts(Path(van_ca_dir), Path(passwd_file) if passwd_file else None,
                           reload_command) if van_ca_dir else None

    console = Console()
    if receiver_url:
        try:
            target = parse_broker_url(receiver_url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--receiver-url") from None
        if fresh:
            raise click.UsageError("--fresh empties the fleet's own store; with --receiver-url the store is "
                                   "your receiver's, which the simulator never deletes")
        console.print(f"Feeding the receiver behind {target.shown} (no broker or receiver of our own).")
    elif store or ca_file:
        raise click.UsageError("--store and --ca-file go with --receiver-url")
    else:
        own = Path(out) / "datalab.sqlite"
        if own.exists():
            console.print(f"{'Emptying' if fresh else 'Keeping and adding to'} the existing store {own}"
                          + ("" if fresh else " (--fresh to start from an empty one)"))
    console.print(f"Driving {vans} simulated vans for a {hours:g}-hour shift in Alphen aan den Rijn ...")
    if accounts:
        console.print(f"Each van gets its own {accounts.mode} identity from {van_ca_dir} (files in {out}/accounts/).")
    try:
        with Live(_table({}, {}, hours), console=console, refresh_per_second=4, transient=False) as live:
            res = run_fleet(
                Path(out), vans=vans, hours=hours, broker_kind=broker_kind, seed=seed,
                devices=devices, microphones=microphones, fresh=fresh, receiver_url=receiver_url,
                store=Path(store) if store else None, ca_file=ca_file or "", van_accounts=accounts,
                progress=lambda st, c: live.update(_table(st, c, hours)),
            )
    except AccountError as exc:
        raise click.ClickException(str(exc)) from None
    summary(res, console)
    bad = [v.device for v in res.vans if v.exit_code != 0]
    if res.lost or bad:
        console.print(f"[red]FAILED: lost {res.lost} samples; agents with errors: {bad}[/red]")
        sys.exit(1)


if __name__ == "__main__":
    main()
