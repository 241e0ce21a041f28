"""What the buffer does when its file cannot be trusted: detect, quarantine, salvage.

The rules (delivery contract, "Corruption"):

* detect at open: a WAL whose header or committed frames are damaged (SQLite
  itself would silently ignore them, losing committed transactions), a file
  that is not a database, ``PRAGMA quick_check`` not ``ok``; and during use:
  any ``SQLITE_CORRUPT`` / ``SQLITE_NOTADB`` error;
* quarantine: the database and its ``-wal`` / ``-shm`` move *together* into
  ``<data_dir>/quarantine/<utc>-<epoch>/``. Nothing is ever deleted: the copy
  is evidence, and a later, better salvage tool may read more from it;
* salvage: read what can still be read from the quarantined copy, opened
  read-only so the evidence stays byte-identical. Sealed batches are
  self-contained (device, epoch, range and samples are in the payload, the
  hash is stored beside it), so a verified payload is re-published as it is,
  under its old id: the receiver deduplicates it if it already has it.
  Unsealed samples are sealed into batches *of their old epoch* (see
  ``Buffer._apply_salvage`` for why), and what is known to be lost becomes a
  gap record of the old epoch.

This module only reads and moves files; writing the salvage into the new
database is the ``Buffer``'s job, in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import PayloadError
from buffer import rowcheck
from buffer.identity import vouched_epoch
from core.sample import Sample
from core.wire import Gap, content_hash, decode_batch

# Primary result codes (the low byte of an extended code).
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26

PARTIAL_SUFFIX = ".partial"
SALVAGED_MARK = "SALVAGED"
REASON_FILE = "reason.txt"

# A gap-carrying batch of a dead epoch is named after sequence numbers past the
# end of that epoch, so its id can never equal the id of a real sample batch
# (the receiver refuses an id that comes back with other bytes). When the
# epoch's last number is not known for sure, jump far beyond anything it used.
CARRIER_OFFSET_UNCERTAIN = 1_000_000_000
# "To the end of this epoch": the last sequence number an epoch whose end cannot be
# read (a WAL damaged before its last commits) may have reached. A gap up to here
# owns up to everything the dead epoch committed after what could be read.
EPOCH_END = 1 << 60


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


# Errors that mean the table definitions themselves are damaged (a flipped bit on page 1
# or in sqlite_master): the code never names a table or column the schema lacks.
SCHEMA_DAMAGE = ("no such column", "no such table", "has no column named", "malformed database schema")


def is_corruption(exc: BaseException) -> bool:
    """True for the errors that mean the file itself is damaged (not busy, not full)."""
    if isinstance(exc, UnicodeDecodeError):
        return True  # text SQLite hands out (a pragma's report, a name) that was never written
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    msg = str(exc).lower()
    if "could not decode to utf-8" in msg:
        return True  # text that was never written: a garbled page SQLite did not notice
    if any(m in msg for m in SCHEMA_DAMAGE):
        return True  # our schema is fixed: a table or column it lacks was garbled away
    code = _code(exc)
    if code is not None:
        return code in (SQLITE_CORRUPT, SQLITE_NOTADB)
    return "malformed" in msg or "not a database" in msg


def is_disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL (a full file system, or max_page_count) or ENOSPC seen by Python."""
    if isinstance(exc, sqlite3.DatabaseError):
        return _code(exc) == SQLITE_FULL or "database or disk is full" in str(exc).lower()
    return isinstance(exc, OSError) and exc.errno in (28, 122)  # ENOSPC, EDQUOT


# --- the WAL -------------------------------------------------------------------

_WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_VERSION = 3007000


