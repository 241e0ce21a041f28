"""Boot a rootfs with systemd as PID 1 (systemd-nspawn -b) and run commands in it (nsenter).

This machine has no systemd or D-Bus of its own, so the container is started with
``--register=no --keep-unit``, and commands go in with ``nsenter`` into the namespaces of
the container's init rather than through ``machinectl``. ``DevicePolicy=`` and
``IPAddressDeny=`` are cgroup-v2 BPF programs: without the unified hierarchy and the
``bpf()`` call allowed, systemd inside silently skips them, so the container gets both.

The container runs on a throwaway copy of the cached rootfs (an overlay mount when the
kernel has it, else a full copy): the cache is never written to. ``close()`` always
tears everything down: a clean poweroff first, then SIGKILL for whatever is left.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(RuntimeError):
    """The container did not boot, or a command inside it failed."""


def pip_settings() -> tuple[list[tuple[Path, str]], dict[str, str], list[Path]]:
    """What pip needs to reach the registries as it does here: its config files (host path,
    path inside), its PIP_* environment, and the local folders they name (bound read-only)."""
    files = [(Path("/etc/pip.conf"), "/etc/pip.conf"),
             (Path.home() / ".config/pip/pip.conf", "/root/.config/pip/pip.conf")]
    files = [(h, c) for h, c in files if h.is_file()]
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    text = " ".join([*(h.read_text(errors="replace") for h, _ in files), *env.values()])
    dirs: set[Path] = set()
    for token in re.findall(r"(?:file://)?(/[^\s'\"=]+)", text):
        p = Path(token)
        if p.is_dir():
            # A file:// simple index links its files relative to its parent.
            dirs.add(p.parent if p.name == "simple" else p)
    return files, env, sorted(dirs)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


WORK_PREFIX = "datalab-platform-"
WORK_PARENT = Path("/var/tmp")
# nspawn's per-machine folder; it removes it on exit, but not when SIGKILLed.
PROPAGATE = Path("/run/systemd/nspawn/propagate")


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sweep_stale(parent: Path = WORK_PARENT) -> list[Path]:
    """Tear down what a killed test run left (its own teardown never ran): the container of a
    run whose pytest is gone, its overlay mount and folder. Runs still alive are left alone."""
    swept = []
    for work in parent.glob(WORK_PREFIX + "*"):
        try:
            owner_s, nspawn_s, name = (work / "owner").read_text().split()
            owner, nspawn = int(owner_s), int(nspawn_s)
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        if _alive(owner):
            continue
        try:  # the pid may have been reused: only a systemd-nspawn on this very folder
            cmdline = Path(f"/proc/{nspawn}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        if cmdline and cmdline[0].endswith(b"systemd-nspawn") and str(work).encode() in b" ".join(cmdline):
            for kid in [*_children(nspawn), nspawn]:
                try:
                    os.kill(kid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        subprocess.run(["umount", "-l", str(work / "root")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(PROPAGATE / name, ignore_errors=True)
        swept.append(work)
    return swept


class Container:
    """One booted container on a copy of ``base``; use as a context manager."""

    def __init__(self, base: Path, workdir: Path | None = None, *, name: str = "") -> None:
        self.base = base
        self.name = name or f"van-test-{os.getpid()}"  # unique: nspawn keeps per-name state in /run
        self.work = Path(workdir or tempfile.mkdtemp(prefix=WORK_PREFIX, dir=WORK_PARENT))
        self.root = self.work / "root"
        self.log = self.work / "nspawn.log"
        self._overlay = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._pip_files, self.pip_env, self._pip_dirs = pip_settings()
        self._prepare()

    # -- the per-run root ------------------------------------------------------------------

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        upper, wd = self.work / "upper", self.work / "ovl-work"
        upper.mkdir(exist_ok=True)
        wd.mkdir(exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={self.base},upperdir={upper},workdir={wd}",
             str(self.root)], capture_output=True, text=True)
        if r.returncode == 0:
            self._overlay = True
        else:  # no overlayfs here: a full copy (slower, same result)
            subprocess.run(["cp", "-a", "--reflink=auto", f"{self.base}/.", str(self.root)], check=True)
        # What this machine needs to reach the registries from inside (never cached: host-specific).
        shutil.copyfile("/etc/hosts", self.root / "etc/hosts")
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if bundle.is_file():
            shutil.copyfile(bundle, self.root / "etc/ssl/certs/ca-certificates.crt")
        for host, inside in self._pip_files:
            dst = self.root / inside.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(host, dst)
        (self.root / "etc/hostname").write_text(self.name + "\n")

    def path(self, inside: str) -> Path:
        """A path inside the container, seen from here."""
        return self.root / inside.lstrip("/")

    # -- boot and power --------------------------------------------------------------------

    def boot(self, timeout: float = 120.0, *, bpf: bool = True) -> None:
        """Boot and wait for a running system. ``bpf=False`` boots without what the device and
        IP policies need (the negative control: systemd then skips them without a word)."""
        binds = [f"--bind-ro={d}" for d in self._pip_dirs]
        cgroup_bpf = ["--capability=CAP_BPF", "--system-call-filter=bpf"] if bpf else []
        cmd = ["systemd-nspawn", "-b", "-D", str(self.root), f"--machine={self.name}",
               "--register=no", "--keep-unit", "--console=passive", "--resolv-conf=copy-host",
               *cgroup_bpf, *binds]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"} if bpf else dict(os.environ)
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        # Who owns this container: sweep_stale() tears it down if this process dies unannounced.
        (self.work / "owner").write_text(f"{os.getpid()} {self._proc.pid} {self.name}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self._proc.returncode}: {self.log_tail()}")
            if self.leader() is not None:
                r = self.run(["systemctl", "is-system-running"], check=False, timeout=30)
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        raise ContainerError(f"no booted system within {timeout:.0f} s: {self.log_tail()}")

    def leader(self) -> int | None:
        """PID (here) of the container's init: systemd-nspawn's child."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        kids = _children(self._proc.pid)
        return kids[0] if kids else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the container to power off by itself; its exit status, or None."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def poweroff(self, timeout: float = 60.0) -> bool:
        """A clean shutdown (SIGTERM to nspawn = poweroff inside); True if it went down."""
        if not self.running:
            return True
        assert self._proc is not None
        self._proc.terminate()
        return self.wait_exit(timeout) is not None

    def reboot(self, timeout: float = 120.0) -> None:
        if not self.poweroff():
            self.kill()
        self.boot(timeout)

    def kill(self) -> None:
        """SIGKILL the container's init (which takes its PID namespace along) and nspawn."""
        if self._proc is None:
            return
        lead = self.leader()
        if lead is not None:
            try:
                os.kill(lead, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Always: down (cleanly if it can), unmounted, the per-run folder removed."""
        try:
            if not self.poweroff(timeout=30):
                self.kill()
        finally:
            if self._overlay:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True)
            shutil.rmtree(self.work, ignore_errors=True)
            shutil.rmtree(PROPAGATE / self.name, ignore_errors=True)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- commands --------------------------------------------------------------------------

    def run(self, argv: Sequence[str] | str, *, check: bool = True, timeout: float = 120.0,
            env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside (as root, in all of init's namespaces); a str goes through sh -c."""
        lead = self.leader()
        if lead is None:
            raise ContainerError("the container is not running")
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        base_env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb",
                    "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        cmd = ["nsenter", f"--target={lead}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
               "--root", "--wd", "--", "/usr/bin/env", "-i",
               *[f"{k}={v}" for k, v in {**base_env, **(env or {})}.items()], *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise ContainerError(
                f"{shlex.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def journal(self, unit: str | None = None, since_cursor: str | None = None) -> str:
        args = ["journalctl", "--no-pager", "-o", "cat"]
        if unit:
            args += ["-u", unit]
        if since_cursor:
            args += [f"--after-cursor={since_cursor}"]
        return self.run(args, check=False).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *[f"--property={p}" for p in props]]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, what: str, probe: Callable[[], bool], timeout: float, step: float = 0.5) -> None:
        """Poll ``probe()`` until true; ContainerError naming ``what`` on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if probe():
                return
            time.sleep(step)
        raise ContainerError(f"timed out after {timeout:.0f} s waiting for {what}")
