"""The one schema of agent.toml: every section and key, checked the same way everywhere.

``edge config check``, ``edge run`` (before any device is opened), a SIGHUP reload and a
remote configuration request all call ``validate``, so check and run cannot disagree:
the same document gives the same errors, each named by its key path
(``sensors.no2.port``) with a hint: a misspelt key names the right one, a value out of a
set lists the allowed ones, a missing file names its path. All errors at once, not only
the first.

What is declared where:

* the agent's sections below, as ``Option``s over the defaults of edge/config.py's
  dataclasses (``[power]`` and ``[panel]``: edge/power.py's), plus the rules between keys;
* each driver's options next to the driver (``OPTIONS`` in drivers/pms.py, no2.py ...,
  found through edge/driver_factory.py ``driver_options``), with their own rules: required-if
  (an NO2 sheet unless on the simulated bus), files that must exist and parse (the sheet,
  holding the sensor's serial);
* rules that need the whole document: a simulated part needs ``[simulation]``.

A missing device node (``/dev/ttyUSB0``, ``/dev/i2c-1``) is a warning, the same in check
and run, not an error: the serial drivers wait for a USB adapter plugged in later, and a
van refusing to start over it would lose every other sensor's data.

Plain dataclasses and a small validator (drivers/options.py) instead of a validation
library: nothing to import on the Pi beyond what the agent already loads.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from drivers.options import Option, Problem, check_table, unknown_key_text
from edge.config import (
    CALIBRATION_SECTION,
    GPS_DRIVERS,
    GPS_SECTION,
    AgentConfig,
    BatchConfig,
    BufferConfig,
    DeviceConfig,
    SamplingConfig,
    SensorConfig,
    SimulationConfig,
    TimeConfig,
    UplinkConfig,
)
from core.device_id import DEVICE_ID_RE
from core.errors import ConfigError, ConfigInvalid
from edge.power import NO_PIN, PanelConfig, PowerConfig, ServiceConfig
from core.wire import MAX_NAME_CHARS

Doc = dict[str, dict[str, Any]]  # section -> key -> value, every key merged over its default
DocRule = Callable[[Doc], Iterable[Problem]]  # problems keyed by full path


# -- value checks --------------------------------------------------------------------------------


def _device_id(v: str) -> str | None:
    # fullmatch: "$" alone would also accept a trailing newline.
    if DEVICE_ID_RE.fullmatch(v):
        return None
    return "1-63 letters, digits, '-' or '_', starting with a letter or digit"


def _not_empty(what: str) -> Callable[[str], str | None]:
    return lambda v: None if v.strip() else f"empty: {what}"


def _file(v: str) -> str | None:
    if not v:
        return None
    try:
        found = Path(v).is_file()
    except OSError as exc:  # ENAMETOOLONG, EACCES ...: a config error on the key, never a crash
        return f"cannot use this path: {exc.strerror or exc}"
    return None if found else f"no such file: {v}"


def _data_dir(v: str) -> str | None:
    """A folder the agent writes (the buffer's, the quarantine's): an existing writable directory, or one ``edge run`` can create.

    Checked here (not only when the buffer opens) so ``config check`` refuses what ``run``
    would crash on under systemd (a crash loop seen only in the journal): a file
    (/etc/passwd), a folder nothing can be created in (/proc/x), a name too long.
    """
    if not v.strip():
        return "empty: the buffer's folder"
    return _writable_dir(v)


def _quarantine_dir(v: str) -> str | None:
    """"" means <data_dir>/quarantine (checked with data_dir); else as data_dir.

    The quarantine is made only when a corrupt buffer is found at start, so a bad one
    would otherwise crash a van months later (a restart loop under systemd).
    """
    return _writable_dir(v) if v.strip() else None


def _writable_dir(v: str) -> str | None:
    p = Path(v)
    try:
        limit = os.pathconf("/", "PC_NAME_MAX")
        if any(len(os.fsencode(part)) > limit for part in p.parts):
            return f"a folder name is longer than {limit} bytes"
        if p.exists():
            if not p.is_dir():
                return f"not a directory: {v}"
            return None if os.access(p, os.W_OK | os.X_OK) else f"not writable: {v}"
        parent = p.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"cannot be created: {parent} is not a directory"
        # Try it: os.access says yes to root on /proc or a read-only mount, where mkdir fails.
        os.rmdir(tempfile.mkdtemp(prefix=".datalab-check-", dir=parent))
    except OSError as exc:
        return f"cannot be created: {exc.strerror or exc}"
    return None


# No van carries a larger card; a bigger value is a typo (2**63-1 would switch the cap off).
MAX_BUFFER_BYTES = 1 << 40  # 1 TiB


def _topic(v: str) -> str | None:
    return None if v and not any(c in v for c in "#+") else "must be a topic without wildcards"


def _iso_with_offset(v: str) -> str | None:
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        return f"not an ISO 8601 time with offset: {v!r}"
    return None if dt.tzinfo is not None else "needs a UTC offset, e.g. 2026-11-26T07:00:00+01:00"


def _pin(v: int) -> str | None:
    return None if v == NO_PIN or 0 <= v <= 27 else "a BCM GPIO number 0-27, or -1 for none"


def _file_name(v: str) -> str | None:
    return None if v and "/" not in v else "a file name (it lives in device.data_dir)"


def _simulator_installed(d: Doc) -> Iterable[Problem]:
    """A simulated van needs the simulator: refused here exactly as ``edge run`` refuses it."""
    if not d["simulation"]["enabled"]:
        return
    from edge import simulation

    try:
        simulation.backend()
    except ConfigError as exc:
        yield exc.key, exc.problem


# -- the sections --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Section:
    """A table of agent.toml: the dataclass it builds (its defaults) and every key's Option."""

    cls: type
    options: dict[str, Option]


