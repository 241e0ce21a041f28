"""Start a throwaway MQTT broker on a free loopback port (tests, the demo, benches).

Mosquitto when it is installed (the broker we deploy), otherwise amqtt, a
maintained pure-Python broker, so the demo runs anywhere Python does. The
broker is a child process, so tests can stop it or SIGKILL it to inject faults.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


class LocalBroker:
    """``with LocalBroker() as b: ... b.port``; ``kill()``/``start()`` to inject outages."""

    def __init__(
        self,
        kind: str = "auto",
        port: int | None = None,
        *,
        persistence: bool = True,
        extra_config: str = "",
        workdir: str | Path | None = None,
    ) -> None:
        if kind == "auto":
            kind = "mosquitto" if mosquitto_path() else "amqtt"
        if kind not in ("mosquitto", "amqtt"):
            raise ValueError(f"unknown broker kind {kind!r}")
        if kind == "mosquitto" and not mosquitto_path():
            raise FileNotFoundError("mosquitto is not installed")
        self.kind = kind
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.persistence = persistence
        self.extra_config = extra_config
        self._tmp = tempfile.TemporaryDirectory(prefix="datalab-broker-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"{kind}.log"

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            lines = [
                f"listener {self.port} {self.host}",
                "allow_anonymous true",
                f"persistence {'true' if self.persistence else 'false'}",
                f"persistence_location {self.workdir}/",
                # Keep QoS 1 messages for offline persistent sessions (vans out of coverage).
                "max_queued_messages 100000",
                "max_inflight_messages 100",
                self.extra_config,
            ]
            conf.write_text("\n".join(lines) + "\n")
            return [mosquitto_path() or "mosquitto", "-c", str(conf)]
        return [sys.executable, "-m", "simulator.amqtt_broker", self.host, str(self.port)]

    def start(self) -> "LocalBroker":
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        try:
            wait_for_port(self.host, self.port, 15.0)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"{self.kind} did not start; its log:\n{self.log_path.read_text(errors='replace')[-2000:]}"
            ) from None
        return self

    def kill(self) -> None:
        """SIGKILL: the broker loses what it had not saved, like a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
