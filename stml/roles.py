"""Who may do what at the STML (decision 0242): a front end registers and
serves its initiators; a manager sends `mgmt`. Least privilege: a front end,
even one admitted over CURVE, cannot change what it may reach (the ACL,
LUNs) or start a trace of everyone's data.

Two things tell the roles apart:
- A CURVE peer (tcp://) has the role of the list that admitted its key,
  `[stml] allowed_front_ends` or `allowed_managers`: the ZAP handler
  (RoleAuthenticator) gives its connection that User-Id, which ZeroMQ
  attaches to each of its messages. The STML reads it only for the messages
  GUARDS names (register, mgmt), never per command.
- Any peer: an identity registered as a front end is one, and its `mgmt`
  is refused. Same-host peers (ipc://, the stream socket) have no User-Id:
  file permissions admit them, in either role. Plain loopback TCP has none
  either, and is served only with --insecure (decision 0246).
- A peer without a key on plain TCP (`--insecure`) may register, but may
  manage only from this host: a loopback address (decision 0244). Nothing
  proves who it is, so nothing may let it change what others reach.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable

import zmq
from zmq import Context
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from stml.api import Op
from stml.config import ConfigError, CurveKey, StmlSettings

log = logging.getLogger("stml")

FRONT_END, MANAGER = "front-end", "manager"   # the ZAP User-Ids
LISTS = {FRONT_END: "allowed_front_ends", MANAGER: "allowed_managers"}


@dataclass(frozen=True)
class Guard:
    """What a guarded message needs of its peer, and the refusals (one line
    each: the management client prints it as it is)."""
    role: str                 # the User-Id a CURVE peer needs
    wrong_key: str            # a CURVE peer with another role
    registered: str | None    # an identity registered as a front end (None: no matter)
    keyless: str | None       # a peer without a key, not on this host ({address}; None: no matter)


GUARDS: dict[str, Guard] = {
    Op.MGMT.value: Guard(MANAGER, "management refused: this peer is a front end, not a manager "
                                  "(its key is not in [stml] allowed_managers)",
                         "management refused: this peer is a front end",
                         "management refused: plain TCP from {address}, not this host (manage over "
                         "ipc:// or loopback, or over CURVE with a key in [stml] allowed_managers)"),
    Op.REGISTER.value: Guard(FRONT_END, "registration refused: this peer is a manager, not a front end "
                                        "(its key is not in [stml] allowed_front_ends)", None, None),
}


def on_this_host(address: str | None) -> bool:
    """Whether a peer without a key is on this host, by its ZeroMQ Peer-Address:
    a loopback IP, or an ipc:// peer ("localhost:UID:GID:PID"). None is the
    stream carrier's peer (a Unix socket). Anything else, an unknown form or
    "" (a ZeroMQ peer whose address ZeroMQ does not give) included, is not."""
    if address is None or address.startswith("localhost:"):
        return True
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)   # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def refusal(op: str, user_id: str | None, registered: bool, address: str | None = None) -> str | None:
    """Why the guarded message `op` is refused from this peer, or None.
    `user_id`: its connection's ZAP User-Id (None: no ZAP); `registered`:
    its identity is a registered front end; `address`: where a peer without
    ZAP is (on_this_host)."""
    guard = GUARDS[op]
    if user_id is not None and user_id != guard.role:
        return guard.wrong_key
    if registered and guard.registered is not None:
        return guard.registered
    if user_id is None and guard.keyless is not None and not on_this_host(address):
        return guard.keyless.format(address=address or "an unknown address")
    return None


def allow_list(settings: StmlSettings) -> dict[bytes, tuple[str, str]]:
    """Z85 public key -> (role, where the config names it), from both lists.
    A key in both is a ConfigError: its peer would hold both roles, and
    management would again be open to a front end."""
    from scsi_runtime.curvekeys import load_key_file
    keys: dict[bytes, tuple[str, str]] = {}
    for role, setting in LISTS.items():
        entry: CurveKey
        for entry in getattr(settings, setting):
            named = entry.text if entry.is_file else "listed key"
            try:
                key = load_key_file(entry.text)[0] if entry.is_file else entry.text.encode()
            except ValueError as e:
                raise ConfigError(f"stml.{setting}", str(e)) from None
            other = keys.get(key)
            if other is not None and other[0] != role:
                raise ConfigError("stml", f"key {key.decode()} is in both allowed_front_ends ({other[1]}) and "
                                          f"allowed_managers ({named}): a peer has one role")
            keys[key] = (role, named)
    return keys


# a refused key is said again after this many refusals (ten minutes of a front
# end's retries); at most this many refused keys are remembered
REFUSAL_REMIND = 120
REFUSED_KEYS_KEPT = 1024


class CurveAllowList:
    """ZAP credentials: the keys of both lists; a key in neither is refused.
    A refused peer tries again every few seconds, forever: its key is said
    once, then every REFUSAL_REMIND refusals (decision 0703)."""

    def __init__(self, keys: dict[bytes, tuple[str, str]]) -> None:
        self.keys = keys
        self.refused: dict[bytes, int] = {}   # key -> refusals since it was last admitted

    def callback(self, domain: str, key: bytes) -> bool:
        known = self.keys.get(key)
        if known is not None:
            before = self.refused.pop(key, 0)
            log.info("CURVE key %s (%s, %s) admitted%s", key.decode(), known[1], known[0],
                     f" after {before} refusals" if before else "")
            return True
        count = self.refused.get(key, 0) + 1
        if count == 1 and len(self.refused) >= REFUSED_KEYS_KEPT:
            self.refused.clear()   # many strangers: each is said again, once
        self.refused[key] = count
        if count == 1:
            log.warning("refused a peer with unknown CURVE key %s: not in [stml] allowed_front_ends "
                        "or allowed_managers (said again every %d refusals)", key.decode(), REFUSAL_REMIND)
        elif count % REFUSAL_REMIND == 0:
            log.warning("still refusing CURVE key %s (%d refusals)", key.decode(), count)
        return False

    def role(self, key: bytes) -> str:
        """The User-Id of an admitted key (Z85); "" for another (never admitted)."""
        known = self.keys.get(key)
        return known[0] if known is not None else ""


class RoleAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, answering with the peer's role as its User-Id
    (instead of its public key)."""

    def __init__(self, ctx: Context, keys: CurveAllowList) -> None:
        super().__init__(ctx, log=logging.getLogger("stml.zap"))
        self.keys = keys

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("*", self.keys)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.keys.role(z85.encode(client_public_key))


