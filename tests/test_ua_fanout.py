"""Unit attentions that go to every I_T nexus of a target are set in bounded
steps (docs/decisions/0264): MODE SELECT's MODE PARAMETERS CHANGED, LUN
RESET's BUS DEVICE RESET, a shared image's CAPACITY DATA HAS CHANGED and
PERSISTENT RESERVE OUT CLEAR's RESERVATIONS PREEMPTED, with 3,000 nexuses on
one LU. Each test counts the nexus entries set per turn
of the event loop (never more than FANOUT_STEP), checks that every nexus has
its unit attention in the end, and that a command arriving mid-fan-out is
answered either with the unit attention or without it, never otherwise."""
from __future__ import annotations

import asyncio
import gc
import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable

from backends.ram import RamBackend
from stml import emulator as E
from stml.api import DataDir, Op, Tmf, TmfResponse
from stml.gateway import Gateway
from stml.sense import (BUS_DEVICE_RESET, CAPACITY_DATA_CHANGED, MODE_PARAMETERS_CHANGED,
                        RESERVATIONS_PREEMPTED)
from support.sbc_harness import Harness, Result

OTHERS = 3000            # nexuses besides nexus 1, the one that acts
GOOD, CHECK_CONDITION = 0, 2
UNIT_ATTENTION = 0x6


class Fanout(Harness):
    """The in-process STML with OTHERS + 1 nexuses on its one LU; TMF answers kept."""

    def __init__(self) -> None:
        self.tmf_done: list[dict[str, Any]] = []
        super().__init__()
        for n in range(2, OTHERS + 2):
            self.nexus(n, f"iqn.init:n{n}")
        assert len(self.emulator.nexus_keys(self.lu().target)) == OTHERS + 1

    def _send(self, ident: bytes, h: dict[str, Any], frames: list) -> None:
        if h["op"] == Op.TMF_DONE:
            self.tmf_done.append(h)
        else:
            super()._send(ident, h, frames)

    def tur_now(self, nexus: int) -> Result:
        """TEST UNIT READY, answered within this turn of the loop (it never waits)."""
        self.tag += 1
        fut = self.pending[self.tag] = asyncio.get_running_loop().create_future()
        self.emulator.handle(b"fe", {"op": Op.RX_CMND, "nexus": nexus, "tag": self.tag, "lun": 0,
                                     "cdb": bytes(16), "attr": 0, "dir": int(DataDir.NONE), "len": 0,
                                     "unsol": 0}, [])
        assert fut.done()
        return fut.result()

    def set_count(self) -> int:
        return sum(len(q) for q in self.lu().unit_attentions.values())


async def stepped(h: Fanout, change: Awaitable[Any], asc: tuple[int, int]) -> tuple[Any, list[int]]:
    """Run `change`, counting the unit attentions set after each turn of the
    loop; mid-way, the first and the last nexus send TEST UNIT READY."""
    runner = asyncio.ensure_future(change)
    counts = [h.set_count()]
    midway: list[Result] = []
    while not runner.done():
        await asyncio.sleep(0)
        counts.append(h.set_count())
        if not midway and 0 < counts[-1] < OTHERS // 2:
            midway = [h.tur_now(2), h.tur_now(OTHERS + 1)]
    assert len(midway) == 2, "the fan-out ended before any command could arrive mid-way"
    for r in midway:
        assert r.status == GOOD or (r.status == CHECK_CONDITION and r.key_asc == (UNIT_ATTENTION, *asc)), r
    # the first nexus's unit attention is set in the first step, the last one's not yet
    assert [r.status for r in midway] == [CHECK_CONDITION, GOOD]
    return runner.result(), counts


def check_steps(counts: list[int]) -> None:
    growth = [b - a for a, b in zip(counts, counts[1:])]
    assert max(growth) <= E.FANOUT_STEP                 # never 3,000 in one turn
    assert sum(1 for g in growth if g > 0) >= OTHERS // E.FANOUT_STEP


def check_all_told(h: Fanout, asc: tuple[int, int], told_by_command: set[int], actor_told: bool) -> None:
    """Every nexus has the unit attention pending, but those whose command
    reported it mid-way and (unless `actor_told`) nexus 1."""
    uas = h.lu().unit_attentions
    for n in range(1, OTHERS + 2):
        key = f"iqn.init:{'one' if n == 1 else f'n{n}'}|{h.lu().target},t,1"
        want = [asc] if (n != 1 or actor_told) and n not in told_by_command else None
        assert uas.get(key) == want, n


