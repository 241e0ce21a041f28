"""The extras of pyproject.toml cover what each side imports (issue #16.2).

A static scan of every import (lazy ones inside functions too) of the van's packages must be
served by the base and the ``device`` + ``mic`` extras, the receiver's by the base and ``central``,
and ``device`` must not carry the centre's packages. A CI-sized companion of the slow test in
tests/test_install_pi.py that runs the agent from a real ``.[device]``-only venv.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"core", "edge", "drivers", "buffer", "uplink", "receiver", "simulator", "bench", "tests"}
VAN = ("core", "edge", "drivers", "buffer", "uplink")
# Not installed in the test venv (built from source; only microphone vans have it).
NOT_INSTALLED = {"alsaaudio": "pyalsaaudio"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extras() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist = lambda req: _norm(re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0])  # noqa: E731
    extras = {k: {dist(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return {dist(r) for r in project["dependencies"]}, extras


def _third_party_imports(packages: tuple[str, ...]) -> dict[str, str]:
    """Top-level module -> a file that imports it, for every non-stdlib, non-project import."""
    out: dict[str, str] = {}
    for pkg in packages:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OURS:
                        out.setdefault(top, str(path.relative_to(ROOT)))
    return out


def _dists_of(module: str) -> set[str]:
    found = packages_distributions().get(module) or [NOT_INSTALLED.get(module, module)]
    return {_norm(d) for d in found}


def test_the_van_imports_only_what_device_and_mic_install() -> None:
    base, extras = _extras()
    allowed = base | extras["device"] | extras["mic"]
    missing = {m: f for m, f in _third_party_imports(VAN).items() if not _dists_of(m) & allowed}
    assert not missing, f"imported by the van but in no van extra: {missing}"


def test_the_receiver_imports_only_what_central_installs() -> None:
    base, extras = _extras()
    allowed = base | extras["central"]
    missing = {m: f for m, f in _third_party_imports(("core", "receiver")).items() if not _dists_of(m) & allowed}
    assert not missing, f"imported by the receiver but in no central extra: {missing}"


def test_the_van_carries_nothing_of_the_centre() -> None:
    base, extras = _extras()
    van = base | extras["device"] | extras["mic"]
    centre_only = {"psycopg", "h3", "orjson", "waitress", "sqlite-utils", "amqtt"}
    assert not van & centre_only
    assert base == {"click"}, "the base stays what every command line needs"
    # test pulls every side (but mic, which needs a compiler), so the suite exercises all of them.
    assert {"datalab-edge"} <= extras["test"] and "pyalsaaudio" not in extras["test"]
