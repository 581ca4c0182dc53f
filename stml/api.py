"""The STML <-> front end contract (version 1.3). Front ends import this module only.

Transport: ZeroMQ. The STML binds a ROUTER socket; each front end connects a
DEALER socket whose routing id names it. A message is a multipart message:
frame 0 is a msgpack map (the header), any further frames are raw bulk data
(never inside msgpack, so they move without copies). Every header has "op".

Batching: messages sent in one event-loop iteration to the same peer may
travel as one ZeroMQ message: a header {op: "batch", n: [frames of each
message]} followed by each message's frames (header first). Receivers split
it and handle the messages in order.

Same host: beside each ipc://PATH endpoint the STML also listens on a Unix
stream socket, PATH.stream, that carries the same messages, each as a
little-endian u32 frame count, a u32 length per frame, then the frames. A
front end given ipc://PATH uses it when it exists: every ZeroMQ message
crosses an I/O thread on each side, four thread wake-ups per command that
cost more than the command itself on small I/O. ZeroMQ stays the carrier
for tcp:// (remote front ends, CURVE) and for any peer that prefers it. On
the stream, bulk data does not cross the socket: each side shares a memfd
region with the other (SCM_RIGHTS) and sends (offset, length) references
into it: the STML its read data of 32 KiB and more, which the front end
hands back once sent; a front end its write data received in segments of
64 KiB and more, which the STML hands back once the command no longer uses
it (StreamChannel documents the control messages that carry this). The
front end's region is new in 1.2; a 1.1 STML closes a stream that brings
one, so a same-host front end comes from the same install as its STML.

Front end -> STML
-----------------
register_target_front_end  {op, version: [major, minor], kind: str, name: str,
                            heartbeat_ms: int, aen: bool}
    Announce a front end. The STML answers `detect`, or `detect` with "error"
    when the major version differs (the front end must not go on).
deregister_target_front_end {op}
    Orderly goodbye: the STML releases every nexus of this front end.
register_nexus   {op, nexus: int, initiator: str, target: str, tpg: int}
    A new I_T nexus (iSCSI: a session; initiator is "IQN,i,0xISID").
    `nexus` is chosen by the front end, unique within it. Answered by
    `nexus_ready` {op, nexus, error?}. A target name over MAX_NAME_LEN (223)
    bytes, or an initiator over MAX_PORT_NAME_LEN, is refused (error).
scsi_release     {op, nexus: int}
    The nexus is gone: free its state and abort its tasks (I_T nexus loss).
rx_cmnd          {op, tag: int, nexus: int, lun: int, cdb: bytes, attr: int,
                  dir: int, len: int, unsol: int}  + frames: immediate data
    A new SCSI command. `tag` is the front end's task id (unique among its
    live tasks), `attr` a TaskAttr, `dir` a DataDir bit set, `len` the
    initiator's expected data transfer length, `unsol` how many bytes of
    write data arrive without `rdy_to_xfer` (immediate + unsolicited).
scsi_rx_data     {op, tag, offset: int, error?: str}  + frames: write data at offset
    Write data: unsolicited data, or data that `rdy_to_xfer` asked for.
    With `error`, the transport could not deliver the data (e.g. an iSCSI
    DataSN error): the STML ends the command with ABORTED COMMAND.
rx_task_mgmt_fn  {op, tag, nexus, fn: int, lun: int, ref: int|None}
    A task management function (TMF); `ref` is the tag of the task for
    ABORT TASK / QUERY TASK.
scsi_target_done {op, tags: [int]}
    Responses delivered to the initiator (batched); ends the tasks'
    accounting in the STML.
heartbeat        {op, usage?: {str: int}}
    `usage` (1.3): what the front end buffers (bytes: limit, used, peak, and
    by kind), shown by `status`; a front end that sends it sends a heartbeat
    every interval, busy or not, so the figures stay fresh.
portal_state     {op, follows: bool, portals: [{host, port, tpgt, listening: bool,
                  bound_port?: int, error?: str}]}
    (optional) An iSCSI front end that follows the STML's portal list says,
    after each change of it, which portals it listens on and why not the
    others; `portal add` waits for it, `portal list` and `status` show it.
    An STML that does not know it logs and ignores it.

STML -> front end
-----------------
detect           {op, version, stml: str, targets: [Target], limits: {...},
                  discovery: {chap: {...}|None}, heartbeat_ms,
                  portals: [{host: str, port: int, tpgt: int}], error?: str}
    Target = {name, alias, luns: [Lun], access: {acl: [iqn], chap: {...}|None,
    mutual: {...}|None}}; Lun = {lun, block_size, blocks, ro, removable}.
    `portals` (1.1) is the STML's configured portal list (`portal add|remove`
    change it): an iSCSI front end started without portals of its own listens
    on exactly these, opening and closing listeners as the list changes; one
    started with its own portals (e.g. on another host) keeps those and
    ignores the list. Port 0 means any free port.
    Sent again, unasked, when targets, LUNs or portals change.
nexus_ready      {op, nexus, error?: str}
release          {op, reason: str}
    The STML is going away or no longer knows this front end: register again.
rdy_to_xfer      {op, tag, offset: int, length: int}
    Send this much write data now (iSCSI: R2Ts).
xmit_response    {op, tag, status: int, sense: bytes|None, resid: int}
                 + frames: read data
    The command is done. resid > 0: underflow, resid < 0: overflow (bytes).
task_mgmt_fn_done {op, tag, response: int, aborted: [int]}
    Sent only after every task the TMF affects is gone; `aborted` lists
    their tags (aborted tasks get no xmit_response at all).
report_aen       {op, nexus: int|None, lun: int, sense: bytes}
    An asynchronous event (a unit attention) for front ends that said aen.
drop_nexus       {op, nexus: int, reason: str}     (1.1)
    End this I_T nexus (management `session drop`): the front end ends the
    session (iSCSI: an Async Message "dropping all connections", then the
    connections close) and sends `scsi_release`. The STML has already
    released the nexus when it sends this (its tasks are aborted).
heartbeat        {op}

Management (any peer the endpoint admits -> STML; no registration needed)
-------------------------------------------------------------------------
mgmt             {op, id: int, cmd: str, args: {...}}
    A management request (stml.mgmt): cmd is one of status, target_list,
    target_add {name, alias?}, target_remove {name, force?}, lun_list {target?},
    lun_add {spec, target?, lun?}, lun_remove {lun, target?},
    lun_resize {lun, size, target?}, portal_list, acl_add|acl_remove
    {initiator, target?}, chap_set {target?, user?, secret?, mutual?},
    portal_add {portal}, portal_remove {portal} (portal: "HOST:PORT[,TPGT]"),
    session_list, session_drop {nexus, front_end?}, frontend_list.
mgmt_reply       {op, id, ok: bool, result?: any, error?: str}
    STML -> the requester. Changes are hot (front ends get `detect` again,
    nexuses the unit attentions SPC names) and saved to the config file.

Security: ipc:// endpoints (and the stream socket beside each) are guarded
by file permissions; tcp:// endpoints use ZeroMQ CURVE (the STML's key pair;
a ZAP allow list of peer public keys).
"""
from __future__ import annotations

