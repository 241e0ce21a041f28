"""What ``edge run`` loads (issue #18: a van's RSS budget).

Every van runs the ``edge`` command, so whatever ``edge.cli`` imports is resident in every
van for years: the technician's commands (colocate and fitting pull in numpy, ~21 MB) are
imported only when one of them is used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edge.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_edge_run_does_not_import_numpy_or_the_technician_commands() -> None:
    code = ("import sys, edge.cli, edge.runtime, edge.driver_factory, drivers.gps, drivers.pms, drivers.no2, "
            "drivers.sound_module, json; print(json.dumps(sorted(m for m in sys.modules "
            "if m == 'numpy' or m.startswith('edge.technician.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_technician_commands_still_run_from_edge() -> None:
    runner = CliRunner()
    listing = runner.invoke(main, ["--help"])
    assert listing.exit_code == 0
    for name in ("selftest", "live", "no2", "noise", "pm", "colocate", "calibration"):
        assert f"  {name} " in listing.output, name
    # A command is loaded when used: its own help, its own subcommands, its own option errors.
    sub = runner.invoke(main, ["no2", "--help"])
    assert sub.exit_code == 0 and "sheet" in sub.output
    bad = runner.invoke(main, ["selftest", "--no-such-option"])
    assert bad.exit_code == 2 and "No such option" in bad.output
