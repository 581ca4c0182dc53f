"""PDU codec: round trips for every opcode, wire layout spot checks, text."""

import struct

import pytest
from hypothesis import given, strategies as st

from fetd_tcp import digest, pdu
from fetd_tcp.pdu import PDUError

LUN3 = pdu.int_to_lun(3)

SAMPLES = [
    pdu.NopOut(itt=1, ttt=0xFFFFFFFF, cmd_sn=5, exp_stat_sn=6, lun=LUN3, immediate=True,
               data_length=12),
    pdu.ScsiCommand(itt=7, lun=LUN3, cdb=bytes(range(16)), expected_length=4096, cmd_sn=9,
                    exp_stat_sn=10, read=True, attr=pdu.ATTR_ORDERED, data_length=0),
    pdu.ScsiCommand(itt=8, lun=LUN3, cdb=bytes(range(32)), expected_length=512, cmd_sn=9,
                    exp_stat_sn=10, read=True, write=True, bidi_read_length=1024,
                    immediate=True, final=False, data_length=100),
    pdu.TaskMgmtRequest(itt=2, function=pdu.TMF_ABORT_TASK, lun=LUN3, rtt=7, cmd_sn=3,
                        exp_stat_sn=4, ref_cmd_sn=9, exp_data_sn=2, immediate=True),
    pdu.LoginRequest(itt=3, isid=b"\x80\x01\x02\x03\x04\x05", tsih=0x1234, cid=7, cmd_sn=1,
                     exp_stat_sn=2, csg=1, nsg=3, transit=True, cont=False, version_max=0,
                     version_min=0, data_length=300),
    pdu.TextRequest(itt=4, ttt=0x55, cmd_sn=8, exp_stat_sn=9, final=False, cont=True,
                    lun=LUN3, immediate=True, data_length=17),
    pdu.DataOut(itt=5, ttt=0x66, data_sn=3, buffer_offset=8192, final=True, exp_stat_sn=11,
                lun=LUN3, data_length=8192),
    pdu.LogoutRequest(itt=6, reason=1, cid=3, cmd_sn=4, exp_stat_sn=5, immediate=True),
    pdu.Snack(itt=9, snack_type=1, ttt=0x77, exp_stat_sn=3, beg_run=4, run_length=5,
              lun=LUN3),
    pdu.NopIn(itt=1, ttt=2, stat_sn=3, exp_cmd_sn=4, max_cmd_sn=5, lun=LUN3, data_length=8),
    pdu.ScsiResponse(itt=1, status=2, stat_sn=3, exp_cmd_sn=4, max_cmd_sn=5, response=0,
                     exp_data_sn=6, residual_count=7, overflow=False, underflow=True,
                     bidi_residual_count=8, bidi_overflow=True, bidi_underflow=False,
                     snack_tag=9, data_length=20),
    pdu.TaskMgmtResponse(itt=1, response=pdu.TMF_RESP_NO_TASK, stat_sn=2, exp_cmd_sn=3,
                         max_cmd_sn=4),
    pdu.TaskMgmtResponse(itt=1, response=pdu.TMF_RESP_SUCCEEDED, stat_sn=2, exp_cmd_sn=3,
                         max_cmd_sn=4, info=bytes([0x16, 0x29, 0x07])),
    pdu.LoginResponse(itt=1, isid=b"\x40" + bytes(5), tsih=9, stat_sn=2, exp_cmd_sn=3,
                      max_cmd_sn=4, csg=0, nsg=1, transit=True, cont=True, status_class=2,
                      status_detail=1, version_max=0, version_active=0, data_length=44),
    pdu.TextResponse(itt=1, ttt=2, stat_sn=3, exp_cmd_sn=4, max_cmd_sn=5, final=False,
                     cont=True, lun=LUN3, data_length=9),
    pdu.DataIn(itt=1, data_sn=2, buffer_offset=3, exp_cmd_sn=4, max_cmd_sn=5, final=True,
               status=0, stat_sn=6, residual_count=7, overflow=True, underflow=False,
               ack=True, ttt=8, lun=LUN3, data_length=512),
    pdu.DataIn(itt=1, data_sn=0, buffer_offset=0, exp_cmd_sn=4, max_cmd_sn=5,
               data_length=512),
    pdu.LogoutResponse(itt=1, response=0, stat_sn=2, exp_cmd_sn=3, max_cmd_sn=4,
                       time2wait=2, time2retain=20),
    pdu.R2T(itt=1, ttt=2, stat_sn=3, exp_cmd_sn=4, max_cmd_sn=5, r2t_sn=6,
            buffer_offset=65536, desired_length=262144, lun=LUN3),
    pdu.AsyncMessage(event=pdu.ASYNC_LOGOUT_REQUEST, stat_sn=1, exp_cmd_sn=2, max_cmd_sn=3,
                     lun=LUN3, vcode=4, parameter1=5, parameter2=6, parameter3=7,
                     data_length=20),
    pdu.Reject(reason=pdu.REJECT_PROTOCOL_ERROR, stat_sn=1, exp_cmd_sn=2, max_cmd_sn=3,
               data_sn=4),
]