import asyncio
import ctypes
import enum
import fcntl
import functools
import logging
import mmap
import os
import socket
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import msgpack
import zmq

CONTRACT_VERSION = (1, 3)
# an iSCSI name is at most 223 bytes (RFC 7143 4.2.7.1): initiator and target names
# in register_nexus are held to it (an initiator port name adds ",i,0x" and 12 hex digits)
MAX_NAME_LEN = 223
MAX_PORT_NAME_LEN = MAX_NAME_LEN + len(",i,0x") + 12
log = logging.getLogger("stml.api")


class Op(enum.StrEnum):
    # front end -> STML
    REGISTER = "register_target_front_end"
    DEREGISTER = "deregister_target_front_end"
    REGISTER_NEXUS = "register_nexus"
    RELEASE_NEXUS = "scsi_release"
    RX_CMND = "rx_cmnd"
    RX_DATA = "scsi_rx_data"
    RX_TMF = "rx_task_mgmt_fn"
    DONE = "scsi_target_done"
    HEARTBEAT = "heartbeat"
    PORTAL_STATE = "portal_state"
    # STML -> front end
    DETECT = "detect"
    NEXUS_READY = "nexus_ready"
    RELEASE = "release"
    RDY_TO_XFER = "rdy_to_xfer"
    XMIT_RESPONSE = "xmit_response"
    TMF_DONE = "task_mgmt_fn_done"
    REPORT_AEN = "report_aen"
    DROP_NEXUS = "drop_nexus"


class DataDir(enum.IntFlag):
    NONE = 0
    WRITE = 1   # initiator -> target
    READ = 2    # target -> initiator


class TaskAttr(enum.IntEnum):
    SIMPLE = 0
    ORDERED = 1
    HEAD_OF_QUEUE = 2
    ACA = 3


class Tmf(enum.IntEnum):
    """Task management functions (values follow iSCSI's TMF function codes)."""
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LUN_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8
    QUERY_TASK = 9
    QUERY_TASK_SET = 10
    I_T_NEXUS_RESET = 11
    QUERY_ASYNC_EVENT = 12


class TmfResponse(enum.IntEnum):
    """TMF service responses (values follow iSCSI's TMF response codes)."""
    COMPLETE = 0
    NO_TASK = 1
    NO_LUN = 2
    TASK_ALLEGIANT = 3
    NO_REASSIGN = 4
    NOT_SUPPORTED = 5
    NOT_AUTHORIZED = 6   # "function authorization failed": e.g. a target reset the target refuses
    SUCCEEDED = 7   # QUERY TASK/TASK SET/ASYNC EVENT: "function succeeded" (RFC 7144)
    REJECTED = 255


# One Packer for every header: msgpack.packb makes a Packer (and its buffer) per
# call, half the cost of packing a command's header. Shared by threads safely:
# pack() runs whole under the GIL (headers hold no type that calls Python code).
_PACKER = msgpack.Packer(use_bin_type=True)


def pack(header: dict[str, Any]) -> bytes:
    return _PACKER.pack(header)


def unpack(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode a header; raises ValueError for anything that is not a map with an op."""
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise ValueError(f"undecodable header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ValueError("header is not a map with an 'op'")
    return header


def version_compatible(version: Any) -> str | None:
    """None when a front end's contract version can talk to us, else the reason."""
    if (not isinstance(version, (list, tuple)) or len(version) != 2
            or not all(isinstance(v, int) for v in version)):
        return "missing or malformed contract version"
    if version[0] != CONTRACT_VERSION[0]:
        return (f"contract version {version[0]}.{version[1]} is not compatible with "
                f"the STML's {CONTRACT_VERSION[0]}.{CONTRACT_VERSION[1]} (major differs)")
    return None


@dataclass(frozen=True, slots=True)
class Lun:
    lun: int
    block_size: int
    blocks: int
    ro: bool = False
    removable: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    luns: tuple[Lun, ...]
    alias: str = ""
    access: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Detect:
    """What the STML offers a front end, decoded from a `detect` message."""
    stml: str
    targets: tuple[Target, ...]
    limits: dict[str, Any]
    discovery: dict[str, Any] = field(default_factory=dict)
    portals: tuple[tuple[str, int, int], ...] = ()   # (host, port, tpgt) the STML's config names

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> Detect:
        targets = tuple(
            Target(t["name"], tuple(Lun(**lun) for lun in t["luns"]), t.get("alias", ""),
                   t.get("access") or {})
            for t in h.get("targets", ()))
        portals = tuple((str(p["host"]), int(p["port"]), int(p.get("tpgt", 1)))
                        for p in h.get("portals") or ())
        return cls(h.get("stml", ""), targets, h.get("limits", {}), h.get("discovery") or {}, portals)

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)


def parse_portal(value: str) -> tuple[str, int, int]:
    """(host, port, tpgt) of "HOST:PORT[,TPGT]", "[V6ADDR]:PORT[,TPGT]" or "HOST"
    (port 3260, TPGT 1); IPv6 is never split on ':'. Raises ValueError."""
    import re
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.%\w]+)\]|([^:\[\],]+))(?::(\d+))?(?:,(\d+))?", value.strip())
    if not m:
        raise ValueError(f"portal {value!r} is not HOST:PORT[,TPGT] or [IPv6]:PORT[,TPGT]")
    port = int(m.group(3) or 3260)
    tpgt = int(m.group(4) or 1)
    if port > 65535 or not 1 <= tpgt <= 65535:
        raise ValueError(f"portal {value!r}: port or TPGT out of range")
    return m.group(1) or m.group(2), port, tpgt


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
    return public, secret_key


