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


def agent(scopes=("DEFAULT",), auth: bool = True) -> slp.ServiceAgent:
    """Two targets, one with an ACL and CHAP; `auth` (slp_auth) tells about both."""
    a = slp.ServiceAgent(list(scopes), auth=auth)
    a.update([slp.Target(IQN, "disk zero"),
              slp.Target(OTHER, acl=("iqn.2026-11.org.test:allowed",), chap_user="bob")],
             [("127.0.0.1", 3260, 1), ("0.0.0.0", 3261, 2)])
    return a


def urls(reply: bytes) -> list[str]:
    header, error, entries = slparse.parse_reply(reply)
    assert header["function_id"] == slp.SRV_RPLY and error == 0
    return [e["url"] for e in entries]


def test_srvrqst_finds_every_target_on_every_portal():
    """Every target on every portal the asker can use: a wildcard portal by the
    address it asked at; the loopback portal only for an asker on loopback
    (elsewhere 127.0.0.1 names the asker's own host)."""
    a = agent()
    reply = a.handle(creator.create_request("service:iscsi:target"), "10.9.8.7", multicast=True)
    assert urls(reply) == [f"service:iscsi:target://10.9.8.7:3261/{IQN}",   # wildcard: asked address
                           f"service:iscsi:target://10.9.8.7:3261/{OTHER}"]
    reply = a.handle(creator.create_request("service:iscsi:target"), "127.0.0.1", multicast=True)
    assert urls(reply) == [URL0, f"service:iscsi:target://127.0.0.1:3261/{IQN}",
                           f"service:iscsi:target://127.0.0.1:3260/{OTHER}",
                           f"service:iscsi:target://127.0.0.1:3261/{OTHER}"]


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


# ---------------------------------------------------------------- what a request may cost (review 2)

def _srvrqst(predicate: str, scopes: str = "DEFAULT") -> bytes:
    body = b"".join(struct.pack(">H", len(s)) + s.encode()
                    for s in ("", "service:iscsi:target", scopes, predicate, ""))
    return creator.create_header(1, len(body), 0x20) + body


def _big_agent(targets: int, portals: int = 2) -> slp.ServiceAgent:
    a = slp.ServiceAgent(["DEFAULT"])
    a.update([slp.Target(f"iqn.2026-11.org.scsi-target:disk{i:05d}", "a disk") for i in range(targets)],
             [(f"127.0.0.{p + 1}", 3260, p + 1) for p in range(portals)])
    return a


def _counting_items(monkeypatch) -> list:
    """Calls of slp._item, the parse of one predicate comparison (old and new code alike)."""
    calls: list = []
    real = slp._item
    monkeypatch.setattr(slp, "_item", lambda *a: (calls.append(a[0]), real(*a))[1])
    return calls


def test_a_predicate_is_parsed_once_per_request(monkeypatch):
    """Finding 2: the predicate was parsed again for every service (targets x
    portals); now once per request, whatever the number of services."""
    a = _big_agent(100)
    calls = _counting_items(monkeypatch)
    reply = a.handle(_srvrqst("(&(alias=a disk)(portal-group=2)(iscsi-name=*disk0004*))"), "127.0.0.1", False)
    assert len(calls) == 3
    assert urls(reply) == [f"service:iscsi:target://127.0.0.2:3260/iqn.2026-11.org.scsi-target:disk{i:05d}"
                           for i in range(40, 50)]


def test_an_oversized_predicate_is_refused_unparsed(monkeypatch):
    """An 8 KiB predicate (the most a datagram carries), or one of more than
    MAX_ITEMS comparisons, is a PARSE_ERROR by unicast, silence by multicast,
    and costs no comparison."""
    a = _big_agent(100)
    calls = _counting_items(monkeypatch)
    long = "(|" + "(iscsi-name=x)" * 560 + ")"
    many = "(|" + "(a=1)" * (slp.MAX_ITEMS + 1) + ")"
    assert len(long) > 7000 and len(many) < slp.MAX_PREDICATE
    for predicate in (long, many):
        before = a.work
        assert slparse.parse_reply(a.handle(_srvrqst(predicate), "127.0.0.1", False))[1] == slp.PARSE_ERROR
        assert a.handle(_srvrqst(predicate), "127.0.0.1", True) is None
        assert a.work - before == 2          # the two datagrams, nothing tried on a service
    assert len(calls) == 2 * slp.MAX_ITEMS   # `many` parsed up to its excess, twice; `long` never


