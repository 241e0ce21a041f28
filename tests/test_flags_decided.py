"""Every flag the van or the receiver sets is decided in the flag policy (issue 15, tester v15:
``single_sentence`` from drivers/gps.py was set by vans but undecided, and a config excluding it
was refused as unknown).

The code is scanned, not a list kept by hand: any string literal put into a flags tuple/list/set
(``flags = (...)``, ``flags += (...)``, ``flags.append(...)``, ``flags=(...)`` keyword, a
``*_FLAG = "..."`` constant) in the van's and receiver's code must be a key of KNOWN_FLAGS.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from receiver.flag_policy import KNOWN_FLAGS, FlagPolicy

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("drivers", "edge", "core", "buffer", "uplink", "receiver")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _flaggy(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "flag" in name.lower()


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and NAME.match(n.value)}


def flags_set_in(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(_flaggy(t) for t in node.targets):
            if isinstance(node.value, (ast.Tuple, ast.List, ast.Set, ast.IfExp, ast.Constant)):
                found |= _strings(node.value)
        elif isinstance(node, ast.AnnAssign) and _flaggy(node.target) and node.value is not None:
            if isinstance(node.value, (ast.Tuple, ast.List, ast.Set, ast.IfExp)):
                found |= _strings(node.value)
        elif isinstance(node, ast.AugAssign) and _flaggy(node.target):
            found |= _strings(node.value)
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("append", "add") and _flaggy(f.value):
                for a in node.args:
                    found |= _strings(a) if isinstance(a, ast.Constant) else set()
            for kw in node.keywords:
                if kw.arg == "flags" and isinstance(kw.value, (ast.Tuple, ast.List, ast.IfExp)):
                    found |= _strings(kw.value)
    return found


def test_the_scan_finds_flags_the_way_the_drivers_set_them() -> None:
    """The scanner itself must see each way a flag is set, or the check below proves nothing."""
    src = ('flags = () if t else ("a_flag",)\nflags += ("b_flag",)\nflags.append("c_flag")\n'
           'X_FLAG = "d_flag"\nReading(flags=("e_flag",) if w else ())\nr = replace(r, flags=(*r.flags, "f_flag"))\n')
    assert flags_set_in(src) == {"a_flag", "b_flag", "c_flag", "d_flag", "e_flag", "f_flag"}


def test_every_flag_the_code_sets_is_decided() -> None:
    found: dict[str, str] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            for flag in flags_set_in(path.read_text()):
                found.setdefault(flag, str(path.relative_to(ROOT)))
    # The scan must see the flags known to be set by the van (a broken scan finds nothing).
    assert {"warming_up", "single_sentence", "audio_gap", "no_gps_time", "cal_unavailable"} <= set(found)
    undecided = {f: where for f, where in found.items() if f not in KNOWN_FLAGS}
    assert not undecided, f"flags set but not decided in receiver/flag_policy.py KNOWN_FLAGS: {undecided}"


def test_single_sentence_is_kept_and_may_be_excluded_by_config() -> None:
    who, decision, why = KNOWN_FLAGS["single_sentence"]
    assert (who, decision) == ("van", "keep") and why
    assert not FlagPolicy().excludes("lat", "single_sentence")
    assert FlagPolicy.of(["single_sentence"], []).excludes("pm25", "single_sentence")
