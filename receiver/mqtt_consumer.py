"""The receiver as an MQTT consumer.

paho with ``manual_ack=True``: a message is acknowledged to the broker only
after its batch is committed in the store and the device has been answered,
so a receiver killed at any point makes the broker deliver the batch again
(and the store's idempotence turns that into a ``duplicate`` ack).

Outages (docs/architecture.md, "Outages"): when the store fails, the worker
keeps the group it holds and tries it again with capped exponential backoff,
taking nothing new meanwhile. Every message stays un-acked but is never
dropped, so nothing depends on the broker re-sending it: the broker stops at
its in-flight window (which bounds what waits in the inbox) and goes on as soon
as the held group is stored and acked. The store is opened lazily and the
broker dialled until it answers, so the receiver starts while either is down.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from collections.abc import Callable
from typing import TypeVar

from core.faultpoints import crash_point
from receiver.budget import Cost, peek
from receiver.liveness import PgPing, StoreProbe
from receiver.config import ReceiverConfig, pg_timeouts
from receiver.health import Health, error_text
from receiver.ingest import Ingestor, Outcome
from receiver.lazy_store import LazyStore
from receiver.store import Store
from receiver.store_factory import open_store
from core.wire import ACK_REJECTED, ack_topic, ack_version_for, encode_ack, sync_ack_version

log = logging.getLogger(__name__)

T = TypeVar("T")
# message, received_ms, its budget cost (values, bytes), its inflated body (decoded from it: inflated once)
Held = tuple[mqtt.MQTTMessage, int, Cost, bytes | None]
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
        self.health = Health(cfg.health_file or None)
        # Opened on first use (and again until it opens): the receiver starts with the store down.
        self.store: Store = store or LazyStore(lambda: open_store(cfg.store, max_gap_s=cfg.max_gap_s,
                                                                             pm_kappa=cfg.pm_kappa,
                                                                             pg_timeouts=pg_timeouts(cfg)))  # type: ignore[assignment]
        self.ingestor = Ingestor(self.store, cfg.topic_prefix, derive=cfg.derive == "inline")
        self._stopping = threading.Event()
        self._stop_requested = threading.Event()  # run_forever returns once set (request_stop)
        # At most the broker's in-flight window (max_inflight_messages): the worker acks only
        # what has an outcome, and the broker sends nothing more past that window.
        self._inbox: queue.Queue[tuple[mqtt.MQTTMessage, int]] = queue.Queue()
        self._carry: Held | None = None  # taken from the inbox but over the last group's budget
        self.held = 0  # messages the worker holds un-acked right now (a figure for tests and health)
        self.worker = threading.Thread(target=self._work_loop, name="ingest", daemon=True)
        # Also in inline mode: it drains what a previous run in another mode left queued.
        self.deriver: threading.Thread | None = None
        if cfg.derive != "separate":
            self.deriver = threading.Thread(target=self._derive_loop, name="deriver", daemon=True)
        # A frozen PostgreSQL shows within seconds, also while no upload arrives (liveness.py).
        self.probe: StoreProbe | None = None
        self._heals_uncounted = 0  # outages the probe ended: counted in the store by the worker
        self._call_began: float | None = None  # monotonic start of the worker's store call now
        if cfg.store_probe_s > 0 and pg_timeouts(cfg) is not None:
            self.probe = StoreProbe(PgPing(cfg.store, cfg.store_probe_timeout_s), self.health, cfg.store_probe_s,
                                    held=lambda: self.held, on_heal=self._probe_healed, stopping=self._stopping,
                                    held_for=self._held_for)
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
        # Small on purpose: after a broker restart the receiver re-subscribes (session kept:
        # clean_session=False) at once, so vans' first batches are stored within seconds.
        self.client.reconnect_delay_set(min_delay=cfg.broker_retry_min_s, max_delay=cfg.broker_retry_max_s)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
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
            self.health.broker_lost(f"refused: {reason_code}")
            return
        client.subscribe([(t, 1) for t in self.subscriptions])
        self.connected.set()
        self.health.broker_connected()
        # The share group is a secret (a van that knows it can join the receivers' group).
        log.info("receiver subscribed to %s", ", ".join(
            t.replace(f"$share/{self.cfg.share_group}/", "$share/***/") for t in self.subscriptions))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        if any(rc.is_failure for rc in reason_codes):
            log.error("broker refused the subscriptions %s: %s", self.subscriptions, reason_codes)
            return
        self.subscribed.set()
        if self.ready_file:
            # Lets a supervisor (the demo, a test) start the vans only once batches have a taker.
            with open(self.ready_file, "w", encoding="ascii") as f:
                f.write("subscribed\n")

    def _on_connect_fail(self, client, userdata) -> None:  # type: ignore[no-untyped-def]
        # Broker down or unreachable: paho dials again after the reconnect delay.
        self.health.broker_lost("connection failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.connected.clear()
        if reason_code.is_failure:  # not our own disconnect() at stop
            self.health.broker_lost(f"disconnected: {reason_code}")
        else:
            log.info("receiver disconnected from the broker")

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        # Handed to the worker thread: while it commits one group, the next one queues up
        # here (at most the broker's in-flight window), and is stored with one commit.
        self._inbox.put((msg, int(time.time() * 1000)))

    def _work_loop(self) -> None:
        # Open the store now rather than at the first upload: a store that is down at start
        # shows in the health file and the log at once (and is waited for).
        if isinstance(self.store, LazyStore) and self._until_stored(self.store.get, 0) is None:
            return
        while not self._stopping.is_set():
            group = self._next_group()
            if group:
                self._handle_group(group)

    def _next_group(self, group: list[Held] | None = None) -> list[Held]:
        """What queued up, to one transaction: within the budget of decoded values, bytes and uploads.

        An upload's cost is known before it is decoded (receiver/budget.py); one
        over the whole budget makes a group of its own. Given ``group``: tops it
        up with what is waiting (no waiting for more).
        """
        group = [] if group is None else group
        values = sum(c.values for _, _, c, _ in group)
        size = sum(c.bytes for _, _, c, _ in group)
        while len(group) < self.cfg.group_uploads:
            item = self._carry
            self._carry = None
            if item is None:
                try:
                    msg, now_ms = self._inbox.get(timeout=0.2) if not group else self._inbox.get_nowait()
                except queue.Empty:
                    break
                item = (msg, now_ms, *peek(msg.payload))
            cost = item[2]
            if group and (values + cost.values > self.cfg.group_values or size + cost.bytes > self.cfg.group_bytes):
                self._carry = item
                break
            group.append(item)
            values += cost.values
            size += cost.bytes
        return group

    def _until_stored(self, work: Callable[[], T], held: int, before_retry: Callable[[], None] | None = None
                      ) -> T | None:
        """``work()`` until the store takes it, with capped exponential backoff; None if stopping.

        Any exception is an outage here: the ingestor answers every upload it
        can judge (stored, duplicate, rejected) and raises only when the store
        fails, so retrying is right and nothing is acked without an outcome.
        ``held``: messages kept un-acked meanwhile (for health);
        ``before_retry`` runs before each new attempt.
        """
        delay = self.cfg.store_retry_min_s
        while True:
            self._call_began = time.monotonic()
            try:
                out = work()
            except Exception as exc:
                self._call_began = None
                self.health.store_failed(exc, max(held, self.held))
                log.debug("store attempt failed (%s); again in %.1f s", error_text(exc), delay)
                if self._stopping.wait(delay):
                    return None  # un-acked: the broker delivers it to the next run
                delay = min(delay * 2, self.cfg.store_retry_max_s)
                if before_retry is not None:
                    before_retry()
                continue
            self._call_began = None
            healed = self.health.store_ok()
            if healed is not None or self._heals_uncounted:
                n, self._heals_uncounted = (healed is not None) + self._heals_uncounted, 0
                try:
                    self.store.count("store_outages", n)
                except Exception:  # the figure is worth a try, not a second outage
                    pass
            return out

    def _held_for(self) -> float | None:
        """Seconds the worker's current store call has taken (None: not in one); for the probe."""
        began = self._call_began
        return None if began is None else time.monotonic() - began

    def _probe_healed(self) -> None:
        # The probe thread must not use the worker's store connection: the worker counts it.
        self._heals_uncounted += 1

    def _handle_group(self, group: list[Held]) -> None:
        """Store the group's batches in one transaction, then answer and ack every message in order."""
        client = self.client
        self.held = len(group)
        routes: list[tuple[str, str] | None] = []
        uploads: list[int] = []

        def ingest() -> list[Outcome]:
            routes[:] = [self.ingestor.route(m.topic) for m, _, _, _ in group]
            uploads[:] = [i for i, r in enumerate(routes) if r is None or r[1] not in ("sync", "status")]
            # A message the broker delivers again (DUP: the receiver lost its connection before
            # the ack) may already be a dead letter: it is then not written twice.
            return self.ingestor.handle_many(
                [(group[i][0].topic, group[i][0].payload, group[i][1]) for i in uploads],
                redelivered={k for k, i in enumerate(uploads) if group[i][0].dup},
                inflated=[group[i][3] for i in uploads],
                mids=[group[i][0].mid for i in uploads]) if uploads else []

        def top_up() -> None:
            # During an outage what arrives meanwhile joins the held group (within the budget):
            # the retry that succeeds stores everything held in one commit.
            self._next_group(group)
            self.held = len(group)

        got = self._until_stored(ingest, len(group), top_up)
        if got is None:
            return
        outcomes = dict(zip(uploads, got))
        if uploads:  # after a commit: a group of status and sync messages alone commits nothing here
            crash_point("receiver.commit.after")
        for i, ((msg, now_ms, _, _), route) in enumerate(zip(group, routes)):
            if route is not None and route[1] == "sync":
                acks = self._until_stored(lambda: self.ingestor.handle_sync(route[0], msg.payload), len(group) - i)
                if acks is None:
                    return
                form = sync_ack_version(msg.payload)  # binary only if the van asked for it
                for ack in acks:
                    client.publish(ack_topic(self.cfg.topic_prefix, route[0]), encode_ack(ack, form), qos=1)
            elif route is not None and route[1] == "status":
                if self._until_stored(lambda: self.ingestor.handle_status(route[0], msg.payload, now_ms) or True,
                                      len(group) - i) is None:
                    return
            else:
                outcome = outcomes[i]
                if outcome.device is not None and outcome.ack is not None:
                    # In the form the batch's wire version reads (binary from v4; older vans: JSON).
                    client.publish(ack_topic(self.cfg.topic_prefix, outcome.device),
                                   encode_ack(outcome.ack, ack_version_for(msg.payload)), qos=1)
            client.ack(msg.mid, msg.qos)
        self.held = 0
        if any(o.ack is not None and o.ack.status == ACK_REJECTED for o in outcomes.values()):
            # Acked: a DUP copy of these bytes is now a new upload, with a dead letter of its own.
            try:
                self.store.dead_letters_acked()
            except Exception as exc:  # the marks stay: at worst a later DUP copy is not counted again
                log.warning("could not clear the dead letters' un-acked marks (%s)", error_text(exc))

    def _derive_loop(self) -> None:
        """Derive queued batches on a connection of its own, until stopped; never dies of an error.

        A batch that cannot be derived is parked by the store (with its reason) and the
        others go on; what reaches here is the store failing: one log line when that
        starts and one when it ends, not one per retry.
        """
        store: Store | None = None
        failing = False
        while not self._stopping.is_set():
            try:
                store = store or open_store(self.cfg.store, max_gap_s=self.cfg.max_gap_s, pm_kappa=self.cfg.pm_kappa,
                                              pg_timeouts=pg_timeouts(self.cfg))
                # A read first: an empty queue then costs no write lock.
                busy = bool((store.derive_backlog() or store.positions_deferred())
                            and store.derive_pending(limit=20))
                if failing:
                    log.warning("deriving again: the store answers")
                    failing = False
                if busy:
                    continue
            except Exception as exc:
                if not failing:
                    log.error("deriving failed (%s); the batches stay queued and are tried again",
                              error_text(exc))
                    failing = True
                if store is not None:
                    try:
                        store.close()
                    except Exception:
                        pass
                    store = None
                self._stopping.wait(DERIVE_RETRY_S)
            # Inline, the thread only drains what another mode left queued: a look now and then.
            self._stopping.wait(DERIVE_POLL_S if self.cfg.derive == "background" else DERIVE_IDLE_POLL_S)
        if store is not None:
            store.close()

    def _start_threads(self) -> None:
        if not self.worker.is_alive():
            self.worker.start()
        if self.probe is not None and not self.probe.thread.is_alive():
            self.probe.start()
        if self.deriver is not None and not self.deriver.is_alive():
            self.deriver.start()

    def start(self) -> None:
        self._start_threads()
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=30)
        self.client.loop_start()

    def run_forever(self) -> None:
        """Run until ``request_stop()`` (the CLI's signal handler), then leave the broker.

        paho's loop runs in a thread of its own (``loop_start``), never ``loop_forever`` in
        the caller's: with no loop thread, paho writes a packet the worker queues (publish,
        ack) to the socket at once from the worker's thread, while the loop thread reads
        and pings on it. One OpenSSL object used by two threads at once corrupted the TLS
        stream under a flood (issue 13 re-test: "bad record mac" at the broker, a receiver
        that died in malloc, a 4-minute silent hang). With the loop thread, publish/ack/
        subscribe only append to paho's queue and wake the loop through its socketpair: every
        socket write happens on the network thread (tests/test_receiver_network_thread.py).
        """
        self.start()  # connect_async: a broker down at start is dialled again, the process waits
        # A timed wait: the signal handler that asks to stop runs in this (main) thread.
        while not self._stop_requested.wait(0.5):
            pass
        self.client.disconnect()
        self.client.loop_stop()

    def request_stop(self) -> None:
        """Ask ``run_forever`` to return (safe from a signal handler: it only sets an event)."""
        self._stop_requested.set()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.stop_threads()
        self.store.close()

    def stop_threads(self) -> None:
        """Stop the worker and deriver threads (after the MQTT loop has stopped)."""
        self._stopping.set()
        for t in (self.worker, self.deriver, self.probe.thread if self.probe else None):
            if t is not None and t.is_alive():
                t.join(timeout=30)
