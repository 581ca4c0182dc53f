#!/usr/bin/env python3
"""Benchmark this target against tgtd, in the same run, with the same initiator.

    scripts/bench.py [--compare-tgtd] [--runs 5] [--scale 1.0] [--out bench.json]
    scripts/bench.py --loopback        # the STML alone, through the loopback front end
    scripts/bench.py --compare-tgtd --cpu   # also CPU and sleeps per I/O, per process
    scripts/bench.py --compare-tgtd --thin  # the default thin LUN, fragmented first
    scripts/bench.py --compare-tgtd --rbd   # RBD images: ours against tgtd's bs_rbd (tgt-rbd)
    scripts/bench.py --vhost           # a Linux guest: fetd_vhost against QEMU's own virtio-scsi
    scripts/bench.py --trace           # 4 KiB QD16 reads with and without `run --trace`
    scripts/bench.py --compare-tgtd --sessions 1,2,4,8,16,32,64   # the scaling curve

Both targets get an equivalent LUN: a 1 GiB file in /dev/shm (same backing
kind and size), filled with data first, and ours thick (no logical block
provisioning, as tgtd). `--thin` measures the default thin LUN as a VM leaves
it: a sparse file on disk (beside the default data dir's kind of file
system), fragmented by 50,000 scattered 4 KiB writes through the target,
then read in 64 KiB pieces; tgtd gets the same sparse file with its thin
provisioning turned on and the same writes. (qemu would precede each read
with GET LBA STATUS if the LUN reported an optimal unmap granularity of 4 KiB
or more; neither does, decision 0820.) Workloads run through qemu-img bench
(qemu's iSCSI driver, libiscsi), each target first given one unmeasured
pass of a quarter of the I/Os, then rounds in the order A B, B A, A B, ...
so that neither drift on a shared machine nor going first favours one; the
table shows medians of per-round ratios to tgtd. Nothing is installed:
`apt-get install tgt qemu-utils qemu-block-extra` first. A PNG chart is
written when matplotlib is importable (`pip install -e '.[bench]'`).

--rbd: each target gets an RBD image of RBD_SIZE filled with data (thick
for us again), ours through librbd (backends/rbd.py), tgtd's through its
rbd backing store (`apt-get install tgt-rbd`; librbd's cache off, as
ours: decision 0411), on the cluster --ceph-conf
names or else on a throwaway single-node one (tests/support/ceph.py, which
needs ceph-mon ceph-osd ceph-mgr). The goals are issue 23's.

`--vhost` boots one Linux guest (tests/support/guest.py: Debian's cloud
kernel, a busybox initramfs; KVM when it works, else TCG) with two disks
of the same kind, a filled file in /dev/shm each: one on fetd_vhost
(vhost-user-scsi-pci), one on QEMU's own virtio-scsi-pci + scsi-hd. In the
guest, scripts/guestio.c (built static with cc) runs sequential 1 MiB
O_DIRECT reads and writes and 4 KiB random reads, one I/O at a time, on
each disk in turn (A B, then B A); the table shows medians of per-round
ratios. Needs qemu-system-x86, busybox-static and a C compiler with a
static libc (gcc, libc6-dev).

`--trace` measures what recording a trace costs (issue 22's goal: at most
10% of 4 KiB QD16 IOPS): two of our targets, each on its copy of one
filled image (a file is served by one target at a time), one run
with `--trace` (the trace file in the work directory, on disk), the same
4 KiB QD16 reads on each, alternating A B A B; the table shows the median
IOPS of each and the median of the per-round ratios, and the size of the
trace.

`--sessions N,N,...` draws the scaling curve (issue 25; `--scale` keeps its
meaning and multiplies the length of each run, 2 s at 1.0): for each count,
that many concurrent sessions each keep 4 random reads in flight, 4 KiB and
then 64 KiB, all on LUN 0 and then one LUN per session. Each target gets as
many LUNs as the largest count, each a filled 16 MiB file in /dev/shm (ours
thick). The load comes from scripts/sessionload.c (built with cc against
libiscsi: `apt-get install gcc libiscsi-dev`), one process driving every
session with libiscsi's async calls, so that the initiator takes little of a
small machine's CPU (qemu-img bench is one session per process). Reported
per count: aggregate IOPS, p50/p99 latency, CPU per I/O of each process (the
initiator's too), RSS with every session logged in, and the ratios to tgtd;
the PNG shows the IOPS ratio against the session count.
"""
from __future__ import annotations

import argparse
import hmac
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

IQN = "iqn.2026-11.org.scsi-target:bench"
TGT_IQN = "iqn.2026-11.org.scsi-target:bench-tgtd"
SIZE = 1 << 30
ROOT = Path(__file__).resolve().parent.parent   # the tree measured: our processes start from it

# name, qemu-img bench arguments, I/O count at scale 1.0 (about two seconds on tgtd)
WORKLOADS = [
    ("4k-read-qd1", ["-d", "1", "-s", "4k"], 20000),
    ("4k-read-qd16", ["-d", "16", "-s", "4k"], 100000),
    ("4k-write-qd16", ["-d", "16", "-s", "4k", "-w"], 100000),
    ("64k-read-qd8", ["-d", "8", "-s", "64k"], 40000),
    ("1m-seqread-qd8", ["-d", "8", "-s", "1M"], 2500),
    ("1m-seqwrite-qd8", ["-d", "8", "-s", "1M", "-w"], 2000),
]

# the default thin LUN after a VM's scattered writes (--thin): 4 KiB writes every 20 KiB
FRAGMENT = ["-w", "-d", "16", "-s", "4k", "-S", "20k"]
FRAGMENT_WRITES = 50000
THIN_WORKLOADS = [("64k-read-qd8-thin", ["-d", "8", "-s", "64k"], 20000)]

# the ratio each workload should reach (issue 25; issue 7's were lower); at QD1 a ratio of
# 0.8 is a latency of 1.25x tgtd's
GOALS = {"4k-read-qd1": 0.8, "4k-read-qd16": 0.9, "4k-write-qd16": 0.9, "64k-read-qd8": 1.0,
         "1m-seqread-qd8": 1.5, "1m-seqwrite-qd8": 1.3, "64k-read-qd8-thin": 0.8}


# --rbd: issue 23's goals, smaller images (a memstore OSD keeps them in RAM)
RBD_GOALS = {"4k-read-qd16": 0.8, "4k-write-qd16": 0.8, "64k-read-qd8": 1.0, "1m-seqread-qd8": 1.0,
             "1m-seqwrite-qd8": 1.0}
RBD_SIZE = 512 << 20
# each workload's unmeasured first pass per target, as a share of its I/O count
WARMUP = 0.25


