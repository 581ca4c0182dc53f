"""fetd_tcp's walks over every session go DROP_STEP sessions per turn of the
event loop (docs/decisions/0220): an asynchronous event for every nexus, the
sessions a lost STML link ends and those a stop releases (up to 1,024
connections per portal). Each test counts the calls per turn of the loop
and checks that every session got its one call in the end."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Callable

from fetd_tcp import pdu as P
from fetd_tcp import registry as R
from fetd_tcp.keys import ConnectionParams, SessionParams
from fetd_tcp.limits import Limits
from fetd_tcp.session import Connection, Session, Tags
from support.fuzzgen import FakeLink

T = "iqn.2026-12.org.test:walks"
MANY = 3 * R.DROP_STEP + 10
QUIET = 2 * (MANY // R.DROP_STEP + 1)   # more turns than a walk of MANY sessions takes
SENSE = bytes([0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2A, 0x09, 0, 0, 0, 0])


def populate(reg: R.SessionRegistry, calls: list, count: int = MANY) -> list[Session]:
    """`count` sessions of one connection each, which record what they send
    (Async Messages) and their closing in `calls`, by nexus."""
    sessions = []
    for n in range(1, count + 1):
        s = Session(n, n.to_bytes(6, "big"), f"iqn.2026-12.org.test:{n}", T, 1, SessionParams(), n, 1, 8)
        s.answered = True   # (its final Login Response went out: a nexus the initiator knows, 0236)
        s.connections[0] = Connection(
            s, 0, ConnectionParams(), 0, lambda pdu, data, n=n: calls.append(("event", n, pdu)), FakeLink(),
            reg.tags, lambda n=n: calls.append(("close", n, None)), lambda conn, pairs: [])
        reg.sessions[n] = reg.by_nexus[n] = s
        sessions.append(s)
    return sessions


async def per_turn(start: Callable[[], Any], calls: list) -> list[int]:
    """Calls made by start() itself, then in each turn of the loop until it
    is done and QUIET turns in a row add none (a walk may take turns that
    make no call counted here)."""
    result = start()
    if asyncio.iscoroutine(result):
        result = asyncio.ensure_future(result)
    counts = [len(calls)]
    quiet = 0
    while quiet < QUIET or isinstance(result, asyncio.Future) and not result.done():
        await asyncio.sleep(0)
        quiet = quiet + 1 if len(calls) == counts[-1] else 0
        counts.append(len(calls))
    return [counts[0]] + [b - a for a, b in zip(counts, counts[1:])]


def test_an_event_for_every_nexus_goes_in_steps_and_a_later_one_comes_after_it():
    """report_aen for every nexus sent one Async Message per session in one
    step (MANY here, 256 sessions per target at most); a later event for one
    nexus asked for mid-walk reaches it after the walk's, never before."""
    from fetd_tcp.server import IscsiFrontEnd

    async def main() -> None:
        fe = IscsiFrontEnd("ipc:///nonexistent/stml", [])
        calls: list = []
        populate(fe.registry, calls)

        def both() -> None:
            fe.report_aen(None, 3, SENSE)
            fe.report_aen(MANY, 4, SENSE)   # the last nexus: its own event, asked for second
        steps = await per_turn(both, calls)
        assert max(steps) <= R.DROP_STEP and len([s for s in steps if s]) >= MANY // R.DROP_STEP
        events = [(n, pdu.lun) for kind, n, pdu in calls if kind == "event"]
        assert sorted(n for n, lun in events if lun == P.int_to_lun(3)) == list(range(1, MANY + 1))
        assert events[-2:] == [(MANY, P.int_to_lun(3)), (MANY, P.int_to_lun(4))]
    asyncio.run(main())


def test_a_lost_link_closes_every_session_in_steps():
    """The STML link lost: every session's connections close (and every
    I_T nexus is held for its next login), DROP_STEP sessions per turn; a
    session that ends meanwhile is skipped."""
    async def main() -> None:
        calls: list = []
        reg = R.SessionRegistry(SimpleNamespace(instance="old"), Tags(), Limits())
        sessions = populate(reg, calls)

        def lose() -> None:
            reg.link_lost()
            del reg.sessions[MANY]   # ended by its initiator before the walk got there
        steps = await per_turn(lose, calls)
        assert max(steps) <= R.DROP_STEP and len([s for s in steps if s]) >= MANY // R.DROP_STEP
        assert sorted(n for kind, n, _ in calls if kind == "close") == list(range(1, MANY))
        assert len(reg.held) == MANY and set(reg.held.values()) == {"old"}
        assert list(reg.held)[0] == (sessions[0].initiator_port, T, 1)
    asyncio.run(main())


