"""fetd_tcp's buffer budget and the bounds of the sans-IO session core (issue 18):
what one connection may make the front end hold, counted in bytes, PDUs and
structure sizes, never in time."""
from __future__ import annotations

import struct

from fetd_tcp import pdu as P
from fetd_tcp.budget import OOO, OUT, READ, RESERVE, TEXT, WRITE, Budget
from fetd_tcp.keys import ConnectionParams, SessionParams, TargetKeys
from fetd_tcp.session import MAX_TEXT_REQUEST, MAX_TMFS, OOO_LIMIT, Connection, Session, Tags
from support import fuzzgen as G

MIB = 1 << 20


# ---------------------------------------------------------------- Budget

def _fill(account, chunk: int = 4096) -> int:
    taken = 0
    while account.take(READ, chunk):
        taken += chunk
    return taken


def test_every_account_keeps_its_guaranteed_share_and_an_initiator_half_the_room():
    b = Budget(16 * RESERVE)                        # 4 shares kept for logins: room 12 shares
    assert b.shares == 4 and b.room == 12 * RESERVE
    hog, other = b.open("hog"), b.open("other")
    assert hog and other
    # the hog gets its share and half of the room, however it asks; the limit holds
    assert _fill(hog) == RESERVE + 6 * RESERVE and b.peak <= b.limit
    assert other.take(READ, RESERVE)              # the guaranteed share is still there
    # the other gets half of what the hog left it
    assert _fill(other) == 3 * RESERVE
    late = b.open("late")                           # and a third initiator still logs in
    assert late and late.take(READ, RESERVE) and late.take(READ, RESERVE)
    hog.give(READ, 7 * RESERVE)
    assert b.used == other.held + late.held and b.owners["hog"].excess == 0


def test_an_initiators_connections_share_its_fair_share():
    """Opening more connections gives an initiator more guaranteed shares, never
    more of the room."""
    b = Budget(32 * RESERVE)                        # 8 shares: room 24 shares
    hogs = [b.open("hog") for _ in range(4)]
    assert all(hogs)
    assert sum(_fill(h) for h in hogs) == 4 * RESERVE + 12 * RESERVE
    assert b.owners["hog"].excess == 12 * RESERVE and b.owners["hog"].accounts == 4
    other = b.open("other")
    assert other and _fill(other) == RESERVE + 6 * RESERVE


def test_logins_are_not_refused_while_shares_are_left():
    """Excess never takes the reserves kept for new connections."""
    b = Budget(16 * RESERVE)                        # 4 shares kept: room 12 shares
    hogs = [b.open(f"hog{i}") for i in range(2)]
    assert all(hogs)
    assert hogs[0].take(READ, 12 * RESERVE) and hogs[1].take(READ, 2 * RESERVE)
    assert b.excess == b.room == 12 * RESERVE        # the room is full
    assert b.open("late") is not None and b.open("later") is not None   # the 3rd and 4th shares
    assert b.open("too late") is None               # past the shares, only with room left
    for h in hogs:
        h.close()
    assert b.open("too late") is not None and b.excess == 0
    assert set(b.owners) == {"late", "later", "too late"}


def test_an_owner_holding_no_excess_may_take_one_transfer_bigger_than_its_share():
    b = Budget(16 * RESERVE)
    a = b.open("a")
    assert a and a.take(READ, 10 * RESERVE)       # 9 shares of excess: past half the room
    assert not a.take(READ, 4096)                 # but nothing more beyond its share
    other = b.open("other")
    assert other and not other.take(READ, 5 * RESERVE) and other.take(READ, 4 * RESERVE)


def test_a_connection_is_refused_when_no_share_is_left():
    b = Budget(2 * RESERVE)
    assert b.open() and b.open()
    assert b.open() is None


def test_closing_an_account_frees_all_it_held():
    b = Budget(8 * RESERVE)
    a = b.open()
    assert a
    a.take(READ, RESERVE)
    a.take(OUT, 3 * RESERVE, force=True)
    a.take(OOO, 100)
    a.close()
    assert b.used == 0 and b.accounts == 0 and b.excess == 0 and all(v == 0 for v in b.kinds)


