"""A shared/exclusive gate for one logical unit's writes.

Ordinary writes enter shared (they run together); COMPARE AND WRITE, WRITE
ATOMIC and the like enter exclusive, so no other write to the LU lands between
their read and their write, whichever front end sent it.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator


class WriteGate:
    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._cond: asyncio.Condition | None = None

    def _c(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    @property
    def exclusive_pending(self) -> bool:
        """An exclusive section holds the gate or waits for it."""
        return self._exclusive or self._waiting_exclusive > 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        if not self._exclusive and not self._waiting_exclusive:
            self._shared += 1          # fast path: no await when uncontended
        else:
            c = self._c()
            async with c:
                await c.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
                self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1
            if self._cond is not None and (self._waiting_exclusive or self._exclusive):
                async with self._cond:
                    self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        c = self._c()
        async with c:
            self._waiting_exclusive += 1
            try:
                await c.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with c:
                self._exclusive = False
                c.notify_all()
