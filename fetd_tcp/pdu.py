"""iSCSI PDU codec (RFC 7143 §11): Basic Header Segment parse and build.

Every PDU type is an immutable NamedTuple with ``encode()`` (header bytes:
BHS plus any AHS) and a static ``decode()``, defined in one place: its opcode
constant and its class, registered in the PDU table (:data:`PDU_TYPES`, by
:func:`pdu_type`) with the side that sends it; :func:`decode_pdu` and the
other lookups come from that table.  Headers
are built apart from their data segment so a sender can hand
``[header, header digest, data, padding, data digest]`` to ``sendmsg`` without
concatenating.  All but the SCSI Command share one precompiled layout: four
bytes, TotalAHSLength/DataSegmentLength as one word, eight bytes (LUN, ISID...),
then eight words.  Malformed input raises :class:`PDUError` and nothing else.
"""

from __future__ import annotations

import struct
from typing import Callable, Final, Iterator, Literal, NamedTuple, Protocol, TypeVar

from fetd_tcp.digest import DIGEST_LEN, digest
from stml.api.sizes import BIG_FRAME

# (Final: the compiled build uses the constants in place, where it looked each
# name up in the module's dict per use; struct's results declared int: native arithmetic)
BHS_LEN: Final = 48
RESERVED_TAG: Final = 0xFFFFFFFF
LUN0: Final = bytes(8)

# Reject reasons (§11.17.1).
REJECT_DATA_DIGEST_ERROR: Final = 0x02
REJECT_SNACK_REJECT: Final = 0x03
REJECT_PROTOCOL_ERROR: Final = 0x04
REJECT_COMMAND_NOT_SUPPORTED: Final = 0x05
REJECT_IMMEDIATE_COMMAND_REJECT: Final = 0x06
REJECT_TASK_IN_PROGRESS: Final = 0x07
REJECT_INVALID_DATA_ACK: Final = 0x08
REJECT_INVALID_PDU_FIELD: Final = 0x09
REJECT_OUT_OF_RESOURCES: Final = 0x0A
REJECT_NEGOTIATION_RESET: Final = 0x0B
REJECT_WAITING_FOR_LOGOUT: Final = 0x0C

# Task management functions (§11.5.1) and responses (§11.6.1).
TMF_ABORT_TASK: Final = 1
TMF_ABORT_TASK_SET: Final = 2
TMF_CLEAR_ACA: Final = 3
TMF_CLEAR_TASK_SET: Final = 4
TMF_LOGICAL_UNIT_RESET: Final = 5
TMF_TARGET_WARM_RESET: Final = 6
TMF_TARGET_COLD_RESET: Final = 7
TMF_TASK_REASSIGN: Final = 8
TMF_QUERY_TASK: Final = 9            # RFC 7144
TMF_QUERY_TASK_SET: Final = 10
TMF_I_T_NEXUS_RESET: Final = 11
TMF_QUERY_ASYNC_EVENT: Final = 12
TMF_RESP_COMPLETE: Final = 0
TMF_RESP_NO_TASK: Final = 1
TMF_RESP_NO_LUN: Final = 2
TMF_RESP_TASK_ALLEGIANT: Final = 3
TMF_RESP_NO_REASSIGN: Final = 4
TMF_RESP_NOT_SUPPORTED: Final = 5
TMF_RESP_AUTH_FAILED: Final = 6
TMF_RESP_SUCCEEDED: Final = 7        # RFC 7144: the queried condition exists
TMF_RESP_REJECTED: Final = 255

# Task attributes in the SCSI Command (§11.3.1).
ATTR_UNTAGGED: Final = 0
ATTR_SIMPLE: Final = 1
ATTR_ORDERED: Final = 2
ATTR_HEAD_OF_QUEUE: Final = 3
ATTR_ACA: Final = 4

# Login stages (§11.12.3).
STAGE_SECURITY: Final = 0
STAGE_OPERATIONAL: Final = 1
STAGE_FULL_FEATURE: Final = 3

# Async events (§11.9.1).
ASYNC_SCSI_EVENT: Final = 0
ASYNC_LOGOUT_REQUEST: Final = 1
ASYNC_DROP_CONNECTION: Final = 2
ASYNC_DROP_ALL_CONNECTIONS: Final = 3
ASYNC_RENEGOTIATE: Final = 4
ASYNC_VENDOR: Final = 255

# AHS types (§11.2.2).
AHS_EXTENDED_CDB: Final = 1
AHS_BIDI_READ_LENGTH: Final = 2

_I: Final = 0x40  # immediate bit in byte 0
_F: Final = 0x80  # final bit in byte 1
_C: Final = 0x40  # continue bit (Login, Text)
_OPMASK: Final = 0x3F

_GEN: Final = struct.Struct(">BBBBI8sIIIIIIII")  # every PDU but the SCSI Command
_CMD: Final = struct.Struct(">BBxxI8sIIII16s")
# bound once (Final), for the PDUs every command has (a SCSI Command in, a Data-In
# or SCSI Response out): compiled, `_GEN.pack(...)` looks the method up per call
_GEN_PACK: Final = _GEN.pack
_CMD_UNPACK: Final = _CMD.unpack_from
_BHS = struct.Struct(">BBxxI")
_AHS_HDR = struct.Struct(">HBx")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
# a staged PDU's header or data copied out by the method's descriptor, called
# directly (compiled: no lookup of `tobytes` on the view, per PDU)
_TOBYTES: Final = memoryview.tobytes
# a PDU NamedTuple from all its fields, in order, without the Python-level __new__
# (about a fiftieth of fetd_tcp's instructions per read command): for the hot paths
new_pdu: Final = tuple.__new__


class PDUError(Exception):
    """A PDU or text segment that cannot be decoded.  ``reject_reason`` is
    the Reject reason code a connection should answer with."""

    def __init__(self, reason: str, reject_reason: int = REJECT_PROTOCOL_ERROR):
        super().__init__(reason)
        self.reason = reason
        self.reject_reason = reject_reason


