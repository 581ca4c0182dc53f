"""The SLP service agent's socket driver: UDP port 427 on the portals'
addresses, the SLP multicast group on their interfaces, registrations with
directory agents (fetd_tcp.slp holds the protocol).

It runs on fetd_tcp's event loop, and anyone may send it a datagram, so what
it does there is bounded: at most DATAGRAMS_PER_TURN datagrams per loop turn,
and WORK_PER_SECOND units of work a second, at most WORK_BURST at once (a
datagram is one, plus what the agent counts: comparisons and services looked
at, ~0.5 us each). Past that it stops reading until the budget refills; the
kernel drops what piles up meanwhile. A DA gets
everything registered afresh at most once per MIN_FRESH seconds, whatever
DAAdverts claim to come from it."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from typing import Callable

from fetd_tcp import slp

log = logging.getLogger("fetd_tcp")
_PKTINFO = struct.Struct("=i4s4s")   # struct in_pktinfo: ifindex, local address, destination
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)   # Linux's value (typeshed lacks the name)
DATAGRAMS_PER_TURN = 8
WORK_PER_SECOND = 100_000   # ~5% of a core
WORK_BURST = 10_000         # ~5 ms: the longest SLP keeps the loop (plus one request's MAX_REQUEST_COST)
MIN_FRESH = 60.0            # seconds between full registrations with one directory agent
WILDCARD = ""


class WorkBudget:
    """A token bucket of work units, without I/O: `rate` a second, at most
    `burst` saved up. Spending may take it below zero (a datagram's cost is
    known once handled); reading waits until it is positive again."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.level = burst
        self.at = now

    def refill(self, now: float) -> float:
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level

    def spend(self, n: int) -> None:
        self.level -= n

    def wait(self) -> float:
        """Seconds until the level is positive again."""
        return max(0.0, -self.level) / self.rate + 0.001


