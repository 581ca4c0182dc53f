"""Unit tests of the pure reservation state machine (stml.pr.PrState), the
TransportID codec, the APTPL file, and of SAM task ordering through the
emulator with a fake send (no sockets, no processes)."""
from __future__ import annotations

import asyncio
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from backends import open_backend
from stml import alua, pr
from stml.api import Op, TaskAttr, Tmf, TmfResponse
from stml.disk import DiskTemplate
from stml.emulator import Emulator, Target
from stml.lu import LogicalUnit, LunOptions
from stml.ops import Conflict, OpEntry
from stml.sense import (
    INVALID_RELEASE, REGISTRATIONS_PREEMPTED, RESERVATION_CONFLICT, RESERVATIONS_PREEMPTED, RESERVATIONS_RELEASED,
    CheckCondition, StatusError,
)

T = "iqn.2026-11.org.scsi-target:disk0"
A = pr.Port("iqn.1994-05.com.example:a,i,0x23d000000001", T, 1)
A2 = pr.Port("iqn.1994-05.com.example:a,i,0x23d000000001", T, 2)   # same initiator port, other TPG
B = pr.Port("iqn.1994-05.com.example:b,i,0x23d000000002", T, 1)
C = pr.Port("iqn.1994-05.com.example:c,i,0x23d000000003", T, 2)



def rule(cdb: bytes) -> int:
    """The conflict rule the opcode table gives a command (PrState.conflicts takes it)."""
    return DiskTemplate().lookup(cdb).conflicts


READ10 = bytes([0x28]) + bytes(9)
WRITE10 = bytes([0x2A]) + bytes(9)
TUR = bytes(6)
INQUIRY = bytes([0x12]) + bytes(5)


def P(**kw) -> pr.PrParams:
    return pr.PrParams(**kw)


def conflicted(fn, *args) -> bool:
    try:
        fn(*args)
    except StatusError as e:
        assert e.status == RESERVATION_CONFLICT and not isinstance(e, CheckCondition)
        return True
    return False


@pytest.fixture
def st() -> pr.PrState:
    return pr.PrState(T, 0)


def register(st: pr.PrState, port, key: int, **kw) -> pr.Effects:
    return st.prout(port, pr.REGISTER_IGNORE, 0, 0, P(sark=key, **kw))


def test_register_rules_and_generation(st):
    assert conflicted(st.prout, A, pr.REGISTER, 0, 0, P(rk=5, sark=1))   # unregistered with a key
    st.prout(A, pr.REGISTER, 0, 0, P(sark=0))                          # unregister nothing: no-op
    assert st.generation == 0
    st.prout(A, pr.REGISTER, 0, 0, P(sark=0xA))
    assert st.generation == 1 and st.read_keys(0xFFFF) == struct.pack(">IIQ", 1, 8, 0xA)
    assert conflicted(st.prout, A, pr.REGISTER, 0, 0, P(rk=0xB, sark=0xC))  # wrong key
    st.prout(A, pr.REGISTER, 0, 0, P(rk=0xA, sark=0xC))                 # change key
    register(st, A, 0xD)                                                  # ignore existing key
    assert [r.key for r in st.regs] == [0xD] and st.generation == 3
    st.prout(A, pr.REGISTER, 0, 0, P(rk=0xD, sark=0))                   # unregister
    assert st.regs == [] and st.generation == 4
    assert st.reg_of(A2) is None


def test_all_tg_pt_registers_every_target_port(st):
    register(st, A, 7, all_tg_pt=True)
    assert st.reg_of(A) is st.reg_of(A2) is not None
    assert st.read_full_status(0xFFFF)[8 + 12] & 0x02   # ALL_TG_PT reported


def test_spec_i_pt_registers_named_ports(st):
    name_only = "iqn.1994-05.com.example:c"
    st.prout(A, pr.REGISTER, 0, 0, P(sark=9, spec_i_pt=True, transport_ids=[B.initiator, name_only]))
    assert st.reg_of(B).key == 9 and st.reg_of(C) is None      # C's port is TPG 2
    assert st.reg_of(pr.Port(C.initiator, T, 1)).key == 9     # a bare name names every ISID
    with pytest.raises(CheckCondition):                          # not with REGISTER AND IGNORE
        st.prout(B, pr.REGISTER_IGNORE, 0, 0, P(sark=3, spec_i_pt=True))


