"""fetd_vhost driven by the Python vhost-user master (tests/support):
real STML processes (or the real STML code in-process with a gate opcode,
for commands that must stay in flight), the front end as its own process,
and guest memory in a memfd with canaries around the announced region.

Covered: I/O with data checked, ring wrap, indirect tables, two request
queues, event index, every task management function, the event queue
(rescan, removal, parameter change, events missed), hostile descriptors and
messages, queue stop/start, an STML restart, and a restarted front end."""
from __future__ import annotations

import collections
import os
import select
import signal
import stat
import struct
import time

import pytest

from scsi_target.mgmt import MgmtClient
from stml.config import host_iqn
from support.gated_stml import GatedStml, gate_cdb
from support.vhost_master import (AN_REQ, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, EVENT, GET_FEATURES,
                                  GET_VRING_BASE, REQ, RESP_SIZE, SET_MEM_TABLE, SET_VRING_ADDR,
                                  VhostMaster, VhostProcess, inquiry, lun_field, need_event, read10, write10)

IQN = host_iqn()     # the STML's default target name (0207)
OK, ABORTED, BAD_TARGET, RESET, BUSY, FAILURE, SUCCEEDED = 0, 2, 3, 4, 5, 9, 10
GOOD, CHECK_CONDITION = 0, 2
TUR = bytes(6)


@pytest.fixture
def vhost(tmp_short):
    """start(endpoint) -> a running fetd_vhost on a private socket."""
    procs: list[VhostProcess] = []

    def start(endpoint: str, sock: str | None = None, attached: bool = True,
              extra: tuple[str, ...] = ()) -> VhostProcess:
        d = str(tmp_short())
        p = VhostProcess(endpoint, sock or os.path.join(d, "vm.sock"), IQN, d, extra)
        procs.append(p)
        p.wait_for("listening on")
        if attached:
            p.wait_for("attached to STML")
        return p

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def masters():
    made: list[VhostMaster] = []

    def connect(fe: VhostProcess, **kw: object) -> VhostMaster:
        m = VhostMaster(fe.socket_path, **kw)   # type: ignore[arg-type]
        made.append(m)
        return m

    yield connect
    for m in made:
        m.close()


@pytest.fixture
def gated(tmp_short):
    started: list[GatedStml] = []

    def start(data_dir=None) -> GatedStml:
        g = GatedStml(data_dir or tmp_short(), IQN).start()
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


def blocks(seed: int, n: int) -> bytes:
    return bytes((seed * 131 + i) & 0xFF for i in range(n * 512))


def sense_key(sense: bytes) -> tuple[int, int, int]:
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0xF, sense[2], sense[3]
    return sense[2] & 0xF, sense[12], sense[13]


def clear_ua(m: VhostMaster, q, lun: int = 0) -> None:
    for _ in range(8):
        if m.run(q, TUR, lun=lun).status == GOOD:
            return
    raise AssertionError("unit attentions do not clear")


# ---------------------------------------------------------------- I/O

def test_io_in_place_through_scattered_and_indirect_buffers(stml, vhost, masters):
    fe = vhost(stml.endpoint)
    assert stat.S_IMODE(os.stat(fe.socket_path).st_mode) == 0o600
    m = masters(fe)
    m.start()
    q = m.queues[2]
    r = m.run(q, inquiry(96), data_in=96)
    assert (r.response, r.status) == (OK, GOOD) and r.data[8:16] == b"SCSITGT "
    assert r.written == RESP_SIZE + r.data[4] + 5 or r.written == RESP_SIZE + 96 - r.resid
    data = blocks(1, 160)            # 80 KiB: through the STML's shared memory
    r = m.run(q, write10(100, 160), data_out=data, pieces=7)
    assert (r.response, r.status) == (OK, GOOD)
    r = m.run(q, read10(100, 160), data_in=len(data), pieces=5, indirect=True)
    assert (r.response, r.status, r.resid) == (OK, GOOD, 0) and r.data == data
    assert r.written == RESP_SIZE + len(data)
    small = blocks(2, 3)
    assert m.run(q, write10(7, 3), data_out=small, indirect=True).status == GOOD
    r = m.run(q, read10(7, 3), data_in=len(small), pieces=3)
    assert r.data == small
    # a read buffer longer than the command's data: the residual says how much is left
    r = m.run(q, read10(7, 1), data_in=2048)
    assert (r.status, r.resid, r.data[:512]) == (GOOD, 1536, small[:512])
    # a check condition carries its sense
    r = m.run(q, read10(1 << 30, 1), data_in=512)
    assert r.status == CHECK_CONDITION and sense_key(r.sense)[:2] == (5, 0x21)
    assert m.ram.canaries_intact()