def filled_image(path: Path, size: int = SIZE) -> Path:
    """A size-byte image holding non-zero data, so reads move real pages."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    return path


class RbdImages:
    """Filled RBD images for both targets, on the cluster `conf` names or on
    a throwaway one started (and stopped) here."""

    def __init__(self, conf: str | None, keyring: str | None, shm: Path) -> None:
        self.cluster = None
        self.shm = shm
        if conf is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from support.ceph import Cluster
            self.cluster = Cluster(memstore_bytes=4 << 30).start()
            conf, keyring = str(self.cluster.conf), str(self.cluster.keyring)
        self.conf, self.keyring = conf, keyring
        self.made: list[str] = []
        # tgtd's librbd runs with its cache off, as ours does (backends/librbd.py). With
        # Pacific's default cache, once an initiator has sent one SYNCHRONIZE CACHE
        # (qemu does when it closes a LUN it wrote to) librbd acknowledges writes
        # before the OSD has them (write-around, up to 24 MiB in flight): tgtd's 4 KiB
        # QD16 writes then ran twice as fast on acknowledgements no gateway may give
        # (decision 0411). The options go in tgtd's CEPH_ARGS (tgtd_env), which
        # librados ranks above every section of a conf file: a `[client]` section
        # would lose to a `[client.admin]` one (tgtd's user) in the cluster's conf
        self.tgtd_options = {"rbd_cache": "false"}
        # each target's librbd answers on an admin socket of its own (--cpu: its perf
        # counters): tgtd's through CEPH_ARGS, ours through a copy of the conf whose
        # [client.admin] section (our user) names it; the conf's own `admin socket`
        # is one path for every client of a user, which the first one takes
        self.dir = Path(tempfile.mkdtemp(prefix="benchrbd", dir=shm))
        self.sockets = {"tgtd": self.dir / "tgtd.asok", "scsi-target": self.dir / "ours.asok"}
        self.tgtd_options["admin_socket"] = str(self.sockets["tgtd"])
        self.ours_conf = self.dir / "ours.conf"
        self.ours_conf.write_text(Path(conf).read_text()
                                  + f"\n[client.admin]\nadmin socket = {self.sockets['scsi-target']}\n")

    def tgtd_env(self) -> dict[str, str]:
        """tgtd's environment: its librbd options (and the keyring) in CEPH_ARGS,
        after whatever CEPH_ARGS this process has."""
        args = [os.environ.get("CEPH_ARGS", ""), *(f"--{k}={v}" for k, v in self.tgtd_options.items()),
                *([f"--keyring={self.keyring}"] if self.keyring else [])]
        return {**os.environ, "CEPH_ARGS": " ".join(a for a in args if a)}

    def rbd(self, *args: str) -> None:
        keyring = ["--keyring", self.keyring] if self.keyring else []
        subprocess.run(["rbd", "-c", self.conf, *keyring, *args], check=True, capture_output=True)

    def image(self, name: str) -> str:
        """POOL/IMAGE holding RBD_SIZE bytes of data."""
        spec = f"rbd/{name}-{os.getpid()}"
        src = filled_image(self.shm / f"{name}-{os.getpid()}.img", RBD_SIZE)
        try:
            self.rbd("import", str(src), spec)
        finally:
            src.unlink()
        self.made.append(spec)
        return spec

    def close(self) -> None:
        for spec in self.made:
            subprocess.run(["rbd", "-c", self.conf, "rm", "--no-progress", spec], capture_output=True)
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def daemons(self) -> dict[str, int]:
        """The throwaway cluster's daemons by program (none on --ceph-conf's cluster)."""
        if self.cluster is None:
            return {}
        return {f"ceph-{name}": p.pid for name, p in self.cluster.procs.items()}

    def counters(self, target: str) -> dict[str, dict[str, float]]:
        """Perf counters that say what a target asked of the cluster: the OSD's
        (throwaway cluster only) and the target's own librbd/librados client's."""
        out = {}
        if self.cluster is not None:
            out["osd"] = perf_dump(self.cluster.dir / "run" / "osd.0.asok")
        out["client"] = perf_dump(self.sockets[target])
        return out


# --rbd --cpu: the perf counters kept (per I/O, nonzero only), by section; a messenger's
# workers are summed as "msgr", every librbd image's counters as "librbd"
COUNTER_SECTIONS = ("osd", "objecter", "librbd", "msgr")


def perf_dump(sock: Path) -> dict[str, float]:
    """A Ceph daemon's or client's perf counters through its admin socket (the
    `ceph daemon` protocol: a JSON command ended by a NUL, a 4-byte big-endian
    length, the JSON answer), as SECTION.NAME -> number (counts, bytes, a
    thread's busy seconds; no averages); {} when nothing answers there."""
    import socket
    import struct
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(b'{"prefix": "perf dump"}\0')
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        dump = json.loads(data[4:])
    except (OSError, ValueError):
        return {}
    flat: dict[str, float] = {}
    for section, values in dump.items():
        name = ("msgr" if section.startswith("AsyncMessenger::Worker")
                else "librbd" if section.startswith("librbd-") else section)
        if name not in COUNTER_SECTIONS:
            continue
        for key, v in values.items():
            if isinstance(v, (int, float)):   # counts, bytes, seconds (averages left out)
                flat[f"{name}.{key}"] = flat.get(f"{name}.{key}", 0) + v
    return flat


def counters_per_io(before: dict[str, dict], after: dict[str, dict], count: int) -> dict[str, dict]:
    """What changed in each counter dump over a run, per I/O (nonzero only)."""
    return {who: {k: d for k, v in after[who].items() if (d := (v - b.get(k, 0)) / count)}
            for who, b in before.items() if who in after}


def sparse_image(directory: Path, name: str) -> Path:
    """A SIZE-byte file with no blocks allocated, as the default LUN starts."""
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def extents(path: Path) -> int:
    """Data extents of a sparse file (how fragmented the writes left it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n, pos, end = 0, 0, os.fstat(fd).st_size
        while pos < end:
            try:
                pos = os.lseek(fd, os.lseek(fd, pos, os.SEEK_DATA), os.SEEK_HOLE)
            except OSError:
                break   # no data after pos
            n += 1
        return n
    finally:
        os.close(fd)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ours:
    name = "scsi-target"

    def __init__(self, work: Path, img: Path | None, thin: bool, rbd: RbdImages | None = None,
                 extra: tuple[str, ...] = (), name: str = "ours", more: list[Path] | None = None) -> None:
        self.port = free_port()
        self.img = img
        self.more = more or []    # further LUNs (--sessions), thick files like img
        if rbd is not None:
            keyring = f",keyring={rbd.keyring}" if rbd.keyring else ""
            lun = f"rbd:{rbd.image('bench-ours')},conf={rbd.ours_conf}{keyring},thick"
        else:
            lun = f"file:{self.img}" + ("" if thin else ",thick")
        luns = ["--lun", lun] + [a for m in self.more for a in ("--lun", f"file:{m},thick")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scsi_target", "run", "--data-dir", str(work / name), "--iqn", IQN,
             *luns, "--portal", f"127.0.0.1:{self.port}",
             "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT)
        assert self.proc.stdout is not None
        # ready once `run` says so: attached to the STML and listening
        said = []
        for line in self.proc.stdout:
            said.append(line)
            if line.startswith("Ready. "):
                break
        else:
            self.stop()   # nothing left behind: no process, no image in /dev/shm
            raise RuntimeError("scsi-target did not start:\n" + "".join(said[-20:]))
        # keep reading its output so a chatty target never blocks on a full pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.urls = [f"iscsi://127.0.0.1:{self.port}/{IQN}/{n}" for n in range(1 + len(self.more))]
        self.url = self.urls[0]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever the supervisor left behind
        except ProcessLookupError:
            pass
        self.proc.wait()
        for img in [self.img, *self.more]:
            if img is not None:
                img.unlink(missing_ok=True)


class Tgtd:
    name = "tgtd"

    def __init__(self, work: Path, img: Path | None, thin: bool, rbd: RbdImages | None = None,
                 more: list[Path] | None = None) -> None:
        self.port = free_port()
        self.ctl = 3000 + os.getpid() % 2000   # tgtd's control "port" is a small socket index
        self.img = img
        self.more = more or []
        # tgt-rbd's backing store (its librbd options in its environment), or the file
        lun = (["--bstype", "rbd", "-b", rbd.image("bench-tgtd"), "--bsopts", f"conf={rbd.conf}"]
               if rbd is not None else ["-b", str(self.img)])
        self.proc = subprocess.Popen(["tgtd", "-f", "-C", str(self.ctl), "--iscsi",
                                      f"portal=127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=rbd.tgtd_env() if rbd is not None else None)
        adm = ["tgtadm", "-C", str(self.ctl), "--lld", "iscsi"]
        for _ in range(50):
            if subprocess.run(adm + ["--op", "show", "--mode", "target"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        for args in (["--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN],
                     ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", *lun],
                     *([["--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                         "--params", "thin_provisioning=1"]] if thin else []),
                     *[["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", str(2 + i), "-b", str(m)]
                       for i, m in enumerate(self.more)],
                     ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]):
            subprocess.run(adm + args, check=True, capture_output=True)
        # LUN 0 is tgtd's controller: the disks are 1, 2, ...
        self.urls = [f"iscsi://127.0.0.1:{self.port}/{TGT_IQN}/{1 + n}" for n in range(1 + len(self.more))]
        self.url = self.urls[0]

    def stop(self) -> None:
        self.proc.kill()  # tgtd ignores SIGTERM
        self.proc.wait()
        for img in [self.img, *self.more]:
            if img is not None:
                img.unlink(missing_ok=True)


def processes(t: Ours | Tgtd) -> dict[str, int]:
    """The target's processes by name: tgtd, or our STML and front ends (the
    session our supervisor leads, named by the module each one runs)."""
    if isinstance(t, Tgtd):
        return {"tgtd": t.proc.pid}
    found = {}
    for entry in os.listdir("/proc"):
        try:
            # the session, not the process group: run puts its children in groups of their own
            if not entry.isdigit() or os.getsid(int(entry)) != t.proc.pid or int(entry) == t.proc.pid:
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue   # gone meanwhile
        found[argv[argv.index(b"-m") + 1].decode() if b"-m" in argv else entry] = int(entry)
    return found


def usage(pid: int) -> tuple[float, float, int, float]:
    """CPU seconds in user space and in the kernel (all threads, in clock
    ticks), how often its threads went to sleep (voluntary context switches),
    and the seconds its live threads ran (schedstat: to the nanosecond, where
    ticks are 10 ms, too coarse for a short run's per-I/O share)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    sleeps, ran = 0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    sleeps += int(line.split()[1])
            ran += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except OSError:
            continue   # a thread that ended meanwhile
    return int(fields[11]) / hz, int(fields[12]) / hz, sleeps, ran / 1e9


def per_io(before: dict[str, tuple], after: dict[str, tuple], count: int) -> dict[str, dict]:
    """What each process spent on one I/O of a run, from usage() before and after."""
    return {name: {"user_us": (after[name][0] - b[0]) / count * 1e6,
                   "system_us": (after[name][1] - b[1]) / count * 1e6,
                   "sleeps": (after[name][2] - b[2]) / count,
                   "cpu_us": (after[name][3] - b[3]) / count * 1e6}
            for name, b in before.items()}


# /proc/stat's first line: CPU seconds of every CPU so far, in these columns
STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu() -> dict[str, float]:
    """The whole machine's CPU seconds so far by kind (/proc/stat), every process's."""
    ticks = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:1 + len(STAT_COLUMNS)]
    hz = os.sysconf("SC_CLK_TCK")
    return {k: int(v) / hz for k, v in zip(STAT_COLUMNS, ticks)}


