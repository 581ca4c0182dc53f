"""Bounded work per request, at the level of backends and handlers (issue 18):
costs are counted (lseeks, binary searches, backend calls and their sizes,
loop turns, threads held), never timed. The same findings are also sent
through real front ends in test_bounded_e2e.py."""
from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import backends.file as file_mod
from backends.file import FileBackend
import backends.ram as ram_mod
from backends.ram import PAGE, RamBackend
from stml.api import Op, Tmf
from stml.config import ConfigError, lun_options
from stml.emulator import Target
from stml.lu import IEEE_COMPANY_ID, CopyResults, LogicalUnit, LunOptions
from stml.sense import GOOD, ILLEGAL_REQUEST, parse_sense
from stml.workers import FairWorkers
from support.faults import on_disk
from support.sbc_harness import TARGET, Harness, cscd, fragment, run, unmap

BS = 512
MAX_XFER = (8 << 20) // BS   # the harness STML's maximum transfer, in blocks


def _read16(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0)


def _write16(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, n, 0, 0)


def _verify16(lba: int, n: int, bytchk: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8F, bytchk << 1, lba, n, 0, 0)


def _gls(lba: int, alloc: int) -> bytes:
    return bytes([0x9E, 0x12]) + struct.pack(">QI", lba, alloc) + bytes(2)


class Counter:
    """Wraps a function and counts its calls (and their sizes, if asked)."""

    def __init__(self, fn, size=None) -> None:
        self.fn, self.size, self.calls, self.sizes = fn, size, 0, []

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.size:
            self.sizes.append(self.size(*args, **kw))
        return self.fn(*args, **kw)


# ---------------------------------------------------------------- GET LBA STATUS: backends

def test_file_extent_walk_stops_at_the_limit(tmp_path, monkeypatch):
    path = str(tmp_path / "frag.img")
    fragment(path, 2000)
    f = FileBackend(path)
    seeks = Counter(os.lseek)
    monkeypatch.setattr(file_mod.os, "lseek", seeks)
    whole = f.mapped_extents(0, f.size(), 1 << 20)
    assert len(whole) == 4000 and seeks.calls >= 3999   # what an unbounded walk costs
    for limit in (1, 2, 10):
        seeks.calls = 0
        runs = f.mapped_extents(0, f.size(), limit)
        assert runs == whole[:limit]
        assert seeks.calls <= limit + 1
    f.close()


def test_ram_extent_walk_is_bounded_by_runs_not_pages(monkeypatch):
    ram = RamBackend(1 << 40)    # a million pages, none allocated
    for idx in (5, 6, 7, 100, 1 << 19):
        ram.write_from(idx * PAGE, [memoryview(b"x")], False)
    searches = Counter(ram_mod.bisect_left)
    monkeypatch.setattr(ram_mod, "bisect_left", searches)
    runs = ram.mapped_extents(0, 1 << 40, 1000)
    assert runs == [(0, 5 * PAGE, False), (5 * PAGE, 3 * PAGE, True), (8 * PAGE, 92 * PAGE, False),
                    (100 * PAGE, PAGE, True), (101 * PAGE, ((1 << 19) - 101) * PAGE, False),
                    ((1 << 19) * PAGE, PAGE, True), (((1 << 19) + 1) * PAGE, (1 << 40) - ((1 << 19) + 1) * PAGE, False)]
    assert searches.calls == len(runs)
    searches.calls = 0
    assert ram.mapped_extents(5 * PAGE + 7, 1 << 30, 1) == [(5 * PAGE + 7, 3 * PAGE - 7, True)]
    assert searches.calls == 1


def test_ram_discard_visits_allocated_pages_only(monkeypatch):
    ram = RamBackend(1 << 40)
    ram.write_from(3 * PAGE, [memoryview(b"y" * 10)], False)
    spans = Counter(ram._spans)
    monkeypatch.setattr(ram, "_spans", spans)
    ram.discard(0, 1 << 40)
    assert spans.calls == 0 and ram.allocated() == 0
    assert ram.mapped_extents(0, 1 << 40, 4) == [(0, 1 << 40, False)]


def test_get_lba_status_asks_the_backend_for_the_descriptors_it_returns():
    async def go():
        h = Harness([LunOptions("ram", size=64 * PAGE)])
        backend = h.lu().backend
        for i in range(0, 64, 2):                  # 32 mapped pages, 32 holes between
            backend.write_from(i * PAGE, [memoryview(b"z")], False)
        calls = []
        real = backend.mapped_extents
        backend.mapped_extents = lambda off, length, limit: calls.append(limit) or real(off, length, limit)
        r = await h.cmd(_gls(0, 8 + 16))
        assert r.status == GOOD and calls == [1]
        n = struct.unpack_from(">I", r.data)[0]
        assert n == 4 + 16 and struct.unpack_from(">QIB", r.data, 8)[2] == 0   # mapped
        r = await h.cmd(_gls(0, 8 + 16 * 5))
        assert calls[-1] == 5 and struct.unpack_from(">I", r.data)[0] == 4 + 16 * 5
        r = await h.cmd(_gls(0, 1 << 30))          # a huge allocation length: capped
        assert calls[-1] == 1024
    run(go())


def _file_lu(h: Harness, path: str) -> LogicalUnit:
    """Replace the harness's LU 0 with a thin LU on the file at `path`."""
    lu = LogicalUnit(TARGET, 0, FileBackend(path), LunOptions("file", path=path),
                     h.emulator.templates["disk"])
    h.emulator.targets[TARGET].luns[0] = lu
    return lu


def _descriptors(data: bytes) -> list[tuple[int, int, int]]:
    n = (struct.unpack_from(">I", data)[0] - 4) // 16
    return [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range(n)]


