#!/usr/bin/env python3
"""Who wakes, and who waits for a CPU, per QD1 command of a real guest.

    scripts/vhostchain.py [--count 2000] [--size 4096] [--mode randread] [--strace]

Boots bench.py --vhost's guest (TCG or KVM, two disks: fetd_vhost + the STML's
file backend, QEMU's own virtio-scsi + scsi-hd) and runs COUNT O_DIRECT QD1 I/Os
on each disk in turn. Around each run it reads every thread's
/proc/PID/task/TID/schedstat (CPU time, run-queue wait, times scheduled) and
context switches of QEMU, the STML and fetd_vhost, and prints them per I/O.
--strace counts system calls of the STML and fetd_vhost instead (strace -c -f;
slower: read the counts, not the times). --sched S records the scheduler's
switches and wake-ups (perf sched record, all CPUs) for S seconds of the first
run on our disk and prints each hop of a command, median over the commands:
who woke whom, on which CPU, how long each one ran before the next hop
(decision 0312). --pin CPUS pins the STML and fetd_vhost by hand."""
from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def threads(pid: int) -> dict[str, tuple[int, ...]]:
    """thread name (comm, numbered when repeated) -> cpu ns, wait ns, slices, vol, invol,
    user ns, system ns (tick-sampled), minor faults."""
    got: dict[str, tuple[int, ...]] = {}
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        try:
            comm = (task / "comm").read_text().strip()
            cpu, wait, slices = (int(x) for x in (task / "schedstat").read_text().split())
            status = (task / "status").read_text()
        except OSError:
            continue
        vol, invol = (int(x) for x in re.findall(r"voluntary_ctxt_switches:\s+(\d+)", status))
        try:
            st = (task / "stat").read_text().rsplit(")", 1)[1].split()
            utime, stime, minflt = int(st[11]), int(st[12]), int(st[7])
        except OSError:
            utime = stime = minflt = 0
        name = comm
        n = 1
        while name in got:
            n += 1
            name = f"{comm}#{n}"
        got[name] = (cpu, wait, slices, vol, invol, utime * 10_000_000, stime * 10_000_000, minflt)
    return got


def snapshot(procs: dict[str, int]) -> dict[str, dict[str, tuple]]:
    return {who: threads(pid) for who, pid in procs.items()}


def idle_ns() -> tuple[int, int, int]:
    """Host idle ns (all CPUs), rescheduling and function-call interrupts (cross-CPU wake-ups)."""
    fields = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
    irq = {line.split(":")[0].strip(): sum(int(x) for x in line.split()[1:] if x.isdigit())
           for line in Path("/proc/interrupts").read_text().splitlines() if ":" in line}
    return (int(fields[3]) + int(fields[4])) * 10_000_000, irq.get("RES", 0), irq.get("CAL", 0)


