"""The DataLab store: one interface, SQLite (through sqlite-utils) by default.

Tables (see docs/architecture.md for how they are used):

* ``batches``      one row per accepted batch: id, range, content hash
* ``samples``      raw samples exactly as they arrived; identity (device, epoch, seq)
* ``fixes``        GPS fixes taken from the ``gps`` samples, for the position join
* ``positions``    where each sensor sample was taken (exact, interpolated, no_fix, pending)
* ``gaps``         intentional drops the devices reported
* ``dead_letters`` payloads rejected for good, with the reason
* ``counters``     running totals (duplicates ignored, dead letters ...)
* ``observations`` (view) one row per measured value with its position: what analysts query
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import sqlite3
import uuid
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import orjson
import sqlite_utils

from core.errors import PayloadError
from core.faultpoints import crash_point
from core.timekeeping import MIN_PLAUSIBLE_UTC_MS
from receiver import quality
from receiver.batch_consistency import GAP_UPSERT
from receiver.calibration import Span, calibration_sql, derived_join
from receiver.calibration import ensure_tables as ensure_calibration_tables
from receiver.calibration import ingest_calibrations
from receiver.flag_policy import is_sentinel
from receiver.pm_derive import WarmingAt, derive_batch_pm, housing_records, pm_records_before, rh_readings
from receiver.pm_humidity import DEFAULT_KAPPA
from receiver import requality as requality_mod
from receiver.requality import humid_edges, humid_slice, requality, rewrite_flags, span_windows
from receiver.units import unit_sql
from receiver.positions import INTERPOLATED, NO_FIX, NO_TIME, PENDING, Fix, locate
from core.sample import Sample
from core.wire import Batch

# The store schema's version (SQLite: PRAGMA user_version; PostgreSQL: table schema_version). Every
# schema step runs at each start, so an old store migrates by being opened. 2: observations with
# unit, typed on PostgreSQL, PostGIS layers (issue 17). 3: PostgreSQL samples by month and
# GPS / rest, a plain samples migrated (receiver/pg_samples.py); SQLite unchanged.
SCHEMA_VERSION = 3
GPS_SENSOR = "gps"
# Open samples one ingest group (or derive claim) may place again in the ack path (issue 13:
# 800,000 took 12 s on SQLite, over the 15 s + 2 s deadline on PostgreSQL); ~0.3 s of work
# on SQLite. The rest waits in positions_redo.
REPLACE_BUDGET = 20_000
REDO_CHUNK = 20_000  # open samples per deferred-positions transaction of the deriver
# Pending samples one ingest group (or derive claim) may close to ``no_fix`` in the ack path
# (issue 13 re-test: one 1-sample upload after 480,000 pending ones closed them all in one
# UPDATE, over PostgreSQL's statement timeout, retried for ever). The rest go to positions_redo.
CLOSE_BUDGET = 20_000

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestResult:
    status: str  # "stored" or "duplicate"
    new_samples: int
    duplicate_samples: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One rejected upload to keep: ``once`` is MQTT DUP (a redelivery), ``mid`` its packet id."""

    topic: str
    device: str | None
    reason: str
    payload: bytes
    sha256: str
    received_ms: int
    once: bool = False
    mid: int | None = None


