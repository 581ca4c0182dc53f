"""An iSNS client (RFC 4171): fetd_tcp registers its targets and portals.

One network entity per front end holds a storage node per target and a
portal per listening address, with portal groups tying them together.
DevAttrReg (with the replace flag) runs on start, whenever the STML's
targets or portals change (every `detect`) and every `period` / 2 seconds;
each portal names an ESI port where the client answers the server's Entity
Status Inquiries (RFC 4171 5.6.5.13: ESIRsp echoes the ESI's attributes),
listening on that portal's registered address only (decision 0210), so
a server that uses ESI (open-isns) drops a front end that stopped answering
after its ESI retries, and the periodic re-registration keeps us listed with
servers that do not; DevDereg removes the entity on shutdown. Encoding is sans-IO (`encode_*`, `decode_*`);
`IsnsClient` is the asyncio shell.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

from fetd_tcp.login import advertised

log = logging.getLogger("fetd_tcp.isns")

VERSION = 1
DEV_ATTR_REG, DEV_ATTR_QRY, DEV_DEREG, ESI = 0x0001, 0x0002, 0x0004, 0x000D
RESPONSE = 0x8000
FLAG_CLIENT, FLAG_REPLACE, FLAG_LAST, FLAG_FIRST = 0x8000, 0x1000, 0x0800, 0x0400

# attribute tags (RFC 4171 6.1)
DELIMITER = 0
ENTITY_ID, ENTITY_PROTOCOL, REGISTRATION_PERIOD = 1, 2, 6
PORTAL_IP, PORTAL_PORT, ESI_INTERVAL, ESI_PORT = 16, 17, 19, 20
ISCSI_NAME, ISCSI_NODE_TYPE, ISCSI_ALIAS = 32, 33, 34
PG_ISCSI_NAME, PG_PORTAL_IP, PG_PORTAL_PORT, PG_TAG = 48, 49, 50, 51
PROTOCOL_ISCSI = 2
NODE_TARGET = 1
# anyone who reaches a portal's address may connect to its ESI port, so connections are
# few and short (an iSNS server sends one ESI at a time and waits for the answer)
ESI_MAX_CONNECTIONS = 4
ESI_IDLE = 30.0     # seconds an ESI connection may stay silent


@dataclass(frozen=True)
class Portal:
    host: str
    port: int
    tpgt: int


def _attr(tag: int, value: bytes) -> bytes:
    value += bytes(-len(value) % 4)
    return struct.pack(">II", tag, len(value)) + value


def _str(tag: int, s: str) -> bytes:
    b = s.encode() + b"\0"          # NULL-terminated, padded to 4 bytes
    return _attr(tag, b)


def _u32(tag: int, n: int) -> bytes:
    return _attr(tag, struct.pack(">I", n))


def _ip(tag: int, host: str) -> bytes:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    if addr.version == 4:
        addr = ipaddress.IPv6Address(f"::ffff:{addr}")
    return _attr(tag, addr.packed)


def pdu(function: int, xid: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">HHHHHH", VERSION, function, len(payload), FLAG_CLIENT | FLAG_FIRST | FLAG_LAST | flags,
                       xid, 0) + payload


def reachable(portals: list[Portal], local: str) -> list[Portal]:
    """The portals as initiators that reach the iSNS server's network can use
    them, named as SendTargets names them to one that came to `local` (the
    address this host reaches the server from): a wildcard portal (0.0.0.0,
    ::) by that address, which the wildcard itself would send initiators to
    their own host; a loopback portal only when the server is on loopback."""
    out = []
    for p in portals:
        told = advertised(p.host, local)
        if told is not None:
            out.append(Portal(told, p.port, p.tpgt))
    return out


def encode_register(entity: str, targets: list[tuple[str, str]], portals: list[Portal], xid: int,
                    period: int, esi_ports: Mapping[str, int] | None = None, esi_interval: int = 0) -> bytes:
    """DevAttrReg (replace) of the whole entity: targets are (name, alias); a
    portal whose address has a port in `esi_ports` asks for ESI there every
    `esi_interval` seconds. `portals` are as initiators reach them (`reachable`)."""
    source = targets[0][0] if targets else entity
    body = _str(ISCSI_NAME, source) + _str(ENTITY_ID, entity) + _attr(DELIMITER, b"")
    body += _str(ENTITY_ID, entity) + _u32(ENTITY_PROTOCOL, PROTOCOL_ISCSI)
    body += _u32(REGISTRATION_PERIOD, period)
    for p in portals:
        body += _ip(PORTAL_IP, p.host) + _u32(PORTAL_PORT, p.port)
        esi_port = (esi_ports or {}).get(p.host)
        if esi_port:
            body += _u32(ESI_INTERVAL, esi_interval) + _u32(ESI_PORT, esi_port)
    for name, alias in targets:
        body += _str(ISCSI_NAME, name) + _u32(ISCSI_NODE_TYPE, NODE_TARGET)
        if alias:
            body += _str(ISCSI_ALIAS, alias)
    for name, _ in targets:
        for p in portals:
            body += (_str(PG_ISCSI_NAME, name) + _ip(PG_PORTAL_IP, p.host)
                     + _u32(PG_PORTAL_PORT, p.port) + _u32(PG_TAG, p.tpgt))
    return pdu(DEV_ATTR_REG, xid, body, FLAG_REPLACE)


def encode_deregister(entity: str, source: str, xid: int) -> bytes:
    body = _str(ISCSI_NAME, source) + _attr(DELIMITER, b"") + _str(ENTITY_ID, entity)
    return pdu(DEV_DEREG, xid, body)


def encode_esi_response(header: bytes, payload: bytes) -> bytes | None:
    """ESIRsp to a server's ESI: status 0 and the ESI's own attributes (entity,
    portal) echoed; None for any other message."""
    _, function, _, _, xid, _ = struct.unpack(">HHHHHH", header)
    if function != ESI:
        return None
    return pdu(ESI | RESPONSE, xid, struct.pack(">I", 0) + payload)


def decode_response(header: bytes, payload: bytes) -> tuple[int, int, int]:
    """(function, transaction id, status code) of a server response."""
    _, function, _, _, xid, _ = struct.unpack(">HHHHHH", header)
    status = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else -1
    return function, xid, status


class IsnsError(Exception):
    pass


class IsnsClient:
    def __init__(self, server: str, entity: str, period: int = 60, timeout: float = 5.0,
                 esi: bool = True, esi_interval: int = 5, esi_idle: float = ESI_IDLE) -> None:
        host, _, port = server.rpartition(":")
        if not host:
            host, port = server, "3205"
        self.host, self.port = host.strip("[]"), int(port)
        self.entity = entity
        self.period = period
        self.timeout = timeout
        self.targets: list[tuple[str, str]] = []
        self.portals: list[Portal] = []
        self.registered_source: str | None = None
        self._xid = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.esi = esi
        self.esi_interval = esi_interval   # asked for; the server raises it to its minimum (open-isns: 60 s)
        self.esi_idle = esi_idle
        self._esi_open = 0          # ESI connections now
        # registered portal address -> its ESI listener and port (None: could not listen there)
        self.esi_listeners: dict[str, tuple[asyncio.AbstractServer, int] | None] = {}

    def update(self, targets: list[tuple[str, str]], portals: list[Portal]) -> None:
        """Register (again) with these targets and portals, soon."""
        self.targets, self.portals = list(targets), list(portals)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def esi_follow(self, hosts: set[str]) -> dict[str, int]:
        """Listen for ESI on exactly these addresses (the registered portals'):
        new ones opened, those no longer registered closed; the ESI port of
        each. The server sends ESI to a portal's address, so no other address
        needs the port (decision 0210). An address we cannot listen on gets
        no ESI port: the server then relies on re-registration."""
        if not self.esi:
            hosts = set()
        for host in [h for h in self.esi_listeners if h not in hosts]:
            held = self.esi_listeners.pop(host)
            if held is not None:
                held[0].close()
        for host in sorted(hosts - self.esi_listeners.keys()):
            try:
                server = await asyncio.start_server(self._on_esi, host, 0)
                port = server.sockets[0].getsockname()[1]
                self.esi_listeners[host] = (server, port)
                log.info("answering iSNS ESI on %s", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            except OSError as e:
                self.esi_listeners[host] = None
                log.warning("no ESI port on %s (%s): relying on re-registration", host, e)
        return {h: held[1] for h, held in self.esi_listeners.items() if held is not None}

    async def _on_esi(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer ESIs on one connection: at most ESI_MAX_CONNECTIONS at once, each
        closed when silent for esi_idle seconds (or on anything but an ESI)."""
        if self._esi_open >= ESI_MAX_CONNECTIONS:
            log.warning("ESI connection from %s refused: %d already open",
                        writer.get_extra_info("peername"), ESI_MAX_CONNECTIONS)
            writer.close()
            return
        self._esi_open += 1
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(12), self.esi_idle)
                payload = await asyncio.wait_for(
                    reader.readexactly(struct.unpack(">H", header[4:6])[0]), self.esi_idle)
                answer = encode_esi_response(header, payload)
                if answer is None:
                    break
                writer.write(answer)
                await asyncio.wait_for(writer.drain(), self.esi_idle)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            self._esi_open -= 1
            writer.close()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self.targets:
                    await self._register()
                elif self.registered_source:
                    await self._deregister()
            except (OSError, asyncio.TimeoutError, IsnsError) as e:
                log.warning("iSNS server %s:%d: %s; retrying in 5s", self.host, self.port, e)
                try:
                    await asyncio.wait_for(self._wake.wait(), 5)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self.period / 2)
            except asyncio.TimeoutError:
                pass

    def _next_xid(self) -> int:
        self._xid = (self._xid + 1) & 0xFFFF
        return self._xid

    async def _exchange(self, build: Callable[[str], Awaitable[bytes]]) -> int:
        """Send the message `build` makes from our address on the connection
        to the server (`reachable` names wildcard portals by it); its status."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        try:
            writer.write(await build(writer.get_extra_info("sockname")[0]))
            await writer.drain()
            header = await asyncio.wait_for(reader.readexactly(12), self.timeout)
            length = struct.unpack(">H", header[4:6])[0]
            payload = await asyncio.wait_for(reader.readexactly(length), self.timeout)
        finally:
            writer.close()
        function, _, status = decode_response(header, payload)
        if not function & RESPONSE:
            raise IsnsError(f"unexpected function 0x{function:04x} from the server")
        return status

    async def _register(self) -> None:
        if self.registered_source and self.registered_source not in [n for n, _ in self.targets]:
            await self._deregister()   # the entity's source node went away: start afresh
        xid = self._next_xid()

        async def build(local: str) -> bytes:
            portals = reachable(self.portals, local)
            esi_ports = await self.esi_follow({p.host for p in portals})
            return encode_register(self.entity, self.targets, portals, xid, self.period, esi_ports,
                                   self.esi_interval)
        status = await self._exchange(build)
        if status:
            raise IsnsError(f"DevAttrReg refused (status {status})")
        if self.registered_source is None:
            log.info("registered %d target(s), %d portal(s) with iSNS server %s:%d as %s",
                     len(self.targets), len(self.portals), self.host, self.port, self.entity)
        self.registered_source = self.targets[0][0]

    async def _deregister(self) -> None:
        source, self.registered_source = self.registered_source, None
        assert source is not None   # every caller checks that something is registered
        xid = self._next_xid()

        async def build(_: str) -> bytes:
            await self.esi_follow(set())     # nothing registered: nothing to answer ESI for
            return encode_deregister(self.entity, source, xid)
        status = await self._exchange(build)
        if status:
            raise IsnsError(f"DevDereg refused (status {status})")
        log.info("deregistered %s from iSNS server %s:%d", self.entity, self.host, self.port)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for held in self.esi_listeners.values():
            if held is not None:
                held[0].close()
        self.esi_listeners.clear()
        if self.registered_source:
            try:
                await self._deregister()
            except (OSError, asyncio.TimeoutError, IsnsError) as e:
                log.warning("iSNS deregistration failed: %s", e)