def test_spec_i_pt_registers_only_names_the_acl_admits(st):
    """A TransportID the target's ACL leaves out is refused, pointing at it,
    and none of the list is registered; names compare without case."""
    acl = {pr.name_key(A.initiator), pr.name_key(B.initiator)}
    stranger = "iqn.1994-05.com.example:stranger"
    with pytest.raises(CheckCondition) as e:
        st.prout(A, pr.REGISTER, 0, 0, P(sark=9, spec_i_pt=True, transport_ids=[B.initiator, stranger],
                                          tid_at=[28, 60], acl=acl))
    assert (e.value.key, e.value.asc, e.value.ascq, e.value.field.byte) == (0x5, 0x26, 0x00, 60)
    assert st.regs == [] and st.generation == 0
    st.prout(A, pr.REGISTER, 0, 0, P(sark=9, spec_i_pt=True, transport_ids=[B.initiator.replace("example", "EXAMPLE")],
                                      tid_at=[28], acl=acl))
    assert st.reg_of(A).key == st.reg_of(B).key == 9


def test_register_and_move_only_to_a_name_the_acl_admits(st):
    register(st, A, 1)
    st.prout(A, pr.RESERVE, 0, pr.WE, P(rk=1))
    with pytest.raises(CheckCondition) as e:
        st.prout(A, pr.REGISTER_AND_MOVE, 0, pr.WE,
                 P(rk=1, sark=5, transport_ids=[B.initiator], tid_at=[24], rel_port=1,
                   acl={pr.name_key(A.initiator)}))
    assert (e.value.asc, e.value.ascq, e.value.field.byte) == (0x26, 0x00, 24)
    assert st.is_holder(A) and st.reg_of(B) is None


@pytest.mark.parametrize("rtype, reg_read, reg_write, unreg_read, unreg_write", [
    (pr.EA, 0, 0, 0, 0), (pr.WE, 1, 0, 1, 0), (pr.EARO, 1, 1, 0, 0),
    (pr.WERO, 1, 1, 1, 0), (pr.EAAR, 1, 1, 0, 0), (pr.WEAR, 1, 1, 1, 0),
])
def test_access_by_type(st, rtype, reg_read, reg_write, unreg_read, unreg_write):
    register(st, A, 1)
    register(st, B, 2)
    st.prout(A, pr.RESERVE, 0, rtype, P(rk=1))
    assert not st.conflicts(A, rule(READ10)) and not st.conflicts(A, rule(WRITE10))
    assert st.conflicts(B, rule(READ10)) != bool(reg_read)
    assert st.conflicts(B, rule(WRITE10)) != bool(reg_write)
    assert st.conflicts(C, rule(READ10)) != bool(unreg_read)
    assert st.conflicts(C, rule(WRITE10)) != bool(unreg_write)
    assert not st.conflicts(C, rule(TUR))                    # allowed under every type
    key = 0 if rtype in pr.ALL_REGISTRANTS else 1
    assert st.read_reservation() == struct.pack(">IIQIBBH", st.generation, 16, key, 0, 0, rtype, 0)


def test_reserve_release_rules(st):
    assert conflicted(st.prout, A, pr.RESERVE, 0, pr.WE, P(rk=1))      # not registered
    register(st, A, 1)
    register(st, B, 2)
    with pytest.raises(CheckCondition):
        st.prout(A, pr.RESERVE, 0, 0x2, P(rk=1))                        # no such type
    st.prout(A, pr.RESERVE, 0, pr.WERO, P(rk=1))
    st.prout(A, pr.RESERVE, 0, pr.WERO, P(rk=1))                        # same again: GOOD
    assert conflicted(st.prout, A, pr.RESERVE, 0, pr.EA, P(rk=1))      # other type
    assert conflicted(st.prout, B, pr.RESERVE, 0, pr.WERO, P(rk=2))    # not the holder
    st.prout(B, pr.RELEASE, 0, pr.WERO, P(rk=2))                        # non-holder release: no-op
    assert st.type == pr.WERO
    with pytest.raises(CheckCondition) as e:
        st.prout(A, pr.RELEASE, 0, pr.EA, P(rk=1))                      # wrong type
    assert (e.value.asc, e.value.ascq) == INVALID_RELEASE
    gen = st.generation
    eff = st.prout(A, pr.RELEASE, 0, pr.WERO, P(rk=1))
    assert st.type is None and st.generation == gen                    # RELEASE keeps the generation
    assert [(r.key, ua) for r, ua in eff.ua] == [(2, RESERVATIONS_RELEASED)]


