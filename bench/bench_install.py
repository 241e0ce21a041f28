"""The van's install: size on the card, the agent's import time and RSS at start (issue #16.2).

Two virtual environments built from this tree, as ``scripts/install-pi`` builds them (not
editable, from the registry):

* ``device``: what a van without the I2S microphone installs now (``.[device]``);
* baseline ``all``: ``.[device,central,sim]``, the same packages as the flat dependency list
  every van installed before the split (amqtt, h3, psycopg, orjson, waitress, sqlite-utils ...).
  ``mic`` (pyalsaaudio, built from source) is left out of both: a microphone van adds it either way.

Rows: the venv's bytes on disk, its distributions, and for the agent in each venv the time to
import what ``edge run`` imports before it builds the van (``edge.cli``, ``edge.runtime``), and
the process's RSS then (median of several fresh processes, run outside the source tree so the
venv's copy is imported). The venvs are kept in ``$BENCH_INSTALL_DIR`` (default
``~/.cache/datalab-edge/bench-install``) keyed by pyproject.toml and every file of the packages
installed (a real install copies the code: a key of pyproject.toml alone measured stale code
after any change), so only the first run after a change pays for pip (a few minutes on a loaded
machine; the cached runs take seconds).

    python bench/bench_install.py
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"device": "device", "all": "device,central,sim"}
PACKAGES = ("core", "edge", "drivers", "buffer", "uplink", "receiver", "simulator")  # pyproject.toml packages.find
CENTRAL_ONLY = ("amqtt", "h3", "psycopg", "psycopg-binary", "orjson", "waitress", "sqlite-utils")
RUNS = 9

# Run inside the venv: import what `edge run` imports, then report time and memory.
PROBE = """
import time
t = time.perf_counter()
import edge.cli, edge.runtime
ms = (time.perf_counter() - t) * 1e3
rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:'))
print(ms, rss / 1024)
"""


def cache_dir() -> Path:
    return Path(os.environ.get("BENCH_INSTALL_DIR") or Path.home() / ".cache/datalab-edge/bench-install")


def tree_key(extras: str) -> str:
    """A digest of what ``pip install <tree>[extras]`` installs: pyproject.toml, the extras, and
    every file (path and bytes) of the packages it finds (pyproject's packages.find include)."""
    h = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode())
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def venv_for(extras: str) -> tuple[Path, float | None]:
    """The venv with ``.[extras]`` (built if not cached), and the seconds pip took (None: cached)."""
    name = extras.replace(",", "+")
    venv = cache_dir() / f"{name}-{tree_key(extras)}"
    if (venv / ".complete").exists():
        return venv, None
    # Superseded venvs are left alone: another checkout sharing the cache may be using one.
    if venv.exists():
        subprocess.run(["rm", "-rf", str(venv)], check=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", f"{ROOT}[{extras}]"], check=True)
    (venv / ".complete").touch()
    return venv, time.monotonic() - t


def disk_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def distributions(venv: Path) -> list[str]:
    out = subprocess.run([str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    names = [ln.split("==")[0].lower() for ln in out.splitlines() if "==" in ln]
    return [n for n in names if n not in ("pip", "setuptools", "datalab-edge")]


def probe(venvs: dict[str, Path]) -> dict[str, tuple[float, float]]:
    """Median import ms and RSS MiB of the agent in each venv, the venvs taken in turns.

    In turns so that the load of a shared machine falls on both alike.
    """
    ms: dict[str, list[float]] = {n: [] for n in venvs}
    mib: dict[str, list[float]] = {n: [] for n in venvs}
    with tempfile.TemporaryDirectory() as cwd:  # not the source tree: the venv's copy
        for _ in range(RUNS):
            for name, venv in venvs.items():
                out = subprocess.run([str(venv / "bin/python"), "-c", PROBE], capture_output=True, text=True,
                                     check=True, cwd=cwd).stdout.split()  # fmt: skip
                ms[name].append(float(out[0]))
                mib[name].append(float(out[1]))
    return {n: (statistics.median(ms[n]), statistics.median(mib[n])) for n in venvs}


def run() -> list[dict]:
    got = {}
    for name, extras in VARIANTS.items():
        venv, built_s = venv_for(extras)
        got[name] = {"venv": venv, "mb": disk_bytes(venv) / 1e6, "dists": distributions(venv), "built_s": built_s}
    for name, figures in probe({n: g["venv"] for n, g in got.items()}).items():
        got[name]["probe"] = figures
    d, a = got["device"], got["all"]
    central = sorted(n for n in d["dists"] if n in CENTRAL_ONLY)

    def row(name: str, value: float | int, unit: str, base: float | int, note: str = "") -> dict:
        return {"name": name, "value": value, "unit": unit, "baseline": base, "baseline_name": "all-in, as before",
                "note": note}

    rows = [
        row("install.venv_mb", round(d["mb"], 1), "MB on disk", round(a["mb"], 1),
            ".[device] vs .[device,central,sim]"),
        row("install.distributions", len(d["dists"]), "packages", len(a["dists"]),
            f"centre's on the van: {', '.join(central) or 'none'}"),
        row("install.agent_import_ms", round(d["probe"][0]), "ms", round(a["probe"][0]),
            f"import edge.cli + edge.runtime, median of {RUNS}"),
        row("install.agent_rss_mb", round(d["probe"][1], 1), "MiB", round(a["probe"][1], 1), "RSS after those imports"),
    ]
    for name in VARIANTS:
        if got[name]["built_s"] is not None:
            rows.append({"name": f"install.pip_{name}_s", "value": round(got[name]["built_s"]), "unit": "s",
                         "note": "pip install on this machine (wheel cache warm or not)"})
    return rows


def main() -> None:
    from bench import print_table

    print_table(run())
    print(f"\nbaseline column: the same measure in a venv with every extra but mic (before the split). "
          f"venvs cached in {cache_dir()}")


if __name__ == "__main__":
    main()
