"""Storage behind a logical unit: one small interface, one module per kind.

A backend knows bytes and offsets, nothing of SCSI. Calls are blocking and
may be slow (a disk, a network store); the STML runs them off its event loop
unless `inline` says a call is cheap enough to run in place (RAM).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence


class BackendError(Exception):
    """The backing store failed; the STML turns this into MEDIUM ERROR sense."""


class Backend(Protocol):
    inline: bool        # True when calls never block (the STML may call them on its loop)
    can_discard: bool   # discard() frees space (thin provisioning)
    can_resize: bool
    # a twin of the I/O calls that returns an event-loop future at once, or
    # None; Task.io uses it (by method name) to keep many calls in flight
    aio: Any
    dirty: bool         # a write since the last flush() is not yet durable (never on RAM)

    def size(self) -> int: ...
    def read_into(self, offset: int, buf: memoryview) -> None: ...
    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None: ...
    # the same, done at once only when that cannot block; False: use the calls above
    def read_nowait(self, offset: int, buf: memoryview) -> bool: ...
    def write_nowait(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> bool: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    # (offset, length, mapped) runs from `offset`, at most `limit` of them: the
    # work is bounded by what GET LBA STATUS asks for, not by the LUN's size
    def mapped_extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]: ...
    # the same at once when that is cheap and cannot wait for a device, else None
    # (then mapped_extents runs in a worker thread)
    def mapped_extents_nowait(self, offset: int, length: int,
                              limit: int) -> list[tuple[int, int, bool]] | None: ...
    def resize(self, size: int) -> None: ...
    def close(self) -> None: ...


def open_backend(kind: str, size: int | None = None, path: str | None = None,
                 readonly: bool = False, **options: str | None) -> Backend:
    """Open a backend by kind name ("file", "ram" or "rbd"); `options` are the
    kind's own (rbd: conf, user, keyring)."""
    if kind == "ram":
        from backends.ram import RamBackend
        if not size:
            raise ValueError("ram backend needs a size")
        return RamBackend(size)
    if kind == "file":
        from backends.file import FileBackend
        if not path:
            raise ValueError("file backend needs a path")
        return FileBackend(path, size, readonly)
    if kind == "rbd":
        from backends.rbd import RbdBackend
        if not path:
            raise ValueError("rbd backend needs POOL/IMAGE")
        return RbdBackend(path, size, readonly, **options)
    raise ValueError(f"unknown backend kind {kind!r} (known: file, ram, rbd)")
