"""virtio-scsi (virtio 1.x, 5.6) on top of the rings, sans I/O: requests
become contract calls on a `ScsiPort`, and the STML's answers are written
back into the guest's buffers in place.

Queue 0 is the control queue (task management, asynchronous notification
queries), queue 1 the event queue (hot-plug and parameter-change events),
queues 2.. the request queues. Every guest field is untrusted: buffers that
are too short get VIRTIO_SCSI_S_FAILURE (or nothing, when not even the
response byte fits), never an exception out of here."""
from __future__ import annotations

import enum
import importlib
import itertools
import logging
import struct
from typing import Any, Callable, Final, Iterator, Protocol

from stml.api import BIG_FRAME, DataDir, TaskAttr, Tmf, TmfResponse

from fetd_vhost.memory import Runs
from fetd_vhost.virtqueue import Chain, ChainError, RingError, Virtqueue

try:   # the compiled build's C helper (scripts/build-accel): a copy across a chain's pages in one call
    # (by name: `from fetd_vhost import` would be an import of the package, which imports this module)
    _vcopy: Any = importlib.import_module("fetd_vhost._vcopy")
except ImportError:
    _vcopy = None

log = logging.getLogger("fetd_vhost")

CDB_SIZE, SENSE_SIZE = 32, 96          # QEMU's fixed virtio-scsi config (cdb_size, sense_size)
REQ = struct.Struct(f"<8sQBBB{CDB_SIZE}s")        # virtio_scsi_cmd_req: 51 bytes
REQ_SIZE: Final = 51
RESP = struct.Struct("<IIHBB")                      # virtio_scsi_cmd_resp, then the sense
RESP_SIZE: Final = 108                              # RESP.size + SENSE_SIZE
RESP_FULL = struct.Struct(f"<IIHBB{SENSE_SIZE}s")    # with the sense, zero-padded: packed in place
# (written out above so that the compiled build sees constants; checked against the layouts here)
assert REQ_SIZE == REQ.size and RESP_SIZE == RESP.size + SENSE_SIZE == RESP_FULL.size
TMF_REQ = struct.Struct("<II8sQ")                   # virtio_scsi_ctrl_tmf_req
AN_REQ = struct.Struct("<I8sI")                     # virtio_scsi_ctrl_an_req
AN_RESP = struct.Struct("<IB")
EVENT = struct.Struct("<I8sI")                      # virtio_scsi_event
CONTROL_Q, EVENT_Q = 0, 1            # then the request queues
SHARED_MIN = BIG_FRAME    # write data from this size goes through the STML's shared memory
# the enums' values the command path uses, as constants (compiled: no class attribute lookup)
DIR_NONE: Final = int(DataDir.NONE)
DIR_WRITE: Final = int(DataDir.WRITE)
DIR_READ: Final = int(DataDir.READ)
ATTR_ACA: Final = int(TaskAttr.ACA)


class S(enum.IntEnum):
    """virtio-scsi response codes."""
    OK = 0                   # also FUNCTION COMPLETE for task management
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


S_OK: Final = int(S.OK)


class Ctrl(enum.IntEnum):
    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class VTmf(enum.IntEnum):
    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class Event(enum.IntEnum):
    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


EVENTS_MISSED = 0x80000000
RESET_RESCAN, RESET_REMOVED = 1, 2   # TRANSPORT_RESET reasons

# virtio task management -> the contract's TMF, and what its aborted commands report
TMF_FUNCTIONS: dict[int, Tmf] = {
    VTmf.ABORT_TASK: Tmf.ABORT_TASK,
    VTmf.ABORT_TASK_SET: Tmf.ABORT_TASK_SET,
    VTmf.CLEAR_ACA: Tmf.CLEAR_ACA,
    VTmf.CLEAR_TASK_SET: Tmf.CLEAR_TASK_SET,
    VTmf.I_T_NEXUS_RESET: Tmf.I_T_NEXUS_RESET,
    VTmf.LOGICAL_UNIT_RESET: Tmf.LUN_RESET,
    VTmf.QUERY_TASK: Tmf.QUERY_TASK,
    VTmf.QUERY_TASK_SET: Tmf.QUERY_TASK_SET,
}
ABORTED_AS: dict[Tmf, S] = {
    Tmf.LUN_RESET: S.RESET,
    Tmf.I_T_NEXUS_RESET: S.RESET,
}
TMF_RESPONSES: dict[int, S] = {
    TmfResponse.COMPLETE: S.OK,
    TmfResponse.NO_TASK: S.OK,            # SAM: aborting or querying a task that is not there completes
    TmfResponse.SUCCEEDED: S.FUNCTION_SUCCEEDED,
    TmfResponse.NO_LUN: S.INCORRECT_LUN,
    TmfResponse.NOT_SUPPORTED: S.FUNCTION_REJECTED,
    TmfResponse.REJECTED: S.FUNCTION_REJECTED,
}
# CDB length by group code (SPC-4 4.2.5.1); group 3 is the variable-length format
CDB_LENGTHS: Final = (6, 10, 10, 0, 16, 12, 16, 16)


