"""The clock_step flag from the van reaches analysts on both store backends (issue 14, point 4)."""

from __future__ import annotations

from receiver import quality
from tests.test_receiver_store import batch, put
from tests.test_store_contract import MakeStore, make, pg_cluster, q  # noqa: F401  (fixtures, used by name)


def test_clock_step_flag_is_in_observations(make: MakeStore) -> None:  # noqa: F811
    s = make()
    b = batch(0, 6)
    pm = [x for x in b.samples if x.sensor == "pm"]
    for x in pm[2:4]:  # two samples stamped across a step of the van's clock
        x.flags = ("clock_step",)
    put(s, b)
    rows = q(s, "SELECT seq, flags, quality FROM observations WHERE quantity = 'pm25' ORDER BY seq")
    flagged = [seq for seq, flags, qual in rows if "clock_step" in (flags or "") and "clock_step" in (qual or "")]
    assert flagged == [x.seq for x in pm[2:4]]
    assert all("clock_step" not in (qual or "") for seq, _, qual in rows if seq not in flagged)
    assert quality.sample_flags("clock_step", "corrected", "exact") == {"clock_step"}
