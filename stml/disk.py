"""The disk (SBC) device template: an opcode table and its handlers.

Each OpEntry carries what the STML needs to treat the command generically:
its CDB usage mask (CDB validation and REPORT SUPPORTED OPERATION CODES come
from it), its data direction and how many bytes it expects from the
initiator, whether it is exempt from unit attentions, and its handler.
Handlers are coroutines taking the Task and returning read data (or None);
errors are raised as CheckCondition.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from stml.api import DataDir
from stml.cdb import encode_lun, lba_len, u16, u32
from stml.lu import PRODUCT, REVISION, VENDOR
from stml.sense import (
    DATA_PROTECT, ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE, LBA_OUT_OF_RANGE,
    NO_ADDITIONAL_SENSE, NO_SENSE, SAVING_PARAMETERS_NOT_SUPPORTED, UNIT_ATTENTION,
    WRITE_PROTECTED, CheckCondition, build_sense, invalid_field,
)

if TYPE_CHECKING:
    from stml.emulator import Task
    from stml.lu import LogicalUnit

Handler = Callable[["Task"], Awaitable["bytes | bytearray | memoryview | None"]]


@dataclass(frozen=True, slots=True)
class OpEntry:
    opcode: int
    name: str
    usage: bytes                          # CDB usage data: allowed bits per byte
    handler: Handler
    direction: DataDir = DataDir.NONE
    out_len: Callable[["Task"], int] | None = None   # bytes the initiator sends
    check: Callable[["Task"], None] | None = None     # checks to pass before data moves
    sa: int | None = None                 # service action (byte 1, low 5 bits)
    ua_exempt: bool = False               # runs despite a pending unit attention
    conflicts: bool = True                # subject to reservation conflicts
    partial: bool = False                 # may run on less data than the CDB asks for


def _u(*b: int) -> bytes:
    return bytes(b)


# ---------------------------------------------------------------- helpers

def check_range(lu: LogicalUnit, lba: int, blocks: int) -> None:
    if lba + blocks > lu.blocks:
        raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def check_writable(lu: LogicalUnit) -> None:
    if lu.options.ro:
        raise CheckCondition(DATA_PROTECT, WRITE_PROTECTED)


def rw_out_len(task: Task) -> int:
    return lba_len(task.cdb)[1] * task.lu.block_size


def write_check(task: Task) -> None:
    """A write that will fail must fail before its data is transferred."""
    check_writable(task.lu)
    check_range(task.lu, *lba_len(task.cdb))


def trim_views(bufs: list[memoryview], n: int) -> list[memoryview]:
    out, total = [], 0
    for b in bufs:
        if total + len(b) >= n:
            out.append(b[:n - total])
            break
        out.append(b)
        total += len(b)
    return out


def _fua(cdb: bytes) -> bool:
    return len(cdb) > 6 and bool(cdb[1] & 0x08)


# ---------------------------------------------------------------- SBC

async def read(task: Task) -> bytearray:
    lu = task.lu
    lba, blocks = lba_len(task.cdb)
    check_range(lu, lba, blocks)
    buf = bytearray(blocks * lu.block_size)
    if buf:
        await task.io(lu.backend.read_into, lba * lu.block_size, memoryview(buf))
    return buf


async def write(task: Task) -> None:
    """Writes the whole blocks received: an initiator that sends less than the
    CDB says (iSCSI expected length too small) writes only those."""
    lu = task.lu
    lba, blocks = lba_len(task.cdb)
    blocks = min(blocks, task.want // lu.block_size)
    if blocks:
        sync = _fua(task.cdb) or not lu.mode.wce
        data = task.data_out if task.want == blocks * lu.block_size else \
            trim_views(task.data_out, blocks * lu.block_size)
        await task.io(lu.backend.write_from, lba * lu.block_size, data, sync)


async def synchronize_cache(task: Task) -> None:
    cdb = task.cdb
    if len(cdb) == 10:
        lba, blocks = u32(cdb, 2), u16(cdb, 7)
    else:
        lba, blocks = struct.unpack_from(">QI", cdb, 2)
    check_range(task.lu, lba, blocks)
    await task.io(task.lu.backend.flush)


async def read_capacity10(task: Task) -> bytes:
    cdb = task.cdb
    if not cdb[8] & 1 and u32(cdb, 2):
        raise invalid_field(2)  # an LBA without PMI is an error (SBC-4 5.20.2)
    last = task.lu.blocks - 1
    return struct.pack(">II", min(last, 0xFFFFFFFF), task.lu.block_size)


async def read_capacity16(task: Task) -> bytes:
    lu = task.lu
    alloc = u32(task.cdb, 10)
    data = struct.pack(">QIBBH", lu.blocks - 1, lu.block_size, 0, 0, 0) + bytes(16)
    return data[:alloc]


async def start_stop_unit(task: Task) -> None:
    cdb = task.cdb
    power_condition = cdb[4] >> 4
    if power_condition:
        return  # power conditions are accepted and have no effect on this device
    start, loej = cdb[4] & 1, cdb[4] & 2
    if loej and not task.lu.options.removable:
        raise invalid_field(4, 1)
    if not start and not cdb[4] & 0x04:  # NO_FLUSH clear: stopping flushes the cache
        await task.io(task.lu.backend.flush)
    task.lu.started = bool(start)


async def test_unit_ready(task: Task) -> None:
    return None


# ---------------------------------------------------------------- SPC

def _ascii(s: str, n: int) -> bytes:
    return s.encode().ljust(n)[:n]


def standard_inquiry(lu: LogicalUnit | None) -> bytes:
    """Standard INQUIRY data; with no LU, the 'no logical unit here' form."""
    data = bytearray(66)
    if lu is None:
        data[0] = 0x7F  # peripheral qualifier 3, device type 0x1F
    else:
        data[1] = 0x80 if lu.options.removable else 0
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HiSup, response data format 2
    data[4] = len(data) - 5
    data[7] = 0x02  # CmdQue
    data[8:16] = _ascii(VENDOR, 8)
    data[16:32] = _ascii(PRODUCT, 16)
    data[32:36] = _ascii(REVISION, 4)
    struct.pack_into(">4H", data, 58, 0x00A0, 0x0460, 0x04C0, 0x0960)  # SAM-5 SPC-4 SBC-3 iSCSI
    return bytes(data)


def vpd_supported(lu: LogicalUnit, task: Task) -> bytes:
    pages = bytes(sorted(VPD_PAGES))
    return bytes([0, 0x00, 0, len(pages)]) + pages


def vpd_serial(lu: LogicalUnit, task: Task) -> bytes:
    s = lu.serial.encode()
    return bytes([0, 0x80, 0, len(s)]) + s


def vpd_device_id(lu: LogicalUnit, task: Task) -> bytes:
    naa = bytes([0x01, 0x03, 0x00, len(lu.naa)]) + lu.naa
    t10 = _ascii(VENDOR, 8) + lu.serial.encode()
    t10 = bytes([0x02, 0x01, 0x00, len(t10)]) + t10
    body = naa + t10
    return bytes([0, 0x83]) + struct.pack(">H", len(body)) + body


VPD_PAGES: dict[int, Callable[["LogicalUnit", "Task"], bytes]] = {
    0x00: vpd_supported,
    0x80: vpd_serial,
    0x83: vpd_device_id,
}


async def inquiry(task: Task) -> bytes:
    cdb = task.cdb
    alloc = u16(cdb, 3)
    evpd, page = cdb[1] & 1, cdb[2]
    if not evpd:
        if page:
            raise invalid_field(2)
        return standard_inquiry(task.lu)[:alloc]
    build = VPD_PAGES.get(page)
    if build is None:
        raise invalid_field(2)
    return build(task.lu, task)[:alloc]


async def report_luns(task: Task) -> bytes:
    cdb = task.cdb
    if cdb[2] not in (0x00, 0x01, 0x02):
        raise invalid_field(2)
    alloc = u32(cdb, 6)
    if alloc < 16:
        raise invalid_field(6)
    luns = task.emulator.luns_of(task.nexus.target)
    body = b"".join(encode_lun(n) for n in sorted(luns)) if cdb[2] != 0x01 else b""
    return (struct.pack(">I", len(body)) + bytes(4) + body)[:alloc]


async def request_sense(task: Task) -> bytes:
    """Autosense is always on, so only a pending unit attention or NO SENSE remains."""
    desc = bool(task.cdb[1] & 1)
    ua = task.lu.take_ua(task.nexus) if task.lu else None
    if ua:
        sense = build_sense(UNIT_ATTENTION, ua, desc)
    else:
        sense = build_sense(NO_SENSE, NO_ADDITIONAL_SENSE, desc)
    return sense[:task.cdb[4]]


# ---- MODE SENSE: each page is (builder of current values, changeable mask)

def _caching_page(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(20)
    page[0], page[1] = 0x08, 18
    if pc == 1:
        page[2] = 0x04           # WCE is changeable
    elif pc == 2:
        page[2] = 0x04 if lu.options.write_cache else 0
    else:
        page[2] = 0x04 if lu.mode.wce else 0
    return bytes(page)


def _control_page(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = 0x0A, 10
    if pc == 1:
        page[2] = 0x04           # D_SENSE is changeable
        return bytes(page)
    page[2] = 0x04 if (lu.mode.d_sense and pc == 0) else 0
    page[3] = 0x10               # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    page[8:10] = b"\xff\xff"     # busy timeout: unlimited
    return bytes(page)


MODE_PAGES: dict[int, Callable[["LogicalUnit", int], bytes]] = {
    0x08: _caching_page,
    0x0A: _control_page,
}


def _mode_pages(lu: LogicalUnit, page: int, subpage: int, pc: int) -> bytes:
    if pc == 3:
        raise CheckCondition(ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED)
    if page == 0x3F:
        if subpage not in (0x00, 0xFF):
            raise invalid_field(3)
        return b"".join(MODE_PAGES[p](lu, pc) for p in sorted(MODE_PAGES))
    if subpage or page not in MODE_PAGES:
        raise invalid_field(2 if page not in MODE_PAGES else 3)
    return MODE_PAGES[page](lu, pc)


def _block_descriptor(lu: LogicalUnit) -> bytes:
    return struct.pack(">I", min(lu.blocks, 0xFFFFFFFF)) + b"\0" + lu.block_size.to_bytes(3, "big")


async def mode_sense(task: Task) -> bytes:
    cdb, lu = task.cdb, task.lu
    six = len(cdb) == 6
    dbd = cdb[1] & 0x08
    pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    pages = _mode_pages(lu, page, subpage, pc)
    bd = b"" if dbd else _block_descriptor(lu)
    dev_specific = (0x80 if lu.options.ro else 0) | 0x10  # WP, DPOFUA
    if six:
        alloc = cdb[4]
        header = bytes([3 + len(bd) + len(pages), 0, dev_specific, len(bd)])
    else:
        alloc = u16(cdb, 7)
        header = struct.pack(">HBBBBH", 6 + len(bd) + len(pages), 0, dev_specific, 0, 0, len(bd))
    return (header + bd + pages)[:alloc]


# ---------------------------------------------------------------- the table

_RW_USE = 0x18  # DPO, FUA; RDPROTECT/WRPROTECT must be zero (no protection information)

OPCODES: list[OpEntry] = [
    OpEntry(0x00, "TEST UNIT READY", _u(0x00, 0, 0, 0, 0, 0), test_unit_ready),
    OpEntry(0x03, "REQUEST SENSE", _u(0x03, 0x01, 0, 0, 0xFF, 0), request_sense, DataDir.READ,
            ua_exempt=True, conflicts=False),
    OpEntry(0x08, "READ(6)", _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0), read, DataDir.READ),
    OpEntry(0x0A, "WRITE(6)", _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0), write, DataDir.WRITE, rw_out_len, write_check, partial=True),
    OpEntry(0x12, "INQUIRY", _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0), inquiry, DataDir.READ,
            ua_exempt=True, conflicts=False),
    OpEntry(0x1A, "MODE SENSE(6)", _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0), mode_sense, DataDir.READ),
    OpEntry(0x1B, "START STOP UNIT", _u(0x1B, 0x01, 0, 0x0F, 0xF7, 0), start_stop_unit),
    OpEntry(0x25, "READ CAPACITY(10)", _u(0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0),
            read_capacity10, DataDir.READ, conflicts=False),
    OpEntry(0x28, "READ(10)", _u(0x28, _RW_USE | 0x04, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0),
            read, DataDir.READ),
    OpEntry(0x2A, "WRITE(10)", _u(0x2A, _RW_USE, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0),
            write, DataDir.WRITE, rw_out_len, write_check, partial=True),
    OpEntry(0x35, "SYNCHRONIZE CACHE(10)", _u(0x35, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0),
            synchronize_cache),
    OpEntry(0x5A, "MODE SENSE(10)", _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0),
            mode_sense, DataDir.READ),
    OpEntry(0x88, "READ(16)", _u(0x88, _RW_USE | 0x04, *[0xFF] * 12, 0x3F, 0), read, DataDir.READ),
    OpEntry(0x8A, "WRITE(16)", _u(0x8A, _RW_USE, *[0xFF] * 12, 0x3F, 0), write, DataDir.WRITE, rw_out_len, write_check, partial=True),
    OpEntry(0x91, "SYNCHRONIZE CACHE(16)", _u(0x91, 0x06, *[0xFF] * 12, 0x3F, 0), synchronize_cache),
    OpEntry(0x9E, "READ CAPACITY(16)", _u(0x9E, 0x1F, *[0xFF] * 12, 0x01, 0), read_capacity16,
            DataDir.READ, sa=0x10, conflicts=False),
    OpEntry(0xA0, "REPORT LUNS", _u(0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
            report_luns, DataDir.READ, ua_exempt=True, conflicts=False),
    OpEntry(0xA8, "READ(12)", _u(0xA8, _RW_USE | 0x04, *[0xFF] * 8, 0x3F, 0), read, DataDir.READ),
    OpEntry(0xAA, "WRITE(12)", _u(0xAA, _RW_USE, *[0xFF] * 8, 0x3F, 0), write, DataDir.WRITE, rw_out_len, write_check, partial=True),
]


class DiskTemplate:
    """SBC direct-access device: resolves a CDB to its OpEntry."""

    name = "disk"
    peripheral_type = 0x00

    def __init__(self, entries: list[OpEntry] = OPCODES) -> None:
        self.by_opcode: dict[int, OpEntry | dict[int, OpEntry]] = {}
        for e in entries:
            if e.sa is None:
                self.by_opcode[e.opcode] = e
            else:
                self.by_opcode.setdefault(e.opcode, {})[e.sa] = e  # type: ignore[index]

    def lookup(self, cdb: bytes) -> OpEntry:
        """The entry for this CDB; INVALID COMMAND OPERATION CODE when none, and
        INVALID FIELD IN CDB for an unknown service action."""
        entry = self.by_opcode.get(cdb[0])
        if entry is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
        if isinstance(entry, dict):
            if len(cdb) < 2:
                raise CheckCondition(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
            entry = entry.get(cdb[1] & 0x1F)
            if entry is None:
                raise invalid_field(1, 4)
        if len(cdb) < len(entry.usage):
            raise invalid_field(len(cdb) - 1)
        return entry
