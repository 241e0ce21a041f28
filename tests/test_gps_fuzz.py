"""Property tests: whatever arrives on the port, the decoder only ever raises
ReadError subclasses, returns promptly, and takes nothing from a sentence whose
checksum does not match."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.nmea import FixAssembler, SentenceFramer, decode_stream, nmea_checksum, parse_sentence
from core.errors import ChecksumError, FrameError, ReadError
from simulator.gps_device import ReceiverState, nmea_epoch, sentence

UTC = dt.timezone.utc

# A deadline per example is the "never hangs" check: a catastrophic regex or
# an unbounded loop shows up as a DeadlineExceeded failure.
FUZZ = settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow])

REAL_SENTENCES = [
    b"$GNRMC,223745.00,A,3806.62964,N,12237.61382,W,0.040,,110720,,,D,V*0E\r\n",
    b"$GNGGA,223745.00,3806.62964,N,12237.61382,W,2,12,0.54,83.1,M,-29.5,M,,0000*44\r\n",
    b"$GNGSA,A,3,29,20,18,16,51,13,44,26,,,,,0.99,0.54,0.83,1*0E\r\n",
    b"$GLGSV,3,3,10,83,52,346,29,84,05,307,,1*72\r\n",
    b"$GNVTG,,T,,M,0.040,N,0.075,K,D*3E\r\n",
    b"$GNGLL,3806.62964,N,12237.61382,W,223745.00,A,D*6C\r\n",
    b"$GNZDA,223745.00,11,07,2020,00,00*7A\r\n",
    b"$GPGSV,4,4,13,32,76,331,31*48\r\n",
]

_FRAME_RE = re.compile(rb"^\$([^*]*)\*([0-9A-Fa-f]{2})\r?\n?$")


def checksum_ok(line: bytes) -> bool:
    """Independent check: is this line '$body*HH' with HH the XOR of body?"""
    m = _FRAME_RE.match(line)
    return bool(m) and nmea_checksum(m.group(1)) == int(m.group(2), 16)


@st.composite
def receiver_states(draw) -> ReceiverState:
    fix = draw(
        st.one_of(
            st.none(),
            st.tuples(
                st.floats(-89.9, 89.9),
                st.floats(-179.9, 179.9),
                st.floats(0, 70),
                st.floats(0, 359.9),
            ),
        )
    )
    return ReceiverState(
        utc=dt.datetime(2024, 5, 6, tzinfo=UTC) + dt.timedelta(seconds=draw(st.integers(0, 86399))),
        fix=fix,
        talker=draw(st.sampled_from(["GP", "GN", "GL", "GA", "GB", "BD"])),
        sats_used=draw(st.integers(4, 12)),
        sats_in_view=draw(st.integers(4, 16)),
        nmea_410=draw(st.booleans()),
    )


@st.composite
def valid_sentences(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.sampled_from(REAL_SENTENCES))
    return draw(st.sampled_from(nmea_epoch(draw(receiver_states()))))


@st.composite
def mutations(draw, line: bytes) -> bytes:
    buf = bytearray(line)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "replace", "insert", "delete", "truncate"]))
        if op == "truncate":
            buf = buf[: draw(st.integers(0, max(0, len(buf) - 1)))]
            continue
        if not buf and op != "insert":
            continue
        i = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "replace":
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf.insert(i, draw(st.integers(0, 255)))
        else:
            del buf[i]
    return bytes(buf)


def decode_all(data: bytes, **kw) -> list:
    fixes, _ = decode_stream([data], FixAssembler(**kw))
    return fixes


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_read_errors(data: bytes) -> None:
    try:
        parse_sentence(data)
    except ReadError:
        pass
    # Through the framer and the assembler too: decode_stream swallows only ReadError.
    decode_all(data)
    decode_all(data, require_confirmation=False)


@FUZZ
@given(st.text(max_size=200))
def test_random_text_only_raises_read_errors(text: str) -> None:
    try:
        parse_sentence(text)
    except ReadError:
        pass
    try:
        parse_sentence("$" + text)
    except ReadError:
        pass


@FUZZ
@given(st.data())
def test_mutated_sentence_with_bad_checksum_is_rejected(data) -> None:
    line = data.draw(valid_sentences())
    assert checksum_ok(line)
    mutated = data.draw(mutations(line))
    if checksum_ok(mutated):
        return  # the mutation kept a valid checksum (e.g. a no-op): not this property
    with pytest.raises((ChecksumError, FrameError)):
        parse_sentence(mutated)
    # Through the framer, even with the lax assembler, it never becomes a fix,
    # unless the mutation only added bytes around an intact sentence (noise
    # before the '$' is legitimately skipped).
    if any(checksum_ok(c) for c in SentenceFramer().feed(mutated + b"\n")):
        return
    assert decode_all(mutated, require_confirmation=False) == []


@FUZZ
@given(st.data())
def test_bad_checksum_sentence_contributes_nothing_to_its_epoch(data) -> None:
    """Decoding an epoch with one corrupt sentence gives exactly what decoding it
    without that sentence gives: nothing is taken from the corrupt one."""
    state = data.draw(receiver_states())
    lines = nmea_epoch(state) + nmea_epoch(
        ReceiverState(**{**_state_kw(state), "utc": state.utc + dt.timedelta(seconds=1)})
    )
    i = data.draw(st.integers(0, len(lines) - 1))
    mutated = data.draw(mutations(lines[i]))
    if checksum_ok(mutated) or b"\n" in mutated.rstrip(b"\r\n") or b"$" in mutated[1:]:
        return  # valid checksum, or the mutation split it into several lines
    without = b"".join(lines[:i] + lines[i + 1 :])
    with_bad = b"".join(lines[:i] + [mutated.rstrip(b"\r\n") + b"\r\n"] + lines[i + 1 :])
    for lax in (False, True):
        assert decode_all(with_bad, require_confirmation=not lax) == decode_all(
            without, require_confirmation=not lax
        )


def _state_kw(s: ReceiverState) -> dict:
    return {f: getattr(s, f) for f in ReceiverState.__dataclass_fields__}


@FUZZ
@given(st.data())
def test_garbage_fields_with_a_valid_checksum_only_raise_frame_errors(data) -> None:
    """A receiver bug (or a double bit error) can produce nonsense fields with a
    correct checksum: the converters must reject them as FrameError, not crash."""
    line = data.draw(valid_sentences())
    body = line[1 : line.index(b"*")]
    fields = body.split(b",")
    k = data.draw(st.integers(1, max(1, len(fields) - 1)))
    junk = data.draw(st.binary(max_size=12).filter(lambda b: all(0x20 <= c < 0x7F and c not in b"$*," for c in b)))
    fields[k] = junk
    new_body = b",".join(fields)
    mutated = sentence(new_body.decode("ascii"))
    try:
        rec = parse_sentence(mutated)
    except FrameError:
        return
    assert rec is not None
    decode_all(mutated * 2)


@FUZZ
@given(st.data())
def test_chunking_does_not_change_the_result(data) -> None:
    """The framer gives the same fixes however the port splits the bytes."""
    s0 = data.draw(receiver_states())
    stream = b"".join(
        b"".join(nmea_epoch(ReceiverState(**{**_state_kw(s0), "utc": s0.utc + dt.timedelta(seconds=k)})))
        for k in range(3)
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    whole, _ = decode_stream([stream])
    split, _ = decode_stream(chunks)
    assert whole == split
    if s0.fix is not None:
        assert len(whole) == 3


def test_framer_buffer_stays_bounded() -> None:
    framer = SentenceFramer()
    out = framer.feed(b"$" + b"A" * 100_000)
    assert len(framer.pending()) <= 240
    assert out and all(len(x) <= 100_001 for x in out)
    for x in out:
        with pytest.raises(FrameError):
            parse_sentence(x)