def test_a_request_costs_at_most_max_request_cost(monkeypatch):
    """A predicate of MAX_ITEMS comparisons that matches nothing, against 2,000
    targets on 2 portals: it is tried on MAX_REQUEST_COST / MAX_ITEMS services,
    not 4,000, and the (empty) unicast reply says OVERFLOW: there was more."""
    a = _big_agent(2000)
    a.services("127.0.0.1")                   # built once per change: 4,000 services
    predicate = "(|" + "".join(f"(alias=*no{i}*)" for i in range(slp.MAX_ITEMS)) + ")"
    assert len(predicate) <= slp.MAX_PREDICATE
    globs: list = []
    real = slp._glob
    monkeypatch.setattr(slp, "_glob", lambda *x: (globs.append(1), real(*x))[1])
    before = a.work
    reply = a.handle(_srvrqst(predicate), "127.0.0.1", False)
    assert len(globs) == slp.MAX_REQUEST_COST    # one comparison per item per service tried
    assert a.work - before <= slp.MAX_REQUEST_COST + 1
    header, error, entries = slparse.parse_reply(reply)
    assert error == 0 and entries == [] and struct.unpack(">H", reply[5:7])[0] & slp.OVERFLOW
    # the services are cached: a second request builds nothing again; a change
    # builds them again, counted as work (targets x portals)
    assert a.services("127.0.0.1") is a.services("127.0.0.1")
    before = a.work
    a.update(a.targets, a.portals)
    a.services("127.0.0.1")
    assert a.work - before == 4000


def test_by_default_only_open_targets_are_told_without_access_details():
    """Finding 3: without slp_auth, a target with an ACL (SendTargets shows it
    only to its initiators) is not told, and no CHAP user name is; an open
    target says auth-name=any (true) and, with CHAP, no auth-cred."""
    a = slp.ServiceAgent(["DEFAULT"])
    a.update([slp.Target(IQN, "disk zero"), slp.Target(OTHER, acl=("iqn.2026-11.org.test:allowed",)),
              slp.Target("iqn.2026-11.org.scsi-target:chap", chap_user="bob")], [("127.0.0.1", 3260, 1)])
    got = urls(a.handle(creator.create_request("service:iscsi:target"), "127.0.0.1", False))
    assert got == [URL0, "service:iscsi:target://127.0.0.1:3260/iqn.2026-11.org.scsi-target:chap"]
    text = slparse.parse_attr_reply(a.handle(creator.create_attr_request("service:iscsi:target"),
                                             "127.0.0.1", False))[2]
    assert "(auth-name=any)" in text and "(auth-cred=any)" in text
    assert "bob" not in text and "allowed" not in text and "vault" not in text
    chap = a.services("127.0.0.1")[1]
    assert "auth-cred" not in chap.attrs and b"bob" not in a.registration(chap)
    url = f"service:iscsi:target://127.0.0.1:3260/{OTHER}"
    assert slparse.parse_attr_reply(a.handle(creator.create_attr_request(url), "127.0.0.1", False))[2] == ""


def test_no_target_is_told_when_discovery_needs_chap():
    """SendTargets names no target to a discovery session without CHAP, so SLP
    names none either (0507): no URL, no attributes, nothing to register; with
    slp_auth the administrator chose to publish, and every target is told."""
    a = agent(auth=False)
    a.update(a.targets, a.portals, discovery_chap=True)
    assert urls(a.handle(creator.create_request("service:iscsi:target"), "127.0.0.1", False)) == []
    assert slparse.parse_attr_reply(a.handle(creator.create_attr_request("service:iscsi:target"),
                                             "127.0.0.1", False))[2] == ""
    assert a.services("127.0.0.1") == []
    told = agent(auth=True)
    told.update(told.targets, told.portals, discovery_chap=True)
    assert len(urls(told.handle(creator.create_request("service:iscsi:target"), "127.0.0.1", False))) == 4


def test_directory_agents_are_the_configured_ones_or_a_few_discovered():
    """Finding 3: anyone can send a DAAdvert. With DAs configured only their
    hosts count; without, at most MAX_DAS are learnt (a DA going down frees its
    place), each only for one of our scopes."""
    a = slp.ServiceAgent(["DEFAULT"], das=["127.0.0.2"])
    assert not a.da_advert(_da_advert(boot=9, scopes="DEFAULT"), "10.6.6.6")
    assert a.da_advert(_da_advert(boot=9, scopes="DEFAULT"), "127.0.0.2")
    assert list(a.das) == ["127.0.0.2"]

    a = slp.ServiceAgent(["DEFAULT"])
    for i in range(slp.MAX_DAS + 3):
        a.da_advert(_da_advert(boot=9, scopes="DEFAULT"), f"10.0.0.{i}")
    assert len(a.das) == slp.MAX_DAS
    assert not a.da_advert(_da_advert(boot=9, scopes="other"), "10.0.0.1")
    a.da_advert(_da_advert(boot=0, scopes="DEFAULT"), "10.0.0.0")
    assert a.da_advert(_da_advert(boot=9, scopes="DEFAULT"), "10.0.0.99") and len(a.das) == slp.MAX_DAS
