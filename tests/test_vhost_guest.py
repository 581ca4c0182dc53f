"""A real QEMU guest (Debian's cloud kernel, virtio_scsi) on fetd_vhost.

One boot does it all: the guest partitions the disk, makes an ext4 file
system, writes files, syncs, unmounts, checks it with e2fsck, and reads the
files back (caches dropped) against their checksums; the host then reads
the same LUN through the iSCSI front end and finds the same files with the
same checksums. While the guest runs, `scsi-target lun add` makes a second
LUN appear in it (the rescan event) and `lun resize` reaches it as a new
capacity (the parameter-change event). Runs under TCG when KVM does not work.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import guest as G
from support.procs import children_by_module, short_dir
from support.target import Target

pytestmark = pytest.mark.guest

IQN = "iqn.2026-11.org.scsi-target:vhost"
MEMORY_MB = 256

SCRIPT = G.FS_CYCLE + r"""
waitfor /sys/block/sda 600 || fail no sda
echo "@@ DISK $(cat /sys/block/sda/size) $(cat /sys/block/sda/device/vendor)"
fs_cycle sda A
echo "@@ WAIT-HOTPLUG"
waitfor /sys/block/sdb 1800 || fail no sdb after lun add
echo "@@ HOTPLUG $(cat /sys/block/sdb/size)"
old=$(cat /sys/block/sdb/size)
echo "@@ WAIT-RESIZE"
i=0; while [ "$(cat /sys/block/sdb/size)" = "$old" ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done
echo "@@ RESIZED $(cat /sys/block/sdb/size)"
mount -t ext4 /dev/sda1 /mnt || fail mount for the restart
echo "@@ WAIT-RESTART"
i=0; while [ $i -lt 48 ]; do
    dd if=/dev/urandom of=/mnt/during bs=1M count=1 seek=$i conv=notrunc 2>/dev/null || fail dd during
    sync; i=$((i+1)); done
(cd /mnt && sha256sum during) > /tmp/sums.R
umount /mnt || fail umount after the restart
echo 3 > /proc/sys/vm/drop_caches
mount -o ro -t ext4 /dev/sda1 /mnt || fail remount after the restart
(cd /mnt && sha256sum -c /tmp/sums.R >/dev/null 2>&1); echo "@@ R-VERIFY $?"
echo "@@ R-POWERON $(dmesg | grep -c 'Power-on or device reset occurred')"
umount /mnt
while read sum name; do echo "@@ R-SUM $name $sum"; done < /tmp/sums.R
"""


def mgmt(data_dir: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "scsi_target", *args, "--data-dir", data_dir, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def wait_until(cond, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


class GuestRun:
    """The guest's one script, whatever tests run (alone, with -k, in any
    order): a test asks for the host's part of an earlier phase, and it is
    done once, in the script's order, the first time anyone asks."""

    def __init__(self, target: Target, vm: G.Guest) -> None:
        self.target, self.vm = target, vm
        self._hotplug: tuple[int, int, int] | None = None

    def hotplug(self) -> tuple[int, int, int]:
        """`lun add` and `lun resize` while the guest waits for them: (the new
        LUN's number, its size and its new size in the guest, in blocks)."""
        if self._hotplug is None:
            vm, ddir = self.vm, self.target.data_dir
            vm.wait("WAIT-HOTPLUG")
            lun = mgmt(ddir, "lun", "add", "--target", IQN, "ram:8MiB")["lun"]
            size = int(vm.wait("HOTPLUG", timeout=240))
            vm.wait("WAIT-RESIZE")
            mgmt(ddir, "lun", "resize", "--target", IQN, "1", "24MiB")
            self._hotplug = (lun, size, int(vm.wait("RESIZED", timeout=240)))
        return self._hotplug


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    try:
        k = G.kernel()
        rd = G.initramfs(k, SCRIPT)
        accel = G.accelerator(k)
    except G.GuestUnavailable as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("vhost")
    sock = os.path.join(short_dir(), "vm.sock")
    cfg = tmp / "target.toml"
    # `scsi-target run` starts fetd_vhost beside fetd_tcp for the [[vhost]] table
    # a file LUN: its data outlives an STML restart
    cfg.write_text(f'[[target]]\nname = "{IQN}"\n\n[[target.lun]]\nbackend = "file"\npath = "lun0.img"\n'
                   f'size = "64MiB"\n\n[[vhost]]\nsocket = "{sock}"\n')
    target = Target(config=str(cfg))
    vm = None
    try:
        wait_until(lambda: "fetd_vhost: attached to STML" in target.log(), "fetd_vhost attached")
        vm = G.Guest(k, rd, accel=accel, memory_mb=MEMORY_MB, log_path=tmp / "console.log",
                     args=G.vhost_scsi_args(sock, MEMORY_MB)).start()
        yield GuestRun(target, vm)
    finally:
        if vm is not None:
            vm.stop()
        target.stop()
        shutil.rmtree(os.path.dirname(sock), ignore_errors=True)
        shutil.rmtree(target.data_dir, ignore_errors=True)


def test_guest_file_system_cycle(booted):
    target, vm = booted.target, booted.vm
    blocks, vendor = vm.wait("DISK").split()
    assert int(blocks) == (64 << 20) // 512 and vendor == "SCSITGT"
    assert vm.wait("A-FSCK") == "0"
    assert vm.wait("A-VERIFY") == "0"
    vm.wait("WAIT-HOTPLUG")
    sums = G.cycle_sums(vm, "A")
    assert set(sums) == {"big", "small", "dir/f1", "dir/f8"}
    # the same bytes through the iSCSI front end, read on the host
    G.check_sums_over_iscsi(target.url(0, IQN), sums, Path(target.data_dir))


def test_lun_add_and_resize_reach_the_running_guest(booted):
    assert booted.hotplug() == (1, (8 << 20) // 512, (24 << 20) // 512)


def test_the_guest_writes_through_an_stml_restart(booted):
    """The STML is killed while the guest writes and syncs; the supervisor
    restarts it, fetd_vhost registers again, commands in flight are retried
    (BUSY) and the rest wait in the rings: every write lands."""
    target, vm = booted.target, booted.vm
    booted.hotplug()                 # the script's earlier phase, if no test did it yet
    vm.wait("WAIT-RESTART")
    procs = children_by_module(target.proc.pid)
    os.kill(procs["stml"], signal.SIGKILL)
    assert vm.wait("R-VERIFY", timeout=300) == "0"
    assert vm.wait("EXIT") == "0"
    assert vm.wait_exit(120) == 0
    log = target.log()
    assert "stml exited with" in log and "fetd_vhost exited" not in log
    assert children_by_module(target.proc.pid)["fetd_vhost"] == procs["fetd_vhost"]
    assert re.search(r"fetd_vhost: the VM on \S+ disconnected", log)
    # the VM's nexus outlived the STML: its first command to the new one heard
    # POWER ON OCCURRED (decisions/0247), which Linux's SCSI layer logs (a warning,
    # below the console's loglevel: counted in dmesg) and retries
    assert "outlived the STML that held it" in log
    assert int(vm.wait("R-POWERON")) >= 1
    # what the guest wrote while the STML restarted, read on the host through iSCSI
    G.check_sums_over_iscsi(target.url(0, IQN), G.cycle_sums(vm, "R"), Path(target.data_dir))
