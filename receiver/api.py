"""The DataLab read-only HTTP API and dashboard server.

Why the standard library (``http.server.ThreadingHTTPServer``) and not a framework:
the API is a dozen read-only GET routes over one database, served behind the
city's reverse proxy (TLS, rate limits) like the broker. The standard library
adds no dependency to the receiver, and a route table plus JSON is all it needs.

What is public and what is not (the privacy rule of docs/datalab.md):

* public: ``/api/v1/aggregates`` and ``/api/v1/catalog`` (published aggregates
  only), the SensorThings view ``/sta/v1.1/...`` of the same, and the dashboard's
  static files;
* token-protected: ``/api/v1/fleet`` (heartbeats per van) and
  ``/api/v1/tracks[/<device>]`` (raw per-van positions). The token comes in an
  ``Authorization: Bearer`` header only (never a query string, which ends up in
  logs), is compared in constant time, and is never logged. With no token
  configured the protected routes are closed, not open.

There is no audio anywhere in the store, so none can be served.
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import re
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from receiver import dbapi, sensorthings
from receiver.aggregate import QUANTITIES, parse_period
from receiver.export import AGG_FIELDS, aggregate_feature, catalog, iso_ms, published_aggregates, write_csv

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")
MAX_TRACK_POINTS = 50_000
TRACK_GAP_MS = 60_000  # a track line breaks where fixes stop for a minute


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class App:
    """The routes, independent of the HTTP plumbing (so tests can also call them directly)."""

    def __init__(self, store: str, *, token: str | None = None, web_dir: Path = WEB_DIR,
                 public_url: str | None = None, tz: str = "Europe/Amsterdam") -> None:
        self.store = store
        self._token = token.encode() if token else None
        self.web_dir = web_dir.resolve()
        self.public_url = public_url.rstrip("/") if public_url else None
        self.tz = tz
        self._local = threading.local()

    # -- plumbing ------------------------------------------------------------------------

    def conn(self) -> Any:
        """One read-only connection per server thread (sqlite3 and psycopg are not shared)."""
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = dbapi.connect(self.store, readonly=True)
        return c

    def check_token(self, authorization: str | None) -> None:
        if self._token is None:
            raise ApiError(403, "this route needs a token and none is configured on the server")
        given = b""
        if authorization and authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip().encode()
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(given, self._token):
            raise ApiError(401, "missing or wrong token", {"WWW-Authenticate": 'Bearer realm="datalab"'})

    # -- public --------------------------------------------------------------------------

    def aggregates(self, qs: dict[str, str]) -> tuple[str, bytes | dict[str, Any] | list[Any]]:
        fmt = qs.get("format", "geojson")
        if fmt not in ("geojson", "json", "csv"):
            raise ApiError(400, "format must be geojson, json or csv")
        quantity = qs.get("quantity")
        if quantity is not None and quantity not in QUANTITIES:
            raise ApiError(400, f"unknown quantity {quantity!r}; one of {', '.join(QUANTITIES)}")
        period = qs.get("period")
        if period is not None and period != "all":
            try:
                period = parse_period(period, self.tz).label
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
        rows = published_aggregates(self.conn(), scheme=qs.get("scheme"), period=period, quantity=quantity)
        if fmt == "csv":
            import io

            buf = io.StringIO()
            write_csv(rows, AGG_FIELDS, buf)
            return "text/csv; charset=utf-8", buf.getvalue().encode()
        if fmt == "json":
            return "application/json", [{k: v for k, v in r.items() if k != "geometry"} for r in rows]
        feats = [aggregate_feature(r) for r in rows]
        return "application/geo+json", {
            "type": "FeatureCollection",
            "properties": {"published_only": True, "scheme": qs.get("scheme"), "period": period,
                           "quantity": quantity, "count": len(feats)},
            "features": feats,
        }

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

    def track(self, device: str, qs: dict[str, str]) -> dict[str, Any]:
        where, params = ["device = ?"], [device]
        for key, op in (("from", ">="), ("to", "<")):
            if key in qs:
                where.append(f"t_utc_ms {op} ?")
                params.append(_time_ms(qs[key]))
        try:
            limit = min(int(qs.get("limit", MAX_TRACK_POINTS)), MAX_TRACK_POINTS)
        except ValueError as exc:
            raise ApiError(400, "limit must be an integer") from exc
        rows = dbapi.fetchall(
            self.conn(),
            f"SELECT t_utc_ms, lat, lon, speed_mps FROM fixes WHERE {' AND '.join(where)} ORDER BY t_utc_ms LIMIT ?",
            [*params, limit],
        )
        if not rows:
            raise ApiError(404, f"no track for {device!r} in that window")
        pieces: list[list[tuple[Any, ...]]] = [[rows[0]]]
        for prev, r in zip(rows, rows[1:]):
            if r[0] - prev[0] > TRACK_GAP_MS:
                pieces.append([])
            pieces[-1].append(r)
        feats = [
            {"type": "Feature",
             "geometry": {"type": "LineString" if len(p) > 1 else "Point",
                          "coordinates": [[r[2], r[1]] for r in p] if len(p) > 1 else [p[0][2], p[0][1]]},
             "properties": {"device": device, "start_utc": iso_ms(p[0][0]), "end_utc": iso_ms(p[-1][0]),
                            "t_utc_ms": [r[0] for r in p], "speed_mps": [r[3] for r in p]}}
            for p in pieces
        ]
        return {"type": "FeatureCollection", "properties": {"device": device, "points": len(rows),
                                                             "truncated": len(rows) == limit},
                "features": feats}


def _time_ms(text: str) -> int:
    """Epoch milliseconds or an ISO 8601 time (UTC when it has no offset)."""
    import datetime as dt

    if re.fullmatch(r"\d{10,14}", text):
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ApiError(400, f"cannot read time {text!r}: epoch ms or ISO 8601") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


class Handler(BaseHTTPRequestHandler):
    server_version = "datalab-api/1"
    app: App  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    # Never the default stderr line: it would show the path only, but keep it in logging,
    # and keep headers (the token) out of it by construction.
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        path = unquote(url.path)
        qs = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            self._route(path, qs)
        except ApiError as exc:
            self._json(exc.status, {"error": str(exc)}, exc.headers)
        except Exception:  # one bad request must not take the server down
            log.exception("error serving %s", url.path)
            self._json(500, {"error": "internal error"})

    def do_OPTIONS(self) -> None:  # noqa: N802
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route(self, path: str, qs: dict[str, str]) -> None:
        app = self.app
        if path in ("", "/"):
            return self._redirect("/web/")
        if path == "/web":
            return self._redirect("/web/")
        if path.startswith("/web/"):
            return self._static(path[len("/web/"):] or "index.html")
        if path.startswith("/sta/v1.1"):
            base = self._base_url()
            status, body = sensorthings.handle(app.conn(), path[len("/sta/v1.1"):], qs, base + "/sta/v1.1")
            return self._json(status, body, public=True)
        routes: dict[str, Callable[[], Any]] = {
            "/api/v1": lambda: {"routes": ROUTES},
            "/api/v1/health": lambda: {"ok": True, "time_utc": iso_ms(int(time.time() * 1000))},
            "/api/v1/catalog": app.catalog,
        }
        if path.rstrip("/") in routes:
            return self._json(200, routes[path.rstrip("/")](), public=True)
        if path == "/api/v1/aggregates":
            ctype, body = app.aggregates(qs)
            return self._send(200, ctype, body, public=True)
        if path == "/api/v1/fleet":
            app.check_token(self.headers.get("Authorization"))
            return self._json(200, app.fleet())
        if path.rstrip("/") == "/api/v1/tracks":
            app.check_token(self.headers.get("Authorization"))
            return self._json(200, app.track_list())
        m = re.fullmatch(r"/api/v1/tracks/([\w.\-]+)", path)
        if m:
            app.check_token(self.headers.get("Authorization"))
            return self._send(200, "application/geo+json", app.track(m.group(1), qs))
        raise ApiError(404, f"no route {path}")

    def _base_url(self) -> str:
        if self.app.public_url:
            return self.app.public_url
        host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        return f"http://{host}"

    def _static(self, rel: str) -> None:
        root = self.app.web_dir
        target = (root / rel).resolve()
        if root not in target.parents and target != root:  # no ../ out of the web folder
            raise ApiError(404, "not found")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            raise ApiError(404, "not found")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        self._send(200, ctype, target.read_bytes(), extra={
            # The dashboard loads nothing from elsewhere: it must work offline and leak nothing.
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'",
            "Cache-Control": "no-cache",
        })

    def _redirect(self, where: str) -> None:
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None, *, public: bool = False) -> None:
        self._send(status, "application/json", body, extra=headers, public=public)

    def _send(self, status: int, ctype: str, body: Any, *, extra: dict[str, str] | None = None,
              public: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if public:
            self.send_header("Access-Control-Allow-Origin", "*")
        else:
            self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


ROUTES = {
    "/api/v1/aggregates": "published aggregates; ?scheme=segment|h3:10&period=all|YYYY-MM|...&quantity="
                          "pm25|pm10|no2_ppb|laeq&format=geojson|json|csv",
    "/api/v1/catalog": "which schemes, periods and quantities are published",
    "/api/v1/fleet": "fleet status from the heartbeats (token)",
    "/api/v1/tracks": "vans with stored GPS fixes (token)",
    "/api/v1/tracks/<device>": "one van's track as GeoJSON; ?from=&to= (epoch ms or ISO)&limit= (token)",
    "/sta/v1.1": "SensorThings-style read-only view of the published aggregates",
    "/web/": "the dashboard",
}


def make_server(store: str, host: str = "127.0.0.1", port: int = 8080, **kw: Any) -> ThreadingHTTPServer:
    """A ready (not yet serving) server; ``port=0`` picks a free port."""
    app = App(store, **kw)
    handler = type("DataLabHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
