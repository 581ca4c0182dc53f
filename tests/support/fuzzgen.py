"""Generators and single-case runners shared by the fuzz tests (tests/test_fuzz_*.py)
and the long runner (scripts/fuzz.py). Each `run_*` function takes one generated
case and raises AssertionError (or an unexpected exception) on a finding."""
from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

from fetd_tcp import login as L
from fetd_tcp import pdu as P
from fetd_tcp.budget import KEEP
from fetd_tcp.chap import Credentials, Secret
from fetd_tcp.keys import ConnectionParams, SessionParams
from fetd_tcp.session import Connection, Session, Tags
from stml.config import host_iqn

TNAME = host_iqn()   # the default target a test's `run` serves (0207)
INAME = "iqn.2026-11.org.test:fuzz"

# ---------------------------------------------------------------- PDU bytes

INITIATOR_OPS = sorted(P.INITIATOR_OPCODES)


def valid_pdus() -> st.SearchStrategy[bytes]:
    """Well-formed initiator PDUs (header + padded data) to mutate."""
    u32 = st.integers(0, 0xFFFFFFFF)
    lun = st.sampled_from([P.LUN0, P.int_to_lun(1), P.int_to_lun(300), b"\xff" * 8])
    data = st.binary(max_size=600)

    def cmd(itt, l, cdb, edtl, sn, r, w, attr, d):
        return P.ScsiCommand(itt, l, cdb.ljust(16, b"\0"), edtl, sn, 0, read=r, write=w, attr=attr,
                             data_length=len(d)).encode(), d

    def nop(itt, sn, d):
        return P.NopOut(itt, P.RESERVED_TAG, sn, 0, immediate=True, data_length=len(d)).encode(), d

    def dout(itt, ttt, dsn, off, d):
        return P.DataOut(itt, ttt, dsn, off, True, 0, P.LUN0, len(d)).encode(), d

    def text(itt, sn, d):
        return P.TextRequest(itt, P.RESERVED_TAG, sn, 0, immediate=True, data_length=len(d)).encode(), d

    def login(itt, csg, nsg, t, c, d):
        return P.LoginRequest(itt, b"\x80" + bytes(5), 0, 0, 1, 0, csg=csg, nsg=nsg, transit=t, cont=c,
                              data_length=len(d)).encode(), d

    def tmf(itt, fn, rtt, sn):
        return P.TaskMgmtRequest(itt, fn, P.LUN0, rtt, sn, 0, sn, 0, immediate=True).encode(), b""

    def logout(itt, reason, cid, sn):
        return P.LogoutRequest(itt, reason, cid, sn, 0).encode(), b""

    def snack(itt, kind, ttt, exp, beg, run):
        return P.Snack(itt, kind, ttt, exp, beg, run).encode(), b""

    small = st.integers(0, 8)
    parts = st.one_of(
        st.builds(cmd, small, lun, st.binary(max_size=16), st.integers(0, 1 << 20), small,
                  st.booleans(), st.booleans(), st.integers(0, 7), data),
        st.builds(nop, small, small, data),
        st.builds(dout, small, st.sampled_from([P.RESERVED_TAG, 1, 2]), small, st.integers(0, 4096), data),
        st.builds(text, small, small, st.one_of(data, text_segments())),
        st.builds(login, small, st.integers(0, 3), st.integers(0, 3), st.booleans(), st.booleans(),
                  st.one_of(data, text_segments())),
        st.builds(tmf, small, st.integers(0, 127), u32, small),
        st.builds(logout, small, st.integers(0, 127), st.integers(0, 0xFFFF), small),
        st.builds(snack, small, st.integers(0, 15), st.sampled_from([P.RESERVED_TAG, 0, 1, 2]), u32,
                  small, small),
    )
    return parts.map(lambda hd: hd[0] + hd[1] + bytes(-len(hd[1]) % 4))


