"""How the buffer's operations are wrapped: one transaction, corruption recovery, a full card.

``_recovering`` quarantines and salvages a file found corrupt and runs the operation
again; ``_tolerate_full`` makes room on a full file system (never by dropping data)
and retries once; ``_Tx`` is one BEGIN IMMEDIATE ... COMMIT (one fsync)."""

from __future__ import annotations

import functools
import logging
import sqlite3
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from buffer import recovery
from buffer.errors import BufferFullError

if TYPE_CHECKING:
    from buffer.store import Buffer

log = logging.getLogger("buffer.store")  # the name the one-class store logged under

T = TypeVar("T")

_RAISE = object()  # _tolerate_full: raise BufferFullError instead of skipping


def _recovering(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a method; if the file turns out corrupt, quarantine, salvage and run it once more."""

    @functools.wraps(fn)
    def wrapper(self: "Buffer", *args: Any, **kwargs: Any) -> T:
        try:
            return fn(self, *args, **kwargs)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            if not recovery.is_corruption(exc):
                raise
            self._file.rollback_quietly()
            self._recover(f"{fn.__name__}: {exc}")
            return fn(self, *args, **kwargs)

    return wrapper


def _tolerate_full(default: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Writes on a full file system: make room (never by dropping data), retry once, else give up.

    Room comes from the space reserve and a checkpoint (see ``Room.make_room``).
    Giving up is safe for each housekeeping write (seal, reject, ...): it is
    retried naturally on a later tick. ``commit`` and ``add_gap`` raise
    ``BufferFullError``: their caller holds something that exists nowhere else.
    """

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(self: "Buffer", *args: Any, **kwargs: Any) -> T:
            if self._opener.unborn and not self._opener.be_born():
                # No database file yet (a full card at start): nothing to write into.
                if default is _RAISE:
                    raise BufferFullError(f"buffer {self.path}: no room to create it ({fn.__name__})")
                return default
            if self._room.still_stuck():
                # Nothing freed since a write last found no room: do not try (and
                # checkpoint) again every tick for nothing (CPU and card on a Pi).
                if default is _RAISE:
                    raise BufferFullError(f"buffer {self.path}: disk full in {fn.__name__}")
                return default
            for attempt in range(2):
                try:
                    result = fn(self, *args, **kwargs)
                except sqlite3.DatabaseError as exc:
                    if not recovery.is_disk_full(exc):
                        raise
                    if attempt == 0:
                        log.error("buffer: disk full in %s, making room", fn.__name__)
                        self._room.make_room()
                else:
                    self._room.clear_stuck()
                    return result
            self._file.rollback_quietly()
            self._room.mark_stuck()
            if default is _RAISE:
                raise BufferFullError(f"buffer {self.path}: disk full in {fn.__name__}")
            return default

        return wrapper

    return deco


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            # SQLite may already have rolled back (SQLITE_FULL, SQLITE_CORRUPT).
            self._db.execute("ROLLBACK")