def report(label: str, a: dict, b: dict, n: int, wall: float, host: tuple[int, int, int]) -> None:
    print(f"--- {label}: {n} I/Os, {wall / n * 1e6:.0f} us per I/O (sampled wall), host idle "
          f"{host[0] / n / 1000:.0f} us (with the pause before), RES {host[1] / n:.2f} CAL {host[2] / n:.2f} per I/O")
    print(f"{'process/thread':28s} {'cpu us':>8s} {'wait us':>8s} {'sched':>6s} {'vol':>6s} {'invol':>6s}"
          f" {'user':>6s} {'sys':>6s} {'minflt':>7s}  (per I/O)")
    for who in b:
        for name, after in b[who].items():
            before = a[who].get(name, (0,) * 8)
            d = [x - y for x, y in zip(after, before)]
            if d[2] == 0 and d[0] < 1000:
                continue
            print(f"{who + ':' + name:28s} {d[0] / n / 1000:8.1f} {d[1] / n / 1000:8.1f} {d[2] / n:6.2f} "
                  f"{d[3] / n:6.2f} {d[4] / n:6.2f} {d[5] / n / 1000:6.1f} {d[6] / n / 1000:6.1f} {d[7] / n:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--mode", default="randread", choices=["randread", "seqread", "seqwrite"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--sched", type=float, default=0, metavar="S",
                    help="record the scheduler for S seconds of the first run on our disk (perf)")
    ap.add_argument("--pin", default=None, metavar="CPUS",
                    help="pin every thread of the STML and fetd_vhost to these CPUs (e.g. 1 or 0,1) once started")
    ap.add_argument("--run-arg", action="append", default=[], help="more `scsi-target run` arguments")
    ap.add_argument("--vhost-options", default="", metavar=",KEY=VALUE...",
                    help="after run's --vhost socket path, e.g. ,poll_us=0")
    args = ap.parse_args()
    lines = ["for d in /sys/block/sd*; do case $(cat $d/device/vendor) in",
             "  SCSITGT*) ours=${d##*/};; QEMU*) qemu=${d##*/};; esac; done",
             'echo "@@ DISKS $ours $qemu"', "sleep 2"]
    for r in range(args.rounds):
        for who in (("ours", "qemu") if r % 2 == 0 else ("qemu", "ours")):
            lines += [f'echo "@@ GO-{r}-{who} 1"', "sleep 1",
                      f'echo "@@ END-{r}-{who} $(guestio /dev/${who} {args.mode} {args.size} {args.count})"',
                      "sleep 1"]
            lines += [f'echo "== after {r}-{who}"; grep -E "virtio|LOC|CAL|RES" /proc/interrupts']
    work = Path(tempfile.mkdtemp(prefix="vhchain"))
    straces: list[subprocess.Popen] = []
    try:
        with bench.vhost_guest("\n".join(lines) + "\n", Path("/dev/shm"), tuple(args.run_arg),
                               args.vhost_options) as g:
            vm = g.vm
            procs: dict[str, int] = {}
            for c in children(g.run.pid):
                cmd = Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")
                procs["stml" if b"stml" in cmd else "fetd" if b"fetd_vhost" in cmd else str(c)] = c
            procs["qemu"] = vm.proc.pid
            print(f"guest {g.kernel} {g.accel}; pids {procs}", flush=True)
            if args.pin is not None:
                cpus = {int(c) for c in args.pin.split(",")}
                for who in ("stml", "fetd"):
                    for task in Path(f"/proc/{procs[who]}/task").iterdir():
                        os.sched_setaffinity(int(task.name), cpus)
                print(f"the STML and fetd_vhost pinned to CPUs {sorted(cpus)}", flush=True)
            if args.strace:
                for who in ("stml", "fetd"):
                    straces.append(subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(work / f"strace-{who}"),
                                                     "-p", str(procs[who])]))
            watch(vm, procs, args.rounds, args.count, work / "sched.data" if args.sched else None, args.sched)
            print("\n".join(line for line in vm.console().splitlines()
                            if "==" in line or any(k in line for k in ("virtio", "LOC", "CAL", "RES"))))
        for s in straces:
            s.send_signal(signal.SIGINT)
            s.wait()
        if args.sched:
            hops(work / "sched.data", procs)
        for who in ("stml", "fetd") if straces else ():
            print(f"=== strace -c -f {who} (whole run: {args.rounds} x {args.count} I/Os on ours + boot)")
            print((work / f"strace-{who}").read_text())
    finally:
        for s in straces:
            if s.poll() is None:
                s.kill()
        shutil.rmtree(work, ignore_errors=True)


