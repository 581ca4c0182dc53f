"""Replay: the front ends' recorded messages into a fresh STML, its answers
compared with the recorded ones (docs/research.md, "What replay compares").

The STML is built in this process from the trace's first record: the same
targets and LUNs (sizes, options, identities, mode and reservation state),
each LUN in RAM. It runs on an event loop of its own whose clock is the
trace's: time stands at the recorded time of the message being fed, and
moves only when the STML waits for a timer. Backend calls run in place
(RAM) and anything handed to an executor runs at once, so a replay is the
same on every run and machine.

Messages go in in recorded order, respecting the recorded overlap: before
feeding a message, the loop runs until it is idle, and every answer the
recorded STML had sent by then must have come (a command recorded as in
flight stays in flight). Answers are matched to recorded ones by front end,
message and task tag (or nexus), not by their order.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextvars
import selectors
from dataclasses import dataclass, field
from typing import Any, Callable

from backends.ram import RamBackend
from stml.api import Op
from stml.api.link import nexus_registration, registration
from stml.api.tap import FROM_STML
from stml.trace.format import Message, Note, TraceError, TraceReader, data_digest, digest

# answers compared, and how each is found: by tag, by nexus, or in order per front end
_BY_TAG = {Op.XMIT_RESPONSE.value, Op.RDY_TO_XFER.value, Op.TMF_DONE.value}
_BY_NEXUS = {Op.NEXUS_READY.value}
_IN_ORDER = {Op.REPORT_AEN.value}
COMPARED = _BY_TAG | _BY_NEXUS | _IN_ORDER
# what the STML handles of what front ends send (management and portal reports are
# the process shell's: not replayed)
FED = {Op.REGISTER.value, Op.DEREGISTER.value, Op.REGISTER_NEXUS.value, Op.RELEASE_NEXUS.value,
       Op.RX_CMND.value, Op.RX_DATA.value, Op.RX_TMF.value, Op.DONE.value, Op.HEARTBEAT.value}
# management commands that change nothing a command sees
READ_ONLY_MGMT = {"status", "target_list", "lun_list", "portal_list", "session_list", "frontend_list",
                  "config_show", "config_diff", "config_save", "trace_start", "trace_status", "trace_stop",
                  "latency"}
_RX_CMND, _RX_DATA, _RX_TMF = Op.RX_CMND.value, Op.RX_DATA.value, Op.RX_TMF.value
_XMIT = Op.XMIT_RESPONSE.value

# the command whose message is being fed: a read of data the trace did not write
# is noted against it (the context is copied into the command's task)
_current: contextvars.ContextVar[tuple[bytes, int] | None] = contextvars.ContextVar("replay_command",
                                                                                    default=None)


class Extents:
    """Disjoint byte ranges [start, end), sorted: what replay knows of a LUN."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self.ends, start)        # the first range that ends at or after start
        j = bisect.bisect_right(self.starts, end)       # past the last range that starts at or before end
        if i < j:
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def covers(self, start: int, end: int) -> bool:
        if end <= start:
            return True
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end


class ReplayRam(RamBackend):
    """A RAM LUN that knows which bytes hold data the replay can vouch for:
    all of it when the trace began with the LUN as replay builds it (a RAM
    LUN recorded from the start, or --lun-data), else only what the trace
    wrote. A read of anything else is noted against the command reading."""

    def __init__(self, size: int, known: bool, unknown_reads: set[tuple[bytes, int]]) -> None:
        super().__init__(size)
        self.known = Extents()
        self.all_known = known
        if known:
            self.known.add(0, size)
        self.unknown_reads = unknown_reads

    def read_into(self, offset: int, buf: memoryview) -> None:
        if not self.known.covers(offset, offset + len(buf)):
            command = _current.get()
            if command is not None:
                self.unknown_reads.add(command)
        super().read_into(offset, buf)

    def write_from(self, offset: int, bufs: Any, sync: bool) -> None:
        super().write_from(offset, bufs, sync)
        self.known.add(offset, offset + sum(len(memoryview(b).cast("B")) for b in bufs))

    def discard(self, offset: int, length: int) -> None:
        super().discard(offset, length)
        self.known.add(offset, offset + length)   # zeros, as on the recorded LUN

    def resize(self, size: int) -> None:
        old = self._size
        super().resize(size)
        if size > old and self.all_known:
            self.known.add(old, size)


