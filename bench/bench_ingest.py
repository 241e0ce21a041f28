"""Ingest speed of the DataLab store: values per second into SQLite and PostgreSQL.

The load is what the receiver sees at city scale: sealed batches of 2000
samples (500 ticks of pm, no2, noise and gps from the value-level simulator,
mid-shift, about 3.9 values per sample) from 8 vans, handed to the store's own
``ingest`` by 1 or 2 worker processes. Each worker takes every other batch, as
a shared MQTT subscription would deal them out, so both workers see every van.

Every store figure stands beside a raw baseline measured in the same run, on
the same rows and the same machine, each worker loading its share in one
transaction:

* SQLite: ``sqlite3`` ``executemany`` of the sample rows into a table with the
  same primary key as ``samples``.
* PostgreSQL: ``COPY`` of the sample rows into a table with the same primary
  key (and, separately, into one without any index, for reference); also
  ``executemany`` (pipeline mode) of the same rows, the alternative to COPY.

The raw loader starts where the store starts, from the decoded samples: it
builds its rows (the values as JSON, with the store's own encoder) inside the
timed part, as any loader must. The same load from rows built before the
clock started is shown beside it (``vs_prebuilt``), as bench_buffer does.

The store figure is what the receiver must do before it may acknowledge a
batch (``ingest_many(derive=False)``, the workers' fast path): duplicate
check, the batch record, the raw samples, counters, the derive-queue entry,
and a commit for the uploads that queued up meanwhile (GROUP, as a loaded
worker takes them; every batch is committed before its ack). The target is at
least 0.7 of the raw speed, and 200,000 values/s into PostgreSQL. Beside it,
for the whole picture:

* ``per_batch``: one commit per batch, as when uploads trickle in one by one
  (PostgreSQL's fsync per commit is then most of the difference to raw);

* ``derive``: how fast derivers (1 or 2 processes) then add fixes, positions,
  calibrations and quality flags to those batches (``derive_pending``);
* ``inline``: storing and deriving in one transaction (``derive = "inline"``,
  the default for small fleets), i.e. the receiver as it was before the two
  stages.

PostgreSQL runs in a throwaway cluster (tests/pg.py) with its default, durable
settings (fsync and synchronous_commit on): the store commits every batch.
"Values" are the entries of the samples' value dicts.

    python bench/bench_ingest.py
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_wire import simulated_batch
from receiver.store import _json, _json_bytes
from core.wire import Batch, content_hash, encode_batch

VANS = 8
BATCHES_PER_VAN = 8
BATCH_SAMPLES = 2000
RECEIVED_MS = 1_795_600_000_000
PG_TARGET = 200_000.0
RATIO_TARGET = 0.7

_RAW_SAMPLES = """
CREATE TABLE raw_samples (
    device text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, sensor text NOT NULL,
    t_utc_ms bigint, t_mono_ms bigint, time_src text, boot_id text, vals {json}, flags text,
    batch_id text, received_utc_ms bigint{pk}
)"""
_PK = ", PRIMARY KEY (device, epoch, seq)"
_RAW_TYPES = ["text", "text", "int8", "text", "int8", "int8", "text", "text", "jsonb", "text", "text", "int8"]
# Uploads a loaded worker stores per transaction: the receiver takes what queued up while it
# committed the last group (receiver/mqtt_consumer.py), at most Mosquitto's default in-flight
# window of 20 messages per client; 16 here. ``per_batch`` rows show one commit per batch.
GROUP = 16
REPEATS = 3  # best of: the machine may be shared, and the best run is the least disturbed


def make_batches() -> list[Batch]:
    """``VANS`` vans, each a continuous stretch of a shift cut into sealed batches."""
    out: list[Batch] = []
    for v in range(VANS):
        run = simulated_batch(BATCHES_PER_VAN * BATCH_SAMPLES, seed=v + 1)
        dev = f"van-{v + 1:03d}"
        for i in range(BATCHES_PER_VAN):
            part = run.samples[i * BATCH_SAMPLES : (i + 1) * BATCH_SAMPLES]
            out.append(Batch(dev, run.epoch, part[0].seq or 0, part[-1].seq or 0, part))
    # deal the vans' batches out in time order, as they would arrive
    out.sort(key=lambda b: (b.first_seq, b.device))
    return out


def sample_rows(batches: list[Batch], *, as_bytes: bool = False) -> list[tuple[Any, ...]]:
    """The rows a raw loader writes: the store's samples columns, values as compact JSON.

    JSON made with the store's own encoder (``as_bytes`` for PostgreSQL's
    binary COPY), so that a raw loader and the store spend the same on it.
    """
    enc = _json_bytes if as_bytes else _json
    return [
        (b.device, b.epoch, s.seq, s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.boot_id,
         enc(s.values), ",".join(s.flags), b.batch_id, RECEIVED_MS)
        for b in batches for s in b.samples
    ]


def n_values(batches: list[Batch]) -> int:
    return sum(len(s.values) for b in batches for s in b.samples)


# -- what one worker does (run in a child process) ------------------------------------


def _store_work(target: str, share: list[Batch], derive: bool, group: int) -> Callable[[], None]:
    """The worker's ingest: ``group`` uploads per transaction (1: a commit per batch)."""
    from receiver.store_factory import open_store

    store = open_store(target)
    items = [(b, content_hash(encode_batch(b)), RECEIVED_MS) for b in share]

    def go() -> None:
        for i in range(0, len(items), group):
            for r in store.ingest_many(items[i : i + group], derive=derive):
                assert r.status == "stored", r
        store.close()

    return go