def _counts(b, a) -> tuple:
    return (a.held, list(a.kinds), b.used, list(b.kinds), b.excess, a.owner.excess)


def test_a_reads_answer_counts_as_a_move_and_the_rest_given_back():
    """Account.answered (one call per read) leaves every count as move() of
    the data to OUT and give() of the reservation's rest did, within the
    guaranteed share and past it, with other output held, and for data past
    its reservation or an account closed."""
    for before, reserved, n in ((0, 70_000, 65_536), (2 * RESERVE, RESERVE + 300, RESERVE),
                                (RESERVE - 10, 4096 + 256, 4096), (0, 4096, 8192), (0, 512, 512)):
        for close in (False, True):
            seen = []
            for one in (False, True):
                b = Budget(16 * RESERVE)
                a = b.open("x")
                assert a
                a.take(OUT, before, force=True)
                assert a.take(READ, reserved)
                if close:
                    a.close()
                if one:
                    a.answered(n, reserved)
                else:
                    a.move(READ, OUT, n, reserved)
                    if reserved > n:
                        a.give(READ, reserved - n)
                seen.append(_counts(b, a))
            assert seen[0] == seen[1], (before, reserved, n, close)


def test_grants_wait_in_tag_order_and_come_as_room_frees():
    b = Budget(16 * RESERVE, shares=1)
    a = b.open("a")
    waiters = {tag: b.open(f"w{tag}") for tag in (3, 4, 5)}   # room: 12 shares
    assert a
    got: list[int] = []
    b.hold(1)
    assert a.take(WRITE, 13 * RESERVE)             # task 1 holds all the room
    for tag in (3, 4, 5):
        b.hold(tag)
    for tag in (5, 3, 4):                            # waiting, out of order
        w = waiters[tag]
        assert w
        b.wait(w, WRITE, 2 * RESERVE, tag, lambda tag=tag: got.append(tag))
    assert got == []                                 # task 1 is older than all: they wait
    a.give(WRITE, 2 * RESERVE)
    assert got == [3, 4]                             # oldest first, as room allows
    a.give(WRITE, 2 * RESERVE)
    assert got == [3, 4, 5] and b.used == 15 * RESERVE


def test_a_grant_over_its_owners_share_waits_alone():
    """A grant the owner's fair share does not allow is parked with its owner:
    a newer grant of another initiator does not wait behind it, and it comes
    when its owner gives back."""
    b = Budget(16 * RESERVE)
    hog, other = b.open("hog"), b.open("other")
    assert hog and other
    b.hold(1)
    assert hog.take(WRITE, 7 * RESERVE)            # task 1: the hog's half of the room
    got: list[int] = []
    for tag in (2, 3):
        b.hold(tag)
    b.wait(hog, WRITE, RESERVE, 2, lambda: got.append(2))
    assert got == [] and b._parked_live == 1
    b.wait(hog, WRITE, 4096, 3, lambda: got.append(3))
    assert got == [] and b._parked_live == 2         # its owner's older grant waits: so does it
    b.hold(4)
    b.wait(other, WRITE, 3 * RESERVE, 4, lambda: got.append(4))
    assert got == [4]                                # not behind the hog's
    assert not b.take_now(hog, WRITE, 4096)        # nor does the hog jump its own queue
    hog.give(WRITE, 2 * RESERVE)
    assert got == [4, 2]                             # as its share allows
    hog.give(WRITE, RESERVE)
    assert got == [4, 2, 3] and b._waiting_live == 0 and b._parked_live == 0


def test_a_parked_grant_passes_when_nothing_older_holds():
    """The owner's newer tasks holding its share may wait (ORDERED) for its oldest:
    that one goes past the share once nothing older holds a reservation."""
    b = Budget(16 * RESERVE)
    hog = b.open("hog")
    assert hog
    for tag in (1, 2, 10):
        b.hold(tag)
    assert hog.take(WRITE, 7 * RESERVE)            # task 10, newer, holds the hog's share
    got: list[int] = []
    b.wait(hog, WRITE, RESERVE, 2, lambda: got.append(2))
    assert got == [] and b._parked_live == 1         # task 1 is older and holds
    b.unhold(1)
    assert got == [2] and b._parked_live == 0


