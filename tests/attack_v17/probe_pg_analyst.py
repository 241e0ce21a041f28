"""v17 attack on #17.1: PostgreSQL as a city's analysts meet it, set up as install-central does
(store owned by a NON-superuser role `datalab`, PostGIS created by the administrator, grant-reader
run as postgres), then read with psql (the docs' query, literally) and GDAL's PostgreSQL driver
(ogrinfo, what QGIS uses) as the analyst role.  My oracles: psql/ogrinfo output, pg_catalog.
"""
from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.pg import PgCluster, pg_cluster  # noqa: F401
from tests.test_receiver_store import T, batch, put

PROG = str(Path(sys.executable).with_name("datalab-receiver"))


def _url(cluster: PgCluster, user: str, db: str) -> str:
    return f"postgresql://{user}@127.0.0.1:{cluster.port}/{db}"


@pytest.fixture
def city(pg_cluster: PgCluster):  # noqa: F811
    db = f"dl_{uuid.uuid4().hex[:8]}"
    owner = f"datalab_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as a:
        a.execute(f"CREATE ROLE {owner} LOGIN")
        a.execute(f'CREATE DATABASE "{db}" OWNER {owner} TEMPLATE template0')
    with psycopg.connect(pg_cluster.dsn(db), autocommit=True) as a:
        a.execute("CREATE EXTENSION postgis")  # the administrator, as docs/datalab.md says
    from receiver.store_pg import PostgresStore
    s = PostgresStore(_url(pg_cluster, owner, db))
    for first in range(0, 60, 10):
        put(s, batch(first, 10))
    s.close()
    yield pg_cluster, db, owner
    pg_cluster.drop_database(db)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROG, *args], capture_output=True, text=True, timeout=timeout)


