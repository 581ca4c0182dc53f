"""Mixed contract versions over the stream carrier: capabilities are offered in
register_target_front_end and granted in detect (1.4), so a front end and an
STML of different minor versions use what both have instead of reconnecting
in a loop. Old peers are played by tests/support/fakestml.py (an STML written against
docs/contract.md) or by a raw StreamChannel; new ones are the real code."""
from __future__ import annotations

import asyncio
import random
import socket
import struct
from pathlib import Path
from typing import Any

from stml.api import CONTRACT_VERSION, FrontEndLink, SharedRegion, StreamChannel, pack, stream_path, unpack
from support.aio import until
from support.fakestml import FakeStml

BIG = 128 << 10
WRITE10 = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, BIG // 512, 0)
READ10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, BIG // 512, 0)
CONTROL_REGION = 1


class Recorder:
    """A FrontEndHandler that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("usage", "messages_handled", "drop_nexus"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args))

    def called(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]



def test_a_front_end_meets_a_1_1_stml_and_keeps_its_region(tmp_path: Path) -> None:
    """A 1.1 STML closes a stream that brings a region (an unknown control
    message). This front end offers its write region in its registration; the
    STML's detect grants nothing, so the region is never sent: the front end
    stays on its one connection, heartbeats go on, and big write data travels
    through the socket."""

    async def main() -> None:
        stml = FakeStml(str(tmp_path / "stml"), version=(1, 1), caps=None, close_on_control=True)
        handler = Recorder()
        link = FrontEndLink(stml.endpoint, "test", handler, heartbeat_ms=100)
        link.start()
        try:
            await link.wait_ready(10)
            register = stml.messages[0][0]
            assert register["op"] == "register_target_front_end" and register["caps"] == ["write_region", "timing"]
            assert link.caps == frozenset() and link.shared_buffer(BIG) is None
            link.register_nexus(1, "iqn.2026-12.test:i,i,0x1", "iqn.2026-12.test:fake", 1)
            data = random.Random(1).randbytes(BIG)
            link.rx_cmnd(1, 1, 0, WRITE10, 0, 1, BIG, BIG, [memoryview(bytearray(data))])
            await until(lambda: handler.called("xmit_response"), "the answer")
            header, frames = next((h, f) for h, f in stml.messages if h["op"] == "rx_cmnd")
            assert frames == [data]                     # through the socket, not by reference
            # several heartbeat intervals later: still the first connection, no control message
            await until(lambda: stml.ops().count("heartbeat") >= 3, "three heartbeats")
            assert stml.accepts == 1 and stml.controls == [] and link.connected.is_set()
        finally:
            await link.close()
            stml.close()

    asyncio.run(main())


def test_a_front_end_sends_its_region_once_a_1_4_stml_grants_it(tmp_path: Path) -> None:
    """Granted in detect, the region follows the registration (never before it),
    and big write data from it travels as a reference."""

    async def main() -> None:
        stml = FakeStml(str(tmp_path / "stml"), version=(1, 4), caps=["write_region"],
                        close_on_control=False)
        handler = Recorder()
        link = FrontEndLink(stml.endpoint, "test", handler)
        link.start()
        try:
            await link.wait_ready(10)
            assert link.caps == {"write_region"}
            await until(lambda: stml.controls, "the region")
            assert stml.controls[0][0] == CONTROL_REGION
            view = link.shared_buffer(BIG)
            assert view is not None
            link.register_nexus(1, "iqn.2026-12.test:i,i,0x1", "iqn.2026-12.test:fake", 1)
            link.rx_cmnd(1, 1, 0, WRITE10, 0, 1, BIG, BIG, [view])
            await until(lambda: handler.called("xmit_response"), "the answer")
            frames = next(f for h, f in stml.messages if h["op"] == "rx_cmnd")
            assert frames[0][0] == "shared" and frames[0][2] == BIG
            assert stml.ops()[0] == "register_target_front_end" and stml.accepts == 1
        finally:
            await link.close()
            stml.close()

    asyncio.run(main())


def test_this_front_end_and_this_stml_agree_on_the_write_region(stml) -> None:
    """The real STML grants the region to a stream front end that offers it;
    write data lent from it lands on the LU intact."""

    async def main() -> None:
        handler = Recorder()
        link = FrontEndLink(stml.endpoint, "test", handler)
        link.start()
        try:
            detect = await link.wait_ready(10)
            assert link.caps == {"write_region"}
            assert isinstance(link._channel, StreamChannel) and link._channel.region_offered
            link.register_nexus(1, "iqn.2026-12.test:i,i,0x1", detect.targets[0].name, 1)
            await until(lambda: handler.called("nexus_ready"), "the nexus")
            data = random.Random(2).randbytes(BIG)
            for tag in (1, 2):     # the first may meet the power-on unit attention... or not
                view = link.shared_buffer(BIG)
                assert view is not None
                view[:] = data
                link.rx_cmnd(tag, 1, 0, WRITE10, 0, 1, BIG, BIG, [view])
                del view
            await until(lambda: len(handler.called("xmit_response")) == 2, "the writes")
            assert handler.called("xmit_response")[-1][1] == 0
            link.rx_cmnd(3, 1, 0, READ10, 0, 2, BIG)
            await until(lambda: len(handler.called("xmit_response")) == 3, "the read")
            tag, status, _, _, frames = handler.called("xmit_response")[-1]
            assert (tag, status) == (3, 0) and b"".join(bytes(f) for f in frames) == data
        finally:
            await link.close()

    asyncio.run(main())


def test_an_older_front_end_that_sends_its_region_first_is_served(stml) -> None:
    """A 1.2/1.3 front end sent its region as soon as it connected, and offered
    nothing: this STML maps it anyway, grants nothing, and takes write data by
    reference from it."""

    async def main() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(stream_path(stml.endpoint))
        got: list[tuple[dict, list]] = []
        region = SharedRegion(8 << 20, name="old-front-end")
        ch = StreamChannel(sock, lambda frames: got.append((unpack(frames[0]), [bytes(f) for f in frames[1:]])),
                           lambda: None, region=region)
        assert ch.offer_region()          # before registering, as 1.2 and 1.3 did
        ch.send([pack({"op": "register_target_front_end", "version": [1, 3], "kind": "old",
                       "name": "old-fe", "heartbeat_ms": 60_000, "aen": False})])
        await until(lambda: got, "detect")
        detect = got[0][0]
        assert detect["op"] == "detect" and detect["caps"] == [] and detect["version"] == list(CONTRACT_VERSION)
        ch.send([pack({"op": "register_nexus", "nexus": 1, "initiator": "iqn.2026-12.test:old,i,0x1",
                       "target": detect["targets"][0]["name"], "tpg": 1})])
        data = random.Random(3).randbytes(BIG)
        for tag in (1, 2):
            view = region.get(BIG)
            assert view is not None
            view[:] = data
            ch.send([pack({"op": "rx_cmnd", "tag": tag, "nexus": 1, "lun": 0, "cdb": WRITE10, "attr": 0,
                           "dir": 1, "len": BIG, "unsol": BIG}), view])
            del view
        ch.send([pack({"op": "rx_cmnd", "tag": 3, "nexus": 1, "lun": 0, "cdb": READ10, "attr": 0,
                       "dir": 2, "len": BIG, "unsol": 0})])
        await until(lambda: any(h.get("tag") == 3 for h, _ in got), "the read")
        answers = {h["tag"]: (h, f) for h, f in got if h["op"] == "xmit_response"}
        assert answers[2][0]["status"] == 0 and answers[3][0]["status"] == 0
        assert b"".join(answers[3][1]) == data
        ch.close()

    asyncio.run(main())
