"""iSCSI beyond ErrorRecoveryLevel 0, driven PDU by PDU against a real target:
RFC 7144 task management, the CmdSN window, digest errors, SNACK, connection
recovery with TASK REASSIGN, and Time2Retain (issue 24)."""
from __future__ import annotations

import os
import re
import struct
import time
from pathlib import Path

import pytest

from fetd_tcp import pdu as P
from support.rawiscsi import RawInitiator
from support.target import Target

PLAIN = "iqn.2026-11.org.scsi-target:plain"      # defaults: ERL 0, window 128
ERL1 = "iqn.2026-11.org.scsi-target:erl1"
ERL2 = "iqn.2026-11.org.scsi-target:erl2"
NARROW = "iqn.2026-11.org.scsi-target:narrow"    # a window of 8 commands
WINDOW = 8
ERL2_WINDOW = 4
CHECK_CONDITION = 0x02

CONFIG = f"""
[[target]]
name = "{PLAIN}"
[[target.lun]]
backend = "ram"
size = "8MiB"

[[target]]
name = "{ERL1}"
error_recovery_level = 1
[[target.lun]]
backend = "ram"
size = "8MiB"

[[target]]
name = "{ERL2}"
error_recovery_level = 2
cmdsn_depth = {ERL2_WINDOW}
[[target.lun]]
backend = "ram"
size = "8MiB"

[[target]]
name = "{NARROW}"
cmdsn_depth = {WINDOW}
[[target.lun]]
backend = "ram"
size = "8MiB"
"""


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("recovery")
    (d / "target.toml").write_text(CONFIG)
    (d / "data").mkdir()
    with Target(config=str(d / "target.toml"), data_dir=str(d / "data")) as t:
        yield t


def _hostport(portal: str) -> tuple[str, int]:
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


def connect(t: Target, iqn: str, keys: list[tuple[str, str]] = (), **kw) -> RawInitiator:
    ini = RawInitiator(*_hostport(t.portal), **kw)
    resp = ini.login(iqn, extra=list(keys))
    assert resp.status_class == 0, resp
    return ini


