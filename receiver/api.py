"""The DataLab read-only HTTP API and dashboard, as one WSGI application.

The routes live here; ``receiver/api_server.py`` serves them with waitress (bounded
thread pool, connection cap, idle timeout). Keeping the two apart means the routes
can be called in-process (``App(...)(environ, start_response)``) and the server
can be swapped without touching them.

What is public and what is not (the privacy rule of docs/datalab.md):

* public: ``/api/v1/aggregates`` and ``/api/v1/catalog`` (published aggregates
  only), the SensorThings view ``/sta/v1.1/...`` of the same, and the dashboard's
  static files;
* token-protected: ``/api/v1/fleet`` (heartbeats per van) and
  ``/api/v1/tracks[/<device>]`` (raw per-van positions). The token comes in an
  ``Authorization: Bearer`` header only (never a query string, which ends up in
  logs), is compared in constant time, and is never logged. With no token
  configured the protected routes are closed, not open.

Hostile input gets a 4xx, never a 500: the path must be UTF-8 without control
characters, the query string is parsed strictly and bounded, every number is read
with a fixed pattern and a range (``limit=-1`` or a 400-digit ``$skip`` are errors,
not ways around a cap), and static files come from a fixed list of names. A store
that cannot be reached answers 503, and the thread's connection is opened anew on
the next request.

Large answers (tracks, aggregates) are written row by row from the database cursor
(``receiver/jsonstream.py``), so memory does not grow with the answer, and gzip-compressed
as they stream when the client accepts it (``receiver/compress.py``).

There is no audio anywhere in the store, so none can be served.
"""

from __future__ import annotations

import csv
import datetime as dt
import hmac
import io
import itertools
import json
import logging
import mimetypes
import re
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from receiver import dbapi, sensorthings
from receiver.aggregate import QUANTITIES, parse_period
from receiver.compress import accepts_gzip, gzip_chunks, worth_it
from receiver.export import AGG_FIELDS, aggregate_feature, catalog, iso_ms, published_aggregates
from receiver.jsonstream import Encoded, Later, encoded_items, iter_json
from receiver.store_factory import is_postgres_url

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")
MAX_TRACK_POINTS = 50_000
TRACK_GAP_MS = 60_000  # a track line breaks where fixes stop for a minute
MAX_QUERY_FIELDS = 32  # the widest route takes six parameters
MAX_PARAM_CHARS = 1_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"[a-z0-9][a-z0-9:_-]{0,31}")
_DEVICE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # ASCII only: a van id as provisioning writes it
_EPOCH_MS = re.compile(r"[0-9]{10,14}")
_LIMIT = re.compile(r"[0-9]{1,12}")
CSV_ROWS_PER_CHUNK = 500
StartResponse = Callable[..., Any]
_NAN = float("nan")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass
class Reply:
    """One answer: status, type and body chunks (a list when small, a generator when streamed)."""

    status: int
    ctype: str
    body: Iterable[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    public: bool = False
    length: int | None = None


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None, *, public: bool = False) -> Reply:
    data = json.dumps(body, ensure_ascii=False).encode()
    return Reply(status, "application/json", [data], dict(headers or {}), public, len(data))


def streamed_json(ctype: str, body: Any, *, public: bool = False) -> Reply:
    """A JSON answer written while the rows come in (chunked transfer, no Content-Length)."""
    return Reply(200, ctype, iter_json(body), public=public)


def _store_errors(store: str) -> tuple[type[BaseException], ...]:
    """What a store that is down, locked or missing raises (answered 503, not 500)."""
    errors: list[type[BaseException]] = [sqlite3.OperationalError, FileNotFoundError]
    if is_postgres_url(store):
        import psycopg

        errors.append(psycopg.OperationalError)
    return tuple(errors)