def test_get_lba_status_for_a_few_descriptors_needs_no_worker_thread(tmp_path):
    """qemu asks for one descriptor before every read of 32 KiB or more on a
    thin LUN: a few lseeks answer it on the loop, not a worker thread's two
    wake-ups; more descriptors than that still go to a thread."""
    path = str(tmp_path / "frag.img")
    fragment(path, 200)   # 4 KiB mapped, 4 KiB hole, ...

    async def go():
        h = Harness()
        lu = _file_lu(h, path)
        await h.cmd(_gls(0, 8 + 16))           # the unit attention of the new LU, if any
        calls = Counter(h.emulator.workers.run)
        h.emulator.workers.run = calls
        r = await h.cmd(_gls(0, 8 + 16))
        assert r.status == GOOD and _descriptors(r.data) == [(0, 8, 0)]
        r = await h.cmd(_gls(12, 8 + 16 * file_mod._INLINE_RUNS))
        assert _descriptors(r.data) == [(12, 4, 1)] + [(16 + 8 * i, 8, i % 2) for i in range(7)]
        assert calls.calls == 0
        r = await h.cmd(_gls(12, 8 + 16 * (file_mod._INLINE_RUNS + 1)))
        assert _descriptors(r.data) == [(12, 4, 1)] + [(16 + 8 * i, 8, i % 2) for i in range(8)]
        assert calls.calls == 1
        lu.backend.close()
    run(go())


@pytest.mark.parametrize("call", ["write", "discard", "resize"])
def test_lookups_go_to_threads_while_a_change_of_the_file_runs_in_one(tmp_path, monkeypatch, call):
    """A write, hole punch or truncate in a worker thread holds the file's
    inode lock, which an lseek waits for: no lookup is made on the loop
    meanwhile, and once it is done they are again."""
    path = str(tmp_path / "frag.img")
    fragment(path, 16)
    f = FileBackend(path)
    entered, release = threading.Event(), threading.Event()

    def held(real):
        def wait_then(*args):
            entered.set()
            release.wait(30)
            return real(*args)
        return wait_then
    monkeypatch.setattr(file_mod.os, "pwritev", held(os.pwritev))
    monkeypatch.setattr(file_mod, "_fallocate", held(file_mod._fallocate))
    monkeypatch.setattr(file_mod.os, "ftruncate", held(os.ftruncate))
    change = {"write": lambda: f.write_from(1 << 20, [memoryview(b"x" * 4096)], False),
              "discard": lambda: f.discard(0, 4096),
              "resize": lambda: f.resize(f.size() + 4096)}[call]
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(change)
        assert entered.wait(30)
        assert f.mapped_extents_nowait(8192, 4096, 1) is None
        release.set()
        done.result(30)
    assert f.mapped_extents_nowait(8192, 4096, 1) == [(8192, 4096, True)]
    f.close()


def test_a_lookup_in_a_thread_leaves_the_next_ones_on_the_loop(tmp_path, monkeypatch):
    """Lookups take the inode lock shared: one that runs in a thread (many
    descriptors asked) does not keep qemu's one-descriptor lookups off the
    loop, or at QD8 they would keep each other in threads for good."""
    path = str(tmp_path / "frag.img")
    fragment(path, 200)
    entered, release = threading.Event(), threading.Event()
    real_lseek = os.lseek

    def lseek(*args):
        if threading.current_thread() is not threading.main_thread() and not release.is_set():
            entered.set()
            release.wait(30)
        return real_lseek(*args)

    async def go():
        h = Harness()
        lu = _file_lu(h, path)
        await h.cmd(_gls(0, 8 + 16))
        monkeypatch.setattr(file_mod.os, "lseek", lseek)
        many = asyncio.ensure_future(h.cmd(_gls(0, 8 + 16 * 100)))
        try:
            while not entered.is_set():
                await asyncio.sleep(0.001)
            r = await h.cmd(_gls(12, 8 + 16))
            assert _descriptors(r.data) == [(12, 4, 1)] and not many.done()
        finally:
            release.set()
        assert len(_descriptors((await many).data)) == 100
        lu.backend.close()
    run(go())


def test_slow_lookups_in_a_row_send_the_next_ones_to_threads(tmp_path, monkeypatch):
    """Lookups that waited one after another (device reads of the extent map,
    a lock) mark the file: the next _BACKOFF_LOOKUPS are left to worker
    threads (None), then the loop tries again. One slow lookup between fast
    ones (the loop thread preempted, or waiting for the GIL) does not."""
    path = str(tmp_path / "frag.img")
    fragment(path, 16)
    f = FileBackend(path)
    clock = [0]

    def now() -> int:
        clock[0] += step[0]
        return clock[0]
    fast, slow = 10_000, file_mod._SLOW_LOOKUP_NS + 1   # between two readings of the clock
    step = [fast]
    monkeypatch.setattr(file_mod.time, "monotonic_ns", now)
    seeks = Counter(os.lseek)
    monkeypatch.setattr(file_mod.os, "lseek", seeks)
    assert f.mapped_extents_nowait(0, f.size(), 1) == [(0, 4096, True)]
    assert f.mapped_extents_nowait(0, f.size(), file_mod._INLINE_RUNS + 1) is None
    for _ in range(3):                               # slow, fast, slow, ...: all on the loop
        step[0] = slow
        assert f.mapped_extents_nowait(0, f.size(), 1) == [(0, 4096, True)]
        step[0] = fast
        assert f.mapped_extents_nowait(0, f.size(), 1) == [(0, 4096, True)]
    step[0] = slow
    for _ in range(file_mod._SLOW_IN_A_ROW):         # these waited, one after another
        assert f.mapped_extents_nowait(0, f.size(), 1) == [(0, 4096, True)]
    step[0] = fast
    seeks.calls = 0
    assert all(f.mapped_extents_nowait(0, f.size(), 1) is None for _ in range(file_mod._BACKOFF_LOOKUPS))
    assert seeks.calls == 0
    assert f.mapped_extents_nowait(4096, f.size(), 1) == [(4096, 4096, False)]
    assert seeks.calls == 1
    f.close()


# ---------------------------------------------------------------- VERIFY