def test_read_slots_come_back_once_the_data_is_in_guest_memory(gated, vhost, masters):
    """fetd_vhost says scsi_target_done for each response once its read data
    is copied into guest memory: the STML's shared read slots (reads of 32
    KiB and more) come back, and so do the receive buffers of the writes;
    nothing stays held once the commands are done. (Without done, every
    read's slot stayed lent to the front end.)"""
    g = gated()
    m = masters(vhost(g.endpoint), mem_size=16 << 20)
    m.start()
    q = m.queues[2]
    clear_ua(m, q)
    for i in range(8):
        data = blocks(i + 1, 256)            # 128 KiB
        assert m.run(q, write10(i * 256, 256), data_out=data).status == GOOD
        r = m.run(q, read10(i * 256, 256), data_in=len(data))
        assert (r.status, r.data) == (GOOD, data)

    def held() -> tuple[int, int, int]:
        (stream,) = g.server.streams.values()
        return (stream.region.in_use(), g.server.pool.in_use(),
                sum(len(fe.tasks) for fe in g.server.emulator.front_ends.values()))

    deadline = time.monotonic() + 10
    while (state := g.call(held)) != (0, 0, 0):
        assert time.monotonic() < deadline, f"still held (slots, pooled buffers, tasks): {state}"
        time.sleep(0.01)


def test_ring_wrap_with_a_full_ring_of_commands(stml, vhost, masters):
    """Queue size 8, starting 6 short of 65536: the avail and used indexes
    wrap, and every ring slot is used many times over."""
    m = masters(vhost(stml.endpoint))
    m.negotiate()
    for i in (0, 1):
        m.setup_queue(i, 8)
    q = m.setup_queue(2, 8, base=65530)
    done = 0
    for batch in range(4):
        pend = [m.submit(q, write10(8 * batch + k, 1), data_out=blocks(batch * 8 + k, 1),
                         indirect=True, publish=False)
                for k in range(8)]
        q.publish()
        got = dict(q.wait_used(8))
        assert set(got) == {p.head for p in pend}
        assert all(p.result(got[p.head]).status == GOOD for p in pend)
        done += 8
    assert q.used_idx() == (65530 + done) & 0xFFFF == 26
    for n in range(32):
        assert m.run(q, read10(n, 1), data_in=512, indirect=True).data == blocks(n, 1)
    assert m.stop_queue(2) == (65530 + 64) & 0xFFFF


def test_two_request_queues_answer_on_their_own(stml, vhost, masters):
    m = masters(vhost(stml.endpoint))
    m.start(request_queues=2)
    q2, q3 = m.queues[2], m.queues[3]
    a = [m.submit(q2, write10(200 + i, 1), data_out=blocks(10 + i, 1)) for i in range(4)]
    b = [m.submit(q3, write10(300 + i, 1), data_out=blocks(20 + i, 1)) for i in range(4)]
    assert {h for h, _ in q2.wait_used(4)} == {p.head for p in a}
    assert {h for h, _ in q3.wait_used(4)} == {p.head for p in b}
    assert m.run(q3, read10(200, 1), data_in=512).data == blocks(10, 1)
    assert m.run(q2, read10(303, 1), data_in=512).data == blocks(23, 1)


def test_event_index_interrupts_only_when_asked(stml, vhost, masters):
    m = masters(vhost(stml.endpoint))
    m.start()
    q = m.queues[2]
    m.run(q, TUR)
    q.interrupts()
    # the driver asks for no interrupt before the used index passes 100 ahead
    q.want_interrupts(used_event=(q.last_used + 100) & 0xFFFF)
    m.submit(q, TUR)
    deadline = time.monotonic() + 20
    while q.used_idx() == q.last_used:
        assert time.monotonic() < deadline, "no completion"
        time.sleep(0.01)
    assert q.avail_event() == q.avail_idx     # the device asks to be kicked for the next one
    q.take_used()                             # and asks for the next completion's interrupt
    m.submit(q, TUR)
    assert select.select([q.call], [], [], 20)[0]
    while q.used_idx() == q.last_used:
        time.sleep(0.01)
    # one interrupt in all: the first completion was not signalled (it would
    # have been, in an earlier loop iteration of the back end, before the second)
    assert q.interrupts() == 1


def wait_used_idx(q, idx: int) -> None:
    """Until the device's used index reaches idx (the deadline only ends a hung test)."""
    deadline = time.monotonic() + 20
    while q.used_idx() != idx:
        assert time.monotonic() < deadline, f"used index {q.used_idx()}, waiting for {idx}"
        select.select([q.call], [], [], 0.01)


def test_event_index_counts_one_kick_and_one_interrupt_for_a_batch(stml, vhost, masters):
    """Notifications both ways, counted (kick eventfd writes by the driver,
    call eventfd writes by the device): eight commands published at once, a
    driver that kicks only when avail_event asks and wants an interrupt only
    after the eighth completion. The device asked for the kick, takes all
    eight from it, signals once, and asks to be kicked for the next command."""
    m = masters(vhost(stml.endpoint))
    m.start()
    q = m.queues[2]
    assert m.run(q, TUR).response == OK        # (the nexus is up)
    q.take_used()
    q.interrupts()
    start = q.last_used
    q.want_interrupts(used_event=(start + 7) & 0xFFFF)
    old = q.avail_idx
    pending = [m.submit(q, read10(8 * i, 1), data_in=512, publish=False) for i in range(8)]
    q.publish(kick=False)
    kicks = 0
    if need_event(q.avail_event(), q.avail_idx, old):
        os.eventfd_write(q.kick, 1)
        kicks += 1
    wait_used_idx(q, (start + 8) & 0xFFFF)
    assert select.select([q.call], [], [], 20)[0]
    assert kicks == 1 and q.interrupts() == 1
    done = dict(q.take_used())
    assert [(r.response, r.status, r.data) for r in (p.result(done[p.head]) for p in pending)] == \
        [(OK, GOOD, bytes(512))] * 8
    assert q.avail_event() == q.avail_idx       # the next command is to be kicked


