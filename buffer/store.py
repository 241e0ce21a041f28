"""The device's store-and-forward queue: samples in, sealed batches out.

Life of a sample here:

1. ``commit(samples)``: a group of samples is inserted in one transaction (one
   fsync). ``seq`` comes from an AUTOINCREMENT key, so a number is never
   reused, even after deletes; with the database's random ``epoch`` it is the
   sample's identity.
2. ``seal(max_samples)``: the oldest unsealed samples are encoded into one
   immutable batch (bytes and content hash stored), and the samples rows are
   deleted in the same transaction. The same batch id always carries the same
   bytes, so the receiver can deduplicate.
3. ``acknowledge(first_seq)``: the receiver said the batch is committed in the
   store: only now is it deleted.

Gap records (intentional drops) ride along in the next sealed batch.

SQLite in WAL mode with ``synchronous=FULL``: a commit that returned is on the
card. Only one thread touches a ``Buffer``.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from edge.model import Sample, TimeSource
from uplink.wire import Batch, Gap, batch_id, content_hash, encode_batch

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sensor TEXT NOT NULL,
    t_utc_ms INTEGER,  -- NULL: time unknown
    t_mono_ms INTEGER NOT NULL,
    time_src TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    vals TEXT NOT NULL,
    flags TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    payload BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    sealed_utc_ms INTEGER NOT NULL,
    oldest_utc_ms INTEGER  -- earliest sample time inside, for the heartbeat's backlog age
);
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    sent_in INTEGER  -- first_seq of the batch that carries it, NULL until sealed
);
"""


@dataclass(frozen=True, slots=True)
class SealedBatch:
    batch_id: str
    first_seq: int
    last_seq: int
    n_samples: int
    payload: bytes
    sha256: str


@dataclass(frozen=True, slots=True)
class BufferStats:
    unsealed: int
    batches: int
    backlog_samples: int
    oldest_unsent_utc_ms: int | None
    last_seq: int
    file_bytes: int


