"""fetd_vhost's sans-I/O cores on their own: vhost-user framing and the
session state machine, split virtqueues over a memfd (loops, indirect
tables, event index arithmetic, what a chain costs to walk), and the
virtio-scsi device against a recording port (no STML, no process)."""
from __future__ import annotations

import os
import re
import struct
from typing import Callable, Sequence

import pytest

from fetd_vhost import virtqueue as V
from fetd_vhost.memory import BadAddress
from fetd_vhost.protocol import (F_NEED_REPLY, Feature, Framer, Message, ProtocolError, Req,
                                 Session, bits, encode)
from fetd_vhost.scsi import RESP_SIZE, S, VirtioScsiDevice, cdb_length, decode_lun, encode_lun
from stml.api import SharedRegion, Tmf
from support.vhost_master import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, REQ, DriverQueue, GuestRam,
                                  lun_field, write10)
from support.vhost_ring import served_ring


# ---------------------------------------------------------------- framing

def test_framer_cuts_messages_and_keeps_descriptors_with_theirs():
    f = Framer()
    wire = encode(Req.SET_VRING_KICK, struct.pack("<Q", 2), reply=False)
    fd = os.eventfd(0)
    assert f.want() == 12
    assert f.feed(wire[:5], [fd]) is None and f.want() == 7
    assert f.feed(wire[5:12]) is None and f.want() == 8
    msg = f.feed(wire[12:])
    assert msg is not None and msg.request == Req.SET_VRING_KICK and msg.fds == [fd]
    assert f.want() == 12
    msg.close_fds()


@pytest.mark.parametrize("header, why", [
    (struct.pack("<3I", 1, 2, 0), "version"),
    (struct.pack("<3I", 1, 1, 1 << 20), "payload"),
])
def test_framer_refuses_what_it_cannot_take(header, why):
    fd = os.eventfd(0)
    with pytest.raises(ProtocolError, match=why):
        Framer().feed(header, [fd])
    with pytest.raises(OSError):
        os.fstat(fd)       # closed, not leaked


class Observer:
    def __init__(self) -> None:
        self.changed: list[int] = []
        self.stopping: list = []
        self.features = 0

    def ring_changed(self, ring) -> None:
        self.changed.append(ring.index)

    def ring_stopping(self, ring, done) -> None:
        self.stopping.append(done)

    def features_changed(self, features: int) -> None:
        self.features = features


def session() -> tuple[Session, Observer, list[bytes]]:
    obs, sent = Observer(), []
    return Session(bits(Feature.VERSION_1, Feature.EVENT_IDX), 1 << 3, 4, obs, sent.append), obs, sent


def test_session_negotiates_and_acknowledges():
    s, obs, _ = session()
    reply = s.handle(Message(Req.GET_FEATURES, 1, b""))
    assert reply is not None and struct.unpack_from("<Q", reply, 12)[0] == bits(
        Feature.VERSION_1, Feature.EVENT_IDX, Feature.PROTOCOL_FEATURES)
    # REPLY_ACK not yet negotiated: no acknowledgement
    assert s.handle(Message(Req.SET_OWNER, 1 | F_NEED_REPLY, b"")) is None
    s.handle(Message(Req.SET_PROTOCOL_FEATURES, 1, struct.pack("<Q", 0xFF)))
    assert s.protocol_features == 1 << 3
    ack = s.handle(Message(Req.SET_FEATURES, 1 | F_NEED_REPLY, struct.pack("<Q", 1 << 2 | 1 << 29)))
    assert ack == encode(Req.SET_FEATURES, struct.pack("<Q", 0))
    assert s.features == 1 << 29 and obs.features == 1 << 29     # unknown bits dropped
    # unknown requests and refused ones fail the acknowledgement, not the connection
    assert s.handle(Message(77, 1 | F_NEED_REPLY, b"")) == encode(77, struct.pack("<Q", 1))
    assert s.handle(Message(Req.SET_VRING_NUM, 1 | F_NEED_REPLY, struct.pack("<2I", 9, 8))) == \
        encode(Req.SET_VRING_NUM, struct.pack("<Q", 1))           # ring 9 of 4
    with pytest.raises(ProtocolError):
        s.handle(Message(Req.GET_VRING_BASE, 1, struct.pack("<2I", 9, 0)))


