"""Every route and every query parameter of the API, fuzzed over real HTTP: never a 5xx.

Hypothesis builds requests from the route table (API, tracks, SensorThings entity sets,
ids and navigation properties, the dashboard's files) with parts that are valid, nearly
valid or hostile: any Unicode (NUL and control characters included), bytes that are not
UTF-8, negative, huge and odd numbers (``-1``, 400 digits, ``1_000``, Arabic-Indic digits),
other methods. Each request goes to the real waitress server on a free loopback port,
with the right token half the time so the protected routes are reached, on SQLite and on
a throwaway PostgreSQL (which refuses NUL in text, so it finds what SQLite lets pass).
A second test sends raw bytes in the request line, below what an HTTP client would send.
"""

from __future__ import annotations

import collections
import http.client
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver import dbapi, sensorthings
from receiver.api import make_server
from receiver.api_server import ServerLimits
from tests.datalab_synth import copy_to_postgres, make_store, with_aggregates
from tests.pg import pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)

TOKEN = "fuzz-token"
EXAMPLES = 300  # per backend and test, seconds; --run-slow runs LONG_EXAMPLES
LONG_EXAMPLES = 3_000
SETS = sorted(sensorthings.SETS)
NAVS = sorted({n for es in sensorthings.SETS.values() for n in es.nav})
PARAMS = ["format", "quantity", "scheme", "period", "from", "to", "limit", "$top", "$skip", "$count",
          "$expand", "$select", "$filter", "$orderby", "token"]
GOOD = ["segment", "h3:10", "all", "2026-11", "2026-11-02..2026-11-03", "2026-11-03", "pm25", "laeq", "no2_ppb",
        "csv", "json", "geojson", "true", "false", "Locations", "Datastreams", "Thing,Observations", "name",
        "2026-11-02T08:00:00Z", "1793606400000", "van-001", "5", "100", "10000"]
NUMBERS = ["-1", "0", "1", "-0", "+5", " 7", "1_000", "١٢", "0x10", "1e3", "9" * 30, "9" * 400,
           str(2**63), str(2**63 - 1), str(-(2**63)), "NaN", "inf"]


def _enc(part: str | bytes) -> str:
    """Percent-encode everything, so any text or byte string survives the HTTP client."""
    raw = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
    return "".join(f"%{b:02X}" for b in raw) if isinstance(part, bytes) else quote(raw, safe="")


hostile = st.one_of(st.text(max_size=30), st.binary(max_size=12))
odd_number = st.one_of(st.sampled_from(NUMBERS), st.integers(-(10**40), 10**40).map(str))
value = st.one_of(st.sampled_from(GOOD), st.sampled_from(NUMBERS), hostile, odd_number)
segment = st.one_of(hostile, st.sampled_from(["van-001", "van-002", "app.js", "index.html", "style.css", "..",
                                              "", "s012-0-004", "pm25", "no2_ppb", "datalab-mobile-median"])).map(_enc)
sta_id = st.one_of(segment.map(lambda s: f"('{s}')"), st.integers(-5, 10**20).map(lambda n: f"({n})"),
                   st.just(""), segment.map(lambda s: f"({s})"))

# 1. Free-form: any path below any route, any parameters.
free_paths = st.one_of(
    st.sampled_from(["/", "/web", "/web/", "/api/v1", "/api/v1/", "/api/v1/health", "/api/v1/catalog",
                     "/api/v1/aggregates", "/api/v1/fleet", "/api/v1/tracks", "/api/v1/tracks/van-001",
                     "/sta/v1.1", "/sta/v1.1/", *(f"/sta/v1.1/{s}" for s in SETS)]),
    segment.map(lambda s: f"/web/{s}"),
    segment.map(lambda s: f"/api/v1/{s}"),
    segment.map(lambda s: f"/api/v1/tracks/{s}"),
    st.builds(lambda es, id_, nav: f"/sta/v1.1/{es}{id_}{nav}", st.sampled_from([*SETS, "Vans"]), sta_id,
              st.one_of(st.just(""), st.sampled_from(NAVS).map(lambda n: f"/{n}"), segment.map(lambda s: f"/{s}"))),
    segment.map(lambda s: f"/sta/v1.1/{s}"),
    segment.map(lambda s: f"/{s}"),
)
free_queries = st.lists(st.tuples(st.one_of(st.sampled_from(PARAMS), hostile), value), max_size=4).map(
    lambda kv: "&".join(f"{_enc(k)}={_enc(v)}" for k, v in kv))
free_form = st.tuples(free_paths, free_queries)

