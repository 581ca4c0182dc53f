"""End to end: fetd_loopback.LoopbackClient against a real STML process."""
from __future__ import annotations

import os
import struct
import time

import pytest

from support.cli import cli
from support.target import StmlProcess

from fetd_loopback import LinkLost, NexusGone, ScsiError
from stml.cdb import encode_lun
from stml.sense import parse_sense

BLOCKS = 131072   # ram:64MiB at 512-byte blocks
LAST = BLOCKS - 1
GOOD, CHECK = 0x00, 0x02


# ---------------------------------------------------------------- CDB builders

def read_cdb(size: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    if size == 6:
        return bytes([0x08, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0])
    if size == 10:
        return struct.pack(">BBIBHB", 0x28, flags, lba, 0, blocks, 0)
    if size == 12:
        return struct.pack(">BBIIBB", 0xA8, flags, lba, blocks, 0, 0)
    return struct.pack(">BBQIBB", 0x88, flags, lba, blocks, 0, 0)


def write_cdb(size: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    op = {6: 0x0A, 10: 0x2A, 12: 0xAA, 16: 0x8A}[size]
    return bytes([op]) + read_cdb(size, lba, blocks, flags)[1:]


def sense_of(r) -> tuple[int, int, int]:
    assert r.status == CHECK, r
    return parse_sense(r.sense)


def settle(client, lun: int = 0) -> None:
    """Consume pending unit attentions the way an initiator would."""
    for _ in range(4):
        r = client.execute(lun, bytes(6))
        if not (r.status == CHECK and parse_sense(r.sense)[0] == 0x6):
            return
    raise AssertionError("unit attentions never cleared")


def naa_of(page83: bytes) -> bytes:
    pos = 4
    while pos + 4 <= len(page83):
        dlen = page83[pos + 3]
        if page83[pos + 1] & 0x0F == 3:
            return page83[pos + 4:pos + 4 + dlen]
        pos += 4 + dlen
    raise AssertionError(f"no NAA designator in {page83.hex()}")


@pytest.fixture(scope="module")
def shared_stml(tmp_short_module):
    """One 64 MiB RAM STML for the tests that only need a plain LUN 0; each test
    gets its own client (its own I_T nexus) and its own LBAs."""
    p = StmlProcess(tmp_short_module(), ("ram:64MiB",)).start()
    yield p
    p.stop()


@pytest.fixture
def client(shared_stml, client_factory):
    return client_factory(shared_stml.endpoint)


# ---------------------------------------------------------------- unit attention

def test_first_command_on_new_nexus_has_no_unit_attention(client):
    """As in LIO, a new I_T nexus starts without POWER ON, RESET OCCURRED (qemu's
    iSCSI driver does not retry its first MODE SENSE after one; see README)."""
    r = client.execute(0, bytes(6))
    assert r.status == GOOD and r.sense is None


# ---------------------------------------------------------------- read / write

def test_write_read_lba0_and_last_lba(client):
    settle(client)
    first = os.urandom(4096)
    last = os.urandom(512)
    client.write(0, 0, first)
    client.write(0, LAST, last)
    assert client.read(0, 0, 8) == first
    assert client.read(0, LAST, 1) == last
    assert client.read(0, 8, 1) == bytes(512)  # never written: zeros


def test_write_across_the_end_is_refused_and_writes_nothing(client):
    settle(client)
    before = os.urandom(512)
    client.write(0, LAST, before)
    r = client.execute(0, write_cdb(16, LAST, 2), data_out=os.urandom(1024))
    assert sense_of(r) == (0x05, 0x21, 0x00)
    assert client.read(0, LAST, 1) == before
    r = client.execute(0, write_cdb(10, BLOCKS, 1), data_out=os.urandom(512))
    assert sense_of(r) == (0x05, 0x21, 0x00)
    r = client.execute(0, read_cdb(16, LAST, 2), data_in=1024)
    assert sense_of(r) == (0x05, 0x21, 0x00)
    r = client.execute(0, read_cdb(16, 2**63, 1), data_in=512)
    assert sense_of(r) == (0x05, 0x21, 0x00)


@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_read_write_cdb_sizes_round_trip(client, size):
    settle(client)
    lba = 1000 + size * 10
    data = os.urandom(3 * 512)
    r = client.execute(0, write_cdb(size, lba, 3), data_out=data)
    assert r.status == GOOD, r.describe()
    r = client.execute(0, read_cdb(size, lba, 3), data_in=len(data))
    assert r.status == GOOD and r.resid == 0
    assert r.data == data
    # the other sizes read the same blocks
    for other in (10, 16):
        assert client.execute(0, read_cdb(other, lba, 3), data_in=len(data)).data == data


def test_read6_length_zero_means_256_blocks(client):
    settle(client)
    data = os.urandom(256 * 512)
    client.write(0, 2048, data)
    r = client.execute(0, read_cdb(6, 2048, 0), data_in=len(data))
    assert r.status == GOOD
    assert r.data == data


def test_write_fua_and_zero_length(client):
    settle(client)
    data = os.urandom(512)
    r = client.execute(0, write_cdb(10, 77, 1, flags=0x08), data_out=data)
    assert r.status == GOOD
    assert client.read(0, 77, 1) == data
    r = client.execute(0, read_cdb(10, 77, 0))
    assert r.status == GOOD and r.data == b""


def test_reserved_cdb_bits_get_invalid_field_with_pointer(client):
    settle(client)
    r = client.execute(0, read_cdb(10, 0, 1, flags=0xE0), data_in=512)  # RDPROTECT
    assert sense_of(r) == (0x05, 0x24, 0x00)
    assert r.sense[15] == 0xC0 | 0x08 | 7  # SKSV, C/D, BPV, bit 7
    assert r.sense[16:18] == b"\x00\x01"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("cdb", [bytes([0x02, 0, 0, 0, 0, 0]), bytes([0xFF]) + bytes(15),
                                 bytes([0x3B]) + bytes(9)])
def test_unknown_opcode(client, cdb):
    settle(client)
    r = client.execute(0, cdb)
    assert sense_of(r) == (0x05, 0x20, 0x00)


def test_unknown_lun(client):
    settle(client)
    r = client.execute(5, bytes(6))
    assert sense_of(r) == (0x05, 0x25, 0x00)
    r = client.execute(5, read_cdb(10, 0, 1), data_in=512)
    assert sense_of(r) == (0x05, 0x25, 0x00)
    r = client.execute(5, bytes([0x12, 0, 0, 0, 96, 0]), data_in=96)
    assert r.status == GOOD
    assert r.data[0] == 0x7F  # peripheral qualifier 3: no logical unit here
    r = client.execute(5, bytes([0x03, 0, 0, 0, 18, 0]), data_in=18)
    assert r.status == GOOD
    assert parse_sense(r.data) == (0x05, 0x25, 0x00)
    r = client.execute(5, struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 64, 0, 0), data_in=64)
    assert r.status == GOOD and r.data[8:16] == encode_lun(0)


def test_read_only_lun_refuses_write(stml_factory, client_factory):
    stml = stml_factory("ram:1MiB,ro")
    client = client_factory(stml.endpoint)
    settle(client)
    for size in (6, 10, 16):
        r = client.execute(0, write_cdb(size, 0, 1), data_out=os.urandom(512))
        assert sense_of(r) == (0x07, 0x27, 0x00)
    assert client.read(0, 0, 1) == bytes(512)
    r = client.execute(0, bytes([0x1A, 0, 0x3F, 0, 255, 0]), data_in=255)
    assert r.data[2] & 0x80  # MODE SENSE device-specific parameter: WP


# ---------------------------------------------------------------- SPC: INQUIRY and friends

def test_standard_inquiry(client):
    data = client.inquiry(0)
    assert data[0] == 0x00                # direct access block device, connected
    assert data[1] & 0x80 == 0            # not removable
    assert data[2] == 0x06                # SPC-4
    assert data[3] & 0x0F == 2            # response data format
    assert data[4] == len(data) - 5
    assert data[7] & 0x02                 # CmdQue
    assert data[8:16] == b"SCSITGT "
    assert data[16:32].rstrip() == b"PY-STML DISK"
    assert data[32:36] == b"0001"
    short = client.execute(0, bytes([0x12, 0, 0, 0, 5, 0]), data_in=5)
    assert short.data == data[:5]


def test_inquiry_removable_bit(stml_factory, client_factory):
    stml = stml_factory("ram:1MiB,removable")
    client = client_factory(stml.endpoint)
    assert client.inquiry(0)[1] & 0x80


def test_vpd_pages(client):
    supported = client.inquiry(0, 0x00)
    assert supported[1] == 0x00
    pages = supported[4:4 + supported[3]]
    assert {0x00, 0x80, 0x83} <= set(pages)
    assert list(pages) == sorted(pages)
    serial = client.inquiry(0, 0x80)
    assert serial[1] == 0x80
    sn = serial[4:4 + serial[3]]
    assert sn and sn.isascii()
    devid = client.inquiry(0, 0x83)
    assert devid[1] == 0x83
    assert struct.unpack_from(">H", devid, 2)[0] == len(devid) - 4
    naa = naa_of(devid)
    assert len(naa) == 16 and naa[0] >> 4 == 6  # NAA 6, IEEE registered extended


def test_invalid_inquiry_fields(client):
    settle(client)
    r = client.execute(0, bytes([0x12, 1, 0x99, 0, 255, 0]), data_in=255)  # unknown VPD page
    assert sense_of(r) == (0x05, 0x24, 0x00)
    assert r.sense[15] & 0xC8 == 0xC0 and r.sense[16:18] == b"\x00\x02"
    r = client.execute(0, bytes([0x12, 0, 0x80, 0, 255, 0]), data_in=255)  # page without EVPD
    assert sense_of(r) == (0x05, 0x24, 0x00)
    assert r.sense[16:18] == b"\x00\x02"


def test_naa_identifier_survives_restart(stml_factory, client_factory):
    stml = stml_factory("ram:64MiB")
    c1 = client_factory(stml.endpoint)
    naa1 = naa_of(c1.inquiry(0, 0x83))
    serial1 = c1.inquiry(0, 0x80)
    c1.close()
    stml.restart()
    c2 = client_factory(stml.endpoint)
    assert naa_of(c2.inquiry(0, 0x83)) == naa1
    assert c2.inquiry(0, 0x80) == serial1


def test_luns_have_distinct_identifiers(stml_factory, client_factory):
    stml = stml_factory("ram:1MiB", "ram:1MiB")
    client = client_factory(stml.endpoint)
    assert naa_of(client.inquiry(0, 0x83)) != naa_of(client.inquiry(1, 0x83))
    assert client.inquiry(0, 0x80) != client.inquiry(1, 0x80)


def test_report_luns(stml_factory, client_factory):
    stml = stml_factory("ram:64MiB", "ram:1MiB")
    client = client_factory(stml.endpoint)
    assert sorted(client.luns) == [0, 1]
    cdb = struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 256, 0, 0)
    r = client.execute(0, cdb, data_in=256)
    assert r.status == GOOD
    n = struct.unpack_from(">I", r.data)[0]
    assert n == 16
    assert r.data[8:16] == encode_lun(0) and r.data[16:24] == encode_lun(1)
    assert len(r.data) == 8 + n
    # allocation length below 16 is invalid
    r = client.execute(0, struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 8, 0, 0), data_in=8)
    assert sense_of(r) == (0x05, 0x24, 0x00)


