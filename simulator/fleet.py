"""The main job: a simulated fleet through agents, a broker, the receiver and the store.

Every part is the real one, each in its own process: a broker (Mosquitto when
installed, else the embedded amqtt), ``datalab-receiver run``, and one
``edge run`` per van with a simulated clock and simulated sensors. At the end
the store is compared with what each device committed (the delivery oracle).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from simulator.broker import LocalBroker
from simulator.broker_url import BrokerTarget, parse_broker_url
from simulator.van_accounts import AccountError, VanAccounts, provision_vans

# Value-level simulated sensors (cheap: for large fleets).
VALUE_SENSORS = {
    "pm": {"driver": "sim-pm"},
    "no2": {"driver": "sim-no2"},
    "noise": {"driver": "sim-noise"},
    "gps": {"driver": "sim-gps"},
}
# The real drivers over simulated devices (pseudo-terminals, fake I2C bus, audio stream).
HARDWARE_SENSORS = {
    "pm": {"driver": "pms5003", "port": "sim:pm", "mode": "passive"},
    "no2": {"driver": "no2-b43f", "bus": "sim", "serial": "202-SIM-0001"},
    "gps": {"driver": "nmea-gps", "port": "sim:gps"},
}
NOISE_MODULE = {"driver": "sound-module", "bus": "sim"}
NOISE_MICROPHONE = {"driver": "microphone", "device": "sim"}


def _toml_value(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def sensors_toml(sensors: dict[str, dict[str, object]]) -> str:
    return "\n".join(
        f"[sensors.{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in opts.items())
        for name, opts in sensors.items()
    )


@dataclass
class VanResult:
    device: str
    taken: int = 0
    committed: int = 0
    delivered: int = 0  # acknowledged by the receiver as committed
    stored: int = 0  # rows in the store for this device
    gapped: int = 0  # samples the device declared dropped (gap records)
    lost: int = 0
    exit_code: int | None = None


@dataclass
class FleetResult:
    store: Path | None  # None: a receiver of one's own whose store was not given
    broker: str
    vans: list[VanResult] = field(default_factory=list)
    duplicates_ignored: int = 0
    dead_letters: int = 0
    positioned: int = 0
    sensor_samples: int = 0
    elapsed_s: float = 0.0

    @property
    def lost(self) -> int:
        return sum(v.lost for v in self.vans)


def van_config(
    device: str, data_dir: Path, port: int, *, seed: int, hours: float, offset_m: float, start_utc: str,
    devices: str = "hardware", noise: str = "module", broker: BrokerTarget | None = None, ca_file: str = "",
    uplink: dict[str, object] | None = None,
) -> str:
    """The van's agent.toml; ``uplink``: its own [uplink] keys (simulator/van_accounts.py), else the broker's."""
    if devices == "hardware":
        chosen = {**HARDWARE_SENSORS, "noise": NOISE_MICROPHONE if noise == "microphone" else NOISE_MODULE}
    else:
        chosen = VALUE_SENSORS
    sensors = sensors_toml(chosen)
    return f"""# Simulated van written by datalab-sim fleet
[device]
id = "{device}"
data_dir = "{data_dir}"

[uplink]
{_toml_keys(uplink or _uplink_keys(broker or BrokerTarget("127.0.0.1", port, False), ca_file))}

[batch]
max_samples = 2000
max_age_s = 120.0

