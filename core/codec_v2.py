"""Wire format version 2: columnar, delta-encoded, compressed batches.

Why a second version: version 1 repeats every key name, time and flag in JSON
for every sample. A van sends ~16 values a second for a whole shift over a
metered mobile link, so the bytes per value are what the data plan pays for.
Version 2 groups the samples of a batch by sensor (a "stream"), stores every
field as a column, turns the slowly changing columns into runs and the
counters and clocks into deltas (or deltas of deltas), and only then
compresses. Lossless for everything version 1 carries.

This module knows only the body after ``MAGIC + version byte``; ``core.wire``
owns the envelope, the dispatch on the version byte and the checks both
versions share (sequence range, duplicates, gaps). The exact byte layout is
in docs/wire-format.md; the section names below follow it.

Decoding is defensive: every count is checked against what the remaining
bytes could possibly hold and against the batch bounds *before* anything is
allocated for it, so a crafted count costs nothing; anything malformed raises
``PayloadError`` with the reason.
"""

from __future__ import annotations

import lzma
import math
import struct
import uuid
import zlib
from collections.abc import Hashable, Sequence
from itertools import accumulate
from typing import Any

from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.wire import MAX_DECOMPRESSED_BYTES, MAX_SAMPLES_PER_BATCH, Batch, Gap

# --- bounds and constants -------------------------------------------------------

