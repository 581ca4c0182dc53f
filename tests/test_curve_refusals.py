"""A CURVE handshake that fails is retried every few seconds, forever: both
ends say it once, again when the outcome changes, not once a try
(decision 0703), a wrong server key too (0709: the STML's socket monitor).
In-process: a ZeroMQ ROUTER with the STML's ZAP handler and handshake watch
(stml.roles) in the STML's Channel on loopback, and a FrontEndLink retrying
quickly."""
from __future__ import annotations

import asyncio
import logging

import zmq

from stml import roles
from stml.api import FrontEndLink
from stml.api.zmq_carrier import Channel
from stml.roles import FRONT_END, CurveAllowList, FailedHandshakes, RoleAuthenticator, accepted_peer

TRIES = 4


class Handler:
    def detect(self, detect) -> None: ...
    def nexus_ready(self, nexus, error) -> None: ...
    def rdy_to_xfer(self, tag, offset, length) -> None: ...
    def xmit_response(self, tag, status, sense, resid, data) -> None: ...
    def task_mgmt_fn_done(self, tag, response, aborted, info=b"") -> None: ...
    def report_aen(self, nexus, lun, sense) -> None: ...
    def link_lost(self) -> None: ...


def lines(caplog, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


def run(caplog, *, admitted: bool, wrong_server: bool = False, admit_after: int | None = None) -> dict:
    """A link with its own key tries an STML that admits it or not; returns
    what the STML received (the registration, once admitted) and the tries."""
    caplog.set_level(logging.INFO)
    ctx = zmq.Context()
    server_public, server_secret = zmq.curve_keypair()
    own_public, own_secret = zmq.curve_keypair()
    allow = CurveAllowList({own_public: (FRONT_END, "test")} if admitted else {})
    auth = RoleAuthenticator(ctx, allow)
    auth.start()
    router = ctx.socket(zmq.ROUTER)
    router.curve_secretkey, router.curve_publickey, router.curve_server = server_secret, server_public, True
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    result: dict = {}

    handshakes = FailedHandshakes(server_public.decode(), accepted_peer)

    async def main() -> None:
        channel = Channel(router, lambda frames: result.setdefault("registered", frames), routed=True)
        channel.watch_connections(lambda fd: None, handshakes.event)
        curve = {"secret": own_secret, "public": own_public,
                 "server": zmq.curve_keypair()[0] if wrong_server else server_public}
        link = FrontEndLink(endpoint, "iscsi", Handler(), context=ctx, curve=curve, heartbeat_ms=60000)
        link.handshake_retry = 0.02
        link.start()
        tries = 0
        for _ in range(2000):   # (a bound for a broken build: the test waits for counts)
            refused = link._handshake_refused or {}
            tries = refused.get(endpoint, ("", 0))[1]
            if admit_after is not None and tries >= admit_after and own_public not in allow.keys:
                allow.keys[own_public] = (FRONT_END, "test")
            if "registered" in result:
                break
            said = handshakes.said.get(endpoint, ("", None, 0))[2]
            if admit_after is None and tries >= TRIES and (not wrong_server or said >= TRIES):
                break
            await asyncio.sleep(0.01)
        result["tries"] = tries
        result["stml_failures"] = handshakes.said.get(endpoint, ("", None, 0))[2]
        watch = link._monitor
        await link.close()
        result["watch_left_open"] = watch is not None and not watch[0].closed
        router.disable_monitor()   # (the Channel's close would close the router, closed below)

    try:
        asyncio.run(main())
    finally:
        router.close(0)
        auth.stop()
        ctx.destroy(linger=0)   # (a refused socket's delayed close may still be pending)
    return result


def test_a_refused_key_is_said_once_by_each_end(caplog):
    result = run(caplog, admitted=False)
    assert result["tries"] >= TRIES and "registered" not in result
    assert lines(caplog, "refused our key; retrying every") == 1
    assert lines(caplog, "refused a peer with unknown CURVE key") == 1


def test_a_wrong_server_key_is_said_once_by_each_end(caplog):
    """The STML said nothing (the handshake fails before ZAP is asked): its
    socket monitor now says it once, with its own key (0709)."""
    result = run(caplog, admitted=True, wrong_server=True)
    assert result["tries"] >= TRIES and "registered" not in result
    assert result["stml_failures"] >= TRIES
    assert lines(caplog, "failed the CURVE handshake (wrong server key?)") == 1
    assert lines(caplog, "failed the CURVE handshake on tcp://127.0.0.1:") == 1
    assert lines(caplog, "its server key is not this STML's public key") == 1
    assert lines(caplog, "still failing CURVE handshakes") == 0


def test_a_failed_handshake_is_said_again_on_a_change_and_every_so_many(caplog):
    """The STML's watch counts failures, not time: said once per endpoint,
    again when the peer or the reason changes, and at every REFUSAL_REMIND
    failures in a row; a connection whose handshake passed says nothing,
    and what it keeps of connections is bounded."""
    caplog.set_level(logging.INFO)
    ep = "tcp://10.0.0.1:3300"
    peers = {7: "10.0.0.9", 8: None, 9: "10.0.0.8"}   # fd 8: a peer gone before it was read
    watch = FailedHandshakes("KEY", lambda fd, endpoint: peers.get(fd))

    def fail(fd: int, code: int = zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC) -> None:
        watch.event(zmq.EVENT_ACCEPTED, fd, ep)
        watch.event(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, code, ep)
        watch.event(zmq.EVENT_DISCONNECTED, fd, ep)
    for n in range(2 * roles.REFUSAL_REMIND):
        fail(7 if n % 2 else 8)                                   # one peer, its address read or not
    assert lines(caplog, f"a peer at an address gone before it was read failed the CURVE handshake on {ep}: "
                         f"its server key is not this STML's public key KEY") == 1   # the first
    assert lines(caplog, "a peer at 10.0.0.9 failed") == 0       # read later: the same peer, no change
    assert lines(caplog, f"still failing CURVE handshakes on {ep} (a peer at 10.0.0.9, ") == 2   # 120th, 240th
    watch.event(zmq.EVENT_ACCEPTED, 9, ep)                        # a handshake that passed: silence
    watch.event(zmq.EVENT_DISCONNECTED, 9, ep)
    fail(9)                                                       # another peer
    assert lines(caplog, "a peer at 10.0.0.8 failed the CURVE handshake on tcp://10.0.0.1:3300: its server") == 1
    fail(9, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)           # another reason
    assert lines(caplog, "a peer at 10.0.0.8 failed the CURVE handshake on tcp://10.0.0.1:3300: it does "
                         "not use CURVE") == 1
    assert len([r for r in caplog.records if "CURVE handshake" in r.getMessage()]) == 5
    for fd in range(roles.REFUSED_KEYS_KEPT + 10):                # accepted, their ends never heard
        watch.event(zmq.EVENT_ACCEPTED, 100 + fd, ep)
    assert len(watch.peers) <= roles.REFUSED_KEYS_KEPT


def test_a_key_admitted_later_is_said_once_it_passes(caplog):
    result = run(caplog, admitted=False, admit_after=TRIES)
    assert "registered" in result and not result["watch_left_open"]
    assert lines(caplog, "refused our key; retrying every") == 1
    assert lines(caplog, "refused a peer with unknown CURVE key") == 1
    assert lines(caplog, "completed the CURVE handshake after") == 1
    assert lines(caplog, "admitted after") == 1


def test_the_reminder_comes_every_so_many_refusals(caplog):
    """Counted in refusals, not time: the STML's allow list's 120th refusal
    of a key is said again, the 119 between are not."""
    caplog.set_level(logging.INFO)
    allow = CurveAllowList({})
    key = zmq.curve_keypair()[0]
    assert [allow.callback("*", key) for _ in range(240)] == [False] * 240
    assert lines(caplog, "refused a peer with unknown CURVE key") == 1
    assert lines(caplog, "still refusing CURVE key") == 2
