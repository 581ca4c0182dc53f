"""The same-host carrier: the contract's messages on a Unix stream socket,
with bulk data in shared memory (docs/contract.md, "Carriers")."""
from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import mmap
import os
import socket
import struct
import time
from typing import Any, Callable, Final, NamedTuple

from stml.api.shm import BufferPool, SharedRegion
from stml.api.sizes import BIG_FRAME, MAX_FRAMES

log = logging.getLogger("stml.api")


def listening(path: str) -> bool:
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
# bound once (Final: statics when compiled): a frame count, and a message's
# lengths, unpacked without a method lookup per message; a frame copied out
# by the method's descriptor, called directly
_U32_FROM: Final = _U32.unpack_from
_REF = struct.Struct("<2I")      # a shared frame on the wire: offset, length
_ONE_FRAME = struct.Struct("<2I")   # a message of one frame: count, length
_TWO_FRAMES = struct.Struct("<3I")  # of two: count, lengths
_SHARED = 0x80000000   # a frame length with this bit: the frame is (offset, length) in the shared region
CONTROL_REGION, CONTROL_FREE = 1, 2
# How long what is handed back (slots, delivered responses) may wait for a
# message to ride on before it leaves on its own. Under load the next message
# comes first; a timer that fires anyway wakes a process that would have slept:
# at 1 ms that was one wake-up every few commands at QD1 (decisions/0603).
# Idle, slots come back this much later, which costs nothing: until then the
# lender copies through the socket if it runs short.
RETURN_AFTER = 0.02
# What one message may bring through the socket, by default (a peer's frames
# together; shared references aside): a receiver that knows better passes its
# own (the STML: one command's data, max_transfer + FRAME_ROOM, as ZeroMQ's
# MAXMSGSIZE), so a peer cannot make it allocate more than a command may carry.
MAX_MESSAGE = 1 << 30


