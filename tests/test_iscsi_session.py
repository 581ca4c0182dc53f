"""Session-level iSCSI behaviour, driven PDU by PDU with a raw initiator."""
from __future__ import annotations

import os
import shutil
import signal
import struct

import pytest

from fetd_tcp import pdu as P
from support.procs import run
from support.rawiscsi import RawInitiator
from support.target import IQN, Target


def _hostport(portal: str) -> tuple[str, int]:
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.fixture(scope="module")
def target():
    with Target("--lun", "ram:16MiB") as t:
        yield t


def test_two_connections_in_one_session(target):
    host, port = _hostport(target.portal)
    a = RawInitiator(host, port)
    resp = a.login(IQN, extra=[("MaxConnections", "2")])
    assert resp.status_class == 0 and resp.tsih != 0
    assert a.login_keys.get("MaxConnections") == "2"
    b = RawInitiator(host, port, isid=a.isid)
    b.cmd_sn = a.cmd_sn
    resp_b = b.login(IQN, tsih=resp.tsih, cid=1, extra=[("MaxConnections", "2")])
    assert resp_b.status_class == 0 and resp_b.tsih == resp.tsih
    data = os.urandom(8192)
    a.write16(100, data)
    b.cmd_sn = a.cmd_sn            # one CmdSN space for the whole session
    assert b.read16(100, 16) == data
    a.cmd_sn = b.cmd_sn
    lo = b.logout(reason=1, cid=1)   # close just this connection
    assert lo.response == 0
    a.cmd_sn = b.cmd_sn
    assert a.read16(100, 16) == data  # the session lives on its other connection
    a.close()
    b.close()


def test_joining_a_missing_session_fails(target):
    host, port = _hostport(target.portal)
    r = RawInitiator(host, port)
    resp = r.login(IQN, tsih=0x7777, cid=1)
    assert (resp.status_class, resp.status_detail) == (2, 0x0A)   # session does not exist
    r.close()


def test_session_reinstatement_closes_the_old_session(target):
    host, port = _hostport(target.portal)
    old = RawInitiator(host, port)
    old.login(IQN)
    new = RawInitiator(host, port, isid=old.isid)
    resp = new.login(IQN)
    assert resp.status_class == 0
    with pytest.raises(ConnectionError):   # closed: a timeout (OSError) would not do
        old.nop(b"x")
    assert _nexus_loss(new)                # the old session's I_T nexus was lost (0234)
    assert new.read16(0, 1) == new.read16(0, 1)
    new.close()


def _nexus_loss(ini: RawInitiator) -> bool:
    """Whether a TEST UNIT READY gets I_T NEXUS LOSS OCCURRED (06/29/07)."""
    status, sense, _ = ini.command(bytes(6))
    return status == 2 and (sense[2] & 0x0F, sense[12], sense[13]) == (0x06, 0x29, 0x07)


def test_one_isid_in_two_portal_groups_is_two_sessions():
    """An initiator may use one ISID in two portal groups (ESXi's software
    iSCSI does, one ISID per bound NIC): two I_T nexuses, two sessions, where
    the second login used to reinstate (end) the first, and each path's
    reconnect then ended the other. A connection may join a session only
    through its portal group; reinstatement stays within one group."""
    with Target("--lun", "ram:16MiB", portals=("127.0.0.1:0", "127.0.0.1:0,2")) as t:
        (h1, p1), (h2, p2) = (_hostport(p) for p in t.portals)
        isid = b"\x40\x00\x01\x37\x00\x00"
        esx = "iqn.1998-01.com.vmware:esx-1"
        one, two = RawInitiator(h1, p1, initiator=esx, isid=isid), RawInitiator(h2, p2, initiator=esx, isid=isid)
        try:
            assert one.login(IQN).status_class == 0 and two.login(IQN).status_class == 0
            assert one.read16(0, 1) == two.read16(0, 1)              # both paths live
            stray = RawInitiator(h2, p2, initiator=esx, isid=isid)   # joins tpg 1's session via tpg 2
            resp = stray.login(IQN, tsih=one.tsih, cid=1)
            assert (resp.status_class, resp.status_detail) == (2, 0x0A)
            stray.close()
            again = RawInitiator(h1, p1, initiator=esx, isid=isid)   # reinstates tpg 1's session only
            assert again.login(IQN).status_class == 0
            with pytest.raises(ConnectionError):   # closed: a timeout (OSError) would not do
                one.nop(b"x")
            assert _nexus_loss(again) and not _nexus_loss(two)   # tpg 2's nexus lost nothing
            assert again.read16(0, 1) == two.read16(0, 1)
            again.close()
        finally:
            one.close()
            two.close()


