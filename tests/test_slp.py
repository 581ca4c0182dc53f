"""The SLP service agent's core (fetd_tcp.slp), spoken to by an SLP codec nobody
here wrote: pyslp's message builder and parser (its asyncio layer needs
asyncio.coroutine, gone since Python 3.11, so the datagrams are ours to carry)."""
from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st
from pyslp import creator, parse as slparse

from fetd_tcp import slp

IQN = "iqn.2026-11.org.scsi-target:disk0"
OTHER = "iqn.2026-11.org.scsi-target:vault"
URL0 = f"service:iscsi:target://127.0.0.1:3260/{IQN}"


def agent(scopes=("DEFAULT",)) -> slp.ServiceAgent:
    a = slp.ServiceAgent(list(scopes))
    a.update([slp.Target(IQN, "disk zero"),
              slp.Target(OTHER, acl=("iqn.2026-11.org.test:allowed",), chap_user="bob")],
             [("127.0.0.1", 3260, 1), ("0.0.0.0", 3261, 2)])
    return a


def urls(reply: bytes) -> list[str]:
    header, error, entries = slparse.parse_reply(reply)
    assert header["function_id"] == slp.SRV_RPLY and error == 0
    return [e["url"] for e in entries]


def test_srvrqst_finds_every_target_on_every_portal():
    a = agent()
    reply = a.handle(creator.create_request("service:iscsi:target"), "10.9.8.7", multicast=True)
    assert urls(reply) == [URL0, f"service:iscsi:target://10.9.8.7:3261/{IQN}",   # wildcard: asked address
                           f"service:iscsi:target://127.0.0.1:3260/{OTHER}",
                           f"service:iscsi:target://10.9.8.7:3261/{OTHER}"]


def test_the_reply_answers_the_request_xid():
    request = bytearray(creator.create_request("service:iscsi:target"))
    request[10:12] = b"\x12\x34"
    assert slparse.parse_header(agent().handle(bytes(request), "127.0.0.1", True))[0]["xid"] == 0x1234


def test_attrrqst_gives_the_template_attributes():
    a = agent()
    header, error, text = slparse.parse_attr_reply(a.handle(creator.create_attr_request(URL0), "127.0.0.1", False))
    assert error == 0
    assert text == (f"(iscsi-name={IQN}),(transports=tcp),(alias=disk zero),(auth-name=any),"
                    "(auth-cred=any),(portal-group=1)")
    url = f"service:iscsi:target://127.0.0.1:3260/{OTHER}"
    text = slparse.parse_attr_reply(a.handle(creator.create_attr_request(url), "127.0.0.1", False))[2]
    assert "(auth-name=iqn.2026-11.org.test:allowed)" in text and "(auth-cred=chap/bob)" in text


def test_a_predicate_selects_targets():
    a = agent()

    def ask(predicate: str) -> list[str]:
        body = b"".join(struct.pack(">H", len(s)) + s.encode()
                        for s in ("", "service:iscsi:target", "DEFAULT", predicate, ""))
        msg = creator.create_header(1, len(body), 0x20) + body
        reply = a.handle(msg, "127.0.0.1", False)
        return urls(reply)

    assert ask(f"(iscsi-name={OTHER})") == [f"service:iscsi:target://127.0.0.1:3260/{OTHER}",
                                           f"service:iscsi:target://127.0.0.1:3261/{OTHER}"]
    assert len(ask("(|(auth-name=any)(auth-name=iqn.2026-11.org.test:allowed))")) == 4
    assert ask("(&(auth-name=any)(portal-group>=2))") == [f"service:iscsi:target://127.0.0.1:3261/{IQN}"]
    assert ask("(!(iscsi-name=*vault))") == [URL0, f"service:iscsi:target://127.0.0.1:3261/{IQN}"]
    assert ask("(alias=DISK*)") == [URL0, f"service:iscsi:target://127.0.0.1:3261/{IQN}"]


def test_other_scopes_and_services_are_not_answered_on_multicast():
    a = agent(["lab"])
    req = creator.create_request("service:iscsi:target", scope_list="DEFAULT")
    assert a.handle(req, "127.0.0.1", multicast=True) is None
    header, error, _ = slparse.parse_reply(a.handle(req, "127.0.0.1", multicast=False))
    assert error == slp.SCOPE_NOT_SUPPORTED
    assert urls(a.handle(creator.create_request("service:iscsi:target", scope_list="Lab"), "127.0.0.1", True))
    assert a.handle(creator.create_request("service:printer", scope_list="lab"), "127.0.0.1", True) is None


