#!/usr/bin/env python3
"""Where an RBD target's CPU goes, thread by thread: ours against tgtd's bs_rbd.

    scripts/rbdthreads.py [--count 10000] [--rounds 2] [--read] [--depth 16] [--size 4k] [--ceph-conf C --ceph-keyring K]
    scripts/rbdthreads.py --perf        # also `perf record -g` of each target during one run
    scripts/rbdthreads.py --size 1M --read --depth 8 --osd --syscalls   # the OSD's side too

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
`--osd`: the throwaway cluster's OSD's threads too, serving each target,
and the machine's TCP counters (/proc/net/netstat, snmp) that moved, per
I/O, and each open connection's retransmissions and reordering (ss).
`--syscalls`: in the last run, the OSD's and the target's socket
syscalls per I/O by thread, call and result (EAGAIN, or bytes rounded
up to a power of two), from perf's syscall exit tracepoints. `--osd-cpu`
keeps the OSD on one CPU (decision 0427).
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
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py: the targets and the images)

Sample = dict[int, tuple[str, int, int, int, int, int, int]]   # tid -> name, utime, stime, vol, invol, ns, migrations


def sample(pid: int) -> Sample:
    """Every thread's name, CPU ticks, context switches, time on the CPU and migrations."""
    got: Sample = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            ran = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])   # ns on the CPU
        except OSError:
            continue   # ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        vol = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))      # type: ignore[union-attr]
        invol = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        moved = re.search(r"^se\.nr_migrations\s+:\s+(\d+)", _sched(pid, tid), re.M)
        got[int(tid)] = (name, int(fields[11]), int(fields[12]), vol, invol, ran, int(moved.group(1)) if moved else 0)
    return got


