#!/usr/bin/env python3
"""fetd_vhost's cost per command without a guest: instructions (callgrind)
or CPU time and wake-ups of the real `python -m fetd_vhost` process.

The real STML (a 64 MiB RAM LUN, its own process, not counted) and
tests/support/vhost_master.py's master playing QEMU (this process, not
counted) on memfd guest memory and eventfds. The driver behaves as Linux's
virtio-scsi does at QD1: one indirect table per command (request header,
write data, response, read data), the data in 4 KiB pages, a kick only when
the device's avail_event asks for one (event index). The pages of a 1 MiB
command are scattered (every other page, shuffled: no two adjacent in guest
memory) or, with --contiguous, adjacent pages as separate descriptors (what
a scatterlist Linux did not merge looks like).

    PYTHONHASHSEED=0 PYTHONPATH=$PWD:$PWD/tests scripts/vhostpath.py --instructions
    scripts/vhostpath.py --workload 1m-read --count 2000      # CPU us and wake-ups per command

--instructions runs fetd_vhost under callgrind, zeroes its counters after
the warm-up (callgrind_control) and dumps them after `--count` commands:
what those commands cost, the event loop's idle waits included (they cost
no instructions). With --count-stml the STML runs under callgrind instead
(the same count of its side; fetd_vhost runs as it is).
SCSI_TARGET_ACCEL in the environment reaches both.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.target import IQN, StmlProcess  # noqa: E402  (IQN: the default target, 0207)
from support.vhost_master import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, REQ, RESP, RESP_SIZE,  # noqa: E402
                                  VhostMaster, lun_field, need_event, read10, wait_socket, write10)

PAGE = 4096
LUN_BLOCKS = (64 << 20) // 512
# name: (write?, bytes)
WORKLOADS = {"4k-read": (False, 4096), "1m-read": (False, 1 << 20), "1m-write": (True, 1 << 20)}


class Driver:
    """QD1 commands on request queue 0 (virtqueue 2), one descriptor head
    (an indirect table) reused for every command."""

    def __init__(self, m: VhostMaster, write: bool, size: int, contiguous: bool, seed: int) -> None:
        self.m, self.write, self.size = m, write, size
        self.q = m.queues[2]
        ram = m.ram
        pages = size // PAGE
        base = ram.alloc(2 * pages * PAGE, PAGE)
        order = list(range(pages)) if contiguous else random.Random(seed).sample(range(0, 2 * pages, 2), pages)
        self.pages = [base + k * PAGE for k in order]
        self.req = ram.alloc(REQ.size)
        self.resp = ram.alloc(RESP_SIZE)
        bufs = [(self.req, REQ.size, False)]
        data = [(p, PAGE, not write) for p in self.pages]
        bufs += (data + [(self.resp, RESP_SIZE, True)]) if write else ([(self.resp, RESP_SIZE, True)] + data)
        self.table = ram.alloc(16 * len(bufs), 16)
        for k, (addr, n, w) in enumerate(bufs):
            flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k + 1 < len(bufs) else 0)
            ram.write(self.table + 16 * k, struct.pack("<QIHH", addr, n, flags, k + 1))
        self.q.write_desc(0, self.table, 16 * len(bufs), DESC_F_INDIRECT)
        if write:
            for k, p in enumerate(self.pages):
                ram.write(p, bytes([k & 0xFF]) * PAGE)
        self.rng = random.Random(seed)
        self.tag = 0
        self.kicks = 0
        self.interrupts = 0

    def one(self) -> tuple[int, int]:
        """One command, waited for: (response, status), (-1, -1) if the
        device did not write what it should have."""
        blocks = self.size // 512
        lba = self.rng.randrange(0, LUN_BLOCKS - blocks) // blocks * blocks
        self.tag += 1
        cdb = (write10 if self.write else read10)(lba, blocks)
        self.m.ram.write(self.req, REQ.pack(lun_field(0), self.tag, 0, 0, 0, cdb.ljust(32, b"\0")))
        self.m.ram.write(self.resp, b"\xff" * RESP.size)
        q = self.q
        old = q.avail_idx
        q.offer(0)
        q.publish(kick=False)
        if need_event(q.avail_event(), q.avail_idx, old):
            os.eventfd_write(q.kick, 1)
            self.kicks += 1
        deadline = time.monotonic() + 60
        got = 0
        while not (done := q.take_used()):
            if time.monotonic() > deadline:
                raise SystemExit("vhostpath: a command was not answered in 60 s")
            select.select([q.call], [], [], 1.0)
            got += q.interrupts()
        # the device publishes its answer before it signals: one taken by polling
        # may be ahead of its interrupt, which is this command's all the same
        if not got:
            select.select([q.call], [], [], 1.0)
        self.interrupts += got + q.interrupts()
        want = RESP_SIZE + (0 if self.write else self.size)
        _, _, _, status, response = RESP.unpack(self.m.ram.read(self.resp, RESP.size))
        return (response, status) if done[0] == (0, want) else (-1, -1)


def proc_cpu(pid: int) -> tuple[float, int]:
    """(CPU seconds, voluntary context switches) of a process: schedstat's
    nanoseconds (user and system), not stat's 10 ms ticks."""
    cpu = sum(int(Path(task, "schedstat").read_text().split()[0])
              for task in glob.glob(f"/proc/{pid}/task/*")) / 1e9
    m = re.search(r"voluntary_ctxt_switches:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return cpu, int(m.group(1)) if m else 0


def totals(path: str) -> int | None:
    """The instruction count in a callgrind dump, or None while callgrind is
    still writing it: its `totals:` line is the last it writes. The count is
    the `summary:` line's: after `callgrind_control -z` the cost lines (and
    so `totals:`) also carry some millions of instructions from before the
    zeroing, the same whatever the number of commands measured."""
    text = Path(path).read_text()
    if re.search(r"^totals:\s+\d+\n\Z", text, re.M) is None:
        return None
    m = re.search(r"^summary:\s+(\d+)$", text, re.M)
    return int(m.group(1)) if m else None


class CountedStml(StmlProcess):
    """The STML under callgrind (--count-stml)."""
    START_TIMEOUT = 600.0

    def __init__(self, data_dir: Path, luns: tuple[str, ...], work: Path) -> None:
        super().__init__(data_dir, luns)
        self.work = work

    def argv(self) -> list[str]:
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.work}/cg.%p",
                "--dump-instr=no", "--compress-strings=no"] + super().argv()


