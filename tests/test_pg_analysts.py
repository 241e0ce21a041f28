"""PostgreSQL as a city's analysts use it (issue #17.1): typed view, same columns as SQLite,
and a second, read-only role made by ``datalab-receiver grant-reader``."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from receiver.cli import main
from receiver.store import SCHEMA_VERSION, SQLiteStore
from receiver.store_pg import PostgresStore
from tests.pg import PgCluster, pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)
from tests.test_receiver_store import T, batch, put


def _fill(store: Any) -> None:
    for first in range(0, 60, 10):
        put(store, batch(first, 10))


def _as(dsn: str, role: str) -> str:
    return dsn.replace("postgres@", f"{role}@", 1)


def test_observations_views_match_across_backends(pg_dsn: str, tmp_path: Path) -> None:
    lite, pg = SQLiteStore(tmp_path / "d.sqlite"), PostgresStore(pg_dsn)
    try:
        _fill(lite)
        _fill(pg)
        lite_cols = [r[1] for r in lite.conn.execute("PRAGMA table_info(observations)")]
        pg_cols = pg.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'datalab'"
            " AND table_name = 'observations' ORDER BY ordinal_position").fetchall()
        assert lite_cols == [c for c, _ in pg_cols]
        assert "unit" in lite_cols
        assert lite.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        types = dict(pg_cols)
        # what analysts do first: average a value over a time window, without casts
        assert types["value"] == types["raw_value"] == "double precision"
        assert types["time_utc"] == "timestamp with time zone"
        day = (T - T % 86_400_000, T - T % 86_400_000 + 86_400_000)
        cols = "device, seq, t_utc_ms, quantity, value, unit, quality, lat, lon, position, raw_value"
        q = f"SELECT {cols} FROM observations WHERE t_utc_ms >= ? AND t_utc_ms < ? ORDER BY device, seq, quantity"
        a = [tuple(r) for r in lite.conn.execute(q, day).fetchall()]
        b = [tuple(r) for r in pg.conn.execute(q.replace("?", "%s"), day).fetchall()]
        assert len(a) == 60 and a == b
        assert {r[5] for r in a} == {"µg/m³"}
        avg = pg.conn.execute("SELECT avg(value), min(time_utc) FROM observations WHERE quantity = 'pm25'"
                              " AND time_utc >= %s", (dt.datetime.fromtimestamp(T / 1000, dt.timezone.utc),)
                              ).fetchone()
        assert avg[0] == pytest.approx(sum(10.0 + i for i in range(60)) / 60)
        assert avg[1] == dt.datetime.fromtimestamp(T / 1000, dt.timezone.utc)
    finally:
        lite.close()
        pg.close()


def test_grant_reader_makes_a_read_only_analyst(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    _fill(store)
    store.close()
    # before: the second role sees nothing (the "relation does not exist")
    with psycopg.connect(_as(pg_dsn, "postgres"), autocommit=True) as admin:
        admin.execute("CREATE ROLE analyst LOGIN")
    with psycopg.connect(_as(pg_dsn, "analyst"), autocommit=True) as c, pytest.raises(psycopg.Error):
        c.execute("SELECT count(*) FROM observations")

    r = CliRunner().invoke(main, ["grant-reader", "--store", pg_dsn, "analyst"])
    assert r.exit_code == 0, r.output
    again = CliRunner().invoke(main, ["grant-reader", "--store", pg_dsn, "analyst"])  # idempotent
    assert again.exit_code == 0, again.output
    # a table the store's owner makes later (the maps' tables, partitions): readable too
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE datalab.made_later (x int)")
        admin.execute("INSERT INTO datalab.made_later VALUES (1)")

    with psycopg.connect(_as(pg_dsn, "analyst"), autocommit=True) as c:
        n, avg = c.execute("SELECT count(*), avg(value) FROM observations WHERE quantity = 'pm25'").fetchone()
        assert n == 60 and avg > 10
        assert c.execute("SELECT count(*) FROM samples").fetchone()[0] == 120
        assert c.execute("SELECT x FROM made_later").fetchone()[0] == 1
        for stmt in ("INSERT INTO counters VALUES ('x', 1)", "DELETE FROM samples",
                     "UPDATE batches SET device = 'y'", "CREATE TABLE mine (x int)"):
            with pytest.raises(psycopg.Error) as err:
                c.execute(stmt)
            assert isinstance(err.value, (psycopg.errors.InsufficientPrivilege,
                                          psycopg.errors.ReadOnlySqlTransaction)), stmt
        # even with the read-only default switched off, the grants refuse writes
        c.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO counters VALUES ('x', 1)")
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM datalab.counters WHERE name = 'x'").fetchone()[0] == 0


def test_grant_reader_refuses_bad_input(pg_dsn: str, tmp_path: Path) -> None:
    PostgresStore(pg_dsn).close()
    bad = CliRunner().invoke(main, ["grant-reader", "--store", pg_dsn, "Robert'); DROP TABLE samples;--"])
    assert bad.exit_code != 0 and "plain role name" in bad.output
    lite = CliRunner().invoke(main, ["grant-reader", "--store", str(tmp_path / "x.sqlite"), "analyst"])
    assert lite.exit_code != 0 and "PostgreSQL" in lite.output
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM datalab.samples").fetchone()[0] == 0


def test_grant_reader_as_the_stores_own_role_says_who_may(pg_dsn: str) -> None:
    """As on a real server (tests/test_platform_central.py): the owner may not make roles."""
    PostgresStore(pg_dsn).close()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE ROLE keeper LOGIN")  # no CREATEROLE, as install-central's datalab
    r = CliRunner().invoke(main, ["grant-reader", "--store", _as(pg_dsn, "keeper"), "analyst_k"])
    assert r.exit_code == 1 and "needs a PostgreSQL administrator" in r.output and "runuser -u postgres" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # one line, no traceback
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'analyst_k'").fetchone()[0] == 0


@pytest.mark.parametrize("bad", ["postgres", "public", "pg_monitor", "keeper", "keeper_friend", "table_owner"])
def test_grant_reader_refuses_roles_that_run_the_store(pg_dsn: str, bad: str) -> None:
    """Findings 1 and 10 of v17: the owner, a superuser, reserved roles or one owning store objects
    are refused with one line and exit 2, and the store's own role can still write afterwards."""
    k = f"keeper_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide: a name of this test's own
    bad = {"keeper": k, "keeper_friend": f"{k}_friend", "table_owner": f"{k}_tables"}.get(bad, bad)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {k} LOGIN")
        admin.execute(f"CREATE ROLE {k}_friend LOGIN IN ROLE {k}")
        admin.execute(f"CREATE ROLE {k}_tables LOGIN")
        admin.execute(f"GRANT CREATE ON DATABASE {admin.info.dbname} TO {k}")  # the store's owner, as installed
    PostgresStore(_as(pg_dsn, k)).close()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE datalab.side (x int)")
        admin.execute(f"ALTER TABLE datalab.side OWNER TO {k}_tables")
    r = CliRunner().invoke(main, ["grant-reader", "--store", pg_dsn, bad])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM pg_roles WHERE rolconfig IS NOT NULL AND rolname IN (%s, %s)",
                             (bad, k)).fetchone()[0] == 0  # nothing set on the refused role or the owner
    store = PostgresStore(_as(pg_dsn, k))
    try:
        put(store, batch(0, 3))  # the receiver's role still writes its store
    finally:
        store.close()


