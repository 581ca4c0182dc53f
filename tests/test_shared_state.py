"""Shared LUN state end to end: real `scsi-target run` processes, one initiator
over iSCSI (a raw initiator built on fetd_tcp.pdu, so it can send PERSISTENT
RESERVE commands and hold a write in the middle of its data transfer) and
loopback clients, all on the same LUN through different front ends."""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fetd_loopback import LoopbackClient
from fetd_loopback.client import TaskAborted
from fetd_tcp import pdu as P
from stml.api import TaskAttr, Tmf, TmfResponse
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

GOOD, CHECK_CONDITION, RESERVATION_CONFLICT, TASK_ABORTED = 0x00, 0x02, 0x18, 0x40
WE, EA = 0x1, 0x3


def prout(sa: int, rk: int = 0, sark: int = 0, rtype: int = 0, aptpl: bool = False) -> tuple[bytes, bytes]:
    params = struct.pack(">QQ", rk, sark) + bytes(4) + bytes([0x01 if aptpl else 0]) + bytes(3)
    cdb = bytes([0x5F, sa, rtype & 0xF, 0, 0]) + struct.pack(">I", len(params)) + b"\0"
    return cdb, params


def prin(sa: int, alloc: int = 1024) -> bytes:
    return bytes([0x5E, sa, 0, 0, 0, 0, 0]) + struct.pack(">H", alloc) + b"\0"


