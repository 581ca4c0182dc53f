#!/usr/bin/env python3
"""Our cost per RBD command on the submit and collect path, without a cluster.

    scripts/rbdpath.py [--count 20000] [--size 4096] [--write] [--stml]
    scripts/rbdpath.py --instructions     # instructions per command, under valgrind

QD commands at a time go through Task.io_on to the RBD backend's aio twin
(backends.rbd.RbdAio) and backends.librbd's ctypes calls, on uvloop as in
the STML, against scripts/fakerbd.c built as a stand-in for librbd.so.1
(built here with cc): its aio calls complete at once and signal the
eventfd, so the count is ours alone - pinning, the completion, the ctypes
calls, the eventfd wake-up, polling, the futures - and none of librbd's or
the cluster's (bench.py --rbd --cpu measures the whole). `--stml`: the
STML's whole receive path instead (rx_cmnd messages for READ(10) or
WRITE(10) in, xmit_response out, as pathcost.py's stml path, on an RBD
LUN). The instruction count (callgrind at two counts, the difference
divided) does not move with the machine's load as time does.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QD = 16


def build(work: Path) -> Path:
    """libfakerbd.so: fakerbd.c plus a stub for every other call librbd.py declares."""
    src = (ROOT / "scripts" / "fakerbd.c").read_text()
    declared = set(re.findall(r'"((?:rbd|rados)_[a-z0-9_]+)"', (ROOT / "backends" / "librbd.py").read_text()))
    defined = set(re.findall(r"\b((?:rbd|rados)_[a-z0-9_]+)\(", src))
    stubs = work / "stubs.c"
    stubs.write_text("".join(f"long {name}(void) {{ return 0; }}\n" for name in sorted(declared - defined)))
    out = work / "libfakerbd.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(out), str(ROOT / "scripts" / "fakerbd.c"),
                    str(stubs)], check=True)
    return out


async def rbd_path(count: int, size: int, write: bool) -> float:
    from backends.rbd import RbdBackend
    from stml.task import Task
    backend = RbdBackend("rbd/fake")
    task: Any = SimpleNamespace(services=SimpleNamespace(workers=None))
    lu: Any = SimpleNamespace(backend=backend)
    io_on = Task.io_on
    fn = backend.write_from if write else backend.read_into
    bufs = [memoryview(bytearray(size)) for _ in range(QD)]

    async def one(i: int) -> None:
        buf = bufs[i]
        for k in range(i, count, QD):
            if write:
                await io_on(task, lu, fn, k * size, [buf], False)
            else:
                await io_on(task, lu, fn, k * size, buf)
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(QD)))
    took = time.perf_counter() - start
    backend.close()
    # the stand-in fills what it reads with 0x5a: the data reached the buffers
    assert write or all(bytes(b) == b"\x5a" * size for b in bufs), "a read brought no data"
    return took


async def stml_path(count: int, size: int, write: bool, file: bool = False) -> float:
    """rx_cmnd messages through StmlServer's receive path, QD at a time; the
    front end's stream is a stub that counts the responses. `file`: on a file
    LUN in /dev/shm instead, the same harness: what the RBD LUN costs beyond
    it is the RBD path's own."""
    from stml import config
    from stml.api import SharedRegion, pack, unpack
    from stml.server import StmlServer
    work = Path(tempfile.mkdtemp(prefix="rbdpath", dir="/dev/shm" if file and Path("/dev/shm").is_dir() else None))
    lun = "rbd:rbd/fake,thick"
    if file:
        with open(work / "lun.img", "wb") as f:
            f.truncate(1 << 30)
        lun = f"file:{work / 'lun.img'},thick"
    server = StmlServer(config.load(data_dir=str(work / "data"), luns=(lun,)))
    try:
        ident = b"\0stream-1"
        replies: list = []
        waiting: list[tuple[int, asyncio.Future]] = []

        class Stream:   # what StmlServer needs of a StreamChannel
            region = SharedRegion()

            def send(self, frames: list) -> None:
                replies.append(frames)
                if waiting and len(replies) >= waiting[0][0]:
                    waiting.pop()[1].set_result(None)

        server.streams[ident] = Stream()  # type: ignore[assignment]
        receive = server._receive
        receive([ident, pack({"op": "register_target_front_end", "name": "rbdpath", "kind": "bench",
                              "version": [1, 0]})])
        target = next(iter(server.emulator.targets))
        receive([ident, pack({"op": "register_nexus", "nexus": 1, "initiator": "iqn.x", "target": target,
                              "tpg": 1})])
        blocks = size // 512
        payload = [bytes(size)] if write else []
        messages = [[ident, pack({"op": "rx_cmnd", "tag": tag, "nexus": 1, "lun": 0,
                                  "cdb": bytes([0x2A if write else 0x28, 0]) + (tag * blocks % (1 << 20)).to_bytes(4, "big")
                                  + b"\0" + blocks.to_bytes(2, "big") + b"\0",
                                  "attr": 0, "dir": 1 if write else 2, "len": size,
                                  "unsol": size if write else 0}), *payload]
                    for tag in range(count + 1)]
        loop = asyncio.get_running_loop()

        async def batch(msgs: list) -> None:
            replies.clear()
            done = loop.create_future()
            waiting.append((len(msgs), done))
            for m in msgs:
                receive(m)
            await done
            assert all(unpack(r[0])["status"] == 0 for r in replies[1:]), "the commands succeed"
        await batch(messages[:1])   # takes the power-on unit attention
        start = time.perf_counter()
        for first in range(1, count + 1, QD):
            await batch(messages[first:first + QD])
            receive([ident, pack({"op": "scsi_target_done", "tags": list(range(first, first + QD))})])
        return time.perf_counter() - start
    finally:
        server.sock.close(linger=0)
        server.ctx.term()
        server.executor.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def run(so: Path, count: int, size: int, write: bool, stml: bool = False, file: bool = False) -> float:
    import uvloop

    from backends import librbd
    librbd._load = lambda name: ctypes.CDLL(str(so))
    if file:
        return uvloop.run(stml_path(count, size, write, file=True))
    return uvloop.run((stml_path if stml else rbd_path)(count, size, write))


