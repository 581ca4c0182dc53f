"""Persistent reservations cost what the request asks for (issue 18): hostile
PERSISTENT RESERVE OUT/IN commands through a real STML and the loopback front
end get the right sense or a capped answer and leave no state behind, while
another initiator's I/O on another LU keeps completing; and the work behind
them, counted in-process, is linear."""
from __future__ import annotations

import asyncio
import json
import struct
import threading
from pathlib import Path

import pytest

from scsi_target.mgmt import MgmtClient
from stml import pr

GOOD, CHECK_CONDITION = 0x00, 0x02
ILLEGAL_REQUEST, UNIT_ATTENTION = 0x5, 0x6
INSUFFICIENT_REGISTRATION_RESOURCES = (0x55, 0x04)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, REGISTER_IGNORE = 0, 1, 2, 3, 4, 6
READ_KEYS, READ_FULL_STATUS = 0, 3
SPEC_I_PT, APTPL = 0x08, 0x01
WERO = 0x5
NAME = "iqn.2026-01.org.scsi-target.test"


def tid(name: str, length: int | None = None) -> bytes:
    """An iSCSI TransportID, written out here rather than with stml.pr's encoder."""
    body = name.encode() + b"\0"
    body += bytes(-len(body) % 4)
    body = body.ljust(max(20, length or 0), b"\0")
    return bytes([(0x40 if ",i," in name else 0) | 0x05, 0]) + struct.pack(">H", len(body)) + body


def prout(sa: int, rk: int = 0, sark: int = 0, flags: int = 0, tids: list[bytes] | None = None,
          rtype: int = 0, tid_length: int | None = None) -> tuple[bytes, bytes]:
    """(CDB, parameter list) of a PERSISTENT RESERVE OUT."""
    params = struct.pack(">QQ", rk, sark) + bytes(4) + bytes([flags]) + bytes(3)
    if tids is not None:
        body = b"".join(tids)
        params += struct.pack(">I", len(body) if tid_length is None else tid_length) + body
    return bytes([0x5F, sa, rtype, 0, 0]) + struct.pack(">I", len(params)) + b"\0", params


def prin(sa: int, alloc: int) -> bytes:
    return bytes([0x5E, sa, 0, 0, 0, 0, 0]) + struct.pack(">H", alloc) + b"\0"


def write10(lba: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 1, 0)


def read10(lba: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, 1, 0)


def status(stml) -> dict:
    return MgmtClient(stml.endpoint).call("status")


def lun_status(stml, lun: int) -> dict:
    return next(r for r in status(stml)["luns"] if r["lun"] == lun)


def refused(r, asc_ascq: tuple[int, int], field: int | None = None) -> bool:
    """CHECK CONDITION, ILLEGAL REQUEST with this ASC/ASCQ (and field pointer)."""
    ok = r.status == CHECK_CONDITION and r.sense_key == ILLEGAL_REQUEST and r.asc_ascq == asc_ascq
    if field is not None:   # fixed format: SKSV, C/D 0 (parameter list), field pointer
        ok = ok and r.sense[15] & 0xC0 == 0x80 and struct.unpack(">H", r.sense[16:18])[0] == field
    return ok


