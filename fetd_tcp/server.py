"""The iSCSI front end process: asyncio portals around the sans-IO cores,
and the STML link (stml.api, the only STML module a front end uses)."""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import secrets
import signal
import socket
from typing import Any, Callable, Iterator, cast

from fetd_tcp import pdu as P
from fetd_tcp.budget import Account, Budget
from fetd_tcp.digest import DIGEST_LEN, digest, padding
from fetd_tcp.keys import TargetKeys
from fetd_tcp import login as L
from fetd_tcp.chap import Credentials, Secret
from fetd_tcp.limits import Limits
from fetd_tcp.session import MAX_TEXT_RESPONSE, Connection, Session, Tags
from scsi_runtime.logs import audit
from stml.api import Detect, FrontEndLink

log = logging.getLogger("fetd_tcp")

LOGIN_TIMEOUT = 15.0     # a connection must finish login within this
NOP_INTERVAL = 10.0      # idle connections are pinged this often; unanswered twice -> dropped
DATAOUT_CHECK = 2.5      # ERL >= 1: a burst with no Data-Out for 1-2 of these is asked for again
CMD_WINDOW = 128         # MaxCmdSN - ExpCmdSN + 1, capped by the STML's queue depth
MAX_CONNECTIONS = 4     # connections per session we accept (MC/S)
WRITE_BACKLOG = 4 << 20  # past this much unsent output, a connection stops reading until it drains
CLOSE_LINGER = 5.0       # a closed connection's unsent output is dropped after this (peer not reading)
# the login phase reads with a StreamReader, which buffers up to twice its limit before it
# stops reading: enough for the largest login PDU, so a connection that has not logged in
# cannot make us hold megabytes
LOGIN_READ_LIMIT = L.MAX_LOGIN_TEXT + 1024


class PortalSpec:
    def __init__(self, host: str, port: int, tpgt: int) -> None:
        self.host, self.port, self.tpgt = host, port, tpgt
        self.requested = (host, port, tpgt)   # as configured (port may be 0: any free port)


