"""Pure units: sense data, CDB decoding, the disk opcode table (task-set ordering: test_sched.py)."""
from __future__ import annotations

import struct

import pytest

from stml.cdb import (
    GROUP_LEN, check_usage, decode_lun, encode_lun, lba_len, trim_cdb,
)
from stml.disk import OPCODES, DiskTemplate
from stml.sense import (
    CHECK_CONDITION, DATA_PROTECT, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, LBA_OUT_OF_RANGE,
    MEDIUM_ERROR, UNIT_ATTENTION, UNRECOVERED_READ_ERROR, WRITE_PROTECTED, CheckCondition,
    FieldPointer, build_sense, invalid_field, invalid_param, parse_sense,
)


# ---------------------------------------------------------------- sense: fixed format

def test_fixed_sense_basic():
    s = build_sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    assert len(s) == 18
    assert s[0] == 0x70                 # current error, VALID clear
    assert s[2] == 0x05
    assert s[7] == 10                   # additional sense length
    assert (s[12], s[13]) == (0x21, 0x00)
    assert s[3:7] == bytes(4) and s[15:18] == bytes(3)


def test_fixed_sense_information():
    s = build_sense(MEDIUM_ERROR, UNRECOVERED_READ_ERROR, info=0x12345678)
    assert s[0] == 0xF0                 # VALID
    assert s[3:7] == bytes.fromhex("12345678")
    assert parse_sense(s) == (0x03, 0x11, 0x00)


def test_fixed_sense_information_too_large_clears_valid():
    # SPC-4 4.5.3: an INFORMATION value above FFFF_FFFFh does not fit fixed-format
    # sense; VALID must be zero rather than report a truncated (wrong) LBA
    s = build_sense(MEDIUM_ERROR, UNRECOVERED_READ_ERROR, info=0x1_0000_0005)
    assert s[0] & 0x80 == 0, f"VALID set with a truncated INFORMATION {s[3:7].hex()}"


@pytest.mark.parametrize("byte,bit,expect", [
    (2, None, bytes([0xC0, 0x00, 0x02])),
    (1, 7, bytes([0xC8 | 7, 0x00, 0x01])),
    (4, 1, bytes([0xC8 | 1, 0x00, 0x04])),
    (0x1234, 0, bytes([0xC8, 0x12, 0x34])),
])
def test_fixed_sense_field_pointer(byte, bit, expect):
    s = build_sense(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field=FieldPointer(byte, bit))
    assert s[15:18] == expect
    assert parse_sense(s) == (0x05, 0x24, 0x00)


def test_field_pointer_in_parameter_list_clears_cd():
    s = invalid_param(7, 3).sense()
    assert s[15] == 0x80 | 0x08 | 3     # SKSV, C/D = 0 (parameter list), BPV, bit 3
    assert s[16:18] == b"\x00\x07"
    assert (s[12], s[13]) == (0x26, 0x00)


# ---------------------------------------------------------------- sense: descriptor format

def test_descriptor_sense_basic():
    s = build_sense(UNIT_ATTENTION, (0x29, 0x00), descriptor=True)
    assert s == bytes([0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0])
    assert parse_sense(s) == (0x06, 0x29, 0x00)


def test_descriptor_sense_information_and_field_pointer():
    s = build_sense(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, descriptor=True,
                    field=FieldPointer(4, 1), info=0x1_0000_0005)
    assert s[0] == 0x72 and s[1] == 0x05 and (s[2], s[3]) == (0x24, 0x00)
    assert s[7] == len(s) - 8 == 12 + 8
    info = s[8:20]
    assert info[0] == 0x00 and info[1] == 0x0A and info[2] == 0x80     # VALID
    assert struct.unpack(">Q", info[4:12])[0] == 0x1_0000_0005       # 64 bits kept
    sks = s[20:28]
    assert sks[0] == 0x02 and sks[1] == 0x06
    assert sks[4:7] == bytes([0xC8 | 1, 0x00, 0x04])
    assert parse_sense(s) == (0x05, 0x24, 0x00)


