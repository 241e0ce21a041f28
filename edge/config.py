"""Agent configuration: a TOML file over documented defaults.

Every key has a default (see ``config.example.toml``, which is generated from
nothing: it is the documentation and is checked against these defaults by the
tests). The keys' types, bounds and rules are edge/config_schema.py's: an invalid
file stops the agent at start (exit 2) with every error named by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

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


# The agent's own sections (edge/power.py adds [power] and [panel]); their keys, bounds and
# rules are declared once, in edge/config_schema.py.
AGENT_SECTIONS = ("device", "sampling", "time", "batch", "buffer", "uplink", "simulation")


def parse_config(data: dict[str, Any], source: str = "<dict>") -> AgentConfig:
    """The configuration of a document, checked by the one schema (edge/config_schema.py);
    ``ConfigInvalid`` (a ``ConfigError``) naming every error otherwise.

    For library callers that bring their own simulated world (tests, benches): the rules
    about which van ``edge run`` can build (simulated parts need [simulation]) are left to
    the agent's entry points (``edge.config_schema.load``/``validate``).
    """
    from edge.config_schema import parse

    return parse(data, source, runnable=False)[0]


def load_config(path: str | Path) -> AgentConfig:
    """agent.toml read and checked like ``parse_config`` (the agent's entry points use
    ``edge.config_schema.load``, which adds what only a runnable van needs)."""
    from edge.config_schema import parse, read_toml

    return parse(read_toml(path), str(path), runnable=False)[0]


def redacted(cfg: AgentConfig) -> dict[str, Any]:
    """The configuration as a dict fit for logs: secrets replaced."""
    out: dict[str, Any] = {}
    for name in AGENT_SECTIONS:
        sec = getattr(cfg, name)
        out[name] = {f.name: getattr(sec, f.name) for f in fields(sec)}
    if out["uplink"]["password"]:
        out["uplink"]["password"] = "***"
    out["sensors"] = {s.name: {"driver": s.driver, **s.options} for s in cfg.sensors}
    return out