def split(header):
    return header[:48], header[48:]


@pytest.mark.parametrize("p", SAMPLES, ids=lambda p: type(p).__name__)
def test_round_trip(p):
    hdr = p.encode()
    assert len(hdr) % 4 == 0
    bhs, ahs = split(hdr)
    info = pdu.parse_bhs(bhs)
    assert info.opcode == pdu.OPCODES[type(p)]
    assert info.ahs_length == len(ahs)
    assert info.data_length == getattr(p, "data_length", 0)
    assert pdu.decode_pdu(memoryview(bhs), ahs) == p


def test_every_opcode_has_a_sample():
    assert {pdu.OPCODES[type(p)] for p in SAMPLES} == set(pdu._DECODERS) | {pdu.SCSI_COMMAND}
    assert set(pdu.OPCODES) == {type(p) for p in SAMPLES}


def test_the_pdu_table_says_who_sends_each_type():
    """One row per type (RFC 7143 11.2.1.2: initiator opcodes are below 0x20),
    and decode_pdu takes AHS only where the row allows it."""
    for t in pdu.PDU_TYPES.values():
        assert (t.opcode < 0x20) == (t.sender == pdu.INITIATOR), t.name
        assert pdu.OPCODES[t.cls] == t.opcode and t.name == t.cls.__name__
    assert pdu.INITIATOR_OPCODES == {t.opcode for t in pdu.PDU_TYPES.values() if t.sender == pdu.INITIATOR}
    nop = bytearray(pdu.NopOut(itt=1).encode())
    nop[4] = 1                                   # TotalAHSLength 1: 4 bytes of AHS
    with pytest.raises(PDUError) as e:
        pdu.decode_pdu(bytes(nop), bytes(4))
    assert e.value.reject_reason == pdu.REJECT_INVALID_PDU_FIELD


def test_scsi_command_layout():
    cdb = bytes([0x28, 0, 0, 0, 0, 0x10, 0, 0, 8, 0])
    hdr = pdu.ScsiCommand(itt=0x11223344, lun=LUN3, cdb=cdb, expected_length=4096, cmd_sn=1,
                          exp_stat_sn=2, read=True).encode()
    assert hdr[0] == 0x01 and hdr[1] == 0x80 | 0x40 | 1
    assert hdr[8:16] == b"\0\x03" + bytes(6)
    assert hdr[16:20] == b"\x11\x22\x33\x44"
    assert struct.unpack(">I", hdr[20:24])[0] == 4096
    assert hdr[32:48] == cdb + bytes(6)
    cmd = pdu.decode_pdu(hdr)
    assert cmd.cdb[:10] == cdb and cmd.immediate is False and cmd.final


