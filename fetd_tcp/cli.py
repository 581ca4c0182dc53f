"""The iSCSI front end's command line (`python -m fetd_tcp`, `scsi-target fetd-tcp`)."""
from __future__ import annotations

import sys

import click


class PortalError(ValueError):
    pass


def parse_portal(value: str) -> tuple[str, int, int]:
    """HOST:PORT[,TPGT], [V6ADDR]:PORT[,TPGT] or HOST: never split IPv6 on ':'."""
    from scsi_runtime.portals import parse_portal as parse
    try:
        return parse(value)
    except ValueError as e:
        raise PortalError(str(e)) from None


@click.command("fetd-tcp")
@click.option("--stml", "stml_endpoints", required=True, multiple=True,
              help="STML endpoint (ipc://PATH or tcp://HOST:PORT); repeated: the STMLs of gateways "
                   "sharing storage, of which the front end uses the one that serves.")
@click.option("--portal", "portals", multiple=True, metavar="HOST:PORT[,TPGT]",
              help="Portal to listen on, repeatable (TPGT default 1). Without it the front end "
                   "listens on the STML's portal list and follows `portal add|remove`.")
@click.option("--stml-key", type=click.Path(dir_okay=False),
              help="The STML's public key file (CURVE over tcp://; from `scsi-target keys generate`).")
@click.option("--key", "own_key", type=click.Path(dir_okay=False),
              help="This front end's key pair (NAME.key_secret, or NAME.key next to it).")
@click.option("--isns", metavar="HOST:PORT", help="Register targets and portals with this iSNS server.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"]))
@click.option("--inject", "inject", multiple=True, metavar="RULE",
              help="A fault-injection rule for this front end's link, repeatable: 'fetd:KIND OP "
                   "[at=N|p=P seed=S] [ms=..]' (docs/research.md, \"Fault injection\").")
@click.option("--inject-file", "inject_files", multiple=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="Fault-injection rules, one a line (# comments), repeatable.")
def main(stml_endpoints: tuple[str, ...], portals: tuple[str, ...], stml_key: str | None, own_key: str | None,
         isns: str | None, log_level: str, log_format: str, inject: tuple[str, ...],
         inject_files: tuple[str, ...]) -> None:
    """Run the iSCSI front end alone, attached to a running STML (on this host,
    or on another one over tcp:// with CURVE keys)."""
    from fetd_tcp.portals import PortalSpec
    from fetd_tcp.server import run_fetd_tcp
    from scsi_runtime.logs import setup_logging
    from scsi_runtime.curvekeys import curve_client_keys
    from scsi_runtime.loop import run_loop
    setup_logging(log_level, "fetd_tcp", log_format)
    from fetd_tcp.limits import LimitError, Limits
    from stml.api.inject import RuleError, front_end_rules
    try:
        specs = [PortalSpec(*parse_portal(p)) for p in portals]
        Limits.from_env()
        rules = front_end_rules(inject, inject_files)
    except RuleError as e:
        click.echo(f"scsi-target: {e}", err=True)
        sys.exit(2)
    except (PortalError, LimitError) as e:
        click.echo(f"scsi-target: config error: {e}", err=True)
        sys.exit(2)
    curve = None
    if stml_key or own_key:
        if not (stml_key and own_key):
            click.echo("scsi-target: config error: --stml-key and --key go together", err=True)
            sys.exit(2)
        try:
            curve = curve_client_keys(own_key, stml_key)
        except ValueError as e:
            click.echo(f"scsi-target: config error: {e}", err=True)
            sys.exit(2)
    from stml.api import RegistrationRefused
    try:
        run_loop(run_fetd_tcp(list(stml_endpoints), specs, curve, isns, rules))
    except OSError as e:
        click.echo(f"scsi-target: fetd-tcp: cannot listen on {e.strerror or e}", err=True)
        sys.exit(2)
    except RegistrationRefused as e:
        click.echo(f"scsi-target: fetd-tcp: the STML refused this front end: {e}", err=True)
        sys.exit(2)
