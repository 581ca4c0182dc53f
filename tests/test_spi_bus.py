"""fetd_spi's bus model against SPI's rules: arbitration priority and timing,
fairness, phase sequences and messages, transfer rates, selection time-out.
An executor that answers inside the simulation stands in for the STML
(test_spi_e2e.py runs the real one)."""
from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest
import simpy

from fetd_spi import timing as T
from fetd_spi.bus import (COMMAND_COMPLETE, DISCONNECT, NEXT_PHASE, SAVE_DATA_POINTER, Bus, Command,
                          Initiator, Outcome, Phase, Target)
from fetd_spi.sim import Simulation, scenario_from_dict
from stml.api import TaskAttr

ROOT = Path(__file__).resolve().parent.parent
GOOD, CHECK_CONDITION = 0x00, 0x02


class Answers:
    """An executor that answers at once: reads get zeros, CDB byte 1 = 0xEE fails."""

    def __init__(self, env: simpy.Environment | None = None) -> None:
        self.env = env               # None: set once the simulation has made its environment
        self.submitted: list[Command] = []

    def submit(self, cmd: Command) -> None:
        self.submitted.append(cmd)

    def outcome(self, cmd: Command) -> simpy.Event:
        if cmd.cdb[1] == 0xEE:
            return self.env.event().succeed(Outcome(CHECK_CONDITION, bytes(18)))
        return self.env.event().succeed(Outcome(GOOD, None, bytes(cmd.data_in_len)))


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def bus_with(width: int = 8, mode: str = "fast-10", target_id: int = 7, service: int = 10 * T.US,
             initiators: tuple[int, ...] = (6,), fair: bool = False) -> tuple[Bus, Target, dict[int, Initiator]]:
    env = simpy.Environment()
    bus = Bus(env, width, mode, trace=True)
    target = Target(bus, target_id, Answers(env), lambda cmd: service, slots=1, fair=fair)
    return bus, target, {i: Initiator(bus, i, target_id, fair) for i in initiators}


def read_cmd(ini: Initiator, tag: int = 0, blocks: int = 8, attr: TaskAttr = TaskAttr.SIMPLE) -> Command:
    return Command(ini.id, tag, 0, read10(tag * blocks, blocks), attr, data_in_len=blocks * 512)


def write_cmd(ini: Initiator, tag: int = 0, blocks: int = 8, attr: TaskAttr = TaskAttr.SIMPLE) -> Command:
    return Command(ini.id, tag, 0, write10(tag * blocks, blocks), attr, data_out=bytes(blocks * 512))


# ---------------------------------------------------------------- arbitration

def test_priority_order():
    assert T.priority_order(8) == [7, 6, 5, 4, 3, 2, 1, 0]
    assert T.priority_order(16) == [7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8]
    assert T.priority(0) > T.priority(15) > T.priority(8)


@pytest.mark.parametrize("width", [8, 16])
def test_every_id_wanting_the_bus_wins_in_priority_order(width):
    """All initiators ask at once; the target (ID 3) serves slowly, so the
    first arbitrations are the selections alone: their winners come in
    priority order, each arbitration among all that still wait."""
    ids = tuple(i for i in range(width) if i != 3)
    bus, _, inis = bus_with(width, target_id=3, service=T.S, initiators=ids)
    for ini in inis.values():
        ini.issue(read_cmd(ini))
    bus.env.run(until=T.MS)
    arbs = bus.arbitrations[:len(ids)]
    assert [a.winner for a in arbs] == [i for i in T.priority_order(width) if i != 3]
    assert arbs[0].contenders == tuple(sorted(ids))
    for a, b in zip(arbs, arbs[1:]):
        assert set(b.contenders) == set(a.contenders) - {a.winner}
    assert all(ini.lost == T.priority_order(width).index(ini.id) - (ini.id in (0, 1, 2) or width == 16 and ini.id >= 8)
               for ini in inis.values())


def test_arbitration_and_selection_timing():
    """From BUS FREE: a bus settle delay to see it, a bus free delay, the
    arbitration delay, then bus clear + bus settle before SELECTION (4.8 us)."""
    bus, _, inis = bus_with()
    ini = inis[6]
    ini.issue(read_cmd(ini))
    bus.env.run(until=T.MS)
    first = bus.arbitrations[0]
    assert first.start == T.BUS_SETTLE_DELAY + T.BUS_FREE_DELAY == 1200 * T.NS
    sel = bus.connections[0].phases[0]
    assert sel[0] == Phase.SELECTION and sel[1] == 4800 * T.NS
    # the next arbitration (the target's reselection) starts 1.2 us after the bus went free
    end = bus.connections[0].phases[-1]
    bus_free = end[1] + T.PHASE_CHANGE + T.async_bytes(1)
    second = bus.arbitrations[1]
    assert second.winner == 7
    assert second.start == max(bus_free + T.FREE_TO_ARBITRATION, ini.completed[0].sent + 10 * T.US)


