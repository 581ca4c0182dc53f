"""ErrorRecoveryLevel >= 1 in the sans-IO session core: what is kept for a
resend is bounded and counted in the budget, and a burst whose last Data-Out
was lost is asked for again."""
from __future__ import annotations

import struct

from fetd_tcp import pdu as P
from fetd_tcp.keys import ConnectionParams, SessionParams
from fetd_tcp.session import Connection, Session, Tags

import fuzzgen as G

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
    assert len(s.kept) == WINDOW and conn.account.kinds["keep"] == WINDOW * 4096
    assert conn.account.kinds["read"] == 0
    before = s.max_cmd_sn
    conn.receive(P.ScsiCommand(99, P.LUN0, bytes(16), 0, s.exp_cmd_sn, conn.exp_stat_sn), b"")
    assert s.max_cmd_sn == before            # held: nothing acknowledged
    statuses = [p for p, _ in out if isinstance(p, P.DataIn) and p.status is not None]
    assert len(statuses) == WINDOW
    conn.acknowledge(statuses[-1].stat_sn + 1)
    assert not s.kept and conn.account.kinds["keep"] == 0
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
