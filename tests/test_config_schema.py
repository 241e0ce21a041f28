"""Issue 16, 3: one config schema for `edge config check`, `edge run`, a SIGHUP reload and remote
configuration. Each bad configuration below gives the same error (key and problem) on all four
paths, and exits 2 from check and run; the example and the configurations the repo writes pass."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edge import config_schema
from edge.cli import main
from edge.config import AgentConfig
from core.errors import ConfigError, ConfigInvalid
from edge.power import PanelConfig, PowerConfig
from edge.remote import decode_request, dump_toml, merge
from edge.remote_policy import LOCAL_ONLY
from edge.runtime import Runtime
from edge.driver_factory import FACTORIES, driver_options
from edge.systemd_supervisor import Notifier
from receiver import provision as pv
from simulator.broker import free_port

EDGE = str(Path(sys.executable).with_name("edge"))
SERIAL = "202123456"
SHEET = {"we_e_mv": 295.0, "ae_e_mv": 300.0, "we_o_mv": 5.0, "ae_o_mv": 3.0,
         "sensitivity_na_per_ppb": -0.3, "gain_mv_per_na": -0.73}  # fmt: skip


def base(data_dir: Path, port: int) -> dict[str, Any]:
    """A valid simulated van: what every bad case below is laid over."""
    return {
        "device": {"id": "van-schema", "data_dir": str(data_dir)},
        "uplink": {"host": "127.0.0.1", "port": port},
        "simulation": {"enabled": True, "speedup": 20.0},
        "sensors": {"pm": {"driver": "sim-pm"}, "gps": {"driver": "sim-gps"}},
    }


# (id, patch laid over base(), the key named, a fragment of the problem). "@SHEET@" is a
# calibration file holding SERIAL's sheet; "@NOFILE@" a path that does not exist.
BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # The four reported: check said OK, run refused.
    ("no2-without-serial", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "calibration": SHEET}}},
     "sensors.no2.serial", "required"),
    ("no2-without-calibration", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": SERIAL}}},
     "sensors.no2.calibration_file", "required: the sensor's calibration sheet"),
    ("pm-prot", {"sensors": {"pm2": {"driver": "pms5003", "prot": "/dev/ttyUSB0"}}},
     "sensors.pm2.prot", "did you mean 'port'?"),
    ("pm-pasive", {"sensors": {"pm2": {"driver": "pms5003", "port": "/dev/ttyUSB0", "mode": "pasive"}}},
     "sensors.pm2.mode", "did you mean 'passive'? one of 'active', 'passive'"),
    # Filesystem: the calibration file must exist, parse and hold the serial.
    ("no2-sheet-missing", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": SERIAL,
                                               "calibration_file": "@NOFILE@"}}},
     "sensors.no2.calibration_file", "no such file: "),
    ("no2-sheet-other-serial", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": "999",
                                                    "calibration_file": "@SHEET@"}}},
     "sensors.no2.serial", f"no calibration for 999 in "),
    ("no2-sheet-incomplete", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": SERIAL,
                                                  "calibration": {"we_e_mv": 1.0}}}},
     "sensors.no2.calibration", "missing"),
    ("uplink-ca-missing", {"uplink": {"ca_file": "@NOFILE@"}}, "uplink.ca_file", "no such file: "),
    # A typo in every section (and in a section's name).
    ("device-typo", {"device": {"idd": "van-1"}}, "device.idd", "did you mean 'id'?"),
    ("sampling-typo", {"sampling": {"rate_hs": 2.0}}, "sampling.rate_hs", "did you mean 'rate_hz'?"),
    ("time-typo", {"time": {"gps_valid": 60.0}}, "time.gps_valid", "did you mean 'gps_valid_s'?"),
    ("batch-typo", {"batch": {"max_sample": 10}}, "batch.max_sample", "did you mean 'max_samples'?"),
    ("buffer-typo", {"buffer": {"max_byte": 10_000_000}}, "buffer.max_byte", "did you mean 'max_bytes'?"),
    ("uplink-typo", {"uplink": {"prot": 1883}}, "uplink.prot", "did you mean 'port'?"),
    ("simulation-typo", {"simulation": {"speedupp": 3.0}}, "simulation.speedupp", "did you mean 'speedup'?"),
    ("power-typo", {"power": {"ignition_pn": 17}}, "power.ignition_pn", "did you mean 'ignition_pin'?"),
    ("panel-typo", {"panel": {"button_pn": 5}}, "panel.button_pn", "did you mean 'button_pin'?"),
    ("section-typo", {"sampeling": {"rate_hz": 2.0}}, "sampeling", "did you mean 'sampling'?"),
    ("gps-typo", {"sensors": {"gps2": {"driver": "nmea-gps", "port": "/dev/ttyACM0", "single_sentance": True}}},
     "sensors.gps2.single_sentance", "did you mean 'single_sentence'?"),
    ("driver-typo", {"sensors": {"pm2": {"driver": "pms5300", "port": "/dev/ttyUSB0"}}},
     "sensors.pm2.driver", "did you mean 'pms5003'?"),
    # Wrong types.
    ("rate-text", {"sampling": {"rate_hz": "fast"}}, "sampling.rate_hz", "expected a number"),
    ("tls-text", {"uplink": {"tls": "yes"}}, "uplink.tls", "expected true or false"),
    ("max-samples-float", {"batch": {"max_samples": 1.5}}, "batch.max_samples", "expected a whole number"),
    ("serial-number", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": 202123456,
                                           "calibration": SHEET}}},
     "sensors.no2.serial", 'write it in quotes, "202123456"'),
    ("single-sentence-text", {"sensors": {"gps2": {"driver": "nmea-gps", "port": "/dev/ttyACM0",
                                                   "single_sentence": "yes"}}},
     "sensors.gps2.single_sentence", "expected true or false"),
    ("bus-text", {"sensors": {"noise": {"driver": "sound-module", "bus": "one"}}},
     "sensors.noise.bus", "an I2C bus number such as 1, or 'sim'"),
    # Out of range, just past each edge (the edges themselves pass: GOOD below).
    ("rate-zero", {"sampling": {"rate_hz": 0}}, "sampling.rate_hz", "must be above 0 and at most 50"),
    ("rate-over", {"sampling": {"rate_hz": 50.5}}, "sampling.rate_hz", "must be above 0 and at most 50"),
    ("keepalive-under", {"uplink": {"keepalive_s": 4}}, "uplink.keepalive_s", "between 5 and 65535"),
    ("window-over", {"uplink": {"window": 1001}}, "uplink.window", "between 1 and 1000"),
    ("max-samples-over", {"batch": {"max_samples": 20_001}}, "batch.max_samples", "between 1 and 20000"),
    ("reserve-over-cap", {"buffer": {"max_bytes": 2_000_000, "reserve_bytes": 2_000_000}},
     "buffer.reserve_bytes", "below buffer.max_bytes"),
    ("duty-measure-over", {"power": {"duty_every_s": 60.0, "duty_measure_s": 61.0}},
     "power.duty_measure_s", "at most power.duty_every_s"),
    ("pin-28", {"panel": {"fault_led_pin": 28}}, "panel.fault_led_pin", "0-27"),
    ("pin-twice", {"power": {"ignition_pin": 17}, "panel": {"button_pin": 17}}, "panel.button_pin", "GPIO17 is already"),
    ("collect-over", {"sensors": {"gps2": {"driver": "nmea-gps", "port": "/dev/ttyACM0", "collect_s": 1.5}}},
     "sensors.gps2.collect_s", "above 0 and at most 1"),
    ("fsr-not-pga", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": SERIAL, "calibration": SHEET,
                                         "fsr_v": 5.0}}},
     "sensors.no2.fsr_v", "one of 0.256, 0.512"),
    ("no2-address", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": SERIAL, "calibration": SHEET,
                                         "address": 0x50}}},
     "sensors.no2.address", "between 72 and 75 (0x48..0x4b)"),
    ("no2-channels-same", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": SERIAL,
                                               "calibration": SHEET, "ae_channel": "AIN0"}}},
     "sensors.no2.ae_channel", "must differ"),
    ("averaging-zero", {"sensors": {"noise": {"driver": "sound-module", "bus": 1, "averaging_ms": 0}}},
     "sensors.noise.averaging_ms", "between 1 and 65535"),
    ("mic-sensitivity", {"sensors": {"mic": {"driver": "microphone", "sensitivity_dbfs": 3.0}}},
     "sensors.mic.sensitivity_dbfs", "between -80 and 0"),
    ("weighting", {"sensors": {"noise": {"driver": "sound-module", "bus": 1, "weighting": "B"}}},
     "sensors.noise.weighting", "one of 'Z', 'A', 'C'"),
    ("baud", {"sensors": {"pm2": {"driver": "sps30", "port": "/dev/ttyUSB0", "baudrate": 115201}}},
     "sensors.pm2.baudrate", "one of 1200"),
    ("sim-devices", {"simulation": {"devices": "hw"}}, "simulation.devices", "one of 'values', 'hardware'"),
    ("start-no-offset", {"simulation": {"start_utc": "2026-11-26T07:00:00"}}, "simulation.start_utc",
     "needs a UTC offset"),
    # What only a simulated van can build: refused by check as by run.
    ("sim-port-without-hardware", {"sensors": {"pm2": {"driver": "pms5003", "port": "sim:pm"}}},
     "sensors.pm2.port", "needs simulated hardware"),
    ("reserved-name", {"sensors": {"calibration": {"driver": "sim-pm"}}}, "sensors.calibration", "reserved"),
    # Issue 16 re-test: paths that crashed check or run (exit 1, a traceback) instead of naming the key.
    ("ca-file-too-long", {"uplink": {"ca_file": "x" * 300}}, "uplink.ca_file", "cannot use this path: File name too long"),
    ("cert-file-too-long", {"uplink": {"cert_file": "x" * 300}}, "uplink.cert_file", "cannot use this path"),
    ("key-file-too-long", {"uplink": {"key_file": "x" * 300}}, "uplink.key_file", "cannot use this path"),
    ("no2-sheet-too-long", {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": SERIAL,
                                                "calibration_file": "y" * 300}}},
     "sensors.no2.calibration_file", "cannot use this path"),
    ("data-dir-a-file", {"device": {"data_dir": "/etc/passwd"}}, "device.data_dir", "not a directory: /etc/passwd"),
    ("data-dir-in-proc", {"device": {"data_dir": "/proc/datalab-v16"}}, "device.data_dir", "cannot be created"),
    ("data-dir-name-too-long", {"device": {"data_dir": "/tmp/" + "d" * 300}}, "device.data_dir",
     "a folder name is longer than"),
    ("device-short-typo", {"device": {"di": "van-1"}}, "device.di", "did you mean 'id'?"),
    # Issue 16 re-test (attack v16, finding 1): check said OK, run crashed later (exit 1, a traceback).
    # @SHEET@ is a file that exists but is not PEM; @CA@/@CAKEY@ a real pair, @OTHERKEY@ another key.
    ("quarantine-under-a-file", {"buffer": {"quarantine_dir": "@SHEET@/q"}}, "buffer.quarantine_dir",
     "is not a directory"),
    ("tls-ca-not-pem", {"uplink": {"tls": True, "ca_file": "@SHEET@"}}, "uplink.ca_file", "not a PEM CA certificate"),
    ("tls-cert-not-pem", {"uplink": {"tls": True, "cert_file": "@SHEET@", "key_file": "@SHEET@"}},
     "uplink.cert_file", "not a PEM client certificate"),
    ("tls-key-not-pem", {"uplink": {"tls": True, "cert_file": "@CA@", "key_file": "@SHEET@"}},
     "uplink.key_file", "not the PEM private key of cert_file"),
    ("tls-key-other", {"uplink": {"tls": True, "ca_file": "@CA@", "cert_file": "@CA@", "key_file": "@OTHERKEY@"}},
     "uplink.key_file", "KEY_VALUES_MISMATCH"),
    ("tls-key-without-cert", {"uplink": {"tls": True, "key_file": "@CAKEY@"}}, "uplink.cert_file",
     "missing: key_file needs"),
    ("max-bytes-no-cap", {"buffer": {"max_bytes": 2**63 - 1}}, "buffer.max_bytes", "1 TiB"),
]

# Edge values that pass on every path.
GOOD: list[dict[str, Any]] = [
    {"sampling": {"rate_hz": 50}}, {"sampling": {"rate_hz": 0.001}}, {"uplink": {"keepalive_s": 5}},
    {"uplink": {"keepalive_s": 65535}}, {"uplink": {"window": 1000}}, {"batch": {"max_samples": 1}},
    {"batch": {"max_samples": 20_000}}, {"panel": {"fault_led_pin": 27}}, {"power": {"ignition_pin": 0}},
    {"power": {"duty_every_s": 60.0, "duty_measure_s": 60.0}}, {"buffer": {"max_bytes": 2**40}},
    {"uplink": {"tls": True, "ca_file": "@CA@", "cert_file": "@CA@", "key_file": "@CAKEY@"}},
    {"uplink": {"tls": False, "ca_file": "@SHEET@"}},  # not loaded without tls: as the uplink
    {"buffer": {"quarantine_dir": "@TMP@/q/new"}},
    {"sensors": {"gps2": {"driver": "nmea-gps", "port": "/dev/ttyACM0", "collect_s": 1.0}}},
    {"sensors": {"no2": {"driver": "no2-b43f", "bus": 1, "serial": SERIAL, "calibration_file": "@SHEET@",
                         "address": 0x4B, "fsr_v": 6.144}}},
]  # fmt: skip


def _fill(obj: Any, files: dict[str, Path]) -> Any:
    if isinstance(obj, dict):
        return {k: _fill(v, files) for k, v in obj.items()}
    if isinstance(obj, str):
        for mark, path in files.items():
            obj = obj.replace(mark, str(path))
    return obj


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A simulated van built from base(), not running: reload and remote requests go to it."""
    tmp = tmp_path_factory.mktemp("schema")
    sheet = tmp / "no2-calibration.toml"
    sheet.write_text(f'[no2.calibration."{SERIAL}"]\n' + "".join(f"{k} = {v}\n" for k, v in SHEET.items()))
    (tmp / "data").mkdir()
    pv.create_ca(tmp / "ca", days=2)  # real PEM files for the TLS cases
    pv.write_secret(tmp / "other.key", pv.generate_key())
    conf = tmp / "agent.toml"
    good = dump_toml(base(tmp / "data", free_port()))
    conf.write_text(good)
    cfg, svc = config_schema.load(conf)
    rt = Runtime(cfg, svc, config_path=conf, notifier=Notifier(""))
    yield {"tmp": tmp, "sheet": sheet, "conf": conf, "good": good, "rt": rt}
    rt.close()


