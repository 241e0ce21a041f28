"""Every limit the receiver puts on one batch, in one place, and the van's check against them.

The receiver refuses a whole batch that passes any of them (``core.wire``
decoding, ``core.codec_v2``, ``receiver.validate``); the van seals fewer
samples per batch instead (``buffer.store.Buffer.seal``), and sets aside at
commit a single sample that could never fit (``sample_never_fits``). Both
sides read the numbers from here, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Callable, Sequence

from core.errors import PayloadError
from core.sample import Sample
from core.codec_v2 import MAX_VALUE_CELLS
from core.wire import MAX_DECOMPRESSED_BYTES, MAX_PAYLOAD_BYTES, MAX_SAMPLES_PER_BATCH, inflate_body

MAX_GAPS_PER_BATCH = 10_000
# Below this many bytes of JSON values a single sample cannot break the payload limits
# (a compressed body is never much larger than its input, and 4 MiB inflated is far): the
# exact check at commit (an encode) is only paid by the rare huge sample.
SMALL_SAMPLE_BYTES = MAX_PAYLOAD_BYTES // 4

# Text of the gap records one batch may carry: a quarter of the *smaller* of the two byte
# limits. Compression cannot be counted on (random text: ~1 byte per byte on the wire), so
# bounding only the inflated 4 MiB let 1 MiB of reasons fill the 1 MiB payload on their own.
GAP_TEXT_BUDGET = min(MAX_PAYLOAD_BYTES, MAX_DECOMPRESSED_BYTES) // 4

Encode = Callable[[Sequence[Sample]], bytes]  # samples -> a batch's payload

__all__ = ["MAX_GAPS_PER_BATCH", "GAP_TEXT_BUDGET", "MAX_VALUE_CELLS", "MAX_PAYLOAD_BYTES", "MAX_DECOMPRESSED_BYTES",
           "MAX_SAMPLES_PER_BATCH", "SMALL_SAMPLE_BYTES", "value_cells", "batch_problem", "sample_never_fits"]


def value_cells(samples: Sequence[Sample]) -> int:
    """Value cells as the columnar decoder counts them: per sensor, samples x distinct keys."""
    keys: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for s in samples:
        keys.setdefault(s.sensor, set()).update(s.values if isinstance(s.values, dict) else ())
        counts[s.sensor] = counts.get(s.sensor, 0) + 1
    return sum(counts[k] * len(v) for k, v in keys.items())


def batch_problem(samples: Sequence[Sample], n_gaps: int, payload: bytes) -> str | None:
    """Why the receiver would refuse this encoded batch for its size, or None."""
    if len(samples) > MAX_SAMPLES_PER_BATCH:
        return f"{len(samples)} samples exceed {MAX_SAMPLES_PER_BATCH}"
    if n_gaps > MAX_GAPS_PER_BATCH:
        return f"more than {MAX_GAPS_PER_BATCH} gaps in one batch"
    cells = value_cells(samples)
    if cells > MAX_VALUE_CELLS:
        return f"{cells} value cells exceed {MAX_VALUE_CELLS}"
    if len(payload) > MAX_PAYLOAD_BYTES:
        return f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
    try:
        inflate_body(payload)  # the inflated limit (4 MiB), checked as the receiver checks it
    except PayloadError as exc:
        return str(exc)
    return None


def sample_never_fits(s: Sample, encode: Encode) -> str | None:
    """Why ``s`` alone exceeds a batch limit (so no batch can ever carry it), or None.

    An encode: call it only for a sample whose values take ``SMALL_SAMPLE_BYTES`` or more.
    """
    try:
        payload = encode([s])
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None  # the sample rules, or sealing, say what is wrong with it
    why = batch_problem([s], 0, payload)
    return None if why is None else f"too large for any batch: {why}"
