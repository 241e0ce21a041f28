"""Wire version 2: lossless round trips, determinism, versioning, bounds and fuzzing.

The oracle for "lossless" is strict: every decoded value has the same type and
the same repr as the original (so -0.0 stays -0.0, 1 stays an int, True stays a
bool), not merely ``==``.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import time
import tracemalloc
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.clock import SimClock
from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.timekeeping import TimeKeeper
from simulator.value_sensors import SIM_DRIVERS
from simulator.world import VanWorld
from core import codec_v2, wire
from core.codec_v2 import (
    COMP_LZMA2,
    COMP_STORED,
    COMP_ZLIB,
    STATIC_STRINGS_V3,
    decode_plain,
    encode_plain,
    encode_v2,
    pack,
)
from core.wire import Batch, Gap, decode_batch, encode_batch

FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
V2 = wire.MAGIC + bytes([wire.VERSION_COLUMNAR])
DEFAULT = wire.MAGIC + bytes([wire.DEFAULT_VERSION])  # what a van sends
BOOT = "3f9c2a71-5d7e-4b0e-9a53-0c1f4e2d8b66"
START = 1_795_588_200.0


# -- helpers ------------------------------------------------------------------------


def strict(v: Any) -> Any:
    """A value with its type made visible: 1, 1.0, True and -0.0 all differ."""
    if isinstance(v, float):
        return ("float", repr(v))
    return (type(v).__name__, v)


def sample_key(s: Sample) -> tuple:
    return (
        s.seq, s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.flags, s.boot_id,
        sorted((k, strict(v)) for k, v in s.values.items()),
    )


def assert_same(a: Batch, b: Batch) -> None:
    assert (a.device, a.epoch, a.first_seq, a.last_seq) == (b.device, b.epoch, b.first_seq, b.last_seq)
    assert [sample_key(s) for s in a.samples] == [sample_key(s) for s in b.samples]
    assert a.gaps == b.gaps


def roundtrip(b: Batch) -> Batch:
    payload = encode_batch(b)
    assert payload[:4] == DEFAULT
    back = decode_batch(payload)
    assert_same(back, b)
    return back


def sim_batch(ticks: int, *, skip_s: float = 0.0, unsync_for_s: float = 0.0, first: int = 1) -> Batch:
    """Samples the way the agent takes them, from the value-level simulator."""
    clock = SimClock(START, trusted_after=unsync_for_s, boot_error_s=-86_400.0 if unsync_for_s else 0.0)
    world = VanWorld(clock, shift_start_utc=START, seed=3)
    drivers = [SIM_DRIVERS[k](world) for k in ("sim-pm", "sim-no2", "sim-noise", "sim-gps")]
    keeper = TimeKeeper(clock, [d for d in drivers if hasattr(d, "time_fix")])
    clock.advance(skip_s)
    samples, seq = [], first
    for _ in range(ticks):
        keeper.update()
        for d in drivers:
            r = d.read()
            st_ = keeper.stamp()
            samples.append(Sample(r.sensor, st_.t_utc_ms, st_.t_mono_ms, st_.source, dict(r.values),
                                  r.flags, seq, BOOT))
            seq += 1
        clock.advance(1.0)
    return Batch("van-001", "5b47e51bc31f3c38", first, seq - 1, samples)


def messy_batch() -> Batch:
    """Everything the format must carry that a calm simulated drive does not show."""
    t0, m0 = 1_795_588_200_000, 1_000_000
    samples = []
    seq = 10
    for i in range(60):
        t_mono = m0 + i * 1000 + (i * 7) % 13  # read jitter
        # An NTP step back by 2 s at i=30: UTC goes backwards, monotonic does not.
        t_utc: int | None = t0 + i * 1000 + (i * 7) % 13 - (2000 if i >= 30 else 0)
        src = TimeSource.UNSYNC if i < 10 else TimeSource.CORRECTED if i < 20 else TimeSource.NTP
        if i < 5:
            t_utc = None  # an impossible year: the time is unknown
        values: dict[str, Any] = {
            "pm25": None if i % 11 == 0 else round(10 + (i % 7) * 0.3, 1),
            "pm1_cf1": i % 5,  # an int column
            "no2_we_mv": 250.25 if i % 2 else 251,  # mixed int and float under one key
            "count_0_3": 1200 + i * 3 if i > 3 else None,
        }
        if i % 9 == 0:
            values["note"] = "fan stalled" if i % 2 else "ünïcödé ✓"
        if i == 40:
            values.update({"neg_zero": -0.0, "third": 1 / 3, "huge": 1e300, "tiny": 5e-324,
                           "big": 2**80, "neg_big": -(2**70), "ok": True, "bad": False,
                           "i64": 2**63 - 1, "i64min": -(2**63)})
        if i == 50:
            values = {}  # a sample with no values at all
        flags = ("warming_up",) if i < 8 else ("warming_up", "no_fix") if i == 8 else ()
        samples.append(Sample("pm", t_utc, t_mono, src, values, flags, seq, "boot-a" if i < 45 else "boot-b"))
        seq += 4 if i != 20 else 9  # +4 interleave, one hole
        if i % 3 == 0:
            samples.append(Sample("gps", t_utc, t_mono + 2, src,
                                  {"lat": round(52.1 + i * 1.3e-5, 7), "lon": round(4.6 - i * 2e-5, 7),
                                   "fix_quality": 1, "sats_used": 7 + i % 4},
                                  (), seq - 1, "boot-a" if i < 45 else "boot-b"))
    last = max(s.seq for s in samples)
    gaps = [Gap(1, 9, "buffer full: dropped oldest"), Gap(last + 5, last + 5, "rejected: bad batch")]
    return Batch("van-007", "e9", 1, last, samples, gaps)


# -- round trips --------------------------------------------------------------------


def test_simulated_shift_start_round_trips():
    # The first minutes: warming_up and no_fix flags, GPS without fix, then with.
    roundtrip(sim_batch(60))


def test_simulated_mid_shift_batch_round_trips_and_is_small():
    b = sim_batch(500, skip_s=900)
    assert len(b.samples) == 2000
    roundtrip(b)
    n_values = sum(len(s.values) for s in b.samples)
    assert len(encode_batch(b)) / n_values < 1.5  # bytes per value, before MQTT overhead
    assert len(encode_batch(b)) * 3 < len(encode_batch(b, version=1))


def test_unsync_clock_round_trips():
    b = sim_batch(40, unsync_for_s=20.0)
    assert {s.time_src for s in b.samples} >= {TimeSource.UNSYNC}
    roundtrip(b)


def test_messy_batch_round_trips_exactly():
    back = roundtrip(messy_batch())
    s40 = next(s for s in back.samples if s.values.get("huge"))
    assert math.copysign(1.0, s40.values["neg_zero"]) < 0
    assert type(s40.values["ok"]) is bool and type(s40.values["big"]) is int
    assert back.samples[0].t_utc_ms is None
    assert back.samples[0].flags == ("warming_up",)


def test_sample_order_is_kept_even_when_not_by_seq():
    b = messy_batch()
    shuffled = dataclasses.replace(b, samples=b.samples[::-1])
    roundtrip(shuffled)


def test_gaps_only_and_single_sample_batches():
    roundtrip(Batch("van-001", "ab", 5, 9, [], [Gap(5, 9, "corrupt buffer quarantined")]))
    roundtrip(Batch("van-001", "ab", 7, 7, [Sample("noise", None, 0, TimeSource.UNSYNC, {}, (), 7, "")]))


def test_decimal_columns_are_scaled_and_odd_floats_are_raw():
    vals = [round(52.1 + i * 1e-7, 7) for i in range(50)] + [0.1 + 0.2, float(2**60), 1e-5]
    b = Batch("v", "e", 1, len(vals), [
        Sample("gps", 1, i, TimeSource.GPS, {"x": v}, (), i + 1, "") for i, v in enumerate(vals)
    ])
    back = roundtrip(b)
    assert [s.values["x"] for s in back.samples] == vals


# -- determinism and versions -------------------------------------------------------


def test_same_batch_same_bytes():
    a, b = messy_batch(), messy_batch()
    assert encode_batch(a) == encode_batch(b)
    assert encode_v2(a) == encode_v2(b)
    # Dict insertion order does not matter either (the receiver hashes the bytes).
    b.samples[0].values = dict(reversed(list(b.samples[0].values.items())))
    assert encode_batch(a) == encode_batch(b)


def test_default_is_v4_and_v1_v2_v3_still_encode_and_decode():
    b = messy_batch()
    assert encode_batch(b)[3] == wire.VERSION_COMPACT == 4
    for version in (wire.VERSION_JSON, wire.VERSION_COLUMNAR, wire.VERSION_COLUMNAR_STATIC):
        old = encode_batch(b, version=version)
        assert old[:4] == wire.MAGIC + bytes([version])
        back = decode_batch(old)
        assert back.samples == b.samples and back.gaps == b.gaps
    assert set(wire.SUPPORTED_VERSIONS) == {1, 2, 3, 4}


def test_v3_sends_only_the_strings_it_does_not_know():
    """Version 3: known key names come from the built-in table; the rest travel as in version 2."""
    b = messy_batch()
    v2, v3 = encode_batch(b, version=2), encode_batch(b, version=3)
    assert_same(decode_batch(v3), b)
    plain2, plain3 = encode_plain(b, 2), encode_plain(b, 3)
    assert b"pm25" in plain2 and b"pm25" not in plain3  # a known key: an index only
    assert b"count_0_3" in plain3 and b"boot-a" in plain3  # unknown strings still travel
    assert len(plain3) < len(plain2)
    # The version byte decides how the table is read: a v3 body read as v2 is wrong or refused.
    with pytest.raises(PayloadError):
        assert decode_batch(wire.MAGIC + b"\x02" + v3[4:]).samples != b.samples


def test_v3_string_index_beyond_both_tables_is_refused():
    def body(sensor_index: int) -> bytes:
        out = bytearray()
        codec_v2._put_str(out, "van-1")
        codec_v2._put_str(out, "e1")
        for n in (1, 0):  # first_seq, span
            codec_v2._put_s(out, n)
        for n in (0, 0, 1, 1, sensor_index):  # own strings, flag sets, samples, streams, sensor
            codec_v2._put_u(out, n)
        return bytes(out)

    n_known = len(STATIC_STRINGS_V3)
    # The last built-in string is a valid sensor index (decoding goes on to the next field) ...
    with pytest.raises(PayloadError, match="stream order"):
        decode_plain(body(n_known - 1), 3)
    # ... one past it, with no strings of the batch's own, is refused as such.
    with pytest.raises(PayloadError, match="sensor"):
        decode_plain(body(n_known), 3)


def test_unknown_version_is_refused():
    body = encode_v2(messy_batch())
    for v in (0, 5, 255):
        with pytest.raises(PayloadError, match=f"unsupported wire version {v}"):
            decode_batch(wire.MAGIC + bytes([v]) + body)
    with pytest.raises(ValueError):
        encode_batch(messy_batch(), version=5)


def test_all_compressions_decode():
    plain = encode_plain(messy_batch())
    for method in (COMP_STORED, COMP_ZLIB, COMP_LZMA2):
        assert_same(decode_batch(V2 + pack(plain, method)), messy_batch())
    with pytest.raises(PayloadError, match="unknown compression method 9"):
        decode_batch(V2 + bytes([9]) + pack(plain, COMP_STORED)[1:])


def test_non_finite_floats_are_refused_like_v1():
    b = Batch("v", "e", 1, 1, [Sample("pm", 1, 1, TimeSource.NTP, {"x": math.nan}, (), 1, "")])
    with pytest.raises(ValueError):
        encode_batch(b, version=1)
    with pytest.raises(ValueError):
        encode_batch(b)


# -- the checks both versions share --------------------------------------------------


def _one(seq: int, **kw: Any) -> Sample:
    return Sample("pm", 1_795_588_200_000, 1000, TimeSource.NTP, {"pm25": 1.5}, (), seq, "b", **kw)


@pytest.mark.parametrize(
    "batch, reason",
    [
        (Batch("v", "e", 1, 2, [_one(1), _one(7)]), "outside the batch range"),
        (Batch("v", "e", 1, 3, [_one(2), _one(2)]), "appears twice"),
        (Batch("v", "e", 5, 1, []), "bad sequence range"),
        (Batch("v", "e", 0, 1, [_one(1)]), "bad sequence range"),
        (Batch("v", "e", 1, 1, [_one(1)], [Gap(9, 3, "x")]), "a gap must be"),
    ],
)
def test_shared_validation_applies_to_v2(batch, reason):
    for version in (1, 2):
        with pytest.raises(PayloadError, match=reason):
            decode_batch(encode_batch(batch, version=version))


# -- bounds --------------------------------------------------------------------------


def _put_u(n: int) -> bytes:
    out = bytearray()
    codec_v2._put_u(out, n)
    return bytes(out)


def _put_s(n: int) -> bytes:
    return _put_u(codec_v2._zigzag(n))


def _header(first: int = 1, span: int = 10**12, strings: tuple[str, ...] = ("pm",)) -> bytes:
    out = _put_u(1) + b"v" + _put_u(1) + b"e" + _put_s(first) + _put_s(span) + _put_u(len(strings))
    for s in strings:
        out += _put_u(len(s)) + s.encode()
    return out + _put_u(0)  # no flag sets


def _refused_cheaply(plain: bytes, reason: str) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(PayloadError, match=reason):
            decode_batch(V2 + pack(plain, COMP_ZLIB))
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 2_000_000


def test_a_billion_samples_is_refused_without_allocating():
    _refused_cheaply(_header() + _put_u(10**9) + _put_u(1) + _put_u(0), "sample count 1000000000 exceeds")


def test_crafted_counts_are_refused_without_allocating():
    # A billion strings, flag sets, runs or keys announced in a few bytes.
    _refused_cheaply(_put_u(1) + b"v" + _put_u(1) + b"e" + _put_s(1) + _put_s(5) + _put_u(10**9),
                     "string count")
    _refused_cheaply(_header()[:-1] + _put_u(10**9), "flag set count")
    stream = _header() + _put_u(3) + _put_u(1) + _put_u(0)  # 3 samples, one stream "pm"
    _refused_cheaply(stream + _put_u(10**9), "stream order run count")
    _refused_cheaply(stream + _put_u(1) + _put_u(0) + _put_u(10**9), "runs do not add up")
    _refused_cheaply(stream + _put_u(1) + _put_u(5) + _put_u(3), "stream order 5 out of range")


def test_value_grid_bound():
    cells = codec_v2.MAX_VALUE_CELLS // 1000 + 1
    b = Batch("v", "e", 1, 1000, [
        Sample("pm", None, i, TimeSource.UNSYNC, {}, (), i + 1, "") for i in range(1000)
    ])
    plain = bytearray(encode_plain(b))
    # Replace the key count (a trailing 0 before the gap count 0) with far too many keys.
    assert plain[-2:] == b"\x00\x00"
    _refused_cheaply(bytes(plain[:-2]) + _put_u(cells) + b"\x00" * (cells + 10), "value cells")


def test_oversized_zip_bomb_and_trailing_bytes_are_refused():
    with pytest.raises(PayloadError, match="exceeds"):
        decode_batch(V2 + b"\0" * wire.MAX_PAYLOAD_BYTES)
    zeros = b"\0" * (wire.MAX_DECOMPRESSED_BYTES + 10)
    for method in (COMP_ZLIB, COMP_LZMA2):
        bomb = V2 + pack(zeros, method)
        assert len(bomb) < wire.MAX_PAYLOAD_BYTES
        with pytest.raises(PayloadError, match="inflates to more than"):
            decode_batch(bomb)
    good = encode_batch(messy_batch())
    with pytest.raises(PayloadError, match="trailing bytes"):
        decode_batch(good + b"x")
    plain = encode_plain(messy_batch())
    with pytest.raises(PayloadError, match="unexpected bytes after the body"):
        decode_batch(V2 + pack(plain + b"\x00", COMP_STORED))


def test_checksum_catches_a_flipped_bit_in_storage():
    plain = bytearray(encode_plain(messy_batch()))
    body = bytearray(pack(bytes(plain), COMP_STORED))
    body[40] ^= 0x10
    with pytest.raises(PayloadError, match="checksum mismatch"):
        decode_batch(V2 + bytes(body))


def test_every_truncation_is_refused():
    payload = encode_batch(messy_batch())
    for n in range(len(payload)):
        with pytest.raises(PayloadError):
            decode_batch(payload[:n])
    plain = encode_plain(messy_batch())
    for n in range(len(plain)):
        with pytest.raises(PayloadError):
            decode_plain(plain[:n])


# -- fuzzing -------------------------------------------------------------------------

_SMALL = encode_plain(messy_batch())
_VALID = encode_batch(messy_batch())


def _decodes_or_refuses(payload: bytes) -> None:
    try:
        b = decode_batch(payload)
    except PayloadError:
        return
    assert isinstance(b, Batch)


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bodies_are_refused(data):
    _decodes_or_refuses(V2 + data)
    _decodes_or_refuses(wire.MAGIC + b"\x01" + data)


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from([COMP_STORED, COMP_ZLIB, COMP_LZMA2]))
def test_random_plain_bodies_with_a_valid_checksum_are_refused(data, method):
    _decodes_or_refuses(V2 + pack(data, method))


@FUZZ
@given(st.data())
def test_bit_flips_of_valid_payloads(data):
    buf = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(4, len(buf) - 1))
        buf[pos] ^= 1 << data.draw(st.integers(0, 7))
    _decodes_or_refuses(bytes(buf))


@FUZZ
@given(st.data())
def test_mutations_behind_a_valid_checksum(data):
    # Past the CRC, straight into the parser: flips, byte edits, cuts and inserts.
    plain = bytearray(_SMALL)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(plain) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            plain[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            plain[pos] = data.draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif op == "cut":
            del plain[pos : pos + data.draw(st.integers(1, 8))]
        else:
            plain[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        if not plain:
            plain = bytearray(b"\x00")
    _decodes_or_refuses(V2 + pack(bytes(plain), COMP_STORED))


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**6), 10**6).map(lambda i: i / 10),
    st.integers(-(10**9), 10**9).map(lambda i: round(i * 1e-7, 7)),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_sample_parts = st.tuples(
    st.sampled_from(["pm", "no2", "noise", "gps", "x✓"]),
    st.one_of(st.none(), st.integers(-(2**62), 2**62)),
    st.integers(-(2**62), 2**62),
    st.sampled_from(list(TimeSource)),
    st.dictionaries(st.sampled_from(["pm25", "pm10", "lat", "n", "", "é"]), _values, max_size=5),
    st.lists(st.sampled_from(["warming_up", "no_fix", "fan", ""]), max_size=3).map(tuple),
    st.sampled_from(["", "boot-a", "boot-b"]),
)


@FUZZ
@given(
    st.lists(_sample_parts, max_size=40),
    st.integers(1, 2**40),
    st.randoms(use_true_random=False),
    st.lists(st.tuples(st.integers(-5, 50), st.integers(0, 9), st.text(max_size=5)), max_size=3),
)
def test_any_batch_round_trips(parts, first, rnd, gap_parts):
    seqs = list(range(first, first + 2 * len(parts) + 1, 2))[: len(parts)]
    rnd.shuffle(seqs)
    samples = [Sample(p[0], p[1], p[2], p[3], p[4], p[5], q, p[6]) for p, q in zip(parts, seqs)]
    last = first + 2 * len(parts)
    gaps = [Gap(max(1, first + a), max(1, first + a) + ln, r) for a, ln, r in gap_parts]
    b = Batch("van-001", "ep", first, last, samples, gaps)
    roundtrip(b)
    assert encode_batch(b) == encode_batch(b)


def test_store_seals_v2(tmp_path):
    from buffer.store import Buffer

    buf = Buffer(tmp_path / "b.sqlite", "van-001")
    b = sim_batch(30)
    buf.commit([dataclasses.replace(s, seq=None) for s in b.samples])
    sealed = buf.seal(1000, 0)
    assert sealed is not None and sealed.payload[:4] == DEFAULT
    back = decode_batch(sealed.payload)
    assert [sample_key(s) for s in back.samples] == [sample_key(s) for s in b.samples]
    buf.close()


def test_header_is_what_the_docs_say():
    # "DLB", version 4 (2's envelope), compression method, CRC-32 (big-endian) of the plain body.
    plain = encode_plain(messy_batch(), 4)
    payload = encode_batch(messy_batch())
    assert payload[:4] == b"DLB\x04"
    assert payload[4] in (COMP_STORED, COMP_ZLIB, COMP_LZMA2)
    assert struct.unpack(">I", payload[5:9])[0] == zlib.crc32(plain)
