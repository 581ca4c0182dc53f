"""Files replaced atomically: the one way the STML and the CLI write a file
that must never be seen half-written (the config, reservations' APTPL state)."""
from __future__ import annotations

import os
from pathlib import Path


_swept: set[Path] = set()   # files whose killed saves' temporaries this process removed


def atomic_write(path: Path, data: bytes, secret: bool) -> None:
    """Replace `path` with `data` atomically. The temporary file is created afresh
    (O_EXCL: never a stale file or a symlink) with mode 0600, so secrets are never
    readable by others, not even for a moment; it then takes the old file's mode,
    without group/other bits when `data` holds secrets. A new file stays 0600.
    A symlinked file is written where the link points (the link stays), and
    temporaries a killed process left beside it are removed, at this process's
    first write of it: its later writes (a reservation change each) do not
    list the directory again."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path not in _swept:
        _remove_stale_temporaries(path)
        _swept.add(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)          # left by a crash: O_EXCL below must create it anew
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o600
        os.fchmod(fd, mode & 0o700 if secret else mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _remove_stale_temporaries(path: Path) -> None:
    """`.NAME.PID.tmp` beside `path` of a process that no longer runs: a save
    killed before its rename (each would otherwise stay, mode 0600, for good)."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):-len(".tmp")] if name.startswith(prefix) and name.endswith(".tmp") else ""
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            os.unlink(path.parent / name)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(d: Path) -> None:
    """Make a rename or unlink in `d` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
