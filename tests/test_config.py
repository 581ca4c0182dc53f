"""stml.config: TOML files and --lun specs; every error names its field."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from fetd_tcp.cli import PortalError, parse_portal
from stml.config import LEGACY_IQN, ConfigError, CurveKey, host_iqn, load, parse_lun_spec, parse_size

IQN_A = "iqn.2026-01.org.example:a"
IQN_B = "iqn.2026-01.org.example:b"


def write_toml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "target.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def load_toml(tmp_path: Path, text: str, **kw):
    return load(write_toml(tmp_path, text), data_dir=str(tmp_path / "data"), **kw)


def error_of(tmp_path: Path, text: str, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_toml(tmp_path, text, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


GOOD = f"""
    stml_endpoint = "ipc:///tmp/x/stml.sock"
    portals = ["127.0.0.1:3260", "[::1]:3261"]

    [[target]]
    name = "{IQN_A}"
    alias = "first"
    acl = ["iqn.2026-01.org.example:init1"]
    chap = {{ user = "u", secret = "twelve-chars" }}

    [[target.lun]]
    backend = "ram"
    size = "64MiB"

    [[target.lun]]
    lun = 5
    backend = "file"
    path = "disk5.img"
    size = "1GiB"
    ro = true
    block_size = 4096

    [[target]]
    name = "{IQN_B}"

    [[target.lun]]
    backend = "ram"
    size = 1048576
    removable = true
    write_cache = true
