"""Storage behind a logical unit: one small interface, one module per kind.

A backend knows bytes and offsets, nothing of SCSI. Calls are blocking and
may be slow (a disk, a network store); the STML runs them off its event loop
unless `inline` says a call is cheap enough to run in place (RAM).
"""
from __future__ import annotations

from scsi_runtime import accel as _accel

_accel.install()   # the compiled build, when asked for (SCSI_TARGET_ACCEL; decision 0830)

from backends.base import AioFuture, Backend, BackendError  # noqa: E402

__all__ = ["AioFuture", "Backend", "BackendError", "open_backend"]


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
