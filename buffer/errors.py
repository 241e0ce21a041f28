"""Errors the buffer raises on purpose; they hang off the project's one tree (core.errors)."""

from __future__ import annotations

from core.errors import RecoverableError


class BufferFullError(RecoverableError):
    """A commit could not be written: the disk (or the buffer's page budget) is full.

    The transaction was rolled back, nothing committed before is lost, and the
    samples passed to ``commit`` were *not* stored: the caller keeps them in
    memory and tries again later. The buffer has already freed what its cap
    policy allows (oldest data dropped, with gap records).
    """
