"""The receiver's admission schema: what a decoded upload may hold before it touches the store.

The wire decoders (core/wire.py, core/codec_v2.py) check structure: the
bytes form a batch. This module checks the *domain*: every number, text and
time is one both stores can hold, read back and compute with. Anything else is
a ``PayloadError`` with the reason, so the upload is dead-lettered, never
half-stored and never mistaken for a store failure.

The per-sample rules are ``core.sample_rules.check_sample``, the very function
the van's buffer applies at commit, so the two can never disagree; this module
adds the batch's own fields, the calibration record check and heartbeats.

Why each bound (docs/wire-format.md, "What the receiver accepts", lists them):

* integers (seq, times, integer values) within signed 64 bits: the columns are
  ``bigint``/SQLite integers, and ``orjson`` (which reads the values back for
  every later batch's moving windows) reads 64-bit integers only. A stored
  10^309 read back as an infinite double and made the van's *next* batch fail;
  nothing outside these bounds is stored, so nothing stored can do that.
* floats finite and |x| <= 1e15: JSON has no NaN or infinity, and no sensor
  measures beyond 1e15 in any unit; derived arithmetic (means, slopes,
  interpolation) on such values stays finite.
* text without NUL (PostgreSQL text and jsonb refuse it) and valid Unicode (a
  lone surrogate cannot be encoded as UTF-8), of bounded length; names
  (device, epoch, sensor, keys, flags, boot id) printable and short.
* JSON carried inside a value (a calibration record) or as a status nests at
  most ``MAX_JSON_DEPTH`` deep: parsers recurse.
* a calibration record (sensor ``calibration``, value ``record``) has the fields
  and types derivation needs (receiver/calibration_check.py): a stored record
  with ``"algorithm": null`` made every later NO2 batch of its van fail.
* GPS fix fields in their physical range: they become ``fixes`` and
  ``positions`` rows (``double precision``, ``integer`` for the quality).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from core.calibration import CALIBRATION_SENSOR
from core.errors import PayloadError
from receiver.batch_consistency import check_consistency
from receiver.calibration_check import check_record
from core.codec_v2 import INT64_MAX, INT64_MIN  # noqa: F401  (re-exported)
# The per-sample rules live with the wire format and are shared with the van's buffer, which
# refuses at commit what would be refused here (one such sample costs its whole batch).
from core.sample_rules import (  # noqa: F401  (re-exported: check_status, tests)
    FIX_BOUNDS, GPS_SENSOR, MAX_FLAGS_PER_SAMPLE, MAX_JSON_DEPTH, MAX_SHOWN, Seen, check_float, check_int,
    check_name, check_sample, check_text, json_depth, show,
)
from core.batch_limits import MAX_GAPS_PER_BATCH  # one place for every batch limit (the van seals to it)
from core.wire import MAX_NAME_CHARS, Batch

MAX_STATUS_ITEMS = 4_000  # scalars and containers in one status message


def check_batch(batch: Batch) -> Batch:
    """The batch if every field is within the domain bounds and its numbers agree
    (receiver/batch_consistency.py: then with receiver gap rows for numbers it leaves
    unaccounted for); else ``PayloadError``.

    On the path of every upload, so the common case is cheap: a name (sensor, key,
    flag ...) is checked once per batch, and a plain int or float in range costs
    one chained comparison (NaN and infinity fail it too); anything else takes
    the slow path, which names the problem.
    """
    check_name(batch.device, "device", forbid="/+#")
    check_name(batch.epoch, "epoch", forbid="/")
    check_int(batch.first_seq, "first_seq", 1)
    check_int(batch.last_seq, "last_seq", 1)
    seen = Seen()  # names and texts checked once per batch
    for s in batch.samples:
        check_sample(s, seen)
        if s.sensor == CALIBRATION_SENSOR and type(s.values.get("record")) is str:
            check_record(s.values["record"])  # a record derivation cannot use is refused here
    if len(batch.gaps) > MAX_GAPS_PER_BATCH:
        raise PayloadError(f"more than {MAX_GAPS_PER_BATCH} gaps in one batch")
    for g in batch.gaps:
        check_int(g.first_seq, "gap first_seq", 1)
        check_int(g.last_seq, "gap last_seq", 1)
        check_text(g.reason, "gap reason", MAX_NAME_CHARS * 8)
    return check_consistency(batch)  # last: its numbers are known to be 64-bit integers by now


def check_status(status: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat as decoded JSON: bounded depth and size, store-safe scalars; else ``PayloadError``."""
    items = 0
    todo: list[tuple[Any, int]] = [(status, 1)]
    while todo:
        node, depth = todo.pop()
        items += 1
        if items > MAX_STATUS_ITEMS:
            raise PayloadError(f"status has more than {MAX_STATUS_ITEMS} items")
        if isinstance(node, dict):
            if depth > MAX_JSON_DEPTH:
                raise PayloadError(f"status nested more than {MAX_JSON_DEPTH} deep")
            for k in node:
                check_text(k, "status key", MAX_NAME_CHARS)
            todo += ((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            if depth > MAX_JSON_DEPTH:
                raise PayloadError(f"status nested more than {MAX_JSON_DEPTH} deep")
            todo += ((v, depth + 1) for v in node)
        elif isinstance(node, str):
            check_text(node, "status text", 1024)
        elif isinstance(node, float):
            check_float(node, "status number")
        elif isinstance(node, int) and not isinstance(node, bool):
            check_int(node, "status number")
    return status


def clean_ids(ids: Iterable[object], limit: int = 4 * MAX_NAME_CHARS) -> list[str]:
    """The batch ids of a sync request any store can look up; others cannot be ours and are dropped."""
    return [i for i in ids if isinstance(i, str) and 0 < len(i) <= limit and i.isprintable()]
