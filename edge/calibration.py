"""The van's side of calibration: the record store, sheet import, calibrated drivers.

What a record is (kind, method, status, the complete parameter set, its id as the
provenance tag of derived values) and the arithmetic it defines are in core/calibration.py,
shared with the receiver, which recomputes the same values from the same record.

The store lives at ``<data_dir>/calibration.sqlite``: a file of its own, so neither the
agent's buffer nor its recovery logic ever touches the calibration history.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sqlite3
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from core.calibration import (
    KINDS,
    METHODS,
    PENDING,
    ACTIVE,
    SUPERSEDED,
    SHEET_KEYS,
    CALIBRATION_SENSOR,
    CalibrationError,
    CalibrationUnavailable,
    DamagedRecord,
    record_id,
    CalibrationRecord,
    provenance,
    no2_sheet,
    no2_values_from_sheet,
    no2_ppb_from_record,
    pm_corrected,
    NOISE_LEVEL_KEYS,
    PM_HOUSING,
    housing_warming_problem,
)
from core.calibration_rules import check_record
from core.errors import ConfigError, PayloadError
from core.no2_sheet import ALGORITHMS, No2Calibration
from drivers.base import Reading

log = logging.getLogger(__name__)

FILE_NAME = "calibration.sqlite"


# -- the store ----------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calibrations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    serial TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    valid_from REAL,
    valid_to REAL,
    record TEXT NOT NULL,
    UNIQUE (kind, serial, version)
);
"""


class RecordSource(Protocol):
    """What the agent's calibrated drivers and the announcer read: a CalibrationStore, or the
    agent's GuardedStore (edge/calibration_guard.py) that survives a damaged file."""

    def generation(self) -> int: ...
    def active(self, kind: str, serial: str, at: float | None = None) -> CalibrationRecord | None: ...
    def all_active(self) -> list[CalibrationRecord]: ...
    def history(self, kind: str | None = None, serial: str | None = None) -> list[CalibrationRecord]: ...