def test_mode_select_tells_3000_nexuses_in_bounded_steps():
    async def go() -> None:
        h = Fanout()
        page = bytearray((await h.cmd(bytes([0x1A, 0x08, 0x08, 0, 255, 0]))).data[4:])
        page[2] |= 0x04   # WCE
        r, counts = await stepped(h, h.cmd(bytes([0x15, 0x10, 0, 0, 4 + len(page), 0]), bytes(4) + page),
                                  MODE_PARAMETERS_CHANGED)
        assert r.status == GOOD and h.lu().mode.wce
        check_steps(counts)
        check_all_told(h, MODE_PARAMETERS_CHANGED, {2}, actor_told=False)
        assert (await h.cmd(bytes(6), no_data=True, nexus=OTHERS + 1)).key_asc == (UNIT_ATTENTION, 0x2A, 0x01)
    asyncio.run(go())


def test_an_aborted_mode_select_still_tells_every_nexus():
    """The change is made once MODE SELECT applies it: an ABORT TASK of the
    command mid-fan-out does not cut the fan-out short."""
    async def go() -> None:
        h = Fanout()
        page = bytearray((await h.cmd(bytes([0x1A, 0x08, 0x08, 0, 255, 0]))).data[4:])
        page[2] |= 0x04
        select = asyncio.ensure_future(h.cmd(bytes([0x15, 0x10, 0, 0, 4 + len(page), 0]), bytes(4) + page))
        while h.set_count() == 0:
            await asyncio.sleep(0)
        assert h.set_count() < OTHERS
        h.emulator.handle(b"fe", {"op": Op.RX_TMF, "tag": 9999, "nexus": 1, "fn": int(Tmf.ABORT_TASK),
                                  "lun": 0, "ref": h.tag}, [])
        while not h.tmf_done:
            await asyncio.sleep(0)
        assert h.tmf_done[0]["response"] == TmfResponse.COMPLETE and h.tmf_done[0]["aborted"] == [h.tag]
        assert not select.done()    # aborted by its own nexus: it ends without a status
        select.cancel()
        for _ in range(OTHERS // E.FANOUT_STEP + 2):
            await asyncio.sleep(0)
        assert h.lu().mode.wce
        check_all_told(h, MODE_PARAMETERS_CHANGED, set(), actor_told=False)
    asyncio.run(go())


def test_an_aborted_mode_selects_failed_fan_out_is_logged_once(caplog):
    """A fan-out that fails once its MODE SELECT was aborted has no command to
    fail: its error is one log line, not a task nobody awaits any more, which
    the GC finds and logs ("exception was never retrieved") from wherever it
    then runs (stml.task.must_finish)."""
    async def go() -> None:
        h = Harness()
        h.nexus(2, "iqn.init:two")
        started, go_on = asyncio.Event(), asyncio.Event()

        async def failing(*args: Any, **kw: Any) -> None:
            started.set()
            await go_on.wait()
            raise RuntimeError("the fan-out broke")
        h.emulator.fan_out_ua = failing   # type: ignore[method-assign]
        page = bytearray((await h.cmd(bytes([0x1A, 0x08, 0x08, 0, 255, 0]))).data[4:])
        page[2] |= 0x04
        select = asyncio.ensure_future(h.cmd(bytes([0x15, 0x10, 0, 0, 4 + len(page), 0]), bytes(4) + page))
        await asyncio.wait_for(started.wait(), 10)
        task = h.emulator.front_ends[b"fe"].tasks[h.tag]
        h.emulator.handle(b"fe", {"op": Op.RX_TMF, "tag": 9999, "nexus": 1, "fn": int(Tmf.ABORT_TASK),
                                  "lun": 0, "ref": h.tag}, [])
        while h.tag in h.emulator.front_ends[b"fe"].tasks:
            await asyncio.sleep(0)
        assert task.runner is None and h.lu().mode.wce   # aborted, its change made
        select.cancel()   # (aborted by its own nexus: no status comes)
        go_on.set()
        for _ in range(4):
            await asyncio.sleep(0)
    caplog.set_level(logging.WARNING)
    asyncio.run(go())
    gc.collect()
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("stml", "MODE SELECT on iqn.2026-11.org.test:disk LUN 0, aborted: not every nexus was told "
                 "of its change: the fan-out broke")]


def test_lun_reset_tells_3000_nexuses_in_bounded_steps_before_it_answers():
    async def go() -> None:
        h = Fanout()

        async def reset() -> list[dict[str, Any]]:
            h.emulator.handle(b"fe", {"op": Op.RX_TMF, "tag": 7777, "nexus": 1, "fn": int(Tmf.LUN_RESET),
                                      "lun": 0, "ref": None}, [])
            while not h.tmf_done:
                await asyncio.sleep(0)
            return h.tmf_done
        done, counts = await stepped(h, reset(), BUS_DEVICE_RESET)
        assert [d["response"] for d in done] == [TmfResponse.COMPLETE]
        check_steps(counts)
        assert counts[-1] == OTHERS + 1 - 1      # all set (nexus 2 took its own) when the answer left
        check_all_told(h, BUS_DEVICE_RESET, {2}, actor_told=True)
    asyncio.run(go())


