"""Is the store answering? A periodic probe, so a frozen PostgreSQL shows also when idle.

The ingest worker learns of an outage only from a call that fails, and a call on a
server that answers nothing (SIGSTOP, a hung host) fails only when its bounds run out;
an idle receiver makes no call at all. Issue 13 re-test: a SIGSTOPped server showed in
health and logs after ~45 s of a blocked call, and never while no upload arrived.

``StoreProbe`` runs ``ping`` (``PgPing``: ``SELECT 1`` on a connection of its own, bounded
by a short deadline) every ``interval_s`` in a thread of its own and reports a failure to
``Health`` at once (health file, one log line, ``stats --health-file``). It ends an outage
only one it reported itself and only while the worker holds no upload: an outage the
worker met (its writes fail while ``SELECT 1`` works: a full disk, a lock) is the
worker's to end, else health would flap between the two.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from receiver.health import UNAVAILABLE, Health

log = logging.getLogger(__name__)

PROBE = "probe"  # the ``by`` of the failures this module reports


class Ping(Protocol):
    def __call__(self) -> None: ...

    def close(self) -> None: ...


class PgPing:
    """``SELECT 1`` on a PostgreSQL connection of its own; opened again after any failure.

    Its bounds are the probe's: connect, statement and client-side deadline of about
    ``timeout_s`` each (libpq's connect_timeout is at least 2 s), so a frozen server fails
    a ping within a few seconds.
    """

    def __init__(self, dsn: str, timeout_s: float) -> None:
        from receiver.pg_timeouts import PgTimeouts  # psycopg only when PostgreSQL is used

        self.dsn = dsn
        self.timeouts = PgTimeouts(connect_s=timeout_s, statement_s=timeout_s, lock_s=timeout_s,
                                   grace_s=min(1.0, timeout_s))
        self._conn: Any = None

    def __call__(self) -> None:
        from receiver.pg_timeouts import connect

        try:
            if self._conn is None:
                self._conn = connect(self.dsn, self.timeouts, autocommit=True)
            self._conn.execute("SELECT 1").fetchone()
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a socket the deadline already shut
                pass


class StoreProbe:
    """``ping()`` every ``interval_s`` until stopped; failures and recoveries to ``health``.

    ``held()``: uploads the worker holds un-acked now; ``on_heal``: called when the probe
    ends an outage (the service counts ``store_outages`` with it).
    """

    def __init__(self, ping: Ping, health: Health, interval_s: float, *, held: Callable[[], int],
                 on_heal: Callable[[], None] = lambda: None, stopping: threading.Event | None = None) -> None:
        self.ping = ping
        self.health = health
        self.interval_s = interval_s
        self.held = held
        self.on_heal = on_heal
        self.stopping = stopping or threading.Event()
        self.failures = 0  # pings failed (a figure for tests)
        self.thread = threading.Thread(target=self._loop, name="store-probe", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval_s):
            self.once()
        self.ping.close()

    def once(self) -> bool:
        """One ping; True if the store answered."""
        try:
            self.ping()
        except Exception as exc:  # noqa: BLE001 - whatever fails, the store does not answer
            self.failures += 1
            self.health.store_failed(exc, self.held(), by=PROBE)
            return False
        s = self.health.store
        if s["state"] == UNAVAILABLE and s.get("failed_by") == PROBE and self.held() == 0:
            if self.health.store_ok() is not None:
                self.on_heal()
        return True
