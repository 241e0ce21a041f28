import json
import zlib

import pytest

from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core import wire
from core.wire import Ack, Batch, Gap, decode_ack, decode_batch, encode_ack, encode_batch


def make_batch(n=5, device="van-001", first=1):
    samples = [
        Sample("pm", 1_700_000_000_000 + i * 1000, 5000 + i * 1000, TimeSource.NTP,
               {"pm25": 10.5 + i, "pm10": 20.0}, ("warming_up",) if i == 0 else (), first + i, "boot")
        for i in range(n)
    ]
    return Batch(device, "ab12", first, first + n - 1, samples, [Gap(100, 120, "buffer full")])


def test_roundtrip_keeps_everything():
    b = make_batch()
    back = decode_batch(encode_batch(b))
    assert back.batch_id == b.batch_id == "van-001/ab12/1-5"
    assert back.samples == b.samples
    assert back.gaps == b.gaps


def test_same_batch_same_bytes():
    assert encode_batch(make_batch()) == encode_batch(make_batch())


def _raw(body: dict, version: int = 1) -> bytes:
    body = {"cols": wire.V1_COLS, **body}  # the header every version 1 body names (checked last)
    return wire.MAGIC + bytes([version]) + zlib.compress(json.dumps(body).encode())


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "bad magic"),
        (b"hello world", "bad magic"),
        (wire.MAGIC + b"\x09" + b"x", "unsupported wire version 9"),
        (wire.MAGIC + b"\x01" + b"not zlib", "not valid zlib"),
        (wire.MAGIC + b"\x01" + zlib.compress(b"[1,2"), "not valid JSON"),
        (wire.MAGIC + b"\x01" + zlib.compress(b"{}")[:-3], "truncated"),
        # Issue 13: version 1 took bytes after the zlib stream; version 2 refuses them, so does 1.
        (encode_batch(make_batch()) + b"junk", "trailing bytes after the compressed body"),
        (_raw({"device": "v", "epoch": "e", "first": 5, "last": 1, "samples": [], "gaps": []}), "bad sequence range"),
        (_raw({"device": "v", "epoch": "e", "first": 1, "last": 2, "samples": [[1]], "gaps": []}), "8 fields"),
        (_raw({"device": "v", "epoch": "e", "first": 1, "last": 1,
               "samples": [[7, "pm", 1, 1, "ntp", {}, [], ""]], "gaps": []}), "outside the batch range"),
        (_raw({"device": "v", "epoch": "e", "first": 1, "last": 1,
               "samples": [[1, "pm", 1, 1, "sundial", {}, [], ""]], "gaps": []}), "unknown time source"),
        (_raw({"epoch": "e", "first": 1, "last": 1, "samples": [], "gaps": []}), "missing field 'device'"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_batch(payload)


def test_oversized_and_zip_bomb_are_refused():
    with pytest.raises(PayloadError, match="exceeds"):
        decode_batch(wire.MAGIC + b"\x01" + b"\0" * (wire.MAX_PAYLOAD_BYTES + 1))
    bomb = wire.MAGIC + b"\x01" + zlib.compress(b" " * (wire.MAX_DECOMPRESSED_BYTES + 10), 9)
    assert len(bomb) < 100_000  # small on the wire ...
    with pytest.raises(PayloadError, match="inflates to more than"):
        decode_batch(bomb)  # ... refused before it costs memory


def test_ack_roundtrip_and_garbage():
    a = Ack("van-001/ab/1-5", "rejected", "bad", "ff" * 32)
    assert decode_ack(encode_ack(a)) == a
    assert not a.committed and Ack("x", "duplicate").committed
    for bad in (b"nope", b'{"v":2}', b'{"v":1,"batch":"x","status":"maybe"}'):
        with pytest.raises(PayloadError):
            decode_ack(bad)


def test_topics():
    assert wire.device_from_topic("datalab/v1", "datalab/v1/van-001/batch") == "van-001"
    assert wire.device_from_topic("datalab/v1", "datalab/v1/van-001/batch/x") is None
    assert wire.device_from_topic("datalab/v1", "other/van-001/batch") is None