def _receive_work(target: str, share: list[Batch], group: int) -> Callable[[], None]:
    """The whole receive path as a worker runs it, from the bytes on the wire (issue #18 point 5):
    the memory budget's inflate, decode, validation, the store (one commit per ``group``) and
    the ack, encoded in the form the batch asks for. Payloads are encoded before the clock."""
    from core.wire import ack_version_for, encode_ack, inflate_body
    from receiver.ingest import Ingestor
    from receiver.store_factory import open_store

    store = open_store(target)
    ingestor = Ingestor(store, derive=False)  # the workers' fast path: derive after the ack
    msgs = [(f"datalab/v1/{b.device}/batch", encode_batch(b), RECEIVED_MS) for b in share]

    def go() -> None:
        for i in range(0, len(msgs), group):
            part = msgs[i : i + group]
            outcomes = ingestor.handle_many(part, inflated=[inflate_body(p) for _, p, _ in part])
            for (_, payload, _), o in zip(part, outcomes):
                assert o.ack is not None and o.ack.status == "stored", o
                encode_ack(o.ack, ack_version_for(payload))
        store.close()

    return go


def _derive_work(target: str) -> Callable[[], None]:
    from receiver.store_factory import open_store

    store = open_store(target)

    def go() -> None:
        store.derive_pending()
        store.close()

    return go


def _raw_sqlite_work(target: str, share: list[Batch], prebuilt: bool) -> Callable[[], None]:
    pre = sample_rows(share) if prebuilt else None
    conn = sqlite3.connect(target, isolation_level=None, timeout=60)
    conn.execute("PRAGMA synchronous=FULL")  # as SQLiteStore: acks rest on fsynced commits (WAL: set when the file was made)

    def go() -> None:
        rows = pre if pre is not None else sample_rows(share)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO raw_samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")
        conn.close()

    return go


def _raw_pg_work(target: str, share: list[Batch], how: str, table: str) -> Callable[[], None]:
    import psycopg

    from receiver.store_pg import _JsonbFromText, _JsonText

    prebuilt = how.endswith("-prebuilt")
    pre = sample_rows(share, as_bytes=True) if prebuilt else None
    conn = psycopg.connect(target)
    _JsonbFromText.oid = conn.adapters.types["jsonb"].oid  # jsonb from the JSON bytes, as the store
    conn.adapters.register_dumper(_JsonText, _JsonbFromText)

    def go() -> None:
        rows = pre if pre is not None else sample_rows(share, as_bytes=True)
        with conn.cursor() as cur:
            if how.startswith("copy"):  # binary, typed: the fastest COPY psycopg does (as the store)
                with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(_RAW_TYPES)
                    for r in rows:
                        cp.write_row(r)
            else:
                cur.executemany(f"INSERT INTO {table} VALUES ({', '.join(['%s'] * 8)}, %s::jsonb,"
                                f" {', '.join(['%s'] * 3)})", [(*r[:8], r[8].decode(), *r[9:]) for r in rows])
        conn.commit()
        conn.close()

    return go


