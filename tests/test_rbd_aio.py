"""The RBD backend's lifetimes, against a fake librbd (no Ceph): a buffer
stays pinned while librbd may still touch it, whatever ends the command's
wait (an abort, a step down, the image closing); closing waits for the
calls under way; a fenced call tells the gateway at once, from any thread.

librbd's timing cannot be forced, so the fake takes its place behind
backends.rbd's Client and Image: the test says when a call completes and
what rbd_close does (what the real library does: end every call first).
The same paths against a real cluster are in test_rbd.py.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from backends import rbd as R
from backends.librbd import EBLOCKLISTED, FEATURE_EXCLUSIVE_LOCK, CephError, hold


def until(cond: Any) -> None:
    """Wait for another thread to get somewhere (a guard against a hang, not a timing)."""
    for _ in range(3000):
        if cond():
            return
        threading.Event().wait(0.01)
    raise AssertionError("never happened")


def pinned(buf: bytearray) -> bool:
    """Whether something holds the buffer's memory (a resize is refused then)."""
    try:
        buf.append(0)
    except BufferError:
        return True
    buf.pop()
    return False


class FakeImage:
    """librbd's side: aio calls stay in flight until complete() (which, for a
    read, writes into the caller's buffer as librbd does); close() ends every
    call still in flight first, as rbd_close does, and records whether their
    buffers were still pinned when librbd wrote into them."""

    def __init__(self, ioctx: Any, name: str) -> None:
        self.fd = -1
        self.ids = itertools.count(1000)
        self.flying: dict[int, tuple[str, tuple]] = {}
        self.done: list[tuple[int, int]] = []          # completed, not yet polled
        self.finished: dict[int, int] = {}             # completed, never polled (the image closed)
        self.events: list[str] = []
        self.watch: Any = None
        self.on_close: Any = None
        self.sync_gate: threading.Event | None = None  # a synchronous read waits for it

    # what RbdBackend._open asks
    def size(self) -> int:
        return 1 << 20

    def object_size(self) -> int:
        return 4 << 20

    def image_id(self) -> str:
        return "fake"

    def features(self) -> int:
        return FEATURE_EXCLUSIVE_LOCK

    def watch_updates(self, cb: Any) -> None:
        self.watch = cb

    # synchronous calls
    def read(self, offset: int, buf: Any) -> None:
        self.events.append("read begins")
        if self.sync_gate is not None:
            self.sync_gate.wait(30)
        self.events.append("read ends")

    def compare_and_write(self, offset: int, compare: bytes, data: bytes) -> int | None:
        raise CephError(EBLOCKLISTED, "rbd_compare_and_write: Cannot send after transport endpoint shutdown")

    # aio
    def enable_events(self, fd: int) -> None:
        self.fd = fd   # the caller's: librbd only signals it

    def start(self, name: str, args: tuple, flags: tuple, entry: Any, pending: dict) -> None:
        assert "closed" not in self.events, "a call reached a closed image"
        comp = next(self.ids)
        pending[comp] = entry
        self.flying[comp] = (name, args)

    def start_buffer(self, name: str, offset: int, buf: Any, writable: bool, fut: Any, pending: dict) -> None:
        """What Image.start_buffer does without the compiled build's C helper."""
        pin, ptr, n = hold(buf, writable)
        self.start(name, (offset, n, ptr), (), (fut, pin, n if writable else 0), pending)

    def complete(self, comp: int, data: bytes = b"") -> None:
        """librbd ends a call: a read's data lands in its buffer, then the eventfd."""
        name, args = self.flying.pop(comp)
        ret = 0
        if name == "read":
            _, n, addr = args
            ctypes.memmove(addr, data, n)
            ret = n
        if self.fd >= 0 and "closed" not in self.events:
            self.done.append((comp, ret))
            os.eventfd_write(self.fd, 1)
        else:
            self.finished[comp] = ret

    def poll(self) -> list[tuple[int, int]]:
        assert "closed" not in self.events, "a closed image was polled"
        try:   # (as Image.poll: the eventfd first)
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        out, self.done = self.done, []
        return out

    def outcome(self, comp: int) -> int | None:
        return self.finished.pop(comp, None)

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()
        self.events.append("closed")
        for comp in list(self.flying):
            self.complete(comp, b"L" * 4096)
        self.finished.update(self.done)   # completed but never polled: rbd_close leaves them
        self.done = []
        self.fd = -1   # librbd lets go of it (the caller closes it)


class FakeClient:
    def __init__(self, *conf: Any) -> None:
        pass

    def ioctx(self, pool: str, namespace: str = "") -> Any:
        return SimpleNamespace(pool_id=lambda: 1, destroy=lambda: None)

    def fsid(self) -> str:
        return "00000000-0000-0000-0000-000000000000"

    def address(self) -> str:
        return "127.0.0.1:0/1"

    def shutdown(self) -> None:
        pass


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setattr(R, "Client", FakeClient)
    monkeypatch.setattr(R, "Image", FakeImage)
    b = R.RbdBackend("rbd/fake")
    yield b
    b.close()


