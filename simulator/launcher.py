"""Start many short-lived agent processes cheaply, for kill and power-cut runs.

A fresh ``python -m edge.cli run`` spends ~0.4 CPU-s importing before it does any
work; 10,000 kills on a shared 2-core machine would be mostly imports, and most
random kills would land in the importer, not in the agent. The stdlib's
``forkserver`` imports the agent once and forks each run from that warm process:
every child is still a real process of its own (own pid, own SQLite and MQTT
connections, killed with a real SIGKILL), it only skips the imports.

:class:`ForkedProc` offers the part of :class:`subprocess.Popen` the harnesses
use (``poll``, ``wait``, ``send_signal``), so a van can run either way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
from multiprocessing.context import ForkServerContext
from pathlib import Path

# What the warm process imports once (everything ``edge run`` pulls in for a simulated van).
PRELOAD = ["edge.cli", "edge.runtime", "edge.agent", "buffer.store", "uplink.mqtt", "simulator.value_sensors"]

_ctx: ForkServerContext | None = None


def _context() -> ForkServerContext:
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _run_agent(args: list[str], log: str, env: dict[str, str]) -> None:
    """In the child: stdout/stderr to the van's log, the run's environment, then ``edge run``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    # Crash points are read at import (core/faultpoints.py), which happened in the
    # warm parent without this run's plan: read them again.
    from core import faultpoints

    faultpoints._PLAN.clear()
    faultpoints._SEEN.clear()
    faultpoints._load()
    from edge.cli import main

    main(args, prog_name="edge")  # click exits with the command's status (SystemExit)


class ForkedProc:
    """One agent run forked from the warm process; the Popen subset the harnesses use."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self._p = _context().Process(target=_run_agent, args=(args, str(log), env), daemon=False)
        self._p.start()
        self.pid = self._p.pid

    def poll(self) -> int | None:
        return self._p.exitcode

    def send_signal(self, sig: int) -> None:
        if self._p.exitcode is None and self.pid is not None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired(f"agent {self.pid}", timeout or 0.0)
        return self._p.exitcode


def start_agent(config: Path, log: Path, *, drain_timeout: float, crash_at: str = "") -> ForkedProc:
    args = ["run", "--config", str(config), "--drain-timeout", str(drain_timeout)]
    return ForkedProc(args, log, {"DATALAB_CRASH_AT": crash_at})
