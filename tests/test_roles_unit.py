"""The decisions of stml.roles as functions: who may manage without a key
(decision 0244), and which entries of the allow lists are keys (0245)."""
from __future__ import annotations

import pytest

from scsi_target.keys import write_key_pair
from stml.config import CurveKey, load
from stml.roles import FRONT_END, MANAGER, allow_list, on_this_host, refusal

MGMT, REGISTER = "mgmt", "register_target_front_end"
KEYLESS = ("management refused: plain TCP from 192.0.2.7, not this host (manage over ipc:// or "
           "loopback, or over CURVE with a key in [stml] allowed_managers)")


@pytest.mark.parametrize("address", [None, "127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1",
                                     "localhost:0:0:4242"])
def test_a_peer_without_a_key_manages_from_this_host(address):
    """The stream carrier (None), loopback TCP, ipc:// (ZeroMQ's uid:gid:pid form)."""
    assert on_this_host(address)
    assert refusal(MGMT, None, False, address) is None


@pytest.mark.parametrize("address", ["192.0.2.7", "10.0.0.1", "2001:db8::1", "fe80::1%eth0", "::ffff:10.0.0.1",
                                     "", "somewhere"])
def test_a_peer_without_a_key_from_elsewhere_cannot_manage(address):
    assert not on_this_host(address)
    assert refusal(MGMT, None, False, address) is not None
    # it may still register: --insecure is for remote front ends
    assert refusal(REGISTER, None, False, address) is None


def test_the_refusal_names_the_peer_and_the_ways_to_manage():
    assert refusal(MGMT, None, False, "192.0.2.7") == KEYLESS


def test_a_key_decides_whatever_the_address():
    """Over CURVE the key's role decides, as before (0242)."""
    assert refusal(MGMT, MANAGER, False, "192.0.2.7") is None
    assert refusal(MGMT, FRONT_END, False, "127.0.0.1").startswith("management refused: this peer is a front end")
    assert refusal(MGMT, None, True, "127.0.0.1") == "management refused: this peer is a front end"


def test_a_listed_key_is_a_key_wherever_the_stml_runs(tmp_path, monkeypatch):
    """An entry is a key or a key file as the config file's directory says,
    decided once: a file named like the key in the STML's working directory
    does not turn it into a file name (stml.roles decided again, against the
    working directory, and refused the config)."""
    z85 = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsLx@{H8]yf7"
    _, _, manager = write_key_pair(tmp_path / "keys", "mgr")
    cfg = tmp_path / "etc" / "target.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[stml]\nallowed_front_ends = ["{z85}"]\nallowed_managers = ["../keys/mgr.key"]\n')
    settings = load(str(cfg), str(tmp_path / "data")).stml
    mgr_file = str(tmp_path / "etc" / ".." / "keys" / "mgr.key")
    assert settings.allowed_front_ends == [CurveKey(z85, False)]
    assert settings.allowed_managers == [CurveKey(mgr_file, True)]
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / z85).write_text("not a key")
    monkeypatch.chdir(tmp_path / "cwd")
    assert allow_list(settings) == {z85.encode(): (FRONT_END, "listed key"),
                                    manager.encode(): (MANAGER, mgr_file)}
