"""MODE SENSE / MODE SELECT (6 and 10) and the mode pages of the disk template.

Each page has a builder that returns the page for a page control value
(0 current, 1 changeable mask, 2 default). Nothing is savable, so asking
for saved values gets SAVING PARAMETERS NOT SUPPORTED. MODE SELECT accepts a page when every bit
that differs from the current value is changeable, then applies it.
"""
from __future__ import annotations

import logging
import struct
from typing import Callable

from stml.cdb import u16
from stml.lu import LogicalUnit
from stml.ops import data_bytes, param_len_error, unit, write_protected
from stml.sense import (
    ILLEGAL_REQUEST, MODE_PARAMETERS_CHANGED, SAVING_PARAMETERS_NOT_SUPPORTED, CheckCondition,
    invalid_field, invalid_param,
)
from stml.task import Task, must_finish

log = logging.getLogger("stml")

CURRENT, CHANGEABLE, DEFAULT, SAVED = 0, 1, 2, 3


def _rw_error_recovery(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = 0x01, 10
    if pc != CHANGEABLE:
        page[2] = 0x80 | 0x40   # AWRE, ARRE: automatic reallocation (nothing to reallocate)
    return bytes(page)


def _caching(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(20)
    page[0], page[1] = 0x08, 18
    if pc == CHANGEABLE:
        page[2] = 0x04           # WCE is changeable
    elif pc == DEFAULT:
        page[2] = 0x04 if lu.options.write_cache else 0
    else:
        page[2] = 0x04 if lu.mode.wce else 0
    return bytes(page)


def _control(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = 0x0A, 10
    if pc == CHANGEABLE:
        page[2] = 0x04           # D_SENSE is changeable
        page[4] = 0x08           # SWP is changeable
        return bytes(page)
    page[2] = 0x04 if (lu.mode.d_sense and pc == CURRENT) else 0
    page[4] = 0x08 if (lu.mode.swp and pc == CURRENT) else 0
    page[3] = 0x10               # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    page[8:10] = b"\xff\xff"     # busy timeout: unlimited
    return bytes(page)


def _informational_exceptions(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = 0x1C, 10
    if pc != CHANGEABLE:
        page[2] = 0x08           # DEXCPT: no failure prediction to report
    return bytes(page)


MODE_PAGES: dict[int, Callable[["LogicalUnit", int], bytes]] = {
    0x01: _rw_error_recovery,
    0x08: _caching,
    0x0A: _control,
    0x1C: _informational_exceptions,
}


def _apply(lu: LogicalUnit, code: int, page: bytes) -> None:
    if code == 0x08:
        lu.mode.wce = bool(page[2] & 0x04)
    elif code == 0x0A:
        lu.mode.d_sense = bool(page[2] & 0x04)
        lu.mode.swp = bool(page[4] & 0x08)


def mode_pages(lu: LogicalUnit, page: int, subpage: int, pc: int) -> bytes:
    if pc == SAVED:   # no page is savable (SPC-4 6.11: saved values not implemented)
        raise CheckCondition(ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED)
    if page == 0x3F:
        if subpage not in (0x00, 0xFF):
            raise invalid_field(3)
        return b"".join(MODE_PAGES[p](lu, pc) for p in sorted(MODE_PAGES))
    if page not in MODE_PAGES:
        raise invalid_field(2, 5)
    if subpage not in (0x00, 0xFF):
        raise invalid_field(3)
    return MODE_PAGES[page](lu, pc)


def _block_descriptor(lu: LogicalUnit, long: bool) -> bytes:
    if long:
        return struct.pack(">QII", lu.blocks, 0, lu.block_size)
    return struct.pack(">I", min(lu.blocks, 0xFFFFFFFF)) + b"\0" + lu.block_size.to_bytes(3, "big")


async def mode_sense(task: Task) -> bytes:
    cdb, lu = task.cdb, unit(task)
    six = len(cdb) == 6
    dbd = cdb[1] & 0x08
    llbaa = not six and bool(cdb[1] & 0x10)
    pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    pages = mode_pages(lu, page, subpage, pc)
    bd = b"" if dbd else _block_descriptor(lu, llbaa)
    dev_specific = (0x80 if write_protected(lu) else 0) | 0x10  # WP, DPOFUA
    if six:
        alloc = cdb[4]
        header = bytes([3 + len(bd) + len(pages), 0, dev_specific, len(bd)])
    else:
        alloc = u16(cdb, 7)
        header = struct.pack(">HBBBBH", 6 + len(bd) + len(pages), 0, dev_specific,
                             0x01 if llbaa and bd else 0, 0, len(bd))
    return (header + bd + pages)[:alloc]


def mode_select_out_len(task: Task) -> int:
    return task.cdb[4] if len(task.cdb) == 6 else u16(task.cdb, 7)


async def mode_select(task: Task) -> None:
    cdb, lu = task.cdb, unit(task)
    six = len(cdb) == 6
    if cdb[1] & 0x01:
        raise invalid_field(1, 0)      # SP: nothing is savable
    data = data_bytes(task)
    if not data:
        return
    hlen = 4 if six else 8
    if len(data) < hlen:
        raise param_len_error()
    bdl = data[3] if six else u16(data, 6)
    long = not six and bool(data[4] & 0x01)
    if bdl:
        size = 16 if long else 8
        if bdl % size:
            raise invalid_param(3 if six else 6)
        if len(data) < hlen + bdl:
            raise param_len_error()
        for i in range(hlen, hlen + bdl, size):
            d = data[i:i + size]
            blen = int.from_bytes(d[12:16] if long else d[5:8], "big")
            if blen != lu.block_size:
                raise invalid_param(i + (12 if long else 5))
    pos = hlen + bdl
    staged: list[tuple[int, bytes]] = []
    while pos < len(data):
        code = data[pos] & 0x3F
        spf = data[pos] & 0x40
        if spf or code not in MODE_PAGES:
            raise invalid_param(pos)
        if pos + 2 > len(data):
            raise param_len_error()
        current = MODE_PAGES[code](lu, CURRENT)
        if data[pos + 1] != current[1]:
            raise invalid_param(pos + 1)
        end = pos + 2 + data[pos + 1]
        if end > len(data):
            raise param_len_error()
        new = data[pos:end]
        mask = MODE_PAGES[code](lu, CHANGEABLE)
        for i in range(2, len(new)):
            if (new[i] ^ current[i]) & ~mask[i] & 0xFF:
                raise invalid_param(pos + i)
        staged.append((code, new))
        pos = end
    changed = False
    for code, new in staged:
        before = MODE_PAGES[code](lu, CURRENT)
        _apply(lu, code, new)
        changed |= MODE_PAGES[code](lu, CURRENT) != before
    if changed:   # every other I_T nexus hears of it (and an AEN where asked for)
        services = task.services
        # in bounded steps (0264), answered once all are set; the change is
        # made, so an abort of this command must not leave some nexuses untold
        await must_finish(services.fan_out_ua([lu], MODE_PARAMETERS_CHANGED,
                                              services.nexus_keys(lu.target), task.nexus.key),
                          lambda e: log.error("MODE SELECT on %s LUN %d, aborted: not every nexus was "
                                              "told of its change: %s", lu.target, lu.lun, e))
