"""A nexus that outlived the STML that held it (register_nexus `resumed`,
docs/decisions/0247): the STML gives it POWER ON OCCURRED (06/29/01) on
every LU of its target, through the bounded fan-out and before
`nexus_ready`; a new nexus (no flag: every front end older than 1.9) gets
none (0006). The link sets the flag only for a nexus it registered with
another STML instance. An I_T nexus this STML lost without its initiator
asking hears I_T NEXUS LOSS OCCURRED (06/29/07) when it comes back (0234).
In-process: an Emulator with a fake send, a FrontEndLink with a fake channel."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from backends import open_backend
from stml import emulator as emulator_mod
from stml.api import FrontEndLink, Op, unpack
from stml.api.link import nexus_registration
from stml.emulator import Emulator, Target
from stml.lu import LogicalUnit, LunOptions
from stml.mgmt import Management

T, OTHER = "iqn.2026-12.org.test:resumed", "iqn.2026-12.org.test:other"
TUR = bytes(6)
PREVENT = bytes([0x1E, 0, 0, 0, 1, 0])
POWER_ON_OCCURRED = (0x06, 0x29, 0x01)
NEXUS_LOSS = (0x06, 0x29, 0x07)
RESERVE6, RELEASE6, RESERVATION_CONFLICT = bytes([0x16, 0, 0, 0, 0, 0]), bytes([0x17, 0, 0, 0, 0, 0]), (0x18,)


def setup(sent: list, luns: int = 3) -> Emulator:
    """An emulator with two targets of `luns` RAM LUs (removable: PREVENT
    counts), one front end."""
    emu = Emulator([], lambda ident, h, f: sent.append(h), ThreadPoolExecutor(1))
    for name in (T, OTHER):
        options = LunOptions(kind="ram", size=1 << 16, removable=True)
        lus = {n: LogicalUnit(name, n, open_backend("ram", 1 << 16), options, emu.templates["disk"])
               for n in range(luns)}
        emu.targets[name] = Target(name, lus, "", {"acl": []})
    emu.handle(b"fe", {"op": Op.REGISTER, "version": [1, 9], "kind": "test", "name": "t",
                       "heartbeat_ms": 1000, "aen": True}, [])
    return emu


def register(emu: Emulator, nexus: int, target: str = T, ini: int | None = None, fe: bytes = b"fe",
             **extra) -> None:
    """Nexus `nexus` of front end `fe`, of initiator port i`ini` (default: i`nexus`)."""
    port = f"iqn.2026-12.org.test:i{nexus if ini is None else ini},i,0x1"
    emu.handle(fe, {**nexus_registration(nexus, port, target, 1), **extra}, [])


def command(emu: Emulator, sent: list, nexus: int, lun: int, cdb: bytes = TUR,
            fe: bytes = b"fe") -> tuple[int, ...] | None:
    """One command to its response: None for GOOD, else (key, ASC, ASCQ),
    or (status,) for a status without sense."""
    sent.clear()

    async def run() -> dict:
        emu.handle(fe, {"op": Op.RX_CMND, "tag": 7, "nexus": nexus, "lun": lun, "cdb": cdb}, [])
        while True:
            done = [h for h in sent if h["op"] == Op.XMIT_RESPONSE]
            if done:
                return done[0]
            await asyncio.sleep(0)
    resp = asyncio.run(run())
    if resp["status"] == 0:
        return None
    s = resp.get("sense")
    return (s[2] & 0x0F, s[12], s[13]) if s else (resp["status"],)


def ready(sent: list) -> list[dict]:
    return [h for h in sent if h["op"] == Op.NEXUS_READY]


def test_a_new_nexus_gets_no_unit_attention():
    sent: list = []
    emu = setup(sent)
    register(emu, 1)
    assert ready(sent) == [{"op": Op.NEXUS_READY, "nexus": 1}]
    assert all(command(emu, sent, 1, lun) is None for lun in range(3))
    register(emu, 2, resumed=False)
    assert all(command(emu, sent, 2, lun) is None for lun in range(3))


def test_a_resumed_nexus_gets_power_on_occurred_once_on_every_lu_of_its_target():
    sent: list = []
    emu = setup(sent)
    register(emu, 1)                       # another initiator, there since this STML started
    sent.clear()
    register(emu, 2, resumed=True)
    assert ready(sent) == [{"op": Op.NEXUS_READY, "nexus": 2}]
    assert not [h for h in sent if h["op"] == Op.REPORT_AEN]   # (it would race a login's answer)
    for lun in range(3):
        assert command(emu, sent, 2, lun) == POWER_ON_OCCURRED
        assert command(emu, sent, 2, lun) is None
    assert all(command(emu, sent, 1, lun) is None for lun in range(3))   # the other nexus: nothing
    register(emu, 3, OTHER)
    assert all(command(emu, sent, 3, lun) is None for lun in range(3))   # the other target: nothing


def test_the_power_on_fans_out_in_bounded_steps_before_nexus_ready(monkeypatch):
    """10 LUs, 4 entries a turn: at most 4 unit attentions set per turn of the
    loop, and nexus_ready only once all 10 are."""
    monkeypatch.setattr(emulator_mod, "FANOUT_STEP", 4)
    sent: list = []
    emu = setup(sent, luns=10)
    lus = emu.targets[T].luns.values()

    async def run() -> list[tuple[int, bool]]:
        register(emu, 1, resumed=True)
        steps = [(sum(len(lu.unit_attentions) for lu in lus), bool(ready(sent)))]
        while not ready(sent):
            await asyncio.sleep(0)
            steps.append((sum(len(lu.unit_attentions) for lu in lus), bool(ready(sent))))
        return steps
    steps = asyncio.run(run())
    counts = [n for n, _ in steps]
    assert counts[0] == 4 and counts[-1] == 10
    assert max(b - a for a, b in zip(counts, counts[1:])) <= 4
    assert [n for n, answered in steps if answered] == [10]


def test_a_batch_of_returning_nexuses_shares_one_fan_out_step_per_turn(monkeypatch):
    """Six nexuses come back in one step (a front end re-registering its
    sessions), three lost and three resumed, on 10 LUs with 4 entries a
    turn: at most 4 unit attentions are set per turn of the loop in all,
    not 4 per nexus; each nexus is ready once all of its 10 are, and hears
    its own UA once on every LU."""
    monkeypatch.setattr(emulator_mod, "FANOUT_STEP", 4)
    sent: list = []
    emu = setup(sent, luns=10)
    lus = emu.targets[T].luns.values()
    for n in (1, 2, 3):
        register(emu, n)
        release(emu, n, lost=True)

    def entries() -> int:
        return sum(len(lu.unit_attentions) for lu in lus)

    async def run() -> tuple[list[int], list[set[int]]]:
        sent.clear()
        for n in (1, 2, 3):
            register(emu, 10 + n, ini=n)
            register(emu, 20 + n, resumed=True)
        counts, answered = [entries()], [{h["nexus"] for h in ready(sent)}]
        while len(ready(sent)) < 6:
            await asyncio.sleep(0)
            counts.append(entries())
            answered.append({h["nexus"] for h in ready(sent)})
        return counts, answered
    counts, answered = asyncio.run(run())
    assert counts[0] == 4 and counts[-1] == 60
    assert max(b - a for a, b in zip(counts, counts[1:])) <= 4
    assert len(counts) >= 60 // 4
    for done, count in zip(answered, counts):   # (the first nexus is ready after 10 entries, ...)
        assert count >= 10 * len(done)
    for n in (11, 12, 13):
        assert [command(emu, sent, n, lun) for lun in range(10)] == [NEXUS_LOSS] * 10
    for n in (21, 22, 23):
        assert [command(emu, sent, n, lun) for lun in range(10)] == [POWER_ON_OCCURRED] * 10


def test_the_power_on_of_a_resumed_nexus_leaves_another_nexus_prevent_in_place():
    """PREVENT MEDIUM REMOVAL set by a nexus of this STML stays: the power on
    it reports happened before that nexus's command (a reset UA clears it)."""
    sent: list = []
    emu = setup(sent)
    register(emu, 1)
    assert command(emu, sent, 1, 0, PREVENT) is None
    lu = emu.targets[T].luns[0]
    assert lu.prevent
    register(emu, 2, resumed=True)
    assert command(emu, sent, 2, 0) == POWER_ON_OCCURRED
    assert lu.prevent


