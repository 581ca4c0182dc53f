"""A minimal STML on a Unix stream socket, written against docs/contract.md
(not stml.api): it accepts front ends, answers registration and nexuses, and
records what arrives (and answers heartbeats, so a link never finds it
silent and ends every session), so tests can play an STML of another contract version
or one that sends malformed messages to a real FrontEndLink."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from typing import Any

import msgpack

SHARED = 0x80000000


def wire(header: dict[str, Any], frames: list[bytes] = ()) -> bytes:
    parts = [msgpack.packb(header, use_bin_type=True), *frames]
    return struct.pack(f"<{len(parts) + 1}I", len(parts), *map(len, parts)) + b"".join(parts)


class FakeStml:
    """Serves `ipc://PATH` as PATH.stream. `version` and `caps` go in its
    detect (no `caps` field when None: an STML older than 1.4).
    `close_on_control`: a control message (frame count 0) ends the
    connection, as a 1.1 STML did with a front end's region."""

    def __init__(self, path: str, version: tuple[int, int] = (1, 1), caps: list[str] | None = None,
                 close_on_control: bool = True) -> None:
        self.endpoint = f"ipc://{path}"
        self.path = path + ".stream"
        self.version, self.caps, self.close_on_control = version, caps, close_on_control
        self.accepts = 0
        self.messages: list[tuple[dict[str, Any], list[Any]]] = []   # (header, frames)
        self.controls: list[tuple[int, tuple[int, ...]]] = []
        self.conn: socket.socket | None = None
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.listener.setblocking(False)
        self._loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        self.accepts += 1
        self._drop()
        conn.setblocking(False)
        self.conn, self._buf = conn, bytearray()
        self._loop.add_reader(conn.fileno(), self._readable)

    def _drop(self) -> None:
        if self.conn is not None:
            self._loop.remove_reader(self.conn.fileno())
            self.conn.close()
            self.conn = None

    def _readable(self) -> None:
        assert self.conn is not None
        try:
            data, _, _, _ = self.conn.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        except BlockingIOError:
            return
        if not data:
            self._drop()
            return
        self._buf += data
        while self.conn is not None and self._parse_one():
            pass

    def _parse_one(self) -> bool:
        buf = self._buf
        if len(buf) < 4:
            return False
        (count,) = struct.unpack_from("<I", buf)
        if count == 0:
            if len(buf) < 12:
                return False
            kind, n = struct.unpack_from("<2I", buf, 4)
            if len(buf) < 12 + 4 * n:
                return False
            self.controls.append((kind, struct.unpack_from(f"<{n}I", buf, 12)))
            del buf[:12 + 4 * n]
            if self.close_on_control:
                self._drop()
            return True
        if len(buf) < 4 + 4 * count:
            return False
        lengths = struct.unpack_from(f"<{count}I", buf, 4)
        sizes = [8 if n & SHARED else n for n in lengths]
        if len(buf) < 4 + 4 * count + sum(sizes):
            return False
        pos, frames = 4 + 4 * count, []
        for n, size in zip(lengths, sizes):
            frames.append(("shared", *struct.unpack_from("<2I", buf, pos)) if n & SHARED
                          else bytes(buf[pos:pos + size]))
            pos += size
        del buf[:pos]
        header = msgpack.unpackb(frames[0], raw=False)
        self.messages.append((header, frames[1:]))
        self._answer(header)
        return True

    def _answer(self, h: dict[str, Any]) -> None:
        op = h.get("op")
        if op == "register_target_front_end":
            detect: dict[str, Any] = {
                "op": "detect", "version": list(self.version), "stml": "fake", "heartbeat_ms": 1000,
                "limits": {"max_transfer": 8 << 20, "queue_depth": 128}, "discovery": {"chap": None},
                "targets": [{"name": "iqn.2026-12.test:fake", "alias": "", "access": {},
                             "luns": [{"lun": 0, "block_size": 512, "blocks": 2048, "ro": False,
                                       "removable": False}]}]}
            if self.caps is not None:
                detect["caps"] = self.caps
            self.send(detect)
        elif op == "register_nexus":
            self.send({"op": "nexus_ready", "nexus": h["nexus"]})
        elif op == "heartbeat":
            self.send({"op": "heartbeat"})
        elif op == "rx_cmnd":
            self.send({"op": "xmit_response", "tag": h["tag"], "status": 0, "sense": None, "resid": 0})

    def send(self, header: dict[str, Any], frames: list[bytes] = ()) -> None:
        if self.conn is not None:
            self.conn.sendall(wire(header, frames))

    def fetd_tcp(self, port: int) -> subprocess.Popen:
        """A real fetd_tcp attached to this STML, listening on 127.0.0.1:PORT
        (in a session of its own: stop it with stop_pid)."""
        return subprocess.Popen([sys.executable, "-m", "fetd_tcp", "--stml", self.endpoint,
                                 "--portal", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def ops(self) -> list[str]:
        return [h["op"] for h, _ in self.messages]

    def close(self) -> None:
        self._drop()
        self._loop.remove_reader(self.listener.fileno())
        self.listener.close()
        os.unlink(self.path)
