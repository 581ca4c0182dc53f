"""RBD backend: a Ceph RBD image, through librbd (backends.librbd).

Reads, writes, flushes, discards and WRITE SAME go to librbd as aio calls,
many in flight, submitted from the event loop and collected from an eventfd
librbd signals (`aio`); nothing waits on the loop. The synchronous calls
(the Backend protocol's) serve management and the worker threads.

Several gateways may open one image; the one that serves holds its
exclusive lock (`lock_acquire`), which nobody takes from a live holder and
which a taker breaks, blocklisting the holder, only when the holder is
dead: a fenced holder's writes fail with ESHUTDOWN (`fenced`), so its
in-flight writes cannot land (docs/decisions/0400-rbd-gateways.md).
Persistent reservations are kept in the image's metadata (`PrStore`).

Closing (a LUN removed, a fenced client replaced by `reopen`) waits for the
synchronous calls under way and lets librbd finish the aio ones: no call
reaches a closed image, and no buffer is let go while librbd may still
touch it (docs/decisions/0402-rbd-buffers-outlive-close.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
from typing import Any, Callable, Iterator, Sequence, cast

from backends.base import AioFuture, BackendError
from backends.librbd import (
    EBLOCKLISTED, FEATURE_EXCLUSIVE_LOCK, WRITE_ZEROES_FLAG_THICK_PROVISION, BatchThreads, CephError, Client, Image,
    IoCtx, Pinned, create_image,
)

# reservation state: a key of the image's own metadata, so it lives and goes with the image
PR_KEY = "scsi_target.pr"
# GET LBA STATUS: objects diff_iterate looks at per call, whatever the LBA range asks
DIFF_OBJECTS = 64
# a close's settling of its calls that ran short of memory tries again after this (s)
SETTLE_RETRY = 0.01

log = logging.getLogger("backends.rbd")


class RbdError(BackendError):
    """A librbd call failed; `errno` says how. The STML answers ESHUTDOWN (this
    client is fenced, or the image is closing: another gateway serves it) and
    ETIMEDOUT (the cluster did not answer) with a path error, not MEDIUM ERROR."""

    def __init__(self, spec: str, err: int, why: str) -> None:
        super().__init__(f"rbd:{spec}: {why}")
        self.errno = err


def parse_image(spec: str) -> tuple[str, str, str]:
    """POOL/IMAGE or POOL/NAMESPACE/IMAGE -> (pool, namespace, image)."""
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise BackendError(f"{spec!r} is not POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    if len(parts) == 2:
        return parts[0], "", parts[1]
    return parts[0], parts[1], parts[2]


class RbdBackend:
    inline = False
    can_discard = True
    can_resize = True
    dirty = False                 # no client cache: a completed write is on the OSDs
    sync_error: str | None = None   # never set (see Backend.sync_error)
    # no OPTIMAL UNMAP GRANULARITY: with one, qemu asks GET LBA STATUS (a librbd
    # diff) before its reads (decision 0410)
    discard_granularity = 0

    def __init__(self, spec: str, size: int | None = None, readonly: bool = False,
                 conf: str | None = None, user: str | None = None, keyring: str | None = None) -> None:
        self.spec = spec
        self.pool, self.namespace, self.name = parse_image(spec)
        self.readonly = readonly
        self._conf = (conf, user, keyring)
        self.fenced = False
        # told (from any thread) when the image changed behind our back (a resize)
        self.on_change: Callable[[], None] = lambda: None
        # told once (from any thread) when the cluster fenced this client: its writes cannot land
        self.on_fenced: Callable[[], None] = lambda: None
        # the handles' users: a call holds them open (`_users`); closing waits for none
        self._gate = threading.Condition()
        self._users = 0
        self._usable = False
        self.aio = RbdAio(self)
        self._open(size)

    def _open(self, size: int | None) -> None:
        with BatchThreads():   # librados's and librbd's threads, started here (0419)
            self._open_batch(size)

    def _open_batch(self, size: int | None) -> None:
        try:
            client = Client(*self._conf)
        except CephError as e:
            raise BackendError(f"rbd:{self.spec}: {e.strerror}") from None
        try:
            ioctx = client.ioctx(self.pool, self.namespace)
            try:
                image = self._image(ioctx, size)
            except BaseException:
                ioctx.destroy()
                raise
        except CephError as e:
            client.shutdown()
            raise BackendError(f"rbd:{self.spec}: {e.strerror}") from None
        self.client, self.ioctx, self.image = client, ioctx, image
        self._size = image.size()
        self.object_size = image.object_size()
        # the LU's identity (NAA, serial): the same on every gateway that opens the image
        self.identity = hashlib.sha256(
            f"{client.fsid()}/{ioctx.pool_id()}/{self.namespace}/{image.image_id()}".encode()).digest()[:16]
        image.watch_updates(lambda: self.on_change())
        with self._gate:
            self._usable = True

    def _image(self, ioctx: IoCtx, size: int | None) -> Image:
        image = self._open_or_create(ioctx, size)
        try:   # every RBD LU is served under the image's lock (0400): an image without one cannot be
            if not image.features() & FEATURE_EXCLUSIVE_LOCK:
                raise CephError(errno.EINVAL, f"image {self.name} has no exclusive-lock feature, which serving "
                                              f"it needs: `rbd feature enable {self.spec} exclusive-lock`")
        except BaseException:
            image.close()
            raise
        return image

    def _open_or_create(self, ioctx: IoCtx, size: int | None) -> Image:
        try:
            return Image(ioctx, self.name)
        except CephError as e:
            if e.errno != errno.ENOENT or not size or self.readonly:
                raise
        try:
            create_image(ioctx, self.name, size)
        except CephError as e:
            if e.errno != errno.EEXIST:   # another gateway made it meanwhile
                raise
        return Image(ioctx, self.name)

    def reopen(self) -> None:
        """A new client and image handle (after this one was fenced): blocking."""
        self._close_handles()
        self._open(None)
        self.fenced = False

    # ---------------------------------------------------------------- errors
    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Hold the handles open for a call: RbdError when the image is closing
        or the call fails (a fenced client tells on_fenced first)."""
        with self._gate:
            if not self._usable:
                raise RbdError(self.spec, errno.ESHUTDOWN, "image closed")
            self._users += 1
        try:
            yield
        except CephError as e:
            if e.errno == EBLOCKLISTED:
                self.fence()
            raise RbdError(self.spec, e.errno or errno.EIO, e.strerror or str(e)) from None
        finally:
            with self._gate:
                self._users -= 1
                if not self._users:
                    self._gate.notify_all()

    def _call(self, name: str, *args: Any) -> Any:
        """Image.NAME(*args) on the image open now (see _using)."""
        with self._using():
            return getattr(self.image, name)(*args)

    def fence(self) -> None:
        """The cluster refused this client (blocklisted): say so once."""
        with self._gate:
            told, self.fenced = self.fenced, True
        if not told:
            self.on_fenced()

    # ---------------------------------------------------------------- Backend
    def size(self) -> int:
        """Cached: every command checks its range; refresh_size() reads it again."""
        return self._size

    def refresh_size(self) -> int:
        self._size = self._call("size")
        return self._size

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._call("read", offset, buf)

    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None:
        for b in bufs:
            self._call("write", offset, b, sync)
            offset += memoryview(b).nbytes

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        return False   # every read goes over the network

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        return None

    def write_nowait(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> bool:
        return False

    def flush(self) -> None:
        self._call("flush")

    def discard(self, offset: int, length: int) -> None:
        self._call("discard", offset, length)

    def write_same(self, offset: int, length: int, block: bytes, sync: bool) -> None:
        """`length` bytes of `block` repeated, in the OSDs (see RbdAio.write_same)."""
        self._call("write_same", offset, length, block)

    def resize(self, size: int) -> None:
        self._call("resize", size)
        self.refresh_size()

    def compare_and_write(self, offset: int, compare: bytes, data: bytes, sync: bool) -> int | None:
        """Write `data` if the medium holds `compare`: None, else the offset of
        the first byte that differs. librbd compares and writes in the OSD, as
        one operation, for one aligned 512-byte sector (all Pacific's librbd
        takes); longer ones read, compare and write here, which the caller's
        write gate and the exclusive lock (no other gateway writes) make atomic."""
        if len(compare) == 512 and offset % 512 == 0:
            return self._call("compare_and_write", offset, compare, data)
        have = bytearray(len(compare))
        self.read_into(offset, memoryview(have))
        if have != compare:
            # (indexed, not zipped: mypyc cannot compile a zip of bytes here)
            return next(i for i in range(len(compare)) if have[i] != compare[i])
        self.write_from(offset, [memoryview(data)], sync)
        return None

    def mapped_extents_nowait(self, offset: int, length: int,
                              limit: int) -> list[tuple[int, int, bool]] | None:
        return None   # a diff goes over the network

    def mapped_extents(self, offset: int, length: int, limit: int = 1024) -> list[tuple[int, int, bool]]:
        """(offset, length, mapped) runs from `offset`: at most `limit` runs, from
        a diff over at most DIFF_OBJECTS objects (the work is bounded whatever the
        range), so they may cover less than `length`, as GET LBA STATUS allows.
        librbd reports an object's data from the object's start to its end: a
        hole inside a written object is reported mapped (it reads as zeros)."""
        obj = self.object_size
        end = min(offset + length, (offset // obj + DIFF_OBJECTS) * obj)
        extents: list[tuple[int, int, bool]] = []

        def each(o: int, n: int, exists: bool) -> bool:
            extents.append((o, n, exists))
            return len(extents) < limit
        self._call("diff_iterate", offset, end - offset, each)
        runs: list[tuple[int, int, bool]] = []
        pos = offset

        def add(start: int, stop: int, mapped: bool) -> None:
            if runs and runs[-1][2] == mapped and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop - runs[-1][0], mapped)
            else:
                runs.append((start, stop - start, mapped))

        for o, n, exists in extents:
            o, stop = max(o, pos), min(o + n, end)
            if stop <= o:
                continue
            if o > pos:
                add(pos, o, False)
            add(o, stop, exists)
            pos = stop
        if len(extents) < limit and pos < end:
            add(pos, end, False)   # nothing allocated from here to the end of the window
        return runs[:limit]

    # ---------------------------------------------------------------- gateways
    def lock_acquire(self) -> None:
        """Hold the image's exclusive lock (blocking); RbdError EBUSY while a
        live gateway holds it."""
        try:
            self._call("lock_acquire")
        except RbdError as e:
            if e.errno != errno.EROFS:   # what librbd says when a live client holds it
                raise
            raise RbdError(self.spec, errno.EBUSY, "another gateway holds the image's exclusive lock") from None

    def lock_release(self) -> None:
        self._call("lock_release")

    def is_lock_owner(self) -> bool:
        return bool(self._call("is_lock_owner"))

    def lock_owners(self) -> list[str]:
        return self._call("lock_owners")

    def client_address(self) -> str:
        with self._using():
            return self.client.address()

    def pr_store(self) -> PrStore:
        return PrStore(self)

    # ---------------------------------------------------------------- life
    def _close_handles(self) -> None:
        """Close once no call is under way (new ones are refused); the aio calls
        librbd still has keep their buffers until rbd_close has ended them.
        Blocking."""
        with self._gate:
            self._usable = False
            while self._users:
                self._gate.wait()
        detached = self.aio.detach()
        image, ioctx, client = self.image, self.ioctx, self.client
        for step in (image.close, ioctx.destroy, client.shutdown):
            try:
                step()
            except CephError:
                pass   # a fenced client fails to let go cleanly; its handles go anyway
        self.aio.settle(image, detached)

    def close(self) -> None:
        self._close_handles()


class PrStore:
    """Persistent reservations in the image's metadata: every gateway that
    takes over reads what the one before wrote. Only the exclusive lock's
    holder can write it (a fenced one is refused by the OSDs)."""

    always = True   # the state is written on every change, APTPL or not: a gateway may die

    def __init__(self, backend: RbdBackend) -> None:
        self.backend = backend
        self.where = f"metadata {PR_KEY} of image {backend.spec}"

    def read(self) -> Any:
        text = self._do("metadata_get", PR_KEY)
        return None if text is None else json.loads(text)

    def write(self, doc: Any) -> bool:
        if doc is None:
            self._do("metadata_remove", PR_KEY)
            return False
        self._do("metadata_set", PR_KEY, json.dumps(doc, separators=(",", ":")))
        return True

    def _do(self, name: str, *args: Any) -> Any:
        """OSError on failure, as the reservation saver expects of a store,
        with librbd's errno (ESHUTDOWN: fenced)."""
        try:
            return self.backend._call(name, *args)
        except RbdError as e:
            raise OSError(e.errno, str(e)) from None


# an aio call librbd has: its future, what pins its buffers (Image.start_buffer), the bytes a read must report
AioCall = tuple[AioFuture, Any, int]
# what detach() hands to settle(): the loop that collected, its eventfd, the calls librbd has
# (or had: those polled but not yet handed over, with their return values)
Detached = tuple[asyncio.AbstractEventLoop | None, int, dict[int, AioCall], list[tuple[int, int]]]


class RbdAio:
    """The aio twins of the backend's I/O calls (same names and arguments):
    each returns an AioFuture of the event loop it is first called on, done
    when librbd completes the call. A buffer stays pinned until then, whatever
    happens meanwhile (an abort, a step down, the image closing): librbd may
    write into it, or read from it, until it says it is done.

    Per call, on the loop: one lock round trip to start it (the lock detach()
    takes), librbd's completion created and the call started through ctypes
    functions looked up once (Image.start). Per eventfd wake-up, however
    many calls completed: one read of the eventfd, one lock round trip and
    rbd_poll_io_events in batches (Image.poll).

    The eventfd librbd signals is ours: it is closed on the loop, after the
    loop stopped watching it and after rbd_close (librbd signals it until then)."""

    def __init__(self, backend: RbdBackend) -> None:
        self.backend = backend
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._pending: dict[int, AioCall] = {}
        # (completion, return value) polled and released but not yet in a
        # collection's results, newest first (_collect)
        self._polled: list[tuple[int, int]] = []
        # a collection's calls and their return values, kept when it ran short
        # of memory before each future had its outcome (_finish)
        self._left: list[AioCall] = []
        self._left_rets: list[int] = []
        # held while the loop starts a call or polls the image and while detach()
        # takes it away (any thread): nothing reaches an image once detach() has returned
        self._lock = threading.Lock()

    def _attach(self) -> asyncio.AbstractEventLoop:
        """On the loop, the first call: librbd signals a new eventfd the loop watches."""
        with self.backend._using():   # refused when closing (no detach runs meanwhile)
            loop = self._loop
            if loop is not None:
                return loop
            loop = asyncio.get_running_loop()
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self.backend.image.enable_events(fd)
            except BaseException:
                os.close(fd)
                raise
            loop.add_reader(fd, self._collect, fd)
            with self._lock:
                self._loop, self._fd = loop, fd
            return loop

    def detach(self) -> Detached:
        """Stop collecting (any thread; the image is about to close and no call
        is being started): no poll reaches the image once this returns, and
        nothing here waits for the loop (which may itself be waiting for this
        thread: an STML stopping). The calls librbd still has keep their
        buffers pinned and their futures pending, for settle()."""
        with self._lock:
            out = self._loop, self._fd, self._pending, self._polled
            self._loop, self._fd, self._pending, self._polled = None, -1, {}, []
        loop, fd, _, _ = out
        if loop is not None:
            _on_loop(loop, loop.remove_reader, fd)
        return out

    def settle(self, image: Image, detached: Detached) -> None:
        """After rbd_close (any thread): librbd has ended every call it had;
        their buffers go, their futures get what librbd said (on the loop),
        and the eventfd is closed there."""
        loop, fd, pending, polled = detached
        known = dict(polled)   # (released already: not asked again)
        calls: list[AioCall] = []
        rets: list[int] = []
        for comp, call in pending.items():
            ret = known[comp] if comp in known else image.outcome(comp)
            if ret is None:   # librbd broke its word: the buffers stay pinned for good
                log.error("rbd:%s: an aio call outlived rbd_close", self.backend.spec)
                ret = -errno.EIO
            else:
                _unpin(call[1])
            calls.append(call)
            rets.append(ret)
        if loop is None:
            return


        if not _on_loop(loop, self._settled, loop, fd, calls, rets):
            os.close(fd)   # the loop is closed: nobody watches the fd or waits for these futures

    def _settled(self, loop: asyncio.AbstractEventLoop, fd: int, calls: list[AioCall], rets: list[int]) -> None:
        """On the loop, after rbd_close: the calls' futures get their outcomes,
        and what a collection short of memory left too (0722), then the
        eventfd is closed. Short of memory itself, it tries again shortly (a
        second walk passes over what is done); the arguments are handed on, not
        held by a closure that would hold itself and the calls' pins."""
        try:
            self._finish(self._left, self._left_rets, live=False)
            self._finish(calls, rets, live=False)
        except MemoryError:
            loop.call_later(SETTLE_RETRY, self._settled, loop, fd, calls, rets)
            return
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)

    def _submit(self, name: str, args: tuple, flags: tuple = (), pin: Any = None,
                buf: Any = None, read: bool = False) -> asyncio.Future:
        """Start `rbd_aio_NAME`: with `buf`, a read into it or a write from it
        at offset args[0] (Image.start_buffer pins it; a read must report its
        bytes), else with `args` and `flags`, `pin` holding their buffers
        (Image.start). Refused (ESHUTDOWN) once the image is closing: a close
        marks the backend unusable before it detaches, and detach() waits for
        this lock."""
        backend = self.backend
        failed: CephError | None = None
        try:
            loop = self._loop or self._attach()
            fut = AioFuture(loop=loop)
            fut.waiter = None
            lock = self._lock
            lock.acquire()   # (not `with`: two special-method lookups and a call more, 0426)
            try:
                if self._loop is not loop or not backend._usable:
                    raise RbdError(backend.spec, errno.ESHUTDOWN, "image closed")
                if self._polled:   # a short collection's leftovers, released in librbd (0425)
                    raise RbdError(backend.spec, errno.ENOMEM, "completions not yet handed over")
                try:   # (each records the call in _pending before librbd has it; raises when it did not)
                    if buf is not None:
                        backend.image.start_buffer(name, args[0], buf, read, fut, self._pending)
                    else:
                        backend.image.start(name, args, flags, (fut, pin, 0), self._pending)
                except CephError as e:
                    failed = e
                else:
                    return fut
            finally:
                lock.release()
        except BaseException:
            _unpin(pin)
            raise
        _unpin(pin)
        assert failed is not None
        if failed.errno == EBLOCKLISTED:
            backend.fence()
        raise RbdError(backend.spec, failed.errno or errno.EIO, failed.strerror or str(failed))

    def _collect(self, fd: Any) -> None:
        """The eventfd is readable: take what librbd completed (Image.poll reads
        the eventfd). What poll handed over is released in librbd, so it is
        kept in `_polled` until each is in `calls` and `rets`: run short of
        memory on the way and the rest waits there for the next wake-up (the
        eventfd signalled again), never lost; no call starts meanwhile
        (_submit), since its completion could take a released one's address
        (0425). Whatever made it into both lists is finished, whatever failed.

        It handles the objects the loop, poll and _submit made, as they are
        (`fd` too): it makes no int and no tuple. Compiled (mypyc), making one
        (boxing an int, a tuple) aborts the process when memory runs short,
        where a list that cannot grow raises MemoryError, as interpreted
        (decision 0722)."""
        if self._left_rets:   # a short collection's calls to finish first (0722)
            try:
                self._finish(self._left, self._left_rets, live=True)
                self._left_rets = []
                self._left = []
            except MemoryError:
                os.eventfd_write(fd, 1)   # (and nothing new is taken meanwhile)
                return
        calls: list[AioCall] = []
        rets: list[Any] = []   # (Any: each return value stays the int object poll made)
        lock = self._lock
        try:
            lock.acquire()   # (not `with`, as in _submit)
            try:
                if cast(int, fd) != self._fd:   # detached: the image is closing (the reader goes next)
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    return
                pending: dict[Any, Any] = self._pending   # (Any: keys and calls as they are)
                try:
                    while True:
                        polled: list[Any] = self._polled
                        fresh = not polled
                        if fresh:
                            polled = self.backend.image.poll()
                            polled.reverse()   # (taken from the end: in completion order, no copy)
                            self._polled = polled
                        while polled:
                            done = polled[-1]   # (completion, return value)
                            comp = done[0]
                            call = pending.get(comp)
                            if call is not None:
                                calls.append(call)
                                rets.append(done[1])   # (short of memory here: _finish zips, the call stays)
                                del pending[comp]
                                _unpin(call[1])
                            polled.pop()
                        if fresh:
                            break
                except MemoryError:
                    os.eventfd_write(fd, 1)
            finally:
                lock.release()
        finally:
            try:
                self._finish(calls, rets, live=True)
            except MemoryError:   # the rest waits for the next wake-up, never lost
                self._left, self._left_rets = calls, rets
                os.eventfd_write(fd, 1)

    def _finish(self, calls: list[AioCall], rets: list[int], live: bool) -> None:
        """On the loop: each call's future gets its outcome, the i-th call the
        i-th return value (a call past the last value is not finished here:
        _collect kept it pending). Nothing is removed from the lists (a list
        that shrinks may reallocate): short of memory on the way (an error to
        make, a callback to schedule), the caller keeps both and calls this
        again, which passes over what is done (0722). `live`: from the image
        open now (a closed one's fencing is old news)."""
        i = 0
        n = len(rets)
        while i < n:
            fut, _, length = calls[i]
            if not fut.done():   # (an AioFuture is never cancelled; done: a try before this one)
                ret = rets[i]
                try:
                    if ret < 0:
                        if -ret == EBLOCKLISTED and live:
                            self.backend.fence()
                        fut.set_exception(RbdError(self.backend.spec, -ret, os.strerror(-ret)))
                    elif length and ret != length:
                        fut.set_exception(RbdError(self.backend.spec, errno.EIO, f"{ret} of {length} bytes"))
                    else:
                        fut.set_result(None)
                except MemoryError:
                    if fut.done():   # done, but its callbacks were dropped scheduling them
                        _callbacks_lost()
                    raise
            waiter = fut.waiter
            if waiter is not None:   # a command parked on it goes on now (AioFuture)
                fut.waiter = None
                waiter(fut.waiter_arg)
            i += 1

    def read_into(self, offset: int, buf: memoryview) -> asyncio.Future:
        return self._submit("read", (offset,), buf=buf, read=True)

    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> asyncio.Future:
        # no client cache: a write is on the OSDs when it completes, FUA or not
        if len(bufs) == 1:
            return self._submit("write", (offset,), buf=bufs[0])
        pin = Pinned()
        arr, count, _ = pin.iovecs(bufs)
        return self._submit("writev", (arr, count, offset), pin=pin)

    def flush(self) -> asyncio.Future:
        return self._submit("flush", ())

    def discard(self, offset: int, length: int) -> asyncio.Future:
        return self._submit("discard", (offset, length))

    def write_same(self, offset: int, length: int, block: bytes, sync: bool) -> asyncio.Future:
        """`length` bytes of `block` repeated, in the OSDs: zeros through
        write_zeroes (kept allocated: the initiator did not ask to unmap),
        other data through writesame."""
        pin = Pinned()
        if not any(block):
            return self._submit("write_zeroes", (offset, length), (WRITE_ZEROES_FLAG_THICK_PROVISION, 0), pin)
        addr, n = pin.span(block)
        return self._submit("writesame", (offset, length, addr, n), (0,), pin)


def _callbacks_lost() -> None:
    """An aio call's future was marked done but asyncio dropped its callbacks
    when scheduling one ran out of memory (it clears them): a task awaiting
    it would wait for good, its command never answered nor abortable. Like
    the compiled build short of memory (0722), the process ends here and the
    supervisor starts it again: nothing acknowledged is lost."""
    os.write(2, b"rbd: an aio call's callbacks were lost short of memory; aborting\n")
    os.abort()


def _unpin(pin: Any) -> None:
    """Let go of what a call's pin holds (Image.start_buffer): only a Pinned has a buffer to
    release; the other pins go with their last reference. Here, compiled,
    rather than in backends.librbd: it runs per command."""
    if type(pin) is Pinned:
        pin.release()


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """fn(*args) on `loop`: now when this thread runs it, else soon (never
    waited for); False when the loop is closed and fn will not run."""
    try:
        running = asyncio.get_running_loop() is loop
    except RuntimeError:
        running = False
    if running:
        fn(*args)
        return True
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True