def test_closing_the_image_leaves_a_read_in_flight_its_buffer_until_librbd_ends_it(backend):
    """A LUN closes with a read in flight: librbd (rbd_close) writes the data
    into the buffer while it is still pinned, and only then does the read's
    future end, with what librbd said. It was unpinned and failed at once,
    before rbd_close, which then wrote into memory the STML had let go."""
    image: FakeImage = backend.image
    buf = bytearray(4096)
    at_close: list[bool] = []
    image.on_close = lambda: at_close.append(pinned(buf))

    async def run() -> None:
        fut = backend.aio.read_into(0, memoryview(buf))
        assert pinned(buf) and not fut.done()
        await asyncio.get_running_loop().run_in_executor(None, backend.close)
        await asyncio.sleep(0)    # the outcome reaches the loop
        assert fut.done() and fut.exception() is None
    asyncio.run(run())
    assert at_close == [True], "the buffer was let go before rbd_close ended the read"
    assert bytes(buf) == b"L" * 4096 and not pinned(buf)


def test_an_aborted_read_keeps_its_buffer_until_librbd_completes_it(backend):
    """The task waiting for a read is cancelled (an abort): the buffer stays
    pinned until librbd completes the call, then goes."""
    image: FakeImage = backend.image
    buf = bytearray(4096)

    async def run() -> None:
        fut = backend.aio.read_into(0, memoryview(buf))
        fut.cancel()
        await asyncio.sleep(0)
        assert pinned(buf)
        (comp,) = image.flying
        image.complete(comp, b"D" * 4096)
        while pinned(buf):        # the eventfd wakes the loop's collector
            await asyncio.sleep(0.01)
    asyncio.run(asyncio.wait_for(run(), 30))
    assert bytes(buf) == b"D" * 4096


def test_an_aborted_command_waits_for_librbd_to_end_its_write(backend):
    """A command's task is cancelled (an abort) while librbd has its write:
    Task.io_on awaits the aio future alone (no shield), and the task ends,
    CancelledError, only once librbd completed the call, so no write lands
    after the abort is reported. An aio future refuses cancel()."""
    from stml.task import Task
    image: FakeImage = backend.image
    buf = bytearray(4096)
    task = SimpleNamespace(services=SimpleNamespace(workers=None))
    lu = SimpleNamespace(backend=backend)

    async def run() -> None:
        cmd = asyncio.ensure_future(Task.io_on(task, lu, backend.write_from, 0, [memoryview(buf)], False))
        while not image.flying:
            await asyncio.sleep(0)
        (comp,) = image.flying
        cmd.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not cmd.done() and pinned(buf), "the abort ended the wait before librbd ended the write"
        assert not backend.aio._pending[comp][0].cancel()
        image.complete(comp)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(cmd, 30)
    asyncio.run(run())
    assert not pinned(buf) and not backend.aio._pending


class CountingLock:
    """A lock (or condition) that counts how often it is taken."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.taken = inner, 0

    def __enter__(self) -> Any:
        self.taken += 1
        return self.inner.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)

    def acquire(self, *args: Any) -> Any:
        self.taken += 1
        return self.inner.acquire(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_sixteen_reads_cost_one_lock_each_and_one_collection_for_all(backend):
    """Work per aio command (0408), counted: starting one takes RbdAio's lock
    once and never the backend's gate (it took the gate's condition twice,
    through a generator context manager); sixteen completions signalled
    together are taken in one eventfd wake-up: one lock, one poll."""
    image: FakeImage = backend.image
    polls = []
    real_poll = image.poll
    image.poll = lambda: polls.append(1) or real_poll()   # type: ignore[method-assign]
    bufs = [bytearray(4096) for _ in range(16)]

    async def run() -> None:
        backend.aio.read_into(0, memoryview(bytearray(512)))   # attaches the eventfd
        (first,) = image.flying
        image.complete(first, bytes(512))
        while backend.aio._pending:
            await asyncio.sleep(0)
        polls.clear()
        gate, lock = CountingLock(backend._gate), CountingLock(backend.aio._lock)
        backend._gate, backend.aio._lock = gate, lock   # type: ignore[assignment]
        futs = [backend.aio.read_into(i * 4096, memoryview(b)) for i, b in enumerate(bufs)]
        assert (gate.taken, lock.taken) == (0, 16)
        for comp in list(image.flying):
            image.complete(comp, b"R" * 4096)
        await asyncio.wait_for(asyncio.gather(*futs), 30)
        assert (gate.taken, lock.taken, len(polls)) == (0, 17, 1)
    asyncio.run(run())
    assert all(bytes(b) == b"R" * 4096 and not pinned(b) for b in bufs)


def test_task_io_hands_back_the_aio_calls_future_itself(backend):
    """Task.io of a call with an aio twin returns the twin's AioFuture as it
    is: a command awaits its RBD call with no coroutine of Task.io or
    Task.io_on between them (0421), and gets librbd's data."""
    from backends import AioFuture
    from stml.task import Task
    task = SimpleNamespace(lu=SimpleNamespace(backend=backend))
    buf = bytearray(512)

    async def run() -> None:
        fut = Task.io(task, backend.read_into, 0, memoryview(buf))   # type: ignore[arg-type]
        assert type(fut) is AioFuture
        (comp,) = backend.image.flying
        backend.image.complete(comp, b"T" * 512)
        await asyncio.wait_for(fut, 30)
    asyncio.run(run())
    assert buf == b"T" * 512 and not pinned(buf)


