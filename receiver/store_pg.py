"""The DataLab store on PostgreSQL: the same tables, semantics and errors as ``SQLiteStore``.

Why a second backend: one PostgreSQL node takes a city's fleet (hundreds of
vans at 1 Hz) with several receiver workers writing at once, which SQLite's
single writer cannot. Everything the analysts see is kept identical: the
tables ``batches``, ``samples``, ``fixes``, ``positions``, ``gaps``,
``dead_letters``, ``counters``, ``quality``, ``device_status`` and the ``observations`` view (``vals`` is
``jsonb`` here), in one schema (``datalab`` unless told otherwise).

How several workers stay correct (the receiver may run N processes on a
shared MQTT subscription, and the broker may hand the same batch to two of
them):

* every ``ingest`` takes a transaction-level advisory lock on its device
  first. Batches of different vans go in parallel; batches of one van go one
  after the other, exactly as in SQLite. That does two things: a batch
  delivered twice at once ends as one ``stored`` and one ``duplicate`` (the
  second waits, then sees the first one's row), and the position join sees
  the fixes a concurrent batch of the same van just committed (without it,
  two neighbouring batches would each leave the other's samples ``pending``).
* counters are bumped in one statement, in name order, at the end of the
  transaction: every writer locks the hot counter rows in the same order,
  briefly, so they cannot deadlock.
* unique constraints stay the last word (on every table but a partitioned
  ``samples``, whose keys the van's lock keeps unique). Should a conflict, a serialization
  failure, a deadlock or a dropped connection get through anyway, the whole
  ingest is retried (it is idempotent), so a message is never left un-acked
  for a transient reason.

Speed: samples, fixes and positions go in with binary, typed ``COPY``
(bench/bench_ingest.py measured it 2-3x faster than ``executemany`` in
pipeline mode for the same rows, and binary about 1.3x faster than text COPY:
the server parses no numbers). COPY cannot skip conflicts, so it is used only when
the store holds none of the batch's samples yet, which the device lock makes
a reliable test; a batch that overlaps stored samples (a re-sealed range)
takes the slower ``INSERT ... ON CONFLICT DO NOTHING`` path.

Optional extensions, used only when the server has them (never required):

* PostGIS: ``positions.geom`` (``geometry(Point, 4326)``, generated from
  lat/lon so the write path is unchanged) with a GiST index, for
  nearest-neighbour (``<->``) and area queries.
* TimescaleDB is *not* used for ``samples``: a hypertable needs its time
  column in every unique index and never NULL, but a sample's identity is
  (device, epoch, seq) and its time may be unknown (``no_time``). The plain
  monthly partitions (_PARTITIONS) give the time pruning without an extension;
  they too cannot carry that unique index, so the van's lock keeps keys unique.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerr
from psycopg import pq, sql
from psycopg.adapt import Dumper
from psycopg.types.json import Jsonb, set_json_loads

from core.errors import PayloadError
from receiver.pg_timeouts import PgTimeouts
from receiver.pg_timeouts import connect as pg_connect
from receiver.pg_timeouts import guard as pg_guard
from receiver.positions import NO_FIX, NO_TIME, PENDING, Fix, locate
from core.faultpoints import crash_point
from receiver import pg_samples, quality
from receiver.batch_consistency import GAP_UPSERT
from receiver.aggregate import create_tables as create_map_tables
from receiver.calibration import calibration_sql
from receiver.calibration import ensure_tables as ensure_calibration_tables
from receiver.calibration import ingest_calibrations
from receiver.pm_derive import derive_batch_pm, housing_records, pm_records_before
from receiver.pm_humidity import DEFAULT_KAPPA
from receiver.requality import requality
from receiver.units import unit_sql
from receiver.store import (
    SCHEMA_VERSION,
    CONTEXT_ROWS,
    Context,
    DeadLetter,
    GPS_SENSOR,
    IngestResult,
    StoreReads,
    _has_fix,
    _int,
    _num,
    _json_bytes,
    _sample_from_row,
    _screen_times,
    _context_of,
    _values,
    quality_rows,
    read_json,
)
from core.wire import Batch

log = logging.getLogger(__name__)

# Advisory lock namespaces (first key of the two-int form): "DL" + 0/1/2.
_LOCK_DEVICE = 0x444C00
_LOCK_SCHEMA = 0x444C01
_LOCK_DERIVE = 0x444C02

# Transient failures after which the whole transaction is simply run again.
_RETRY = (
    pgerr.SerializationFailure,
    pgerr.DeadlockDetected,
    pgerr.UniqueViolation,
    pgerr.LockNotAvailable,
)
MAX_ATTEMPTS = 6

T = TypeVar("T")

_SAMPLE_COLS = (
    "device", "epoch", "seq", "sensor", "t_utc_ms", "t_mono_ms", "time_src", "boot_id",
    "vals", "flags", "batch_id", "received_utc_ms",
)
_FIX_COLS = ("device", "epoch", "seq", "t_utc_ms", "lat", "lon", "speed_mps", "fix_quality")
_POS_COLS = ("device", "epoch", "seq", "t_utc_ms", "state", "lat", "lon", "speed_mps", "fix_quality")

_TABLES = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id text PRIMARY KEY,
    device text,
    epoch text,
    first_seq bigint,
    last_seq bigint,
    n_samples integer,
    sha256 text,
    received_utc_ms bigint
);
CREATE TABLE IF NOT EXISTS samples (
    device text NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    sensor text NOT NULL,
    t_utc_ms bigint,
    t_mono_ms bigint,
    time_src text,
    boot_id text,
    vals jsonb,
    flags text,
    batch_id text,
    received_utc_ms bigint
) PARTITION BY RANGE (t_utc_ms);  -- by month (_PARTITIONS); a plain one is migrated (pg_samples)
CREATE TABLE IF NOT EXISTS fixes (
    device text,
    epoch text,
    seq bigint,
    t_utc_ms bigint,
    lat double precision,
    lon double precision,
    speed_mps double precision,
    fix_quality integer,
    PRIMARY KEY (device, epoch, seq)
);
CREATE TABLE IF NOT EXISTS positions (
    device text,
    epoch text,
    seq bigint,
    t_utc_ms bigint,
    state text,
    lat double precision,
    lon double precision,
    speed_mps double precision,
    fix_quality integer,
    PRIMARY KEY (device, epoch, seq)
);
CREATE TABLE IF NOT EXISTS gaps (
    device text,
    epoch text,
    first_seq bigint,
    last_seq bigint,
    reason text,
    batch_id text,
    PRIMARY KEY (device, epoch, first_seq, last_seq)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    received_utc_ms bigint,
    topic text,
    device text,
    reason text,
    sha256 text,
    payload bytea
);
CREATE TABLE IF NOT EXISTS counters (name text PRIMARY KEY, value bigint);
CREATE TABLE IF NOT EXISTS quality (
    device text,
    epoch text,
    seq bigint,
    quantity text,
    flags text,
    PRIMARY KEY (device, epoch, seq, quantity)
);
CREATE TABLE IF NOT EXISTS derive_queue (
    batch_id text PRIMARY KEY,
    device text,
    epoch text,
    first_seq bigint,
    last_seq bigint,
    received_utc_ms bigint
);
-- Queued batches that could not be derived on their own (StoreReads._isolate).
CREATE TABLE IF NOT EXISTS derive_parked (
    batch_id text PRIMARY KEY,
    device text,
    epoch text,
    first_seq bigint,
    last_seq bigint,
    received_utc_ms bigint,
    reason text,
    parked_utc_ms bigint
);
CREATE TABLE IF NOT EXISTS device_status (
    device text PRIMARY KEY,
    received_utc_ms bigint,
    online integer,
    status text
);
-- Time indexes on the derived tables only, off the ack path (see SQLiteStore._create).
DROP INDEX IF EXISTS samples_device_time;
CREATE INDEX IF NOT EXISTS positions_device_time ON positions (device, t_utc_ms);
CREATE INDEX IF NOT EXISTS fixes_device_time ON fixes (device, t_utc_ms);
CREATE INDEX IF NOT EXISTS positions_open ON positions (device, t_utc_ms)
    WHERE state IN ('pending', 'no_fix');
CREATE INDEX IF NOT EXISTS positions_pending ON positions (device, t_utc_ms) WHERE state = 'pending';
-- Dead letters written but not yet acked to the broker, by run (StoreReads._dead_letter_again).
CREATE TABLE IF NOT EXISTS dead_letters_unacked (id bigint PRIMARY KEY, run text NOT NULL);
CREATE INDEX IF NOT EXISTS dead_letters_sha ON dead_letters (sha256);
-- The MQTT packet id the upload came with: a DUP copy matches only its own mark.
ALTER TABLE dead_letters_unacked ADD COLUMN IF NOT EXISTS mid bigint;
-- Time windows whose open samples wait to be placed again (StoreReads._join_inputs' budget).
CREATE TABLE IF NOT EXISTS positions_redo (id bigserial PRIMARY KEY, device text NOT NULL,
    lo_ms bigint NOT NULL, hi_ms bigint NOT NULL);
-- 1: the window's interpolated samples are placed again too (a late fix split their bracket).
ALTER TABLE positions_redo ADD COLUMN IF NOT EXISTS interp integer NOT NULL DEFAULT 0;
-- Time windows whose PM values' humid flags wait to be judged again (StoreReads._humid_edges).
CREATE TABLE IF NOT EXISTS humid_redo (id bigserial PRIMARY KEY, device text NOT NULL,
    lo_ms bigint NOT NULL, hi_ms bigint NOT NULL);
DROP VIEW IF EXISTS observations_geom;  -- PostGIS' view of the one below (_POSTGIS), made again after it
DROP VIEW IF EXISTS observations;  -- OR REPLACE cannot insert a column mid-view
CREATE VIEW observations AS
SELECT s.device, s.epoch, s.seq, s.sensor, s.t_utc_ms,
       to_timestamp(s.t_utc_ms / 1000.0) AS time_utc,
       s.time_src, j.key AS quantity,
       coalesce(d.value, CASE WHEN jsonb_typeof(j.value) = 'number' THEN j.value::float8 END) AS value,
       {unit} AS unit,
       {calibration} AS calibration, s.flags,
       trim(coalesce(q.flags, '') ||
            CASE WHEN p.state IN ('no_fix', 'no_time') THEN ',' || p.state ELSE '' END,
            ',') AS quality,
       p.lat, p.lon, p.speed_mps, p.fix_quality, p.state AS position,
       CASE WHEN jsonb_typeof(j.value) = 'number' THEN j.value::float8 END AS raw_value
FROM samples s
CROSS JOIN LATERAL jsonb_each(s.vals) j
LEFT JOIN positions p ON p.device = s.device AND p.epoch = s.epoch AND p.seq = s.seq
LEFT JOIN LATERAL (SELECT q.flags FROM quality q WHERE q.device = s.device AND q.epoch = s.epoch
                   AND q.seq = s.seq AND q.quantity = j.key OFFSET 0) q ON true
{derived_join}
-- numbers and nulls only, as in SQLite (a "n/a" or true in a value is no measurement)
WHERE s.sensor NOT IN ('gps', 'calibration') AND jsonb_typeof(j.value) IN ('number', 'null');
"""
# value: the best one (the receiver's recomputed value, else the van's); calibration: the
# record it was calibrated with (receiver/calibration.py).
# The derived row (and the quality row above) as a LATERAL subquery fenced with OFFSET 0, not a
# plain LEFT JOIN: the plan is then a probe of the table's primary key per value whatever the
# statistics say. With the plain join, a store not yet ANALYZEd (a fresh receiver, a large
# load) was planned as a nested loop filtering samples x derived: the docs' check query took 8.3 s at 10,000 samples before
# ANALYZE and 53 ms after (tester v6); tests/test_best_value_rules.py checks the plan.
_DERIVED_LATERAL = ("LEFT JOIN LATERAL (SELECT d.value, d.calibration FROM derived d"
                    " WHERE d.device = s.device AND d.epoch = s.epoch AND d.seq = s.seq AND d.quantity = j.key"
                    " OFFSET 0) d ON true")
