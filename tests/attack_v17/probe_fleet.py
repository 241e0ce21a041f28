"""v17 attack on #17.6: `datalab-sim fleet` keeps an existing store across runs (my oracle: row
counts per epoch read with sqlite3), a receiver URL's password never reaches the console, and the
default map build says why nothing was published."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

SIM = str(Path(sys.executable).with_name("datalab-sim"))
RCV = str(Path(sys.executable).with_name("datalab-receiver"))


def _fleet(out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SIM, "fleet", "--vans", "1", "--hours", "0.01", "--devices", "values",
                           "--microphones", "0", "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=timeout)


def test_two_runs_keep_the_store_and_default_build_says_why(tmp_path: Path) -> None:
    out = tmp_path / "fl"
    for seed in ("1", "2"):
        assert _fleet(out, "--seed", seed).returncode == 0
    c = sqlite3.connect(out / "datalab.sqlite")
    per_epoch = c.execute("select epoch, count(*) from samples group by epoch").fetchall()
    assert len(per_epoch) == 2 and all(n > 0 for _, n in per_epoch), per_epoch
    r = subprocess.run([RCV, "aggregate", "--store", str(out / "datalab.sqlite")], capture_output=True, text=True)
    assert r.returncode == 0 and "0 published" in r.stdout and "met the publishing rule" in r.stdout, r.stdout


def test_unreachable_receiver_url_hides_password(tmp_path: Path) -> None:
    try:
        r = _fleet(tmp_path / "fu", "--receiver-url", "mqtt://van:Pw_v17_SECRET@127.0.0.1:1", timeout=90)
        out = r.stdout + r.stderr
        ended = True
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() + (e.stderr or b"").decode() if isinstance(e.stdout, bytes) else str(e.output)
        ended = False
    assert "Pw_v17_SECRET" not in out
    print("ended within 90 s:", ended, "console:", out[-300:])
