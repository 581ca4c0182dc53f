"""Explicit release of the carriers' memory (docs/contract.md, "Buffer
ownership"): a shared slot or pooled buffer held by a command in flight is
never handed out again, and every one comes back after done, abort, a data
error and a front end killed mid-I/O.

The STML runs in this test's event loop (stml.server.StmlServer on an ipc
endpoint with its stream socket), so its regions and pool can be looked at;
front ends are real FrontEndLinks over the stream, or a loopback client in a
process of its own."""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from stml import config
from stml.api import FrontEndLink, StreamChannel, Tmf
from stml.server import StmlServer
from support.aio import until
from support.procs import stop_pid

KiB = 1 << 10
BIG = 128 * KiB
CHECK_CONDITION = 0x02


def cdb10(opcode: int, lba: int, nbytes: int) -> bytes:
    return struct.pack(">BBIBHB", opcode, 0, lba, 0, nbytes // 512, 0)


class FrontEnd:
    """A FrontEndLink and a handler that keeps every response (and its data,
    which stays valid until done() reports it)."""

    def __init__(self, endpoint: str) -> None:
        self.link = FrontEndLink(endpoint, "test", self, heartbeat_ms=60_000)
        self.responses: dict[int, tuple[int, bytes | None, list]] = {}
        self.r2t: dict[int, tuple[int, int]] = {}
        self.tmfs: dict[int, tuple[int, list[int]]] = {}
        self.nexus_up = asyncio.Event()

    async def open(self, target: str | None = None) -> FrontEnd:
        self.link.start()
        detect = await self.link.wait_ready(10)
        self.link.register_nexus(1, "iqn.2026-12.test:release,i,0x1", target or detect.targets[0].name, 1)
        await asyncio.wait_for(self.nexus_up.wait(), 10)
        return self

    # FrontEndHandler
    def detect(self, detect: Any) -> None:
        pass

    def nexus_ready(self, nexus: int, error: str | None) -> None:
        assert error is None, error
        self.nexus_up.set()

    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None:
        self.r2t[tag] = (offset, length)

    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int, data: list) -> None:
        self.responses[tag] = (status, sense, data)

    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int], info: bytes = b"") -> None:
        self.tmfs[tag] = (response, aborted)

    def report_aen(self, nexus: int | None, lun: int, sense: bytes) -> None:
        pass

    def link_lost(self) -> None:
        pass

    # commands
    async def answer(self, tag: int) -> tuple[int, bytes | None, list]:
        await until(lambda: tag in self.responses, f"the response to {tag}")
        return self.responses[tag]

    async def write(self, tag: int, lba: int, data: bytes, shared: bool = True) -> int:
        frame: Any = self.link.shared_buffer(len(data)) if shared else None
        if frame is None:
            frame = bytearray(data)
        else:
            frame[:] = data
        self.link.rx_cmnd(tag, 1, 0, cdb10(0x2A, lba, len(data)), 0, 1, len(data), len(data), [frame])
        if shared:
            self.link.release_buffer(frame)
        status, _, _ = await self.answer(tag)
        self.done(tag)
        return status

    async def read(self, tag: int, lba: int, n: int) -> list:
        """The read data, still lent: call done(tag) once it is no longer used."""
        self.link.rx_cmnd(tag, 1, 0, cdb10(0x28, lba, n), 0, 2, n)
        status, _, data = await self.answer(tag)
        assert status == 0
        return data

    def done(self, tag: int) -> None:
        self.link.scsi_target_done([tag])



@contextlib.asynccontextmanager
async def serving(directory: Path) -> AsyncIterator[StmlServer]:
    server = StmlServer(config.load(data_dir=str(directory / "data"), luns=("ram:64MiB",)))
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    await until(lambda: hasattr(server, "channel"), "the STML to serve")
    try:
        yield server
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def the_stream(server: StmlServer) -> StreamChannel:
    assert len(server.streams) == 1
    return next(iter(server.streams.values()))


def run(main: Any, tmp_short: Any) -> None:
    async def go() -> None:
        async with serving(tmp_short()) as server:
            await main(server)
    asyncio.run(go())


