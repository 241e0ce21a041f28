"""The project installed in a booted container as on a Pi, and what the tests ask of it.

``install()`` copies the work tree (tracked and new files, as a clone would have them) to
/usr/src/datalab-edge and runs ``scripts/install-pi`` there as root, with this machine's
pip settings. The van then runs simulated hardware (the real drivers over simulated
serial ports and I2C devices, simulator/hardware.py) in place of sensors.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from simulator.fleet import HARDWARE_SENSORS, NOISE_MODULE, sensors_toml
from tests.platform.container import Container

UNIT = "datalab-edge.service"
SRC = "/usr/src/datalab-edge"
CONFIG = "/etc/datalab-edge/agent.toml"
DATA = "/var/lib/datalab-edge"
VENV_PY = "/opt/datalab-edge/venv/bin/python"
TOOLS = "/usr/local/lib/datalab-platform"  # the probe and the oracle scripts, inside
HERE = Path(__file__).resolve().parent


def van_config(*, rate_hz: float = 1.0, commit_interval_s: float = 2.0, extra: str = "") -> str:
    """agent.toml for a van on simulated hardware, in real time, with no broker to reach."""
    return f"""
[device]
id = "van-platform"
data_dir = "{DATA}"
[sampling]
rate_hz = {rate_hz}
commit_interval_s = {commit_interval_s}
[batch]
# Small batches: the oracle must find seqs in sealed batches as well as loose rows.
max_samples = 40
max_age_s = 10.0
[uplink]
host = "127.0.0.1"
port = 1883
[simulation]
enabled = true
speedup = 1.0
devices = "hardware"
noise = "module"
{sensors_toml({**HARDWARE_SENSORS, "noise": NOISE_MODULE})}
{extra}
"""


def copy_tree(repo: Path, dest: Path) -> None:
    """The work tree's tracked and untracked-but-not-ignored files, as a clone would have them."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo,
                           capture_output=True, check=True).stdout.split(b"\0")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for raw in names:
            name = raw.decode()
            if name and (repo / name).exists():
                tar.add(repo / name, arcname=name, recursive=False)
    buf.seek(0)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=buf) as tar:
        tar.extractall(dest, filter="tar")


class Van:
    """The installed agent inside ``box``."""

    def __init__(self, box: Container) -> None:
        self.box = box
        self.dropins: list[str] = []

    def install(self, repo: Path) -> subprocess.CompletedProcess[str]:
        copy_tree(repo, self.box.path(SRC))
        tools = self.box.path(TOOLS)
        tools.mkdir(parents=True, exist_ok=True)
        for name in ("sandbox_probe.py", "buffer_oracle.py"):
            (tools / name).write_bytes((HERE / name).read_bytes())
        return self.box.run(f"cd {SRC} && scripts/install-pi", check=False, timeout=1200,
                            env=self.box.pip_env)

    def write_config(self, text: str) -> None:
        # As a technician would: in place, keeping install-pi's owner and mode.
        self.box.run(["sh", "-c", f"cat > {CONFIG}"], input=text)

    def dropin(self, name: str, text: str) -> None:
        d = self.box.path(f"/etc/systemd/system/{UNIT}.d")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.conf").write_text(text)
        self.dropins.append(name)
        self.box.run(["systemctl", "daemon-reload"])

    def remove_dropins(self) -> None:
        """The test's own drop-ins; install-pi's network.conf there is the product's, kept."""
        for name in self.dropins:
            self.box.run(["rm", "-f", f"/etc/systemd/system/{UNIT}.d/{name}.conf"])
        self.dropins.clear()
        self.box.run(["systemctl", "daemon-reload"])

    def state(self) -> dict[str, str]:
        return self.box.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText",
                             "Result", "UnitFileState")

    def running(self) -> bool:
        s = self.state()
        return s["ActiveState"] == "active" and s["SubState"] == "running"

    def wait_running(self, timeout: float = 60.0, other_than_pid: str = "") -> dict[str, str]:
        def ok() -> bool:
            s = self.state()
            up = s["ActiveState"] == "active" and s["SubState"] == "running"
            return up and s["MainPID"] not in ("0", other_than_pid)
        self.box.wait_for(f"{UNIT} active (running) and READY", ok, timeout)
        return self.state()

    def oracle(self) -> dict[str, Any]:
        """The buffer oracle, run inside as the service's user with the installed venv."""
        r = self.box.run(["runuser", "-u", "datalab", "--", VENV_PY, f"{TOOLS}/buffer_oracle.py",
                          f"{DATA}/buffer.sqlite"], timeout=120)
        return json.loads(r.stdout)

    def last_seq(self) -> int:
        r = self.box.run(["runuser", "-u", "datalab", "--", "sqlite3", "-readonly", f"{DATA}/buffer.sqlite",
                          "SELECT seq FROM sqlite_sequence WHERE name='samples'"], check=False)
        return int(r.stdout.strip() or 0)

    def journal(self) -> str:
        return self.box.journal(UNIT)

    def wait_journal(self, text: str, timeout: float = 30.0, after: int = 0) -> str:
        """The unit's journal once ``text`` shows up past character ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            j = self.journal()
            if text in j[after:]:
                return j
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the journal within {timeout:.0f} s:\n{j[-3000:]}")
            time.sleep(0.5)