def test_request_sense(client):
    settle(client)
    r = client.execute(0, bytes([0x03, 0, 0, 0, 252, 0]), data_in=252)
    assert r.status == GOOD
    assert r.data[0] & 0x7F == 0x70
    assert parse_sense(r.data) == (0x00, 0x00, 0x00)
    r = client.execute(0, bytes([0x03, 1, 0, 0, 252, 0]), data_in=252)  # DESC
    assert r.data[0] == 0x72
    assert parse_sense(r.data) == (0x00, 0x00, 0x00)


def test_read_capacity(client):
    settle(client)
    r = client.execute(0, bytes([0x25]) + bytes(9), data_in=8)
    assert r.status == GOOD
    assert struct.unpack(">II", r.data) == (LAST, 512)
    r = client.execute(0, bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0",
                       data_in=32)
    assert r.status == GOOD and len(r.data) == 32
    assert struct.unpack_from(">QI", r.data) == (LAST, 512)
    assert client.capacity(0) == (BLOCKS, 512)
    # an LBA without PMI is an error
    r = client.execute(0, bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]), data_in=8)
    assert sense_of(r) == (0x05, 0x24, 0x00)
    # an unknown service action of 0x9E
    r = client.execute(0, bytes([0x9E, 0x11]) + bytes(8) + struct.pack(">I", 32) + b"\0\0",
                       data_in=32)
    assert sense_of(r) == (0x05, 0x24, 0x00)


