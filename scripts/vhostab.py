#!/usr/bin/env python3
"""Two fetd_vhost configurations and QEMU's own device in one guest, in turns.

    scripts/vhostab.py --a "--cpu-affinity=none" --b "" [--b-options ,poll_us=0]
                       [--rounds 12] [--count 1500] [--size 4096] [--mode randread]

On a machine other work keeps busy, runs minutes apart compare the load more
than the configurations (bench.py --vhost: QEMU's own device alone varied 2x
between runs). Here one guest (bench.py --vhost's kernel and initramfs) has
three disks: two `scsi-target run`s, A and B, each serving a filled file in
/dev/shm by fetd_vhost with its own run arguments and --vhost options, and
QEMU's virtio-scsi + scsi-hd. Every round runs COUNT QD1 O_DIRECT I/Os on
each disk, one after the other (the order rotates per round), so a change of
load hits all three alike. A tree not being measured sleeps (fetd_vhost's
poll follows its own answers only). Prints per disk the median IOPS, the
median per-round ratio to QEMU's device, and the CPU of each run's STML and
fetd_vhost per I/O (user + system, /proc, over all rounds)."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import bench  # noqa: E402
from support import guest as G  # noqa: E402

SLOTS = {"a": "0x10", "b": "0x11", "qemu": "0x12"}    # PCI slots: the guest finds its disks by them
TICK = os.sysconf("SC_CLK_TCK")


def script(rounds: int, mode: str, size: int, count: int) -> str:
    lines = ["for d in /sys/block/sd*; do p=$(readlink -f $d); case $p in"]
    lines += [f"  *0000:00:{slot[2:]}.0*) {who}=${{d##*/}};;" for who, slot in SLOTS.items()]
    lines += ["esac; done", 'echo "@@ DISKS $a $b $qemu"']
    names = list(SLOTS)
    for r in range(rounds):
        for who in names[r % 3:] + names[:r % 3]:
            lines.append(f'echo "@@ R{r}-{who} $(guestio /dev/${who} {mode} {size} {count})"')
    return "\n".join(lines) + "\n"


def start_run(work: Path, name: str, image: Path, args: list[str], options: str) -> subprocess.Popen:
    sock = work / f"{name}.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "scsi_target", "run", "--data-dir", str(work / name), "--lun", f"file:{image},thick",
         "--no-iscsi", "--vhost", str(sock) + options, "--log-level", "warning", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT)
    assert proc.stdout is not None
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.startswith("Ready. "):
            break
    else:
        raise RuntimeError(f"run {name} did not start:\n" + "".join(said[-20:]))
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc


def cpu_ticks(pid: int) -> int:
    """User + system ticks of `pid`'s children (the STML, fetd_vhost), all threads."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                st = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(st[11]) + int(st[12])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="", help="run arguments of A (shell words)")
    ap.add_argument("--b", default="", help="run arguments of B (shell words)")
    ap.add_argument("--a-options", default="", help="after A's --vhost socket path, e.g. ,poll_us=0")
    ap.add_argument("--b-options", default="", help="after B's --vhost socket path")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--count", type=int, default=1500)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--mode", default="randread", choices=["randread", "seqread", "seqwrite"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vhostab"))
    images = {who: Path("/dev/shm") / f"vhostab-{who}-{os.getpid()}.img" for who in SLOTS}
    runs: dict[str, subprocess.Popen] = {}
    vm = None
    try:
        k = G.kernel()
        accel = G.accelerator(k)
        rd = G.initramfs(k, script(args.rounds, args.mode, args.size, args.count),
                         files={"usr/bin/guestio": bench.guestio(work)}, binaries=())
        for image in images.values():
            bench.filled_image(image, bench.VHOST_SIZE)
        runs["a"] = start_run(work, "a", images["a"], shlex.split(args.a), args.a_options)
        runs["b"] = start_run(work, "b", images["b"], shlex.split(args.b), args.b_options)
        memory = 256
        qemu = [
            "-object", f"memory-backend-memfd,id=mem,size={memory}M,share=on", "-numa", "node,memdev=mem",
            "-drive", f"file={images['qemu']},format=raw,if=none,id=d0",
            "-device", f"virtio-scsi-pci,id=vs0,addr={SLOTS['qemu']}", "-device", "scsi-hd,drive=d0,bus=vs0.0"]
        for who in ("a", "b"):
            qemu += ["-chardev", f"socket,id=vus{who},path={work / (who + '.sock')}",
                     "-device", f"vhost-user-scsi-pci,chardev=vus{who},addr={SLOTS[who]}"]
        before = {who: cpu_ticks(p.pid) for who, p in runs.items()}
        vm = G.Guest(k, rd, accel=accel, memory_mb=memory, log_path=work / "console.log", args=qemu).start()
        print(f"guest {k.version} {accel}; A: run {args.a!r} --vhost SOCK{args.a_options}; "
              f"B: run {args.b!r} --vhost SOCK{args.b_options}", flush=True)
        vm.wait("EXIT", timeout=3600)
        spent = {who: cpu_ticks(p.pid) - before[who] for who, p in runs.items()}
        marks = dict(vm.marks())
        if len((marks.get("DISKS") or "").split()) != 3:
            raise RuntimeError("the guest did not see three disks:\n" + vm.console()[-3000:])
        iops = {who: [float(marks[f"R{r}-{who}"].split()[0]) for r in range(args.rounds)] for who in SLOTS}
        for who in SLOTS:
            ratio = statistics.median(a / q for a, q in zip(iops[who], iops["qemu"]))
            cpu = (f"; STML + fetd_vhost {spent[who] / TICK / (args.rounds * args.count) * 1e6:.0f} us CPU per I/O"
                   if who in spent else "")
            print(f"{who:5s} {statistics.median(iops[who]):8.0f} IOPS (median of {args.rounds}), "
                  f"{ratio:.3f} of QEMU's per round{cpu}", flush=True)
        for who in SLOTS:
            print(f"  {who:5s} per round: " + " ".join(f"{x:.0f}" for x in iops[who]))
        ab = [a / b for a, b in zip(iops["a"], iops["b"])]
        print(f"A/B per round: median {statistics.median(ab):.3f}, "
              f"{sum(x > 1 for x in ab)} of {len(ab)} rounds A faster", flush=True)
    finally:
        if vm is not None:
            vm.stop()
        for p in runs.values():
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
        for image in images.values():
            image.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