@functools.lru_cache(maxsize=64)
def _u32s(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


# the frame lengths of the usual messages (a header, its data), without the cache's call
_U32S: Final = tuple(struct.Struct(f"<{n}I") for n in range(8))
_LENGTHS_FROM: Final = tuple(s.unpack_from for s in _U32S)
_TOBYTES: Final = memoryview.tobytes


class FramingError(ValueError):
    """The peer broke the framing: nothing after this can be trusted."""


class SharedRef(NamedTuple):
    """A frame that lives in the peer's shared region (StreamFramer leaves
    mapping it to the driver, which holds the region)."""
    offset: int
    length: int


_REF_FROM: Final = _REF.unpack_from
_REF_SIZE: Final = 8
_NEW_TUPLE: Final = tuple.__new__


# (Final: a static in the compiled build, not a lookup in the module's dict, per read)
_SHARED_REF: Final = SharedRef


class Control(NamedTuple):
    """A control message (frame count 0): its kind and u32 values."""
    kind: int
    values: tuple[int, ...]


def encode(frames: list, region: SharedRegion | None = None) -> tuple[list, int]:
    """One message as buffers to send: u32 frame count, u32 lengths, the
    frames; and how many bytes they are. A frame that is a view of a slot of
    our shared `region` is lent to the peer and sent as (offset, length), a
    reference."""
    count = len(frames)
    if count == 1:   # a header alone (most messages to the STML): no lengths to gather
        header = frames[0]
        size = len(header)
        return [_ONE_FRAME.pack(1, size), header], 8 + size
    if count == 2:   # a header and its data (a response): nothing lent, no lists gathered
        data = frames[1]
        if region is None or type(data) is not memoryview or id(data.obj) not in region.slots:
            header = frames[0]
            size, more = len(header), len(data)
            return [_TWO_FRAMES.pack(2, size, more), header, data], 12 + size + more
    lengths, wire = [], []
    total = 4 + 4 * count
    for f in frames:
        # (the test inline, the call only for a slot: per message)
        ref = region.lend_slot(f) if region is not None and type(f) is memoryview \
            and id(f.obj) in region.slots else None
        if ref is not None:
            lengths.append(_SHARED | ref[1])
            wire.append(_REF.pack(*ref))
            total += _REF.size
        else:
            size = len(f)
            lengths.append(size)
            wire.append(f)
            total += size
    return [_lengths(count + 1).pack(count, *lengths), *wire], total


def _lengths(count: int) -> struct.Struct:
    """The Struct of a message's frame count and lengths."""
    return _U32S[count] if count < len(_U32S) else _u32s(count)


def encode_control(kind: int, values: tuple[int, ...] | list[int]) -> bytes:
    """A control message: count 0, its kind, how many values, the values (the
    slots handed back, per flush: a Struct made once per count, not a format
    string built and looked up each time)."""
    n = len(values)
    return (_CONTROLS[n] if n < len(_CONTROLS) else _u32s(3 + n)).pack(0, kind, n, *values)


_CONTROLS: Final = tuple(struct.Struct(f"<{3 + n}I") for n in range(64))


class StreamFramer:
    """The receive side of the stream carrier, without I/O (as fetd_tcp's
    PduFramer): bytes go in, messages and control messages come out.

        buf = framer.get_buffer()          # where the next bytes go
        framer.received(sock.recv_into(buf))
        while (item := framer.next()) is not None:
            ...                            # (frames, special) or a Control

    Small messages are parsed in a staging buffer that is reused, so their
    frames are copied out (bytes). A frame of `big` bytes or more gets a
    buffer of its own from `alloc`, and get_buffer returns the part of it
    still to come, so the socket writes it in place. A frame the peer sent
    as a reference into its shared region comes out as a SharedRef.
    `special` lists the indexes of the frames that are neither (None for
    the usual message): in-place buffers and SharedRefs, which the driver
    resolves and accounts for. next() raises FramingError for a message or
    frame over the limits or an unknown control message.
    """

    def __init__(self, alloc: Callable[[int], Any] = bytearray, big: int = BIG_FRAME,
                 max_bytes: int = MAX_MESSAGE) -> None:
        self.alloc = alloc
        self.big = big
        self.max_bytes = max_bytes    # a message's frames together, refused before any is allocated
        self._buf = memoryview(bytearray(big))
        self._start = self._end = 0    # unparsed bytes in _buf
        self._lengths: tuple[int, ...] = ()   # the frame lengths of the message being received
        self._next = 0                 # index of its next frame
        self._frames: list = []        # its frames received so far
        self._special: list[int] | None = None   # indexes of its in-place and shared frames
        self._big: memoryview | None = None   # a big frame being received in place
        self._big_pos = 0

    @property
    def receiving_in_place(self) -> bool:
        """The next bytes go into a big frame (never a control message's)."""
        return self._big is not None

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._big is not None:
            return self._big[self._big_pos:]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):   # make room: move the unparsed tail down
            rest = self._end - self._start
            self._buf[:rest] = self._buf[self._start:self._end]
            self._start, self._end = 0, rest
        return self._buf[self._end:]

    def received(self, n: int) -> None:
        """`n` bytes were written at the start of the last get_buffer()."""
        if self._big is not None:
            self._big_pos += n
        else:
            self._end += n

    def abandon(self) -> list:
        """The in-place buffers of a message cut short (the stream ended), so
        they can go back where they came from."""
        held = [self._frames[i] for i in self._special or () if type(self._frames[i]) is memoryview]
        if self._big is not None:
            held.append(self._big)
        self._frames, self._special, self._big = [], None, None
        return held

    def next(self) -> tuple[list, list[int] | None] | Control | None:
        """The next complete message as (frames, special), a Control, or None."""
        if self._big is not None:
            if self._big_pos < len(self._big):
                return None
            big, self._big = self._big, None
            if (done := self._add(big)) is not None:
                return done
        buf = self._buf
        while True:
            start, avail = self._start, self._end - self._start
            if self._next == len(self._lengths):
                if avail < 4:
                    return None
                # (ints and a tuple of them, declared: the compiled build does their
                # arithmetic natively, where it did it on objects; a loop, not sum()
                # and max(): per message)
                count: int = _U32_FROM(buf, start)[0]
                if count == 0:
                    return self._control(start, avail)
                if count > MAX_FRAMES:
                    raise FramingError(f"a message of {count} frames")
                if avail < 4 + 4 * count:
                    return None
                lengths: tuple[int, ...] = (_LENGTHS_FROM[count](buf, start + 4) if count < len(_LENGTHS_FROM)
                                            else _u32s(count).unpack_from(buf, start + 4))
                start += 4 + 4 * count
                avail -= 4 + 4 * count
                # the frames' bytes (a shared reference's length carries the _SHARED bit:
                # its bytes are not sent, its (offset, length) is), what is on the wire,
                # the largest frame sent
                plain = wire = biggest = 0
                shared = False
                for n in lengths:
                    if n & _SHARED:
                        shared = True
                        wire += _REF_SIZE
                    else:
                        plain += n
                        wire += n
                        if n > biggest:
                            biggest = n
                if plain > self.max_bytes:
                    raise FramingError(f"a message of {plain} bytes")
                if biggest < self.big and wire <= avail:
                    # all here, nothing big (the usual message; a read's response with its
                    # data in the peer's region too): no state kept
                    frames: list[Any] = []
                    special: list[int] | None = None
                    for size in lengths:
                        if shared and size & _SHARED:
                            if special is None:
                                special = []
                            special.append(len(frames))
                            # (tuple.__new__: not the NamedTuple's Python-level __new__, per message)
                            frames.append(_NEW_TUPLE(_SHARED_REF, _REF_FROM(buf, start)))
                            start += _REF_SIZE
                        else:
                            frames.append(_TOBYTES(buf[start:start + size]))
                            start += size
                    self._start = start
                    return frames, special
                self._lengths, self._next, self._start = lengths, 0, start
            size = self._lengths[self._next]
            frame: Any
            if size & _SHARED:
                if avail < 8:
                    return None
                frame = _NEW_TUPLE(_SHARED_REF, _REF_FROM(buf, start))
                self._start += _REF_SIZE
            elif size >= self.big:    # its own buffer: what is here now, then receive into it
                frame = memoryview(self.alloc(size))[:size]
                take = min(size, avail)
                frame[:take] = buf[start:start + take]
                self._start += take
                if take < size:
                    self._next += 1
                    self._big, self._big_pos = frame, take
                    return None
            elif avail >= size:
                frame = _TOBYTES(buf[start:start + size])
                self._start += size
                self._next += 1
                self._frames.append(frame)
                if self._next == len(self._lengths):
                    return self._take()
                continue
            else:
                return None
            self._next += 1
            if (done := self._add(frame)) is not None:
                return done

    def _add(self, frame: Any) -> tuple[list, list[int] | None] | None:
        """A shared or in-place frame; the message when it was the last."""
        if self._special is None:
            self._special = []
        self._special.append(len(self._frames))
        self._frames.append(frame)
        return self._take() if self._next == len(self._lengths) else None

    def _take(self) -> tuple[list, list[int] | None]:
        frames, special = self._frames, self._special
        self._frames, self._special = [], None
        return frames, special

    def _control(self, start: int, avail: int) -> Control | None:
        """A control message: None until it is all here."""
        if avail < 12:
            return None
        kind, n = struct.unpack_from("<2I", self._buf, start + 4)
        if kind not in (CONTROL_REGION, CONTROL_FREE):
            raise FramingError(f"unexpected control message {kind}")
        if n > MAX_FRAMES:
            raise FramingError(f"a control message of {n} values")
        if avail < 12 + 4 * n:
            return None
        values = struct.unpack_from(f"<{n}I", self._buf, start + 12)
        self._start = start + 12 + 4 * n
        return Control(kind, values)


