"""The disk (SBC) device template: an opcode table and its lookup.

Each OpEntry carries what the STML needs to treat the command generically:
its CDB usage mask (CDB validation and REPORT SUPPORTED OPERATION CODES come
from it), its data direction and how many bytes it expects from the
initiator, whether it is exempt from unit attentions, whether it needs the
medium, what a reservation of another I_T nexus does to it (ops.Conflict),
and its handler. Handlers are coroutines taking the Task and
returning read data (or None); errors are raised as CheckCondition. The
handlers live in stml.spc, stml.sbc, stml.modepages and stml.xcopy; stml.pr
and stml.alua add the rows of their commands.
"""
from __future__ import annotations

from typing import ClassVar

from stml import alua, pr
from stml.api import DataDir
from stml.lu import LogicalUnit
from stml.modepages import mode_select, mode_select_out_len, mode_sense
from stml.ops import Conflict, OpEntry, _u, read_check, rw_out_len, trim_views, write_check
from stml.sbc import (
    atomic_check, atomic_out_len, caw_check, caw_out_len, compare_and_write, get_lba_status,
    orwrite, prefetch, prefetch_check, read, read_capacity10, read_capacity16, read_defect_data,
    sanitize, sanitize_check, sanitize_out_len, start_stop_unit, synchronize_cache, unmap,
    unmap_check, unmap_out_len, verify, verify_check, verify_out_len, write, write_and_verify,
    write_atomic, write_same, write_verify_check, ws_check, ws_out_len,
)
from stml.sense import (
    ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE, MANUAL_INTERVENTION_REQUIRED, MEDIUM_NOT_PRESENT,
    NOT_READY, CheckCondition, invalid_field,
)
from stml.spc import (
    inquiry, log_sense, prevent_allow, report_luns, report_supported_opcodes,
    report_supported_tmfs, request_sense, sanitize_in_progress, standard_inquiry, test_unit_ready, thin,
)
from stml.task import Task
from stml.xcopy import (
    extended_copy, xcopy_check, xcopy_out_len, receive_copy_results,
)

__all__ = ["DiskTemplate", "OpEntry", "OPCODES", "medium_error", "standard_inquiry", "trim_views"]

R, W = DataDir.READ, DataDir.WRITE
_RW_USE = 0x18   # DPO, FUA; RDPROTECT/WRPROTECT must be zero (no protection information)
_L4, _L8 = (0xFF,) * 4, (0xFF,) * 8


def _rw(op: int, name: str, size: int, handler, direction, use1: int, **kw) -> OpEntry:
    """A READ/WRITE/VERIFY-shaped CDB: LBA and length in the standard places."""
    if size == 10:
        usage = _u(op, use1, *_L4, 0x3F, 0xFF, 0xFF, 0)
    elif size == 12:
        usage = _u(op, use1, *_L4, *_L4, 0x3F, 0)
    else:
        usage = _u(op, use1, *_L8, *_L4, 0x3F, 0)
    return OpEntry(op, name, usage, handler, direction, medium=True, **kw)


def _reads(op: int, size: int) -> OpEntry:
    return _rw(op, f"READ({size})", size, read, R, _RW_USE | 0x04, check=read_check, conflicts=Conflict.READ)


def _writes(op: int, size: int) -> OpEntry:
    return _rw(op, f"WRITE({size})", size, write, W, _RW_USE, out_len=rw_out_len,
               check=write_check, partial=True, conflicts=Conflict.WRITE)


def _verifies(op: int, size: int) -> OpEntry:
    return _rw(op, f"VERIFY({size})", size, verify, W, 0x16, out_len=verify_out_len,
               check=verify_check, conflicts=Conflict.READ)   # it writes nothing: a read


def _write_verifies(op: int, size: int) -> OpEntry:
    return _rw(op, f"WRITE AND VERIFY({size})", size, write_and_verify, W, 0x16,
               out_len=rw_out_len, check=write_verify_check, partial=True, conflicts=Conflict.WRITE)


_MAINT_IN = 0xA3
_WS_UNMAP = ((1, 0x08, thin),)   # WRITE SAME's UNMAP bit: a thin LU's (0224)