def test_holder_unregistering_releases_but_all_registrants_stay(st):
    register(st, A, 1)
    register(st, B, 2)
    st.prout(A, pr.RESERVE, 0, pr.EA, P(rk=1))
    st.prout(A, pr.REGISTER, 0, 0, P(rk=1, sark=0))
    assert st.type is None
    register(st, A, 1)
    st.prout(A, pr.RESERVE, 0, pr.WEAR, P(rk=1))
    st.prout(A, pr.REGISTER, 0, 0, P(rk=1, sark=0))
    assert st.type == pr.WEAR and st.is_holder(B) and not st.is_holder(A)
    st.prout(B, pr.RELEASE, 0, pr.WEAR, P(rk=2))
    assert st.type is None


def test_clear(st):
    register(st, A, 1)
    register(st, B, 2)
    st.prout(B, pr.RESERVE, 0, pr.WE, P(rk=2))
    eff = st.prout(A, pr.CLEAR, 0, 0, P(rk=1))
    assert st.regs == [] and st.type is None
    assert [(r.key, ua) for r, ua in eff.ua] == [(2, RESERVATIONS_PREEMPTED)]


def test_preempt_without_reservation_removes_registrations(st):
    register(st, A, 1)
    register(st, B, 2)
    gen = st.generation
    eff = st.prout(B, pr.PREEMPT, 0, pr.EA, P(rk=2, sark=1))
    assert [r.key for r in st.regs] == [2] and st.generation == gen + 1 and st.type is None
    assert [(r.key, ua) for r, ua in eff.ua] == [(1, REGISTRATIONS_PREEMPTED)]
    assert conflicted(st.prout, B, pr.PREEMPT, 0, pr.EA, P(rk=2, sark=0x99))   # nobody has it


def test_preempt_and_abort_takes_the_reservation(st):
    register(st, A, 1)
    register(st, B, 2)
    register(st, C, 3)
    st.prout(A, pr.RESERVE, 0, pr.WE, P(rk=1))
    eff = st.prout(B, pr.PREEMPT_AND_ABORT, 0, pr.EA, P(rk=2, sark=1))
    assert st.type == pr.EA and st.holder is st.reg_of(B)
    assert [r.key for r in eff.aborted] == [1]
    assert (1, REGISTRATIONS_PREEMPTED) in [(r.key, ua) for r, ua in eff.ua]
    assert (3, RESERVATIONS_RELEASED) in [(r.key, ua) for r, ua in eff.ua]   # type changed
    assert st.conflicts(A, rule(READ10)) and st.conflicts(C, rule(READ10))


def test_preempt_all_registrants_with_zero_key(st):
    register(st, A, 1)
    register(st, B, 2)
    st.prout(A, pr.RESERVE, 0, pr.EAAR, P(rk=1))
    st.prout(B, pr.PREEMPT, 0, pr.WE, P(rk=2, sark=0))
    assert [r.key for r in st.regs] == [2] and st.type == pr.WE and st.is_holder(B)


def test_register_and_move(st):
    register(st, A, 1)
    st.prout(A, pr.RESERVE, 0, pr.WE, P(rk=1))
    st.prout(A, pr.REGISTER_AND_MOVE, 0, pr.WE,
             P(rk=1, sark=5, transport_ids=[B.initiator], rel_port=1, unreg=True))
    assert st.is_holder(B) and st.reg_of(A) is None and st.reg_of(B).key == 5