class CalibrationStore:
    """Calibration records on SQLite. Every change is one transaction (all or nothing)."""

    def __init__(self, path: str | Path, *, clock: Any = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock  # anything with utc(); None = time.time
        self.damaged: set[str] = set()  # ids of record rows that could not be read (warned once each)
        if not self.path.exists():
            # A first start, or the file was lost (records from before are gone): never silent.
            log.warning("calibration store %s did not exist: created empty (a first start, or its records "
                        "were lost)", self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        try:  # a file that is no database fails here ("file is not a database")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # rare writes, each one precious
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def for_data_dir(cls, data_dir: str | Path, **kw: Any) -> CalibrationStore:
        return cls(Path(data_dir) / FILE_NAME, **kw)

    def _now(self) -> float:
        return float(self._clock.utc()) if self._clock is not None else time.time()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CalibrationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads ----------------------------------------------------------------------

    def _parse(self, rid: str, text: str) -> CalibrationRecord:
        try:
            return CalibrationRecord.from_json(text)
        except ValueError as exc:  # json.JSONDecodeError too
            if rid not in self.damaged:
                self.damaged.add(rid)
                log.warning("calibration record %s in %s is damaged (%s): its sensor goes uncalibrated, "
                            "flagged cal_unavailable", rid, self.path, exc)
            raise DamagedRecord(f"calibration record {rid} is damaged: {exc}") from exc

    def _records(self, rows: list[Any]) -> list[CalibrationRecord]:
        """Records of (id, record) rows; a damaged row is left out (warned and counted by _parse)."""
        out = []
        for rid, text in rows:
            try:
                out.append(self._parse(rid, text))
            except DamagedRecord:
                continue
        return out

    def get(self, rid: str) -> CalibrationRecord | None:
        row = self._db.execute("SELECT id, record FROM calibrations WHERE id=?", (rid,)).fetchone()
        return self._parse(*row) if row else None

    def history(self, kind: str | None = None, serial: str | None = None) -> list[CalibrationRecord]:
        """All records, oldest first (by serial, then version)."""
        q, args = "SELECT id, record FROM calibrations WHERE 1=1", []
        if kind:
            q, args = q + " AND kind=?", [*args, kind]
        if serial:
            q, args = q + " AND serial=?", [*args, serial]
        rows = self._db.execute(q + " ORDER BY kind, serial, version", args).fetchall()
        return self._records(rows)

    def active(self, kind: str, serial: str, at: float | None = None) -> CalibrationRecord | None:
        """The record in effect for (kind, serial) now, or at UTC ``at``.

        Raises DamagedRecord if that record's row cannot be read (never a silent fallback)."""
        if at is None:
            row = self._db.execute(
                "SELECT id, record FROM calibrations WHERE kind=? AND serial=? AND status=?",
                (kind, serial, ACTIVE),
            ).fetchone()
            return self._parse(*row) if row else None
        rows = self._db.execute(
            "SELECT id, record FROM calibrations WHERE kind=? AND serial=? AND status!=? AND valid_from<=?"
            " AND (valid_to IS NULL OR valid_to>?) ORDER BY version DESC",
            (kind, serial, PENDING, at, at),
        ).fetchall()
        return self._parse(*rows[0]) if rows else None

    def all_active(self) -> list[CalibrationRecord]:
        rows = self._db.execute(
            "SELECT id, record FROM calibrations WHERE status=? ORDER BY kind, serial", (ACTIVE,)
        ).fetchall()
        return self._records(rows)

    def generation(self) -> int:
        """Grows by one with every confirmation: cheap polling for 'did anything change?'."""
        return int(self._db.execute("SELECT count(*) FROM calibrations WHERE status!=?", (PENDING,)).fetchone()[0])

    # -- writes ---------------------------------------------------------------------

    def add(
        self,
        kind: str,
        serial: str,
        method: str,
        values: Mapping[str, Any],
        *,
        technician: str,
        valid_from: float | None = None,
        device: str = "",
        note: str = "",
    ) -> CalibrationRecord:
        """Store a proposal (status pending: it has no effect until ``confirm``)."""
        if kind not in KINDS:
            raise CalibrationError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if method not in METHODS:
            raise CalibrationError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if not serial:
            raise CalibrationError("a calibration needs the sensor's serial number")
        if not technician:
            raise CalibrationError("a calibration needs the technician's name")
        _check_values(kind, values)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            (top,) = db.execute(
                "SELECT coalesce(max(version), 0) FROM calibrations WHERE kind=? AND serial=?", (kind, serial)
            ).fetchone()
            version = int(top) + 1
            rec = CalibrationRecord(
                id=record_id(kind, serial, version), kind=kind, serial=serial, version=version,
                technician=technician, method=method, values=json.loads(json.dumps(dict(values))),
                valid_from=valid_from, created=self._now(), status=PENDING, device=device, note=note,
            )
            _admissible(rec)
            self._put(rec)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return rec

    def confirm(self, rid: str, at: float | None = None) -> CalibrationRecord:
        """Make a pending record active; the serial's previous active one is superseded.

        The record applies from its own ``valid_from`` if one was given (a retroactive
        co-location), else from the moment of confirmation ``at`` (default now).
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rec = self.get(rid)
            if rec is None:
                raise CalibrationError(f"no calibration record {rid!r}")
            if rec.status != PENDING:
                raise CalibrationError(f"{rid} is already {rec.status}; only a pending record can be confirmed")
            start = rec.valid_from if rec.valid_from is not None else (self._now() if at is None else at)
            old = self.active(rec.kind, rec.serial)
            if old is not None:
                if old.version > rec.version:
                    raise CalibrationError(f"{old.id} was confirmed after {rid} was proposed; propose again")
                self._put(replace(old, status=SUPERSEDED, valid_to=max(start, old.valid_from or start)))
            new = replace(rec, status=ACTIVE, valid_from=start, supersedes=old.id if old else None)
            self._put(new)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return new

    def discard(self, rid: str) -> None:
        """Drop a pending proposal (confirmed records are history and stay)."""
        rec = self.get(rid)
        if rec is None or rec.status != PENDING:
            raise CalibrationError(f"{rid} is not a pending record")
        with self._db:
            self._db.execute("DELETE FROM calibrations WHERE id=? AND status=?", (rid, PENDING))

    def _put(self, rec: CalibrationRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO calibrations VALUES (?,?,?,?,?,?,?,?)",
            (rec.id, rec.kind, rec.serial, rec.version, rec.status, rec.valid_from, rec.valid_to, rec.to_json()),
        )


def _admissible(rec: "CalibrationRecord") -> None:
    """Refuse a record the receiver would refuse (the same rules: core/calibration_rules.py).

    Else it is stored here, announced at every start, and takes a whole batch down with it.
    """
    try:
        check_record(rec.to_json())
    except PayloadError as exc:
        raise CalibrationError(f"the receiver would refuse this record: {exc}") from exc


def _announceable(rec: "CalibrationRecord") -> bool:
    """False (logged) for a record stored before the van ran the receiver's check: announced,
    it would be set aside at every start; the technician must propose it again."""
    try:
        _admissible(rec)
    except CalibrationError as exc:
        logging.getLogger(__name__).error("calibration %s not announced: %s", rec.id, exc)
        return False
    return True


def _check_values(kind: str, values: Mapping[str, Any]) -> None:
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise CalibrationError(f"value {k} is not a finite number")
    if kind == "no2":
        missing = [k for k in SHEET_KEYS if k not in values]
        if missing:
            raise CalibrationError(f"an NO2 record needs the full sheet; missing {', '.join(missing)}")
        no2_sheet(values)  # raises on a zero sensitivity and the like
        if values.get("algorithm", 1) not in ALGORITHMS:
            raise CalibrationError(f"AAN 803 algorithm must be 1..4, not {values.get('algorithm')!r}")
    if kind == PM_HOUSING and (problem := housing_warming_problem(values)):
        raise CalibrationError(problem)
    if kind == "noise" and not -20.0 <= float(values.get("offset_db", 0.0)) <= 20.0:
        raise CalibrationError("a microphone offset outside -20..+20 dB is a fault, not a calibration")


# -- Alphasense sheet import --------------------------------------------------------------

# Names seen on Alphasense sheets and in people's spreadsheets -> our keys.
_SHEET_ALIASES = {
    "serial": "serial", "serial_number": "serial", "sensor_serial": "serial", "sn": "serial",
    "wee": "we_e_mv", "we_e": "we_e_mv", "we_e_mv": "we_e_mv", "we_electronic_zero": "we_e_mv",
    "aee": "ae_e_mv", "ae_e": "ae_e_mv", "ae_e_mv": "ae_e_mv", "ae_electronic_zero": "ae_e_mv",
    "weo": "we_o_mv", "we_o": "we_o_mv", "we_o_mv": "we_o_mv", "we_sensor_zero": "we_o_mv",
    "aeo": "ae_o_mv", "ae_o": "ae_o_mv", "ae_o_mv": "ae_o_mv", "ae_sensor_zero": "ae_o_mv",
    "wet": "we_t_mv", "we_t": "we_t_mv", "we_t_mv": "we_t_mv", "we_total_zero": "we_t_mv", "we_zero": "we_t_mv",
    "aet": "ae_t_mv", "ae_t": "ae_t_mv", "ae_t_mv": "ae_t_mv", "ae_total_zero": "ae_t_mv", "ae_zero": "ae_t_mv",
    "sensitivity": "sensitivity_na_per_ppb", "we_sensitivity": "sensitivity_na_per_ppb",
    "sensitivity_na_per_ppb": "sensitivity_na_per_ppb", "we_sens": "sensitivity_na_per_ppb",
    "sensitivity_na_ppb": "sensitivity_na_per_ppb",
    "gain": "gain_mv_per_na", "board_gain": "gain_mv_per_na", "gain_mv_per_na": "gain_mv_per_na",
    "pcb_gain": "gain_mv_per_na", "gain_mv_na": "gain_mv_per_na",
}


def _norm_key(k: str) -> str:
    k = k.strip().lower()
    for ch in " -/()[]":
        k = k.replace(ch, "_")
    while "__" in k:
        k = k.replace("__", "_")
    return _SHEET_ALIASES.get(k.strip("_"), k.strip("_"))


def _num(v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip().replace(",", ".") if v.count(",") == 1 and "." not in v else v.strip()
        try:
            return float(s)
        except ValueError:
            return v.strip()
    return v


def _sheet_tables(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".json":
        doc = json.loads(text)
        rows = doc if isinstance(doc, list) else [doc]
    elif suffix == ".toml":
        doc = tomllib.loads(text)
        # Our own format: [no2.calibration.SERIAL] tables; or a flat table.
        tbl = doc.get("no2", {}).get("calibration") if isinstance(doc.get("no2"), dict) else None
        rows = [{"serial": s, **t} for s, t in tbl.items()] if isinstance(tbl, dict) else [doc]
    elif suffix == ".csv":
        lines = list(csv.reader(io.StringIO(text)))
        lines = [r for r in lines if any(c.strip() for c in r)]
        if not lines:
            raise CalibrationError(f"{path} is empty")
        known = set(_SHEET_ALIASES.values())
        if all(len(r) >= 2 and _norm_key(r[0]) in known for r in lines):  # key,value lines
            rows = [{r[0]: r[1] for r in lines}]
        else:  # a header row and one row per sensor
            head = lines[0]
            rows = [dict(zip(head, r)) for r in lines[1:]]
    else:
        raise CalibrationError(f"{path}: a sheet is .csv, .json or .toml")
    out = []
    for r in rows:
        if not isinstance(r, dict):
            raise CalibrationError(f"{path}: expected a table of sheet values")
        t = {_norm_key(str(k)): v for k, v in r.items()}
        # A serial is a name even when it looks like a number (202123456, not 202123456.0).
        out.append({k: (str(v).strip() if k == "serial" else _num(v)) for k, v in t.items()})
    return out


def import_sheet(path: str | Path, serial: str | None = None) -> tuple[str, No2Calibration]:
    """Read an Alphasense calibration sheet (CSV, JSON or TOML) -> (serial, sheet).

    Accepts WEe/AEe with WEo/AEo (sensor zeros) or WEt/AEt (total zeros), the WE
    sensitivity in nA/ppb and the board gain in mV/nA. A file with several sensors
    needs ``serial`` to choose one. Raises CalibrationError with the reason.
    """
    p = Path(path)
    try:
        tables = _sheet_tables(p)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise CalibrationError(f"cannot read {p}: {exc}") from exc
    if serial is not None:
        match = [t for t in tables if str(t.get("serial", serial)) == str(serial)]
        if not match:
            found = ", ".join(str(t.get("serial", "?")) for t in tables)
            raise CalibrationError(f"{p} has no sheet for serial {serial} (it has: {found})")
        tables = match
    if len(tables) != 1:
        raise CalibrationError(f"{p} holds {len(tables)} sheets: name the serial")
    t = tables[0]
    sn = str(t.get("serial") or serial or "")
    if not sn:
        raise CalibrationError(f"{p} does not name the sensor's serial number")
    return sn, no2_sheet({k: v for k, v in t.items() if k != "serial"}, sn)


# -- on the van: applying records to readings, and announcing them -------------------------

@dataclass
class SensorCalibration:
    """Which records apply to one configured sensor."""

    kind: str
    serial: str
    base_offset_db: float = 0.0  # noise: the offset the meter already applies (config)


class CalibratedDriver:
    """Wraps a driver: readings get the active record's derived values and its id as ``cal``.

    Raw inputs stay in the reading untouched (NO2 electrode mV, PM as measured); what a
    record derives is added (``pm25_cal``) or, for NO2 and noise, recomputed from the
    raw inputs (``no2_ppb``, levels). The active record is looked up again whenever the
    store's generation changes (checked every ``poll_s`` of the driver's reads), so a
    confirmation by the technician's tool takes effect in the running agent.
    """

    def __init__(self, driver: Any, store: RecordSource, sc: SensorCalibration, *, poll_every: int = 10) -> None:
        self.driver = driver
        self.name = driver.name
        self.store = store
        self.sc = sc
        self.poll_every = poll_every
        self._reads = 0
        self._gen: int | None = None
        self.record: CalibrationRecord | None = None
        # Why the record cannot be read (damaged file or row), else None: the readings then go
        # out uncalibrated and flagged, counted in ``unavailable_readings``.
        self.unavailable: str | None = None
        self.unavailable_readings = 0

    def __getattr__(self, item: str) -> Any:  # everything else is the driver's
        return getattr(self.driver, item)

    def refresh(self) -> None:
        gen = self.store.generation()
        if gen != self._gen:
            self._gen = gen
            try:
                self.record, self.unavailable = self.store.active(self.sc.kind, self.sc.serial), None
            except CalibrationUnavailable as exc:  # warned (once) by the store
                self.record, self.unavailable = None, str(exc)

    def read(self) -> Reading | None:
        if self._reads % self.poll_every == 0:
            self.refresh()
        self._reads += 1
        r = self.driver.read()
        if r is None:
            return r
        if self.unavailable is not None:
            self.unavailable_readings += 1
            return replace(r, flags=(*r.flags, "cal_unavailable"))
        if self.record is None:
            return r
        return apply_record(r, self.record, self.sc)

    def close(self) -> None:
        self.driver.close()


def apply_record(r: Reading, rec: CalibrationRecord, sc: SensorCalibration) -> Reading:
    """A reading with the record's derived values and ``cal`` = the record id."""
    values = dict(r.values)
    flags = r.flags
    if rec.kind == "no2":
        we, ae, t = values.get("no2_we_mv"), values.get("no2_ae_mv"), values.get("no2_temp_c")
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (we, ae, t)):
            values["no2_ppb"] = no2_ppb_from_record(rec.values, we, ae, t)  # type: ignore[arg-type]
    elif rec.kind == "pm":
        q = str(rec.values.get("quantity", "pm25"))
        y = pm_corrected(rec.values, values)
        values[f"{q}_cal"] = y
        if y is None:
            flags = (*flags, "cal_input_missing")
    elif rec.kind == "noise":
        delta = float(rec.values.get("offset_db", 0.0)) - sc.base_offset_db
        for k in NOISE_LEVEL_KEYS:
            if isinstance(values.get(k), (int, float)):
                values[k] = float(values[k]) + delta
    values["cal"] = rec.id
    return Reading(sensor=r.sensor, values=values, flags=flags, meta={**r.meta, "cal": rec.id})