def _section(cls: type, **keys: Option) -> Section:
    """Every key of ``cls`` must be declared here: a new setting without bounds is a decision."""
    names = [f.name for f in fields(cls)]
    assert set(keys) == set(names), f"{cls.__name__}: declare {sorted(set(names) ^ set(keys))}"
    obj = cls()
    return Section(cls, {n: replace(keys[n], default=getattr(obj, n)) for n in names})


_ANY = Option()
_SECONDS_0 = Option(lo=0.0, unit="seconds")

SECTIONS: dict[str, Section] = {
    "device": _section(
        DeviceConfig, id=Option(check=_device_id), data_dir=Option(check=_data_dir)
    ),
    "sampling": _section(
        SamplingConfig,
        rate_hz=Option(lo=0.0, lo_open=True, hi=50.0, unit="Hz"),
        commit_interval_s=Option(lo=0.1, hi=60.0, unit="seconds"),
    ),
    "time": _section(
        TimeConfig,
        gps_valid_s=Option(lo=0.0, lo_open=True, unit="seconds"),
        hold_unsync_s=_SECONDS_0,
        step_tolerance_s=Option(lo=0.1, hi=3600.0, unit="seconds"),
        step_confirm_s=_SECONDS_0,
        gps_latency_s=Option(lo=0.0, hi=1.0, unit="second"),
    ),
    "batch": _section(
        BatchConfig,
        max_samples=Option(lo=1, hi=20_000),  # core/wire.py MAX_SAMPLES_PER_BATCH
        max_age_s=Option(lo=0.0, lo_open=True, hi=86400.0, unit="seconds"),
    ),
    "buffer": _section(
        BufferConfig,
        max_bytes=Option(lo=1024 * 1024, hi=MAX_BUFFER_BYTES, unit="bytes (1 MiB .. 1 TiB)"),
        wal_autocheckpoint=Option(lo=1, hi=1_000_000, unit="pages"),
        reserve_bytes=Option(lo=0, unit="bytes"),
        check_on_open=_ANY,
        quarantine_dir=Option(check=_quarantine_dir),
    ),
    # Bounds that keep a van reachable, also against a remote change (issue 13, 7.3): MQTT's
    # keepalive is 16 bits (0 would switch it off: a dead link is never noticed), and an ack
    # timeout or reconnect delay of milliseconds turns into a re-send / reconnect storm.
    "uplink": _section(
        UplinkConfig,
        host=Option(check=_not_empty("the broker's host")),
        port=Option(lo=1, hi=65535, unit="(a TCP port)"),
        topic_prefix=Option(check=_topic),
        username=_ANY,
        password=Option(secret=True),
        tls=_ANY,
        ca_file=Option(check=_file),
        cert_file=Option(check=_file),
        key_file=Option(check=_file),
        keepalive_s=Option(lo=5, hi=65535, unit="seconds (MQTT's range)"),
        window=Option(lo=1, hi=1000),
        ack_timeout_s=Option(lo=1.0, hi=3600.0, unit="seconds"),
        reconnect_min_s=Option(lo=0.05, unit="seconds"),
        reconnect_max_s=Option(lo=0.05, hi=3600.0, unit="seconds"),
        heartbeat_s=Option(lo=1.0, hi=3600.0, unit="seconds"),
    ),
    "simulation": _section(
        SimulationConfig,
        enabled=_ANY,
        seed=_ANY,
        start_utc=Option(check=_iso_with_offset),
        shift_hours=Option(lo=0.0, lo_open=True, hi=24.0 * 366, unit="hours"),
        speedup=Option(lo=0.0),
        start_offset_m=Option(lo=0.0, unit="m"),
        boot_clock_error_s=_ANY,
        ntp_after_s=_SECONDS_0,
        devices=Option(choices=("values", "hardware")),
        noise=Option(choices=("module", "microphone")),
        gps_corrupt_prob=Option(lo=0.0, hi=1.0, unit="(a probability)"),
        pm_corrupt_prob=Option(lo=0.0, hi=1.0, unit="(a probability)"),
    ),
    "power": _section(
        PowerConfig,
        ignition_pin=Option(check=_pin),
        ignition_active_high=_ANY,
        ignition_debounce_s=_SECONDS_0,
        shutdown_after_s=Option(lo=0.0, unit="seconds (0 = never)"),
        shutdown_command=_ANY,
        park_speed_mps=Option(lo=0.0, unit="m/s"),
        park_after_s=_SECONDS_0,
        duty_every_s=Option(lo=0.0, lo_open=True, hi=86400.0, unit="seconds (a day)"),
        duty_measure_s=Option(lo=0.0, lo_open=True, unit="seconds"),
        hours_file=Option(check=_file_name),
    ),
    "panel": _section(
        PanelConfig,
        heartbeat_led_pin=Option(check=_pin),
        uplink_led_pin=Option(check=_pin),
        backlog_led_pin=Option(check=_pin),
        fault_led_pin=Option(check=_pin),
        button_pin=Option(check=_pin),
        button_hold_s=Option(lo=0.0, lo_open=True, unit="seconds"),
        backlog_threshold=Option(lo=0, unit="samples"),
        fault_window_s=Option(lo=0.0, lo_open=True, unit="seconds"),
    ),
}
SENSORS = "sensors"
KNOWN_SECTIONS = (*SECTIONS, SENSORS)


