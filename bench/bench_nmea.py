"""NMEA: one parse path or two? (issue 16, point 4)

``drivers.nmea.parse_sentence`` splits the seven sentence types a fix uses itself
(the "split" path) and hands everything else to pynmea2. The question is whether
that second path earns its keep, or whether pynmea2 for every sentence (the
"pynmea2" path: the same framing and checksum, ``pynmea2.NMEASentence.parse``,
the same converters) would do on a van.

Both paths run in the same process on the same sentences, alternating, best of
``rounds`` each (the shared VM is noisy), timed on this thread's CPU clock (not the
wall clock: other processes on the machine do not count). Input: the u-blox NEO-M9N
capture from /work/shared/fixtures (all four GNSS: ~23 sentences an epoch).

A van-hour is 3600 epochs (1 Hz). "Pi" rows scale the VM's CPU seconds by
``PI_FACTOR``: docs/performance.md estimates a Pi Zero 2 core at 8-10x slower than
this VM's, and the upper end is taken so the Pi figure is not flattering.

    python -m bench.bench_nmea          # a table
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import pynmea2

from drivers import nmea
from drivers.nmea import parse_sentence
from core.errors import ReadError

FIXTURE = (Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gps"
           / "ublox-neo-m9n-nmea.log")
PI_FACTOR = 10.0  # Pi Zero 2 core vs this VM's (docs/performance.md: "roughly 8-10x", estimated)
EPOCHS_PER_VAN_HOUR = 3600  # the receiver's default 1 Hz


def corpus(path: Path = FIXTURE) -> tuple[list[bytes], float]:
    """The capture's sentences, and sentences per epoch (one RMC an epoch)."""
    lines = [ln + b"\r\n" for ln in path.read_bytes().splitlines() if ln.startswith(b"$")]
    epochs = sum(1 for ln in lines if ln[3:6] == b"RMC") or 1
    return lines, len(lines) / epochs


def through_pynmea2(line: bytes) -> nmea.NmeaRecord:
    """parse_sentence with pynmea2 for every sentence: the one-path alternative."""
    text, _strict = nmea._frame(line)
    try:
        msg = pynmea2.NMEASentence.parse(text, check=True)
    except pynmea2.SentenceTypeError:
        head, _, rest = text[1:-3].partition(",")
        return nmea.OtherSentence(talker=head[:2], kind=head[2:], fields=tuple(rest.split(",")))
    except Exception as exc:  # as parse_sentence: junk is a FrameError
        raise nmea.FrameError(f"unparseable sentence: {exc}") from exc
    return nmea._convert(msg)


def cpu_per_sentence(parse: Callable[[bytes], object], lines: list[bytes], min_cpu: float) -> float:
    """This thread's CPU seconds per sentence, over at least ``min_cpu`` seconds of it."""
    n = 0
    start = time.thread_time()
    while True:
        for ln in lines:
            try:
                parse(ln)
            except ReadError:
                pass
        n += len(lines)
        used = time.thread_time() - start
        if used >= min_cpu:
            return used / n


def run(rounds: int = 5, min_cpu: float = 0.4, path: Path = FIXTURE) -> list[dict]:
    lines, per_epoch = corpus(path)
    # The same records from both paths, or the comparison is meaningless.
    assert [repr(parse_sentence(ln)) for ln in lines] == [repr(through_pynmea2(ln)) for ln in lines]
    paths = {"split": parse_sentence, "pynmea2": through_pynmea2}
    best = {k: float("inf") for k in paths}
    for _ in range(rounds):
        for k, fn in paths.items():  # alternating: a slow minute hits both
            best[k] = min(best[k], cpu_per_sentence(fn, lines, min_cpu))
    per_hour = per_epoch * EPOCHS_PER_VAN_HOUR
    rows = []
    for k in paths:
        rows.append(_row(f"gps.nmea_{k}_path", round(1 / best[k]), "sentences/s"))
        rows.append(_row(f"gps.nmea_{k}_path_cpu", round(best[k] * per_hour, 3), "CPU-s/van-hour"))
    saving = (best["pynmea2"] - best["split"]) * per_hour
    rows.append(_row("gps.nmea_split_saving_cpu", round(saving, 3), "CPU-s/van-hour"))
    pi = saving * PI_FACTOR
    rows.append(_row("gps.nmea_split_saving_cpu_pi", round(pi, 2), "CPU-s/van-hour"))
    rows.append(_row("gps.nmea_split_saving_pi_core", round(pi / 3600 * 100, 4), "% of a core"))
    rows.append(_row("gps.nmea_sentences_per_epoch", round(per_epoch, 1), "sentences"))
    return rows


def _row(name: str, value: float, unit: str) -> dict:
    return {"name": name, "value": value, "unit": unit, "target": None}  # informative: no target


def main() -> int:
    rows = run()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{w}}  {r['value']:>12}  {r['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
