"""The librados and librbd C calls the RBD backend makes, through ctypes.

Why ctypes and not Debian's python3-rados/python3-rbd: their Image lacks
compare-and-write, writesame, update watches and completion polling, and it
keeps its rbd_image_t to itself, so ctypes could not add those calls on the
same image. A gateway must make every call through one cluster client: that
client is what holds the image's exclusive lock and what a peer blocklists
when it takes over (docs/decisions/0400-rbd-gateways.md). ctypes also loads
librbd.so.1 from any Python, where the Debian modules need CPython 3.11.

This module only declares and wraps calls; it knows nothing of SCSI.
"""
from __future__ import annotations

import ctypes
import errno
import importlib
import os
from ctypes import (
    POINTER, byref, c_char_p, c_int, c_int64, c_size_t, c_ssize_t, c_uint8,
    c_uint64, c_void_p,
)
from typing import Any, Callable

try:   # the compiled build's C helper (scripts/build-accel): one C call per aio start and per collection
    # (by name: `from backends import` would be an import of the package, which imports this module)
    _rbdaio: Any = importlib.import_module("backends._rbdaio")
except ImportError:
    _rbdaio = None

EVENT_TYPE_EVENTFD = 2
LOCK_MODE_EXCLUSIVE = 0
FEATURE_EXCLUSIVE_LOCK = 1 << 2   # RBD_FEATURE_EXCLUSIVE_LOCK
IMAGE_OPTION_FEATURES_SET = 8     # RBD_IMAGE_OPTION_FEATURES_SET: added to the default features
WRITE_ZEROES_FLAG_THICK_PROVISION = 1
OP_FLAG_FADVISE_FUA = 0x80
EBLOCKLISTED = errno.ESHUTDOWN   # what librados returns to a client on the OSD blocklist

# what every gateway's client sets, whatever ceph.conf says (docs/decisions/0400)
CLIENT_OPTIONS = {
    # no client cache: a write completes once the OSDs have it, so GOOD is never
    # early (Pacific's default write-around cache acknowledges writes at once,
    # and its write-through mode blocks the submitting thread in aio calls);
    # so nothing is left for SYNCHRONIZE CACHE or FUA to flush (0401)
    "rbd_cache": "false",
    # a discard of less than the discard granularity zeroes its range instead
    # of being skipped: unmapped blocks read back as zeros (LBPRZ)
    "rbd_skip_partial_discard": "false",
    # WRITE SAME of zeros writes them unless the initiator asked to unmap
    "rbd_discard_on_zeroed_write_same": "false",
    # taking a lock from a dead holder blocklists it: its late writes cannot land
    "rbd_blocklist_on_break_lock": "true",
    # a cluster that cannot be reached is an error in seconds, not a hang
    "client_mount_timeout": "15",
    "rados_mon_op_timeout": "15",
    # nor is an OSD that does not answer: every call, aio ones included, ends
    # within this (ETIMEDOUT), so rbd_close, which waits for them, ends too, and
    # one hung reservation write does not hold the others (ceph-iscsi's value)
    "rados_osd_op_timeout": "30",
    # an aio write is sent from the caller's buffer, not from a copy librbd
    # makes on the submitting thread (the event loop: a 1 MiB memcpy per 1 MiB
    # write). librbd holds the completion back until its last reference to
    # that memory is gone, and RbdAio keeps the buffer pinned until the
    # completion; nothing of ours changes write data while its call is in
    # flight (front ends copy guest data into their region, 0301), which is
    # what librbd's copy guards against. Synchronous calls still copy (0420)
    "rbd_disable_zero_copy_writes": "false",
    # one librados completion thread, not two: it takes completions in runs
    # where two took turns waking for each (per 4 KiB I/O at QD16: 1.4 sleeps
    # for 2.0 on writes, 0.9 for 1.4 on reads, less CPU; decision 0409)
    "librados_thread_count": "1",
}


