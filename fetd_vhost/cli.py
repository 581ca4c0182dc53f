"""The vhost-user-scsi front end's command line (`python -m fetd_vhost`,
`scsi-target fetd-vhost`)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import click

MAX_POLL_US = 10_000    # a window longer than this is a mistyped number, not a latency trade


@click.command("fetd-vhost")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="The vhost-user socket to create (mode 0600) for QEMU's "
                   "vhost-user-scsi-pci device.")
@click.option("--target", required=True, help="The target (IQN) whose LUNs the VM sees.")
@click.option("--stml", "stml_endpoint", required=True, help="STML endpoint (ipc://PATH or tcp://HOST:PORT).")
@click.option("--initiator", help="The VM's initiator port name (default: derived from the socket path).")
@click.option("--group", help="Give the socket to this group, mode 0660, for a QEMU that runs as "
                              "another user in it (default: mode 0600, this user only).")
@click.option("--stml-key", type=click.Path(dir_okay=False),
              help="The STML's public key file (CURVE over tcp://).")
@click.option("--key", "own_key", type=click.Path(dir_okay=False), help="This front end's key pair.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--poll-us", type=click.IntRange(0, MAX_POLL_US), default=0, show_default=True, metavar="US",
              help="After the last answer, watch the VM's request queues this long for its next "
                   "request before sleeping: less latency for a CPU kept busy (0: off).")
@click.option("--inject", "inject", multiple=True, metavar="RULE",
              help="A fault-injection rule for this front end's link, repeatable: 'fetd:KIND OP "
                   "[at=N|p=P seed=S] [ms=..]' (docs/research.md, \"Fault injection\").")
@click.option("--inject-file", "inject_files", multiple=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="Fault-injection rules, one a line (# comments), repeatable.")
def main(socket_path: str, target: str, stml_endpoint: str, initiator: str | None, group: str | None,
         stml_key: str | None, own_key: str | None, log_level: str, poll_us: int, inject: tuple[str, ...],
         inject_files: tuple[str, ...]) -> None:
    """Serve a target's LUNs to a QEMU VM (vhost-user-scsi).

    One process per VM: it creates the socket QEMU's vhost-user-scsi-pci
    device connects to, and the VM sees the target's LUNs as its disks."""
    from fetd_vhost.server import run_fetd_vhost
    from scsi_runtime.logs import setup_logging
    from scsi_runtime.curvekeys import curve_client_keys
    from scsi_runtime.loop import run_loop
    setup_logging(log_level, "fetd_vhost")
    from stml.api.inject import RuleError, front_end_rules
    try:
        rules = front_end_rules(inject, inject_files)
    except RuleError as e:
        click.echo(f"scsi-target: {e}", err=True)
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
    try:
        gid = None if group is None else group_id(group)
    except ValueError as e:
        click.echo(f"scsi-target: config error: {e}", err=True)
        sys.exit(2)
    from stml.api import RegistrationRefused
    try:
        run_loop(run_fetd_vhost(stml_endpoint, socket_path, target, initiator, curve, rules, gid, poll_us))
    except OSError as e:
        click.echo(f"scsi-target: fetd-vhost: cannot listen on {socket_path}: {e}", err=True)
        sys.exit(2)
    except RegistrationRefused as e:
        click.echo(f"scsi-target: fetd-vhost: the STML refused this front end: {e}", err=True)
        sys.exit(2)


def group_id(group: str) -> int:
    """A group's gid, by name or number. Raises ValueError."""
    import grp
    try:
        return grp.getgrnam(group).gr_gid if not group.isdigit() else grp.getgrgid(int(group)).gr_gid
    except KeyError:
        raise ValueError(f"no group {group}") from None


# ------------------------------------------------------------------ `scsi-target run --vhost`

OPTIONS = ("target", "initiator", "group")     # what a --vhost flag or [[vhost]] table may set (strings)


@dataclass(frozen=True)
class VhostSpec:
    socket: str
    target: str | None = None
    initiator: str | None = None
    group: str | None = None
    poll_us: int | None = None     # None: `run` decides (its placement, decision 0312)