class Buffer:
    def __init__(self, path: str | Path, device_id: str) -> None:
        self.path = Path(path)
        self.device_id = device_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a group of
        # samples is exactly one transaction and one fsync.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self.epoch = self._init_epoch()
        self._unsealed = self._db.execute("SELECT count(*) FROM samples").fetchone()[0]

    # -- identity -------------------------------------------------------------

    def _init_epoch(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row:
            return str(row[0])
        epoch = secrets.token_hex(8)
        with self._tx():
            self._db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
            self._db.execute("INSERT INTO meta VALUES ('device', ?)", (self.device_id,))
            self._db.execute(
                "INSERT INTO meta VALUES ('created_utc', ?)", (str(int(time.time())),)
            )
        return epoch

    def _tx(self) -> "_Tx":
        return _Tx(self._db)

    # -- write side -----------------------------------------------------------

    def commit(self, samples: list[Sample]) -> list[int]:
        """Insert a group of samples in one transaction; returns their sequence numbers.

        When this returns, the samples are durable (WAL + synchronous=FULL) and
        the device owes them to the store.
        """
        if not samples:
            return []
        rows = [
            (
                s.sensor,
                s.t_utc_ms,
                s.t_mono_ms,
                str(s.time_src),
                s.boot_id,
                json.dumps(s.values, separators=(",", ":")),
                ",".join(s.flags),
            )
            for s in samples
        ]
        with self._tx():
            self._db.executemany(
                "INSERT INTO samples (sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags)"
                " VALUES (?,?,?,?,?,?,?)",
                rows,
            )
            last = self._db.execute("SELECT last_insert_rowid()").fetchone()[0]
        # AUTOINCREMENT with one writer: the group got consecutive numbers.
        seqs = list(range(last - len(samples) + 1, last + 1))
        for s, q in zip(samples, seqs):
            s.seq = q
        self._unsealed += len(samples)
        return seqs

    def add_gap(self, first_seq: int, last_seq: int, reason: str) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)",
                (first_seq, last_seq, reason),
            )

    def count_unsync(self, boot_id: str) -> int:
        """Unsealed samples of this boot stamped before the clock was trusted."""
        return self._db.execute(
            "SELECT count(*) FROM samples WHERE boot_id=? AND time_src='unsync'", (boot_id,)
        ).fetchone()[0]

    def correct_unsync(self, boot_id: str, offset_ms: int) -> int:
        """Re-stamp this boot's unsynchronised samples from their monotonic time.

        Only samples of the same boot can be corrected: their monotonic clock is
        the one the offset was measured on. Sealed batches are never touched.
        """
        with self._tx():
            cur = self._db.execute(
                "UPDATE samples SET t_utc_ms = t_mono_ms + ?, time_src = 'corrected'"
                " WHERE boot_id=? AND time_src='unsync'",
                (offset_ms, boot_id),
            )
        return cur.rowcount

    @property
    def unsealed_count(self) -> int:
        return self._unsealed

    def seal(self, max_samples: int, now_utc_ms: int) -> SealedBatch | None:
        """Seal the oldest unsealed samples (at most ``max_samples``) into one batch."""
        cur = self._db.execute(
            "SELECT seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags"
            " FROM samples ORDER BY seq LIMIT ?",
            (max_samples,),
        )
        samples = [
            Sample(
                sensor=r[1],
                t_utc_ms=r[2],
                t_mono_ms=r[3],
                time_src=TimeSource(r[4]),
                values=json.loads(r[6]),
                flags=tuple(f for f in r[7].split(",") if f),
                seq=r[0],
                boot_id=r[5],
            )
            for r in cur.fetchall()
        ]
        gaps_rows = self._db.execute(
            "SELECT id, first_seq, last_seq, reason FROM gaps WHERE sent_in IS NULL ORDER BY id"
        ).fetchall()
        if not samples and not gaps_rows:
            return None
        if samples:
            first, last = samples[0].seq, samples[-1].seq
        else:
            # Gaps alone still travel: they ride in an empty batch named after the gap range.
            first = min(g[1] for g in gaps_rows)
            last = max(g[2] for g in gaps_rows)
        assert first is not None and last is not None
        gaps = [Gap(g[1], g[2], g[3]) for g in gaps_rows]
        batch = Batch(self.device_id, self.epoch, first, last, samples, gaps)
        payload = encode_batch(batch)
        digest = content_hash(payload)
        with self._tx():
            if self._db.execute("SELECT 1 FROM batches WHERE first_seq=?", (first,)).fetchone():
                # Only a gaps-only batch can collide (its range was a batch before); such
                # gaps are already known to the receiver through that rejected range.
                self._db.execute(
                    "UPDATE gaps SET sent_in=-1 WHERE sent_in IS NULL AND id<=?",
                    (gaps_rows[-1][0],),
                )
                return None
            self._db.execute(
                "INSERT INTO batches VALUES (?,?,?,?,?,?,?)",
                (
                    first,
                    last,
                    len(samples),
                    payload,
                    digest,
                    now_utc_ms,
                    min((s.t_utc_ms for s in samples if s.t_utc_ms is not None), default=None),
                ),
            )
            if samples:
                self._db.execute("DELETE FROM samples WHERE seq BETWEEN ? AND ?", (first, last))
            if gaps_rows:
                self._db.execute(
                    "UPDATE gaps SET sent_in=? WHERE sent_in IS NULL AND id<=?",
                    (first, gaps_rows[-1][0]),
                )
        self._unsealed -= len(samples)
        return SealedBatch(batch.batch_id, first, last, len(samples), payload, digest)

    # -- read side ------------------------------------------------------------

    def pending(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[SealedBatch]:
        """Sealed batches not yet acknowledged, oldest first."""
        out: list[SealedBatch] = []
        offset = 0
        while len(out) < limit:
            rows = self._db.execute(
                "SELECT first_seq, last_seq, n_samples, payload, sha256 FROM batches"
                " ORDER BY first_seq LIMIT ? OFFSET ?",
                (limit + len(exclude), offset),
            ).fetchall()
            if not rows:
                break
            offset += len(rows)
            for r in rows:
                if r[0] in exclude:
                    continue
                out.append(
                    SealedBatch(batch_id(self.device_id, self.epoch, r[0], r[1]), r[0], r[1], r[2], r[3], r[4])
                )
                if len(out) >= limit:
                    break
        return out

    def get(self, first_seq: int) -> SealedBatch | None:
        r = self._db.execute(
            "SELECT first_seq, last_seq, n_samples, payload, sha256 FROM batches WHERE first_seq=?",
            (first_seq,),
        ).fetchone()
        if r is None:
            return None
        return SealedBatch(batch_id(self.device_id, self.epoch, r[0], r[1]), r[0], r[1], r[2], r[3], r[4])

    def acknowledge(self, first_seq: int) -> bool:
        """The receiver committed this batch: delete it. True if it was here."""
        with self._tx():
            cur = self._db.execute("DELETE FROM batches WHERE first_seq=?", (first_seq,))
            # Gaps carried by that batch are delivered with it.
            self._db.execute("DELETE FROM gaps WHERE sent_in=?", (first_seq,))
        return cur.rowcount > 0

    def reject(self, first_seq: int, last_seq: int, reason: str) -> bool:
        """The receiver refused this batch for good: drop it and own up with a gap record."""
        with self._tx():
            cur = self._db.execute("DELETE FROM batches WHERE first_seq=?", (first_seq,))
            if cur.rowcount:
                self._db.execute(
                    "INSERT INTO gaps (first_seq, last_seq, reason) VALUES (?,?,?)",
                    (first_seq, last_seq, f"rejected by receiver: {reason}"[:500]),
                )
        return cur.rowcount > 0

    def stats(self) -> BufferStats:
        nb, backlog, oldest_b = self._db.execute(
            "SELECT count(*), coalesce(sum(n_samples),0), min(oldest_utc_ms) FROM batches"
        ).fetchone()
        oldest_s = self._db.execute("SELECT min(t_utc_ms) FROM samples").fetchone()[0]
        present = [t for t in (oldest_b, oldest_s) if t is not None]
        oldest = min(present) if present else None
        last_seq = self._db.execute(
            "SELECT coalesce(max(seq),0) FROM sqlite_sequence WHERE name='samples'"
        ).fetchone()[0]
        size = sum(
            os.path.getsize(p)
            for p in (self.path, Path(str(self.path) + "-wal"))
            if p.exists()
        )
        return BufferStats(self._unsealed, nb, backlog + self._unsealed, oldest, last_seq, size)

    def last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()
        return int(row[0]) if row else 0

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        self._db.close()


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