def test_check_condition_sense_in_both_formats():
    e = invalid_field(2)
    assert e.status == CHECK_CONDITION
    assert (e.key, e.asc, e.ascq) == (0x05, 0x24, 0x00)
    fixed, desc = e.sense(False), e.sense(True)
    assert fixed[0] == 0x70 and desc[0] == 0x72
    assert parse_sense(fixed) == parse_sense(desc) == (0x05, 0x24, 0x00)
    assert fixed[15:18] == desc[12:15] == bytes([0xC0, 0, 2])


def test_parse_sense_deferred_and_bad():
    d = bytearray(build_sense(DATA_PROTECT, WRITE_PROTECTED))
    d[0] = 0x71
    assert parse_sense(bytes(d)) == (0x07, 0x27, 0x00)
    dd = bytearray(build_sense(DATA_PROTECT, WRITE_PROTECTED, descriptor=True))
    dd[0] = 0x73
    assert parse_sense(bytes(dd)) == (0x07, 0x27, 0x00)
    with pytest.raises(ValueError):
        parse_sense(b"\x70")
    with pytest.raises(ValueError):
        parse_sense(bytes([0x7E, 0, 0, 0]))


# ---------------------------------------------------------------- CDB decoding

def test_lba_len_all_sizes():
    assert lba_len(bytes([0x08, 0xE1, 0x23, 0x45, 7, 0])) == (0x012345, 7)   # top bits of byte 1 ignored
    assert lba_len(bytes([0x08, 0, 0, 1, 0, 0])) == (1, 256)                   # 0 means 256
    assert lba_len(bytes([0x0A, 0x1F, 0xFF, 0xFF, 0, 0])) == (0x1FFFFF, 256)
    assert lba_len(struct.pack(">BBIBHB", 0x28, 0, 0xDEADBEEF, 0, 0, 0)) == (0xDEADBEEF, 0)
    assert lba_len(struct.pack(">BBIBHB", 0x28, 0, 5, 0, 0xFFFF, 0)) == (5, 0xFFFF)
    assert lba_len(struct.pack(">BBIIBB", 0xA8, 0, 9, 0x10000, 0, 0)) == (9, 0x10000)
    assert lba_len(struct.pack(">BBQIBB", 0x88, 0, 2**63 + 1, 3, 0, 0)) == (2**63 + 1, 3)


def test_lba_len_bad_length():
    with pytest.raises(CheckCondition) as e:
        lba_len(bytes(8))
    assert (e.value.key, e.value.asc, e.value.ascq) == (0x05, 0x24, 0x00)


def test_check_usage_accepts_allowed_bits():
    usage = bytes([0x28, 0x1C, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0])
    check_usage(bytes([0x28, 0x18, 1, 2, 3, 4, 0x3F, 0, 1, 0]), usage)


@pytest.mark.parametrize("byte,value,bit", [(1, 0x20, 5), (1, 0xE3, 7), (6, 0x40, 6), (9, 0x01, 0)])
def test_check_usage_points_at_the_bad_field(byte, value, bit):
    usage = bytes([0x28, 0x1C, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0])
    cdb = bytearray(10)
    cdb[0] = 0x28
    cdb[byte] = value
    with pytest.raises(CheckCondition) as e:
        check_usage(bytes(cdb), usage)
    err = e.value
    assert (err.key, err.asc, err.ascq) == (0x05, 0x24, 0x00)
    assert err.field == FieldPointer(byte, bit)
    s = err.sense()
    assert s[15] == 0xC8 | bit and s[16:18] == struct.pack(">H", byte)