@pytest.mark.parametrize("poll_us, taken_by_the_poll", [(0, False), (10_000, True)])
def test_polling_takes_the_next_request_without_a_kick(stml, vhost, masters, poll_us, taken_by_the_poll):
    """--poll-us: once everything is answered, the front end watches the
    request rings with the guest's notifications off (avail_event one behind
    what it took). A driver that kicks only when avail_event asks (as
    Linux's does) then sends QD1 commands without kicking; without the poll
    every one is kicked. Counted: kicks over 20 commands whose data reads back
    (a window that ended before the next command costs that command a kick,
    not its answer: some must go without). The poll gives up as soon as
    another task wants its CPU (0312), so the front end gets a CPU of its own
    here, the STML and this driver the others: on a busy two-CPU machine
    they would otherwise end every window."""
    fe = vhost(stml.endpoint, extra=("--poll-us", str(poll_us)))
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "needs two CPUs"
    mine = set(cpus)
    for pid, where in ((fe.proc.pid, {cpus[-1]}), (stml.pid, set(cpus[:-1]))):
        for tid in os.listdir(f"/proc/{pid}/task"):   # every thread of theirs
            os.sched_setaffinity(int(tid), where)
    os.sched_setaffinity(0, set(cpus[:-1]))
    try:
        m = masters(fe)
        m.start()
        q = m.queues[2]
        assert m.run(q, write10(40, 8), data_out=blocks(7, 8)).response == OK
        kicks = 0
        for _ in range(20):
            old = q.avail_idx
            p = m.submit(q, read10(40, 8), data_in=4096, publish=False)
            q.publish(kick=False)
            if need_event(q.avail_event(), q.avail_idx, old):
                os.eventfd_write(q.kick, 1)
                kicks += 1
            r = m.wait(p)
            assert (r.response, r.status, r.data) == (OK, GOOD, blocks(7, 8))
    finally:
        os.sched_setaffinity(0, mine)
    assert kicks < 20 if taken_by_the_poll else kicks == 20


def test_polling_stops_while_the_guest_takes_longer_than_the_window(stml, vhost, masters):
    """The poll pays only when the guest's next request comes within the
    window: after a guest that paused longer (here 3x the window between
    commands), the next command is kicked (no poll after that answer), and a
    guest quick again is polled for from the following answer on. Counted:
    which commands the device asked to be kicked for."""
    m = masters(vhost(stml.endpoint, extra=("--poll-us", "10000")))
    m.start()
    q = m.queues[2]
    assert m.run(q, TUR).response == OK

    def commands(n: int, pause: float) -> list[bool]:
        kicked = []
        for _ in range(n):
            time.sleep(pause)
            old = q.avail_idx
            p = m.submit(q, TUR, publish=False)
            q.publish(kick=False)
            kicked.append(need_event(q.avail_event(), q.avail_idx, old))
            if kicked[-1]:
                os.eventfd_write(q.kick, 1)
            assert m.wait(p).response == OK
        return kicked

    assert commands(3, 0.03) == [True] * 3     # each pause outlasted the window
    quick = commands(20, 0)
    assert quick[0] and not all(quick)        # the first after the pauses was kicked, not all after it


def test_no_interrupt_flag_without_event_index(stml, vhost, masters):
    """A driver without event index (VIRTQ_AVAIL_F_NO_INTERRUPT in the
    available ring's flags) gets no interrupt while it sets the flag, and
    one per completion pass once it clears it."""
    m = masters(vhost(stml.endpoint))
    m.negotiate(event_idx=False)
    for i in range(3):
        m.setup_queue(i)
    q = m.queues[2]
    assert m.run(q, TUR).response == OK
    q.interrupts()
    m.ram.write(q.avail, struct.pack("<H", 1))       # VIRTQ_AVAIL_F_NO_INTERRUPT
    for i in range(4):
        start = q.last_used
        m.submit(q, TUR)
        wait_used_idx(q, (start + 1) & 0xFFFF)
        q.take_used()
    assert q.interrupts() == 0
    m.ram.write(q.avail, struct.pack("<H", 0))
    assert m.run(q, TUR).response == OK       # waits for its interrupt


# ---------------------------------------------------------------- task management

@pytest.mark.parametrize("fn, aborted_as, tmf_answer", [
    (0, ABORTED, OK),          # ABORT TASK
    (1, ABORTED, OK),          # ABORT TASK SET
    (3, ABORTED, OK),          # CLEAR TASK SET
    (5, RESET, OK),            # LOGICAL UNIT RESET
    (4, RESET, OK),            # I_T NEXUS RESET
])
def test_tmf_ends_a_command_in_flight(gated, vhost, masters, fn, aborted_as, tmf_answer):
    g = gated()
    m = masters(vhost(g.endpoint))
    m.start()
    q = m.queues[2]
    name = f"T{fn:03d}"
    cmd = m.submit(q, gate_cdb(name), tag=0xABC0 + fn)
    g.wait_started(name)
    head, resp = m.tmf(fn, tag=0xABC0 + fn)
    got = q.wait_used(1)
    assert got[0][0] == cmd.head
    r = cmd.result(got[0][1])
    assert r.response == aborted_as
    ctrl = m.queues[0].wait_used(1)
    assert ctrl == [(head, 1)] and m.ram.read(resp, 1)[0] == tmf_answer
    g.open(name)
    # the LU goes on: resets leave a unit attention, then commands run
    clear_ua(m, q)