def watch(vm: Any, procs: dict[str, int], rounds: int, count: int, sched: Path | None = None,
          seconds: float = 0) -> None:
    """Snapshot the counters at each run's GO and END marks, and report
    (and record the scheduler during the first run on our disk)."""
    seen: set[str] = set()
    snaps: dict[str, tuple] = {}
    deadline = time.monotonic() + 3600
    want = {f"END-{r}-{w}" for r in range(rounds) for w in ("ours", "qemu")}
    while not want <= seen:
        if time.monotonic() > deadline or vm.proc.poll() is not None:
            raise RuntimeError(vm.console()[-3000:])
        for key, value in vm.marks():
            if key in seen:
                continue
            seen.add(key)
            if key.startswith("GO-"):
                snaps[key[3:]] = (snapshot(procs), time.monotonic(), idle_ns())
                if sched is not None and key == "GO-0-ours":   # (the guest starts 1 s after GO)
                    subprocess.Popen(["sh", "-c", f"sleep 1.3; exec perf sched record -q -o {sched} -- "
                                      f"sleep {seconds}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elif key.startswith("END-"):
                a, t0, i0 = snaps[key[4:]]
                b, t1, i1 = snapshot(procs), time.monotonic(), idle_ns()
                print(f"{key}: guest says {value}", flush=True)
                # (the guest pauses 1 s after GO: counted out of the wall time)
                report(key[4:], a, b, count, t1 - t0 - 1.0, (i1[0] - i0[0], i1[1] - i0[1], i1[2] - i0[2]))
        time.sleep(0.02)


HOPS = ("kick", "fetd runs", "to STML", "STML runs", "to fetd", "fetd runs ", "to QEMU", "to vCPU")


def hops(data: Path, procs: dict[str, int]) -> None:
    """Each command's chain from perf sched's wake-ups and switches: the vCPU
    wakes fetd_vhost (the kick), fetd_vhost the STML, the STML fetd_vhost,
    fetd_vhost QEMU's main loop (the call eventfd), that the vCPU. Prints the
    median time from each step to the next, and on which CPUs the commands'
    steps ran (same CPU as the waker or not)."""
    for _ in range(100):     # perf writes its file when its sleep ends
        if data.exists() and data.stat().st_size:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    text = subprocess.run(["perf", "sched", "script", "-i", str(data), "-F", "tid,cpu,time,event,trace"],
                          capture_output=True, text=True).stdout
    event = re.compile(r"\s*(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(sched_waking|sched_switch):\s+(.*)")
    fetd, stml, main = procs["fetd"], procs["stml"], procs["qemu"]
    wakes: collections.Counter[int] = collections.Counter()
    rows = []
    for line in text.splitlines():
        m = event.match(line)
        if m:
            tid, cpu, t, kind, rest = int(m[1]), int(m[2]), float(m[3]), m[4], m[5]
            if kind == "sched_waking":
                w = re.search(r" pid=(\d+) .*target_cpu=(\d+)", rest)
                if w is None:
                    continue
                rows.append((t, tid, cpu, "wake", int(w[1]), int(w[2])))
                if int(w[1]) == fetd:
                    wakes[tid] += 1
            else:
                n = re.search(r"next_pid=(\d+)", rest)
                if n is not None:
                    rows.append((t, tid, cpu, "run", int(n[1]), cpu))
    if not rows:
        print("--- sched: perf recorded nothing")
        return
    vcpu = max((t for t in wakes if t != stml), key=lambda t: wakes[t])
    steps = [("wake", vcpu, fetd), ("run", None, fetd), ("wake", fetd, stml), ("run", None, stml),
             ("wake", stml, fetd), ("run", None, fetd), ("wake", fetd, main), ("wake", main, vcpu)]
    chains: list[list[tuple[float, int, int]]] = []
    cur: list[tuple[float, int, int]] = []
    for t, tid, cpu, kind, who, target in rows:
        if kind == "wake" and tid == vcpu and who == fetd:
            if len(cur) == len(steps):
                chains.append(cur)
            cur = [(t, cpu, target)]
            continue
        if not cur or len(cur) == len(steps):
            continue
        k, waker, wakee = steps[len(cur)]
        if kind == k and who == wakee and (waker is None or tid == waker):
            cur.append((t, cpu, target))
    print(f"--- sched: {len(chains)} whole chains (vCPU thread {vcpu}); median us from each step to the next")
    for i in range(len(steps) - 1):
        d = [(c[i + 1][0] - c[i][0]) * 1e6 for c in chains]
        print(f"  {HOPS[i]:>10s} -> {HOPS[i + 1]:<10s} {statistics.median(d):7.1f}" if d else "")
    nxt = [(b[0][0] - a[-1][0]) * 1e6 for a, b in zip(chains, chains[1:])]
    if nxt:
        print(f"  {HOPS[-1]:>10s} -> next kick  {statistics.median(nxt):7.1f}  (the guest)")
    cross = collections.Counter(tuple(s[2] != s[1] for s in c[:7:2]) for c in chains)
    print("  wake-ups onto another CPU than the waker's (kick, STML, fetd, QEMU), share of chains:")
    for crossed, times in cross.most_common(4):
        print(f"    {crossed}: {times / len(chains):.0%}")


if __name__ == "__main__":
    main()
