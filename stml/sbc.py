"""SBC-4 commands of the disk template: reads and writes, VERIFY, WRITE AND
VERIFY, COMPARE AND WRITE, ORWRITE, WRITE SAME, UNMAP, GET LBA STATUS,
PRE-FETCH, READ DEFECT DATA, WRITE ATOMIC, SANITIZE, READ CAPACITY,
SYNCHRONIZE CACHE, START STOP UNIT.

Every write enters the LU's write gate shared; commands whose read and write
must not be split by another write (COMPARE AND WRITE, ORWRITE, WRITE ATOMIC)
enter it exclusive.

Work over a range goes in chunks (CHUNK bytes of data, _DISCARD_CHUNK of
deallocation) with a turn of the event loop between them (ops.next_chunk).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import struct
from typing import Callable

from stml.cdb import u16, u32, u64
from stml.lu import LogicalUnit
from stml.ops import (
    CHUNK, check_range, check_writable, check_xfer, data_bytes, fua, lbppbe, max_blocks, next_chunk,
    param_len_error, refuse_after_failed_sync, trim_views, unit,
)
from stml.sense import (
    ABORTED_COMMAND, ILLEGAL_REQUEST, MEDIUM_REMOVAL_PREVENTED, MISCOMPARE, MISCOMPARE_DURING_VERIFY,
    NO_ADDITIONAL_SENSE, CheckCondition, invalid_field, invalid_param,
)
from stml.spc import (
    MAX_COMPARE_AND_WRITE, MAX_LBA_STATUS_DESCRIPTORS, MAX_UNMAP_DESCRIPTORS, MAX_UNMAP_LBA_COUNT,
    max_write_same, removal_prevented, thin,
)
from stml.task import Task, must_finish, report_failure

log = logging.getLogger("stml")

_DISCARD_CHUNK = 64 << 20   # deallocated per step (RAM: 64 pages freed)


async def _flush(task: Task) -> None:
    """Make the LU's acknowledged writes durable; nothing to do (and no thread
    to wake) when a completed sync covered them all (0255). After a failed
    sync, every flush fails until `lun reset-error` (0256)."""
    lu = task.lu
    assert lu is not None   # per command: see ops.unit()
    refuse_after_failed_sync(lu)
    if lu.backend.dirty:
        await task.io(lu.backend.flush)


def _sync(task: Task) -> bool:
    """Whether the write must be durable at GOOD (FUA, or write-through);
    such a write fails after a failed sync, as SYNCHRONIZE CACHE does."""
    lu = task.lu
    assert lu is not None   # per command: see ops.unit()
    if fua(task.cdb) or not lu.mode.wce:
        refuse_after_failed_sync(lu)
        return True
    return False


async def read_blocks(task: Task, lba: int, blocks: int) -> bytearray:
    """Read into new memory, for the handler's own use (read() reads a
    response's data into memory of its own)."""
    lu = task.lu
    assert lu is not None   # per command: see ops.unit()
    buf = bytearray(blocks * lu.block_size)
    if buf and not lu.backend.read_nowait(lba * lu.block_size, memoryview(buf)):
        await task.io(lu.backend.read_into, lba * lu.block_size, memoryview(buf))
    return buf


async def write_blocks(task: Task, lba: int, bufs: list, sync: bool) -> None:
    """A write outside any exclusive section: enters the write gate shared. A
    write done in place while no exclusive section runs or waits cannot
    interleave with one (nothing else runs meanwhile), so it skips the gate."""
    lu = task.lu
    assert lu is not None   # per command: see ops.unit()
    gate = lu.write_gate
    offset = lba * lu.block_size
    waited = gate.exclusive_pending
    if waited:
        await gate.wait_shared()
    elif lu.backend.write_nowait(offset, bufs, sync):
        return
    # the gate's shared() in place (no context manager per write): nothing is
    # awaited between the wait and the entry, and leaving never awaits
    gate.enter_shared()
    try:
        if not (waited and lu.backend.write_nowait(offset, bufs, sync)):
            await task.io(lu.backend.write_from, offset, bufs, sync)
    finally:
        gate.leave_shared()


async def _next_range(lu: LogicalUnit, lba: int, blocks: int) -> None:
    """Between two chunks of one write: a turn of the loop, then the next
    chunk's range checked again (a `lun resize --force` may have shrunk the
    LU meanwhile: a write past its end would grow its file or its RAM)."""
    await next_chunk()
    check_range(lu, lba, blocks)


