"""The disk template's opcode table: every entry's CDB validation, REPORT
SUPPORTED OPERATION CODES derived from the table, VPD pages."""
from __future__ import annotations

import struct

import pytest

from stml.disk import DiskTemplate
from stml.lu import LunOptions
from stml.sense import CHECK_CONDITION, GOOD, ILLEGAL_REQUEST
from support.sbc_harness import Harness, run


def _base(e) -> bytearray:
    cdb = bytearray(len(e.usage))
    cdb[0] = e.opcode
    if e.sa is not None:
        cdb[1] = e.sa
    return cdb


OPCODES = DiskTemplate().entries   # this module's rows and those reservations/ALUA add


@pytest.mark.parametrize("entry", OPCODES, ids=lambda e: e.name)
def test_reserved_bits_rejected_with_field_pointer(entry):
    async def go():
        h = Harness()
        for i in range(1, len(entry.usage)):
            for bit in range(8):
                if entry.usage[i] & (1 << bit):
                    continue
                cdb = _base(entry)
                cdb[i] |= 1 << bit
                r = await h.cmd(bytes(cdb), alloc=0)
                assert r.status == CHECK_CONDITION, (entry.name, i, bit)
                assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0), (entry.name, i, bit)
                assert r.field == (i, bit), (entry.name, i, bit, r.field)
    run(go())


def test_unknown_opcode_and_service_action():
    async def go():
        h = Harness()
        r = await h.cmd(bytes([0xFF]) + bytes(15))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x20, 0)
        r = await h.cmd(bytes([0x9E, 0x1E]) + bytes(14))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0) and r.field == (1, 4)
    run(go())


def _rsoc(option: int, opcode: int = 0, sa: int = 0, rctd: bool = False) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, option | (0x80 if rctd else 0), opcode, sa, 65535, 0, 0)


def test_report_supported_opcodes_all_from_table():
    async def go():
        h = Harness()
        r = await h.cmd(_rsoc(0))
        assert r.status == GOOD
        n = struct.unpack_from(">I", r.data)[0]
        assert n == len(r.data) - 4 == 8 * len(OPCODES)
        got = set()
        for off in range(4, len(r.data), 8):
            op, _, sa, _, flags, cdblen = struct.unpack_from(">BBHBBH", r.data, off)
            got.add((op, sa if flags & 1 else None, cdblen))
        assert got == {(e.opcode, e.sa, len(e.usage)) for e in OPCODES}
        r = await h.cmd(_rsoc(0, rctd=True))
        assert len(r.data) - 4 == 20 * len(OPCODES)
        assert r.data[4 + 5] & 0x02   # CTDP
    run(go())


def test_report_supported_opcodes_one_command():
    async def go():
        h = Harness()
        for e in OPCODES:
            if e.sa is None:
                r = await h.cmd(_rsoc(1, e.opcode))
                assert r.status == GOOD, e.name
                assert r.data[1] & 7 == 3
                assert r.data[4:] == e.usage
                r = await h.cmd(_rsoc(2, e.opcode))
                assert r.status == CHECK_CONDITION, e.name
            else:
                r = await h.cmd(_rsoc(2, e.opcode, e.sa, rctd=True))
                assert r.status == GOOD, e.name
                n = struct.unpack_from(">H", r.data, 2)[0]
                usage = r.data[4:4 + n]
                assert usage[0] == e.opcode and usage[1] & 0x1F == e.sa
                assert len(r.data) == 4 + n + 12
                r = await h.cmd(_rsoc(1, e.opcode))
                assert r.status == CHECK_CONDITION, e.name
        r = await h.cmd(_rsoc(1, 0xFF))
        assert r.status == GOOD and r.data[1] & 7 == 1
    run(go())


def test_each_lu_enforces_the_usage_data_it_reports():
    """For every row, on a thin and on a thick LU: a CDB bit that REPORT
    SUPPORTED OPERATION CODES leaves out of that LU's usage data is refused
    at that bit (0224). RSOC showed WRITE SAME's UNMAP bit on a thick LU,
    whose handler refused it, and ANCHOR bits no LU supports (ANC_SUP 0)."""
    async def go():
        h = Harness([LunOptions("ram", size=1 << 20), LunOptions("ram", size=1 << 20, thin=False)])
        shown = {}
        for lun in (0, 1):
            for e in OPCODES:
                r = await h.cmd(_rsoc(3, e.opcode, e.sa or 0), lun=lun)
                if r.data[1] & 7 != 3:
                    continue   # not supported on this LU (UNMAP on a thick one)
                usage = r.data[4:4 + struct.unpack_from(">H", r.data, 2)[0]]
                shown[lun, e.opcode, e.sa] = usage
                for i in range(1, len(usage)):
                    for bit in range(8):
                        if usage[i] & (1 << bit) or (e.sa is not None and i == 1 and bit < 5):
                            continue
                        cdb = _base(e)
                        cdb[i] |= 1 << bit
                        r = await h.cmd(bytes(cdb), alloc=0, lun=lun)
                        assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0), (lun, e.name, i, bit)
                        assert r.field == (i, bit), (lun, e.name, i, bit, r.field)
        for ws in (0x41, 0x93):   # UNMAP bit on the thin LU only, ANCHOR on neither
            assert shown[0, ws, None][1] & 0x18 == 0x08 and shown[1, ws, None][1] & 0x18 == 0
        assert shown[0, 0x42, None][1] == 0 and (1, 0x42, None) not in shown
    run(go())


