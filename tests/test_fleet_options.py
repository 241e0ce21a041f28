"""``datalab-sim fleet`` keeps an existing store and can feed a receiver given by URL (issue 17.6b).

Real parts: Mosquitto, ``datalab-receiver run`` and ``edge run`` processes with value-level
simulated sensors; each run is checked by the delivery oracle (simulator/fleet.py ``oracle``).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from receiver.mqtt_consumer import ReceiverService
from simulator.broker import LocalBroker, SecureSetup
from simulator.broker_url import parse_broker_url
from simulator.cli import main as sim_cli
from simulator.fleet import run_fleet

ROOT = Path(__file__).resolve().parents[1]
SHORT = dict(vans=1, hours=0.05, devices="values", microphones=0)  # 180 simulated seconds
PER_RUN = 4 * 180  # four sensors at 1 Hz


def _samples(store: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as c:
        return dict(c.execute("SELECT epoch, count(*) FROM samples GROUP BY epoch").fetchall())


def test_the_fleets_store_is_kept_and_added_to_unless_fresh(tmp_path: Path, mosquitto: LocalBroker) -> None:
    mosquitto.close()  # the fleet starts its own broker
    out = tmp_path / "fleet"
    first = run_fleet(out, broker_kind="mosquitto", **SHORT)
    assert first.lost == 0 and first.vans[0].stored == PER_RUN
    before = _samples(out / "datalab.sqlite")
    second = run_fleet(out, broker_kind="mosquitto", seed=2, **SHORT)
    assert second.lost == 0 and second.vans[0].stored == PER_RUN
    after = _samples(out / "datalab.sqlite")
    assert len(after) == 2 and all(after[e] == n for e, n in before.items()), (before, after)
    third = run_fleet(out, broker_kind="mosquitto", fresh=True, **SHORT)
    assert third.lost == 0
    fresh = _samples(out / "datalab.sqlite")
    assert len(fresh) == 1 and not set(fresh) & set(after) and sum(fresh.values()) == PER_RUN


def test_the_fleet_feeds_a_receiver_given_by_url(tmp_path: Path, mosquitto: LocalBroker) -> None:
    store = tmp_path / "central" / "datalab.sqlite"
    ready = tmp_path / "rx.ready"
    rx = subprocess.Popen([sys.executable, "-m", "receiver.cli", "run", "--store", str(store), "--host", "127.0.0.1",
                           "--port", str(mosquitto.port), "--client-id", "our-own", "--ready-file", str(ready)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if ready.exists() or rx.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), "our receiver did not subscribe"
        r = CliRunner().invoke(sim_cli, ["fleet", "--out", str(tmp_path / "sim"), "--vans", "2", "--hours", "0.05",
                                         "--devices", "values", "--microphones", "0",
                                         "--receiver-url", f"mqtt://127.0.0.1:{mosquitto.port}", "--store", str(store)])
        assert r.exit_code == 0, (r.output, r.exception)
    finally:
        rx.terminate()
        rx.wait(30)
    assert "Feeding the receiver behind mqtt://127.0.0.1" in r.output
    assert not (tmp_path / "sim" / "datalab.sqlite").exists(), "the fleet made a store of its own"
    assert not (tmp_path / "sim" / "broker").exists(), "the fleet started a broker of its own"
    with sqlite3.connect(store) as c:
        per_van = dict(c.execute("SELECT device, count(*) FROM samples GROUP BY device").fetchall())
    assert per_van == {"van-001": PER_RUN, "van-002": PER_RUN}


def test_the_fleet_feeds_a_secure_broker_over_tls(tmp_path: Path) -> None:
    """mqtts:// with the van's account in the URL, against the shipped TLS + ACL broker configuration."""
    broker = LocalBroker("mosquitto", workdir=tmp_path / "broker", secure=SecureSetup(devices=("van-001",)))
    (tmp_path / "broker").mkdir()
    broker.start()
    info = broker.secure_info
    assert info is not None
    store = tmp_path / "central.sqlite"
    svc = ReceiverService(broker.receiver_config(str(store), client_id="rx-tls"))
    svc.start()
    try:
        assert svc.subscribed.wait(15)
        password = info.passwords["van-001"]
        res = run_fleet(tmp_path / "sim", receiver_url=f"mqtts://van-001:{password}@127.0.0.1:{info.device_port}",
                        store=store, ca_file=info.ca_file, **SHORT)
    finally:
        svc.stop()
        broker.close()
    assert res.lost == 0 and res.vans[0].stored == res.vans[0].committed == PER_RUN
    assert res.broker == f"mqtts://van-001:***@127.0.0.1:{info.device_port}"
    cfg = tmp_path / "sim" / "vans" / "van-001" / "agent.toml"
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    assert password not in (tmp_path / "sim" / "vans" / "van-001" / "agent.log").read_text()


def test_bad_urls_and_option_mixes_are_refused() -> None:
    with pytest.raises(ValueError, match="mqtt:// or mqtts://"):
        parse_broker_url("http://h:1883")
    t = parse_broker_url("mqtts://van:s3cr%40t@broker.example.org")
    assert (t.host, t.port, t.tls, t.username, t.password) == ("broker.example.org", 8883, True, "van", "s3cr@t")
    assert "s3cr" not in t.shown and t.shown == "mqtts://van:***@broker.example.org:8883"
    r = CliRunner().invoke(sim_cli, ["fleet", "--receiver-url", "mqtt://h", "--fresh"])
    assert r.exit_code == 2 and "never deletes" in r.output
    r = CliRunner().invoke(sim_cli, ["fleet", "--receiver-url", "mqtt://u:pw@h/x"])
    assert r.exit_code == 2 and "no path or query" in r.output and "pw" not in r.output.replace("path", "")