class DigestError(PDUError):
    """A digest did not match. The framer has already stepped past the PDU
    (by the lengths its header gives), so with error recovery (ERL >= 1) the
    stream goes on: ``header`` is the BHS of a PDU whose data was damaged
    (its header is sound), or None when the header itself was."""

    def __init__(self, reason: str, reject_reason: int, header: bytes | None) -> None:
        super().__init__(reason, reject_reason)
        self.header = header


class BHS(NamedTuple):
    """What every BHS says about itself: enough to read the rest of the PDU."""

    opcode: int
    immediate: bool
    final: bool
    ahs_length: int  # bytes (TotalAHSLength * 4)
    data_length: int  # DataSegmentLength, without padding

    def remaining(self, header_digest: bool, data_digest: bool) -> int:
        """Bytes still to read after the 48-byte BHS for this PDU."""
        n = self.ahs_length + (4 if header_digest else 0)
        if self.data_length:
            n += (self.data_length + 3) & ~3
            if data_digest:
                n += 4
        return n


def parse_bhs(buf) -> BHS:
    """Read the generic BHS fields from the first 48 bytes of ``buf``."""
    if len(buf) < BHS_LEN:
        raise PDUError("short BHS")
    b0, b1, word = _BHS.unpack_from(buf)
    return BHS(b0 & _OPMASK, bool(b0 & _I), bool(b1 & _F), (word >> 24) * 4, word & 0xFFFFFF)


def _word1(ahs_len: int, data_length: int) -> int:
    if not 0 <= data_length <= 0xFFFFFF:
        raise PDUError("DataSegmentLength out of range")
    return (ahs_len >> 2) << 24 | data_length


def _op(opcode: int, immediate: bool) -> int:
    return opcode | _I if immediate else opcode


# --- LUN -------------------------------------------------------------------

_NO_LEVELS = bytes(6)   # LUN bytes 2-7 of a single-level LUN

def lun_to_int(lun: bytes) -> int | None:
    """LUN number for peripheral (00b) or flat (01b) single-level addressing,
    or None for any other form, which no logical unit of ours can have."""
    if lun[2:8] != _NO_LEVELS:
        return None
    b0 = lun[0]
    if b0 == 0:
        return lun[1]
    if b0 >> 6 == 1:
        return (b0 & 0x3F) << 8 | lun[1]
    return None


def int_to_lun(n: int) -> bytes:
    """8-byte LUN: peripheral addressing below 256 (as Linux does), flat above."""
    if n < 256:
        return bytes((0, n)) + bytes(6)
    if n < 0x4000:
        return bytes((0x40 | n >> 8, n & 0xFF)) + bytes(6)
    raise ValueError("LUN beyond flat addressing")


# --- helpers for data segments ----------------------------------------------

def sense_segment(sense: bytes) -> bytes:
    """Data segment carrying sense data: SenseLength then the sense bytes."""
    return _U16.pack(len(sense)) + sense


def decode_sense_segment(data) -> bytes:
    """Sense bytes from a SCSI Response or Async Message data segment."""
    if len(data) < 2:
        raise PDUError("sense segment too short")
    (n,) = _U16.unpack_from(data)
    if n + 2 > len(data):
        raise PDUError("SenseLength beyond data segment")
    return bytes(data[2:2 + n])


def residual(expected: int, transferred: int) -> tuple[int, bool, bool]:
    """(residual count, overflow, underflow) for a command that expected
    ``expected`` bytes and whose device wanted to move ``transferred``."""
    if transferred > expected:
        return transferred - expected, True, False
    if transferred < expected:
        return expected - transferred, False, True
    return 0, False, False



def _parse_ahs(ahs) -> tuple[bytes, int | None]:
    """(extra CDB bytes, bidi read length) from a SCSI Command's AHS."""
    ext, bidi, pos, end = b"", None, 0, len(ahs)
    while pos < end:
        if end - pos < 4:
            raise PDUError("truncated AHS", REJECT_INVALID_PDU_FIELD)
        length, kind = _AHS_HDR.unpack_from(ahs, pos)
        if length == 0 or pos + 3 + length > end:
            raise PDUError("AHSLength beyond TotalAHSLength", REJECT_INVALID_PDU_FIELD)
        if kind == AHS_EXTENDED_CDB and not ext:
            ext = bytes(ahs[pos + 4:pos + 3 + length])
        elif kind == AHS_BIDI_READ_LENGTH and length == 5 and bidi is None:
            (bidi,) = _U32.unpack_from(ahs, pos + 4)
        else:
            raise PDUError("unsupported or repeated AHS", REJECT_INVALID_PDU_FIELD)
        pos += (3 + length + 3) & ~3
    return ext, bidi


# --- the PDU table ------------------------------------------------------------
# One place per PDU type: its opcode constant and its class, which builds its
# header (encode) and parses it (decode), registered with the side that sends
# it. The lookups below (opcode -> decoder, class -> opcode, what an initiator
# may send) are derived from the table, never listed by hand.

Sender = Literal["initiator", "target"]
INITIATOR: Final = "initiator"
TARGET: Final = "target"
Buf = bytes | bytearray | memoryview
_Cls = TypeVar("_Cls", bound=type)


class PduType(NamedTuple):
    """One row of the PDU table."""

    opcode: int
    name: str
    cls: type
    sender: Sender
    decode: Callable[[Buf, Buf], PDU]   # (48-byte BHS, AHS) -> PDU
    ahs: bool                           # may carry AHS (only the SCSI Command)


PDU_TYPES: dict[int, PduType] = {}   # opcode -> row, in the order of the classes below