def sensor_calibrations(cfg: Any) -> dict[str, SensorCalibration]:
    """For each configured sensor name, the (kind, serial) its records are kept under.

    NO2 sensors are known by their sheet serial; noise sensors by their configured ``serial``
    if any; PM sensors (and noise without one) as ``<device id>/<sensor name>``.
    """
    out: dict[str, SensorCalibration] = {}
    for sc in cfg.sensors:
        if sc.driver in ("no2-b43f",):
            out[sc.name] = SensorCalibration("no2", str(sc.options.get("serial", "")))
        elif sc.driver in ("pms5003", "pms7003", "pmsa003", "sds011", "sps30", "sim-pm"):
            out[sc.name] = SensorCalibration("pm", f"{cfg.device.id}/{sc.name}")
        elif sc.driver in ("microphone", "sound-module", "sim-noise"):
            base = float(sc.options.get("calibration_offset_db", 0.0)) if sc.driver == "microphone" else 0.0
            out[sc.name] = SensorCalibration("noise", noise_serial(cfg, sc), base)
    return out


def noise_serial(cfg: Any, sc: Any) -> str:
    """The id a noise sensor's records are kept under: its configured ``serial`` (a microphone
    moved to another van keeps its calibration), else ``<device id>/<sensor name>``. The agent
    and ``edge noise calibrate`` both ask here, so a record is always one the agent applies."""
    return str(sc.options.get("serial") or f"{cfg.device.id}/{sc.name}")


