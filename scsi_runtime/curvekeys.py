"""CURVE key files (ZeroMQ certificates) for the STML, its front ends and the
management client."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("scsi_runtime.curvekeys")


def load_key_file(path: str, secret: bool = False) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys from a ZeroMQ certificate file as `scsi-target
    keys generate` writes them (NAME.key public, NAME.key_secret both). With
    `secret`, a public file's NAME.key_secret sibling is read instead.
    Raises ValueError with a one-line reason."""
    from zmq.auth import load_certificate
    if secret and not path.endswith("_secret") and os.path.exists(path + "_secret"):
        path += "_secret"
    try:
        public, secret_key = load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable key file ({e})") from None
    if secret and not secret_key:
        raise ValueError(f"{path}: holds no secret key (give the .key_secret file)")
    if secret:
        _warn_if_readable(path)
    return public, secret_key


def _warn_if_readable(path: str) -> None:
    """A secret key that group or others can read draws a warning, as a config
    holding CHAP secrets does (stml.config): whoever reads it can pass for
    this STML, front end or manager."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o044:
        log.warning("%s holds a CURVE secret key and is readable by %s (mode %03o); chmod 600 it",
                    path, "group and others" if mode & 0o044 == 0o044 else "group" if mode & 0o040
                    else "others", mode)


def curve_client_keys(own_key_file: str, server_key_file: str) -> dict[str, bytes]:
    """The `curve` argument of FrontEndLink: our key pair and the STML's public key."""
    public, secret = load_key_file(own_key_file, secret=True)
    assert secret is not None   # load_key_file raises when a secret is asked for and absent
    server, _ = load_key_file(server_key_file)
    return {"public": public, "secret": secret, "server": server}

