"""`scsi-target service`: the systemd unit (packaging/scsi-target.service is
this module's output with the defaults), printed or installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

UNIT = """\
# scsi-target: a user-space SCSI target (iSCSI). Written by `scsi-target service unit`.
# Readiness is signalled (Type=notify); `systemctl reload` applies the edited config and
# fails when the target refuses it (kill -HUP would report success whatever happened).
# Operating it: docs/operations.md in the source tree.
[Unit]
Description=scsi-target user-space SCSI target (iSCSI)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} run --data-dir {data_dir}
ExecReload={exec_start} config reload --data-dir {data_dir}
KillMode=mixed
TimeoutStopSec=30
Restart=on-failure
RestartPreventExitStatus=2
User={user}
Group={user}
StateDirectory={state_dir}
StateDirectoryMode=0700
# /run/scsi-target: where [[vhost]] sockets go (PrivateTmp hides /tmp from QEMU); others may
# only pass through it: a socket is 0600, or 0660 in its `group` (docs/vhost.md)
RuntimeDirectory=scsi-target
RuntimeDirectoryMode=0711
# port 3260 is below 1024: the one privilege the target needs
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
# backing files outside the data dir need ReadWritePaths=; block devices also the user in group disk
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
"""

DEFAULTS = {"exec_start": "/usr/bin/scsi-target", "data_dir": "/var/lib/scsi-target",
            "user": "scsi-target", "state_dir": "scsi-target"}


def unit_text(exec_start: str = DEFAULTS["exec_start"], data_dir: str = DEFAULTS["data_dir"],
              user: str = DEFAULTS["user"]) -> str:
    """The unit; StateDirectory= makes systemd create the data dir for the
    user when it lies under /var/lib."""
    state = data_dir[len("/var/lib/"):] if data_dir.startswith("/var/lib/") else ""
    text = UNIT.format(exec_start=exec_start, data_dir=data_dir, user=user, state_dir=state or "scsi-target")
    if not state:
        text = text.replace(f"StateDirectory={state or 'scsi-target'}\nStateDirectoryMode=0700\n",
                            f"ReadWritePaths={data_dir}\n")
    return text


@click.group()
def service() -> None:
    """The systemd unit: print it, or install it (as root)."""


def _exec_start() -> str:
    return shutil.which("scsi-target") or f"{sys.executable} -m scsi_target"


@service.command("unit")
@click.option("--data-dir", default=DEFAULTS["data_dir"], show_default=True)
@click.option("--user", default=DEFAULTS["user"], show_default=True, help="The account the target runs as.")
@click.option("--defaults", is_flag=True, help="ExecStart=/usr/bin/scsi-target, as packagers ship it.")
def unit(data_dir: str, user: str, defaults: bool) -> None:
    """Print the unit file for this installation."""
    click.echo(unit_text(DEFAULTS["exec_start"] if defaults else _exec_start(), data_dir, user), nl=False)


@service.command("install")
@click.option("--data-dir", default=DEFAULTS["data_dir"], show_default=True)
@click.option("--user", default=DEFAULTS["user"], show_default=True, help="The account the target runs as.")
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True, type=click.Path(file_okay=False))
@click.option("--no-enable", is_flag=True, help="Write the unit and the user only; do not enable or start.")
def install(data_dir: str, user: str, unit_dir: str, no_enable: bool) -> None:
    """Create the system user, write the unit, enable and start it (root)."""
    path = Path(unit_dir) / "scsi-target.service"
    try:
        if shutil.which("useradd") and subprocess.run(["id", "-u", user], capture_output=True).returncode:
            subprocess.run(["useradd", "--system", "--home-dir", data_dir, "--no-create-home",
                            "--shell", "/usr/sbin/nologin", user], check=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(unit_text(_exec_start(), data_dir, user))
        os.chmod(path, 0o644)
    except (OSError, subprocess.CalledProcessError) as e:
        click.echo(f"scsi-target service: {e}", err=True)
        sys.exit(1)
    click.echo(f"wrote {path}")
    if no_enable:
        return
    for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "scsi-target.service"]):
        if subprocess.run(cmd).returncode:
            click.echo(f"scsi-target service: `{' '.join(cmd)}` failed", err=True)
            sys.exit(1)
    click.echo("started: `systemctl status scsi-target`, `journalctl -u scsi-target`")