# -- rules between keys ----------------------------------------------------------------------------


def _buffer_reserve(d: Doc) -> Iterable[Problem]:
    if d["buffer"]["reserve_bytes"] >= d["buffer"]["max_bytes"]:
        yield "buffer.reserve_bytes", "must be 0 or more and below buffer.max_bytes"


def _reconnect(d: Doc) -> Iterable[Problem]:
    if d["uplink"]["reconnect_min_s"] > d["uplink"]["reconnect_max_s"]:
        yield "uplink.reconnect_min_s", "must be at least 0.05 s and at most reconnect_max_s"


def _duty(d: Doc) -> Iterable[Problem]:
    if d["power"]["duty_measure_s"] > d["power"]["duty_every_s"]:
        yield "power.duty_measure_s", "must be above 0 and at most power.duty_every_s"


def _shutdown(d: Doc) -> Iterable[Problem]:
    p = d["power"]
    try:
        empty = not shlex.split(p["shutdown_command"])
    except ValueError as exc:
        yield "power.shutdown_command", f"not a command line: {exc}"
        return
    if p["shutdown_after_s"] and empty:
        yield "power.shutdown_command", "empty: name the command that powers off"


def _pins_unique(d: Doc) -> Iterable[Problem]:
    used: dict[int, str] = {}
    keys = [("power", "ignition_pin")] + [("panel", f.name) for f in fields(PanelConfig) if f.name.endswith("_pin")]
    for section, key in keys:
        pin = d[section][key]
        if pin == NO_PIN:
            continue
        if pin in used:
            yield f"{section}.{key}", f"GPIO{pin} is already {used[pin]}"
        used.setdefault(pin, f"{section}.{key}")


def _tls_files(d: Doc) -> Iterable[Problem]:
    """With tls on, the files loaded into an SSLContext exactly as the uplink loads them.

    Existing is not enough: a file that is not PEM (or a key that does not match the
    certificate) passed check and then stopped ``edge run`` with an ssl.SSLError traceback.
    """
    u = d["uplink"]
    if not u["tls"]:
        return
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if u["ca_file"]:
        try:
            ctx.load_verify_locations(cafile=u["ca_file"])
        except (ssl.SSLError, OSError, ValueError) as exc:
            yield "uplink.ca_file", f"not a PEM CA certificate ({_ssl_reason(exc)}): give the broker's CA file"
    if u["key_file"] and not u["cert_file"]:
        yield "uplink.cert_file", "missing: key_file needs the client certificate in cert_file"
    elif u["cert_file"]:
        try:
            ctx.load_cert_chain(u["cert_file"], u["key_file"] or None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            key = "uplink.key_file" if u["key_file"] and _is_cert(u["cert_file"]) else "uplink.cert_file"
            what = ("not the PEM private key of cert_file" if key == "uplink.key_file"
                    else "not a PEM client certificate (with its key, or key_file naming it)")  # fmt: skip
            yield key, f"{what} ({_ssl_reason(exc)})"


def _is_cert(path: str) -> bool:
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError):
        return False
    return True


