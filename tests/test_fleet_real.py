"""CI-sized run of bench/bench_fleet_real.py: 50 vans, each its own TLS connection and account.

The full-size run (10,000 vans, 10 minutes) is the bench; this proves the machinery the bench's
figures rest on: every van gets through the shipped broker with its own account, every batch it
sent is stored exactly once in a durable PostgreSQL and acknowledged after the commit, the
deriver works during the load, and a van cannot publish as another (the ACL refuses it).
"""

from __future__ import annotations

import pytest

from simulator.broker import mosquitto_path
from tests.pg import find_bindir

pytestmark = [
    pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed"),
    pytest.mark.skipif(find_bindir() is None, reason="PostgreSQL is not installed"),
]


@pytest.mark.timeout(300)
def test_fifty_vans_own_connections_stored_exactly_once(tmp_path) -> None:
    from bench.bench_fleet_real import DURABLE, run

    res = run(vans=50, minutes=20 / 60, interval_s=10, sample_s=10, intruder=True, workdir=tmp_path)
    assert DURABLE["fsync"] == "on" and DURABLE["synchronous_commit"] == "on"
    assert res["connect_errors"] == 0
    # every van published (10-s batches over 20 s: each van's offset falls inside the run twice)
    assert res["published"] >= 50 * 2
    assert res["acked"] == res["published"]
    assert res["oracle"] == {"missing_samples": 0, "doubled_samples": 0, "unacked_batches": 0}
    # the intruding van's own batches are in (the oracle) but the batch it sent on another
    # van's topic, with its own account, was dropped by the broker's ACL
    assert res["intruder_rows"] == 0
    # lag is measured from the acks, and the deriver ran during the load
    assert res["lag_p99_s"] is not None and res["lag_p99_s"] > 0
    assert res["cpu_s"]["deriver"] > 0 and res["cpu_s"]["fleet clients"] > 0
    assert len(res["backlog"]) >= 2 and res["backlog"][-1]["stored_batches"] >= res["published"]
