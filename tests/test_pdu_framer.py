"""The full-feature receive path: pdu.PduFramer (sans-IO: bytes in, PDUs out, big
data segments received in place) and wire.ConnectionProtocol (the buffered
protocol around it: dispatch in order, Reject on errors, link flush per read,
taking over from the login's StreamReader, back-pressure)."""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetd_tcp import pdu as P
from fetd_tcp.digest import digest, padding
from fetd_tcp.keys import ConnectionParams

PURE = settings(max_examples=300, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck))
LUN = P.int_to_lun(1)
BIG = P.PduFramer.BIG


def wire(pdu, data: bytes = b"", hd: bool = False, dd: bool = False) -> bytes:
    header = pdu.encode()
    out = header + (digest(header) if hd else b"")
    if data:
        pad = padding(len(data))
        out += data + pad + (digest(data, pad) if dd else b"")
    return out


def data_out(n: int, itt: int = 1, seed: int = 0) -> tuple[P.DataOut, bytes]:
    data = bytes((seed + i) & 0xFF for i in range(n))
    return P.DataOut(itt, 5, 0, 0, True, 1, LUN, n), data


def nop(n: int = 0, itt: int = 2) -> tuple[P.NopOut, bytes]:
    return P.NopOut(itt, P.RESERVED_TAG, 1, 1, LUN, True, n), b"N" * n


def command_with_ahs(n: int) -> tuple[P.ScsiCommand, bytes]:
    cmd = P.ScsiCommand(itt=3, lun=LUN, cdb=bytes(range(32)), expected_length=n, cmd_sn=1,
                        exp_stat_sn=1, write=True, data_length=n)
    return cmd, bytes([7]) * n