def test_read_capacity_4k_blocks(stml_factory, client_factory):
    stml = stml_factory("ram:8MiB,block_size=4096")
    client = client_factory(stml.endpoint)
    assert client.capacity(0) == (2048, 4096)
    data = os.urandom(4096)
    client.write(0, 2047, data, block_size=4096)
    assert client.read(0, 2047, 1, block_size=4096) == data


# ---------------------------------------------------------------- MODE SENSE

def _pages(body: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(body):
        code, n = body[pos] & 0x3F, body[pos + 1]
        out[code] = body[pos:pos + 2 + n]
        pos += 2 + n
    return out


def mode_sense6(client, page: int, pc: int = 0, dbd: bool = False, lun: int = 0):
    return client.execute(lun, bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, 0, 255, 0]),
                          data_in=255)


def mode_sense10(client, page: int, pc: int = 0, dbd: bool = False, lun: int = 0):
    return client.execute(lun, bytes([0x5A, 0x08 if dbd else 0, (pc << 6) | page, 0, 0, 0, 0])
                          + struct.pack(">H", 1024) + b"\0", data_in=1024)


def test_mode_sense6_caching_and_control(client):
    settle(client)
    r = mode_sense6(client, 0x08)
    assert r.status == GOOD
    d = r.data
    assert d[0] == len(d) - 1
    assert d[2] & 0x80 == 0 and d[3] == 8          # not WP; one block descriptor
    assert struct.unpack_from(">I", d, 4)[0] == BLOCKS
    assert int.from_bytes(d[9:12], "big") == 512
    pages = _pages(d[12:])
    assert list(pages) == [0x08]
    assert pages[0x08][1] == 18 and pages[0x08][2] & 0x04 == 0   # WCE off by default
    r = mode_sense6(client, 0x0A, dbd=True)
    d = r.data
    assert d[3] == 0
    ctrl = _pages(d[4:])[0x0A]
    assert ctrl[1] == 10 and ctrl[2] & 0x04 == 0                   # D_SENSE off


