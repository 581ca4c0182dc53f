"""The Linux kernel's own iSCSI initiator (iscsi_tcp, open-iscsi's
iscsistart) in a QEMU guest, against fetd_tcp over QEMU's user network
(the guest's 10.0.2.2 is the host's 127.0.0.1).

One boot, two sessions: one plain, one with mutual CHAP and CRC32C header
and data digests. On each disk the guest partitions, makes ext4, writes,
syncs, unmounts, runs e2fsck and verifies the files; the host then reads
each LUN back through iSCSI and finds the same files. Runs under TCG when
KVM does not work.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from support import guest as G
from support.target import Target

pytestmark = pytest.mark.guest

PLAIN = "iqn.2026-11.org.scsi-target:plain"
SECURE = "iqn.2026-11.org.scsi-target:secure"
INITIATOR = "iqn.2026-11.org.scsi-target.test:kernel"
SECRET, TSECRET = "guest-secret-0123", "target-secret-4567"
PLAIN_BLOCKS, SECURE_BLOCKS = (48 << 20) // 512, (40 << 20) // 512


def script() -> str:
    """The guest's part; the target's port comes on the kernel command line
    (st_port=N), so the initramfs is the same in every run."""
    login = "iscsistart -i {ini} -t {tgt} -g 1 -a 10.0.2.2 -p $port".format
    return G.FS_CYCLE + textwrap.dedent(f"""
        port=$(sed -n 's/.*st_port=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
        ip link set lo up
        ip link set eth0 up || fail no eth0
        ip addr add 10.0.2.15/24 dev eth0
        mkdir -p /etc/iscsi /var/lib/iscsi /run/lock/iscsi
        {login(ini=INITIATOR, tgt=PLAIN)} >/tmp/login.plain 2>&1
        echo "@@ LOGIN-PLAIN $?"
        {login(ini=INITIATOR, tgt=SECURE)} -u alice -w {SECRET} -U tgt -W {TSECRET} \\
            -P node.conn[0].iscsi.HeaderDigest=CRC32C -P node.conn[0].iscsi.DataDigest=CRC32C \\
            >/tmp/login.secure 2>&1
        echo "@@ LOGIN-SECURE $?"
        # which disk is which: by size
        for n in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30; do
            [ -e /sys/block/sda ] && [ -e /sys/block/sdb ] && break; sleep 1; done
        for d in sda sdb; do
            [ -e /sys/block/$d ] || {{ cat /tmp/login.*; fail no $d; }}
            case $(cat /sys/block/$d/size) in
                {PLAIN_BLOCKS}) plain=$d;; {SECURE_BLOCKS}) secure=$d;;
            esac
        done
        echo "@@ DISKS $plain $secure"
        echo "@@ DIGESTS $(cat /sys/class/iscsi_connection/*/header_digest /sys/class/iscsi_connection/*/data_digest | tr '\\n' ' ')"
        fs_cycle $plain PLAIN
        fs_cycle $secure SECURE
        """)


@pytest.fixture(scope="module")
def run_guest(tmp_path_factory):
    try:
        k = G.kernel()
        rd = G.initramfs(k, script(), modules=(*G.NET_MODULES, "sd_mod"),
                         binaries=("/usr/sbin/iscsistart", "/usr/sbin/mke2fs", "/usr/sbin/e2fsck"))
        accel = G.accelerator(k)
    except G.GuestUnavailable as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("kernel-initiator")
    cfg = d / "target.toml"
    cfg.write_text(textwrap.dedent(f"""
        [[target]]
        name = "{PLAIN}"
        [[target.lun]]
        backend = "ram"
        size = "48MiB"

        [[target]]
        name = "{SECURE}"
        acl = ["{INITIATOR}"]
        chap = {{ user = "alice", secret = "{SECRET}" }}
        mutual_chap = {{ user = "tgt", secret = "{TSECRET}" }}
        [[target.lun]]
        backend = "ram"
        size = "40MiB"
    """))
    cfg.chmod(0o600)
    target = Target(config=str(cfg), data_dir=str(d))
    vm = None
    try:
        port = int(target.portal.rsplit(":", 1)[1])
        vm = G.Guest(k, rd, accel=accel, memory_mb=256, append=f"st_port={port}", log_path=d / "console.log",
                     args=["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]).start()
        vm.wait("EXIT", timeout=400)
        yield target, vm, d
    finally:
        if vm is not None:
            vm.stop()
        target.stop()


def test_kernel_initiator_logs_in_plain_and_with_mutual_chap_and_digests(run_guest):
    target, vm, _ = run_guest
    assert vm.wait("LOGIN-PLAIN") == "0" and vm.wait("LOGIN-SECURE") == "0", vm.console()[-3000:]
    assert vm.value("DISKS") and len(vm.value("DISKS").split()) == 2
    # header and data digests of each connection (sysfs: 1 is CRC32C): one session has both
    assert sorted(vm.value("DIGESTS").split()) == ["0", "0", "1", "1"]


@pytest.mark.parametrize("tag, iqn, chap", [("PLAIN", PLAIN, ""),
                                           ("SECURE", SECURE, f",user=alice,password={SECRET}")])
def test_kernel_initiator_file_system_cycle(run_guest, tag, iqn, chap):
    target, vm, d = run_guest
    assert vm.wait(f"{tag}-FSCK") == "0" and vm.wait(f"{tag}-VERIFY") == "0", vm.console()[-3000:]
    sums = G.cycle_sums(vm, tag)
    assert set(sums) == {"big", "small", "dir/f1", "dir/f8"}
    assert vm.value("EXIT") == "0"
    # the host reads the LUN with the initiator name the ACL admits (and CHAP one way)
    source = (f"driver=iscsi,transport=tcp,portal={target.portal},target={iqn},lun=0,"
              f"initiator-name={INITIATOR}{chap}")
    G.check_sums_over_iscsi(source, sums, Path(d))
