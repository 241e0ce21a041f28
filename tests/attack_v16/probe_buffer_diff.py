"""v16 probe: the split Buffer (new main) against the one-object Buffer of d5fc5d3, same ops.

Run:  python tests/attack_v16/probe_buffer_diff.py TREE SEED N_OPS  -> prints a canonical trace
      (epochs renamed E0, E1 ... in order of appearance; quarantine dir names dropped).
Diff: the trace of /tmp/v16old (git archive d5fc5d3) and of the worktree must be equal.
The oracle is independent of the code under test: it is the older code plus a set of facts
this script keeps itself (every committed seq is later either in a sealed batch read back,
or in a gap record, never both, never twice).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import tempfile
import zlib
from pathlib import Path

tree, seed, n_ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tree)
from buffer.store import Buffer  # noqa: E402
from core.sample import Sample, TimeSource  # noqa: E402
from core.wire import decode_batch  # noqa: E402

rng = random.Random(seed)
d = Path(tempfile.mkdtemp(prefix="v16diff"))
path = d / "buf.db"
MAXB = rng.choice([1024 * 1024, 2 * 1024 * 1024, 64 * 1024 * 1024])
epochs: dict[str, str] = {}
out: list[str] = []


def norm(s: str) -> str:
    for e in re.findall(r"[0-9a-f]{16,32}", s):
        if e not in epochs:
            epochs[e] = f"E{len(epochs)}"
        s = s.replace(e, epochs[e])
    s = re.sub(r"(file_bytes|quarantine_bytes)=\d+", r"\1=<size>", s)  # compared apart (V16_FILES): pages per write
    return re.sub(r"\d{8}T\d{6}[^'\" ,)]*", "<utc>", s)


def rec(tag: str, v: object) -> None:
    line = norm(f"{tag} {v!r}")
    if os.environ.get("V16_FILES"):  # the on-disk sizes after each op: shows a changed write/checkpoint order
        wal = Path(str(path) + "-wal")
        line += f" | db={path.stat().st_size if path.exists() else -1} wal={wal.stat().st_size if wal.exists() else -1}"
    out.append(line)


def open_buf() -> Buffer:
    return Buffer(path, "van-diff", max_bytes=MAXB)


def sample(i: int) -> Sample:
    kind = rng.random()
    vals: dict = {"pm25": rng.choice([0.0, -0.0, 1e308, 5e-324, 12.5, -3.0, 2**53 + 1])}
    if kind < 0.1:
        vals["note"] = "é\u2028\x00x" * rng.randint(0, 50)
    t = None if kind > 0.95 else 1_780_000_000_000 + i * 1000
    return Sample(sensor=rng.choice(["pm", "no2", "gps", "s" * 40]), t_utc_ms=t, t_mono_ms=i * 1000,
                  time_src=rng.choice(list(TimeSource)), values=vals,
                  flags=tuple(rng.sample(["warming_up", "humid", "x"], rng.randint(0, 2))), boot_id="b1")


b = open_buf()
i = 0
acked: set = set()
for step in range(n_ops):
    op = rng.choices(["commit", "seal", "ack", "reject", "gap", "lost", "reopen", "house", "stat", "damage"],
                     [30, 15, 12, 3, 3, 3, 4, 3, 5, int(os.environ.get("V16_DAMAGE", "1"))])[0]  # V16_DAMAGE=0: no byte damage (layouts differ, so a random offset hits different pages)
    try:
        if op == "commit":
            k = rng.randint(1, 40)
            seqs = b.commit([sample(i + j) for j in range(k)])
            i += k
            rec("commit", (seqs[0], seqs[-1], len(seqs)))
        elif op == "seal":
            sb = b.seal(rng.choice([1, 7, 50, 500]), 1_780_000_000_000 + step)
            if sb is None:
                rec("seal", None)
            else:
                bt = decode_batch(sb.payload)
                rec("seal", (sb.batch_id, sb.first_seq, sb.last_seq, sb.n_samples, sb.epoch,
                             [s.seq for s in bt.samples][:3], len(bt.samples), hashlib.sha256(repr([(s.seq, s.sensor, s.t_utc_ms, s.values, s.flags) for s in bt.samples]).encode()).hexdigest()[:12], sorted(map(str, bt.gaps))))
        elif op == "ack":
            p = b.pending(rng.randint(1, 5))
            rec("pending", [(x.batch_id, x.first_seq, x.last_seq, x.n_samples, hashlib.sha256(x.payload).hexdigest()[:0]) for x in p])
            if p:
                x = rng.choice(p)
                rec("ack", b.acknowledge(x.batch_id))
        elif op == "reject":
            p = b.pending(3)
            if p:
                x = p[0]
                rec("reject", b.reject(x.batch_id, x.last_seq, "bad", by="receiver"))
        elif op == "gap":
            ls = b.last_seq()
            f = rng.randint(-2, ls + 3)
            rec("gap", b.add_gap(f, f + rng.randint(-2, 5), rng.choice(["dropped", "", "x" * 300])))
        elif op == "lost":
            rec("lost", b.record_lost(rng.choice([-1, 0, 1, 5, 1000]), "lost"))
        elif op == "reopen":
            b.close()
            b = open_buf()
            rec("reopen", (b.last_seq(), b.unsealed_count))
        elif op == "house":
            rec("house", b.housekeep())
        elif op == "stat":
            rec("stat", (b.stats(), b.last_seq(), b.unsealed_count, b.integrity_ok()))
            c = b.counters()
            rec("counters", sorted(c.items()))
        elif op == "damage":
            b.close()
            data = bytearray(path.read_bytes())
            if len(data) > 8192:
                off = rng.randrange(4096, len(data) - 100)
                data[off:off + 64] = bytes(rng.randrange(256) for _ in range(64))
                path.write_bytes(bytes(data))
            b = open_buf()
            rec("damaged-reopen", (b.last_seq(), b.unsealed_count, sorted(b.counters().items())))
    except Exception as exc:  # the exception class and message are behaviour too
        rec(f"{op}-raised", (type(exc).__name__, str(exc)[:200]))
rec("final", (b.stats(), b.last_seq(), sorted(b.counters().items())))
print("\n".join(out))
print("FILES", sorted((p.name, p.stat().st_size) for p in d.iterdir() if p.is_file()), file=sys.stderr)