def _miscompare(offset: int) -> CheckCondition:
    return CheckCondition(MISCOMPARE, MISCOMPARE_DURING_VERIFY, info=offset)


def _first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int | None:
    if a == b:
        return None
    lo, hi = 0, len(a)
    # narrow by halves, comparing slices at C speed
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return None


# ---------------------------------------------------------------- READ / WRITE

async def read(task: Task) -> bytes | bytearray | memoryview:
    """READ: into memory that goes back to the front end as read data (maybe
    shared with it, so it is never copied), or new memory the backend reads
    into at once (pread_nowait: none zeroed first). read_blocks' steps, in
    place: one coroutine less per command."""
    lu = task.lu
    assert lu is not None   # per command: see ops.unit()
    lba, blocks = task.lba_len()   # read_check checked them
    bs = lu.block_size
    buf = task.services.read_buffer(task, blocks * bs)
    if buf is None:
        if blocks:
            data = lu.backend.pread_nowait(lba * bs, blocks * bs)
            if data is not None:
                return data
        buf = bytearray(blocks * bs)
    if blocks:
        # (one for both calls; a shared slot's is one already)
        view = buf if type(buf) is memoryview else memoryview(buf)
        if not lu.backend.read_nowait(lba * bs, view):
            await task.read_into(lba * bs, view)
    return buf


