"""Heartbeat encoding, version 2: the same JSON, deflated against a preset dictionary.

Why (issue #18): a van sends a heartbeat a minute and about 960 values in the
same minute; the heartbeat's JSON is ~800 bytes, mostly key names that never
change, so it alone cost ~0.8 bytes per value. Deflate with a preset
dictionary of those names sends each as a back-reference of 2-3 bytes.
Lossless: the receiver gets the same dict as from version 1.

Layout: ``b"DLS" | 0x02 | raw deflate (wbits -15) of the JSON, zdict=STATUS_ZDICT``;
version 3 (``0x03``) the same with ``STATUS_ZDICT_V3``. Version 1 (plain JSON,
starting with ``{``) is still decoded. The dictionaries are part of the format:
changing one needs a new version byte.
"""

from __future__ import annotations

import zlib

from core.errors import PayloadError

MAGIC = b"DLS"
VERSION_DEFLATE = 2
VERSION_DEFLATE_V3 = 3  # the same, against STATUS_ZDICT_V3 (what vans send since issue #18 point 3)
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


# Version 3's dictionary: every key the agent sends today in its order (version 2's lacked
# samples_held_unnoted and a heartbeat's usual values), rarer forms first: deflate codes a
# near match in fewer bits. ~28 bytes less a heartbeat (~133 -> ~105), 0.015 B a value.
STATUS_ZDICT_V3 = (
    b'{"v":1,"online":false,"device":"van-"}'
    b'"sensor_errors":{"pm":1,"no2":1,"noise":1,"gps":1},"audio":{"noise":{"seconds_skipped":0,'
    b'"overruns":0,"source_errors":0,"minutes_dropped":0}},"time_source":"unsync","time_source":"ntp",'
    b'"gps_minus_ntp_ms":-,"cpu_temp_c":4'
    b'{"v":1,"online":true,"device":"van-","t_utc_ms":17,"epoch":"","last_seq":'
    b',"backlog_samples":,"backlog_batches":0,"oldest_unsent_age_s":null,"buffer_bytes":'
    b',"sensor_errors":{},"gps_epochs":{"gps":{"epochs":,"fixes":,"dropped":0,"no_fix":0,'
    b'"unconfirmed":0,"inconsistent":0,"incomplete":0,"missed":0,"superseded":0}},'
    b'"time_source":"gps","time_steps":0,"gps_minus_ntp_ms":null,"gps_time_disagrees":false,'
    b'"disk_free_bytes":,"cpu_temp_c":null,"taken":,"rejected_batches":0,"samples_dropped":0,'
    b'"quarantined":0,"gaps_undelivered":0,"buffer_full":0,"seal_failures":0,"health":"ok",'
    b'"samples_at_risk":0,"samples_lost_in_memory":0,"samples_held_unnoted":0,"audio":{}}'
)
_ZDICTS = {VERSION_DEFLATE: STATUS_ZDICT, VERSION_DEFLATE_V3: STATUS_ZDICT_V3}


def deflate_status(text: bytes, version: int = VERSION_DEFLATE_V3) -> bytes:
    """Version 3 (or 2) bytes for the heartbeat's JSON ``text``."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, _ZDICTS[version])
    return MAGIC + bytes([version]) + c.compress(text) + c.flush()


def inflate_status(payload: bytes) -> bytes:
    """The JSON text of a heartbeat of either version; PayloadError if it is neither."""
    if not payload.startswith(MAGIC):
        return payload  # version 1: plain JSON
    zdict = _ZDICTS.get(payload[3]) if len(payload) > 3 else None
    if zdict is None:
        raise PayloadError(f"unsupported status version {payload[3:4]!r}")
    d = zlib.decompressobj(-15, zdict)
    try:
        text = d.decompress(payload[4:], MAX_STATUS_BYTES + 1)
    except zlib.error as exc:
        raise PayloadError(f"status does not inflate: {exc}") from exc
    if len(text) > MAX_STATUS_BYTES or d.unconsumed_tail:
        raise PayloadError("status too large")
    if not d.eof:
        raise PayloadError("status truncated")
    return text
