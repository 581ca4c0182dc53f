#!/usr/bin/env python3
"""fetd_tcp's whole path per read (or write) command, with real I/O, counted under callgrind.

pathcost.py's fetd path stubs the carrier and the writer. Here fetd_tcp's
process runs the real FrontEndLink on a real StreamChannel to a fake STML (a
child process, not counted) that answers every rx_cmnd with an
xmit_response: read data inline under 32 KiB, else a reference into a shared
region it lends (as the STML does); and a real PduWriter, with the budget
account a connection has, writes the Data-In to a loopback TCP socket whose
other end the child reads and discards. Commands are fed QD at a time into
the ConnectionProtocol, as pathcost does. `--write`: WRITE(10) commands that
carry their data as immediate data (as qemu's libiscsi sends 4 KiB writes),
answered with status only.

The commands' bytes are one encoded batch copied into the framer's buffer
(as the socket would write them) and each CmdSN patched there (one pack_into
per command): what is counted is fetd_tcp's work, not the building of PDUs
(decision 0850: before it each command was built and encoded inside the
count). The copy stays counted: callgrind counts a `rep movsb` copy by the
byte, so a write's data weighs more than its CPU time.
Runs on trees from 24e7dec on (decisions/0811).

    PYTHONHASHSEED=0 PYTHONPATH=$PWD scripts/fetdpath.py --instructions [--size 4096 --qd 16] [--write]
    scripts/fetdpath.py --count N --size S --qd Q     # once, timed
"""
import argparse, asyncio, re, socket, struct, subprocess, sys, time

CHILD = r'''
import os, socket, struct, sys, threading, fcntl, msgpack
try:   # the STML's fixed layout of a response without sense data (as stml.server sends it)
    from stml.api.messages import pack_xmit_response
except ImportError:   # a tree before it: the dict's packing
    def pack_xmit_response(tag, status, resid):
        return msgpack.packb({"op": "xmit_response", "tag": tag, "status": status, "sense": None, "resid": resid})
sfd, tfd, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(fileno=sfd); t = socket.socket(fileno=tfd)
def sink():
    buf = bytearray(1 << 20)
    while t.recv_into(buf): pass
threading.Thread(target=sink, daemon=True).start()
NSLOT = 256
REG = NSLOT * size
fd = os.memfd_create("fake-stml", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.ftruncate(fd, REG)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
s.sendmsg([struct.pack("<4I", 0, 1, 1, REG)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
free = list(range(0, REG, size)); lent = set()
buf = b""; frees = 0; INLINE = bytes(size)
while True:
    d = s.recv(1 << 20)
    if not d: break
    buf += d; out = []
    while True:
        if len(buf) < 4: break
        n, = struct.unpack_from("<I", buf)
        if n == 0:
            if len(buf) < 12: break
            kind, k = struct.unpack_from("<2I", buf, 4)
            if len(buf) < 12 + 4 * k: break
            vals = struct.unpack_from(f"<{k}I", buf, 12); buf = buf[12 + 4 * k:]
            if kind == 2:
                for v in vals:
                    if v in lent: lent.discard(v); free.append(v)
                frees += 1
            continue
        if len(buf) < 4 + 4 * n: break
        lens = struct.unpack_from(f"<{n}I", buf, 4)
        total = 4 + 4 * n + sum((8 if l & 0x80000000 else l) for l in lens)
        if len(buf) < total: break
        h = msgpack.unpackb(buf[4 + 4 * n:4 + 4 * n + lens[0]]); buf = buf[total:]
        if h.get("op") != "rx_cmnd": continue
        hdr = pack_xmit_response(h["tag"], 0, 0)
        if h["dir"] & 1:   # a write (DataDir.WRITE): status only
            out += [struct.pack("<2I", 1, len(hdr)), hdr]
            continue
        if size < (32 << 10):   # as the STML: small read data inline
            out += [struct.pack("<3I", 2, len(hdr), size), hdr, INLINE]
            continue
        off = free.pop(); lent.add(off)
        out += [struct.pack("<3I", 2, len(hdr), 0x80000000 | size), hdr, struct.pack("<2I", off, size)]
    if out: s.sendall(b"".join(out))
'''

