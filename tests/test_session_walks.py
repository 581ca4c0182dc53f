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
