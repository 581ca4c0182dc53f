"""CDB decoding helpers: pure functions over the CDB bytes."""
from __future__ import annotations

import struct
from typing import Final

from stml.sense import CheckCondition, FieldPointer, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# CDB length by group code (opcode >> 5): SPC-4 4.2.5.1
GROUP_LEN = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}


# the same by opcode, looked up once per command (trim_cdb)
_LENGTH: tuple[int | None, ...] = tuple(GROUP_LEN.get(op >> 5) for op in range(256))


def trim_cdb(cdb: bytes) -> bytes:
    """The CDB without transport padding (iSCSI always carries 16 bytes), so
    handlers can tell READ(10) from READ(16) by length."""
    n = _LENGTH[cdb[0]]
    if n is None:
        if cdb[0] != 0x7F or len(cdb) <= 7:
            return cdb
        n = cdb[7] + 8   # variable length CDB
    return cdb[:n] if len(cdb) > n else cdb


def u16(cdb: bytes, off: int) -> int:
    return _U16.unpack_from(cdb, off)[0]


def u32(cdb: bytes, off: int) -> int:
    return _U32.unpack_from(cdb, off)[0]


def u64(cdb: bytes, off: int) -> int:
    return _U64.unpack_from(cdb, off)[0]


# (LBA, number of blocks) of READ/WRITE/VERIFY-style CDBs of 10, 12 and 16 bytes
_LBA_LEN = {10: struct.Struct(">2xIxH"), 12: struct.Struct(">2xII"), 16: struct.Struct(">2xQI")}
# their unpack_from by CDB length, up to 16 (Final, a tuple: the compiled build indexes
# it in place, where it looked the dict up in the module's dict and hashed the length;
# bound once: a read or write unpacks twice, without a method lookup each time)
_LBA_UNPACK_BY_SIZE: Final = tuple(_LBA_LEN[n].unpack_from if n in _LBA_LEN else None for n in range(17))


def lba_len(cdb: bytes) -> tuple[int, int]:
    """(LBA, number of blocks) of a READ/WRITE/VERIFY-style CDB of any size."""
    n = len(cdb)
    unpack = _LBA_UNPACK_BY_SIZE[n] if n <= 16 else None
    if unpack is not None:
        return unpack(cdb)
    if len(cdb) == 6:
        lba = ((cdb[1] & 0x1F) << 16) | u16(cdb, 2)
        return lba, cdb[4] or 256  # SBC: READ(6)/WRITE(6) length 0 means 256
    raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, FieldPointer(0))


def forbidden_bits(usage: bytes) -> int:
    """The bits a CDB as long as `usage` must have clear, as one big-endian
    int (byte 0, the opcode, is the row's own): a command tests its CDB
    against its row's in one operation (stml.ops.OpEntry.forbidden)."""
    return ~int.from_bytes(b"\xff" + usage[1:], "big") & ((1 << 8 * len(usage)) - 1)


def check_usage(cdb: bytes, usage: bytes) -> None:
    """Every bit set in the CDB must be allowed by the opcode's usage mask
    (the same mask REPORT SUPPORTED OPERATION CODES returns)."""
    n = min(len(cdb), len(usage))
    if not int.from_bytes(cdb[1:n], "big") & ~int.from_bytes(usage[1:n], "big"):
        return   # the usual case, checked in one operation; the loop finds the field
    for i in range(1, n):
        bad = cdb[i] & ~usage[i]
        if bad:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB,
                                 FieldPointer(i, bad.bit_length() - 1))


def encode_lun(lun: int) -> bytes:
    """SAM LUN structure: peripheral device addressing below 256, flat space above."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


def decode_lun(raw: bytes) -> int:
    """LUN number from an 8-byte SAM LUN (peripheral or flat addressing)."""
    method = raw[0] >> 6
    if method in (0, 1):
        return ((raw[0] & 0x3F) << 8) | raw[1]
    return 0xFFFF  # an addressing method we do not serve: reported as no such LUN
