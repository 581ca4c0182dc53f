"""What one front end can make the STML hold (docs/decisions/0263): nexuses per
front end and per target, the port groups they come through, the size of a
frame on the ZeroMQ carrier and the number of frames in a message (0226); and an iSCSI login past the STML's cap, which
fetd_tcp refuses with a Login Response of its own."""
from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from backends import open_backend
from fetd_tcp import login as L
from stml import emulator as E
from stml.api import CONTRACT_VERSION, Op, pack, unpack
from stml.api import sizes, zmq_carrier
from stml.api.sizes import FRAME_ROOM, MAX_FRAMES
from stml.lu import LogicalUnit, LunOptions
from support.fakestml import FakeStml, wire
from support.fuzzgen import host_port
from support.procs import free_port, stop_pid
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

T = "iqn.2026-11.org.x:t"
U = "iqn.2026-11.org.x:u"
INI = "iqn.2026-11.org.i"


class Stml:
    """An in-process STML with two targets of one RAM LU each; what it sends is kept."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, dict[str, Any]]] = []
        targets = []
        for name in (T, U):
            lu = LogicalUnit(name, 0, open_backend("ram", 1 << 20, None, False),
                             LunOptions(kind="ram", size=1 << 20), None)
            targets.append(E.Target(name, {0: lu}))
        self.emu = E.Emulator(targets, lambda ident, h, f: self.sent.append((ident, h)), ThreadPoolExecutor(1))
        for t in targets:
            t.luns[0].template = self.emu.templates["disk"]

    def front_end(self, ident: bytes) -> None:
        self.emu.handle(ident, {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": ident.decode(),
                                "heartbeat_ms": 1000, "aen": False}, [])

    def nexus(self, ident: bytes, nid: int, initiator: str, target: str = T, tpg: int = 1) -> str | None:
        """register_nexus: None once ready, else the error nexus_ready carries."""
        self.sent.clear()
        self.emu.handle(ident, {"op": Op.REGISTER_NEXUS, "nexus": nid, "initiator": initiator,
                                "target": target, "tpg": tpg}, [])
        (ready,) = [h for i, h in self.sent if i == ident and h["op"] == Op.NEXUS_READY and h["nexus"] == nid]
        return ready.get("error")

    def release(self, ident: bytes, nid: int) -> None:
        self.emu.handle(ident, {"op": Op.RELEASE_NEXUS, "nexus": nid}, [])


@pytest.fixture
def inproc() -> Stml:
    return Stml()


def test_front_end_past_its_nexus_cap_is_refused(inproc, monkeypatch, caplog):
    """Four nexuses of one front end (cap 4, on two targets), then a fifth is
    refused, with one log line; a re-registered id replaces its nexus and is
    taken; a released one makes room. Another front end is not held back."""
    monkeypatch.setattr(E, "MAX_NEXUSES_PER_FRONT_END", 4)
    inproc.front_end(b"a")
    inproc.front_end(b"b")
    for n in range(1, 5):
        assert inproc.nexus(b"a", n, f"{INI}:{n}", T if n % 2 else U) is None
    with caplog.at_level(logging.WARNING, logger="stml"):
        error = inproc.nexus(b"a", 5, f"{INI}:5")
    assert error is not None and "4 nexuses" in error
    assert [r.getMessage() for r in caplog.records] == [f"front end a: nexus 5 refused: {error}"]
    fe = inproc.emu.front_ends[b"a"]
    assert sorted(fe.nexuses) == [1, 2, 3, 4]
    assert f"{INI}:5|{T},t,1" not in inproc.emu.nexus_keys(T)
    assert inproc.nexus(b"a", 3, f"{INI}:3b") is None          # a replacement
    assert fe.nexuses[3].initiator == f"{INI}:3b"
    assert inproc.nexus(b"b", 1, f"{INI}:b1") is None           # its own count
    inproc.release(b"a", 2)
    assert inproc.nexus(b"a", 5, f"{INI}:5") is None
    assert sorted(fe.nexuses) == [1, 3, 4, 5]


def test_front_ends_past_the_cap_are_refused(inproc, monkeypatch, caplog):
    """Every connection of an admitted key registers a front end of its own,
    each allowed its own nexuses: past the cap a new one is refused (detect
    with the reason, one log line) and not kept; a repeated registration of
    a known one is not refused; one that leaves makes room."""
    monkeypatch.setattr(E, "MAX_FRONT_ENDS", 2)
    inproc.front_end(b"a")
    inproc.front_end(b"b")
    inproc.sent.clear()
    with caplog.at_level(logging.WARNING, logger="stml"):
        inproc.front_end(b"c")
    ((ident, detect),) = inproc.sent
    assert ident == b"c" and detect["op"] == Op.DETECT and "2 front ends" in detect["error"]
    assert [r.getMessage() for r in caplog.records] == [f"front end 'c' refused: {detect['error']}"]
    assert sorted(inproc.emu.front_ends) == [b"a", b"b"]
    inproc.sent.clear()
    inproc.emu.front_ends[b"a"].detected -= inproc.emu.heartbeat   # (its detect a heartbeat ago: 0248)
    inproc.front_end(b"a")                                   # known: detect, no error
    assert [h.get("error") for _, h in inproc.sent if h["op"] == Op.DETECT] == [None]
    inproc.emu.handle(b"b", {"op": Op.DEREGISTER}, [])
    inproc.front_end(b"c")
    assert sorted(inproc.emu.front_ends) == [b"a", b"c"]


def test_a_front_end_registering_again_and_again_gets_one_detect_per_heartbeat(inproc, caplog):
    """A registered front end sends a hundred registrations in one go: each
    would cost a detect of every LU (0229). One detect answers them all, a
    heartbeat after the last one (0248), with one log line; a registration
    a heartbeat or more after its detect is answered at once, as before."""
    async def main() -> None:
        emu = inproc.emu
        emu.heartbeat = 3600.0   # (every registration below comes within it, however slow the machine)
        inproc.front_end(b"a")
        fe = emu.front_ends[b"a"]
        inproc.sent.clear()
        with caplog.at_level(logging.INFO, logger="stml"):
            for _ in range(100):
                inproc.front_end(b"a")
        assert inproc.sent == [] and emu.front_ends[b"a"] is fe
        assert [r.getMessage().split(":")[0] for r in caplog.records] == [
            "front end a registered again within a heartbeat of its detect"]
        owed = fe.detect_later
        assert owed is not None and 0 < owed.when() - asyncio.get_running_loop().time() <= emu.heartbeat
        owed.cancel()
        emu._owed_detect(fe)   # (its time came)
        assert [(i, h["op"], h.get("error")) for i, h in inproc.sent] == [(b"a", Op.DETECT, None)]
        assert fe.detect_later is None   # nothing more is owed
        fe.detected -= emu.heartbeat
        inproc.front_end(b"a")
        assert len(inproc.sent) == 2 and inproc.sent[1][1]["op"] == Op.DETECT and fe.detect_later is None
    asyncio.run(main())


def test_an_owed_detect_goes_to_no_front_end_released_meanwhile(inproc):
    """A front end owed a detect deregisters: the detect is not sent, and its
    timer goes with it (it would keep the released front end alive)."""
    async def main() -> None:
        emu = inproc.emu
        emu.heartbeat = 3600.0
        inproc.front_end(b"a")
        inproc.front_end(b"a")   # (owed)
        fe = emu.front_ends[b"a"]
        owed = fe.detect_later
        assert owed is not None
        inproc.sent.clear()
        emu.handle(b"a", {"op": Op.DEREGISTER}, [])
        assert fe.detect_later is None and owed.cancelled()
        emu._owed_detect(fe)   # (a timer already running when the release came)
        assert [h["op"] for _, h in inproc.sent] == []
    asyncio.run(main())


def test_target_past_its_nexus_cap_is_refused(inproc, monkeypatch):
    """The cap of a target counts the I_T nexuses of every front end: the
    fourth one is refused, on that target only; a nexus whose I_T nexus is
    already live (the same initiator port through the same port group, from
    another front end) adds none and is taken."""
    monkeypatch.setattr(E, "MAX_NEXUSES_PER_TARGET", 3)
    inproc.front_end(b"a")
    inproc.front_end(b"b")
    assert inproc.nexus(b"a", 1, f"{INI}:1") is None
    assert inproc.nexus(b"a", 2, f"{INI}:2") is None
    assert inproc.nexus(b"b", 1, f"{INI}:3") is None
    error = inproc.nexus(b"b", 2, f"{INI}:4")
    assert error is not None and "3 I_T nexuses" in error
    assert inproc.nexus(b"b", 2, f"{INI}:4", U) is None
    assert inproc.nexus(b"b", 3, f"{INI}:1") is None
    assert len(inproc.emu.nexus_keys(T)) == 3 and len(list(inproc.emu.nexuses(T))) == 4
    inproc.release(b"a", 2)
    assert inproc.nexus(b"b", 4, f"{INI}:4") is None


def test_port_groups_are_capped_and_16_bit(inproc, monkeypatch):
    """Port group tags a target's nexuses came through are kept for ALUA
    after the nexuses end: past the cap a new tag is refused (a known one is
    not), and one that is no 16-bit target port group never gets in."""
    monkeypatch.setattr(E, "MAX_PORT_GROUPS", 2)
    inproc.front_end(b"a")
    for tpg in (-1, 0xFFFF, 0x10000):   # (0xFFFF: tag 0's relative port identifier)
        error = inproc.nexus(b"a", 9, f"{INI}:9", tpg=tpg)
        assert error is not None and "0..65534" in error
    assert inproc.nexus(b"a", 1, f"{INI}:1", tpg=1) is None
    inproc.release(b"a", 1)
    assert inproc.nexus(b"a", 2, f"{INI}:2", tpg=0xFFFE) is None
    error = inproc.nexus(b"a", 3, f"{INI}:3", tpg=7)
    assert error is not None and "2 port groups" in error
    assert inproc.nexus(b"a", 3, f"{INI}:3", tpg=1) is None
    assert inproc.emu.portal_groups(T) == {1, 0xFFFE}


# ---------------------------------------------------------------- real processes

class RawFrontEnd:
    """A front end written out by hand on a ZeroMQ DEALER: it does only what
    a test tells it to (it answers no heartbeat, so it says it beats hourly)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.sock.send_multipart([pack({"op": Op.REGISTER, "version": [1, 0], "kind": "raw", "name": "raw",
                                        "heartbeat_ms": 3_600_000, "aen": False})])
        (self.detect,) = self.wait(lambda h: h["op"] == Op.DETECT, 1)

    def send(self, header: dict[str, Any], *data: bytes) -> None:
        self.sock.send_multipart([pack(header), *data])

    def wait(self, wanted: Callable[[dict[str, Any]], bool], count: int,
             timeout: float = 30.0) -> list[dict[str, Any]]:
        """The next `count` messages `wanted` picks (a batch is several);
        the timeout only bounds a wait for messages that never come."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            assert time.monotonic() < deadline, f"{len(got)} of {count} messages came"
            if not self.sock.poll(100):
                continue
            frames = self.sock.recv_multipart()
            header = unpack(frames[0])
            headers = [header] if header["op"] != Op.BATCH else [unpack(f) for f in frames[1:]]
            got += [h for h in headers if isinstance(h, dict) and "op" in h and wanted(h)]
        return got

    def disconnected(self, timeout: float = 30.0) -> bool:
        """Whether ZeroMQ reports the connection to the STML gone (the
        timeout bounds the wait for an event that may never come)."""
        if not self.monitor.poll(int(timeout * 1000)):
            return False
        return recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()


def test_an_oversized_zeromq_frame_disconnects_its_peer_only(stml, client_factory):
    """A write of the STML's max_transfer in one frame is served; a frame
    past max_transfer + FRAME_ROOM makes ZeroMQ disconnect its sender before
    the STML holds it, and the STML serves a loopback client as before."""
    c = client_factory(stml.endpoint)
    c.write(0, 10, b"\x5a" * 512)
    raw = RawFrontEnd(stml.endpoint)
    try:
        target = raw.detect["targets"][0]["name"]
        raw.send({"op": Op.REGISTER_NEXUS, "nexus": 1, "initiator": f"{INI}:raw", "target": target, "tpg": 1})
        (ready,) = raw.wait(lambda h: h["op"] == Op.NEXUS_READY, 1)
        assert not ready.get("error")
        size = raw.detect["limits"]["max_transfer"]
        data = os.urandom(size)
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 1024, 0, size // 512, 0)
        raw.send({"op": Op.RX_CMND, "tag": 1, "nexus": 1, "lun": 0, "cdb": cdb, "attr": 0, "dir": 1,
                  "len": size, "unsol": size}, data)
        (done,) = raw.wait(lambda h: h["op"] == Op.XMIT_RESPONSE, 1)
        assert done["status"] == 0
        raw.send({"op": Op.RX_DATA, "tag": 2, "offset": 0}, bytes(size + FRAME_ROOM + 1))
        assert raw.disconnected()
    finally:
        raw.close()
    assert stml.proc.poll() is None
    assert c.read(0, 1024, size // 512) == data
    assert c.read(0, 10, 1) == b"\x5a" * 512


class _CountedRouter(zmq.Socket):
    """A ROUTER socket that counts the frames received from it."""
    received = 0

    def recv(self, *args: Any, **kw: Any) -> Any:
        _CountedRouter.received += 1
        return super().recv(*args, **kw)


def test_a_zeromq_message_of_too_many_frames_is_dropped_in_steps(monkeypatch, caplog):
    """A peer's message of more frames than MAX_FRAMES (8 here; 4,096) is
    never delivered: the channel lets its frames go as it receives them, at
    most MAX_FRAMES a turn of the loop, logs one line, and delivers the
    next message. Before, recv_multipart took it whole, whatever its count.
    A sending channel splits what it queued for one peer into batches the
    receiver takes: every message arrives, in order (0226)."""
    monkeypatch.setattr(sizes, "MAX_FRAMES", 8)

    async def main() -> tuple[list, list[int], list[list[bytes]]]:
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER, socket_class=_CountedRouter)
        router.bind("inproc://many-frames")
        peer = ctx.socket(zmq.DEALER)
        peer.connect("inproc://many-frames")
        got: list = []
        try:
            ch = zmq_carrier.Channel(router, lambda frames: got.append([bytes(f) for f in frames]), routed=True)
            peer.send_multipart([pack({"op": Op.HEARTBEAT}), *(b"x" for _ in range(8 * 5 + 3))])
            peer.send_multipart([pack({"op": Op.HEARTBEAT}), b"ok"])
            per_turn = []
            for _ in range(50):
                before = _CountedRouter.received
                await asyncio.sleep(0)
                per_turn.append(_CountedRouter.received - before)
            # the other way: 30 messages of 3 frames queued in one turn leave as batches
            ident = got[0][0]
            for i in range(30):
                ch.send([ident, pack({"op": Op.HEARTBEAT, "n": i}), b"a", b"b"])
            await asyncio.sleep(0)
            ch.close()
            batches = []
            while peer.poll(1000):
                batches.append(peer.recv_multipart())
                if sum(len(b) for b in batches) >= 30 * 3 + len(batches):
                    break
        finally:
            peer.close(linger=0)
            ctx.term()
        return got, per_turn, batches

    got, per_turn, batches = asyncio.run(main())
    assert [frames[1:] for frames in got] == [[pack({"op": Op.HEARTBEAT}), b"ok"]]
    assert sum(per_turn) == (1 + 1 + 8 * 5 + 3) + (1 + 2), per_turn   # identity frames counted
    assert max(per_turn) <= 2 * (8 + 1) + 3, per_turn
    assert "dropped a ZeroMQ message of 45 frames" in caplog.text
    assert max(len(b) for b in batches) <= 8
    messages = []
    for b in batches:
        counts = unpack(b[0])["n"]
        pos = 1
        for n in counts:
            messages.append(b[pos:pos + n])
            pos += n
        assert pos == len(b)
    assert messages == [[pack({"op": Op.HEARTBEAT, "n": i}), b"a", b"b"] for i in range(30)]


def test_a_front_ends_channel_takes_a_big_batch_from_its_stml_whole(monkeypatch):
    """The cap is the STML's (its routed socket, which anyone admitted may
    reach): a front end's socket reaches only the STML it chose, and an STML
    older than the cap sends batches of any size, which must not be lost."""
    monkeypatch.setattr(sizes, "MAX_FRAMES", 8)

    async def main() -> list:
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind("inproc://big-batch")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect("inproc://big-batch")
        got: list = []
        try:
            ch = zmq_carrier.Channel(dealer, lambda frames: got.append([bytes(f) for f in frames]))
            ch.send([pack({"op": Op.HEARTBEAT})])
            await asyncio.sleep(0)
            ident = router.recv_multipart()[0]
            router.send_multipart([ident, pack({"op": Op.HEARTBEAT}), *(b"x" for _ in range(8 * 3))])
            for _ in range(20):
                await asyncio.sleep(0)
                if got:
                    break
            ch.close()
        finally:
            dealer.close(linger=0)
            router.close(linger=0)
            ctx.term()
        return got

    assert asyncio.run(main()) == [[pack({"op": Op.HEARTBEAT}), *(b"x" for _ in range(8 * 3))]]


def test_the_stml_drops_a_message_of_too_many_frames_and_answers_the_next(stml):
    """A management request of MAX_FRAMES + 1 frames to a real STML gets no
    answer and one log line; the same request in one frame is answered, and
    the STML lives on (0226). Before, it was handled like any other."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stml.endpoint)
    try:
        request = pack({"op": Op.MGMT, "id": 1, "cmd": "status"})
        sock.send_multipart([request, *(b"" for _ in range(MAX_FRAMES))])
        sock.send_multipart([pack({"op": Op.MGMT, "id": 2, "cmd": "status"})])
        assert sock.poll(30_000)
        reply = unpack(sock.recv_multipart()[0])
        assert (reply["op"], reply["id"], reply["ok"]) == (Op.MGMT_REPLY, 2, True)
    finally:
        sock.close(linger=0)
        ctx.term()
    assert f"dropped a ZeroMQ message of {MAX_FRAMES + 2} frames" in stml.log()
    assert stml.proc.poll() is None


