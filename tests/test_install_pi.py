"""scripts/install-pi's logic on a fake root with a fake Debian (issue #19.3).

The Debian side (apt-get, dpkg, useradd, systemctl ...) is a small fake that keeps its state in
files and logs every call, so a test can inject a failure or a hang at any step: the script must
either finish or leave nothing half made, a re-run must change nothing, and a run killed outright
must be finished by the next. The real-systemd install into a debootstrapped bookworm is
h19b's nspawn test; the slow test at the end installs a real ``.[device]`` venv and runs the agent
from it.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-pi"

# One fake for every system command: state in $FAKE_STATE, every call in $FAKE_STATE/log.
# FAKE_FAIL / FAKE_HANG: a call whose "name args" starts with this fails / hangs.
FAKE = r"""#!/usr/bin/env bash
name=$(basename "$0")
S=$FAKE_STATE
args=()
for a in "$@"; do case "$a" in --root=*|--quiet|-qq|-y|--no-install-recommends) ;; *) args+=("$a") ;; esac; done
line="$name ${args[*]}"
echo "$line" >> "$S/log"
[ -n "${FAKE_FAIL:-}" ] && [[ "$line" == "$FAKE_FAIL"* ]] && { echo "fake $name: injected failure" >&2; exit 1; }
[ -n "${FAKE_HANG:-}" ] && [[ "$line" == "$FAKE_HANG"* ]] && { echo hanging >> "$S/hung"; sleep 60; }
case "$name" in
  dpkg) if [ "${args[0]}" = --print-architecture ]; then echo "${FAKE_ARCH:-arm64}"; else [ -e "$S/pkgs/${args[1]}" ]; fi ;;
  apt-get) if [ "${args[0]}" = install ]; then for p in "${args[@]:1}"; do touch "$S/pkgs/$p"; done; fi ;;
  getent) [ -e "$S/groups/${args[1]}" ] ;;
  groupadd) touch "$S/groups/${args[-1]}" ;;
  groupdel) rm "$S/groups/${args[-1]}" ;;
  useradd) touch "$S/users/${args[-1]}" ;;
  userdel) rm "$S/users/${args[-1]}" ;;
  id) if [ "${args[0]}" = datalab ]; then [ -e "$S/users/datalab" ]; else exec /usr/bin/id "$@"; fi ;;
  usermod|chown) ;;
  systemctl)
    case "${args[0]}" in
      is-enabled) [ -e "$S/enabled" ] ;;
      enable) touch "$S/enabled" ;;
      disable) rm -f "$S/enabled" ;;
    esac ;;
  python)
    # A venv is a folder whose bin/python is this fake; pip records what it was asked for.
    if [ "${args[0]}" = -m ] && [ "${args[1]}" = venv ]; then
      mkdir -p "${args[2]}/bin" && ln -s "$0" "${args[2]}/bin/python"
    elif [ "${args[0]}" = -m ] && [ "${args[1]}" = pip ]; then
      venv=$(dirname "$(dirname "$0")")
      echo "${args[@]:3}" > "$venv/installed"
    else
      exec "$REAL_PYTHON" "$@"
    fi ;;
