"""Files holding secrets are created 0600 and written atomically: CURVE secret key files
(`scsi-target keys generate`) and config files the management interface rewrites."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from scsi_target.keys import write_key_pair
from scsi_runtime.files import atomic_write
from support.procs import short_dir
from support.target import Target

IQN = "iqn.2026-11.org.scsi-target:secrets"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask():
    def set_(m: int) -> None:
        os.umask(m)
    old = os.umask(0)
    os.umask(old)
    yield set_
    os.umask(old)


def _watch_writes(monkeypatch) -> list[int]:
    """Modes of the files being written, seen by fd at each write and fsync (i.e. while
    the data is going in, before the rename)."""
    seen: list[int] = []
    real_write, real_fsync = os.write, os.fsync

    def write(fd, data):
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_fsync(fd)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.parametrize("mask", [0, 0o022, 0o277])
def test_key_secret_file_is_0600_from_creation(tmp_path, umask, monkeypatch, mask):
    umask(mask)
    seen = _watch_writes(monkeypatch)
    pub, sec, public = write_key_pair(tmp_path / "keys", "node")
    assert mode(sec) == 0o600
    assert "secret-key" in sec.read_text() and "secret-key" not in pub.read_text()
    assert seen and all(m & 0o077 == 0 for m in seen), [oct(m) for m in seen]
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["node.key", "node.key_secret"]
    with pytest.raises(FileExistsError):
        write_key_pair(tmp_path / "keys", "node")
    assert sec.read_text().count(public) == 1       # the existing key was not touched


def test_key_secret_file_refuses_to_replace_one_made_meanwhile(tmp_path, monkeypatch):
    d = tmp_path / "keys"
    real_link = os.link

    def link(src, dst):
        Path(dst).write_text("someone else's key\n")   # appears between the check and the link
        return real_link(src, dst)
    monkeypatch.setattr(os, "link", link)
    with pytest.raises(FileExistsError):
        write_key_pair(d, "node")
    assert (d / "node.key_secret").read_text() == "someone else's key\n"
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_modes(tmp_path, umask, monkeypatch):
    umask(0)
    seen = _watch_writes(monkeypatch)
    new = tmp_path / "new.toml"
    atomic_write(new, b"a = 1\n", secret=False)
    assert mode(new) == 0o600                              # a new file: 0600
    assert seen and all(m == 0o600 for m in seen)
    plain = tmp_path / "plain.toml"
    plain.write_text("a = 0\n")
    plain.chmod(0o644)
    atomic_write(plain, b"a = 1\n", secret=False)
    assert mode(plain) == 0o644 and plain.read_text() == "a = 1\n"   # no secrets: mode kept
    seen.clear()
    atomic_write(plain, b"s = 1\n", secret=True)
    assert mode(plain) == 0o600                            # secrets: group/others lose access
    assert seen and all(m & 0o077 == 0 for m in seen)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_does_not_follow_a_planted_temporary(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text("a = 0\n")
    cfg.chmod(0o600)
    planted = tmp_path / f".c.toml.{os.getpid()}.tmp"
    planted.symlink_to(victim)
    atomic_write(cfg, b"s = 1\n", secret=True)
    assert victim.read_text() == "untouched\n"
    assert cfg.read_text() == "s = 1\n" and not cfg.is_symlink() and mode(cfg) == 0o600


def test_management_writes_a_config_with_secrets_0600(tmp_path):
    cfg = tmp_path / "target.toml"
    cfg.write_text(f'[[target]]\nname = "{IQN}"\n\n[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    cfg.chmod(0o644)
    t = Target(config=str(cfg))
    try:
        def mgmt(*args: str) -> None:
            p = subprocess.run([sys.executable, "-m", "scsi_target", *args, "--data-dir", t.data_dir,
                                "--json"], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
            json.loads(p.stdout)
        mgmt("acl", "add", "--target", IQN, "iqn.2026-11.org.test:a")
        assert mode(cfg) == 0o644                        # no secrets yet: the mode is the user's
        mgmt("chap", "set", "--target", IQN, "--user", "u", "--secret", "twelve-bytes-secret")
        assert mode(cfg) == 0o600
        assert tomllib.loads(cfg.read_text())["target"][0]["chap"]["user"] == "u"
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        t.stop()


def test_atomic_write_keeps_a_symlinked_file_a_symlink(tmp_path):
    """An administrator's config kept elsewhere and linked into place: a save
    writes the file the link names; the link stays a link."""
    real = tmp_path / "kept" / "scsi-target.toml"
    real.parent.mkdir()
    real.write_text("a = 0\n")
    link = tmp_path / "scsi-target.toml"
    link.symlink_to(real)
    atomic_write(link, b"a = 1\n", secret=False)
    assert link.is_symlink() and real.read_text() == "a = 1\n"
    assert not [p for d in (tmp_path, real.parent) for p in d.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_removes_temporaries_of_killed_saves(tmp_path):
    """A save SIGKILLed before its rename leaves `.NAME.PID.tmp` (0600) for
    good; the next save removes those whose process is gone, not others."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("a = 0\n")
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1    # no process can have it
    stale = tmp_path / f".c.toml.{dead}.tmp"
    stale.write_text("half a config")
    live = tmp_path / f".c.toml.{os.getppid()}.tmp"    # a save of a process still running
    live.write_text("being written")
    other = tmp_path / f".other.toml.{dead}.tmp"
    other.write_text("not ours")
    atomic_write(cfg, b"a = 1\n", secret=False)
    assert not stale.exists() and live.exists() and other.exists()
    assert cfg.read_text() == "a = 1\n"


