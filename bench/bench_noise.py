"""CPU share of one core for continuous 48 kHz sound level metering.

Processes 60 s of simulated traffic noise in 0.1 s blocks (what AlsaSource delivers) and
reports CPU seconds / audio seconds as a percentage; the audio is generated beforehand so
only the metering is timed.  Baseline: plain numpy rms of the same blocks.  Also shown: the
A-weighting filter alone, the simulator's generation cost, and the per-sample reference
sosfilt (extrapolated from 0.5 s) to show why the block filter exists.

    python bench/bench_noise.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from drivers.noise.levels import LevelMeter
from drivers.noise.weighting import SosFilter, design_a_weighting, sosfilt
from simulator.microphone import SimulatedMicrophone

FS = 48_000
AUDIO_S = 60.0
BLOCK = FS // 10


def _cpu_share(fn: Callable[[], None], audio_s: float, repeats: int = 3) -> float:
    """Best-of-``repeats`` CPU time of ``fn`` as a percentage of ``audio_s``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return 100.0 * best / audio_s


def run() -> list[dict]:
    """Benchmark rows: name, value, unit, target (None where only informative)."""
    mic = SimulatedMicrophone(lambda t: 65.0, seed=1, duration_s=AUDIO_S)
    t0 = time.process_time()
    audio = mic.read_all()
    sim_share = 100.0 * (time.process_time() - t0) / AUDIO_S
    blocks = [audio[i : i + BLOCK] for i in range(0, len(audio), BLOCK)]

    def meter() -> None:
        m = LevelMeter()
        for b in blocks:
            m.process(b)

    def rms_only() -> None:
        for b in blocks:
            x = b.astype(np.float64)
            np.sqrt(np.mean(x * x))

    def a_filter_only() -> None:
        f = SosFilter(design_a_weighting(FS), max_block=BLOCK)
        for b in blocks:
            f.process(b)

    ref_s = 0.5
    ref_share = _cpu_share(
        lambda: sosfilt(design_a_weighting(FS), audio[: int(ref_s * FS)]), ref_s, repeats=1
    )
    return [
        {"name": "noise.meter_cpu_share", "value": round(_cpu_share(meter, AUDIO_S), 3),
         "unit": "% of one core", "target": "<= 1.0"},
        {"name": "noise.baseline_rms_cpu_share", "value": round(_cpu_share(rms_only, AUDIO_S), 3),
         "unit": "% of one core", "target": None},
        {"name": "noise.a_filter_cpu_share", "value": round(_cpu_share(a_filter_only, AUDIO_S), 3),
         "unit": "% of one core", "target": None},
        {"name": "noise.simulator_cpu_share", "value": round(sim_share, 3),
         "unit": "% of one core", "target": None},
        {"name": "noise.reference_sosfilt_cpu_share", "value": round(ref_share, 1),
         "unit": "% of one core", "target": None},
    ]


def main() -> None:
    rows = run()
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'value':>10}  {'unit':<14}  target")
    for r in rows:
        target = r["target"] if r["target"] is not None else "-"
        print(f"{r['name']:<{width}}  {r['value']:>10}  {r['unit']:<14}  {target}")


if __name__ == "__main__":
    main()
