"""``edge``: the device agent and the technician's tool.

A thin click layer over the library: every command has help with examples.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib import resources

import click

from edge.config import load_config, redacted
from edge.errors import ConfigError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """datalab-edge device agent.

    \b
    Examples:
      edge run --config /etc/datalab-edge/agent.toml
      edge config check /etc/datalab-edge/agent.toml
      edge config example > agent.toml
    """


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Agent configuration (TOML).")
@click.option("--drain-timeout", default=120.0, show_default=True,
              help="Simulated shifts: seconds to wait at the end for the receiver's acks.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(config_path: str, drain_timeout: float, verbose: bool) -> None:
    """Run the agent: sample, buffer and upload until stopped.

    \b
    Examples:
      edge run --config /etc/datalab-edge/agent.toml
      edge run --config van-sim.toml -v     # a simulated van (simulation.enabled = true)
    """
    _setup_logging(verbose)
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    from edge.runtime import run_agent

    try:
        sys.exit(run_agent(cfg, drain_timeout_s=drain_timeout))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def config() -> None:
    """Check or generate configuration files."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate a configuration file; print it (secrets hidden) or the error.

    \b
    Example:
      edge config check /etc/datalab-edge/agent.toml && echo fine
    """
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(redacted(cfg), indent=2))
    click.echo(f"{path}: OK", err=True)


@config.command("example")
def config_example() -> None:
    """Print the documented example configuration (all defaults).

    \b
    Example:
      edge config example > /etc/datalab-edge/agent.toml
    """
    click.echo(resources.files("edge").joinpath("config.example.toml").read_text(), nl=False)


if __name__ == "__main__":
    main()
