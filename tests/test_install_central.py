"""scripts/install-central's logic on a fake root with a fake Debian (issue #17.4).

The fake Debian of tests/test_install_pi.py (apt-get, dpkg, useradd, systemctl ... keeping their
state in files and logging every call), plus PostgreSQL's psql run through runuser, and a
systemctl that remembers each unit. The provisioning itself is real: the CA, the broker's
certificate and configuration, the receivers' account and share group are made by
`datalab-receiver provision` as on a server. Checked: the order (slow and fallible steps first),
the secrets (0640, outside the repository, never printed), a re-run changes nothing and re-keys
nothing, and a failure at any step leaves nothing behind.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from receiver.config import load_receiver_config
from tests.test_install_pi import FAKE, FakeDebian

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-central"

# What the centre adds to install-pi's fake: apt-cache, runuser + psql (state in $FAKE_STATE/pg),
# and a systemctl that keeps one file per enabled unit (these arms come first, so they win).
CENTRAL_ARMS = r"""
  apt-cache) [ "${FAKE_POSTGIS:-yes}" = yes ] ;;
  runuser)
    case "$line" in
      *"-tAc SELECT 1 FROM pg_roles"*) [ -e "$S/pg/role" ] && echo 1; true ;;
      *"-tAc SELECT 1 FROM pg_database"*) [ -e "$S/pg/db" ] && echo 1; true ;;
      *"-tAc SELECT 1 FROM pg_available_extensions"*) [ "${FAKE_POSTGIS:-yes}" = yes ] && echo 1; true ;;
      *"CREATE ROLE"*) touch "$S/pg/role" ;;
      *"DROP ROLE"*) rm -f "$S/pg/role" ;;
      *"CREATE DATABASE"*) touch "$S/pg/db" ;;
      *"DROP DATABASE"*) rm -f "$S/pg/db" "$S/pg/postgis" ;;  # the extension lives in the database
      *"CREATE EXTENSION"*) touch "$S/pg/postgis" ;;
    esac ;;
  systemctl)
    case "${args[0]}" in
      is-enabled) [ -e "$S/units/${args[-1]}" ] ;;
      enable) touch "$S/units/${args[1]}" ;;
      disable) rm -f "$S/units/${args[1]}" ;;
    esac ;;"""
FAKE_CENTRAL = FAKE.replace('case "$name" in', 'case "$name" in' + CENTRAL_ARMS, 1)
PSQL = "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1"


class FakeCentre(FakeDebian):
    def __init__(self, base: Path) -> None:
        super().__init__(base, groups=())
        fake = self.bin / "fake-central"
        fake.write_text(FAKE_CENTRAL)
        fake.chmod(0o755)
        for d in ("pg", "units"):
            (self.state / d).mkdir()
        for name in ("apt-cache", "runuser", "systemctl"):
            (self.bin / name).unlink(missing_ok=True)
            (self.bin / name).symlink_to(fake)
        # Debian's own broker configuration, which the install keeps aside.
        (self.root / "etc/mosquitto").mkdir(parents=True)
        (self.root / "etc/mosquitto/mosquitto.conf").write_text("# Debian's\ninclude_dir /etc/mosquitto/conf.d\n")

    def cmd(self, *args: str, arch: str | None = None) -> list[str]:  # arch: the van's; the centre has none
        return ["bash", str(SCRIPT), "--root", str(self.root), "--system", "--broker-name", "mqtt.example.org",
                "--public-url", "https://datalab.example.org", *args]

    def centre(self) -> dict[str, list[str]]:
        return {k: sorted(p.name for p in (self.state / k).iterdir()) if (self.state / k).exists() else []
                for k in ("pkgs", "users", "pg", "units")}


@pytest.fixture
def centre(tmp_path: Path) -> FakeCentre:
    return FakeCentre(tmp_path)


def _secrets(centre: FakeCentre) -> list[str]:
    rx = tomllib.loads((centre.root / "etc/datalab/receiver.toml").read_text())["receiver"]
    token = (centre.root / "etc/datalab/api-token").read_text().strip()
    return [rx["password"], rx["share_group"], token]


def test_fresh_debian_gets_the_whole_centre_in_order(centre: FakeCentre) -> None:
    r = centre.install("--workers", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    log = centre.log()
    first = lambda prefix: next(i for i, ln in enumerate(log) if ln.startswith(prefix))  # noqa: E731
    assert first("apt-get install") < first("python -m pip") < first("useradd") < first("runuser -u postgres")
    assert first(f"{PSQL} -c CREATE ROLE datalab LOGIN") \
        < first("runuser -u datalab") < first("systemctl enable")
    apt = next(ln for ln in log if ln.startswith("apt-get install")).split()
    assert {"mosquitto", "openssl", "postgresql", "postgresql-postgis", "python3-venv"} <= set(apt)
    assert centre.centre() == {
        "pkgs": ["mosquitto", "openssl", "postgresql", "postgresql-postgis", "python3-venv"],
        "users": ["datalab"], "pg": ["db", "postgis", "role"],
        "units": ["datalab-api.service", "datalab-deriver.service", "datalab-maps.timer",
                  "datalab-receiver@1.service", "datalab-receiver@2.service", "datalab-receiver@3.service",
                  "datalab-retention.timer", "mosquitto.service"]}
    venv = centre.root / "opt/datalab-edge/venv"
    assert (venv / "installed").read_text().strip() == f"{ROOT}[central]"
    for u in ("datalab-receiver@.service", "datalab-deriver.service", "datalab-api.service",
              "datalab-maps.service", "datalab-maps.timer", "datalab-retention.service",
              "datalab-retention.timer"):
        assert (centre.root / "etc/systemd/system" / u).read_text() == (ROOT / "systemd" / u).read_text()
    etc = centre.root / "etc/datalab"
    assert oct(etc.stat().st_mode & 0o777) == "0o750"
    for name in ("receiver.toml", "api-token"):
        assert oct((etc / name).stat().st_mode & 0o777) == "0o640", name
    assert oct((etc / "ca").stat().st_mode & 0o777) == "0o700"
    # The receiver's config loads as the workers load it, and names what the install made.
    cfg = load_receiver_config(etc / "receiver.toml")
    assert cfg.store == "postgresql://datalab@/datalab?host=/var/run/postgresql"
    assert (cfg.host, cfg.port, cfg.tls, cfg.username, cfg.derive) == ("127.0.0.1", 8885, True,
                                                                        "datalab-receiver", "separate")
    assert cfg.ca_file == "/etc/datalab/broker-ca.crt" and (etc / "broker-ca.crt").exists()
    assert re.fullmatch(r"ingest-[0-9a-f]{32}", cfg.share_group)
    env = (etc / "central.env").read_text()
    assert f"DATALAB_STORE={cfg.store}\n" in env and "DATALAB_PUBLIC_URL=https://datalab.example.org" in env
    # The broker: our configuration, Debian's kept, the ACL, the receivers' account (hashed).
    mq = centre.root / "etc/mosquitto"
    assert "DataLab broker" in (mq / "mosquitto.conf").read_text()
    assert "password_file /etc/mosquitto/datalab/receivers.passwd" in (mq / "mosquitto.conf").read_text()
    assert (mq / "mosquitto.conf.dist").read_text().startswith("# Debian's")
    assert (mq / "datalab/acl").read_text() == (ROOT / "receiver/broker/acl").read_text()
    assert (mq / "datalab/receivers.passwd").read_text().startswith("datalab-receiver:$7$")
    assert "mqtt.example.org" in subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                                                 str(mq / "datalab/server.crt")], capture_output=True,
                                                text=True).stdout
    # Secrets are never printed, nor left anywhere in the repository.
    for secret in _secrets(centre):
        assert secret not in r.stdout + r.stderr
        assert secret not in "\n".join(log)
    assert not [p for p in centre.root.rglob("*install-central-*")], "no staging file left"


def test_a_second_run_changes_nothing_and_rekeys_nothing(centre: FakeCentre) -> None:
    assert centre.install().returncode == 0
    before, secrets = centre.tree(), _secrets(centre)
    r = centre.install()
    assert r.returncode == 0, r.stdout + r.stderr
    assert centre.tree() == before
    assert _secrets(centre) == secrets
    assert "keeping existing" in r.stdout
    log = centre.log()
    for step in ("apt-get install", "python -m pip", "useradd", f"{PSQL} -c",
                 "systemctl enable"):
        assert not any(ln.startswith(step) for ln in log), (step, log)


@pytest.mark.parametrize("fail_at", [
    "python -m pip",                                  # the program cannot be installed
    f"{PSQL} -c CREATE DATABASE",                    # after the role was made
    "runuser -u datalab",                             # the store cannot be created
    "systemctl enable datalab-api.service",           # after other units were enabled
])
def test_a_failure_leaves_nothing(centre: FakeCentre, fail_at: str) -> None:
    before = centre.tree()
    r = centre.install(FAKE_FAIL=fail_at)
    assert r.returncode != 0, r.stdout
    assert "rolling back" in r.stdout or fail_at == "python -m pip"
    assert centre.tree() == before, "the fake root has leftovers"
    assert centre.centre()["users"] == [] and centre.centre()["pg"] == [] and centre.centre()["units"] == []
    # ... and the next run, without the failure, installs everything.
    r = centre.install()
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(centre.centre()["units"]) == 7  # mosquitto, 2 workers, deriver, api, maps and retention timers


def test_sqlite_and_no_postgis(centre: FakeCentre) -> None:
    r = centre.install("--sqlite", FAKE_POSTGIS="no")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "postgresql" not in centre.centre()["pkgs"] and centre.centre()["pg"] == []
    cfg = load_receiver_config(centre.root / "etc/datalab/receiver.toml")
    assert cfg.store == "/var/lib/datalab/datalab.sqlite"
    assert any(ln.startswith("runuser -u datalab") and "init --store /var/lib/datalab/datalab.sqlite" in ln
               for ln in centre.log())


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--root", str(root), "--system", "--broker-name", "x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "would run:" in r.stdout
    assert not any(p.is_file() for p in root.rglob("*"))
