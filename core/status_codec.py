"""Heartbeat encoding, version 2: the same JSON, deflated against a preset dictionary.

Why (issue #18): a van sends a heartbeat a minute and about 960 values in the
same minute; the heartbeat's JSON is ~800 bytes, mostly key names that never
change, so it alone cost ~0.8 bytes per value. Deflate with a preset
dictionary of those names sends each as a back-reference of 2-3 bytes.
Lossless: the receiver gets the same dict as from version 1.

Layout: ``b"DLS" | 0x02 | raw deflate (wbits -15) of the JSON, zdict=STATUS_ZDICT``.
Version 1 (plain JSON, starting with ``{``) is still decoded. ``STATUS_ZDICT``
is part of the format: changing it needs a new version byte.
"""

from __future__ import annotations

import zlib

from core.errors import PayloadError

MAGIC = b"DLS"
VERSION_DEFLATE = 2
MAX_STATUS_BYTES = 64 * 1024  # inflated, as for version 1 on the wire

# What heartbeats say, in the order edge/agent.py status() says it: deflate finds
# the longest matches, so whole runs of keys and punctuation become one reference.
STATUS_ZDICT = (
    b'{"v":1,"online":true,"device":"van-","t_utc_ms":17,"epoch":"","last_seq":'
    b',"backlog_samples":0,"backlog_batches":0,"oldest_unsent_age_s":null,"buffer_bytes":'
    b',"sensor_errors":{},"gps_epochs":{"gps":{"epochs":,"fixes":,"dropped":0,"no_fix":0,'
    b'"unconfirmed":0,"inconsistent":0,"incomplete":0,"missed":0,"superseded":0}},'
    b'"time_source":"gps","time_steps":0,"gps_minus_ntp_ms":-,"gps_time_disagrees":false,'
    b'"disk_free_bytes":,"cpu_temp_c":null,"taken":,"rejected_batches":0,"samples_dropped":0,'
    b'"quarantined":0,"gaps_undelivered":0,"buffer_full":0,"seal_failures":0,"health":"ok",'
    b'"samples_at_risk":0,"samples_lost_in_memory":0,"audio":{"noise":{"seconds_skipped":0,'
    b'"overruns":0,"source_errors":0,"minutes_dropped":0}}}'
)


def deflate_status(text: bytes) -> bytes:
    """Version 2 bytes for the heartbeat's JSON ``text``."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, STATUS_ZDICT)
    return MAGIC + bytes([VERSION_DEFLATE]) + c.compress(text) + c.flush()


def inflate_status(payload: bytes) -> bytes:
    """The JSON text of a heartbeat of either version; PayloadError if it is neither."""
    if not payload.startswith(MAGIC):
        return payload  # version 1: plain JSON
    if payload[3:4] != bytes([VERSION_DEFLATE]):
        raise PayloadError(f"unsupported status version {payload[3:4]!r}")
    d = zlib.decompressobj(-15, STATUS_ZDICT)
    try:
        text = d.decompress(payload[4:], MAX_STATUS_BYTES + 1)
    except zlib.error as exc:
        raise PayloadError(f"status does not inflate: {exc}") from exc
    if len(text) > MAX_STATUS_BYTES or d.unconsumed_tail:
        raise PayloadError("status too large")
    if not d.eof:
        raise PayloadError("status truncated")
    return text
