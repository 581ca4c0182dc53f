#!/usr/bin/env python3
"""One LUN, two initiators: one at queue depth 64, one at queue depth 1.
What the QD1 initiator's latency is under each task scheduling policy.

    scripts/sched_bench.py [--runs 5] [--scale 1.0] [--out sched.json]
    scripts/sched_bench.py --dir /dev/shm --deep-kib 4   # a LUN in memory instead

The LUN is a file of random data on disk (--dir, default /var/tmp), kept
out of the page cache while the initiators run (POSIX_FADV_DONTNEED every
50 ms), so its reads wait for the device as a real disk LUN's do: that is
where a task scheduling policy can choose who goes first. The QD64
initiator reads 1 MiB pieces (--deep-kib), the QD1 one 4 KiB; both are
loopback front ends in processes of their own, random offsets.

Per round and policy (fifo, then fair; the order alternates between rounds
so drift on a shared machine cancels out) an STML serves the file with
`scheduler=` the policy; the QD1 initiator runs alone, then beside the QD64
one. The table shows the medians over the rounds: the QD1 latency (p50,
p99) alone and under load, and the QD64 initiator's IOPS meanwhile. A PNG
chart is written beside the JSON when matplotlib is importable. Numbers are
measured, never asserted: the smoke test runs it with --scale 0.01. With
--dir /dev/shm nothing waits for a device, and the processes' CPU (two
cores here) decides the latencies instead, whatever the policy.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POLICIES = ("fifo", "fair")
BLOCKS = 8                      # the QD1 initiator's reads: 4 KiB
DEEP_QD = 64
SINGLE_COUNT = 400              # QD1 commands per measurement at scale 1.0


def read_cdb(rng: random.Random, lun_size: int, blocks: int = BLOCKS) -> bytes:
    lba = rng.randrange(lun_size // 512 - blocks) // blocks * blocks
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


# ---------------------------------------------------------------- workers (own processes)

def deep_worker(endpoint: str, lun_size: int, blocks: int) -> None:
    """QD64 reads until stdin closes; prints {"iops": ...} for the time after
    its first full window of completions ("ready" on stdout marks that point).
    Each completion submits the next command from the link's own thread, so
    this initiator keeps 64 commands at the STML at all times."""
    from fetd_loopback import LoopbackClient
    rng = random.Random(1)
    stop = threading.Event()
    state = {"done": 0, "inflight": 0}
    lock = threading.Lock()
    idle = threading.Event()

    def submit(c: LoopbackClient) -> None:
        with lock:
            state["inflight"] += 1
        c.submit(0, read_cdb(rng, lun_size, blocks), data_in=blocks * 512).add_done_callback(
            lambda f: done(c, f))

    def done(c: LoopbackClient, f: concurrent.futures.Future) -> None:
        f.result().check()
        with lock:
            state["done"] += 1
            state["inflight"] -= 1
            last = state["inflight"] == 0
        if not stop.is_set():
            submit(c)
        elif last:
            idle.set()

    with LoopbackClient(endpoint, initiator=f"iqn.2026-11.org.scsi-target.bench:deep-{os.getpid()}") as c:
        for _ in range(DEEP_QD):
            submit(c)
        while state["done"] < DEEP_QD:
            time.sleep(0.01)
        t0, first = time.perf_counter(), state["done"]
        print("ready", flush=True)
        sys.stdin.read()
        count, took = state["done"] - first, time.perf_counter() - t0
        stop.set()
        idle.wait(30)
    print(json.dumps({"iops": count / took}), flush=True)


def single_worker(endpoint: str, lun_size: int, count: int) -> None:
    """QD1 reads, one at a time: prints each latency (us) as JSON."""
    from fetd_loopback import LoopbackClient
    rng = random.Random(2)
    lat = []
    with LoopbackClient(endpoint, initiator=f"iqn.2026-11.org.scsi-target.bench:single-{os.getpid()}") as c:
        for _ in range(20):                   # warm-up: connections, caches
            c.execute(0, read_cdb(rng, lun_size), data_in=BLOCKS * 512).check()
        for _ in range(count):
            cdb = read_cdb(rng, lun_size)
            t = time.perf_counter()
            c.execute(0, cdb, data_in=BLOCKS * 512).check()
            lat.append((time.perf_counter() - t) * 1e6)
    print(json.dumps(lat))


# ---------------------------------------------------------------- the bench

def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def filled_image(directory: Path, size: int) -> Path:
    """A `size`-byte file of random data (so reads move real pages, from disk
    once its cache is dropped)."""
    path = directory / f"sched-bench-{os.getpid()}.img"
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return path


def drop_cache(path: Path) -> None:
    """Evict the image's clean pages: the next reads wait for the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Stml:
    """An STML serving the image as LUN 0 under one scheduling policy."""

    def __init__(self, image: Path, policy: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="schedbench", dir="/tmp"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stml", "--data-dir", str(self.dir), "--log-level", "warning",
             "--lun", f"file:{image},thick,scheduler={policy}"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening on" not in line:
            self.stop()
            sys.exit(f"sched_bench: the STML did not start: {line.strip()}")
        self.endpoint = line.split("listening on", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def worker(*args: object, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", *map(str, args)], text=True, cwd=ROOT,
                            stdout=subprocess.PIPE, **kw)   # type: ignore[call-overload]


def single(endpoint: str, size: int, count: int) -> list[float]:
    p = worker("single", endpoint, size, count)
    out, _ = p.communicate(timeout=900)
    if p.returncode:
        sys.exit("sched_bench: the QD1 initiator failed")
    return json.loads(out)


class Cold:
    """Keeps the image out of the page cache while it runs (every 50 ms), so
    reads keep waiting for the device, however much the initiators read."""

    def __init__(self, image: Path, on: bool) -> None:
        self.image = image
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True) if on else None

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            drop_cache(self.image)

    def __enter__(self) -> Cold:
        drop_cache(self.image)
        if self.thread:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()


def one_round(policy: str, image: Path, count: int, deep_blocks: int, cold: bool) -> dict:
    size = image.stat().st_size
    stml = Stml(image, policy)
    try:
        with Cold(image, cold):
            alone = single(stml.endpoint, size, count)
        with Cold(image, cold):
            loaded, iops = beside_deep(stml.endpoint, size, count, deep_blocks)
    finally:
        stml.stop()
    return {"alone_p50": percentile(alone, 50), "alone_p99": percentile(alone, 99),
            "p50": percentile(loaded, 50), "p99": percentile(loaded, 99), "deep_iops": iops}


def beside_deep(endpoint: str, size: int, count: int, deep_blocks: int) -> tuple[list[float], float]:
    """The QD1 latencies while the QD64 initiator runs, and its IOPS meanwhile."""
    deep = worker("deep", endpoint, size, deep_blocks, stdin=subprocess.PIPE)
    try:
        assert deep.stdout is not None and deep.stdin is not None
        if deep.stdout.readline().strip() != "ready":
            sys.exit("sched_bench: the QD64 initiator did not start")
        loaded = single(endpoint, size, count)
        deep.stdin.close()
        iops = json.loads(deep.stdout.readline())["iops"]
        deep.wait(30)
    finally:
        if deep.poll() is None:
            deep.kill()
            deep.wait()
    return loaded, iops


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (lat, iops) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["QD1 alone p50", "QD1 alone p99", "QD1 beside QD64 p50", "QD1 beside QD64 p99"]
    keys = ["alone_p50", "alone_p99", "p50", "p99"]
    width = 0.38
    for n, policy in enumerate(POLICIES):
        row = results["policies"][policy]
        lat.bar([i + n * width for i in range(4)], [row[k] for k in keys], width, label=policy)
        iops.bar([n], [row["deep_iops"]], 0.6, label=policy)
    lat.set_xticks([i + width / 2 for i in range(4)], labels, rotation=15, fontsize=8)
    lat.set_ylabel("latency (us), median of rounds")
    lat.set_yscale("log")
    lat.legend()
    iops.set_xticks(range(len(POLICIES)), POLICIES)
    iops.set_ylabel("QD64 initiator IOPS")
    fig.suptitle(f"one LUN: QD1 initiator (4 KiB reads) beside a QD64 one ({results['deep_kib']} KiB reads)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="rounds (medians are reported)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the QD1 command count")
    ap.add_argument("--out", help="JSON results (and a .png beside it); default sched-TIME.json")
    ap.add_argument("--deep-kib", type=int, default=1024, help="the QD64 initiator's read size (KiB)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the LUN's image goes (default /var/tmp: on disk; /dev/shm: in memory)")
    ap.add_argument("--size-mib", type=int, default=1024, help="the image's size")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, endpoint, size, n = args.worker
        if kind == "deep":
            deep_worker(endpoint, int(size), int(n))
        else:
            single_worker(endpoint, int(size), int(n))
        return
    # SIGTERM (a test's timeout, `kill`) unwinds like ^C: the `finally`s stop the STML and remove the image
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("sched_bench: terminated"))
    count = max(50, int(SINGLE_COUNT * args.scale))
    image = filled_image(Path(args.dir), args.size_mib << 20)
    rounds: dict[str, list[dict]] = {p: [] for p in POLICIES}
    try:
        for r in range(args.runs):
            for policy in POLICIES if r % 2 == 0 else reversed(POLICIES):
                rounds[policy].append(one_round(policy, image, count, args.deep_kib * 2,
                                                not args.dir.startswith("/dev/shm")))
    finally:
        image.unlink()
    results: dict = {"runs": args.runs, "qd1_commands": count, "deep_kib": args.deep_kib, "dir": args.dir,
                     "size_mib": args.size_mib, "policies": {}}
    print(f"{'policy':>7} {'QD1 alone p50':>14} {'p99':>8} {'QD1 loaded p50':>15} {'p99':>8} {'QD64 IOPS':>10}"
          "   (us; medians of rounds)")
    for policy in POLICIES:
        row = {k: statistics.median(x[k] for x in rounds[policy]) for k in rounds[policy][0]}
        results["policies"][policy] = {**row, "rounds": rounds[policy]}
        print(f"{policy:>7} {row['alone_p50']:>14.0f} {row['alone_p99']:>8.0f} {row['p50']:>15.0f} "
              f"{row['p99']:>8.0f} {row['deep_iops']:>10.0f}")
    out = Path(args.out or f"sched-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps(results, indent=2))
    try:
        chart(results, out.with_suffix(".png"))
    except ImportError:
        print("sched_bench: no matplotlib, no chart (pip install -e '.[bench]')", file=sys.stderr)


if __name__ == "__main__":
    main()