class InlineExecutor(concurrent.futures.Executor):
    """Runs what is handed to it at once, in the caller: no thread decides
    when a replayed command goes on."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        f: concurrent.futures.Future = concurrent.futures.Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever waits on it, as a thread pool would
            f.set_exception(e)
        return f


class _IdleSelector(selectors.DefaultSelector):
    """The replay loop's selector: it never sleeps. When the loop has nothing
    ready it would wait; instead it tells the replay (the loop is idle, and
    how far off its next timer is) and returns at once."""

    def __init__(self, on_idle: Callable[[float | None], None]) -> None:
        super().__init__()
        self.on_idle = on_idle

    def select(self, timeout: float | None = None) -> list:
        if timeout is None or timeout > 0:
            self.on_idle(timeout)
        return super().select(0)


class ReplayLoop(asyncio.SelectorEventLoop):
    """An event loop on the trace's clock (see the module doc)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._idle: asyncio.Future | None = None
        super().__init__(_IdleSelector(self._on_idle))

    def time(self) -> float:
        return self.now

    def _on_idle(self, timeout: float | None) -> None:
        waiter, self._idle = self._idle, None
        if waiter is not None and not waiter.done():
            waiter.set_result(timeout)

    async def idle(self) -> float | None:
        """Return once nothing is ready to run: the time to the next timer (None: none)."""
        self._idle = self.create_future()
        return await self._idle


@dataclass
class Divergence(Exception):
    """The first answer that differs (or is missing, or unexpected)."""
    what: str                              # one line
    index: int                             # the trace record it concerns
    command: Message | None = None         # the command or TMF the answer belongs to
    expected: dict[str, Any] | None = None
    got: dict[str, Any] | None = None

    def __str__(self) -> str:
        return self.what


@dataclass
class Result:
    fed: int = 0                # messages fed to the STML
    compared: int = 0           # answers compared
    data_compared: int = 0      # read data digests compared
    data_unknown: int = 0       # read data not compared: it read bytes the trace did not write
    skipped: int = 0            # recorded answers to tasks in flight when the trace began
    unmatched: int = 0          # answers the trace ends before (commands in flight at its end)
    mgmt_changes: list[str] = field(default_factory=list)   # management changes not replayed
    complete: bool = True       # the trace has its end record
    end: str | None = None      # why recording stopped


def _answer(header: dict[str, Any], data: Any) -> dict[str, Any]:
    """What is compared of an answer."""
    op = header["op"]
    if op == _XMIT:
        length, crc = data_digest(data)
        return {"status": header.get("status"), "sense": header.get("sense"), "resid": header.get("resid", 0),
                "data_length": length, "data_crc32c": crc}
    if op == Op.RDY_TO_XFER.value:
        return {"offset": header.get("offset"), "length": header.get("length")}
    if op == Op.TMF_DONE.value:
        return {"response": header.get("response"), "aborted": sorted(header.get("aborted") or [])}
    if op == Op.NEXUS_READY.value:
        return {"refused": bool(header.get("error"))}
    return {"lun": header.get("lun"), "sense": header.get("sense")}   # report_aen


