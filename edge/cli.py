"""``edge``: the device agent and the technician's tool.

A thin click layer over the library: every command has help with examples.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from importlib import resources

import click

from edge.config import redacted
from core.errors import ConfigError, ConfigInvalid

# Exit codes, the same for every command (docs/technician.md, docs/install.md): a configuration
# error is 2 everywhere, so a script or systemd (RestartPreventExitStatus=2) can tell a file to fix
# from a failure to retry.
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


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

    \b
    Exit codes: 0 done, 1 failed (a check failed, a step was refused),
    2 the configuration is wrong (every error printed, each by key).
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
    # agent.toml with the service's [power] and [panel] tables (edge/runtime.py).
    from edge import config_schema
    from edge.logging_setup import setup_logging, update_secrets
    from edge.runtime import run_agent

    # The same schema as `edge config check`, before any device is opened.
    report = config_schema.check_file(config_path)
    if report.errors:
        _config_errors(config_path, report.errors)
    cfg, svc = report.raise_if_invalid()
    for note in report.warnings:
        click.echo(f"warning: {note}", err=True)
    # Structured (JSON lines under systemd) and with every configured secret redacted.
    redactor = setup_logging(cfg, verbose=verbose)
    try:
        sys.exit(run_agent(cfg, drain_timeout_s=drain_timeout, svc=svc, config_path=config_path,
                           on_secrets=lambda c: update_secrets(redactor, c)))
    except ConfigError as exc:  # found only while building (e.g. simulated hardware): still a config error
        _config_errors(config_path, exc.errors if isinstance(exc, ConfigInvalid) else [exc])


def _config_errors(path: str, errors: list[ConfigError]) -> None:
    """Every error, one line each by key, then exit 2: the same lines from check and run."""
    for exc in errors:
        click.echo(f"error: {exc}", err=True)
    click.echo(f"Error: {path}: {len(errors)} configuration error(s)", err=True)
    sys.exit(EXIT_CONFIG)


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
    from edge import config_schema

    # Every error, each by key (not only the first): the schema `edge run` uses.
    report = config_schema.check_file(path)
    if report.errors:
        _config_errors(path, report.errors)
    cfg, svc = report.raise_if_invalid()
    out = redacted(cfg)
    out["power"], out["panel"] = asdict(svc.power), asdict(svc.panel)
    click.echo(json.dumps(out, indent=2))
    from edge.remote_policy import no_working_sensor

    # Only a warning here: a technician may bench-test a GPS alone; from afar it is refused.
    if (none := no_working_sensor(cfg.sensors)) is not None:
        click.echo(f"warning: {none}", err=True)
    from edge.driver_factory import explain

    for sc in cfg.sensors:
        for note in explain(sc):
            click.echo(f"note: {note}", err=True)
    for note in report.warnings:
        click.echo(f"warning: {note}", err=True)
    click.echo(f"{path}: OK", err=True)


@config.command("example")
def config_example() -> None:
    """Print the documented example configuration (all defaults).

    \b
    Example:
      edge config example > /etc/datalab-edge/agent.toml
    """
    click.echo(resources.files("edge").joinpath("config.example.toml").read_text(), nl=False)


from edge.technician import register as _register_technician  # noqa: E402

_register_technician(main)

if __name__ == "__main__":
    main()
