"""Sense data (SPC-4 4.4) and the exceptions that carry it out of handlers.

Every sense key and additional sense code the STML reports is named here,
and only here (tests/test_layers.py holds the other modules to it).

A handler raises CheckCondition; the STML turns it into sense bytes in the
format the LUN's control mode page asks for (fixed or descriptor).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from stml.api import Status

# status codes (SAM-5), as plain ints: the command path compares and packs them
GOOD = int(Status.GOOD)
CHECK_CONDITION = int(Status.CHECK_CONDITION)
CONDITION_MET = int(Status.CONDITION_MET)
BUSY = int(Status.BUSY)
RESERVATION_CONFLICT = int(Status.RESERVATION_CONFLICT)
TASK_SET_FULL = int(Status.TASK_SET_FULL)
ACA_ACTIVE = int(Status.ACA_ACTIVE)
TASK_ABORTED = int(Status.TASK_ABORTED)

# sense keys
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
COPY_ABORTED = 0xA
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# (asc, ascq) pairs, by name, so handlers read like the standard
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
# a bad transport field of the command (FCP-4, SAS: a reserved task attribute), not of its CDB
INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
SOFTWARE_WRITE_PROTECTED = (0x27, 0x02)
# with DATA PROTECT: a thin LU's backing store has no room for a write (SBC-4 thin provisioning)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)
POWER_ON_RESET = (0x29, 0x00)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
CAPACITY_DATA_CHANGED = (0x2A, 0x09)
REPORTED_LUNS_DATA_CHANGED = (0x3F, 0x0E)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
MEDIUM_NOT_PRESENT = (0x3A, 0x00)
NOT_READY_INIT_REQUIRED = (0x04, 0x02)
# an LU served offline: its backend could not open (stml.lu.Offline)
MANUAL_INTERVENTION_REQUIRED = (0x04, 0x03)
# with UNIT ATTENTION: an offline LU came online, as a newly loaded medium does (SBC-4 4.4)
NOT_READY_TO_READY_CHANGE = (0x28, 0x00)
SANITIZE_IN_PROGRESS = (0x04, 0x1B)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
WRITE_ERROR = (0x0C, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)
NO_ADDITIONAL_SENSE = (0x00, 0x00)
DATA_PHASE_ERROR = (0x4B, 0x00)
MEDIUM_REMOVAL_PREVENTED = (0x53, 0x02)
UNREACHABLE_COPY_TARGET = (0x08, 0x04)
COPY_TARGET_DEVICE_NOT_REACHABLE = (0x0D, 0x02)
INSUFFICIENT_RESOURCES = (0x55, 0x03)
TOO_MANY_TARGET_DESCRIPTORS = (0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE = (0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS = (0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE = (0x26, 0x09)
OPERATION_IN_PROGRESS = (0x00, 0x16)
ASYMMETRIC_ACCESS_STATE_TRANSITION = (0x04, 0x0A)    # with NOT READY: retry, maybe on another path
LOGICAL_UNIT_COMMUNICATION_FAILURE = (0x08, 0x00)   # a command on a nexus the STML does not know
INVALID_MESSAGE_ERROR = (0x49, 0x00)                # a task attribute the STML does not take (ACA)

# unit attentions of resets and nexus loss (SAM-5 5.14, 6.3)
POWER_ON_OCCURRED = (0x29, 0x01)
SCSI_BUS_RESET_OCCURRED = (0x29, 0x02)
BUS_DEVICE_RESET = (0x29, 0x03)
I_T_NEXUS_LOSS = (0x29, 0x07)
# the unit attentions a reset establishes as it happens: the LU's PREVENT state
# goes with it (stml.lu). Not POWER ON OCCURRED: only a nexus that outlived an
# STML gets it (0247), from an STML whose power on began with no PREVENT at all
RESET_UAS = frozenset({POWER_ON_RESET, SCSI_BUS_RESET_OCCURRED, BUS_DEVICE_RESET})
COMMANDS_CLEARED_BY_ANOTHER = (0x2F, 0x00)
# UA_INTLCK_CTRL 11b: the status a command ended with, as a unit attention
PREVIOUS_BUSY_STATUS = (0x2C, 0x07)
PREVIOUS_TASK_SET_FULL_STATUS = (0x2C, 0x08)
PREVIOUS_RESERVATION_CONFLICT_STATUS = (0x2C, 0x09)
PREVIOUS_STATUS_UA = {BUSY: PREVIOUS_BUSY_STATUS, TASK_SET_FULL: PREVIOUS_TASK_SET_FULL_STATUS,
                      RESERVATION_CONFLICT: PREVIOUS_RESERVATION_CONFLICT_STATUS}

# persistent reservations (SPC-4 5.9, table 51)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
INVALID_RELEASE = (0x26, 0x04)      # INVALID RELEASE OF PERSISTENT RESERVATION
INSUFFICIENT_REGISTRATION_RESOURCES = (0x55, 0x04)


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Sense-key-specific field pointer: which byte (and bit) of the CDB or
    parameter list is wrong."""
    byte: int
    bit: int | None = None
    in_cdb: bool = True


