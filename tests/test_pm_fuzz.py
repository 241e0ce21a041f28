"""Property tests: hostile bytes into every PM decoder and stream parser.

Whatever arrives on the wire, the decoders and parsers

* raise nothing but ``core.errors.ReadError`` subclasses (parsers raise nothing),
* return promptly (Hypothesis' deadline fails a slow example),
* never hand out a frame whose checksum does not hold, checked here with an
  independent implementation of each checksum on the frame's raw bytes.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import pms, sds011, sps30
from core.errors import ReadError

FUZZ = settings(max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


# -- independent checksum oracles (deliberately not calling the driver code) --------------


def pms_frame_ok(raw: bytes) -> bool:
    return (
        raw[:2] == b"BM"
        and len(raw) == 4 + int.from_bytes(raw[2:4], "big")
        and sum(raw[:-2]) % 65536 == int.from_bytes(raw[-2:], "big")
    )


def sds_frame_ok(raw: bytes) -> bool:
    return len(raw) == 10 and raw[0] == 0xAA and raw[9] == 0xAB and sum(raw[2:8]) % 256 == raw[8]


def sps_frame_ok(raw: bytes) -> bool:
    assert raw[0] == 0x7E and raw[-1] == 0x7E
    body = raw[1:-1]
    content = bytearray()
    i = 0
    while i < len(body):
        if body[i] == 0x7D:
            content.append(body[i + 1] ^ 0x20)  # 5E->7E, 5D->7D, 31->11, 33->13
            i += 2
        else:
            content.append(body[i])
            i += 1
    return (255 - sum(content[:-1]) % 256) == content[-1] and content[3] == len(content) - 5


# -- strategies --------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
noise = st.binary(max_size=300)


@st.composite
def pms_frames(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        command = draw(st.sampled_from([pms.CMD_MODE, pms.CMD_SLEEP]))
        return pms.build_ack(command, draw(st.integers(0, 1)))
    return pms.build_data_frame(
        pm_cf1=tuple(draw(st.lists(u16, min_size=3, max_size=3))),  # type: ignore[arg-type]
        pm_atm=tuple(draw(st.lists(u16, min_size=3, max_size=3))),  # type: ignore[arg-type]
        counts=tuple(draw(st.lists(u16, min_size=6, max_size=6))),  # type: ignore[arg-type]
        reserved=draw(u16),
    )


@st.composite
def sds_frames(draw: st.DrawFn) -> bytes:
    device_id = draw(u16)
    if draw(st.booleans()):
        return sds011.build_reply(draw(st.integers(0, 255)), draw(st.integers(0, 255)),
                                  draw(st.integers(0, 255)), draw(st.integers(0, 255)), device_id)
    pm25 = draw(st.integers(0, 65535)) / 10
    pm10 = draw(st.integers(0, 65535)) / 10
    return sds011.build_data_frame(pm25, pm10, device_id)


@st.composite
def sps_frames(draw: st.DrawFn) -> bytes:
    command = draw(st.sampled_from([0x00, 0x01, 0x03, 0x10, 0x11, 0x56, 0xD0, 0xD3]))
    state = draw(st.sampled_from([0x00, 0x00, 0x43, 0x80, 0x02]))
    if command == sps30.CMD_READ and draw(st.booleans()):
        # raw float bytes: every byte value, so every stuffing case, shows up
        data = draw(st.binary(min_size=40, max_size=40))
    else:
        data = draw(st.binary(max_size=32))
    return sps30.build_miso(command, state, data)


@st.composite
def mutated(draw: st.DrawFn, frames: st.SearchStrategy[bytes]) -> tuple[list[bytes], bytes]:
    """Valid frames, the stream they make after random damage."""
    originals = draw(st.lists(frames, min_size=1, max_size=6))
    stream = bytearray(b"".join(originals))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "duplicate"]))
        pos = draw(st.integers(0, max(0, len(stream) - 1)))
        if kind == "flip" and stream:
            stream[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            stream[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and stream:
            del stream[pos : pos + draw(st.integers(1, 4))]
        elif kind == "duplicate":
            stream[pos:pos] = stream[pos : pos + draw(st.integers(1, 12))]
    return originals, bytes(stream)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


chunk_cuts = st.lists(st.integers(0, 10_000), max_size=12)


# -- pure decoders: random bytes ----------------------------------------------------------


@FUZZ
@given(st.binary(max_size=64))
def test_pms_decode_frame_random_bytes(data: bytes) -> None:
    try:
        message = pms.decode_frame(data)
    except ReadError:
        return
    assert pms_frame_ok(data)
    assert message.raw == data


@FUZZ
@given(st.binary(min_size=10, max_size=10) | st.binary(max_size=20))
def test_sds_decode_frame_random_bytes(data: bytes) -> None:
    try:
        sds011.decode_frame(data)
    except ReadError:
        return
    assert sds_frame_ok(data)


@FUZZ
@given(st.binary(max_size=120))
def test_sps30_decode_frame_random_bytes(data: bytes) -> None:
    for candidate in (data, b"\x7e" + data + b"\x7e"):
        try:
            response = sps30.decode_frame(candidate)
        except ReadError:
            continue
        assert sps_frame_ok(candidate)
        if response.command == sps30.CMD_READ and response.data:
            try:
                sps30.decode_measurement(response.data)
            except ReadError:
                pass


@FUZZ
@given(st.binary(max_size=64))
def test_command_decoders_random_bytes(data: bytes) -> None:
    for decode in (pms.decode_command, sds011.decode_command, sps30.decode_mosi, sps30.unstuff,
                   sps30.verify, sps30.decode_measurement):
        try:
            decode(data)
        except ReadError:
            pass


# -- stream parsers: random bytes and damaged valid streams --------------------------------


@FUZZ
@given(noise, chunk_cuts)
def test_parsers_random_stream(data: bytes, cuts: list[int]) -> None:
    parsers = (pms.PMSParser(), sds011.SDS011Parser(), sps30.SPS30Parser())
    for chunk in chunked(data, cuts):
        for message in parsers[0].feed(chunk):
            assert pms_frame_ok(message.raw)
        for message in parsers[1].feed(chunk):
            assert sds_frame_ok(message.raw)
        for message in parsers[2].feed(chunk):
            assert sps_frame_ok(message.raw)


@FUZZ
@given(mutated(pms_frames()), chunk_cuts)
def test_pms_parser_damaged_stream(case: tuple[list[bytes], bytes], cuts: list[int]) -> None:
    originals, stream = case
    parser = pms.PMSParser()
    got = [m for chunk in chunked(stream, cuts) for m in parser.feed(chunk)]
    for message in got:
        assert pms_frame_ok(message.raw), message.raw.hex(" ")
    # resync: every original frame that survived intact and is not overlapped
    # by a false start is found again (checked loosely: at least when the
    # stream still begins with an intact first frame)
    if stream.startswith(originals[0]):
        assert got and got[0].raw == originals[0]


@FUZZ
@given(st.lists(pms_frames(), min_size=1, max_size=5), st.integers(0, 10_000), st.integers(1, 255),
       chunk_cuts)
def test_pms_single_byte_damage_never_yields_a_changed_frame(
    frames: list[bytes], where: int, flip: int, cuts: list[int]
) -> None:
    stream = bytearray(b"".join(frames))
    where %= len(stream)
    stream[where] ^= flip
    parser = pms.PMSParser()
    got = [m.raw for chunk in chunked(bytes(stream), cuts) for m in parser.feed(chunk)]
    assert set(got) <= set(frames)
    assert len(got) == len(frames) - 1, "exactly the damaged frame is lost"


@FUZZ
@given(mutated(sds_frames()), chunk_cuts)
def test_sds_parser_damaged_stream(case: tuple[list[bytes], bytes], cuts: list[int]) -> None:
    originals, stream = case
    parser = sds011.SDS011Parser()
    got = [m for chunk in chunked(stream, cuts) for m in parser.feed(chunk)]
    for message in got:
        assert sds_frame_ok(message.raw)
    if stream.startswith(originals[0]):
        assert got and got[0].raw == originals[0]


@FUZZ
@given(st.lists(sds_frames(), min_size=1, max_size=5), st.integers(0, 10_000), st.integers(1, 255),
       chunk_cuts)
def test_sds_single_byte_damage_never_yields_a_changed_frame(
    frames: list[bytes], where: int, flip: int, cuts: list[int]
) -> None:
    stream = bytearray(b"".join(frames))
    where %= len(stream)
    stream[where] ^= flip
    parser = sds011.SDS011Parser()
    got = [m.raw for chunk in chunked(bytes(stream), cuts) for m in parser.feed(chunk)]
    assert set(got) <= set(frames)
    assert len(got) == len(frames) - 1, "exactly the damaged frame is lost"


@FUZZ
@given(mutated(sps_frames()), chunk_cuts)
def test_sps30_parser_damaged_stream(case: tuple[list[bytes], bytes], cuts: list[int]) -> None:
    originals, stream = case
    parser = sps30.SPS30Parser()
    got = [m for chunk in chunked(stream, cuts) for m in parser.feed(chunk)]
    for message in got:
        assert sps_frame_ok(message.raw), message.raw.hex(" ")
        try:
            sps30.check_state(message)
        except ReadError:
            pass
    # the last frame ends with its flag: if it is intact at the very end of the
    # stream, with a flag before it, it must be found
    last = originals[-1]
    if stream.endswith(last) and len(stream) > len(last) and stream[-len(last) - 1] == 0x7E:
        assert got and got[-1].raw == last


@FUZZ
@given(st.lists(sps_frames(), min_size=1, max_size=5), st.integers(0, 10_000), st.integers(1, 255))
def test_sps30_single_byte_damage_keeps_the_other_frames(
    frames: list[bytes], where: int, flip: int
) -> None:
    stream = bytearray(b"".join(frames))
    where %= len(stream)
    stream[where] ^= flip
    parser = sps30.SPS30Parser()
    got = [m.raw for m in parser.feed(bytes(stream))]
    for raw in got:
        assert sps_frame_ok(raw)
    # a damaged frame may at worst take its neighbour (a lost flag) with it
    assert len([raw for raw in got if raw in frames]) >= len(frames) - 2


# -- encoders round-trip --------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_sps30_stuffing_round_trip(data: bytes) -> None:
    stuffed = sps30.stuff(data)
    assert not set(stuffed) & {0x7E, 0x11, 0x13}
    assert sps30.unstuff(stuffed) == data


@FUZZ
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=10, max_size=10))
def test_sps30_measurement_round_trip(values: list[float]) -> None:
    m = sps30.SPS30Measurement(*values)
    frame = sps30.build_miso(sps30.CMD_READ, 0, sps30.encode_measurement(m))
    (response,) = sps30.SPS30Parser().feed(frame)
    assert sps30.decode_measurement(response.data) == m


@FUZZ
@given(st.integers(0, 255), u16)
def test_pms_command_round_trip(command: int, data: int) -> None:
    assert pms.decode_command(pms.build_command(command, data)) == (command, data)


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=12), u16)
def test_sds_command_round_trip(command: int, data: bytes, device_id: int) -> None:
    decoded = sds011.decode_command(sds011.build_command(command, data, device_id))
    assert decoded.command == command
    assert decoded.data == data.ljust(12, b"\0")
    assert decoded.device_id == device_id


def test_parsers_bounded_and_fast_on_a_flood() -> None:
    """A megabyte of near-misses: bounded buffers, no quadratic blow-up, nothing yielded."""
    flood = (
        (b"BM\x00\x1c" + bytes(28)) * 4000
        + (b"\xaa\xc0" + bytes(8)) * 4000
        + b"\x7e\x00" * 50_000
    )
    for parser in (pms.PMSParser(), sds011.SDS011Parser(), sps30.SPS30Parser()):
        for i in range(0, len(flood), 4096):
            assert parser.feed(flood[i : i + 4096]) == []
    long_span = b"\x7e" + b"\x01" * 5000
    splitter = sps30.ShdlcSplitter()
    splitter.feed(long_span)
    assert splitter.frame_errors >= 1  # an endless frame is dropped, not buffered
    assert struct.calcsize(">10f") == sps30.MEASUREMENT_SIZE