def test_report_supported_tmfs():
    async def go():
        h = Harness()
        r = await h.cmd(bytes([0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]))
        assert r.status == GOOD and len(r.data) == 4 and r.data[0] & 0x80
    run(go())


def _inq(page: int, alloc: int = 255) -> bytes:
    return bytes([0x12, 1, page]) + struct.pack(">H", alloc) + b"\0"


def test_vpd_pages():
    async def go():
        h = Harness([LunOptions("ram", size=16 << 20), LunOptions("ram", size=16 << 20, thin=False)])
        r = await h.cmd(_inq(0x00))
        pages = list(r.data[4:4 + r.data[3]])
        assert pages == [0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2]
        for p in pages:
            r = await h.cmd(_inq(p))
            assert r.status == GOOD and r.data[1] == p
            assert len(r.data) == 4 + struct.unpack_from(">H", r.data, 2)[0]
        bl = (await h.cmd(_inq(0xB0))).data
        assert bl[3] == 0x3C
        assert struct.unpack_from(">I", bl, 8)[0] == (8 << 20) // 512
        assert struct.unpack_from(">I", bl, 20)[0] > 0 and struct.unpack_from(">I", bl, 24)[0] > 0
        lbp = (await h.cmd(_inq(0xB2))).data
        assert lbp[5] & 0xE0 == 0xE0 and (lbp[5] >> 2) & 7 == 1 and lbp[6] & 7 == 2
        rc16 = (await h.cmd(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2))).data
        assert rc16[14] & 0xC0 == 0xC0
        # a thick LUN: no LBPME, no unmap limits, no LBP bits
        rc16 = (await h.cmd(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2), lun=1)).data
        assert rc16[14] & 0xC0 == 0
        lbp = (await h.cmd(_inq(0xB2), lun=1)).data
        assert lbp[5] == 0
        bl = (await h.cmd(_inq(0xB0), lun=1)).data
        assert struct.unpack_from(">I", bl, 20)[0] == 0
        dev = (await h.cmd(_inq(0x83))).data
        assert dev[4:8] == bytes([0x01, 0x03, 0x00, 16]) and dev[8] >> 4 == 6
        kinds = []
        pos = 4
        while pos < len(dev):
            kinds.append(dev[pos + 1] & 0x3F)
            pos += 4 + dev[pos + 3]
        assert {0x03, 0x01, 0x14, 0x15} <= set(kinds)   # NAA, T10, relative port, TPG
    run(go())


def test_transfer_length_over_maximum():
    async def go():
        h = Harness()
        maxb = (8 << 20) // 512
        r = await h.cmd(bytes([0x28, 0]) + struct.pack(">IBH", 0, 0, maxb + 1) + b"\0")
        assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0) and r.field == (7, None)
        r = await h.cmd(bytes([0x88, 0]) + struct.pack(">QI", h.lu().blocks, 1) + bytes(2))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x21, 0)
    run(go())


def test_mode_select_changes_wce_and_raises_ua_for_others():
    async def go():
        h = Harness()
        h.nexus(2, "iqn.init:two")
        ms = (await h.cmd(bytes([0x1A, 0x08, 0x08, 0, 255, 0]))).data
        page = bytearray(ms[4:])
        assert page[0] == 0x08
        page[2] |= 0x04
        r = await h.cmd(bytes([0x15, 0x10, 0, 0, 4 + len(page), 0]), bytes(4) + page)
        assert r.status == GOOD and h.lu().mode.wce
        r = await h.cmd(bytes(6), nexus=2)
        assert r.key_asc == (0x6, 0x2A, 0x01)
        r = await h.cmd(bytes(6), nexus=1)
        assert r.status == GOOD
        # a non-changeable bit: INVALID FIELD IN PARAMETER LIST pointing at it
        page[12] ^= 0x01
        r = await h.cmd(bytes([0x15, 0x10, 0, 0, 4 + len(page), 0]), bytes(4) + page)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x26, 0)
    run(go())


def test_compare_and_write_and_verify_miscompare_offset():
    async def go():
        h = Harness()
        blk = bytes(range(256)) * 2
        assert (await h.cmd(bytes([0x2A, 0, 0, 0, 0, 4, 0, 0, 1, 0]), blk)).status == GOOD
        wrong = bytearray(blk)
        wrong[100] ^= 0xFF
        caw = bytes([0x89, 0]) + struct.pack(">Q", 4) + bytes(3) + bytes([1, 0, 0])
        r = await h.cmd(caw, bytes(wrong) + bytes(512))
        assert r.key_asc == (0xE, 0x1D, 0) and r.sense[0] & 0x80
        assert struct.unpack_from(">I", r.sense, 3)[0] == 100
        r = await h.cmd(caw, blk + b"\x55" * 512)
        assert r.status == GOOD
        r = await h.cmd(bytes([0x2F, 0x02, 0, 0, 0, 4, 0, 0, 1, 0]), b"\x55" * 511 + b"\x00")
        assert r.key_asc == (0xE, 0x1D, 0) and struct.unpack_from(">I", r.sense, 3)[0] == 511
        r = await h.cmd(bytes([0x2F, 0x06, 0, 0, 0, 4, 0, 0, 1, 0]), b"\x55" * 512)   # BYTCHK 3
        assert r.status == GOOD
    run(go())