class App:
    """The routes as a WSGI application, independent of the server that runs them."""

    def __init__(self, store: str, *, token: str | None = None, web_dir: Path = WEB_DIR,
                 public_url: str | None = None, tz: str = "Europe/Amsterdam", basemap: Any = None) -> None:
        from receiver.basemap import Basemap

        self.store = store
        self.basemap = basemap or Basemap()  # under the data: tiles from a URL, else the streets
        self._token = token.encode() if token else None
        self.web_dir = web_dir.resolve()
        # A fixed list of names: no path from a request ever reaches the file system.
        self.static_files = {p.name: p for p in self.web_dir.iterdir() if p.is_file()}
        self.public_url = public_url.rstrip("/") if public_url else None
        self.tz = tz
        self._store_errors = _store_errors(store)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: dict[int, Any] = {}  # thread id -> connection, so close() reaches them all

    # -- store handles -------------------------------------------------------------------

    def conn(self) -> Any:
        """One read-only connection per server thread (sqlite3 and psycopg are not shared).

        The server's thread pool is fixed, so this is also the bound on open store handles.
        """
        c = getattr(self._local, "conn", None)
        if c is None:
            c = dbapi.connect(self.store, readonly=True)
            self._local.conn = c
            with self._lock:
                self._conns[threading.get_ident()] = c
        return c

    def _drop_conn(self) -> None:
        c = getattr(self._local, "conn", None)
        self._local.conn = None
        with self._lock:
            self._conns.pop(threading.get_ident(), None)
        if c is not None:
            try:
                c.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                log.debug("closing a broken store connection failed", exc_info=True)

    @property
    def open_handles(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            try:
                c.close()
            except Exception:
                log.debug("closing a store connection failed", exc_info=True)

    # -- WSGI ----------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = "?"
        try:
            path = _request_path(environ)
            if method == "OPTIONS":
                reply = Reply(204, "text/plain", [], {
                    "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization"}, length=0)
            elif method not in ("GET", "HEAD"):
                raise ApiError(405, "read-only API: GET, HEAD or OPTIONS", {"Allow": "GET, HEAD, OPTIONS"})
            else:
                reply = self.route(path, _query(environ.get("QUERY_STRING", "")), environ)
        except ApiError as exc:
            reply = json_reply(exc.status, {"error": str(exc)}, exc.headers)
        except Exception as exc:
            reply = self._failure(exc, path)
        log.info("%s %s %s %d", environ.get("REMOTE_ADDR", "-"), method, quote(path, safe="/:()'@,$=+*!~"),
                 reply.status)
        compressible = worth_it(reply.ctype, reply.length)
        gzip = compressible and accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING"))
        if compressible:  # either way the answer depends on Accept-Encoding: a cache must know (v17 #11)
            reply.headers = {**reply.headers, "Vary": "Accept-Encoding"}
        if gzip:  # receiver/compress.py: the large answers, compressed as they stream
            reply.length = None
            reply.headers = {**reply.headers, "Content-Encoding": "gzip"}
        start_response(f"{reply.status} {HTTPStatus(reply.status).phrase}", _headers(reply))
        if method == "HEAD":
            close = getattr(reply.body, "close", None)
            if close:
                close()
            return []
        body = self._guard(reply.body, path)
        return gzip_chunks(body) if gzip else body

    def _failure(self, exc: Exception, path: str) -> Reply:
        if isinstance(exc, self._store_errors):
            # Not the request's fault: say so, and reconnect on this thread's next request.
            log.warning("store unavailable while serving %s: %s", quote(path), exc)
            self._drop_conn()
            return json_reply(503, {"error": "the store is not reachable; try again shortly"}, {"Retry-After": "5"})
        log.exception("error serving %s", quote(path))  # a bug: logged in full, answered without details
        return json_reply(500, {"error": "internal error"})

    def _guard(self, body: Iterable[bytes], path: str) -> Iterator[bytes]:
        """Errors after the headers went out can only end the response; log them and reconnect."""
        try:
            yield from body
        except self._store_errors as exc:
            log.warning("store failed while streaming %s: %s", quote(path), exc)
            self._drop_conn()
        finally:
            close = getattr(body, "close", None)
            if close:
                close()

    # -- routing -------------------------------------------------------------------------

    def route(self, path: str, qs: dict[str, str], environ: dict[str, Any]) -> Reply:
        if path in ("", "/", "/web"):
            return Reply(302, "text/plain", [], {"Location": "/web/"}, length=0)
        if path.startswith("/web/"):
            return self.static(path[len("/web/"):] or "index.html")
        if path == "/sta/v1.1" or path.startswith("/sta/v1.1/"):
            status, body = sensorthings.handle(self.conn(), path[len("/sta/v1.1"):], qs,
                                               self._base_url(environ) + "/sta/v1.1")
            # A page's entities are written as their rows come (up to 10,000 of them).
            return streamed_json("application/json", body, public=True) if status == 200 else \
                json_reply(status, body, public=True)
        simple: dict[str, Callable[[], Any]] = {
            "/api/v1": lambda: {"routes": ROUTES},
            "/api/v1/health": lambda: {"ok": True, "time_utc": iso_ms(int(time.time() * 1000))},
            "/api/v1/catalog": self.catalog,
        }
        if path.rstrip("/") in simple:
            return json_reply(200, simple[path.rstrip("/")](), public=True)
        if path == "/api/v1/aggregates":
            return self.aggregates(qs)
        if path == "/api/v1/basemap":
            return self.basemap_reply(qs)
        auth = environ.get("HTTP_AUTHORIZATION")
        if path == "/api/v1/fleet":
            self.check_token(auth)
            return json_reply(200, self.fleet())
        if path.rstrip("/") == "/api/v1/tracks":
            self.check_token(auth)
            return json_reply(200, self.track_list())
        if path.startswith("/api/v1/tracks/"):
            self.check_token(auth)
            device = path[len("/api/v1/tracks/"):]
            if not _DEVICE.fullmatch(device):
                raise ApiError(404, "no such van")
            return self.track(device, qs)
        raise ApiError(404, "no such route; see /api/v1")

    def _base_url(self, environ: dict[str, Any]) -> str:
        if self.public_url:
            return self.public_url
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME')}:{environ.get('SERVER_PORT')}"
        return f"http://{host}"

    def check_token(self, authorization: str | None) -> None:
        if self._token is None:
            raise ApiError(403, "this route needs a token and none is configured on the server")
        given = b""
        if authorization and authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip().encode("utf-8", "replace")
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(given, self._token):
            raise ApiError(401, "missing or wrong token", {"WWW-Authenticate": 'Bearer realm="datalab"'})

    def static(self, name: str) -> Reply:
        target = self.static_files.get(name)
        if target is None:
            raise ApiError(404, "not found")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        data = target.read_bytes()
        return Reply(200, ctype, [data], {
            # The dashboard loads nothing from elsewhere: it must work offline and leak nothing.
            # A configured tile server is the one other origin admitted, for images only.
            "Content-Security-Policy": f"default-src 'self'; img-src {self.basemap.csp_img_src()}; style-src 'self'",
            "Cache-Control": "no-cache",
        }, length=len(data))

    # -- public --------------------------------------------------------------------------

    def aggregates(self, qs: dict[str, str]) -> Reply:
        fmt = qs.get("format", "geojson")
        if fmt not in ("geojson", "json", "csv"):
            raise ApiError(400, "format must be geojson, json or csv")
        quantity = qs.get("quantity")
        if quantity is not None and quantity not in QUANTITIES:
            raise ApiError(400, f"unknown quantity {quantity!r}; one of {', '.join(QUANTITIES)}")
        scheme = qs.get("scheme")
        if scheme is not None and not _SCHEME.fullmatch(scheme):
            raise ApiError(400, "scheme looks like segment or h3:10")
        period = qs.get("period")
        if period is not None and period != "all":
            try:
                period = parse_period(period, self.tz).label
            except (ValueError, OverflowError) as exc:
                raise ApiError(400, f"cannot read period: {exc}") from exc
        rows = _primed(published_aggregates(self.conn(), scheme=scheme, period=period, quantity=quantity))
        if fmt == "csv":
            return Reply(200, "text/csv; charset=utf-8", _csv_chunks(rows, AGG_FIELDS), public=True)
        if fmt == "json":
            return streamed_json("application/json",
                                 ({k: v for k, v in r.items() if k != "geometry"} for r in rows), public=True)
        counted = _Counter(rows)
        return streamed_json("application/geo+json", {
            "type": "FeatureCollection",
            "features": (aggregate_feature(r) for r in counted),
            # After the features: the count is known only once they are written. A foreign
            # member, not "properties": RFC 7946 (7.1) keeps that for Features.
            "metadata": Later(lambda: {"published_only": True, "scheme": scheme, "period": period,
                                         "quantity": quantity, "count": counted.n}),
        }, public=True)

    def basemap_reply(self, qs: dict[str, str]) -> Reply:
        from receiver.basemap import parse_bbox

        try:
            bbox = parse_bbox(qs.get("bbox"))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return json_reply(200, self.basemap.answer(bbox), public=True)

    def catalog(self) -> dict[str, Any]:
        return {
            "quantities": {k: {"label": q.label, "unit": q.unit} for k, q in QUANTITIES.items()},
            "published": catalog(self.conn()),
        }

    # -- protected -----------------------------------------------------------------------

    def fleet(self) -> dict[str, Any]:
        conn = self.conn()
        vans: dict[str, dict[str, Any]] = {}
        if dbapi.table_exists(conn, "device_status"):
            for device, received, online, status in dbapi.fetchall(
                conn, "SELECT device, received_utc_ms, online, status FROM device_status ORDER BY device"
            ):
                st = dbapi.decode_json(status) or {}
                errors = st.get("sensor_errors") or {}
                vans[device] = {
                    "device": device,
                    "last_contact_utc": iso_ms(received),
                    "last_contact_age_s": round(time.time() - received / 1000, 1) if received else None,
                    "online": bool(online),
                    "backlog_samples": st.get("backlog_samples"),
                    "backlog_batches": st.get("backlog_batches"),
                    "oldest_unsent_age_s": st.get("oldest_unsent_age_s"),
                    "sensor_errors": errors,
                    "sensor_health": "ok" if not any(errors.values()) else "errors",
                    "time_source": st.get("time_source"),
                    "disk_free_bytes": st.get("disk_free_bytes"),
                    "cpu_temp_c": st.get("cpu_temp_c"),
                    "buffer_full": st.get("buffer_full"),
                }
        # Stored data per van from ``batches`` (one row per batch: cheap, unlike scanning samples).
        for device, n, last in dbapi.fetchall(
            conn, "SELECT device, sum(n_samples), max(received_utc_ms) FROM batches GROUP BY device"
        ):
            v = vans.setdefault(device, {"device": device, "online": None, "sensor_health": "unknown"})
            v["samples_stored"] = int(n or 0)
            v["last_batch_utc"] = iso_ms(last)
        return {"generated_utc": iso_ms(int(time.time() * 1000)), "vans": sorted(vans.values(), key=lambda v: v["device"])}

    def track_list(self) -> dict[str, Any]:
        rows = dbapi.fetchall(
            self.conn(), "SELECT device, count(*), min(t_utc_ms), max(t_utc_ms) FROM fixes GROUP BY device ORDER BY device"
        )
        return {"devices": [{"device": d, "fixes": n, "first_utc": iso_ms(a), "last_utc": iso_ms(b)}
                            for d, n, a, b in rows]}

    def track(self, device: str, qs: dict[str, str]) -> Reply:
        where, params = ["device = ?"], [device]
        for key, op in (("from", ">="), ("to", "<")):
            if key in qs:
                where.append(f"t_utc_ms {op} ?")
                params.append(_time_ms(qs[key]))
        limit = _limit(qs.get("limit"), MAX_TRACK_POINTS)
        rows = _Counter(_iter_rows(  # peeks at the first row: a failing query fails here, before any byte
            self.conn(),
            f"SELECT t_utc_ms, lat, lon, speed_mps FROM fixes WHERE {' AND '.join(where)} ORDER BY t_utc_ms LIMIT ?",
            [*params, limit],
        ))
        if rows.empty:
            raise ApiError(404, f"no track for {device!r} in that window")
        return streamed_json("application/geo+json", {
            "type": "FeatureCollection",
            "features": _track_features(device, rows),
            # a foreign member, as the exports: RFC 7946 (7.1) keeps "properties" for Features
            "metadata": Later(lambda: {"device": device, "points": rows.n, "truncated": rows.n == limit}),
        })


# -- request parsing -------------------------------------------------------------------------


def _request_path(environ: dict[str, Any]) -> str:
    # PEP 3333: PATH_INFO is the percent-decoded bytes as latin-1; the API speaks UTF-8.
    raw = environ.get("PATH_INFO", "") or ""
    try:
        path = raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "the path is not UTF-8") from exc
    if _CONTROL.search(path):
        raise ApiError(400, "control characters in the path")
    return path


