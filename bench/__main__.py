"""Run every benchmark and print one table: ``python -m bench [--quick] [--only NAME ...]``.

Each figure stands beside its baseline, measured in the same run. The table is
also written to ``bench/results/<date>-<host>.md`` with a description of the
machine, so runs on a Pi and on a server can be compared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import io
import os
import platform
import sys
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path

from bench import print_table

# In the order of the issues that asked for them.
MODULES = [
    ("bench_pm_decode", "PM decoders"),
    ("bench_gps_decode", "GPS decoder"),
    ("bench_nmea", "NMEA: one parse path or two (issue 16)"),
    ("bench_agent", "agent CPU per van-hour"),
    ("bench_noise", "noise processing"),
    ("bench_ads1115", "ADS1115 reads"),
    ("bench_wire", "bytes on the wire"),
    ("bench_buffer", "buffer commit rate, fsyncs, bytes written"),
    ("bench_delivery", "backlog drain, agent memory"),
    ("bench_ingest", "receiver ingest, SQLite and PostgreSQL"),
    ("bench_partitions", "PostgreSQL ingest, samples partitioned or plain (issue 17)"),
    ("bench_receiver_memory", "receiver memory, largest batches at once"),
    ("bench_aggregate", "street aggregates"),
    ("bench_soak", "fleet soak"),
    ("bench_fidelity", "map fidelity against the simulated truth"),
    ("bench_install", "the van's install: size, agent import time and RSS"),
]


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{platform.node()}: {cpu or platform.processor()}, {os.cpu_count()} cores, {mem} RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="module names (e.g. bench_wire)")
    ap.add_argument("--quick", action="store_true", help="shorter agent and soak runs")
    args = ap.parse_args()
    if args.quick:
        os.environ.setdefault("BENCH_AGENT_SECONDS", "20")
        os.environ.setdefault("BENCH_SOAK_QUICK", "1")
    rows: list[dict] = []
    for name, title in MODULES:
        if args.only and name not in args.only:
            continue
        t0 = time.monotonic()
        print(f"running {name} ({title}) ...", file=sys.stderr, flush=True)
        try:
            mod = importlib.import_module(f"bench.{name}")
            with redirect_stdout(io.StringIO()):
                got = mod.run()
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                continue
            got = [{"name": title, "value": "error", "note": repr(exc)}]
            traceback.print_exc()
        except Exception as exc:  # one broken bench must not hide the others
            got = [{"name": title, "value": "error", "note": repr(exc)[:120]}]
            traceback.print_exc()
        for r in got:
            r.setdefault("group", title)
        rows += got
        print(f"  {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    out = io.StringIO()
    with redirect_stdout(out):
        print_table(rows)
    table = out.getvalue()
    print(table)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"{stamp}-{platform.node() or 'host'}.md"
    path.write_text(f"# Benchmarks {stamp}\n\nMachine: {machine()}\n\n```\n{table}```\n")
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
