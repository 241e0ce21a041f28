"""Validate one upload, store it, and say what to answer. No MQTT in here.

The decision for every payload:

* decodes, passes the admission schema (receiver/validate.py),
  comes from the device its topic names, stores             -> ack ``stored``
* same batch id and bytes as one already stored             -> ack ``duplicate``
* anything permanently wrong (malformed, unknown version,
  too large, out of bounds, device mismatch, same id with
  other bytes, or a write the store refuses for this upload
  alone)                                                    -> dead-letter + ack ``rejected``

A failure of the store itself (disk full, database locked too long or
unreachable) is not the payload's fault: ``StoreUnavailable`` propagates, the
broker messages stay un-acknowledged and are delivered again. The two are told
apart by what fails, never by an exception's type being unknown: a failure the
store names its own (``Store.is_outage``) is an outage; after any other, a
trivial write (a counter) is tried: if it fails too, the store is at fault; if
it works, the upload is tried once more and, failing again, is at fault.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from core.errors import PayloadError, StoreUnavailable
from receiver.store import DeadLetter, IngestResult, Store
from receiver.validate import check_batch, check_status, clean_ids
from core.wire import (
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

T = TypeVar("T")

MAX_REASON_CHARS = 500  # a reason quotes exceptions; hostile content must not make it huge
# The trivial write that tells a bad upload from a bad store; its count is how many
# writes failed without the store naming an outage.
PROBE_COUNTER = "store_probes"


def clean_text(text: str | None, limit: int = MAX_REASON_CHARS) -> str | None:
    """Text any store can hold in a text column: no NUL, valid UTF-8, bounded."""
    if text is None:
        return None
    text = text.replace("\x00", "\\x00")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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

    def handle_many(self, msgs: Sequence[tuple[str, bytes, int]],
                    redelivered: Collection[int] = (), inflated: Sequence[bytes | None] = (),
                    mids: Sequence[int | None] = ()) -> list[Outcome]:
        """Outcomes for several uploads (topic, payload, received_ms), in order, stored in one transaction.

        Each upload gets its own outcome whatever it contains: a malformed or
        out-of-bounds one is dead-lettered and rejected before the store sees
        it. Should the store refuse the group, the batches are stored one by
        one so only the culprit is rejected. Raises ``StoreUnavailable`` only
        when the store itself is failing (then none of the group is answered).
        ``inflated[i]``: upload i's body already inflated by the budget's peek (or None);
        ``mids[i]``: its MQTT packet id, kept with a dead letter's un-acked mark (store.py
        ``_dead_letter_again``: a redelivered copy matches only its own mark).
        """
        out: list[Outcome | None] = [None] * len(msgs)
        mid = [*mids, *[None] * (len(msgs) - len(mids))]
        good: list[tuple[int, str, Batch, str, int]] = []
        dead: list[DeadLetter] = []
        for i, (topic, payload, received_ms) in enumerate(msgs):
            device = device_from_topic(self.prefix, topic)
            digest = content_hash(payload)
            try:
                body = inflated[i] if i < len(inflated) else None
                good.append((i, device or "", self._decode(topic, device, payload, body), digest, received_ms))
            except PayloadError as exc:
                out[i] = self._reject(topic, device, "", str(exc), payload, digest, received_ms,
                                      i in redelivered, mid[i], dead)
            except Exception as exc:  # noqa: BLE001 - decoding never touches the store: the payload's fault
                log.exception("decoder failed on an upload on %s", clean_text(topic))
                reason = f"malformed payload: {type(exc).__name__}"
                out[i] = self._reject(topic, device, "", reason, payload, digest, received_ms,
                                      i in redelivered, mid[i], dead)
        self._keep_all(dead)  # before the batches: an outage here leaves the whole group un-acked
        if good:
            try:
                results: list[IngestResult] | None = self.store.ingest_many(
                    [(b, d, r) for _, _, b, d, r in good], derive=self.derive)
            except Exception as exc:  # noqa: BLE001 - which upload (or the store) is at fault: one by one
                if self.store.is_outage(exc):
                    log.debug("store unavailable while storing %d uploads: %s", len(good), _brief(exc))
                    raise StoreUnavailable(f"store failed while storing a group: {_brief(exc)}") from exc
                results = None
            if results is not None:
                for (i, device, b, d, _), res in zip(good, results):
                    out[i] = self._answer(device, b, d, res)
            else:
                for i, device, b, d, r in good:
                    topic, payload, _ = msgs[i]
                    try:
                        res = self._guarded(lambda: self.store.ingest(b, d, r, derive=self.derive),
                                            f"storing {b.batch_id}")
                    except PayloadError as exc:
                        out[i] = self._reject(topic, device, b.batch_id, str(exc), payload, d, r,
                                              i in redelivered, mid[i])
                    else:
                        out[i] = self._answer(device, b, d, res)
        done = [o for o in out if o is not None]
        assert len(done) == len(msgs), "every upload gets an outcome, in order"  # the service zips them
        return done

    def _guarded(self, write: Callable[[], T], what: str) -> T:
        """``write()``, judging a failure: the store's own (``is_outage``: locked, full,
        unreachable) is ``StoreUnavailable``. Any other is tried once more if the store still
        takes a trivial write (a transient conflict passes then); failing again it is the
        upload's (``PayloadError``), and failing the trivial write it is the store's."""
        for attempt in (1, 2):
            try:
                return write()
            except PayloadError:
                raise
            except Exception as exc:  # noqa: BLE001 - judged here
                if self.store.is_outage(exc):
                    log.debug("store unavailable while %s: %s", what, _brief(exc))
                    raise StoreUnavailable(f"store failed while {what}: {_brief(exc)}") from exc
                failure = exc
            try:
                self.store.count(PROBE_COUNTER)
            except Exception as probe_exc:  # noqa: BLE001 - the store is failing as a whole
                log.debug("store unavailable while %s: %s; then %s", what, _brief(failure), _brief(probe_exc))
                raise StoreUnavailable(f"store failed while {what}: {_brief(probe_exc)}") from probe_exc
        log.warning("the store refused one upload (%s): %s", what, _brief(failure))
        raise PayloadError(f"the store could not hold this upload: {_brief(failure)}") from failure

    def _decode(self, topic: str, device: str | None, payload: bytes, inflated: bytes | None = None) -> Batch:
        if device is None:
            raise PayloadError(f"topic {clean_text(topic, 200)!r} is not a device batch topic")
        batch = check_batch(decode_batch(payload, inflated))
        if batch.device != device:
            raise PayloadError(f"payload claims device {batch.device!r} but arrived on {device!r}'s topic")
        return batch

    def _reject(
        self, topic: str, device: str | None, bid: str, reason: str, payload: bytes, digest: str,
        received_ms: int, redelivered: bool = False, mid: int | None = None,
        later: list[DeadLetter] | None = None,
    ) -> Outcome:
        """Dead-letter the upload and answer ``rejected``. Hostile text (NUL, lone surrogates,
        huge reasons) is made storable first; the payload bytes are kept as they came.
        ``later``: the dead letter is appended there, for ``_keep_all`` to write with the group's."""
        reason = clean_text(reason) or "rejected"
        topic_text = clean_text(topic, 1000) or ""
        log.warning("rejected upload on %s: %s", topic_text, reason)
        dead = DeadLetter(topic_text, clean_text(device, 200), reason, payload[:MAX_PAYLOAD_BYTES], digest,
                          received_ms, redelivered, mid)
        if later is None:
            self._keep_all([dead])
        else:
            later.append(dead)
        return Outcome(device, Ack(bid, ACK_REJECTED, reason, digest))

    def _keep_all(self, dead: list[DeadLetter]) -> None:
        """A group's dead letters in one transaction: a flood of rejections costs one commit, not
        one each (issue 13: on PostgreSQL they were 56 % of a hostile group's time, and a van
        behind the flood waited). Refused as a whole for a reason of its own: one by one."""
        if not dead:
            return
        try:
            self._guarded(lambda: self.store.dead_letter_many(dead), f"dead-lettering {len(dead)} uploads")
        except PayloadError:
            for d in dead:
                self._keep(d)
        self.counters["rejected"] += len(dead)  # once written: an outage raised above, to be retried

    def _keep(self, d: DeadLetter) -> None:
        try:
            self._guarded(lambda: self.store.dead_letter_many([d]), "dead-lettering an upload")
        except PayloadError as exc:
            # Cleaned text and bytes should always store; if not, keep the record without the payload
            # (its hash stays) rather than leave the upload without an outcome.
            log.error("dead letter refused (%s); storing it without its payload", exc)
            bare = replace(d, reason=f"{d.reason} (payload not kept: {exc})"[:1000], payload=b"")
            try:
                self._guarded(lambda: self.store.dead_letter_many([bare]),
                              "dead-lettering an upload without its payload")
            except PayloadError:
                log.error("dead letter for %s refused twice; answered rejected all the same", d.sha256)

    def _answer(self, device: str, batch: Batch, digest: str, result: IngestResult) -> Outcome:
        self.counters[result.status] += 1
        status = ACK_STORED if result.status == "stored" else ACK_DUPLICATE
        return Outcome(device, Ack(batch.batch_id, status, "", digest))

    def handle_sync(self, device: str, payload: bytes) -> list[Ack]:
        """Acks for the batches a device names that are already committed (lost-ack healing).

        A request that is malformed or names ids no store can look up is ignored
        (logged); only ``StoreUnavailable`` escapes."""
        try:
            ids = clean_ids(decode_sync(payload))
        except PayloadError as exc:
            log.warning("ignored sync request from %s: %s", clean_text(device, 200), exc)
            return []
        # A device may only ask about its own batches.
        mine = [i for i in ids if i.startswith(device + "/")]
        if not mine:
            return []

        def lookup() -> list[tuple[str, str]]:
            found = self.store.known_batches(mine)
            if found:
                self.store.count("resync_acks", len(found))
            return found

        try:
            known = self._guarded(lookup, "answering a sync request")
        except PayloadError as exc:
            log.warning("ignored sync request from %s: %s", clean_text(device, 200), exc)
            return []
        return [Ack(bid, ACK_DUPLICATE, "already committed", sha) for bid, sha in known]

    def handle_status(self, device: str, payload: bytes, received_ms: int) -> None:
        """Keep a heartbeat; a malformed or out-of-bounds one is ignored (logged).
        Only ``StoreUnavailable`` escapes."""
        try:
            status = check_status(decode_status(payload))
            status["device"] = device  # the topic, vouched for by the broker, names it
            self._guarded(lambda: self.store.record_status(device, status, received_ms), "recording a status")
        except PayloadError as exc:
            log.warning("ignored status from %s: %s", clean_text(device, 200), exc)

    def route(self, topic: str) -> tuple[str, str] | None:
        return split_topic(self.prefix, topic)


def _brief(exc: BaseException) -> str:
    return clean_text(f"{type(exc).__name__}: {exc}", 300) or ""
