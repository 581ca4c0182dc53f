"""An I_T nexus the target lost without its initiator asking hears I_T NEXUS
LOSS OCCURRED (06/29/07) on the first command of each LU when it logs in
again with the same ISID, once; its RESERVE(6) is gone; one that logged out,
and a new one, hear nothing (docs/decisions/0234). Real processes: `scsi-target
run` on a fixed loopback port (a restarted fetd_tcp listens on it again), raw
iSCSI sessions, fetd_tcp's connection reset, SIGKILLed, and stopped past its
heartbeats; and fetd_tcp against a fake STML that holds a login's nexus_ready
(docs/decisions/0236)."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Callable

import pytest

from stml.api import CONTRACT_VERSION
from support import fuzzgen as G
from support.fakestml import FakeStml
from support.procs import children_by_module, free_port, stop_pid
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

TUR = bytes(6)
RESERVE6, RELEASE6 = bytes([0x16, 0, 0, 0, 0, 0]), bytes([0x17, 0, 0, 0, 0, 0])
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
NEXUS_LOSS = (0x06, 0x29, 0x07)


def told(ini: RawInitiator, lun: int, cdb: bytes = TUR) -> tuple[int, int, int] | int | None:
    """None for GOOD, (key, ASC, ASCQ) for CHECK CONDITION, else the status."""
    status, sense, _ = ini.command(cdb, lun)
    if status == CHECK_CONDITION:
        return (sense[2] & 0x0F, sense[12], sense[13])
    return None if status == GOOD else status


def login(t: Target, name: str, isid: bytes) -> RawInitiator:
    """A logged-in session of initiator `name` with this ISID, retried while
    fetd_tcp comes back (a restart, the STML's release)."""
    for _ in range(150):
        try:
            ini = RawInitiator(*G.host_port(t.portal), initiator=f"iqn.2026-12.org.test:{name}", isid=isid)
            if ini.login(IQN).status_class == 0:
                return ini
            ini.close()
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("no login:\n" + t.log()[-3000:])


def told_once_on_each_lu(ini: RawInitiator) -> list:
    first = []
    for lun in (0, 1):
        first.append(told(ini, lun))
        assert told(ini, lun) is None
    return first


@pytest.fixture
def target(tmp_short):
    with Target("--lun", "ram:1MiB", "--lun", "ram:1MiB", data_dir=str(tmp_short()),
                portals=(f"127.0.0.1:{free_port()}",)) as t:
        yield t


def test_a_reset_connection_or_a_killed_fetd_tcp_is_nexus_loss_a_logout_is_not(target):
    t = target
    isid_a, isid_b, isid_c = (b"\x80" + os.urandom(5) for _ in range(3))
    a, b = login(t, "a", isid_a), login(t, "b", isid_b)
    assert told(a, 0) is None and told(b, 0) is None           # new nexuses: nothing (0006)
    assert told(a, 0, RESERVE6) is None
    assert told(b, 0, RESERVE6) == RESERVATION_CONFLICT
    a.kill()                                                   # a reset at ErrorRecoveryLevel 0
    t.wait_log("session ended: iqn.2026-12.org.test:a")
    assert told(b, 0, RESERVE6) is None                        # a's RESERVE(6) went with its nexus
    assert told(b, 0, RELEASE6) is None
    a = login(t, "a", isid_a)                                  # the same I_T nexus again
    assert told_once_on_each_lu(a) == [NEXUS_LOSS, NEXUS_LOSS], t.log()[-3000:]
    assert told_once_on_each_lu(b) == [None, None]             # b lost nothing
    c = login(t, "c", isid_c)
    assert c.logout().response == 0                            # a Logout: the initiator ended it
    c.close()
    c = login(t, "c", isid_c)
    assert told_once_on_each_lu(c) == [None, None]
    assert c.logout().response == 0
    c.close()

    assert told(b, 1, RESERVE6) is None
    fetd = children_by_module(t.proc.pid)["fetd_tcp"]
    os.kill(fetd, signal.SIGKILL)                              # fetd_tcp's own end: every nexus lost
    t.wait_log("fetd_tcp exited with -9; restarting")
    d = login(t, "d", b"\x80" + os.urandom(5))                 # a new nexus on the new fetd_tcp
    assert told_once_on_each_lu(d) == [None, None]
    assert told(d, 1, RESERVE6) is None                        # b's RESERVE(6) is gone
    assert told(d, 1, RELEASE6) is None
    b = login(t, "b", isid_b)
    assert told_once_on_each_lu(b) == [NEXUS_LOSS, NEXUS_LOSS], t.log()[-3000:]
    c = login(t, "c", isid_c)                                  # it logged out before the kill
    assert told_once_on_each_lu(c) == [None, None]
    for each in (a, b, c, d):
        each.close()


def test_a_front_end_released_for_silence_loses_its_nexuses(target):
    """fetd_tcp stopped past three heartbeats: the STML releases it, and it
    comes back to the same STML instance (no power on: 0247), whose loss its
    initiator hears on its next login."""
    t = target
    isid = b"\x80" + os.urandom(5)
    a = login(t, "a", isid)
    assert told(a, 0, RESERVE6) is None
    fetd = children_by_module(t.proc.pid)["fetd_tcp"]
    os.kill(fetd, signal.SIGSTOP)
    try:
        t.wait_log(f"releasing front end iscsi-vm-{fetd}: silent for")
    finally:
        os.kill(fetd, signal.SIGCONT)
    a.close()
    b = login(t, "b", b"\x80" + os.urandom(5))
    assert told(b, 0, RESERVE6) is None                        # a's RESERVE(6) is gone
    assert told(b, 0, RELEASE6) is None
    a = login(t, "a", isid)
    assert told_once_on_each_lu(a) == [NEXUS_LOSS, NEXUS_LOSS], t.log()[-3000:]
    assert children_by_module(t.proc.pid)["fetd_tcp"] == fetd  # the same process throughout
    a.close()
    b.close()


def test_sessions_a_stopping_fetd_tcp_cuts_are_lost_to_their_initiators(target):
    """fetd_tcp stopped (SIGTERM) asks its initiators to log out; one that
    does not (a raw session answers no Async Message) has its session cut:
    lost, released so before fetd_tcp's goodbye, and told on its next login."""
    t = target
    isid = b"\x80" + os.urandom(5)
    a = login(t, "a", isid)
    assert told(a, 0) is None
    os.kill(children_by_module(t.proc.pid)["fetd_tcp"], signal.SIGTERM)
    t.wait_log("fetd_tcp exited with 0; restarting")
    a.close()
    a = login(t, "a", isid)
    assert told_once_on_each_lu(a) == [NEXUS_LOSS, NEXUS_LOSS], t.log()[-3000:]
    a.close()


class _HeldStml(FakeStml):
    """A fake STML that leaves register_nexus unanswered until the test
    sends nexus_ready: a login stays complete in the STML's eyes, its final
    Login Response not yet written."""

    def _answer(self, h: dict) -> None:
        if h.get("op") != "register_nexus":
            super()._answer(h)


def test_a_session_whose_final_login_response_never_went_out_is_not_lost(tmp_short):
    """The connection resets after fetd_tcp registered the new session's
    nexus but before its final Login Response went out: the initiator never
    had that session, so fetd_tcp releases it plainly (no `lost`), and its
    login again with the same ISID is a new nexus (0236)."""
    port = free_port()
    target = "iqn.2026-12.test:fake"
    isid = b"\x80" + os.urandom(5)

    def registered(stml: FakeStml) -> list[int]:
        return [h["nexus"] for h, _ in stml.messages if h["op"] == "register_nexus"]

    async def arrives(stml: FakeStml, what: Callable[[], list], count: int) -> list:
        for _ in range(400):    # (a message from fetd_tcp, awaited: nothing here is timed)
            if len(what()) >= count:
                return what()
            await asyncio.sleep(0.05)
        raise AssertionError(f"not sent by fetd_tcp: {stml.messages}")

    async def main() -> tuple[list[dict], int]:
        stml = _HeldStml(str(tmp_short() / "stml"), version=CONTRACT_VERSION, caps=[])
        fetd = stml.fetd_tcp(port)
        opened: list[RawInitiator] = []
        try:
            def connect() -> RawInitiator:
                opened.append(RawInitiator.once_listening("127.0.0.1", port, initiator="iqn.2026-12.org.test:a",
                                                          isid=isid, timeout=10))
                return opened[-1]
            ini = await asyncio.to_thread(connect)
            assert (await asyncio.to_thread(ini.login, target, unanswered=True)).status_class == 0
            (first,) = await arrives(stml, lambda: registered(stml), 1)
            ini.kill()                              # the reset reaches fetd_tcp before the answer can
            stml.send({"op": "nexus_ready", "nexus": first})
            releases = await arrives(stml, lambda: [h for h, _ in stml.messages if h["op"] == "scsi_release"], 1)
            again = await asyncio.to_thread(connect)
            login = asyncio.create_task(asyncio.to_thread(again.login, target))
            second = (await arrives(stml, lambda: registered(stml), 2))[1]
            stml.send({"op": "nexus_ready", "nexus": second})
            return releases, (await login).status_class
        finally:
            stop_pid(fetd)
            stml.close()
            for each in opened:
                each.close()
    releases, status = asyncio.run(main())
    assert releases == [{"op": "scsi_release", "nexus": releases[0]["nexus"]}]   # no `lost`
    assert status == 0
