"""ErrorRecoveryLevel >= 1 in the sans-IO session core: what is kept for a
resend is bounded and counted in the budget, and a burst whose last Data-Out
was lost is asked for again."""
from __future__ import annotations

import struct

from fetd_tcp import pdu as P
from fetd_tcp.budget import KEEP, READ
from fetd_tcp.keys import ConnectionParams, SessionParams
from fetd_tcp.session import Connection, Session, Tags

from support import fuzzgen as G

WINDOW = 8


def _conn(**params) -> tuple[Connection, list, G.FakeLink]:
    out: list = []
    link = G.FakeLink()
    session = Session(1, b"\x80" + bytes(5), G.INAME, G.TNAME, 1,
                      SessionParams(error_recovery_level=1, **params), 1, 1, WINDOW)
    conn = Connection(session, 0, ConnectionParams(max_send_data_segment_length=4096), 100,
                      lambda p, d: out.append((p, bytes(d))), link, Tags(), lambda: None,
                      lambda c, pairs: [])
    session.connections[0] = conn
    return conn, out, link


def _cdb(op: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", op, 0, 0, blocks, 0, 0)


def test_kept_read_data_is_counted_and_bounded_until_acknowledged():
    """Reads answered but never acknowledged: their data stays in the budget as
    "keep"; once the session keeps a window's worth, MaxCmdSN stops; one
    ExpStatSN frees it all and the window moves again."""
    conn, out, link = _conn()
    s = conn.session
    for i in range(WINDOW):
        sn = s.exp_cmd_sn
        conn.receive(P.ScsiCommand(10 + i, P.LUN0, _cdb(0x88, 8), 4096, sn, conn.exp_stat_sn, read=True), b"")
        task = conn.tags.tasks.pop(link.calls[-1][1][0])
        conn.xmit_response(task, 0, None, 0, memoryview(bytes([i]) * 4096))
    assert len(s.kept) == WINDOW and conn.account.kinds[KEEP] == WINDOW * 4096
    assert conn.account.kinds[READ] == 0
    before = s.max_cmd_sn
    conn.receive(P.ScsiCommand(99, P.LUN0, bytes(16), 0, s.exp_cmd_sn, conn.exp_stat_sn), b"")
    assert s.max_cmd_sn == before            # held: nothing acknowledged
    statuses = [p for p, _ in out if isinstance(p, P.DataIn) and p.status is not None]
    assert len(statuses) == WINDOW
    conn.acknowledge(statuses[-1].stat_sn + 1)
    assert not s.kept and conn.account.kinds[KEEP] == 0
    assert s.max_cmd_sn > before             # the window moves again


def test_a_burst_whose_last_data_out_is_lost_is_asked_for_again():
    conn, out, link = _conn(initial_r2t=True, immediate_data=False)
    conn.receive(P.ScsiCommand(5, P.LUN0, _cdb(0x8A, 16), 8192, 1, conn.exp_stat_sn, write=True), b"")
    task = conn.tags.tasks[link.calls[-1][1][0]]
    conn.rdy_to_xfer(task, 0, 8192)
    (r2t,) = [p for p, _ in out if isinstance(p, P.R2T)]
    conn.receive(P.DataOut(5, r2t.ttt, 0, 0, False, conn.exp_stat_sn, P.LUN0, 4096), bytes(4096))
    conn.check_stalled()                     # progress since the last look: nothing
    conn.receive(P.DataOut(5, r2t.ttt, 1, 4096, False, conn.exp_stat_sn, P.LUN0, 2048), bytes(2048))
    conn.check_stalled()
    assert [p for p, _ in out if isinstance(p, P.R2T)] == [r2t]
    conn.check_stalled()                     # nothing came since: the rest is asked for
    again = [p for p, _ in out if isinstance(p, P.R2T)][1:]
    assert [(p.r2t_sn, p.buffer_offset, p.desired_length) for p in again] == [(1, 6144, 2048)]
    assert again[0].ttt != r2t.ttt
    conn.receive(P.DataOut(5, r2t.ttt, 2, 6144, True, conn.exp_stat_sn, P.LUN0, 2048), bytes(2048))
    conn.receive(P.DataOut(5, again[0].ttt, 0, 6144, True, conn.exp_stat_sn, P.LUN0, 2048), bytes(2048))
    data = [a for name, a, _ in link.calls if name == "scsi_rx_data"]
    assert [(a[1], sum(len(x) for x in a[2])) for a in data] == [(0, 4096), (4096, 2048), (6144, 2048)]
    assert not task.failed


# ---------------------------------------------------------------- ERL 2: what the front end keeps

def _front_end():
    """The iSCSI front end with a recording STML link (nothing is connected)."""
    import asyncio

    from fetd_tcp.server import IscsiFrontEnd
    fe = IscsiFrontEnd("ipc:///nonexistent/stml", [])
    fe.link = fe.registry.link = link = G.FakeLink()
    link.connected = asyncio.Event()
    link.connected.set()
    return fe, link


def _erl2_session(fe, tsih: int, window: int = WINDOW, **params) -> Session:
    s = Session(tsih, b"\x80" + bytes(4) + bytes([tsih]), G.INAME, G.TNAME, 1,
                SessionParams(error_recovery_level=2, **params), tsih, 1, window)
    fe.registry.sessions[tsih] = s
    fe.registry.by_nexus[s.nexus] = s
    return s


def _erl2_conn(fe, s: Session, cid: int) -> tuple[Connection, list]:
    out: list = []
    conn = Connection(s, cid, ConnectionParams(max_send_data_segment_length=4096), 100,
                      lambda p, d: out.append((p, bytes(d))), fe.link, fe.tags, lambda: None,
                      lambda c, pairs: [])
    s.connections[cid] = conn
    return conn, out


def _read(conn: Connection, itt: int) -> None:
    s = conn.session
    conn.receive(P.ScsiCommand(itt, P.LUN0, _cdb(0x88, 8), 4096, s.exp_cmd_sn, conn.exp_stat_sn,
                               read=True), b"")


def test_window_reopens_when_our_abort_of_an_expired_task_finds_nothing():
    """Review 2, finding 14: Time2Retain runs out on a connection whose reads
    fill the window; our ABORT TASKs go to the STML. One read completed before
    its abort arrived, so the STML answers that abort with nothing aborted:
    the window is still announced open (NOP-In) once every abort is answered."""
    fe, link = _front_end()
    s = _erl2_session(fe, 1, window=2)
    a, _ = _erl2_conn(fe, s, 0)
    b, out_b = _erl2_conn(fe, s, 1)
    _read(a, 10)
    _read(a, 11)
    assert s.max_cmd_sn == s.exp_cmd_sn - 1          # shut: 2 tasks in a window of 2
    del s.connections[0]
    a.fail()
    fe.registry.expire(a)
    aborts = [c[1] for c in link.calls if c[0] == "rx_task_mgmt_fn"]
    assert [x[2] for x in aborts] == [P.TMF_ABORT_TASK] * 2
    first, second = aborts
    fe.xmit_response(first[4], 0, None, 0, [bytes(4096)])      # it completed meanwhile
    fe.task_mgmt_fn_done(first[0], P.TMF_RESP_NO_TASK, [])      # so its abort finds nothing
    fe.task_mgmt_fn_done(second[0], P.TMF_RESP_COMPLETE, [second[4]])
    nops = [p for p, _ in out_b if isinstance(p, P.NopIn) and p.itt == P.RESERVED_TAG]
    assert [n.max_cmd_sn for n in nops] == [s.exp_cmd_sn + 1]
    assert not s.itts and not fe.registry.expiring and not fe.tags.tasks


def test_an_abort_the_stml_finds_no_task_for_frees_our_copy_of_it():
    """A response lost between the STML and us (fault injection shows it):
    the initiator's ABORT TASK finds no task in the STML. Our copy of the
    task goes with the answer, so its ITT can be used again and is answered."""
    fe, link = _front_end()
    s = _erl2_session(fe, 1)
    conn, out = _erl2_conn(fe, s, 0)
    _read(conn, 10)
    (cmd,) = [c[1] for c in link.calls if c[0] == "rx_cmnd"]
    conn.receive(P.TaskMgmtRequest(77, P.TMF_ABORT_TASK, P.LUN0, 10, s.exp_cmd_sn, conn.exp_stat_sn,
                                   s.exp_cmd_sn - 1, 0, immediate=True), b"")
    (abort,) = [c[1] for c in link.calls if c[0] == "rx_task_mgmt_fn"]
    assert abort[4] == cmd[0]                           # it names our task's tag
    fe.task_mgmt_fn_done(abort[0], P.TMF_RESP_NO_TASK, [])
    (answer,) = [p for p, _ in out if isinstance(p, P.TaskMgmtResponse)]
    assert answer.itt == 77 and answer.response == P.TMF_RESP_NO_TASK
    assert 10 not in s.itts and cmd[0] not in fe.tags.tasks
    _read(conn, 10)                                     # the ITT again: a new task, sent on
    assert len([c for c in link.calls if c[0] == "rx_cmnd"]) == 2
    assert 10 in s.itts


def test_failed_connections_kept_are_bounded_in_number_and_time():
    """Review 2, finding 1, in the core: a failed connection with no task keeps
    nothing (its account closes); one with tasks is kept for at most
    max_retain seconds whatever Time2Wait says; a session keeps at most
    MaxConnections of them, the oldest going first (its reads aborted)."""
    import asyncio

    from fetd_tcp.retain import retention

    async def main() -> None:
        fe, link = _front_end()
        delays: list[float] = []
        loop = asyncio.get_running_loop()
        real = loop.call_later
        loop.call_later = lambda d, *a: (delays.append(d), real(3600, *a))[1]   # type: ignore[method-assign]
        s = _erl2_session(fe, 1, default_time2wait=3600, default_time2retain=20, max_connections=2)
        idle, _ = _erl2_conn(fe, s, 0)
        conns, tags = [], []
        for cid in range(1, 4):
            c, _ = _erl2_conn(fe, s, cid)
            _read(c, 100 + cid)
            conns.append(c)
            tags.append(link.calls[-1][1][0])
        fe.registry.drop_connection(idle)
        assert not idle.failed and not s.failed and not delays and not len(fe.registry.retained)
        for c in conns:
            fe.registry.drop_connection(c)
        assert delays == [retention(3600, 20, fe.limits.max_retain)] * 3 == [60.0] * 3
        assert list(s.failed) == [2, 3] and conns[0].account.closed
        aborts = [c[1] for c in link.calls if c[0] == "rx_task_mgmt_fn"]
        assert [(x[2], x[4]) for x in aborts] == [(P.TMF_ABORT_TASK, tags[0])]
        assert len(fe.registry.expiry) == 2 and len(fe.registry.retained) == 2
        fe.registry.end_session(s)                       # e.g. reinstated: nothing of it is kept
        assert not fe.registry.expiry and not len(fe.registry.retained) and all(c.account.closed for c in conns)
        loop.call_later = real                   # type: ignore[method-assign]

    asyncio.run(main())


def test_retained_keeps_the_newest_per_host():
    from fetd_tcp.retain import Retained
    live = {"a1": True, "a2": True, "a3": True, "b1": True}
    r: Retained[str] = Retained(2, lambda c: live[c])
    assert r.keep("a1", "10.0.0.1") == [] and r.keep("b1", "10.0.0.2") == []
    assert r.keep("a2", "10.0.0.1") == []
    assert r.keep("a3", "10.0.0.1") == ["a1"]        # the oldest of that host only
    live["a2"] = False                                # all its tasks were reassigned
    live["a1"] = True
    assert r.keep("a1", "10.0.0.1") == [] and len(r) == 3
    r.forget("b1")
    assert r.hosts.keys() == {"10.0.0.1"}


def test_failed_connections_go_with_the_stml_link():
    """The STML link is lost: the tasks a failed connection kept for a TASK
    REASSIGN are gone with the STML, so it keeps nothing (share, timer), and a
    session left with no connection ends; a connection dropping while the link
    is down is not kept at all."""
    import asyncio

    async def main() -> None:
        fe, link = _front_end()
        s = _erl2_session(fe, 1, max_connections=2)
        a, _ = _erl2_conn(fe, s, 0)
        _read(a, 7)
        fe.registry.drop_connection(a)
        assert list(s.failed) == [0] and fe.registry.expiry
        link.connected.clear()
        fe.link_lost()
        assert not s.failed and a.account.closed and not fe.registry.expiry and not len(fe.registry.retained)
        assert 1 not in fe.registry.sessions and s.nexus not in fe.registry.by_nexus
        t = _erl2_session(fe, 2)
        b, _ = _erl2_conn(fe, t, 0)
        _read(b, 8)
        fe.registry.drop_connection(b)                  # the link is still down
        assert not t.failed and not fe.registry.expiry and 2 not in fe.registry.sessions

    asyncio.run(main())


def test_a_cid_that_fails_again_does_not_escape_the_session_cap():
    """A new connection may reuse a failed one's CID; when it fails too, the
    session's failed connections are still at most one per CID and at most
    MaxConnections: the earlier one's read is aborted at once (it used to be
    kept out of sight of the cap, its timer and share alive after the
    session ended)."""
    import asyncio

    async def main() -> None:
        fe, link = _front_end()
        s = _erl2_session(fe, 1, max_connections=2)
        conns, tags = [], []
        for i in range(3):
            c, _ = _erl2_conn(fe, s, 0)
            _read(c, 20 + i)
            tags.append(link.calls[-1][1][0])
            fe.registry.drop_connection(c)
            conns.append(c)
        assert s.failed == {0: conns[2]} and list(fe.registry.expiry) == [conns[2]] and len(fe.registry.retained) == 1
        aborts = [c[1] for c in link.calls if c[0] == "rx_task_mgmt_fn"]
        assert [(x[2], x[4]) for x in aborts] == [(P.TMF_ABORT_TASK, tags[0]), (P.TMF_ABORT_TASK, tags[1])]
        assert conns[0].account.closed and conns[1].account.closed and not conns[2].account.closed
        fe.registry.end_session(s)
        assert not fe.registry.expiry and not len(fe.registry.retained) and conns[2].account.closed

    asyncio.run(main())


def test_the_times_a_logout_tells_fit_what_is_kept():
    """What a Logout Response says (Time2Wait, Time2Retain) never adds up to
    more than the target keeps, and keeps Time2Retain whole when it can."""
    from fetd_tcp.retain import announced, retention
    cases = {(2, 20, 60.0): (2, 20), (3600, 20, 60.0): (40, 20), (3600, 20, 10.0): (0, 10),
             (0, 0, 60.0): (0, 0), (3600, 3600, 7200.0): (3600, 3600)}
    for (wait, retain, cap), told in cases.items():
        assert announced(wait, retain, cap) == told
        assert sum(told) <= retention(wait, retain, cap)