def test_a_login_past_the_stml_nexus_cap_fails_and_sessions_keep_working():
    """One iSCSI session, then a raw front end takes the rest of the
    target's I_T nexuses (4,096): the next login gets Out of resources
    (0x0302) and its connection closes, the session that logged in before
    reads and writes as before, and once a nexus is released a login
    succeeds again. fetd_tcp's own cap (256 sessions) is never reached."""
    with Target("--lun", "ram:16MiB") as t:
        host, port = host_port(t.portal)
        a = RawInitiator(host, port, initiator=f"{INI}:a")
        raw = None
        try:
            assert a.login(IQN).status_class == 0
            a.write16(5, b"\x11" * 512)
            raw = RawFrontEnd(f"ipc://{t.data_dir}/stml.sock")
            others = E.MAX_NEXUSES_PER_TARGET - 1
            for n in range(1, others + 1):
                raw.send({"op": Op.REGISTER_NEXUS, "nexus": n, "initiator": f"{INI}:r{n}", "target": IQN,
                          "tpg": 1})
            ready = raw.wait(lambda h: h["op"] == Op.NEXUS_READY, others)
            assert [h for h in ready if h.get("error")] == []
            b = RawInitiator(host, port, initiator=f"{INI}:b")
            try:
                r = b.login(IQN)
                assert (r.status_class << 8 | r.status_detail) == L.OUT_OF_RESOURCES
                b.sock.settimeout(10)
                assert b.sock.recv(1) == b""     # closed after the Login Response
            finally:
                b.close()
            a.write16(6, b"\x22" * 512)
            assert a.read16(5, 2) == b"\x11" * 512 + b"\x22" * 512
            # one line each: the STML's refusal, fetd_tcp's failed login
            assert t.log().count("I_T nexuses, the most the STML keeps") == 2
            raw.send({"op": Op.RELEASE_NEXUS, "nexus": 1})
            c = RawInitiator(host, port, initiator=f"{INI}:c")
            try:
                assert c.login(IQN).status_class == 0
                assert c.read16(5, 1) == b"\x11" * 512
            finally:
                c.close()
        finally:
            a.close()
            if raw is not None:
                raw.close()