class _Channel:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, frames: list, tapped: bool = True) -> None:
        self.sent.append(unpack(frames[0]))


def _detect(link: FrontEndLink, instance: str | None) -> None:
    header = {"op": Op.DETECT, "version": [1, 9], "targets": []}
    if instance is not None:
        header["instance"] = instance
    link._on_detect(header, [])


def test_the_link_registers_a_nexus_resumed_only_with_another_stml_instance():
    """Re-registered after the link came back: plain to the same STML
    instance, `resumed` to another, and to a 1.9 STML after an older one
    (no instance); a nexus first sent while disconnected is new. A nexus
    registered with `held_by` (fetd_tcp: a session the link's loss ended,
    logged in again) is resumed when another instance serves."""
    handler = SimpleNamespace(detect=lambda d: None, link_lost=lambda: None)
    link = FrontEndLink("ipc:///nonexistent", "test", handler)   # type: ignore[arg-type]
    channel = link._channel = _Channel()   # type: ignore[assignment]

    def registrations() -> dict[int, bool]:
        regs = {h["nexus"]: h.get("resumed", False) for h in channel.sent if h["op"] == Op.REGISTER_NEXUS}
        channel.sent.clear()
        return regs

    def come_back(instance: str | None) -> dict[int, bool]:
        link._lost()
        _detect(link, instance)
        return registrations()

    link.register_nexus(1, "i,i,0x1", T, 1)        # before any detect: sent when one comes
    _detect(link, None)                             # an STML older than 1.9
    assert registrations() == {1: False}
    assert come_back("a") == {1: True}              # a 1.9 STML where an older one was
    assert come_back("a") == {1: False}             # the same one (it released us, say)
    link.register_nexus(2, "i,i,0x2", T, 1)
    assert registrations() == {2: False}
    link._lost()
    link.register_nexus(3, "i,i,0x3", T, 1)         # while the link is down: new
    _detect(link, "b")
    assert registrations() == {1: True, 2: True, 3: False}
    link.register_nexus(4, "i,i,0x4", T, 1, held_by="a")
    link.register_nexus(5, "i,i,0x5", T, 1, held_by="b")
    assert registrations() == {4: True, 5: False}
    link._lost()
    link.register_nexus(6, "i,i,0x6", T, 1, held_by="a")   # while down: decided on the detect
    _detect(link, "a")
    assert registrations()[6] is False


