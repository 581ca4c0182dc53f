"""A front end's release (its connection closed, it deregistered, it went
silent, a gateway stood down) drops its nexuses (8,192 at most) and aborts
its tasks FANOUT_STEP per turn of the event loop (docs/decisions/0222).
The tests count the nexuses and tasks left after each turn, and check that
a registration from the same front end meanwhile is answered once the
release is over, so that none of its commands meets the old one's state."""
from __future__ import annotations

import asyncio
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from backends.ram import RamBackend
from stml import config
from stml import emulator as E
from stml.api import CONTRACT_VERSION, DataDir, Op, pack
from stml.emulator import Emulator, Target
from stml.gateway import Gateway
from stml.lu import LogicalUnit, LunOptions
from stml.sense import I_T_NEXUS_LOSS, parse_sense
from stml.server import StmlServer

T = "iqn.2026-12.org.test:release"
NEXUSES = 3 * E.FANOUT_STEP + 10
WAITING = E.FANOUT_STEP + 5          # writes waiting for their data
WRITE = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)


def setup(fronts: tuple[bytes, ...] = (b"fe",)) -> tuple[Emulator, list[tuple[bytes, dict[str, Any]]]]:
    sent: list[tuple[bytes, dict[str, Any]]] = []
    em = Emulator([], lambda ident, h, frames: sent.append((ident, h)), ThreadPoolExecutor(1))
    o = LunOptions("ram", size=1 << 20)
    em.targets[T] = Target(T, {0: LogicalUnit(T, 0, RamBackend(o.size), o, em.templates["disk"])})
    for ident in fronts:
        register(em, ident)
        for n in range(1, NEXUSES + 1):
            em.handle(ident, {"op": Op.REGISTER_NEXUS, "nexus": n, "initiator": f"iqn.2026-12.org.test:{n}",
                              "target": T, "tpg": len(ident)}, [])
        for tag in range(1, WAITING + 1):   # unsolicited: none; each waits for rdy_to_xfer's data
            command(em, ident, tag, 1 + tag % NEXUSES, WRITE, DataDir.WRITE, 512)
    sent.clear()
    return em, sent


def register(em: Emulator, ident: bytes) -> None:
    em.handle(ident, {"op": Op.REGISTER, "version": list(CONTRACT_VERSION), "kind": "test", "name": "t"}, [])


def command(em: Emulator, ident: bytes, tag: int, nexus: int, cdb: bytes = bytes(6),
            direction: DataDir = DataDir.NONE, length: int = 0) -> None:
    em.handle(ident, {"op": Op.RX_CMND, "nexus": nexus, "tag": tag, "lun": 0, "cdb": cdb, "attr": 0,
                      "dir": int(direction), "len": length, "unsol": 0}, [])


async def left_per_turn(em: Emulator, fes: list, release: Any) -> list[int]:
    """Nexuses and tasks of `fes` left before, then after the release call
    and after each turn of the loop until none is left."""
    def left() -> int:
        return sum(len(fe.nexuses) + len(fe.tasks) for fe in fes)
    counts = [left()]
    release()
    counts.append(left())
    while counts[-1]:
        await asyncio.sleep(0)
        counts.append(left())
    return [a - b for a, b in zip(counts, counts[1:])]


def test_a_front_end_is_released_in_steps():
    """Its connection closed: NEXUSES nexuses and WAITING tasks went in one
    step of the loop; now at most FANOUT_STEP of them per turn, and in the
    end every nexus is gone (its key remembered as lost) and no task was
    answered (aborted by their own nexus's loss: no status)."""
    async def main() -> None:
        em, sent = setup()
        fe = em.front_ends[b"fe"]
        steps = await left_per_turn(em, [fe], lambda: em.release_front_end(fe, "its connection closed"))
        assert max(steps) <= E.FANOUT_STEP and len([s for s in steps if s]) > NEXUSES // E.FANOUT_STEP
        await asyncio.sleep(0)
        assert not em.nexus_keys(T) and len(em.targets[T].lost) == NEXUSES
        assert [h["op"] for _, h in sent] == []
    asyncio.run(main())


