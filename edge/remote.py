"""Remote configuration and calibration over MQTT.

The DataLab publishes to ``{prefix}/{device}/config`` (QoS 1; the broker's ACL
lets a van read only its own) a JSON request:

``{"id": "...", "kind": "config", "mode": "merge", "config": {"sampling": {"rate_hz": 2}}}``
    merge these keys into the device's agent.toml (the default: the sender
    need not know the van's password or sensor ports);
``{"id": "...", "kind": "config", "mode": "replace", "toml": "<whole agent.toml>"}``
    replace the whole file (``"config": {...}`` works as well);
``{"id": "...", "kind": "calibration", "sensor": "no2", "calibration": {...}}``
    a calibration record, stored as ``[sensors.no2.calibration]``.

A payload that is not JSON is taken as a whole TOML file (replace). The sending end is
``datalab-receiver device-config send`` (receiver/device_config.py).

The device validates the result like ``edge config check`` (every error, by
key), applies it on the sampling thread exactly as a SIGHUP reload does
(commit first, same buffer: no sample is lost), writes agent.toml atomically
keeping the previous file as agent.toml.prev, and answers on
``{prefix}/{device}/config/ack``: ``{"id", "ok", "status", "reason", "errors",
"changes", "restart_required"}``. An invalid request changes nothing. A request id seen
before (a redelivery, or a retained request sent again at every reconnect) is acknowledged
as ``duplicate`` with what became of it, never handled twice: the ids of the last
``MAX_HANDLED`` requests are kept on the card (``remote-config.json``), so a retained bad
request cannot loop through applied / rolled back / applied again. Acks not yet published
are kept there too and go out after a restart.

Remote is not local: keys that could hand the van to someone else or run code on it
(shell commands, broker host/port/prefix, TLS and credentials, paths, the device id) are
refused by key (edge/remote_policy.py), and so is a change that leaves no sensor. An
applied change is on probation (edge/remote_watch.py): a second ack with status
``confirmed`` follows once the van reads its sensors (and connects, if the uplink
changed), or ``rolled_back`` when it does not within the grace period, after which the
configuration before it is in force and on disk again. Each change is logged and
acknowledged as ``key: old -> new`` (secrets as ``***``).

The device-side subscription rides on the uplink's own MQTT connection: a
second connection would need a second client id, and the broker ties the
client id to the username (``use_username_as_clientid``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config_topics import MAX_REQUEST_BYTES, config_ack_topic, config_topic, request_id
from core.errors import ConfigError

log = logging.getLogger(__name__)

MAX_HANDLED = 256  # request ids remembered (a few a month in practice): far more than the broker can redeliver
MAX_PENDING_ACKS = 50  # acks kept for an offline van: the newest, each a few hundred bytes


@dataclass(slots=True)
class Request:
    id: str
    kind: str  # "config" | "calibration"
    mode: str = "merge"  # "merge" | "replace"
    data: dict[str, Any] | None = None
    toml_text: str | None = None
    sensor: str = ""


@dataclass(slots=True)
class Result:
    id: str
    ok: bool
    status: str  # "applied" | "refused" | "duplicate", later "confirmed" | "rolled_back"
    reason: str = ""
    errors: list[dict[str, str]] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # sections
    changes: list[str] = field(default_factory=list)  # "key: old -> new", secrets redacted

    def to_json(self, device: str) -> bytes:
        body = {
            "device": device, "id": self.id, "ok": self.ok, "status": self.status,
            "reason": self.reason, "errors": self.errors, "changed": self.changed, "changes": self.changes,
            "restart_required": self.restart_required, "t_utc_ms": int(time.time() * 1000),
        }  # fmt: skip
        return json.dumps(body).encode()


# -- requests -----------------------------------------------------------------------------


def decode_request(payload: bytes) -> Request:
    """Parse a request; raises ``ConfigError`` (key "<request>") for a malformed one."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise ConfigError("<request>", f"larger than {MAX_REQUEST_BYTES} bytes")
    digest = hashlib.sha256(payload).hexdigest()[:16]
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("<request>", "not UTF-8") from exc
    if not text.lstrip().startswith("{"):
        return Request(id=digest, kind="config", mode="replace", toml_text=text)
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ConfigError("<request>", f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ConfigError("<request>", "expected a JSON object")
    rid = str(obj.get("id") or digest)
    kind = obj.get("kind", "config")
    if kind == "calibration":
        sensor, cal = obj.get("sensor"), obj.get("calibration")
        if not isinstance(sensor, str) or not sensor:
            raise ConfigError("<request>.sensor", "name the sensor the calibration is for")
        if not isinstance(cal, dict):
            raise ConfigError("<request>.calibration", "expected an object of calibration values")
        return Request(id=rid, kind=kind, mode="merge", data=cal, sensor=sensor)
    if kind != "config":
        raise ConfigError("<request>.kind", f"'config' or 'calibration', not {kind!r}")
    mode = obj.get("mode", "merge")
    if mode not in ("merge", "replace"):
        raise ConfigError("<request>.mode", f"'merge' or 'replace', not {mode!r}")
    if "toml" in obj:
        if not isinstance(obj["toml"], str):
            raise ConfigError("<request>.toml", "expected the TOML text as a string")
        try:
            data = tomllib.loads(obj["toml"])
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("<request>.toml", f"not valid TOML: {exc}") from exc
        return Request(id=rid, kind=kind, mode=mode, data=data, toml_text=obj["toml"] if mode == "replace" else None)
    if not isinstance(obj.get("config"), dict):
        raise ConfigError("<request>.config", "expected an object of configuration sections")
    return Request(id=rid, kind=kind, mode=mode, data=obj["config"])


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merged key by key, recursively; other values replaced."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def new_document(req: Request, current: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The configuration after the request, and its exact text if the request gave one."""
    if req.toml_text is not None:
        try:
            return tomllib.loads(req.toml_text), req.toml_text
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("<request>", f"not valid TOML: {exc}") from exc
    assert req.data is not None
    if req.kind == "calibration":
        sensors = current.get("sensors", {})
        if req.sensor not in sensors:
            raise ConfigError(f"sensors.{req.sensor}", "no such sensor on this device")
        doc = merge(current, {"sensors": {req.sensor: {"calibration": req.data}}})
        # The inline table replaces the one before it (not merged: a new sheet is complete).
        doc["sensors"][req.sensor]["calibration"] = dict(req.data)
        return doc, None
    if req.mode == "replace":
        return dict(req.data), None
    return merge(current, req.data), None


# -- TOML out ----------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else json.dumps(k)


def _value(v: Any, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v != v:
            raise ConfigError(key, "NaN cannot be stored")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, key) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(x, f'{key}.{k}')}" for k, x in v.items()) + " }"
    raise ConfigError(key, f"cannot store a {type(v).__name__} in TOML")


