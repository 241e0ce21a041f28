"""A fleet's return to a restarted broker, worked out from the van's own reconnect policy.

When a broker comes back every van of the fleet is somewhere in its backoff
sleep; how they arrive (how long the last one waits, how many come in the first
second) is what the ``uplink.reconnect_*`` defaults trade off. This replays
``uplink/backoff.py`` as ``uplink/mqtt.py`` drives it (a delay before every
attempt after a loss, a refused attempt taking ``attempt_s``) for many vans,
without sockets, so a test or the docs can give the figure for 10,000 vans.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from uplink.backoff import FullJitterBackoff


@dataclass(frozen=True)
class HerdFigures:
    vans: int
    down_s: float
    median_s: float  # seconds after the broker's return
    p99_s: float
    max_s: float
    first_second: int  # vans connecting in the first second after the return
    peak_per_s: int  # the busiest 100 ms, as a rate


def arrivals_after_return(
    vans: int, down_s: float, base_s: float, cap_s: float, rng: random.Random, attempt_s: float = 0.001,
) -> list[float]:
    """Seconds after the broker's return at which each van's first attempt reaches it, sorted.

    Every van lost the broker at time 0 (a restart drops all connections at once).
    """
    out = []
    for _ in range(vans):
        backoff = FullJitterBackoff(base_s, cap_s, rng)
        t = 0.0
        while True:
            t += backoff.next_delay()
            if t >= down_s:
                out.append(t - down_s)
                break
            t += attempt_s  # refused: a connection refusal costs the broker's host a RST, not a session
    return sorted(out)


def herd_figures(vans: int, down_s: float, base_s: float, cap_s: float, seed: int = 1) -> HerdFigures:
    a = arrivals_after_return(vans, down_s, base_s, cap_s, random.Random(seed))
    bins: dict[int, int] = {}
    for x in a:
        bins[int(x * 10)] = bins.get(int(x * 10), 0) + 1
    return HerdFigures(
        vans=vans,
        down_s=down_s,
        median_s=round(statistics.median(a), 2),
        p99_s=round(a[int(0.99 * (len(a) - 1))], 2),
        max_s=round(a[-1], 2),
        first_second=sum(1 for x in a if x < 1.0),
        peak_per_s=max(bins.values()) * 10,
    )