def test_get_vring_base_waits_for_the_ring_to_drain():
    s, obs, sent = session()
    s.handle(Message(Req.SET_PROTOCOL_FEATURES, 1, struct.pack("<Q", 1 << 3)))
    s.handle(Message(Req.SET_VRING_BASE, 1, struct.pack("<2I", 2, 65534)))
    kick = os.eventfd(0)
    s.handle(Message(Req.SET_VRING_KICK, 1, struct.pack("<Q", 2), [kick]))
    assert s.rings[2].started and s.rings[2].kick_fd == kick
    assert s.handle(Message(Req.GET_VRING_BASE, 1 | F_NEED_REPLY, struct.pack("<2I", 2, 0))) is None
    assert not s.rings[2].started and s.rings[2].kick_fd is None and not sent
    obs.stopping[0]()
    assert sent == [encode(Req.GET_VRING_BASE, struct.pack("<2I", 2, 65534))]   # one reply, not two


# ---------------------------------------------------------------- virtqueues

@pytest.fixture
def ring():
    """A 16-entry split ring in a memfd: (driver side, device side)."""
    ram = GuestRam(1 << 20)
    dq, vq, mem = served_ring(ram, [(0, ram.size, 4096)])
    yield dq, vq, mem
    for fd in (dq.kick, dq.call, ram.fd):
        os.close(fd)


class CountingDesc:
    """Counts descriptor reads: what walking a chain costs."""

    def __init__(self) -> None:
        self.reads = 0

    def unpack_from(self, buf, offset):
        self.reads += 1
        return struct.Struct("<QIHH").unpack_from(buf, offset)


def test_a_looping_chain_costs_one_table_and_is_refused(ring, monkeypatch):
    dq, vq, _ = ring
    buf = dq.ram.alloc(64)
    for i in range(16):     # every descriptor points to the next, the last back to the first
        dq.write_desc(i, buf, 64, DESC_F_NEXT | DESC_F_WRITE, (i + 1) % 16)
    dq.offer(0)
    dq.publish(kick=False)
    counter = CountingDesc()
    monkeypatch.setattr(V, "_DESC", counter)
    with pytest.raises(V.ChainError, match="loop") as e:
        vq.pop()
    assert e.value.head == 0 and counter.reads == 16


def test_indirect_tables_are_bounded_before_they_are_read(ring, monkeypatch):
    dq, vq, _ = ring
    table = dq.ram.alloc(16 * (V.MAX_INDIRECT + 1))
    dq.write_desc(0, table, 16 * (V.MAX_INDIRECT + 1), DESC_F_INDIRECT)
    dq.offer(0)
    dq.publish(kick=False)
    counter = CountingDesc()
    monkeypatch.setattr(V, "_DESC", counter)
    with pytest.raises(V.ChainError, match="bad indirect table"):
        vq.pop()
    assert counter.reads == 1


def _views(chain: V.Chain, runs: Sequence[int]) -> list[memoryview]:
    """A chain's runs (region index, offset, length) as views of its regions."""
    return [chain.regions[runs[k]][runs[k + 1]:runs[k + 1] + runs[k + 2]] for k in range(0, len(runs), 3)]


