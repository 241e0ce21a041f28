"""Issue 16 re-test: on a van install (.[device]) `datalab-receiver` died on `import orjson` with a
traceback. Each console script, run as its entry point runs it with one of its extra's packages
gone, says in one line what to install and exits 2; with the packages present it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

# (console script's module, a package of its extra, the line)
CASES = [
    ("receiver.cli", "orjson", "the centre's packages are not installed: pip install 'datalab-edge[central]'"),
    ("receiver.cli", "sqlite_utils", "the centre's packages are not installed: pip install 'datalab-edge[central]'"),
    ("simulator.cli", "amqtt", "the simulator's packages are not installed: pip install 'datalab-edge[sim]'"),
    ("simulator.cli", "orjson", "the simulator's packages are not installed: pip install 'datalab-edge[sim]'"),
]


def _script(module: str, blocked: str | None) -> subprocess.CompletedProcess[str]:
    # sys.modules[name] = None is how Python marks a module that cannot be imported: the same
    # ModuleNotFoundError as a package never installed.
    block = f"sys.modules[{blocked!r}] = None; " if blocked else ""
    code = f"import sys; {block}from {module} import main; sys.exit(main(['--help']))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module, blocked, line", CASES, ids=[f"{m}-{b}" for m, b, _ in CASES])
def test_a_script_without_its_extra_names_the_install(module: str, blocked: str, line: str) -> None:
    p = _script(module, blocked)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip() == line and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("module", ["receiver.cli", "simulator.cli"])
def test_a_script_with_its_extra_runs(module: str) -> None:
    p = _script(module, None)
    assert p.returncode == 0 and "Usage" in p.stdout, p.stderr[-2000:]