def test_verify_bytchk0_reads_nothing_and_bytchk3_is_held_to_the_transfer_limit():
    async def go():
        h = Harness([LunOptions("ram", size=64 << 20)])
        lu = h.lu()
        reads = Counter(lu.backend.read_into, size=lambda off, buf: len(buf))
        lu.backend.read_into = reads
        r = await h.cmd(_verify16(0, lu.blocks, 0), alloc=0)     # the whole LUN
        assert r.status == GOOD and reads.calls == 0
        r = await h.cmd(_verify16(lu.blocks - 1, 2, 0), alloc=0)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x21, 0)           # still a range check
        r = await h.cmd(_verify16(0, MAX_XFER + 1, 3), bytes(BS))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0) and r.field == (10, None)
        assert reads.calls == 0
        # within the limit: compared a chunk at a time, the miscompare where it is
        await h.cmd(_write16(0, MAX_XFER), b"\x11" * MAX_XFER * BS)
        await h.cmd(_write16(5000, 1), b"\x22" * BS)
        r = await h.cmd(_verify16(0, MAX_XFER, 3), b"\x11" * BS)
        assert r.key_asc == (0xE, 0x1D, 0) and struct.unpack_from(">I", r.sense, 3)[0] == 5000 * BS
        assert reads.sizes and max(reads.sizes) <= 1 << 20
        r = await h.cmd(_verify16(0, 4000, 3), b"\x11" * BS)
        assert r.status == GOOD
        data = b"\x11" * 5000 * BS + b"\x22" * BS
        r = await h.cmd(_verify16(0, 5001, 1), data)
        assert r.status == GOOD
    run(go())


def test_verify_bytchk3_of_one_block_allocates_for_one_block():
    """VERIFY with BYTCHK 11b repeats the block sent over at most one chunk of
    the range: for a range of one block, one block, not a chunk of 1 MiB
    whatever the range (the sweep of 0225-0227). Bytes counted by tracemalloc."""
    import tracemalloc
    async def go():
        h = Harness([LunOptions("ram", size=4 << 20)])
        await h.cmd(_write16(7, 1), b"\x33" * BS)
        await h.cmd(_verify16(7, 1, 3), b"\x33" * BS)   # warm: whatever a first call caches
        tracemalloc.start()
        try:
            r = await h.cmd(_verify16(7, 1, 3), b"\x33" * BS)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status == GOOD
        assert peak < 256 << 10, peak
        r = await h.cmd(_verify16(6, 2, 3), b"\x33" * BS)
        assert r.key_asc == (0xE, 0x1D, 0) and struct.unpack_from(">I", r.sense, 3)[0] == 0
    run(go())


# ---------------------------------------------------------------- UNMAP, WRITE SAME

def test_unmap_lba_count_is_a_total_checked_before_any_discard():
    async def go():
        h = Harness([LunOptions("ram", size=1 << 30)])
        lu = h.lu()
        await h.cmd(_write16(0, 8), b"\x33" * 8 * BS)
        discards = Counter(lu.backend.discard)
        lu.backend.discard = discards
        half = (1 << 20) // 2 + 1                  # two descriptors within the per-descriptor value
        cdb, data = unmap((0, half), (half, half))
        r = await h.cmd(cdb, data)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x26, 0) and r.field == (8 + 16 + 8, None)
        assert discards.calls == 0
        assert (await h.cmd(_read16(0, 8))).data == b"\x33" * 8 * BS
        cdb, data = unmap((0, 1 << 19), (1 << 19, 1 << 19))   # exactly the limit
        assert (await h.cmd(cdb, data)).status == GOOD
        assert (await h.cmd(_read16(0, 8))).data == bytes(8 * BS)
    run(go())


def test_file_discard_fallback_writes_zeros_in_bounded_chunks(tmp_path, monkeypatch):
    f = FileBackend(str(tmp_path / "d.img"), 8 << 20)
    f.write_from(0, [memoryview(b"\x44" * (8 << 20))], False)

    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "no holes here")
    monkeypatch.setattr(file_mod, "_fallocate", unsupported)
    writes = Counter(f.write_from, size=lambda off, bufs, sync: sum(map(len, bufs)))
    f.write_from = writes
    f.discard(4096, (8 << 20) - 8192)
    assert sum(writes.sizes) == (8 << 20) - 8192 and max(writes.sizes) <= 1 << 20
    buf = bytearray(8 << 20)
    f.read_into(0, memoryview(buf))
    assert buf[:4096] == b"\x44" * 4096 and buf[-4096:] == b"\x44" * 4096
    assert not any(memoryview(buf)[4096:-4096])
    f.close()


