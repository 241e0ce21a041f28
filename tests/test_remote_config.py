"""Remote configuration over a real Mosquitto: applied, refused by key, persisted, no sample lost."""

from __future__ import annotations

import json
import threading
import time
import tomllib
from pathlib import Path

from click.testing import CliRunner

from edge.remote import build_request, decode_request, device_config_cli, dump_toml, merge, send_device_config
from edge.runtime import Runtime, load_full_config
from edge.service import Notifier


def _conf(data_dir: Path, port: int) -> str:
    return f"""# the van's file
[device]
id = "van-rc"
data_dir = "{data_dir}"
[sampling]
rate_hz = 1.0
commit_interval_s = 1.0
[batch]
max_samples = 2000
[uplink]
host = "127.0.0.1"
port = {port}
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[simulation]
enabled = true
speedup = 20
[sensors.pm]
driver = "sim-pm"
[sensors.gps]
driver = "sim-gps"
"""


def _send(port: int, body: dict) -> dict:
    ack = send_device_config("van-rc", json.dumps(body).encode(), host="127.0.0.1", port=port, wait_s=15)
    assert ack is not None, "no ack from the device"
    return ack


def test_remote_config_roundtrip(tmp_path: Path, mosquitto) -> None:
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "agent.toml"
    conf.write_text(_conf(data, mosquitto.port))
    cfg, svc = load_full_config(conf)
    rt = Runtime(cfg, svc, config_path=conf, notifier=Notifier(""))
    t = threading.Thread(target=rt.run, daemon=True)
    t.start()
    try:
        assert rt.supervisor.ready.wait(20)
        deadline = time.monotonic() + 10
        while not rt.agent.link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.agent.link.connected
        time.sleep(0.3)  # the config subscription is made on connect
        buffer = rt.agent.buffer

        # 1. A valid change: applied live, persisted, the old file kept as .prev.
        ack = _send(mosquitto.port, {"id": "r1", "config": {"sampling": {"rate_hz": 2}, "batch": {"max_samples": 50}}})
        assert ack["ok"] and ack["status"] == "applied", ack
        assert set(ack["changed"]) >= {"sampling", "batch"}
        assert rt.agent.cfg.sampling.rate_hz == 2.0 and rt.agent.cfg.batch.max_samples == 50
        on_disk = tomllib.loads(conf.read_text())
        assert on_disk["sampling"]["rate_hz"] == 2 and on_disk["sensors"]["pm"]["driver"] == "sim-pm"
        assert (tmp_path / "agent.toml.prev").read_text() == _conf(data, mosquitto.port)

        # 2. Invalid: refused with every key named; the old one stays in force and on disk.
        before = conf.read_text()
        ack = _send(mosquitto.port, {"id": "r2", "config": {"sampling": {"rate_hz": 500}, "uplink": {"port": 0}}})
        assert not ack["ok"] and ack["status"] == "refused"
        keys = {e["key"] for e in ack["errors"]}
        assert keys == {"sampling.rate_hz", "uplink.port"}, ack
        assert rt.agent.cfg.sampling.rate_hz == 2.0 and conf.read_text() == before

        # 3. A calibration for a sensor whose driver takes none: refused by key.
        ack = _send(mosquitto.port, {"id": "r3", "kind": "calibration", "sensor": "pm", "calibration": {"a": 1}})
        assert not ack["ok"] and ack["errors"][0]["key"].startswith("sensors.pm.calibration"), ack
        # ... and the device id cannot be changed from afar.
        ack = _send(mosquitto.port, {"id": "r4", "config": {"device": {"id": "van-other"}}})
        assert not ack["ok"] and ack["errors"][0]["key"] == "device.id"

        # 4. A redelivered request is acknowledged, not applied twice.
        ack = _send(mosquitto.port, {"id": "r1", "config": {"sampling": {"rate_hz": 2}}})
        assert ack["ok"] and ack["status"] == "duplicate"
        # The heartbeat says which configuration is in force.
        assert rt.agent.status()["config_id"] == "r1"
        time.sleep(0.5)
    finally:
        rt.request_stop()
        t.join(15)
    # No sample lost across the changes: the same buffer, every sample committed, seq unbroken.
    assert rt.agent.buffer is buffer
    assert rt.agent.stats.committed == rt.agent.stats.taken > 0
    assert buffer.last_seq() == rt.agent.stats.committed
    assert buffer.stats().samples_dropped == 0
    rt.close()


def test_cli_send_without_a_device_times_out(tmp_path: Path, mosquitto) -> None:
    f = tmp_path / "rate.toml"
    f.write_text("[sampling]\nrate_hz = 2.0\n")
    r = CliRunner().invoke(device_config_cli(), ["send", "van-none", str(f), "--host", "127.0.0.1",
                                                 "--port", str(mosquitto.port), "--wait", "0.5"])  # fmt: skip
    assert r.exit_code == 1 and "no answer from van-none" in r.output


def test_request_formats_and_toml_roundtrip(tmp_path: Path) -> None:
    f = tmp_path / "sheet.toml"
    f.write_text("we_zero_mv = 295.0\nsensitivity_na_per_ppm = -0.41\n")
    req = decode_request(build_request(f, calibration_sensor="no2", request_id="c1"))
    assert req.kind == "calibration" and req.sensor == "no2" and req.data["we_zero_mv"] == 295.0
    raw = decode_request(b'[sampling]\nrate_hz = 3.0\n')
    assert raw.mode == "replace" and raw.toml_text
    doc = merge({"sampling": {"rate_hz": 1.0, "commit_interval_s": 5.0}, "sensors": {"a": {"driver": "x"}}},
                {"sampling": {"rate_hz": 2.0}, "sensors": {"a": {"cal": {"k": 1}}}})  # fmt: skip
    assert doc == {"sampling": {"rate_hz": 2.0, "commit_interval_s": 5.0},
                   "sensors": {"a": {"driver": "x", "cal": {"k": 1}}}}  # fmt: skip
    text = dump_toml({**doc, "uplink": {"password": 'p"w\\x', "ports": [1, 2]}})
    assert tomllib.loads(text) == {**doc, "uplink": {"password": 'p"w\\x', "ports": [1, 2]}}
