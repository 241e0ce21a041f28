"""Reconnect delays with full jitter.

After a broker outage every van of the fleet reconnects at once; with plain
exponential backoff (paho's, without jitter) they stay in lock-step and hit the
broker in waves. Full jitter draws each delay uniformly from [0, min(cap,
base * 2^attempt)], which spreads them out (the AWS Architecture Blog's
analysis of backoff strategies found it the best of the usual variants).

The van's default cap is short (3 s, ``edge/config.py``): a van is back within
3 s of a broker's return, and 10,000 vans arrive spread over those 3 s, at most
~6,700 a second (``simulator/reconnect_herd.py``; the trade-off is in
docs/architecture.md, "Uplink").
"""

from __future__ import annotations

import random


class FullJitterBackoff:
    def __init__(self, base_s: float = 1.0, cap_s: float = 3.0, rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError("need 0 < base_s <= cap_s")
        self.base_s = base_s
        self.cap_s = cap_s
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