def _query(raw: str) -> dict[str, str]:
    """The query string, strictly: UTF-8, bounded, no control characters. Last value wins."""
    try:
        text = raw.encode("latin-1").decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS)
    except (UnicodeEncodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "the query string is not UTF-8") from exc
    except ValueError as exc:
        raise ApiError(400, f"too many query parameters (at most {MAX_QUERY_FIELDS})") from exc
    out: dict[str, str] = {}
    for k, v in pairs:
        if _CONTROL.search(k) or _CONTROL.search(v):
            raise ApiError(400, "control characters in the query string")
        if len(v) > MAX_PARAM_CHARS:
            raise ApiError(400, f"query parameter {k[:40]!r} is longer than {MAX_PARAM_CHARS} characters")
        out[k] = v
    return out


def _limit(text: str | None, cap: int) -> int:
    """A row limit: 1..cap. Larger asks get the cap (the answer says truncated); anything else is 400."""
    if text is None:
        return cap
    if not _LIMIT.fullmatch(text) or int(text) < 1:
        raise ApiError(400, f"limit must be a whole number from 1 (at most {cap} are returned)")
    return min(int(text), cap)


def _time_ms(text: str) -> int:
    """Epoch milliseconds or an ISO 8601 time (UTC when it has no offset)."""
    if _EPOCH_MS.fullmatch(text):
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        return int(t.timestamp() * 1000)
    except (ValueError, OverflowError, OSError) as exc:
        raise ApiError(400, f"cannot read time {text[:40]!r}: epoch ms or ISO 8601") from exc