def test_chains_become_runs_of_guest_memory(ring):
    dq, vq, mem = ring
    a, b = dq.ram.alloc(100), dq.ram.alloc(50)
    dq.ram.write(a, b"x" * 100)
    head = dq.add([(a, 100, False), (b, 50, True)], indirect=True)
    dq.publish(kick=False)
    chain = vq.pop()
    assert chain is not None and chain.head == head and chain.regions is mem.views
    # (a list from the Python walk, an array('q') from the compiled build's: decision 0316)
    assert list(chain.readable) == [0, a - dq.ram.GPA_BASE, 100]
    assert list(chain.writable) == [0, b - dq.ram.GPA_BASE, 50]
    assert [bytes(v) for v in _views(chain, chain.readable)] == [b"x" * 100]
    _views(chain, chain.writable)[0][:3] = b"abc"
    assert dq.ram.read(b, 3) == b"abc"
    assert vq.pop() is None
    vq.push(head, 3)
    assert dq.take_used() == [(head, 3)]
    with pytest.raises(BadAddress):
        mem.translate([], dq.ram.GPA_BASE + dq.ram.size - 2, 4)
    with pytest.raises(BadAddress):
        mem.uva(dq.ram.UVA_BASE - 1, 2)


def test_buffers_adjacent_in_guest_memory_become_one_run(ring):
    """A run of descriptors whose buffers follow each other in guest memory
    (as a Linux scatterlist of adjacent pages) is one run: the copies then
    step through runs, not descriptors. A gap, or the switch to
    device-writable buffers, starts a new run; the bytes are the same."""
    dq, vq, _ = ring
    ram = dq.ram
    base = ram.alloc(6 * 4096, 4096)
    ram.write(base, bytes(range(256)) * 64)
    pages = [(base + k * 4096, 4096, False) for k in (0, 1, 2)]        # adjacent
    pages += [(base + 4 * 4096, 100, False), (base + 4 * 4096 + 100, 50, False)]   # a gap, then adjacent
    pages += [(base + 4 * 4096 + 150, 10, True), (base + 5 * 4096, 4096, True)]    # writable: its own run
    head = dq.add(pages, indirect=True)
    dq.publish(kick=False)
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert list(chain.readable[2::3]) == [3 * 4096, 150] and list(chain.writable[2::3]) == [10, 4096]
    assert bytes(_views(chain, chain.readable)[0]) == ram.read(base, 3 * 4096)
    _views(chain, chain.writable)[1][:2] = b"ok"
    assert ram.read(base + 5 * 4096, 2) == b"ok"


def test_vring_need_event_across_the_wrap():
    assert V.vring_need_event(5, 6, 5)
    assert not V.vring_need_event(7, 6, 5)
    assert V.vring_need_event(0xFFFF, 1, 0xFFFE)      # passes the event index across 65535 -> 0
    assert not V.vring_need_event(3, 1, 0xFFFE)


# ---------------------------------------------------------------- virtio-scsi

def test_lun_and_cdb_fields():
    assert decode_lun(lun_field(5)) == (0, 5)
    assert decode_lun(lun_field(300, target=2)) == (2, 300)
    assert decode_lun(bytes([2, 0, 0x40, 1, 0, 0, 0, 0])) is None
    assert encode_lun(0, 5) == bytes([1, 0, 0, 5, 0, 0, 0, 0])
    assert encode_lun(0, 300) == bytes([1, 0, 0x41, 44, 0, 0, 0, 0])
    assert [cdb_length(bytes([op]) + bytes(31)) for op in (0x00, 0x28, 0x4D, 0x88, 0xA0, 0xC0)] == \
        [6, 10, 10, 16, 12, 16]
    assert cdb_length(bytes([0x7F] + [0] * 6 + [24]) + bytes(24)) == 32


class Port:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def rx_cmnd(self, tag, lun, cdb, attr, direction, length, unsol, data):
        self.calls.append(("cmd", tag, lun, cdb, unsol, sum(map(len, data))))

    def rx_data(self, tag, offset, data):
        self.calls.append(("data", tag, offset, sum(map(len, data))))

    def rx_tmf(self, tag, fn, lun, ref):
        self.calls.append(("tmf", tag, fn, lun, ref))

    def buffer(self, size):
        return None


