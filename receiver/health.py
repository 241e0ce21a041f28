"""What a running receiver says about itself: store and broker up or down, since when.

One ``Health`` per receiver process. The service reports every store attempt
and broker event to it; it logs one line per change of state (never one per
retry: an outage of an hour at a retry a second would bury everything else)
and, when given a path, keeps a small JSON file up to date that
``datalab-receiver stats --health-file`` and a supervisor read::

    {"store": {"state": "unavailable", "since_utc": "2026-12-06T08:30:01Z",
               "failed_attempts": 412, "uploads_held": 100, "most_uploads_held": 164,
               "last_error": "OperationalError"},
     "broker": {"state": "connected", "since_utc": "..."}, "updated_utc": "..."}

``failed_attempts`` counts tries at the store in this outage; ``uploads_held`` is how
many uploads wait un-acknowledged now (``most_uploads_held``: the most at once in this
outage). During an outage the log gets one line when it starts, one when it ends, and a
summary every ``summary_s`` (60 s) in between: never one per retry.

The last error is its type and first line only: a driver message may quote a
connection string, and secrets never reach logs or this file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OK, UNAVAILABLE = "ok", "unavailable"
CONNECTED, DISCONNECTED = "connected", "disconnected"
MAX_ERROR_CHARS = 200
SUMMARY_S = 60.0  # a line "still unavailable" this often during an outage


def utc_text(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_text(exc: BaseException) -> str:
    """Type and first line of an error, shortened (no DSN, no payload, no traceback)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:MAX_ERROR_CHARS]