"""


def test_good_config(tmp_path):
    c = load_toml(tmp_path, GOOD)
    assert c.stml_endpoint == "ipc:///tmp/x/stml.sock"
    assert c.portals == ["127.0.0.1:3260", "[::1]:3261"]
    assert c.data_dir == (tmp_path / "data").absolute()
    assert [t.name for t in c.targets] == [IQN_A, IQN_B]
    a, b = c.targets
    assert a.alias == "first"
    assert a.acl == ["iqn.2026-01.org.example:init1"]
    assert a.chap == {"user": "u", "secret": "twelve-chars"}
    assert a.access() == {"acl": a.acl, "chap": a.chap, "mutual": None, "erl": 0, "cmdsn_depth": 128}
    assert [lc.lun for lc in a.luns] == [0, 5]
    ram, f = a.luns[0].options, a.luns[1].options
    assert (ram.kind, ram.size, ram.block_size, ram.ro) == ("ram", 64 << 20, 512, False)
    assert (f.kind, f.size, f.block_size, f.ro) == ("file", 1 << 30, 4096, True)
    assert f.path == str(c.data_dir / "disk5.img")
    o = b.luns[0].options
    assert (o.size, o.removable, o.write_cache) == (1 << 20, True, True)


def test_defaults_without_config(tmp_path):
    c = load(None, str(tmp_path))
    assert [t.name for t in c.targets] == [host_iqn()]
    o = c.targets[0].luns[0].options
    assert o.kind == "file" and o.path == str(tmp_path / "disk0.img") and o.size == 1 << 30
    assert c.stml_endpoint == f"ipc://{tmp_path / 'stml.sock'}"


def test_the_default_target_is_named_per_host_and_kept_where_it_was_served(tmp_path, monkeypatch):
    """The default target's name was the same on every host; it now carries
    the host name and a tag of the machine id (not the id itself), stable on
    one host. A data dir an older version served (its disk0.img, or
    reservations under the old name) keeps the old name (0207)."""
    import socket
    from stml import config as config_mod
    ids = tmp_path / "machine-id"
    monkeypatch.setattr(config_mod, "_MACHINE_IDS", (str(tmp_path / "absent"), str(ids)))
    monkeypatch.setattr(socket, "gethostname", lambda: "Storage_1.example.com")
    ids.write_text("0123456789abcdef0123456789abcdef\n")
    one = host_iqn()
    assert re.fullmatch(r"iqn\.2026-11\.org\.scsi-target:storage-1\.[0-9a-f]{8}", one), one
    assert "0123456789abcdef" not in one and host_iqn() == one
    ids.write_text("fedcba9876543210fedcba9876543210\n")
    assert host_iqn() != one                      # another machine, same host name
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    assert re.fullmatch(r"iqn\.2026-11\.org\.scsi-target:[0-9a-f]{8}", host_iqn())
    ids.unlink()
    assert host_iqn() == LEGACY_IQN               # nothing of this host to go by
    monkeypatch.setattr(socket, "gethostname", lambda: "Storage_1.example.com")
    fresh, served, fenced = tmp_path / "fresh", tmp_path / "served", tmp_path / "fenced"
    for d in (fresh, served, fenced / "pr"):
        d.mkdir(parents=True)
    (served / "disk0.img").write_bytes(bytes(4096))
    (fenced / "pr" / f"{LEGACY_IQN}_0.json").write_text("{}")
    assert [load(None, str(d)).targets[0].name for d in (fresh, served, fenced)] == [
        "iqn.2026-11.org.scsi-target:storage-1", LEGACY_IQN, LEGACY_IQN]


def test_command_line_luns(tmp_path):
    c = load(None, str(tmp_path), luns=("ram:64MiB", "file:/abs/x.img,size=2GiB,ro,bs=4096"))
    t = c.targets[0]
    assert t.name == host_iqn()
    assert [lc.lun for lc in t.luns] == [0, 1]
    o = t.luns[1].options
    assert (o.path, o.size, o.ro, o.block_size) == ("/abs/x.img", 2 << 30, True, 4096)


def test_flags_override_file_target(tmp_path):
    c = load_toml(tmp_path, GOOD, iqn=IQN_B, luns=("ram:2MiB",))
    b = next(t for t in c.targets if t.name == IQN_B)
    assert [lc.options.size for lc in b.luns] == [2 << 20]
    assert len(c.targets) == 2


@pytest.mark.parametrize("value,expect", [
    (512, 512), ("4096", 4096), ("64MiB", 64 << 20), ("1 GiB", 1 << 30), ("2G", 2 << 30),
    ("10MB", 10 * 10**6), ("1TiB", 1 << 40), ("8k", 8192), ("2PiB", 2 << 50),
])
def test_parse_size(value, expect):
    assert parse_size(value, "x") == expect


@pytest.mark.parametrize("value", ["12XB", "", "-5", "1.5GiB", 0, "MiB"])
def test_parse_size_rejects(value):
    with pytest.raises(ConfigError, match="where.size"):
        parse_size(value, "where.size")


# ---------------------------------------------------------------- each bad field

def _one_lun(extra: str, name: str = IQN_A) -> str:
    return f"""
        [[target]]
        name = "{name}"
        [[target.lun]]
        {extra}
    """


@pytest.mark.parametrize("lun,field", [
    ('backend = "ram"\nsize = "12XB"', "target[0].lun[0].size"),
    ('backend = "ram"\nsize = "1000"', "target[0].lun[0].size"),          # not a multiple of 512
    ('backend = "ram"\nsize = "1MiB"\nblock_size = 1024', "target[0].lun[0].block_size"),
    ('backend = "ram"\nsize = "1MiB"\ncolour = "red"', "target[0].lun[0].colour"),
    ('backend = "floppy"\nsize = "1MiB"', "target[0].lun[0].backend"),
    ('backend = "ram"', "target[0].lun[0].size"),
    ('backend = "file"\nsize = "1MiB"', "target[0].lun[0].path"),
    ('backend = "ram"\nsize = "1MiB"\nro = "yes"', "target[0].lun[0].ro"),
    ('backend = "ram"\nsize = "1MiB"\nlun = -1', "target[0].lun[0].lun"),
    ('backend = "ram"\nsize = "1MiB"\nlun = 16384', "target[0].lun[0].lun"),
])
def test_bad_lun_fields(tmp_path, lun, field):
    assert error_of(tmp_path, _one_lun(lun)).startswith(field + ":")


def test_a_missing_file_is_refused_on_the_command_line_not_in_a_saved_config(tmp_path):
    """A file LUN without a size whose file does not exist: given now (--lun),
    the admin is told at once; in a saved config it is a disk not there (yet),
    which the STML serves offline rather than refusing every LUN (0280)."""
    missing = tmp_path / "never-made.img"
    config = load_toml(tmp_path, _one_lun(f'backend = "file"\npath = "{missing}"'))
    assert config.targets[0].luns[0].options.path == str(missing)
    with pytest.raises(ConfigError, match=r"^--lun file:.*never-made.img does not exist; give a size"):
        load(None, str(tmp_path), luns=(f"file:{missing}",))


@pytest.mark.parametrize("name", ["disk0", "iqn.2026.org.x", "iqn.2026-01.org.example:a b", "eui.123",
                                  "iqn.2026-01.org.example:" + "a" * 200, "iqn.2026-01.org.example:" + "ä" * 100])
def test_bad_iqn(tmp_path, name):
    """Names past 223 bytes (RFC 7143) are refused: libiscsi and open-iscsi
    cut them, so the target would be listed and never reached."""
    msg = error_of(tmp_path, _one_lun('backend = "ram"\nsize = "1MiB"', name=name))
    assert msg.startswith("target[0].name:")


def test_good_iqn_forms(tmp_path):
    for name in ("eui.0123456789ABCDEF", "naa.0123456789abcdef", "iqn.2001-04.com.example:storage.x",
                 "iqn.2026-01.org.example:" + "a" * 199):
        c = load_toml(tmp_path, _one_lun('backend = "ram"\nsize = "1MiB"', name=name))
        assert c.targets[0].name == name.lower()


def test_duplicate_target(tmp_path):
    text = _one_lun('backend = "ram"\nsize = "1MiB"') + _one_lun('backend = "ram"\nsize = "1MiB"')
    msg = error_of(tmp_path, text)
    assert msg.startswith("target:") and IQN_A in msg


def test_duplicate_lun_number(tmp_path):
    text = f"""
        [[target]]
        name = "{IQN_A}"
        [[target.lun]]
        backend = "ram"
        size = "1MiB"
        lun = 3
        [[target.lun]]
        backend = "ram"
        size = "1MiB"
        lun = 3
    """
    msg = error_of(tmp_path, text)
    assert IQN_A in msg and "LUN 3 is defined twice" in msg


@pytest.mark.parametrize("spelling", ["symlink", "hard link", "dot-dot", "same"])
def test_two_luns_on_one_file_are_refused_however_it_is_spelled(tmp_path, spelling):
    """Two LUs on one file are two disks with one medium to the initiators
    (their own identities and reservations): writes through one corrupt what
    the other serves. A symlink, a hard link or `..` names the same file
    (docs/decisions/0277)."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "disk.img").write_bytes(bytes(1 << 20))
    other = {"symlink": "link.img", "hard link": "hard.img", "dot-dot": "sub/../disk.img",
             "same": "disk.img"}[spelling]
    (data / "link.img").symlink_to(data / "disk.img")
    (data / "hard.img").hardlink_to(data / "disk.img")
    def two(first: str, second: str) -> str:
        return f"""
            [[target]]
            name = "{IQN_A}"
            [[target.lun]]
            backend = "file"
            {first}
            [[target]]
            name = "{IQN_B}"
            [[target.lun]]
            lun = 2
            backend = "file"
            {second}
        """
    msg = error_of(tmp_path, two('path = "disk.img"', f'path = "{other}"'))
    assert msg.startswith(f"target {IQN_B} LUN 2 path:") and f"target {IQN_A} LUN 0" in msg
    # two files, and two files still to be created, are two stores
    (data / "two.img").write_bytes(bytes(1 << 20))
    load_toml(tmp_path, two('path = "disk.img"', 'path = "two.img"'))
    load_toml(tmp_path, two('path = "new1.img"\n            size = "1MiB"',
                            'path = "new2.img"\n            size = "1MiB"'))