def test_every_stml_names_its_own_instance_in_detect():
    """Two STMLs (two starts of one) send different `instance`s, every
    detect of one the same; Detect reads it ("" from an STML older than 1.9)."""
    from stml.api import Detect
    from stml.api.link import StmlSender
    sent: list[dict] = []
    first, second = (StmlSender(lambda ident, h, f: sent.append(h)) for _ in range(2))
    for sender in (first, first, second):
        sender.detect(b"fe", stml="s", heartbeat_ms=1000, limits={}, discovery={}, portals=[], targets=[],
                      caps=[])
    ids = [Detect.from_header(h).instance for h in sent]
    assert len(ids[0]) == 32 and ids[0] == ids[1] != ids[2]
    assert Detect.from_header({"op": "detect", "version": [1, 8]}).instance == ""


def test_fetd_tcp_keeps_the_newest_held_nexuses_within_its_cap(monkeypatch):
    """When the link is lost, fetd_tcp keeps (initiator port, target, TPGT) of
    every session it ends with the lost STML's instance, but not of one the
    STML never took (still registering), and at most MAX_HELD: the oldest go."""
    from fetd_tcp import registry as registry_mod
    from fetd_tcp.keys import SessionParams
    from fetd_tcp.limits import Limits
    from fetd_tcp.session import Session, Tags
    monkeypatch.setattr(registry_mod, "MAX_HELD", 3)
    released: list[int] = []
    link = SimpleNamespace(instance="old", scsi_release=lambda nexus, lost=False: released.append(nexus))
    reg = registry_mod.SessionRegistry(link, Tags(), Limits())

    def sessions(first: int, count: int) -> None:
        for n in range(first, first + count):
            s = Session(n, bytes(6), f"iqn.2026-12.org.test:{n}", T, 1, SessionParams(), n, 1, 8)
            reg.sessions[n] = reg.by_nexus[n] = s

    async def lose(first: int, count: int, registering: int | None = None) -> None:
        sessions(first, count)
        if registering is not None:
            reg.registering[registering] = asyncio.get_running_loop().create_future()
        reg.link_lost()

    asyncio.run(lose(1, 2, registering=2))
    assert list(reg.held) == [("iqn.2026-12.org.test:1,i,0x000000000000", T, 1)]
    link.instance = "newer"
    asyncio.run(lose(3, 3))
    assert [k[0].split(",")[0][-1] for k in reg.held] == ["3", "4", "5"]
    assert set(reg.held.values()) == {"newer"} and reg.sessions == {}


# ------------------------------------------------------------ I_T nexus loss (0234)

def release(emu: Emulator, nexus: int, fe: bytes = b"fe", **extra) -> None:
    emu.handle(fe, {"op": Op.RELEASE_NEXUS, "nexus": nexus, **extra}, [])


def told_on_every_lu_once(emu: Emulator, sent: list, nexus: int, fe: bytes = b"fe") -> list:
    """What each LU's first command on the nexus gets; every second one is GOOD."""
    first = []
    for lun in range(3):
        first.append(command(emu, sent, nexus, lun, fe=fe))
        assert command(emu, sent, nexus, lun, fe=fe) is None
    return first


