"""The iSCSI front end process: the STML's calls routed to connections, and
each connection's life (admission, login, full feature phase) joined from
collaborators with one job each: portals (fetd_tcp.portals), discovery
services (fetd_tcp.announce), admission limits (fetd_tcp.admission), the
login phase (fetd_tcp.logind), the session registry (fetd_tcp.registry) and
a connection on the wire (fetd_tcp.wire). The STML link is stml.api's, the
only STML module a front end uses."""
from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import socket
from typing import Any, Callable, cast

from fetd_tcp import login as L
from fetd_tcp import pdu as P
from fetd_tcp.admission import Admission
from fetd_tcp.announce import Announcer
from fetd_tcp.budget import Account
from fetd_tcp.chap import Credentials, Secret
from fetd_tcp.keys import TargetKeys
from fetd_tcp.limits import Limits
from fetd_tcp.logind import LOGIN_READ_LIMIT, LoginPhase
from fetd_tcp.portals import PortalSpec, Portals, hostport
from fetd_tcp.registry import CMD_WINDOW, SessionRegistry, cmd_window
from fetd_tcp.session import MAX_TEXT_RESPONSE, Connection, Session, Tags
from fetd_tcp.wire import ConnectionProtocol, PduWriter, TimedConnectionProtocol
from stml.api import Detect, FrontEndLink

log = logging.getLogger("fetd_tcp")

NOP_INTERVAL = 10.0      # idle connections are pinged this often; unanswered twice -> dropped
DATAOUT_CHECK = 2.5      # ERL >= 1: a burst with no Data-Out for 1-2 of these is asked for again
MAX_CONNECTIONS = 4     # connections per session we accept (MC/S)


