"""A store opened on first use, so a receiver starts (and waits) while its database is down.

``LazyStore(opener)`` stands in for the ``Store`` the ingestor and the service
use: the first call opens the real store; while that fails, every call raises
``StoreUnavailable`` (which the service retries with backoff, messages held)
and the next call tries to open again. Once open, calls go straight through:
the stores heal their own connections (``PostgresStore._run`` reconnects; a
SQLite connection outlives a locked or full database).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from core.errors import StoreUnavailable
from receiver.health import error_text
from receiver.store import Store


class LazyStore:
    def __init__(self, opener: Callable[[], Store]) -> None:
        self._opener = opener
        self._store: Store | None = None
        self._lock = threading.Lock()

    @property
    def opened(self) -> bool:
        return self._store is not None

    def get(self) -> Store:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    try:
                        self._store = self._opener()
                    except Exception as exc:
                        raise StoreUnavailable(f"cannot open the store: {error_text(exc)}") from exc
        return self._store

    def __getattr__(self, name: str) -> Any:
        # Only for what is not defined here: the Store methods (ingest_many, dead_letter ...).
        return getattr(self.get(), name)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
