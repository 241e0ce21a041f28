"""Binary acks (ack version 2, issue #18): round trip, strict decoding, and both forms through a real
Mosquitto and receiver: a batch of wire version 4 is answered in binary, older ones in JSON."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.wire import (
    ACK_BINARY,
    ACK_DUPLICATE,
    ACK_JSON,
    ACK_REJECTED,
    ACK_STORED,
    Ack,
    Batch,
    ack_version_for,
    content_hash,
    decode_ack,
    encode_ack,
    encode_batch,
    encode_sync,
    sync_ack_version,
)
from tests.test_uplink import receiver, wait_until

SHA = content_hash(b"some payload")


def test_binary_ack_round_trips_and_is_small():
    for status in (ACK_STORED, ACK_DUPLICATE, ACK_REJECTED):
        ack = Ack("van-001/5b47e51bc31f3c38/2401-3360", status, "bad" if status == ACK_REJECTED else "", SHA)
        raw = encode_ack(ack, ACK_BINARY)
        assert raw.startswith(b"DLA\x02") and len(raw) < 50
        back = decode_ack(raw, "van-001")
        assert (back.batch_id, back.status, back.reason) == (ack.batch_id, ack.status, ack.reason)
        assert back.sha256 == SHA[:32] and back.names_payload(SHA) and not back.names_payload(SHA[::-1])
        assert len(encode_ack(ack)) > 3 * len(raw)  # the JSON form of the same ack


def test_json_ack_still_decodes_and_is_the_default():
    ack = Ack("van-001/e1/1-50", ACK_STORED, "", SHA)
    raw = encode_ack(ack)
    assert raw.startswith(b"{") and json.loads(raw)["v"] == 1
    assert decode_ack(raw) == ack and decode_ack(raw, "van-001") == ack
    assert ack.names_payload(SHA)


def test_ack_naming_no_batch_is_binary_and_matched_by_digest():
    # A payload too broken to name its batch: the id does not parse, the digest still identifies it.
    raw = encode_ack(Ack("?", ACK_REJECTED, "not a datalab batch", SHA), ACK_BINARY)
    back = decode_ack(raw, "van-001")
    assert raw.startswith(b"DLA\x02") and back.batch_id == "" and back.names_payload(SHA)
    # Without a digest it cannot be binary: JSON, which a van reading binary acks reads too.
    assert encode_ack(Ack("van-001/e1/1-5", ACK_REJECTED, "x", ""), ACK_BINARY).startswith(b"{")


def test_binary_ack_reason_is_cut_on_a_character_boundary():
    raw = encode_ack(Ack("van-001/e1/1-50", ACK_REJECTED, "é" * 2000, SHA), ACK_BINARY)
    reason = decode_ack(raw, "van-001").reason
    assert 0 < len(reason.encode()) <= 1024 and set(reason) == {"é"}


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b[:10], "digest"),  # truncated in the digest
    (lambda b: b[:21], "truncated"),  # nothing after the digest
    (lambda b: b[:4] + b"\x07" + b[5:], "status"),
    (lambda b: b[:3] + b"\x03" + b[4:], "version"),
    (lambda b: b + b"\xff\xfe", "UTF-8"),  # reason not UTF-8
    (lambda b: b[:21] + b"\x00" + b[22 + 16:], "batch"),  # empty epoch with a seq range
    (lambda b: b + b"x" * 3000, "too large"),
])
def test_malformed_binary_acks_are_refused(mutate, match):
    raw = encode_ack(Ack("van-001/5b47e51bc31f3c38/1-50", ACK_STORED, "", SHA), ACK_BINARY)
    with pytest.raises(PayloadError, match=match):
        decode_ack(mutate(raw), "van-001")
    with pytest.raises(PayloadError, match="device"):
        decode_ack(raw)  # a binary ack's batch id needs the topic's device


@settings(max_examples=200, deadline=None)
@given(
    epoch=st.text(st.characters(min_codepoint=33, max_codepoint=0x10FFFF, exclude_characters="/",
                                exclude_categories=("Cs",)), min_size=1, max_size=40),
    first=st.integers(1, (1 << 63) - 2),
    span=st.integers(0, 1 << 20),
    status=st.sampled_from((ACK_STORED, ACK_DUPLICATE, ACK_REJECTED)),
    reason=st.text(st.characters(exclude_categories=("Cs",)), max_size=200),  # the receiver's reasons: text
    digest=st.binary(min_size=32, max_size=32),
)
def test_binary_ack_round_trips_for_any_batch(epoch, first, span, status, reason, digest):
    first = min(first, (1 << 63) - 1 - span)
    ack = Ack(f"van-9/{epoch}/{first}-{first + span}", status, reason, digest.hex())
    back = decode_ack(encode_ack(ack, ACK_BINARY), "van-9")
    assert (back.batch_id, back.status, back.reason) == (ack.batch_id, status, reason)
    assert back.names_payload(digest.hex())


def _batch(first: int) -> Batch:
    samples = [Sample("pm", 1_795_000_000_000 + i * 1000, i * 1000, TimeSource.GPS, {"pm25": 9.5 + i}, (),
                      first + i, "boot-1") for i in range(5)]
    return Batch("van-001", "e0f1", first, first + 4, samples)


def test_the_form_follows_the_wire_version_and_the_sync_request():
    assert ack_version_for(encode_batch(_batch(1), version=4)) == ACK_BINARY
    for old in (1, 2, 3):
        assert ack_version_for(encode_batch(_batch(1), version=old)) == ACK_JSON
    assert ack_version_for(b"garbage") == ACK_JSON
    assert ack_version_for(b"DLB\xff" + b"x" * 20) == ACK_JSON  # a version nobody knows: JSON
    assert sync_ack_version(encode_sync("e", ["x"])) == ACK_BINARY
    assert sync_ack_version(encode_sync("e", ["x"], ack=ACK_JSON)) == ACK_JSON  # as old vans send it
    assert sync_ack_version(b"not json") == ACK_JSON


def test_receiver_answers_each_van_in_its_own_form(tmp_path: Path, mosquitto) -> None:
    """Through the real broker and receiver: an old van (v3 batches, plain sync) gets JSON acks it
    can read; a new one (v4) gets binary acks; both name the right batch and payload."""
    rx = receiver(tmp_path, mosquitto.port)
    got: list[tuple[str, bytes]] = []  # appended by paho's thread (list.append is atomic)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ack-watch")
    subscribed = threading.Event()
    c.on_subscribe = lambda *_: subscribed.set()
    c.on_message = lambda cl, ud, m: got.append((m.topic, bytes(m.payload)))
    c.connect("127.0.0.1", mosquitto.port)
    c.subscribe("datalab/v1/+/ack", qos=1)
    c.loop_start()
    try:
        assert subscribed.wait(10)
        old, new = encode_batch(_batch(1), version=3), encode_batch(_batch(6), version=4)
        c.publish("datalab/v1/van-001/batch", old, qos=1)
        assert wait_until(lambda: len(got) == 1)
        c.publish("datalab/v1/van-001/batch", new, qos=1)
        assert wait_until(lambda: len(got) == 2)
        (_, json_ack), (_, bin_ack) = got
        assert json_ack.startswith(b"{") and bin_ack.startswith(b"DLA\x02")
        a_old, a_new = decode_ack(json_ack), decode_ack(bin_ack, "van-001")
        assert (a_old.batch_id, a_old.status) == (_batch(1).batch_id, ACK_STORED)
        assert (a_new.batch_id, a_new.status) == (_batch(6).batch_id, ACK_STORED)
        assert a_old.names_payload(content_hash(old)) and a_new.names_payload(content_hash(new))
        # Resync: the old van's request gets JSON duplicates, the new one's binary.
        ids = [_batch(1).batch_id, _batch(6).batch_id]
        c.publish("datalab/v1/van-001/sync", encode_sync("e0f1", ids, ack=ACK_JSON), qos=1)
        assert wait_until(lambda: len(got) == 4)
        c.publish("datalab/v1/van-001/sync", encode_sync("e0f1", ids), qos=1)
        assert wait_until(lambda: len(got) == 6)
        assert all(p.startswith(b"{") for _, p in got[2:4])
        assert all(p.startswith(b"DLA\x02") for _, p in got[4:6])
        dups = [decode_ack(p, "van-001") for _, p in got[2:]]
        assert {a.status for a in dups} == {ACK_DUPLICATE}
        assert [a.batch_id for a in dups] == ids * 2
        assert dups[2].names_payload(content_hash(old)) and dups[3].names_payload(content_hash(new))
        # A rejected v4 batch (a value the receiver refuses) is answered in binary with its reason.
        bad = _batch(11)
        bad.samples[0].values["pm25"] = 1e300
        c.publish("datalab/v1/van-001/batch", encode_batch(bad, version=4), qos=1)
        assert wait_until(lambda: len(got) == 7)
        rej = decode_ack(got[6][1], "van-001")
        assert got[6][1].startswith(b"DLA\x02") and rej.status == ACK_REJECTED and rej.reason
        assert rx.store.counts()["samples"] == 10
    finally:
        c.loop_stop()
        c.disconnect()
        rx.stop()
