"""How a client finds the STML: the endpoint its options name, and whether
anything serves it. The CLI's verbs (scsi_target.cli) and the management
verbs (scsi_target.mgmt) both use it; its own module, so neither imports the
other for it."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import click

from stml.config import ConfigError, default_data_dir, default_endpoint, load


def inherited(kw: dict[str, Any]) -> dict[str, Any]:
    """A verb's options, with what was given before the verb filling the gaps."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root().obj if ctx is not None else None
    for key, value in (root or {}).items():
        if kw.get(key) is None and value is not None:
            kw[key] = value
    return kw


def find_endpoint(config_path: str | None, data_dir: str | None, stml: str | None) -> str:
    """The STML endpoint a client's options name: --stml, else its config's, else the data dir's."""
    if stml:
        return stml
    if config_path:
        try:
            return load(config_path, data_dir).stml_endpoint
        except ConfigError as e:
            click.echo(f"scsi-target: config error: {e}", err=True)
            sys.exit(2)
    return default_endpoint(Path(data_dir).absolute() if data_dir else default_data_dir())


PROBE_TIMEOUT = 0.5   # a live STML accepts a connection at once


class NotRunning(ConnectionError):
    """No STML serves the endpoint: say so in one line, at once."""


def require_running(endpoint: str) -> None:
    """A connect attempt with a short timeout, before any ZeroMQ socket: a
    stale ipc socket file (a target stopped by SIGKILL, or a Ctrl-C'd one's
    leftovers) refuses it at once, instead of a 10-30 s wait for an answer
    that cannot come. The lock beside it (`stml.sock.lock`) keeps two STMLs
    from serving one endpoint; this tells whether one does."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        ddir = os.path.dirname(path)
        hint = (f"no target is running in {ddir} (started with: scsi-target run --data-dir {ddir})"
                if os.path.basename(path) == "stml.sock" else f"no STML is serving {endpoint}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(PROBE_TIMEOUT)
            try:
                s.connect(path)
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError, OSError):
                raise NotRunning(hint) from None
        return
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT * 2).close()
    except (OSError, ValueError) as e:
        raise NotRunning(f"no STML answers at {endpoint}: {e}") from None
