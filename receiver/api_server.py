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

Not handled here, on purpose: TLS and per-client rate limits belong to the reverse proxy
in front (docs/datalab.md). A client trickling one byte at a time stays under the idle
timeout; the connection cap bounds what such clients can hold.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from waitress import wasyncore
from waitress.server import create_server


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
        self._server = create_server(
            app, map=self._map, sockets=[sock],
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