def _headers(reply: Reply) -> list[tuple[str, str]]:
    h = [("Content-Type", reply.ctype), ("X-Content-Type-Options", "nosniff")]
    if reply.length is not None:
        h.append(("Content-Length", str(reply.length)))
    if reply.public:
        h.append(("Access-Control-Allow-Origin", "*"))
    else:
        h.append(("Cache-Control", "no-store"))
    h += [(k, v) for k, v in reply.headers.items() if not (k == "Cache-Control" and not reply.public)]
    return h


# -- streaming -------------------------------------------------------------------------------


def _iter_rows(conn: Any, sql: str, params: list[Any], batch: int = 500) -> Iterator[tuple[Any, ...]]:
    """Rows as the database hands them out, never all at once."""
    if dbapi.is_sqlite(conn):
        cur = dbapi.execute(conn, sql, params)
        while rows := cur.fetchmany(batch):
            yield from rows
    else:  # psycopg: a client cursor would load the whole result; stream() fetches row by row
        yield from conn.cursor().stream(dbapi.q(conn, sql), params)


def _primed(rows: Iterator[Any]) -> Iterator[Any]:
    """Run the query now (so a failure is answered with a status, not a cut-off body)."""
    first = list(itertools.islice(rows, 1))
    return itertools.chain(first, rows)