def _poll_us(value: object, where: str) -> int:
    """A poll window: an integer 0..MAX_POLL_US. Raises ValueError."""
    try:
        n = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else -1
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_POLL_US:
        raise ValueError(f"{where}: poll_us must be an integer from 0 to {MAX_POLL_US}, not {value!r}")
    return n


def parse_vhost(value: str, where: str = "--vhost") -> VhostSpec:
    """PATH[,target=IQN][,initiator=NAME][,group=GROUP][,poll_us=US]. Raises ValueError."""
    path, *opts = value.split(",")
    if not path:
        raise ValueError(f"{where}: {value!r} names no socket path")
    kw: dict[str, str] = {}
    poll: int | None = None
    for opt in opts:
        key, eq, val = opt.partition("=")
        if key == "poll_us" and eq:
            poll = _poll_us(val, where)
            continue
        if not eq or key not in OPTIONS or not val:
            raise ValueError(f"{where}: {opt!r} is not target=IQN, initiator=NAME, group=GROUP or poll_us=US")
        kw[key] = val
    return VhostSpec(path, **kw, poll_us=poll)


def vhost_specs(config: Any, flags: tuple[str, ...]) -> list[VhostSpec]:
    """The VM sockets to serve: --vhost flags, then the config file's [[vhost]]
    tables ({socket, target?, initiator?, group?, poll_us?}). Raises ValueError."""
    specs = [parse_vhost(f) for f in flags]
    tables = config.raw.get("vhost", [])
    if not isinstance(tables, list):
        raise ValueError("vhost: must be [[vhost]] tables")
    for i, t in enumerate(tables):
        where = f"vhost[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("socket"), str) \
                or set(t) - {"socket", "poll_us", *OPTIONS} \
                or not all(isinstance(t.get(k, ""), str) for k in OPTIONS):
            raise ValueError(f"{where}: needs socket = PATH, and may have target, initiator and group "
                             f"(strings) and poll_us (an integer)")
        socket = t["socket"]
        if config.path is not None and not os.path.isabs(socket):
            socket = str(config.path.parent / socket)
        poll = _poll_us(t["poll_us"], where) if "poll_us" in t else None
        specs.append(VhostSpec(socket, t.get("target"), t.get("initiator"), t.get("group"), poll))
    names = {t.name for t in config.targets}
    for s in specs:
        if s.target is not None and s.target not in names:
            raise ValueError(f"vhost socket {s.socket}: no target {s.target}")
        if s.group is not None:
            try:
                group_id(s.group)
            except ValueError as e:
                raise ValueError(f"vhost socket {s.socket}: {e}") from None
        if not names:
            raise ValueError(f"vhost socket {s.socket}: the configuration has no target to serve")
    if len({s.socket for s in specs}) != len(specs):
        raise ValueError("vhost: a socket path is used twice")
    return specs


vhost_option = click.option(
    "--vhost", "vhost", multiple=True, metavar="PATH[,target=IQN][,group=GROUP]",
    help="Also serve a VM on this vhost-user-scsi socket, for this run only (repeatable; default "
         "target: the first; group: the socket is 0660 in it). [[vhost]] tables serve at every start.")


def vhost_children(config: Any, flags: tuple[str, ...], log_level: str) -> dict[str, list[str]]:
    """`scsi-target run`'s fetd_vhost children, one per socket (exits 2 on a bad setting)."""
    try:
        specs = vhost_specs(config, flags)
    except ValueError as e:
        click.echo(f"scsi-target: config error: {e}", err=True)
        sys.exit(2)
    children = {}
    for i, s in enumerate(specs):
        target = s.target or config.targets[0].name
        argv = [sys.executable, "-m", "fetd_vhost", "--socket", s.socket, "--target", target,
                "--stml", config.stml_endpoint, "--log-level", log_level]
        if s.initiator:
            argv += ["--initiator", s.initiator]
        if s.group:
            argv += ["--group", s.group]
        if s.poll_us is not None:
            argv += ["--poll-us", str(s.poll_us)]
        children[f"fetd_vhost{i}" if i else "fetd_vhost"] = argv
        # a flag is not saved in the config file: a later start without it serves no such socket
        once = "; this run only: a [[vhost]] table serves it at every start" if i < len(flags) else ""
        click.echo(f"vhost-user-scsi socket: {s.socket} (target {target}{once})")
    return children
