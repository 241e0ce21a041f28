"""Decode throughput of the PM decoders and stream parsers, in frames per second.

A sensor sends at most a few frames per second, so any of these is far above
need on a Pi; the numbers are here to catch an accidental quadratic parser
(e.g. rescanning the whole buffer per byte) rather than to tune.

    .venv/bin/python bench/bench_pm_decode.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

from drivers import pms, sds011, sps30

#: Real frame rates for scale: PMS up to ~5/s at high concentration, SDS011 1/s, SPS30 1/s.
SENSOR_MAX_FRAMES_PER_S = {"pms": 5.0, "sds011": 1.0, "sps30": 1.0}


def _rate(work: Callable[[], int], min_time_s: float = 0.2) -> float:
    """Frames per second of ``work`` (which returns how many frames it handled)."""
    frames = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < min_time_s:
        frames += work()
        elapsed = time.perf_counter() - start
    return frames / elapsed


def _samples() -> dict[str, bytes]:
    pms_frame = pms.build_data_frame(
        pm_cf1=(5, 8, 12), pm_atm=(5, 8, 12), counts=(900, 300, 60, 10, 2, 1)
    )
    sds_frame = sds011.build_data_frame(12.3, 45.6)
    # the first frame of the SPS30 fixture capture, rounded
    measurement = sps30.SPS30Measurement(
        5.2, 9.5, 12.6, 13.3, 26.31, 37.0, 41.52, 42.41, 42.54, 0.8
    )
    sps_frame = sps30.build_miso(sps30.CMD_READ, 0, sps30.encode_measurement(measurement))
    return {"pms": pms_frame, "sds011": sds_frame, "sps30": sps_frame}


def run(min_time_s: float = 0.2) -> list[dict[str, object]]:
    """One row per decoder: ``name``, ``value`` (frames/s), ``unit``, ``baseline``."""
    frames = _samples()
    batch = 100
    # Streams with a little garbage between frames, fed in 64-byte chunks as a
    # serial port would deliver them.
    streams = {k: (b"\x00\x13" + f) * batch for k, f in frames.items()}

    def chunks(data: bytes) -> list[bytes]:
        return [data[i : i + 64] for i in range(0, len(data), 64)]

    stream_chunks = {k: chunks(v) for k, v in streams.items()}

    def decode_loop(decode: Callable[[bytes], object], frame: bytes) -> Callable[[], int]:
        def work() -> int:
            for _ in range(batch):
                decode(frame)
            return batch

        return work

    def parser_loop(make: Callable[[], object], parts: list[bytes]) -> Callable[[], int]:
        def work() -> int:
            parser = make()
            n = 0
            for part in parts:
                n += len(parser.feed(part))  # type: ignore[attr-defined]
            assert n == batch, n
            return n

        return work

    def sps_full(frame: bytes) -> object:
        return sps30.decode_measurement(sps30.decode_frame(frame).data)

    cases: list[tuple[str, str, Callable[[], int]]] = [
        ("pms.decode_frame", "pms", decode_loop(pms.decode_frame, frames["pms"])),
        ("pms.PMSParser stream", "pms", parser_loop(pms.PMSParser, stream_chunks["pms"])),
        ("sds011.decode_frame", "sds011", decode_loop(sds011.decode_frame, frames["sds011"])),
        ("sds011.SDS011Parser stream", "sds011",
         parser_loop(sds011.SDS011Parser, stream_chunks["sds011"])),
        ("sps30.decode_frame+measurement", "sps30", decode_loop(sps_full, frames["sps30"])),
        ("sps30.SPS30Parser stream", "sps30",
         parser_loop(sps30.SPS30Parser, stream_chunks["sps30"])),
    ]
    rows: list[dict[str, object]] = []
    for name, sensor, work in cases:
        rows.append(
            {
                "name": name,
                "value": round(_rate(work, min_time_s), 1),
                "unit": "frames/s",
                # No recorded baseline yet; the sensor's own rate gives scale.
                "baseline": None,
                "sensor_max": SENSOR_MAX_FRAMES_PER_S[sensor],
            }
        )
    return rows


def main() -> None:
    rows = run()
    width = max(len(str(r["name"])) for r in rows)
    print(f"{'decoder':<{width}}  {'frames/s':>12}  {'sensor max/s':>12}  baseline")
    for r in rows:
        baseline = "-" if r["baseline"] is None else f"{r['baseline']}"
        print(f"{r['name']:<{width}}  {r['value']:>12,.0f}  {r['sensor_max']:>12}  {baseline}")


if __name__ == "__main__":
    main()