def test_task_read_into_starts_the_aio_read_itself_and_falls_back_to_io_on(backend):
    """READ's Task.read_into calls the aio twin's read_into by name (0424):
    it returns that call's AioFuture as it is, with librbd's data; a backend
    without a twin, or one that runs in place, goes through io_on with its
    own read_into, as Task.io does."""
    from backends import AioFuture
    from stml.task import Task
    task = SimpleNamespace(lu=SimpleNamespace(backend=backend))
    buf = bytearray(512)

    async def run() -> None:
        fut = Task.read_into(task, 512, memoryview(buf))   # type: ignore[arg-type]
        assert type(fut) is AioFuture
        ((comp, (name, args)),) = backend.image.flying.items()
        assert (name, args[0]) == ("read", 512)
        backend.image.complete(comp, b"R" * 512)
        await asyncio.wait_for(fut, 30)
    asyncio.run(run())
    assert buf == b"R" * 512 and not pinned(buf)
    calls: list = []
    for aio, inline in ((None, False), (backend.aio, True)):
        plain = SimpleNamespace(aio=aio, inline=inline, read_into=lambda offset, view: None)
        lu = SimpleNamespace(backend=plain)
        other = SimpleNamespace(lu=lu, io_on=lambda *a: calls.append(a) or "io_on's")
        assert Task.read_into(other, 4096, memoryview(buf)) == "io_on's"   # type: ignore[arg-type]
        assert calls.pop() == (lu, plain.read_into, 4096, memoryview(buf))
    assert not backend.image.flying


def test_standing_down_leaves_calls_in_flight_to_librbd(backend):
    """A gateway that stands down (fenced) releases its front ends and lets its
    locks go; a read librbd still has keeps its buffer and ends when librbd
    ends it. step_down failed it and unpinned its buffer at once."""
    from stml.gateway import ACTIVE, Gateway
    lu = SimpleNamespace(backend=backend, target="t", lun=0)
    em = SimpleNamespace(targets={"t": SimpleNamespace(luns={0: lu})}, front_ends={}, standby=None,
                         configured_tpgs=set(), local_tpgs=None)
    image: FakeImage = backend.image
    buf = bytearray(4096)

    async def run() -> None:
        gw = Gateway(em, None)   # type: ignore[arg-type]
        gw.role = ACTIVE
        fut = backend.aio.read_into(0, memoryview(buf))
        gw.step_down("fenced on image rbd/fake")
        assert em.standby is not None
        assert not fut.done() and pinned(buf)
        (comp,) = image.flying
        image.complete(comp, b"S" * 4096)
        await asyncio.wait_for(asyncio.shield(fut), 30)
    asyncio.run(run())
    assert bytes(buf) == b"S" * 4096 and not pinned(buf)


def test_close_waits_for_a_synchronous_call_and_refuses_new_ones(backend):
    """close() while a worker thread is inside a librbd call: rbd_close waits
    for that call, and calls made meanwhile are refused (ESHUTDOWN), never
    made on a closing image."""
    image: FakeImage = backend.image
    image.sync_gate = threading.Event()
    reader = threading.Thread(target=backend.read_into, args=(0, memoryview(bytearray(512))))
    reader.start()
    until(lambda: "read begins" in image.events)
    closer = threading.Thread(target=backend.close)
    closer.start()
    refused = None
    while refused is None and "closed" not in image.events:   # until close() has begun
        try:
            backend.refresh_size()
        except R.RbdError as e:
            refused = e
    assert image.events == ["read begins"], "the image closed under a call"
    assert refused is not None and refused.errno == errno.ESHUTDOWN
    image.sync_gate.set()
    reader.join(30)
    closer.join(30)
    assert image.events == ["read begins", "read ends", "closed"]