def scsi_request(dq: DriverQueue, cdb: bytes, out: int = 0, tag: int = 1) -> int:
    ram = dq.ram
    req = ram.alloc(REQ.size)
    ram.write(req, REQ.pack(lun_field(0), tag, 0, 0, 0, cdb.ljust(32, b"\0")))
    bufs = [(req, REQ.size, False)]
    if out:
        bufs.append((ram.alloc(out), out, False))
    return dq.add(bufs + [(ram.alloc(RESP_SIZE), RESP_SIZE, True)], indirect=True)


def device(vq: V.Virtqueue, port: Port) -> VirtioScsiDevice:
    dev = VirtioScsiDevice(port)
    dev.rings = [V.Virtqueue(0), V.Virtqueue(1), vq]
    dev.online = True
    return dev


def test_write_data_past_the_stml_limit_waits_for_it_to_ask(ring):
    dq, vq, _ = ring
    port = Port()
    dev = device(vq, port)
    dev.max_unsol = 64 << 10
    scsi_request(dq, write10(0, 512), out=256 << 10)
    dq.publish(kick=False)
    dev.process(vq)
    (kind, tag, _, cdb, unsol, sent), = port.calls
    assert (kind, cdb, unsol, sent) == ("cmd", write10(0, 512).ljust(16, b"\0"), 64 << 10, 64 << 10)
    dev.rdy_to_xfer(tag, 64 << 10, 192 << 10)
    dev.rdy_to_xfer(tag, 200 << 10, 1 << 30)         # more than there is: only what there is
    dev.rdy_to_xfer(tag, -4096, 8192)                 # before the data: nothing (no exception)
    assert port.calls[1:] == [("data", tag, 64 << 10, 192 << 10), ("data", tag, 200 << 10, 56 << 10),
                              ("data", tag, -4096, 0)]


def test_rx_cmnd_headers_take_the_links_fixed_layout(ring):
    """Every CDB of up to 16 bytes reaches the link padded to 16, as iSCSI
    carries it, so FrontEndLink packs rx_cmnd in its fixed layout; the header
    decodes to the command's fields, passes the STML's check, and the STML's
    trim (stml.cdb.trim_cdb) reads back the guest's CDB. A variable-length CDB
    past 16 bytes goes as long as it is (packed from the dict)."""
    from fetd_vhost.server import _Port
    from stml.api import FrontEndLink
    from stml.api.link import _RX_CMND_FIXED
    from stml.api.messages import TO_STML, Op, unpack
    from stml.cdb import trim_cdb

    sent: list[list] = []

    class Channel:
        def send(self, frames: list) -> None:
            sent.append(frames)

    link = FrontEndLink("ipc:///nonexistent/vhost", "vhost", Port())   # type: ignore[arg-type]
    link._channel = Channel()   # type: ignore[assignment]
    dq, vq, _ = ring
    dev = device(vq, _Port(link, 3))   # type: ignore[arg-type]
    cdbs = [bytes(6), bytes([0x12, 0, 0, 0, 96, 0]), write10(7, 8),
            struct.pack(">BBIIBB", 0xA8, 0, 7, 8, 0, 0), struct.pack(">BBQIBB", 0x88, 0, 1 << 40, 8, 0, 0),
            bytes([0x7F] + [0] * 6 + [24]) + bytes(range(1, 25))]
    for tag, cdb in enumerate(cdbs, 1):
        scsi_request(dq, cdb, tag=tag)
    dq.publish(kick=False)
    dev.process(vq)
    assert len(sent) == len(cdbs)
    for cdb, frames in zip(cdbs, sent):
        header = unpack(frames[0])
        assert TO_STML[Op.RX_CMND].verdict(header) is None
        assert trim_cdb(header["cdb"]) == cdb
        assert len(header["cdb"]) == max(16, len(cdb))
        assert {k: header[k] for k in ("nexus", "lun", "attr", "dir", "len", "unsol")} == \
            {"nexus": 3, "lun": 0, "attr": 0, "dir": 0, "len": 0, "unsol": 0}
        assert (len(frames[0]) == _RX_CMND_FIXED.size) == (len(cdb) <= 16)
    assert len({unpack(frames[0])["tag"] for frames in sent}) == len(cdbs)


