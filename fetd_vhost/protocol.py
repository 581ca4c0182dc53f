"""The vhost-user protocol, back-end (slave) side, sans I/O.

`Framer` cuts the master's byte stream (plus the descriptors that came with
it) into messages; `Session` is the state machine: feature negotiation, the
memory table, and each ring's configuration. It performs no socket or
eventfd I/O: replies come back as bytes, and what the device must do (look
at a ring, watch a kick descriptor, drain a ring that is being stopped) goes
to a `RingObserver`. References: QEMU's docs/interop/vhost-user.rst.
"""
from __future__ import annotations

import enum
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

from fetd_vhost.memory import MAX_REGIONS, BadAddress, GuestMemory, Region, RegionSpec
from fetd_vhost.virtqueue import Virtqueue

log = logging.getLogger("fetd_vhost")

HEADER = struct.Struct("<3I")
VERSION = 0x1
F_REPLY = 1 << 2
F_NEED_REPLY = 1 << 3
MAX_PAYLOAD = 4096        # the largest message we take (a memory table is 264 bytes)
MAX_FDS = MAX_REGIONS     # descriptors one message may carry
U64 = struct.Struct("<Q")
STATE = struct.Struct("<2I")
ADDR = struct.Struct("<2I4Q")
REGION = struct.Struct("<4Q")
VRING_INDEX_MASK, VRING_NOFD = 0xFF, 1 << 8


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18


class Feature(enum.IntEnum):
    """Virtio feature bits this back end knows (device, ring and transport)."""
    SCSI_INOUT = 0
    SCSI_HOTPLUG = 1
    SCSI_CHANGE = 2
    NOTIFY_ON_EMPTY = 24
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    PROTOCOL_FEATURES = 30     # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    REPLY_ACK = 3


def bits(*names: int) -> int:
    return sum(1 << int(n) for n in names)


class ProtocolError(Exception):
    """The master broke the protocol: the connection ends."""


