#!/usr/bin/env python3
"""How a target's read data goes over loopback TCP: ours (fetd_tcp) against tgtd.

    scripts/tcpsend.py [--size 1M] [--depth 8] [--count 2000] [--rounds 3] [--only ours|tgtd]
    scripts/tcpsend.py --syscalls      # the target's send calls: per read, bytes, CPU
    scripts/tcpsend.py --segments      # who sent each data segment, and which arrived out of order

Both targets as bench.py starts them, on file LUNs (a filled file in
/dev/shm each, ours thick), and `qemu-img bench` reads against each,
alternating. Per run and per read: the iSCSI connection's retransmissions,
duplicate SACKs, reordering the sender saw and out-of-order segments the
receiver got (`ss -tin` of both ends, polled while the connection is open;
per read from the bytes it acknowledged so far), the machine's TCP
counters (/proc/net/netstat, snmp) that moved, and the CPU of the target's
sending process (fetd_tcp, tgtd), of qemu-img and of the whole machine,
with the target's migrations. `--syscalls`: in the last round, the target's write, writev,
sendmsg, sendto and sendfile calls per read by result (bytes rounded up to
a power of two, EAGAIN) and by CPU (perf's syscall exit tracepoints).
`--segments`: in the last round, every data segment on `lo` from
transmission to delivery (net:net_dev_start_xmit and net:netif_receive_skb,
with kernel call chains): the context that sent it (the target's own
send, a resumed send in the same call, ACK processing in softirq, the
pacing timer or TSQ, a retransmission), its CPU, and for each segment
that arrived after one sent later, who sent both and where the late one
waited (decision 0428).
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (scripts/bench.py: the targets and the images)
import rbdthreads  # noqa: E402  (per-thread samples, TCP counters)

IMAGE = 256 << 20   # qemu-img bench wraps around: a small image is read again and again
SS_KEYS = ("retrans", "dsack_dups", "reord_seen", "data_segs_out", "bytes_acked", "bytes_retrans",
           "rcv_ooopack", "reordering", "cwnd", "notsent")
SENDS = ("write", "writev", "sendmsg", "sendto", "sendfile64")


def ss_sample(port: int) -> dict[str, dict[str, int]]:
    """Both ends of each TCP connection to `port` now: "target" (local port
    `port`) and "initiator" ends, their tcp_info counters."""
    return parse_ss(subprocess.run(["ss", "-tinH", "state", "connected",
                                    f"( sport = :{port} or dport = :{port} )"],
                                   capture_output=True, text=True).stdout, port)


def parse_ss(out: str, port: int) -> dict[str, dict[str, int]]:
    """`ss -tinH` output: each end's counters, by "target" (local `port`) or "initiator"."""
    got: dict[str, dict[str, int]] = {}
    end = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            addrs = re.findall(r"\S+:(\d+)", line)
            end = "target" if len(addrs) >= 2 and int(addrs[-2]) == port else "initiator"
            continue
        if end is None:
            continue
        got[end] = rbdthreads.tcp_info(line, SS_KEYS)
        end = None
    return got


