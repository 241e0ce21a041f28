"""A real ``datalab-receiver run`` stays within its memory bound under the tester's worst shapes.

Issue 13 point 5, as the tester measured it (probe 5): uploads that cost little in *values*
but much in *bytes* (250 distinct 16,000-character strings in one sample; 4,000 gaps with
1,000-character reasons and no samples) filled groups of 64 with ~4 MB of text each and
pushed a receiver's peak RSS to 308-355 MB. The group's byte budget (``group_bytes``,
receiver/budget.py) bounds them. CI-sized: 64 uploads of each shape (one full group's worth
at the old limit), the real 300 MB bound on the process's VmHWM; the bench
(bench/bench_receiver_memory.py) runs the tester's full counts.
"""

from __future__ import annotations

from bench.bench_receiver_memory import TARGET_MB, ReceiverRig, adversarial
from receiver.budget import upload_cost
from receiver.config import ReceiverConfig

UPLOADS = 64


def test_byte_heavy_uploads_stay_within_the_memory_bound() -> None:
    strings, gaps = adversarial(UPLOADS, UPLOADS)
    cfg = ReceiverConfig()
    # What the test exercises: uploads the value budget alone would put 64 to a group, with
    # over 200 MiB of text between them.
    for _, p in (strings[0], gaps[0]):
        cost = upload_cost(p)
        assert cost.values * UPLOADS <= cfg.group_values and cost.bytes * UPLOADS > 200 * 2**20, cost
    with ReceiverRig() as rig:
        idle = rig.probe.now()
        str_peak, str_s = rig.phase(strings, timeout=240)
        gap_peak, gap_s = rig.phase(gaps, timeout=240)
        hwm = rig.hwm()
        alive = rig.proc.poll() is None
    print(f"idle {idle:.0f} MB; {UPLOADS} string uploads ({len(strings[0][1]) // 1024} KB wire, "
          f"{upload_cost(strings[0][1]).bytes >> 20} MiB inflated each): peak {str_peak:.0f} MB in {str_s:.0f} s; "
          f"{UPLOADS} gap uploads ({len(gaps[0][1]) // 1024} KB): peak {gap_peak:.0f} MB in {gap_s:.0f} s; "
          f"VmHWM {hwm:.0f} MB (bound {TARGET_MB:.0f} MB)")
    assert alive, "the receiver survived"
    assert hwm <= TARGET_MB, f"receiver peak RSS {hwm:.0f} MB over {TARGET_MB:.0f} MB"
