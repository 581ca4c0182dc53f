"""The front end's sessions: found by TSIH, nexus and name, created and
reinstated at login, ended when their last connection goes; and, at
ErrorRecoveryLevel 2, the failed connections kept for TASK REASSIGN, each
until its timer (or a cap) expires it."""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable, ItemsView, Iterator, MutableMapping, ValuesView
from typing import Any, Generic, TypeVar, cast

from fetd_tcp import login as L
from fetd_tcp import pdu as P
from fetd_tcp.limits import Limits
from fetd_tcp.retain import Retained, retention
from fetd_tcp.session import Connection, Session, Tags, Task
from fetd_tcp.wire import PduWriter
from scsi_runtime.logs import audit

log = logging.getLogger("fetd_tcp")

CMD_WINDOW = 128         # MaxCmdSN - ExpCmdSN + 1, capped by the STML's queue depth
DROP_STEP = 256          # sessions ended per turn of the loop when many end at once
# I_T nexuses whose sessions ended with the STML link, kept until they log in
# again (0247): at most this many, the oldest forgotten first (as many as the
# STML keeps nexuses for one target: 0263)
MAX_HELD = 4096

_K = TypeVar("_K")
_X = TypeVar("_X")


class _Node(Generic[_X]):
    """A Roster entry's place in the order entries came in."""
    __slots__ = ("value", "seq", "prev", "next", "live")

    def __init__(self, value: _X | None, seq: int, prev: _Node[_X] | None) -> None:
        self.value, self.seq, self.prev = value, seq, prev
        self.next: _Node[_X] | None = None
        self.live = True


class Roster(MutableMapping[_K, _X]):
    """A dict that a walk steps through without copying it (0706): its
    entries are also linked in the order they came. A walk meets the entries
    there when it began that are still there when it gets to them, each once;
    one added meanwhile it does not meet. A removed entry's node keeps its
    link onward, so a walk that stopped on it carries on from there."""

    def __init__(self) -> None:
        self._values: dict[_K, _X] = {}
        self._nodes: dict[_K, _Node[_X]] = {}
        self._head: _Node[_X] = _Node(None, 0, None)   # never removed
        self._tail = self._head
        self._seq = 0

    # reads go to the dict itself
    def __getitem__(self, key: _K) -> _X:
        return self._values[key]

    def get(self, key: _K, default: Any = None) -> Any:
        return self._values.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[_K]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def values(self) -> ValuesView[_X]:
        return self._values.values()

    def items(self) -> ItemsView[_K, _X]:
        return self._values.items()

    def __setitem__(self, key: _K, value: _X) -> None:
        node = self._nodes.get(key)
        if node is not None:
            node.value = value   # (its place stays, as in a dict)
        else:
            self._seq += 1
            node = _Node(value, self._seq, self._tail)
            self._tail.next = node
            self._tail = self._nodes[key] = node
        self._values[key] = value

    def __delitem__(self, key: _K) -> None:
        del self._values[key]
        node = self._nodes.pop(key)
        node.live, node.value = False, None
        prev, after = node.prev, node.next
        assert prev is not None   # (only the head has none)
        prev.next = after
        if after is None:
            self._tail = prev
        else:
            after.prev = prev

    def walk(self) -> RosterWalk[_X]:
        """A walk over the entries there now."""
        return RosterWalk(self._head, self._seq)

    def ahead(self, walk: RosterWalk[_X], key: _K) -> bool:
        """Whether `walk` is still to meet the entry of `key` (it began before
        the entry came, and has not passed it): O(1), by sequence numbers."""
        node = self._nodes.get(key)
        return node is not None and walk.at.seq < node.seq <= walk.last


