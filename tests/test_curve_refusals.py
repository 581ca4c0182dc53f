"""A CURVE handshake that fails is retried every few seconds, forever: both
ends say it once, again when the outcome changes, not once a try
(decision 0703). In-process: a ZeroMQ ROUTER with the STML's ZAP handler
(stml.roles) on loopback, and a FrontEndLink retrying quickly."""
from __future__ import annotations

import asyncio
import logging

import zmq

from stml.api import FrontEndLink
from stml.roles import FRONT_END, CurveAllowList, RoleAuthenticator

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

    async def main() -> None:
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
            if router.poll(0):
                result["registered"] = router.recv_multipart()
                break
            if admit_after is None and tries >= TRIES:
                break
            await asyncio.sleep(0.01)
        result["tries"] = tries
        watch = link._monitor
        await link.close()
        result["watch_left_open"] = watch is not None and not watch[0].closed

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


def test_a_wrong_server_key_is_said_once(caplog):
    result = run(caplog, admitted=True, wrong_server=True)
    assert result["tries"] >= TRIES and "registered" not in result
    assert lines(caplog, "failed the CURVE handshake (wrong server key?)") == 1


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