def pdu_type(opcode: int, sender: Sender, ahs: bool = False) -> Callable[[_Cls], _Cls]:
    """Register a PDU class (a NamedTuple with ``encode()`` and a static
    ``decode(header, ahs)``) as the one type of ``opcode``."""
    def register(cls: _Cls) -> _Cls:
        if opcode in PDU_TYPES:
            raise ValueError(f"opcode 0x{opcode:02x} registered twice")
        PDU_TYPES[opcode] = PduType(opcode, cls.__name__, cls, sender, getattr(cls, "decode"), ahs)
        return cls
    return register


class PDU(Protocol):
    """What every registered PDU type has."""

    def encode(self) -> bytes: ...


_unpack_gen: Final = _GEN.unpack_from


# --- initiator PDUs ----------------------------------------------------------

NOP_OUT: Final = 0x00


@pdu_type(NOP_OUT, INITIATOR)
class NopOut(NamedTuple):
    itt: int
    ttt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    lun: bytes = LUN0
    immediate: bool = False
    data_length: int = 0

    def encode(self) -> bytes:
        return _GEN.pack(_op(NOP_OUT, self.immediate), _F, 0, 0, _word1(0, self.data_length),
                         self.lun, self.itt, self.ttt, self.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> NopOut:
        g = _unpack_gen(header)
        return NopOut(g[6], g[7], g[8], g[9], g[5], bool(g[0] & _I), g[4] & 0xFFFFFF)


SCSI_COMMAND: Final = 0x01


@pdu_type(SCSI_COMMAND, INITIATOR, ahs=True)
class ScsiCommand(NamedTuple):
    itt: int
    lun: bytes
    cdb: bytes  # 16 bytes from the BHS, plus any Extended CDB AHS bytes
    expected_length: int
    cmd_sn: int
    exp_stat_sn: int
    read: bool = False
    write: bool = False
    attr: int = ATTR_SIMPLE
    final: bool = True
    immediate: bool = False
    bidi_read_length: int | None = None
    data_length: int = 0

    def encode(self) -> bytes:
        cdb = self.cdb
        ahs = b""
        if len(cdb) > 16:
            ext = cdb[16:]
            ahs = _AHS_HDR.pack(len(ext) + 1, AHS_EXTENDED_CDB) + ext + bytes(-len(ext) & 3)
            cdb = cdb[:16]
        if self.bidi_read_length is not None:
            ahs += _AHS_HDR.pack(5, AHS_BIDI_READ_LENGTH) + _U32.pack(self.bidi_read_length)
        b1 = (_F if self.final else 0) | (0x40 if self.read else 0) | (0x20 if self.write else 0) | self.attr
        return _CMD.pack(_op(SCSI_COMMAND, self.immediate), b1, _word1(len(ahs), self.data_length),
                         self.lun, self.itt, self.expected_length, self.cmd_sn, self.exp_stat_sn,
                         cdb.ljust(16, b"\0")) + ahs

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> ScsiCommand:
        return _decode_scsi_command(header, ahs)


# (Final: compiled, a static instead of a lookup in the module's dict, per command)
SCSI_COMMAND_TYPE: Final = ScsiCommand


def _decode_scsi_command(header: Buf, ahs: Buf = b"") -> ScsiCommand:
    """ScsiCommand.decode (a module function: the framer calls it directly, per command)."""
    b0: int
    b1: int
    w: int
    b0, b1, w, lun, itt, edtl, cmd_sn, exp_stat_sn, cdb = _CMD_UNPACK(header)
    bidi = None
    if ahs:
        ext, bidi = _parse_ahs(ahs)
        cdb += ext
    # every field is given, so the NamedTuple's Python-level __new__ can be skipped (per command)
    return new_pdu(SCSI_COMMAND_TYPE, (itt, lun, cdb, edtl, cmd_sn, exp_stat_sn, (b1 & 0x40) != 0,
                                       (b1 & 0x20) != 0, b1 & 0x07, (b1 & _F) != 0, (b0 & _I) != 0,
                                       bidi, w & 0xFFFFFF))


TASK_MGMT_REQUEST: Final = 0x02


@pdu_type(TASK_MGMT_REQUEST, INITIATOR)
class TaskMgmtRequest(NamedTuple):
    itt: int
    function: int
    lun: bytes = LUN0
    rtt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    ref_cmd_sn: int = 0
    exp_data_sn: int = 0
    immediate: bool = True

    def encode(self) -> bytes:
        return _GEN.pack(_op(TASK_MGMT_REQUEST, self.immediate), _F | self.function, 0, 0, 0,
                         self.lun, self.itt, self.rtt, self.cmd_sn, self.exp_stat_sn,
                         self.ref_cmd_sn, self.exp_data_sn, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> TaskMgmtRequest:
        g = _unpack_gen(header)
        return TaskMgmtRequest(g[6], g[1] & 0x7F, g[5], g[7], g[8], g[9], g[10], g[11],
                               bool(g[0] & _I))


LOGIN_REQUEST: Final = 0x03


@pdu_type(LOGIN_REQUEST, INITIATOR)
class LoginRequest(NamedTuple):
    itt: int
    isid: bytes
    tsih: int = 0
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    csg: int = STAGE_SECURITY
    nsg: int = STAGE_SECURITY
    transit: bool = False
    cont: bool = False
    version_max: int = 0
    version_min: int = 0
    data_length: int = 0

    def encode(self) -> bytes:
        b1 = (_F if self.transit else 0) | (_C if self.cont else 0) | self.csg << 2 | self.nsg
        return _GEN.pack(LOGIN_REQUEST | _I, b1, self.version_max, self.version_min,
                         _word1(0, self.data_length), self.isid + _U16.pack(self.tsih), self.itt,
                         self.cid << 16, self.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> LoginRequest:
        g = _unpack_gen(header)
        b1, isid = g[1], g[5]
        return LoginRequest(g[6], isid[:6], isid[6] << 8 | isid[7], g[7] >> 16, g[8], g[9],
                            b1 >> 2 & 3, b1 & 3, bool(b1 & _F), bool(b1 & _C), g[2], g[3],
                            g[4] & 0xFFFFFF)


TEXT_REQUEST: Final = 0x04


@pdu_type(TEXT_REQUEST, INITIATOR)
class TextRequest(NamedTuple):
    itt: int
    ttt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    final: bool = True
    cont: bool = False
    lun: bytes = LUN0
    immediate: bool = False
    data_length: int = 0

    def encode(self) -> bytes:
        b1 = (_F if self.final else 0) | (_C if self.cont else 0)
        return _GEN.pack(_op(TEXT_REQUEST, self.immediate), b1, 0, 0, _word1(0, self.data_length),
                         self.lun, self.itt, self.ttt, self.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> TextRequest:
        g = _unpack_gen(header)
        b1 = g[1]
        return TextRequest(g[6], g[7], g[8], g[9], bool(b1 & _F), bool(b1 & _C), g[5],
                           bool(g[0] & _I), g[4] & 0xFFFFFF)


DATA_OUT: Final = 0x05


@pdu_type(DATA_OUT, INITIATOR)
class DataOut(NamedTuple):
    itt: int
    ttt: int
    data_sn: int
    buffer_offset: int
    final: bool = True
    exp_stat_sn: int = 0
    lun: bytes = LUN0
    data_length: int = 0

    def encode(self) -> bytes:
        return _GEN.pack(DATA_OUT, _F if self.final else 0, 0, 0, _word1(0, self.data_length),
                         self.lun, self.itt, self.ttt, 0, self.exp_stat_sn, 0,
                         self.data_sn, self.buffer_offset, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> DataOut:
        g = _unpack_gen(header)
        return new_pdu(DataOut, (g[6], g[7], g[11], g[12], (g[1] & _F) != 0, g[9], g[5], g[4] & 0xFFFFFF))


LOGOUT_REQUEST: Final = 0x06


@pdu_type(LOGOUT_REQUEST, INITIATOR)
class LogoutRequest(NamedTuple):
    itt: int
    reason: int = 0  # 0 close session, 1 close connection, 2 remove for recovery
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    immediate: bool = False

    def encode(self) -> bytes:
        return _GEN.pack(_op(LOGOUT_REQUEST, self.immediate), _F | self.reason, 0, 0, 0, LUN0,
                         self.itt, self.cid << 16, self.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> LogoutRequest:
        g = _unpack_gen(header)
        return LogoutRequest(g[6], g[1] & 0x7F, g[7] >> 16, g[8], g[9], bool(g[0] & _I))


SNACK: Final = 0x10


@pdu_type(SNACK, INITIATOR)
class Snack(NamedTuple):
    itt: int
    snack_type: int  # 0 Data/R2T, 1 status, 2 DataACK, 3 R-Data
    ttt: int = RESERVED_TAG  # TTT for DataACK, SNACK Tag for R-Data
    exp_stat_sn: int = 0
    beg_run: int = 0
    run_length: int = 0
    lun: bytes = LUN0

    def encode(self) -> bytes:
        return _GEN.pack(SNACK, _F | self.snack_type, 0, 0, 0, self.lun, self.itt, self.ttt, 0,
                         self.exp_stat_sn, 0, self.beg_run, self.run_length, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> Snack:
        g = _unpack_gen(header)
        return Snack(g[6], g[1] & 0x0F, g[7], g[9], g[11], g[12], g[5])


# --- target PDUs -------------------------------------------------------------

NOP_IN: Final = 0x20


@pdu_type(NOP_IN, TARGET)
class NopIn(NamedTuple):
    itt: int
    ttt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    lun: bytes = LUN0
    data_length: int = 0

    def encode(self) -> bytes:
        return _GEN.pack(NOP_IN, _F, 0, 0, _word1(0, self.data_length), self.lun, self.itt,
                         self.ttt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn, 0, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> NopIn:
        g = _unpack_gen(header)
        return NopIn(g[6], g[7], g[8], g[9], g[10], g[5], g[4] & 0xFFFFFF)


SCSI_RESPONSE: Final = 0x21


@pdu_type(SCSI_RESPONSE, TARGET)
class ScsiResponse(NamedTuple):
    itt: int
    status: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    response: int = 0  # 0 command completed at target, 1 target failure
    exp_data_sn: int = 0
    residual_count: int = 0
    overflow: bool = False
    underflow: bool = False
    bidi_residual_count: int = 0
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    snack_tag: int = 0
    data_length: int = 0  # len(sense_segment(sense)) or 0

    def encode(self) -> bytes:
        (itt, status, stat_sn, exp_cmd_sn, max_cmd_sn, response, exp_data_sn, residual_count,
         overflow, underflow, bidi_residual_count, bidi_overflow, bidi_underflow, snack_tag,
         data_length) = self   # one unpack: cheaper than fifteen attribute reads (per command)
        b1 = (_F | (0x10 if bidi_overflow else 0) | (0x08 if bidi_underflow else 0)
              | (0x04 if overflow else 0) | (0x02 if underflow else 0))
        return _GEN_PACK(SCSI_RESPONSE, b1, response, status, _word1(0, data_length), LUN0, itt,
                         snack_tag, stat_sn, exp_cmd_sn, max_cmd_sn, exp_data_sn,
                         bidi_residual_count, residual_count)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> ScsiResponse:
        g = _unpack_gen(header)
        b1 = g[1]
        return ScsiResponse(g[6], g[3], g[8], g[9], g[10], g[2], g[11], g[13], bool(b1 & 0x04),
                            bool(b1 & 0x02), g[12], bool(b1 & 0x10), bool(b1 & 0x08), g[7],
                            g[4] & 0xFFFFFF)


TASK_MGMT_RESPONSE: Final = 0x22


@pdu_type(TASK_MGMT_RESPONSE, TARGET)
class TaskMgmtResponse(NamedTuple):
    itt: int
    response: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    info: bytes = bytes(3)   # QUERY ASYNCHRONOUS EVENT: additional response information (RFC 7144)

    def encode(self) -> bytes:
        # the additional response information sits in bytes 8-10, where other PDUs carry a LUN
        return _GEN.pack(TASK_MGMT_RESPONSE, _F, self.response, 0, 0, self.info[:3].ljust(8, b"\0"),
                         self.itt, 0, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn, 0, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> TaskMgmtResponse:
        g = _unpack_gen(header)
        return TaskMgmtResponse(g[6], g[2], g[8], g[9], g[10], bytes(g[5][:3]))


LOGIN_RESPONSE: Final = 0x23


@pdu_type(LOGIN_RESPONSE, TARGET)
class LoginResponse(NamedTuple):
    itt: int
    isid: bytes
    tsih: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    csg: int
    nsg: int
    transit: bool = False
    cont: bool = False
    status_class: int = 0
    status_detail: int = 0
    version_max: int = 0
    version_active: int = 0
    data_length: int = 0

    def encode(self) -> bytes:
        b1 = (_F if self.transit else 0) | (_C if self.cont else 0) | self.csg << 2 | self.nsg
        return _GEN.pack(LOGIN_RESPONSE, b1, self.version_max, self.version_active,
                         _word1(0, self.data_length), self.isid + _U16.pack(self.tsih),
                         self.itt, 0, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn,
                         self.status_class << 24 | self.status_detail << 16, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> LoginResponse:
        g = _unpack_gen(header)
        b1, isid = g[1], g[5]
        return LoginResponse(g[6], isid[:6], isid[6] << 8 | isid[7], g[8], g[9], g[10],
                             b1 >> 2 & 3, b1 & 3, bool(b1 & _F), bool(b1 & _C), g[11] >> 24,
                             g[11] >> 16 & 0xFF, g[2], g[3], g[4] & 0xFFFFFF)


TEXT_RESPONSE: Final = 0x24


@pdu_type(TEXT_RESPONSE, TARGET)
class TextResponse(NamedTuple):
    itt: int
    ttt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    final: bool = True
    cont: bool = False
    lun: bytes = LUN0
    data_length: int = 0

    def encode(self) -> bytes:
        b1 = (_F if self.final else 0) | (_C if self.cont else 0)
        return _GEN.pack(TEXT_RESPONSE, b1, 0, 0, _word1(0, self.data_length), self.lun,
                         self.itt, self.ttt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn,
                         0, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> TextResponse:
        g = _unpack_gen(header)
        b1 = g[1]
        return TextResponse(g[6], g[7], g[8], g[9], g[10], bool(b1 & _F), bool(b1 & _C), g[5],
                            g[4] & 0xFFFFFF)


DATA_IN: Final = 0x25


@pdu_type(DATA_IN, TARGET)
class DataIn(NamedTuple):
    itt: int
    data_sn: int
    buffer_offset: int
    exp_cmd_sn: int
    max_cmd_sn: int
    final: bool = False
    status: int | None = None  # set (S bit) only on the last PDU when it carries status
    stat_sn: int = 0
    residual_count: int = 0
    overflow: bool = False
    underflow: bool = False
    ack: bool = False
    ttt: int = RESERVED_TAG
    lun: bytes = LUN0
    data_length: int = 0

    def encode(self) -> bytes:
        (itt, data_sn, buffer_offset, exp_cmd_sn, max_cmd_sn, final, status, stat_sn,
         residual_count, overflow, underflow, ack, ttt, lun, data_length) = self   # as ScsiResponse
        b1 = ((_F if final else 0) | (0x40 if ack else 0) | (0x04 if overflow else 0)
              | (0x02 if underflow else 0) | (0 if status is None else 0x01))
        return _GEN_PACK(DATA_IN, b1, 0, status or 0, _word1(0, data_length), lun, itt, ttt,
                         stat_sn, exp_cmd_sn, max_cmd_sn, data_sn, buffer_offset, residual_count)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> DataIn:
        g = _unpack_gen(header)
        b1 = g[1]
        return DataIn(g[6], g[11], g[12], g[9], g[10], bool(b1 & _F), g[3] if b1 & 0x01 else None,
                      g[8], g[13], bool(b1 & 0x04), bool(b1 & 0x02), bool(b1 & 0x40), g[7], g[5],
                      g[4] & 0xFFFFFF)


LOGOUT_RESPONSE: Final = 0x26


@pdu_type(LOGOUT_RESPONSE, TARGET)
class LogoutResponse(NamedTuple):
    itt: int
    response: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    time2wait: int = 0
    time2retain: int = 0

    def encode(self) -> bytes:
        return _GEN.pack(LOGOUT_RESPONSE, _F, self.response, 0, 0, LUN0, self.itt, 0,
                         self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn, 0,
                         self.time2wait << 16 | self.time2retain, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> LogoutResponse:
        g = _unpack_gen(header)
        return LogoutResponse(g[6], g[2], g[8], g[9], g[10], g[12] >> 16, g[12] & 0xFFFF)


R2T_OPCODE: Final = 0x31


@pdu_type(R2T_OPCODE, TARGET)
class R2T(NamedTuple):
    itt: int
    ttt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    r2t_sn: int
    buffer_offset: int
    desired_length: int
    lun: bytes = LUN0

    def encode(self) -> bytes:
        return _GEN.pack(R2T_OPCODE, _F, 0, 0, 0, self.lun, self.itt, self.ttt, self.stat_sn,
                         self.exp_cmd_sn, self.max_cmd_sn, self.r2t_sn, self.buffer_offset,
                         self.desired_length)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> R2T:
        g = _unpack_gen(header)
        return R2T(g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13], g[5])


ASYNC_MESSAGE: Final = 0x32


@pdu_type(ASYNC_MESSAGE, TARGET)
class AsyncMessage(NamedTuple):
    event: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    lun: bytes = LUN0
    vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    data_length: int = 0  # event 0: len(sense_segment(sense))

    def encode(self) -> bytes:
        return _GEN.pack(ASYNC_MESSAGE, _F, 0, 0, _word1(0, self.data_length), self.lun,
                         RESERVED_TAG, 0, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn,
                         self.event << 24 | self.vcode << 16 | self.parameter1,
                         self.parameter2 << 16 | self.parameter3, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> AsyncMessage:
        g = _unpack_gen(header)
        w36, w40 = g[11], g[12]
        return AsyncMessage(w36 >> 24, g[8], g[9], g[10], g[5], w36 >> 16 & 0xFF, w36 & 0xFFFF,
                            w40 >> 16, w40 & 0xFFFF, g[4] & 0xFFFFFF)


REJECT: Final = 0x3F


@pdu_type(REJECT, TARGET)
class Reject(NamedTuple):
    reason: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    data_sn: int = 0
    data_length: int = BHS_LEN  # the data segment is the rejected header

    def encode(self) -> bytes:
        return _GEN.pack(REJECT, _F, self.reason, 0, _word1(0, self.data_length), LUN0,
                         RESERVED_TAG, 0, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn,
                         self.data_sn, 0, 0)

    @staticmethod
    def decode(header: Buf, ahs: Buf) -> Reject:
        g = _unpack_gen(header)
        return Reject(g[2], g[8], g[9], g[10], g[11], g[4] & 0xFFFFFF)


# --- the two headers nearly every command is answered with ------------------
# DataIn(...).encode() and ScsiResponse(...).encode() for the common case, from
# the fields alone: no PDU tuple built and unpacked again, no method looked up
# (per command; a test checks the bytes are the same)

# _GEN's layout for the two, with what is constant in them as pad bytes (zeros) or
# constant bytes, and the first four bytes as one word: fewer values converted
# per response than _GEN's fourteen. A read's Data-In: word 0, DataSegmentLength,
# LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN, DataSN, offset, residual; a
# status: word 0, (no segment, LUN 0), ITT, (SNACK Tag 0), StatSN, ExpCmdSN,
# MaxCmdSN, ExpDataSN, (no bidirectional residual), residual.
_DATA_IN_PACK: Final = struct.Struct(">II8sI4sIIIIII").pack
_SCSI_STATUS_PACK: Final = struct.Struct(">I12xI4xIIII4xI").pack
_NO_TTT: Final = _U32.pack(RESERVED_TAG)
_DATA_IN_WORD0: Final = (DATA_IN << 24) | (_F | 0x01) << 16     # F and S set
_DATA_IN_MORE: Final = DATA_IN << 24                           # a Data-In inside a sequence
_DATA_IN_FINAL: Final = _DATA_IN_MORE | _F << 16                  # the last of its sequence
_SCSI_STATUS_WORD0: Final = (SCSI_RESPONSE << 24) | _F << 16


def encode_data_in_status(itt: int, data_sn: int, exp_cmd_sn: int, max_cmd_sn: int, status: int,
                          stat_sn: int, residual_count: int, overflow: bool, underflow: bool,
                          lun: bytes, data_length: int, offset: int = 0) -> bytes:
    """A read's last Data-In, with its status: F and S set, no A bit."""
    if not 0 <= data_length <= 0xFFFFFF or not 0 <= status <= 0xFF:   # (as _GEN's fields refuse them)
        raise PDUError("DataSegmentLength or status out of range")
    word0 = _DATA_IN_WORD0 | (0x040000 if overflow else 0) | (0x020000 if underflow else 0) | status
    return _DATA_IN_PACK(word0, data_length, lun, itt, _NO_TTT, stat_sn, exp_cmd_sn,
                         max_cmd_sn, data_sn, offset, residual_count)


# a whole read's only Data-In, GOOD, no residual (the usual read): word 0 and the TTT as
# constant bytes, DataSN, offset and residual (all 0) as pad bytes
_READ_DONE_PACK: Final = struct.Struct(">4sI8sI4sIII12x").pack
_READ_DONE_WORD0: Final = _U32.pack(_DATA_IN_WORD0)


def encode_read_done(itt: int, exp_cmd_sn: int, max_cmd_sn: int, stat_sn: int, lun: bytes,
                     data_length: int) -> bytes:
    """encode_data_in_status of a read answered GOOD in one Data-In, without a
    residual: DataSN, offset and residual 0, the status 0 (per command: five
    values fewer to convert)."""
    if not 0 <= data_length <= 0xFFFFFF:
        raise PDUError("DataSegmentLength out of range")
    return _READ_DONE_PACK(_READ_DONE_WORD0, data_length, lun, itt, _NO_TTT, stat_sn,
                           exp_cmd_sn, max_cmd_sn)


def encode_data_in(itt: int, data_sn: int, offset: int, exp_cmd_sn: int, max_cmd_sn: int,
                   final: bool, lun: bytes, data_length: int) -> bytes:
    """A big read's Data-In before the last: no status, no A bit (per PDU)."""
    if not 0 <= data_length <= 0xFFFFFF:
        raise PDUError("DataSegmentLength out of range")
    return _DATA_IN_PACK(_DATA_IN_FINAL if final else _DATA_IN_MORE, data_length, lun,
                         itt, _NO_TTT, 0, exp_cmd_sn, max_cmd_sn, data_sn, offset, 0)


def encode_scsi_status(itt: int, status: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
                       exp_data_sn: int, residual_count: int, overflow: bool,
                       underflow: bool) -> bytes:
    """A SCSI Response without sense data (response 0, no bidirectional residual)."""
    if not 0 <= status <= 0xFF:
        raise PDUError("status out of range")
    word0 = _SCSI_STATUS_WORD0 | (0x040000 if overflow else 0) | (0x020000 if underflow else 0) | status
    return _SCSI_STATUS_PACK(word0, itt, stat_sn, exp_cmd_sn, max_cmd_sn, exp_data_sn, residual_count)


# the table's lookups (decode_pdu, session and test code use these)
OPCODES: dict[type, int] = {t.cls: t.opcode for t in PDU_TYPES.values()}   # what encode() writes
_DECODERS: Final = {t.opcode: t.decode for t in PDU_TYPES.values()}
_TAKES_AHS: Final = frozenset(t.opcode for t in PDU_TYPES.values() if t.ahs)
INITIATOR_OPCODES = frozenset(t.opcode for t in PDU_TYPES.values() if t.sender == INITIATOR)


def decode_pdu(header, ahs=b"") -> PDU:
    """Typed PDU from a 48-byte BHS and its AHS (``ahs`` must be exactly
    TotalAHSLength*4 bytes).  Only the SCSI Command may carry AHS."""
    if len(header) != BHS_LEN:
        raise PDUError("BHS must be 48 bytes")
    opcode = header[0] & _OPMASK
    if header[4] * 4 != len(ahs):
        raise PDUError("AHS length does not match TotalAHSLength")
    dec = _DECODERS.get(opcode)
    if dec is None:
        raise PDUError(f"reserved opcode 0x{opcode:02x}", REJECT_COMMAND_NOT_SUPPORTED)
    if ahs and opcode not in _TAKES_AHS:
        raise PDUError("AHS on a PDU that takes none", REJECT_INVALID_PDU_FIELD)
    return dec(header, ahs)


# --- text segments (§6.1) ----------------------------------------------------

MAX_KEY_LEN: Final = 63
MAX_VALUE_LEN: Final = 8192
_KEY_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_")


def decode_text(data) -> list[tuple[str, str]]:
    """key=value pairs from a Login/Text data segment (NUL-terminated
    entries; padding NULs are tolerated)."""
    pairs = []
    for entry in bytes(data).split(b"\0"):
        if not entry:
            continue
        key, eq, value = entry.partition(b"=")
        if not eq:
            raise PDUError("text entry without '='")
        if not key or len(key) > MAX_KEY_LEN or not _KEY_CHARS.issuperset(key):
            raise PDUError("invalid key name")
        if len(value) > MAX_VALUE_LEN:
            raise PDUError("value too long")
        try:
            pairs.append((key.decode("ascii"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise PDUError("value is not UTF-8") from None
    return pairs


def encode_text(pairs) -> bytes:
    """Data segment for ``pairs``: each ``key=value`` followed by a NUL."""
    return b"".join(f"{k}={v}\0".encode() for k, v in pairs)


# --- receive framing ------------------------------------------------------------

_WORD1: Final = struct.Struct(">4xI")   # TotalAHSLength and DataSegmentLength, as one word
_WORD1_UNPACK: Final = _WORD1.unpack_from   # (bound once: per PDU)
_MAX_AHS = 255 * 4


class PduFramer:
    """The receive side of a connection in full feature phase, without I/O:
    bytes go in, whole PDUs come out, with the checks of RFC 7143 §11.1 (a
    data segment within ``max_data``, header and data digests when
    negotiated).

    Made for a buffered protocol (``recv_into``)::

        buf = framer.get_buffer()          # where the next bytes go
        framer.received(sock.recv_into(buf))
        while (item := framer.next()) is not None:
            pdu, data, header = item       # decoded PDU, data segment, 48-byte BHS

    Small PDUs are parsed in a staging buffer that is reused, so their data
    segments are copied out (``bytes``). A data segment of ``big`` bytes or
    more gets a buffer of its own from ``alloc`` (its padding and data digest
    included), and ``get_buffer`` returns the part of it still to come, so
    the socket writes it in place: it is delivered as a memoryview of that
    buffer, which the framer never touches again. Everything ``next``
    returns thus stays valid for as long as the caller keeps it.

    ``next`` raises :class:`PDUError` for a segment longer than ``max_data``,
    a digest error (``REJECT_DATA_DIGEST_ERROR`` for the data digest) or a
    PDU that does not decode; the stream cannot be trusted after that.
    """

    BIG: Final = BIG_FRAME   # a segment this big gets its own buffer (maybe shared memory)
    STAGE: Final = 128 << 10

    def __init__(self, header_digest: bool, data_digest: bool, max_data: int,
                 alloc: Callable[[int], bytearray | memoryview] = bytearray, big: int = BIG,
                 stage: int = STAGE) -> None:
        self.hd = DIGEST_LEN if header_digest else 0
        self.dd = data_digest
        self.max_data = max_data
        self.alloc = alloc
        self.big = big
        # a staged PDU is smaller than this; a partial one left at the end of
        # the buffer is moved down, and still leaves room for another
        largest = BHS_LEN + _MAX_AHS + DIGEST_LEN + big + 3 + DIGEST_LEN
        self._largest = largest
        self._buf = memoryview(bytearray(max(stage, 2 * largest)))
        self._low = len(self._buf) - largest      # move down once the free room is below this
        self._start = self._end = 0               # unparsed bytes in _buf
        self._seg: memoryview | None = None       # a big data segment received in place
        self._seg_pos = 0
        self._head: tuple[bytes, bytes, int] = (b"", b"", 0)   # its BHS, AHS, DataSegmentLength
        self._skip = 0                            # bytes of a PDU with a bad header still to drop
        # after a big data segment the next PDU's header is read alone (see get_buffer)
        self._header_only = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as (part of) a PDU."""
        return self._end - self._start + (self._seg_pos if self._seg is not None else 0)

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty). After a big data
        segment only the rest of the next header: the next PDU is likely big
        too (a write's Data-Out), and its data then goes straight into its own
        buffer instead of into the staging buffer and then copied there."""
        if self._seg is not None:
            return self._seg[self._seg_pos:]
        buf = self._buf
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end > self._low:
            rest = self._end - self._start
            buf[:rest] = buf[self._start:self._end]
            self._start, self._end = 0, rest
        if self._header_only:
            want = self.wanted()
            if want:
                return buf[self._end:self._end + want]
        return buf[self._end:]

    def received(self, n: int) -> None:
        """``n`` bytes were written at the start of the last ``get_buffer()``."""
        if self._seg is not None:
            self._seg_pos += n
        else:
            self._end += n

    def wanted(self) -> int:
        """How many bytes ``next`` still needs before it can return the next
        PDU (or move on to receiving its big data segment in place): a reader
        that must not read past a PDU (the login phase, whose StreamReader
        keeps what follows for the full feature phase) reads exactly these.
        Never more than ``get_buffer`` has room for; 0 once ``next`` has work."""
        if self._seg is not None:
            return len(self._seg) - self._seg_pos
        if self._skip:
            return min(self._skip, self._largest)
        avail = self._end - self._start
        if avail < BHS_LEN:
            return BHS_LEN + self.hd - avail   # a header digest always follows (maybe past an AHS)
        (word,) = _WORD1.unpack_from(self._buf, self._start)
        ahs_len, length = (word >> 24) * 4, word & 0xFFFFFF
        if length > self.max_data:
            return 0                 # `next` raises
        need = BHS_LEN + ahs_len + self.hd            # the header, digest included
        if length < self.big:
            need += ((length + 3) & ~3) + (DIGEST_LEN if self.dd and length else 0)
        return max(need - avail, 0)

    def feed(self, data) -> Iterator[tuple[PDU, bytes | memoryview, bytes]]:
        """Take ``data`` (e.g. bytes read before this framer existed) and
        yield the PDUs it completes, as ``next`` returns them (an error is
        raised where it is met, after the PDUs before it)."""
        mv = memoryview(data).cast("B")
        while True:
            while (item := self.next()) is not None:
                yield item
            if not mv:
                return
            buf = self.get_buffer()
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            mv = mv[n:]
            self.received(n)

    def next(self) -> tuple[PDU, bytes | memoryview, bytes] | None:
        """The next complete PDU as (PDU, data segment, BHS), or None."""
        if self._seg is not None:
            if self._seg_pos < len(self._seg):
                return None
            return self._segment_done()
        if self._skip:
            self._skipping()
            return None
        buf, start = self._buf, self._start
        avail = self._end - start
        if avail < BHS_LEN:
            return None
        word: int = _WORD1_UNPACK(buf, start)[0]
        ahs_len, length = (word >> 24) * 4, word & 0xFFFFFF
        if length > self.max_data:
            raise PDUError(f"data segment of {length} bytes exceeds {self.max_data}")
        pos = start + BHS_LEN + ahs_len + self.hd          # where the data segment starts
        padded = (length + 3) & ~3
        end = pos + padded + (DIGEST_LEN if self.dd and length else 0)
        if length >= self.big:
            if avail < pos - start:
                return None
            try:
                header, ahs = self._header(start, ahs_len)
            except DigestError:
                self._skip = end - start     # the rest of the PDU goes by unread
                self._header_only = False    # in reads as big as they come
                self._start = start
                self._skipping()
                return None
            size = end - pos
            self._header_only = True
            seg = memoryview(self.alloc(size))[:size]
            take = min(self._end - pos, size)
            seg[:take] = buf[pos:pos + take]
            self._start = pos + take
            self._seg, self._seg_pos, self._head = seg, take, (header, ahs, length)
            if take < size:
                return None
            return self._segment_done()
        if avail < end - start:
            return None
        self._header_only = False
        if ahs_len or self.hd:
            try:
                header, ahs = self._header(start, ahs_len)
            except DigestError:
                self._start = end
                raise
        else:    # the usual PDU: a BHS alone (_header's work without its call, per PDU)
            header, ahs = _TOBYTES(buf[start:start + BHS_LEN]), b""
        data = b""
        if length:
            data = _TOBYTES(buf[pos:pos + length])
            if self.dd and buf[pos + padded:end] != digest(buf[pos:pos + padded]):
                self._start = end
                raise DigestError("data digest error", REJECT_DATA_DIGEST_ERROR, header)
        self._start = end
        # decode_pdu without its call: its length checks hold by construction here (a
        # 48-byte BHS, the AHS TotalAHSLength says); decode_pdu itself raises the rest
        opcode = header[0] & _OPMASK
        if opcode == SCSI_COMMAND and not ahs:   # the usual PDU: a direct call, not the table's
            return _decode_scsi_command(header), data, header
        dec = _DECODERS.get(opcode)
        if dec is None or (ahs and opcode not in _TAKES_AHS):
            return decode_pdu(header, ahs), data, header
        return dec(header, ahs), data, header

    def _header(self, start: int, ahs_len: int) -> tuple[bytes, bytes]:
        buf = self._buf
        header = _TOBYTES(buf[start:start + BHS_LEN])
        ahs = buf[start + BHS_LEN:start + BHS_LEN + ahs_len].tobytes() if ahs_len else b""
        if self.hd:
            at = start + BHS_LEN + ahs_len
            if buf[at:at + DIGEST_LEN] != digest(header, ahs):
                raise DigestError("header digest error", REJECT_PROTOCOL_ERROR, None)
        return header, ahs

    def _segment_done(self) -> tuple[PDU, memoryview, bytes]:
        seg, (header, ahs, length) = self._seg, self._head
        assert seg is not None   # called only once a big segment has been received
        self._seg, self._head = None, (b"", b"", 0)
        if self.dd:
            padded = (length + 3) & ~3
            if seg[padded:padded + DIGEST_LEN] != digest(seg[:padded]):
                raise DigestError("data digest error", REJECT_DATA_DIGEST_ERROR, header)
        return decode_pdu(header, ahs), seg[:length], header

    def _skipping(self) -> None:
        """Drop the bytes of a PDU whose header digest failed, as they arrive;
        raises DigestError once they are gone (the stream is then at the next PDU)."""
        gone = min(self._skip, self._end - self._start)
        self._start += gone
        self._skip -= gone
        if self._skip:
            return None
        raise DigestError("header digest error", REJECT_PROTOCOL_ERROR, None)
