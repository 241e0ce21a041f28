"""Fleet soak: 50, 100, 200 ... vans at 1 Hz against one broker and one receiver (2 workers)
until the receiver falls behind. Reports ingest lag p50/p99 (publish to committed ack),
receiver CPU, and the delivery oracle at every size. The workers store and acknowledge
(``--derive separate``); one deriver at nice 10 derives positions and flags beside them,
and the row says how far behind it was and how soon it caught up once the load stopped.

The store is PostgreSQL (a throwaway cluster) when the server binaries are installed,
else SQLite. ``BENCH_SOAK_QUICK=1`` stops at 1,000 vans with short runs.
Target (issue "One benchmark table"): one receiver with two workers keeps up with 10,000 vans.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from simulator.soak import SoakResult, run_size

FULL = [50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]
QUICK = [50, 200, 1000]


def _stores(tmp: Path):  # type: ignore[no-untyped-def]
    """(label, url-for-size, cleanup) for PostgreSQL if available, else SQLite."""
    try:
        from tests.pg import PgCluster  # the same throwaway cluster the tests use

        cluster = PgCluster()
        cluster.start()

        def url(n: int) -> str:
            return cluster.create_database(f"soak{n}")

        return "PostgreSQL", url, cluster.stop
    except Exception as exc:  # no server binaries here: SQLite, and say so
        print(f"PostgreSQL unavailable ({exc!r}); soaking SQLite")
        return "SQLite", (lambda n: str(tmp / f"soak{n}.sqlite")), (lambda: None)


def _derive_note(r: SoakResult) -> str:
    """How far the deriver (nice 10, beside the workers) was behind, and its catch-up."""
    if r.derive_backlog_end == 0:
        return "deriver kept up"
    if r.derive_catchup_s is not None:
        return (f"deriver {r.derive_backlog_end:,} batches behind at the end "
                f"({100 * r.deriver_cpu_share:.0f} % of a core during the run), caught up in {r.derive_catchup_s:.0f} s")
    est = r.derive_catchup_estimate_s
    return (f"deriver {r.derive_backlog_end:,} batches behind at the end "
            f"({100 * r.deriver_cpu_share:.0f} % of a core during the run); alone it derived {r.derive_rate:.0f} "
            f"batches/s, so it catches up in ~{est:.0f} s (estimated)" if est else "deriver did not progress")


def run() -> list[dict]:
    quick = os.environ.get("BENCH_SOAK_QUICK") == "1"
    sizes = QUICK if quick else FULL
    seconds = 20.0 if quick else 60.0
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    label, url_for, cleanup = _stores(tmp)
    rows = []
    try:
        for n in sizes:
            r = run_size(n, store_url=url_for(n), workdir=tmp / f"n{n}", seconds=seconds, interval_s=30,
                         workers=2, vans_per_process=max(50, n // 8), derive_wait_s=60.0)
            rows.append({
                "name": f"soak {n:,} vans ({label}, 2 workers)", "value": r.lag_p99_s, "unit": "s lag p99",
                "baseline": r.lag_p50_s, "baseline_name": "p50", "target": "keeps up",
                "ok": r.keeps_up,
                "note": (f"{r.samples_per_s:,.0f} samples/s, receiver CPU {100 * r.receiver_cpu_share:.0f} % of a core, "
                         f"acked {r.acked}/{r.published}, missing {r.missing}, doubled {r.doubled}; "
                         + _derive_note(r)),
            })
            if not r.keeps_up:
                break
    finally:
        cleanup()
    return rows


if __name__ == "__main__":
    from bench import print_table

    print_table(run())