def test_write_same_is_held_to_its_limit_and_goes_in_chunks():
    async def go():
        h = Harness([LunOptions("ram", size=64 << 20, thin=False)])
        lu = h.lu()
        for ws in (bytes([0x93, 0]) + struct.pack(">QI", 0, 0) + bytes(2),            # 0: to the end
                   bytes([0x93, 0]) + struct.pack(">QI", 0, MAX_XFER + 1) + bytes(2),
                   bytes([0x41, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", 0) + b"\0"):
            r = await h.cmd(ws, b"\x55" * BS)
            assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0), ws.hex()
        writes = Counter(lu.backend.write_from, size=lambda off, bufs, sync: sum(map(len, bufs)))
        lu.backend.write_from = writes
        lu.backend.write_nowait = lambda off, bufs, sync: writes(off, bufs, sync) or True
        ticks = await _ticking(h.cmd(bytes([0x93, 0]) + struct.pack(">QI", lu.blocks - MAX_XFER, 0) + bytes(2),
                                     b"\x55" * BS))
        assert sum(writes.sizes) == 8 << 20 and max(writes.sizes) <= 1 << 20
        assert ticks >= len(writes.sizes) - 1      # the loop turned between chunks
        assert (await h.cmd(_read16(lu.blocks - 1, 1))).data == b"\x55" * BS
    run(go())


def shrink_after_writes(lu, writes: int, size: int) -> list[int]:
    """Make the LU's backend shrink to `size` after its `writes`-th write (as a
    `lun resize --force` between two chunks would); the end offset of every
    write is appended to the list returned."""
    ends: list[int] = []
    real = lu.backend.write_from

    def write_then_shrink(off, bufs, sync):
        real(off, bufs, sync)
        ends.append(off + sum(map(len, bufs)))
        if len(ends) == writes:
            lu.backend.resize(size)
    lu.backend.write_from = write_then_shrink
    lu.backend.write_nowait = lambda off, bufs, sync: write_then_shrink(off, bufs, sync) or True
    return ends


@pytest.mark.parametrize("cdb", [bytes([0x93, 0]) + struct.pack(">QI", 0, MAX_XFER) + bytes(2),   # WRITE SAME(16)
                                 bytes([0x8B, 0]) + struct.pack(">QI", 0, MAX_XFER) + bytes(2)],  # ORWRITE(16)
                         ids=["write-same", "orwrite"])
def test_chunked_writes_stop_at_the_end_of_a_lu_shrunk_while_they_run(cdb):
    """A command written a chunk at a time checks each chunk's range again
    after its turn of the loop: shrunk to 2 MiB after its first chunk (`lun
    resize --force`), the LU gets LBA OUT OF RANGE and no write past its end
    (which grew its RAM back, or its file)."""
    async def go():
        h = Harness([LunOptions("ram", size=64 << 20, thin=False)])
        lu = h.lu()
        ends = shrink_after_writes(lu, 2, 2 << 20)
        r = await h.cmd(cdb, b"\x66" * (BS if cdb[0] == 0x93 else MAX_XFER * BS))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x21, 0)
        assert ends == [1 << 20, 2 << 20] and lu.backend.allocated() == 2 << 20
    run(go())


def test_a_discard_stops_at_the_end_of_a_lu_shrunk_while_it_runs():
    """The same for deallocation, 64 MiB a step (a file whose system cannot
    punch holes is written zeros instead: past its end, that grew it)."""
    async def go():
        h = Harness([LunOptions("ram", size=256 << 20)])
        lu = h.lu()
        spans: list[tuple[int, int]] = []
        real = lu.backend.discard

        def discard_then_shrink(off, length):
            real(off, length)
            spans.append((off, length))
            if len(spans) == 1:
                lu.backend.resize(64 << 20)                   # (which discards its tail through here)
        lu.backend.discard = discard_then_shrink
        cdb, data = unmap((0, 1 << 19))                       # 256 MiB
        r = await h.cmd(cdb, data)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x21, 0)
        assert spans == [(0, 64 << 20), (64 << 20, 192 << 20)]   # the command's first step, the resize's
    run(go())


async def _ticking(coro) -> int:
    """Run `coro` while counting the event loop's turns beside it."""
    ticks = 0
    done = False

    async def tick():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)
    ticker = asyncio.ensure_future(tick())
    try:
        r = await coro
        assert r.status == GOOD, r
    finally:
        done = True
        await ticker
    return ticks


# ---------------------------------------------------------------- SANITIZE

def test_sanitize_is_one_tracked_job_with_progress():
    async def go():
        h = Harness([LunOptions("ram", size=16 << 30)])   # 256 discard chunks
        lu = h.lu()
        erase = bytes([0x48, 0x80 | 0x02, 0, 0, 0, 0, 0, 0, 0, 0])   # BLOCK ERASE, IMMED
        assert (await h.cmd(erase, alloc=0)).status == GOOD
        assert lu.sanitizing
        r = await h.cmd(erase, alloc=0)                    # one at a time
        assert r.key_asc == (0x2, 0x04, 0x1B)
        r = await h.cmd(bytes(6), alloc=0)
        assert r.key_asc == (0x2, 0x04, 0x1B)
        r = await h.cmd(bytes([0x03, 0, 0, 0, 18, 0]), alloc=18)   # REQUEST SENSE: progress
        assert r.status == GOOD and parse_sense(r.data) == (0x2, 0x04, 0x1B)
        assert r.data[15] & 0x80 and 0 < struct.unpack_from(">H", r.data, 16)[0] < 0x10000
        await lu.stop_jobs()                               # the LUN goes: the job stops
        assert not lu.sanitizing and lu.job.cancelled()
        assert (await h.cmd(bytes(6), alloc=0)).status == GOOD
        # without IMMED the command waits for the job, and ends when the job is stopped
        waiting = asyncio.ensure_future(h.cmd(bytes([0x48, 0x02]) + bytes(8), alloc=0))
        while not lu.sanitizing:
            await asyncio.sleep(0)
        await lu.stop_jobs()
        assert (await waiting).key_asc == (0xB, 0, 0)      # ABORTED COMMAND
        # to the end: every chunk deallocated, the medium ready again
        lu.backend.write_from(5 * PAGE, [memoryview(b"q")], False)
        assert (await h.cmd(erase, alloc=0)).status == GOOD
        await asyncio.wait([lu.job])
        assert lu.backend.allocated() == 0 and not lu.sanitizing
    run(go())


def test_an_aborted_sanitizes_later_failure_is_logged_once(caplog):
    """Without IMMED, SANITIZE's job goes on when its command is aborted (SBC-4):
    its failure then has no command to fail and is one error line, as an IMMED
    one's is, not a task the GC logs as never retrieved (stml.task.must_finish)."""
    async def go():
        h = Harness([LunOptions("ram", size=16 << 30)])   # 256 discard chunks
        lu = h.lu()
        real, calls = lu.backend.discard, [0]

        def discard(offset: int, length: int) -> None:
            calls[0] += 1
            if calls[0] == 8:
                raise OSError(errno.EIO, "the medium broke")
            real(offset, length)
        lu.backend.discard = discard
        waiting = asyncio.ensure_future(h.cmd(bytes([0x48, 0x02]) + bytes(8), alloc=0))
        while not lu.sanitizing:
            await asyncio.sleep(0)
        h.emulator.handle(b"fe", {"op": Op.RX_TMF, "tag": 9999, "nexus": 1, "fn": int(Tmf.ABORT_TASK),
                                  "lun": 0, "ref": h.tag}, [])
        while h.tag in h.emulator.front_ends[b"fe"].tasks:
            await asyncio.sleep(0)
        assert calls[0] < 8 and lu.sanitizing   # aborted, the job goes on
        waiting.cancel()   # (aborted by its own nexus: no status comes)
        await asyncio.wait([lu.job])
        assert calls[0] == 8 and not lu.sanitizing
    caplog.set_level(logging.WARNING)
    run(go())
    gc.collect()
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("stml", f"SANITIZE of {TARGET} LUN 0 failed: [Errno 5] the medium broke")]