def test_atomic_write_lists_the_directory_once_per_file(tmp_path, monkeypatch):
    """Each reservation change under APTPL is a save: only a file's first
    write in this process looks for killed saves' temporaries (a listing of
    its directory, which grows with the LUs that keep reservations)."""
    from scsi_runtime import files
    listed: list[str] = []
    real = os.listdir
    monkeypatch.setattr(files.os, "listdir", lambda d: listed.append(str(d)) or real(d))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for _ in range(5):
        atomic_write(a, b"{}", secret=True)
        atomic_write(b, b"{}", secret=True)
    assert sorted(listed) == [str(tmp_path)] * 2


SECRETS = ("alice-secret-12", "target-secret-12", "discovery-secret")


def test_config_show_and_diff_never_print_secrets(tmp_short):
    """`config show` (running, --file, --json) and `config diff` print the
    configuration with every CHAP secret hidden; a diff that is only a
    secret says so without showing either value."""
    ddir = str(tmp_short())
    cfg = Path(ddir) / "scsi-target.toml"
    cfg.write_text(f'discovery_chap = {{user = "d", secret = "{SECRETS[2]}"}}\n\n'
                   f'[[target]]\nname = "{IQN}"\n'
                   f'chap = {{user = "alice", secret = "{SECRETS[0]}"}}\n\n'
                   f'[target.mutual_chap]\nuser = "tgt"\nsecret = "{SECRETS[1]}"\n\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    cfg.chmod(0o600)

    def cli(*args: str, code: int = 0) -> str:
        p = subprocess.run([sys.executable, "-m", "scsi_target", *args, "--data-dir", t.data_dir],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == code and "no target is running" not in p.stderr, p.stderr
        return p.stdout + p.stderr

    with Target(data_dir=ddir) as t:
        shown = {args: cli(*args) for args in [("config", "show"), ("config", "show", "--json"),
                                                ("config", "show", "--file"), ("config", "show", "--file", "--json"),
                                                ("status",), ("ls",), ("ls", "--json")]}
        for args, out in shown.items():
            assert not [s for s in SECRETS if s in out], (args, out)
        running = tomllib.loads(shown[("config", "show")])
        assert running["target"][0]["chap"] == {"user": "alice", "secret": "(hidden)"}
        assert running["target"][0]["mutual_chap"] == {"user": "tgt", "secret": "(hidden)"}
        assert json.loads(shown[("config", "show", "--file", "--json")])["discovery_chap"]["secret"] == "(hidden)"
        cli("config", "save")
        cfg.write_text(cfg.read_text().replace(SECRETS[0], "a-new-secret-12"))   # a hand edit, not reloaded
        diff = cli("config", "diff", code=1)
        assert "a CHAP secret differs" in diff and "a-new-secret-12" not in diff and SECRETS[0] not in diff
    assert SECRETS[1] in cfg.read_text()     # the file keeps them


def test_stml_sockets_are_owner_only_whatever_the_umask(tmp_path, umask, tmp_short):
    """Whoever can connect to the STML's ipc:// socket (or the stream socket
    beside it) manages the target: under umask 0 they and a directory made for
    them are still the user's alone."""
    umask(0)
    sockdir = tmp_short() / "sub"
    endpoint = f"ipc://{sockdir}/s.sock"
    with Target("--lun", "ram:4MiB", "--stml-endpoint", endpoint):
        socks = [sockdir / "s.sock", sockdir / "s.sock.stream"]
        assert all(stat.S_ISSOCK(p.lstat().st_mode) for p in socks)
        assert {p.name: oct(mode(p)) for p in socks} == {p.name: "0o600" for p in socks}
        assert mode(sockdir) == 0o700


def test_chap_secret_from_a_file_or_stdin_not_the_command_line(tmp_path):
    """`chap set --secret-file` (a file, or - for standard input) keeps the
    secret out of the command line every local user can read; the secret
    is the first line without its newline."""
    ddir = short_dir()
    secret_file = tmp_path / "s"
    secret_file.write_text("from-a-file-123\nignored\n")

    def chap(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scsi_target", "chap", "set", *args, "--data-dir", ddir],
                              input=stdin, capture_output=True, text=True, timeout=60)

    def saved(key: str) -> dict:
        return tomllib.loads((Path(ddir) / "scsi-target.toml").read_text())["target"][0][key]
    try:
        with Target("--lun", "ram:4MiB", data_dir=ddir):
            p = chap("--user", "alice", "--secret-file", "-", stdin="from-stdin-1234\n")
            assert p.returncode == 0, p.stderr
            assert saved("chap") == {"user": "alice", "secret": "from-stdin-1234"}
            p = chap("--mutual", "--user", "tgt", "--secret-file", str(secret_file))
            assert p.returncode == 0, p.stderr
            assert saved("mutual_chap") == {"user": "tgt", "secret": "from-a-file-123"}
            p = chap("--user", "alice", "--secret", "x" * 12, "--secret-file", str(secret_file))
            assert p.returncode == 2 and "not both" in p.stderr
            p = chap("--user", "alice", "--secret-file", str(tmp_path / "missing"))
            assert p.returncode == 2 and p.stderr == f"scsi-target: --secret-file {tmp_path / 'missing'}: " \
                "No such file or directory\n"
            p = chap("--user", "alice", "--secret-file", "-", stdin="short\n")
            assert p.returncode == 2 and "12 to 255 bytes" in p.stderr, p.stderr
    finally:
        shutil.rmtree(ddir, ignore_errors=True)


def test_a_curve_secret_key_others_can_read_draws_a_warning(tmp_path, caplog):
    """As a config holding CHAP secrets does: a key_secret file group or others
    can read is loaded, with one warning naming it and its mode."""
    from scsi_runtime.curvekeys import load_key_file
    _, sec, public = write_key_pair(tmp_path, "node")
    caplog.set_level("WARNING", logger="scsi_runtime.curvekeys")
    assert load_key_file(str(sec), secret=True)[0] == public.encode()
    assert caplog.records == []
    sec.chmod(0o644)
    assert load_key_file(str(tmp_path / "node.key"), secret=True)[0] == public.encode()   # via its public file
    assert [r.getMessage() for r in caplog.records] == [
        f"{sec} holds a CURVE secret key and is readable by group and others (mode 644); chmod 600 it"]
    caplog.clear()
    load_key_file(str(tmp_path / "node.key"))          # the public key alone: nothing to say
    assert caplog.records == []


def test_chap_secrets_go_only_to_front_ends_that_speak_chap():
    """detect carries a target's CHAP and mutual CHAP secrets and discovery's
    to an iSCSI front end, which checks logins with them; a vhost, loopback
    or SPI front end authenticates no one and gets none of them."""
    from concurrent.futures import ThreadPoolExecutor

    from backends import open_backend
    from stml import emulator as E
    from stml.api import Op
    from stml.lu import LogicalUnit, LunOptions

    chap = {"user": "u", "secret": "target-secret-1"}
    mutual = {"user": "m", "secret": "mutual-secret-2"}
    lu = LogicalUnit("iqn.2026-11.org.x:t", 0, open_backend("ram", 1 << 20, None, False),
                     LunOptions(kind="ram", size=1 << 20), None)
    target = E.Target("iqn.2026-11.org.x:t", {0: lu},
                      access={"acl": [], "chap": chap, "mutual": mutual, "erl": 0, "cmdsn_depth": 128})
    sent: dict[bytes, dict] = {}
    emu = E.Emulator([target], lambda ident, h, f: sent.__setitem__(ident, h), ThreadPoolExecutor(1),
                     discovery={"chap": {"user": "d", "secret": "discovery-secret-3"}, "slp": None})
    lu.template = emu.templates["disk"]
    for kind in ("iscsi", "vhost", "loopback", "spi"):
        emu.handle(kind.encode(), {"op": Op.REGISTER, "version": [1, 0], "kind": kind, "name": kind,
                                   "heartbeat_ms": 1000, "aen": False}, [])
    iscsi = sent.pop(b"iscsi")
    assert iscsi["targets"][0]["access"]["chap"] == chap and iscsi["targets"][0]["access"]["mutual"] == mutual
    assert iscsi["discovery"]["chap"]["secret"] == "discovery-secret-3"
    for ident, detect in sent.items():
        assert "secret" not in repr(detect), ident
        assert detect["targets"][0]["access"]["acl"] == [] and detect["targets"][0]["luns"]