def test_register_and_move_only_to_a_port_of_the_target():
    """REGISTER AND MOVE names the target port by the relative target port
    identifier VPD page 0x83 reports (the portal group tag; tag 0 is 0xFFFF).
    An identifier of no port group of the target is refused with its field
    pointed at (it made a registration, and moved the reservation to it, that
    no I_T nexus can ever hold), the others move it there."""
    from support.sbc_harness import TARGET, Harness, run

    def move(rel_port: int, to: str) -> tuple[bytes, bytes]:
        tid = pr.transport_id(to)
        data = struct.pack(">QQxBHI", 1, 5, 0, rel_port, len(tid)) + tid
        return bytes([0x5F, pr.REGISTER_AND_MOVE, pr.WE]) + struct.pack(">xxI", len(data)) + b"\0", data

    async def go():
        h = Harness()
        two, zero = "iqn.init:two,i,0x000000000002", "iqn.init:zero,i,0x000000000003"
        h.nexus(2, two)
        h.emulator.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": 3, "initiator": zero,
                                  "target": TARGET, "tpg": 0}, [])
        register = struct.pack(">QQ4x", 0, 1) + bytes(4)
        assert (await h.cmd(bytes([0x5F, pr.REGISTER, 0, 0, 0, 0, 0, 0, 24, 0]), register)).status == 0
        reserve = struct.pack(">QQ4x", 1, 0) + bytes(4)
        assert (await h.cmd(bytes([0x5F, pr.RESERVE, pr.WE, 0, 0, 0, 0, 0, 24, 0]), reserve)).status == 0
        st = h.lu().pr
        for rel_port in (7, 0):                    # no port group 7; 0 is reserved
            r = await h.cmd(*move(rel_port, two))
            assert r.key_asc == (0x05, 0x26, 0) and r.field == (18, None)
            assert [(reg.key, reg.initiator) for reg in st.regs] == [(1, "iqn.init:one")] and st.holder is st.regs[0]
        assert (await h.cmd(*move(0xFFFF, zero))).status == 0   # tag 0's identifier
        write = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
        assert (await h.cmd(write, bytes(512), nexus=3)).status == 0
        assert (await h.cmd(write, bytes(512), nexus=1)).status == RESERVATION_CONFLICT
        # READ FULL STATUS names the port it moved to as REGISTER AND MOVE did, and as
        # REPORT TARGET PORT GROUPS does (one identifier per port everywhere)
        full = await h.cmd(bytes([0x5E, 3, 0, 0, 0, 0, 0, 0x10, 0, 0]))
        ports, pos = {}, 8
        while pos < len(full.data):
            n = struct.unpack_from(">I", full.data, pos + 20)[0]
            ports[bytes(full.data[pos + 28:pos + 24 + n]).split(b",")[0].rstrip(b"\0")] = \
                struct.unpack_from(">H", full.data, pos + 18)[0]
            pos += 24 + n
        assert ports == {b"iqn.init:one": 1, b"iqn.init:zero": 0xFFFF}
        assert struct.unpack_from(">H", alua.descriptor(0), 10)[0] == 0xFFFF
    run(go())


def test_spc2_reservations_and_their_conflicts(st):
    st.reserve6(A)
    st.reserve6(A)
    assert conflicted(st.reserve6, B)
    st.release6(B)                          # someone else's RELEASE is a no-op
    assert st.conflicts(B, rule(READ10)) and st.conflicts(B, rule(TUR)) and not st.conflicts(B, rule(INQUIRY))
    assert conflicted(st.prout, B, pr.REGISTER, 0, 0, P(sark=1))
    st.drop_spc2(A.key)
    assert not st.conflicts(B, rule(READ10))
    register(st, B, 1)                      # with registrations, RESERVE/RELEASE conflict
    assert conflicted(st.reserve6, A) and conflicted(st.release6, A)


def test_one_i_t_nexus_whatever_the_case_of_its_initiator_name(st):
    """iSCSI names compare without case (RFC 3722): "IQN...:A" and "iqn...:a"
    with one ISID are one initiator port, so one I_T nexus: its SPC-2
    reservation, unit attentions and registration key are the same nexus's."""
    upper = pr.Port("IQN.1994-05.COM.EXAMPLE:A,i,0x23D000000001", T, 1)
    assert upper.key == A.key
    st.reserve6(upper)
    assert not st.conflicts(A, rule(READ10)) and st.conflicts(B, rule(READ10))
    st.drop_spc2(A.key)
    assert not st.conflicts(B, rule(READ10))
    reg = pr.Registration(1, upper.initiator, T, 1)
    assert reg.nexus_key() == A.key