class CephError(OSError):
    """A librados/librbd call failed; errno is the positive error code."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise CephError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def _load(name: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise CephError(errno.ENOENT, f"{name} is not installed (apt-get install librbd1): {e}") from None


_lib: tuple[ctypes.CDLL, ctypes.CDLL] | None = None

DIFF_CB = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)
UPDATE_CB = ctypes.CFUNCTYPE(None, c_void_p)


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


class ImageInfo(ctypes.Structure):
    _fields_ = [("size", c_uint64), ("obj_size", c_uint64), ("num_objs", c_uint64), ("order", c_int),
                ("block_name_prefix", ctypes.c_char * 24), ("parent_pool", c_int64),
                ("parent_name", ctypes.c_char * 96)]


class PyBuffer(ctypes.Structure):
    """CPython's Py_buffer: how a read-only buffer (shared memory a front end
    lends) gives its address without a copy."""
    _fields_ = [("buf", c_void_p), ("obj", c_void_p), ("len", c_ssize_t), ("itemsize", c_ssize_t),
                ("readonly", c_int), ("ndim", c_int), ("format", c_char_p), ("shape", c_void_p),
                ("strides", c_void_p), ("suboffsets", c_void_p), ("internal", c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, POINTER(PyBuffer), c_int]
_get_buffer.restype = c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [POINTER(PyBuffer)]
_release_buffer.restype = None
_PyBUF_WRITABLE = 0x0001


class Pinned:
    """Buffers held at fixed addresses until release(): what an aio call reads
    from or writes into while librbd works on it. A writable buffer is held by
    a ctypes array over it (no foreign call: the array's export is the pin,
    dropped with the array); a read-only one (shared memory a front end
    lends, bytes) through PyObject_GetBuffer, which ctypes arrays cannot take."""

    __slots__ = ("views",)

    def __init__(self) -> None:
        self.views: list[Any] = []

    def address(self, obj: Any, writable: bool = False) -> int:
        return self.span(obj, writable)[0]

    def span(self, obj: Any, writable: bool = False) -> tuple[int, int]:
        """(address, bytes) of a buffer, held until release()."""
        mv = memoryview(obj)
        if not mv.readonly:
            arr = (ctypes.c_char * mv.nbytes).from_buffer(mv)
            self.views.append(arr)
            return ctypes.addressof(arr), mv.nbytes
        if writable:
            raise BufferError("a read-only buffer cannot take read data")
        view = PyBuffer()
        _get_buffer(obj, byref(view), 0)   # raises on failure
        self.views.append(view)
        return view.buf or 0, mv.nbytes

    def iovecs(self, bufs: Any) -> tuple[Any, int, int]:
        """(iovec array, count, total bytes) over these buffers (a writev's);
        the array is held too, as long as the call may read it."""
        bufs = list(bufs)
        arr = (Iovec * len(bufs))()
        total = 0
        for i, b in enumerate(bufs):
            arr[i].iov_base, arr[i].iov_len = self.span(b)
            total += arr[i].iov_len
        self.views.append(arr)
        return arr, len(bufs), total

    def release(self) -> None:
        for view in self.views:
            if type(view) is PyBuffer:
                _release_buffer(byref(view))
        self.views.clear()   # the arrays go, and their exports with them


def hold(obj: Any, writable: bool = False) -> tuple[Any, Any, int]:
    """(pin, pointer, bytes) of one buffer for an aio call, with the fewest
    objects and foreign calls: the pin holds the buffer until backends.rbd
    drops it. A writable buffer is held by one c_char over it (its export is
    the pin); a bytes object, or a whole view of one (write data a front end
    sent), never moves and is passed as itself; anything else (shared memory a
    front end lends) goes through Pinned."""
    mv = memoryview(obj)
    n = mv.nbytes
    if not mv.readonly and n:
        keep = ctypes.c_char.from_buffer(mv)
        return keep, ctypes.addressof(keep), n
    whole = mv.obj
    if type(whole) is bytes and n == len(whole) and mv.c_contiguous and not writable:
        return whole, whole, n
    pin = Pinned()
    return pin, pin.address(obj, writable), n


def libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """librados and librbd, with the signatures this module calls declared."""
    global _lib
    if _lib is not None:
        return _lib
    rados, rbd = _load("librados.so.2"), _load("librbd.so.1")
    P = c_void_p
    sig: dict[ctypes.CDLL, dict[str, tuple[Any, list[Any] | None]]] = {
        rados: {
            "rados_create2": (c_int, [POINTER(P), c_char_p, c_char_p, c_uint64]),
            "rados_conf_read_file": (c_int, [P, c_char_p]),
            "rados_conf_set": (c_int, [P, c_char_p, c_char_p]),
            "rados_connect": (c_int, [P]),
            "rados_shutdown": (None, [P]),
            "rados_cluster_fsid": (c_int, [P, c_char_p, c_size_t]),
            "rados_get_instance_id": (c_uint64, [P]),
            "rados_getaddrs": (c_int, [P, POINTER(c_char_p)]),
            "rados_buffer_free": (None, [c_char_p]),
            "rados_ioctx_create": (c_int, [P, c_char_p, POINTER(P)]),
            "rados_ioctx_destroy": (None, [P]),
            "rados_ioctx_get_id": (c_int64, [P]),
            "rados_ioctx_set_namespace": (None, [P, c_char_p]),
        },
        rbd: {
            "rbd_create4": (c_int, [P, c_char_p, c_uint64, P]),
            "rbd_image_options_create": (None, [POINTER(P)]),
            "rbd_image_options_destroy": (None, [P]),
            "rbd_image_options_set_uint64": (c_int, [P, c_int, c_uint64]),
            "rbd_open": (c_int, [P, c_char_p, POINTER(P), c_char_p]),
            "rbd_close": (c_int, [P]),
            "rbd_get_size": (c_int, [P, POINTER(c_uint64)]),
            "rbd_get_features": (c_int, [P, POINTER(c_uint64)]),
            "rbd_get_id": (c_int, [P, c_char_p, c_size_t]),
            "rbd_stat": (c_int, [P, POINTER(ImageInfo), c_size_t]),
            "rbd_compare_and_write": (c_ssize_t, [P, c_uint64, c_size_t, c_void_p, c_void_p,
                                                  POINTER(c_uint64), c_int]),
            "rbd_resize": (c_int, [P, c_uint64]),
            "rbd_read": (c_ssize_t, [P, c_uint64, c_size_t, c_void_p]),
            "rbd_write2": (c_ssize_t, [P, c_uint64, c_size_t, c_void_p, c_int]),
            "rbd_flush": (c_int, [P]),
            "rbd_discard": (c_int, [P, c_uint64, c_uint64]),
            "rbd_writesame": (c_ssize_t, [P, c_uint64, c_size_t, c_void_p, c_size_t, c_int]),
            "rbd_write_zeroes": (c_ssize_t, [P, c_uint64, c_size_t, c_int, c_int]),
            "rbd_set_image_notification": (c_int, [P, c_int, c_int]),
            "rbd_poll_io_events": (c_int, [P, POINTER(P), c_int]),
            # (no argtypes: called with None, None and a byref only (Image.start),
            # which ctypes passes as they are; their conversion cost more than the call)
            "rbd_aio_create_completion": (c_int, None),
            "rbd_aio_get_return_value": (c_ssize_t, [P]),
            "rbd_aio_is_complete": (c_int, [P]),
            "rbd_aio_release": (None, [P]),
            "rbd_aio_read": (c_int, [P, c_uint64, c_size_t, c_void_p, P]),
            "rbd_aio_write": (c_int, [P, c_uint64, c_size_t, c_void_p, P]),
            "rbd_aio_writev": (c_int, [P, c_void_p, c_int, c_uint64, P]),
            "rbd_aio_flush": (c_int, [P, P]),
            "rbd_aio_discard": (c_int, [P, c_uint64, c_uint64, P]),
            "rbd_aio_writesame": (c_int, [P, c_uint64, c_size_t, c_void_p, c_size_t, P, c_int]),
            "rbd_aio_write_zeroes": (c_int, [P, c_uint64, c_size_t, P, c_int, c_int]),
            "rbd_aio_compare_and_write": (c_ssize_t, [P, c_uint64, c_size_t, c_void_p, c_void_p, P,
                                                     POINTER(c_uint64), c_int]),
            "rbd_diff_iterate2": (c_int, [P, c_char_p, c_uint64, c_uint64, c_uint8, c_uint8, DIFF_CB,
                                          c_void_p]),
            "rbd_update_watch": (c_int, [P, POINTER(c_uint64), UPDATE_CB, c_void_p]),
            "rbd_update_unwatch": (c_int, [P, c_uint64]),
            "rbd_lock_acquire": (c_int, [P, c_int]),
            "rbd_lock_release": (c_int, [P]),
            "rbd_is_exclusive_lock_owner": (c_int, [P, POINTER(c_int)]),
            "rbd_lock_get_owners": (c_int, [P, POINTER(c_int), POINTER(c_char_p), POINTER(c_size_t)]),
            "rbd_lock_get_owners_cleanup": (None, [POINTER(c_char_p), c_size_t]),
            "rbd_metadata_get": (c_int, [P, c_char_p, c_char_p, POINTER(c_size_t)]),
            "rbd_metadata_set": (c_int, [P, c_char_p, c_char_p]),
            "rbd_metadata_remove": (c_int, [P, c_char_p]),
        },
    }
    for lib, fns in sig.items():
        for name, (restype, argtypes) in fns.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    _lib = (rados, rbd)
    return _lib


class BatchThreads:
    """Threads librados and librbd start inside this block (a connection to
    the cluster and its image opened, backends.rbd) are SCHED_BATCH:
    a thread inherits its creator's policy, so the calling thread takes it
    for the block. Woken by an aio call of the STML's event loop, such a
    thread does not preempt the loop in the middle of that call (decision
    0419); it still gets its fair share of the CPU. A caller with any other
    policy than SCHED_OTHER (real time, say) is left as it is."""

    def __enter__(self) -> BatchThreads:
        self._was: int | None = None
        try:
            if os.sched_getscheduler(0) == os.SCHED_OTHER:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
                self._was = os.SCHED_OTHER
        except (AttributeError, OSError):   # (not Linux, or not allowed: threads as they come)
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._was is not None:
            os.sched_setscheduler(0, self._was, os.sched_param(0))


class Client:
    """One connection to a cluster (a `client.USER` instance)."""

    def __init__(self, conf: str | None = None, user: str | None = None,
                 keyring: str | None = None) -> None:
        rados, _ = libs()
        self._rados = rados
        handle = c_void_p()
        _check(rados.rados_create2(byref(handle), b"ceph", f"client.{user or 'admin'}".encode(), 0),
               "rados_create2")
        self.handle = handle
        try:
            # conf None: the default search (CEPH_CONF, /etc/ceph/ceph.conf, ...)
            _check(rados.rados_conf_read_file(handle, conf.encode() if conf else None),
                   f"reading {conf or 'the default ceph.conf'}")
            if keyring:
                self._set("keyring", keyring)
            for key, value in CLIENT_OPTIONS.items():
                self._set(key, value)
            _check(rados.rados_connect(handle), "connecting to the cluster")
        except BaseException:
            rados.rados_shutdown(handle)
            raise

    def _set(self, key: str, value: str) -> None:
        _check(self._rados.rados_conf_set(self.handle, key.encode(), value.encode()), f"setting {key}")

    def fsid(self) -> str:
        buf = ctypes.create_string_buffer(64)
        _check(self._rados.rados_cluster_fsid(self.handle, buf, len(buf)), "rados_cluster_fsid")
        return buf.value.decode()

    def instance_id(self) -> int:
        return int(self._rados.rados_get_instance_id(self.handle))

    def address(self) -> str:
        out = c_char_p()
        _check(self._rados.rados_getaddrs(self.handle, byref(out)), "rados_getaddrs")
        try:
            return (out.value or b"").decode()
        finally:
            self._rados.rados_buffer_free(out)

    def ioctx(self, pool: str, namespace: str = "") -> IoCtx:
        return IoCtx(self, pool, namespace)

    def shutdown(self) -> None:
        if self.handle:
            self._rados.rados_shutdown(self.handle)
            self.handle = c_void_p()


class IoCtx:
    def __init__(self, client: Client, pool: str, namespace: str = "") -> None:
        self._rados = client._rados
        handle = c_void_p()
        _check(self._rados.rados_ioctx_create(client.handle, pool.encode(), byref(handle)),
               f"opening pool {pool}")
        self.handle = handle
        if namespace:
            self._rados.rados_ioctx_set_namespace(handle, namespace.encode())

    def pool_id(self) -> int:
        return int(self._rados.rados_ioctx_get_id(self.handle))

    def destroy(self) -> None:
        if self.handle:
            self._rados.rados_ioctx_destroy(self.handle)
            self.handle = c_void_p()


# the aio calls Image.start makes: each takes the image, arguments, the completion, then flags
AIO_CALLS = ("read", "write", "writev", "flush", "discard", "writesame", "write_zeroes")


def create_image(ioctx: IoCtx, name: str, size: int) -> None:
    """A new image with the client's default features plus exclusive-lock,
    which serving it needs (0238): defaults made for krbd may lack it."""
    _, rbd = libs()
    opts = c_void_p()
    rbd.rbd_image_options_create(byref(opts))
    try:
        _check(rbd.rbd_image_options_set_uint64(opts, IMAGE_OPTION_FEATURES_SET, FEATURE_EXCLUSIVE_LOCK),
               f"creating image {name}")
        _check(rbd.rbd_create4(ioctx.handle, name.encode(), size, opts), f"creating image {name}")
    finally:
        rbd.rbd_image_options_destroy(opts)


class Image:
    """An open image: synchronous calls (any thread) and aio calls whose
    completions are collected with poll() once the eventfd given to
    enable_events() is readable."""

    POLL_BATCH = 64

    def __init__(self, ioctx: IoCtx, name: str) -> None:
        _, rbd = libs()
        self._rbd = rbd
        handle = c_void_p()
        _check(rbd.rbd_open(ioctx.handle, name.encode(), byref(handle), None), f"opening image {name}")
        self.handle = handle
        self._comps = (c_void_p * self.POLL_BATCH)()
        # _poll's carry (the C helper's is in _calls): comps[:handed] of the
        # last batch are handed over, comps[:released] of those released, and
        # comps[handed:polled] wait for the next _poll (out of memory)
        self._released = self._handed = self._polled = 0
        self._watch: tuple[c_uint64, Any] | None = None
        self._fd = -1   # the eventfd librbd signals (enable_events)
        # the aio path's calls, looked up once, and the completion's out-argument made once
        self._aio = {name: getattr(rbd, f"rbd_aio_{name}") for name in AIO_CALLS}
        self._new_comp = rbd.rbd_aio_create_completion
        self._comp = c_void_p()
        self._comp_ref = byref(self._comp)
        self._poll_events = rbd.rbd_poll_io_events
        self._return_value = rbd.rbd_aio_get_return_value
        self._release = rbd.rbd_aio_release
        # the same calls for the C helper, as addresses (backends/rbdaio.c)
        def addr(fn: Any) -> int:
            return ctypes.cast(fn, c_void_p).value or 0
        # (the last two: what the helper's collect() could not hand over, out of
        # memory, and the eventfd it then signals; enable_events() sets it)
        self._calls = (handle.value or 0, addr(self._new_comp), addr(self._release), addr(self._return_value),
                       addr(self._poll_events), bytearray(_rbdaio.CARRY_BYTES if _rbdaio else 0), -1)
        io = {"read": addr(rbd.rbd_aio_read), "write": addr(rbd.rbd_aio_write)}
        # start_buffer(name, offset, buf, writable, future, pending): start
        # rbd_aio_NAME (read or write) over the whole of `buf`, recorded first as
        # pending[completion] = (future, pin, bytes a read must report). The pin
        # holds the buffer until the entry is dropped (backends.rbd, after the
        # completion); a call that cannot start raises (CephError when librbd
        # refused it), with no entry left and its buffer let go. The C helper's
        # when the build has it (one C call, no Python frame; the pin a
        # memoryview of our own), else hold() and start()
        self.start_buffer: Callable[[str, int, Any, bool, Any, dict[int, Any]], None] = (
            _rbdaio.starter((self._calls, io, CephError)) if _rbdaio is not None
            else self._start_buffer)
        self.poll: Callable[[], list[tuple[int, int]]] = self._poll   # (see _poll; the helper's once events are on)

    # ---------------------------------------------------------------- sync
    def size(self) -> int:
        n = c_uint64()
        _check(self._rbd.rbd_get_size(self.handle, byref(n)), "rbd_get_size")
        return n.value

    def features(self) -> int:
        n = c_uint64()
        _check(self._rbd.rbd_get_features(self.handle, byref(n)), "rbd_get_features")
        return n.value

    def image_id(self) -> str:
        buf = ctypes.create_string_buffer(64)
        _check(self._rbd.rbd_get_id(self.handle, buf, len(buf)), "rbd_get_id")
        return buf.value.decode()

    def object_size(self) -> int:
        info = ImageInfo()
        _check(self._rbd.rbd_stat(self.handle, byref(info), ctypes.sizeof(info)), "rbd_stat")
        return int(info.obj_size)

    def resize(self, size: int) -> None:
        _check(self._rbd.rbd_resize(self.handle, size), "rbd_resize")

    def compare_and_write(self, offset: int, compare: bytes, data: bytes) -> int | None:
        """Compare and write in the OSD, as one operation (synchronous: Pacific's
        aio variant does not signal the eventfd). None, or the offset of the
        first byte that differs."""
        mismatch = c_uint64(0)
        ret = self._rbd.rbd_compare_and_write(self.handle, offset, len(compare), compare, data,
                                              byref(mismatch), 0)
        if ret == -errno.EILSEQ:
            return int(mismatch.value)
        _check(ret, "rbd_compare_and_write")
        return None

    def read(self, offset: int, buf: Any) -> None:
        pin = Pinned()
        try:
            n = memoryview(buf).nbytes
            got = _check(self._rbd.rbd_read(self.handle, offset, n, pin.address(buf, True)), "rbd_read")
        finally:
            pin.release()
        if got != n:
            raise CephError(errno.EIO, f"rbd_read: {got} of {n} bytes")

    def write(self, offset: int, buf: Any, fua: bool = False) -> None:
        pin = Pinned()
        try:
            n = memoryview(buf).nbytes
            _check(self._rbd.rbd_write2(self.handle, offset, n, pin.address(buf),
                                        OP_FLAG_FADVISE_FUA if fua else 0), "rbd_write")
        finally:
            pin.release()

    def flush(self) -> None:
        _check(self._rbd.rbd_flush(self.handle), "rbd_flush")

    def discard(self, offset: int, length: int) -> None:
        _check(self._rbd.rbd_discard(self.handle, offset, length), "rbd_discard")

    def write_same(self, offset: int, length: int, block: bytes) -> None:
        if any(block):
            _check(self._rbd.rbd_writesame(self.handle, offset, length, block, len(block), 0), "rbd_writesame")
        else:
            _check(self._rbd.rbd_write_zeroes(self.handle, offset, length, WRITE_ZEROES_FLAG_THICK_PROVISION, 0),
                   "rbd_write_zeroes")

    def diff_iterate(self, offset: int, length: int, cb: Callable[[int, int, bool], bool]) -> None:
        """Call cb(offset, length, exists) for each allocated (or discarded)
        extent from the image's creation; cb returns False to stop early."""
        def each(off: int, n: int, exists: int, arg: Any) -> int:
            return 0 if cb(off, n, bool(exists)) else -errno.ECANCELED
        ret = self._rbd.rbd_diff_iterate2(self.handle, None, offset, length, 1, 0, DIFF_CB(each), None)
        if ret != -errno.ECANCELED:
            _check(ret, "rbd_diff_iterate2")

    # ---------------------------------------------------------------- locks
    def lock_acquire(self) -> None:
        """Take the exclusive lock and keep it (no handing over on request);
        breaks it, blocklisting the holder, only when the holder is dead."""
        _check(self._rbd.rbd_lock_acquire(self.handle, LOCK_MODE_EXCLUSIVE), "rbd_lock_acquire")

    def lock_release(self) -> None:
        _check(self._rbd.rbd_lock_release(self.handle), "rbd_lock_release")

    def is_lock_owner(self) -> bool:
        owner = c_int()
        _check(self._rbd.rbd_is_exclusive_lock_owner(self.handle, byref(owner)),
               "rbd_is_exclusive_lock_owner")
        return bool(owner.value)

    def lock_owners(self) -> list[str]:
        mode = c_int()
        owners = (c_char_p * 8)()
        count = c_size_t(len(owners))
        ret = self._rbd.rbd_lock_get_owners(self.handle, byref(mode), owners, byref(count))
        if ret == -errno.ENOENT:
            return []
        _check(ret, "rbd_lock_get_owners")
        try:
            return [(owners[i] or b"").decode() for i in range(count.value)]
        finally:
            self._rbd.rbd_lock_get_owners_cleanup(owners, count.value)

    # ---------------------------------------------------------------- metadata
    def metadata_get(self, key: str) -> str | None:
        size = c_size_t(4096)
        while True:
            buf = ctypes.create_string_buffer(size.value)
            ret = self._rbd.rbd_metadata_get(self.handle, key.encode(), buf, byref(size))
            if ret == -errno.ENOENT:
                return None
            if ret == -errno.ERANGE:
                continue   # size now says how much it needs
            _check(ret, f"reading image metadata {key}")
            return buf.value.decode()

    def metadata_set(self, key: str, value: str) -> None:
        _check(self._rbd.rbd_metadata_set(self.handle, key.encode(), value.encode()),
               f"writing image metadata {key}")

    def metadata_remove(self, key: str) -> None:
        ret = self._rbd.rbd_metadata_remove(self.handle, key.encode())
        if ret != -errno.ENOENT:
            _check(ret, f"removing image metadata {key}")

    # ---------------------------------------------------------------- watch
    def watch_updates(self, cb: Callable[[], None]) -> None:
        """cb() (on a librbd thread) whenever the image's header changes: a resize."""
        fn = UPDATE_CB(lambda arg: cb())
        handle = c_uint64()
        _check(self._rbd.rbd_update_watch(self.handle, byref(handle), fn, None), "rbd_update_watch")
        self._watch = (handle, fn)   # the callback must outlive the watch

    # ---------------------------------------------------------------- aio
    def enable_events(self, fd: int) -> None:
        """librbd signals `fd`, an eventfd, when aio calls complete. The caller
        owns it and closes it only after close(): librbd may signal it until
        then, and an event loop may still watch it."""
        _check(self._rbd.rbd_set_image_notification(self.handle, fd, EVENT_TYPE_EVENTFD),
               "rbd_set_image_notification")
        self._fd = fd
        self._calls = (*self._calls[:-1], fd)
        if _rbdaio is not None:   # (bound to the calls with the eventfd: no Python frame per wake-up)
            self.poll = _rbdaio.collector(self._calls)

    def start(self, name: str, args: tuple, flags: tuple, entry: Any, pending: dict[int, Any]) -> None:
        """Start `rbd_aio_NAME(image, *args, completion, *flags)` (NAME one of
        AIO_CALLS), recorded first as pending[completion address] = entry, the
        address by which poll() reports it: nothing that can fail for want of
        memory comes after librbd has the call. A call that cannot start
        releases its completion, leaves no entry and raises. One thread at a
        time (the completion's out-argument is made once). (Positional
        arguments, not *args and a keyword: called per command.)"""
        _check(self._new_comp(None, None, self._comp_ref), "rbd_aio_create_completion")
        comp = self._comp.value or 0
        try:
            pending[comp] = entry
        except BaseException:
            self._release(comp)
            raise
        # (the completion passed as its c_void_p: ctypes takes it as it is, where
        # an int would be converted into a new one.) ctypes raises these two only
        # while converting the arguments, before librbd has the call; any other
        # exception (a signal handler's, run once the call returned) leaves the
        # entry for poll() to collect
        try:
            ret = self._aio[name](self.handle, *args, self._comp, *flags)
        except (ctypes.ArgumentError, MemoryError):
            del pending[comp]
            self._release(comp)
            raise
        if ret < 0:
            del pending[comp]
            self._release(comp)
            raise CephError(-ret, f"rbd_aio_{name}: {os.strerror(-ret)}")

    def _start_buffer(self, name: str, offset: int, buf: Any, writable: bool, fut: Any,
                      pending: dict[int, Any]) -> None:
        """start_buffer without the C helper: hold() and start()."""
        pin, ptr, n = hold(buf, writable)
        try:
            self.start(name, (offset, n, ptr), (), (fut, pin, n if writable else 0), pending)
        except BaseException:
            if type(pin) is Pinned:
                pin.release()
            raise

    def _poll(self) -> list[tuple[int, int]]:
        """poll(): the eventfd read (enable_events), then (completion address,
        return value) of every finished aio call; each completion is released
        once its item is in the list. The eventfd is read here rather than by
        the caller: the C helper's collect (poll once events are on) reads it
        in the same C call. Out of memory partway, as the helper does (0422):
        what was not handed over stays in the carry, unreleased, the eventfd
        is signalled so that the loop polls again, and what was handed over
        is returned: each call is reported once, none lost."""
        out: list[tuple[int, int]] = []
        try:
            try:
                os.eventfd_read(self._fd)
            except BlockingIOError:
                pass
            if self._released < self._polled:
                self._hand_over(out)   # what the last poll could not
            while True:
                self._released = self._handed = self._polled = 0
                n = self._poll_events(self.handle, self._comps, self.POLL_BATCH)
                if n > 0:
                    self._polled = n
                    self._hand_over(out)
                if n < self.POLL_BATCH:
                    return out
        except (MemoryError, ctypes.ArgumentError):   # (ctypes's, out of memory converting an argument)
            try:
                os.eventfd_write(self._fd, 1)
            except OSError:   # (EAGAIN: an eventfd at its limit is readable already)
                pass
            return out

    def _hand_over(self, out: list[tuple[int, int]]) -> None:
        """The carry into `out`, one completion at a time, each released once
        its item is in. No step allocates between taking an item in and
        recording it (the indexes stay below 257: cached ints), so running
        out of memory leaves the carry right for the next _poll."""
        comps, value, release = self._comps, self._return_value, self._release
        while self._released < self._handed:   # handed over, its release out of memory
            release(comps[self._released])
            self._released += 1
        handed, polled = self._handed, self._polled
        while handed < polled:
            comp = comps[handed]
            out.append((comp or 0, value(comp)))
            handed += 1
            self._handed = handed
            release(comp)
            self._released = handed

    def outcome(self, comp: int) -> int | None:
        """The return value of a call poll() never reported (the image closed
        first), releasing its completion; None while it is not complete."""
        rbd = self._rbd
        if not rbd.rbd_aio_is_complete(comp):
            return None
        ret = int(rbd.rbd_aio_get_return_value(comp))
        rbd.rbd_aio_release(comp)
        return ret

    def close(self) -> None:
        """rbd_close: returns once every aio call on the image has completed."""
        if self._watch is not None:
            self._rbd.rbd_update_unwatch(self.handle, self._watch[0])
            self._watch = None
        if self.handle:
            self._rbd.rbd_close(self.handle)
            self.handle = c_void_p()


__all__ = ["AIO_CALLS", "CephError", "Client", "IoCtx", "Image", "Pinned", "create_image", "hold"]