# Cells of the value grid (samples of a stream x keys of that stream, summed over
# streams). Real batches have ~8,000 (2000 samples x 4 keys on average); the
# bound keeps a few bytes of run-length tags from expanding into a huge grid
# (decoded, 500,000 values are ~60 MB of Python objects in the receiver).
MAX_VALUE_CELLS = 500_000
MAX_VARINT_BYTES = 10  # 70 bits: any int64 delta of delta, zigzagged, fits
MAX_SCALE = 15  # decimal digits a scaled float column may carry
MAX_EXACT = 1 << 53  # scaled mantissas stay below this: exact in float arithmetic too
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# Compression of the plain body: the encoder tries each and keeps the smallest.
COMP_STORED = 0
COMP_ZLIB = 1  # zlib format (RFC 1950), level 9
COMP_LZMA2 = 2  # raw LZMA2 stream with the filter below, no container
COMPRESSIONS = (COMP_STORED, COMP_ZLIB, COMP_LZMA2)
# Fixed by the format, because a raw LZMA2 stream does not name its dictionary:
# 1 MiB is plenty for bodies of a few hundred KiB and what a decoder allocates.
LZMA2_DICT_SIZE = 1 << 20
_LZMA_ENC_FILTERS = [
    {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": LZMA2_DICT_SIZE}
]
# Version 4's encoder: one literal-context bit, no position bits. A plain body is varints of
# mixed columns, not text: the default (lc=3, pb=2) models context that is not there and
# costs ~3 % on a 60-s batch. The stream carries these, so every decoder reads it.
_LZMA_ENC_FILTERS_V4 = [
    {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": LZMA2_DICT_SIZE,
     "lc": 1, "lp": 0, "pb": 0}
]
_LZMA_DEC_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": LZMA2_DICT_SIZE}]

# Type tags of a value cell (what one sample holds under one key).
TAG_ABSENT = 0  # the key is not in this sample's values
TAG_NONE = 1
TAG_FALSE = 2
TAG_TRUE = 3
TAG_INT = 4  # int64, in the key's int column
TAG_DEC = 5  # float equal to m / 10**scale, in the key's decimal column
TAG_F64 = 6  # any other finite float, in the key's raw float64 column
TAG_STR = 7  # string, by string-table index
TAG_BIGINT = 8  # int outside int64, its decimal text by string-table index
N_TAGS = 9
_CONST_TAG_VALUES: dict[int, Any] = {TAG_NONE: None, TAG_FALSE: False, TAG_TRUE: True}

# Version 3 (issue #18) is version 2 with a string table that starts with these, so
# a batch carries only the strings that are not here (device, epoch, boot id ...).
# A 60-s batch has ~1,800 values; its ~30 key names were ~230 bytes of it that no
# compressor can shrink on first sight. Part of the format: append only, never
# reorder, and a change needs a new version byte.
STATIC_STRINGS_V3: tuple[str, ...] = (
    # sensor and section names, time sources
    "pm", "gps", "no2", "noise", "calibration", "ntp", "corrected", "unsync",
    # PM (Plantower, Sensirion, Nova)
    "pm1", "pm25", "pm4", "pm10", "pm1_cf1", "pm25_cf1", "pm10_cf1",
    "n0_3", "n0_5", "n1_0", "n2_5", "n4_0", "n5_0", "n10", "typical_size", "rh", "temp_c",
    # GPS
    "lat", "lon", "alt", "speed", "course", "fix_quality", "fix_mode", "sats_used", "sats_in_view",
    "hdop", "gps_time",
    # NO2
    "no2_ppb", "no2_we_mv", "no2_ae_mv", "no2_temp_c",
    # noise
    "laeq", "lamax", "lamin", "la10", "la50", "la90", "lceq", "lcmax", "lcmin", "lzeq", "lzmax", "lzmin",
    # flags
    "warming_up", "no_temperature", "temp_outside_correction_table", "audio_gap", "audio_overrun",
)

MODE_RAW = 0  # each value as a zigzag varint
MODE_DELTA = 1  # first value, then differences from the previous one
MODE_DOD = 2  # version 4: first value, then differences of differences (a smooth track)
# Version 4: first value, a period, then each difference minus the period: a clock read with
# jitter (every delta of deltas holds three jitters, this one two: about a bit less a sample).
MODE_PERIOD = 3
# Version 4 (issue #18): an int column also carries a common step (a GCD): an ADC reads in
# whole LSBs (an ADS1115 at +-4.096 V in 0.125 mV: mantissas in 125s), and a varint of the
# step count is a byte where the mantissa took two. Stream order: omitted when the samples
# are in sequence order (a van's always are): the per-stream seqs already say it.
ORDER_RLE = 0
ORDER_BY_SEQ = 1
_BIGINT_MAX_DIGITS = 400  # ~1330 bits: more than any sensor needs, cheap to parse


# --- varints ----------------------------------------------------------------------


def _zigzag(n: int) -> int:
    # Small magnitudes of either sign become small unsigned numbers.
    return n << 1 if n >= 0 else ((-n) << 1) - 1


def _unzigzag(z: int) -> int:
    return -((z + 1) >> 1) if z & 1 else z >> 1


def _varint_len(u: int) -> int:
    return max(1, (u.bit_length() + 6) // 7)


def _put_u(out: bytearray, n: int) -> None:
    if n < 0 or n.bit_length() > 7 * MAX_VARINT_BYTES:
        raise ValueError(f"{n} does not fit an unsigned varint")
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_s(out: bytearray, n: int) -> None:
    _put_u(out, _zigzag(n))


def _put_str(out: bytearray, s: str) -> None:
    raw = s.encode("utf-8")
    _put_u(out, len(raw))
    out += raw


# Version 4 strings: ``u (n << 2 | kind)``, then n bytes. Random identifiers (a buffer's epoch
# in hex, a boot id as a UUID) are the least compressible bytes of a 60-s batch: as bytes
# they are half the size. Kind 1 and 2 only when the text is exactly what decoding gives back.
STR_TEXT = 0  # UTF-8
STR_HEX = 1  # lowercase hex of n bytes
STR_UUID = 2  # a UUID's 16 bytes, canonical lowercase text (n = 16)
_HEX = frozenset("0123456789abcdef")


def _canonical_uuid(s: str) -> bytes | None:
    if len(s) != 36 or s.count("-") != 4 or not set(s) <= _HEX | {"-"}:
        return None
    try:
        u = uuid.UUID(s)
    except ValueError:
        return None
    return u.bytes if str(u) == s else None


def _put_str4(out: bytearray, s: str) -> None:
    if s and len(s) % 2 == 0 and set(s) <= _HEX:
        raw, kind = bytes.fromhex(s), STR_HEX
    elif (as_uuid := _canonical_uuid(s)) is not None:
        raw, kind = as_uuid, STR_UUID
    else:
        raw, kind = s.encode("utf-8"), STR_TEXT
    _put_u(out, len(raw) << 2 | kind)
    out += raw


class _Reader:
    """A cursor over the plain body; every read checks the bytes are there."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def u(self, what: str) -> int:
        buf, pos, end = self.buf, self.pos, len(self.buf)
        result = shift = 0
        for _ in range(MAX_VARINT_BYTES):
            if pos >= end:
                raise PayloadError(f"body truncated in {what}")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                self.pos = pos
                return result
            shift += 7
        raise PayloadError(f"varint longer than {MAX_VARINT_BYTES} bytes in {what}")

    def s(self, what: str) -> int:
        return _unzigzag(self.u(what))

    def many_s(self, n: int, what: str) -> list[int]:
        """``n`` zigzag varints at once: the decoder's hot loop (issue #18: decoding cost more
        than storing). One-byte values, most of a batch, take the short path."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        if n > end - pos:  # every varint takes at least a byte: refused before allocating
            raise PayloadError(f"body truncated in {what}")
        out = [0] * n
        for i in range(n):
            if pos >= end:
                raise PayloadError(f"body truncated in {what}")
            b = buf[pos]
            pos += 1
            if b < 0x80:
                out[i] = (b >> 1) ^ -(b & 1)
                continue
            z, shift = b & 0x7F, 7
            for _ in range(MAX_VARINT_BYTES - 1):
                if pos >= end:
                    raise PayloadError(f"body truncated in {what}")
                b = buf[pos]
                pos += 1
                z |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            else:
                raise PayloadError(f"varint longer than {MAX_VARINT_BYTES} bytes in {what}")
            out[i] = (z >> 1) ^ -(z & 1)
        self.pos = pos
        return out

    def count(self, what: str, limit: int) -> int:
        """A count that the caller will allocate for: bounded before it is used."""
        n = self.u(what)
        if n > limit:
            raise PayloadError(f"{what} {n} exceeds the limit {limit}")
        return n

    def index(self, what: str, size: int) -> int:
        i = self.u(what)
        if i >= size:
            raise PayloadError(f"{what} {i} out of range (table has {size})")
        return i

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise PayloadError(f"body truncated in {what}")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self, what: str, version: int = 2) -> str:
        if version >= 4:
            head = self.u(f"{what} length")
            kind, n = head & 3, head >> 2
            raw = self.take(n, what)
            if kind == STR_HEX:
                return raw.hex()
            if kind == STR_UUID:
                if n != 16:
                    raise PayloadError(f"{what}: a UUID of {n} bytes")
                return str(uuid.UUID(bytes=raw))
            if kind != STR_TEXT:
                raise PayloadError(f"{what}: unknown string kind {kind}")
        else:
            raw = self.take(self.count(f"{what} length", self.left()), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"{what} is not valid UTF-8") from exc


