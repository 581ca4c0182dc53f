"""Negotiation rules of RFC 7143 §13, one key at a time."""

import pytest
from hypothesis import given, strategies as st

from fetd_tcp.keys import (KEYS, Kind, Negotiator, NegotiationError, Stage, TargetKeys,
                           parse_number)

OURS = TargetKeys()


def answer(pairs, ours=OURS, **kw):
    n = Negotiator(ours, **kw)
    return dict(n.negotiate(pairs)), n


@pytest.mark.parametrize("key,offer,expect", [
    ("ImmediateData", "Yes", "Yes"), ("ImmediateData", "No", "No"),
    ("OFMarker", "Yes", "No"), ("IFMarker", "No", "No"),
])
def test_boolean_and(key, offer, expect):
    assert answer([(key, offer)])[0][key] == expect


@pytest.mark.parametrize("key,offer,ours,expect", [
    ("InitialR2T", "No", False, "No"), ("InitialR2T", "Yes", False, "Yes"),
    ("InitialR2T", "No", True, "Yes"), ("DataPDUInOrder", "No", True, "Yes"),
    ("DataSequenceInOrder", "No", False, "No"),
])
def test_boolean_or(key, offer, ours, expect):
    attr = KEYS[key].attr
    assert answer([(key, offer)], TargetKeys(**{attr: ours}))[0][key] == expect


@pytest.mark.parametrize("key", [k.name for k in KEYS.values() if k.kind is Kind.MIN])
def test_numeric_min(key):
    spec = KEYS[key]
    ours = getattr(OURS, spec.attr)
    assert answer([(key, str(spec.hi))])[0][key] == str(ours)
    assert answer([(key, str(spec.lo))])[0][key] == str(spec.lo)
    assert answer([(key, str(spec.hi + 1))])[0][key] == "Reject"
    if spec.lo:
        assert answer([(key, str(spec.lo - 1))])[0][key] == "Reject"


def test_numeric_max():
    assert answer([("DefaultTime2Wait", "0")])[0]["DefaultTime2Wait"] == "2"
    assert answer([("DefaultTime2Wait", "10")])[0]["DefaultTime2Wait"] == "10"
    assert answer([("DefaultTime2Wait", "3601")])[0]["DefaultTime2Wait"] == "Reject"


@given(st.integers(512, 2**24 - 1), st.integers(512, 2**24 - 1))
def test_burst_lengths_stay_ordered(first, burst):
    got, n = answer([("FirstBurstLength", str(first)), ("MaxBurstLength", str(burst)),
                     ("InitialR2T", "Yes")])
    p = n.session_params()
    assert p.first_burst_length <= p.max_burst_length
    assert p.max_burst_length == min(burst, OURS.max_burst_length)
    assert int(got["FirstBurstLength"]) == p.first_burst_length


@given(st.sampled_from([k for k in KEYS.values() if k.kind in (Kind.MIN, Kind.MAX)]),
       st.integers(0, 2**25))
def test_numeric_rule_property(spec, offer):
    got = answer([(spec.name, str(offer))])[0][spec.name]
    if not spec.lo <= offer <= spec.hi:
        assert got == "Reject"
    else:
        f = min if spec.kind is Kind.MIN else max
        assert int(got) == f(offer, getattr(OURS, spec.attr))


def test_hex_and_malformed_numbers():
    assert parse_number("0x1000") == 4096 and parse_number("4096") == 4096
    assert parse_number("") is None and parse_number("12a") is None
    assert parse_number("0x") is None and parse_number("-1") is None
    assert answer([("MaxBurstLength", "0x10000")])[0]["MaxBurstLength"] == "65536"
    assert answer([("MaxBurstLength", "lots")])[0]["MaxBurstLength"] == "Reject"


def test_boolean_malformed():
    assert answer([("ImmediateData", "yes")])[0]["ImmediateData"] == "Reject"


@pytest.mark.parametrize("offer,ours,expect", [
    ("CRC32C,None", ("None", "CRC32C"), "CRC32C"),
    ("None,CRC32C", ("None", "CRC32C"), "None"),
    ("None", ("CRC32C",), "Reject"),
    ("CRC32C", ("None",), "Reject"),
    ("Bogus,None", ("None", "CRC32C"), "None"),
    ("None,,CRC32C", ("None", "CRC32C"), "Reject"),
])
def test_list_digests(offer, ours, expect):
    got, n = answer([("HeaderDigest", offer), ("DataDigest", offer)],
                    TargetKeys(header_digest=ours, data_digest=ours))
    assert got["HeaderDigest"] == got["DataDigest"] == expect
    assert n.connection_params().header_digest is (expect == "CRC32C")


def test_task_reporting_and_protocol_level():
    got, n = answer([("TaskReporting", "FastAbort,RFC3720"), ("iSCSIProtocolLevel", "2")])
    assert got == {"TaskReporting": "RFC3720", "iSCSIProtocolLevel": "1"}
    assert n.session_params().iscsi_protocol_level == 1


def test_auth_method_list():
    n = Negotiator(OURS, auth_methods=("CHAP",))
    assert n.negotiate([("AuthMethod", "None,CHAP")], Stage.SECURITY) == [("AuthMethod", "CHAP")]
    n = Negotiator(OURS, auth_methods=("CHAP",))
    assert n.negotiate([("AuthMethod", "None")], Stage.SECURITY) == [("AuthMethod", "Reject")]
    with pytest.raises(NegotiationError):
        Negotiator(OURS).negotiate([("AuthMethod", "None")], Stage.OPERATIONAL)
    with pytest.raises(NegotiationError):
        Negotiator(OURS).negotiate([("CHAP_A", "5")], Stage.OPERATIONAL)