def machine_per_io(before: dict[str, float], after: dict[str, float], count: int,
                   counted_us: float) -> dict[str, float]:
    """The whole machine's CPU per I/O over a run: busy in all (user, nice,
    system, interrupts), its idle share, and `others_us`, what no process
    counted here (`counted_us` per I/O) ran: other work on a shared machine
    and the kernel's interrupt time. With no idle CPU, the IOPS are the CPUs
    divided by busy_us; others' CPU is paid per second, so per I/O it grows
    as IOPS fall."""
    d = {k: after[k] - before[k] for k in STAT_COLUMNS}
    busy = sum(v for k, v in d.items() if k not in ("idle", "iowait"))
    total = busy + d["idle"] + d["iowait"]
    return {"busy_us": busy / count * 1e6, "nice_us": d["nice"] / count * 1e6,
            "irq_us": (d["irq"] + d["softirq"]) / count * 1e6, "others_us": busy / count * 1e6 - counted_us,
            "idle_share": (d["idle"] + d["iowait"]) / total if total else 0.0}


def qemu_bench(url: str, args: list[str], count: int) -> float:
    """Seconds for `count` I/Os."""
    return qemu_run(url, args, count)[0]


def qemu_run(url: str, args: list[str], count: int) -> tuple[float, tuple[float, float, int, float]]:
    """Seconds for `count` I/Os, and what qemu-img (the initiator) spent on
    them, as usage() says it: its own rusage, from wait4."""
    p = subprocess.Popen(["qemu-img", "bench", "-f", "raw", "-c", str(count), *args, url],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    timer = threading.Timer(600, p.kill)
    timer.start()
    try:
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        timer.cancel()
        p.stdout.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"qemu-img bench failed on {url}: {out}")
    return float(m.group(1)), (ru.ru_utime, ru.ru_stime, ru.ru_nvcsw, ru.ru_utime + ru.ru_stime)


