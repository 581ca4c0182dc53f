"""`python -m fetd_spi`: run scenario files against a running STML."""
from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import click


@click.command("fetd-spi")
@click.option("--stml", "stml_endpoint", required=True, help="STML endpoint (ipc://PATH or tcp://HOST:PORT).")
@click.option("--scenario", "scenarios", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="A scenario (TOML; fetd_spi.sim.scenario_from_dict says what it holds). Repeatable.")
@click.option("--target", help="The target whose LUNs the simulated target serves (default: the first).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False),
              help="Draw the results as a PNG here (needs matplotlib).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(stml_endpoint: str, scenarios: tuple[str, ...], target: str | None, json_out: str | None,
         plot_out: str | None, log_level: str) -> None:
    """Simulate a parallel SCSI bus whose target's LUNs are the STML's."""
    from fetd_spi.report import plot, table
    from fetd_spi.sim import scenario_from_dict
    from scsi_runtime.logs import setup_logging
    from scsi_runtime.loop import run_loop
    setup_logging(log_level, "fetd_spi")
    loaded = []
    for path in scenarios:
        try:
            loaded.append(scenario_from_dict(tomllib.loads(Path(path).read_text())))
        except (OSError, tomllib.TOMLDecodeError, ValueError) as e:
            click.echo(f"fetd-spi: {path}: {e}", err=True)
            sys.exit(2)
    runs = run_loop(_run_all(loaded, stml_endpoint, target))
    for r in runs:
        click.echo(table(r) + "\n")
    if json_out:
        Path(json_out).write_text(json.dumps([r.as_dict() for r in runs], indent=2))
    if plot_out:
        plot(runs, Path(plot_out))


async def _run_all(scenarios: list, endpoint: str, target: str | None) -> list:
    from fetd_spi.frontend import LinkFailed, run_scenario
    runs = []
    for sc in scenarios:
        try:
            _, results = await run_scenario(sc, endpoint, target)
        except (LinkFailed, LookupError, PermissionError, ValueError, TimeoutError) as e:
            click.echo(f"fetd-spi: {sc.name}: {e}", err=True)
            sys.exit(1)
        runs.append(results)
    return runs
