"""The QEMU side of vhost-user-scsi, in Python: the master that a test uses
to drive a back end deterministically.

It owns guest memory (a memfd, shared over SCM_RIGHTS as QEMU's
memory-backend-memfd does), lays the split rings out in it, hands over
kick/call eventfds, and plays the guest driver: descriptors (direct,
indirect, or hand-made hostile ones), the available ring, kicks, and the
used ring. The memfd is larger than the region announced in the memory
table: the bytes around the region are canaries that show whether the back
end ever touched memory outside the table.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from support.procs import stop_pid

# vhost-user (QEMU docs/interop/vhost-user.rst)
GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
F_NEED_REPLY, F_REPLY = 1 << 3, 1 << 2
PROTOCOL_FEATURES_BIT = 30
PF_MQ, PF_REPLY_ACK = 0, 3
VERSION_1, INDIRECT_DESC, EVENT_IDX = 32, 28, 29
SCSI_HOTPLUG, SCSI_CHANGE = 1, 2
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4

# virtio-scsi
REQ = struct.Struct("<8sQBBB32s")
RESP = struct.Struct("<IIHBB")
RESP_SIZE = 108
EVENT = struct.Struct("<I8sI")
TMF_REQ = struct.Struct("<II8sQ")
AN_REQ = struct.Struct("<I8sI")

CANARY = 0xA5
PAGE = 4096


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event, on the driver's side: kick (or, for the
    device, interrupt) when the index passed `event` going old -> new."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def lun_field(lun: int, target: int = 0) -> bytes:
    """As Linux fills it: 1, target, 0x40 | LUN high bits, LUN low bits."""
    return bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


class GuestRam:
    """A memfd: canary page, the region the table announces, canary page.
    Addresses handed to the back end are guest-physical (`gpa`) or, for the
    rings, the master's virtual addresses (`uva`): both are made-up bases,
    so a back end that confuses them touches nothing."""

    GPA_BASE = 0x4000_0000
    UVA_BASE = 0x7F00_0000_0000

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("vhost-test-guest")
        os.ftruncate(self.fd, size + 2 * PAGE)
        import mmap
        self.map = mmap.mmap(self.fd, size + 2 * PAGE)
        self.map[:] = bytes([CANARY]) * (size + 2 * PAGE)
        self.region = memoryview(self.map)[PAGE:PAGE + size]
        self.region[:] = bytes(size)
        self.top = 0

    def alloc(self, n: int, align: int = 16) -> int:
        """A gpa of n zeroed bytes (a bump allocator: tests are short)."""
        self.top = -(-self.top // align) * align
        if self.top + n > self.size:
            raise MemoryError("test guest memory exhausted")
        gpa = self.GPA_BASE + self.top
        self.top += n
        return gpa

    def view(self, gpa: int, n: int) -> memoryview:
        off = gpa - self.GPA_BASE
        assert 0 <= off and off + n <= self.size
        return self.region[off:off + n]

    def uva(self, gpa: int) -> int:
        return gpa - self.GPA_BASE + self.UVA_BASE

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.view(gpa, n))

    def canaries_intact(self) -> bool:
        whole = memoryview(self.map)
        return (whole[:PAGE] == bytes([CANARY]) * PAGE
                and whole[PAGE + self.size:] == bytes([CANARY]) * PAGE)

    def table_entry(self) -> bytes:
        return struct.pack("<4Q", self.GPA_BASE, self.size, self.UVA_BASE, PAGE)


class DriverQueue:
    """The driver's side of one split virtqueue in guest memory."""

    def __init__(self, ram: GuestRam, index: int, size: int, base: int = 0) -> None:
        self.ram, self.index, self.size = ram, index, size
        self.desc = ram.alloc(16 * size, 16)
        self.avail = ram.alloc(6 + 2 * size, 2)
        self.used = ram.alloc(6 + 8 * size, 4)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.free = list(range(size))
        self.avail_idx = base
        self.last_used = base
        self.in_use: dict[int, list[int]] = {}   # head -> descriptor indexes it holds
        self._put16(self.avail + 2, base)
        self._put16(self.used + 2, base)
        self.want_interrupts()

    def _put16(self, gpa: int, v: int) -> None:
        self.ram.write(gpa, struct.pack("<H", v & 0xFFFF))

    def _get16(self, gpa: int) -> int:
        return struct.unpack("<H", self.ram.read(gpa, 2))[0]

    def want_interrupts(self, used_event: int | None = None) -> None:
        """Event index: interrupt me once the used index passes `used_event`
        (default: the next completion)."""
        self._put16(self.avail + 4 + 2 * self.size, self.last_used if used_event is None else used_event)

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Put a chain of (gpa, length, device-writable) buffers in the ring
        (not yet published: see publish)."""
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            for k, (addr, n, w) in enumerate(bufs):
                flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k + 1 < len(bufs) else 0)
                self.ram.write(table + 16 * k, struct.pack("<QIHH", addr, n, flags, k + 1))
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(bufs), DESC_F_INDIRECT)
            self.in_use[head] = [head]
            return self.offer(head)
        idx = [self.free.pop(0) for _ in bufs]
        for k, (addr, n, w) in enumerate(bufs):
            last = k + 1 == len(bufs)
            flags = (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT)
            self.write_desc(idx[k], addr, n, flags, 0 if last else idx[k + 1])
        self.in_use[idx[0]] = idx
        return self.offer(idx[0])

    def offer(self, head: int) -> int:
        """Write `head` into the next avail slot (not yet published)."""
        self._put16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self, kick: bool = True) -> None:
        self._put16(self.avail + 2, self.avail_idx)
        if kick:
            os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return self._get16(self.used + 2)

    def avail_event(self) -> int:
        return self._get16(self.used + 4 + 8 * self.size)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written) of every completion since the last call; their
        descriptors are free again."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, n = struct.unpack("<II", self.ram.read(slot, 8))
            out.append((head, n))
            self.free += self.in_use.pop(head, [])
            self.last_used = (self.last_used + 1) & 0xFFFF
        self.want_interrupts()
        return out

    def wait_used(self, count: int = 1, timeout: float = 20.0) -> list[tuple[int, int]]:
        """Wait for `count` completions, by the call eventfd (not a timing assertion:
        the timeout only ends a hung test)."""
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while True:
            got += self.take_used()
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {self.index}: {len(got)} of {count} completions")
            if select.select([self.call], [], [], min(left, 1.0))[0]:
                self.interrupts()

    def interrupts(self) -> int:
        """How many times the device signalled since the last look."""
        try:
            return os.eventfd_read(self.call)
        except BlockingIOError:
            return 0


@dataclass
class ScsiResult:
    response: int
    status: int
    sense: bytes
    resid: int
    data: bytes
    written: int


class Pending:
    """A virtio-scsi command in the ring, and where its answer will be."""

    def __init__(self, q: DriverQueue, head: int, resp: int, data_in: int, n_in: int) -> None:
        self.q, self.head, self.resp, self.data_in, self.n_in = q, head, resp, data_in, n_in

    def result(self, written: int) -> ScsiResult:
        ram = self.q.ram
        sense_len, resid, _, status, response = RESP.unpack(ram.read(self.resp, RESP.size))
        sense = ram.read(self.resp + RESP.size, min(sense_len, 96))
        data = ram.read(self.data_in, self.n_in) if self.n_in else b""
        return ScsiResult(response, status, sense, resid, data, written)


class VhostMaster:
    """A vhost-user master connection plus a virtio-scsi driver on top."""

    def __init__(self, path: str, mem_size: int = 8 << 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.ram = GuestRam(mem_size)
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0
        self.tag = 0

    def close(self) -> None:
        self.sock.close()
        for q in self.queues.values():
            os.close(q.kick)
            os.close(q.call)
        self.queues.clear()
        os.close(self.ram.fd)

    # ---------------------------------------------------------------- messages
    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             need_reply: bool = False) -> None:
        flags = 1 | (F_NEED_REPLY if need_reply else 0)
        data = struct.pack("<3I", request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv(self, expect: int) -> bytes:
        header = self._recv_exact(12)
        request, flags, size = struct.unpack("<3I", header)
        assert flags & F_REPLY, f"not a reply: flags {flags:#x}"
        assert request == expect, f"a reply to {request}, not {expect}"
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the back end closed the connection")
            buf += chunk
        return buf

    def call(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes:
        self.send(request, payload, fds)
        return self.recv(request)

    def acked(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> int:
        """Send with need_reply (REPLY_ACK): 0 is success."""
        self.send(request, payload, fds, need_reply=True)
        return struct.unpack("<Q", self.recv(request))[0]

    def u64(self, request: int) -> int:
        return struct.unpack("<Q", self.call(request))[0]

    # ---------------------------------------------------------------- set-up
    def negotiate(self, event_idx: bool = True, indirect: bool = True, extra: int = 0) -> int:
        offered = self.u64(GET_FEATURES)
        assert offered >> PROTOCOL_FEATURES_BIT & 1
        protocol = self.u64(GET_PROTOCOL_FEATURES)
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol & (1 << PF_MQ | 1 << PF_REPLY_ACK)))
        self.send(SET_OWNER)
        want = 1 << VERSION_1 | 1 << SCSI_HOTPLUG | 1 << SCSI_CHANGE | 1 << PROTOCOL_FEATURES_BIT | extra
        if event_idx:
            want |= 1 << EVENT_IDX
        if indirect:
            want |= 1 << INDIRECT_DESC
        self.features = want & (offered | extra)
        self.send(SET_FEATURES, struct.pack("<Q", self.features))
        assert self.acked(SET_MEM_TABLE, struct.pack("<2I", 1, 0) + self.ram.table_entry(),
                          (self.ram.fd,)) == 0
        return offered

    def setup_queue(self, index: int, size: int = 32, base: int = 0, enable: bool = True) -> DriverQueue:
        q = DriverQueue(self.ram, index, size, base)
        self.queues[index] = q
        self.start_queue(q, base, enable)
        return q

    def start_queue(self, q: DriverQueue, base: int, enable: bool = True) -> None:
        ram = self.ram
        self.send(SET_VRING_NUM, struct.pack("<2I", q.index, q.size))
        self.send(SET_VRING_BASE, struct.pack("<2I", q.index, base))
        assert self.acked(SET_VRING_ADDR, struct.pack("<2I4Q", q.index, 0, ram.uva(q.desc), ram.uva(q.used),
                                                      ram.uva(q.avail), 0)) == 0
        self.send(SET_VRING_KICK, struct.pack("<Q", q.index), (q.kick,))
        self.send(SET_VRING_CALL, struct.pack("<Q", q.index), (q.call,))
        if enable:
            assert self.acked(SET_VRING_ENABLE, struct.pack("<2I", q.index, 1)) == 0

    def stop_queue(self, index: int) -> int:
        """Disable and stop a ring (as QEMU does): the back end's next avail index."""
        self.send(SET_VRING_ENABLE, struct.pack("<2I", index, 0))
        reply = self.call(GET_VRING_BASE, struct.pack("<2I", index, 0))
        return struct.unpack("<2I", reply)[1]

    def start(self, request_queues: int = 1, size: int = 32) -> None:
        """The whole bring-up: features, memory, control + event + request queues."""
        self.negotiate()
        for i in range(2 + request_queues):
            self.setup_queue(i, size)

    # ---------------------------------------------------------------- virtio-scsi
    def submit(self, q: DriverQueue, cdb: bytes, data_out: bytes = b"", data_in: int = 0,
               lun: int = 0, target: int = 0, attr: int = 0, tag: int | None = None,
               indirect: bool = False, pieces: int = 1, publish: bool = True) -> Pending:
        """A command: request header (+ write data) readable, response (+ read
        data) writable; the data split in `pieces` descriptors."""
        if tag is None:
            self.tag += 1
            tag = self.tag
        ram = self.ram
        req = ram.alloc(REQ.size)
        ram.write(req, REQ.pack(lun_field(lun, target), tag, attr, 0, 0, cdb.ljust(32, b"\0")))
        resp = ram.alloc(RESP_SIZE)
        bufs: list[tuple[int, int, bool]] = [(req, REQ.size, False)]
        if data_out:
            out = ram.alloc(len(data_out))
            ram.write(out, data_out)
            bufs += _split(out, len(data_out), pieces, False)
        bufs.append((resp, RESP_SIZE, True))
        din = 0
        if data_in:
            din = ram.alloc(data_in)
            bufs += _split(din, data_in, pieces, True)
        head = q.add(bufs, indirect)
        if publish:
            q.publish()
        return Pending(q, head, resp, din, data_in)

    def run(self, q: DriverQueue, cdb: bytes, data_out: bytes = b"", data_in: int = 0,
            **kw: object) -> ScsiResult:
        p = self.submit(q, cdb, data_out, data_in, **kw)   # type: ignore[arg-type]
        return self.wait(p)

    @staticmethod
    def wait(p: Pending) -> ScsiResult:
        for head, n in p.q.wait_used():
            assert head == p.head, f"completion of {head}, waiting for {p.head}"
            return p.result(n)
        raise AssertionError("unreachable")

    def tmf(self, subtype: int, lun: int = 0, tag: int = 0, target: int = 0,
            publish: bool = True) -> tuple[int, int]:
        """Queue a task management request on the control queue: (head, resp gpa)."""
        q = self.queues[0]
        req = self.ram.alloc(TMF_REQ.size)
        self.ram.write(req, TMF_REQ.pack(0, subtype, lun_field(lun, target), tag))
        resp = self.ram.alloc(1)
        head = q.add([(req, TMF_REQ.size, False), (resp, 1, True)])
        if publish:
            q.publish()
        return head, resp

    def event_buffers(self, n: int) -> dict[int, int]:
        """Give the device n event buffers: {head: gpa}."""
        q = self.queues[1]
        out = {}
        for _ in range(n):
            buf = self.ram.alloc(EVENT.size)
            out[q.add([(buf, EVENT.size, True)])] = buf
        q.publish()
        return out

    def read_event(self, gpa: int) -> tuple[int, bytes, int]:
        return EVENT.unpack(self.ram.read(gpa, EVENT.size))


def _split(addr: int, n: int, pieces: int, writable: bool) -> list[tuple[int, int, bool]]:
    step = -(-n // pieces)
    return [(addr + off, min(step, n - off), writable) for off in range(0, n, step)]


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def inquiry(alloc: int = 96) -> bytes:
    return struct.pack(">BBBHB", 0x12, 0, 0, alloc, 0)


def wait_socket(path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no socket at {path}")
        time.sleep(0.02)


class VhostProcess:
    """`python -m fetd_vhost` on a private socket; stopped by its PID."""

    def __init__(self, endpoint: str, socket_path: str, target: str, log_dir: str,
                 extra: tuple[str, ...] = ()) -> None:
        import subprocess
        import sys
        self.socket_path = socket_path
        self.out_path = os.path.join(log_dir, f"fetd_vhost.{os.getpid()}.{id(self):x}.out")
        self.err_path = self.out_path[:-4] + ".err"
        argv = [sys.executable, "-m", "fetd_vhost", "--socket", socket_path, "--target", target,
                "--stml", endpoint, *extra]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def log(self) -> str:
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"fetd_vhost exited {self.proc.returncode}:\n{self.output()}\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} from fetd_vhost:\n{self.output()}\n{self.log()}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_pid(self.proc)
