"""The STML process: a ZeroMQ ROUTER socket around the Emulator."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import ipaddress
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Final, Protocol

import zmq

from stml.api import BufferPool, Channel, Op, SharedRegion, StmlSender, StreamChannel, pack, stream_path, unpack
from stml.api.messages import (RX_CMND_OP, TO_STML, XMIT_RESPONSE_FIXED, XMIT_RESPONSE_PARTS, Cap, DecodeError,
                                check, decode_rx_cmnd, rx_cmnd_fields)
from stml.api.sizes import FRAME_ROOM, SHARED_READ_MIN
from stml.api.stream import Lease
from stml.api.tap import Tap, TapPoint, combine
from stml.config import Config, ConfigError, StartupError
from stml.emulator import Emulator, Target
from stml.lu import CannotOpen, LogicalUnit, Offline, open_store, record_image, served_before
from stml.lunmap import LunMap
from stml.metrics import Metrics
from stml.mgmt import Management
from stml.persist import EditedError, give_ids, save
from stml.portals import PortalStates, portal_entries, portal_groups
from stml import pr
from stml.pr import PrStoreError
from stml.roles import (GUARDS, CurveAllowList, FailedHandshakes, RoleAuthenticator, accepted_peer, allow_list,
                        refusal)
from stml.task import Task
from stml.trace.recorder import Traces

if TYPE_CHECKING:
    from stml.metrics import PrometheusExporter

log = logging.getLogger("stml")
WORKER_THREADS = 8   # threads for blocking backend calls, shared fairly among LUs
STREAM_CAPS = frozenset({Cap.WRITE_REGION.value})
# ops the per-message paths compare with, as plain strs (an enum member costs an attribute hook)
_RX_CMND, _XMIT_RESPONSE, _TMF_DONE = Op.RX_CMND.value, Op.XMIT_RESPONSE.value, Op.TMF_DONE.value
_MGMT, _PORTAL_STATE, _REGISTER = Op.MGMT.value, Op.PORTAL_STATE.value, Op.REGISTER.value
_RX_CMND_OP_END = 1 + len(RX_CMND_OP)   # (after the map's first byte)
# what _receive hands to _control: not per command
_CONTROL = frozenset({_MGMT, _PORTAL_STATE, _REGISTER})


class Stream(Protocol):
    """What the STML uses of a front end's stream: a StreamChannel, or the
    stand-in of pathcost and the tests (the compiled build checks the type)."""
    region: SharedRegion | None

    def send(self, frames: list) -> None: ...

    def close(self, linger_ms: int = 0) -> None: ...


def build_targets(config: Config, templates: dict[str, Any]) -> tuple[list[Target], bool]:
    """Open every LUN's backend. One that cannot open is served offline (one
    line says why): a missing disk must not take every other LUN's service
    with it, nor make a supervised restart fail for good (0280). True with
    them when an RBD image's identity was recorded (the file is to be saved)."""
    targets = []
    recorded = False
    for t in config.targets:
        luns = LunMap()
        for lc in t.luns:
            o = lc.options
            backend: Any
            try:
                backend = open_store(o, create=not served_before(o))
                recorded = record_image(o, backend, f"target {t.name} LUN {lc.lun}") or recorded
            except CannotOpen as e:
                log.error("target %s LUN %d (%s %s) is offline: %s; fix it, then `scsi-target config "
                          "reload`", t.name, lc.lun, o.kind, o.path or "", e)
                backend = Offline(str(e))
            luns[lc.lun] = LogicalUnit(t.name, lc.lun, backend, o, templates["disk"])
        targets.append(Target(t.name, luns, t.alias, t.access(), t.target_reset))
    return targets, recorded


def _save_identities(config: Config) -> None:
    """Write the identities a start gave or recorded into the file. One that
    cannot be written is logged, and served: the next save writes it (a
    restart before it gives the same legacy ids again, new random ones)."""
    try:
        save(config)
    except (OSError, EditedError) as e:
        log.error("the LUNs' identities were not saved to %s: %s; a file the STML cannot write keeps "
                  "them only with `legacy_ids = false` in it (docs/decisions/0281)", config.path, e)


