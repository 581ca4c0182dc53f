"""What every command module of the disk template shares: the OpEntry row
type, its reservation conflict rules, and the small checks handlers run
(range, write protection, transfer limits, data-out buffers)."""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from stml.api import DataDir
from stml.cdb import forbidden_bits
from stml.lu import LogicalUnit
from stml.sense import (
    DATA_PROTECT, ILLEGAL_REQUEST, LBA_OUT_OF_RANGE, MEDIUM_ERROR, PARAMETER_LIST_LENGTH_ERROR,
    INVALID_COMMAND_OPERATION_CODE, SOFTWARE_WRITE_PROTECTED, WRITE_ERROR, WRITE_PROTECTED, CheckCondition,
    invalid_field,
)
from stml.task import Task

Handler = Callable[[Task], Awaitable["bytes | bytearray | memoryview | None"]]


class Conflict(enum.IntEnum):
    """How a command meets a reservation that another I_T nexus holds: each
    opcode-table row names its rule (as tgt keeps pr_conflict_bits per
    opcode), and stml.pr.PrState.conflicts applies it (SPC-2 5.5.1; SPC-4
    5.9.1, table 63; SBC-4 table 13). Holders, and registrants under the
    registrants-only and all-registrants types, never conflict."""

    NONE = 0    # never: it runs under every reservation (the PR commands judge their own)
    SPC2 = 1    # with an SPC-2 reservation only; allowed under every persistent one
    READ = 2    # also with the Exclusive Access types: a read, allowed under Write Exclusive
    WRITE = 3   # with every reservation: it changes the medium or the LU


@dataclass(frozen=True, slots=True)
class OpEntry:
    opcode: int
    name: str
    usage: bytes                          # CDB usage data: allowed bits per byte
    handler: Handler
    direction: DataDir = DataDir.NONE
    out_len: Callable[[Task], int] | None = None   # bytes the initiator sends
    check: Callable[[Task], None] | None = None     # checks to pass before data moves
    sa: int | None = None                 # service action (byte 1, low 5 bits)
    ua_exempt: bool = False               # runs despite a pending unit attention
    partial: bool = False                 # may run on less data than the CDB asks for
    medium: bool = False                  # needs a started unit with its medium loaded
    timeout: int = 30                     # nominal timeout (s) for REPORT SUPPORTED OPCODES
    # the LUs that support it, when not all do: those whose VPD pages advertise it (0295)
    enabled: Callable[[LogicalUnit], bool] | None = None
    # CDB bits `usage` allows only on the LUs that support what they ask for:
    # (byte, bits, supported). Elsewhere REPORT SUPPORTED OPERATION CODES leaves
    # them out of the usage data and the row's checks refuse them (0224)
    gated: tuple[tuple[int, int, Callable[[LogicalUnit], bool]], ...] = ()
    # what a reservation of another nexus does to it: every row says (no default)
    conflicts: Conflict = field(kw_only=True)
    # the CDB bits `usage` does not allow, and its length, computed once per row (cdb.forbidden_bits)
    forbidden: int = field(init=False, repr=False, compare=False)
    size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "forbidden", forbidden_bits(self.usage))
        object.__setattr__(self, "size", len(self.usage))
        if self.gated:
            object.__setattr__(self, "check", _gated_check(self.gated, self.check))
        if self.enabled is not None:   # refused first, before any data is asked for (as LIO does)
            object.__setattr__(self, "check", _enabled_check(self.enabled, self.check))

    def usage_for(self, lu: LogicalUnit) -> bytes:
        """The CDB usage data this LU's commands are held to: `usage` less the
        gated bits it does not support."""
        if not self.gated:
            return self.usage
        usage = bytearray(self.usage)
        for byte, bits, supported in self.gated:
            if not supported(lu):
                usage[byte] &= ~bits
        return bytes(usage)


def _enabled_check(enabled: Callable[[LogicalUnit], bool],
                   check: Callable[[Task], None] | None) -> Callable[[Task], None]:
    """A row's checks behind its `enabled` test: on an LU that does not
    advertise the command it is not supported at all (INVALID COMMAND OPERATION
    CODE, as an opcode without a row), so no LU answers GOOD to a command its
    VPD pages deny (0295). Only such rows pay for the test."""
    def run(task: Task) -> None:
        lu = task.lu
        assert lu is not None   # see unit()
        if not enabled(lu):
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
        if check is not None:
            check(task)
    return run


def _gated_check(gated: tuple[tuple[int, int, Callable[[LogicalUnit], bool]], ...],
                 check: Callable[[Task], None] | None) -> Callable[[Task], None]:
    """A row's checks behind its gated bits: one set in the CDB on an LU that
    does not support it is an invalid field at that bit, as a bit `usage`
    never allows is, so what RSOC shows for the LU is what it enforces."""
    def run(task: Task) -> None:
        lu = task.lu
        assert lu is not None   # see unit()
        cdb = task.cdb
        for byte, bits, supported in gated:
            if cdb[byte] & bits and not supported(lu):
                raise invalid_field(byte, (cdb[byte] & bits).bit_length() - 1)
        if check is not None:
            check(task)
    return run


