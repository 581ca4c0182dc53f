"""`scsi-target keys`: CURVE key pairs for the STML and its remote peers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import zmq


def write_key_pair(directory: str | Path, name: str) -> tuple[Path, Path, str]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) in ZeroMQ's
    certificate format; return both paths and the public key (Z85)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    pub_path, sec_path = d / f"{name}.key", d / f"{name}.key_secret"
    for path in (pub_path, sec_path):
        if path.exists():
            raise FileExistsError(f"{path} exists: not overwriting a key")
    head = "#   ZeroMQ CURVE key written by scsi-target keys generate\n"
    body = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    # the secret is written to a fresh 0600 file (O_EXCL: never a stale file or a
    # symlink), made durable, then linked in place: never half-written, never
    # readable by others, and link() refuses to replace a key that appeared meanwhile
    tmp = d / f".{name}.key_secret.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)       # whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(head + "#   SECRET: keep this file private\n" + body
                    + f'    secret-key = "{secret.decode()}"\n')
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, sec_path)
    finally:
        os.unlink(tmp)
    with open(pub_path, "w") as f:
        f.write(head + body)
    return pub_path, sec_path, public.decode()


# where the STML's config names a key pair of each role (docs/decisions/0242)
USES = {
    "stml": "the STML's own: name {sec} in [stml] curve_secret_key_file",
    "front-end": "a remote front end's: list {pub} (or the key) in [stml] allowed_front_ends; "
                 "it cannot manage",
    "manager": "a remote management client's: list {pub} (or the key) in [stml] allowed_managers; "
               "it cannot register as a front end",
}


@click.group()
def keys() -> None:
    """CURVE key pairs: the STML has one, and so does each remote front end or
    management client. The STML lists front ends' public keys in [stml]
    allowed_front_ends and management clients' in allowed_managers, a key in
    one list only: a front end's key cannot manage."""


@keys.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="", help="File name stem (default: the host name).")
@click.option("--role", type=click.Choice(list(USES)),
              help="Whose key: the STML's, a front end's (allowed_front_ends) or a management "
                   "client's (allowed_managers); the output says where it goes.")
def generate(directory: str, name: str, role: str | None) -> None:
    """Write a key pair in DIRECTORY: NAME.key (public) and NAME.key_secret (0600)."""
    name = name or os.uname().nodename
    try:
        pub, sec, public = write_key_pair(directory, name)
    except (FileExistsError, OSError) as e:
        click.echo(f"scsi-target keys: {e}", err=True)
        sys.exit(1)
    click.echo(f"public key: {public}\npublic file: {pub}\nsecret file: {sec}")
    for r in [role] if role else list(USES):
        click.echo(f"as {r}: " + USES[r].format(pub=pub, sec=sec))


@keys.command()
@click.argument("key_file", type=click.Path(dir_okay=False, exists=True))
def show(key_file: str) -> None:
    """Print the public key of a key file."""
    from scsi_runtime.curvekeys import load_key_file
    try:
        public, _ = load_key_file(key_file)
    except ValueError as e:
        click.echo(f"scsi-target keys: {e}", err=True)
        sys.exit(1)
    click.echo(public.decode())