class Replayer:
    """One replay of one trace (see the module doc). run() returns a Result or
    raises Divergence (the first one) or TraceError (a trace it cannot use)."""

    def __init__(self, path: str, lun_data: dict[int, str] | None = None) -> None:
        self.path = path
        self.lun_data = lun_data or {}
        self.unknown_reads: set[tuple[bytes, int]] = set()
        self.result = Result()
        self.expected: dict[tuple, collections.deque[Message]] = collections.defaultdict(collections.deque)
        self.produced: dict[tuple, collections.deque[tuple[dict[str, Any], Any]]] = \
            collections.defaultdict(collections.deque)
        self.pending = 0            # recorded answers not yet produced
        self.foreign: set[tuple[bytes, int]] = set()   # tasks in flight when the trace began
        self.commands: dict[tuple[bytes, int], Message] = {}   # the last command or TMF per tag
        self.setup = False          # feeding the state the trace began with: answers ignored
        self.loop: ReplayLoop | None = None
        # the first difference; found while the STML sends (inside its own code), raised by the driver
        self.divergence: Divergence | None = None

    # ------------------------------------------------------------ building the STML
    def _build(self, first: dict[str, Any]) -> Any:
        from stml.emulator import Emulator, Target
        from stml.lu import LogicalUnit, LunOptions
        from stml.lunmap import LunMap
        config = first.get("config") or {}
        limits = config.get("limits") or {}
        em = Emulator([], self._output, InlineExecutor(), name=str(config.get("stml", "stml")),
                      heartbeat_ms=int(config.get("heartbeat_ms", 1000)),
                      max_transfer=int(limits.get("max_transfer", 8 << 20)),
                      queue_depth=int(limits.get("queue_depth", 128)),
                      portal_groups=config.get("portal_groups") or ())
        em.portals = list(config.get("portals") or [])
        local = config.get("local_portal_groups")
        em.local_tpgs = None if local is None else set(local)
        for name, tags in (config.get("seen_portal_groups") or {}).items():
            em._seen_tpgs[name] = set(tags)
        from_start = bool(first.get("from_start"))
        numbers = [lun["lun"] for t in config.get("targets") or () for lun in t.get("luns") or ()]
        for number in self.lun_data:
            if number not in numbers:
                raise TraceError(f"--lun-data {number}: the trace has no LUN {number} (LUNs: "
                                 f"{', '.join(map(str, sorted(set(numbers)))) or 'none'})")
        fields = set(LunOptions.__dataclass_fields__)
        for t in config.get("targets") or ():
            luns = LunMap()
            for lun in t.get("luns") or ():
                number, size = int(lun["lun"]), int(lun["size"])
                given = self.lun_data.get(number)
                known = given is not None or (from_start and lun.get("kind") == "ram")
                backend = ReplayRam(size, known, self.unknown_reads)
                if given is not None:
                    _load(backend, given, size)
                options = LunOptions(**{k: v for k, v in lun.items() if k in fields})
                lu = LogicalUnit(t["name"], number, backend, options, em.templates["disk"])
                lu.naa, lu.serial = bytes.fromhex(lun["naa"]), lun["serial"]
                luns[number] = lu
            access = {"acl": t.get("acl", []), "chap": None, "mutual": None, "erl": t.get("erl", 0),
                      "cmdsn_depth": t.get("cmdsn_depth")}
            em.targets[t["name"]] = Target(t["name"], luns, t.get("alias", ""), access,
                                           bool(t.get("target_reset")))
        self._restore(em, first.get("state") or {})
        return em

    def _restore(self, em: Any, state: dict[str, Any]) -> None:
        """The LU state the trace began with; the front ends come in run()."""
        from stml import pr
        from stml.lu import ModeState
        for s in state.get("luns") or ():
            lu = em.lookup_lu(s["target"], s["lun"])
            if lu is None:
                continue
            lu.mode = ModeState(**s["mode"])
            lu.started = s.get("started", True)
            lu.medium_present = s.get("medium_present", True)
            lu.prevent.clear()
            for key in s.get("prevent") or ():   # as the engine keeps them: its nexus loss allows
                em.prevent_removal(lu, key, True)
            for key, uas in (s.get("unit_attentions") or {}).items():
                for ua in uas:   # oldest first, as they were queued
                    lu.add_ua(tuple(ua), [key])
                if uas:
                    em._ua_luns.setdefault(key, set()).add(lu)
            if s.get("pr") is not None:
                pr.state(lu).load_json(s["pr"])

    # ------------------------------------------------------------ the run
    def run(self) -> Result:
        loop = self.loop = ReplayLoop()
        try:
            return loop.run_until_complete(self._run())
        finally:
            loop.close()

    async def _run(self) -> Result:
        with TraceReader(self.path) as reader:
            first = reader.first
            em = self.em = self._build(first)
            self._begin(first.get("state") or {})
            t0 = int(first.get("t0", 0))
            for record in reader:
                if isinstance(record, Note):
                    if record.kind == "gap":
                        raise TraceError(f"{self.path}: record {record.index}: {record.fields.get('lost')} "
                                         f"records were lost while recording (the disk fell behind): "
                                         f"replay cannot go past them")
                    if record.kind == "end":
                        self.result.end = str(record.fields.get("why") or record.fields.get("reason"))
                    continue
                if record.direction == FROM_STML:
                    self._recorded_answer(record)
                else:
                    await self._feed(record, t0)
                if self.divergence is not None:
                    raise self.divergence
            self.result.complete = reader.complete
        await self._settle(None)
        if self.divergence is not None:
            raise self.divergence
        self._check_missing(None)
        self.result.unmatched = sum(len(q) for q in self.produced.values())
        em.shutdown()
        return self.result

    def _begin(self, state: dict[str, Any]) -> None:
        """Front ends and nexuses that were there when recording began."""
        em = self.em
        self.setup = True
        for fe in state.get("front_ends") or ():
            peer = fe["peer"]
            em.handle(peer, registration(fe["name"], fe["kind"], fe.get("heartbeat_ms", 1000),
                                         fe.get("aen", False), fe.get("caps") or []), [])
            for n in fe.get("nexuses") or ():
                em.handle(peer, nexus_registration(n["nexus"], n["initiator"], n["target"], n["tpg"]), [])
            self.foreign.update((peer, tag) for tag in fe.get("tasks") or ())
        self.setup = False

    async def _feed(self, m: Message, t0: int) -> None:
        op = m.op
        if op not in FED:
            if op == Op.MGMT.value and m.header.get("cmd") not in READ_ONLY_MGMT:
                self.result.mgmt_changes.append(f"record {m.index}: {m.header.get('cmd')}")
            return
        tag = m.header.get("tag")
        key = (m.peer, tag) if type(tag) is int else None
        if key is not None:
            if op == _RX_CMND or op == _RX_TMF:
                self.foreign.discard(key)
                self.commands[key] = m
                self.unknown_reads.discard(key)
            elif key in self.foreign:
                return   # data for a command that began before the trace
        await self._settle(m.t - t0)
        if self.divergence is not None:
            raise self.divergence
        self._check_missing(m)
        assert self.loop is not None
        self.loop.now = max(self.loop.now, (m.t - t0) / 1e9)
        data = [m.data] if isinstance(m.data, bytes) else []
        if isinstance(m.data, tuple) and m.data[0]:
            raise TraceError(f"{self.path}: record {m.index}: {op} carries only a digest of its data: "
                             f"replay needs the data itself")
        token = _current.set(key if op == _RX_CMND else None)
        try:
            self.em.handle(m.peer, m.header, data)
        finally:
            _current.reset(token)
        self.result.fed += 1

    async def _settle(self, until_ns: int | None) -> None:
        """Run the STML until nothing is ready; while recorded answers are still
        to come and a timer is due before the next message (`until_ns` after
        the trace began; None: any), let the clock reach it."""
        loop = self.loop
        assert loop is not None
        while True:
            timeout = await loop.idle()
            if not self.pending or timeout is None:
                return
            if until_ns is not None and loop.now + timeout > until_ns / 1e9:
                return
            loop.now += timeout

    def _check_missing(self, before: Message | None) -> None:
        """Every answer recorded before `before` (None: all of them) has come."""
        if not self.pending:
            return
        first = min((q[0] for q in self.expected.values() if q), key=lambda r: r.index)
        where = f"before record {before.index} ({before.op})" if before is not None else "by the end of the trace"
        raise Divergence(f"record {first.index}: the STML sent {first.op} {self._naming(first)}; "
                         f"the replayed STML sent nothing {where}", first.index,
                         self._command_of(first), _answer(first.header, first.data), None)

    # ------------------------------------------------------------ matching answers
    @staticmethod
    def _key(peer: bytes, header: dict[str, Any]) -> tuple:
        op = header["op"]
        if op in _BY_TAG:
            return peer, op, header.get("tag")
        if op in _BY_NEXUS:
            return peer, op, header.get("nexus")
        return peer, op

    def _recorded_answer(self, m: Message) -> None:
        if m.op not in COMPARED:
            return
        tag = m.header.get("tag")
        if m.op in _BY_TAG and (m.peer, tag) in self.foreign:
            self.result.skipped += 1
            return
        key = self._key(m.peer, m.header)
        produced = self.produced.get(key)
        if produced:
            header, data = produced.popleft()
            self._compare(m, header, data)
        else:
            self.expected[key].append(m)
            self.pending += 1

    def _output(self, peer: bytes, header: dict[str, Any], frames: list) -> None:
        """A message of the replayed STML (its transport)."""
        if self.setup or header["op"] not in COMPARED:
            return
        data = digest(frames) if frames else None
        key = self._key(peer, header)
        expected = self.expected.get(key)
        if expected:
            self.pending -= 1
            self._compare(expected.popleft(), header, data)
        else:
            self.produced[key].append((header, data))

    def _compare(self, m: Message, header: dict[str, Any], data: Any) -> None:
        want, got = _answer(m.header, m.data), _answer(header, data)
        command = self._command_of(m)
        if m.op == _XMIT:
            tag = m.header.get("tag")
            if (m.peer, tag) in self.unknown_reads:   # read data the trace does not know: its length only
                self.result.data_unknown += 1
                want.pop("data_crc32c")
                got.pop("data_crc32c")
            elif want["data_length"]:
                self.result.data_compared += 1
        self.result.compared += 1
        if want != got and self.divergence is None:
            differ = ", ".join(k for k in want if want[k] != got.get(k))
            self.divergence = Divergence(f"record {m.index}: {m.op} {self._naming(m)} differs ({differ})",
                                         m.index, command, want, got)

    def _command_of(self, m: Message) -> Message | None:
        tag = m.header.get("tag")
        return self.commands.get((m.peer, tag)) if type(tag) is int else None

    @staticmethod
    def _naming(m: Message) -> str:
        if "tag" in m.header:
            return f"for task {m.header['tag']}"
        if "nexus" in m.header:
            return f"for nexus {m.header['nexus']}"
        return ""


def _load(backend: ReplayRam, path: str, size: int) -> None:
    """--lun-data: the file's first `size` bytes as the LUN's content (pages of
    zeros stay unallocated, as in any RAM LUN)."""
    from backends.ram import PAGE
    try:
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                chunk = f.read(min(PAGE, size - offset))
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    RamBackend.write_from(backend, offset, [memoryview(chunk)], False)
                offset += len(chunk)
    except OSError as e:
        raise TraceError(f"--lun-data {path}: {e.strerror or e}") from None

