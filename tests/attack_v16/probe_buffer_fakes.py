"""v16 probe: the buffer parts the authors' seam test does not build alone (Room), built here with
fakes, and the seams checked for completeness.

Run: .venv/bin/python -m pytest tests/attack_v16/probe_buffer_fakes.py -q -p no:cacheprovider
Oracle: this file's own view of the table (which seqs are left) against what the fakes were told.
"""
from __future__ import annotations

import ast
import json
import sqlite3
from pathlib import Path

from buffer import rowcheck
from buffer.handle import FileHandle
from buffer.room import Room
from buffer.schema import SCHEMA

BUF = Path(__file__).resolve().parents[2] / "buffer"


class Tally:
    def __init__(self) -> None:
        self.c: dict[str, int] = {}

    def bump(self, name: str, by: int = 1) -> None:
        self.c[name] = self.c.get(name, 0) + by

    def bump_quietly(self, name: str) -> None:
        self.bump(name)


class Gaps:
    def __init__(self) -> None:
        self.got: list[tuple[int, int, str]] = []

    def gap(self, first: int, last: int, reason: str) -> None:
        self.got.append((first, last, reason))

    def set_last_seq(self, last: int) -> None:
        pass

    def lose(self, n: int, reason: str) -> tuple[int, int]:
        raise AssertionError


class Carriers:
    def __init__(self) -> None:
        self.added: list = []

    def add_carrier(self, epoch: str, device: str, gaps: list) -> None:
        self.added.append((epoch, device, gaps))


def _handle(tmp: Path) -> FileHandle:
    h = FileHandle(tmp / "b.sqlite", "van-x")
    h.db = sqlite3.connect(h.path, isolation_level=None)
    h.db.executescript(SCHEMA)
    h.db.create_function("row_crc", 8, rowcheck.row_crc, deterministic=True)
    h.epoch = "00112233445566778899aabbccddeeff"[:16]
    return h


def test_room_alone_with_fakes_drops_oldest_and_tells_the_fake_exactly_what_went(tmp_path: Path) -> None:
    h = _handle(tmp_path)
    big = json.dumps({"pm25": 1.0, "pad": "x" * 3000})
    with h.tx():
        # seqs with holes (as after earlier seals): 1..400 minus every 7th
        seqs = [q for q in range(1, 401) if q % 7]
        h.db.executemany(
            "INSERT INTO samples (seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags, crc)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            [(q, "pm", q, q, "gps", "b", big, "", 0) for q in seqs])
    h.unsealed = len(seqs)
    tally, gaps, car = Tally(), Gaps(), Carriers()
    room = Room(h, tally, gaps, car, max_bytes=1024 * 1024, wal_autocheckpoint=8, reserve_bytes=0)
    assert room.used_bytes() > room.budget(), "the probe must start over the cap"
    room.enforce_cap(0)
    left = {r[0] for r in h.db.execute("SELECT seq FROM samples")}
    gone = set(seqs) - left
    told = set()
    for a, b, why in gaps.got:
        assert "buffer full" in why
        told |= set(range(a, b + 1))
    assert gone, "nothing dropped"
    # every dropped seq told, and nothing told that was not a committed sample (the holes are not samples)
    assert gone <= told
    assert told & set(range(1, 401)) - set(seqs) == set() or told - gone == set(), (sorted(told - gone)[:10])
    assert tally.c.get("samples_dropped") == len(gone)
    assert room.used_bytes() <= room.budget()
    assert h.unsealed == len(left)
    assert min(left) > max(gone), "the oldest go first"


def _ctor_annotations(cls_file: str, cls: str) -> dict[str, str]:
    tree = ast.parse((BUF / cls_file).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name == "__init__":
                    args = f.args.args[1:] + f.args.kwonlyargs
                    return {a.arg: ast.unparse(a.annotation) for a in args if a.annotation is not None}
    raise AssertionError(cls)


CONCRETE = {"FileHandle", "HighWater", "IdentityFile", "HeldLedger", "Path"}


def test_report_which_collaborators_are_concrete_classes_not_protocols() -> None:
    """Not a pass/fail of behaviour: prints, per part, the collaborators typed by a concrete class
    (a fake must then be a real one, or a subclass)."""
    parts = {"commit.py": "Committer", "seal.py": "Sealer", "outbox.py": "Outbox", "ack.py": "Acknowledger",
             "room.py": "Room", "recover.py": "Recovery", "epoch.py": "EpochKeeper", "held.py": "HeldSamples",
             "opening.py": "Opener", "gaps.py": "GapLog", "carriers.py": "Carriers", "counters.py": "Counters"}
    rows = {}
    for f, c in parts.items():
        ann = _ctor_annotations(f, c)
        rows[c] = sorted(f"{k}:{v}" for k, v in ann.items() if v in CONCRETE - {"Path", "FileHandle"})
    print(json.dumps(rows, indent=1))
    concrete = {c: v for c, v in rows.items() if v}
    # Recovery, EpochKeeper, HeldSamples, Opener take the side files as concrete classes.
    assert concrete, "all seams Protocols"


def test_report_which_parts_write_the_gaps_table_without_the_gap_seam() -> None:
    writers = []
    for f in sorted(BUF.glob("*.py")):
        src = f.read_text()
        if any(s in src for s in ("INSERT INTO gaps", "UPDATE gaps", "DELETE FROM gaps")) and f.name != "gaps.py":
            writers.append(f.name)
    print("gaps table written outside buffer/gaps.py by:", writers)
    assert writers  # a fake GapRecorder does not see these writes
