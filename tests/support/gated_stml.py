"""A real STML (stml.server.StmlServer, the same code `python -m stml` runs)
in a thread of the test process, whose LUNs know one extra vendor command:
0xC0 with a 4-byte name in CDB bytes 2..5 runs until the test opens the
gate of that name. Commands then stay in flight exactly as long as a test
needs, for task management and restart tests, without timing."""
from __future__ import annotations

import asyncio
import collections
import os
import threading
from pathlib import Path
from typing import Any, Callable

GATE_OPCODE = 0xC0


def gate_cdb(name: str) -> bytes:
    assert len(name) == 4
    return bytes([GATE_OPCODE, 0]) + name.encode() + bytes(10)


class GatedStml:
    def __init__(self, data_dir: Path, iqn: str, luns: tuple[str, ...] = ("ram:16MiB",),
                 config_file: bool = False) -> None:
        """`config_file`: it keeps DATA_DIR/scsi-target.toml as `stml` does
        (a reload reads it); else it runs from the flags alone."""
        from stml.config import load
        from stml.persist import load_or_create
        self.config = (load_or_create if config_file else load)(None, str(data_dir), iqn, luns)
        self.endpoint = self.config.stml_endpoint
        self.started: dict[str, threading.Event] = {}
        self.calls: collections.Counter[str] = collections.Counter()   # name -> commands that reached the gate
        self._gates: dict[str, asyncio.Event] = {}
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.server: Any = None       # the StmlServer, once started (look at it through call())
        self._thread = threading.Thread(target=self._run, name="gated-stml", daemon=True)
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> GatedStml:
        self._thread.start()
        if not self._ready.wait(15) or self.error:
            raise RuntimeError(f"the gated STML did not start: {self.error}")
        return self

    def _started(self, name: str) -> threading.Event:
        with self._lock:
            return self.started.setdefault(name, threading.Event())

    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    async def _handler(self, task: object) -> None:
        name = task.cdb[2:6].decode()   # type: ignore[attr-defined]
        self.calls[name] += 1
        self._started(name).set()
        await self._gate(name).wait()

    def _run(self) -> None:
        from stml.disk import OPCODES, DiskTemplate
        from stml.ops import Conflict, OpEntry
        from stml.server import StmlServer
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            server = self.server = StmlServer(self.config)
            entry = OpEntry(GATE_OPCODE, "VENDOR GATE", bytes([GATE_OPCODE, 0, 0xFF, 0xFF, 0xFF, 0xFF]),
                            self._handler, conflicts=Conflict.WRITE)
            template = DiskTemplate([entry, *OPCODES])
            for t in server.emulator.targets.values():
                for lu in t.luns.values():
                    lu.template = template
            self._stop = asyncio.Event()
            self.loop.call_soon(self._ready.set)
            try:
                await server.serve(self._stop)
            finally:
                # the process that runs `stml` lets exit release its endpoint lock; here
                # the test goes on, and a restarted STML takes the endpoint again
                if server._lock_fd is not None:
                    os.close(server._lock_fd)

        try:
            self.loop.run_until_complete(main())
        except BaseException as e:   # reported by start()
            self.error = e
            self._ready.set()
        finally:   # gated commands still waiting end here, not as pending tasks of a closed loop
            left = asyncio.all_tasks(self.loop)
            for task in left:
                task.cancel()
            if left:
                self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            self.loop.close()

    def wait_started(self, name: str, timeout: float = 20) -> None:
        if not self._started(name).wait(timeout):
            raise TimeoutError(f"gated command {name} never started")

    def call(self, fn: Callable[[], Any], timeout: float = 10) -> Any:
        """fn() run on the STML's loop (its state is the loop's alone): its result."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def open(self, name: str) -> None:
        self.loop.call_soon_threadsafe(lambda: self._gate(name).set())

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)