def test_query_tmfs_and_tmfs_without_a_task(gated, vhost, masters):
    g = gated()
    m = masters(vhost(g.endpoint))
    m.start()
    q, ctrl = m.queues[2], m.queues[0]

    def tmf(fn: int, tag: int = 0, lun: int = 0, target: int = 0) -> int:
        _, resp = m.tmf(fn, lun=lun, tag=tag, target=target)
        ctrl.wait_used(1)
        return m.ram.read(resp, 1)[0]

    assert tmf(7) == OK                      # QUERY TASK SET: nothing there
    cmd = m.submit(q, gate_cdb("QRY1"), tag=77)
    g.wait_started("QRY1")
    assert tmf(6, tag=77) == SUCCEEDED       # QUERY TASK: it is there
    assert tmf(6, tag=78) == OK              # another tag is not
    assert tmf(7) == SUCCEEDED               # QUERY TASK SET
    assert tmf(0, tag=78) == OK              # ABORT TASK of no task: complete
    assert tmf(2) == OK                      # CLEAR ACA: no ACA, nothing to clear
    assert tmf(0, tag=77, target=3) == BAD_TARGET
    assert tmf(99) == 11                     # an unknown function: rejected
    g.open("QRY1")
    got = q.wait_used(1)
    assert cmd.result(got[0][1]).status == GOOD
    assert tmf(6, tag=77) == OK              # done: no longer there
    # asynchronous notification: no event class is offered
    req = m.ram.alloc(AN_REQ.size)
    m.ram.write(req, AN_REQ.pack(1, lun_field(0), 0xFE))
    resp = m.ram.alloc(5)
    head = ctrl.add([(req, AN_REQ.size, False), (resp, 5, True)])
    ctrl.publish()
    assert ctrl.wait_used(1) == [(head, 5)]
    assert struct.unpack("<IB", m.ram.read(resp, 5)) == (0, OK)


# ---------------------------------------------------------------- events

def test_event_queue_rescan_removal_param_change_and_missed(stml, vhost, masters):
    m = masters(vhost(stml.endpoint))
    m.start()
    q, evq = m.queues[2], m.queues[1]
    clear_ua(m, q)
    mgmt = MgmtClient(stml.endpoint)
    bufs = m.event_buffers(8)

    def events(n: int) -> list[tuple[int, bytes, int]]:
        got = evq.wait_used(n)
        assert all(written == EVENT.size for _, written in got)
        return [m.read_event(bufs[head]) for head, _ in got]

    lun0, lun1 = bytes([1, 0, 0, 0]) + bytes(4), bytes([1, 0, 0, 1]) + bytes(4)
    assert mgmt.call("lun_add", spec="ram:4MiB")["lun"] == 1
    # LUN 1 appears (TRANSPORT_RESET / RESCAN); LUN 0 reports REPORTED LUNS DATA HAS CHANGED
    assert sorted(events(2)) == [(1, lun1, 1), (3, lun0, 0x3F | 0x0E << 8)]
    mgmt.call("lun_resize", lun=1, size=8 << 20)
    assert events(1) == [(3, lun1, 0x2A | 0x09 << 8)]          # CAPACITY DATA HAS CHANGED
    mgmt.call("lun_remove", lun=1)
    assert sorted(events(2)) == [(1, lun1, 2), (3, lun0, 0x3F | 0x0E << 8)]   # REMOVED
    mgmt.call("lun_add", spec="ram:4MiB")
    assert len(events(2)) == 2
    mgmt.call("lun_resize", lun=1, size=8 << 20)                # the last buffer
    assert events(1) == [(3, lun1, 0x2A | 0x09 << 8)]
    mgmt.call("lun_resize", lun=1, size=12 << 20)               # no buffer: missed
    clear_ua(m, q, lun=1)
    bufs.update(m.event_buffers(1))
    assert [e[0] for e in events(1)] == [0x80000000]            # NO_EVENT | EVENTS_MISSED
    assert evq.used_idx() == 9


# ---------------------------------------------------------------- hostile guests