def cdb10(opcode, lba, blocks):
    return bytes([opcode, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"

async def run(count, size, qd, write=False):
    from fetd_tcp import pdu as P
    from fetd_tcp.keys import ConnectionParams, SessionParams
    from fetd_tcp import server as S
    from fetd_tcp.session import Connection, Session
    try:
        from fetd_tcp.wire import ConnectionProtocol, PduWriter
        new = True
    except ImportError:
        from fetd_tcp.server import ConnectionProtocol, PduWriter
        new = False
    from stml.api import StreamChannel
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    tc = socket.create_connection(ls.getsockname()); ts, _ = ls.accept(); ls.close()
    tc.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(b.fileno()), str(ts.fileno()), str(size)],
                             pass_fds=(b.fileno(), ts.fileno()))
    b.close(); ts.close()
    fe = S.IscsiFrontEnd("ipc:///nonexistent/full", [])
    link = fe.link
    recv = getattr(link, "_receiver", link._on_message)
    state: dict = {"fut": None}

    def dispatched():   # the responses of one read of the stream are handled and flushed
        fe.messages_handled()
        f = state["fut"]
        if f is not None and not fe.tags.tasks and not f.done():
            f.set_result(None)
    # (not a PduWriter subclass whose flush says so: the compiled build's takes none, decisions/0830)
    link._channel = StreamChannel(a, recv, lambda: None, on_dispatched=dispatched)
    reader, writer = await asyncio.open_connection(sock=tc)
    session = Session(1, b"\x80" + bytes(5), "iqn.x", "iqn.t", 1,
                      SessionParams(max_burst_length=262144), 1, 1, 128)
    params = ConnectionParams(max_send_data_segment_length=262144, max_recv_data_segment_length=262144)
    loop = asyncio.get_running_loop()
    from fetd_tcp.budget import Budget
    from fetd_tcp.limits import Limits
    account = Budget(Limits.from_env().max_buffered).open("iqn.x")
    if new:
        out = PduWriter(writer, params, fe.pending_output, account, link.scsi_target_done, "127.0.0.1")
    else:
        out = PduWriter(writer, params, fe.pending_output, account)
    conn = Connection(session, 0, params, 7, out, link, fe.tags, lambda: None, lambda c, p: [],
                      account=account)
    session.connections[0] = conn
    proto = ConnectionProtocol(conn, link, writer.transport)
    # the transport tells it when its buffer drains (the writer's responses held there
    # are done then, decisions/0863); the commands are still fed below, not read
    writer.transport.set_protocol(proto)
    blocks = size // 512
    # one batch encoded; every batch is a copy with its CmdSNs patched (ITTs repeat:
    # each batch's tasks are over before the next one comes)
    data = bytes(size) if write else b""
    cmds = [P.ScsiCommand(itt, P.int_to_lun(0), cdb10(0x2A if write else 0x28, itt * blocks, blocks),
                          size, 0, 0, read=not write, write=write, data_length=len(data)).encode()
            + data for itt in range(qd)]
    starts = [sum(map(len, cmds[:i])) for i in range(qd)]
    batch = b"".join(cmds)
    cmd_sn = struct.Struct(">I").pack_into
    n = len(batch)
    await asyncio.sleep(0.05)   # the region arrives
    t0 = time.perf_counter()
    for sn in range(1, count - count % qd + 1, qd):
        state["fut"] = loop.create_future()
        buf = proto.get_buffer(n)   # as the socket would: the batch written where the framer reads
        buf[:n] = batch
        for i in range(qd):
            cmd_sn(buf, starts[i] + 24, sn + i)
        proto.buffer_updated(n)
        await state["fut"]
    took = time.perf_counter() - t0
    writer.close()
    link._channel.sock.close()
    child.wait(10)
    await asyncio.sleep(0)
    if proto.done.done():
        proto.done.exception()   # the child's end resets the connection: expected, not reported
    return took

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=4000)
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--qd", type=int, default=8)
    ap.add_argument("--instructions", action="store_true")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--write", action="store_true", help="WRITE commands with immediate data")
    a = ap.parse_args()
    if a.instructions:
        counts = []
        ns = (a.qd * 40, a.qd * 200)
        for n in ns:
            p = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                                __file__, "--count", str(n), "--size", str(a.size), "--qd", str(a.qd)]
                               + (["--no-uvloop"] if a.no_uvloop else []) + (["--write"] if a.write else []),
                               capture_output=True, text=True, timeout=900)
            m = re.search(r"Collected : (\d+)", p.stderr)
            if not m: raise SystemExit(p.stderr[-3000:])
            counts.append(int(m.group(1)))
        print(f"{(counts[1] - counts[0]) / (ns[1] - ns[0]):.0f} instructions per {'write' if a.write else 'read'}")
        return
    if not a.no_uvloop:
        import uvloop; uvloop.install()
    took = asyncio.run(run(a.count, a.size, a.qd, a.write))
    print(f"{took / a.count * 1e6:.1f} us per {'write' if a.write else 'read'}")

main()