@st.composite
def mutated_pdu(draw: Any) -> bytes:
    """A valid PDU with bytes flipped, header fields overwritten or the length lied about."""
    buf = bytearray(draw(valid_pdus()))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 5))
        if len(buf) < P.BHS_LEN:
            buf += bytes(P.BHS_LEN - len(buf))
        if kind == 0:       # flip a byte of the BHS
            i = draw(st.integers(0, P.BHS_LEN - 1))
            buf[i] = draw(st.integers(0, 255))
        elif kind == 1:     # lie about DataSegmentLength
            buf[5:8] = draw(st.integers(0, 0xFFFFFF)).to_bytes(3, "big")
        elif kind == 2:     # lie about TotalAHSLength
            buf[4] = draw(st.integers(0, 255))
        elif kind == 3:     # random opcode
            buf[0] = (buf[0] & 0xC0) | draw(st.integers(0, 0x3F))
        elif kind == 4:     # truncate or extend
            n = draw(st.integers(0, len(buf) + 64))
            buf = (buf + draw(st.binary(min_size=64, max_size=64)))[:n]
        else:               # flip a byte anywhere
            if buf:
                buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
    return bytes(buf)


def text_segments() -> st.SearchStrategy[bytes]:
    """Login/Text data: real keys with odd values, duplicates, junk, non-UTF-8."""
    keys = st.sampled_from(["InitiatorName", "TargetName", "SessionType", "AuthMethod", "HeaderDigest",
                            "DataDigest", "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength",
                            "InitialR2T", "ImmediateData", "MaxConnections", "MaxOutstandingR2T",
                            "ErrorRecoveryLevel", "DefaultTime2Wait", "DefaultTime2Retain", "CHAP_A",
                            "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C", "SendTargets", "X-foo", "IFMarker",
                            "OFMarker", "DataPDUInOrder", "TargetAlias", "TargetPortalGroupTag"])
    values = st.one_of(st.sampled_from(["", "None", "CHAP", "Yes", "No", "0", "1", "-1", "4294967296",
                                        "512", "16777215", "16777216", "CRC32C,None", "Normal", "Discovery",
                                        "All", TNAME, INAME, "5", "0x00", "0b", "Reject", "NotUnderstood",
                                        "Irrelevant", "x" * 300]),
                       st.text(max_size=20), st.integers(-2, 1 << 33).map(str))
    entry = st.one_of(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}".encode()),
                      st.binary(max_size=20),
                      st.sampled_from([b"=x", b"noequals", b"K=\xff\xfe", b"\xc3=1", b"A" * 70 + b"=1"]))
    return st.lists(entry, max_size=12).map(lambda es: b"\0".join(es) + b"\0")


def run_decode(buf: bytes) -> None:
    """The codec: only PDUError may come out."""
    try:
        bhs = P.parse_bhs(buf)
        ahs = buf[P.BHS_LEN:P.BHS_LEN + bhs.ahs_length]
        pdu = P.decode_pdu(buf[:P.BHS_LEN], ahs)
        data = buf[P.BHS_LEN + bhs.ahs_length:P.BHS_LEN + bhs.ahs_length + bhs.data_length]
        if isinstance(pdu, (P.LoginRequest, P.TextRequest)):
            P.decode_text(data)
        if isinstance(pdu, (P.ScsiResponse, P.AsyncMessage)):
            P.decode_sense_segment(data)
        P.decode_pdu(pdu.encode()[:P.BHS_LEN], pdu.encode()[P.BHS_LEN:]) if hasattr(pdu, "encode") else None
    except P.PDUError:
        pass


def run_text(buf: bytes) -> None:
    try:
        pairs = P.decode_text(buf)
    except P.PDUError:
        return
    assert P.decode_text(P.encode_text(pairs)) == pairs


# ---------------------------------------------------------------- login machine

def login_config() -> L.LoginConfig:
    creds = Credentials("user", Secret("a-secret-of-16by"))
    return L.LoginConfig((L.TargetConfig(TNAME), L.TargetConfig(TNAME + "x", chap=creds,
                                                                 mutual_chap=Credentials("t", Secret("target-secret-16")))),
                         discovery_chap=None)


def split_pdus(stream: list[bytes]) -> list[tuple[Any, bytes]]:
    out = []
    for buf in stream:
        try:
            bhs = P.parse_bhs(buf)
            pdu = P.decode_pdu(buf[:P.BHS_LEN], buf[P.BHS_LEN:P.BHS_LEN + bhs.ahs_length])
        except P.PDUError:
            continue
        start = P.BHS_LEN + bhs.ahs_length
        out.append((pdu, buf[start:start + bhs.data_length]))
    return out


