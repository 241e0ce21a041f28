"""Read commands never create a store; a missing one is one line and exit code 2 (issue 17.3).

Every read command of ``datalab-receiver`` is run against the four ways a ``--store`` path
goes wrong (a missing file, a missing folder, a folder given as the store, a file that is
not SQLite) and must stop with exit code 2, a single line naming the path, and nothing new
on disk. A PostgreSQL URL that cannot be reached says so without its password.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from receiver.cli import main as receiver_cli
from receiver.store_check import safe_url
from tests.pg import pg_cluster, pg_dsn  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

READ_COMMANDS: dict[str, list[str]] = {
    "stats": ["stats"],
    "derive": ["derive"],
    "aggregate": ["aggregate", "--scheme", "h3:10"],
    "export-aggregates": ["export", "aggregates"],
    "export-measurements": ["export", "measurements"],
    "serve": ["serve", "--port", "0"],
    "retention": ["retention", "--dry-run"],  # v17 finding 7: the same check as the others
    "migrate": ["migrate"],
}


def _missing_file(tmp: Path) -> Path:
    return tmp / "datalab.sqlite"


def _missing_folder(tmp: Path) -> Path:
    return tmp / "no" / "such" / "folder" / "datalab.sqlite"


def _a_folder(tmp: Path) -> Path:
    (tmp / "store.d").mkdir()
    return tmp / "store.d"


def _not_sqlite(tmp: Path) -> Path:
    p = tmp / "notes.sqlite"
    p.write_text("these are my notes, not a database\n" * 20)
    return p


def _sqlite_but_not_ours(tmp: Path) -> Path:
    import sqlite3

    p = tmp / "other.sqlite"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE t (x)")
    return p


def _a_samples_table_only(tmp: Path) -> Path:
    """v17 finding 6: a table named samples (in WAL mode) is not the store's marker."""
    import sqlite3

    p = tmp / "w.sqlite"
    c = sqlite3.connect(p)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE samples (x)")
    c.close()
    return p


def _a_fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "fifo.sqlite")  # reading its header would wait for a writer for ever
    return tmp / "fifo.sqlite"


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing-file": (_missing_file, "no such file"),
    "missing-folder": (_missing_folder, "does not exist"),
    "a-folder": (_a_folder, "is a folder"),
    "not-sqlite": (_not_sqlite, "not a SQLite database"),
    "other-sqlite": (_sqlite_but_not_ours, "not a DataLab store"),
    "samples-table-only": (_a_samples_table_only, "not a DataLab store"),
    "fifo": (_a_fifo, "not a regular file"),
}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, int(p.stat().st_mtime_ns)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", list(READ_COMMANDS))
def test_read_command_on_a_bad_store_path(tmp_path: Path, command: str, case: str) -> None:
    make, says = CASES[case]
    store = make(tmp_path)
    before = _tree(tmp_path)
    r = CliRunner().invoke(receiver_cli, [*READ_COMMANDS[command], "--store", str(store)])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.output, r.exception)
    assert len(lines) == 1, lines
    assert f"no store at {store}" in lines[0] and says in lines[0], lines[0]
    assert _tree(tmp_path) == before, "the command touched the disk"


