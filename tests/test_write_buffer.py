"""The per-connection bound on write data fetd_tcp holds for the STML
(SCSI_TARGET_MAX_WRITE_BUFFER, fetd_tcp/limits.py): with the STML stopped (SIGSTOP, so
nothing it is sent is consumed), one raw initiator floods write commands with immediate
data, ignoring MaxCmdSN; fetd_tcp's peak RSS stays bounded, and once the STML goes on the
session and others work."""
from __future__ import annotations

import os
import signal
import struct
import threading
import time

import pytest

from fetd_tcp import pdu as P
from fetd_tcp.registry import CMD_WINDOW
from support import fuzzgen as G
from support.procs import children_by_module, free_port, peak_rss
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

LIMIT = 4 << 20


@pytest.fixture
def target():
    t = Target("--lun", "ram:64MiB", portals=(f"127.0.0.1:{free_port()}",),
               env={"SCSI_TARGET_MAX_WRITE_BUFFER": str(LIMIT)})
    yield t
    stml = children_by_module(t.proc.pid).get("stml")
    if stml:
        os.kill(stml, signal.SIGCONT)
    t.stop()


# immediate data per command (FirstBurstLength): the RFC's default, and the most the target takes
@pytest.mark.parametrize("chunk", [65536, 262144])
def test_write_flood_against_a_stalled_stml_keeps_fetd_tcp_bounded(target, chunk):
    t = target
    kids = children_by_module(t.proc.pid)
    ini = RawInitiator(*G.host_port(t.portal), initiator="iqn.2026-11.org.test:flood")
    assert ini.login(IQN, extra=[("InitialR2T", "No"), ("ImmediateData", "Yes"),
                                 ("FirstBurstLength", str(chunk)),
                                 ("MaxRecvDataSegmentLength", "262144")]).status_class == 0
    assert ini.login_keys["FirstBurstLength"] == str(chunk)
    ini.command(bytes(6))
    G.healthy_io(t.portal)
    base = peak_rss(kids["fetd_tcp"])
    payload = os.urandom(chunk)
    sent = [0]
    stop = threading.Event()

    def flood() -> None:
        lba = 0
        try:
            while not stop.is_set():
                cdb = struct.pack(">BBQIBB", 0x8A, 0, lba % 100000, chunk // 512, 0, 0).ljust(16, b"\0")
                ini.send(P.ScsiCommand(ini._next_itt(), P.LUN0, cdb, chunk, ini.cmd_sn, ini.exp_stat_sn,
                                       write=True, data_length=chunk), payload)
                ini.cmd_sn = (ini.cmd_sn + 1) & 0xFFFFFFFF      # MaxCmdSN ignored on purpose
                lba += chunk // 512
                sent[0] += chunk
        except OSError:
            pass

    os.kill(kids["stml"], signal.SIGSTOP)
    try:
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        time.sleep(2.0)        # under the 3 s after which fetd_tcp gives the STML up
        stop.set()
        flooder.join(5)
        grown = peak_rss(kids["fetd_tcp"]) - base
    finally:
        os.kill(kids["stml"], signal.SIGCONT)
    print(f"flooded {sent[0] >> 20} MiB, fetd_tcp peak RSS grew {grown >> 20} MiB")
    assert sent[0] >= 32 * LIMIT, f"the flood was too slow to mean anything: {sent[0] >> 20} MiB"
    # the bound (fetd_tcp/limits.py): LIMIT, plus at most a CmdSN window of immediate data, plus slack
    assert grown < LIMIT + CMD_WINDOW * chunk + 2 * LIMIT, \
        f"fetd_tcp grew {grown >> 20} MiB for {sent[0] >> 20} MiB flooded"
    # the STML works through what it was given; the session and others go on
    answered = 0
    ini.sock.settimeout(3)
    try:
        while True:
            pdu, _ = ini.recv()
            if isinstance(pdu, P.ScsiResponse):
                assert pdu.status in (0, 0x28), pdu.status      # GOOD or TASK SET FULL
                answered += 1
            elif isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG:
                ini.send(P.NopOut(P.RESERVED_TAG, pdu.ttt, ini.cmd_sn, ini.exp_stat_sn, immediate=True))
    except TimeoutError:
        pass
    assert answered >= 1
    pdu, _ = ini.nop(b"ping")
    assert isinstance(pdu, P.NopIn)
    G.healthy_io(t.portal)
    ini.close()


# ---------------------------------------------------------------- the rules, sans-IO

def _conn(limit: int):
    conn, out, link = G.make_connection()
    conn.write_limit = limit
    return conn, out, link


def _write(conn, itt: int, sn: int, length: int, data: bytes = b"", immediate: bool = False) -> None:
    cdb = struct.pack(">BBQIBB", 0x8A, 0, 0, length // 512, 0, 0).ljust(16, b"\0")
    conn.receive(P.ScsiCommand(itt, P.LUN0, cdb, length, sn, 0, write=True, immediate=immediate,
                               data_length=len(data)), data)


def _r2ts(out: list) -> list[tuple[int, int, int]]:
    got = [(p.itt, p.buffer_offset, p.desired_length) for p, _ in out if isinstance(p, P.R2T)]
    out[:] = [(p, d) for p, d in out if not isinstance(p, P.R2T)]
    return got


def _data(conn, task, offset: int) -> None:
    ttt = next(iter(task.r2ts))
    conn.receive(P.DataOut(task.itt, ttt, task.r2ts[ttt][2], offset, True, 0, P.LUN0, 8192), bytes(8192))


def _answer(conn, task) -> None:
    conn.tags.tasks.pop(task.tag)
    conn.xmit_response(task, 0, None, 0, None)


def test_r2ts_wait_past_the_bound():
    conn, out, link = _conn(16384)                    # MaxBurstLength 8192, MaxOutstandingR2T 1
    for itt in (1, 2, 3):
        _write(conn, itt, itt, 16384)
    t = {t.itt: t for t in conn.tags.tasks.values()}
    for itt in (1, 2, 3):
        conn.rdy_to_xfer(t[itt], 0, 16384)
    assert _r2ts(out) == [(1, 0, 8192), (2, 0, 8192)]  # task 3 waits: 16 KiB solicited
    assert conn.write_held == 16384
    _data(conn, t[1], 0)
    assert _r2ts(out) == [(1, 8192, 8192)]             # past the bound: the oldest, nothing older held
    _data(conn, t[1], 8192)
    _data(conn, t[2], 0)
    assert _r2ts(out) == []                            # task 1 holds 16 KiB and will finish by itself
    _answer(conn, t[1])
    assert _r2ts(out) == [(2, 8192, 8192)]             # room again
    _data(conn, t[2], 8192)
    assert _r2ts(out) == []                            # task 2 holds 16 KiB
    _answer(conn, t[2])
    assert _r2ts(out) == [(3, 0, 8192)]
    _data(conn, t[3], 0)
    assert _r2ts(out) == [(3, 8192, 8192)]
    _data(conn, t[3], 8192)
    _answer(conn, t[3])
    assert conn.write_held == 0 and not conn.waiting


def test_the_oldest_task_is_never_starved_by_newer_ones():
    conn, out, link = _conn(8192)
    _write(conn, 1, 1, 16384)                          # solicited only
    _write(conn, 2, 2, 4096, bytes(4096))              # newer, all its data already in
    t = {t.itt: t for t in conn.tags.tasks.values()}
    conn.rdy_to_xfer(t[1], 0, 16384)                   # task 2 may be waiting for task 1 (ORDERED)
    assert _r2ts(out) == [(1, 0, 8192)]
    _data(conn, t[1], 0)
    assert _r2ts(out) == [(1, 8192, 8192)]
    _data(conn, t[1], 8192)
    _answer(conn, t[1])
    _answer(conn, t[2])
    assert conn.write_held == 0


def test_max_cmd_sn_stops_while_over_the_bound():
    conn, out, link = _conn(4096)
    s = conn.session
    _write(conn, 1, 1, 4096, bytes(4096))              # 4 KiB immediate data: at the bound
    mx = s.max_cmd_sn
    _write(conn, 2, 2, 512)                            # within the advertised window: runs
    assert s.max_cmd_sn == mx and s.exp_cmd_sn == 3
    for sn in range(3, mx + 1):
        _write(conn, 10 + sn, sn, 512)
    assert (s.exp_cmd_sn - 1) % (1 << 32) == mx        # the window is closed
    n = len(link.calls)
    _write(conn, 99, mx + 1, 512, bytes(512))          # beyond MaxCmdSN: discarded
    assert len(link.calls) == n and 99 not in s.itts
    _write(conn, 98, mx + 1, 512, bytes(512), immediate=True)
    resp = [p for p, _ in out if isinstance(p, P.ScsiResponse) and p.itt == 98]
    assert resp and resp[0].status == 0x28             # an immediate write: TASK SET FULL
    task = next(t for t in conn.tags.tasks.values() if t.itt == 1)
    conn.tags.tasks.pop(task.tag)
    conn.xmit_response(task, 0, None, 0, None)         # answered: the window opens again,
    last = [p for p, _ in out if isinstance(p, P.ScsiResponse)][-1]   # by the commands answered
    assert last.itt == 1 and last.max_cmd_sn == (s.exp_cmd_sn + s.window - 1 - len(s.itts)) % (1 << 32)
    assert last.max_cmd_sn == mx + 1
    _write(conn, 99, mx + 1, 512, bytes(512))
    assert 99 in s.itts and conn.write_held == 512


def test_limits_from_env_write_buffer():
    from fetd_tcp.limits import Limits
    assert Limits().max_write_buffer == 64 << 20
    assert Limits.from_env({"SCSI_TARGET_MAX_WRITE_BUFFER": "1048576"}).max_write_buffer == 1 << 20
