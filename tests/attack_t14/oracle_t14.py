"""An oracle of my own (t14), independent of simulator/oracle.py.

Ground truth is what the probe itself handed to ``Buffer.commit`` (kept in memory), matched in the
store by a token unique to each sample (``values['tok']``), not by (epoch, seq): a sample stored under
another epoch or number is still found, and counted doubled if found twice.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Truth:
    """One committed sample: the fields the store must hold unchanged."""
    epoch: str
    seq: int
    sensor: str
    t_utc_ms: int | None
    t_mono_ms: int
    time_src: str
    boot_id: str
    vals: dict
    flags: tuple[str, ...]


@dataclass
class Verdict:
    missing: list[int] = field(default_factory=list)     # neither stored nor covered by a gap of its epoch
    doubled: list[int] = field(default_factory=list)     # token stored more than once
    altered: list[tuple[int, str]] = field(default_factory=list)  # stored with a field changed
    invented: list[str] = field(default_factory=list)    # a stored row of this device that matches no truth
    other_epoch: int = 0                                  # stored under an epoch other than its own
    salvaged_flagged: int = 0
    stored: int = 0
    gapped: int = 0
    overclaim: int = 0  # gapped AND stored (a gap claiming a delivered number lost)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.doubled or self.altered or self.invented)

    def brief(self) -> str:
        return (f"stored={self.stored} gapped={self.gapped} missing={self.missing[:8]}({len(self.missing)})"
                f" doubled={len(self.doubled)} altered={self.altered[:3]}({len(self.altered)})"
                f" invented={self.invented[:3]}({len(self.invented)}) other_epoch={self.other_epoch}"
                f" salvaged_flag={self.salvaged_flagged} overclaim={self.overclaim}")


def judge(store: Path, device: str, truth: list[Truth]) -> Verdict:
    c = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    rows = c.execute("SELECT epoch, seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags"
                     " FROM samples WHERE device=?", (device,)).fetchall()
    gaps = c.execute("SELECT epoch, first_seq, last_seq FROM gaps WHERE device=?", (device,)).fetchall()
    c.close()
    by_tok = {t.vals["tok"]: t for t in truth}
    seen: dict[int, int] = {}
    v = Verdict()
    for epoch, seq, sensor, t_utc, t_mono, src, boot, vals, flags in rows:
        try:
            tok = json.loads(vals).get("tok")
        except (ValueError, AttributeError):
            tok = None
        t = by_tok.get(tok)
        if t is None:
            v.invented.append(f"{epoch}/{seq} {vals[:60]}")
            continue
        seen[tok] = seen.get(tok, 0) + 1
        fl = tuple(f for f in (flags or "").split(",") if f)
        if "salvaged" in fl:
            v.salvaged_flagged += 1
        fl = tuple(f for f in fl if f != "salvaged")
        diffs = []
        if epoch != t.epoch:
            v.other_epoch += 1
        if seq != t.seq and epoch == t.epoch:
            diffs.append(f"seq {t.seq}->{seq}")
        for name, got, want in (("sensor", sensor, t.sensor), ("t_utc", t_utc, t.t_utc_ms),
                                ("t_mono", t_mono, t.t_mono_ms), ("src", src, t.time_src),
                                ("boot", boot, t.boot_id), ("vals", json.loads(vals), t.vals),
                                ("flags", fl, t.flags)):
            if got != want:
                diffs.append(f"{name} {want!r}->{got!r}")
        if diffs:
            v.altered.append((t.seq, "; ".join(diffs)))
    v.stored = sum(seen.values())
    v.doubled = [by_tok[k].seq for k, n in seen.items() if n > 1]
    for t in truth:
        covered = any(e == t.epoch and a <= t.seq <= b for e, a, b in gaps)
        if covered:
            v.gapped += 1
            if t.vals["tok"] in seen:
                v.overclaim += 1
        elif t.vals["tok"] not in seen:
            v.missing.append(t.seq)
    return v
