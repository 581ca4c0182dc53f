"""Live management of a running target (`scsi-target lun add|resize ...`):
a connected session sees the change after the unit attention, the config
file holds it, a restart keeps it, and hand edits are never overwritten."""
from __future__ import annotations

import re
import struct
import tomllib
from pathlib import Path

import pytest

from fetd_loopback import LoopbackClient
from scsi_target.mgmt import MgmtClient
from stml.config import default_endpoint
from support.cli import cli, mgmt
from support.procs import free_port, run
from support.rawiscsi import RawInitiator
from support.target import IQN as DISK0, Target

IQN = "iqn.2026-11.org.scsi-target:mgmt"
CHECK_CONDITION = 2


def ua_of(sense: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed or descriptor sense data."""
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0xF, sense[2], sense[3]
    return sense[2] & 0xF, sense[12], sense[13]


def tur(ini: RawInitiator, lun: int) -> tuple[int, bytes]:
    status, sense, _ = ini.command(bytes(6), lun)
    return status, sense


def assert_dropped(ini: RawInitiator) -> None:
    """fetd_tcp ended the session: an Async Message "drop all connections",
    then the connection closes."""
    from fetd_tcp import pdu as P
    msg, _ = ini.recv()
    assert isinstance(msg, P.AsyncMessage) and msg.event == P.ASYNC_DROP_ALL_CONNECTIONS
    assert ini.sock.recv(1) == b""          # closed by fetd_tcp


def report_luns(ini: RawInitiator) -> list[int]:
    status, sense, data = ini.command(struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 4096, 0, 0),
                                      0, read=4096)
    assert status == 0, sense
    n = struct.unpack(">I", data[:4])[0] // 8
    return [struct.unpack(">H", data[8 + 8 * i:10 + 8 * i])[0] & 0x3FFF for i in range(n)]


def unit_serial(ini: RawInitiator, lun: int) -> str:
    """PRODUCT SERIAL NUMBER (VPD 0x80), after any unit attention."""
    for _ in range(3):
        status, sense, data = ini.command(bytes([0x12, 1, 0x80, 0, 255, 0]), lun, read=255)
        if status == 0:
            return data[4:4 + data[3]].decode()
    raise AssertionError(f"INQUIRY VPD 0x80 failed: {sense.hex()}")


def capacity(ini: RawInitiator, lun: int) -> int:
    status, sense, data = ini.command(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), lun, read=32)
    assert status == 0, sense
    last, bs = struct.unpack(">QI", data[:12])
    return (last + 1) * bs


@pytest.fixture
def config(tmp_path):
    cfg = tmp_path / "target.toml"
    cfg.write_text(f'[[target]]\nname = "{IQN}"\n\n[[target.lun]]\nbackend = "file"\n'
                   f'path = "lun0.img"\nsize = "16MiB"\n')
    return cfg


def test_lun_add_and_resize_live(config, tmp_path, tmp_short):
    t = Target(config=str(config), data_dir=str(tmp_short()))   # kept for the restart
    try:
        host, port = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:mgmt")
        ini.login(IQN)
        assert tur(ini, 0)[0] == 0
        assert report_luns(ini) == [0]

        added = mgmt(t.data_dir, "lun", "add", "--target", IQN, "ram:8MiB")
        assert added["lun"] == 1 and "saved" in added["saved"]
        status, sense = tur(ini, 0)
        assert status == CHECK_CONDITION and ua_of(sense) == (6, 0x3F, 0x0E)   # REPORTED LUNS DATA HAS CHANGED
        assert report_luns(ini) == [0, 1]
        assert capacity(ini, 1) == 8 << 20

        resized = mgmt(t.data_dir, "lun", "resize", "--target", IQN, "0", "32MiB")
        assert resized["size"] == 32 << 20
        status, sense = tur(ini, 0)
        assert status == CHECK_CONDITION and ua_of(sense) == (6, 0x2A, 0x09)   # CAPACITY DATA HAS CHANGED
        assert capacity(ini, 0) == 32 << 20
        ini.write16(0, b"\x5a" * 4096, lun=1)
        assert ini.read16(0, 8, lun=1) == b"\x5a" * 4096
        serial = unit_serial(ini, 1)
        ini.close()

        # the table output reads well too
        table = cli("lun", "list", "--data-dir", t.data_dir).stdout
        assert "32.0MiB" in table and "8.0MiB" in table and "BACKEND" in table

        saved = tomllib.loads(config.read_text())
        luns = saved["target"][0]["lun"]
        lu_id = luns[1].pop("id")   # the added LU's random identity, saved with it
        # the size the resize saved, as a person writes it; the new LUN in full
        assert luns[0]["size"] == "32MiB" and luns[1] == {"lun": 1, "backend": "ram", "size": "8MiB"}
        assert re.fullmatch(r"[0-9a-f]{32}", lu_id) and serial == lu_id[:16]
        assert "OK" in cli("config", "check", "--config", str(config)).stdout
    finally:
        t.stop()

    # a restart keeps both changes
    t = Target(config=str(config), data_dir=t.data_dir)
    try:
        luns = {x["lun"]: x for x in mgmt(t.data_dir, "lun", "list")}
        assert luns[0]["size"] == 32 << 20 and luns[1]["size"] == 8 << 20
        out = run(["iscsi-readcapacity16", t.url(0, IQN)]).stdout
        assert str(32 << 20) in out or f"Last LBA:{(32 << 20) // 512 - 1}" in out.replace(" ", "")
        ini = RawInitiator(host, int(t.portal.rsplit(":", 1)[1]), initiator="iqn.2026-11.org.test:mgmt")
        ini.login(IQN)
        assert unit_serial(ini, 1) == serial   # the same identity after the restart
        ini.close()

        # an edit by hand since load is not overwritten
        config.write_text(config.read_text() + "# edited by hand\n")
        p = cli("lun", "add", "--data-dir", t.data_dir, "ram:4MiB", check=False)
        assert p.returncode == 2 and "edited since the STML loaded it" in p.stderr
        assert 2 not in {x["lun"] for x in mgmt(t.data_dir, "lun", "list")}
        assert config.read_text().endswith("# edited by hand\n")
    finally:
        t.stop()


def test_targets_acl_chap_sessions(config, tmp_path):
    t = Target(config=str(config))
    try:
        d = t.data_dir
        other = "iqn.2026-11.org.scsi-target:second"
        mgmt(d, "target", "add", other, "--alias", "second one")
        mgmt(d, "lun", "add", "--target", other, "ram:4MiB")
        names = {x["name"]: x for x in mgmt(d, "target", "list")}
        assert names[other]["luns"] == 1 and names[other]["alias"] == "second one"
        # the front end learned the new target: discovery and login work at once
        out = run(["iscsi-inq", t.url(0, other)]).stdout
        assert "DIRECT_ACCESS" in out

        acl = mgmt(d, "acl", "add", "--target", other, "iqn.2026-11.org.test:allowed")
        assert acl["acl"] == ["iqn.2026-11.org.test:allowed"]
        p = run(["iscsi-inq", t.url(0, other)], check=False)
        assert p.returncode != 0          # libiscsi's default initiator name is not in the ACL
        # the last entry: an empty ACL admits anyone, so that needs saying (docs/decisions/0276)
        p = cli("acl", "remove", "--data-dir", d, "--target", other, "iqn.2026-11.org.test:allowed",
                check=False)
        assert p.returncode == 2 and "any initiator may log in; pass --allow-any" in p.stderr
        assert run(["iscsi-inq", t.url(0, other)], check=False).returncode != 0
        mgmt(d, "acl", "remove", "--target", other, "iqn.2026-11.org.test:allowed", "--allow-any")
        p = cli("chap", "set", "--data-dir", d, "--target", other, "--user", "u", "--secret", "short",
                check=False)
        assert p.returncode == 2 and "12 to 255 bytes" in p.stderr
        # mutual CHAP alone would let anyone in: refused, and CHAP cannot go while it is set
        p = cli("chap", "set", "--data-dir", d, "--target", other, "--mutual", "--user", "t",
                "--secret", "target-secret-1", check=False)
        assert p.returncode == 2 and "`chap set --user U --secret S` first" in p.stderr
        mgmt(d, "chap", "set", "--target", other, "--user", "u", "--secret", "twelve-bytes-secret")
        mgmt(d, "chap", "set", "--target", other, "--mutual", "--user", "t", "--secret", "target-secret-1")
        p = cli("chap", "set", "--data-dir", d, "--target", other, check=False)
        assert p.returncode == 2 and "turn it off first (`chap set --mutual`)" in p.stderr
        mgmt(d, "chap", "set", "--target", other, "--mutual")
        assert run(["iscsi-inq", t.url(0, other)], check=False).returncode != 0
        assert run(["iscsi-inq", t.url(0, other, auth="u%twelve-bytes-secret@")]).returncode == 0
        mgmt(d, "chap", "set", "--target", other)

        host, port = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:lister")
        ini.login(other)
        sessions = mgmt(d, "session", "list")
        assert any(s["initiator"].startswith("iqn.2026-11.org.test:lister") for s in sessions)
        fes = mgmt(d, "frontend", "list")
        assert [f["kind"] for f in fes] == ["iscsi"]
        assert mgmt(d, "portal", "list")
        p = cli("target", "remove", "--data-dir", d, other, check=False)
        assert p.returncode == 2 and "--force" in p.stderr
        ini.close()

        saved = tomllib.loads(config.read_text())
        second = next(x for x in saved["target"] if x["name"] == other)
        assert second["alias"] == "second one" and "chap" not in second and "acl" not in second
        cli("target", "remove", "--data-dir", d, other, "--force")
        assert other not in tomllib.loads(config.read_text()).get("target", [{}])[-1].get("name", "")
    finally:
        t.stop()


def _send_targets(port: int) -> list[str]:
    ini = RawInitiator("127.0.0.1", port, initiator="iqn.2026-11.org.test:disc")
    try:
        assert ini.login(None, session_type="Discovery").status_class == 0
        return [v for k, v in ini.text([("SendTargets", "All")]) if k == "TargetAddress"]
    finally:
        ini.close()


def _refused(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_portal_add_remove_live(tmp_path, tmp_short):
    """`portal add|remove` on a running target: fetd_tcp (started without --portal,
    as `run` starts it) opens and closes listeners; discovery lists the new
    TargetAddress; the config keeps the list across a restart."""
    cfg = tmp_path / "target.toml"
    cfg.write_text(f'portals = ["127.0.0.1:0"]\n\n[[target]]\nname = "{IQN}"\n\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n')
    t = Target(config=str(cfg), data_dir=str(tmp_short()), portals=(), expect_portals=1)
    p1, p2 = free_port(), free_port()
    try:
        d = t.data_dir
        first = int(t.portal.rsplit(":", 1)[1])
        added = mgmt(d, "portal", "add", f"127.0.0.1:{p1},2")
        assert added["tpgt"] == 2 and "saved" in added["saved"]
        t.wait_log(f"fetd_tcp: listening on 127.0.0.1:{p1} (tpgt 2)")
        assert f"127.0.0.1:{p1},2" in _send_targets(p1)          # the new portal answers discovery
        assert f"127.0.0.1:{p1},2" in _send_targets(first)       # and the old one lists it
        assert "DIRECT_ACCESS" in run(["iscsi-inq", f"iscsi://127.0.0.1:{p1}/{IQN}/0"]).stdout
        assert [x["tpgt"] for x in mgmt(d, "portal", "list")] == [1, 2]
        assert tomllib.loads(cfg.read_text())["portals"] == ["127.0.0.1:0", f"127.0.0.1:{p1},2"]
        p = cli("portal", "add", "--data-dir", d, f"127.0.0.1:{p1}", check=False)
        assert p.returncode == 2 and "already" in p.stderr

        # a session on the portal outlives its removal; new connections are refused
        ini = RawInitiator("127.0.0.1", p1, initiator="iqn.2026-11.org.test:stay")
        ini.login(IQN)
        mgmt(d, "portal", "remove", f"127.0.0.1:{p1}")
        t.wait_log(f"fetd_tcp: stopped listening on 127.0.0.1:{p1}")
        assert _refused(p1)
        assert tur(ini, 0)[0] in (0, CHECK_CONDITION)
        ini.close()
        assert f"127.0.0.1:{p1},2" not in _send_targets(first)
        assert tomllib.loads(cfg.read_text())["portals"] == ["127.0.0.1:0"]
        p = cli("portal", "remove", "--data-dir", d, f"127.0.0.1:{p1}", check=False)
        assert p.returncode == 2 and "no portal" in p.stderr
        mgmt(d, "portal", "add", f"127.0.0.1:{p2}")
        t.wait_log(f"fetd_tcp: listening on 127.0.0.1:{p2} (tpgt 1)")
    finally:
        t.stop()

    t = Target(config=str(cfg), data_dir=t.data_dir, portals=(), expect_portals=2)
    try:
        assert f"127.0.0.1:{p2}" in t.portals
        assert f"127.0.0.1:{p2},1" in _send_targets(p2)
        assert _refused(p1)
    finally:
        t.stop()


def test_session_drop(config):
    """`session drop`: the front end sends an Async Message (drop all connections),
    closes the connection, and the session is gone from `session list`."""
    t = Target(config=str(config))
    try:
        d = t.data_dir
        host, port = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:victim")
        ini.login(IQN)
        keep = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:keeper")
        keep.login(IQN)
        sessions = mgmt(d, "session", "list")
        victim = next(s for s in sessions if s["initiator"].startswith("iqn.2026-11.org.test:victim"))
        dropped = mgmt(d, "session", "drop", str(victim["nexus"]))
        assert dropped["nexus"] == victim["nexus"] and dropped["target"] == IQN

        from fetd_tcp import pdu as P
        msg, _ = ini.recv()
        assert isinstance(msg, P.AsyncMessage) and msg.event == P.ASYNC_DROP_ALL_CONNECTIONS
        with pytest.raises((ConnectionError, OSError)):
            ini.recv()
        ini.close()
        left = [s["initiator"] for s in mgmt(d, "session", "list")]
        assert not any(i.startswith("iqn.2026-11.org.test:victim") for i in left)
        assert any(i.startswith("iqn.2026-11.org.test:keeper") for i in left)
        assert tur(keep, 0)[0] == 0          # the other session is untouched
        keep.close()

        p = cli("session", "drop", "--data-dir", d, "9999", check=False)
        assert p.returncode == 2 and "no session 9999" in p.stderr
        assert "session drop" in t.log() or "dropped" in t.log()
    finally:
        t.stop()


def test_target_remove_force_ends_its_sessions(config):
    """`target remove --force` of a target with a session: fetd_tcp is told
    to drop its nexus (Async Message: drop all connections) and closes the
    connection, instead of keeping a session of a target that is gone; a
    session of another target is untouched (docs/decisions/0265)."""
    t = Target(config=str(config))
    try:
        d = t.data_dir
        other = "iqn.2026-11.org.scsi-target:doomed"
        mgmt(d, "target", "add", other)
        mgmt(d, "lun", "add", "--target", other, "ram:4MiB")
        host, port = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:doomed")
        keep = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:keeper")
        try:
            assert ini.login(other).status_class == 0 and keep.login(IQN).status_class == 0
            assert tur(ini, 0)[0] == 0
            cli("target", "remove", "--data-dir", d, other, "--force")
            assert_dropped(ini)
            left = [s["initiator"] for s in mgmt(d, "session", "list")]
            assert not any(i.startswith("iqn.2026-11.org.test:doomed") for i in left)
            assert tur(keep, 0)[0] == 0
        finally:
            ini.close()
            keep.close()
        assert other not in [x["name"] for x in mgmt(d, "target", "list")]
    finally:
        t.stop()


def test_an_acl_change_ends_the_sessions_it_no_longer_admits(config):
    """An initiator an ACL change leaves out (`acl add` of another, or a
    reloaded hand edit) loses its session at once: fetd_tcp sends drop all
    connections and closes them, as for `target remove --force`, instead of
    the session reading and writing on until its next login. Sessions the ACL
    still admits go on (docs/decisions/0275)."""
    t = Target(config=str(config))
    try:
        d = t.data_dir
        host, port = t.portal.rsplit(":", 1)
        stranger = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:stranger")
        friend = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:friend")
        try:
            assert stranger.login(IQN).status_class == 0 and friend.login(IQN).status_class == 0
            assert tur(stranger, 0)[0] == 0
            assert mgmt(d, "acl", "add", "iqn.2026-11.org.test:friend")["sessions_ended"] == 1
            assert_dropped(stranger)
            assert tur(friend, 0)[0] == 0
            left = [s["initiator"] for s in mgmt(d, "session", "list")]
            assert len(left) == 1 and left[0].startswith("iqn.2026-11.org.test:friend")

            config.write_text(config.read_text().replace("org.test:friend", "org.test:someone"))
            mgmt(d, "config", "reload")
            assert_dropped(friend)
            assert mgmt(d, "session", "list") == []
            again = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:friend")
            assert again.login(IQN).status_class == 2    # and the next login is refused
            again.close()
        finally:
            stranger.close()
            friend.close()
    finally:
        t.stop()


def test_turning_chap_on_ends_the_sessions_that_did_not_authenticate(config):
    """`chap set` on a target without CHAP (or a reloaded hand edit that adds
    `chap`) ends every session of that target: none authenticated, and the
    administrator who turns CHAP on believes unauthenticated hosts are out.
    A session of another target goes on; so do the sessions when the
    credentials are changed later, or CHAP turned off (docs/decisions/0288)."""
    t = Target(config=str(config))
    try:
        d = t.data_dir
        other = "iqn.2026-11.org.scsi-target:other"
        mgmt(d, "target", "add", other)
        mgmt(d, "lun", "add", "--target", other, "ram:4MiB")
        host, port = t.portal.rsplit(":", 1)
        open_ = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:unauthenticated")
        keep = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:keeper")
        local = LoopbackClient(f"ipc://{d}/stml.sock", target=IQN, timeout=10).open()   # no CHAP
        try:
            assert open_.login(IQN).status_class == 0 and keep.login(other).status_class == 0
            assert tur(open_, 0)[0] == 0
            local.capacity(0)
            r = mgmt(d, "chap", "set", "--target", IQN, "--user", "u", "--secret", "twelve-bytes-1")
            assert r["sessions_ended"] == 1
            assert_dropped(open_)
            assert tur(keep, 0)[0] == 0
            local.capacity(0)
            again = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:unauthenticated")
            assert again.login(IQN).status_class == 2     # its next login (no CHAP) is refused
            again.close()
            assert mgmt(d, "chap", "set", "--target", other, "--user", "u", "--secret",
                        "twelve-bytes-2")["sessions_ended"] == 1     # the keeper's target now
            assert_dropped(keep)
        finally:
            open_.close()
            keep.close()
            local.close()
        assert mgmt(d, "chap", "set", "--target", IQN, "--user", "v", "--secret",
                    "twelve-bytes-3")["sessions_ended"] == 0
        assert mgmt(d, "chap", "set", "--target", IQN)["sessions_ended"] == 0
        late = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:late")
        try:
            assert late.login(IQN).status_class == 0
            text = config.read_text()
            assert "chap" not in text.split(f'name = "{other}"')[0]
            config.write_text(text.replace(f'name = "{IQN}"\n',
                                           f'name = "{IQN}"\nchap = {{user = "w", secret = "twelve-bytes-4"}}\n'))
            mgmt(d, "config", "reload")
            assert_dropped(late)
        finally:
            late.close()
    finally:
        t.stop()


def test_turning_discovery_chap_on_ends_the_discovery_sessions(config):
    """A reload that sets `discovery_chap` ends the discovery sessions (none
    authenticated: SendTargets went on answering them), as turning a target's
    CHAP on ends its sessions; Normal sessions go on (decision 0211)."""
    t = Target(config=str(config))
    try:
        host, port = t.portal.rsplit(":", 1)
        disc = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:discoverer")
        normal = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:normal")
        try:
            disc.login(None, session_type="Discovery")
            assert ("TargetName", IQN) in disc.text([("SendTargets", "All")])
            assert normal.login(IQN).status_class == 0
            config.write_text('discovery_chap = {user = "d", secret = "discovery-secret"}\n'
                              + config.read_text())
            mgmt(t.data_dir, "config", "reload")
            assert_dropped(disc)
            assert tur(normal, 0)[0] == 0
            again = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:discoverer")
            assert again.login(None, session_type="Discovery").status_class == 2   # no CHAP: refused
            again.close()
            assert "1 discovery session(s) ended: discovery now requires CHAP" in t.log()
        finally:
            disc.close()
            normal.close()
    finally:
        t.stop()


@pytest.mark.parametrize("value", [2 ** 64, "tomlkit"], ids=["int past 64 bits", "tomlkit String"])
def test_a_result_the_codec_cannot_pack_is_answered_with_an_error(value, caplog) -> None:
    """A command whose result msgspec refuses to pack still gets a reply,
    ok=False with a one-line error, logged; the next request is answered."""
    import asyncio
    import logging
    from types import SimpleNamespace

    import tomlkit

    from stml.api import pack, unpack
    from stml.api.link import StmlSender
    from stml.mgmt import Management

    result = tomlkit.string("x") if value == "tomlkit" else value
    sent: list[dict] = []

    def transport(ident: bytes, header: dict, frames: list) -> None:
        sent.append(unpack(pack(header)))   # what the carriers do: pack, then send

    engine = SimpleNamespace(out=StmlSender(transport))
    m = Management(engine, None, gateway=None, metrics=None, portals=None,   # type: ignore[arg-type]
                   endpoints=[], traces=None)   # type: ignore[arg-type]

    async def odd() -> object:
        return {"value": result}

    async def fine() -> object:
        return {"value": 1}

    m._cmds.update(odd=odd, fine=fine)
    caplog.set_level(logging.ERROR, logger="stml.mgmt")
    asyncio.run(m._answer(b"peer", {"op": "mgmt", "id": 7, "cmd": "odd"}))
    asyncio.run(m._answer(b"peer", {"op": "mgmt", "id": 8, "cmd": "fine"}))
    assert [(r["id"], r["ok"]) for r in sent] == [(7, False), (8, True)]
    prefix = "internal error: the result cannot be sent: "
    detail = sent[0]["error"].removeprefix(prefix)
    assert sent[0]["error"] == prefix + detail and detail and "\n" not in detail
    assert sent[1]["result"] == {"value": 1}
    assert [r.getMessage() for r in caplog.records] == [
        f"management command odd: its result cannot be sent: {detail}"]


def test_session_drop_looks_its_nexus_up_instead_of_walking_every_session() -> None:
    """`session drop N` finds nexus N with one look-up per front end (their
    nexuses are kept by number), not by visiting each of the thousands of
    sessions in one step of the event loop (0267); it still drops it."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from stml.api import Op
    from stml.emulator import Emulator, Target
    from stml.mgmt import Management

    sent: list[dict] = []
    emu = Emulator([], lambda ident, h, f: sent.append(h), ThreadPoolExecutor(1))
    emu.targets[IQN] = Target(IQN, {}, "", {"acl": []})
    m = Management(emu, None, gateway=None, metrics=None, portals=None,   # type: ignore[arg-type]
                   endpoints=[], traces=None)   # type: ignore[arg-type]
    for fe in (b"fe1", b"fe2"):
        emu.handle(fe, {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": fe.decode(),
                        "heartbeat_ms": 1000}, [])
    for n in range(1, 501):
        emu.handle(b"fe1", {"op": Op.REGISTER_NEXUS, "nexus": n, "initiator": f"iqn.2026-11.org.test:{n}",
                            "target": IQN, "tpg": 1}, [])
    visits = [0]

    class Counted(dict):
        def values(self):  # type: ignore[override]
            for v in super().values():
                visits[0] += 1
                yield v
    for fe in emu.front_ends.values():
        fe.nexuses = Counted(fe.nexuses)
    result = asyncio.run(m.session_drop(400))
    assert result == {"front_end": "fe1", "nexus": 400, "initiator": "iqn.2026-11.org.test:400", "target": IQN}
    assert 400 not in emu.front_ends[b"fe1"].nexuses and len(emu.front_ends[b"fe1"].nexuses) == 499
    assert [h["nexus"] for h in sent if h["op"] == Op.DROP_NEXUS] == [400]
    assert visits[0] == 0


TASK_ABORTED = 0x40


def _answer_until(ini: RawInitiator, want: type) -> tuple:
    """The next PDU of type `want`, answering the target's NOP-In pings meanwhile."""
    from fetd_tcp import pdu as P
    while True:
        pdu, seg = ini.recv()
        if isinstance(pdu, want):
            return pdu, seg
        if isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG:
            ini.send(P.NopOut(P.RESERVED_TAG, pdu.ttt, ini.cmd_sn, ini.exp_stat_sn, immediate=True))


def test_lun_remove_lets_a_write_in_flight_finish_and_aborts_it_past_the_drain(tmp_path):
    """A WRITE whose Data-Out is still to come when its LUN is removed
    finishes, as LIO lets it: its data lands in the removed LU's file and it
    answers GOOD (0219). A
    WRITE whose initiator holds its Data-Out past the drain is aborted (TASK
    ABORTED), the backend closes, and the late Data-Out is dropped: the file
    added after (which may get the removed LUN's descriptor number: the
    review's fdreuse3, 0254) keeps its zeros."""
    from fetd_tcp import pdu as P
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    data = b"DATA" * 1024
    with Target("--lun", f"file:{a},size=4MiB") as t:
        host, port = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(port), timeout=20)
        ini.login(DISK0, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])

        def write(lun: int) -> tuple[int, P.R2T]:
            itt = ini._next_itt()
            cdb = struct.pack(">BBQIBB", 0x8A, 0, 0, 8, 0, 0)   # WRITE(16), 8 blocks at LBA 0
            ini.send(P.ScsiCommand(itt, P.int_to_lun(lun), cdb.ljust(16, b"\0"), 4096, ini.cmd_sn,
                                   ini.exp_stat_sn, read=False, write=True, data_length=0))
            ini.cmd_sn += 1
            r2t, _ = _answer_until(ini, P.R2T)
            assert r2t.itt == itt
            return itt, r2t

        def data_out(itt: int, r2t: P.R2T, lun: int, payload: bytes) -> None:
            ini.send(P.DataOut(itt, r2t.ttt, 0, 0, True, ini.exp_stat_sn, P.int_to_lun(lun), len(payload)),
                     payload)

        itt, r2t = write(0)
        MgmtClient(default_endpoint(Path(t.data_dir))).call("lun_remove", lun=0)   # its data follows at once
        data_out(itt, r2t, 0, data)
        resp, _ = _answer_until(ini, P.ScsiResponse)
        assert (resp.itt, resp.status) == (itt, 0)
        assert mgmt(t.data_dir, "lun", "add", "--target", DISK0, "--lun", "5", f"file:{b},size=4MiB")["lun"] == 5
        t.wait_log("LUN 0 removed: its backend is closed", 20)
        status, sense = tur(ini, 0)                 # a new command: no such LU
        assert (status, ua_of(sense)) == (CHECK_CONDITION, (0x5, 0x25, 0x00))

        itt, r2t = write(5)                         # its data held past the drain
        mgmt(t.data_dir, "lun", "remove", "--target", DISK0, "5")
        resp, _ = _answer_until(ini, P.ScsiResponse)
        assert (resp.itt, resp.status) == (itt, TASK_ABORTED)
        t.wait_log("LUN 5 removed: its backend is closed", 20)
        assert "LUN 5 removed: 1 command(s) still in flight after" in t.log()
        assert mgmt(t.data_dir, "lun", "add", "--target", DISK0, "--lun", "6", f"file:{c},size=4MiB")["lun"] == 6
        data_out(itt, r2t, 5, b"EVIL" * 1024)
        # a command after it on LUN 6: the Data-Out was handled (dropped) before its answer
        assert tur(ini, 6)[0] in (0, CHECK_CONDITION)
        status, sense, got = ini.command(struct.pack(">BBQIBB", 0x88, 0, 0, 8, 0, 0), 6, read=4096)
        assert status == 0 and got == bytes(4096), (status, sense)
    assert a.read_bytes()[:4096] == data
    assert b.read_bytes()[:4096] == bytes(4096)
    assert c.read_bytes()[:4096] == bytes(4096)