def _u(*b: int) -> bytes:
    return bytes(b)


# data a command reads, writes or compares per step of work over a range
CHUNK = 1 << 20


async def next_chunk() -> None:
    """A turn of the event loop between two chunks of one command: calls to a
    RAM or tmpfs backend run in place and never wait, so without it a command
    would hold the loop (and every other initiator) for its whole range."""
    await asyncio.sleep(0)


# where the transfer length field of each CDB size lives (for field pointers)
LEN_FIELD = {6: 4, 10: 7, 12: 6, 16: 10}


def unit(task: Task) -> LogicalUnit:
    """The task's LU. The emulator runs an opcode-table entry (its checks and
    handler) only when the LUN has one, so this holds for every entry; the
    checks and block helpers run on every READ and WRITE narrow `task.lu` in
    place instead of calling this."""
    lu = task.lu
    assert lu is not None
    return lu


def max_blocks(task: Task) -> int:
    """The STML's maximum transfer in logical blocks (VPD 0xB0)."""
    lu = task.lu
    assert lu is not None   # per command (check_xfer): see unit()
    return task.services.max_transfer // lu.block_size


def lbppbe(lu: LogicalUnit) -> int:
    """LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT, from the LUN's options (0 by
    default: libiscsi's GetLBAStatus.UnmapSingle cannot pass with more than one
    logical block per physical block)."""
    return getattr(lu.options, "physical_block_exp", None) or 0


def check_range(lu: LogicalUnit, lba: int, blocks: int) -> None:
    # lu.blocks's test in bytes: no property call per command
    if (lba + blocks) * lu.block_size > lu.backend.size() or lba >= (1 << 64):
        raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def write_protected(lu: LogicalUnit) -> bool:
    return lu.options.ro or lu.mode.swp


def check_writable(lu: LogicalUnit) -> None:
    if lu.options.ro:
        raise CheckCondition(DATA_PROTECT, WRITE_PROTECTED)
    if lu.mode.swp:
        raise CheckCondition(DATA_PROTECT, SOFTWARE_WRITE_PROTECTED)


def refuse_after_failed_sync(lu: LogicalUnit) -> None:
    """MEDIUM ERROR, WRITE ERROR, as the failed sync itself answered (and as
    tcmu-runner answers a failed flush): the acknowledged writes it should
    have made durable may be lost, and no later sync can say otherwise
    (decision 0256). Every write that must be durable at GOOD (a flush, FUA,
    write-through, EXTENDED COPY into a write-through LU) runs it before it
    writes anything: a refusal costs no thread, no log line, and leaves the
    blocks as they were (0257)."""
    if lu.backend.sync_error is not None:
        raise CheckCondition(MEDIUM_ERROR, WRITE_ERROR)


def check_xfer(task: Task, blocks: int) -> None:
    lu = task.lu
    assert lu is not None   # per command: see unit()
    if blocks > task.services.max_transfer // lu.block_size:   # max_blocks(task), in place
        raise invalid_field(LEN_FIELD.get(len(task.cdb), 0))


def rw_out_len(task: Task) -> int:
    lu = task.lu
    assert lu is not None   # per command: see unit()
    return task.lba_len()[1] * lu.block_size


def read_check(task: Task) -> None:
    """check_range, then check_xfer, of a READ/WRITE-style CDB: in place, as
    every read and write runs them."""
    lu = task.lu
    assert lu is not None   # per command: see unit()
    cdb = task.cdb
    lba, blocks = task.lba_len()
    bs = lu.block_size
    if (lba + blocks) * bs > lu.backend.size() or lba >= (1 << 64):
        raise CheckCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    if blocks > task.services.max_transfer // bs:
        raise invalid_field(LEN_FIELD.get(len(cdb), 0))


def write_check(task: Task) -> None:
    """A write that will fail must fail before its data is transferred."""
    lu = task.lu
    assert lu is not None   # per command: see unit()
    check_writable(lu)
    read_check(task)   # its range and transfer length, as a read's


def trim_views(bufs: list[memoryview], n: int) -> list[memoryview]:
    out, total = [], 0
    for b in bufs:
        if total + len(b) >= n:
            out.append(b[:n - total])
            break
        out.append(b)
        total += len(b)
    return out


def data_bytes(task: Task) -> bytes:
    """The whole data-out buffer as one bytes object (parameter lists, compares)."""
    if len(task.data_out) == 1:
        return bytes(task.data_out[0])
    return b"".join(bytes(b) for b in task.data_out)


def fua(cdb: bytes) -> bool:
    return len(cdb) > 6 and bool(cdb[1] & 0x08)


def param_len_error() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def relative_port_id(tpg: int) -> int:
    """The RELATIVE TARGET PORT IDENTIFIER of the port behind portal group tag
    `tpg` (one port per group), the same in VPD page 0x83, REPORT TARGET
    PORT GROUPS, READ FULL STATUS and REGISTER AND MOVE: the tag, but tag 0
    (a front end's without portals) is 0xFFFF, 0 being reserved; tags stop
    at 0xFFFE (stml.emulator.MAX_TPG) so no two ports share one."""
    return tpg or 0xFFFF
