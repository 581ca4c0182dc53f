"""Logical units and their task sets."""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stml.api import TaskAttr
from stml.locks import WriteGate

if TYPE_CHECKING:
    from backends import Backend
    from stml.emulator import Nexus, Task
    from stml.pr import PrState

log = logging.getLogger("stml")

VENDOR = "SCSITGT"
PRODUCT = "PY-STML DISK"
REVISION = "0001"
IEEE_COMPANY_ID = 0x5CA510  # vendor-specific identifiers are derived under this id


@dataclass
class LunOptions:
    """What a LUN spec/config says about one logical unit."""
    kind: str                    # backend kind: "file", "ram" or "rbd"
    size: int | None = None      # bytes; for file: create size, None = the file's size
    path: str | None = None      # file: its path; rbd: POOL/IMAGE
    ro: bool = False
    removable: bool = False
    block_size: int = 512
    write_cache: bool = False    # WCE default: write-through, every write durable at GOOD
    thin: bool = True
    physical_block_exp: int | None = None   # logical blocks per physical block (log2); None: 0
    ceph: dict[str, str] | None = None    # rbd: conf, user, keyring (what librados connects with)


@dataclass
class ModeState:
    """Current values of the changeable mode page fields."""
    wce: bool = False
    d_sense: bool = False
    swp: bool = False            # control page software write protect


class TaskSet:
    """SAM-5 task ordering for one LU (8.6): HEAD OF QUEUE runs at once; an
    ORDERED task waits for every older task; a SIMPLE task waits for older
    ORDERED and HEAD OF QUEUE tasks, and runs alongside other SIMPLE tasks."""

    def __init__(self) -> None:
        self.tasks: dict[int, Task] = {}   # insertion order = arrival order
        self._ordered = 0
        self._waiters: list[tuple[Task, asyncio.Future]] = []
        self._seq = 0

    def add(self, task: Task) -> None:
        self._seq += 1
        task.seq = self._seq
        self.tasks[task.seq] = task
        if task.attr in (TaskAttr.ORDERED, TaskAttr.HEAD_OF_QUEUE):
            self._ordered += 1

    def remove(self, task: Task) -> None:
        if self.tasks.pop(task.seq, None) is None:
            return
        if task.attr in (TaskAttr.ORDERED, TaskAttr.HEAD_OF_QUEUE):
            self._ordered -= 1
        if self._waiters:
            self._wake()

    def _may_run(self, task: Task) -> bool:
        if task.attr == TaskAttr.HEAD_OF_QUEUE:
            return True
        for other in self.tasks.values():
            if other.seq >= task.seq:
                return True
            if task.attr == TaskAttr.ORDERED or other.attr != TaskAttr.SIMPLE:
                return False
        return True

    async def enter(self, task: Task) -> bool:
        """Return when the task may execute: True when it had to wait."""
        if (self._ordered == 0 and task.attr != TaskAttr.ORDERED) or self._may_run(task):
            return False
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((task, fut))
        await fut
        return True

    def _wake(self) -> None:
        still = []
        for task, fut in self._waiters:
            if fut.done():
                continue
            if self._may_run(task):
                fut.set_result(None)
            else:
                still.append((task, fut))
        self._waiters = still


_RESET_UAS = {(0x29, 0x00), (0x29, 0x01), (0x29, 0x02), (0x29, 0x03)}
_NEXUS_LOSS = (0x29, 0x07)
# I_T nexuses one LU keeps unit attentions for. The emulator stores them only
# for nexuses that exist and registrations of one I_T nexus (at most 1024), so
# this is a last line, far above what a front end's session limits allow
MAX_UA_NEXUSES = 16384


@dataclass(eq=False)   # one object per LU: compared and hashed by identity
class LogicalUnit:
    target: str
    lun: int
    backend: Backend
    options: LunOptions
    template: Any
    mode: ModeState = field(default_factory=ModeState)
    task_set: TaskSet = field(default_factory=TaskSet)
    unit_attentions: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    started: bool = True
    medium_present: bool = True                 # removable media: loaded or ejected
    prevent: set[str] = field(default_factory=set)   # nexus keys preventing medium removal
    write_gate: WriteGate = field(default_factory=WriteGate)   # COMPARE AND WRITE atomicity
    copy_results: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)  # EXTENDED COPY
    sanitizing: bool = False                    # a SANITIZE is under way: the medium is NOT READY
    pr: PrState | None = None                   # reservation state: stml.pr.state() makes it

    def __post_init__(self) -> None:
        self.mode.wce = self.options.write_cache
        digest = hashlib.sha256(f"{self.target}/{self.lun}".encode()).digest()
        # a backend every gateway opens alike (RBD) names the LU itself, so all
        # of them present one identity (docs/decisions/0400-rbd-gateways.md)
        own = getattr(self.backend, "identity", None)
        if own is not None:
            digest = own + digest[len(own):]
        # NAA 6 (IEEE registered extended): company id, then 100 bits derived from the
        # target name and LUN number, so the identifier survives restarts unchanged
        tail = int.from_bytes(digest[:13], "big") >> 4
        self.naa = ((0x6 << 124) | (IEEE_COMPANY_ID << 100) | tail).to_bytes(16, "big")
        self.serial = digest[:8].hex()
        self.block_size = self.options.block_size

    @property
    def blocks(self) -> int:
        return self.backend.size() // self.block_size

    def describe(self) -> dict[str, Any]:
        """The LUN as the contract's `detect` presents it."""
        return {"lun": self.lun, "block_size": self.block_size, "blocks": self.blocks,
                "ro": self.options.ro, "removable": self.options.removable}

    def add_ua(self, asc_ascq: tuple[int, int], nexus_keys: list[str],
               exclude: str | None = None) -> list[str]:
        """Queue a unit attention for these nexuses (once each: a condition
        already pending is not queued twice, so a nexus's queue holds at most
        one of each kind). Returns the keys it is now pending for; past
        MAX_UA_NEXUSES nexuses, new ones are refused with a warning."""
        if asc_ascq in _RESET_UAS:      # power on, target/LUN reset: PREVENT state goes (SBC-4 5.15)
            self.prevent.clear()
        elif asc_ascq == _NEXUS_LOSS:   # I_T nexus loss: that nexus's PREVENT goes
            self.prevent.difference_update(nexus_keys)
        uas = self.unit_attentions
        stored = []
        for key in nexus_keys:
            if key == exclude:
                continue
            pending = uas.get(key)
            if pending is None:
                if len(uas) >= MAX_UA_NEXUSES:
                    log.warning("%s LUN %d: unit attentions pending for %d nexuses already; "
                                "%02x/%02x not kept for more", self.target, self.lun, len(uas), *asc_ascq)
                    break
                pending = uas[key] = []
            if asc_ascq not in pending:
                pending.append(asc_ascq)
            stored.append(key)
        return stored

    def take_ua(self, nexus: Nexus) -> tuple[int, int] | None:
        """The nexus's oldest pending unit attention, now reported (cleared)."""
        pending = self.unit_attentions.get(nexus.key)
        if not pending:
            return None
        ua = pending.pop(0)
        if not pending:
            del self.unit_attentions[nexus.key]   # an empty queue keeps no entry
        return ua
