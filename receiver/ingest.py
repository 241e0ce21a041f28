"""Validate one upload, store it, and say what to answer. No MQTT in here.

The decision for every payload:

* decodes, comes from the device its topic names, stores  -> ack ``stored``
* same batch id and bytes as one already stored             -> ack ``duplicate``
* anything permanently wrong (malformed, unknown version,
  too large, device mismatch, same id with other bytes)     -> dead-letter + ack ``rejected``

A failure of the store itself (disk full, database locked too long) is not the
payload's fault: it propagates, the broker message stays un-acknowledged and
is delivered again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from edge.errors import PayloadError
from receiver.store import IngestResult, Store
from uplink.wire import (
    ACK_DUPLICATE,
    decode_status,
    decode_sync,
    split_topic,
    ACK_REJECTED,
    ACK_STORED,
    MAX_PAYLOAD_BYTES,
    Ack,
    Batch,
    content_hash,
    decode_batch,
    device_from_topic,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    device: str | None  # whom to answer (from the topic: the broker vouches for that)
    ack: Ack | None


class Ingestor:
    def __init__(self, store: Store, topic_prefix: str = "datalab/v1", *, derive: bool = True) -> None:
        self.store = store
        self.prefix = topic_prefix
        self.derive = derive  # False: store raw and queue; a deriver does the rest after the ack
        self.counters = {"stored": 0, "duplicate": 0, "rejected": 0}

    def handle(self, topic: str, payload: bytes, received_ms: int) -> Outcome:
        return self.handle_many([(topic, payload, received_ms)])[0]

    def handle_many(self, msgs: Sequence[tuple[str, bytes, int]]) -> list[Outcome]:
        """Outcomes for several uploads (topic, payload, received_ms), stored in one transaction.

        Each payload is judged on its own: a malformed one is dead-lettered and
        rejected without holding up the others. Should the store refuse the
        group for one batch's content (a batch id arriving with other bytes),
        the batches are stored one by one so only that one is rejected.
        """
        out: list[Outcome | None] = [None] * len(msgs)
        good: list[tuple[int, str, Batch, str, int]] = []
        for i, (topic, payload, received_ms) in enumerate(msgs):
            device = device_from_topic(self.prefix, topic)
            digest = content_hash(payload)
            try:
                good.append((i, device or "", self._decode(topic, device, payload), digest, received_ms))
            except PayloadError as exc:
                out[i] = self._reject(topic, device, "", exc, payload, digest, received_ms)
        if good:
            try:
                results = self.store.ingest_many([(b, d, r) for _, _, b, d, r in good], derive=self.derive)
            except PayloadError:
                results = None
            if results is not None:
                for (i, device, b, d, _), res in zip(good, results):
                    out[i] = self._answer(device, b, d, res)
            else:
                for i, device, b, d, r in good:
                    topic, payload, _ = msgs[i]
                    try:
                        res = self.store.ingest(b, d, r, derive=self.derive)
                    except PayloadError as exc:
                        out[i] = self._reject(topic, device, b.batch_id, exc, payload, d, r)
                    else:
                        out[i] = self._answer(device, b, d, res)
        done = [o for o in out if o is not None]
        assert len(done) == len(msgs), "every upload gets an outcome, in order"  # the service zips them
        return done

    def _decode(self, topic: str, device: str | None, payload: bytes) -> Batch:
        if device is None:
            raise PayloadError(f"topic {topic!r} is not a device batch topic")
        batch = decode_batch(payload)
        if batch.device != device:
            raise PayloadError(f"payload claims device {batch.device!r} but arrived on {device!r}'s topic")
        return batch

    def _reject(
        self, topic: str, device: str | None, bid: str, exc: PayloadError, payload: bytes, digest: str,
        received_ms: int,
    ) -> Outcome:
        reason = str(exc)
        log.warning("rejected upload on %s: %s", topic, reason)
        self.store.dead_letter(topic, device, reason, payload[:MAX_PAYLOAD_BYTES], digest, received_ms)
        self.counters["rejected"] += 1
        return Outcome(device, Ack(bid, ACK_REJECTED, reason, digest))

    def _answer(self, device: str, batch: Batch, digest: str, result: IngestResult) -> Outcome:
        self.counters[result.status] += 1
        status = ACK_STORED if result.status == "stored" else ACK_DUPLICATE
        return Outcome(device, Ack(batch.batch_id, status, "", digest))

    def handle_sync(self, device: str, payload: bytes) -> list[Ack]:
        """Acks for the batches a device names that are already committed (lost-ack healing)."""
        try:
            ids = decode_sync(payload)
        except PayloadError as exc:
            log.warning("ignored sync request from %s: %s", device, exc)
            return []
        # A device may only ask about its own batches.
        mine = [i for i in ids if i.startswith(device + "/")]
        known = self.store.known_batches(mine)
        if known:
            self.store.count("resync_acks", len(known))
        return [Ack(bid, ACK_DUPLICATE, "already committed", sha) for bid, sha in known]

    def handle_status(self, device: str, payload: bytes, received_ms: int) -> None:
        try:
            status = decode_status(payload)
        except PayloadError as exc:
            log.warning("ignored status from %s: %s", device, exc)
            return
        status["device"] = device  # the topic, vouched for by the broker, names it
        self.store.record_status(device, status, received_ms)

    def route(self, topic: str) -> tuple[str, str] | None:
        return split_topic(self.prefix, topic)
