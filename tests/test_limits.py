"""Resource limits of the iSCSI front end (fetd_tcp/limits.py): login timeout, connections
per initiator address, sessions per target, the CmdSN window and FirstBurstLength."""
from __future__ import annotations

import socket
import struct
import time

import pytest

from fetd_tcp import login as L
from fetd_tcp import pdu as P
from fetd_tcp.limits import LimitError, Limits
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

from support import fuzzgen as G

ENV = {"SCSI_TARGET_LOGIN_TIMEOUT": "1", "SCSI_TARGET_MAX_CONN_PER_HOST": "4",
       "SCSI_TARGET_MAX_SESSIONS_PER_TARGET": "2"}


@pytest.fixture(scope="module")
def target():
    t = Target("--lun", "ram:16MiB", env=ENV)
    yield t
    t.stop()


def _answer_before_close(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """What the target sent on `sock` before it closed it (EOF or a reset). The
    timeout bounds the wait for a close that never comes; it measures nothing."""
    got = b""
    sock.settimeout(timeout)
    try:
        while piece := sock.recv(4096):
            got += piece
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the target did not close the connection in {timeout}s")
    return got


def _wait_sessions_gone() -> None:
    time.sleep(0.3)   # the target notices closed sockets at once; leave it a moment


def test_limits_from_env():
    assert Limits.from_env({}) == Limits()
    assert Limits.from_env({"SCSI_TARGET_LOGIN_TIMEOUT": "2.5"}).login_timeout == 2.5
    for bad in ("x", "0", "-1"):
        with pytest.raises(LimitError, match="SCSI_TARGET_MAX_CONN_PER_HOST"):
            Limits.from_env({"SCSI_TARGET_MAX_CONN_PER_HOST": bad})


def test_silent_connection_is_dropped(target):
    """A connection that never logs in does not keep its slot: the login timer closes it."""
    with socket.create_connection(G.host_port(target.portal)) as s:
        assert _answer_before_close(s) == b""


def test_one_byte_a_second_is_dropped(target):
    """The login timer bounds the whole login, not each read: a login request
    sent a byte at a time, four a second, is cut off before its 48-byte header
    is through (counted in bytes). A timer restarted by each byte, or the default
    15 s one in place of SCSI_TARGET_LOGIN_TIMEOUT=1, would let it all through."""
    req = P.LoginRequest(1, b"\x80" + bytes(5), 0, 0, 1, 0, csg=0, nsg=1, transit=True).encode()
    sent = 0
    with socket.create_connection(G.host_port(target.portal)) as s:
        try:
            for b in req[:P.BHS_LEN]:
                s.send(bytes([b]))
                sent += 1
                time.sleep(0.25)
        except OSError:
            pass     # the target closed it: the next send after its reset fails
        assert sent < P.BHS_LEN, "a login sent a byte at a time was never cut off"
        assert _answer_before_close(s) == b""


def test_connections_per_initiator_address(target):
    """The fifth connection from one address is refused at once: closed before
    the target reads a byte, so a whole login request sent on it gets no answer
    (a connection let in gets a login response, well before its login timer)."""
    _wait_sessions_gone()
    host, port = G.host_port(target.portal)
    refusals = target.log().count("too many connections")
    idle = [socket.create_connection((host, port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        with socket.create_connection((host, port)) as extra:
            req = P.LoginRequest(1, b"\x80" + bytes(5), 0, 0, 1, 0, csg=0, nsg=1, transit=True).encode()
            try:
                extra.sendall(req)
            except OSError:
                pass     # already closed
            assert _answer_before_close(extra) == b""
    finally:
        for s in idle:
            s.close()
    _wait_sessions_gone()
    G.healthy_io(target.portal)                    # the slots are free again
    assert target.log().count("too many connections") == refusals + 1


def test_sessions_per_target(target):
    _wait_sessions_gone()
    host, port = G.host_port(target.portal)
    a, b, c = (RawInitiator(host, port) for _ in range(3))
    try:
        assert a.login(IQN).status_class == 0
        assert b.login(IQN).status_class == 0
        r = c.login(IQN)
        assert (r.status_class << 8 | r.status_detail) == L.OUT_OF_RESOURCES
        # reinstating an existing session (same ISID) is not a new session
        d = RawInitiator(host, port, isid=a.isid)
        assert d.login(IQN).status_class == 0
        d.close()
    finally:
        for i in (a, b, c):
            i.close()
    _wait_sessions_gone()


def _read_lba(ini: RawInitiator, lba: int) -> bytes:
    return ini.read16(lba, 1)


def test_commands_beyond_max_cmd_sn_are_not_executed(target):
    _wait_sessions_gone()
    ini = RawInitiator(*G.host_port(target.portal))
    try:
        assert ini.login(IQN).status_class == 0
        ini.command(bytes(6))
        before = _read_lba(ini, 50)
        beyond = (ini.max_cmd_sn + 1) & 0xFFFFFFFF
        cdb = struct.pack(">BBQIBB", 0x8A, 0, 50, 1, 0, 0).ljust(16, b"\0")
        ini.send(P.ScsiCommand(0x777, P.LUN0, cdb, 512, beyond, ini.exp_stat_sn, write=True,
                               data_length=512), b"\xEE" * 512)
        # fill the window up to MaxCmdSN with harmless commands: the one beyond stays dead
        while ini.cmd_sn != beyond:
            ini.command(bytes(6))
        pdu, _ = ini.nop()
        assert isinstance(pdu, P.NopIn)
        ini.cmd_sn = beyond    # the target discarded it, so this CmdSN is free again
        assert _read_lba(ini, 50) == before
    finally:
        ini.close()


def test_unsolicited_data_is_bounded_by_first_burst_length(target):
    _wait_sessions_gone()
    ini = RawInitiator(*G.host_port(target.portal))
    try:
        r = ini.login(IQN, extra=[("InitialR2T", "No"), ("ImmediateData", "Yes"),
                                  ("FirstBurstLength", "4096"), ("MaxBurstLength", "65536"),
                                  ("MaxRecvDataSegmentLength", "65536")])
        assert r.status_class == 0
        fbl = int(ini.login_keys.get("FirstBurstLength", 4096))
        assert fbl == 4096
        ini.command(bytes(6))
        cdb = struct.pack(">BBQIBB", 0x8A, 0, 60, 32, 0, 0).ljust(16, b"\0")
        # immediate data beyond FirstBurstLength: Reject
        ini.send(P.ScsiCommand(0x900, P.LUN0, cdb, 16384, ini.cmd_sn, ini.exp_stat_sn, write=True,
                               final=False, data_length=8192), bytes(8192))
        pdu, _ = ini.recv()
        assert isinstance(pdu, P.Reject)
        ini.cmd_sn += 1          # a rejected command still consumed its CmdSN
        # unsolicited Data-Out past FirstBurstLength: the command fails, the session lives
        ini.send(P.ScsiCommand(0x901, P.LUN0, cdb, 16384, ini.cmd_sn, ini.exp_stat_sn, write=True,
                               final=False, data_length=4096), bytes(4096))
        ini.cmd_sn += 1
        ini.send(P.DataOut(0x901, P.RESERVED_TAG, 0, 4096, True, ini.exp_stat_sn, P.LUN0, 8192), bytes(8192))
        while True:
            pdu, _ = ini.recv()
            if isinstance(pdu, P.ScsiResponse):
                assert pdu.status == 0x02
                break
        G.healthy_io(target.portal)
        assert ini.nop()[0].__class__ is P.NopIn
    finally:
        ini.close()


# ---------------------------------------------------------------- security

def test_world_readable_config_with_secrets_draws_a_warning(tmp_path, capfd):
    from stml.config import load
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[[target]]\nname = "{IQN}"\nchap = {{user = "u", secret = "0123456789abcdef"}}\n'
                   '[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    cfg.chmod(0o644)
    load(str(cfg), str(tmp_path))
    err = capfd.readouterr().err
    assert "holds CHAP secrets" in err and "chmod 600" in err
    assert "0123456789abcdef" not in err              # the secret itself is never shown
    cfg.chmod(0o600)
    load(str(cfg), str(tmp_path))
    assert "warning" not in capfd.readouterr().err


def test_short_chap_secret_is_refused(tmp_path):
    from stml.config import ConfigError, load
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[[target]]\nname = "{IQN}"\nchap = {{user = "u", secret = "short"}}\n')
    cfg.chmod(0o600)
    with pytest.raises(ConfigError, match="12 to 255 bytes"):
        load(str(cfg), str(tmp_path))
