"""SPC-4 commands of the disk template: INQUIRY and its VPD pages, REPORT
LUNS, REQUEST SENSE, REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT
FUNCTIONS, LOG SENSE, PREVENT ALLOW MEDIUM REMOVAL, TEST UNIT READY."""
from __future__ import annotations

import struct
from typing import Callable

from stml.cdb import encode_lun, u16, u32
from stml.lu import PRODUCT, REVISION, VENDOR, LogicalUnit
from stml.ops import OpEntry, lbppbe, max_blocks, relative_port_id, unit
from stml.sense import (
    NO_ADDITIONAL_SENSE, NO_SENSE, NOT_READY, SANITIZE_IN_PROGRESS, UNIT_ATTENTION, CheckCondition,
    build_sense, invalid_field,
)
from stml.task import Task

# limits this template advertises in VPD 0xB0 (logical blocks unless noted) and
# enforces: UNMAP's block count is a total over the command's descriptors
MAX_UNMAP_LBA_COUNT = 1 << 20
MAX_UNMAP_DESCRIPTORS = 256
MAX_COMPARE_AND_WRITE = 255
# GET LBA STATUS answers with at most this many descriptors (16 KiB), however
# large the allocation length: fewer than the rest of the LUN needs is legal
MAX_LBA_STATUS_DESCRIPTORS = 1024


def thin(lu: LogicalUnit) -> bool:
    """Logical block provisioning management is enabled: a thin LUN whose
    backend can give space back. Read-only or not: a read-only thin LU
    supports UNMAP and refuses it as it refuses every write (WRITE PROTECTED),
    as LIO's emulate_tpu does, and as libiscsi's ReadOnly suite expects (0295)."""
    return bool(lu.options.thin and getattr(lu.backend, "can_discard", False))


def max_write_same(task: Task) -> int:
    """WRITE SAME is held to the maximum transfer length: initiators (libiscsi's
    suite among them) size writes of the same range by it."""
    return max_blocks(task)


