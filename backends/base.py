"""What every backend is: the interface the STML calls and the error it raises.

Its own module, below the kinds (backends.file, backends.rbd import it) and
the package's open_backend (which imports them): no import cycle.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Protocol, Sequence


class BackendError(Exception):
    """The backing store failed; the STML turns this into MEDIUM ERROR sense."""


class AioFuture(asyncio.Future):
    """An aio call's future, done when the backend's library completes the
    call; cancel() does not end it (False). A task cancelled while it waits
    for one (an abort) is woken by the completion and only then sees
    CancelledError, so no write lands after an abort is reported - what
    asyncio.shield and a second wait gave, without a second future and a
    second loop turn per call. Here, not in backends.rbd, so that it stays
    Python when backends.rbd is compiled (decision 0412).

    `waiter`: what the maker calls with `waiter_arg`, right after the
    outcome is set, in place of the callbacks' loop turn: how the STML
    resumes a command waiting on it without an asyncio Task (stml.emulator,
    decision 0418; a function and its argument, not a partial made per
    command, 0422). Its maker sets it to None; the waiter never raises."""

    __slots__ = ("waiter", "waiter_arg")

    waiter: Callable[[Any], None] | None
    waiter_arg: Any

    def cancel(self, msg: Any = None) -> bool:
        return False


class Backend(Protocol):
    inline: bool        # True when calls never block (the STML may call them on its loop)
    can_discard: bool   # discard() frees space (thin provisioning)
    can_resize: bool
    # a twin of the I/O calls that returns an event-loop future at once (an
    # AioFuture), or None; Task.io uses it (by method name) to keep many calls
    # in flight. Its futures ignore cancel(): an aborted command's task waits
    # for the call's end (no write lands after the abort is reported) by
    # awaiting it alone
    aio: Any

    # an acknowledged write may not be durable yet: flush() owes a sync (never on
    # RAM). Read-only: a file computes it from write and sync generations (0255)
    @property
    def dirty(self) -> bool: ...

    # why a sync failed: then every later sync fails (and FUA and write-through
    # writes with it) until `lun reset-error` sets it back to None (0256). Never
    # set on RAM (nothing to sync) or RBD (no client cache: a write that
    # completed is on the OSDs, and a failed flush lost nothing acknowledged)
    sync_error: str | None

    def size(self) -> int: ...
    def read_into(self, offset: int, buf: memoryview) -> None: ...
    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None: ...
    # the same, done at once only when that cannot block; False: use the calls above
    def read_nowait(self, offset: int, buf: memoryview) -> bool: ...
    def write_nowait(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> bool: ...
    # `length` bytes from `offset` in new memory, read at once only when that cannot block
    # and costs less than read_nowait into a buffer (no buffer to zero first); None: not so
    def pread_nowait(self, offset: int, length: int) -> bytes | None: ...
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