def test_one_line_on_stderr_and_no_traceback_from_the_real_program(tmp_path: Path) -> None:
    store = _missing_folder(tmp_path)
    p = subprocess.run([sys.executable, "-m", "receiver.cli", "aggregate", "--store", str(store)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"Error: no store at {store}: the folder {store.parent} does not exist; "
                                             "create one with `datalab-receiver init --store ...` or let "
                                             "`datalab-receiver run` make it"]
    assert not (tmp_path / "no").exists()


def test_init_creates_and_then_every_read_command_accepts_it(tmp_path: Path) -> None:
    store = tmp_path / "new" / "datalab.sqlite"
    r = CliRunner().invoke(receiver_cli, ["init", "--store", str(store)])
    assert r.exit_code == 0 and store.is_file(), r.output
    r = CliRunner().invoke(receiver_cli, ["stats", "--store", str(store)])
    assert r.exit_code == 0 and "derive_backlog" in r.output, r.output
    r = CliRunner().invoke(receiver_cli, ["export", "aggregates", "--store", str(store)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(receiver_cli, ["init", "--store", str(store)])  # kept, not replaced
    assert r.exit_code == 0


def test_derive_follow_waits_for_the_store_without_creating_it(tmp_path: Path) -> None:
    store = tmp_path / "datalab.sqlite"
    p = subprocess.Popen([sys.executable, "-m", "receiver.cli", "derive", "--store", str(store), "--follow",
                          "--interval", "0.2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(10):  # five seconds of waiting are enough to see it wait
            if p.poll() is not None or store.exists():
                break
            time.sleep(0.5)
        assert p.poll() is None, "derive --follow gave up on a store that is not there yet"
        assert not store.exists(), "derive --follow created the store"
        assert CliRunner().invoke(receiver_cli, ["init", "--store", str(store)]).exit_code == 0
        time.sleep(3)
        assert p.poll() is None
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "waiting for the store: no store at" in err
    assert "derived 0 batches" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_postgres_is_one_line_without_the_password() -> None:
    url = f"postgresql://datalab:Sup3rS3cretPw@127.0.0.1:{_free_port()}/datalab?sslmode=disable"
    for cmd in ("derive", "aggregate", "serve"):
        r = CliRunner().invoke(receiver_cli, [cmd, "--store", url])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (cmd, r.output, r.exception)
        assert "cannot reach the store at postgresql://datalab:***@127.0.0.1" in lines[0], lines[0]
        assert "Sup3rS3cretPw" not in r.output


def test_a_conninfo_store_is_postgres_and_never_printed_with_its_password() -> None:
    """v17 finding 5: ``host=... password=...`` was taken for a SQLite path and echoed whole."""
    from receiver.store_factory import is_postgres_url

    conninfo = f"host=127.0.0.1 port={_free_port()} dbname=datalab user=datalab password=Sup3rS3cretPw"
    assert is_postgres_url(conninfo) and not is_postgres_url("/srv/host=1/datalab.sqlite")
    for cmd in ("stats", "derive", "aggregate", "serve", "retention", "migrate"):
        r = CliRunner().invoke(receiver_cli, [cmd, "--store", conninfo, *(["--timeout-s", "2"] if cmd == "stats"
                                                                            else [])])
        assert "Sup3rS3cretPw" not in r.output, (cmd, r.output)
        assert r.exit_code in (1, 2) and "password=***" in r.output, (cmd, r.output, r.exception)
        assert r.exception is None or isinstance(r.exception, SystemExit), (cmd, r.exception)


def test_stats_reports_an_unreachable_postgres_as_an_outage_without_the_password() -> None:
    url = f"postgresql://datalab:Sup3rS3cretPw@127.0.0.1:{_free_port()}/datalab"
    r = CliRunner().invoke(receiver_cli, ["stats", "--store", url, "--timeout-s", "2"])
    assert r.exit_code == 1 and "store: does not answer now" in r.output, (r.output, r.exception)
    assert "Sup3rS3cretPw" not in r.output and "datalab:***@127.0.0.1" in r.output


def test_a_postgres_database_without_the_store_is_refused(pg_dsn: str) -> None:  # noqa: F811
    import psycopg

    r = CliRunner().invoke(receiver_cli, ["stats", "--store", pg_dsn])
    assert r.exit_code == 2 and "no datalab.samples table" in r.output, (r.output, r.exception)
    with psycopg.connect(pg_dsn) as c:  # stats made nothing: no schema, no table
        assert c.execute("SELECT to_regnamespace('datalab')").fetchone()[0] is None
    r = CliRunner().invoke(receiver_cli, ["export", "aggregates", "--store", pg_dsn])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "no datalab.samples table" in r.output
    assert CliRunner().invoke(receiver_cli, ["init", "--store", pg_dsn]).exit_code == 0
    r = CliRunner().invoke(receiver_cli, ["export", "aggregates", "--store", pg_dsn])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
    ("postgres://u@h:5433/db?password=pw&sslmode=require", "postgres://u@h:5433/db?password=***&sslmode=require"),
    ("/var/lib/datalab/x.sqlite", "/var/lib/datalab/x.sqlite"),
    # v17 finding 5: sslpassword in a URL, a libpq conninfo's password and sslpassword (quoted too)
    ("postgresql://u@h/db?sslpassword=pw&sslmode=require", "postgresql://u@h/db?sslpassword=***&sslmode=require"),
    ("host=h dbname=db user=u password=pw port=1", "host=h dbname=db user=u password=*** port=1"),
    ("host=h password='p w\\' x' sslpassword=pw", "host=h password=*** sslpassword=***"),
])
def test_safe_url_hides_passwords(url: str, shown: str) -> None:
    assert safe_url(url) == shown
    assert "pw" not in safe_url(url).replace("password", "")