def test_extended_cdb_ahs_layout():
    hdr = pdu.ScsiCommand(itt=1, lun=LUN3, cdb=bytes(range(32)), expected_length=0,
                          cmd_sn=1, exp_stat_sn=1).encode()
    assert hdr[4] == 5  # 20 bytes: 4-byte AHS header + 16 CDB bytes
    assert hdr[48:52] == b"\x00\x11\x01\x00"


def test_data_in_bits():
    hdr = pdu.DataIn(itt=1, data_sn=0, buffer_offset=0, exp_cmd_sn=1, max_cmd_sn=2,
                     final=True, status=0x02, underflow=True, residual_count=5).encode()
    assert hdr[1] == 0x80 | 0x02 | 0x01 and hdr[3] == 0x02
    assert pdu.decode_pdu(hdr).status == 0x02


def test_login_layout():
    hdr = pdu.LoginRequest(itt=9, isid=b"\x00\x02\x3d\x00\x00\x01", tsih=0, cid=1, csg=0,
                           nsg=1, transit=True, data_length=3).encode()
    assert hdr[0] == 0x43 and hdr[1] == 0x81 and hdr[5:8] == b"\0\0\3"
    assert hdr[20:22] == b"\0\1"


def test_bhs_remaining():
    info = pdu.parse_bhs(pdu.DataOut(itt=1, ttt=2, data_sn=0, buffer_offset=0,
                                     data_length=5).encode())
    assert info.remaining(False, False) == 8
    assert info.remaining(True, True) == 16
    assert info.final and not info.immediate


@pytest.mark.parametrize("opcode", [0x07, 0x11, 0x1F, 0x27, 0x3C])
def test_reserved_opcode(opcode):
    with pytest.raises(PDUError) as e:
        pdu.decode_pdu(bytes([opcode]) + bytes(47))
    assert e.value.reject_reason == pdu.REJECT_COMMAND_NOT_SUPPORTED


def test_wrong_lengths():
    with pytest.raises(PDUError):
        pdu.decode_pdu(bytes(47))
    with pytest.raises(PDUError):
        pdu.parse_bhs(bytes(10))
    with pytest.raises(PDUError):  # TotalAHSLength 1 but no AHS
        pdu.decode_pdu(bytes([1, 0x80, 0, 0, 1]) + bytes(43))
    with pytest.raises(PDUError):  # AHS on a Data-Out
        pdu.decode_pdu(bytes([5, 0x80, 0, 0, 1]) + bytes(43), bytes(4))
    with pytest.raises(PDUError):  # AHSLength running past the end
        pdu.decode_pdu(bytes([1, 0x80, 0, 0, 1]) + bytes(43), b"\x00\x09\x01\x00")
    with pytest.raises(PDUError):
        pdu.NopIn(1, 2, 3, 4, 5, data_length=1 << 24).encode()