class _AenAtOnce(FakeStml):
    """An STML that raises a unit attention on a nexus the moment it takes it:
    nexus_ready and report_aen in one write, as a LUN change racing a login."""

    def _answer(self, h: dict) -> None:
        if h.get("op") == "register_nexus":
            sense = bytes([0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x3F, 0x0E, 0, 0, 0, 0])
            self.conn.sendall(wire({"op": "nexus_ready", "nexus": h["nexus"]})
                              + wire({"op": "report_aen", "nexus": h["nexus"], "lun": 0, "sense": sense}))
        else:
            super()._answer(h)


def test_nothing_reaches_an_initiator_before_its_login_response(tmp_path, tmp_short):
    """fetd_tcp answers a login once the STML took the nexus (0263); what the
    STML sends that nexus meanwhile waits for the Login Response (seen in a
    64-session load run: an Async Message read as the login's text)."""
    port = free_port()

    async def main() -> None:
        stml = _AenAtOnce(str(tmp_short() / "stml"), version=CONTRACT_VERSION, caps=[])
        fetd = stml.fetd_tcp(port)
        try:
            def login() -> list:
                ini = RawInitiator.once_listening("127.0.0.1", port, timeout=10)
                r = ini.login("iqn.2026-12.test:fake")
                first = [type(r).__name__, r.status_class]
                pdu, data = ini.recv()
                ini.close()
                return first + [type(pdu).__name__, data[2:][2] & 0xF]
            got = await asyncio.to_thread(login)
        finally:
            stop_pid(fetd)
            stml.close()
        # the Login Response first, then the unit attention's Async Message (sense key 6)
        assert got == ["LoginResponse", 0, "AsyncMessage", 6]

    asyncio.run(main())


