"""Backend calls in worker threads, shared fairly among logical units.

Blocking backend calls (a disk, a network store) run in a fixed set of
threads. Handed out first come, first served, eight slow calls to one LU
would hold every thread and stall every other LU. So each LU may hold at
most `per_key` threads at a time, and a thread that comes free goes to the
next LU in turn that has calls waiting (round robin), not to the oldest call.
The scheduling runs on the event loop; only the calls run in threads.
"""
from __future__ import annotations

import asyncio
import collections
import functools
from concurrent.futures import Executor
from typing import Any, Callable, Hashable


class FairWorkers:
    def __init__(self, executor: Executor, threads: int, per_key: int) -> None:
        self.executor = executor
        self.threads = threads        # calls handed to the executor at once
        self.per_key = per_key        # of them, at most this many for one key (LU)
        self.busy = 0
        self.running: dict[Hashable, int] = {}
        self.waiting: dict[Hashable, collections.deque] = {}
        self._turns: dict[Hashable, None] = {}   # keys that may start a call, in turn order
        self._queued: set[asyncio.Future] = set()

    def run(self, key: Hashable, fn: Callable, *args: Any) -> asyncio.Future:
        """fn(*args) in a thread when `key` gets its turn; the future has its
        result. drop() takes back a call that has not started."""
        fut = asyncio.get_running_loop().create_future()
        queue = self.waiting.get(key)
        if queue is None:
            queue = self.waiting[key] = collections.deque()
        queue.append((fn, args, fut))
        self._queued.add(fut)
        if self.running.get(key, 0) < self.per_key:
            self._turns.setdefault(key)
        self._dispatch()
        return fut

    def drop(self, fut: asyncio.Future) -> bool:
        """Cancel a call that has not started (it will never run): True; False
        when it already runs (the caller waits for it instead)."""
        if fut not in self._queued:
            return False
        self._queued.discard(fut)
        fut.cancel()
        return True

    def pending(self, key: Hashable) -> int:
        """Calls of `key` running or waiting for a thread (dropped ones not
        counted): a removed LU's backend is closed only at none."""
        return self.running.get(key, 0) + sum(fut in self._queued for _, _, fut in self.waiting.get(key, ()))

    def _dispatch(self) -> None:
        while self.busy < self.threads and self._turns:
            key = next(iter(self._turns))
            del self._turns[key]
            queue = self.waiting[key]
            fn, args, fut = queue.popleft()
            if not queue:
                del self.waiting[key]
            if fut not in self._queued:       # dropped while it waited
                if key in self.waiting:
                    self._turns[key] = None
                continue
            self._queued.discard(fut)
            self.busy += 1
            self.running[key] = held = self.running.get(key, 0) + 1
            if key in self.waiting and held < self.per_key:
                self._turns[key] = None       # its next call waits for the others' turns
            try:
                inner = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
            except RuntimeError as e:   # the executor was shut down (the STML is stopping)
                inner = asyncio.get_running_loop().create_future()
                inner.set_exception(e)
            inner.add_done_callback(functools.partial(self._finished, key, fut))

    def _finished(self, key: Hashable, fut: asyncio.Future, done: asyncio.Future) -> None:
        self.busy -= 1
        held = self.running[key] - 1
        if held:
            self.running[key] = held
        else:
            del self.running[key]
        if key in self.waiting and held < self.per_key:
            self._turns.setdefault(key)
        if done.cancelled():
            fut.cancel()
        elif not fut.done():
            exc = done.exception()
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(done.result())
        self._dispatch()