def instructions(so: Path, size: int, write: bool, stml: bool, file: bool = False,
                 keep: Path | None = None) -> float:
    """Instructions per command: callgrind at two counts, the difference divided.
    `keep`: a directory for callgrind's output of both runs (callgrind_annotate
    --inclusive=yes on each, the difference per function divided likewise)."""
    counts = []
    for n in (QD * 32, QD * 160):
        out = str(keep / f"callgrind.{n}") if keep else "/dev/null"
        p = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                            sys.executable, __file__, "--so", str(so), "--count", str(n),
                            "--size", str(size), *(["--write"] if write else []), *(["--stml"] if stml else []), *(["--file"] if file else [])],
                           capture_output=True, text=True, timeout=600)
        m = re.search(r"Collected : (\d+)", p.stderr)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"callgrind failed: {p.stderr[-2000:]}")
        counts.append(int(m.group(1)))
    return (counts[1] - counts[0]) / (QD * 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--write", action="store_true", help="writes instead of reads")
    ap.add_argument("--stml", action="store_true", help="the STML's whole receive path (see above)")
    ap.add_argument("--file", action="store_true",
                    help="the --stml path on a file LUN in /dev/shm: the baseline the RBD path is compared with")
    ap.add_argument("--instructions", action="store_true", help="count instructions (valgrind)")
    ap.add_argument("--keep", type=Path, help="with --instructions: keep callgrind's output in this directory")
    ap.add_argument("--so", type=Path, help=argparse.SUPPRESS)   # already built (the callgrind runs)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rbdpath") as work:
        so = args.so or build(Path(work))
        what = f"{'stml file ' if args.file else 'stml ' if args.stml else ''}{args.size // 1024} KiB {'write' if args.write else 'read'}"
        if args.instructions:
            print(f"{what}: {instructions(so, args.size, args.write, args.stml, args.file, args.keep):.0f} instructions per command")
        else:
            took = run(so, args.count, args.size, args.write, args.stml, args.file)
            print(f"{what}: {took / args.count * 1e6:.2f} us per command")


if __name__ == "__main__":
    main()
