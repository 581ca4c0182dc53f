"""The ZeroMQ carrier: every peer (remote front ends over tcp:// with CURVE,
management clients, front ends that prefer it), with batching."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from stml.api import sizes
from stml.api.messages import Op, pack, unpack
from stml.api.sizes import BIG_FRAME

log = logging.getLogger("stml.api")


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

    ZERO_COPY = BIG_FRAME

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list], None], routed: bool = False) -> None:
        self.sock = sock
        self.on_message = on_message
        self.outbound: Callable[[list], bool] | None = None   # the sender's tap (as StreamChannel's)
        self.routed = routed
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._out: dict[bytes, list[list]] = {}
        self._flush_scheduled = False
        self.frame: zmq.Frame | None = None   # of the message being handled (user_id, connection)
        self._monitor: zmq.Socket | None = None   # watch_connections
        self._on_closed: Callable[[int], None] | None = None
        self._on_event: Callable[[int, int, str], None] | None = None
        self.closed = False   # callbacks already queued (the first drain, a flush) then do nothing
        # a message of too many frames being let go: [frames so far, its sender]
        self._dropping: list | None = None
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)

    def send(self, frames: list, tapped: bool = True) -> None:
        """Queue a message ([identity,] header, data...) for this loop iteration.
        An `outbound` tap sees it first, as on StreamChannel."""
        if tapped and self.outbound is not None and not self.outbound(frames):
            return
        peer = frames[0] if self.routed else b""
        self._out.setdefault(peer, []).append(frames[1:] if self.routed else frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def hold(self) -> None:
        """As StreamChannel.hold: the caller flushes once it has handled what it holds."""
        self._flush_scheduled = True

    def flush(self) -> None:
        self._flush_scheduled = False
        if self.closed:
            self._out.clear()
            return
        self._send_out()
        self._drain()

    def _send_out(self) -> None:
        out, self._out = self._out, {}
        for peer, msgs in out.items():
            for frames in _batches(msgs):
                copy = all(len(f) < self.ZERO_COPY for f in frames)
                self.sock.send_multipart([peer, *frames] if self.routed else frames, copy=copy)

    def _receive(self) -> list[zmq.Frame] | None:
        """The next message's frames (zmq.Again when there is none), or None
        for none to deliver: on a routed socket (the STML's, which any front
        end or manager may reach), a message of more than MAX_FRAMES frames
        (the identity frame aside) is let go frame by frame, at most
        MAX_FRAMES a turn of the loop, as it is received. MAXMSGSIZE bounds a
        frame, not their number (0226). A front end's socket reaches only the
        STML it chose, which may be older than the cap and send bigger
        batches: it takes every message whole."""
        sock = self.sock
        if self._dropping:
            self._drop()
            return None
        most = sizes.MAX_FRAMES + 1 if self.routed else 0
        raw = [sock.recv(zmq.NOBLOCK, copy=False)]
        while raw[-1].more:
            if len(raw) == most:
                self._dropping = [most, raw[0].bytes.hex() if self.routed else "the peer"]
                self._drop()
                return None
            raw.append(sock.recv(copy=False))
        return raw

    def _drop(self) -> None:
        """Let go of up to MAX_FRAMES more frames of the message being dropped
        (ZeroMQ has it whole: every part is there to receive); the rest, if
        any, on the next turn of the loop."""
        dropping = self._dropping
        assert dropping is not None
        for _ in range(sizes.MAX_FRAMES):
            dropping[0] += 1
            if not self.sock.recv(copy=False).more:
                self._dropping = None
                log.warning("dropped a ZeroMQ message of %d frames from %s: at most %d make one message",
                            dropping[0], dropping[1], sizes.MAX_FRAMES)
                return None
        self._loop.call_soon(self._drain)
        raise zmq.Again   # the drain ends here for this turn

    def _drain(self) -> None:
        if self.closed:
            return
        sock = self.sock
        # EVENTS is an int option; pyzmq types every getsockopt as int | bytes
        # (closed: a message handled below may close the channel, e.g. a standby's detect)
        while not self.closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator, arg-type]
            try:
                raw = self._receive()
            except zmq.Again:
                return
            if raw is None:
                continue
            # memoryviews; a routed socket's frame 0 becomes the peer's identity (bytes)
            frames: list[Any] = [f.buffer for f in raw]
            if self.routed:
                ident = frames[0] = frames[0].tobytes()
                if ident[:1] == b"\0" and len(ident) != 5:
                    # ZeroMQ names a peer that sets no routing id "\0" + 4 bytes; any other
                    # id with a leading zero byte was chosen, to pass for one the STML
                    # gives its own peers (the stream's "\0stream-N"): never delivered
                    log.warning("refused a message from a ZeroMQ peer whose routing id %s is "
                                "reserved (a leading zero byte)", ident.hex())
                    continue
            self.frame = raw[0]
            try:
                self._deliver(frames)
            except Exception:  # one bad message must not stop the link
                log.exception("error handling a message")
            self.frame = None

    def user_id(self) -> str | None:
        """The ZAP User-Id of the connection the message being handled came on
        (zmq_msg_gets, stml.roles): None without ZAP (ipc://, plain TCP); ""
        when no message is being handled (a message handed on later, e.g. by
        fault injection, carries none: nothing is known of it)."""
        frame = self.frame
        if frame is None:
            return ""
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:   # no such property: the connection had no ZAP
            return None

    def peer_address(self) -> str | None:
        """Where the message being handled came from (ZeroMQ's Peer-Address:
        the peer's IP over TCP, "localhost:UID:GID:PID" over ipc://); None when
        no message is being handled or ZeroMQ does not say."""
        frame = self.frame
        if frame is None:
            return None
        try:
            return str(frame.get("Peer-Address"))
        except zmq.ZMQError:
            return None

    def connection(self) -> int | None:
        """The connection (its file descriptor) the message being handled came
        on, for watch_connections; None when no message is being handled."""
        frame = self.frame
        if frame is None:
            return None
        try:
            return int(frame.get(zmq.SRCFD))   # (deprecated in libzmq, but nothing replaces it)
        except zmq.ZMQError:   # a libzmq without it: heartbeats alone tell a front end is gone
            return None

    def watch_connections(self, on_closed: Callable[[int], None],
                          on_event: Callable[[int, int, str], None] | None = None) -> None:
        """Call on_closed(fd) when a peer's connection ends (a socket monitor).
        ZeroMQ reports the end before it closes the descriptor, so once
        poll_connections() has run, a message's connection() is never one
        whose end is still to be reported. `on_event(event, value, endpoint)`
        also hears of each connection accepted and each handshake failed on
        the protocol (a socket has one monitor: the STML logs those, 0709)."""
        self._on_closed = on_closed
        self._on_event = on_event
        events = zmq.EVENT_DISCONNECTED
        if on_event is not None:
            events |= zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        self._monitor = self.sock.get_monitor_socket(events)
        self._loop.add_reader(self._monitor.fileno(), self.poll_connections)
        self._loop.call_soon(self.poll_connections)

    def poll_connections(self) -> None:
        """Report the connections that ended (watch_connections), now."""
        mon, on_closed, on_event = self._monitor, self._on_closed, self._on_event
        if mon is None or on_closed is None:
            return
        # EVENTS is an int option; pyzmq types every getsockopt as int | bytes
        while mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator, arg-type]
            try:
                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if on_event is not None:
                try:
                    on_event(int(event["event"]), int(event["value"]),
                             bytes(event["endpoint"]).decode(errors="replace"))
                except Exception:  # a log line's failure must not stop the watch
                    log.exception("error handling a connection event")
            if event["event"] == zmq.EVENT_DISCONNECTED:
                try:
                    on_closed(int(event["value"]))
                except Exception:  # one bad release must not stop the watch
                    log.exception("error handling the end of a connection")

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
        if not self.closed:
            self._send_out()     # what was queued leaves; nothing more is delivered (no drain)
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._monitor is not None:
            self._loop.remove_reader(self._monitor.fileno())
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self.sock.close(linger=linger_ms)


def _batches(msgs: list[list]) -> list[list]:
    """The messages queued for one peer as ZeroMQ messages: one alone as it
    is, several behind a batch header, each batch of at most MAX_FRAMES
    frames with its header (what a receiver takes, 0226)."""
    if len(msgs) == 1:
        return msgs
    out: list[list] = []
    group: list[list] = []
    size = 1
    for m in msgs:
        if group and size + len(m) > sizes.MAX_FRAMES:
            out.append(_batch(group))
            group, size = [], 1
        group.append(m)
        size += len(m)
    out.append(_batch(group))
    return out


def _batch(group: list[list]) -> list:
    """Messages as one ZeroMQ message: a batch header, then their frames."""
    if len(group) == 1:
        return group[0]
    frames = [pack({"op": Op.BATCH, "n": [len(m) for m in group]})]
    for m in group:
        frames += m
    return frames


_BATCH_PREFIX = pack({"op": Op.BATCH})[1:]  # the map body, without its size byte


def _batch_counts(frame: memoryview) -> list[int] | None:
    """Frame counts of a batch header; None for an ordinary message."""
    if len(frame) < len(_BATCH_PREFIX) + 1 or bytes(frame[1:1 + len(_BATCH_PREFIX)]) != _BATCH_PREFIX:
        return None
    counts = unpack(frame).get("n")
    if not isinstance(counts, list) or not all(isinstance(c, int) and c > 0 for c in counts):
        raise ValueError("malformed batch header")
    return counts