def hostile_chains(m: VhostMaster, q) -> list[tuple[str, int, int]]:
    """(what, head, expected used length) of bad chains put in the ring."""
    ram = m.ram
    base, size = ram.GPA_BASE, ram.size
    req = ram.alloc(REQ.size)
    ram.write(req, REQ.pack(lun_field(0), 1, 0, 0, 0, inquiry(36).ljust(32, b"\0")))
    resp = ram.alloc(RESP_SIZE)
    out: list[tuple[str, int, int]] = []

    def chain(what: str, descs: list[tuple[int, int, int, int]], expect: int = 0) -> int:
        """descs: (addr, length, flags, next as an index into descs)."""
        idx = [q.free.pop(0) for _ in descs]
        for i, (addr, n, flags, nxt) in zip(idx, descs):
            q.write_desc(i, addr, n, flags, idx[nxt] if flags & DESC_F_NEXT else 0)
        q.in_use[idx[0]] = idx
        out.append((what, q.offer(idx[0]), expect))
        return idx[0]

    def indirect(what: str, table: list[tuple[int, int, int, int]], flags: int = DESC_F_INDIRECT,
                 length: int | None = None) -> None:
        t = ram.alloc(16 * len(table))
        for k, (addr, n, fl, nxt) in enumerate(table):
            ram.write(t + 16 * k, struct.pack("<QIHH", addr, n, fl, nxt))
        chain(what, [(t, 16 * len(table) if length is None else length, flags, 0)])

    good_req = (req, REQ.size, DESC_F_NEXT, 1)
    chain("below guest memory", [(base - 4096, REQ.size, DESC_F_NEXT, 1), (resp, RESP_SIZE, DESC_F_WRITE, 0)])
    chain("past the region's end", [good_req, (base + size - 8, 64, DESC_F_WRITE, 0)])
    chain("address + length wraps", [good_req, (2**64 - 16, 4096, DESC_F_WRITE, 0)])
    chain("a loop", [(req, REQ.size, DESC_F_NEXT, 1), (resp, RESP_SIZE, DESC_F_NEXT | DESC_F_WRITE, 0)])
    head = chain("next outside the table", [(req, REQ.size, DESC_F_NEXT, 0)])
    q.write_desc(head, req, REQ.size, DESC_F_NEXT, q.size + 5)
    chain("readable after writable", [(resp, RESP_SIZE, DESC_F_NEXT | DESC_F_WRITE, 1), (req, REQ.size, 0, 0)])
    indirect("indirect with NEXT", [(req, REQ.size, 0, 0)], flags=DESC_F_INDIRECT | DESC_F_NEXT)
    indirect("nested indirect", [(req, 16, DESC_F_INDIRECT, 0)])
    indirect("indirect table of 20 bytes", [(req, REQ.size, 0, 0), (resp, RESP_SIZE, DESC_F_WRITE, 0)],
             length=20)
    indirect("indirect loop", [(req, REQ.size, DESC_F_NEXT, 1), (resp, RESP_SIZE, DESC_F_NEXT | DESC_F_WRITE, 0)])
    chain("indirect table outside memory", [(base + size + 4096, 64, DESC_F_INDIRECT, 0)])
    # well-formed chains with unusable buffers get an answer, not silence
    short = ram.alloc(10)
    chain("header of 10 bytes", [(short, 10, DESC_F_NEXT, 1), (resp, RESP_SIZE, DESC_F_WRITE, 0)], 12)
    chain("response of 12 bytes", [good_req, (resp, 12, DESC_F_WRITE, 0)], 12)
    chain("response of 4 bytes", [good_req, (resp, 4, DESC_F_WRITE, 0)], 0)
    return out


def test_hostile_descriptors_never_crash_or_reach_outside(stml, vhost, masters):
    fe = vhost(stml.endpoint)
    m = masters(fe)
    m.start(request_queues=2)
    q, spare = m.queues[2], m.queues[3]
    bad = hostile_chains(m, q)
    q.publish()
    got = dict(q.wait_used(len(bad)))
    for what, head, expect in bad:
        assert got[head] == expect, what
    assert fe.alive() and m.ram.canaries_intact()
    assert "guest:" in fe.log()
    # the queue still works, and so does the other one
    assert m.run(q, inquiry(36), data_in=36).status == GOOD
    assert m.run(spare, inquiry(36), data_in=36).status == GOOD
    # bidirectional buffers (not negotiated) and bad targets are answered
    r = m.run(q, write10(0, 1), data_out=bytes(512), data_in=512)
    assert r.response == FAILURE
    assert m.run(q, TUR, target=5).response == BAD_TARGET
    assert m.ram.canaries_intact()


def test_corrupt_rings_stop_one_queue_only(stml, vhost, masters):
    fe = vhost(stml.endpoint)
    m = masters(fe)
    m.start(request_queues=3)
    q2, q3, q4 = m.queues[2], m.queues[3], m.queues[4]
    q2.offer(q2.size + 3)                 # a head index outside the table
    q2.publish()
    q3.avail_idx = (q3.avail_idx + q3.size + 1) & 0xFFFF   # more available than the ring holds
    q3.publish()
    assert m.run(q4, inquiry(36), data_in=36).status == GOOD
    assert fe.alive() and m.ram.canaries_intact()
    log = fe.log()
    assert "head index" in log and "ahead of" in log


def test_hostile_messages(stml, vhost, masters):
    fe = vhost(stml.endpoint)
    m = masters(fe)
    m.negotiate()
    # a region larger than its file, a ring outside memory: refused, the connection lives
    table = struct.pack("<2I4Q", 1, 0, 1 << 30, 64 << 30, 0x1000, 0)
    assert m.acked(SET_MEM_TABLE, table, (m.ram.fd,)) != 0
    assert m.acked(SET_VRING_ADDR, struct.pack("<2I4Q", 2, 0, 0x10, 0x1000, 0x2000, 0)) != 0
    assert m.u64(GET_FEATURES)
    m.start()
    assert m.run(m.queues[2], TUR).response == OK
    # a message of an unknown version ends the connection; the next VM is served
    m.sock.sendall(struct.pack("<3I", 1, 2, 0))
    with pytest.raises(ConnectionError):
        m.recv(GET_FEATURES)
    fe.wait_for(f"the VM on {fe.socket_path} disconnected")
    m2 = masters(fe)
    m2.start()
    assert m2.run(m2.queues[2], inquiry(36), data_in=36).status == GOOD
    assert fe.alive()