def dump_toml(doc: Mapping[str, Any], header: str = "") -> str:
    """TOML for a configuration document (tables of scalars, lists and sub-tables)."""
    lines: list[str] = [header] if header else []

    def table(path: list[str], t: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in t.items() if not isinstance(v, Mapping)]
        subs = [(k, v) for k, v in t.items() if isinstance(v, Mapping)]
        if path and (scalars or not subs):
            lines.append("")
            lines.append("[" + ".".join(_key(p) for p in path) + "]")
        for k, v in scalars:
            lines.append(f"{_key(str(k))} = {_value(v, '.'.join([*path, str(k)]))}")
        for k, v in subs:
            table([*path, str(k)], v)

    table([], doc)
    return "\n".join(lines).lstrip("\n") + "\n"


def _private(path: Path, mode: str) -> Any:
    """A new file, owner-only from its first byte (it may hold the uplink password)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return open(fd, mode) if "b" in mode else open(fd, mode, encoding="utf-8")


def write_config_atomically(path: Path, text: str) -> None:
    """agent.toml replaced in one rename; the file before it kept as agent.toml.prev.

    Both steps are renames of fsynced files, so a power cut leaves either the
    old or the new configuration in place, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".new")
    with _private(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        mode = path.stat().st_mode & 0o777
        os.chmod(tmp, mode)  # as readable as before, no more
        prev = path.with_name(path.name + ".prev")
        prev_tmp = path.with_name(path.name + ".prev.new")
        with _private(prev_tmp, "wb") as f:
            f.write(path.read_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(prev_tmp, mode)
        os.replace(prev_tmp, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new name in ``folder`` durable (POSIX: an fsync of the directory)."""
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- device side ------------------------------------------------------------------------------


class RemoteConfig:
    """Receives requests on the uplink's connection and acknowledges them.

    ``take()`` and ``ack()`` are for the sampling thread; the MQTT callback only
    queues. ``apply`` (given by the runtime) does the work and returns a
    ``Result``; the id of the last applied request is kept in ``state_path``.
    """

    def __init__(self, device: str, prefix: str, state_path: Path) -> None:
        self.device = device
        self.prefix = prefix
        self.state_path = Path(state_path)
        self._inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._outbox: list[bytes] = []
        self._client: Any = None
        # A change on probation when the agent stopped: {"id", "previous_id"} (edge/remote_watch.py).
        self.probation: dict[str, str] | None = None
        # Every request handled (id -> its last status), oldest first: never handled twice.
        self.handled: dict[str, str] = {}
        self.last_id = self._load_state()
        self.results: list[Result] = []

    @property
    def topic(self) -> str:
        return config_topic(self.prefix, self.device)

    @property
    def ack_topic(self) -> str:
        return config_ack_topic(self.prefix, self.device)

    def _load_state(self) -> str:
        try:
            state = json.loads(self.state_path.read_text())
            p = state.get("probation")
            if isinstance(p, dict) and isinstance(p.get("id"), str) and isinstance(p.get("previous_id"), str):
                self.probation = {"id": p["id"], "previous_id": p["previous_id"]}
            handled = state.get("handled")
            if isinstance(handled, dict):
                self.handled = {str(k): str(v) for k, v in handled.items()}
            acks = state.get("pending_acks")
            if isinstance(acks, list):
                self._outbox = [a.encode() for a in acks if isinstance(a, str)][-MAX_PENDING_ACKS:]
            return str(state.get("last_id", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        state = {"last_id": self.last_id, "probation": self.probation, "handled": self.handled,
                 "pending_acks": [a.decode() for a in self._outbox]}  # fmt: skip
        try:
            # Synced before and after the rename: a power cut must leave the old state or the
            # new one, never an empty file (the handled ids keep a retained request from being
            # applied twice). Written only when a configuration request comes or goes.
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(state))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
            _fsync_dir(self.state_path.parent)
        except OSError as exc:
            log.warning("cannot save %s: %s", self.state_path, exc)

    def attach(self, link: Any) -> None:
        """Subscribe on ``link``'s MQTT client, now and after every reconnect.

        Uses the paho client inside ``uplink.mqtt.MqttLink`` (``_client``): a topic
        callback takes the config topic away from the link's ack decoder.
        """
        client = getattr(link, "_client", None)
        if client is None:
            log.info("uplink has no MQTT client: remote configuration off")
            return
        self._client = client
        client.message_callback_add(self.topic, self._on_message)
        original = client.on_connect
        topic = self.topic

        def on_connect(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
            original(c, userdata, flags, reason_code, properties)
            if not reason_code.is_failure:
                c.subscribe(topic, qos=1)

        client.on_connect = on_connect
        if link.connected:
            client.subscribe(topic, qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:  # network thread
        self._inbox.put(bytes(msg.payload))

    def take(self) -> list[bytes]:
        out: list[bytes] = []
        while True:
            try:
                out.append(self._inbox.get_nowait())
            except queue.Empty:
                return out

    def handle(self, payload: bytes, apply: Callable[[Request], Result]) -> Result:
        """Decode, dedupe, apply, remember; the result is also queued as the ack."""
        try:
            req = decode_request(payload)
        except ConfigError as exc:
            result = Result(id=request_id(payload), ok=False, status="refused", reason=str(exc),
                            errors=[{"key": exc.key, "problem": exc.problem}])  # fmt: skip
        else:
            before = self.handled.get(req.id) or ("applied" if req.id == self.last_id else None)
            if before is not None:
                result = Result(id=req.id, ok=before not in ("refused", "rolled_back"), status="duplicate",
                                reason=f"already handled: {before}")  # fmt: skip
            else:
                result = apply(req)
                if result.ok:
                    self.last_id = req.id
        self.report(result)
        return result

    def report(self, result: Result) -> None:
        """Log a result and queue it as an ack (also the later confirmed / rolled_back)."""
        if result.ok:
            log.info("remote configuration %s %s: %s", result.id, result.status,
                     "; ".join(result.changes) or ", ".join(result.changed) or result.reason or "no change")  # fmt: skip
        else:
            log.warning("remote configuration %s %s: %s%s", result.id, result.status, result.reason,
                        f" (undone: {'; '.join(result.changes)})" if result.changes else "")  # fmt: skip
        self.results.append(result)
        del self.results[:-20]
        if result.id and result.status != "duplicate":
            self.handled.pop(result.id, None)
            self.handled[result.id] = result.status
            while len(self.handled) > MAX_HANDLED:
                del self.handled[next(iter(self.handled))]
        self._outbox.append(result.to_json(self.device))
        del self._outbox[:-MAX_PENDING_ACKS]
        self._save_state()

    def begin_probation(self, request_id: str, previous_id: str) -> None:
        """Remember, across restarts, that ``request_id`` is not confirmed yet."""
        self.probation = {"id": request_id, "previous_id": previous_id}
        self._save_state()

    def end_probation(self) -> None:
        self.probation = None
        self._save_state()

    def forget(self, request_id: str, previous_id: str) -> None:
        """A rolled-back request: the one before it is in force again (and may be sent again)."""
        if self.last_id == request_id:
            self.last_id = previous_id
            self._save_state()

    def flush(self, connected: bool) -> None:
        """Publish queued acks (QoS 1) once connected; they wait otherwise."""
        if not self._outbox or self._client is None or not connected:
            return
        try:
            while self._outbox:
                info = self._client.publish(self.ack_topic, self._outbox[0], qos=1)
                if info.rc != 0:
                    return
                self._outbox.pop(0)
        finally:
            self._save_state()

