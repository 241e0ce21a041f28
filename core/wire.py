"""The wire format: the one module that knows how batches and acks look in bytes.

A batch payload is ``MAGIC + version byte + body``. Version 1's body is
zlib-compressed JSON (readable, self-describing); version 2 (the default,
``core.codec_v2``) is columnar, delta-encoded and compressed, about 5 times
smaller than version 1 and under a byte per measured value. Both decode through
``decode_batch`` and pass the same checks; version 3 (the default since issue #18)
is version 2 with the known key names built in. A payload of an unknown version is
refused with a reason rather than guessed at.

Topics (``prefix`` defaults to ``datalab/v1``):

* ``{prefix}/{device}/batch``  device -> receiver, QoS 1, one sealed batch
* ``{prefix}/{device}/ack``    receiver -> device, QoS 1, JSON ack

Full description: docs/wire-format.md.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from core.errors import PayloadError
from core.sample import Sample, TimeSource
from core.status_codec import deflate_status, inflate_status

MAGIC = b"DLB"
VERSION_JSON = 1
VERSION_COLUMNAR = 2
# Version 2 with a built-in table of the known key names (core/codec_v2.py STATIC_STRINGS_V3).
VERSION_COLUMNAR_STATIC = 3
# Version 3's table, tighter value and time coding (core/codec_v2.py), and its sender reads
# binary acks (issue #18).
VERSION_COMPACT = 4
COLUMNAR_VERSIONS = (VERSION_COLUMNAR, VERSION_COLUMNAR_STATIC, VERSION_COMPACT)
SUPPORTED_VERSIONS = (VERSION_JSON, VERSION_COLUMNAR, VERSION_COLUMNAR_STATIC, VERSION_COMPACT)
DEFAULT_VERSION = VERSION_COMPACT

# Bounds that keep a hostile or broken payload from costing the receiver much.
# Decoded, a batch costs ~100 bytes of Python objects per value: these keep the
# largest batch the format allows to tens of MB in the receiver (its memory budget,
# docs/architecture.md "Memory"), 10-60 times what a van seals by default (2000 samples).
MAX_PAYLOAD_BYTES = 1 << 20  # 1 MiB on the wire
MAX_DECOMPRESSED_BYTES = 4 << 20  # 4 MiB once inflated: no zip bombs (version 1 JSON: < 1M values)
MAX_SAMPLES_PER_BATCH = 20_000


@dataclass(frozen=True, slots=True)
class Gap:
    """An intentional drop the device owns up to: which sequence range, and why."""

    first_seq: int
    last_seq: int
    reason: str


@dataclass(slots=True)
class Batch:
    device: str
    epoch: str
    first_seq: int
    last_seq: int
    samples: list[Sample]
    gaps: list[Gap] = field(default_factory=list)

    @property
    def batch_id(self) -> str:
        return batch_id(self.device, self.epoch, self.first_seq, self.last_seq)


def batch_id(device: str, epoch: str, first_seq: int, last_seq: int) -> str:
    return f"{device}/{epoch}/{first_seq}-{last_seq}"


def parse_batch_id(bid: str) -> tuple[str, str, int, int]:
    try:
        device, epoch, rng = bid.split("/")
        first, last = rng.split("-")
        return device, epoch, int(first), int(last)
    except ValueError as exc:
        raise PayloadError(f"malformed batch id {bid!r}") from exc


def batch_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/batch"


def ack_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/ack"


def status_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/status"


def sync_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/sync"


def split_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(device, kind) of one of our topics, e.g. ("van-001", "batch"), else None."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head) :].split("/")
    return (rest[0], rest[1]) if len(rest) == 2 and rest[0] and rest[1] else None


def device_from_topic(prefix: str, topic: str) -> str | None:
    """The device a batch topic belongs to, or None if it is not a batch topic of ours."""
    parts = split_topic(prefix, topic)
    return parts[0] if parts and parts[1] == "batch" else None


def content_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# --- batches ---------------------------------------------------------------


def _sample_row(s: Sample) -> list[Any]:
    return [s.seq, s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.values, list(s.flags), s.boot_id]


def encode_batch(batch: Batch, version: int = DEFAULT_VERSION) -> bytes:
    """Bytes for a sealed batch. Deterministic: the same batch gives the same bytes."""
    if version in COLUMNAR_VERSIONS:
        from core.codec_v2 import encode_v2  # imported here: codec_v2 imports this module

        return MAGIC + bytes([version]) + encode_v2(batch, version)
    if version != VERSION_JSON:
        raise ValueError(f"cannot encode wire version {version} (known: {SUPPORTED_VERSIONS})")
    body = {
        "device": batch.device,
        "epoch": batch.epoch,
        "first": batch.first_seq,
        "last": batch.last_seq,
        "cols": ["seq", "sensor", "t_utc_ms", "t_mono_ms", "time_src", "values", "flags", "boot"],
        "samples": [_sample_row(s) for s in batch.samples],
        "gaps": [[g.first_seq, g.last_seq, g.reason] for g in batch.gaps],
    }
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    return MAGIC + bytes([VERSION_JSON]) + zlib.compress(raw, 6)


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_DECOMPRESSED_BYTES)
    except zlib.error as exc:
        raise PayloadError(f"body is not valid zlib data: {exc}") from exc
    if d.unconsumed_tail:
        raise PayloadError(f"body inflates to more than {MAX_DECOMPRESSED_BYTES} bytes")
    if not d.eof:
        raise PayloadError("body is truncated")
    if d.unused_data:  # as version 2 does: bytes nobody checked must not ride along
        raise PayloadError("trailing bytes after the compressed body")
    return out


def _loads(raw: bytes, what: str) -> Any:
    """JSON from an upload. The parser's own failures on hostile input are rejections too:
    nesting deeper than its recursion guard (RecursionError) and an integer of more
    than 4,300 digits (ValueError), besides malformed JSON and bad UTF-8."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise PayloadError(f"{what} is JSON nested too deep") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise PayloadError(f"{what} is not valid JSON: {str(exc)[:200]}") from exc


