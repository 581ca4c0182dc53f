"""The STML dies under `scsi-target run` and is restarted: every I_T nexus
that outlived it hears POWER ON OCCURRED (06/29/01) on its next command,
once, because everything the old STML held is gone (a reservation without
APTPL, a RAM LU's data); an initiator that first logs in after the restart
hears nothing (docs/decisions/0247, 0006). Real processes: `scsi-target
run`, its supervisor's restart of a SIGKILLed STML, raw iSCSI sessions
(fetd_tcp) and the loopback client."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from fetd_loopback import LoopbackClient
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

TUR = bytes(6)
GOOD, CHECK_CONDITION = 0x00, 0x02
POWER_ON_OCCURRED = (0x06, 0x29, 0x01)
KEY = 0xA1B2


def prout(sa: int, rk: int = 0, sark: int = 0, type_: int = 0) -> tuple[bytes, bytes]:
    """PERSISTENT RESERVE OUT (CDB, parameter list), APTPL off."""
    return (struct.pack(">BBBxxIB", 0x5F, sa, type_, 24, 0),
            struct.pack(">QQ4xBx2x", rk, sark, 0))


def prin(r: RawInitiator, sa: int) -> bytes:
    status, sense, data = r.command(struct.pack(">BB5xHx", 0x5E, sa, 256), read=256)
    assert status == GOOD, sense
    return data


def sense_of(status: int, sense: bytes) -> tuple[int, int, int] | None:
    """None for GOOD, else (key, ASC, ASCQ) of fixed-format sense data."""
    if status == GOOD:
        return None
    assert status == CHECK_CONDITION and len(sense) >= 14, (status, sense)
    return (sense[2] & 0x0F, sense[12], sense[13])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scsi_target", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def ddir(tmp_short):
    return str(tmp_short())


def test_nexuses_that_outlive_the_stml_hear_power_on_occurred_and_new_ones_do_not(ddir):
    mark = os.urandom(512)
    with Target("--lun", "ram:4MiB", data_dir=ddir) as t:
        host, port = t.portals[0].rsplit(":", 1)
        isid = b"\x80" + os.urandom(5)
        a = RawInitiator(host, int(port), "iqn.2026-12.org.test:a", isid=isid)
        assert a.login(IQN).status_class == 0
        assert sense_of(*a.command(TUR)[:2]) is None        # a new nexus: no unit attention (0006)
        a.write16(7, mark)
        for cdb, params in (prout(0, sark=KEY), prout(1, rk=KEY, type_=1)):   # REGISTER; RESERVE WE
            status, sense, _ = a.command(cdb, write=params)
            assert status == GOOD, sense
        assert struct.unpack_from(">IIQ", prin(a, 1))[1:] == (16, KEY)      # READ RESERVATION: held
        with LoopbackClient(f"ipc://{ddir}/stml.sock", timeout=10) as c:
            assert c.execute(0, TUR).status == GOOD

            t.kill_stml()
            # the new STML serves, and fetd_tcp is attached to it again
            assert cli("wait-ready", "--data-dir", ddir, "--timeout", "30").returncode == 0, t.log()

            # the loopback client's link registers its nexus again, before the command: the same nexus
            r = c.execute(0, TUR)
            assert (r.sense_key, r.asc_ascq) == (0x06, (0x29, 0x01)), t.log()
            assert c.execute(0, TUR).status == GOOD
        # fetd_tcp ended the iSCSI session with the link; the initiator logs in
        # again with its ISID (as open-iscsi recovers a session): the same I_T nexus
        with pytest.raises(OSError):
            a.command(TUR)
        a.close()
        a = RawInitiator(host, int(port), "iqn.2026-12.org.test:a", isid=isid)
        assert a.login(IQN).status_class == 0
        assert sense_of(*a.command(TUR)[:2]) == POWER_ON_OCCURRED, t.log()
        assert sense_of(*a.command(TUR)[:2]) is None          # once: the next command proceeds
        assert a.read16(7, 1) == bytes(512)                   # the RAM LU came back blank
        assert prin(a, 1)[4:8] == bytes(4)                    # no reservation
        assert prin(a, 0)[4:8] == bytes(4)                    # no registration
        # an initiator that logs in only now: a new nexus, no unit attention
        b = RawInitiator(host, int(port), "iqn.2026-12.org.test:b")
        assert b.login(IQN).status_class == 0
        assert sense_of(*b.command(TUR)[:2]) is None
        # and `a` with another ISID is another I_T nexus: new as well
        a2 = RawInitiator(host, int(port), "iqn.2026-12.org.test:a")
        assert a2.login(IQN).status_class == 0
        assert sense_of(*a2.command(TUR)[:2]) is None
        for each in (a, b, a2):
            each.close()
