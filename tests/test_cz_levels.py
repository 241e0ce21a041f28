"""The sound module set to C or Z weighting (issue 15, tester v4): its extremes get a quality
range and an export unit like the A-weighted ones, and the dashboard does not paint C/Z levels
with the A-weighted noise-map bands."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from receiver.export import unit_of
from receiver.quality import value_flags

APP_JS = Path(__file__).resolve().parents[1] / "receiver" / "web" / "app.js"


@pytest.mark.parametrize("key, unit", [("lcmax", "dB(C)"), ("lcmin", "dB(C)"), ("lzmax", "dB(Z)"), ("lzmin", "dB(Z)"),
                                       ("lamax", "dB(A)"), ("la90", "dB(A)"), ("laeq_1min", "dB(A)")])
def test_every_level_key_has_a_range_and_a_unit(key: str, unit: str) -> None:
    assert unit_of(key) == unit
    assert value_flags(key, 250.0) == {"out_of_range"}  # beyond any microphone
    assert value_flags(key, 5.0) == {"out_of_range"}  # below any microphone's floor
    assert value_flags(key, 72.5) == set()


def _colours(quantities: list[str], value: float) -> dict[str, str]:
    """colourFor() of the real app.js, run by node with no DOM (nothing else of the page runs)."""
    script = (
        "const fs = require('fs'); const vm = require('vm');"
        "const ctx = {document: {addEventListener() {}}};"
        f"vm.runInNewContext(fs.readFileSync({json.dumps(str(APP_JS))}, 'utf8') +"
        f"'\\n;globalThis.out = {json.dumps(quantities)}.map(q => [q, colourFor(q, {value})]);', ctx);"
        "console.log(JSON.stringify(Object.fromEntries(ctx.out)));"
    )
    res = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the dashboard's script")
def test_dashboard_does_not_paint_c_and_z_levels_with_the_a_bands() -> None:
    a_palette = {_colours(["laeq"], v)["laeq"] for v in (40, 52, 57, 62, 67, 72, 80)}
    assert len(a_palette) == 7  # every A band has its colour
    for v in (40, 52, 57, 62, 67, 72, 80, 90):
        got = _colours(["laeq", "lceq", "lzeq"], v)
        assert got["lceq"] not in a_palette and got["lzeq"] not in a_palette, (v, got)
    # still a scale: louder is darker, not one flat colour
    assert len({_colours(["lceq"], v)["lceq"] for v in (50, 62, 72, 90)}) == 4
    js = APP_JS.read_text(encoding="utf-8")
    assert "not a health band" in js  # the legend's note says why