@dataclass(slots=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def take_fd(self) -> int | None:
        return self.fds.pop(0) if self.fds else None


def encode(request: int, payload: bytes = b"", reply: bool = True) -> bytes:
    return HEADER.pack(request, VERSION | (F_REPLY if reply else 0), len(payload)) + payload


class Framer:
    """Bytes (and descriptors) in, messages out. The reader asks `want()`
    bytes at a time, so one read never spans two messages and descriptors
    belong to the message they arrived with."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []

    def want(self) -> int:
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[2] - len(self._buf)

    def feed(self, data: bytes, fds: list[int] | None = None) -> Message | None:
        """Take bytes read (at most want()) and the descriptors that came with
        them; the message once it is whole. Raises ProtocolError."""
        self._fds += fds or ()
        if len(self._fds) > MAX_FDS:
            self.close()
            raise ProtocolError(f"more than {MAX_FDS} descriptors with one message")
        self._buf += data
        if self._header is None:
            if len(self._buf) < HEADER.size:
                return None
            request, flags, size = HEADER.unpack(self._buf)
            if flags & 0x3 != VERSION:
                self.close()
                raise ProtocolError(f"vhost-user version {flags & 3} (only 1 is known)")
            if size > MAX_PAYLOAD:
                self.close()
                raise ProtocolError(f"a {size}-byte payload (at most {MAX_PAYLOAD})")
            self._header = (request, flags, size)
            self._buf.clear()
        if len(self._buf) < self._header[2]:
            return None
        request, flags, _ = self._header
        msg = Message(request, flags, bytes(self._buf), self._fds)
        self._header, self._fds = None, []
        self._buf.clear()
        return msg

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


class RingObserver(Protocol):
    """What the device does when the session changes a ring."""

    def ring_changed(self, ring: Virtqueue) -> None:
        """Started, enabled, given a new kick descriptor or new memory: look at it."""

    def ring_stopping(self, ring: Virtqueue, done: Callable[[], None]) -> None:
        """The master stops the ring (GET_VRING_BASE): no new chains; call
        `done` once every request taken from it is answered."""

    def features_changed(self, features: int) -> None: ...


class Session:
    """One master connection's state. `handle` takes a message and returns
    the reply to send now (or None); a stopped ring's reply comes later
    through `send_reply`, given at construction."""

    def __init__(self, features: int, protocol_features: int, max_queues: int,
                 observer: RingObserver, send_reply: Callable[[bytes], None]) -> None:
        self.offered = features | bits(Feature.PROTOCOL_FEATURES)
        self.offered_protocol = protocol_features
        self.max_queues = max_queues
        self.observer = observer
        self.send_reply = send_reply
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.memory: GuestMemory | None = None
        self.rings: list[Virtqueue] = []
        self.stopping: set[int] = set()
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Req.GET_FEATURES: lambda m: U64.pack(self.offered),
            Req.SET_FEATURES: self._set_features,
            Req.GET_PROTOCOL_FEATURES: lambda m: U64.pack(self.offered_protocol),
            Req.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Req.GET_QUEUE_NUM: lambda m: U64.pack(self.max_queues),
            Req.SET_OWNER: self._set_owner,
            Req.RESET_OWNER: self._reset_owner,
            Req.SET_MEM_TABLE: self._set_mem_table,
            Req.SET_VRING_NUM: self._set_vring_num,
            Req.SET_VRING_ADDR: self._set_vring_addr,
            Req.SET_VRING_BASE: self._set_vring_base,
            Req.GET_VRING_BASE: self._get_vring_base,
            Req.SET_VRING_KICK: lambda m: self._set_vring_fd(m, "kick_fd"),
            Req.SET_VRING_CALL: lambda m: self._set_vring_fd(m, "call_fd"),
            Req.SET_VRING_ERR: lambda m: self._set_vring_fd(m, "err_fd"),
            Req.SET_VRING_ENABLE: self._set_vring_enable,
        }

    @property
    def event_idx(self) -> bool:
        return bool(self.features & bits(Feature.EVENT_IDX))

    def has(self, feature: int) -> bool:
        return bool(self.features >> feature & 1)

    # ---------------------------------------------------------------- dispatch
    def handle(self, msg: Message) -> bytes | None:
        """The reply to send now, or None. Raises ProtocolError (close the
        connection) for what cannot be answered; descriptors the message
        brought are always either kept or closed."""
        handler = self._handlers.get(msg.request)
        try:
            if handler is None:
                name = f"request {msg.request}"
                raise _Refused(f"{name} is not supported")
            body = handler(msg)
            ok = True
            if body is DEFERRED:
                return None
        except _Refused as e:
            log.warning("vhost-user: %s", e)
            body, ok = None, False
        finally:
            msg.close_fds()
        if body is not None:
            return encode(msg.request, body)
        if msg.flags & F_NEED_REPLY and self.protocol_features & bits(ProtocolFeature.REPLY_ACK):
            return encode(msg.request, U64.pack(0 if ok else 1))
        if not ok and msg.request in _REPLY_EXPECTED:
            raise ProtocolError(f"cannot answer request {msg.request}")
        return None

    def ring(self, index: int) -> Virtqueue:
        if index >= self.max_queues:
            raise _Refused(f"ring {index} (at most {self.max_queues} queues)")
        while len(self.rings) <= index:
            self.rings.append(Virtqueue(len(self.rings)))
        return self.rings[index]

    def close(self) -> None:
        for ring in self.rings:
            for name in ("kick_fd", "call_fd", "err_fd"):
                fd = getattr(ring, name)
                if fd is not None:
                    os.close(fd)
                    setattr(ring, name, None)
            ring.started = False
            ring.detach()
        self.memory = None

    # ---------------------------------------------------------------- handlers
    def _set_features(self, msg: Message) -> None:
        features = _u64(msg)
        # QEMU passes device bits it offers itself (param_change) even when we did
        # not: take what we know, ignore the rest
        self.features = features & self.offered
        for ring in self.rings:
            ring.event_idx = self.event_idx
            ring.indirect = self.has(Feature.INDIRECT_DESC)
        self.observer.features_changed(self.features)
        return None

    def _set_protocol_features(self, msg: Message) -> None:
        self.protocol_features = _u64(msg) & self.offered_protocol
        return None

    def _set_owner(self, msg: Message) -> None:
        self.owner = True
        return None

    def _reset_owner(self, msg: Message) -> None:
        # deprecated; the spec suggests ignoring it or disabling the rings
        for ring in self.rings:
            ring.enabled = False
        return None

    def _set_mem_table(self, msg: Message) -> None:
        if len(msg.payload) < 8:
            raise _Refused("short memory table")
        count = struct.unpack_from("<I", msg.payload)[0]
        if not 0 < count <= MAX_REGIONS or len(msg.payload) < 8 + count * REGION.size:
            raise _Refused(f"memory table of {count} regions in {len(msg.payload)} bytes")
        if len(msg.fds) != count:
            raise _Refused(f"memory table of {count} regions with {len(msg.fds)} descriptors")
        regions = []
        try:
            for i in range(count):
                spec = RegionSpec(*REGION.unpack_from(msg.payload, 8 + i * REGION.size))
                regions.append(Region(spec, msg.fds[i]))
            memory = GuestMemory(regions)
        except (OSError, ValueError) as e:
            raise _Refused(f"cannot map guest memory: {e}") from None
        self.memory = memory
        for ring in self.rings:   # rings move to the new mappings; one that no longer fits stops
            if ring.desc_addr:
                try:
                    self._attach(ring)
                except _Refused as e:
                    log.warning("vhost-user: %s", e)
        return None

    def _attach(self, ring: Virtqueue) -> None:
        if self.memory is None:
            raise _Refused(f"ring {ring.index} addresses before a memory table")
        try:
            ring.attach(self.memory, self.event_idx, self.has(Feature.INDIRECT_DESC))
        except BadAddress as e:
            ring.detach()
            raise _Refused(f"ring {ring.index}: {e}") from None
        self.observer.ring_changed(ring)

    def _state(self, msg: Message) -> tuple[Virtqueue, int]:
        if len(msg.payload) < STATE.size:
            raise _Refused("short vring state")
        index, num = STATE.unpack_from(msg.payload)
        return self.ring(index), num

    def _set_vring_num(self, msg: Message) -> None:
        ring, num = self._state(msg)
        if ring.started or ring.index in self.stopping:
            raise _Refused(f"ring {ring.index} resized while running")
        if num != ring.num:
            # the ring's views were cut for the old size: until SET_VRING_ADDR
            # (or a memory table) attaches it again, it is not ready
            ring.detach()
        ring.num = num
        return None

    def _set_vring_addr(self, msg: Message) -> None:
        if len(msg.payload) < ADDR.size:
            raise _Refused("short vring address")
        index, _flags, desc, used, avail, _log = ADDR.unpack_from(msg.payload)
        ring = self.ring(index)
        ring.desc_addr, ring.used_addr, ring.avail_addr = desc, used, avail
        self._attach(ring)
        return None

    def _set_vring_base(self, msg: Message) -> None:
        ring, num = self._state(msg)
        ring.last_avail = num & 0xFFFF
        return None

    def _get_vring_base(self, msg: Message) -> bytes:
        """Stop the ring; the answer (the next avail index we would take) waits
        until the requests taken from it are answered, so the master's view of
        the ring (it makes used = avail from it) is true."""
        ring, _ = self._state(msg)
        ring.started = False
        if ring.kick_fd is not None:
            os.close(ring.kick_fd)
            ring.kick_fd = None
        self.stopping.add(ring.index)

        def done() -> None:
            if ring.index in self.stopping:
                self.stopping.discard(ring.index)
                self.send_reply(encode(Req.GET_VRING_BASE, STATE.pack(ring.index, ring.last_avail)))
        self.observer.ring_stopping(ring, done)
        return DEFERRED

    def _set_vring_fd(self, msg: Message, name: str) -> None:
        if len(msg.payload) < U64.size:
            raise _Refused("short vring descriptor message")
        value = _u64(msg)
        ring = self.ring(value & VRING_INDEX_MASK)
        fd = None if value & VRING_NOFD else msg.take_fd()
        if fd is None and not value & VRING_NOFD:
            raise _Refused(f"ring {ring.index}: no descriptor with {name}")
        old = getattr(ring, name)
        if old is not None:
            os.close(old)
        setattr(ring, name, fd)
        if name == "kick_fd":
            ring.started = True
            if not self.has(Feature.PROTOCOL_FEATURES):
                ring.enabled = True   # without protocol features rings start enabled
            self.observer.ring_changed(ring)
        return None

    def _set_vring_enable(self, msg: Message) -> None:
        ring, num = self._state(msg)
        ring.enabled = bool(num)
        self.observer.ring_changed(ring)
        return None


_REPLY_EXPECTED = {Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM, Req.GET_VRING_BASE}
DEFERRED = b"(deferred)"   # a handler's answer that is sent later (GET_VRING_BASE)


class _Refused(Exception):
    """A request we cannot carry out: a failure reply (REPLY_ACK), or a log line."""


def _u64(msg: Message) -> int:
    if len(msg.payload) < U64.size:
        raise _Refused(f"request {msg.request}: short payload")
    return int(U64.unpack_from(msg.payload)[0])
