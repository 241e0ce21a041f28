"""The buffer's cost: commit rate, and what it does to the SD card per hour.

Rows:

* commit rate through ``Buffer.commit`` with realistic samples (4 sensors,
  value dicts like pm1/pm25/pm10/rh), in groups of 20 (5 s of 4 sensors at
  1 Hz, the agent's real group) and in groups of 2000, against raw
  ``sqlite3.executemany`` of the same rows into the same table in one
  transaction per group, same pragmas (WAL, synchronous=FULL). Target: Buffer
  >= 0.7 x raw for the large groups.
* per hour at 1 Hz with a 5 s commit interval (a commit of samples every 5 s,
  a seal every 60 s, an ack for every batch, as the agent does): the commits
  SQLite really made counted (its trace callback sees every COMMIT: seals and
  acks are transactions too), fsync/fdatasync calls counted
  with ``strace -f -c`` on a child process when strace is installed, and bytes
  written read from ``/proc/self/io`` ``write_bytes`` (what reached the block
  layer, checkpoints included) plus the logical ``wchar``; the hour is run
  compressed (no sleeping) since the work per commit does not depend on time.

    python bench/bench_buffer.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buffer.store import SCHEMA, Buffer
from core.sample import Sample, TimeSource

SENSORS = (
    ("pm", lambda i: {"pm1": 3.0 + i % 7, "pm25": 5.5 + i % 11, "pm10": 9.25 + i % 13, "rh": 55.0 + i % 5}),
    ("no2", lambda i: {"no2_ppb": 12.5 + i % 9, "we_mv": 301.25, "ae_mv": 288.5, "t_c": 21.5}),
    ("noise", lambda i: {"laeq": 61.2 + i % 10, "lafmax": 70.1, "lafmin": 48.3}),
    ("gps", lambda i: {"lat": 52.37 + i * 1e-6, "lon": 4.89 + i * 1e-6, "speed": 8.3, "fix_quality": 1}),
)
BOOT = "3f1c1f0e8f5e4b55a0f8b9a1d3c2e4f6"


def make_samples(n: int, t0: int = 0) -> list[Sample]:
    out = []
    for k in range(n):
        i = t0 + k
        name, vals = SENSORS[i % 4]
        tick = i // 4
        out.append(Sample(name, 1_764_000_000_000 + tick * 1000, tick * 1000, TimeSource.GPS, vals(tick), (), None, BOOT))
    return out


_ENC = json.JSONEncoder(separators=(",", ":")).encode  # the same fast path the Buffer uses


def _rows(samples: list[Sample]) -> list[tuple[Any, ...]]:
    return [
        (s.sensor, s.t_utc_ms, s.t_mono_ms, str(s.time_src), s.boot_id, _ENC(s.values), ",".join(s.flags))
        for s in samples
    ]


def _raw_rate(d: Path, group: int, total: int, prebuilt: bool) -> float:
    """Raw executemany, one transaction per group; rows built inside the timing unless ``prebuilt``."""
    db = sqlite3.connect(d / f"raw{int(prebuilt)}.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    groups: list[Any] = [make_samples(group, g * group) for g in range(total // group)]
    if prebuilt:
        groups = [_rows(g) for g in groups]
    t = time.perf_counter()
    for g in groups:
        rows = g if prebuilt else _rows(g)
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO samples (sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags) VALUES (?,?,?,?,?,?,?)",
            rows,
        )
        db.execute("COMMIT")
    dt = time.perf_counter() - t
    db.close()
    return total / dt


def _buffer_rate(d: Path, group: int, total: int) -> float:
    b = Buffer(d / "buf.sqlite", "van-001")
    groups = [make_samples(group, g * group) for g in range(total // group)]
    t = time.perf_counter()
    for g in groups:
        b.commit(g)  # includes building the rows (json.dumps), as the agent pays it
    dt = time.perf_counter() - t
    b.close()
    return total / dt


def _hour(path: str) -> dict[str, int]:
    """One compressed hour of agent work on the buffer; /proc/self/io deltas and ``commits``."""
    b = Buffer(path, "van-001")
    commits = 0

    def traced(sql: str) -> None:
        nonlocal commits
        commits += sql.lstrip().upper().startswith(("COMMIT", "END"))

    b._db.set_trace_callback(traced)  # the buffer's own connection: every transaction it ends
    io0 = _proc_io()
    t = 0
    for c in range(720):  # 3600 s / 5 s
        b.commit(make_samples(20, t))
        t += 20
        if c % 12 == 11:  # a seal a minute; the receiver acks it
            sb = b.seal(1000, 0)
            if sb:
                b.acknowledge(sb.batch_id)
    io1 = _proc_io()
    b._db.set_trace_callback(None)
    b.close()
    return {**{k: io1.get(k, 0) - io0.get(k, 0) for k in io1}, "commits": commits}


def _proc_io() -> dict[str, int]:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def _hour_measured() -> tuple[dict[str, int], int | None, str]:
    """Run the hour in a child (under strace if present) so syscalls can be counted."""
    d = Path(tempfile.mkdtemp(prefix="bench-buf-", dir=os.environ.get("BENCH_DIR")))
    try:
        code = (
            "import json,sys; sys.path.insert(0, %r); from bench.bench_buffer import _hour;"
            " print(json.dumps(_hour(%r)))" % (str(Path(__file__).resolve().parent.parent), str(d / "h.sqlite"))
        )
        cmd = [sys.executable, "-c", code]
        strace = shutil.which("strace")
        if strace:
            cmd = [strace, "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(d / "strace.txt")] + cmd
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        io = json.loads(out.strip().splitlines()[-1])
        fsyncs = None
        if strace and (d / "strace.txt").exists():
            txt = (d / "strace.txt").read_text()
            fsyncs = sum(int(m.group(1)) for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?f(?:data)?sync", txt, re.M))
        fs = subprocess.run(["df", "--output=fstype", str(d)], capture_output=True, text=True).stdout.split()[-1:]
        return io, fsyncs, (fs[0] if fs else "?")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _row(name: str, value: float, unit: str, baseline: float | None, target: str, ok: bool | None) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "target": target, "ok": ok}


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-buf-", dir=os.environ.get("BENCH_DIR")) as tmp:
        for group, total in ((20, 4000), (2000, 100_000)):
            d_raw, d_buf = Path(tmp) / f"raw{group}", Path(tmp) / f"buf{group}"
            d_raw.mkdir(), d_buf.mkdir()
            raw = _raw_rate(d_raw, group, total, prebuilt=False)
            pre = _raw_rate(d_raw, group, total, prebuilt=True)
            buf = _buffer_rate(d_buf, group, total)
            target = ">= 0.7 x raw" if group >= 1000 else "report (fsync-bound)"
            rows.append(_row(f"Buffer.commit, groups of {group} (baseline: raw executemany + json rows)",
                             round(buf), "samples/s", round(raw), target,
                             buf >= 0.7 * raw if group >= 1000 else None))
            rows.append(_row(f"  same, baseline raw executemany of prebuilt rows (ratio {buf / pre:.2f})",
                             round(buf), "samples/s", round(pre), "report", None))
    io, fsyncs, fstype = _hour_measured()
    commits = io.pop("commits")
    # 720 sample commits (3600 s / 5 s) + 60 seals + 60 acks = 840 if each is one transaction.
    rows.append(_row("commits per hour (1 Hz x 4 sensors, 5 s interval, seal + ack a minute; counted)",
                     commits, "commits/h", 720, "<= 840", commits <= 840))
    if fsyncs is not None:
        rows.append(_row(f"fsync+fdatasync per hour (strace -f -c, {fstype})", fsyncs, "calls/h", commits,
                         "~1-2 per commit + checkpoints", fsyncs <= 3 * commits + 100))
    if io:
        rows.append(_row(f"bytes written per hour (/proc/self/io write_bytes, {fstype}, incl. checkpoints)",
                         io.get("write_bytes", 0), "B/h", None, "report", None))
        rows.append(_row("bytes handed to write() per hour (/proc/self/io wchar)", io.get("wchar", 0), "B/h",
                         None, "report", None))
    return rows


def main() -> None:
    rows = run()
    w = max(len(r["name"]) for r in rows)
    print(f"{'name':<{w}}  {'value':>14} {'unit':<10} {'baseline':>12}  {'target':<30} ok")
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:,}"
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        print(f"{r['name']:<{w}}  {r['value']:>14,} {r['unit']:<10} {base:>12}  {r['target']:<30} {ok}")


if __name__ == "__main__":
    main()
