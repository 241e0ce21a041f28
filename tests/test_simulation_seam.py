"""The simulator plugs into the van from above (edge/simulation.py): the van finds it through
the ``datalab_edge.simulation`` entry point, and a van without it says which key asked."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from edge import simulation
from edge.config import parse_config
from edge.runtime import build_context, parse_utc


@pytest.fixture(autouse=True)
def _fresh_registry():
    simulation.register(None)
    yield
    simulation.register(None)


def test_the_installed_simulator_is_found_through_its_entry_point() -> None:
    backend = simulation.backend()
    assert isinstance(backend, simulation.SimulationBackend)
    assert type(backend).__module__ == "simulator.van_plugin"


def test_a_simulated_van_gets_its_world_and_hardware_from_the_backend() -> None:
    cfg = parse_config({"simulation": {"enabled": True, "devices": "hardware", "seed": 3}})
    ctx, until = build_context(cfg)
    hw = ctx["hardware"]
    try:
        assert until == cfg.simulation.shift_hours * 3600
        assert ctx["world"].clock is ctx["clock"]
        assert ctx["world"].shift_start_utc == parse_utc(cfg.simulation.start_utc, "simulation.start_utc")
        assert hw.ports  # pseudo-terminals the real drivers open
    finally:
        getattr(hw, "close", lambda: None)()


def test_without_the_simulator_a_van_is_told_which_key_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a van installed without the simulator: no entry point in the group.
    monkeypatch.setattr(simulation, "entry_points", lambda group: [])
    with pytest.raises(ConfigError) as err:
        simulation.backend("sensors.no2.bus")
    assert err.value.key == "sensors.no2.bus" and "simulator" in err.value.problem
