#!/usr/bin/env python3
"""Where an RBD target's CPU goes, thread by thread: ours against tgtd's bs_rbd.

    scripts/rbdthreads.py [--count 10000] [--rounds 2] [--read] [--depth 16] [--size 4k] [--ceph-conf C --ceph-keyring K]
    scripts/rbdthreads.py --perf        # also `perf record -g` of each target during one run

Both targets as bench.py --rbd starts them (bench.py's classes), on a
throwaway cluster or the one --ceph-conf names, and `qemu-img bench` 4 KiB
(--size: 64k, 1M) QD16 (--depth) writes (--read: reads) against each,
alternating. Per run, per thread
of the STML process and of tgtd (threads grouped by their name, librbd's and
librados's name theirs): user and kernel CPU, voluntary and involuntary
context switches, per I/O, from /proc/PID/task/*/{stat,status}. bench.py
--cpu gives each process's total; this shows which threads it is made of.
`--wakeups`: in the last run, who woke whom and which threads slept or were
preempted, per I/O, machine-wide (perf's sched_wakeup and sched_switch
tracepoints): the hand-offs between the loop, librbd's threads, the front
end and the OSD (decision 0416). Each run also says how idle the machine
was: at 0 % the targets compete for CPU, and IOPS follow CPU per I/O.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py: the targets and the images)

Sample = dict[int, tuple[str, int, int, int, int]]   # tid -> name, utime, stime, vol, invol


def sample(pid: int) -> Sample:
    """Every thread's name, CPU ticks and context switches."""
    got: Sample = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue   # ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        vol = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))      # type: ignore[union-attr]
        invol = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        got[int(tid)] = (name, int(fields[11]), int(fields[12]), vol, invol)
    return got