def tid_bytes(initiator: str) -> int:
    """What a registration's TransportID takes in READ FULL STATUS (SPC-4 7.6.4.6)."""
    return 4 + max(20, -(-(len(initiator.encode()) + 1) // 4) * 4)


class OtherLu:
    """Another initiator's writes and reads on another LU, submitted while a
    hostile command is in flight: they must all complete, with their data."""

    def __init__(self, client, lun: int = 1) -> None:
        self.c, self.lun, self.futures, self.n = client, lun, [], 0

    def submit(self, count: int = 8) -> None:
        for _ in range(count):
            lba = self.n % 2048
            self.futures.append((lba, self.c.submit(self.lun, write10(lba), bytes([lba % 251]) * 512)))
            self.n += 1

    def check(self) -> None:
        for lba, fut in self.futures:
            assert fut.result(30).status == GOOD
            assert self.c.execute(self.lun, read10(lba), data_in=512).data == bytes([lba % 251]) * 512
        self.futures = []


@pytest.fixture
def two_luns(stml_factory):
    return stml_factory("ram:16MiB", "ram:16MiB")


def test_spec_i_pt_list_is_validated_whole_and_capped_before_any_change(two_luns, client_factory):
    a = client_factory(two_luns.endpoint, initiator=f"{NAME}:a")
    other = OtherLu(client_factory(two_luns.endpoint, initiator=f"{NAME}:b"))
    names = [f"{NAME}:n{i:05d}" for i in range(1024)]

    # a name of 224 bytes, an ISID that is not hex, a TransportID longer than
    # any iSCSI name needs, a list length that disagrees with the CDB's
    long_name = f"{NAME}:" + "x" * (224 - len(NAME) - 1)
    assert refused(a.execute(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(names[0]), tid(long_name)])),
                   INVALID_FIELD_IN_PARAMETER_LIST, 28 + len(tid(names[0])) + 4)
    assert refused(a.execute(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(f"{NAME}:c,i,0xZZ")])),
                   INVALID_FIELD_IN_PARAMETER_LIST, 32)
    assert refused(a.execute(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(names[0], 248)])),
                   INVALID_FIELD_IN_PARAMETER_LIST, 30)
    assert refused(a.execute(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(names[0])], tid_length=8)),
                   PARAMETER_LIST_LENGTH_ERROR)

    # the issuer and 1024 more: one past the cap, refused while the other LU keeps working
    hostile = a.submit(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(n) for n in names]))
    other.submit()
    assert refused(hostile.result(30), INSUFFICIENT_REGISTRATION_RESOURCES)
    other.check()
    assert a.execute(0, prin(READ_KEYS, 8), data_in=8).data == struct.pack(">II", 0, 0)
    assert lun_status(two_luns, 0)["registrations"] == 0

    # a 223-byte name and 1022 others: up to the cap exactly, accepted
    ok = [f"{NAME}:" + "y" * (223 - len(NAME) - 1)] + names[:1022]
    assert a.execute(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(n) for n in ok])).status == GOOD
    assert lun_status(two_luns, 0)["registrations"] == 1024
    b = client_factory(two_luns.endpoint, initiator=f"{NAME}:late")
    assert refused(b.execute(0, *prout(REGISTER_IGNORE, sark=0xB)), INSUFFICIENT_REGISTRATION_RESOURCES)


def test_read_keys_and_full_status_stop_at_the_allocation_length(two_luns, client_factory):
    a = client_factory(two_luns.endpoint, initiator=f"{NAME}:a")
    names = [f"{NAME}:n{i:05d}" for i in range(1023)]
    assert a.execute(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(n) for n in names])).status == GOOD

    keys = a.execute(0, prin(READ_KEYS, 20), data_in=20).data
    assert len(keys) == 20 and struct.unpack_from(">IIQ", keys) == (1, 1024 * 8, 0xA)

    full = a.execute(0, prin(READ_FULL_STATUS, 60), data_in=60).data
    total = sum(24 + tid_bytes(n) for n in [a.initiator] + names)
    assert len(full) == 60 and struct.unpack_from(">II", full) == (1, total)
    assert struct.unpack_from(">Q", full, 8)[0] == 0xA
    whole = a.execute(0, prin(READ_FULL_STATUS, 0xFFFF), data_in=0xFFFF).data
    assert len(whole) == min(0xFFFF, 8 + total) and whole[:60] == full


def test_prout_goes_good_only_once_its_aptpl_file_is_written(two_luns, client_factory):
    """GOOD means saved: after each REGISTER with APTPL, the file already holds
    the new key; an unregistration that drops APTPL removes it."""
    a = client_factory(two_luns.endpoint, initiator=f"{NAME}:a")
    other = OtherLu(client_factory(two_luns.endpoint, initiator=f"{NAME}:b"))
    files = Path(two_luns.data_dir) / "pr"
    for key in range(1, 9):
        pending = a.submit(0, *prout(REGISTER_IGNORE, sark=key, flags=APTPL))
        other.submit(2)
        assert pending.result(30).status == GOOD
        (path,) = files.glob("*_0.json")
        assert [r["key"] for r in json.loads(path.read_text())["registrations"]] == [key]
    other.check()
    assert a.execute(0, *prout(REGISTER, rk=8, sark=0)).status == GOOD
    assert not list(files.glob("*_0.json"))
    assert lun_status(two_luns, 0)["pr_saves"] == 9


