"""iSCSI beyond ErrorRecoveryLevel 0, driven PDU by PDU against a real target:
RFC 7144 task management, the CmdSN window, digest errors, SNACK, connection
recovery with TASK REASSIGN, and Time2Retain (issue 24)."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from fetd_tcp import pdu as P
from rawiscsi import RawInitiator
from targetproc import Target

PLAIN = "iqn.2026-11.org.scsi-target:plain"      # defaults: ERL 0, window 128
ERL1 = "iqn.2026-11.org.scsi-target:erl1"
ERL2 = "iqn.2026-11.org.scsi-target:erl2"
NARROW = "iqn.2026-11.org.scsi-target:narrow"    # a window of 8 commands
WINDOW = 8
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
    # the nexus lives on, with a unit attention that the reset left it
    assert ini.tmf(P.TMF_QUERY_ASYNC_EVENT).response == P.TMF_RESP_SUCCEEDED
    assert ini.tmf(P.TMF_QUERY_TASK, rtt=cmd.itt).response == P.TMF_RESP_COMPLETE   # aborted
    status, sense, _ = ini.command(bytes(6))        # TEST UNIT READY reports it
    assert status == CHECK_CONDITION and (sense[12], sense[13]) == (0x29, 0x07)   # I_T NEXUS LOSS
    assert ini.tmf(P.TMF_QUERY_ASYNC_EVENT).response == P.TMF_RESP_COMPLETE
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