def test_a_nexus_lost_unasked_hears_nexus_loss_once_on_every_lu_when_it_returns():
    """Released `lost` (fetd_tcp: no Logout), the same I_T nexus registered
    again under another id gets 06/29/07 on every LU, set before nexus_ready;
    another nexus and a new one get nothing; its SPC-2 reservation is gone."""
    sent: list = []
    emu = setup(sent)
    register(emu, 1)
    register(emu, 2)
    assert command(emu, sent, 1, 0, RESERVE6) is None
    assert command(emu, sent, 2, 0, RESERVE6) == RESERVATION_CONFLICT
    release(emu, 1, lost=True)
    assert command(emu, sent, 2, 0, RESERVE6) is None     # RESERVE(6) went with the nexus
    assert command(emu, sent, 2, 0, RELEASE6) is None
    sent.clear()
    register(emu, 3, ini=1)
    assert ready(sent) == [{"op": Op.NEXUS_READY, "nexus": 3}]
    assert not [h for h in sent if h["op"] == Op.REPORT_AEN]
    assert told_on_every_lu_once(emu, sent, 3) == [NEXUS_LOSS] * 3
    release(emu, 3)                                        # a Logout: nothing more
    register(emu, 4, ini=1)
    assert told_on_every_lu_once(emu, sent, 4) == [None] * 3
    assert told_on_every_lu_once(emu, sent, 2) == [None] * 3
    register(emu, 5)                                       # a new I_T nexus
    assert told_on_every_lu_once(emu, sent, 5) == [None] * 3
    register(emu, 6, OTHER, ini=1)                         # the same initiator port, another target
    assert told_on_every_lu_once(emu, sent, 6) == [None] * 3


def test_a_logout_or_a_goodbye_keeps_nothing_and_a_front_end_gone_loses_its_nexuses():
    """A plain release (a Logout) and deregister remember nothing; a front
    end whose connection ends (release_front_end), a nexus id registered
    again and management's drop lose their I_T nexuses."""
    sent: list = []
    emu = setup(sent)
    register(emu, 1)
    release(emu, 1)
    register(emu, 2, ini=1)
    assert told_on_every_lu_once(emu, sent, 2) == [None] * 3
    emu.handle(b"fe", {"op": Op.DEREGISTER}, [])
    emu.handle(b"fe", {"op": Op.REGISTER, "version": [1, 10], "kind": "test", "name": "t",
                       "heartbeat_ms": 1000}, [])
    register(emu, 3, ini=1)
    assert told_on_every_lu_once(emu, sent, 3) == [None] * 3
    emu.release_front_end(emu.front_ends[b"fe"], "its connection closed")
    emu.handle(b"fe2", {"op": Op.REGISTER, "version": [1, 10], "kind": "test", "name": "t2",
                        "heartbeat_ms": 1000}, [])
    register(emu, 3, ini=1, fe=b"fe2")
    assert told_on_every_lu_once(emu, sent, 3, fe=b"fe2") == [NEXUS_LOSS] * 3
    register(emu, 3, ini=1, fe=b"fe2")                     # the same id again: its state went
    assert told_on_every_lu_once(emu, sent, 3, fe=b"fe2") == [NEXUS_LOSS] * 3
    mgmt = Management(emu, None, gateway=None, metrics=None, portals=None,   # type: ignore[arg-type]
                      endpoints=[], traces=None)   # type: ignore[arg-type]
    asyncio.run(mgmt.session_drop(3))
    register(emu, 4, ini=1, fe=b"fe2")
    assert told_on_every_lu_once(emu, sent, 4, fe=b"fe2") == [NEXUS_LOSS] * 3


def test_a_resumed_nexus_hears_power_on_not_nexus_loss_as_well():
    sent: list = []
    emu = setup(sent)
    register(emu, 1)
    release(emu, 1, lost=True)
    register(emu, 2, ini=1, resumed=True)
    assert told_on_every_lu_once(emu, sent, 2) == [POWER_ON_OCCURRED] * 3


def test_the_lost_nexuses_a_target_remembers_are_bounded_oldest_forgotten(monkeypatch):
    monkeypatch.setattr(emulator_mod, "MAX_LOST_PER_TARGET", 2)
    sent: list = []
    emu = setup(sent)
    for n in (1, 2, 3):
        register(emu, n)
        release(emu, n, lost=True)
    assert len(emu.targets[T].lost) == 2
    for n in (1, 2, 3):
        register(emu, 10 + n, ini=n)
    assert [command(emu, sent, 10 + n, 0) for n in (1, 2, 3)] == [None, NEXUS_LOSS, NEXUS_LOSS]
    assert emu.targets[T].lost == {}