def curve_client_keys(own_key_file: str, server_key_file: str) -> dict[str, bytes]:
    """The `curve` argument of FrontEndLink: our key pair and the STML's public key."""
    public, secret = load_key_file(own_key_file, secret=True)
    assert secret is not None   # load_key_file raises when a secret is asked for and absent
    server, _ = load_key_file(server_key_file)
    return {"public": public, "secret": secret, "server": server}


class FrontEndHandler(Protocol):
    """What a front end implements to receive STML calls (all on the event loop)."""

    def detect(self, detect: Detect) -> None: ...
    def nexus_ready(self, nexus: int, error: str | None) -> None: ...
    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None: ...
    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int,
                      data: list) -> None: ...
    # `data`: buffers (bytes or memoryviews), valid until the end of this loop
    # iteration (they may be shared memory the STML takes back): send or copy them.
    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int]) -> None: ...
    def report_aen(self, nexus: int | None, lun: int, sense: bytes) -> None: ...
    def link_lost(self) -> None: ...
    # optional (1.1): end a nexus the STML dropped; without it the link just releases it
    # def drop_nexus(self, nexus: int, reason: str) -> None: ...
    # optional: everything one read from the STML brought has been delivered: a
    # front end may send its output now rather than at the end of the iteration
    # def messages_handled(self) -> None: ...
    # optional (1.3): what it buffers, sent with every heartbeat for `status`
    # def usage(self) -> dict[str, int]: ...


class RegistrationRefused(Exception):
    """The STML refused this front end (e.g. incompatible contract version)."""