# why a peer's handshake failed before ZAP was asked (libzmq's protocol error
# codes), as an administrator can act on it; another code is named as it is
HANDSHAKE_FAILURES: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its server key is not this STML's public key {key} (the front "
                                           "end's --stml-key?)",
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it does not use CURVE (a front end without --stml-key?)",
}


class FailedHandshakes:
    """The STML's line for a CURVE handshake that fails before its ZAP
    handler is asked, as with a front end holding another server key
    (decision 0709; the front end says it too, 0703). Fed the ROUTER's
    socket monitor events: an accepted connection's peer is read then
    (`peer_of(fd, endpoint)`, None if already gone), a failure is told by
    the end of its connection, which follows it. Said once per endpoint,
    again when the reason or the peer changes (a peer not read is none),
    and every REFUSAL_REMIND failures in a row."""

    def __init__(self, public: str, peer_of: Callable[[int, str], str | None]) -> None:
        self.public = public
        self.peer_of = peer_of
        self.peers: dict[int, str | None] = {}   # fd -> peer, for connections not yet ended
        self.failed: str | None = None           # why the connection ending next failed its handshake
        # local endpoint (one per address the STML listens on) -> (why, peer, failures in a row)
        self.said: dict[str, tuple[str, str | None, int]] = {}

    def event(self, event: int, value: int, endpoint: str) -> None:
        if event == zmq.EVENT_ACCEPTED:
            if len(self.peers) >= REFUSED_KEYS_KEPT:
                self.peers.clear()   # (ends never heard of: bounded all the same)
            self.peers[value] = self.peer_of(value, endpoint)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            why = HANDSHAKE_FAILURES.get(value, f"protocol error {value:#x}")
            self.failed = why.format(key=self.public)
        elif event == zmq.EVENT_DISCONNECTED:
            peer = self.peers.pop(value, None)
            failed, self.failed = self.failed, None
            if failed is not None:
                self._say(endpoint, failed, peer)

    def _say(self, endpoint: str, why: str, peer: str | None) -> None:
        said_why, said_peer, count = self.said.get(endpoint, ("", None, 0))
        # a peer not read in time (None) is no change, either way
        same = why == said_why and (peer is None or said_peer is None or peer == said_peer)
        peer = peer or said_peer
        count = count + 1 if same else 1
        self.said[endpoint] = (why, peer, count)
        at = f"at {peer}" if peer else "at an address gone before it was read"
        if count == 1:
            log.warning("a peer %s failed the CURVE handshake on %s: %s (said again if that changes, and every "
                        "%d failures)", at, endpoint, why, REFUSAL_REMIND)
        elif count % REFUSAL_REMIND == 0:
            log.warning("still failing CURVE handshakes on %s (a peer %s, %d in a row): %s", endpoint, at, count,
                        why)


def accepted_peer(fd: int, endpoint: str) -> str | None:
    """The host of the peer on a connection ZeroMQ accepted on `endpoint`, or
    None. The descriptor is ZeroMQ's: it may be closed, or another's, by the
    time the monitor's event is read; a socket whose local port is not the
    endpoint's is not that connection."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    with sock:
        try:
            local, peer = sock.getsockname(), sock.getpeername()
        except OSError:
            return None
    if not isinstance(local, tuple) or not isinstance(peer, tuple) or not endpoint.endswith(f":{local[1]}"):
        return None
    return str(peer[0])
