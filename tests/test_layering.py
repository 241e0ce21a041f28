"""The layers' arrows run one way (issue 16, point 1; docs/architecture.md, "Layers").

core <- drivers, buffer, uplink <- edge; core <- receiver; simulator on top of everything.
Every import of every production module is read from its source (ast, so a lazy import
inside a function counts as much as one at the top, and so does importlib.import_module
with a literal name): an arrow not in ALLOWED fails with the file and line. Then the
imports are run for real in a fresh interpreter: the receiver must not load the van's
code, the agent neither the receiver nor the simulator.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which of our top-level packages each one may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),  # the bottom: the standard library and third parties only
    "drivers": frozenset({"core"}),
    "buffer": frozenset({"core"}),
    "uplink": frozenset({"core"}),
    "edge": frozenset({"core", "drivers", "buffer", "uplink"}),  # builds the van
    "receiver": frozenset({"core"}),  # the centre shares only the core with the van
    "simulator": frozenset({"core", "drivers", "buffer", "uplink", "edge", "receiver"}),  # plugs in from above
}
OURS = frozenset(ALLOWED) | {"tests", "bench", "scripts"}

# Modules that moved or were renamed (issue 16): nothing may be left at the old path, or
# old imports would keep working around the layers. Written as (folder, file) pairs so that
# /work/notes/s5/apply-renames.py, run over a merged tree, does not rename them too.
GONE = tuple(f"{folder}/{name}.py" for folder, name in (
    ("edge", "model"), ("edge", "errors"), ("edge", "clock"), ("edge", "timekeeping"), ("edge", "faultpoints"),
    ("edge", "calibration_rules"), ("uplink", "wire"), ("uplink", "codec_v2"), ("uplink", "sample_rules"),
    ("uplink", "batch_limits"), ("edge", "service"), ("edge", "sensors"), ("edge/technician", "common"),
    ("receiver", "service"), ("receiver", "commands"), ("simulator", "devices"), ("simulator", "sensors"),
))


@dataclass(frozen=True)
class Arrow:
    source: str  # module
    target: str  # module imported
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool = False, path: str = "") -> list[Arrow]:
    """Every module ``source`` imports, wherever the statement is (top level or inside a function)."""
    out = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import mod`` imports pkg.mod when mod is a module: count both
            targets = [target] + [f"{target}.{a.name}" for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            targets = [node.args[0].value]
        out += [Arrow(module, t, path, node.lineno) for t in targets if t]
    return out


def wrong_arrows(arrows: list[Arrow]) -> list[Arrow]:
    bad = []
    for a in arrows:
        src, dst = a.source.split(".")[0], a.target.split(".")[0]
        if dst in OURS and dst != src and dst not in ALLOWED[src]:
            bad.append(a)
    return bad


def production_modules() -> list[Path]:
    return sorted(p for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py"))


def test_every_import_runs_down_the_layers() -> None:
    arrows = []
    for path in production_modules():
        arrows += imports(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py",
                          str(path.relative_to(ROOT)))
    assert len(arrows) > 500  # the walk saw the code (today ~1,500 imports)
    bad = wrong_arrows(arrows)
    assert not bad, "imports against the layers (docs/architecture.md, Layers):\n" + "\n".join(map(str, bad))


@pytest.mark.parametrize(("module", "code", "wrong"), [
    ("edge.runtime", "def f():\n    from simulator.world import VanWorld\n", "simulator.world"),
    ("receiver.store", "import edge.config\n", "edge.config"),
    ("core.sample", "from drivers import base\n", "drivers"),
    ("drivers.gps", "from ..buffer import store\n", "buffer"),  # relative, two levels up
    ("buffer.store", "from uplink.mqtt import MqttLink\n", "uplink.mqtt"),
    ("uplink.mqtt", "import importlib\nimportlib.import_module('edge.config')\n", "edge.config"),
])
def test_the_check_sees_a_wrong_arrow(module: str, code: str, wrong: str) -> None:
    bad = wrong_arrows(imports(code, module))
    assert bad and bad[0].target == wrong


def test_allowed_arrows_pass() -> None:
    code = "from core.errors import ReadError\nfrom drivers.base import Reading\nfrom buffer.store import Buffer\n"
    assert not wrong_arrows(imports(code, "edge.agent"))
    assert not wrong_arrows(imports("from edge.config import AgentConfig\n", "simulator.fleet"))


def test_no_module_left_at_an_old_path() -> None:
    left = [p for p in GONE if (ROOT / p).exists()]
    assert not left, f"moved modules must not stay behind as shims: {left}"


def _loaded_after(statement: str) -> set[str]:
    """Our modules loaded by ``statement`` in a fresh interpreter."""
    code = (f"import sys, json\n{statement}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))" % sorted(ALLOWED))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_the_receiver_loads_no_van_code() -> None:
    loaded = _loaded_after("import receiver.mqtt_consumer, receiver.cli, receiver.store, receiver.api_server")
    assert "receiver.mqtt_consumer" in loaded and "core.wire" in loaded
    assert {m.split(".")[0] for m in loaded} == {"core", "receiver"}, sorted(loaded)


def test_the_agent_loads_neither_receiver_nor_simulator() -> None:
    loaded = _loaded_after("import edge.cli, edge.runtime, edge.technician")
    assert "edge.runtime" in loaded and "buffer.store" in loaded
    tops = {m.split(".")[0] for m in loaded}
    assert "receiver" not in tops and "simulator" not in tops, sorted(loaded)