@pytest.mark.parametrize("key", ["chap", "mutual_chap"])
def test_short_chap_secret(tmp_path, key):
    text = f"""
        [[target]]
        name = "{IQN_A}"
        {key} = {{ user = "u", secret = "short" }}
        [[target.lun]]
        backend = "ram"
        size = "1MiB"
    """
    assert error_of(tmp_path, text).startswith(f"target[0].{key}.secret:")


def test_mutual_chap_needs_chap(tmp_path):
    """Mutual CHAP alone authenticates no initiator: such a target let anyone
    in while its file said it used CHAP."""
    text = f"""
        [[target]]
        name = "{IQN_A}"
        mutual_chap = {{ user = "tgt", secret = "target-secret-1" }}
        [[target.lun]]
        backend = "ram"
        size = "1MiB"
    """
    msg = error_of(tmp_path, text)
    assert msg.startswith("target[0].mutual_chap: needs `chap` too")
    load_toml(tmp_path, text.replace("mutual_chap =", 'chap = { user = "u", secret = "initiator-secret" }\n'
                                                      "        mutual_chap ="))


def test_ram_luns_past_the_hosts_memory_are_refused(tmp_path, monkeypatch):
    """RAM LUNs that together exceed the host's memory: an initiator filling
    them gets the STML killed, every LUN with it (docs/decisions/0279)."""
    from stml import config as config_mod
    monkeypatch.setattr(config_mod, "host_memory", lambda: 64 << 20)
    two = _one_lun('backend = "ram"\nsize = "32MiB"') + _one_lun('backend = "ram"\nsize = "SIZE"', name=IQN_B)
    load_toml(tmp_path, two.replace("SIZE", "32MiB"))
    msg = error_of(tmp_path, two.replace("SIZE", "48MiB"))
    assert msg == ("target: RAM LUNs would total 80 MiB, more than this host's memory (64 MiB): "
                   "filling them would get the STML killed; use a file LUN (on tmpfs for RAM speed)")