def test_nop_out_is_echoed(target):
    host, port = _hostport(target.portal)
    r = RawInitiator(host, port)
    r.login(IQN)
    pdu, data = r.nop(b"ping-payload")
    assert isinstance(pdu, P.NopIn) and pdu.itt == r.itt and data == b"ping-payload"
    r.close()


def test_discovery_session_refuses_scsi(target):
    host, port = _hostport(target.portal)
    r = RawInitiator(host, port)
    r.login(None, session_type="Discovery")
    pairs = r.text([("SendTargets", "All")])
    assert ("TargetName", IQN) in pairs
    r.send(P.ScsiCommand(99, P.int_to_lun(0), bytes(16), 0, r.cmd_sn, r.exp_stat_sn))
    pdu, data = r.recv()
    assert isinstance(pdu, P.Reject) and pdu.reason == P.REJECT_PROTOCOL_ERROR
    r.close()


def test_wildcard_portal_reports_the_address_used():
    with Target("--lun", "ram:4MiB", portals=("0.0.0.0:0",)) as t:
        port = _hostport(t.portal)[1]
        r = RawInitiator("127.0.0.1", port)
        r.login(None, session_type="Discovery")
        pairs = r.text([("SendTargets", "All")])
        assert ("TargetAddress", f"127.0.0.1:{port},1") in pairs
        r.close()


@pytest.mark.skipif(not shutil.which("iscsi-inq"), reason="libiscsi-bin is not installed")
def test_ipv6_portal():
    with Target("--lun", "ram:4MiB", portals=("[::1]:0",)) as t:
        assert t.portal.startswith("[::1]:")
        out = run(["iscsi-inq", f"iscsi://{t.portal}/{IQN}/0"]).stdout
        assert "Vendor:SCSITGT" in out
        r = RawInitiator("::1", _hostport(t.portal)[1])
        r.login(None, session_type="Discovery")
        assert ("TargetAddress", f"{t.portal},1") in r.text([("SendTargets", "All")])
        r.close()


def test_shutdown_asks_initiators_to_log_out():
    t = Target("--lun", "ram:4MiB")
    try:
        host, port = _hostport(t.portal)
        r = RawInitiator(host, port)
        r.login(IQN)
        os.kill(t.proc.pid, signal.SIGTERM)
        pdu, _ = r.recv()
        assert isinstance(pdu, P.AsyncMessage) and pdu.event == P.ASYNC_LOGOUT_REQUEST
        r.close()
    finally:
        t.stop()


def test_async_message_takes_its_own_stat_sn():
    """An Async Message is numbered like any status (RFC 7143 4.2.2.2; LIO
    advances StatSN for it, open-iscsi sets ExpStatSN past it): the response
    after it carries the next StatSN, never the Async Message's again."""
    from support.cli import mgmt
    with Target("--lun", "ram:4MiB") as t:
        r = RawInitiator(*_hostport(t.portal))
        try:
            r.login(IQN)
            before, _ = r.nop(b"a")
            mgmt(t.data_dir, "lun", "add", "--target", IQN, "ram:4MiB")   # REPORTED LUNS DATA HAS CHANGED
            aen, _ = r.recv()
            assert isinstance(aen, P.AsyncMessage) and aen.event == P.ASYNC_SCSI_EVENT
            after, _ = r.nop(b"b")
            assert isinstance(after, P.NopIn)
            assert (aen.stat_sn, after.stat_sn) == ((before.stat_sn + 1) % (1 << 32), (before.stat_sn + 2) % (1 << 32))
        finally:
            r.close()


