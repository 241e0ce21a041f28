"""Agent configuration: a TOML file over documented defaults.

Every key has a default (see ``config.example.toml``, which is generated from
nothing: it is the documentation and is checked against these defaults by the
tests). An invalid value stops the agent at start with a ``ConfigError`` that
names the key and the problem.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.device_id import DEVICE_ID_RE  # shared with the receiver's provisioning
from core.errors import ConfigError
# The receiver refuses a sensor name longer than this (receiver/validate.py check_name, which
# also refuses non-printable characters): the whole batch, GPS and all, would be lost.
from core.wire import MAX_NAME_CHARS

# Section names with a meaning of their own at the receiver (receiver/validate.py, store.py,
# aggregate.py NOT_MEASUREMENTS): the track is built from the samples of sensor "gps" (the
# position drivers label theirs "gps" whatever their section), and calibration records travel
# as samples of sensor "calibration" (core/calibration.py CALIBRATION_SENSOR). Another
# driver's values under these names would never reach a map.
GPS_SECTION = "gps"
GPS_DRIVERS = ("nmea-gps", "gpsd", "sim-gps")
CALIBRATION_SECTION = "calibration"


@dataclass(slots=True)
class DeviceConfig:
    id: str = "van-001"
    data_dir: str = "/var/lib/datalab-edge"


@dataclass(slots=True)
class SamplingConfig:
    rate_hz: float = 1.0
    # How often samples are committed to the SD card: each commit is one fsync,
    # and at most this much is lost on a sudden power cut.
    commit_interval_s: float = 5.0


@dataclass(slots=True)
class TimeConfig:
    # A GPS time fix keeps stamps on GPS time for this long (monotonic clock drift is tiny).
    gps_valid_s: float = 3600.0
    # Samples stamped before the clock was trusted wait this long for GPS or NTP time to
    # correct them, then go out flagged "unsync".
    hold_unsync_s: float = 3600.0
    # A GPS or system clock step larger than this is judged against the monotonic clock
    # (core/timekeeping.py); smaller ones are followed by slewing.
    step_tolerance_s: float = 2.0
    # A step nothing else can confirm or refute is believed after this long; the samples of
    # the wait are flagged clock_step.
    step_confirm_s: float = 60.0
    # The GPS receiver's output latency (its epoch's first byte after the second it names):
    # gps_minus_ntp_ms is expected near minus this; further off by 0.25 s for a minute, the
    # heartbeat says gps_time_disagrees (core/timekeeping.py).
    gps_latency_s: float = 0.0


@dataclass(slots=True)
class BatchConfig:
    max_samples: int = 2000
    max_age_s: float = 60.0


@dataclass(slots=True)
class BufferConfig:
    # Cap on the buffer's size on the card. When reached, the oldest data is dropped
    # and a gap record says which sequence range and why (it is uploaded too).
    max_bytes: int = 256 * 1024 * 1024
    wal_autocheckpoint: int = 1000  # pages between WAL checkpoints
    # Spare space given up when the disk is full, so data can still be checkpointed or dropped.
    reserve_bytes: int = 8 * 1024 * 1024
    check_on_open: bool = True  # PRAGMA quick_check at start; a corrupt file is quarantined
    quarantine_dir: str = ""  # "" = <data_dir>/quarantine


@dataclass(slots=True)
class UplinkConfig:
    host: str = "localhost"
    port: int = 1883
    topic_prefix: str = "datalab/v1"
    username: str = ""
    password: str = ""  # secret: never logged
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = 30
    window: int = 8  # batches published and not yet acknowledged by the receiver
    ack_timeout_s: float = 30.0  # re-send (same batch id) after this long without an ack
    # Reconnect delays: full jitter between 0 and min(max, min * 2^attempt) seconds. The cap is
    # short so a van is back within 3 s of a broker's return (issue 14, 5: first sample stored
    # within 5 s); the fleet's arrival spread this gives is in uplink/backoff.py.
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 3.0
    heartbeat_s: float = 60.0  # retained status message (backlog, sensor health, disk ...)


@dataclass(slots=True)
class SensorConfig:
    """One sensor: which driver, and the driver's own options."""

    name: str
    driver: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SimulationConfig:
    """Only for simulated vans: the route, the seed and the accelerated clock."""

    enabled: bool = False
    seed: int = 1
    start_utc: str = "2026-11-26T07:00:00+01:00"
    shift_hours: float = 8.0
    speedup: float = 0.0  # 0 = as fast as possible
    start_offset_m: float = 0.0
    # The Pi boots with a stale clock off by this much, until NTP syncs after ntp_after_s.
    boot_clock_error_s: float = 0.0
    ntp_after_s: float = 0.0
    # "hardware": byte- and register-level simulated devices under the real drivers
    # (sensors then name port = "sim:pm", bus = "sim", device = "sim");
    # "values": only the value-level sim-* drivers.
    devices: str = "values"
    # Simulated hardware: noise from the I2C "module" or the I2S "microphone" (48 kHz DSP).
    noise: str = "module"
    gps_corrupt_prob: float = 0.0
    pm_corrupt_prob: float = 0.0