_TABLES = (_TABLES.replace("{calibration}", calibration_sql(False)).replace("{derived_join}", _DERIVED_LATERAL)
           .replace("{unit}", unit_sql("j.key")))

# Generated from lat/lon: the write path (COPY, upserts) stays the same with or without PostGIS.
_POSTGIS = """
ALTER TABLE positions ADD COLUMN IF NOT EXISTS geom geometry(Point, 4326)
    GENERATED ALWAYS AS (
        CASE WHEN lat IS NOT NULL AND lon IS NOT NULL
             THEN ST_SetSRID(ST_MakePoint(lon, lat), 4326) END
    ) STORED;
CREATE INDEX IF NOT EXISTS positions_geom ON positions USING gist (geom);
-- What QGIS opens as layers (docs/datalab.md): each measured value as a point, and the map
-- units as lines (road segments) and polygons (H3 cells), from the GeoJSON the maps store.
CREATE OR REPLACE VIEW observations_geom AS  -- OR REPLACE: another worker may have made it since our drop
SELECT o.*, CASE WHEN o.lat IS NOT NULL AND o.lon IS NOT NULL
                 THEN ST_SetSRID(ST_MakePoint(o.lon, o.lat), 4326) END::geometry(Point, 4326) AS geom
FROM observations o;
ALTER TABLE aggregates ADD COLUMN IF NOT EXISTS geom geometry(Geometry, 4326)
    GENERATED ALWAYS AS (ST_SetSRID(ST_GeomFromGeoJSON(geometry), 4326)) STORED;
CREATE INDEX IF NOT EXISTS aggregates_geom ON aggregates USING gist (geom);
CREATE OR REPLACE VIEW map_segments AS
SELECT scheme, cell, period, quantity, unit, value, n_passes, n_days, n_samples, n_excluded, published,
       to_timestamp(period_start_utc_ms / 1000.0) AS period_start, to_timestamp(period_end_utc_ms / 1000.0)
       AS period_end, geom::geometry(LineString, 4326) AS geom
FROM aggregates WHERE GeometryType(geom) = 'LINESTRING';
CREATE OR REPLACE VIEW map_cells AS
SELECT scheme, cell, period, quantity, unit, value, n_passes, n_days, n_samples, n_excluded, published,
       to_timestamp(period_start_utc_ms / 1000.0) AS period_start, to_timestamp(period_end_utc_ms / 1000.0)
       AS period_end, geom::geometry(Polygon, 4326) AS geom
FROM aggregates WHERE GeometryType(geom) = 'POLYGON';
"""

