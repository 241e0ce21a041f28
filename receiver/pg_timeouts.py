"""PostgreSQL connections that cannot hang: every wait on the server has a bound.

A PostgreSQL that stops answering (SIGSTOP, a hung host, a network that drops
packets) used to go unnoticed: the kernel still accepts the TCP connection, so
a query or a connection attempt waited for ever, health said ``ok`` and
``stats`` hung (issue 13, 45 s SIGSTOP). Here every connection the receiver and
its commands open gets:

* ``connect_timeout`` (libpq, client side): a connection attempt gives up;
* TCP keepalives and ``tcp_user_timeout``: a dead peer or network is noticed;
* ``statement_timeout`` and ``lock_timeout`` (server side): a slow or blocked
  statement ends with a clean error and the connection stays usable;
* a client-side deadline (``Deadline``): a server that answers nothing at all
  (so its own statement_timeout never fires) gets its socket shut after the
  statement timeout plus a grace; the driver then fails with OperationalError.
  The deadline runs from the last statement's start or end, not from the start
  of a unit of work: a long ingest transaction (many statements, Python work
  between them) is never cut while the server keeps answering.

A frozen server is *seen* by the receiver's liveness probe (receiver/liveness.py,
``SELECT 1`` every few seconds under a deadline of its own), also when no upload
arrives; these bounds only end the calls that were waiting on it.

The defaults (5 s connect, 15 s statement, 5 s lock; issue 13 re-test: 10/30/10 made a
frozen server show after ~45 s) keep legitimate work well inside them. The longest
statement the receiver sends is one group's COPY and its commit: at most ``group_values``
(400,000) values and ``group_bytes`` (32 MiB) of text, which a PostgreSQL on ordinary
disks takes in one or two seconds, fsync included; 15 s leaves a wide margin for a
checkpoint or a slow disk, and a statement cut by it is retried (nothing lost), never
answered wrongly. Lock waits are short by design: rows locked by another receiver are
released within its own transaction.

All of these end in ``psycopg.OperationalError`` (QueryCanceled and
LockNotAvailable are subclasses), which the stores count as an outage.
Settings the DSN names itself are kept: ours are defaults.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DEADLINE_GRACE_S = 2.0  # the server's own statement_timeout should win when it can answer


@dataclass(frozen=True, slots=True)
class PgTimeouts:
    """Bounds for one connection; see receiver.example.toml ``store_*_timeout_s``."""

    connect_s: float = 5.0
    statement_s: float = 15.0
    lock_s: float = 5.0
    grace_s: float = DEADLINE_GRACE_S

    def conninfo(self, dsn: str) -> str:
        """``dsn`` with our connection parameters where it names none of its own."""
        given = conninfo_to_dict(dsn)
        ours: dict[str, Any] = {
            "connect_timeout": max(2, round(self.connect_s)),  # libpq takes whole seconds, at least 2
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "tcp_user_timeout": int(max(self.statement_s, 10.0) * 1000),
        }
        return make_conninfo(dsn, **{k: v for k, v in ours.items() if k not in given})

    @property
    def deadline_s(self) -> float:
        return self.statement_s + self.grace_s


def connect(dsn: str, timeouts: PgTimeouts, **kw: Any) -> psycopg.Connection[Any]:
    """A connection bounded by ``timeouts``; its cursors' statements run under a Deadline."""
    conn = psycopg.connect(timeouts.conninfo(dsn), cursor_factory=GuardedCursor, **kw)
    conn.deadline = Deadline(conn, timeouts.deadline_s)  # type: ignore[attr-defined]
    with conn.deadline.guard():  # type: ignore[attr-defined]
        conn.execute("SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)",
                     (f"{int(timeouts.statement_s * 1000)}ms", f"{int(timeouts.lock_s * 1000)}ms"))
    return conn


class _Watchdog:
    """One thread for the whole process: runs each registered callback at its time unless cancelled."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._jobs: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, after_s: float, job: Callable[[], None]) -> int:
        with self._cv:
            token = next(self._ids)
            self._jobs[token] = job
            heapq.heappush(self._heap, (time.monotonic() + after_s, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pg-deadline", daemon=True)
                self._thread.start()
            self._cv.notify()
            return token

    def cancel(self, token: int) -> None:
        with self._cv:
            self._jobs.pop(token, None)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][1] not in self._jobs:
                    heapq.heappop(self._heap)  # cancelled
                if not self._heap:
                    self._cv.wait()
                    continue
                when, token = self._heap[0]
                wait = when - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                job = self._jobs.pop(token)
            try:
                job()
            except Exception:  # a socket already gone: nothing left to cut
                pass


_WATCHDOG = _Watchdog()


class Deadline:
    """Cuts ``conn``'s socket when a guarded wait on the server lasts longer than ``seconds``."""

    def __init__(self, conn: psycopg.Connection[Any], seconds: float) -> None:
        self.conn = conn
        self.seconds = seconds
        self.expired = 0  # how many times it cut (a figure for tests and logs)
        self._depth = 0
        self._token = -1

    @contextmanager
    def guard(self) -> Iterator[None]:
        """One timer per unit of work; a nested guard (a statement) starts it again when the
        statement starts and when it ends, so the deadline bounds each wait on the server
        (and the commit after the last statement), not the whole unit's length."""
        if self._depth:
            self._depth += 1
            self._rearm()
            try:
                yield
            finally:
                self._depth -= 1
                self._rearm()
            return
        self._depth = 1
        self._token = _WATCHDOG.arm(self.seconds, self._cut)
        try:
            yield
        finally:
            _WATCHDOG.cancel(self._token)
            self._depth = 0

    def _rearm(self) -> None:
        _WATCHDOG.cancel(self._token)
        self._token = _WATCHDOG.arm(self.seconds, self._cut)

    def _cut(self) -> None:
        self.expired += 1
        fd = self.conn.pgconn.socket
        # shutdown acts on the socket itself, not the descriptor: the driver's blocked read ends.
        with socket.socket(fileno=os.dup(fd)) as s:
            s.shutdown(socket.SHUT_RDWR)


class GuardedCursor(psycopg.Cursor):  # type: ignore[type-arg]
    """Every statement under its connection's Deadline."""

    def execute(self, *a: Any, **kw: Any) -> Any:
        with _guard(self.connection):
            return super().execute(*a, **kw)

    def executemany(self, *a: Any, **kw: Any) -> None:
        with _guard(self.connection):
            return super().executemany(*a, **kw)

    @contextmanager
    def copy(self, *a: Any, **kw: Any) -> Iterator[Any]:  # type: ignore[override]
        with _guard(self.connection), super().copy(*a, **kw) as cp:
            yield cp


@contextmanager
def _guard(conn: Any) -> Iterator[None]:
    d = getattr(conn, "deadline", None)
    if d is None:
        yield
    else:
        with d.guard():
            yield


guard = _guard  # for work that spans statements and a commit (PostgresStore._run)