# --- column primitives ------------------------------------------------------------


class _Interner:
    """Values to table indices in order of first use: deterministic for a given batch."""

    def __init__(self) -> None:
        self.index: dict[Hashable, int] = {}

    def __call__(self, value: Hashable) -> int:
        return self.index.setdefault(value, len(self.index))

    def items(self) -> list[Any]:
        return list(self.index)


def _put_rle(out: bytearray, symbols: Sequence[int]) -> None:
    """Runs of equal symbols: count of runs, then (symbol, length) pairs."""
    runs: list[tuple[int, int]] = []
    for sym in symbols:
        if runs and runs[-1][0] == sym:
            runs[-1] = (sym, runs[-1][1] + 1)
        else:
            runs.append((sym, 1))
    _put_u(out, len(runs))
    for sym, n in runs:
        _put_u(out, sym)
        _put_u(out, n)


def _get_rle(r: _Reader, n: int, n_symbols: int, what: str) -> list[int]:
    runs = r.count(f"{what} run count", n)
    out: list[int] = []
    for _ in range(runs):
        sym = r.index(what, n_symbols)
        length = r.u(f"{what} run length")
        if length < 1 or len(out) + length > n:
            raise PayloadError(f"{what} runs do not add up to {n}")
        out.extend([sym] * length)
    if len(out) != n:
        raise PayloadError(f"{what} runs do not add up to {n}")
    return out


def _put_dod(out: bytearray, values: Sequence[int], base: int) -> None:
    """Deltas of deltas: a steady 1 Hz clock or a +4 sequence costs a zero a sample."""
    prev, prev_delta = base, 0
    for v in values:
        delta = v - prev
        _put_s(out, delta - prev_delta)
        prev, prev_delta = v, delta


def _get_dod(r: _Reader, n: int, base: int, what: str) -> list[int]:
    # Sums in C; at most 20,000 items of 70 bits: the ints stay small before the range check.
    out = list(accumulate(accumulate(r.many_s(n, what)), initial=base))[1:]
    if out and (min(out) < INT64_MIN or max(out) > INT64_MAX):
        raise PayloadError(f"{what} leaves the 64-bit range")
    return out


def _put_ints(out: bytearray, values: Sequence[int], version: int = 2) -> None:
    """Raw or delta zigzag varints, whichever is shorter (ties: delta); version 4 also
    deltas of deltas, and a common step taken out (``_put_ints4``)."""
    if version >= 4:
        _put_ints4(out, values)
        return
    deltas = [values[0]] + [b - a for a, b in zip(values, values[1:])]
    raw_len = sum(_varint_len(_zigzag(v)) for v in values)
    delta_len = sum(_varint_len(_zigzag(v)) for v in deltas)
    mode = MODE_RAW if raw_len < delta_len else MODE_DELTA
    _put_u(out, mode)
    for v in values if mode == MODE_RAW else deltas:
        _put_s(out, v)


def _put_ints4(out: bytearray, values: Sequence[int]) -> None:
    """``u mode | u step | items``: RAW all items are value/step; DELTA and DOD the first
    value as is, then each delta (or delta of delta) / step; PERIOD the first value, the
    period, then each delta minus the period / step. The fewest bits (ties: the lower
    mode). Deterministic."""
    _, mode, step, items = _plan_ints4(values)
    _put_u(out, mode)
    _put_u(out, step)
    for v in items:
        _put_s(out, v)