def test_a_stop_releases_every_nexus_in_steps():
    """fetd_tcp stopping releases each open session's nexus `lost`
    (0234), DROP_STEP per turn of the loop, each once."""
    async def main() -> None:
        calls: list = []
        released: list = []
        link = SimpleNamespace(instance=None,
                               scsi_release=lambda nexus, lost=False: released.append((nexus, lost)))
        reg = R.SessionRegistry(link, Tags(), Limits())
        populate(reg, calls)
        steps = await per_turn(reg.stop, released)
        assert max(steps) <= R.DROP_STEP and len([s for s in steps if s]) >= MANY // R.DROP_STEP
        assert released == [(n, True) for n in range(1, MANY + 1)]
    asyncio.run(main())


class CountingRoster(R.Roster):
    """A Roster that counts the entries anything reads by iterating it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.iterated = 0

    def __iter__(self):
        self.iterated += 1
        return super().__iter__()

    def values(self):
        self.iterated += 1
        return super().values()

    def items(self):
        self.iterated += 1
        return super().items()


def test_walks_over_every_session_copy_no_list_of_them():
    """An event for every nexus, a lost link and a stop took a list of every
    session first: one step proportional to the sessions before the walk's
    bounded steps (0706). They now step through the registry itself."""
    from fetd_tcp.server import IscsiFrontEnd

    async def main() -> None:
        fe = IscsiFrontEnd("ipc:///nonexistent/stml", [])
        reg = fe.registry
        reg.sessions, reg.by_nexus = CountingRoster(), CountingRoster()
        calls: list = []
        populate(reg, calls)
        fe.link.detect_info = SimpleNamespace(instance="old")
        fe.report_aen(None, 3, SENSE)
        reg.link_lost()
        await reg.steps.idle()
        await reg.stop()
        assert (reg.sessions.iterated, reg.by_nexus.iterated) == (0, 0)
        assert len([c for c in calls if c[0] == "event"]) == MANY
        assert len([c for c in calls if c[0] == "close"]) == MANY and len(reg.held) == MANY
    asyncio.run(main())


def test_a_session_added_or_ended_mid_walk_is_met_once_or_not_at_all():
    """A walk meets the sessions there when it was asked for, each once: one
    that ends before the walk gets to it is not met, one that logs in
    meanwhile is not met (the event came before it), none twice."""
    from fetd_tcp.server import IscsiFrontEnd

    async def main() -> None:
        fe = IscsiFrontEnd("ipc:///nonexistent/stml", [])
        calls: list = []
        reg = fe.registry
        sessions = populate(reg, calls)
        fe.report_aen(None, 3, SENSE)   # the first DROP_STEP at once, the rest in later turns
        assert len(calls) == R.DROP_STEP
        late = populate(R.SessionRegistry(fe.link, reg.tags, reg.limits), calls, MANY + 1)[-1]
        reg.sessions[MANY + 1] = reg.by_nexus[MANY + 1] = late
        for n in (R.DROP_STEP + 1, R.DROP_STEP + 2, MANY):   # the walk stops on the first: it carries on
            del reg.sessions[n], reg.by_nexus[n]
        del reg.by_nexus[1], reg.sessions[1]   # met already: nothing changes for the rest
        await reg.steps.idle()
        met = [n for kind, n, _ in calls if kind == "event"]
        assert sorted(met) == [n for n in range(1, MANY) if n not in (R.DROP_STEP + 1, R.DROP_STEP + 2)]
        assert len(met) == len(set(met)) and sessions[0].nexus in met
    asyncio.run(main())


def test_a_roster_walk_parked_on_removed_entries_carries_on():
    """The walk's place is a node: removing it, and the ones after it, leaves
    the walk the way on to the next entry still there."""
    roster: R.Roster[int, str] = R.Roster()
    for n in range(10):
        roster[n] = f"v{n}"
    walk = roster.walk()
    assert walk.take(3) == (["v0", "v1", "v2"], 3, False)
    for n in (2, 3, 4, 0):
        del roster[n]
    roster[10] = "v10"                         # after the walk began: not met
    roster[5] = "v5'"                          # a new value keeps its place
    assert walk.take(3) == (["v5'"], 3, False)   # removed entries count in the step's budget
    assert walk.take(2) == (["v6", "v7"], 2, False)
    del roster[9]
    assert walk.take(5) == (["v8"], 1, True)
    assert list(roster) == [1, 5, 6, 7, 8, 10] and roster.get(3) is None
    assert R.Roster().walk().take(4) == ([], 0, True)


def test_a_session_ending_before_the_lost_links_walk_meets_it_is_held_once():
    """A session that ends (its connection reset, a reinstatement) while the
    lost link's walk has not got to it was skipped: its I_T nexus was not
    held, and its next login was not `resumed` (0247). It is held as it
    ends now (0713), once; one the walk met already is not held again; one
    the STML never took fails its login, as the walk's do; nothing crashes."""
    async def main() -> None:
        calls: list = []
        released: list = []
        link = SimpleNamespace(instance="old", scsi_release=lambda nexus, lost=False: released.append(nexus))
        reg = R.SessionRegistry(link, Tags(), Limits())
        sessions = populate(reg, calls)
        waiting = asyncio.get_running_loop().create_future()
        reg.registering[MANY - 1] = waiting   # a login the STML has not answered yet
        holds: list = []
        hold = reg._hold
        reg._hold = lambda s, instance: (holds.append(s.nexus), hold(s, instance))   # type: ignore[method-assign]
        reg.link_lost()                                   # the first DROP_STEP at once
        assert len(holds) == R.DROP_STEP
        for n in (1, MANY - 1, MANY):                     # one met already, two not yet
            reg.end_session(sessions[n - 1])
        await reg.steps.idle()
        assert sorted(holds) == [n for n in range(1, MANY + 1) if n != MANY - 1]   # each once
        assert (sessions[-1].initiator_port, T, 1) in reg.held and len(reg.held) == MANY - 1
        assert waiting.result() == "the link to the STML was lost"
        assert sorted(released) == [1, MANY - 1, MANY]   # (ended: the lost STML's releases)
        closed = sorted(n for kind, n, _ in calls if kind == "close")
        assert closed == [n for n in range(2, MANY - 1)]   # the walk went on past them
    asyncio.run(main())


