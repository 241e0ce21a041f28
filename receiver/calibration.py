"""The receiver's side of calibration records: keep them, and recompute what they derive.

Vans upload each calibration record as a sample of sensor ``calibration`` whose value
``record`` is the record's JSON (edge/calibration.py ``CalibrationAnnouncer``): when a
record becomes active, the one it supersedes with its new ``valid_to``, and all active
records at every agent start. Here they land in ``calibrations`` (upsert by id: the
status and validity of a record change as it is superseded).

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
from typing import Any

from edge.calibration import CALIBRATION_SENSOR, CalibrationRecord, no2_ppb_from_record

log = logging.getLogger(__name__)

NO2_SENSOR = "no2"
_RAW = ("no2_we_mv", "no2_ae_mv", "no2_temp_c")

_TABLES = (
    """CREATE TABLE IF NOT EXISTS calibrations (
        id TEXT PRIMARY KEY,
        device TEXT NOT NULL,
        kind TEXT NOT NULL,
        serial TEXT NOT NULL,
        version INTEGER NOT NULL,
        status TEXT NOT NULL,
        valid_from_ms BIGINT,
        valid_to_ms BIGINT,
        record TEXT NOT NULL,
        received_utc_ms BIGINT NOT NULL
    )""",
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


def _q(conn: Any, sql: str) -> str:
    """'?' placeholders for sqlite3, '%s' for the psycopg family."""
    return sql if type(conn).__module__.startswith("sqlite3") else sql.replace("?", "%s")


def _exec(conn: Any, sql: str, args: tuple[Any, ...] = ()) -> Any:
    cur = conn.cursor()
    cur.execute(_q(conn, sql), args)
    return cur


def ensure_tables(conn: Any) -> None:
    for ddl in _TABLES:
        _exec(conn, ddl)


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
        text = rec.to_json()
        row = _exec(conn, "SELECT record FROM calibrations WHERE id=?", (rec.id,)).fetchone()
        if row is not None and row[0] == text:
            continue
        _exec(
            conn,
            "INSERT INTO calibrations (id, device, kind, serial, version, status, valid_from_ms, valid_to_ms,"
            " record, received_utc_ms) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (id) DO UPDATE SET status=excluded.status, valid_from_ms=excluded.valid_from_ms,"
            " valid_to_ms=excluded.valid_to_ms, record=excluded.record, received_utc_ms=excluded.received_utc_ms",
            (rec.id, device, rec.kind, rec.serial, rec.version, rec.status, _ms(rec.valid_from), _ms(rec.valid_to),
             text, received_ms),
        )
        changed.append(rec.id)
    return changed


def _load(conn: Any, record_id: str) -> tuple[str, CalibrationRecord] | None:
    row = _exec(conn, "SELECT device, record FROM calibrations WHERE id=?", (record_id,)).fetchone()
    return None if row is None else (row[0], CalibrationRecord.from_json(row[1]))


def _derive(values: dict[str, Any], rec: CalibrationRecord) -> float | None:
    raw = [values.get(k) for k in _RAW]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw):
        return None
    try:
        return no2_ppb_from_record(rec.values, *raw)  # type: ignore[arg-type]
    except (ValueError, ArithmeticError):
        return None


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


def recompute_no2(conn: Any, record_id: str) -> int:
    """Recompute ``no2_ppb`` by this record for the NO2 samples inside its validity.

    Writes ``derived`` rows (quantity ``no2_ppb``, calibration = the record id) from the
    raw ``no2_we_mv``/``no2_ae_mv``/``no2_temp_c``; raw samples stay as they arrived.
    Returns the number of rows written.
    """
    found = _load(conn, record_id)
    if found is None:
        return 0
    device, rec = found
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
    recs = [CalibrationRecord.from_json(r[0]) for r in _exec(
        conn, "SELECT record FROM calibrations WHERE device=? AND kind=? AND status!=?",
        (batch.device, "no2", "pending")).fetchall()]
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
        recompute_no2(conn, rid)
