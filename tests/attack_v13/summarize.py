"""Summarise probe_flood result lines: per store/derive/pace, worst and p99 of van B's ack latency."""
import json
import sys
from collections import defaultdict

groups = defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        groups[(r["store"], r["derive"], r.get("flood_s_target", 0.0))].append(r)
for (store, derive, pace), rs in sorted(groups.items()):
    worst = max(r["b_lat_max"] for r in rs)
    print(f"{store:6s} {derive:8s} pace={pace:>4}s runs={len(rs)} worst={worst:.2f}s "
          f"p99s={[r['b_lat_p99'] for r in rs]} over5s={sum(r['b_over_5s'] for r in rs)}/"
          f"{sum(r['b_sent'] for r in rs)} b_missing={sum(r['b_missing'] for r in rs)} "
          f"a_unanswered={sum(r['a_unanswered'] for r in rs)} rss_max={max(r['rx_peak_rss_mb'] for r in rs)}MB "
          f"parked={sum(r['db']['parked'] for r in rs)} dead=distinct_rej:"
          f"{all(r['db']['stats_dead_letters'] == r['a_rejected_distinct'] for r in rs)} "
          f"b_rows_ok:{all(r['db']['b_samples'] == r['b_expected_samples'] for r in rs)} "
          f"a_into_b:{sum(r['db']['b_batches_from_a'] for r in rs)} tracebacks={sum(r['log_tracebacks'] for r in rs)}")
