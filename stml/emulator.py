"""The STML's state and command engine, independent of sockets.

It keeps the registries the reference design names (device templates, front
ends, their I_T nexuses, targets and their logical units), runs every SCSI
command through the same steps (LUN lookup, opcode entry, CDB check, unit
attention, data collection, task-set ordering, handler, response) and runs
task management. Messages leave through the `send` callable it is given, so
the process shell (stml.server) owns the socket.
"""
from __future__ import annotations

import asyncio
import collections.abc
import errno
import functools
import logging
import time
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, ClassVar, Coroutine, Final, cast

from backends import AioFuture, BackendError
from stml import pr
from stml.api import MAX_NAME_LEN, MAX_PORT_NAME_LEN, Cap, DataDir, Op, TaskAttr, Tmf, TmfResponse, version_compatible
from stml.api.link import StmlSender, Transport
from stml.api.stream import Lease
from stml.api.messages import TO_STML, check
from stml.cdb import check_usage
from stml.disk import DiskTemplate, OpEntry, medium_error, standard_inquiry, trim_views
from stml.lu import LogicalUnit
from stml.lunmap import LunMap
from stml.sense import (
    ABORTED_COMMAND, ASYMMETRIC_ACCESS_STATE_TRANSITION, BUS_DEVICE_RESET, CHECK_CONDITION,
    COMMANDS_CLEARED_BY_ANOTHER, DATA_PHASE_ERROR, DATA_PROTECT, GOOD, HARDWARE_ERROR, I_T_NEXUS_LOSS,
    ILLEGAL_REQUEST, INSUFFICIENT_RESOURCES, INTERNAL_TARGET_FAILURE, INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_COMMAND_IU,
    INVALID_MESSAGE_ERROR, LOGICAL_UNIT_COMMUNICATION_FAILURE, LOGICAL_UNIT_NOT_SUPPORTED, MEDIUM_ERROR,
    NOT_READY, POWER_ON_OCCURRED, POWER_ON_RESET, PREVIOUS_STATUS_UA, RESERVATION_CONFLICT,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT, TASK_ABORTED, TASK_SET_FULL, UNIT_ATTENTION, UNRECOVERED_READ_ERROR,
    WRITE_ERROR, WRITE_PROTECTED, CheckCondition, StatusError, build_sense,
)
from stml.spc import thin
from stml.task import FANOUT_STEP, TELL_QUEUED, TELL_SET, FrontEnd, Nexus, Task
from stml.timing import BACKEND_END, BACKEND_START, DISPATCHED, POINTS, QUEUED, Timing
from stml.workers import FairWorkers

log = logging.getLogger("stml")
# (Final, the per-command ones: statics in the compiled build, not the module's dict)
_READ: Final = int(DataDir.READ)   # plain ints: IntFlag operators are slow
_WRITE: Final = int(DataDir.WRITE)

_COUNT_FIELDS = ("lun", "attr", "dir", "len", "unsol")   # rx_cmnd fields: non-negative ints
_MAX_ATTR: Final = int(max(TaskAttr))   # and attr a TaskAttr: the task set policies know no other
_MONOTONIC: Final = time.monotonic   # (bound once: compiled, time.monotonic is a lookup in the module)
_FROM_BYTES: Final = int.from_bytes   # (bound once: compiled, int.from_bytes is a method lookup per call)
_ACA: Final = int(TaskAttr.ACA)   # (plain ints: a TaskAttr member read through its class costs an enum lookup)
_REGISTER = Op.REGISTER.value   # plain str: an enum member costs an attribute hook per message
_TIMING = Cap.TIMING.value
_TIMING_CAPS = frozenset({_TIMING})   # granted, when offered, while commands are timed
# what front ends can make the STML keep, whichever front end it is (a remote
# one is code we do not run: 0240), docs/decisions/0263. Far above fetd_tcp's own
# limits (256 sessions per target, 1,024 connections per portal), so they bind
# only a front end that ignores its own, or many front ends on one target.
MAX_FRONT_ENDS = 1024          # registered at once: each connection of an admitted key is one
MAX_NEXUSES_PER_FRONT_END = 8192
MAX_NEXUSES_PER_TARGET = 4096   # I_T nexuses (initiator port, target port), all front ends
MAX_LOST_PER_TARGET = 4096      # lost I_T nexuses remembered until registered again (0234)
_NO_LUNS = LunMap()   # an unknown target's LUs (read only: no caller changes it)
MAX_PORT_GROUPS = 256   # port group tags nexuses of one target came through (never forgotten)
MAX_TPG = 0xFFFE        # 16 bits, and 0xFFFF is tag 0's relative port identifier (ops.relative_port_id)
CHAP_KINDS = frozenset({"iscsi"})   # front-end kinds that authenticate initiators with CHAP (fetd_tcp)
_NO_CHAP = {"chap": None, "mutual": None}   # detect's access for the others
# what a nexus registered again hears (Emulator._tell_nexus), with its log words
_TOLD: Final = {POWER_ON_OCCURRED: ("outlived the STML that held it", "POWER ON OCCURRED"),
                I_T_NEXUS_LOSS: ("was lost, not logged out", "I_T NEXUS LOSS OCCURRED")}
# backend failures that are no fault of the medium, by errno; any other is a
# MEDIUM ERROR. The storage is out of this path's reach for now (ESHUTDOWN: an
# RBD gateway fenced, another serves the LU; ETIMEDOUT: the cluster did not
# answer): NOT READY, ASYMMETRIC ACCESS STATE TRANSITION, initiators retry, on
# another path (docs/decisions/0404). ENOMEM: the target was short of memory
# for a moment (an RBD LU refuses calls while a collection's leftovers wait,
# 0425): ABORTED COMMAND, INSUFFICIENT RESOURCES, which initiators retry.
PATH_ERRORS = {errno.ESHUTDOWN: (NOT_READY, ASYMMETRIC_ACCESS_STATE_TRANSITION),
               errno.ETIMEDOUT: (NOT_READY, ASYMMETRIC_ACCESS_STATE_TRANSITION),
               errno.ENOMEM: (ABORTED_COMMAND, INSUFFICIENT_RESOURCES)}
