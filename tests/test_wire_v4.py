"""Wire version 4 (issue #18): int columns with a common step and four modes, stream order from the
seqs, clocks against their period; lossless on edge-of-type values; older versions still decode."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import codec_v2, wire
from core.codec_v2 import (
    MODE_DELTA,
    MODE_DOD,
    MODE_PERIOD,
    MODE_RAW,
    ORDER_BY_SEQ,
    ORDER_RLE,
    _Reader,
    _get_ints,
    _put_ints,
    decode_plain,
    encode_plain,
)
from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.wire import Batch, decode_batch, encode_batch
from tests.test_wire_v2 import assert_same, messy_batch, sim_batch

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# Bytes the encoder of the previous release wrote (main before issue #18's version 4), frozen
# here: a van not yet updated keeps sending these, and they must decode to the same batch.
OLD_V2 = bytes.fromhex(
    "444c420202ce3d7db5e0010000da5d00039e88c404c27c75b814e1c636c07d8e439a6e1910d61e7b84d5973b24c4"
    "550873a8729ba7b4c51bfe99fe7cee8bd1bfb6adafedd56a412bef2645d2382b9ea3aa621a1d5181d0f660a33ab9"
    "28794159b27970259050013d168111a696bfe9bca0a89d2912ad5cb9c55b353f28a7c8360165172435f03f767ce9"
    "f0c5a0ffdda4438d1c8f182c9e39b63db67c19edf20272bd5371170783fb46fc700dc06fc8938187216f9c94dab"
    "f36ced943528a4a06d12896a18d5cf5685075af917af53ffa571fab013eaa08324cd05823e8afcb1898b0856cbaa"
    "9a3f60a0000")
OLD_V3 = bytes.fromhex(
    "444c420302bfae94ace000d500b85d00039e88c404c27c75b814e1c636c0758e3789b8442fe090f6596d8d1e04f4"
    "60e5f20c6fdf83498f337ad6fe910cdb05b64c508938d78e1a7042cb380d90e0f6e06ba15ed0097591f7e0d0e8f"
    "585f3a94123e74284f3b98a82aecac92eafbb0a1d9fe15f763a34f9753eeace0bba2366a2ca0d5bfeb6957426cf"
    "c45639bd3cfb0891d0f50b97fc36a773498f9f95ff246459108cf6b19f24e28eed79dd33bc1061ccda03f994558"
    "a72fc56fa5c4e3c8ad66b38f6e96ba5000000")


def frozen_batch() -> Batch:
    """The batch OLD_V2 and OLD_V3 were made from."""
    ss = [Sample("pm", 1795588200000 + i * 1000 + (i * 7) % 13, 1000000 + i * 1000 + (i * 7) % 13, TimeSource.GPS,
                 {"pm25": round(9.8 + i * 0.1, 1), "pm10": 17 + i, "n": None, "ok": True},
                 ("warming_up",) if i < 2 else (), 10 + 2 * i, "boot-a") for i in range(6)]
    ss.append(Sample("gps", None, 1003500, TimeSource.UNSYNC,
                     {"lat": 52.1244107, "lon": 4.6608005, "note": "ünï", "big": 2**70, "x": 1 / 3}, (), 11, "boot-a"))
    return Batch("van-007", "e9", 10, 21, ss)


def test_batches_of_the_previous_release_still_decode():
    for old in (OLD_V2, OLD_V3):
        assert_same(decode_batch(old), frozen_batch())
        assert encode_batch(frozen_batch(), version=old[3]) == old  # and older encoders are unchanged


def test_default_is_v4_and_smaller_than_v3_on_a_drive():
    b = sim_batch(240, skip_s=600)
    v3, v4 = encode_batch(b, version=3), encode_batch(b)
    assert v4[3] == wire.DEFAULT_VERSION == 4
    assert_same(decode_batch(v4), b)
    assert len(v4) < len(v3)


def test_messy_batch_round_trips_in_v4():
    b = messy_batch()
    assert_same(decode_batch(encode_batch(b, version=4)), b)


def _order_mode(b: Batch) -> int:
    r = _Reader(encode_plain(b, 4))
    r.string("device", 4), r.string("epoch", 4), r.s("first"), r.s("span")
    for _ in range(r.u("strings")):
        r.string("s", 4)
    for _ in range(r.u("flag sets")):
        for _ in range(r.u("size")):
            r.u("flag")
    r.u("samples")
    for _ in range(r.u("streams")):
        r.u("sensor")
    return r.u("order mode")


def test_stream_order_is_left_out_when_the_seqs_say_it():
    by_seq = sim_batch(30)
    assert _order_mode(by_seq) == ORDER_BY_SEQ
    shuffled = sim_batch(30)
    shuffled.samples.reverse()
    assert _order_mode(shuffled) == ORDER_RLE
    assert_same(decode_batch(encode_batch(shuffled)), shuffled)
    assert len(encode_plain(by_seq, 4)) < len(encode_plain(by_seq, 3))


def test_stream_sizes_that_do_not_add_up_are_refused():
    plain = bytearray(encode_plain(sim_batch(3), 4))
    good = decode_plain(bytes(plain), 4)
    assert len(good.samples) == 12
    # The four stream sizes follow the order mode: 3, 3, 3, 3. Make one 4.
    at = plain.index(bytes([ORDER_BY_SEQ, 3, 3, 3, 3]))
    plain[at + 1] = 4
    with pytest.raises(PayloadError, match="add up"):
        decode_plain(bytes(plain), 4)


def ints_round_trip(values: list[int], lo: int = I64_MIN, hi: int = I64_MAX) -> int:
    out = bytearray()
    _put_ints(out, values, 4)
    r = _Reader(bytes(out))
    assert _get_ints(r, len(values), lo, hi, "x", 4) == values
    assert r.left() == 0
    return out[0]


def test_int_modes_are_chosen_by_the_data():
    assert ints_round_trip([307000, 305625, 308125, 306375, 307250]) == MODE_DELTA  # ADC LSBs of 125
    out = bytearray()
    _put_ints(out, [307000, 305625, 308125], 4)
    assert out[1] == 125  # the step travels once, the counts are small
    assert ints_round_trip([1_000_000 + 1000 * i + (7 * i) % 13 for i in range(60)]) == MODE_PERIOD
    assert ints_round_trip([int(1e7 * (52.1 + 7e-5 * i * i)) for i in range(60)]) == MODE_DOD
    assert ints_round_trip([5, -3, 7, 0, -2, 6, 1]) == MODE_RAW


@FUZZ
@given(st.lists(st.one_of(st.integers(I64_MIN, I64_MAX), st.sampled_from([I64_MIN, I64_MAX, 0, -1, 1])),
                min_size=1, max_size=50))
def test_any_int64_column_round_trips(values):
    ints_round_trip(values)


@FUZZ
@given(st.integers(1, 10**6), st.integers(I64_MIN // 2, I64_MAX // 2), st.lists(st.integers(-50, 50), min_size=1, max_size=60))
def test_stepped_columns_round_trip(step, base, ks):
    values = [base + step * k for k in ks]
    values = [min(max(v, I64_MIN), I64_MAX) for v in values]
    ints_round_trip(values)


_edge_values = st.one_of(
    st.sampled_from([0, -1, 1, I64_MIN, I64_MAX, 2**63, -(2**63) - 1, 2**53, -(2**53), True, False, None,
                     0.0, -0.0, 5e-324, 1e300, -1e-300, 0.1, 1 / 3, 2.0**53, 2.0**53 + 2, "", "ü✓"]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**9), 10**9).map(lambda i: round(i * 1e-7, 7)),
    st.integers(-(10**6), 10**6).map(lambda i: i * 0.125),
)


def _strict(v: Any) -> Any:
    return ("float", repr(v)) if isinstance(v, float) else (type(v).__name__, v)


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(["pm", "gps", "no2"]), st.dictionaries(
        st.sampled_from(["pm25", "lat", "no2_we_mv", "k"]), _edge_values, max_size=4),
        st.integers(0, 3000), st.one_of(st.none(), st.integers(-(2**40), 2**40))), min_size=1, max_size=40),
    st.integers(1, 2**62),
    st.booleans(),
)
def test_any_v4_batch_round_trips_exactly(parts, first, shuffle):
    samples = []
    mono = 0
    for i, (sensor, values, dt, utc) in enumerate(parts):
        mono += dt
        samples.append(Sample(sensor, utc, mono, TimeSource.NTP, values, (), first + 3 * i, "b"))
    if shuffle:
        samples.reverse()  # not in seq order: the order must travel
    b = Batch("van-001", "ep", first, first + 3 * len(parts), samples)
    payload = encode_batch(b, version=4)
    back = decode_batch(payload)
    assert [(s.seq, s.sensor, s.t_mono_ms, s.t_utc_ms) for s in back.samples] == \
        [(s.seq, s.sensor, s.t_mono_ms, s.t_utc_ms) for s in samples]
    assert [sorted((k, _strict(v)) for k, v in s.values.items()) for s in back.samples] == \
        [sorted((k, _strict(v)) for k, v in s.values.items()) for s in samples]
    assert encode_batch(back, version=4) == payload  # deterministic


@pytest.mark.parametrize("mode, body", [
    (9, [1]),  # unknown mode
    (MODE_DELTA, [0]),  # a step of 0
])
def test_bad_int_column_headers_are_refused(mode, body):
    out = bytearray()
    codec_v2._put_u(out, mode)
    for v in body:
        codec_v2._put_u(out, v)
    codec_v2._put_s(out, 5)
    with pytest.raises(PayloadError):
        _get_ints(_Reader(bytes(out)), 1, I64_MIN, I64_MAX, "x", 4)


def test_a_delta_walking_out_of_range_is_refused():
    out = bytearray()
    for v in (MODE_DOD, 1):
        codec_v2._put_u(out, v)
    for v in (I64_MAX - 10, 100, 0):  # first, then a delta that leaves 64 bits
        codec_v2._put_s(out, v)
    with pytest.raises(PayloadError, match="out of range"):
        _get_ints(_Reader(bytes(out)), 3, I64_MIN, I64_MAX, "x", 4)


@pytest.mark.parametrize("text", ["5b47e51bc31f3c38", "3f9c2a71-5d7e-4b0e-9a53-0c1f4e2d8b66", "00", "", "ABCD",
                                  "abc", "3F9C2A71-5D7E-4B0E-9A53-0C1F4E2D8B66", "3f9c2a715d7e-4b0e-9a53-0c1f4e2d8b-66",
                                  "----------------------------------a-", "é"])
def test_identifiers_travel_as_bytes_and_any_text_as_it_was(text):
    out = bytearray()
    codec_v2._put_str4(out, text)
    assert _Reader(bytes(out)).string("s", 4) == text
    if text in ("5b47e51bc31f3c38", "3f9c2a71-5d7e-4b0e-9a53-0c1f4e2d8b66"):
        assert len(out) == 1 + (8 if len(text) == 16 else 16)


def test_unknown_string_kind_and_short_uuid_are_refused():
    with pytest.raises(PayloadError, match="kind"):
        _Reader(bytes([0 << 2 | 3])).string("s", 4)
    with pytest.raises(PayloadError, match="UUID"):
        _Reader(bytes([4 << 2 | codec_v2.STR_UUID]) + b"abcd").string("s", 4)


@FUZZ
@given(st.data())
def test_mutations_of_a_v4_body_behind_a_valid_checksum(data):
    from tests.test_wire_v2 import _decodes_or_refuses

    plain = bytearray(encode_plain(sim_batch(8), 4))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(plain) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            plain[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            plain[pos] = data.draw(st.sampled_from([0x00, 0x01, 0x03, 0x7F, 0x80, 0xFF]))
        elif op == "cut":
            del plain[pos : pos + data.draw(st.integers(1, 8))]
        else:
            plain[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        if not plain:
            plain = bytearray(b"\x00")
    _decodes_or_refuses(wire.MAGIC + b"\x04" + codec_v2.pack(bytes(plain), codec_v2.COMP_STORED))


def _tick_batch(n: int = 40) -> Batch:
    """Four sensors read in one tick a second, as the agent does: jittered, close together."""
    samples, seq, mono = [], 1, 5_000_000
    for i in range(n):
        mono += 1000 + (i * 37) % 23 - 11
        for k, sensor in enumerate(("pm", "no2", "noise", "gps")):
            samples.append(Sample(sensor, None, mono + 20 * k + (i % 3 if k == 2 else 0), TimeSource.GPS,
                                  {"v": i}, (), seq, "b"))
            seq += 1
    return Batch("van-001", "ep", 1, seq - 1, samples)


def test_a_stream_clock_can_refer_to_an_earlier_stream():
    b = _tick_batch()
    assert_same(decode_batch(encode_batch(b)), b)
    plain = encode_plain(b, 4)
    earlier: list[list[int]] = []
    out = bytearray()
    codec_v2._encode_stream(out, [s for s in b.samples if s.sensor == "pm"], 1, codec_v2._Interner(),
                            codec_v2._Interner(), 4, earlier)
    out = bytearray()
    codec_v2._encode_stream(out, [s for s in b.samples if s.sensor == "no2"], 1, codec_v2._Interner(),
                            codec_v2._Interner(), 4, earlier)
    r = _Reader(bytes(out))
    _get_ints(r, 40, 0, I64_MAX, "seq", 4)
    assert r.u("ref") == 1  # no2 told against pm: a constant 20 ms
    assert len(plain) < len(encode_plain(b, 3))


def test_a_clock_reference_to_no_earlier_stream_is_refused():
    out = bytearray()
    codec_v2._encode_stream(out, [s for s in _tick_batch(5).samples if s.sensor == "pm"], 1, codec_v2._Interner(),
                            codec_v2._Interner(), 4, None)
    r = _Reader(bytes(out))
    _get_ints(r, 5, 0, I64_MAX, "seq", 4)
    at = r.pos
    assert out[at] == 0
    bad = bytes(out[:at]) + b"\x01" + bytes(out[at + 1:])
    with pytest.raises(PayloadError, match="earlier stream"):
        codec_v2._decode_stream(_Reader(bad), "pm", 5, 1, ["ntp", "gps", "b"], [()], 10**6, 4, [])
    with pytest.raises(PayloadError, match="earlier stream"):  # one that is too short
        codec_v2._decode_stream(_Reader(bad), "pm", 5, 1, ["ntp", "gps", "b"], [()], 10**6, 4, [[1, 2]])
