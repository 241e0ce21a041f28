"""The delivery oracle's device side, on a buffer alone: is every committed seq still held?

A van with no broker has delivered nothing, so every number 1..last_seq its buffer ever
assigned (simulator/oracle.py: AUTOINCREMENT, one transaction per commit) must still be
in it: as a row of ``samples``, inside a sealed batch's payload, or in a gap record the
van owned up to. Runs as a script too (``python buffer_oracle.py BUFFER``, printing JSON),
so the tests can run it inside the container with the installed venv, as the service's user.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def held_seqs(buffer_path: Path) -> dict[str, Any]:
    from core.wire import decode_batch  # the installed project's own decoder

    db = sqlite3.connect(f"file:{buffer_path}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='samples'").fetchone()
        last_seq = int(row[0]) if row else 0
        seqs: Counter[int] = Counter()
        sensors: Counter[str] = Counter()
        for seq, sensor in db.execute("SELECT seq, sensor FROM samples"):
            seqs[seq] += 1
            sensors[sensor] += 1
        for (payload,) in db.execute("SELECT payload FROM batches"):
            for s in decode_batch(bytes(payload)).samples:
                seqs[s.seq] += 1
                sensors[s.sensor] += 1
        gapped: set[int] = set()
        for first, last in db.execute("SELECT first_seq, last_seq FROM gaps"):
            gapped.update(range(max(first, 1), min(last, last_seq) + 1))
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()
    return {
        "last_seq": last_seq,
        "held": len(seqs),
        "gapped": len(gapped),
        "missing": sorted(set(range(1, last_seq + 1)) - set(seqs) - gapped),
        "extra": sorted(q for q in seqs if q < 1 or q > last_seq),
        "doubled": sum(n - 1 for n in seqs.values() if n > 1),
        "by_sensor": dict(sensors),
        "integrity": integrity,
    }


if __name__ == "__main__":
    print(json.dumps(held_seqs(Path(sys.argv[1]))))