def _ssl_reason(exc: Exception) -> str:
    # ssl.SSLError's str() is "[SSL] PEM lib (_ssl.c:3900)": its reason is the readable part,
    # and the C source line means nothing to a technician.
    text = str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)


DOC_RULES: tuple[DocRule, ...] = (_buffer_reserve, _reconnect, _duty, _shutdown, _pins_unique, _tls_files)


# -- sensors -----------------------------------------------------------------------------------


def _sensor_name(name: str, driver: str) -> Iterable[Problem]:
    """A [sensors.NAME] the receiver accepts and that does not hide its values under a reserved name."""
    key = f"sensors.{name}"
    if not name or len(name) > MAX_NAME_CHARS:
        # The receiver refuses a longer one (receiver/validate.py): the whole batch would be lost.
        yield key, f"a sensor name has 1 to {MAX_NAME_CHARS} characters (the receiver refuses longer ones)"
    elif not name.isprintable():
        yield f"sensors.{name!r}", "a sensor name cannot hold tabs, newlines or other control characters"
    elif name == CALIBRATION_SECTION:
        yield key, "'calibration' is reserved for calibration records: choose another name"
    elif name == GPS_SECTION and driver not in GPS_DRIVERS:
        yield key, (f"'gps' is reserved for a position driver ({', '.join(GPS_DRIVERS)}): "
                    f"name the {driver!r} section otherwise")  # fmt: skip


def _simulated_parts(name: str, driver: str, o: Mapping[str, Any], sim: Mapping[str, Any]) -> Iterable[Problem]:
    """What edge run builds only in a simulated van (edge/runtime.py build_context)."""
    key = f"sensors.{name}"
    if driver.startswith("sim-") and not sim["enabled"]:
        yield f"{key}.driver", f"{driver!r} needs [simulation] enabled = true"
    hardware = sim["enabled"] and sim["devices"] == "hardware"
    port = o.get("port")
    if isinstance(port, str) and port.startswith("sim") and driver != "gpsd":
        part = port.partition(":")[2] or name
        if not hardware or part not in ("pm", "gps"):
            yield f"{key}.port", (f"{port!r} needs simulated hardware ([simulation] enabled = true, "
                                  f"devices = \"hardware\") with port {part!r} (it has 'pm', 'gps')")  # fmt: skip
    if o.get("bus") == "sim" and not hardware:
        yield f"{key}.bus", "'sim' needs simulated hardware ([simulation] enabled = true, devices = \"hardware\")"
    if driver == "microphone" and o.get("device") == "sim" and not (hardware and sim["noise"] == "microphone"):
        yield f"{key}.device", ("'sim' needs simulated hardware with a microphone ([simulation] enabled = true, "
                                "devices = \"hardware\", noise = \"microphone\")")  # fmt: skip


def _device_nodes(name: str, o: Mapping[str, Any]) -> Iterable[str]:
    port, bus = o.get("port"), o.get("bus")
    if isinstance(port, str) and port.startswith("/dev/") and not Path(port).exists():
        yield (f"sensors.{name}.port: {port} is not there now; the driver waits for it "
               "(a USB adapter plugged in later), so check the cable and the name")  # fmt: skip
    if isinstance(bus, int) and not isinstance(bus, bool) and not Path(f"/dev/i2c-{bus}").exists():
        yield f"sensors.{name}.bus: /dev/i2c-{bus} is not there (is I2C enabled? raspi-config)"


def _check_sensor(name: str, raw: Any, doc: Doc, runnable: bool, report: Report) -> SensorConfig | None:
    key = f"sensors.{name}"
    if not isinstance(raw, dict):
        report.add(key, "expected a table: [sensors.NAME] with driver = \"...\" and its options")
        return None
    driver = raw.get("driver")
    if not isinstance(driver, str) or not driver:
        report.add(f"{key}.driver", "missing: name the driver, e.g. driver = \"pms5003\"")
        return None
    options = {k: v for k, v in raw.items() if k != "driver"}
    sc = SensorConfig(name, driver, options)
    for k, p in _sensor_name(name, driver):
        report.add(k, p)
    from edge.driver_factory import driver_options, unknown_driver

    spec = driver_options(driver)
    if spec is None:
        err = unknown_driver(sc)
        report.add(err.key, err.problem)
        return None
    checked = check_table(spec.options, options, spec.rules, what=f"option for driver {driver!r}")
    for k, p in checked.problems:
        report.add(f"{key}.{k}", p)
    if runnable:
        for k, p in _simulated_parts(name, driver, checked.values, doc["simulation"]):
            report.add(k, p)
        report.warnings += list(_device_nodes(name, options))
    return sc