def test_discovery_sessions_end_in_steps_without_a_list_of_every_session(caplog):
    """Discovery turned to CHAP ends the discovery sessions: it built a list
    of every session's discovery ones in one step first (0706, "Not
    covered"). It is a walk like the others now (0714): DROP_STEP sessions
    looked at per turn, the others counting too, each discovery session
    dropped once, the others left alone, one line that counts them."""
    caplog.set_level("INFO")

    async def main() -> list[int]:
        calls: list = []
        reg = R.SessionRegistry(SimpleNamespace(instance=None), Tags(), Limits())
        reg.sessions, reg.by_nexus = CountingRoster(), CountingRoster()
        sessions = populate(reg, calls)
        for s in sessions[::2]:           # every other one is a discovery session
            s.discovery = True
            del reg.by_nexus[s.nexus]
        steps = await per_turn(lambda: reg.end_discovery_sessions("discovery now requires CHAP"), calls)
        assert reg.sessions.iterated == 0
        assert sorted(n for kind, n, _ in calls if kind == "close") == [s.nexus for s in sessions[::2]]
        assert sorted(reg.sessions) == [s.tsih for s in sessions[1::2]]
        return steps
    steps = asyncio.run(main())
    # (each drop is an Async Message and a close: two calls per discovery session)
    assert max(steps) <= 2 * (R.DROP_STEP // 2) and len([s for s in steps if s]) >= MANY // R.DROP_STEP
    assert caplog.text.count(f"{(MANY + 1) // 2} discovery session(s) ended: discovery now requires CHAP") == 1
