"""The device's MQTT link: publish sealed batches, collect the receiver's acks.

One network thread of our own drives paho (``client.loop``) and reconnects
with full-jitter backoff (``uplink/backoff.py``), because paho's own reconnect
has none. The thread does not poll: it sleeps in paho's select until the
socket has data, a publish from the agent's thread pokes paho's socketpair,
or the next keepalive ping falls due (issue #18: a 0.2-s poll cost 3.3 CPU-s
per van-hour, most of the agent's budget). Acks are handed to the agent through a queue, so only the agent's
thread ever touches the SQLite buffer.

The device connects with a persistent session (clean_session=False, fixed
client id = device id) so acks queued by the broker while the van was out of
coverage are still delivered when it comes back. Its last will, a retained
``online: false`` on its status topic, tells the DataLab the van went away.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from typing import Any, Callable, Protocol

import paho.mqtt.client as mqtt

from core.errors import PayloadError
from uplink.backoff import FullJitterBackoff
from core.wire import (
    Ack,
    ack_topic,
    batch_topic,
    decode_ack,
    encode_status,
    encode_sync,
    status_topic,
    sync_topic,
)

log = logging.getLogger(__name__)

# paho's own clock for its keepalive bookkeeping (time.monotonic in paho 2.x).
_paho_now: Callable[[], float] = getattr(mqtt, "time_func", time.monotonic)


class Link(Protocol):
    """What the agent needs from an uplink (a fake in tests, MQTT for real)."""

    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def publish(self, batch_id: str, payload: bytes) -> bool: ...

    def publish_status(self, status: dict[str, Any]) -> bool: ...

    def publish_sync(self, epoch: str, batch_ids: list[str]) -> bool: ...

    def take_connected_event(self) -> bool:
        """True once after each new connection (time to resync and say hello)."""

    def acks(self) -> list[Ack]: ...

    def stop(self) -> None: ...


ClientFactory = Callable[..., mqtt.Client]


class LinkSettings(Protocol):
    """What the link reads of its configuration. The van's ``edge.config.UplinkConfig`` has
    these fields; the uplink names only what it needs, so it sits below edge and never
    imports the van's configuration (tests/test_layering.py)."""

    host: str
    port: int
    topic_prefix: str
    username: str
    password: str  # secret: never logged
    tls: bool
    ca_file: str
    cert_file: str
    key_file: str
    keepalive_s: int
    window: int
    reconnect_min_s: float
    reconnect_max_s: float


