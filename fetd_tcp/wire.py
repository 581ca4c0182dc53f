"""A connection in the full feature phase on the wire: its input as a
buffered protocol around the sans-IO framer and session, its output as a
writer that sends each loop turn's PDUs in one writev."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Callable, Final, Iterator

from fetd_tcp import pdu as P
from fetd_tcp.budget import OUT, Account
from fetd_tcp.digest import DIGEST_LEN, digest, padding
from fetd_tcp.session import Connection

log = logging.getLogger("fetd_tcp")

WRITE_BACKLOG = 4 << 20  # past this much unsent output, a connection stops reading until it drains
CLOSE_LINGER = 5.0       # a closed connection's unsent output is dropped after this (peer not reading)


class ConnectionProtocol(asyncio.BufferedProtocol):
    """A connection's input in full feature phase, as a buffered protocol.

    Every read is framed in place (fetd_tcp.pdu.PduFramer: big data segments
    are received straight into a buffer of their own) and every complete PDU
    it holds goes to `conn.receive` in order, within the read's callback (no
    task wake-up per PDU); then what those PDUs queued for the STML leaves at
    once (`link.hold` before the first, `link.flush` after the last: no flush
    of the link's own is scheduled per read). `done` ends with the connection: a result when it
    closes (EOF, Logout), an exception for a framing or digest error
    (PDUError: after a data digest error a Reject goes out first) or a bug.
    A PDU the session refuses (PDUError from `receive`) gets a Reject and the
    connection goes on. While more than WRITE_BACKLOG bytes wait in the
    transport, reading stops until it drains (as `drain()` did).
    Shared memory `alloc` gives for a data segment goes back through
    `release` once the PDU is handled (its data then went to the STML, which
    holds it on its own, or was copied or dropped) or the connection ends."""

    def __init__(self, conn: Connection, link: Any, transport: asyncio.Transport,
                 alloc: Any = bytearray, release: Callable[[memoryview], None] | None = None) -> None:
        p = conn.params
        self.conn, self.link, self.transport = conn, link, transport
        self.alloc, self.release = alloc, release
        self.held: list[memoryview] = []   # shared segments taken, not yet given back
        self.framer = P.PduFramer(p.header_digest, p.data_digest, p.max_recv_data_segment_length,
                                  self._alloc if release is not None else alloc)
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.write_paused = False   # the transport's buffer holds something
        self.read_paused = False    # we paused reading until it is empty
        # pause_writing as soon as the transport's buffer holds anything, resume_writing
        # once it is empty: the writer's responses held there are done then (PduWriter)
        transport.set_write_buffer_limits(0)

    def take_over(self, reader: asyncio.StreamReader) -> None:
        """Become the transport's protocol after login. What the StreamReader
        already holds (an initiator may send its first commands right behind
        the last Login Request) is handled first."""
        # no public way to take it without awaiting; private, so not in typeshed
        buffered = reader._buffer  # type: ignore[attr-defined]
        pending = bytes(buffered)
        buffered.clear()
        self.transport.set_protocol(self)
        self.transport.resume_reading()     # the StreamReader may have paused it
        if pending:
            self._run(self.framer.feed(pending))
        if self.conn.closing:
            self._end(None)
        if reader.at_eof() or reader.exception() is not None:
            self._end(None)                 # the initiator closed during login: as IncompleteReadError

    def _alloc(self, size: int) -> bytearray | memoryview:
        buf = self.alloc(size)
        if type(buf) is memoryview:
            self.held.append(buf)
        return buf

    def _give_back(self) -> None:
        """The segments taken so far: the framer delivered them (or the connection ended)."""
        held, self.held = self.held, []
        assert self.release is not None   # held only with a release
        for buf in held:
            self.release(buf)

    # -- asyncio.BufferedProtocol
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.framer.received(nbytes)
        if not self.done.done():
            self._run()

    def eof_received(self) -> None:
        return None     # the transport closes: connection_lost ends `done`

    def connection_lost(self, exc: Exception | None) -> None:
        out = self.conn.send
        if isinstance(out, PduWriter):
            out.lost()
        self._end(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        out = self.conn.send
        if isinstance(out, PduWriter):
            out.resample()
            self.conn.window_update()
        if self.read_paused and not self.done.done():
            self.read_paused = False
            self._run()
            if not self.read_paused:
                self.transport.resume_reading()

    # -- input
    def _run(self, feed: Iterator | None = None) -> None:
        """Handle every complete PDU the framer holds (or `feed` yields), in
        order, until the connection closes or its output backs up."""
        conn, transport, framer = self.conn, self.transport, self.framer
        handled = False
        try:
            while not conn.closing and not transport.is_closing():
                try:
                    item = framer.next() if feed is None else next(feed, None)
                except P.DigestError as e:
                    if conn.erl and e.header is not None:   # the PDU goes, the stream goes on
                        conn.data_digest_error(e.header)
                        handled = True
                        continue
                    if conn.erl and conn.bad_headers == 0:  # dropped; sequence numbers tell
                        conn.bad_headers += 1
                        continue
                    if e.reject_reason == P.REJECT_DATA_DIGEST_ERROR:
                        conn.reject(e.reject_reason, e.header or b"\0" * P.BHS_LEN)
                    raise
                if item is None:
                    break
                pdu, data, header = item
                conn.idle = False
                if not handled:   # what goes to the STML now waits for the flush below
                    handled = True
                    self.link.hold()
                try:
                    conn.receive(pdu, data)
                except P.PDUError as refused:   # (a name per type: mypyc types a name once, 0830)
                    conn.reject(refused.reject_reason, header)
                finally:
                    if self.held:
                        self._give_back()
                if feed is None and self.write_paused and transport.get_write_buffer_size() > WRITE_BACKLOG:
                    self.read_paused = True
                    transport.pause_reading()
                    break
            else:
                if conn.closing:        # Logout: the connection ends here, as the read loop did
                    self._end(None)
        except Exception as exc:        # PDUError, or a bug: it costs this connection only
            self._fail(exc)
        finally:
            if handled:
                try:
                    self.link.flush()
                except Exception:
                    log.exception("STML link flush failed")

    def _fail(self, exc: Exception) -> None:
        """The stream cannot be trusted (or we broke): send what is pending
        (a Reject for a data digest error), close, and end with `exc`."""
        try:
            out = self.conn.send
            if isinstance(out, PduWriter):
                out.flush()
        finally:
            self.transport.close()
            self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        if self.held:
            self._give_back()    # e.g. a segment cut short, or one with a digest error
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)


class TimedConnectionProtocol(ConnectionProtocol):
    """ConnectionProtocol while the STML times commands (stage timing): each
    read is stamped for the link, whose rx_cmnd sends it as the time the
    front end received the commands the read brought (the link is shared by
    every connection: the stamp lasts only while the read is handled). A
    subclass, so an untimed connection's reads cost nothing more."""

    def buffer_updated(self, nbytes: int) -> None:
        self.link.read_at = time.monotonic_ns()
        try:
            super().buffer_updated(nbytes)
        finally:   # commands sent outside a read (the CmdSN window let them go) are stamped then
            self.link.read_at = 0


class PduWriter:
    """A connection's output: the PDUs produced during one loop iteration leave
    in one writev (header, digest, data, padding as separate buffers: read data
    is not copied), and only what the socket does not take goes through the
    transport's buffer, which also keeps the order once it holds anything.
    That buffer gets the PDUs' buffers themselves (writelines: uvloop keeps
    them, no copy), so a response whose data it holds is reported done only
    once the transport has sent past it (`drained`: after each flush and when
    the buffer drains, `resample`) or the connection is lost (`lost`, `abort`).
    Meanwhile the writer is in `holding`, the front end's writers whose
    transports hold lent slots: a lost STML link aborts them before the slots
    go back (decisions/0864), and a close aborts after CLOSE_LINGER at most.
    What that buffer holds counts in the connection's `account` as "out": it is
    sampled after every flush and whenever the buffer drains (`resample`)."""

    IOV_MAX: Final = 1024

    def __init__(self, writer: asyncio.StreamWriter, params: Any, pending: set | None = None,
                 account: Account | None = None, done: Callable[[list[int]], None] | None = None,
                 host: str = "", held: bool = False, holding: set | None = None) -> None:
        self.pending = pending if pending is not None else set()   # writers with output queued
        self.holding = holding if holding is not None else set()   # writers with `behind`
        # nothing leaves before the Login Response that ends the login (an Async
        # Message the STML sent once it took the new nexus): `release` then
        self.held = held
        self.account = account
        self.done = done            # told the tags whose responses a flush sent (link.scsi_target_done)
        self.sent_tags: list[int] = []
        # bytes given to the transport's buffer so far, and the responses whose data
        # it still holds: (where their last byte is in that count, their tags)
        self.queued = 0
        self.behind: list[tuple[int, list[int]]] = []
        self.linger: asyncio.TimerHandle | None = None   # the abort a close with output left set
        self.retired = False
        self.ended = False          # connection_lost came (or abort): the socket may be closed
        self.host = host            # the initiator's address (ERL 2 keeps failures per host)
        self.transport = writer.transport
        self.fd = writer.get_extra_info("socket").fileno()
        self.hd, self.dd = params.header_digest, params.data_digest
        self.parts: list = []
        self.size = 0               # bytes in parts
        self.scheduled = False
        self.loop = asyncio.get_running_loop()

    def __call__(self, pdu: Any, data: bytes | memoryview) -> None:
        self.encoded(pdu.encode(), data)

    def encoded(self, hdr: bytes, data: bytes | memoryview) -> None:
        """A PDU whose header is encoded already: the session packs the Data-In
        or SCSI Response that answers most commands from its fields."""
        parts = self.parts
        parts.append(hdr)
        size = len(hdr)
        if self.hd:
            parts.append(digest(hdr))
            size += DIGEST_LEN
        n = len(data)
        if n:
            parts.append(data)
            size += n
            if n & 3:   # padding(n) without its call (per PDU)
                pad = padding(n)
                parts.append(pad)
                size += len(pad)
            if self.dd:
                parts.append(digest(data, padding(n)))
                size += DIGEST_LEN
        self.size += size
        if not self.scheduled:
            self.scheduled = True
            self.pending.add(self)
            self.loop.call_soon(self.flush)

    def close(self) -> None:
        """Send what is pending (e.g. a Logout Response), then close. What the
        transport cannot send goes on leaving for CLOSE_LINGER at most: a peer
        that does not read would otherwise keep the connection, and the slots
        its transport holds, for good (a graceful close never ends then)."""
        self.flush()
        self.transport.close()
        if self.linger is None and not self.ended and self.transport.get_write_buffer_size():
            self.linger = self.loop.call_later(CLOSE_LINGER, self.abort)

    def retire(self, release: bool = True) -> None:
        """The connection is over: close, and once the transport has nothing
        left to send (or after CLOSE_LINGER, when the peer does not read: its
        output is then dropped) the connection's account closes (unless not
        `release`: ERL 2 keeps it for the tasks a TASK REASSIGN may claim)."""
        if not release:
            self.account = None
        self.retired = True
        self.close()
        if self.linger is None:   # nothing left to send, or aborted already
            self._release()

    def abort(self, report: bool = True) -> None:
        """End the connection now: nothing more leaves from the transport's
        buffer, so the responses it held are done (told to `done` unless not
        `report`: the link that lent their slots is gone). The socket is shut
        down first, as uvloop's abort closes it only a loop turn later and
        goes on sending from its buffer until then. Only while that buffer
        holds something: the transport owns its socket then, whereas one that
        sent all and closed (its protocol perhaps still the login's, which
        never sets `ended`) may have let the descriptor's number go to
        another socket (review 19)."""
        if not self.ended and self.transport.get_write_buffer_size():
            try:
                with socket.socket(fileno=os.dup(self.fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass    # (not connected any more)
        self.transport.abort()
        self.lost(report)

    def _release(self) -> None:
        account, self.account = self.account, None
        if account is not None:
            account.close()

    def resample(self) -> None:
        """The transport's buffer shrank (it drained): count what it still holds."""
        if self.account is not None:
            self.account.set(OUT, self.transport.get_write_buffer_size() + self.size)
        if self.behind:
            self.drained()

    def drained(self) -> None:
        """Report done the responses the transport has sent past."""
        sent = self.queued - self.transport.get_write_buffer_size()
        behind = self.behind
        while behind and behind[0][0] <= sent:
            tags = behind.pop(0)[1]
            if self.done is not None:
                self.done(tags)
        if not behind:
            self.holding.discard(self)

    def lost(self, report: bool = True) -> None:
        """The connection is gone: the transport holds nothing any more."""
        self.ended = True
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        behind, self.behind = self.behind, []
        self.holding.discard(self)
        if self.done is not None and report:
            for _, tags in behind:
                self.done(tags)
        if self.retired:
            self._release()

    def responded(self, tag: int) -> None:
        """A response (queued by the last calls) is reported done once it is sent."""
        if self.done is None:
            return
        self.sent_tags.append(tag)
        if not self.scheduled:
            self.scheduled = True
            self.pending.add(self)
            self.loop.call_soon(self.flush)

    def release(self) -> None:
        """The login is answered: what was kept for after it may go."""
        self.held = False
        self.flush()

    def flush(self) -> None:
        self.scheduled = False
        self.pending.discard(self)
        if self.held:
            return
        parts, self.parts = self.parts, []
        size, self.size = self.size, 0
        queued = self.queued
        try:
            if parts and not self.transport.is_closing():
                empty = False
                try:
                    empty = self._send(parts, size)
                finally:
                    if self.account is not None:
                        self.account.set(OUT, 0 if empty else self.transport.get_write_buffer_size())
        finally:
            # their data is in the kernel or dropped with a closing connection: nothing
            # refers to it any more; unless the transport's buffer took some of it
            if self.sent_tags:
                assert self.done is not None   # responded() keeps tags only with it
                tags, self.sent_tags = self.sent_tags, []
                if self.queued != queued:
                    self.behind.append((self.queued, tags))
                    self.holding.add(self)
                else:
                    self.done(tags)
            if self.behind:
                self.drained()

    def _send(self, parts: list, size: int) -> bool:
        """True when all of it went to the socket: the transport's buffer is
        empty then (no need to ask it once more, per flush)."""
        if self.transport.get_write_buffer_size() == 0:
            try:
                while parts:
                    chunk = parts[:self.IOV_MAX]
                    n = os.writev(self.fd, chunk)
                    size -= n
                    if not size:
                        return True  # all sent (the usual case): no walk over the buffers
                    parts = _advance(parts, n)
                    if n < sum(len(c) for c in chunk):
                        break  # the socket is full: the transport takes the rest
            except BlockingIOError:
                pass
            except OSError:
                self.transport.close()
                return False
        if parts:
            # the buffers as they are (uvloop keeps them: no copy); sent past them, the
            # transport's buffer has let go of them (drained)
            self.transport.writelines(parts)
            self.queued += size
        return False


def _advance(parts: list, n: int) -> list:
    """The buffers left after the first n bytes of `parts` were sent."""
    i = 0
    while i < len(parts) and n >= len(parts[i]):
        n -= len(parts[i])
        i += 1
    rest = parts[i:]
    if n and rest:
        rest[0] = memoryview(rest[0])[n:]
    return rest