class Lease:
    """Frames a StreamChannel delivered that are not plain bytes: views of the
    peer's shared region and buffers from the pool. They stay valid until
    release(), which hands them back (the slots to the peer, with the next
    message we send; the buffers to the pool). Once only."""

    __slots__ = ("channel", "offsets", "buffers")

    def __init__(self, channel: StreamChannel) -> None:
        self.channel = channel
        self.offsets: list[int] = []    # in the peer's region
        self.buffers: list[Any] = []    # from the channel's pool

    def release(self) -> None:
        self.channel._release_now(self)   # (StreamChannel.release without its call: per read)


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
    peer (offer_region: a memfd, over SCM_RIGHTS, in a control message) and
    sends frames taken from it as (offset, length) references; the peer
    delivers them as read-only views of the same memory.

    Frames that are not plain bytes (views of the peer's region, buffers
    from `pool`) are valid while on_message runs. A receiver that keeps them
    longer calls take_lease() during that call and later lease.release():
    the slots then go back to the peer (control message "free", with the
    next message we send or within RETURN_AFTER) and the buffers to the
    pool. An untaken lease is released when on_message returns.
    A peer that breaks the framing, or closes, ends the channel (`on_closed`).
    """

    BIG: Final = BIG_FRAME
    MAX_FRAMES: Final = MAX_FRAMES
    MAX_MESSAGE: Final = MAX_MESSAGE
    # Messages that leave together at most while a batch is handled: under
    # load the two processes then overlap on the CPUs instead of taking turns
    # over 20-30 commands a read (README, Performance: with the CPU split of
    # `run`, 4 KiB QD16 0.46-0.48 -> 0.65-0.70 of tgtd; 2, 3, 6, 8 no better).
    BATCH: Final = 4

    def __init__(self, sock: socket.socket, on_message: Callable[[list], None],
                 on_closed: Callable[[], None], pool: BufferPool | None = None,
                 region: SharedRegion | None = None,
                 on_dispatched: Callable[[], None] | None = None, max_message: int = MAX_MESSAGE) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_message = on_message
        self.on_closed = on_closed
        self.on_dispatched = on_dispatched   # after the messages of one read
        # the sender's tap (FrontEndLink._tap_channel): an attribute, not a `send`
        # set on the instance, so the compiled build's channel (no __dict__) takes it
        self.outbound: Callable[[list], bool] | None = None
        self.pool = pool or BufferPool()
        self.region = region            # ours, to lend the peer once offered
        self.region_offered = False     # its control message is queued: frames may refer to it
        self._region_msg: bytes | None = None   # that message, until sent with the descriptor
        self.closed = False
        self.framer = StreamFramer(self.pool.get, self.BIG, max_message)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._out: list = []
        self._out_bytes = 0            # what _out holds, in bytes (flush's sendmsg took all of it?)
        self._queued = 0               # messages in _out
        self._flush_scheduled = False
        self._waiting = False          # the socket is full: its writability resumes the flush
        self._dispatching = False      # handling what a read brought: send() need not schedule
        self._peer_region: memoryview | None = None   # the peer's region, mapped
        self._fds: list[int] = []       # descriptors received, not yet claimed
        self._lease: Lease | None = None   # what the message being delivered holds
        self._freed: list[int] = []     # peer slots to hand back with the next flush
        self._free_timer: asyncio.TimerHandle | None = None
        self._loop.add_reader(self._fd, self._on_readable)

    def offer_region(self) -> bool:
        """Pass our region to the peer (once), after what is already queued:
        from then on, frames taken from it travel as references. False when
        there is none to offer."""
        if self.region is None or self.region_offered or self.closed:
            return False
        self._region_msg = encode_control(CONTROL_REGION, (self.region.size,))
        self._out.append(self._region_msg)
        self._out_bytes += len(self._region_msg)
        self.region_offered = True
        if not self._flush_scheduled and not self._waiting and not self._dispatching:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        return True

    def send(self, frames: list, tapped: bool = True) -> None:
        """Queue a message (header, data...) for this loop iteration. An
        `outbound` tap sees it first and may hold it back (a tap lets a held
        message go with tapped=False)."""
        if (tapped and self.outbound is not None and not self.outbound(frames)) or self.closed:
            return
        region = self.region
        parts, size = encode(frames, region if self.region_offered else None)
        self._out += parts
        self._out_bytes += size
        self._queued_one()

    def _queued_one(self) -> None:
        """A message was queued: flush at once when BATCH are waiting, else
        once in this loop iteration (unless the caller holds the flush)."""
        self._queued += 1
        if self._queued >= self.BATCH and not self._waiting:
            self.flush(inline=True)
            return
        if not self._flush_scheduled and not self._waiting and not self._dispatching:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def send_encoded(self, message: bytes, data: bytes | None = None) -> None:
        """Queue a message framed already (count, lengths, frames: a front
        end's fixed header, per command), and the bytes of its last frame
        after it if it has one: no list of frames, no encode. Only for a
        message that lends nothing, and untapped (the caller checks
        `outbound`: a tap must see the frames)."""
        if self.closed:
            return
        out = self._out
        out.append(message)
        if data is None:
            self._out_bytes += len(message)
        else:
            out.append(data)
            self._out_bytes += len(message) + len(data)
        self._queued_one()

    @property
    def delivering(self) -> bool:
        """Handing over what one read brought: on_dispatched is called after
        the last of it (when there is one)."""
        return self._dispatching and self.on_dispatched is not None

    def hold(self) -> None:
        """The caller flushes once it has handled what it holds (a front end's
        read from its initiators): until then, sends schedule no flush of
        their own, which would find nothing left (per read: a callback and a
        loop turn). The caller must flush() after, whatever happens."""
        self._flush_scheduled = True

    def flush(self, inline: bool = False) -> None:
        """Send what is queued. `inline`: called from send(), inside some
        handler's stack, so a broken socket is left to the writability
        callback to close rather than pulling the link from under the handler;
        a flush scheduled (or held for) is still to come then."""
        if not inline:
            self._flush_scheduled = False
        self._queued = 0
        out = self._out
        if self._freed:
            freed = encode_control(CONTROL_FREE, self._freed)
            out.append(freed)
            self._out_bytes += len(freed)
            self._freed.clear()
        while out and not self.closed:
            try:
                whole = len(out) <= _IOV_MAX and self._region_msg is None
                chunk = out if whole else out[:_IOV_MAX]
                if self._region_msg is not None:
                    cut = self._region_chunk(chunk)
                    if cut is None:
                        continue
                    chunk = cut
                n = self.sock.sendmsg(chunk)
                if whole and n == self._out_bytes:   # all of it (the usual case): no walk
                    out.clear()
                else:
                    _consume(out, n)
                self._out_bytes -= n
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

    def _region_chunk(self, chunk: list) -> list | None:
        """`chunk` cut short before the region's control message; None when that
        message is first: then it goes alone, with the descriptor (the peer's
        from then on: ours is closed)."""
        at = next((i for i, b in enumerate(chunk) if b is self._region_msg), len(chunk))
        if at:
            return chunk[:at]
        region = self.region
        assert region is not None   # the message is queued only for a region
        n = self.sock.sendmsg(chunk[:1], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", region.fd))])
        self._region_msg = None
        region.close()
        _consume(self._out, n)
        self._out_bytes -= n
        return None

    def _on_readable(self) -> None:
        framer = self.framer
        try:
            if self._peer_region is None and not framer.receiving_in_place:   # a region may come
                n, anc, _, _ = self.sock.recvmsg_into([framer.get_buffer()],
                                                      socket.CMSG_SPACE(struct.calcsize("i")))
                self._take_fds(anc)
            else:
                n = self.sock.recv_into(framer.get_buffer())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._close()
            return
        framer.received(n)
        self._dispatching = True
        try:
            while not self.closed and (item := framer.next()) is not None:
                if isinstance(item, Control):
                    self._control(item)
                    continue
                frames, special = item
                if special is None:
                    self._deliver(frames)
                else:
                    self._deliver_held(frames, special)
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

    def _control(self, control: Control) -> None:
        kind, values = control
        if kind == CONTROL_REGION and len(values) == 1 and self._peer_region is None and self._fds:
            fd = self._fds.pop(0)
            try:
                # a region that could shrink under the mapping would kill us (SIGBUS) on
                # access; one smaller than announced, mmap refuses
                if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                    raise FramingError("it is not sealed against shrinking")
                self._peer_region = memoryview(mmap.mmap(fd, values[0], prot=mmap.PROT_READ))
            except (OSError, ValueError) as e:
                raise FramingError(f"cannot map the peer's region: {e}") from None
            finally:
                os.close(fd)
        elif kind == CONTROL_FREE and self.region is not None:
            self.region.give_back(values)
        else:
            raise FramingError(f"unexpected control message {kind}")

    def _deliver_held(self, frames: list, special: list[int]) -> None:
        """A message with shared or in-place frames: delivered with a lease on them."""
        lease = Lease(self)
        region = self._peer_region
        for i in special:
            frame = frames[i]
            if type(frame) is _SHARED_REF:
                offset, length = frame
                if region is None or offset + length > len(region):
                    self._release_now(lease)
                    raise FramingError("a reference outside the shared region")
                frames[i] = region[offset:offset + length]
                lease.offsets.append(offset)
            else:
                lease.buffers.append(frame)
        self._lease = lease
        try:
            self.on_message(frames)
        except Exception:  # one bad message must not stop the link
            log.exception("error handling a message")
        # (read back through take_lease: mypy, and so the compiled build, takes
        # self._lease for the Lease just assigned, though on_message may have taken it)
        if self.take_lease() is not None:   # not taken: the frames were used during the call only
            if lease.offsets:
                self._release_now(lease)
            else:                       # (in-place buffers only: the usual untaken lease)
                release = self.pool.release
                for buf in lease.buffers:
                    release(buf)

    def take_lease(self) -> Lease | None:
        """While on_message runs: keep its shared and in-place frames past the
        call, until the returned lease is released (None: it has none)."""
        lease, self._lease = self._lease, None
        return lease

    def _release_now(self, lease: Lease) -> None:
        # (new lists only where there was something: a lease lends slots or buffers, per read)
        if lease.buffers:
            for buf in lease.buffers:
                self.pool.release(buf)
            lease.buffers = []
        if lease.offsets:
            if not self.closed:
                self._freed += lease.offsets
                if self._free_timer is None:
                    # a wake-up of the peer of its own would cost more than the copy the slot
                    # saved: they ride on the next message we send, or go after RETURN_AFTER
                    # (one timer at a time, left running when a message takes them first)
                    self._free_timer = self._loop.call_later(RETURN_AFTER, self._free_timeout)
            lease.offsets = []

    def _free_timeout(self) -> None:
        self._free_timer = None
        if self._freed and not self.closed:
            self.flush()

    def _deliver(self, frames: list) -> None:
        try:
            self.on_message(frames)
        except Exception:  # one bad message must not stop the link
            log.exception("error handling a message")

    def _close(self, notify: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._waiting:
            self._loop.remove_writer(self._fd)
        self.sock.close()
        self._out.clear()
        self._out_bytes = 0
        self._freed.clear()
        if self._free_timer is not None:
            self._free_timer.cancel()
        for buf in self.framer.abandon():   # a message cut short
            self.pool.release(buf)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self.region is not None:
            self.region.close()   # the descriptor, if it was never sent
            self.region.peer_gone()
        if notify:
            self.on_closed()

    def close(self, linger_ms: int = 0) -> None:
        """Send what is queued, waiting at most linger_ms in all (0: drop it,
        as ZeroMQ's linger does), then close."""
        if self.closed:
            return
        self._loop.remove_reader(self._fd)
        if self._region_msg is not None:   # never offered: nothing after it may refer to it
            del self._out[next(i for i, b in enumerate(self._out) if b is self._region_msg):]
        deadline = time.monotonic() + linger_ms / 1000
        try:
            while self._out and (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                _consume(self._out, self.sock.sendmsg(self._out[:_IOV_MAX]))
        except OSError:
            pass
        self._close(notify=False)


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

