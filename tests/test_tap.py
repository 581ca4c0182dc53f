"""The tap (stml.api.tap): on each side of the link, one place that sees every
contract message with its peer and direction, may hold one back, and hands
it on later (deliver / transmit). The trace is built on it; fault injection
(issue 22 item 4) will be."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from stml.api import FrontEndLink, Taps, pack, unpack
from stml.api.tap import combine

READ_CAPACITY10 = bytes([0x25]) + bytes(9)


class Seen:
    """A tap that notes what passes, and swallows the ops it is told to."""

    def __init__(self, swallow: tuple[str, ...] = ()) -> None:
        self.swallow = set(swallow)
        self.log: list[tuple[str, Any, str, list]] = []
        self.held: list[tuple[dict, list]] = []

    def _see(self, way: str, peer: Any, header: dict, frames: list) -> bool:
        self.log.append((way, peer, header["op"], [bytes(f) for f in frames]))
        if header["op"] in self.swallow:
            self.held.append((header, [bytes(f) for f in frames]))
            return False
        return True

    def inbound(self, peer: Any, header: dict, packed: bytes, frames: list) -> bool:
        assert unpack(packed) == header
        return self._see("in", peer, header, frames)

    def outbound(self, peer: Any, header: dict, packed: bytes, frames: list) -> bool:
        assert unpack(packed) == header
        return self._see("out", peer, header, frames)


class Handler:
    def __init__(self) -> None:
        self.ready: asyncio.Future | None = None
        self.responses: dict[int, tuple[int, bytes]] = {}
        self.got: asyncio.Event | None = None

    def detect(self, detect: Any) -> None:
        pass

    def nexus_ready(self, nexus: int, error: str | None) -> None:
        assert self.ready is not None
        self.ready.set_result(error)

    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None:
        pass

    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int, data: list) -> None:
        self.responses[tag] = (status, b"".join(bytes(d) for d in data))
        assert self.got is not None
        self.got.set()

    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int]) -> None:
        pass

    def report_aen(self, nexus: int | None, lun: int, sense: bytes) -> None:
        pass

    def link_lost(self) -> None:
        pass


def test_a_front_end_link_tap_sees_every_message_and_can_hold_one_back(stml):
    async def main() -> tuple[Seen, Handler, dict, dict]:
        handler = Handler()
        handler.ready = asyncio.get_running_loop().create_future()
        link = FrontEndLink(stml.endpoint, "test", handler, heartbeat_ms=60000)
        seen = Seen(swallow=("xmit_response",))
        link.add_tap(seen)
        link.start()
        detect = await link.wait_ready(10)
        link.register_nexus(1, "iqn.2026-12.test:tap", detect.targets[0].name, 1)
        assert await asyncio.wait_for(handler.ready, 10) is None
        handler.got = asyncio.Event()
        link.rx_cmnd(7, 1, 0, READ_CAPACITY10, 0, 2, 8)
        for _ in range(500):   # the answer comes in and is held back: the handler has not seen it
            if seen.held:
                break
            await asyncio.sleep(0.01)
        assert seen.held and not handler.responses
        header, frames = seen.held.pop()
        link.deliver(header, frames)   # let it in now
        await asyncio.wait_for(handler.got.wait(), 10)
        link.scsi_target_done([7])
        # an outbound message held back reaches the STML only when transmitted
        seen.swallow = {"rx_cmnd"}
        handler.got = asyncio.Event()
        link.rx_cmnd(8, 1, 0, READ_CAPACITY10, 0, 2, 8)
        await asyncio.sleep(0.2)
        assert 8 not in handler.responses
        header, frames = seen.held.pop()
        link.transmit(header, frames)
        await asyncio.wait_for(handler.got.wait(), 10)
        link.remove_tap(seen)
        assert link.tap is None
        await link.close()
        return seen, handler, detect, header

    seen, handler, detect, _ = asyncio.run(main())
    ways = [(w, op) for w, _, op, _ in seen.log]
    assert ways[:4] == [("out", "register_target_front_end"), ("in", "detect"), ("out", "register_nexus"),
                        ("in", "nexus_ready")]
    assert ("out", "rx_cmnd") in ways and ("in", "xmit_response") in ways
    assert {peer for _, peer, _, _ in seen.log} == {stml.endpoint}
    blocks = detect.targets[0].luns[0].blocks
    assert handler.responses[7] == handler.responses[8] == (0, (blocks - 1).to_bytes(4, "big") + (512).to_bytes(4, "big"))


def test_the_stml_tap_sees_both_ways_and_deliver_and_transmit_go_past_it():
    from stml import config
    from stml.server import StmlServer
    work = Path(tempfile.mkdtemp(prefix="tap"))
    server = StmlServer(config.load(data_dir=str(work / "data"), luns=("ram:1MiB",)))
    sent: list[list] = []

    class Stream:   # what the server needs of a stream channel
        region = None

        def send(self, frames: list) -> None:
            sent.append(frames)

    ident = b"\0stream-1"
    server.streams[ident] = Stream()   # type: ignore[assignment]
    seen = Seen(swallow=("rx_cmnd",))
    other = Seen()
    try:
        server.add_tap(seen)
        server.add_tap(other)
        assert isinstance(server.tap, Taps)
        server.received([ident, pack({"op": "register_target_front_end", "name": "t", "kind": "test",
                                      "version": [1, 0]})])
        target = next(iter(server.emulator.targets))
        server.received([ident, pack({"op": "register_nexus", "nexus": 1, "initiator": "iqn.x",
                                      "target": target, "tpg": 1})])
        cmd = {"op": "rx_cmnd", "tag": 3, "nexus": 1, "lun": 0, "cdb": READ_CAPACITY10, "attr": 0, "dir": 2,
               "len": 8}
        server.received([ident, pack(cmd)])
        assert not [f for f in sent if unpack(f[0])["op"] == "xmit_response"]   # held back: not handled
        assert [op for _, _, op, _ in other.log] == ["register_target_front_end", "detect", "register_nexus",
                                                      "nexus_ready"]   # a swallowed message skips later taps
        header, frames = seen.held.pop()
        server.deliver(ident, header, frames)
        answers = [unpack(f[0]) for f in sent if unpack(f[0])["op"] == "xmit_response"]
        assert [a["tag"] for a in answers] == [3]
        # outbound: a held answer is sent only by transmit
        seen.swallow = {"xmit_response"}
        before = len(sent)
        server.received([ident, pack({**cmd, "tag": 4})])
        assert len(sent) == before
        header, frames = seen.held.pop()
        server.transmit(ident, header, frames)
        assert unpack(sent[-1][0])["tag"] == 4
        assert all(peer == ident for _, peer, _, _ in seen.log)
        server.remove_tap(seen)
        assert server.tap is other
        server.remove_tap(other)
        assert server.tap is None and combine([]) is None
    finally:
        server.sock.close(linger=0)
        server.ctx.term()
        server.executor.shutdown()
        shutil.rmtree(work, ignore_errors=True)