def test_unit_attentions_are_kept_only_for_nexuses_that_exist_or_are_registered(two_luns, client_factory):
    """REGISTER (SPEC_I_PT, ports that never log in) + CLEAR cycles leave no
    unit attentions behind; a live registrant still gets its own, and a
    registered port that is not logged in keeps one only while registered."""
    a = client_factory(two_luns.endpoint, initiator=f"{NAME}:a")
    b = client_factory(two_luns.endpoint, initiator=f"{NAME}:b")
    for cycle in range(3):
        ports = [f"{NAME}:c{cycle}-{i},i,0x23d0000000{i % 100:02x}" for i in range(300)]
        assert a.execute(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(p) for p in ports])).status == GOOD
        assert b.execute(0, *prout(REGISTER_IGNORE, sark=0xB)).status == GOOD
        assert lun_status(two_luns, 0)["registrations"] == 302
        assert a.execute(0, *prout(CLEAR, rk=0xA)).status == GOOD
        st = lun_status(two_luns, 0)
        assert st["registrations"] == 0 and st["unit_attentions"] == 1   # b's, and only b's
        r = b.execute(0, bytes(6))
        assert r.sense_key == UNIT_ATTENTION and r.asc_ascq == RESERVATIONS_PREEMPTED
        assert lun_status(two_luns, 0)["unit_attentions"] == 0

    # a port registered by SPEC_I_PT but not logged in hears of a release
    # (RESERVATIONS RELEASED) while it is registered, and not once it is not
    away = f"{NAME}:away,i,0x23d000000001"
    assert a.execute(0, *prout(REGISTER, sark=0xA, flags=SPEC_I_PT, tids=[tid(away)])).status == GOOD
    assert b.execute(0, *prout(REGISTER_IGNORE, sark=0xB)).status == GOOD
    assert a.execute(0, *prout(RESERVE, rk=0xA, rtype=WERO)).status == GOOD
    assert a.execute(0, *prout(RELEASE, rk=0xA, rtype=WERO)).status == GOOD
    assert lun_status(two_luns, 0)["unit_attentions"] == 2                   # b's and away's
    assert b.execute(0, bytes(6)).sense_key == UNIT_ATTENTION
    assert a.execute(0, *prout(PREEMPT, rk=0xA, sark=0xA)).status == GOOD   # away has a's key: it goes
    assert lun_status(two_luns, 0)["registrations"] == 2                     # a (kept) and b
    assert lun_status(two_luns, 0)["unit_attentions"] == 0


# ---------------------------------------------------------------- the work, counted in-process

T = "iqn.2026-11.org.scsi-target:disk0"


class CountingName(str):
    """An initiator name that counts the comparisons made with it."""
    compared = 0

    def __eq__(self, other: object) -> bool:
        CountingName.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_spec_i_pt_registration_is_linear_in_the_list():
    """1023 TransportIDs, then a list past the cap: name comparisons stay in
    proportion to the list (they were quadratic: ~500,000)."""
    st = pr.PrState(T, 0)
    issuer = pr.Port(f"{NAME}:a,i,0x23d000000001", T, 1)
    names = [CountingName(f"{NAME}:n{i:05d}") for i in range(1023)]
    CountingName.compared = 0
    st.prout(issuer, pr.REGISTER, 0, 0, pr.PrParams(sark=1, spec_i_pt=True, transport_ids=names))
    assert len(st.regs) == 1024 and CountingName.compared <= 2 * len(names)
    other = pr.Port(f"{NAME}:b,i,0x23d000000002", T, 1)
    more = [CountingName(f"{NAME}:m{i:05d}") for i in range(2000)]
    CountingName.compared = 0
    with pytest.raises(pr.CheckCondition) as e:
        st.prout(other, pr.REGISTER, 0, 0, pr.PrParams(sark=2, spec_i_pt=True, transport_ids=more))
    assert (e.value.asc, e.value.ascq) == INSUFFICIENT_REGISTRATION_RESOURCES
    assert len(st.regs) == 1024 and CountingName.compared <= 2 * len(more)