def test_sanitize_stops_at_the_end_of_a_lu_shrunk_while_it_runs():
    """SANITIZE's job takes the LU's end as each chunk starts: shrunk to 4 MiB
    after its first chunk (`lun resize --force`), a 64 MiB LU is overwritten
    to its new end, and no RAM is allocated past it (it was 60 MiB more)."""
    async def go():
        h = Harness([LunOptions("ram", size=64 << 20)])
        lu = h.lu()
        ends = shrink_after_writes(lu, 1, 4 << 20)
        pattern = bytes([0x01, 0, 0, 4]) + b"\xc3" * 4            # OVERWRITE COUNT 1, a 4-byte pattern
        r = await h.cmd(bytes([0x48, 0x01, 0, 0, 0, 0, 0, 0, len(pattern), 0]), pattern)
        assert r.status == GOOD
        assert ends == [1 << 20, 2 << 20, 3 << 20, 4 << 20] and lu.backend.allocated() == 4 << 20
        assert (await h.cmd(_read16(lu.blocks - 1, 1))).data == b"\xc3" * BS
    run(go())


# ---------------------------------------------------------------- SYNCHRONIZE CACHE

def test_flush_syncs_only_what_was_left_unsynced(tmp_path, monkeypatch):
    syncs = Counter(os.fdatasync)
    monkeypatch.setattr(file_mod.os, "fdatasync", syncs)
    monkeypatch.setattr(file_mod.os, "fsync", lambda fd: pytest.fail("fsync: fdatasync suffices"))
    on_disk(monkeypatch)   # syncs counted wherever tmp_path is (tmpfs: none at all)
    f = FileBackend(str(tmp_path / "d.img"), 1 << 20)
    assert f._in_memory is False
    f.flush()
    assert syncs.calls == 0 and not f.dirty
    f.write_from(0, [memoryview(b"a" * 512)], sync=True)   # write-through: synced with the write
    assert syncs.calls == 1 and not f.dirty
    f.flush()
    assert syncs.calls == 1
    f.write_from(0, [memoryview(b"b" * 512)], sync=False)  # write-back: the flush owes a sync
    assert f.dirty
    f.flush()
    f.flush()
    assert syncs.calls == 2 and not f.dirty
    f.discard(0, 4096)
    f.flush()
    assert syncs.calls == 3
    f.close()


# ---------------------------------------------------------------- worker threads

def test_one_lu_cannot_hold_every_worker_thread():
    async def go():
        executor = ThreadPoolExecutor(8)
        pool = FairWorkers(executor, threads=8, per_key=4)
        gate = threading.Event()
        slow = [pool.run("A", gate.wait) for _ in range(12)]
        await asyncio.sleep(0)
        assert pool.running == {"A": 4} and pool.busy == 4
        quick = [pool.run("B", lambda i=i: i) for i in range(20)]
        assert await asyncio.gather(*quick) == list(range(20))   # B runs while A is stuck
        assert not any(f.done() for f in slow)
        # a call not yet started can be dropped; a started one cannot
        assert pool.drop(slow[-1]) and slow[-1].cancelled()
        assert not pool.drop(slow[0])
        gate.set()
        await asyncio.gather(*slow[:-1])
        assert pool.busy == 0 and pool.running == {} and pool.waiting == {}
        executor.shutdown()
    run(go())


def test_free_threads_go_round_robin_among_lus():
    async def go():
        executor = ThreadPoolExecutor(2)
        pool = FairWorkers(executor, threads=2, per_key=2)
        gate = threading.Event()
        order: list[str] = []
        hold = [pool.run("A", gate.wait), pool.run("A", gate.wait)]
        calls = [pool.run(k, order.append, k) for k in ("A", "A", "A", "B", "C", "B")]
        gate.set()
        await asyncio.gather(*hold, *calls)
        assert order.index("B") < order.index("A", 1) and order.index("C") < order.index("A", 2)
        executor.shutdown()
    run(go())


# ---------------------------------------------------------------- EXTENDED COPY

OTHER = "iqn.2026-11.org.test:other"


def _xcopy(cscds: list[bytes], segs: list[tuple[int, int, int, int, int]], list_id: int = 1) -> tuple[bytes, bytes]:
    c = b"".join(cscds)
    s = b"".join(struct.pack(">BBHHHHHQQ", 0x02, 0, 24, *seg[:2], 0, *seg[2:]) for seg in segs)
    data = struct.pack(">BBH4xII", list_id, 0, len(c), len(s), 0) + c + s
    return bytes([0x83, 0]) + bytes(8) + struct.pack(">I", len(data)) + bytes(2), data


def _with_other_target(h: Harness) -> LogicalUnit:
    other = LogicalUnit(OTHER, 0, RamBackend(4 << 20), LunOptions("ram", size=4 << 20),
                        h.emulator.templates["disk"])
    h.emulator.targets[OTHER] = Target(OTHER, {0: other})
    other.backend.write_from(0, [memoryview(b"\x77" * 4096)], False)
    return other


def test_extended_copy_reaches_only_the_nexus_target():
    async def go():
        h = Harness([LunOptions("ram", size=4 << 20)])
        other = _with_other_target(h)
        mine = h.lu().naa
        await h.cmd(_write16(0, 8), b"\x11" * 4096)
        for segs in ([(1, 0, 8, 0, 0)], [(0, 1, 8, 0, 0)]):          # from B, into B
            cdb, data = _xcopy([cscd(mine), cscd(other.naa)], segs)
            r = await h.cmd(cdb, data)
            assert r.key_asc == (0xA, 0x08, 0x04)                   # COPY ABORTED, UNREACHABLE COPY TARGET
        buf = bytearray(4096)
        other.backend.read_into(0, memoryview(buf))
        assert buf == b"\x77" * 4096
        assert (await h.cmd(_read16(0, 8))).data == b"\x11" * 4096
    run(go())


class _CountedNaa(bytes):
    """A designator that counts the comparisons made with it."""
    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedNaa.compared += 1
        return bytes.__eq__(self, other)

    __hash__ = bytes.__hash__