def test_a_grant_within_the_guaranteed_share_does_not_queue_behind_others():
    b = Budget(4 * RESERVE)
    hog, other = b.open(), b.open()
    assert hog and other
    b.hold(1)
    hog.take(WRITE, 3 * RESERVE)
    got: list[int] = []
    b.hold(2)
    b.wait(hog, WRITE, RESERVE, 2, lambda: got.append(2))    # the hog waits for more
    assert got == []
    assert b.take_now(other, WRITE, RESERVE // 2)            # the other's share: at once
    assert not b.take_now(other, WRITE, RESERVE)             # past it: behind the hog


def test_the_oldest_waiter_passes_when_only_newer_tasks_hold_the_budget():
    """Newer tasks holding the budget may be waiting (ORDERED) for the oldest
    one: withholding its data would deadlock, so it goes past the limit, and
    only it."""
    b = Budget(2 * RESERVE)
    a = b.open()
    assert a
    for tag in (2, 3, 10):
        b.hold(tag)
    a.take(WRITE, 2 * RESERVE)                     # task 10, newer, holds it all
    got: list[int] = []
    b.wait(a, WRITE, RESERVE, 2, lambda: got.append(2))
    assert got == [2] and b.used == 3 * RESERVE   # past the limit by one transfer
    b.wait(a, WRITE, RESERVE, 3, lambda: got.append(3))
    assert got == [2]                              # task 2 is older and holds: 3 waits
    b.unhold(2)                                    # answered (its data given back)
    a.give(WRITE, RESERVE)
    assert got == [2, 3]


def test_the_oldest_holder_is_found_without_walking_all_that_came_and_went():
    b = Budget(2 * RESERVE)
    b.hold(1)                                      # a task held for long
    for tag in range(2, 100_000):
        b.hold(tag)
        b.unhold(tag)
    assert len(b._order) <= 2 * len(b._holders) + 65
    assert b._oldest_holder() == 1
    b.unhold(1)
    assert b._oldest_holder() is None


def test_a_cancelled_grant_is_never_given_and_the_queue_stays_small():
    b = Budget(2 * RESERVE)
    a = b.open()
    assert a
    b.hold(1)
    a.take(WRITE, 2 * RESERVE)
    got: list[int] = []
    for tag in range(2, 1002):
        b.hold(tag)
        b.wait(a, WRITE, RESERVE, tag, lambda tag=tag: got.append(tag)).cancel()
    assert len(b._waiting) <= 2 * b._waiting_live + 65
    a.give(WRITE, 2 * RESERVE)
    assert got == []


# ---------------------------------------------------------------- the session core

def _conn(**kw) -> tuple[Connection, list, G.FakeLink]:
    out: list = []
    link = G.FakeLink()
    sp = SessionParams(immediate_data=True, initial_r2t=False, first_burst_length=65536,
                       max_burst_length=kw.pop("mbl", 262144))
    session = Session(1, b"\x80" + bytes(5), G.INAME, G.TNAME, 1, sp, 1, 1, 32)
    budget = Budget(kw.pop("limit", 64 * MIB))
    account = budget.open()
    conn = Connection(session, 0, ConnectionParams(max_send_data_segment_length=kw.pop("seg", 8192),
                                                   max_recv_data_segment_length=262144),
                      0, lambda p, d: out.append((p, d)), link, Tags(), lambda: None,
                      kw.pop("text", lambda c, pairs: [(k, "NotUnderstood") for k, _ in pairs]),
                      account=account, **kw)
    session.connections[0] = conn
    return conn, out, link


def _cmd(itt: int, sn: int, cdb: bytes, edtl: int, data: bytes = b"", **kw) -> P.ScsiCommand:
    return P.ScsiCommand(itt, P.LUN0, cdb.ljust(16, b"\0"), edtl, sn, 0, data_length=len(data), **kw)


def _read(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def _write(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def test_reads_past_the_connections_read_bound_get_task_set_full():
    conn, out, link = _conn(read_limit=4 * MIB)
    for i in range(8):                              # 8 x 1 MiB reads, nothing answered yet
        conn.receive(_cmd(i + 1, i + 1, _read(0, 2048), MIB, read=True), b"")
    sent = [c for c in link.calls if c[0] == "rx_cmnd"]
    full = [p for p, _ in out if isinstance(p, P.ScsiResponse) and p.status == 0x28]
    assert len(sent) == 3 and len(full) == 5        # 3 MiB reserved + headers; a 4th would pass 4 MiB
    assert conn.account.kinds[READ] <= 4 * MIB


def test_a_read_bigger_than_the_bound_still_runs_alone():
    conn, out, link = _conn(read_limit=MIB)
    conn.receive(_cmd(1, 1, _read(0, 8192), 4 * MIB, read=True), b"")
    assert [c for c in link.calls if c[0] == "rx_cmnd"]


def test_read_data_counts_until_the_socket_takes_it():
    conn, out, link = _conn()
    conn.receive(_cmd(1, 1, _read(0, 8), 4096, read=True), b"")
    task = next(iter(conn.tags.tasks.values()))
    reserved = conn.account.kinds[READ]
    assert reserved >= 4096
    conn.tags.tasks.pop(task.tag)
    conn.xmit_response(task, 0, None, 0, memoryview(bytes(4096)))
    # the reservation went; the data counts as output until the writer samples its socket
    assert conn.account.kinds[READ] == 0 and conn.account.kinds[OUT] == 4096
    conn.account.set(OUT, 0)                      # what PduWriter.flush does once it is sent
    assert conn.account.held == 0


def test_out_of_order_data_is_capped_and_refused_in_its_turn():
    conn, out, link = _conn()
    s = conn.session
    chunk = bytes(65536)
    n = OOO_LIMIT // len(chunk) + 8
    for i in range(n):                              # CmdSN 2.. arrive; 1 never came yet
        conn.receive(_cmd(10 + i, 2 + i, _write(i * 128, 128), 65536, chunk, write=True), chunk)
    assert s.queued_bytes <= OOO_LIMIT and conn.account.kinds[OOO] == s.queued_bytes
    assert not link.calls
    conn.receive(_cmd(1, 1, bytes(6), 0), b"")      # the gap fills: everything runs in order
    sent = [c for c in link.calls if c[0] == "rx_cmnd"]
    full = [p.itt for p, _ in out if isinstance(p, P.ScsiResponse) and p.status == 0x28]
    assert len(sent) == 1 + OOO_LIMIT // len(chunk)
    assert full == [10 + i for i in range(OOO_LIMIT // len(chunk), n)]
    assert s.queued_bytes == 0 and conn.account.kinds[OOO] == 0


def test_tasks_in_flight_stay_within_the_window():
    """MaxCmdSN advances as commands complete: commands beyond it are discarded,
    immediate ones past the window get Reject, so the task table has a bound."""
    conn, out, link = _conn()
    s = conn.session
    for sn in range(1, 200):                       # ignores MaxCmdSN
        conn.receive(_cmd(sn, sn, bytes(6), 0), b"")
    for i in range(50):
        conn.receive(_cmd(1000 + i, 200, bytes(6), 0, immediate=True), b"")
    assert len(s.itts) == s.window
    rejects = [p for p, _ in out if isinstance(p, P.Reject)]
    assert len(rejects) == 50 and {r.reason for r in rejects} == {P.REJECT_IMMEDIATE_COMMAND_REJECT}


def test_task_management_requests_in_flight_are_bounded():
    conn, out, link = _conn()
    for i in range(MAX_TMFS + 10):
        conn.receive(P.TaskMgmtRequest(100 + i, P.TMF_ABORT_TASK_SET, P.LUN0, P.RESERVED_TAG, 1, 0,
                                       immediate=True), b"")
    assert len(conn.tags.tmfs) == MAX_TMFS
    refused = [p for p, _ in out if isinstance(p, P.TaskMgmtResponse)]
    assert len(refused) == 10 and {p.response for p in refused} == {P.TMF_RESP_REJECTED}


def test_a_small_max_burst_length_costs_no_memory_per_burst():
    conn, out, link = _conn(mbl=512)
    conn.receive(_cmd(1, 1, _write(0, 16384), 8 * MIB, write=True), b"")
    task = next(iter(conn.tags.tasks.values()))
    conn.rdy_to_xfer(task, 0, 8 * MIB)
    assert len(task.bursts) == 1                    # one range, cut into bursts as R2Ts go out
    r2ts = [p for p, _ in out if isinstance(p, P.R2T)]
    assert [(r.buffer_offset, r.desired_length) for r in r2ts] == [(0, 512)]


# ---------------------------------------------------------------- Text

def _text_conn(body_pairs: list[tuple[str, str]], seg: int = 512):
    calls: list = []

    def text(c, pairs):
        calls.append(pairs)
        return body_pairs
    conn, out, link = _conn(seg=seg, text=text)
    return conn, out, calls


def test_a_long_text_answer_is_built_once_and_sent_by_offset():
    answer = [("TargetName", f"iqn.2026-11.org.test:t{i:04d}") for i in range(200)]
    conn, out, calls = _text_conn(answer)
    conn.receive(P.TextRequest(1, P.RESERVED_TAG, 1, 0, immediate=True, data_length=16),
                 b"SendTargets=All\0")
    got = bytearray()
    pdus = 0
    while True:
        pdu, data = out[-1]
        got += data
        pdus += 1
        assert len(data) <= 512
        if pdu.final:
            break
        conn.receive(P.TextRequest(1, pdu.ttt, 1, 0, immediate=True), b"")
    assert P.decode_text(bytes(got)) == answer
    body = len(P.encode_text(answer))
    assert pdus == -(-body // 512) and len(calls) == 1
    # every segment is a view of the one answer: nothing after it is copied per PDU
    assert len({id(d.obj) for _, d in out}) == 1
    assert conn.account.kinds[TEXT] == 0


def test_a_key_given_twice_in_one_text_request_is_refused():
    conn, out, calls = _text_conn([("TargetName", "x")])
    data = b"SendTargets=All\0" * 2000
    conn.receive(P.TextRequest(1, P.RESERVED_TAG, 1, 0, immediate=True, data_length=len(data)), data)
    assert [type(p) for p, _ in out] == [P.Reject] and calls == []


def test_a_continued_text_request_is_acknowledged_and_bounded():
    conn, out, calls = _text_conn([("TargetName", "x")])
    part = b"X" * 8192
    ttt = P.RESERVED_TAG
    for i in range(MAX_TEXT_REQUEST // len(part)):
        conn.receive(P.TextRequest(1, ttt, 1, 0, immediate=True, cont=True, final=False,
                                   data_length=len(part)), part)
        pdu, data = out[-1]
        assert isinstance(pdu, P.TextResponse) and not pdu.final and data == b""
        ttt = pdu.ttt
    conn.receive(P.TextRequest(1, ttt, 1, 0, immediate=True, cont=True, final=False,
                               data_length=len(part)), part)
    assert isinstance(out[-1][0], P.Reject) and out[-1][0].reason == P.REJECT_OUT_OF_RESOURCES
    assert conn.account.kinds[TEXT] == 0 and not conn.text_in and calls == []
    # a request in two parts is answered as one
    conn.receive(P.TextRequest(2, P.RESERVED_TAG, 1, 0, immediate=True, cont=True, final=False,
                               data_length=6), b"SendTa")
    conn.receive(P.TextRequest(2, out[-1][0].ttt, 1, 0, immediate=True, data_length=10), b"rgets=All\0")
    assert calls == [[("SendTargets", "All")]] and out[-1][0].final


def test_the_books_balance_once_every_command_is_answered():
    """Reads, writes of every kind, a failed transfer, an aborted task, a gap in CmdSN,
    a NOP echo and a Text exchange: once all are answered (and the output sent) the
    connection holds nothing."""
    conn, out, link = _conn(seg=512, text=lambda c, pairs: [("TargetName", "t" * 4000)])
    acct = conn.account
    sn = iter(range(1, 1000))
    conn.receive(_cmd(1, next(sn), _read(0, 64), 32768, read=True), b"")
    conn.receive(_cmd(2, next(sn), _write(0, 8), 4096, bytes(4096), write=True), bytes(4096))
    conn.receive(_cmd(3, next(sn), _write(8, 256), 131072, bytes(8192), write=True, final=False),
                 bytes(8192))                                     # immediate + unsolicited follow
    conn.receive(P.DataOut(3, P.RESERVED_TAG, 0, 8192, True, 0, P.LUN0, 8192), bytes(8192))
    conn.receive(_cmd(4, next(sn), _write(300, 64), 32768, write=True), b"")
    conn.receive(_cmd(5, next(sn), _write(400, 64), 32768, write=True), b"")
    gap = next(sn)
    conn.receive(_cmd(6, next(sn), _write(500, 8), 4096, bytes(4096), write=True), bytes(4096))
    conn.receive(P.NopOut(7, P.RESERVED_TAG, 0, 0, immediate=True, data_length=100), bytes(100))
    conn.receive(P.TextRequest(8, P.RESERVED_TAG, 0, 0, immediate=True, data_length=16), b"SendTargets=All\0")
    conn.receive(_cmd(9, gap, bytes(6), 0), b"")                 # fills the gap: 6 runs
    tasks = {t.itt: t for t in conn.tags.tasks.values()}
    conn.rdy_to_xfer(tasks[3], 16384, 131072 - 16384)
    conn.rdy_to_xfer(tasks[4], 0, 32768)
    conn.rdy_to_xfer(tasks[5], 0, 32768)
    r2t = next(p for p, _ in out if isinstance(p, P.R2T) and p.itt == 4)
    conn.receive(P.DataOut(4, r2t.ttt, 0, 0, True, 0, P.LUN0, 32768), bytes(32768))
    r2t = next(p for p, _ in out if isinstance(p, P.R2T) and p.itt == 5)
    conn.receive(P.DataOut(5, r2t.ttt, 5, 4096, True, 0, P.LUN0, 512), bytes(512))   # out of sequence
    assert acct.held > 0
    for itt, data in ((1, memoryview(bytes(32768))), (2, None), (4, None), (5, None), (6, None), (9, None)):
        task = tasks[itt]
        conn.tags.tasks.pop(task.tag)
        conn.xmit_response(task, 0 if itt != 5 else 2, None, 0, data)
    conn.task_mgmt_fn_done(0, P.TMF_ABORT_TASK, 0, [tasks[3]])     # task 3 aborted
    conn.session.tmfs += 1                                          # (it was never counted)
    text = [p for p, _ in out if isinstance(p, P.TextResponse)]
    assert not text[-1].final and acct.kinds[TEXT] > 0
    while not text[-1].final:
        conn.receive(P.TextRequest(8, text[-1].ttt, 0, 0, immediate=True), b"")
        text.append(out[-1][0])
    assert not conn.session.itts and not conn.waiting
    acct.set(OUT, 0)                                              # the writer sent it all
    assert acct.held == 0 and all(v == 0 for v in acct.kinds)
    assert acct.budget.used == 0 and acct.budget._oldest_holder() is None


def test_limits_from_env_read_buffer_and_budget():
    import pytest

    from fetd_tcp.limits import MIN_BUFFERED, LimitError, Limits
    assert Limits().max_buffered == 256 * MIB and Limits().max_read_buffer == 64 * MIB
    got = Limits.from_env({"SCSI_TARGET_MAX_BUFFERED": str(32 * MIB), "SCSI_TARGET_MAX_READ_BUFFER": "1048576"})
    assert got.max_buffered == 32 * MIB and got.max_read_buffer == MIB
    with pytest.raises(LimitError, match="SCSI_TARGET_MAX_BUFFERED"):
        Limits.from_env({"SCSI_TARGET_MAX_BUFFERED": str(MIN_BUFFERED - 1)})


def test_a_connection_always_has_room_for_one_unsolicited_burst():
    """Whatever the others hold, a connection's guaranteed share takes a write's
    whole unsolicited burst at the FirstBurstLength the target offers (all of
    it arrives with the command, unasked: InitialR2T=No, as libiscsi and
    open-iscsi negotiate), and a read of that size with its PDUs' headers."""
    burst = TargetKeys().first_burst_length
    b = Budget(256 << 20)
    hogs = [b.open(f"hog{i}") for i in range(64)]
    while any(h and h.take(READ, 1 << 20) for h in hogs):
        pass
    fresh = b.open("fresh")
    assert fresh is not None and fresh.take(WRITE, burst)
    fresh.give(WRITE, burst)
    assert fresh.take(READ, burst + 8 * 48)