OPCODES: list[OpEntry] = [
    OpEntry(0x00, "TEST UNIT READY", _u(0x00, 0, 0, 0, 0, 0), test_unit_ready, medium=True,
            conflicts=Conflict.SPC2),
    OpEntry(0x03, "REQUEST SENSE", _u(0x03, 0x01, 0, 0, 0xFF, 0), request_sense, R,
            ua_exempt=True, conflicts=Conflict.NONE),
    OpEntry(0x08, "READ(6)", _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0), read, R, check=read_check, medium=True,
            conflicts=Conflict.READ),
    OpEntry(0x0A, "WRITE(6)", _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0), write, W, rw_out_len, write_check,
            partial=True, medium=True, conflicts=Conflict.WRITE),
    OpEntry(0x12, "INQUIRY", _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0), inquiry, R,
            ua_exempt=True, conflicts=Conflict.NONE),
    OpEntry(0x15, "MODE SELECT(6)", _u(0x15, 0x11, 0, 0, 0xFF, 0), mode_select, W, mode_select_out_len,
            conflicts=Conflict.WRITE),
    OpEntry(0x1A, "MODE SENSE(6)", _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0), mode_sense, R, conflicts=Conflict.READ),
    OpEntry(0x1B, "START STOP UNIT", _u(0x1B, 0x01, 0, 0x0F, 0xF7, 0), start_stop_unit,
            check=lambda task: _startable(task), conflicts=Conflict.WRITE),
    OpEntry(0x1E, "PREVENT ALLOW MEDIUM REMOVAL", _u(0x1E, 0, 0, 0, 0x03, 0), prevent_allow,
            conflicts=Conflict.WRITE),
    OpEntry(0x25, "READ CAPACITY(10)", _u(0x25, 0, *_L4, 0, 0, 0x01, 0),
            read_capacity10, R, conflicts=Conflict.NONE, medium=True),
    _reads(0x28, 10),
    _writes(0x2A, 10),
    _write_verifies(0x2E, 10),
    _verifies(0x2F, 10),
    OpEntry(0x34, "PRE-FETCH(10)", _u(0x34, 0x02, *_L4, 0x3F, 0xFF, 0xFF, 0), prefetch,
            check=prefetch_check, medium=True, conflicts=Conflict.READ),
    OpEntry(0x35, "SYNCHRONIZE CACHE(10)", _u(0x35, 0x06, *_L4, 0x3F, 0xFF, 0xFF, 0),
            synchronize_cache, medium=True, conflicts=Conflict.WRITE),
    OpEntry(0x37, "READ DEFECT DATA(10)", _u(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0),
            read_defect_data, R, medium=True, conflicts=Conflict.READ),
    # UNMAP (byte 1 bit 3) on thin LUs only (LBPWS, LBPWS10); no ANCHOR bit (ANC_SUP 0)
    OpEntry(0x41, "WRITE SAME(10)", _u(0x41, 0x08, *_L4, 0x3F, 0xFF, 0xFF, 0), write_same, W,
            ws_out_len, ws_check, medium=True, timeout=120, gated=_WS_UNMAP, conflicts=Conflict.WRITE),
    OpEntry(0x42, "UNMAP", _u(0x42, 0, 0, 0, 0, 0, 0x3F, 0xFF, 0xFF, 0), unmap, W,
            unmap_out_len, unmap_check, medium=True, enabled=thin, conflicts=Conflict.WRITE),   # LBPU
    *[OpEntry(0x48, f"SANITIZE/{name}", _u(0x48, 0x80 | 0x20 | 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), sanitize,
              W, sanitize_out_len, sanitize_check, sa=sa, medium=True, timeout=3600, conflicts=Conflict.WRITE)
      for sa, name in ((0x01, "OVERWRITE"), (0x02, "BLOCK ERASE"), (0x03, "CRYPTOGRAPHIC ERASE"),
                       (0x1F, "EXIT FAILURE MODE"))],
    OpEntry(0x4D, "LOG SENSE", _u(0x4D, 0, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0), log_sense, R,
            conflicts=Conflict.SPC2),
    OpEntry(0x55, "MODE SELECT(10)", _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), mode_select, W,
            mode_select_out_len, conflicts=Conflict.WRITE),
    OpEntry(0x5A, "MODE SENSE(10)", _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0), mode_sense, R,
            conflicts=Conflict.READ),
    OpEntry(0x83, "EXTENDED COPY(LID1)", _u(0x83, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, *_L4, 0, 0),
            extended_copy, W, xcopy_out_len, xcopy_check, sa=0x00, timeout=600, conflicts=Conflict.WRITE),
    OpEntry(0x84, "RECEIVE COPY STATUS(LID1)", _u(0x84, 0x1F, 0xFF, 0, 0, 0, 0, 0, 0, 0, *_L4, 0, 0),
            receive_copy_results, R, sa=0x00, conflicts=Conflict.READ),
    OpEntry(0x84, "RECEIVE COPY OPERATING PARAMETERS", _u(0x84, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, *_L4, 0, 0),
            receive_copy_results, R, sa=0x03, conflicts=Conflict.READ),
    _reads(0x88, 16),
    OpEntry(0x89, "COMPARE AND WRITE", _u(0x89, _RW_USE, *_L8, 0, 0, 0, 0xFF, 0x3F, 0),
            compare_and_write, W, caw_out_len, caw_check, medium=True, conflicts=Conflict.WRITE),
    _writes(0x8A, 16),
    _rw(0x8B, "ORWRITE(16)", 16, orwrite, W, _RW_USE, out_len=rw_out_len, check=write_check,
        conflicts=Conflict.WRITE),
    _write_verifies(0x8E, 16),
    _verifies(0x8F, 16),
    OpEntry(0x90, "PRE-FETCH(16)", _u(0x90, 0x02, *_L8, *_L4, 0x3F, 0), prefetch,
            check=prefetch_check, medium=True, conflicts=Conflict.READ),
    OpEntry(0x91, "SYNCHRONIZE CACHE(16)", _u(0x91, 0x06, *_L8, *_L4, 0x3F, 0), synchronize_cache,
            medium=True, conflicts=Conflict.WRITE),
    OpEntry(0x93, "WRITE SAME(16)", _u(0x93, 0x09, *_L8, *_L4, 0x3F, 0), write_same, W,
            ws_out_len, ws_check, medium=True, timeout=120, gated=_WS_UNMAP, conflicts=Conflict.WRITE),
    OpEntry(0x9C, "WRITE ATOMIC(16)", _u(0x9C, _RW_USE, *_L8, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0),
            write_atomic, W, atomic_out_len, atomic_check, medium=True, conflicts=Conflict.WRITE),
    OpEntry(0x9E, "READ CAPACITY(16)", _u(0x9E, 0x1F, *_L8, *_L4, 0x01, 0), read_capacity16,
            R, sa=0x10, conflicts=Conflict.NONE, medium=True),
    OpEntry(0x9E, "GET LBA STATUS", _u(0x9E, 0x1F, *_L8, *_L4, 0, 0), get_lba_status,
            R, sa=0x12, medium=True, conflicts=Conflict.SPC2),
    OpEntry(0xA0, "REPORT LUNS", _u(0xA0, 0, 0xFF, 0, 0, 0, *_L4, 0, 0),
            report_luns, R, ua_exempt=True, conflicts=Conflict.NONE),
    OpEntry(_MAINT_IN, "REPORT SUPPORTED OPERATION CODES",
            _u(_MAINT_IN, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, *_L4, 0, 0),
            report_supported_opcodes, R, sa=0x0C, conflicts=Conflict.NONE),
    OpEntry(_MAINT_IN, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
            _u(_MAINT_IN, 0x1F, 0x80, 0, 0, 0, *_L4, 0, 0),
            report_supported_tmfs, R, sa=0x0D, conflicts=Conflict.NONE),
    _reads(0xA8, 12),
    _writes(0xAA, 12),
    _write_verifies(0xAE, 12),
    _verifies(0xAF, 12),
    OpEntry(0xB7, "READ DEFECT DATA(12)", _u(0xB7, 0x1F, 0, 0, 0, 0, *_L4, 0, 0),
            read_defect_data, R, medium=True, conflicts=Conflict.READ),
]