def test_srvtyperqst_and_service_agent_requests():
    a = agent()
    body = struct.pack(">H", 0) + struct.pack(">H", 0xFFFF) + struct.pack(">H", 7) + b"DEFAULT"
    msg = creator.create_header(9, len(body), 0x20) + body
    reply = a.handle(msg, "127.0.0.1", True)
    _, hl = slparse.parse_header(reply)
    assert reply[1] == slp.SRV_TYPE_RPLY and reply[hl:hl + 2] == b"\0\0"
    n = struct.unpack(">H", reply[hl + 2:hl + 4])[0]
    assert reply[hl + 4:hl + 4 + n] == b"service:iscsi:target"
    sa = a.handle(creator.create_request("service:service-agent"), "10.1.2.3", True)
    assert sa[1] == slp.SA_ADVERT and b"service:service-agent://10.1.2.3" in sa


def test_previous_responders_are_not_answered_again():
    body = b"".join(struct.pack(">H", len(s)) + s.encode()
                    for s in ("10.0.0.1,127.0.0.1", "service:iscsi:target", "DEFAULT", "", ""))
    assert agent().handle(creator.create_header(1, len(body), 0x20) + body, "127.0.0.1", True) is None


def test_a_reply_that_does_not_fit_says_so():
    a = slp.ServiceAgent(["DEFAULT"])
    a.update([slp.Target(f"iqn.2026-11.org.scsi-target:disk{i:04d}") for i in range(100)], [("127.0.0.1", 3260, 1)])
    reply = a.handle(creator.create_request("service:iscsi:target"), "127.0.0.1", False)
    assert len(reply) <= slp.REPLY_MTU and struct.unpack(">H", reply[5:7])[0] & slp.OVERFLOW
    assert 10 < len(urls(reply)) < 100


def test_registration_with_a_directory_agent():
    a = agent()
    advert = _da_advert(boot=77, scopes="DEFAULT")
    assert a.da_advert(advert, "127.0.0.2") and not a.da_advert(advert, "127.0.0.2")   # new once
    assert a.da_advert(_da_advert(boot=78, scopes="DEFAULT"), "127.0.0.2")            # rebooted
    assert not a.da_advert(_da_advert(boot=5, scopes="elsewhere"), "127.0.0.3")
    service = a.services("127.0.0.1")[0]
    header, entry, msg = slparse.parse_registration(a.registration(service))
    assert header["function_id"] == slp.SRV_REG and entry["url"] == URL0 and entry["lifetime"] == slp.LIFETIME
    assert msg == {"service_type": "service:iscsi:target", "scope_list": "DEFAULT",
                   "attr_list": service.attr_list()}
    header, entry, scopes = slparse.parse_deregistration(a.deregistration(URL0))
    assert header["function_id"] == slp.SRV_DEREG and entry["url"] == URL0 and scopes == "DEFAULT"
    assert not a.da_advert(_da_advert(boot=0, scopes="DEFAULT"), "127.0.0.2") and "127.0.0.2" not in a.das


def _da_advert(boot: int, scopes: str) -> bytes:
    url = b"service:directory-agent://127.0.0.2"
    body = (b"\0\0" + struct.pack(">I", boot) + struct.pack(">H", len(url)) + url
            + struct.pack(">H", len(scopes)) + scopes.encode() + b"\0\0" + b"\0\0" + b"\0")
    return creator.create_header(8, len(body), 0) + body


VALID = [creator.create_request("service:iscsi:target"), creator.create_attr_request(URL0),
         creator.create_request("service:iscsi:target", "DEFAULT")]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.integers(0, 80), st.binary(max_size=40))
def test_malformed_datagrams_are_dropped_never_a_crash(base, flips, cut, junk):
    """Fuzzed like the iSCSI PDU codec: bytes flipped, cut short, junk appended.
    The agent answers or says nothing; it never raises, and an answer is an SLP
    message within the MTU."""
    msg = bytearray(base)
    for at, value in flips:
        if at < len(msg):
            msg[at] = value
    msg = msg[:len(msg) - cut] if cut < len(msg) else msg
    for data in (bytes(msg), bytes(msg) + junk, junk):
        for multicast in (True, False):
            reply = agent().handle(data, "127.0.0.1", multicast)
            if reply is not None:
                assert len(reply) <= slp.REPLY_MTU and reply[0] == 2
                slp_header = slparse.parse_header(reply)[0]
                assert slp_header["length"] == len(reply)
        assert agent().da_advert(data, "127.0.0.9") in (True, False)
