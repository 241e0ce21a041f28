"""Issue #14 re-attack (t14), finding 3: a clock step followed by an agent restart in the same boot.

Reuses the tester's probe (tests/attack_t14/probe_clock.py): a real agent, Mosquitto and receiver on a
simulated clock; the step is made while the agent is down (same boot: same monotonic clock and boot
id) or seen by the running agent, which is restarted 20 s later. Old code kept the spine in memory
only: the restarted agent trusted the stepped clock at once and stored every sample unflagged and out
of order. Now the spine is persisted per boot (edge/timeref.py) and the new run judges the step.

Not covered (docs/durability.md, "Time after a restart"): a FORWARD step with no second reference is
taken after ``confirm_s`` (as while running), so its later samples are stored on the new time unflagged.
"""

from __future__ import annotations

import pytest

from tests.attack_t14.probe_clock import CASES, DEV, Van, judge, make_step
from tests.test_delivery_faults import rx  # noqa: F401 (fixture)

FIXED = ["system-2h-while-down", "system-2h-restart-in-window", "gps-1d-restart-in-window"]


@pytest.mark.parametrize("name", FIXED)
def test_step_across_a_restart_is_flagged_not_stored_silently(tmp_path, mosquitto, rx, name):  # noqa: F811
    c = CASES[name]
    van = Van(tmp_path, mosquitto.port, ntp=c["ntp"], gps=c["gps"])
    step = make_step(van, c)
    try:
        a = van.start()
        a.run(duration_s=120)
        if c["when"] == "down":
            van.stop()
            step()
            van.clock.advance(30)
        else:
            step()
            a.run(duration_s=20)
            van.stop()
            van.clock.advance(5)
        assert (tmp_path / DEV / "time.ref").exists(), "the spine was not persisted"
        a = van.start()
        a.run(duration_s=120)
        steps = a.timekeeper.stats
        van.stop()
    finally:
        van.close()
    v = judge(rx.store)
    print(f"[clock restart {name}] {v} steps={steps.gps_steps + steps.system_steps} rebases={steps.rebases}")
    assert steps.gps_steps + steps.system_steps >= 1, "the restarted agent did not see the step"
    assert v["flagged"] > 0 and v["obs_flagged"] > 0  # receivers see the flag in observations
    assert v["wrong_unflagged"] == 0 and v["disorder_unflagged"] == 0, v
