"""Operating the target day to day (issue 19), through real processes: the
config a data dir owns and every save of the whole running configuration,
reload, startup failures in one line, no orphans, readiness, and CLI output
that fits a terminal."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import tomlkit
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fetd_loopback import LoopbackClient, ScsiError
from scsi_target.mgmt import MgmtClient
from stml import mgmt as mgmt_mod
from stml.api import Tmf, TmfResponse
from support.ci import need_root
from support.gated_stml import GatedStml, gate_cdb
from support.procs import Proc, children_by_module, free_port, pid_alive, run, short_dir, stop_pid, wait_for_line
from support.rawiscsi import RawInitiator
from support.target import IQN, StmlProcess, Target

CLI = [sys.executable, "-m", "scsi_target"]


def cli(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def ok(*args: str) -> str:
    p = cli(*args)
    assert p.returncode == 0, f"{args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def mgmt(data_dir: str, *args: str):
    return json.loads(ok(*args, "--data-dir", data_dir, "--json"))


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The PIDs still alive after `timeout` (checked in /proc until then)."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


def kill_all(pids: list[int]) -> None:
    for p in pids:
        if pid_alive(p):
            os.kill(p, signal.SIGKILL)


@pytest.fixture
def ddir(tmp_short):
    return str(tmp_short())


# ------------------------------------------------------------------ the data dir owns a config file

def test_a_lun_added_live_is_served_after_a_restart_without_flags(ddir):
    """run --data-dir D --lun ram:64MiB; lun add file:...; run --data-dir D
    (no LUN flags) serves both, with the file LUN's data."""
    with Target("--lun", "ram:64MiB", data_dir=ddir) as t:
        cfg = Path(ddir) / "scsi-target.toml"
        assert tomllib.loads(cfg.read_text())["target"][0]["lun"][0]["size"] == "64MiB"
        added = mgmt(ddir, "lun", "add", f"file:{ddir}/second.img,size=16MiB")
        assert added["lun"] == 1 and added["saved"] == f"saved to {cfg}"
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            c.write(1, 7, b"\x5a" * 512)
    with Target(data_dir=ddir) as t:
        luns = {x["lun"]: x for x in mgmt(ddir, "lun", "list")}
        assert (luns[0]["backend"], luns[0]["size"]) == ("ram", 64 << 20)
        assert (luns[1]["backend"], luns[1]["size"], luns[1]["path"]) == ("file", 16 << 20, f"{ddir}/second.img")
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            assert c.read(1, 7, 1) == b"\x5a" * 512
        out = run(["iscsi-readcapacity16", t.url(1)]).stdout
        assert "Total size:16777216" in out


