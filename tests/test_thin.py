"""Thin-provisioning bookkeeping: UNMAP / WRITE SAME UNMAP deallocate, GET LBA
STATUS reports it, deallocated blocks read back as zeros (LBPRZ); the
backends' mapped-extent queries."""
from __future__ import annotations

import struct

from backends.file import FileBackend
from backends.ram import PAGE, RamBackend
from stml.api import Op
from stml.lu import LunOptions
from stml.sense import CHECK_CONDITION, DATA_PROTECT, GOOD, ILLEGAL_REQUEST
from support.sbc_harness import Harness, run, unmap

BS = 512
PB = PAGE // BS   # blocks per RAM page


def _write16(lba: int, n: int) -> bytes:
    return bytes([0x8A, 0]) + struct.pack(">QI", lba, n) + bytes(2)


def _read16(lba: int, n: int) -> bytes:
    return bytes([0x88, 0]) + struct.pack(">QI", lba, n) + bytes(2)


def _gls(lba: int, alloc: int = 4096) -> bytes:
    return bytes([0x9E, 0x12]) + struct.pack(">QI", lba, alloc) + bytes(2)


def _status(data: bytes) -> list[tuple[int, int, int]]:
    n = struct.unpack_from(">I", data)[0]
    return [struct.unpack_from(">QIB", data, off) for off in range(8, 4 + n, 16)]


def test_unmap_then_get_lba_status_and_zero_reads():
    async def go():
        h = Harness()
        r = await h.cmd(_gls(0))
        assert _status(r.data) == [(0, h.lu().blocks, 1)]
        assert (await h.cmd(_write16(0, 2 * PB), b"\xAA" * 2 * PAGE)).status == GOOD
        st = _status((await h.cmd(_gls(0))).data)
        assert st[0] == (0, 2 * PB, 0) and st[1][2] == 1
        cdb, data = unmap((PB, PB))
        assert (await h.cmd(cdb, data)).status == GOOD
        st = _status((await h.cmd(_gls(0))).data)
        assert st[0] == (0, PB, 0) and st[1] == (PB, h.lu().blocks - PB, 1)
        r = await h.cmd(_read16(PB, 8))
        assert r.data == bytes(8 * BS)
        assert h.lu().backend.allocated() == PAGE
        # a descriptor starts at the LBA asked for
        st = _status((await h.cmd(_gls(5))).data)
        assert st[0][0] == 5 and st[0][2] == 0
    run(go())


def test_partial_unmap_reads_zeros_and_keeps_mapping():
    async def go():
        h = Harness()
        await h.cmd(_write16(0, 16), b"\x11" * 16 * BS)
        cdb, data = unmap((4, 4))
        assert (await h.cmd(cdb, data)).status == GOOD
        r = await h.cmd(_read16(0, 16))
        assert r.data == b"\x11" * 4 * BS + bytes(4 * BS) + b"\x11" * 8 * BS
    run(go())


def test_write_same_unmap_and_ndob():
    async def go():
        h = Harness()
        await h.cmd(_write16(0, PB), b"\x22" * PAGE)
        ws16 = bytes([0x93, 0x08]) + struct.pack(">QI", 0, PB) + bytes(2)
        assert (await h.cmd(ws16, bytes(BS))).status == GOOD
        assert h.lu().backend.allocated() == 0
        await h.cmd(_write16(0, PB), b"\x22" * PAGE)
        ndob = bytes([0x93, 0x09]) + struct.pack(">QI", 0, PB) + bytes(2)
        assert (await h.cmd(ndob, alloc=0)).status == GOOD
        assert h.lu().backend.allocated() == 0
        ws10 = bytes([0x41, 0, 0, 0, 0, 8, 0, 0, 4, 0])
        assert (await h.cmd(ws10, b"\x5A" * BS)).status == GOOD
        assert (await h.cmd(_read16(8, 4))).data == b"\x5A" * 4 * BS
    run(go())