class IscsiFrontEnd:
    """The front end: STML calls arrive here and are routed to connections."""

    def __init__(self, stml_endpoint: str | list[str], portals: list[PortalSpec], keys: TargetKeys | None = None,
                 curve: dict[str, bytes] | None = None, isns: str | None = None) -> None:
        self.portals = portals          # listening now
        self.follow_stml = not portals  # no portals of our own: listen on the STML's list (detect)
        self._wanted: tuple[tuple[str, int, int], ...] = ()
        self._syncing: asyncio.Task | None = None
        self.keys = keys or TargetKeys(max_connections=MAX_CONNECTIONS)
        self.link = FrontEndLink(stml_endpoint, "iscsi", self, curve=curve)
        self.isns = None
        self.slp: Any = None     # the SLP service agent's driver (fetd_tcp.slpd), when `slp` is on
        if isns:
            from fetd_tcp.isns import IsnsClient
            self.isns = IsnsClient(isns, f"{self.link.name}")
        self.tags = Tags()
        self.sessions: dict[int, Session] = {}           # TSIH -> session
        self.by_nexus: dict[int, Session] = {}           # nexus -> normal session
        self.by_name: dict[tuple[str, bytes, str], Session] = {}   # (initiator, ISID, target) -> session
        self.per_target: dict[str, int] = {}             # target -> normal sessions
        self.nexus_ids = itertools.count(1)
        self.tsihs = itertools.count(1)
        self.detect_info: Detect | None = None
        self.servers: dict[PortalSpec, asyncio.AbstractServer] = {}
        self.writers: set[Any] = set()
        self.limits = Limits.from_env()
        self.budget = Budget(self.limits.max_buffered)   # every byte a connection makes us hold
        self.open_conns: dict[Any, int] = {}             # portal / peer host -> open connections
        self.pending_output: set[PduWriter] = set()      # writers with PDUs not yet sent
        self.portal_errors: dict[tuple[str, int, int], str] = {}   # wanted portals we could not open
        self.synced = False               # the STML's portal list was applied once
        # set (with the OSError) when a portal of the STML's list cannot be opened at start:
        # a listener that cannot exist makes the start fail, it is not only logged
        self.failed: asyncio.Future | None = None
        # TSIH -> the portal it logged in through, and the initiator's address (audit lines)
        self.session_portals: dict[int, tuple[str, str]] = {}

    # ------------------------------------------------------------ STML -> us
    def detect(self, detect: Detect) -> None:
        if self.detect_info is None:
            print(f"fetd_tcp: attached to STML at {self.link.endpoint}", flush=True)
        self.detect_info = detect
        log.info("STML %s offers %d target(s)", detect.stml, len(detect.targets))
        if self.follow_stml and (detect.portals != self._wanted or self._syncing is None):
            self._wanted = detect.portals
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.get_running_loop().create_task(self._sync_portals())
        elif self.follow_stml and self._syncing is not None and self._syncing.done():
            self._report_portals()    # e.g. a restarted STML: it has not heard from us yet
        if self.isns is not None:
            self._isns_update()
        self._slp_update()

    def _slp_update(self) -> None:
        """Start, stop or update the SLP service agent as the STML's `slp`
        setting, targets and our portals say (after every detect and portal change)."""
        info = self.detect_info
        scopes = info.discovery.get("slp") if info is not None else None
        if not scopes or info is None:
            if self.slp is not None:
                self.slp.close()
                self.slp = None
            return
        from fetd_tcp import slp, slpd
        if self.slp is not None and self.slp.agent.scope_text != ",".join(scopes):
            self.slp.close()
            self.slp = None
        targets = [slp.Target(t.name, t.alias, tuple(t.access.get("acl") or ()),
                              (t.access.get("chap") or {}).get("user")) for t in info.targets]
        portals = [(p.host, p.port, p.tpgt) for p in self.portals]
        if self.slp is None:
            agent = slp.ServiceAgent(list(scopes))
            agent.update(targets, portals)
            driver = slpd.SlpDriver(agent, list(info.discovery.get("slp_da") or ()),
                                    int(os.environ.get("SCSI_TARGET_SLP_PORT", slp.SLP_PORT)))
            try:
                driver.start()
            except OSError as e:
                log.error("SLP service agent not started: %s", e)
                return
            self.slp = driver
        else:
            self.slp.agent.update(targets, portals)
            self.slp.update()

    async def _sync_portals(self) -> None:
        """Open and close listeners until they match the STML's portal list
        (existing connections on a closed portal go on until they end)."""
        while True:
            wanted = self._wanted
            for p in [p for p in self.portals if p.requested not in wanted]:
                server = self.servers.pop(p, None)
                if server is not None:
                    server.close()
                self.portals.remove(p)
                print(f"fetd_tcp: stopped listening on {_hostport(p.host, p.port)} (tpgt {p.tpgt})",
                      flush=True)
            have = {p.requested for p in self.portals}
            for key in wanted:
                if key not in have:
                    try:
                        await self._listen(PortalSpec(*key))
                        self.portal_errors.pop(key, None)
                    except OSError as e:
                        where = f"{_hostport(*key[:2])} (tpgt {key[2]})"
                        self.portal_errors[key] = os.strerror(e.errno) if e.errno else str(e)
                        log.error("cannot listen on %s: %s", where, self.portal_errors[key])
                        if not self.synced and self.failed is not None and not self.failed.done():
                            self.failed.set_exception(OSError(e.errno, f"{where}: {self.portal_errors[key]}"))
            if self._wanted is wanted:
                break
        self.synced = True
        self._report_portals()
        if self.isns is not None:
            self._isns_update()
        self._slp_update()

    def _report_portals(self) -> None:
        """Tell the STML which portals of its list we listen on (contract: portal_state)."""
        states: list[dict[str, Any]] = [
            {"host": p.requested[0], "port": p.requested[1], "tpgt": p.tpgt, "listening": True,
             "bound_port": p.port} for p in self.portals]
        states += [{"host": k[0], "port": k[1], "tpgt": k[2], "listening": False, "error": err}
                   for k, err in self.portal_errors.items() if k in self._wanted]
        self.link.portal_state(states)

    def drop_nexus(self, nexus: int, reason: str) -> None:
        """The STML ended this nexus (management `session drop`): tell the
        initiator every connection is being dropped, close them, end the session."""
        s = self.by_nexus.get(nexus)
        if s is not None:
            log.info("session TSIH %d of %s 0x%s dropped: %s", s.tsih, s.initiator, s.isid.hex(),
                     reason or "by the STML")
            conns = list(s.connections.values())
            if conns:
                conns[0].async_event(P.ASYNC_DROP_ALL_CONNECTIONS)   # Time2Wait/Time2Retain 0
            for conn in conns:
                conn.closing = True
                conn.close()
            self._end_session(s)

    def _isns_update(self) -> None:
        """Tell the iSNS server our targets and portals (after every detect)."""
        from fetd_tcp.isns import Portal
        isns = self.isns
        assert isns is not None   # callers check that iSNS is configured
        targets = [(t.name, t.alias) for t in self.detect_info.targets] if self.detect_info else []
        isns.update(targets, [Portal(p.host, p.port, p.tpgt) for p in self.portals])

    def nexus_ready(self, nexus: int, error: str | None) -> None:
        if error:
            log.warning("STML refused nexus %d: %s", nexus, error)

    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None:
        task = self.tags.tasks.get(tag)
        if task is not None:
            task.conn.rdy_to_xfer(task, offset, length)

    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int, data: list) -> None:
        task = self.tags.tasks.pop(tag, None)
        if task is None:
            self.link.scsi_target_done([tag])   # nobody to send it to: the data is free now
            return
        if not data:
            buf = None
        elif len(data) == 1:
            buf = memoryview(data[0])
        else:
            buf = memoryview(b"".join(data))
        task.conn.xmit_response(task, status, sense, resid, buf)
        out = task.conn.out
        if isinstance(out, PduWriter):
            out.responded(tag)   # done once its writer has sent the PDUs, which refer to `data`
        else:
            self.link.scsi_target_done([tag])

    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int]) -> None:
        tasks = [t for t in (self.tags.tasks.pop(a, None) for a in aborted) if t is not None]
        entry = self.tags.tmfs.pop(tag, None)
        if entry is not None:
            conn, itt, fn = entry
            if conn is None:        # our own ABORT TASK of a task whose Time2Retain ran out
                for task in tasks:
                    old = task.conn
                    old.session.itts.pop(task.itt, None)
                    old.release(task)
                    old.aborting -= 1
                    if not old.aborting:    # the last of them: the window is open now
                        self._window_update(old.session)
            else:
                conn.task_mgmt_fn_done(itt, fn, response, tasks)

    def report_aen(self, nexus: int | None, lun: int, sense: bytes) -> None:
        sessions = self.by_nexus.values() if nexus is None else filter(None, [self.by_nexus.get(nexus)])
        for s in sessions:
            for conn in s.connections.values():
                conn.async_event(P.ASYNC_SCSI_EVENT, P.int_to_lun(lun), sense)
                break

    def usage(self) -> dict[str, int]:
        """Our buffered data, for the STML's `status` (sent with heartbeats)."""
        return self.budget.report()

    def messages_handled(self) -> None:
        """What the STML sent in one read is handled: send the responses now,
        a loop turn sooner than the writers' own flush (QD1 latency)."""
        for writer in list(self.pending_output):
            writer.flush()

    def link_lost(self) -> None:
        """The STML is gone: every task in flight is lost, so every session ends;
        initiators log in again once the STML is back."""
        (log.warning if self.sessions else log.info)("STML link lost: closing %d session(s)", len(self.sessions))
        # nor will it answer the TMFs it was given: their entries (each holds its connection) go too
        self.tags.tmfs.clear()
        for s in list(self.sessions.values()):
            for conn in list(s.connections.values()):
                conn.close()

    # ------------------------------------------------------------ targets for login
    def target_configs(self) -> tuple[L.TargetConfig, ...]:
        """The STML's targets with their access rules, as the login machine wants them."""
        if self.detect_info is None:
            return ()
        return tuple(L.TargetConfig(t.name, t.alias, frozenset(t.access.get("acl") or ()),
                                    _creds(t.access.get("chap")), _creds(t.access.get("mutual")),
                                    int(t.access.get("erl") or 0),
                                    int(t.access.get("cmdsn_depth") or CMD_WINDOW))
                     for t in self.detect_info.targets)

    def portal_addresses(self) -> dict[int, list[tuple[str, int]]]:
        out: dict[int, list[tuple[str, int]]] = {}
        for p in self.portals:
            out.setdefault(p.tpgt, []).append((p.host, p.port))
        return out

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
                    value, conn.session.initiator, self.target_configs(), self.portal_addresses(),
                    local_addr, discovery=conn.session.discovery,
                    session_target=conn.session.target), room)
                if cut:
                    log.warning("SendTargets answer cut to %d bytes: %d target(s) left out",
                                MAX_TEXT_RESPONSE, cut)
                answer += found
            else:
                answer.append((key, "NotUnderstood"))
        return answer

    # ------------------------------------------------------------ portals
    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        self.link.start()
        own, self.portals = self.portals, []
        for p in own:
            try:
                await self._listen(p)
            except OSError as e:   # as for the STML's list: "HOST:PORT (tpgt N): reason"
                raise OSError(e.errno, f"{_hostport(p.host, p.port)} (tpgt {p.tpgt}): "
                              f"{os.strerror(e.errno) if e.errno else e}") from None

    async def _listen(self, p: PortalSpec) -> None:
        server = await asyncio.start_server(
            lambda r, w: self._connection(r, w, p), p.host, p.port,
            reuse_address=True, limit=LOGIN_READ_LIMIT)
        self.servers[p] = server
        self.portals.append(p)
        for sock in server.sockets:
            addr = sock.getsockname()
            p.port = addr[1]
            print(f"fetd_tcp: listening on {_hostport(addr[0], addr[1])} (tpgt {p.tpgt})", flush=True)

    async def stop(self) -> None:
        for s in list(self.sessions.values()):
            for conn in list(s.connections.values()):
                conn.async_event(P.ASYNC_LOGOUT_REQUEST, param3=2)
        if self._syncing is not None:
            self._syncing.cancel()
        for server in self.servers.values():
            server.close()
        await asyncio.sleep(0.2 if self.sessions else 0)
        for w in list(self.writers):
            w.close()
        if self.isns is not None:
            await self.isns.close()
        if self.slp is not None:
            self.slp.close()     # deregisters from directory agents
        await self.link.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          portal: PortalSpec) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        host = ("host", peer[0] if peer else None)
        lim, counts = self.limits, self.open_conns
        if counts.get(portal, 0) >= lim.max_conn_per_portal or counts.get(host, 0) >= lim.max_conn_per_host:
            log.warning("connection from %s refused: too many connections", peer)
            writer.close()
            return
        counts[portal] = counts.get(portal, 0) + 1
        counts[host] = counts.get(host, 0) + 1
        self.writers.add(writer)
        conn: Connection | None = None
        try:
            result = await asyncio.wait_for(self._login(reader, writer, portal, local), lim.login_timeout)
            if result is None:
                return
            conn = result
            conn.local_addr = (local[0], local[1])
            await self._full_feature(reader, writer, conn)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, asyncio.TimeoutError):
            pass
        except P.PDUError as e:
            log.info("connection from %s dropped: %s", peer, e)
        except Exception:   # a bug must cost one connection, never the front end
            log.exception("connection from %s dropped on an internal error", peer)
        finally:
            for key in (portal, host):
                counts[key] -= 1
                if not counts[key]:
                    del counts[key]
            self.writers.discard(writer)
            if conn is not None:
                self._drop_connection(conn)
            writer.close()

    async def _read_pdu(self, reader: asyncio.StreamReader, hd: bool, dd: bool,
                        max_data: int) -> tuple[P.PDU, memoryview, bytes]:
        """(decoded PDU, data segment, raw header). Raises PDUError on digest or
        framing errors, after which the stream cannot be trusted."""
        header = await reader.readexactly(P.BHS_LEN)
        bhs = P.parse_bhs(header)
        if bhs.data_length > max_data:
            raise P.PDUError(f"data segment of {bhs.data_length} bytes exceeds {max_data}")
        rest = await reader.readexactly(bhs.remaining(hd, dd)) if bhs.remaining(hd, dd) else b""
        mv = memoryview(rest)
        ahs = mv[:bhs.ahs_length]
        pos = bhs.ahs_length
        if hd:
            if mv[pos:pos + DIGEST_LEN] != digest(header, ahs):
                raise P.PDUError("header digest error")
            pos += DIGEST_LEN
        data = mv[pos:pos + bhs.data_length]
        if dd and bhs.data_length:
            end = pos + bhs.data_length + len(padding(bhs.data_length))
            if mv[end:end + DIGEST_LEN] != digest(mv[pos:end]):
                raise P.PDUError("data digest error", P.REJECT_DATA_DIGEST_ERROR)
        return P.decode_pdu(header, ahs), data, header

    async def _login(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     portal: PortalSpec, local: Any) -> Connection | None:
        if not self.link.connected.is_set():
            pdu, _, _ = await self._read_pdu(reader, False, False, L.MAX_LOGIN_TEXT)
            if isinstance(pdu, P.LoginRequest):  # 0x0301 service unavailable: try again later
                log.info("login refused: no STML attached")
                writer.write(P.LoginResponse(pdu.itt, pdu.isid, 0, 0, pdu.cmd_sn, pdu.cmd_sn, pdu.csg,
                                             pdu.nsg, status_class=L.SERVICE_UNAVAILABLE >> 8,
                                             status_detail=L.SERVICE_UNAVAILABLE & 0xFF).encode())
            return None
        limits = self.detect_info.limits if self.detect_info else {}
        discovery = self.detect_info.discovery if self.detect_info else {}
        config = L.LoginConfig(self.target_configs(), portal.tpgt, self.keys,
                               _creds(discovery.get("chap")), cmd_window=self._window(limits))
        machine = L.LoginMachine(config, secrets.randbits(32))
        while True:
            pdu, data, _ = await self._read_pdu(reader, False, False, L.MAX_LOGIN_TEXT)
            if not isinstance(pdu, P.LoginRequest):
                return None  # anything but Login before full feature phase ends the connection
            step: L.Send | L.Decide | L.Complete | L.Fail = machine.receive(pdu, bytes(data))
            account: Account | None = None
            if isinstance(step, L.Decide):
                # every connection is guaranteed a share of the buffer budget: none left, no
                # login; what it holds beyond counts toward its initiator's fair share
                account = self.budget.open(step.outcome.initiator_name)
                step = self._decide(machine, step.outcome) if account is not None else \
                    machine.refuse(L.OUT_OF_RESOURCES, "buffer budget full")
            try:
                writer.write(step.header)
                if step.data:
                    writer.write(step.data + padding(len(step.data)))
                await writer.drain()
                if isinstance(step, L.Fail):
                    log.info("login from %s failed: %s", pdu.isid.hex(), step.reason)
                    return None
                if isinstance(step, L.Complete):
                    assert account is not None   # a Complete follows a Decide
                    conn = self._admit(step.outcome, writer, local, portal.tpgt, account)
                    account = None               # the connection's now
                    return conn
            finally:
                if account is not None:
                    account.close()

    def _decide(self, machine: L.LoginMachine, o: L.LoginOutcome) -> L.Complete | L.Fail:
        """The session side of a finished negotiation: a new session gets a
        TSIH; a connection joining one must name a live session of this
        initiator and stay within MaxConnections."""
        if o.tsih == 0:
            if o.session_type == "Normal" and o.target is not None \
                    and self.per_target.get(o.target.name, 0) >= self.limits.max_sessions_per_target \
                    and (o.initiator_name, o.isid, o.target.name) not in self.by_name:   # reinstatement
                return machine.refuse(L.OUT_OF_RESOURCES, "too many sessions on this target")
            return machine.accept(self._allocate_tsih())
        s = self.sessions.get(o.tsih)
        if s is None or s.initiator != o.initiator_name or s.isid != o.isid:
            return machine.refuse(L.SESSION_DOES_NOT_EXIST, "no such session to join")
        if o.cid not in s.connections and len(s.connections) >= s.params.max_connections:
            return machine.refuse(L.TOO_MANY_CONNECTIONS, "MaxConnections reached")
        return machine.accept(o.tsih)

    @staticmethod
    def _window(limits: dict[str, Any]) -> int:
        return min(CMD_WINDOW, int(limits.get("queue_depth", CMD_WINDOW)))

    def _allocate_tsih(self) -> int:
        while True:
            tsih = next(self.tsihs) & 0xFFFF
            if tsih and tsih not in self.sessions:
                return tsih

    def _admit(self, o: L.LoginOutcome, writer: asyncio.StreamWriter, local: Any,
               tpgt: int, account: Account) -> Connection:
        """Create or join the session a finished login names."""
        session = self.sessions.get(o.tsih)
        discovery = o.session_type == "Discovery"
        target = o.target.name if o.target else ""
        if session is None:
            old = self.by_name.get((o.initiator_name, o.isid, target))
            if old is not None:
                log.info("session reinstatement: closing old session TSIH %d", old.tsih)
                for c in list(old.connections.values()):
                    c.close()
                self._end_session(old)
            limits = self.detect_info.limits if self.detect_info else {}
            window = self._window(limits)
            if o.target is not None:
                window = min(window, o.target.cmdsn_depth)
            session = Session(o.tsih, o.isid, o.initiator_name, target, tpgt, o.session,
                              next(self.nexus_ids), o.cmd_sn, window, discovery=discovery,
                              max_transfer=int(limits.get("max_transfer", 8 << 20)))
            self.sessions[o.tsih] = session
            self.by_name[(o.initiator_name, o.isid, target)] = session
            if not discovery:
                self.by_nexus[session.nexus] = session
                self.per_target[target] = self.per_target.get(target, 0) + 1
                self.link.register_nexus(session.nexus, session.initiator_port, target, tpgt)
        portal = _hostport(str(local[0]), int(local[1])) if local else "?"
        peer = writer.get_extra_info("peername")
        self.session_portals.setdefault(o.tsih, (portal, str(peer[0]) if peer else "?"))
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
            self._drop_connection(old_conn)
        failed = session.failed.get(o.cid)
        if failed is not None:
            failed.acknowledge(o.exp_stat_sn)
        out = PduWriter(writer, o.connection, self.pending_output, account, self.link.scsi_target_done)
        conn = Connection(session, o.cid, o.connection, o.stat_sn, out, self.link, self.tags,
                          out.close, self.text, write_limit=self.limits.max_write_buffer,
                          read_limit=self.limits.max_read_buffer, account=account)
        conn.on_failed = self._fail_connection
        session.connections[o.cid] = conn
        return conn

    async def _full_feature(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            conn: Connection) -> None:
        """Full feature phase: the connection's transport is handed from the
        login's StreamReader to a ConnectionProtocol, which handles PDUs as
        they arrive; this waits for the connection to end."""
        # typeshed types StreamWriter.transport as a WriteTransport, but a TCP connection's
        # reads too (not checkable: uvloop's TCPTransport is no asyncio.Transport subclass)
        transport = cast(asyncio.Transport, writer.transport)
        proto = ConnectionProtocol(conn, self.link, transport, self._segment_buffer,
                                   self.link.release_buffer)
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
        bursts every DATAOUT_CHECK too."""
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
            if conn.idle and not conn.ping():
                log.info("initiator %s did not answer NOP-In: dropping connection", conn.session.initiator)
                conn.close()
                return
            conn.idle = True

    def _drop_connection(self, conn: Connection) -> None:
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
        if s.erl >= 2 and not conn.closing and not s.discovery:
            self._fail_connection(conn)
            if isinstance(writer, PduWriter):
                writer.retire(release=False)
            return
        for task in [t for t in s.itts.values() if t.conn is conn]:
            s.itts.pop(task.itt, None)
            self.tags.tasks.pop(task.tag, None)
            conn.release(task)
        for task in [t for t in s.kept.values() if t.conn is conn]:
            conn._forget(task)
        if not s.connections and not s.failed:
            self._end_session(s)
        else:
            self._window_update(s)
        if isinstance(writer, PduWriter):
            writer.retire()

    def _fail_connection(self, conn: Connection) -> None:
        """ERL 2: keep the connection's tasks for Time2Wait + Time2Retain."""
        s = conn.session
        if s.connections.get(conn.cid) is conn:
            del s.connections[conn.cid]
        if conn.failed:
            return
        conn.fail()
        delay = s.params.default_time2wait + s.params.default_time2retain
        log.info("connection CID %d of TSIH %d failed: %d task(s) kept for %d s", conn.cid, s.tsih,
                 len(conn.orphans()), delay)
        asyncio.get_running_loop().call_later(delay, self._expire, conn)

    def _expire(self, conn: Connection) -> None:
        """Time2Wait + Time2Retain passed: tasks nobody reassigned are dropped
        (aborted in the STML), then the session too if it has no connection."""
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
            self.tags.tmfs[tag] = (None, 0, P.TMF_ABORT_TASK)
            lun = P.lun_to_int(task.lun)
            self.link.rx_task_mgmt_fn(tag, s.nexus, P.TMF_ABORT_TASK, 0xFFFF if lun is None else lun,
                                      task.tag)
        if running:
            self.link.flush()
        conn.account.close()
        if not s.connections and not s.failed:
            self._end_session(s)
        elif not running:
            self._window_update(s)

    @staticmethod
    def _window_update(s: Session) -> None:
        """Tasks went without a response: a window held shut may be open now."""
        for conn in s.connections.values():
            conn.window_update()
            break

    def _end_session(self, s: Session) -> None:
        """Forget a session (work in proportion to its own tasks, not to all)."""
        if self.sessions.get(s.tsih) is s:
            del self.sessions[s.tsih]
            portal, peer = self.session_portals.pop(s.tsih, ("?", "?"))
            log.info("session ended: %s 0x%s -> %s via %s, TSIH %d", s.initiator, s.isid.hex(),
                     s.target or "discovery", portal, s.tsih, extra=audit(peer))
            key = (s.initiator, s.isid, s.target)
            if self.by_name.get(key) is s:
                del self.by_name[key]
            for task in s.itts.values():
                self.tags.tasks.pop(task.tag, None)
            if not s.discovery:
                self.by_nexus.pop(s.nexus, None)
                left = self.per_target.get(s.target, 1) - 1
                if left:
                    self.per_target[s.target] = left
                else:
                    self.per_target.pop(s.target, None)
                self.link.scsi_release(s.nexus)


