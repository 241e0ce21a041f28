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

Raw samples are never touched. What a record derives goes to ``derived`` with the id of
the record that produced it: ``recompute_no2`` recomputes ``no2_ppb`` from the raw
electrode mV and temperature of every NO2 sample inside the record's validity, so a
corrected (e.g. retroactive co-location) record repairs data already stored, and
``derive_batch_no2`` does the same for samples that arrive after their record.

Functions take a DB-API connection and run inside the caller's transaction (no commit).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from typing import Any

from edge.calibration import CALIBRATION_SENSOR, CalibrationRecord, no2_ppb_from_record, record_id
from edge.errors import PayloadError
from receiver.calibration_check import check_record

log = logging.getLogger(__name__)

NO2_SENSOR = "no2"
_RAW = ("no2_we_mv", "no2_ae_mv", "no2_temp_c")

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


def _ms(t: float | None) -> int | None:
    return None if t is None else int(round(t * 1000))


def records_in_batch(batch: Any) -> list[CalibrationRecord]:
    """The calibration records a batch carries (malformed ones are logged and skipped)."""
    out = []
    for s in batch.samples:
        if s.sensor != CALIBRATION_SENSOR or not isinstance(s.values.get("record"), str):
            continue
        try:
            out.append(CalibrationRecord.from_json(s.values["record"]))
        except ValueError as exc:
            log.warning("device %s sent a malformed calibration record: %s", batch.device, exc)
    return sorted(out, key=lambda r: (r.kind, r.serial, r.version))


def store_calibrations(conn: Any, batch: Any, received_ms: int) -> list[str]:
    """Upsert the batch's records; return the ids that are new or changed (to recompute)."""
    changed: list[str] = []
    for rec in records_in_batch(batch):
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
        text = rec.to_json()
        key = (device, rec.kind, rec.serial, rec.version)
        row = _exec(conn, "SELECT record FROM calibrations WHERE device=? AND kind=? AND serial=? AND version=?",
                    key).fetchone()
        if row is not None and row[0] == text:
            continue
        _exec(
            conn,
            f"INSERT INTO calibrations ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (device, kind, serial, version) DO UPDATE SET status=excluded.status,"
            " valid_from_ms=excluded.valid_from_ms, valid_to_ms=excluded.valid_to_ms, record=excluded.record,"
            " received_utc_ms=excluded.received_utc_ms",
            (rec.id, device, rec.kind, rec.serial, rec.version, rec.status, _ms(rec.valid_from), _ms(rec.valid_to),
             text, received_ms),
        )
        changed.append(rec.id)
    return changed


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


def _load(conn: Any, device: str, rid: str) -> CalibrationRecord | None:
    row = _exec(conn, "SELECT record FROM calibrations WHERE device=? AND id=?", (device, rid)).fetchone()
    return None if row is None else _usable(device, row[0])


def _derive(values: dict[str, Any], rec: CalibrationRecord) -> float | None:
    raw = [values.get(k) for k in _RAW]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw):
        return None
    try:
        v = no2_ppb_from_record(rec.values, *raw)  # type: ignore[arg-type]
    except (ValueError, ArithmeticError, TypeError):  # TypeError: a value of the wrong type
        return None
    return v if math.isfinite(v) else None


def _carried_by_serial(values: dict[str, Any], serial: str) -> bool:
    """A sample with a ``cal`` tag belongs to that serial; an untagged one (older agent) may."""
    cal = values.get("cal")
    return not isinstance(cal, str) or cal.startswith(f"no2:{serial}:")


def _upsert_derived(conn: Any, rows: list[tuple[Any, ...]]) -> None:
    sql = _q(conn, "INSERT INTO derived (device, epoch, seq, quantity, value, calibration) VALUES (?,?,?,?,?,?)"
                   " ON CONFLICT (device, epoch, seq, quantity) DO UPDATE SET value=excluded.value,"
                   " calibration=excluded.calibration")
    if rows:
        conn.cursor().executemany(sql, rows)


def recompute_no2(conn: Any, device: str, rid: str) -> int:
    """Recompute ``no2_ppb`` by ``device``'s record ``rid`` for its NO2 samples inside its validity.

    Writes ``derived`` rows (quantity ``no2_ppb``, calibration = the record id) from the
    raw ``no2_we_mv``/``no2_ae_mv``/``no2_temp_c``; raw samples stay as they arrived.
    Returns the number of rows written.
    """
    rec = _load(conn, device, rid)
    if rec is None:
        return 0
    if rec.kind != "no2" or rec.status == "pending" or rec.valid_from is None:
        return 0
    lo, hi = _ms(rec.valid_from), _ms(rec.valid_to)
    sql = "SELECT epoch, seq, vals FROM samples WHERE device=? AND sensor=? AND t_utc_ms>=?"
    args: tuple[Any, ...] = (device, NO2_SENSOR, lo)
    if hi is not None:
        sql, args = sql + " AND t_utc_ms<?", (*args, hi)
    rows = []
    for epoch, seq, vals in _exec(conn, sql, args).fetchall():
        values = json.loads(vals) if isinstance(vals, str) else dict(vals)
        if not _carried_by_serial(values, rec.serial):
            continue
        v = _derive(values, rec)
        if v is not None:
            rows.append((device, epoch, seq, "no2_ppb", v, rec.id))
    _upsert_derived(conn, rows)
    return len(rows)


def derive_batch_no2(conn: Any, batch: Any) -> int:
    """Derive ``no2_ppb`` for a batch's NO2 samples by the record in effect at their time.

    For samples that arrive after their record (a van's backlog); ``recompute_no2``
    covers those that were there first.
    """
    if not any(s.sensor == NO2_SENSOR for s in batch.samples):
        return 0  # nothing to derive: the van's records need not be read
    recs = [rec for r in _exec(
        conn, "SELECT record FROM calibrations WHERE device=? AND kind=? AND status!=?",
        (batch.device, "no2", "pending")).fetchall() if (rec := _usable(batch.device, r[0])) is not None]
    if not recs:
        return 0
    recs.sort(key=lambda r: r.version, reverse=True)
    rows = []
    for s in batch.samples:
        if s.sensor != NO2_SENSOR or s.t_utc_ms is None:
            continue
        t = s.t_utc_ms / 1000.0
        rec = next((r for r in recs if r.in_effect_at(t) and _carried_by_serial(s.values, r.serial)), None)
        if rec is None:
            continue
        v = _derive(s.values, rec)
        if v is not None:
            rows.append((batch.device, batch.epoch, s.seq, "no2_ppb", v, rec.id))
    _upsert_derived(conn, rows)
    return len(rows)


def ingest_calibrations(conn: Any, batch: Any, received_ms: int) -> None:
    """All of the above for one stored batch: the single call ``SQLiteStore.ingest`` needs."""
    derive_batch_no2(conn, batch)
    for rid in store_calibrations(conn, batch, received_ms):
        recompute_no2(conn, batch.device, rid)