class GrowingImage(RamBackend):
    """A shared image another gateway resized (what Gateway._resized asks of it)."""
    spec = "rbd/img"

    def refresh_size(self) -> int:
        self.resize(2 * self.size())
        return self.size()


def test_a_resized_image_tells_3000_nexuses_in_bounded_steps():
    async def go() -> None:
        h = Fanout()
        lu = h.lu()
        lu.backend = GrowingImage(lu.backend.size())
        gw = Gateway(h.emulator, ThreadPoolExecutor(1))
        gw._sizes[lu] = lu.backend.size()
        _, counts = await stepped(h, gw._resized(lu), CAPACITY_DATA_CHANGED)
        check_steps(counts)
        check_all_told(h, CAPACITY_DATA_CHANGED, {2}, actor_told=True)
        r = await h.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), alloc=32, nexus=OTHERS + 1)
        assert r.key_asc == (UNIT_ATTENTION, *CAPACITY_DATA_CHANGED)
    asyncio.run(go())


def prout(sa: int, key: int, sark: int = 0) -> tuple[bytes, bytes]:
    """A PERSISTENT RESERVE OUT CDB and its 24-byte parameter list."""
    return struct.pack(">BBBxxIxB", 0x5F, sa, 0, 24, 0)[:10], struct.pack(">QQ8x", key, sark)


def test_a_reservation_clear_walks_and_tells_nexuses_in_bounded_steps():
    """CLEAR tells every registrant (here 600, one I_T nexus each) among
    3,001 nexuses: the walk of the target's nexuses and the unit attentions
    both go at most FANOUT_STEP per turn of the loop."""
    registrants = 600

    async def go() -> None:
        h = Fanout()
        for n in [1, *range(2, registrants + 2)]:
            r = await h.cmd(*prout(0x00, 0, 0x1000 + n), nexus=n)
            assert r.status == GOOD, r
        assert h.set_count() == 0
        runner = asyncio.ensure_future(h.cmd(*prout(0x03, 0x1001), nexus=1))
        counts, turns = [0], 0
        while not runner.done():
            await asyncio.sleep(0)
            turns += 1
            counts.append(h.set_count())
        assert runner.result().status == GOOD
        growth = [b - a for a, b in zip(counts, counts[1:])]
        assert max(growth) <= E.FANOUT_STEP and sum(1 for g in growth if g) >= registrants // E.FANOUT_STEP
        assert turns > (OTHERS + 1) // E.FANOUT_STEP     # the walk yielded too
        uas = h.lu().unit_attentions
        told = {k for k, q in uas.items() if q == [RESERVATIONS_PREEMPTED]}
        assert told == {f"iqn.init:n{n}|{h.lu().target},t,1" for n in range(2, registrants + 2)}
    asyncio.run(go())


def test_an_aborted_clear_still_tells_every_registrant():
    """CLEAR has removed the registrations when its walk of 3,001 nexuses
    yields; an ABORT TASK of it then must not cut the unit attentions short
    (the change is made: PROUT's commit is shielded, as MODE SELECT's)."""
    registrants = 600

    async def go() -> None:
        h = Fanout()
        for n in [1, *range(2, registrants + 2)]:
            assert (await h.cmd(*prout(0x00, 0, 0x1000 + n), nexus=n)).status == GOOD
        clear = asyncio.ensure_future(h.cmd(*prout(0x03, 0x1001), nexus=1))
        while h.lu().pr is None or h.lu().pr.regs:   # until CLEAR has removed the registrations
            await asyncio.sleep(0)
        assert not clear.done()                      # the walk yields
        h.emulator.handle(b"fe", {"op": Op.RX_TMF, "tag": 9999, "nexus": 1, "fn": int(Tmf.ABORT_TASK),
                                  "lun": 0, "ref": h.tag}, [])
        while not h.tmf_done:
            await asyncio.sleep(0)
        assert h.tmf_done[0]["aborted"] == [h.tag]
        clear.cancel()
        for _ in range(OTHERS // E.FANOUT_STEP + 4):
            await asyncio.sleep(0)
        told = {k for k, q in h.lu().unit_attentions.items() if q == [RESERVATIONS_PREEMPTED]}
        assert told == {f"iqn.init:n{n}|{h.lu().target},t,1" for n in range(2, registrants + 2)}
    asyncio.run(go())
