"""An in-process STML for command-set tests: an Emulator with RAM LUNs and a
fake front end that answers rdy_to_xfer with the data it was given. No
sockets, no subprocesses. Also the UNMAP and sparse-file builders the SBC
tests share."""
from __future__ import annotations

import asyncio
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from backends.ram import RamBackend
from stml.api import CONTRACT_VERSION, DataDir, Op
from stml.emulator import Emulator, Target
from stml.lu import LogicalUnit, LunOptions
from stml.sense import parse_sense

TARGET = "iqn.2026-11.org.test:disk"


@dataclass
class Result:
    status: int
    sense: bytes | None
    data: bytes
    resid: int

    @property
    def key_asc(self) -> tuple[int, int, int] | None:
        return parse_sense(self.sense) if self.sense else None

    @property
    def field(self) -> tuple[int, int | None] | None:
        """(byte, bit) of the sense-key-specific field pointer (fixed format)."""
        s = self.sense
        if not s or s[0] & 0x7F != 0x70 or not s[15] & 0x80:
            return None
        return int.from_bytes(s[16:18], "big"), (s[15] & 7) if s[15] & 0x08 else None


class Harness:
    def __init__(self, luns: list[LunOptions] | None = None) -> None:
        luns = luns or [LunOptions("ram", size=16 << 20)]
        self.executor = ThreadPoolExecutor(2)
        self.emulator = Emulator([], self._send, self.executor)
        lus = {i: LogicalUnit(TARGET, i, RamBackend(o.size), o, self.emulator.templates["disk"])
               for i, o in enumerate(luns)}
        self.emulator.targets[TARGET] = Target(TARGET, lus)
        self.pending: dict[int, asyncio.Future] = {}
        self.outdata: dict[int, bytes] = {}
        self.tag = 0
        self.emulator.handle(b"fe", {"op": Op.REGISTER, "version": list(CONTRACT_VERSION),
                                     "kind": "test", "name": "test"}, [])
        self.nexus(1, "iqn.init:one")

    def nexus(self, nid: int, initiator: str) -> None:
        self.emulator.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": nid, "initiator": initiator,
                                     "target": TARGET, "tpg": 1}, [])

    def lu(self, lun: int = 0) -> LogicalUnit:
        return self.emulator.targets[TARGET].luns[lun]

    def _send(self, ident: bytes, h: dict[str, Any], frames: list) -> None:
        if h["op"] == Op.RDY_TO_XFER:
            data = self.outdata[h["tag"]][h["offset"]:h["offset"] + h["length"]]
            asyncio.get_running_loop().call_soon(
                self.emulator.handle, b"fe",
                {"op": Op.RX_DATA, "tag": h["tag"], "offset": h["offset"]}, [memoryview(data)])
        elif h["op"] == Op.XMIT_RESPONSE:
            fut = self.pending.pop(h["tag"])
            data = b"".join(bytes(f) for f in frames)
            fut.set_result(Result(h["status"], h["sense"], data, h["resid"]))

    async def cmd(self, cdb: bytes, data: bytes = b"", alloc: int | None = None, lun: int = 0,
                  nexus: int = 1, exp_len: int | None = None, no_data: bool = False) -> Result:
        """`no_data`: no data direction, as initiators send SYNCHRONIZE CACHE
        or TEST UNIT READY (else a command without data is a read)."""
        self.tag += 1
        tag = self.tag
        fut = asyncio.get_running_loop().create_future()
        self.pending[tag] = fut
        self.outdata[tag] = data
        if data:
            direction, length = DataDir.WRITE, len(data) if exp_len is None else exp_len
        else:
            direction, length = DataDir.READ, 1 << 20 if alloc is None else alloc
        if no_data:
            direction, length = DataDir.NONE, 0
        self.emulator.handle(b"fe", {"op": Op.RX_CMND, "nexus": nexus, "tag": tag, "lun": lun,
                                     "cdb": cdb.ljust(16, b"\0"), "attr": 0, "dir": int(direction),
                                     "len": length, "unsol": 0}, [])
        return await asyncio.wait_for(fut, 10)


def run(coro):
    return asyncio.run(coro)


def cscd(naa: bytes, block_size: int = 512) -> bytes:
    """An EXTENDED COPY identification descriptor (E4h) naming a LU by its
    16-byte NAA designator, with the block size the copy assumes."""
    d = bytearray(32)
    d[0] = 0xE4
    d[4:8] = bytes([0x01, 0x03, 0x00, 16])
    d[8:24] = naa
    d[29:32] = block_size.to_bytes(3, "big")
    return bytes(d)


def unmap(*ranges: tuple[int, int]) -> tuple[bytes, bytes]:
    """UNMAP's CDB and parameter list for (LBA, count) ranges."""
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    data = struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs
    return bytes([0x42, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", len(data)) + b"\0", data


def fragment(path: str, extents: int) -> None:
    """A sparse file with `extents` separate 4 KiB data extents, a hole between each."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, extents * 8192 + (1 << 20))
        for i in range(extents):
            os.pwrite(fd, b"\xAB" * 4096, i * 8192)
    finally:
        os.close(fd)
