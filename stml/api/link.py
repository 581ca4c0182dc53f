"""A front end's end of the contract: FrontEndLink connects, registers,
heartbeats and re-registers by itself; FrontEndHandler is what it calls."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
import uuid
from types import SimpleNamespace
from typing import Any, Callable, Final, Protocol, Sequence

import msgpack
import zmq

from stml.api.messages import (CONTRACT_VERSION, FROM_STML, XMIT_RESPONSE_FIXED, XMIT_RESPONSE_PARTS, Cap,
                                Detect, Op, check, pack, unpack)
from stml.api.shm import SharedRegion
from stml.api.stream import RETURN_AFTER, Lease, StreamChannel, listening, stream_path
from stml.api.tap import Tap, TapPoint, combine
from stml.api.zmq_carrier import Channel

log = logging.getLogger("stml.api")
# the ops as plain strs, for the headers written per command (an enum member's
# access costs an attribute hook, several times a plain lookup)
_O = SimpleNamespace(**{op.name: op.value for op in Op})
_RX_CMND, _RX_DATA, _DONE = Op.RX_CMND.value, Op.RX_DATA.value, Op.DONE.value
_RDY_TO_XFER, _XMIT_RESPONSE, _TMF_DONE = Op.RDY_TO_XFER.value, Op.XMIT_RESPONSE.value, Op.TMF_DONE.value


def _fixed_map(op: str, fields: Sequence[tuple[str, str]]) -> tuple[struct.Struct, tuple[bytes, ...]]:
    """A header of `op` in one fixed msgpack layout: the Struct that packs it
    and the constant bytes before each field's value (its key and the value's
    marker; the map and its op before the first), to pass in turn with the
    values. A field is (key, "I"): an int as a uint32, or (key, "16s"): 16
    bytes as a bin."""
    markers = {"I": b"\xce", "16s": b"\xc4\x10"}
    before = [msgpack.packb(key) + markers[form] for key, form in fields]
    before[0] = bytes([0x80 | len(fields) + 1]) + msgpack.packb("op") + msgpack.packb(op) + before[0]
    fmt = ">" + "".join(f"{len(b)}s{form}" for b, (_, form) in zip(before, fields))
    return struct.Struct(fmt), tuple(before)


# rx_cmnd's header packed by a precompiled Struct (per command): the map pack()
# writes, but with every int a uint32 and the CDB 16 bytes of bin, whatever
# their values; any msgpack decoder reads it back the same. Building the dict
# and packing it cost several times as much. A header that does not fit this
# layout (an extended CDB, a number past 32 bits) is packed from a dict.
_RX_CMND_LAYOUT = _fixed_map(_RX_CMND, (
    ("tag", "I"), ("nexus", "I"), ("lun", "I"), ("cdb", "16s"), ("attr", "I"), ("dir", "I"),
    ("len", "I"), ("unsol", "I")))
_RX_CMND_FIXED: Final = _RX_CMND_LAYOUT[0]   # (Final: statics in the compiled build)
_RX_CMND_PACK: Final = _RX_CMND_FIXED.pack    # (bound once: no method lookup per command)
_RX_CMND_KEYS: Final = _RX_CMND_LAYOUT[1]
# the same header as the stream carrier frames it, in one pack, queued as it is
# (StreamChannel.send_encoded): a command without data is a message of one
# frame (its count and length first, constant for a fixed size); one with a
# data frame has the data's length after those, a little-endian u32 that this
# big-endian Struct writes from the value byte-swapped
_RX_CMND_FORMAT: Final = _RX_CMND_FIXED.format.lstrip(">")
_RX_CMND_WIRE_PACK: Final = struct.Struct(">8s" + _RX_CMND_FORMAT).pack
_RX_CMND_PREFIX: Final = struct.pack("<2I", 1, _RX_CMND_FIXED.size)
_RX_CMND_WIRE_DATA_PACK: Final = struct.Struct(">8sI" + _RX_CMND_FORMAT).pack
_RX_CMND_PREFIX_DATA: Final = struct.pack("<2I", 2, _RX_CMND_FIXED.size)

# xmit_response in the STML's fixed layout (stml.api.messages): its size, its
# Struct's unpack and the constant parts it must hold (map, keys, markers)
# (Final: the compiled build keeps them in statics, not the module's dict)
_XMIT_SIZE: Final = XMIT_RESPONSE_FIXED.size
_XMIT_UNPACK: Final = XMIT_RESPONSE_FIXED.unpack
_XMIT_K0: Final = XMIT_RESPONSE_PARTS[0]
_XMIT_K1: Final = XMIT_RESPONSE_PARTS[1]
_XMIT_K2: Final = XMIT_RESPONSE_PARTS[2]


# a refused CURVE handshake is said again after this many in a row (ten minutes
# at the default retry)
HANDSHAKE_REMIND: Final = 120


class FrontEndHandler(Protocol):
    """What a front end implements to receive STML calls (all on the event loop)."""

    def detect(self, detect: Detect) -> None: ...
    def nexus_ready(self, nexus: int, error: str | None) -> None: ...
    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None: ...
    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int,
                      data: list) -> None: ...
    # `data`: buffers (bytes or memoryviews; maybe memory the STML shares), valid until
    # the front end calls link.scsi_target_done([tag]): it must, once the response is on
    # the wire or dropped, for every tag in link.lent and, while timed, for every response.
    # `info` (1.6): only with QUERY ASYNCHRONOUS EVENT's SUCCEEDED, the additional response
    # information; a handler written for an earlier version is never given it otherwise
    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int], info: bytes = b"") -> None: ...
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


class FrontEndLink(TapPoint):
    """A front end's end of the contract: connect, register, heartbeat, and
    re-register by itself when the STML restarts or forgets us.

    Calls toward the STML are plain methods that queue a message; STML calls
    arrive on `handler`. Nexuses registered through the link are registered
    again after a reconnect, so sessions survive an STML restart. The link
    offers what its carrier can do (capabilities) and uses what the STML
    grants. The handler reports a response done (scsi_target_done) once it
    no longer uses its data: the carrier's memory goes back then. Only the
    tags in `lent` (or every tag while `timing`) need it; reporting the
    others does no harm.

    Given several endpoints (the STMLs of gateways sharing storage, one of
    them serving), the link moves on to the next when one answers that it is
    a standby, or stays silent: it ends up with the one that serves.
    """

    # stage timing (1.7), set on the instance once the STML grants it
    # (_set_timing): class attributes, so an untimed link has no more instance
    # attributes than before (past 30, CPython 3.11 stops sharing the instance
    # dict's keys and every attribute read on the command path costs more).
    # A flag the entry points test, not methods swapped on the instance: the
    # compiled build's calls between its modules do not look at the instance
    read_at = 0    # when the read that brought the commands in hand began (0: now)
    # the endpoints that refused us since we last registered (several endpoints only):
    # the refusal is final once all have
    _refused: dict[str, str] | None = None
    # said that no STML answers (once a silence, 0206): an instance attribute only then
    _said_silent = False
    # CURVE handshakes refused, per endpoint: the refusal last said and how many in a
    # row (0703: said once, again on a change, and every HANDSHAKE_REMIND after)
    _handshake_refused: dict[str, tuple[str, int]] | None = None
    handshake_retry = 5.0   # seconds before a new connection after a refused handshake
    timing = False
    _done_ts: list[int]   # when each response of _done was delivered (set while timed)

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
        # bound once: a response reaches the handler without a method lookup (per command;
        # None for a handler without one: a test's that expects no response)
        self._handler_xmit: Callable[[int, int, bytes | None, int, list], None] | None = \
            getattr(handler, "xmit_response", None)
        self.heartbeat = heartbeat_ms / 1000
        self.aen = aen
        self.version = version
        self.ctx = context or zmq.Context.instance()
        self.curve = curve
        self.connected = asyncio.Event()
        self.detect_info: Detect | None = None
        self.caps: frozenset[str] = frozenset()   # what the STML granted in its last detect
        self.nexuses: dict[int, dict[str, Any]] = {}
        self._channel: Channel | StreamChannel | None = None
        self._last_rx = 0.0
        self._last_tx = 0.0
        # a message came in (went out) since the heartbeat last looked: it stamps
        # _last_rx (_last_tx) then, so no message reads the clock (per command)
        self._rx_seen = False
        self._tx_seen = False
        self._last_usage = 0.0
        self._ended: asyncio.Future | None = None
        self._timer: asyncio.Task | None = None
        self._monitor: tuple[zmq.Socket, int] | None = None   # the CURVE handshake watch
        # tag -> the carrier's hold on its read data: while the STML does not time
        # commands, only these tags need scsi_target_done (a handler may skip the rest)
        self.lent: dict[int, Lease] = {}
        self._done: list[int] = []            # tags for the next scsi_target_done
        self._done_timer: asyncio.TimerHandle | None = None
        # instruments on the link (stml.api.tap): None, the one tap, or Taps; with
        # one, the channel hands messages to _on_message_tapped and shows what it
        # sends to _outbound (_tap_channel)
        self.tap: Tap | None = None
        self._taps: list[Tap] = []
        self._receiver: Callable[[list], None] = self._on_message
        self._dispatch: dict[str, Callable[[dict[str, Any], list], None]] = {
            Op.DETECT: self._on_detect,
            Op.NEXUS_READY: lambda h, f: handler.nexus_ready(h["nexus"], h.get("error")),
            Op.RELEASE: self._on_release,
            Op.RDY_TO_XFER: lambda h, f: handler.rdy_to_xfer(h["tag"], h["offset"], h["length"]),
            Op.XMIT_RESPONSE: self._on_xmit_response,
            Op.TMF_DONE: self._on_tmf_done,
            Op.REPORT_AEN: lambda h, f: handler.report_aen(h.get("nexus"), h["lun"], h["sense"]),
            Op.HEARTBEAT: self._on_heartbeat,
            Op.DROP_NEXUS: self._on_drop_nexus,
        }

    # -- instruments ------------------------------------------------------------
    def _set_taps(self) -> None:
        """The tapped entry points with a tap, the plain ones without: a link
        without taps costs what it did before they existed."""
        self.tap = combine(self._taps)
        self._receiver = self._on_message if self.tap is None else self._on_message_tapped
        if self._channel is not None:
            self._tap_channel(self._channel)

    def _tap_channel(self, channel: Channel | StreamChannel) -> None:
        """Give a channel the link's entry points: with a tap, the channel shows
        every message the link sends, scsi_target_done included, to
        `_outbound` first; without one, the channel's send tests one attribute."""
        channel.on_message = self._receiver
        channel.outbound = None if self.tap is None else self._outbound

    def _outbound(self, frames: list) -> bool:
        """The tap's say on a message the channel is about to queue."""
        tap = self.tap
        return tap is None or tap.outbound(self.endpoint, unpack(frames[0]), frames[0], frames[1:])

    def transmit(self, header: dict[str, Any], frames: list | tuple = ()) -> None:
        """Send a message past the tap (a tap that held one back lets it go here)."""
        if self._channel is not None:
            self._channel.send([pack(header), *frames], tapped=False)

    def deliver(self, header: dict[str, Any], frames: list) -> None:
        """Handle a decoded message from the STML past the tap (a tap that held
        one back, with copies of its data, lets it in here)."""
        self._on_message([pack(header), *frames])

    # -- calls toward the STML ------------------------------------------------
    def _send(self, header: dict[str, Any], data: list | tuple = ()) -> None:
        """Queue one message (never blocks; ZeroMQ buffers while disconnected);
        responses done since the last one are reported first."""
        self._send_packed(pack(header), data)

    def _send_packed(self, header: bytes, data: list | tuple = ()) -> None:
        """_send, of a header packed already."""
        channel = self._channel
        if channel is None:
            return
        self._tx_seen = True
        if self._done:
            channel.send([pack(self._done_header())])
        channel.send([header, *data] if data else [header])

    def _done_header(self) -> dict[str, Any]:
        """The scsi_target_done of the responses done so far, with their
        delivery stamps while timed (untimed, none is sent: scsi_target_done)."""
        header: dict[str, Any] = {"op": _DONE, "tags": self._done}
        self._done = []
        if self.timing:
            stamps = self._done_ts
            if len(stamps) == len(header["tags"]):   # (a writer made while untimed stamps nothing)
                header["ts"] = stamps
            self._done_ts = []
        return header

    def register_nexus(self, nexus: int, initiator: str, target: str, tpg: int,
                       held_by: str | None = None) -> None:
        """Register a nexus (again after a reconnect: _on_detect). `held_by`:
        the instance of the STML that held this I_T nexus before (fetd_tcp: a
        session it ended when that STML went away, logged in again); another
        instance than the one now serving registers it `resumed` (0247)."""
        now = self.detect_info.instance if self.detect_info is not None and self.connected.is_set() else None
        info: dict[str, Any] = {"initiator": initiator, "target": target, "tpg": tpg,
                                "held_by": held_by if now is None else now}
        self.nexuses[nexus] = info
        self._send(nexus_registration(nexus, initiator, target, tpg,
                                      resumed=now is not None and held_by is not None and held_by != now))

    @property
    def instance(self) -> str | None:
        """The instance of the STML we are (or were last) attached to: "" for
        one older than 1.9, None before any."""
        return self.detect_info.instance if self.detect_info is not None else None

    def scsi_release(self, nexus: int, lost: bool = False) -> None:
        """The nexus ended; `lost`: not by its initiator (1.10, decisions/0234)."""
        if self.nexuses.pop(nexus, None) is not None:
            self._send({"op": _O.RELEASE_NEXUS, "nexus": nexus, "lost": True} if lost
                       else {"op": _O.RELEASE_NEXUS, "nexus": nexus})

    def rx_cmnd(self, tag: int, nexus: int, lun: int, cdb: bytes, attr: int, direction: int,
                length: int, unsol: int = 0, data: list | tuple = ()) -> None:
        if self.timing:
            self._rx_cmnd_timed(tag, nexus, lun, cdb, attr, direction, length, unsol, data)
            return
        header = None
        if len(cdb) == 16:
            k0, k1, k2, k3, k4, k5, k6, k7 = _RX_CMND_KEYS
            channel = self._channel
            try:
                if type(channel) is StreamChannel and channel.outbound is None:
                    # the usual command: framed as the stream carrier sends it (nothing it
                    # could lend: no data, or one frame of bytes, e.g. immediate data)
                    if not data:
                        channel.send_encoded(_RX_CMND_WIRE_PACK(
                            _RX_CMND_PREFIX, k0, tag, k1, nexus, k2, lun, k3, cdb, k4, attr,
                            k5, direction, k6, length, k7, unsol))
                        self._tx_seen = True
                        return
                    frame = data[0]
                    if len(data) == 1 and type(frame) is bytes:
                        n = len(frame)
                        channel.send_encoded(_RX_CMND_WIRE_DATA_PACK(
                            _RX_CMND_PREFIX_DATA,
                            (n & 0xFF) << 24 | (n & 0xFF00) << 8 | (n >> 8) & 0xFF00 | n >> 24,
                            k0, tag, k1, nexus, k2, lun, k3, cdb, k4, attr, k5, direction, k6,
                            length, k7, unsol), frame)
                        self._tx_seen = True
                        return
                header = _RX_CMND_PACK(k0, tag, k1, nexus, k2, lun, k3, cdb, k4, attr,
                                       k5, direction, k6, length, k7, unsol)
            except struct.error:   # a number out of the layout's range
                pass
        if header is None:
            header = pack({"op": _RX_CMND, "tag": tag, "nexus": nexus, "lun": lun, "cdb": cdb,
                           "attr": attr, "dir": direction, "len": length, "unsol": unsol})
        self._send_packed(header, data)

    def _rx_cmnd_timed(self, tag: int, nexus: int, lun: int, cdb: bytes, attr: int, direction: int,
                       length: int, unsol: int = 0, data: list | tuple = ()) -> None:
        """rx_cmnd while the STML times commands: with the front end's stamps
        (received: when the read that brought it began, if the front end says)."""
        now = time.monotonic_ns()
        self._send({"op": _RX_CMND, "tag": tag, "nexus": nexus, "lun": lun, "cdb": cdb,
                   "attr": attr, "dir": direction, "len": length, "unsol": unsol,
                   "ts": [self.read_at or now, now]}, data)

    def _set_timing(self, on: bool) -> None:
        """Stamp commands (rx_cmnd takes the timed path) only while the STML
        grants `timing`."""
        self.timing = on
        self._done_ts = []
        self.read_at = 0

    def _on_heartbeat(self, header: dict[str, Any], frames: list) -> None:
        """An STML heartbeat with `t` asks for the clock offset's round trip: answered at once."""
        t = header.get("t")
        if type(t) is int and self.timing:
            now = time.monotonic_ns()
            self._send({"op": _O.HEARTBEAT, "echo": [t, now, time.monotonic_ns()]})

    def scsi_rx_data(self, tag: int, offset: int, data: list | tuple, error: str | None = None) -> None:
        header = {"op": _RX_DATA, "tag": tag, "offset": offset}
        if error:
            header["error"] = error
        self._send(header, data)

    def rx_task_mgmt_fn(self, tag: int, nexus: int, fn: int, lun: int, ref: int | None) -> None:
        self._send({"op": _O.RX_TMF, "tag": tag, "nexus": nexus, "fn": fn, "lun": lun, "ref": ref})

    def scsi_target_done(self, tags: list[int]) -> None:
        """These responses are on the wire (or dropped): their read data is no
        longer used, and what the carrier lent with them goes back now (the
        slots return to the STML with the next message, stml.api.stream).
        The message itself goes only while the STML times commands: its
        delivery stamps are all the STML takes from it, and a message per
        command for nothing cost both processes CPU and wake-ups
        (decisions/0603). Timed, it rides on the next message we send, or
        leaves within RETURN_AFTER."""
        leases = self.lent
        if leases:
            for tag in tags:
                # (get and del: pop(tag, None) is a generic method call, per read)
                lease = leases.get(tag)
                if lease is not None:
                    del leases[tag]
                    lease.release()
        if self.timing:   # the instance's flag: a writer may hold this method from before
            self._done_ts += [time.monotonic_ns()] * len(tags)
            self._done += tags
            if self._done_timer is None and self._channel is not None:
                self._done_timer = asyncio.get_running_loop().call_later(RETURN_AFTER, self._done_timeout)

    def _done_timeout(self) -> None:
        self._done_timer = None
        if self._done and self._channel is not None:
            self._channel.send([pack(self._done_header())])

    def portal_state(self, portals: list[dict[str, Any]]) -> None:
        """The portals of the STML's list we listen on, and why not the others
        (a front end that follows the STML's portal list, after each change)."""
        self._send({"op": _O.PORTAL_STATE, "follows": True, "portals": portals})

    @property
    def delivering(self) -> bool:
        """The handler's calls come from one read of the STML's messages, and
        its messages_handled() follows the last of them: a front end may
        leave sending its output to that (no flush scheduled per response)."""
        channel = self._channel
        return isinstance(channel, StreamChannel) and channel.delivering

    def hold(self) -> None:
        """A front end about to handle what one read from its initiators
        brought: what it sends waits for its flush(), which it must call after
        (whatever happens), instead of scheduling a flush of its own."""
        if self._channel is not None:
            self._channel.hold()

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
            if not listening(self.endpoint[len("ipc://"):]):
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
        self._channel = StreamChannel(sock, self._receiver, self._stream_closed, region=region,
                                      on_dispatched=getattr(self.handler, "messages_handled", None))
        if self.tap is not None:
            self._tap_channel(self._channel)

    def release_buffer(self, view: memoryview) -> None:
        """Give back memory from shared_buffer(), once it was sent (the STML
        then holds it until its command ends) or instead of sending it."""
        channel = self._channel
        if isinstance(channel, StreamChannel) and channel.region is not None:
            channel.region.release(view)   # a view of an older channel's region: ignored

    def shared_buffer(self, size: int) -> memoryview | None:
        """Memory for `size` bytes of write data that reaches a same-host STML
        without crossing the socket (sent as a data frame of rx_cmnd or
        scsi_rx_data), or None: use ordinary memory. Yours until
        release_buffer(); sending it lends it to the STML as well, which
        hands it back when the command ends."""
        channel = self._channel
        if isinstance(channel, StreamChannel) and channel.region_offered and channel.region is not None:
            return channel.region.get(size)
        return None

    def _stream_closed(self) -> None:
        self._channel = None
        self._drop_leases()
        if self.connected.is_set():
            log.warning("STML at %s closed the link: re-registering", self.endpoint)
            self._lost()

    def _open_zmq(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # 122 random bits (uuid4): a peer that cannot learn the id cannot take it over once
        # this connection is gone (ids are at most 255 bytes)
        sock.setsockopt(zmq.ROUTING_ID, f"{self.name[:200]}-{uuid.uuid4().hex}".encode())
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.curve:
            sock.curve_secretkey = self.curve["secret"]
            sock.curve_publickey = self.curve["public"]
            sock.curve_serverkey = self.curve["server"]
            self._watch_handshake(sock)
        sock.connect(self.endpoint)
        self._channel = Channel(sock, self._receiver)
        if self.tap is not None:
            self._tap_channel(self._channel)

    def _watch_handshake(self, sock: zmq.Socket) -> None:
        """CURVE: an STML that refuses our key ends the connection for good (and
        a DEALER without a connection would block on send), so the socket is
        closed and a new one tried every few seconds (the key may be added to
        the STML's allow list meanwhile). The refusal is said once, not once a
        try (_said_refused)."""
        failed = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        mon = sock.get_monitor_socket(failed | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        loop = asyncio.get_running_loop()
        fd = mon.fileno()
        self._monitor = (mon, fd)
        endpoint = self.endpoint

        def on_event() -> None:
            from zmq.utils.monitor import recv_monitor_message
            # EVENTS is an int option; pyzmq types every getsockopt as int | bytes
            while not mon.closed and mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator, arg-type]
                event = recv_monitor_message(mon)
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._said_admitted(endpoint)
                    continue
                if not event["event"] & failed or self._channel is None or self._channel.sock is not sock:
                    continue
                self._said_refused(endpoint, "refused our key" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                   else "failed the CURVE handshake (wrong server key?)")
                self._close_monitor()   # (this socket's: its channel is the link's)
                channel, self._channel = self._channel, None
                channel._out.clear()      # nothing may reach a send that would block
                loop.remove_reader(channel._fd)
                loop.call_later(1, sock.close, 0)   # after callbacks already queued for it
                if self.connected.is_set():
                    self._lost()
                loop.call_later(self.handshake_retry, self._reopen)
                return

        loop.add_reader(fd, on_event)
        loop.call_soon(on_event)

    def _said_refused(self, endpoint: str, how: str) -> None:
        """Log a refused handshake once, again when the reason changes, and a
        reminder every HANDSHAKE_REMIND refusals in a row: a front end whose key
        waits for hours for the STML's allow list must not fill the journal."""
        refused = self._handshake_refused
        if refused is None:
            refused = self._handshake_refused = {}
        said, count = refused.get(endpoint, ("", 0))
        count += 1
        refused[endpoint] = (how, count)
        if how != said:
            log.error("the STML at %s %s; retrying every %gs (said again if that changes, and every %d tries)",
                      endpoint, how, self.handshake_retry, HANDSHAKE_REMIND)
        elif count % HANDSHAKE_REMIND == 0:
            log.warning("the STML at %s still %s (%d tries in a row)", endpoint, how, count)

    def _said_admitted(self, endpoint: str) -> None:
        """A handshake passed: after refusals, that is news (the key was added)."""
        refused = self._handshake_refused
        if refused is not None and endpoint in refused:
            count = refused.pop(endpoint)[1]
            log.info("the STML at %s completed the CURVE handshake after %d refused", endpoint, count)

    def _reopen(self) -> None:
        if self._channel is None and self._timer is not None and not self._timer.done():
            self._open()
            self._register()

    def _register(self) -> None:
        """Register, offering what this link can do on its carrier (1.4): a
        write region only on a stream that has one. An STML older than 1.4
        ignores the offer and grants nothing, so nothing is used that it
        does not know."""
        channel = self._channel
        caps = [Cap.WRITE_REGION] if isinstance(channel, StreamChannel) and channel.region else []
        header = registration(self.name, self.kind, int(self.heartbeat * 1000), self.aen,
                              [*caps, Cap.TIMING], self.version)
        header["boot_id"] = boot_id() or ""
        self._send(header)

    def start(self) -> None:
        """Connect and register; the link then runs until close()."""
        self._ended = asyncio.get_running_loop().create_future()
        self._open()
        self._register()
        self._timer = asyncio.create_task(self._heartbeats())

    @property
    def ended(self) -> asyncio.Future:
        """Done when the link ends for good: the STML refused this front end
        (RegistrationRefused: a wrong contract major, a manager's key, a
        malformed registration). A front end waits on it beside its stop
        signal, to say why and exit rather than ask again every heartbeat."""
        assert self._ended is not None   # start() comes first
        return self._ended

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

    def _on_message_tapped(self, frames: list) -> None:
        """_on_message, with the tap before it (which decodes the header once
        more: a front end's tap is for experiments, its plain path is not)."""
        try:
            header = unpack(frames[0])
        except ValueError:
            header = None   # refused by _on_message, with the reason
        tap = self.tap
        if header is None or tap is None or tap.inbound(self.endpoint, header, frames[0], frames[1:]):
            self._on_message(frames)
        else:
            self._rx_seen = True

    def _on_message(self, frames: list) -> None:
        self._rx_seen = True
        raw = frames[0]
        if len(raw) == _XMIT_SIZE:
            # a response in the STML's fixed layout (most of them): read by its Struct,
            # without the decoder, the dict and the table's check, whose verdict on
            # these bytes is always yes (three ints, no sense data)
            k0, tag, k1, status, k2, resid = _XMIT_UNPACK(raw)
            if k0 == _XMIT_K0 and k1 == _XMIT_K1 and k2 == _XMIT_K2:
                del frames[0]   # the data frames, in the carrier's list (no copy of it)
                self._xmit_response(tag, status, None, resid, frames)
                return
        try:
            header = unpack(frames[0])
        except ValueError as e:
            log.warning("refused a message from the STML: %s", e)
            return
        op = header["op"]
        spec = FROM_STML.get(op)   # (messages.check, without its call: per command)
        error = spec.verdict(header) if spec is not None else check(header, FROM_STML)
        handler = self._dispatch.get(op)
        if error is not None or handler is None:
            log.warning("refused a message from the STML: %s", error or f"{header['op']} is not for us")
            return
        try:
            handler(header, frames[1:])
        except RegistrationRefused as refused:   # (a name per type: mypyc types a name once, 0830)
            ended = self._ended
            assert ended is not None   # messages come only after start()
            if not ended.done():
                ended.set_exception(refused)
            if self._timer is not None:
                self._timer.cancel()   # no more registrations: the answer would be the same

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 2)
            if self._channel is None and stream_path(self.endpoint):
                self._open()
            now = time.monotonic()
            self._stamp(now)
            if self.connected.is_set() and now - self._last_rx > 3 * self.heartbeat:
                log.warning("STML at %s silent for %.1fs: link lost, re-registering",
                            self.endpoint, now - self._last_rx)
                self._lost()
                self._next_endpoint()
            elif not self.connected.is_set() and now - self._trying_since > 3 * self.heartbeat:
                if not self._said_silent:   # an administrator learns why nothing is served (0206)
                    self._said_silent = True
                    log.warning("no answer from the STML at %s; still trying", ", ".join(self.endpoints))
                self._next_endpoint()   # no answer from this one: another may serve
            usage = getattr(self.handler, "usage", None)
            if not self.connected.is_set():
                self._register()
            elif usage is not None and now - self._last_usage >= self.heartbeat:
                self._last_usage = now
                self._send({"op": _O.HEARTBEAT, "usage": usage()})
            elif now - self._last_tx >= self.heartbeat:
                self._send({"op": _O.HEARTBEAT})
                self._last_tx, self._tx_seen = now, False   # (sent now, not at the next look)

    def _stamp(self, now: float) -> None:
        """Traffic since the last look counts as of now (at most half a
        heartbeat late: silence is found after 3 to 3.5 heartbeats)."""
        if self._rx_seen:
            self._rx_seen = False
            self._last_rx = now
        if self._tx_seen:
            self._tx_seen = False
            self._last_tx = now

    def _lost(self) -> None:
        self.connected.clear()
        self._drop_leases()
        self.handler.link_lost()

    def _drop_leases(self) -> None:
        """The STML that sent the read data is gone: nothing is reported done to it."""
        for lease in self.lent.values():
            lease.release()
        self.lent.clear()
        self._done.clear()
        if self.timing:
            self._done_ts.clear()

    def _close_monitor(self) -> None:
        """The CURVE handshake watch goes with its socket (a monitor left open
        would keep the ZeroMQ context from terminating)."""
        if self._monitor is not None:
            mon, fd = self._monitor
            asyncio.get_running_loop().remove_reader(fd)
            mon.close(linger=0)
            self._monitor = None

    def _next_endpoint(self) -> None:
        """Ask the next STML of the list (nothing changes with one)."""
        self._trying_since = time.monotonic()
        if len(self.endpoints) < 2:
            return
        self._close_monitor()
        if self._channel is not None:
            self._channel.close(linger_ms=0)
            self._channel = None
        self._drop_leases()   # lent by the STML we leave: nothing goes back to it
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
            if len(self.endpoints) > 1:   # gateways: another may take us (e.g. mid-upgrade)
                refused = self._refused or {}
                refused[self.endpoint] = header["error"]
                self._refused = refused
                if len(refused) < len(self.endpoints):
                    log.warning("STML at %s refused this front end (%s): asking the next",
                                self.endpoint, header["error"])
                    self._next_endpoint()
                    return
            raise RegistrationRefused(header["error"])
        try:
            detect = Detect.from_header(header)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("refused a detect from the STML: a target, LUN or portal is malformed (%s: %s)",
                        type(e).__name__, e)
            return
        if self._refused is not None:   # (an instance attribute only after a refusal)
            self._refused = None
        if self._said_silent:
            self._said_silent = False
            log.info("the STML at %s answers", self.endpoint)
        self.caps = frozenset(header.get("caps") or ())
        if (Cap.TIMING in self.caps) != self.timing:
            self._set_timing(not self.timing)
        channel = self._channel
        if Cap.WRITE_REGION in self.caps and isinstance(channel, StreamChannel):
            channel.offer_region()
        was_connected = self.connected.is_set()
        self.detect_info = detect
        self.connected.set()
        if not was_connected:
            # registered with another STML instance (one that restarted, another
            # gateway's): `resumed`, so it hears that its state is gone (0247)
            for nexus, info in self.nexuses.items():
                held_by, info["held_by"] = info["held_by"], detect.instance
                self._send(nexus_registration(nexus, info["initiator"], info["target"], info["tpg"],
                                              resumed=held_by is not None and held_by != detect.instance))
        self.handler.detect(self.detect_info)

    def _on_xmit_response(self, h: dict[str, Any], frames: list) -> None:
        self._xmit_response(h["tag"], h["status"], h.get("sense"), h.get("resid", 0), frames)

    def _xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int, frames: list) -> None:
        channel = self._channel
        if isinstance(channel, StreamChannel):
            lease = channel.take_lease()   # the read data stays valid until scsi_target_done
            if lease is not None:
                self.lent[tag] = lease
        xmit = self._handler_xmit
        if xmit is None:
            xmit = self.handler.xmit_response   # (it has none: fails as it would have)
        xmit(tag, status, sense, resid, frames)

    def _on_tmf_done(self, h: dict[str, Any], frames: list) -> None:
        if "info" in h:   # 1.6, QUERY ASYNCHRONOUS EVENT only: handlers written earlier never see it
            self.handler.task_mgmt_fn_done(h["tag"], h["response"], h.get("aborted", []), info=h["info"])
        else:
            self.handler.task_mgmt_fn_done(h["tag"], h["response"], h.get("aborted", []))

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
        """Deregister (best effort) and stop: the heartbeats too, even when the
        STML's carrier is gone already (they would reopen it)."""
        self._close_monitor()
        if self._channel is not None and self.connected.is_set():
            self._send({"op": _O.DEREGISTER})
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        if self._done_timer is not None:
            self._done_timer.cancel()
            self._done_timer = None
        if self._channel is None:
            return
        self._channel.close(linger_ms=200)
        self._channel = None
        self._drop_leases()
        self.connected.clear()


