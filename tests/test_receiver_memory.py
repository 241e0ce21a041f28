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

import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from bench.bench_receiver_memory import GPSLESS_UPLOADS, TARGET_MB, ReceiverRig, adversarial, gpsless_upload
from receiver.budget import upload_cost
from receiver.config import ReceiverConfig
from receiver.store import SQLiteStore
from core.wire import content_hash, decode_batch

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


def test_gps_less_uploads_cost_the_same_however_much_the_van_stored(tmp_path: Path) -> None:
    """Issue 13 re-test: 40 uploads of 20,000 samples with empty values and no GPS fix took a
    receiver to 341 MB, each batch costing more than the one before: deriving positions
    re-read every open (no-fix) sample of the batch's time range, i.e. all the van had sent
    (measured: 20,000 more rows read and ~5 MiB more peak per batch). Now only samples near
    a new fix are read again. In-process on the store, traced by tracemalloc: the peak of
    the last of 6 such batches is that of the second, and nothing open is re-read."""
    store = SQLiteStore(tmp_path / "s.sqlite")
    reread: list[int] = []
    join_inputs = store._join_inputs

    def counting(*a: Any) -> Any:
        out = join_inputs(*a)
        reread.append(len(out[1]))
        return out

    store._join_inputs = counting  # type: ignore[method-assign]
    peaks = []
    tracemalloc.start()
    try:
        for k in range(6):
            payload = gpsless_upload("van-nofix", k)
            batch = decode_batch(payload)
            tracemalloc.reset_peak()
            assert store.ingest(batch, content_hash(payload), 1_795_000_000_000).status == "stored"
            peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
    finally:
        tracemalloc.stop()
        store.close()
    print(f"6 GPS-less uploads of {len(batch.samples):,} samples ({len(payload)} bytes): "
          f"traced peak per batch {', '.join(f'{p:.1f}' for p in peaks)} MiB; open samples re-read {reread}")
    assert len(batch.samples) == 20_000 and not any(s.sensor == "gps" for s in batch.samples)
    assert reread == [0] * 6, "a batch without fixes cannot place older samples: nothing to re-read"
    assert peaks[-1] <= peaks[1] * 1.25 + 1, f"per-batch peak grows with what the van stored: {peaks}"


@pytest.mark.slow
def test_gps_less_uploads_stay_within_the_memory_bound() -> None:
    """The re-tester's full shape through a real receiver: 40 GPS-less uploads at once."""
    uploads = [("van-nofix", gpsless_upload("van-nofix", k)) for k in range(GPSLESS_UPLOADS)]
    with ReceiverRig() as rig:
        peak, took = rig.phase(uploads, timeout=900)
        hwm = rig.hwm()
        alive = rig.proc.poll() is None
    print(f"{GPSLESS_UPLOADS} GPS-less uploads: peak {peak:.0f} MB, VmHWM {hwm:.0f} MB, all answered in {took:.0f} s")
    assert alive and hwm <= TARGET_MB, f"receiver peak RSS {hwm:.0f} MB over {TARGET_MB:.0f} MB"