def run_login(stream: list[bytes]) -> None:
    """A LoginMachine fed decoded Login Requests: it answers Send/Decide/Fail, never raises."""
    m = L.LoginMachine(login_config(), 1234, random=lambda n: bytes(n))
    for pdu, data in split_pdus(stream):
        if not isinstance(pdu, P.LoginRequest):
            continue
        step = m.receive(pdu, data)
        assert isinstance(step, (L.Send, L.Decide, L.Fail)), step
        if isinstance(step, L.Decide):
            step = m.accept(1)
            assert isinstance(step, L.Complete)
        P.parse_bhs(step.header)
        if isinstance(step, L.Fail):
            return


def login_stream() -> st.SearchStrategy[list[bytes]]:
    """Plausible login conversations (real first request) followed by mutated ones."""
    first = st.sampled_from([
        [("InitiatorName", INAME), ("SessionType", "Normal"), ("TargetName", TNAME), ("AuthMethod", "None")],
        [("InitiatorName", INAME), ("SessionType", "Discovery"), ("AuthMethod", "None,CHAP")],
        [("InitiatorName", INAME), ("TargetName", TNAME + "x"), ("AuthMethod", "CHAP")],
    ])

    def build(pairs, extra, csg, nsg, t):
        d = P.encode_text(pairs) + extra
        return P.LoginRequest(1, b"\x80" + bytes(5), 0, 0, 1, 0, csg=csg, nsg=nsg, transit=t,
                              data_length=len(d)).encode() + d + bytes(-len(d) % 4)

    head = st.builds(build, first, st.one_of(st.just(b""), text_segments()), st.integers(0, 1),
                     st.sampled_from([1, 3]), st.booleans())
    return st.tuples(head, st.lists(st.one_of(mutated_pdu(), valid_pdus()), max_size=6)).map(
        lambda t: [t[0], *t[1]])


# ---------------------------------------------------------------- full feature connection

class FakeLink:
    """Records every call; FrontEndLink's attributes the server reads per
    response are plain values (nothing lent, not timed)."""

    timing = False
    delivering = False   # (no carrier delivers for it: responses are flushed by their writers)

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.lent: dict[int, Any] = {}

    def __getattr__(self, name: str) -> Any:
        def call(*a: Any, **kw: Any) -> None:
            self.calls.append((name, a, kw))
        return call


def make_connection(discovery: bool = False, erl: int = 0) -> tuple[Connection, list, FakeLink]:
    out: list = []
    link = FakeLink()
    sp = SessionParams(immediate_data=True, initial_r2t=False, first_burst_length=4096,
                       max_burst_length=8192, error_recovery_level=erl)
    session = Session(1, b"\x80" + bytes(5), INAME, TNAME, 1, sp, 1, 1, 16, discovery=discovery)
    conn = Connection(session, 0, ConnectionParams(), 0, lambda p, d: out.append((p, bytes(d))), link,
                      Tags(), lambda: None, lambda c, pairs: [(k, "NotUnderstood") for k, _ in pairs])
    session.connections[0] = conn
    return conn, out, link


def run_connection(stream: list[bytes], discovery: bool = False, erl: int = 0) -> None:
    """session.Connection fed any decodable PDU: PDUError (answered by Reject) is the only
    exception; every PDU it emits encodes; the queue of out-of-order commands stays within
    the window; at ERL >= 1 what is kept stays counted in the budget."""
    conn, out, link = make_connection(discovery, erl)
    for pdu, data in split_pdus(stream):
        try:
            conn.receive(pdu, data)
        except P.PDUError:
            pass
        # answer whatever the STML was asked, as a real STML might
        for name, a, kw in link.calls:
            if name == "rx_cmnd":
                task = conn.tags.tasks.get(a[0])
                if task is not None and task.write and a[6] < a[7] + 1 and len(conn.session.itts) % 2:
                    conn.rdy_to_xfer(task, 0, min(task.edtl, 1 << 16))
                elif task is not None and len(conn.session.itts) % 3 == 0:
                    conn.tags.tasks.pop(a[0], None)
                    conn.xmit_response(task, 0, None, 0, memoryview(bytes(min(task.edtl, 9000))))
            elif name == "rx_task_mgmt_fn":
                entry = conn.tags.tmfs.pop(a[0], None)
                if entry:
                    entry[0].task_mgmt_fn_done(entry[1], entry[2], 0, [])
        link.calls.clear()
        assert len(conn.session.queued) <= conn.session.window
        kept = sum(t.kept for t in conn.session.kept.values()) + conn.other_bytes
        assert conn.account.kinds[KEEP] == kept
    if discovery:
        assert not any(p.__class__ is P.R2T or p.__class__ is P.DataIn for p, _ in out)
    for p, d in out:
        P.parse_bhs(p.encode())