class _Counter:
    """Counts rows as they pass; ``empty`` peeks without losing the first."""

    def __init__(self, rows: Iterator[Any]) -> None:
        head = list(itertools.islice(rows, 1))
        self.empty = not head
        self._rows = itertools.chain(head, rows)
        self.n = 0

    def __iter__(self) -> Iterator[Any]:
        for r in self._rows:
            self.n += 1
            yield r


def _csv_chunks(rows: Iterator[dict[str, Any]], fields: tuple[str, ...]) -> Iterator[bytes]:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for i, r in enumerate(rows, 1):
        w.writerow(r)
        if i % CSV_ROWS_PER_CHUNK == 0:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode()


class _Piece:
    """One unbroken stretch of a track, written while it is read: coordinates go out at once
    (encoded a batch at a time); times and speeds, which follow them in the feature, wait in
    compact arrays (8 bytes a fix, not a Python object each); the first fix after a gap is
    handed to the next piece."""

    BATCH = 1000

    def __init__(self, first: tuple[Any, ...], rows: Iterator[tuple[Any, ...]]) -> None:
        self.last = first
        self.times = array("q")
        self.speeds = array("d")  # NaN stands for a missing speed
        self.after: tuple[Any, ...] | None = None
        self._rows = itertools.chain([first], rows)

    def coords(self) -> Iterator[Encoded]:
        batch: list[list[float]] = []
        for r in self._rows:
            if r[0] - self.last[0] > TRACK_GAP_MS:
                self.after = r
                break
            self.last = r
            self.times.append(r[0])
            self.speeds.append(_NAN if r[3] is None else r[3])
            batch.append([r[2], r[1]])
            if len(batch) == self.BATCH:
                yield encoded_items(batch)
                batch = []
        if batch:
            yield encoded_items(batch)

    def time_list(self) -> Iterator[Encoded]:
        for i in range(0, len(self.times), self.BATCH):
            yield encoded_items(self.times[i:i + self.BATCH].tolist())

    def speed_list(self) -> Iterator[Encoded]:
        for i in range(0, len(self.speeds), self.BATCH):
            yield encoded_items([None if v != v else v for v in self.speeds[i:i + self.BATCH]])