def test_send_targets_in_a_normal_session_behind_discovery_chap(tmp_path):
    """With discovery CHAP on, a Normal session to an open target answered
    SendTargets=OTHER with the other target's addresses, which discovery
    tells only initiators holding the discovery secret: a Normal session
    now answers for its own target only (RFC 7143 Appendix C; decision 0212)."""
    other = "iqn.2026-11.org.scsi-target:other"
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'discovery_chap = {{user = "d", secret = "discovery-secret"}}\n'
                   f'[[target]]\nname = "{IQN}"\n[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n'
                   f'[[target]]\nname = "{other}"\n[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    with Target(config=str(cfg)) as t:
        r = RawInitiator(*_hostport(t.portal))
        try:
            assert r.login(IQN).status_class == 0
            assert r.text([("SendTargets", other)]) == []
            assert r.text([("SendTargets", "")]) == [("TargetName", IQN), ("TargetAddress", f"{t.portal},1")]
        finally:
            r.close()


def test_initiator_name_case_does_not_make_another_session(target):
    """iSCSI names compare without case (RFC 3722): a login as "IQN...:Host"
    and one as "iqn...:host" with the same ISID are one session identity, so
    the second reinstates the first (decision 0214); it used to make a second
    session, a second I_T nexus for one initiator port."""
    host, port = _hostport(target.portal)
    old = RawInitiator(host, port, initiator="IQN.2026-11.ORG.TEST:Case-Host")
    try:
        assert old.login(IQN).status_class == 0
        new = RawInitiator(host, port, initiator="iqn.2026-11.org.test:case-host", isid=old.isid)
        assert new.login(IQN, extra=[("MaxConnections", "2")]).status_class == 0
        with pytest.raises(ConnectionError):   # closed: not a timeout (an OSError too)
            old.nop(b"x")
        # a connection that joins the session may spell the name either way too
        more = RawInitiator(host, port, initiator="IQN.2026-11.org.test:CASE-HOST", isid=old.isid)
        more.cmd_sn = new.cmd_sn
        resp = more.login(IQN, tsih=new.tsih, cid=1, extra=[("MaxConnections", "2")])
        assert resp.status_class == 0 and resp.tsih == new.tsih
        more.close()
        new.close()
    finally:
        old.close()


# what libiscsi (qemu's iSCSI driver) offers at login
LIBISCSI_OFFER = [("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
                  ("FirstBurstLength", "262144"), ("MaxOutstandingR2T", "1"),
                  ("MaxRecvDataSegmentLength", "262144")]


def test_a_1mib_write_at_libiscsis_offer_takes_three_r2ts(target):
    """libiscsi offers FirstBurstLength 256 KiB and the target takes it: a 1 MiB
    write sends its first 256 KiB as immediate data and the rest is asked for by
    three R2Ts of MaxBurstLength, one outstanding at a time (R2TSN 0, 1, 2), each
    answered by one Data-Out; the data reads back."""
    ini = RawInitiator(*_hostport(target.portal))
    assert ini.login(IQN, extra=LIBISCSI_OFFER).status_class == 0
    assert (ini.login_keys["FirstBurstLength"], ini.login_keys["MaxBurstLength"]) == ("262144", "262144")
    assert ini.login_keys["MaxOutstandingR2T"] == "1"
    ini.command(bytes(6))
    data = os.urandom(1 << 20)
    lba, burst = 2048, 262144
    itt = ini._next_itt()
    cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0)
    ini.send(P.ScsiCommand(itt, P.LUN0, cdb, len(data), ini.cmd_sn, ini.exp_stat_sn, write=True,
                           final=False, data_length=burst), data[:burst])
    ini.cmd_sn += 1
    r2ts = []
    while True:
        pdu, _ = ini.recv()
        if isinstance(pdu, P.R2T):
            r2ts.append((pdu.r2t_sn, pdu.buffer_offset, pdu.desired_length))
            chunk = data[pdu.buffer_offset:pdu.buffer_offset + pdu.desired_length]
            ini.send(P.DataOut(itt, pdu.ttt, 0, pdu.buffer_offset, True, ini.exp_stat_sn, P.LUN0,
                               len(chunk)), chunk)
        else:
            assert isinstance(pdu, P.ScsiResponse) and pdu.status == 0, pdu
            break
    assert r2ts == [(0, burst, burst), (1, 2 * burst, burst), (2, 3 * burst, burst)]
    assert ini.read16(lba, len(data) // 512) == data
    ini.close()