def _req(obj: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise PayloadError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise PayloadError(f"field {key!r} has the wrong type")
    return value


# Bounds of what a sample may hold: the receiver refuses a batch with anything beyond, and the
# van's buffer refuses such a sample alone at commit; both through core.sample_rules.
MAX_ABS_FLOAT = 1e15  # no sensor measures beyond this in any unit; derived arithmetic stays exact
MAX_NAME_CHARS = 128  # device, epoch, sensor, boot id, time source, value keys, flags
MAX_TEXT_CHARS = 16_384  # a string value (a calibration record is ~1 KB), a gap reason
MAX_KEYS_PER_SAMPLE = 256


def _decode_sample(row: Any) -> Sample:
    if not isinstance(row, list) or len(row) != 8:
        raise PayloadError("a sample row must be a list of 8 fields")
    seq, sensor, t_utc, t_mono, src, values, flags, boot = row
    if not (isinstance(seq, int) and isinstance(t_mono, int) and (t_utc is None or isinstance(t_utc, int))):
        raise PayloadError("seq and times must be integers (t_utc_ms may be null)")
    if not isinstance(sensor, str) or not sensor:
        raise PayloadError("sensor must be a non-empty string")
    try:
        time_src = TimeSource(src)
    except ValueError as exc:
        raise PayloadError(f"unknown time source {src!r}") from exc
    if not isinstance(values, dict):
        raise PayloadError("values must be an object")
    for k, v in values.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (int, float, str))):
            raise PayloadError(f"value {k!r} must be a number, a string or null")
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise PayloadError("flags must be a list of strings")
    if not isinstance(boot, str):
        raise PayloadError("boot must be a string")
    return Sample(sensor, t_utc, t_mono, time_src, values, tuple(flags), seq, boot)


