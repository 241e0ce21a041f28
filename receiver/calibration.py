"""The receiver's side of calibration records: keep them, and recompute what they derive.

Vans upload each calibration record as a sample of sensor ``calibration`` whose value
``record`` is the record's JSON (edge/calibration.py ``CalibrationAnnouncer``): when a
record becomes active, the one it supersedes with its new ``valid_to``, and all active
records at every agent start. Here they land in ``calibrations``, keyed by
(device, kind, serial, version) and upserted on that key: the status and validity of a
record change as it is superseded. The device is the one the batch's topic names (the
broker's ACL vouches for it), never one the record claims: a sensor that moves to another
van is a second chain of records there, and no van can touch another van's records.
Stores made when the key was the record id alone (``no2:<serial>:vN``, so one van's
upload overwrote another's) are migrated when the store opens (``ensure_tables``).

Raw samples are never touched, and older record versions stay (history). What records
derive goes to ``derived`` with the id of the record used: each NO2 sample gets ``no2_ppb``
from its raw electrode mV and temperature by the record valid at its time (``record_at``:
of its serial's records in effect then, the newest version; windows compared in whole ms,
``_bound_ms``; an untagged sample is tied to the van's only NO2 serial, else to none).
When records arrive, ``changed_spans`` compares the record in effect before and after, per
span between record bounds, and ``recompute_no2`` redoes only those spans, a chunk of
samples at a time: a corrected (e.g. retroactive co-location) record repairs data already
stored, a routine confirmation after all data touches nothing. ``derive_batch_no2``
derives samples that arrive after their record. A version's status follows the set of
versions (``store_calibrations``), so arrival order and inline vs queued derivation end
with the same history. Every reader takes the best value through ``value_source``
/ ``derived_join`` / ``calibration_sql`` (end of this module): derived if any, else the van's.
PM's derived best value (gain, then growth undone) is written by receiver/pm_derive.py.

Functions take a DB-API connection and run inside the caller's transaction (no commit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import Any

from core.calibration import (
    CALIBRATION_SENSOR,
    NOISE_LEVEL_KEYS,
    CalibrationRecord,
    no2_ppb_from_record,
    record_id,
)
from core.errors import PayloadError
from receiver.calibration_check import check_record
from core.calibration_rules import ADC_FULL_SCALE_MV, TEMP_RANGE_C

log = logging.getLogger(__name__)

NO2_SENSOR = "no2"  # the records' kind (an NO2 sample's sensor is its free section name)
NO2_QUANTITY = "no2_ppb"  # the one quantity the receiver derives (from the raw electrode values)
_RAW = ("no2_we_mv", "no2_ae_mv", "no2_temp_c")
# NO2 samples are known by their raw electrode key, never by the section name they come under.
NO2_RAW_KEY = _RAW[0]

_CALIBRATIONS = """CREATE TABLE IF NOT EXISTS {name} (
        id TEXT NOT NULL,
        device TEXT NOT NULL,
        kind TEXT NOT NULL,
        serial TEXT NOT NULL,
        version INTEGER NOT NULL,
        status TEXT NOT NULL,
        valid_from_ms BIGINT,
        valid_to_ms BIGINT,
        record TEXT NOT NULL,
        received_utc_ms BIGINT NOT NULL,
        PRIMARY KEY (device, kind, serial, version)
    )"""
_COLUMNS = "id, device, kind, serial, version, status, valid_from_ms, valid_to_ms, record, received_utc_ms"
_KEY = ("device", "kind", "serial", "version")

_TABLES = (
    _CALIBRATIONS.format(name="calibrations"),
    """CREATE TABLE IF NOT EXISTS derived (
        device TEXT NOT NULL,
        epoch TEXT NOT NULL,
        seq BIGINT NOT NULL,
        quantity TEXT NOT NULL,
        value DOUBLE PRECISION,
        calibration TEXT NOT NULL,
        PRIMARY KEY (device, epoch, seq, quantity)
    )""",
    "CREATE INDEX IF NOT EXISTS calibrations_device_kind ON calibrations(device, kind, serial)",
)


def _is_sqlite(conn: Any) -> bool:
    return type(conn).__module__.startswith("sqlite3")


def _q(conn: Any, sql: str) -> str:
    """'?' placeholders for sqlite3, '%s' for the psycopg family."""
    return sql if _is_sqlite(conn) else sql.replace("?", "%s")



def write_derived(conn: Any, rows: Sequence[tuple[Any, ...]], gone: Sequence[tuple[Any, ...]] = ()) -> None:
    """Upsert derived values (device, epoch, seq, quantity, value, calibration id) and drop the
    ones in ``gone`` (device, epoch, seq, quantity): a value a recompute no longer derives. The one
    writer of ``derived`` for NO2 and PM."""
    cur = conn.cursor()
    if rows:
        cur.executemany(_q(conn, "INSERT INTO derived (device, epoch, seq, quantity, value, calibration)"
                                 " VALUES (?,?,?,?,?,?) ON CONFLICT (device, epoch, seq, quantity)"
                                 " DO UPDATE SET value=excluded.value, calibration=excluded.calibration"), rows)
    if gone:
        cur.executemany(_q(conn, "DELETE FROM derived WHERE device=? AND epoch=? AND seq=? AND quantity=?"), gone)

def _exec(conn: Any, sql: str, args: tuple[Any, ...] = ()) -> Any:
    cur = conn.cursor()
    cur.execute(_q(conn, sql), args)
    return cur


def ensure_tables(conn: Any) -> None:
    """The tables, made or brought up to date (idempotent; PostgreSQL: inside the caller's transaction)."""
    key = _primary_key(conn)
    if key and key != _KEY:
        if _is_sqlite(conn) and not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")  # all of the migration or none of it
            try:
                _migrate(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        else:
            _migrate(conn)
    for ddl in _TABLES:
        _exec(conn, ddl)


def _primary_key(conn: Any) -> tuple[str, ...]:
    """The primary key columns of ``calibrations`` in order; () when there is no such table."""
    if _is_sqlite(conn):
        rows = conn.execute("SELECT name, pk FROM pragma_table_info('calibrations') WHERE pk > 0").fetchall()
        return tuple(name for name, _ in sorted(rows, key=lambda r: r[1]))
    if _exec(conn, "SELECT to_regclass('calibrations')").fetchone()[0] is None:
        return ()
    rows = _exec(conn, "SELECT a.attname, array_position(i.indkey::int2[], a.attnum) FROM pg_index i"
                       " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                       " WHERE i.indrelid = 'calibrations'::regclass AND i.indisprimary").fetchall()
    return tuple(name for name, _ in sorted(rows, key=lambda r: r[1]))


def _migrate(conn: Any) -> None:
    """From the old key (the record id alone) to (device, kind, serial, version).

    Under the old key a second van's record with the same id overwrote the first van's
    row but kept its ``device``: such a row (the record names another device) is put
    under the device that wrote it, and what it derived for the row's device is deleted,
    since it was computed with another van's parameters. That van's own record comes
    back with its next announcement (every agent start), and recomputes its values.

    The old code also took records naming no device at all (empty or absent), so the row's
    device is not proof of who wrote one: such a row (and one that cannot be read) is
    dropped with what it derived, and the van's own record comes back the same way.
    """
    _exec(conn, _CALIBRATIONS.format(name="calibrations_keyed"))
    moved = dropped = 0
    for row in _exec(conn, f"SELECT {_COLUMNS} FROM calibrations").fetchall():
        rid, device, *rest = row
        try:
            author = CalibrationRecord.from_json(row[8]).device
        except ValueError:
            author = ""
        if author != device:
            _exec(conn, "DELETE FROM derived WHERE device=? AND calibration=?", (device, rid))
            if not author:
                dropped += 1
                log.warning("calibration record %s stored under %s names no device: dropped, "
                            "%s's values derived from it removed", rid, device, device)
                continue
            moved += 1
            log.warning("calibration record %s stored under %s was written by %s: moved to %s, "
                        "%s's values derived from it removed", rid, device, author, author, device)
        _exec(conn, f"INSERT INTO calibrations_keyed ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT DO NOTHING", (rid, author, *rest))
    _exec(conn, "DROP TABLE calibrations")
    _exec(conn, "ALTER TABLE calibrations_keyed RENAME TO calibrations")
    log.info("calibrations migrated to the key (device, kind, serial, version); %d record(s) moved, "
             "%d without a device dropped", moved, dropped)


def _bound_ms(t: float | None) -> int | None:
    """A record bound in whole UTC ms: the first ms at or after ``t``.

    The one comparison rule (issue 15, tester v6): a sample at integer ``t_ms`` is in a
    record's window iff ``lo <= t_ms < hi`` with both bounds made by this function. That is
    the answer comparing float seconds gives (``valid_from <= t < valid_to``), so a bound
    with a fraction of a ms (the agent confirms at ``time.time()``) picks the same samples
    whether the record or the samples arrive first. Rounded to the µs first: float noise in
    ``t * 1000`` never pushes an exact ms to the next one.
    """
    return None if t is None else math.ceil(round(t * 1000, 3))


def records_in_batch(batch: Any) -> list[tuple[int | None, CalibrationRecord]]:
    """(sample seq, record) for each calibration record a batch carries (malformed ones logged, skipped)."""
    out = []
    for s in batch.samples:
        if s.sensor != CALIBRATION_SENSOR or not isinstance(s.values.get("record"), str):
            continue
        try:
            out.append((s.seq, CalibrationRecord.from_json(s.values["record"])))
        except ValueError as exc:
            log.warning("device %s sent a malformed calibration record: %s", batch.device, exc)
    return sorted(out, key=lambda sr: (sr[1].kind, sr[1].serial, sr[1].version))


# A time span in UTC ms, [lo, hi); None = open on that side.
Span = tuple[int | None, int | None]


def _received_ms(conn: Any, batch: Any, seq: int | None, fallback: int | None) -> int:
    """When the receiver took the sample that carried a record: its stored ``received_utc_ms``.

    Read from ``samples`` so it is right however the batch is derived (inline at
    ingest, or later from the queue, where the batch is read back without it).
    """
    if seq is not None:
        row = _exec(conn, "SELECT received_utc_ms FROM samples WHERE device=? AND epoch=? AND seq=?",
                    (batch.device, batch.epoch, seq)).fetchone()
        if row is not None and row[0] is not None:
            return int(row[0])
    return int(fallback or 0)


# Status order of one version's copies: a record is superseded once, for good. A copy saying
# less (an "active" announcement sent before the newer version existed) is stale.
_STATUS_RANK = {"active": 0, "superseded": 1}


def store_calibrations(conn: Any, batch: Any, received_ms: int | None = None) -> list[CalibrationRecord]:
    """Upsert the batch's records; the ones stored new or changed.

    A record's status follows from the set of versions, not from arrival order (batches
    of one van can arrive, or be derived from the queue, out of order): a version is
    superseded as soon as a newer one of its serial is stored, and a stale copy that
    says less than the stored one (active where it is superseded) is ignored, so it
    neither re-activates the version nor changes its first received time. Another copy
    with as much to say (a window moved by the van) replaces the stored one.
    Older versions stay as they are: they are the history. ``received_utc_ms`` is when
    the receiver took the record (the sample's stored time; ``received_ms`` if absent).
    """
    changed: list[CalibrationRecord] = []
    for seq, rec in records_in_batch(batch):
        if rec.status == "pending":
            continue  # a proposal has no effect anywhere
        device = rec.device or batch.device
        if device != batch.device:
            # A van speaks only for itself (the broker's ACL vouches for the batch's device).
            log.warning("device %s sent a record of device %s; ignored", batch.device, device)
            continue
        if rec.id != record_id(rec.kind, rec.serial, rec.version):
            # The id is the provenance tag derived values carry: it must say what the key says.
            log.warning("device %s sent record %r for %s; ignored", batch.device, rec.id,
                        record_id(rec.kind, rec.serial, rec.version))
            continue
        chain = (device, rec.kind, rec.serial)
        row = _exec(conn, "SELECT record, status FROM calibrations"
                          " WHERE device=? AND kind=? AND serial=? AND version=?", (*chain, rec.version)).fetchone()
        if row is not None and _STATUS_RANK.get(row[1], 0) > _STATUS_RANK.get(rec.status, 0):
            log.info("device %s re-sent %s as %s; stored as %s, kept", device, rec.id, rec.status, row[1])
            continue
        (newest,) = _exec(conn, "SELECT max(version) FROM calibrations WHERE device=? AND kind=? AND serial=?"
                                " AND status!='pending'", chain).fetchone()
        if rec.status == "active" and newest is not None and newest > rec.version:
            rec = dataclasses.replace(rec, status="superseded")  # a newer version is in: this one is history
        text = rec.to_json()
        if row is not None and row[0] == text:
            continue
        _exec(
            conn,
            f"INSERT INTO calibrations ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (device, kind, serial, version) DO UPDATE SET status=excluded.status,"
            " valid_from_ms=excluded.valid_from_ms, valid_to_ms=excluded.valid_to_ms, record=excluded.record,"
            " received_utc_ms=excluded.received_utc_ms",
            (rec.id, device, rec.kind, rec.serial, rec.version, rec.status, _bound_ms(rec.valid_from),
             _bound_ms(rec.valid_to), text, _received_ms(conn, batch, seq, received_ms)),
        )
        changed.append(rec)
        _supersede_older(conn, chain, rec.version)  # even a closed newer version ends the older ones
    return changed


def _supersede_older(conn: Any, chain: tuple[str, str, str], version: int) -> None:
    """Older active versions of a chain become superseded (status and stored text; window kept)."""
    for v, text in _exec(conn, "SELECT version, record FROM calibrations WHERE device=? AND kind=? AND serial=?"
                               " AND version<? AND status='active'", (*chain, version)).fetchall():
        try:
            text = dataclasses.replace(CalibrationRecord.from_json(text), status="superseded").to_json()
        except ValueError:
            pass  # an unreadable stored record keeps its text; derivation skips it anyway
        _exec(conn, "UPDATE calibrations SET status='superseded', record=? WHERE device=? AND kind=? AND serial=?"
                    " AND version=?", (text, *chain, v))


# Stored records derivation skipped as unusable (stored before the admission check, or by
# hand): a count for tests and operators; each one is logged when met.
skipped_records = 0


def _usable(device: str, text: str) -> CalibrationRecord | None:
    """The stored record, or None (logged, counted) when derivation cannot use it.

    The admission schema refuses such records now, but a store may hold one from
    before: it must leave its van's values uncalibrated, never fail the batch.
    """
    global skipped_records
    checked = _checked(text)
    if isinstance(checked, str):
        skipped_records += 1
        log.warning("device %s: stored calibration record %s is unusable (%s); its values stay "
                    "uncalibrated", device, text[:60], checked)
        return None
    return checked


# Records checked, by their text: every batch reads its van's records, and checking them
# (JSON, field types, trial conversions) each time cost more than deriving a small batch
# (issue 13 review). A record's text decides the check, so the result is kept; bounded
# (~16 KB of text at most each, ~1 KB real) and shared by the ingest and deriver threads.
_CHECKED: OrderedDict[str, CalibrationRecord | str] = OrderedDict()
_CHECKED_MAX = 256
_CHECKED_LOCK = threading.Lock()


def _checked(text: str) -> CalibrationRecord | str:
    """``check_record(text)``, or the reason it fails, remembered."""
    with _CHECKED_LOCK:
        if text in _CHECKED:
            _CHECKED.move_to_end(text)
            return _CHECKED[text]
    try:
        out: CalibrationRecord | str = check_record(text)
    except PayloadError as exc:
        out = str(exc)
    with _CHECKED_LOCK:
        _CHECKED[text] = out
        while len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)
    return out


@dataclass(frozen=True)
class Records:
    """A van's usable NO2 records in effect somewhere, newest version first, each with its
    window in whole ms (``_bound_ms``); and ``untagged``: the serial a sample without a ``cal``
    tag is tied to, which is the van's only NO2 serial ever (None when it has had several or
    none: such a sample cannot be tied to a record and serves the van's value, uncalibrated)."""
    items: tuple[tuple[CalibrationRecord, int, int | None], ...] = ()
    untagged: str | None = None


def device_records(conn: Any, device: str, kind: str = NO2_SENSOR) -> Records:
    # One lookup for every record kind (NO2 sheets, PM gain, PM housing): it was named for
    # NO2 only and imported privately by pm_derive.
    """``device``'s NO2 records (or another ``kind``'s: PM, receiver/pm_derive.py) as ``record_at`` takes them."""
    rows = _exec(conn, "SELECT serial, status, record FROM calibrations WHERE device=? AND kind=?",
                 (device, kind)).fetchall()
    serials = {serial for serial, _, _ in rows}
    recs = [rec for _, status, text in rows
            if status != "pending" and (rec := _usable(device, text)) is not None and rec.valid_from is not None]
    recs.sort(key=lambda r: r.version, reverse=True)
    return Records(tuple((r, _bound_ms(r.valid_from), _bound_ms(r.valid_to)) for r in recs),  # type: ignore[misc]
                   next(iter(serials)) if len(serials) == 1 else None)


def _serial_of(values: dict[str, Any], untagged: str | None, kind: str = NO2_SENSOR) -> str | None:
    """The serial whose records a sample can take: its ``cal`` tag's (``no2:<serial>:v<N>``),
    else the van's only serial; None when it cannot be tied to one."""
    cal = values.get("cal")
    if not isinstance(cal, str):
        return untagged
    tag_kind, _, rest = cal.partition(":")
    serial, sep, _ = rest.rpartition(":")
    return serial if tag_kind == kind and sep else None


def _record_for(recs: Records, serial: str | None, t_ms: int) -> CalibrationRecord | None:
    """Of ``serial``'s records in effect at ``t_ms`` (``lo <= t_ms < hi``), the newest version."""
    if serial is None:
        return None
    return next((r for r, lo, hi in recs.items if r.serial == serial and lo <= t_ms and (hi is None or t_ms < hi)),
                None)


def record_at(recs: Records, t_ms: int, values: dict[str, Any], kind: str = NO2_SENSOR) -> CalibrationRecord | None:
    """The record valid for a sample at ``t_ms``: of those in effect then for its serial, the newest
    version (a correction made later, valid from before, wins over the one it corrects)."""
    return _record_for(recs, _serial_of(values, recs.untagged, kind), t_ms)


def inputs_in_range(values: dict[str, Any]) -> bool:
    """Are a sample's raw NO2 inputs numbers within their physical ranges? The electrodes are
    read by an ADS1115 (+-6.144 V full scale), the board runs at -40..85 C: the ranges the
    calibration door tries a sheet on (core/calibration_rules.py). Outside them a sheet the
    door accepted still gives anything (issue 13 re-test: WE = 1e15 mV stored 3.86e15 ppb)."""
    raw = [values.get(k) for k in _RAW]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw):
        return False
    we, ae, temp = raw
    return (abs(we) <= ADC_FULL_SCALE_MV and abs(ae) <= ADC_FULL_SCALE_MV  # type: ignore[operator]
            and TEMP_RANGE_C[0] <= temp <= TEMP_RANGE_C[1])  # type: ignore[operator]


def _derive(values: dict[str, Any], rec: CalibrationRecord) -> float | None:
    # Refused outside the ranges: no derived value (the sample keeps its raw values, and
    # serves the van's own, which the value flags judge); counted by _write_derived.
    if not inputs_in_range(values):
        return None
    raw = [values.get(k) for k in _RAW]
    try:
        v = no2_ppb_from_record(rec.values, *raw)  # type: ignore[arg-type]
    except (ValueError, ArithmeticError, TypeError):  # TypeError: a value of the wrong type
        return None
    return v if math.isfinite(v) else None


# (epoch, seq, sensor) of a sample whose served value may have changed: requality judges its
# stream (the sensor is the section name, so a van's two NO2 sensors are two streams).
Touched = list[tuple[str, int, str]]


def _write_derived(conn: Any, device: str, todo: list[tuple[str, int, int, dict[str, Any], str]],
                   recs: Records, *, prune: bool, touched: Touched | None = None) -> int:
    """Derive ``no2_ppb`` for (epoch, seq, t_ms, values, sensor) by the record valid at each one's time.

    ``prune``: a sample no record covers (any more) loses its derived row, so what it
    serves is the van's own value again (a new sample has none to lose). One statement
    for the writes, one for the deletes. Returns the number of rows written;
    ``touched`` gets (epoch, seq, sensor) of every sample whose served value may have
    changed (its flags are judged again: receiver/requality.py).
    """
    rows, gone, sensors = [], [], {}
    refused = 0
    for epoch, seq, t_ms, values, sensor in todo:
        rec = record_at(recs, t_ms, values)
        v = None if rec is None else _derive(values, rec)
        refused += rec is not None and v is None and not inputs_in_range(values)
        sensors[(epoch, seq)] = sensor
        if v is None:
            gone.append((device, epoch, seq, NO2_QUANTITY))
        else:
            rows.append((device, epoch, seq, NO2_QUANTITY, v, rec.id))  # type: ignore[union-attr]
    cur = conn.cursor()
    if refused:  # a figure for `stats`: derivations refused for inputs out of range (each try)
        cur.execute(_q(conn, "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name)"
                             " DO UPDATE SET value = counters.value + excluded.value"),
                    ("no2_inputs_out_of_range", refused))
    write_derived(conn, rows, gone if prune else [])
    if touched is not None:
        touched += [(r[1], r[2], sensors[(r[1], r[2])]) for r in rows]
        if prune:
            touched += [(g[1], g[2], sensors[(g[1], g[2])]) for g in gone]
    return len(rows)


@dataclass
class RecomputeStats:
    """What recomputes read: for tests and operators (a correction must read only what it changes,
    a chunk at a time)."""
    rows_read: int = 0
    largest_read: int = 0  # the most sample rows held at once


stats = RecomputeStats()
CHUNK = 5000  # samples read, derived and written at a time: memory stays bounded on any history


def recompute_no2(conn: Any, device: str, span: Span, touched: Touched | None = None,
                  recs: Records | None = None) -> int:
    """Recompute ``device``'s ``no2_ppb`` for its NO2 samples timed inside ``span`` ([lo, hi) in ms).

    Each sample gets the record valid at its time (``record_at``), from its raw
    ``no2_we_mv``/``no2_ae_mv``/``no2_temp_c``; raw samples stay as they arrived. The
    samples are found through ``positions(device, t_utc_ms)``, the time index of a
    van's derived samples (``samples`` has none: it would slow every upload), and read
    ``CHUNK`` at a time in time order (keyset: never a whole life in memory).
    Returns the number of rows written.
    """
    recs = device_records(conn, device) if recs is None else recs
    has_raw = (f"json_type(s.vals, '$.{NO2_RAW_KEY}') IS NOT NULL" if _is_sqlite(conn)
               else "jsonb_exists(s.vals, ?)")
    n = 0
    for rows in timed_chunks(conn, device, span, "s.epoch, s.seq, s.t_utc_ms, s.vals, s.sensor",
                             has_raw, () if _is_sqlite(conn) else (NO2_RAW_KEY,)):
        stats.rows_read += len(rows)
        stats.largest_read = max(stats.largest_read, len(rows))
        todo = [(e, q, t, json.loads(v) if isinstance(v, str) else dict(v), sensor)
                for e, q, t, v, sensor, *_ in rows if t is not None]
        n += _write_derived(conn, device, todo, recs, prune=True, touched=touched)
    return n


def timed_chunks(conn: Any, device: str, span: Span, columns: str, where: str = "1=1",
                 args: tuple[Any, ...] = ()) -> Iterator[list[tuple[Any, ...]]]:
    """``device``'s samples timed inside ``span`` ([lo, hi) ms, None open), ``CHUNK`` rows at a
    time in time order: ``columns`` of ``samples s`` (and ``positions p``), then p.t_utc_ms,
    p.epoch, p.seq. Found through ``positions(device, t_utc_ms)``, the time index of a van's
    derived samples (``samples`` has none: it would slow every upload); keyset paging, so never
    a whole life in memory. ``where``/``args``: one more condition."""
    lo, hi = span
    conds, cargs = ["p.device=?", where], [device, *args]
    conds.append("p.t_utc_ms>=?" if lo is not None else "p.t_utc_ms IS NOT NULL")
    cargs += [lo] if lo is not None else []
    if hi is not None:
        conds, cargs = [*conds, "p.t_utc_ms<?"], [*cargs, hi]
    after = None
    while True:
        page, page_args = list(conds), list(cargs)
        if after is not None:  # past the last sample read: (t, epoch, seq) orders a van's samples
            page += ["p.t_utc_ms>=?", "(p.t_utc_ms, p.epoch, p.seq) > (?, ?, ?)"]
            page_args += [after[0], *after]
        rows = _exec(conn, f"SELECT {columns}, p.t_utc_ms, p.epoch, p.seq FROM positions p JOIN samples s"
                           " ON s.device=p.device AND s.epoch=p.epoch AND s.seq=p.seq"
                           f" WHERE {' AND '.join(page)} ORDER BY p.t_utc_ms, p.epoch, p.seq LIMIT ?",
                     (*page_args, CHUNK)).fetchall()
        if rows:
            yield rows
        if len(rows) < CHUNK:
            return
        after = rows[-1][-3:]


def derive_batch_no2(conn: Any, batch: Any, touched: Touched | None = None,
                     recs: Records | None = None) -> int:
    """Derive ``no2_ppb`` for a batch's NO2 samples by the record valid at their time.

    For samples that arrive after their record (a van's backlog); ``recompute_no2``
    covers those that were there first.
    """
    todo = [(batch.epoch, s.seq, s.t_utc_ms, s.values, s.sensor) for s in batch.samples
            if NO2_RAW_KEY in s.values and s.t_utc_ms is not None]
    if not todo:
        return 0
    recs = device_records(conn, batch.device) if recs is None else recs
    return _write_derived(conn, batch.device, todo, recs, prune=False, touched=touched) if recs.items else 0


def ingest_calibrations(conn: Any, batch: Any, received_ms: int | None = None) -> Touched:
    """All of the above for one stored batch: the single call ``SQLiteStore.ingest`` needs.

    Records first: the spans where the record in effect changed (for any serial, or for
    untagged samples) are recomputed, nothing else; then the batch's own NO2 samples are
    derived. Returns (epoch, seq, sensor) of the samples whose served value it may have changed:
    the store judges their flags again once the batch's own are written (receiver/requality.py).
    """
    touched: Touched = []
    recs = None
    if records_in_batch(batch):
        before = device_records(conn, batch.device)
        if any(rec.kind == NO2_SENSOR for rec in store_calibrations(conn, batch, received_ms)):
            recs = device_records(conn, batch.device)
            for span in changed_spans(before, recs):
                recompute_no2(conn, batch.device, span, touched, recs)
    derive_batch_no2(conn, batch, touched, recs)
    return touched


def _ident(rec: CalibrationRecord | None) -> tuple[str, str] | None:
    """What a derived value depends on: the record's id (its tag) and its parameters."""
    return None if rec is None else (rec.id, json.dumps(rec.values, sort_keys=True))


def changed_spans(before: Records, after: Records) -> list[Span]:
    """The spans ([lo, hi) ms, None open) where the record in effect differs between two sets.

    Compared per elementary interval between record bounds, for every serial and for
    untagged samples: a routine confirmation (the old record closed where the new one
    starts, after all data) changes only the new record's span, not the old one's life,
    and a window that grows by a day changes that day.
    """
    bounds = sorted({b for recs in (before, after) for _, lo, hi in recs.items for b in (lo, hi) if b is not None})
    if not bounds:
        return []
    serials = {r.serial for recs in (before, after) for r, _, _ in recs.items}
    edges: list[int | None] = [None, *bounds, None]
    out: list[Span] = []
    for lo, hi in zip(edges, edges[1:]):
        t = bounds[0] - 1 if lo is None else lo  # every time in [lo, hi) has the same records in effect
        differs = _ident(_record_for(before, before.untagged, t)) != _ident(_record_for(after, after.untagged, t)) \
            or any(_ident(_record_for(before, s, t)) != _ident(_record_for(after, s, t)) for s in serials)
        if not differs:
            continue
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


# -- reading: one best value ---------------------------------------------------------------
#
# Every reader (the ``observations`` views, maps, exports, the API through the maps) takes a
# value from here: the receiver's derived value when it has one, else the van's own. The
# derived row is joined on its primary key (device, epoch, seq, quantity), so serving the best
# value needs no index beyond it (none on the ingest path) and no scan at any fleet size.

# Keys a van's ``cal`` tag speaks for (edge/calibration.py ``apply_record``): NO2 and the sound
# levels recomputed on the van, and a PM record's ``<quantity>_cal``. Other keys of the same
# sample (raw electrode mV, humidity) are not calibrated values.
_VAN_CALIBRATED = (NO2_QUANTITY, *NOISE_LEVEL_KEYS)


def derived_join(s: str = "s", key: str = "j.key", d: str = "d") -> str:
    """A LEFT JOIN of ``derived`` as ``d`` onto sample alias ``s`` for the quantity ``key`` (SQL)."""
    return (f"LEFT JOIN derived {d} ON {d}.device = {s}.device AND {d}.epoch = {s}.epoch"
            f" AND {d}.seq = {s}.seq AND {d}.quantity = {key}")


def calibration_sql(sqlite: bool, s: str = "s", key: str = "j.key", d: str = "d") -> str:
    """The id of the record a value was calibrated with: the receiver's (``derived``), else the
    van's ``cal`` tag for a key the tag speaks for, else NULL (not calibrated)."""
    keys = ", ".join(f"'{k}'" for k in _VAN_CALIBRATED)
    if sqlite:
        tag, suffix = f"json_extract({s}.vals, '$.cal')", f"substr({key}, -4)"
    else:
        tag, suffix = f"({s}.vals ->> 'cal')", f"right({key}, 4)"
    return f"coalesce({d}.calibration, CASE WHEN {key} IN ({keys}) OR {suffix} = '_cal' THEN {tag} END)"


#: Quantities with a best value in ``derived``: NO2 recomputed by its record, and PM with the
#: van's gain and hygroscopic growth undone (receiver/pm_derive.py).
DERIVED_QUANTITIES = (NO2_QUANTITY, "pm1", "pm25", "pm10")


def _alias(key: str, d: str) -> str:
    """The join alias of ``key``'s derived row (NO2 keeps the plain ``d`` it always had)."""
    return d if key == NO2_QUANTITY else f"{d}_{key}"


def value_source(key: str, raw_sql: str, d: str = "bv") -> str:
    """SQL for the best value of quantity ``key`` (a literal name), given the van's as ``raw_sql``.

    For a quantity the receiver derives (``DERIVED_QUANTITIES``): ``coalesce(<derived value>,
    raw)``, reading the ``derived`` row that ``best_join`` (same ``d``, ``key`` among its keys)
    joins in; for any other, ``raw_sql``.
    """
    return f"coalesce({_alias(key, d)}.value, {raw_sql})" if key in DERIVED_QUANTITIES else raw_sql


def best_join(s: str = "s", d: str = "bv", keys: tuple[str, ...] = (NO2_QUANTITY,)) -> str:
    """The LEFT JOINs ``value_source`` reads: the derived row of sample alias ``s`` for each of
    ``keys`` the receiver derives (default NO2 alone).

    A join, not a correlated subquery: PostgreSQL then hashes a van's derived rows once
    instead of probing the index per sample (a map build took 1.5x as long with the probe).
    """
    return " ".join(derived_join(s, f"'{k}'", _alias(k, d)) for k in keys if k in DERIVED_QUANTITIES)