def test_a_fenced_synchronous_call_tells_the_gateway_once_and_is_eshutdown(backend):
    """COMPARE AND WRITE runs in a worker thread: the cluster refusing it
    (blocklisted) tells on_fenced at once (it only set a flag: the gateway
    learnt up to a second later), once, and the error carries ESHUTDOWN,
    which the STML answers with a path error, not MEDIUM ERROR."""
    told: list[str] = []
    backend.on_fenced = lambda: told.append(threading.current_thread().name)

    def caw() -> R.RbdError:
        with pytest.raises(R.RbdError) as e:
            backend.compare_and_write(0, bytes(512), bytes(512), False)
        return e.value
    errors = []
    for _ in range(2):
        t = threading.Thread(target=lambda: errors.append(caw()), name="worker")
        t.start()
        t.join(30)
    assert told == ["worker"] and backend.fenced
    assert [e.errno for e in errors] == [errno.ESHUTDOWN, errno.ESHUTDOWN]


def test_closing_in_a_worker_while_the_loop_waits_for_that_worker_does_not_hang(backend):
    """An STML that stops waits on its loop for its worker threads
    (executor.shutdown); a worker closing an image meanwhile (a LUN being
    removed, a fenced client reopened) must not wait for the loop in turn.
    Detaching used to run on the loop and wait for it: the stop hung."""
    buf = bytearray(4096)

    async def run() -> None:
        fut = backend.aio.read_into(0, memoryview(buf))
        closer = threading.Thread(target=backend.close)
        closer.start()
        closer.join(30)   # the loop is held here, as executor.shutdown(wait=True) holds it
        assert not closer.is_alive(), "close waited for the loop that waited for it"
        await asyncio.wait_for(asyncio.shield(fut), 30)
    asyncio.run(run())
    assert bytes(buf) == b"L" * 4096 and not pinned(buf)


def test_a_fenced_compare_and_write_stands_the_gateway_down_before_it_answers(backend):
    """COMPARE AND WRITE (in a worker thread) is refused by the cluster
    (blocklisted): the active gateway stands down at once - its front end is
    released, the command goes with it unanswered (the step down is posted
    before the call's outcome) - and no MEDIUM ERROR goes out. The command
    answered MEDIUM ERROR, and the gateway stood down only at its next lock
    check."""
    import struct
    from concurrent.futures import ThreadPoolExecutor
    from stml.api import Op
    from stml.emulator import Emulator, Target
    from stml.gateway import ACTIVE, STANDBY, Gateway
    from stml.lu import LogicalUnit, LunOptions
    t = "iqn.2026-11.org.test:t"
    sent: list[dict] = []
    lu = LogicalUnit(t, 0, backend, LunOptions(kind="ram", size=1 << 20), None)
    executor = ThreadPoolExecutor(2)
    em = Emulator([Target(t, {0: lu})], lambda ident, h, f: sent.append(h), executor)
    lu.template = em.templates["disk"]
    block = bytes(512)
    cdb = struct.pack(">BBQBBBBBB", 0x89, 0, 8, 0, 0, 0, 1, 0, 0)

    async def run() -> Gateway:
        gw = Gateway(em, executor)
        gw.watch(lu)
        gw.role = ACTIVE
        em.handle(b"fe", {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": "t",
                          "heartbeat_ms": 1000, "aen": False}, [])
        em.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": 1, "initiator": "iqn.2026-11.org.test:i",
                          "target": t, "tpg": 1}, [])
        em.handle(b"fe", {"op": Op.RX_CMND, "tag": 7, "nexus": 1, "lun": 0, "cdb": cdb, "attr": 0,
                          "dir": 1, "len": 1024, "unsol": 1024}, [block + block])
        for _ in range(3000):   # a guard against a hang, not a timing
            if not lu.task_set.tasks:
                break
            await asyncio.sleep(0.01)
        return gw
    gw = asyncio.run(run())
    answers = [h for h in sent if h["op"] == Op.XMIT_RESPONSE and h["tag"] == 7]
    assert gw.role == STANDBY and [h["op"] for h in sent if h["op"] == Op.RELEASE] == [Op.RELEASE]
    assert answers == [], "the command goes with its front end, unanswered (no MEDIUM ERROR)"


def _emulator(backend: Any) -> tuple[Any, list[tuple[dict, list]]]:
    """An Emulator with the backend as LUN 0 of one target; what it sends is kept."""
    from concurrent.futures import ThreadPoolExecutor
    from stml.emulator import Emulator, Target
    from stml.lu import LogicalUnit, LunOptions
    t = "iqn.2026-11.org.test:t"
    sent: list[tuple[dict, list]] = []
    lu = LogicalUnit(t, 0, backend, LunOptions(kind="ram", size=1 << 20), None)
    em = Emulator([Target(t, {0: lu})], lambda ident, h, f: sent.append((h, list(f))), ThreadPoolExecutor(1))
    lu.template = em.templates["disk"]
    return em, sent