def chunked(stream: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(stream):
        n = sizes[i % len(sizes)] if sizes else len(stream)
        out.append(stream[pos:pos + n])
        pos += n
        i += 1
    return out


def receive_all(framer: P.PduFramer, chunks: list[bytes]) -> list:
    """Feed chunks through get_buffer/received, as a transport does."""
    got = []
    for chunk in chunks:
        mv = memoryview(chunk)
        while mv:
            buf = framer.get_buffer()
            assert len(buf) > 0
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            mv = mv[n:]
            framer.received(n)
            while (item := framer.next()) is not None:
                got.append(item)
    return got


# ---------------------------------------------------------------- framer

@st.composite
def pdu_streams(draw):
    kinds = st.sampled_from(["nop", "data", "cmd"])
    sizes = st.one_of(st.integers(0, 9000), st.integers(BIG - 4, BIG + 70000),
                      st.sampled_from([0, 1, 2, 3, 4, 4096, BIG, 262144]))
    items = []
    for i, (kind, n) in enumerate(draw(st.lists(st.tuples(kinds, sizes), min_size=1, max_size=8))):
        if kind == "nop":
            items.append(nop(n, itt=i))
        elif kind == "data":
            items.append(data_out(n, itt=i, seed=i))
        else:
            items.append(command_with_ahs(n))
    return items


@PURE
@given(pdu_streams(), st.booleans(), st.booleans(),
       st.lists(st.one_of(st.integers(1, 64), st.integers(1, 300000)), max_size=5))
def test_framer_returns_what_was_sent_however_split(items, hd, dd, sizes):
    stream = b"".join(wire(p, d, hd, dd) for p, d in items)
    framer = P.PduFramer(hd, dd, 262144)
    got = receive_all(framer, chunked(stream, sizes))
    assert len(got) == len(items)
    for (pdu, data), (gpdu, gdata, header) in zip(items, got):
        assert gpdu == pdu
        assert bytes(gdata) == data
        assert header == pdu.encode()[:P.BHS_LEN]
    assert framer.buffered == 0
    # and all at once, through feed
    again = list(P.PduFramer(hd, dd, 262144).feed(stream))
    assert [(p, bytes(d)) for p, d, _ in again] == [(p, d) for p, d in items]


@PURE
@given(pdu_streams(), st.booleans(), st.booleans())
def test_reading_what_wanted_says_never_reads_past_a_pdu(items, hd, dd):
    """A reader that takes framer.wanted() bytes at a time (the login phase)
    gets each PDU once its last byte is in, and never a byte of the next."""
    ends, end = [], 0
    for p, d in items:
        end += len(wire(p, d, hd, dd))
        ends.append(end)
    stream = b"".join(wire(p, d, hd, dd) for p, d in items)
    framer = P.PduFramer(hd, dd, 262144)
    pos, got = 0, []
    while len(got) < len(items):
        item = framer.next()
        if item is not None:
            assert pos == ends[len(got)]
            got.append(item)
            continue
        n = framer.wanted()
        buf = framer.get_buffer()
        assert 0 < n <= len(buf) and pos + n <= ends[len(got)]
        buf[:n] = stream[pos:pos + n]
        framer.received(n)
        pos += n
    assert [(p, bytes(d)) for p, d, _ in got] == items


def test_login_reads_no_byte_past_its_pdus():
    """The login phase frames with PduFramer, staging only headers (a data
    segment gets a buffer of its size): what follows the last Login Request
    (a command pipelined behind it) stays in the StreamReader."""
    from fetd_tcp.login import MAX_LOGIN_TEXT
    from fetd_tcp.logind import LOGIN_READ_LIMIT, LoginPhase

    isid = b"\x80" + bytes(5)
    first = P.LoginRequest(1, isid, data_length=300), bytes(range(256)) + bytes(44)
    second = P.LoginRequest(2, isid, transit=True, data_length=MAX_LOGIN_TEXT), b"k" * MAX_LOGIN_TEXT
    behind = wire(*command_with_ahs(0))

    async def main() -> None:
        reader = asyncio.StreamReader(limit=LOGIN_READ_LIMIT)
        reader.feed_data(wire(*first) + wire(*second) + behind)
        reader.feed_eof()
        phase = LoginPhase(reader, None)   # type: ignore[arg-type]   # reading only
        assert len(phase.framer.get_buffer()) < 4096
        for pdu, data in (first, second):
            got, got_data = await phase.read_pdu()
            assert got == pdu and bytes(got_data) == data
        assert await reader.read() == behind

    asyncio.run(main())


def test_big_segments_are_received_in_place_and_small_ones_copied_out():
    allocated: list[bytearray] = []

    def alloc(n: int) -> bytearray:
        allocated.append(bytearray(n))
        return allocated[-1]

    framer = P.PduFramer(False, True, 262144, alloc=alloc)
    big_pdu, big = data_out(200000, seed=3)
    small_pdu, small = data_out(4096, itt=2, seed=9)
    stream = wire(small_pdu, small, dd=True) + wire(big_pdu, big, dd=True) + wire(small_pdu, small, dd=True)
    head = len(wire(small_pdu, small, dd=True)) + P.BHS_LEN + 1000
    # first read: a small PDU, the big one's header and 1000 bytes of its data
    buf = framer.get_buffer()
    buf[:head] = stream[:head]
    framer.received(head)
    first = framer.next()
    assert isinstance(first[1], bytes) and first[1] == small
    assert framer.next() is None
    assert len(allocated) == 1 and len(allocated[0]) == 200000 + 4   # data, padding, data digest
    # the rest of the big segment goes straight into its buffer
    buf = framer.get_buffer()
    assert buf.obj is allocated[0] and len(buf) == 200000 + 4 - 1000
    rest = stream[head:head + len(buf)]
    buf[:] = rest
    framer.received(len(buf))
    pdu, data, _ = framer.next()
    assert pdu == big_pdu and isinstance(data, memoryview) and data.obj is allocated[0]
    assert data == big
    # what was handed out stays valid while the staging buffer is reused
    tail = stream[head + len(rest):]
    for item in receive_all(framer, [tail] * 40):
        pass
    assert first[1] == small and data == big


@pytest.mark.parametrize("hd", [False, True])
def test_after_a_big_segment_only_the_next_header_is_staged(hd):
    """A reader that fills whatever get_buffer offers (a socket with everything
    queued): the first big Data-Out's header arrives with some of its data,
    which is copied to its buffer; after it, reads stop at each header, so the
    next Data-Outs' data all lands in their own buffers, and a small PDU after
    them is read as it comes (then reads are whole again)."""
    allocated: list[bytearray] = []

    def alloc(n: int) -> bytearray:
        allocated.append(bytearray(n))
        return allocated[-1]

    framer = P.PduFramer(hd, False, 262144, alloc=alloc)
    bursts = [data_out(262144, itt=i, seed=i) for i in range(3)]
    small = [nop(100, itt=7), nop(0, itt=8)]
    stream = b"".join(wire(p, d, hd) for p, d in bursts + small)
    staged, got, pos = [], [], 0
    while pos < len(stream):
        buf = framer.get_buffer()
        n = min(len(buf), len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        framer.received(n)
        if buf.obj is framer._buf.obj:
            staged.append(n)
        pos += n
        while (item := framer.next()) is not None:
            got.append(item)
    assert [(p, bytes(d)) for p, d, _ in got] == bursts + small
    header = P.BHS_LEN + (4 if hd else 0)
    assert staged[0] > header                      # the first: as much as the staging buffer takes
    assert staged[1:3] == [header, header]         # then each Data-Out's header alone
    assert staged[3:-1] == [header, 100]           # the header of the small PDU after them, its data
    assert staged[-1] == len(wire(*small[1], hd))  # and reads are whole again


def test_data_segment_over_the_limit():
    pdu, data = data_out(8196)
    framer = P.PduFramer(False, False, 8192)
    with pytest.raises(P.PDUError, match="exceeds 8192"):
        list(framer.feed(wire(pdu, data)[:P.BHS_LEN]))   # known from the BHS alone


@pytest.mark.parametrize("size", [100, BIG + 100])
def test_digest_errors_come_after_the_pdus_before_them(size):
    good = wire(*nop(8), hd=True, dd=True)
    pdu, data = data_out(size)
    bad_data = bytearray(wire(pdu, data, hd=True, dd=True))
    bad_data[-1] ^= 1
    got = []
    with pytest.raises(P.PDUError) as e:
        for item in P.PduFramer(True, True, 262144).feed(good + bad_data):
            got.append(item)
    assert e.value.reject_reason == P.REJECT_DATA_DIGEST_ERROR and len(got) == 1
    bad_header = bytearray(wire(pdu, data, hd=True, dd=True))
    bad_header[P.BHS_LEN] ^= 1
    got = []
    with pytest.raises(P.PDUError, match="header digest"):
        for item in P.PduFramer(True, True, 262144).feed(good + bad_header):
            got.append(item)
    assert len(got) == 1


def test_undecodable_pdu_raises_pdu_error():
    header = bytearray(nop()[0].encode())
    header[0] = 0x1C    # a reserved opcode
    with pytest.raises(P.PDUError) as e:
        list(P.PduFramer(False, False, 8192).feed(bytes(header)))
    assert e.value.reject_reason == P.REJECT_COMMAND_NOT_SUPPORTED


def test_byte_at_a_time():
    items = [nop(5), data_out(BIG + 3), command_with_ahs(10)]
    stream = b"".join(wire(p, d, True, True) for p, d in items)
    got = receive_all(P.PduFramer(True, True, 262144), [stream[i:i + 1] for i in range(len(stream))])
    assert [(p, bytes(d)) for p, d, _ in got] == items


# ---------------------------------------------------------------- protocol

class FakeConn:
    """What ConnectionProtocol uses of session.Connection."""

    def __init__(self, hd: bool = False, dd: bool = False, refuse: type | None = None) -> None:
        self.params = ConnectionParams(hd, dd, 262144, 8192)
        self.closing = False
        self.idle = True
        self.got: list = []
        self.rejects: list = []
        self.refuse = refuse
        self.out = self.send = lambda pdu, data: None
        self.erl = 0           # ErrorRecoveryLevel 0: a digest error ends the connection
        self.bad_headers = 0

    def receive(self, pdu, data):
        self.got.append((pdu, bytes(data)))
        if self.refuse is not None and isinstance(pdu, self.refuse):
            raise P.PDUError("refused", P.REJECT_PROTOCOL_ERROR)
        if isinstance(pdu, P.LogoutRequest):
            self.closing = True

    def reject(self, reason, header):
        self.rejects.append((reason, bytes(header)))


class CountingLink:
    def __init__(self) -> None:
        self.flushes = 0
        self.holds = 0

    def hold(self) -> None:
        assert self.holds == self.flushes   # one hold per flush, before it
        self.holds += 1

    def flush(self) -> None:
        self.flushes += 1


async def _pair(conn, link, before: bytes = b""):
    """A ConnectionProtocol on one end of a socket pair, after a StreamReader
    that already holds `before`."""
    from fetd_tcp.wire import ConnectionProtocol
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    if before:
        theirs.send(before)
        while len(reader._buffer) < len(before):
            await asyncio.sleep(0.01)
    proto = ConnectionProtocol(conn, link, writer.transport)
    proto.take_over(reader)
    return proto, writer, theirs


async def _settle(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


def test_protocol_handles_bytes_buffered_before_it_and_then_the_socket():
    async def main():
        conn, link = FakeConn(), CountingLink()
        first = wire(*nop(3, itt=1)) + wire(*data_out(BIG + 10, itt=2))
        proto, writer, peer = await _pair(conn, link, first + wire(*nop(1, itt=3))[:20])
        assert [p.itt for p, _ in conn.got] == [1, 2] and not conn.idle and link.flushes == link.holds == 1
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(peer, wire(*nop(1, itt=3))[20:] + wire(*data_out(262144 - 6, itt=4))[:-7])
        await _settle(lambda: len(conn.got) == 3)
        await loop.sock_sendall(peer, wire(*data_out(262144 - 6, itt=4))[-7:])
        await _settle(lambda: len(conn.got) == 4)
        assert conn.got[3] == data_out(262144 - 6, itt=4) and not proto.done.done()
        peer.close()
        await asyncio.wait_for(proto.done, 5)
        writer.close()
    asyncio.run(main())


def test_protocol_rejects_refused_pdus_and_goes_on_and_ends_on_logout():
    async def main():
        conn, link = FakeConn(refuse=P.NopOut), CountingLink()
        logout = P.LogoutRequest(9, 0, 0, 2, 1)
        stream = wire(*nop(0, itt=1)) + wire(*data_out(10)) + wire(logout) + wire(*nop(0, itt=5))
        proto, writer, peer = await _pair(conn, link)
        await asyncio.get_running_loop().sock_sendall(peer, stream)
        await asyncio.wait_for(proto.done, 5)
        assert [type(p) for p, _ in conn.got] == [P.NopOut, P.DataOut, P.LogoutRequest]  # not past Logout
        assert conn.rejects == [(P.REJECT_PROTOCOL_ERROR, nop(0, itt=1)[0].encode())]
        writer.close()
        peer.close()
    asyncio.run(main())


def test_protocol_data_digest_error_rejects_then_ends_with_the_error():
    async def main():
        conn, link = FakeConn(hd=True, dd=True), CountingLink()
        bad = bytearray(wire(*data_out(100), hd=True, dd=True))
        bad[-1] ^= 1
        proto, writer, peer = await _pair(conn, link)
        await asyncio.get_running_loop().sock_sendall(peer, wire(*nop(2), True, True) + bytes(bad))
        with pytest.raises(P.PDUError, match="data digest"):
            await asyncio.wait_for(proto.done, 5)
        # the Reject carries the damaged PDU's header (sound: its own digest matched)
        assert len(conn.got) == 1 and conn.rejects == [(P.REJECT_DATA_DIGEST_ERROR, bytes(bad[:48]))]
        assert writer.transport.is_closing()
        peer.close()
    asyncio.run(main())


def test_protocol_stops_reading_while_output_backs_up():
    async def main():
        conn, link = FakeConn(), CountingLink()
        proto, writer, peer = await _pair(conn, link)
        loop = asyncio.get_running_loop()
        writer.transport.write(bytes(5 << 20))        # the peer reads nothing: output backs up
        assert proto.write_paused
        await loop.sock_sendall(peer, wire(*nop(0, itt=1)) + wire(*nop(0, itt=2)))
        await _settle(lambda: proto.read_paused)
        assert [p.itt for p, _ in conn.got] == [1]    # the second waits for the output to drain
        while writer.transport.get_write_buffer_size():
            try:
                peer.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await _settle(lambda: len(conn.got) == 2)
        assert not proto.read_paused
        await loop.sock_sendall(peer, wire(*nop(0, itt=3)))
        await _settle(lambda: len(conn.got) == 3)
        writer.close()
        peer.close()
    asyncio.run(main())


# ---------------------------------------------------------------- live target

def test_command_pipelined_behind_the_last_login_request():
    """An initiator may send its first commands right behind the Login Request
    that ends login: the bytes the login's reader holds must not be lost."""
    from support.rawiscsi import RawInitiator
    from support.target import IQN, Target

    with Target("--lun", "ram:16MiB") as t:
        host, _, port = t.portal.rpartition(":")
        ini = RawInitiator(host.strip("[]"), int(port))
        pairs = [("InitiatorName", ini.initiator), ("SessionType", "Normal"), ("AuthMethod", "None"),
                 ("TargetName", IQN)]
        text = P.encode_text(pairs)
        login = P.LoginRequest(1, ini.isid, 0, 0, 1, 0, csg=P.STAGE_SECURITY,
                               nsg=P.STAGE_FULL_FEATURE, transit=True, data_length=len(text))
        block = bytes(range(256)) * 256                 # 64 KiB: a big segment
        write = P.ScsiCommand(2, P.int_to_lun(0), struct.pack(">BBQIBB", 0x8A, 0, 8, 128, 0, 0),
                              len(block), 1, 1, write=True, data_length=len(block))
        read = P.ScsiCommand(3, P.int_to_lun(0), struct.pack(">BBQIBB", 0x88, 0, 8, 128, 0, 0),
                             len(block), 2, 1, read=True, attr=P.ATTR_ORDERED)
        ini.sock.sendall(wire(login, text) + wire(write, block) + wire(read))
        resp, _ = ini.recv()
        assert isinstance(resp, P.LoginResponse) and resp.status_class == 0
        assert resp.nsg == P.STAGE_FULL_FEATURE
        got = bytearray()
        while True:
            pdu, seg = ini.recv()
            if isinstance(pdu, P.ScsiResponse):
                assert pdu.itt == 2 and pdu.status == 0
            elif isinstance(pdu, P.DataIn):
                got += seg
                if pdu.status is not None:
                    break
        assert bytes(got) == block
        ini.close()
