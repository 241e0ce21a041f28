"""What the buffer's small side files (``.seq``, ``.held``, ``.id``) share.

Each is evidence read at the next open; a damaged or foreign one must never be
taken for a loss (or for a name), so each record carries a CRC and is believed
only in the exact form written, only within ``MAX_SEQ``, and only for this
device (``device_tag``).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

# The largest number a side file may name. Far above any real buffer (2^50 samples at 1 kHz is
# 35,000 years), far below SQLite's 2^63 - 1: a value past it could only be damage, and believing
# it would burn the number space (every later commit failing) or not even fit an INTEGER (every
# open failing).
MAX_SEQ = 2**50


def crc(text: str) -> str:
    """CRC32 of a record's text, 8 hex digits."""
    return "%08x" % zlib.crc32(text.encode("utf-8", "surrogateescape"))


def device_tag(device: str) -> str:
    """The device id as it goes into a record: 8 hex digits, whatever characters the id has.

    A tag, not the id itself: it keeps the ``.seq`` record one fixed-width line of ASCII. It
    only has to tell the vans of one fleet apart when a file is copied from one to another."""
    return crc("device:" + device)


def make_with_real_blocks(path: Path, size: int) -> None:
    """Write ``size`` zero bytes to ``path`` atomically and fsync: a sparse file would reserve nothing."""
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            chunk = b"\0" * min(size, 65536)
            for _ in range(0, size, len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