# samples partitioned by month of t_utc_ms (issue 17.1: a day's query reads a day's partition).
# A partition key must be in every unique index and never NULL, but a sample's identity is
# (device, epoch, seq) and its time may be unknown (no_time). So the partitioned table has no
# primary key: (device, epoch, seq) stays unique because every writer of a van's samples holds
# that van's advisory lock and inserts only keys not stored (_none_stored, _insert_new_samples).
# Samples without a time go to samples_undated (the default partition), and so do rows written
# straight into samples (a bulk load) for a month not made yet: still stored and found, only not
# pruned; the month's partition takes them over when it is made (_ensure_months). The receiver
# makes each month before its first row. Each month is split into GPS and the rest, so retention
# drops a month's positions whole (receiver/pg_samples.py). A store made before with a plain
# samples table is moved into the partitions when it opens (pg_samples.migrate, in batches).
_PARTITIONS = """
DO $$
BEGIN
  IF (SELECT relkind FROM pg_class WHERE oid = 'samples'::regclass) = 'p' THEN
    CREATE TABLE IF NOT EXISTS samples_undated PARTITION OF samples DEFAULT;
    CREATE INDEX IF NOT EXISTS samples_key ON samples (device, epoch, seq);
    -- BRIN: a few pages per month of rows arriving in time order, nearly free on the ack path
    CREATE INDEX IF NOT EXISTS samples_time ON samples USING brin (t_utc_ms);
  END IF;
END $$;
"""

# The store's schema version (table schema_version): what an existing store is brought to when a
# receiver opens it. Every step is idempotent DDL run at every start (_create), so an old store
# migrates by being opened; the table says which version last did.
#   1: the tables and jsonb observations (before issue 17; no table)
#   2: observations typed (value/raw_value double precision, time_utc timestamptz, unit); PostGIS
#      geometry for observations and map units (observations_geom, map_segments, map_cells)
#   3: samples partitioned by month, each month split GPS / rest; a plain samples is migrated
_VERSION = f"""
CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, applied_utc timestamptz DEFAULT now());
INSERT INTO schema_version (version) VALUES ({SCHEMA_VERSION}) ON CONFLICT DO NOTHING;
"""

