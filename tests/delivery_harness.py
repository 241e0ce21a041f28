"""Processes for the delivery fault tests: vans and receivers we can SIGKILL at will."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from simulator.launcher import ForkedProc, start_agent
from simulator.oracle import DeviceVerdict, check


def van_toml(device: str, data_dir: Path, port: int, *, speedup: float = 100.0, hours: float = 0.05,
             extra: str = "") -> str:
    return f"""
[device]
id = "{device}"
data_dir = "{data_dir}"
[sampling]
commit_interval_s = 1.0
[batch]
max_samples = 40
max_age_s = 5.0
[uplink]
host = "127.0.0.1"
port = {port}
ack_timeout_s = 2.0
window = 4
reconnect_min_s = 0.05
reconnect_max_s = 0.5
keepalive_s = 5
[sensors.oracle1]
driver = "sim-oracle"
[sensors.oracle2]
driver = "sim-oracle"
[simulation]
enabled = true
speedup = {speedup}
shift_hours = {hours}
{extra}
"""


@dataclass
class Van:
    device: str
    root: Path
    port: int
    speedup: float = 100.0
    # Fork each run from a warm process (simulator/launcher.py) instead of a fresh interpreter.
    forked: bool = False
    # Where the buffer lives, if not beside the config and log (e.g. a power-cut file system).
    data_dir: Path | None = None
    proc: subprocess.Popen[bytes] | ForkedProc | None = None
    kills: int = 0
    crashes: int = 0  # deaths at a chosen crash point
    runs: int = 0

    def __post_init__(self) -> None:
        self.dir = self.root / self.device
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.data_dir or self.dir
        self.config = self.dir / "agent.toml"
        self.config.write_text(van_toml(self.device, self.data, self.port, speedup=self.speedup))
        self.log = self.dir / "agent.log"

    @property
    def buffer(self) -> Path:
        return self.data / "buffer.sqlite"

    def start(self, crash_at: str = "", drain_timeout: float = 60.0) -> None:
        env = {**os.environ, "DATALAB_CRASH_AT": crash_at}
        self.runs += 1
        if self.forked:
            self.proc = start_agent(self.config, self.log, drain_timeout=drain_timeout, crash_at=crash_at)
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge.cli", "run", "--config", str(self.config),
                 "--drain-timeout", str(drain_timeout)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )

    def kill(self) -> bool:
        """SIGKILL if still running; True if it was."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1
        return True

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if rc == -signal.SIGKILL:
            self.crashes += 1
        return rc


@dataclass
class Receiver:
    store: Path
    port: int
    client_id: str = "rx-faults"
    share_group: str = ""
    proc: subprocess.Popen[bytes] | None = None
    deaths: int = 0
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.store.with_name(f"{self.client_id}.log")

    def start(self, crash_at: str = "") -> None:
        ready = self.store.with_name(f"{self.client_id}.ready")
        ready.unlink(missing_ok=True)
        args = [sys.executable, "-m", "receiver.cli", "run", "--store", str(self.store), "--host",
                "127.0.0.1", "--port", str(self.port), "--client-id", self.client_id, "--ready-file", str(ready)]
        if self.share_group:
            args += ["--share-group", self.share_group]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "DATALAB_CRASH_AT": crash_at})
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None and crash_at:
                return  # it came up and died at its crash point at once (queued messages)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"receiver did not come up: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.deaths += 1

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            self.proc.wait(20)


def finish_and_check(vans: list[Van], store: Path, timeout: float = 120.0) -> list[DeviceVerdict]:
    """Let every van run to the end of a (short) shift and drain, then ask the oracle."""
    offsets = {}
    for v in vans:
        v.kill()
        offsets[v.device] = v.log.stat().st_size if v.log.exists() else 0
        v.start(drain_timeout=timeout)
    for v in vans:
        rc = v.wait(timeout + 30)
        assert rc == 0, f"{v.device} exited with {rc}: {v.log.read_text()[-3000:]}"
        # A drain that timed out leaves samples on the van: undelivered, not lost. Say so,
        # rather than let the oracle count them as missing.
        with open(v.log, "rb") as f:
            f.seek(offsets[v.device])
            last_run = f.read().decode(errors="replace")
        assert "drain incomplete" not in last_run, f"{v.device}: the final drain timed out ({timeout} s)"
    return check(store, [v.buffer for v in vans])


def store_counters(store: Path) -> dict[str, int]:
    import sqlite3

    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT name, value FROM counters"))
    finally:
        db.close()


def report(name: str, **figures: object) -> None:
    """Each fault test prints what it exercised (pytest -s, or in the CI log on failure)."""
    print(f"[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))
