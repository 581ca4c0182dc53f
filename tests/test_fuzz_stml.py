"""Fuzzing the STML: random CDBs (every opcode, random fields and parameter lists)
through fetd_loopback, and malformed ZeroMQ contract messages straight at its socket.
Every command gets a status in time; the STML never dies and keeps serving."""
from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import fuzzgen as G

LIVE = settings(max_examples=1500, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_stml(tmp_short_module):
    from support.target import StmlProcess
    p = StmlProcess(tmp_short_module(), ("ram:16MiB", "ram:4MiB,bs=4096", f"file:{tmp_short_module()}/f.img,size=8MiB"))
    p.start()
    yield p
    p.stop()


def _healthy(stml, client_factory) -> None:
    assert stml.alive(), stml.log()
    c = client_factory(stml.endpoint)
    data = bytes(range(256)) * 2
    c.write(0, 7, data)
    assert c.read(0, 7, 1) == data


def test_every_opcode_gets_a_status(fuzz_stml, client_factory):
    """Each of the 256 opcodes with a zero body and with an all-ones body."""
    c = client_factory(fuzz_stml.endpoint)
    for op in range(256):
        for fill in (0x00, 0xFF):
            for n in (6, 10, 16):
                cdb = bytes([op]) + bytes([fill]) * (n - 1)
                G.run_cdb(c, (cdb, b"", 0 if fill else 512), 0)
    _healthy(fuzz_stml, client_factory)


def test_random_cdbs_and_parameter_lists(fuzz_stml, client_factory):
    c = client_factory(fuzz_stml.endpoint)

    @LIVE
    @given(G.random_cdb(), st.integers(0, 3))
    def run(case, lun):
        G.run_cdb(c, case, lun)

    run()
    _healthy(fuzz_stml, client_factory)


def test_malformed_contract_messages(fuzz_stml, client_factory):
    poker = G.ZmqPoker(fuzz_stml.endpoint)

    @settings(LIVE, max_examples=700)
    @given(G.zmq_messages())
    def run(frames):
        G.run_zmq(poker, frames)

    try:
        run()
        poker.drain()
    finally:
        poker.close()
    _healthy(fuzz_stml, client_factory)
    assert "Traceback" not in fuzz_stml.log(), fuzz_stml.log()[-3000:]


@pytest.fixture(scope="module")
def abuse_stml(tmp_short_module):
    """A 1 GiB thin file LUN (whole-LUN work would show as a GiB of memory) and a RAM LUN."""
    from support.target import StmlProcess
    d = tmp_short_module()
    p = StmlProcess(d, (f"file:{d}/big.img,size=1GiB", "ram:32MiB"))
    p.start()
    yield p
    p.stop()


LUN_BLOCKS = {0: (1 << 30) // 512, 1: (32 << 20) // 512}


def test_resource_abuse(abuse_stml, client_factory):
    """Legal commands with the largest lengths and counts their fields allow:
    each gets a status and the STML's memory stays bounded by what any one
    request may legitimately hold, never by the LUN's size or the field's value."""
    c = client_factory(abuse_stml.endpoint, timeout=60)
    limit = G.rss(abuse_stml.pid) + (32 << 20) + (128 << 20)

    @settings(max_examples=150, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 1).flatmap(lambda lun: st.tuples(st.just(lun), G.abusive_cdb(LUN_BLOCKS[lun]))))
    def run(drawn):
        lun, case = drawn
        if case[0] == "sanitize":
            lun = 1   # SANITIZE overwrites the whole medium by definition: only the RAM LUN here
        G.run_abuse(c, case, lun, abuse_stml.pid, limit)

    run()
    _healthy(abuse_stml, client_factory)