@contextlib.contextmanager
def owner_only() -> Iterator[None]:
    """Sockets bound meanwhile are the STML's user's alone (mode 0600 whatever
    the umask): whoever can connect to an ipc:// endpoint manages the target
    (decision 0285). Unix sockets take their mode from the umask at bind,
    as fetd_vhost's do."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def _is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a name or an interface: treat as reachable from elsewhere


class BusyPoll:
    """After traffic from a same-host front end, keep the loop polling its
    sockets (a callback that queues itself again makes each loop turn an epoll
    with a zero timeout) for `window` seconds before it may sleep. The next
    command then finds the STML awake instead of waking a halted CPU, which
    on a VM without halt polling goes through the hypervisor (README,
    Performance: 4 KiB QD1 0.45 -> 0.70 of tgtd). It spends CPU the STML
    would leave idle, so it pays only on CPUs the front end does not share:
    `run` turns it on when it split them (polling on a shared CPU made QD1
    worse)."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = asyncio.get_running_loop()
        self.window = window
        self.clock = clock      # a test's own clock counts turns where time would race
        self.until = 0.0
        self.spinning = False

    def touch(self) -> None:
        """Traffic: poll until `window` after now."""
        self.until = self.clock() + self.window
        if not self.spinning:
            self.spinning = True
            self.loop.call_soon(self._spin)

    def _spin(self) -> None:
        if self.clock() < self.until:
            self.loop.call_soon(self._spin)
        else:
            self.spinning = False


# (Final: the compiled build keeps them in statics, not the module's dict)
_XMIT_PACK: Final = XMIT_RESPONSE_FIXED.pack
_XMIT_K0: Final = XMIT_RESPONSE_PARTS[0]
_XMIT_K1: Final = XMIT_RESPONSE_PARTS[1]
_XMIT_K2: Final = XMIT_RESPONSE_PARTS[2]
_MONOTONIC: Final = time.monotonic


class _Sender(StmlSender):
    """The STML's messages to its front ends; a response without sense data
    and without a tap is sent from its fields (no header dict): counted, packed
    in xmit_response's fixed layout (stml.api.messages) and queued, where the
    dict went through the transport, the counters' lookups and the packer.
    Every other message, and every message while a tap is on, goes the way
    StmlSender writes it."""

    def __init__(self, server: StmlServer) -> None:
        super().__init__(server._send)
        self.server = server

    def xmit_response(self, ident: bytes, tag: int, status: int, sense: bytes | None, resid: int,
                      data: list) -> None:
        if self.timing is not None and self._timed_response(ident, tag, status, sense, resid, data):
            return
        server = self.server
        if sense is None and server.tap is None:
            try:   # (messages.pack_xmit_response, in place: its frame cost as much as the packing)
                header = _XMIT_PACK(_XMIT_K0, tag, _XMIT_K1, status, _XMIT_K2, resid)
            except struct.error:   # a value past the layout: the dict's packing
                pass
            else:
                server.metrics.responded(ident, tag, status, resid)
                data.insert(0, header)   # (the emulator's list, made for this response: given up)
                server.route_message(ident, data)
                return
        self._xmit_response(ident, tag, status, sense, resid, data)


@dataclass(frozen=True)
class TraceOptions:
    """`--trace FILE` (scsi-target run / stml): record from the start."""
    path: str
    max_bytes: int
    with_data: bool = False
    force: bool = True   # a file named on the command line is replaced, as a log would be


