"""The STML enforces a target's ACL itself, at register_nexus: a front end
that does not check it (fetd_loopback, a remote or a buggy one) still
cannot make an I_T nexus for an initiator the ACL leaves out."""
from __future__ import annotations

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