# 2. A valid request with some parts made hostile, so the fuzz gets past the first
# check and reaches the queries behind it. Ids are real ones from the store (REAL_IDS).
STA_OPTIONS = {"$top": ["1", "5", "100", "10000"], "$skip": ["0", "3", "100000"], "$count": ["true", "false"],
               "$expand": NAVS, "$select": ["name", "@iot.id,result", "unitOfMeasurement"]}
VALID_ROUTES: list[tuple[str, dict[str, list[str]]]] = [
    ("/api/v1/aggregates", {"scheme": ["segment", "h3:10"], "period": ["all", "2026-11", "2026-11-02..2026-11-03"],
                            "quantity": ["pm25", "pm10", "no2_ppb", "laeq"], "format": ["geojson", "json", "csv"]}),
    ("/api/v1/catalog", {}), ("/api/v1/health", {}), ("/api/v1/fleet", {}), ("/api/v1/tracks", {}),
    ("/api/v1/tracks/{van}", {"from": ["2026-11-02T00:00:00Z", "1793606400000", "2026-11-03"],
                              "to": ["2026-11-04T00:00:00+01:00", "1893606400000"], "limit": ["1", "100", "60000"]}),
    ("/sta/v1.1/{set}", STA_OPTIONS),
    ("/sta/v1.1/{set}('{id}')", {"$expand": NAVS, "$select": STA_OPTIONS["$select"]}),
    ("/sta/v1.1/{set}('{id}')/{nav}", STA_OPTIONS),
    ("/web/{file}", {}),
]
REAL_IDS: dict[str, str] = {}


@st.composite
def one_wrong(draw: st.DrawFn) -> tuple[str, str]:
    template, options = draw(st.sampled_from(VALID_ROUTES))
    es = draw(st.sampled_from(SETS))
    part = {"set": es, "van": draw(st.sampled_from(["van-001", "van-002"])),
            "id": quote(REAL_IDS[es], safe=":"), "nav": draw(st.sampled_from(sorted(sensorthings.SETS[es].nav))),
            "file": draw(st.sampled_from(["", "index.html", "app.js", "style.css"]))}
    params: dict[str | bytes, str | bytes] = {}
    for k, choices in options.items():
        how = draw(st.sampled_from(["leave out", "valid", "valid", "hostile"]))
        if how == "valid":
            params[k] = draw(st.sampled_from(choices))
        elif how == "hostile":  # numbers get odd numbers, most of the time
            numeric = choices[0].isdigit()
            params[k] = draw(st.one_of(odd_number, odd_number, hostile) if numeric else st.one_of(hostile, odd_number))
    wrong = draw(st.sampled_from(["nothing", "nothing", "name", "path"]))
    if wrong == "name":
        params[draw(hostile)] = draw(value)
    elif wrong == "path":
        key = draw(st.sampled_from(sorted(part)))
        part[key] = _enc(draw(hostile))
    query = "&".join(f"{_enc(k)}={_enc(v)}" for k, v in params.items())
    return template.format(**part), query


requests = st.one_of(free_form, one_wrong(), one_wrong())
methods = st.sampled_from(["GET"] * 20 + ["HEAD", "POST", "OPTIONS", "DELETE", "PATCH"])


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = with_aggregates(make_store(tmp_path_factory.mktemp("fuzz") / "datalab.sqlite"))
    conn = dbapi.connect(path)
    for es in SETS:  # one real id per entity set, for the fuzz's valid requests
        REAL_IDS[es] = next(sensorthings.handle(conn, f"/{es}", {"$top": "1"}, "")[1]["value"])["@iot.id"]
    conn.close()
    return path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def base(request: pytest.FixtureRequest, sqlite_store: Path) -> Iterator[tuple[str, int]]:
    store, db = str(sqlite_store), ""
    if request.param == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        db = f"t_fuzz_{uuid.uuid4().hex[:8]}"
        store = cluster.create_database(db)
        copy_to_postgres(sqlite_store, store)
    server = make_server(store, "127.0.0.1", 0, token=TOKEN, limits=ServerLimits(threads=2))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield request.param, server.server_address[1]
    server.shutdown()
    if db:
        cluster.drop_database(db)