def test_unmap_parameter_checks():
    async def go():
        h = Harness()
        cdb, data = unmap((h.lu().blocks - 1, 2))
        r = await h.cmd(cdb, data)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x21, 0)
        r = await h.cmd(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0]), bytes(4))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x1A, 0)
        cdb, data = unmap(*[(i, 1) for i in range(300)])
        r = await h.cmd(cdb, data)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x26, 0)
        r = await h.cmd(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0]), alloc=0)
        assert r.status == GOOD
        r = await h.cmd(_gls(h.lu().blocks))
        assert r.status == CHECK_CONDITION and r.key_asc == (ILLEGAL_REQUEST, 0x21, 0)
    run(go())


def test_ram_and_file_extents(tmp_path):
    ram = RamBackend(4 * PAGE)
    ram.write_from(PAGE, [memoryview(b"x" * 10)], False)
    assert ram.mapped_extents(0, 4 * PAGE, 16) == [(0, PAGE, False), (PAGE, PAGE, True), (2 * PAGE, 2 * PAGE, False)]
    ram.discard(PAGE, 10)
    assert ram.allocated() == 0
    f = FileBackend(str(tmp_path / "disk.img"), 8 << 20)
    f.write_from(1 << 20, [memoryview(b"y" * 65536)], False)
    runs = f.mapped_extents(0, 8 << 20, 16)
    assert any(m for _, _, m in runs) and sum(n for _, n, _ in runs) == 8 << 20
    f.discard(1 << 20, 65536)
    assert not any(m for _, _, m in f.mapped_extents(0, 8 << 20, 16))
    f.close()


def test_unmap_on_a_thick_lu_is_not_supported():
    """A LU whose VPD 0xB2 says LBPU=0 (thick) does not support UNMAP: INVALID
    COMMAND OPERATION CODE before its parameter list is asked for, nothing
    given back, and REPORT SUPPORTED OPERATION CODES agrees (as LIO's
    sbc_parse_cdb and its RSOC do with emulate_tpu off; 0295). A read-only
    thin LU advertises it and refuses it as a write."""
    async def go():
        h = Harness([LunOptions("ram", size=16 << 20), LunOptions("ram", size=16 << 20, thin=False),
                     LunOptions("ram", size=16 << 20, ro=True)])
        asked = []
        send = h._send
        h._send = lambda ident, hdr, frames: (asked.append(hdr["tag"]) if hdr["op"] == Op.RDY_TO_XFER
                                              else None, send(ident, hdr, frames))
        await h.cmd(_write16(0, PB), b"\x33" * PAGE, lun=1)
        cdb, data = unmap((0, PB))
        assert (await h.cmd(_inq(0xB2), lun=1)).data[5] & 0x80 == 0   # LBPU=0
        r = await h.cmd(cdb, data, lun=1)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x20, 0) and asked == []
        assert (await h.cmd(_rsoc(1, 0x42), lun=1)).data[1] & 7 == 1   # not supported
        assert 0x42 not in (await h.cmd(_rsoc(0), lun=1)).data[4::8]
        # nor WRITE SAME's UNMAP bit (LBPWS=LBPWS10=0): INVALID FIELD IN CDB at that bit
        for ws in (bytes([0x41, 0x08, 0, 0, 0, 0, 0, 0, 1, 0]),
                   bytes([0x93, 0x08]) + struct.pack(">QI", 0, 1) + bytes(2)):
            asked.clear()
            r = await h.cmd(ws, bytes(BS), lun=1)
            assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0) and r.field == (1, 3) and asked == []
        assert (await h.cmd(_read16(0, PB), lun=1)).data == b"\x33" * PAGE
        # the thin LUs, writable or not: LBPU=1, UNMAP supported and listed
        for lun, answer in ((2, (DATA_PROTECT, 0x27, 0)), (0, None)):
            assert (await h.cmd(_inq(0xB2), lun=lun)).data[5] & 0x80
            r = await h.cmd(_rsoc(1, 0x42), lun=lun)
            assert r.data[1] & 7 == 3 and r.data[4] == 0x42
            assert 0x42 in (await h.cmd(_rsoc(0), lun=lun)).data[4::8]
            r = await h.cmd(cdb, data, lun=lun)
            assert r.key_asc == answer and (r.status == GOOD) == (answer is None)
    run(go())


def _inq(page: int) -> bytes:
    return bytes([0x12, 1, page, 0, 255, 0])


def _rsoc(option: int, opcode: int = 0) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, option, opcode, 0, 65535, 0, 0)
