"""A front end written against the contract's docstring (stml/api), nothing else:
a raw ZeroMQ DEALER that sends and reads contract headers as plain dicts, so the
tests can send what a real front end never would."""
from __future__ import annotations

import time
import uuid

import msgpack
import zmq

from stml.api import CONTRACT_VERSION
from stml.config import host_iqn
from stml.sense import parse_sense


class RawFrontEnd:
    """A front end written against the contract's docstring, nothing else."""

    def __init__(self, endpoint: str, name: str | None = None, curve: dict[str, bytes] | None = None) -> None:
        """`curve`: {public, secret, server} keys (scsi_runtime.curvekeys.curve_client_keys), for tcp://."""
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve:
            self.sock.curve_secretkey = curve["secret"]
            self.sock.curve_publickey = curve["public"]
            self.sock.curve_serverkey = curve["server"]
        self.name = name or f"raw-{uuid.uuid4().hex[:8]}"
        self.sock.setsockopt(zmq.ROUTING_ID, self.name.encode())
        self.sock.connect(endpoint)
        self.pending: list[tuple[dict, list[bytes]]] = []   # received, not yet returned

    def send(self, header: dict, frames: list = ()) -> None:
        self.sock.send_multipart([msgpack.packb(header, use_bin_type=True), *frames])

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 10.0, skip_heartbeats: bool = True) -> tuple[dict, list[bytes]]:
        """The next message; the messages of a `batch` (several sent in one loop
        turn of the STML, the contract's ZeroMQ carrier) one at a time."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.pending:
                left = deadline - time.monotonic()
                if left <= 0 or not self.sock.poll(int(left * 1000)):
                    raise TimeoutError("no message from the STML")
                self._receive(self.sock.recv_multipart())
                continue
            header, frames = self.pending.pop(0)
            if skip_heartbeats and header.get("op") == "heartbeat":
                continue
            return header, frames

    def _receive(self, frames: list[bytes]) -> None:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        if header.get("op") != "batch":
            self.pending.append((header, frames[1:]))
            return
        pos = 1
        for n in header["n"]:
            self.pending.append((msgpack.unpackb(frames[pos], raw=False, strict_map_key=False),
                                 frames[pos + 1:pos + n]))
            pos += n

    def expect(self, op: str, timeout: float = 10.0) -> tuple[dict, list[bytes]]:
        header, frames = self.recv(timeout)
        assert header["op"] == op, f"expected {op}, got {header}"
        return header, frames

    def register(self, version=CONTRACT_VERSION, heartbeat_ms: int = 1000) -> dict:
        self.send({"op": "register_target_front_end", "version": list(version), "kind": "raw",
                   "name": self.name, "heartbeat_ms": heartbeat_ms, "aen": False})
        return self.expect("detect")[0]

    def nexus(self, nexus: int = 1, target: str | None = None, initiator: str | None = None) -> dict:
        self.send({"op": "register_nexus", "nexus": nexus,
                   "initiator": initiator or f"iqn.2026-01.test:{self.name},i,0x1", "target": target or host_iqn(),
                   "tpg": 1})
        return self.expect("nexus_ready")[0]

    def cmnd(self, tag: int, cdb: bytes, *, nexus: int = 1, lun: int = 0, direction: int = 0,
             length: int = 0, unsol: int = 0, attr: int = 0, frames: list = ()) -> None:
        self.send({"op": "rx_cmnd", "tag": tag, "nexus": nexus, "lun": lun, "cdb": cdb,
                   "attr": attr, "dir": direction, "len": length, "unsol": unsol}, frames)

    def command(self, tag: int, cdb: bytes, **kw) -> tuple[dict, list[bytes]]:
        """Send a command and return its xmit_response, clearing a unit attention first."""
        for _ in range(4):
            self.cmnd(tag, cdb, **kw)
            h, f = self.expect("xmit_response")
            assert h["tag"] == tag
            if h["status"] == 0x02 and h["sense"] and parse_sense(h["sense"])[0] == 0x6:
                continue
            return h, f
        return h, f

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
