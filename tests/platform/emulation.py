"""Run a foreign architecture's userland here: qemu user mode registered with binfmt_misc.

The kernel runs an aarch64 ELF through the interpreter registered for it in binfmt_misc.
Debian's qemu-user-static registers it from its postinst only through systemd or
binfmt-support's init script, neither of which runs in a container, and the registration
does not survive a reboot: so the tests make sure of it themselves, each run.

The registration must carry the F flag ("fix binary"): the kernel then opens the
interpreter once, here, and uses that open file in every mount namespace. Without it, the
interpreter's path would be looked up inside the chroot / nspawn container, which has no
/usr/bin/qemu-aarch64-static, and every program there would fail with ENOENT.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

BINFMT = Path("/proc/sys/fs/binfmt_misc")


class EmulationError(RuntimeError):
    """The foreign architecture cannot be run here (what is missing says how to fix it)."""


@dataclass(frozen=True)
class Foreign:
    """One foreign architecture: its Debian name, its binfmt entry and the ELF header that selects it."""

    debian: str
    name: str  # the binfmt_misc entry, as qemu-user-static names it
    interpreter: str
    magic: str
    mask: str

    def register_line(self) -> str:
        # :name:type:offset:magic:mask:interpreter:flags; F = open the interpreter now (see above),
        # P = keep argv[0] (as Debian's own registration; the -P interpreter name tells qemu so).
        return f":{self.name}:M::{self.magic}:{self.mask}:{self.interpreter}:PF"


# ELF64, little-endian, e_machine 0xb7 (EM_AARCH64); the magic and mask of Debian's
# /usr/share/qemu/binfmt.d/qemu-aarch64.conf (/var/lib/binfmts/qemu-aarch64).
AARCH64 = Foreign(
    debian="arm64",
    name="qemu-aarch64",
    # Debian's link to qemu-aarch64-static: called by this name, qemu expects the argv the P flag gives.
    interpreter="/usr/libexec/qemu-binfmt/aarch64-binfmt-P",
    magic=r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
    mask=r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
)


def entry(arch: Foreign, binfmt: Path = BINFMT) -> dict[str, str]:
    """The kernel's view of ``arch``'s registration ({} when there is none)."""
    try:
        lines = (binfmt / arch.name).read_text().splitlines()
    except OSError:
        return {}
    out = {"state": lines[0] if lines else ""}
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        out[key.rstrip(":")] = value.strip()
    return out


def ensure_binfmt(arch: Foreign = AARCH64, binfmt: Path = BINFMT) -> dict[str, str]:
    """Make ``arch`` programs run here through qemu, with the F flag; the entry as registered.

    Mounts binfmt_misc when it is not, and (re)writes a registration that is missing,
    disabled or without F. Needs root and qemu-user-static (scripts/bootstrap --with-tests)."""
    if not Path(arch.interpreter).exists():
        raise EmulationError(f"{arch.interpreter} is missing: apt-get install qemu-user-static "
                             "(scripts/bootstrap --with-tests installs it)")
    if not (binfmt / "register").exists():
        r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise EmulationError(f"cannot mount binfmt_misc at {binfmt}: {r.stderr.strip()}")
    have = entry(arch, binfmt)
    if have.get("state") == "enabled" and "F" in have.get("flags", ""):
        return have
    if have:  # disabled, or registered without F (a chroot would not find the interpreter)
        (binfmt / arch.name).write_text("-1")  # -1 removes the entry
    (binfmt / "register").write_text(arch.register_line())
    have = entry(arch, binfmt)
    if have.get("state") != "enabled" or "F" not in have.get("flags", ""):
        raise EmulationError(f"{arch.name} did not register with the F flag: {have}")
    return have