def test_mode_sense10_all_pages(client):
    settle(client)
    r = mode_sense10(client, 0x3F)
    assert r.status == GOOD
    d = r.data
    assert struct.unpack_from(">H", d)[0] == len(d) - 2
    bdl = struct.unpack_from(">H", d, 6)[0]
    assert bdl == 8
    codes = list(_pages(d[8 + bdl:]))
    assert {0x08, 0x0A} <= set(codes) and codes == sorted(codes)
    r = mode_sense10(client, 0x3F, dbd=True)
    assert struct.unpack_from(">H", r.data, 6)[0] == 0
    assert list(_pages(r.data[8:])) == codes
    pages = _pages(r.data[8:])
    assert pages[0x08][1] == 18 and pages[0x0A][1] == 10


def test_mode_sense_changeable_and_default_values(stml_factory, client_factory):
    stml = stml_factory("ram:1MiB,wc")
    client = client_factory(stml.endpoint)
    settle(client)
    current = _pages(mode_sense6(client, 0x08, pc=0, dbd=True).data[4:])[0x08]
    changeable = _pages(mode_sense6(client, 0x08, pc=1, dbd=True).data[4:])[0x08]
    default = _pages(mode_sense6(client, 0x08, pc=2, dbd=True).data[4:])[0x08]
    assert current[2] & 0x04 and default[2] & 0x04     # write cache configured on
    assert changeable[2] == 0x04


def test_mode_sense_errors(client):
    settle(client)
    r = mode_sense6(client, 0x08, pc=3)
    assert sense_of(r) == (0x05, 0x39, 0x00)
    r = mode_sense10(client, 0x3F, pc=3)
    assert sense_of(r) == (0x05, 0x39, 0x00)
    r = mode_sense6(client, 0x19)                      # a page we do not have
    assert sense_of(r) == (0x05, 0x24, 0x00)
    assert r.sense[16:18] == b"\x00\x02"