def softirq_threads() -> dict[str, int]:
    """The kernel's ksoftirqd/N threads: loopback TCP's receive work runs in
    them when the machine is busy, in no process of ours."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().startswith("ksoftirqd/"):
                found[Path(f"/proc/{entry}/comm").read_text().strip()] = int(entry)
        except OSError:
            continue
    return found


def schedule(targets: list, runs: int, warm_up: Callable[[Any], object]) -> Iterator:
    """The targets in the order their measured runs go, after warming each up:
    the first run after a workload change pays for what it changed (the OSD's
    buffers for a new I/O size, the targets' own), and who goes first in a
    round alternates (A B, B A, ...; decision 0423)."""
    for t in targets:
        warm_up(t)
    for r in range(runs):
        yield from (targets if r % 2 == 0 else targets[::-1])


def measured(t: Ours | Tgtd, rbd: RbdImages | None, wargs: list[str], n: int) -> tuple[float, dict]:
    """One qemu-img run of n I/Os on t: its seconds, and what it cost per I/O,
    counted: CPU and sleeps of each of t's processes, of the initiator, of
    the cluster's daemons (--rbd) and of the whole machine (every process:
    with no idle CPU, the IOPS are the CPUs divided by this), and (--rbd)
    what the OSD and t's librbd counted."""
    pids = {**processes(t), **({"supervisor": t.proc.pid} if isinstance(t, Ours) else {}),
            **(rbd.daemons() if rbd is not None else {}), **softirq_threads()}
    stats = rbd.counters(t.name) if rbd is not None else {}
    before, whole = {name: usage(pid) for name, pid in pids.items()}, machine_cpu()
    secs, initiator = qemu_run(t.url, wargs, n)
    after, whole_after = {name: usage(pid) for name, pid in pids.items()}, machine_cpu()
    cpu = per_io({**before, "initiator": (0.0, 0.0, 0, 0.0)}, {**after, "initiator": initiator}, n)
    cpu["machine"] = machine_per_io(whole, whole_after, n, sum(c["cpu_us"] for c in cpu.values()))
    counters = counters_per_io(stats, rbd.counters(t.name), n) if rbd is not None else {}
    return secs, {"cpu": cpu, "counters": counters}