@given(st.binary(min_size=48, max_size=48), st.binary(max_size=16))
def test_decode_only_raises_pdu_error(bhs, ahs):
    ahs = ahs[:len(ahs) & ~3]
    bhs = bhs[:4] + bytes([len(ahs) // 4]) + bhs[5:]
    try:
        p = pdu.decode_pdu(bhs, ahs)
    except PDUError:
        return
    assert len(p.encode()) >= 48


def test_lun_helpers():
    assert pdu.lun_to_int(pdu.int_to_lun(0)) == 0
    assert pdu.lun_to_int(pdu.int_to_lun(255)) == 255
    assert pdu.int_to_lun(300)[:2] == b"\x41\x2c"
    assert pdu.lun_to_int(pdu.int_to_lun(300)) == 300
    assert pdu.lun_to_int(b"\x01\x00" + bytes(6)) is None  # bus number
    assert pdu.lun_to_int(b"\x00\x01\x00\x02" + bytes(4)) is None  # second level
    assert pdu.lun_to_int(b"\xc0" + bytes(7)) is None


def test_sense_and_residual():
    seg = pdu.sense_segment(b"\x70" + bytes(17))
    assert seg[:2] == b"\x00\x12"
    assert pdu.decode_sense_segment(seg) == b"\x70" + bytes(17)
    with pytest.raises(PDUError):
        pdu.decode_sense_segment(b"\x00\x20\x70")
    assert pdu.residual(4096, 1024) == (3072, False, True)
    assert pdu.residual(512, 1024) == (512, True, False)
    assert pdu.residual(512, 512) == (0, False, False)


def test_text_round_trip():
    pairs = [("InitiatorName", "iqn.1993-08.org.debian:01:abc"), ("X-com.ex_k", "ü=1")]
    data = pdu.encode_text(pairs)
    assert data.endswith(b"\0") and data.count(b"\0") == 2
    assert pdu.decode_text(data + b"\0\0") == pairs
    assert pdu.decode_text(b"") == []


@pytest.mark.parametrize("bad", [b"NoEquals\0", b"=v\0", b"K" * 64 + b"=v\0",
                                 b"Key=" + b"v" * 8193 + b"\0", b"Key=\xff\0",
                                 b"Ke y=v\0"])
def test_text_malformed(bad):
    with pytest.raises(PDUError):
        pdu.decode_text(bad)


def test_digest_vectors():
    assert digest.digest(bytes(32)) == bytes.fromhex("aa36918a")
    assert digest.digest(b"\xff" * 32) == bytes.fromhex("43aba862")
    assert digest.digest(bytes(16), bytes(16)) == digest.digest(bytes(32))
    asc = bytes(range(32))
    assert digest.crc32c(asc) == 0x46DD794E  # RFC 3720 B.4 incrementing bytes
    pad = digest.padding(5)
    assert pad == b"\0\0\0" and digest.padding(4) == b""
    dg = digest.digest(b"abcde", pad)   # the data digest covers the padding
    assert dg == digest.digest(b"abcde\0\0\0")
    assert digest.check(dg, [b"abcde", pad])


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 255), st.integers(0, 0xFFFFFFFF), st.booleans(), st.booleans(),
       st.integers(0, 0xFFFFFF))
def test_the_hot_response_headers_are_the_pdus_bytes(itt, sn, resid, status, dsn, over, under, n):
    """The session packs its usual Data-In and SCSI Response from the fields
    (encode_data_in_status, encode_data_in, encode_scsi_status, and
    encode_read_done for a read's only Data-In): the same bytes as the PDUs'."""
    assert pdu.encode_data_in_status(itt, dsn, sn, sn ^ 1, status, sn ^ 2, resid, over, under,
                                     LUN3, n) == \
        pdu.DataIn(itt, dsn, 0, sn, sn ^ 1, True, status, sn ^ 2, resid, over, under,
                   lun=LUN3, data_length=n).encode()
    assert pdu.encode_data_in_status(itt, dsn, sn, sn ^ 1, status, sn ^ 2, resid, over, under,
                                     LUN3, n, resid ^ 3) == \
        pdu.DataIn(itt, dsn, resid ^ 3, sn, sn ^ 1, True, status, sn ^ 2, resid, over, under,
                   lun=LUN3, data_length=n).encode()
    assert pdu.encode_data_in(itt, dsn, resid, sn, sn ^ 1, over, LUN3, n) == \
        pdu.DataIn(itt, dsn, resid, sn, sn ^ 1, over, lun=LUN3, data_length=n).encode()
    assert pdu.encode_scsi_status(itt, status, sn, sn ^ 1, sn ^ 2, dsn, resid, over, under) == \
        pdu.ScsiResponse(itt, status, sn, sn ^ 1, sn ^ 2, exp_data_sn=dsn, residual_count=resid,
                         overflow=over, underflow=under).encode()
    assert pdu.encode_read_done(itt, sn, sn ^ 1, sn ^ 2, LUN3, n) == \
        pdu.DataIn(itt, 0, 0, sn, sn ^ 1, True, 0, sn ^ 2, lun=LUN3, data_length=n).encode()