def test_mode_select_d_sense_gives_descriptor_sense(stml_factory, client_factory):
    stml = stml_factory("ram:1MiB")
    client = client_factory(stml.endpoint)
    other = client_factory(stml.endpoint)
    settle(client)
    settle(other)
    r = client.execute(0, bytes([0x02]) + bytes(5))
    assert r.sense[0] == 0x70                          # fixed format by default
    ctrl = bytearray(_pages(mode_sense10(client, 0x0A, dbd=True).data[8:])[0x0A])
    ctrl[2] |= 0x04                                    # D_SENSE
    params = bytes(8) + bytes(ctrl)
    cdb = bytes([0x55, 0x10, 0, 0, 0, 0, 0]) + struct.pack(">H", len(params)) + b"\0"
    r = client.execute(0, cdb, data_out=params)
    assert r.status == GOOD, r.describe()
    assert _pages(mode_sense10(client, 0x0A, dbd=True).data[8:])[0x0A][2] & 0x04
    r = client.execute(0, bytes([0x02]) + bytes(5))
    assert r.sense[0] == 0x72                          # descriptor format now
    assert parse_sense(r.sense) == (0x05, 0x20, 0x00)
    r = client.execute(0, bytes([0x12, 1, 0x99, 0, 255, 0]), data_in=255)
    assert r.sense[0] == 0x72 and parse_sense(r.sense) == (0x05, 0x24, 0x00)
    # the other nexus is told the mode parameters changed
    seen = []
    for _ in range(4):
        r = other.execute(0, bytes(6))
        if r.status == GOOD:
            break
        seen.append(parse_sense(r.sense))
    assert (0x06, 0x2A, 0x01) in seen
    # a change that is not changeable is refused: QUEUE ALGORITHM MODIFIER
    ctrl[3] ^= 0xF0
    params = bytes(8) + bytes(ctrl)
    r = client.execute(0, cdb, data_out=params)
    assert r.status == CHECK and parse_sense(r.sense) == (0x05, 0x26, 0x00)


# ---------------------------------------------------------------- SBC housekeeping

def test_synchronize_cache(client):
    settle(client)
    client.write(0, 5, os.urandom(512))
    r = client.execute(0, struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0))
    assert r.status == GOOD
    r = client.execute(0, struct.pack(">BBQIBB", 0x91, 0, 0, BLOCKS, 0, 0))
    assert r.status == GOOD
    r = client.execute(0, struct.pack(">BBQIBB", 0x91, 0, LAST, 2, 0, 0))
    assert sense_of(r) == (0x05, 0x21, 0x00)
    client.synchronize_cache(0)


def test_start_stop_unit_and_test_unit_ready(client):
    settle(client)
    assert client.execute(0, bytes(6)).status == GOOD
    assert client.execute(0, bytes([0x1B, 0, 0, 0, 0, 0])).status == GOOD   # stop
    assert client.execute(0, bytes([0x1B, 0, 0, 0, 1, 0])).status == GOOD   # start
    assert client.execute(0, bytes(6)).status == GOOD
    # LOEJ on a non-removable medium: INVALID FIELD IN CDB, byte 4 bit 1
    r = client.execute(0, bytes([0x1B, 0, 0, 0, 2, 0]))
    assert sense_of(r) == (0x05, 0x24, 0x00)
    assert r.sense[15] == 0xC0 | 0x08 | 1 and r.sense[16:18] == b"\x00\x04"
    data = os.urandom(512)
    client.write(0, 9, data)
    assert client.read(0, 9, 1) == data


# ---------------------------------------------------------------- file backend

def test_file_lun_is_sparse_and_persists_across_restart(stml_factory, client_factory, tmp_short):
    d = tmp_short()
    img = d / "disk.img"
    stml = stml_factory(f"file:{img},size=64MiB", data_dir=d)
    st = os.stat(img)
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20   # sparse: nothing allocated yet
    client = client_factory(stml.endpoint)
    assert client.capacity(0) == (BLOCKS, 512)
    data = os.urandom(8192)
    client.write(0, 4000, data)
    client.write(0, LAST, data[:512])
    client.close()
    stml.restart()
    client = client_factory(stml.endpoint)
    assert client.read(0, 4000, 16) == data
    assert client.read(0, LAST, 1) == data[:512]
    with open(img, "rb") as f:
        f.seek(4000 * 512)
        assert f.read(8192) == data


def test_file_lun_relative_path_lives_in_data_dir(stml_factory, client_factory, tmp_short):
    d = tmp_short()
    stml = stml_factory("file:rel.img,size=1MiB", data_dir=d)
    assert os.path.getsize(d / "rel.img") == 1 << 20
    client = client_factory(stml.endpoint)
    assert client.capacity(0) == (2048, 512)


def test_read_only_file_lun(stml_factory, client_factory, tmp_short):
    d = tmp_short()
    img = d / "ro.img"
    content = os.urandom(1 << 20)
    img.write_bytes(content)
    stml = stml_factory(f"file:{img},ro", data_dir=d)
    client = client_factory(stml.endpoint)
    settle(client)
    r = client.execute(0, write_cdb(10, 0, 1), data_out=bytes(512))
    assert sense_of(r) == (0x07, 0x27, 0x00)
    assert client.read(0, 0, 4) == content[:2048]
    assert img.read_bytes() == content