class SharingPort(Port):
    """A port with the STML link's shared memory for write data: it records
    what each call sent and which buffers it handed out and got back."""

    def __init__(self) -> None:
        super().__init__()
        self.region = SharedRegion(4 << 20, name="vhost-test")
        self.given: list[memoryview] = []
        self.released: list[memoryview] = []
        self.sent: list[list] = []

    def rx_cmnd(self, tag, lun, cdb, attr, direction, length, unsol, data):
        super().rx_cmnd(tag, lun, cdb, attr, direction, length, unsol, data)
        self.sent.append([bytes(d) for d in data] + [self.region.in_use()])

    def rx_data(self, tag, offset, data):
        super().rx_data(tag, offset, data)
        self.sent.append([bytes(d) for d in data] + [self.region.in_use()])

    def buffer(self, size):
        view = self.region.get(size)
        if view is not None:
            self.given.append(view)
        return view

    def release(self, buf):
        self.released.append(buf)
        self.region.release(buf)


def test_shared_write_buffers_go_back_once_sent(ring):
    """Write data of 64 KiB and more is copied into a buffer of the link's
    shared memory, held while it is sent (rx_cmnd, and rx_data after
    rdy_to_xfer), and released right after: the carrier lent it to the STML
    by then, so the slot stays the STML's until the command ends there."""
    dq, vq, _ = ring
    port = SharingPort()
    dev = device(vq, port)
    dev.max_unsol = 64 << 10
    data = bytes(range(256)) * 512
    ram = dq.ram
    req, out = ram.alloc(REQ.size), ram.alloc(len(data))
    ram.write(req, REQ.pack(lun_field(0), 1, 0, 0, 0, write10(0, 256).ljust(32, b"\0")))
    ram.write(out, data)
    dq.add([(req, REQ.size, False), (out, len(data), False), (ram.alloc(RESP_SIZE), RESP_SIZE, True)])
    dq.publish(kick=False)
    dev.process(vq)
    (kind, tag, *_), = port.calls
    dev.rdy_to_xfer(tag, 64 << 10, 64 << 10)
    assert port.sent == [[data[:64 << 10], 1], [data[64 << 10:], 1]]   # held while sent
    assert len(port.given) == 2 and [id(b) for b in port.released] == [id(b) for b in port.given]
    assert port.region.in_use() == 0
    scsi_request(dq, write10(0, 8), out=4096, tag=2)   # small: guest memory, nothing taken
    dq.publish(kick=False)
    dev.process(vq)
    assert len(port.given) == 2 and port.region.in_use() == 0


class ReusingLink:
    """The STML link as fetd_vhost's front end sees it, reusing a read
    slot the moment it is given back (as the STML may): it scribbles over
    the response's frames when told done, and notes what the guest had."""

    timing = delivering = False

    def __init__(self, frames: list[memoryview], guest: Callable[[], bytes]) -> None:
        self.frames, self.guest = frames, guest
        self.done: list[tuple[int, bytes]] = []
        self.lent: dict[int, object] = {}     # tags whose read data the carrier lent

    def scsi_target_done(self, tags: list[int]) -> None:
        for tag in tags:
            self.done.append((tag, self.guest()))
        for frame in self.frames:
            frame[:] = b"\xee" * len(frame)