def cdb16(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", op, 0, lba, blocks, 0, 0)


def write_cmd(ini: RawInitiator, lba: int, blocks: int, data: bytes = b"", sn: int | None = None,
              itt: int | None = None) -> P.ScsiCommand:
    """A WRITE(16) of `blocks` with `data` as immediate data (may be none): not waited for."""
    itt = ini._next_itt() if itt is None else itt
    cmd = P.ScsiCommand(itt, P.LUN0, cdb16(0x8A, lba, blocks), blocks * 512,
                        ini.cmd_sn if sn is None else sn, ini.exp_stat_sn, write=True,
                        final=True, data_length=len(data))
    if sn is None:
        ini.cmd_sn += 1
    return cmd


def read_cmd(ini: RawInitiator, lba: int, blocks: int) -> P.ScsiCommand:
    cmd = P.ScsiCommand(ini._next_itt(), P.LUN0, cdb16(0x88, lba, blocks), blocks * 512, ini.cmd_sn,
                        ini.exp_stat_sn, read=True)
    ini.cmd_sn += 1
    return cmd


def data_out(ini: RawInitiator, r2t: P.R2T, data: bytes, seg: int, bad: int | None = None,
             bad_header: int | None = None) -> None:
    """Answer an R2T in PDUs of `seg` bytes (PDU number `bad` with a damaged data
    digest, `bad_header` with a damaged header digest)."""
    start, end = r2t.buffer_offset, r2t.buffer_offset + r2t.desired_length
    for n, off in enumerate(range(start, end, seg)):
        chunk = data[off:min(off + seg, end)]
        pdu = P.DataOut(r2t.itt, r2t.ttt, n, off, off + seg >= end, ini.exp_stat_sn, P.LUN0, len(chunk))
        ini.send(pdu, chunk, bad_data=n == bad, bad_header=n == bad_header)


def expect(ini: RawInitiator, kind: type, skip_nop: bool = True):
    """The next PDU, which must be a `kind` (NOP-In pings are answered and skipped)."""
    while True:
        pdu, data = ini.recv()
        if skip_nop and isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG and kind is not P.NopIn:
            if pdu.ttt != P.RESERVED_TAG:
                ini.send(P.NopOut(P.RESERVED_TAG, pdu.ttt, ini.cmd_sn, ini.exp_stat_sn, immediate=True))
            continue
        assert isinstance(pdu, kind), (pdu, kind)
        return pdu, data


def read_all(ini: RawInitiator, lba: int, blocks: int) -> bytes:
    status, sense, data = ini.command(cdb16(0x88, lba, blocks), read=blocks * 512)
    assert status == 0, (status, sense)
    return data


# ---------------------------------------------------------------- negotiation

def test_error_recovery_level_is_offered_per_target(target):
    for iqn, want in ((PLAIN, "0"), (ERL1, "1"), (ERL2, "2")):
        ini = connect(target, iqn, [("ErrorRecoveryLevel", "2")])
        assert ini.login_keys["ErrorRecoveryLevel"] == want
        ini.close()
    ini = connect(target, ERL2, [("ErrorRecoveryLevel", "1")])   # numeric-min: the lower one
    assert ini.login_keys["ErrorRecoveryLevel"] == "1"
    ini.close()


def test_snack_at_level_0_is_rejected(target):
    ini = connect(target, PLAIN)
    ini.send(P.Snack(ini._next_itt(), 1, exp_stat_sn=ini.exp_stat_sn, beg_run=0))
    pdu, _ = expect(ini, P.Reject)
    assert pdu.reason == P.REJECT_COMMAND_NOT_SUPPORTED
    ini.close()


# ---------------------------------------------------------------- RFC 7144

def test_rfc7144_task_management_over_iscsi(target):
    """QUERY TASK, QUERY TASK SET, QUERY ASYNCHRONOUS EVENT and I_T NEXUS RESET
    answered through iSCSI with RFC 7144's codes: "function succeeded" when the
    queried task or unit attention exists, "function complete" when not."""
    ini = connect(target, PLAIN, [("InitialR2T", "Yes"), ("ImmediateData", "No")])
    assert ini.tmf(P.TMF_QUERY_TASK, rtt=0x7777).response == P.TMF_RESP_COMPLETE
    assert ini.tmf(P.TMF_QUERY_TASK_SET).response == P.TMF_RESP_COMPLETE
    assert ini.tmf(P.TMF_QUERY_TASK_SET, lun=9).response == P.TMF_RESP_NO_LUN
    assert ini.tmf(P.TMF_QUERY_ASYNC_EVENT).response == P.TMF_RESP_COMPLETE
    cmd = write_cmd(ini, 10, 1)
    ini.send(cmd)
    r2t, _ = expect(ini, P.R2T)                     # the write waits for its data: in the task set
    assert ini.tmf(P.TMF_QUERY_TASK, rtt=cmd.itt).response == P.TMF_RESP_SUCCEEDED
    assert ini.tmf(P.TMF_QUERY_TASK_SET).response == P.TMF_RESP_SUCCEEDED
    reset = ini.tmf(P.TMF_I_T_NEXUS_RESET)
    assert reset.response == P.TMF_RESP_COMPLETE
    # the nexus lives on, with a unit attention that the reset left it; the answer
    # names it in bytes 8-10 (UADE depth 1, UNIT ATTENTION, I_T NEXUS LOSS OCCURRED)
    query = ini.tmf(P.TMF_QUERY_ASYNC_EVENT)
    assert query.response == P.TMF_RESP_SUCCEEDED
    assert query.info == bytes([0x16, 0x29, 0x07])
    assert ini.tmf(P.TMF_QUERY_TASK, rtt=cmd.itt).response == P.TMF_RESP_COMPLETE   # aborted
    status, sense, _ = ini.command(bytes(6))        # TEST UNIT READY reports it
    assert status == CHECK_CONDITION and (sense[12], sense[13]) == (0x29, 0x07)   # I_T NEXUS LOSS
    query = ini.tmf(P.TMF_QUERY_ASYNC_EVENT)
    assert query.response == P.TMF_RESP_COMPLETE and query.info == bytes(3)
    assert read_all(ini, 10, 1) == bytes(512)       # the reset aborted the write
    ini.close()


# ---------------------------------------------------------------- the CmdSN window

def test_outstanding_commands_never_exceed_the_window(target):
    """12 writes sent at once to a target whose window is 8: R2Ts come for the
    8 within MaxCmdSN (which stays shut while they are outstanding), the 4
    beyond are discarded; MaxCmdSN moves on as each completes."""
    ini = connect(target, NARROW, [("InitialR2T", "Yes"), ("ImmediateData", "No")])
    assert ini.max_cmd_sn == ini.cmd_sn + WINDOW - 1
    first = ini.cmd_sn
    blocks = {}
    cmds = []
    for i in range(WINDOW + 4):
        cmd = write_cmd(ini, 100 + i, 1)
        blocks[cmd.itt] = os.urandom(512)
        cmds.append(cmd)
        ini.send(cmd)
    r2ts = {}
    while len(r2ts) < WINDOW:
        r2t, _ = expect(ini, P.R2T)
        r2ts[r2t.itt] = r2t
        # MaxCmdSN stays where it was: every command within it is outstanding
        assert r2t.exp_cmd_sn <= first + WINDOW and r2t.max_cmd_sn == first + WINDOW - 1
    assert set(r2ts) == {c.itt for c in cmds[:WINDOW]}
    done = 0
    for itt, r2t in r2ts.items():
        data_out(ini, r2t, blocks[itt], 512)
        resp, _ = expect(ini, P.ScsiResponse)       # nothing else: no R2T for the 4 discarded
        done += 1
        assert (resp.itt, resp.status) == (itt, 0)
        assert resp.max_cmd_sn == first + WINDOW - 1 + done      # one more per completion
    ini.cmd_sn = first + WINDOW                    # the 4 beyond MaxCmdSN never ran
    for i, cmd in enumerate(cmds):
        want = blocks[cmd.itt] if i < WINDOW else bytes(512)
        assert read_all(ini, 100 + i, 1) == want
    ini.close()


# ---------------------------------------------------------------- ERL 1: digest errors

DIGESTS = [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"), ("ErrorRecoveryLevel", "1")]


def test_a_command_with_a_data_digest_error_is_rejected_and_retried(target):
    """The damaged command is discarded with a Reject that carries its header;
    its CmdSN is not taken, so the read sent behind it waits; the retry (same
    ITT and CmdSN) runs, then the read, which sees the retry's data."""
    ini = connect(target, ERL1, DIGESTS)
    assert ini.hd and ini.dd
    data = os.urandom(4096)
    cmd = write_cmd(ini, 20, 8, data)
    ini.send(cmd, data, bad_data=True)
    rej, hdr = expect(ini, P.Reject)
    assert rej.reason == P.REJECT_DATA_DIGEST_ERROR and hdr == cmd.encode()
    read = read_cmd(ini, 20, 8)
    ini.send(read)                                  # CmdSN after the hole: waits for it
    ini.send(cmd, data)                             # the retry plugs the hole
    resp, _ = expect(ini, P.ScsiResponse)
    assert (resp.itt, resp.status) == (cmd.itt, 0)
    got = bytearray()
    while True:
        pdu, seg = expect(ini, P.DataIn)
        assert pdu.itt == read.itt
        got += seg
        if pdu.status is not None:
            break
    assert bytes(got) == data and pdu.status == 0
    ini.close()


def _write_with_r2t(ini: RawInitiator, lba: int, data: bytes) -> tuple[P.ScsiCommand, P.R2T]:
    cmd = write_cmd(ini, lba, len(data) // 512)
    ini.send(cmd)
    r2t, _ = expect(ini, P.R2T)
    assert (r2t.itt, r2t.r2t_sn, r2t.buffer_offset, r2t.desired_length) == (cmd.itt, 0, 0, len(data))
    return cmd, r2t


@pytest.mark.parametrize("damage", ["data", "header"])
def test_lost_data_out_is_asked_for_again_by_a_recovery_r2t(target, damage):
    """Four Data-Out PDUs answer one R2T; the second is damaged (its data: a
    Reject with its header; its header: dropped unseen, the gap in offsets
    shows it). A recovery R2T (the next R2TSN, a new TTT) asks for everything
    from the lost PDU on; the data read back is whole."""
    ini = connect(target, ERL1, DIGESTS + [("InitialR2T", "Yes"), ("ImmediateData", "No")])
    data = os.urandom(16384)
    cmd, r2t = _write_with_r2t(ini, 40, data)
    data_out(ini, r2t, data, 4096, **({"bad": 1} if damage == "data" else {"bad_header": 1}))
    if damage == "data":
        rej, hdr = expect(ini, P.Reject)
        assert rej.reason == P.REJECT_DATA_DIGEST_ERROR
        assert P.decode_pdu(hdr)._replace(exp_stat_sn=0) == P.DataOut(cmd.itt, r2t.ttt, 1, 4096, False, 0,
                                                                      P.LUN0, 4096)
    again, _ = expect(ini, P.R2T)
    assert (again.itt, again.r2t_sn, again.buffer_offset, again.desired_length) == (cmd.itt, 1, 4096, 12288)
    assert again.ttt != r2t.ttt
    data_out(ini, again, data, 4096)
    resp, _ = expect(ini, P.ScsiResponse)
    assert (resp.itt, resp.status, resp.exp_data_sn) == (cmd.itt, 0, 2)   # two R2Ts
    assert read_all(ini, 40, 32) == data
    ini.close()


# ---------------------------------------------------------------- ERL 1: SNACK

def _read_pdus(ini: RawInitiator, cmd: P.ScsiCommand) -> list[tuple[P.DataIn, bytes]]:
    out = []
    while True:
        pdu, seg = expect(ini, P.DataIn)
        assert pdu.itt == cmd.itt
        out.append((pdu, seg))
        if pdu.status is not None:
            return out


def test_a_dropped_data_in_is_sent_again_on_snack(target):
    """A 16 KiB read in four Data-In PDUs; the initiator loses DataSN 1 and,
    before acknowledging the status, asks for it by a Data SNACK: the same PDU
    (DataSN, offset, length) comes again. A status SNACK brings the status
    again with its StatSN; once ExpStatSN acknowledges it, there is nothing
    left to ask for."""
    ini = connect(target, ERL1, DIGESTS + [("MaxRecvDataSegmentLength", "4096")])
    data = os.urandom(16384)
    ini.write16(60, data)
    ini.track_stat_sn = False                       # a hole: the status is not acknowledged
    cmd = read_cmd(ini, 60, 32)
    ini.send(cmd)
    pdus = _read_pdus(ini, cmd)
    assert [(p.data_sn, p.buffer_offset, len(d)) for p, d in pdus] == [
        (0, 0, 4096), (1, 4096, 4096), (2, 8192, 4096), (3, 12288, 4096)]
    lost = pdus.pop(1)
    status_sn = pdus[-1][0].stat_sn
    ini.send(P.Snack(cmd.itt, 0, exp_stat_sn=ini.exp_stat_sn, beg_run=1, run_length=1))
    again, seg = expect(ini, P.DataIn)
    assert (again.itt, again.data_sn, again.buffer_offset, seg) == (cmd.itt, 1, 4096, lost[1])
    got = bytearray(16384)
    for p, d in pdus + [(again, seg)]:
        got[p.buffer_offset:p.buffer_offset + len(d)] = d
    assert bytes(got) == data
    ini.send(P.Snack(0, 1, exp_stat_sn=ini.exp_stat_sn, beg_run=status_sn, run_length=1))
    st, seg = expect(ini, P.DataIn)                 # the status rode in the last Data-In
    assert (st.itt, st.stat_sn, st.status, st.data_sn, seg) == (cmd.itt, status_sn, 0, 3, data[12288:])
    ini.exp_stat_sn = (status_sn + 1) & 0xFFFFFFFF  # now acknowledged
    ini.track_stat_sn = True
    ini.send(P.Snack(cmd.itt, 0, exp_stat_sn=ini.exp_stat_sn, beg_run=1, run_length=1))
    rej, _ = expect(ini, P.Reject)
    assert rej.reason == P.REJECT_SNACK_REJECT
    ini.close()


def test_a_dropped_r2t_is_sent_again_on_snack(target):
    ini = connect(target, ERL1, DIGESTS + [("InitialR2T", "Yes"), ("ImmediateData", "No")])
    data = os.urandom(8192)
    cmd, lost = _write_with_r2t(ini, 80, data)      # the initiator never saw it
    ini.send(P.Snack(cmd.itt, 0, exp_stat_sn=ini.exp_stat_sn, beg_run=0, run_length=1))
    r2t, _ = expect(ini, P.R2T)
    assert r2t._replace(stat_sn=0) == lost._replace(stat_sn=0)   # the same R2T: TTT, R2TSN, range
    data_out(ini, r2t, data, 4096)
    resp, _ = expect(ini, P.ScsiResponse)
    assert (resp.itt, resp.status) == (cmd.itt, 0)
    assert read_all(ini, 80, 16) == data
    ini.close()


def test_data_ack_covers_data_in_up_to_its_begrun(target):
    """Past one burst, the Data-In ending each burst has the A bit and a TTT:
    a DataACK with that TTT acknowledges the data before BegRun, which can no
    longer be asked for; a DataACK with a TTT of nothing is refused."""
    ini = connect(target, ERL1, [("ErrorRecoveryLevel", "1"), ("MaxBurstLength", "8192"),
                                 ("FirstBurstLength", "8192"), ("MaxRecvDataSegmentLength", "8192")])
    data = os.urandom(24576)
    ini.write16(90, data, immediate_data=False)
    ini.track_stat_sn = False
    cmd = read_cmd(ini, 90, 48)
    ini.send(cmd)
    pdus = _read_pdus(ini, cmd)
    assert [(p.data_sn, p.final, p.ack) for p, _ in pdus] == [(0, True, True), (1, True, True),
                                                                 (2, True, False)]
    assert b"".join(d for _, d in pdus) == data
    ttt = pdus[0][0].ttt
    assert ttt != P.RESERVED_TAG and pdus[1][0].ttt == ttt
    ini.send(P.Snack(cmd.itt, 2, ttt=ttt, exp_stat_sn=ini.exp_stat_sn, beg_run=2, lun=P.LUN0))
    ini.send(P.Snack(cmd.itt, 0, exp_stat_sn=ini.exp_stat_sn, beg_run=0, run_length=1))
    rej, hdr = expect(ini, P.Reject)                # DataSN 0 is acknowledged: not again
    assert rej.reason == P.REJECT_SNACK_REJECT and P.decode_pdu(hdr).beg_run == 0
    ini.send(P.Snack(cmd.itt, 0, exp_stat_sn=ini.exp_stat_sn, beg_run=2, run_length=1))
    again, seg = expect(ini, P.DataIn)
    assert (again.data_sn, again.buffer_offset, seg) == (2, 16384, data[16384:])
    ini.send(P.Snack(cmd.itt, 2, ttt=0x12345, exp_stat_sn=ini.exp_stat_sn, beg_run=3))
    rej, _ = expect(ini, P.Reject)
    assert rej.reason == P.REJECT_INVALID_DATA_ACK
    ini.close()


# ---------------------------------------------------------------- ERL 2: connection recovery

ERL2_KEYS = [("ErrorRecoveryLevel", "2"), ("InitialR2T", "Yes"), ("ImmediateData", "No"),
             ("MaxRecvDataSegmentLength", "4096"), ("MaxConnections", "2")]


def test_tasks_of_a_killed_connection_are_reassigned_with_their_data_intact(target):
    """A write that got half its data and a read whose Data-In was mostly lost
    when the connection dies. A new connection of the session (the same CID:
    connection reinstatement) reassigns both: the read's Data-In come again
    from ExpDataSN with its status on a new StatSN, the write's missing half is
    asked for by an R2T; the data read back is whole."""
    ini = connect(target, ERL2, ERL2_KEYS)
    assert ini.login_keys["ErrorRecoveryLevel"] == "2"
    rdata, wdata = os.urandom(16384), os.urandom(8192)
    ini.write16(200, rdata, immediate_data=False)
    ini.track_stat_sn = False                       # nothing after this is acknowledged
    write = write_cmd(ini, 300, 16)
    ini.send(write)
    r2t, _ = expect(ini, P.R2T)
    first = P.R2T(r2t.itt, r2t.ttt, 0, 0, 0, 0, 0, 4096)
    data_out(ini, first._replace(desired_length=4096), wdata, 4096)   # half of it
    read = read_cmd(ini, 200, 32)
    ini.send(read)
    got, _ = expect(ini, P.DataIn)                  # DataSN 0 arrives; the rest is lost
    assert (got.itt, got.data_sn) == (read.itt, 0)
    ini.kill()

    new = RawInitiator(*_hostport(target.portal), isid=ini.isid)
    new.cmd_sn, new.exp_stat_sn = ini.cmd_sn, ini.exp_stat_sn
    resp = new.login(ERL2, tsih=ini.tsih, cid=0, extra=ERL2_KEYS)
    assert resp.status_class == 0 and resp.tsih == ini.tsih
    sn = resp.stat_sn
    tmf = new.tmf(P.TMF_TASK_REASSIGN, rtt=read.itt, exp_data_sn=1)
    assert (tmf.response, tmf.stat_sn) == (P.TMF_RESP_COMPLETE, sn + 1)
    buf = bytearray(16384)
    buf[:4096] = rdata[:4096]
    pdus = _read_pdus(new, read)
    assert [(p.data_sn, p.buffer_offset) for p, _ in pdus] == [(1, 4096), (2, 8192), (3, 12288)]
    for p, d in pdus:
        buf[p.buffer_offset:p.buffer_offset + len(d)] = d
    assert bytes(buf) == rdata and pdus[-1][0].status == 0 and pdus[-1][0].stat_sn == sn + 2

    tmf = new.tmf(P.TMF_TASK_REASSIGN, rtt=write.itt)
    assert (tmf.response, tmf.stat_sn) == (P.TMF_RESP_COMPLETE, sn + 3)
    again, _ = expect(new, P.R2T)
    assert (again.itt, again.r2t_sn, again.buffer_offset, again.desired_length) == (write.itt, 1, 4096, 4096)
    data_out(new, again, wdata, 4096)
    st, _ = expect(new, P.ScsiResponse)
    assert (st.itt, st.status, st.stat_sn) == (write.itt, 0, sn + 4)
    new.track_stat_sn = True
    new.exp_stat_sn = sn + 5
    assert read_all(new, 300, 16) == wdata
    # a task that is not orphaned is still allegiant; one that does not exist is not there
    assert new.tmf(P.TMF_TASK_REASSIGN, rtt=0x5555).response == P.TMF_RESP_NO_TASK
    new.close()


def test_a_logout_closing_a_session_with_a_failed_connection_ends_it_unlost(target):
    """ErrorRecoveryLevel 2: one connection dies with a write outstanding (its
    task kept for a reassign), then a Logout on the other closes the session.
    The session ends there, as one the initiator ended: the same ISID's next
    session hears no I_T NEXUS LOSS OCCURRED (it had waited for Time2Retain
    or a reinstatement, which then ended it as lost: review 11, 0234)."""
    a = connect(target, ERL2, ERL2_KEYS)
    b = RawInitiator(*_hostport(target.portal), isid=a.isid)
    b.cmd_sn = a.cmd_sn
    assert b.login(ERL2, tsih=a.tsih, cid=1, extra=ERL2_KEYS).status_class == 0
    failed = re.compile(rf"connection CID 0 of TSIH {a.tsih} failed")
    ended = re.compile(rf"session ended: .*, TSIH {a.tsih}\b")

    def wait_for(line: re.Pattern, seen: int) -> None:
        deadline = time.monotonic() + 20
        while len(line.findall(target.log())) == seen:
            assert time.monotonic() < deadline, target.log()[-3000:]
            time.sleep(0.05)
    seen = len(failed.findall(target.log())), len(ended.findall(target.log()))
    a.send(write_cmd(a, 500, 1))
    expect(a, P.R2T)
    a.kill()
    wait_for(failed, seen[0])
    b.cmd_sn = a.cmd_sn
    assert b.logout(reason=0, cid=1).response == 0
    b.close()
    wait_for(ended, seen[1])                         # before the next login (else it reinstates)
    again = connect(target, ERL2, ERL2_KEYS, isid=a.isid)
    status, sense, _ = again.command(bytes(6))
    assert status == 0, sense.hex()
    again.close()


def test_reassign_is_refused_below_level_2(target):
    ini = connect(target, ERL1, [("ErrorRecoveryLevel", "1")])
    assert ini.tmf(P.TMF_TASK_REASSIGN, rtt=1).response == P.TMF_RESP_NO_REASSIGN
    ini.close()


@pytest.mark.slow
def test_tasks_nobody_reassigns_are_dropped_when_time2retain_expires(target):
    """Two connections; the one with every command of the window outstanding
    dies. Until Time2Wait + Time2Retain pass the window stays shut; then the
    tasks are dropped (aborted: their data is never written), a NOP-In tells
    the other connection the window is open, and a reassign finds nothing."""
    keys = ERL2_KEYS + [("DefaultTime2Retain", "1"), ("DefaultTime2Wait", "0")]
    a = connect(target, ERL2, keys)
    assert a.login_keys["DefaultTime2Retain"] == "1"
    b = RawInitiator(*_hostport(target.portal), isid=a.isid)
    b.cmd_sn = a.cmd_sn
    assert b.login(ERL2, tsih=a.tsih, cid=1, extra=keys).status_class == 0
    cmds = []
    for i in range(ERL2_WINDOW):
        cmd = write_cmd(a, 400 + i, 1)
        a.send(cmd)
        cmds.append(cmd)
    for _ in cmds:
        expect(a, P.R2T)
    shut = a.cmd_sn - 1
    a.kill()
    nop, _ = expect(b, P.NopIn)                    # after Time2Wait + Time2Retain
    while nop.ttt != P.RESERVED_TAG:               # (answer pings meanwhile)
        b.send(P.NopOut(P.RESERVED_TAG, nop.ttt, b.cmd_sn, b.exp_stat_sn, immediate=True))
        nop, _ = expect(b, P.NopIn)
    assert nop.itt == P.RESERVED_TAG and nop.max_cmd_sn == shut + ERL2_WINDOW
    b.cmd_sn = a.cmd_sn
    for cmd in cmds:
        assert b.tmf(P.TMF_TASK_REASSIGN, rtt=cmd.itt).response == P.TMF_RESP_NO_TASK
    for i in range(ERL2_WINDOW):
        assert read_all(b, 400 + i, 1) == bytes(512)
    b.close()


# ---------------------------------------------------------------- what a failed connection may keep

ERL2_ONLY = f"""
[[target]]
name = "{ERL2}"
error_recovery_level = 2
[[target.lun]]
backend = "ram"
size = "8MiB"
"""
LONG_WAIT = [("DefaultTime2Wait", "3600")]   # the initiator's choice (negotiated to the larger)


@pytest.fixture
def small_target(tmp_path):
    """An ERL 2 target of its own with the smallest buffer budget (room for 8
    connections' shares) and at most 2 failed connections kept per host."""
    from fetd_tcp.limits import MIN_BUFFERED
    (tmp_path / "target.toml").write_text(ERL2_ONLY)
    (tmp_path / "data").mkdir()
    env = {"SCSI_TARGET_MAX_BUFFERED": str(MIN_BUFFERED), "SCSI_TARGET_MAX_FAILED_PER_HOST": "2"}
    with Target(config=str(tmp_path / "target.toml"), data_dir=str(tmp_path / "data"), env=env) as t:
        yield t


def _outstanding_write(ini: RawInitiator, lba: int) -> P.ScsiCommand:
    """A write whose data the target has asked for (R2T) and never gets."""
    cmd = write_cmd(ini, lba, 8)
    ini.send(cmd)
    expect(ini, P.R2T)
    return cmd


def test_a_failed_connection_without_tasks_gives_back_its_share_at_once(small_target):
    """Review 2, finding 1: ten ERL 2 logins that each asked DefaultTime2Wait=3600
    and were cut at once, with no task outstanding. Nothing is kept for them: the
    next login (of another initiator) is admitted and works, where the budget used
    to be held by the dead connections for an hour ("buffer budget full"), and
    their sessions are over (continuing one is refused: no such session)."""
    dead = []
    for _ in range(10):    # more than the 8 shares the budget has
        ini = connect(small_target, ERL2, ERL2_KEYS + LONG_WAIT)
        assert ini.login_keys["DefaultTime2Wait"] == "3600"
        ini.kill()
        dead.append(ini)
    other = RawInitiator(*_hostport(small_target.portal), initiator="iqn.2026-11.org.test:other")
    assert other.login(ERL2, extra=ERL2_KEYS).status_class == 0
    other.write16(10, b"\x5a" * 4096, immediate_data=False)
    assert other.read16(10, 8) == b"\x5a" * 4096
    again = RawInitiator(*_hostport(small_target.portal), isid=dead[0].isid)
    resp = again.login(ERL2, tsih=dead[0].tsih, cid=0, extra=ERL2_KEYS)
    assert (resp.status_class, resp.status_detail) == (2, 0x0A)   # session does not exist
    other.close()


def test_failed_connections_kept_for_reassign_are_capped_per_host(small_target):
    """Four sessions from one host, each cut with a write outstanding (their
    tasks wait for a TASK REASSIGN): only the 2 newest failed connections are
    kept (SCSI_TARGET_MAX_FAILED_PER_HOST); the older ones' tasks are dropped at
    once and their emptied sessions end. The newest one's write is reassigned
    and completes; another initiator logs in meanwhile."""
    sessions = []
    for i in range(4):
        ini = connect(small_target, ERL2, ERL2_KEYS + LONG_WAIT)
        sessions.append((ini, _outstanding_write(ini, 100 + 8 * i)))
        ini.kill()
    other = RawInitiator(*_hostport(small_target.portal), initiator="iqn.2026-11.org.test:other")
    assert other.login(ERL2, extra=ERL2_KEYS).status_class == 0
    assert other.read16(0, 1) == bytes(512)

    oldest, _ = sessions[0]
    again = RawInitiator(*_hostport(small_target.portal), isid=oldest.isid)
    resp = again.login(ERL2, tsih=oldest.tsih, cid=0, extra=ERL2_KEYS)
    assert (resp.status_class, resp.status_detail) == (2, 0x0A)

    newest, write = sessions[3]
    new = RawInitiator(*_hostport(small_target.portal), isid=newest.isid)
    new.cmd_sn, new.exp_stat_sn = newest.cmd_sn, newest.exp_stat_sn
    resp = new.login(ERL2, tsih=newest.tsih, cid=0, extra=ERL2_KEYS)
    assert resp.status_class == 0 and resp.tsih == newest.tsih
    assert new.tmf(P.TMF_TASK_REASSIGN, rtt=write.itt).response == P.TMF_RESP_COMPLETE
    r2t, _ = expect(new, P.R2T)
    data = os.urandom(4096)
    data_out(new, r2t, data, 4096)
    st, _ = expect(new, P.ScsiResponse)
    assert (st.itt, st.status) == (write.itt, 0)
    assert read_all(new, 124, 8) == data
    new.close()
    other.close()


def test_failed_connections_kept_for_reassign_are_capped_per_session(target):
    """One session (MaxConnections=2) whose connections CID 0, 1 and 2 are each
    cut with a write outstanding: it keeps at most MaxConnections failed
    connections, so CID 0's task is dropped when CID 2 fails; CID 2's is still
    reassigned."""
    keys = ERL2_KEYS + LONG_WAIT
    first = connect(target, ERL2, keys)
    writes = []
    for cid in range(3):
        ini = first if cid == 0 else RawInitiator(*_hostport(target.portal), isid=first.isid)
        if cid:
            ini.cmd_sn, ini.itt = first.cmd_sn, first.itt
            assert ini.login(ERL2, tsih=first.tsih, cid=cid, extra=keys).status_class == 0
        writes.append(_outstanding_write(ini, 500 + 8 * cid))
        first.cmd_sn, first.itt = ini.cmd_sn, ini.itt
        ini.kill()
    new = RawInitiator(*_hostport(target.portal), isid=first.isid)
    new.cmd_sn = first.cmd_sn
    assert new.login(ERL2, tsih=first.tsih, cid=3, extra=keys).status_class == 0
    assert new.tmf(P.TMF_TASK_REASSIGN, rtt=writes[0].itt).response == P.TMF_RESP_NO_TASK
    assert new.tmf(P.TMF_TASK_REASSIGN, rtt=writes[2].itt).response == P.TMF_RESP_COMPLETE
    r2t, _ = expect(new, P.R2T)
    data_out(new, r2t, bytes(range(256)) * 16, 4096)
    st, _ = expect(new, P.ScsiResponse)
    assert (st.itt, st.status) == (writes[2].itt, 0)
    new.logout()
    new.close()


def test_logout_for_recovery_tells_the_times_the_target_keeps(target):
    """DefaultTime2Wait=3600 was negotiated, but the target keeps a failed
    connection's tasks for at most SCSI_TARGET_MAX_RETAIN (60 s). A Logout
    "remove the connection for recovery" answers with its own Time2Wait and
    Time2Retain (RFC 7143 11.15.2-3) within that: 40 + 20, not 3600 + 20 (the
    initiator would wait an hour for tasks dropped after a minute). The write
    is then reassigned on the other connection and completes."""
    keys = ERL2_KEYS + LONG_WAIT
    a = connect(target, ERL2, keys)
    assert a.login_keys["DefaultTime2Wait"] == "3600"    # Time2Retain: 20, the default
    write = _outstanding_write(a, 700)
    b = RawInitiator(*_hostport(target.portal), isid=a.isid)
    b.cmd_sn, b.itt = a.cmd_sn, a.itt
    assert b.login(ERL2, tsih=a.tsih, cid=1, extra=keys).status_class == 0
    lo = b.logout(reason=2, cid=0)
    assert (lo.response, lo.time2wait, lo.time2retain) == (0, 40, 20)
    a.kill()
    assert b.tmf(P.TMF_TASK_REASSIGN, rtt=write.itt).response == P.TMF_RESP_COMPLETE
    r2t, _ = expect(b, P.R2T)
    data = os.urandom(4096)
    data_out(b, r2t, data, 4096)
    st, _ = expect(b, P.ScsiResponse)
    assert (st.itt, st.status) == (write.itt, 0)
    assert read_all(b, 700, 8) == data
    b.logout()
    b.close()
