"""The device's MQTT link: publish sealed batches, collect the receiver's acks.

paho runs its network loop in its own thread; acks are handed to the agent
through a queue, so only the agent's thread ever touches the SQLite buffer.
The device connects with a persistent session (clean_session=False, fixed
client id = device id) so acks queued by the broker while the van was out of
coverage are still delivered when it comes back.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from typing import Callable, Protocol

import paho.mqtt.client as mqtt

from edge.config import UplinkConfig
from edge.errors import PayloadError
from uplink.wire import Ack, ack_topic, batch_topic, decode_ack

log = logging.getLogger(__name__)


class Link(Protocol):
    """What the agent needs from an uplink (a fake in tests, MQTT for real)."""

    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def publish(self, batch_id: str, payload: bytes) -> bool: ...

    def acks(self) -> list[Ack]: ...

    def stop(self) -> None: ...


ClientFactory = Callable[..., mqtt.Client]


class MqttLink:
    def __init__(
        self,
        cfg: UplinkConfig,
        device_id: str,
        *,
        client_factory: ClientFactory = mqtt.Client,
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self._acks: queue.SimpleQueue[Ack] = queue.SimpleQueue()
        self._connected = threading.Event()
        self.counters = {"published": 0, "acks": 0, "bad_acks": 0, "connects": 0}
        self._client = client_factory(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=device_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        c = self._client
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            c.tls_set(
                ca_certs=cfg.ca_file or None,
                certfile=cfg.cert_file or None,
                keyfile=cfg.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        # paho queues without bound by default; the agent keeps its own window,
        # so anything beyond it here would be a bug.
        c.max_queued_messages_set(max(cfg.window * 4, 16))
        c.reconnect_delay_set(min_delay=1, max_delay=60)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            # Never log the credentials; the reason code is enough to act on.
            log.warning("broker refused connection: %s", reason_code)
            return
        self.counters["connects"] += 1
        client.subscribe(ack_topic(self.cfg.topic_prefix, self.device_id), qos=1)
        self._connected.set()
        log.info("connected to %s:%s", self.cfg.host, self.cfg.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._connected.clear()
        log.info("disconnected: %s", reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            ack = decode_ack(msg.payload)
        except PayloadError as exc:
            self.counters["bad_acks"] += 1
            log.warning("ignored malformed ack: %s", exc)
            return
        self.counters["acks"] += 1
        self._acks.put(ack)

    def publish(self, batch_id: str, payload: bytes) -> bool:
        if not self.connected:
            return False
        info = self._client.publish(
            batch_topic(self.cfg.topic_prefix, self.device_id), payload, qos=1
        )
        ok = info.rc == mqtt.MQTT_ERR_SUCCESS
        if ok:
            self.counters["published"] += 1
        return ok

    def acks(self) -> list[Ack]:
        out: list[Ack] = []
        while True:
            try:
                out.append(self._acks.get_nowait())
            except queue.Empty:
                return out