class RosterWalk(Generic[_X]):
    """Where a walk over a Roster is: the last node it passed, and the last
    entry there when it began."""

    def __init__(self, at: _Node[_X], last: int) -> None:
        self.at, self.last = at, last

    def take(self, budget: int) -> tuple[list[_X], int, bool]:
        """The next entries, passing at most `budget` nodes (removed ones
        count): (entries, nodes passed, whether the walk is over)."""
        out: list[_X] = []
        node = self.at
        for used in range(budget):
            after = node.next
            if after is None or after.seq > self.last:
                self.at = node
                return out, used, True
            node = after
            if node.live:
                out.append(cast(_X, node.value))   # (a live node has its value)
        self.at = node
        return out, budget, False


class _ListWalk(Generic[_X]):
    """A walk over a few items given as a list (an event for one nexus)."""

    def __init__(self, items: list[_X]) -> None:
        self.items, self.done = items, 0

    def take(self, budget: int) -> tuple[list[_X], int, bool]:
        chunk = self.items[self.done:self.done + budget]
        self.done += len(chunk)
        return chunk, len(chunk), self.done >= len(self.items)


class Steps:
    """Walks over many sessions (every nexus's asynchronous event, the
    sessions a lost link or a stop ends): DROP_STEP sessions per turn of the
    loop, the first step at once, the walks one after another in the order
    they were asked for, so an event for one nexus never overtakes a walk
    asked for before it (docs/decisions/0220). A walk over a Roster copies
    nothing (0706): it meets the sessions there when it was asked for that
    are still there, each once."""

    def __init__(self) -> None:
        self._jobs: collections.deque[tuple[RosterWalk[Any] | _ListWalk[Any], Callable[[Any], None]]] = \
            collections.deque()
        self._task: asyncio.Task | None = None
        self._stepping = False  # (a call that asks for a walk only queues it)

    def run(self, items: Roster[Any, _X] | list[_X], each: Callable[[_X], None]) -> RosterWalk[_X] | None:
        """each(item) for every item: now if nothing waits and they are few,
        else in later turns of the loop. The walk over a Roster, to ask
        Roster.ahead of it."""
        if not items:
            return None
        walk: RosterWalk[_X] | None = None
        if isinstance(items, Roster):
            walk = items.walk()
            self._jobs.append((walk, each))
        else:
            self._jobs.append((_ListWalk(items), each))
        if self._task is None and not self._stepping and self._step():
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return walk

    async def idle(self) -> None:
        """Once every walk asked for is done."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def _step(self) -> bool:
        """At most DROP_STEP calls; True while work is left."""
        budget = DROP_STEP
        jobs = self._jobs
        self._stepping = True
        try:
            while jobs and budget:
                walk, each = jobs[0]
                chunk, used, over = walk.take(budget)
                budget -= used
                if over:
                    jobs.popleft()
                for item in chunk:
                    try:
                        each(item)
                    except Exception:   # one session's fault ends no other's walk
                        log.exception("fetd_tcp: error in a walk over sessions")
        finally:
            self._stepping = False
        return bool(jobs)

    async def _drain(self) -> None:
        try:
            while True:
                await asyncio.sleep(0)
                if not self._step():
                    return
        finally:
            self._task = None


def cmd_window(limits: dict[str, Any]) -> int:
    """Our CmdSN window, within the STML's queue depth (its detect `limits`)."""
    return min(CMD_WINDOW, int(limits.get("queue_depth", CMD_WINDOW)))