def _wal_cksum(data: bytes, s1: int, s2: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's cumulative WAL checksum (wal.c, walChecksumBytes)."""
    n = len(data) // 4
    words = struct.unpack((">" if big_endian else "<") + f"{n}I", data[: n * 4])
    m = 0xFFFFFFFF
    for i in range(0, n, 2):
        s1 = (s1 + words[i] + s2) & m
        s2 = (s2 + words[i + 1] + s1) & m
    return s1, s2


def wal_problem(wal: Path) -> str | None:
    """Why this WAL would lose committed transactions, or None if it looks sound.

    SQLite replays a WAL only up to its first invalid frame and ignores a WAL
    whose header is invalid, *silently*: every transaction committed after the
    damage is gone. Sector writes being atomic, a power cut cannot produce a
    header with a bad checksum, and it can tear only the last transaction (the
    one whose commit never returned). So: a bad header, or a committed frame of
    the current generation *after* the torn-tail allowance, is damage.

    Frames of an older generation (other salts) past the end are normal: the
    WAL is rewritten from the start after each checkpoint.
    """
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return None
    if not data:
        return None
    if len(data) < 32:
        return f"WAL of {len(data)} bytes has no complete header"
    magic, version, page_size, _ckpt, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    if magic not in _WAL_MAGIC:
        return "WAL header has a bad magic number"
    big = bool(magic & 1)
    if version != _WAL_VERSION or page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return "WAL header has a bad version or page size"
    if _wal_cksum(data[:24], 0, 0, big) != (c1, c2):
        return "WAL header checksum mismatch"
    frame = 24 + page_size
    s = (c1, c2)
    chain_ok = True
    commit_after_end = False
    off = 32
    while off + frame <= len(data):
        pgno, commit, fs1, fs2, fc1, fc2 = struct.unpack(">6I", data[off : off + 24])
        current = (fs1, fs2) == (salt1, salt2)
        if chain_ok:
            nxt = _wal_cksum(data[off : off + 8] + data[off + 24 : off + frame], s[0], s[1], big)
            if current and pgno != 0 and nxt == (fc1, fc2):
                s = nxt
            else:
                chain_ok = False  # SQLite stops reading here
                if current and commit:
                    commit_after_end = True
        elif current:
            if commit_after_end:
                return f"committed WAL frames unreadable past offset {off}"
            if commit:
                commit_after_end = True
        off += frame
    return None


# --- quarantine ----------------------------------------------------------------


def companion_files(db: Path) -> list[Path]:
    """The database and the files SQLite keeps beside it, in the order they are moved.

    The WAL goes first and the main file last: if a power cut interrupts the
    move, ``finish_quarantines`` completes it from the ``.partial`` folder.
    """
    return [Path(str(db) + "-wal"), Path(str(db) + "-shm"), Path(str(db) + "-journal"), db]


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def quarantine(db: Path, root: Path, epoch: str | None, reason: str) -> Path:
    """Move ``db`` and its companions into a fresh folder under ``root``; never delete.

    Crash-safe: the folder is named ``*.partial`` until every file is in; a
    restart finds it and finishes the move before anything opens ``db``.
    """
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"{stamp}-{epoch or 'unknown'}"
    name, n = base, 1
    while (root / name).exists() or (root / (name + PARTIAL_SUFFIX)).exists():
        n += 1
        name = f"{base}-{n}"
    partial = root / (name + PARTIAL_SUFFIX)
    partial.mkdir()
    (partial / REASON_FILE).write_text(reason + "\n")
    _fsync_dir(root)
    return _complete(db, partial)


def _complete(db: Path, partial: Path) -> Path:
    for f in companion_files(db):
        if f.exists():
            os.replace(f, partial / f.name)  # same file system: an atomic rename
    _fsync_dir(partial)
    _fsync_dir(db.parent)
    final = partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)])
    os.replace(partial, final)
    _fsync_dir(partial.parent)
    return final


def finish_quarantines(db: Path, root: Path) -> list[Path]:
    """Complete moves a power cut interrupted (files left at ``db`` belong to them)."""
    if not root.is_dir():
        return []
    return [_complete(db, p) for p in sorted(root.glob("*" + PARTIAL_SUFFIX)) if p.is_dir()]


def unsalvaged(root: Path) -> list[Path]:
    """Quarantine folders whose salvage has not been recorded as done."""
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX) and not (p / SALVAGED_MARK).exists()
    )


