"""Who may manage the target (docs/decisions/0242): a peer registered as a
front end may not, on any carrier; over CURVE, the list that admitted a key
(`[stml] allowed_front_ends` or `allowed_managers`) is its role. Checked with
the real STML, the real management CLI, a raw contract client and
fetd_loopback's client."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from fetd_loopback.client import LoopbackClient
from scsi_runtime.curvekeys import curve_client_keys, load_key_file
from scsi_target.keys import write_key_pair
from stml.api import StreamChannel
from support.cli import cli
from support.procs import free_port
from support.rawfe import RawFrontEnd

IQN = "iqn.2026-11.org.scsi-target:roles"
INTRUDER = "iqn.2026-11.org.example:intruder"
FRONT_END_REFUSED = "management refused: this peer is a front end"


@pytest.fixture
def keys(tmp_path) -> Path:
    d = tmp_path / "keys"
    for name in ("stml", "fe", "mgr"):
        write_key_pair(d, name)
    return d


def _config(path: Path, keys: Path, tcp: str, front_ends: list[str], managers: list[str]) -> Path:
    quoted = lambda items: ", ".join(f'"{i}"' for i in items)   # noqa: E731
    path.write_text(f'[stml]\nlisten = ["{tcp}"]\ncurve_secret_key_file = "{keys / "stml.key_secret"}"\n'
                    f"allowed_front_ends = [{quoted(front_ends)}]\nallowed_managers = [{quoted(managers)}]\n"
                    f'[[target]]\nname = "{IQN}"\n[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    return path


@pytest.fixture
def roles_stml(stml_factory, tmp_short, keys):
    """An STML on ipc:// (same host) and on tcp:// loopback with CURVE: fe.key a
    front end's key, mgr.key a manager's."""
    d = tmp_short()
    tcp = f"tcp://127.0.0.1:{free_port()}"
    cfg = _config(d / "roles.toml", keys, tcp, [str(keys / "fe.key")], [str(keys / "mgr.key")])
    p = stml_factory(data_dir=d / "data", extra=("--config", str(cfg)))
    p.current.wait_line(r"stml: listening on tcp://")
    p.tcp, p.keys = tcp, keys
    return p


def _remote(stml, key: str) -> list[str]:
    """The management CLI's options to reach the STML over CURVE with `key`."""
    return ["--stml", stml.tcp, "--key", str(stml.keys / f"{key}.key_secret"), "--stml-key",
            str(stml.keys / "stml.key")]


def _acl(endpoint: str) -> list[str]:
    """The target's ACL, read through the real CLI on the same-host endpoint."""
    targets = json.loads(cli("target", "list", "--stml", endpoint, "--json").stdout)
    return [t for t in targets if t["name"] == IQN][0]["acl"]


def _acl_add(fe: RawFrontEnd, rid: int = 7) -> dict:
    fe.send({"op": "mgmt", "id": rid, "cmd": "acl_add", "args": {"initiator": INTRUDER, "target": IQN}})
    reply = fe.expect("mgmt_reply")[0]
    assert reply["id"] == rid
    return reply


def test_a_registered_front_end_cannot_manage(roles_stml):
    """ipc:// (ZeroMQ, no key): the same peer that could manage before it
    registered is refused once it is a front end, and nothing changes."""
    fe = RawFrontEnd(roles_stml.endpoint)
    try:
        fe.send({"op": "mgmt", "id": 1, "cmd": "target_list", "args": {}})
        before = fe.expect("mgmt_reply")[0]
        assert before["ok"] is True and [t["name"] for t in before["result"]] == [IQN]
        assert "error" not in fe.register()
        reply = _acl_add(fe)
        assert reply["ok"] is False and reply["error"] == FRONT_END_REFUSED
    finally:
        fe.close()
    assert _acl(roles_stml.endpoint) == []
    assert f"refused mgmt from {fe.name}: {FRONT_END_REFUSED}" in roles_stml.log()
    # the management client never registers: it still manages locally
    cli("acl", "add", INTRUDER, "--stml", roles_stml.endpoint)
    assert _acl(roles_stml.endpoint) == [INTRUDER]


class _Replies:
    """A tap on a front end's link that keeps the mgmt_replies it receives."""

    def __init__(self) -> None:
        self.replies: list[dict] = []
        self.seen = threading.Event()

    def inbound(self, peer, header, packed, frames) -> bool:
        if header["op"] == "mgmt_reply":
            self.replies.append(dict(header))
            self.seen.set()
        return True

    def outbound(self, peer, header, packed, frames) -> bool:
        return True


