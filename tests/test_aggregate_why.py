"""A map built with the defaults that publishes nothing says why (issue 17.6a).

The hint must name the unit nearest to the rule as the aggregates table holds it, and the
options it suggests must make the build publish.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from click.testing import CliRunner

from receiver.aggregate import DEFAULT_MIN_DAYS, DEFAULT_MIN_PASSES, BuildReport, Rule, why_nothing
from receiver.cli import main as receiver_cli
from tests.datalab_synth import make_store


def test_an_empty_map_names_the_best_unit_and_the_options(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s.sqlite", days=1, vans=2, minutes=4)
    r = CliRunner().invoke(receiver_cli, ["aggregate", "--store", str(store), "--scheme", "h3:10"])
    assert r.exit_code == 0, r.output
    m = re.search(rf"0 units met the publishing rule \({DEFAULT_MIN_PASSES} passes on {DEFAULT_MIN_DAYS} days\): "
                  r"best unit had (\d+) passes on (\d+) days?; try (.*) \(for", r.output)
    assert m, r.output
    passes, days, options = int(m[1]), int(m[2]), m[3].split()
    with sqlite3.connect(store) as c:
        rows = c.execute("SELECT n_passes, n_days, published FROM aggregates WHERE scheme = 'h3:10'").fetchall()
    assert rows and not any(p for _, _, p in rows)
    assert days == max(d for _, d, _ in rows) == 1
    assert passes == max(p for p, d, _ in rows if d == days)
    assert "--min-days" in options and options[options.index("--min-days") + 1] == "1"
    # the suggestion works: the same build with it publishes, and says nothing about an empty map
    r = CliRunner().invoke(receiver_cli, ["aggregate", "--store", str(store), "--scheme", "h3:10", *options])
    assert r.exit_code == 0 and "0 units met" not in r.output, r.output
    with sqlite3.connect(store) as c:
        assert c.execute("SELECT count(*) FROM aggregates WHERE published = 1").fetchone()[0] > 0


def test_the_other_reasons() -> None:
    rule = Rule(4, 2)
    assert why_nothing(BuildReport("segment", "all", samples=10, passes=3, published=1), rule) is None
    assert "no positioned samples in period 2026-11" in str(why_nothing(BuildReport("segment", "2026-11"), rule))
    off_road = str(why_nothing(BuildReport("segment", "all", samples=500), rule))
    assert "500 samples but none within --snap-m" in off_road