{sensors}
[simulation]
enabled = true
seed = {seed}
start_utc = "{start_utc}"
shift_hours = {hours}
start_offset_m = {offset_m}
# The Pi has no real-time clock: it boots with last year's saved time; NTP needs
# coverage (15 min), GPS time usually comes first. Early samples get corrected.
boot_clock_error_s = -31536000.0
ntp_after_s = 900.0
devices = "{devices}"
noise = "{noise}"
gps_corrupt_prob = 0.0005
pm_corrupt_prob = 0.01
"""


def _uplink_keys(b: BrokerTarget, ca_file: str) -> dict[str, object]:
    keys: dict[str, object] = {"host": b.host, "port": b.port}
    if b.username:
        keys["username"] = b.username
    if b.password:
        keys["password"] = b.password
    if b.tls:
        keys["tls"] = True
        if ca_file:
            keys["ca_file"] = str(Path(ca_file).resolve())
    return keys


def _toml_keys(keys: dict[str, object]) -> str:
    # json.dumps quotes a string as TOML does (and escapes it); bools and ints as TOML writes them
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())


def default_shift_start() -> str:
    """Yesterday's 07:30 in Alphen (CET): a shift safely in the past of the receiver's clock."""
    import datetime as dt

    cet = dt.timezone(dt.timedelta(hours=1))
    day = (dt.datetime.now(cet) - dt.timedelta(days=1)).date()
    return dt.datetime(day.year, day.month, day.day, 7, 30, tzinfo=cet).isoformat()


def _python() -> str:
    return sys.executable


def oracle(store: Path, stats_files: dict[str, Path]) -> tuple[list[VanResult], dict[str, int]]:
    """Compare each device's committed sequence range with the store."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    results = []
    for device, path in stats_files.items():
        r, epoch = van_figures(device, path)
        if epoch is not None:
            r.stored = db.execute(
                "SELECT count(*) FROM samples WHERE device=? AND epoch=?", (device, epoch)
            ).fetchone()[0]
            for first, last in db.execute(
                "SELECT first_seq, last_seq FROM gaps WHERE device=? AND epoch=?", (device, epoch)
            ):
                r.gapped += max(0, min(last, r.committed) - max(first, 1) + 1)
            r.lost = max(0, r.committed - r.stored - r.gapped)
        results.append(r)
    counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
    counters["positioned"] = db.execute(
        "SELECT count(*) FROM positions WHERE state IN ('exact','interpolated')"
    ).fetchone()[0]
    counters["sensor_samples"] = db.execute(
        "SELECT count(*) FROM samples WHERE sensor NOT IN ('gps', 'calibration')"
    ).fetchone()[0]
    db.close()
    return results, counters