class Client:
    """One keep-alive connection, opened anew when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def send(self, method: str, target: str, authorized: bool) -> tuple[int, str, bytes]:
        headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else {}
        for attempt in (1, 2):
            try:
                self.conn.request(method, target, headers=headers)
                r = self.conn.getresponse()
                body = r.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt == 2:
                    raise
        if (r.getheader("Connection") or "").lower() == "close":
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        return r.status, r.getheader("Content-Type") or "", body


# Each fuzz test at CI size, and at LONG_EXAMPLES with --run-slow.
SIZES = [pytest.param(EXAMPLES, id="ci"), pytest.param(LONG_EXAMPLES, id="long", marks=pytest.mark.slow)]


@pytest.mark.parametrize("examples", SIZES)
def test_no_route_and_no_parameter_gives_a_5xx(base: tuple[str, int], examples: int) -> None:
    fuzz(*base, examples)


def fuzz(backend: str, port: int, examples: int) -> None:
    seen: collections.Counter[int] = collections.Counter()
    routes_ok: set[str] = set()
    client = Client(port)

    # derandomize: the routes this run reaches (asserted below) must not depend on the draw.
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(method=methods, request=requests, authorized=st.booleans())
    def one(method: str, request: tuple[str, str], authorized: bool) -> None:
        path, query = request
        target = path + (f"?{query}" if query else "")
        status, ctype, body = client.send(method, target, authorized)
        seen[status] += 1
        assert status < 500, f"{method} {target} -> {status} {body[:300]!r}"
        if status == 200 and method == "GET" and "json" in ctype:
            json.loads(body)  # a complete document, also when streamed
            routes_ok.add("/".join(path.split("(")[0].split("/")[:4]))  # /api/v1/tracks, /sta/v1.1/Things

    one()
    client.conn.close()
    print(f"{backend}: {sum(seen.values())} fuzzed requests, statuses {dict(sorted(seen.items()))}; "
          f"answered 200 with JSON: {sorted(routes_ok)}")
    assert not [s for s in seen if s >= 500]
    # The fuzz reached the routes, not only the error paths.
    assert seen[200] >= examples // 10 and seen[400] >= 10 and seen[404] >= 10
    assert {"/api/v1/aggregates", "/api/v1/tracks"} <= routes_ok
    assert len({r for r in routes_ok if r.startswith("/sta/v1.1/") and r != "/sta/v1.1/"}) >= 3


# Every (route, parameter) pair, on an otherwise valid request, with any value at all.
PAIRS = sorted({(template, name) for template, options in VALID_ROUTES for name in options})


@pytest.mark.parametrize("examples", SIZES)
def test_every_parameter_of_every_route_with_any_value(base: tuple[str, int], examples: int) -> None:
    every_parameter(*base, examples)


def every_parameter(backend: str, port: int, examples: int) -> None:
    client = Client(port)
    pairs_seen: collections.Counter[tuple[str, str]] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(pair=st.sampled_from(PAIRS), es=st.sampled_from(SETS),
           v=st.one_of(st.sampled_from(NUMBERS), odd_number, hostile, st.text(max_size=2000)))
    def one(pair: tuple[str, str], es: str, v: str | bytes) -> None:
        template, name = pair
        path = template.format(set=es, van="van-001", id=quote(REAL_IDS[es], safe=":"),
                               nav=sorted(sensorthings.SETS[es].nav)[0], file="")
        target = f"{path}?{_enc(name)}={_enc(v)}"
        status, ctype, body = client.send("GET", target, True)
        pairs_seen[pair] += 1
        statuses[status] += 1
        assert status < 500, f"GET {target[:300]} -> {status} {body[:300]!r}"
        if status == 200 and name in ("limit", "$top") and "json" in ctype:
            doc = json.loads(body)
            n = doc["metadata"]["points"] if name == "limit" else len(doc.get("value", []))
            assert n <= (50_000 if name == "limit" else sensorthings.MAX_TOP)  # no way around the caps

    one()
    client.conn.close()
    print(f"{backend}: {sum(pairs_seen.values())} requests over {len(pairs_seen)} of {len(PAIRS)} "
          f"(route, parameter) pairs, statuses {dict(sorted(statuses.items()))}")
    assert len(pairs_seen) == len(PAIRS)


@pytest.fixture(scope="module")
def raw_port(sqlite_store: Path) -> Iterator[int]:
    server = make_server(str(sqlite_store), "127.0.0.1", 0, token=TOKEN, limits=ServerLimits(threads=2))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@settings(max_examples=150, deadline=None, database=None)
@given(raw=st.binary(min_size=1, max_size=40).filter(lambda b: not set(b) & {0x20, 0x0D, 0x0A}),
       prefix=st.sampled_from([b"/", b"/web/", b"/api/v1/", b"/api/v1/tracks/", b"/sta/v1.1/Things('",
                               b"/api/v1/aggregates?scheme=", b"/sta/v1.1/Things?$top="]))
def test_raw_bytes_in_the_request_line_get_4xx(raw_port: int, raw: bytes, prefix: bytes) -> None:
    with socket.create_connection(("127.0.0.1", raw_port), timeout=30) as s:
        s.sendall(b"GET " + prefix + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = s.recv(64)
    assert head.startswith(b"HTTP/1.1 "), head
    assert int(head[9:12]) < 500, (prefix + raw, head)