def _doc(world: dict[str, Any], patch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    tmp = world["tmp"]
    patch = _fill(patch, {"@SHEET@": world["sheet"], "@NOFILE@": tmp / "no-such-sheet.toml", "@CA@": tmp / "ca/ca.crt",
                          "@CAKEY@": tmp / "ca/ca.key", "@OTHERKEY@": tmp / "other.key", "@TMP@": tmp})  # fmt: skip
    current = config_schema.read_toml(world["conf"])
    return merge(current, patch), patch


def _error(doc: dict[str, Any], key: str) -> ConfigError:
    errors = config_schema.validate(doc).errors
    found = [e for e in errors if e.key == key]
    assert found, f"no error for {key}: {errors}"
    return found[0]


def _reload_refused(world: dict[str, Any], caplog: pytest.LogCaptureFixture, text: str, line: str) -> None:
    """SIGHUP with ``text`` as the file: refused, the log says why by key, the van keeps its config."""
    rt: Runtime = world["rt"]
    before = rt.agent.cfg
    world["conf"].write_text(text)
    try:
        with caplog.at_level(logging.ERROR, logger="edge.runtime"):
            assert rt.reload() is None
    finally:
        world["conf"].write_text(world["good"])
    assert rt.agent.cfg is before
    assert line in caplog.text and "keeping the running configuration" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("case, patch, key, fragment", BAD, ids=[c[0] for c in BAD])
def test_bad_config_same_error_from_check_reload_and_remote(world, caplog, case, patch, key, fragment) -> None:
    doc, patch = _doc(world, patch)
    err = _error(doc, key)
    assert fragment in err.problem, err
    line = f"error: {err}"
    rt: Runtime = world["rt"]
    before = rt.agent.cfg

    # edge config check: exit 2, the error by key.
    bad = world["tmp"] / f"{case}.toml"
    bad.write_text(dump_toml(doc))
    r = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert r.exit_code == 2 and line in r.output, r.output

    # SIGHUP: the running configuration is kept and the log says why, by the same words.
    _reload_refused(world, caplog, dump_toml(doc), f"reload: {err}")

    # Remote configuration: refused with the same key and problem (a local-only key is refused
    # as such: a remote request may not set it at all).
    req = decode_request(json.dumps({"id": f"r-{case}", "mode": "merge", "config": patch}).encode())
    result = rt.apply_remote(req)
    assert not result.ok and result.status == "refused"
    assert rt.agent.cfg is before and world["conf"].read_text() == world["good"]
    by_key = {e["key"]: e["problem"] for e in result.errors}
    assert key in by_key, result.errors
    local_only = tuple(key.split(".")) in LOCAL_ONLY or key.endswith(".calibration_file")
    assert by_key[key] == err.problem or (local_only and "local-only" in by_key[key]), by_key[key]


# The four reported, and one of each other kind: `edge run` is a process each (about a second of
# CPU to start), so the whole table runs under --run-slow.
RUN_SAMPLE = ("no2-without-serial", "no2-without-calibration", "pm-prot", "pm-pasive", "no2-sheet-missing",
              "panel-typo", "tls-text", "keepalive-under", "sim-port-without-hardware", "ca-file-too-long",
              "data-dir-a-file", "data-dir-in-proc", "data-dir-name-too-long", "quarantine-under-a-file",
              "tls-ca-not-pem", "tls-cert-not-pem", "tls-key-other")  # fmt: skip


def test_edge_run_exits_2_with_the_same_errors(world) -> None:
    """`edge run` as systemd starts it (a subprocess): exit 2, the same error lines as check,
    before any device is opened (no buffer file is made)."""
    _run_cases(world, [c for c in BAD if c[0] in RUN_SAMPLE])


@pytest.mark.slow
def test_edge_run_exits_2_with_the_same_errors_whole_table(world) -> None:
    _run_cases(world, BAD)


def _run_cases(world: dict[str, Any], cases: list[tuple[str, dict[str, Any], str, str]]) -> None:
    assert cases
    procs = []
    for case, patch, key, _ in cases:
        doc, _ = _doc(world, patch)
        if "data_dir" not in patch.get("device", {}):  # the data-dir cases test their own
            doc["device"]["data_dir"] = str(world["tmp"] / f"run-{case}")
        path = world["tmp"] / f"run-{case}.toml"
        path.write_text(dump_toml(doc))
        procs.append((case, key, f"error: {_error(doc, key)}", doc,
                      subprocess.Popen([EDGE, "run", "--config", str(path)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)))  # fmt: skip
        while sum(p.poll() is None for *_, p in procs) >= 4:  # 2 shared cores: a few at a time
            time.sleep(0.05)
    for case, key, line, doc, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (case, err[-2000:])
        assert line in err, (case, err[-2000:])
        if "data_dir" not in doc["device"] or len(doc["device"]["data_dir"]) < 255:
            assert not (Path(doc["device"]["data_dir"]) / "buffer.sqlite").exists(), case


@pytest.mark.parametrize("patch", GOOD)
def test_edge_values_pass_check_and_the_run_schema(world, patch) -> None:
    doc, _ = _doc(world, patch)
    assert config_schema.validate(doc).errors == []
    path = world["tmp"] / "edge.toml"
    path.write_text(dump_toml(doc))
    r = CliRunner().invoke(main, ["config", "check", str(path)])
    assert r.exit_code == 0, r.output
    cfg, _ = config_schema.load(path)  # what `edge run` loads
    assert [s.name for s in cfg.sensors] == list(doc["sensors"])


def test_all_errors_at_once_and_missing_file(tmp_path: Path) -> None:
    doc = {"sampling": {"rate_hz": 0, "commit_interval_s": "5"}, "uplink": {"prot": 1},
           "sensors": {"pm": {"driver": "pms5003", "prot": "/dev/ttyUSB0", "mode": "pasive"}}}  # fmt: skip
    keys = [e.key for e in config_schema.validate(doc).errors]
    assert set(keys) == {"sampling.rate_hz", "sampling.commit_interval_s", "uplink.prot", "sensors.pm.prot",
                         "sensors.pm.mode", "sensors.pm.port"}  # fmt: skip
    with pytest.raises(ConfigInvalid) as exc:
        config_schema.parse(doc)
    assert [e.key for e in exc.value.errors] == keys and "6 configuration errors" in str(exc.value)
    missing = tmp_path / "nowhere" / "agent.toml"
    for args in (["config", "check", str(missing)], ["run", "--config", str(missing)]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and f"cannot read {missing}" in r.output, r.output


def test_a_secret_is_never_in_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("[uplink]\npassword = 98765432\n")  # a number: an error, but not shown
    for args in (["config", "check", str(bad)], ["run", "--config", str(bad)]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "uplink.password" in r.output and "98765432" not in r.output, r.output


def test_every_key_and_driver_is_declared() -> None:
    """A new setting or driver without a declaration would go unchecked."""
    from edge.config import AGENT_SECTIONS

    declared = config_schema.declared_keys()
    defaults = AgentConfig()
    for name in AGENT_SECTIONS:
        assert declared[name] == tuple(f.name for f in fields(getattr(defaults, name))), name
    assert declared["power"] == tuple(f.name for f in fields(PowerConfig))
    assert declared["panel"] == tuple(f.name for f in fields(PanelConfig))
    for driver in FACTORIES:
        assert driver_options(driver) is not None, driver
    assert driver_options("pms9999") is None


def test_the_example_and_the_configs_the_repo_writes_pass(tmp_path: Path) -> None:
    from simulator.fleet import van_config
    from tests.test_remote_config import _conf
    from tests.test_service import sim_toml

    example = tmp_path / "example.toml"
    example.write_text(resources.files("edge").joinpath("config.example.toml").read_text())
    shipped = [example]
    for i, (devices, noise) in enumerate([("hardware", "module"), ("hardware", "microphone"), ("values", "module")]):
        p = tmp_path / f"fleet-{i}.toml"
        p.write_text(van_config(f"van-{i}", tmp_path / f"d{i}", 1883, seed=i, hours=1.0, offset_m=0.0,
                                start_utc="2026-11-26T07:00:00+01:00", devices=devices, noise=noise))  # fmt: skip
        shipped.append(p)
    for name, text in (("service.toml", sim_toml(tmp_path)), ("remote.toml", _conf(tmp_path, 1883))):
        (tmp_path / name).write_text(text)
        shipped.append(tmp_path / name)
    for p in shipped:
        r = CliRunner().invoke(main, ["config", "check", str(p)])
        assert r.exit_code == 0, (p.name, r.output)
        assert config_schema.check_file(p).errors == [], p.name  # what `edge run` checks


def test_sighup_to_edge_run_keeps_running_on_a_bad_file(tmp_path: Path) -> None:
    """The real signal to the real process: a bad reload is logged by key, the agent keeps
    running, and stops cleanly (exit 0) afterwards."""
    from tests.test_service import sim_toml

    (tmp_path / "data").mkdir()
    conf = tmp_path / "agent.toml"
    conf.write_text(sim_toml(tmp_path / "data", speedup=5))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([EDGE, "run", "--config", str(conf)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "data" / "buffer.sqlite").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.poll() is None
        time.sleep(1.0)  # past start: the signal handlers are installed
        doc = config_schema.read_toml(conf)
        doc["sensors"]["pm2"] = {"driver": "pms5003", "port": "/dev/ttyUSB0", "mode": "pasive"}
        conf.write_text(dump_toml(doc))
        expected = f"reload: {_error(doc, 'sensors.pm2.mode')}"
        p.send_signal(signal.SIGHUP)
        time.sleep(3.0)
        assert p.poll() is None, "a bad reload must not stop the agent"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err[-3000:]
    assert expected in err, err[-3000:]


# A van installed without the simulator (`.[device]`): no entry point at all, or the entry point
# left behind with the package gone. Each run in a fresh interpreter, as the console script runs.
_NO_SIMULATOR = {
    "no-entry-point": "import importlib.metadata as m; m.entry_points = lambda **kw: []",
    "package-gone": "import sys; sys.modules['simulator'] = None",
}


@pytest.mark.parametrize("how", list(_NO_SIMULATOR))
def test_check_refuses_a_simulated_van_without_the_simulator_as_run_does(tmp_path: Path, how: str) -> None:
    conf = tmp_path / "sim.toml"
    conf.write_text(dump_toml(base(tmp_path / "data", free_port())))
    outs = {}
    for args in (["config", "check", str(conf)], ["run", "--config", str(conf)]):
        code = f"{_NO_SIMULATOR[how]}\nfrom edge.cli import main\nmain({args!r})"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, p.stderr[-2000:]
        outs[args[0]] = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert outs["config"] == outs["run"] and len(outs["config"]) == 1, outs
    assert outs["config"][0].startswith("error: config key 'simulation.enabled': simulation needs the simulator"), outs
    assert not (tmp_path / "data" / "buffer.sqlite").exists()


def test_check_of_a_directory_is_a_named_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["config", "check", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.output, r.output


def test_a_file_must_name_its_van(world, tmp_path: Path, caplog) -> None:
    """Attack v16: an empty agent.toml ran as the example's "van-001" (every van with a lost
    file the same device). A file without device.id is refused by check, run and SIGHUP."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    no_id = tmp_path / "no-id.toml"
    doc = config_schema.read_toml(world["conf"])
    del doc["device"]["id"]
    no_id.write_text(dump_toml(doc))
    for path in (empty, no_id):
        for args in (["config", "check", str(path)], ["run", "--config", str(path)]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 2 and "error: config key 'device.id': missing: name this van" in r.output, r.output
    _reload_refused(world, caplog, no_id.read_text(), "reload: config key 'device.id'")
    # A config built in code (tests, benches, the simulator) keeps the default id.
    assert config_schema.parse({}, runnable=False)[0].device.id == "van-001"


def test_a_start_up_failure_the_check_could_not_see_is_a_config_error(tmp_path: Path) -> None:
    """The quarantine folder became a file after the check (attack v16, finding 1): the first
    corrupt buffer at start raised NotADirectoryError (exit 1, a traceback, a systemd restart
    loop). Now a ConfigError naming the cause, which `edge run` prints in one line, exit 2."""
    from dataclasses import replace

    from edge.runtime import run_agent

    data = tmp_path / "data"
    data.mkdir()
    cfg, svc = config_schema.parse(base(data, free_port()))
    (data / "buffer.sqlite").write_bytes(b"garbage garbage!" * 512)  # quarantined at open
    (tmp_path / "afile").write_text("x")
    cfg = replace(cfg, buffer=replace(cfg.buffer, quarantine_dir=str(tmp_path / "afile" / "q")))
    with pytest.raises(ConfigError) as exc:
        run_agent(cfg, svc=svc)
    assert exc.value.key == "<start-up>" and "Not a directory" in exc.value.problem, exc.value
    assert (data / "buffer.sqlite").read_bytes()[:16] == b"garbage garbage!"  # nothing lost
