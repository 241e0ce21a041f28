"""The read side: sealed batches waiting for their ack, by age or by key (any epoch)."""

from __future__ import annotations

from typing import AbstractSet, Any, Iterable

from core.wire import batch_id, parse_batch_id
from core.errors import PayloadError
from buffer.handle import FileHandle
from buffer.records import Key, SealedBatch


_BATCH_COLS = "first_seq, last_seq, n_samples, payload, sha256"
_SALV_COLS = "first_seq, last_seq, n_samples, payload, sha256, epoch, device"


class Outbox:
    """Reads sealed batches; never writes. Hides the ones acknowledged but not yet deleted."""

    def __init__(self, handle: FileHandle, deferred_acks: AbstractSet[str]) -> None:
        self._h = handle
        # The Acknowledger's set of acks a full card deferred (read only here): those batches
        # are delivered, so they are never handed out again.
        self._deferred_acks = deferred_acks

    def where(self, key: Key) -> tuple[str, str, tuple[Any, ...]] | None:
        """(table, WHERE clause, params) that name the batch ``key``, or None if not ours."""
        if isinstance(key, int):
            return "batches", "first_seq=?", (key,)
        try:
            device, epoch, first, last = parse_batch_id(key)
        except PayloadError:
            return None
        if epoch == self._h.epoch:
            return ("batches", "first_seq=? AND last_seq=?", (first, last)) if device == self._h.device_id else None
        return "salvaged", "epoch=? AND first_seq=? AND last_seq=? AND device=?", (epoch, first, last, device)

    def own(self, r: tuple[Any, ...]) -> SealedBatch:
        epoch = self._h.epoch
        return SealedBatch(batch_id(self._h.device_id, epoch, r[0], r[1]), r[0], r[1], r[2], r[3], r[4], epoch)

    @staticmethod
    def salv(r: tuple[Any, ...]) -> SealedBatch:
        return SealedBatch(batch_id(r[6], r[5], r[0], r[1]), r[0], r[1], r[2], r[3], r[4], r[5])

    def pending(self, limit: int, exclude: Iterable[Key] = frozenset()) -> list[SealedBatch]:
        """Sealed batches not yet acknowledged, oldest first (earlier epochs before this one).

        ``exclude`` holds batches already in flight: ints are first_seq of this
        epoch's batches (the old form), strings are batch ids (any epoch).
        """
        ex = set(exclude) | self._deferred_acks
        out: list[SealedBatch] = []
        sources = (
            (f"SELECT {_SALV_COLS} FROM salvaged ORDER BY rowid", self.salv),
            (f"SELECT {_BATCH_COLS} FROM batches ORDER BY first_seq", self.own),
        )
        for sql, make in sources:
            offset = 0
            while len(out) < limit:
                rows = self._h.db.execute(f"{sql} LIMIT ? OFFSET ?", (limit + len(ex), offset)).fetchall()
                if not rows:
                    break
                offset += len(rows)
                for r in rows:
                    sb = make(r)
                    if sb.batch_id in ex or (sb.epoch == self._h.epoch and sb.first_seq in ex):
                        continue
                    out.append(sb)
                    if len(out) >= limit:
                        break
        return out

    def newest(self, limit: int, exclude: Iterable[Key] = frozenset()) -> list[SealedBatch]:
        """This epoch's newest sealed batches, newest first: fresh data while a backlog drains."""
        ex = set(exclude) | self._deferred_acks
        rows = self._h.db.execute(
            f"SELECT {_BATCH_COLS} FROM batches ORDER BY first_seq DESC LIMIT ?", (limit + len(ex),)
        ).fetchall()
        out = [sb for sb in map(self.own, rows) if sb.batch_id not in ex and sb.first_seq not in ex]
        return out[:limit]

    def get(self, key: Key) -> SealedBatch | None:
        """A batch by this epoch's first_seq, or by batch id (any epoch); None if gone (or acked)."""
        sb = self.peek(key)
        return None if sb is None or sb.batch_id in self._deferred_acks else sb

    def peek(self, key: Key) -> SealedBatch | None:
        """A batch by key, acknowledged or not."""
        where = self.where(key)
        if where is None:
            return None
        table, cond, params = where
        cols = _BATCH_COLS if table == "batches" else _SALV_COLS
        r = self._h.db.execute(f"SELECT {cols} FROM {table} WHERE {cond}", params).fetchone()
        if r is None:
            return None
        return self.own(r) if table == "batches" else self.salv(r)