def test_extended_copy_finds_its_copy_targets_without_walking_the_luns():
    """Each CSCD descriptor's designator is looked up, not compared with every
    LU of the target (8 x 16,384 comparisons a command at most; 0296): the
    comparisons do not grow with the LUs. A LU added, removed, or given a new
    identity (an offline LU opening) is found by its designator as it is then."""
    async def go():
        h = Harness([LunOptions("ram", size=1 << 20) for _ in range(64)])
        t = h.emulator.targets[TARGET]
        for lu in t.luns.values():
            lu.naa = _CountedNaa(lu.naa)
        h.emulator.targets[TARGET] = t = Target(TARGET, dict(t.luns))
        last = h.lu(63)
        cscds = [cscd(last.naa)] * 8
        _CountedNaa.compared = 0
        r = await h.cmd(*_xcopy(cscds, [(7, 0, 1, 0, 1)]))
        assert r.status == GOOD
        assert _CountedNaa.compared <= 2 * 8   # the index's key, then the LU's own: per descriptor
        # the map's changes: a LU removed is unreachable, one added (or renamed) reachable
        del t.luns[63]
        r = await h.cmd(*_xcopy([cscd(last.naa)], [(0, 0, 1, 0, 1)]))
        assert r.key_asc == (0xA, 0x08, 0x04)
        t.luns[63] = last
        assert (await h.cmd(*_xcopy([cscd(last.naa)], [(0, 0, 1, 0, 1)]))).status == GOOD
        old, last.naa = last.naa, bytes([0x60]) + bytes(15)
        t.luns.renamed(last)
        assert (await h.cmd(*_xcopy([cscd(old)], [(0, 0, 1, 0, 1)]))).key_asc == (0xA, 0x08, 0x04)
        assert (await h.cmd(*_xcopy([cscd(last.naa)], [(0, 0, 1, 0, 1)]))).status == GOOD
    run(go())


def test_extended_copy_honours_reservations_of_its_copy_targets():
    async def go():
        h = Harness([LunOptions("ram", size=4 << 20), LunOptions("ram", size=4 << 20)])
        h.nexus(2, "iqn.init:two")
        src, dst = h.lu(0), h.lu(1)
        await h.cmd(_write16(0, 8), b"\x12" * 4096)
        assert (await h.cmd(bytes([0x16, 0, 0, 0, 0, 0]), alloc=0, lun=1, nexus=2)).status == GOOD
        cdb, data = _xcopy([cscd(src.naa), cscd(dst.naa)], [(0, 1, 8, 0, 0)])
        r = await h.cmd(cdb, data)                                     # sent to LUN 0, writes LUN 1
        assert r.key_asc == (0xA, 0x0D, 0x02)                          # COPY TARGET DEVICE NOT REACHABLE
        assert (await h.cmd(_read16(0, 8), lun=1, nexus=2)).data == bytes(4096)
        assert (await h.cmd(bytes([0x17, 0, 0, 0, 0, 0]), alloc=0, lun=1, nexus=2)).status == GOOD
        assert (await h.cmd(cdb, data)).status == GOOD
        assert (await h.cmd(_read16(0, 8), lun=1)).data == b"\x12" * 4096
    run(go())


def test_extended_copy_limits_and_bounded_results():
    async def go():
        h = Harness([LunOptions("ram", size=256 << 20)])
        lu = h.lu()
        naa = lu.naa
        # a parameter list longer than the operating parameters allow: refused before transfer
        asked = []
        send = h.emulator.out.transport
        h.emulator.out.transport = lambda ident, hd, frames: (asked.append(hd["op"]), send(ident, hd, frames))
        cdb = bytes([0x83, 0]) + bytes(8) + struct.pack(">I", 8 << 20) + bytes(2)
        r = await h.cmd(cdb, bytes(8 << 20))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x1A, 0) and "rdy_to_xfer" not in asked
        # one copy at a time (as RECEIVE COPY OPERATING PARAMETERS says)
        big, small = _xcopy([cscd(naa)], [(0, 0, 0xFFFF, 0, 0x10000)], list_id=1), \
            _xcopy([cscd(naa)], [(0, 0, 1, 0, 1)], list_id=2)
        first = asyncio.ensure_future(h.cmd(*big))
        while not lu.copies:
            await asyncio.sleep(0)
        r = await h.cmd(*small)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x55, 0x03)
        assert (await first).status == GOOD and lu.copies == 0
        assert (await h.cmd(*small)).status == GOOD
        # results: bounded per nexus, and gone with the nexus
        for list_id in range(3, 40):
            assert (await h.cmd(*_xcopy([cscd(naa)], [(0, 0, 1, 0, 1)], list_id=list_id))).status == GOOD
        assert len(lu.copy_results) == lu.copy_results.PER_NEXUS
        status = lambda list_id: h.cmd(bytes([0x84, 0, list_id]) + bytes(7) + struct.pack(">I", 64) + bytes(2))
        assert (await status(39)).status == GOOD and (await status(3)).key_asc == (ILLEGAL_REQUEST, 0x24, 0)
        h.emulator.handle(b"fe", {"op": "scsi_release", "nexus": 1}, [])
        assert len(lu.copy_results) == 0
    run(go())


def test_extended_copy_between_block_sizes_is_refused_before_any_block_moves():
    """A segment counts its blocks once for both ends: from a 4096-byte LU
    into a 512-byte one it wrote its 4 MiB at 4096 x the destination LBA, 24
    MiB past the end of a 4 MiB LU (RAM pages, or file blocks, the LU does not
    have). Refused whole, with the segment's destination index pointed at."""
    async def go():
        h = Harness([LunOptions("ram", size=4 << 20, block_size=4096), LunOptions("ram", size=4 << 20)])
        big, small = h.lu(0), h.lu(1)
        for lu in (big, small):
            lu.backend.write_from(0, [memoryview(b"\x5a" * 8192)], False)
        writes = {id(lu): Counter(lu.backend.write_from) for lu in (big, small)}
        for lu in (big, small):
            lu.backend.write_from = writes[id(lu)]
        cscds = [cscd(big.naa, 4096), cscd(small.naa, 512)]
        for seg in ((0, 1, 1000, 0, 7000), (1, 0, 8, 0, 0)):   # 4096 -> 512 past its end; 512 -> 4096
            cdb, data = _xcopy(cscds, [seg])
            r = await h.cmd(cdb, data)
            assert r.key_asc == (ILLEGAL_REQUEST, 0x26, 0) and r.field == (16 + 64 + 6, None), seg
        assert sum(w.calls for w in writes.values()) == 0
        assert small.backend.allocated() == big.backend.allocated() == 1 << 20   # the one page written
        cdb, data = _xcopy(cscds, [(0, 0, 2, 0, 4)])                            # alike: copied
        assert (await h.cmd(cdb, data)).status == GOOD
        assert (await h.cmd(_read16(4, 2))).data == b"\x5a" * 8192
    run(go())