def attach_calibrations(drivers: list[Any], cfg: Any, store: RecordSource) -> list[Any]:
    """The agent's drivers with calibrated ones wrapped (GPS and the rest untouched)."""
    cals = sensor_calibrations(cfg)
    return [CalibratedDriver(d, store, cals[d.name]) if d.name in cals else d for d in drivers]


def configured_no2_sheet(sc: Any) -> No2Calibration | None:
    """The sheet a ``no2-b43f`` sensor table configures (as edge/driver_factory.py reads it), if any."""
    from drivers.no2 import configured_sheet

    try:
        cal = configured_sheet(sc.options)
    except ConfigError as exc:
        raise ConfigError(f"sensors.{sc.name}.{exc.key}", exc.problem) from exc
    if cal is None and sc.options.get("bus") == "sim":
        from edge import simulation

        return simulation.backend(f"sensors.{sc.name}.bus").no2_sheet
    return cal


def record_from_config(cfg: Any, store: CalibrationStore, technician: str = "config-file") -> list[CalibrationRecord]:
    """Record each NO2 sheet the configuration holds, if its serial has no record yet.

    Not a change of calibration (the agent already uses the configured sheet), only its
    provenance: from then on every NO2 value carries a record id.
    """
    made = []
    for sc in cfg.sensors:
        if sc.driver != "no2-b43f" or not sc.options.get("serial"):
            continue
        serial = str(sc.options["serial"])
        if store.history("no2", serial):
            continue
        cal = configured_no2_sheet(sc)
        if cal is None:
            continue
        rec = store.add("no2", serial, "sheet", no2_values_from_sheet(cal, int(sc.options.get("algorithm", 1))),
                        technician=technician, device=cfg.device.id, note=f"from {cfg.source}")
        made.append(store.confirm(rec.id))
    return made