class ConnectionProtocol(asyncio.BufferedProtocol):
    """A connection's input in full feature phase, as a buffered protocol.

    Every read is framed in place (fetd_tcp.pdu.PduFramer: big data segments
    are received straight into a buffer of their own) and every complete PDU
    it holds goes to `conn.receive` in order, within the read's callback (no
    task wake-up per PDU); then what those PDUs queued for the STML leaves at
    once (`link.flush`). `done` ends with the connection: a result when it
    closes (EOF, Logout), an exception for a framing or digest error
    (PDUError: after a data digest error a Reject goes out first) or a bug.
    A PDU the session refuses (PDUError from `receive`) gets a Reject and the
    connection goes on. While more than WRITE_BACKLOG bytes wait in the
    transport, reading stops until it drains (as `drain()` did).
    Shared memory `alloc` gives for a data segment goes back through
    `release` once the PDU is handled (its data then went to the STML, which
    holds it on its own, or was copied or dropped) or the connection ends."""

    def __init__(self, conn: Connection, link: Any, transport: asyncio.Transport,
                 alloc: Any = bytearray, release: Callable[[memoryview], None] | None = None) -> None:
        p = conn.params
        self.conn, self.link, self.transport = conn, link, transport
        self.alloc, self.release = alloc, release
        self.held: list[memoryview] = []   # shared segments taken, not yet given back
        self.framer = P.PduFramer(p.header_digest, p.data_digest, p.max_recv_data_segment_length,
                                  self._alloc if release is not None else alloc)
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.write_paused = False   # the transport's buffer is over its high-water mark
        self.read_paused = False    # we paused reading until it is under its low-water mark

    def take_over(self, reader: asyncio.StreamReader) -> None:
        """Become the transport's protocol after login. What the StreamReader
        already holds (an initiator may send its first commands right behind
        the last Login Request) is handled first."""
        # no public way to take it without awaiting; private, so not in typeshed
        buffered = reader._buffer  # type: ignore[attr-defined]
        pending = bytes(buffered)
        buffered.clear()
        self.transport.set_protocol(self)
        self.transport.resume_reading()     # the StreamReader may have paused it
        if pending:
            self._run(self.framer.feed(pending))
        if self.conn.closing:
            self._end(None)
        if reader.at_eof() or reader.exception() is not None:
            self._end(None)                 # the initiator closed during login: as IncompleteReadError

    def _alloc(self, size: int) -> bytearray | memoryview:
        buf = self.alloc(size)
        if type(buf) is memoryview:
            self.held.append(buf)
        return buf

    def _give_back(self) -> None:
        """The segments taken so far: the framer delivered them (or the connection ended)."""
        held, self.held = self.held, []
        assert self.release is not None   # held only with a release
        for buf in held:
            self.release(buf)

    # -- asyncio.BufferedProtocol
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.framer.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.framer.received(nbytes)
        if not self.done.done():
            self._run()

    def eof_received(self) -> None:
        return None     # the transport closes: connection_lost ends `done`

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        out = self.conn.send
        if isinstance(out, PduWriter):
            out.resample()
            self.conn.window_update()
        if self.read_paused and not self.done.done():
            self.read_paused = False
            self._run()
            if not self.read_paused:
                self.transport.resume_reading()

    # -- input
    def _run(self, feed: Iterator | None = None) -> None:
        """Handle every complete PDU the framer holds (or `feed` yields), in
        order, until the connection closes or its output backs up."""
        conn, transport = self.conn, self.transport
        source = self.framer.next if feed is None else functools.partial(next, feed, None)
        handled = False
        try:
            while not conn.closing and not transport.is_closing():
                try:
                    item = source()
                except P.DigestError as e:
                    if conn.erl and e.header is not None:   # the PDU goes, the stream goes on
                        conn.data_digest_error(e.header)
                        handled = True
                        continue
                    if conn.erl and conn.bad_headers == 0:  # dropped; sequence numbers tell
                        conn.bad_headers += 1
                        continue
                    if e.reject_reason == P.REJECT_DATA_DIGEST_ERROR:
                        conn.reject(e.reject_reason, e.header or b"\0" * P.BHS_LEN)
                    raise
                if item is None:
                    break
                pdu, data, header = item
                conn.idle = False
                handled = True
                try:
                    conn.receive(pdu, data)
                except P.PDUError as e:
                    conn.reject(e.reject_reason, header)
                finally:
                    if self.held:
                        self._give_back()
                if feed is None and self.write_paused and transport.get_write_buffer_size() > WRITE_BACKLOG:
                    self.read_paused = True
                    transport.pause_reading()
                    break
            else:
                if conn.closing:        # Logout: the connection ends here, as the read loop did
                    self._end(None)
        except Exception as e:          # PDUError, or a bug: it costs this connection only
            self._fail(e)
        finally:
            if handled:
                try:
                    self.link.flush()
                except Exception:
                    log.exception("STML link flush failed")

    def _fail(self, exc: Exception) -> None:
        """The stream cannot be trusted (or we broke): send what is pending
        (a Reject for a data digest error), close, and end with `exc`."""
        try:
            out = self.conn.send
            if isinstance(out, PduWriter):
                out.flush()
        finally:
            self.transport.close()
            self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        if self.held:
            self._give_back()    # e.g. a segment cut short, or one with a digest error
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)