def measure(work: Path, workload: str, count: int, warmup: int, instructions: bool,
            contiguous: bool, keep: Path | None = None, lun: str = "ram:64MiB", count_stml: bool = False) -> dict:
    write, size = WORKLOADS[workload]
    stml = (CountedStml(work / "stml", (lun,), work) if count_stml else StmlProcess(work / "stml", (lun,))).start()
    fe: subprocess.Popen | None = None
    m: VhostMaster | None = None
    try:
        assert stml.endpoint is not None
        sock = str(work / "vm.sock")
        argv = [sys.executable, "-m", "fetd_vhost", "--socket", sock, "--target", IQN,
                "--stml", stml.endpoint, "--log-level", "warning"]
        if instructions and not count_stml:
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.%p",
                    "--dump-instr=no", "--compress-strings=no"] + argv
        out = open(work / "fe.out", "wb")
        fe = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 600
        while b"attached to STML" not in (work / "fe.out").read_bytes():
            if fe.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("vhostpath: fetd_vhost did not start:\n" + (work / "fe.out").read_text())
            time.sleep(0.2)
        wait_socket(sock)
        m = VhostMaster(sock, mem_size=16 << 20)
        m.negotiate()
        for i in range(3):
            m.setup_queue(i, 128)
        d = Driver(m, write, size, contiguous, seed=1)
        for _ in range(warmup):
            d.one()           # the first ones carry unit attentions
        counted = stml.pid if count_stml else fe.pid
        if instructions:
            subprocess.run(["callgrind_control", "-z", str(counted)], check=True, capture_output=True)
        cpu0, sw0 = proc_cpu(fe.pid)
        scpu0, ssw0 = proc_cpu(stml.pid)
        k0, i0 = d.kicks, d.interrupts
        bad = 0
        t0 = time.perf_counter()
        for _ in range(count):
            if d.one() != (0, 0):
                bad += 1
        took = time.perf_counter() - t0
        cpu1, sw1 = proc_cpu(fe.pid)
        scpu1, ssw1 = proc_cpu(stml.pid)
        if bad:
            raise SystemExit(f"vhostpath: {bad} of {count} commands did not complete GOOD")
        res = {"workload": workload, "count": count, "layout": "contiguous" if contiguous else "scattered",
               "wall_us": took / count * 1e6, "cpu_us": (cpu1 - cpu0) / count * 1e6,
               "wakeups": (sw1 - sw0) / count, "stml_cpu_us": (scpu1 - scpu0) / count * 1e6,
               "stml_wakeups": (ssw1 - ssw0) / count, "kicks": (d.kicks - k0) / count,
               "interrupts": (d.interrupts - i0) / count}
        if instructions:
            before = set(glob.glob(f"{work}/cg.{counted}*"))
            subprocess.run(["callgrind_control", "-d", str(counted)], check=True, capture_output=True)
            deadline = time.monotonic() + 120
            dump, total = "", None
            while total is None:   # until the dump is there and written whole (no fixed wait)
                new = sorted(set(glob.glob(f"{work}/cg.{counted}*")) - before)
                if new:
                    dump, total = new[-1], totals(new[-1])
                if total is None:
                    if time.monotonic() > deadline:
                        raise SystemExit("vhostpath: callgrind wrote no whole dump")
                    time.sleep(0.2)
            res["instructions"] = total / count
            if keep is not None:
                shutil.copy(dump, keep / f"callgrind.{workload}")
        return res
    finally:
        if m is not None:
            m.close()
        if fe is not None:
            fe.terminate()
            try:
                fe.wait(60)
            except subprocess.TimeoutExpired:
                fe.kill()
                fe.wait()
        stml.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    ap.add_argument("--count", type=int, default=0, help="commands measured (default 300; 100 counted)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    ap.add_argument("--count-stml", action="store_true", help="with --instructions: count the STML's, not fetd_vhost's")
    ap.add_argument("--keep", type=Path, help="copy the callgrind dumps here (callgrind_annotate)")
    ap.add_argument("--contiguous", action="store_true", help="adjacent pages (default: scattered)")
    ap.add_argument("--lun", default="ram:64MiB", help="the STML's LUN (at least 64 MiB), e.g. "
                    "file:/dev/shm/x.img,thick as bench.py --vhost serves")
    a = ap.parse_args()
    if a.instructions and shutil.which("valgrind") is None:
        raise SystemExit("vhostpath: --instructions needs valgrind")
    count = a.count or (100 if a.instructions else 300)
    for name in WORKLOADS if a.workload == "all" else [a.workload]:
        work = Path(tempfile.mkdtemp(prefix="vhp", dir="/tmp"))
        try:
            r = measure(work, name, count, a.warmup, a.instructions, a.contiguous, a.keep, a.lun, a.count_stml)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        line = (f"{name:9s} {r['layout']:10s} cpu {r['cpu_us']:7.1f} us  wall {r['wall_us']:7.1f} us  "
                f"wake-ups {r['wakeups']:.2f}  STML cpu {r['stml_cpu_us']:.1f} us wake-ups {r['stml_wakeups']:.2f}  kicks {r['kicks']:.2f}  interrupts {r['interrupts']:.2f}")
        if "instructions" in r:
            line += f"  {r['instructions']:,.0f} instructions ({'the STML' if a.count_stml else 'fetd_vhost'})"
        print(line + " per command", flush=True)


if __name__ == "__main__":
    main()
