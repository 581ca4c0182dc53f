"""A minimal blocking iSCSI initiator built on fetd_tcp.pdu, for tests that need
PDU-level control (several connections per session, NOP, logout, bad input,
digests it can damage on purpose, connections it can kill)."""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

from fetd_tcp import pdu as P
from fetd_tcp.digest import digest, padding


class RawInitiator:
    def __init__(self, host: str, port: int, initiator: str = "iqn.2026-11.org.test:raw",
                 isid: bytes | None = None, timeout: float = 10.0, rcvbuf: int | None = None) -> None:
        if rcvbuf is None:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        else:   # a small receive window: what the target sends piles up on its side
            self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
        self.initiator = initiator
        self.isid = isid or b"\x80" + os.urandom(5)
        self.itt = 0
        self.cmd_sn = 1
        self.exp_stat_sn = 0
        self.tsih = 0
        self.max_cmd_sn = 0
        self.hd = self.dd = False       # digests, as negotiated (set after login)
        self.track_stat_sn = True       # False: ExpStatSN stays put (holes to fill first)

    @classmethod
    def once_listening(cls, host: str, port: int, **kw: Any) -> RawInitiator:
        """Connected as soon as a front end just started listens on the port."""
        for _ in range(200):
            try:
                return cls(host, port, **kw)
            except ConnectionRefusedError:
                time.sleep(0.05)
        raise AssertionError(f"nothing listens on {host}:{port}")

    def kill(self) -> None:
        """End the TCP connection with a reset, as a cable pull looks to the target."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def _next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def send(self, pdu: Any, data: bytes = b"", bad_header: bool = False, bad_data: bool = False) -> None:
        """One PDU, with the negotiated digests (damaged when asked)."""
        hdr = pdu.encode()
        out = hdr
        if self.hd:
            d = bytearray(digest(hdr))
            if bad_header:
                d[0] ^= 0xFF
            out += bytes(d)
        if data:
            out += data + padding(len(data))
            if self.dd:
                d = bytearray(digest(data, padding(len(data))))
                if bad_data:
                    d[0] ^= 0xFF
                out += bytes(d)
        self.sock.sendall(out)

    def recv(self) -> tuple[Any, bytes]:
        header = self._exact(P.BHS_LEN)
        bhs = P.parse_bhs(header)
        n = bhs.remaining(self.hd, self.dd)
        rest = self._exact(n) if n else b""
        ahs = rest[:bhs.ahs_length]
        at = bhs.ahs_length + (4 if self.hd else 0)
        if self.hd:
            assert rest[bhs.ahs_length:at] == digest(header, ahs), "header digest"
        data = rest[at:at + bhs.data_length]
        if self.dd and bhs.data_length:
            end = at + ((bhs.data_length + 3) & ~3)
            assert rest[end:end + 4] == digest(rest[at:end]), "data digest"
        pdu = P.decode_pdu(header, ahs)
        if hasattr(pdu, "stat_sn") and not isinstance(pdu, (P.R2T,)) and self.track_stat_sn:
            if getattr(pdu, "status", 0) is not None or not isinstance(pdu, P.DataIn):
                self.exp_stat_sn = (pdu.stat_sn + 1) & 0xFFFFFFFF
        if hasattr(pdu, "max_cmd_sn"):
            self.max_cmd_sn = pdu.max_cmd_sn
        return pdu, data

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed by target")
            buf += chunk
        return bytes(buf)

    def login(self, target: str | None, session_type: str = "Normal", tsih: int = 0, cid: int = 0,
              extra: list[tuple[str, str]] = (), unanswered: bool = False) -> P.LoginResponse:
        """One-PDU login straight to full feature phase (no authentication).
        `unanswered`: the Login Request that asks for full feature phase is
        sent and its response not read (the last one read is returned)."""
        pairs = [("InitiatorName", self.initiator), ("SessionType", session_type),
                 ("AuthMethod", "None")]
        if target:
            pairs.append(("TargetName", target))
        pairs += list(extra)
        data = P.encode_text(pairs)
        req = P.LoginRequest(self._next_itt(), self.isid, tsih, cid, self.cmd_sn, self.exp_stat_sn,
                             csg=P.STAGE_SECURITY, nsg=P.STAGE_OPERATIONAL, transit=True,
                             data_length=len(data))
        self.send(req, data)
        resp, rdata = self.recv()
        self.login_keys = dict(P.decode_text(rdata)) if rdata else {}
        while resp.status_class == 0 and resp.nsg != P.STAGE_FULL_FEATURE:
            stage = resp.nsg if resp.transit else resp.csg
            body = P.encode_text([])
            req = P.LoginRequest(self._next_itt(), self.isid, tsih, cid, self.cmd_sn, self.exp_stat_sn,
                                 csg=stage, nsg=P.STAGE_FULL_FEATURE, transit=True, data_length=0)
            self.send(req, body)
            if unanswered:
                return resp
            resp, rdata = self.recv()
            self.login_keys.update(P.decode_text(rdata) if rdata else [])
        self.tsih = resp.tsih
        if resp.status_class == 0:
            self.hd = self.login_keys.get("HeaderDigest") == "CRC32C"
            self.dd = self.login_keys.get("DataDigest") == "CRC32C"
        return resp

    def command(self, cdb: bytes, lun: int = 0, read: int = 0, write: bytes = b"",
                immediate_data: bool = True) -> tuple[int, bytes, bytes]:
        """(status, sense, read data) of one SCSI command; answers R2Ts."""
        itt = self._next_itt()
        imm = write if immediate_data else b""
        cmd = P.ScsiCommand(itt, P.int_to_lun(lun), cdb.ljust(16, b"\0"), read or len(write),
                            self.cmd_sn, self.exp_stat_sn, read=bool(read), write=bool(write),
                            data_length=len(imm))
        self.cmd_sn += 1
        self.send(cmd, imm)
        data = bytearray()
        while True:
            pdu, seg = self.recv()
            if isinstance(pdu, P.R2T):
                chunk = write[pdu.buffer_offset:pdu.buffer_offset + pdu.desired_length]
                self.send(P.DataOut(itt, pdu.ttt, 0, pdu.buffer_offset, True, self.exp_stat_sn,
                                    P.int_to_lun(lun), len(chunk)), chunk)
            elif isinstance(pdu, P.DataIn):
                data[pdu.buffer_offset:pdu.buffer_offset + len(seg)] = seg
                if pdu.status is not None:
                    return pdu.status, b"", bytes(data)
            elif isinstance(pdu, P.ScsiResponse):
                sense = P.decode_sense_segment(seg) if seg else b""
                return pdu.status, sense, bytes(data)
            elif isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG:
                self.send(P.NopOut(P.RESERVED_TAG, pdu.ttt, self.cmd_sn, self.exp_stat_sn, immediate=True))

    def read16(self, lba: int, blocks: int, lun: int = 0) -> bytes:
        status, sense, data = self.command(struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0),
                                           lun, read=blocks * 512)
        assert status == 0, (status, sense)
        return data

    def write16(self, lba: int, data: bytes, lun: int = 0, immediate_data: bool = True) -> None:
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0)
        status, sense, _ = self.command(cdb, lun, write=data, immediate_data=immediate_data)
        assert status == 0, (status, sense)

    def nop(self, payload: bytes = b"") -> tuple[Any, bytes]:
        itt = self._next_itt()
        self.send(P.NopOut(itt, P.RESERVED_TAG, self.cmd_sn, self.exp_stat_sn, immediate=True,
                           data_length=len(payload)), payload)
        return self.recv()

    def text(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        data = P.encode_text(pairs)
        out = bytearray()
        ttt = P.RESERVED_TAG
        while True:
            self.send(P.TextRequest(self._next_itt(), ttt, self.cmd_sn, self.exp_stat_sn,
                                    immediate=True, data_length=len(data)), data)
            pdu, seg = self.recv()
            out += seg
            if pdu.final:
                return P.decode_text(bytes(out))
            ttt, data = pdu.ttt, b""

    def tmf(self, function: int, lun: int = 0, rtt: int = P.RESERVED_TAG, ref_cmd_sn: int = 0,
            exp_data_sn: int = 0) -> P.TaskMgmtResponse:
        """One immediate task management request; other PDUs before its answer are skipped."""
        itt = self._next_itt()
        self.send(P.TaskMgmtRequest(itt, function, P.int_to_lun(lun), rtt, self.cmd_sn, self.exp_stat_sn,
                                    ref_cmd_sn, exp_data_sn))
        while True:
            pdu, _ = self.recv()
            if isinstance(pdu, P.TaskMgmtResponse) and pdu.itt == itt:
                return pdu

    def logout(self, reason: int = 0, cid: int = 0) -> P.LogoutResponse:
        self.send(P.LogoutRequest(self._next_itt(), reason, cid, self.cmd_sn, self.exp_stat_sn))
        self.cmd_sn += 1
        pdu, _ = self.recv()
        return pdu
