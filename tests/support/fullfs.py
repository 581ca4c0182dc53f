"""A small file system that really fills up, seen only by the process under
test: a tmpfs (or ext4 on a loop device) of a few MiB mounted in a private
mount namespace (`unshare --mount`) by the command that then execs the
process (same PID). Nothing is mounted where the test runs, so nothing is
left mounted whatever happens to the test: the mounts go with the last
process in the namespace. The test reaches the file system through
/proc/PID/root (we run as root: kind `system`)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from support.target import StmlProcess

CHUNK = 64 << 10
PAGE = 4096


# run by `sh -c` in the new namespace: $1 options, $2 the mount point, $3 the size
_TMPFS = 'mount -t tmpfs -o "$1" scsi-target-test "$2" && shift 3 && exec "$@"'
# ext4 on a loop device, its image in a tmpfs under it (both go with the namespace;
# the loop device detaches when its last mount goes: mount -o loop sets autoclear)
_EXT4 = ('set -e; mount -t tmpfs -o "size=$3,mode=0700" scsi-target-test "$2"; truncate -s "$3" "$2/.img"; '
         'mkfs.ext4 -q -F -m 0 -b 4096 "$2/.img"; mount -o loop,errors=remount-ro "$2/.img" "$2"; '
         'chmod 0700 "$2"; '
         'rmdir "$2/lost+found"; shift 3; exec "$@"')


class SmallFs:
    """A file system of `size` at `mountpoint` (made if missing), for the
    process run with `wrap` in front of its command line: a tmpfs (the STML
    writes to it in place, no sync does anything), or ext4 (writes in
    worker threads, real fdatasyncs; its metadata takes some of `size`)."""

    def __init__(self, mountpoint: Path, size: str = "4m", inodes: int | None = None,
                 kind: str = "tmpfs") -> None:
        self.mountpoint = mountpoint
        self.kind = kind
        mountpoint.mkdir(parents=True, exist_ok=True)
        options = f"size={size},mode=0700" + (f",nr_inodes={inodes}" if inodes else "")
        script = {"tmpfs": _TMPFS, "ext4": _EXT4}[kind]
        self.wrap = ("unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                     "sh", options, str(mountpoint), size)
        self.pid: int | None = None   # the process that holds the namespace

    def path(self, name: str = "") -> Path:
        """`name` in the small file system, as this process reaches it."""
        assert self.pid is not None, "no process holds the file system yet"
        return Path(f"/proc/{self.pid}/root{self.mountpoint}") / name

    def mounted(self) -> bool:
        """The process sees the file system (not the directory under it)."""
        assert self.pid is not None
        with open(f"/proc/{self.pid}/mounts") as f:
            mounts = [line.split() for line in f]
        return any(m[1] == str(self.mountpoint) and m[2] == self.kind for m in mounts)

    def fill(self, name: str = "filler") -> int:
        """Write zeros to `name` until the file system is full; the bytes written."""
        total = 0
        with open(self.path(name), "ab", buffering=0) as f:
            for size in (CHUNK, PAGE):
                block = bytes(size)
                while True:
                    try:
                        n = f.write(block)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
                    total += n or 0
        return total

    def fill_inodes(self) -> int:
        """Create empty files until no inode is left; how many."""
        n = 0
        while True:
            try:
                self.path(f"inode{n}").touch()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return n
            n += 1

    def free(self, nbytes: int, name: str = "filler") -> None:
        """Give `nbytes` back: the filler shrinks by that much."""
        p = self.path(name)
        os.truncate(p, p.stat().st_size - nbytes)

    def free_all(self, name: str = "filler") -> None:
        self.path(name).unlink()

    def fail(self) -> None:
        """What ext4 does on finding its metadata corrupt (errors=remount-ro): it
        goes read-only at once, under the files open for writing (ext4 only:
        its debugging knob trigger_fs_error raises a real file system error)."""
        assert self.kind == "ext4" and self.pid is not None
        with open(f"/proc/{self.pid}/mounts") as f:
            dev = next(m[0] for m in map(str.split, f) if m[1] == str(self.mountpoint) and m[2] == "ext4")
        Path(f"/sys/fs/ext4/{Path(dev).name}/trigger_fs_error").write_text("scsi-target test")

    def available(self) -> int:
        st = os.statvfs(self.path())
        return st.f_bavail * st.f_frsize


class StmlOnSmallFs(StmlProcess):
    """A bare STML (`python -m stml`) run inside a SmallFs's namespace."""

    def __init__(self, fs: SmallFs, data_dir: Path, luns: tuple[str, ...],
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__(data_dir, luns, extra)
        self.fs = fs

    def argv(self) -> list[str]:
        return [*self.fs.wrap, *super().argv()]

    def start(self) -> StmlOnSmallFs:
        super().start()
        self.fs.pid = self.pid
        assert self.fs.mounted(), "the STML does not see its small file system"
        return self