def test_read_data_stays_valid_until_done_however_many_reads_follow(tmp_short) -> None:
    """A front end holds read data lent from the STML's region until it says
    done: other reads (more than the region has slots of that size would need
    if nothing came back) never get its slot, so its bytes stay the same;
    once it says done, the slot comes back. Before explicit release the slot
    went back one loop turn after delivery, and a front end that sent later
    (fetd_tcp's flush) could send another command's data."""

    async def main(server: StmlServer) -> None:
        fe = await FrontEnd(server.endpoint).open()
        region = the_stream(server).region
        assert region is not None
        first = random.Random(1).randbytes(BIG)
        assert await fe.write(1, 0, first) == 0
        for i in range(8):
            assert await fe.write(10 + i, 1024 * (i + 1), bytes([i + 1]) * BIG) == 0
        held = await fe.read(100, 0, BIG)
        assert isinstance(held[0], memoryview) and held[0].readonly   # the STML's memory
        await asyncio.sleep(0.01)       # loop turns and release timers: it stays lent
        assert region.in_use() == 1
        for i in range(64):
            data = await fe.read(200 + i, 1024 * (i % 8 + 1), BIG)
            assert bytes(data[0]) == bytes([i % 8 + 1]) * BIG
            fe.done(200 + i)
        assert bytes(held[0]) == first
        await until(lambda: region.in_use() == 1, "the other reads' slots")
        fe.done(100)
        await until(lambda: region.in_use() == 0, "the held slot")
        await fe.link.close()

    run(main, tmp_short)


async def start_write(fe: FrontEnd, tag: int, data: bytes, total: int) -> Any:
    """A WRITE of `total` bytes whose first part comes as unsolicited shared data:
    the STML asks for the rest, and the command waits for it."""
    view = fe.link.shared_buffer(len(data))
    assert view is not None
    view[:] = data
    fe.link.rx_cmnd(tag, 1, 0, cdb10(0x2A, 0, total), 0, 1, total, len(data), [view])
    fe.link.release_buffer(view)
    await until(lambda: tag in fe.r2t, "rdy_to_xfer")
    return view


@pytest.mark.parametrize("end", ["completed", "aborted", "data-error"])
def test_write_data_stays_lent_while_its_command_runs_and_comes_back_when_it_ends(end: str,
                                                                                  tmp_short) -> None:
    """Write data a front end lends from its region stays with the STML while
    its command waits for the rest: the front end's region hands out other
    slots meanwhile (their bytes do not reach the command). When the command
    ends, completed, aborted (ABORT TASK) or failed by a data error, the slot
    comes back."""

    async def main(server: StmlServer) -> None:
        fe = await FrontEnd(server.endpoint).open()
        channel = fe.link._channel
        assert isinstance(channel, StreamChannel) and channel.region is not None
        region = channel.region
        first = random.Random(2).randbytes(64 * KiB)
        await start_write(fe, 1, first, 2 * 64 * KiB)
        await asyncio.sleep(0.01)
        assert region.in_use() == 1
        others = [fe.link.shared_buffer(64 * KiB) for _ in range(20)]   # meanwhile, on this side
        for view in others:
            assert view is not None
            view[:] = b"\xee" * len(view)
        assert region.in_use() == 21
        for view in others:
            fe.link.release_buffer(view)
        if end == "completed":
            fe.link.scsi_rx_data(1, 64 * KiB, [b"\x02" * 64 * KiB])
            assert (await fe.answer(1))[0] == 0
            fe.done(1)
            data = await fe.read(2, 0, 128 * KiB)
            assert bytes(data[0]) == first + b"\x02" * 64 * KiB
            fe.done(2)
        elif end == "aborted":
            fe.link.rx_task_mgmt_fn(9, 1, int(Tmf.ABORT_TASK), 0, 1)
            await until(lambda: 9 in fe.tmfs, "the abort")
            assert fe.tmfs[9] == (0, [1])
        else:
            fe.link.scsi_rx_data(1, 64 * KiB, [], error="DataSN out of order")
            status, sense, _ = await fe.answer(1)
            assert status == CHECK_CONDITION and sense is not None and sense[12] == 0x4B
            fe.done(1)
        stml_region = the_stream(server).region
        assert stml_region is not None
        await until(lambda: region.in_use() == 0 and stml_region.in_use() == 0, "the slots")
        assert server.pool.in_use() == 0
        await fe.link.close()

    run(main, tmp_short)


