"""The per-command response path, sans-IO: Data-In splitting with phase-collapsed
status, the SCSI Response after sense, and PduWriter's send of a batch (whole or
partly taken by the socket)."""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from fetd_tcp import pdu as P
from fetd_tcp import wire
from fetd_tcp.digest import digest, padding
from fetd_tcp.keys import ConnectionParams, SessionParams
from fetd_tcp.wire import PduWriter
from fetd_tcp.session import Connection, Session, Tags

from support import fuzzgen as G

READ16 = bytes([0x88]) + bytes(15)


def _conn(seg_max: int, burst: int) -> tuple[Connection, list, G.FakeLink]:
    out: list = []
    link = G.FakeLink()
    session = Session(1, b"\x80" + bytes(5), G.INAME, G.TNAME, 1,
                      SessionParams(max_burst_length=burst), 1, 1, 16)
    conn = Connection(session, 0, ConnectionParams(max_send_data_segment_length=seg_max), 7,
                      lambda p, d: out.append((p, bytes(d))), link, Tags(), lambda: None,
                      lambda c, pairs: [])
    session.connections[0] = conn
    return conn, out, link


def _read(conn: Connection, link: G.FakeLink, itt: int, length: int):
    lun = P.int_to_lun(3)
    conn.receive(P.ScsiCommand(itt, lun, READ16, length, conn.session.exp_cmd_sn, 0, read=True), b"")
    name, a, _ = link.calls[-1]
    assert name == "rx_cmnd" and a[2] == 3 and a[5] == 2   # LUN 3, DataDir READ
    return conn.tags.tasks.pop(a[0])


def test_data_in_split_at_segment_and_burst_with_collapsed_status():
    conn, out, link = _conn(seg_max=3000, burst=8192)
    task = _read(conn, link, 5, 24000)
    data = bytes(range(256)) * 79                     # 20224 bytes: 3776 short of 24000
    conn.xmit_response(task, 0, None, 3776, memoryview(data))
    assert [type(p) for p, _ in out] == [P.DataIn] * 8
    assert [(p.buffer_offset, p.data_length, p.final) for p, _ in out] == [
        (0, 3000, False), (3000, 3000, False), (6000, 2192, True),
        (8192, 3000, False), (11192, 3000, False), (14192, 2192, True),
        (16384, 3000, False), (19384, 840, True)]
    assert b"".join(d for _, d in out) == data
    assert [p.data_sn for p, _ in out] == list(range(8))
    assert all(p.itt == 5 and p.lun == P.int_to_lun(3) and p.ttt == P.RESERVED_TAG for p, _ in out)
    assert all(p.status is None and p.stat_sn == 0 and p.residual_count == 0 for p, _ in out[:-1])
    last = out[-1][0]
    assert (last.status, last.stat_sn, last.residual_count, last.underflow, last.overflow) == \
        (0, 7, 3776, True, False)
    assert conn.stat_sn == 8 and (last.exp_cmd_sn, last.max_cmd_sn) == (2, 17)
    assert P.decode_pdu(last.encode()) == last


class _Packed:
    """An output that takes headers packed already (as PduWriter.encoded)."""

    def __init__(self) -> None:
        self.out: list = []

    def __call__(self, pdu: object, data: bytes) -> None:
        raise AssertionError("a PDU object on the packed path")

    def encoded(self, hdr: bytes, data: bytes) -> None:
        self.out.append((P.decode_pdu(hdr), bytes(data)))


