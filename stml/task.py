"""A SCSI command inside the STML (Task), the I_T nexus it came through
(Nexus) and the front end that owns both (FrontEnd); and Services, the one
door from a command's handler to the engine that runs it.

These sit below the command sets (stml.spc, stml.sbc, ...) and the engine
(stml.emulator): a handler sees its task, the task's logical unit and the
few engine services Services names, never the engine itself, so the command
sets import nothing above them.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Container, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Protocol, TypeVar

from backends import AioFuture
from stml.api.shm import SharedRegion
from stml.cdb import lba_len, trim_cdb
from stml.lu import LogicalUnit
from stml.lunmap import LunMap
from stml.sched import Queued
from stml.sense import ABORTED_COMMAND, DATA_PHASE_ERROR, CheckCondition
from stml.workers import FairWorkers

# nexus entries a unit attention fan-out (or a walk of a target's nexuses)
# handles between two turns of the event loop (docs/decisions/0264): every
# fan-out (target and I_T nexus reset, LUN reset, LUN changes, MODE SELECT, a
# resize, a reservation change) goes through Services.fan_out_ua
FANOUT_STEP = 256

_VIEW: Final = memoryview   # (compiled, a builtin's name is a lookup in builtins per use)


_T = TypeVar("_T")

TELL_QUEUED: Final = 1
TELL_SET: Final = 2


@dataclass(eq=False)
class Nexus:
    fe: FrontEnd
    id: int
    initiator: str
    target: str
    tpg: int
    # registered to hear that its I_T nexus's state is gone (0234, 0247): TELL_QUEUED
    # until the unit attentions are set on its LUs, then TELL_SET; if it ends plainly
    # before its initiator heard them, the loss is owed to the next one (0236)
    told: int = 0
    # its live tasks by tag (those of its front end's `tasks` it sent): its loss
    # aborts them without a walk of every task of its front end (0239)
    tasks: dict[int, Task] = field(default_factory=dict)

    @functools.cached_property
    def key(self) -> str:
        """I_T nexus identity: initiator port and target port, stable across
        front ends and restarts, so per-nexus state can be keyed by it."""
        return nexus_key(self.initiator, self.target, self.tpg)


def nexus_key(initiator: str, target: str, tpg: int) -> str:
    """An I_T nexus's key: names compare without case (RFC 3722), so "IQN..:Host"
    and "iqn..:host" with one ISID are one initiator port (decision 0214)."""
    return f"{initiator.lower()}|{target.lower()},t,{tpg}"


@dataclass(eq=False)
class FrontEnd:
    ident: bytes
    name: str
    kind: str
    aen: bool
    heartbeat: float
    last_seen: float
    nexuses: dict[int, Nexus] = field(default_factory=dict)
    tasks: dict[int, Task] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)   # what it buffers (heartbeat, 1.3)
    caps: frozenset[str] = frozenset()   # capabilities it offered and we granted (1.4)
    # when its last detect went, and the one owed to registrations that came
    # sooner than a heartbeat after it (stml.emulator, 0248)
    detected: float = 0.0
    detect_later: asyncio.TimerHandle | None = None


class Services(Protocol):
    """What a command's handler may ask of the engine (stml.emulator.Emulator
    provides it): the nexus's own target and its live I_T nexuses, unit
    attentions, the per-nexus state the engine drops with a nexus, and the
    aborts a PREEMPT AND ABORT makes. Everything else a handler needs is on
    its task and the task's logical unit."""

    max_transfer: int                  # bytes one command may move (VPD 0xB0 says it in blocks)
    workers: FairWorkers               # the threads blocking backend calls run in (Task.io)
    local_tpgs: set[int] | None        # ALUA: this host's port groups when it is a gateway
    # memory read data goes into: maybe memory the front end shares, which the task
    # holds; None: any new memory will do (the backend may bring its own)
    read_buffer: Callable[[Task, int], bytearray | memoryview | None]

    def target_luns(self, target: str) -> LunMap:
        """The LUs of a target by number, and by designator (REPORT LUNS; EXTENDED
        COPY's copy targets). Not to be changed through."""
        ...

    def portal_groups(self, target: str) -> set[int]:
        """The target port groups of a target (ALUA)."""
        ...

    def admitted(self, target: str) -> Container[str] | None:
        """The initiator names (lower case) the target's ACL admits; None: any
        (no ACL). SPEC_I_PT and REGISTER AND MOVE register only those."""
        ...

    def nexus_keys(self, target: str) -> list[str]:
        """The keys of the target's live I_T nexuses."""
        ...

    def nexuses(self, target: str) -> Iterable[Nexus]:
        """The target's live I_T nexuses (reservations match them to registrations)."""
        ...

    def take_ua(self, lu: LogicalUnit, nexus: Nexus) -> tuple[int, int] | None:
        """Report (and clear) the nexus's oldest unit attention on the LU."""
        ...

    def establish_ua(self, lu: LogicalUnit, asc_ascq: tuple[int, int], keys: Iterable[str],
                     exclude: str | None = None, offline: Container[str] = (),
                     aen: bool = True) -> None:
        """Queue a unit attention on the LU for these I_T nexuses."""
        ...

    async def fan_out_ua(self, luns: Iterable[LogicalUnit], asc_ascq: tuple[int, int], keys: list[str],
                         exclude: str | None = None, offline: Container[str] = ()) -> None:
        """Queue a unit attention for many nexuses (a target's) in bounded
        steps between turns of the event loop (docs/decisions/0264)."""
        ...

    def drop_offline_uas(self, lu: LogicalUnit, keep: set[str]) -> None:
        """Unit attentions the LU keeps for nexuses that are gone, but for `keep`, go."""
        ...

    def keep_copy_results(self, lu: LogicalUnit, key: str, list_id: int, state: dict[str, Any]) -> None:
        """Keep an EXTENDED COPY's results on the LU until its nexus goes."""
        ...

    def prevent_removal(self, lu: LogicalUnit, key: str, prevent: bool) -> None:
        """The nexus's PREVENT ALLOW MEDIUM REMOVAL on the LU; its loss allows it."""
        ...

    def spc2_reserved(self, lu: LogicalUnit) -> None:
        """An SPC-2 reservation was taken on the LU: its holder's nexus loss releases it."""
        ...

    async def abort_tasks(self, lu: LogicalUnit, keys: set[str], by: Task) -> None:
        """Abort the LU's tasks of these nexuses as another nexus's command does
        (TASK ABORTED); return once they are gone."""
        ...


