"""How much an upload costs decoded, known before decoding it: the receiver's memory budget.

The receiver stores the uploads that queued up together in one transaction, and
decodes all of them first. Decoded, a value costs ~40-100 bytes of Python
objects against well under a byte on the wire, so a group is cut by what its
uploads *can* hold decoded, not by their count or wire size. ``upload_values``
gives an upper bound on values (a sample counts as its values plus one) from
the body's header after decompression only (C speed; the Python objects are
what cost):

* version 2: ``n`` samples and a string table of ``k`` entries; a sample holds
  each key at most once and every key is in the table, so at most ``n * (k + 1)``
  (and the codec's cell bound).
* version 1: the inflated JSON; a value takes at least 4 bytes of it (``"k":0``
  is 5, and a sample's row is longer still), so at most ``len(json) // 4``.

Values alone miss what is *long*: a string or a gap reason costs one value
however many characters it holds, so uploads of a few distinct 16,000-character
strings, or 4,000 gaps with 1,000-character reasons (0 values), filled a group
of 64 with ~4 MB of text each and pushed a receiver past 300 MB (issue 13, the
tester's probe 5). ``upload_cost`` therefore also gives the body's inflated size
in bytes: every string, key and reason is in it once (version 2 shares strings
through its table, and decoding makes one Python string of each), so the group's
sum of inflated sizes bounds its text, and ``group_bytes`` caps it.

Anything the peek cannot read costs ``UNKNOWN``: more than any budget, so that
upload is decoded (and rejected) on its own.

``peek`` also keeps the checked inflated body it measured, and the ingestor decodes
from it: every upload is inflated once (it was twice, issue 13 review).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

from core.errors import PayloadError
from core.codec_v2 import MAX_VALUE_CELLS, _Reader
from core.wire import MAGIC, MAX_PAYLOAD_BYTES, MAX_SAMPLES_PER_BATCH, inflate_body

UNKNOWN = 1 << 62
MIN_JSON_BYTES_PER_VALUE = 4


class Cost(NamedTuple):
    """What an upload can hold decoded: values (samples count one each, too) and inflated bytes."""

    values: int
    bytes: int


class Peek(NamedTuple):
    """An upload's cost, and its checked inflated body for ``decode_batch`` (None: not read)."""

    cost: Cost
    inflated: bytes | None


def peek(payload: bytes) -> Peek:
    """Upper bounds on what ``payload`` decodes to, from its header after decompression only."""
    try:
        if len(payload) > MAX_PAYLOAD_BYTES or not payload.startswith(MAGIC) or len(payload) <= len(MAGIC):
            return Peek(Cost(1, len(payload)), None)  # refused before anything is decoded
        version = payload[len(MAGIC)]
        if version not in (1, 2):
            return Peek(Cost(1, len(payload)), None)  # an unknown version is refused on the version byte
        plain = inflate_body(payload)
        if version == 2:
            return Peek(_v2_cost(plain), plain)
        return Peek(Cost(max(1, len(plain) // MIN_JSON_BYTES_PER_VALUE), len(plain)), plain)
    except (PayloadError, zlib.error, ValueError, IndexError, MemoryError):
        return Peek(Cost(UNKNOWN, UNKNOWN), None)


def upload_cost(payload: bytes) -> Cost:
    return peek(payload).cost


def upload_values(payload: bytes) -> int:
    """Upper bound on the values ``payload`` decodes to (samples count one each, too)."""
    return upload_cost(payload).values


def _v2_cost(plain: bytes) -> Cost:
    r = _Reader(plain)
    r.string("device")
    r.string("epoch")
    r.s("first_seq")
    r.s("sequence span")
    n_strings = r.count("string count", r.left())
    for _ in range(n_strings):
        r.string("string")
    for _ in range(r.count("flag set count", r.left())):
        for _ in range(r.count("flag set size", r.left())):
            r.u("flag")
    n = r.count("sample count", MAX_SAMPLES_PER_BATCH)
    return Cost(n + min(MAX_VALUE_CELLS, n * n_strings), len(plain))