def test_trim_cdb():
    assert [len(trim_cdb(bytes([op]) + bytes(15))) for op in (0x00, 0x28, 0x5A, 0x88, 0xA8)] == \
        [6, 10, 10, 16, 12]
    padded = struct.pack(">BBIBHB", 0x28, 0, 1, 0, 1, 0) + bytes(6)
    assert trim_cdb(padded) == padded[:10]
    assert trim_cdb(bytes([0x12]) + bytes(15)) == bytes([0x12]) + bytes(5)
    var = bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]) + bytes(24) + bytes(8)
    assert len(trim_cdb(var)) == 32
    vendor = bytes([0xC5]) + bytes(15)
    assert trim_cdb(vendor) == vendor


@pytest.mark.parametrize("lun,raw", [
    (0, bytes(8)), (1, bytes([0, 1]) + bytes(6)), (255, bytes([0, 255]) + bytes(6)),
    (256, bytes([0x41, 0x00]) + bytes(6)), (16383, bytes([0x7F, 0xFF]) + bytes(6)),
])
def test_encode_decode_lun(lun, raw):
    assert encode_lun(lun) == raw
    assert decode_lun(raw) == lun


def test_decode_lun_unsupported_addressing():
    assert decode_lun(bytes([0x80, 1]) + bytes(6)) == 0xFFFF   # logical unit addressing
    assert decode_lun(bytes([0xC0, 1]) + bytes(6)) == 0xFFFF   # extended addressing


# ---------------------------------------------------------------- the disk template

def test_lookup_known_opcodes():
    t = DiskTemplate()
    assert t.lookup(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)).name == "READ(10)"
    assert t.lookup(bytes([0x9E, 0x10]) + bytes(14)).name == "READ CAPACITY(16)"
    assert t.lookup(bytes([0x9E, 0xF0]) + bytes(14)).name == "READ CAPACITY(16)"  # SA is 5 bits


def test_lookup_unknown_opcode():
    with pytest.raises(CheckCondition) as e:
        DiskTemplate().lookup(bytes([0x02]) + bytes(5))
    assert (e.value.key, e.value.asc, e.value.ascq) == (0x05, 0x20, 0x00)


def test_lookup_unknown_service_action():
    with pytest.raises(CheckCondition) as e:
        DiskTemplate().lookup(bytes([0x9E, 0x11]) + bytes(14))
    assert (e.value.asc, e.value.ascq) == (0x24, 0x00)
    assert e.value.field == FieldPointer(1, 4)


def test_lookup_short_cdb():
    with pytest.raises(CheckCondition) as e:
        DiskTemplate().lookup(bytes([0x28, 0, 0, 0]))
    assert (e.value.key, e.value.asc) == (0x05, 0x24)
    assert e.value.field.byte == 3


@pytest.mark.parametrize("entry", OPCODES, ids=lambda e: e.name)
def test_opcode_table_usage_masks(entry):
    assert entry.usage[0] == entry.opcode
    assert len(entry.usage) == GROUP_LEN[entry.opcode >> 5]
    assert entry.usage[-1] == 0  # CONTROL byte: NACA/LINK unsupported
    if entry.sa is not None:
        assert entry.usage[1] & 0x1F == 0x1F


def test_forbidden_bits_say_what_check_usage_refuses():
    """The per-row mask the emulator tests a CDB against (OpEntry.forbidden)
    flags exactly the bits check_usage refuses, in every byte but the opcode."""
    for entry in DiskTemplate().entries:
        n = len(entry.usage)
        for i in range(1, n):
            for bit in range(8):
                cdb = bytearray(n)
                cdb[0], cdb[i] = entry.opcode, 1 << bit
                flagged = bool(int.from_bytes(cdb, "big") & entry.forbidden)
                try:
                    check_usage(bytes(cdb), entry.usage)
                    refused = False
                except CheckCondition as e:
                    refused = True
                    assert (e.field.byte, e.field.bit) == (i, bit)
                assert flagged == refused, (entry.name, i, bit)
        assert not int.from_bytes(entry.usage, "big") & entry.forbidden   # what usage allows passes