# -- the whole document ------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    """What validation found: errors by key (first per key), warnings, and the configuration."""

    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    agent: AgentConfig | None = None
    service: ServiceConfig | None = None

    def add(self, key: str, problem: str) -> None:
        if all(e.key != key for e in self.errors):
            self.errors.append(ConfigError(key, problem))

    def raise_if_invalid(self) -> tuple[AgentConfig, ServiceConfig]:
        if self.errors or self.agent is None or self.service is None:
            raise ConfigInvalid(self.errors or [ConfigError("<file>", "invalid")])
        return self.agent, self.service


def _explicit_id(data: Mapping[str, Any]) -> Iterable[Problem]:
    """A van's file must name its van: the default id is the example's.

    Without this an empty or lost agent.toml ran as "van-001" and every such van
    published as the same device; the broker's ACL would refuse all but one, or
    worse, their data would merge under one id.
    """
    device = data.get("device")
    if device is None or (isinstance(device, dict) and "id" not in device):
        yield "device.id", 'missing: name this van, e.g. [device] id = "van-017" (edge config example shows a file)'


def validate(
    data: Mapping[str, Any], source: str = "<dict>", *, runnable: bool = True, from_file: bool = False
) -> Report:
    """Every error of an agent.toml document; the configuration when there is none.

    ``runnable``: also the rules of the van ``edge run`` would build from it (simulated
    parts need [simulation]) and the device-node warnings. Off only for library callers
    that inject their own simulated world (tests, benches).
    ``from_file``: a van's agent.toml (``edge run``, ``config check``, SIGHUP), which must
    name its device id; library callers building a config in code keep the default.
    """
    report = Report()
    doc: Doc = {}
    for name, section in SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            report.add(name, f"expected a table: [{name}]")
            raw = {}
        checked = check_table(section.options, raw)
        for k, p in checked.problems:
            report.add(f"{name}.{k}", p)
        doc[name] = checked.values
    if from_file:
        for k, p in _explicit_id(data):
            report.add(k, p)
    for name in data:
        if name not in KNOWN_SECTIONS:
            report.add(name, unknown_key_text(name, KNOWN_SECTIONS, "section"))
    bad = {e.key for e in report.errors}
    for rule in (*DOC_RULES, _simulator_installed) if runnable else DOC_RULES:
        for k, p in rule(doc):
            if k not in bad:
                report.add(k, p)
    sensors: list[SensorConfig] = []
    raw_sensors = data.get(SENSORS, {})
    if not isinstance(raw_sensors, dict):
        report.add(SENSORS, "expected a table of [sensors.NAME] tables")
        raw_sensors = {}
    for sname, sraw in raw_sensors.items():
        sc = _check_sensor(str(sname), sraw, doc, runnable, report)
        if sc is not None:
            sensors.append(sc)
    if not report.errors:
        report.agent = AgentConfig(
            **{n: SECTIONS[n].cls(**doc[n]) for n in ("device", "sampling", "time", "batch", "buffer", "uplink",
                                                     "simulation")},  # fmt: skip
            sensors=sensors,
            source=source,
        )
        report.service = ServiceConfig(PowerConfig(**doc["power"]), PanelConfig(**doc["panel"]))
    return report


def parse(data: Mapping[str, Any], source: str = "<dict>", *, runnable: bool = True) -> tuple[AgentConfig, ServiceConfig]:
    """The configuration of a document; ``ConfigInvalid`` naming every error otherwise."""
    return validate(data, source, runnable=runnable).raise_if_invalid()


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("<file>", f"{p} is not UTF-8 text: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", f"{p} is not valid TOML: {exc}") from exc


def check_file(path: str | Path) -> Report:
    """``edge config check`` and ``edge run``: the file read and validated, never raising."""
    try:
        data = read_toml(path)
    except ConfigError as exc:
        report = Report()
        report.errors.append(exc)
        return report
    return validate(data, source=str(path), from_file=True)


def load(path: str | Path) -> tuple[AgentConfig, ServiceConfig]:
    return check_file(path).raise_if_invalid()


def declared_keys() -> dict[str, tuple[str, ...]]:
    """Every section's keys (for the docs test and ``describe``)."""
    return {name: tuple(s.options) for name, s in SECTIONS.items()}