def _plan_ints4(values: Sequence[int]) -> tuple[int, int, int, list[int]]:
    """(bits, mode, step, items) of the cheapest coding of ``values`` (``_put_ints4``)."""
    deltas = [b - a for a, b in zip(values, values[1:])]
    dods = [b - a for a, b in zip([0] + deltas, deltas)]
    period = sorted(deltas)[len(deltas) // 2] if deltas else 0  # the median
    off = [d - period for d in deltas]
    best: tuple[int, int, int, list[int]] | None = None
    for mode, items, first in ((MODE_RAW, list(values), None), (MODE_DELTA, deltas, values[0]),
                               (MODE_DOD, dods, values[0]), (MODE_PERIOD, off, values[0])):
        step = math.gcd(*items) or 1
        scaled = [v // step for v in items] if step != 1 else items
        # Bits, not varint bytes: what the compressor after us pays is closer to the bits (a
        # zigzag adds one, and one for the varint's framing). Summed in C: the van encodes.
        size = step.bit_length() + sum(map(int.bit_length, map(abs, scaled))) + 2 * len(scaled)
        size += 0 if first is None else _zigzag(first).bit_length()
        if mode == MODE_PERIOD:
            size += _zigzag(period).bit_length()
        if best is None or size < best[0]:
            head = [] if first is None else [first, period] if mode == MODE_PERIOD else [first]
            best = (size, mode, step, head + scaled)
    assert best is not None
    return best


def _get_ints(r: _Reader, n: int, lo: int, hi: int, what: str, version: int = 2) -> list[int]:
    if version >= 4:
        return _get_ints4(r, n, lo, hi, what)
    mode = r.u(f"{what} mode")
    if mode not in (MODE_RAW, MODE_DELTA):
        raise PayloadError(f"unknown {what} mode {mode}")
    out = r.many_s(n, what)
    if mode == MODE_DELTA:
        out = list(accumulate(out))
    if out and (min(out) < lo or max(out) > hi):
        raise PayloadError(f"{what} value out of range")
    return out


def _get_ints4(r: _Reader, n: int, lo: int, hi: int, what: str) -> list[int]:
    mode = r.u(f"{what} mode")
    if mode not in (MODE_RAW, MODE_DELTA, MODE_DOD, MODE_PERIOD):
        raise PayloadError(f"unknown {what} mode {mode}")
    step = r.u(f"{what} step")
    if not 1 <= step <= hi - lo:
        raise PayloadError(f"{what} step {step} out of range")
    if mode == MODE_RAW:
        out = r.many_s(n, what)
        if step != 1:
            out = [v * step for v in out]
    else:
        head = r.s(what)
        period = r.s(f"{what} period") if mode == MODE_PERIOD and n else 0
        if not -(hi - lo) <= period <= hi - lo:
            raise PayloadError(f"{what} period out of range")
        if not n:
            return []
        items = r.many_s(n - 1, what)
        if step != 1:
            items = [v * step for v in items]
        if period:
            items = [v + period for v in items]
        if mode == MODE_DOD:
            items = list(accumulate(items))
        # Sums in C. Each item is at most 70 bits times the step, n at most 20,000: whatever
        # a crafted column holds, the intermediate ints stay small before the range check.
        out = list(accumulate(items, initial=head))
    if out and (min(out) < lo or max(out) > hi):
        raise PayloadError(f"{what} value out of range")
    return out


def _put_f64(out: bytearray, values: Sequence[float]) -> None:
    # XOR with the previous value zeroes the shared sign/exponent/leading mantissa
    # bits; transposing the bytes puts those zeros next to each other for the
    # compressor (the idea of Gorilla and of byte-shuffle filters).
    bits = struct.unpack(f">{len(values)}Q", struct.pack(f">{len(values)}d", *values))
    xored = [bits[0]] + [a ^ b for a, b in zip(bits, bits[1:])]
    raw = struct.pack(f">{len(xored)}Q", *xored)
    out += b"".join(raw[j::8] for j in range(8))


def _get_f64(r: _Reader, n: int, what: str) -> list[float]:
    planes = r.take(8 * n, what)
    raw = bytearray(8 * n)
    for j in range(8):
        raw[j::8] = planes[j * n : (j + 1) * n]
    xored = struct.unpack(f">{n}Q", raw)
    bits: list[int] = []
    acc = 0
    for x in xored:
        acc ^= x
        bits.append(acc)
    values = list(struct.unpack(f">{n}d", struct.pack(f">{n}Q", *bits)))
    if not all(math.isfinite(v) for v in values):
        raise PayloadError(f"{what} holds a non-finite float")
    return values


def _decimal(v: float) -> tuple[int, int] | None:
    """(m, k) with v == m / 10**k, from the shortest repr; None if there is none.

    Drivers round to 0.1, 0.01 or 1e-7 degrees, so repr gives those digits
    back exactly; m / 10**k is then the same rational as the repr, and Python's
    int / int is correctly rounded, so the decoder gets the identical float.
    """
    text = repr(v)
    if "e" in text or "n" in text or (v == 0.0 and math.copysign(1.0, v) < 0):
        return None  # exponent form, inf/nan, or -0.0 (its sign would be lost)
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    if len(frac) > MAX_SCALE:
        return None
    m = int(whole + frac)  # repr always has a whole part ("0.5", "-0.5")
    return (m, len(frac)) if abs(m) < MAX_EXACT and m / 10 ** len(frac) == v else None


# --- encoder ------------------------------------------------------------------


def _cell_tag(v: Any, decimals: dict[int, tuple[int, int]], i: int) -> int:
    if v is None:
        return TAG_NONE
    if v is True:
        return TAG_TRUE
    if v is False:
        return TAG_FALSE
    if isinstance(v, int):
        return TAG_INT if INT64_MIN <= v <= INT64_MAX else TAG_BIGINT
    if isinstance(v, float):
        if not math.isfinite(v):
            # Version 1 (JSON) cannot carry it either: refuse the same way.
            raise ValueError(f"non-finite float {v!r} cannot be encoded")
        dec = _decimal(v)
        if dec is None:
            return TAG_F64
        decimals[i] = dec
        return TAG_DEC
    if isinstance(v, str):
        return TAG_STR
    raise TypeError(f"value of type {type(v).__name__} cannot be encoded")


def _encode_key(out: bytearray, key: str, samples: Sequence[Sample], strings: _Interner, version: int) -> None:
    cells = [s.values.get(key, _ABSENT) for s in samples]
    decimals: dict[int, tuple[int, int]] = {}
    tags = [TAG_ABSENT if v is _ABSENT else _cell_tag(v, decimals, i) for i, v in enumerate(cells)]
    if decimals:
        # One scale for the column: the finest any value needs. Values that would
        # outgrow the exact range at that scale travel as raw float64 instead.
        scale = max(k for _, k in decimals.values())
        mantissas: dict[int, int] = {}
        for i, (m, k) in decimals.items():
            m *= 10 ** (scale - k)
            if abs(m) < MAX_EXACT:
                mantissas[i] = m
            else:
                tags[i] = TAG_F64
    _put_u(out, strings(key))
    _put_rle(out, tags)
    ints = [cells[i] for i, t in enumerate(tags) if t == TAG_INT]
    decs = [mantissas[i] for i, t in enumerate(tags) if t == TAG_DEC]
    f64s = [cells[i] for i, t in enumerate(tags) if t == TAG_F64]
    if ints:
        _put_ints(out, ints, version)
    if decs:
        _put_u(out, scale)
        _put_ints(out, decs, version)
    if f64s:
        _put_f64(out, f64s)
    for i, t in enumerate(tags):
        if t == TAG_STR:
            _put_u(out, strings(cells[i]))
        elif t == TAG_BIGINT:
            _put_u(out, strings(str(cells[i])))


class _Absent:
    """Marks a key a sample does not have (distinct from a value of None)."""


_ABSENT = _Absent()


def _check_int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not INT64_MIN <= v <= INT64_MAX:
        raise ValueError(f"{what} must be a 64-bit integer, not {v!r}")
    return v


def _encode_stream(
    out: bytearray, samples: Sequence[Sample], first_seq: int, strings: _Interner, flagsets: _Interner,
    version: int = 2, earlier: list[list[int]] | None = None,
) -> None:
    seqs = [_check_int(s.seq, "seq") for s in samples]
    monos = [_check_int(s.t_mono_ms, "t_mono_ms") for s in samples]
    if version >= 4:  # the best of raw, delta, delta of delta and period (below)
        _put_ints4(out, [q - first_seq for q in seqs])
        # The agent reads every sensor in one tick: a stream's clock is best told as its
        # difference from an earlier stream's (reference r, 1-based; 0: none), sample by sample.
        best_ref, best_plan = 0, _plan_ints4(monos)
        for ref, other in enumerate(earlier or (), start=1):
            if len(other) >= len(monos):
                plan = _plan_ints4([m - o for m, o in zip(monos, other)])
                if plan[0] < best_plan[0]:
                    best_ref, best_plan = ref, plan
        _put_u(out, best_ref)
        _, mode, step, items = best_plan
        _put_u(out, mode)
        _put_u(out, step)
        for v in items:
            _put_s(out, v)
        if earlier is not None:
            earlier.append(monos)
    else:
        _put_dod(out, seqs, first_seq)
        _put_dod(out, monos, 0)
    # UTC as its offset from the monotonic clock: both are read at the same
    # moment, so timing jitter is paid once, and the offset only moves on a
    # clock step or correction.
    _put_rle(out, [0 if s.t_utc_ms is None else 1 for s in samples])
    prev = 0
    for s, mono in zip(samples, monos):
        if s.t_utc_ms is not None:
            offset = _check_int(s.t_utc_ms, "t_utc_ms") - mono
            _put_s(out, offset - prev)
            prev = offset
    _put_rle(out, [strings(str(TimeSource(s.time_src))) for s in samples])
    _put_rle(out, [flagsets(tuple(s.flags)) for s in samples])
    _put_rle(out, [strings(s.boot_id) for s in samples])
    keys = sorted({k for s in samples for k in s.values})
    _put_u(out, len(keys))
    for key in keys:
        _encode_key(out, key, samples, strings, version)


def encode_plain(batch: Batch, version: int = 2) -> bytes:
    """The uncompressed version 2 (or 3) body (the layout of docs/wire-format.md)."""
    static = STATIC_STRINGS_V3 if version >= 3 else ()
    strings, flagsets = _Interner(), _Interner()
    for text in static:
        strings(text)
    streams: dict[str, list[Sample]] = {}
    for s in batch.samples:
        streams.setdefault(s.sensor, []).append(s)
    stream_of = {name: i for i, name in enumerate(streams)}
    sensor_ids = [strings(name) for name in streams]
    tail = bytearray()
    order = [stream_of[s.sensor] for s in batch.samples]
    if version >= 4:
        seqs = [s.seq for s in batch.samples]
        by_seq = all(isinstance(q, int) for q in seqs) and all(a < b for a, b in zip(seqs, seqs[1:]))
        _put_u(tail, ORDER_BY_SEQ if by_seq else ORDER_RLE)
        if by_seq:  # the order follows from the seqs: only each stream's size
            for group in streams.values():
                _put_u(tail, len(group))
        else:
            _put_rle(tail, order)
    else:
        _put_rle(tail, order)
    earlier: list[list[int]] = []  # the clocks of the streams already written (version 4)
    for group in streams.values():
        _encode_stream(tail, group, batch.first_seq, strings, flagsets, version, earlier)
    _put_u(tail, len(batch.gaps))
    for g in batch.gaps:
        _put_s(tail, g.first_seq - batch.first_seq)
        _put_s(tail, g.last_seq - g.first_seq)
        _put_u(tail, strings(g.reason))
    # Flag strings join the string table before it is written out.
    flag_rows = [[strings(f) for f in fs] for fs in flagsets.items()]

    out = bytearray()
    put_str = _put_str4 if version >= 4 else _put_str
    put_str(out, batch.device)
    put_str(out, batch.epoch)
    _put_s(out, batch.first_seq)
    _put_s(out, batch.last_seq - batch.first_seq)
    table = strings.items()[len(static):]
    _put_u(out, len(table))
    for text in table:
        put_str(out, text)
    _put_u(out, len(flag_rows))
    for row in flag_rows:
        _put_u(out, len(row))
        for i in row:
            _put_u(out, i)
    _put_u(out, len(batch.samples))
    _put_u(out, len(sensor_ids))
    for i in sensor_ids:
        _put_u(out, i)
    return bytes(out + tail)


def _compress(method: int, plain: bytes, version: int = 2) -> bytes:
    if method == COMP_ZLIB:
        return zlib.compress(plain, 9)
    if method == COMP_LZMA2:
        filters = _LZMA_ENC_FILTERS_V4 if version >= 4 else _LZMA_ENC_FILTERS
        return lzma.compress(plain, format=lzma.FORMAT_RAW, filters=filters)
    return plain


def pack(plain: bytes, method: int, version: int = 2) -> bytes:
    """Body = method byte | CRC-32 of the plain body | compressed plain body.

    The CRC catches a flipped bit in a batch that sat on an SD card before it
    reaches the store (raw LZMA2 has no checksum of its own).
    """
    return bytes([method]) + struct.pack(">I", zlib.crc32(plain)) + _compress(method, plain, version)


def encode_v2(batch: Batch, version: int = 2) -> bytes:
    """The version 2 (or 3) body of a batch. Deterministic: the smallest of the
    compressions, ties to the lower method number."""
    plain = encode_plain(batch, version)
    return min((pack(plain, m, version) for m in COMPRESSIONS), key=len)


# --- decoder ------------------------------------------------------------------


def _inflate(method: int, data: bytes) -> bytes:
    limit = MAX_DECOMPRESSED_BYTES
    if method == COMP_STORED:
        out, done, rest = data, True, b""
        if len(out) > limit:
            raise PayloadError(f"body inflates to more than {limit} bytes")
    elif method == COMP_ZLIB:
        z = zlib.decompressobj()
        try:
            out = z.decompress(data, limit)
        except zlib.error as exc:
            raise PayloadError(f"body is not valid zlib data: {exc}") from exc
        if z.unconsumed_tail:
            raise PayloadError(f"body inflates to more than {limit} bytes")
        done, rest = z.eof, z.unused_data
    elif method == COMP_LZMA2:
        x = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_DEC_FILTERS)
        try:
            out = x.decompress(data, limit)
        except lzma.LZMAError as exc:
            raise PayloadError(f"body is not valid LZMA2 data: {exc}") from exc
        if not x.eof and not x.needs_input:
            raise PayloadError(f"body inflates to more than {limit} bytes")
        done, rest = x.eof, x.unused_data
    else:
        raise PayloadError(f"unknown compression method {method}")
    if not done:
        raise PayloadError("body is truncated")
    if rest:
        raise PayloadError("trailing bytes after the compressed body")
    return out


def unpack(body: bytes) -> bytes:
    """The plain body from method byte, CRC and compressed data; checked."""
    if len(body) < 5:
        raise PayloadError("body is truncated")
    plain = _inflate(body[0], body[5:])
    if zlib.crc32(plain) != struct.unpack(">I", body[1:5])[0]:
        raise PayloadError("body checksum mismatch (corrupted in storage or transit)")
    return plain


def _decode_key(
    r: _Reader, n: int, strings: list[str], version: int = 2
) -> tuple[str, list[int], dict[int, list[Any]]]:
    key = strings[r.index("value key", len(strings))]
    tags = _get_rle(r, n, N_TAGS, f"tags of {key!r}")
    counts = [0] * N_TAGS
    for t in tags:
        counts[t] += 1
    cols: dict[int, list[Any]] = {}
    if counts[TAG_INT]:
        cols[TAG_INT] = _get_ints(r, counts[TAG_INT], INT64_MIN, INT64_MAX, f"ints of {key!r}", version)
    if counts[TAG_DEC]:
        scale = r.u(f"scale of {key!r}")
        if scale > MAX_SCALE:
            raise PayloadError(f"scale {scale} of {key!r} exceeds {MAX_SCALE}")
        ms = _get_ints(r, counts[TAG_DEC], 1 - MAX_EXACT, MAX_EXACT - 1, f"decimals of {key!r}", version)
        div = 10**scale
        cols[TAG_DEC] = [m / div for m in ms]
    if counts[TAG_F64]:
        cols[TAG_F64] = _get_f64(r, counts[TAG_F64], f"floats of {key!r}")
    if counts[TAG_STR] or counts[TAG_BIGINT]:
        # Strings and big ints share one column, in sample order.
        n_refs = counts[TAG_STR] + counts[TAG_BIGINT]
        refs = [strings[r.index(f"string of {key!r}", len(strings))] for _ in range(n_refs)]
        texts = iter(refs)
        cols[TAG_STR], cols[TAG_BIGINT] = [], []
        for t in tags:
            if t == TAG_STR:
                cols[TAG_STR].append(next(texts))
            elif t == TAG_BIGINT:
                cols[TAG_BIGINT].append(_bigint(next(texts), key))
    return key, tags, cols


def _bigint(text: str, key: str) -> int:
    if len(text) > _BIGINT_MAX_DIGITS or not text.lstrip("-").isdigit() or not text.isascii():
        raise PayloadError(f"bad big integer in {key!r}")
    v = int(text)
    if INT64_MIN <= v <= INT64_MAX:
        raise PayloadError(f"big integer in {key!r} fits 64 bits (not canonical)")
    return v


def _decode_stream(
    r: _Reader,
    sensor: str,
    n: int,
    first_seq: int,
    strings: list[str],
    flagsets: list[tuple[str, ...]],
    cells_left: int,
    version: int = 2,
    earlier: list[list[int]] | None = None,
) -> tuple[list[Sample], int]:
    if version >= 4:
        # Seqs relative to the batch's first: 0 .. 2^63-1 - first keeps every seq within 64 bits.
        seqs = [first_seq + q for q in _get_ints4(r, n, 0, INT64_MAX - first_seq, f"seq of {sensor!r}")]
        earlier = [] if earlier is None else earlier
        ref = r.u(f"t_mono_ms reference of {sensor!r}")
        if ref > len(earlier) or ref and len(earlier[ref - 1]) < n:
            raise PayloadError(f"t_mono_ms of {sensor!r} refers to no earlier stream of {n} samples")
        if ref:
            diffs = _get_ints4(r, n, 2 * INT64_MIN, 2 * INT64_MAX + 1, f"t_mono_ms of {sensor!r}")
            monos = [o + d for o, d in zip(earlier[ref - 1], diffs)]
            if min(monos) < INT64_MIN or max(monos) > INT64_MAX:
                raise PayloadError(f"t_mono_ms of {sensor!r} leaves the 64-bit range")
        else:
            monos = _get_ints4(r, n, INT64_MIN, INT64_MAX, f"t_mono_ms of {sensor!r}")
        earlier.append(monos)
    else:
        seqs = _get_dod(r, n, first_seq, f"seq of {sensor!r}")
        monos = _get_dod(r, n, 0, f"t_mono_ms of {sensor!r}")
    has_utc = _get_rle(r, n, 2, f"t_utc_ms presence of {sensor!r}")
    offsets = accumulate(r.many_s(sum(has_utc), f"t_utc_ms of {sensor!r}"))
    utcs: list[int | None] = [mono + next(offsets) if present else None for present, mono in zip(has_utc, monos)]
    present_utcs = [t for t in utcs if t is not None]
    if present_utcs and (min(present_utcs) < INT64_MIN or max(present_utcs) > INT64_MAX):
        raise PayloadError(f"t_utc_ms of {sensor!r} leaves the 64-bit range")
    src_of: dict[int, TimeSource] = {}  # a batch has one or two: look each up once
    srcs: list[TimeSource] = []
    for i in _get_rle(r, n, len(strings), f"time sources of {sensor!r}"):
        src = src_of.get(i)
        if src is None:
            try:
                src = src_of[i] = TimeSource(strings[i])
            except ValueError as exc:
                raise PayloadError(f"unknown time source {strings[i]!r}") from exc
        srcs.append(src)
    flags = _get_rle(r, n, len(flagsets), f"flags of {sensor!r}")
    boots = _get_rle(r, n, len(strings), f"boot ids of {sensor!r}")
    n_keys = r.count(f"key count of {sensor!r}", r.left())
    if n_keys * n > cells_left:
        raise PayloadError(f"more than {MAX_VALUE_CELLS} value cells in the batch")
    values: list[dict[str, Any]] = [{} for _ in range(n)]
    seen: set[str] = set()
    for _ in range(n_keys):
        key, tags, cols = _decode_key(r, n, strings, version)
        if key in seen:
            raise PayloadError(f"key {key!r} appears twice for {sensor!r}")
        seen.add(key)
        only = tags[0] if tags.count(tags[0]) == n else None
        if only is not None and only in cols:  # the common case: one column holds every sample's value
            for vals, v in zip(values, cols[only]):
                vals[key] = v
            continue
        its = {t: iter(c) for t, c in cols.items()}
        for vals, t in zip(values, tags):
            if t == TAG_ABSENT:
                continue
            vals[key] = _CONST_TAG_VALUES[t] if t in _CONST_TAG_VALUES else next(its[t])
    samples = [
        Sample(sensor, utcs[i], monos[i], srcs[i], values[i], flagsets[flags[i]], seqs[i], strings[boots[i]])
        for i in range(n)
    ]
    return samples, cells_left - n_keys * n


def decode_plain(plain: bytes, version: int = 2) -> Batch:
    """A Batch from the uncompressed body. Structure only: the checks both
    versions share (range, duplicates, gaps) are ``core.wire``'s."""
    r = _Reader(plain)
    device = r.string("device", version)
    epoch = r.string("epoch", version)
    first = r.s("first_seq")
    last = first + r.s("sequence span")
    n_own = r.count("string count", r.left())
    strings = list(STATIC_STRINGS_V3 if version >= 3 else ()) + [r.string("string", version) for _ in range(n_own)]
    n_strings = len(strings)
    flagsets: list[tuple[str, ...]] = []
    for _ in range(r.count("flag set count", r.left())):
        k = r.count("flag set size", r.left())
        flagsets.append(tuple(strings[r.index("flag", n_strings)] for _ in range(k)))
    n = r.count("sample count", MAX_SAMPLES_PER_BATCH)
    if n > max(0, last - first + 1):
        raise PayloadError(f"{n} samples cannot fit the sequence range {first}-{last}")
    n_streams = r.count("stream count", n)
    sensors = [strings[r.index("sensor", n_strings)] for _ in range(n_streams)]
    if len(set(sensors)) != n_streams or not all(sensors):
        raise PayloadError("sensor names must be unique and non-empty")
    order_mode = r.u("stream order mode") if version >= 4 else ORDER_RLE
    order: list[int] | None = None
    if order_mode == ORDER_RLE:
        order = _get_rle(r, n, n_streams, "stream order")
        sizes = [0] * n_streams
        for i in order:
            sizes[i] += 1
    elif order_mode == ORDER_BY_SEQ:
        sizes = [r.count("stream size", n) for _ in range(n_streams)]
        if sum(sizes) != n:
            raise PayloadError(f"stream sizes do not add up to {n}")
    else:
        raise PayloadError(f"unknown stream order mode {order_mode}")
    if not all(sizes):
        raise PayloadError("a stream without samples")
    per_stream: list[list[Sample]] = []
    cells_left = MAX_VALUE_CELLS
    earlier: list[list[int]] = []
    for sensor, size in zip(sensors, sizes):
        group, cells_left = _decode_stream(r, sensor, size, first, strings, flagsets, cells_left, version,
                                           earlier)
        per_stream.append(group)
    gaps: list[Gap] = []
    for _ in range(r.count("gap count", r.left())):
        g_first = first + r.s("gap start")
        g_last = g_first + r.s("gap length")
        gaps.append(Gap(g_first, g_last, strings[r.index("gap reason", n_strings)]))
    if r.left():
        raise PayloadError(f"{r.left()} unexpected bytes after the body")
    if order is None:
        # In sequence order: the encoder said so. Two samples with one seq are refused by
        # core.wire's checks; within a stream the seqs must rise, as the encoder saw them.
        for g in per_stream:
            if any(a.seq >= b.seq for a, b in zip(g, g[1:])):  # type: ignore[operator]
                raise PayloadError("a stream's seqs do not rise in sequence-ordered batch")
        samples = sorted((s for g in per_stream for s in g), key=lambda s: s.seq)  # type: ignore[arg-type,return-value]
        return Batch(device, epoch, first, last, samples, gaps)
    # Back to the original order: each sample is the next one of its stream.
    iters = [iter(g) for g in per_stream]
    samples = [next(iters[i]) for i in order]
    return Batch(device, epoch, first, last, samples, gaps)


def decode_v2(body: bytes, plain: bytes | None = None, version: int = 2) -> Batch:
    """A Batch from a version 2 (or 3) body (after MAGIC and the version byte); ``plain``: the body
    already unpacked (checked) by the caller, so it is not inflated twice (the receiver's budget)."""
    plain = unpack(body) if plain is None else plain
    try:
        return decode_plain(plain, version)
    except PayloadError:
        raise
    except (IndexError, KeyError, ValueError, TypeError, OverflowError, StopIteration, struct.error) as exc:
        # Belt and braces: a payload must never turn into an exception the
        # receiver would take for a store failure and retry forever.
        raise PayloadError(f"malformed version 2 body: {exc!r}") from exc


__all__ = [
    "MAX_VALUE_CELLS",
    "STATIC_STRINGS_V3",
    "decode_plain",
    "decode_v2",
    "encode_plain",
    "encode_v2",
    "pack",
    "unpack",
]