class FrontEndLink:
    """A front end's end of the contract: connect, register, heartbeat, and
    re-register by itself when the STML restarts or forgets us.

    Calls toward the STML are plain methods that queue a message; STML calls
    arrive on `handler`. Nexuses registered through the link are registered
    again after a reconnect, so sessions survive an STML restart.

    Given several endpoints (the STMLs of gateways sharing storage, one of
    them serving), the link moves on to the next when one answers that it is
    a standby, or stays silent: it ends up with the one that serves.
    """

    def __init__(self, endpoint: str | Sequence[str], kind: str, handler: FrontEndHandler, *,
                 name: str | None = None, heartbeat_ms: int = 1000, aen: bool = True,
                 version: tuple[int, int] = CONTRACT_VERSION,
                 context: zmq.Context | None = None,
                 curve: dict[str, bytes] | None = None) -> None:
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        self.endpoint = self.endpoints[0]
        self._trying_since = time.monotonic()   # when the link began asking self.endpoint
        self.kind = kind
        self.name = name or f"{kind}-{os.uname().nodename}-{os.getpid()}"
        self.handler = handler
        self.heartbeat = heartbeat_ms / 1000
        self.aen = aen
        self.version = version
        self.ctx = context or zmq.Context.instance()
        self.curve = curve
        self.connected = asyncio.Event()
        self.detect_info: Detect | None = None
        self.nexuses: dict[int, dict[str, Any]] = {}
        self._channel: Channel | StreamChannel | None = None
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._last_usage = 0.0
        self._ended: asyncio.Future | None = None
        self._timer: asyncio.Task | None = None
        self._monitor: tuple[zmq.Socket, int] | None = None   # the CURVE handshake watch
        self._dispatch: dict[str, Callable[[dict[str, Any], list], None]] = {
            Op.DETECT: self._on_detect,
            Op.NEXUS_READY: lambda h, f: handler.nexus_ready(h["nexus"], h.get("error")),
            Op.RELEASE: self._on_release,
            Op.RDY_TO_XFER: lambda h, f: handler.rdy_to_xfer(h["tag"], h["offset"], h["length"]),
            Op.XMIT_RESPONSE: lambda h, f: handler.xmit_response(
                h["tag"], h["status"], h.get("sense"), h.get("resid", 0), f),
            Op.TMF_DONE: lambda h, f: handler.task_mgmt_fn_done(h["tag"], h["response"],
                                                                h.get("aborted", [])),
            Op.REPORT_AEN: lambda h, f: handler.report_aen(h.get("nexus"), h["lun"], h["sense"]),
            Op.HEARTBEAT: lambda h, f: None,
            Op.DROP_NEXUS: self._on_drop_nexus,
        }

    # -- calls toward the STML ------------------------------------------------
    def send(self, header: dict[str, Any], data: list | tuple = ()) -> None:
        """Queue one message (never blocks; ZeroMQ buffers while disconnected)."""
        if self._channel is None:
            return
        self._last_tx = time.monotonic()
        self._channel.send([pack(header), *data])

    def register_nexus(self, nexus: int, initiator: str, target: str, tpg: int) -> None:
        info = {"initiator": initiator, "target": target, "tpg": tpg}
        self.nexuses[nexus] = info
        self.send({"op": Op.REGISTER_NEXUS, "nexus": nexus, **info})

    def scsi_release(self, nexus: int) -> None:
        if self.nexuses.pop(nexus, None) is not None:
            self.send({"op": Op.RELEASE_NEXUS, "nexus": nexus})

    def rx_cmnd(self, tag: int, nexus: int, lun: int, cdb: bytes, attr: int, direction: int,
                length: int, unsol: int = 0, data: list | tuple = ()) -> None:
        self.send({"op": Op.RX_CMND, "tag": tag, "nexus": nexus, "lun": lun, "cdb": cdb,
                   "attr": attr, "dir": direction, "len": length, "unsol": unsol}, data)

    def scsi_rx_data(self, tag: int, offset: int, data: list | tuple, error: str | None = None) -> None:
        header = {"op": Op.RX_DATA, "tag": tag, "offset": offset}
        if error:
            header["error"] = error
        self.send(header, data)

    def rx_task_mgmt_fn(self, tag: int, nexus: int, fn: int, lun: int, ref: int | None) -> None:
        self.send({"op": Op.RX_TMF, "tag": tag, "nexus": nexus, "fn": fn, "lun": lun, "ref": ref})

    def scsi_target_done(self, tags: list[int]) -> None:
        self.send({"op": Op.DONE, "tags": tags})

    def flush(self) -> None:
        """Send what is queued now instead of at the end of this loop
        iteration: a front end calls it once it has handled everything one
        read from its initiators brought, saving a loop turn per command."""
        if self._channel is not None:
            self._channel.flush()

    # -- the link's life ------------------------------------------------------
    def _open(self) -> None:
        """Connect: the stream socket beside an ipc:// endpoint when the STML
        offers one, else ZeroMQ. Until a same-host STML is there (no stream,
        and nothing listening on the ipc file, which a stopped STML leaves
        behind) there is no channel and `_heartbeats` retries, so a restarted
        STML is found on its stream (it binds that first)."""
        stream = stream_path(self.endpoint)
        if stream is not None:
            if os.path.exists(stream):
                self._open_stream(stream)
                return
            if not _listening(self.endpoint[len("ipc://"):]):
                return
        self._open_zmq()

    def _open_stream(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            log.debug("STML stream socket %s: %s", path, e)
            return
        try:
            region: SharedRegion | None = SharedRegion(name="scsi-target-write-data")
        except OSError as e:   # no memfd: write data goes through the socket
            log.warning("no shared memory for write data: %s", e)
            region = None
        self._channel = StreamChannel(sock, self._on_message, self._stream_closed, region=region,
                                      on_dispatched=getattr(self.handler, "messages_handled", None))

    def shared_buffer(self, size: int) -> memoryview | None:
        """Memory for `size` bytes of write data that reaches a same-host STML
        without crossing the socket (sent as a data frame of rx_cmnd or
        scsi_rx_data), or None: use ordinary memory. The STML hands it back
        once its command is done with it."""
        channel = self._channel
        if isinstance(channel, StreamChannel) and channel.region is not None:
            return channel.region.get(size)
        return None

    def _stream_closed(self) -> None:
        self._channel = None
        if self.connected.is_set():
            log.warning("STML at %s closed the link: re-registering", self.endpoint)
            self._lost()

    def _open_zmq(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, f"{self.name}-{uuid.uuid4().hex[:8]}".encode())
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.curve:
            sock.curve_secretkey = self.curve["secret"]
            sock.curve_publickey = self.curve["public"]
            sock.curve_serverkey = self.curve["server"]
            self._watch_handshake(sock)
        sock.connect(self.endpoint)
        self._channel = Channel(sock, self._on_message)

    def _watch_handshake(self, sock: zmq.Socket) -> None:
        """CURVE: an STML that refuses our key ends the connection for good (and
        a DEALER without a connection would block on send), so the refusal is
        logged, the socket closed, and a new one tried every few seconds (the
        key may be added to the STML's allow list meanwhile)."""
        failed = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        mon = sock.get_monitor_socket(failed)
        loop = asyncio.get_running_loop()
        fd = mon.fileno()
        self._monitor = (mon, fd)

        def on_event() -> None:
            from zmq.utils.monitor import recv_monitor_message
            # EVENTS is an int option; pyzmq types every getsockopt as int | bytes
            while mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator, arg-type]
                event = recv_monitor_message(mon)
                if not event["event"] & failed or self._channel is None or self._channel.sock is not sock:
                    continue
                how = "refused our key" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH \
                    else "failed the CURVE handshake (wrong server key?)"
                log.error("the STML at %s %s; retrying in 5s", self.endpoint, how)
                loop.remove_reader(fd)
                channel, self._channel = self._channel, None
                channel._out.clear()      # nothing may reach a send that would block
                loop.remove_reader(channel._fd)
                mon.close(linger=0)
                loop.call_later(1, sock.close, 0)   # after callbacks already queued for it
                if self.connected.is_set():
                    self._lost()
                loop.call_later(5, self._reopen)
                return

        loop.add_reader(fd, on_event)
        loop.call_soon(on_event)

    def _reopen(self) -> None:
        if self._channel is None and self._timer is not None and not self._timer.done():
            self._open()
            self._register()

    def _register(self) -> None:
        self.send({"op": Op.REGISTER, "version": list(self.version), "kind": self.kind,
                   "name": self.name, "heartbeat_ms": int(self.heartbeat * 1000),
                   "aen": self.aen})

    def start(self) -> None:
        """Connect and register; the link then runs until close()."""
        self._ended = asyncio.get_running_loop().create_future()
        self._open()
        self._register()
        self._timer = asyncio.create_task(self._heartbeats())

    async def wait_ready(self, timeout: float) -> Detect:
        """Wait for `detect`; raises RegistrationRefused or TimeoutError."""
        ended = self._ended
        assert ended is not None   # start() comes first
        ready = asyncio.ensure_future(self.connected.wait())
        await asyncio.wait([ready, ended], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if ended.done():
            ended.result()  # raises why the link ended
        if not self.connected.is_set():
            raise TimeoutError(f"no answer from the STML at {self.endpoint}")
        assert self.detect_info is not None   # _on_detect sets it before `connected`
        return self.detect_info

    def _on_message(self, frames: list) -> None:
        self._last_rx = time.monotonic()
        try:
            header = unpack(frames[0])
            handler = self._dispatch[header["op"]]
        except (ValueError, KeyError):
            log.warning("ignoring malformed message from the STML")
            return
        try:
            handler(header, frames[1:])
        except RegistrationRefused as e:
            ended = self._ended
            assert ended is not None   # messages come only after start()
            if not ended.done():
                ended.set_exception(e)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 2)
            if self._channel is None and stream_path(self.endpoint):
                self._open()
            now = time.monotonic()
            if self.connected.is_set() and now - self._last_rx > 3 * self.heartbeat:
                log.warning("STML at %s silent for %.1fs: link lost, re-registering",
                            self.endpoint, now - self._last_rx)
                self._lost()
                self._next_endpoint()
            elif not self.connected.is_set() and now - self._trying_since > 3 * self.heartbeat:
                self._next_endpoint()   # no answer from this one: another may serve
            usage = getattr(self.handler, "usage", None)
            if not self.connected.is_set():
                self._register()
            elif usage is not None and now - self._last_usage >= self.heartbeat:
                self._last_usage = now
                self.send({"op": Op.HEARTBEAT, "usage": usage()})
            elif now - self._last_tx >= self.heartbeat:
                self.send({"op": Op.HEARTBEAT})

    def _lost(self) -> None:
        self.connected.clear()
        self.handler.link_lost()

    def _next_endpoint(self) -> None:
        """Ask the next STML of the list (nothing changes with one)."""
        self._trying_since = time.monotonic()
        if len(self.endpoints) < 2:
            return
        if self._monitor is not None:
            mon, fd = self._monitor
            asyncio.get_running_loop().remove_reader(fd)
            mon.close(linger=0)
            self._monitor = None
        if self._channel is not None:
            self._channel.close(linger_ms=0)
            self._channel = None
        self.endpoint = self.endpoints[(self.endpoints.index(self.endpoint) + 1) % len(self.endpoints)]
        self._open()

    def _on_detect(self, header: dict[str, Any], frames: list) -> None:
        if header.get("standby"):
            # a gateway that does not serve now: ask the next one, or this one
            # again at the next heartbeat (it may take over meanwhile)
            log.info("STML at %s is a standby (%s)", self.endpoint, header.get("error"))
            if self.connected.is_set():
                self._lost()
            self._next_endpoint()
            return
        if header.get("error"):
            raise RegistrationRefused(header["error"])
        was_connected = self.connected.is_set()
        self.detect_info = Detect.from_header(header)
        self.connected.set()
        if not was_connected:
            for nexus, info in self.nexuses.items():
                self.send({"op": Op.REGISTER_NEXUS, "nexus": nexus, **info})
        self.handler.detect(self.detect_info)

    def _on_drop_nexus(self, header: dict[str, Any], frames: list) -> None:
        nexus = header["nexus"]
        drop = getattr(self.handler, "drop_nexus", None)
        if drop is not None:
            drop(nexus, str(header.get("reason", "")))
        self.scsi_release(nexus)   # no-op when the handler already released it

    def _on_release(self, header: dict[str, Any], frames: list) -> None:
        log.info("STML released us (%s); registering again", header.get("reason"))
        if self.connected.is_set():
            self._lost()
        self._register()

    async def close(self) -> None:
        """Deregister (best effort) and stop."""
        if self._channel is None:
            return
        if self.connected.is_set():
            self.send({"op": Op.DEREGISTER})
        assert self._timer is not None   # a channel is opened only by start() and the timer's retries
        self._timer.cancel()
        await asyncio.gather(self._timer, return_exceptions=True)
        self._channel.close(linger_ms=200)
        self._channel = None
        self.connected.clear()