@pytest.mark.parametrize("length, resid", [(24000, 3776), (1 << 20, 0)])
def test_a_big_reads_data_in_headers_packed_from_fields_are_the_pdus(length, resid):
    """Behind a writer that takes packed headers, every Data-In of a big read
    is packed from its fields (no PDU object per PDU): the same PDUs, field
    for field, as the PDU path sends (segments, bursts, status in the last)."""
    for seg_max, burst in ((3000, 8192), (262144, 262144)):
        conn, out, link = _conn(seg_max=seg_max, burst=burst)
        task = _read(conn, link, 5, length)
        data = (bytes(range(256)) * (length // 256 + 1))[:length - resid]
        conn.xmit_response(task, 0, None, resid, memoryview(data))
        packed = _Packed()
        conn2, _, plink = _conn(seg_max=seg_max, burst=burst)
        conn2.out = conn2.send = packed
        conn2.encoded = packed.encoded
        task2 = _read(conn2, plink, 5, length)
        conn2.xmit_response(task2, 0, None, resid, memoryview(data))
        assert len(out) > 1 or length <= seg_max
        assert packed.out == out
        assert conn2.stat_sn == conn.stat_sn and task2.data_sn == task.data_sn


def test_sense_goes_in_a_scsi_response_after_the_data():
    conn, out, link = _conn(seg_max=8192, burst=262144)
    task = _read(conn, link, 9, 4096)
    sense = bytes([0x70, 0, 3]) + bytes(15)
    conn.xmit_response(task, 2, sense, -512, memoryview(bytes(4096)))
    (d, _), (r, seg) = out
    assert isinstance(d, P.DataIn) and d.final and d.status is None and d.data_length == 4096
    assert isinstance(r, P.ScsiResponse)
    assert (r.itt, r.status, r.stat_sn, r.exp_data_sn, r.residual_count, r.overflow, r.underflow) == \
        (9, 2, 7, 1, 512, True, False)
    assert P.decode_sense_segment(seg) == sense and r.data_length == len(seg)
    assert P.decode_pdu(r.encode()) == r


class _Transport:
    """What PduWriter uses of an asyncio transport: a buffer it may write into."""

    def __init__(self) -> None:
        self.buffered = bytearray()

    def get_write_buffer_size(self) -> int:
        return len(self.buffered)

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.buffered += data

    def writelines(self, parts: list) -> None:
        self.handed = list(parts)
        self.buffered += b"".join(parts)


class _Writer:
    def __init__(self, sock: socket.socket) -> None:
        self.transport, self.sock = _Transport(), sock

    def get_extra_info(self, name: str) -> socket.socket:
        return self.sock


def _send(pdus: list[tuple[object, bytes]], sndbuf: int) -> tuple[bytes, int]:
    """(bytes on the wire, of which through the transport's buffer) for ``pdus``
    sent by one flush, with data digests."""
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        a.setblocking(False)
        b.setblocking(False)
        writer = _Writer(a)

        async def run() -> None:
            w = PduWriter(writer, ConnectionParams(data_digest=True))
            for pdu, data in pdus:
                w(pdu, memoryview(data))
            w.flush()
        asyncio.run(run())
        got = bytearray()
        try:
            while chunk := b.recv(1 << 20):
                got += chunk
        except BlockingIOError:
            pass
        return bytes(got + writer.transport.buffered), len(writer.transport.buffered)
    finally:
        a.close()
        b.close()


def _wire(pdus: list[tuple[object, bytes]]) -> bytes:
    return b"".join(pdu.encode() + data + padding(len(data)) + digest(data, padding(len(data)))
                    for pdu, data in pdus)


def test_pdu_writer_sends_a_batch_whole_or_partly_through_the_transport():
    pdus = [(P.DataIn(i, 0, 0, 1, 2, True, 0, i, data_length=n), bytes([i]) * n)
            for i, n in enumerate((4096, 1, 70000, 3, 200000))]
    assert _send(pdus[:2], 1 << 20) == (_wire(pdus[:2]), 0)     # the socket takes it all
    wire, buffered = _send(pdus, 4096)                           # part of it; the transport the rest
    assert wire == _wire(pdus) and 0 < buffered < len(wire)


def _front_end_writing(sock: socket.socket, done: list[list[int]]) -> tuple:
    """An IscsiFrontEnd whose connection writes to `sock` and whose link's
    scsi_target_done calls land in `done`: (front end, writer, connection, link)."""
    from fetd_tcp.server import IscsiFrontEnd
    fe = IscsiFrontEnd("ipc:///nonexistent/fetd", [])
    fe.link.scsi_target_done = done.append   # type: ignore[method-assign]
    writer = PduWriter(_Writer(sock), ConnectionParams(), done=fe.link.scsi_target_done)
    conn, _, link = _conn(seg_max=8192, burst=262144)
    conn.out = conn.send = writer
    conn.tags = fe.tags
    return fe, writer, conn, link


def test_fetd_tcp_reports_a_response_done_only_once_its_writer_sent_it():
    """The read data of a response may be the STML's shared memory, lent until
    the front end says scsi_target_done. fetd_tcp queues the Data-In PDUs
    (which refer to that memory) in the connection's writer and says done for
    the tag only once the writer has sent them (or given them to the
    transport's buffer, which copies); a response for a task it no longer
    knows is done at once."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    done: list[list[int]] = []

    async def run() -> None:
        fe, writer, conn, link = _front_end_writing(a, done)
        task = _read(conn, link, 5, 4096)
        fe.tags.tasks[task.tag] = task
        fe.link.lent[task.tag] = _Lease()     # its data is the carrier's (a shared slot)
        data = memoryview(bytes(range(256)) * 16)
        fe.xmit_response(task.tag, 0, None, 0, [data])
        assert done == [] and writer.parts, "done before the PDUs left"
        await asyncio.sleep(0)                 # the writer's flush
        assert done == [[task.tag]] and not writer.parts
        fe.xmit_response(999, 0, None, 0, [data])
        assert done == [[task.tag], [999]]
    asyncio.run(run())
    got = b.recv(1 << 16)
    a.close()
    b.close()
    assert bytes(range(256)) * 16 in got


class _Lease:
    def release(self) -> None:
        pass


def test_fetd_tcp_reports_done_only_what_the_link_lent_or_times():
    """Untimed, scsi_target_done only gives back what the carrier lent (its
    message is not sent: decisions/0603): a response whose data the link did
    not lend (small reads come as bytes) is not reported, so the writer keeps
    no tag for it and makes no call per command (decisions/0811). While the
    STML times commands, every response is reported, lent or not."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    done: list[list[int]] = []

    async def run() -> None:
        fe, writer, conn, link = _front_end_writing(a, done)
        data = [bytes(4096)]
        plain = _read(conn, link, 5, 4096)
        fe.tags.tasks[plain.tag] = plain
        fe.xmit_response(plain.tag, 0, None, 0, data)
        assert writer.parts and writer.sent_tags == []
        await asyncio.sleep(0)                 # the writer's flush
        assert done == [] and not writer.parts
        fe.link.timing = True                  # as _set_timing(True) sets it
        timed = _read(conn, link, 6, 4096)
        fe.tags.tasks[timed.tag] = timed
        fe.xmit_response(timed.tag, 0, None, 0, data)
        await asyncio.sleep(0)
        assert done == [[timed.tag]]
    asyncio.run(run())
    got = b.recv(1 << 16)
    a.close()
    b.close()
    assert got.count(bytes(4096)) == 2


def test_responses_the_stream_delivers_leave_with_messages_handled_and_no_callback():
    """A read of the STML's stream delivers several responses: their writer
    is flushed by messages_handled after the last (one writev for them all),
    and schedules no flush of its own, which would find nothing left."""
    from stml.api import StreamChannel
    from stml.api.messages import pack_xmit_response

    scheduled: list = []

    class CountingLoop(asyncio.SelectorEventLoop):
        def call_soon(self, callback, *args, context=None):   # type: ignore[override]
            scheduled.append(callback)
            return super().call_soon(callback, *args, context=context)

    a, b = socket.socketpair()
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b, y):
        s.setblocking(False)
    done: list[list[int]] = []

    async def run() -> None:
        fe, writer, conn, link = _front_end_writing(a, done)
        fe.link._channel = StreamChannel(x, fe.link._receiver, lambda: None,
                                         on_dispatched=fe.messages_handled)
        tags = []
        for itt in (5, 6, 7):
            task = _read(conn, link, itt, 4096)
            fe.tags.tasks[task.tag] = task
            tags.append(task.tag)
        message = b""
        for tag in tags:
            header = pack_xmit_response(tag, 0, 0)
            message += struct.pack("<3I", 2, len(header), 4096) + header + bytes([tag]) * 4096
        y.send(message)
        got = b""
        for _ in range(200):
            await asyncio.sleep(0.005)
            try:
                got += b.recv(1 << 20)
            except BlockingIOError:
                pass
            if len(got) >= 3 * (48 + 4096):
                break
        assert [got[48 + i * 4144] for i in range(3)] == tags and not fe.tags.tasks
        assert not writer.parts and not writer.scheduled
        assert not [c for c in scheduled if getattr(c, "__self__", None) is writer]
        fe.link._channel.close()

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        runner.run(run())
    for s in (a, b, y):
        s.close()


class _BrokenTransport(_Transport):
    """A transport whose every use fails (a writer's flush then raises)."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = 0

    def get_write_buffer_size(self) -> int:
        raise RuntimeError("transport broken")

    def abort(self) -> None:
        self.aborted += 1


def test_a_writer_whose_flush_fails_is_closed_and_the_others_still_leave(caplog):
    """messages_handled flushes every writer that waited for it: one whose
    flush raises is closed (its transport aborted, one line), and the other
    writers of that read still send their PDUs now, not at the next read of
    the STML (0705). Two broken writers among good ones: whichever the set
    gives first, the rest are flushed."""
    from fetd_tcp.server import IscsiFrontEnd

    pairs = [socket.socketpair() for _ in range(6)]
    for a, b in pairs:
        a.setblocking(False)
        b.setblocking(False)
    broken: list[_BrokenTransport] = []

    async def run() -> None:
        fe = IscsiFrontEnd("ipc:///nonexistent/fetd", [])
        writers = []
        for i, (a, _) in enumerate(pairs):
            w = _Writer(a)
            if i in (1, 4):
                w.transport = _BrokenTransport()
                broken.append(w.transport)
            writer = PduWriter(w, ConnectionParams(), fe.pending_output, host=f"192.0.2.{i}")
            writer.scheduled = True          # as xmit_response leaves it while the link delivers
            fe.pending_output.add(writer)
            writer(P.NopIn(0x10 + i, P.RESERVED_TAG, 0, 1, 1), b"")
            writers.append(writer)
        fe.messages_handled()
        assert not fe.pending_output and all(not w.parts and not w.scheduled for w in writers)

    asyncio.run(run())
    got = []
    for i, (a, b) in enumerate(pairs):
        try:
            got.append(b.recv(1 << 16))
        except BlockingIOError:
            got.append(b"")
        a.close()
        b.close()
    assert [len(x) for x in got] == [0 if i in (1, 4) else 48 for i in range(6)]
    assert [t.aborted for t in broken] == [1, 1]
    assert sum("sending its output failed (RuntimeError: transport broken): closing it" in r.getMessage()
               for r in caplog.records) == 2


def test_the_rest_a_full_socket_leaves_is_handed_over_uncopied():
    """What the socket does not take of a flush goes to the transport as the
    PDUs' own buffers (uvloop keeps them, decisions/0863): the read data as
    views of its slot, not one joined copy of it."""
    a, b = socket.socketpair()
    slot = bytearray(bytes(range(256)) * 4096)            # 1 MiB, as a shared slot would hold
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        writer = _Writer(a)

        async def run() -> None:
            w = PduWriter(writer, ConnectionParams())
            for i in range(4):
                w(P.DataIn(1, i, i << 18, 1, 2, i == 3, data_length=1 << 18),
                  memoryview(slot)[i << 18:(i + 1) << 18])
            w.flush()
            assert w.queued == len(writer.transport.buffered) > 0
        asyncio.run(run())
        handed = writer.transport.handed
        data = [x for x in handed if len(x) > P.BHS_LEN]
        assert data and all(type(x) is memoryview and x.obj is slot for x in data)
        assert sum(map(len, data)) > (3 << 18)
    finally:
        a.close()
        b.close()


def _loops() -> list:
    loops = [asyncio.new_event_loop]
    try:
        import uvloop   # what `scsi-target run` uses when installed (scsi_runtime.loop)
        loops.append(uvloop.new_event_loop)
    except ImportError:
        pass
    return loops


def _run_on(new_loop, coro, *socks: socket.socket) -> None:
    """Run `coro` on a loop of its own, then close the loop and the sockets."""
    loop = new_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()
        for s in socks:
            s.close()


def _unix_pair() -> tuple[socket.socket, socket.socket]:
    """A connection whose socket takes little of a 1 MiB read: the rest waits in the transport."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    b.setblocking(False)
    return a, b


async def _real_connection(a: socket.socket, done: list[list[int]]) -> tuple:
    """A front end's connection on a real transport of `a`, its input taken
    over by a ConnectionProtocol: (front end, writer, connection, link, protocol)."""
    from fetd_tcp.server import IscsiFrontEnd
    from fetd_tcp.wire import ConnectionProtocol
    fe = IscsiFrontEnd("ipc:///nonexistent/fetd", [])
    fe.link.scsi_target_done = done.append   # type: ignore[method-assign]
    reader, stream = await asyncio.open_connection(sock=a)
    writer = PduWriter(stream, ConnectionParams(), fe.pending_output, done=fe.link.scsi_target_done,
                       holding=fe.holding)
    conn, _, link = _conn(seg_max=262144, burst=262144)
    conn.out = conn.send = writer
    conn.tags = fe.tags
    proto = ConnectionProtocol(conn, fe.link, stream.transport)
    proto.take_over(reader)
    proto.stream = stream    # type: ignore[attr-defined]   # (a StreamWriter collected closes its transport)
    return fe, writer, conn, link, proto


def _big_read(fe, conn, link, itt: int, slot: bytearray) -> int:
    task = _read(conn, link, itt, len(slot))
    fe.tags.tasks[task.tag] = task
    fe.link.lent[task.tag] = _Lease()     # its data is a shared slot, lent until done
    fe.xmit_response(task.tag, 0, None, 0, [memoryview(slot)])
    return task.tag


@pytest.mark.parametrize("new_loop", _loops())
def test_a_read_the_socket_only_partly_takes_is_done_once_the_transport_sent_it(new_loop):
    """A 1 MiB read whose Data-In the socket takes only part of: the rest
    waits in the transport's buffer as views of the slot, so the slot is not
    reported done (it would go back to the STML) until the transport has sent
    past it; the initiator then reads the whole data back, status in the last
    Data-In."""
    a, b = _unix_pair()
    slot = bytearray(bytes(range(251)) * 4178)[:1 << 20]
    done: list[list[int]] = []
    got = bytearray()

    async def run() -> None:
        fe, writer, conn, link, proto = await _real_connection(a, done)
        tag = _big_read(fe, conn, link, 5, slot)
        await asyncio.sleep(0)                 # the writer's flush
        assert writer.transport.get_write_buffer_size() > 0 and done == []
        for _ in range(2000):
            try:
                got.extend(b.recv(1 << 16))
            except BlockingIOError:
                await asyncio.sleep(0.001)
            if len(got) == 4 * P.BHS_LEN + len(slot):
                break
            assert done == [] or writer.transport.get_write_buffer_size() == 0
        await asyncio.sleep(0.01)              # the transport's buffer empties: resume_writing
        assert done == [[tag]] and not writer.behind
        writer.transport.close()

    _run_on(new_loop, run(), a, b)
    pdus = [P.decode_pdu(bytes(got[i * (P.BHS_LEN + (1 << 18)):][:P.BHS_LEN])) for i in range(4)]
    assert [(p.buffer_offset, p.data_length, p.final, p.status) for p in pdus] == [
        (0, 1 << 18, True, None), (1 << 18, 1 << 18, True, None), (2 << 18, 1 << 18, True, None),
        (3 << 18, 1 << 18, True, 0)]
    assert b"".join(got[i * (P.BHS_LEN + (1 << 18)) + P.BHS_LEN:][:1 << 18] for i in range(4)) == slot


class _ReusedLease:
    """A slot the STML fills with another command's data the moment it is given back."""

    def __init__(self, slot: bytearray) -> None:
        self.slot = slot

    def release(self) -> None:
        self.slot[:] = b"\xee" * len(self.slot)


@pytest.mark.parametrize("new_loop", _loops())
def test_a_lost_link_never_lets_a_slot_it_gave_back_reach_the_initiator(new_loop):
    """The STML link is lost while a 1 MiB read's rest waits in the transport
    as views of its slot. The lease drop gives the slot back, and the STML may
    then read another command's data into it (here: at once). The initiator
    gets a prefix of the read's own data and then the connection's end, never
    a byte of the other data (decisions/0864)."""
    a, b = _unix_pair()
    slot = bytearray(bytes(range(251)) * 4178)[:1 << 20]
    own = bytes(slot)
    whole = 4 * P.BHS_LEN + len(slot)
    done: list[list[int]] = []
    got = bytearray()

    async def run() -> None:
        fe, writer, conn, link, proto = await _real_connection(a, done)
        task = _read(conn, link, 5, len(slot))
        fe.tags.tasks[task.tag] = task
        fe.link.lent[task.tag] = _ReusedLease(slot)   # type: ignore[assignment]
        fe.xmit_response(task.tag, 0, None, 0, [memoryview(slot)])
        await asyncio.sleep(0)                 # the writer's flush
        assert writer.transport.get_write_buffer_size() > 0 and writer.behind
        fe.link._lost()                        # the lease drop, then link_lost
        assert slot == b"\xee" * len(slot)     # given back, and reused
        for _ in range(5000):
            try:
                chunk = b.recv(1 << 16)
            except BlockingIOError:
                if proto.done.done():
                    break                      # aborted, and all the socket had is read
                await asyncio.sleep(0.001)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got.extend(chunk)
            if len(got) == whole:
                break
        segment = P.BHS_LEN + (1 << 18)
        data = b"".join(got[i * segment + P.BHS_LEN:(i + 1) * segment] for i in range(4))
        assert data and data == own[:len(data)]
        assert len(got) < whole                # a prefix: the rest was dropped with the abort
        await asyncio.wait([proto.done], timeout=5)   # connection_lost
        assert proto.done.done() and not writer.behind and not fe.holding
        assert done == []                      # nothing told to the STML that is gone

    _run_on(new_loop, run(), a, b)


@pytest.mark.parametrize("new_loop", _loops())
@pytest.mark.parametrize("end", ["reset", "close"])
def test_a_read_held_in_the_transport_is_done_when_the_connection_ends(new_loop, end, monkeypatch):
    """The initiator never reads: the read's rest stays in the transport's
    buffer as views of the slot, not done. The connection is reset, or closed
    (gracefully: a Logout, an unanswered NOP-In, a lost link), which cannot
    finish, so after CLOSE_LINGER it ends in an abort (decisions/0864); the
    slot is reported done then, once, with nothing left behind."""
    monkeypatch.setattr(wire, "CLOSE_LINGER", 0.05)
    a, b = _unix_pair()
    done: list[list[int]] = []

    async def run() -> None:
        fe, writer, conn, link, proto = await _real_connection(a, done)
        tag = _big_read(fe, conn, link, 5, bytearray(1 << 20))
        await asyncio.sleep(0.01)
        assert writer.transport.get_write_buffer_size() > 0 and done == [] and writer in fe.holding
        if end == "reset":
            writer.transport.abort()
        else:
            writer.close()                     # what Connection.close does
            await asyncio.sleep(0.01)
            assert done == [] and not proto.done.done()   # still lingering
        for _ in range(200):
            if proto.done.done():
                break
            await asyncio.sleep(0.01)
        assert done == [[tag]] and not writer.behind and not fe.holding and proto.done.done()
        assert writer.linger is None

    _run_on(new_loop, run(), a, b)


@pytest.mark.parametrize("new_loop", _loops())
def test_an_initiator_that_sends_but_never_reads_lets_go_of_the_slots_it_holds(new_loop, monkeypatch):
    """Review 19: the pinger pinged only connections that sent nothing, so an
    initiator sending a NOP-Out every interval but reading nothing kept the
    read's rest, views of the STML's slot, in its transport for good. A
    connection whose transport holds slots is pinged whatever it sends; its
    ping goes unanswered, it is closed, the close ends in an abort, and the
    slot is reported done once."""
    from fetd_tcp import server as S
    monkeypatch.setattr(S, "NOP_INTERVAL", 0.05)
    monkeypatch.setattr(wire, "CLOSE_LINGER", 0.05)
    a, b = _unix_pair()
    done: list[list[int]] = []

    async def run() -> None:
        fe, writer, conn, link, proto = await _real_connection(a, done)
        conn.close = writer.close   # type: ignore[method-assign]   # as the front end wires it
        pinger = asyncio.ensure_future(fe._pinger(conn))
        try:
            tag = _big_read(fe, conn, link, 5, bytearray(1 << 20))
            for _ in range(200):   # NOP intervals (a guard against a hang, not a timing)
                if proto.done.done():
                    break
                await asyncio.sleep(0.05)
                try:
                    b.send(P.NopOut(0xFFFFFFFF, cmd_sn=conn.session.exp_cmd_sn, immediate=True).encode())
                except OSError:   # (aborted: the end of the connection is asserted below)
                    pass
            assert done == [[tag]] and not writer.behind and not fe.holding and proto.done.done()
        finally:
            pinger.cancel()
    _run_on(new_loop, run(), a, b)


@pytest.mark.parametrize("new_loop", _loops())
def test_an_abort_after_the_transport_closed_leaves_the_numbers_next_socket_alone(new_loop):
    """Review 19: the abort shut down a dup of the descriptor number it noted
    at the start, even after the transport had sent all and closed it (with
    the login's protocol, `ended` is never set), so another socket given that
    number since (the STML's link, another initiator) was shut down. It shuts
    down only while the transport's buffer holds something (it owns its socket
    then)."""
    import os
    a, b = socket.socketpair()
    c, d = socket.socketpair()

    async def run() -> None:
        _, stream = await asyncio.open_connection(sock=a)
        writer = PduWriter(stream, ConnectionParams())
        fd = writer.fd
        stream.close()
        for _ in range(200):   # the transport closes its socket (a guard, not a timing)
            await asyncio.sleep(0.005)
            try:
                os.fstat(fd)
            except OSError:
                break
        os.dup2(c.fileno(), fd)   # the number goes to another socket
        try:
            writer.abort(report=False)
            os.write(fd, b"still mine")
            assert d.recv(64) == b"still mine"
        finally:
            os.close(fd)
    _run_on(new_loop, run(), a, b, c, d)