def test_lun_add_says_where_a_relative_path_went(ddir, tmp_path):
    """`lun add file:vm1.img,size=...` typed in /srv/images makes the file in
    the data dir (the config's paths are relative to it): the answer says so."""
    with Target("--lun", "ram:4MiB", data_dir=ddir):
        p = subprocess.run([*CLI, "lun", "add", "--data-dir", ddir, "file:vm1.img,size=1MiB"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert f" {ddir}/vm1.img " in p.stdout
        assert mgmt(ddir, "lun", "add", "ram:1MiB").get("path") is None


def test_a_path_with_a_comma_through_lun_and_lun_add(ddir):
    """A comma ends a field of a LUN spec; `\\,` writes one in a path, on
    `run --lun` and `lun add` alike, and a restart with the same flags
    serves the same files (0209)."""
    flag = rf"file:{ddir}/a\,1.img,size=4MiB"
    for _ in range(2):
        with Target("--lun", flag, data_dir=ddir):
            if not os.path.exists(f"{ddir}/b,2.img"):
                assert mgmt(ddir, "lun", "add", rf"file:b\,2.img,size=2MiB")["path"] == f"{ddir}/b,2.img"
            assert [(x["path"], x["size"]) for x in mgmt(ddir, "lun", "list")] == [
                (f"{ddir}/a,1.img", 4 << 20), (f"{ddir}/b,2.img", 2 << 20)]
    assert os.path.getsize(f"{ddir}/a,1.img") == 4 << 20


def test_lun_flags_that_disagree_with_the_file_are_refused(ddir):
    with Target("--lun", "ram:16MiB", data_dir=ddir):
        pass
    p = cli("run", "--data-dir", ddir, "--lun", "ram:32MiB", "--portal", "127.0.0.1:0")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1
    assert "already defines the LUNs" in p.stderr and "lun add" in p.stderr
    # the same flags again are a plain restart
    with Target("--lun", "ram:16MiB", data_dir=ddir):
        assert [x["size"] for x in mgmt(ddir, "lun", "list")] == [16 << 20]


def test_the_first_starts_flags_restart_it_after_any_change(ddir):
    """`run --lun ...` in a unit file or a script serves the file as it is
    after `lun resize`, `lun remove` and `lun add`: the next boot used to exit
    2 (the flags no longer matched the file) and systemd left it down."""
    flags = ("--lun", f"file:{ddir}/a.img,size=16MiB", "--lun", "ram:4MiB")
    with Target(*flags, data_dir=ddir):
        mgmt(ddir, "lun", "resize", "0", "32MiB")
        mgmt(ddir, "lun", "remove", "1")
        mgmt(ddir, "lun", "add", "--lun", "2", "ram:8MiB")
    with Target(*flags, data_dir=ddir):
        assert [(x["lun"], x["size"]) for x in mgmt(ddir, "lun", "list")] == [(0, 32 << 20), (2, 8 << 20)]
    # other flags than the first start's still disagree with the file
    p = cli("run", "--data-dir", ddir, "--lun", f"file:{ddir}/a.img,size=16MiB", "--portal", "127.0.0.1:0")
    assert p.returncode == 2 and "already defines the LUNs" in p.stderr


def test_run_config_new_file_is_written(ddir, tmp_path):
    """`run --config new.toml` on a file that does not exist yet writes it."""
    cfg = tmp_path / "new.toml"
    with Target("--lun", "ram:8MiB", config=str(cfg), data_dir=ddir):
        saved = tomllib.loads(cfg.read_text())
        assert saved["data_dir"] == ddir
        lun = saved["target"][0]["lun"]
        assert re.fullmatch(r"[0-9a-f]{32}", lun[0].pop("id"))   # a new LU's identity, saved with it
        assert lun == [{"lun": 0, "backend": "ram", "size": "8MiB"}]


def test_a_minimal_config_keeps_the_default_lun_through_a_save(ddir, tmp_path):
    """The issue's first finding: a config naming only data_dir and portals
    serves the built-in default; a `lun add` must save it too, not only LUN 1."""
    cfg = tmp_path / "min.toml"
    cfg.write_text(f'data_dir = "{ddir}"\nportals = ["127.0.0.1:0"]\n')
    t = Target(config=str(cfg), data_dir=ddir, portals=())
    try:
        mgmt(ddir, "lun", "add", "ram:8MiB")
        before = mgmt(ddir, "lun", "list")
    finally:
        t.stop()
    saved = tomllib.loads(cfg.read_text())
    assert [x["lun"] for x in saved["target"][0]["lun"]] == [0, 1]
    with Target(config=str(cfg), data_dir=ddir, portals=()):
        assert mgmt(ddir, "lun", "list") == before


COMMENTED = """\
# the storage box's target: edited by hand, keep these notes
portals = ["127.0.0.1:0"]   # loopback only for now

[[target]]
name = "{iqn}"   # the one database target
alias = "db"

# LUN 0 holds the database
[[target.lun]]
backend = "file"
path = "db.img"   # relative to the data dir
size = "16MiB"
"""


def test_hand_comments_survive_a_save(ddir, tmp_path):
    cfg = tmp_path / "target.toml"
    cfg.write_text(COMMENTED.format(iqn=IQN))
    with Target(config=str(cfg), data_dir=ddir, portals=()):
        mgmt(ddir, "lun", "add", "ram:4MiB")
        mgmt(ddir, "acl", "add", "iqn.1994-05.com.redhat:client1")
    text = cfg.read_text()
    for line in COMMENTED.format(iqn=IQN).splitlines():
        assert line in text          # every comment, and every line as it was spelled
    saved = tomllib.loads(text)
    assert saved["target"][0]["acl"] == ["iqn.1994-05.com.redhat:client1"]
    added = saved["target"][0]["lun"][1]
    assert re.fullmatch(r"[0-9a-f]{32}", added.pop("id"))
    assert added == {"lun": 1, "backend": "ram", "size": "4MiB"}


NOTED = """\
portals = ["127.0.0.1:0"]   # loopback for now

# the database target
[[target]]
name = "iqn.2026-11.org.example:db"   # do not rename: multipath
acl = [
  "iqn.1994-05.com.redhat:client1",  # db1
  "iqn.1994-05.com.redhat:client2",  # db2
]

# LUN 0: data
[[target.lun]]
lun = 0
backend = "ram"
size = "4MiB"
id = "{id0}"

# LUN 1: logs
[[target.lun]]
lun = 1
backend = "ram"
size = "4MiB"
id = "{id1}"

# backups: nightly
"""


def test_notes_stay_with_what_they_describe_through_saves(ddir):
    """An administrator's notes above a LUN, beside an ACL entry and at the
    end of the file still describe the same things after LUNs and ACL entries
    come and go: a note above a removed LUN goes with it, a new key lands
    above the next table's notes, not below them."""
    ids = {"id0": "0" * 31 + "1", "id1": "0" * 31 + "2"}
    cfg = Path(ddir) / "scsi-target.toml"
    cfg.write_text(NOTED.format(**ids))
    with Target(data_dir=ddir, portals=()):
        mgmt(ddir, "lun", "remove", "0")
        mgmt(ddir, "acl", "remove", "iqn.1994-05.com.redhat:client1")
        mgmt(ddir, "acl", "add", "iqn.1994-05.com.redhat:client3")
        mgmt(ddir, "lun", "add", "--lun", "2", "ram:4MiB")
    text = cfg.read_text()
    new_id = tomllib.loads(text)["target"][0]["lun"][1]["id"]
    assert text == """\
portals = ["127.0.0.1:0"]   # loopback for now
legacy_ids = false  # a LUN entry without `id` is a new disk: the STML gives it one

# the database target
[[target]]
name = "iqn.2026-11.org.example:db"   # do not rename: multipath
acl = [
  "iqn.1994-05.com.redhat:client2",  # db2
  "iqn.1994-05.com.redhat:client3",
]

# LUN 1: logs
[[target.lun]]
lun = 1
backend = "ram"
size = "4MiB"
id = "{id1}"

[[target.lun]]
lun = 2
backend = "ram"
size = "4MiB"
id = "{new_id}"

# backups: nightly
""".format(new_id=new_id, **ids)


def test_a_removed_targets_notes_go_with_it(ddir):
    """The note above the next target stays above it (tomlkit keeps it in
    the removed target's last LUN table)."""
    two = textwrap.dedent("""\
        portals = ["127.0.0.1:0"]
        legacy_ids = false

        # old: retire in May
        [[target]]
        name = "iqn.2026-11.org.example:old"

        [[target.lun]]
        lun = 0
        backend = "ram"
        size = "1MiB"
        id = "00000000000000000000000000000001"

        # new: the database
        [[target]]
        name = "iqn.2026-11.org.example:new"
        """)
    cfg = Path(ddir) / "scsi-target.toml"
    cfg.write_text(two)
    with Target(data_dir=ddir, portals=()):
        mgmt(ddir, "target", "remove", "iqn.2026-11.org.example:old")
    assert cfg.read_text() == textwrap.dedent("""\
        portals = ["127.0.0.1:0"]
        legacy_ids = false

        # new: the database
        [[target]]
        name = "iqn.2026-11.org.example:new"
        """)


# ------------------------------------------------------------------ hand edits, and what an initiator sees

def _edit(cfg: Path, change) -> None:
    """A hand edit of the config file (tomlkit keeps the rest as it was)."""
    doc = tomlkit.parse(cfg.read_text())
    change(doc)
    cfg.write_text(tomlkit.dumps(doc))


def _target_table(doc, name: str):
    return next(t for t in doc["target"] if t["name"] == name)


def _move_lun0(doc, other: str) -> tuple:
    """The file's first target's LUN 0 entry moves to target `other`: (first, other's table)."""
    first, second = doc["target"][0], _target_table(doc, other)
    lun = next(x for x in first["lun"] if x["lun"] == 0)
    first["lun"].remove(lun)
    second["lun"] = tomlkit.aot()
    second["lun"].append(lun)
    return first, second


def pr_register(c: LoopbackClient, lun: int, key: int) -> None:
    """PERSISTENT RESERVE OUT, REGISTER with APTPL: kept across restarts."""
    params = struct.pack(">QQIBBH", 0, key, 0, 0x01, 0, 0)
    c._retry_ua(lun, bytes([0x5F, 0, 0, 0, 0]) + struct.pack(">I", len(params)) + b"\0", data_out=params)


def read_keys(c: LoopbackClient, lun: int) -> list[int]:
    """PERSISTENT RESERVE IN, READ KEYS."""
    data = c._retry_ua(lun, bytes([0x5E, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", 1024) + b"\0",
                       data_in=1024).data
    n = struct.unpack_from(">I", data, 4)[0] // 8
    return sorted(struct.unpack_from(">Q", data, 8 + 8 * i)[0] for i in range(n))


def identity(c: LoopbackClient, lun: int) -> tuple[str, str]:
    """(unit serial from VPD 0x80, NAA designator from VPD 0x83)."""
    serial = c.inquiry(lun, 0x80)
    devid = c.inquiry(lun, 0x83)
    pos, naa = 4, ""
    while pos + 4 <= len(devid):
        n = devid[pos + 3]
        if devid[pos + 1] & 0x0F == 3:
            naa = devid[pos + 4:pos + 4 + n].hex()
        pos += 4 + n
    return serial[4:4 + serial[3]].decode(), naa


def test_aptpl_state_belongs_to_the_lu_not_to_its_number(stml_factory):
    """APTPL registrations are kept by LU identity: removing a LUN removes
    its file, the LU added later under its number starts with none, and a
    LUN added live takes APTPL (it used to refuse it until a restart)."""
    p = stml_factory("ram:4MiB", "ram:4MiB")
    m = MgmtClient(p.endpoint)
    m.call("lun_add", spec="ram:4MiB")
    with LoopbackClient(p.endpoint, timeout=10) as c:
        for lun in (0, 1, 2):
            pr_register(c, lun, 0xB0 + lun)
    ids = {x["lun"]: x["id"] for x in tomllib.loads((p.data_dir / "scsi-target.toml").read_text())
           ["target"][0]["lun"]}
    state = p.data_dir / "pr" / f"{ids[1]}_1.json"
    assert json.loads(state.read_text())["registrations"][0]["key"] == 0xB1
    m.call("lun_remove", lun=1)
    deadline = time.monotonic() + 20
    while state.exists():                  # removed once the LU's tasks are done
        assert time.monotonic() < deadline
        time.sleep(0.05)
    m.call("lun_add", spec="ram:4MiB", lun=1)
    p.restart()
    with LoopbackClient(p.endpoint, timeout=10) as c:
        assert [read_keys(c, lun) for lun in (0, 1, 2)] == [[0xB0], [], [0xB2]]


@pytest.mark.parametrize("kind", ["file", "ram"])
def test_a_lun_moved_to_a_target_earlier_in_the_file_by_one_reload(stml_factory, kind):
    """A reload removes every target's gone LUNs before it adds any: a file
    LUN moved by hand to a target listed before its old one was added while
    the old target still served it ("already backs"), then removed, and
    neither target served it until a restart (review 11). A RAM LUN moved
    so, its id kept, takes its data along (0249): it came back empty."""
    p = stml_factory("file:m.img,size=4MiB" if kind == "file" else "ram:4MiB", "ram:4MiB")
    m = MgmtClient(p.endpoint)
    other = "iqn.2026-11.org.test:earlier"
    m.call("target_add", name=other)
    with LoopbackClient(p.endpoint, timeout=10) as c:
        c.write(0, 0, b"\x5a" * 512 * 8)
    cfg = p.data_dir / "scsi-target.toml"

    def move(doc) -> None:
        first, second = _move_lun0(doc, other)
        tables = tomlkit.aot()
        tables.append(second)   # the target it moves to, listed first
        tables.append(first)
        doc["target"] = tables
    _edit(cfg, move)
    r = m.call("config_reload")
    assert r["not_applied"] == [], r
    served = {(x["target"], x["lun"]) for x in m.call("status")["luns"]}
    assert (other, 0) in served and (IQN, 0) not in served, served
    with LoopbackClient(p.endpoint, other, timeout=10) as c:
        assert c.read(0, 0, 8) == b"\x5a" * 512 * 8
    if kind == "ram":
        assert f"{IQN} LUN 0 removed: its RAM moves with its id to target {other}" in p.log()


def test_a_ram_lun_moved_with_a_command_in_flight_moves_in_one_reload(tmp_short, monkeypatch):
    """A review read the add of a RAM LU moved while a command of it is in
    flight as refused by the RAM check, leaving a second reload to move it.
    It is not: the add waits for the close, the command ends TASK ABORTED
    after the drain, and one reload moves the data (0249, 0708)."""
    monkeypatch.setattr(mgmt_mod, "LUN_DRAIN", 0.1)   # (the drain's length: not what is tested)
    other = "iqn.2026-11.org.test:other"
    g = GatedStml(tmp_short(), IQN, ("ram:4MiB", "ram:4MiB"), config_file=True).start()
    try:
        m = MgmtClient(g.endpoint)
        m.call("target_add", name=other)
        with LoopbackClient(g.endpoint, timeout=10) as c:
            c.write(0, 0, b"\x5a" * 512 * 8)
            held = c.submit(0, gate_cdb("hold"))
            g.wait_started("hold")

            _edit(g.config.path, lambda doc: _move_lun0(doc, other))
            r = m.call("config_reload")
            assert held.result(10).status == 0x40   # TASK ABORTED: it was in flight throughout
        assert r["not_applied"] == [] and f"target {other} LUN 0 added" in r["applied"], r
        with LoopbackClient(g.endpoint, other, timeout=10) as c:
            assert c.read(0, 0, 8) == b"\x5a" * 512 * 8
    finally:
        g.stop()


def test_a_renumbered_ram_luns_store_no_add_took_is_freed_at_the_end_of_the_reload(stml_factory):
    """A RAM LUN renumbered by a reload whose add is refused: its store, kept
    for the add, is freed when the reload ends, with a line that says so
    (0205); the next reload that adds the LUN serves a new, empty store. The
    refusal: the file shrinks LUN 0 (not applied: only `lun resize --force`
    shrinks) and grows the moved LUN into the room that shrink would have
    left, so the served RAM LUNs would pass the host's memory. (A RAM LU's
    pages come as it is written: big ones cost nothing here.)"""
    from stml.config import host_memory
    big, half = (host_memory() * 3 // 4) >> 20, (host_memory() // 2) >> 20   # MiB
    p = stml_factory(f"ram:{big}MiB", "ram:4MiB")
    with LoopbackClient(p.endpoint, timeout=10) as c:
        c.write(1, 0, b"\x5a" * 512 * 8)
    cfg = p.data_dir / "scsi-target.toml"
    ident = tomllib.loads(cfg.read_text())["target"][0]["lun"][1]["id"]
    _renumber(cfg, 1, 9)

    def sizes(lun0: str, lun9: str):
        def change(doc) -> None:
            for lc in doc["target"][0]["lun"]:
                lc["size"] = {0: lun0, 9: lun9}[lc["lun"]]
        return change
    _edit(cfg, sizes("4MiB", f"{half}MiB"))
    m = MgmtClient(p.endpoint)
    r = m.call("config_reload")
    assert [line for line in r["not_applied"] if "LUN 9: RAM LUNs would total" in line], r
    assert f"reload: RAM LU {ident} was not added to target {IQN}: its data is freed" in p.log()
    _edit(cfg, sizes(f"{big}MiB", "4MiB"))
    r = m.call("config_reload")
    assert r["not_applied"] == [], r
    with LoopbackClient(p.endpoint, timeout=10) as c:
        assert c.read(9, 0, 8) == bytes(512 * 8)


def _renumber(cfg: Path, old: int, new: int) -> None:
    """A hand edit: the first target's LUN `old` (its id kept) becomes `new`."""
    def change(doc):
        next(lc for lc in doc["target"][0]["lun"] if lc["lun"] == old)["lun"] = new
    _edit(cfg, change)


def _pr_files(p: StmlProcess) -> list[str]:
    return sorted(os.listdir(p.data_dir / "pr"))


def test_a_lun_renumbered_by_hand_keeps_its_reservations_across_a_restart(stml_factory):
    """The APTPL state belongs to the LU's identity, not its number: a LUN
    moved to another number in the file (its id kept) is served there after
    a restart with its registrations and identity, and its file is renamed,
    so that pr/ names what is served (0218)."""
    p = stml_factory("ram:4MiB", "ram:4MiB")
    with LoopbackClient(p.endpoint, timeout=10) as c:
        pr_register(c, 1, 0xC1)
        before = identity(c, 1)
    cfg = p.data_dir / "scsi-target.toml"
    ident = tomllib.loads(cfg.read_text())["target"][0]["lun"][1]["id"]
    assert _pr_files(p) == [f"{ident}_1.json"]
    _renumber(cfg, 1, 7)
    p.luns = ()   # the file says what is served now
    p.restart()
    with LoopbackClient(p.endpoint, timeout=10) as c:
        assert [read_keys(c, lun) for lun in (0, 7)] == [[], [0xC1]]
        assert identity(c, 7) == before
    assert _pr_files(p) == [f"{ident}_7.json"]
    assert json.loads((p.data_dir / "pr" / f"{ident}_7.json").read_text())["lun"] == 7
    assert "moved from LUN 1 to LUN 7" in p.log()


@pytest.mark.parametrize("kind", ["ram", "file"])
def test_a_reload_that_renumbers_a_lun_keeps_its_reservations_and_a_removal_drops_them(stml_factory, kind):
    """`config reload` of the same edit moves the LU with its registrations
    (the removed number's state is kept for it, not deleted) and its data (a
    file's lock, 0216, ends with the removed LU's close, which the add waits
    for; a RAM LU's pages are handed to the add, 0205); a LUN the reload
    removes for good takes its file along (0218)."""
    p = stml_factory(*(f"file:l{n}.img,size=4MiB" if kind == "file" else "ram:4MiB" for n in range(3)))
    data = os.urandom(4096)
    with LoopbackClient(p.endpoint, timeout=10) as c:
        for lun in (1, 2):
            pr_register(c, lun, 0xD0 + lun)
        c.write(1, 0, data)
    cfg = p.data_dir / "scsi-target.toml"
    ids = [lc["id"] for lc in tomllib.loads(cfg.read_text())["target"][0]["lun"]]
    _renumber(cfg, 1, 9)
    _edit(cfg, lambda doc: doc["target"][0]["lun"].remove(
        next(lc for lc in doc["target"][0]["lun"] if lc["lun"] == 2)))
    r = MgmtClient(p.endpoint).call("config_reload")
    assert r["not_applied"] == [], r
    with LoopbackClient(p.endpoint, timeout=10) as c:
        assert read_keys(c, 9) == [0xD1]
        assert c.read(9, 0, 8) == data   # a RAM LU's data moves with its id too (0205)
    deadline = time.monotonic() + 20
    while _pr_files(p) != [f"{ids[1]}_9.json"]:   # LUN 2's goes once its LU closed
        assert time.monotonic() < deadline, _pr_files(p)
        time.sleep(0.05)
    p.luns = ()
    p.restart()
    with LoopbackClient(p.endpoint, timeout=10) as c:
        assert [read_keys(c, lun) for lun in (0, 9)] == [[], [0xD1]]


def test_a_reload_that_renumbers_a_ram_lun_grows_it_but_never_shrinks_it(stml_factory):
    """A RAM LU moved to another number keeps its pages (0205); a bigger size
    edited into the same entry is applied, a smaller one is not (it would
    drop the data past the new end, which only `lun resize --force` may) and
    the reload says so; the data is there either way."""
    p = stml_factory("ram:4MiB", "ram:4MiB")
    data = os.urandom(4096)
    with LoopbackClient(p.endpoint, timeout=10) as c:
        blocks, block = c.capacity(1)
        lba = blocks - len(data) // block   # the last 4 KiB: what a shrink would drop
        c.write(1, lba, data)
    cfg = p.data_dir / "scsi-target.toml"

    def move(number: int, to: int, size: str) -> dict:
        _renumber(cfg, number, to)
        _edit(cfg, lambda doc: next(lc for lc in doc["target"][0]["lun"] if lc["lun"] == to).__setitem__(
            "size", size))
        return MgmtClient(p.endpoint).call("config_reload")

    r = move(1, 5, "2MiB")
    assert [line for line in r["not_applied"] if "LUN 5: kept at 4194304 bytes" in line], r
    sizes = {x["lun"]: x["size"] for x in MgmtClient(p.endpoint).call("lun_list")}
    assert sizes[5] == 4 << 20
    r = MgmtClient(p.endpoint).call("config_reload")   # (the edit stays in the file, not applied)
    assert [line for line in r["not_applied"] if "LUN 5:" in line and "shrinking" in line], r
    with LoopbackClient(p.endpoint, timeout=10) as c:
        assert c.read(5, lba, len(data) // block) == data
    r = move(5, 6, "8MiB")
    assert not [line for line in r["not_applied"] if "LUN 6" in line], r
    assert {x["lun"]: x["size"] for x in MgmtClient(p.endpoint).call("lun_list")}[6] == 8 << 20
    with LoopbackClient(p.endpoint, timeout=10) as c:
        assert c.read(6, lba, len(data) // block) == data


# ------------------------------------------------------------------ any sequence of changes

OTHERS = ["iqn.2026-11.org.test:alpha", "iqn.2026-11.org.test:beta"]
INITIATORS = ["iqn.1994-05.com.redhat:one", "iqn.1994-05.com.redhat:two"]

op = st.one_of(
    st.tuples(st.just("target_add"), st.integers(1, 2)),
    st.tuples(st.just("target_remove"), st.integers(0, 2)),
    st.tuples(st.just("lun_add"), st.integers(0, 2), st.sampled_from(["ram", "file"]), st.integers(1, 4),
              st.none() | st.integers(0, 2)),
    st.tuples(st.just("lun_remove"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("lun_resize"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 6)),
    st.tuples(st.just("acl_add"), st.integers(0, 2), st.integers(0, 1)),
    st.tuples(st.just("acl_remove"), st.integers(0, 2), st.integers(0, 1)),
    st.tuples(st.just("chap_set"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("portal_add"), st.integers(2, 4)),
    st.tuples(st.just("portal_remove"), st.integers(1, 4)),
    st.tuples(st.just("pr_register"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("target_reset"), st.integers(0, 2), st.booleans()),
)


def apply(client: MgmtClient, names: list[str], step: tuple, serial: list[int], cfg: Path) -> None:
    """One change; a refusal (no such target, LUN taken, ...) is part of the game.
    pr_register registers a key with APTPL; target_reset edits the file by hand
    and reloads it (no verb sets it)."""
    kind, *a = step
    args: dict = {}
    serial[0] += 1
    if kind == "pr_register":
        try:
            with LoopbackClient(client.endpoint, names[a[0]], timeout=10) as c:
                pr_register(c, a[1], 0x1000 + serial[0])
        except (LookupError, ScsiError):
            pass
        return
    if kind == "target_reset":
        def edit(doc):
            for t in doc.get("target", []):
                if t["name"] == names[a[0]]:
                    t["target_reset"] = a[1]
        _edit(cfg, edit)
        kind = "config_reload"
    elif kind == "target_add":
        args = {"name": names[a[0]]}
    elif kind == "target_remove":
        args = {"name": names[a[0]], "force": True}
    elif kind == "lun_add":
        spec = f"ram:{a[2]}MiB" if a[1] == "ram" else f"file:f{serial[0]}.img,size={a[2]}MiB"
        args = {"target": names[a[0]], "spec": spec, "lun": a[3]}
    elif kind == "lun_remove":
        args = {"target": names[a[0]], "lun": a[1]}
    elif kind == "lun_resize":
        args = {"target": names[a[0]], "lun": a[1], "size": f"{a[2]}MiB", "force": True}
    elif kind in ("acl_add", "acl_remove"):
        args = {"target": names[a[0]], "initiator": INITIATORS[a[1]]}
    elif kind == "chap_set":
        args = {"target": names[a[0]], **({"user": "u", "secret": "twelve-bytes-secret"} if a[1] else {})}
    elif kind in ("portal_add", "portal_remove"):
        args = {"portal": f"127.0.0.{a[0]}:3260"}
    try:
        client.call(kind, **args)
    except RuntimeError:
        pass


def served(endpoint: str) -> tuple:
    """What the STML serves: targets with their access rules and whether they
    take a target reset, LUNs with their identity (serial, NAA) and APTPL
    registrations, portals."""
    c = MgmtClient(endpoint)
    targets = sorted((t["name"], t["alias"], tuple(t["acl"]), t["chap"]) for t in c.call("target_list"))
    luns = sorted((x["target"], x["lun"], x["backend"], x["size"], x["path"], x["ro"], x["block_size"])
                  for x in c.call("lun_list"))
    seen = []
    for name, _, acl, _ in targets:
        # as an initiator the target lets in: the STML checks its ACL at registration
        with LoopbackClient(endpoint, name, initiator=acl[0] if acl else None, timeout=10) as lc:
            for target, lun, *_ in luns:
                if target == name:
                    seen.append((name, lun, identity(lc, lun), read_keys(lc, lun)))
            seen.append((name, "target reset", TmfResponse(lc.task_mgmt(Tmf.TARGET_WARM_RESET)).name))
    return targets, luns, seen, [p["portal"] for p in c.call("portal_list")]


# the review's cases, always run: a removed LUN's number reused after APTPL
# registrations (the new LU must not inherit them), and target_reset set by a
# reload (applied live, as a restart applies it)
@example(steps=[("pr_register", 0, 0), ("lun_remove", 0, 0), ("lun_add", 0, "ram", 1, 0)])
@example(steps=[("target_reset", 0, True)])
@pytest.mark.parametrize("with_config", [False, True])
@settings(max_examples=6, deadline=None)
@given(steps=st.lists(op, min_size=1, max_size=10))
def test_any_sequence_of_changes_survives_a_restart(with_config, steps):
    """Property: after any sequence of live changes, a restart (with no LUN
    flags) serves the same targets, LUNs (their identity and registrations
    too), ACLs, CHAP, target reset settings, portals, and the data of every
    file LUN."""
    d = Path(short_dir())
    extra: tuple[str, ...] = ()
    luns: tuple[str, ...] = ("file:disk0.img,size=4MiB",)
    first = IQN
    cfg = d / "scsi-target.toml"
    if with_config:
        cfg = d / "elsewhere.toml"
        first = "iqn.2026-11.org.test:configured"
        cfg.write_text(f'# hand written\n[[target]]\nname = "{first}"\n\n[[target.lun]]\n'
                       f'backend = "ram"\nsize = "4MiB"\n')
        extra, luns = ("--config", str(cfg)), ()
    p = StmlProcess(d, luns, extra)
    try:
        p.start()
        names = [first, *OTHERS]
        client = MgmtClient(p.endpoint)
        serial = [0]
        for step in steps:
            apply(client, names, step, serial, cfg)
        before = served(p.endpoint)
        allowed = {name: acl[0] if acl else None for name, _, acl, _ in before[0]}
        marks = {}
        for target, lun, backend, *_ in before[1]:
            if backend == "file":
                with LoopbackClient(p.endpoint, target, initiator=allowed[target], timeout=10) as c:
                    marks[(target, lun)] = os.urandom(512)
                    c.write(lun, 0, marks[(target, lun)])
        p.luns = ()          # restart as `run --data-dir D` would: no LUN flags
        p.restart()
        assert served(p.endpoint) == before
        for (target, lun), data in marks.items():
            with LoopbackClient(p.endpoint, target, initiator=allowed[target], timeout=10) as c:
                assert c.read(lun, 0, 1) == data
        if with_config:
            assert (d / "elsewhere.toml").read_text().startswith("# hand written\n")
    finally:
        p.stop()
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ reload

def test_sighup_and_config_reload_apply_a_hand_edit_and_orphan_nothing(ddir):
    with Target("--lun", "ram:8MiB", data_dir=ddir) as t:
        kids = children_by_module(t.proc.pid)
        cfg = Path(ddir) / "scsi-target.toml"
        text = cfg.read_text()
        # a blocked change: the file was edited since it was loaded
        cfg.write_text(text + '\n[[target.lun]]\nlun = 3\nbackend = "ram"\nsize = "2MiB"\n')
        p = cli("lun", "add", "--data-dir", ddir, "ram:1MiB")
        assert p.returncode == 2 and "config reload" in p.stderr
        diff = cli("config", "diff", "--data-dir", ddir)
        assert diff.returncode == 1 and '-lun = 3' in diff.stdout
        os.kill(t.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while 3 not in [x["lun"] for x in mgmt(ddir, "lun", "list")]:
            assert time.monotonic() < deadline, t.log()
            time.sleep(0.1)
        assert t.proc.poll() is None and children_by_module(t.proc.pid) == kids   # nothing restarted
        assert "reloading the configuration (SIGHUP)" in t.log()
        # the change that was blocked goes through now, and the file keeps the edit
        mgmt(ddir, "lun", "add", "ram:1MiB")
        assert [x["lun"] for x in tomllib.loads(cfg.read_text())["target"][0]["lun"]] == [0, 3, 1]
        # `config reload` tells what it applied and what needs a restart
        edited = cfg.read_text().replace('size = "2MiB"', 'size = "4MiB"').replace(
            "portals = ", 'isns = "127.0.0.1:3205"\nslp_auth = true\nportals = ')
        cfg.write_text(edited + '\n[[vhost]]\nsocket = "vm.sock"\n')   # a VM socket: `run` starts those
        r = mgmt(ddir, "config", "reload")
        assert any("LUN 3 resized" in x for x in r["applied"])
        assert any("isns" in x for x in r["not_applied"])
        assert any("slp_auth" in x for x in r["not_applied"])
        assert "`vhost` changed: restart to apply it" in r["not_applied"]
        pids = list(kids.values())
    assert t.proc.returncode == 0
    assert wait_gone(pids, 10) == []


ADDED = "iqn.2026-11.org.test:added"


def test_reload_applies_target_reset_and_a_save_keeps_it(ddir):
    """target_reset edited by hand (on a target, and on a target the reload
    adds) is applied live, and the next save writes it back, not the default."""
    with Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0):
        endpoint = f"ipc://{ddir}/stml.sock"
        with LoopbackClient(endpoint, IQN, timeout=10) as c:
            assert c.task_mgmt(Tmf.TARGET_WARM_RESET) == TmfResponse.NOT_AUTHORIZED   # the default
        cfg = Path(ddir) / "scsi-target.toml"

        def edit(doc):
            _target_table(doc, IQN)["target_reset"] = True
            added = tomlkit.table()
            added.update({"name": ADDED, "target_reset": True})
            lun = tomlkit.table()
            lun.update({"backend": "ram", "size": "1MiB"})
            added["lun"] = tomlkit.aot()
            added["lun"].append(lun)
            doc["target"].append(added)
        _edit(cfg, edit)
        r = mgmt(ddir, "config", "reload")
        assert f"target {IQN} target_reset" in r["applied"] and r["not_applied"] == []
        for name in (IQN, ADDED):
            with LoopbackClient(endpoint, name, timeout=10) as c:
                assert c.task_mgmt(Tmf.TARGET_WARM_RESET) == TmfResponse.COMPLETE, name
        mgmt(ddir, "acl", "add", INITIATORS[0])                 # a change: the whole file is saved
        saved = tomllib.loads(cfg.read_text())
        assert [t.get("target_reset") for t in saved["target"]] == [True, True]


def test_a_reload_reports_an_edited_id_of_a_running_lun(ddir):
    """A running LUN's `id` edited in the file is a new identity, another disk
    to its initiators: a reload does not apply it, and says so in one line (it
    used to pass over it in silence); the LUN keeps its designator, and the
    file keeps the edit (0231, 0298). With another setting edited too: still
    one line for the LUN, naming both."""
    with Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0):
        endpoint = f"ipc://{ddir}/stml.sock"
        cfg = Path(ddir) / "scsi-target.toml"
        served = tomllib.loads(cfg.read_text())["target"][0]["lun"][0]["id"]
        with LoopbackClient(endpoint, IQN, timeout=10) as c:
            naa = c.inquiry(0, 0x83)[8:24]
        new = "0123456789abcdef0123456789abcdef"

        def edit(doc):
            _target_table(doc, IQN)["lun"][0]["id"] = new
        _edit(cfg, edit)
        r = mgmt(ddir, "config", "reload")
        assert r["applied"] == [] and len(r["not_applied"]) == 1, r
        line = r["not_applied"][0]
        assert "id changed" in line and served in line and new in line and "restart" in line, line
        with LoopbackClient(endpoint, IQN, timeout=10) as c:
            assert c.inquiry(0, 0x83)[8:24] == naa
        _edit(cfg, lambda doc: _target_table(doc, IQN)["lun"][0].update({"removable": True}))
        r = mgmt(ddir, "config", "reload")
        assert r["applied"] == [] and len(r["not_applied"]) == 1, r
        assert "id changed" in r["not_applied"][0] and "removable" in r["not_applied"][0], r
        mgmt(ddir, "acl", "add", INITIATORS[0])             # a change, saved: the edits stay
        assert tomllib.loads(cfg.read_text())["target"][0]["lun"][0]["id"] == new


def test_edits_a_reload_cannot_apply_survive_later_saves(ddir):
    """What `config reload` reports as not applied (a LUN setting that needs a
    restart, a hand-added LUN whose backend cannot open, the removal of a
    target with sessions) stays in the file through later changes, until a
    restart applies it; `config save --force` gives the file the running
    configuration instead."""
    with Target("--no-iscsi", "--lun", f"file:{ddir}/a.img,size=4MiB", data_dir=ddir, portals=(),
                expect_portals=0):
        endpoint = f"ipc://{ddir}/stml.sock"
        mgmt(ddir, "target", "add", ADDED)
        mgmt(ddir, "lun", "add", "--target", ADDED, "ram:1MiB")
        cfg = Path(ddir) / "scsi-target.toml"
        with LoopbackClient(endpoint, ADDED, timeout=10):       # a session on ADDED
            def edit(doc):
                first = _target_table(doc, IQN)
                first["lun"][0]["block_size"] = 4096                  # needs a restart
                lun = tomlkit.table()
                lun.update({"lun": 1, "backend": "file", "path": "no/such/dir/b.img", "size": "1MiB"})
                first["lun"].append(lun)                              # cannot open
                del doc["target"][1]                                  # has a session
            _edit(cfg, edit)
            r = mgmt(ddir, "config", "reload")
            assert r["applied"] == [] and len(r["not_applied"]) == 3, r
            # the LUN that cannot open stays in the file, where a start serves it offline: say so
            assert [x for x in r["not_applied"] if "a start with this file serves it offline" in x] == [
                x for x in r["not_applied"] if "b.img" in x], r
            mgmt(ddir, "acl", "add", INITIATORS[0])             # a change, saved
        saved = tomllib.loads(cfg.read_text())
        assert [t["name"] for t in saved["target"]] == [IQN]
        luns = saved["target"][0]["lun"]
        assert luns[0]["block_size"] == 4096 and luns[1]["path"] == "no/such/dir/b.img"
        assert saved["target"][0]["acl"] == [INITIATORS[0]]
        # the suggested forced command works, and the file stays as edited
        mgmt(ddir, "target", "remove", "--force", ADDED)
        assert tomllib.loads(cfg.read_text())["target"][0]["lun"][0]["block_size"] == 4096
        mgmt(ddir, "config", "save", "--force")
        luns = tomllib.loads(cfg.read_text())["target"][0]["lun"]
        assert [x["lun"] for x in luns] == [0] and "block_size" not in luns[0]


def test_a_reload_resizes_no_lun_whose_size_was_not_edited(ddir):
    """A file LUN's `size` is the size its file was created with: an existing
    file is served at its own size. A reload of the unedited file (config diff:
    the same) used to make that size the LUN's anyway, growing one LUN and
    reporting a shrink of another; it changes only sizes edited since
    (docs/decisions/0278)."""
    (Path(ddir) / "small.img").write_bytes(bytes(4 << 20))
    (Path(ddir) / "big.img").write_bytes(bytes(16 << 20))
    with Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0):
        mgmt(ddir, "lun", "add", "file:small.img,size=8MiB")
        mgmt(ddir, "lun", "add", "file:big.img,size=8MiB")
        sizes = {x["lun"]: x["size"] for x in mgmt(ddir, "lun", "list")}
        assert sizes == {0: 4 << 20, 1: 4 << 20, 2: 16 << 20}
        assert cli("config", "diff", "--data-dir", ddir).returncode == 0
        r = mgmt(ddir, "config", "reload")
        assert r["applied"] == [] and r["not_applied"] == [], r
        assert {x["lun"]: x["size"] for x in mgmt(ddir, "lun", "list")} == sizes
        assert os.path.getsize(Path(ddir) / "small.img") == 4 << 20
        # a size edited by hand is applied
        def edit(doc):
            next(x for x in _target_table(doc, IQN)["lun"] if x.get("path") == "small.img")["size"] = "12MiB"
        _edit(Path(ddir) / "scsi-target.toml", edit)
        r = mgmt(ddir, "config", "reload")
        assert r["applied"] == [f"target {IQN} LUN 1 resized to {12 << 20} bytes"], r
        assert os.path.getsize(Path(ddir) / "small.img") == 12 << 20


def test_a_change_that_cannot_be_saved_exits_1(ddir):
    """A save that fails (here: the temporary file's name is taken by a
    directory) leaves the change live but answers exit 1 and says so; a later
    save records it."""
    with Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0) as t:
        stml = children_by_module(t.proc.pid)["stml"]
        blocker = Path(ddir) / f".scsi-target.toml.{stml}.tmp"
        (blocker / "x").mkdir(parents=True)
        p = cli("acl", "add", "--data-dir", ddir, INITIATORS[0])
        assert p.returncode == 1, p
        assert p.stderr.startswith("scsi-target: acl add: applied, but NOT saved to ")
        assert p.stderr.count("\n") == 1 and "config save" in p.stderr
        assert mgmt(ddir, "target", "list")[0]["acl"] == [INITIATORS[0]]
        p = cli("config", "save", "--data-dir", ddir)          # an I/O error, not a refusal
        assert (p.returncode, p.stderr) == (1, f"scsi-target: config save: cannot write "
                                               f"{ddir}/scsi-target.toml: Is a directory\n")
        shutil.rmtree(blocker)
        mgmt(ddir, "config", "save")
        assert tomllib.loads((Path(ddir) / "scsi-target.toml").read_text())["target"][0]["acl"] == \
            [INITIATORS[0]]


def test_run_takes_the_data_dir_lock_before_it_writes_the_config(ddir):
    """Two first starts on one data dir: the one that does not get the lock
    writes nothing (it would replace the other's file, ids and all)."""
    import fcntl
    fd = os.open(Path(ddir) / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        p = cli("run", "--data-dir", ddir, "--lun", "ram:4MiB", "--portal", "127.0.0.1:0", timeout=30)
    finally:
        os.close(fd)
    assert p.returncode == 2 and "another target is running in it" in p.stderr
    assert not (Path(ddir) / "scsi-target.toml").exists()


# ------------------------------------------------------------------ no orphans

def test_sigkill_of_run_during_a_long_command_leaves_no_process(ddir, tmp_path):
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)          # sparse: the copy is long, the file costs nothing
    t = Target("--lun", "ram:1GiB", data_dir=ddir)
    kids = list(children_by_module(t.proc.pid).values())
    copy = subprocess.Popen([*CLI, "loop", "copy-in", str(image), "--data-dir", ddir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        sessions = MgmtClient(f"ipc://{ddir}/stml.sock")
        while not any(s["commands"] for s in sessions.call("session_list")):
            assert time.monotonic() < deadline and copy.poll() is None
            time.sleep(0.05)
        assert copy.poll() is None           # mid-command
        os.kill(t.proc.pid, signal.SIGKILL)
        assert wait_gone(kids, 5) == []
    finally:
        kill_all(kids)
        stop_pid(copy)
        t.stop()


def test_a_busy_stml_stops_within_its_grace_after_sigterm(tmp_path):
    """StopGuard: the loop is busy (blocked, as by long work on it); SIGTERM
    still ends the process once the grace has passed."""
    script = textwrap.dedent("""
        import asyncio, time
        from stml.server import StopGuard
        async def main():
            StopGuard(asyncio.Event(), grace=0.5)
            print("busy", flush=True)
            time.sleep(120)          # the loop never gets to run the stop
        asyncio.run(main())
    """)
    out = tmp_path / "out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_line(out, re.compile("busy"), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 1
        assert "exiting without a clean stop" in out.read_text()
    finally:
        stop_pid(proc)


# ------------------------------------------------------------------ failing fast

def test_a_stale_socket_gets_one_line_at_once(ddir):
    t2 = Target("--no-iscsi", "--lun", "ram:4MiB", data_dir=ddir, portals=(), expect_portals=0)
    kids = list(children_by_module(t2.proc.pid).values())
    for pid in [t2.proc.pid, *kids]:
        os.kill(pid, signal.SIGKILL)   # no clean stop: the socket files stay behind
    assert wait_gone(kids, 10) == []
    t2.stop()
    assert (Path(ddir) / "stml.sock").exists()
    want = f"no target is running in {ddir} (started with: scsi-target run --data-dir {ddir})"
    for args, prefix in ((["status"], "scsi-target"), (["loop", "capacity"], "scsi-target loop")):
        p = cli(*args, "--data-dir", ddir, timeout=10)
        assert (p.returncode, p.stderr) == (1, f"{prefix}: {want}\n")


def test_a_stale_socket_is_known_without_a_zeromq_round_trip(ddir, monkeypatch):
    """What makes the answer fast: a connect attempt on the socket file,
    before any ZeroMQ socket that would wait for an answer."""
    import zmq
    from scsi_target.endpoint import NotRunning
    path = Path(ddir) / "stml.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))      # bound, never listening: as a dead STML leaves it
    def no_zmq(*a, **k):
        raise AssertionError("a ZeroMQ context was made")
    monkeypatch.setattr(zmq.Context, "instance", no_zmq)
    with pytest.raises(NotRunning, match="no target is running in"):
        MgmtClient(f"ipc://{path}", timeout=30).call("status")


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_an_unbindable_portal_makes_run_exit_2_before_any_banner(ddir):
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        p = cli("run", "--data-dir", ddir, "--lun", "ram:4MiB", "--portal", f"127.0.0.1:{port}", timeout=30)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"scsi-target: portal 127.0.0.1:{port}: cannot listen: Address already in use "
        f"(another iSCSI target? `ss -ltnp` shows who)"]
    # a first start that did not serve writes no config: the next one may say other --lun flags
    assert not (Path(ddir) / "scsi-target.toml").exists()


def test_a_front_end_that_cannot_open_the_stml_portal_exits_2(ddir):
    """fetd_tcp following the STML's list: a portal taken at start is an error,
    not a log line (the race `run`'s own check cannot see)."""
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        stml = StmlProcess(Path(ddir), ("ram:4MiB",), ("--portal", f"127.0.0.1:{port}")).start()
        try:
            p = subprocess.run([sys.executable, "-m", "fetd_tcp", "--stml", stml.endpoint],
                               capture_output=True, text=True, timeout=60)
        finally:
            stml.stop()
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"scsi-target: fetd-tcp: cannot listen on 127.0.0.1:{port} (tpgt 1): Address already in use")


def test_a_front_end_whose_stml_does_not_answer_says_so_once_and_keeps_trying(ddir):
    """`scsi-target fetd-tcp` given an endpoint nobody serves (yet) waited in
    silence: it says so in one line after a few heartbeats, keeps asking, and
    attaches once an STML serves there (0206)."""
    endpoint = f"ipc://{ddir}/later.sock"
    fe = Proc([sys.executable, "-m", "scsi_target", "fetd-tcp", "--stml", endpoint, "--portal", "127.0.0.1:0"],
              Path(ddir) / "fe.out", Path(ddir) / "fe.err")
    try:
        fe.wait_log(f"no answer from the STML at {endpoint}; still trying")
        assert fe.alive()
        # its portal is open, but serves nobody yet: the line says so (0704)
        fe.wait_line(f"fetd_tcp: listening on 127.0.0.1:[0-9]+ \\(tpgt 1\\); waiting for the STML at {re.escape(endpoint)} ")
        stml = StmlProcess(Path(ddir) / "stml", ("ram:4MiB",), ("--stml-endpoint", endpoint)).start()
        try:
            fe.wait_line("fetd_tcp: attached to STML")
            fe.wait_log(f"the STML at {endpoint} answers")
        finally:
            stml.stop()
    finally:
        fe.stop()
    assert fe.log().count("no answer from the STML") == 1, fe.log()


def test_portal_add_of_a_taken_port_is_refused_and_status_shows_listeners(ddir):
    with Target("--lun", "ram:4MiB", data_dir=ddir) as t, _listening_socket() as taken:
        port = taken.getsockname()[1]
        p = cli("portal", "add", "--data-dir", ddir, f"127.0.0.1:{port}")
        assert p.returncode == 2
        assert p.stderr == (f"scsi-target: portal add refused: cannot listen on 127.0.0.1:{port}: "
                            f"Address already in use\n")
        portals = mgmt(ddir, "portal", "list")
        assert [(x["portal"], x["state"]) for x in portals] == [
            ("127.0.0.1:0", f"listening on port {t.portal.rsplit(':', 1)[1]}")]
        assert "127.0.0.1:0" in ok("status", "--data-dir", ddir, "--interval", "0")
        assert tomllib.loads((Path(ddir) / "scsi-target.toml").read_text())["portals"] == ["127.0.0.1:0"]


def test_portal_add_of_a_name_that_does_not_resolve_says_so(ddir):
    with Target("--lun", "ram:4MiB", data_dir=ddir):
        p = cli("portal", "add", "--data-dir", ddir, "no-such-host.invalid:3261")
        assert p.returncode == 2
        # the resolver's own words: a host with DNS says the name is unknown, one without it
        # that resolution failed for now; never a bare errno ("Unknown error -2")
        assert p.stderr in (f"scsi-target: portal add refused: cannot listen on no-such-host.invalid:3261: {why}\n"
                            for why in ("Name or service not known", "Temporary failure in name resolution"))
        assert [x["portal"] for x in mgmt(ddir, "portal", "list")] == ["127.0.0.1:0"]


def test_a_data_dir_that_cannot_be_written_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = cli("run", "--data-dir", str(blocker / "data"), "--portal", "127.0.0.1:0", timeout=30)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == f"scsi-target: data dir {blocker / 'data'}: not usable: Not a directory\n"
    d = tmp_path / "immutable"
    d.mkdir()
    need_root("an immutable directory (chattr +i)")
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        for verb in (["run", "--portal", "127.0.0.1:0"], ["stml"]):
            p = cli(*verb, "--data-dir", str(d), "--lun", "ram:4MiB", timeout=30)
            assert p.returncode == 2 and p.stdout == ""
            assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
            assert str(d) in p.stderr and "Operation not permitted" in p.stderr
    finally:
        subprocess.run(["chattr", "-i", str(d)])


def test_a_data_dir_others_can_write_is_refused(tmp_path):
    """`run` as root in a directory another user can write: that user could
    plant the config (a LUN on /dev/sda, no ACL) or a LUN file's symlink
    before the first start. Refused in one line, exit 2, touching nothing;
    a directory of another owner too."""
    for name, mode in (("world", 0o777), ("group", 0o775), ("sticky", 0o1777)):
        d = tmp_path / name
        d.mkdir()
        d.chmod(mode)
        for verb in ("run", "stml"):    # a standalone STML as well
            extra = ("--portal", "127.0.0.1:0")
            p = cli(verb, "--data-dir", str(d), "--lun", "ram:4MiB", *extra, timeout=30)
            assert (p.returncode, p.stdout) == (2, ""), (verb, p.stderr)
            assert p.stderr.startswith(f"scsi-target: data dir {d}: writable by ") and p.stderr.count("\n") == 1
            assert "chmod go-w" in p.stderr and list(d.iterdir()) == []
    need_root("a directory of another owner")
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    p = cli("run", "--data-dir", str(other), "--lun", "ram:4MiB", "--portal", "127.0.0.1:0", timeout=30)
    assert p.returncode == 2 and p.stderr == (f"scsi-target: data dir {other}: owned by uid 65534, who can "
                                              f"replace what is in it: use a directory of your own\n")


def test_a_second_run_on_one_data_dir_is_refused(ddir):
    with Target("--lun", "ram:4MiB", data_dir=ddir) as t:
        p = cli("run", "--data-dir", ddir, "--portal", "127.0.0.1:0", timeout=30)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr == (f"scsi-target: data dir {ddir}: another target is running in it "
                            f"(pid {t.proc.pid}): stop it first, or use another --data-dir\n")
        assert mgmt(ddir, "lun", "list")       # the first one still serves


# ------------------------------------------------------------------ startup, logs, readiness

def test_readiness_reaches_systemd_and_wait_ready(ddir, tmp_path):
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(sock_path))
        notify.settimeout(30)
        with Target("--lun", "ram:4MiB", data_dir=ddir, env={"NOTIFY_SOCKET": str(sock_path)}) as t:
            msg = notify.recv(4096).decode()
            assert "READY=1" in msg.splitlines() and f"MAINPID={t.proc.pid}" in msg
            assert ok("wait-ready", "--data-dir", ddir, "--timeout", "10") == f"ready: ipc://{ddir}/stml.sock\n"
    p = cli("wait-ready", "--data-dir", ddir, "--timeout", "0.5")
    assert p.returncode == 1 and p.stderr.startswith("scsi-target: not ready after 0.5s: no target is running")


def test_wait_ready_with_no_portals(ddir):
    """`portals = []`: ready once the iSCSI front end is attached, as run says."""
    (Path(ddir) / "scsi-target.toml").write_text(
        f'portals = []\n\n[[target]]\nname = "{IQN}"\n\n[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    with Target(data_dir=ddir, portals=(), expect_portals=0):
        assert ok("wait-ready", "--data-dir", ddir, "--timeout", "10") == f"ready: ipc://{ddir}/stml.sock\n"


def test_a_gateways_portals_are_its_front_ends_own(ddir):
    """A gateway's front end listens on the portals it started with, whichever
    gateway serves, and reports them to no STML: wait-ready does not wait for
    a report that never comes, and the portal verbs and a reload do not claim
    a listener that nobody opened (decisions/0414)."""
    cfg = Path(ddir) / "scsi-target.toml"
    cfg.write_text('portals = ["127.0.0.1:0,1"]\n\n[stml]\nlisten = ["tcp://127.0.0.1:0"]\ninsecure = true\n'
                   'peers = ["tcp://127.0.0.1:9"]\n\n'
                   f'[[target]]\nname = "{IQN}"\n\n[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    with Target(data_dir=ddir, portals=()):
        assert ok("wait-ready", "--data-dir", ddir, "--timeout", "10") == f"ready: ipc://{ddir}/stml.sock\n"
        assert [p["state"] for p in mgmt(ddir, "portal", "list")] == ["set at the gateway's start"]
        for verb, portal in (("add", "127.0.0.2:3260,1"), ("remove", "127.0.0.1:0")):
            p = cli("portal", verb, "--data-dir", ddir, portal)
            assert p.returncode == 2 and p.stderr == (
                f"scsi-target: portal {verb} refused: this is a gateway ([stml] peers): its front end listens "
                f"on the portals it started with, whichever gateway serves: edit `portals` in {cfg} and "
                "restart it\n")
        cfg.write_text(cfg.read_text().replace('"127.0.0.1:0,1"', '"127.0.0.2:3260,1"'))
        r = mgmt(ddir, "config", "reload")
        assert r["applied"] == [] and len(r["not_applied"]) == 1
        assert r["not_applied"][0].startswith("`portals` changed: this is a gateway")
        assert [p["portal"] for p in mgmt(ddir, "portal", "list")] == ["127.0.0.1:0,1"]


def test_wait_ready_on_a_gateway_means_an_initiator_can_log_in_now(ddir):
    """A gateway's front end reports its portals to no STML (0414), so its
    STML answering is not enough: wait-ready returns once `run` serves (its
    front end listens on every portal and is attached: the banner, READY=1),
    and a login right after it succeeds. The front end's first detect is
    held back (fault injection) so that the STML answers well before
    (decisions/0237)."""
    port = free_port()
    (Path(ddir) / "scsi-target.toml").write_text(
        f'portals = ["127.0.0.1:{port},1"]\n\n[stml]\nlisten = ["tcp://127.0.0.1:0"]\ninsecure = true\n'
        'peers = ["tcp://127.0.0.1:9"]\n\n'
        f'[[target]]\nname = "{IQN}"\n\n[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    target = Proc([sys.executable, "-m", "scsi_target", "run", "--data-dir", ddir, "--cpu-affinity", "none",
                   "--inject", "fetd:delay detect at=1 ms=3000"], Path(ddir) / "run.out", session=True)
    try:
        assert ok("wait-ready", "--data-dir", ddir, "--timeout", "60") == f"ready: ipc://{ddir}/stml.sock\n"
        ini = RawInitiator("127.0.0.1", port)
        try:
            assert ini.login(IQN).status_class == 0, target.output()
            assert ini.command(bytes(6))[0] == 0
        finally:
            ini.close()
    finally:
        stop_pid(target.proc, session=True)


def test_a_malformed_portal_report_does_not_break_portal_list(stml_factory):
    """A front end's portal_state entry without host/port/tpgt is no match,
    not an internal error of `portal list` and `status`."""
    p = stml_factory("ram:4MiB")
    m = MgmtClient(p.endpoint)
    with LoopbackClient(p.endpoint, timeout=10) as c:
        assert c._link is not None
        c._loop.call_soon_threadsafe(c._link.portal_state, [{"listening": True}])
        deadline = time.monotonic() + 20
        while (portals := m.call("portal_list"))[0]["state"] == "no front end":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [x["state"] for x in portals] == ["opening"]
        assert m.call("status")["portals"] == portals


def test_status_says_a_lun_file_was_replaced_under_it(ddir):
    """A LUN file replaced with `mv` (or deleted) is still served from the
    open file, which a restart will not find: `status` says so, for that LUN."""
    img = Path(ddir) / "a.img"
    with Target("--no-iscsi", "--lun", f"file:{img},size=1MiB", "--lun", "ram:1MiB", data_dir=ddir,
                portals=(), expect_portals=0):
        assert "was deleted or replaced" not in ok("status", "--data-dir", ddir)
        (Path(ddir) / "new.img").write_bytes(bytes(1 << 20))
        os.replace(Path(ddir) / "new.img", img)
        shown = ok("status", "--data-dir", ddir)
        assert f"LUN 0 of {IQN}: its file {img} was deleted or replaced" in shown, shown
        assert "LUN 1 of" not in shown.split("\n\n")[0], shown


def test_banner_logs_and_a_clean_stop(ddir):
    with Target("--lun", "ram:64MiB", data_dir=ddir) as t:
        url = t.url(0)
        assert "DIRECT_ACCESS" in run(["iscsi-inq", url]).stdout
        banner = t.log()
        assert "LUN 0: 64 MiB RAM" in banner and f"      {url}\n" in banner and "Ctrl-C" in banner
        deadline = time.monotonic() + 10
        while "session ended" not in t.log():
            assert time.monotonic() < deadline, t.log()
            time.sleep(0.05)
        port = t.portal
        t.proc.send_signal(signal.SIGINT)      # as Ctrl-C: to run alone (its children have their own group)
        assert t.proc.wait(20) == 0
    text = t.log()
    login = next(x for x in text.splitlines() if "login: iqn" in x and IQN in x)
    assert f"via {port}" in login
    assert re.search(rf"logout: iqn\S+ 0x[0-9a-f]+ -> {IQN}", text)
    assert re.search(rf"session ended: iqn\S+ 0x[0-9a-f]+ -> {IQN} via {port}", text)
    after = text[text.index("session ended"):]
    assert after.count("stopped") == 1 and "WARNING" not in after and "link lost" not in after
    # one format: every line but the banner is a timestamped log line
    banner_lines = {line for line in text.splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d", line)}
    assert all(line.startswith(("scsi-target: serving", "  ", "CPUs:", "Ready.")) for line in banner_lines), \
        banner_lines


def test_the_banner_lists_a_bounded_number_of_luns(ddir):
    """A start's banner (in the journal at every start) does not grow with
    the LUNs: the first ones, then how many more and where to see them."""
    luns = "".join(f'[[target.lun]]\nlun = {n}\nbackend = "ram"\nsize = "1MiB"\n' for n in range(12))
    (Path(ddir) / "scsi-target.toml").write_text(
        "".join(f'[[target]]\nname = "iqn.2026-11.org.example:t{i}"\n{luns}' for i in range(2)))
    with Target(data_dir=ddir) as t:
        banner = t.wait_log("Ready. ")
    assert len(re.findall(r"^    LUN \d+: 1 MiB RAM$", banner, re.M)) == 16
    assert "  ... and 8 more LUN(s): `scsi-target lun list`\n" in banner
    assert "scsi-target: serving 2 target(s), 24 LUN(s)" in banner


def test_json_log_format(ddir):
    with Target("--lun", "ram:4MiB", "--log-format", "json", data_dir=ddir) as t:
        pass
    records = [json.loads(line) for line in t.log().splitlines() if line.startswith("{")]
    assert {r["process"] for r in records} >= {"stml", "fetd_tcp", "run"}
    assert any(r["message"].startswith("listening on") and r["process"] == "fetd_tcp" for r in records)


# ------------------------------------------------------------------ the CLI

LONG_TARGET = "iqn.2026-11.com.example.storage-cluster-01:database-primary-volume"
LONG_INITIATOR = "iqn.1994-05.com.redhat:a3f5e1c8b9d2-db-replica-host-17"


def test_ls_and_status_fit_100_columns_with_realistic_names(ddir):
    os.makedirs(f"{ddir}/volumes")
    with Target("--iqn", LONG_TARGET, "--lun", f"file:{ddir}/volumes/primary-database-volume.img,size=16MiB",
                "--lun", "ram:8MiB", data_dir=ddir) as t:
        host, port = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(port), initiator=LONG_INITIATOR)
        try:
            ini.login(LONG_TARGET)
            mgmt(ddir, "acl", "add", LONG_INITIATOR)
            for args in (["ls"], ["status", "--interval", "0.2"]):
                out = ok(*args, "--data-dir", ddir)
                assert max(len(line) for line in out.splitlines()) <= 100, out
                wide = ok(*args, "--data-dir", ddir, "--wide")
                assert LONG_INITIATOR in wide and LONG_TARGET in wide
            tree = ok("ls", "--data-dir", ddir)
            for needle in ("o- tpgs", "o- luns", "lun 0 [16.0MiB, file,", "lun 1 [8.0MiB, ram, RAM]",
                           "o- acls", "o- sessions", "[listening on port"):
                assert needle in tree, tree
            status = ok("status", "--data-dir", ddir, "--interval", "0.2")
            assert "16.0MiB" in status and "IOPS" in status and "READ/S" in status
        finally:
            ini.close()


def test_lun_resize_to_a_smaller_size_needs_force(ddir):
    with Target("--lun", "ram:16MiB", data_dir=ddir):
        p = cli("lun", "resize", "--data-dir", ddir, "0", "8MiB")
        assert p.returncode == 2 and "--force" in p.stderr
        assert mgmt(ddir, "lun", "list")[0]["size"] == 16 << 20
        assert mgmt(ddir, "lun", "resize", "0", "8MiB", "--force")["size"] == 8 << 20


def test_options_after_the_verb_and_sizes_everywhere(ddir, tmp_path):
    with Target("--no-iscsi", "--lun", "ram:64MiB", data_dir=ddir, portals=(), expect_portals=0):
        assert "blocks: 131072" in ok("--data-dir", ddir, "loop", "capacity")     # before the group
        assert "blocks: 131072" in ok("loop", "capacity", "--data-dir", ddir)     # after the verb
        assert json.loads(ok("--data-dir", ddir, "lun", "list", "--json"))[0]["lun"] == 0
        out = tmp_path / "part.img"
        p = cli("loop", "copy-out", str(out), "--size", "32MiB", "--data-dir", ddir)
        assert p.returncode == 0, p.stderr
        assert out.stat().st_size == 32 << 20
        assert p.stdout.startswith(f"copied {32 << 20} bytes (32 MiB) out of LUN 0 in ")   # and the rate
        p = cli("loop", "copy-out", str(out), "--size", "12XB", "--data-dir", ddir)
        assert p.returncode == 2 and "is not a size" in p.stderr


def test_every_verb_has_help_and_completion_scripts_print():
    import click
    from scsi_target.cli import main

    def walk(cmd: click.Command, path: str) -> list[tuple[str, click.Command]]:
        out = [(path, cmd)]
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                out += walk(sub, f"{path} {name}")
        return out
    missing = [path for path, cmd in walk(main, "scsi-target") if not (cmd.help or "").strip()]
    assert missing == []
    # and each one's line in a listing is whole, not cut off with "..." (80 columns)
    cut = [path for path, cmd in walk(main, "scsi-target")[1:] if cmd.get_short_help_str(60).endswith("...")]
    assert cut == []
    assert "Exit codes" in ok("--help")
    for shell, needle in (("bash", "complete -o nosort -F"), ("zsh", "compdef"), ("fish", "complete")):
        assert needle in ok("completion", shell)


def test_the_unit_file_verifies_and_matches_the_packaged_one(tmp_path):
    from scsi_target.service import unit_text
    packaged = Path(__file__).resolve().parent.parent / "packaging" / "scsi-target.service"
    assert packaged.read_text() == unit_text()
    assert ok("service", "unit", "--defaults") == unit_text()
    for key in ("Type=notify", "User=scsi-target", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                "NoNewPrivileges=yes", "ProtectSystem=strict", "RuntimeDirectory=scsi-target",
                "ExecReload=/usr/bin/scsi-target config reload --data-dir /var/lib/scsi-target"):
        assert f"\n{key}\n" in packaged.read_text()
    unit = tmp_path / "scsi-target.service"
    unit.write_text(unit_text(f"{sys.executable} -m scsi_target"))
    if shutil.which("systemd-analyze") is None:
        import configparser
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read_string(unit.read_text())
        assert parser["Service"]["Type"] == "notify"
        return
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_the_units_reload_fails_when_the_target_refuses_the_edit(ddir):
    """`systemctl reload` runs the unit's ExecReload: a broken edit makes it
    fail with the reason (kill -HUP succeeded whatever the target did with
    it, and the refusal was only in the journal); a good one succeeds."""
    import shlex
    from scsi_target.service import unit_text
    line = next(x for x in unit_text(f"{sys.executable} -m scsi_target", ddir).splitlines()
                if x.startswith("ExecReload="))
    argv = shlex.split(line[len("ExecReload="):])
    with Target("--lun", "ram:4MiB", data_dir=ddir):
        cfg = Path(ddir) / "scsi-target.toml"
        good = cfg.read_text()
        cfg.write_text(good + "portals = [\n")
        p = run(argv, check=False)
        assert p.returncode == 2
        assert p.stderr.startswith(f"scsi-target: config reload refused: {cfg}: not valid TOML")
        cfg.write_text(good.replace('size = "4MiB"', 'size = "8MiB"'))
        p = run(argv)
        assert "1 change(s) applied" in p.stdout
        assert mgmt(ddir, "lun", "list")[0]["size"] == 8 << 20


def test_a_missing_lun_directory_is_one_line_before_any_banner(ddir):
    p = cli("run", "--data-dir", ddir, "--lun", f"file:{ddir}/no/such/dir/x.img,size=1MiB",
            "--portal", "127.0.0.1:0", timeout=30)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == (f"scsi-target: target {IQN} LUN 0: cannot create {ddir}/no/such/dir/x.img: "
                        f"directory {ddir}/no/such/dir does not exist\n")
    assert not (Path(ddir) / "scsi-target.toml").exists()    # nothing half-configured is kept


@pytest.mark.parametrize("spec, why", [
    ("file:{tmp}", "{tmp}: Is a directory"),
    ("file:/dev/zero", "/dev/zero: not a regular file or block device"),
    ("file:{tmp}/tiny.img", "backing store smaller than one block"),
])
def test_a_lun_a_first_start_cannot_serve_is_one_line_and_no_config(ddir, tmp_path, spec, why):
    """A typo in a first start's --lun (a directory, a device that is no disk)
    fails the start, as a missing directory does, instead of being served
    offline under a banner and saved as a LUN."""
    (tmp_path / "tiny.img").write_bytes(b"x" * 100)
    p = cli("run", "--data-dir", ddir, "--lun", spec.format(tmp=tmp_path), "--portal", "127.0.0.1:0", timeout=30)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == f"scsi-target: target {IQN} LUN 0: {why.format(tmp=tmp_path)}\n"
    assert not (Path(ddir) / "scsi-target.toml").exists()


def test_an_interrupted_copy_says_how_far_it_got(ddir, tmp_path):
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    with Target("--no-iscsi", "--lun", "ram:1GiB", data_dir=ddir, portals=(), expect_portals=0):
        # SIGINT as a terminal gives it, also when the suite runs in the background (ignored there)
        copy = subprocess.Popen([sys.executable, "-c", "import os, signal, sys; "
                                 "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
                                 *CLI, "loop", "copy-in", str(image), "--data-dir", ddir],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            sessions = MgmtClient(f"ipc://{ddir}/stml.sock")
            deadline = time.monotonic() + 20
            # 64 MiB written: with 4 MiB in flight at most, the copy has seen 60 MiB through.
            # Looked at while the copy is stopped, so it cannot finish between the look and SIGINT.
            while True:
                copy.send_signal(signal.SIGSTOP)
                if any(s["write_bytes"] >= 64 << 20 for s in sessions.call("session_list")):
                    break
                copy.send_signal(signal.SIGCONT)
                assert time.monotonic() < deadline and copy.poll() is None
                time.sleep(0.02)
            copy.send_signal(signal.SIGINT)
            copy.send_signal(signal.SIGCONT)
            out, err = copy.communicate(timeout=30)
        finally:
            stop_pid(copy)
    assert copy.returncode == 130, err
    m = re.search(r"copy-in interrupted after (\d+) of 1073741824 bytes \(.* MiB of 1 GiB, .*/s\); "
                  r"bytes 0-(\d+) are done", err)
    assert m and 0 < int(m.group(1)) < 1 << 30 and int(m.group(2)) == int(m.group(1)) - 1, err


def test_a_restarted_stml_learns_the_listener_states_again(ddir):
    """The front end reports its listeners to an STML that restarted (it
    re-registers; its portals did not change), so wait-ready and `portal
    list` see them."""
    with Target("--lun", "ram:4MiB", data_dir=ddir) as t:
        stml = children_by_module(t.proc.pid)["stml"]
        os.kill(stml, signal.SIGKILL)
        assert wait_gone([stml], 10) == []
        deadline = time.monotonic() + 30
        while children_by_module(t.proc.pid).get("stml") in (None, stml):
            assert time.monotonic() < deadline, t.log()
            time.sleep(0.05)
        assert ok("wait-ready", "--data-dir", ddir, "--timeout", "30").startswith("ready")
        assert [x["state"].split()[0] for x in mgmt(ddir, "portal", "list")] == ["listening"]


def test_config_show_and_save_to_another_file(ddir, tmp_path):
    """`config save FILE` writes a copy that finds the same data dir by itself
    and serves the same LUs from it: their files (data), sizes, paths and
    identities (a copy carries the LUs' ids)."""
    endpoint = f"ipc://{ddir}/stml.sock"
    mark = os.urandom(512)
    with Target("--lun", "ram:8MiB", data_dir=ddir):
        mgmt(ddir, "lun", "add", "file:b.img,size=4MiB")       # relative to the data dir
        shown = ok("config", "show", "--data-dir", ddir)
        assert shown.rstrip() == (Path(ddir) / "scsi-target.toml").read_text().rstrip()
        copy = tmp_path / "copy.toml"
        assert mgmt(ddir, "config", "save", str(copy))["path"] == str(copy)
        before = mgmt(ddir, "lun", "list")
        with LoopbackClient(endpoint, timeout=10) as c:
            c.write(1, 3, mark)
            ids = [identity(c, lun) for lun in (0, 1)]
    saved = tomllib.loads(copy.read_text())
    assert saved["data_dir"] == ddir and saved["target"][0]["lun"][1]["path"] == "b.img"
    assert f"endpoint {endpoint}" in ok("config", "check", "--config", str(copy))   # no --data-dir
    assert f"endpoint {endpoint}" in ok("config", "check", "--data-dir", ddir)      # the data dir's file
    with Target(config=str(copy), data_dir=ddir):
        assert mgmt(ddir, "lun", "list") == before
        with LoopbackClient(endpoint, timeout=10) as c:
            assert c.read(1, 3, 1) == mark
            assert [identity(c, lun) for lun in (0, 1)] == ids


def test_service_install_writes_the_unit(tmp_path):
    """`service install` with an account that exists and --no-enable: the unit
    for this installation, nothing started."""
    p = cli("service", "install", "--user", "root", "--data-dir", "/srv/scsi-target-test",
            "--unit-dir", str(tmp_path), "--no-enable")
    assert p.returncode == 0, p.stderr
    unit = (tmp_path / "scsi-target.service").read_text()
    assert "\nUser=root\n" in unit and "run --data-dir /srv/scsi-target-test\n" in unit
    assert "\nReadWritePaths=/srv/scsi-target-test\n" in unit and "StateDirectory" not in unit
