#!/usr/bin/env python3
"""Python cost per command of the three hot paths, without an initiator.

    scripts/pathcost.py [--count 20000] [--size 4096]
    scripts/pathcost.py --instructions     # instructions per command, under valgrind

- stml: READ(10) rx_cmnd messages through the STML's receive path (header
  unpacked and checked, the command's checks, the backend read,
  xmit_response packed); the stream to the front end is a stub that lends
  shared read data as StreamChannel does, and every QD responses the front
  end's scsi_target_done and slot returns come back.
- stml-write: the same for WRITE(10) with its data sent along (immediate
  data, as qemu sends 4 KiB writes), written to the backend.
- stml-thin: what qemu sends for each read of 32 KiB and more on a thin
  LUN: GET LBA STATUS for one descriptor, then a 64 KiB READ(10), on a
  sparse file fragmented by 4 KiB writes 20 KiB apart (as bench.py
  --thin); the cost is per pair, with the event loop running (a backend
  call in a worker thread is counted with its hand-offs).
- fetd: SCSI Command PDUs framed and handled by fetd_tcp, rx_cmnd packed,
  xmit_response (packed here, as the STML would) dispatched, the Data-In
  PDU encoded; sixteen commands per read, as at QD16.
- carrier: messages (header and `size` bytes) over StreamChannel on a Unix
  socket pair, sixteen at a time: send, parse, deliver.
- stml-traced: the stml path while a trace is recorded (stml.trace, to
  /dev/null): what recording adds to the STML's work per command.
- stml-timed: the stml path with stage timing on (`--timing`, stml.timing):
  the front end's stamps on rx_cmnd and scsi_target_done, the STML's taken
  and sent on xmit_response, and the histograms.
- stml-process, stml-process-write: the STML's whole process path, which the
  stml paths stub: the real server (its event loop, uvloop when installed,
  as `scsi-target run`), its stream socket's receive and parse of rx_cmnd
  batches, the commands, the responses' sendmsg, the file backend on
  /dev/shm. A fake front end (a child process, not counted: valgrind does
  not follow it) runs fetd_tcp's FrontEndLink and sends QD commands at a
  time, each wave once the last one's responses are all in, flushed as
  fetd_tcp flushes what one read from its initiators brought.

Time per command moves by 10-20% between runs on a shared machine. The
instruction count (valgrind's callgrind, `apt-get install valgrind`) does
not: each path runs twice with different counts and the difference is
divided, so start-up cancels. Kernel work (system calls, copies) is not in
it; bench.py measures the whole.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stml.api import StreamChannel, pack, run_loop, unpack  # noqa: E402

QD = 16


def cdb10(opcode: int, lba: int, blocks: int) -> bytes:
    """READ(10) (0x28) or WRITE(10) (0x2A)."""
    return bytes([opcode, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


async def stml_path(count: int, size: int, write: bool = False, traced: bool = False,
                    timed: bool = False) -> float:
    from stml import config
    from stml.api import SharedRegion
    from stml.server import StmlServer
    # in memory when possible, as bench.py's LUNs: the backend read is then a page-cache copy
    work = Path(tempfile.mkdtemp(prefix="pathcost", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    server: StmlServer | None = None
    try:
        img = work / "lun.img"
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        server = StmlServer(config.load(data_dir=str(work / "data"), luns=(f"file:{img},thick",)))
        ident = b"\0stream-1"
        replies: list = []

        lent: list[int] = []

        class Stream:   # what StmlServer needs of a StreamChannel; it lends shared slots as one does
            region = SharedRegion()

            def send(self, frames: list) -> None:
                for frame in frames[1:]:       # as StreamChannel's encode() does
                    if type(frame) is memoryview and id(frame.obj) in self.region.slots:
                        ref = self.region.lend_slot(frame)
                        assert ref is not None
                        lent.append(ref[0])
                replies.append(frames)

        server.streams[ident] = Stream()  # type: ignore[assignment]
        if traced:
            await server.traces.start(os.devnull, force=True)
        stamps: dict = {}   # the front end's, with timing on (a front end on this host)
        if timed:
            from stml.api.link import boot_id
            from stml.timing import Timing
            server.emulator.enable_timing(Timing(boot_id()))
            stamps = {"caps": ["timing"], "boot_id": boot_id()}
        receive = server.received if traced else server._receive   # (the carriers' entry point)
        receive([ident, pack({"op": "register_target_front_end", "name": "pathcost",
                                      "kind": "bench", "version": [1, 0], **stamps})])
        if timed:
            stamps = {"ts": [time.monotonic_ns()] * 2}
        target = next(iter(server.emulator.targets))
        receive([ident, pack({"op": "register_nexus", "nexus": 1, "initiator": "iqn.x",
                                      "target": target, "tpg": 1})])
        blocks = size // 512
        payload = [bytes(size)] if write else []
        messages = [[ident, pack({"op": "rx_cmnd", "tag": tag, "nexus": 1, "lun": 0,
                                  "cdb": cdb10(0x2A if write else 0x28, tag * blocks % (1 << 20), blocks),
                                  "attr": 0, "dir": 1 if write else 2, "len": size,
                                  "unsol": size if write else 0, **stamps}), *payload]
                    for tag in range(count + 1)]
        # what the front end reports once it sent each QD responses (packed by the front end)
        done = [[ident, pack({"op": "scsi_target_done", "tags": list(range(first, first + QD)),
                              **({"ts": [time.monotonic_ns()] * QD} if timed else {})})]
                for first in range(0, count, QD)][::-1]   # (popped from the end: the first first)
        receive(messages.pop())        # takes the power-on unit attention
        replies.clear()
        start = time.perf_counter()
        for m in messages:
            receive(m)
            if len(replies) >= QD:
                assert unpack(replies[-1][0])["status"] == 0, "the commands succeed"
                # the front end sent them: it reports them done and hands the shared slots back
                receive(done.pop())
                Stream.region.give_back(lent)
                lent.clear()
                replies.clear()
        took = time.perf_counter() - start
        replies.clear()
        receive([ident, pack({"op": "rx_cmnd", "tag": count + 1, "nexus": 1, "lun": 0,
                                      "cdb": cdb10(0x28, 0, blocks), "attr": 0, "dir": 2, "len": size})])
        header, data = replies[-1]
        assert unpack(header)["status"] == 0 and len(data) == size, "the reads succeed"
    finally:   # a failed run too: no 1 GiB file left in /dev/shm, no context left to hang at exit
        if server is not None:
            await server.traces.stop("pathcost", "the run ended")   # (its writer thread and file)
            server.sock.close(linger=0)   # else the context waits on the unbound socket
            server.ctx.term()
            server.executor.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return took


THIN_READ = 64 << 10
THIN_EXTENTS = 2048          # 4 KiB written every 20 KiB: 40 MiB of 4096 data extents and holes


async def stml_thin_path(count: int, size: int) -> float:
    """GET LBA STATUS (one descriptor) and a 64 KiB read, pair after pair;
    `size` is not used: qemu asks before reads of 32 KiB and more only."""
    import backends.file
    from stml import config
    from stml.api import SharedRegion
    from stml.server import StmlServer
    # under callgrind (50 times slower) a lookup can take over 1 ms, which the file backend
    # takes for a wait on the device: it sends the next 1024 lookups to worker threads, and
    # the count would depend on the machine's load (559k instead of 271k per pair on a busy
    # machine). The file is in memory and never waits: count the loop's path.
    backends.file._SLOW_LOOKUP_NS = 1 << 62
    work = Path(tempfile.mkdtemp(prefix="pathcost", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    server: StmlServer | None = None
    try:
        img = work / "lun.img"
        fd = os.open(img, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 1 << 30)
            for i in range(THIN_EXTENTS):
                os.pwrite(fd, b"\xab" * 4096, i * 20480)
        finally:
            os.close(fd)
        server = StmlServer(config.load(data_dir=str(work / "data"), luns=(f"file:{img}",)))
        ident = b"\0stream-1"
        replies: list = []
        want = [0]
        arrived: list[asyncio.Future] = []

        class Stream:   # what StmlServer needs of a StreamChannel
            region = SharedRegion()

            def send(self, frames: list) -> None:
                replies.append(frames)
                if arrived and len(replies) >= want[0]:
                    arrived.pop().set_result(None)

        server.streams[ident] = Stream()  # type: ignore[assignment]
        server._receive([ident, pack({"op": "register_target_front_end", "name": "pathcost",
                                      "kind": "bench", "version": [1, 0]})])
        target = next(iter(server.emulator.targets))
        server._receive([ident, pack({"op": "register_nexus", "nexus": 1, "initiator": "iqn.x",
                                      "target": target, "tpg": 1})])
        blocks = THIN_READ // 512
        span = THIN_EXTENTS * 20480 // 512

        def pair(tag: int) -> list[list]:
            lba = tag * blocks % span
            gls = bytes([0x9E, 0x12]) + lba.to_bytes(8, "big") + (24).to_bytes(4, "big") + bytes(2)
            return [[ident, pack({"op": "rx_cmnd", "tag": 2 * tag, "nexus": 1, "lun": 0, "cdb": gls,
                                  "attr": 0, "dir": 2, "len": 24, "unsol": 0})],
                    [ident, pack({"op": "rx_cmnd", "tag": 2 * tag + 1, "nexus": 1, "lun": 0,
                                  "cdb": cdb10(0x28, lba, blocks), "attr": 0, "dir": 2, "len": THIN_READ,
                                  "unsol": 0})]]

        async def one(tag: int) -> None:
            want[0] = len(replies) + 2
            for m in pair(tag):
                server._receive(m)
            if len(replies) < want[0]:
                arrived.append(asyncio.get_running_loop().create_future())
                await arrived[-1]

        await one(count)                       # takes the power-on unit attention
        replies.clear()
        start = time.perf_counter()
        for tag in range(count):
            await one(tag)
            if len(replies) >= QD:
                assert all(unpack(r[0])["status"] == 0 for r in replies), "the commands succeed"
                replies.clear()                # the slots of shared read data are free again
        took = time.perf_counter() - start
        replies.clear()
        await one(count + 1)
        got = {unpack(r[0])["tag"]: (unpack(r[0])["status"], len(r[1])) for r in replies}
        assert got == {2 * count + 2: (0, 24), 2 * count + 3: (0, THIN_READ)}, "both answer"
    finally:   # a failed run too: no 1 GiB file left in /dev/shm, no context left to hang at exit
        if server is not None:
            server.sock.close(linger=0)
            server.ctx.term()
            server.executor.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return took


async def fetd_path(count: int, size: int) -> float:
    from fetd_tcp import pdu as P
    from fetd_tcp.keys import ConnectionParams, SessionParams
    from fetd_tcp.server import IscsiFrontEnd
    from fetd_tcp.wire import ConnectionProtocol
    from fetd_tcp.session import Connection, Session
    fe = IscsiFrontEnd("ipc:///nonexistent/pathcost", [])
    to_stml: list = []
    sent = [0]

    class Channel:   # what FrontEndLink needs of a carrier
        def send(self, frames: list) -> None:
            to_stml.append(frames)

        def hold(self) -> None:
            pass

        def flush(self) -> None:
            pass

    class Transport:
        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 0

        def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
            pass   # (ConnectionProtocol hears a drain at once: 0864)

    def out(pdu: Any, data: object) -> None:
        pdu.encode()
        sent[0] += 1

    fe.link._channel = Channel()  # type: ignore[assignment]
    session = Session(1, b"\x80" + bytes(5), "iqn.x", "iqn.t", 1,
                      SessionParams(max_burst_length=1 << 20), 1, 1, 128)
    params = ConnectionParams(max_send_data_segment_length=1 << 18,
                              max_recv_data_segment_length=1 << 18)
    conn = Connection(session, 0, params, 7, out, fe.link, fe.tags, lambda: None,
                      lambda c, pairs: [])
    session.connections[0] = conn
    proto = ConnectionProtocol(conn, fe.link, Transport())  # type: ignore[arg-type]
    data = memoryview(bytearray(size))
    blocks = size // 512
    reads = []
    for first in range(0, count - count % QD, QD):
        reads.append(b"".join(
            P.ScsiCommand(itt, P.int_to_lun(0), cdb10(0x28, itt * blocks % (1 << 20), blocks), size,
                          itt + 1, 0, read=True).encode() for itt in range(first, first + QD)))
    start = time.perf_counter()
    for raw in reads:
        buf = proto.get_buffer(len(raw))
        buf[:len(raw)] = raw
        proto.buffer_updated(len(raw))
        commands, to_stml[:] = to_stml[:], []
        for frames in commands:
            header = unpack(frames[0])
            if header["op"] != "rx_cmnd":   # scsi_target_done for the previous ones
                continue
            tag = header["tag"]
            fe.link._on_message([pack({"op": "xmit_response", "tag": tag, "status": 0,
                                       "sense": None, "resid": 0}), data])
        fe.messages_handled()
    took = time.perf_counter() - start
    assert sent[0] == len(reads) * QD, "every command got its Data-In"
    return took


# The fake front end of the stml-process paths: a FrontEndLink, as fetd_tcp's,
# on the STML's stream socket (argv: endpoint, target, count, size, write).
FRONT_END = r'''
import asyncio, sys, time
from stml.api import FrontEndLink, run_loop
endpoint, target, count, size, write = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
QD = int(sys.argv[6])
blocks = size // 512

def cdb(opcode, lba):   # iSCSI's CDB field is 16 bytes: the link's fixed layout takes it
    return bytes([opcode, 0]) + lba.to_bytes(4, "big") + bytes(1) + blocks.to_bytes(2, "big") + bytes(7)

class Handler:
    def __init__(self):
        self.got = self.sent = 0
        self.wave = None
        self.ready = None
    def detect(self, d): pass
    def nexus_ready(self, nexus, error): self.ready.set_result(error)
    def rdy_to_xfer(self, tag, offset, length): raise SystemExit("no R2T expected")
    def xmit_response(self, tag, status, sense, resid, frames):
        if tag and (status or resid or (not write and sum(map(len, frames)) != size)):
            raise SystemExit(f"command {tag}: status {status} resid {resid}")
        link.scsi_target_done([tag])   # sent on: its read data may go back
        self.got += 1
    def messages_handled(self):
        if self.wave is not None and self.got >= self.sent and not self.wave.done():
            self.wave.set_result(None)
    def task_mgmt_fn_done(self, *a): pass
    def report_aen(self, *a): pass
    def link_lost(self): raise SystemExit("link lost")

data = [bytes(size)] if write else []
h = Handler()
link = FrontEndLink(endpoint, "bench", h, name="pathcost")

async def wave(first, n):
    h.wave = asyncio.get_running_loop().create_future()
    for tag in range(first, first + n):
        h.sent += 1
        link.rx_cmnd(tag, 1, 0, cdb(0x2A if write else 0x28, tag * blocks % (1 << 20)), 0,
                     1 if write else 2, size, size if write else 0, data)
    link.flush()   # as fetd_tcp, once it handled what one read from its initiators brought
    await h.wave

async def main():
    h.ready = asyncio.get_running_loop().create_future()
    link.start()
    await link.wait_ready(60)
    link.register_nexus(1, "iqn.2026-01.x:pathcost", target, 1)
    if await h.ready: raise SystemExit("no nexus")
    await wave(0, 1)   # takes the power-on unit attention
    start = time.perf_counter()
    for first in range(1, count + 1 - count % QD, QD):
        await wave(first, QD)
    print(time.perf_counter() - start, flush=True)
    await link.close()

run_loop(main())
'''


async def stml_process_path(count: int, size: int, write: bool = False) -> float:
    from stml import config
    from stml.server import StmlServer
    work = Path(tempfile.mkdtemp(prefix="pathcost", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    stop = asyncio.Event()
    serving: asyncio.Future | None = None
    try:
        img = work / "lun.img"
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        server = StmlServer(config.load(data_dir=str(work / "data"), luns=(f"file:{img},thick",)))
        serving = asyncio.ensure_future(server.serve(stop))
        await asyncio.sleep(0)   # bound: its sockets are there
        target = next(iter(server.emulator.targets))
        child = subprocess.Popen([sys.executable, "-c", FRONT_END, server.endpoint, target, str(count),
                                  str(size), "1" if write else "0", str(QD)], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        out, _ = await asyncio.get_running_loop().run_in_executor(None, child.communicate)
        if child.returncode != 0:
            raise RuntimeError(f"the fake front end failed ({child.returncode})")
    finally:   # a failed run too: the server stopped (its context closed), no 1 GiB file left
        if serving is not None:
            stop.set()
            await serving
        shutil.rmtree(work, ignore_errors=True)
    return float(out.split()[-1])


async def carrier_path(count: int, size: int) -> float:
    import socket
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    state: dict = {"got": 0, "batch": None}

    def on_message(frames: list) -> None:
        state["got"] += 1
        if state["got"] % QD == 0:
            state["batch"].set_result(None)

    sender = StreamChannel(a, lambda frames: None, lambda: None)
    receiver = StreamChannel(b, on_message, lambda: None)
    header = pack({"op": "rx_cmnd", "tag": 1234, "nexus": 1, "lun": 0, "cdb": cdb10(0x28, 0, 8),
                   "attr": 0, "dir": 1, "len": size, "unsol": size})
    data = bytes(size)
    start = time.perf_counter()
    for _ in range(count // QD):
        state["batch"] = loop.create_future()
        for _ in range(QD):
            sender.send([header, data])
        await state["batch"]
    took = time.perf_counter() - start
    sender.close()
    receiver.close()
    return took


PATHS: dict[str, Callable] = {"stml": stml_path, "stml-write": functools.partial(stml_path, write=True),
                              "stml-thin": stml_thin_path, "fetd": fetd_path, "carrier": carrier_path,
                              "stml-traced": functools.partial(stml_path, traced=True),
                              "stml-timed": functools.partial(stml_path, timed=True),
                              "stml-process": stml_process_path,
                              "stml-process-write": functools.partial(stml_process_path, write=True)}
# paths that run a process's own loop: as the process does (uvloop when installed)
OWN_LOOP = {"stml-process", "stml-process-write"}


def instructions(path: str, size: int) -> float:
    """Instructions per command: callgrind at two counts, the difference divided."""
    counts = []
    for n in (QD * 32, QD * 160):
        p = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                            sys.executable, __file__, "--path", path, "--count", str(n),
                            "--size", str(size)], capture_output=True, text=True, timeout=600)
        m = re.search(r"Collected : (\d+)", p.stderr)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"callgrind failed on {path}: {p.stderr[-2000:]}")
        counts.append(int(m.group(1)))
    return (counts[1] - counts[0]) / (QD * 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20000, help="commands per path")
    ap.add_argument("--size", type=int, default=4096, help="bytes per command (a multiple of 512)")
    ap.add_argument("--path", choices=sorted(PATHS), help="only this path")
    ap.add_argument("--instructions", action="store_true", help="count instructions (valgrind)")
    args = ap.parse_args()
    if args.size % 512 or args.count < QD:
        ap.error(f"--size must be a multiple of 512 and --count at least {QD}")
    for name in [args.path] if args.path else list(PATHS):
        if args.instructions:
            print(f"{name:10s} {instructions(name, args.size):9.0f} instructions per command", flush=True)
        else:
            took = (run_loop if name in OWN_LOOP else asyncio.run)(PATHS[name](args.count, args.size))
            n = args.count - args.count % QD
            print(f"{name:10s} {took / n * 1e6:7.2f} us per command", flush=True)


if __name__ == "__main__":
    main()