def test_extended_copy_stops_at_the_end_of_a_copy_target_shrunk_meanwhile():
    """A copy checks its chunk against the LU's size before each one: a LU
    shrunk while a segment runs (`lun resize`) is not written past its new end."""
    async def go():
        h = Harness([LunOptions("ram", size=64 << 20), LunOptions("ram", size=64 << 20)])
        src, dst = h.lu(0), h.lu(1)
        writes = Counter(dst.backend.write_from, size=lambda off, bufs, sync: off + sum(map(len, bufs)))
        dst.backend.write_from = writes
        real = src.backend.read_into

        def read_then_shrink(off, buf):   # after the first chunk, the destination shrinks to 2 MiB
            if writes.calls == 1:
                dst.backend.resize(2 << 20)
            return real(off, buf)
        src.backend.read_into = read_then_shrink
        cdb, data = _xcopy([cscd(src.naa), cscd(dst.naa)], [(0, 1, 0xFFFF, 0, 0)])   # 32 MiB
        r = await h.cmd(cdb, data)
        assert r.key_asc == (0xA, 0, 0)                     # COPY ABORTED
        assert writes.calls == 2 and max(writes.sizes) == 2 << 20   # up to the new end, no further
        assert dst.backend.allocated() <= 2 << 20
    run(go())


def test_nexus_loss_visits_only_the_lus_holding_its_copy_results(monkeypatch):
    """Copy results go with the nexus; finding them costs the LUs that hold
    some, not every LU of the target (issue 18: per nexus, not per LUN)."""
    async def go():
        h = Harness([LunOptions("ram", size=1 << 20) for _ in range(64)])
        lu = h.lu(5)
        cdb, data = _xcopy([cscd(lu.naa)], [(0, 0, 1, 0, 1)])
        assert (await h.cmd(cdb, data, lun=5)).status == GOOD
        assert len(lu.copy_results) == 1
        visited: list[CopyResults] = []
        drop = CopyResults.drop
        monkeypatch.setattr(CopyResults, "drop", lambda self, key: (visited.append(self), drop(self, key)))
        h.emulator.handle(b"fe", {"op": "scsi_release", "nexus": 1}, [])
        assert visited == [lu.copy_results] and len(lu.copy_results) == 0
    run(go())


def test_extended_copy_on_ram_turns_the_loop_between_chunks():
    async def go():
        h = Harness([LunOptions("ram", size=128 << 20)])
        naa = h.lu().naa
        cdb, data = _xcopy([cscd(naa)], [(0, 0, 0xFFFF, 0, 0x10000)])   # 32 MiB in one segment
        assert await _ticking(h.cmd(cdb, data)) >= 31
    run(go())


# ---------------------------------------------------------------- LU identity

def test_lu_identity_from_config_and_the_legacy_one():
    disk = Harness().emulator.templates["disk"]
    legacy = LogicalUnit("iqn.2026-11.org.test:t", 3, RamBackend(1 << 20), LunOptions("ram", size=1 << 20), disk)
    digest = hashlib.sha256(b"iqn.2026-11.org.test:t/3").digest()   # what designators were before ids
    tail = int.from_bytes(digest[:13], "big") >> 4
    assert legacy.naa == ((0x6 << 124) | (IEEE_COMPANY_ID << 100) | tail).to_bytes(16, "big")
    assert legacy.serial == digest[:8].hex()
    ident = "00112233445566778899aabbccddeeff"
    opts = lun_options({"backend": "ram", "size": "1MiB", "id": ident.upper()}, "target[0].lun[0]", "/tmp")
    assert opts.id == ident
    named = LogicalUnit("iqn.2026-11.org.test:t", 3, RamBackend(1 << 20), opts, disk)
    assert named.serial == ident[:16] and named.naa != legacy.naa
    assert named.naa[0] >> 4 == 6 and named.naa.hex()[7:] == f"{int(ident[:26], 16) >> 4:025x}"
    for bad in ("xyz", 12, "00" * 15, "00" * 17):
        with pytest.raises(ConfigError, match=r"^target\[0\]\.lun\[0\]\.id: .*32 hexadecimal digits"):
            lun_options({"backend": "ram", "size": "1MiB", "id": bad}, "target[0].lun[0]", "/tmp")


def test_an_id_names_one_lu(tmp_path):
    from stml.config import load
    cfg = tmp_path / "t.toml"
    ident = "ab" * 16
    cfg.write_text(f'[[target]]\nname = "{TARGET}"\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "1MiB"\nid = "{ident}"\n'
                   f'[[target]]\nname = "{OTHER}"\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "1MiB"\nid = "{ident}"\n')
    with pytest.raises(ConfigError, match=f"target {OTHER} LUN 0 id: {ident} is already the id of "
                                          f"target {TARGET} LUN 0"):
        load(str(cfg), data_dir=str(tmp_path))


# ---------------------------------------------------------------- REPORT LUNS

def test_report_luns_builds_only_what_the_allocation_length_holds(monkeypatch):
    import stml.spc as spc
    async def go():
        h = Harness()
        lus = h.emulator.targets[TARGET].luns
        for n in range(1, 4000):
            lus[n] = lus[0]                          # 4,000 LUN numbers (the list is what counts)
        encoded = Counter(spc.encode_lun)
        monkeypatch.setattr(spc, "encode_lun", encoded)
        r = await h.cmd(bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 8 + 8 * 10 + 4) + bytes(2),
                        alloc=8 + 8 * 10 + 4)
        assert r.status == GOOD and len(r.data) == 8 + 8 * 10 + 4
        assert struct.unpack_from(">I", r.data)[0] == 8 * 4000       # the whole list's length
        assert r.data[8:16] == bytes(8) and r.data[16:18] == bytes([0, 1])
        assert encoded.calls == 11
    run(go())