def unmap_granularity(lu: LogicalUnit) -> int:
    """The backend's granularity in blocks, or 0 (not reported) if it has none."""
    size = getattr(lu.backend, "discard_granularity", 0)
    return max(1 << lbppbe(lu), size // lu.block_size) if size else 0


def _ascii(s: str, n: int) -> bytes:
    return s.encode().ljust(n)[:n]


# ---------------------------------------------------------------- INQUIRY

def standard_inquiry(lu: LogicalUnit | None) -> bytes:
    """Standard INQUIRY data; with no LU, the 'no logical unit here' form."""
    data = bytearray(66)
    if lu is None:
        data[0] = 0x7F  # peripheral qualifier 3, device type 0x1F
    else:
        data[1] = 0x80 if lu.options.removable else 0
        data[5] = 0x08 | 0x10  # 3PC: EXTENDED COPY; TPGS 01b: implicit ALUA (stml.alua)
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HiSup, response data format 2
    data[4] = len(data) - 5
    data[7] = 0x02  # CmdQue
    data[8:16] = _ascii(VENDOR, 8)
    data[16:32] = _ascii(PRODUCT, 16)
    data[32:36] = _ascii(REVISION, 4)
    struct.pack_into(">4H", data, 58, 0x00A0, 0x0460, 0x04C0, 0x0960)  # SAM-5 SPC-4 SBC-3 iSCSI
    return bytes(data)


def _vpd(page: int, body: bytes) -> bytes:
    return bytes([0, page]) + struct.pack(">H", len(body)) + body


def vpd_supported(lu: LogicalUnit, task: Task) -> bytes:
    return _vpd(0x00, bytes(sorted(VPD_PAGES)))


def vpd_serial(lu: LogicalUnit, task: Task) -> bytes:
    return _vpd(0x80, lu.serial.encode())


def _designator(code_set: int, piv_assoc_type: int, value: bytes, proto: int = 0) -> bytes:
    return bytes([(proto << 4) | code_set, piv_assoc_type, 0, len(value)]) + value


def _name_string(s: str) -> bytes:
    """SCSI name string: UTF-8, null terminated, padded to a multiple of 4."""
    raw = s.encode() + b"\0"
    return raw + bytes(-len(raw) % 4)


def relative_port(task: Task) -> int:
    """The relative target port identifier of the nexus's port (ops.relative_port_id)."""
    return relative_port_id(task.nexus.tpg)


def lu_designators(lu: LogicalUnit) -> bytes:
    """The designators that name the logical unit itself (association 0)."""
    naa = _designator(0x1, 0x03, lu.naa)
    t10 = _designator(0x2, 0x01, _ascii(VENDOR, 8) + lu.serial.encode())
    return naa + t10


def vpd_device_id(lu: LogicalUnit, task: Task) -> bytes:
    body = lu_designators(lu)
    if task is not None and task.nexus is not None:
        port, tpg = relative_port(task), task.nexus.tpg
        iscsi = 0x5  # protocol identifier: iSCSI
        body += _designator(0x1, 0x94, struct.pack(">HH", 0, port), iscsi)      # relative target port
        body += _designator(0x1, 0x95, struct.pack(">HH", 0, tpg), iscsi)       # target port group
        body += _designator(0x3, 0x98, _name_string(f"{lu.target},t,0x{tpg:04x}"), iscsi)  # port name
        body += _designator(0x3, 0xA8, _name_string(lu.target), iscsi)          # target device name
    return _vpd(0x83, body)


def vpd_extended(lu: LogicalUnit, task: Task) -> bytes:
    body = bytearray(0x3C)
    body[1] = 0x10 | 0x08 | 0x04   # HEADSUP, ORDSUP, SIMPSUP
    body[2] = 0x01                 # V_SUP: a volatile cache (WCE)
    return _vpd(0x86, bytes(body))


def vpd_block_limits(lu: LogicalUnit, task: Task) -> bytes:
    body = bytearray(0x3C)
    mb = max_blocks(task)
    lbp = thin(lu)
    body[1] = MAX_COMPARE_AND_WRITE
    struct.pack_into(">H", body, 2, 1 << lbppbe(lu))            # optimal transfer granularity
    struct.pack_into(">I", body, 4, mb)                         # maximum transfer length
    struct.pack_into(">I", body, 8, min(mb, (1 << 20) // lu.block_size))  # optimal transfer length
    # maximum prefetch length: 0, no limit. PRE-FETCH stages nothing (its cost
    # is its range check), and its length 0 means "to the end of the medium",
    # which libiscsi's PreFetch*.ZeroBlocks expects GOOD on any LUN
    if lbp:
        struct.pack_into(">I", body, 16, MAX_UNMAP_LBA_COUNT)
        struct.pack_into(">I", body, 20, MAX_UNMAP_DESCRIPTORS)
        granularity = unmap_granularity(lu)
        struct.pack_into(">I", body, 24, granularity)
        if granularity:
            struct.pack_into(">I", body, 28, 0x80000000)        # UGAVALID, alignment 0
    struct.pack_into(">Q", body, 32, max_write_same(task))
    struct.pack_into(">I", body, 40, mb)                        # maximum atomic transfer length
    # atomic alignment 0, granularity 0, no atomic boundary support
    return _vpd(0xB0, bytes(body))


def vpd_block_characteristics(lu: LogicalUnit, task: Task) -> bytes:
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, 1)   # non-rotating medium
    body[3] = 0x40 | 0x10                # WABEREQ, WACEREQ 01b: reads after an erase succeed
    return _vpd(0xB1, bytes(body))


def vpd_provisioning(lu: LogicalUnit, task: Task) -> bytes:
    body = bytearray(4)
    if thin(lu):
        body[1] = 0x80 | 0x40 | 0x20 | (1 << 2)   # LBPU LBPWS LBPWS10, LBPRZ 001b
        body[2] = 0x02                            # provisioning type: thin
    return _vpd(0xB2, bytes(body))


VPD_PAGES: dict[int, Callable[["LogicalUnit", "Task"], bytes]] = {
    0x00: vpd_supported,
    0x80: vpd_serial,
    0x83: vpd_device_id,
    0x86: vpd_extended,
    0xB0: vpd_block_limits,
    0xB1: vpd_block_characteristics,
    0xB2: vpd_provisioning,
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
    return build(unit(task), task)[:alloc]


# ---------------------------------------------------------------- misc SPC

async def report_luns(task: Task) -> bytes:
    cdb = task.cdb
    if cdb[2] not in (0x00, 0x01, 0x02):
        raise invalid_field(2)
    alloc = u32(cdb, 6)
    if alloc < 16:
        raise invalid_field(6)
    shown: list[int] = []
    total = 0
    if cdb[2] != 0x01:   # 01h: well known LUNs only, and there are none
        luns = task.services.target_luns(task.nexus.target)
        # only the entries the allocation length holds are taken and built, from
        # the order the map keeps: no sort of the target's LUNs per call (0223)
        shown, total = luns.numbers(-(-(alloc - 8) // 8)), len(luns)
    body = b"".join(encode_lun(n) for n in shown)
    return (struct.pack(">I", 8 * total) + bytes(4) + body)[:alloc]


def sanitize_in_progress(lu: LogicalUnit) -> CheckCondition:
    """NOT READY, SANITIZE IN PROGRESS, with how far it got (SBC-4 4.11)."""
    done, total = lu.progress
    return CheckCondition(NOT_READY, SANITIZE_IN_PROGRESS, progress=(done << 16) // max(total, 1))


async def request_sense(task: Task) -> bytes:
    """Autosense is always on, so what remains is a pending unit attention, a
    sanitize under way (with its progress), or NO SENSE."""
    desc = bool(task.cdb[1] & 1)
    lu = task.lu
    ua = task.services.take_ua(lu, task.nexus) if lu else None
    if ua:
        sense = build_sense(UNIT_ATTENTION, ua, desc)
    elif lu is not None and lu.sanitizing:
        sense = sanitize_in_progress(lu).sense(desc)
    else:
        sense = build_sense(NO_SENSE, NO_ADDITIONAL_SENSE, desc)
    return sense[:task.cdb[4]]


async def test_unit_ready(task: Task) -> None:
    return None


# ---- REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): generated from the table

def _timeouts(e: OpEntry) -> bytes:
    return struct.pack(">HBBII", 0x0A, 0, 0, e.timeout, e.timeout * 2)


def _entries(task: Task) -> list[OpEntry]:
    """The rows this LU supports: a row it does not enable is reported as no
    row at all, as its commands are answered (0295)."""
    lu = unit(task)
    return sorted((e for e in lu.template.entries if e.enabled is None or e.enabled(lu)),
                  key=lambda e: (e.opcode, e.sa or 0))


async def report_supported_opcodes(task: Task) -> bytes:
    cdb = task.cdb
    rctd, option = cdb[2] & 0x80, cdb[2] & 0x07
    opcode, sa = cdb[3], u16(cdb, 4)
    alloc = u32(cdb, 6)
    entries = _entries(task)
    if option == 0:
        out = bytearray()
        for e in entries:
            flags = (0x02 if rctd else 0) | (0x01 if e.sa is not None else 0)
            out += struct.pack(">BBHBBH", e.opcode, 0, e.sa or 0, 0, flags, len(e.usage))
            if rctd:
                out += _timeouts(e)
        return (struct.pack(">I", len(out)) + out)[:alloc]
    if option > 3:
        raise invalid_field(2, 2)
    with_sa = [e for e in entries if e.opcode == opcode and e.sa is not None]
    plain = [e for e in entries if e.opcode == opcode and e.sa is None]
    if option == 1:
        if with_sa:
            raise invalid_field(2, 2)
        match = plain
    elif option == 2:
        if plain:
            raise invalid_field(2, 2)
        match = [e for e in with_sa if e.sa == sa]
    else:  # 3: opcode, and the service action when the opcode has service actions
        match = [e for e in with_sa if e.sa == sa] if with_sa else plain
    if not match:
        return bytes([0, 0x01, 0, 0])[:alloc]   # SUPPORT 001b: not supported
    e = match[0]
    usage = bytearray(e.usage_for(unit(task)))
    if e.sa is not None:
        usage[1] = (usage[1] & 0xE0) | e.sa if len(usage) > 1 else usage[1]
    one_command = bytes([0, (0x80 if rctd else 0) | 0x03]) + struct.pack(">H", len(usage)) + bytes(usage)
    if rctd:
        one_command += _timeouts(e)
    return one_command[:alloc]


async def report_supported_tmfs(task: Task) -> bytes:
    """ABORT TASK (SET), CLEAR TASK SET, LUN RESET, QUERY TASK, TARGET RESET;
    QUERY ASYNCHRONOUS EVENT, QUERY TASK SET, I_T NEXUS RESET."""
    repd = task.cdb[2] & 0x80
    data = bytearray(16 if repd else 4)
    data[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x04 | 0x02
    data[1] = 0x04 | 0x02 | 0x01
    if repd:
        data[3] = 0x0C
    return bytes(data)[:u32(task.cdb, 6)]


# ---- LOG SENSE: the supported pages pages only

LOG_PAGES = (0x00,)


async def log_sense(task: Task) -> bytes:
    cdb = task.cdb
    page, subpage = cdb[2] & 0x3F, cdb[3]
    alloc = u16(cdb, 7)
    if u16(cdb, 5):
        raise invalid_field(5)          # no page has parameters to start from
    if page != 0x00:
        raise invalid_field(2, 5)
    if subpage == 0x00:
        body = bytes(LOG_PAGES)
        return (bytes([0x00, 0x00]) + struct.pack(">H", len(body)) + body)[:alloc]
    if subpage == 0xFF:
        body = b"".join(bytes([p, 0x00]) + bytes([p, 0xFF]) for p in LOG_PAGES)
        return (bytes([0x40, 0xFF]) + struct.pack(">H", len(body)) + body)[:alloc]
    raise invalid_field(3)


# ---- PREVENT ALLOW MEDIUM REMOVAL

async def prevent_allow(task: Task) -> None:
    lu = unit(task)
    prevent = task.cdb[4] & 0x03
    if prevent in (2, 3):
        raise invalid_field(4, 1)   # persistent prevent: media changers only
    if not lu.options.removable:
        return
    # the engine keeps it: a nexus that ends leaves no entry (drop_nexus), so the
    # set holds live nexuses only and no call walks it (0297)
    task.services.prevent_removal(lu, task.nexus.key, bool(prevent))


def removal_prevented(task: Task) -> bool:
    """Some live I_T nexus prevents medium removal."""
    return bool(unit(task).prevent)