def _connect(em: Any) -> None:
    from stml.api import Op
    em.handle(b"fe", {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": "t",
                      "heartbeat_ms": 1000, "aen": False}, [])
    em.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": 1, "initiator": "iqn.2026-11.org.test:i",
                      "target": next(iter(em.targets)), "tpg": 1}, [])


def _rw10(opcode: int, lba: int, blocks: int) -> bytes:
    return bytes([opcode, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def test_a_command_waiting_for_librbd_has_no_asyncio_task_and_ends_with_its_completion(backend):
    """A READ whose aio call librbd has is parked on the call's future: no
    asyncio Task exists for it while it waits (0418), and the collection of
    the completion sends its response with the data librbd read."""
    from stml.api import Op
    image: FakeImage = backend.image
    em, sent = _emulator(backend)
    others: list[set] = []

    async def run() -> None:
        _connect(em)
        em.handle(b"fe", {"op": Op.RX_CMND, "tag": 7, "nexus": 1, "lun": 0, "cdb": _rw10(0x28, 8, 8),
                          "attr": 0, "dir": 2, "len": 4096, "unsol": 0}, [])
        (comp,) = image.flying
        others.append(asyncio.all_tasks() - {asyncio.current_task()})
        image.complete(comp, b"D" * 4096)
        for _ in range(3000):   # the eventfd wakes the collector (a guard against a hang, not a timing)
            if any(h["op"] == Op.XMIT_RESPONSE for h, _ in sent):
                break
            await asyncio.sleep(0.01)
    asyncio.run(run())
    assert others == [set()], "a Task for a command parked on librbd"
    ((h, frames),) = [(h, f) for h, f in sent if h["op"] == Op.XMIT_RESPONSE]
    assert (h["tag"], h["status"]) == (7, 0) and b"".join(bytes(f) for f in frames) == b"D" * 4096
    assert not backend.aio._pending


def test_an_aborted_command_parked_on_librbd_ends_after_its_write(backend):
    """ABORT TASK for a WRITE parked on its aio call (no Task yet): the abort
    gives it a Task, whose cancellation waits for librbd to end the write, so
    the TMF is answered only after the write ended, and the command sends no
    status (aborted by its own nexus). A cancellation before a Task's first
    step went into the command at once, while librbd still had the write."""
    from stml.api import Op, Tmf, TmfResponse
    image: FakeImage = backend.image
    em, sent = _emulator(backend)

    async def run() -> None:
        _connect(em)
        em.handle(b"fe", {"op": Op.RX_CMND, "tag": 7, "nexus": 1, "lun": 0, "cdb": _rw10(0x2A, 8, 8),
                          "attr": 0, "dir": 1, "len": 4096, "unsol": 4096}, [bytes(4096)])
        (comp,) = image.flying
        em.handle(b"fe", {"op": Op.RX_TMF, "tag": 8, "nexus": 1, "fn": int(Tmf.ABORT_TASK), "lun": 0,
                          "ref": 7}, [])
        for _ in range(20):
            await asyncio.sleep(0)
        assert not [h for h, _ in sent if h["op"] == Op.TMF_DONE], "the abort was answered while librbd had the write"
        assert comp in backend.aio._pending
        image.complete(comp)
        for _ in range(3000):   # a guard against a hang, not a timing
            if any(h["op"] == Op.TMF_DONE for h, _ in sent):
                break
            await asyncio.sleep(0.01)
    asyncio.run(run())
    ((done, _),) = [(h, f) for h, f in sent if h["op"] == Op.TMF_DONE]
    assert (done["tag"], done["response"], done["aborted"]) == (8, TmfResponse.COMPLETE, [7])
    assert not [h for h, _ in sent if h["op"] == Op.XMIT_RESPONSE]
    assert not backend.aio._pending


def test_a_timed_command_stamps_its_rbd_call_while_librbd_has_it(backend):
    """With stage timing on, an RBD READ's backend stage begins when its aio
    call starts and ends with its completion: Task.io's bare future (0421)
    must not bypass the stamps (they used to be filled in only when the
    handler ended, so the RBD backend stage counted the handler's time)."""
    from stml.api import Op
    from stml.timing import BACKEND_END, BACKEND_START, Timing
    image: FakeImage = backend.image
    em, sent = _emulator(backend)
    em.enable_timing(Timing(None))
    seen: list[tuple[int, int]] = []

    async def run() -> None:
        em.handle(b"fe", {"op": Op.REGISTER, "version": [1, 10], "kind": "test", "name": "t",
                          "heartbeat_ms": 1000, "aen": False, "caps": ["timing"]}, [])
        em.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": 1, "initiator": "iqn.2026-11.org.test:i",
                          "target": next(iter(em.targets)), "tpg": 1}, [])
        em.handle(b"fe", {"op": Op.RX_CMND, "tag": 9, "nexus": 1, "lun": 0, "cdb": _rw10(0x28, 8, 8),
                          "attr": 0, "dir": 2, "len": 4096, "unsol": 0}, [])
        (comp,) = image.flying
        stamps = em.timing.stamps(b"fe", 9)
        assert stamps is not None, "the command is not timed"
        seen.append((stamps[BACKEND_START], stamps[BACKEND_END]))
        image.complete(comp, b"E" * 4096)
        for _ in range(3000):   # the eventfd wakes the collector (a guard against a hang, not a timing)
            if any(h["op"] == Op.XMIT_RESPONSE for h, _ in sent):
                break
            await asyncio.sleep(0.01)
        seen.append((stamps[BACKEND_START], stamps[BACKEND_END]))
    asyncio.run(run())
    (start, end), (start2, end2) = seen
    assert start != 0 and end == 0, "the backend stage did not begin with the aio call"
    assert start2 == start and end2 >= start
    ((h, frames),) = [(h, f) for h, f in sent if h["op"] == Op.XMIT_RESPONSE]
    assert h["status"] == 0 and b"".join(bytes(f) for f in frames) == b"E" * 4096