def test_a_nexus_the_stml_refuses_again_ends_its_session_only(tmp_short):
    """The STML refuses a nexus of a live session (as one that restarted
    refuses a re-registration past its caps): fetd_tcp ends that session (an
    Async Message, drop all connections, then the connection closes) and
    releases the nexus, instead of keeping a session whose commands go
    nowhere; the other session keeps working, and the initiator's next login
    gets a clean answer (docs/decisions/0266)."""
    port = free_port()
    target = "iqn.2026-12.test:fake"

    async def main() -> None:
        stml = FakeStml(str(tmp_short() / "stml"), version=CONTRACT_VERSION, caps=[])
        fetd = stml.fetd_tcp(port)
        a = b = None
        try:
            def connect(name: str) -> RawInitiator:
                ini = RawInitiator.once_listening("127.0.0.1", port, initiator=f"{INI}:{name}", timeout=10)
                assert ini.login(target).status_class == 0
                return ini
            a = await asyncio.to_thread(connect, "a")
            b = await asyncio.to_thread(connect, "b")
            (nexus,) = [h["nexus"] for h, _ in stml.messages
                        if h["op"] == "register_nexus" and h["initiator"].startswith(f"{INI}:a")]
            (other,) = [h["nexus"] for h, _ in stml.messages
                        if h["op"] == "register_nexus" and h["initiator"].startswith(f"{INI}:b")]
            stml.send({"op": "nexus_ready", "nexus": nexus,
                       "error": f"target {target} has 4096 I_T nexuses, the most the STML keeps"})

            def after() -> list:
                pdu, _ = a.recv()
                closed = a.sock.recv(1) == b""
                status, _, _ = b.command(bytes(6))
                again = RawInitiator("127.0.0.1", port, initiator=f"{INI}:a", timeout=10)
                try:
                    relogin = again.login(target).status_class
                finally:
                    again.close()
                return [type(pdu).__name__, getattr(pdu, "event", None), closed, status, relogin]
            got = await asyncio.to_thread(after)
            for _ in range(100):     # fetd_tcp's release of the refused nexus, sent as the session ended
                if ("scsi_release", nexus) in [(h["op"], h.get("nexus")) for h, _ in stml.messages]:
                    break
                await asyncio.sleep(0.05)
            released = [h["nexus"] for h, _ in stml.messages if h["op"] == "scsi_release"]
        finally:
            for ini in (a, b):
                if ini is not None:
                    ini.close()
            stop_pid(fetd)
            stml.close()
        from fetd_tcp import pdu as P
        assert got == ["AsyncMessage", P.ASYNC_DROP_ALL_CONNECTIONS, True, 0, 0]
        # the other session's nexus stays (the re-login's own may be released
        # by now, as its connection closed)
        assert nexus in released and other not in released
    asyncio.run(main())
