"""Several receiver workers opening one new SQLite store at the same moment all come up."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path


def _open(path: str, go: "mp.synchronize.Event", out: "mp.Queue[str]") -> None:
    from receiver.store import SQLiteStore

    go.wait()
    try:
        s = SQLiteStore(path)
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.close()
        out.put("ok")
    except Exception as exc:  # report, do not hang the parent
        out.put(repr(exc))


def test_workers_creating_the_schema_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    for round_ in range(5):  # the race was narrow: several rounds, six workers each
        path = str(tmp_path / f"store{round_}.sqlite")
        go, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(path, go, out)) for _ in range(6)]
        for p in procs:
            p.start()
        go.set()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
        assert results == ["ok"] * 6, results


def test_the_store_commits_durably_before_anything_is_acknowledged(tmp_path: Path) -> None:
    """The receiver acks a batch after its commit and the van then deletes it: the commit must be
    fsynced (synchronous=FULL in WAL mode), not left to the next checkpoint (NORMAL)."""
    from receiver.store import SQLiteStore

    s = SQLiteStore(tmp_path / "store.sqlite")
    try:
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        s.close()


def test_another_process_closing_its_connection_does_not_take_our_wal(tmp_path: Path) -> None:
    """Commits after another process opened and closed the store (`stats`, the API, a backup)
    are seen by a fresh reader and survive. Opening the database file with a descriptor of our
    own (the schema lock once did) drops SQLite's POSIX locks: the other process then believed
    it was the last user, checkpointed, and deleted the receiver's live WAL."""
    import subprocess
    import sys

    from receiver.store import SQLiteStore

    path = tmp_path / "store.sqlite"
    s = SQLiteStore(path)
    try:
        s.conn.execute("CREATE TABLE probe (x INTEGER)")
        s.conn.execute("INSERT INTO probe VALUES (1)")
        count = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
                 " print(c.execute('SELECT count(*) FROM probe').fetchone()[0]); c.close()")
        first = subprocess.run([sys.executable, "-c", count, str(path)], capture_output=True, text=True,
                               check=True).stdout.strip()
        for i in range(5):
            s.conn.execute("INSERT INTO probe VALUES (?)", (i + 2,))
        assert (tmp_path / "store.sqlite-wal").exists(), "the live WAL was deleted under the store"
        after = subprocess.run([sys.executable, "-c", count, str(path)], capture_output=True, text=True,
                               check=True).stdout.strip()
        print(f"rows seen by another process: {first} before, {after} after 5 more commits")
        assert (first, after) == ("1", "6")
    finally:
        s.close()