def run_fleet(
    out: Path,
    *,
    vans: int = 3,
    hours: float = 8.0,
    broker_kind: str = "auto",
    seed: int = 1,
    start_utc: str | None = None,
    progress: Callable[[dict[str, dict], dict[str, int]], None] | None = None,
    timeout_s: float = 1800.0,
    devices: str = "hardware",
    microphones: int = 1,
    fresh: bool = False,
    receiver_url: str | None = None,
    store: Path | None = None,
    ca_file: str = "",
    van_accounts: VanAccounts | None = None,
) -> FleetResult:
    """Run the fleet. ``devices``: "hardware" (real drivers over simulated devices) or
    "values" (value-level sensors); the first ``microphones`` vans measure noise with
    the 48 kHz microphone meter, the others with the I2C sound module.

    By default a broker and a receiver are started and the store is ``out/datalab.sqlite``:
    kept and added to when it exists (each run is a new epoch of every van), emptied first
    with ``fresh``. With ``receiver_url`` (mqtt[s]://...) the vans feed that broker and the
    receiver behind it instead; ``store`` then names that receiver's SQLite store for the
    check against what each van committed (without it, the check is the receiver's acks).
    ``van_accounts`` gives every van its own broker identity first (simulator/van_accounts.py).
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if start_utc is None:
        start_utc = default_shift_start()
    target = parse_broker_url(receiver_url) if receiver_url else None
    if target is None:
        store = out / "datalab.sqlite"
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                Path(str(store) + suffix).unlink(missing_ok=True)
    devices_ids = [f"van-{i + 1:03d}" for i in range(vans)]
    uplinks: dict[str, dict[str, object]] = {}
    if van_accounts is not None:
        if target is None:
            raise AccountError("per-van accounts are for a broker of your own (--receiver-url)")
        uplinks = provision_vans(van_accounts, devices_ids, target, out)
    t0 = time.monotonic()
    broker: LocalBroker | None = None
    receiver: subprocess.Popen[bytes] | None = None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stats_files: dict[str, Path] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        if target is None:
            broker = LocalBroker(broker_kind, workdir=out / "broker")
            (out / "broker").mkdir(exist_ok=True)
            broker.start()
            receiver = _start_receiver(out, store, broker, env)
        for i, device in enumerate(devices_ids):
            vdir = out / "vans" / device
            vdir.mkdir(parents=True, exist_ok=True)
            for p in vdir.glob("buffer.sqlite*"):
                p.unlink()
            cfg = vdir / "agent.toml"
            cfg.touch(mode=0o600)  # it may hold the broker account's password
            cfg.chmod(0o600)
            cfg.write_text(
                van_config(device, vdir, broker.port if broker else 0, seed=seed + i, hours=hours,
                           offset_m=2500.0 * i, start_utc=start_utc, devices=devices,
                           noise="microphone" if i < microphones else "module", broker=target, ca_file=ca_file,
                           uplink=uplinks.get(device))
            )
            stats_files[device] = vdir / "stats.json"
            stats_files[device].unlink(missing_ok=True)
            procs[device] = subprocess.Popen(
                [_python(), "-m", "edge.cli", "run", "--config", str(cfg)],
                stdout=open(vdir / "agent.log", "wb"), stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline:
                raise TimeoutError("the fleet did not finish in time")
            if progress:
                progress(_progress(procs, stats_files), _store_counts(store))
            time.sleep(0.5)
        if progress:
            progress(_progress(procs, stats_files), _store_counts(store))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        if receiver is not None:
            receiver.terminate()
            try:
                receiver.wait(30)
            except subprocess.TimeoutExpired:
                receiver.kill()
        if broker is not None:
            broker.close()
    if store is not None and store.exists():
        results, counters = oracle(store, stats_files)
    else:
        results, counters = acked_only(stats_files), {}
    for r in results:
        r.exit_code = procs[r.device].returncode
    return FleetResult(
        store=store,
        broker=broker.kind if broker else target.shown if target else "?",
        vans=results,
        duplicates_ignored=counters.get("samples_duplicate", 0),
        dead_letters=counters.get("dead_letters", 0),
        positioned=counters.get("positioned", 0),
        sensor_samples=counters.get("sensor_samples", 0),
        elapsed_s=time.monotonic() - t0,
    )


def _start_receiver(out: Path, store: Path, broker: LocalBroker, env: dict[str, str]) -> subprocess.Popen[bytes]:
    ready = out / "receiver.ready"
    ready.unlink(missing_ok=True)
    receiver = subprocess.Popen(
        [_python(), "-m", "receiver.cli", "run", "--store", str(store),
         "--host", broker.host, "--port", str(broker.port), "--client-id", "datalab-receiver-demo",
         "--ready-file", str(ready)],
        stdout=open(out / "receiver.log", "wb"), stderr=subprocess.STDOUT, env=env,
    )
    try:
        _wait_for(ready, receiver, 30.0)
    except BaseException:
        receiver.kill()
        raise
    return receiver


def acked_only(stats_files: dict[str, Path]) -> list[VanResult]:
    """Without the receiver's store: a committed sample the receiver never acknowledged is lost."""
    results = []
    for device, path in stats_files.items():
        r, _ = van_figures(device, path)
        r.lost = max(0, r.committed - r.delivered)
        results.append(r)
    return results


def van_figures(device: str, stats_file: Path) -> tuple[VanResult, str | None]:
    """What the van's agent says it took, committed and had acknowledged, and its epoch
    (None: the agent wrote no stats file)."""
    r = VanResult(device)
    if not stats_file.exists():
        return r, None
    st = json.loads(stats_file.read_text())
    r.taken, r.committed, r.delivered = st["taken"], st["last_seq"], st["acked_samples"]
    return r, st["epoch"]


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited with {proc.returncode} before subscribing")
        if time.monotonic() > deadline:
            raise TimeoutError("the receiver did not subscribe in time")
        time.sleep(0.05)


def _progress(procs: dict[str, subprocess.Popen[bytes]], stats: dict[str, Path]) -> dict[str, dict]:
    out = {}
    for device, p in procs.items():
        out[device] = {"running": p.poll() is None}
    return out


def _store_counts(store: Path | None) -> dict[str, int]:
    if store is None or not store.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1)
        rows = db.execute("SELECT device, count(*) FROM samples GROUP BY device").fetchall()
        db.close()
        return dict(rows)
    except sqlite3.Error:
        return {}