def decode_batch(payload: bytes, inflated: bytes | None = None) -> Batch:
    """Decode and validate; raise ``PayloadError`` with the reason for anything off.

    ``inflated``: the body already inflated and checked (``inflate_body``), so a receiver
    that measured it first does not inflate it again."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    if len(payload) < len(MAGIC) + 1 or not payload.startswith(MAGIC):
        raise PayloadError("not a datalab batch (bad magic)")
    version = payload[len(MAGIC)]
    if version not in SUPPORTED_VERSIONS:
        raise PayloadError(
            f"unsupported wire version {version} (this receiver reads {SUPPORTED_VERSIONS})"
        )
    try:
        if version in COLUMNAR_VERSIONS:
            from core.codec_v2 import decode_v2

            return _validate(decode_v2(payload[len(MAGIC) + 1 :], inflated, version))
        return _validate(_decode_v1(payload[len(MAGIC) + 1 :], inflated))
    except PayloadError:
        raise
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:
        # Whatever else a crafted payload makes a decoder raise is still the payload's
        # fault: never let it pass for a store failure (retried forever).
        raise PayloadError(f"malformed payload: {type(exc).__name__}: {str(exc)[:200]}") from exc


def inflate_body(payload: bytes) -> bytes:
    """The checked inflated body of a batch (version 1: its JSON, 2: its plain columns), as
    ``decode_batch`` takes it; PayloadError as decoding would raise it."""
    if len(payload) > MAX_PAYLOAD_BYTES or len(payload) < len(MAGIC) + 1 or not payload.startswith(MAGIC):
        raise PayloadError("not a datalab batch within the payload limit")
    version, body = payload[len(MAGIC)], payload[len(MAGIC) + 1 :]
    if version in COLUMNAR_VERSIONS:
        from core.codec_v2 import unpack

        return unpack(body)
    if version not in SUPPORTED_VERSIONS:
        raise PayloadError(f"unsupported wire version {version}")
    return _inflate(body)


# Version 1's row layout, named in every body's "cols"; decoding refuses any other header.
V1_COLS = ["seq", "sensor", "t_utc_ms", "t_mono_ms", "time_src", "values", "flags", "boot"]


def _decode_v1(body_bytes: bytes, raw: bytes | None = None) -> Batch:
    raw = _inflate(body_bytes) if raw is None else raw
    body = _loads(raw, "body")
    if not isinstance(body, dict):
        raise PayloadError("body must be a JSON object")
    device = _req(body, "device", str)
    epoch = _req(body, "epoch", str)
    first = _req(body, "first", int)
    last = _req(body, "last", int)
    rows = _req(body, "samples", list)
    gap_rows = _req(body, "gaps", list)
    if first < 1 or last < first:
        raise PayloadError(f"bad sequence range {first}-{last}")
    if len(rows) > MAX_SAMPLES_PER_BATCH:
        raise PayloadError(f"{len(rows)} samples exceed {MAX_SAMPLES_PER_BATCH}")
    samples = [_decode_sample(r) for r in rows]
    gaps: list[Gap] = []
    for g in gap_rows:
        if (
            not isinstance(g, list)
            or len(g) != 3
            or not isinstance(g[0], int)
            or not isinstance(g[1], int)
            or not isinstance(g[2], str)
            or g[1] < g[0]
        ):
            raise PayloadError("a gap must be [first_seq, last_seq, reason]")
        gaps.append(Gap(g[0], g[1], g[2]))
    if body.get("cols") != V1_COLS:
        # Rows are read by position: a header naming other columns (or fewer) means the
        # sender's rows are not what we would read them as (issue 13: ignored until now).
        raise PayloadError(f"cols must be {V1_COLS}")
    return Batch(device, epoch, first, last, samples, gaps)


def _validate(batch: Batch) -> Batch:
    """The checks every version passes, whatever its layout."""
    first, last = batch.first_seq, batch.last_seq
    if first < 1 or last < first:
        raise PayloadError(f"bad sequence range {first}-{last}")
    if len(batch.samples) > MAX_SAMPLES_PER_BATCH:
        raise PayloadError(f"{len(batch.samples)} samples exceed {MAX_SAMPLES_PER_BATCH}")
    seqs = [s.seq for s in batch.samples]
    # The range checked on the column at once (min/max run in C); the sample named only on failure.
    if seqs and (None in seqs or min(seqs) < first or max(seqs) > last):  # type: ignore[type-var]
        for q in seqs:
            assert q is not None
            if not first <= q <= last:
                raise PayloadError(f"sample seq {q} outside the batch range {first}-{last}")
    if len(set(seqs)) != len(seqs):
        raise PayloadError("a sequence number appears twice in one batch")
    for g in batch.gaps:
        if g.last_seq < g.first_seq:
            raise PayloadError("a gap must be [first_seq, last_seq, reason] with last >= first")
    return batch


# --- acknowledgements --------------------------------------------------------

ACK_STORED = "stored"  # committed in the store by this delivery
ACK_DUPLICATE = "duplicate"  # was already committed: the device may delete it too
ACK_REJECTED = "rejected"  # permanently bad: the device stops retrying and records a gap
ACK_STATUSES = (ACK_STORED, ACK_DUPLICATE, ACK_REJECTED)


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver's word on one batch.

    ``sha256`` is the hash of the payload as received: when a payload is too
    broken to name its batch, the device still knows which one it was.
    """

    batch_id: str
    status: str
    reason: str = ""
    sha256: str = ""

    @property
    def committed(self) -> bool:
        return self.status in (ACK_STORED, ACK_DUPLICATE)

    def names_payload(self, sha256: str) -> bool:
        """Whether this ack is about the payload of that SHA-256 (hex): a binary ack carries
        its first 16 bytes, a JSON one all 32."""
        return len(self.sha256) >= 2 * ACK_DIGEST_BYTES and sha256.startswith(self.sha256)


