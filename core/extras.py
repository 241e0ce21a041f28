"""Which optional installs (pyproject extras) are present, for the console scripts.

A van installs ``.[device]`` only, yet gets every console script: ``datalab-receiver`` and
``datalab-sim`` there would die on their first third-party import with a traceback. They call
``require`` first and say in one line what to install instead (exit 2, as a configuration error:
retrying will not help).
"""

from __future__ import annotations

import importlib.util
import sys

# What each extra brings that its entry point imports (pyproject.toml [project.optional-dependencies]).
CENTRAL_MODULES = ("orjson", "paho", "sqlite_utils", "h3", "waitress")
SIM_MODULES = (*CENTRAL_MODULES, "amqtt")


def missing(modules: tuple[str, ...]) -> list[str]:
    """The top-level modules not importable here (found, not imported: the check costs no start time)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules (None)
            found = False
        if not found:
            out.append(name)
    return out


def require(modules: tuple[str, ...], whose: str, extra: str) -> None:
    """Exit 2 with one line naming the install when any of ``modules`` is missing."""
    if missing(modules):
        print(f"{whose} packages are not installed: pip install 'datalab-edge[{extra}]'", file=sys.stderr)
        sys.exit(2)
