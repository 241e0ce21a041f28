"""Send a van a new configuration or calibration over MQTT: ``datalab-receiver device-config``.

The sending end of remote configuration; the van's end, and the request and ack formats,
are described in edge/remote.py.
"""

from __future__ import annotations

import json
import queue
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

from core.config_topics import config_ack_topic, config_topic, request_id
from core.errors import ConfigError


def build_request(
    path: str | Path, *, mode: str = "merge", calibration_sensor: str = "", request_id: str = ""
) -> bytes:
    """A request from a file: TOML or JSON sections; a calibration sheet with ``calibration_sensor``."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    rid = request_id or uuid.uuid4().hex[:12]
    if calibration_sensor:
        return json.dumps({"id": rid, "kind": "calibration", "sensor": calibration_sensor,
                           "calibration": data}).encode()  # fmt: skip
    if mode == "replace" and p.suffix != ".json":
        return json.dumps({"id": rid, "kind": "config", "mode": "replace", "toml": text}).encode()
    return json.dumps({"id": rid, "kind": "config", "mode": mode, "config": data}).encode()


def send_device_config(
    device: str,
    payload: bytes,
    *,
    host: str = "localhost",
    port: int = 1883,
    prefix: str = "datalab/v1",
    username: str = "",
    password: str = "",
    tls: bool = False,
    ca_file: str = "",
    cert_file: str = "",
    key_file: str = "",
    wait_s: float = 30.0,
    retain: bool = False,
    verdict: bool = False,
) -> dict[str, Any] | None:
    """Publish a request to a device's config topic; wait ``wait_s`` for its ack (None if none).

    With ``verdict``, an ``applied`` ack is not the end: wait on (same ``wait_s`` overall) for
    ``confirmed`` or ``rolled_back`` after the van's probation; the last ack seen is returned.

    Without ``retain`` a van that is offline still gets the request when it comes back, as
    long as it has connected once since installation (its persistent session holds it).
    """
    import ssl

    import paho.mqtt.client as mqtt

    req_id = request_id(payload)  # the id the van acks under, also when it refuses the request as malformed
    acks: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    subscribed: queue.SimpleQueue[int] = queue.SimpleQueue()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"datalab-config-{uuid.uuid4().hex[:8]}", clean_session=True)  # fmt: skip
    if username:
        client.username_pw_set(username, password or None)
    if tls:
        client.tls_set(ca_certs=ca_file or None, certfile=cert_file or None, keyfile=key_file or None,
                       cert_reqs=ssl.CERT_REQUIRED)  # fmt: skip

    def on_message(c: Any, u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("id") == req_id:
            acks.put(body)

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.put(1)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        if wait_s > 0:
            client.subscribe(config_ack_topic(prefix, device), qos=1)
            subscribed.get(timeout=10)
        info = client.publish(config_topic(prefix, device), payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        if wait_s <= 0:
            return None
        deadline = time.monotonic() + wait_s
        last: dict[str, Any] | None = None
        while True:
            try:
                last = acks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return last
            if not verdict or last.get("status") != "applied":
                return last
    finally:
        client.loop_stop()
        client.disconnect()


def device_config_cli() -> Any:
    """The ``device-config`` click group, for ``datalab-receiver`` (the lead wires it)."""
    import click

    @click.group("device-config")
    def group() -> None:
        """Send configuration or calibration to a van over MQTT."""

    @group.command("send")
    @click.argument("device")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    @click.option("--config", "config_path", type=click.Path(dir_okay=False),
                  help="Receiver TOML: broker host, port, account and TLS.")
    @click.option("--host", help="Broker host (overrides the config).")
    @click.option("--port", type=int, help="Broker port (overrides the config).")
    @click.option("--replace", is_flag=True, help="Replace the whole agent.toml instead of merging keys.")
    @click.option("--calibration", "sensor", default="", help="FILE is a calibration sheet for this sensor.")
    @click.option("--id", "request_id", default="", help="Request id (default: random).")
    @click.option("--wait", "wait_s", default=30.0, show_default=True,
                  help="Seconds to wait for the van's answer (0: do not wait).")
    @click.option("--retain", is_flag=True, help="Retain the request on the broker.")
    @click.option("--verdict", is_flag=True,
                  help="After 'applied', wait for 'confirmed' or 'rolled_back' (the van's probation, 120 s: "
                       "give --wait 180).")
    def send(device, file, config_path, host, port, replace, sensor, request_id, wait_s, retain, verdict) -> None:  # type: ignore[no-untyped-def]
        """Send FILE (TOML or JSON sections) to DEVICE; print the van's answer.

        \b
        Examples:
          datalab-receiver device-config send van-001 rate.toml --config /etc/datalab/receiver.toml
          datalab-receiver device-config send van-001 sheet.toml --calibration no2
          datalab-receiver device-config send van-001 sensors.toml --verdict --wait 180
        """
        from receiver.config import load_receiver_config

        try:
            rc = load_receiver_config(config_path, host=host, port=port)
            payload = build_request(file, mode="replace" if replace else "merge",
                                    calibration_sensor=sensor, request_id=request_id)  # fmt: skip
        except (ConfigError, ValueError, tomllib.TOMLDecodeError) as exc:
            raise click.ClickException(str(exc)) from exc
        ack = send_device_config(
            device, payload, host=rc.host, port=rc.port, prefix=rc.topic_prefix, username=rc.username,
            password=rc.password, tls=rc.tls, ca_file=rc.ca_file, cert_file=rc.cert_file,
            key_file=rc.key_file, wait_s=wait_s, retain=retain, verdict=verdict,
        )
        if wait_s <= 0:
            click.echo("sent")
            return
        if ack is None:
            raise click.ClickException(f"no answer from {device} within {wait_s:g} s (it gets it when it connects)")
        click.echo(json.dumps(ack, indent=2))
        if not ack.get("ok"):
            raise SystemExit(1)

    return group