# ---------------------------------------------------------------- rings stopped and restarted

def test_stop_waits_for_requests_in_flight_then_restarts(gated, vhost, masters):
    g = gated()
    m = masters(vhost(g.endpoint))
    m.start()
    q = m.queues[2]
    cmd = m.submit(q, gate_cdb("STP1"))
    g.wait_started("STP1")
    m.send(GET_VRING_BASE, struct.pack("<2I", 2, 0))
    m.send(GET_FEATURES)
    # the back end answers in order, and holds the ring's base until its request is done
    assert struct.unpack("<Q", m.recv(GET_FEATURES))[0]
    g.open("STP1")
    index, base = struct.unpack("<2I", m.recv(GET_VRING_BASE))
    assert (index, base) == (2, q.avail_idx)
    assert q.used_idx() == q.avail_idx            # answered before the base was given
    assert cmd.result(q.take_used()[0][1]).status == GOOD
    m.start_queue(q, base)
    assert m.run(q, inquiry(36), data_in=36).status == GOOD


def test_a_ring_held_full_is_taken_from_again_as_answers_come(gated, vhost, masters):
    """A guest that posts its heads again while they are in flight: fetd_vhost
    takes a ring's worth, then holds the ring (nothing more reaches the
    STML) until answers free places, and takes the rest then, without
    another kick."""
    g = gated()
    m = masters(vhost(g.endpoint))
    m.negotiate()
    for i in (0, 1):
        m.setup_queue(i, 8)
    q, other = m.setup_queue(2, 8), m.setup_queue(3, 8)
    names = [f"HL{i:02d}" for i in range(8)]
    cmds = [m.submit(q, gate_cdb(name), indirect=True, publish=False) for name in names]   # a descriptor each
    q.publish()
    for name in names:
        g.wait_started(name)      # all 8 taken: their avail slots may be written again
    for c in cmds:
        q.offer(c.head)           # each head posted again while it is in flight
    q.publish()
    # kicked after that kick: once this is answered, fetd_vhost has looked at q
    assert m.run(other, TUR).response == OK
    assert g.calls == collections.Counter(names)      # held: none of the 8 again
    for name in names:
        g.open(name)
    q.wait_used(16)
    assert q.used_idx() == 16
    assert g.calls == collections.Counter(names * 2)
    assert all((r.response, r.status) == (OK, GOOD) for r in (c.result(RESP_SIZE) for c in cmds))


def test_stml_restart_fails_commands_in_flight_with_busy(tmp_short, gated, vhost, masters):
    data_dir = tmp_short()
    g = gated(data_dir)
    fe = vhost(g.endpoint)
    m = masters(fe)
    m.start()
    q = m.queues[2]
    cmd = m.submit(q, gate_cdb("RST1"))
    g.wait_started("RST1")
    g.stop()
    (head, n), = q.wait_used(1)
    assert head == cmd.head and cmd.result(n).response == BUSY   # the guest retries it
    later = m.submit(q, write10(5, 1), data_out=blocks(5, 1))    # waits in the ring for the STML
    gated(data_dir)
    (head, n), = q.wait_used(1)
    assert head == later.head and later.result(n).response == OK
    clear_ua(m, q)
    assert m.run(q, write10(5, 1), data_out=blocks(5, 1)).status == GOOD
    assert m.run(q, read10(5, 1), data_in=512).data == blocks(5, 1)
    assert fe.alive()


def test_the_vm_hears_power_on_occurred_once_after_the_stml_restarts(stml, vhost, masters):
    """The VM's nexus outlives a SIGKILLed STML: its link registers it again
    `resumed` (decisions/0247), so the VM's first command to the new STML
    gets CHECK CONDITION, POWER ON OCCURRED (06/29/01) and the next one
    proceeds; its first command ever (a new nexus) got none (0006)."""
    fe = vhost(stml.endpoint)
    m = masters(fe)
    m.start()
    q = m.queues[2]
    assert m.run(q, TUR).status == GOOD
    stml.kill()
    stml.start()
    r = m.run(q, TUR)    # waits in the ring until the link is back
    assert (r.response, r.status) == (OK, CHECK_CONDITION), r
    assert (r.sense[2] & 0x0F, r.sense[12], r.sense[13]) == (0x06, 0x29, 0x01), r.sense.hex()
    assert m.run(q, TUR).status == GOOD


