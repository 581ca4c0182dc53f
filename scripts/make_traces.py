#!/usr/bin/env python3
"""Make the traces of real initiators that tests/test_trace.py replays.

    scripts/make_traces.py                 # both, into tests/data/
    scripts/make_traces.py --only qemu-img --out /tmp

Each trace is recorded by a whole target (`scsi-target run --trace`, one RAM
LUN, recording from the start), gzipped, and replayed once here: a trace
that does not replay with zero divergences is not written.

- qemu-img.trace.gz: qemu's iSCSI driver (libiscsi) against a 4 MiB LUN:
  `qemu-img info`, `convert` of a 1 MiB patterned image into the LUN,
  `compare` of it, `bench` reads (QD 8) and writes (QD 4) of 4 KiB, and a
  `convert` of the whole LUN out.
- kernel.trace.gz: the Linux kernel's initiator (iscsi_tcp, logged in by
  open-iscsi's iscsistart) in a QEMU guest (tests/support/guest.py; KVM
  when it works, else TCG, a minute or two) against a 16 MiB LUN: login,
  fdisk, mke2fs -t ext4, mount, a few files written, sync, umount, e2fsck,
  a read-only mount reading them back, logout at power-off.

Needs qemu-utils (qemu-img with iscsi://) and, for the kernel trace,
qemu-system-x86, busybox-static, open-iscsi and e2fsprogs, as the guest
tests do. Run it again only to change the traces: they are data of the
suite, and their content (times, the kernel's choices) differs per run.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.target import IQN, Target  # noqa: E402

INITIATOR = "iqn.2026-11.org.scsi-target.test:trace"


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise SystemExit(f"make_traces: {' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def pattern(size: int) -> bytes:
    """Data that names its own block: anything read from the wrong place shows,
    and it compresses (the trace keeps write data)."""
    return b"".join(f"block {i:08d} of the qemu-img trace ".encode().ljust(512, b".") for i in range(size // 512))


def qemu_img(work: Path, out: Path) -> None:
    src = work / "pattern.img"
    src.write_bytes(pattern(1 << 20))
    t = Target("--lun", "ram:4MiB", "--trace", str(out), data_dir=str(work / "target"))
    try:
        url = t.url()
        run(["qemu-img", "info", url])
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), f"{url}"], check=False)
        run(["qemu-img", "bench", "-f", "raw", "-c", "200", "-d", "8", "-s", "4k", url])
        run(["qemu-img", "bench", "-f", "raw", "-w", "-c", "64", "-d", "4", "-s", "4k", "-o", "2M",
             "--pattern", "171", url])
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(work / "out.raw")])
    finally:
        t.stop()


GUEST_SCRIPT = r"""
fail() { echo "@@ FAIL $*"; poweroff -f; }
waitfor() { i=0; while [ ! -e "$1" ] && [ $i -lt $2 ]; do sleep 0.1; i=$((i+1)); done; [ -e "$1" ]; }
port=$(sed -n 's/.*st_port=\([0-9]*\).*/\1/p' /proc/cmdline)
ip link set lo up
ip link set eth0 up || fail no eth0
ip addr add 10.0.2.15/24 dev eth0
mkdir -p /etc/iscsi /var/lib/iscsi /run/lock/iscsi
iscsistart -i @INITIATOR@ -t @IQN@ -g 1 -a 10.0.2.2 -p $port >/tmp/login 2>&1 || { cat /tmp/login; fail login; }
waitfor /sys/block/sda 300 || fail no sda
printf 'o\nn\np\n1\n\n\nw\n' | fdisk /dev/sda >/tmp/fdisk 2>&1
waitfor /dev/sda1 100 || fail no partition
/usr/sbin/mke2fs -q -F -t ext4 /dev/sda1 || fail mke2fs
mount -t ext4 /dev/sda1 /mnt || fail mount
mkdir /mnt/dir
for n in 1 2 3 4 5 6 7 8; do echo "file $n of the kernel trace" > /mnt/dir/f$n; done
seq 1 3000 > /mnt/numbers
sync
umount /mnt || fail umount
/usr/sbin/e2fsck -fn /dev/sda1 >/tmp/fsck 2>&1; echo "@@ FSCK $?"
echo 3 > /proc/sys/vm/drop_caches
mount -o ro -t ext4 /dev/sda1 /mnt || fail remount
cat /mnt/dir/f8 /mnt/numbers | tail -1
umount /mnt
echo "@@ DONE 0"
"""


def kernel(work: Path, out: Path) -> None:
    from support import guest as G
    k = G.kernel()
    script = GUEST_SCRIPT.replace("@INITIATOR@", INITIATOR).replace("@IQN@", IQN)
    rd = G.initramfs(k, script, modules=(*G.NET_MODULES, "sd_mod"),
                     binaries=("/usr/sbin/iscsistart", "/usr/sbin/mke2fs", "/usr/sbin/e2fsck"))
    accel = G.accelerator(k)
    t = Target("--lun", "ram:16MiB", "--trace", str(out), data_dir=str(work / "target"))
    vm = None
    try:
        port = int(t.portal.rsplit(":", 1)[1])
        vm = G.Guest(k, rd, accel=accel, memory_mb=256, append=f"st_port={port}", log_path=work / "console.log",
                     args=["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]).start()
        if vm.wait("DONE", timeout=900) != "0" or vm.wait("FSCK") != "0":
            raise SystemExit(f"make_traces: the guest failed:\n{vm.console()[-3000:]}")
        vm.wait_exit(120)   # power-off: the session ends, its logout is in the trace
    finally:
        if vm is not None:
            vm.stop()
        t.stop()


def check(path: Path) -> str:
    p = run([sys.executable, "-m", "scsi_target", "trace", "replay", str(path)], check=False)
    if p.returncode != 0:
        raise SystemExit(f"make_traces: {path} does not replay cleanly:\n{p.stdout}{p.stderr}")
    return p.stdout.strip()


TRACES = {"qemu-img": qemu_img, "kernel": kernel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data"), help="where the traces go")
    ap.add_argument("--only", choices=sorted(TRACES), help="make only this one")
    args = ap.parse_args()
    if not shutil.which("qemu-img"):
        sys.exit("make_traces: qemu-img not found (apt-get install qemu-utils qemu-block-extra)")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in [args.only] if args.only else list(TRACES):
        with tempfile.TemporaryDirectory(prefix=f"trace-{name}-") as tmp:
            work = Path(tmp)
            (work / "target").mkdir()
            made = work / f"{name}.trace.gz"
            TRACES[name](work, made)
            print(check(made))
            final = outdir / made.name
            shutil.copyfile(made, final)
            print(f"{final}: {final.stat().st_size} bytes", flush=True)


if __name__ == "__main__":
    main()