def test_a_target_reset_ends_a_removed_luns_commands_before_it_answers(tmp_path):
    """A removed LUN's commands in flight may run on (0219), but they are
    still the target's: a TARGET WARM RESET during the drain aborts them
    before it answers, as SAM orders, not 3 s after it (review 11)."""
    from fetd_tcp import pdu as P
    config = tmp_path / "target.toml"
    config.write_text(f'[[target]]\nname = "{DISK0}"\ntarget_reset = true\n'
                      f'[[target.lun]]\nlun = 0\nbackend = "file"\npath = "{tmp_path / "a.img"}"\n'
                      f'size = "4MiB"\n[[target.lun]]\nlun = 1\nbackend = "ram"\nsize = "4MiB"\n')
    with Target(config=str(config)) as t:
        host, port = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(port), timeout=20)
        ini.login(DISK0, extra=[("ImmediateData", "No"), ("InitialR2T", "Yes")])
        itt = ini._next_itt()
        ini.send(P.ScsiCommand(itt, P.int_to_lun(0), struct.pack(">BBQIBB", 0x8A, 0, 0, 8, 0, 0).ljust(16, b"\0"),
                               4096, ini.cmd_sn, ini.exp_stat_sn, read=False, write=True, data_length=0))
        ini.cmd_sn += 1
        _answer_until(ini, P.R2T)                   # its data held: in flight
        MgmtClient(default_endpoint(Path(t.data_dir))).call("lun_remove", lun=0)
        tag = ini._next_itt()
        ini.send(P.TaskMgmtRequest(tag, P.TMF_TARGET_WARM_RESET, P.int_to_lun(1), P.RESERVED_TAG, ini.cmd_sn,
                                   ini.exp_stat_sn, immediate=True))
        resp, _ = _answer_until(ini, P.TaskMgmtResponse)
        assert (resp.itt, resp.response) == (tag, 0)
        t.wait_log("LUN 0 removed: its backend is closed", 20)
        assert "still in flight after" not in t.log()   # the reset had ended it: nothing left to abort
        status, _ = tur(ini, 1)                     # and its late answer never comes
        assert status in (0, CHECK_CONDITION)


def test_a_keyless_call_to_a_silent_tcp_stml_names_the_keys() -> None:
    """A tcp:// STML with CURVE never answers a keyless client: the CLI's
    timeout names --stml-key/--key, not only "busy or stuck" (trial UT)."""
    import zmq
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.curve_server = True
    server.curve_publickey, server.curve_secretkey = zmq.curve_keypair()
    port = server.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(TimeoutError, match=r"--stml-key and --key"):
            MgmtClient(f"tcp://127.0.0.1:{port}", timeout=0.3).call("lun_list")
    finally:
        server.close()