def run_loop(main: Any) -> Any:
    """asyncio.run, on uvloop when it is installed (a faster event loop for both
    the STML and front ends; optional: `pip install uvloop`), unless
    SCSI_TARGET_LOOP=asyncio asks for the standard one."""
    try:
        if os.environ.get("SCSI_TARGET_LOOP") == "asyncio":
            raise ImportError
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class Channel:
    """A ZeroMQ socket on the asyncio loop, without zmq.asyncio's futures, and
    with batching.

    The socket's FD wakes the loop and every queued message is handled at
    once (the FD is edge-triggered, so a drain also follows every flush).
    Messages sent during one loop iteration to the same peer leave as one
    ZeroMQ message: a `batch` header listing how many frames each carries,
    then each message's frames. Under load this turns many wake-ups of
    ZeroMQ's I/O thread and of the peer into one; at QD1 it costs nothing.
    `routed` sockets (ROUTER) carry the peer's identity as frame 0 (bytes);
    the other frames are delivered as memoryviews.
    """

    ZERO_COPY = 64 << 10

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list], None], routed: bool = False) -> None:
        self.sock = sock
        self.on_message = on_message
        self.routed = routed
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._out: dict[bytes, list[list]] = {}
        self._flush_scheduled = False
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)

    def send(self, frames: list) -> None:
        """Queue a message ([identity,] header, data...) for this loop iteration."""
        peer = frames[0] if self.routed else b""
        self._out.setdefault(peer, []).append(frames[1:] if self.routed else frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, {}
        for peer, msgs in out.items():
            if len(msgs) == 1:
                frames = msgs[0]
            else:
                frames = [pack({"op": "batch", "n": [len(m) for m in msgs]})]
                for m in msgs:
                    frames += m
            copy = all(len(f) < self.ZERO_COPY for f in frames)
            self.sock.send_multipart([peer, *frames] if self.routed else frames, copy=copy)
        self._drain()

    def _drain(self) -> None:
        sock = self.sock
        # EVENTS is an int option; pyzmq types every getsockopt as int | bytes
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator, arg-type]
            try:
                # memoryviews; a routed socket's frame 0 becomes the peer's identity (bytes)
                frames: list[Any] = [f.buffer for f in sock.recv_multipart(zmq.NOBLOCK, copy=False)]
            except zmq.Again:
                return
            if self.routed:
                frames[0] = frames[0].tobytes()
            try:
                self._deliver(frames)
            except Exception:  # one bad message must not stop the link
                log.exception("error handling a message")

    def _deliver(self, frames: list) -> None:
        head = frames[:1] if self.routed else []
        body = frames[1:] if self.routed else frames
        counts = _batch_counts(body[0]) if body else None
        if counts is None:
            self.on_message(frames)
            return
        pos = 1
        for n in counts:
            if pos + n > len(body):
                raise ValueError("batch shorter than its header says")
            self.on_message(head + body[pos:pos + n])
            pos += n

    def close(self, linger_ms: int = 0) -> None:
        self.flush()
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=linger_ms)


_BATCH_PREFIX = pack({"op": "batch"})[1:]  # the map body, without its size byte


def _batch_counts(frame: memoryview) -> list[int] | None:
    """Frame counts of a batch header; None for an ordinary message."""
    if len(frame) < len(_BATCH_PREFIX) + 1 or bytes(frame[1:1 + len(_BATCH_PREFIX)]) != _BATCH_PREFIX:
        return None
    counts = unpack(frame).get("n")
    if not isinstance(counts, list) or not all(isinstance(c, int) and c > 0 for c in counts):
        raise ValueError("malformed batch header")
    return counts