def medians(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each WHO.KEY's median over the rounds (0 in a round that lacks it)."""
    return {who: {k: statistics.median(r.get(who, {}).get(k, 0) for r in rounds)
                  for k in sorted({k for r in rounds for k in r.get(who, {})})}
            for who in dict.fromkeys(w for r in rounds for w in r)}


def size_of(args: list[str]) -> int:
    s = args[args.index("-s") + 1]
    return int(s[:-1]) * {"k": 1024, "M": 1 << 20}[s[-1]]


def start_targets(args: argparse.Namespace, work: Path, rbd: RbdImages | None = None) -> list[Ours | Tgtd]:
    """Our target, and tgtd with --compare-tgtd, each on an equal LUN: a filled
    1 GiB file in /dev/shm (ours thick), with --thin a sparse one on disk, with
    --rbd a filled RBD image."""
    kinds: list[type[Ours] | type[Tgtd]] = [Ours]
    if args.compare_tgtd:
        if not shutil.which("tgtd"):
            sys.exit("bench: tgtd not found (apt-get install tgt)")
        kinds.append(Tgtd)
    targets: list[Ours | Tgtd] = []
    try:
        for kind in kinds:
            if rbd is not None:
                targets.append(kind(work, None, False, rbd))
                continue
            name = f"bench-{kind.__name__.lower()}-{os.getpid()}.img"
            img = sparse_image(work, name) if args.thin else filled_image(args.shm_dir / name)
            try:
                targets.append(kind(work, img, args.thin))
            except BaseException:
                img.unlink(missing_ok=True)
                raise
    except BaseException:
        for t in targets:
            t.stop()
        raise
    return targets


def fragment(targets: list[Ours | Tgtd], args: argparse.Namespace, results: dict) -> None:
    """The same scattered 4 KiB writes through each target; how many extents they left."""
    n = max(100, int(FRAGMENT_WRITES * args.scale))
    results["fragment"] = {"writes": n, "args": FRAGMENT}
    for t in targets:
        qemu_bench(t.url, FRAGMENT, n)
        assert t.img is not None, "fragment runs on file LUNs only"
        results["fragment"][t.name] = {"extents": extents(t.img)}
    print("fragmented: " + ", ".join(f"{t.name} {results['fragment'][t.name]['extents']} extents"
                                     for t in targets), flush=True)


def run_iscsi(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench", dir=args.thin_dir if args.thin else None))
    if args.rbd and args.compare_tgtd and not Path("/usr/lib/tgt/backing-store/bs_rbd.so").exists():
        sys.exit("bench: tgtd has no rbd backing store (apt-get install tgt-rbd)")
    rbd = RbdImages(args.ceph_conf, args.ceph_keyring, args.shm_dir) if args.rbd else None
    try:
        targets = start_targets(args, work, rbd)
    except BaseException:
        if rbd is not None:
            rbd.close()
        raise
    results: dict = {"workloads": {}, "runs": args.runs,
                     "lun": "rbd" if args.rbd else "thin" if args.thin else "thick",
                     "method": {"warm_up": WARMUP, "order": "alternating"}}   # (decision 0423)
    goals = RBD_GOALS if args.rbd else GOALS
    try:
        if args.thin:
            fragment(targets, args, results)
        for name, wargs, count in (THIN_WORKLOADS if args.thin else WORKLOADS):
            n = max(100, int(count * args.scale))
            per: dict[str, list[float]] = {t.name: [] for t in targets}
            cpu: dict[str, list[dict]] = {t.name: [] for t in targets}
            counted: dict[str, list[dict]] = {t.name: [] for t in targets}
            warm = max(100, int(n * WARMUP))
            for t in schedule(targets, args.runs, lambda t: qemu_bench(t.url, wargs, warm)):
                if args.cpu:
                    secs, spent = measured(t, rbd, wargs, n)
                    cpu[t.name].append(spent["cpu"])
                    counted[t.name].append(spent["counters"])
                else:
                    secs = qemu_bench(t.url, wargs, n)
                per[t.name].append(n / secs)
            row: dict[str, Any] = {t: {"iops": statistics.median(v), "mbps": statistics.median(v) * size_of(wargs) / 1e6,
                       "samples": v} for t, v in per.items()}
            if args.cpu:
                for who, rounds in cpu.items():
                    row[who]["cpu"] = medians(rounds)
                    if rbd is not None:
                        row[who]["counters"] = medians(counted[who])
            if args.compare_tgtd:
                ratios = [a / b for a, b in zip(per["scsi-target"], per["tgtd"])]
                row["ratio"] = statistics.median(ratios)
            results["workloads"][name] = row
            print_row(name, row, args.compare_tgtd, goals)
            if args.cpu:
                print_cpu(row)
    finally:
        for t in targets:
            t.stop()
        shutil.rmtree(work, ignore_errors=True)
        if rbd is not None:
            rbd.close()
    return results


# --sessions: name, I/O size, queue depth per session; each LUN a filled SESSION_LUN_SIZE
# file in /dev/shm (as many as the largest session count, for each target); each run
# lasts SESSION_SECONDS at --scale 1.0
SESSION_WORKLOADS = [("4k-randread-qd4", 4096, 4), ("64k-randread-qd4", 65536, 4)]
SESSION_SPREADS = ("1-lun", "n-luns")   # every session on LUN 0; session i on LUN i
SESSION_LUN_SIZE = 16 << 20
SESSION_SECONDS = 2.0
SESSION_GOALS = {"4k-randread-qd4": 0.8}   # issue 25: at every session count, p99 <= 2x


def sessionload(work: Path) -> Path:
    """scripts/sessionload.c built against libiscsi: many sessions from one process."""
    cc = shutil.which("cc")
    if cc is None or not Path("/usr/include/iscsi/iscsi.h").exists():
        sys.exit("bench: --sessions needs a C compiler and libiscsi's headers (apt-get install gcc libiscsi-dev)")
    out = work / "sessionload"
    p = subprocess.run([cc, "-O2", "-o", str(out), str(ROOT / "scripts" / "sessionload.c"), "-liscsi"],
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"bench: cannot build sessionload: {p.stderr.strip()}")
    return out


def rss_kib(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


def load_run(tool: Path, t: Ours | Tgtd, urls: list[str], seconds: float, qd: int, size: int) -> dict:
    """One run of sessionload: every session logs in first, then I/O for
    `seconds`; CPU per I/O of each target process (and the initiator's) over
    the I/O only, RSS while every session is still logged in."""
    p = subprocess.Popen([str(tool), f"{seconds:g}", str(qd), str(size), *urls], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    try:
        if p.stdout.readline() != "ready\n":
            raise RuntimeError(f"sessionload did not log in to {t.name}: {p.stderr.read()}")
        pids = {**processes(t), "initiator": p.pid}
        before = {name: usage(pid) for name, pid in pids.items()}
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline()
        after = {name: usage(pid) for name, pid in pids.items()}
        if not line.startswith("{"):
            raise RuntimeError(f"sessionload failed on {t.name}: {line}{p.stderr.read()}")
        got = json.loads(line)
        if got["errors"] or not got["ios"]:
            raise RuntimeError(f"sessionload on {t.name}: {got['errors']} of {got['ios']} reads failed")
        got["rss_kib"] = {name: rss_kib(pid) for name, pid in pids.items() if name != "initiator"}
        got["cpu"] = per_io(before, after, got["ios"])
        p.stdin.write("exit\n")
        p.stdin.flush()
        p.wait(60)
        return got
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def run_sessions(args: argparse.Namespace) -> dict:
    """The scaling curve: 1 to 64 concurrent sessions, on one LUN or on as
    many LUNs as sessions, ours and tgtd alternating, each round a run of
    each."""
    counts = sorted(set(args.sessions))
    work = Path(tempfile.mkdtemp(prefix="bench"))
    tool = sessionload(work)
    kinds: list[type[Ours] | type[Tgtd]] = [Ours, Tgtd] if args.compare_tgtd else [Ours]
    if args.compare_tgtd and not shutil.which("tgtd"):
        sys.exit("bench: tgtd not found (apt-get install tgt)")
    images: list[Path] = []
    targets: list[Ours | Tgtd] = []
    seconds = max(0.1, SESSION_SECONDS * args.scale)
    results: dict = {"sessions": {}, "runs": args.runs, "lun": "thick", "seconds_per_run": seconds,
                     "lun_bytes": SESSION_LUN_SIZE, "session_counts": counts}
    try:
        for kind in kinds:
            imgs = [filled_image(args.shm_dir / f"bench-{kind.__name__.lower()}-{os.getpid()}-{i}.img",
                                 SESSION_LUN_SIZE) for i in range(counts[-1])]
            images += imgs
            targets.append(kind(work, imgs[0], False, more=imgs[1:]))
        results["rss_kib_idle"] = {t.name: {name: rss_kib(pid) for name, pid in processes(t).items()}
                                   for t in targets}
        for wname, size, qd in SESSION_WORKLOADS:
            for spread in SESSION_SPREADS:
                rows = results["sessions"].setdefault(wname, {}).setdefault(spread, {})
                for n in counts:
                    if spread == "n-luns" and n == 1:
                        continue    # the same as 1-lun
                    got: dict[str, list[dict]] = {t.name: [] for t in targets}
                    for _ in range(args.runs):
                        for t in targets:
                            urls = [t.urls[i if spread == "n-luns" else 0] for i in range(n)]
                            got[t.name].append(load_run(tool, t, urls, seconds, qd, size))
                    row = session_row(got)
                    rows[str(n)] = row
                    print_session_row(wname, spread, n, row)
        # memory: RSS with the most sessions logged in (the largest of every workload's
        # runs) against RSS before the first session; the growth per session is at most this
        top = [r for spreads in results["sessions"].values() for rows in spreads.values()
               for n, r in rows.items() if int(n) == counts[-1]]
        results["rss_kib_at_most_sessions"] = {
            t.name: {p: max(r[t.name]["rss_kib"][p] for r in top) for p in results["rss_kib_idle"][t.name]}
            for t in targets}
        for t in targets:
            print(f"RSS at {counts[-1]} sessions, {t.name}: " + ", ".join(
                f"{p} {kib / 1024:.1f} MiB (+{(kib - results['rss_kib_idle'][t.name][p]) / 1024 / counts[-1]:.2f}"
                " MiB per session)" for p, kib in results["rss_kib_at_most_sessions"][t.name].items()), flush=True)
    finally:
        for t in targets:
            t.stop()
        for img in images:
            img.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return results


def session_row(got: dict[str, list[dict]]) -> dict:
    """Medians over the rounds; ratios ours/tgtd per round, then their median."""
    row: dict = {}
    for name, runs in got.items():
        iops = [r["ios"] / r["seconds"] for r in runs]
        row[name] = {"iops": statistics.median(iops), "samples": iops,
                     "p50_us": statistics.median(r["p50_us"] for r in runs),
                     "p99_us": statistics.median(r["p99_us"] for r in runs),
                     "cpu": {p: {k: statistics.median(r["cpu"][p][k] for r in runs) for k in runs[0]["cpu"][p]}
                             for p in runs[0]["cpu"]},
                     "rss_kib": {p: max(r["rss_kib"][p] for r in runs) for p in runs[0]["rss_kib"]}}
    if "tgtd" in got:
        ours, tgt = got["scsi-target"], got["tgtd"]
        row["ratio"] = statistics.median(a["ios"] / a["seconds"] / (b["ios"] / b["seconds"])
                                         for a, b in zip(ours, tgt))
        row["p99_ratio"] = statistics.median(a["p99_us"] / max(1, b["p99_us"]) for a, b in zip(ours, tgt))
    return row


def print_session_row(wname: str, spread: str, n: int, row: dict) -> None:
    def part(name: str) -> str:
        r = row[name]
        cpu = ", ".join(f"{p} {c['user_us']:.0f}+{c['system_us']:.0f}" for p, c in r["cpu"].items()
                        if p != "initiator")
        return (f"{name} {r['iops']:8.0f} IOPS p50 {r['p50_us']:6.0f} p99 {r['p99_us']:6.0f} us "
                f"({cpu} us/IO)")
    line = f"{wname:17s} {spread:6s} {n:3d} sessions: " + part("scsi-target")
    if "ratio" in row:
        line += f" | {part('tgtd')} | ratio {row['ratio']:.2f}, p99 {row['p99_ratio']:.2f}x"
    print(line, flush=True)


def session_chart(results: dict, path: Path) -> None:
    """Ratio to tgtd against session count, a line per workload and spread."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed; no chart written")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for wname, spreads in results["sessions"].items():
        for spread, rows in spreads.items():
            ns = sorted(int(n) for n in rows)
            if spread == "n-luns" and "1" in spreads.get("1-lun", {}):
                ns = [1] + ns     # one session on one LUN is both spreads' first point
                rows = {"1": spreads["1-lun"]["1"], **rows}
            ax.plot(ns, [rows[str(n)]["ratio"] for n in ns], marker="o", label=f"{wname}, {spread}")
    for wname, goal in SESSION_GOALS.items():
        ax.axhline(goal, color="black", linewidth=1, linestyle=":", label=f"goal {wname}")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("scsi-target / tgtd IOPS (median of rounds)")
    ax.set_title("Aggregate IOPS relative to tgtd, same machine, same run")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart: {path}")


def run_loopback(args: argparse.Namespace) -> dict:
    """The STML alone: the loopback client keeps QD commands in flight."""
    import struct
    sys.path.insert(0, str(ROOT))
    from fetd_loopback import LoopbackClient
    work = Path(tempfile.mkdtemp(prefix="bench"))
    proc = subprocess.Popen([sys.executable, "-m", "stml", "--data-dir", str(work), "--lun", "ram:1GiB",
                             "--log-level", "warning"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    proc.stdout.readline()
    results: dict = {"workloads": {}, "mode": "loopback"}
    try:
        with LoopbackClient(f"ipc://{work}/stml.sock") as c:
            for name, wargs, count in WORKLOADS:
                bs, qd, write = size_of(wargs), int(wargs[wargs.index("-d") + 1]), "-w" in wargs
                n = max(100, int(count * args.scale / 4))
                blocks = bs // 512
                payload = os.urandom(bs)
                t0 = time.perf_counter()
                inflight = []
                for i in range(n):
                    lba = (i * blocks) % ((SIZE // 512) - blocks)
                    op = 0x8A if write else 0x88
                    cdb = struct.pack(">BBQIBB", op, 0, lba, blocks, 0, 0)
                    inflight.append(c.submit(0, cdb, data_out=payload if write else b"",
                                             data_in=0 if write else bs))
                    if len(inflight) >= qd:
                        inflight.pop(0).result().check()
                for f in inflight:
                    f.result().check()
                iops = n / (time.perf_counter() - t0)
                row = {"scsi-target": {"iops": iops, "mbps": iops * bs / 1e6}}
                results["workloads"][name] = row
                print_row(name, row, False)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return results


TRACE_WORKLOAD = ("4k-read-qd16", ["-d", "16", "-s", "4k"], 100000)
TRACE_GOAL = 0.9   # traced IOPS / untraced IOPS (issue 22)


def run_trace(args: argparse.Namespace) -> dict:
    """The same 4 KiB QD16 reads on two of our targets, one recording a trace."""
    work = Path(tempfile.mkdtemp(prefix="bench"))
    img = filled_image(args.shm_dir / f"bench-trace-{os.getpid()}.img")
    # a copy of its own for the second target: a file is served by one target at a time (0216)
    copy = args.shm_dir / f"bench-trace-{os.getpid()}-2.img"
    shutil.copyfile(img, copy)
    trace = work / "bench.trace"
    targets: list[Ours] = []
    name, wargs, count = TRACE_WORKLOAD
    n = max(100, int(count * args.scale))
    results: dict = {"mode": "trace", "workload": name, "ios": n, "runs": args.runs}
    try:
        plain = Ours(work, img, False, name="plain")
        targets.append(plain)
        # the cap well above what the rounds write: the trace records every round
        traced = Ours(work, copy, False, extra=("--trace", str(trace), "--trace-max", "64GiB"), name="traced")
        targets.append(traced)
        per: dict[str, list[float]] = {"plain": [], "traced": []}
        # CPU per read of each target's processes (user + kernel, all threads): what
        # tracing costs, less disturbed by other load on the machine than IOPS are
        cpu: dict[str, list[dict[str, float]]] = {"plain": [], "traced": []}
        for _ in range(args.runs):
            for label, t in (("plain", plain), ("traced", traced)):
                pids = processes(t)
                before = {name: usage(pid) for name, pid in pids.items()}
                per[label].append(n / qemu_bench(t.url, wargs, n))
                after = per_io(before, {name: usage(pid) for name, pid in pids.items()}, n)
                cpu[label].append({name: c["user_us"] + c["system_us"] for name, c in after.items()})
        ratios = [b / a for a, b in zip(per["plain"], per["traced"])]
        cpu_us = {label: {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
                  for label, rounds in cpu.items()}
        results.update({"plain_iops": statistics.median(per["plain"]),
                        "traced_iops": statistics.median(per["traced"]),
                        "ratio": statistics.median(ratios), "samples": per, "cpu_us_per_io": cpu_us,
                        "load": os.getloadavg()})
    finally:
        for t in targets:
            t.stop()
        img.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)
        results["trace_bytes"] = trace.stat().st_size if trace.exists() else 0
        shutil.rmtree(work, ignore_errors=True)
    goal = "goal met" if results.get("ratio", 0) >= TRACE_GOAL else f"goal {TRACE_GOAL}"
    print(f"{name:18s} plain {results['plain_iops']:10.0f} IOPS | traced {results['traced_iops']:10.0f} IOPS"
          f" | ratio {results['ratio']:.2f} ({goal}); trace {results['trace_bytes'] / 1e6:.1f} MB for "
          f"{n * args.runs} reads; load {results['load'][0]:.2f}", flush=True)
    for label, procs in results["cpu_us_per_io"].items():
        print(f"{'':18s} {label} CPU per read: " + ", ".join(f"{name} {us:.1f} us" for name, us in procs.items())
              + f"; all {sum(procs.values()):.1f} us", flush=True)
    return results


# --vhost: name, guestio mode, block size, I/O count at scale 1.0; each disk is VHOST_SIZE
VHOST_SIZE = 256 << 20
VHOST_WORKLOADS = [
    ("1m-seqread", "seqread", 1 << 20, 256),
    ("1m-seqwrite", "seqwrite", 1 << 20, 256),
    ("4k-randread", "randread", 4096, 4000),
]
VHOST_GOALS = {"1m-seqread": 0.9, "1m-seqwrite": 0.9, "4k-randread": 0.7}   # issue 21


def guestio(work: Path) -> bytes:
    """scripts/guestio.c built static (it runs in the guest's initramfs)."""
    cc = shutil.which("cc")
    if cc is None:
        sys.exit("bench: --vhost needs a C compiler (apt-get install gcc libc6-dev)")
    out = work / "guestio"
    p = subprocess.run([cc, "-O2", "-static", "-o", str(out), str(ROOT / "scripts" / "guestio.c")],
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"bench: cannot build guestio: {p.stderr.strip()}")
    return out.read_bytes()


def vhost_script(runs: int, scale: float) -> str:
    lines = ["for d in /sys/block/sd*; do case $(cat $d/device/vendor) in",
             "  SCSITGT*) ours=${d##*/};; QEMU*) qemu=${d##*/};; esac; done",
             'echo "@@ DISKS $ours $qemu"']
    for r in range(runs):
        for name, mode, bs, count in VHOST_WORKLOADS:
            n = max(4, int(count * scale))
            order = ("ours", "qemu") if r % 2 == 0 else ("qemu", "ours")
            for who in order:
                # after guestio's numbers, the commands the disk completed meanwhile
                # (reads + writes in /sys/block/X/stat): how the guest split the I/Os
                lines += [f"set -- $(cat /sys/block/${who}/stat); c=$(($1 + $5))",
                          f"g=$(guestio /dev/${who} {mode} {bs} {n})",
                          f'set -- $(cat /sys/block/${who}/stat); echo "@@ R{r}-{name}-{who} $g $(($1 + $5 - c))"']
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def vhost_guest(script: str, shm_dir: Path, run_args: tuple[str, ...] = (),
                vhost_options: str = "") -> Iterator[VhostGuest]:
    """The --vhost guest running `script` (shell, in its initramfs, with
    guestio): `scsi-target run` serving a filled file in `shm_dir` to it by
    fetd_vhost (`vhost_options` after the socket path: ",poll_us=0"), and
    QEMU's own virtio-scsi disk on another; all stopped after."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support import guest as G
    work = Path(tempfile.mkdtemp(prefix="bench"))
    ours_img = shm_dir / f"bench-vhost-ours-{os.getpid()}.img"
    qemu_img = shm_dir / f"bench-vhost-qemu-{os.getpid()}.img"
    proc = vm = None
    try:
        k = G.kernel()
        accel = G.accelerator(k)
        rd = G.initramfs(k, script, files={"usr/bin/guestio": guestio(work)}, binaries=())
        filled_image(ours_img, VHOST_SIZE)
        filled_image(qemu_img, VHOST_SIZE)
        sock = work / "vm.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "scsi_target", "run", "--data-dir", str(work / "ours"),
             "--lun", f"file:{ours_img},thick", "--no-iscsi", "--vhost", str(sock) + vhost_options, "--log-level", "warning",
             *run_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT)
        said = []
        assert proc.stdout is not None
        for line in proc.stdout:
            said.append(line)
            if line.startswith("Ready. "):   # run's banner: the vhost socket listens, attached
                break
        else:
            raise RuntimeError("scsi-target did not start:\n" + "".join(said[-20:]))
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        memory = 256
        vm = G.Guest(k, rd, accel=accel, memory_mb=memory, log_path=work / "console.log", args=[
            *G.vhost_scsi_args(str(sock), memory),
            "-drive", f"file={qemu_img},format=raw,if=none,id=d0",
            "-device", "virtio-scsi-pci,id=vs0", "-device", "scsi-hd,drive=d0,bus=vs0.0"]).start()
        yield VhostGuest(vm, proc, k.version, accel)
    finally:
        if vm is not None:
            vm.stop()
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        ours_img.unlink(missing_ok=True)
        qemu_img.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


class VhostGuest(NamedTuple):
    vm: Any                    # tests/support/guest.py's Guest
    run: subprocess.Popen      # scsi-target run (the STML and fetd_vhost are its children)
    kernel: str
    accel: str


def run_vhost(args: argparse.Namespace) -> dict:
    """One guest, two disks: fetd_vhost and QEMU's own virtio-scsi, in turns."""
    with vhost_guest(vhost_script(args.runs, args.scale), args.shm_dir, tuple(args.run_arg),
                     args.vhost_options) as g:
        vm, accel = g.vm, g.accel
        print(f"guest: {g.kernel}, {accel.upper()}", flush=True)
        vm.wait("EXIT", timeout=3600)
        marks = dict(vm.marks())
        console = vm.console()   # (the guest's log goes with it)
        if len((marks.get("DISKS") or "").split()) != 2:
            raise RuntimeError("the guest did not see both disks:\n" + console[-3000:])
    results: dict = {"workloads": {}, "runs": args.runs, "mode": "vhost", "accel": accel,
                     "run_args": args.run_arg, "vhost_options": args.vhost_options,
                     "guest_kernel": g.kernel, "disk_bytes": VHOST_SIZE}
    for name, _, bs, count in VHOST_WORKLOADS:
        n = max(4, int(count * args.scale))
        per: dict[str, list[float]] = {"scsi-target": [], "qemu": []}
        commands: dict[str, list[float]] = {"scsi-target": [], "qemu": []}
        for r in range(args.runs):
            for t, who in (("scsi-target", "ours"), ("qemu", "qemu")):
                said = marks[f"R{r}-{name}-{who}"].split()
                if len(said) != 3:   # (guestio failed: its numbers are missing, only the count came)
                    raise RuntimeError(f"guestio failed on {who}'s disk in R{r}-{name}:\n" + console[-3000:])
                per[t].append(float(said[0]))
                commands[t].append(int(said[-1]) / n)
        row: dict = {t: {"iops": statistics.median(v), "mbps": statistics.median(v) * bs / 1e6, "samples": v,
                         "commands_per_io": statistics.median(commands[t])}
                     for t, v in per.items()}
        row["ratio"] = statistics.median(a / b for a, b in zip(per["scsi-target"], per["qemu"]))
        results["workloads"][name] = row
        q = row["qemu"]
        goal = VHOST_GOALS[name]
        print(f"{name:18s} {row['scsi-target']['iops']:10.0f} IOPS {row['scsi-target']['mbps']:9.1f} MB/s"
              f" | qemu {q['iops']:10.0f} IOPS {q['mbps']:9.1f} MB/s | ratio {row['ratio']:.2f}"
              + (" (goal met)" if row["ratio"] >= goal else f" (goal {goal})")
              + f" | commands per I/O {row['scsi-target']['commands_per_io']:.2f} / {q['commands_per_io']:.2f}",
              flush=True)
    return results


def print_row(name: str, row: dict, ratio: bool, goals: dict[str, float] = GOALS) -> None:
    ours = row["scsi-target"]
    line = f"{name:18s} {ours['iops']:10.0f} IOPS {ours['mbps']:9.1f} MB/s"
    if ratio:
        t = row["tgtd"]
        line += f" | tgtd {t['iops']:10.0f} IOPS {t['mbps']:9.1f} MB/s | ratio {row['ratio']:.2f}"
        if name in goals:
            line += " (goal met)" if row["ratio"] >= goals[name] else f" (goal {goals[name]})"
    print(line, flush=True)


# --rbd --cpu: the counters printed per I/O (the JSON has every one that moved)
SHOWN_COUNTERS = {"osd": ("osd.op_w", "osd.op_r", "osd.op_rw", "msgr.msgr_recv_messages"),
                  "client": ("objecter.op_send", "objecter.linger_ping", "librbd.flush", "msgr.msgr_send_messages")}


def print_cpu(row: dict) -> None:
    """Per target: each process's CPU per I/O in user space + in the kernel and
    sleeps per I/O (the initiator's and the cluster's daemons' too), the whole
    machine's busy CPU per I/O, and (--rbd) a few counters per I/O."""
    for target, t in row.items():
        if not isinstance(t, dict) or "cpu" not in t:
            continue
        m = t["cpu"].get("machine", {})
        parts = [f"{name} {c['cpu_us']:.0f} us ({c['user_us']:.0f}+{c['system_us']:.0f}), {c['sleeps']:.2f} sleeps"
                 for name, c in t["cpu"].items() if name != "machine"]
        print(f"{'':18s} {target} per I/O: " + "; ".join(parts)
              + f"; machine {m.get('busy_us', 0):.0f} us busy (others {m.get('others_us', 0):.0f},"
                f" interrupts {m.get('irq_us', 0):.0f}), {m.get('idle_share', 0):.0%} idle", flush=True)
        shown = [f"{who} {key} {t['counters'][who].get(key, 0):.2f}"
                 for who, keys in SHOWN_COUNTERS.items() if who in t.get("counters", {}) for key in keys]
        if shown:
            print(f"{'':18s} {target} counters per I/O: " + ", ".join(shown), flush=True)


def chart(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed; no chart written")
        return
    names = list(results["workloads"])
    ratios = [results["workloads"][n].get("ratio", 0) for n in names]
    table = RBD_GOALS if results.get("lun") == "rbd" else GOALS
    goals = [table.get(n, 0) for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, ratios, color=["#4a7ab5" if r >= g else "#d08a3c" for r, g in zip(ratios, goals)])
    ax.hlines(goals, [b.get_x() for b in bars], [b.get_x() + b.get_width() for b in bars],
              colors="black", linewidth=2, label="goal")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.legend(loc="upper left")
    ax.set_ylabel("scsi-target / tgtd (median of rounds)")
    ax.set_title("Throughput relative to tgtd, same machine, same run")
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart: {path}")


def commit() -> str:
    """The measured tree's commit, marked when it has uncommitted changes."""
    def git(*a: str) -> str:
        p = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict:
    """What the numbers depend on: CPUs, their model (the name alone is generic
    in these VMs, so family/model/stepping too) and the kernel's Spectre v2
    mitigation (retpolines make every indirect branch dear: the interpreter's
    and the compiled build's, much less tgtd's), the idle driver's halt
    polling; and which machine and boot they came from. The machine id is the
    image's, the same on every VM made from it: the boot id tells two VMs apart."""
    info: dict[str, str] = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    model = info.get("model name", "?")

    def read(path: str) -> str | None:
        p = Path(path)
        return p.read_text().strip() if p.exists() else None

    def hashed(path: str) -> str | None:
        """machine-id(5): never shown as is, but hashed for each application."""
        raw = read(path)
        return hmac.new(raw.encode(), b"scsi-target bench", "sha256").hexdigest()[:16] if raw else None
    return {"cpus": os.cpu_count(), "model": model,
            "cpuid": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
            "spectre_v2": read("/sys/devices/system/cpu/vulnerabilities/spectre_v2"),
            "guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
            "machine": hashed("/etc/machine-id"), "boot": hashed("/proc/sys/kernel/random/boot_id")}


def default_out(args: argparse.Namespace, results: dict) -> Path:
    kind = ("-thin" if args.thin else "-loopback" if args.loopback else "-vhost" if args.vhost
            else "-rbd" if args.rbd else "-trace" if args.trace else "-sessions" if args.sessions else "")
    return ROOT / "docs" / "perf" / f"{results['date']}-{results['commit']}{kind}.json"


def session_counts(text: str) -> list[int]:
    """--sessions 1,2,4: positive session counts."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or max(counts) > 1024:
        raise argparse.ArgumentTypeError(f"expected session counts from 1 to 1024 like 1,2,4, not {text!r}")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare-tgtd", action="store_true", help="also run tgtd and print ratios")
    ap.add_argument("--loopback", action="store_true", help="measure the STML alone (no TCP)")
    ap.add_argument("--runs", type=int, default=5, help="rounds per workload (median is reported)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply I/O counts (0.01 = smoke run)")
    ap.add_argument("--out", help="JSON results (and a .png beside it); default "
                                  "docs/perf/DATE-COMMIT[-thin|-loopback|-vhost|-rbd].json in the tree measured")
    ap.add_argument("--vhost", action="store_true",
                    help="a Linux guest: fetd_vhost against QEMU's own virtio-scsi (see above)")
    ap.add_argument("--vhost-options", default="", metavar=",KEY=VALUE...",
                    help="--vhost: after run's socket path (e.g. ,poll_us=0: fetd_vhost does not poll)")
    ap.add_argument("--run-arg", action="append", default=[], metavar="ARG",
                    help="--vhost: one more `scsi-target run` argument (e.g. --run-arg=--cpu-affinity=none)")
    ap.add_argument("--thin", action="store_true",
                    help="the default thin LUN: a sparse file fragmented by scattered 4 KiB writes, "
                         "then 64 KiB reads (instead of the thick workloads)")
    ap.add_argument("--thin-dir", default="/var/tmp",
                    help="where --thin keeps its sparse files (a disk file system, as the data dir)")
    ap.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"),
                    help="where the filled (thick) images go: a memory file system (default /dev/shm)")
    ap.add_argument("--cpu", action="store_true",
                    help="also CPU (user + kernel) and sleeps per I/O of each target process, from /proc")
    ap.add_argument("--rbd", action="store_true", help="RBD images instead of files (see above)")
    ap.add_argument("--ceph-conf", help="--rbd: this cluster's ceph.conf instead of a throwaway cluster")
    ap.add_argument("--ceph-keyring", help="--rbd: the keyring for --ceph-conf, if it does not name one")
    ap.add_argument("--trace", action="store_true",
                    help="4 KiB QD16 reads with and without `run --trace`, alternating (see above)")
    ap.add_argument("--sessions", type=session_counts, metavar="N,N,...",
                    help="the scaling curve: these counts of concurrent sessions (e.g. 1,2,4,8,16,32,64), "
                         "4 KiB and 64 KiB random reads QD4 each, on one LUN and on one LUN per session; "
                         "--scale multiplies the seconds of each run (see above)")
    args = ap.parse_args()
    # SIGTERM (a test's timeout, `kill`) unwinds like ^C: every `finally` above
    # stops its targets and removes its images instead of leaving them behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))
    if not shutil.which("qemu-img") and not args.loopback and not args.vhost and not args.sessions:
        sys.exit("bench: qemu-img not found (apt-get install qemu-utils qemu-block-extra)")
    if args.vhost:
        results = run_vhost(args)
    elif args.trace:
        results = run_trace(args)
    elif args.sessions:
        results = run_sessions(args)
    else:
        results = run_loopback(args) if args.loopback else run_iscsi(args)
    results["commit"], results["date"] = commit(), time.strftime("%Y-%m-%d")
    results["machine"] = machine()
    out = Path(args.out) if args.out else default_out(args, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    if args.compare_tgtd:
        (session_chart if args.sessions else chart)(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