def _aio_twin(backend: Any, fn: Callable) -> Callable | None:
    """The backend's aio twin of its call `fn` (same name), or None: none, or
    the backend runs its calls in place."""
    aio = backend.aio
    if aio is None or backend.inline:
        return None
    return getattr(aio, fn.__name__, None)


async def must_finish(work: Awaitable[_T], failed: Callable[[BaseException], None]) -> _T:
    """Await `work`, which goes on to its end even if the awaiting command is
    aborted meanwhile (asyncio.shield): the change it tells or saves is made
    already. While the command awaits, a failure of `work` is the command's
    error; once an abort let go of it, nobody awaits it, and its failure goes
    to `failed` once (a log line) instead of to the GC, which logs it later
    from wherever it runs (0715)."""
    fut = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        report_failure(fut, failed)
        raise


def report_failure(fut: asyncio.Future, failed: Callable[[BaseException], None]) -> None:
    """`failed(error)` once `fut`, which nobody awaits, ends in an error."""
    fut.add_done_callback(functools.partial(_report, failed))


def _report(failed: Callable[[BaseException], None], fut: asyncio.Future) -> None:
    if not fut.cancelled():
        error = fut.exception()
        if error is not None:
            failed(error)


class Task(Queued):
    """One SCSI command inside the STML, from rx_cmnd to xmit_response (its
    task set's fields, seq, attr and exp_len, are Queued's)."""

    __slots__ = ("services", "fe", "tag", "nexus", "lun", "lu", "cdb", "direction",
                 "unsol", "data_out", "received", "need", "want", "data_ready", "data_error",
                 "runner", "coro", "parked", "abort_status", "held", "slot", "slot_region", "_lba", "_blocks")

    def __init__(self, services: Services, fe: FrontEnd, nexus: Nexus, tag: int, lun: int,
                 cdb: bytes, attr: int, direction: int, exp_len: int, unsol: int,
                 imm: list) -> None:
        self.services = services
        self.fe = fe
        self.tag = tag
        self.nexus = nexus
        self.lun = lun
        self.lu: LogicalUnit | None = None
        self.cdb: bytes = trim_cdb(cdb)
        self.attr = attr
        self.direction = direction
        self.exp_len = exp_len
        self.unsol = unsol
        self.data_out: list[memoryview] = []
        self.received = 0
        if imm:
            self.data_out = [_VIEW(f) for f in imm]
            for view in self.data_out:   # (not sum(map(len, ...)): two calls more, per write)
                self.received += len(view)
        self.need = 0     # bytes the CDB asks the initiator for
        self.want = 0     # bytes this task will collect (less when the initiator sends less)
        self.data_ready: asyncio.Future | None = None
        self.data_error: CheckCondition | None = None
        self.runner: asyncio.Task | None = None
        # parked on an aio call's future, with no runner (Emulator._drive): its coroutine and that future
        self.coro: Coroutine[Any, Any, None] | None = None
        self.parked: AioFuture | None = None
        self.seq = 0
        self.abort_status: int | None = None   # TASK ABORTED when another nexus aborted it (TAS)
        # how to give back the carrier's memory the task holds (its write data):
        # called once, when the task ends (_forget)
        self.held: list[Callable[[], None]] | None = None
        # the shared slot its read data went into (SharedRegion.get) and its
        # region: given back once, when the task ends (_forget). Kept here, not
        # as a partial in `held`: one per big READ (decision 0426)
        self.slot: memoryview | None = None
        self.slot_region: SharedRegion | None = None
        self._lba = -1      # lba_len()'s, once decoded (ints: compiled, no tuple stored)
        self._blocks = 0

    # stage timing (stml.timing): None, read from the class, unless the task is a
    # TimedTask (stml.emulator): an untimed task costs no store for it
    stamps: list[int] | None = None

    def nexus_key(self) -> str:
        return self.nexus.key

    def lba_len(self) -> tuple[int, int]:
        """(LBA, number of blocks) of its READ/WRITE/VERIFY-style CDB
        (stml.cdb.lba_len), decoded once: a read's check and handler both ask,
        a write's check, data length and handler."""
        if self._lba < 0:
            self._lba, self._blocks = lba_len(self.cdb)
        return self._lba, self._blocks

    def hold(self, release: Callable[[], None]) -> None:
        """Memory this task keeps until it ends; `release` gives it back."""
        if self.held is None:
            self.held = [release]
        else:
            self.held.append(release)


    def io(self, fn: Callable, *args: Any) -> Awaitable[Any]:
        """Run a backend call of the task's LU (see io_on). An aio twin's
        future is handed back as it is: no coroutine per RBD command (0421)."""
        lu = self.lu
        assert lu is not None   # only commands to an existing LU do I/O
        twin = _aio_twin(lu.backend, fn)
        if twin is not None:
            return twin(*args)
        return self.io_on(lu, fn, *args)

    def read_into(self, offset: int, buf: memoryview) -> Awaitable[Any]:
        """task.io(lu.backend.read_into, offset, buf), READ's call, for which
        the aio twin is called by its name: no bound method, twin lookup by
        name or argument tuple per command (decision 0424)."""
        lu = self.lu
        assert lu is not None   # only commands to an existing LU do I/O
        backend = lu.backend
        aio = backend.aio
        if aio is not None and not backend.inline:
            return aio.read_into(offset, buf)
        return self.io_on(lu, backend.read_into, offset, buf)

    async def io_on(self, lu: LogicalUnit, fn: Callable, *args: Any) -> Any:
        """Run a backend call of `lu`: in place when it cannot block, started at
        once when the backend has an aio twin of it (same name: it stays in
        flight without holding a thread), else in a worker thread when the
        LU's turn comes (stml.workers). An abort drops a call that has not
        started and waits for a started one rather than abandoning it, so no
        write lands after the abort is reported."""
        backend = lu.backend
        if backend.inline:
            return fn(*args)
        twin = _aio_twin(backend, fn)
        if twin is not None:
            # its future ignores cancel(): a cancelled task is woken once
            # the call is done (backends.base), no shield needed
            return await twin(*args)
        workers = self.services.workers
        fut = workers.run(id(lu), fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError as e:
            if workers.drop(fut):
                raise
            aborted = e
        # waited for after the handler, not in it: compiled by mypyc, a
        # coroutine that suspends inside an except block keeps the caught
        # exception in the thread's state across the suspension, and its
        # re-raise corrupts memory (a segfault, decisions/0840 addendum)
        await asyncio.wait([fut])
        if not fut.cancelled():
            # the abort is the command's outcome: the call's error is taken here, or
            # the GC logs it later from wherever it runs (the shield let go of it)
            fut.exception()
        raise aborted

    def add_data(self, offset: int, frames: list) -> None:
        if offset != self.received:  # front ends deliver write data in order
            self.fail_data(CheckCondition(ABORTED_COMMAND, DATA_PHASE_ERROR))
            return
        for f in frames:
            buf = memoryview(f)
            self.data_out.append(buf)
            self.received += len(buf)
        if self.data_ready is not None and self.received >= self.want and not self.data_ready.done():
            self.data_ready.set_result(None)

    def fail_data(self, error: CheckCondition) -> None:
        """The write data cannot arrive whole: the command fails with `error`
        whether or not it is already waiting for the data."""
        self.data_error = error
        if self.data_ready is not None and not self.data_ready.done():
            self.data_ready.set_exception(error)
