"""Backing stores the host uses or protects (a storage administrator's third
trial), through real processes: a block device the host uses (mounted, or
claimed by another target) is refused, as LIO's iblock refuses it, instead of
being handed to initiators whose writes would corrupt it; a path systemd made
read-only says which unit line opens it."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from fetd_loopback import LoopbackClient
from support.ci import need_root
from support.cli import cli, mgmt
from support.procs import children_by_module, run
from support.target import Target


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    """A 16 MiB loop device on a file of tmp_path, detached at teardown."""
    need_root("a loop device")
    img = tmp_path / "dev.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    dev = run(["losetup", "-f", "--show", str(img)]).stdout.strip()
    yield dev
    run(["losetup", "-d", dev], check=False)


@pytest.fixture
def mounted(loopdev: str, tmp_path: Path) -> Iterator[str]:
    """`loopdev` with an ext4 file system mounted on it."""
    run(["mkfs.ext4", "-q", loopdev])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", loopdev, str(mnt)])
    yield loopdev
    run(["umount", str(mnt)], check=False)


def test_a_mounted_block_device_is_refused_live_and_at_a_first_start(mounted, tmp_short):
    ddir = str(tmp_short())
    with Target("--lun", "ram:4MiB", data_dir=ddir):
        p = cli("lun", "add", "--data-dir", ddir, f"file:{mounted}", check=False)
        assert p.returncode == 2, p
        assert p.stderr.strip() == (f"scsi-target: lun add refused: cannot open the backend: {mounted}: in use "
                                    "(mounted, or held by LVM, md or another program): Device or resource busy")
        assert [lun["lun"] for lun in mgmt(ddir, "lun", "list")] == [0]
    first = subprocess.run([sys.executable, "-m", "scsi_target", "run", "--data-dir", str(tmp_short()), "--portal", "127.0.0.1:0",
                            "--lun", f"file:{mounted}"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 2, first
    assert "in use (mounted, or held by LVM, md or another program)" in first.stderr


def test_a_block_device_serves_one_target_at_a_time(loopdev, tmp_short):
    """Two data dirs (two targets) on one device: the second is refused while
    the first serves it, and may have it once the first stopped."""
    one, two = str(tmp_short()), str(tmp_short())
    with Target("--lun", f"file:{loopdev}", data_dir=one) as t:
        assert f"    LUN 0: 16 MiB file {loopdev}\n" in t.wait_log("Ready. ")
        with Target("--lun", "ram:4MiB", data_dir=two):
            p = cli("lun", "add", "--data-dir", two, f"file:{loopdev}", check=False)
            assert p.returncode == 2 and "in use" in p.stderr, p
        assert mgmt(one, "lun", "list")[0]["size"] == 16 << 20
    with Target(data_dir=two):
        assert mgmt(two, "lun", "add", f"file:{loopdev}")["size"] == 16 << 20


def test_a_block_device_lun_removed_and_added_again_opens(loopdev, tmp_short):
    """The STML's own claim ends with the LUN: removing it and adding the
    device again (the same LUN, or another number) works."""
    ddir = str(tmp_short())
    with Target("--lun", "ram:4MiB", data_dir=ddir):
        mgmt(ddir, "lun", "add", "--lun", "1", f"file:{loopdev}")
        mgmt(ddir, "lun", "remove", "1")
        assert mgmt(ddir, "lun", "add", "--lun", "2", f"file:{loopdev}")["lun"] == 2


def test_a_read_only_path_under_systemd_names_read_write_paths(tmp_path, tmp_short):
    """Under the shipped unit (ProtectSystem=strict) every path outside the
    data dir is read-only: `lun add` says which unit line lets it write,
    not only "Read-only file system" on a file system that is not."""
    need_root("a read-only bind mount")
    images = tmp_path / "images"
    images.mkdir()
    run(["mount", "--bind", "-o", "ro", str(images), str(images)])
    try:
        ddir = str(tmp_short())
        with Target("--lun", "ram:4MiB", data_dir=ddir, env={"INVOCATION_ID": "0" * 32}):
            p = cli("lun", "add", "--data-dir", ddir, f"file:{images}/vm1.img,size=1MiB", check=False)
            assert p.returncode == 2, p
            assert p.stderr.strip() == (f"scsi-target: lun add refused: cannot open the backend: {images}/vm1.img: "
                                        "Read-only file system (if its file system is writable, the unit's "
                                        "ProtectSystem=strict hides it: give its directory a ReadWritePaths= line)")
    finally:
        run(["umount", str(images)], check=False)


def test_a_block_device_lun_follows_its_device_when_it_grows(loopdev, tmp_path, tmp_short):
    """`lvextend` and then `lun resize` to the device's new size: initiators
    see the new capacity with the data kept, live (it used to take a
    restart, or a remove and add under a new identity); another size is
    refused, naming the device's."""
    ddir = str(tmp_short())
    with Target("--lun", f"file:{loopdev}", data_dir=ddir) as t:
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            c.write(0, 7, b"\x5a" * 512)
        with open(tmp_path / "dev.img", "r+b") as f:
            f.truncate(32 << 20)
        run(["losetup", "-c", loopdev])
        assert "Total size:16777216" in run(["iscsi-readcapacity16", t.url(0)]).stdout
        p = cli("lun", "resize", "--data-dir", ddir, "0", "48MiB", check=False)
        assert p.returncode == 2
        assert p.stderr.strip() == (f"scsi-target: lun resize refused: resize failed: {loopdev} is a block device of "
                                    f"{32 << 20} bytes: its LUN is as big as the device (grow the device, e.g. "
                                    f"lvextend, then resize the LUN to its size)")
        assert mgmt(ddir, "lun", "resize", "0", "32MiB")["size"] == 32 << 20
        assert "Total size:33554432" in run(["iscsi-readcapacity16", t.url(0)]).stdout
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            assert c.read(0, 7, 1) == b"\x5a" * 512
    with Target("--lun", f"file:{loopdev}", data_dir=ddir):
        assert mgmt(ddir, "lun", "list")[0]["size"] == 32 << 20