class StmlServer(TapPoint):
    def __init__(self, config: Config, heartbeat_ms: int | None = None) -> None:
        self.config = config
        # the default data dir does not exist on a fresh machine: disks are created in it
        try:
            config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"data dir {config.data_dir}", e.strerror or str(e)) from None
        self.endpoint = config.stml_endpoint
        self.endpoints = config.stml.endpoints(config.stml_endpoint)
        if heartbeat_ms is None:
            heartbeat_ms = config.stml.heartbeat_ms
        self.auth: RoleAuthenticator | None = None
        self.handshakes: FailedHandshakes | None = None   # CURVE: failures ZAP never hears of (0709)
        self.exporter: PrometheusExporter | None = None
        self.abandoned = False   # the stop left a backend call or a config save running
        self.unclean = False     # a flush or close failed at stop: exit 1 (_finish_backends)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # one thread more than the LUs share (stml.workers): management's calls never wait for them
        self.executor = ThreadPoolExecutor(max_workers=WORKER_THREADS + 1, thread_name_prefix=WORKER_PREFIX)
        self.emulator = Emulator([], self._send, self.executor, heartbeat_ms=heartbeat_ms,
                                 threads=WORKER_THREADS,
                                 discovery=config.discovery(),
                                 data_dir=config.data_dir, portal_groups=portal_groups(config))
        # no frame bigger than a legal one is buffered whole (RCVHWM=0 bounds no size):
        # ZeroMQ disconnects the peer that sends it
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.emulator.max_transfer + FRAME_ROOM)
        self.emulator.out = _Sender(self)
        self.emulator.portals = portal_entries(config.portals)
        # counters exist for real LUs and live sessions only: made on a session's
        # first command to an LU, freed when the session or its front end ends
        self.metrics = Metrics(self.emulator.lookup_lu)
        self.emulator.on_nexus_gone = self.metrics.nexus_gone
        self.emulator.on_front_end_gone = self._front_end_gone
        # LUN entries added by hand get their identity before they are served (0281)
        given = config.path is not None and give_ids(config)
        targets, recorded = build_targets(config, self.emulator.templates)
        for t in targets:
            self.emulator.targets[t.name] = t
        if config.path is not None and (given or recorded):
            _save_identities(config)
        try:
            self.emulator.restore_reservations()   # APTPL state kept under the data dir
        except PrStoreError as pe:   # (a name per type: mypyc types a name once, 0830)
            raise ConfigError("persistent reservations", str(pe)) from None
        if config.stml.timing:
            from stml.api.link import boot_id
            from stml.timing import Timing
            self.emulator.enable_timing(Timing(boot_id()))
        from stml.gateway import Gateway
        # shared (RBD) storage: active or standby; `peers`: one of several gateways
        self.gateway = Gateway(self.emulator, self.executor, grouped=bool(config.stml.peers))
        self.emulator.read_buffer = self._read_buffer
        self.emulator.carrier_caps = self._carrier_caps
        self._lock_fd: int | None = None
        self.listeners: list[socket.socket] = []         # same-host stream sockets
        self.streams: dict[bytes, Stream] = {}    # their connections, by front-end ident
        # ZeroMQ front ends by the connection they registered on, and back (decision 0243)
        self._registered_on: dict[int, bytes] = {}
        self._connection_of: dict[bytes, int] = {}
        self._stream_ids = itertools.count(1)
        self.pool = BufferPool()    # big write-data frames, shared by every stream
        poll_us = config.stml.poll_us
        self.poll = BusyPoll(poll_us / 1e6) if poll_us else None
        # what each front end that follows the portal list says about its listeners
        self.portals = PortalStates(self.emulator.front_ends)
        # instruments on the link (stml.api.tap): None, the one tap, or Taps
        self.tap: Tap | None = None
        self._taps: list[Tap] = []
        # where the carriers hand a message in: _receive, or _receive_tapped with a tap
        self.received: Callable[..., None] = self._receive
        self.traces = Traces(self.emulator, self.add_tap, self.remove_tap)
        self._stalls: list[tuple[Any, Any]] = []   # (LU, StalledBackend) of an injected stall

    def _set_taps(self) -> None:
        """With a tap, messages go through the tapped entry points; without
        one, through the plain ones: the paths then cost what they cost
        before taps existed."""
        self.tap = combine(self._taps)
        self.emulator.out.transport = self._send if self.tap is None else self._send_tapped
        self.received = self._receive if self.tap is None else self._receive_tapped
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.on_message = self.received

    def start_injection(self, rules: list[Any]) -> None:
        """Apply fault-injection rules (stml.api.inject) from now on, before any
        other tap: a trace then records what really crossed the link."""
        from stml.api.inject import Injector, announce
        announce(rules, "the STML")
        # what it holds back and lets go later still passes the taps after it
        injector = Injector(rules, lambda i, h, d: self.deliver(i, h, d, past=injector),
                            lambda i, h, f: self.transmit(i, h, f, past=injector), self.stall_backend)
        self._taps.insert(0, injector)
        self._set_taps()

    def _seen_after(self, past: Tap, ident: bytes, header: dict[str, Any], frames: list,
                    inbound: bool) -> bool:
        """Show a message the tap `past` held back to the taps after it (a trace
        after an injector records it when it really crosses); False: swallowed."""
        taps = self._taps
        later = taps[taps.index(past) + 1:] if past in taps else []
        if not later:
            return True
        packed = pack(header)
        return all((t.inbound if inbound else t.outbound)(ident, header, packed, frames) for t in later)

    def stall_backend(self, lun: int, seconds: float) -> None:
        """Stall LUN `lun`'s backend (of every target that has one) for
        `seconds`, 0: until SIGUSR2 (stml.stall). An offline LU is left as it
        is: it has no store to stall, and wrapped it would no longer look
        offline (it must keep answering 02/04/03: 0268, 0280)."""
        from stml.stall import StalledBackend
        loop = asyncio.get_running_loop()
        for t in self.emulator.targets.values():
            lu = t.luns.get(lun)
            if lu is not None and lu.offline is not None:
                logging.getLogger("inject").warning("LUN %d of %s is offline (%s): not stalled", lun, t.name,
                                                    lu.offline)
            elif lu is not None and not isinstance(lu.backend, StalledBackend):
                stalled = StalledBackend(lu.backend)
                lu.backend = stalled
                self._stalls.append((lu, stalled))
        loop.add_signal_handler(signal.SIGUSR2, self.release_stalls)
        if seconds:
            loop.call_later(seconds, self.release_stalls)

    def release_stalls(self) -> None:
        for lu, stalled in self._stalls:
            if lu.backend is stalled:
                lu.backend = stalled.inner
            stalled.gate.set()
        if self._stalls:
            waited = sum(s.waited for _, s in self._stalls)
            logging.getLogger("inject").warning("released %d stalled backend(s); %d call(s) had waited",
                                                len(self._stalls), waited)
        self._stalls.clear()

    def _send_tapped(self, ident: bytes, header: dict[str, Any], frames: list) -> None:
        """_send, with the tap before it (the header packed once for both)."""
        tap = self.tap
        packed = pack(header)
        if tap is not None and not tap.outbound(ident, header, packed, frames):
            return
        self._count(ident, header)
        self.route(ident, packed, frames)

    def _send(self, ident: bytes, header: dict[str, Any], frames: list) -> None:
        self._count(ident, header)
        self.route(ident, pack(header), frames)

    def _count(self, ident: bytes, header: dict[str, Any]) -> None:
        """The metrics an outgoing message moves (responses, aborted tasks)."""
        op = header["op"]
        if op == _XMIT_RESPONSE:
            self.metrics.xmit_response(ident, header)
        elif op == _TMF_DONE and header.get("aborted"):
            self.metrics.aborted(ident, header["aborted"])

    def route(self, ident: bytes, packed: bytes, frames: list) -> None:
        """Hand a packed message to the carrier its front end is on."""
        self.route_message(ident, [packed, *frames])

    def route_message(self, ident: bytes, message: list) -> None:
        """Hand [packed header, data...] to the carrier its front end is on:
        its own stream (same host) or the ZeroMQ router. The list is given
        up (the router's ident goes in front of it): a caller that built it
        for this message saves a copy per response."""
        stream = self.streams.get(ident)
        if stream is not None:
            stream.send(message)
        else:
            message.insert(0, ident)
            self.channel.send(message)

    def transmit(self, ident: bytes, header: dict[str, Any], frames: list, past: Tap | None = None) -> None:
        """Send a message past the tap (a tap that held one back lets it go here;
        `past`: that tap, whose successors still see it)."""
        if past is not None and not self._seen_after(past, ident, header, frames, inbound=False):
            return
        self._send(ident, header, frames)

    def _bind(self) -> None:
        """Bind every endpoint: ipc:// ones plain (file permissions guard them),
        then tcp:// ones with CURVE when a key is configured. Plain TCP is
        refused unless `insecure` is set, loopback included: any local user
        can connect to a loopback port, where only the STML's own user can
        open its ipc:// socket (decision 0246)."""
        eps = sorted(self.endpoints, key=lambda e: e.startswith("tcp://"))
        for ep in eps:
            if ep.startswith("tcp://") and self.auth is None:
                self._secure_tcp(ep)
            self._bind_one(ep)

    def _secure_tcp(self, ep: str) -> None:
        s = self.config.stml
        if not s.curve_secret_key_file:
            if not s.insecure:
                where = "any local user can reach" if _is_loopback(ep) else "a non-loopback address"
                key = "stml.listen" if ep in s.listen else "stml_endpoint"   # the key the file used
                raise ConfigError(key, f"{ep} is plain TCP ({where}): use ipc:// on this "
                                  "host, or configure [stml] curve_secret_key_file and allowed_front_ends "
                                  "(and allowed_managers), or pass --insecure")
            log.warning("serving %s WITHOUT encryption or authentication (--insecure)%s", ep,
                        ": any local user may manage this target" if _is_loopback(ep) else "")
            return
        from scsi_runtime.curvekeys import load_key_file
        try:
            public, secret = load_key_file(s.curve_secret_key_file, secret=True)
        except ValueError as e:
            raise ConfigError("stml", str(e)) from None
        allowed = allow_list(s)   # (a ConfigError for a key in both lists)
        if not s.allowed_front_ends:
            log.warning("[stml] allowed_front_ends is empty: no remote front end can connect")
        self.auth = RoleAuthenticator(self.ctx, CurveAllowList(allowed))
        self.handshakes = FailedHandshakes(public.decode(), accepted_peer)
        self.auth.start()
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True
        log.info("CURVE on TCP endpoints: STML public key %s, %d front-end and %d manager key(s)",
                 public.decode(), len(s.allowed_front_ends), len(s.allowed_managers))

    def _bind_one(self, endpoint: str) -> None:
        if endpoint.startswith("ipc://"):
            path = Path(endpoint[6:])
            # one STML per socket path: binding would silently steal a live one's socket
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise StartupError(f"stml_endpoint {endpoint}", e.strerror or str(e)) from None
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StartupError("stml_endpoint", f"another STML is already serving {endpoint} "
                                   f"(another target is running in {path.parent})") from None
            stream = stream_path(endpoint)
            assert stream is not None   # an ipc:// endpoint has one
            with owner_only():
                self._bind_stream(stream)   # first: front ends seeing ipc only take ZeroMQ
        try:
            with owner_only() if endpoint.startswith("ipc://") else contextlib.nullcontext():
                self.sock.bind(endpoint)
        except zmq.ZMQError as ze:
            raise ConfigError("stml_endpoint", f"cannot bind {endpoint}: {ze}") from None

    def _bind_stream(self, path: str) -> None:
        """The same-host carrier beside an ipc:// endpoint (stml.api)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)   # a dead STML's: we hold the endpoint's lock
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
        except OSError as e:   # e.g. a path too long for a Unix socket
            listener.close()
            log.warning("no stream socket at %s (%s): same-host front ends use ZeroMQ", path, e)
            return
        listener.listen(128)
        listener.setblocking(False)
        self.listeners.append(listener)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # e.g. out of file descriptors: the front end retries
                log.warning("stream socket: %s", e)
                return
            # a leading zero byte: the ZeroMQ carrier refuses peers that choose such a
            # routing id (stml.api.zmq_carrier), so no remote peer can pass for this one
            self._open_stream(conn, b"\0stream-%d" % next(self._stream_ids))

    def _open_stream(self, conn: socket.socket, ident: bytes) -> None:
        try:
            region: SharedRegion | None = SharedRegion()
        except OSError as e:   # no memfd: read data goes through the socket
            log.warning("no shared memory for a stream front end: %s", e)
            region = None

        def on_message(frames: list) -> None:
            # the frames' lease: write data stays in the front end's memory (or a
            # pooled buffer) until its command ends (Emulator._forget). The list is
            # the framer's own, made for this message: the ident goes in front in
            # place, not into a copy (per command)
            frames.insert(0, ident)
            self.received(frames, stream.take_lease())

        stream = StreamChannel(conn, on_message, lambda: self._stream_closed(ident), self.pool, region,
                               self.poll.touch if self.poll else None,
                               max_message=self.emulator.max_transfer + FRAME_ROOM)
        stream.offer_region()   # first: a front end of any version maps it whenever it comes
        self.streams[ident] = stream

    def _carrier_caps(self, ident: bytes) -> frozenset[str]:
        """A front end on the stream may lend us its write region (ZeroMQ has no regions)."""
        return STREAM_CAPS if ident in self.streams else frozenset()

    def _read_buffer(self, task: Task, size: int) -> memoryview | None:
        """Read data of SHARED_READ_MIN and more for a same-host front end goes
        into memory it shares: backend -> shared memory -> its socket, no copy
        through ours (smaller data costs less to copy than to lend). The task
        gives the slot back when it ends; the front end, once it sent it."""
        if size >= SHARED_READ_MIN and task.slot_region is None:   # (one slot a task: Task.slot)
            stream = self.streams.get(task.fe.ident)
            if stream is not None and stream.region is not None:
                region = stream.region
                view = region.get(size)
                if view is not None:
                    task.slot = view   # (before the region: _forget releases what it finds there)
                    task.slot_region = region
                    return view
        return None   # new memory: the read brings its own (sbc.read)

    def _stream_closed(self, ident: bytes) -> None:
        """A closed stream is a front end gone for good (it reconnects as a
        new one): its nexuses are released now, not after heartbeats."""
        del self.streams[ident]
        fe = self.emulator.front_ends.get(ident)
        if fe is not None:
            log.info("front end %s closed its stream", fe.name)
            self.emulator.release_front_end(fe, "deregistered")
        else:
            self.emulator.drop_waiting(ident)

    def _bind_front_end(self, ident: bytes) -> None:
        """A ZeroMQ front end just registered: it is the connection that sent
        the registration (decision 0243). A registration handed on later (a
        tap) has no known connection: heartbeats alone then tell it is gone."""
        fd = self.channel.connection()
        if fd is None or not self.emulator.takes(ident):   # (refused: nothing to bind)
            return
        self._unbind(ident)
        other = self._registered_on.get(fd)
        if other is not None:   # (never, when ZeroMQ reported that connection's end)
            self._unbind(other)
        self._registered_on[fd] = ident
        self._connection_of[ident] = fd

    def _unbind(self, ident: bytes) -> None:
        fd = self._connection_of.pop(ident, None)
        if fd is not None:
            del self._registered_on[fd]

    def _connection_closed(self, fd: int) -> None:
        """A ZeroMQ connection ended: a front end registered on it is gone for
        good, as one whose stream closed (a peer that takes its routing id
        later is another peer, and finds no front end there)."""
        ident = self._registered_on.get(fd)
        if ident is None:
            return
        self._unbind(ident)
        fe = self.emulator.front_ends.get(ident)
        if fe is not None:
            self.emulator.release_front_end(fe, "its connection closed")
        else:   # (its registration waits for its ident's release: nobody is left to answer)
            self.emulator.drop_waiting(ident)

    def _front_end_gone(self, ident: bytes) -> None:
        self.metrics.front_end_gone(ident)
        if not self.emulator.takes(ident):   # (registered again while it was released: bound to that)
            self._unbind(ident)

    async def serve(self, stop: asyncio.Event, trace: TraceOptions | None = None) -> None:
        if trace is not None:   # before any front end can connect: the trace sees everything
            try:
                await self.traces.start(trace.path, with_data=trace.with_data, max_bytes=trace.max_bytes,
                                        force=trace.force, from_start=True)
            except OSError as e:
                raise StartupError(f"--trace {trace.path}", e.strerror or str(e)) from None
        try:
            self._bind()
        except ConfigError:
            if self.auth is not None:
                self.auth.stop()
            self.traces.stop("stml", "the STML could not start")
            raise
        luns = sum(len(t.luns) for t in self.emulator.targets.values())
        log.info("STML serving %d target(s), %d LUN(s) on %s", len(self.emulator.targets), luns,
                 ", ".join(self.endpoints))
        for ep in self.endpoints:
            print(f"stml: listening on {ep}", flush=True)
        self.mgmt = Management(self.emulator, self.config, gateway=self.gateway, metrics=self.metrics,
                               portals=self.portals, endpoints=self.endpoints, traces=self.traces)
        self.channel = Channel(self.sock, self.received, routed=True)
        self.channel.watch_connections(self._connection_closed,
                                       self.handshakes.event if self.handshakes is not None else None)
        self.gateway.start()
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.add_reader(listener.fileno(), self._accept, listener)
        if self.config.stml.metrics:
            from stml.metrics import PrometheusExporter
            self.exporter = PrometheusExporter(self.metrics, self.emulator, asyncio.get_running_loop())
            try:
                self.exporter.start(self.config.stml.metrics)
            except (OSError, ValueError) as me:
                raise ConfigError("metrics", f"cannot serve {self.config.stml.metrics}: {me}") from None
            print(f"stml: metrics on http://{self.config.stml.metrics}/metrics", flush=True)
        beats = asyncio.create_task(self._liveness())
        await stop.wait()
        # a config save under way ends (its change is not lost), and its
        # command answers, before the channel closes; a hung one is abandoned
        saves = asyncio.ensure_future(self.mgmt.finish_saves(STOP_SAVE))
        self.emulator.shutdown()
        beats.cancel()
        await self.gateway.stop()
        await asyncio.sleep(0.05)  # let the release messages leave
        await self.traces.stop_at_exit("stml", "the STML stopped", TRACE_EXIT_WAIT)
        if not await saves:
            self.abandoned = True   # exit without joining the saver thread (0259)
        self.channel.close(linger_ms=100)
        for listener in self.listeners:
            loop.remove_reader(listener.fileno())
            with contextlib.suppress(OSError):
                os.unlink(listener.getsockname())
            listener.close()
        for stream in list(self.streams.values()):
            stream.close(linger_ms=100)
        if self.exporter is not None:
            self.exporter.stop()
        if self.auth is not None:
            self.auth.stop()
        # background jobs (SANITIZE) end with the STML: each waits only for the
        # backend call it has under way, so SIGTERM still stops it promptly
        await asyncio.gather(*(lu.stop_jobs() for t in self.emulator.targets.values()
                               for lu in t.luns.values()))
        await self._finish_backends(STOP_BACKENDS)

    async def _finish_backends(self, bound: float) -> None:
        """Flush every LU (its acknowledged writes made durable), then close it once
        no worker runs a call; off the loop, in threads of their own, waiting at
        most `bound` seconds. A call hung in a worker (a dead NFS server, an RBD
        outage) then neither stalls the loop (heartbeats, replies) nor keeps the
        other LUs from flushing; what did not finish is named in one line and
        abandoned (`self.abandoned`: the process must exit without joining it)."""
        self.executor.shutdown(wait=False, cancel_futures=True)   # queued calls: never acknowledged
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        lus = [(f"LUN {lu.lun} of {t.name}", lu) for t in self.emulator.targets.values()
               for lu in t.luns.values()]
        # removed LUs whose backends wait to close: their acknowledged writes too (0254)
        mgmt = getattr(self, "mgmt", None)   # (none if the start failed)
        lus += [(f"removed LUN {lu.lun} of {lu.target}", lu) for lu in (mgmt.closing_lus if mgmt else ())]

        def flush(name: str, lu: LogicalUnit) -> None:
            try:
                lu.backend.flush()
                log.info("%s: flushed", name)
            except Exception as e:   # noqa: BLE001 - one LU's failure must not skip the others
                log.error("%s: flush at stop failed: %s", name, e)
                self.unclean = True   # acknowledged writes may not be durable: exit 1

        flushes = {f"flush of {name}": threading.Thread(target=flush, args=(name, lu), name=f"flush {name}",
                                                       daemon=True)
                   for name, lu in lus}
        pr.stop_saving()   # (on this loop: no reservation save is queued after the wait below)
        flushes["reservation saves"] = threading.Thread(target=pr.wait_for_saves, name="pr saves", daemon=True)

        def close() -> None:
            try:
                for thread in flushes.values():
                    thread.join()
                self.executor.shutdown(wait=True)
                for name, lu in lus:
                    try:
                        lu.backend.close()
                    except Exception as e:   # noqa: BLE001 - e.g. EIO from close(2) on NFS
                        log.error("%s: close at stop failed: %s", name, e)
                        self.unclean = True
            finally:
                loop.call_soon_threadsafe(_resolve, finished)

        for thread in flushes.values():
            thread.start()
        threading.Thread(target=close, name="close backends", daemon=True).start()
        try:
            await asyncio.wait_for(finished, bound)
        except asyncio.TimeoutError:
            hung = [name for name, thread in flushes.items() if thread.is_alive()]
            calls = sum(t.name.startswith(WORKER_PREFIX) for t in threading.enumerate())
            log.error("stopping: after %gs still running, abandoned: %s", bound,
                      ", ".join([*hung, f"{calls} backend call(s) in workers"]))
            self.abandoned = True

    def _receive_tapped(self, frames: list, lease: Lease | None = None) -> None:
        """_receive, with the tap between decoding and handling. A message the
        roles guard is admitted before the tap, while its carrier still knows
        its connection (a tap may hand it on later, through deliver)."""
        tap = self.tap
        try:
            header = unpack(frames[1]) if len(frames) > 1 else None
        except ValueError:
            header = None
        if header is not None and header["op"] in GUARDS and not self._admit(frames[0], header):
            if lease is not None:
                lease.release()
            return
        if header is not None and tap is not None and not tap.inbound(frames[0], header, frames[1], frames[2:]):
            if lease is not None:
                lease.release()
            return
        self._receive(frames, lease, header)

    def _receive(self, frames: list, lease: Lease | None = None,
                 header: dict[str, Any] | None = None) -> None:
        """[ident, header, data...] from either carrier; `lease`: the stream
        carrier's hold on the data frames (the emulator passes it to their task).
        `header`: decoded already (by _receive_tapped, or deliver), and then
        admitted already (stml.roles)."""
        ident = frames[0]
        admitted = header is not None
        if header is None:
            try:
                if len(frames) < 2:
                    raise ValueError("no header")
                raw = frames[1]
                if raw[1:_RX_CMND_OP_END] == RX_CMND_OP and self.emulator.timing is None:
                    # a command, typed in C (stml.api.messages.RxCmnd); a header it does
                    # not take is decoded again below as a dict: the table's way
                    try:
                        c = decode_rx_cmnd(raw)
                    except DecodeError:
                        pass
                    else:
                        tag, nexus, lun, cdb, attr, direction, length, unsol = rx_cmnd_fields(c)
                        fe = self.emulator.front_ends.get(ident)
                        now = _MONOTONIC()   # (one clock read for the metrics and the front end's liveness)
                        if fe is not None:
                            self.metrics.command(ident, fe, tag, nexus, lun, direction, length, now)
                        self.emulator.command(fe, ident, tag, nexus, lun, cdb, attr, direction, length,
                                              unsol, frames[2:], lease, now)
                        return
                header = unpack(raw)
            except ValueError as e:
                log.warning("refused a message from %s: %s", ident.hex(), e)
                if lease is not None:
                    lease.release()
                return
        op = header["op"]
        if op == _RX_CMND:
            self.metrics.rx_cmnd(ident, header, self.emulator.front_ends.get(ident))
        elif op in _CONTROL:
            self._control(ident, op, header, frames, lease, admitted)
            return
        self.emulator.handle(ident, header, frames[2:], lease)

    def _control(self, ident: bytes, op: str, header: dict[str, Any], frames: list, lease: Lease | None,
                 admitted: bool) -> None:
        """register, mgmt and portal_state: the roles first (stml.roles)."""
        if op in GUARDS and not admitted and not self._admit(ident, header):
            if lease is not None:
                lease.release()
            return
        if op == _REGISTER:
            zmq_peer = ident not in self.streams
            if zmq_peer:   # ends reported since: the registration is judged on what is now
                self.channel.poll_connections()
            self.emulator.handle(ident, header, frames[2:], lease)
            if zmq_peer:
                self._bind_front_end(ident)
            return
        if lease is not None:     # data frames mean nothing here
            lease.release()
        error = check(header, TO_STML)
        if error is not None:
            log.warning("refused a message from %s: %s", ident.hex(), error)
            if op == _MGMT and type(header.get("id")) is int:
                self.emulator.out.mgmt_reply(ident, header["id"], False, error=error)
        elif op == _MGMT:
            self.mgmt.handle(ident, header)
        elif ident in self.emulator.front_ends:   # a front end's portals, nobody else's (review 4)
            self.portals.report(ident, header)
        else:
            log.warning("ignored portal_state from %s: not a registered front end", ident.hex())

    def _admit(self, ident: bytes, header: dict[str, Any]) -> bool:
        """Whether this peer may send this register or mgmt (stml.roles); a
        refusal is answered (mgmt_reply, or detect with the error) and logged.
        Called while the carrier handles the message: a stream peer is on this
        host (no User-Id); a ZeroMQ one's connection carries its role."""
        op = header["op"]
        stream = ident in self.streams
        user_id = None if stream else self.channel.user_id()
        # a ZeroMQ peer whose address ZeroMQ does not give is not known to be here ("")
        address = None if stream else (self.channel.peer_address() or "")
        fe = self.emulator.front_ends.get(ident)
        why = refusal(op, user_id, fe is not None, address)
        if why is None:
            return True
        log.warning("refused %s from %s: %s", op, fe.name if fe is not None else ident.hex(), why)
        if op == _REGISTER:
            self.emulator.out.refuse(ident, why)
        elif type(header.get("id")) is int:
            self.emulator.out.mgmt_reply(ident, header["id"], False, error=why)
        return False

    def deliver(self, ident: bytes, header: dict[str, Any], data: list, past: Tap | None = None) -> None:
        """Handle a decoded message past the tap (a tap that held one back,
        with copies of its data, lets it in here; `past`: that tap, whose
        successors still see it)."""
        if past is not None and not self._seen_after(past, ident, header, data, inbound=True):
            return
        # handed on later, maybe while the carrier handles another peer's message:
        # not that message's connection (a registration here is tied to none, 0243)
        channel = getattr(self, "channel", None)   # (none before serve)
        if channel is None:
            self._receive([ident, b"", *data], None, header)
            return
        frame, channel.frame = channel.frame, None
        try:
            self._receive([ident, b"", *data], None, header)
        finally:
            channel.frame = frame

    async def _liveness(self) -> None:
        while True:
            await asyncio.sleep(self.emulator.heartbeat)
            self.emulator.check_liveness()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():   # (the waiter may have given up and cancelled it)
        future.set_result(None)


