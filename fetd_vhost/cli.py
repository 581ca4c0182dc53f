"""The vhost-user-scsi front end's command line (`python -m fetd_vhost`,
`scsi-target fetd-vhost`)."""
from __future__ import annotations

import sys

import click


@click.command("fetd-vhost")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="The vhost-user socket to create (mode 0600) for QEMU's "
                   "vhost-user-scsi-pci device.")
@click.option("--target", required=True, help="The target (IQN) whose LUNs the VM sees.")
@click.option("--stml", "stml_endpoint", required=True, help="STML endpoint (ipc://PATH or tcp://HOST:PORT).")
@click.option("--initiator", help="The VM's initiator port name (default: derived from the socket path).")
@click.option("--stml-key", type=click.Path(dir_okay=False),
              help="The STML's public key file (CURVE over tcp://).")
@click.option("--key", "own_key", type=click.Path(dir_okay=False), help="This front end's key pair.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(socket_path: str, target: str, stml_endpoint: str, initiator: str | None,
         stml_key: str | None, own_key: str | None, log_level: str) -> None:
    """Serve a target's LUNs to one QEMU virtual machine over vhost-user-scsi."""
    from fetd_vhost.server import run_fetd_vhost
    from scsi_runtime.logs import setup_logging
    from stml.api import curve_client_keys, run_loop
    setup_logging(log_level, "fetd_vhost")
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
    try:
        run_loop(run_fetd_vhost(stml_endpoint, socket_path, target, initiator, curve))
    except OSError as e:
        click.echo(f"scsi-target: fetd-vhost: cannot listen on {socket_path}: {e}", err=True)
        sys.exit(2)