def conn_stream() -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.one_of(valid_pdus(), mutated_pdu()), min_size=1, max_size=12)


# ---------------------------------------------------------------- CDBs

CDB_LEN = {0: 6, 1: 10, 2: 10, 3: 16, 4: 16, 5: 12, 6: 0, 7: 0}
DATA_OUT_OPS = {0x04, 0x07, 0x0A, 0x15, 0x1D, 0x2A, 0x2E, 0x3B, 0x41, 0x42, 0x55, 0x83, 0x89, 0x8A, 0x8E,
                0x93, 0x9F, 0xA4, 0xAA, 0xAE, 0x5F, 0x3F, 0xA3, 0x8C, 0x8D, 0x9D, 0xB6, 0x39, 0x3D, 0x3A,
                0x7F, 0x4C, 0x5C, 0x48}


@st.composite
def random_cdb(draw: Any) -> tuple[bytes, bytes, int]:
    """(CDB, parameter list, data-in length): any opcode, random fields, small transfer lengths
    most of the time so the LUN is not asked to move gigabytes."""
    op = draw(st.integers(0, 255))
    n = CDB_LEN[op >> 5] or draw(st.sampled_from([6, 10, 12, 16, 32]))
    body = bytearray(draw(st.binary(min_size=n - 1, max_size=n - 1)))
    if draw(st.booleans()) and n >= 10:   # keep LBA and length small and plausible
        if n == 10:
            body[1:5] = draw(st.integers(0, 200)).to_bytes(4, "big")
            body[6:8] = draw(st.integers(0, 16)).to_bytes(2, "big")
        elif n == 16:
            body[1:9] = draw(st.integers(0, 200)).to_bytes(8, "big")
            body[9:13] = draw(st.integers(0, 16)).to_bytes(4, "big")
    cdb = bytes([op]) + bytes(body)
    data_out = b""
    if op in DATA_OUT_OPS or draw(st.integers(0, 9)) == 0:
        data_out = draw(st.one_of(st.binary(max_size=600), st.binary(min_size=512, max_size=512),
                                  st.integers(1, 16).map(lambda k: bytes(512 * k))))
    data_in = 0 if data_out else draw(st.sampled_from([0, 36, 255, 512, 4096, 65536]))
    return cdb, data_out, data_in


# ---------------------------------------------------------------- ZeroMQ messages

def zmq_messages() -> st.SearchStrategy[list[bytes]]:
    """Malformed contract messages: msgpack of the wrong shape, wrong types, unknown ops,
    wrong versions, raw junk, extra frames."""
    import msgpack
    ops = st.sampled_from(["register_target_front_end", "deregister_target_front_end", "rx_cmnd",
                           "scsi_rx_data", "rx_task_mgmt_fn", "scsi_release", "register_nexus",
                           "scsi_target_done", "heartbeat", "detect", "nonsense", "", "xmit_response"])
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(),
                     st.text(max_size=10), st.binary(max_size=20))
    values = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.text(max_size=5), c, max_size=4)),
                          max_leaves=8)
    fields = st.sampled_from(["op", "version", "kind", "name", "heartbeat_ms", "tag", "nexus", "lun", "cdb",
                              "attr", "dir", "len", "unsol", "offset", "fn", "ref", "initiator", "target",
                              "tpg", "error", "aen", "v"])
    header = st.builds(lambda op, extra: {"op": op, **extra}, st.one_of(ops, leaf),
                       st.dictionaries(fields, values, max_size=8))
    packed = header.map(lambda h: msgpack.packb(h, use_bin_type=True))
    frame0 = st.one_of(packed, packed, st.binary(max_size=40),
                       values.map(lambda v: msgpack.packb(v, use_bin_type=True)))
    return st.tuples(frame0, st.lists(st.binary(max_size=64), max_size=3)).map(lambda t: [t[0], *t[1]])