def test_postgis_layers_as_qgis_lists_them(pg_dsn: str, pg_cluster: PgCluster) -> None:  # noqa: F811
    assert pg_cluster.postgis, "the project's PostgreSQL install puts PostGIS in place (scripts/pg-install)"
    from receiver import dbapi
    from receiver.aggregate import Period, Rule, build
    from receiver.flag_policy import FlagPolicy
    from receiver.mapunits import make_snapper

    store = PostgresStore(pg_dsn)
    _fill(store)
    store.close()
    conn = dbapi.connect(pg_dsn)
    # The test's PM carries no RH (rh_missing, left out by default): kept here, the layers are the point.
    keep_wet = FlagPolicy(FlagPolicy().exclude, FlagPolicy().exclude_pm - {"rh_missing"})
    build(conn, make_snapper("h3:10"), [Period("all")], rule=Rule(1, 1), policy=keep_wet)
    # a map unit stored as GeoJSON text becomes a typed geometry as it is written
    layers = {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
        "SELECT f_table_name, f_geometry_column, type, srid FROM geometry_columns"
        " WHERE f_table_schema = 'datalab'").fetchall()}
    assert layers["observations_geom"] == ("geom", "POINT", 4326)
    assert layers["map_cells"] == ("geom", "POLYGON", 4326)
    assert layers["map_segments"] == ("geom", "LINESTRING", 4326)
    assert layers["positions"] == ("geom", "POINT", 4326)
    n_cells, valid = conn.execute("SELECT count(*), bool_and(ST_IsValid(geom)) FROM map_cells").fetchone()
    assert n_cells > 0 and valid
    # a point query an analyst would write: the values measured inside a published cell
    inside = conn.execute(
        "SELECT count(*) FROM observations_geom o JOIN map_cells c ON ST_Intersects(c.geom, o.geom)"
        " WHERE o.quantity = 'pm25'").fetchone()[0]
    mapped = conn.execute("SELECT sum(n_samples) FROM map_cells WHERE quantity = 'pm25'").fetchone()[0]
    assert inside == mapped > 50  # every value the map used lies in its cell
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    # an existing store opened again keeps its layers and its analysts' grants
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE ROLE viewer LOGIN")
    assert CliRunner().invoke(main, ["grant-reader", "--store", pg_dsn, "viewer"]).exit_code == 0
    PostgresStore(pg_dsn).close()  # recreates the views, as every receiver start does
    with psycopg.connect(_as(pg_dsn, "viewer"), autocommit=True) as c:
        placed = c.execute("SELECT count(*) FROM observations WHERE lat IS NOT NULL").fetchone()[0]
        assert c.execute("SELECT count(*) FROM observations_geom WHERE geom IS NOT NULL").fetchone()[0] == placed > 50
        assert c.execute("SELECT count(*) FROM map_cells").fetchone()[0] == n_cells


