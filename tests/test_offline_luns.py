"""A LUN whose store cannot open is served offline (docs/decisions/0280):
the target starts and restarts with every other LUN serving, the LUN answers
NOT READY, MANUAL INTERVENTION REQUIRED (02/04/03) under its own identity,
a missing file of a LUN served before is never created anew, and a reload
that finds the store again brings the LUN online with NOT READY TO READY
CHANGE (06/28/00). Real processes: `scsi-target run`, its supervisor's
restart of a killed STML, the loopback client and libiscsi's tools."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomlkit

from fetd_loopback import LoopbackClient
from support.procs import pid_alive, run
from support.target import IQN, Target
from stml.lu import legacy_id

CLI = [sys.executable, "-m", "scsi_target"]
MANUAL_INTERVENTION = (0x02, (0x04, 0x03))
TUR = bytes(6)
READ16 = bytes([0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def mgmt(ddir: str, *args: str):
    p = cli(*args, "--data-dir", ddir, "--json")
    assert p.returncode == 0, f"{args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def sense(c: LoopbackClient, lun: int, cdb: bytes, data_in: int = 0) -> tuple[int | None, tuple[int, int] | None]:
    r = c.execute(lun, cdb, data_in=data_in)
    return r.sense_key, r.asc_ascq


def naa(c: LoopbackClient, lun: int) -> str:
    """The NAA designator of VPD 0x83: the LU's identity."""
    devid = c.inquiry(lun, 0x83)
    pos = 4
    while pos + 4 <= len(devid):
        n = devid[pos + 3]
        if devid[pos + 1] & 0x0F == 3:
            return devid[pos + 4:pos + 4 + n].hex()
        pos += 4 + n
    raise AssertionError("no NAA designator")


def add_lun_by_hand(cfg: Path, entry: dict) -> None:
    doc = tomlkit.parse(cfg.read_text())
    lun = tomlkit.table()
    lun.update(entry)
    target = next(t for t in doc["target"] if t["name"] == IQN)
    if "lun" not in target:
        target["lun"] = tomlkit.aot()
    target["lun"].append(lun)
    cfg.write_text(tomlkit.dumps(doc))


@pytest.fixture
def ddir(tmp_short):
    return str(tmp_short())