def test_chap_needs_user_and_secret(tmp_path):
    text = f"""
        discovery_chap = {{ secret = "twelve-chars" }}
    """
    assert error_of(tmp_path, text).startswith("discovery_chap:")


def test_unknown_top_level_key(tmp_path):
    assert error_of(tmp_path, 'colour = "red"\n').startswith("colour:")


def test_unknown_target_key(tmp_path):
    # a misspelt target setting (here `chapp`) must not be silently ignored:
    # the target would run without the CHAP it was meant to require
    text = f"""
        [[target]]
        name = "{IQN_A}"
        chapp = {{ user = "u", secret = "twelve-chars" }}
        [[target.lun]]
        backend = "ram"
        size = "1MiB"
    """
    assert error_of(tmp_path, text).startswith("target[0].chapp:")


def test_bad_acl_entry(tmp_path):
    text = f"""
        [[target]]
        name = "{IQN_A}"
        acl = ["not-an-iqn"]
        [[target.lun]]
        backend = "ram"
        size = "1MiB"
    """
    assert error_of(tmp_path, text).startswith("target[0].acl:")


def test_bad_endpoint_and_portals(tmp_path):
    assert error_of(tmp_path, 'stml_endpoint = "http://x"\n').startswith("stml_endpoint:")
    assert error_of(tmp_path, 'portals = "127.0.0.1:3260"\n').startswith("portals:")


@pytest.mark.parametrize("value", ["-1", "10001", "true", '"200"', "1.5"])
def test_bad_poll_window(tmp_path, value):
    assert error_of(tmp_path, f"[stml]\npoll_us = {value}\n").startswith("stml.poll_us:")


def test_poll_window_from_the_file_and_unset_by_default(tmp_path):
    assert load(write_toml(tmp_path, "[stml]\npoll_us = 0\n"), str(tmp_path)).stml.poll_us == 0
    assert load(None, str(tmp_path)).stml.poll_us is None   # `run` decides


def test_bad_toml_and_missing_file(tmp_path):
    p = write_toml(tmp_path, "[[target]\nname=")
    with pytest.raises(ConfigError) as e:
        load(p, str(tmp_path))
    assert str(e.value).startswith(p) and "TOML" in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "none.toml"), str(tmp_path))


@pytest.mark.parametrize("spec,needle", [
    ("ram:12XB", "size"), ("floppy:1", "floppy"), ("ram", "KIND:ARG"), ("ram:1MiB,fast", "fast"),
    ("ram:1MiB,bs=big", "block_size"), ("ram:1MiB,bs=1024", "block_size"), ("file:", "KIND:ARG"),
    ("ram:1MiB,colour=red", "colour"),
])
def test_bad_lun_spec(tmp_path, spec, needle):
    with pytest.raises(ConfigError) as e:
        load(None, str(tmp_path), luns=(spec,))
    msg = str(e.value)
    assert msg.startswith("--lun") and needle in msg


def test_parse_lun_spec_options():
    assert parse_lun_spec("file:a.img,size=1GiB,ro,removable,thick,wc,bs=4096") == {
        "backend": "file", "path": "a.img", "size": "1GiB", "ro": True, "removable": True,
        "thin": False, "write_cache": True, "block_size": 4096}


@pytest.mark.parametrize("spec,path,rest", [
    (r"file:/v/a\,b.img,size=1GiB", "/v/a,b.img", {"size": "1GiB"}),   # a comma in the path (0209)
    (r"file:/v/a\\,ro", "/v/a\\", {"ro": True}),                       # a path ending in a backslash
    (r"file:C:\v\a.img", r"C:\v\a.img", {}),                          # any other backslash is itself
    (r"rbd:p/i,keyring=/k\,1", "p/i", {"ceph_keyring": "/k,1"}),        # and in an option's value
])
def test_a_comma_is_written_backslash_comma_in_a_lun_spec(spec, path, rest):
    kind = spec.split(":")[0]
    assert parse_lun_spec(spec) == {"backend": kind, "path": path, **rest}