# Ack version 2 (issue #18): binary, ~45 bytes instead of ~190 of JSON, whose 64-hex digest
# and key names alone were a tenth of a byte per value on a van's link.
#   "DLA" | 0x02 | status code | 16 bytes of the payload's SHA-256 | u len(epoch), epoch |
#   u first | u last - first | reason (UTF-8, the rest; rejections only, <= 1,024 bytes)
# An empty epoch with first = span = 0 names no batch (a payload too broken to name it).
# The device is the topic's. The receiver answers in it only when the batch asks for it
# (wire version >= 4, or a sync request with "ack": 2): older vans keep their JSON acks.
ACK_MAGIC = b"DLA"
ACK_JSON = 1
ACK_BINARY = 2
ACK_DIGEST_BYTES = 16  # 128 bits: a collision among one van's batches is not a concern
MAX_ACK_REASON_BYTES = 1024
_ACK_CODES = {ACK_STORED: 0, ACK_DUPLICATE: 1, ACK_REJECTED: 2}
_ACK_STATUS_OF = {v: k for k, v in _ACK_CODES.items()}
# The first batch version whose sender reads binary acks.
VERSION_BINARY_ACK = 4


def ack_version_for(payload: bytes) -> int:
    """The ack form the sender of this batch payload reads: binary from wire version 4 on."""
    version = payload[len(MAGIC)] if len(payload) > len(MAGIC) and payload.startswith(MAGIC) else 0
    if version in SUPPORTED_VERSIONS and version >= VERSION_BINARY_ACK:  # not an unknown one
        return ACK_BINARY
    return ACK_JSON


def encode_ack(ack: Ack, version: int = ACK_JSON) -> bytes:
    """The ack in the form asked for; JSON when it cannot be binary (no SHA-256 to carry):
    a van that reads binary acks reads JSON ones too."""
    if version == ACK_BINARY and len(ack.sha256) == 64:
        try:
            return _encode_ack_binary(ack)
        except (PayloadError, ValueError):
            pass
    return json.dumps(
        {
            "v": 1,
            "batch": ack.batch_id,
            "status": ack.status,
            "reason": ack.reason,
            "sha256": ack.sha256,
        },
        separators=(",", ":"),
    ).encode()