def test_a_lun_that_cannot_open_is_offline_after_the_stml_restarts(ddir):
    """Failure 1 of the trial: a hand-added LUN whose file does not exist, not
    applied by a reload, stayed in the file; the STML's restart after a crash
    failed on it with exit 2 and `run` stopped for good. Now the restart
    serves it offline: LUN 0 keeps its data (loopback and iSCSI), LUN 1 is
    listed with its identity and answers 02/04/03; ls/status/lun list say why;
    the file is restored, a reload brings it online with 06/28/00; it can be
    removed."""
    mark = os.urandom(512)
    missing = Path(ddir) / "later.img"
    cfg = Path(ddir) / "scsi-target.toml"
    with Target("--lun", f"file:{ddir}/a.img,size=4MiB", data_dir=ddir) as t:
        endpoint = f"ipc://{ddir}/stml.sock"
        with LoopbackClient(endpoint, timeout=10) as c:
            c.write(0, 5, mark)
        add_lun_by_hand(cfg, {"lun": 1, "backend": "file", "path": str(missing)})
        r = mgmt(ddir, "config", "reload")
        assert r["applied"] == [] and len(r["not_applied"]) == 1, r
        assert "a start with this file serves it offline" in r["not_applied"][0], r

        t.kill_stml()
        assert cli("wait-ready", "--data-dir", ddir, "--timeout", "30").returncode == 0, t.log()
        assert "refused its configuration" not in t.log()
        line = t.wait_log(f"LUN 1 (file {missing}) is offline")
        assert f"is offline: {missing}: does not exist and no size was given to create it" in line
        with LoopbackClient(endpoint, timeout=10) as c:
            assert c.luns == [0, 1]
            assert c.read(0, 5, 1) == mark
            assert sense(c, 1, TUR) == MANUAL_INTERVENTION
            assert sense(c, 1, READ16, 512) == MANUAL_INTERVENTION
            assert sense(c, 1, bytes([0x1B, 0, 0, 0, 1, 0])) == MANUAL_INTERVENTION   # START STOP UNIT
            assert c.inquiry(1)[0] == 0x00      # INQUIRY answers: a disk, present
        # a real initiator: LUN 0 serves; libiscsi's TEST UNIT READY after login meets 02/04/03
        assert "Total size:4194304" in run(["iscsi-readcapacity16", t.url(0)]).stdout
        p = run(["iscsi-inq", t.url(1)], check=False)
        assert p.returncode != 0 and "NOT READY(2)" in p.stderr and "0x0403" in p.stderr, p
        luns = {x["lun"]: x for x in mgmt(ddir, "lun", "list")}
        assert luns[0]["offline"] is None
        assert "does not exist" in luns[1]["offline"]
        assert "LUN 1 of " + IQN + ": OFFLINE (" in cli("status", "--data-dir", ddir).stdout
        assert "lun 1 [OFFLINE, file, " in cli("ls", "--data-dir", ddir, "--wide").stdout
        # the file is unchanged: the LUN is still there, as it was written
        assert tomllib.loads(cfg.read_text())["target"][0]["lun"][1] == {
            "lun": 1, "backend": "file", "path": str(missing)}

        # restored: a reload opens it, and a nexus learns it as a new medium
        missing.write_bytes(b"\x77" * (1 << 20))
        with LoopbackClient(endpoint, timeout=10) as c:
            assert sense(c, 1, TUR) == MANUAL_INTERVENTION
            r = mgmt(ddir, "config", "reload")
            assert f"target {IQN} LUN 1 online" in r["applied"], r
            assert sense(c, 1, TUR) == (0x06, (0x28, 0x00))
            assert sense(c, 1, TUR) == (0x06, (0x2A, 0x09))     # CAPACITY DATA HAS CHANGED
            assert sense(c, 1, TUR) == (None, None)
            assert c.read(1, 3, 1) == b"\x77" * 512
            assert c.capacity(1) == (2048, 512)
        assert mgmt(ddir, "lun", "list")[1]["offline"] is None
        assert "OFFLINE" not in cli("status", "--data-dir", ddir).stdout


def test_an_offline_lun_can_be_removed(ddir):
    """`lun remove` of an offline LUN: gone from the running configuration
    and the file; the others serve on."""
    cfg = Path(ddir) / "scsi-target.toml"
    with Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0) as t:
        add_lun_by_hand(cfg, {"lun": 3, "backend": "file", "path": f"{ddir}/nope/x.img", "size": "1MiB"})
        t.kill_stml()
        t.wait_log("LUN 3 (file ")
        assert mgmt(ddir, "lun", "list")[1]["offline"]
        p = cli("lun", "resize", "3", "2MiB", "--data-dir", ddir)
        assert p.returncode != 0 and "LUN 3 is offline (" in p.stderr, p
        mgmt(ddir, "lun", "remove", "3")
        assert [x["lun"] for x in mgmt(ddir, "lun", "list")] == [0]
        assert [x["lun"] for x in tomllib.loads(cfg.read_text())["target"][0]["lun"]] == [0]
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            assert c.luns == [0] and sense(c, 0, TUR) == (None, None)