class Poller:
    """`ss` of the connection every `every` seconds while a run lasts: the
    last sample of each end before it closed."""

    def __init__(self, port: int, every: float = 0.02) -> None:
        self.port, self.every = port, every
        self.last: dict[str, dict[str, int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            now = ss_sample(self.port)
            if "target" in now and now["target"].get("bytes_acked", 0) >= self.last.get("target", {}).get(
                    "bytes_acked", 0):
                self.last.update(now)
            self.stop.wait(self.every)

    def done(self) -> dict[str, dict[str, int]]:
        self.stop.set()
        self.thread.join()
        return self.last


def sender(t: bench.Ours | bench.Tgtd) -> int:
    """The process that writes the target's iSCSI sockets."""
    return bench.processes(t)["fetd_tcp"] if isinstance(t, bench.Ours) else t.proc.pid


def proc_total(pid: int) -> tuple[int, int]:
    """A process's ns on the CPU and its threads' migrations so far."""
    s = rbdthreads.sample(pid)
    return sum(v[5] for v in s.values()), sum(v[6] for v in s.values())


def one_run(t: bench.Ours | bench.Tgtd, wargs: list[str], count: int, size: int) -> dict[str, float]:
    pid = sender(t)
    ran0, moved0 = proc_total(pid)
    tcp0, whole0 = rbdthreads.tcp_counters(), bench.machine_cpu()
    poll = Poller(t.port)
    secs, qemu = bench.qemu_run(t.url, wargs, count)
    ends = poll.done()
    ran1, moved1 = proc_total(pid)
    tcp1, whole1 = rbdthreads.tcp_counters(), bench.machine_cpu()
    tgt, ini = ends.get("target", {}), ends.get("initiator", {})
    reads = tgt.get("bytes_acked", 0) / (size + 48 * max(1, size // (256 << 10)))   # Data-In headers
    row: dict[str, float] = {"iops": count / secs, "sender_cpu_us": (ran1 - ran0) / 1e3 / count,
                             "initiator_cpu_us": qemu[3] / count * 1e6, "migrations": (moved1 - moved0) / count,
                             # the whole machine's: a segment's delivery on loopback counts where it
                             # was sent from (the sender's call, or a softirq no process is charged for)
                             "machine_busy_us": bench.machine_per_io(whole0, whole1, count, 0.0)["busy_us"]}
    if reads:
        for k in ("retrans", "dsack_dups", "reord_seen", "data_segs_out", "bytes_retrans"):
            row[f"ss.{k}"] = tgt.get(k, 0) / reads
        row["ss.rcv_ooopack"] = ini.get("rcv_ooopack", 0) / reads
        row["ss.reordering"] = tgt.get("reordering", 0)
    for k in ("TcpExt.TCPDSACKRecv", "TcpExt.TCPSACKReorder", "TcpExt.TCPRenoReorder", "TcpExt.TCPTSReorder",
              "TcpExt.TCPOFOQueue", "TcpExt.TCPFastRetrans", "TcpExt.TCPLostRetransmit",
              "TcpExt.TCPSpuriousRTOs", "TcpExt.TCPDSACKUndo", "TcpExt.TCPSackRecovery", "Tcp.RetransSegs",
              "TcpExt.TCPTimeouts", "TcpExt.TCPSlowStartRetrans"):
        row[k] = (tcp1.get(k, 0) - tcp0.get(k, 0)) / count
    return row


def perf_run(t: bench.Ours | bench.Tgtd, wargs: list[str], count: int, events: list[str], out: Path,
             pid: int | None, callchains: bool) -> None:
    """One run of `count` reads while perf records `events` (of process
    `pid`, or machine-wide)."""
    who = ["-p", str(pid)] if pid is not None else ["-a"]
    p = subprocess.Popen(["perf", "record", "-q", *(["-g"] if callchains else []), *who, *events,
                          "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)   # perf has its events open before the run starts
        bench.qemu_run(t.url, wargs, count)
    finally:
        p.send_signal(2)
        p.wait()


def script(data: Path, fields: str) -> list[str]:
    return subprocess.run(["perf", "script", "-i", str(data), "-F", fields], capture_output=True,
                          text=True).stdout.splitlines()


def syscalls(lines: list[str], count: int) -> None:
    """The send calls per read by call and result, and by CPU."""
    by_result: collections.Counter = collections.Counter()
    by_cpu: collections.Counter = collections.Counter()
    sent = 0
    for line in lines:
        m = re.match(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+syscalls:sys_exit_(\w+):\s+(0x[0-9a-f]+)", line)
        if not m:
            continue
        comm, tid, cpu, call, ret = m.groups()
        r = int(ret, 16)
        r = r - (1 << 64) if r >= 1 << 63 else r
        what = "EAGAIN" if r == -11 else f"err{r}" if r < 0 else "0" if r == 0 else f"<={1 << (r - 1).bit_length()}"
        if r > 0:
            sent += r
        by_result[comm, call, what] += 1
        by_cpu[comm, call, int(cpu)] += 1
    print("  send calls per read (thread, call, result)")
    for (comm, call, what), n in sorted(by_result.items()):
        print(f"    {comm:<16} {call:<11} {what:<10} {n / count:.3f}")
    print("  send calls per read by CPU")
    for (comm, call, cpu), n in sorted(by_cpu.items()):
        print(f"    {comm:<16} {call:<11} cpu {cpu}  {n / count:.3f}")
    print(f"  bytes sent per read {sent / count:.0f}")


# the kernel function that tells in which context a segment was sent, the first one met
# from the leaf of its call chain (order matters: a retransmission is also an ACK's work)
CONTEXTS = (("__tcp_retransmit_skb", "retransmit"), ("tcp_retransmit_timer", "retransmit"),
            ("tcp_pace_kick", "pacing timer"), ("tcp_tsq_handler", "TSQ"), ("tcp_tasklet_func", "TSQ"),
            ("tcp_release_cb", "release_cb"), ("__release_sock", "backlog at release"),
            ("tcp_rcv_established", "ACK"), ("tcp_sendmsg_locked", "send call"),
            ("tcp_write_timer", "RTO timer"))


def context(chain: list[str]) -> str:
    for sym, what in CONTEXTS:
        if any(f.startswith(sym) for f in chain):
            return what
    return "other:" + (chain[1] if len(chain) > 1 else "?")


def samples(lines: list[str]) -> list[tuple[str, int, int, float, str, dict[str, str], list[str]]]:
    """perf script -F comm,tid,cpu,time,event,trace,ip,sym: (comm, tid, cpu, time, event, fields, chain)."""
    got = []
    head = None
    chain: list[str] = []
    for line in lines + [""]:
        if not line.strip():
            if head is not None:
                got.append((*head, chain))
            head, chain = None, []
            continue
        m = re.match(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([0-9.]+):\s+(\S+):\s+(.*)", line)
        if m and head is None:
            comm, tid, cpu, ts, event, rest = m.groups()
            fields = dict(re.findall(r"(\w+)=(\S+)", rest))
            head = (comm, int(tid), int(cpu), float(ts), event.rstrip(":"), fields)
            continue
        parts = line.split()
        if head is not None and len(parts) >= 2:
            chain.append(re.sub(r"\+0x[0-9a-f]+$", "", parts[1]))
    return got


def segments(lines: list[str], port: int, count: int) -> None:
    """Each data segment (lo, more than 1,000 bytes) from transmission to
    delivery: who sent them, and which arrived after one sent later."""
    sent: dict[str, list] = {}   # skbaddr -> [time, cpu, comm, context, delivered (time, cpu, comm) or None]
    order: list[list] = []
    delivered: list[list] = []
    retrans: collections.Counter = collections.Counter()
    for comm, tid, cpu, ts, event, f, chain in samples(lines):
        if event == "net:net_dev_start_xmit":
            if f.get("dev") != "lo" or int(f.get("len", 0)) <= 1000:
                continue
            seg: list = [ts, cpu, comm, context(chain), None]
            sent[f["skbaddr"]] = seg
            order.append(seg)
        elif event == "net:netif_receive_skb":
            got = sent.pop(f.get("skbaddr", ""), None)
            if got is not None and got[4] is None:
                got[4] = (ts, cpu, comm)
                delivered.append(got)
        elif event == "tcp:tcp_retransmit_skb" and f.get("sport") == str(port):
            retrans[context(chain[1:]) + f" ({'ksoftirqd' if comm.startswith('ksoftirqd') else comm})"] += 1
    index = {id(s): i for i, s in enumerate(order)}
    kinds = collections.Counter((s[3], "same CPU" if s[4] and s[4][1] == s[1] else "other CPU") for s in order)
    print(f"  data segments per read: {len(order) / count:.2f}")
    for (what, where), n in kinds.most_common():
        print(f"    sent by {what:<20} delivered on the {where:<9} {n / count:.3f}")
    late: collections.Counter = collections.Counter()
    waits = []
    highest = -1
    top: list | None = None
    for s in delivered:
        i = index[id(s)]
        if i < highest and top is not None and s[3] != "retransmit":
            late[(s[3], s[1], s[4][2].split("/")[0] if s[4][2].startswith("ksoftirqd") else "a task's softirq",
                  top[3], top[1])] += 1
            waits.append(s[4][0] - s[0])
        if i > highest:
            highest, top = i, s
    print(f"  segments delivered after one sent later, per read: {sum(late.values()) / count:.3f}")
    for (what, cpu, where, what2, cpu2), n in late.most_common(12):
        print(f"    {what} on cpu {cpu} (delivered by {where}) overtaken by {what2} on cpu {cpu2}: {n / count:.3f}")
    if waits:
        print(f"    the late one's time from send to delivery: median {statistics.median(waits) * 1e6:.0f} us,"
              f" max {max(waits) * 1e6:.0f} us")
    print(f"  retransmissions per read by context: {sum(retrans.values()) / count:.3f}")
    for what, n in retrans.most_common(8):
        print(f"    {what:<40} {n / count:.3f}")


def show(name: str, rows: list[dict[str, float]]) -> None:
    print(f"{name}: per read, median of {len(rows)} rounds [range]")
    for k in rows[0]:
        vals = [r.get(k, 0.0) for r in rows]
        print(f"  {k:<26} {statistics.median(vals):10.3f}  [{min(vals):.3f} .. {max(vals):.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1M", help="each read's size: 4k, 64k, 256k, 1M")
    ap.add_argument("--depth", type=int, default=8, help="the initiator's queue depth")
    ap.add_argument("--count", type=int, default=2000, help="reads per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("ours", "tgtd"), help="measure one target")
    ap.add_argument("--syscalls", action="store_true", help="the target's send calls in an extra run")
    ap.add_argument("--segments", action="store_true", help="every data segment's path in an extra run")
    args = ap.parse_args()
    wargs = rbdthreads.qemu_args(args.size, args.depth, True)
    size = bench.size_of(wargs)
    with tempfile.TemporaryDirectory(prefix="tcpsend") as tmp:
        work = Path(tmp)
        targets: list[bench.Ours | bench.Tgtd] = []
        try:
            for kind, name in ((bench.Ours, "ours"), (bench.Tgtd, "tgtd")):
                if args.only in (None, name):
                    img = bench.filled_image(Path("/dev/shm") / f"tcpsend-{name}-{os.getpid()}.img", IMAGE)
                    targets.append(kind(work, img, False))
            rows: dict[str, list] = {t.name: [] for t in targets}
            for t in targets:
                bench.qemu_run(t.url, wargs, max(1, args.count // 4))   # warm up
            for r in range(args.rounds):
                for t in (targets if r % 2 == 0 else targets[::-1]):
                    rows[t.name].append(one_run(t, wargs, args.count, size))
                    print(f"{t.name} round {r}: {rows[t.name][-1]['iops']:.0f} IOPS,"
                          f" retrans {rows[t.name][-1].get('ss.retrans', 0):.3f} per read", flush=True)
            for name, got in rows.items():
                show(name, got)
            for t in targets:
                if args.syscalls:
                    data = work / "calls.data"
                    perf_run(t, wargs, args.count,
                             [a for c in SENDS for a in ("-e", f"syscalls:sys_exit_{c}")], data, sender(t), False)
                    print(f"{t.name}: send calls ({args.count} reads)")
                    syscalls(script(data, "comm,tid,cpu,event,trace"), args.count)
                if args.segments:
                    data = work / "segs.data"
                    perf_run(t, wargs, args.count,
                             ["-e", "net:net_dev_start_xmit", "-e", "net:netif_receive_skb",
                              "-e", "tcp:tcp_retransmit_skb"], data, None, True)
                    print(f"{t.name}: data segments on lo ({args.count} reads)")
                    segments(script(data, "comm,tid,cpu,time,event,trace,ip,sym"), t.port, args.count)
        finally:
            for t in targets:
                t.stop()


if __name__ == "__main__":
    main()