class Store(Protocol):
    """What the receiver needs from a DataLab store (SQLiteStore here, PostgresStore in store_pg.py)."""

    def ingest(self, batch: Batch, sha256: str, received_ms: int, *, derive: bool = True) -> IngestResult: ...

    def ingest_many(
        self, items: Sequence[tuple[Batch, str, int]], *, derive: bool = True
    ) -> list[IngestResult]: ...

    def derive_pending(self, limit: int | None = None) -> int: ...

    def derive_backlog(self) -> int: ...

    def positions_deferred(self) -> int: ...

    def dead_letters_acked(self) -> None: ...

    def derive_parked(self) -> list[dict[str, object]]: ...

    def requeue_parked(self) -> int: ...

    def dead_letter(
        self, topic: str, device: str | None, reason: str, payload: bytes, sha256: str, received_ms: int,
        *, once: bool = False, mid: int | None = None,
    ) -> None: ...

    def dead_letter_many(self, items: Sequence[DeadLetter]) -> None: ...

    def counts(self) -> dict[str, int]: ...

    def known_batches(self, batch_ids: list[str]) -> list[tuple[str, str]]: ...

    def count(self, name: str, by: int = 1) -> None: ...

    def record_status(self, device: str, status: dict[str, object], received_ms: int) -> None: ...

    def fleet_status(self) -> list[dict[str, object]]: ...

    def is_outage(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the store itself failing, whatever was written (the Ingestor
        then answers nothing and raises StoreUnavailable; anything else it judges by a probe)."""
        ...

    def close(self) -> None: ...


class StoreReads:
    """Read-only queries that are the same SQL on SQLite and PostgreSQL (both stores use them)."""

    conn: Any
    PARAM = "?"  # the driver's placeholder
    QUEUE_TIEBREAK = "rowid"  # derive_queue order among batches received in the same ms
    @cached_property
    def run(self) -> str:
        """This store object's token in dead_letters_unacked (one receiver run's worker)."""
        return uuid.uuid4().hex

    REDO_CLAIM = ""  # how _redo_chunk claims its window (PostgreSQL: skip one another's)

    def fleet_status(self) -> list[dict[str, object]]:
        rows = self.conn.execute(
            "SELECT device, received_utc_ms, online, status FROM device_status ORDER BY device"
        ).fetchall()
        return [
            {"device": d, "received_utc_ms": r, "online": bool(o), **json.loads(st)} for d, r, o, st in rows
        ]

    def counts(self) -> dict[str, int]:
        out = {name: int(value) for name, value in self.conn.execute("SELECT name, value FROM counters")}
        out["samples"] = self.conn.execute("SELECT count(*) FROM samples").fetchone()[0]
        return out

    def device_summary(self) -> list[dict[str, object]]:
        rows = self.conn.execute(
            "SELECT device, epoch, count(*), min(seq), max(seq), max(t_utc_ms) FROM samples"
            " GROUP BY device, epoch ORDER BY device"
        ).fetchall()
        return [
            {"device": r[0], "epoch": r[1], "samples": r[2], "min_seq": r[3], "max_seq": r[4], "last_utc_ms": r[5]}
            for r in rows
        ]

    def derive_parked(self) -> list[dict[str, object]]:
        """Batches a deriver set aside because deriving them failed on their own, with the reason."""
        rows = self.conn.execute(
            "SELECT batch_id, device, reason, parked_utc_ms FROM derive_parked ORDER BY parked_utc_ms, batch_id"
        ).fetchall()
        return [{"batch_id": b, "device": d, "reason": r, "parked_utc_ms": t} for b, d, r, t in rows]

    def _derive_queued(self, limit: int | None, claim: Callable[[int, str | None], int]) -> int:
        """``derive_pending``'s loop: ``claim(take, None)`` derives up to ``take`` queued batches
        in one transaction, ``claim(1, batch_id)`` that one; a claim failing for a batch's
        content is done again one batch at a time (``_isolate``)."""
        done = 0
        while limit is None or done < limit:
            take = DERIVE_CLAIM if limit is None else min(DERIVE_CLAIM, limit - done)
            try:
                n = claim(take, None)
            except Exception as exc:
                if self._store_failure(exc):
                    raise
                ids = [r[0] for r in self.conn.execute(
                    f"SELECT batch_id FROM derive_queue ORDER BY received_utc_ms, {self.QUEUE_TIEBREAK}"
                    f" LIMIT {self.PARAM}", (take,))]
                n = self._isolate(ids, lambda bid: claim(1, bid))
            if not n:
                break
            done += n
        return done

    def _isolate(self, batch_ids: Sequence[str], derive_one: Callable[[str], object]) -> int:
        """A claim failed as a whole: derive its batches one transaction each.

        A batch that fails on its own is parked (``derive_parked``, with the
        reason, counted in ``batches_parked``) so the rest of the fleet keeps
        getting positions and flags. What fails is told by what it is: an error
        of the store itself (locked, unreachable, full; ``_store_failure``)
        parks nothing and propagates, and so does a store that cannot take the
        parking. How many batches were dealt with (derived or parked).
        """
        for bid in batch_ids:
            try:
                derive_one(bid)
            except Exception as exc:
                if self._store_failure(exc):
                    raise
                self._park(bid, f"{type(exc).__name__}: {exc}"[:PARK_REASON_CHARS])
        return len(batch_ids)

    def _park_new(self, batch: Batch, exc: BaseException, received_ms: int) -> None:
        """Park a batch derived inline (never queued), inside the caller's transaction."""
        p = self.PARAM
        reason = f"{type(exc).__name__}: {exc}"[:PARK_REASON_CHARS]
        self.conn.execute(
            f"INSERT INTO derive_parked VALUES ({', '.join([p] * 8)}) ON CONFLICT (batch_id) DO UPDATE"
            " SET reason = excluded.reason, parked_utc_ms = excluded.parked_utc_ms",
            (batch.batch_id, batch.device, batch.epoch, batch.first_seq, batch.last_seq, received_ms, reason,
             received_ms))
        log.error("parked batch %s: it cannot be derived (%s); stored raw, the others go on", batch.batch_id,
                  reason)

    def _store_failure(self, exc: BaseException) -> bool:
        # One judgement for ingest and derive: the store's own is_outage.
        return self.is_outage(exc)  # type: ignore[attr-defined]

    def _park(self, batch_id: str, reason: str) -> None:
        raise NotImplementedError

    def _load_batch(self, bid: str, device: str, epoch: str, first: int, last: int) -> Batch:
        """The samples a queued batch stored, read back as the batch they came in."""
        rows = self.conn.execute(
            "SELECT seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags FROM samples"
            " WHERE device = ? AND epoch = ? AND seq BETWEEN ? AND ? AND batch_id = ? ORDER BY seq"
            .replace("?", self.PARAM),
            (device, epoch, first, last, bid),
        ).fetchall()
        return Batch(device, epoch, first, last, [_sample_from_row(r) for r in rows])

    def _join_inputs(
        self, device: str, lo: int, hi: int, gap: int, fix_times: Sequence[int]
    ) -> tuple[int, list[tuple[str, int, int]], list[Fix], list[int]]:
        """What the position join needs besides the batch: (newest known time, samples to
        place again, fixes around them, their times). ``lo``/``hi``: the batch's times ± gap;
        ``fix_times``: the times of the batch's fixes.

        Only an open sample (pending or no_fix) within ``gap`` of one of this batch's fixes
        can change because of them (``locate`` looks no further than ``gap`` from a sample),
        so only those are read again. Reading every open sample of the batch's time range
        instead (as before) made a van without GPS re-read all it had stored with each
        batch: 40 fix-less uploads of 20,000 samples took a receiver past 300 MB and each
        batch longer than the one before (issue 13). A pending sample that newer data
        closes without a fix near it is closed in SQL (``_close_pending``), never read.
        """
        p, c = self.PARAM, self.conn
        newest = max(hi - gap, *(r[0] or 0 for r in c.execute(
            f"SELECT max(t_utc_ms) FROM positions WHERE device = {p} UNION ALL"
            f" SELECT max(t_utc_ms) FROM fixes WHERE device = {p}", (device, device)).fetchall()))
        fx = [Fix(*r) for r in c.execute(
            f"SELECT t_utc_ms, lat, lon, speed_mps, fix_quality FROM fixes"
            f" WHERE device = {p} AND t_utc_ms BETWEEN {p} AND {p} ORDER BY t_utc_ms",
            (device, lo - gap, hi + gap),
        ).fetchall()]
        ft = [f.t_utc_ms for f in fx]
        reopened: list[tuple[str, int, int]] = []
        # Bounded (issue 13): a van with hundreds of thousands of open samples under new fixes
        # would otherwise have them all re-read and re-placed in the ack path, one statement
        # longer than the PostgreSQL deadline. Beyond the budget the windows go to
        # positions_redo, placed later in chunks by the deriver (``redo_positions``).
        # Interpolated samples whose bracketing fixes now have a new fix between them (fixes
        # delivered out of order, issue 13 re-test: 13,045 of 80,000 left on the farther pair)
        # share the same budget and the same redo windows.
        budget, later = self._replace_left, []
        picks = [(a, b, 0, f"{_OPEN} AND t_utc_ms BETWEEN {p} AND {p}") for a, b in _windows(fix_times, gap)]
        picks += [(a, b, 1, f"state = '{INTERPOLATED}' AND t_utc_ms > {p} AND t_utc_ms < {p}")
                  for a, b in _split_brackets(ft, fix_times, gap)]
        for a, b, interp, where in picks:
            if budget <= 0:
                later.append((a, b, interp))
                continue
            rows = [tuple(r) for r in c.execute(
                f"SELECT epoch, seq, t_utc_ms FROM positions WHERE device = {p}"
                f" AND {where} ORDER BY t_utc_ms LIMIT {p}",
                (device, a, b, budget + 1),
            ).fetchall()]
            if len(rows) > budget:
                rows = rows[:budget]
                later.append((rows[-1][2], b, interp))  # from the last time read: its twins may be unread
            reopened += rows  # type: ignore[arg-type]
            budget -= len(rows)
        self._replace_left = budget
        if later:
            self._defer_positions(device, later)
        return newest, reopened, fx, ft

    # What is left of REPLACE_BUDGET in this transaction: a group of 64 fix uploads shares one
    # budget (reset by ``_new_unit`` at the start of each ingest group and derive claim).
    _replace_left = REPLACE_BUDGET

    _close_left = CLOSE_BUDGET  # the same for _close_pending
    _humid_left = requality_mod.HUMID_BUDGET  # and for the humid edges' reads (_humid_edges)
    humid_rows_read = 0  # sample rows read for humid edges by this store object (for tests)

    def _new_unit(self) -> None:
        self._replace_left = REPLACE_BUDGET
        self._close_left = CLOSE_BUDGET
        self._humid_left = requality_mod.HUMID_BUDGET

    def _humid_edges(self, batch: Batch, spans: list[Span] | None = None) -> None:
        """``humid`` at the batch's time edges (requality.humid_edges), and in ``spans`` (where a
        housing record the batch brought changed the RH: derive_batch_pm), within the group's read
        budget; a window over it goes to ``humid_redo`` (counted) for the deriver."""
        times = [s.t_utc_ms for s in batch.samples
                 if s.t_utc_ms is not None and s.sensor != GPS_SENSOR]
        also = span_windows(self.conn, batch.device, spans) if spans else []
        _, read, left = humid_edges(self.conn, batch.device, times, self._humid_left, self.pm_kappa, also)
        self._humid_left = max(self._humid_left - read, 0)
        self.humid_rows_read += read
        p, c = self.PARAM, self.conn
        for a, b in left:
            # Only the part no queued window of the van covers yet (packed uploads share edges).
            have = c.execute(f"SELECT max(hi_ms) FROM humid_redo WHERE device = {p} AND lo_ms <= {p}"
                             f" AND hi_ms >= {p}", (batch.device, a, a)).fetchone()[0]
            a = a if have is None else max(a, have + 1)
            if a <= b:
                c.execute(f"INSERT INTO humid_redo (device, lo_ms, hi_ms) VALUES ({p}, {p}, {p})",
                          (batch.device, a, b))
                self._count_here("humid_windows_deferred", 1)

    def _claim_window(self, table: str) -> tuple[int, str, int, int] | None:
        """The oldest deferred window of ``table`` (id, device, lo, hi), claimed with its van locked."""
        row = self.conn.execute(f"SELECT id, device, lo_ms, hi_ms FROM {table} ORDER BY id LIMIT 1"
                                f"{self.REDO_CLAIM}").fetchone()
        if row is not None:
            self._lock_van(row[1])
        return None if row is None else tuple(row)  # type: ignore[return-value]

    def _humid_chunk(self) -> int:
        """Judge ``humid`` again for one slice of the oldest deferred window, inside the caller's
        transaction (the window shrinks as it is done, and goes when empty); 0: none queued."""
        p, c = self.PARAM, self.conn
        row = self._claim_window("humid_redo")
        if row is None:
            return 0
        rid, device, lo, hi = row
        nxt, read = humid_slice(c, device, lo, hi, kappa=self.pm_kappa)
        self.humid_rows_read += read
        if nxt is None:
            c.execute(f"DELETE FROM humid_redo WHERE id = {p}", (rid,))
        else:
            c.execute(f"UPDATE humid_redo SET lo_ms = {p} WHERE id = {p}", (nxt, rid))
        self._count_here("humid_slices_later", 1)
        return 1

    def _defer_positions(self, device: str, windows: Sequence[tuple[int, int, int]]) -> None:
        """Queue time windows (lo, hi, interp) of a van whose open samples (and with ``interp`` 1
        also interpolated ones, _split_brackets) must be placed again, later; counted."""
        p, c = self.PARAM, self.conn
        c.execute(  # executemany would be one statement per window anyway; windows are few
            "INSERT INTO positions_redo (device, lo_ms, hi_ms, interp) VALUES "
            + ", ".join([f"({p}, {p}, {p}, {p})"] * len(windows)), [x for w in windows for x in (device, *w)])
        self._count_here("position_windows_deferred", len(windows))

    def _count_here(self, name: str, by: int) -> None:
        """Add to a counter inside the caller's transaction (the same SQL on both stores)."""
        p = self.PARAM
        self.conn.execute(
            f"INSERT INTO counters (name, value) VALUES ({p}, {p})"
            " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value", (name, by))

    def _redo_chunk(self) -> int:
        """Place again up to REDO_CHUNK open samples of the oldest deferred window, inside the
        caller's transaction; how many (0: nothing deferred). The window shrinks as it is
        done and goes when empty, so a deriver killed at any point loses nothing."""
        p, c = self.PARAM, self.conn
        row = self._claim_window("positions_redo")
        if row is None:
            return 0
        rid, device, lo, hi = row
        interp = c.execute(f"SELECT interp FROM positions_redo WHERE id = {p}", (rid,)).fetchone()[0]
        rows = [tuple(r) for r in c.execute(
            f"SELECT epoch, seq, t_utc_ms FROM positions WHERE device = {p}"
            f" AND t_utc_ms BETWEEN {p} AND {p} AND {_REDO if interp else _OPEN} ORDER BY t_utc_ms LIMIT {p}",
            (device, lo, hi, REDO_CHUNK + 1)).fetchall()]
        more = len(rows) > REDO_CHUNK
        rows = rows[:REDO_CHUNK]
        if rows:
            gap = self.max_gap_ms  # type: ignore[attr-defined]
            newest = max(r[0] or 0 for r in c.execute(
                f"SELECT max(t_utc_ms) FROM positions WHERE device = {p} UNION ALL"
                f" SELECT max(t_utc_ms) FROM fixes WHERE device = {p}", (device, device)).fetchall())
            fx = [Fix(*r) for r in c.execute(
                f"SELECT t_utc_ms, lat, lon, speed_mps, fix_quality FROM fixes"
                f" WHERE device = {p} AND t_utc_ms BETWEEN {p} AND {p} ORDER BY t_utc_ms",
                (device, rows[0][2] - gap, rows[-1][2] + gap)).fetchall()]
            ft = [f.t_utc_ms for f in fx]
            out = []
            for epoch, seq, t in rows:
                pos = locate(fx, ft, t, gap, newest)
                out.append((device, epoch, seq, t, pos.state, pos.lat, pos.lon, pos.speed_mps, pos.fix_quality))
            self._upsert_positions(out)
            self._count_here("positions_placed_later", len(out))
        if more:
            # Next time from the last time done (its twins may be unread); a whole chunk at one
            # millisecond moves on by one, or the window would never end.
            nxt = rows[-1][2] if rows[-1][2] > lo else lo + 1
            c.execute(f"UPDATE positions_redo SET lo_ms = {p} WHERE id = {p}", (nxt, rid))
        else:
            c.execute(f"DELETE FROM positions_redo WHERE id = {p}", (rid,))
        return max(len(rows), 1)

    def _redo_positions(self, limit: int | None, chunk: Callable[[], int]) -> int:
        """Deferred position windows, one ``chunk()`` transaction each, up to ``limit`` chunks."""
        done = 0
        while limit is None or done < limit:
            if not chunk():
                break
            done += 1
        return done

    def _lock_van(self, device: str) -> None:
        """Serialise with other derivers of the same van (PostgreSQL); SQLite writes one at a time."""

    def _upsert_positions(self, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def positions_deferred(self) -> int:
        """Time windows whose open samples still wait to be placed again (``redo_positions``),
        and whose ``humid`` flags wait to be judged again (``_humid_chunk``): the deriver's work."""
        return sum(int(self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                   for t in ("positions_redo", "humid_redo"))

    def _dead_letter_again(self, once: bool, sha256: str, topic: str, mid: int | None) -> bool:
        """Is this redelivered upload (``once``: MQTT DUP) one already dead-lettered but never acked?

        A DUP copy is of a message the broker saw no ack for; a dead letter whose upload was
        acked (``dead_letters_acked``) is another upload of the same bytes, so a copy matches
        only a dead letter still marked un-acked (issue 13 re-test: the same bytes sent again,
        held in an outage, receiver killed, redelivered: 1 dead letter for 2 uploads). The
        match is taken over by this run, so it is cleared when this run acks.

        The mark carries the MQTT packet id (``mid``) the upload came with, and a copy
        matches only its own: the broker re-sends an un-acked message with its original
        packet id (MQTT 3.1.1, 4.4). A mark whose clearing failed after the ack (only
        logged) would otherwise swallow a later, new upload of the same bytes (issue 13
        re-test: 1 dead letter for 2 uploads). In doubt (another id, a mark from before
        ids were kept) the copy is recorded: a double count, which the docs allow, never a loss.
        """
        if not once:
            return False
        p, c = self.PARAM, self.conn
        same_mid = "u.mid IS NULL" if mid is None else f"u.mid = {p}"
        row = c.execute(
            f"SELECT u.id FROM dead_letters_unacked u JOIN dead_letters d ON d.id = u.id"
            f" WHERE d.sha256 = {p} AND d.topic = {p} AND {same_mid} LIMIT 1",
            (sha256, topic) + (() if mid is None else (mid,))).fetchone()
        if row is None:
            return False
        c.execute(f"UPDATE dead_letters_unacked SET run = {p} WHERE id = {p}", (self.run, row[0]))
        return True

    def _write_dead_letters(self, items: Sequence[DeadLetter]) -> dict[str, int]:
        """Write ``items`` inside the caller's transaction; what to add to which counter.

        ``dead_letters`` counts rejected uploads once, ``dead_letters_repeated`` the further
        deliveries of bytes already dead-lettered on that topic (the van re-sending after its
        answer died with a broker; the broker delivering again). Sealed batches never change
        bytes, so equal bytes are one upload; every delivery still leaves its row, but for a
        DUP copy of one not acked yet (``_dead_letter_again``). Issue 13: v13b counted 335
        dead letters for 269 uploads after one broker kill. One look-up for the group."""
        p = self.PARAM
        shas = sorted({d.sha256 for d in items})
        seen: set[tuple[str, str]] = set()
        for i in range(0, len(shas), 500):  # within any driver's parameter limit
            part = shas[i:i + 500]
            seen.update(tuple(r) for r in self.conn.execute(
                f"SELECT DISTINCT sha256, topic FROM dead_letters WHERE sha256 IN ({', '.join([p] * len(part))})",
                part).fetchall())
        bumps = {"dead_letters": 0, "dead_letters_repeated": 0}
        new: list[DeadLetter] = []
        for d in items:
            if self._dead_letter_again(d.once, d.sha256, d.topic, d.mid):
                bumps["dead_letters_repeated"] += 1  # a redelivered copy: counted, not written again
                continue
            key = (d.sha256, d.topic)
            bumps["dead_letters_repeated" if key in seen else "dead_letters"] += 1
            seen.add(key)
            new.append(d)
        self._insert_dead_letters(new)
        return {k: v for k, v in bumps.items() if v}

    def _insert_dead_letters(self, items: Sequence[DeadLetter]) -> None:
        """Rows in ``dead_letters``, each marked un-acked by this run with its packet id."""
        raise NotImplementedError

    def dead_letters_acked(self) -> None:
        """The uploads this run dead-lettered are acked: a DUP copy of their bytes is new."""
        p = self.PARAM
        self._in_transaction(lambda: self.conn.execute(f"DELETE FROM dead_letters_unacked WHERE run = {p}",
                                                       (self.run,)))

    def _in_transaction(self, work: Callable[[], object]) -> None:
        raise NotImplementedError

    def _close_pending(self, device: str, newest: int, gap: int, fix_times: Sequence[int]) -> None:
        """Pending samples that can no longer get a position become ``no_fix``, in SQL.

        ``locate`` keeps a sample pending only while no later fix came, the newest known
        time is within ``gap`` of it and it has no earlier fix or one within ``gap``.
        Run after this batch's positions are written: a pending sample that a new fix
        could place was within ``gap`` of it and placed by ``_join_inputs``; the others
        close here once ``newest`` is more than ``gap`` past them, or once a fix older
        than ``gap`` before them exists with none closer.

        Bounded (issue 13 re-test): at most ``CLOSE_BUDGET`` rows per ingest group, the
        oldest first; what is left becomes a ``positions_redo`` window (counted), which the
        deriver places again in chunks with ``locate``, the rule these statements shortcut.
        """
        p = self.PARAM
        self._close_some(device, f"pp.t_utc_ms < {p}", (newest - gap,), newest - gap)
        if fix_times:
            self._close_some(
                device, f"pp.t_utc_ms > {p} AND NOT EXISTS (SELECT 1 FROM fixes f WHERE f.device = pp.device"
                        f" AND f.t_utc_ms BETWEEN pp.t_utc_ms - {p} AND pp.t_utc_ms)",
                (min(fix_times) + gap, gap), newest)

    def _close_some(self, device: str, where: str, args: tuple[int, ...], hi: int) -> None:
        """Close the oldest of ``device``'s pending rows matching ``where`` (alias ``pp``),
        within what is left of the budget; the others, up to ``hi``, wait for the deriver."""
        p, c = self.PARAM, self.conn
        # States as literals: they let both stores use the partial index ``positions_pending``.
        pick = (f"SELECT pp.device, pp.epoch, pp.seq, pp.t_utc_ms FROM positions pp WHERE pp.device = {p}"
                f" AND pp.state = '{PENDING}' AND {where} ORDER BY pp.t_utc_ms LIMIT {p}")
        n = self._close_left
        if n > 0:
            closed = c.execute(
                f"UPDATE positions SET state = '{NO_FIX}' WHERE (device, epoch, seq) IN"
                f" (SELECT device, epoch, seq FROM ({pick}) AS oldest)", (device, *args, n)).rowcount
            self._close_left -= closed
            if closed < n:
                return
        left = c.execute(pick, (device, *args, 1)).fetchone()
        if left is None:
            return
        # One window per stretch: a van that keeps uploading over a deferred backlog would
        # otherwise queue an overlapping window with each upload (each re-read by the deriver).
        have = c.execute(f"SELECT max(hi_ms) FROM positions_redo WHERE device = {p} AND lo_ms <= {p}"
                         f" AND hi_ms >= {p}", (device, left[3], left[3])).fetchone()[0]
        lo = left[3] if have is None else have + 1
        if lo <= hi:
            self._defer_positions(device, [(lo, hi, 0)])
            self._count_here("pending_closes_deferred", 1)

    def _merged(self, queued: Sequence[tuple[str, str, str, int, int]]) -> list[Batch]:
        """Queued batches (batch_id, device, epoch, first, last) read back, one per van and epoch.

        Deriving a van's consecutive batches as one gives the same rows as one
        after the other (positions, moving windows and calibrations run over
        the samples in seq order either way) with a fraction of the queries.
        """
        by_van: dict[tuple[str, str], list[Batch]] = {}
        for bid, device, epoch, first, last in queued:
            by_van.setdefault((device, epoch), []).append(self._load_batch(bid, device, epoch, first, last))
        out = []
        for (device, epoch), batches in sorted(by_van.items()):
            samples = sorted((s for b in batches for s in b.samples), key=lambda s: s.seq or 0)
            out.append(Batch(device, epoch, min(b.first_seq for b in batches), max(b.last_seq for b in batches),
                             samples))
        return out

    def _contexts(self, batch: Batch) -> Callable[[str, str, int], Context]:
        """The moving windows' context for every stream of a batch, from one read.

        Reads the samples just before the batch once (CONTEXT_SPAN seqs: every
        sensor's last CONTEXT samples when sensors take turns); a stream the
        read does not cover far enough is asked for on its own. A context is
        (seq, value, values) of the stream's samples that hold the quantity, back
        to its CONTEXT-th real value, a non-number as NaN (it ends a stuck run, as it
        does inside a batch), and whether the stream may go on before it.
        """
        firsts: dict[str, int] = {}
        for s in batch.samples:
            if s.seq is not None and s.sensor not in firsts:
                firsts[s.sensor] = s.seq
        if not firsts:
            return lambda sensor, q, before: self._context(batch.device, batch.epoch, sensor, q, before)
        lo = min(firsts.values()) - CONTEXT_SPAN
        rows = self.conn.execute(
            "SELECT seq, sensor, vals FROM samples WHERE device = ? AND epoch = ? AND seq >= ? AND seq < ?"
            " ORDER BY seq".replace("?", self.PARAM),
            (batch.device, batch.epoch, lo, max(firsts.values())),
        ).fetchall()
        by_sensor: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for seq, sensor, vals in rows:
            by_sensor.setdefault(sensor, []).append((seq, _values(vals)))

        def context(sensor: str, q: str, before: int) -> Context:
            have = [(seq, v) for seq, v in by_sensor.get(sensor, ()) if seq < before and q in v]
            ctx, cut, enough = _context_of(have, q, more=lo > 1)
            if not enough and lo > 1:  # the read may not reach back far enough
                return self._context(batch.device, batch.epoch, sensor, q, before)
            return ctx, cut

        return context

    def _revise_quality(self, device: str, epoch: str, revised: list[tuple[int, str, int, int]]) -> None:
        """Apply ``quality_rows``' revisits of earlier values: (seq, quantity, set, clear) bits."""
        if not revised:
            return
        lo, hi = min(r[0] for r in revised), max(r[0] for r in revised)
        stored = {(seq, q): f for seq, q, f in self.conn.execute(
            "SELECT seq, quantity, flags FROM quality WHERE device = ? AND epoch = ? AND seq BETWEEN ? AND ?"
            .replace("?", self.PARAM), (device, epoch, lo, hi)).fetchall()}
        rewrite_flags(self.conn, device, (
            (epoch, seq, q, stored.get((seq, q)), (quality.mask_of(stored.get((seq, q))) & ~clear) | bits)
            for seq, q, bits, clear in revised))

    def close(self) -> None:
        self.conn.close()


class SQLiteStore(StoreReads):
    def __init__(self, path: str | Path, *, max_gap_s: float = 10.0,
                 pm_kappa: Mapping[str, float] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA busy_timeout=10000")
        # FULL: the receiver acks a batch after this commit and the van then deletes it, so the
        # commit must survive a power cut (WAL + NORMAL may lose the last transactions). With
        # groups of uploads per transaction it costs one extra fsync per group, not per sample.
        self.db.execute("PRAGMA synchronous=FULL")
        self.max_gap_ms = int(max_gap_s * 1000)
        # kappa per PM quantity for the growth correction (receiver/pm_humidity.py; config pm_kappa)
        self.pm_kappa = {**DEFAULT_KAPPA, **(pm_kappa or {})}
        # Workers starting together would race on switching a new file to WAL ("database
        # is locked") and on the schema (a view is dropped and made again; "already exists"
        # for the loser): one at a time, under flock on a lock file of its own. Never on the
        # database file itself: closing any descriptor of that file drops every POSIX lock
        # SQLite holds on it in this process, and another process closing its connection
        # then takes itself for the last user, checkpoints and deletes our live WAL (acked
        # batches lost).
        with open(self.path.with_name(self.path.name + ".schema-lock"), "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self._create()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    def _create(self) -> None:
        db = self.db
        db["batches"].create(
            {
                "batch_id": str,
                "device": str,
                "epoch": str,
                "first_seq": int,
                "last_seq": int,
                "n_samples": int,
                "sha256": str,
                "received_utc_ms": int,
            },
            pk="batch_id",
            if_not_exists=True,
        )
        db["samples"].create(
            {
                "device": str,
                "epoch": str,
                "seq": int,
                "sensor": str,
                "t_utc_ms": int,
                "t_mono_ms": int,
                "time_src": str,
                "boot_id": str,
                "vals": str,
                "flags": str,
                "batch_id": str,
                "received_utc_ms": int,
            },
            pk=("device", "epoch", "seq"),
            not_null={"device", "epoch", "seq", "sensor"},
            if_not_exists=True,
        )
        db["fixes"].create(
            {
                "device": str,
                "epoch": str,
                "seq": int,
                "t_utc_ms": int,
                "lat": float,
                "lon": float,
                "speed_mps": float,
                "fix_quality": int,
            },
            pk=("device", "epoch", "seq"),
            if_not_exists=True,
        )
        db["positions"].create(
            {
                "device": str,
                "epoch": str,
                "seq": int,
                "t_utc_ms": int,
                "state": str,
                "lat": float,
                "lon": float,
                "speed_mps": float,
                "fix_quality": int,
            },
            pk=("device", "epoch", "seq"),
            if_not_exists=True,
        )
        db["gaps"].create(
            {"device": str, "epoch": str, "first_seq": int, "last_seq": int, "reason": str, "batch_id": str},
            pk=("device", "epoch", "first_seq", "last_seq"),
            if_not_exists=True,
        )
        db["dead_letters"].create(
            {
                "id": int,
                "received_utc_ms": int,
                "topic": str,
                "device": str,
                "reason": str,
                "sha256": str,
                "payload": bytes,
            },
            pk="id",
            if_not_exists=True,
        )
        db.execute("CREATE INDEX IF NOT EXISTS dead_letters_sha ON dead_letters (sha256)")  # _dead_letter_counter
        db["counters"].create({"name": str, "value": int}, pk="name", if_not_exists=True)
        ensure_calibration_tables(self.conn)
        db["quality"].create(
            {"device": str, "epoch": str, "seq": int, "quantity": str, "flags": str},
            pk=("device", "epoch", "seq", "quantity"),
            if_not_exists=True,
        )
        # Batches stored with derive=False that derive_pending has not done yet.
        db["derive_queue"].create(
            {"batch_id": str, "device": str, "epoch": str, "first_seq": int, "last_seq": int,
             "received_utc_ms": int},
            pk="batch_id",
            if_not_exists=True,
        )
        # Dead letters written but not yet acked to the broker, by run (StoreReads._dead_letter_again).
        # mid: the MQTT packet id the upload came with (a DUP copy matches only its own).
        db.execute("CREATE TABLE IF NOT EXISTS dead_letters_unacked (id INTEGER PRIMARY KEY, run TEXT NOT NULL,"
                   " mid INTEGER)")
        if "mid" not in {col.name for col in db["dead_letters_unacked"].columns}:
            db.execute("ALTER TABLE dead_letters_unacked ADD COLUMN mid INTEGER")
        # Time windows whose open samples wait to be placed again (StoreReads._join_inputs' budget).
        db.execute("CREATE TABLE IF NOT EXISTS positions_redo (id INTEGER PRIMARY KEY, device TEXT NOT NULL,"
                   " lo_ms INTEGER NOT NULL, hi_ms INTEGER NOT NULL)")
        # interp 1: the window's interpolated samples are placed again too (a late fix split them).
        if "interp" not in {col.name for col in db["positions_redo"].columns}:
            db.execute("ALTER TABLE positions_redo ADD COLUMN interp INTEGER NOT NULL DEFAULT 0")
        # Time windows whose PM values' humid flags wait to be judged again (StoreReads._humid_edges).
        db.execute("CREATE TABLE IF NOT EXISTS humid_redo (id INTEGER PRIMARY KEY, device TEXT NOT NULL,"
                   " lo_ms INTEGER NOT NULL, hi_ms INTEGER NOT NULL)")
        # Queued batches that could not be derived on their own (StoreReads._isolate).
        db["derive_parked"].create(
            {"batch_id": str, "device": str, "epoch": str, "first_seq": int, "last_seq": int,
             "received_utc_ms": int, "reason": str, "parked_utc_ms": int},
            pk="batch_id",
            if_not_exists=True,
        )
        db["device_status"].create(
            {"device": str, "received_utc_ms": int, "online": int, "status": str},
            pk="device",
            if_not_exists=True,
        )
        # Time indexes live on the derived tables, off the path every upload waits for: an
        # index on samples(device, t_utc_ms) cost the ack path ~15 % (bench/bench_ingest.py).
        # Stores made before that lose it here.
        db.execute("DROP INDEX IF EXISTS samples_device_time")
        db.execute("CREATE INDEX IF NOT EXISTS positions_device_time ON positions(device, t_utc_ms)")
        db.execute("CREATE INDEX IF NOT EXISTS fixes_device_time ON fixes(device, t_utc_ms)")
        db.execute(
            "CREATE INDEX IF NOT EXISTS positions_open ON positions(device, t_utc_ms)"
            " WHERE state IN ('pending', 'no_fix')"
        )
        # StoreReads._close_pending's: without it, closing a van's pending samples walked all
        # its older positions with every batch.
        db.execute("CREATE INDEX IF NOT EXISTS positions_pending ON positions(device, t_utc_ms)"
                   " WHERE state = 'pending'")
        # value: the best one (the receiver's recomputed value, else the van's); calibration:
        # the record it was calibrated with (receiver/calibration.py) and for PM the growth
        # correction (receiver/pm_derive.py); raw_value: the van's, as it sent it. The same
        # columns, in the same order, as PostgreSQL's view (tests/test_pg_analysts.py).
        db.create_view(
            "observations",
            f"""
            SELECT s.device, s.epoch, s.seq, s.sensor, s.t_utc_ms,
                   strftime('%Y-%m-%dT%H:%M:%fZ', s.t_utc_ms / 1000.0, 'unixepoch') AS time_utc,
                   s.time_src, j.key AS quantity, coalesce(d.value, j.value) AS value,
                   {unit_sql('j.key')} AS unit,
                   {calibration_sql(True)} AS calibration, s.flags,
                   trim(coalesce(q.flags, '') ||
                        CASE WHEN p.state IN ('no_fix', 'no_time') THEN ',' || p.state ELSE '' END,
                        ',') AS quality,
                   p.lat, p.lon, p.speed_mps, p.fix_quality, p.state AS position,
                   j.value AS raw_value
            FROM samples s
            JOIN json_each(s.vals) j
            LEFT JOIN positions p ON p.device = s.device AND p.epoch = s.epoch AND p.seq = s.seq
            LEFT JOIN quality q ON q.device = s.device AND q.epoch = s.epoch AND q.seq = s.seq
                               AND q.quantity = j.key
            {derived_join()}
            WHERE s.sensor NOT IN ('gps', 'calibration') AND j.type IN ('integer', 'real', 'null')
            """,
            replace=True,
        )
        # The schema version this start brought the store to (PostgreSQL: table schema_version,
        # receiver/store_pg.py SCHEMA_VERSION): every step above runs at each start, so an old
        # store migrates by being opened. 2: observations with unit (issue 17).
        if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:  # a write: only when it changes
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def is_outage(self, exc: BaseException) -> bool:
        # Locked past busy_timeout, read-only, disk or database full, I/O error: OperationalError
        # (DatabaseError itself for a damaged file); never caused by one upload's content, which
        # fails as IntegrityError, DataError, OverflowError, ValueError ...
        return isinstance(exc, (sqlite3.OperationalError, sqlite3.InterfaceError)) or type(exc) is sqlite3.DatabaseError

    # -- writes ---------------------------------------------------------------

    def _bump(self, name: str, by: int = 1, **more: int) -> None:
        """Add to running totals: ``name`` by ``by``, and each of ``more`` (one statement)."""
        items = [(name, by), *more.items()]
        self.conn.execute(
            "INSERT INTO counters(name, value) VALUES " + ",".join(["(?, ?)"] * len(items))
            + " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [x for kv in items for x in kv],
        )

    def ingest(self, batch: Batch, sha256: str, received_ms: int, *, derive: bool = True) -> IngestResult:
        """Store one batch in one transaction, idempotently.

        ``derive=True`` also writes what is derived from it (fixes, positions,
        calibrations, quality flags) in the same transaction. ``derive=False``
        stores only what the delivery contract needs before the ack (the raw
        samples, gaps, the batch record) and queues the batch for
        ``derive_pending``: the fast path for a receiver under load.
        """
        return self.ingest_many([(batch, sha256, received_ms)], derive=derive)[0]

    def ingest_many(
        self, items: Sequence[tuple[Batch, str, int]], *, derive: bool = True
    ) -> list[IngestResult]:
        """Several (batch, sha256, received_ms) in one transaction: one commit for all.

        What a busy receiver does with the messages that queued up while it
        committed the last group. All or nothing: a PayloadError (a batch id
        arriving with other content) rolls the whole group back, and the
        caller stores the batches one by one to find the culprit.
        """
        c = self.conn
        for batch, _, received_ms in items:
            _screen_times(batch, received_ms)
        self._new_unit()
        c.execute("BEGIN IMMEDIATE")
        try:
            results = []
            for batch, sha256, received_ms in items:
                result = self._store_raw(batch, sha256, received_ms)
                if result.status == "stored":
                    if derive:
                        self._derive_inline(batch, received_ms)
                    else:
                        c.execute(
                            "INSERT OR IGNORE INTO derive_queue VALUES (?,?,?,?,?,?)",
                            (batch.batch_id, batch.device, batch.epoch, batch.first_seq, batch.last_seq,
                             received_ms),
                        )
                results.append(result)
            crash_point("receiver.commit.before")
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:  # SQLite rolled back already on some errors (disk full)
                c.execute("ROLLBACK")
            raise
        return results

    def _store_raw(self, batch: Batch, sha256: str, received_ms: int) -> IngestResult:
        """Stage one, inside the caller's transaction: the batch record, raw samples, gaps, counters."""
        c = self.conn
        row = c.execute("SELECT sha256 FROM batches WHERE batch_id=?", (batch.batch_id,)).fetchone()
        if row is not None:
            if row[0] != sha256:
                raise PayloadError(f"batch {batch.batch_id} arrived again with different content")
            self._bump("batches_duplicate", samples_duplicate=len(batch.samples))
            return IngestResult("duplicate", 0, len(batch.samples))
        c.execute(
            "INSERT INTO batches VALUES (?,?,?,?,?,?,?,?)",
            (batch.batch_id, batch.device, batch.epoch, batch.first_seq, batch.last_seq,
             len(batch.samples), sha256, received_ms),
        )
        before = c.total_changes
        device, epoch, bid, enc = batch.device, batch.epoch, batch.batch_id, _json
        c.executemany(
            "INSERT OR IGNORE INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (device, epoch, s.seq, s.sensor, s.t_utc_ms, s.t_mono_ms, s.time_src, s.boot_id,
                 enc(s.values), ",".join(s.flags), bid, received_ms)
                for s in batch.samples
            ],
        )
        new = c.total_changes - before
        if batch.gaps:
            c.executemany(
                "INSERT INTO gaps VALUES (?,?,?,?,?,?)" + GAP_UPSERT,
                [(device, epoch, g.first_seq, g.last_seq, g.reason, bid) for g in batch.gaps],
            )
        dup = {"samples_duplicate": len(batch.samples) - new} if new < len(batch.samples) else {}
        self._bump("batches_stored", samples_stored=new, **dup)
        return IngestResult("stored", new, len(batch.samples) - new)

    def _derive(self, batch: Batch) -> None:
        """Stage two, inside the caller's transaction: fixes, positions, calibrations, flags."""
        fixes = [
            (batch.device, batch.epoch, s.seq, s.t_utc_ms, float(s.values["lat"]), float(s.values["lon"]),
             _num(s.values.get("speed")), _int(s.values.get("fix_quality")))
            for s in batch.samples
            if s.sensor == GPS_SENSOR and s.t_utc_ms is not None and _has_fix(s.values)
        ]
        self.conn.executemany("INSERT OR IGNORE INTO fixes VALUES (?,?,?,?,?,?,?,?)", fixes)
        self._join_positions(batch, fixes)
        pm_before = pm_records_before(self.conn, batch)
        touched = ingest_calibrations(self.conn, batch)  # received time: each record's sample's
        _, warm = derive_batch_pm(self.conn, batch, self.pm_kappa, pm_before)  # PM: gain, then growth undone
        self._flag_quality(batch)
        requality(self.conn, batch.device, touched)  # flags describe the value served
        self._humid_edges(batch, warm)

    def derive_pending(self, limit: int | None = None) -> int:
        """Derive the batches stored with ``derive=False``, oldest first; how many were done.

        Up to DERIVE_CLAIM batches per transaction, their queue entries deleted
        in the same one: a deriver killed at any point leaves every batch either
        derived or still queued, never half done. Samples are read back from
        the store. A batch that cannot be derived is parked (see ``_isolate``),
        counted among those done.
        """
        done = self._derive_queued(limit, self._derive_claim)

        def chunk() -> int:
            with _transaction(self.conn):
                return self._redo_chunk() or self._humid_chunk()

        return done + self._redo_positions(None if limit is None else limit - done, chunk)

    def _in_transaction(self, work: Callable[[], object]) -> None:
        with _transaction(self.conn):
            work()

    def _upsert_positions(self, rows: list[tuple[Any, ...]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO positions VALUES (?,?,?,?,?,?,?,?,?)", rows)

    def _derive_claim(self, take: int, batch_id: str | None = None) -> int:
        """One transaction: derive up to ``take`` queued batches (or that one) and dequeue them."""
        c = self.conn
        only = " WHERE batch_id = ?" if batch_id is not None else ""
        self._new_unit()
        with _transaction(c):
            rows = c.execute(
                f"SELECT batch_id, device, epoch, first_seq, last_seq FROM derive_queue{only}"
                " ORDER BY received_utc_ms, rowid LIMIT ?", (*([batch_id] if only else []), take)
            ).fetchall()
            if rows:
                for batch in self._merged(rows):
                    self._derive(batch)
                c.executemany("DELETE FROM derive_queue WHERE batch_id=?", [(r[0],) for r in rows])
                self._bump("batches_derived", len(rows))
                crash_point("receiver.derive.before")
        return len(rows)

    def _derive_inline(self, batch: Batch, received_ms: int) -> None:
        """``_derive`` inside the ingest transaction; a batch whose content cannot be derived is
        stored raw and parked instead, so its upload is still answered and the group committed."""
        c = self.conn
        c.execute("SAVEPOINT derive")
        try:
            self._derive(batch)
        except Exception as exc:
            c.execute("ROLLBACK TO derive")
            c.execute("RELEASE derive")
            if self._store_failure(exc):
                raise
            self._park_new(batch, exc, received_ms)
            self._bump("batches_parked")
            return
        c.execute("RELEASE derive")

    def _park(self, batch_id: str, reason: str) -> None:
        c = self.conn
        with _transaction(c):
            c.execute(
                "INSERT OR REPLACE INTO derive_parked SELECT batch_id, device, epoch, first_seq, last_seq,"
                " received_utc_ms, ?, CAST(strftime('%s', 'now') AS INTEGER) * 1000 FROM derive_queue"
                " WHERE batch_id = ?", (reason, batch_id))
            c.execute("DELETE FROM derive_queue WHERE batch_id = ?", (batch_id,))
            self._bump("batches_parked")
        log.error("parked batch %s: it cannot be derived (%s); the others go on", batch_id, reason)

    def requeue_parked(self) -> int:
        """Queue every parked batch for deriving again (after a fix); how many."""
        c = self.conn
        with _transaction(c):
            n = c.execute("INSERT OR IGNORE INTO derive_queue SELECT batch_id, device, epoch, first_seq, last_seq,"
                          " received_utc_ms FROM derive_parked").rowcount
            c.execute("DELETE FROM derive_parked")
        return int(n)

    def derive_backlog(self) -> int:
        """Batches stored but not derived yet."""
        return int(self.conn.execute("SELECT count(*) FROM derive_queue").fetchone()[0])

    def _join_positions(self, batch: Batch, fixes: list[tuple]) -> None:  # type: ignore[type-arg]
        """Give this batch's sensor samples a position, and revisit open ones near new fixes."""
        gap = self.max_gap_ms
        sensor = [s for s in batch.samples if s.sensor != GPS_SENSOR]
        timeless = [s for s in sensor if s.t_utc_ms is None]
        sensor = [s for s in sensor if s.t_utc_ms is not None]
        self.conn.executemany(
            "INSERT OR REPLACE INTO positions (device, epoch, seq, state) VALUES (?,?,?,?)",
            [(batch.device, batch.epoch, s.seq, NO_TIME) for s in timeless],
        )
        times = [s.t_utc_ms for s in sensor] + [f[3] for f in fixes]
        if not times:
            return
        lo, hi = min(times) - gap, max(times) + gap
        device = batch.device
        c = self.conn
        fix_times = [f[3] for f in fixes]
        newest, reopened, fx, ft = self._join_inputs(device, lo, hi, gap, fix_times)
        todo = [(batch.epoch, s.seq, s.t_utc_ms) for s in sensor] + reopened
        out = []
        for epoch, seq, t in todo:
            p = locate(fx, ft, t, gap, newest)
            out.append((device, epoch, seq, t, p.state, p.lat, p.lon, p.speed_mps, p.fix_quality))
        self._upsert_positions(out)
        self._close_pending(device, newest, gap, fix_times)

    def _flag_quality(self, batch: Batch) -> None:
        """Quality flags for this batch's values, with the preceding values as window context."""
        rows, revised = quality_rows(batch, self._contexts(batch), housing_records(self.conn, batch.device))
        self.conn.executemany("INSERT OR REPLACE INTO quality VALUES (?,?,?,?,?)", rows)
        self._revise_quality(batch.device, batch.epoch, revised)

    def _context(self, device: str, epoch: str, sensor: str, quantity: str, before_seq: int) -> Context:
        rows = self.conn.execute(
            "SELECT seq, vals FROM samples WHERE device=? AND epoch=? AND sensor=? AND seq < ?"
            " AND json_type(vals, '$.' || ?) IS NOT NULL ORDER BY seq DESC LIMIT ?",
            (device, epoch, sensor, before_seq, quantity, CONTEXT_ROWS),
        ).fetchall()
        ctx, cut, _ = _context_of([(seq, _values(v)) for seq, v in reversed(rows)], quantity,
                                  more=len(rows) == CONTEXT_ROWS)
        return ctx, cut

    def dead_letter(
        self, topic: str, device: str | None, reason: str, payload: bytes, sha256: str, received_ms: int,
        *, once: bool = False, mid: int | None = None,
    ) -> None:
        self.dead_letter_many([DeadLetter(topic, device, reason, payload, sha256, received_ms, once, mid)])

    def dead_letter_many(self, items: Sequence[DeadLetter]) -> None:
        """Keep rejected uploads, all in one transaction (a flood of them: one commit, not one each)."""
        if not items:
            return
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for name, by in self._write_dead_letters(items).items():
                self._bump(name, by)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def _insert_dead_letters(self, items: Sequence[DeadLetter]) -> None:
        for d in items:
            cur = self.conn.execute(
                "INSERT INTO dead_letters (received_utc_ms, topic, device, reason, sha256, payload)"
                " VALUES (?,?,?,?,?,?)", (d.received_ms, d.topic, d.device, d.reason, d.sha256, d.payload))
            self.conn.execute("INSERT INTO dead_letters_unacked (id, run, mid) VALUES (?, ?, ?)",
                              (cur.lastrowid, self.run, d.mid))

    def count(self, name: str, by: int = 1) -> None:
        """Add to a running total (outside any ingest transaction)."""
        with self.conn:
            self._bump(name, by)

    def record_status(self, device: str, status: dict[str, object], received_ms: int) -> None:
        """Keep each device's latest heartbeat (or last will).

        A last will says only ``online: false``: keep the figures of the last heartbeat
        beside it, so the fleet page still shows the backlog the van went away with.
        """
        if set(status) <= {"v", "online", "device"}:
            row = self.conn.execute("SELECT status FROM device_status WHERE device=?", (device,)).fetchone()
            if row:
                status = {**json.loads(row[0]), **status}
        with self.conn:
            self.conn.execute(
                "INSERT INTO device_status VALUES (?,?,?,?) ON CONFLICT(device) DO UPDATE SET"
                " received_utc_ms=excluded.received_utc_ms, online=excluded.online, status=excluded.status",
                (device, received_ms, int(bool(status.get("online"))), json.dumps(status)),
            )

    # -- reads ----------------------------------------------------------------

    def known_batches(self, batch_ids: list[str]) -> list[tuple[str, str]]:
        """(batch id, sha256) of those of ``batch_ids`` already committed."""
        out: list[tuple[str, str]] = []
        for i in range(0, len(batch_ids), 500):
            chunk = batch_ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            out += self.conn.execute(
                f"SELECT batch_id, sha256 FROM batches WHERE batch_id IN ({marks})", chunk
            ).fetchall()
        return out


# Queued batches a deriver takes per transaction (and merges per van).
DERIVE_CLAIM = 32
PARK_REASON_CHARS = 500  # a parked batch's reason is the error, shortened
# Seqs read back for the moving windows' context: each of up to 8 interleaved sensors' last CONTEXT
# (a van with more sensors, or a stream with many nulls, reads its stream on its own).
CONTEXT_SPAN = quality.CONTEXT * 8
# Rows a stream's own context read takes at most: a stream with more nulls than this gets
# a shorter context (its windows reach back over fewer values), never an unbounded read.
CONTEXT_ROWS = quality.CONTEXT * 4
Context = tuple[list[tuple[int, float, dict[str, Any]]], bool]  # (seq, value, values) ..., cut short


@contextmanager
def _transaction(c: sqlite3.Connection) -> Iterator[None]:
    """A write transaction on an autocommit connection (``with conn:`` would not begin one)."""
    c.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")


def _values(v: Any) -> dict[str, Any]:
    """A ``vals`` column as a dict (jsonb arrives decoded, SQLite text does not).

    Read as a later batch's context: a row that is not an object (damaged, or
    from an older writer) counts as no values, so it cannot stop the batches after it.
    """
    if isinstance(v, (str, bytes)):
        try:
            v = orjson.loads(v)
        except orjson.JSONDecodeError:
            return {}
    return v if isinstance(v, dict) else {}


# A stamp more than this far ahead of the receiver's own clock is a device clock fault.
MAX_FUTURE_MS = 24 * 3600 * 1000


def _screen_times(batch: Batch, received_ms: int) -> None:
    """Never store a time the sensors cannot have lived in: unknown is more honest."""
    for s in batch.samples:
        t = s.t_utc_ms
        if t is not None and (t < MIN_PLAUSIBLE_UTC_MS or t > received_ms + MAX_FUTURE_MS):
            s.t_utc_ms = None
            s.flags = (*s.flags, "time_implausible")


def quality_rows(
    batch: Batch, context: Callable[[str, str, int], Context], warming: WarmingAt | None = None
) -> tuple[list[tuple[str, str, int, str, str]], list[tuple[int, str, int, int]]]:
    """(device, epoch, seq, quantity, flags) for every flagged value of a batch, and revisits.

    ``context(sensor, quantity, first_seq)`` gives (seq, value, values) just before the
    batch, so moving windows run across batch boundaries; the flags of those
    earlier values that this batch settles come back as revisits (seq,
    quantity, bits to set, bits to clear first; ``quality.revisit``), so a
    stream's flags do not depend on where its batches split. Backend-neutral:
    the PostgreSQL store uses it too. Works on whole series at once (bit masks,
    see ``quality.BIT``): this runs for every value the receiver derives.
    """
    by_stream: dict[tuple[str, str], list[Sample]] = {}
    for smp in batch.samples:
        if smp.sensor == GPS_SENSOR:
            continue
        if not isinstance(smp.values, dict):  # a damaged row: the batch is parked, the others go on
            raise TypeError(f"sample {smp.seq}: values are {type(smp.values).__name__}, not an object")
        for q in smp.values:
            if q in quality.FLAGGED or quality.is_rh_key(q):
                by_stream.setdefault((smp.sensor, q), []).append(smp)
    rh_t, rh_v = _rh_series(batch, warming)  # as the PM housing sees it: the RH pm_derive divides by
    out = []
    revised: list[tuple[int, str, int, int]] = []
    for (sensor, q), samples in by_stream.items():
        samples.sort(key=lambda x: x.seq or 0)
        v = np.array([_num_or_nan(x.values.get(q)) for x in samples], dtype=float)
        if q not in quality.FLAGGED:  # an RH reading: only its range (issue #15), no window rules
            out += [(batch.device, batch.epoch, samples[k].seq, q, quality.mask_text(int(m)))
                    for k, m in enumerate(quality.rh_masks(v)) if m]
            continue
        ctx, cut = context(sensor, q, samples[0].seq or 0)
        cv = [c[1] for c in ctx]
        frames, ctx_frames = None, []
        if quality.has_low_whole(v) or quality.has_low_whole(np.asarray(cv, dtype=float)):
            # frames only where the stuck rule needs them: hashing every sample costs a third of this
            frames = [quality.frame_key(x.values) for x in samples]
            ctx_frames = [quality.frame_key(c[2]) for c in ctx]
        full = quality.series_masks(v, cv, frames=frames, context_frames=ctx_frames, with_context=True)
        mask = quality.value_masks(q, v) | full[len(cv):]
        mask |= np.fromiter((quality.sample_mask(x.flags, str(x.time_src)) for x in samples),
                            dtype=np.int64, count=len(samples))
        if q in quality.PM_QUANTITIES:
            t = np.array([_NAN if x.t_utc_ms is None else x.t_utc_ms for x in samples], dtype=float)
            own = np.array([quality.own_rh(x.values) for x in samples], dtype=float)
            mask |= quality.pm_rh_mask(quality.pm_rh(own, t, rh_t, rh_v))  # the RH pm_derive divides by
        for k in np.nonzero(mask)[0]:
            out.append((batch.device, batch.epoch, samples[k].seq, q, quality.mask_text(int(mask[k]))))
        pick, bits, clear = quality.revisit(cv, full, cut)
        revised += [(ctx[i][0], q, int(b), int(c)) for i, b, c in zip(pick, bits, clear)]
    return out, revised


def _context_of(rows: list[tuple[int, dict[str, Any]]], q: str, *, more: bool
                ) -> tuple[list[tuple[int, float, dict[str, Any]]], bool, bool]:
    """``quality_rows``' context from a stream's earlier samples (seq order): (seq, value or
    NaN, the sample's values) back to the CONTEXT-th real value, whether the stream may go on before
    it, and whether it holds that many (else a longer read may find more; ``more``: the
    rows are not the stream's start)."""
    out: list[tuple[int, float, dict[str, Any]]] = []
    real = 0
    for seq, v in reversed(rows):
        if real == quality.CONTEXT:
            return out[::-1], True, True
        x = _num_or_nan(v.get(q))
        out.append((seq, x, v))
        real += not (x != x or is_sentinel(x))  # NaN != NaN
    return out[::-1], more, real == quality.CONTEXT


def _rh_series(batch: Batch, warming: WarmingAt | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(times, values) of every relative humidity the van measured in this batch, by time.

    Any sensor's RH counts (``quality.is_rh_key``): the DGS-NO2 sends ``no2_rh_pct``
    beside the PM sensor, and fog is the van's air, not one sensor's. ``warming``: the van's
    PM housing warming at a time (pm_derive.Housing): ambient RH taken to the housing's.
    """
    rh_at: list[tuple[int, float]] = []
    for smp in batch.samples:
        if smp.t_utc_ms is None or smp.sensor == GPS_SENSOR:
            continue
        for rh in rh_readings(smp.values, None if warming is None else warming(smp.t_utc_ms)):
            rh_at.append((smp.t_utc_ms, rh))
    rh_at.sort()
    return (np.array([r[0] for r in rh_at], dtype=float), np.array([r[1] for r in rh_at], dtype=float))


_NAN = float("nan")


_OPEN = f"state IN ('{PENDING}', '{NO_FIX}')"  # literal: matches the partial index positions_open
# A deferred window marked ``interp`` holds interpolated samples whose bracket a late fix split
# (_split_brackets): the deriver places those again too.
_REDO = f"state IN ('{PENDING}', '{NO_FIX}', '{INTERPOLATED}')"


def _split_brackets(fix_times: Sequence[int], new: Sequence[int], gap: int) -> list[tuple[int, int]]:
    """Open intervals ``(before, after)`` between the fixes other than ``new`` (``fix_times``:
    all of them, sorted) that a ``new`` fix falls strictly inside, at most ``gap`` long.

    A sample interpolated before the new fixes came was placed between two such fixes at most
    ``gap`` apart; only if a new fix lies between them does its place change. Counting a re-sent
    fix as new only widens an interval (a few extra samples placed again, the same place).
    """
    fresh = set(new)
    old = [t for t in fix_times if t not in fresh]
    out: list[tuple[int, int]] = []
    for t in sorted(fresh):
        i = bisect_right(old, t)
        if 0 < i < len(old) and old[i] - old[i - 1] <= gap and (not out or out[-1] != (old[i - 1], old[i])):
            out.append((old[i - 1], old[i]))
    return out


def _windows(times: Sequence[int], gap: int) -> list[tuple[int, int]]:
    """``[t - gap, t + gap]`` around each time, overlapping ones merged (a fix a second: one)."""
    out: list[tuple[int, int]] = []
    for t in sorted(times):
        if out and t - gap <= out[-1][1]:
            out[-1] = (out[-1][0], t + gap)
        else:
            out.append((t - gap, t + gap))
    return out


def _num_or_nan(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _NAN


def _has_fix(values: dict[str, object]) -> bool:
    lat, lon = values.get("lat"), values.get("lon")
    return isinstance(lat, (int, float)) and isinstance(lon, (int, float)) and bool(
        values.get("fix_quality", 1)
    )


# Built once: json.dumps with options builds a new encoder per call, a third of its cost here.
_encode_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _json_bytes(values: dict[str, Any]) -> bytes:
    """``_json`` as UTF-8 bytes (what a binary COPY sends), with the same checks."""
    try:
        out = orjson.dumps(values)
    except (orjson.JSONEncodeError, TypeError):
        return _json(values).encode()
    return out if b"null" not in out else _json(values).encode()


def _json(values: dict[str, Any]) -> str:
    """The values as compact JSON, the same text as the stdlib's compact encoder.

    NaN and infinity are not JSON (and jsonb refuses them): a PayloadError.
    orjson would quietly write them as null, so output with a null in it
    (rare: a value the device could not read) is redone by the stdlib encoder,
    which refuses them; so is anything orjson cannot encode (an integer beyond
    64 bits).
    """
    try:
        out = orjson.dumps(values)
        if b"null" not in out:
            return out.decode()
    except (orjson.JSONEncodeError, TypeError):
        pass
    try:
        return _encode_json(values)
    except ValueError as exc:
        raise PayloadError(f"values that JSON cannot hold (NaN or infinity): {exc}") from exc


def read_json(raw: str | bytes) -> Any:
    """Stored JSON read back: orjson, or for a row orjson refuses the stdlib, with numbers a
    double cannot hold as NaN. Such rows predate the admission schema (receiver/validate.py):
    a stored 10^309 made orjson fail on every later batch of its van that read it as context
    (PostgreSQL decodes jsonb with this; SQLite's context reads skip such a row, ``_values``)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw, parse_int=_bounded_int, parse_float=_finite_float,
                              parse_constant=lambda _: _NAN)
        except (ValueError, RecursionError):
            return {}


def _bounded_int(text: str) -> int | float:
    """A JSON integer as int when 64-bit, else NaN. The sign does not count as a digit: a
    negative 19-digit number (20 characters) used to read as NaN (issue 13 review)."""
    if len(text.lstrip("-")) > 19:  # never convert thousands of digits just to refuse them
        return _NAN
    v = int(text)
    return v if -(2**63) <= v < 2**63 else _NAN


def _finite_float(text: str) -> float:
    """A JSON number as float, NaN where a double cannot hold it (``1e999`` read as inf)."""
    v = float(text)
    return v if math.isfinite(v) else _NAN


def _sample_from_row(r: tuple[Any, ...]) -> Sample:
    """A sample read back from ``samples`` (seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags)."""
    vals = read_json(r[6]) if isinstance(r[6], (str, bytes)) else dict(r[6] or {})
    return Sample(r[1], r[2], r[3], r[4], vals, tuple(r[7].split(",")) if r[7] else (), r[0], r[5] or "")


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: object) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