def test_read_full_status_builds_only_what_the_allocation_length_holds(monkeypatch):
    st = pr.PrState(T, 0)
    issuer = pr.Port(f"{NAME}:a,i,0x23d000000001", T, 1)
    st.prout(issuer, pr.REGISTER, 0, 0, pr.PrParams(
        sark=1, spec_i_pt=True, transport_ids=[f"{NAME}:n{i:05d}" for i in range(1023)]))
    built = []
    real = pr.transport_id
    monkeypatch.setattr(pr, "transport_id", lambda name: built.append(name) or real(name))
    out = st.read_full_status(100)
    assert len(built) == 2 and len(out) >= 100    # two descriptors reach past 100 bytes
    assert struct.unpack_from(">I", out, 4)[0] == sum(24 + tid_bytes(r.initiator) for r in st.regs)


class GatedSaves:
    """An APTPL PrState whose saves each wait for `gate` in the saver thread;
    `writes` lists (thread name, registrations) per save as it starts."""

    def __init__(self, tmp_path, monkeypatch) -> None:
        self.st = pr.PrState(T, 0)
        self.st.load(pr.state_path(tmp_path, T, 0))
        self.gate = threading.Event()
        self.writes: list[tuple[str, int]] = []
        real = pr._write_state

        def gated(path, doc):
            self.writes.append((threading.current_thread().name, len(doc["registrations"])))
            self.gate.wait(30)
            return real(path, doc)
        monkeypatch.setattr(pr, "_write_state", gated)

    def register(self, i: int) -> asyncio.Future:
        """REGISTER a key with APTPL; the future of its save."""
        port = pr.Port(f"{NAME}:p{i},i,0x23d0000000{i:02x}", T, 1)
        self.st.prout(port, pr.REGISTER, 0, 0, pr.PrParams(sark=i + 1, aptpl=True))
        return asyncio.ensure_future(self.st.persisted())

    async def first_write_started(self) -> None:
        while not self.writes:       # in the saver thread
            await asyncio.sleep(0.01)


def test_aptpl_saves_run_in_their_thread_and_coalesce(tmp_path, monkeypatch):
    """While one save is being written, nine more changes wait for one more
    write that covers them all; none is answered before its write is done."""
    saves = GatedSaves(tmp_path, monkeypatch)

    async def run() -> None:
        waits = [saves.register(0)]
        await saves.first_write_started()
        waits += [saves.register(i) for i in range(1, 10)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waits)
        saves.gate.set()
        await asyncio.gather(*waits)
    asyncio.run(run())
    assert saves.writes == [("pr-save_0", 1), ("pr-save_0", 10)]
    assert len(json.loads(pr.state_path(tmp_path, T, 0).read_text())["registrations"]) == 10


def test_a_stop_waits_for_the_save_under_way_and_queues_no_more(tmp_path, monkeypatch):
    """Changes that wait for a second write when the STML stops fail (their
    commands are not answered) instead of queueing that write behind the
    stop's wait for the savers, which would then miss it (a hung one would
    hang the exit); the write under way is waited for."""
    saves = GatedSaves(tmp_path, monkeypatch)

    async def run() -> list:
        first = saves.register(0)
        await saves.first_write_started()
        second = saves.register(1)
        pr.stop_saving()
        waited = asyncio.ensure_future(asyncio.to_thread(pr.wait_for_saves))
        saves.gate.set()
        await waited
        return await asyncio.gather(first, second, return_exceptions=True)
    first, second = asyncio.run(run())
    assert first is None and isinstance(second, OSError) and "stopping" in str(second)
    assert [n for _, n in saves.writes] == [1]


def _sessions(sent: list, count: int):
    """An in-process STML with one RAM LU and `count` sessions of one front
    end (initiators s1..s{count}): (emulator, LU)."""
    from concurrent.futures import ThreadPoolExecutor

    from backends import open_backend
    from stml.api import Op
    from stml.emulator import Emulator, Target
    from stml.lu import LogicalUnit, LunOptions
    lu = LogicalUnit(T, 0, open_backend("ram", 1 << 20, None, False), LunOptions(kind="ram", size=1 << 20),
                     None)
    emu = Emulator([Target(T, {0: lu})], lambda ident, h, f: sent.append(h), ThreadPoolExecutor(1))
    lu.template = emu.templates["disk"]
    emu.handle(b"fe", {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": "t",
                       "heartbeat_ms": 1000, "aen": False}, [])
    for n in range(1, count + 1):
        emu.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": n, "initiator": f"{NAME}:s{n}",
                           "target": T, "tpg": 1}, [])
    return emu, lu


