"""Serving the API (``receiver/api.py``) on the open internet: waitress, with every limit set.

Why waitress and not the standard library's ``ThreadingHTTPServer``: that one starts a
thread per connection and never times an idle one out, so 50 silent clients held 50
threads (and their store handles) for as long as they liked. Waitress is a maintained,
pure-Python WSGI server (no compiler, runs on a Pi) whose I/O loop holds idle and
half-sent requests without a thread; only a complete request is handed to a fixed pool
of worker threads. It caps open connections (beyond the cap it stops accepting, and the
kernel queues newcomers), closes connections idle for ``channel_timeout_s``, and limits
header and body sizes. Writing that ourselves would be a small web server to maintain.

``ApiServer`` keeps the ``serve_forever`` / ``shutdown`` / ``server_close`` /
``server_address`` shape of ``socketserver``, so callers and tests start it in a thread.

Two limits waitress lacks are added here (issue 13, 8: 210 connections each sending one
header line every 20 s kept every normal request waiting, since none of them was ever idle):

* a deadline for a whole request (``request_timeout_s`` from its first byte): a client that
  trickles a header line now and then is closed when it passes, however active it looks;
* a cap on open connections per client address (``per_address_limit``): beyond it a new
  connection is answered 429 and closed at once, so one address cannot fill the global cap.

Not handled here, on purpose: TLS, per-client rate limits and attacks from many addresses
belong to the reverse proxy in front (docs/datalab.md). Behind such a proxy every
connection comes from the proxy's address: raise ``per_address_limit`` to the connection
limit there (or 0, off) and let the proxy limit per client.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

log = logging.getLogger(__name__)
_REFUSED = b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class WsgiApp(Protocol):
    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServerLimits:
    threads: int = 8  # worker threads, and so at most this many store handles
    connection_limit: int = 200  # open connections, idle ones included
    channel_timeout_s: int = 30  # an idle connection is closed after this long
    cleanup_interval_s: int = 5  # how often idle connections are looked for
    backlog: int = 128  # connections the kernel queues while the cap is reached
    max_request_header_bytes: int = 16 * 1024
    max_request_body_bytes: int = 64 * 1024  # a read-only API: GETs carry no body
    # A request's headers (and body) must be complete this long after its first byte.
    request_timeout_s: float = 10.0
    # Open connections per client address (0 = no cap: behind a proxy, which limits per client).
    per_address_limit: int = 16


class _DeadlineChannel(HTTPChannel):
    """A connection that remembers when the request it is reading began."""

    request_started: float | None = None  # wall clock, as waitress's own last_activity

    def received(self, data: bytes) -> bool:
        result = super().received(data)
        if self.request is None:  # nothing half-read: the next request's clock starts at its first byte
            self.request_started = None
        elif self.request_started is None:
            self.request_started = time.time()
        return bool(result)


class _GuardedServer(TcpWSGIServer):
    """waitress's TCP server with the request deadline and the per-address cap."""

    channel_class = _DeadlineChannel

    def __init__(self, *args: Any, request_timeout_s: float, per_address_limit: int, **kw: Any) -> None:
        self.request_timeout_s = request_timeout_s
        self.per_address_limit = per_address_limit
        self._refused_logged = 0.0
        super().__init__(*args, **kw)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # the idle timeout
        cutoff = now - self.request_timeout_s
        for channel in list(self.active_channels.values()):
            started = getattr(channel, "request_started", None)
            if started is not None and started < cutoff and not channel.will_close:
                channel.will_close = True  # closed at the next turn of the loop
                log.info("closed %s: request not complete %g s after its first byte",
                         channel.addr[0] if channel.addr else "?", self.request_timeout_s)  # fmt: skip

    def handle_accept(self) -> None:
        try:
            v = self.accept()
            if v is None:
                return
            conn, addr = v
            self.set_socket_options(conn)
        except OSError:
            return  # the peer is already gone (see waitress's own handle_accept)
        host = addr[0] if isinstance(addr, tuple) else addr
        if self.per_address_limit and sum(
            1 for ch in self.active_channels.values() if ch.addr and ch.addr[0] == host
        ) >= self.per_address_limit:
            try:
                conn.setblocking(False)
                conn.send(_REFUSED)  # a fresh socket's send buffer takes it at once
            except OSError:
                pass
            conn.close()
            now = time.monotonic()
            if now - self._refused_logged > 10:  # one line per 10 s, not one per connection
                self._refused_logged = now
                log.warning("%s holds %d connections: refusing more", host, self.per_address_limit)
            return
        self.channel_class(self, conn, addr, self.adj, map=self._map)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ApiServer:
    """A waitress server for one WSGI app, started with ``serve_forever`` in any thread."""

    def __init__(self, app: WsgiApp, host: str, port: int, limits: ServerLimits) -> None:
        self.app = app
        self.limits = limits
        sock = _listen(host, port, limits.backlog)
        self.server_address: tuple[str, int] = sock.getsockname()[:2]
        self._map: dict[int, Any] = {}
        adj = Adjustments(
            threads=limits.threads,
            connection_limit=limits.connection_limit,
            channel_timeout=limits.channel_timeout_s,
            cleanup_interval=limits.cleanup_interval_s,
            backlog=limits.backlog,
            max_request_header_size=limits.max_request_header_bytes,
            max_request_body_size=limits.max_request_body_bytes,
            asyncore_use_poll=True,  # select() fails past 1024 descriptors
            expose_tracebacks=False,
            ident="datalab-api",
        )
        self._server = _GuardedServer(
            app, map=self._map, _sock=sock, adj=adj, bind_socket=False,
            sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
            request_timeout_s=limits.request_timeout_s, per_address_limit=limits.per_address_limit,
        )  # fmt: skip
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._serving = False
        self._closed = False

    def serve_forever(self) -> None:
        self._serving = True
        try:
            while not self._stop.is_set():
                wasyncore.loop(timeout=1.0, map=self._map, use_poll=True, count=1)
        finally:
            self._close()
            self._stopped.set()

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to return; safe from a signal handler (sets a flag, wakes the poll)."""
        self._stop.set()
        if not self._closed:
            self._server.pull_trigger()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (from another thread) and wait until it has."""
        self.request_stop()
        if self._serving:
            self._stopped.wait(10)

    def server_close(self) -> None:
        if not self._serving:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        wasyncore.close_all(self._map)  # the listening socket, the trigger and every open connection
        self.app.close()
