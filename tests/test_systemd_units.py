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


ALL_UNITS = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".timer"))
CENTRAL_SERVICES = ["datalab-receiver@.service", "datalab-deriver.service", "datalab-api.service",
                    "datalab-maps.service", "datalab-retention.service"]


def test_every_unit_is_listed() -> None:
    assert set(ALL_UNITS) == {"datalab-edge.service", *CENTRAL_SERVICES, "datalab-maps.timer",
                              "datalab-retention.timer"}


@pytest.mark.parametrize("unit", ALL_UNITS)
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
    # All units side by side: a timer is verified with the service it starts.
    for u in ALL_UNITS:
        (tmp_path / u).write_text((UNITS / u).read_text().replace("/opt/datalab-edge/venv/bin/", f"{bindir}/"))
    r = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # Any warning (an unknown key, a typo in a directive) counts as a failure too.
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


@pytest.mark.parametrize("unit", CENTRAL_SERVICES)
def test_central_unit_contract(unit: str) -> None:
    """Hardened like the van's unit; the service account; secrets only from files outside the repo."""
    d = _directives((UNITS / unit).read_text())
    assert d["User"] == ["datalab"] and d["Group"] == ["datalab"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("RestrictSUIDSGID", "yes"),
                       ("CapabilityBoundingSet", ""), ("SystemCallFilter", "@system-service")):
        assert d[key] == [value], (key, d.get(key))
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    exec_start = d["ExecStart"][0]
    assert exec_start.startswith("/opt/datalab-edge/venv/bin/datalab-receiver ")
    assert "password" not in exec_start.lower() and "postgresql://" not in exec_start
    if unit != "datalab-receiver@.service":
        assert d["EnvironmentFile"] == ["/etc/datalab/central.env"] and "${DATALAB_STORE}" in exec_start
    long_running = unit not in ("datalab-maps.service", "datalab-retention.service")
    assert (d.get("Restart") == ["always"]) == long_running
    if unit == "datalab-api.service":
        assert "--host 127.0.0.1" in exec_start and "--token-file /etc/datalab/api-token" in exec_start
        assert d["RestartPreventExitStatus"] == ["2"]  # no store (exit 2): no crash loop
    if unit == "datalab-deriver.service":
        assert exec_start.endswith("derive --store ${DATALAB_STORE} --follow")
    if unit == "datalab-receiver@.service":
        assert "--client-id datalab-receiver-%i" in exec_start and "--config /etc/datalab/receiver.toml" in exec_start


def test_map_timer_starts_the_map_build() -> None:
    t = _directives((UNITS / "datalab-maps.timer").read_text())
    assert t["Unit"] == ["datalab-maps.service"] and t["Persistent"] == ["true"] and t["OnCalendar"]
    s = _directives((UNITS / "datalab-maps.service").read_text())
    assert s["Type"] == ["oneshot"] and "aggregate --store ${DATALAB_STORE}" in s["ExecStart"][0]


def test_retention_timer_applies_the_policy_after_the_map_build() -> None:
    """v17 finding 4: an installed centre drops raw positions (docs/privacy.md), after the night's build."""
    t = _directives((UNITS / "datalab-retention.timer").read_text())
    assert t["Unit"] == ["datalab-retention.service"] and t["Persistent"] == ["true"]
    assert t["WantedBy"] == ["timers.target"]
    maps = _directives((UNITS / "datalab-maps.timer").read_text())["OnCalendar"][0]
    hhmm = lambda cal: cal.split()[-1][:5]  # noqa: E731  ("*-*-* 03:15:00" -> "03:15")
    assert hhmm(t["OnCalendar"][0]) > hhmm(maps), (t["OnCalendar"], maps)
    s = _directives((UNITS / "datalab-retention.service").read_text())
    assert s["Type"] == ["oneshot"] and "datalab-maps.service" in s["After"][0]
    assert s["ExecStart"][0].endswith(
        "retention --config /etc/datalab/receiver.toml --store ${DATALAB_STORE} --apply")


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
    # Every address denied but loopback; install-pi's drop-in adds the broker's.
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"]
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


def _network_conf(root: Path) -> Path:
    return root / "etc/systemd/system/datalab-edge.service.d/network.conf"


def _config_with_broker(root: Path, host: str) -> None:
    conf = root / "etc/datalab-edge/agent.toml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f'[device]\nid = "van-7"\n[uplink]\nhost = "{host}"\n'
                    '[sensors.gps]\ndriver = "gpsd"\nhost = "10.1.2.3"\n')


def _allowed(root: Path) -> list[str]:
    return [x.split("=", 1)[1] for x in _network_conf(root).read_text().splitlines()
            if x.startswith("IPAddressAllow=")]


def test_install_allows_the_configured_broker_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = _run("install-pi", "--root", str(root))  # the example: a broker on localhost
    assert r.returncode == 0, r.stdout + r.stderr
    assert _allowed(root) == []  # loopback: the unit's own IPAddressAllow=localhost
    # A technician points the van at the depot's broker: a re-run allows it (and the gpsd host).
    _config_with_broker(root, "192.0.2.7")
    r = _run("install-pi", "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _allowed(root) == ["10.1.2.3", "192.0.2.7"]
    assert "run it again after" in _network_conf(root).read_text()
    assert not list(_network_conf(root).parent.glob("*install-pi*"))  # no staging leftovers
    _config_with_broker(root, "2001:db8::5")
    assert _run("install-pi", "--root", str(root)).returncode == 0
    assert _allowed(root) == ["10.1.2.3", "2001:db8::5"]
    r = _run("uninstall-pi", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert not _network_conf(root).parent.exists()


def test_an_unresolvable_broker_name_stops_the_install_before_any_change(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _config_with_broker(root, "broker.invalid")  # RFC 6761: never resolves
    r = _run("install-pi", "--root", str(root))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot resolve 'broker.invalid'" in r.stderr and "--no-ip-filter" in r.stderr, r.stderr
    assert not (root / "etc/systemd").exists() and not (root / "opt").exists()
    # A broker whose address changes: no filter at all, said in the drop-in.
    r = _run("install-pi", "--root", str(root), "--no-ip-filter")
    assert r.returncode == 0, r.stdout + r.stderr
    text = _network_conf(root).read_text()
    assert "IPAddressDeny=\n" in text and "IPAddressAllow" not in text, text


def test_a_dns_named_broker_allows_its_addresses_and_the_resolvers(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ip_allow", ROOT / "scripts/lib/ip_allow.py")
    assert spec and spec.loader
    ip_allow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ip_allow)
    config = {"uplink": {"host": "broker.example"}}
    resolv = "# NetworkManager\nnameserver 192.168.8.1\nnameserver fe80::1%wlan0\nnameserver 127.0.0.53\n"
    ip_allow.resolve = lambda name: {"broker.example": ["203.0.113.9", "2001:db8::9"]}[name]
    text = ip_allow.dropin(config, resolv)
    allowed = [x.split("=", 1)[1] for x in text.splitlines() if x.startswith("IPAddressAllow=")]
    # 127.0.0.53 is loopback, allowed by the unit already.
    assert allowed == ["192.168.8.1", "203.0.113.9", "2001:db8::9", "fe80::1"], text
    assert "resolved now: broker.example" in text


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