def test_parked_commands_share_one_waiter_and_each_resumes_with_its_own_data(backend):
    """Eight READs parked on their aio calls: one waiter object for them all
    (the emulator's bound _resume, called with the command), not one made per
    command (0422); each completion resumes its own command with its data."""
    from stml.api import Op
    image: FakeImage = backend.image
    em, sent = _emulator(backend)
    waiters: list = []

    async def run() -> None:
        _connect(em)
        for tag in range(8):
            em.handle(b"fe", {"op": Op.RX_CMND, "tag": tag, "nexus": 1, "lun": 0, "cdb": _rw10(0x28, tag, 1),
                              "attr": 0, "dir": 2, "len": 512, "unsol": 0}, [])
        entries = list(backend.aio._pending.items())
        waiters.extend((fut.waiter, fut.waiter_arg.tag) for _, (fut, _, _) in entries)
        for comp, (fut, _, _) in reversed(entries):
            image.complete(comp, bytes([fut.waiter_arg.tag]) * 512)
        for _ in range(3000):   # (a guard against a hang, not a timing)
            if sum(h["op"] == Op.XMIT_RESPONSE for h, _ in sent) == 8:
                break
            await asyncio.sleep(0.01)
    asyncio.run(run())
    assert len({id(w) for w, _ in waiters}) == 1 and [t for _, t in waiters] == list(range(8))
    got = {h["tag"]: b"".join(bytes(f) for f in frames) for h, frames in sent if h["op"] == Op.XMIT_RESPONSE}
    assert got == {tag: bytes([tag]) * 512 for tag in range(8)}
    assert not backend.aio._pending


def test_a_collection_short_of_memory_hands_every_call_over_once(backend):
    """Decision 0425: poll() has released what it hands over, so a collection
    that runs out of memory before a completion is in its results keeps the
    rest (and signals the eventfd) rather than dropping it: every read's
    future ends once, with its data, its buffer let go; none waits for good.
    One allocation fails in each collection (CPython's failure injection)."""
    import _testcapi
    image: FakeImage = backend.image
    bufs = [bytearray(4096) for _ in range(150)]
    short: list[int] = []

    async def run() -> None:
        aio = backend.aio
        futs = [aio.read_into(i * 4096, memoryview(b)) for i, b in enumerate(bufs)]
        fd = aio._fd
        aio._loop.remove_reader(fd)   # this test collects, one failure at a time
        try:
            for comp in list(image.flying):
                image.complete(comp, bytes([comp % 251]) * 4096)
            for k in range(0, 900, 7):
                if not aio._pending and not aio._left_rets:   # (a short _finish keeps the rest there)
                    break
                _testcapi.set_nomemory(k % 60, k % 60 + 1)   # (only that allocation from here fails)
                try:
                    aio._collect(fd)
                except MemoryError:
                    pass
                finally:
                    _testcapi.remove_mem_hooks()
                short.append(len(aio._polled) + len(aio._left_rets))
        finally:
            aio._loop.add_reader(fd, aio._collect, fd)
        assert not aio._pending and all(f.done() and f.exception() is None for f in futs)
    asyncio.run(run())
    assert max(short) > 0, "some collection ran short with completions in hand"
    assert [bytes(b) for b in bufs] == [bytes([c % 251]) * 4096 for c in range(1000, 1150)]
    assert not any(pinned(b) for b in bufs)


def _short_collection(backend: Any, buf: bytearray, fill: bytes) -> tuple[Any, int]:
    """On the loop: a read into `buf` that librbd completed with `fill` and a
    collection took (releasing its completion) but ran short before handing
    it over, as 0425 keeps it; the loop no longer collects by itself (the
    caller puts the reader back). Its future and completion address."""
    aio, image = backend.aio, backend.image
    fut = aio.read_into(0, memoryview(buf))
    (comp,) = image.flying
    image.complete(comp, fill * 4096)
    aio._loop.remove_reader(aio._fd)
    aio._polled = image.poll()
    return fut, comp