def cdb_length(cdb: bytes) -> int:
    n = CDB_LENGTHS[cdb[0] >> 5]
    return n or min(8 + cdb[7], CDB_SIZE)


def link_cdb(cdb: bytes) -> bytes:
    """The CDB for rx_cmnd: one of up to 16 bytes padded to 16, as iSCSI
    carries it (the STML trims it by its opcode: stml.cdb.trim_cdb), so the
    link packs the header in its fixed layout; a longer one as long as it is."""
    if cdb[0] >> 5 != 3:      # a fixed length (CDB_LENGTHS): at most 16
        return cdb[:16]
    return cdb[:max(cdb_length(cdb), 16)]


def decode_lun(raw: bytes) -> tuple[int, int] | None:
    """(target, LUN) of virtio-scsi's LUN field (1, target, LUN in single-level
    peripheral or flat addressing, zeros), None when it is not that form."""
    if raw[0] != 1 or raw[2] >> 6 > 1:
        return None
    return raw[1], (raw[2] & 0x3F) << 8 | raw[3]


def encode_lun(target: int, lun: int) -> bytes:
    """As REPORT LUNS encodes it (peripheral below 256, flat above): what Linux matches events to."""
    hi = 0x40 | lun >> 8 if lun >= 256 else 0
    return bytes([1, target, hi, lun & 0xFF, 0, 0, 0, 0])


def _find(runs: Runs, offset: int) -> tuple[int, int]:
    """(index in `runs` of the run holding byte `offset`, offset in that
    run); the index is len(runs) past the end."""
    k, n = 0, len(runs)
    while k < n and offset >= runs[k + 2]:
        offset -= runs[k + 2]
        k += 3
    return k, offset