_TYPES = {
    "device": "text", "epoch": "text", "seq": "int8", "sensor": "text", "t_utc_ms": "int8",
    "t_mono_ms": "int8", "time_src": "text", "boot_id": "text", "vals": "jsonb", "flags": "text",
    "batch_id": "text", "received_utc_ms": "int8", "lat": "float8", "lon": "float8",
    "speed_mps": "float8", "fix_quality": "int4", "state": "text", "quantity": "text",
}

_UPSERT_POSITION = (
    "INSERT INTO positions (device, epoch, seq, t_utc_ms, state, lat, lon, speed_mps, fix_quality)"
    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
    " ON CONFLICT (device, epoch, seq) DO UPDATE SET t_utc_ms = excluded.t_utc_ms,"
    " state = excluded.state, lat = excluded.lat, lon = excluded.lon,"
    " speed_mps = excluded.speed_mps, fix_quality = excluded.fix_quality"
)


class _JsonText:
    """Marker type, never instantiated: the key ``_JsonbFromText`` is registered under."""


class _JsonbFromText(Dumper):
    """jsonb for binary COPY from JSON text made already (bytes): a version byte, then the text.

    COPY's ``set_types`` picks its dumper by the column's oid, and a connection's
    last dumper registered for jsonb is this one: the samples' values go to the
    server as the bytes ``_json_bytes`` made, with no Jsonb wrapper and no
    second encoding by psycopg (together a third of a worker's client time).
    Only COPY uses it; parameters of ordinary statements are still dumped by type.
    """

    format = pq.Format.BINARY
    oid = 0  # set from the connection's type registry

    def dump(self, obj: bytes) -> bytes:
        return b"\x01" + obj


