"""Faults with the LUN's write cache ON (`file:...,write_cache`): writers issue WRITE(16)
and every few writes SYNCHRONIZE CACHE; the STML (or fetd_tcp) is SIGKILLed mid-run and
restarted by the supervisor. Every write acknowledged before the writer's last GOOD
SYNCHRONIZE CACHE preceding the kill reads back intact (or overwritten by a write issued
after that SYNCHRONIZE CACHE); no logical block is torn.

At the kill, writers move to a second LBA region, so the first region holds exactly the
state the kill left behind, and the second shows the writers resumed."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from support import fuzzgen as G
from support.faults import BS, UNIT, ReconnectingWriter, block, read_all
from support.procs import children_by_module, free_port
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

SYNC_EVERY = 5        # writes between SYNCHRONIZE CACHE commands
REGION = 500          # LBAs between a writer's pre-kill and post-kill regions
SYNC_CACHE10 = bytes([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])   # whole LU


class CacheLog:
    """Per LBA: the blocks a GOOD SYNCHRONIZE CACHE made durable (the last acknowledged one,
    plus any in doubt after it), and the blocks written since that SYNCHRONIZE CACHE (which
    a kill may or may not have lost). Each writer owns its LBAs, so its own syncs suffice."""

    def __init__(self) -> None:
        self.durable: dict[int, list[bytes]] = {}
        self.volatile: dict[int, list[list]] = {}     # lba -> [[block, acked], ...]
        self.lock = threading.Lock()

    def begin(self, lba: int, blocks: list[bytes]) -> list[list]:
        with self.lock:
            entries = [[b, False] for b in blocks]
            for i, e in enumerate(entries):
                self.volatile.setdefault(lba + i, []).append(e)
            return entries

    def good(self, entries: list[list]) -> None:
        with self.lock:
            for e in entries:
                e[1] = True

    def synced(self, lbas: set[int]) -> int:
        """A GOOD SYNCHRONIZE CACHE for these LBAs; returns how many acknowledged writes
        it made durable."""
        n = 0
        with self.lock:
            for lba in lbas:
                vol = self.volatile.pop(lba, [])
                acked = [i for i, (_, a) in enumerate(vol) if a]
                if acked:
                    i = acked[-1]
                    self.durable[lba] = [vol[i][0]] + [b for b, _ in vol[i + 1:]]
                    n += 1
                elif vol:
                    self.durable[lba] = self.durable.get(lba, [bytes(BS)]) + [b for b, _ in vol]
        return n

    def snapshot_durable_acked(self, lbas: range) -> int:
        with self.lock:
            return sum(1 for lba in lbas if lba in self.durable and self.durable[lba][0] != bytes(BS))

    def verify(self, read) -> int:
        checked = 0
        for lba in sorted(set(self.durable) | set(self.volatile)):
            got = read(lba)
            allowed = self.durable.get(lba, [bytes(BS)]) + [b for b, _ in self.volatile.get(lba, [])]
            assert got in allowed, (f"LBA {lba}: neither the block the last GOOD SYNCHRONIZE CACHE "
                                    f"made durable nor one written after it (lost or torn write)")
            checked += 1
        return checked


class SyncingWriter(ReconnectingWriter):
    """4-block writes to its own LBAs with a SYNCHRONIZE CACHE every SYNC_EVERY writes."""

    prefix = "wc"

    def __init__(self, portal: str, wid: int, clog: CacheLog, stop: threading.Event,
                 region: list[int]) -> None:
        super().__init__(portal, wid, stop)
        self.clog, self.region = clog, region
        self.syncs = self.synced_acks = 0
        self.touched: set[int] = set()   # LBAs written since this writer's last GOOD sync

    def base(self) -> int:
        return self.wid * 2 * REGION + self.region[0] * REGION

    def step(self, ini: RawInitiator) -> None:
        if self.seq % SYNC_EVERY == 0:
            covered = set(self.touched)
            status, sense, _ = ini.command(SYNC_CACHE10)
            assert status == 0, (status, sense)
            self.synced_acks += self.clog.synced(covered)
            self.touched -= covered
            self.syncs += 1
            return
        lba = self.base() + self.rnd.randrange(0, 200, UNIT)
        blocks = [block(lba + i, f"wc{self.wid}.{self.seq}") for i in range(UNIT)]
        self.touched.update(range(lba, lba + UNIT))
        entries = self.clog.begin(lba, blocks)
        ini.write16(lba, b"".join(blocks))
        self.clog.good(entries)
        self.good += 1


@pytest.fixture
def wce_target(tmp_short):
    port = free_port()   # fixed: the restarted fetd_tcp listens where the writers reconnect
    d = str(tmp_short())
    t = Target("--lun", f"file:{d}/disk.img,size=16MiB,write_cache", data_dir=d,
               portals=(f"127.0.0.1:{port}",))
    yield t
    t.stop()


def _wce_bit(portal: str) -> bool:
    ini = RawInitiator(*G.host_port(portal), initiator="iqn.2026-11.org.test:modesense")
    try:
        assert ini.login(IQN).status_class == 0
        ini.command(bytes(6))
        status, sense, data = ini.command(bytes([0x1A, 0x08, 0x08, 0, 255, 0]), read=255)
        assert status == 0, (status, sense)
        page = data[4 + data[3]:]          # after the header and block descriptors
        assert page[0] & 0x3F == 0x08
        return bool(page[2] & 0x04)
    finally:
        ini.close()


@pytest.mark.parametrize("victim", ["stml", "fetd_tcp"])
def test_sigkill_with_write_cache_loses_nothing_synchronized(wce_target, victim):
    t = wce_target
    assert _wce_bit(t.portal), "the LUN's write cache should be on"
    clog, stop, region = CacheLog(), threading.Event(), [0]
    writers = [SyncingWriter(t.portal, i, clog, stop, region) for i in range(4)]
    for w in writers:
        w.start()
    time.sleep(2)
    before = sum(w.good for w in writers)
    region[0] = 1                      # writes begun from now on go to the second region
    pid = children_by_module(t.proc.pid)[victim]
    os.kill(pid, signal.SIGKILL)
    durable_at_kill = sum(clog.snapshot_durable_acked(range(w.wid * 2 * REGION, w.wid * 2 * REGION + 200))
                          for w in writers)
    deadline = time.monotonic() + 20
    while children_by_module(t.proc.pid).get(victim) in (None, pid):
        assert time.monotonic() < deadline, f"{victim} was not restarted"
        time.sleep(0.1)
    time.sleep(4)                      # writers reconnect and go on, in the second region
    stop.set()
    for w in writers:
        w.join(15)
    after = sum(w.good for w in writers)
    assert before > 0 and after > before, (before, after, t.log()[-3000:])
    assert sum(w.errors for w in writers) > 0                # the kill was felt
    assert sum(w.syncs for w in writers) >= 8
    assert durable_at_kill >= UNIT * 4, durable_at_kill      # the check below means something
    assert f"{victim} exited with -9; restarting" in t.log()
    ini = read_all(t.portal)
    try:
        n = clog.verify(lambda lba: ini.read16(lba, 1))
    finally:
        ini.close()
    assert n >= UNIT * 8