# ---------------------------------------------------------------- portals

@pytest.mark.parametrize("value,expect", [
    ("127.0.0.1:3260", ("127.0.0.1", 3260, 1)),
    ("10.1.2.3:3261,7", ("10.1.2.3", 3261, 7)),
    ("[::1]:3260", ("::1", 3260, 1)),
    ("[fe80::1%eth0]:3262,2", ("fe80::1%eth0", 3262, 2)),
    ("[::]", ("::", 3260, 1)),
    ("storage.example.com", ("storage.example.com", 3260, 1)),
    ("0.0.0.0", ("0.0.0.0", 3260, 1)),
])
def test_parse_portal(value, expect):
    assert parse_portal(value) == expect


@pytest.mark.parametrize("value", ["", "::1:3260", "[::1", "host:port", "host:99999",
                                   "host:3260,0", "host:3260,70000", "a:1:2", "[::1]:"])
def test_parse_portal_rejects(value):
    with pytest.raises(PortalError):
        parse_portal(value)


# ------------------------------------------------------------------ the file a first start writes

def test_a_first_start_keeps_the_identity_of_luns_that_existed(tmp_path):
    """Upgrading into an existing data dir: a LUN whose backing file (or whose
    APTPL reservations file) is already there keeps the NAA and serial it had
    (the legacy identity); a LUN created now gets a random one."""
    from stml import pr
    from stml.persist import load_or_create
    from stml.lu import legacy_id
    (tmp_path / "disk0.img").write_bytes(b"\x5a" * 4096)       # served by an older version
    c = load_or_create(data_dir=str(tmp_path))
    assert c.targets[0].luns[0].options.id == legacy_id(LEGACY_IQN, 0)
    old = tmp_path / "old"
    old.mkdir()
    (old / "kept.img").write_bytes(bytes(4096))
    pr.state_path(old, IQN_A, 1).parent.mkdir()
    pr.state_path(old, IQN_A, 1).write_text("{}")             # a RAM LUN's APTPL state
    c = load_or_create(data_dir=str(old), iqn=IQN_A,
                       luns=("file:kept.img", "ram:1MiB", "file:new.img,size=1MiB"))
    ids = [lc.options.id for lc in c.targets[0].luns]
    assert ids[:2] == [legacy_id(IQN_A, 0), legacy_id(IQN_A, 1)]
    assert ids[2] != legacy_id(IQN_A, 2) and len(ids[2]) == 32
    assert load(str(old / "scsi-target.toml")).targets[0].luns[0].options.id == legacy_id(IQN_A, 0)


def _hand_written(d: Path, luns: str, marker: str = "") -> Path:
    """A data dir's own file as an administrator (or an older version) wrote it."""
    d.mkdir(exist_ok=True)
    cfg = d / "scsi-target.toml"
    cfg.write_text(textwrap.dedent(f"""\
        # kept: a comment of the administrator's
        {marker}
        [[target]]
        name = "{IQN_A}"
        """) + textwrap.dedent(luns))
    return cfg


def test_an_upgrade_gives_hand_added_luns_the_identity_they_were_served_under(tmp_path):
    """A file without `legacy_ids = false` was written by a version that gave
    hand-added LUNs no id: they were served under the legacy identity of
    their target and number, which the id now written keeps (a disk not
    mounted now too: its file is not created, even with a size, when its
    APTPL file says it was served); a LUN whose file is created now is new
    (0281)."""
    from stml import pr
    from stml.lu import legacy_id
    from stml.persist import give_ids, save
    d = tmp_path / "d"
    d.mkdir()
    (d / "old.img").write_bytes(bytes(4096))
    pr.state_path(d, IQN_A, 3).parent.mkdir()
    pr.state_path(d, IQN_A, 3).write_text("{}")
    cfg = _hand_written(d, f"""
        [[target.lun]]
        lun = 0
        backend = "file"
        path = "old.img"

        [[target.lun]]
        lun = 1
        backend = "file"
        path = "{tmp_path}/unmounted/disk.img"

        [[target.lun]]
        lun = 2
        backend = "file"
        path = "new.img"
        size = "1MiB"

        [[target.lun]]
        lun = 3
        backend = "file"
        path = "served.img"
        size = "1MiB"
        """)
    c = load(str(cfg))
    assert c.legacy_ids and give_ids(c)
    save(c)
    again = load(str(cfg))
    ids = [lc.options.id for lc in again.targets[0].luns]
    assert ids[:2] == [legacy_id(IQN_A, 0), legacy_id(IQN_A, 1)]
    assert ids[3] == legacy_id(IQN_A, 3) and not (d / "served.img").exists()
    assert ids[2] not in (None, legacy_id(IQN_A, 2)) and (d / "new.img").stat().st_size == 1 << 20
    text = cfg.read_text()
    assert "# kept: a comment of the administrator's" in text and "legacy_ids = false" in text
    assert not again.legacy_ids and not give_ids(again)   # nothing more to write


