"""File backend: a regular file or a block device, with positioned I/O."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from typing import Sequence

from backends.base import BackendError

log = logging.getLogger("backends.file")

_BLKGETSIZE64 = 0x80081272
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_IOV_MAX = 1024
_MAX_BLOCK = 4096   # the largest logical block size: a device's size rounded down to it is its LUN's
_ZEROS = memoryview(bytes(1 << 20))   # what a discard writes where no hole can be punched
# GET LBA STATUS on the event loop (mapped_extents_nowait): at most this many runs, so at
# most _INLINE_RUNS + 1 lseeks of about 1 us each; _SLOW_IN_A_ROW lookups in a row slower
# than _SLOW_LOOKUP_NS waited for device reads or a lock, and the next _BACKOFF_LOOKUPS go
# to worker threads (one alone is the loop thread preempted or waiting for the GIL)
_INLINE_RUNS = 8
_SLOW_LOOKUP_NS = 1_000_000
_SLOW_IN_A_ROW = 2
_BACKOFF_LOOKUPS = 1024


class FileBackend:
    """Blocking calls; the STML runs them in worker threads."""

    inline = False
    can_resize = True
    aio = None          # blocking calls only (see Backend.aio)
    # Not reported: qemu's iSCSI driver asks GET LBA STATUS before every read of
    # 32 KiB or more of a LUN that reports one (decision 0820).
    discard_granularity = 0

    def __init__(self, path: str, size: int | None = None, readonly: bool = False) -> None:
        self.path = path
        exists = os.path.exists(path)
        if not exists and not size:
            raise BackendError(f"{path}: does not exist and no size was given to create it")
        flags = (os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC
        if exists and stat.S_ISBLK(os.stat(path).st_mode):
            # claimed, as LIO's iblock claims it: a device mounted, in an LVM
            # volume group or an md array, or served by another target, is
            # refused (EBUSY) instead of corrupted by initiators' writes
            flags = flags & ~os.O_CREAT | os.O_EXCL
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.EBUSY and flags & os.O_EXCL:
                raise BackendError(f"{path}: in use (mounted, or held by LVM, md or another program): "
                                   f"{e.strerror}") from None
            if e.errno == errno.EROFS and os.environ.get("INVOCATION_ID"):   # a systemd service
                raise BackendError(f"{path}: {e.strerror} (if its file system is writable, the unit's "
                                   f"ProtectSystem=strict hides it: give its directory a ReadWritePaths= line)") from None
            raise BackendError(f"{path}: {e.strerror}") from None
        st = os.fstat(self._fd)
        self._blockdev = stat.S_ISBLK(st.st_mode)
        if not self._blockdev and not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise BackendError(f"{path}: not a regular file or block device")
        if not self._blockdev:
            try:
                _claim(self._fd, path, readonly)
            except BackendError:
                os.close(self._fd)
                raise
        # (a missing file always has a size: checked above)
        if size and (not exists or (not self._blockdev and st.st_size == 0)):
            try:
                os.ftruncate(self._fd, size)  # sparse: no blocks allocated until written
            except OSError as e:   # EFBIG: past the file system's largest file
                os.close(self._fd)
                if not exists:
                    os.unlink(path)   # made here, for a LUN that will not be
                raise BackendError(f"{path}: cannot be made {size} bytes long: {e.strerror}") from None
        self._in_memory = _fs_type(self._fd) in _MEMORY_FS
        self._size = self._measure()
        self._nowait_reads = True
        self._lookups_off_loop = 0    # lookups left to send to worker threads after slow ones
        self._slow_lookups = 0        # lookups in a row on the loop that took too long
        self._changing = _Changing()
        # write-back writes are numbered; a sync covers those numbered before it
        # started (decision 0255). Both only grow: read them without the lock.
        self._gen_lock = threading.Lock()
        self._written_gen = 0         # the last write-back write (or discard)
        self._synced_gen = 0          # the newest generation a completed sync covered
        # fdatasyncs under way, by ticket: a sync that returned 0 counts only once
        # each one under way when it returned has returned too, none failing (0258)
        self._sync_returned = threading.Condition(self._gen_lock)
        self._in_kernel: set[int] = set()
        self._tickets = 0
        # a failed sync, sticky until `lun reset-error` sets it None (decision 0256)
        self.sync_error: str | None = None
        self._failures = 0   # fdatasyncs that failed, ever (a sync alongside one fails too: 0258)
        self.can_discard = not self._blockdev and not readonly
        self.can_resize = self._blockdev or not readonly   # a device: to follow its size

    def size(self) -> int:
        """Measured at open and on resize() (every command checks its LBA range,
        and a system call per command cost 17% of the STML's time at 4 KiB);
        like LIO, a backing store grown behind our back takes `lun resize`."""
        return self._size

    def _measure(self) -> int:
        if self._blockdev:
            buf = fcntl.ioctl(self._fd, _BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("Q", buf)[0]
        return os.fstat(self._fd).st_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        done = os.preadv(self._fd, [buf], offset)   # the usual case: all of it at once
        size = len(buf)
        while done < size:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:  # past the end of a file shrunk under us: zeros
                buf[done:] = bytes(size - done)
                return
            done += n

    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None:
        with self._changing:
            self._write(offset, bufs, sync)

    def _write(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None:
        if sync and self.sync_error is not None:
            self._refuse_if_failed()   # before the data lands, not after (0257)
        if len(bufs) <= _IOV_MAX and os.pwritev(self._fd, bufs, offset) == sum(map(len, bufs)):
            self._written(sync)   # the usual case: one system call wrote it all
            return
        views = [memoryview(b).cast("B") for b in bufs]
        for i in range(0, len(views), _IOV_MAX):
            chunk = views[i:i + _IOV_MAX]
            total = sum(len(v) for v in chunk)
            while total:
                n = os.pwritev(self._fd, chunk, offset)
                offset += n
                total -= n
                if total:  # short write: drop what was written and go on
                    chunk = _advance(chunk, n)
        self._written(sync)

    def _written(self, sync: bool) -> None:
        """After a write: make it durable now, or remember that a flush must.
        Nothing on a memory file system is ever made more durable by a sync."""
        if sync:
            self._datasync()
        elif not self._in_memory:
            with self._gen_lock:      # (+= from two threads could lose a number)
                self._written_gen += 1

    @property
    def dirty(self) -> bool:
        """An acknowledged write-back write may not be durable yet: no sync that
        started after it has completed. A sync still running does not count:
        it may not cover what was written before it (a power loss during it)."""
        return self._synced_gen < self._written_gen

    def _datasync(self) -> None:
        """fdatasync, covering every write completed before it started: only
        when it returns are those generations synced. A failure is sticky
        (decision 0256): Linux may drop the pages it could not write and mark
        them clean, so a later fdatasync can succeed with acknowledged writes
        gone; every later sync fails until `lun reset-error`.

        Linux reports a write-back error to one fdatasync of an open file: of
        two under way at once, the other can return 0 though pages it should
        have covered were lost. So a sync that returned 0 waits until every
        sync still in the kernel when it returned has returned (those that
        returned before it have recorded their outcome already), and fails if
        a sync failed meanwhile; then it counts (decision 0258)."""
        if self._in_memory:
            return
        failures = self._failures   # first: a failure after this is one we may not pass
        self._refuse_if_failed()
        with self._gen_lock:
            start = self._written_gen
            self._tickets += 1
            ticket = self._tickets
            self._in_kernel.add(ticket)
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            with self._gen_lock:
                self._in_kernel.discard(ticket)
                self._failures += 1
                first = self.sync_error is None
                if first:   # (the first failure is the one the administrator needs)
                    self.sync_error = f"fdatasync: {e.strerror or e}"
                self._sync_returned.notify_all()
            if first:
                log.error("%s: fdatasync failed (%s): acknowledged writes may be lost; every later "
                          "sync, FUA and write-through write of it fails until "
                          "`scsi-target lun reset-error`", self.path, e.strerror or e)
            # EIO whatever the kernel said: ENOSPC (or EDQUOT, ETIMEDOUT) from a sync is
            # not a write refused before it landed but write-back pages maybe lost, a
            # MEDIUM ERROR, never the thin LU's retryable DATA PROTECT (decision 0271)
            raise OSError(errno.EIO, f"{self.path}: fdatasync: {e.strerror or e}") from e
        with self._gen_lock:
            self._in_kernel.discard(ticket)
            self._sync_returned.notify_all()
            under_way = set(self._in_kernel)
            # a failure since this sync began counts even if `lun reset-error`
            # cleared sync_error meanwhile: the failed sync may have covered our pages
            self._sync_returned.wait_for(lambda: self._failures != failures
                                         or under_way.isdisjoint(self._in_kernel))
            if self._failures == failures:
                self._synced_gen = max(self._synced_gen, start)
                return
            error = self.sync_error or "cleared since"
        raise OSError(errno.EIO, f"{self.path}: a sync that ran alongside this one failed ({error}); "
                                 f"syncs fail until `scsi-target lun reset-error`")

    def _refuse_if_failed(self) -> None:
        if self.sync_error is not None:
            raise OSError(errno.EIO, f"{self.path}: an earlier sync failed ({self.sync_error}); "
                                     f"syncs fail until `scsi-target lun reset-error`")

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        """Read at once when that cannot wait for a device: always on a memory
        file system, else if the data is in the page cache (RWF_NOWAIT). Saves
        the two thread wake-ups of the worker pool; False: use read_into."""
        if self._in_memory:
            if os.preadv(self._fd, [buf], offset) != len(buf):   # (read_into's usual case, in place)
                self.read_into(offset, buf)
            return True
        if not self._nowait_reads:
            return False
        try:
            return os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT) == len(buf)
        except OSError as e:
            self._nowait_reads = e.errno not in (errno.EOPNOTSUPP, errno.EINVAL)
            return False

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        """On a memory file system: the data in new bytes, one pread (no buffer
        zeroed first, no iovec list: about half a small read_nowait's cost).
        Elsewhere None: pread has no RWF_NOWAIT, so read_nowait decides."""
        if not self._in_memory:
            return None
        data = os.pread(self._fd, length, offset)
        if len(data) != length:   # short (a signal) or past the end of a file shrunk under us
            buf = bytearray(length)
            self.read_into(offset, memoryview(buf))
            return bytes(buf)
        return data

    def write_nowait(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> bool:
        """Write at once on a memory file system (nothing there can wait for a
        device); elsewhere the write goes to a worker thread."""
        if not self._in_memory:
            return False
        # _write's usual case in place (one frame, not three: per write); on a
        # memory file system a write is never made more durable, so _written
        # has nothing to do. Any other case takes _write's way.
        if len(bufs) == 1 and not (sync and self.sync_error is not None):
            buf = bufs[0]
            if os.pwrite(self._fd, buf, offset) == len(buf):
                return True
        self._write(offset, bufs, sync)   # on the loop: no lookup runs there meanwhile
        return True

    def flush(self) -> None:
        """Make every acknowledged write durable: nothing to do when a completed
        sync covered them all (write-through LUNs sync each write), else
        fdatasync, which skips the metadata (times) that fsync would write.
        After a failed sync, an error (0256)."""
        if self.dirty or self.sync_error is not None:
            with self._changing:
                self._datasync()

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole: the range reads back as zeros and frees its blocks.
        Where holes cannot be punched, zeros are written a chunk at a time."""
        with self._changing:
            self._discard(offset, length)

    def _discard(self, offset: int, length: int) -> None:
        try:
            _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            end = offset + length
            while offset < end:
                n = min(len(_ZEROS), end - offset)
                self.write_from(offset, [_ZEROS[:n]], sync=False)
                offset += n
            return
        self._written(sync=False)

    def resize(self, size: int) -> None:
        """A file is made `size` bytes long. A block device's LUN is as big as
        the device, measured at open: after the device grew (lvextend), a
        resize to its new size (rounded down to the LU's block size) serves it."""
        if self._blockdev:
            actual = self._measure()
            if not size <= actual < size + _MAX_BLOCK:
                raise BackendError(f"{self.path} is a block device of {actual} bytes: its LUN is as big as "
                                   f"the device (grow the device, e.g. lvextend, then resize the LUN to its size)")
            self._size = actual
            return
        with self._changing:
            os.ftruncate(self._fd, size)
        self._size = self._measure()

    def mapped_extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]:
        """(offset, length, mapped) runs from SEEK_DATA/SEEK_HOLE, at most `limit`
        (two lseeks per pair of runs, however fragmented the file); a block
        device or a file system without them reports everything mapped."""
        end = offset + length
        if self._blockdev:
            return [(offset, length, True)]
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        try:
            while pos < end and len(runs) < limit:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    data = end          # no data after pos: a hole to the end
                data = min(data, end)
                if data > pos:
                    runs.append((pos, data - pos, False))
                    pos = data
                    if pos >= end or len(runs) >= limit:
                        break
                hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
                runs.append((pos, hole - pos, True))
                pos = hole
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            return [(offset, length, True)]
        return runs

    def mapped_extents_nowait(self, offset: int, length: int,
                              limit: int) -> list[tuple[int, int, bool]] | None:
        """mapped_extents at once when that is cheap: a few runs, answered by
        lseeks from the extent map the kernel holds in memory. qemu sends a
        GET LBA STATUS for one run before every read of 32 KiB or more on a
        thin LUN; a worker thread's two wake-ups cost it more than the lookup.
        Not while a write, hole punch, truncate or sync of this file runs in
        a thread: it may hold the inode lock the lseeks take. That count is a
        hint for speed, not for the answer: a change that starts in a thread
        just after it was read makes the lookup wait for that one call, and
        each lseek still sees the extents before or after it, as a lookup in
        a thread would (commands that overlap in time have no order). What is
        not counted (an extent block read from the device, a writer in another
        process) makes lookups slow one after another: two slow in a row send
        the next ones to worker threads for a while. One alone is mostly the
        loop thread preempted, or waiting for the GIL after an lseek, on a
        busy machine (decision 0800). None: use mapped_extents."""
        if self._blockdev:
            return [(offset, length, True)]    # nothing to look up
        if limit > _INLINE_RUNS or self._changing.count:
            return None
        if self._lookups_off_loop:
            self._lookups_off_loop -= 1
            return None
        start = time.monotonic_ns()
        runs = self.mapped_extents(offset, length, limit)
        if time.monotonic_ns() - start <= _SLOW_LOOKUP_NS:
            self._slow_lookups = 0
        else:
            self._slow_lookups += 1
            if self._slow_lookups >= _SLOW_IN_A_ROW:
                self._slow_lookups = 0
                self._lookups_off_loop = _BACKOFF_LOOKUPS
        return runs

    def allocated(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def unlinked(self) -> bool:
        """The file was deleted, or another was renamed over it, since it was
        opened: the LU still serves the open, nameless file, which nothing else
        (a backup, a restart) will ever see. Blocking (an fstat)."""
        try:
            return not self._blockdev and os.fstat(self._fd).st_nlink == 0
        except OSError:
            return False

    def close(self) -> None:
        """The descriptor becomes -1 before its number is given back: a call
        that comes after (a bug, which the STML's removal rules out) fails with
        EBADF instead of reaching whatever file is opened next under that
        number. Closing twice is a no-op."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class _Changing:
    """Calls in progress, in any thread, that may hold the file's inode lock
    exclusively (a write, a hole punch, a truncate, a sync)."""

    __slots__ = ("count", "_lock")

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.count += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.count -= 1


def _claim(fd: int, path: str, readonly: bool) -> None:
    """Lock a regular file for as long as this descriptor is open, as O_EXCL
    claims a block device (docs/decisions/0216): another STML (another data
    dir) serving it too would be a second disk, with its own identity and
    reservations, on the same data. An open file description lock: it goes
    with the last close, or the process, never with another descriptor's
    close (as a POSIX lock would). A read-only LUN shares the file with
    other read-only ones. A file system without locks (NFSv3 without lockd,
    some FUSE ones) serves the file unlocked, with a warning."""
    kind = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", kind, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            log.warning("%s: served without a lock (%s): nothing keeps a second target off it",
                        path, e.strerror)
            return
        holder = _lock_holder(os.fstat(fd))
        raise BackendError(f"{path}: in use by {holder or 'another program'}, which holds a lock on it "
                           f"(a file is served by one target at a time)") from None


def _lock_holder(st: os.stat_result) -> str | None:
    """Which process holds a lock on the file `st` describes, as /proc shows
    it ("pid 123: scsi-target run ..."), or None when none is readable. Reads
    every process's descriptors: only when a lock is refused."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if not any(line.startswith("lock:") and dev in line for line in f):
                        continue
                if pid == me:
                    return "this STML (a LUN removed from it is still closing)"
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {pid} ({cmd[:200]})" if cmd else f"pid {pid}"
        except OSError:
            continue
    return None


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


# the C library the interpreter already has (find_library("c") runs ldconfig: a
# process at import time, and a second or so on a busy host)
_libc = ctypes.CDLL(None, use_errno=True)
_MEMORY_FS = {0x01021994, 0x858458F6}  # tmpfs, ramfs


def _fs_type(fd: int) -> int:
    """f_type of fstatfs(2): which file system holds the file."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """os has no fallocate(2) with mode flags; hole punching needs them."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