class StatusError(Exception):
    """Ends a command with a status other than GOOD and no sense."""

    def __init__(self, status: int) -> None:
        super().__init__(f"status 0x{status:02x}")
        self.status = status


class CheckCondition(StatusError):
    """Ends a command with CHECK CONDITION and this sense."""

    def __init__(self, key: int, asc_ascq: tuple[int, int], field: FieldPointer | None = None,
                 info: int | None = None, progress: int | None = None) -> None:
        super().__init__(CHECK_CONDITION)
        self.key = key
        self.asc, self.ascq = asc_ascq
        self.field = field
        self.info = info
        self.progress = progress

    def __repr__(self) -> str:
        return f"CheckCondition({self.key:#x}/{self.asc:#04x}/{self.ascq:#04x})"

    def sense(self, descriptor: bool = False) -> bytes:
        return build_sense(self.key, (self.asc, self.ascq), descriptor, self.field, self.info,
                           self.progress)


def invalid_field(byte: int, bit: int | None = None) -> CheckCondition:
    """INVALID FIELD IN CDB pointing at the offending byte/bit."""
    return CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, FieldPointer(byte, bit))


def invalid_param(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST,
                          FieldPointer(byte, bit, in_cdb=False))


def _sks(field: FieldPointer) -> bytes:
    b0 = 0x80 | (0x40 if field.in_cdb else 0)
    if field.bit is not None:
        b0 |= 0x08 | (field.bit & 7)
    return bytes([b0]) + struct.pack(">H", field.byte)


def _progress(fraction: int) -> bytes:
    """Sense-key-specific progress indication: done, in 65536ths."""
    return bytes([0x80]) + struct.pack(">H", min(fraction, 0xFFFF))


def build_sense(key: int, asc_ascq: tuple[int, int], descriptor: bool = False,
                field: FieldPointer | None = None, info: int | None = None,
                progress: int | None = None) -> bytes:
    """Current-error sense data, fixed (0x70) or descriptor (0x72) format;
    the sense-key-specific bytes hold a field pointer or a progress indication."""
    asc, ascq = asc_ascq
    sks = _sks(field) if field is not None else _progress(progress) if progress is not None else None
    if descriptor:
        descs = b""
        if info is not None:
            descs += bytes([0x00, 0x0A, 0x80, 0]) + struct.pack(">Q", info)
        if sks is not None:
            descs += bytes([0x02, 0x06, 0, 0]) + sks + b"\0"
        return bytes([0x72, key & 0xF, asc, ascq, 0, 0, 0, len(descs)]) + descs
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key & 0xF
    if info is not None and info <= 0xFFFFFFFF:  # larger values need descriptor format
        sense[0] |= 0x80  # VALID: INFORMATION holds the LBA / offset
        sense[3:7] = struct.pack(">I", info)
    sense[7] = 10
    sense[12], sense[13] = asc, ascq
    if sks is not None:
        sense[15:18] = sks
    return bytes(sense)


def parse_sense(sense: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) of fixed or descriptor sense; used by clients and tests."""
    if len(sense) < 3:
        raise ValueError("sense data too short")
    code = sense[0] & 0x7F
    if code in (0x72, 0x73):
        return sense[1] & 0xF, sense[2], sense[3]
    if code in (0x70, 0x71):
        return sense[2] & 0xF, sense[12] if len(sense) > 12 else 0, sense[13] if len(sense) > 13 else 0
    raise ValueError(f"unknown sense response code {code:#x}")
