"""Saving reservations to a store that fails or goes away, without Ceph: the
shared store stands for an RBD image's metadata (backends.rbd.PrStore:
`always`, OSError with librbd's errno), the file store for APTPL files.

A save that fails puts the state back as it was before the changes it
covered, and each of those PERSISTENT RESERVE OUTs fails (a fenced
gateway's with a path error) without applying its unit attentions; a LUN
removed while a save is under way still answers every command waiting.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import json
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backends import open_backend
from stml import pr
from stml.api import Op
from stml.emulator import Emulator, Target
from stml.lu import LogicalUnit, LunOptions

T = "iqn.2026-11.org.test:t"
A = pr.Port("iqn.2026-11.org.test:a,i,0x23d000000001", T, 1)
B = pr.Port("iqn.2026-11.org.test:b,i,0x23d000000002", T, 1)


class SharedStore:
    """An image's metadata: every change is written; `fail` makes writes fail
    as a fenced client's do; `gate` holds a write until set; `started` is set
    once a write has begun."""

    always = True
    where = "metadata scsi_target.pr of image rbd/img"

    def __init__(self) -> None:
        self.doc: Any = None
        self.fail: int | None = None
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.writes = 0

    def read(self) -> Any:
        return self.doc

    def write(self, doc: Any) -> bool:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.writes += 1
        if self.fail is not None:
            raise OSError(self.fail, f"rbd:rbd/img: {errno.errorcode[self.fail]}")
        self.doc = json.loads(json.dumps(doc))
        return doc is not None


def emulator(store: Any) -> tuple[Emulator, LogicalUnit, list]:
    """An STML with one LU keeping its reservations in `store`, and two I_T
    nexuses to it (1: A, 2: B); what the STML sends goes to the list."""
    sent: list = []
    lu = LogicalUnit(T, 0, open_backend("ram", 1 << 20, None, False), LunOptions(kind="ram", size=1 << 20),
                     None)
    emu = Emulator([Target(T, {0: lu})], lambda ident, h, f: sent.append((h, f)), ThreadPoolExecutor(1))
    lu.template = emu.templates["disk"]
    pr.state(lu).restore(store, None)
    emu.handle(b"fe", {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": "t",
                       "heartbeat_ms": 1000, "aen": False}, [])
    for n, port in ((1, A), (2, B)):
        emu.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": n, "initiator": port.initiator,
                           "target": T, "tpg": 1}, [])
    return emu, lu, sent


_tags = itertools.count(1000)


def send(emu: Emulator, nexus: int, cdb: bytes, out: bytes = b"", read: int = 0) -> int:
    """Start one command; its tag."""
    tag = next(_tags)
    emu.handle(b"fe", {"op": Op.RX_CMND, "tag": tag, "nexus": nexus, "lun": 0, "cdb": cdb, "attr": 0,
                       "dir": 1 if out else (2 if read else 0), "len": len(out) or read,
                       "unsol": len(out)}, [out] if out else [])
    return tag


async def answer(sent: list, tag: int) -> tuple[int, bytes, bytes]:
    """(status, sense, data) of the command with this tag, once it ends."""
    while True:
        for h, frames in sent:
            if h["op"] == Op.XMIT_RESPONSE and h["tag"] == tag:
                return h["status"], h["sense"] or b"", b"".join(bytes(f) for f in frames)
        await asyncio.sleep(0.001)


async def command(emu: Emulator, sent: list, nexus: int, cdb: bytes, out: bytes = b"",
                  read: int = 0) -> tuple[int, bytes, bytes]:
    """(status, sense, data) of one command."""
    return await answer(sent, send(emu, nexus, cdb, out, read))


def prout(sa: int, key: int = 0, sark: int = 0, aptpl: bool = False) -> tuple[bytes, bytes]:
    param = struct.pack(">QQ4xB3x", key, sark, int(aptpl))
    return struct.pack(">BBBxxIB", 0x5F, sa, 0, len(param), 0), param


async def keys(emu: Emulator, sent: list, nexus: int) -> tuple[int, list[int]]:
    """READ KEYS: (PRgeneration, keys)."""
    status, sense, data = await command(emu, sent, nexus, struct.pack(">BBxxxxxHx", 0x5E, 0, 512), read=512)
    assert status == 0, sense.hex()
    generation, length = struct.unpack_from(">II", data)
    return generation, [struct.unpack_from(">Q", data, 8 + 8 * i)[0] for i in range(length // 8)]


async def clear_power_on_attentions(emu: Emulator, sent: list) -> None:
    for nexus in (1, 2):
        await command(emu, sent, nexus, bytes(6))   # TEST UNIT READY takes the unit attention


def test_a_fenced_save_fails_the_command_with_a_path_error_and_changes_nothing():
    """CLEAR through a gateway whose image write is refused (fenced): NOT
    READY, ASYMMETRIC ACCESS STATE TRANSITION (it was MEDIUM ERROR); the
    registrations are still in force and B got no RESERVATIONS PREEMPTED
    (they were gone and B had the unit attention, though the image kept them)."""
    store = SharedStore()
    emu, lu, sent = emulator(store)

    async def run() -> None:
        await clear_power_on_attentions(emu, sent)
        for nexus, key in ((1, 0xA), (2, 0xB)):
            assert (await command(emu, sent, nexus, *prout(pr.REGISTER, sark=key)))[0] == 0
        store.fail = errno.ESHUTDOWN
        status, sense, _ = await command(emu, sent, 1, *prout(pr.CLEAR, key=0xA))
        assert (status, sense[2] & 0x0F, sense[12:14]) == (2, 0x02, bytes([0x04, 0x0A])), sense.hex()
        assert (await keys(emu, sent, 2))[1] == [0xA, 0xB]
        assert (await command(emu, sent, 2, bytes(6)))[0] == 0, "a unit attention of a CLEAR that failed"
    asyncio.run(run())
    assert [r["key"] for r in store.doc["registrations"]] == [0xA, 0xB]
    assert pr.state(lu).generation == store.doc["generation"]


def test_a_failed_save_takes_back_every_change_it_and_the_next_write_would_cover():
    """A REGISTER's write is under way when a second REGISTER changes the
    state (it waits for the next write); the write fails: both commands fail
    and neither change is in force: the state is the one the image still
    holds. Both stayed in force, though the initiators were told they failed."""
    store = SharedStore()
    emu, lu, sent = emulator(store)

    async def run() -> None:
        await clear_power_on_attentions(emu, sent)
        assert (await command(emu, sent, 1, *prout(pr.REGISTER, sark=0xA)))[0] == 0
        store.gate, store.fail = threading.Event(), errno.EIO
        store.started.clear()
        first = send(emu, 1, *prout(pr.REGISTER, key=0xA, sark=0xAA))
        while not store.started.is_set():
            await asyncio.sleep(0.001)
        second = send(emu, 2, *prout(pr.REGISTER, sark=0xB))
        store.gate.set()
        for tag in (first, second):
            status, sense, _ = await answer(sent, tag)
            assert (status, sense[2] & 0x0F) == (2, 0x03), sense.hex()   # MEDIUM ERROR: the write failed
        store.gate = store.fail = None
        assert await keys(emu, sent, 2) == (1, [0xA])
    asyncio.run(run())
    assert pr.state(lu).to_json() == store.doc


def test_a_failed_aptpl_file_save_keeps_the_registrations_made_before_it(tmp_path, monkeypatch):
    """A REGISTER asks for APTPL and its file cannot be written: that
    registration is not in force, nor is APTPL; the one made before (without
    APTPL, so never written) stays. The failed one stayed registered."""
    emu, lu, sent = emulator(pr.FileStore(pr.state_path(tmp_path, T, 0)))

    def full(path: Any, doc: Any) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def run() -> None:
        await clear_power_on_attentions(emu, sent)
        assert (await command(emu, sent, 1, *prout(pr.REGISTER, sark=0xA)))[0] == 0
        monkeypatch.setattr(pr, "_write_state", full)
        status, sense, _ = await command(emu, sent, 2, *prout(pr.REGISTER, sark=0xB, aptpl=True))
        assert status == 2, "a REGISTER whose APTPL file was not written"
        assert await keys(emu, sent, 1) == (1, [0xA])
    asyncio.run(run())
    assert not pr.state(lu).aptpl and not list(tmp_path.iterdir())


def test_removing_a_lun_mid_save_answers_every_waiting_command():
    """The LU is removed (forget) while a save to its image is under way and
    another change waits for the next: both are written and answered. The
    store was dropped under the writer, whose assertion left them waiting."""
    store = SharedStore()
    st = pr.PrState(T, 0)
    st.restore(store, None)

    async def run() -> None:
        store.gate = threading.Event()
        st.prout(A, pr.REGISTER, 0, 0, pr.PrParams(sark=0xA))
        first = asyncio.ensure_future(st.persisted())
        while not store.started.is_set():
            await asyncio.sleep(0.001)
        st.prout(B, pr.REGISTER, 0, 0, pr.PrParams(sark=0xB))
        second = asyncio.ensure_future(st.persisted())
        forgetting = asyncio.ensure_future(st.forget())
        await asyncio.sleep(0)
        store.gate.set()
        await asyncio.wait([first, second, forgetting], timeout=30)
        assert first.done() and second.done() and forgetting.done()
        assert first.exception() is None and second.exception() is None
    asyncio.run(run())
    assert st.store is None and [r["key"] for r in store.doc["registrations"]] == [0xA, 0xB]