@dataclass(slots=True)
class AgentConfig:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    time: TimeConfig = field(default_factory=TimeConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    sensors: list[SensorConfig] = field(default_factory=list)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    source: str = "<defaults>"

    @property
    def buffer_path(self) -> Path:
        return Path(self.device.data_dir) / "buffer.sqlite"


_SECTIONS = {
    "device": DeviceConfig,
    "sampling": SamplingConfig,
    "time": TimeConfig,
    "batch": BatchConfig,
    "buffer": BufferConfig,
    "uplink": UplinkConfig,
    "simulation": SimulationConfig,
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a value against the type of its default; ints are accepted for floats."""
    expected = type(default)
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected a whole number, got {value!r}")
        return value
    if not isinstance(value, expected):
        raise ConfigError(key, f"expected {expected.__name__}, got {value!r}")
    return value


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(name, "expected a table")
    obj = cls()
    known = {f.name for f in fields(cls)}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in known:
            raise ConfigError(full, f"unknown key (known: {', '.join(sorted(known))})")
        setattr(obj, key, _coerce(full, value, getattr(obj, key)))
    return obj


def _validate(cfg: AgentConfig) -> None:
    # TOML has nan and inf: no bound below can be trusted with them (nan compares false).
    for name in _SECTIONS:
        sec = getattr(cfg, name)
        for f in fields(sec):
            v = getattr(sec, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}.{f.name}", f"must be a finite number, not {v!r}")
    if not DEVICE_ID_RE.fullmatch(cfg.device.id):
        raise ConfigError(
            "device.id", "1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    if not 0 < cfg.sampling.rate_hz <= 50:
        raise ConfigError("sampling.rate_hz", "must be above 0 and at most 50")
    if not 0.1 <= cfg.sampling.commit_interval_s <= 60:
        raise ConfigError("sampling.commit_interval_s", "must be between 0.1 and 60 seconds")
    if cfg.time.gps_valid_s <= 0:
        raise ConfigError("time.gps_valid_s", "must be above 0")
    if cfg.time.hold_unsync_s < 0:
        raise ConfigError("time.hold_unsync_s", "must be 0 or more")
    if not 0.1 <= cfg.time.step_tolerance_s <= 3600:
        raise ConfigError("time.step_tolerance_s", "must be between 0.1 and 3600 seconds")
    if cfg.time.step_confirm_s < 0:
        raise ConfigError("time.step_confirm_s", "must be 0 or more")
    if not 0 <= cfg.time.gps_latency_s <= 1:
        raise ConfigError("time.gps_latency_s", "must be between 0 and 1 second")
    if not 1 <= cfg.batch.max_samples <= 20_000:  # core/wire.py MAX_SAMPLES_PER_BATCH
        raise ConfigError("batch.max_samples", "must be between 1 and 20000")
    if not 0 < cfg.batch.max_age_s <= 86400:
        raise ConfigError("batch.max_age_s", "must be above 0 and at most 86400 seconds")
    if cfg.buffer.max_bytes < 1024 * 1024:
        raise ConfigError("buffer.max_bytes", "must be at least 1 MiB (1048576)")
    if cfg.buffer.reserve_bytes < 0 or cfg.buffer.reserve_bytes >= cfg.buffer.max_bytes:
        raise ConfigError("buffer.reserve_bytes", "must be 0 or more and below buffer.max_bytes")
    if not 1 <= cfg.buffer.wal_autocheckpoint <= 1_000_000:
        raise ConfigError("buffer.wal_autocheckpoint", "must be between 1 and 1000000 pages")
    if not 1 <= cfg.uplink.port <= 65535:
        raise ConfigError("uplink.port", "must be a TCP port, 1-65535")
    if not 1 <= cfg.uplink.window <= 1000:
        raise ConfigError("uplink.window", "must be between 1 and 1000")
    # Bounds that keep a van reachable, also against a remote change (issue 13, 7.3): MQTT's
    # keepalive is 16 bits (0 would switch it off: a dead link is never noticed), and an
    # ack timeout or reconnect delay of milliseconds turns into a re-send / reconnect storm.
    if not 5 <= cfg.uplink.keepalive_s <= 65535:
        raise ConfigError("uplink.keepalive_s", "must be between 5 and 65535 seconds (MQTT's range)")
    if not 0.05 <= cfg.uplink.reconnect_min_s <= cfg.uplink.reconnect_max_s:
        raise ConfigError("uplink.reconnect_min_s", "must be at least 0.05 s and at most reconnect_max_s")
    if cfg.uplink.reconnect_max_s > 3600:
        raise ConfigError("uplink.reconnect_max_s", "must be at most 3600 seconds")
    if not 1 <= cfg.uplink.heartbeat_s <= 3600:
        raise ConfigError("uplink.heartbeat_s", "must be between 1 and 3600 seconds")
    if not 1 <= cfg.uplink.ack_timeout_s <= 3600:
        raise ConfigError("uplink.ack_timeout_s", "must be between 1 and 3600 seconds")
    if not cfg.uplink.topic_prefix or any(c in cfg.uplink.topic_prefix for c in "#+"):
        raise ConfigError("uplink.topic_prefix", "must be a topic without wildcards")
    for f in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg.uplink, f)
        if path and not Path(path).is_file():
            raise ConfigError(f"uplink.{f}", f"no such file: {path}")
    if cfg.simulation.devices not in ("values", "hardware"):
        raise ConfigError("simulation.devices", "must be 'values' or 'hardware'")
    if cfg.simulation.noise not in ("module", "microphone"):
        raise ConfigError("simulation.noise", "must be 'module' or 'microphone'")
    for key in ("gps_corrupt_prob", "pm_corrupt_prob"):
        if not 0.0 <= getattr(cfg.simulation, key) <= 1.0:
            raise ConfigError(f"simulation.{key}", "must be a probability, 0 to 1")
    if not 0 < cfg.simulation.shift_hours <= 24 * 366:
        raise ConfigError("simulation.shift_hours", "must be above 0 and at most a year")
    for key in ("speedup", "start_offset_m", "ntp_after_s"):
        if getattr(cfg.simulation, key) < 0:
            raise ConfigError(f"simulation.{key}", "must be 0 or more")
    names = [s.name for s in cfg.sensors]
    if len(set(names)) != len(names):
        raise ConfigError("sensors", "sensor names must be unique")
    for sc in cfg.sensors:
        check_sensor_table(sc)


def check_sensor_table(sc: SensorConfig) -> None:
    """A [sensors.NAME] the receiver accepts, that does not hide the values under a reserved name,
    and whose ``serial`` (the key calibration records are found by) is text."""
    serial = sc.options.get("serial")
    if serial is not None and not isinstance(serial, str):
        # TOML `serial = 0` is an integer: it would lose leading zeros, and 0 was taken as "none".
        raise ConfigError(f"sensors.{sc.name}.serial",
                          f"a serial is text: write it in quotes, serial = \"{serial}\"")
    key = f"sensors.{sc.name}"
    if not sc.name or len(sc.name) > MAX_NAME_CHARS:
        raise ConfigError(key, f"a sensor name has 1 to {MAX_NAME_CHARS} characters (the receiver refuses longer ones)")
    if not sc.name.isprintable():
        raise ConfigError(f"sensors.{sc.name!r}", "a sensor name cannot hold tabs, newlines or other control characters")
    if sc.name == CALIBRATION_SECTION:
        raise ConfigError(key, "'calibration' is reserved for calibration records: choose another name")
    if sc.name == GPS_SECTION and sc.driver not in GPS_DRIVERS:
        raise ConfigError(key, f"'gps' is reserved for a position driver ({', '.join(GPS_DRIVERS)}): "
                               f"name the {sc.driver!r} section otherwise")


def parse_config(data: dict[str, Any], source: str = "<dict>") -> AgentConfig:
    cfg = AgentConfig(source=source)
    for key, raw in data.items():
        if key == "sensors":
            if not isinstance(raw, dict):
                raise ConfigError("sensors", "expected a table of [sensors.NAME] tables")
            for sname, sraw in raw.items():
                if not isinstance(sraw, dict):
                    raise ConfigError(f"sensors.{sname}", "expected a table")
                if "driver" not in sraw or not isinstance(sraw["driver"], str):
                    raise ConfigError(f"sensors.{sname}.driver", "missing: name the driver")
                options = {k: v for k, v in sraw.items() if k != "driver"}
                cfg.sensors.append(SensorConfig(sname, sraw["driver"], options))
        elif key in _SECTIONS:
            setattr(cfg, key, _section(key, _SECTIONS[key], raw))
        else:
            raise ConfigError(key, f"unknown section (known: {', '.join([*_SECTIONS, 'sensors'])})")
    _validate(cfg)
    return cfg


def load_config(path: str | Path) -> AgentConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {p}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", f"{p} is not valid TOML: {exc}") from exc
    return parse_config(data, source=str(p))


def redacted(cfg: AgentConfig) -> dict[str, Any]:
    """The configuration as a dict fit for logs: secrets replaced."""
    out: dict[str, Any] = {}
    for name in _SECTIONS:
        sec = getattr(cfg, name)
        out[name] = {f.name: getattr(sec, f.name) for f in fields(sec)}
    if out["uplink"]["password"]:
        out["uplink"]["password"] = "***"
    out["sensors"] = {s.name: {"driver": s.driver, **s.options} for s in cfg.sensors}
    return out