def test_what_a_short_collection_kept_is_settled_with_its_own_outcome_at_close(backend):
    """Decision 0425: a call polled (released in librbd) but not yet handed over
    when the image closes ends with the value poll gave, never by asking librbd
    about a completion it has let go (FakeImage.outcome would say None: EIO)."""
    image: FakeImage = backend.image
    buf = bytearray(4096)

    async def run() -> None:
        fut, _ = _short_collection(backend, buf, b"K")
        await asyncio.get_running_loop().run_in_executor(None, backend.close)
        await asyncio.sleep(0)
        assert fut.done() and fut.exception() is None
    asyncio.run(run())
    assert bytes(buf) == b"K" * 4096 and not pinned(buf)


def test_no_call_starts_while_a_short_collections_leftovers_wait(backend):
    """Review 19: what a short collection kept was released in librbd, whose
    allocator hands a freed completion's address to the next call; a call
    started then took the kept call's pending entry (that command hung) and
    would have been matched with the kept call's return value before librbd
    read anything. While leftovers wait, a READ is refused with ABORTED
    COMMAND, INSUFFICIENT RESOURCES (initiators retry), nothing started or
    pinned; the next collection hands the kept call over, then reads go on."""
    from stml.api import Op
    from stml.sense import ABORTED_COMMAND, INSUFFICIENT_RESOURCES
    image: FakeImage = backend.image
    em, sent = _emulator(backend)
    first = bytearray(4096)

    def response(tag: int) -> Any:
        return next(((h, f) for h, f in sent if h["op"] == Op.XMIT_RESPONSE and h["tag"] == tag), None)

    async def run() -> None:
        _connect(em)
        aio = backend.aio
        fut, comp = _short_collection(backend, first, b"K")
        image.ids = itertools.count(comp)   # librbd's allocator: the freed address first
        em.handle(b"fe", {"op": Op.RX_CMND, "tag": 8, "nexus": 1, "lun": 0, "cdb": _rw10(0x28, 8, 8),
                          "attr": 0, "dir": 2, "len": 4096, "unsol": 0}, [])
        for _ in range(3000):   # (a guard against a hang, not a timing)
            if response(8) is not None:
                break
            await asyncio.sleep(0.01)
        assert not image.flying and not fut.done(), "a call started while leftovers waited"
        aio._collect(aio._fd)
        assert fut.done() and fut.exception() is None and not aio._polled
        aio._loop.add_reader(aio._fd, aio._collect, aio._fd)
        em.handle(b"fe", {"op": Op.RX_CMND, "tag": 9, "nexus": 1, "lun": 0, "cdb": _rw10(0x28, 8, 8),
                          "attr": 0, "dir": 2, "len": 4096, "unsol": 0}, [])
        (again,) = image.flying
        image.complete(again, b"N" * 4096)
        for _ in range(3000):
            if response(9) is not None:
                break
            await asyncio.sleep(0.01)
    asyncio.run(run())
    h, _ = response(8)
    assert h["status"] == 2 and (h["sense"][2] & 0xF, h["sense"][12], h["sense"][13]) == \
        (ABORTED_COMMAND, *INSUFFICIENT_RESOURCES)
    h, frames = response(9)
    assert h["status"] == 0 and b"".join(bytes(f) for f in frames) == b"N" * 4096
    assert bytes(first) == b"K" * 4096 and not pinned(first)


def test_a_poll_short_of_memory_after_the_leftovers_still_ends_them(backend):
    """Review 19: a wake-up hands a short collection's leftovers over, then
    polls again; a MemoryError from that poll skipped finishing the calls
    already taken out of the pending table (hung for good, invisible to a
    close). They end now whatever the poll does, and the eventfd is
    signalled for another try."""
    import select
    image: FakeImage = backend.image
    buf = bytearray(4096)

    async def run() -> None:
        aio = backend.aio
        fut, _ = _short_collection(backend, buf, b"P")

        def short() -> list:
            raise MemoryError
        image.poll = short   # type: ignore[method-assign]
        aio._collect(aio._fd)
        assert fut.done() and fut.exception() is None and not aio._pending
        assert select.select([aio._fd], [], [], 0)[0], "another collection asked for"
        del image.poll
        aio._loop.add_reader(aio._fd, aio._collect, aio._fd)
    asyncio.run(run())
    assert bytes(buf) == b"P" * 4096 and not pinned(buf)


