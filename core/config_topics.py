"""The topics of remote configuration: where the DataLab sends a van its configuration, and
where the van answers, and the id an ack carries. Both ends (edge/remote.py,
receiver/device_config.py) must agree.
"""

from __future__ import annotations

import hashlib
import json
import re

MAX_REQUEST_BYTES = 256 * 1024  # a van refuses a larger request (whole agent.toml files are a few KiB)


def config_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/config"


def config_ack_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/config/ack"


# The id as ``device-config send`` writes it: first in the object. Read from the
# head alone, so an oversize request (never parsed whole) is still refused under its own id.
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.)*")')
_ID_HEAD_BYTES = 4096


def request_id(payload: bytes) -> str:
    """The id a refusal of ``payload`` is acked under, so the sender can match it: the JSON
    ``id`` when it can be read (the whole object, or for one too large to parse its leading
    ``"id"``), else the digest a raw TOML request is known by; "" when there is none."""
    digest = hashlib.sha256(payload).hexdigest()[:16]
    if not payload.lstrip().startswith(b"{"):
        return digest  # a raw TOML request is known by its digest (device-config send computes the same)
    if len(payload) <= MAX_REQUEST_BYTES:
        try:
            obj = json.loads(payload)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return str(obj.get("id") or digest)
    m = _LEADING_ID.match(payload[:_ID_HEAD_BYTES])
    if m:
        try:
            rid = json.loads(m.group(1))
        except ValueError:
            return ""
        return str(rid or digest)
    return ""
