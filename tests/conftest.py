"""Shared fixtures: a real Mosquitto per test that wants one, fixture paths, the slow flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.broker import LocalBroker, mosquitto_path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run long soak and fault runs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long run: use --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A real Mosquitto on a free loopback port, stopped after the test."""
    if not mosquitto_path():
        pytest.fail("mosquitto is not installed: run scripts/test, which installs it")
    broker = LocalBroker("mosquitto", workdir=tmp_path / "broker")
    (tmp_path / "broker").mkdir()
    broker.start()
    yield broker
    broker.close()


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"captured sensor fixtures not found at {FIXTURES} (a clone without ../shared)")
    return FIXTURES