def test_a_restarted_front_end_serves_a_new_vm_at_once(stml, vhost, masters):
    fe = vhost(stml.endpoint)
    m = masters(fe)
    m.start()
    assert m.run(m.queues[2], write10(9, 1), data_out=blocks(9, 1)).status == GOOD
    # a second master while one is attached is refused; the first goes on
    other = masters(fe)
    with pytest.raises(ConnectionError):
        other.u64(GET_FEATURES)
    assert m.run(m.queues[2], TUR).response == OK
    os.kill(fe.proc.pid, signal.SIGKILL)           # dies, leaving its socket file behind
    fe.proc.wait(10)
    fe2 = vhost(stml.endpoint, sock=fe.socket_path)
    m2 = masters(fe2)
    m2.start()
    # the same socket is the same initiator port: the nexus the killed front end
    # held was lost, and its first command hears so (decisions/0234)
    r = m2.run(m2.queues[2], TUR)
    assert (r.sense[2] & 0x0F, r.sense[12], r.sense[13]) == (0x06, 0x29, 0x07), r.sense.hex()
    assert m2.run(m2.queues[2], read10(9, 1), data_in=512).data == blocks(9, 1)


# ---------------------------------------------------------------- scsi-target run --vhost

def test_run_starts_a_vhost_front_end_beside_iscsi(tmp_short):
    from support.target import Target
    sock = str(tmp_short() / "vm.sock")
    t = Target("--lun", "ram:16MiB", "--vhost", f"{sock},target={IQN}", data_dir=str(tmp_short()))
    try:
        deadline = time.monotonic() + 30
        while "fetd_vhost: attached to STML" not in t.log():
            assert time.monotonic() < deadline, t.log()
            time.sleep(0.05)
        assert (f"vhost-user-scsi socket: {sock} (target {IQN}; this run only: a [[vhost]] table serves it "
                "at every start)") in t.log()
        m = VhostMaster(sock)
        try:
            m.start()
            r = m.run(m.queues[2], inquiry(36), data_in=36)
            assert (r.response, r.status) == (OK, GOOD)
        finally:
            m.close()
    finally:
        t.stop()


@pytest.mark.parametrize("mode, option, poll", [("split", "", None), ("none", "", b""), ("split", ",poll_us=0", b"0")])
def test_run_places_a_vhost_front_end_on_the_stmls_cpus(tmp_short, mode, option, poll):
    """run --no-iscsi --vhost: the STML and fetd_vhost (every thread of each)
    share the CPUs the VMs are left without, the STML sleeps at once and
    fetd_vhost polls its rings (VHOST_POLL_US, or the flag's poll_us); with
    `none` both run anywhere and neither polls."""
    from scsi_target.cli import VHOST_POLL_US, placement
    from support.procs import children_by_module
    from support.target import Target
    allowed = os.sched_getaffinity(0)
    sock = str(tmp_short() / "vm.sock")
    with Target("--lun", "ram:16MiB", "--no-iscsi", "--vhost", sock + option, "--cpu-affinity", mode,
                portals=()) as t:
        kids = children_by_module(t.proc.pid)
        argv = {who: open(f"/proc/{kids[who]}/cmdline", "rb").read().split(b"\0") for who in ("stml", "fetd_vhost")}
        sets = {who: {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{kids[who]}/task")}
                for who in ("stml", "fetd_vhost")}
        fe = argv["fetd_vhost"]
        placed = mode == "split" and len(allowed) >= 2
        assert b"--poll-us" not in argv["stml"] and fe.count(b"--poll-us") == (placed or bool(poll))
        if placed:
            share = frozenset(placement(["stml"], ["fetd_vhost"], allowed)["stml"])
            assert sets == {"stml": {share}, "fetd_vhost": {share}} and share < allowed
            assert fe[fe.index(b"--poll-us") + 1] == (poll or str(VHOST_POLL_US).encode())
        else:
            assert sets == {"stml": {frozenset(allowed)}, "fetd_vhost": {frozenset(allowed)}}


@pytest.mark.parametrize("flag, message", [
    ("/tmp/x.sock,target=iqn.2026-11.org.nowhere:t", "no target iqn.2026-11.org.nowhere:t"),
    ("/tmp/x.sock,colour=blue", "is not target=IQN, initiator=NAME, group=GROUP or poll_us=US"),
    ("/tmp/x.sock,poll_us=fast", "--vhost: poll_us must be an integer from 0 to 10000, not 'fast'"),
    ("/tmp/x.sock,group=no-such-group-here", "vhost socket /tmp/x.sock: no group no-such-group-here"),
])
def test_run_refuses_a_bad_vhost_flag(tmp_short, flag, message):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "scsi_target", "run", "--data-dir", str(tmp_short()),
                        "--lun", "ram:1MiB", "--portal", "127.0.0.1:0", "--vhost", flag],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and message in p.stderr