# ---------------------------------------------------------------- runners against an STML

STATUSES = {0x00, 0x02, 0x04, 0x08, 0x18, 0x22, 0x28, 0x30, 0x40}


def run_cdb(client: Any, case: tuple[bytes, bytes, int], lun: int) -> None:
    """One random command through the loopback front end: it gets a SCSI status in time."""
    cdb, data_out, data_in = case
    result = client.submit(lun, cdb, data_out, data_in).result(20)
    assert result.status in STATUSES, (cdb.hex(), result)
    if result.status == 0x02:
        assert result.sense and len(result.sense) >= 8, (cdb.hex(), result)
    assert len(result.data) <= data_in, (cdb.hex(), len(result.data), data_in)


class ZmqPoker:
    """A DEALER socket that throws frames at the STML and drains whatever comes back."""

    def __init__(self, endpoint: str) -> None:
        import uuid

        import zmq
        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, f"fuzz-{uuid.uuid4().hex[:8]}".encode())
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def drain(self) -> int:
        n = 0
        while self.sock.poll(0):
            self.sock.recv_multipart()
            n += 1
        return n

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def run_zmq(poker: ZmqPoker, frames: list[bytes]) -> None:
    poker.send(frames)
    poker.drain()


# ---------------------------------------------------------------- live target helpers

def host_port(portal: str) -> tuple[str, int]:
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


def raw_exchange(portal: str, prefix: Any, payload: list[bytes], timeout: float = 5.0) -> None:
    """Open a connection, optionally log in (prefix(initiator) does it), throw `payload` at it,
    half-close and read until the target closes; the target must close or answer, not hang."""
    import socket

    from support.rawiscsi import RawInitiator
    ini = RawInitiator(*host_port(portal), timeout=timeout)
    try:
        if prefix is not None:
            prefix(ini)
        try:
            for buf in payload:
                ini.sock.sendall(buf)
            ini.sock.shutdown(socket.SHUT_WR)
            while ini.sock.recv(65536):
                pass
        except OSError as e:   # reset or already closed by the target: fine; a timeout is not
            assert not isinstance(e, TimeoutError), "the target neither answered nor closed"

    finally:
        ini.close()


def healthy_io(portal: str, iqn: str = TNAME, lun: int = 0, lba: int | None = None) -> None:
    """A separate, well-behaved session still reads and writes correctly
    (8 blocks at `lba`, else at a random LBA under 8000: a test that checks
    blocks of its own there passes an LBA away from them)."""
    import os

    from support.rawiscsi import RawInitiator
    ini = RawInitiator(*host_port(portal))
    try:
        resp = ini.login(iqn)
        assert resp.status_class == 0, resp
        ini.command(bytes(6))   # TEST UNIT READY clears any unit attention
        data = os.urandom(4096)
        if lba is None:
            lba = int.from_bytes(os.urandom(2), "big") % 8000
        ini.write16(lba, data, lun)
        assert ini.read16(lba, 8, lun) == data
        ini.write16(lba, data[::-1], lun, immediate_data=False)
        assert ini.read16(lba, 8, lun) == data[::-1]
    finally:
        ini.close()


# ---------------------------------------------------------------- resource abuse

# what an abusive request may legitimately cost: the STML's maximum transfer (VPD B0)
ABUSE_MAX_TRANSFER = 8 << 20
ABUSE_DATA_CAP = 1 << 20   # what the fuzz client itself sends or accepts per command


def _iscsi_transport_id(name: bytes) -> bytes:
    """An iSCSI TransportID (format 0): protocol 5, the name NUL-terminated and padded."""
    raw = name + b"\0" + bytes(-(len(name) + 1) % 4)
    return bytes([0x05, 0]) + len(raw).to_bytes(2, "big") + raw