class SessionRegistry:
    """Every session and what it is known by. `link` is the STML link (nexus
    registration and release, our own aborts of expired tasks); `tags` the
    front end's task tags."""

    def __init__(self, link: Any, tags: Tags, limits: Limits) -> None:
        self.link, self.tags, self.limits = link, tags, limits
        # walked in steps without a copy (Steps, 0706)
        self.sessions: Roster[int, Session] = Roster()   # TSIH -> session
        self.by_nexus: Roster[int, Session] = Roster()   # nexus -> normal session
        # (initiator, ISID, target, TPGT) -> session: RFC 7143's session identity; an
        # initiator may use one ISID in two portal groups (ESXi does), two I_T nexuses
        self.by_name: dict[tuple[str, bytes, str, int], Session] = {}
        self.per_target: dict[str, int] = {}             # target -> normal sessions
        self.nexus_ids = itertools.count(1)
        # new sessions' nexuses the STML has not answered yet: its answer (an error or None)
        self.registering: dict[int, asyncio.Future[str | None]] = {}
        self.tsihs = itertools.count(1)
        # TSIH -> the portal it logged in through, and the initiator's address (audit lines)
        self.session_portals: dict[int, tuple[str, str]] = {}
        # ERL 2: failed connections kept for TASK REASSIGN, within a cap per host, each
        # with the timer that expires it; our own ABORT TASKs of their tasks, by tag
        self.retained: Retained[Connection] = Retained(limits.max_failed_per_host,
                                                       lambda c: not c.account.closed)
        self.expiry: dict[Connection, asyncio.TimerHandle] = {}
        self.expiring: dict[int, Connection] = {}
        # (initiator port, target, TPGT) -> the instance of the STML that held the
        # I_T nexus of a session the link's loss ended: the initiator's next login
        # with that ISID is the same I_T nexus, registered `resumed` with another (0247)
        self.held: dict[tuple[str, str, int], str] = {}
        self.steps = Steps()   # walks over every session, in bounded steps
        # the last lost link's walk over by_nexus, and the STML instance it holds
        # nexuses for: a session ending before the walk meets it is held then (0713)
        self.holding: tuple[RosterWalk[Session], str | None] | None = None

    def new_tsih(self) -> int:
        while True:
            tsih = next(self.tsihs) & 0xFFFF
            if tsih and tsih not in self.sessions:
                return tsih

    def admit(self, o: L.LoginOutcome, tpgt: int, window: int, max_transfer: int, portal: str,
              peer: str) -> Session:
        """The session a finished login names, created (an older one of the
        same initiator, ISID, target and portal group is reinstated: it ends) or joined; a
        connection of it with the same CID ends (connection reinstatement).
        The caller attaches the new connection."""
        session = self.sessions.get(o.tsih)
        discovery = o.session_type == "Discovery"
        target = o.target.name if o.target else ""
        if session is None:
            old = self.by_name.get((o.initiator_name, o.isid, target, tpgt))
            if old is not None:
                log.info("session reinstatement: closing old session TSIH %d", old.tsih)
                for c in list(old.connections.values()):
                    c.close()
                self.end_session(old)
            if o.target is not None:
                window = min(window, o.target.cmdsn_depth)
            session = Session(o.tsih, o.isid, o.initiator_name, target, tpgt, o.session,
                              next(self.nexus_ids), o.cmd_sn, window, discovery=discovery,
                              max_transfer=max_transfer, max_retain=self.limits.max_retain)
            self.sessions[o.tsih] = session
            self.by_name[(o.initiator_name, o.isid, target, tpgt)] = session
            if not discovery:
                self.by_nexus[session.nexus] = session
                self.per_target[target] = self.per_target.get(target, 0) + 1
                self.link.register_nexus(session.nexus, session.initiator_port, target, tpgt,
                                         held_by=self.held.pop((session.initiator_port, target, tpgt), None))
                self.registering[session.nexus] = asyncio.get_running_loop().create_future()
        self.session_portals.setdefault(o.tsih, (portal, peer))
        log.info("login: %s 0x%s -> %s via %s tpgt %d, TSIH %d CID %d (%s)", o.initiator_name, o.isid.hex(),
                 target or "discovery", portal, tpgt, o.tsih, o.cid,
                 "new session" if len(session.connections) == 0 else "joins session",
                 extra=audit(self.session_portals[o.tsih][1]))
        old_conn = session.connections.get(o.cid)
        if old_conn is not None:
            # connection reinstatement: the old one ends now (at ERL 2 its tasks wait for
            # TASK REASSIGN), its responses acknowledged as the new login says
            old_conn.acknowledge(o.exp_stat_sn)
            old_conn.close()
            self.drop_connection(old_conn)
        failed = session.failed.get(o.cid)
        if failed is not None:
            failed.acknowledge(o.exp_stat_sn)
        return session

    async def refusal(self, s: Session) -> str | None:
        """None once the STML has taken the session's nexus (at once for a
        session it took before, or a discovery session, which has none),
        else its reason: the login that made the session then fails."""
        ready = self.registering.get(s.nexus)
        return None if ready is None else await ready

    def nexus_ready(self, nexus: int, error: str | None) -> None:
        ready = self.registering.pop(nexus, None)
        if ready is not None and not ready.done():
            ready.set_result(error)

    def attach(self, conn: Connection) -> None:
        """A new connection of a session `admit` gave."""
        conn.on_failed = self.fail_connection
        conn.session.connections[conn.cid] = conn

    def drop_nexus(self, nexus: int, reason: str) -> None:
        """The STML ended this nexus (management `session drop`, `target
        remove`) or refused it when registered again (0266): tell the
        initiator every connection is being dropped, close them, end the session."""
        s = self.by_nexus.get(nexus)
        if s is not None:
            self.drop_session(s, reason or "by the STML")

    def drop_session(self, s: Session, reason: str) -> None:
        """End a session on our side: an Async Message "dropping all
        connections" (Time2Wait/Time2Retain 0), then its connections close."""
        log.info("session TSIH %d of %s 0x%s dropped: %s", s.tsih, s.initiator, s.isid.hex(), reason)
        conns = list(s.connections.values())
        if conns:
            conns[0].async_event(P.ASYNC_DROP_ALL_CONNECTIONS)
        for conn in conns:
            conn.closing = True
            conn.close()
        self.end_session(s)

    async def end_discovery_sessions(self, reason: str) -> None:
        """Discovery now needs CHAP: the discovery sessions, none of which
        authenticated, end as a target's do when its CHAP is turned on (decision
        0211). A walk over every session like the others (Steps: DROP_STEP
        looked at per turn of the loop, no list of them made first, 0714).
        One audit line counts them."""
        ended = 0

        def end(s: Session) -> None:
            nonlocal ended
            if s.discovery:
                self.drop_session(s, reason)
                ended += 1
        self.steps.run(self.sessions, end)
        await self.steps.idle()
        if ended:
            log.warning("%d discovery session(s) ended: %s", ended, reason, extra=audit())

    def abort_answered(self, tag: int, tasks: list[Task]) -> bool:
        """The STML answered a TMF: True if it was our own ABORT TASK of a
        task whose Time2Retain ran out (`tasks`: what it aborted)."""
        failed = self.expiring.pop(tag, None)
        if failed is None:
            return False
        for task in tasks:
            task.conn.session.itts.pop(task.itt, None)
            task.conn.release(task)
        # counted per answer, aborted or not (the task may have completed first)
        failed.aborting -= 1
        if not failed.aborting:     # the last of them: the window is open now
            self.window_update(failed.session)
        return True

    def link_lost(self) -> None:
        """The STML is gone with every task: failed connections keep nothing,
        sessions without connections end, every connection closes; DROP_STEP
        sessions per turn of the loop (Steps)."""
        # nor will it answer our aborts, or the nexuses logins wait for
        self.expiring.clear()
        instance = self.link.instance
        walk = self.steps.run(self.by_nexus, lambda s: self._unanswered_or_held(s, instance))
        self.holding = (walk, instance) if walk is not None else None
        self.steps.run(self.sessions, self._lose)

    def _unanswered_or_held(self, s: Session, instance: str | None) -> None:
        """A nexus of a lost link: one the STML never took fails its login (it
        is not held); another is held for its next login (0247)."""
        if s.nexus in self.registering:
            self.nexus_ready(s.nexus, "the link to the STML was lost")
        elif instance is not None:
            self._hold(s, instance)

    def _hold(self, s: Session, instance: str) -> None:
        """Keep the I_T nexus of a session the link's loss ends, newest last, MAX_HELD at most."""
        held = self.held
        key = (s.initiator_port, s.target, s.tpgt)
        held.pop(key, None)   # (re-inserted: the newest last)
        held[key] = instance
        if len(held) > MAX_HELD:
            del held[next(iter(held))]

    def _lose(self, s: Session) -> None:
        """One session of a lost link: what its failed connections kept goes, it
        ends without connections, and its connections close."""
        if self.sessions.get(s.tsih) is not s:
            return   # ended meanwhile
        for failed in list(s.failed.values()):   # their tasks are gone with the STML
            self.discard_failed(failed)
        if not s.connections:
            self.end_session(s)
        for conn in list(s.connections.values()):
            conn.close()

    async def stop(self) -> None:
        """The front end stops: the sessions still open (their initiators did not
        log out when asked) are released `lost` before the link says goodbye,
        which would end them as chosen (0234); DROP_STEP per turn of the loop."""
        self.steps.run(self.by_nexus, self._release_lost)
        await self.steps.idle()

    def _release_lost(self, s: Session) -> None:
        if self.by_nexus.get(s.nexus) is s:   # (not ended meanwhile: that released it)
            self.link.scsi_release(s.nexus, lost=s.answered)

    def drop_connection(self, conn: Connection) -> None:
        """The connection is over: its tasks are forgotten (ErrorRecoveryLevel < 2:
        nothing moves them to another connection) and what it held leaves the
        budget (its unsent output once the socket is gone: PduWriter.retire).
        At ERL 2 a connection that failed (no Logout ended it) keeps its tasks
        for a TASK REASSIGN until Time2Wait + Time2Retain pass, and its session
        lives on without connections as long (RFC 7143 6.3.5, 7.2.2)."""
        s = conn.session
        writer = conn.send
        if conn.gone:
            return      # already dropped (a reinstatement got there first)
        conn.gone = True
        # `closing` is set by a Logout, or by drop_nexus, which has ended the session already
        if conn.closing and self.sessions.get(s.tsih) is s:
            portal, peer = self.session_portals.get(s.tsih, ("?", "?"))
            log.info("logout: %s 0x%s -> %s via %s, TSIH %d CID %d", s.initiator, s.isid.hex(),
                     s.target or "discovery", portal, s.tsih, conn.cid, extra=audit(peer))
        if s.connections.get(conn.cid) is conn:
            del s.connections[conn.cid]
        # (with the STML gone its tasks are gone too: nothing is left to reassign)
        if s.erl >= 2 and not conn.closing and not s.discovery and self.link.connected.is_set() \
                and (conn.failed or conn.orphans()):
            self.fail_connection(conn)
            if isinstance(writer, PduWriter):
                writer.retire(release=False)
            return
        for task in [t for t in s.itts.values() if t.conn is conn]:
            s.itts.pop(task.itt, None)
            self.tags.tasks.pop(task.tag, None)
            conn.release(task)
        for task in [t for t in s.kept.values() if t.conn is conn]:
            conn._forget(task)
        if not s.connections and (not s.failed or s.logged_out):
            # (a Logout: the initiator ended it; closing the session ends what
            # failed connections kept for a reassign too, RFC 7143 11.14)
            self.end_session(s, lost=not conn.closing)
        else:
            self.window_update(s)
        if isinstance(writer, PduWriter):
            writer.retire()

    def fail_connection(self, conn: Connection) -> None:
        """ERL 2: a connection that failed with tasks keeps them, and its budget
        share, for a TASK REASSIGN for Time2Wait + Time2Retain but at most
        max_retain seconds; a session keeps at most MaxConnections failed
        connections, one per CID (a CID failing again replaces the earlier
        one, which the cap would no longer see), and a host
        max_failed_per_host (fetd_tcp.retain): past either, the oldest is
        expired now. One with no task keeps nothing: it is dropped as at
        level 0 (drop_connection)."""
        s = conn.session
        if conn.failed or not conn.orphans():
            return
        if s.connections.get(conn.cid) is conn:
            del s.connections[conn.cid]
        earlier = s.failed.get(conn.cid)
        conn.fail()
        delay = retention(s.params.default_time2wait, s.params.default_time2retain, self.limits.max_retain)
        log.info("connection CID %d of TSIH %d failed: %d task(s) kept for %g s", conn.cid, s.tsih,
                 len(conn.orphans()), delay)
        self.expiry[conn] = asyncio.get_running_loop().call_later(delay, self.expire, conn)
        out = conn.send
        over = [earlier] if earlier is not None else []
        over += self.retained.keep(conn, out.host if isinstance(out, PduWriter) else "")
        others = [c for c in s.failed.values() if c is not conn]
        over += others[:len(s.failed) - max(1, s.params.max_connections)]
        for old in over:
            log.info("CID %d of TSIH %d: more failed connections than kept: its tasks are dropped",
                     old.cid, old.session.tsih)
            self.expire(old)

    def expire(self, conn: Connection) -> None:
        """Time2Wait + Time2Retain passed (or a newer failed connection took the
        place): tasks nobody reassigned are dropped (aborted in the STML), then
        the session too if it has no connection."""
        self.retained.forget(conn)
        timer = self.expiry.pop(conn, None)
        if timer is not None:
            timer.cancel()
        s = conn.session
        if conn.account.closed:
            return     # every task was reassigned
        running = conn.expire()
        conn.aborting = len(running)
        if running:
            log.info("Time2Retain expired on CID %d of TSIH %d: %d task(s) aborted", conn.cid,
                     s.tsih, len(running))
        for task in running:
            tag = self.tags.new()
            self.expiring[tag] = conn
            lun = P.lun_to_int(task.lun)
            self.link.rx_task_mgmt_fn(tag, s.nexus, P.TMF_ABORT_TASK, 0xFFFF if lun is None else lun,
                                      task.tag)
        if running:
            self.link.flush()
        conn.account.close()
        if not s.connections and not s.failed:
            self.end_session(s)
        elif not running:
            self.window_update(s)

    def discard_failed(self, conn: Connection) -> None:
        """A failed connection's tasks are over without our aborts (its session
        ends, or the STML that ran them is gone): what it holds goes now."""
        self.retained.forget(conn)
        timer = self.expiry.pop(conn, None)
        if timer is not None:
            timer.cancel()
        conn.expire()
        conn.account.close()

    @staticmethod
    def window_update(s: Session) -> None:
        """Tasks went without a response: a window held shut may be open now."""
        for conn in s.connections.values():
            conn.window_update()
            break

    def end_session(self, s: Session, lost: bool = True) -> None:
        """Forget a session (work in proportion to its own tasks, not to all).
        `lost`: its initiator did not end it (it did with a Logout): the STML
        tells the I_T nexus when it logs in again (0234), if its initiator
        ever heard of it (0236: its final Login Response went out)."""
        if self.sessions.get(s.tsih) is s:
            del self.sessions[s.tsih]
            portal, peer = self.session_portals.pop(s.tsih, ("?", "?"))
            log.info("session ended: %s 0x%s -> %s via %s, TSIH %d", s.initiator, s.isid.hex(),
                     s.target or "discovery", portal, s.tsih, extra=audit(peer))
            key = (s.initiator, s.isid, s.target, s.tpgt)
            if self.by_name.get(key) is s:
                del self.by_name[key]
            for task in s.itts.values():
                self.tags.tasks.pop(task.tag, None)
            for failed in list(s.failed.values()):   # the release below ends their tasks
                self.discard_failed(failed)
            if not s.discovery:
                holding = self.holding
                if holding is not None and self.by_nexus.ahead(holding[0], s.nexus):
                    # (a lost link's walk would have met it: it goes as the walk's do)
                    self._unanswered_or_held(s, holding[1])
                self.by_nexus.pop(s.nexus, None)
                self.registering.pop(s.nexus, None)
                left = self.per_target.get(s.target, 1) - 1
                if left:
                    self.per_target[s.target] = left
                else:
                    self.per_target.pop(s.target, None)
                self.link.scsi_release(s.nexus, lost and s.answered)
