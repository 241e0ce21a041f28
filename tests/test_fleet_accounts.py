"""``datalab-sim fleet --receiver-url`` gives each simulated van its own broker identity (issue 17.6).

Through the shipped TLS + ACL Mosquitto configuration (simulator.broker.LocalBroker, secure
mode), a real receiver and ``edge run`` vans: every van's samples arrive under its own name,
and the identity the fleet made for van A cannot publish as van B (the broker drops it, while
the same connection's own batch arrives).
"""

from __future__ import annotations

import sqlite3
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from receiver import provision as pv
from receiver.mqtt_consumer import ReceiverService
from simulator.broker import LocalBroker, SecureSetup, mosquitto_path
from simulator.cli import main as sim_cli
from simulator.fleet import run_fleet
from simulator.van_accounts import VanAccounts
from tests.test_broker_security import Probe
from tests.test_fleet_options import PER_RUN, SHORT

pytestmark = pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")
P = "datalab/v1"


@pytest.fixture
def centre(tmp_path: Path) -> Iterator[tuple[LocalBroker, Path]]:
    """The shipped secure broker with no van accounts yet, and a receiver storing into SQLite."""
    broker = LocalBroker("mosquitto", workdir=tmp_path / "broker", secure=SecureSetup(devices=("someone-else",)))
    (tmp_path / "broker").mkdir()
    broker.start()
    store = tmp_path / "central.sqlite"
    svc = ReceiverService(broker.receiver_config(str(store), client_id="rx-central"))
    svc.start()
    try:
        assert svc.subscribed.wait(15)
        yield broker, store
    finally:
        svc.stop()
        broker.close()


def _per_van(store: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as c:
        return dict(c.execute("SELECT device, count(*) FROM samples GROUP BY device").fetchall())


def _cannot_publish_as_the_other(broker: LocalBroker, a: Probe) -> None:
    """``a`` (van-001's identity) publishes as van-002, then as itself: only its own arrives."""
    info = broker.secure_info
    assert info is not None
    rx = Probe(info.receiver_port, username=pv.RECEIVER_USER, password=info.passwords[pv.RECEIVER_USER],
               ca_file=info.ca_file)
    try:
        assert rx.connect() == "ok" and a.connect() == "ok"
        rx.subscribe(f"{P}/+/batch")
        a.publish(f"{P}/van-002/batch", b"forged by van-001")  # PUBACKed, and dropped
        a.publish(f"{P}/van-001/batch", b"own")  # the marker: the forged one would have come first
        got = rx.next_message()
        assert (got.topic, got.payload) == (f"{P}/van-001/batch", b"own")
        assert rx.drain() == []
    finally:
        a.close()
        rx.close()


def test_each_van_gets_its_own_certificate(centre: tuple[LocalBroker, Path], tmp_path: Path) -> None:
    broker, store = centre
    info = broker.secure_info
    assert info is not None
    sim = tmp_path / "sim"
    r = CliRunner().invoke(sim_cli, [
        "fleet", "--out", str(sim), "--vans", "2", "--hours", "0.05", "--devices", "values", "--microphones", "0",
        "--receiver-url", f"mqtts://127.0.0.1:{info.cert_port}", "--ca-file", info.ca_file,
        "--van-ca-dir", str(info.ca_dir), "--store", str(store)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "own certificate identity" in r.output
    assert _per_van(store) == {"van-001": PER_RUN, "van-002": PER_RUN}  # one van alone would lose the other's
    for van in ("van-001", "van-002"):
        up = tomllib.loads((sim / "vans" / van / "agent.toml").read_text())["uplink"]
        assert up["cert_file"].startswith(str(sim / "accounts" / van)) and "username" not in up
        assert oct((sim / "accounts" / van / f"{van}.key").stat().st_mode & 0o777) == "0o600"
    pair = pv.CertPair(sim / "accounts" / "van-001" / "van-001.crt", sim / "accounts" / "van-001" / "van-001.key")
    _cannot_publish_as_the_other(broker, Probe(info.cert_port, ca_file=info.ca_file, cert=pair))


def test_each_van_gets_its_own_password_account(centre: tuple[LocalBroker, Path], tmp_path: Path) -> None:
    broker, store = centre
    info = broker.secure_info
    assert info is not None and broker.proc is not None
    sim = tmp_path / "sim"
    accounts = VanAccounts(info.ca_dir, info.conf_dir / "devices.passwd",
                           reload_command=f"kill -HUP {broker.proc.pid}")  # what systemctl reload does
    res = run_fleet(sim, vans=2, hours=SHORT["hours"], devices="values", microphones=0,
                    receiver_url=f"mqtts://127.0.0.1:{info.device_port}", store=store, van_accounts=accounts)
    assert res.lost == 0 and _per_van(store) == {"van-001": PER_RUN, "van-002": PER_RUN}
    assert set(pv.accounts(info.conf_dir / "devices.passwd")) >= {"van-001", "van-002", "someone-else"}
    ups = {v: tomllib.loads((sim / "accounts" / v / "uplink.toml").read_text())["uplink"] for v in ("van-001", "van-002")}
    assert ups["van-001"]["username"] == "van-001" and ups["van-001"]["password"] != ups["van-002"]["password"]
    for v, up in ups.items():
        assert up["password"] not in (sim / "vans" / v / "agent.log").read_text()  # secrets never reach logs
    a = Probe(info.device_port, username="van-001", password=ups["van-001"]["password"], ca_file=info.ca_file)
    _cannot_publish_as_the_other(broker, a)


def test_per_van_accounts_refuse_what_cannot_work(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    ca.mkdir()
    base = ["fleet", "--out", str(tmp_path / "sim"), "--vans", "1", "--devices", "values"]
    r = CliRunner().invoke(sim_cli, base + ["--van-ca-dir", str(ca)])
    assert r.exit_code == 2 and "--receiver-url" in r.output
    r = CliRunner().invoke(sim_cli, base + ["--receiver-url", "mqtts://127.0.0.1:1", "--passwd-file", "x"])
    assert r.exit_code == 2 and "go with --van-ca-dir" in r.output
    r = CliRunner().invoke(sim_cli, base + ["--receiver-url", "mqtt://127.0.0.1:1", "--van-ca-dir", str(ca)])
    assert r.exit_code == 1 and "mqtts://" in r.output
    r = CliRunner().invoke(sim_cli, base + ["--receiver-url", "mqtts://u:s3cret@127.0.0.1:1", "--van-ca-dir", str(ca)])
    assert r.exit_code == 1 and "one account for every van" in r.output and "s3cret" not in r.output
    r = CliRunner().invoke(sim_cli, base + ["--receiver-url", "mqtts://127.0.0.1:1", "--van-ca-dir", str(ca)])
    assert r.exit_code == 1 and "no CA" in r.output  # an empty folder: provision init-ca first