WORKER_PREFIX = "backend"   # the backend worker threads' names
STOP_GRACE = 3.0   # after SIGTERM, a busy STML gets this long to stop cleanly
STOP_BACKENDS = 5.0   # and its LUs this long to flush and close (a hung backend call is abandoned)
STOP_SAVE = 5.0       # and a config save under way this long to end, before that (0259)
TRACE_EXIT_WAIT = 2.0  # and a trace being recorded this long for its file to close


class StopGuard:
    """SIGTERM and SIGINT stop the STML within STOP_GRACE seconds however busy
    its loop is. The signals are blocked in every thread and taken by a thread
    of their own (so it must start before any other thread exists): it asks
    the loop to stop and, if the loop has not finished by the deadline, ends
    the process. Acknowledged writes are already with the kernel, so nothing
    acknowledged is lost; what a forced exit skips is the goodbye to the
    front ends and the removal of the socket files, which the next start and
    every client recognise as stale. Once the loop has taken the stop, the stop
    bounds itself (STOP_SAVE, STOP_BACKENDS: 0204, 0259) and the guard only backs it up."""

    SIGNALS: ClassVar[set[signal.Signals]] = {signal.SIGTERM, signal.SIGINT}

    def __init__(self, stop: asyncio.Event, grace: float = STOP_GRACE) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop, self.grace = stop, grace
        self.done = threading.Event()
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        threading.Thread(target=self._wait, name="stop-guard", daemon=True).start()

    def _wait(self) -> None:
        sig = signal.sigwait(self.SIGNALS)
        heard = threading.Event()   # the loop ran the stop: it bounds the rest itself (STOP_BACKENDS)
        self.loop.call_soon_threadsafe(self._stop, heard)
        began = time.monotonic()
        if not heard.wait(self.grace) or not self.done.wait(self.grace + STOP_SAVE + STOP_BACKENDS):
            # no logging call: the blocked thread may hold a handler's lock
            with contextlib.suppress(OSError):
                os.write(2, f"stml: still busy {time.monotonic() - began:.0f}s after "
                            f"{signal.Signals(sig).name}: exiting without a clean stop\n".encode())
            os._exit(1)

    def _stop(self, heard: threading.Event) -> None:
        self.stop.set()
        heard.set()


async def run_stml(config: Config, trace: TraceOptions | None = None, inject: list[Any] | None = None) -> None:
    stop = asyncio.Event()
    guard = StopGuard(stop)
    server = StmlServer(config)
    if inject:
        server.start_injection(inject)
    loop = asyncio.get_running_loop()

    def reload() -> None:
        mgmt = getattr(server, "mgmt", None)
        if mgmt is not None:   # SIGHUP before the STML serves: nothing to reload yet
            loop.create_task(mgmt.reload_on_signal())

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await server.serve(stop, trace)
    finally:
        guard.done.set()
    if server.abandoned:   # a hung backend call or config save: exiting normally would join it forever
        logging.shutdown()
        os._exit(1)
    if server.unclean:     # a flush or close failed: the stop was not clean (0204)
        raise SystemExit(1)