class MqttLink:
    def __init__(
        self,
        cfg: LinkSettings,
        device_id: str,
        *,
        client_factory: ClientFactory = mqtt.Client,
        backoff: FullJitterBackoff | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.backoff = backoff or FullJitterBackoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self._acks: queue.SimpleQueue[Ack] = queue.SimpleQueue()
        self._connected = threading.Event()
        self._new_connection = threading.Event()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._thread: threading.Thread | None = None
        self._refused = False  # the broker answered CONNACK with a refusal
        self.counters = {"published": 0, "acks": 0, "bad_acks": 0, "connects": 0, "connect_failures": 0}
        self.delays: list[float] = []  # the reconnect delays drawn, for tests and the heartbeat
        self._client = client_factory(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=device_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,  # we reconnect ourselves, with jitter
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
        c.will_set(
            status_topic(cfg.topic_prefix, device_id),
            encode_status({"online": False, "device": device_id}),
            qos=1,
            retain=True,
        )
        # paho queues without bound by default; the agent keeps its own window,
        # so anything beyond it here would be a bug.
        c.max_queued_messages_set(max(cfg.window * 4, 16))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message

    # -- lifecycle ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._connected.is_set():
            # Say goodbye ourselves: a clean disconnect does not fire the last will.
            self._client.publish(
                status_topic(self.cfg.topic_prefix, self.device_id),
                encode_status({"online": False, "device": self.device_id}),
                qos=1,
                retain=True,
            )
            self._client.loop(0.2)
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            if not self._connected.is_set():
                if not first:
                    delay = self.backoff.next_delay()
                    self.delays.append(delay)
                    self._sleep(delay)
                    if self._stop.is_set():
                        return
                first = False
                try:
                    self._client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
                except (OSError, ssl.SSLError) as exc:
                    self.counters["connect_failures"] += 1
                    log.info("broker %s:%s unreachable: %s", self.cfg.host, self.cfg.port, exc)
                    continue
                # Wait for the CONNACK (or a refusal) before deciding anything.
                deadline = time.monotonic() + 10
                while not self._connected.is_set() and time.monotonic() < deadline:
                    if self._client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS or self._refused:
                        break
                if not self._connected.is_set():
                    self.counters["connect_failures"] += 1
                    self._client.disconnect()
                    self._refused = False
                    continue
            rc = self._client.loop(self._idle_timeout())
            if rc != mqtt.MQTT_ERR_SUCCESS and self._connected.is_set():
                self._connected.clear()
                log.info("connection lost (%s)", mqtt.error_string(rc))

    def _idle_timeout(self) -> float:
        """How long the network thread may sleep in select: until the next ping is due.

        Everything else wakes it earlier: incoming bytes, and publish()/disconnect()
        from another thread write to paho's socketpair, which is in the same select.
        paho sends the PINGREQ from loop() only once ``keepalive`` has passed since
        the last packet out or the last bytes in, so the thread must be awake then
        (a late ping makes the broker drop us at 1.5 x keepalive). Those times are
        paho internals; without them we fall back to a quarter of the keepalive.
        """
        keepalive = float(self.cfg.keepalive_s)
        client = self._client
        try:
            with client._msgtime_mutex:
                last = min(client._last_msg_out, client._last_bytes_received)
            due = last + keepalive - _paho_now()
        except AttributeError:
            due = keepalive / 4
        # A few ms late, so the check in loop_misc sees the ping as due, never early.
        return min(max(due + 0.005, 0.005), keepalive)

    # -- callbacks (network thread) ---------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            # Never log the credentials; the reason code is enough to act on.
            log.warning("broker refused connection: %s", reason_code)
            self._refused = True
            return
        self.counters["connects"] += 1
        self.backoff.reset()
        client.subscribe(ack_topic(self.cfg.topic_prefix, self.device_id), qos=1)
        self._connected.set()
        self._new_connection.set()
        log.info("connected to %s:%s", self.cfg.host, self.cfg.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._connected.clear()
        log.info("disconnected: %s", reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            ack = decode_ack(msg.payload, self.device_id)  # JSON or binary (docs/wire-format.md)
        except PayloadError as exc:
            self.counters["bad_acks"] += 1
            log.warning("ignored malformed ack: %s", exc)
            return
        self.counters["acks"] += 1
        self._acks.put(ack)

    # -- agent side ---------------------------------------------------------------------

    def take_connected_event(self) -> bool:
        if self._new_connection.is_set():
            self._new_connection.clear()
            return True
        return False

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def publish(self, batch_id: str, payload: bytes) -> bool:
        ok = self._publish(batch_topic(self.cfg.topic_prefix, self.device_id), payload)
        if ok:
            self.counters["published"] += 1
        return ok

    def publish_status(self, status: dict[str, Any]) -> bool:
        return self._publish(
            status_topic(self.cfg.topic_prefix, self.device_id), encode_status(status), retain=True
        )

    def publish_sync(self, epoch: str, batch_ids: list[str]) -> bool:
        return self._publish(sync_topic(self.cfg.topic_prefix, self.device_id), encode_sync(epoch, batch_ids))

    def acks(self) -> list[Ack]:
        out: list[Ack] = []
        while True:
            try:
                out.append(self._acks.get_nowait())
            except queue.Empty:
                return out