esac
"""
COMMANDS = ("dpkg", "apt-get", "getent", "groupadd", "groupdel", "useradd", "userdel", "id", "usermod",
            "chown", "systemctl")


class FakeDebian:
    def __init__(self, base: Path, *, groups: tuple[str, ...] = ("dialout", "gpio")) -> None:
        self.root = base / "root"
        self.state = base / "state"
        self.bin = base / "bin"
        for d in (self.root / "etc", self.state / "pkgs", self.state / "groups", self.state / "users", self.bin):
            d.mkdir(parents=True)
        (self.root / "etc/os-release").write_text('ID=debian\nVERSION_CODENAME=bookworm\n')
        for g in groups:  # a plain Debian has dialout and audio, not i2c or gpio; Pi OS has all
            (self.state / "groups" / g).touch()
        fake = self.bin / "fake"
        fake.write_text(FAKE)
        fake.chmod(0o755)
        for name in COMMANDS:
            (self.bin / name).symlink_to(fake)
        # python: a separate copy (its $0 names the interpreter, and its venvs' bin/python).
        (self.bin / "python").write_text(FAKE)
        (self.bin / "python").chmod(0o755)
        (self.state / "log").touch()

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_STATE": str(self.state),
                "PYTHON": str(self.bin / "python"), "REAL_PYTHON": sys.executable, **extra}

    def cmd(self, *args: str, arch: str | None = "aarch64") -> list[str]:
        pinned = ["--arch", arch] if arch else []  # None: what the (fake) dpkg says
        return ["bash", str(SCRIPT), "--root", str(self.root), "--system", *pinned, *args]

    def install(self, *args: str, arch: str | None = "aarch64", **env: str) -> subprocess.CompletedProcess[str]:
        (self.state / "log").write_text("")
        return subprocess.run(self.cmd(*args, arch=arch), env=self.env(**env), capture_output=True, text=True,
                              timeout=120)

    def uninstall(self, *args: str) -> subprocess.CompletedProcess[str]:
        (self.state / "log").write_text("")
        return subprocess.run(["bash", str(ROOT / "scripts/uninstall-pi"), "--root", str(self.root), "--system",
                               *args], env=self.env(), capture_output=True, text=True, timeout=60)

    def log(self) -> list[str]:
        return (self.state / "log").read_text().splitlines()

    def system(self) -> dict[str, list[str]]:
        return {k: sorted(p.name for p in (self.state / k).iterdir()) for k in ("pkgs", "groups", "users")} | {
            "enabled": [str((self.state / "enabled").exists())]}

    def tree(self) -> dict[str, str]:
        """Every path under the root: its kind, mode and content (or link target)."""
        out: dict[str, str] = {}
        for p in sorted(self.root.rglob("*")):
            rel = str(p.relative_to(self.root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = f"dir {oct(st.st_mode & 0o7777)}"
            else:
                out[rel] = f"{oct(st.st_mode & 0o7777)} {p.read_bytes()!r}"
        return out


@pytest.fixture
def deb(tmp_path: Path) -> FakeDebian:
    return FakeDebian(tmp_path)


def _live_venv(deb: FakeDebian) -> Path:
    link = deb.root / "opt/datalab-edge/venv"
    assert link.is_symlink(), "the venv is a link to one build"
    return link.parent / os.readlink(link)


def test_fresh_debian_installs_everything_in_order(deb: FakeDebian) -> None:
    r = deb.install()
    assert r.returncode == 0, r.stdout + r.stderr
    log = deb.log()
    # apt and pip (what fails slowly, or for want of a network) before any user or file of ours.
    first = lambda prefix: next(i for i, ln in enumerate(log) if ln.startswith(prefix))  # noqa: E731
    assert first("apt-get install python3-venv") < first("python -m pip") < first("useradd")
    assert first("useradd") < first("systemctl enable")
    assert not any("libasound2-dev" in ln for ln in log), "no compiler or ALSA headers without a microphone"
    venv = _live_venv(deb)
    assert (venv / "installed").read_text().strip() == f"{ROOT}[device]"
    assert (venv / ".datalab-complete").exists()
    assert deb.system() == {"pkgs": ["python3-venv"], "groups": ["audio", "dialout", "gpio", "i2c"],
                            "users": ["datalab"], "enabled": ["True"]}
    unit = deb.root / "etc/systemd/system/datalab-edge.service"
    assert unit.read_text() == (ROOT / "systemd/datalab-edge.service").read_text()
    assert (deb.root / "etc/datalab-edge/agent.toml").read_text() == (ROOT / "edge/config.example.toml").read_text()
    assert not [p for p in deb.root.rglob("*install-pi-*")], "no staging file left"


def test_rerun_changes_nothing(deb: FakeDebian) -> None:
    assert deb.install().returncode == 0
    before, system = deb.tree(), deb.system()
    r = deb.install()
    assert r.returncode == 0, r.stderr
    assert "program up to date" in r.stdout and "keeping existing" in r.stdout
    log = deb.log()
    for step in ("apt-get", "python -m", "useradd", "groupadd", "systemctl enable"):
        assert not any(ln.startswith(step) for ln in log), (step, log)
    assert deb.tree() == before and deb.system() == system


def test_microphone_in_config_installs_the_alsa_binding_and_its_build_tools(deb: FakeDebian) -> None:
    assert deb.install().returncode == 0
    conf = deb.root / "etc/datalab-edge/agent.toml"
    conf.write_text('[device]\nid = "van-7"\n[sensors.noise]\ndriver = "microphone"\n')
    old = _live_venv(deb)
    r = deb.install()
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith("apt-get install gcc python3-dev libasound2-dev") for ln in deb.log())
    venv = _live_venv(deb)
    assert venv != old and not old.exists(), "the new build replaced the old one"
    assert (venv / "installed").read_text().strip() == f"{ROOT}[device,mic]"
    assert conf.read_text().startswith('[device]\nid = "van-7"')
    # --no-mic on a van that has a microphone: the agent could not read it. Refused, nothing changed.
    before, system = deb.tree(), deb.system()
    r = deb.install("--no-mic")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "--no-mic" in r.stderr and "microphone" in r.stderr and str(conf) in r.stderr, r.stderr
    assert deb.tree() == before and deb.system() == system
    assert not [ln for ln in deb.log() if not ln.startswith("python -c")], "only preflight checks ran"
    assert (_live_venv(deb) / "installed").read_text().strip() == f"{ROOT}[device,mic]"
    # Without the microphone in the configuration, --no-mic installs the van's part alone.
    conf.write_text('[device]\nid = "van-7"\n')
    r = deb.install("--no-mic")
    assert r.returncode == 0 and (_live_venv(deb) / "installed").read_text().strip() == f"{ROOT}[device]"


@pytest.mark.parametrize("fail_at", ["apt-get install", "python -m pip", "useradd", "systemctl daemon-reload",
                                     "systemctl enable"])
def test_a_failure_anywhere_leaves_nothing_half_made(deb: FakeDebian, fail_at: str) -> None:
    before, system = deb.tree(), deb.system()
    r = deb.install(FAKE_FAIL=fail_at)
    assert r.returncode != 0
    assert any(ln.startswith(fail_at) for ln in deb.log()), "the failure was injected"
    assert deb.tree() == before, "the root is as it was"
    s = deb.system()
    # Packages apt installed stay (harmless, and apt's own business); nothing of ours does.
    assert (s["groups"], s["users"], s["enabled"]) == (system["groups"], system["users"], system["enabled"])
    # And then it installs.
    r = deb.install()
    assert r.returncode == 0, r.stderr
    assert (deb.root / "etc/systemd/system/datalab-edge.service").exists()


def test_a_failed_update_keeps_the_running_install(deb: FakeDebian) -> None:
    assert deb.install().returncode == 0
    old = _live_venv(deb)
    before = deb.tree()
    r = deb.install("--mic", FAKE_FAIL="systemctl daemon-reload")
    assert r.returncode != 0 and "rolling back" in r.stdout
    assert _live_venv(deb) == old and deb.tree() == before, "old venv linked, new build gone"
    assert deb.system()["users"] == ["datalab"], "a user that was there stays"


def test_a_killed_run_is_finished_by_the_next(deb: FakeDebian) -> None:
    proc = subprocess.Popen(deb.cmd(), env=deb.env(FAKE_HANG="python -m pip"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (deb.state / "hung").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "never reached pip"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # a power cut: no trap runs
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    builds = list((deb.root / "opt/datalab-edge/venvs").iterdir())
    assert len(builds) == 1 and not (builds[0] / ".datalab-complete").exists(), "a half-made build"
    assert not (deb.root / "opt/datalab-edge/venv").exists(), "... that never went live"
    r = deb.install()
    assert r.returncode == 0, r.stderr
    assert "removing an unfinished build" in r.stdout
    venv = _live_venv(deb)
    assert (venv / "installed").exists() and list(venv.parent.iterdir()) == [venv]


def test_32_bit_arm_is_refused_before_anything_changes(deb: FakeDebian) -> None:
    before = deb.tree()
    r = subprocess.run(["bash", str(SCRIPT), "--root", str(deb.root), "--system", "--arch", "armv7l"],
                       env=deb.env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "32-bit ARM" in r.stderr and "64-bit" in r.stderr
    assert deb.tree() == before and deb.log() == []


def test_a_32_bit_userland_on_a_64_bit_kernel_is_refused(deb: FakeDebian) -> None:
    # 32-bit Pi OS on a Pi 4/5: the kernel (uname -m) is aarch64, the userland (dpkg) armhf.
    before = deb.tree()
    r = deb.install(arch=None, FAKE_ARCH="armhf")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "32-bit ARM (armhf) is not supported" in r.stderr and "64-bit" in r.stderr, r.stderr
    assert deb.tree() == before and deb.log() == ["dpkg --print-architecture"]
    r = deb.install(arch=None, FAKE_ARCH="arm64")
    assert r.returncode == 0, r.stdout + r.stderr


def test_purge_removes_the_groups_install_pi_created_and_no_others(deb: FakeDebian) -> None:
    # This Debian had dialout and gpio; install-pi adds audio and i2c and records them.
    assert deb.install().returncode == 0
    record = deb.root / "etc/datalab-edge/created-groups"
    assert [x for x in record.read_text().splitlines() if not x.startswith("#")] == ["audio", "i2c"]
    # A re-run creates nothing and keeps the record; a plain uninstall keeps it with the config.
    assert deb.install().returncode == 0 and record.exists()
    r = deb.uninstall()
    assert r.returncode == 0, r.stdout + r.stderr
    assert record.exists() and deb.system()["groups"] == ["audio", "dialout", "gpio", "i2c"]
    r = deb.uninstall("--purge")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "groupdel audio" in deb.log() and "groupdel i2c" in deb.log()
    assert deb.system() == {"pkgs": ["python3-venv"], "groups": ["dialout", "gpio"], "users": [],
                            "enabled": ["False"]}


@pytest.mark.slow
def test_agent_runs_from_a_device_only_venv(tmp_path: Path) -> None:
    """A real venv with ``.[device]`` only (pip from the registry): the agent runs a short simulated shift.

    Fails while edge imports the receiver or simulator side at start (issue #16.1, h16a's work).
    """
    deb = FakeDebian(tmp_path)
    env = deb.env(PYTHON=sys.executable)
    r = subprocess.run(deb.cmd(), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    py = deb.root / "opt/datalab-edge/venv/bin/python"
    listing = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                             check=True).stdout.lower()  # fmt: skip
    for central in ("psycopg", "h3", "amqtt", "orjson", "waitress", "sqlite-utils"):
        assert central not in listing, f"{central} is the centre's, not the van's"
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "agent.toml"
    conf.write_text(f"""
[device]
id = "van-slim"
data_dir = "{data}"
[uplink]
host = "127.0.0.1"
port = 1
[simulation]
enabled = true
speedup = 600
shift_hours = 0.05
[sensors.pm]
driver = "sim-pm"
[sensors.gps]
driver = "sim-gps"
""")
    edge = deb.root / "opt/datalab-edge/venv/bin/edge"
    r = subprocess.run([str(edge), "run", "--config", str(conf)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    stats = json.loads((data / "stats.json").read_text())
    assert stats["committed"] > 0 and stats["committed"] == stats["taken"]
