"""A stalled backend (fault injection, stml.api.inject `stall`): the LUN's I/O
calls wait in their worker thread until the stall ends, as a hung disk or a
storage network outage looks to the STML. The event loop never waits."""
from __future__ import annotations

import threading
from typing import Any, Callable

# the calls that wait: those that touch the data (size and the like answer)
STALLED_CALLS = frozenset({"read_into", "write_from", "flush", "discard", "mapped_extents", "resize"})


class StalledBackend:
    """Wraps a backend while it is stalled. Calls are never inline nor aio, and
    the no-wait paths decline, so every I/O call reaches a worker thread and
    waits there on `gate`."""

    inline = False
    aio = None

    def __init__(self, backend: Any) -> None:
        self.inner = backend
        self.gate = threading.Event()
        self.waited = 0    # calls that waited (counted for tests)

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        return False

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        return None

    def write_nowait(self, offset: int, bufs: Any, sync: bool) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name not in STALLED_CALLS:
            return value
        return self._gated(value)

    def _gated(self, fn: Callable) -> Callable:
        def call(*args: Any) -> Any:
            if not self.gate.is_set():
                self.waited += 1
                self.gate.wait()
            return fn(*args)
        call.__name__ = fn.__name__
        return call