def test_docs_psql_query_literally_as_analyst(city) -> None:
    cluster, db, owner = city
    r = _cli("grant-reader", "--store", _url(cluster, "postgres", db), "analyst_a")
    assert r.returncode == 0, r.stdout + r.stderr
    day = dt.datetime.fromtimestamp(T / 1000, dt.timezone.utc).date()
    q = (f"select quantity, unit, round(avg(value)::numeric, 1), count(*) from observations "
         f"where time_utc >= '{day}' and time_utc < '{day + dt.timedelta(days=1)}' and quantity = 'pm25' "
         f"and position in ('exact', 'interpolated') group by quantity, unit;")
    p = subprocess.run(["psql", f"host=127.0.0.1 port={cluster.port} dbname={db} user=analyst_a",
                        "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", q], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    qty, unit, avg, n = p.stdout.strip().split("|")
    # oracle: put() wrote pm25 = 10 + t for t in 0..59; positioned ones are those with a fix after them
    assert qty == "pm25" and unit == "µg/m³" and 50 <= int(n) <= 60, p.stdout
    p2 = subprocess.run(["psql", f"host=127.0.0.1 port={cluster.port} dbname={db} user=analyst_a", "-X", "-A",
                         "-t", "-c", "select cell, value, n_passes from map_cells where quantity = 'laeq' and "
                         "published = 1 order by value desc limit 10;"], capture_output=True, text=True)
    print("map_cells query before any build:", p2.returncode, p2.stdout, p2.stderr)
    # writes refused
    for w in ["insert into calibrations default values", "delete from samples", "create table x (i int)",
              "set transaction read write; delete from samples"]:
        pw = subprocess.run(["psql", f"host=127.0.0.1 port={cluster.port} dbname={db} user=analyst_a", "-X",
                             "-c", w], capture_output=True, text=True)
        assert pw.returncode != 0 or "ERROR" in pw.stderr, (w, pw.stdout, pw.stderr)


def test_tables_made_later_by_the_receiver_role_readable_and_qgis_layers(city, tmp_path: Path) -> None:
    cluster, db, owner = city
    assert _cli("grant-reader", "--store", _url(cluster, "postgres", db), "analyst_b").returncode == 0
    # AFTER the grant, the store's own role makes the maps' tables (first build) and a new month
    r = _cli("aggregate", "--scheme", "h3:10", "--store", _url(cluster, owner, db), timeout=300)
    print("aggregate:", r.returncode, r.stdout[-400:], r.stderr[-800:])
    from receiver.store_pg import PostgresStore
    s = PostgresStore(_url(cluster, owner, db))
    b = batch(0, 5, epoch="far")
    for smp in b.samples:
        smp.t_utc_ms += 400 * 86_400_000  # a month with no partition yet
    put(s, b)
    s.close()
    with psycopg.connect(_url(cluster, "analyst_b", db), autocommit=True) as c:
        tabs = [t for (t,) in c.execute(
            "select c.relname from pg_class c join pg_namespace n on n.oid=c.relnamespace "
            "where n.nspname='datalab' and c.relkind in ('r','v','p','m') order by 1")]
        unreadable = []
        for t in tabs:
            try:
                c.execute(f'select 1 from datalab."{t}" limit 1')
            except psycopg.Error as e:
                unreadable.append((t, str(e).splitlines()[0]))
        assert not unreadable, unreadable
        n_far = c.execute("select count(*) from samples where epoch='far'").fetchone()[0]
        assert n_far == 10
    # the docs' second psql query, literally, after a build
    q2 = subprocess.run(["psql", f"host=127.0.0.1 port={cluster.port} dbname={db} user=analyst_b", "-X", "-A",
                         "-v", "ON_ERROR_STOP=1", "-c", "select cell, value, n_passes from map_cells where quantity = "
                         "'laeq' and published = 1 order by value desc limit 10;"], capture_output=True, text=True)
    print("docs map_cells query:", q2.returncode, q2.stdout[-200:], q2.stderr[-300:])
    assert q2.returncode == 0, q2.stderr
    # What QGIS lists: PostGIS' geometry_columns, read as the analyst
    with psycopg.connect(_url(cluster, "analyst_b", db), autocommit=True) as c:
        gc = {r[0]: (r[1], r[2], r[3]) for r in c.execute(
            "select f_table_name, type, srid, coord_dimension from geometry_columns where f_table_schema='datalab'")}
    print("geometry_columns:", gc)
    assert gc.get("observations_geom", (None, None))[:2] == ("POINT", 4326), gc
    assert gc.get("map_cells", (None, None))[:2] in (("POLYGON", 4326), ("MULTIPOLYGON", 4326)), gc
    assert gc.get("map_segments", (None, None))[:2] in (("LINESTRING", 4326), ("MULTILINESTRING", 4326)), gc
    # GDAL's PostgreSQL driver (what QGIS uses), as the analyst
    import shutil
    if not shutil.which("ogrinfo"):
        pytest.skip("no ogrinfo binary on this machine")
    og = subprocess.run(["ogrinfo", "-ro", "-so", f"PG:host=127.0.0.1 port={cluster.port} dbname={db} "
                         f"user=analyst_b schemas=datalab", "observations_geom"], capture_output=True, text=True)
    print(og.stdout[:1500], og.stderr[:500])
    assert og.returncode == 0, og.stderr
    assert "Geometry: Point" in og.stdout and ("4326" in og.stdout), og.stdout
    ls = subprocess.run(["ogrinfo", "-ro", "-q", f"PG:host=127.0.0.1 port={cluster.port} dbname={db} "
                         f"user=analyst_b schemas=datalab"], capture_output=True, text=True)
    print("layers:", ls.stdout)
    for lay, geom in (("map_cells", "Polygon"), ("map_segments", "Line String")):
        assert lay in ls.stdout, ls.stdout


def test_day_query_as_analyst_reads_one_month(city) -> None:
    cluster, db, owner = city
    assert _cli("grant-reader", "--store", _url(cluster, "postgres", db), "analyst_c").returncode == 0
    d = dt.datetime.fromtimestamp(T / 1000, dt.timezone.utc).date()
    with psycopg.connect(_url(cluster, "analyst_c", db), autocommit=True) as c:
        plan = "\n".join(r[0] for r in c.execute(
            f"explain select avg(value) from observations where time_utc >= '{d}' and time_utc < "
            f"'{d + dt.timedelta(days=1)}'"))
        lo = int(dt.datetime.combine(d, dt.time(), dt.timezone.utc).timestamp() * 1000)
        plan_ms = "\n".join(r[0] for r in c.execute(
            f"explain select avg(value) from observations where t_utc_ms >= {lo} and t_utc_ms < {lo + 86_400_000}"))
    print("by t_utc_ms:", sorted({w for w in plan_ms.replace("(", " ").split() if w.startswith("samples_")}))
    scanned = sorted({w for w in plan.replace("(", " ").split() if w.startswith("samples_")})
    print("by time_utc (the docs' psql example):", scanned)
    assert scanned and all("_rest" in w or w.startswith("samples_undated") for w in scanned), scanned
    assert len([w for w in scanned if "_rest" in w]) == 1, scanned


@pytest.mark.parametrize("bad", ["OWNER", "public", "pg_monitor", "postgres"])
def test_grant_reader_on_roles_it_must_not_touch(city, bad: str) -> None:
    """The store's own role (a slip: `grant-reader datalab`), reserved or predefined roles, the superuser."""
    cluster, db, owner = city
    role = owner if bad == "OWNER" else bad
    r = _cli("grant-reader", "--store", _url(cluster, "postgres", db), role)
    out = r.stdout + r.stderr
    print(bad, r.returncode, out[-600:])
    assert "Traceback" not in out, out
    # whatever it answered, the receiver's own role must still be able to write its store
    from receiver.store_pg import PostgresStore
    s = PostgresStore(_url(cluster, owner, db))
    try:
        put(s, batch(100, 3))
    finally:
        s.close()
    with psycopg.connect(_url(cluster, "postgres", db), autocommit=True) as a:
        ro = a.execute("select rolname, rolconfig from pg_roles where rolconfig is not null").fetchall()
    print("role settings:", ro)
    assert r.returncode != 0 or bad not in ("OWNER", "postgres"), f"grant-reader accepted {role!r}: {out}"
