"""v17 attack on #17.4/#17.5 as installed: systemd-analyze verify on my own copy (and a broken
copy, to show the verifier here really fails on errors), and whether the installed centre ever
applies the retention policy (docs/privacy.md: "run it after the regular map build")."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted(p.name for p in (ROOT / "systemd").iterdir() if p.suffix in (".service", ".timer"))


def _copy(tmp: Path, mutate=None) -> Path:
    b = tmp / "bin"
    b.mkdir(exist_ok=True)
    for n in ("edge", "datalab-receiver"):
        (b / n).write_text("#!/bin/sh\nexit 0\n")
        (b / n).chmod(0o755)
    for u in UNITS:
        t = (ROOT / "systemd" / u).read_text().replace("/opt/datalab-edge/venv/bin/", f"{b}/")
        if mutate:
            t = mutate(u, t)
        (tmp / u).write_text(t)
    return tmp


def _verify(d: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(d / unit)], capture_output=True,
                          text=True, cwd=d, timeout=120)


@pytest.mark.parametrize("unit", UNITS)
def test_verify_clean_and_broken(unit: str, tmp_path: Path) -> None:
    good = _verify(_copy(tmp_path / "good"), unit) if (tmp_path / "good").mkdir() is None else None
    assert good.returncode == 0 and not good.stderr.strip(), good.stderr
    # the verifier must catch a typo'd directive and a missing binary in this environment
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    _copy(bad_dir, lambda u, t: t.replace("[Unit]", "[Unit]\nRequiresx=foo.service", 1)
          .replace(f"{bad_dir}/bin/datalab-receiver", "/nonexistent/datalab-receiver"))
    bad = _verify(bad_dir, unit)
    print(unit, bad.returncode, bad.stderr[-300:])
    assert bad.returncode != 0 or "Requiresx" in bad.stderr


def test_installed_centre_applies_retention() -> None:
    """Something the install puts in place must run `datalab-receiver retention --apply`."""
    units = "\n".join((ROOT / "systemd" / u).read_text() for u in UNITS)
    installer = (ROOT / "scripts" / "install-central").read_text()
    cron = "\n".join(p.read_text() for p in (ROOT / "systemd").glob("*") if p.is_file())
    assert "retention" in units + installer + cron, (
        "no unit, timer or install step runs `datalab-receiver retention`: on an installed centre "
        "raw positions are kept forever unless the administrator adds it by hand")
