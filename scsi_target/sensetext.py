"""Sense data as an administrator reads it: the key and the ASC/ASCQ in the
words of SPC-4 (as sg3_utils prints them), beside the raw values."""
from __future__ import annotations

SENSE_KEYS = {
    0x0: "No Sense", 0x1: "Recovered Error", 0x2: "Not Ready", 0x3: "Medium Error",
    0x4: "Hardware Error", 0x5: "Illegal Request", 0x6: "Unit Attention", 0x7: "Data Protect",
    0x8: "Blank Check", 0x9: "Vendor Specific", 0xA: "Copy Aborted", 0xB: "Aborted Command",
    0xD: "Volume Overflow", 0xE: "Miscompare",
}

# (ASC, ASCQ) -> SPC-4 annex D text, for what this target reports
ASC_TEXT = {
    (0x00, 0x00): "No additional sense information",
    (0x04, 0x02): "Logical unit not ready, initializing command required",
    (0x04, 0x03): "Logical unit not ready, manual intervention required",
    (0x04, 0x1B): "Logical unit not ready, sanitize in progress",
    (0x08, 0x04): "Unreachable copy target",
    (0x0C, 0x00): "Write error",
    (0x11, 0x00): "Unrecovered read error",
    (0x1A, 0x00): "Parameter list length error",
    (0x1D, 0x00): "Miscompare during verify operation",
    (0x20, 0x00): "Invalid command operation code",
    (0x21, 0x00): "Logical block address out of range",
    (0x24, 0x00): "Invalid field in cdb",
    (0x25, 0x00): "Logical unit not supported",
    (0x26, 0x00): "Invalid field in parameter list",
    (0x26, 0x06): "Too many target descriptors",
    (0x26, 0x07): "Unsupported target descriptor type code",
    (0x27, 0x00): "Write protected",
    (0x27, 0x02): "Logical unit software write protected",
    (0x28, 0x00): "Not ready to ready change, medium may have changed",
    (0x29, 0x00): "Power on, reset, or bus device reset occurred",
    (0x2A, 0x01): "Mode parameters changed",
    (0x2A, 0x09): "Capacity data has changed",
    (0x2C, 0x00): "Command sequence error",
    (0x39, 0x00): "Saving parameters not supported",
    (0x3A, 0x00): "Medium not present",
    (0x3F, 0x03): "Inquiry data has changed",
    (0x3F, 0x0E): "Reported luns data has changed",
    (0x44, 0x00): "Internal target failure",
    (0x4B, 0x00): "Data phase error",
    (0x53, 0x02): "Medium removal prevented",
    (0x55, 0x03): "Insufficient resources",
}


def describe(key: int, asc: int, ascq: int) -> str:
    """'Illegal Request: Logical block address out of range (sense key 0x5, asc/ascq 0x21/0x00)'."""
    text = ASC_TEXT.get((asc, ascq)) or f"ASC 0x{asc:02x} ASCQ 0x{ascq:02x}"
    return (f"{SENSE_KEYS.get(key, 'Reserved')}: {text} "
            f"(sense key 0x{key:x}, asc/ascq 0x{asc:02x}/0x{ascq:02x})")
