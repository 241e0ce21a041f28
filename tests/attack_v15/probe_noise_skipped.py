"""v15 attack, point 5: skipped seconds counted and flagged when the agent stalls longer than
the driver's queue, and the level of a 1 kHz tone at a known SPL against my own computation
(A-weighting at 1 kHz is 0 dB, so LAeq = 94 + 20 log10(rms / rms at 94 dB)).

A source that makes audio faster than real time (48 kHz, 0.1 s blocks) and ends after N s;
the agent reads only after the capture is done (a stall of N seconds).
Run: .venv/bin/python -m pytest tests/attack_v15/probe_noise_skipped.py -q -p no:cacheprovider
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from drivers.noise.capture import QUEUE_SECONDS, MicrophoneDriver
from drivers.noise.levels import LevelMeter, MeterConfig

FS = 48_000
SENS_DBFS = -26.0


class ToneSource:
    def __init__(self, seconds: int, spl_db: float) -> None:
        self.blocks_left = seconds * 10
        # Datasheet dBFS (InvenSense AN-1112, AES17): 0 dBFS is a full-scale sine, so a 94 dB SPL
        # 1 kHz tone has PEAK amplitude 10^(-26/20). (My first oracle took it as rms: 3.01 dB off.)
        self.amp = 10 ** ((SENS_DBFS + spl_db - 94.0) / 20.0)
        self.n = 0

    def read_block(self):
        if self.blocks_left <= 0:
            time.sleep(0.01)
            return None
        self.blocks_left -= 1
        t = (self.n + np.arange(FS // 10)) / FS
        self.n += FS // 10
        return (self.amp * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)

    def close(self):
        pass


@pytest.mark.parametrize("seconds", [QUEUE_SECONDS - 2, QUEUE_SECONDS + 15])
def test_stall_longer_than_queue_counts_and_flags(seconds):
    drv = MicrophoneDriver(ToneSource(seconds, 80.0), LevelMeter(MeterConfig(sample_rate=FS, sensitivity_dbfs=SENS_DBFS)))
    try:
        deadline = time.monotonic() + 60
        while drv.seconds_processed < seconds and time.monotonic() < deadline:
            time.sleep(0.05)
        got = []
        while (r := drv.read()) is not None:
            got.append(r)
        health = drv.audio_health()
    finally:
        drv.close()
    delivered = len(got)
    assert delivered + drv.seconds_skipped == seconds, (delivered, drv.seconds_skipped, seconds, health)
    assert health["seconds_skipped"] == max(0, seconds - QUEUE_SECONDS), health
    if seconds > QUEUE_SECONDS:
        assert "audio_gap" in got[0].flags, got[0].flags
    # levels of the settled seconds: my own 80 dB
    settled = [r.values["laeq"] for r in got if "warming_up" not in r.flags]
    assert settled and all(abs(x - 80.0) < 0.1 for x in settled), settled[:5]