class PduWriter:
    """A connection's output: the PDUs produced during one loop iteration leave
    in one writev (header, digest, data, padding as separate buffers: read data
    is not copied), and only what the socket does not take goes through the
    transport's buffer, which also keeps the order once it holds anything.
    What that buffer holds counts in the connection's `account` as "out": it is
    sampled after every flush and whenever the buffer drains (`resample`)."""

    IOV_MAX = 1024

    def __init__(self, writer: asyncio.StreamWriter, params: Any, pending: set | None = None,
                 account: Account | None = None, done: Callable[[list[int]], None] | None = None) -> None:
        self.pending = pending if pending is not None else set()   # writers with output queued
        self.account = account
        self.done = done            # told the tags whose responses a flush sent (link.scsi_target_done)
        self.sent_tags: list[int] = []
        self.transport = writer.transport
        self.fd = writer.get_extra_info("socket").fileno()
        self.hd, self.dd = params.header_digest, params.data_digest
        self.parts: list = []
        self.size = 0               # bytes in parts
        self.scheduled = False
        self.loop = asyncio.get_running_loop()

    def __call__(self, pdu: Any, data: bytes | memoryview) -> None:
        hdr = pdu.encode()
        parts = self.parts
        parts.append(hdr)
        size = len(hdr)
        if self.hd:
            parts.append(digest(hdr))
            size += DIGEST_LEN
        n = len(data)
        if n:
            parts.append(data)
            pad = padding(n)
            size += n + len(pad)
            if pad:
                parts.append(pad)
            if self.dd:
                parts.append(digest(data, pad))
                size += DIGEST_LEN
        self.size += size
        if not self.scheduled:
            self.scheduled = True
            self.pending.add(self)
            self.loop.call_soon(self.flush)

    def close(self) -> None:
        """Send what is pending (e.g. a Logout Response), then close."""
        self.flush()
        self.transport.close()

    def retire(self, release: bool = True) -> None:
        """The connection is over: close, and once the transport has nothing
        left to send (or after CLOSE_LINGER, when the peer does not read: its
        output is then dropped) the connection's account closes (unless not
        `release`: ERL 2 keeps it for the tasks a TASK REASSIGN may claim)."""
        if not release:
            self.account = None
        self.close()
        if self.transport.get_write_buffer_size() == 0:
            self._release()
        else:
            self.loop.call_later(CLOSE_LINGER, self._abort)

    def _abort(self) -> None:
        self.transport.abort()
        self._release()

    def _release(self) -> None:
        if self.account is not None:
            self.account.close()

    def resample(self) -> None:
        """The transport's buffer shrank (it drained): count what it still holds."""
        if self.account is not None:
            self.account.set("out", self.transport.get_write_buffer_size() + self.size)

    def responded(self, tag: int) -> None:
        """A response (queued by the last calls) is reported done once it is sent."""
        if self.done is None:
            return
        self.sent_tags.append(tag)
        if not self.scheduled:
            self.scheduled = True
            self.pending.add(self)
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        self.pending.discard(self)
        parts, self.parts = self.parts, []
        size, self.size = self.size, 0
        try:
            if parts and not self.transport.is_closing():
                try:
                    self._send(parts, size)
                finally:
                    if self.account is not None:
                        self.account.set("out", self.transport.get_write_buffer_size())
        finally:
            # their data is in the kernel, copied into the transport's buffer, or dropped
            # with a closing connection: nothing refers to it any more
            if self.sent_tags:
                assert self.done is not None   # responded() keeps tags only with it
                tags, self.sent_tags = self.sent_tags, []
                self.done(tags)

    def _send(self, parts: list, size: int) -> None:
        if self.transport.get_write_buffer_size() == 0:
            try:
                while parts:
                    chunk = parts[:self.IOV_MAX]
                    n = os.writev(self.fd, chunk)
                    size -= n
                    if not size:
                        return  # all sent (the usual case): no walk over the buffers
                    parts = _advance(parts, n)
                    if n < sum(len(c) for c in chunk):
                        break  # the socket is full: the transport takes the rest
            except BlockingIOError:
                pass
            except OSError:
                self.transport.close()
                return
        if parts:
            self.transport.write(b"".join(parts))


def _advance(parts: list, n: int) -> list:
    """The buffers left after the first n bytes of `parts` were sent."""
    i = 0
    while i < len(parts) and n >= len(parts[i]):
        n -= len(parts[i])
        i += 1
    rest = parts[i:]
    if n and rest:
        rest[0] = memoryview(rest[0])[n:]
    return rest


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    assert fe.failed is not None   # start() made it
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopped, fe.failed], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    await fe.stop()
    if fe.failed.done():
        fe.failed.result()       # raises the OSError: exit 2 (fetd_tcp.cli)
