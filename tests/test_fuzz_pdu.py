"""Fuzzing the iSCSI front end: the sans-IO cores (codec, login machine, full feature
connection) with hypothesis, then a live target over raw sockets in every phase.
Bounded by example counts, derandomized: CI runs the same cases every time.
scripts/fuzz.py runs the same generators for as long as one wants."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import fuzzgen as G

PURE = settings(max_examples=400, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck))


@PURE
@given(st.one_of(G.mutated_pdu(), st.binary(max_size=120)))
def test_codec_raises_only_pdu_error(buf):
    G.run_decode(buf)


@PURE
@given(st.one_of(G.text_segments(), st.binary(max_size=200)))
def test_text_decoder_raises_only_pdu_error_and_round_trips(buf):
    G.run_text(buf)


@PURE
@given(G.login_stream())
def test_login_machine_answers_every_request(stream):
    G.run_login(stream)


@PURE
@given(G.conn_stream(), st.booleans())
def test_connection_raises_only_pdu_error(stream, discovery):
    G.run_connection(stream, discovery)


@PURE
@given(G.conn_stream(), st.sampled_from([1, 2]))
def test_connection_with_error_recovery_raises_only_pdu_error(stream, erl):
    """SNACKs, TASK REASSIGN, Logout for recovery and acknowledgements fuzzed at ERL 1 and 2."""
    G.run_connection(stream, erl=erl)


# ---------------------------------------------------------------- live target, raw sockets

import struct  # noqa: E402

import pytest  # noqa: E402

from fetd_tcp import login as L  # noqa: E402
from fetd_tcp import pdu as P  # noqa: E402
from support.rawiscsi import RawInitiator  # noqa: E402
from support.target import IQN, Target  # noqa: E402

LIVE = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live():
    t = Target("--lun", "ram:32MiB", "--lun", "ram:8MiB", env={"SCSI_TARGET_LOGIN_TIMEOUT": "3"})
    yield t
    t.stop()


def check(t: Target) -> None:
    assert t.proc.poll() is None, t.log()
    G.healthy_io(t.portal)
    G.healthy_io(t.portal, lun=1)
    assert "internal error" not in t.log() and "Traceback" not in t.log(), t.log()[-4000:]


def test_live_login_phase(live):
    @LIVE
    @given(G.login_stream())
    def run(stream):
        G.raw_exchange(live.portal, None, stream)
    run()
    check(live)


def test_live_discovery_phase(live):
    def disc(ini):
        assert ini.login(None, "Discovery").status_class == 0

    @LIVE
    @given(G.conn_stream())
    def run(stream):
        G.raw_exchange(live.portal, disc, stream)
    run()
    check(live)


def test_live_full_feature_phase(live):
    def normal(ini):
        assert ini.login(IQN).status_class == 0

    @settings(LIVE, max_examples=400)
    @given(G.conn_stream())
    def run(stream):
        G.raw_exchange(live.portal, normal, stream)
    run()
    check(live)


def _session(t: Target) -> RawInitiator:
    ini = RawInitiator(*G.host_port(t.portal))
    assert ini.login(IQN).status_class == 0
    ini.command(bytes(6))
    return ini


def test_lying_data_segment_length_and_oversized_segments(live):
    ini = _session(live)
    mrdsl = int(ini.login_keys.get("MaxRecvDataSegmentLength", 8192))
    # a segment larger than the MaxRecvDataSegmentLength we declared: the connection is dropped
    ini.send(P.NopOut(99, P.RESERVED_TAG, ini.cmd_sn, ini.exp_stat_sn, immediate=True,
                      data_length=mrdsl + 4), bytes(mrdsl + 4))
    with pytest.raises((ConnectionError, OSError)):
        while True:
            ini.recv()
    ini.close()
    # a header claiming 16 MiB of data, then silence and EOF
    ini = _session(live)
    hdr = bytearray(P.NopOut(98, P.RESERVED_TAG, ini.cmd_sn, ini.exp_stat_sn, immediate=True).encode())
    hdr[5:8] = (0xFFFFFF).to_bytes(3, "big")
    ini.sock.sendall(bytes(hdr) + bytes(100))
    with pytest.raises((ConnectionError, OSError)):
        while True:
            ini.recv()
    ini.close()
    # TotalAHSLength on a NOP-Out (AHS only on SCSI Command): rejected or dropped
    G.raw_exchange(live.portal, lambda i: i.login(IQN),
                   [bytes([0x40]) + bytes(3) + bytes([255]) + bytes(43) + bytes(1020)])
    check(live)


def test_data_out_for_unknown_itt_and_cmdsn_outside_window(live):
    ini = _session(live)
    for itt in (0x1234, P.RESERVED_TAG, 0):
        ini.send(P.DataOut(itt, 7, 0, 0, True, ini.exp_stat_sn, P.LUN0, 512), bytes(512))
    # a WRITE far outside the window: discarded, never executed
    lba = 100
    marker = b"\xAB" * 512
    cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, 1, 0, 0)
    for sn in (ini.cmd_sn + 1000, ini.cmd_sn - 5 & 0xFFFFFFFF, ini.cmd_sn + (1 << 31)):
        ini.send(P.ScsiCommand(0x500 + sn % 100, P.LUN0, cdb.ljust(16, b"\0"), 512, sn, ini.exp_stat_sn,
                               write=True, data_length=512), marker)
    pdu, _ = ini.nop(b"ping")   # the session is alive and in order
    assert isinstance(pdu, P.NopIn)
    assert ini.read16(lba, 1) != marker
    ini.close()
    check(live)


def test_malformed_logins(live):
    host, port = G.host_port(live.portal)

    def login_raw(data: bytes, cont: bool = False) -> P.LoginResponse:
        ini = RawInitiator(host, port)
        try:
            ini.send(P.LoginRequest(1, ini.isid, 0, 0, 1, 0, csg=0, nsg=1, transit=not cont, cont=cont,
                                    data_length=len(data)), data)
            return ini.recv()[0]
        finally:
            ini.close()

    base = [("InitiatorName", "iqn.2026-11.org.test:m"), ("TargetName", IQN), ("AuthMethod", "None")]
    # non-UTF-8 value, key without '=', overlong key, duplicate keys
    for data in (P.encode_text(base) + b"X-bad=\xff\xfe\0", P.encode_text(base) + b"junk\0",
                 P.encode_text(base) + b"K" * 70 + b"=1\0",
                 P.encode_text(base + [("MaxBurstLength", "512"), ("MaxBurstLength", "1024")]),
                 P.encode_text(base[:1] + [("TargetName", "iqn.2026-11.nope:x")])):
        r = login_raw(data)
        assert r.status_class != 0, data
    # a huge key list: thousands of keys in one segment, then beyond MAX_LOGIN_TEXT with C bit
    r = login_raw(P.encode_text(base + [(f"X-k{i}", "v" * 20) for i in range(2000)]))
    assert r.status_class in (0, 2)
    ini = RawInitiator(host, port)
    try:
        chunk = P.encode_text([(f"X-k{i}", "v" * 200) for i in range(40)])
        status = None
        for _ in range(L.MAX_LOGIN_TEXT // len(chunk) + 3):
            ini.send(P.LoginRequest(1, ini.isid, 0, 0, 1, ini.exp_stat_sn, csg=0, nsg=1, cont=True,
                                    data_length=len(chunk)), chunk)
            r, _ = ini.recv()
            if r.status_class:
                status = r.status_class << 8 | r.status_detail
                break
        assert status == L.OUT_OF_RESOURCES
    finally:
        ini.close()
    check(live)
