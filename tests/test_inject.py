"""Fault injection at the contract (stml.api.inject): rules parsed and refused,
and every kind run against a real `scsi-target run` with a raw iSCSI initiator,
asserting the recovery by behaviour with a write log (every write the initiator
got GOOD for reads back after the fault). Faults are placed by message count
(at=N), and the tests wait for the target's log lines, never for a time."""
from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from fetd_tcp import pdu as P
from scsi_runtime.logs import BURST
from stml.api.inject import Injector, RuleError, load_rules, parse_rule
from support import fuzzgen as G
from support.procs import children_by_module, free_port
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

BS = 512


def block(lba: int, tag: str) -> bytes:
    return hashlib.sha256(f"{lba}:{tag}".encode()).digest() * (BS // 32)


def write16_cdb(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


class WriteLog:
    """The writes the initiator got GOOD for, by LBA; `verify` reads each back."""

    def __init__(self) -> None:
        self.acked: dict[int, bytes] = {}

    def good(self, lba: int, data: bytes) -> None:
        for i in range(len(data) // BS):
            self.acked[lba + i] = data[i * BS:(i + 1) * BS]

    def verify(self, ini: RawInitiator) -> int:
        for lba, want in sorted(self.acked.items()):
            assert ini.read16(lba, 1) == want, f"LBA {lba}: an acknowledged write is lost"
        return len(self.acked)


def start(*rules: str, luns: tuple[str, ...] = ()) -> Target:
    """`scsi-target run` with a file LUN 0 (data survives a restart), the rules, and more LUNs."""
    args = ["--lun", "file:disk.img,size=8MiB"]     # in the data dir the Target makes and removes
    for spec in luns:
        args += ["--lun", spec]
    for r in rules:
        args += ["--inject", r]
    # a fixed port: a restarted front end listens on it again
    return Target(*args, portals=(f"127.0.0.1:{free_port()}",))


def login(t: Target, name: str = "inject", extra: list[tuple[str, str]] = ()) -> RawInitiator:
    """A logged-in raw initiator, retried while the target comes back (a restart)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            ini = RawInitiator(*G.host_port(t.portal), initiator=f"iqn.2026-11.org.test:{name}", timeout=10)
            if ini.login(IQN, extra=extra).status_class == 0:
                return ini
            ini.close()
        except OSError:
            pass
        assert time.monotonic() < deadline, "no login:\n" + t.log()[-3000:]
        time.sleep(0.2)


def ready(ini: RawInitiator) -> None:
    """TEST UNIT READY until GOOD (a unit attention after a restart first)."""
    for _ in range(5):
        if ini.command(bytes(6))[0] == 0:
            return
    raise AssertionError("the LUN never became ready")


def send_write(ini: RawInitiator, lba: int, data: bytes, immediate: bool = True) -> int:
    """Send a WRITE(16) and return its ITT without waiting for anything."""
    itt = ini._next_itt()
    imm = data if immediate else b""
    ini.send(P.ScsiCommand(itt, P.int_to_lun(0), write16_cdb(lba, len(data) // BS).ljust(16, b"\0"),
                           len(data), ini.cmd_sn, ini.exp_stat_sn, write=True, data_length=len(imm)), imm)
    ini.cmd_sn += 1
    return itt


def pending(ini: RawInitiator) -> bool:
    """Whether the target sent this connection anything not read yet."""
    return bool(select.select([ini.sock], [], [], 0)[0])


@pytest.fixture
def targets():
    started: list[Target] = []
    yield started
    for t in started:
        t.stop()


# -------------------------------------------------------------- the rule grammar

@pytest.mark.parametrize("text, problem", [
    ("drop xmit_response at=1", "expected SIDE:KIND OP"),
    ("disk:drop xmit_response at=1", "side 'disk' is not one of stml, fetd"),
    ("stml:lose xmit_response at=1", "kind 'lose' is not one of"),
    ("stml:drop xmit_reply at=1", "'xmit_reply' is not a message type"),
    ("stml:drop xmit_response", "give exactly one of at=N or p=P"),
    ("stml:drop xmit_response at=1 p=0.5", "give exactly one of at=N or p=P"),
    ("stml:drop xmit_response at=0", "at must be a message number >= 1"),
    ("stml:drop xmit_response p=1.5", "p must be a probability in (0, 1]"),
    ("stml:drop xmit_response at=1 ms=5", "'ms=5' is not key=value with a key of at, p, seed"),
    ("stml:delay rx_cmnd at=1", "delay needs ms="),
    ("stml:delay rx_cmnd p=1 ms=5 hold=0", "hold must be a message count"),
    ("stml:drop rx_cmnd p=1 hold=5", "'hold=5' is not key=value"),
    ("fetd:stall rx_cmnd at=1 lun=0 s=1", "stall applies on the stml side only"),
    ("stml:stall rx_cmnd at=1 s=1", "stall needs lun="),
])
def test_a_wrong_rule_is_refused_with_one_line(text, problem):
    with pytest.raises(RuleError) as e:
        parse_rule(text)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_rules_from_a_file_with_comments(tmp_path):
    f = tmp_path / "rules"
    f.write_text("# lose the third answer\nstml:drop xmit_response at=3  # then recover\n\n"
                 "fetd:delay rdy_to_xfer p=0.25 seed=7 ms=20\n")
    rules = load_rules(["stml:kill rx_cmnd at=9"], [str(f)])
    assert [(r.side, r.kind, r.op, r.at, r.p, r.seed, r.ms) for r in rules] == [
        ("stml", "kill", "rx_cmnd", 9, None, 0, None),
        ("stml", "drop", "xmit_response", 3, None, 0, None),
        ("fetd", "delay", "rdy_to_xfer", None, 0.25, 7, 20)]
    with pytest.raises(RuleError, match="inject file .*nothing"):
        load_rules([], [str(tmp_path / "nothing")])


def test_a_seeded_probability_repeats():
    """p=P with seed=S picks the same messages in every run."""
    def picks() -> list[int]:
        inj = Injector([parse_rule("stml:drop rx_cmnd p=0.3 seed=11")], print, print)
        return [i for i in range(200) if not inj.inbound(b"fe", {"op": "rx_cmnd"}, b"", [])]
    first = picks()
    assert first == picks() and 30 < len(first) < 90


def test_a_kill_rule_fires_in_the_first_start_only():
    inj = Injector([parse_rule("stml:kill rx_cmnd at=1")], print, print, start=2)
    assert inj.inbound(b"fe", {"op": "rx_cmnd"}, b"", []) and inj.counts == {}


def test_bad_rules_stop_run_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scsi_target", "run", "--data-dir", str(tmp_path),
                        "--inject", "stml:drop xmit_response at=1", "--inject", "fetd:delay rdy_to_xfer at=2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "scsi-target: inject rule 'fetd:delay rdy_to_xfer at=2': delay needs ms="]
    r = subprocess.run([sys.executable, "-m", "scsi_target", "run", "--data-dir", str(tmp_path), "--no-iscsi",
                        "--inject", "fetd:drop xmit_response at=1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "scsi-target: inject rule 'fetd:drop xmit_response at=1': this command runs no fetd side"
    for fe in (["fetd_tcp"], ["fetd_vhost", "--socket", f"{tmp_path}/v.sock", "--target", IQN]):
        r = subprocess.run([sys.executable, "-m", *fe, "--stml", f"ipc://{tmp_path}/x",
                            "--inject", "stml:drop xmit_response at=1"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert r.stderr.strip() == ("scsi-target: inject rule 'stml:drop xmit_response at=1': "
                                    "a front end applies fetd rules only")


# -------------------------------------------------------------- faults, and the recovery

def test_lost_xmit_response_initiator_aborts_and_goes_on(targets):
    """The STML's answer to a WRITE is lost (dropped as the STML sends it): the
    initiator sees nothing, aborts the task, the abort is answered, and the
    next commands work; the write the STML did is there (it was done, only
    its answer was lost), every acknowledged one too."""
    t = start("stml:drop xmit_response at=3")
    targets.append(t)
    assert "the STML applies rule 'stml:drop xmit_response at=3'" in t.wait_log("applies rule")
    ini = login(t)
    wlog = WriteLog()
    ready(ini)                                           # xmit_response #1
    data = block(10, "a") * 4
    ini.write16(10, data)                                # #2
    wlog.good(10, data)
    lost = block(20, "lost") * 4
    itt = send_write(ini, 20, lost)                      # #3: dropped
    t.wait_log("inject: dropped xmit_response #3")
    assert not pending(ini)                              # no answer came
    resp = ini.tmf(P.TMF_ABORT_TASK, rtt=itt, ref_cmd_sn=ini.cmd_sn - 1)
    assert resp.response in (P.TMF_RESP_COMPLETE, P.TMF_RESP_NO_TASK), resp.response
    ready(ini)
    more = block(30, "b") * 4
    ini.write16(30, more)
    wlog.good(30, more)
    assert wlog.verify(ini) == 8
    assert ini.read16(20, 4) == lost                     # done by the STML before its answer was lost
    assert not pending(ini)                              # (nothing more came for the aborted task)
    ini.close()


def recv_until(ini: RawInitiator, kind: type, itt: int) -> tuple:
    """The next PDU of `kind` for `itt` (NOP-Ins answered, others kept out)."""
    while True:
        pdu, data = ini.recv()
        if isinstance(pdu, kind) and pdu.itt == itt:
            return pdu, data
        if isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG:
            ini.send(P.NopOut(P.RESERVED_TAG, pdu.ttt, ini.cmd_sn, ini.exp_stat_sn, immediate=True))
            continue
        raise AssertionError(f"unexpected {pdu!r} while waiting for a {kind.__name__} of ITT {itt}")


@pytest.mark.parametrize("held", ["rdy_to_xfer", "scsi_rx_data"])
def test_abort_task_racing_the_data_of_a_write(targets, held):
    """ABORT TASK while a WRITE's R2T (rdy_to_xfer) or its data (scsi_rx_data)
    is held back on the front end's side: the abort is answered FUNCTION
    COMPLETE, the late message lands on a task that is gone (no R2T reaches
    the initiator, no data reaches the disk), the next commands work, and
    every acknowledged write reads back."""
    t = start(f"fetd:delay {held} at=2 ms=3000")
    targets.append(t)
    ini = login(t)
    ready(ini)
    wlog = WriteLog()
    first = block(40, "first") * 8
    ini.write16(40, first, immediate_data=False)          # rdy_to_xfer and scsi_rx_data #1
    wlog.good(40, first)
    racing = block(100, "racing") * 8
    itt = send_write(ini, 100, racing, immediate=False)   # #2: held
    if held == "scsi_rx_data":    # the R2T comes; its data goes toward the STML, and is held
        r2t, _ = recv_until(ini, P.R2T, itt)
        ini.send(P.DataOut(itt, r2t.ttt, 0, r2t.buffer_offset, True, ini.exp_stat_sn, P.int_to_lun(0),
                           r2t.desired_length), racing[r2t.buffer_offset:r2t.buffer_offset + r2t.desired_length])
    t.wait_log(f"inject: delaying {held} #2")
    resp = ini.tmf(P.TMF_ABORT_TASK, rtt=itt, ref_cmd_sn=ini.cmd_sn - 1)
    assert resp.response == P.TMF_RESP_COMPLETE
    t.wait_log(f"inject: handing on delayed {held} #2")
    ready(ini)                                            # an answer after the late message's
    assert not pending(ini)                               # no R2T, no response for the aborted task
    assert ini.read16(100, 8) == bytes(8 * BS)            # the aborted write's data never landed
    more = block(200, "after") * 8
    ini.write16(200, more, immediate_data=False)
    wlog.good(200, more)
    assert wlog.verify(ini) == 16
    ini.close()


def write_all(t: Target, wlog: WriteLog, lbas: list[int], tag: str, immediate: bool = True) -> int:
    """Write 4 blocks at each LBA in turn, as an initiator with a retry policy:
    a write without an answer (the connection broke) is retried on a new
    session until it gets GOOD. Returns how many sessions it took."""
    sessions, ini = 1, login(t, tag)
    ready(ini)
    for lba in lbas:
        data = b"".join(block(lba + i, tag) for i in range(4))
        while True:
            try:
                ini.write16(lba, data, immediate_data=immediate)
                break
            except (OSError, AssertionError):   # a broken connection, or CHECK CONDITION after a restart
                ini.close()
                ini = login(t, tag)
                sessions += 1
                ready(ini)
        wlog.good(lba, data)
    ini.close()
    return sessions


@pytest.mark.parametrize("rule, victim", [
    ("stml:kill rx_cmnd at=12", "stml"),         # the STML dies as a write arrives
    ("fetd:kill rdy_to_xfer at=6", "fetd_tcp"),  # the front end dies as it gets an R2T's go-ahead
])
def test_a_process_killed_mid_write_loses_no_acknowledged_write(targets, rule, victim):
    """A kill at message N (SIGKILL of the process itself): the supervisor
    restarts it (and the restart does not kill itself again), the initiator
    logs in again and retries the write in doubt, and every write it got
    GOOD for reads back from the file LUN."""
    t = start(rule)
    targets.append(t)
    wlog = WriteLog()
    sessions = write_all(t, wlog, [8 * i for i in range(20)], "k", immediate=False)
    log = t.log()
    assert f"inject: SIGKILL at {rule.split()[1]} #" in log
    assert f"{victim} exited with -9; restarting" in log
    assert log.count("exited with") == 1     # the restarted one runs without the kill
    assert sessions >= 2                     # the initiator felt it
    ini = login(t, "verify")
    ready(ini)
    assert wlog.verify(ini) == 80
    ini.close()


def pipelined(ini: RawInitiator, cmds: list[tuple[bytes, int, bytes]]) -> dict[int, list[tuple[int, bytes]]]:
    """Send every (cdb, read length, write data) at once (immediate data), then
    collect the answers: {itt: [(status, read data), ...]}, one entry per
    response PDU, so a task answered twice shows."""
    itts = []
    for cdb, read, write in cmds:
        itt = ini._next_itt()
        ini.send(P.ScsiCommand(itt, P.int_to_lun(0), cdb.ljust(16, b"\0"), read or len(write), ini.cmd_sn,
                               ini.exp_stat_sn, read=bool(read), write=bool(write), data_length=len(write)),
                 write)
        ini.cmd_sn += 1
        itts.append(itt)
    got: dict[int, list[tuple[int, bytes]]] = {itt: [] for itt in itts}
    data: dict[int, bytearray] = {itt: bytearray() for itt in itts}
    while any(not got[i] for i in itts):
        pdu, seg = ini.recv()
        assert pdu.itt in got, f"an answer for ITT {pdu.itt:#x}, which was not asked"
        if isinstance(pdu, P.DataIn):
            data[pdu.itt][pdu.buffer_offset:pdu.buffer_offset + len(seg)] = seg
            if pdu.status is not None:
                got[pdu.itt].append((pdu.status, bytes(data[pdu.itt])))
        elif isinstance(pdu, P.ScsiResponse):
            got[pdu.itt].append((pdu.status, bytes(data[pdu.itt])))
    return got


def read16_cdb(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


@pytest.mark.parametrize("rule", [
    "stml:duplicate xmit_response at=4",   # the front end gets one task's answer twice
    "fetd:duplicate rx_cmnd at=4",         # the STML gets one command twice
])
def test_a_duplicated_message_answers_no_task_twice(targets, rule):
    """A message handed on twice: each of the initiator's commands is answered
    exactly once with its own data (the copy completes no other task), no
    process restarts, the next commands work, every write reads back."""
    t = start(rule)
    targets.append(t)
    ini = login(t)
    ready(ini)                                              # rx_cmnd / xmit_response #1
    wlog = WriteLog()
    writes = [(lba, block(lba, "dup") * 4) for lba in (0, 64, 128, 192, 256, 320)]
    got = pipelined(ini, [(write16_cdb(lba, 4), 0, d) for lba, d in writes])   # #2-#7
    assert [len(v) for v in got.values()] == [1] * 6
    assert {s for v in got.values() for s, _ in v} == {0}
    for lba, d in writes:
        wlog.good(lba, d)
    t.wait_log(f"inject: duplicating {rule.split()[1]} #4")
    reads = pipelined(ini, [(read16_cdb(lba, 4), 4 * BS, b"") for lba, _ in writes])
    assert [v for v in reads.values()] == [[(0, d)] for _, d in writes]   # each its own data, once
    ready(ini)
    assert not pending(ini)
    assert wlog.verify(ini) == 24
    assert "exited with" not in t.log()
    ini.close()


@pytest.mark.parametrize("rule", [
    "stml:reorder xmit_response at=3",     # two answers swapped on their way to the front end
    "fetd:reorder rx_cmnd at=3",           # two commands swapped on their way to the STML
])
def test_reordered_messages_still_pair_each_answer_with_its_command(targets, rule):
    """Two messages of a kind swapped: SIMPLE tasks may complete in any order,
    and each READ gets its own data and each WRITE its own status; the
    writes all land."""
    t = start(rule)
    targets.append(t)
    ini = login(t)
    ready(ini)                                              # #1
    wlog = WriteLog()
    writes = [(lba, block(lba, "swap") * 4) for lba in (8, 16, 24, 32)]
    got = pipelined(ini, [(write16_cdb(lba, 4), 0, d) for lba, d in writes])   # #2-#5, all in flight
    assert [v for v in got.values()] == [[(0, b"")]] * 4
    for lba, d in writes:
        wlog.good(lba, d)
    reads = pipelined(ini, [(read16_cdb(lba, 4), 4 * BS, b"") for lba, _ in writes])
    assert [v for v in reads.values()] == [[(0, d)] for _, d in writes]
    log = t.wait_log(f"inject: handing on held {rule.split()[1]} #3 ")
    assert f"inject: handing on held {rule.split()[1]} #3 after #4" in log   # swapped, not timed out
    assert "exited with" not in log
    ready(ini)
    assert wlog.verify(ini) == 16
    ini.close()


def test_a_stalled_backend_holds_its_lun_only_and_recovers(targets):
    """LUN 0's backend stalls at the 3rd command (until SIGUSR2): its WRITE
    and an ABORT TASK for it stay unanswered (the abort waits for the
    backend call under way), while LUN 1 of the same target serves another
    session. Released, the abort is answered, nothing more comes for the
    aborted task, LUN 0 works again, and every acknowledged write reads back."""
    t = start("stml:stall rx_cmnd at=3 lun=0 s=0", luns=("ram:8MiB",))
    targets.append(t)
    a = login(t, "a")
    ready(a)                                                # rx_cmnd #1
    wlog = WriteLog()
    data = block(0, "a") * 4
    a.write16(0, data)                                      # #2
    wlog.good(0, data)
    stalled = block(8, "stalled") * 4
    itt = send_write(a, 8, stalled)                         # #3: LUN 0 stalls before it runs
    t.wait_log("inject: stalling LUN 0's backend at rx_cmnd #3")
    b = login(t, "b")
    other = block(0, "lun1") * 8
    cdb = struct.pack(">BBQIBB", 0x8A, 0, 0, 8, 0, 0)
    assert b.command(bytes(6), lun=1)[0] == 0
    assert b.command(cdb, lun=1, write=other)[0] == 0
    assert b.read16(0, 8, lun=1) == other                   # LUN 1 serves meanwhile
    abort = a._next_itt()
    a.send(P.TaskMgmtRequest(abort, P.TMF_ABORT_TASK, P.int_to_lun(0), itt, a.cmd_sn, a.exp_stat_sn,
                             a.cmd_sn - 1, 0))
    assert b.command(bytes(6), lun=1)[0] == 0               # (a round trip after the abort's)
    assert not pending(a)                                   # neither the write nor the abort answered
    os.kill(children_by_module(t.proc.pid)["stml"], signal.SIGUSR2)
    resp, _ = recv_until(a, P.TaskMgmtResponse, abort)
    assert resp.response == P.TMF_RESP_COMPLETE
    assert "inject: released 1 stalled backend(s); 1 call(s) had waited" in t.wait_log("stalled backend(s)")
    ready(a)
    assert not pending(a)                                   # no response for the aborted WRITE
    assert a.read16(8, 4) in (bytes(4 * BS), stalled)       # in doubt: wholly there or wholly absent
    more = block(16, "after") * 4
    a.write16(16, more)
    wlog.good(16, more)
    assert wlog.verify(a) == 8
    assert "exited with" not in t.log()
    a.close()
    b.close()


def test_a_stalled_offline_lun_still_answers_manual_intervention(tmp_path):
    """A stall rule on an offline LUN (its store could not open, 0280) leaves
    it offline: TEST UNIT READY after the stall fired still answers NOT
    READY, MANUAL INTERVENTION REQUIRED (02/04/03), not MEDIUM NOT PRESENT
    as a wrapped backend made it, and `status` still says why it is offline."""
    import asyncio

    from stml import config
    from stml.api import pack, unpack
    from stml.lu import LogicalUnit, LunOptions, Offline
    from stml.sense import parse_sense
    from stml.server import StmlServer

    async def main() -> tuple[list[tuple[int, int, int] | None], str | None]:
        server = StmlServer(config.load(data_dir=str(tmp_path / "data"), luns=("ram:1MiB",)))
        target = next(iter(server.emulator.targets.values()))
        lu = LogicalUnit(target.name, 0, Offline("gone"), LunOptions("file", path=str(tmp_path / "gone.img")),
                         server.emulator.templates["disk"])
        target.luns[0] = lu
        sent: list = []

        class Stream:
            region = None

            def send(self, frames: list) -> None:
                sent.append(unpack(frames[0]))
        ident = b"\0stream-1"
        server.streams[ident] = Stream()
        try:
            server.start_injection([parse_rule("stml:stall rx_cmnd at=1 lun=0 s=0")])
            server.received([ident, pack({"op": "register_target_front_end", "name": "t", "kind": "test",
                                          "version": [1, 0]})])
            server.received([ident, pack({"op": "register_nexus", "nexus": 1, "initiator": "iqn.x",
                                          "target": target.name, "tpg": 1})])
            for tag in (1, 2):                    # the stall fires at the first
                server.received([ident, pack({"op": "rx_cmnd", "tag": tag, "nexus": 1, "lun": 0,
                                              "cdb": bytes(16), "attr": 0, "dir": 0, "len": 0})])
            for _ in range(6000):   # both answer at once; the bound only ends a hung run (60 s)
                answers = [h for h in sent if h["op"] == "xmit_response"]
                if len(answers) == 2:
                    break
                await asyncio.sleep(0.01)
            server.release_stalls()
            return [parse_sense(h["sense"]) if h.get("sense") else None for h in answers], lu.offline
        finally:
            server.sock.close(linger=0)
            server.ctx.term()
            server.executor.shutdown()

    senses, offline = asyncio.run(main())
    assert senses == [(0x02, 0x04, 0x03)] * 2
    assert offline == "gone"


@pytest.mark.parametrize("rule, held", [
    ("fetd:delay * p=1 ms=600000 hold=3", 3),                # the count caps it
    ("fetd:delay * p=1 ms=600000 hold_kib=2", 2),            # 2 KiB: two 1000-byte messages
    ("fetd:delay * p=1 ms=600000", 10),                      # the default cap is far above 10
])
def test_a_delay_holds_no_more_than_its_cap_and_passes_the_rest_on(rule, held):
    """A rule delaying every message for ten minutes holds at most its cap;
    the rest pass on at once (counted), and what it held goes on in time."""
    import asyncio
    from stml.api import pack

    async def main() -> tuple[list[bool], Injector, int]:
        late: list = []
        inj = Injector([parse_rule(rule)], lambda *m: late.append(m), print)
        header = {"op": "rx_cmnd", "tag": 1}
        packed = pack(header)
        frames = [bytes(1000 - len(packed))]
        kept = [inj.inbound("fe", header, packed, frames) for _ in range(10)]
        return kept, inj, len(late)

    kept, inj, late = asyncio.run(main())
    assert kept.count(False) == inj.held == held and late == 0
    assert kept.count(True) == inj.passed[rule] == 10 - held
    assert inj.counts[rule] == 10


def test_no_rule_no_tap_and_an_injector_goes_before_other_taps(tmp_path):
    """Off unless asked: without rules the STML has no tap (its plain entry
    points); with rules the injector is the first tap, so a trace after it
    records what really crossed."""
    from stml import config
    from stml.server import StmlServer
    server = StmlServer(config.load(data_dir=str(tmp_path / "data"), luns=("ram:1MiB",)))
    try:
        assert server.tap is None and server.received == server._receive
        other = Injector([], print, print)
        server.add_tap(other)
        server.start_injection([parse_rule("stml:drop xmit_response at=1")])
        assert isinstance(server._taps[0], Injector) and server._taps[1] is other
        assert server.received == server._receive_tapped
    finally:
        server.sock.close(linger=0)
        server.ctx.term()
        server.executor.shutdown()


def test_a_trace_after_an_injector_records_what_it_lets_go_later(tmp_path):
    """A delayed command and a duplicated answer pass the trace when they
    really cross: the trace holds what the STML handled and sent."""
    import asyncio

    from stml import config
    from stml.api import pack, unpack
    from stml.server import StmlServer
    from stml.trace.format import Message, TraceReader

    read_capacity = bytes([0x25]) + bytes(9)

    async def main() -> tuple[list[str], list[str]]:
        server = StmlServer(config.load(data_dir=str(tmp_path / "data"), luns=("ram:1MiB",)))
        sent: list = []

        class Stream:
            region = None

            def send(self, frames: list) -> None:
                sent.append(frames)
        ident = b"\0stream-1"
        server.streams[ident] = Stream()
        try:
            server.start_injection([parse_rule("stml:delay rx_cmnd at=1 ms=10"),
                                    parse_rule("stml:duplicate xmit_response at=2")])
            path = str(tmp_path / "t.trace")
            await server.traces.start(path)
            server.received([ident, pack({"op": "register_target_front_end", "name": "t", "kind": "test",
                                          "version": [1, 0]})])
            target = next(iter(server.emulator.targets))
            server.received([ident, pack({"op": "register_nexus", "nexus": 1, "initiator": "iqn.x",
                                          "target": target, "tpg": 1})])
            for tag in (3, 4):
                server.received([ident, pack({"op": "rx_cmnd", "tag": tag, "nexus": 1, "lun": 0,
                                              "cdb": read_capacity, "attr": 0, "dir": 2, "len": 8})])
            for _ in range(200):                  # until the held command went and both answered
                if sum(unpack(f[0])["op"] == "xmit_response" for f in sent) >= 3:
                    break
                await asyncio.sleep(0.01)
            await server.traces.stop("stopped", "test")
            with TraceReader(path) as r:
                recorded = [m.op for m in r if isinstance(m, Message)]
            return [unpack(f[0])["op"] for f in sent], recorded
        finally:
            server.sock.close(linger=0)
            server.ctx.term()
            server.executor.shutdown()

    wire, recorded = asyncio.run(main())
    assert wire.count("xmit_response") == 3               # one answer duplicated
    assert recorded.count("rx_cmnd") == 2 and recorded.count("xmit_response") == 3


def test_seeded_probabilistic_rules_repeat_and_lose_no_write(targets):
    """Rules with p= on both sides at once: R2Ts delayed and answers
    duplicated at random, from seeds, so a sequential initiator meets exactly
    the faults the seeds pick (the message numbers are computed here from the
    same generator: the first BURST of each kind, the log's rate limit); every
    write is answered once with GOOD and reads back."""
    import random
    rules = ("fetd:delay rdy_to_xfer p=0.3 seed=5 ms=20", "stml:duplicate xmit_response p=0.2 seed=9")
    t = start(*rules)
    targets.append(t)
    wlog = WriteLog()
    lbas = [8 * i for i in range(20)]
    assert write_all(t, wlog, lbas, "p", immediate=False) == 1   # no session broke
    ini = login(t, "verify")
    ready(ini)
    assert wlog.verify(ini) == 80
    ini.close()
    for op, seed, p, n, verb in (("rdy_to_xfer", 5, 0.3, 20, "delaying"),   # the 20 writes' R2Ts
                                 # answers: the writer's TUR and 20 writes, the verifier's TUR and 80 reads
                                 ("xmit_response", 9, 0.2, 102, "duplicating")):
        rng = random.Random(seed)
        picks = [i for i in range(1, n + 1) if rng.random() < p]
        shown = picks[:BURST]    # a p= rule's lines are rate-limited like any repeated line
        log = t.wait_log(f"inject: {verb} {op} #{shown[-1]} ")
        assert [int(x) for x in re.findall(rf"inject: {verb} {op} #(\d+) ", log)] == shown
    assert "exited with" not in log


def test_a_hung_backend_call_does_not_hold_up_the_stop(stml_factory, client_factory, tmp_short):
    """LUN 0's backend hangs (stalled until SIGUSR2, never sent) with a WRITE in
    it; SIGTERM still stops the STML: LUN 1 (write cache on) is flushed, one
    line names LUN 0's flush as abandoned, the exit code is 1, and LUN 1's
    acknowledged data reads back after a restart. A normal stop exits 0."""
    d = tmp_short()
    luns = ("ram:1MiB", f"file:{d}/disk.img,size=4MiB,write_cache")
    stml = stml_factory(*luns, data_dir=d, extra=("--inject", "stml:stall register_nexus at=1 lun=0 s=0"))
    client = client_factory(stml.endpoint)
    data = block(3, "acknowledged") * 8
    client.write(1, 3, data)                                          # acknowledged, in the cache
    hung = client.submit(0, write16_cdb(0, 1), data_out=block(0, "hung"))
    stml.current.wait_log("inject: stalling LUN 0's backend")
    stml.proc.send_signal(signal.SIGTERM)
    assert stml.proc.wait(30) == 1
    log = stml.current.log()
    line, = [x for x in log.splitlines() if "abandoned" in x]
    assert "flush of LUN 0 of" in line and "LUN 1" not in line, log
    assert not hung.done() or hung.exception() is not None            # never acknowledged
    stml.extra = ()
    stml.start()
    assert client_factory(stml.endpoint).read(1, 3, 8) == data
    assert re.search(r"LUN 1 of \S+: flushed", log), log   # the cached LU was flushed, not just read back
    stml.proc.send_signal(signal.SIGTERM)
    assert stml.proc.wait(30) == 0 and "abandoned" not in stml.current.log()


@pytest.mark.parametrize("fails", ["flush", "close"])
def test_a_failed_flush_or_close_at_stop_is_named_the_others_finish_and_it_is_unclean(tmp_path, caplog, fails):
    """EIO from one LU's flush or close at stop (acknowledged writes may not be
    durable): one line names it, the other LU is still flushed and closed, the
    stop finishes without abandoning anything, and it counts as unclean (exit 1)."""
    import asyncio
    from stml import config
    from stml.server import StmlServer
    server = StmlServer(config.load(data_dir=str(tmp_path / "data"), luns=("ram:1MiB", "ram:1MiB")))
    lu0, lu1 = server.emulator.targets[IQN].luns.values()
    calls: list[str] = []

    def broken() -> None:
        raise OSError(5, "Input/output error")

    def counted(what: str):
        real = getattr(lu1.backend, what)
        return lambda: (calls.append(what), real())[1]
    setattr(lu0.backend, fails, broken)
    lu1.backend.flush, lu1.backend.close = counted("flush"), counted("close")
    try:
        with caplog.at_level("INFO", logger="stml"):
            asyncio.run(server._finish_backends(30))
    finally:
        server.sock.close(linger=0)   # else the context waits on it at exit
        server.ctx.term()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "stml"]
    assert errors == [f"LUN 0 of {IQN}: {fails} at stop failed: [Errno 5] Input/output error"]
    assert calls == ["flush", "close"] and server.unclean and not server.abandoned


def test_a_removed_lun_still_waiting_to_close_is_flushed_at_stop(tmp_path, caplog):
    """A LUN removed while a call of it runs waits to close (0254); a stop in
    that time flushes and closes it too, so its acknowledged writes are made
    durable before the process exits."""
    import asyncio
    from stml import config
    from stml.mgmt import Management
    from stml.server import StmlServer
    server = StmlServer(config.load(data_dir=str(tmp_path / "data"), luns=("ram:1MiB", "ram:1MiB")))
    server.mgmt = Management(server.emulator, server.config, gateway=None, metrics=None,  # type: ignore[arg-type]
                             portals=None, endpoints=[], traces=None)   # type: ignore[arg-type]
    lu1 = server.emulator.targets[IQN].luns[1]
    calls: list[str] = []
    real_flush, real_close = lu1.backend.flush, lu1.backend.close
    lu1.backend.flush = lambda: (calls.append("flush"), real_flush())[1]
    lu1.backend.close = lambda: (calls.append("close"), real_close())[1]
    release = threading.Event()

    async def run() -> None:
        call = server.emulator.workers.run(id(lu1), release.wait)   # keeps the removed LU open
        await server.mgmt.lun_remove(1, IQN)
        await asyncio.sleep(0.05)
        assert lu1 in server.mgmt.closing_lus and calls == []
        stop = asyncio.ensure_future(server._finish_backends(30))
        await asyncio.sleep(0.05)
        release.set()
        await call
        await stop
    try:
        with caplog.at_level("INFO", logger="stml"):
            asyncio.run(run())
    finally:
        release.set()
        server.sock.close(linger=0)
        server.ctx.term()
    assert calls[:2] == ["flush", "close"]
    assert f"removed LUN 1 of {IQN}: flushed" in [r.getMessage() for r in caplog.records]
