"""Hostile requests through a real fetd_tcp and STML (issue 18): each gets a
bounded outcome (a capped answer, the right status, memory that does not grow
past the front end's budget as it reports it in `scsi-target status`), and
another initiator's reads and writes go on meanwhile."""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from typing import Iterator


from fetd_tcp import login as L
from fetd_tcp import pdu as P
from fetd_tcp.budget import RESERVE
from fetd_tcp.session import MAX_TEXT_REQUEST, OOO_LIMIT
from support import fuzzgen as G
from support.cli import status
from support.procs import children_by_module, free_port, peak_rss
from support.rawfe import RawFrontEnd
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

MIB = 1 << 20
READ_LIMIT = 4 * MIB          # SCSI_TARGET_MAX_READ_BUFFER
BUDGET = 12 * MIB             # SCSI_TARGET_MAX_BUFFERED
GOOD, TASK_SET_FULL = 0, 0x28


@contextlib.contextmanager
def bounded_target(**env: str) -> Iterator[Target]:
    """A target of its own (the budget's peak is per process), with small bounds."""
    env = {"SCSI_TARGET_MAX_READ_BUFFER": str(READ_LIMIT), "SCSI_TARGET_MAX_BUFFERED": str(BUDGET), **env}
    t = Target("--lun", "ram:64MiB", portals=(f"127.0.0.1:{free_port()}",), env=env)
    try:
        yield t
    finally:
        t.stop()


def buffers(t: Target, until=lambda b: True, timeout: float = 30.0) -> dict:
    """fetd_tcp's buffer report (it comes with its heartbeats), once `until` holds."""
    deadline = time.monotonic() + timeout
    while True:
        fe = next(f for f in status(t.data_dir)["front_ends"] if f["kind"] == "iscsi")
        b = fe.get("buffers") or {}
        if b and until(b):
            return b
        assert time.monotonic() < deadline, f"no such buffer report: {fe}"
        time.sleep(0.3)


def idle_stml(t: Target) -> None:
    """Wait until the STML has answered every command it was given."""
    deadline = time.monotonic() + 30
    while status(t.data_dir)["luns"][0]["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def read16(ini: RawInitiator, lba: int, blocks: int) -> None:
    """Send a READ(16) and do not wait for it."""
    cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0).ljust(16, b"\0")
    ini.send(P.ScsiCommand(ini._next_itt(), P.LUN0, cdb, blocks * 512, ini.cmd_sn, ini.exp_stat_sn,
                           read=True))
    ini.cmd_sn += 1


def statuses(ini: RawInitiator, n: int) -> dict[int, int]:
    """ITT -> SCSI status of the next `n` answers (pings answered meanwhile)."""
    got: dict[int, int] = {}
    while len(got) < n:
        pdu, _ = ini.recv()
        if isinstance(pdu, P.DataIn) and pdu.status is not None or isinstance(pdu, P.ScsiResponse):
            got[pdu.itt] = pdu.status
        elif isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG and pdu.ttt != P.RESERVED_TAG:
            ini.send(P.NopOut(P.RESERVED_TAG, pdu.ttt, ini.cmd_sn, ini.exp_stat_sn, immediate=True))
    return got


def hostile_reader(t: Target, name: str) -> RawInitiator:
    ini = RawInitiator(*G.host_port(t.portal), initiator=f"iqn.2026-11.org.test:{name}", rcvbuf=4096)
    assert ini.login(IQN).status_class == 0
    ini.command(bytes(6))
    return ini


# ---------------------------------------------------------------- read data