def write10(lba: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read_keys(data: bytes) -> list[int]:
    gen, n = struct.unpack_from(">II", data)
    return [struct.unpack_from(">Q", data, 8 + 8 * i)[0] for i in range(n // 8)]


def reservation(data: bytes) -> tuple[int, int] | None:
    gen, n = struct.unpack_from(">II", data)
    if not n:
        return None
    key = struct.unpack_from(">Q", data, 8)[0]
    return key, data[21] & 0xF


def sense_of(sense: bytes) -> tuple[int, int, int]:
    return sense[2] & 0xF, sense[12], sense[13]


class Loop:
    """A loopback nexus with helpers that swallow the unit attentions a test
    does not look at."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.c = LoopbackClient(endpoint, initiator=name).open()

    def run(self, cdb: bytes, data_out: bytes = b"", data_in: int = 0, ua: bool = False):
        for _ in range(8):
            r = self.c.execute(0, cdb, data_out, data_in)
            if ua or not (r.status == CHECK_CONDITION and r.sense_key == 0x6):
                return r
        return r

    def prout(self, sa: int, **kw):
        cdb, params = prout(sa, **kw)
        return self.run(cdb, params)

    def prin(self, sa: int) -> bytes:
        r = self.run(prin(sa), data_in=1024)
        assert r.status == GOOD, r.describe()
        return r.data

    def close(self) -> None:
        self.c.close()


class Iscsi:
    """A raw iSCSI session on one portal."""

    def __init__(self, portal: str, name: str, isid: bytes | None = None) -> None:
        host, port = portal.rsplit(":", 1)
        self.r = RawInitiator(host, int(port), initiator=name, isid=isid)
        resp = self.r.login(IQN, extra=[("ImmediateData", "Yes"), ("InitialR2T", "Yes")])
        assert resp.status_class == 0

    def run(self, cdb: bytes, write: bytes = b"", read: int = 0, ua: bool = False):
        for _ in range(8):
            status, sense, data = self.r.command(cdb, read=read, write=write)
            if ua or not (status == CHECK_CONDITION and sense and sense_of(sense)[0] == 0x6):
                return status, sense, data
        return status, sense, data

    def prout(self, sa: int, **kw) -> int:
        cdb, params = prout(sa, **kw)
        return self.run(cdb, params)[0]

    def prin(self, sa: int) -> bytes:
        status, sense, data = self.run(prin(sa), read=1024)
        assert status == GOOD, (status, sense)
        return data

    def close(self) -> None:
        self.r.close()


@pytest.fixture
def target():
    with Target("--lun", "ram:16MiB", portals=("127.0.0.1:0", "127.0.0.1:0,2")) as t:
        yield t


def endpoint(t: Target) -> str:
    return f"ipc://{t.data_dir}/stml.sock"


def test_iscsi_and_loopback_race_for_a_persistent_reservation(target):
    isc = Iscsi(target.portals[0], "iqn.2026-11.org.test:racer-iscsi")
    loop = Loop(endpoint(target), "iqn.2026-11.org.test:racer-loop")
    try:
        assert isc.prout(6, sark=0x1111) == GOOD          # REGISTER AND IGNORE EXISTING KEY
        assert loop.prout(6, sark=0x2222).status == GOOD
        assert sorted(read_keys(isc.prin(0))) == [0x1111, 0x2222]   # each sees the other's key
        assert sorted(read_keys(loop.prin(0))) == [0x1111, 0x2222]
        results: dict[str, int] = {}
        go = threading.Barrier(2)

        def race(name, fn):
            go.wait()
            results[name] = fn()
        threads = [threading.Thread(target=race, args=("iscsi", lambda: isc.prout(1, rk=0x1111, rtype=WE))),
                   threading.Thread(target=race, args=("loop", lambda: loop.prout(1, rk=0x2222, rtype=WE).status))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        assert sorted(results.values()) == [GOOD, RESERVATION_CONFLICT], results
        winner_key = 0x1111 if results["iscsi"] == GOOD else 0x2222
        assert reservation(isc.prin(1)) == (winner_key, WE)
        assert reservation(loop.prin(1)) == (winner_key, WE)
        # Write Exclusive: the loser may read but not write
        block = b"w" * 512
        if winner_key == 0x1111:
            assert isc.run(write10(10), block)[0] == GOOD
            assert loop.run(write10(10), block).status == RESERVATION_CONFLICT
            assert loop.run(bytes([0x28, 0, 0, 0, 0, 10, 0, 0, 1, 0]), data_in=512).data == block
        else:
            assert loop.run(write10(10), block).status == GOOD
            assert isc.run(write10(10), block)[0] == RESERVATION_CONFLICT
        # the loser takes it over: PREEMPT, and both see the new holder
        loser = loop if winner_key == 0x1111 else isc
        loser_key = 0x2222 if winner_key == 0x1111 else 0x1111
        st = loser.prout(4, rk=loser_key, sark=winner_key, rtype=EA)
        assert (st.status if hasattr(st, "status") else st) == GOOD
        assert reservation(isc.prin(1)) == (loser_key, EA)
        assert reservation(loop.prin(1)) == (loser_key, EA)
        assert read_keys(isc.prin(0)) == [loser_key]
        # SPC-2 reservations conflict with persistent ones: clear first, then race RESERVE(6)
        st = loser.prout(3, rk=loser_key)
        assert (st.status if hasattr(st, "status") else st) == GOOD
        results.clear()
        go.reset()
        threads = [threading.Thread(target=race, args=("iscsi", lambda: isc.run(bytes([0x16]) + bytes(5))[0])),
                   threading.Thread(target=race, args=("loop", lambda: loop.run(bytes([0x16]) + bytes(5)).status))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        assert sorted(results.values()) == [GOOD, RESERVATION_CONFLICT], results
        holder, other = (isc, loop) if results["iscsi"] == GOOD else (loop, isc)
        tur = bytes(6)
        assert (holder.run(tur)[0] if holder is isc else holder.run(tur).status) == GOOD
        assert (other.run(tur)[0] if other is isc else other.run(tur).status) == RESERVATION_CONFLICT
        assert (holder.run(bytes([0x17]) + bytes(5))[0] if holder is isc
                else holder.run(bytes([0x17]) + bytes(5)).status) == GOOD
        assert (other.run(tur)[0] if other is isc else other.run(tur).status) == GOOD
    finally:
        isc.close()
        loop.close()


def test_preempt_and_abort_aborts_the_other_nexus_writes_in_flight(target):
    victim = Iscsi(target.portals[0], "iqn.2026-11.org.test:victim")
    boss = Loop(endpoint(target), "iqn.2026-11.org.test:boss")
    try:
        assert victim.prout(6, sark=0xAAAA) == GOOD
        assert boss.prout(6, sark=0xBBBB).status == GOOD
        assert victim.prout(1, rk=0xAAAA, rtype=WE) == GOOD
        # two writes stopped in the middle of their data transfer: R2T received, data withheld
        r = victim.r
        itts = []
        for lba in (100, 101):
            itt = r._next_itt()
            r.send(P.ScsiCommand(itt, P.int_to_lun(0), write10(lba).ljust(16, b"\0"), 512, r.cmd_sn,
                                 r.exp_stat_sn, write=True))
            r.cmd_sn += 1
            pdu, _ = r.recv()
            assert isinstance(pdu, P.R2T) and pdu.itt == itt
            itts.append(itt)
        res = boss.prout(5, rk=0xBBBB, sark=0xAAAA, rtype=EA)   # PREEMPT AND ABORT
        assert res.status == GOOD
        statuses = {}
        deadline = time.monotonic() + 10
        while len(statuses) < 2 and time.monotonic() < deadline:
            pdu, _ = r.recv()
            if isinstance(pdu, P.ScsiResponse):
                statuses[pdu.itt] = pdu.status
        assert statuses == {itts[0]: TASK_ABORTED, itts[1]: TASK_ABORTED}
        # the victim learns why, is no longer registered, and cannot touch the LUN
        status, sense, _ = victim.run(bytes(6), ua=True)
        assert status == CHECK_CONDITION and sense_of(sense) == (0x6, 0x2A, 0x05)
        assert victim.run(write10(100), b"x" * 512)[0] == RESERVATION_CONFLICT
        assert read_keys(victim.prin(0)) == [0xBBBB]
        assert reservation(victim.prin(1)) == (0xBBBB, EA)
        # nothing of the aborted writes landed
        assert boss.run(bytes([0x28, 0, 0, 0, 0, 100, 0, 0, 2, 0]), data_in=1024).data == bytes(1024)
    finally:
        victim.close()
        boss.close()


def test_aptpl_reservation_survives_a_restart(tmp_short):
    _aptpl_restart(str(tmp_short()))   # short: the ipc socket lives there


def _aptpl_restart(data_dir: str) -> None:
    name = "iqn.2026-11.org.test:persistent"
    with Target("--lun", "ram:4MiB", data_dir=data_dir) as t:
        loop = Loop(endpoint(t), name)
        assert loop.prout(6, sark=0xC0FFEE, aptpl=True).status == GOOD
        assert loop.prout(1, rk=0xC0FFEE, rtype=EA).status == GOOD
        gen = struct.unpack_from(">I", loop.prin(0))[0]
        loop.close()
        files = list((Path(data_dir) / "pr").glob("*.json"))
        assert len(files) == 1
    with Target("--lun", "ram:4MiB", data_dir=data_dir) as t:
        other = Iscsi(t.portal, "iqn.2026-11.org.test:outsider")
        try:
            assert read_keys(other.prin(0)) == [0xC0FFEE]
            assert reservation(other.prin(1)) == (0xC0FFEE, EA)
            assert struct.unpack_from(">I", other.prin(0))[0] == gen
            assert other.run(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), read=512)[0] == RESERVATION_CONFLICT
        finally:
            other.close()
        loop = Loop(endpoint(t), name)       # the same I_T nexus is the holder again
        try:
            assert loop.run(write10(0), b"z" * 512).status == GOOD
            assert loop.prout(2, rk=0xC0FFEE, rtype=EA).status == GOOD     # RELEASE
            assert loop.prout(0, rk=0xC0FFEE, sark=0).status == GOOD       # unregister
        finally:
            loop.close()
    # a file that cannot be read back stops the STML with one line naming it
    files[0].write_text("{ not json")
    p = subprocess.run([sys.executable, "-m", "stml", "--data-dir", data_dir, "--lun", "ram:4MiB"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if "persistent reservations" in ln]
    assert len(lines) == 1 and str(files[0]) in lines[0], p.stderr


def test_lun_reset_during_writes_from_two_initiators(target):
    a = LoopbackClient(endpoint(target), initiator="iqn.2026-11.org.test:writer-a").open()
    b = LoopbackClient(endpoint(target), initiator="iqn.2026-11.org.test:writer-b").open()
    watcher = Iscsi(target.portals[1], "iqn.2026-11.org.test:watcher")   # idle, other front end
    try:
        data = os.urandom(256 * 1024)
        futures: dict[str, list[concurrent.futures.Future]] = {"a": [], "b": []}
        stop = threading.Event()

        def stream(name, client, base):
            lba = base
            while not stop.is_set():
                futures[name].append(client.submit(0, write10(lba, 512), data))
                lba = base + (lba + 512 - base) % 8192
                inflight = [f for f in futures[name][-16:] if not f.done()]
                if len(inflight) >= 16:
                    concurrent.futures.wait(inflight, 5, concurrent.futures.FIRST_COMPLETED)
        threads = [threading.Thread(target=stream, args=("a", a, 0)),
                   threading.Thread(target=stream, args=("b", b, 16384))]
        for th in threads:
            th.start()
        time.sleep(0.5)
        assert a.task_mgmt(Tmf.LUN_RESET, 0) == TmfResponse.COMPLETE
        time.sleep(0.3)
        stop.set()
        for th in threads:
            th.join(20)
        outcomes = {"a": set(), "b": set()}
        for name, futs in futures.items():
            for f in futs:
                try:
                    r = f.result(20)            # no hung task: every command ends
                    outcomes[name].add(r.status if r.status != CHECK_CONDITION else (r.sense_key,) + r.asc_ascq)
                except TaskAborted:
                    outcomes[name].add("aborted")
        assert len(futures["a"]) > 16 and len(futures["b"]) > 16
        # the issuer's own tasks vanish; the other nexus's end with TASK ABORTED (TAS=1)
        assert outcomes["a"] <= {GOOD, "aborted", (0x6, 0x29, 0x03)}, outcomes
        assert outcomes["b"] <= {GOOD, TASK_ABORTED, (0x6, 0x29, 0x03)}, outcomes
        assert (0x6, 0x29, 0x03) in outcomes["b"] or TASK_ABORTED in outcomes["b"]
        # the idle nexus on the other front end has the reset unit attention waiting
        status, sense, _ = watcher.run(bytes(6), ua=True)
        assert status == CHECK_CONDITION and sense_of(sense) == (0x6, 0x29, 0x03)
        assert watcher.run(bytes(6))[0] == GOOD
        for c in (a, b):   # and both writers carry on
            r = c.execute(0, write10(0, 1), b"q" * 512)
            if r.status == CHECK_CONDITION:
                assert r.asc_ascq == (0x29, 0x03)
                r = c.execute(0, write10(0, 1), b"q" * 512)
            assert r.status == GOOD
    finally:
        watcher.close()
        a.close()
        b.close()


def test_ordered_task_waits_for_older_and_blocks_newer(target):
    """Through the loopback front end: an ORDERED command does not complete
    before the SIMPLE commands sent before it, and the SIMPLE commands sent
    after it do not complete before it."""
    c = LoopbackClient(endpoint(target), initiator="iqn.2026-11.org.test:orderly").open()
    try:
        big = os.urandom(4 << 20)
        done: list[str] = []
        lock = threading.Lock()

        def note(name):
            def cb(f):
                with lock:
                    done.append(name)
            return cb
        futs = []
        for i in range(4):
            f = c.submit(0, write10(8192 * i, 8192), big)
            f.add_done_callback(note(f"old{i}"))
            futs.append(f)
        f = c.submit(0, bytes(6), attr=TaskAttr.ORDERED)
        f.add_done_callback(note("ordered"))
        futs.append(f)
        for i in range(4):
            f = c.submit(0, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), data_in=512)
            f.add_done_callback(note(f"new{i}"))
            futs.append(f)
        for f in futs:
            assert f.result(30).status == GOOD
        pos = done.index("ordered")
        assert sorted(done[:pos]) == ["old0", "old1", "old2", "old3"], done
        assert sorted(done[pos + 1:]) == ["new0", "new1", "new2", "new3"], done
    finally:
        c.close()


def test_alua_one_group_per_portal_group(target):
    paths = [Iscsi(p, "iqn.2026-11.org.test:mpath") for p in target.portals]
    try:
        ids = []
        for path in paths:
            status, sense, data = path.run(bytes([0xA3, 0x0A, 0, 0, 0, 0]) + struct.pack(">I", 1024) + bytes(2),
                                           read=1024)
            assert status == GOOD, sense
            n = struct.unpack_from(">I", data)[0]
            groups = [struct.unpack_from(">H", data, off + 2)[0] for off in range(4, 4 + n, 12)]
            states = [data[off] & 0xF for off in range(4, 4 + n, 12)]
            assert groups == [1, 2] and states == [0, 0]
            status, _, vpd = path.run(bytes([0x12, 1, 0x83, 4, 0, 0]), read=1024)
            ids.append(vpd[8:24])                       # the NAA designator: one device
            stpg = struct.pack(">I", 0) + bytes([0, 0]) + struct.pack(">H", 2)
            cdb = bytes([0xA4, 0x0A, 0, 0, 0, 0]) + struct.pack(">I", len(stpg)) + bytes(2)
            assert path.run(cdb, stpg)[0] == GOOD
        assert ids[0] == ids[1]
    finally:
        for p in paths:
            p.close()


CUNIT_SUITES = ["SCSI.Reserve6", "SCSI.PrinReadKeys", "SCSI.PrinServiceactionRange",
                "SCSI.PrinReportCapabilities", "SCSI.ProutRegister", "SCSI.ProutReserve",
                "SCSI.ProutClear", "SCSI.ProutPreempt", "SCSI.MultipathIO", "iSCSI.iSCSITMF"]


@pytest.mark.skipif(shutil.which("iscsi-test-cu") is None, reason="libiscsi-bin not installed")
def test_conformance_reservations_multipath_tmf(tmp_path):
    """libiscsi's suites with the second portal group as the multipath URL: every
    test passes by CUnit's own verdict, none skipped for lack of support (the
    target allows target resets, which Reserve6's reset tests send)."""
    from support.procs import run
    from support.target import cunit_verdicts
    config = tmp_path / "target.toml"
    config.write_text(f'[[target]]\nname = "{IQN}"\ntarget_reset = true\n'
                      '[[target.lun]]\nlun = 0\nbackend = "ram"\nsize = "64MiB"\n')
    with Target(portals=("127.0.0.1:0", "127.0.0.1:0,2"), config=str(config)) as t:
        urls = [f"iscsi://{p}/{IQN}/0" for p in t.portals]
        verdicts = {}
        for suite in CUNIT_SUITES:
            p = run(["iscsi-test-cu", "-d", "-v", "-t", suite, *urls], timeout=300, check=False)
            got = cunit_verdicts(p.stdout)
            assert got, f"{suite} ran nothing:\n{p.stdout}\n{p.stderr}"
            verdicts.update(got)
        bad = {k: v for k, v in verdicts.items() if v != "passed"}
        assert not bad, bad
        assert len(verdicts) >= 33