def _raw_pg_store_work(target: str, share: list[Batch]) -> Callable[[], None]:
    """Binary COPY of pre-built rows into the store's own ``samples``: the partitioned table
    (month, then GPS / rest) with its indexes, through the store's connection and dumpers.
    The receive path's baseline on PostgreSQL (issue #18 point 1: the same table)."""
    from receiver.store_pg import _SAMPLE_COLS, PostgresStore

    rows = sample_rows(share, as_bytes=True)
    store = PostgresStore(target)

    def go() -> None:
        with store.conn.transaction():
            store._copy("samples", _SAMPLE_COLS, rows)
        store.close()

    return go


def _worker(kind: str, target: str, share: list[Batch], ready: Any, start: Any, out: Any) -> None:
    try:
        if kind in ("store", "store_inline"):
            go = _store_work(target, share, derive=kind == "store_inline", group=GROUP)
        elif kind == "receive":
            go = _receive_work(target, share, group=GROUP)
        elif kind == "store_per_batch":
            go = _store_work(target, share, derive=False, group=1)
        elif kind == "derive":
            go = _derive_work(target)
        elif kind == "raw_pg_store_prebuilt":
            go = _raw_pg_store_work(target, share)
        elif kind in ("raw_sqlite", "raw_sqlite_prebuilt"):
            go = _raw_sqlite_work(target, share, prebuilt=kind == "raw_sqlite_prebuilt")
        else:
            _, how, table = kind.split(":")
            go = _raw_pg_work(target, share, how, table)
        ready.release()
        start.wait()
        t0 = time.perf_counter()
        go()
        out.put((t0, time.perf_counter()))
    except BaseException as exc:  # report rather than leave the parent waiting
        out.put(repr(exc))
        ready.release()  # (if it failed while preparing, the parent is still waiting for this)
        raise


def best(kind: str, prepare: Callable[[], str], batches: list[Batch], workers: int) -> float:
    """The best of ``REPEATS`` runs, each into a fresh target from ``prepare()``."""
    return max(timed(kind, prepare(), batches, workers) for _ in range(REPEATS))


def timed(kind: str, target: str, batches: list[Batch], workers: int) -> float:
    """Values per second for ``workers`` processes, each loading every ``workers``-th batch."""
    ctx = mp.get_context("fork")  # children inherit the batches; no connection is open here
    ready, start, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(kind, target, batches[i::workers], ready, start, out))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()  # every worker connected and prepared: time the writing only
    start.set()
    spans = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    bad = [s for s in spans if isinstance(s, str)]
    if bad:
        raise RuntimeError(f"{kind} worker failed: {bad}")
    t0 = min(s[0] for s in spans)
    t1 = max(s[1] for s in spans)
    return n_values(batches) / (t1 - t0)


# -- the runs -------------------------------------------------------------------------


def _prefilled(open_target: Callable[[], str], batches: list[Batch]) -> str:
    """A store holding ``batches`` stored raw and queued: what the derivers start from."""
    from receiver.store_factory import open_store

    target = open_target()
    store = open_store(target)
    for b in batches:
        store.ingest(b, content_hash(encode_batch(b)), RECEIVED_MS, derive=False)
    store.close()
    return target


def _store_figures(store_db: Callable[[], str], batches: list[Batch], workers: int) -> dict[str, float]:
    return {
        "store": best("store", store_db, batches, workers),
        "store_per_batch": best("store_per_batch", store_db, batches, workers),
        "store_inline": best("store_inline", store_db, batches, workers),
        "derive": best("derive", lambda: _prefilled(store_db, batches), batches, workers),
    }


