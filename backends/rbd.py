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
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import threading
from typing import Any, Callable, Sequence

from backends import BackendError
from backends.librbd import (
    COMP, EBLOCKLISTED, WRITE_ZEROES_FLAG_THICK_PROVISION, CephError, Client, Image, IoCtx, Pinned,
    create_image,
)

# reservation state: a key of the image's own metadata, so it lives and goes with the image
PR_KEY = "scsi_target.pr"
# GET LBA STATUS: objects diff_iterate looks at per call, whatever the LBA range asks
DIFF_OBJECTS = 64


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
    discard_granularity = 64 << 10   # librbd's rbd_discard_granularity_bytes default

    def __init__(self, spec: str, size: int | None = None, readonly: bool = False,
                 conf: str | None = None, user: str | None = None, keyring: str | None = None) -> None:
        self.spec = spec
        self.pool, self.namespace, self.name = parse_image(spec)
        self.readonly = readonly
        self._conf = (conf, user, keyring)
        self.fenced = False
        # told (from any thread) when the image changed behind our back (a resize)
        self.on_change: Callable[[], None] = lambda: None
        # told (on the loop) when the cluster fenced this client: its writes cannot land
        self.on_fenced: Callable[[], None] = lambda: None
        self.aio = RbdAio(self)
        self._open(size)

    def _open(self, size: int | None) -> None:
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

    def _image(self, ioctx: IoCtx, size: int | None) -> Image:
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
        """A new client and image handle (after this one was fenced): blocking;
        aio.detach() first, on the loop."""
        self._close_handles()
        self._open(None)
        self.fenced = False

    # ---------------------------------------------------------------- errors
    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except CephError as e:
            if e.errno == EBLOCKLISTED:
                self.fenced = True
            raise BackendError(f"rbd:{self.spec}: {e.strerror}") from None

    # ---------------------------------------------------------------- Backend
    def size(self) -> int:
        """Cached: every command checks its range; refresh_size() reads it again."""
        return self._size

    def refresh_size(self) -> int:
        self._size = self._call(self.image.size)
        return self._size

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._call(self.image.read, offset, buf)

    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None:
        for b in bufs:
            self._call(self.image.write, offset, b, sync)
            offset += memoryview(b).nbytes

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        return False   # every read goes over the network

    def write_nowait(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> bool:
        return False

    def flush(self) -> None:
        self._call(self.image.flush)

    def discard(self, offset: int, length: int) -> None:
        self._call(self.image.discard, offset, length)

    def write_same(self, offset: int, length: int, block: bytes, sync: bool) -> None:
        """`length` bytes of `block` repeated, in the OSDs (see RbdAio.write_same)."""
        self._call(self.image.write_same, offset, length, block)

    def resize(self, size: int) -> None:
        self._call(self.image.resize, size)
        self.refresh_size()

    def compare_and_write(self, offset: int, compare: bytes, data: bytes, sync: bool) -> int | None:
        """Write `data` if the medium holds `compare`: None, else the offset of
        the first byte that differs. librbd compares and writes in the OSD, as
        one operation, for one aligned 512-byte sector (all Pacific's librbd
        takes); longer ones read, compare and write here, which the caller's
        write gate and the exclusive lock (no other gateway writes) make atomic."""
        if len(compare) == 512 and offset % 512 == 0:
            return self._call(self.image.compare_and_write, offset, compare, data)
        have = bytearray(len(compare))
        self.read_into(offset, memoryview(have))
        if have != compare:
            return next(i for i, (a, b) in enumerate(zip(have, compare)) if a != b)
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
        self._call(self.image.diff_iterate, offset, end - offset, each)
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

    def allocated(self) -> int:
        """Bytes the image has allocated, as far as librbd's diff reports (whole objects)."""
        total = 0

        def add(o: int, n: int, exists: bool) -> bool:
            nonlocal total
            total += n if exists else 0
            return True
        self._call(self.image.diff_iterate, 0, self._size, add, True)
        return total

    # ---------------------------------------------------------------- gateways
    def lock_acquire(self) -> None:
        """Hold the image's exclusive lock (blocking); BackendError while a live
        gateway holds it."""
        self._call(self.image.lock_acquire)

    def lock_release(self) -> None:
        self._call(self.image.lock_release)

    def is_lock_owner(self) -> bool:
        return bool(self._call(self.image.is_lock_owner))

    def lock_owners(self) -> list[str]:
        return self._call(self.image.lock_owners)

    def client_address(self) -> str:
        return self.client.address()

    def pr_store(self) -> PrStore:
        return PrStore(self)

    # ---------------------------------------------------------------- life
    def _close_handles(self) -> None:
        image, ioctx, client = self.image, self.ioctx, self.client
        for step in (image.close, ioctx.destroy, client.shutdown):
            try:
                step()
            except CephError:
                pass   # a fenced client fails to let go cleanly; its handles go anyway

    def close(self) -> None:
        self.aio.detach()
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
        text = self._do(self.backend.image.metadata_get, PR_KEY)
        return None if text is None else json.loads(text)

    def write(self, doc: Any) -> bool:
        if doc is None:
            self._do(self.backend.image.metadata_remove, PR_KEY)
            return False
        self._do(self.backend.image.metadata_set, PR_KEY, json.dumps(doc, separators=(",", ":")))
        return True

    def _do(self, fn: Callable[..., Any], *args: Any) -> Any:
        """OSError on failure, as the reservation saver expects of a store."""
        try:
            return self.backend._call(fn, *args)
        except BackendError as e:
            raise OSError(errno.EIO, str(e)) from None


class RbdAio:
    """The aio twins of the backend's I/O calls (same names and arguments):
    each returns a future of the event loop it is first called on, done when
    librbd completes the call. A buffer stays pinned until then."""

    def __init__(self, backend: RbdBackend) -> None:
        self.backend = backend
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._pending: dict[int, tuple[asyncio.Future, Pinned, int]] = {}

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._fd = self.backend.image.enable_events()
            loop.add_reader(self._fd, self._collect)
        return loop

    def detach(self) -> None:
        """Stop collecting (the image closes): what is still pending fails.
        From another thread (management closing a LUN) it runs on the loop."""
        loop = self._loop
        if loop is not None and not _on(loop):
            done = threading.Event()

            def there() -> None:
                self.detach()
                done.set()
            loop.call_soon_threadsafe(there)
            done.wait(5)
            return
        if loop is not None and self._fd >= 0:
            loop.remove_reader(self._fd)
        for fut, pin, _ in self._pending.values():
            pin.release()
            if not fut.done():
                fut.set_exception(BackendError(f"rbd:{self.backend.spec}: image closed"))
        self._pending.clear()
        self._loop, self._fd = None, -1

    def _submit(self, pin: Pinned, length: int, name: str, *args: Any) -> asyncio.Future:
        """Start `rbd_aio_NAME`; `length`: the bytes a read must report (writes report 0)."""
        loop = self._attach()
        image = self.backend.image
        comp = image.completion()
        try:
            image.start(name, comp, *args)
        except CephError as e:
            pin.release()
            if e.errno == EBLOCKLISTED:
                self._fenced()
            raise BackendError(f"rbd:{self.backend.spec}: {e.strerror}") from None
        fut = loop.create_future()
        self._pending[comp] = (fut, pin, length)
        return fut

    def _collect(self) -> None:
        for comp, ret in self.backend.image.poll():
            entry = self._pending.pop(comp, None)
            if entry is None:
                continue
            fut, pin, length = entry
            pin.release()
            if fut.done():
                continue
            if ret < 0:
                if -ret == EBLOCKLISTED:
                    self._fenced()
                fut.set_exception(BackendError(f"rbd:{self.backend.spec}: {os.strerror(-ret)}"))
            elif length and ret != length:
                fut.set_exception(BackendError(f"rbd:{self.backend.spec}: {ret} of {length} bytes"))
            else:
                fut.set_result(None)

    def _fenced(self) -> None:
        if not self.backend.fenced:
            self.backend.fenced = True
            self.backend.on_fenced()

    def read_into(self, offset: int, buf: memoryview) -> asyncio.Future:
        pin = Pinned()
        arr, n, total = pin.iovecs([buf], writable=True)
        return self._submit(pin, total, "readv", arr, n, offset, COMP)

    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> asyncio.Future:
        # no client cache: a write is on the OSDs when it completes, FUA or not
        pin = Pinned()
        arr, n, total = pin.iovecs(bufs)
        return self._submit(pin, 0, "writev", arr, n, offset, COMP)

    def flush(self) -> asyncio.Future:
        return self._submit(Pinned(), 0, "flush", COMP)

    def discard(self, offset: int, length: int) -> asyncio.Future:
        return self._submit(Pinned(), 0, "discard", offset, length, COMP)

    def write_same(self, offset: int, length: int, block: bytes, sync: bool) -> asyncio.Future:
        """`length` bytes of `block` repeated, in the OSDs: zeros through
        write_zeroes (kept allocated: the initiator did not ask to unmap),
        other data through writesame."""
        pin = Pinned()
        if not any(block):
            return self._submit(pin, 0, "write_zeroes", offset, length, COMP,
                                WRITE_ZEROES_FLAG_THICK_PROVISION, 0)
        return self._submit(pin, 0, "writesame", offset, length, pin.address(block), len(block), COMP, 0)


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread runs `loop`."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
