"""The technician's tool: commands the ``edge`` group gains for fitting and calibrating a van.

One module per command family; ``register(group)`` adds them all::

    from edge.technician import register
    register(main)          # in edge/cli.py, after the group is defined
"""

from __future__ import annotations

import importlib
from typing import Any

import click


# Command name -> module defining it (the attribute has the command's name). ``edge run`` never
# imports them: colocate and fitting pull in numpy (~21 MB of RSS), and every van pays for
# what ``edge`` imports (issue #18: the van's RSS budget).
_COMMANDS = {
    "selftest": "edge.technician.selftest",
    "live": "edge.technician.live",
    "no2": "edge.technician.no2",
    "noise": "edge.technician.noise",
    "pm": "edge.technician.pm",
    "colocate": "edge.technician.colocate",
    "calibration": "edge.technician.history",
}


def _load(name: str) -> click.Command:
    cmd = getattr(importlib.import_module(_COMMANDS[name]), name)
    assert isinstance(cmd, click.Command) and cmd.name == name, name
    return cmd


class _LazyCommand(click.Command):
    """Stands in for a technician command in the group until it is used (or help lists it)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._real: click.Command | None = None

    def real(self) -> click.Command:
        if self._real is None:
            self._real = _load(self.name or "")
        return self._real

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        # The real command parses and runs: its context names it, so click invokes it, not us.
        return self.real().make_context(info_name, args, parent=parent, **extra)

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.real().get_short_help_str(limit)

    def get_help(self, ctx: click.Context) -> str:
        return self.real().get_help(ctx)


def commands() -> list[click.Command]:
    """The technician's commands themselves (imports every module)."""
    return [_load(name) for name in _COMMANDS]


def register(group: click.Group, *, lazy: bool = True) -> None:
    """Add every technician command to ``group`` (the ``edge`` CLI), imported when first used."""
    for name in _COMMANDS:
        group.add_command(_LazyCommand(name) if lazy else _load(name))


def technician_group() -> click.Group:
    """A stand-alone group with the same commands (for tests, or a separate entry point)."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def edge_tech() -> None:
        """datalab-edge technician's tool."""

    register(edge_tech, lazy=False)
    return edge_tech
