"""The SLP driver (fetd_tcp.slpd) on real UDP sockets on loopback, driven one
loop turn at a time: what it reads per turn and per unit of work is bounded,
it listens where the portals are, a directory agent is registered with afresh
at most once per MIN_FRESH, and a socket it cannot open leaves none behind
(review 2, findings 2, 3 and 15). Counts, never time: the clock is ours."""
from __future__ import annotations

import asyncio
import socket
import struct
import types

import pytest
from pyslp import creator

from fetd_tcp import slp, slpd

IQN = "iqn.2026-11.org.scsi-target:disk0"


def _agent(targets: int = 1, portals=(("127.0.0.1", 3260, 1),), **kw) -> slp.ServiceAgent:
    a = slp.ServiceAgent(["DEFAULT"], **kw)
    a.update([slp.Target(IQN if targets == 1 else f"{IQN}-{i}", "a disk") for i in range(targets)], portals)
    return a


def _client(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def _drain(s: socket.socket) -> list[bytes]:
    """What has arrived (loopback UDP is delivered within sendto)."""
    got = []
    while True:
        try:
            got.append(s.recv(65536))
        except BlockingIOError:
            return got


def _run(main) -> None:
    asyncio.run(main())


def test_a_loop_turn_handles_at_most_datagrams_per_turn():
    """40 requests queued: one turn of the loop answers DATAGRAMS_PER_TURN (the
    rest wait for the next turns), where it used to answer 64."""
    async def main() -> None:
        d = slpd.SlpDriver(_agent(), [], port=0)
        d.start()
        try:
            client = _client()
            for _ in range(40):
                client.sendto(creator.create_request("service:iscsi:target"), ("127.0.0.1", d.port))
            d._readable(d.socks["127.0.0.1"])
            assert d.handled == slpd.DATAGRAMS_PER_TURN == 8
            assert len(_drain(client)) == 8
            d._readable(d.socks["127.0.0.1"])
            assert d.handled == 16 and len(_drain(client)) == 8
        finally:
            d.close()
    _run(main)


def test_work_per_second_is_bounded():
    """Expensive requests (MAX_REQUEST_COST each): once WORK_BURST is spent the
    driver stops reading; with the clock a second on, it reads again."""
    async def main() -> None:
        now = [100.0]
        d = slpd.SlpDriver(_agent(targets=2000), [], port=0, clock=lambda: now[0])
        d.start()
        d.agent.services("127.0.0.1")       # built once per change (not what this counts)
        try:
            predicate = "(|" + "".join(f"(alias=*no{i}*)" for i in range(slp.MAX_ITEMS)) + ")"
            body = b"".join(struct.pack(">H", len(s)) + s.encode()
                            for s in ("", "service:iscsi:target", "DEFAULT", predicate, ""))
            request = creator.create_header(1, len(body), 0x20) + body
            client = _client()
            for _ in range(8):
                client.sendto(request, ("127.0.0.1", d.port))
            start = d.agent.work
            d._readable(d.socks["127.0.0.1"])
            per = slp.MAX_REQUEST_COST + 1
            expected = -(-slpd.WORK_BURST // per)      # until the budget is below zero
            assert d.handled == expected == 3 and d.agent.work - start == expected * per
            assert d.paused is not None                # not reading until it refills
            d._readable(d.socks["127.0.0.1"])          # (as if a turn came anyway)
            assert d.handled == expected
            now[0] += 1.0
            d.paused.cancel()
            d._resume()
            d._readable(d.socks["127.0.0.1"])
            assert d.handled == 2 * expected
        finally:
            d.close()
    _run(main)


def test_it_listens_on_the_portal_addresses_only():
    """Finding 3: with portals on 127.0.0.1 it no longer binds 0.0.0.0:427: one
    socket on the portal's address, one on the group; a portal change moves
    them; a wildcard portal takes the wildcard."""
    async def main() -> None:
        agent = _agent()
        d = slpd.SlpDriver(agent, [], port=0)
        d.start()
        try:
            assert {k: s.getsockname() for k, s in d.socks.items()} == {
                "127.0.0.1": ("127.0.0.1", d.port), slp.MULTICAST: (slp.MULTICAST, d.port)}
            agent.update(agent.targets, [("127.0.0.2", 3260, 1)])
            d.update()
            assert {k: s.getsockname()[0] for k, s in d.socks.items()} == {
                "127.0.0.2": "127.0.0.2", slp.MULTICAST: slp.MULTICAST}
            client = _client("127.0.0.2")
            client.sendto(creator.create_request("service:iscsi:target"), ("127.0.0.2", d.port))
            d._readable(d.socks["127.0.0.2"])
            (reply,) = _drain(client)
            assert b"service:iscsi:target://127.0.0.2:3260/" + IQN.encode() in reply
            agent.update(agent.targets, [("0.0.0.0", 3260, 1), ("127.0.0.1", 3261, 2)])
            d.update()
            assert [s.getsockname()[0] for s in d.socks.values()] == ["0.0.0.0"]
            agent.update(agent.targets, [("::1", 3260, 1)])
            d.update()                          # IPv6 only: SLP (IPv4) has nowhere to listen
            assert d.socks == {}
        finally:
            d.close()
    _run(main)


def _recording(monkeypatch, refuse: int | None = None) -> list[socket.socket]:
    """Every socket slpd makes from now on (kept, so a leaked one stays open
    rather than being closed by the garbage collector); `refuse`: a socket
    option whose setting fails as on a host without a multicast route."""
    made: list[socket.socket] = []

    class Recorded(socket.socket):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            made.append(self)

        def setsockopt(self, level, option, *value) -> None:   # type: ignore[override]
            if option == refuse:
                raise OSError(19, "No such device")
            super().setsockopt(level, option, *value)

    shim = types.SimpleNamespace(**vars(socket))
    shim.socket = Recorded
    monkeypatch.setattr(slpd, "socket", shim)
    return made


def test_a_socket_that_cannot_be_opened_leaves_none_behind(monkeypatch):
    """Finding 15: when joining the multicast group fails after the bind (the
    case the review found), or one of its sockets cannot be bound (the port is
    taken on the second portal address), every socket it made is closed."""
    async def main() -> None:
        made = _recording(monkeypatch, refuse=socket.IP_ADD_MEMBERSHIP)
        d = slpd.SlpDriver(_agent(), [], port=0)
        with pytest.raises(OSError):
            d.start()
        assert len(made) == 2 and all(s.fileno() == -1 for s in made) and d.socks == {}

        made = _recording(monkeypatch)
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.bind(("127.0.0.2", 0))           # no SO_REUSEADDR: the port is its own
        port = blocker.getsockname()[1]
        d = slpd.SlpDriver(_agent(portals=[("127.0.0.1", 3260, 1), ("127.0.0.2", 3260, 1)]), [], port=port)
        with pytest.raises(OSError):
            d.start()
        assert len(made) == 2 and all(s.fileno() == -1 for s in made) and d.socks == {}
        blocker.close()
    _run(main)


def test_a_portal_address_it_could_not_listen_on_is_tried_again():
    """A portal moved to an address whose port is taken: the driver listens
    nowhere (nothing left open); the next update, once the port is free, listens
    there (it used to take the failed address as bound and never try again)."""
    async def main() -> None:
        agent = _agent()
        d = slpd.SlpDriver(agent, [], port=0)
        d.start()
        try:
            blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            blocker.bind(("127.0.0.2", d.port))
            agent.update(agent.targets, [("127.0.0.2", 3260, 1)])
            d.update()
            assert d.socks == {}
            blocker.close()
            d.update()
            assert {k: s.getsockname() for k, s in d.socks.items()} == {
                "127.0.0.2": ("127.0.0.2", d.port), slp.MULTICAST: (slp.MULTICAST, d.port)}
        finally:
            d.close()
    _run(main)


def _da_advert(boot: int) -> bytes:
    url = b"service:directory-agent://127.0.0.3"
    body = (b"\0\0" + struct.pack(">I", boot) + struct.pack(">H", len(url)) + url
            + struct.pack(">H", 7) + b"DEFAULT" + b"\0\0" + b"\0\0" + b"\0")
    return creator.create_header(8, len(body), 0) + body


def test_directory_agent_registrations_are_bounded():
    """A configured DA gets the registration once; DAAdverts claiming reboots
    (new boot timestamps) make it register afresh at most once per MIN_FRESH,
    where each used to (a 71-byte datagram -> a registration per service); a
    DAAdvert from a host that is not configured gets nothing."""
    async def main() -> None:
        now = [100.0]
        da = _client("127.0.0.3")
        d = slpd.SlpDriver(_agent(), [f"127.0.0.3:{da.getsockname()[1]}"], port=0, clock=lambda: now[0])
        d.start()
        try:
            assert len(_drain(da)) == 1                       # the registration
            for boot in range(10, 16):
                da.sendto(_da_advert(boot), ("127.0.0.1", d.port))
            d._readable(d.socks["127.0.0.1"])
            assert d.handled == 6 and len(_drain(da)) == 1    # one fresh registration, one deferred
            now[0] += slpd.MIN_FRESH
            (timer,) = d.deferred.values()
            timer.cancel()
            d._deferred(("127.0.0.3", da.getsockname()[1]))
            assert len(_drain(da)) == 1
            spoof = _client("127.0.0.4")
            spoof.sendto(_da_advert(99), ("127.0.0.1", d.port))
            d._readable(d.socks["127.0.0.1"])
            assert _drain(spoof) == [] and list(d.agent.das) == ["127.0.0.3"]
        finally:
            d.close()
        assert len(_drain(da)) == 1                           # the deregistration
    _run(main)


def test_a_directory_agent_is_told_no_target_once_discovery_needs_chap(monkeypatch):
    """The front end's announcer (fetd_tcp.announce) passes the STML's
    discovery CHAP to the agent: the configured DA gets the open target's
    registration, then its deregistration when discovery_chap is set."""
    from fetd_tcp.announce import Announcer
    from fetd_tcp.portals import PortalSpec

    async def main() -> None:
        da = _client("127.0.0.3")
        monkeypatch.setenv("SCSI_TARGET_SLP_PORT", "0")
        target = types.SimpleNamespace(name=IQN, alias="a disk", access={})
        portals = [PortalSpec("127.0.0.1", 3260, 1)]
        discovery = {"slp": ["DEFAULT"], "slp_da": [f"127.0.0.3:{da.getsockname()[1]}"], "slp_auth": False}
        ann = Announcer(None, "fe")
        ann.update(types.SimpleNamespace(discovery=discovery, targets=[target]), portals)
        try:
            assert [struct.unpack_from(">BB", m)[1] for m in _drain(da)] == [slp.SRV_REG]
            closed = {**discovery, "chap": {"user": "u", "secret": "s" * 12}}
            ann.update(types.SimpleNamespace(discovery=closed, targets=[target]), portals)
            assert [struct.unpack_from(">BB", m)[1] for m in _drain(da)] == [slp.SRV_DEREG]
            assert ann.slp.agent.services("127.0.0.1") == []
        finally:
            await ann.close()
        assert _drain(da) == []     # nothing registered, nothing to take back
    _run(main)