@pytest.mark.parametrize("then", ["collect", "close"])
def test_a_finish_short_of_memory_leaves_its_calls_for_the_next_wake_up(backend, monkeypatch, then):
    """Decision 0722: the futures of a collection's calls get their outcomes
    after librbd released the completions and the calls left `_pending`; a
    MemoryError there (making a failed call's error) used to end the rest of
    them with it, and their commands waited for good. Now the collection keeps
    what it took and signals the eventfd: the next wake-up, or the close,
    ends each call once, with its own outcome."""
    image: FakeImage = backend.image
    calls = {"n": 0}
    strerror = os.strerror

    def short_once(code: int) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError
        return strerror(code)

    async def run() -> None:
        aio = backend.aio
        futs = [aio.read_into(i * 4096, memoryview(bytearray(4096))) for i in range(4)]
        fd = aio._fd
        aio._loop.remove_reader(fd)
        for comp in list(image.flying):   # librbd ends each with EIO
            image.flying.pop(comp)
            image.done.append((comp, -errno.EIO))
        os.eventfd_write(fd, 1)
        monkeypatch.setattr(os, "strerror", short_once)
        aio._collect(fd)
        assert [f.done() for f in futs] == [True, False, False, False]
        assert not aio._pending and len(aio._left_rets) == 4
        assert os.eventfd_read(fd) >= 1   # (signalled: the loop comes back for them)
        os.eventfd_write(fd, 1)
        if then == "collect":
            aio._collect(fd)
            assert not aio._left_rets
            aio._loop.add_reader(fd, aio._collect, fd)
        else:
            aio._loop.add_reader(fd, aio._collect, fd)
            await asyncio.get_running_loop().run_in_executor(None, backend.close)
            await asyncio.sleep(0)
        for f in futs:
            assert f.done() and isinstance(f.exception(), R.RbdError) and f.exception().errno == errno.EIO
        assert calls["n"] == 5   # each error made once, the short one again
    asyncio.run(run())


class _Aborted(Exception):
    """os.abort()'s stand-in: the test process goes on."""


def test_a_future_whose_callbacks_were_lost_short_of_memory_ends_the_process(backend, monkeypatch):
    """Review 20: asyncio marks a future done before it schedules the callbacks
    and drops them when that runs out of memory, so a task awaiting an aio
    call (an aborted command parked on it) would wait for good, its abort
    never answered. The process ends instead (0722), as the compiled build
    does short of memory; a waiter-only future is simply walked again."""
    image: FakeImage = backend.image
    aborts: list[int] = []

    def abort() -> None:
        aborts.append(1)
        raise _Aborted
    monkeypatch.setattr(os, "abort", abort)

    async def run() -> None:
        aio = backend.aio
        loop = asyncio.get_running_loop()
        fut = aio.read_into(0, memoryview(bytearray(4096)))
        waiting = loop.create_task(asyncio.wait([fut]))
        await asyncio.sleep(0)
        fd = aio._fd
        loop.remove_reader(fd)
        (comp,) = list(image.flying)
        image.complete(comp, b"x" * 4096)
        real = loop.call_soon

        def short(*a: Any, **k: Any) -> Any:
            loop.call_soon = real   # type: ignore[method-assign]
            raise MemoryError
        loop.call_soon = short   # type: ignore[method-assign]
        try:
            with pytest.raises(_Aborted):
                aio._collect(fd)
        finally:
            loop.call_soon = real   # type: ignore[method-assign]
            loop.add_reader(fd, aio._collect, fd)
        assert fut.done() and aborts == [1]
        waiting.cancel()
    asyncio.run(run())


def test_a_close_short_of_memory_settles_its_calls_on_a_later_turn(backend, monkeypatch):
    """Review 20: rbd_close ends two reads with EIO and making the first one's
    error runs short of memory: the settling used to close the eventfd and
    leave both futures pending for good; it now tries again shortly and each
    ends once, with its own EIO."""
    image: FakeImage = backend.image
    made = {"n": 0}
    strerror = os.strerror

    def short_once(code: int) -> str:
        made["n"] += 1
        if made["n"] == 1:
            raise MemoryError
        return strerror(code)

    async def run() -> None:
        aio = backend.aio
        futs = [aio.read_into(i * 4096, memoryview(bytearray(4096))) for i in range(2)]
        fd = aio._fd
        for comp in list(image.flying):   # librbd ends both with EIO as it closes
            image.flying.pop(comp)
            image.finished[comp] = -errno.EIO
        monkeypatch.setattr(os, "strerror", short_once)
        await asyncio.get_running_loop().run_in_executor(None, backend.close)
        for _ in range(300):   # (a guard against a hang, not a timing)
            if all(f.done() for f in futs):
                break
            await asyncio.sleep(0.01)
        for f in futs:
            assert f.done() and isinstance(f.exception(), R.RbdError) and f.exception().errno == errno.EIO
        assert made["n"] == 3
        with pytest.raises(OSError):
            os.fstat(fd)   # closed once both were settled
    asyncio.run(run())