def _startable(task: Task) -> None:
    """START STOP UNIT needs no medium (it loads one), but neither a SANITIZE
    under way nor an offline LU lets it start or load anything."""
    lu = task.lu
    assert lu is not None   # see ops.unit()
    if lu.sanitizing:
        raise sanitize_in_progress(lu)
    if lu.offline is not None:
        raise CheckCondition(NOT_READY, MANUAL_INTERVENTION_REQUIRED)


def medium_error(lu: LogicalUnit) -> CheckCondition | None:
    """What a command that touches the medium (OpEntry.medium) gets before its
    own checks: NOT READY while the LU is offline (its store could not open:
    an administrator must act), the medium is ejected or a SANITIZE runs (one
    at a time), else None. The engine asks only while one may be so
    (`not lu.medium_present or lu.job is not None`; an offline LU has no
    medium present): no call per command."""
    if not lu.medium_present:
        if lu.offline is not None:
            return CheckCondition(NOT_READY, MANUAL_INTERVENTION_REQUIRED)
        return CheckCondition(NOT_READY, MEDIUM_NOT_PRESENT)
    if lu.sanitizing:
        return sanitize_in_progress(lu)
    return None


class DiskTemplate:
    """SBC direct-access device: resolves a CDB to its OpEntry."""

    name: ClassVar[str] = "disk"
    peripheral_type: ClassVar[int] = 0x00

    def __init__(self, entries: list[OpEntry] = OPCODES) -> None:
        entries = [*entries, *pr.OPCODES, *alua.OPCODES]   # reservations and ALUA add their rows
        self.entries = list(entries)     # as REPORT SUPPORTED OPERATION CODES lists them
        self.by_opcode: dict[int, OpEntry | dict[int, OpEntry]] = {}
        for e in entries:
            if e.sa is None:
                self.by_opcode[e.opcode] = e
            else:
                self.by_opcode.setdefault(e.opcode, {})[e.sa] = e  # type: ignore[index]
        # the same by opcode as a tuple: one subscript per command
        self._table = tuple(self.by_opcode.get(op) for op in range(256))

    def lookup(self, cdb: bytes) -> OpEntry:
        """The entry for this CDB; INVALID COMMAND OPERATION CODE when none, and
        INVALID FIELD IN CDB for an unknown service action."""
        entry = self._table[cdb[0]]
        if entry is None:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
        if isinstance(entry, dict):
            if len(cdb) < 2:
                raise CheckCondition(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
            entry = entry.get(cdb[1] & 0x1F)
            if entry is None:
                raise invalid_field(1, 4)
        if len(cdb) < entry.size:
            raise invalid_field(len(cdb) - 1)
        return entry