class CalibrationAnnouncer:
    """A pseudo-driver: samples of sensor ``calibration`` carrying record JSON to the receiver.

    At start it announces every active record (the receiver upserts by id, so repeats are
    harmless); afterwards, whenever the store's generation changes, every record that
    changed (the new active one and the one it superseded). One record per read, so a
    tick never carries more than one.
    """

    name = CALIBRATION_SENSOR

    def __init__(self, store: RecordSource, *, poll_every: int = 10) -> None:
        self.store = store
        self.poll_every = poll_every
        self._reads = 0
        self._gen = store.generation()
        self._sent: dict[str, str] = {}
        self._queue: list[CalibrationRecord] = [r for r in store.all_active() if _announceable(r)]

    def _poll(self) -> None:
        gen = self.store.generation()
        if gen == self._gen:
            return
        self._gen = gen
        queued = {r.id for r in self._queue}
        for rec in self.store.history():
            if (rec.status != PENDING and self._sent.get(rec.id) != rec.to_json() and rec.id not in queued
                    and _announceable(rec)):
                self._queue.append(rec)

    def read(self) -> Reading | None:
        if self._reads % self.poll_every == 0:
            self._poll()
        self._reads += 1
        if not self._queue:
            return None
        rec = self._queue.pop(0)
        text = rec.to_json()
        self._sent[rec.id] = text
        return Reading(
            sensor=CALIBRATION_SENSOR,
            values={"id": rec.id, "kind": rec.kind, "serial": rec.serial, "version": rec.version,
                    "status": rec.status, "record": text},
        )

    def close(self) -> None:
        """The store belongs to whoever opened it."""


@dataclass
class Proposal:
    """A record about to be proposed, with what it replaces (for old -> new displays)."""

    kind: str
    serial: str
    method: str
    values: dict[str, Any]
    previous: CalibrationRecord | None = None
    old_values: dict[str, Any] | None = None  # what is in effect without a record (the config's sheet)
    note: str = ""
    valid_from: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