def _sqlite(tmp: Path, batches: list[Batch], workers: int) -> dict[str, float]:
    from receiver.store import SQLiteStore

    def raw_db() -> str:
        path = tmp / f"raw-{uuid.uuid4().hex}.sqlite"
        with sqlite3.connect(path) as c:
            c.execute("PRAGMA journal_mode=WAL")  # once, here: workers switching it at once lock each other out
            c.execute(_RAW_SAMPLES.format(json="text", pk=_PK))
        return str(path)

    def store_db() -> str:
        path = tmp / f"store-{uuid.uuid4().hex}.sqlite"
        SQLiteStore(path).close()  # the schema exists before the clock starts, as in service
        return str(path)

    return {"raw": best("raw_sqlite", raw_db, batches, workers),
            "raw_prebuilt": best("raw_sqlite_prebuilt", raw_db, batches, workers),
            **_store_figures(store_db, batches, workers)}


def _postgres(cluster: Any, batches: list[Batch], workers: int) -> dict[str, float]:
    import psycopg

    from receiver.store_pg import PostgresStore

    out: dict[str, float] = {}
    for how, table, pk in (("copy", "raw_samples", _PK), ("copy-prebuilt", "raw_samples", _PK),
                           ("copy", "raw_noidx", ""), ("executemany", "raw_exec", _PK)):
        def raw_db(table: str = table, pk: str = pk) -> str:
            dsn = cluster.create_database()
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(_RAW_SAMPLES.format(json="jsonb", pk=pk).replace("raw_samples", table))  # type: ignore[arg-type]
            return str(dsn)

        out[f"{how}:{table}"] = best(f"raw_pg:{how}:{table}", raw_db, batches, workers)

    def store_db() -> str:
        dsn = cluster.create_database()
        PostgresStore(dsn).close()
        return str(dsn)

    out["raw"] = out["copy:raw_samples"]
    out["raw_prebuilt"] = out["copy-prebuilt:raw_samples"]
    return {**out, **_store_figures(store_db, batches, workers)}


def receive_rows(workers: int = 1) -> list[dict]:
    """The receive path against a plain load of pre-built rows, on both stores (issue #18 point 5).

    The baseline loads into the table the store writes: on SQLite ``raw_samples`` has the
    store's ``samples`` layout (same columns, same primary key, no other index); on PostgreSQL
    it is the store's own partitioned ``samples`` (binary COPY, as the store), its month
    partitions made before the clock for both. The old baseline, an unpartitioned table, is
    shown beside it for comparison with earlier runs.

    ``python -m bench.bench_ingest --receive``: a minute or two, not the whole bench."""
    from receiver.store import SQLiteStore
    from receiver.store_pg import PostgresStore
    from tests.pg import PgCluster

    import psycopg

    batches = make_batches()
    rows: list[dict] = []

    def add(store: str, f: dict[str, float], raw_name: str) -> None:
        ratio = f["receive"] / f["raw_prebuilt"]
        rows.append({"name": f"ingest.{store}.{workers}w.receive_path", "value": round(f["receive"]),
                     "unit": f"values/s from wire bytes (v4) to ack; baseline {raw_name} of pre-built rows",
                     "baseline": round(f["raw_prebuilt"]), "target": f">= {RATIO_TARGET} x baseline",
                     "ok": ratio >= RATIO_TARGET, "note": f"ratio {ratio:.2f}; store alone "
                     f"{f['store'] / f['raw_prebuilt']:.2f} ({round(f['store'])} values/s)"})

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        def raw_db() -> str:
            path = Path(tmp) / f"raw-{uuid.uuid4().hex}.sqlite"
            with sqlite3.connect(path) as c:
                c.execute("PRAGMA journal_mode=WAL")
                c.execute(_RAW_SAMPLES.format(json="text", pk=_PK))
            return str(path)

        def store_db() -> str:
            path = Path(tmp) / f"store-{uuid.uuid4().hex}.sqlite"
            SQLiteStore(path).close()
            return str(path)

        add("sqlite", {"raw_prebuilt": best("raw_sqlite_prebuilt", raw_db, batches, workers),
                       "store": best("store", store_db, batches, workers),
                       "receive": best("receive", store_db, batches, workers)}, "executemany (FULL)")
    cluster = PgCluster(settings={}).start()  # durable defaults: fsync, synchronous_commit on
    try:
        def pg_raw() -> str:
            dsn = cluster.create_database()
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(_RAW_SAMPLES.format(json="jsonb", pk=_PK))  # type: ignore[arg-type]
            return str(dsn)

        def pg_store() -> str:
            # The schema and this load's month partitions exist before the clock, as in service
            # (a month is made once a month; the baseline loads into the same partitions).
            dsn = cluster.create_database()
            store = PostgresStore(dsn)
            store._ensure_months(s.t_utc_ms for b in batches for s in b.samples)
            store.close()
            return str(dsn)

        pg = {"raw_prebuilt": best("raw_pg_store_prebuilt", pg_store, batches, workers),
              "store": best("store", pg_store, batches, workers),
              "receive": best("receive", pg_store, batches, workers)}
        add("pg", pg, "binary COPY into the store's partitioned samples (fsync on)")
        # For comparison with earlier rows: the old baseline, a plain unpartitioned table.
        plain = best("raw_pg:copy-prebuilt:raw_samples", pg_raw, batches, workers)
        rows.append({"name": f"ingest.pg.{workers}w.receive_path.vs_plain_table", "value": round(pg["receive"]),
                     "unit": "values/s; baseline binary COPY of pre-built rows into an unpartitioned table",
                     "baseline": round(plain), "target": None, "ok": None,
                     "note": f"ratio {pg['receive'] / plain:.2f}"})
    finally:
        cluster.stop()
    return rows


