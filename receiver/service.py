"""The receiver as an MQTT consumer.

paho with ``manual_ack=True``: a message is acknowledged to the broker only
after its batch is committed in the store and the device has been answered,
so a receiver killed at any point makes the broker deliver the batch again
(and the store's idempotence turns that into a ``duplicate`` ack).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from edge.faultpoints import crash_point
from receiver.config import ReceiverConfig
from receiver.ingest import Ingestor
from receiver.store import Store
from receiver.store_factory import open_store
from uplink.wire import ack_topic, encode_ack

log = logging.getLogger(__name__)

MAX_GROUP = 64  # uploads stored in one transaction at most (the broker's in-flight window is less)
DERIVE_POLL_S = 0.5  # an idle background deriver looks for queued batches this often
DERIVE_IDLE_POLL_S = 30.0  # and with derive = "inline" (nothing new is queued then)
DERIVE_RETRY_S = 5.0  # and after a failure (store unreachable) waits this long


class ReceiverService:
    def __init__(
        self, cfg: ReceiverConfig, store: Store | None = None, *, ready_file: str | None = None
    ) -> None:
        self.cfg = cfg
        self.ready_file = ready_file
        self.subscribed = threading.Event()
        self.store = store or open_store(cfg.store, max_gap_s=cfg.max_gap_s)
        self.ingestor = Ingestor(self.store, cfg.topic_prefix, derive=cfg.derive == "inline")
        self._stopping = threading.Event()
        self._inbox: queue.Queue[tuple[mqtt.MQTTMessage, int]] = queue.Queue()
        self.worker = threading.Thread(target=self._work_loop, name="ingest", daemon=True)
        # Also in inline mode: it drains what a previous run in another mode left queued.
        self.deriver: threading.Thread | None = None
        if cfg.derive != "separate":
            self.deriver = threading.Thread(target=self._derive_loop, name="deriver", daemon=True)
        self.connected = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            self.client.tls_set(
                ca_certs=cfg.ca_file or None,
                certfile=cfg.cert_file or None,
                keyfile=cfg.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    @property
    def subscriptions(self) -> list[str]:
        topics = [f"{self.cfg.topic_prefix}/+/{kind}" for kind in ("batch", "sync", "status")]
        if self.cfg.share_group:
            topics = [f"$share/{self.cfg.share_group}/{t}" for t in topics]
        return topics

    @property
    def subscription(self) -> str:
        return self.subscriptions[0]

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.error("broker refused the receiver: %s", reason_code)
            return
        client.subscribe([(t, 1) for t in self.subscriptions])
        self.connected.set()
        log.info("receiver subscribed to %s", ", ".join(t.replace(f"$share/{self.cfg.share_group}/", "$share/***/") for t in self.subscriptions))  # the group is a secret  # noqa: E501

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        if any(rc.is_failure for rc in reason_codes):
            log.error("broker refused the subscriptions %s: %s", self.subscriptions, reason_codes)
            return
        self.subscribed.set()
        if self.ready_file:
            # Lets a supervisor (the demo, a test) start the vans only once batches have a taker.
            with open(self.ready_file, "w", encoding="ascii") as f:
                f.write("subscribed\n")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.connected.clear()
        log.warning("receiver disconnected: %s", reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        # Handed to the worker thread: while it commits one group, the next one queues up
        # here (at most the broker's in-flight window), and is stored with one commit.
        self._inbox.put((msg, int(time.time() * 1000)))

    def _work_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                group = [self._inbox.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            self._handle_group(group)

    def _handle_group(self, group: list[tuple[mqtt.MQTTMessage, int]]) -> None:
        """Store the group's batches in one transaction, then answer and ack every message in order."""
        client = self.client
        routes = [self.ingestor.route(m.topic) for m, _ in group]
        uploads = [i for i, r in enumerate(routes) if r is None or r[1] not in ("sync", "status")]
        try:
            outcomes = dict(zip(uploads, self.ingestor.handle_many(
                [(group[i][0].topic, group[i][0].payload, group[i][1]) for i in uploads])))
        except Exception:
            # The store failed (not the payloads): leave them un-acked so the broker
            # delivers them again, and keep running.
            log.exception("store failure while ingesting %d uploads; they will be redelivered", len(uploads))
            outcomes = None
        crash_point("receiver.commit.after")
        for i, ((msg, now_ms), route) in enumerate(zip(group, routes)):
            try:
                if route is not None and route[1] == "sync":
                    for ack in self.ingestor.handle_sync(route[0], msg.payload):
                        client.publish(ack_topic(self.cfg.topic_prefix, route[0]), encode_ack(ack), qos=1)
                elif route is not None and route[1] == "status":
                    self.ingestor.handle_status(route[0], msg.payload, now_ms)
                elif outcomes is None:
                    continue
                else:
                    outcome = outcomes[i]
                    if outcome.device is not None and outcome.ack is not None:
                        client.publish(ack_topic(self.cfg.topic_prefix, outcome.device), encode_ack(outcome.ack),
                                       qos=1)
            except Exception:
                log.exception("store failure on %s; will be redelivered", msg.topic)
                continue
            client.ack(msg.mid, msg.qos)

    def _derive_loop(self) -> None:
        """Derive queued batches on a connection of its own, until stopped; never dies of an error."""
        store: Store | None = None
        while not self._stopping.is_set():
            try:
                store = store or open_store(self.cfg.store, max_gap_s=self.cfg.max_gap_s)
                # A read first: an empty queue then costs no write lock.
                if store.derive_backlog() and store.derive_pending(limit=20):
                    continue
            except Exception:
                log.exception("deriving failed; the batches stay queued and are tried again")
                if store is not None:
                    store.close()
                    store = None
                self._stopping.wait(DERIVE_RETRY_S)
            # Inline, the thread only drains what another mode left queued: a look now and then.
            self._stopping.wait(DERIVE_POLL_S if self.cfg.derive == "background" else DERIVE_IDLE_POLL_S)
        if store is not None:
            store.close()

    def _start_threads(self) -> None:
        if not self.worker.is_alive():
            self.worker.start()
        if self.deriver is not None and not self.deriver.is_alive():
            self.deriver.start()

    def start(self) -> None:
        self._start_threads()
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=30)
        self.client.loop_start()

    def run_forever(self) -> None:
        self._start_threads()
        self.client.connect(self.cfg.host, self.cfg.port, keepalive=30)
        self.client.loop_forever(retry_first_connection=True)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.stop_threads()
        self.store.close()

    def stop_threads(self) -> None:
        """Stop the worker and deriver threads (after the MQTT loop has stopped)."""
        self._stopping.set()
        for t in (self.worker, self.deriver):
            if t is not None and t.is_alive():
                t.join(timeout=30)