class PostgresStore(StoreReads):
    """``Store`` on PostgreSQL (psycopg 3). ``dsn``: a libpq URL or key=value string.

    ``postgis``: None uses PostGIS when the server has it, False never does,
    True insists (fails if it cannot be enabled).
    """

    PARAM = "%s"
    QUEUE_TIEBREAK = "batch_id"
    REDO_CLAIM = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        dsn: str,
        *,
        max_gap_s: float = 10.0,
        schema: str = "datalab",
        postgis: bool | None = None,
        timeouts: PgTimeouts | None = None,
        pm_kappa: Mapping[str, float] | None = None,
    ) -> None:
        self.dsn = dsn
        self.timeouts = timeouts or PgTimeouts()
        self.schema = schema
        self.max_gap_ms = int(max_gap_s * 1000)
        # kappa per PM quantity for the growth correction (receiver/pm_humidity.py; config pm_kappa)
        self.pm_kappa = {**DEFAULT_KAPPA, **(pm_kappa or {})}
        self._want_postgis = postgis
        self.postgis = False
        self.conn = self._connect()
        self._create()

    # -- connection and schema --------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        # autocommit: every unit of work is an explicit ``transaction()`` block, so
        # nothing is ever left open (an idle-in-transaction worker would hold locks).
        conn = pg_connect(self.dsn, self.timeouts, autocommit=True)  # bounded waits: receiver/pg_timeouts.py
        set_json_loads(read_json, conn)  # orjson (~5x the stdlib's speed), tolerant of old rows
        _JsonbFromText.oid = conn.adapters.types["jsonb"].oid
        conn.adapters.register_dumper(_JsonText, _JsonbFromText)
        # public stays on the path for PostGIS' types and functions.
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self.schema)))
        return conn

    def _reconnect(self) -> None:
        try:
            self.conn.close()
        finally:
            self.conn = self._connect()

    def _ddl(self, *statements: Any) -> None:
        """Run schema statements in one transaction, one worker at a time, until it commits.

        Workers starting together would race on CREATE ... IF NOT EXISTS (it is
        not atomic against a concurrent create), hence the lock. And a worker
        already ingesting holds row locks that CREATE INDEX / ALTER TABLE ... IF
        NOT EXISTS (which lock the table even when there is nothing to do) wait
        for, while it waits for ours: PostgreSQL aborts one of the two, and ours
        is idempotent, so it runs again.
        """
        c = self.conn
        for attempt in range(MAX_ATTEMPTS):
            try:
                with c.transaction():
                    c.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_SCHEMA,))
                    for st in statements:
                        if callable(st):  # a function that runs its own statements on c
                            st(c)
                        else:
                            c.execute(st)
                return
            except pgerr.DeadlockDetected:
                if attempt == MAX_ATTEMPTS - 1:
                    raise
                log.info("schema statements met a deadlock with a running worker; again")
                time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))

    def _create(self) -> None:
        # Calibration tables first: the observations view reads ``derived``.
        # The maps' tables too (receiver/aggregate.py): PostGIS gives them a geometry column.
        self._ddl(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)),
                  pg_samples.BEGIN_MIGRATION, ensure_calibration_tables, _TABLES, _PARTITIONS,
                  create_map_tables, _VERSION)
        self.partitioned = self.conn.execute(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = 'samples'::regclass").fetchone()[0]  # type: ignore[index]
        self._months: set[int] = set()  # month starts (ms) known to have a partition
        now = int(time.time() * 1000)
        self._ensure_months([now, now + 31 * 86_400_000])  # this month and the next, before any upload
        # a store made before partitioning: its rows move in now, before this receiver ingests
        pg_samples.migrate(self.conn, self._ensure_months, self._in_own_transaction)
        if self._want_postgis is not False:
            self.postgis = self._enable_postgis()
            if self._want_postgis and not self.postgis:
                raise RuntimeError("PostGIS was required but cannot be enabled on this server")

    def _in_own_transaction(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        def tx(attempt: int) -> T:
            with self.conn.transaction():
                return work(self.conn)

        return self._run(tx)

    def _enable_postgis(self) -> bool:
        c = self.conn
        have = c.execute("SELECT 1 FROM pg_extension WHERE extname = 'postgis'").fetchone()
        if have is None:
            avail = c.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'"
            ).fetchone()
            if avail is None:
                return False
            try:
                with c.transaction():
                    c.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_SCHEMA,))
                    c.execute("CREATE EXTENSION IF NOT EXISTS postgis")
            except psycopg.Error as exc:  # not allowed (no superuser): run without it
                log.warning("PostGIS is installed but this role cannot enable it (%s): a superuser runs"
                            " `CREATE EXTENSION postgis;` in this database once (docs/datalab.md); the store"
                            " works without it meanwhile", type(exc).__name__)
                return False
        self._ddl(_POSTGIS)
        return True

    def _ensure_months(self, times: Iterable[int | None]) -> None:
        """Make the monthly partitions of samples these times fall in (own transaction, before ingest).

        Outside the ingest transaction: CREATE ... PARTITION OF locks the whole table, which an
        ingest holding row locks must not wait for. Once per month per worker in practice.
        """
        if not self.partitioned:
            return
        need = {pg_samples.month_start(t) for t in times if t is not None} - self._months
        for start in sorted(need):
            self._ddl(lambda c, start=start: pg_samples.make_month(c, start))
            self._months.add(start)

    def is_outage(self, exc: BaseException) -> bool:
        # Unreachable, shut down, out of space or memory (OperationalError), or conflicts that
        # outlived _run's attempts; except class 54, a program limit one upload can reach (an
        # index row too large). A batch's content fails otherwise (DataError, ValueError ...).
        return (isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, *_RETRY))
                and not isinstance(exc, pgerr.ProgramLimitExceeded))

    # -- retries ------------------------------------------------------------------

    def _run(self, work: Callable[[int], T]) -> T:
        """Run ``work(attempt)`` in a fresh transaction until it commits.

        Safe because every unit of work here is idempotent: a retry after a
        commit whose answer was lost with the connection just finds the batch
        already stored.
        """
        for attempt in range(MAX_ATTEMPTS):
            try:
                with pg_guard(self.conn):  # a server that answers nothing: the commit too is bounded
                    return work(attempt)
            except _RETRY as exc:
                if attempt == MAX_ATTEMPTS - 1:
                    raise
                log.info("transient store conflict (%s), retrying", type(exc).__name__)
            except psycopg.OperationalError:
                if attempt == MAX_ATTEMPTS - 1 or not self.conn.broken and not self.conn.closed:
                    raise
                log.debug("store connection lost, reconnecting")  # per attempt: Health logs the outage
                self._reconnect_later(attempt)
                continue
            time.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")

    def _reconnect_later(self, attempt: int) -> None:
        # One reconnect per failed attempt; if the server does not take it, that is an
        # outage for the caller (the service retries with backoff and reports it) rather
        # than more attempts here, each as long as connect_timeout, before anyone knows.
        time.sleep(min(2.0, 0.1 * 2**attempt))
        self._reconnect()

    # -- writes -------------------------------------------------------------------

    def ingest(self, batch: Batch, sha256: str, received_ms: int, *, derive: bool = True) -> IngestResult:
        """Store one batch in one transaction, idempotently (also across workers).

        ``derive`` as in ``SQLiteStore.ingest``: False stores only the raw batch
        and queues it for ``derive_pending``.
        """
        return self.ingest_many([(batch, sha256, received_ms)], derive=derive)[0]

    def ingest_many(
        self, items: Sequence[tuple[Batch, str, int]], *, derive: bool = True
    ) -> list[IngestResult]:
        """Several batches in one transaction (see ``SQLiteStore.ingest_many``)."""
        for batch, _, received_ms in items:
            _screen_times(batch, received_ms)
        self._ensure_months(s.t_utc_ms for batch, _, _ in items for s in batch.samples)
        # JSON text made here (a value JSON cannot hold raises PayloadError), sent as it is
        # by _JsonbFromText.
        vals = [[_json_bytes(s.values) for s in batch.samples] for batch, _, _ in items]
        return self._run(lambda attempt: self._ingest_many(items, vals, attempt, derive))

    def _ingest_many(
        self, items: Sequence[tuple[Batch, str, int]], vals: list[list[bytes]], attempt: int, derive: bool
    ) -> list[IngestResult]:
        c = self.conn
        results: list[IngestResult] = []
        bumps: dict[str, int] = {}
        to_copy: list[tuple[Any, ...]] = []  # samples of fresh batches: one COPY for the group
        queued: list[tuple[Any, ...]] = []

        def bump(name: str, by: int) -> None:
            bumps[name] = bumps.get(name, 0) + by

        self._new_unit()
        with c.transaction():
            # Every van of the group locked up front, in one order for all workers (no deadlock).
            c.execute(
                "SELECT pg_advisory_xact_lock(%s, k) FROM"
                " (SELECT DISTINCT hashtext(d) AS k FROM unnest(%s::text[]) AS d ORDER BY k) AS keys",
                (_LOCK_DEVICE, sorted({b.device for b, _, _ in items})),
            )
            for (batch, sha256, received_ms), v in zip(items, vals):
                n = len(batch.samples)
                device, epoch, bid = batch.device, batch.epoch, batch.batch_id
                # One round trip on the usual path: the insert says whether the batch is new.
                if c.execute(
                    "INSERT INTO batches VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (batch_id) DO NOTHING"
                    " RETURNING 1",
                    (bid, device, epoch, batch.first_seq, batch.last_seq, n, sha256, received_ms),
                ).fetchone() is None:
                    row = c.execute("SELECT sha256 FROM batches WHERE batch_id = %s", (bid,)).fetchone()
                    if row is not None and row[0] != sha256:
                        raise PayloadError(f"batch {bid} arrived again with different content")
                    bump("batches_duplicate", 1)
                    bump("samples_duplicate", n)
                    results.append(IngestResult("duplicate", 0, n))
                    continue
                # After a unique violation, do not trust the fast path's premise again.
                fresh = attempt == 0 and self._none_stored(batch)
                rows = [
                    (device, epoch, s.seq, s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.boot_id, x,
                     ",".join(s.flags), bid, received_ms)
                    for s, x in zip(batch.samples, v)
                ]
                if fresh:
                    to_copy += rows
                    new = n
                else:
                    new = self._insert_new_samples(rows)
                if batch.gaps:
                    with c.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO gaps VALUES (%s,%s,%s,%s,%s,%s)" + GAP_UPSERT,
                            [(device, epoch, g.first_seq, g.last_seq, g.reason, bid) for g in batch.gaps],
                        )
                if derive:
                    # deriving reads the van's earlier samples: they must be in the table first
                    if to_copy:
                        self._copy("samples", _SAMPLE_COLS, to_copy)
                        to_copy = []
                    try:
                        with c.transaction():  # a savepoint: a batch that cannot be derived is parked
                            self._derive(batch)
                    except Exception as exc:
                        if self._store_failure(exc):
                            raise
                        self._park_new(batch, exc, received_ms)
                        bump("batches_parked", 1)
                else:
                    queued.append((bid, device, epoch, batch.first_seq, batch.last_seq, received_ms))
                bump("batches_stored", 1)
                bump("samples_stored", new)
                if new < n:
                    bump("samples_duplicate", n - new)
                results.append(IngestResult("stored", new, n - new))
            if to_copy:
                self._copy("samples", _SAMPLE_COLS, to_copy)
            if queued:
                with c.cursor() as cur:
                    cur.executemany("INSERT INTO derive_queue VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                                    queued)
            self._bump(bumps)
            crash_point("receiver.commit.before")
        return results

    def _derive(self, batch: Batch) -> None:
        """Stage two, inside the caller's transaction: fixes, positions, calibrations, flags.

        Under a per-van lock of its own (not the ingest lock, so storing and
        deriving one van's batches never wait for each other): two derivers on
        neighbouring batches of one van would each miss the other's fixes.
        """
        c = self.conn
        c.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_DERIVE, batch.device))
        fresh = self._nothing_derived(batch)
        fixes = [
            (batch.device, batch.epoch, s.seq, s.t_utc_ms, float(s.values["lat"]),
             float(s.values["lon"]), _num(s.values.get("speed")), _int(s.values.get("fix_quality")))
            for s in batch.samples
            if s.sensor == GPS_SENSOR and s.t_utc_ms is not None and _has_fix(s.values)
        ]
        if fresh:
            self._copy("fixes", _FIX_COLS, fixes)
        elif fixes:
            with c.cursor() as cur:
                cur.executemany(
                    "INSERT INTO fixes VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING", fixes
                )
        self._join_positions(batch, fixes, fresh)
        pm_before = pm_records_before(c, batch)
        touched = ingest_calibrations(c, batch)  # received time: each record's sample's
        _, warm = derive_batch_pm(c, batch, self.pm_kappa, pm_before)  # PM: gain, then growth undone
        self._flag_quality(batch, fresh)
        requality(c, batch.device, touched)  # flags describe the value served
        self._humid_edges(batch, warm)

    def _nothing_derived(self, batch: Batch) -> bool:
        """True when no fix, position or flag of the batch's range exists yet (so COPY cannot conflict)."""
        seqs = [s.seq for s in batch.samples]
        if not seqs:
            return True
        if len(set(seqs)) != len(seqs) or any(q is None for q in seqs):
            return False
        lo, hi = min(seqs), max(seqs)  # type: ignore[type-var]
        row = self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM positions WHERE device = %s AND epoch = %s AND seq BETWEEN %s AND %s)"
            " OR EXISTS (SELECT 1 FROM fixes WHERE device = %s AND epoch = %s AND seq BETWEEN %s AND %s)"
            " OR EXISTS (SELECT 1 FROM quality WHERE device = %s AND epoch = %s AND seq BETWEEN %s AND %s)",
            (batch.device, batch.epoch, lo, hi) * 3,
        ).fetchone()
        return not row[0]  # type: ignore[index]

    def derive_pending(self, limit: int | None = None) -> int:
        """Derive the batches stored with ``derive=False``, oldest first; how many were done.

        Several derivers may run at once: each claims up to DERIVE_CLAIM queue
        entries with ``FOR UPDATE SKIP LOCKED``, derives them (merged per van)
        and deletes the entries in one transaction (killed at any point:
        derived, or still queued).
        """
        done = self._derive_queued(limit, lambda take, bid: self._run(lambda attempt: self._derive_claim(take, bid)))

        def chunk(attempt: int) -> int:
            with self.conn.transaction():
                return self._redo_chunk() or self._humid_chunk()

        return done + self._redo_positions(None if limit is None else limit - done, lambda: self._run(chunk))

    def _in_transaction(self, work: Callable[[], object]) -> None:
        def tx(attempt: int) -> None:
            with self.conn.transaction():
                work()

        self._run(tx)

    def _lock_van(self, device: str) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_DERIVE, device))

    def _upsert_positions(self, rows: list[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_UPSERT_POSITION, rows)

    def _derive_claim(self, take: int, batch_id: str | None = None) -> int:
        """One transaction: derive up to ``take`` queued batches (or that one) and dequeue them."""
        c = self.conn
        only = " WHERE batch_id = %s" if batch_id is not None else ""
        self._new_unit()
        with c.transaction():
            rows = c.execute(
                f"SELECT batch_id, device, epoch, first_seq, last_seq FROM derive_queue{only}"  # type: ignore[arg-type]
                " ORDER BY received_utc_ms, batch_id LIMIT %s FOR UPDATE SKIP LOCKED",
                (*([batch_id] if only else []), take),
            ).fetchall()
            if not rows:
                return 0
            for batch in self._merged(rows):  # in device order: derivers lock vans in one order
                self._derive(batch)
            c.execute("DELETE FROM derive_queue WHERE batch_id = ANY(%s)", ([r[0] for r in rows],))
            self._bump({"batches_derived": len(rows)})
            crash_point("receiver.derive.before")
        return len(rows)

    def _park(self, batch_id: str, reason: str) -> None:
        def work(attempt: int) -> None:
            c = self.conn
            with c.transaction():
                c.execute(
                    "INSERT INTO derive_parked SELECT batch_id, device, epoch, first_seq, last_seq,"
                    " received_utc_ms, %s, (extract(epoch FROM now()) * 1000)::bigint FROM derive_queue"
                    " WHERE batch_id = %s ON CONFLICT (batch_id) DO UPDATE SET reason = excluded.reason,"
                    " parked_utc_ms = excluded.parked_utc_ms", (reason, batch_id))
                c.execute("DELETE FROM derive_queue WHERE batch_id = %s", (batch_id,))
                self._bump({"batches_parked": 1})

        self._run(work)
        log.error("parked batch %s: it cannot be derived (%s); the others go on", batch_id, reason)

    def requeue_parked(self) -> int:
        """Queue every parked batch for deriving again (after a fix); how many."""
        def work(attempt: int) -> int:
            c = self.conn
            with c.transaction():
                n = c.execute("INSERT INTO derive_queue SELECT batch_id, device, epoch, first_seq, last_seq,"
                              " received_utc_ms FROM derive_parked ON CONFLICT DO NOTHING").rowcount
                c.execute("DELETE FROM derive_parked")
            return int(n)

        return self._run(work)

    def derive_backlog(self) -> int:
        """Batches stored but not derived yet."""
        return int(self.conn.execute("SELECT count(*) FROM derive_queue").fetchone()[0])  # type: ignore[index]

    def _none_stored(self, batch: Batch) -> bool:
        """True when none of the batch's samples is stored yet (so COPY cannot conflict).

        Reliable only under the device lock: nobody else writes this van's samples now.
        """
        seqs = [s.seq for s in batch.samples]
        if not seqs:
            return True
        if len(set(seqs)) != len(seqs) or any(q is None for q in seqs):
            return False  # a batch repeating a seq: let ON CONFLICT sort it out
        row = self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM samples WHERE device = %s AND epoch = %s"
            " AND seq BETWEEN %s AND %s)",
            (batch.device, batch.epoch, min(seqs), max(seqs)),  # type: ignore[type-var]
        ).fetchone()
        return not row[0]  # type: ignore[index]

    def _insert_new_samples(self, rows: list[tuple[Any, ...]]) -> int:
        """Insert the rows not stored yet; how many were new."""
        c = self.conn
        c.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_samples"
            " (LIKE samples INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        self._copy("stage_samples", _SAMPLE_COLS, rows)
        # Not ON CONFLICT: a partitioned samples has no unique index on (device, epoch, seq). Under
        # the van's lock nobody else writes its samples, so "not stored yet" is a plain anti-join;
        # DISTINCT ON keeps one row of a seq the batch repeats.
        cur = c.execute(
            "INSERT INTO samples SELECT DISTINCT ON (st.device, st.epoch, st.seq) st.* FROM stage_samples st"
            " WHERE NOT EXISTS (SELECT 1 FROM samples s WHERE s.device = st.device AND s.epoch = st.epoch"
            " AND s.seq = st.seq) ORDER BY st.device, st.epoch, st.seq"
        )
        new = cur.rowcount
        c.execute("DELETE FROM stage_samples")  # the next batch of a group stages its own rows only
        return new

    def _copy(self, table: str, cols: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols))
        )
        with self.conn.cursor() as cur, cur.copy(stmt) as cp:
            cp.set_types([_TYPES[c] for c in cols])
            for r in rows:
                cp.write_row(r)

    def _bump(self, by: dict[str, int]) -> None:
        """Add to the counters in one statement, rows locked in name order (no deadlocks)."""
        items = sorted(by.items())
        values = sql.SQL(", ").join(sql.SQL("(%s, %s)") for _ in items)
        self.conn.execute(
            sql.SQL(
                "INSERT INTO counters (name, value) VALUES {} ON CONFLICT (name)"
                " DO UPDATE SET value = counters.value + excluded.value"
            ).format(values),
            [x for kv in items for x in kv],
        )

    def _join_positions(self, batch: Batch, fixes: list[tuple[Any, ...]], fresh: bool) -> None:
        """Give this batch's sensor samples a position, and revisit open ones near new fixes.

        The same steps as ``SQLiteStore._join_positions`` (and the same ``locate``).
        """
        c = self.conn
        gap = self.max_gap_ms
        sensor = [s for s in batch.samples if s.sensor != GPS_SENSOR]
        timeless = [s for s in sensor if s.t_utc_ms is None]
        sensor = [s for s in sensor if s.t_utc_ms is not None]
        if timeless:
            with c.cursor() as cur:
                cur.executemany(
                    _UPSERT_POSITION,
                    [(batch.device, batch.epoch, s.seq, None, NO_TIME, None, None, None, None)
                     for s in timeless],
                )
        times = [s.t_utc_ms for s in sensor] + [f[3] for f in fixes]
        if not times:
            return
        lo, hi = min(times) - gap, max(times) + gap  # type: ignore[type-var,operator]
        device = batch.device
        fix_times = [f[3] for f in fixes]
        newest, reopened, fx, ft = self._join_inputs(device, lo, hi, gap, fix_times)

        def place(epoch: str, seq: int, t: int) -> tuple[Any, ...]:
            p = locate(fx, ft, t, gap, newest)
            return (device, epoch, seq, t, p.state, p.lat, p.lon, p.speed_mps, p.fix_quality)

        mine = [place(batch.epoch, s.seq, s.t_utc_ms) for s in sensor]  # type: ignore[arg-type]
        again = [place(e, q, t) for e, q, t in reopened]
        if fresh:
            # None of this batch's samples had a position row: plain COPY.
            self._copy("positions", _POS_COLS, mine)
        else:
            again = mine + again
        if again:
            self._upsert_positions(again)
        self._close_pending(device, newest, gap, fix_times)

    def _flag_quality(self, batch: Batch, fresh: bool) -> None:
        """Quality flags for this batch's values (the same ``quality_rows`` as SQLite)."""
        rows, revised = quality_rows(batch, self._contexts(batch), housing_records(self.conn, batch.device))
        if fresh:  # none of these samples had flags yet: COPY (humid air flags every PM value)
            self._copy("quality", ("device", "epoch", "seq", "quantity", "flags"), rows)
        elif rows:
            with self.conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO quality VALUES (%s,%s,%s,%s,%s) ON CONFLICT (device, epoch, seq, quantity)"
                    " DO UPDATE SET flags = excluded.flags",
                    rows,
                )
        self._revise_quality(batch.device, batch.epoch, revised)  # earlier values, never COPY

    def _context(self, device: str, epoch: str, sensor: str, quantity: str, before_seq: int) -> Context:
        rows = self.conn.execute(
            "SELECT seq, vals FROM samples WHERE device = %s AND epoch = %s AND sensor = %s"
            " AND seq < %s AND vals ? %s ORDER BY seq DESC LIMIT %s",
            (device, epoch, sensor, before_seq, quantity, CONTEXT_ROWS),
        ).fetchall()
        ctx, cut, _ = _context_of([(seq, _values(v)) for seq, v in reversed(rows)], quantity,
                                  more=len(rows) == CONTEXT_ROWS)
        return ctx, cut

    def count(self, name: str, by: int = 1) -> None:
        """Add to a running total (outside any ingest transaction)."""
        def work(attempt: int) -> None:
            with self.conn.transaction():
                self._bump({name: by})

        self._run(work)

    def record_status(self, device: str, status: dict[str, object], received_ms: int) -> None:
        """Keep each device's latest heartbeat (or last will, merged over the last heartbeat)."""
        # A last will says only online: false; jsonb || keeps the figures it does not carry.
        merge = set(status) <= {"v", "online", "device"}

        def work(attempt: int) -> None:
            self.conn.execute(
                "INSERT INTO device_status VALUES (%s,%s,%s,%s) ON CONFLICT (device) DO UPDATE SET"
                " received_utc_ms = excluded.received_utc_ms, online = excluded.online,"
                " status = " + ("device_status.status::jsonb || excluded.status::jsonb" if merge
                                else "excluded.status"),
                (device, received_ms, int(bool(status.get("online"))), json.dumps(status)),
            )

        self._run(work)

    def dead_letter(
        self, topic: str, device: str | None, reason: str, payload: bytes, sha256: str, received_ms: int,
        *, once: bool = False, mid: int | None = None,
    ) -> None:
        self.dead_letter_many([DeadLetter(topic, device, reason, payload, sha256, received_ms, once, mid)])

    def dead_letter_many(self, items: Sequence[DeadLetter]) -> None:
        """Keep rejected uploads, all in one transaction (as SQLite: one commit for a flood of them)."""
        if not items:
            return

        def work(attempt: int) -> None:
            with self.conn.transaction():
                bumps = self._write_dead_letters(items)
                if bumps:
                    self._bump(bumps)

        self._run(work)

    def _insert_dead_letters(self, items: Sequence[DeadLetter]) -> None:
        if not items:
            return
        with self.conn.cursor() as cur:  # executemany pipelines: one round trip for the group, not one each
            cur.executemany(
                "WITH d AS (INSERT INTO dead_letters (received_utc_ms, topic, device, reason, sha256, payload)"
                " VALUES (%s,%s,%s,%s,%s,%s) RETURNING id)"
                " INSERT INTO dead_letters_unacked (id, run, mid) SELECT id, %s, %s FROM d",
                [(d.received_ms, d.topic, d.device, d.reason, d.sha256, d.payload, self.run, d.mid) for d in items])

    # -- reads --------------------------------------------------------------------

    def known_batches(self, batch_ids: list[str]) -> list[tuple[str, str]]:
        """(batch id, sha256) of those of ``batch_ids`` already committed."""
        rows = self.conn.execute(
            "SELECT batch_id, sha256 FROM batches WHERE batch_id = ANY(%s)", (list(batch_ids),)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]