def mark_salvaged(qdir: Path, summary: dict[str, object]) -> None:
    tmp = qdir / (SALVAGED_MARK + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
    os.replace(tmp, qdir / SALVAGED_MARK)
    _fsync_dir(qdir)


def quarantine_bytes(root: Path) -> int:
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


# --- salvage -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SalvagedBatch:
    """A sealed batch read back from a quarantined file, its payload verified."""

    device: str
    epoch: str
    first_seq: int
    last_seq: int
    n_samples: int
    payload: bytes
    sha256: str
    sealed_utc_ms: int
    oldest_utc_ms: int | None
    carried: tuple[tuple[int, int], ...] = ()  # ranges of the gap records inside the payload


@dataclass
class Salvage:
    """Everything read back from one quarantined database."""

    epoch: str | None = None
    device: str | None = None
    batches: list[SalvagedBatch] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)  # unsealed, of ``epoch``
    gaps: list[Gap] = field(default_factory=list)  # of ``epoch``: undelivered ones and the losses
    other_gaps: dict[str, list[Gap]] = field(default_factory=dict)  # of older epochs
    carrier_next: dict[str, int] = field(default_factory=dict)  # epoch -> next carrier seq
    carrier_base: int | None = None  # for ``epoch``
    notes: list[str] = field(default_factory=list)


def _open_ro(db: Path) -> sqlite3.Connection:
    """Open the quarantined copy without changing it (no checkpoint, no recovery write)."""
    try:
        conn = _connect_tolerant(db.as_uri() + "?mode=ro")
    except sqlite3.DatabaseError:
        # A WAL that cannot even be opened: read the main file alone.
        conn = _connect_tolerant(db.as_uri() + "?immutable=1")
    # Garbled text must not stop a scan: the row's fields are type-checked below.
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    return conn


def _connect_tolerant(uri: str) -> sqlite3.Connection:
    """A read-only connection that reads what it can of a damaged schema.

    With ``writable_schema`` on, SQLite skips table definitions it cannot parse
    instead of refusing the whole file ("malformed database schema"): one
    garbled definition then costs that table, not every table (the connection
    is read-only, so nothing is ever written through it).
    """
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _ints(*xs: object) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) for x in xs)


def _scan(conn: sqlite3.Connection, sql: str, key: str, params: tuple = ()) -> tuple[list[tuple], bool]:
    """Rows of ``sql`` (``key`` first), read forwards and then backwards around damage.

    A damaged page stops a scan; reading from the other end picks up the rows
    behind it. Returns (rows, complete).
    """
    rows: list[tuple] = []
    try:
        for r in conn.execute(f"{sql} ORDER BY {key}", params):
            rows.append(r)
        return rows, True
    except sqlite3.DatabaseError:
        pass
    back: list[tuple] = []
    lo = rows[-1][0] if rows else None
    where = (" AND " if " WHERE " in sql else " WHERE ") + f"{key} > ?" if lo is not None else ""
    try:
        for r in conn.execute(f"{sql}{where} ORDER BY {key} DESC", params + ((lo,) if lo is not None else ())):
            back.append(r)
    except sqlite3.DatabaseError:
        pass
    return rows + back[::-1], False


def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    try:
        r = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    except sqlite3.DatabaseError:
        return None
    return str(r[0]) if r else None


def _verify(row: tuple, epoch: str | None, device: str | None) -> SalvagedBatch | None:
    """A batch row whose payload matches its hash and decodes to the range it claims."""
    first, last, n, payload, sha, sealed, oldest, r_epoch, r_device = row
    if not _ints(first, last, n) or not isinstance(payload, bytes) or content_hash(payload) != sha:
        return None
    try:
        b = decode_batch(payload)
    except PayloadError:
        return None
    if (b.first_seq, b.last_seq) != (first, last):
        return None
    if (r_epoch or epoch) not in (None, b.epoch) or (r_device or device) not in (None, b.device):
        return None
    sealed = sealed if _ints(sealed) else 0
    oldest = oldest if _ints(oldest) else None
    return SalvagedBatch(b.device, b.epoch, first, last, int(n), payload, sha, int(sealed), oldest,
                         tuple((g.first_seq, g.last_seq) for g in b.gaps))