def test_a_non_reading_initiator_cannot_pin_read_data():
    """48 reads of 1 MiB from an initiator that does not read its socket: fetd_tcp
    holds at most its read bound for it (the rest get TASK SET FULL), while another
    initiator reads and writes."""
    with bounded_target() as t:
        fetd = children_by_module(t.proc.pid)["fetd_tcp"]
        base = peak_rss(fetd)
        ini = hostile_reader(t, "non-reader")
        n = 48
        for i in range(n):
            read16(ini, i * 2048, 2048)
        G.healthy_io(t.portal)                       # another initiator, meanwhile
        idle_stml(t)
        b = buffers(t, lambda b: b["peak"] > READ_LIMIT // 2)
        grown = peak_rss(fetd) - base
        assert b["peak"] <= READ_LIMIT + 256 * 1024, b
        got = statuses(ini, n)
        full = sum(1 for s in got.values() if s == TASK_SET_FULL)
        print(f"peak {b['peak']}, RSS grew {grown >> 20} MiB, {n - full} read(s) ran, {full} TASK SET FULL")
        assert set(got.values()) <= {GOOD, TASK_SET_FULL} and full >= n // 2
        assert grown < 24 * MIB, f"fetd_tcp grew {grown >> 20} MiB"
        ini.command(bytes(6))                        # the session goes on
        ini.close()
        assert buffers(t, lambda b: b["used"] == 0)["connections"] == 0


def test_the_budget_bounds_all_connections_together_and_each_keeps_a_share():
    """Four non-reading initiators, each within its own bound, would pass the budget
    together; they do not, and a fifth initiator's I/O fits in its guaranteed share."""
    with bounded_target() as t:
        hostile = [hostile_reader(t, f"non-reader{i}") for i in range(4)]
        n = 16
        for ini in hostile:
            for i in range(n):
                read16(ini, i * 2048, 2048)
        G.healthy_io(t.portal)
        idle_stml(t)
        b = buffers(t, lambda b: b["peak"] > BUDGET // 2)
        assert b["peak"] <= BUDGET and b["limit"] == BUDGET, b
        results = [statuses(ini, n) for ini in hostile]
        assert sum(1 for got in results for s in got.values() if s == TASK_SET_FULL) >= 1
        for ini in hostile:
            ini.close()
        assert buffers(t, lambda b: b["used"] == 0)["connections"] == 0


def test_one_initiators_slow_readers_leave_another_initiator_room():
    """Review finding 5: one initiator with four connections that never read (each
    within its read bound, together past the budget) held the whole budget, so no
    one could log in and reads past a connection's guaranteed share got TASK SET
    FULL forever. It now gets at most half of what the budget leaves beyond the
    shares kept for logins; a second initiator logs in and moves 2 MiB at a time."""
    with bounded_target() as t:
        hog = [hostile_reader(t, "hog") for _ in range(4)]       # one initiator, four sessions
        waves, per = 4, 8
        for _ in range(waves):   # in waves: once the kernel's socket buffers are full, all stays here
            for ini in hog:
                for i in range(per):
                    read16(ini, i * 2048, 2048)                  # 1 MiB each, never read
            idle_stml(t)
        n = waves * per
        shares = BUDGET // (4 * RESERVE)
        room = BUDGET - shares * RESERVE
        held = buffers(t)
        second = RawInitiator(*G.host_port(t.portal), initiator="iqn.2026-11.org.test:second")
        assert second.login(IQN).status_class == 0
        second.command(bytes(6))
        data = os.urandom(2 * MIB)
        second.write16(4096, data, immediate_data=False)         # 2 MiB by R2T: past its share
        for _ in range(4):
            assert second.read16(4096, 4096) == data             # 2 MiB reads: 16 shares each
        second.close()
        results = [statuses(ini, n) for ini in hog]
        got = [s for r in results for s in r.values()]
        full = got.count(TASK_SET_FULL)
        print(f"hog held {held['used']} of {BUDGET}; {len(got) - full} read(s) ran, {full} TASK SET FULL")
        assert set(got) <= {GOOD, TASK_SET_FULL} and full >= n      # the hog was pushed back
        assert held["used"] <= 4 * RESERVE + room // 2 + 64 * 1024, held
        assert buffers(t)["peak"] <= BUDGET
        for ini in hog:
            ini.close()
        assert buffers(t, lambda b: b["used"] == 0)["connections"] == 0


# ---------------------------------------------------------------- out-of-order PDUs

def test_pdus_ahead_of_their_cmdsn_are_capped():
    """Writes with 64 KiB of immediate data, all after a gap in CmdSN: at most
    OOO_LIMIT of their data waits; once the gap fills, those run and the others get
    TASK SET FULL (their data never lands)."""
    with bounded_target() as t:
        ini = RawInitiator(*G.host_port(t.portal), initiator="iqn.2026-11.org.test:gap")
        assert ini.login(IQN, extra=[("ImmediateData", "Yes"), ("FirstBurstLength", "65536"),
                                     ("MaxBurstLength", "262144")]).status_class == 0
        ini.command(bytes(6))
        chunk = 65536
        n = OOO_LIMIT // chunk + 16
        gap = ini.cmd_sn
        itts = []
        for i in range(n):
            cdb = struct.pack(">BBQIBB", 0x8A, 0, i * 128, 128, 0, 0).ljust(16, b"\0")
            itt = ini._next_itt()
            itts.append(itt)
            ini.send(P.ScsiCommand(itt, P.LUN0, cdb, chunk, gap + 1 + i, ini.exp_stat_sn, write=True,
                                   data_length=chunk), bytes([i + 1]) * chunk)
        b = buffers(t, lambda b: b["ooo"] > 0)
        assert b["ooo"] <= OOO_LIMIT, b
        G.healthy_io(t.portal, lba=n * 128)          # another initiator, past the writes' blocks
        tur = ini._next_itt()                        # fills the gap
        ini.send(P.ScsiCommand(tur, P.LUN0, bytes(16), 0, gap, ini.exp_stat_sn))
        ini.cmd_sn = gap + 1 + n
        got = statuses(ini, n + 1)
        assert got.pop(tur) == GOOD
        kept = OOO_LIMIT // chunk
        assert [got[itt] for itt in itts] == [GOOD] * kept + [TASK_SET_FULL] * (n - kept)
        for i in (0, kept - 1, kept, n - 1):
            assert ini.read16(i * 128, 128) == (bytes([i + 1]) * chunk if i < kept else bytes(chunk))
        assert buffers(t, lambda b: b["ooo"] == 0)["peak"] <= BUDGET
        ini.close()


# ---------------------------------------------------------------- Text

def _discovery(t: Target) -> RawInitiator:
    ini = RawInitiator(*G.host_port(t.portal), initiator="iqn.2026-11.org.test:disco")
    assert ini.login(None, session_type="Discovery").status_class == 0
    return ini


def test_sendtargets_given_many_times_in_one_request_is_refused():
    with bounded_target() as t:
        ini = _discovery(t)
        # 4000 copies in 64,000 bytes: refused as a protocol error; 16,000 in one 256 KiB
        # PDU: over the bound on a Text request
        for copies, reason in ((4000, P.REJECT_PROTOCOL_ERROR), (16000, P.REJECT_OUT_OF_RESOURCES)):
            data = b"SendTargets=All\0" * copies
            ini.send(P.TextRequest(ini._next_itt(), P.RESERVED_TAG, ini.cmd_sn, ini.exp_stat_sn,
                                   immediate=True, data_length=len(data)), data)
            pdu, seg = ini.recv()
            assert isinstance(pdu, P.Reject) and pdu.reason == reason
            assert len(seg) == P.BHS_LEN                 # the whole answer: 96 bytes
        assert ini.text([("SendTargets", "All")])[0] == ("TargetName", IQN)
        G.healthy_io(t.portal)
        ini.close()


def test_a_continued_text_request_has_a_bound():
    with bounded_target() as t:
        ini = _discovery(t)
        part = b"X" * 8192
        ttt = P.RESERVED_TAG
        for _ in range(MAX_TEXT_REQUEST // len(part)):
            ini.send(P.TextRequest(ini._next_itt() if ttt == P.RESERVED_TAG else ini.itt, ttt, ini.cmd_sn,
                                   ini.exp_stat_sn, final=False, cont=True, immediate=True,
                                   data_length=len(part)), part)
            pdu, seg = ini.recv()
            assert isinstance(pdu, P.TextResponse) and not pdu.final and seg == b""
            ttt = pdu.ttt
        ini.send(P.TextRequest(ini.itt, ttt, ini.cmd_sn, ini.exp_stat_sn, final=False, cont=True,
                               immediate=True, data_length=len(part)), part)
        pdu, _ = ini.recv()
        assert isinstance(pdu, P.Reject) and pdu.reason == P.REJECT_OUT_OF_RESOURCES
        assert ini.text([("SendTargets", "All")])[0] == ("TargetName", IQN)
        assert buffers(t, lambda b: b["text"] == 0)["peak"] <= MAX_TEXT_REQUEST + RESERVE
        ini.close()


# ---------------------------------------------------------------- names

def test_an_initiator_name_over_223_bytes_is_refused_at_login():
    with bounded_target() as t:
        base = "iqn.2026-11.org.test:"
        long = RawInitiator(*G.host_port(t.portal), initiator=base + "x" * (224 - len(base)))
        r = long.login(IQN)
        assert (r.status_class << 8 | r.status_detail) == L.INITIATOR_ERROR
        long.close()
        ok = RawInitiator(*G.host_port(t.portal), initiator=base + "x" * (223 - len(base)))
        assert ok.login(IQN).status_class == 0
        ok.command(bytes(6))
        ok.close()
        assert "x" * 224 not in t.log()
        G.healthy_io(t.portal)


def test_the_stml_refuses_a_nexus_with_a_name_over_223_bytes(stml):
    fe = RawFrontEnd(stml.endpoint)
    try:
        fe.register()
        long = "iqn.2026-01.test:" + "x" * 300
        assert "223" in fe.nexus(nexus=1, initiator=long + ",i,0x1")["error"]
        assert "223" in fe.nexus(nexus=2, target=long)["error"]
        assert "x" * 300 not in stml.log()
        assert "error" not in fe.nexus(nexus=3, initiator="iqn.2026-01.test:" + "y" * 206 + ",i,0x" + "0" * 12)
    finally:
        fe.close()


# ---------------------------------------------------------------- logs

def test_repeated_failures_log_a_bounded_number_of_lines():
    """Refused connections and bad Data-Outs log through constant templates, so the
    rate limit holds them to a burst; no tracebacks."""
    with bounded_target(SCSI_TARGET_MAX_CONN_PER_HOST="2") as t:
        host, port = G.host_port(t.portal)
        held = [socket.create_connection((host, port)) for _ in range(2)]
        time.sleep(0.3)
        for _ in range(60):
            s = socket.create_connection((host, port))
            s.settimeout(5)
            try:
                s.recv(1)
            except OSError:
                pass
            s.close()
        for s in held:
            s.close()
        time.sleep(0.3)
        ini = RawInitiator(host, port, initiator="iqn.2026-11.org.test:bad-data-out")
        assert ini.login(IQN).status_class == 0
        ini.command(bytes(6))
        for _ in range(60):
            itt = ini._next_itt()
            cdb = struct.pack(">BBQIBB", 0x8A, 0, 0, 8, 0, 0).ljust(16, b"\0")
            ini.send(P.ScsiCommand(itt, P.LUN0, cdb, 4096, ini.cmd_sn, ini.exp_stat_sn, write=True))
            ini.cmd_sn += 1
            while True:
                pdu, _ = ini.recv()
                if isinstance(pdu, P.R2T):
                    break
            ini.send(P.DataOut(itt, pdu.ttt, 0, 512, True, ini.exp_stat_sn, P.LUN0, 4096), bytes(4096))
            while not isinstance(pdu, P.ScsiResponse):
                pdu, _ = ini.recv()
            assert pdu.status == 0x02
        ini.close()
        time.sleep(0.5)
        log = t.log()
        refused = log.count("refused: too many connections")
        bad = log.count("could not deliver data")
        assert 1 <= refused <= 10 and 1 <= bad <= 10, (refused, bad)
        assert "Traceback" not in log


def test_audit_lines_are_not_lost_to_the_rate_limit():
    """Logins, logouts and session ends are audit lines: every one of 15 sessions of
    one initiator is logged (as ordinary lines, the template's burst would keep 10)."""
    with bounded_target() as t:
        host, port = G.host_port(t.portal)
        who = "iqn.2026-11.org.test:audited"
        n = 15
        for _ in range(n):
            ini = RawInitiator(host, port, initiator=who)
            assert ini.login(IQN).status_class == 0
            assert ini.logout().response == 0
            ini.close()
        kinds = ("login: ", "logout: ", "session ended: ")
        deadline = time.monotonic() + 30
        while True:      # fetd_tcp's lines reach the log through the supervisor
            log = t.log()
            counts = [log.count(kind + who) for kind in kinds]
            if counts == [n] * 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert counts == [n] * 3, counts
        assert "suppressed" not in log


# ---------------------------------------------------------------- iSNS ESI port

def test_esi_connections_are_few_and_short():
    """Anyone who reaches a registered portal's address may connect to its ESI
    port: beyond ESI_MAX_CONNECTIONS a connection is closed at once, and a
    silent one is closed after esi_idle."""
    import asyncio

    from fetd_tcp import isns

    async def read(r: asyncio.StreamReader, n: int = -1) -> bytes:
        try:
            return await asyncio.wait_for(r.read(n), 10)
        except ConnectionResetError:
            return b""              # closed with our ESI unread

    async def main() -> None:
        client = isns.IsnsClient("127.0.0.1:9", "iqn.2026-11.org.test:entity", esi_idle=0.5)
        port = (await client.esi_follow({"127.0.0.1"}))["127.0.0.1"]
        try:
            conns = [await asyncio.open_connection("127.0.0.1", port)
                     for _ in range(isns.ESI_MAX_CONNECTIONS + 2)]
            esi = struct.pack(">HHHHHH", isns.VERSION, isns.ESI, 0, 0, 7, 0)
            for _, w in conns:
                w.write(esi)
            answers = [await read(r, 12) for r, _ in conns]
            assert [len(a) == 12 for a in answers].count(True) == isns.ESI_MAX_CONNECTIONS
            assert answers.count(b"") == 2
            for r, w in conns:          # the ones answered fall silent: closed after esi_idle
                await read(r)
                w.close()
            assert client._esi_open == 0
        finally:
            await client.esi_follow(set())

    asyncio.run(main())


# ---------------------------------------------------------------- STML link lost

def test_task_management_entries_go_when_the_stml_link_is_lost():
    """A TMF the STML never answers (its link is gone) must not keep its entry,
    and the connection it holds, for the life of the front end."""
    from fetd_tcp.server import IscsiFrontEnd
    fe = IscsiFrontEnd("ipc:///nonexistent/stml", [])
    conn, out, link = G.make_connection()
    closed: list = []
    conn.close = lambda: closed.append(conn)
    conn.tags = fe.tags
    fe.registry.sessions[conn.session.tsih] = conn.session
    conn.receive(P.TaskMgmtRequest(7, P.TMF_LOGICAL_UNIT_RESET, P.LUN0, P.RESERVED_TAG, 1, 0,
                                   immediate=True), b"")
    assert [c[0] for c in link.calls] == ["rx_task_mgmt_fn"] and len(fe.tags.tmfs) == 1
    fe.link_lost()
    assert fe.tags.tmfs == {} and closed == [conn]
