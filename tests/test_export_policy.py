"""`export aggregates` serves the policy its maps were built with (issue 15, v5 finding 6)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from receiver.datalab_commands import datalab_commands
from tests.datalab_synth import make_store


def test_export_aggregates_refuses_config_and_names_the_build_policy(tmp_path: Path) -> None:
    store = make_store(tmp_path / "d.sqlite", days=1, vans=2, minutes=3)
    cfg = tmp_path / "receiver.toml"
    cfg.write_text('[receiver]\nexclude_flags = ["salvaged"]\nexclude_flags_pm = []\n')
    run = CliRunner().invoke
    res = run(datalab_commands, ["aggregate", "--store", str(store), "--scheme", "segment", "--config", str(cfg),
                                 "--min-passes", "1", "--min-days", "1"])
    assert res.exit_code == 0, res.output
    # --config at export time cannot change what was built: refused, with why
    res = run(datalab_commands, ["export", "aggregates", "--store", str(store), "--config", str(cfg)])
    assert res.exit_code == 2 and "policy their maps were built with" in res.output
    # the export says which policy the maps were built with (GeoJSON metadata, and on stderr)
    out = tmp_path / "map.geojson"
    res = run(datalab_commands, ["export", "aggregates", "--store", str(store), "--format", "geojson",
                                 "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads(out.read_text())["metadata"]
    assert meta["flag_policy"] == {"segment/all": {"exclude": ["salvaged"], "exclude_pm": []}}
    assert 'segment/all: built with flag policy {"exclude": ["salvaged"], "exclude_pm": []}' in res.output
    # measurements still take a policy from --config
    res = run(datalab_commands, ["export", "measurements", "--store", str(store), "--config", str(cfg),
                                 "--format", "geojson", "--out", str(tmp_path / "m.geojson")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m.geojson").read_text())["metadata"]["flag_policy"]["exclude"] == ["salvaged"]
