"""The loopback front end as a library: any Python program can open the STML
and issue CDBs to a LUN, with no network in between.

It is a front end like any other: it registers through stml.api, holds one
I_T nexus, and re-registers by itself if the STML restarts. The link runs on
an asyncio loop in a background thread; calls from the program are blocking
(or return futures, to keep several commands in flight).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

from stml.api import DataDir, Detect, FrontEndLink, Status, TaskAttr, Tmf

GOOD, CHECK_CONDITION = int(Status.GOOD), int(Status.CHECK_CONDITION)


class LinkLost(ConnectionError):
    """The STML went away with this command in flight; its outcome is unknown."""


class NexusGone(ConnectionError):
    """The STML ended this client's nexus (its target or ACL entry went away,
    or it refused the nexus when the link registered it again after a
    restart): no command can reach the LUNs any more, so none is retried."""


class NexusRefused(LookupError):
    """The STML refused this client's nexus when it opened. Detect had named
    the target, so the reason is its ACL, which does not list our initiator
    name (or the target went away in between): the message says which."""


class TaskAborted(Exception):
    """The command was aborted by task management and has no status."""


class ScsiError(Exception):
    """A command ended with a status other than GOOD."""

    def __init__(self, result: ScsiResult) -> None:
        super().__init__(result.describe())
        self.result = result


@dataclass(frozen=True, slots=True)
class ScsiResult:
    status: int
    sense: bytes | None
    data: bytes
    resid: int

    @property
    def sense_key(self) -> int | None:
        return _sense_fields(self.sense)[0] if self.sense else None

    @property
    def asc_ascq(self) -> tuple[int, int] | None:
        return _sense_fields(self.sense)[1:] if self.sense else None

    def describe(self) -> str:
        if self.status == GOOD:
            return "GOOD"
        if self.sense:
            key, asc, ascq = _sense_fields(self.sense)
            return f"status 0x{self.status:02x} sense key 0x{key:x} asc/ascq 0x{asc:02x}/0x{ascq:02x}"
        return f"status 0x{self.status:02x}"

    def check(self) -> ScsiResult:
        if self.status != GOOD:
            raise ScsiError(self)
        return self


def _sense_fields(sense: bytes) -> tuple[int, int, int]:
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0xF, sense[2], sense[3]
    return sense[2] & 0xF, sense[12], sense[13]


class _Pending:
    __slots__ = ("future", "data_out")

    def __init__(self, data_out: memoryview) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.data_out = data_out


class LoopbackClient:
    """One initiator port on one target of an STML."""

    def __init__(self, endpoint: str, target: str | None = None, initiator: str | None = None,
                 timeout: float = 30.0, heartbeat_ms: int = 1000) -> None:
        self.endpoint = endpoint
        self.target_name = target
        self.initiator = initiator or f"loopback.{os.uname().nodename}.{os.getpid()}.{id(self):x}"
        self.timeout = timeout
        self.heartbeat_ms = heartbeat_ms
        self.info: Detect | None = None
        self._tags = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._tmfs: dict[int, concurrent.futures.Future] = {}
        self._nexus_ready: concurrent.futures.Future | None = None
        self._gone: str | None = None      # why the STML ended the nexus (NexusGone)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loopback-link", daemon=True)
        self._link: FrontEndLink | None = None
        self._waiting: set[asyncio.Task] = set()   # commands waiting for the link (close() ends them)
        self._closed = False   # close() began: a command submitted now fails at once

    # ---------------------------------------------------------------- life
    def open(self) -> LoopbackClient:
        self._thread.start()
        try:
            self.info = self._call(self._open(), self.timeout)
        except BaseException:
            self.close()
            raise
        return self

    async def _open(self) -> Detect:
        self._link = FrontEndLink(self.endpoint, "loopback", self, heartbeat_ms=self.heartbeat_ms)
        self._link.start()
        detect = await self._link.wait_ready(self.timeout)
        if self.target_name is None:
            if not detect.targets:
                raise LookupError("the STML has no targets")
            self.target_name = detect.targets[0].name
        elif detect.target(self.target_name) is None:
            raise LookupError(f"the STML has no target {self.target_name}")
        self._nexus_ready = concurrent.futures.Future()
        self._link.register_nexus(1, self.initiator, self.target_name, 1)
        await asyncio.wrap_future(self._nexus_ready)
        return detect

    def close(self) -> None:
        self._closed = True
        if self._thread.is_alive():
            if self._link is not None:
                self._call(self._closing(), 5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    async def _closing(self) -> None:
        """Commands still waiting for the link, or in flight, fail with
        LinkLost now: nobody would answer them after close()."""
        for task in self._waiting:
            task.cancel()
        await asyncio.gather(*self._waiting, return_exceptions=True)
        assert self._link is not None   # (close() asks only then)
        await self._link.close()
        self._fail_all("the client was closed with this command unanswered")   # (none starts after _closed)

    def __enter__(self) -> LoopbackClient:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def luns(self) -> list[int]:
        t = self.info.target(self.target_name) if self.info and self.target_name is not None else None
        return [lun.lun for lun in t.luns] if t else []

    # ---------------------------------------------------------------- commands
    def submit(self, lun: int, cdb: bytes, data_out: bytes | memoryview = b"", data_in: int = 0,
               attr: TaskAttr = TaskAttr.SIMPLE) -> concurrent.futures.Future:
        """Queue a command; the future gives its ScsiResult."""
        tag = next(self._tags)
        pending = _Pending(memoryview(data_out))
        self._pending[tag] = pending
        direction = (DataDir.WRITE if len(data_out) else 0) | (DataDir.READ if data_in else 0)
        length = len(data_out) or data_in
        try:
            self._loop.call_soon_threadsafe(self._send_cmd, tag, lun, bytes(cdb), int(attr),
                                            int(direction), length)
        except RuntimeError:   # (the loop is closed: close() ended)
            self._fail(tag, LinkLost("the client is closed"))
        return pending.future

    def _send_cmd(self, tag: int, lun: int, cdb: bytes, attr: int, direction: int, length: int) -> None:
        if self._closed:
            self._fail(tag, LinkLost("the client is closed"))
            return
        link = self._link
        if self._gone is None and link is not None and link.connected.is_set():
            link.rx_cmnd(tag, 1, lun, cdb, attr, direction, length)   # (the usual case: no task)
            return
        task = asyncio.ensure_future(self._send_when_linked(tag, lun, cdb, attr, direction, length))
        if not task.done():
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)

    async def _send_when_linked(self, tag: int, lun: int, cdb: bytes, attr: int, direction: int,
                                length: int) -> None:
        link = self._link
        assert link is not None   # commands are sent once open() made the link
        if self._gone is not None:
            self._fail(tag, NexusGone(self._gone))
            return
        if not link.connected.is_set():
            try:
                await asyncio.wait_for(link.connected.wait(), self.timeout)
            except TimeoutError:
                self._fail(tag, LinkLost(f"no STML at {self.endpoint}"))
                return
        link.rx_cmnd(tag, 1, lun, cdb, attr, direction, length)

    def _fail(self, tag: int, exc: Exception) -> None:
        pending = self._pending.pop(tag, None)
        if pending and not pending.future.done():
            pending.future.set_exception(exc)

    def execute(self, lun: int, cdb: bytes, data_out: bytes | memoryview = b"", data_in: int = 0,
                attr: TaskAttr = TaskAttr.SIMPLE, retries: int = 0) -> ScsiResult:
        """Run one command and wait for it. `retries` re-sends it when the STML
        went away mid-command (only for commands that are safe to repeat)."""
        while True:
            try:
                return self.submit(lun, cdb, data_out, data_in, attr).result(self.timeout)
            except LinkLost:
                if retries <= 0:
                    raise
                retries -= 1

    def task_mgmt(self, fn: Tmf, lun: int = 0, ref: int | None = None) -> int:
        tag = next(self._tags)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._tmfs[tag] = fut
        assert self._link is not None   # as in _send_when_linked
        self._loop.call_soon_threadsafe(self._link.rx_task_mgmt_fn, tag, 1, int(fn), lun, ref)
        return fut.result(self.timeout)

    # ---------------------------------------------------------------- STML calls (link thread)
    def detect(self, detect: Detect) -> None:
        self.info = detect

    def nexus_ready(self, nexus: int, error: str | None) -> None:
        fut = self._nexus_ready
        if fut is not None and not fut.done():
            if error:
                fut.set_exception(NexusRefused(error))
            else:
                fut.set_result(None)
        elif error:   # registered again by the link after a restart, and refused
            self._end_nexus(f"the STML refused the nexus again: {error}")

    def drop_nexus(self, nexus: int, reason: str) -> None:
        self._end_nexus(f"the STML dropped the nexus: {reason}")

    def _end_nexus(self, why: str) -> None:
        """Commands on a nexus the STML no longer has would each come back
        LOGICAL UNIT COMMUNICATION FAILURE, forever: fail them, and every
        later one, with the reason instead."""
        self._gone = why
        for tag in list(self._pending):
            self._fail(tag, NexusGone(why))

    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None:
        pending = self._pending.get(tag)
        if pending is not None:
            assert self._link is not None   # the link asks for the data
            self._link.scsi_rx_data(tag, offset, [pending.data_out[offset:offset + length]])

    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int, data: list) -> None:
        pending = self._pending.pop(tag, None)
        if pending is not None:   # copied out: the data is not used after this
            payload = bytes(data[0]) if len(data) == 1 else b"".join(data)
            pending.future.set_result(ScsiResult(status, sense, payload, resid))
        assert self._link is not None   # responses come over the link
        self._link.scsi_target_done([tag])

    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int], info: bytes = b"") -> None:
        for t in aborted:
            self._fail(t, TaskAborted(f"task {t} aborted by task management"))
        fut = self._tmfs.pop(tag, None)
        if fut is not None:
            fut.set_result(response)

    def report_aen(self, nexus: int | None, lun: int, sense: bytes) -> None:
        pass  # unit attentions also arrive as CHECK CONDITION on the next command

    def link_lost(self) -> None:
        self._fail_all("the STML went away with this command in flight")

    def _fail_all(self, why: str) -> None:
        """Every command and task management function unanswered fails with
        LinkLost(why): nobody will answer them."""
        for tag in list(self._pending):
            self._fail(tag, LinkLost(why))
        tmfs, self._tmfs = self._tmfs, {}
        for fut in tmfs.values():
            if not fut.done():
                fut.set_exception(LinkLost(why))

    # ---------------------------------------------------------------- helpers
    def _retry_ua(self, lun: int, cdb: bytes, data_out: bytes | memoryview = b"",
                  data_in: int = 0) -> ScsiResult:
        """Run a command, consuming unit attentions the way OS initiators do."""
        for _ in range(8):
            r = self.execute(lun, cdb, data_out, data_in, retries=1)
            if r.status == CHECK_CONDITION and r.sense_key == 0x6:
                continue
            return r.check()
        return r.check()

    def inquiry(self, lun: int = 0, page: int | None = None, alloc: int = 255) -> bytes:
        cdb = bytes([0x12, 0 if page is None else 1, page or 0]) + struct.pack(">H", alloc) + b"\0"
        return self._retry_ua(lun, cdb, data_in=alloc).data

    def capacity(self, lun: int = 0) -> tuple[int, int]:
        """(number of blocks, block size)."""
        cdb = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0"
        data = self._retry_ua(lun, cdb, data_in=32).data
        last, bs = struct.unpack_from(">QI", data)
        return last + 1, bs

    def read(self, lun: int, lba: int, blocks: int, block_size: int = 512) -> bytes:
        cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)
        return self._retry_ua(lun, cdb, data_in=blocks * block_size).data

    def write(self, lun: int, lba: int, data: bytes | memoryview, block_size: int = 512,
              fua: bool = False) -> None:
        cdb = struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, len(data) // block_size, 0, 0)
        self._retry_ua(lun, cdb, data_out=data)

    def synchronize_cache(self, lun: int = 0) -> None:
        self._retry_ua(lun, bytes([0x91]) + bytes(15))