class SlpDriver:
    """Answers SLP requests for `agent` and keeps directory agents' registrations
    current: `update()` after every change of targets or portals, `close()` at
    shutdown (deregisters)."""

    def __init__(self, agent: slp.ServiceAgent, das: list[str], port: int = slp.SLP_PORT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.agent = agent
        self.port = port
        self.ports = dict(da_address(d, port) for d in das)   # directory agent -> its port
        if self.ports:      # configured: the only directory agents the agent accepts
            agent.allowed_das = frozenset(self.ports)
        self.registered: dict[tuple[str, int], dict[str, str]] = {}   # DA -> url -> attr list
        self.socks: dict[str, socket.socket] = {}   # bound address (WILDCARD, a portal's, the group) -> socket
        self.bound: tuple[str, ...] = ()             # the portal addresses the sockets are for
        self.clock = clock
        self.budget = WorkBudget(WORK_PER_SECOND, WORK_BURST, clock())
        self.paused: asyncio.TimerHandle | None = None
        self.fresh_at: dict[tuple[str, int], float] = {}        # DA -> its last full registration
        self.deferred: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self.handled = 0                                          # datagrams handled
        self.refresher: asyncio.TimerHandle | None = None
        self.started = False

    def addresses(self) -> tuple[str, ...]:
        """Where to listen: every IPv4 portal address, or the wildcard when a
        portal is bound to it (SLP here is IPv4 only)."""
        out: dict[str, None] = {}
        for host, _, _ in self.agent.portals:
            if host in ("", "0.0.0.0", "::", "*"):
                return (WILDCARD,)
            try:
                if ipaddress.ip_address(host).version == 4:
                    out[host] = None
            except ValueError:
                continue
        return tuple(out)

    def start(self) -> None:
        """Listen and register; raises OSError (nothing left open) when it cannot listen."""
        for host in self.ports:
            self.agent.das.setdefault(host, 1)
        self._bind(self.addresses())
        self.started = True
        self.refresher = asyncio.get_running_loop().call_later(slp.LIFETIME / 2, self._refresh)
        self.update()

    def _bind(self, addresses: tuple[str, ...]) -> None:
        """Listen on `addresses` (replacing what was open): one unicast socket
        each, and one on the multicast group joined on their interfaces. On
        OSError nothing is left open, and the next update() tries again."""
        self._close_sockets()
        self.bound = ()
        if not addresses:
            log.info("SLP: no IPv4 portal to answer on")
            return
        socks: dict[str, socket.socket] = {}
        try:
            for addr in addresses:
                socks[addr] = self._socket(addr)
            if addresses != (WILDCARD,):
                socks[slp.MULTICAST] = self._socket(slp.MULTICAST)
            group = socks[slp.MULTICAST if addresses != (WILDCARD,) else WILDCARD]
            for addr in addresses:
                group.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                 socket.inet_aton(slp.MULTICAST) + socket.inet_aton(addr or "0.0.0.0"))
        except OSError:
            for s in socks.values():
                s.close()
            raise
        self.socks, self.bound = socks, addresses
        if not self.paused:
            self._read()
        where = ", ".join(a or "0.0.0.0" for a in addresses)
        print(f"fetd_tcp: SLP service agent on UDP {self.port} (scopes {self.agent.scope_text}) at {where}",
              flush=True)
        sock = next(iter(socks.values()))
        try:   # active discovery of directory agents (RFC 2608 12.2.1)
            sock.sendto(self.agent.da_discovery(), (slp.MULTICAST, self.port))
        except OSError as e:
            log.info("SLP: directory agent discovery not sent: %s", e)

    def _socket(self, addr: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            if addr not in (WILDCARD, slp.MULTICAST):   # our own discovery leaves by the portal
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
            sock.bind((addr, self.port))
            if not self.port:          # any free port (tests): the others take the same
                self.port = sock.getsockname()[1]
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _read(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.socks.values():
            loop.add_reader(sock.fileno(), self._readable, sock)

    def _unread(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.socks.values():
            loop.remove_reader(sock.fileno())

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(DATAGRAMS_PER_TURN):
            if self.budget.refill(self.clock()) <= 0:
                self._unread()      # the kernel holds (and past its buffer drops) the rest
                self.paused = asyncio.get_running_loop().call_later(self.budget.wait(), self._resume)
                return
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
            before = self.agent.work
            self.handled += 1
            try:
                self._datagram(sock, bytes(data), addr, local, dest == slp.MULTICAST)
            except Exception:   # a bug costs one datagram, never the front end
                log.exception("SLP: datagram from %s dropped on an internal error", addr)
            self.budget.spend(max(1, self.agent.work - before))

    def _resume(self) -> None:
        self.paused = None
        self._read()

    def _datagram(self, sock: socket.socket, data: bytes, addr: tuple[str, int], local: str,
                  multicast: bool) -> None:
        if len(data) > 1 and data[1] == slp.DA_ADVERT:
            if self.agent.da_advert(data, addr[0]):
                self._fresh((addr[0], self.ports.get(addr[0], self.port)))
            return
        reply = self.agent.handle(data, local, multicast)
        if reply is not None:
            out = self.socks.get(local, sock)   # from the portal's address, not the group's
            try:
                out.sendto(reply, addr)
            except OSError as e:
                log.debug("SLP: reply to %s not sent: %s", addr, e)

    def _fresh(self, da: tuple[str, int]) -> None:
        """Register everything with a DA that is new or rebooted, at most once
        per MIN_FRESH (then once more when that has passed)."""
        if da in self.deferred:
            return
        now = self.clock()
        last = self.fresh_at.get(da)
        if last is not None and now - last < MIN_FRESH:
            self.deferred[da] = asyncio.get_running_loop().call_later(MIN_FRESH - (now - last),
                                                                      self._deferred, da)
            return
        log.info("SLP: directory agent %s: registering", da[0])
        self.fresh_at = {d: t for d, t in self.fresh_at.items() if d[0] in self.agent.das}
        self.fresh_at[da] = now
        self._register(da, fresh=True)

    def _deferred(self, da: tuple[str, int]) -> None:
        del self.deferred[da]
        if da[0] in self.agent.das:
            self._fresh(da)

    def update(self) -> None:
        """Targets or portals changed: listen where the portals are now, and
        directory agents learn it now."""
        if not self.started:
            return
        wanted = self.addresses()
        if wanted != self.bound:
            try:
                self._bind(wanted)
            except OSError as e:
                log.error("SLP: cannot listen on UDP %d: %s", self.port, e)
        for da in [d for d in self.registered if d[0] not in self.agent.das]:
            del self.registered[da]         # it went down (or was never one)
        for host in list(self.agent.das):
            self._register((host, self.ports.get(host, self.port)), fresh=False)

    def _register(self, da: tuple[str, int], fresh: bool) -> None:
        if not self.socks:
            return
        services = {s.url: s for s in self.agent.services(_local_address(da))}
        self.agent.work += len(services)
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
        sock = self.socks.get(_local_address(da)) or next(iter(self.socks.values()), None)
        if sock is None:
            return
        try:
            sock.sendto(message, da)
        except OSError as e:
            log.info("SLP: directory agent %s: %s", da[0], e)

    def _refresh(self) -> None:
        """Registrations last LIFETIME seconds: renewed at half of it."""
        for da in list(self.registered):
            self._register(da, fresh=True)
        self.refresher = asyncio.get_running_loop().call_later(slp.LIFETIME / 2, self._refresh)

    def close(self) -> None:
        """Deregister from every directory agent, stop answering."""
        for timer in (self.refresher, self.paused, *self.deferred.values()):
            if timer is not None:
                timer.cancel()
        self.deferred.clear()
        for da, urls in self.registered.items():
            for url in urls:
                self._send(self.agent.deregistration(url), da)
        self.registered.clear()
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self.socks and not self.paused:
            self._unread()
        for sock in self.socks.values():
            sock.close()
        self.socks = {}


def da_address(text: str, port: int) -> tuple[str, int]:
    """(host, port) of a configured directory agent, "HOST[:PORT]"."""
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