class Buffers:
    """A request's buffers in one direction, as one byte range of `size`
    bytes (the walk summed the descriptors' lengths): runs of guest memory,
    three ints each (region index, offset, length) into `regions`, as the
    walk checked them (decision 0314). Views are made only where one is
    handed on; the copies go through the compiled build's helper, which
    checks every run again, or slice the regions one run at a time."""
    __slots__ = ("runs", "size", "regions")

    def __init__(self, runs: Runs, size: int, regions: list[memoryview]) -> None:
        self.runs = runs
        self.size = size
        self.regions = regions

    def _cut(self, offset: int, n: int) -> Runs:
        """The runs of the bytes [offset, offset + n), clipped to the end:
        the list itself when that is all of it (nothing to step through).
        A negative offset is nothing (never a byte before the buffers)."""
        if n <= 0 or offset < 0 or offset >= self.size:
            return []
        if offset == 0 and n >= self.size:
            return self.runs
        k, skip = _find(self.runs, offset)
        runs = self.runs[k:]
        if skip and runs:
            runs[1] += skip
            runs[2] -= skip
        if n < self.size - offset:      # ends before the last run's end
            k, skip = _find(runs, n)
            if skip:
                del runs[k + 3:]
                runs[k + 2] = skip
            else:
                del runs[k:]
        return runs

    def slices(self, offset: int, n: int) -> list[memoryview]:
        """Views of the bytes [offset, offset + n), clipped to the end."""
        runs, regions = self._cut(offset, n), self.regions
        return [regions[r][off:off + size] for r, off, size in zip(runs[::3], runs[1::3], runs[2::3])]

    def tail(self, offset: int) -> Buffers:
        """The bytes from `offset` on (the data after a request header)."""
        size = self.size - offset
        return Buffers(self._cut(offset, size), size if size > 0 else 0, self.regions)

    def read(self, offset: int, n: int) -> bytes:
        return b"".join(self.slices(offset, n))

    def read_into(self, offset: int, dst: memoryview) -> int:
        """Copy the bytes from `offset` on into `dst`, as many as it holds
        and there are: bytes copied (write data into the STML's memory)."""
        if offset < 0:
            return 0
        if _vcopy is not None:
            return int(_vcopy.gather(dst, self.regions, self.runs, offset))
        runs, regions = self._cut(offset, len(dst)), self.regions
        pos = 0
        for r, off, size in zip(runs[::3], runs[1::3], runs[2::3]):   # (no index arithmetic per run)
            end = pos + size
            dst[pos:end] = regions[r][off:off + size]
            pos = end
        return pos

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Copy `data` (bytes, or a view of bytes) in at `offset`, clipped to
        the buffers: bytes written. Data that fits one run is assigned
        whole; else each run takes one slice of it, or the compiled build's
        helper copies across all of them in one call (decision 0313)."""
        runs, regions = self.runs, self.regions
        n = len(data)
        k, skip = _find(runs, offset)
        if k == len(runs) or offset < 0:
            return 0
        if n <= runs[k + 2] - skip:
            start = runs[k + 1] + skip
            regions[runs[k]][start:start + n] = data
            return n
        if _vcopy is not None:
            return int(_vcopy.scatter(data, regions, runs, offset))
        runs = self._cut(offset, n)
        src = memoryview(data)
        done = 0
        for r, off, size in zip(runs[::3], runs[1::3], runs[2::3]):
            end = done + size
            regions[r][off:off + size] = src[done:end]
            done = end
        return done


class ScsiPort(Protocol):
    """The contract calls a device makes (the front end's STML link)."""

    def rx_cmnd(self, tag: int, lun: int, cdb: bytes, attr: int, direction: int, length: int,
                unsol: int, data: list) -> None: ...
    def rx_data(self, tag: int, offset: int, data: list) -> None: ...
    def rx_tmf(self, tag: int, fn: int, lun: int, ref: int | None) -> None: ...
    def buffer(self, size: int) -> memoryview | None: ...
    def release(self, buf: memoryview) -> None: ...


class Request:
    """A command taken from a ring (plain classes: compiled, a dataclass's
    generated __init__ would run as Python, per command)."""
    __slots__ = ("ring", "head", "data_out", "writable", "lun", "guest_tag", "length")

    def __init__(self, ring: Virtqueue, head: int, data_out: Buffers, writable: Buffers,
                 lun: int, guest_tag: int, length: int) -> None:
        self.ring = ring
        self.head = head
        self.data_out = data_out     # write data (after the request header)
        self.writable = writable     # response, then read data
        self.lun = lun
        self.guest_tag = guest_tag
        self.length = length         # data-in or data-out bytes


class TmfRequest:
    __slots__ = ("ring", "head", "writable", "fn")

    def __init__(self, ring: Virtqueue, head: int, writable: Buffers, fn: Tmf) -> None:
        self.ring = ring
        self.head = head
        self.writable = writable
        self.fn = fn


class VirtioScsiDevice:
    """One guest's virtio-scsi device: one I_T nexus to one target."""

    def __init__(self, port: ScsiPort, target_id: int = 0,
                 on_error: Callable[[str], None] | None = None,
                 tags: Iterator[int] | None = None) -> None:
        self.port = port
        self.target_id = target_id
        self.rings: list[Virtqueue] = []      # the session's, by index
        self.hotplug = self.param_change = False
        self.online = False        # link up and nexus ready: requests may be taken
        self.refused: str | None = None   # the nexus was refused: no LUN is reachable
        self.max_unsol = 8 << 20   # write data sent with the command (the STML's max transfer)
        self.requests: dict[int, Request] = {}
        self.tmfs: dict[int, TmfRequest] = {}
        self.by_guest_tag: dict[tuple[int, int], int] = {}
        self.events_missed = False
        self.to_signal: set[int] = set()
        self.to_process: set[int] = set()   # rings to look at again (see process)
        # the contract's tags are unique in the front end, not per VM: a late answer
        # for a VM that left must not match a request of the next one
        self._tags = tags if tags is not None else itertools.count(1)
        self._stop_waiters: dict[int, Callable[[], None]] = {}
        self._held: set[int] = set()           # rings not taken from: a ring's worth in flight
        self._on_error = on_error or (lambda msg: log.warning("%s", msg))

    # ---------------------------------------------------------------- rings
    def set_features(self, features: int) -> None:
        self.hotplug = bool(features >> 1 & 1)
        self.param_change = bool(features >> 2 & 1)

    def process(self, ring: Virtqueue) -> None:
        """Take what the driver made available on one ring, bounded whatever
        the guest does: at most a ring's worth of chains per call, and no new
        request while a ring's worth of them is in flight (a driver never has
        more: each holds a head; a guest posting one head again and again
        would otherwise grow `requests` and the STML link's queue without
        end). Stopped early, the ring goes into `to_process`: the caller
        looks again once other work had its turn (and an answer that frees a
        place puts a held ring there too)."""
        if ring.index == EVENT_Q:
            if self.events_missed and ring.ready:
                self._deliver_event(Event.NO_EVENT, bytes(8), 0)
            return
        if not self.online or ring.index in self._stop_waiters:
            return
        control = ring.index == CONTROL_Q
        for _ in range(ring.num):
            if not ring.ready:
                return
            if ring.in_flight >= ring.num:
                self._held.add(ring.index)
                return
            try:
                chain = ring.pop()
                if chain is None:
                    if ring.kick_me_after():
                        continue
                    return
            except ChainError as bad:
                self._on_error(str(bad))
                self._refuse_chain(ring, bad.head)
                continue
            except RingError as broken:
                self._on_error(f"{broken}: the queue stops until the guest resets the device")
                return
            if control:
                self._control(ring, chain)
            else:
                self._command(ring, chain)
        if ring.has_work():
            self.to_process.add(ring.index)

    def take_to_process(self) -> list[Virtqueue]:
        """Rings to look at again (process stopped early, or a held ring has room)."""
        if not self.to_process:
            return []
        rings = [self.rings[i] for i in sorted(self.to_process) if i < len(self.rings)]
        self.to_process.clear()
        return rings

    def ring_stopping(self, ring: Virtqueue, done: Callable[[], None]) -> None:
        if ring.in_flight == 0:
            done()
        else:
            ring.stopping = True
            self._stop_waiters[ring.index] = done

    def take_signals(self) -> list[Virtqueue]:
        """Rings whose driver should be interrupted now (event index permitting)."""
        if not self.to_signal:
            return []
        rings = [self.rings[i] for i in self.to_signal if i < len(self.rings)]
        self.to_signal.clear()
        return [r for r in rings if r.needs_signal()]

    @staticmethod
    def _live(ring: Virtqueue) -> bool:
        """May we still write into this ring's buffers? Not once the master
        stopped it and has its index: the guest may have reused them."""
        return ring.ready or ring.stopping

    def _push(self, ring: Virtqueue, head: int, written: int) -> None:
        """Return a request taken from `ring`, answered."""
        if self._live(ring):
            ring.push(head, written)
            self.to_signal.add(ring.index)
        ring.in_flight -= 1
        left = ring.in_flight
        if ring.index in self._held:
            self._held.discard(ring.index)
            self.to_process.add(ring.index)
        if left == 0 and ring.index in self._stop_waiters:
            ring.stopping = False
            self._stop_waiters.pop(ring.index)()

    def _take(self, ring: Virtqueue) -> None:
        ring.in_flight += 1

    def _refuse_chain(self, ring: Virtqueue, head: int) -> None:
        """A chain that broke the rules is returned having written nothing."""
        ring.push(head, 0)
        self.to_signal.add(ring.index)

    # ---------------------------------------------------------------- commands
    def _command(self, ring: Virtqueue, chain: Chain) -> None:
        runs, regions = chain.readable, chain.regions
        out = Buffers(runs, chain.readable_size, regions)
        inb = Buffers(chain.writable, chain.writable_size, regions)
        if out.size < REQ_SIZE or inb.size < RESP_SIZE:
            self._fail_short(ring, chain.head, inb, RESP.size - 1)
            return
        # the header is its own descriptor (Linux): read in place, else gathered
        if runs[2] >= REQ_SIZE:
            raw_lun, guest_tag, attr, _prio, _crn, cdb = REQ.unpack_from(regions[runs[0]], runs[1])
        else:
            raw_lun, guest_tag, attr, _prio, _crn, cdb = REQ.unpack(out.read(0, REQ_SIZE))
        where = decode_lun(raw_lun)
        data_out, data_in = out.size - REQ_SIZE, inb.size - RESP_SIZE
        req = Request(ring, chain.head, out.tail(REQ_SIZE), inb, 0, guest_tag, data_out or data_in)
        self._take(ring)
        if where is None or where[0] != self.target_id or self.refused is not None:
            self._finish(req, S.BAD_TARGET)
            return
        if (data_out and data_in) or attr > ATTR_ACA:
            self._finish(req, S.FAILURE)   # bidirectional commands need VIRTIO_SCSI_F_INOUT
            return
        lun = req.lun = where[1]
        direction = DIR_WRITE if data_out else DIR_READ if data_in else DIR_NONE
        tag = next(self._tags)
        self.requests[tag] = req
        self.by_guest_tag[(lun, guest_tag)] = tag
        unsol = data_out if data_out < self.max_unsol else self.max_unsol
        data, shared = self._gather(req, 0, unsol)
        self.port.rx_cmnd(tag, lun, link_cdb(cdb), attr, direction, req.length, unsol, data)
        if shared is not None:
            self.port.release(shared)   # sent: the STML holds it now, until its command ends

    def _gather(self, req: Request, offset: int, n: int) -> tuple[list, memoryview | None]:
        """Write data for the STML: copied once into its shared memory when
        there is room (returned second: the caller releases it once sent),
        else handed over as views of guest memory."""
        if not n:
            return [], None
        if n >= SHARED_MIN:
            buf = self.port.buffer(n)
            if buf is not None:
                req.data_out.read_into(offset, buf)
                return [buf], buf
        return req.data_out.slices(offset, n), None

    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None:
        req = self.requests.get(tag)
        if req is None:
            return
        if offset < 0 or length < 0 or offset + length > req.data_out.size:
            length = max(0, min(length, req.data_out.size - offset)) if offset >= 0 else 0
        data, shared = self._gather(req, offset, length)
        self.port.rx_data(tag, offset, data)
        if shared is not None:
            self.port.release(shared)

    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int,
                      data: list) -> None:
        req = self.requests.pop(tag, None)
        if req is None:
            return
        self._forget_tag(req, tag)
        written = 0
        writable = req.writable
        if data and writable.size > RESP_SIZE and self._live(req.ring):
            for frame in data:
                written += writable.write(RESP_SIZE + written, frame)
            resid = req.length - written
        elif writable.size > RESP_SIZE:
            resid = req.length       # a read that returned nothing
        self._finish(req, S_OK, status, sense or b"", resid if resid > 0 else 0, written)

    def _finish(self, req: Request, response: int, status: int = 0, sense: bytes = b"",
                resid: int = 0, data: int = 0) -> None:
        sense = sense[:SENSE_SIZE]
        resid = resid if resid < 0xFFFFFFFF else 0xFFFFFFFF
        if self._live(req.ring):
            runs = req.writable.runs
            if runs and runs[2] >= RESP_SIZE:   # the response is its own descriptor (Linux)
                RESP_FULL.pack_into(req.writable.regions[runs[0]], runs[1], len(sense), resid, 0, status,
                                    response, sense)
            else:
                req.writable.write(0, RESP_FULL.pack(len(sense), resid, 0, status, response, sense))
        self._push(req.ring, req.head, RESP_SIZE + data)

    def _fail_short(self, ring: Virtqueue, head: int, inb: Buffers, at: int) -> None:
        """A request whose buffers cannot hold its header or response:
        FAILURE in the response byte at `at` if even that fits, else nothing."""
        written = 0
        if inb.size > at:
            inb.write(at, bytes([S.FAILURE]))
            written = at + 1
        self._take(ring)
        self._push(ring, head, written)

    def _forget_tag(self, req: Request, tag: int) -> None:
        key = (req.lun, req.guest_tag)
        if self.by_guest_tag.get(key) == tag:
            del self.by_guest_tag[key]

    # ---------------------------------------------------------------- control queue
    def _control(self, ring: Virtqueue, chain: Chain) -> None:
        out = Buffers(chain.readable, chain.readable_size, chain.regions)
        inb = Buffers(chain.writable, chain.writable_size, chain.regions)
        if out.size < 4:
            self._fail_short(ring, chain.head, inb, 0)
            return
        kind = struct.unpack("<I", out.read(0, 4))[0]
        if kind == Ctrl.TMF:
            self._tmf(ring, chain, out, inb)
        elif kind in (Ctrl.AN_QUERY, Ctrl.AN_SUBSCRIBE):
            if out.size < AN_REQ.size or inb.size < AN_RESP.size:
                self._fail_short(ring, chain.head, inb, AN_RESP.size - 1)
                return
            # no asynchronous notification class is offered: none are reported
            # (media, power and the rest do not apply to these LUNs)
            self._take(ring)
            raw_lun = AN_REQ.unpack(out.read(0, AN_REQ.size))[1]
            where = decode_lun(raw_lun)
            ok = where is not None and where[0] == self.target_id and self.refused is None
            inb.write(0, AN_RESP.pack(0, S.OK if ok else S.BAD_TARGET))
            self._push(ring, chain.head, AN_RESP.size)
        else:
            self._fail_short(ring, chain.head, inb, 0)

    def _tmf(self, ring: Virtqueue, chain: Chain, out: Buffers, inb: Buffers) -> None:
        if out.size < TMF_REQ.size or inb.size < 1:
            self._fail_short(ring, chain.head, inb, 0)
            return
        _, subtype, raw_lun, guest_tag = TMF_REQ.unpack(out.read(0, TMF_REQ.size))
        self._take(ring)
        where = decode_lun(raw_lun)
        fn = TMF_FUNCTIONS.get(subtype)
        if where is None or where[0] != self.target_id or self.refused is not None:
            answer: S | None = S.BAD_TARGET
        elif fn is None:
            answer = S.FUNCTION_REJECTED
        else:
            answer = None
        ref = None
        if fn in (Tmf.ABORT_TASK, Tmf.QUERY_TASK) and answer is None:
            assert where is not None
            ref = self.by_guest_tag.get((where[1], guest_tag))
            if ref is None:
                answer = S.OK       # no such task here: the function is complete
        if answer is not None or fn is None or where is None:
            inb.write(0, bytes([answer if answer is not None else S.FAILURE]))
            self._push(ring, chain.head, 1)
            return
        tag = next(self._tags)
        self.tmfs[tag] = TmfRequest(ring, chain.head, inb, fn)
        self.port.rx_tmf(tag, int(fn), where[1], ref)

    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int]) -> None:
        tmf = self.tmfs.pop(tag, None)
        aborted_as = ABORTED_AS.get(tmf.fn, S.ABORTED) if tmf else S.ABORTED
        for t in aborted:
            req = self.requests.pop(t, None)
            if req is not None:
                self._forget_tag(req, t)
                self._finish(req, aborted_as, resid=req.length)
        if tmf is not None:
            if self._live(tmf.ring):
                tmf.writable.write(0, bytes([TMF_RESPONSES.get(response, S.FUNCTION_REJECTED)]))
            self._push(tmf.ring, tmf.head, 1)

    def fail_all(self, response: S = S.BUSY) -> None:
        """The STML is gone: every command taken fails with `response` (BUSY:
        Linux retries it), every TMF completes (the tasks it named are gone)."""
        for tag, req in list(self.requests.items()):
            del self.requests[tag]
            self._finish(req, response, resid=req.length)
        self.by_guest_tag.clear()
        for tag, tmf in list(self.tmfs.items()):
            del self.tmfs[tag]
            if self._live(tmf.ring):
                tmf.writable.write(0, bytes([S.OK]))
            self._push(tmf.ring, tmf.head, 1)

    # ---------------------------------------------------------------- events
    def lun_added(self, lun: int) -> None:
        if self.hotplug:
            self._deliver_event(Event.TRANSPORT_RESET, encode_lun(self.target_id, lun), RESET_RESCAN)

    def lun_removed(self, lun: int) -> None:
        if self.hotplug:
            self._deliver_event(Event.TRANSPORT_RESET, encode_lun(self.target_id, lun), RESET_REMOVED)

    def unit_attention(self, lun: int, asc: int, ascq: int) -> None:
        """A unit attention the STML reported: PARAM_CHANGE, when the guest took it."""
        if self.param_change:
            self._deliver_event(Event.PARAM_CHANGE, encode_lun(self.target_id, lun), asc | ascq << 8)

    def _deliver_event(self, event: int, raw_lun: bytes, reason: int) -> None:
        """Into the next event buffer; with none there, the next event says
        EVENTS_MISSED (the guest then rescans everything)."""
        ring = self.rings[EVENT_Q] if len(self.rings) > EVENT_Q else None
        while ring is not None and ring.ready:
            try:
                chain = ring.pop()
            except ChainError as bad:
                self._on_error(str(bad))
                self._refuse_chain(ring, bad.head)
                continue
            except RingError as broken:
                self._on_error(str(broken))
                break
            if chain is None:
                break
            inb = Buffers(chain.writable, chain.writable_size, chain.regions)
            if inb.size < EVENT.size:
                self._refuse_chain(ring, chain.head)
                continue
            flag = EVENTS_MISSED if self.events_missed else 0
            inb.write(0, EVENT.pack(event | flag, raw_lun, reason))
            self.events_missed = False
            ring.push(chain.head, EVENT.size)
            self.to_signal.add(ring.index)
            return
        if event != Event.NO_EVENT:
            self.events_missed = True