def _run_prout(emu, sent: list, nexus: int, cdb: bytes, params: bytes) -> dict:
    """One PERSISTENT RESERVE OUT from session `nexus`, run to its response."""
    from stml.api import Op
    sent.clear()

    async def run() -> None:
        emu.handle(b"fe", {"op": Op.RX_CMND, "tag": 1, "nexus": nexus, "lun": 0, "cdb": cdb, "attr": 0,
                           "dir": 1, "len": len(params), "unsol": len(params)}, [params])
        while not [h for h in sent if h["op"] == Op.XMIT_RESPONSE]:
            await asyncio.sleep(0)
    asyncio.run(run())
    (resp,) = [h for h in sent if h["op"] == Op.XMIT_RESPONSE]
    return resp


def test_pr_effects_match_registrations_to_sessions_by_name(monkeypatch):
    """CLEAR of 1,000 registrations with 200 sessions logged in: registrations
    are matched only against sessions of their own name (it was every
    registration against every session: 200,000 matches), and one UA is
    stored per live registrant, none for the ports that never logged in."""
    sent: list = []
    emu, lu = _sessions(sent, 200)
    st = pr.state(lu)
    for n in range(2, 201):     # 199 live registrants, and 800 ports that never log in
        st.prout(pr.Port(f"{NAME}:s{n}", T, 1), pr.REGISTER, 0, 0, pr.PrParams(sark=n))
    st.prout(pr.Port(f"{NAME}:s1", T, 1), pr.REGISTER, 0, 0, pr.PrParams(
        sark=1, spec_i_pt=True, transport_ids=[f"{NAME}:gone{i},i,0x23d0000000{i % 256:02x}" for i in range(800)]))
    assert len(st.regs) == 1000
    matches = []
    real = pr.Registration.matches
    monkeypatch.setattr(pr.Registration, "matches", lambda self, n: matches.append(1) or real(self, n))
    resp = _run_prout(emu, sent, 1, *prout(CLEAR, rk=1))
    assert resp["status"] == GOOD and st.regs == []
    assert len(matches) <= 1000 + 200
    assert len(lu.unit_attentions) == 199 and f"{NAME}:s1|{T},t,1" not in lu.unit_attentions


def test_register_without_effects_walks_no_session_or_registration(monkeypatch):
    """A REGISTER that changes a key, with 200 sessions logged in and 1,000
    registrations: it has no unit attention or abort to deliver, so it visits
    no session (it grouped every live nexus by name: 200 visits) and no
    registration (it listed each one's nexus key: 1,000)."""
    sent: list = []
    emu, lu = _sessions(sent, 200)
    st = pr.state(lu)
    for n in range(2, 201):
        st.prout(pr.Port(f"{NAME}:s{n}", T, 1), pr.REGISTER, 0, 0, pr.PrParams(sark=n))
    st.prout(pr.Port(f"{NAME}:s1", T, 1), pr.REGISTER, 0, 0, pr.PrParams(
        sark=1, spec_i_pt=True, transport_ids=[f"{NAME}:gone{i},i,0x23d0000000{i % 256:02x}" for i in range(800)]))
    assert len(st.regs) == 1000
    visits = []
    real_nexuses, real_nexus_key = emu.nexuses, pr.Registration.nexus_key
    monkeypatch.setattr(emu, "nexuses", lambda target: [visits.append(n) or n for n in real_nexuses(target)])
    monkeypatch.setattr(pr.Registration, "nexus_key", lambda self: visits.append(self) or real_nexus_key(self))
    resp = _run_prout(emu, sent, 2, *prout(REGISTER, rk=2, sark=0x77))
    assert resp["status"] == GOOD
    assert [r.key for r in st.regs if r.initiator == f"{NAME}:s2"] == [0x77]
    assert visits == []