def _track_features(device: str, rows: Iterable[tuple[Any, ...]]) -> Iterator[dict[str, Any]]:
    it = iter(rows)
    row = next(it, None)
    while row is not None:
        nxt = next(it, None)
        if nxt is None or nxt[0] - row[0] > TRACK_GAP_MS:  # a lone fix is a Point
            yield {"type": "Feature", "geometry": {"type": "Point", "coordinates": [row[2], row[1]]},
                   "properties": {"device": device, "start_utc": iso_ms(row[0]), "end_utc": iso_ms(row[0]),
                                  "t_utc_ms": [row[0]], "speed_mps": [row[3]]}}
            row = nxt
            continue
        piece = _Piece(row, itertools.chain([nxt], it))  # the first row is its own: no gap to itself
        yield {"type": "Feature", "geometry": {"type": "LineString", "coordinates": piece.coords()},
               "properties": {"device": device, "start_utc": iso_ms(row[0]),
                              "end_utc": Later(lambda p=piece: iso_ms(p.last[0])),
                              "t_utc_ms": Later(lambda p=piece: p.time_list()),
                              "speed_mps": Later(lambda p=piece: p.speed_list())}}
        row = piece.after  # set once the writer has gone through the piece's coordinates


ROUTES = {
    "/api/v1/aggregates": "published aggregates; ?scheme=segment|h3:10&period=all|YYYY-MM|...&quantity="
                          "pm25|pm10|no2_ppb|laeq&format=geojson|json|csv",
    "/api/v1/catalog": "which schemes, periods and quantities are published",
    "/api/v1/basemap": "what the dashboard draws under the data: the tile URL, or the streets; ?bbox=w,s,e,n",
    "/api/v1/fleet": "fleet status from the heartbeats (token)",
    "/api/v1/tracks": "vans with stored GPS fixes (token)",
    "/api/v1/tracks/<device>": "one van's track as GeoJSON; ?from=&to= (epoch ms or ISO)&limit=1..50000 (token)",
    "/sta/v1.1": "SensorThings-style read-only view of the published aggregates",
    "/web/": "the dashboard",
}


def make_server(store: str, host: str = "127.0.0.1", port: int = 8080, *, limits: Any = None,
                **kw: Any) -> Any:
    """A ready (not yet serving) server; ``port=0`` picks a free port. See receiver/api_server.py."""
    from receiver.api_server import ApiServer, ServerLimits

    return ApiServer(App(store, **kw), host, port, limits or ServerLimits())
