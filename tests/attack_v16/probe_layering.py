"""v16 probe: imports that run the wrong way and that tests/test_layering.py may miss.

Run: .venv/bin/python -m pytest tests/attack_v16/probe_layering.py -q -p no:cacheprovider -s
Oracle: the layers as issue 16 states them (typed in below, not read from test_layering.py):
core imports nothing of ours; drivers, buffer, uplink only core; edge only core/drivers/buffer/uplink;
receiver only core; nothing but the simulator imports the simulator.
1. every string constant in production code that names one of our modules (import_module tables,
   entry-point-like "pkg.mod:attr" strings, __import__ arguments) is checked against the layers;
2. the documented commands run in a fresh interpreter; an atexit hook lists which of our packages
   were loaded: the van's commands must not load receiver/simulator, the receiver's not the van's.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv/bin/python")
LAYERS = {
    "core": set(), "drivers": {"core"}, "buffer": {"core"}, "uplink": {"core"},
    "edge": {"core", "drivers", "buffer", "uplink"}, "receiver": {"core"},
}
OURS = set(LAYERS) | {"simulator"}
NAME = re.compile(r"^(core|drivers|buffer|uplink|edge|receiver|simulator)(\.[A-Za-z_][A-Za-z0-9_]*)+(:[A-Za-z_]\w*)?$")


def _production_files() -> list[Path]:
    return [p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")]


def test_no_string_names_a_module_across_the_layers() -> None:
    wrong = []
    for f in _production_files():
        pkg = f.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME.match(node.value) \
                    and not node.value.endswith((".toml", ".py", ".json", ".pem", ".txt", ".db")):
                target = node.value.split(".")[0]
                if target != pkg and target not in LAYERS[pkg]:
                    wrong.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    print("\n".join(wrong))
    assert not wrong


def test_no_dynamic_import_with_a_computed_name_outside_known_tables() -> None:
    """import_module / __import__ / find_spec with a non-literal argument: listed for reading."""
    found = []
    for f in _production_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                if fn.endswith(("import_module", "__import__", "find_spec", "run_module", "load")) and node.args \
                        and not isinstance(node.args[0], ast.Constant):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:120]}")
    print("\n".join(found))


HOOK = ("import atexit,sys,json\n"
        "def _d():\n"
        "    ours=sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in %r})\n"
        "    sys.__stderr__.write('V16MODS '+json.dumps(ours)+'\\n')\n"
        "atexit.register(_d)\n"
        "sys.argv=%r\n"
        "from %s import main\n"
        "main()\n")


def _loaded(module: str, argv: list[str], cwd: Path) -> tuple[set[str], int, str]:
    code = HOOK % (sorted(OURS), argv, module)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("V16MODS ")]
    assert line, r.stderr[-2000:]
    return set(json.loads(line[-1][8:])), r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cfg")
    (d / "agent.toml").write_text(f'[device]\nid = "van-l"\ndata_dir = "{d}/data"\n'
                                  '[sensors.pm]\ndriver = "pms5003"\nport = "/dev/null"\n'
                                  '[sensors.gps]\ndriver = "nmea-gps"\nport = "/dev/null"\n'
                                  '[sensors.no2]\ndriver = "dgs-no2"\nport = "/dev/null"\n'
                                  '[sensors.noise]\ndriver = "sound-module"\n')
    return d


VAN_CMDS = [["edge", "--help"], ["edge", "config", "check", "agent.toml"], ["edge", "config", "example"],
            ["edge", "selftest", "--help"], ["edge", "live", "--help"], ["edge", "no2", "--help"],
            ["edge", "noise", "--help"], ["edge", "pm", "--help"], ["edge", "colocate", "--help"],
            ["edge", "calibration", "--help"], ["edge", "run", "--help"]]


@pytest.mark.parametrize("argv", VAN_CMDS, ids=lambda a: "_".join(a[1:]))
def test_van_commands_load_neither_receiver_nor_simulator(argv: list[str], cfg: Path) -> None:
    mods, rc, out = _loaded("edge.cli", argv, cfg)
    print(argv, rc, sorted(mods))
    assert rc in (0, 2), out[-1500:]
    assert not mods & {"receiver", "simulator"}, mods


@pytest.mark.parametrize("argv", [["datalab-receiver", "--help"], ["datalab-receiver", "serve", "--help"],
                                  ["datalab-receiver", "export", "--help"]], ids=lambda a: "_".join(a[1:]))
def test_receiver_commands_load_no_van_code(argv: list[str], cfg: Path) -> None:
    mods, rc, out = _loaded("receiver.cli", argv, cfg)
    print(argv, rc, sorted(mods))
    assert not mods & {"edge", "drivers", "buffer", "uplink", "simulator"}, mods


def test_van_config_check_of_a_simulated_van_does_not_load_the_simulator(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(f'[device]\nid = "van-s"\ndata_dir = "{tmp_path}/d"\n'
                                     '[simulation]\nenabled = true\n[sensors.pm]\ndriver = "sim-pm"\n')
    mods, rc, out = _loaded("edge.cli", ["edge", "config", "check", "a.toml"], tmp_path)
    print(rc, sorted(mods))
    assert rc == 0, out[-800:]
    # The check loads the simulator on purpose, through the entry point (edge/config_schema.py
    # _simulator_installed -> edge.simulation.backend): it answers "is the simulator installed".
    assert "receiver" not in mods
