"""A connection's login phase on the wire: Login PDUs read through the
sans-IO framer (fetd_tcp.pdu.PduFramer, no digests before they are
negotiated), the sans-IO LoginMachine driven, its responses written. It
reads exactly the bytes of each PDU, so what the initiator sends behind the
last Login Request stays in the StreamReader for the full feature phase."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from fetd_tcp import login as L
from fetd_tcp import pdu as P
from fetd_tcp.admission import Admission
from fetd_tcp.budget import Account
from fetd_tcp.digest import padding
from fetd_tcp.registry import SessionRegistry
from fetd_tcp.session import Connection

log = logging.getLogger("fetd_tcp")

# the login phase reads with a StreamReader, which buffers up to twice its limit before it
# stops reading: enough for the largest login PDU, so a connection that has not logged in
# cannot make us hold megabytes
LOGIN_READ_LIMIT = L.MAX_LOGIN_TEXT + 1024

Admit = Callable[[L.LoginOutcome, Account], Connection]


class LoginPhase:
    """One connection's login. Its framer stages only headers: every data
    segment gets a buffer of its exact size (at most MAX_LOGIN_TEXT)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = P.PduFramer(False, False, L.MAX_LOGIN_TEXT, big=1, stage=0)

    async def read_pdu(self) -> tuple[P.PDU, bytes | memoryview]:
        """The next PDU and its data segment. Raises PDUError on framing
        errors, after which the stream cannot be trusted."""
        framer = self.framer
        while (item := framer.next()) is None:
            n = framer.wanted()
            framer.get_buffer()[:n] = await self.reader.readexactly(n)
            framer.received(n)
        pdu, data, _ = item
        return pdu, data

    async def refuse_unavailable(self) -> None:
        """No STML is attached: a Login Request gets 0x0301 service unavailable (try again later)."""
        pdu, _ = await self.read_pdu()
        if isinstance(pdu, P.LoginRequest):
            log.info("login refused: no STML attached")
            self.writer.write(P.LoginResponse(pdu.itt, pdu.isid, 0, 0, pdu.cmd_sn, pdu.cmd_sn, pdu.csg,
                                              pdu.nsg, status_class=L.SERVICE_UNAVAILABLE >> 8,
                                              status_detail=L.SERVICE_UNAVAILABLE & 0xFF).encode())

    async def run(self, machine: L.LoginMachine, admission: Admission, admit: Admit) -> Connection | None:
        """Login Requests to `machine` until it completes (`admit` makes the
        connection, with its budget account) or fails (None)."""
        while True:
            pdu, data = await self.read_pdu()
            if not isinstance(pdu, P.LoginRequest):
                return None  # anything but Login before full feature phase ends the connection
            step: L.Send | L.Decide | L.Complete | L.Fail = machine.receive(pdu, bytes(data))
            account: Account | None = None
            if isinstance(step, L.Decide):
                account = admission.account(step.outcome.initiator_name)
                step = admission.decide(machine, step.outcome) if account is not None else \
                    machine.refuse(L.OUT_OF_RESOURCES, "buffer budget full")
            if isinstance(step, L.Complete):
                assert account is not None   # a Complete follows a Decide
                conn = admit(step.outcome, account)   # the account is the connection's now
                return await self._complete(machine, step, conn, admission.registry)
            try:
                await self._send(step)
                if isinstance(step, L.Fail):
                    log.info("login from %s failed: %s", pdu.isid.hex(), step.reason)
                    return None
            finally:
                if account is not None:
                    account.close()

    async def _send(self, step: L.Send | L.Complete | L.Fail) -> None:
        self.writer.write(step.header)
        if step.data:
            self.writer.write(step.data + padding(len(step.data)))
        await self.writer.drain()

    async def _complete(self, machine: L.LoginMachine, step: L.Complete, conn: Connection,
                        registry: SessionRegistry) -> Connection | None:
        """Answer a login that made `conn` once the STML has taken its new
        session's nexus. Refused there (past a cap of the STML's), the login
        fails with Out of resources and its session ends unseen: a session
        the initiator was told of would fail its every command instead. A
        connection that fails before the answer goes out ends a new session
        as one its initiator never had, not as a lost one (0236)."""
        try:
            refusal = await registry.refusal(conn.session)
            await self._send(machine.withdraw(L.OUT_OF_RESOURCES, refusal) if refusal else step)
        except BaseException:   # the connection failed, or the login timer ran out
            registry.drop_connection(conn)
            raise
        if refusal:
            log.info("login from %s failed: %s", conn.session.isid.hex(), refusal)
            registry.drop_connection(conn)
            return None
        conn.session.answered = True
        return conn
