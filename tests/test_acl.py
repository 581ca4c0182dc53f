"""The STML enforces a target's ACL itself, at register_nexus: a front end
that does not check it (fetd_loopback, a remote or a buggy one) still
cannot make an I_T nexus for an initiator the ACL leaves out; nor can a
PERSISTENT RESERVE OUT register one by TransportID."""
from __future__ import annotations

import struct

import pytest

from scsi_target.mgmt import MgmtClient

IQN = "iqn.2026-11.org.scsi-target:acl"
OTHER = "iqn.2026-11.org.scsi-target:open"
ALLOWED = "iqn.2026-11.org.example:allowed"
STRANGER = "iqn.2026-11.org.example:stranger"
INQUIRY = bytes([0x12, 0, 0, 0, 36, 0])


@pytest.fixture
def acl_stml(stml_factory, tmp_short):
    cfg = tmp_short() / "target.toml"
    cfg.write_text(f'[[target]]\nname = "{IQN}"\nacl = ["{ALLOWED}"]\n'
                   '[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n'
                   f'[[target]]\nname = "{OTHER}"\n'
                   '[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    return stml_factory(extra=("--config", str(cfg)))


def test_a_front_end_cannot_register_an_initiator_the_acl_leaves_out(acl_stml, client_factory):
    for name in (STRANGER, f"{STRANGER},i,0x00023d000001", "loopback.made-up"):
        with pytest.raises(LookupError, match=f"not in the ACL of {IQN}"):
            client_factory(acl_stml.endpoint, target=IQN, initiator=name)
    assert f"nexus 1 refused: initiator {STRANGER} is not in the ACL of {IQN}" in acl_stml.log()
    # the ACL names initiators: any port of one, in any case, is let in
    for name in (ALLOWED, f"{ALLOWED},i,0x00023d000001", ALLOWED.upper()):
        c = client_factory(acl_stml.endpoint, target=IQN, initiator=name)
        assert c.execute(0, INQUIRY, data_in=36).data[8:16] == b"SCSITGT "
    # a target without an ACL takes anyone
    c = client_factory(acl_stml.endpoint, target=OTHER, initiator=STRANGER)
    assert c.execute(0, INQUIRY, data_in=36).data[8:16] == b"SCSITGT "


def test_acl_changes_apply_to_the_next_registration(acl_stml, client_factory):
    mgmt = MgmtClient(acl_stml.endpoint)
    mgmt.call("acl_add", initiator=STRANGER, target=IQN)
    c = client_factory(acl_stml.endpoint, target=IQN, initiator=STRANGER)
    assert c.execute(0, INQUIRY, data_in=36).status == 0
    mgmt.call("acl_remove", initiator=STRANGER, target=IQN)
    with pytest.raises(LookupError, match="not in the ACL"):
        client_factory(acl_stml.endpoint, target=IQN, initiator=STRANGER)


# ---------------------------------------------------------------- reservations name initiators too

REGISTER, RESERVE, REGISTER_AND_MOVE, READ_KEYS = 0, 1, 7, 0
SPEC_I_PT, WE = 0x08, 0x1


def tid(name: str) -> bytes:
    """An iSCSI TransportID (SPC-4 7.6.4.6), written out here, not with stml.pr's encoder."""
    body = name.encode() + b"\0"
    body = (body + bytes(-len(body) % 4)).ljust(20, b"\0")
    return bytes([(0x40 if ",i," in name else 0) | 0x05, 0]) + struct.pack(">H", len(body)) + body


def prout(sa: int, params: bytes, rtype: int = 0) -> tuple[bytes, bytes]:
    return bytes([0x5F, sa, rtype, 0, 0]) + struct.pack(">I", len(params)) + b"\0", params


def register(sark: int, tids: list[bytes]) -> tuple[bytes, bytes]:
    body = b"".join(tids)
    return prout(REGISTER, struct.pack(">QQ4sB3sI", 0, sark, b"", SPEC_I_PT, b"", len(body)) + body)


def keys(c) -> list[int]:
    data = c.execute(0, bytes([0x5E, READ_KEYS, 0, 0, 0, 0, 0, 0x01, 0, 0]), data_in=256).data
    n = struct.unpack_from(">I", data, 4)[0] // 8
    return list(struct.unpack_from(f">{n}Q", data, 8))


def refused_at(r, field: int) -> bool:
    """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, the field pointer at `field`."""
    return (r.status == 0x02 and r.sense_key == 0x5 and r.asc_ascq == (0x26, 0x00)
            and r.sense[15] & 0xC0 == 0x80 and struct.unpack(">H", r.sense[16:18])[0] == field)


def test_spec_i_pt_registers_only_initiators_the_acl_admits(acl_stml, client_factory):
    """A TransportID names a port that never logged in: with an ACL, only one
    it admits may take a key (LIO wants a node ACL for it); a list naming any
    other is refused whole, pointing at that TransportID."""
    c = client_factory(acl_stml.endpoint, target=IQN, initiator=ALLOWED)
    allowed_port, stranger_port = f"{ALLOWED},i,0x00023d000009", f"{STRANGER},i,0x00023d000009"
    for tids in ([tid(allowed_port), tid(STRANGER)], [tid(allowed_port), tid(stranger_port)]):
        assert refused_at(c.execute(0, *register(0xA, tids)), 28 + len(tids[0]))
        assert keys(c) == []
    assert c.execute(0, *register(0xA, [tid(allowed_port), tid(ALLOWED.upper())])).status == 0
    assert keys(c) == [0xA, 0xA, 0xA]
    # REGISTER AND MOVE registers its destination: the same rule
    assert c.execute(0, *prout(RESERVE, struct.pack(">QQ8x", 0xA, 0), rtype=WE)).status == 0
    body = tid(stranger_port)
    move = struct.pack(">QQxBHI", 0xA, 0xB, 0, 1, len(body)) + body
    assert refused_at(c.execute(0, *prout(REGISTER_AND_MOVE, move, rtype=WE)), 24)
    assert keys(c) == [0xA, 0xA, 0xA]
    # the ACL is read live: once admitted, the stranger may be named
    MgmtClient(acl_stml.endpoint).call("acl_add", initiator=STRANGER, target=IQN)
    assert c.execute(0, *prout(REGISTER_AND_MOVE, move, rtype=WE)).status == 0
    assert sorted(keys(c)) == [0xA, 0xA, 0xA, 0xB]
