"""The iSCSI front end's command line (`python -m fetd_tcp`, `scsi-target fetd-tcp`)."""
from __future__ import annotations

import asyncio
import logging
import re
import sys

import click


class PortalError(ValueError):
    pass


def parse_portal(value: str) -> tuple[str, int, int]:
    """HOST:PORT[,TPGT], [V6ADDR]:PORT[,TPGT] or HOST: never split IPv6 on ':'."""
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.%\w]+)\]|([^:\[\],]+))(?::(\d+))?(?:,(\d+))?", value.strip())
    if not m:
        raise PortalError(f"portal {value!r} is not HOST:PORT[,TPGT] or [IPv6]:PORT[,TPGT]")
    port = int(m.group(3) or 3260)
    tpgt = int(m.group(4) or 1)
    if port > 65535 or not 1 <= tpgt <= 65535:
        raise PortalError(f"portal {value!r}: port or TPGT out of range")
    return m.group(1) or m.group(2), port, tpgt


@click.command("fetd-tcp")
@click.option("--stml", "stml_endpoint", required=True, help="STML endpoint (ipc://PATH or tcp://HOST:PORT).")
@click.option("--portal", "portals", multiple=True, metavar="HOST:PORT[,TPGT]",
              help="Portal to listen on, repeatable (default 127.0.0.1:3260; TPGT default 1).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(stml_endpoint: str, portals: tuple[str, ...], log_level: str) -> None:
    """Run the iSCSI front end alone, attached to a running STML."""
    from fetd_tcp.server import PortalSpec, run_fetd_tcp
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s fetd_tcp[%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        specs = [PortalSpec(*parse_portal(p)) for p in portals or ("127.0.0.1:3260",)]
    except PortalError as e:
        click.echo(f"scsi-target: config error: {e}", err=True)
        sys.exit(2)
    try:
        asyncio.run(run_fetd_tcp(stml_endpoint, specs))
    except OSError as e:
        click.echo(f"scsi-target: fetd-tcp: cannot listen: {e}", err=True)
        sys.exit(2)