@st.composite
def abusive_cdb(draw: Any, blocks: int) -> tuple[str, bytes, bytes, int, int]:
    """(kind, CDB, parameter list, data-in length, bytes the request may
    legitimately move): legal commands with the largest lengths, counts and
    ranges their fields allow - up to the whole LUN of `blocks` 512-byte
    blocks - the requests that once cost work proportional to a LUN or to a
    field rather than to what they ask for."""
    lba = draw(st.one_of(st.just(0), st.just(0), st.integers(0, blocks - 1), st.just(blocks - 1),
                         st.integers(0, (1 << 64) - 1)))
    # the rest of the LUN (the largest legal range), the field's maximum, or anything
    big32 = st.one_of(st.just(max(0, min(blocks - lba, 0xFFFFFFFF))), st.just(max(0, min(blocks - lba, 0xFFFFFFFF))),
                      st.just(0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
    kind = draw(st.sampled_from([
        "verify", "get_lba_status", "unmap", "write_same", "xcopy", "pr_register_spec_i_pt",
        "pr_read_full_status", "report_luns", "read", "write", "sanitize", "sync_cache",
        "compare_and_write", "mode_sense", "inquiry_vpd", "report_opcodes", "copy_params",
        "prefetch", "read_defect", "orwrite", "write_atomic"]))
    data_out, data_in, legit = b"", 0, 0
    if kind == "verify":
        bytchk = draw(st.sampled_from([0, 1, 3]))
        n = draw(big32)
        cdb = struct.pack(">BBQIBB", 0x8F, bytchk << 1, lba, n, 0, 0)
        if bytchk:
            data_out = bytes(min(ABUSE_DATA_CAP, 512 if bytchk == 3 else n * 512))
        legit = min(n * 512, ABUSE_MAX_TRANSFER)
    elif kind == "get_lba_status":
        alloc = draw(big32)
        cdb = struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)
        data_in = legit = min(alloc, ABUSE_DATA_CAP)
    elif kind == "unmap":
        count = draw(st.integers(0, 4095))
        descs = b"".join(struct.pack(">QI4x", draw(st.integers(0, 1 << 23)), draw(big32))
                         for _ in range(min(count, 8))) * (count // 8 + 1)
        descs = descs[:16 * count]
        data_out = struct.pack(">HH4x", len(descs) + 6, len(descs)) + descs
        cdb = struct.pack(">BB4xBHB", 0x42, 0, 0, len(data_out), 0)
        legit = len(data_out)
    elif kind == "write_same":
        flags = draw(st.sampled_from([0x00, 0x08, 0x01, 0x09]))
        n = draw(st.one_of(st.just(0), big32))
        cdb = struct.pack(">BBQIBB", 0x93, flags, lba, n, 0, 0)
        data_out = b"" if flags & 0x01 else bytes([0xA5]) * 512
        legit = min(n * 512, ABUSE_MAX_TRANSFER) if n else ABUSE_MAX_TRANSFER
    elif kind == "xcopy":
        plen = draw(big32)
        body = draw(st.binary(min_size=16, max_size=4096))
        data_out = body[:min(plen, ABUSE_DATA_CAP)]
        cdb = struct.pack(">BB8xIBB", 0x83, 0, plen, 0, 0)
        legit = 64 << 20   # one segment may copy this much (RECEIVE COPY OPERATING PARAMETERS)
    elif kind == "pr_register_spec_i_pt":
        count = draw(st.integers(1, 3000))
        name_len = draw(st.sampled_from([20, 223, 224, 4000]))
        tids = b"".join(_iscsi_transport_id(b"iqn.2026-11.org.abuse:" + str(i).encode().rjust(name_len, b"x"))
                        for i in range(count))[:ABUSE_DATA_CAP]
        data_out = struct.pack(">QQ4xBxHI", 0, draw(st.integers(1, 1 << 63)), 0x08, 0, len(tids)) + tids
        cdb = struct.pack(">BBBxxIB", 0x5F, 0x00, 0, len(data_out), 0)
        legit = len(data_out)
    elif kind == "pr_read_full_status":
        alloc = draw(st.integers(0, 0xFFFF))
        cdb = struct.pack(">BB5xHB", 0x5E, 0x03, alloc, 0)
        data_in = legit = alloc
    elif kind == "report_luns":
        alloc = draw(big32)
        cdb = struct.pack(">BxB3xIxB", 0xA0, 0, alloc, 0)
        data_in = legit = min(alloc, ABUSE_DATA_CAP)
    elif kind in ("read", "write", "orwrite"):
        n = draw(big32)
        op = {"read": 0x88, "write": 0x8A, "orwrite": 0x8B}[kind]
        cdb = struct.pack(">BBQIBB", op, 0, lba, n, 0, 0)
        if kind == "read":
            data_in = min(n * 512, ABUSE_DATA_CAP)
        else:
            data_out = bytes(min(n * 512, ABUSE_DATA_CAP))
        legit = min(n * 512, ABUSE_MAX_TRANSFER)
    elif kind == "sanitize":
        immed = draw(st.sampled_from([0x80, 0x00]))
        sa = draw(st.sampled_from([0x01, 0x02, 0x03]))
        data_out = struct.pack(">BxH", 0x01, 4) + b"\xde\xad\xbe\xef" if sa == 0x01 else b""
        cdb = struct.pack(">BB5xHB", 0x48, immed | sa, len(data_out), 0)
        legit = -1   # SANITIZE is the one command whose work is the whole medium by definition
    elif kind == "sync_cache":
        cdb = struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0)
        legit = ABUSE_MAX_TRANSFER
    elif kind == "compare_and_write":
        n = draw(st.integers(0, 255))
        cdb = struct.pack(">BBQ3xBBB", 0x89, 0, lba, n, 0, 0)
        data_out = bytes(2 * n * 512)
        legit = len(data_out)
    elif kind == "mode_sense":
        alloc = draw(st.integers(0, 0xFFFF))
        cdb = struct.pack(">BBBB3xHB", 0x5A, 0, 0x3F, 0xFF, alloc, 0)
        data_in = legit = alloc
    elif kind == "inquiry_vpd":
        alloc = draw(st.integers(0, 0xFFFF))
        cdb = struct.pack(">BBBHB", 0x12, 1, draw(st.sampled_from([0x00, 0x80, 0x83, 0xB0, 0xB2])), alloc, 0)
        data_in = legit = alloc
    elif kind == "report_opcodes":
        alloc = draw(big32)
        cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x80, 0, 0, alloc, 0, 0)
        data_in = legit = min(alloc, ABUSE_DATA_CAP)
    elif kind == "copy_params":
        alloc = draw(big32)
        cdb = struct.pack(">BB8xIBB", 0x84, 0x03, alloc, 0, 0)
        data_in = legit = min(alloc, ABUSE_DATA_CAP)
    elif kind == "prefetch":
        n = draw(big32)
        cdb = struct.pack(">BBQIBB", 0x90, 0, lba, n, 0, 0)
        legit = ABUSE_MAX_TRANSFER
    elif kind == "read_defect":
        alloc = draw(big32)
        cdb = struct.pack(">BBxxxxIBB", 0xB7, 0x1F, alloc, 0, 0)
        data_in = legit = min(alloc, ABUSE_DATA_CAP)
    else:  # write_atomic
        n = draw(st.integers(0, 0xFFFF))
        cdb = struct.pack(">BBQHHBB", 0x9C, 0, lba, 0, n, 0, 0)
        data_out = bytes(min(n * 512, ABUSE_DATA_CAP))
        legit = min(n * 512, ABUSE_MAX_TRANSFER)
    return kind, cdb, data_out, data_in, legit


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


def run_abuse(client: Any, case: tuple[str, bytes, bytes, int, int], lun: int, pid: int,
              rss_limit: int) -> None:
    """One abusive command: a SCSI status in time, and the STML's memory stays
    under a limit that does not grow with the fields of the request."""
    kind, cdb, data_out, data_in, _ = case
    result = client.submit(lun, cdb, data_out, data_in).result(60)
    assert result.status in STATUSES, (kind, cdb.hex(), result)
    assert len(result.data) <= data_in, (kind, cdb.hex(), len(result.data), data_in)
    used = rss(pid)
    assert used <= rss_limit, (kind, cdb.hex(), used, rss_limit)
