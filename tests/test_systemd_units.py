"""The unit files pass systemd-analyze verify and carry the hardening; the install scripts lay
down the right files in a fake root, idempotently, and uninstall keeps data unless --purge."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")) or "=" not in line:
            continue
        k, _, v = line.partition("=")
        out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.mark.parametrize("unit", ["datalab-edge.service", "datalab-receiver.service"])
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (scripts/bootstrap --with-tests)")
    # verify insists that ExecStart's binary exists: point it at stand-ins of ours.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("edge", "datalab-receiver"):
        exe = bindir / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    text = (UNITS / unit).read_text().replace("/opt/datalab-edge/venv/bin/", f"{bindir}/")
    (tmp_path / unit).write_text(text)
    r = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # Any warning (an unknown key, a typo in a directive) counts as a failure too.
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_agent_unit_contract() -> None:
    d = _directives((UNITS / "datalab-edge.service").read_text())
    assert d["Type"] == ["notify"]
    assert int(d["WatchdogSec"][0]) <= 60
    assert d["Restart"] == ["always"]
    assert d["RestartPreventExitStatus"] == ["2"]  # a config error (exit 2): fix the file, no crash loop
    assert d["User"] == ["datalab"]
    assert set(d["SupplementaryGroups"][0].split()) == {"dialout", "i2c", "gpio", "audio"}
    assert d["NoNewPrivileges"] == ["yes"] and d["ProtectSystem"] == ["strict"]
    assert d["PrivateTmp"] == ["yes"] and d["ProtectHome"] == ["yes"]
    assert "/var/lib/datalab-edge" in d["ReadWritePaths"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(d["RestrictAddressFamilies"][0].split())
    assert d["DevicePolicy"] == ["closed"]
    allowed = " ".join(d["DeviceAllow"])
    for dev in ("ttyAMA", "i2c", "gpiochip", "alsa"):
        assert dev in allowed
    assert int(d["TimeoutStopSec"][0]) >= 15
    assert "--config /etc/datalab-edge/agent.toml" in d["ExecStart"][0]
    assert "kill -HUP" in d["ExecReload"][0]


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_install_and_uninstall_in_fake_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = _run("install-pi", "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: fake root" in r.stdout
    unit = root / "etc/systemd/system/datalab-edge.service"
    assert unit.read_text() == (UNITS / "datalab-edge.service").read_text()
    conf = root / "etc/datalab-edge/agent.toml"
    assert conf.read_text() == (ROOT / "edge/config.example.toml").read_text()
    assert oct(conf.stat().st_mode & 0o777) == "0o660"
    assert (root / "var/lib/datalab-edge").is_dir()
    assert oct((root / "var/lib/datalab-edge").stat().st_mode & 0o777) == "0o750"
    assert "datalab" in (root / "etc/polkit-1/rules.d/50-datalab-edge.rules").read_text()

    # Idempotent, and never overwrites a configuration.
    conf.write_text('[device]\nid = "van-042"\n')
    r = _run("install-pi", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "keeping existing" in r.stdout
    assert conf.read_text() == '[device]\nid = "van-042"\n'

    (root / "var/lib/datalab-edge/buffer.sqlite").write_text("data")
    r = _run("uninstall-pi", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert not unit.exists() and not (root / "opt/datalab-edge").exists()
    assert conf.exists() and (root / "var/lib/datalab-edge/buffer.sqlite").exists()

    r = _run("uninstall-pi", "--root", str(root), "--purge")
    assert r.returncode == 0, r.stderr
    assert not conf.exists() and not (root / "var/lib/datalab-edge").exists()


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = _run("install-pi", "--dry-run", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "would run: install -m 0644" in r.stdout
    assert not any(p.is_file() for p in root.rglob("*"))
    # Without --root it prints the real paths and commands, as any user.
    r = _run("install-pi", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "systemctl enable datalab-edge.service" in r.stdout
    assert "/etc/datalab-edge/agent.toml" in r.stdout
    r = _run("uninstall-pi", "--dry-run", "--purge")
    assert r.returncode == 0 and "would run: rm -rf /etc/datalab-edge /var/lib/datalab-edge" in r.stdout


def test_scripts_are_executable() -> None:
    for s in ("install-pi", "uninstall-pi"):
        assert os.access(ROOT / "scripts" / s, os.X_OK)