def test_a_gateway_standing_down_releases_its_front_ends_in_steps():
    """A gateway that stands down releases every front end: three front ends
    of NEXUSES nexuses each went in one step; FANOUT_STEP per turn now, each
    told to go at once."""
    async def main() -> None:
        em, sent = setup((b"a", b"bb", b"ccc"))
        fes = list(em.front_ends.values())
        gw = Gateway(em, ThreadPoolExecutor(1))
        steps = await left_per_turn(em, fes, lambda: gw._stand_by("fenced"))
        assert max(steps) <= E.FANOUT_STEP and len([s for s in steps if s]) > 3 * NEXUSES // E.FANOUT_STEP
        assert [(ident, h["op"]) for ident, h in sent] == [(b"a", Op.RELEASE), (b"bb", Op.RELEASE),
                                                           (b"ccc", Op.RELEASE)]
        assert not em.front_ends and not em.nexus_keys(T)
    asyncio.run(main())


def test_a_front_end_registering_again_mid_release_is_answered_once_it_is_over():
    """The same front end registers again while its release steps: its
    detect waits for the end of the release, so its nexuses and commands
    never meet the old ones (a tag of an old write is answered once, for the
    new command; an I_T nexus registered again hears I_T NEXUS LOSS)."""
    async def main() -> None:
        em, sent = setup()
        fe = em.front_ends[b"fe"]
        em.release_front_end(fe, "silent")
        assert fe.nexuses   # more than a step's worth: the rest in later turns
        register(em, b"fe")
        assert [h["op"] for _, h in sent] == [] and em.takes(b"fe") and b"fe" not in em.front_ends
        while fe.nexuses or fe.tasks:
            await asyncio.sleep(0)
        assert [h["op"] for _, h in sent] == [Op.DETECT] and em.front_ends[b"fe"] is not fe
        sent.clear()
        em.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": 1, "initiator": "iqn.2026-12.org.test:2",
                          "target": T, "tpg": 2}, [])
        for _ in range(3):
            await asyncio.sleep(0)
        command(em, b"fe", 1, 1)   # tag 1: an old write's, aborted
        for _ in range(3):
            await asyncio.sleep(0)
        answers = [h for _, h in sent if h["op"] == Op.XMIT_RESPONSE]
        assert len(answers) == 1 and answers[0]["tag"] == 1
        assert parse_sense(answers[0]["sense"])[1:] == I_T_NEXUS_LOSS
    asyncio.run(main())


def test_a_registration_waiting_for_a_release_whose_callback_raises_is_still_answered():
    """The end of a release tells the metrics (on_front_end_gone); if that
    raises, the registration of the same ident that waited for the release
    is answered all the same, not parked for good (review 12)."""
    async def main() -> None:
        em, sent = setup()
        fe = em.front_ends[b"fe"]

        def broken(ident: bytes) -> None:
            raise RuntimeError("metrics broke")
        em.on_front_end_gone = broken
        em.release_front_end(fe, "silent")
        register(em, b"fe")
        while fe.nexuses or fe.tasks:
            await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)
        assert [h["op"] for _, h in sent] == [Op.DETECT] and em.front_ends[b"fe"] is not fe
        assert not em._waiting
    asyncio.run(main())


class _CountedTasks(dict):
    """A front end's tasks, counting the ones a walk of them visits."""
    walked = 0

    def values(self):  # type: ignore[override]
        for task in super().values():
            self.walked += 1
            yield task

    def items(self):  # type: ignore[override]
        for item in super().items():
            self.walked += 1
            yield item

    def __iter__(self):
        for tag in super().__iter__():
            self.walked += 1
            yield tag