class Health:
    def __init__(self, path: str | Path | None = None, *, clock: Callable[[], float] = time.time,
                 summary_s: float = SUMMARY_S) -> None:
        self.path = Path(path) if path else None
        self.clock = clock
        self.summary_s = summary_s
        self._lock = threading.Lock()
        now = clock()
        self._summarised = now
        self.store: dict[str, Any] = {"state": OK, "since": now, "failed_attempts": 0, "uploads_held": 0,
                                      "most_uploads_held": 0, "last_error": "", "outages": 0}
        self.broker: dict[str, Any] = {"state": DISCONNECTED, "since": now, "failed_attempts": 0}
        self.worker_ok_at: float | None = None  # the worker's last successful store call (clock)
        self._write()

    # -- the store ----------------------------------------------------------------

    def store_failed(self, exc: BaseException, uploads_held: int, *, by: str = "ingest") -> None:
        """One attempt at the store failed; ``uploads_held``: messages kept un-acked meanwhile;
        ``by``: who met it (the ingest worker, or the liveness probe: receiver/liveness.py)."""
        with self._lock:
            s = self.store
            s["failed_by"] = by
            s["failed_attempts"] += 1
            s["uploads_held"] = uploads_held
            s["most_uploads_held"] = max(s["most_uploads_held"], uploads_held)
            s["last_error"] = error_text(exc)
            now = self.clock()
            if s["state"] != UNAVAILABLE:
                s.update(state=UNAVAILABLE, since=now, outages=s["outages"] + 1)
                self._summarised = now
                log.error("store unavailable (%s, seen by %s); holding %d uploads un-acknowledged and retrying",
                          s["last_error"], by, uploads_held)
            elif now - self._summarised >= self.summary_s:
                self._summarised = now
                log.warning("store still unavailable after %.0f s: %d failed attempts, %d uploads held now; "
                            "last error %s", now - s["since"], s["failed_attempts"], uploads_held, s["last_error"])
            self._write()

    def store_ok(self) -> tuple[float, int, int] | None:
        """The store answered. After an outage: (its length in s, failed attempts, the most
        uploads held at once); else None."""
        with self._lock:
            s = self.store
            self.worker_ok_at = self.clock()
            if "store_slow_s" in s:  # a held group answered at last
                log.warning("store answered again after holding %d uploads for %.1f s or more",
                            s["uploads_held"], s.pop("store_slow_s"))
                if s["state"] == OK:
                    s["uploads_held"] = 0
                    self._write()
            if s["state"] == OK:
                return None
            took, attempts, uploads = self.clock() - s["since"], s["failed_attempts"], s["most_uploads_held"]
            s.update(state=OK, since=self.clock(), failed_attempts=0, uploads_held=0, most_uploads_held=0,
                     last_outage_s=round(took, 1), last_outage_attempts=attempts,
                     last_outage_most_uploads_held=uploads)
            log.warning("store available again after %.1f s, %d failed attempts, at most %d uploads held",
                        took, attempts, uploads)
            self._write()
            return took, attempts, uploads

    def store_slow(self, held_s: float, uploads_held: int) -> None:
        """The worker has waited ``held_s`` on one store call with ``uploads_held`` uploads un-acked
        (a backend frozen or blocked while the server answers others): shown as ``store_slow_s``,
        one log line when it starts; cleared by the worker's next success (``store_ok``)."""
        with self._lock:
            s = self.store
            if s["state"] != OK:
                return  # an outage says more already
            if "store_slow_s" not in s:
                log.warning("store slow: %d uploads held for %.1f s on one call", uploads_held, held_s)
            s.update(store_slow_s=round(held_s, 1), uploads_held=uploads_held)
            self._write()

    @property
    def store_up(self) -> bool:
        return self.store["state"] == OK

    # -- the broker ---------------------------------------------------------------

    def broker_connected(self) -> None:
        with self._lock:
            b = self.broker
            if b["state"] != CONNECTED:
                log.info("broker connected%s", f" after {b['failed_attempts']} failed attempts"
                         if b["failed_attempts"] else "")
                b.update(state=CONNECTED, since=self.clock(), failed_attempts=0)
                self._write()

    def broker_lost(self, why: str) -> None:
        """A connection attempt failed or the connection dropped."""
        with self._lock:
            b = self.broker
            b["failed_attempts"] += 1
            if b["state"] != DISCONNECTED or b["failed_attempts"] == 1:
                log.warning("broker unreachable (%s); reconnecting", why)
            if b["state"] != DISCONNECTED:
                b.update(state=DISCONNECTED, since=self.clock())
            self._write()

    # -- the file -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        def part(d: dict[str, Any]) -> dict[str, Any]:
            return {**{k: v for k, v in d.items() if k != "since"}, "since_utc": utc_text(d["since"])}

        return {"store": part(self.store), "broker": part(self.broker), "updated_utc": utc_text(self.clock()),
                "pid": os.getpid()}

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot(), indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)  # readers never see half a file
        except OSError as exc:  # a full disk must not stop ingest as well
            log.debug("cannot write the health file %s: %s", self.path, exc)


def describe(health: dict[str, Any]) -> list[str]:
    """Lines for ``datalab-receiver stats``: ``store: unavailable since ... (N failed attempts)``."""
    s, b = health.get("store", {}), health.get("broker", {})
    out = []
    if s.get("state") == UNAVAILABLE:
        out.append(f"store: unavailable since {s.get('since_utc')} ({s.get('failed_attempts')} failed attempts, "
                   f"{s.get('uploads_held')} uploads held now; last error {s.get('last_error')})")
    else:
        out.append(f"store: ok since {s.get('since_utc')} ({s.get('outages', 0)} outages in this run)")
        if "store_slow_s" in s:
            out.append(f"store: slow, {s.get('uploads_held')} uploads held for {s['store_slow_s']} s on one call")
    if b.get("state") == CONNECTED:
        out.append(f"broker: connected since {b.get('since_utc')}")
    else:
        out.append(f"broker: disconnected since {b.get('since_utc')} ({b.get('failed_attempts')} failed attempts)")
    out.append(f"health updated {health.get('updated_utc')} by pid {health.get('pid')}")
    return out
