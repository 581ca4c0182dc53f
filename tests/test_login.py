"""Full logins driven through LoginMachine with PDUs built by pdu.py."""

import pytest

from fetd_tcp import chap, login, pdu
from fetd_tcp.chap import Credentials, Secret
from fetd_tcp.keys import TargetKeys
from fetd_tcp.login import (Complete, Decide, Fail, LoginConfig, LoginMachine, Send,
                            TargetConfig, send_targets)

INAME = "iqn.1994-05.com.redhat:client"
TNAME = "iqn.2024-01.org.example:disk1"
ISID = b"\x80\x00\x00\x01\x02\x03"
ISEC = Secret("initiator-secret-12")
TSEC = Secret("target-secret-3456")
OPS = [("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"), ("InitialR2T", "Yes"),
       ("ImmediateData", "Yes"), ("MaxRecvDataSegmentLength", "65536"),
       ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144"),
       ("MaxConnections", "1"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
       ("MaxOutstandingR2T", "1"), ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
       ("ErrorRecoveryLevel", "0"), ("IFMarker", "No"), ("OFMarker", "No")]


def config(**target_kw):
    return LoginConfig(targets=(TargetConfig(TNAME, alias="disk one", **target_kw),
                                TargetConfig("iqn.2024-01.org.example:private",
                                             allowed_initiators=frozenset({"iqn.other"}))),
                       portal_group_tag=7)


class Initiator:
    """Just enough of an initiator to drive the machine."""

    def __init__(self, cfg, tsih=0):
        self.machine = LoginMachine(cfg, stat_sn=1000, random=lambda n: bytes(range(1, n + 1)))
        self.exp_stat_sn = 0
        self.tsih = tsih

    def send(self, pairs, csg, nsg=0, transit=False, cont=False, raw=None):
        data = raw if raw is not None else pdu.encode_text(pairs)
        hdr = pdu.LoginRequest(itt=5, isid=ISID, tsih=self.tsih, cid=1, cmd_sn=10,
                               exp_stat_sn=self.exp_stat_sn, csg=csg, nsg=nsg,
                               transit=transit, cont=cont, data_length=len(data)).encode()
        event = self.machine.receive(pdu.decode_pdu(hdr), data)
        if isinstance(event, Decide):
            self.decided = event.outcome
            event = self.machine.accept(tsih=0x42)
        self.event = event
        resp = pdu.decode_pdu(event.header)
        assert resp.itt == 5 and resp.isid == ISID
        assert resp.exp_cmd_sn == 10 and resp.max_cmd_sn == 10 + 31
        self.exp_stat_sn = resp.stat_sn + 1
        return resp, dict(pdu.decode_text(event.data))


def first_pairs(session="Normal", target=TNAME, auth="None"):
    pairs = [("InitiatorName", INAME), ("InitiatorAlias", "client"), ("SessionType", session)]
    if target:
        pairs.append(("TargetName", target))
    if auth:
        pairs.append(("AuthMethod", auth))
    return pairs


def test_no_auth_full_login():
    i = Initiator(config())
    resp, keys = i.send(first_pairs(), csg=0, nsg=1, transit=True)
    assert resp.status_class == 0 and resp.transit and resp.csg == 0 and resp.nsg == 1
    assert resp.stat_sn == 1000
    assert keys == {"AuthMethod": "None", "TargetPortalGroupTag": "7",
                    "TargetAlias": "disk one"}
    resp, keys = i.send(OPS, csg=1, nsg=3, transit=True)
    assert isinstance(i.event, Complete)
    assert resp.transit and resp.nsg == 3 and resp.tsih == 0x42 and resp.stat_sn == 1001
    assert keys["MaxRecvDataSegmentLength"] == "262144"
    assert keys["HeaderDigest"] == "CRC32C" and keys["InitialR2T"] == "Yes"
    assert keys["MaxBurstLength"] == "262144" and keys["FirstBurstLength"] == "262144"
    assert keys["OFMarker"] == "No"
    out = i.event.outcome
    assert i.decided.tsih == 0 and out.tsih == 0x42
    assert out.session_type == "Normal" and out.target.name == TNAME
    assert out.initiator_name == INAME and out.initiator_alias == "client"
    assert out.isid == ISID and out.cid == 1 and out.cmd_sn == 10 and out.stat_sn == 1002
    assert out.connection.header_digest and not out.connection.data_digest
    assert out.connection.max_send_data_segment_length == 65536
    assert out.session.initial_r2t and out.session.max_burst_length == 262144
    assert out.session.default_time2retain == 0


def test_skip_security_stage():
    i = Initiator(config())
    resp, keys = i.send(first_pairs(auth=None) + OPS, csg=1, nsg=3, transit=True)
    assert isinstance(i.event, Complete) and resp.csg == 1 and resp.nsg == 3
    assert keys["TargetPortalGroupTag"] == "7"


def test_security_straight_to_full_feature():
    i = Initiator(config())
    resp, keys = i.send(first_pairs(), csg=0, nsg=3, transit=True)
    assert isinstance(i.event, Complete) and keys["MaxRecvDataSegmentLength"] == "262144"


def test_target_does_not_transit_without_t():
    i = Initiator(config())
    resp, _ = i.send(first_pairs(), csg=0, nsg=1, transit=False)
    assert not resp.transit and isinstance(i.event, Send)
    resp, _ = i.send([], csg=0, nsg=1, transit=True)
    assert resp.transit and resp.nsg == 1
    resp, _ = i.send(OPS, csg=1, nsg=3, transit=False)
    assert not resp.transit
    resp, _ = i.send([], csg=1, nsg=3, transit=True)
    assert isinstance(i.event, Complete)


def chap_login(cfg, mutual=False, secret=ISEC, user="iqn.user"):
    i = Initiator(cfg)
    resp, keys = i.send(first_pairs(auth="CHAP,None"), csg=0, nsg=1, transit=True)
    assert keys["AuthMethod"] == "CHAP" and not resp.transit
    resp, keys = i.send([("CHAP_A", "7,5")], csg=0, nsg=1, transit=True)
    assert keys["CHAP_A"] == "7" and not resp.transit
    r = chap.response(7, int(keys["CHAP_I"]), secret, chap.decode_binary(keys["CHAP_C"]))
    pairs = [("CHAP_N", user), ("CHAP_R", chap.encode_binary(r))]
    if mutual:
        pairs += [("CHAP_I", "3"), ("CHAP_C", "0x" + "5a" * 16)]
    return i, i.send(pairs, csg=0, nsg=1, transit=True)


def test_chap_one_way():
    i, (resp, keys) = chap_login(config(chap=Credentials("iqn.user", ISEC)))
    assert resp.status_class == 0 and resp.transit and resp.nsg == 1 and keys == {}
    i.send(OPS, csg=1, nsg=3, transit=True)
    assert isinstance(i.event, Complete) and i.event.outcome.auth_method == "CHAP"


def test_chap_mutual():
    cfg = config(chap=Credentials("iqn.user", ISEC),
                 mutual_chap=Credentials("iqn.target", TSEC))
    i, (resp, keys) = chap_login(cfg, mutual=True)
    assert resp.transit and keys["CHAP_N"] == "iqn.target"
    assert chap.decode_binary(keys["CHAP_R"]) == chap.response(7, 3, TSEC, b"\x5a" * 16)


def test_chap_wrong_secret():
    i, (resp, keys) = chap_login(config(chap=Credentials("iqn.user", ISEC)),
                                 secret=Secret("not-the-secret"))
    assert isinstance(i.event, Fail) and i.event.status == login.AUTHENTICATION_FAILURE
    assert (resp.status_class, resp.status_detail) == (2, 1)
    assert "initiator-secret" not in i.event.reason


def test_chap_mutual_not_configured():
    i, _ = chap_login(config(chap=Credentials("iqn.user", ISEC)), mutual=True)
    assert i.event.status == login.AUTHENTICATION_FAILURE


def test_chap_required_but_initiator_offers_none():
    i = Initiator(config(chap=Credentials("iqn.user", ISEC)))
    i.send(first_pairs(auth="None"), csg=0, nsg=1, transit=True)
    assert i.event.status == login.AUTHENTICATION_FAILURE


def test_chap_required_but_initiator_skips_security():
    i = Initiator(config(chap=Credentials("iqn.user", ISEC)))
    i.send(first_pairs(auth=None) + OPS, csg=1, nsg=3, transit=True)
    assert i.event.status == login.AUTHENTICATION_FAILURE
    i = Initiator(config(chap=Credentials("iqn.user", ISEC)))
    i.send(first_pairs(auth=None), csg=0, nsg=1, transit=True)
    assert i.event.status == login.AUTHENTICATION_FAILURE


@pytest.mark.parametrize("pairs,status", [
    (first_pairs(target="iqn.nope"), login.NOT_FOUND),
    (first_pairs(target="iqn.2024-01.org.example:private"), login.AUTHORIZATION_FAILURE),
    (first_pairs(target=None), login.MISSING_PARAMETER),
    ([("TargetName", TNAME)], login.MISSING_PARAMETER),
    (first_pairs(session="Bogus"), login.SESSION_TYPE_NOT_SUPPORTED),
    (first_pairs() + [("AuthMethod", "None")], login.INITIATOR_ERROR),
])
def test_first_request_failures(pairs, status):
    i = Initiator(config())
    resp, keys = i.send(pairs, csg=0, nsg=1, transit=True)
    assert isinstance(i.event, Fail) and i.event.status == status
    assert (resp.status_class << 8 | resp.status_detail) == status and keys == {}
    assert isinstance(i.machine.receive(pdu.LoginRequest(itt=1, isid=ISID), b""), Fail)


def test_key_offered_twice_across_pdus():
    i = Initiator(config())
    i.send(first_pairs() + [("MaxBurstLength", "65536")], csg=0, nsg=1, transit=True)
    i.send([("MaxBurstLength", "65536")], csg=1, nsg=3, transit=True)
    assert i.event.status == login.INITIATOR_ERROR


def test_unsupported_version():
    m = LoginMachine(config(), 1)
    data = pdu.encode_text(first_pairs())
    ev = m.receive(pdu.LoginRequest(itt=1, isid=ISID, version_max=2, version_min=1,
                                    data_length=len(data)), data)
    assert isinstance(ev, Fail) and ev.status == login.UNSUPPORTED_VERSION


def test_bad_transitions_and_headers():
    i = Initiator(config())
    i.send(first_pairs(), csg=1, nsg=0, transit=True)
    assert i.event.status == login.INITIATOR_ERROR
    i = Initiator(config())
    i.send(first_pairs(), csg=3, nsg=3, transit=True)
    assert i.event.status == login.INITIATOR_ERROR
    i = Initiator(config())
    i.send(first_pairs(), csg=0, nsg=1, transit=True)
    i.exp_stat_sn += 5
    i.send(OPS, csg=1, nsg=3, transit=True)
    assert i.event.status == login.INITIATOR_ERROR
    i = Initiator(config())
    i.send(first_pairs(), csg=0, nsg=1, transit=True, cont=True)
    assert i.event.status == login.INITIATOR_ERROR
    i = Initiator(config())
    i.send([], csg=0, raw=b"InitiatorName\0")
    assert i.event.status == login.INITIATOR_ERROR


def test_multi_pdu_continue():
    i = Initiator(config())
    data = pdu.encode_text(first_pairs())
    cut = data.index(b"=", 5) + 3  # split inside a value
    resp, keys = i.send(None, csg=0, cont=True, raw=data[:cut])
    assert keys == {} and not resp.transit and not resp.cont and resp.data_length == 0
    resp, keys = i.send(None, csg=0, nsg=1, transit=True, raw=data[cut:])
    assert resp.transit and keys["AuthMethod"] == "None"


def test_discovery_session():
    cfg = config()
    i = Initiator(cfg)
    resp, keys = i.send(first_pairs(session="Discovery", target=None), csg=0, nsg=1,
                        transit=True)
    assert "TargetPortalGroupTag" not in keys
    resp, keys = i.send(OPS, csg=1, nsg=3, transit=True)
    assert keys["MaxBurstLength"] == "Irrelevant" and keys["HeaderDigest"] == "CRC32C"
    out = i.event.outcome
    assert out.session_type == "Discovery" and out.target is None


def test_discovery_chap():
    cfg = LoginConfig(targets=(), discovery_chap=Credentials("iqn.user", ISEC))
    i = Initiator(cfg)
    i.send(first_pairs(session="Discovery", target=None, auth="None"), csg=0, nsg=1,
           transit=True)
    assert i.event.status == login.AUTHENTICATION_FAILURE


def test_refuse_at_decision():
    m = LoginMachine(config(), 1)
    data = pdu.encode_text(first_pairs(auth=None) + OPS)
    hdr = pdu.LoginRequest(itt=1, isid=ISID, tsih=9, csg=1, nsg=3, transit=True,
                           data_length=len(data))
    ev = m.receive(hdr, data)
    assert isinstance(ev, Decide) and ev.outcome.tsih == 9
    assert ev.outcome.session.max_burst_length == 262144  # LO keys: defaults, not answers
    fail = m.refuse(login.SESSION_DOES_NOT_EXIST)
    assert pdu.decode_pdu(fail.header).status_detail == 0x0A


def test_target_offers_hold_transit():
    cfg = LoginConfig(targets=(TargetConfig(TNAME),), keys=TargetKeys(immediate_data=False))
    i = Initiator(cfg)
    i.send(first_pairs(), csg=0, nsg=1, transit=True)
    resp, keys = i.send([("InitialR2T", "Yes")], csg=1, nsg=3, transit=True)
    assert not resp.transit and keys["ImmediateData"] == "No"
    resp, keys = i.send([("ImmediateData", "No")], csg=1, nsg=3, transit=True)
    assert resp.transit and isinstance(i.event, Complete)
    assert i.event.outcome.session.immediate_data is False


T1 = TargetConfig("iqn.t1")
T2 = TargetConfig("iqn.t2", allowed_initiators=frozenset({"iqn.b"}))


def test_send_targets_all():
    portals = {1: [("192.0.2.1", 3260)], 2: [("2001:db8::1", 3260), ("0.0.0.0", 3261)]}
    got = send_targets("All", "iqn.a", [T1, T2], portals, ("198.51.100.7", 3261))
    assert got == [("TargetName", "iqn.t1"), ("TargetAddress", "192.0.2.1:3260,1"),
                   ("TargetAddress", "[2001:db8::1]:3260,2"),
                   ("TargetAddress", "198.51.100.7:3261,2")]
    got = send_targets("All", "iqn.b", [T1, T2], {1: [("::", 3260)]}, ("fe80::1%eth0", 3260))
    assert got == [("TargetName", "iqn.t1"), ("TargetAddress", "[fe80::1%eth0]:3260,1"),
                   ("TargetName", "iqn.t2"), ("TargetAddress", "[fe80::1%eth0]:3260,1")]


def test_send_targets_tells_only_addresses_the_initiator_can_use():
    """A loopback portal names the initiator's own host unless it came over
    loopback itself; a 0.0.0.0 portal takes no IPv6 connection and a ::
    portal (IPV6_V6ONLY) no IPv4 one, so an initiator is sent to a wildcard
    portal only in the family it came in."""
    portals = {1: [("127.0.0.1", 3260)], 2: [("0.0.0.0", 3261)], 3: [("::", 3262)], 4: [("::1", 3263)],
               5: [("192.0.2.1", 3264)]}
    addresses = [v for k, v in send_targets("All", "iqn.a", [T1], portals, ("198.51.100.7", 3261))[1:]]
    assert addresses == ["198.51.100.7:3261,2", "192.0.2.1:3264,5"]
    addresses = [v for k, v in send_targets("All", "iqn.a", [T1], portals, ("127.0.0.1", 3260))[1:]]
    assert addresses == ["127.0.0.1:3260,1", "127.0.0.1:3261,2", "[::1]:3263,4", "192.0.2.1:3264,5"]
    addresses = [v for k, v in send_targets("All", "iqn.a", [T1], portals, ("::1", 3263))[1:]]
    assert addresses == ["127.0.0.1:3260,1", "[::1]:3262,3", "[::1]:3263,4", "192.0.2.1:3264,5"]
    addresses = [v for k, v in send_targets("All", "iqn.a", [T1], portals, ("2001:db8::7", 3262))[1:]]
    assert addresses == ["[2001:db8::7]:3262,3", "192.0.2.1:3264,5"]


def test_names_compare_without_case():
    """`acl add iqn...:HOST` keeps the entry in lower case (names fold case,
    RFC 3722), and the STML admits the nexus so; fetd_tcp compared the name
    as sent, so an initiator whose name has capitals was refused at login
    and left out of SendTargets by the very entry made for it."""
    t = TargetConfig("iqn.t", allowed_initiators=frozenset({"iqn.2026-11.org.test:win-host"}))
    assert t.allows("iqn.2026-11.org.test:WIN-Host") and not t.allows("iqn.2026-11.org.test:other")
    got = send_targets("All", "iqn.2026-11.org.test:WIN-HOST", [t], {1: [("192.0.2.1", 3260)]},
                       ("192.0.2.1", 3260))
    assert got == [("TargetName", "iqn.t"), ("TargetAddress", "192.0.2.1:3260,1")]
    # and a target name given in capitals (SendTargets=NAME, a login's TargetName) is found
    assert send_targets("IQN.T", "iqn.2026-11.org.test:win-host", [t], {1: [("192.0.2.1", 3260)]},
                        ("192.0.2.1", 3260)) == got
    assert LoginConfig((t,)).target("Iqn.T") is t


def test_send_targets_scoping():
    portals = {1: [("::", 3260)]}
    local = ("::ffff:192.0.2.9", 3260)
    assert send_targets("All", "iqn.a", [T1], portals, local, discovery=False) == []
    assert send_targets("iqn.t1", "iqn.a", [T1, T2], portals, local) == [
        ("TargetName", "iqn.t1"), ("TargetAddress", "192.0.2.9:3260,1")]
    assert send_targets("iqn.t2", "iqn.a", [T1, T2], portals, local) == []
    assert send_targets("", "iqn.a", [T1, T2], portals, local, discovery=False,
                        session_target="iqn.t1")[0] == ("TargetName", "iqn.t1")


def test_send_targets_in_a_normal_session_names_only_its_target():
    """RFC 7143 Appendix C: in a Normal session SendTargets answers for the
    session's own target; naming another target (that the ACL admits, even)
    got its addresses, which a discovery session behind discovery CHAP
    would not tell this initiator (decision 0212)."""
    portals = {1: [("192.0.2.1", 3260)]}
    local = ("192.0.2.1", 3260)
    other = TargetConfig("iqn.t3")          # admits any initiator
    own = [("TargetName", "iqn.t1"), ("TargetAddress", "192.0.2.1:3260,1")]
    for value in ("", "iqn.t1", "IQN.T1"):
        assert send_targets(value, "iqn.a", [T1, other], portals, local, discovery=False,
                            session_target="iqn.t1") == own, value
    for value in ("iqn.t3", "All", "iqn.none"):
        assert send_targets(value, "iqn.a", [T1, other], portals, local, discovery=False,
                            session_target="iqn.t1") == [], value
    assert send_targets("iqn.t3", "iqn.a", [T1, other], portals, local) != []   # discovery: any it may see