Transport = Callable[[bytes, dict[str, Any], list], None]   # (peer ident, header, data frames)


class StmlSender:
    """The STML's end: every message it sends, as a method, so the headers
    are written here and nowhere else. `transport` carries a header (and the
    data frames) to the peer named by its ident."""

    # stage timing (stml.timing.Timing) once the STML times commands: a timed
    # command's response and a heartbeat to a front end on another host take
    # their timed forms. An attribute these methods test, not methods swapped
    # on the instance: the compiled build's callers do not look at the instance
    timing: Any = None

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        # this STML's id in every detect (1.9): a front end that comes back to
        # another one registers its nexuses `resumed` (decisions/0247)
        self.instance = uuid.uuid4().hex

    def detect(self, ident: bytes, *, stml: str, heartbeat_ms: int, limits: dict[str, Any],
               discovery: dict[str, Any], portals: list[dict[str, Any]],
               targets: list[dict[str, Any]], caps: list[str]) -> None:
        self.transport(ident, {"op": _O.DETECT, "version": list(CONTRACT_VERSION), "stml": stml,
                               "heartbeat_ms": heartbeat_ms, "limits": limits, "discovery": discovery,
                               "portals": portals, "targets": targets, "caps": caps,
                               "instance": self.instance}, [])

    def refuse(self, ident: bytes, reason: str, standby: bool = False) -> None:
        """A registration refused: `detect` with the reason; `standby`: by a
        gateway that does not serve now (the front end tries another)."""
        header: dict[str, Any] = {"op": _O.DETECT, "version": list(CONTRACT_VERSION), "error": reason}
        if standby:
            header["standby"] = True
        self.transport(ident, header, [])

    def release(self, ident: bytes, reason: str) -> None:
        self.transport(ident, {"op": _O.RELEASE, "reason": reason}, [])

    def heartbeat(self, ident: bytes) -> None:
        timing = self.timing
        if timing is not None:
            clock = timing.front_ends.get(ident)   # a front end granted timing
            if clock is not None and not clock.same_host:   # (one on this host shares our clock)
                self.heartbeat_timed(ident, time.monotonic_ns())
                return
        self.transport(ident, {"op": _O.HEARTBEAT}, [])

    def heartbeat_timed(self, ident: bytes, t: int) -> None:
        """A heartbeat that asks for an `echo` (stage timing, 1.7): `t` is when it left."""
        self.transport(ident, {"op": _O.HEARTBEAT, "t": t}, [])

    def nexus_ready(self, ident: bytes, nexus: int, error: str | None = None) -> None:
        header: dict[str, Any] = {"op": _O.NEXUS_READY, "nexus": nexus}
        if error is not None:
            header["error"] = error
        self.transport(ident, header, [])

    def rdy_to_xfer(self, ident: bytes, tag: int, offset: int, length: int) -> None:
        self.transport(ident, {"op": _RDY_TO_XFER, "tag": tag, "offset": offset, "length": length}, [])

    def xmit_response(self, ident: bytes, tag: int, status: int, sense: bytes | None, resid: int,
                      data: list) -> None:
        if self.timing is None or not self._timed_response(ident, tag, status, sense, resid, data):
            self._xmit_response(ident, tag, status, sense, resid, data)

    def _xmit_response(self, ident: bytes, tag: int, status: int, sense: bytes | None, resid: int,
                       data: list) -> None:
        """xmit_response, untimed."""
        self.transport(ident, {"op": _XMIT_RESPONSE, "tag": tag, "status": status, "sense": sense,
                               "resid": resid}, data)

    def _timed_response(self, ident: bytes, tag: int, status: int, sense: bytes | None, resid: int,
                        data: list) -> bool:
        """While timing: a timed command's response, sent with its stamps (True);
        False for one that is not timed."""
        ts = self.timing.responded(ident, tag)
        if ts is None:
            return False
        self.xmit_response_timed(ident, tag, status, sense, resid, data, ts)
        return True

    def xmit_response_timed(self, ident: bytes, tag: int, status: int, sense: bytes | None, resid: int,
                            data: list, ts: list[int]) -> None:
        """xmit_response with the STML's stamps of the command (stage timing, 1.7)."""
        self.transport(ident, {"op": _XMIT_RESPONSE, "tag": tag, "status": status, "sense": sense,
                               "resid": resid, "ts": ts}, data)

    def task_mgmt_fn_done(self, ident: bytes, tag: int, response: int, aborted: list[int],
                          info: bytes = b"") -> None:
        header = {"op": _TMF_DONE, "tag": tag, "response": response, "aborted": aborted}
        if info:
            header["info"] = info
        self.transport(ident, header, [])

    def report_aen(self, ident: bytes, nexus: int | None, lun: int, sense: bytes) -> None:
        self.transport(ident, {"op": _O.REPORT_AEN, "nexus": nexus, "lun": lun, "sense": sense}, [])

    def drop_nexus(self, ident: bytes, nexus: int, reason: str) -> None:
        self.transport(ident, {"op": _O.DROP_NEXUS, "nexus": nexus, "reason": reason}, [])

    def mgmt_reply(self, ident: bytes, rid: int | None, ok: bool, result: Any = None,
                   error: str | None = None) -> None:
        header: dict[str, Any] = {"op": _O.MGMT_REPLY, "id": rid, "ok": ok}
        if ok:
            header["result"] = result
        else:
            header["error"] = error
        self.transport(ident, header, [])


def boot_id() -> str | None:
    """This host's boot id: processes with the same one share CLOCK_MONOTONIC."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def registration(name: str, kind: str, heartbeat_ms: int, aen: bool, caps: Sequence[str],
                 version: tuple[int, int] = CONTRACT_VERSION) -> dict[str, Any]:
    """A `register_target_front_end` header (a link's, or replay's for a front
    end that was registered when a trace began)."""
    return {"op": _O.REGISTER, "version": list(version), "kind": kind, "name": name,
            "heartbeat_ms": heartbeat_ms, "aen": aen, "caps": list(caps)}


def nexus_registration(nexus: int, initiator: str, target: str, tpg: int,
                       resumed: bool = False) -> dict[str, Any]:
    """A `register_nexus` header (`resumed` only when true: 1.9)."""
    header = {"op": _O.REGISTER_NEXUS, "nexus": nexus, "initiator": initiator, "target": target, "tpg": tpg}
    if resumed:
        header["resumed"] = True
    return header


def mgmt_request(rid: int, cmd: str, args: dict[str, Any]) -> bytes:
    """A packed `mgmt` request (the management client's one message)."""
    return pack({"op": _O.MGMT, "id": rid, "cmd": cmd, "args": args})