def test_samples_by_month_a_days_query_reads_one_partition(pg_dsn: str) -> None:
    from core.wire import content_hash, encode_batch

    store = PostgresStore(pg_dsn)
    _fill(store)  # 2026-09-21
    later = batch(0, 10, epoch="e2")
    shift = 50 * 86_400_000  # into November: October stays empty
    for smp in later.samples:
        smp.t_utc_ms += shift
    store.ingest(later, content_hash(encode_batch(later)), T + shift + 3_600_000)
    parts = [r[0] for r in store.conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'datalab.samples'::regclass").fetchall()]
    assert {"samples_y2026m09", "samples_y2026m11", "samples_undated"} <= set(parts)
    rows = dict(store.conn.execute("SELECT tableoid::regclass::text, count(*) FROM samples GROUP BY 1").fetchall())
    # each month split: the van's positions apart from its measured values (retention drops them whole)
    assert rows["samples_y2026m09_gps"] + rows["samples_y2026m09_rest"] == 120 and rows["samples_y2026m09_gps"] > 0
    assert rows["samples_y2026m11_gps"] + rows["samples_y2026m11_rest"] == 20
    assert "samples_undated" not in rows
    # a batch delivered again under another id (a re-sealed range) adds no sample twice
    assert put(store, batch(5, 10)).status == "stored"  # overlaps stored ticks 5-14: a new batch id
    assert store.conn.execute("SELECT count(*) FROM samples").fetchone()[0] == 140
    day = (T - T % 86_400_000, T - T % 86_400_000 + 86_400_000)
    plan = "\n".join(r[0] for r in store.conn.execute(
        "EXPLAIN SELECT avg(value) FROM observations WHERE quantity = 'pm25' AND t_utc_ms >= %s AND t_utc_ms < %s",
        day).fetchall())
    assert "samples_y2026m09" in plan and "samples_y2026m11" not in plan and "samples_undated" not in plan, plan
    n = store.conn.execute("SELECT count(*) FROM observations WHERE t_utc_ms >= %s AND t_utc_ms < %s",
                           day).fetchone()[0]
    assert n == 60
    store.close()


def _docs_psql() -> list[str]:
    """The psql statements of docs/datalab.md's example, as an analyst types them."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "datalab.md").read_text()
    block = text[text.index("**2. psql:**"):text.index("**3. QGIS:**")]
    stmts, cur = [], []
    for line in block.splitlines():
        if line.startswith("datalab=> "):
            if cur:
                stmts.append(" ".join(cur))
            cur = [line[len("datalab=> "):].strip()]
        elif cur and line.strip() and not line.startswith("```"):
            cur.append(line.strip())
        elif cur:
            stmts.append(" ".join(cur))
            cur = []
    return stmts


def test_the_docs_day_query_reads_one_month_as_the_analyst(pg_dsn: str) -> None:
    """v17 finding 3: the documented psql query prunes to the day's month, as the analyst runs it."""
    from core.wire import content_hash, encode_batch

    store = PostgresStore(pg_dsn)
    _fill(store)  # 2026-09-21
    later = batch(0, 10, epoch="e2")
    for smp in later.samples:
        smp.t_utc_ms += 50 * 86_400_000  # November
    store.ingest(later, content_hash(encode_batch(later)), T + 50 * 86_400_000 + 3_600_000)
    store.close()
    role = f"analyst_{uuid.uuid4().hex[:8]}"
    assert CliRunner().invoke(main, ["grant-reader", "--store", pg_dsn, role]).exit_code == 0
    gset, query = _docs_psql()[:2]
    assert gset.endswith("\\gset") and ":day" in query
    day_of_t = dt.datetime.fromtimestamp(T / 1000, dt.timezone.utc).date().isoformat()
    with psycopg.connect(_as(pg_dsn, role), autocommit=True) as c:
        day = c.execute(gset[: -len("\\gset")].replace("2026-11-24", day_of_t)).fetchone()[0]
        sql_text = query.replace(":day", str(day)).rstrip(";")
        plan = "\n".join(r[0] for r in c.execute("EXPLAIN " + sql_text).fetchall())
        rows = c.execute(sql_text).fetchall()
    scanned = {w for w in plan.replace("(", " ").split() if w.startswith("samples_")}
    assert scanned and all(w.startswith("samples_y2026m09") for w in scanned), plan
    assert rows and rows[0][3] > 0  # it finds the day's values


def test_rows_loaded_before_their_month_exists_move_into_it(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    t = 1_700_000_000_000  # 2023-11: no partition yet
    store.conn.execute("INSERT INTO samples (device, epoch, seq, sensor, t_utc_ms, vals) VALUES"
                       " ('van-9', 'e', 1, 'pm', %s, '{\"pm25\": 5}'), ('van-9', 'e', 2, 'pm', NULL, '{}')", (t,))
    where = "SELECT tableoid::regclass::text, count(*) FROM samples GROUP BY 1"
    assert dict(store.conn.execute(where).fetchall()) == {"samples_undated": 2}
    store._ensure_months([t])
    assert dict(store.conn.execute(where).fetchall()) == {"samples_undated": 1, "samples_y2023m11_rest": 1}
    store.close()