def _ranges(seqs: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted integers as (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for q in seqs:
        if out and q == out[-1][1] + 1:
            out[-1] = (out[-1][0], q)
        else:
            out.append((q, q))
    return out


def _missing(lo: int, hi: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sub-ranges of [lo, hi] not inside any of ``covered``."""
    out: list[tuple[int, int]] = []
    cur = lo
    for a, b in sorted(covered):
        if b < cur:
            continue
        if a > hi:
            break
        if a > cur:
            out.append((cur, min(a - 1, hi)))
        cur = max(cur, b + 1)
        if cur > hi:
            break
    if cur <= hi:
        out.append((cur, hi))
    return out


# Public names for the seal-time set-aside, which places a damaged key by the same arithmetic.
ranges, missing = _ranges, _missing


def salvage(db: Path, identity: tuple[str, str] | None = None) -> Salvage:
    """Read back what can be read from a quarantined database file (opened read-only).

    ``identity``: (epoch, device) kept outside the file (``buffer.identity``),
    so a file whose every table is unreadable still has its loss named.
    """
    out = Salvage()
    try:
        conn = _open_ro(db)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        out.notes.append(f"unreadable: {exc}")
        if identity is not None:
            out.epoch, out.device = identity
            _name_unread_rest(out, 0)
        return out
    try:
        _salvage_into(conn, out, wal_damaged=wal_problem(Path(str(db) + "-wal")) is not None,
                      identity=identity, orphan_epoch=orphan_epoch(db))
    except (TypeError, ValueError, OverflowError, UnicodeError, KeyError, IndexError) as exc:
        # Last line of defence: a damaged value no check above foresaw must not stop the van
        # at every start. What was read is half-built and not trusted: own up to the whole
        # epoch (the receiver subtracts what it already holds) and keep the file as evidence.
        first_note = out.notes[:1]
        out = Salvage(notes=[*first_note, f"salvage failed on a damaged value: {type(exc).__name__}: {exc}"])
        if identity is not None:
            out.epoch, out.device = identity
            out.gaps.append(Gap(1, EPOCH_END, "salvage failed: damaged file (may include delivered ones)"))
            out.carrier_base = EPOCH_END + 1
    finally:
        conn.close()
    return out


def _name_unread_rest(out: Salvage, top: int) -> None:
    """How far the epoch went is unknown: own up to every number past what was read."""
    out.gaps.append(Gap(top + 1, EPOCH_END, f"corrupt database: rows after seq {top} unreadable"))
    out.carrier_base = EPOCH_END + 1


def orphan_epoch(db: Path) -> str:
    """The epoch readable samples travel under when nothing trustworthy names theirs.

    Derived from the quarantine folder's name, so a salvage run again (a crash before it
    was marked done) gives the same ids and the receiver deduplicates."""
    name = f"salvage:{db.parent.name}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(name).hexdigest()[:16]


def _salvage_into(conn: sqlite3.Connection, out: Salvage, *, wal_damaged: bool = False,
                  identity: tuple[str, str] | None = None, orphan_epoch: str | None = None) -> None:
    out.epoch = _meta(conn, "epoch")
    out.device = _meta(conn, "device")
    if out.epoch is not None:
        trusted, true_epoch = vouched_epoch(out.epoch, _meta(conn, "epoch_check"),
                                            identity[0] if identity else None)
        if not trusted:
            # A garbled epoch must not name the salvage: the batches' own payloads (or the
            # identity file, below) name the true one.
            out.notes.append(f"meta epoch {out.epoch[:40]!r} fails its check; true epoch {true_epoch!r}")
            out.epoch = None
    watermark = _meta(conn, "sealed_through")
    sealed_through = int(watermark) if watermark and watermark.isdigit() else None
    acked = _meta(conn, "acked_through")
    # Absent (a file from before the mark, or meta damaged): nothing is proven delivered.
    acked_through = int(acked) if acked and acked.isdigit() else 0
    last_seq: int | None = None
    try:
        r = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()
        last_seq = int(r[0]) if r and _ints(r[0]) else (0 if r is None else None)
    except sqlite3.DatabaseError:
        pass
    if last_seq is None:
        out.notes.append("sqlite_sequence unreadable")

    lost: list[tuple[int, int, str]] = []
    own, complete = _batch_rows(conn, "SELECT first_seq, last_seq, n_samples, payload, sha256,"
                                " sealed_utc_ms, oldest_utc_ms, NULL, NULL FROM batches", "first_seq")
    for row in own:
        sb = _verify(row, out.epoch, out.device)
        if sb is None:
            if _ints(row[0], row[1]) and 0 < row[0] <= row[1]:
                lost.append((row[0], row[1], "corrupt database: sealed batch unreadable"))
            complete = False  # a garbled key: its range may be elsewhere
        else:
            out.epoch = out.epoch or sb.epoch  # a payload names its epoch even if meta is gone
            out.device = out.device or sb.device
            out.batches.append(sb)
    if not complete:
        out.notes.append("batches table partly unreadable")

    # Batches of earlier epochs this file had itself salvaged: they go on as they are.
    foreign, _ = _batch_rows(conn, "SELECT first_seq, last_seq, n_samples, payload, sha256,"
                             " sealed_utc_ms, oldest_utc_ms, epoch, device FROM salvaged", "rowid")
    for row in foreign:
        sb = _verify(row, None, None)
        if sb is None:
            if isinstance(row[7], str) and _ints(row[0], row[1]) and 0 < row[0] <= row[1]:
                out.other_gaps.setdefault(row[7], []).append(
                    Gap(row[0], row[1], "corrupt database: salvaged batch unreadable"))
        else:
            out.batches.append(sb)
    out.carrier_next = _carrier_rows(conn, out.notes)

    out.samples, failed, samples_complete = _sample_rows(conn)
    if not samples_complete:
        out.notes.append("samples table partly unreadable")
    out.gaps = _undelivered_gaps(conn)
    if out.epoch is None and identity is not None:
        out.epoch, out.device = out.epoch or identity[0], out.device or identity[1]
        out.notes.append("epoch from the identity file: meta unreadable")
    if out.epoch is None and out.samples and orphan_epoch is not None:
        # Meta unreadable and no side file of this van names the epoch (gone, damaged, or another
        # van's, which must not name it): the committed samples still reach the store, under an
        # epoch of their own, never silently dropped nor under another van's name.
        out.epoch = orphan_epoch
        out.notes.append(f"epoch unknown: readable samples salvaged under epoch {orphan_epoch}")
    if out.epoch is None:
        out.notes.append("epoch unknown: losses cannot be named")
        return
    own_ranges = [(b.first_seq, b.last_seq) for b in out.batches if b.epoch == out.epoch and b.n_samples]
    seen = [q for s in out.samples if (q := s.seq) is not None]
    hi_seen = max([q for _, q in own_ranges] + seen + [0])
    certain = last_seq is not None
    top = max(last_seq or 0, hi_seen)
    out.carrier_base = top + 1 if certain else hi_seen + CARRIER_OFFSET_UNCERTAIN
    carried = [r for b in out.batches if b.epoch == out.epoch for r in b.carried]
    covered = own_ranges + _ranges(sorted(seen)) + carried + [(g.first_seq, g.last_seq) for g in out.gaps]
    # Rows that failed their check: owned up to with the reason, at the seq they claim
    # if it is a number this epoch can have used and nothing readable holds it (a
    # garbled seq leaves its true number uncovered: the generic gap below takes it).
    for q, why in failed:
        if 0 < q <= top and not any(a <= q <= b for a, b in covered):
            lost.append((q, q, f"corrupt database: unsealed row not salvaged ({why})"))
            covered.append((q, q))
    if sealed_through is not None:
        # Everything above the seal watermark was never sent: what is missing there is lost.
        start, why = sealed_through + 1, "corrupt database: unsealed samples lost"
    else:
        # No watermark (older file): below the newest readable batch may be delivered.
        start = min([a for a, _ in own_ranges] + [top + 1])
        why = "corrupt database: samples lost (may include delivered ones)"
    for a, b in _missing(start, top, covered):
        lost.append((a, b, why))
    if sealed_through is not None:
        # Sealed and not proven acknowledged (above the ack mark), yet no readable batch holds
        # it: a page header saying "no rows" reads as a complete, empty table, so the absence
        # is no proof of delivery. Own up (the receiver subtracts what it already holds).
        for a, b in _missing(acked_through + 1, min(sealed_through, top), covered):
            lost.append((a, b, "salvage: batch table damaged (may include delivered ones)"))
            covered.append((a, b))
    if not complete:
        # Rows behind a damaged page: some of those ranges may have been
        # acknowledged (and deleted) before; we cannot tell, so the gap says so
        # and the receiver can subtract what it holds. Without any readable
        # batch that reaches back to the epoch's start.
        lo = min(a for a, _ in own_ranges) if own_ranges else 1
        for a, b in _missing(lo, start - 1, covered):
            lost.append((a, b, "corrupt database: sealed batches unreadable (may include delivered ones)"))
    if wal_damaged:
        # SQLite stops reading a WAL at its first bad frame: every commit after it is
        # gone, and with it the record of how far the epoch went. Own up to all of it.
        lost.append((top + 1, EPOCH_END, "corrupt WAL: commits after the damage unreadable"))
        out.carrier_base = EPOCH_END + 1
    out.gaps.extend(Gap(a, b, r) for a, b, r in sorted(lost))
    if last_seq is None and not wal_damaged:
        # sqlite_sequence (or the whole schema) unreadable: rows past the last one read
        # may exist unseen. Silent loss is the bug: name it, open-ended.
        _name_unread_rest(out, top)


def _carrier_rows(conn: sqlite3.Connection, notes: list[str]) -> dict[str, int]:
    """The ``epochs`` table's next carrier numbers, keeping only rows that make sense.

    Every field of a damaged file is untrusted: a flipped page header can make SQLite
    hand back NULL, text or a negative number for a NOT NULL integer column, and one such
    row must not stop the salvage (the van would fail at every start). A skipped row
    costs nothing: ``carrier_base`` is derived from the samples' own numbers.
    """
    out: dict[str, int] = {}
    try:
        rows, complete = _scan(conn, "SELECT rowid, epoch, next_carrier FROM epochs", "rowid")
    except sqlite3.DatabaseError:
        notes.append("epochs table unreadable")
        return out
    for _, e, n in rows:
        if isinstance(e, str) and e and _ints(n) and 0 < n <= EPOCH_END + 1:
            out[e] = max(n, out.get(e, 0))
        else:
            complete = False
    if not complete:
        notes.append("epochs table partly unreadable")
    return out


def _batch_rows(conn: sqlite3.Connection, sql: str, key: str) -> tuple[list[tuple], bool]:
    try:
        rows, complete = _scan(conn, sql.replace(" FROM ", f", {key} AS _k FROM ", 1), "_k")
    except sqlite3.DatabaseError:
        return [], False
    return [r[:-1] for r in rows], complete


SALVAGED_FLAG = "salvaged"


def _sample_rows(conn: sqlite3.Connection) -> tuple[list[Sample], list[tuple[int, str]], bool]:
    """Unsealed rows that verify (flagged ``salvaged``), the seqs of those that do not, and why.

    Only a row whose checksum matches is salvaged (``buffer.rowcheck``): a
    changed digit would otherwise be stored as a value, a garbled boot id or
    timestamp as the truth. A row without a checksum (a file from before
    them) is salvaged if it decodes. The flag tells the store the sample came
    back from a damaged file (it reaches ``observations`` through the flags).
    """
    cols = rowcheck.SELECT_COLS
    try:
        conn.execute("SELECT crc FROM samples LIMIT 0")
    except sqlite3.DatabaseError:
        cols = cols.replace(", crc", ", NULL")  # a file from before checksums
    try:
        rows, complete = _scan(conn, f"SELECT {cols} FROM samples", "seq")
    except sqlite3.DatabaseError:
        return [], [], False
    out: list[Sample] = []
    failed: list[tuple[int, str]] = []
    for r in rows:
        checked = rowcheck.check_row(r)
        if checked.sample is None:
            complete = False
            if _ints(r[0]):
                failed.append((int(r[0]), checked.why))  # its own seq may be the damage: see caller
            continue
        smp = checked.sample
        if SALVAGED_FLAG not in smp.flags:
            smp.flags = (*smp.flags, SALVAGED_FLAG)
        out.append(smp)
    return out, failed, complete


def _undelivered_gaps(conn: sqlite3.Connection) -> list[Gap]:
    """Gap records not yet sealed into a batch (sealed ones travel inside their batch)."""
    try:
        rows = conn.execute(
            "SELECT first_seq, last_seq, reason FROM gaps WHERE sent_in IS NULL ORDER BY id"
        ).fetchall()
    except sqlite3.DatabaseError:
        return []
    return [Gap(a, b, str(r)) for a, b, r in rows if _ints(a, b) and 0 < a <= b]


