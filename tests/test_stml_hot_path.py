"""The STML's per-command path (docs/decisions/0816): what it saves does not
change what a front end gets. Responses written from their fields in a fixed
layout read back as the header StmlSender writes; counters and taps see the
same commands.

An StmlServer runs in the test's process without serving: messages go in
where the carriers hand them over (`_receive`), and a stub stream keeps
what the STML sends."""
from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import pytest

from backends.file import FileBackend   # (at import: it runs ldconfig once, no process in a test)
from stml import config
from stml.api import pack, unpack
from stml.api.messages import FROM_STML, XMIT_RESPONSE_FIXED, Op, pack_xmit_response
from stml.server import StmlServer

IDENT = b"\0stream-1"
GOOD, CHECK_CONDITION = 0x00, 0x02


def cdb10(opcode: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", opcode, 0, lba, 0, blocks, 0)


class Stub:
    """What StmlServer needs of a StreamChannel: it keeps what is sent."""
    region = None

    def __init__(self) -> None:
        self.sent: list[list] = []

    def send(self, frames: list) -> None:
        self.sent.append(frames)


class Stml:
    """An StmlServer fed by hand, one front end with nexus 1 registered."""

    def __init__(self, server: StmlServer) -> None:
        self.server = server
        self.stream = Stub()
        server.streams[IDENT] = self.stream   # type: ignore[assignment]
        self.receive({"op": "register_target_front_end", "name": "t", "kind": "test", "version": [1, 0]})
        self.target = next(iter(server.emulator.targets))
        self.receive({"op": "register_nexus", "nexus": 1, "initiator": "iqn.x", "target": self.target,
                      "tpg": 1})
        self.tag = 100
        self.command(cdb10(0x00, 0, 0), 0, 0)   # TEST UNIT READY

    def receive(self, header: dict[str, Any], *data: bytes) -> None:
        self.server.received([IDENT, pack(header), *data])

    def command(self, cdb: bytes, direction: int, length: int, *data: bytes,
                tag: int | None = None) -> tuple[bytes, dict[str, Any], list]:
        """Send one command: (the response's header as sent, decoded, data frames)."""
        if tag is None:
            self.tag += 1
            tag = self.tag
        self.stream.sent.clear()
        self.receive({"op": "rx_cmnd", "tag": tag, "nexus": 1, "lun": 0, "cdb": cdb, "attr": 0,
                      "dir": direction, "len": length, "unsol": len(b"".join(data))}, *data)
        (raw, *frames), = self.stream.sent
        header = unpack(raw)
        assert header["op"] == "xmit_response" and header["tag"] == tag
        return raw, header, frames


def _served(data_dir: Path, lun: str) -> Iterator[Stml]:
    """An in-process StmlServer with one LUN, on a loop of its own, torn down after."""
    async def make() -> StmlServer:   # (the server wants a running loop when made)
        return StmlServer(config.load(data_dir=str(data_dir), luns=(lun,)))

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(make())
    try:
        asyncio.set_event_loop(loop)
        yield Stml(server)
    finally:
        server.sock.close(linger=0)
        server.ctx.term()
        server.executor.shutdown()
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture
def stml(tmp_path: Path) -> Iterator[Stml]:
    yield from _served(tmp_path / "data", "ram:16MiB")


def the_dict(tag: int, status: int, sense: bytes | None, resid: int) -> dict[str, Any]:
    return {"op": "xmit_response", "tag": tag, "status": status, "sense": sense, "resid": resid}


@pytest.mark.parametrize("tag, status, resid", [
    (0, 0, 0), (1, 0x28, 4096), (0xFFFFFFFF, 0xFF, -(1 << 63)), (7, 0x40, (1 << 63) - 1), (9, 0, -512)])
def test_fixed_xmit_response_reads_back_as_the_dict(tag: int, status: int, resid: int) -> None:
    """The fixed layout, at its edges, decodes to the header StmlSender's dict
    packs to (same keys, same order) and passes a front end's check."""
    raw = pack_xmit_response(tag, status, resid)
    want = the_dict(tag, status, None, resid)
    assert len(raw) == XMIT_RESPONSE_FIXED.size
    assert unpack(raw) == want and list(unpack(raw)) == list(want)
    assert FROM_STML[Op.XMIT_RESPONSE].verdict(unpack(raw)) is None


@pytest.mark.parametrize("tag, status, resid", [(1 << 32, 0, 0), (-1, 0, 0), (1, 256, 0), (1, 0, 1 << 63)])
def test_values_past_the_fixed_layout_do_not_pack(tag: int, status: int, resid: int) -> None:
    with pytest.raises(struct.error):
        pack_xmit_response(tag, status, resid)


def test_responses_leave_in_the_fixed_layout_only_without_sense_and_tap(stml: Stml) -> None:
    """A GOOD read, and a read with a residual, go in the fixed layout with
    their data; CHECK CONDITION (sense data) and a tag past 32 bits as the
    dict packs them; the counters count every one."""
    img = bytes(range(256)) * 16
    raw, h, frames = stml.command(cdb10(0x2A, 8, 8), 1, 4096, img)
    assert h == the_dict(stml.tag, GOOD, None, 0) and len(raw) == XMIT_RESPONSE_FIXED.size and frames == []
    raw, h, frames = stml.command(cdb10(0x28, 8, 8), 2, 4096)
    assert h == the_dict(stml.tag, GOOD, None, 0) and len(raw) == XMIT_RESPONSE_FIXED.size
    assert b"".join(bytes(f) for f in frames) == img
    raw, h, frames = stml.command(cdb10(0x28, 8, 8), 2, 8192)          # underflow
    assert h == the_dict(stml.tag, GOOD, None, 4096) and len(raw) == XMIT_RESPONSE_FIXED.size
    raw, h, frames = stml.command(cdb10(0x28, 8, 8), 2, 2048)          # overflow: cut to what was asked
    assert h == the_dict(stml.tag, GOOD, None, -2048) and b"".join(bytes(f) for f in frames) == img[:2048]
    raw, h, frames = stml.command(cdb10(0x28, 1 << 30, 8), 2, 4096)    # LBA out of range
    assert h["status"] == CHECK_CONDITION and h["sense"][2] & 0x0F == 0x05 and h["sense"][12] == 0x21
    assert raw == pack(h) and frames == []
    raw, h, frames = stml.command(cdb10(0x28, 8, 8), 2, 4096, tag=1 << 40)
    assert h == the_dict(1 << 40, GOOD, None, 0) and raw == pack(h)
    [lun] = stml.server.metrics.snapshot(stml.server.emulator)["luns"]
    assert lun["commands"] == 7 and lun["errors"] == 1 and lun["in_flight"] == 0   # (the first TUR too)
    assert lun["write_bytes"] == 4096 and lun["read_bytes"] == 4096 * 3 + 2048


def test_a_tap_sees_every_response_as_a_header(stml: Stml) -> None:
    """With a tap on, responses go the way of the dict (the tap is given the
    header and its packed bytes); with it off again, the fixed layout."""
    seen: list[dict[str, Any]] = []

    class Tap:
        def inbound(self, ident: bytes, header: dict[str, Any], packed: bytes, frames: list) -> bool:
            return True

        def outbound(self, ident: bytes, header: dict[str, Any], packed: bytes, frames: list) -> bool:
            seen.append(header)
            return True

    tap = Tap()
    stml.server.add_tap(tap)   # type: ignore[arg-type]
    raw, h, _ = stml.command(cdb10(0x28, 0, 8), 2, 4096)
    assert seen == [h] and raw == pack(h) and h["status"] == GOOD
    stml.server.remove_tap(tap)   # type: ignore[arg-type]
    raw, h, _ = stml.command(cdb10(0x28, 0, 8), 2, 4096)
    assert len(seen) == 1 and len(raw) == XMIT_RESPONSE_FIXED.size


# ---------------------------------------------------------------- commands typed in C

def test_rx_cmnd_struct_is_the_tables_message() -> None:
    """RxCmnd (what the command path decodes) has the table's checked fields
    of rx_cmnd, of the table's types, required where the table says."""
    import msgspec

    from stml.api.messages import INT, BYTES, TO_STML, RxCmnd
    m = TO_STML[Op.RX_CMND.value]
    fields = {f.name: f for f in m.fields if f.checked}
    info = msgspec.inspect.type_info(RxCmnd)
    assert isinstance(info, msgspec.inspect.StructType) and info.tag_field == "op" and info.tag == "rx_cmnd"
    assert {f.name for f in info.fields} == set(fields)
    kinds = {msgspec.inspect.IntType: INT, msgspec.inspect.BytesType: BYTES}
    for f in info.fields:
        assert kinds[type(f.type)] is fields[f.name].kind and f.required == fields[f.name].required


def test_rx_cmnd_fields_come_in_their_named_order() -> None:
    """rx_cmnd_fields (the command path's one read of an RxCmnd) gives the
    fields in RX_CMND_FIELDS's order, which the STML unpacks by position."""
    from stml.api.messages import RX_CMND_FIELDS, RxCmnd, decode_rx_cmnd, rx_cmnd_fields
    assert RxCmnd.__struct_fields__ == RX_CMND_FIELDS
    header = {"op": "rx_cmnd", "tag": 1, "nexus": 2, "lun": 3, "cdb": b"\x28" + bytes(9), "attr": 1, "dir": 2,
              "len": 4096, "unsol": 7}
    assert rx_cmnd_fields(decode_rx_cmnd(pack(header))) == tuple(header[k] for k in RX_CMND_FIELDS)


def the_link_packs(tag: int, lun: int, cdb: bytes, attr: int, direction: int, length: int,
                   unsol: int) -> bytes:
    """rx_cmnd's header as FrontEndLink packs it (its fixed layout when the values fit)."""
    from stml.api import FrontEndLink
    sent: list[list] = []

    class Channel:
        def send(self, frames: list) -> None:
            sent.append(frames)

    link = FrontEndLink("ipc:///nonexistent/hot", "test", None)   # type: ignore[arg-type]
    link._channel = Channel()   # type: ignore[assignment]
    link.rx_cmnd(tag, 1, lun, cdb, attr, direction, length, unsol, [b"x" * unsol] if unsol else ())
    return sent[0][0]


def test_commands_take_the_typed_path_and_odd_ones_the_tables(stml: Stml, monkeypatch) -> None:
    """rx_cmnd headers that front ends write (FrontEndLink's fixed layout, a
    dict packed with its op first) reach Emulator.command without handle();
    a header RxCmnd does not take (a negative or missing count, attr past
    ACA, an empty CDB, a bool for an int, its op not first) goes through
    handle() and is answered or refused as the table says."""
    em = stml.server.emulator
    handled: list[str] = []
    plain = em.handle

    def handle(ident: bytes, header: dict[str, Any], frames: list, lease: Any = None) -> None:
        handled.append(header["op"])
        plain(ident, header, frames, lease)

    monkeypatch.setattr(em, "handle", handle)
    stream = stml.stream

    def send(raw: bytes, *data: bytes) -> dict[str, Any] | None:
        stream.sent.clear()
        stml.server.received([IDENT, raw, *data])
        return unpack(stream.sent[0][0]) if stream.sent else None

    read = cdb10(0x28, 0, 8)
    h = send(the_link_packs(1, 0, read + bytes(6), 0, 2, 4096, 0))         # fixed layout, 16-byte CDB
    assert h == the_dict(1, GOOD, None, 0) and handled == []
    h = send(pack({"op": "rx_cmnd", "tag": 2, "nexus": 1, "lun": 0, "cdb": read, "dir": 2, "len": 4096}))
    assert h == the_dict(2, GOOD, None, 0) and handled == []
    h = send(the_link_packs(3, 0, cdb10(0x2A, 0, 1), 0, 1, 512, 512), b"w" * 512)
    assert h == the_dict(3, GOOD, None, 0) and handled == []
    assert send(pack({"op": "rx_cmnd", "tag": 3, "nexus": 1, "lun": 0, "cdb": read, "dir": 2,
                      "len": 4096}))["status"] == GOOD    # (tag 3 ended: free again)

    base = {"op": "rx_cmnd", "nexus": 1, "lun": 0, "cdb": read, "dir": 2, "len": 4096}
    refused_field = [("lun", -1, 0x25), ("len", -4096, 0x0E), ("attr", 4, 0x0E), ("unsol", -1, 0x0E)]
    for i, (key, value, asc) in enumerate(refused_field):
        h = send(pack({**base, "tag": 10 + i, key: value}))
        assert h is not None and h["status"] == CHECK_CONDITION and h["sense"][12] == asc, key
    assert handled == ["rx_cmnd"] * 4
    for i, odd in enumerate([{"cdb": b""}, {"tag": True}]):
        assert send(pack({**base, "tag": 20 + i, **odd})) is None      # refused: no answer
    h = send(pack({**base, "tag": 22, "lun": None}))                   # refused by the table, answered
    assert h is not None and h["status"] == CHECK_CONDITION and h["sense"][12] == 0x25
    assert handled == ["rx_cmnd"] * 7
    op_last = {"tag": 30, "nexus": 1, "lun": 0, "cdb": read, "dir": 2, "len": 4096, "op": "rx_cmnd"}
    assert send(pack(op_last)) == the_dict(30, GOOD, None, 0) and handled == ["rx_cmnd"] * 8
    h = send(pack({**base, "tag": 31, "nexus": 9}))                    # no such nexus
    assert h is not None and h["status"] == CHECK_CONDITION and h["sense"][2] & 0x0F == 0x0B
    assert handled == ["rx_cmnd"] * 8


# ---------------------------------------------------------------- read data in new memory

def test_file_pread_nowait_reads_memory_files_only(tmp_path: Path, tmp_shm: Path) -> None:
    """On a memory file system pread_nowait gives the data in new bytes (zeros
    past the end of a file shrunk under it); elsewhere None, for read_nowait
    to decide (pread has no RWF_NOWAIT)."""
    data = bytes(range(256)) * 64
    mem = FileBackend(str(tmp_shm / "lun.img"), 1 << 20)
    disk = FileBackend(str(tmp_path / "lun.img"), 1 << 20)
    try:
        for b in (mem, disk):
            b.write_from(4096, [memoryview(data)], False)
        got = mem.pread_nowait(4096, len(data))
        assert type(got) is bytes and got == data
        os.truncate(tmp_shm / "lun.img", 4096 + 512)
        assert mem.pread_nowait(4096, 1024) == data[:512] + bytes(512)
        assert disk.pread_nowait(4096, len(data)) is None
    finally:
        mem.close()
        disk.close()


@pytest.fixture
def file_stml(tmp_shm: Path) -> Iterator[Stml]:
    """The STML on a file LUN in memory (pathcost's and bench.py's kind)."""
    with open(tmp_shm / "lun.img", "wb") as f:
        f.truncate(16 << 20)
    yield from _served(tmp_shm / "data", f"file:{tmp_shm / 'lun.img'},thick")


def test_small_reads_come_in_new_memory_without_a_buffer(file_stml: Stml, monkeypatch) -> None:
    """A READ the front end's shared memory does not take is read by
    pread_nowait, one call, into no buffer of the STML's (read_nowait is not
    called); its data and residuals are those of the medium."""
    calls: list[str] = []
    for name in ("pread_nowait", "read_nowait", "read_into"):
        plain = getattr(FileBackend, name)
        monkeypatch.setattr(FileBackend, name, lambda self, *a, _p=plain, _n=name: calls.append(_n) or _p(self, *a))
    img = bytes(range(256)) * 32
    assert file_stml.command(cdb10(0x2A, 16, 16), 1, 8192, img)[1]["status"] == GOOD
    for length, want, resid in [(8192, img, 0), (4096, img[:4096], -4096), (16384, img, 8192)]:
        calls.clear()
        raw, h, frames = file_stml.command(cdb10(0x28, 16, 16), 2, length)
        assert h == the_dict(file_stml.tag, GOOD, None, resid) and len(raw) == XMIT_RESPONSE_FIXED.size
        assert b"".join(bytes(f) for f in frames) == want and calls == ["pread_nowait"]
    calls.clear()
    raw, h, frames = file_stml.command(cdb10(0x28, 16, 0), 2, 0)      # no blocks: no call
    assert h == the_dict(file_stml.tag, GOOD, None, 0) and frames == [] and calls == []


# ------------------------------------------------------------ a big READ's shared slot (decision 0426)

BIG_READ = 64 << 10   # a slot's size: get() hands out the slot's own view


def with_region(s: Stml) -> tuple[Any, list[Any]]:
    """The stub stream shares memory, as a same-host front end's does: (the
    region, the tasks READs read into from now on), the region's and the
    tasks' state being what the tests look at."""
    from stml.api import SharedRegion
    region = SharedRegion(1 << 20)
    s.stream.region = region   # type: ignore[assignment]
    tasks: list[Any] = []
    chosen = s.server.emulator.read_buffer

    def read_buffer(task: Any, size: int) -> Any:
        tasks.append(task)
        return chosen(task, size)
    s.server.emulator.read_buffer = read_buffer
    return region, tasks


def test_a_big_reads_slot_goes_back_once_when_its_task_ends(stml: Stml) -> None:
    """The READ's data is sent from a slot of the shared region, and the slot
    is free once the task ended (the stub lends nothing): not kept (never
    released), and the task no longer names it, so a task ended again (a
    second _forget) cannot give back a slot another READ has taken since."""
    region, tasks = with_region(stml)
    img = bytes(range(256)) * (BIG_READ // 256)
    assert stml.command(cdb10(0x2A, 0, BIG_READ // 512), 1, BIG_READ, img)[1]["status"] == GOOD
    _, h, frames = stml.command(cdb10(0x28, 0, BIG_READ // 512), 2, BIG_READ)
    assert h["status"] == GOOD and len(frames) == 1 and region.owns(frames[0])
    assert bytes(frames[0]) == img
    task, = tasks
    assert region.in_use() == 0 and task.slot is None and task.slot_region is None
    other = region.get(BIG_READ)   # the same slot (last in, first out), taken by someone else
    assert other is not None and other.obj is frames[0].obj
    stml.server.emulator._forget(task)
    assert region.in_use() == 1, "a task ended twice gave back a slot it no longer held"
    again = region.get(BIG_READ)
    assert again is not None and again.obj is not other.obj
    region.release(other)


def test_one_task_holds_one_slot(stml: Stml) -> None:
    """A second buffer asked for the same task is new memory, not a second
    slot the task would not give back."""
    region, tasks = with_region(stml)
    stml.command(cdb10(0x28, 0, BIG_READ // 512), 2, BIG_READ)
    task, = tasks
    read_buffer = stml.server._read_buffer
    first = read_buffer(task, BIG_READ)
    assert first is not None and region.in_use() == 1
    assert read_buffer(task, BIG_READ) is None and region.in_use() == 1
    stml.server.emulator._forget(task)
    assert region.in_use() == 0


def test_a_big_read_that_fails_gives_its_slot_back(file_stml: Stml, monkeypatch) -> None:
    """A backend error ends the READ with CHECK CONDITION, and its slot is free."""
    region, tasks = with_region(file_stml)

    def failing(self: Any, offset: int, buf: Any) -> bool:
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(FileBackend, "read_nowait", failing)
    _, h, frames = file_stml.command(cdb10(0x28, 0, BIG_READ // 512), 2, BIG_READ)
    assert h["status"] == CHECK_CONDITION and frames == []
    assert region.in_use() == 0 and tasks[0].slot_region is None


@pytest.mark.parametrize("end", ["abort", "front end gone"])
def test_a_big_read_ended_while_its_backend_reads_keeps_its_slot_until_then(file_stml: Stml, monkeypatch,
                                                                           end: str) -> None:
    """A READ aborted (ABORT TASK) or whose front end went away while the
    backend reads into its slot: the slot stays taken until the read is done
    (the backend still writes into it), then comes back once."""
    import threading
    region, tasks = with_region(file_stml)
    started, go = threading.Event(), threading.Event()
    plain = FileBackend.read_into

    def slow(self: Any, offset: int, buf: Any) -> None:
        started.set()
        go.wait(10)
        plain(self, offset, buf)
    monkeypatch.setattr(FileBackend, "read_nowait", lambda self, offset, buf: False)
    monkeypatch.setattr(FileBackend, "read_into", slow)

    async def until(what: Any) -> None:
        for _ in range(1000):
            if what():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def scenario() -> None:
        file_stml.receive({"op": "rx_cmnd", "tag": 7, "nexus": 1, "lun": 0, "attr": 0, "dir": 2,
                           "cdb": cdb10(0x28, 0, BIG_READ // 512), "len": BIG_READ, "unsol": 0})
        await until(started.is_set)
        assert region.in_use() == 1
        if end == "abort":
            file_stml.receive({"op": "rx_task_mgmt_fn", "tag": 8, "nexus": 1, "fn": 1, "lun": 0, "ref": 7})
        else:
            file_stml.server._stream_closed(IDENT)
        await asyncio.sleep(0.05)
        assert region.in_use() == 1, "the slot went back while the backend still reads into it"
        go.set()
        await until(lambda: region.in_use() == 0)
        task, = tasks
        assert task.slot is None and task.slot_region is None
        await asyncio.sleep(0.05)
        assert region.in_use() == 0 and region.get(BIG_READ) is not None
    asyncio.get_event_loop().run_until_complete(scenario())