def _encode_ack_binary(ack: Ack) -> bytes:
    try:
        _device, epoch, first, last = parse_batch_id(ack.batch_id)
    except PayloadError:  # a payload too broken to name its batch: the digest alone says which
        epoch, first, last = "", 0, 0
    raw_epoch = epoch.encode()
    digest = bytes.fromhex(ack.sha256)[:ACK_DIGEST_BYTES] if ack.sha256 else b""
    if len(digest) != ACK_DIGEST_BYTES:
        raise ValueError("a binary ack needs the payload's SHA-256")
    out = bytearray(ACK_MAGIC + bytes([ACK_BINARY, _ACK_CODES[ack.status]]) + digest)
    out += _uvarint(len(raw_epoch)) + raw_epoch + _uvarint(first) + _uvarint(last - first)
    reason = ack.reason.encode("utf-8", "replace")
    if len(reason) > MAX_ACK_REASON_BYTES:  # cut on a character boundary
        reason = reason[:MAX_ACK_REASON_BYTES].decode("utf-8", "ignore").encode()
    return bytes(out) + reason


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_uvarint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):
        if pos >= len(buf):
            raise PayloadError(f"ack truncated in {what}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise PayloadError(f"ack varint too long in {what}")


def _decode_ack_binary(payload: bytes, device: str) -> Ack:
    if len(payload) > 4 + 1 + ACK_DIGEST_BYTES + 140 + 20 + MAX_ACK_REASON_BYTES:
        raise PayloadError("ack too large")
    if len(payload) < 5 or payload[3] != ACK_BINARY:
        raise PayloadError("ack of unknown version")
    status = _ACK_STATUS_OF.get(payload[4])
    if status is None:
        raise PayloadError(f"ack with unknown status code {payload[4]}")
    pos = 5 + ACK_DIGEST_BYTES
    digest = payload[5:pos]
    if len(digest) != ACK_DIGEST_BYTES:
        raise PayloadError("ack truncated in its digest")
    n, pos = _read_uvarint(payload, pos, "epoch length")
    if n > 128 or pos + n > len(payload):
        raise PayloadError("ack epoch too long or truncated")
    try:
        epoch = payload[pos : pos + n].decode()
        first, pos = _read_uvarint(payload, pos + n, "first seq")
        span, pos = _read_uvarint(payload, pos, "seq span")
        reason = payload[pos:].decode()
    except UnicodeDecodeError as exc:
        raise PayloadError("ack text is not UTF-8") from exc
    if not epoch and first == span == 0:
        return Ack("", status, reason, digest.hex())  # no batch named: the van matches the digest
    if not epoch or "/" in epoch or first < 1 or first + span > (1 << 63) - 1:
        raise PayloadError("ack names no valid batch")
    return Ack(batch_id(device, epoch, first, first + span), status, reason, digest.hex())


def decode_ack(payload: bytes, device: str = "") -> Ack:
    """Either form: JSON (version 1) or binary (version 2, whose batch id takes ``device``,
    the topic's)."""
    if payload.startswith(ACK_MAGIC):
        if not device:
            raise PayloadError("a binary ack needs the device of its topic")
        return _decode_ack_binary(payload, device)
    obj = _loads(payload, "ack")
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise PayloadError("ack of unknown version")
    bid, status = obj.get("batch"), obj.get("status")
    if not isinstance(bid, str) or status not in ACK_STATUSES:
        raise PayloadError("ack lacks a batch id or a known status")
    reason = obj.get("reason", "")
    sha = obj.get("sha256", "")
    return Ack(
        bid, status, reason if isinstance(reason, str) else "", sha if isinstance(sha, str) else ""
    )


# --- resync and heartbeat ------------------------------------------------------
#
# On every (re)connect the device names the batches it still holds; the receiver
# answers each one it has already committed with a "duplicate" ack. A lost ack
# heals itself without a re-upload.

MAX_SYNC_IDS = 1000


def encode_sync(epoch: str, batch_ids: list[str], ack: int = ACK_BINARY) -> bytes:
    """``ack``: the ack form the van reads (2: binary); receivers before it ignore the field."""
    body: dict[str, Any] = {"v": 1, "epoch": epoch, "batches": batch_ids[:MAX_SYNC_IDS]}
    if ack != ACK_JSON:
        body["ack"] = ack
    return json.dumps(body, separators=(",", ":")).encode()


def sync_ack_version(payload: bytes) -> int:
    """The ack form a sync request asks for (JSON unless it says ``"ack": 2``)."""
    try:
        obj = json.loads(payload) if len(payload) <= 256 * 1024 else None
    except (ValueError, RecursionError):
        return ACK_JSON
    return ACK_BINARY if isinstance(obj, dict) and obj.get("ack") == ACK_BINARY else ACK_JSON


def decode_sync(payload: bytes) -> list[str]:
    if len(payload) > 256 * 1024:
        raise PayloadError("sync request too large")
    obj = _loads(payload, "sync request")
    ids = obj.get("batches") if isinstance(obj, dict) and obj.get("v") == 1 else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise PayloadError("sync request lacks a list of batch ids")
    return ids[:MAX_SYNC_IDS]


def encode_status(status: dict[str, Any], compact: bool = True) -> bytes:
    """A heartbeat (retained): online flag, backlog, sensor health, disk, temperature.

    ``compact``: deflated with a preset dictionary (core/status_codec.py), ~5x smaller.
    """
    text = json.dumps({"v": 1, **status}, separators=(",", ":"), allow_nan=False).encode()
    return deflate_status(text) if compact else text


def decode_status(payload: bytes) -> dict[str, Any]:
    if len(payload) > 64 * 1024:
        raise PayloadError("status too large")
    obj = _loads(inflate_status(payload), "status")
    if not isinstance(obj, dict) or obj.get("v") != 1 or not isinstance(obj.get("online"), bool):
        raise PayloadError("status of unknown version or without 'online'")
    return obj
