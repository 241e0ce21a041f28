"""v17 attack on #17.3: commands that read a store never create one; a missing/bad store is one
line naming it, exit code 2; secrets never printed.

Runs the installed `datalab-receiver` program (the user's entry point) in a fresh cwd; my oracle
is the file tree before/after (os.walk, lstat), the exit status and the raw stderr bytes.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

PROG = str(Path(sys.executable).with_name("datalab-receiver"))
SECRET = "S3cr3tPw_v17"

READERS = {
    "stats": ["stats"],
    "derive": ["derive"],
    "aggregate": ["aggregate", "--scheme", "h3:10"],
    "export-agg": ["export", "aggregates"],
    "export-meas": ["export", "measurements"],
    "serve": ["serve", "--port", "0"],
    "retention": ["retention", "--dry-run"],
    "migrate": ["migrate"],
}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(d) / n
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_size, st.st_mode)
    return out


def _run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PROG, *args], cwd=cwd, capture_output=True, timeout=timeout)


def _mk(case: str, tmp: Path) -> str:
    if case == "conninfo-with-password":
        return f"host=127.0.0.1 port=1 dbname=datalab user=datalab password={SECRET} connect_timeout=2"
    if case == "url-sslpassword":
        return f"postgresql://datalab@127.0.0.1:1/datalab?connect_timeout=2&sslpassword={SECRET}"
    if case == "url-pct-encoded-password":
        enc = "".join(f"%{b:02X}" for b in SECRET.encode())
        return f"postgresql://datalab:{enc}@127.0.0.1:1/datalab?connect_timeout=2"
    if case == "dangling-symlink":
        os.symlink(tmp / "target" / "real.sqlite", tmp / "link.sqlite")
        (tmp / "target").mkdir()
        return str(tmp / "link.sqlite")
    if case == "empty-file":
        (tmp / "empty.sqlite").write_bytes(b"")
        return str(tmp / "empty.sqlite")
    if case == "trailing-slash":
        return str(tmp / "store.sqlite") + "/"
    if case == "non-utf8":
        return os.fsdecode(bytes(tmp) + b"/st\xffre.sqlite")
    if case == "fifo":
        os.mkfifo(tmp / "fifo.sqlite")
        return str(tmp / "fifo.sqlite")
    if case == "dev-null":
        return "/dev/null"
    if case == "memory":
        return ":memory:"
    if case == "file-uri":
        return f"file:{tmp}/uri.sqlite?mode=rwc"
    if case == "wal-only":
        p = tmp / "w.sqlite"
        c = sqlite3.connect(p)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE samples (x)")
        c.close()
        return str(p)
    raise KeyError(case)


CASES = ["conninfo-with-password", "url-sslpassword", "url-pct-encoded-password", "dangling-symlink",
         "empty-file", "trailing-slash", "non-utf8", "fifo", "dev-null", "memory", "file-uri", "wal-only"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cmd", list(READERS))
def test_reader_on_bad_store(tmp_path: Path, cmd: str, case: str) -> None:
    work = tmp_path / "w"
    work.mkdir()
    store = _mk(case, work)
    before = _tree(work)
    try:
        r = _run([*READERS[cmd], "--store", store], cwd=work, timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cmd} on {case}: hung for 40 s")
    after = _tree(work)
    err = r.stderr.decode(errors="replace")
    out = r.stdout.decode(errors="replace")
    both = err + out
    problems = []
    if r.returncode != 2:
        problems.append(f"exit {r.returncode}")
    if "Traceback" in both:
        problems.append("traceback")
    if SECRET in both or SECRET.lower() in both.lower():
        problems.append("SECRET PRINTED")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    if after != before:
        problems.append(f"tree changed: +{sorted(set(after) - set(before))} "
                        f"~{sorted(k for k in before if k in after and after[k] != before[k])}")
    assert not problems, f"{cmd} {case}: {problems}\nstdout={out[-600:]!r}\nstderr={err[-900:]!r}"
