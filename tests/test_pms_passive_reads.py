"""A passive PMS read asks the port for the bytes that complete the frame.

One read for a whole answer (not a byte, a look at what is waiting, then the
rest), however the answer is cut up on the wire, and the same readings and
errors as before for noise and corrupt answers.
"""

from __future__ import annotations

import pytest

from drivers import pms
from core.errors import ChecksumError, SensorTimeout

FRAME = pms.build_data_frame(pm_cf1=(5, 8, 12), pm_atm=(5, 8, 12), counts=(280, 84, 40, 16, 4, 2))


class ScriptedPort:
    """A serial port whose sensor answers each passive-read command with scripted chunks.

    ``read(n)`` returns at most ``n`` bytes of the next chunk (like a port whose
    bytes come in bursts), or b"" when nothing is left (the port's timeout).
    """

    def __init__(self, answer: list[bytes], *, stale: bytes = b"") -> None:
        self.answer = answer
        self.pending: list[bytes] = [stale] if stale else []
        self.reads: list[int] = []
        self.timeout = 0.1

    @property
    def in_waiting(self) -> int:
        return len(self.pending[0]) if self.pending else 0

    def read(self, size: int = 1) -> bytes:
        self.reads.append(size)
        if not self.pending:
            return b""
        chunk = self.pending[0]
        out, rest = chunk[:size], chunk[size:]
        if rest:
            self.pending[0] = rest
        else:
            self.pending.pop(0)
        return out

    def write(self, data: bytes) -> int:
        if data == pms.cmd_passive_read():
            self.pending.extend(self.answer)
        return len(data)

    def reset_input_buffer(self) -> None:
        self.pending.clear()

    def close(self) -> None: ...


def driver(port: ScriptedPort) -> pms.PMSx003Driver:
    d = pms.PMSx003Driver(port, lambda: 100.0, mode="passive", assume_warm=True, timeout_s=0.2)  # type: ignore[arg-type]
    d._needs_setup = False  # the mode command is not what these tests look at
    return d


def test_whole_answer_is_one_read_of_a_frame() -> None:
    port = ScriptedPort([FRAME])
    reading = driver(port).read()
    assert reading is not None and reading.values["pm25"] == 8.0
    # One look at stale bytes before the request, then one read for the whole frame.
    assert port.reads == [pms.FRAME_SIZE]


def test_answer_in_pieces_asks_for_what_is_missing() -> None:
    port = ScriptedPort([FRAME[:5], FRAME[5:20], FRAME[20:]])
    reading = driver(port).read()
    assert reading is not None and reading.values["pm10"] == 12.0
    assert port.reads == [32, 27, 12]


def test_noise_before_the_frame_is_skipped() -> None:
    port = ScriptedPort([b"\x00\x42\x13" + FRAME[:10], FRAME[10:]])
    reading = driver(port).read()
    assert reading is not None and reading.values["pm1"] == 5.0
    assert port.reads == [32, 22]


def test_stale_bytes_are_drained_first_and_do_not_answer() -> None:
    port = ScriptedPort([FRAME], stale=b"\x42\x4d\x00\x1c" + b"\x01" * 10)
    reading = driver(port).read()
    assert reading is not None and reading.values["pm25"] == 8.0


def test_corrupt_answer_ends_the_wait_with_its_error() -> None:
    bad = bytearray(FRAME)
    bad[10] ^= 0xFF
    port = ScriptedPort([bytes(bad)])
    with pytest.raises(ChecksumError):
        driver(port).read()
    assert port.reads == [32]  # no waiting out the timeout for a frame that is not coming


def test_no_answer_times_out() -> None:
    port = ScriptedPort([])
    with pytest.raises(SensorTimeout):
        driver(port).read()


def test_bytes_to_complete_follows_the_length_word() -> None:
    parser = pms.PMSParser()
    assert parser.bytes_to_complete() == pms.FRAME_SIZE
    parser.feed(FRAME[:3])
    assert parser.bytes_to_complete() == pms.FRAME_SIZE - 3
    parser.feed(FRAME[3:30])
    assert parser.bytes_to_complete() == 2
    parser.reset()
    parser.feed(pms.build_ack(pms.CMD_MODE, 0)[:5])  # an ack's length word says 8 bytes in all
    assert parser.bytes_to_complete() == pms.ACK_SIZE - 5
    parser.reset()
    parser.feed(b"\x00\x42")  # noise, then maybe the first byte of a start marker
    assert parser.bytes_to_complete() == pms.FRAME_SIZE - 1
