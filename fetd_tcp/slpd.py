"""The SLP service agent's socket driver: UDP port 427, the SLP multicast
group, registrations with directory agents (fetd_tcp.slp holds the protocol)."""
from __future__ import annotations

import asyncio
import logging
import socket
import struct

from fetd_tcp import slp

log = logging.getLogger("fetd_tcp")
_PKTINFO = struct.Struct("=i4s4s")   # struct in_pktinfo: ifindex, local address, destination
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)   # Linux's value (typeshed lacks the name)


class SlpDriver:
    """Answers SLP requests for `agent` and keeps directory agents' registrations
    current: `update()` after every change of targets or portals, `close()` at
    shutdown (deregisters)."""

    def __init__(self, agent: slp.ServiceAgent, das: list[str], port: int = slp.SLP_PORT) -> None:
        self.agent = agent
        self.port = port
        self.ports = dict(_da_address(d, port) for d in das)   # directory agent -> its port
        self.registered: dict[tuple[str, int], dict[str, str]] = {}   # DA -> url -> attr list
        self.sock: socket.socket | None = None
        self.refresher: asyncio.TimerHandle | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.bind(("", self.port))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(slp.MULTICAST) + socket.inet_aton("0.0.0.0"))
        sock.setblocking(False)
        self.sock = sock
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._readable)
        print(f"fetd_tcp: SLP service agent on UDP {self.port} (scopes {self.agent.scope_text})", flush=True)
        for host in self.ports:
            self.agent.das.setdefault(host, 1)
        try:   # active discovery of directory agents (RFC 2608 12.2.1)
            sock.sendto(self.agent.da_discovery(), (slp.MULTICAST, self.port))
        except OSError as e:
            log.info("SLP: directory agent discovery not sent: %s", e)
        self.update()
        self.refresher = loop.call_later(slp.LIFETIME / 2, self._refresh)

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(64):     # a turn of the loop answers at most this many
            try:
                data, anc, _, addr = sock.recvmsg(slp.MAX_DATAGRAM + 1, socket.CMSG_SPACE(_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("SLP: receive failed: %s", e)
                return
            local, dest = "0.0.0.0", ""
            for level, kind, payload in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(payload) >= _PKTINFO.size:
                    _, spec, to = _PKTINFO.unpack_from(payload)
                    local, dest = socket.inet_ntoa(spec), socket.inet_ntoa(to)
            try:
                self._datagram(bytes(data), addr, local, dest == slp.MULTICAST)
            except Exception:   # a bug costs one datagram, never the front end
                log.exception("SLP: datagram from %s dropped on an internal error", addr)

    def _datagram(self, data: bytes, addr: tuple[str, int], local: str, multicast: bool) -> None:
        if len(data) > 1 and data[1] == slp.DA_ADVERT:
            if self.agent.da_advert(data, addr[0]):
                log.info("SLP: directory agent %s: registering", addr[0])
                self._register((addr[0], self.port), fresh=True)
            return
        reply = self.agent.handle(data, local, multicast)
        if reply is not None and self.sock is not None:
            try:
                self.sock.sendto(reply, addr)
            except OSError as e:
                log.debug("SLP: reply to %s not sent: %s", addr, e)

    def update(self) -> None:
        """Targets or portals changed: directory agents learn it now."""
        for host in list(self.agent.das):
            self._register((host, self.ports.get(host, self.port)), fresh=False)

    def _register(self, da: tuple[str, int], fresh: bool) -> None:
        sock = self.sock
        if sock is None:
            return
        services = {s.url: s for s in self.agent.services(_local_address(da))}
        have = self.registered.setdefault(da, {})
        for url in [u for u in have if u not in services]:
            self._send(self.agent.deregistration(url), da)
            del have[url]
        for url, service in services.items():
            attrs = service.attr_list()
            if fresh or have.get(url) != attrs:
                self._send(self.agent.registration(service, fresh=True), da)
                have[url] = attrs

    def _send(self, message: bytes, da: tuple[str, int]) -> None:
        try:
            assert self.sock is not None
            self.sock.sendto(message, da)
        except OSError as e:
            log.info("SLP: directory agent %s: %s", da[0], e)

    def _refresh(self) -> None:
        """Registrations last LIFETIME seconds: renewed at half of it."""
        for da in list(self.registered):
            self._register(da, fresh=True)
        self.refresher = asyncio.get_running_loop().call_later(slp.LIFETIME / 2, self._refresh)

    def close(self) -> None:
        """Deregister from every directory agent, stop answering."""
        if self.refresher is not None:
            self.refresher.cancel()
        for da, urls in self.registered.items():
            for url in urls:
                self._send(self.agent.deregistration(url), da)
        self.registered.clear()
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


def _da_address(text: str, port: int) -> tuple[str, int]:
    host, _, p = text.rpartition(":") if text.count(":") == 1 or text.startswith("[") else (text, "", "")
    if not host:
        host, p = text, ""
    return host.strip("[]"), int(p) if p else port


def _local_address(peer: tuple[str, int]) -> str:
    """The address this host uses to reach `peer` (names a wildcard-bound portal)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(peer)
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()

