"""The centre's Debian for the platform tests: the van's cached bookworm plus the server packages.

Why a layer on the van's rootfs rather than a debootstrap of its own: debootstrap resolves
``--include`` poorly for a tree as deep as PostGIS's (GDAL, PROJ ...), while apt in a chroot
does it as on a real server; and the base (systemd, python3-venv ...) is the same, built and
cached once by tests/platform/rootfs.py. What apt installs here is what
``scripts/install-central`` asks apt for (it finds them installed and skips that step): the
download and unpacking (minutes) happen once per cache key, not every run.

Built in a temporary folder, renamed into place when complete, under a lock of its own as the
base: an interrupted build is never trusted. No service starts in the chroot (policy-rc.d).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.platform.rootfs import DEFAULT_CACHE, Recipe, RootfsError, ensure_rootfs

# What install-central installs from apt on a PostgreSQL centre (its step 1).
CENTRE_PACKAGES = ("mosquitto", "openssl", "postgresql", "postgresql-postgis")
CENTRE_VERSION = 1  # bump when the steps below change


def centre_name(base: Recipe) -> str:
    blob = json.dumps({"base": base.key(), "packages": CENTRE_PACKAGES, "version": CENTRE_VERSION}).encode()
    return f"centre-{base.suite}-{base.arch}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _chroot(root: Path, script: str, log: Path) -> None:
    mounts = [("proc", root / "proc", ["-t", "proc", "proc"]), ("dev", root / "dev", ["--bind", "/dev"])]
    done: list[Path] = []
    try:
        for _, where, how in mounts:
            subprocess.run(["mount", *how, str(where)], check=True)
            done.append(where)
        with open(log, "a") as out:
            r = subprocess.run(["chroot", str(root), "/bin/sh", "-ec", script], stdout=out, stderr=subprocess.STDOUT,
                               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
                                    "LANG": "C.UTF-8", "HOME": "/root"}, timeout=3600)
        if r.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RootfsError(f"apt in the centre's chroot failed ({r.returncode}); {log}:\n{tail}")
    finally:
        for where in reversed(done):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def ensure_centre_rootfs(base: Recipe | None = None, cache: Path = DEFAULT_CACHE) -> Path:
    """The cached centre rootfs, built first if missing (the van's base, then apt: several minutes)."""
    base = base or Recipe()
    lower = ensure_rootfs(base, cache)
    name = centre_name(base)
    target = cache / name
    done = target / ".datalab-centre.json"
    if done.exists():
        return target
    # A lock of its own: the base's lock is held for as long as any other rootfs builds (an
    # emulated arm64 one takes long), and this layer only reads the finished base.
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return target
        building = cache / f".{name}.building"
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(lower), str(building)], check=True)
        (building / ".datalab-recipe.json").unlink(missing_ok=True)
        log = cache / f"{name}.log"
        log.write_text("")
        resolv = building / "etc/resolv.conf"
        if resolv.is_symlink():  # never follow it: it would point at this machine's file
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        policy = building / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")  # nothing starts in the chroot
        policy.chmod(0o755)
        try:
            _chroot(building, "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
                    + " ".join(CENTRE_PACKAGES) + " && apt-get clean", log)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        policy.unlink()
        done_text = json.dumps({"base": base.name(), "packages": CENTRE_PACKAGES, "version": CENTRE_VERSION})
        (building / ".datalab-centre.json").write_text(done_text + "\n")
        os.rename(building, target)
    return target


if __name__ == "__main__":  # build or show the cache: python -m tests.platform.central
    print(ensure_centre_rootfs())
