"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18).

The copy manager copies block to block between logical units that the I_T
nexus of the command may access: the LUs of its own target, named by
identification CSCD descriptors (0xE4) carrying the NAA designator VPD page
0x83 reports. A designator of any other target's LU is unknown here
(COPY ABORTED, UNREACHABLE COPY TARGET): an initiator reaches nothing its
target does not grant it (the class of CVE-2020-28374). Every chunk is read
and written as that nexus: a reservation that would refuse it a READ of the
source or a WRITE of the destination aborts the copy. Segments are block to
block (0x02). Results are kept per I_T nexus and list identifier.
"""
from __future__ import annotations

import struct
from typing import Any

from stml.cdb import u16, u32, u64
from stml.lu import LogicalUnit
from stml.ops import (
    CHUNK, Conflict, check_writable, data_bytes, next_chunk, param_len_error, refuse_after_failed_sync, unit,
)
from stml.sense import (
    COPY_ABORTED, COPY_TARGET_DEVICE_NOT_REACHABLE, ILLEGAL_REQUEST, INSUFFICIENT_RESOURCES,
    NO_ADDITIONAL_SENSE, OPERATION_IN_PROGRESS, TOO_MANY_SEGMENT_DESCRIPTORS,
    TOO_MANY_TARGET_DESCRIPTORS, UNREACHABLE_COPY_TARGET, UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE,
    UNSUPPORTED_TARGET_DESCRIPTOR_TYPE, CheckCondition, invalid_field, invalid_param,
)
from stml.task import Task

MAX_CSCD = 8
MAX_SEGMENTS = 8
MAX_DESCRIPTOR_LIST = 1024
MAX_SEGMENT_BYTES = 64 << 20
MAX_INLINE = 0
MAX_CONCURRENT = 1       # EXTENDED COPY commands one LU runs at a time (as advertised)
# the longest parameter list RECEIVE COPY OPERATING PARAMETERS allows: header,
# descriptors, inline data; a longer one is refused before it is transferred
MAX_PARAM_LIST = 16 + MAX_DESCRIPTOR_LIST + MAX_INLINE
CSCD_LEN = 32
B2B_LEN = 28
IMPLEMENTED = bytes([0x02, 0xE4])   # block->block segments, identification CSCD descriptors


def xcopy_out_len(task: Task) -> int:
    return u32(task.cdb, 10)


def xcopy_check(task: Task) -> None:
    if u32(task.cdb, 10) > MAX_PARAM_LIST:
        raise param_len_error()


def _reach(task: Task, lu: LogicalUnit, rule: Conflict, lba: int, blocks: int) -> None:
    """Before each chunk: the copy target is still an LU of the target, with
    its medium ready, and its reservations let this nexus read (or write) it,
    as they would a READ or a WRITE (`rule`); else COPY ABORTED, COPY TARGET
    DEVICE NOT REACHABLE (as LIO answers). The chunk's blocks are still
    within it (a `lun resize` may have shrunk it since the segment began: a
    write past its end would grow its file or its RAM); else COPY ABORTED,
    as a segment beyond a copy target is."""
    if (task.services.target_luns(task.nexus.target).get(lu.lun) is not lu or not lu.medium_present
            or lu.sanitizing or (lu.pr is not None and lu.pr.conflicts(task.nexus, rule))):
        raise CheckCondition(COPY_ABORTED, COPY_TARGET_DEVICE_NOT_REACHABLE)
    if (lba + blocks) * lu.block_size > lu.backend.size():
        raise CheckCondition(COPY_ABORTED, NO_ADDITIONAL_SENSE)


def _parse_cscd(task: Task, d: bytes, off: int) -> LogicalUnit:
    if d[0] != 0xE4:
        raise CheckCondition(ILLEGAL_REQUEST, UNSUPPORTED_TARGET_DESCRIPTOR_TYPE)
    if d[1] & 0x1F not in (0x00,):
        raise invalid_param(off + 1)             # only block devices
    code_set, dtype = d[4] & 0x0F, d[5] & 0x0F
    assoc = (d[5] >> 4) & 0x03
    length = d[7]
    if dtype != 0x03 or code_set != 0x01 or assoc != 0 or length != 16:
        raise invalid_param(off + 5)
    lu = task.services.target_luns(task.nexus.target).by_naa(bytes(d[8:24]))   # the nexus's own target's
    if lu is None:
        raise CheckCondition(COPY_ABORTED, UNREACHABLE_COPY_TARGET)
    block = int.from_bytes(d[29:32], "big")
    if block != lu.block_size:
        raise invalid_param(off + 29)
    return lu


async def extended_copy(task: Task) -> None:
    plen = u32(task.cdb, 10)
    if plen == 0:
        return
    data = data_bytes(task)
    if len(data) < 16:
        raise param_len_error()
    list_id, usage = data[0], (data[1] >> 3) & 0x03
    cscd_len, seg_len, inline_len = u16(data, 2), u32(data, 8), u32(data, 12)
    if usage == 0x03 and list_id:
        raise invalid_param(0)
    if 16 + cscd_len + seg_len + inline_len > len(data):
        raise param_len_error()
    if cscd_len + seg_len > MAX_DESCRIPTOR_LIST:
        raise param_len_error()
    if inline_len > MAX_INLINE:
        raise invalid_param(12)
    if cscd_len % CSCD_LEN:
        raise param_len_error()
    if cscd_len // CSCD_LEN > MAX_CSCD:
        raise CheckCondition(ILLEGAL_REQUEST, TOO_MANY_TARGET_DESCRIPTORS)
    manager = unit(task)
    results = manager.copy_results
    key = task.nexus.key
    if usage != 0x03 and (results.get(key, list_id) or {}).get("status") == 0:
        raise CheckCondition(ILLEGAL_REQUEST, OPERATION_IN_PROGRESS)
    if manager.copies >= MAX_CONCURRENT:
        raise CheckCondition(ILLEGAL_REQUEST, INSUFFICIENT_RESOURCES)
    # descriptors: all parsed and checked before any block moves
    lus = []
    for i in range(cscd_len // CSCD_LEN):
        off = 16 + i * CSCD_LEN
        lus.append(_parse_cscd(task, data[off:off + CSCD_LEN], off))
    segments: list[tuple[LogicalUnit, LogicalUnit, int, int, int]] = []
    pos, end = 16 + cscd_len, 16 + cscd_len + seg_len
    while pos < end:
        if pos + 4 > end:
            raise param_len_error()
        kind, dlen = data[pos], u16(data, pos + 2)
        if kind != 0x02:
            raise CheckCondition(ILLEGAL_REQUEST, UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE)
        if dlen != B2B_LEN - 4:
            raise invalid_param(pos + 2)
        if pos + B2B_LEN > end:
            raise param_len_error()
        if len(segments) >= MAX_SEGMENTS:
            raise CheckCondition(ILLEGAL_REQUEST, TOO_MANY_SEGMENT_DESCRIPTORS)
        src_i, dst_i = u16(data, pos + 4), u16(data, pos + 6)   # CSCD descriptor indexes
        if src_i >= len(lus) or dst_i >= len(lus):
            raise CheckCondition(COPY_ABORTED, UNREACHABLE_COPY_TARGET)   # no such CSCD
        blocks, slba, dlba = u16(data, pos + 10), u64(data, pos + 12), u64(data, pos + 20)
        if lus[dst_i].block_size != lus[src_i].block_size:
            # NUMBER OF BLOCKS counts both ends' blocks alike: offsets in one LU's
            # blocks would land elsewhere in, or past the end of, the other (as LIO refuses it)
            raise invalid_param(pos + 6)
        if blocks * lus[src_i].block_size > MAX_SEGMENT_BYTES:
            raise invalid_param(pos + 10)
        segments.append((lus[src_i], lus[dst_i], blocks, slba, dlba))
        pos += B2B_LEN
    state: dict[str, Any] = {"status": 0, "segments": 0, "bytes": 0}
    if usage != 0x03:
        task.services.keep_copy_results(manager, key, list_id, state)
    manager.copies += 1
    try:
        for src, dst, blocks, slba, dlba in segments:
            if slba + blocks > src.blocks or dlba + blocks > dst.blocks:
                raise CheckCondition(COPY_ABORTED, NO_ADDITIONAL_SENSE)   # segment beyond a copy target
            check_writable(dst)
            await _copy(task, src, dst, blocks, slba, dlba, state)
            state["segments"] += 1
    except BaseException:   # refused, failed or aborted: the list id is free again
        state["status"] = 2
        raise
    finally:
        manager.copies -= 1
    state["status"] = 1


async def _copy(task: Task, src: LogicalUnit, dst: LogicalUnit, blocks: int, slba: int,
                dlba: int, state: dict[str, Any]) -> None:
    """One segment, a chunk at a time through one buffer, with a turn of the
    loop between chunks (a RAM copy would otherwise hold it for 64 MiB)."""
    bs = src.block_size
    per = max(1, CHUNK // bs)
    buf = memoryview(bytearray(min(per, blocks) * bs))
    for done in range(0, blocks, per):
        if done:
            await next_chunk()
        n = min(per, blocks - done)
        view = buf[:n * bs]
        _reach(task, src, Conflict.READ, slba + done, n)
        await task.io_on(src, src.backend.read_into, (slba + done) * bs, view)
        async with dst.write_gate.shared():
            # checked with no wait before the call: an LU removed meanwhile is
            # never written (its backend closes once no call of it is queued)
            _reach(task, dst, Conflict.WRITE, dlba + done, n)
            through = not dst.mode.wce
            if through:   # after a failed sync of dst: refused before it is written (0257)
                refuse_after_failed_sync(dst)
            await task.io_on(dst, dst.backend.write_from, (dlba + done) * bs, [view], through)
        state["bytes"] += n * bs


async def receive_copy_results(task: Task) -> bytes:
    cdb = task.cdb
    sa, alloc = cdb[1] & 0x1F, u32(cdb, 10)
    if sa == 0x03:
        body = bytearray(44)
        struct.pack_into(">HHIIIII", body, 4, MAX_CSCD, MAX_SEGMENTS, MAX_DESCRIPTOR_LIST,
                         MAX_SEGMENT_BYTES, MAX_INLINE, 0, 0)
        struct.pack_into(">H", body, 30, MAX_CONCURRENT)   # total concurrent copies
        body[32] = MAX_CONCURRENT                          # maximum concurrent copies
        body[33] = 9                                # data segment granularity: 512 bytes (log2)
        body[39] = len(IMPLEMENTED)
        body += IMPLEMENTED
        return (struct.pack(">I", len(body)) + bytes(body))[:alloc]
    state = unit(task).copy_results.get(task.nexus.key, cdb[2])
    if state is None:
        raise invalid_field(2)
    out = struct.pack(">IBHBI", 8, state["status"], state["segments"], 0, state["bytes"])
    return out[:alloc]