def _sched(pid: int, tid: str) -> str:
    """A thread's scheduler statistics (/proc/PID/task/TID/sched), "" where the kernel has none."""
    try:
        return Path(f"/proc/{pid}/task/{tid}/sched").read_text()
    except OSError:
        return ""


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
    """Per thread name (or thread): threads, user us, kernel us, sleeps,
    preemptions, us on the CPU (schedstat, to the ns), migrations per I/O."""
    hz = os.sysconf("SC_CLK_TCK")
    rows: dict[str, list[float]] = {}
    for tid, (name, ut, st, vol, invol, ran, moved) in after.items():
        b = before.get(tid, (name, 0, 0, 0, 0, 0, 0))
        row = rows.setdefault(f"{name}/{tid}" if tids else re.sub(r"\d+$", "N", name), [0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += (ut - b[1]) / hz / count * 1e6
        row[2] += (st - b[2]) / hz / count * 1e6
        row[3] += (vol - b[3]) / count
        row[4] += (invol - b[4]) / count
        row[5] += (ran - b[5]) / 1e3 / count
        row[6] += (moved - b[6]) / count
    return rows


def show(label: str, runs: list[dict[str, list[float]]]) -> None:
    names = sorted({n for r in runs for n in r}, key=lambda n: -statistics.median(
        r.get(n, [0] * 7)[5] for r in runs))
    print(f"{label}: per I/O, median of {len(runs)} runs")
    print(f"  {'thread':<20} {'n':>3} {'user us':>8} {'sys us':>8} {'sleeps':>7} {'preempt':>7} {'cpu us':>8} {'migr':>6}")
    total = [0.0] * 6
    for n in names:
        vals = [statistics.median(r.get(n, [0] * 7)[i] for r in runs) for i in range(7)]
        if vals[1] + vals[2] + vals[3] < 0.05:
            continue
        total = [t + v for t, v in zip(total, vals[1:])]
        print(f"  {n:<20} {vals[0]:>3.0f} {vals[1]:>8.1f} {vals[2]:>8.1f} {vals[3]:>7.2f} {vals[4]:>7.2f}"
              f" {vals[5]:>8.1f} {vals[6]:>6.2f}")
    print(f"  {'(shown)':<20} {'':>3} {total[0]:>8.1f} {total[1]:>8.1f} {total[2]:>7.2f} {total[3]:>7.2f}"
          f" {total[4]:>8.1f} {total[5]:>6.2f}")


def tcp_counters() -> dict[str, int]:
    """The machine's TCP counters (TcpExt and Tcp of /proc/net/netstat and snmp)."""
    got: dict[str, int] = {}
    for f in ("/proc/net/netstat", "/proc/net/snmp"):
        lines = Path(f).read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            kind, names_ = names.split(":", 1)
            if kind in ("TcpExt", "Tcp"):
                got.update((f"{kind}.{n}", int(v)) for n, v in zip(names_.split(), values.split(":", 1)[1].split()))
    return got


def show_tcp(label: str, runs: list[dict[str, int]], count: int, floor: float = 0.005) -> None:
    """The counters that moved by `floor` per I/O or more (medians of the runs)."""
    print(f"{label}: TCP counters per I/O, median of {len(runs)} runs (machine-wide)")
    for name in sorted({n for r in runs for n in r}):
        v = statistics.median(r.get(name, 0) for r in runs) / count
        if abs(v) >= floor and not name.startswith("Tcp.CurrEstab"):
            print(f"  {name:<36} {v:10.3f}")


SS_FIELDS = ("retrans", "dsack_dups", "reord_seen", "data_segs_out", "data_segs_in", "bytes_retrans")


Connections = dict[tuple[str, str], tuple[str, dict[str, int]]]


def connections() -> Connections:
    """Each established TCP connection on the machine now."""
    return parse_connections(subprocess.run(["ss", "-tinpH", "state", "established"],
                                            capture_output=True, text=True).stdout)


def tcp_info(line: str, fields: tuple[str, ...]) -> dict[str, int]:
    """The named counters of one `ss -i` info line (retrans:CUR/TOTAL gives its total)."""
    vals: dict[str, int] = {}
    for f in fields:
        m = re.search(rf"\b{f}:(\d+)(?:/(\d+))?", line)
        if m:
            vals[f] = int(m.group(2) or m.group(1))
    return vals


def parse_connections(out: str) -> Connections:
    """From `ss -tinpH state established`: (local, peer) -> its process's
    name and its counters (retransmissions, duplicate SACKs, reordering
    seen, segments, bytes retransmitted)."""
    got: Connections = {}
    key: tuple[str, str] | None = None
    proc = "?"
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            parts = line.split()
            key = (parts[2], parts[3])
            m = re.search(r'users:\(\("([^"]+)"', line)
            proc = m.group(1) if m else "?"
            continue
        if key is None:
            continue
        got[key] = (proc, tcp_info(line, SS_FIELDS))
        key = None
    return got


def show_connections(label: str, before: Connections, after: Connections, count: int) -> None:
    """Per connection that sent a segment of data per I/O or more in the run
    (and is still open: not qemu-img's): what its counters did per I/O."""
    print(f"{label}: TCP connections, per I/O (sender side)")
    for k, (proc, vals) in sorted(after.items()):
        b = before.get(k, (proc, {}))[1]
        d = {f: (vals.get(f, 0) - b.get(f, 0)) / count for f in SS_FIELDS}
        if d["data_segs_out"] >= 1:
            print(f"  {proc:<12} {k[0]:>21} -> {k[1]:<21} " + " ".join(f"{f} {v:.3f}" for f, v in d.items()))


SYSCALLS = ("sendmsg", "recvmsg", "read", "readv", "writev", "recvfrom", "sendto", "epoll_wait")


def syscall_counts(lines: list[str], label: Callable[[int, str], str]) -> collections.Counter:
    """From `perf script -F comm,tid,event,trace` of syscall exits:
    (thread, call, result) -> calls; result EAGAIN, another error, 0, or
    bytes (events) rounded up to a power of two."""
    got: collections.Counter = collections.Counter()
    for line in lines:
        m = re.match(r"\s*(.+?)\s+(\d+)\s+syscalls:sys_exit_(\w+):\s+(0x[0-9a-f]+)", line)
        if not m:
            continue
        comm, tid, call, ret = m.groups()
        r = int(ret, 16)
        r = r - (1 << 64) if r >= 1 << 63 else r
        what = "EAGAIN" if r == -11 else f"err{r}" if r < 0 else "0" if r == 0 else f"<={1 << (r - 1).bit_length()}"
        got[label(int(tid), comm), call, what] += 1
    return got


def show_syscalls(label: str, got: collections.Counter, count: int, floor: float = 0.01) -> None:
    """The (thread, call, result) rows with `floor` calls per I/O or more."""
    print(f"{label}: syscalls per I/O (thread, call, result)")
    for (who, call, what), n in sorted(got.items()):
        if n / count >= floor:
            print(f"  {who:<32} {call:<11} {what:<10} {n / count:.3f}")


def pin(pid: int, cpu: int) -> None:
    """Every thread of process `pid` on CPU `cpu` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass   # ended meanwhile


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
    ap.add_argument("--perf", action="store_true", help="perf record -g each target (with --osd, and the OSD) in its last run")
    ap.add_argument("--wakeups", action="store_true",
                    help="who woke whom, per I/O, in each target's last run (perf sched tracepoints)")
    ap.add_argument("--osd", action="store_true",
                    help="the OSD's threads serving each target, and TCP counters per I/O")
    ap.add_argument("--syscalls", action="store_true",
                    help="the OSD's and the target's socket syscalls per I/O in each target's last run")
    ap.add_argument("--osd-cpu", type=int, metavar="CPU",
                    help="keep the OSD's threads on this CPU (with `taskset -c OTHER` around this script: "
                         "the targets and qemu-img apart from it; decision 0427)")
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
            osd_runs: dict[str, list] = {t.name: [] for t in targets}
            tcp_runs: dict[str, list] = {t.name: [] for t in targets}
            calls: dict[str, collections.Counter] = {}
            osd = rbd.daemons().get("ceph-osd")
            if (args.osd or args.syscalls or args.osd_cpu is not None) and osd is None:
                raise SystemExit("rbdthreads: --osd, --syscalls and --osd-cpu need the throwaway cluster"
                                 " (no --ceph-conf)")
            if osd is not None and args.osd_cpu is not None:
                pin(osd, args.osd_cpu)
            woken: dict[str, Wakeups] = {}
            for r in range(args.rounds):
                for t in targets:
                    pid = bench.processes(t)["stml"] if isinstance(t, bench.Ours) \
                        else t.proc.pid
                    perf = None
                    if args.perf and r == args.rounds - 1:
                        perf = subprocess.Popen(["perf", "record", "-g", "-q", "-o", f"/tmp/perf-{t.name}.data",
                                                 "-p", f"{pid},{osd}" if args.osd else str(pid)],
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
                    sched = None
                    if args.wakeups and r == args.rounds - 1:
                        sched = subprocess.Popen(["perf", "record", "-q", "-a", "-e", "sched:sched_wakeup",
                                                  "-e", "sched:sched_switch", "-o", str(work / "sched.data")],
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    traced = None
                    if args.syscalls and r == args.rounds - 1:
                        traced = subprocess.Popen(
                            ["perf", "record", "-q", "-p", f"{osd},{pid}",
                             *(a for c in SYSCALLS for a in ("-e", f"syscalls:sys_exit_{c}")),
                             "-o", str(work / "calls.data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        if perf or sched or traced:
                            time.sleep(1)   # perf has its events open before the run starts
                        before, was_idle = sample(pid), idle()
                        osd_before, tcp_before = (sample(osd), tcp_counters()) if osd else ({}, {})
                        conns = connections() if args.osd else {}
                        took = bench.qemu_bench(t.url, wargs, args.count)
                        runs[t.name].append(by_name(before, sample(pid), args.count, args.tids))
                        if args.osd and osd:
                            osd_runs[t.name].append(by_name(osd_before, sample(osd), args.count, args.tids))
                            tcp_runs[t.name].append({k: v - tcp_before.get(k, 0)
                                                     for k, v in tcp_counters().items()})
                            show_connections(f"{t.name} round {r}", conns, connections(), args.count)
                        now_idle = idle()
                    finally:   # (a failed run leaves no perf recording behind)
                        for p in (perf, sched, traced):
                            if p is not None:
                                p.send_signal(2)
                                p.wait()
                    if sched is not None:
                        names = {p: f"{t.name}/{n}" for n, p in bench.processes(t).items()}
                        lines = subprocess.run(["perf", "script", "-i", str(work / "sched.data"), "-F",
                                                "comm,tid,event,trace"], capture_output=True,
                                               text=True).stdout.splitlines()
                        woken[t.name] = wakeups(lines, lambda tid, comm: thread_label(tid, comm, names))
                    if traced is not None:
                        names = {p: f"{t.name}/{n}" for n, p in bench.processes(t).items()}
                        names[osd or 0] = "ceph-osd"
                        lines = subprocess.run(["perf", "script", "-i", str(work / "calls.data"), "-F",
                                                "comm,tid,event,trace"], capture_output=True,
                                               text=True).stdout.splitlines()
                        calls[t.name] = syscall_counts(lines, lambda tid, comm: thread_label(tid, comm, names))
                    share = 100 * (now_idle[0] - was_idle[0]) / max(1, now_idle[1] - was_idle[1])
                    print(f"{t.name} round {r}: {args.count / took:.0f} IOPS, machine {share:.0f} % idle",
                          flush=True)
            for name, got in runs.items():
                show(name, got)
            for name, got in osd_runs.items():
                if got:
                    show(f"ceph-osd serving {name}", got)
                    show_tcp(name, tcp_runs[name], args.count)
            for name, c in calls.items():
                show_syscalls(name, c, args.count)
            for name, w in woken.items():
                show_wakeups(name, w, args.count)
        finally:
            for t in targets:
                t.stop()
            rbd.close()


if __name__ == "__main__":
    main()
