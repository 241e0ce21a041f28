"""Receiver config: nothing the operator wrote is ignored without a word (issue 15, v5 finding 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from core.errors import ConfigError
from receiver.cli import main as receiver_cli
from receiver.config import load_receiver_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "receiver.toml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("text, key, says", [
    ('[reciever]\nstore = "x.sqlite"\n', "reciever", "did you mean 'receiver'"),
    ('store = "x.sqlite"\n[receiver]\nport = 1883\n', "store", "put it under [receiver]"),
    ('stroe = "x.sqlite"\n', "stroe", "did you mean 'store'"),
    ('[receiver]\nstroe = "x.sqlite"\n', "receiver.stroe", "did you mean 'store'"),
    ('[receiver]\nexclude_flag = ["stuck"]\n', "receiver.exclude_flag", "did you mean 'exclude_flags'"),
    ('[api]\nport = 8080\n', "api", "unknown table [api]"),
    ('[receiver]\nexclude_flags = ["stuk"]\n', "receiver.exclude_flags", "'stuk': did you mean 'stuck'?"),
    ('[receiver]\nexclude_flags_pm = ["Humid"]\n', "receiver.exclude_flags_pm", "did you mean 'humid'?"),
])
def test_unknown_tables_and_keys_are_refused_by_name(tmp_path: Path, text: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_receiver_config(write(tmp_path, text))
    assert err.value.key == key
    assert says in str(err.value)


def test_a_proper_config_still_loads(tmp_path: Path) -> None:
    cfg = load_receiver_config(write(tmp_path, '[receiver]\nstore = "x.sqlite"\nport = 1884\n'))
    assert (cfg.store, cfg.port) == ("x.sqlite", 1884)


def test_the_receiver_does_not_start_on_a_misspelt_table(tmp_path: Path) -> None:
    """`datalab-receiver run` stops with the config error's exit code (1, as every config error) and the key."""
    res = CliRunner().invoke(receiver_cli, ["run", "--config", str(write(tmp_path, '[reciever]\nport = 1\n'))])
    assert res.exit_code == 1
    assert "reciever" in res.output and "did you mean 'receiver'" in res.output