def test_a_deleted_file_of_a_lun_served_before_is_not_created_again(ddir, tmp_path):
    """Failure 2 of the trial: a file LUN with `size` whose file was deleted
    (its disk not mounted at boot) was created anew at the next start, blank,
    under the same identity. Now the LUN is offline with the reason, the file
    is not created, and restoring it then reloading serves its data again
    (after 06/28/00) under the same identity."""
    mark = os.urandom(4096)
    img = Path(ddir) / "disk.img"
    saved = tmp_path / "disk.img.saved"
    with Target("--no-iscsi", "--lun", "ram:4MiB", "--lun", f"file:{img},size=8MiB", data_dir=ddir,
                portals=(), expect_portals=0):
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            c.write(1, 100, mark)
            c.synchronize_cache(1)
            before = naa(c, 1)
    shutil.move(img, saved)
    with Target("--no-iscsi", data_dir=ddir, portals=(), expect_portals=0) as t:
        line = t.wait_log("LUN 1 (file ")
        assert "is missing; it was served before: restore it or remove the LUN" in line
        assert f"LUN 1: OFFLINE (its file is missing; it was served before) file {img}" in line   # banner
        assert not img.exists()
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            assert c.luns == [0, 1]
            assert naa(c, 1) == before
            assert sense(c, 1, READ16, 512) == MANUAL_INTERVENTION
            assert "was served before" in mgmt(ddir, "lun", "list")[1]["offline"]
            shutil.move(saved, img)
            r = mgmt(ddir, "config", "reload")
            assert f"target {IQN} LUN 1 online" in r["applied"], r
            assert sense(c, 1, READ16, 512) == (0x06, (0x28, 0x00))
            assert sense(c, 1, READ16, 512) == (0x06, (0x2A, 0x09))
            assert c.read(1, 100, 8) == mark
            assert naa(c, 1) == before
        assert pid_alive(t.proc.pid)


def test_a_reload_does_not_make_a_served_before_file_anew(ddir):
    """An entry with an `id` (served before: a config restored from a backup,
    or pasted back) whose file is missing: a reload does not create it blank
    under that identity; it is not applied, and says why."""
    cfg = Path(ddir) / "scsi-target.toml"
    gone = Path(ddir) / "restored.img"
    with Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0):
        add_lun_by_hand(cfg, {"lun": 1, "backend": "file", "path": str(gone), "size": "8MiB",
                              "id": "abab" * 8})
        r = mgmt(ddir, "config", "reload")
        assert r["applied"] == [] and len(r["not_applied"]) == 1, r
        assert "it was served before" in r["not_applied"][0], r
        assert not gone.exists()
        assert [x["lun"] for x in mgmt(ddir, "lun", "list")] == [0]