def test_a_device_that_asks_after_the_bus_set_delay_waits_for_the_next_bus_free():
    """ID 6 outranks ID 2 but asks 1 ns past a bus set delay after ID 2's
    arbitration began: ID 2 wins it; ID 6 wins the next one."""
    bus, _, inis = bus_with(initiators=(6, 2), service=T.S)
    env = bus.env

    def late() -> object:
        yield env.timeout(T.FREE_TO_ARBITRATION + T.BUS_SET_DELAY + 1)
        inis[6].issue(read_cmd(inis[6]))

    inis[2].issue(read_cmd(inis[2]))
    env.process(late())
    env.run(until=T.MS)
    assert [(a.contenders, a.winner) for a in bus.arbitrations[:2]] == [((2,), 2), ((6,), 6)]


def test_within_the_bus_set_delay_it_still_joins():
    bus, _, inis = bus_with(initiators=(6, 2), service=T.S)
    env = bus.env

    def late() -> object:
        yield env.timeout(T.FREE_TO_ARBITRATION + T.BUS_SET_DELAY)
        inis[6].issue(read_cmd(inis[6]))

    inis[2].issue(read_cmd(inis[2]))
    env.process(late())
    env.run(until=T.MS)
    assert [(a.contenders, a.winner) for a in bus.arbitrations[:2]] == [((2, 6), 6), ((2,), 2)]


def saturating(fair: bool) -> list[int]:
    """Three initiators that always have a write waiting (the target, at ID
    7, completes each at once): the winners of the selections."""
    bus, _, inis = bus_with(initiators=(6, 5, 4), service=T.US)
    for ini in inis.values():
        ini.fair = fair
        for tag in range(2):
            ini.issue(write_cmd(ini, tag, blocks=16))
        ini.on_done = lambda cmd, ini=ini: ini.issue(write_cmd(ini, cmd.tag, blocks=16))
    bus.env.run(until=50 * T.MS)
    return [a.winner for a in bus.arbitrations if a.winner != 7]


def test_without_fairness_the_highest_id_keeps_the_bus():
    winners = saturating(fair=False)
    assert len(winners) > 30 and set(winners[2:]) == {6}


def test_fairness_gives_each_id_its_turn():
    """SPI's fairness algorithm: the winner stays out until every ID that lost
    to it has won, so saturated initiators take turns, highest first."""
    winners = saturating(fair=True)
    assert len(winners) > 30
    assert winners[:9] == [6, 5, 4] * 3
    assert max(winners.count(i) for i in (6, 5, 4)) - min(winners.count(i) for i in (6, 5, 4)) <= 1


def test_fairness_lockout_when_the_awaited_ids_never_arbitrate():
    """A fair device waiting for an ID that no longer arbitrates is not stuck:
    nobody asserts BSY within a bus set delay, and it clears its register."""
    bus, _, inis = bus_with(initiators=(6,), fair=True, service=T.S)
    inis[6].register = {3}
    inis[6].issue(read_cmd(inis[6]))
    bus.env.run(until=T.MS)
    first = bus.arbitrations[0]
    assert first.winner == 6 and first.start == T.FREE_TO_ARBITRATION + T.BUS_SET_DELAY


# ---------------------------------------------------------------- phases and messages

def check_sequence(phases: list[Phase]) -> None:
    assert phases[0] in (Phase.SELECTION, Phase.RESELECTION)
    for a, b in zip([Phase.ARBITRATION, *phases], [*phases, Phase.BUS_FREE]):
        assert b in NEXT_PHASE[a], f"{a} -> {b} in {phases}"