def test_a_disk_hand_added_later_gets_an_identity_of_its_own(tmp_path):
    """Once an id-giving STML wrote the file (`legacy_ids = false`), an entry
    without `id` was added since: at a number whose legacy identity another
    disk had, it gets a new id, not that one. A new entry whose file
    is not there yet (no size) gets none until it opens; one whose file
    cannot be created neither (it is not served, 0280)."""
    from stml.lu import legacy_id
    from stml.persist import give_ids
    d = tmp_path / "d"
    d.mkdir()
    (d / "other.img").write_bytes(bytes(4096))
    cfg = _hand_written(d, f"""
        [[target.lun]]
        lun = 0
        backend = "file"
        path = "other.img"

        [[target.lun]]
        lun = 1
        backend = "file"
        path = "later.img"

        [[target.lun]]
        lun = 2
        backend = "file"
        path = "{tmp_path}/nodir/x.img"
        size = "1MiB"

        [[target.lun]]
        lun = 3
        backend = "ram"
        size = "1MiB"
        """, marker="legacy_ids = false")
    c = load(str(cfg))
    assert not c.legacy_ids and give_ids(c)
    ids = [lc.options.id for lc in c.targets[0].luns]
    assert ids[0] is not None and ids[0] != legacy_id(IQN_A, 0)
    assert ids[1:3] == [None, None]
    assert ids[3] is not None and ids[3] != legacy_id(IQN_A, 3)
    assert not (d / "later.img").exists()


def test_a_hand_added_disk_keeps_its_identity_when_the_file_cannot_keep_its_id(tmp_path):
    """A config file the STML cannot write (read-only, or rewritten from a
    template): each start gives its hand-added disk the id anew, and the same
    disk must come out with the same one, or initiators and multipath see a
    new disk at every restart. Another file at that path is another disk."""
    from stml.persist import give_ids
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.img").write_bytes(bytes(4096))
    cfg = _hand_written(d, """
        [[target.lun]]
        lun = 0
        backend = "file"
        path = "a.img"
        """, marker="legacy_ids = false")

    def given() -> str | None:
        c = load(str(cfg))
        assert give_ids(c)
        return c.targets[0].luns[0].options.id

    first = given()
    assert first is not None and given() == first
    (d / "a.img").rename(d / "old.img")
    (d / "a.img").write_bytes(bytes(4096))
    assert given() not in (None, first)
    # a disk whose file the start creates: derived once it exists, the same at the next start
    cfg = _hand_written(d, '''
        [[target.lun]]
        lun = 0
        backend = "file"
        path = "new.img"
        size = "1MiB"
        ''', marker="legacy_ids = false")
    created = given()
    assert (d / "new.img").exists() and created is not None and given() == created


def test_an_rbd_luns_image_identity_is_a_checked_setting(tmp_path):
    """`image_identity` (recorded by the STML at an image's open, 0281): 32
    hex digits, on rbd LUNs only."""
    lun = '[[target.lun]]\nbackend = "{kind}"\npath = "{path}"\nimage_identity = "{ident}"\n'
    head = f'[[target]]\nname = "{IQN_A}"\n'
    c = load_toml(tmp_path, head + lun.format(kind="rbd", path="rbd/img", ident="AB" * 16))
    assert c.targets[0].luns[0].options.image_identity == "ab" * 16
    assert "not 32 hexadecimal digits" in error_of(tmp_path, head + lun.format(kind="rbd", path="rbd/i", ident="x"))
    assert "only an rbd LUN" in error_of(tmp_path, head + lun.format(kind="file", path="/a", ident="ab" * 16))


