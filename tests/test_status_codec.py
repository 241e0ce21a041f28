"""Heartbeats, version 2 (deflate with a preset dictionary) and version 1 (plain JSON)."""

from __future__ import annotations

import json
import zlib

import pytest

from core.errors import PayloadError
from core.status_codec import MAGIC, STATUS_ZDICT, deflate_status
from core.wire import decode_status, encode_status

STATUS = {
    "online": True, "device": "van-017", "t_utc_ms": 1796000000123, "epoch": "5b47e51bc31f3c38",
    "last_seq": 12345, "backlog_samples": 240, "backlog_batches": 1, "oldest_unsent_age_s": 12.5,
    "buffer_bytes": 1234567, "sensor_errors": {"pm": 2},
    "gps_epochs": {"gps": {"epochs": 3600, "fixes": 3598, "dropped": 2, "no_fix": 0, "unconfirmed": 2,
                           "inconsistent": 0, "incomplete": 0, "missed": 0, "superseded": 0}},
    "time_source": "gps", "time_steps": 0, "gps_minus_ntp_ms": -52, "gps_time_disagrees": False,
    "disk_free_bytes": 12345678901, "cpu_temp_c": 51.2, "taken": 14400, "rejected_batches": 0,
    "samples_dropped": 0, "quarantined": 0, "gaps_undelivered": 0, "buffer_full": 0, "seal_failures": 0,
    "health": "ok", "samples_at_risk": 240, "samples_lost_in_memory": 0, "audio": {},
}


def test_compact_heartbeat_is_lossless_and_a_fraction_of_the_json():
    compact, plain = encode_status(STATUS), encode_status(STATUS, compact=False)
    assert compact.startswith(MAGIC + b"\x03") and plain.startswith(b"{")
    assert decode_status(compact) == decode_status(plain) == {"v": 1, **STATUS}
    assert len(compact) * 4 < len(plain), (len(compact), len(plain))


def test_version_2_heartbeats_still_decode_and_version_3_is_smaller():
    text = json.dumps({"v": 1, **STATUS, "samples_held_unnoted": 0}, separators=(",", ":")).encode()
    v2, v3 = deflate_status(text, 2), deflate_status(text)
    assert v2.startswith(MAGIC + b"\x02") and v3.startswith(MAGIC + b"\x03")
    assert decode_status(v2) == decode_status(v3) == json.loads(text)
    assert len(v3) < len(v2)


def test_old_vans_plain_json_heartbeat_still_decodes():
    assert decode_status(json.dumps({"v": 1, "online": False, "device": "van-1"}).encode())["online"] is False


@pytest.mark.parametrize("payload, reason", [
    (MAGIC + b"\x09" + b"x", "unsupported status version"),
    (MAGIC + b"\x02" + b"\xff\xfe garbage", "does not inflate"),
    (encode_status(STATUS)[:-8], "truncated|does not inflate"),
])
def test_bad_heartbeats_get_a_clear_error(payload, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_status(payload)


def test_a_deflate_bomb_is_refused_without_inflating_it():
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, STATUS_ZDICT)
    bomb = MAGIC + b"\x02" + c.compress(b'{"v":1,"online":true,"pad":"' + b"a" * 10_000_000) + c.flush()
    assert len(bomb) < 64 * 1024
    with pytest.raises(PayloadError, match="too large"):
        decode_status(bomb)