def test_run_refuses_a_vhost_socket_when_there_is_no_target(tmp_short):
    import subprocess
    import sys
    d = tmp_short()
    cfg = d / "target.toml"
    cfg.write_text('target = []\nportals = ["127.0.0.1:0"]\n\n[[vhost]]\nsocket = "vm.sock"\n')
    p = subprocess.run([sys.executable, "-m", "scsi_target", "run", "--data-dir", str(d / "data"),
                        "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == (f"scsi-target: config error: vhost socket {d / 'vm.sock'}: "
                        "the configuration has no target to serve\n")


def test_config_check_refuses_the_vhost_table_run_refuses(tmp_short):
    """`config check` validates what `run` reads, [[vhost]] included: it said
    OK for a table that stopped the start."""
    import subprocess
    import sys
    d = tmp_short()
    cfg = d / "target.toml"
    cfg.write_text(f'[[target]]\nname = "{IQN}"\n\n[[vhost]]\nsocket = "vm.sock"\ngroup = "no-such-group-here"\n')
    p = subprocess.run([sys.executable, "-m", "scsi_target", "config", "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == (f"scsi-target: config error: vhost socket {d / 'vm.sock'}: no group no-such-group-here\n")


def test_a_target_the_stml_does_not_have_is_said_before_any_vm_connects(stml, tmp_short):
    """`fetd-vhost --target` with a typo: said once it attaches, not only when a
    VM connects and finds no disk."""
    d = str(tmp_short())
    sock = os.path.join(d, "vm.sock")
    p = VhostProcess(stml.endpoint, sock, "iqn.2026-11.org.scsi-target:typo", d)
    try:
        p.wait_for("attached to STML")
        deadline = time.monotonic() + 10
        while "would see no disk" not in p.log():
            assert time.monotonic() < deadline, p.log()
            time.sleep(0.02)
        assert p.log().count("ERROR") == 1
        assert (f"the STML has no target iqn.2026-11.org.scsi-target:typo: a VM on {sock} would see no disk"
                in p.log())
    finally:
        p.stop()


def test_acl_keeps_a_vm_out_until_management_lets_it_in(stml_factory, tmp_short, vhost, masters):
    cfg = tmp_short() / "target.toml"
    cfg.write_text(f'[[target]]\nname = "{IQN}"\nacl = ["iqn.2026-11.org.example:someone-else"]\n'
                   '[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n')
    stml = stml_factory(extra=("--config", str(cfg)))
    fe = vhost(stml.endpoint)
    m = masters(fe)
    m.start()
    q, evq = m.queues[2], m.queues[1]
    bufs = m.event_buffers(4)
    assert m.run(q, inquiry(36), data_in=36).response == BAD_TARGET
    fe.wait_for("a VM connected")
    initiator = fe.output().split("initiator ")[1].split(")")[0]
    MgmtClient(stml.endpoint).call("acl_add", initiator=initiator)
    (head, _), = evq.wait_used(1)
    assert m.read_event(bufs[head]) == (1, bytes([1, 0, 0, 0]) + bytes(4), 1)   # RESCAN the target
    clear_ua(m, q)
    assert m.run(q, inquiry(36), data_in=36).status == GOOD
    MgmtClient(stml.endpoint).call("acl_remove", initiator=initiator)
    (head, _), = evq.wait_used(1)
    assert m.read_event(bufs[head]) == (1, bytes([1, 0, 0, 0]) + bytes(4), 2)   # LUN 0 REMOVED
    assert m.run(q, inquiry(36), data_in=36).response == BAD_TARGET


def test_session_drop_resets_the_vm_and_it_comes_back_as_a_new_nexus(gated, vhost, masters):
    g = gated()
    fe = vhost(g.endpoint)
    m = masters(fe)
    m.start()
    q = m.queues[2]
    cmd = m.submit(q, gate_cdb("DRP1"))
    g.wait_started("DRP1")
    mgmt = MgmtClient(g.endpoint)
    (session,) = mgmt.call("session_list")
    mgmt.call("session_drop", nexus=session["nexus"])
    (head, n), = q.wait_used(1)
    assert head == cmd.head and cmd.result(n).response == RESET
    clear_ua(m, q)
    assert m.run(q, inquiry(36), data_in=36).status == GOOD
    (again,) = mgmt.call("session_list")
    assert again["nexus"] != session["nexus"] and again["initiator"] == session["initiator"]


def test_the_socket_path_is_never_a_file_we_remove(stml, tmp_short):
    import subprocess
    import sys
    path = tmp_short() / "precious.txt"
    path.write_text("keep me")
    p = subprocess.run([sys.executable, "-m", "fetd_vhost", "--socket", str(path), "--target", IQN,
                        "--stml", stml.endpoint], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "exists and is not a socket" in p.stderr
    assert path.read_text() == "keep me"


def test_a_socket_given_to_a_group_is_0660_in_it(stml, tmp_short):
    """QEMU under libvirt runs as a user of its own: `group` lets it in, and no one else."""
    import grp

    from support.ci import need_root
    ours = [g for g in os.getgroups() if g != os.getgid()]    # a group we may chgrp to unprivileged
    if not ours:
        need_root("a socket given to a group we are not in")
    other = grp.getgrgid(ours[0]) if ours else next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    d = str(tmp_short())
    p = VhostProcess(stml.endpoint, os.path.join(d, "vm.sock"), IQN, d, extra=("--group", other.gr_name))
    try:
        p.wait_for("listening on")
        st = os.stat(p.socket_path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, other.gr_gid)
    finally:
        p.stop()


def test_a_socket_in_a_missing_directory_is_one_clear_line(stml, tmp_short):
    import subprocess
    import sys
    path = tmp_short() / "scsi-target" / "vm1.sock"
    p = subprocess.run([sys.executable, "-m", "fetd_vhost", "--socket", str(path), "--target", IQN,
                        "--stml", stml.endpoint], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.splitlines()[-1] == (f"scsi-target: fetd-vhost: cannot listen on {path}: "
                                         f"its directory {path.parent} does not exist")