def test_a_missing_file_given_on_the_command_line_still_fails_the_first_start(ddir):
    """The admin is at the terminal: a first start's LUN that cannot be served
    is one line and exit 2, not an offline LUN."""
    p = subprocess.run([*CLI, "run", "--no-iscsi", "--data-dir", ddir, "--lun", f"file:{ddir}/none.img"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p
    assert p.stderr.strip().count("\n") == 0 and "none.img does not exist; give a size" in p.stderr
    assert not (Path(ddir) / "scsi-target.toml").exists()


def test_every_medium_command_of_an_offline_lu_answers_manual_intervention():
    """In process, over the whole opcode table: each row that needs the medium
    (OpEntry.medium) answers 02/04/03 on an offline LU, START STOP UNIT cannot
    load it, reservation commands answer the same, and what needs no medium (INQUIRY, REPORT LUNS, MODE SENSE)
    answers GOOD. Once its store opens it serves."""
    from backends.ram import RamBackend
    from stml.lu import LogicalUnit, LunOptions, Offline
    from support.sbc_harness import TARGET, Harness, run as run_async

    async def go():
        opts = LunOptions("file", path="/nonexistent/x.img", removable=True)
        h = Harness()
        target = h.emulator.targets[TARGET]
        target.luns[1] = lu = LogicalUnit(TARGET, 1, Offline("gone"), opts, h.emulator.templates["disk"])
        medium = [e for e in lu.template.entries if e.medium]
        assert len(medium) > 20
        for e in medium:
            cdb = bytearray(e.size)
            cdb[0] = e.opcode
            if e.sa is not None:
                cdb[1] = e.sa
            r = await h.cmd(bytes(cdb), lun=1, no_data=True)
            assert r.key_asc == (0x02, 0x04, 0x03), e.name
        assert (await h.cmd(bytes([0x1B, 0, 0, 0, 0x03, 0]), lun=1, no_data=True)).key_asc == (0x02, 0x04, 0x03)
        # reservations too: an RBD image keeps them in the image, which an offline LU cannot read
        for cdb in (bytes([0x5E, 0, 0, 0, 0, 0, 0, 0, 8, 0]),                  # PR IN / READ KEYS
                    bytes([0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0]),                 # PR OUT / REGISTER
                    bytes([0x16, 0, 0, 0, 0, 0]), bytes([0x57] + [0] * 9)):    # RESERVE(6), RELEASE(10)
            r = await h.cmd(cdb, bytes(24) if cdb[0] == 0x5F else b"", lun=1, no_data=cdb[0] not in (0x5E, 0x5F))
            assert r.key_asc == (0x02, 0x04, 0x03), cdb.hex()
        for cdb in (bytes([0x12, 0, 0, 0, 36, 0]), bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
                    bytes([0x1A, 0, 0x3F, 0, 255, 0])):
            assert (await h.cmd(cdb, lun=1)).status == 0, cdb.hex()
        assert (await h.cmd(bytes(6), lun=0, no_data=True)).status == 0     # the other LU serves
        lu.go_online(RamBackend(1 << 20))
        assert lu.offline is None
        assert (await h.cmd(bytes(6), lun=1, no_data=True)).status == 0
        h.executor.shutdown()
    run_async(go())


def test_config_check_warns_of_a_lun_a_start_would_serve_offline(tmp_path):
    """The file is valid (exit 0), and `config check` says which LUNs a start
    would serve offline and why; a file it would create draws no warning."""
    cfg = tmp_path / "t.toml"
    cfg.write_text(f"""
        data_dir = "{tmp_path}"
        [[target]]
        name = "{IQN}"
        [[target.lun]]
        backend = "file"
        path = "gone.img"
        size = "1MiB"
        id = "{'ab' * 16}"
        [[target.lun]]
        backend = "file"
        path = "nosize.img"
        [[target.lun]]
        backend = "file"
        path = "new.img"
        size = "1MiB"
    """.replace("\n        ", "\n"))
    p = cli("config", "check", "--config", str(cfg))
    assert p.returncode == 0, p
    assert p.stderr.splitlines() == [
        f"scsi-target: warning: target {IQN} LUN 0 ({tmp_path}/gone.img): its file is missing; it was "
        f"served before: a start serves it offline",
        f"scsi-target: warning: target {IQN} LUN 1 ({tmp_path}/nosize.img): its file does not exist and "
        f"no size is given to create it: a start serves it offline"]


def remove_lun_by_hand(cfg: Path, number: int) -> None:
    doc = tomlkit.parse(cfg.read_text())
    target = next(t for t in doc["target"] if t["name"] == IQN)
    kept = [e for e in target["lun"] if e["lun"] != number]
    del target["lun"]       # (tomlkit: an array of tables emptied in place is no longer one)
    if kept:
        aot = tomlkit.aot()
        for entry in kept:
            aot.append(entry)
        target["lun"] = aot
    cfg.write_text(tomlkit.dumps(doc))


def naa_of(ident: str) -> str:
    from stml.lu import naa_designator
    return naa_designator(bytes.fromhex(ident)).hex()


def test_hand_added_luns_get_ids_that_keep_old_disks_and_tell_new_ones_apart(ddir):
    """0281. A file an older version served, its LUN added by hand (no `id`):
    the upgraded STML serves it under the legacy identity it had, and writes
    that as its id (comments kept). A different disk later hand-added at that
    number (the old entry removed, a reload) gets an identity of its own,
    written to the file, and keeps it across a restart of the STML. Before,
    both disks had the legacy NAA of target and number: a multipath host
    would take the second for the first."""
    cfg = Path(ddir) / "scsi-target.toml"
    old, new = Path(ddir) / "old.img", Path(ddir) / "new.img"
    mark = os.urandom(512)
    old.write_bytes(mark + bytes((1 << 20) - 512))
    new.write_bytes(bytes(1 << 20))
    cfg.write_text(f'# the administrator\'s note\nportals = []\n\n[[target]]\nname = "{IQN}"\n\n'
                   f'[[target.lun]]\nlun = 0\nbackend = "file"\npath = "{old}"\n')
    legacy = naa_of(legacy_id(IQN, 0))
    endpoint = f"ipc://{ddir}/stml.sock"
    with Target("--no-iscsi", data_dir=ddir, portals=(), expect_portals=0) as t:
        with LoopbackClient(endpoint, timeout=10) as c:
            assert naa(c, 0) == legacy and c.read(0, 0, 1) == mark
        text = cfg.read_text()
        assert "# the administrator's note" in text and "legacy_ids = false" in text
        assert tomllib.loads(text)["target"][0]["lun"][0]["id"] == legacy_id(IQN, 0)

        remove_lun_by_hand(cfg, 0)
        assert f"target {IQN} LUN 0 removed" in mgmt(ddir, "config", "reload")["applied"]
        add_lun_by_hand(cfg, {"lun": 0, "backend": "file", "path": str(new)})
        assert f"target {IQN} LUN 0 added" in mgmt(ddir, "config", "reload")["applied"]
        ident = tomllib.loads(cfg.read_text())["target"][0]["lun"][0]["id"]
        assert ident != legacy_id(IQN, 0)
        with LoopbackClient(endpoint, timeout=10) as c:
            assert naa(c, 0) == naa_of(ident) != legacy
            assert c.inquiry(0, 0x80)[4:20] == bytes.fromhex(ident)[:8].hex().encode()
        t.kill_stml()
        with LoopbackClient(endpoint, timeout=10) as c:
            assert naa(c, 0) == naa_of(ident)
        assert tomllib.loads(cfg.read_text())["target"][0]["lun"][0]["id"] == ident


def test_a_reload_serves_an_offline_lun_whose_path_was_corrected(ddir, tmp_path):
    """0281: an offline file LUN (its file moved) whose entry's `path` is
    corrected by hand: the reload opens the file there and serves the LU in
    place, under its id, with 06/28/00 then 06/2A/09, as 0280's reload of a
    restored file does. Before, the reload said "restart to apply them"."""
    mark = os.urandom(4096)
    img, moved = Path(ddir) / "disk.img", tmp_path / "moved.img"
    cfg = Path(ddir) / "scsi-target.toml"
    endpoint = f"ipc://{ddir}/stml.sock"
    with Target("--no-iscsi", "--lun", f"file:{img},size=8MiB", data_dir=ddir, portals=(), expect_portals=0):
        with LoopbackClient(endpoint, timeout=10) as c:
            c.write(0, 100, mark)
            c.synchronize_cache(0)
            before = naa(c, 0)
    ident = tomllib.loads(cfg.read_text())["target"][0]["lun"][0]["id"]
    shutil.move(img, moved)
    with Target("--no-iscsi", data_dir=ddir, portals=(), expect_portals=0) as t:
        t.wait_log("LUN 0 (file ")
        doc = tomlkit.parse(cfg.read_text())
        doc["target"][0]["lun"][0]["path"] = str(moved)
        cfg.write_text(tomlkit.dumps(doc))
        with LoopbackClient(endpoint, timeout=10) as c:
            assert sense(c, 0, READ16, 512) == MANUAL_INTERVENTION
            r = mgmt(ddir, "config", "reload")
            assert r["applied"] == [f"target {IQN} LUN 0 online"] and r["not_applied"] == [], r
            assert sense(c, 0, READ16, 512) == (0x06, (0x28, 0x00))
            assert sense(c, 0, READ16, 512) == (0x06, (0x2A, 0x09))
            assert c.read(0, 100, 8) == mark
            assert naa(c, 0) == before
        entry = tomllib.loads(cfg.read_text())["target"][0]["lun"][0]
        assert (entry["path"], entry["id"]) == (str(moved), ident)
        assert mgmt(ddir, "config", "diff")["same"]
        assert not img.exists()


def test_an_offline_lun_never_served_opens_under_the_id_its_entry_is_given(ddir):
    """A hand-added LUN whose file did not exist at start is offline without
    an id (0281). Its file made and an `id` written into its entry by hand,
    the reload serves it under that id, and the file and the running LU
    agree (0298); before, the reload gave it an id of its own and the file's
    took effect only at the next start, as another disk."""
    cfg = Path(ddir) / "scsi-target.toml"
    img = Path(ddir) / "later.img"
    with Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0):
        pass
    add_lun_by_hand(cfg, {"lun": 1, "backend": "file", "path": str(img)})
    with Target("--no-iscsi", data_dir=ddir, portals=(), expect_portals=0) as t:
        t.wait_log("LUN 1 (file ")
        assert "id" not in tomllib.loads(cfg.read_text())["target"][0]["lun"][1]
        img.write_bytes(bytes(2 << 20))
        ident = "00112233445566778899aabbccddeeff"
        doc = tomlkit.parse(cfg.read_text())
        doc["target"][0]["lun"][1]["id"] = ident
        cfg.write_text(tomlkit.dumps(doc))
        r = mgmt(ddir, "config", "reload")
        assert r["applied"] == [f"target {IQN} LUN 1 online"] and r["not_applied"] == [], r
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            assert naa(c, 1) == naa_of(ident)
        assert tomllib.loads(cfg.read_text())["target"][0]["lun"][1]["id"] == ident
        assert mgmt(ddir, "config", "diff")["same"]


def test_the_file_of_a_hand_added_lun_once_served_is_not_created_again(ddir):
    """0281 closes 0280's gap: a LUN hand-added with a size, which the reload
    served (creating its file), has an id in the file from then on; its file
    deleted, the next start serves it offline instead of creating it blank
    under its identity, as for any LUN served before."""
    cfg = Path(ddir) / "scsi-target.toml"
    img = Path(ddir) / "hand.img"
    with Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0) as t:
        add_lun_by_hand(cfg, {"lun": 1, "backend": "file", "path": str(img), "size": "2MiB"})
        assert f"target {IQN} LUN 1 added" in mgmt(ddir, "config", "reload")["applied"]
        assert img.stat().st_size == 2 << 20
        ident = tomllib.loads(cfg.read_text())["target"][0]["lun"][1]["id"]
        img.unlink()
        t.kill_stml()
        line = t.wait_log("LUN 1 (file ")
        assert "is missing; it was served before: restore it or remove the LUN" in line
        assert not img.exists()
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            assert sense(c, 1, READ16, 512) == MANUAL_INTERVENTION
            assert naa(c, 1) == naa_of(ident)


@pytest.mark.parametrize("where", ["stml_endpoint = \"tcp://127.0.0.1:{port}\"\n",
                                   "[stml]\nlisten = [\"tcp://127.0.0.1:{port}\"]\n"])
def test_config_check_warns_of_a_plain_tcp_endpoint_a_start_refuses(tmp_path, where):
    """A tcp:// endpoint without CURVE keys or `insecure` passes the parser but
    stops every start (0246): `config check` says so instead of a bare OK (trial UT)."""
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n' + where.format(port=5555))
    p = cli("config", "check", "--config", str(cfg))
    assert p.returncode == 0, p
    assert p.stderr.splitlines() == [
        "scsi-target: warning: tcp://127.0.0.1:5555 is plain TCP: a start refuses it unless "
        "[stml] curve_secret_key_file is set, or `insecure = true` in [stml] (or --insecure)"]
    cfg.write_text(f'data_dir = "{tmp_path}"\n' + where.format(port=5555) + ("" if "[stml]" in where else "[stml]\n")
                   + "insecure = true\n")
    p = cli("config", "check", "--config", str(cfg))
    assert (p.returncode, p.stderr) == (0, ""), p
