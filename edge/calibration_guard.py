"""The agent's calibration store: a damaged file never stops the van.

``calibration.sqlite`` sits on the SD card beside the buffer. If it is damaged (not a
database, or it fails mid-run) the van must keep measuring: :class:`GuardedStore` logs the
error once, answers as a store with nothing readable (so the calibrated drivers flag their
readings ``cal_unavailable`` and send them uncalibrated), shows the problem in the
heartbeat, and tries to open the file again every ``retry_s`` — when a technician restores
or removes it, the records are found and applied again without a restart. The file itself
is never moved or rewritten here: it may be the only copy of the van's calibration history.

Technician tools open :class:`~edge.calibration.CalibrationStore` directly and fail loudly.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from core.calibration import CalibrationRecord, CalibrationUnavailable
from edge.calibration import CalibrationStore

log = logging.getLogger(__name__)

DEFAULT_RETRY_S = 60.0
UNAVAILABLE_GENERATION = -1  # what generation() says while nothing can be read


class Monotonic(Protocol):
    def monotonic(self) -> float: ...


class GuardedStore:
    """The read side of a CalibrationStore that survives a damaged file (see the module doc).

    ``on_open(store)`` runs after every successful open (the agent records its configured
    NO2 sheets then); an error there counts as the file failing.
    """

    def __init__(self, path: str | Path, *, clock: Any, retry_s: float = DEFAULT_RETRY_S,
                 on_open: Callable[[CalibrationStore], Any] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock
        self.retry_s = retry_s
        self._on_open = on_open
        self.store: CalibrationStore | None = None
        self.problem: str | None = None
        self.failures = 0  # times the file could not be opened or read
        self._next_try = float("-inf")
        self._ensure()

    @classmethod
    def for_data_dir(cls, data_dir: str | Path, **kw: Any) -> GuardedStore:
        from edge.calibration import FILE_NAME

        return cls(Path(data_dir) / FILE_NAME, **kw)

    @property
    def available(self) -> bool:
        return self.store is not None

    def _ensure(self) -> CalibrationStore | None:
        if self.store is not None or self._clock.monotonic() < self._next_try:
            return self.store
        store = None
        try:
            store = CalibrationStore(self.path, clock=self._clock)
            if self._on_open is not None:
                self._on_open(store)
        except (sqlite3.DatabaseError, OSError) as exc:
            if store is not None:
                store.close()
            self._fail(exc)
            return None
        if self.problem is not None:
            log.warning("calibration store %s readable again: calibrations apply again", self.path)
        self.store, self.problem = store, None
        return store

    def _fail(self, exc: BaseException) -> None:
        self.failures += 1
        self._next_try = self._clock.monotonic() + self.retry_s
        text = f"{type(exc).__name__}: {exc}"
        if self.problem is None:  # once per outage, not once per read
            log.error("calibration store %s cannot be read (%s): sensors run uncalibrated, their readings "
                      "flagged cal_unavailable; trying again every %.0f s", self.path, text, self.retry_s)
        self.problem = text
        if self.store is not None:
            try:
                self.store.close()
            except sqlite3.Error:
                pass
            self.store = None

    def _call(self, what: str, default: Any, *args: Any) -> Any:
        store = self._ensure()
        if store is None:
            return default
        try:
            return getattr(store, what)(*args)
        except sqlite3.DatabaseError as exc:  # damaged while running
            self._fail(exc)
            return default

    # -- what CalibratedDriver and CalibrationAnnouncer ask --------------------------------

    def generation(self) -> int:
        return int(self._call("generation", UNAVAILABLE_GENERATION))

    def active(self, kind: str, serial: str, at: float | None = None) -> CalibrationRecord | None:
        store = self._ensure()
        if store is not None:
            try:
                return store.active(kind, serial, at)
            except sqlite3.DatabaseError as exc:
                self._fail(exc)
        raise CalibrationUnavailable(f"calibration store unreadable: {self.problem}")

    def all_active(self) -> list[CalibrationRecord]:
        return list(self._call("all_active", []))

    def history(self, kind: str | None = None, serial: str | None = None) -> list[CalibrationRecord]:
        return list(self._call("history", [], kind, serial))

    def health(self) -> dict[str, Any]:
        """For the heartbeat: is the calibration store readable, and how many records are damaged."""
        return {"available": self.available, "problem": self.problem, "failures": self.failures,
                "damaged_records": len(self.store.damaged) if self.store is not None else None}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