def run() -> list[dict]:
    """Benchmark rows: name, value, unit, baseline, target, ok (None where only informative)."""
    from tests.pg import PgCluster

    batches = make_batches()
    nv = n_values(batches)
    rows: list[dict] = []

    def row(name: str, value: float, unit: str, baseline: float | None = None,
            target: str | None = None, ok: bool | None = None) -> None:
        rows.append({"name": name, "value": value, "unit": unit, "baseline": baseline,
                     "target": target, "ok": ok})

    def store_rows(prefix: str, w: int, f: dict[str, float], raw_name: str) -> None:
        row(f"{prefix}.{w}w", round(f["store"]), f"values/s stored and ackable (derive later); baseline {raw_name}",
            round(f["raw"]), f">= {RATIO_TARGET} x raw", f["store"] >= RATIO_TARGET * f["raw"])
        row(f"{prefix}.{w}w.vs_prebuilt", round(f["store"]),
            "values/s stored; baseline: the raw load of rows built before the clock started",
            round(f["raw_prebuilt"]), None, None)
        row(f"{prefix}.{w}w.per_batch", round(f["store_per_batch"]),
            "values/s, one commit per batch (uploads trickling in one by one)", round(f["raw"]))
        row(f"{prefix}.{w}w.derive", round(f["derive"]),
            f"values/s derived by {w} deriver(s) (fixes, positions, flags)", round(f["store"]))
        row(f"{prefix}.{w}w.inline", round(f["store_inline"]),
            "values/s stored and derived in one transaction (derive = inline)", round(f["raw"]))

    row("ingest.load", nv, f"values in {len(batches)} batches of {BATCH_SAMPLES} samples, {VANS} vans")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for w in (1, 2):
            store_rows("ingest.sqlite", w, _sqlite(Path(tmp), batches, w), "executemany")
    cluster = PgCluster(settings={}).start()  # durable defaults: fsync, synchronous_commit on
    try:
        for w in (1, 2):
            pg = _postgres(cluster, batches, w)
            store_rows("ingest.pg", w, pg, "COPY")
            row(f"ingest.pg.{w}w.absolute", round(pg["store"]), "values/s stored and ackable", None,
                f">= {PG_TARGET:,.0f}", pg["store"] >= PG_TARGET)
            row(f"ingest.pg.{w}w.raw_copy_noindex", round(pg["copy:raw_noidx"]),
                "values/s (reference: COPY, no index)")
            row(f"ingest.pg.{w}w.raw_executemany", round(pg["executemany:raw_exec"]),
                "values/s (reference: executemany, pipeline)", round(pg["raw"]))
    finally:
        cluster.stop()
    return rows


def main() -> None:
    from bench import print_table

    if "--receive" in sys.argv:
        print_table(receive_rows())
        return
    print_table(run())
    print("\nbaseline: the same samples loaded raw in one transaction per worker "
          "(sqlite3 executemany / PostgreSQL COPY, same primary key).")


if __name__ == "__main__":
    main()