# and on a thin LU (LBPME, stml.spc.thin): its store had no room for a write
# (EDQUOT: the owner's quota), nothing acknowledged is lost; SBC-4's thin
# provisioning answer, which Linux reports as ENOSPC, not as a failing disk.
# A fully provisioned (`thick`) LU promised its space: running out is a
# failure of its medium, as before. A failed sync never arrives as ENOSPC:
# backends report it as EIO (acknowledged write-back may be lost, 0256). (0271)
SPACE_ERRORS = {errno.ENOSPC: (DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
                errno.EDQUOT: (DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)}
# and on any LU: the file system under it went read-only (ext4's errors=remount-ro
# after a fault, or a remount): the medium refuses writes, it did not fail. DATA
# PROTECT, WRITE PROTECTED, which Linux reports as a read-only disk, where multipath
# and md would fail a disk for a MEDIUM ERROR; reads go on. A sync that fails stays
# a sticky MEDIUM ERROR: write-back may be lost (0256). (0271)
PROTECT_ERRORS = {errno.EROFS: (DATA_PROTECT, WRITE_PROTECTED)}
# what a LU's rate-limited line about refused writes says, by answer: why, and the way out
REFUSED_LINES = {
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT: (
        "no space for writes", "SPACE ALLOCATION FAILED", "free space in its file system (or UNMAP)"),
    WRITE_PROTECTED: (
        "its file system is read-only", "WRITE PROTECTED",
        "check the file system, then remount it read-write"),
}
NOSPACE_LOG_INTERVAL = 60.0   # seconds between a LU's lines about refused writes


class TimedTask(Task):
    """A Task while the STML times commands (Emulator.enable_timing): it
    fills the STML's stamps of stml.timing (dispatch, backend start and end
    here; queued in Emulator._execute)."""

    __slots__ = ("stamps",)   # (always a list here; Task's type, which mypyc holds subclasses to)

    def __init__(self, emulator: Emulator, fe: FrontEnd, nexus: Nexus, tag: int, lun: int,
                 cdb: bytes, attr: int, direction: int, exp_len: int, unsol: int,
                 imm: list) -> None:
        super().__init__(emulator, fe, nexus, tag, lun, cdb, attr, direction, exp_len, unsol, imm)
        timing = emulator.timing
        stamps = timing.stamps(fe.ident, tag) if timing is not None else None
        self.stamps = stamps if stamps is not None else [0] * len(POINTS)

    async def timed(self, handler: Callable[[Task], Awaitable[Any]]) -> Any:
        """Run the command's handler, dispatched now. A handler that called
        no backend off the loop (io_on) did its backend work in place (RAM,
        the page cache: read_nowait, write_nowait), so its own run is the
        backend stage."""
        stamps = self.stamps
        assert stamps is not None
        stamps[DISPATCHED] = time.monotonic_ns()
        try:
            return await handler(self)
        finally:
            if not stamps[BACKEND_START]:
                stamps[BACKEND_START] = stamps[DISPATCHED]
                stamps[BACKEND_END] = time.monotonic_ns()

    def io(self, fn: Callable, *args: Any) -> Awaitable[Any]:
        """Task.io through io_on, which stamps: an aio twin's future handed back
        bare (0421) would leave an RBD command's backend stage unmeasured."""
        lu = self.lu
        assert lu is not None   # only commands to an existing LU do I/O
        return self.io_on(lu, fn, *args)

    def read_into(self, offset: int, buf: memoryview) -> Awaitable[Any]:
        """Task.read_into through io_on, which stamps (see io)."""
        lu = self.lu
        assert lu is not None   # only commands to an existing LU do I/O
        return self.io_on(lu, lu.backend.read_into, offset, buf)

    async def io_on(self, lu: LogicalUnit, fn: Callable, *args: Any) -> Any:
        """Task.io_on, stamped: the first backend call's start, the last one's end."""
        stamps = self.stamps
        assert stamps is not None
        if not stamps[BACKEND_START]:
            stamps[BACKEND_START] = time.monotonic_ns()
        try:
            return await super().io_on(lu, fn, *args)
        finally:
            stamps[BACKEND_END] = time.monotonic_ns()


def start_eagerly(coro: collections.abc.Coroutine) -> asyncio.Task | None:
    """Run a coroutine at once up to its first wait, like Python 3.12's eager
    tasks: None when it finished (a read from memory, a command refused by its
    checks), else the Task that finishes it. Most commands never wait, and a
    Task per command cost a tenth of the STML's time at 4 KiB."""
    # iterated, not sent to: a coroutine that finishes ends the loop, where
    # send() would raise StopIteration (an exception caught per command)
    for waiting_on in coro.__await__():
        return asyncio.get_running_loop().create_task(_Started(coro, waiting_on))
    return None


class _Started(collections.abc.Coroutine):
    """A suspended coroutine, for a Task to finish: the Task's first step gets
    the future the coroutine already waits on; a cancellation before that
    step is thrown into the coroutine, so its cleanup runs - once that future
    has ended when it is an aio call's (backends.base.AioFuture, which refuses
    cancel): no write lands after its abort is reported."""

    __slots__ = ("_coro", "_first", "_thrown")

    def __init__(self, coro: collections.abc.Coroutine, waiting_on: Any) -> None:
        self._coro = coro
        self._first: list = [waiting_on]
        self._thrown: tuple = ()   # a cancellation held until the first future's end

    def send(self, value: Any) -> Any:
        if self._first:
            return self._first.pop()
        if self._thrown:
            exc, self._thrown = self._thrown, ()
            return self._coro.throw(*exc)
        return self._coro.send(value)

    def throw(self, *exc: Any) -> Any:
        first = self._first.pop() if self._first else None
        if type(first) is AioFuture and not first.done():
            # it refuses cancel: the cancellation waits for the call's end, as it
            # would in a Task already waiting on it
            self._thrown = exc
            return first
        if isinstance(first, asyncio.Future) and not first.cancel() and not first.cancelled():
            # as a Task waiting on it would: cancelled, or its outcome taken (an error
            # nobody took is logged when the GC finds it, from wherever it runs, 0715)
            first.exception()
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Any:
        return self._coro.__await__()


@dataclass
class Target:
    name: str
    luns: dict[int, LogicalUnit]   # a LunMap (a plain dict given is made one: its designator index, 0296)
    alias: str = ""
    access: dict[str, Any] = field(default_factory=dict)
    target_reset: bool = False   # TARGET WARM/COLD RESET allowed (config `target_reset`)
    # keys of I_T nexuses lost without their initiator asking, oldest first: the
    # same I_T nexus registered again hears I_T NEXUS LOSS OCCURRED (0234)
    lost: dict[str, None] = field(default_factory=dict)
    # LUs removed from `luns` whose commands in flight may still finish (0219):
    # a target or I_T nexus reset ends theirs too before it answers
    draining: set[LogicalUnit] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not isinstance(self.luns, LunMap):
            self.luns = LunMap(self.luns)


@dataclass(slots=True)
class TmfCall:
    """One task management function as its handler (Emulator.TMFS) sees it."""
    fn: int
    fe: FrontEnd
    nexus: Nexus
    target: Target
    lun: int
    lu: LogicalUnit | None   # the LU the LUN names
    ref: int | None          # ABORT TASK, QUERY TASK: the tag of the task

    @property
    def unit(self) -> LogicalUnit:
        """The LU of a function that names one (TmfRow.lun_scoped: checked before it runs)."""
        assert self.lu is not None
        return self.lu

    def referenced(self) -> Task | None:
        """The task ABORT TASK or QUERY TASK names, when it is this nexus's own on this LUN."""
        task = self.fe.tasks.get(self.ref) if self.ref is not None else None
        if task is not None and (task.nexus is not self.nexus or task.lun != self.lun):
            return None
        return task


@dataclass(slots=True)
class TmfOutcome:
    """What a function does: its response, the tasks it aborts, unit
    attentions to fan out over a target's LUs before the response leaves,
    and additional response information (QUERY ASYNCHRONOUS EVENT)."""
    response: int
    victims: list[Task] = field(default_factory=list)
    fanout: Coroutine[Any, Any, None] | None = None
    info: bytes = b""


@dataclass(frozen=True, slots=True)
class TmfRow:
    run: Callable[[Emulator, TmfCall], TmfOutcome]
    lun_scoped: bool = False


@dataclass(eq=False)
class _Release:
    """A front end being released in steps (Emulator.release_front_end): its
    tasks aborted so far, by nexus, for the nexus's own release."""
    fe: FrontEnd
    lost: bool
    tasks: dict[int, list[Task]] = field(default_factory=dict)   # id(nexus) -> its tasks


@dataclass
class _Resets:
    """The target resets of one target: how many were asked for, how many a
    finished fan-out covers, and the lock that runs fan-outs one at a time."""
    asked: int = 0
    covered: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Emulator:
    """Registries and the command engine."""

    # stage timing (enable_timing), None while off: a class attribute, so an
    # untimed Emulator has no more instance attributes than before (past 30,
    # CPython 3.11 stops sharing an instance dict's keys, and every attribute
    # read on the command path costs more: pathcost counted ~3,000 instructions)
    timing: Timing | None = None

    def __init__(self, targets: list[Target], send: Transport, executor: Executor, *,
                 name: str = "stml", heartbeat_ms: int = 1000, max_transfer: int = 8 << 20,
                 queue_depth: int = 128, discovery: dict[str, Any] | None = None,
                 data_dir: Path | str | None = None,
                 portal_groups: collections.abc.Iterable[int] = (),
                 threads: int = 8) -> None:
        self.targets = {t.name: t for t in targets}
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.configured_tpgs = set(portal_groups)   # portal group tags the config names
        # the port groups of this host's own portals when it is a gateway
        # (stml.alua: optimized; the others' front ends reach it over the network)
        self.local_tpgs: set[int] | None = None
        self.portals: list[dict[str, Any]] = []      # {host, port, tpgt}: sent in detect
        self._seen_tpgs: dict[str, set[int]] = {}    # target -> tags nexuses came through
        self.out = StmlSender(send)   # every message to a front end
        self._lease: Lease | None = None   # the carrier's hold on the frames of the message in hand
        self.executor = executor
        # an LU holds at most half the threads: one LU's slow calls never stall the others
        self.workers = FairWorkers(executor, threads, max(1, threads // 2))
        # memory a task's read data is read into: the process shell may hand out
        # memory its front end shares (stml.server, same-host carrier), which the
        # task then holds (Task.hold) until it ends; None: new memory will do
        self.read_buffer: Callable[[Task, int], bytearray | memoryview | None] = lambda task, size: None
        # the capabilities the carrier of a front end supports (stml.server: a
        # write region on the stream carrier); granted when a front end offers them
        self.carrier_caps: Callable[[bytes], frozenset[str]] = lambda ident: frozenset()
        self.name = name
        self.heartbeat = heartbeat_ms / 1000
        self.max_transfer = max_transfer
        self.queue_depth = queue_depth
        self.discovery = discovery or {}
        self.templates: dict[str, Any] = {}
        self.front_ends: dict[bytes, FrontEnd] = {}
        # live nexuses by key, and the keys of each target's live nexuses (in
        # order of arrival): unit attentions, AENs and PR effects look nexuses
        # up here instead of scanning every front end's
        self._keyed: dict[str, list[Nexus]] = {}
        self._target_keys: dict[str, dict[str, None]] = {}
        self._ua_luns: dict[str, set[LogicalUnit]] = {}   # nexus key -> LUs holding UAs for it
        self._copy_luns: dict[str, set[LogicalUnit]] = {}  # nexus key -> LUs holding its copy results
        self._prevent_luns: dict[str, set[LogicalUnit]] = {}  # nexus key -> LUs it prevents removal of
        self._spc2_luns: dict[str, set[LogicalUnit]] = {}  # nexus key -> LUs it took an SPC-2 RESERVE on
        self._resets: dict[str, _Resets] = {}   # per target (a burst costs two fan-outs)
        # nexuses registered again whose lost state they are to hear of, and the
        # one walk that tells them in turn (one step of the fan-out per loop turn)
        self._to_tell: collections.deque[tuple[Nexus, tuple[int, int]]] = collections.deque()
        self._teller: asyncio.Task | None = None
        # front ends being released, FANOUT_STEP tasks and nexuses per turn of the
        # loop, in order; the latest registration of each one's ident (None: none
        # yet) waits for the end of its release (0222)
        self._releases: collections.deque[_Release] = collections.deque()
        self._release_runner: asyncio.Task | None = None
        self._releasing = False
        self._waiting: dict[bytes, dict[str, Any] | None] = {}
        # told when a nexus ends (with the tags of the tasks it took along)
        # and when a front end does: stml.server frees their metrics then
        self.on_nexus_gone: Callable[[Nexus, list[int]], None] = lambda nexus, tags: None
        self.on_front_end_gone: Callable[[bytes], None] = lambda ident: None
        # why front ends are refused while this STML is a standby gateway
        # (stml.gateway): they then ask another STML; None: serving
        self.standby: str | None = None
        self.register_target_template(DiskTemplate())
        # each message's handler, called with self: plain functions, as the
        # Emulator's bound methods kept on it would make it a reference cycle
        # (it and all it holds, LUs and their data, freed by the cyclic GC only)
        self._ops: dict[str, Callable[[Emulator, FrontEnd, dict[str, Any], list], None]] = {
            Op.DEREGISTER: Emulator._deregister,
            Op.REGISTER_NEXUS: Emulator._register_nexus,
            Op.RELEASE_NEXUS: Emulator._scsi_release,
            Op.RX_CMND: Emulator._rx_cmnd,
            Op.RX_DATA: Emulator._scsi_rx_data,
            Op.RX_TMF: Emulator._rx_task_mgmt_fn,
            Op.DONE: Emulator._responses_sent,
            Op.HEARTBEAT: Emulator._heartbeat,
        }

    def restore_reservations(self) -> None:
        """Load every LU's persistent reservations kept with APTPL (call once the
        targets are in place). A file that cannot be used raises pr.PrStoreError."""
        data_dir = self.data_dir
        files = pr.StateFiles(data_dir) if data_dir is not None else None   # pr/ listed once
        for t in self.targets.values():
            # each LU's own file: a renumbered LU's is found by its identity, never another's
            own = {pr.state_path(data_dir, t.name, lu.lun, lu.options.id) for lu in t.luns.values()} \
                if data_dir is not None else set()
            for lu in t.luns.values():
                if getattr(lu.backend, "pr_store", None) is not None:
                    continue   # shared storage: stml.gateway restores it when it takes over
                st = pr.state(lu)
                if data_dir is None:
                    continue
                st.load(pr.find_state(data_dir, t.name, lu.lun, lu.options.id, own, files))
                if st.regs:
                    log.info("restored %d registration(s) on %s LUN %d", len(st.regs), t.name, lu.lun)

    # ------------------------------------------------------------ templates
    def register_target_template(self, template: Any) -> None:
        self.templates[template.name] = template

    def deregister_target_template(self, name: str) -> None:
        self.templates.pop(name, None)

    # ------------------------------------------------------------ inventory
    def target_luns(self, target: str) -> LunMap:
        t = self.targets.get(target)
        return cast(LunMap, t.luns) if t else _NO_LUNS   # (made one by Target.__post_init__)

    def lookup_lu(self, target: str, lun: int) -> LogicalUnit | None:
        t = self.targets.get(target)
        return t.luns.get(lun) if t else None

    def send_detect(self, fe: FrontEnd, targets: list[dict[str, Any]] | None = None) -> None:
        """What this STML offers (contract: detect). `targets`: the inventory
        as `describe_target` makes it, built once for many front ends (a
        management change builds it a bounded number of LUs per loop turn)."""
        if targets is None:
            targets = self.describe_all()
        discovery = self.discovery
        if fe.kind not in CHAP_KINDS:   # CHAP secrets only where CHAP is spoken: nowhere else to leak from
            targets = [{**t, "access": {**t["access"], **_NO_CHAP}} for t in targets]
            discovery = {**discovery, "chap": None}
        fe.detected = time.monotonic()
        self.out.detect(
            fe.ident, stml=self.name, heartbeat_ms=int(self.heartbeat * 1000), caps=sorted(fe.caps),
            limits={"max_transfer": self.max_transfer, "queue_depth": self.queue_depth},
            discovery=discovery, portals=self.portals, targets=targets)

    def describe_all(self) -> list[dict[str, Any]]:
        """Every target's entry of detect, in one step: every LU of every target
        (a registration's; 0229 says why it is not cached)."""
        return [self.describe_target(t, [lu.describe() for lu in t.luns.values()]) for t in self.targets.values()]

    @staticmethod
    def describe_target(t: Target, luns: list[dict[str, Any]]) -> dict[str, Any]:
        """A target's entry of detect, with its LUs' descriptions."""
        return {"name": t.name, "alias": t.alias, "access": t.access, "luns": luns}

    # ------------------------------------------------------------ dispatch
    def handle(self, ident: bytes, header: dict[str, Any], frames: list,
               lease: Lease | None = None) -> None:
        """One message from a front end. Never raises: a message that does not
        fit the contract's table (stml.api.messages) is refused with a log line
        (and, for a command or a registration, an answer saying so). `lease`:
        the carrier's hold on the frames; the task they go to takes it, else
        they are given back when this returns."""
        self._lease = lease
        op = header["op"]
        fe = self.front_ends.get(ident)
        try:
            if fe is None and op != _REGISTER:
                self.out.release(ident, "unknown front end: register first")
                return
            spec = TO_STML.get(op)   # (stml.api.messages.check, without its call: per command)
            error = spec.verdict(header) if spec is not None else check(header, TO_STML)
            if error is not None:
                self._refuse(ident, fe, header, error)
                return
            if op == _REGISTER:
                self._register(ident, header)
                return
            assert fe is not None   # (checked above)
            fe.last_seen = time.monotonic()
            handler = self._ops.get(op)
            if handler is None:
                log.warning("front end %s sent %r, which the STML does not take: ignored", fe.name, op)
                return
            handler(self, fe, header, frames)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            who = fe.name if fe else ident.hex()
            log.warning("malformed %r from %s refused: %s: %s", op, who, type(e).__name__, e)
        finally:
            if self._lease is not None:
                self._lease.release()
                self._lease = None

    # ------------------------------------------------------------ stage timing
    def enable_timing(self, timing: Timing) -> None:
        """Time every command from now on (stml.timing): front ends that
        register from now on are granted `timing` and stamp theirs; commands
        become TimedTasks, and rx_cmnd, scsi_target_done and heartbeats go
        through timed entry points (the plain ones cost nothing for it while
        timing is off); the sender's responses and heartbeats test its
        `timing`."""
        self.timing = timing
        self._ops[Op.RX_CMND] = Emulator._rx_cmnd_timed
        self._ops[Op.DONE] = Emulator._responses_sent_timed
        self._ops[Op.HEARTBEAT] = Emulator._heartbeat_timed
        self.out.timing = timing

    def _rx_cmnd_timed(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        """rx_cmnd while timed: the command's stamps begin (the task fills them),
        for a front end granted `timing`. One that was not (it did not offer it)
        sends no scsi_target_done (contract 1.8): its commands are not timed,
        or they would wait in the table for a delivery that never comes."""
        if _TIMING not in fe.caps:
            self._rx_cmnd(fe, h, frames)
            return
        tag, nid = h.get("tag"), h.get("nexus")   # (refused later when malformed)
        if type(tag) is int and type(nid) is int and self.timing is not None:
            nexus = fe.nexuses.get(nid)
            lun = h.get("lun")
            where = (nexus.target, lun) if nexus is not None and type(lun) is int \
                and self.lookup_lu(nexus.target, lun) is not None else None
            self.timing.received(fe.ident, tag, where, h.get("ts"))
        self._rx_cmnd(fe, h, frames, TimedTask)

    def _responses_sent_timed(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        if self.timing is not None:
            self.timing.delivered(fe.ident, h.get("tags"), h.get("ts"))

    def _heartbeat_timed(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        now = time.monotonic_ns()
        self._heartbeat(fe, h, frames)
        if self.timing is not None and "echo" in h:
            self.timing.echo(fe.ident, h["echo"], now)

    def _take_lease(self, task: Task) -> None:
        """The frames of the message in hand are the task's until it ends."""
        if self._lease is not None:
            task.hold(self._lease.release)
            self._lease = None

    def _refuse(self, ident: bytes, fe: FrontEnd | None, h: dict[str, Any], error: str) -> None:
        """A message that breaks the table: logged; a registration is answered
        with the reason, and a command that names its task, nexus and CDB fails
        with CHECK CONDITION (its front end would otherwise wait for it)."""
        who = fe.name if fe is not None else repr(h.get("name", ident.hex()))
        log.warning("front end %s: %s: refused", who, error)
        op = h["op"]
        if op == Op.REGISTER:
            self.out.refuse(ident, error)
        elif op == Op.RX_CMND and fe is not None and type(h.get("tag")) is int \
                and type(h.get("nexus")) is int and type(h.get("cdb")) is bytes:
            self._refuse_counts(fe, h["tag"], h)

    def _register(self, ident: bytes, h: dict[str, Any]) -> None:
        if ident in self._waiting:   # its previous release is still under way: answered at its end
            self._waiting[ident] = h
            return
        reason = version_compatible(h["version"])
        if reason:
            log.warning("front end %r refused: %s", h["name"], reason)
            self.out.refuse(ident, reason)
            return
        if self.standby is not None:
            self.out.refuse(ident, self.standby, standby=True)
            return
        caps = frozenset(h.get("caps") or ()) & (self.carrier_caps(ident) | (
            _TIMING_CAPS if self.timing is not None else frozenset()))
        if self.timing is not None and Cap.TIMING in caps:
            self.timing.front_end(ident, h["name"], h.get("boot_id"))
        known = self.front_ends.get(ident)
        if known is not None:  # a repeated registration (e.g. queued retries): same state
            known.last_seen = now = time.monotonic()
            known.caps = caps
            self._detect_again(known, now)
            return
        if len(self.front_ends) >= MAX_FRONT_ENDS:
            reason = f"the STML serves {MAX_FRONT_ENDS} front ends, the most it keeps"
            log.warning("front end %r refused: %s", h["name"], reason)
            self.out.refuse(ident, reason)
            return
        fe = FrontEnd(ident, h["name"], h["kind"], bool(h.get("aen")),
                      max(0.05, h.get("heartbeat_ms", 1000) / 1000), time.monotonic(), caps=caps)
        self.front_ends[ident] = fe
        log.info("front end %s (%s) registered", fe.name, fe.kind)
        self.send_detect(fe)

    def _detect_again(self, fe: FrontEnd, now: float) -> None:
        """A registered front end registers again: a detect describes every LU
        (0229), so one goes at most once per heartbeat of the STML; the
        registrations that come sooner are answered by one detect at the end
        of that heartbeat (0248), whatever their number."""
        if fe.detect_later is not None:
            return   # one is owed already: it answers this one too
        wait = fe.detected + self.heartbeat - now
        if wait <= 0:
            self.send_detect(fe)
            return
        log.info("front end %s registered again within a heartbeat of its detect: "
                 "answered once, %.2fs from now", fe.name, wait)
        fe.detect_later = asyncio.get_running_loop().call_later(wait, self._owed_detect, fe)

    def _owed_detect(self, fe: FrontEnd) -> None:
        fe.detect_later = None
        if self.front_ends.get(fe.ident) is fe:   # (not released meanwhile)
            self.send_detect(fe)

    def drop_waiting(self, ident: bytes) -> None:
        """The connection of a registration waiting for its ident's release
        ended: it is not answered when the release does (0248), or it would
        hold a front end's place with nobody behind it until liveness."""
        h = self._waiting.get(ident)
        if h is not None:
            self._waiting[ident] = None
            log.info("front end %r: its connection closed while its registration waited "
                     "for its release: dropped", h["name"])

    def _responses_sent(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        """scsi_target_done: nothing of these tasks is left to free here. A task
        gave back what it held when it ended (_forget); the shared memory its
        response lent comes back through the carrier, with this message."""

    def _deregister(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        self.release_front_end(fe, "deregistered", lost=False)

    def release_front_end(self, fe: FrontEnd, why: str, lost: bool = True) -> None:
        """Forget a front end: its nexuses go and their tasks are aborted.
        `lost`: they are I_T nexus losses (0234), as when its connection ends
        or it goes silent; a front end that says goodbye (deregister) ends its
        nexuses as it chose, and one that wants them told releases them
        `lost` first (fetd_tcp at its stop). It is unregistered at once; its
        tasks and nexuses go FANOUT_STEP per turn of the loop (one front end
        after another), and a registration from its ident meanwhile is
        answered once they are gone (0222)."""
        if self.front_ends.get(fe.ident) is not fe:
            return   # released already
        log.info("releasing front end %s: %s", fe.name, why)
        del self.front_ends[fe.ident]
        if fe.detect_later is not None:   # (owed to a front end that is gone)
            fe.detect_later.cancel()
            fe.detect_later = None
        self._waiting.setdefault(fe.ident, None)
        self._releases.append(_Release(fe, lost))
        if self._release_runner is None and not self._releasing and self._release_safely():
            self._release_runner = asyncio.get_running_loop().create_task(self._release_rest())

    def takes(self, ident: bytes) -> bool:
        """Registered, or a registration of it waits for its previous release."""
        return ident in self.front_ends or self._waiting.get(ident) is not None

    def _release_step(self) -> bool:
        """At most FANOUT_STEP tasks and nexuses of the front ends being
        released (a nexus counts with its tasks); True while some are left.
        Tasks first, each aborted and kept with its nexus, then the nexuses,
        each dropped with its tasks (drop_nexus: the work of its own state)."""
        budget = FANOUT_STEP
        releases = self._releases
        self._releasing = True
        try:
            while releases and budget > 0:
                r = releases[0]
                fe = r.fe
                tasks, nexuses = fe.tasks, fe.nexuses
                while tasks and budget > 0:
                    task = tasks.popitem()[1]
                    self._abort(task)
                    r.tasks.setdefault(id(task.nexus), []).append(task)
                    budget -= 1
                while nexuses and budget > 0:
                    nexus = nexuses.popitem()[1]
                    mine = r.tasks.pop(id(nexus), [])
                    self.drop_nexus(nexus, mine, r.lost)
                    budget -= 1 + len(mine)
                if not tasks and not nexuses:   # (its sessions are gone: then the front end)
                    releases.popleft()
                    # (taken first: a callback that raises must not leave its ident parked for good)
                    waiting = self._waiting.pop(fe.ident, None)
                    try:
                        self.on_front_end_gone(fe.ident)
                        if self.timing is not None:
                            self.timing.front_end_gone(fe.ident)
                    finally:
                        if waiting is not None:
                            self._register(fe.ident, waiting)
        finally:
            self._releasing = False
        return bool(releases)

    def _release_safely(self) -> bool:
        """_release_step, whatever a callback of it raises: what raised was
        taken off its front end already, so the next step goes on."""
        try:
            return self._release_step()
        except Exception:
            log.exception("error releasing a front end")
            return bool(self._releases)

    async def _release_rest(self) -> None:
        try:
            while self._release_safely():
                await asyncio.sleep(0)
        finally:
            self._release_runner = None

    async def releases_done(self) -> None:
        """Until no front end is being released: every task of theirs is
        aborted (a gateway standing down lets its locks go only then, so no
        queued task of a released front end starts after, 0222)."""
        while self._releases:
            await asyncio.sleep(0)

    def check_liveness(self) -> None:
        """Release front ends silent for three of their heartbeat intervals."""
        now = time.monotonic()
        for fe in list(self.front_ends.values()):
            if now - fe.last_seen > 3 * max(fe.heartbeat, self.heartbeat):
                self.release_front_end(fe, f"silent for {now - fe.last_seen:.1f}s")
            else:
                self.out.heartbeat(fe.ident)

    def shutdown(self) -> None:
        for fe in list(self.front_ends.values()):
            self.out.release(fe.ident, "STML shutting down")

    def _heartbeat(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        usage = h.get("usage")
        if isinstance(usage, dict):   # a few named counters, nothing else is kept
            fe.usage = {str(k)[:32]: v for k, v in list(usage.items())[:16]
                        if type(v) is int and v >= 0}

    # ------------------------------------------------------------ nexuses
    def _register_nexus(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        nexus = Nexus(fe, int(h["nexus"]), str(h["initiator"]), str(h["target"]), int(h["tpg"]))
        if len(nexus.target.encode()) > MAX_NAME_LEN or len(nexus.initiator.encode()) > MAX_PORT_NAME_LEN:
            self.out.nexus_ready(fe.ident, nexus.id,
                                 f"initiator or target name longer than {MAX_NAME_LEN} bytes")
            return
        refused = self._nexus_refusal(nexus) or self._over_cap(fe, nexus)
        if refused:
            log.warning("front end %s: nexus %d refused: %s", fe.name, nexus.id, refused)
            self.out.nexus_ready(fe.ident, nexus.id, refused)
            return
        old = fe.nexuses.get(nexus.id)
        if old:   # (its state goes, unasked: lost, and told to the nexus that replaces it)
            self.drop_nexus(old, lost=True)
        fe.nexuses[nexus.id] = nexus
        self._keyed.setdefault(nexus.key, []).append(nexus)
        self._target_keys.setdefault(nexus.target, {})[nexus.key] = None
        log.debug("nexus %d of %s: %s", nexus.id, fe.name, nexus.key)
        self._seen_tpgs.setdefault(nexus.target, set()).add(nexus.tpg)
        lost = self.targets[nexus.target].lost   # (refused above when there is no such target)
        was_lost = nexus.key in lost
        if was_lost:
            del lost[nexus.key]
        told = POWER_ON_OCCURRED if h.get("resumed") is True else I_T_NEXUS_LOSS if was_lost else None
        if told is not None:
            nexus.told = TELL_QUEUED
            self._to_tell.append((nexus, told))
            if self._teller is None:
                self._teller = start_eagerly(self._tell_nexuses())
            return
        self.out.nexus_ready(fe.ident, nexus.id)

    async def _tell_nexuses(self) -> None:
        """Nexuses registered again whose state is gone, in order of arrival:
        POWER ON OCCURRED for one that outlived the STML that held it
        (`resumed`, 0247: reservations without APTPL, a RAM LU's data, mode
        changes, PREVENT), which covers a loss too; else I_T NEXUS LOSS
        OCCURRED for one this STML lost without its initiator asking (0234:
        its RESERVE, unit attentions, PREVENT). On every LU of its target,
        before `nexus_ready`: its first command finds it. No asynchronous
        event: it would race the login's answer. One walk for all of them,
        sharing one budget of FANOUT_STEP entries per turn (0235): a front
        end re-registering a thousand sessions costs no more per turn than
        one does."""
        budget = FANOUT_STEP
        try:
            while self._to_tell:
                if budget <= 0:   # (each nexus counts one entry at least: a target without LUs too)
                    budget = FANOUT_STEP
                    await asyncio.sleep(0)
                left = budget
                nexus, asc_ascq = self._to_tell.popleft()
                if nexus.fe.nexuses.get(nexus.id) is nexus:   # (else gone, or registered again: a
                    try:                                       # newer registration answers for itself)
                        budget = await self._tell(nexus, asc_ascq, budget)
                    except Exception:   # (logged, its login refused; the walk goes on for the rest)
                        log.exception("front end %s: nexus %d: telling it its state is gone failed",
                                      nexus.fe.name, nexus.id)
                        self.out.nexus_ready(nexus.fe.ident, nexus.id, "the target could not set it up")
                if budget == left:
                    budget -= 1
        finally:   # (whatever ended it, the next registration starts a walk again)
            self._teller = None

    async def _tell(self, nexus: Nexus, asc_ascq: tuple[int, int], budget: int) -> int:
        """One returning nexus told on every LU of its target, then answered."""
        t = self.targets.get(nexus.target)
        if t is not None:
            log.info("front end %s: nexus %d (%s) %s: %s", nexus.fe.name, nexus.id, nexus.key, *_TOLD[asc_ascq])
            budget = await self._fan_out(t.luns.values(), asc_ascq, [nexus.key], None, (), False, budget)
        nexus.told = TELL_SET
        if nexus.fe.nexuses.get(nexus.id) is nexus:
            self.out.nexus_ready(nexus.fe.ident, nexus.id)
        return budget

    def _nexus_refusal(self, nexus: Nexus) -> str | None:
        """Why the target does not take this initiator, or None. The front
        ends check the ACL themselves (at login, before registering); this is
        the check none of them can skip, a remote one included (0240)."""
        t = self.targets.get(nexus.target)
        if t is None:
            return f"no target {nexus.target}"
        acl = self.admitted(nexus.target)
        if acl is not None and pr.name_key(nexus.initiator) not in acl:
            return f"initiator {nexus.initiator} is not in the ACL of {t.name}"
        return None

    def admitted(self, target: str) -> frozenset[str] | None:
        """The initiator names the target's ACL admits, lower case (names
        compare without case, as pr.name_key gives a port's); None: any."""
        t = self.targets.get(target)
        if t is None:
            return frozenset()
        acl = t.access.get("acl")
        return frozenset(a.lower() for a in acl) if acl else None

    def _over_cap(self, fe: FrontEnd, nexus: Nexus) -> str | None:
        """Why this nexus would take the STML past a cap, or None. Each is
        checked in O(1); one that replaces a live nexus (its id, or its key
        on the target) takes no more room."""
        if not 0 <= nexus.tpg <= MAX_TPG:
            return f"portal group tag {nexus.tpg} is not in 0..{MAX_TPG}"
        if len(fe.nexuses) >= MAX_NEXUSES_PER_FRONT_END and nexus.id not in fe.nexuses:
            return f"front end has {MAX_NEXUSES_PER_FRONT_END} nexuses, the most the STML keeps for one"
        keys = self._target_keys.get(nexus.target, {})
        if len(keys) >= MAX_NEXUSES_PER_TARGET and nexus.key not in keys:
            return f"target {nexus.target} has {MAX_NEXUSES_PER_TARGET} I_T nexuses, the most the STML keeps"
        tpgs = self._seen_tpgs.get(nexus.target, ())
        if len(tpgs) >= MAX_PORT_GROUPS and nexus.tpg not in tpgs:
            return f"target {nexus.target} has nexuses through {MAX_PORT_GROUPS} port groups, the most it keeps"
        return None

    def portal_groups(self, target: str) -> set[int]:
        """Target port groups (portal group tags) of a target, for ALUA."""
        return self.configured_tpgs | self._seen_tpgs.get(target, set())

    def _scsi_release(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        nexus = fe.nexuses.get(h["nexus"])
        if nexus:
            self.drop_nexus(nexus, lost=h.get("lost") is True)

    def drop_nexus(self, nexus: Nexus, tasks: list[Task] | None = None, lost: bool = False) -> None:
        """I_T nexus loss: its tasks (`tasks`, else its own index of them)
        are aborted and its SPC-2 reservations released. `lost`: its initiator
        did not end it (a Logout would have): when it was the last nexus of
        its I_T nexus, the target remembers it (0234). The work is that of
        this nexus's own state, whatever the number of LUs and sessions."""
        if nexus.fe.nexuses.get(nexus.id) is nexus:
            del nexus.fe.nexuses[nexus.id]
        if tasks is None:
            tasks = list(nexus.tasks.values())
        for task in tasks:
            self._abort(task)
        self.on_nexus_gone(nexus, [t.tag for t in tasks])
        key = nexus.key
        same = self._keyed.get(key, [])
        if nexus in same:
            same.remove(nexus)
        if same:
            return
        self._keyed.pop(key, None)
        t = self.targets.get(nexus.target)
        if nexus.told == TELL_QUEUED or (nexus.told == TELL_SET and self._ua_luns.get(key)):
            lost = True   # (ended before its initiator heard its loss, a login never answered: 0236)
        if lost and t is not None:   # (a removed target's nexuses have nothing to hear)
            t.lost[key] = None
            if len(t.lost) > MAX_LOST_PER_TARGET:
                del t.lost[next(iter(t.lost))]
        for lu in self._copy_luns.pop(key, ()):   # copy results end with the nexus (SPC-4 6.23)
            lu.copy_results.drop(key)
        for lu in self._prevent_luns.pop(key, ()):   # and its PREVENT (SBC-4 5.15: I_T nexus loss)
            lu.prevent.discard(key)
        self._target_keys.get(nexus.target, {}).pop(key, None)
        for lu in self._spc2_luns.pop(key, ()):   # those it reserved, not every reserved LU (0227)
            if lu.pr is not None:
                lu.pr.drop_spc2(key)
        # unit attentions belong to the I_T nexus: they end with it, and a nexus
        # made again later starts without them
        for lu in self._ua_luns.pop(key, ()):
            lu.unit_attentions.pop(key, None)

    def keep_copy_results(self, lu: LogicalUnit, key: str, list_id: int, state: dict[str, Any]) -> None:
        """Store an EXTENDED COPY's results on `lu`, indexed by nexus key so that
        nexus loss visits only the LUs that hold some (not every LU of the target)."""
        lu.copy_results.put(key, list_id, state)
        self._copy_luns.setdefault(key, set()).add(lu)

    def prevent_removal(self, lu: LogicalUnit, key: str, prevent: bool) -> None:
        """Keep the nexus's PREVENT on the LU, indexed by nexus key as copy
        results are: its loss visits only the LUs it prevented, and PREVENT
        ALLOW costs the same however many sessions sent one (0297)."""
        luns = self._prevent_luns.get(key)
        if prevent:
            lu.prevent.add(key)
            self._prevent_luns.setdefault(key, set()).add(lu)
        else:
            lu.prevent.discard(key)
            if luns is not None:
                luns.discard(lu)
                if not luns:
                    del self._prevent_luns[key]

    def spc2_reserved(self, lu: LogicalUnit) -> None:
        """Index the LU by the nexus that holds its SPC-2 reservation now, as
        copy results and PREVENT are: that nexus's loss visits only its own
        (an entry released since is a no-op then)."""
        st = lu.pr
        if st is not None and st.spc2 is not None:
            self._spc2_luns.setdefault(st.spc2, set()).add(lu)

    def nexus_keys(self, target: str) -> list[str]:
        return list(self._target_keys.get(target, ()))

    def nexuses(self, target: str) -> Iterator[Nexus]:
        """The target's nexuses, from copies of its keys and of each key's
        nexuses: a caller may yield to the loop, or drop the nexus it was
        given, between them (a key gone meanwhile is skipped; callers check
        that a nexus is still registered before acting on it)."""
        keyed = self._keyed
        for key in list(self._target_keys.get(target, ())):
            yield from list(keyed.get(key, ()))

    def nexuses_of(self, key: str) -> list[Nexus]:
        """The nexuses holding one I_T nexus key (one per front end)."""
        return self._keyed.get(key, [])

    # ------------------------------------------------------------ commands
    def command(self, fe: FrontEnd | None, ident: bytes, tag: int, nexus_id: int, lun: int, cdb: bytes,
                attr: int, direction: int, exp_len: int, unsol: int, frames: list,
                lease: Lease | None = None, now: float | None = None) -> None:
        """An rx_cmnd decoded as RxCmnd (its fields fit the table, its counts are
        what a command takes), passed as its fields (rx_cmnd_fields): handle()'s
        and _rx_cmnd's steps for it, without the header dict. `fe`: its front
        end, None if it is not registered; `now`: the clock read the metrics
        took for it. The process shell calls it while commands are not timed
        (_rx_cmnd_timed reads the dict)."""
        if fe is None:
            self.out.release(ident, "unknown front end: register first")
            if lease is not None:
                lease.release()
            return
        fe.last_seen = _MONOTONIC() if now is None else now
        nexus = fe.nexuses.get(nexus_id)
        if nexus is None or tag in fe.tasks:
            self._not_started(fe, tag, nexus)
            if lease is not None:
                lease.release()
            return
        self._lease = lease
        try:
            self._start(fe, nexus, tag, lun, cdb, attr, direction, exp_len, unsol, frames, Task)
        except (KeyError, TypeError, ValueError, AttributeError) as e:   # (as handle())
            log.warning("malformed 'rx_cmnd' from %s refused: %s: %s", fe.name, type(e).__name__, e)
        finally:
            if self._lease is not None:
                self._lease.release()
                self._lease = None

    def _rx_cmnd(self, fe: FrontEnd, h: dict[str, Any], frames: list,
                 task_class: type[Task] = Task) -> None:
        """A command as a header dict; `task_class`: TimedTask while commands
        are timed (_rx_cmnd_timed)."""
        nexus = fe.nexuses.get(h["nexus"])
        tag = h["tag"]
        if nexus is None or tag in fe.tasks:
            self._not_started(fe, tag, nexus)
            return
        cdb = h["cdb"]
        if not cdb:
            raise ValueError("cdb must not be empty")
        # ints (the contract's table checked); non-negative, in one test for the usual case
        lun, attr, direction, exp_len, unsol = (
            h["lun"], h.get("attr", 0), h.get("dir", 0), h.get("len", 0), h.get("unsol", 0))
        if (lun | attr | direction | exp_len | unsol) < 0 or attr > _MAX_ATTR:
            self._refuse_counts(fe, tag, h)
            return
        self._start(fe, nexus, tag, lun, cdb, attr, direction, exp_len, unsol, frames, task_class)

    def _not_started(self, fe: FrontEnd, tag: int, nexus: Nexus | None) -> None:
        """A command under a live task's tag, or of a nexus that does not exist."""
        if tag in fe.tasks:
            # the contract's tags are unique among a front end's live tasks: a second
            # command under a live tag (a duplicated message, a confused front end) is
            # not run - an answer under that tag would be taken for the first one's
            log.warning("front end %s: rx_cmnd with tag %d, already a live task's: dropped", fe.name, tag)
        else:
            sense = build_sense(ABORTED_COMMAND, LOGICAL_UNIT_COMMUNICATION_FAILURE)   # no such nexus
            self.respond(fe, tag, CHECK_CONDITION, sense, 0)

    def _start(self, fe: FrontEnd, nexus: Nexus, tag: int, lun: int, cdb: bytes, attr: int, direction: int,
               exp_len: int, unsol: int, frames: list, task_class: type[Task]) -> None:
        """Run a command whose fields were checked, at once up to its first wait."""
        # (Task by name when it is Task: the compiled build constructs it natively,
        # where a call of the class in a variable goes through the type's call)
        task = (Task(self, fe, nexus, tag, lun, cdb, attr, direction, exp_len, unsol, frames)
                if task_class is Task else
                task_class(self, fe, nexus, tag, lun, cdb, attr, direction, exp_len, unsol, frames))
        if self._lease is not None:
            self._take_lease(task)
        fe.tasks[tag] = task
        nexus.tasks[tag] = task
        self._drive(task, self._execute(task))

    def _drive(self, task: Task, coro: Coroutine[Any, Any, None]) -> None:
        """Run a command's coroutine at once up to its next wait (start_eagerly's
        way). A wait for an aio call's future parks it on that future, whose
        completion drives it on from the collector (AioFuture.waiter): no
        asyncio Task, no loop turn, as a file LUN's command never waits (0418).
        Any other wait gets the Task that finishes it (_Started); so does a
        parked command that is aborted (_abort)."""
        try:
            for waiting_on in coro.__await__():
                if type(waiting_on) is AioFuture:
                    task.coro, task.parked = coro, waiting_on
                    waiting_on.waiter, waiting_on.waiter_arg = _resume, task
                    return
                self._run_in_task(task, coro, waiting_on)
                return
        except Exception:   # (_execute answers every error: this is a bug's last line)
            log.exception("internal error running CDB %s", task.cdb.hex())

    def _unpark(self, task: Task, coro: Coroutine[Any, Any, None], fut: AioFuture) -> asyncio.Task:
        """A Task for a command parked on an aio call, which an abort can cancel
        and wait for: its first step waits for that call (_Started)."""
        task.coro = task.parked = None
        fut.waiter = fut.waiter_arg = None
        return self._run_in_task(task, coro, fut)

    def _run_in_task(self, task: Task, coro: Coroutine[Any, Any, None], waiting_on: Any) -> asyncio.Task:
        runner = task.runner = asyncio.get_running_loop().create_task(_Started(coro, waiting_on))
        runner.add_done_callback(functools.partial(self._runner_done, task))
        return runner

    def _refuse_counts(self, fe: FrontEnd, tag: int, h: dict[str, Any]) -> None:
        """The rx_cmnd field that is not a non-negative int (attr: not a
        TaskAttr), refused: a LUN as no such LU; any other is a field of the
        command's transport information, not of the CDB the initiator wrote
        (docs/decisions/0702)."""
        for key in _COUNT_FIELDS:
            value = h.get(key, 0)
            if type(value) is not int or value < 0 or (key == "attr" and value > _MAX_ATTR):
                log.warning("front end %s: rx_cmnd %s=%r refused", fe.name, key, value)
                asc = LOGICAL_UNIT_NOT_SUPPORTED if key == "lun" else INVALID_FIELD_IN_COMMAND_IU
                self.respond(fe, tag, CHECK_CONDITION, build_sense(ILLEGAL_REQUEST, asc), 0)
                return

    def _runner_done(self, task: Task, runner: asyncio.Task) -> None:
        """An aborted task is forgotten whether or not it had started running;
        one aborted by another I_T nexus reports TASK ABORTED (TAS=1), one
        aborted by its own nexus sends no status at all."""
        task.runner = None   # the cancellation's traceback refers back to the task
        if not runner.cancelled():
            return
        self._forget(task)
        if task.abort_status is not None and self.front_ends.get(task.fe.ident) is task.fe:
            self.respond(task.fe, task.tag, task.abort_status, None, task.exp_len)

    def _scsi_rx_data(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        task = fe.tasks.get(h["tag"])
        if task is None:
            return  # data for a task already answered (e.g. failed before its data): dropped
        if h.get("error"):
            log.info("front end %s could not deliver data for task %d: %s", fe.name, task.tag, h["error"])
            task.fail_data(CheckCondition(ABORTED_COMMAND, DATA_PHASE_ERROR))
        else:
            task.add_data(h["offset"], frames)
            if self._lease is not None:
                self._take_lease(task)

    async def _execute(self, task: Task) -> None:
        status, sense = GOOD, None
        data: bytes | bytearray | memoryview | None = None   # what a handler returns
        descriptor = False
        try:
            t = self.targets.get(task.nexus.target)   # (lookup_lu, in place: per command)
            lu = task.lu = t.luns.get(task.lun) if t is not None else None
            if lu is None:
                data = await self._no_such_lun(task)
            else:
                descriptor = lu.mode.d_sense
                if task.attr == _ACA:
                    raise CheckCondition(ILLEGAL_REQUEST, INVALID_MESSAGE_ERROR)  # no ACA (NACA=0)
                cdb = task.cdb
                template: DiskTemplate = lu.template   # (declared: a native call when compiled)
                entry = template.lookup(cdb)
                # check_usage in one test for a CDB as long as its row's usage (lookup: not shorter)
                if len(cdb) != entry.size or _FROM_BYTES(cdb, "big") & entry.forbidden:
                    check_usage(cdb, entry.usage)
                if lu.unit_attentions and not entry.ua_exempt:
                    ua = self._pending_ua(lu, task.nexus)
                    if ua:
                        raise CheckCondition(UNIT_ATTENTION, ua)
                task_set = lu.task_set
                if len(task_set.tasks) >= self.queue_depth:
                    raise StatusError(TASK_SET_FULL)
                st = lu.pr
                if st is not None and (st.spc2 is not None or st.type is not None):   # (none held: no call)
                    self._check_reservation(lu, task, entry)
                task_set.add(task)
                stamps = task.stamps   # (read once: a class attribute unless timed)
                if stamps is not None:
                    stamps[QUEUED] = time.monotonic_ns()
                try:
                    # the row's checks: the medium's (disk.medium_error), then its own
                    if entry.medium and (not lu.medium_present or lu.job is not None):
                        self._check_medium(lu)
                    if entry.check:
                        entry.check(task)
                    waited = entry.out_len is not None and not self._collected(task, entry) \
                        and await self._data_arrives(task)
                    if (not task_set.at_once(task) and await task_set.enter(task)) or waited:
                        # the LU may have changed meanwhile (reservations, size, protection, medium)
                        self._check_reservation(lu, task, entry)
                        if entry.medium:
                            self._check_medium(lu)
                        if entry.check:
                            entry.check(task)
                    if stamps is None:
                        data = await entry.handler(task)
                    else:
                        data = await cast(TimedTask, task).timed(entry.handler)
                finally:
                    task_set.remove(task)
        except asyncio.CancelledError:
            raise  # aborted: _runner_done forgets it (and answers TASK ABORTED under TAS)
        except CheckCondition as e:
            status, sense = e.status, e.sense(descriptor)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("CDB %s from %s LUN %d: %r", task.cdb.hex(), task.nexus.key, task.lun, e)
        except StatusError as se:   # (one name per type: mypyc types a name once, decision 0830)
            status = se.status
            if task.lu is not None and status in PREVIOUS_STATUS_UA \
                    and getattr(task.lu.mode, "ua_intlck_ctrl", 0) == 3:
                self.establish_ua(task.lu, PREVIOUS_STATUS_UA[status], [task.nexus.key])
        except (BackendError, OSError) as be:
            err = getattr(be, "errno", 0)
            lu = task.lu
            refused = SPACE_ERRORS.get(err) if lu is not None and thin(lu) else None
            refused = refused or PROTECT_ERRORS.get(err)
            if refused is not None and lu is not None:
                key, asc = refused
                self._log_refused(lu, be, asc)
            else:
                log.error("backend error on %s LUN %d: %s", task.nexus.target, task.lun, be)
                asc = UNRECOVERED_READ_ERROR if task.direction & _READ else WRITE_ERROR
                key, asc = PATH_ERRORS.get(err, (MEDIUM_ERROR, asc))
            status, sense = CHECK_CONDITION, build_sense(key, asc, descriptor)
        except Exception:
            log.exception("internal error on CDB %s", task.cdb.hex())
            status = CHECK_CONDITION
            sense = build_sense(HARDWARE_ERROR, INTERNAL_TARGET_FAILURE, descriptor)
        self._complete(task, status, sense, data)
        self._forget(task)   # after the response took the shared memory it sends

    @staticmethod
    def _log_refused(lu: LogicalUnit, error: Exception, asc: tuple[int, int]) -> None:
        """A write refused (no space, a read-only file system): the first of a LU
        gets a line, then at most one a NOSPACE_LOG_INTERVAL with the count since,
        so a storm of them (every write of a full file system) is a line, not one a
        command."""
        lu.space_refused += 1
        now = time.monotonic()
        if lu.space_logged is not None and now - lu.space_logged < NOSPACE_LOG_INTERVAL:
            return
        why, answer, way_out = REFUSED_LINES[asc]
        log.error("%s LUN %d: %s (%s): %d refused with DATA PROTECT, %s since the last line; %s",
                  lu.target, lu.lun, why, error, lu.space_refused, answer, way_out)
        lu.space_logged, lu.space_refused = now, 0

    @staticmethod
    def _check_medium(lu: LogicalUnit) -> None:
        error = medium_error(lu)
        if error is not None:
            raise error

    def _pending_ua(self, lu: LogicalUnit, nexus: Nexus) -> tuple[int, int] | None:
        """The unit attention to report; with the control mode page's UA
        interlock (UA_INTLCK_CTRL 10b/11b) it stays until REQUEST SENSE."""
        if getattr(lu.mode, "ua_intlck_ctrl", 0) & 0x2:
            pending = lu.unit_attentions.get(nexus.key)
            return pending[0] if pending else None
        return self.take_ua(lu, nexus)

    @staticmethod
    def _check_reservation(lu: LogicalUnit, task: Task, entry: OpEntry) -> None:
        """The opcode-table row says how the command meets a reservation
        (stml.ops.Conflict); with none held (every LU has reservation state
        once restore_reservations ran) no command conflicts, and the rule is
        not looked at."""
        st = lu.pr
        if st is not None and (st.spc2 is not None or st.type is not None) and entry.conflicts \
                and st.conflicts(task.nexus, entry.conflicts):
            raise StatusError(RESERVATION_CONFLICT)

    # ------------------------------------------------------------ unit attentions
    def establish_ua(self, lu: LogicalUnit, asc_ascq: tuple[int, int], keys: Iterable[str],
                     exclude: str | None = None, offline: Container[str] = (),
                     aen: bool = True) -> None:
        """Establish a unit attention for these I_T nexuses, and report it
        asynchronously to the front ends that asked for events (it stays
        pending: the initiator still sees it on its next command). Only
        nexuses that exist get one, and those `offline` names (a registration
        of one I_T nexus that is not logged in: it hears of the change when it
        comes back), so what an initiator can make the LU store is bounded by
        the sessions and the registrations. `aen` False: no events (a fan-out
        over many LUs sends them for one)."""
        keyed = self._keyed
        keys = [k for k in dict.fromkeys(keys) if k != exclude and (k in keyed or k in offline)]
        if not keys:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("unit attention %02x/%02x on %s LUN %d for %d nexus(es)", *asc_ascq, lu.target,
                      lu.lun, len(keys))
        stored = lu.add_ua(asc_ascq, keys)
        for key in stored:
            self._ua_luns.setdefault(key, set()).add(lu)
        if not aen:
            return
        sense = None
        for key in keys:
            for n in keyed.get(key, ()):
                if n.fe.aen and n.target == lu.target:
                    sense = sense or build_sense(UNIT_ATTENTION, asc_ascq, lu.mode.d_sense)
                    self.out.report_aen(n.fe.ident, n.id, lu.lun, sense)

    def take_ua(self, lu: LogicalUnit, nexus: Nexus) -> tuple[int, int] | None:
        """Report (and clear) the nexus's oldest unit attention on the LU."""
        ua = lu.take_ua(nexus.key)
        if ua is not None and nexus.key not in lu.unit_attentions:
            luns = self._ua_luns.get(nexus.key)
            if luns is not None:
                luns.discard(lu)
                if not luns:
                    del self._ua_luns[nexus.key]
        return ua

    async def abort_tasks(self, lu: LogicalUnit, keys: set[str], by: Task) -> None:
        """PREEMPT AND ABORT: the LU's tasks of these nexuses end with TASK
        ABORTED (another nexus aborted them); it completes once they are gone."""
        runners = self._abort_all([t for t in lu.task_set.tasks.values() if t is not by and t.nexus.key in keys])
        if runners:
            await asyncio.wait(runners)

    def abort_lu(self, lu: LogicalUnit) -> list[asyncio.Task]:
        """The LU is being removed (it is out of its target already): every
        task it has ends with TASK ABORTED, as if another I_T nexus aborted it
        (TAS=1; the front end answers it and drops its later data). The
        runners returned end once a backend call under way has ended."""
        return self._abort_all(list(lu.task_set.tasks.values()))

    def _abort_all(self, victims: list[Task]) -> list[asyncio.Task]:
        return [r for r in (self._abort(t, TASK_ABORTED) for t in victims) if r is not None]

    def drop_offline_uas(self, lu: LogicalUnit, keep: set[str]) -> None:
        """Unit attentions kept for logged-out nexuses go with their
        registration: those of `keep` (still registered) stay."""
        for key in [k for k in lu.unit_attentions if k not in self._keyed and k not in keep]:
            del lu.unit_attentions[key]
            luns = self._ua_luns.get(key)
            if luns is not None:
                luns.discard(lu)
                if not luns:
                    del self._ua_luns[key]

    async def _no_such_lun(self, task: Task) -> bytes | None:
        """What a command to a LUN that does not exist gets (SPC-4 4.6.2)."""
        op = task.cdb[0]
        if op == 0x12 and not task.cdb[1] & 1:
            return standard_inquiry(None)[:int.from_bytes(task.cdb[3:5], "big")]
        if op == 0x03:
            return build_sense(ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED, bool(task.cdb[1] & 1))
        if op == 0xA0:  # REPORT LUNS answers through any LUN, existing or not
            entry = self.templates["disk"].lookup(task.cdb)
            check_usage(task.cdb, entry.usage)
            return await entry.handler(task)
        raise CheckCondition(ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)

    def _collected(self, task: Task, entry: OpEntry) -> bool:
        """Size the write data the command needs and ask for what was not sent
        unsolicited: True when it is all here already (a write with immediate
        data: no coroutine for it), False when the task waits (_data_arrives)."""
        out_len = entry.out_len
        assert out_len is not None   # _execute collects only for commands with write data
        need = task.need = out_len(task)
        if need > self.max_transfer:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        # a front end that declared no data-out direction sends no write data
        exp_out = task.exp_len if task.direction & _WRITE else 0
        if need > exp_out:
            if not entry.partial:
                # the initiator will not send what the CDB asks for: refuse before data moves
                raise CheckCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
            need = exp_out  # SAM: only what the initiator sends is transferred (overflow)
        task.want = need
        if task.data_error is not None:
            raise task.data_error
        if task.received < need:
            task.data_ready = asyncio.get_running_loop().create_future()
            start = max(task.unsol, task.received)
            if start < need:
                self.out.rdy_to_xfer(task.fe.ident, task.tag, start, need - start)
            return False
        if task.received > need:
            task.data_out = trim_views(task.data_out, need)
        return True

    async def _data_arrives(self, task: Task) -> bool:
        """The rest of the write data _collected asked for, once it is here
        (True: the task waited for it)."""
        assert task.data_ready is not None   # set by _collected
        await task.data_ready
        if task.received > task.want:
            task.data_out = trim_views(task.data_out, task.want)
        return True

    def _forget(self, task: Task) -> None:
        """The task is over, however it ended: its tag is free, and the memory
        it held goes back (the one place: its write data, maybe a front end's
        shared memory or a pooled buffer, and its read data's shared memory,
        which its front end still holds if the response lent it)."""
        tag: Any = task.tag   # (Any: compiled, boxed once, not at each of four uses)
        tasks = task.fe.tasks
        if tasks.get(tag) is task:
            del tasks[tag]
        tasks = task.nexus.tasks
        if tasks.get(tag) is task:
            del tasks[tag]
        if task.data_out:
            task.data_out = []
        held = task.held
        if held is not None:
            task.held = None
            for release in held:
                release()
        region = task.slot_region
        if region is not None:   # (cleared first: given back once, whatever release does)
            view = task.slot
            task.slot_region = None
            task.slot = None
            assert view is not None   # set with the region (StmlServer._read_buffer)
            region.release(view)

    def _complete(self, task: Task, status: int, sense: bytes | None, data: Any) -> None:
        exp = task.exp_len
        resid = exp
        if data is not None and task.direction & _READ:
            n = len(data)
            resid = exp - n
            if n > exp:
                data = memoryview(data)[:exp]
            frames = [data] if exp and n else []   # (one list: not an empty one replaced)
        else:
            frames = []
            if task.need:
                resid = exp - task.need
        self.out.xmit_response(task.fe.ident, task.tag, status, sense, resid, frames)   # (respond, in place)

    def respond(self, fe: FrontEnd, tag: int, status: int, sense: bytes | None, resid: int,
                frames: collections.abc.Iterable = ()) -> None:
        self.out.xmit_response(fe.ident, tag, status, sense, resid, list(frames))

    # ------------------------------------------------------------ task management
    def _abort(self, task: Task, status: int | None = None) -> asyncio.Task | None:
        """Abort a task; with a status (TASK ABORTED) it reports that status
        instead of vanishing (tasks aborted by another I_T nexus, TAS=1)."""
        runner = task.runner
        if task.coro is not None and task.parked is not None:
            runner = self._unpark(task, task.coro, task.parked)
        if runner is not None and not runner.done():
            task.abort_status = status   # the last abort says how it ends
            # cancelled once: a second cancel would interrupt Task.io_on's wait
            # for the backend call under way, and the task would end while it runs
            if not runner.cancelling():
                runner.cancel()
        return runner

    def _rx_task_mgmt_fn(self, fe: FrontEnd, h: dict[str, Any], frames: list) -> None:
        nexus = fe.nexuses.get(h["nexus"])
        tag = h["tag"]
        if nexus is None or nexus.target not in self.targets:
            self._tmf_done(fe, tag, TmfResponse.REJECTED)
            return
        # decided now, in arrival order; only the wait for the aborted tasks
        # (and a fan-out of unit attentions over many LUs) is deferred
        outcome, runners = self._task_mgmt(fe, tag, nexus, int(h["fn"]), int(h.get("lun") or 0), h.get("ref"))
        response, fanout = outcome.response, outcome.fanout
        mine = [t.tag for t in outcome.victims if t.nexus is nexus]
        if not runners and fanout is None:
            self._tmf_done(fe, tag, response, mine, outcome.info)
            return

        async def finish() -> None:
            if fanout is not None:
                await fanout
            if runners:
                await asyncio.wait(runners)
            self._tmf_done(fe, tag, response, mine, outcome.info)
        asyncio.get_running_loop().create_task(finish())

    def _tmf_done(self, fe: FrontEnd, tag: int, response: int,
                  aborted: collections.abc.Iterable[int] = (), info: bytes = b"") -> None:
        self.out.task_mgmt_fn_done(fe.ident, tag, response, list(aborted), info)

    @staticmethod
    def _target_tasks(t: Target) -> list[Task]:
        """The tasks of a target's LUs, removed ones still draining included:
        every unfinished one is in its LU's task set."""
        return [task for lus in (t.luns.values(), t.draining) for lu in lus for task in lu.task_set.tasks.values()]

    async def fan_out_ua(self, luns: Iterable[LogicalUnit], asc_ascq: tuple[int, int], keys: list[str],
                         exclude: str | None = None, offline: Container[str] = (),
                         events: bool = True) -> None:
        """Establish a unit attention for these nexuses on these LUs, at most
        FANOUT_STEP nexus entries between turns of the event loop, however
        many nexuses one LU has (4,096 per target: 0263), with asynchronous
        events sent for the first LU only (one per nexus, not one per LU and
        nexus; none without `events`). A command arriving meanwhile finds its
        UA set or not yet; a nexus gone meanwhile is skipped (establish_ua)."""
        await self._fan_out(luns, asc_ascq, keys, exclude, offline, events, FANOUT_STEP)

    async def _fan_out(self, luns: Iterable[LogicalUnit], asc_ascq: tuple[int, int], keys: list[str],
                       exclude: str | None, offline: Container[str], events: bool, budget: int) -> int:
        """fan_out_ua with `budget` entries left in this turn, for a walk that
        fans out one after another (_tell_nexuses); the entries left."""
        if not keys:
            return budget
        for i, lu in enumerate(list(luns)):
            start = 0
            while start < len(keys):
                if budget <= 0:
                    budget = FANOUT_STEP
                    await asyncio.sleep(0)
                chunk = keys[start:start + budget]
                self.establish_ua(lu, asc_ascq, chunk, exclude, offline, aen=events and i == 0)
                start += len(chunk)
                budget -= len(chunk)
        return budget

    async def _target_reset_uas(self, t: Target) -> None:
        """POWER ON, RESET for every nexus on every LU, after a target reset.
        Fan-outs run one at a time per target, and one that starts covers the
        resets asked for before it: a burst of resets costs two fan-outs."""
        resets = self._resets.setdefault(t.name, _Resets())
        resets.asked += 1
        mine = resets.asked
        async with resets.lock:
            if resets.covered >= mine:
                return   # a fan-out that began after this reset covered it
            upto = resets.asked
            await self.fan_out_ua(t.luns.values(), POWER_ON_RESET, self.nexus_keys(t.name))
            resets.covered = upto

    def _task_mgmt(self, fe: FrontEnd, tag: int, nexus: Nexus, fn: int, lun: int, ref: int | None
                   ) -> tuple[TmfOutcome, list[asyncio.Task]]:
        """Run one TMF (its row of TMFS). Tasks of the issuing I_T nexus that
        it aborts vanish (listed in `aborted`); tasks of other nexuses end with
        TASK ABORTED (TAS=1) and their nexuses get the unit attention SAM-5
        names. The response leaves only after every affected task is gone
        (and, for the resets of a whole target or nexus, once the unit
        attentions are set). Tasks are found in the task sets of the LUs
        concerned, not among every front end's: the cost is that of the LUs
        and tasks the TMF touches."""
        t = self.targets[nexus.target]
        call = TmfCall(fn, fe, nexus, t, lun, t.luns.get(lun), ref)
        row = self.TMFS.get(fn)
        if row is None:
            outcome = TmfOutcome(TmfResponse.NOT_SUPPORTED)
        elif row.lun_scoped and call.lu is None:
            outcome = TmfOutcome(TmfResponse.NO_LUN)
        else:
            outcome = row.run(self, call)
        runners = [r for r in (self._abort(x, None if x.nexus is nexus else TASK_ABORTED)
                               for x in outcome.victims) if r is not None]
        return outcome, runners

    # ---- one handler per function, each row of TMFS
    def _tmf_abort_task(self, call: TmfCall) -> TmfOutcome:
        task = call.referenced()
        return TmfOutcome(TmfResponse.NO_TASK) if task is None else TmfOutcome(TmfResponse.COMPLETE, [task])

    def _tmf_query_task(self, call: TmfCall) -> TmfOutcome:
        return TmfOutcome(TmfResponse.SUCCEEDED if call.referenced() is not None else TmfResponse.COMPLETE)

    def _tmf_query_task_set(self, call: TmfCall) -> TmfOutcome:
        mine = any(x.nexus is call.nexus for x in call.unit.task_set.tasks.values())
        return TmfOutcome(TmfResponse.SUCCEEDED if mine else TmfResponse.COMPLETE)

    def _tmf_query_async_event(self, call: TmfCall) -> TmfOutcome:
        """SUCCEEDED with the additional response information of SAM-5: the
        UADE depth (1: one pending, 2: more) and the sense key, ASC and ASCQ
        of the unit attention the nexus would be told next. It stays
        pending: the query reports, it does not clear."""
        pending = call.unit.unit_attentions.get(call.nexus.key)
        if not pending:
            return TmfOutcome(TmfResponse.COMPLETE)
        asc, ascq = pending[0]
        depth = 1 if len(pending) == 1 else 2
        return TmfOutcome(TmfResponse.SUCCEEDED, info=bytes([depth << 4 | UNIT_ATTENTION, asc, ascq]))

    def _tmf_clear_aca(self, call: TmfCall) -> TmfOutcome:
        return TmfOutcome(TmfResponse.COMPLETE)   # NACA is not supported: no ACA condition to clear

    def _tmf_abort_task_set(self, call: TmfCall) -> TmfOutcome:
        return TmfOutcome(TmfResponse.COMPLETE,
                          [x for x in call.unit.task_set.tasks.values() if x.nexus is call.nexus])

    def _tmf_clear_task_set(self, call: TmfCall) -> TmfOutcome:
        lu = call.unit
        victims: list[Task] = list(lu.task_set.tasks.values())
        self.establish_ua(lu, COMMANDS_CLEARED_BY_ANOTHER, [x.nexus.key for x in victims], exclude=call.nexus.key)
        return TmfOutcome(TmfResponse.COMPLETE, victims)

    def _tmf_lun_reset(self, call: TmfCall) -> TmfOutcome:
        lu = call.unit
        victims: list[Task] = list(lu.task_set.tasks.values())
        pr.state(lu).drop_spc2()
        return TmfOutcome(TmfResponse.COMPLETE, victims,
                          self.fan_out_ua([lu], BUS_DEVICE_RESET, self.nexus_keys(call.target.name)))

    def _tmf_target_reset(self, call: TmfCall) -> TmfOutcome:
        t = call.target
        if not t.target_reset:
            # one initiator's reset would abort every initiator's tasks on every
            # LU: refused unless the target allows it (as LIO's node ACLs do)
            log.info("%s refused: target resets are off for %s (target_reset)", Tmf(call.fn).name, t.name)
            return TmfOutcome(TmfResponse.NOT_AUTHORIZED)
        for each in t.luns.values():
            if each.pr is not None:
                each.pr.drop_spc2()
        return TmfOutcome(TmfResponse.COMPLETE, self._target_tasks(t), self._target_reset_uas(t))

    def _tmf_i_t_nexus_reset(self, call: TmfCall) -> TmfOutcome:
        t, nexus = call.target, call.nexus
        victims = [x for x in self._target_tasks(t) if x.nexus is nexus]
        for each in self._spc2_luns.pop(nexus.key, ()):
            if each.pr is not None:
                each.pr.drop_spc2(nexus.key)
        return TmfOutcome(TmfResponse.COMPLETE, victims, self.fan_out_ua(t.luns.values(), I_T_NEXUS_LOSS, [nexus.key]))

    # task management functions: the handler, and whether the function names
    # an LU (then a LUN without one is answered NO_LUN); any other: NOT_SUPPORTED.
    # (Filled in below the class: mypyc compiles no class-body table of the
    # class's own methods; decision 0830.)
    TMFS: ClassVar[dict[int, TmfRow]]


Emulator.TMFS = {
    Tmf.ABORT_TASK: TmfRow(Emulator._tmf_abort_task),
    Tmf.ABORT_TASK_SET: TmfRow(Emulator._tmf_abort_task_set, lun_scoped=True),
    Tmf.CLEAR_ACA: TmfRow(Emulator._tmf_clear_aca, lun_scoped=True),
    Tmf.CLEAR_TASK_SET: TmfRow(Emulator._tmf_clear_task_set, lun_scoped=True),
    Tmf.LUN_RESET: TmfRow(Emulator._tmf_lun_reset, lun_scoped=True),
    Tmf.TARGET_WARM_RESET: TmfRow(Emulator._tmf_target_reset),
    Tmf.TARGET_COLD_RESET: TmfRow(Emulator._tmf_target_reset),
    Tmf.QUERY_TASK: TmfRow(Emulator._tmf_query_task),
    Tmf.QUERY_TASK_SET: TmfRow(Emulator._tmf_query_task_set, lun_scoped=True),
    Tmf.QUERY_ASYNC_EVENT: TmfRow(Emulator._tmf_query_async_event, lun_scoped=True),
    Tmf.I_T_NEXUS_RESET: TmfRow(Emulator._tmf_i_t_nexus_reset),
}


def _resume(task: Task) -> None:
    """A parked command's aio call completed (AioFuture.waiter, called with
    the task): its Emulator drives it on. A function, the same for every
    command, where the Emulator's bound method kept on it made a reference
    cycle of it."""
    coro = task.coro
    assert coro is not None   # (an abort takes the waiter away with the coroutine: _unpark)
    task.coro = task.parked = None
    cast(Emulator, task.services)._drive(task, coro)