def _listening(path: str) -> bool:
    """Something accepts connections on this Unix socket path (a plain
    connect, closed at once: ZeroMQ drops a peer that never greets it)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def stream_path(endpoint: str) -> str | None:
    """The Unix stream socket beside an ipc:// endpoint (see the module doc)."""
    return endpoint[len("ipc://"):] + ".stream" if endpoint.startswith("ipc://") else None


_IOV_MAX = 1024
_U32 = struct.Struct("<I")
_REF = struct.Struct("<2I")      # a shared frame on the wire: offset, length


@functools.lru_cache(maxsize=64)
def _u32s(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


_SHARED = 0x80000000   # a frame length with this bit: the frame is (offset, length) in the shared region
_CONTROL_REGION, _CONTROL_FREE = 1, 2


class StreamChannel:
    """One peer's messages on a Unix stream socket: the same-host carrier.

    The same interface as Channel (send a message's frames; `on_message`
    gets them). Messages queued in one loop iteration leave in one sendmsg,
    so batching needs no header here; the answers to what one read brought
    leave as soon as that read is handled, without waiting for the next
    iteration, and every BATCH messages while it is handled, so the peer
    starts on the first ones while we work on the rest. Frames from 64 KiB
    up are received straight into a buffer of their own (from `pool`) and
    delivered as memoryviews (no copy); smaller ones are copied out of a
    staging buffer as bytes.

    Bulk data skips the socket: a side that owns a `SharedRegion` (the
    STML for read data, a front end for write data) passes its memory to the
    peer (a memfd, over SCM_RIGHTS, in a control message: frame count 0,
    kind, then u32 values) and sends frames taken from it as (offset,
    length) references; the peer delivers them as read-only views of the
    same memory and hands the slots back (control message "free", naming
    offsets in the receiver's own region). When: without `keep_shared`,
    after the loop iteration that delivered them (a front end sends read
    data at once); with it, once nothing refers to the frame any more (the
    STML keeps write data until its command is done; CPython's reference
    count tells, as in BufferPool), checked whenever we send and from a
    timer that starts at 1 ms and backs off while none come free.
    A peer that breaks the framing, or closes, ends the channel (`on_closed`).
    """

    BIG = 64 << 10
    MAX_FRAMES = 4096
    MAX_FRAME = 1 << 30
    # Messages that leave together at most while a batch is handled: under
    # load the two processes then overlap on the CPUs instead of taking turns
    # over 20-30 commands a read (README, Performance: with the CPU split of
    # `run`, 4 KiB QD16 0.46-0.48 -> 0.65-0.70 of tgtd; 2, 3, 6, 8 no better).
    BATCH = 4

    def __init__(self, sock: socket.socket, on_message: Callable[[list], None],
                 on_closed: Callable[[], None], pool: BufferPool | None = None,
                 region: SharedRegion | None = None,
                 on_dispatched: Callable[[], None] | None = None,
                 keep_shared: bool = False) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_message = on_message
        self.on_closed = on_closed
        self.on_dispatched = on_dispatched   # after the messages of one read
        self.pool = pool or BufferPool()
        self.region = region            # ours, lent to the peer
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._out: list = []
        self._queued = 0               # messages in _out
        self._flush_scheduled = False
        self._waiting = False          # the socket is full: its writability resumes the flush
        self._dispatching = False      # handling what a read brought: send() need not schedule
        self._buf = memoryview(bytearray(self.BIG))
        self._start = self._end = 0    # unparsed bytes in _buf
        self._lengths: tuple[int, ...] = ()   # the frame lengths of the message being received
        self._next = 0                 # index of its next frame
        self._frames: list = []        # its frames received so far
        self._big: memoryview | None = None   # a big frame being received in place
        self._big_pos = 0
        self._peer_region: memoryview | None = None   # the peer's region, mapped
        self.keep_shared = keep_shared
        self._kept: list[tuple[Any, int]] = []   # (frame's memory, offset): peer slots maybe in use
        self._kept_delay = 0.001
        self._fds: list[int] = []       # descriptors received, not yet claimed
        self._to_free: list[int] = []   # peer slots delivered this iteration
        self._free_scheduled = False
        self._freed: list[int] = []     # peer slots to hand back with the next flush
        self._free_timer: asyncio.TimerHandle | None = None
        self._loop.add_reader(self._fd, self._on_readable)
        if region is not None:   # the peer gets the region first; the descriptor is then its own
            try:
                sock.sendmsg([struct.pack("<4I", 0, _CONTROL_REGION, 1, region.size)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", region.fd))])
            except OSError:
                self.region = None
            region.close()

    def send(self, frames: list) -> None:
        """Queue a message (header, data...) for this loop iteration."""
        if self.closed:
            return
        region = self.region
        lengths: list[int] | map[int]
        if region is not None and len(frames) > 1:   # data frames may be slots of our region
            lengths, wire = [], []
            for f in frames:
                if type(f) is memoryview and id(f.obj) in region.slots:
                    offset, length = region.lend(f)
                    lengths.append(_SHARED | length)
                    wire.append(_REF.pack(offset, length))
                else:
                    lengths.append(len(f))
                    wire.append(f)
            frames = wire
        else:
            lengths = map(len, frames)
        self._out.append(_u32s(len(frames) + 1).pack(len(frames), *lengths))
        self._out += frames
        self._queued += 1
        if self._queued >= self.BATCH and not self._waiting:
            self.flush(inline=True)
            return
        if not self._flush_scheduled and not self._waiting and not self._dispatching:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self, inline: bool = False) -> None:
        """Send what is queued. `inline`: called from send(), inside some
        handler's stack, so a broken socket is left to the writability
        callback to close rather than pulling the link from under the handler."""
        self._flush_scheduled = False
        self._queued = 0
        out = self._out
        if self._kept:
            self._release_kept()
        if self._freed:
            out.append(struct.pack(f"<{3 + len(self._freed)}I", 0, _CONTROL_FREE, len(self._freed),
                                      *self._freed))
            self._freed.clear()
        while out and not self.closed:
            try:
                chunk = out[:_IOV_MAX]
                n = self.sock.sendmsg(chunk)
                if n == sum(map(len, chunk)):   # all of it (the usual case): no walk in Python
                    del out[:len(chunk)]
                else:
                    _consume(out, n)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if inline:
                    break
                self._close()
                return
        if out and not self._waiting and not self.closed:
            self._waiting = True
            self._loop.add_writer(self._fd, self.flush)
        elif not out and self._waiting:
            self._waiting = False
            self._loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        try:
            if self._big is not None:
                n = self.sock.recv_into(self._big[self._big_pos:])
            else:
                if self._start == self._end:
                    self._start = self._end = 0
                elif self._end == len(self._buf):   # make room: move the unparsed tail down
                    rest = self._end - self._start
                    self._buf[:rest] = self._buf[self._start:self._end]
                    self._start, self._end = 0, rest
                if self._peer_region is None:   # a region may come
                    n, anc, _, _ = self.sock.recvmsg_into([self._buf[self._end:]],
                                                          socket.CMSG_SPACE(struct.calcsize("i")))
                    self._take_fds(anc)
                else:
                    n = self.sock.recv_into(self._buf[self._end:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._close()
            return
        self._dispatching = True
        try:
            if self._big is None:
                self._end += n
            else:
                self._big_pos += n
                if self._big_pos < len(self._big):
                    return
                big, self._big = self._big, None
                self._frame(big)
            self._parse()
        except ValueError as e:
            log.error("closing a stream link: %s", e)
            self._close()
        finally:
            self._dispatching = False
        if self.on_dispatched is not None and not self.closed:
            self.on_dispatched()
        if self._out and not self._flush_scheduled and not self._waiting:
            self.flush()

    def _take_fds(self, ancillary: list) -> None:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(data) // struct.calcsize("i")
                self._fds += struct.unpack(f"{n}i", data[:n * struct.calcsize("i")])

    def _parse(self) -> None:
        buf = self._buf
        frame: memoryview | bytes
        while not self.closed:
            start, avail = self._start, self._end - self._start
            if self._next == len(self._lengths):
                if avail < 4:
                    return
                count = _U32.unpack_from(buf, start)[0]
                if count == 0:
                    if not self._control(start, avail):
                        return
                    continue
                if count > self.MAX_FRAMES:
                    raise ValueError(f"a message of {count} frames")
                if avail < 4 + 4 * count:
                    return
                lengths = _u32s(count).unpack_from(buf, start + 4)
                start += 4 + 4 * count
                avail -= 4 + 4 * count
                if max(lengths) < self.BIG and sum(lengths) <= avail:
                    # all here, and nothing shared or big (the usual message): no state kept
                    frames = []
                    for size in lengths:
                        frames.append(buf[start:start + size].tobytes())
                        start += size
                    self._start = start
                    self._deliver(frames)
                    continue
                self._lengths, self._next, self._start = lengths, 0, start
            size = self._lengths[self._next]
            if size & _SHARED:
                if avail < 8:
                    return
                frame = self._shared_frame(*_REF.unpack_from(buf, start))
                self._start += 8
                self._next += 1
            elif size >= self.BIG:    # its own buffer: what is here now, then receive into it
                if size > self.MAX_FRAME:
                    raise ValueError(f"a frame of {size} bytes")
                frame = memoryview(self.pool.get(size))
                take = min(size, avail)
                frame[:take] = buf[start:start + take]
                self._start += take
                self._next += 1
                if take < size:
                    self._big, self._big_pos = frame, take
                    return
            elif avail >= size:
                frame = buf[start:start + size].tobytes()
                self._start += size
                self._next += 1
            else:
                return
            self._frame(frame)

    def _control(self, start: int, avail: int) -> bool:
        """A control message (frame count 0): False until it is all here."""
        if avail < 12:
            return False
        kind, n = struct.unpack_from("<2I", self._buf, start + 4)
        if n > self.MAX_FRAMES:
            raise ValueError(f"a control message of {n} values")
        if avail < 12 + 4 * n:
            return False
        values = struct.unpack_from(f"<{n}I", self._buf, start + 12)
        self._start = start + 12 + 4 * n
        if kind == _CONTROL_REGION and n == 1 and self._peer_region is None and self._fds:
            fd = self._fds.pop(0)
            # kept frames are ctypes arrays over the mapping, which needs it writable;
            # what the consumers get is read-only either way
            prot = mmap.PROT_READ | mmap.PROT_WRITE if self.keep_shared else mmap.PROT_READ
            try:
                # a region that could shrink under the mapping would kill us (SIGBUS) on
                # access; one smaller than announced, mmap refuses
                if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                    raise ValueError("it is not sealed against shrinking")
                self._peer_region = memoryview(mmap.mmap(fd, values[0], prot=prot))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot map the peer's region: {e}") from None
            finally:
                os.close(fd)
        elif kind == _CONTROL_FREE and self.region is not None:
            self.region.free(values)
        else:
            raise ValueError(f"unexpected control message {kind}")
        return True

    def _shared_frame(self, offset: int, length: int) -> memoryview:
        region = self._peer_region
        if region is None or offset + length > len(region):
            raise ValueError("a reference outside the shared region")
        if self.keep_shared:   # memory of its own, so its reference count tells when it is unused
            memory = (ctypes.c_char * length).from_buffer(region, offset)
            self._kept.append((memory, offset))
            return memoryview(memory).cast("B").toreadonly()
        self._to_free.append(offset)
        return region[offset:offset + length]

    def _release_kept(self) -> None:
        """Kept peer slots that nothing uses any more go back with the next flush."""
        still = []
        for entry in self._kept:
            if sys.getrefcount(entry[0]) > 2:   # the tuple and getrefcount's argument
                still.append(entry)
            else:
                self._freed.append(entry[1])
        if len(still) < len(self._kept):
            self._kept_delay = 0.001   # they move: the timer need not back off
        self._kept = still

    def _free_slots(self) -> None:
        """The slots delivered last iteration are no longer used: they go
        back with the next message we send (a wake-up of the peer of their
        own would cost more than the copy they saved), or after 1 ms."""
        self._free_scheduled = False
        self._freed += self._to_free
        self._to_free.clear()
        if self._free_timer is None and not self.closed:
            # one timer at a time, left running when a message takes the slots first:
            # at most one firing per millisecond instead of a timer made and cancelled
            # every loop iteration
            self._free_timer = self._loop.call_later(0.001, self._free_timeout)

    def _free_timeout(self) -> None:
        self._free_timer = None
        if self._kept:
            self._release_kept()
        if self._freed:
            self.flush()
        if self._kept and not self.closed:
            # frames kept long (writes waiting for the rest of their data): look again
            # less and less often while none come free (_release_kept starts over)
            self._free_timer = self._loop.call_later(self._kept_delay, self._free_timeout)
            self._kept_delay = min(2 * self._kept_delay, 1.0)

    def _frame(self, frame: Any) -> None:
        self._frames.append(frame)
        if self._next < len(self._lengths):
            return
        frames, self._frames = self._frames, []
        self._deliver(frames)

    def _deliver(self, frames: list) -> None:
        try:
            self.on_message(frames)
        except Exception:  # one bad message must not stop the link
            log.exception("error handling a message")
        if self._to_free and not self._free_scheduled:
            # queued after whatever the handler queued (e.g. the writes sending the data)
            self._free_scheduled = True
            self._loop.call_soon(self._free_slots)
        elif self._kept and self._free_timer is None:
            self._kept_delay = 0.001
            self._free_timer = self._loop.call_later(self._kept_delay, self._free_timeout)

    def _close(self, notify: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._waiting:
            self._loop.remove_writer(self._fd)
        self.sock.close()
        self._out.clear()
        if self._free_timer is not None:
            self._free_timer.cancel()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if notify:
            self.on_closed()

    def close(self, linger_ms: int = 0) -> None:
        """Send what is queued, waiting at most linger_ms in all (0: drop it,
        as ZeroMQ's linger does), then close."""
        if self.closed:
            return
        self._loop.remove_reader(self._fd)
        deadline = time.monotonic() + linger_ms / 1000
        try:
            while self._out and (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                _consume(self._out, self.sock.sendmsg(self._out[:_IOV_MAX]))
        except OSError:
            pass
        self._close(notify=False)


class SharedRegion:
    """Memory one side of a stream fills and lends to the other: the STML reads
    data into it for a same-host front end to send, a front end receives write
    data into it for the STML to write.

    A memfd of `size` bytes, carved into slots by size class (powers of two
    from 64 KiB). A slot is a ctypes array over the mapping, so every view
    of it holds a reference to it: it is free again when nothing but this
    region refers to it (CPython's reference count tells, as in BufferPool)
    and the peer has handed it back. Bounded: when no slot fits, `get`
    returns None and the caller uses ordinary memory (the data then travels
    through the socket).
    The size is sealed: the peer maps it only when it cannot shrink.
    """

    MIN_SLOT = 64 << 10

    def __init__(self, size: int = 64 << 20, name: str = "scsi-target-read-data") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self._map = mmap.mmap(self.fd, size)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._top = 0
        self._by_class: dict[int, list] = {}
        self.slots: dict[int, int] = {}    # id(slot) -> offset (slots live as long as the region)
        self._lent: dict[int, Any] = {}               # offset -> slot, until the peer frees it

    def get(self, size: int) -> memoryview | None:
        """A writable view of `size` bytes in a free slot, or None."""
        cls = max(self.MIN_SLOT, 1 << (size - 1).bit_length())
        slots = self._by_class.setdefault(cls, [])
        if (slot := _take_unused(slots)) is not None:
            return memoryview(slot).cast("B")[:size]
        if self._top + cls > self.size:
            return None
        slot = (ctypes.c_char * cls).from_buffer(self._map, self._top)
        slots.append(slot)
        self.slots[id(slot)] = self._top
        self._top += cls
        return memoryview(slot).cast("B")[:size]

    def lend(self, view: memoryview) -> tuple[int, int]:
        """(offset, length) of a view of one of our slots, now lent to the peer."""
        offset = ctypes.addressof(ctypes.c_char.from_buffer(view)) - self._base
        self._lent[offset] = view.obj
        return offset, len(view)

    def free(self, offsets: tuple[int, ...]) -> None:
        for offset in offsets:
            self._lent.pop(offset, None)

    def close(self) -> None:
        """Release the descriptor (the mapping goes with the last view of it)."""
        os.close(self.fd)


def _take_unused(objs: list) -> Any:
    """The first object of `objs` that only the list refers to (CPython's
    reference count tells), or None; it moves to the end of the list, so
    the list stays in the order they were handed out and the next one is
    usually free at the front (a scan from the front of a fixed order looked
    at 6.5 of 16 slots per 64 KiB read)."""
    for i in range(len(objs)):
        if sys.getrefcount(objs[i]) == 2:   # the list and getrefcount's argument
            obj = objs.pop(i)
            objs.append(obj)
            return obj
    return None


def _consume(bufs: list, n: int) -> None:
    """Drop the first n bytes of a list of buffers, in place."""
    done = 0
    for b in bufs:
        if n < len(b):
            break
        n -= len(b)
        done += 1
    del bufs[:done]
    if n:
        bufs[0] = memoryview(bufs[0]).cast("B")[n:]


class BufferPool:
    """Receive buffers for big frames, used again once their data is consumed.

    A fresh 1 MiB bytearray costs a zero-fill (and often page faults): a
    quarter of the STML's time on 1 MiB writes. Consumers keep only
    memoryviews (the backend writes from them, the iSCSI front end sends
    from them), and every view holds a reference to its buffer, so a buffer
    whose only reference is the pool's is free again: CPython's reference
    count tells, without the consumers knowing about the pool. At most
    `limit` bytes are kept; past that, buffers are plain allocations.
    """

    def __init__(self, limit: int = 64 << 20) -> None:
        self.limit = limit
        self.kept = 0
        self._by_size: dict[int, list[bytearray]] = {}

    def get(self, size: int) -> bytearray:
        bufs = self._by_size.setdefault(size, [])
        if (buf := _take_unused(bufs)) is not None:
            return buf
        buf = bytearray(size)
        if self.kept + size <= self.limit:
            bufs.append(buf)
            self.kept += size
        return buf