def test_a_reload_moves_a_block_device_lun_with_unflushed_writes(loopdev, tmp_short):
    """One reload removes the device's LUN and adds it at another number: the
    new LUN waits for the old one's close (its flush of the writes before),
    instead of finding the device held by the STML itself (O_EXCL)."""
    ddir = str(tmp_short())
    with Target("--lun", "ram:4MiB", data_dir=ddir):
        mgmt(ddir, "lun", "add", "--lun", "1", f"file:{loopdev},wc")
        chunk = bytes(range(256)) * 4096
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=30) as c:
            for i in range(16):
                c.write(1, i * 2048, chunk)
        cfg = Path(ddir) / "scsi-target.toml"
        cfg.write_text(cfg.read_text().replace("lun = 1", "lun = 2"))
        r = mgmt(ddir, "config", "reload")
        assert r["not_applied"] == [], r
        luns = mgmt(ddir, "lun", "list")
        assert [x["lun"] for x in luns] == [0, 2] and luns[1]["offline"] is None, luns
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=30) as c:
            assert c.read(2, 15 * 2048, 2048) == chunk


def refused_start(data_dir: str, lun: str) -> str:
    """What a first start with `--lun LUN` that must be refused (exit 2) says."""
    p = subprocess.run([sys.executable, "-m", "scsi_target", "run", "--data-dir", data_dir,
                        "--portal", "127.0.0.1:0", "--lun", lun], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p
    return p.stderr


def test_a_file_serves_one_target_at_a_time(tmp_short):
    """Two data dirs (two STMLs) on one regular file: the second is refused,
    at `lun add` and at a first start, naming the file and the STML that
    holds it; once the first stopped it may have the file. The first, started
    again from its saved config meanwhile, serves that LUN offline with the
    reason, and a reload once the other let go serves it again (0216, 0280)."""
    one, two = str(tmp_short()), str(tmp_short())
    img = f"{tmp_short()}/disk.img"
    with Target("--lun", f"file:{img},size=4MiB", data_dir=one) as t:
        holder = children_by_module(t.proc.pid)["stml"]
        with Target("--lun", "ram:4MiB", data_dir=two):
            p = cli("lun", "add", "--data-dir", two, f"file:{img}", check=False)
            assert p.returncode == 2, p
            line = p.stderr.strip()
            assert line.startswith(f"scsi-target: lun add refused: cannot open the backend: {img}: in use by "
                                   f"pid {holder} ("), line
            assert line.endswith("which holds a lock on it (a file is served by one target at a time)"), line
            assert "\n" not in line and one in line
            assert [lun["lun"] for lun in mgmt(two, "lun", "list")] == [0]
        assert f"{img}: in use by pid {holder} (" in refused_start(str(tmp_short()), f"file:{img}")
    with Target(data_dir=two) as t2:
        assert mgmt(two, "lun", "add", f"file:{img}")["size"] == 4 << 20
        holder = children_by_module(t2.proc.pid)["stml"]
        with Target(data_dir=one):
            assert f"{img}: in use by pid {holder} (" in mgmt(one, "lun", "list")[0]["offline"]
            mgmt(two, "lun", "remove", "1")
            deadline = time.monotonic() + 20   # the LU closes once its tasks are done
            while mgmt(one, "lun", "list")[0]["offline"]:
                assert time.monotonic() < deadline
                assert mgmt(one, "config", "reload")["path"]
                time.sleep(0.2)


def test_a_size_given_for_a_block_device_is_refused(loopdev, tmp_short):
    """A block device is served whole (0284): a size given with it, which the
    start used to ignore, is refused in one line, by `lun add` and by a first
    start's --lun (0217)."""
    ddir = str(tmp_short())
    want = (f"LUN 1.size: {loopdev} is a block device, served whole: leave out size (to change it, grow "
            f"the device, then `lun resize`)")
    with Target("--lun", "ram:4MiB", data_dir=ddir):
        p = cli("lun", "add", "--data-dir", ddir, f"file:{loopdev},size=8MiB", check=False)
        assert p.returncode == 2 and p.stderr.strip().endswith(want), p
        assert [lun["lun"] for lun in mgmt(ddir, "lun", "list")] == [0]
    said = refused_start(str(tmp_short()), f"file:{loopdev},size=16MiB")
    assert f"{loopdev} is a block device, served whole: leave out size" in said
    assert len(said.strip().splitlines()) == 1, said
