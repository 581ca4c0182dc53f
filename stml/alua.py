"""Asymmetric logical unit access (SPC-4 5.16), implicit only.

Every portal group tag of a target is one target port group, and its
relative target port identifier is the tag too (stml.spc reports both in
VPD page 0x83), so the ids are stable across restarts. Every group is
active/optimized: the point is that multipath stacks (dm-multipath with
scsi_dh_alua, ESXi's VMW_SATP_ALUA) see one device with several paths.
An STML that is a gateway (stml.gateway) says active/non-optimized for
the groups of other hosts' front ends, which reach it over the network:
initiators prefer the serving host's own portals, and the preference
moves with a takeover.
REPORT TARGET PORT GROUPS answers from the groups the STML knows: those its
config names and those any front end has registered a nexus through. SET
TARGET PORT GROUPS is accepted when it asks each group for the state it is
in (nothing changes); any other state is refused, since none can be set
(decision 0289).
"""
from __future__ import annotations

import struct
from stml.api import DataDir
from stml.cdb import u32
from stml.ops import Conflict, OpEntry, relative_port_id
from stml.sense import (
    ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR, CheckCondition, invalid_field, invalid_param,
)
from stml.task import Task

ACTIVE_OPTIMIZED = 0x0
ACTIVE_NON_OPTIMIZED = 0x1
STATUS_IMPLICIT = 0x02
SUPPORTED_STATES = 0x03    # AO_SUP, AN_SUP
IMPLICIT_TRANSITION_TIME = 0
DESCRIPTOR = 12            # bytes of a target port group descriptor with one port


def port_groups(task: Task) -> list[int]:
    """The target port groups of the task's target, in ascending order."""
    groups = set(task.services.portal_groups(task.nexus.target))
    groups.add(task.nexus.tpg)
    return sorted(groups)


def state(task: Task, tpg: int) -> int:
    """The asymmetric access state of a port group (the same on every path)."""
    local = task.services.local_tpgs
    return ACTIVE_OPTIMIZED if local is None or tpg in local else ACTIVE_NON_OPTIMIZED


def descriptor(tpg: int, access: int = ACTIVE_OPTIMIZED) -> bytes:
    """One target port group descriptor with its single target port."""
    return struct.pack(">BBHBBBB", 0x80 | access, SUPPORTED_STATES, tpg, 0,
                       STATUS_IMPLICIT, 0, 1) + struct.pack(">HH", 0, relative_port_id(tpg))


async def report_target_port_groups(task: Task) -> bytes:
    cdb = task.cdb
    fmt = cdb[1] >> 5
    if fmt not in (0, 1):
        raise invalid_field(1, 7)
    alloc = u32(cdb, 6)
    groups = port_groups(task)
    header = 8 if fmt == 1 else 4
    # the descriptors the allocation length can hold; RETURN DATA LENGTH counts them all
    body = b"".join(descriptor(g, state(task, g))
                    for g in groups[:max(0, alloc - header + DESCRIPTOR - 1) // DESCRIPTOR])
    length = DESCRIPTOR * len(groups)
    if fmt == 1:   # extended header: format type 1, implicit transition time
        out = struct.pack(">IBBH", length + 4, 0x10, IMPLICIT_TRANSITION_TIME, 0) + body
    else:
        out = struct.pack(">I", length) + body
    return out[:alloc]


def set_tpg_out_len(task: Task) -> int:
    return u32(task.cdb, 6)


def set_tpg_check(task: Task) -> None:
    n = u32(task.cdb, 6)
    if n and (n < 4 or (n - 4) % 4 or n > 4 + 4 * 1024):
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


async def set_target_port_groups(task: Task) -> None:
    """Accepted when every descriptor names a group that exists and the state
    it is in: GOOD says the groups are in the states asked for (SPC-4 6.36),
    and implicit ALUA changes none on request."""
    data = b"".join(bytes(b) for b in task.data_out)
    groups = set(port_groups(task))
    for off in range(4, len(data) - 3, 4):
        wanted, tpg = data[off] & 0x0F, struct.unpack_from(">H", data, off + 2)[0]
        if tpg not in groups:
            raise invalid_param(off + 2)
        if wanted != state(task, tpg):
            raise invalid_param(off, 3)


OPCODES: list[OpEntry] = [
    OpEntry(0xA3, "REPORT TARGET PORT GROUPS",
            bytes([0xA3, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
            report_target_port_groups, DataDir.READ, sa=0x0A, conflicts=Conflict.NONE),
    OpEntry(0xA4, "SET TARGET PORT GROUPS",
            bytes([0xA4, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),
            set_target_port_groups, DataDir.WRITE, set_tpg_out_len, set_tpg_check, sa=0x0A,
            conflicts=Conflict.WRITE),
]