class IscsiFrontEnd:
    """The front end: STML calls arrive here and are routed to connections."""

    def __init__(self, stml_endpoint: str | list[str], portals: list[PortalSpec], keys: TargetKeys | None = None,
                 curve: dict[str, bytes] | None = None, isns: str | None = None) -> None:
        self.keys = keys or TargetKeys(max_connections=MAX_CONNECTIONS)
        self.link = FrontEndLink(stml_endpoint, "iscsi", self, curve=curve)
        self.portals = Portals(portals, self._connection, LOGIN_READ_LIMIT, self.link.portal_state,
                               self._announce, self._waiting)
        self.announcer = Announcer(isns, f"{self.link.name}")
        self.tags = Tags()
        self.detect_info: Detect | None = None
        self.attached = False   # registered with an STML now (said on each change: 0704)
        self.writers: set[Any] = set()
        self.limits = Limits.from_env()
        self.registry = SessionRegistry(self.link, self.tags, self.limits)
        self.admission = Admission(self.limits, self.registry)
        self.pending_output: set[PduWriter] = set()      # writers with PDUs not yet sent
        self.holding: set[PduWriter] = set()             # writers whose transports hold lent slots
        self._sweeps: set[asyncio.Task] = set()           # discovery sessions being ended

    # ------------------------------------------------------------ STML -> us
    def detect(self, detect: Detect) -> None:
        if not self.attached:
            self.attached = True
            print(f"fetd_tcp: attached to STML at {self.link.endpoint}", flush=True)
        was_closed = self._discovery_chap()
        self.detect_info = detect
        if self._discovery_chap() and not was_closed:
            # no discovery session authenticated: they end, as a target's sessions do when its
            # CHAP is turned on (decisions 0288, 0211)
            self._sweeps.add(task := asyncio.get_running_loop().create_task(
                self.registry.end_discovery_sessions("discovery now requires CHAP")))
            task.add_done_callback(self._sweeps.discard)
        log.info("STML %s offers %d target(s)", detect.stml, len(detect.targets))
        self.portals.follow(detect.portals)
        self._announce()

    def _waiting(self) -> str:
        """What a `listening on` line adds while no STML answers: a listener
        alone serves nobody (logins are refused until one does)."""
        if self.link.connected.is_set():
            return ""
        return f"; waiting for the STML at {', '.join(self.link.endpoints)} (logins refused until it answers)"

    def _discovery_chap(self) -> bool:
        """Discovery sessions must authenticate with CHAP (the STML's `discovery_chap`)."""
        return self.detect_info is not None and bool(self.detect_info.discovery.get("chap"))

    def _announce(self) -> None:
        """Discovery services learn our targets and portals (after every detect and portal change)."""
        self.announcer.update(self.detect_info, self.portals.listening)

    def drop_nexus(self, nexus: int, reason: str) -> None:
        self.registry.drop_nexus(nexus, reason)

    def nexus_ready(self, nexus: int, error: str | None) -> None:
        if error and nexus not in self.registry.registering:
            # registered again (the STML restarted) and refused: the session's
            # commands would go nowhere, so it ends; the initiator logs in
            # again and gets a clean answer (docs/decisions/0266)
            log.warning("STML refused nexus %d: %s: its session ends", nexus, error)
            self.registry.drop_nexus(nexus, f"the STML refused it: {error}")
            return
        self.registry.nexus_ready(nexus, error)   # a refusal fails the login (logged there)

    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None:
        task = self.tags.tasks.get(tag)
        if task is not None:
            task.conn.rdy_to_xfer(task, offset, length)

    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int, data: list) -> None:
        tasks = self.tags.tasks
        task = tasks.get(tag)   # (get and del: pop(tag, None) is a generic method call, per command)
        if task is None:
            self.link.scsi_target_done([tag])   # nobody to send it to: the data is free now
            return
        del tasks[tag]
        buf: bytes | memoryview | None = None
        if len(data) == 1:
            buf = data[0]
        elif data:
            buf = b"".join(data)
        conn = task.conn
        link = self.link
        writer = conn.send
        if isinstance(writer, PduWriter) and not writer.scheduled and link.delivering:
            # messages_handled flushes it, after the last response this read of the
            # STML brought: no flush of the writer's own (a callback per read)
            writer.scheduled = True
            self.pending_output.add(writer)
        conn.xmit_response(task, status, sense, resid, buf)
        if tag in link.lent or link.timing:   # else nothing waits for it (per command: no calls)
            out = conn.out
            if isinstance(out, PduWriter):
                out.responded(tag)   # done once its writer has sent the PDUs, which refer to `data`
            else:
                link.scsi_target_done([tag])

    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int], info: bytes = b"") -> None:
        tasks = [t for t in (self.tags.tasks.pop(a, None) for a in aborted) if t is not None]
        if self.registry.abort_answered(tag, tasks):
            return
        entry = self.tags.tmfs.pop(tag, None)
        if entry is not None:
            conn, itt, fn, ref = entry
            if fn == P.TMF_ABORT_TASK and response == P.TMF_RESP_NO_TASK and ref is not None:
                # the STML has no such task, yet we do: its response never came (a lost
                # message). Ours goes too, or its ITT would stay taken, and unanswered.
                orphan = self.tags.tasks.pop(ref, None)
                if orphan is not None:
                    tasks.append(orphan)
            conn.task_mgmt_fn_done(itt, fn, response, tasks, info)

    def report_aen(self, nexus: int | None, lun: int, sense: bytes) -> None:
        """An asynchronous event for one nexus, or (None) for every one: a
        walk of every session, in steps (SessionRegistry.steps), which an
        event for one nexus asked for later never overtakes."""
        by_nexus = self.registry.by_nexus
        each: Callable[[Session], None] = lambda s: self._async_event(s, lun, sense)
        if nexus is None:
            self.registry.steps.run(by_nexus, each)   # (no copy of every session: 0706)
        else:
            one = by_nexus.get(nexus)
            if one is not None:
                self.registry.steps.run([one], each)

    def _async_event(self, s: Session, lun: int, sense: bytes) -> None:
        if self.registry.by_nexus.get(s.nexus) is not s:
            return   # ended while the walk went on
        for conn in s.connections.values():
            conn.async_event(P.ASYNC_SCSI_EVENT, P.int_to_lun(lun), sense)
            break

    def usage(self) -> dict[str, int]:
        """Our buffered data, for the STML's `status` (sent with heartbeats)."""
        return self.admission.budget.report()

    def messages_handled(self) -> None:
        """What the STML sent in one read is handled: send the responses now,
        a loop turn sooner than the writers' own flush (QD1 latency). Each
        writer on its own: one whose flush fails is closed, the others are
        still flushed now (not at the next read of the STML, 0705)."""
        for writer in list(self.pending_output):
            try:
                writer.flush()
            except Exception as e:
                log.warning("connection from %s: sending its output failed (%s: %s): closing it",
                            writer.host or "?", type(e).__name__, e)
                writer.transport.abort()

    def link_lost(self) -> None:
        """The STML is gone: every task in flight is lost, so every session ends;
        initiators log in again once the STML is back."""
        sessions = self.registry.sessions
        self.attached = False
        log.warning("link lost to the STML at %s: closing %d session(s); logins refused until an STML answers",
                    self.link.endpoint, len(sessions))
        # nor will it answer the TMFs it was given: their entries (each holds its connection) go too
        self.tags.tmfs.clear()
        self._let_go_of_slots()
        self.registry.link_lost()

    def _let_go_of_slots(self) -> None:
        """The link has just handed every lent slot back (they reach the STML
        with the next message it sends, and may then hold another command's
        data): before that, nothing may refer to them. Responses not yet sent
        go to their sockets now, and a connection whose transport holds some
        of their data is aborted, its rest dropped (decisions/0864)."""
        self.messages_handled()
        for writer in list(self.holding):
            writer.abort(report=False)

    # ------------------------------------------------------------ targets for login
    def target_configs(self) -> tuple[L.TargetConfig, ...]:
        """The STML's targets with their access rules, as the login machine wants them."""
        if self.detect_info is None:
            return ()
        return tuple(L.TargetConfig(t.name, t.alias, frozenset(a.lower() for a in t.access.get("acl") or ()),
                                    _creds(t.access.get("chap")), _creds(t.access.get("mutual")),
                                    int(t.access.get("erl") or 0),
                                    int(t.access.get("cmdsn_depth") or CMD_WINDOW))
                     for t in self.detect_info.targets)

    def text(self, conn: Connection, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Text requests in full feature phase: SendTargets (each key comes once:
        the session refuses repeats); other keys are not renegotiated. An answer
        is at most MAX_TEXT_RESPONSE bytes: whole targets that fit."""
        answer: list[tuple[str, str]] = []
        local_addr = conn.local_addr
        assert local_addr is not None   # set before the full feature phase starts
        room = MAX_TEXT_RESPONSE - sum(len(k) + 15 for k, v in pairs if k != "SendTargets")
        for key, value in pairs:
            if key == "SendTargets":
                found, cut = L.fit_targets(L.send_targets(
                    value, conn.session.initiator, self.target_configs(), self.portals.addresses(),
                    local_addr, discovery=conn.session.discovery,
                    session_target=conn.session.target), room)
                if cut:
                    log.warning("SendTargets answer cut to %d bytes: %d target(s) left out",
                                MAX_TEXT_RESPONSE, cut)
                answer += found
            else:
                answer.append((key, "NotUnderstood"))
        return answer

    # ------------------------------------------------------------ start and stop
    async def start(self) -> None:
        self.link.start()
        await self.portals.start()

    async def stop(self) -> None:
        sessions = self.registry.sessions
        had = bool(sessions)
        # every session is asked to log out, in steps (SessionRegistry.steps)
        self.registry.steps.run(sessions, self._ask_logout)
        self.portals.close()
        await self.registry.steps.idle()
        await asyncio.sleep(0.2 if had else 0)
        for w in list(self.writers):
            w.close()
        await self.registry.stop()
        await self.announcer.close()
        await self.link.close()

    def _ask_logout(self, s: Session) -> None:
        if self.registry.sessions.get(s.tsih) is s:
            for conn in list(s.connections.values()):
                conn.async_event(P.ASYNC_LOGOUT_REQUEST, param3=2)

    # ------------------------------------------------------------ a connection's life
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          portal: PortalSpec) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        counted = self.admission.connect(portal, peer)
        if counted is None:
            writer.close()
            return
        self.writers.add(writer)
        conn: Connection | None = None
        try:
            result = await asyncio.wait_for(self._login(reader, writer, portal, local),
                                            self.limits.login_timeout)
            if result is None:
                return
            conn = result
            conn.local_addr = (local[0], local[1])
            cast(PduWriter, conn.send).release()   # the Login Response is out
            await self._full_feature(reader, writer, conn)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, asyncio.TimeoutError):
            pass
        except P.PDUError as e:
            log.info("connection from %s dropped: %s", peer, e)
        except Exception:   # a bug must cost one connection, never the front end
            log.exception("connection from %s dropped on an internal error", peer)
        finally:
            self.admission.disconnect(counted)
            self.writers.discard(writer)
            if conn is not None:
                self.registry.drop_connection(conn)
            writer.close()

    async def _login(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     portal: PortalSpec, local: Any) -> Connection | None:
        phase = LoginPhase(reader, writer)
        if not self.link.connected.is_set():
            await phase.refuse_unavailable()
            return None
        limits = self.detect_info.limits if self.detect_info else {}
        discovery = self.detect_info.discovery if self.detect_info else {}
        config = L.LoginConfig(self.target_configs(), portal.tpgt, self.keys,
                               _creds(discovery.get("chap")), cmd_window=cmd_window(limits))
        machine = L.LoginMachine(config, secrets.randbits(32))
        conn = await phase.run(machine, self.admission,
                               lambda o, account: self._admit(o, writer, local, portal.tpgt, account))
        if conn is not None and conn.session.discovery and config.discovery_chap is None \
                and self._discovery_chap():
            # discovery CHAP was turned on while this login went on without it (decision 0211)
            log.info("discovery session of %s ended: discovery now requires CHAP", conn.session.initiator)
            self.registry.drop_connection(conn)
            return None
        return conn

    def _admit(self, o: L.LoginOutcome, writer: asyncio.StreamWriter, local: Any,
               tpgt: int, account: Account) -> Connection:
        """The session a finished login names (created or joined), and the new connection in it."""
        limits = self.detect_info.limits if self.detect_info else {}
        peer = writer.get_extra_info("peername")
        session = self.registry.admit(o, tpgt, cmd_window(limits), int(limits.get("max_transfer", 8 << 20)),
                                      hostport(str(local[0]), int(local[1])) if local else "?",
                                      str(peer[0]) if peer else "?")
        out = PduWriter(writer, o.connection, self.pending_output, account, self.link.scsi_target_done,
                        str(peer[0]) if peer else "", held=session.nexus in self.registry.registering,
                        holding=self.holding)
        conn = Connection(session, o.cid, o.connection, o.stat_sn, out, self.link, self.tags,
                          out.close, self.text, write_limit=self.limits.max_write_buffer,
                          read_limit=self.limits.max_read_buffer, account=account)
        self.registry.attach(conn)
        return conn

    async def _full_feature(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            conn: Connection) -> None:
        """Full feature phase: the connection's transport is handed from the
        login's StreamReader to a ConnectionProtocol, which handles PDUs as
        they arrive; this waits for the connection to end."""
        # typeshed types StreamWriter.transport as a WriteTransport, but a TCP connection's
        # reads too (not checkable: uvloop's TCPTransport is no asyncio.Transport subclass)
        transport = cast(asyncio.Transport, writer.transport)
        # stage timing (granted by the STML): a protocol that stamps each read
        protocol = TimedConnectionProtocol if self.link.timing else ConnectionProtocol
        proto = protocol(conn, self.link, transport, self._segment_buffer, self.link.release_buffer)
        pinger = asyncio.create_task(self._pinger(conn))
        try:
            proto.take_over(reader)
            await proto.done
        finally:
            pinger.cancel()

    def _segment_buffer(self, size: int) -> bytearray | memoryview:
        """Where a big data segment (write data) is received: memory shared with
        a same-host STML when it has room (the data then never crosses the
        STML's socket; ConnectionProtocol gives it back), else new memory
        (decisions/0602: a reused buffer would need the carrier to say when it
        is sent)."""
        view = self.link.shared_buffer(size)
        return view if view is not None else bytearray(size)

    async def _pinger(self, conn: Connection) -> None:
        """NOP-In pings every NOP_INTERVAL; at ERL >= 1 a look at stalled write
        bursts every DATAOUT_CHECK too. A connection whose transport holds
        read data in the STML's slots is pinged even when its initiator sends:
        one that reads nothing for a whole interval is dropped (its close ends
        in an abort, 0864), so no initiator keeps slots for as long as it
        likes (review 19)."""
        conn.idle = True
        step = DATAOUT_CHECK if conn.erl else NOP_INTERVAL
        waited = 0.0
        while True:
            await asyncio.sleep(step)
            if conn.erl:
                conn.check_stalled()
            waited += step
            if waited < NOP_INTERVAL:
                continue
            waited = 0.0
            if (conn.idle or conn.send in self.holding) and not conn.ping():
                log.info("initiator %s did not answer NOP-In: dropping connection", conn.session.initiator)
                conn.close()
                return
            conn.idle = True


def _creds(raw: dict[str, str] | None) -> Credentials | None:
    return Credentials(raw["user"], Secret(raw["secret"])) if raw else None


async def run_fetd_tcp(stml_endpoint: str | list[str], portals: list[PortalSpec],
                       curve: dict[str, bytes] | None = None, isns: str | None = None,
                       inject: list[Any] | None = None) -> None:
    fe = IscsiFrontEnd(stml_endpoint, portals, curve=curve, isns=isns)
    if inject:   # fault injection: off, and no tap, unless asked
        from stml.api.inject import tap_link
        tap_link(inject, fe.link, "fetd_tcp")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)   # a reload is the STML's business
    await fe.start()
    failed = fe.portals.failed
    assert failed is not None   # start() made it
    stopped = asyncio.ensure_future(stop.wait())
    ended = fe.link.ended
    await asyncio.wait([stopped, failed, ended], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    await fe.stop()
    if failed.done():
        failed.result()       # raises the OSError: exit 2 (fetd_tcp.cli)
    if ended.done():
        ended.result()        # raises RegistrationRefused: exit 2 (fetd_tcp.cli)