def received_blocks(task: Task) -> tuple[int, int, list[memoryview]]:
    """(LBA, blocks, data) of the whole blocks received: an initiator that sends
    less than the CDB says (iSCSI expected length too small) writes only those."""
    lu = task.lu
    assert lu is not None   # per command: see ops.unit()
    bs = lu.block_size
    lba, blocks = task.lba_len()
    blocks = min(blocks, task.want // bs)
    data = task.data_out if task.want == blocks * bs else trim_views(task.data_out, blocks * bs)
    return lba, blocks, data


async def write(task: Task) -> None:
    lba, blocks, data = received_blocks(task)
    if blocks:
        await write_blocks(task, lba, data, _sync(task))


async def synchronize_cache(task: Task) -> None:
    cdb = task.cdb
    if len(cdb) == 10:
        lba, blocks = u32(cdb, 2), u16(cdb, 7)
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    check_range(unit(task), lba, blocks)
    await _flush(task)


async def read_capacity10(task: Task) -> bytes:
    cdb = task.cdb
    if not cdb[8] & 1 and u32(cdb, 2):
        raise invalid_field(2)  # an LBA without PMI is an error (SBC-4 5.20.2)
    lu = unit(task)
    last = lu.blocks - 1
    return struct.pack(">II", min(last, 0xFFFFFFFF), lu.block_size)


async def read_capacity16(task: Task) -> bytes:
    lu = unit(task)
    alloc = u32(task.cdb, 10)
    lbp = 0xC0 if thin(lu) else 0     # LBPME, LBPRZ (as VPD 0xB2 says)
    data = struct.pack(">QIBBH", lu.blocks - 1, lu.block_size, 0, lbppbe(lu), lbp << 8) + bytes(16)
    return data[:alloc]


async def start_stop_unit(task: Task) -> None:
    cdb, lu = task.cdb, unit(task)
    power_condition = cdb[4] >> 4
    if power_condition:
        return  # power conditions are accepted and have no effect on this device
    start, loej = cdb[4] & 1, cdb[4] & 2
    if loej and not lu.options.removable:
        raise invalid_field(4, 1)
    if loej:
        if removal_prevented(task):   # neither eject nor load while prevented
            raise CheckCondition(ILLEGAL_REQUEST, MEDIUM_REMOVAL_PREVENTED)
        if start:
            lu.medium_present = True
        else:
            await _flush(task)
            lu.medium_present = False
    elif not start and not cdb[4] & 0x04:  # NO_FLUSH clear: stopping flushes the cache
        await _flush(task)
    lu.started = bool(start)


# ---------------------------------------------------------------- VERIFY

def _bytchk(cdb: bytes) -> int:
    return (cdb[1] >> 1) & 0x03


def verify_out_len(task: Task) -> int:
    _, blocks = task.lba_len()
    b = _bytchk(task.cdb)
    if b == 1:
        return blocks * unit(task).block_size
    if b == 3:
        return unit(task).block_size if blocks else 0
    return 0


def verify_check(task: Task) -> None:
    """BYTCHK 01b and 11b compare data: held to the MAXIMUM TRANSFER LENGTH
    that VPD 0xB0 advertises (docs/decisions/0101). BYTCHK 00b reads nothing,
    so any range of the LUN is fine."""
    b = _bytchk(task.cdb)
    if b == 2:
        raise invalid_field(1, 2)
    lba, blocks = task.lba_len()
    check_range(unit(task), lba, blocks)
    if b:
        check_xfer(task, blocks)


async def verify(task: Task) -> None:
    """BYTCHK 00b: the range check was the verification (there is no medium
    defect to find by reading, and a read of the whole LUN would cost memory
    and time in proportion to it). 01b compares the data sent, 11b the one
    block sent against every block of the range."""
    lba, blocks = task.lba_len()
    b = _bytchk(task.cdb)
    if not blocks or b == 0:
        return
    data = memoryview(data_bytes(task))
    if b == 1:
        await _compare(task, lba, blocks, lambda start, n: data[start:start + n])
        return
    lu = unit(task)
    # one chunk's worth of the block, or the range's if smaller: sized by the request
    pattern = memoryview(bytes(data) * min(blocks, max(1, CHUNK // lu.block_size)))
    await _compare(task, lba, blocks, lambda start, n: pattern[:n])


async def _compare(task: Task, lba: int, blocks: int,
                   expected: Callable[[int, int], memoryview]) -> None:
    """Read the range a chunk at a time and compare each chunk with
    expected(byte offset in the range, length): MISCOMPARE at the first
    difference, with its offset in the range."""
    lu = unit(task)
    bs = lu.block_size
    per = max(1, CHUNK // bs)
    for done in range(0, blocks, per):
        if done:
            await next_chunk()
        k = min(per, blocks - done)
        have = await read_blocks(task, lba + done, k)
        off = _first_difference(have, expected(done * bs, k * bs))
        if off is not None:
            raise _miscompare(done * bs + off)


def write_verify_check(task: Task) -> None:
    if _bytchk(task.cdb) & 0x02:
        raise invalid_field(1, 2)
    lu = unit(task)
    check_writable(lu)
    lba, blocks = task.lba_len()
    check_range(lu, lba, blocks)
    check_xfer(task, blocks)


async def write_and_verify(task: Task) -> None:
    lba, blocks, data = received_blocks(task)
    if not blocks:
        return
    refuse_after_failed_sync(unit(task))   # (always written through)
    await write_blocks(task, lba, data, True)
    if _bytchk(task.cdb):
        sent = memoryview(b"".join(data))
        await _compare(task, lba, blocks, lambda start, n: sent[start:start + n])


# ---------------------------------------------------------------- COMPARE AND WRITE, ORWRITE

def caw_out_len(task: Task) -> int:
    return 2 * task.cdb[13] * unit(task).block_size


def caw_check(task: Task) -> None:
    lu = unit(task)
    check_writable(lu)
    n = task.cdb[13]
    if n > MAX_COMPARE_AND_WRITE:
        raise invalid_field(13)
    check_range(lu, u64(task.cdb, 2), n)
    if task.exp_len != caw_out_len(task):
        raise invalid_field(13)   # the data-out buffer must hold exactly verify + write data


async def compare_and_write(task: Task) -> None:
    lu = unit(task)
    lba, n = u64(task.cdb, 2), task.cdb[13]
    if not n:
        return
    size = n * lu.block_size
    data = data_bytes(task)
    async with lu.write_gate.exclusive():
        # a backend that compares and writes itself (RBD: in the OSD) says where they differ
        caw = getattr(lu.backend, "compare_and_write", None)
        if caw is not None:
            off = await task.io(caw, lba * lu.block_size, data[:size], data[size:2 * size], _sync(task))
            if off is not None:
                raise _miscompare(off)
            return
        have = await read_blocks(task, lba, n)
        off = _first_difference(have, data[:size])
        if off is not None:
            raise _miscompare(off)
        await task.io(lu.backend.write_from, lba * lu.block_size,
                      [memoryview(data)[size:2 * size]], _sync(task))


async def orwrite(task: Task) -> None:
    """Read, OR and write back a chunk at a time (no other write enters
    meanwhile), so the merge never holds the loop for the whole transfer."""
    lu = unit(task)
    lba, blocks = task.lba_len()
    if not blocks:
        return
    data = memoryview(data_bytes(task))
    bs = lu.block_size
    per = max(1, CHUNK // bs)
    async with lu.write_gate.exclusive():
        for done in range(0, blocks, per):
            k = min(per, blocks - done)
            if done:
                await _next_range(lu, lba + done, k)
            have = await read_blocks(task, lba + done, k)
            mine = data[done * bs:(done + k) * bs]
            merged = (int.from_bytes(have, "little") | int.from_bytes(mine, "little")).to_bytes(k * bs, "little")
            await task.io(lu.backend.write_from, (lba + done) * bs, [memoryview(merged)], _sync(task))


# ---------------------------------------------------------------- PRE-FETCH, READ DEFECT DATA

def prefetch_check(task: Task) -> None:
    check_range(unit(task), *task.lba_len())


async def prefetch(task: Task) -> None:
    return None   # nothing to stage: GOOD (the cache may not hold it all)


async def read_defect_data(task: Task) -> bytes:
    cdb = task.cdb
    fmt = cdb[2] & 0x07 if len(cdb) == 10 else cdb[1] & 0x07
    if len(cdb) == 10:
        alloc = u16(cdb, 7)
        flags = cdb[2] & 0x18
        data = bytes([0, flags | fmt, 0, 0])
    else:
        alloc = u32(cdb, 6)
        flags = cdb[1] & 0x18
        data = bytes([0, flags | fmt]) + bytes(6)
    return data[:alloc]   # no defects: an empty list of the format asked for


# ---------------------------------------------------------------- WRITE SAME, UNMAP

def _ws_fields(task: Task) -> tuple[int, int, int]:
    cdb = task.cdb
    if len(cdb) == 10:
        return u32(cdb, 2), u16(cdb, 7), cdb[1]
    return u64(cdb, 2), u32(cdb, 10), cdb[1]


def _ws_blocks(task: Task) -> tuple[int, int]:
    """(LBA, blocks); zero blocks means every block to the end (WSNZ is 0)."""
    lba, n, _ = _ws_fields(task)
    if n == 0:
        n = max(0, unit(task).blocks - lba)
    return lba, n


def ws_out_len(task: Task) -> int:
    ndob = len(task.cdb) == 16 and task.cdb[1] & 0x01
    return 0 if ndob else unit(task).block_size


def ws_check(task: Task) -> None:
    lu = unit(task)
    lba, n, _ = _ws_fields(task)   # ANCHOR and a thick LU's UNMAP: refused by the row (0224)
    check_writable(lu)
    check_range(lu, lba, n)
    if lba >= lu.blocks and n == 0:
        check_range(lu, lba, 1)
    lba, n = _ws_blocks(task)
    if n > max_write_same(task):
        raise invalid_field(7 if len(task.cdb) == 10 else 10)
    if task.exp_len != ws_out_len(task):
        raise invalid_field(1, 0) if ws_out_len(task) == 0 else invalid_field(7 if len(task.cdb) == 10 else 10)


async def _discard(task: Task, lba: int, blocks: int) -> None:
    lu = task.lu
    assert lu is not None   # per command: see ops.unit()
    bs = lu.block_size
    per = max(1, _DISCARD_CHUNK // bs)
    async with lu.write_gate.shared():
        for done in range(0, blocks, per):
            k = min(per, blocks - done)
            if done:
                await _next_range(lu, lba + done, k)
            await task.io(lu.backend.discard, (lba + done) * bs, k * bs)


async def write_same(task: Task) -> None:
    """Durable at GOOD on a write-through LU only: WRITE SAME has no FUA bit
    (bit 3 of byte 1 is UNMAP). There, after a failed sync, it is refused
    before any block is written or deallocated, as any write-through write
    is (0256, 0257); the chunks are then written back (or deallocated) and
    flushed once, so the zeros an unmap leaves are durable too."""
    lu = unit(task)
    lba, n = _ws_blocks(task)
    if not n:
        return
    through = not lu.mode.wce
    if through:
        refuse_after_failed_sync(lu)
    flags = task.cdb[1]
    ndob = len(task.cdb) == 16 and flags & 0x01
    block = bytes(lu.block_size) if ndob else data_bytes(task)
    if thin(lu) and (flags & 0x08 or (ndob and block.count(0) == len(block))):
        # UNMAP: deallocate whatever the data (SBC-4 5.50: the unmap request wins);
        # LBPRZ says the blocks then read back as zeros, durably when written through
        await _discard(task, lba, n)
        if through:
            await _flush(task)
        return
    same = getattr(lu.backend, "write_same", None)
    if same is not None:   # the backend repeats the block itself (RBD: writesame in the OSDs)
        async with lu.write_gate.shared():
            await task.io(same, lba * lu.block_size, n * lu.block_size, block, through)
        return
    per = max(1, CHUNK // lu.block_size)
    chunk = memoryview(block * min(per, n))
    for done in range(0, n, per):
        k = min(per, n - done)
        if done:
            await _next_range(lu, lba + done, k)
        await write_blocks(task, lba + done, [chunk[:k * lu.block_size]], False)
    if through:
        await _flush(task)


def unmap_out_len(task: Task) -> int:
    return u16(task.cdb, 7)


def unmap_check(task: Task) -> None:
    check_writable(unit(task))   # ANCHOR: not in the row's usage (ANC_SUP 0)


async def unmap(task: Task) -> None:
    """Runs on a thin LU only: its row is enabled by `thin` (LBPU), so a thick
    LU answers INVALID COMMAND OPERATION CODE before any data moves (0295)."""
    lu = unit(task)
    plen = u16(task.cdb, 7)
    if plen == 0:
        return
    if plen < 8:
        raise param_len_error()
    data = data_bytes(task)
    if len(data) < 8:
        raise param_len_error()
    bddl = min(u16(data, 2), len(data) - 8) // 16 * 16   # a partial descriptor is ignored
    count = bddl // 16
    if count > MAX_UNMAP_DESCRIPTORS:
        raise invalid_param(2)
    ranges = []
    total = 0   # MAXIMUM UNMAP LBA COUNT (VPD 0xB0) bounds the whole command (SBC-4 5.31)
    for i in range(count):
        off = 8 + 16 * i
        lba, n = u64(data, off), u32(data, off + 8)
        total += n
        if total > MAX_UNMAP_LBA_COUNT:
            raise invalid_param(off + 8)
        check_range(lu, lba, n)
        ranges.append((lba, n))
    for i, (lba, n) in enumerate(ranges):
        if i:
            await next_chunk()   # 256 partial pages of RAM are 256 page scans
        if n:
            await _discard(task, lba, n)


# ---------------------------------------------------------------- GET LBA STATUS

async def get_lba_status(task: Task) -> bytes:
    lu = unit(task)
    lba, alloc = u64(task.cdb, 2), u32(task.cdb, 10)
    if lba >= lu.blocks:
        check_range(lu, lba, 1)
    bs = lu.block_size
    # as many descriptors as the allocation length holds (at least one, for the
    # header), and no more than the limit: fewer than would cover the rest of
    # the LUN is a legal answer (SBC-4 5.7), and the backend stops there
    want = min(max(1, (alloc - 8) // 16), MAX_LBA_STATUS_DESCRIPTORS)
    span = min(lu.blocks - lba, 1 << 24)
    # at once when the backend can answer cheaply (qemu asks before every large read)
    runs = lu.backend.mapped_extents_nowait(lba * bs, span * bs, want)
    if runs is None:
        runs = await task.io(lu.backend.mapped_extents, lba * bs, span * bs, want)
    descs = bytearray()
    for off, length, mapped in runs:
        first = off // bs
        last = (off + length + bs - 1) // bs
        descs += struct.pack(">QIB3x", first, last - first, 0 if mapped else 1)
    return (struct.pack(">I4x", len(descs) + 4) + descs)[:alloc]


# ---------------------------------------------------------------- WRITE ATOMIC(16)

def atomic_out_len(task: Task) -> int:
    return u16(task.cdb, 12) * unit(task).block_size


def atomic_check(task: Task) -> None:
    lu = unit(task)
    check_writable(lu)
    lba, n = u64(task.cdb, 2), u16(task.cdb, 12)
    if u16(task.cdb, 10):
        raise invalid_field(10)         # ATOMIC BOUNDARY: no boundary support
    check_range(lu, lba, n)
    if n > max_blocks(task):
        raise invalid_field(12)


async def write_atomic(task: Task) -> None:
    lu = unit(task)
    lba, n = u64(task.cdb, 2), u16(task.cdb, 12)
    if not n:
        return
    data = data_bytes(task)   # one buffer: a single write call lands it whole
    async with lu.write_gate.exclusive():
        await task.io(lu.backend.write_from, lba * lu.block_size, [memoryview(data)], _sync(task))


# ---------------------------------------------------------------- SANITIZE

def sanitize_out_len(task: Task) -> int:
    return u16(task.cdb, 7)


def sanitize_check(task: Task) -> None:
    lu = unit(task)
    sa = task.cdb[1] & 0x1F
    plen = u16(task.cdb, 7)
    if sa not in (0x01, 0x02, 0x03, 0x1F):
        raise invalid_field(1, 4)
    if sa != 0x01 and plen:
        raise invalid_field(7)
    if sa == 0x01 and plen == 0:
        raise invalid_field(7)
    if sa == 0x01 and (plen < 5 or plen > lu.block_size + 4):
        raise invalid_field(7)
    if sa != 0x1F:
        check_writable(lu)


async def sanitize(task: Task) -> None:
    """OVERWRITE, BLOCK ERASE, CRYPTOGRAPHIC ERASE (there is no key to drop, so it
    erases the blocks too), EXIT FAILURE MODE. The work is a job of the LU
    (one at a time: the medium is NOT READY, SANITIZE IN PROGRESS meanwhile,
    for SANITIZE too). With IMMED the command returns at once; without, it
    waits for the job, which survives aborts and resets, as SBC-4 asks. The
    job goes when the LUN or the STML does (LogicalUnit.stop_jobs)."""
    lu = unit(task)
    sa = task.cdb[1] & 0x1F
    if sa == 0x1F:
        return
    block = None
    if sa == 0x01:
        data = data_bytes(task)
        plen = u16(data, 2)
        if not data[0] & 0x1F:
            raise invalid_field(7)          # OVERWRITE COUNT 0
        if data[0] & 0x60 or plen == 0 or plen > lu.block_size or plen + 4 != len(data):
            raise invalid_param(2)
        pattern = data[4:4 + plen]
        block = (pattern * (lu.block_size // plen + 1))[:lu.block_size]
        if data[0] & 0x80:
            block = bytes(b ^ 0xFF for b in block)
    refuse_after_failed_sync(lu)   # its end is a flush: refused before it erases anything (0257)
    job = lu.start_job(_sanitize(task, lu, block))   # the entry check, run again after any wait, saw none
    failed = functools.partial(_log_failure, lu)
    if task.cdb[1] & 0x80:   # IMMED
        report_failure(job, failed)
        return
    try:
        await must_finish(job, failed)   # an aborted one's failure said, as an IMMED one's
    except asyncio.CancelledError:
        if not job.cancelled():
            raise   # this command was aborted: the job goes on
        raise CheckCondition(ABORTED_COMMAND, NO_ADDITIONAL_SENSE) from None   # the LU went


def _log_failure(lu: LogicalUnit, error: BaseException) -> None:
    """A background sanitize that failed: said once, in the log (the command
    that started it has long returned)."""
    log.error("SANITIZE of %s LUN %d failed: %s", lu.target, lu.lun, error)


async def _sanitize(task: Task, lu: LogicalUnit, block: bytes | None) -> None:
    """Overwrite (`block` in every block) or deallocate the whole LUN, a
    chunk at a time; lu.progress says how far it got (REQUEST SENSE). The
    end is the LU's as each chunk starts: a LU shrunk meanwhile (`lun resize
    --force`) is not written past its new end, which would grow its file or
    its RAM back."""
    per = max(1, (CHUNK if block is not None else _DISCARD_CHUNK) // lu.block_size)
    chunk = memoryview(block * per) if block is not None else None
    start = 0
    while start < (total := lu.blocks):
        lu.progress = (start, total)
        k = min(per, total - start)
        if chunk is not None:
            await write_blocks(task, start, [chunk[:k * lu.block_size]], False)
        else:
            await _discard(task, start, k)
        start += k
        await next_chunk()
    await _flush(task)
