"""A throwaway PostgreSQL cluster for tests and benchmarks (not a test module).

Test modules import the fixtures by name::

    from tests.pg import pg_cluster, pg_dsn  # noqa: F401

* ``pg_cluster`` (session): ``initdb`` in a fresh temporary folder and a
  ``postgres`` on a free loopback port, its unix socket in that folder too, so
  it never meets a system cluster. One cluster per test session, however many
  modules import the fixture (a module-level reference count starts and stops
  it), stopped and deleted at the end.
* ``pg_dsn`` (function): a fresh database per test, dropped afterwards. It is
  cloned from a template that already has PostGIS when the server has it
  (creating the extension costs about a second per database).

PostgreSQL refuses to run as root. CI runs as root, so then the server runs as
the ``postgres`` OS user (the Debian package creates it; failing that, a
system user ``datalab-pg`` is created) through ``runuser``, and the temporary
folder is handed to that user. The tests connect over TCP to 127.0.0.1 with
``trust`` authentication: nothing but this machine can reach it.

Missing PostgreSQL binaries make the fixture *fail*, never skip: the project
promises tests against a real server, and ``scripts/test`` installs it.

Durability is switched off (fsync, synchronous_commit, full_page_writes): a
test cluster is thrown away anyway, and it makes CREATE DATABASE quick.
"""

from __future__ import annotations

import atexit
import glob
import os
import signal
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found: run scripts/test, "
    "which installs them (scripts/pg-install), or install the Debian package postgresql"
)
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
TEMPLATE_DB = "datalab_template"


class PostgresMissing(RuntimeError):
    pass


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl live: ``$PG_BINDIR``, ``pg_config --bindir``, newest Debian version."""
    candidates: list[str] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass

    def version(p: str) -> float:
        try:
            return float(Path(p).parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for c in candidates:
        if c and all((Path(c) / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> str | None:
    """The OS user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "datalab-pg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "datalab-pg"],
        check=True, capture_output=True,
    )
    return "datalab-pg"


class PgCluster:
    """One temporary cluster. ``start()``, ``create_database()``, ``stop()``."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresMissing(INSTALL_HINT)
        self.bindir = bindir
        self.settings = dict(FAST_SETTINGS if settings is None else settings)
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="datalab-pg-"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.sockdir.mkdir()
        self.log = self.root / "postgres.log"
        if self.user:
            pw = pwd.getpwnam(self.user)
            for p in (self.root, self.sockdir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.port = 0
        self.running = False
        self.postgis = False

    def _as_server_user(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else args

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            self._as_server_user(args), capture_output=True, text=True, timeout=timeout,
            cwd=self.root,  # the server user may not be able to enter our cwd
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out

    def start(self) -> PgCluster:
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--locale=C.UTF-8" if _has_c_utf8() else "--locale=C", "--no-sync"])
        last = ""
        for _ in range(5):  # the free port may be taken between our probe and the bind
            self.port = _free_port()
            try:
                self._pg_ctl_start()
                self.running = True
                break
            except RuntimeError as exc:
                last = f"{exc}\n{self.log.read_text(errors='replace') if self.log.exists() else ''}"
        else:
            raise RuntimeError(f"postgres would not start:\n{last}")
        atexit.register(self.stop)  # also when the session dies before its teardown
        self._make_template()
        return self

    def _pg_ctl_start(self) -> None:
        opts = [f"-p {self.port}", f"-k {self.sockdir}", "-c listen_addresses=127.0.0.1"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                   "-w", "-t", "60", "-o", " ".join(opts), "start"])

    def pause(self) -> None:
        """Stop the server but keep its data and port (a store outage); ``resume()`` starts it again."""
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def resume(self) -> None:
        self._pg_ctl_start()

    def _server_pids(self) -> list[int]:
        """The postmaster (first line of postmaster.pid) and its children."""
        pm = int((self.data / "postmaster.pid").read_text().split()[0])
        kids = subprocess.run(["pgrep", "-P", str(pm)], capture_output=True, text=True).stdout.split()
        return [pm, *map(int, kids)]

    def freeze(self) -> None:
        """SIGSTOP the whole server: sockets stay open, nothing answers (a hung host); ``thaw()``."""
        for pid in self._server_pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._server_pids():
            os.kill(pid, signal.SIGCONT)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, *statements: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as c:
            for s in statements:
                c.execute(s)  # type: ignore[arg-type]

    def _make_template(self) -> None:
        """A template database with PostGIS already enabled, when the server has it."""
        import psycopg

        self._admin(f"CREATE DATABASE {TEMPLATE_DB}")
        with psycopg.connect(self.dsn(TEMPLATE_DB), autocommit=True) as c:
            if c.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'").fetchone():
                c.execute("CREATE EXTENSION postgis")
                self.postgis = True

    def create_database(self, name: str | None = None, *, template: str = TEMPLATE_DB) -> str:
        """A new empty database (PostGIS enabled if available); its DSN."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.running:
            self.running = False
            try:
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
            except (RuntimeError, subprocess.SubprocessError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _has_c_utf8() -> bool:
    out = subprocess.run(["locale", "-a"], capture_output=True, text=True)
    return any(x.lower() in ("c.utf8", "c.utf-8") for x in out.stdout.split())


# -- pytest fixtures ------------------------------------------------------------------

_shared: PgCluster | None = None
_users = 0


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's PostgreSQL cluster (shared by every module that imports this fixture)."""
    global _shared, _users
    if _shared is None:
        try:
            _shared = PgCluster().start()
        except PostgresMissing as exc:
            pytest.fail(str(exc), pytrace=False)
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.stop()
            _shared = None


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = pg_cluster.create_database(name)
    yield dsn
    pg_cluster.drop_database(name)