def test_report_capabilities_and_read_full_status(st):
    caps = st.report_capabilities()
    assert len(caps) == 8 and struct.unpack_from(">H", caps)[0] == 8
    assert caps[4] == 0xEA and caps[5] == 0x01          # all six types
    register(st, A, 1)
    st.prout(A, pr.RESERVE, 0, pr.WE, P(rk=1))
    full = st.read_full_status(0xFFFF)
    gen, n = struct.unpack_from(">II", full)
    key, _, flags, scope_type, _, rel = struct.unpack_from(">QIBBIH", full, 8)
    assert (key, flags & 1, scope_type, rel) == (1, 1, pr.WE, 1)
    assert pr.parse_transport_ids(full[8 + 24:], 0) == ([A.initiator], [0])


def test_transport_ids_round_trip_and_refusals():
    for name in (A.initiator, "iqn.2026-01.x:bare"):
        assert pr.parse_transport_ids(pr.transport_id(name), 0) == ([name], [0])
    with pytest.raises(CheckCondition):
        pr.parse_transport_ids(bytes([0x01, 0, 0, 4]) + b"abc\0", 0)   # FC, not iSCSI
    with pytest.raises(CheckCondition):
        pr.parse_transport_ids(bytes([0x05, 0, 0, 40]) + b"x" * 8, 0)  # length runs past the end


def test_parameter_list_length_rules():
    basic = struct.pack(">QQ", 1, 2) + bytes(8)
    assert pr.parse_prout(pr.REGISTER, basic, 24).sark == 2
    with pytest.raises(CheckCondition):
        pr.parse_prout(pr.RESERVE, basic + bytes(4), 28)
    with pytest.raises(CheckCondition):
        pr.parse_prout(pr.RESERVE, basic[:20], 20)
    tid = pr.transport_id(B.initiator)
    spec = bytearray(basic)
    spec[20] = 0x08
    spec += struct.pack(">I", len(tid)) + tid
    assert pr.parse_prout(pr.REGISTER, bytes(spec), len(spec)).transport_ids == [B.initiator]


def test_aptpl_file_round_trip_and_corrupt_file(tmp_path):
    path = pr.state_path(tmp_path, T, 0)
    st = pr.PrState(T, 0)
    st.load(path)
    register(st, A, 0x1234, aptpl=True)
    register(st, B, 0x5678, aptpl=True)
    st.prout(B, pr.RESERVE, 0, pr.EARO, P(rk=0x5678))
    asyncio.run(st.persisted())
    assert json.loads(path.read_text())["reservation"]["type"] == pr.EARO
    again = pr.PrState(T, 0)
    again.load(path)
    assert again.read_full_status(0xFFFF) == st.read_full_status(0xFFFF)
    assert again.is_holder(B) and again.conflicts(C, rule(READ10))
    register(again, A, 0x1234, aptpl=False)       # the last REGISTER says no: the file goes
    asyncio.run(again.persisted())
    assert not path.exists()
    path.write_text('{"version": 1, "target": "')
    with pytest.raises(pr.PrStoreError) as e:
        pr.PrState(T, 0).load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ---------------------------------------------------------------- task ordering through the emulator

