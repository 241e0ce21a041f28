"""Health figures say what they mean, and an outage logs state changes and a periodic summary only.

Issue 13 (tester): ``failed_uploads`` read 1,345 while 64 uploads were held (it summed attempts x
uploads held), and a PostgreSQL outage wrote ~220 reconnect warnings in 100 s.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from receiver.health import Health, describe


class Clock:
    def __init__(self) -> None:
        self.t = 1_795_000_000.0

    def __call__(self) -> float:
        return self.t


def test_outage_figures_and_log_volume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    h = Health(tmp_path / "h.json", clock=clock, summary_s=60.0)
    caplog.set_level(logging.DEBUG, logger="receiver.health")
    # 100 s of outage, a failed attempt every 0.5 s (200 attempts), 64 then up to 100 uploads held.
    for i in range(200):
        h.store_failed(OSError("connection refused"), 64 if i < 150 else 100)
        clock.t += 0.5
    snap = json.loads((tmp_path / "h.json").read_text())["store"]
    print("health during the outage:", snap)
    assert snap["state"] == "unavailable" and snap["failed_attempts"] == 200
    assert snap["uploads_held"] == 100 and snap["most_uploads_held"] == 100
    assert "failed_uploads" not in snap, "no figure that multiplies attempts by uploads"
    assert "100 uploads held now" in describe({"store": snap, "broker": {}})[0]
    assert h.store_ok() == (100.0, 200, 100)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    print(f"{len(lines)} log lines for 200 failed attempts:", *lines, sep="\n  ")
    assert lines[0].startswith("store unavailable") and lines[-1].startswith("store available again")
    summaries = [m for m in lines if m.startswith("store still unavailable")]
    assert len(summaries) == 1 and "200" not in summaries[0] and "uploads held now" in summaries[0]
    assert len(lines) == 3, "one line per state change plus one summary a minute"
    after = json.loads((tmp_path / "h.json").read_text())["store"]
    assert after["state"] == "ok" and after["uploads_held"] == 0 and after["last_outage_most_uploads_held"] == 100
