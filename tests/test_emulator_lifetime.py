"""What a dropped Emulator keeps alive: nothing, once its last reference goes.
It holds its targets' LUs with their backends (a RAM LU's data), the front
ends with their tasks and the worker threads' queue; a reference cycle
through it (a bound method of its own kept on it) would keep all of that
until the cyclic GC happened to run."""
from __future__ import annotations

import asyncio
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backends.ram import RamBackend
from stml.api import CONTRACT_VERSION, DataDir, Op
from stml.emulator import Emulator, Target
from stml.lu import LogicalUnit, LunOptions
from stml.timing import Timing

TARGET = "iqn.2026-11.org.test:lifetime"


def test_a_dropped_emulator_is_freed_at_once_without_the_cyclic_gc():
    """Served a READ, timed, and dropped: the Emulator and its LU's backend are
    freed by their reference counts alone (the cyclic GC is off)."""
    answers: list[Any] = []

    def send(ident: bytes, h: dict[str, Any], frames: list) -> None:
        answers.append((h["op"], h.get("status"), b"".join(bytes(f) for f in frames)))

    async def serve(executor: ThreadPoolExecutor) -> tuple[weakref.ref, weakref.ref]:
        em = Emulator([], send, executor)
        em.enable_timing(Timing(None))
        backend = RamBackend(1 << 20)
        backend.write_from(0, [memoryview(b"\x42" * 512)], False)
        lu = LogicalUnit(TARGET, 0, backend, LunOptions("ram", size=1 << 20), em.templates["disk"])
        em.targets[TARGET] = Target(TARGET, {0: lu})
        em.handle(b"fe", {"op": Op.REGISTER, "version": list(CONTRACT_VERSION), "kind": "test",
                          "name": "test"}, [])
        em.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": 1, "initiator": "iqn.init:one",
                          "target": TARGET, "tpg": 1}, [])
        em.handle(b"fe", {"op": Op.RX_CMND, "nexus": 1, "tag": 1, "lun": 0,
                          "cdb": bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]).ljust(16, b"\0"), "attr": 0,
                          "dir": int(DataDir.READ), "len": 512, "unsol": 0}, [])
        while not any(op == Op.XMIT_RESPONSE for op, _, _ in answers):
            await asyncio.sleep(0)
        em.handle(b"fe", {"op": Op.DONE, "tags": [1]}, [])
        return weakref.ref(em), weakref.ref(backend)

    gc.collect()
    gc.disable()
    try:
        with ThreadPoolExecutor(1) as executor:
            em, backend = asyncio.run(serve(executor))
        assert (Op.XMIT_RESPONSE, 0, b"\x42" * 512) in answers, "the READ was served"
        assert em() is None, "the Emulator went with its last reference"
        assert backend() is None, "and its LU's backend with it"
    finally:
        gc.enable()