def test_big_write_data_through_the_socket_goes_back_to_the_pool(tmp_short) -> None:
    """Write data that is not shared (a front end without a region, or with
    it full) arrives in pooled buffers; each goes back when its command ends,
    completed or aborted, and is used again."""

    async def main(server: StmlServer) -> None:
        fe = await FrontEnd(server.endpoint).open()
        for tag in range(1, 9):
            assert await fe.write(tag, 0, bytes([tag]) * BIG, shared=False) == 0
        assert server.pool.in_use() == 0 and 0 < server.pool.kept <= 2 * BIG
        fe.link.rx_cmnd(20, 1, 0, cdb10(0x2A, 0, 2 * BIG), 0, 1, 2 * BIG, BIG, [bytes(BIG)])
        await until(lambda: 20 in fe.r2t, "rdy_to_xfer")
        assert server.pool.in_use() == 1
        fe.link.rx_task_mgmt_fn(21, 1, int(Tmf.ABORT_TASK), 0, 20)
        await until(lambda: 21 in fe.tmfs, "the abort")
        assert server.pool.in_use() == 0
        await fe.link.close()

    run(main, tmp_short)


WORKER = textwrap.dedent("""
    import os, struct, sys
    from fetd_loopback import LoopbackClient
    c = LoopbackClient(sys.argv[1], timeout=20, initiator="iqn.2026-12.test:doomed").open()
    data = os.urandom(256 * 1024)
    futs = []
    n = 0
    while True:
        lba = (n * 512) % 100000
        if n % 2:
            cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0)
            futs.append(c.submit(0, cdb, data_out=data))
        else:
            cdb = struct.pack(">BBQIBB", 0x88, 0, lba, len(data) // 512, 0, 0)
            futs.append(c.submit(0, cdb, data_in=len(data)))
        n += 1
        if len(futs) >= 16:
            futs.pop(0).result(20)
            if n == 64:
                print("busy", flush=True)
""")


def test_every_slot_and_buffer_comes_back_after_a_front_end_is_killed(tmp_short) -> None:
    """A loopback front end in its own process, 16 big reads and writes in
    flight, is killed (SIGKILL): the STML releases it, and once its commands
    are gone every slot of the region it had been lent and every pooled
    buffer its writes arrived in is free again."""

    async def main(server: StmlServer) -> None:
        out = tmp_short() / "worker.out"
        with open(out, "wb") as f:
            worker = subprocess.Popen([sys.executable, "-c", WORKER, server.endpoint], stdout=f,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            await until(lambda: b"busy" in out.read_bytes() or worker.poll() is not None, "the worker")
            assert worker.poll() is None, out.read_text()
            stream = the_stream(server)
            region = stream.region
            assert region is not None
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)
        finally:
            stop_pid(worker)
        await until(lambda: not server.streams and not server.emulator.front_ends, "the release")
        await until(lambda: region.in_use() == 0 and server.pool.in_use() == 0,
                    f"the memory back (region {region.in_use()}, pool {server.pool.in_use()})")

    run(main, tmp_short)


def test_fetd_spi_says_done_once_it_has_copied_the_read_data(tmp_short) -> None:
    """fetd_spi's executor copies each response's data into its outcome and
    says scsi_target_done then: big reads through it leave no slot of the
    STML's region lent (without done, each stayed with the front end)."""
    import simpy

    from fetd_spi.bus import Command
    from fetd_spi.frontend import StmlExecutor

    async def main(server: StmlServer) -> None:
        ex = StmlExecutor(server.endpoint)
        await ex.open({1: "iqn.2026-12.test:spi,i,0x1"})
        ex.env = simpy.Environment()
        region = the_stream(server).region
        assert region is not None

        async def run(cmd: Command) -> Any:
            ex.submit(cmd)
            event = ex.outcome(cmd)
            await until(lambda: event.triggered, f"the outcome of {cmd.tag}")
            return event.value

        try:
            for i in range(4):
                data = random.Random(i).randbytes(BIG)
                lba = i * (BIG // 512)
                assert (await run(Command(1, 2 * i, 0, cdb10(0x2A, lba, BIG), data_out=data))).status == 0
                answer = await run(Command(1, 2 * i + 1, 0, cdb10(0x28, lba, BIG), data_in_len=BIG))
                assert (answer.status, answer.data) == (0, data)
            await until(lambda: region.in_use() == 0, f"the read slots back ({region.in_use()} lent)")
        finally:
            await ex.close()

    run(main, tmp_short)