def test_a_front_end_on_the_stream_socket_cannot_manage(roles_stml):
    """fetd_loopback's link, on the same-host stream carrier: its mgmt on the
    identity it registered is refused, and the ACL is unchanged."""
    client = LoopbackClient(roles_stml.endpoint, target=IQN, timeout=10).open()
    try:
        link = client._link
        assert isinstance(link._channel, StreamChannel), "not on the stream carrier: nothing tested here"
        replies = _Replies()
        header = {"op": "mgmt", "id": 9, "cmd": "acl_add", "args": {"initiator": INTRUDER, "target": IQN}}

        def send() -> None:
            link.add_tap(replies)
            link.transmit(header)
        client._loop.call_soon_threadsafe(send)
        assert replies.seen.wait(10), "no mgmt_reply"
    finally:
        client.close()
    assert replies.replies == [{"op": "mgmt_reply", "id": 9, "ok": False, "error": FRONT_END_REFUSED}]
    assert _acl(roles_stml.endpoint) == []


def test_curve_roles(roles_stml, keys):
    """tcp:// with CURVE: a manager's key manages, a front end's key does not
    (even unregistered), and a manager's key cannot register as a front end."""
    luns = json.loads(cli("lun", "list", *_remote(roles_stml, "mgr"), "--json").stdout)
    assert [(r["target"], r["lun"]) for r in luns] == [(IQN, 0)]

    p = cli("acl", "add", INTRUDER, *_remote(roles_stml, "fe"), check=False)
    assert p.returncode == 2
    assert p.stderr == ("scsi-target: acl add refused: management refused: this peer is a front end, "
                        "not a manager (its key is not in [stml] allowed_managers)\n")
    assert _acl(roles_stml.endpoint) == []

    fe = RawFrontEnd(roles_stml.tcp, curve=curve_client_keys(str(keys / "fe.key_secret"), str(keys / "stml.key")))
    mgr = RawFrontEnd(roles_stml.tcp, curve=curve_client_keys(str(keys / "mgr.key_secret"),
                                                              str(keys / "stml.key")))
    try:
        assert "error" not in fe.register()   # the front end's key registers
        assert _acl_add(fe)["ok"] is False
        detect = mgr.register()
        assert detect["error"] == ("registration refused: this peer is a manager, not a front end "
                                   "(its key is not in [stml] allowed_front_ends)")
        # it stays what it is: a manager
        mgr.send({"op": "mgmt", "id": 3, "cmd": "target_list", "args": {}})
        assert mgr.expect("mgmt_reply")[0]["ok"] is True
        frontends = json.loads(cli("frontend", "list", "--stml", roles_stml.endpoint, "--json").stdout)
        assert [f["name"] for f in frontends] == [fe.name]
    finally:
        fe.close()
        mgr.close()
    assert _acl(roles_stml.endpoint) == []


def test_a_peer_holding_another_server_key_is_said_by_the_stml(roles_stml, keys):
    """A peer whose CURVE server key is not the STML's fails the handshake
    before ZAP is asked: the STML used to log nothing. It says it now, with
    its own public key, and the peer's address when it could read it (0709);
    ZeroMQ's retries of the connection are not said again."""
    public = load_key_file(str(keys / "stml.key"))[0].decode()
    wrong = RawFrontEnd(roles_stml.tcp, curve=curve_client_keys(str(keys / "fe.key_secret"), str(keys / "mgr.key")))
    try:
        wrong.send({"op": "register_target_front_end"})   # (never delivered: its handshake fails)
        text = roles_stml.current.wait_log("failed the CURVE handshake on tcp://127.0.0.1:")
    finally:
        wrong.close()
    line = next(x for x in text.splitlines() if "failed the CURVE handshake" in x)
    assert f"its server key is not this STML's public key {public}" in line
    assert "a peer at 127.0.0.1 " in line or "a peer at an address gone before it was read " in line
    assert text.count("failed the CURVE handshake on") == 1


