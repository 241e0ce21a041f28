import tomllib
from dataclasses import fields
from importlib import resources

import pytest
from click.testing import CliRunner

from edge.cli import main
from edge.config import AgentConfig, load_config, parse_config, redacted
from core.errors import ConfigError


def test_example_file_documents_exactly_the_defaults():
    text = resources.files("edge").joinpath("config.example.toml").read_text()
    data = tomllib.loads(text)
    cfg = parse_config(data)
    defaults = AgentConfig()
    for section in ("device", "sampling", "batch", "uplink", "simulation"):
        got, want = getattr(cfg, section), getattr(defaults, section)
        assert {f.name for f in fields(want)} == set(data[section]), section
        for f in fields(want):
            assert getattr(got, f.name) == getattr(want, f.name), f"{section}.{f.name}"


@pytest.mark.parametrize(
    "data, key",
    [
        ({"sampling": {"rate_hz": 0}}, "sampling.rate_hz"),
        ({"sampling": {"rate_hz": "fast"}}, "sampling.rate_hz"),
        ({"uplink": {"port": 70000}}, "uplink.port"),
        ({"uplink": {"prot": 1883}}, "uplink.prot"),
        ({"device": {"id": "van 1/../x"}}, "device.id"),
        ({"uplink": {"tls": "yes"}}, "uplink.tls"),
        ({"uplink": {"ca_file": "/nonexistent/ca.pem"}}, "uplink.ca_file"),
        ({"sensors": {"pm": {"port": "/dev/ttyS0"}}}, "sensors.pm.driver"),
        ({"sensor": {}}, "sensor"),
    ],
)
def test_invalid_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert exc.value.key == key
    assert key in str(exc.value)


def test_unreadable_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[device\nid = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_redacted_hides_password():
    cfg = parse_config({"uplink": {"username": "van-007", "password": "hunter2"}})
    shown = redacted(cfg)
    assert shown["uplink"]["password"] == "***"
    assert "hunter2" not in repr(shown)


def test_cli_config_check(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[device]\nid = "van-042"\n[uplink]\npassword = "s3cret"\n')
    r = CliRunner().invoke(main, ["config", "check", str(good)])
    assert r.exit_code == 0, r.output
    assert "van-042" in r.output and "s3cret" not in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampling]\ncommit_interval_s = 3600\n")
    r = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert r.exit_code == 2  # a configuration error, as documented (docs/technician.md)
    assert "sampling.commit_interval_s" in r.output


def test_agent_refuses_to_start_on_bad_config(tmp_path):
    bad = tmp_path / "agent.toml"
    bad.write_text(f'[device]\ndata_dir = "{tmp_path}"\n[sensors.pm]\ndriver = "pms9999"\n')
    r = CliRunner().invoke(main, ["run", "--config", str(bad)])
    assert r.exit_code == 2
    assert "sensors.pm.driver" in r.output and "pms9999" in r.output


def test_device_id_with_a_trailing_newline_is_refused() -> None:
    """``$`` in a regex also matches before a final newline: "van-001\\n" passed (issue 13, 6.4).
    The id is an MQTT username, topic level and certificate CN: the whole string must match."""
    from edge.config import parse_config
    from core.errors import ConfigError
    from receiver.provision import ProvisionError, check_device_id

    assert check_device_id("van-001") == "van-001"
    for bad in ("van-001\n", "van-001\r\n", "\nvan-001", "van-001\n\n"):
        with pytest.raises(ProvisionError):
            check_device_id(bad)
        with pytest.raises(ConfigError, match="device.id"):
            parse_config({"device": {"id": bad}})


def test_config_check_bounds_and_measuring_sensor(tmp_path):
    """Issue 13, 7.3/7.4: the bounds a remote change goes through hold for a local file too
    (``edge config check`` refuses, each key named); a van with only a GPS is a warning here
    (a bench test), refused from afar (tests/test_remote_config.py)."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[uplink]\nkeepalive_s = -1\nack_timeout_s = 0.001\nheartbeat_s = 100000.0\nwindow = 0\n"
                   "reconnect_max_s = 1e9\n[sampling]\nrate_hz = nan\n[batch]\nmax_age_s = inf\n"
                   "[power]\nduty_every_s = inf\n")
    r = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert r.exit_code == 2
    for key in ("uplink.keepalive_s", "uplink.ack_timeout_s", "uplink.heartbeat_s", "uplink.window",
                "uplink.reconnect_max_s", "sampling.rate_hz", "batch.max_age_s", "power.duty_every_s"):
        assert key in r.output, (key, r.output)
    for ok in ({"keepalive_s": 5}, {"keepalive_s": 65535}, {"ack_timeout_s": 1}, {"heartbeat_s": 3600}):
        parse_config({"uplink": ok})
    with pytest.raises(ConfigError, match="keepalive_s"):
        parse_config({"uplink": {"keepalive_s": 65536}})

    gps_only = tmp_path / "gps.toml"
    gps_only.write_text(f'[device]\nid = "van-t"\ndata_dir = "{tmp_path}/d"\n'
                        '[sensors.gps]\ndriver = "nmea-gps"\nport = "/dev/serial0"\n')
    r = CliRunner().invoke(main, ["config", "check", str(gps_only)])
    assert r.exit_code == 0 and "warning: config key 'sensors': no PM, NO2 or noise sensor, only gps (nmea-gps)" in r.output
    measuring = tmp_path / "pm.toml"
    measuring.write_text(gps_only.read_text() + '[sensors.pm]\ndriver = "pms5003"\nport = "/dev/ttyUSB0"\n')
    r = CliRunner().invoke(main, ["config", "check", str(measuring)])
    assert r.exit_code == 0 and "no PM, NO2 or noise sensor" not in r.output


def test_every_driver_is_known_as_measuring_or_positioning():
    """A new driver must be placed: else a van with only it would pass or fail the sensor rule by accident."""
    from edge.remote_policy import MEASURING_DRIVERS, POSITION_DRIVERS
    from edge.driver_factory import FACTORIES

    assert set(FACTORIES) == MEASURING_DRIVERS | POSITION_DRIVERS
    assert not MEASURING_DRIVERS & POSITION_DRIVERS