def test_read_and_write_phase_sequences_and_messages():
    bus, target, inis = bus_with(mode="fast-20")
    ini = inis[6]
    ini.issue(read_cmd(ini, tag=5, blocks=8))
    ini.issue(write_cmd(ini, tag=9, blocks=4, attr=TaskAttr.ORDERED))
    ini.issue(Command(6, 11, 2, bytes([0x00, 0, 0, 0, 0, 0]), TaskAttr.HEAD_OF_QUEUE))   # TEST UNIT READY, LUN 2
    ini.issue(Command(6, 12, 0, bytes([0x00, 0xEE, 0, 0, 0, 0])))                        # fails
    bus.env.run(until=T.S)
    conns = {(c.kind, c.tag): c for c in bus.connections}
    assert len(conns) == 8
    for c in conns.values():
        check_sequence([p for p, _, _ in c.phases])

    def phases(kind: str, tag: int) -> list[tuple[Phase, bytes | int]]:
        return [(p, what) for p, _, what in conns[kind, tag].phases]

    assert phases("selection", 5) == [(Phase.SELECTION, b""), (Phase.MESSAGE_OUT, bytes([0xC0, 0x20, 5])),
                                      (Phase.COMMAND, read10(40, 8)), (Phase.MESSAGE_IN, bytes([DISCONNECT]))]
    assert phases("reselection", 5) == [(Phase.RESELECTION, b""), (Phase.MESSAGE_IN, bytes([0x80, 0x20, 5])),
                                        (Phase.DATA_IN, 4096), (Phase.STATUS, bytes([GOOD])),
                                        (Phase.MESSAGE_IN, bytes([COMMAND_COMPLETE]))]
    assert phases("selection", 9) == [(Phase.SELECTION, b""), (Phase.MESSAGE_OUT, bytes([0xC0, 0x22, 9])),
                                      (Phase.COMMAND, write10(36, 4)), (Phase.DATA_OUT, 2048),
                                      (Phase.MESSAGE_IN, bytes([SAVE_DATA_POINTER, DISCONNECT]))]
    assert phases("reselection", 9) == [(Phase.RESELECTION, b""), (Phase.MESSAGE_IN, bytes([0x80, 0x22, 9])),
                                        (Phase.STATUS, bytes([GOOD])),
                                        (Phase.MESSAGE_IN, bytes([COMMAND_COMPLETE]))]
    assert phases("selection", 11)[1] == (Phase.MESSAGE_OUT, bytes([0xC2, 0x21, 11]))
    assert phases("reselection", 12)[2] == (Phase.STATUS, bytes([CHECK_CONDITION]))
    assert [c.status for c in ini.completed] == [GOOD, GOOD, GOOD, CHECK_CONDITION]
    # one connection at a time, each after an arbitration
    spans = sorted((c.phases[0][1], c.phases[-1][1]) for c in conns.values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end + T.FREE_TO_ARBITRATION + T.ARBITRATION_TIME


def test_phase_durations():
    """Information phases: a phase change, then asynchronous bytes; DATA
    phases: a phase change, then the transfers at the negotiated rate/width."""
    bus, _, inis = bus_with(width=16, mode="fast-80")
    ini = inis[6]
    ini.issue(read_cmd(ini, blocks=128))
    bus.env.run(until=T.S)
    sel, resel = bus.connections
    starts = [t for _, t, _ in sel.phases]
    assert starts[1] - starts[0] == T.SELECTION_TIME
    assert starts[2] - starts[1] == T.PHASE_CHANGE + 3 * T.ASYNC_HANDSHAKE            # MESSAGE OUT
    assert starts[3] - starts[2] == T.PHASE_CHANGE + 10 * T.ASYNC_HANDSHAKE           # COMMAND
    starts = [t for _, t, _ in resel.phases]
    assert starts[1] - starts[0] == T.RESELECTION_TIME
    assert starts[3] - starts[2] == T.PHASE_CHANGE + 32768 * 12500 * T.PS             # DATA IN, 64 KiB wide DT
    assert bus.phase_time[Phase.DATA_IN] == T.PHASE_CHANGE + 32768 * 12500 * T.PS
    assert bus.phase_time[Phase.MESSAGE_OUT] == T.PHASE_CHANGE + 3 * T.ASYNC_HANDSHAKE
    # turning the bus around from the initiator (COMMAND) to the target costs the data release delay
    assert sel.phases[3][1] - sel.phases[2][1] == T.PHASE_CHANGE + 10 * T.ASYNC_HANDSHAKE
    assert T.DATA_RELEASE_DELAY == T.PHASE_CHANGE


def test_selecting_an_absent_target_times_out():
    env = simpy.Environment()
    bus = Bus(env, 8, "fast-10", trace=True)
    ini = Initiator(bus, 6, target_id=2)
    ini.issue(read_cmd(ini))
    env.run(until=T.S)
    (conn,) = bus.connections
    assert [p for p, _, _ in conn.phases] == [Phase.SELECTION]
    assert ini.completed[0].error == "selection timeout"
    assert ini.completed[0].done - conn.phases[0][1] == T.SELECTION_TIMEOUT_TIME == 250_200_090 * T.NS


# ---------------------------------------------------------------- rates and setup

@pytest.mark.parametrize("name,narrow,wide", [
    ("async", 3.0, 6.0), ("fast-5", 5, 10), ("fast-10", 10, 20), ("fast-20", 20, 40), ("fast-40", 40, 80),
    ("fast-80", None, 160), ("fast-160", None, 320), ("ultra", 20, 40), ("ultra2", 40, 80),
    ("ultra160", None, 160), ("ultra320", None, 320)])
def test_transfer_rates(name, narrow, wide):
    m = T.mode(name)
    assert round(m.rate(16) / 1e6, 1) == wide
    if narrow is None:
        assert m.wide_only
        with pytest.raises(ValueError, match="wide"):
            Bus(simpy.Environment(), 8, name)
    else:
        assert round(m.rate(8) / 1e6, 1) == narrow
        assert m.duration(65536, 8) == 65536 * m.period
    assert m.duration(65536, 16) == 32768 * m.period
    assert m.duration(3, 16) == 2 * m.period          # an odd byte still takes a wide transfer


def test_bus_setup_errors():
    env = simpy.Environment()
    with pytest.raises(ValueError, match="8 or 16"):
        Bus(env, 32)
    with pytest.raises(ValueError, match="not a transfer mode"):
        Bus(env, 8, "fast-1000")
    bus = Bus(env, 8)
    Initiator(bus, 7, 0)
    with pytest.raises(ValueError, match="taken"):
        Initiator(bus, 7, 0)
    with pytest.raises(ValueError, match="not on a 8-bit bus"):
        Initiator(bus, 8, 0)
    with pytest.raises(ValueError, match="LUN"):
        Initiator(bus, 6, 0).issue(Command(6, 0, 8, read10(0, 1)))


def test_scenarios_are_checked_and_reproducible():
    raw = {"name": "t", "width": 16, "mode": "ultra", "duration_ms": 30,
           "target": {"id": 7, "service_us": 50, "media_mb_s": 100, "slots": 2},
           "initiator": [{"id": i, "queue_depth": 3, "blocks": 32, "read_fraction": 0.5} for i in (6, 0, 12)]}

    def run() -> list[tuple[int, int | None, int | None]]:
        sc = scenario_from_dict(raw)
        answers = Answers()
        sim = Simulation(sc, answers, 512, 1 << 20)
        answers.env = sim.env
        sim.start()
        sim.run(sc.duration)
        return [(c.initiator, c.tag, c.done) for g in sim.generators for c in g.initiator.completed]

    first = run()
    assert len(first) > 20 and first == run()
    for bad, where in [({"width": "16"}, "width"), ({"mode": 3}, "mode"), ({"colour": 1}, "colour"),
                       ({"initiator": []}, "initiator"), ({"target": {"id": "x"}}, "target.id")]:
        with pytest.raises(ValueError, match=where):
            scenario_from_dict({**raw, **bad})
    with pytest.raises(ValueError, match="attr"):
        scenario_from_dict({**raw, "initiator": [{"id": 1, "attr": "aca"}]})
    with pytest.raises(ValueError, match="LUN 8"):
        scenario_from_dict({**raw, "initiator": [{"id": 1, "lun": 8}]}).initiators[0].workload.check()


def test_fetd_spi_imports_only_the_contract_from_stml():
    seen = set()
    for path in (ROOT / "fetd_spi").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                seen.add(node.module)
            elif isinstance(node, ast.Import):
                seen.update(a.name for a in node.names)
    assert {m for m in seen if m == "stml" or m.startswith("stml.")} == {"stml.api"}


def test_a_nexus_refused_when_registered_again_fails_the_run():
    """After an STML restart the link registers each initiator's nexus again;
    a refusal then ends the run with the reason (as a drop does), instead of
    every later command coming back LOGICAL UNIT COMMUNICATION FAILURE."""
    import asyncio

    from fetd_spi.frontend import LinkFailed, StmlExecutor

    async def main() -> str:
        ex = StmlExecutor("ipc:///nonexistent/stml.sock")    # never started: no I/O
        ex._ready[7] = asyncio.get_running_loop().create_future()
        ex.nexus_ready(7, None)                              # the first registration
        assert ex._failed is None
        ex.nexus_ready(7, "initiator iqn.x is not in the ACL of iqn.t")
        with pytest.raises(LinkFailed) as e:
            await ex.advance(simpy.Environment(), None)
        return str(e.value)

    msg = asyncio.run(main())
    assert "initiator ID 7" in msg and "refused when registered again" in msg and "ACL" in msg