def test_a_read_slot_goes_back_only_once_the_data_is_in_guest_memory(ring):
    """fetd_vhost says scsi_target_done for a read after its data is in
    guest memory, never before: the STML reuses the slot at once, and the
    guest still reads what the STML sent."""
    import asyncio
    from types import SimpleNamespace

    from fetd_vhost.server import VhostFrontEnd
    from support.vhost_master import read10

    dq, vq, _ = ring
    port = Port()
    dev = device(vq, port)
    ram = dq.ram
    n = 64 << 10
    req, resp, into = ram.alloc(REQ.size), ram.alloc(RESP_SIZE), ram.alloc(n)
    ram.write(req, REQ.pack(lun_field(0), 1, 0, 0, 0, read10(0, n // 512).ljust(32, b"\0")))
    head = dq.add([(req, REQ.size, False), (resp, RESP_SIZE, True), (into, n, True)])
    dq.publish(kick=False)
    dev.process(vq)
    (_, tag, *_), = port.calls
    data = bytes(range(256)) * (n // 256)
    slot = bytearray(data)                        # the STML's shared read slot
    frames = [memoryview(slot)[:n // 2], memoryview(slot)[n // 2:]]
    link = ReusingLink(frames, lambda: ram.read(into, n))
    link.lent[tag] = frames

    async def answer() -> None:
        fe = VhostFrontEnd("tcp://127.0.0.1:9", "/nonexistent/vm.sock", "iqn.2026-12.test:t")
        fe.link = link   # type: ignore[assignment]
        fe.conn = SimpleNamespace(device=dev, signal=lambda: None)   # type: ignore[assignment]
        fe.xmit_response(tag, 0, None, 0, frames)

    asyncio.run(answer())
    assert link.done == [(tag, data)]             # in guest memory when the slot went back
    assert ram.read(into, n) == data and slot == b"\xee" * n
    assert dq.take_used() == [(head, RESP_SIZE + n)]


def test_link_loss_answers_everything_taken(ring):
    dq, vq, _ = ring
    port = Port()
    dev = device(vq, port)
    heads = [scsi_request(dq, bytes(6), tag=t) for t in (1, 2)]
    dq.publish(kick=False)
    dev.process(vq)
    assert len(port.calls) == 2
    dev.fail_all(S.BUSY)
    done = dq.take_used()
    assert sorted(h for h, _ in done) == sorted(heads) and all(n == RESP_SIZE for _, n in done)
    assert not dev.requests and dev.to_signal == {2}
    # answers arriving afterwards for those tags are dropped
    dev.xmit_response(port.calls[0][1], 0, None, 0, [])
    assert dq.take_used() == []


def test_a_guest_reposting_one_head_gets_at_most_a_ring_in_flight(ring):
    """A driver has at most a ring's worth of requests out (each holds a
    head); a guest that posts one head again and again gets no more: the
    ring is held until an answer frees a place, then taken from again."""
    dq, vq, _ = ring
    port = Port()
    dev = device(vq, port)
    head = scsi_request(dq, bytes(6))
    for _ in range(vq.num - 1):
        dq.offer(head)
    dq.publish(kick=False)
    dev.process(vq)
    assert len(port.calls) == len(dev.requests) == vq.num
    for _ in range(vq.num):
        dq.offer(head)
    dq.publish(kick=False)
    dev.process(vq)
    assert len(port.calls) == len(dev.requests) == vq.num and not dev.to_process
    dev.xmit_response(port.calls[0][1], 0, None, 0, [])      # one answered: one place
    assert dev.take_to_process() == [vq]
    dev.process(vq)
    assert len(port.calls) == vq.num + 1 and len(dev.requests) == vq.num


def test_one_call_takes_at_most_a_ring_of_chains(ring, monkeypatch):
    """A guest that posts as fast as the device takes (answered at once, so
    nothing stays in flight) cannot keep process() going: it stops after a
    ring's worth and asks to be called again."""
    dq, vq, _ = ring
    port = Port()
    dev = device(vq, port)
    dev.refused = "not in the ACL"           # every request: BAD_TARGET at once
    head = scsi_request(dq, bytes(6))
    dq.publish(kick=False)
    pop, pops = vq.pop, []

    def guest_keeps_posting():
        pops.append(1)
        if len(pops) > 10 * vq.num:
            raise AssertionError("process() does not stop")
        chain = pop()
        dq.offer(head)                       # the guest posts it again at once
        dq.publish(kick=False)
        return chain
    monkeypatch.setattr(vq, "pop", guest_keeps_posting)
    dev.process(vq)
    assert len(pops) == vq.num and not port.calls and not dev.requests
    assert [h for h, _ in dq.take_used()] == [head] * vq.num
    assert dev.take_to_process() == [vq]


def test_a_ring_resized_after_its_addresses_waits_for_new_ones(ring):
    """SET_VRING_NUM after SET_VRING_ADDR: the ring's views were cut for the
    old size, so it is not ready (pop would index past them) until the
    addresses are set again, even when the master starts it."""
    dq, vq, mem = ring
    s, obs, _ = session()
    s.memory = mem
    s.rings = [V.Virtqueue(0), V.Virtqueue(1), vq]
    vq.started = False
    s.handle(Message(Req.SET_VRING_NUM, 1, struct.pack("<2I", 2, 64)))
    s.handle(Message(Req.SET_VRING_BASE, 1, struct.pack("<2I", 2, 20)))
    s.handle(Message(Req.SET_VRING_KICK, 1, struct.pack("<Q", 2), [os.eventfd(0)]))
    try:
        dq.avail_idx = 21                       # one request past entry 20 of a 64-entry ring
        dq.publish(kick=False)
        port = Port()
        dev = device(vq, port)
        dev.process(vq)
        assert vq.started and not vq.ready and not port.calls
        s.handle(Message(Req.SET_VRING_ADDR, 1, struct.pack("<2I4Q", 2, 0, vq.desc_addr, vq.used_addr,
                                                                vq.avail_addr, 0)))
        assert vq.ready and vq.num == 64 and obs.changed[-1] == 2   # attached again, for 64 entries
    finally:
        s.close()


def test_every_virtio_tmf_maps_to_a_contract_tmf():
    from fetd_vhost.scsi import TMF_FUNCTIONS, VTmf
    assert set(TMF_FUNCTIONS) == set(VTmf)
    assert all(isinstance(fn, Tmf) for fn in TMF_FUNCTIONS.values())


# ---------------------------------------------------------------- anything a guest can write

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

PROPERTY = settings(max_examples=200, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _address(view: memoryview) -> int:
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if len(view) else 0


@PROPERTY
@given(st.lists(st.tuples(st.integers(-8192, 1 << 21), st.integers(0, 1 << 20), st.integers(0, 7),
                          st.integers(0, 40)), min_size=16, max_size=16),
       st.lists(st.integers(0, 40), min_size=1, max_size=4))
def test_any_descriptor_table_gives_views_inside_guest_memory_or_an_error(ring, table, heads):
    """Random descriptor tables (addresses around and past the 1 MiB region,
    any flags, any next index, indirect tables pointing at other random
    bytes): pop() returns chains whose every byte is inside the region, or
    ChainError/RingError; nothing else escapes."""
    dq, vq, mem = ring
    ram = dq.ram
    base = _address(mem.by_gpa[0].view)      # the device's own mapping of the region
    for i, (off, length, flags, nxt) in enumerate(table):
        dq.write_desc(i, (ram.GPA_BASE + off) % (1 << 64), length, flags, nxt)
    for h in heads:
        dq.offer(h)
    dq.publish(kick=False)
    for _ in heads:
        try:
            chain = vq.pop()
        except V.ChainError:
            continue
        except V.RingError:
            break
        assert chain is not None
        runs = chain.readable + chain.writable
        for k in range(0, len(runs), 3):   # every run inside its region
            assert chain.regions[runs[k]] is mem.views[runs[k]]
            assert 0 <= runs[k + 1] and 0 <= runs[k + 2] and runs[k + 1] + runs[k + 2] <= len(mem.views[runs[k]])
        for view in _views(chain, runs):
            start = _address(view)
            assert not len(view) or base <= start and start + len(view) <= base + ram.size
    vq.broken = False
    vq.last_avail = dq.avail_idx
    assert ram.canaries_intact()


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 45), st.integers(0, 15), st.binary(max_size=300)), max_size=30))
def test_any_message_sequence_is_answered_or_refused(messages):
    """Random vhost-user requests (any type, flags and payload): the session
    answers, defers, ignores or raises ProtocolError; nothing else escapes."""
    s, _, sent = session()
    for request, flags, payload in messages:
        try:
            reply = s.handle(Message(request, flags & ~0x3 | 1, payload))
        except ProtocolError:
            continue
        assert reply is None or reply[:4] == struct.pack("<I", request)
    s.close()


def test_fetd_vhost_imports_only_the_contract_from_stml():
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "fetd_vhost"
    seen = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                seen.add(node.module)
            elif isinstance(node, ast.Import):
                seen.update(a.name for a in node.names)
    from_stml = {m for m in seen if m == "stml" or m.startswith("stml.")}
    assert "stml.api" in from_stml
    assert all(m == "stml.api" or m.startswith("stml.api.") for m in from_stml), from_stml


@PROPERTY
@given(st.lists(st.integers(0, 9), max_size=8), st.integers(0, 50), st.integers(0, 50))
def test_buffers_copies_are_the_bytes_of_that_range(sizes, offset, n):
    """Runs over two regions, a gap after each: slices(offset, n) and
    read_into are exactly the bytes [offset, offset + n), write puts data
    there, tail(offset) is the rest, all clipped to the end; nothing outside
    the runs is touched (the pure copies: test_vhost_vcopy checks the C
    helper against these)."""
    from fetd_vhost.scsi import Buffers
    data = bytes(range(1, sum(sizes) + 1))
    regions = [memoryview(bytearray(b"\xee" * 200)), memoryview(bytearray(b"\xee" * 200))]
    runs: list[int] = []
    at, pos = 0, [3, 5]
    for k, size in enumerate(sizes):
        r = k % 2
        regions[r][pos[r]:pos[r] + size] = data[at:at + size]
        runs += [r, pos[r], size]
        at, pos[r] = at + size, pos[r] + size + 7
    b = Buffers(runs, sum(sizes), regions)
    assert b"".join(bytes(v) for v in b.slices(offset, n)) == data[offset:offset + n]
    assert b.tail(offset).read(0, 100) == data[offset:] and b.tail(offset).size == len(data[offset:])
    dst = bytearray(b"\xcc" * n)
    got = b.read_into(offset, memoryview(dst))
    assert got == len(data[offset:offset + n]) and dst[:got] == data[offset:offset + n]
    untouched = [bytes(r) for r in regions]
    assert b.write(offset, b"\xab" * n) == got
    assert b.read(0, len(data)) == data[:offset] + b"\xab" * got + data[offset + got:]
    outside = [bytes(r) for r in regions]
    for k in range(0, len(runs), 3):   # the bytes outside the runs are as they were
        for rr in (untouched, outside):
            rr[runs[k]] = rr[runs[k]][:runs[k + 1]] + bytes(runs[k + 2]) + rr[runs[k]][runs[k + 1] + runs[k + 2]:]
    assert outside == untouched
    if n:   # never a byte before the buffers: a negative offset is nothing
        assert b.slices(-1, n) == [] and b.write(-1, b"\xab" * n) == 0 and b.read_into(-1, memoryview(dst)) == 0


@pytest.mark.parametrize("table, expected", [
    ({"socket": "/s", "poll_us": 120}, 120),
    ({"socket": "/s"}, None),                                   # `run` decides, by its placement
    ({"socket": "/s", "poll_us": "120"}, 120),
    ({"socket": "/s", "poll_us": 10_001}, "vhost[0]: poll_us must be an integer from 0 to 10000, not 10001"),
    ({"socket": "/s", "poll_us": True}, "vhost[0]: poll_us must be an integer from 0 to 10000, not True"),
])
def test_a_vhost_table_may_set_the_poll_window(table, expected):
    from types import SimpleNamespace

    from fetd_vhost.cli import parse_vhost, vhost_specs
    config = SimpleNamespace(raw={"vhost": [table]}, path=None, targets=[SimpleNamespace(name="iqn.x")])
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            vhost_specs(config, ())
    else:
        assert vhost_specs(config, ())[0].poll_us == expected
        assert parse_vhost("/s" + ("" if expected is None else f",poll_us={expected}")).poll_us == expected