# ---------------------------------------------------------------- STML restart

def test_client_survives_stml_restart(stml_factory, client_factory):
    stml = stml_factory("ram:64MiB")
    client = client_factory(stml.endpoint)
    data = os.urandom(1024)
    client.write(0, 300, data)
    stml.restart()
    # the helpers retry once on LinkLost and consume unit attentions
    assert client.capacity(0) == (BLOCKS, 512)
    new = os.urandom(512)
    client.write(0, 301, new)
    assert client.read(0, 301, 1) == new
    # raw execute: at most one LinkLost, then the link is back
    stml.restart()
    lost = 0
    while True:
        try:
            r = client.execute(0, bytes(6))
            break
        except LinkLost:
            lost += 1
            assert lost == 1, "execute raised LinkLost twice in a row"
    assert r.status == GOOD or parse_sense(r.sense)[0] == 0x06
    settle(client)
    assert client.execute(0, bytes(6)).status == GOOD


def test_closing_a_client_fails_a_command_that_waits_for_the_link(stml_factory, client_factory):
    """A command sent while the STML is away waits for the link; closing the
    client ends it with LinkLost at once (no task left pending on a closed loop)."""
    stml = stml_factory("ram:64MiB")
    client = client_factory(stml.endpoint)
    settle(client)
    stml.stop()
    link = client._link
    for _ in range(300):   # (bounded: the link notices the closed stream)
        if not link.connected.is_set():
            break
        time.sleep(0.05)
    assert not link.connected.is_set()
    waiting = client.submit(0, bytes(6))
    client.close()
    assert isinstance(waiting.exception(timeout=5), LinkLost)
    # and a command submitted after close() fails at once, with the same error
    assert isinstance(client.submit(0, bytes(6)).exception(timeout=0), LinkLost)


def _gone_within(client, seconds: float = 15) -> NexusGone:
    """The NexusGone a command raises once the client knows its nexus ended;
    until then a command is answered by the STML (or lost with the link)."""
    deadline = time.monotonic() + seconds
    answers = []
    while time.monotonic() < deadline:
        try:
            answers.append(client.execute(0, bytes(6)).describe())
        except NexusGone as e:
            return e
        except LinkLost:
            answers.append("link lost")
        time.sleep(0.1)
    raise AssertionError(f"commands never failed with NexusGone; answers: {answers[-3:]}")


def test_target_remove_force_ends_the_clients_nexus(stml_factory, client_factory):
    """`target remove --force` drops the nexus: the client's commands then
    fail at once with the reason (each used to come back LOGICAL UNIT
    COMMUNICATION FAILURE, and a program retrying them would retry forever)."""
    stml = stml_factory("ram:1MiB")
    client = client_factory(stml.endpoint)
    settle(client)
    cli("target", "remove", "--data-dir", str(stml.data_dir), client.target_name, "--force")
    e = _gone_within(client)
    assert "dropped" in str(e)
    with pytest.raises(NexusGone):     # every later command too, without a retry
        client.execute(0, bytes(6), retries=3)


def test_a_nexus_refused_after_a_restart_ends_the_client(stml_factory, client_factory):
    """The STML comes back with an ACL that does not name the client (edited
    into its config while it was down): the link registers the nexus again,
    the STML refuses it, and the client says so."""
    stml = stml_factory("ram:1MiB")
    client = client_factory(stml.endpoint)
    settle(client)
    stml.stop()
    config = stml.data_dir / "scsi-target.toml"
    text = config.read_text()
    named = f'name = "{client.target_name}"\n'
    assert named in text
    config.write_text(text.replace(named, named + 'acl = ["iqn.2026-12.org.scsi-target.test:someone-else"]\n'))
    stml.start()
    e = _gone_within(client)
    assert "refused" in str(e) and "ACL" in str(e), e


def test_scsi_error_carries_the_result(stml_factory, client_factory):
    stml = stml_factory("ram:1MiB,ro")
    client = client_factory(stml.endpoint)
    with pytest.raises(ScsiError) as e:
        client.write(0, 0, bytes(512))
    assert e.value.result.sense_key == 0x07
    assert e.value.result.asc_ascq == (0x27, 0x00)
