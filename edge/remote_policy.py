"""What a remote configuration request may change, and how a change is written to the log.

Remote configuration comes from the DataLab, through the broker; whoever holds the
receiver account (or breaks into the broker) holds it. It may tune how a van samples and
uploads, never what would hand the van to someone else or run code on it. So some keys
are local-only: set in agent.toml on the van (or by provisioning), refused from afar:

* shell commands (``power.shutdown_command``): arbitrary code as the agent's user;
* where and how the van connects (``uplink.host``, ``port``, ``topic_prefix``, ``tls``),
  and its credentials and TLS files (``username``, ``password``, ``ca_file``,
  ``cert_file``, ``key_file``): pointed at a plain-TCP host, a van sends its password
  in clear; on another prefix it can no longer be told to come back;
* paths on the van (``device.data_dir``, ``buffer.quarantine_dir``, ``power.hours_file``) and its identity
  (``device.id``);
* the whole ``[simulation]`` table: a real van told to simulate would upload made-up values.

In a sensor's table, ``calibration_file`` (a file the agent reads) is local-only too,
and so is a ``port`` that is a network URL (pyserial would dial any host and take what it
sends as sensor data); moving a sensor to another local port is a remote change like
any other (and one that leaves it silent is rolled back: edge/remote_watch.py). So are a
sensor's ``host`` and a ``gpsd`` sensor's ``port``: pointed at a fake gpsd, the van would
take its fixes and its time from whoever runs it.

A request that does not mention a local-only key keeps the van's own value, also in
``replace`` mode (the sender does not know the van's password and need not). One that
sets a different value is refused, naming each key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from edge.config import SensorConfig, SimulationConfig
from core.errors import ConfigError

LOCAL_ONLY: tuple[tuple[str, str], ...] = (
    ("device", "id"),
    ("device", "data_dir"),
    ("buffer", "quarantine_dir"),
    ("power", "shutdown_command"),
    ("power", "hours_file"),
    ("uplink", "host"),
    ("uplink", "port"),
    ("uplink", "topic_prefix"),
    ("uplink", "tls"),
    ("uplink", "username"),
    ("uplink", "password"),
    ("uplink", "ca_file"),
    ("uplink", "cert_file"),
    ("uplink", "key_file"),
    # A simulated van is a test rig: switching simulation on (or its route, clock or fault
    # rates) from afar would make a real van upload made-up data as measurements.
    *(("simulation", f.name) for f in fields(SimulationConfig)),
)
GPSD_DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "port": 2947}  # edge/driver_factory.py _gpsd
# Values never written to a log (by the last part of their key).
SECRET_KEYS = frozenset({"password", "secret", "token", "psk"})
_ABSENT = object()


def _get(doc: Mapping[str, Any], section: str, key: str) -> Any:
    sec = doc.get(section)
    return sec.get(key, _ABSENT) if isinstance(sec, Mapping) else _ABSENT


def keep_local_only(
    current: Mapping[str, Any], new: Mapping[str, Any], effective: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[ConfigError]]:
    """``new`` with the van's local-only values carried over; an error per key it would change.

    ``current`` is the van's agent.toml as written; ``effective`` the values in force
    (defaults included), so a request that restates a default the file leaves out is no change.
    """
    doc = {k: dict(v) if isinstance(v, Mapping) else v for k, v in new.items()}
    errors: list[ConfigError] = []
    for section, key in LOCAL_ONLY:
        cur = _get(current, section, key)
        in_force = cur if cur is not _ABSENT or effective is None else _get(effective, section, key)
        new_sec = doc.get(section)
        want = new_sec.get(key, _ABSENT) if isinstance(new_sec, Mapping) else _ABSENT
        if want is _ABSENT:
            if cur is not _ABSENT:
                if not isinstance(new_sec, Mapping):
                    if new_sec is not None:
                        continue  # not a table: the schema check names it
                    doc[section] = new_sec = {}
                new_sec[key] = cur
            continue
        if want != in_force:
            errors.append(ConfigError(f"{section}.{key}", "local-only: set it in agent.toml on the van, not remotely"))
    errors += _sensor_local_only(current, doc)
    return doc, errors


def _sensor_local_only(current: Mapping[str, Any], doc: dict[str, Any]) -> list[ConfigError]:
    errors: list[ConfigError] = []
    cur_sensors = current.get("sensors") if isinstance(current.get("sensors"), Mapping) else {}
    new_sensors = doc.get("sensors")
    if not isinstance(new_sensors, Mapping):
        return errors
    for name, table in new_sensors.items():
        if not isinstance(table, Mapping):
            continue  # the schema check names it
        cur = cur_sensors.get(name) if isinstance(cur_sensors.get(name), Mapping) else {}
        local = {"calibration_file": "local-only: a file on the van; send the calibration itself instead",
                 "host": "local-only: where the sensor's data (and for gpsd the van's time) comes from"}  # fmt: skip
        defaults: dict[str, Any] = {}
        if "gpsd" in (table.get("driver"), cur.get("driver")):
            local["port"] = "local-only for gpsd: a TCP port on the host above"
            defaults = GPSD_DEFAULTS  # restating them is no change
        for key, problem in local.items():
            want, have = table.get(key, _ABSENT), cur.get(key, defaults.get(key, _ABSENT))
            if want is _ABSENT and have is not _ABSENT:
                new_sensors[name] = table = {**table, key: have}
            elif want != have:
                errors.append(ConfigError(f"sensors.{name}.{key}", problem))
        port = table.get("port")
        if isinstance(port, str) and "://" in port and port != cur.get("port"):
            errors.append(ConfigError(f"sensors.{name}.port", "local-only when it is a network URL"))
    return errors


# What a van is for: particulate matter, NO2, noise (sim-oracle: the delivery tests' checkable values).
MEASURING_DRIVERS = frozenset({
    "pms5003", "pms7003", "pmsa003", "sds011", "sps30", "sim-pm",
    "no2-b43f", "dgs-no2", "sim-no2",
    "sound-module", "microphone", "sim-noise", "sim-oracle",
})  # fmt: skip
# Where and when, not what: a van with only these measures nothing.
POSITION_DRIVERS = frozenset({"nmea-gps", "gpsd", "sim-gps"})


def no_working_sensor(sensors: list[SensorConfig]) -> ConfigError | None:
    """A configuration without a PM, NO2 or noise sensor leaves a van that only uses power
    (a GPS alone gives positions of nothing): refused from afar, a warning in
    ``edge config check`` (a technician may bench-test a GPS on its own)."""
    if not sensors:
        return ConfigError("sensors", "no sensor: a van needs at least one PM, NO2 or noise sensor")
    if not any(sc.driver in MEASURING_DRIVERS for sc in sensors):
        names = ", ".join(f"{sc.name} ({sc.driver})" for sc in sensors)
        return ConfigError("sensors", f"no PM, NO2 or noise sensor, only {names}: a van needs at least one")
    return None


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _shown(key: str, value: Any) -> str:
    if value is _ABSENT:
        return "(unset)"
    if key.rsplit(".", 1)[-1].lower() in SECRET_KEYS:
        return "***"
    return repr(value)


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key that differs, secrets shown as ``***``."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            out.append(f"{key}: {_shown(key, va)} -> {_shown(key, vb)}")
    return out