class Recorder:
    """A template whose commands record when they start and wait to be let go."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    async def handler(self, task) -> None:
        name = task.cdb[2:6].decode()
        self.started.append(name)
        gate = self.gates.setdefault(name, asyncio.Event())
        await gate.wait()


def ordering_emulator(rec: Recorder, sent: list) -> Emulator:
    from stml.disk import OPCODES, DiskTemplate
    entry = OpEntry(0xC0, "VENDOR WAIT", bytes([0xC0, 0, 0xFF, 0xFF, 0xFF, 0xFF]), rec.handler,
                    conflicts=Conflict.WRITE)
    template = DiskTemplate([entry, *OPCODES])
    lu = LogicalUnit(T, 0, open_backend("ram", 1 << 20, None, False), LunOptions(kind="ram", size=1 << 20),
                     template)
    emu = Emulator([Target(T, {0: lu})], lambda ident, h, f: sent.append(h),
                   ThreadPoolExecutor(1))
    emu.handle(b"fe", {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": "t",
                       "heartbeat_ms": 1000, "aen": False}, [])
    for n, who in ((1, A), (2, B)):
        emu.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": n, "initiator": who.initiator,
                           "target": T, "tpg": 1}, [])
    return emu


def cmd(emu: Emulator, tag: int, name: str, attr: TaskAttr, nexus: int = 1) -> None:
    emu.handle(b"fe", {"op": Op.RX_CMND, "tag": tag, "nexus": nexus, "lun": 0,
                       "cdb": bytes([0xC0, 0]) + name.encode(), "attr": int(attr), "dir": 0,
                       "len": 0, "unsol": 0}, [])


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_second_command_under_a_live_tag_is_not_run():
    """A duplicated rx_cmnd (the tag of a task still live) runs nothing and
    gets no answer of its own: its tag's one answer is the first command's."""
    async def run() -> None:
        rec, sent = Recorder(), []
        emu = ordering_emulator(rec, sent)
        cmd(emu, 1, "ONE_", TaskAttr.SIMPLE)
        await settle()
        cmd(emu, 1, "TWO_", TaskAttr.SIMPLE)
        await settle()
        assert rec.started == ["ONE_"]
        assert [h for h in sent if h["op"] == Op.XMIT_RESPONSE] == []
        rec.gates["ONE_"].set()
        await settle()
        assert [h["tag"] for h in sent if h["op"] == Op.XMIT_RESPONSE] == [1]
        cmd(emu, 1, "TWO_", TaskAttr.SIMPLE)     # once it ended, the tag is free again
        await settle()
        assert rec.started == ["ONE_", "TWO_"]
        rec.gates["TWO_"].set()
        await settle()
    asyncio.run(run())


def test_ordered_and_head_of_queue_ordering():
    async def run() -> None:
        rec, sent = Recorder(), []
        emu = ordering_emulator(rec, sent)
        cmd(emu, 1, "S1__", TaskAttr.SIMPLE)
        cmd(emu, 2, "ORD_", TaskAttr.ORDERED)
        cmd(emu, 3, "S2__", TaskAttr.SIMPLE)
        cmd(emu, 4, "HOQ_", TaskAttr.HEAD_OF_QUEUE)
        await settle()
        assert rec.started == ["S1__", "HOQ_"]           # HEAD OF QUEUE runs at once
        rec.gates["HOQ_"].set()
        await settle()
        assert rec.started == ["S1__", "HOQ_"]           # ORDERED still waits for S1
        rec.gates["S1__"].set()
        await settle()
        assert rec.started == ["S1__", "HOQ_", "ORD_"]   # and S2 waits for ORDERED
        rec.gates["ORD_"].set()
        await settle()
        assert rec.started == ["S1__", "HOQ_", "ORD_", "S2__"]
        rec.gates["S2__"].set()
        await settle()
        done = [h["tag"] for h in sent if h["op"] == Op.XMIT_RESPONSE]
        assert done == [4, 1, 2, 3]
    asyncio.run(run())


def test_reservation_taken_while_a_task_waits_is_checked_when_it_enters():
    """A task that waited in the task set is checked for reservations again when
    it enters (one that did not wait was checked a moment ago and is not)."""
    async def run() -> None:
        rec, sent = Recorder(), []
        emu = ordering_emulator(rec, sent)
        cmd(emu, 1, "ORD_", TaskAttr.ORDERED, nexus=1)
        cmd(emu, 2, "S1__", TaskAttr.SIMPLE, nexus=1)
        await settle()
        assert rec.started == ["ORD_"]                   # S1 waits behind the ORDERED task
        lu = emu.targets[T].luns[0]
        pr.state(lu).reserve6(emu.front_ends[b"fe"].nexuses[2])   # RESERVE(6) by the other nexus
        rec.gates["ORD_"].set()
        await settle()
        assert rec.started == ["ORD_"]                   # S1 never ran
        resp = [(h["tag"], h["status"]) for h in sent if h["op"] == Op.XMIT_RESPONSE]
        assert resp == [(1, 0), (2, RESERVATION_CONFLICT)]
    asyncio.run(run())


def test_a_read_that_waited_is_checked_against_the_lun_as_it_is_when_it_enters():
    """A READ behind an ORDERED task passed its range check on arrival; the LUN
    shrank while it waited: it ends LBA OUT OF RANGE, not with made-up data."""
    async def run() -> None:
        rec, sent = Recorder(), []
        emu = ordering_emulator(rec, sent)
        emu.handle(b"fe", {"op": Op.RX_CMND, "tag": 9, "nexus": 1, "lun": 0, "cdb": TUR,
                           "attr": 0, "dir": 0, "len": 0, "unsol": 0}, [])   # takes the power-on UA
        cmd(emu, 1, "ORD_", TaskAttr.ORDERED)
        last = (1 << 20) // 512 - 1
        emu.handle(b"fe", {"op": Op.RX_CMND, "tag": 2, "nexus": 1, "lun": 0, "attr": 0, "dir": 2,
                           "cdb": bytes([0x28, 0]) + last.to_bytes(4, "big") + bytes([0, 0, 1, 0]),
                           "len": 512, "unsol": 0}, [])
        await settle()
        assert [h["tag"] for h in sent if h["op"] == Op.XMIT_RESPONSE] == [9]   # the READ waits
        emu.targets[T].luns[0].backend.resize(1 << 19)
        rec.gates["ORD_"].set()
        await settle()
        resp = {h["tag"]: h for h in sent if h["op"] == Op.XMIT_RESPONSE}
        assert resp[1]["status"] == 0
        assert resp[2]["status"] == 2 and resp[2]["sense"][2] & 0x0F == 0x05   # ILLEGAL REQUEST
        assert resp[2]["sense"][12:14] == bytes([0x21, 0x00])                  # LBA OUT OF RANGE
    asyncio.run(run())


def test_lun_reset_aborts_everyone_tas_and_ua():
    async def run() -> None:
        rec, sent = Recorder(), []
        emu = ordering_emulator(rec, sent)
        cmd(emu, 1, "MINE", TaskAttr.SIMPLE, nexus=1)
        cmd(emu, 2, "THEM", TaskAttr.SIMPLE, nexus=2)
        await settle()
        emu.handle(b"fe", {"op": Op.RX_TMF, "tag": 9, "nexus": 1, "fn": int(Tmf.LUN_RESET),
                           "lun": 0, "ref": None}, [])
        await settle()
        done = [h for h in sent if h["op"] == Op.TMF_DONE]
        assert done and done[0]["response"] == TmfResponse.COMPLETE and done[0]["aborted"] == [1]
        resp = [h for h in sent if h["op"] == Op.XMIT_RESPONSE]
        assert [(h["tag"], h["status"]) for h in resp] == [(2, 0x40)]   # TASK ABORTED for the other
        lu = emu.targets[T].luns[0]
        assert lu.unit_attentions[B.key] == [(0x29, 0x03)]
        assert lu.unit_attentions[A.key] == [(0x29, 0x03)]
        assert not emu.front_ends[b"fe"].tasks and not lu.task_set.tasks
    asyncio.run(run())


def test_query_task_set_and_async_event():
    async def run() -> None:
        rec, sent = Recorder(), []
        emu = ordering_emulator(rec, sent)

        def tmf(tag, fn, ref=None):
            emu.handle(b"fe", {"op": Op.RX_TMF, "tag": tag, "nexus": 1, "fn": int(fn), "lun": 0,
                               "ref": ref}, [])
        tmf(10, Tmf.QUERY_TASK_SET)
        tmf(11, Tmf.QUERY_ASYNC_EVENT)
        cmd(emu, 1, "QRY_", TaskAttr.SIMPLE)
        await settle()
        tmf(12, Tmf.QUERY_TASK_SET)
        tmf(13, Tmf.QUERY_TASK, ref=1)
        lu = emu.targets[T].luns[0]
        lu.add_ua((0x2A, 0x03), [A.key])
        tmf(14, Tmf.QUERY_ASYNC_EVENT)
        lu.add_ua((0x2A, 0x09), [A.key])
        tmf(15, Tmf.QUERY_ASYNC_EVENT)
        await settle()
        done = {h["tag"]: h for h in sent if h["op"] == Op.TMF_DONE}
        got = {tag: h["response"] for tag, h in done.items()}
        assert got == {10: TmfResponse.COMPLETE, 11: TmfResponse.COMPLETE, 12: TmfResponse.SUCCEEDED,
                       13: TmfResponse.SUCCEEDED, 14: TmfResponse.SUCCEEDED, 15: TmfResponse.SUCCEEDED}
        # the additional response information: UADE depth (1, then 2: more than one), UNIT
        # ATTENTION and the oldest one's ASC/ASCQ; a query reports without clearing
        assert done[14]["info"] == bytes([0x16, 0x2A, 0x03])
        assert done[15]["info"] == bytes([0x26, 0x2A, 0x03])
        assert "info" not in done[11] and "info" not in done[12]
        assert lu.unit_attentions[A.key] == [(0x2A, 0x03), (0x2A, 0x09)]
        rec.gates["QRY_"].set()
        await settle()
    asyncio.run(run())


def test_find_state_moves_a_renumbered_lus_file_and_takes_no_other_lus(tmp_path):
    """find_state (0218): an LU's state under another number (its id's name,
    or the legacy name its id was derived from) is renamed to its number,
    the document saying so; a file another LU of the target owns is never
    taken, another target's never either, and two candidates are refused."""
    from stml.lu import legacy_id

    def put(path, target, lun):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"version": 1, "target": target, "lun": lun, "generation": 1,
                                    "aptpl": True, "registrations": [], "reservation": None}))

    ident = "ab" * 16
    put(pr.state_path(tmp_path, T, 3, ident), T, 3)
    assert pr.find_state(tmp_path, T, 5, ident, {pr.state_path(tmp_path, T, 3, ident)}) \
        == pr.state_path(tmp_path, T, 5, ident)
    assert sorted(p.name for p in (tmp_path / "pr").iterdir()) == [f"{ident}_3.json"]   # owned: not taken
    got = pr.find_state(tmp_path, T, 5, ident)
    assert got.name == f"{ident}_5.json" and json.loads(got.read_text())["lun"] == 5
    assert sorted(p.name for p in (tmp_path / "pr").iterdir()) == [f"{ident}_5.json"]
    old = legacy_id(T, 2)                    # a LUN served before ids: the legacy name
    put(pr.state_path(tmp_path, T, 2), T, 2)
    got = pr.find_state(tmp_path, T, 4, old)
    assert got.name == f"{old}_4.json" and not pr.state_path(tmp_path, T, 2).exists()
    other = "cd" * 16
    put(pr.state_path(tmp_path, T, 1, other).with_name(f"{other}_1.json"), "iqn.2026-01.org.other:t", 1)
    assert not pr.find_state(tmp_path, T, 6, other).exists()   # another target's: left alone
    put(pr.state_path(tmp_path, T, 7, ident), T, 7)
    put(pr.state_path(tmp_path, T, 8, ident), T, 8)
    with pytest.raises(pr.PrStoreError, match=r"are in 3 files .*: move away all but the one of its LUN 9$"):
        pr.find_state(tmp_path, T, 9, ident)


def test_a_start_lists_the_reservation_files_once_for_all_its_lus(tmp_path, monkeypatch):
    """StateFiles (0218): looking up many LUs without a file of their own
    lists pr/ once, not once per LU; a file moved for one LU is not offered
    to the next."""
    import os as os_mod
    listings = []
    real = os_mod.listdir
    monkeypatch.setattr(os_mod, "listdir", lambda d: (listings.append(d), real(d))[1])
    ids = [f"{n:032x}" for n in range(1, 41)]
    moved = pr.state_path(tmp_path, T, 0, ids[0])
    moved.parent.mkdir()
    moved.write_text(json.dumps({"version": 1, "target": T, "lun": 0, "generation": 1, "aptpl": True,
                                 "registrations": [], "reservation": None}))
    files = pr.StateFiles(tmp_path)
    got = [pr.find_state(tmp_path, T, 100 + n, ident, (), files) for n, ident in enumerate(ids)]
    assert len(listings) == 2   # one for the 40 lookups, one by the moved file's write (its stale temporaries)
    assert [p.name for p in got if p.exists()] == [f"{ids[0]}_100.json"]
    assert files.of(T, ids[0]) == [got[0]]