@pytest.mark.parametrize("spelling", ["file", "z85"])
def test_a_key_in_both_lists_is_a_config_error(tmp_short, keys, spelling):
    d = tmp_short()
    tcp = f"tcp://127.0.0.1:{free_port()}"
    fe_key = str(keys / "fe.key")
    both = fe_key if spelling == "file" else load_key_file(fe_key)[0].decode()
    cfg = _config(d / "both.toml", keys, tcp, [fe_key], [str(keys / "mgr.key"), both])
    p = subprocess.run([sys.executable, "-m", "stml", "--config", str(cfg), "--data-dir", str(d / "data")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in both allowed_front_ends" in lines[0] and "allowed_managers" in lines[0]


def test_roles_hold_with_a_tap_that_hands_messages_on_later(stml_factory):
    """Fault injection delays every mgmt (a tap that hands it on later): the
    role is decided when the message arrives, so local management still works
    and a registered front end's mgmt is still refused."""
    stml = stml_factory("ram:4MiB", extra=("--iqn", IQN, "--inject", "stml:delay mgmt p=1 ms=50"))
    cli("acl", "add", INTRUDER, "--stml", stml.endpoint)
    fe = RawFrontEnd(stml.endpoint)
    try:
        fe.register()
        fe.send({"op": "mgmt", "id": 5, "cmd": "acl_remove", "args": {"initiator": INTRUDER, "target": IQN}})
        reply = fe.expect("mgmt_reply")[0]
        assert reply == {"op": "mgmt_reply", "id": 5, "ok": False, "error": FRONT_END_REFUSED}
    finally:
        fe.close()
    assert _acl(stml.endpoint) == [INTRUDER]
    assert "delaying mgmt" in stml.log()


def test_keys_generate_says_which_list_a_key_goes_into(tmp_path):
    out = cli("keys", "generate", str(tmp_path), "--name", "admin", "--role", "manager").stdout
    assert out.splitlines()[-1] == (f"as manager: a remote management client's: list {tmp_path / 'admin.key'} "
                                    "(or the key) in [stml] allowed_managers; it cannot register as a front end")
    out = cli("keys", "generate", str(tmp_path), "--name", "any").stdout
    assert [line.split(":")[0] for line in out.splitlines()[3:]] == ["as stml", "as front-end", "as manager"]


def test_fetd_tcp_with_a_managers_key_says_it_is_refused_and_exits(roles_stml, keys):
    """A front end the STML refuses (here: a manager's key) says why in one
    line and exits 2, instead of registering again every heartbeat."""
    p = subprocess.run([sys.executable, "-m", "fetd_tcp", "--stml", roles_stml.tcp, "--portal",
                        f"127.0.0.1:{free_port()}", "--stml-key", str(keys / "stml.key"),
                        "--key", str(keys / "mgr.key_secret"), "--log-level", "warning"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        "scsi-target: fetd-tcp: the STML refused this front end: registration refused: this peer is a "
        "manager, not a front end (its key is not in [stml] allowed_front_ends)")
    assert "never retrieved" not in p.stderr


def test_fetd_vhost_with_a_managers_key_says_it_is_refused_and_exits(roles_stml, keys, tmp_short):
    """The same for fetd_vhost, whose run cleans up (awaiting the link's
    close) after the refusal ended its wait and before raising it: the
    refusal survives the cleanup, compiled too (decisions/0840 addendum)."""
    sock = tmp_short() / "vm.sock"
    p = subprocess.run([sys.executable, "-m", "fetd_vhost", "--stml", roles_stml.tcp, "--socket", str(sock),
                        "--target", IQN, "--stml-key", str(keys / "stml.key"),
                        "--key", str(keys / "mgr.key_secret"), "--log-level", "warning"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "scsi-target: fetd-vhost: the STML refused this front end: registration refused: this peer is a "
        "manager, not a front end (its key is not in [stml] allowed_front_ends)")
    assert not sock.exists()


def test_a_zeromq_peer_cannot_pass_for_a_stream_front_end(roles_stml, keys, client_factory):
    """The STML names same-host stream peers "\\0stream-N"; a ZeroMQ peer that
    chooses such a routing id (here with a front end's CURVE key) is refused
    at the carrier: it can neither manage as that peer nor write through its
    nexus (review 4: both worked)."""
    victim = "iqn.2026-01.test:victim"
    cli("acl", "add", victim, "--stml", roles_stml.endpoint)
    c = client_factory(roles_stml.endpoint, target=IQN, initiator=victim)
    assert type(c._link._channel).__name__ == "StreamChannel"   # the victim is stream peer 1
    before = c.read(0, 0, 1)
    spoof = RawFrontEnd(roles_stml.tcp, name="\0stream-1",
                        curve=curve_client_keys(str(keys / "fe.key_secret"), str(keys / "stml.key")))
    try:
        spoof.send({"op": "mgmt", "id": 1, "cmd": "acl_add", "args": {"initiator": INTRUDER, "target": IQN}})
        spoof.cmnd(0x777, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), direction=1, length=512, unsol=512,
                   frames=[b"\xab" * 512])
        with pytest.raises(TimeoutError):
            spoof.recv(timeout=2)
    finally:
        spoof.close()
    assert _acl(roles_stml.endpoint) == [victim]
    assert c.read(0, 0, 1) == before
    roles_stml.current.wait_log("routing id 0073747265616d2d31 is reserved")


def test_portal_state_only_from_a_registered_front_end(stml_factory):
    """Only a front end reports which portals it listens on: an unregistered
    peer's report is ignored with a line, not kept (review 4)."""
    stml = stml_factory("ram:4MiB")
    peer = RawFrontEnd(stml.endpoint)
    try:
        peer.send({"op": "portal_state", "follows": True,
                   "portals": [{"host": "127.0.0.1", "port": 3260, "tpgt": 1, "listening": True}]})
        stml.current.wait_log("ignored portal_state from")
        peer.register()
        peer.send({"op": "portal_state", "follows": True, "portals": []})
        peer.send({"op": "mgmt", "id": 1, "cmd": "target_list", "args": {}})   # (refused: a front end)
        assert peer.expect("mgmt_reply")[0]["ok"] is False
    finally:
        peer.close()
    assert stml.current.log().count("ignored portal_state from") == 1


def test_a_front_end_refused_by_one_of_its_stmls_goes_on_to_the_next(stml_factory, tmp_short, keys):
    """With several STMLs (gateways), one refusing (here: it lists the key as a
    manager's) sends the front end to the next, which takes it: the refusal
    ends the front end only once every STML has refused (review 4)."""
    d = tmp_short()
    tcp_a, tcp_b = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    a = stml_factory(data_dir=d / "a", extra=("--config", str(_config(d / "a.toml", keys, tcp_a, [],
                                                                         [str(keys / "fe.key")]))))
    b = stml_factory(data_dir=d / "b", extra=("--config", str(_config(d / "b.toml", keys, tcp_b,
                                                                         [str(keys / "fe.key")], []))))
    for s in (a, b):
        s.current.wait_line(r"stml: listening on tcp://")
    fetd = subprocess.Popen([sys.executable, "-m", "fetd_tcp", "--stml", tcp_a, "--stml", tcp_b, "--portal",
                             f"127.0.0.1:{free_port()}", "--stml-key", str(keys / "stml.key"),
                             "--key", str(keys / "fe.key_secret"), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        b.current.wait_log("(iscsi) registered")
        a.current.wait_log("registration refused: this peer is a manager")
        assert fetd.poll() is None
    finally:
        fetd.terminate()
        _, err = fetd.communicate(timeout=30)
    assert "refused this front end (registration refused: this peer is a manager" in err


READ_1 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])


@pytest.mark.parametrize("tap", [(), ("--inject", "stml:delay portal_state p=1 ms=1")], ids=["plain", "tapped"])
def test_a_front_ends_routing_id_is_not_taken_over_once_its_connection_ends(stml_factory, tmp_short, keys, tap):
    """A ZeroMQ front end is the connection it registered on (decision 0243):
    when that connection ends the STML releases it at once, so a peer that
    connects later with the same routing id (here with another front end's
    key) is a stranger: no nexus, no command, no response of the old one's.
    The same with a tap on the link (messages then take the tapped path)."""
    write_key_pair(keys, "other")
    d = tmp_short()
    tcp = f"tcp://127.0.0.1:{free_port()}"
    cfg = _config(d / "ids.toml", keys, tcp, [str(keys / "fe.key"), str(keys / "other.key")],
                  [str(keys / "mgr.key")])
    stml = stml_factory(data_dir=d / "data", extra=("--config", str(cfg), *tap))
    stml.current.wait_line(r"stml: listening on tcp://")
    name = f"victim-{uuid.uuid4().hex}"
    victim = RawFrontEnd(tcp, name=name, curve=curve_client_keys(str(keys / "fe.key_secret"),
                                                                 str(keys / "stml.key")))
    try:
        victim.register()
        assert victim.nexus(1, target=IQN, initiator=INTRUDER).get("error") is None
        assert victim.command(1, READ_1, direction=2, length=512)[0]["status"] == 0
    finally:
        victim.close()
    stml.current.wait_log(f"releasing front end {name}: its connection closed")

    stranger = RawFrontEnd(tcp, name=name, curve=curve_client_keys(str(keys / "other.key_secret"),
                                                                   str(keys / "stml.key")))
    try:
        stranger.send({"op": "register_nexus", "nexus": 2, "initiator": INTRUDER, "target": IQN, "tpg": 1})
        stranger.cmnd(2, READ_1, nexus=1, direction=2, length=512)
        stranger.send({"op": "heartbeat"})
        # answered in order: everything before this reply answers the three above
        stranger.send({"op": "mgmt", "id": 99, "cmd": "target_list", "args": {}})
        got = []
        while (h := stranger.recv(skip_heartbeats=False)[0])["op"] != "mgmt_reply":
            got.append(h)
    finally:
        stranger.close()
    assert got == [{"op": "release", "reason": "unknown front end: register first"}] * 3
    assert json.loads(cli("frontend", "list", "--stml", stml.endpoint, "--json").stdout) == []
    assert json.loads(cli("session", "list", "--stml", stml.endpoint, "--json").stdout) == []
    assert stml.current.log().count(f"releasing front end {name}") == 1
