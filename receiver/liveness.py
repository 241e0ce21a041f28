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

A failing probe is not always a failing store: with ``max_connections`` reached, a probe
whose own connection was cut cannot reconnect while the worker commits on its old one
(issue 13 re-test: health flipped 13 times in 20 s, all batches acked). So a probe
declares an outage only after ``fails_needed`` failures in a row (the next ping then comes
after ``retry_s``, not a whole interval, so a frozen idle server still shows within ~10 s)
and only if the worker has had no success within ``interval_s`` before the failed ping:
the worker's success wins. The probe also watches the worker's current call: held longer than ``slow_s`` (a
frozen or blocked backend while the server answers the probe) shows as ``store_slow_s``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from receiver.health import UNAVAILABLE, Health

log = logging.getLogger(__name__)

PROBE = "probe"  # the ``by`` of the failures this module reports
FAILS_NEEDED = 2  # pings failed in a row before the probe declares an outage
RETRY_S = 0.5  # the next ping after a failed one
VETOED_RETRY_S = 1.0  # the next ping after one failed while the worker succeeded
SLOW_S = 5.0  # a worker call held this long shows as store_slow_s


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
                 on_heal: Callable[[], None] = lambda: None, stopping: threading.Event | None = None,
                 held_for: Callable[[], float | None] = lambda: None, fails_needed: int = FAILS_NEEDED,
                 retry_s: float = RETRY_S, slow_s: float = SLOW_S) -> None:
        self.ping = ping
        self.health = health
        self.interval_s = interval_s
        self.held = held
        self.on_heal = on_heal
        self.stopping = stopping or threading.Event()
        self.held_for = held_for  # seconds the worker's current store call has taken, None if idle
        self.fails_needed = max(1, fails_needed)
        self.retry_s = retry_s
        self.slow_s = slow_s
        self.failures = 0  # pings failed (a figure for tests)
        self.vetoed = 0  # failures not reported because the worker succeeded meanwhile
        self._streak = 0
        self._next_s = interval_s  # until the next ping: shorter while pings fail
        self.thread = threading.Thread(target=self._loop, name="store-probe", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        wait = self.interval_s
        while not self.stopping.wait(wait):
            self.once()
            self.watch_worker()
            wait = min(self._next_s, self.interval_s)
        self.ping.close()

    def watch_worker(self) -> None:
        """A worker call held past ``slow_s`` shows in health (``store_slow_s``)."""
        took = self.held_for()
        if took is not None and took >= self.slow_s:
            self.health.store_slow(took, self.held())

    def once(self) -> bool:
        """One ping; True if the store answered."""
        began = self.health.clock()
        try:
            self.ping()
        except Exception as exc:  # noqa: BLE001 - whatever fails, the store does not answer
            self.failures += 1
            self._streak += 1
            ok_at = self.health.worker_ok_at
            if ok_at is not None and began - ok_at <= self.interval_s:
                # The worker committed within an interval of this ping: the store works; the
                # probe's own connection does not (e.g. max_connections reached).
                self.vetoed += 1
                self._next_s = VETOED_RETRY_S  # soon: that success may predate a freeze just begun
                log.debug("store probe failed (%s) while the worker succeeds; not an outage", type(exc).__name__)
                return False
            self._next_s = self.retry_s
            if self._streak >= self.fails_needed:
                self.health.store_failed(exc, self.held(), by=PROBE)
            return False
        self._streak = 0
        self._next_s = self.interval_s
        s = self.health.store
        if s["state"] == UNAVAILABLE and s.get("failed_by") == PROBE and self.held() == 0:
            if self.health.store_ok() is not None:
                self.on_heal()
        return True
