"""The technician's tool: commands the ``edge`` group gains for fitting and calibrating a van.

One module per command family; ``register(group)`` adds them all::

    from edge.technician import register
    register(main)          # in edge/cli.py, after the group is defined
"""

from __future__ import annotations

import click


def commands() -> list[click.Command]:
    """The technician's commands, imported lazily so ``edge run`` does not pay for them."""
    from edge.technician.colocate import colocate
    from edge.technician.history import calibration
    from edge.technician.live import live
    from edge.technician.no2 import no2
    from edge.technician.noise import noise
    from edge.technician.pm import pm
    from edge.technician.selftest import selftest

    return [selftest, live, no2, noise, pm, colocate, calibration]


def register(group: click.Group) -> None:
    """Add every technician command to ``group`` (the ``edge`` CLI)."""
    for cmd in commands():
        group.add_command(cmd)


def technician_group() -> click.Group:
    """A stand-alone group with the same commands (for tests, or a separate entry point)."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def edge_tech() -> None:
        """datalab-edge technician's tool."""

    register(edge_tech)
    return edge_tech
