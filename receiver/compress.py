"""gzip for the API's large answers, streamed (``Content-Encoding: gzip``).

Why: the street map as GeoJSON is ~1.7 MB of repetitive JSON that gzip shrinks ~10x,
which matters to a phone on a mobile network and to the API's bandwidth. Compressed
as it is written (one zlib stream over the chunks), so memory stays bounded like the
streaming itself; small answers are left alone (gzip's header would outweigh the gain).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

MIN_BYTES = 1024  # below this, a known-length answer goes as it is
# Level 5: ~all of level 9's ratio on JSON for a fraction of the CPU (the API runs on small hosts).
LEVEL = 5
_TYPES = ("application/json", "application/geo+json", "text/csv", "text/html", "text/css",
          "application/javascript", "text/plain")


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header allows gzip (``gzip;q=0`` refuses it)."""
    for part in (accept_encoding or "").split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "x-gzip", "*"):
            q = params.strip()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


def worth_it(ctype: str, length: int | None) -> bool:
    """Compressible type, and streamed (size unknown, usually large) or at least MIN_BYTES."""
    return ctype.split(";")[0].strip() in _TYPES and (length is None or length >= MIN_BYTES)


def gzip_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks as one gzip stream; closing this closes ``chunks`` (the database cursor)."""
    z = zlib.compressobj(LEVEL, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    try:
        for c in chunks:
            out = z.compress(c)
            if out:
                yield out
        yield z.flush()
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()