def idle() -> tuple[int, int]:
    """The machine's idle and total CPU ticks so far (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def thread_label(tid: int, comm: str, targets: dict[int, str]) -> str:
    """PROCESS:THREAD for a thread (a target's processes by their pid in
    `targets`, others by their name), with a trailing number dropped."""
    try:
        tgid = int(re.search(r"^Tgid:\s+(\d+)", Path(f"/proc/{tid}/status").read_text(), re.M).group(1))  # type: ignore[union-attr]
        proc = targets.get(tgid) or Path(f"/proc/{tgid}/comm").read_text().strip()
    except (OSError, AttributeError):
        proc = "gone"   # ended before the count (qemu-img, a short-lived helper)
    return f"{proc}:{re.sub(r'[0-9]+$', 'N', comm)}"


Wakeups = tuple[collections.Counter, collections.Counter]


def wakeups(lines: list[str], label: Callable[[int, str], str]) -> Wakeups:
    """From `perf script -F comm,tid,event,trace` of sched_wakeup and
    sched_switch: (waker, wakee) -> wake-ups, and (thread, "sleep" or
    "preempt") -> times it left the CPU; threads named by label(tid, comm)."""
    woke: collections.Counter = collections.Counter()
    left: collections.Counter = collections.Counter()
    names: dict[tuple[int, str], str] = {}

    def name(tid: int, comm: str) -> str:
        if (tid, comm) not in names:
            names[tid, comm] = label(tid, comm)
        return names[tid, comm]
    for line in lines:
        m = re.match(r"\s*(.+?)\s+(\d+)\s+sched:(sched_wakeup|sched_switch):\s+(.*)", line)
        if not m:
            continue
        comm, tid, event, rest = m.groups()
        if event == "sched_wakeup":
            w = re.search(r"comm=(.+?) pid=(\d+)", rest)
            if w:
                woke[name(int(tid), comm), name(int(w.group(2)), w.group(1))] += 1
            continue
        s = re.search(r"prev_comm=(.+?) prev_pid=(\d+) .*prev_state=(\S+)", rest)
        if s:
            left[name(int(s.group(2)), s.group(1)), "preempt" if s.group(3).startswith("R") else "sleep"] += 1
    return woke, left


def show_wakeups(label: str, got: Wakeups, count: int, floor: float = 0.02) -> None:
    woke, left = got
    print(f"{label}: wake-ups per I/O (waker -> woken), machine-wide")
    for (a, b), n in woke.most_common():
        if n / count >= floor:
            print(f"  {a:<32} -> {b:<32} {n / count:.2f}")
    print(f"{label}: threads leaving the CPU per I/O")
    for (a, how), n in left.most_common():
        if n / count >= floor:
            print(f"  {a:<32} {how:<8} {n / count:.2f}")


def by_name(before: Sample, after: Sample, count: int, tids: bool = False) -> dict[str, list[float]]:
    """Per thread name (or thread): threads, user us, kernel us, sleeps, preemptions per I/O."""
    hz = os.sysconf("SC_CLK_TCK")
    rows: dict[str, list[float]] = {}
    for tid, (name, ut, st, vol, invol) in after.items():
        b = before.get(tid, (name, 0, 0, 0, 0))
        row = rows.setdefault(f"{name}/{tid}" if tids else re.sub(r"\d+$", "N", name), [0, 0.0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += (ut - b[1]) / hz / count * 1e6
        row[2] += (st - b[2]) / hz / count * 1e6
        row[3] += (vol - b[3]) / count
        row[4] += (invol - b[4]) / count
    return rows


def show(label: str, runs: list[dict[str, list[float]]]) -> None:
    names = sorted({n for r in runs for n in r}, key=lambda n: -statistics.median(
        r.get(n, [0, 0, 0, 0, 0])[1] + r.get(n, [0, 0, 0, 0, 0])[2] for r in runs))
    print(f"{label}: per I/O, median of {len(runs)} runs")
    print(f"  {'thread':<20} {'n':>3} {'user us':>8} {'sys us':>8} {'sleeps':>7} {'preempt':>7}")
    total = [0.0] * 4
    for n in names:
        vals = [statistics.median(r.get(n, [0, 0, 0, 0, 0])[i] for r in runs) for i in range(5)]
        if vals[1] + vals[2] + vals[3] < 0.05:
            continue
        total = [t + v for t, v in zip(total, vals[1:])]
        print(f"  {n:<20} {vals[0]:>3.0f} {vals[1]:>8.1f} {vals[2]:>8.1f} {vals[3]:>7.2f} {vals[4]:>7.2f}")
    print(f"  {'(shown)':<20} {'':>3} {total[0]:>8.1f} {total[1]:>8.1f} {total[2]:>7.2f} {total[3]:>7.2f}")


def qemu_args(size: str, depth: int, read: bool) -> list[str]:
    """qemu-img bench's arguments for one run; `size` as bench.py's workloads
    give it (4k, 64k, 1M)."""
    if not re.fullmatch(r"[1-9][0-9]*[kM]", size):
        raise SystemExit(f"rbdthreads: --size {size!r} is not a size like 4k, 64k or 1M")
    return ["-d", str(depth), "-s", size, *([] if read else ["-w"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--read", action="store_true", help="4 KiB QD16 reads instead of writes")
    ap.add_argument("--depth", type=int, default=16, help="the initiator's queue depth")
    ap.add_argument("--size", default="4k", help="the size of each I/O: 4k, 64k, 1M (decision 0420)")
    ap.add_argument("--ceph-conf")
    ap.add_argument("--ceph-keyring")
    ap.add_argument("--only", choices=("ours", "tgtd"), help="measure one target")
    ap.add_argument("--tgtd-set", action="append", default=[], metavar="OPTION=VALUE",
                    help="a client option for tgtd's librbd (rbd_cache=true: its default)")
    ap.add_argument("--tids", action="store_true", help="each thread apart, not grouped by name")
    ap.add_argument("--perf", action="store_true", help="perf record -g each target in its last run")
    ap.add_argument("--wakeups", action="store_true",
                    help="who woke whom, per I/O, in each target's last run (perf sched tracepoints)")
    args = ap.parse_args()
    wargs = qemu_args(args.size, args.depth, args.read)
    with tempfile.TemporaryDirectory(prefix="rbdthreads") as tmp:
        work = Path(tmp)
        bench.RBD_SIZE = 128 << 20   # qemu-img bench writes sequentially: 40 MiB per 10,000
        rbd = bench.RbdImages(args.ceph_conf, args.ceph_keyring, Path("/dev/shm"))
        targets: list = []
        try:
            kinds: list[type[bench.Ours] | type[bench.Tgtd]] = [
                kind for kind, name in ((bench.Ours, "ours"), (bench.Tgtd, "tgtd")) if args.only in (None, name)]
            rbd.tgtd_options.update(o.split("=", 1) for o in args.tgtd_set)   # over bench.py's own
            for kind in kinds:
                targets.append(kind(work, None, False, rbd))
            runs: dict[str, list] = {t.name: [] for t in targets}
            woken: dict[str, Wakeups] = {}
            for r in range(args.rounds):
                for t in targets:
                    pid = bench.processes(t)["stml"] if isinstance(t, bench.Ours) \
                        else t.proc.pid
                    perf = None
                    if args.perf and r == args.rounds - 1:
                        perf = subprocess.Popen(["perf", "record", "-g", "-q", "-o", f"/tmp/perf-{t.name}.data",
                                                 "-p", str(pid)], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
                    sched = None
                    if args.wakeups and r == args.rounds - 1:
                        sched = subprocess.Popen(["perf", "record", "-q", "-a", "-e", "sched:sched_wakeup",
                                                  "-e", "sched:sched_switch", "-o", str(work / "sched.data")],
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    before, was_idle = sample(pid), idle()
                    took = bench.qemu_bench(t.url, wargs, args.count)
                    runs[t.name].append(by_name(before, sample(pid), args.count, args.tids))
                    now_idle = idle()
                    for p in (perf, sched):
                        if p is not None:
                            p.send_signal(2)
                            p.wait()
                    if sched is not None:
                        names = {p: f"{t.name}/{n}" for n, p in bench.processes(t).items()}
                        lines = subprocess.run(["perf", "script", "-i", str(work / "sched.data"), "-F",
                                                "comm,tid,event,trace"], capture_output=True,
                                               text=True).stdout.splitlines()
                        woken[t.name] = wakeups(lines, lambda tid, comm: thread_label(tid, comm, names))
                    share = 100 * (now_idle[0] - was_idle[0]) / max(1, now_idle[1] - was_idle[1])
                    print(f"{t.name} round {r}: {args.count / took:.0f} IOPS, machine {share:.0f} % idle",
                          flush=True)
            for name, got in runs.items():
                show(name, got)
            for name, w in woken.items():
                show_wakeups(name, w, args.count)
        finally:
            for t in targets:
                t.stop()
            rbd.close()


if __name__ == "__main__":
    main()
