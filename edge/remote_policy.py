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
  (``device.id``).

In a sensor's table, ``calibration_file`` (a file the agent reads) is local-only too,
and so is a ``port`` that is a network URL (pyserial would dial any host and take what it
sends as sensor data); moving a sensor to another local port is a remote change like
any other (and one that leaves it silent is rolled back: edge/remote_watch.py).

A request that does not mention a local-only key keeps the van's own value, also in
``replace`` mode (the sender does not know the van's password and need not). One that
sets a different value is refused, naming each key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge.errors import ConfigError

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
)
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
        want, have = table.get("calibration_file", _ABSENT), cur.get("calibration_file", _ABSENT)
        if want is _ABSENT and have is not _ABSENT:
            new_sensors[name] = table = {**table, "calibration_file": have}
        elif want != have:
            errors.append(ConfigError(f"sensors.{name}.calibration_file",
                                      "local-only: a file on the van; send the calibration itself instead"))  # fmt: skip
        port = table.get("port")
        if isinstance(port, str) and "://" in port and port != cur.get("port"):
            errors.append(ConfigError(f"sensors.{name}.port", "local-only when it is a network URL"))
    return errors


def no_working_sensor(sensor_names: list[str]) -> ConfigError | None:
    """A configuration without a sensor leaves a van that only uses power: refused."""
    if not sensor_names:
        return ConfigError("sensors", "the change leaves no sensor: a van needs at least one")
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
