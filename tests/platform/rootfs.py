"""A Debian bookworm rootfs for the platform tests, built once with debootstrap and cached.

The cache lives outside the repository (``/var/cache/datalab-edge`` by default, or
``$DATALAB_PLATFORM_CACHE``), in a folder named after a hash of everything that goes
into it (suite, architecture, mirror, package list, this recipe's version): change any of
them and a new rootfs is built beside the old one. A build goes to a temporary folder and
is renamed into place only when complete, under a lock, so an interrupted or concurrent
build never leaves a half-made rootfs that a later run would trust.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Bump when the recipe below changes in a way the other fields do not show.
RECIPE_VERSION = 1
DEFAULT_CACHE = Path(os.environ.get("DATALAB_PLATFORM_CACHE", "/var/cache/datalab-edge"))

# What a Pi's Raspberry Pi OS Lite has that debootstrap's minimal set lacks, and what the
# agent's service needs around it: systemd + D-Bus + logind + polkit (the ignition-off
# poweroff goes through logind's polkit check), python3-venv for install-pi; sqlite3 and
# procps for the tests' look inside.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "polkitd",
    "ca-certificates", "python3", "python3-venv", "procps", "iproute2", "sqlite3",
)
# No compiler or headers here, as on a fresh Pi OS Lite: scripts/install-pi installs what it builds
# with (the microphone's ALSA binding) itself, and this test proves it does.
PACKAGES = BASE_PACKAGES
# The arm64 userland runs the van's own tests inside (tests/test_platform_arm64.py): the uplink
# tests start a real Mosquitto, an arm64 one there.
ARM64_PACKAGES = PACKAGES + ("mosquitto",)


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses here (debootstrap must use the same: no other host is reachable)."""
    files = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        # deb822 (URIs: ... / Suites: bookworm) or one-line ("deb URI bookworm main").
        for block in re.split(r"\n\s*\n", text):
            uri = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
            if uri and suites and "bookworm" in suites.group(1).split() and "security" not in uri.group(1):
                return uri.group(1)
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Recipe:
    suite: str = "bookworm"
    arch: str = "amd64"
    mirror: str = field(default_factory=apt_mirror)
    packages: tuple[str, ...] = PACKAGES
    version: int = RECIPE_VERSION

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def name(self) -> str:
        return f"rootfs-{self.suite}-{self.arch}-{self.key()}"


class RootfsError(RuntimeError):
    """The rootfs could not be built (debootstrap's log tail says why)."""


def ensure_rootfs(
    recipe: Recipe | None = None, cache: Path = DEFAULT_CACHE, *, log: Path | None = None
) -> Path:
    """The cached rootfs for ``recipe``, built first if missing (~2.5 min; arm64 under qemu, longer)."""
    recipe = recipe or Recipe()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / recipe.name()
    done = target / ".datalab-recipe.json"
    if done.exists():
        return target
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same one
        if done.exists():
            return target
        building = cache / f".{recipe.name()}.building"
        shutil.rmtree(building, ignore_errors=True)  # left by a killed build: never trusted
        log = log or cache / f"{recipe.name()}.log"
        cmd = [
            "debootstrap", "--variant=minbase", f"--arch={recipe.arch}",
            "--include=" + ",".join(recipe.packages), recipe.suite, str(building), recipe.mirror,
        ]
        with open(log, "w") as out:
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
        if r.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            shutil.rmtree(building, ignore_errors=True)
            raise RootfsError(f"debootstrap failed ({r.returncode}); {log}:\n" + "\n".join(tail))
        shutil.rmtree(building / "var/cache/apt/archives", ignore_errors=True)
        (building / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        (building / ".datalab-recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
        os.rename(building, target)
    return target


if __name__ == "__main__":  # build or show the cache: python -m tests.platform.rootfs [arm64]
    import sys

    if sys.argv[1:] == ["arm64"]:  # needs qemu-aarch64 in binfmt_misc (tests/platform/emulation.py)
        print(ensure_rootfs(Recipe(arch="arm64", packages=ARM64_PACKAGES)))
    else:
        print(ensure_rootfs())