def test_an_rbd_lu_shows_its_recorded_image_identity_only_while_offline(caplog):
    """0281: an opened image's identity is recorded (and is what the LU
    shows); offline, the LU shows the recorded one; an image whose identity
    is not the recorded one (made again under the name) is another disk:
    a warning, its own identity, the record replaced."""
    from types import SimpleNamespace

    from stml.lu import LogicalUnit, LunOptions, Offline, naa_designator, record_image
    from support.sbc_harness import Harness
    template = Harness().emulator.templates["disk"]
    o = LunOptions("rbd", path="rbd/img")
    first, second = bytes(range(16)), bytes(range(16, 32))
    image = SimpleNamespace(identity=first)
    assert record_image(o, image, "LUN 0") and o.image_identity == first.hex()
    assert not record_image(o, image, "LUN 0")     # nothing new to save
    assert LogicalUnit(IQN_A, 0, Offline("gone"), o, template).naa == naa_designator(first)
    assert record_image(o, SimpleNamespace(identity=second), "LUN 0") and o.image_identity == second.hex()
    assert "is not the one recorded" in caplog.text
    assert not record_image(LunOptions("file", path="/x"), image, "LUN 1")
    o.size = 128 << 20   # a first start's that made the image, or an entry saved before 0208
    assert record_image(o, SimpleNamespace(identity=second), "LUN 0") and o.size is None   # the image's is served
    assert not record_image(o, SimpleNamespace(identity=second), "LUN 0")


def test_the_data_dirs_own_file_names_that_data_dir(tmp_path):
    """D/scsi-target.toml leaves data_dir out (so D can move): loaded with
    --config alone, it is D's config (endpoint, relative LUN paths), not the
    default data dir's. A file saved elsewhere names its data dir."""
    from stml.persist import load_or_create
    from stml.persist import save
    d = tmp_path / "d"
    first = load_or_create(data_dir=str(d), luns=("file:a.img,size=1MiB",))
    assert "data_dir" not in (d / "scsi-target.toml").read_text()
    c = load(str(d / "scsi-target.toml"))
    assert c.data_dir == d
    assert c.stml_endpoint == f"ipc://{d / 'stml.sock'}"
    assert c.targets[0].luns[0].options.path == str(d / "a.img")
    for other in (d / "other.toml", tmp_path / "elsewhere" / "scsi-target.toml"):
        other.parent.mkdir(exist_ok=True)
        save(first, other)
        assert load(str(other)).data_dir == d


def test_a_save_merges_what_a_reload_left_unapplied():
    """merge3(base, file, running): the file's value where running did not
    change since the reload (an absent key or table included), else running's."""
    from stml.persist import merge3
    base = {"portals": ["a"], "target": {"t": {"acl": [], "lun": {0: {"bs": 512}}}, "gone": {"x": 1}}}
    file = {"portals": ["a"], "target": {"t": {"acl": [], "lun": {0: {"bs": 4096}, 1: {"bs": 512}}}}}
    assert merge3(base, file, base) == file                      # nothing changed since: the file
    running = {"portals": ["a", "b"], "target": {"t": {"acl": ["i"], "lun": {0: {"bs": 512}}},
                                                 "gone": {"x": 1}, "new": {"x": 2}}}
    assert merge3(base, file, running) == {
        "portals": ["a", "b"],
        "target": {"t": {"acl": ["i"], "lun": {0: {"bs": 4096}, 1: {"bs": 512}}}, "new": {"x": 2}}}
    del running["target"]["t"]                                   # removed since: removed
    assert "t" not in merge3(base, file, running)["target"]


def test_slp_auth_is_off_unless_set_and_reaches_the_front_ends(tmp_path):
    """What SLP tells about access (targets with an ACL, auth-name, the CHAP
    user) is published only with `slp_auth = true` (review 2, finding 3)."""
    off = load(write_toml(tmp_path, "slp = true\n"), str(tmp_path)).discovery()
    assert off["slp"] == ["DEFAULT"] and off["slp_auth"] is False
    on = load(write_toml(tmp_path, "slp = true\nslp_auth = true\n"), str(tmp_path)).discovery()
    assert on["slp_auth"] is True
    assert error_of(tmp_path, 'slp_auth = "yes"\n').startswith("slp_auth:")


def test_stage_timing_switch_in_the_file(tmp_path):
    """[stml] timing = true is `--timing`; off unless set; a non-bool is refused."""
    assert load(write_toml(tmp_path, "[stml]\ntiming = true\n"), str(tmp_path)).stml.timing is True
    assert load(None, str(tmp_path)).stml.timing is False
    assert error_of(tmp_path, '[stml]\ntiming = "yes"\n').startswith("stml.timing:")