def test_declarative_keys():
    got, n = answer([("MaxRecvDataSegmentLength", "65536"), ("InitiatorName", "iqn.x"),
                     ("InitiatorAlias", "host"), ("SessionType", "Normal"),
                     ("TargetName", "iqn.t")])
    assert got == {}
    assert n.connection_params().max_send_data_segment_length == 65536
    assert n.connection_params().max_recv_data_segment_length == OURS.max_recv_data_segment_length
    assert n.declared["InitiatorName"] == "iqn.x"
    assert answer([("MaxRecvDataSegmentLength", "100")])[0] == {"MaxRecvDataSegmentLength": "Reject"}


def test_unknown_and_vendor_keys():
    got = answer([("X-com.example.Foo", "1"), ("X#org.x", "2"), ("RDMAExtensions", "Yes")])[0]
    assert set(got.values()) == {"NotUnderstood"}


def test_obsolete_markers():
    got = answer([("OFMarker", "Yes"), ("IFMarker", "Yes"), ("OFMarkInt", "2048~8192"),
                  ("IFMarkInt", "2048~8192")])[0]
    assert got == {"OFMarker": "No", "IFMarker": "No", "OFMarkInt": "Irrelevant",
                   "IFMarkInt": "Irrelevant"}


def test_target_only_and_ffp_keys_in_login():
    got = answer([("TargetAlias", "x"), ("TargetPortalGroupTag", "1"),
                  ("TargetAddress", "1.2.3.4"), ("SendTargets", "All")])[0]
    assert set(got.values()) == {"Irrelevant"}


def test_first_burst_irrelevant():
    got = answer([("InitialR2T", "Yes"), ("ImmediateData", "No"),
                  ("FirstBurstLength", "4096")], TargetKeys(initial_r2t=True))[0]
    assert got["FirstBurstLength"] == "Irrelevant"


def test_discovery_irrelevant():
    n = Negotiator(OURS)
    n.discovery = True
    got = dict(n.negotiate([("MaxBurstLength", "512"), ("HeaderDigest", "None"),
                            ("ImmediateData", "Yes"), ("ErrorRecoveryLevel", "0")]))
    assert got == {"MaxBurstLength": "Irrelevant", "HeaderDigest": "None",
                   "ImmediateData": "Irrelevant", "ErrorRecoveryLevel": "0"}


def test_leading_only_on_secondary_connection():
    got = answer([("MaxBurstLength", "512"), ("HeaderDigest", "None")], leading=False)[0]
    assert got == {"MaxBurstLength": "Irrelevant", "HeaderDigest": "None"}


def test_key_offered_twice():
    n = Negotiator(OURS)
    n.negotiate([("MaxBurstLength", "512")])
    with pytest.raises(NegotiationError):
        n.negotiate([("MaxBurstLength", "512")])
    with pytest.raises(NegotiationError):
        Negotiator(OURS).negotiate([("InitiatorName", "a"), ("InitiatorName", "a")])


def test_target_offers():
    n = Negotiator(OURS)
    assert n.offers() == [("MaxRecvDataSegmentLength", "262144")]
    assert n.offers() == [] and not n.awaiting_answers
    n = Negotiator(TargetKeys(immediate_data=False, header_digest=("CRC32C",)))
    n.negotiate([("InitialR2T", "Yes")])
    offers = dict(n.offers())
    assert offers == {"MaxRecvDataSegmentLength": "262144", "HeaderDigest": "CRC32C",
                      "ImmediateData": "No"}
    assert n.awaiting_answers
    assert n.negotiate([("HeaderDigest", "CRC32C"), ("ImmediateData", "No")]) == []
    assert not n.awaiting_answers
    assert n.connection_params().header_digest
    assert n.session_params().immediate_data is False


def test_text_phase_renegotiation():
    n = Negotiator(OURS)
    got = dict(n.negotiate([("MaxRecvDataSegmentLength", "16384"), ("MaxBurstLength", "512")],
                           Stage.FULL_FEATURE))
    assert got == {"MaxBurstLength": "Reject"}
    assert n.connection_params().max_send_data_segment_length == 16384


def test_target_keys_validated():
    with pytest.raises(ValueError):
        TargetKeys(first_burst_length=1 << 20, max_burst_length=1 << 19)
    with pytest.raises(ValueError):
        TargetKeys(max_burst_length=100)
    with pytest.raises(ValueError):
        TargetKeys(header_digest=("MD5",))


def test_table_is_complete():
    for name in ("HeaderDigest", "DataDigest", "MaxConnections", "SendTargets", "TargetName",
                 "InitiatorName", "TargetAlias", "InitiatorAlias", "TargetAddress",
                 "TargetPortalGroupTag", "InitialR2T", "ImmediateData",
                 "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength",
                 "DefaultTime2Wait", "DefaultTime2Retain", "MaxOutstandingR2T",
                 "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel", "SessionType",
                 "AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R", "OFMarker",
                 "IFMarker", "OFMarkInt", "IFMarkInt", "TaskReporting", "iSCSIProtocolLevel"):
        assert name in KEYS
