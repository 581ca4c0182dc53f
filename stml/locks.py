"""A shared/exclusive gate for one logical unit's writes.

Ordinary writes enter shared (they run together); COMPARE AND WRITE, WRITE
ATOMIC and the like enter exclusive, so no other write to the LU lands between
their read and their write, whichever front end sent it.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable


class WriteGate:
    """Leaving the gate never waits: its callers are compiled (stml.sbc), and
    mypyc's `async with` awaits __aexit__ inside the handler of the body's
    exception (an abort's CancelledError), where a suspension corrupts the
    thread's exception state (decisions/0840 addendum). So no lock: a change
    wakes every entry waiting, and each checks again."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._waiters: list[asyncio.Future[None]] = []
        # an exclusive section holds the gate or waits for it: an attribute kept
        # up to date (_count), not a property: every write reads it (stml.sbc)
        self.exclusive_pending = False

    def _count(self, waiting: int, exclusive: bool) -> None:
        self._waiting_exclusive += waiting
        self._exclusive = exclusive
        self.exclusive_pending = exclusive or self._waiting_exclusive > 0

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            await w

    async def wait_shared(self) -> None:
        """Until a shared entry may go in (enter_shared, with no await between)."""
        await self._wait(lambda: not self._exclusive and not self._waiting_exclusive)

    def enter_shared(self) -> None:
        """In shared, once no exclusive section holds the gate or waits for it:
        `shared()` without its context manager, for a write per command."""
        self._shared += 1

    def leave_shared(self) -> None:
        self._shared -= 1
        if self._shared == 0 and self._waiters:
            self._wake()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        if self.exclusive_pending:   # fast path: no await when uncontended
            await self.wait_shared()
        self.enter_shared()
        try:
            yield
        finally:
            self.leave_shared()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._count(1, self._exclusive)
        try:
            await self._wait(lambda: not self._exclusive and self._shared == 0)
        finally:
            self._count(-1, self._exclusive)
            if self._waiters:
                self._wake()     # shared entries waited for no exclusive one pending
        self._count(0, True)
        try:
            yield
        finally:
            self._count(0, False)
            self._wake()