def test_a_nexus_ends_with_its_own_tasks_not_a_walk_of_its_front_ends():
    """A nexus released (scsi_release) or registered again under its id
    aborts its own tasks: its front end's other waiting writes are not
    looked at (0239), and they stay."""
    async def main() -> None:
        em, sent = setup()
        fe = em.front_ends[b"fe"]
        waiting = set(fe.tasks)   # (those the LU's queue depth took)
        fe.tasks = counted = _CountedTasks(fe.tasks)
        em.handle(b"fe", {"op": Op.RELEASE_NEXUS, "nexus": 2}, [])   # tag 1's nexus
        em.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": 3, "initiator": "iqn.2026-12.org.test:3",
                          "target": T, "tpg": len(b"fe")}, [])      # tag 2's, again
        for _ in range(3):
            await asyncio.sleep(0)
        assert counted.walked == 0
        assert {1, 2} < waiting and set(dict(fe.tasks)) == waiting - {1, 2}
        assert not fe.nexuses[3].tasks and fe.nexuses[4].tasks == {3: fe.tasks[3]}
    asyncio.run(main())


def test_a_gateway_standing_down_lets_its_locks_go_once_every_task_is_aborted():
    """Standing down releases front ends in steps (0222); the locks go only
    after the last step, so no queued task of a released front end can start
    a backend call once another gateway may hold the image (review 12)."""
    from stml import gateway as G

    async def main() -> None:
        em, sent = setup((b"a", b"bb"))
        fes = list(em.front_ends.values())
        gw = Gateway(em, ThreadPoolExecutor(1))
        left: list[int] = []
        gw._release_all = lambda lus: left.append(sum(len(fe.tasks) + len(fe.nexuses) for fe in fes))
        gw.role = G.ACTIVE
        runner = asyncio.ensure_future(gw._run())
        await asyncio.sleep(0)
        gw.step_down("fenced")
        while not left:
            await asyncio.sleep(0)
        runner.cancel()
        assert left == [0]
        assert 2 * NEXUSES > E.FANOUT_STEP   # (more than one step: the case that raced)
    asyncio.run(main())


class _Carrier:
    """What StmlServer asks of a carrier, by hand: ZeroMQ's channel (the
    connection a message came on is number 7) or a peer's stream."""
    frame = None
    region = None

    def __init__(self) -> None:
        self.sent: list[list] = []

    def send(self, message: list) -> None:
        self.sent.append(message)

    def connection(self) -> int:
        return 7

    def poll_connections(self) -> None:
        pass

    def user_id(self) -> None:
        return None   # (no CURVE)

    def peer_address(self) -> str:
        return "127.0.0.1"


@pytest.mark.parametrize("carrier", ["zeromq", "stream"])
def test_a_registration_waiting_for_a_release_is_dropped_when_its_connection_ends(tmp_path: Path, carrier: str):
    """A front end deregisters (released in steps), registers again (it waits
    for the release, 0222) and its connection ends: when the release is over
    nobody is registered under its ident and no detect goes out (0248); it
    would have held a front end's place until liveness dropped it."""
    async def main() -> None:
        server = StmlServer(config.load(data_dir=str(tmp_path / "data"), luns=("ram:1MiB",)))
        try:
            ident, em, wire = b"fe", server.emulator, _Carrier()
            if carrier == "zeromq":
                server.channel = wire   # type: ignore[assignment]
            else:
                ident = b"\0stream-1"
                server.streams[ident] = wire   # type: ignore[assignment]
            target = next(iter(em.targets))
            registration = pack({"op": Op.REGISTER.value, "name": "fe", "kind": "test",
                                 "version": list(CONTRACT_VERSION)})
            server.received([ident, registration])
            for n in range(1, NEXUSES + 1):
                server.received([ident, pack({"op": Op.REGISTER_NEXUS.value, "nexus": n, "initiator":
                                              f"iqn.2026-12.org.test:{n}", "target": target, "tpg": 1})])
            fe = em.front_ends[ident]
            server.received([ident, pack({"op": Op.DEREGISTER.value})])
            assert fe.nexuses   # (more than a step's worth: the rest in later turns)
            server.received([ident, registration])
            assert em.takes(ident)
            if carrier == "zeromq":
                server._connection_closed(7)
            else:
                server._stream_closed(ident)
            wire.sent.clear()
            while fe.nexuses:
                await asyncio.sleep(0)
            for _ in range(3):
                await asyncio.sleep(0)
            assert ident not in em.front_ends and not em.takes(ident) and wire.sent == []
        finally:
            server.sock.close(linger=0)
            server.ctx.term()
            server.executor.shutdown()
    asyncio.run(main())
