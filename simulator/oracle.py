"""The delivery oracle (shared/reference/delivery.md): did every committed sample arrive once?

A device owes the store every sequence number its buffer ever assigned
(AUTOINCREMENT numbers are never reused and every committed group is one
transaction, so the numbers of an epoch are exactly 1..last_seq), except the
ranges it owned up to in gap records. The oracle reads both sides and says
what is missing, extra, doubled or altered.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from simulator.value_sensors import oracle_check


@dataclass
class DeviceVerdict:
    device: str
    epoch: str
    last_seq: int
    stored: int = 0
    gapped: int = 0
    missing: list[int] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    doubled: int = 0
    altered: list[int] = field(default_factory=list)
    integrity: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.doubled or self.altered) and self.integrity == "ok"


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def device_side(buffer_path: Path) -> tuple[str, str, int, str]:
    """(device, epoch, last_seq, integrity_check) of a device buffer."""
    db = _ro(buffer_path)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()
    return meta["device"], meta["epoch"], int(row[0]) if row else 0, integrity


def check(store_path: Path, buffer_paths: list[Path]) -> list[DeviceVerdict]:
    store = _ro(store_path)
    verdicts = []
    try:
        for bp in buffer_paths:
            device, epoch, last_seq, integrity = device_side(bp)
            v = DeviceVerdict(device, epoch, last_seq, integrity=integrity)
            rows = store.execute(
                "SELECT seq, sensor, t_mono_ms, vals FROM samples WHERE device=? AND epoch=?",
                (device, epoch),
            ).fetchall()
            seqs = [r[0] for r in rows]
            v.stored = len(seqs)
            v.doubled = len(seqs) - len(set(seqs))
            gaps = store.execute(
                "SELECT first_seq, last_seq FROM gaps WHERE device=? AND epoch=?", (device, epoch)
            ).fetchall()
            # Gap ranges may be open-ended (an epoch whose end was unreadable): clip them
            # to what this device can have committed.
            gapped: set[int] = set()
            for first, last in gaps:
                gapped.update(range(max(first, 1), min(last, last_seq) + 1))
            v.gapped = len(gapped)
            have = set(seqs)
            v.missing = sorted(set(range(1, last_seq + 1)) - have - gapped)
            v.extra = sorted(q for q in have if q > last_seq or q < 1)
            for seq, sensor, t_mono, vals in rows:
                if sensor.startswith("oracle"):
                    if json.loads(vals).get("check") != oracle_check(t_mono):
                        v.altered.append(seq)
            verdicts.append(v)
    finally:
        store.close()
    return verdicts