@pytest.mark.parametrize("key", ["allowed_front_ends", "allowed_managers"])
def test_allowed_key_lists(tmp_path, key):
    """Both lists take Z85 keys as they are and key files relative to the config file."""
    z85 = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsLx@{H8]yf7"
    c = load(write_toml(tmp_path, f'[stml]\n{key} = ["{z85}", "keys/a.key"]\n'), str(tmp_path))
    assert getattr(c.stml, key) == [CurveKey(z85, False), CurveKey(str(tmp_path / "keys" / "a.key"), True)]
    # "/" is a Z85 character: a key holding one is a key, unless a file has that name
    slashed = "rq:rM>}U?@Lns47E1%kR.o@n%Fcmms/x@{H8]yf7"
    c = load(write_toml(tmp_path, f'[stml]\n{key} = ["{slashed}"]\n'), str(tmp_path))
    assert getattr(c.stml, key) == [CurveKey(slashed, False)]
    (tmp_path / "rq:rM>}U?@Lns47E1%kR.o@n%Fcmms").mkdir()
    (tmp_path / "rq:rM>}U?@Lns47E1%kR.o@n%Fcmms" / "x@{H8]yf7").write_text("")
    c = load(write_toml(tmp_path, f'[stml]\n{key} = ["{slashed}"]\n'), str(tmp_path))
    assert getattr(c.stml, key) == [CurveKey(str(tmp_path / slashed), True)]
    assert error_of(tmp_path, f'[stml]\n{key} = "keys/a.key"\n') == \
        f"stml.{key}: must be a list of public keys (Z85) or key files"


def test_the_banner_gives_the_size_a_lun_is_served_at(tmp_path):
    """`run`'s banner: an existing file's own size (its `size` only makes a
    new one) in whole blocks, as the STML serves it; it showed the file's
    bytes, or the config's `size`."""
    from scsi_target.cli import lun_size
    from stml.lu import LunOptions
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1300))
    assert lun_size(LunOptions(kind="file", path=str(odd))) == 1024
    assert lun_size(LunOptions(kind="file", path=str(odd), size=4 << 20)) == 1024
    assert lun_size(LunOptions(kind="file", path=str(tmp_path / "new.img"), size=4 << 20)) == 4 << 20
    assert lun_size(LunOptions(kind="file", path=str(odd), block_size=4096)) == 0
    assert lun_size(LunOptions(kind="ram", size=64 << 20)) == 64 << 20


def test_a_targets_last_lun_removed_takes_its_note_and_leaves_the_next_targets(tmp_path):
    """A one-LUN target (the default layout) loses its LUN: the LUN's note goes
    with it and the next target's note stays above that target; a portals key
    the file did not have lands above the first table's note, not under it."""
    from stml import persist
    for n in "ac":
        (tmp_path / f"{n}.img").write_bytes(bytes(1 << 20))
    cfg = tmp_path / "scsi-target.toml"
    cfg.write_text(textwrap.dedent('''\
        legacy_ids = false

        # TARGET ONE
        [[target]]
        name = "iqn.2026-01.org.x:one"

        # LUN 0: a, the only one
        [[target.lun]]
        lun = 0
        backend = "file"
        path = "a.img"
        id = "00000000000000000000000000000001"

        # TARGET TWO
        [[target]]
        name = "iqn.2026-01.org.x:two"

        # LUN 0: c
        [[target.lun]]
        lun = 0
        backend = "file"
        path = "c.img"
        id = "00000000000000000000000000000002"
        '''))
    c = load(str(cfg), str(tmp_path))
    c.targets[0].luns = []
    persist.save(c)
    text = cfg.read_text()
    assert "LUN 0: a" not in text
    assert text.index("legacy_ids") < text.index("portals = [") < text.index("# TARGET ONE")
    assert '# TARGET TWO\n[[target]]\nname = "iqn.2026-01.org.x:two"' in text
    assert load(str(cfg), str(tmp_path)).targets[0].luns == []


def test_an_iscsi_name_in_capitals_is_folded_not_refused():
    """RFC 3722 folds iSCSI names to lower case, type prefix and all: `IQN.`,
    `EUI.` and `NAA.` written in capitals name the same node as in lower case."""
    from stml.config import check_iqn
    assert check_iqn("IQN.2026-01.ORG.Example:Disk", "--iqn") == "iqn.2026-01.org.example:disk"
    assert check_iqn("EUI.02004567A425678D", "--iqn") == "eui.02004567a425678d"
    assert check_iqn("NAA.52004567BA64678D", "--iqn") == "naa.52004567ba64678d"
    with pytest.raises(ConfigError):
        check_iqn("IQN.26-01.org.example", "--iqn")