class _ComparedLun(int):
    """A LUN number that counts the comparisons of two LUN numbers (a sort's;
    encoding one compares it with constants)."""
    compared = 0

    def __lt__(self, other: object) -> bool:
        _ComparedLun.compared += isinstance(other, _ComparedLun)
        return int(self) < int(other)   # type: ignore[call-overload]

    def __gt__(self, other: object) -> bool:
        _ComparedLun.compared += isinstance(other, _ComparedLun)
        return int(self) > int(other)   # type: ignore[call-overload]


def test_report_luns_sorts_nothing_per_call():
    """REPORT LUNS takes the numbers its allocation length holds from the
    order the LunMap keeps as LUs are added and removed (0223); it sorted
    every LUN of the target on every call (4,000 numbers: tens of thousands
    of comparisons for 1 entry). Removals and additions keep the order."""
    async def go():
        h = Harness()
        lus = h.emulator.targets[TARGET].luns
        for n in range(3999, 0, -1):                  # added in descending order
            lus[_ComparedLun(n)] = lus[0]
        del lus[1]
        lus[_ComparedLun(5000)] = lus[0]
        for alloc in (16, 8 + 8 * 3, 8 + 8 * 4000):
            _ComparedLun.compared = 0
            r = await h.cmd(bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", alloc) + bytes(2), alloc=alloc)
            assert _ComparedLun.compared == 0
            assert r.status == GOOD and struct.unpack_from(">I", r.data)[0] == 8 * 4000
            numbers = [int.from_bytes(r.data[i:i + 2], "big") & 0x3FFF for i in range(8, len(r.data), 8)]
            assert numbers == ([0, 2, *range(3, 4000), 5000])[:(alloc - 8) // 8]
    run(go())


# ---------------------------------------------------------------- SPC-2 RESERVE

def test_nexus_loss_visits_only_the_lus_it_reserved(monkeypatch):
    """An SPC-2 RESERVE indexes its LU by the holder's nexus: a nexus's loss
    (and I_T NEXUS RESET) visits the LUs that nexus reserved, not every LU
    any nexus holds reserved (0227: every logout walked them all). The
    holder's loss still releases its reservations, and only those."""
    import stml.pr as pr_mod
    from stml.api import Tmf
    async def go():
        h = Harness([LunOptions("ram", size=1 << 20) for _ in range(40)])
        reserve6 = bytes([0x16, 0, 0, 0, 0, 0])
        for lun in range(40):
            assert (await h.cmd(reserve6, alloc=0, lun=lun, no_data=True)).status == GOOD
        h.nexus(2, "iqn.init:two")
        assert (await h.cmd(bytes(6), alloc=0, lun=0, nexus=2, no_data=True)).status == 0x18   # conflict
        dropped = Counter(pr_mod.PrState.drop_spc2)
        monkeypatch.setattr(pr_mod.PrState, "drop_spc2", lambda st, key=None: dropped(st, key))
        h.nexus(3, "iqn.init:three")
        h.emulator.handle(b"fe", {"op": "scsi_release", "nexus": 3}, [])   # reserved nothing
        assert dropped.calls == 0
        h.emulator.handle(b"fe", {"op": "scsi_release", "nexus": 1}, [])   # the holder
        assert dropped.calls == 40
        assert all(h.lu(lun).pr.spc2 is None for lun in range(40))
        assert (await h.cmd(reserve6, alloc=0, lun=5, nexus=2, no_data=True)).status == GOOD
        dropped.calls = 0
        h.emulator.handle(b"fe", {"op": "rx_task_mgmt_fn", "tag": 99, "nexus": 2, "fn": int(Tmf.I_T_NEXUS_RESET),
                                  "lun": 0, "ref": None}, [])
        await asyncio.sleep(0)
        assert dropped.calls == 1 and h.lu(5).pr.spc2 is None
    run(go())


# ---------------------------------------------------------------- PREVENT ALLOW MEDIUM REMOVAL

class _CountedKeys(dict):
    """The engine's live nexuses by key, counting the lookups made in it."""
    probes = 0

    def __contains__(self, key: object) -> bool:
        _CountedKeys.probes += 1
        return dict.__contains__(self, key)


def test_prevent_allow_costs_the_same_however_many_sessions_prevented():
    """PREVENT, ALLOW and START STOP UNIT's eject look at no other session's
    PREVENT entry (they used to prune ended nexuses on every call: a walk
    over every session that had sent one; 0297). A nexus's loss drops its
    entries, as it drops its copy results, and the engine keeps none for it."""
    async def go():
        h = Harness([LunOptions("ram", size=1 << 20, removable=True)])
        prevent, allow = bytes([0x1E, 0, 0, 0, 1, 0]), bytes([0x1E, 0, 0, 0, 0, 0])
        eject = bytes([0x1B, 0, 0, 0, 0x02, 0])
        for n in range(2, 66):
            h.nexus(n, f"iqn.init:n{n}")
            assert (await h.cmd(prevent, alloc=0, nexus=n)).status == GOOD
        h.emulator._keyed = _CountedKeys(h.emulator._keyed)
        _CountedKeys.probes = 0
        for cdb in (prevent, allow, prevent, eject):
            r = await h.cmd(cdb, alloc=0)
            assert r.status == GOOD or r.key_asc == (ILLEGAL_REQUEST, 0x53, 0x02)
        assert _CountedKeys.probes == 0
        # every session's end allows removal, and leaves nothing behind
        for n in range(1, 66):
            h.emulator.handle(b"fe", {"op": "scsi_release", "nexus": n}, [])
        await asyncio.sleep(0)
        assert h.lu().prevent == set()
        assert not getattr(h.emulator, "_prevent_luns", {})
        h.nexus(1, "iqn.init:one")
        await h.cmd(bytes(6), alloc=0)   # its power-on unit attention, if any
        assert (await h.cmd(eject, alloc=0)).status == GOOD
    run(go())
