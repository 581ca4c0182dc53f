"""Two gateways on one RBD image, each in a network namespace of its own
(tests/support/gateways.py), with a throwaway Ceph on the namespaces'
bridge: the same LU through both, reservations held across them, and a
failover that loses nothing and lets nothing stale land.

Each test gets a fresh pair of gateways on a fresh image: no test depends
on another's roles.
"""
from __future__ import annotations

import itertools
import os
import re
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from fetd_tcp import pdu as P
from support import ceph, gateways
from support.ci import need_root
from support.gateways import IQN, Gateway
from support.procs import run
from support.rawiscsi import RawInitiator
from support.target import cunit_verdicts

pytestmark = pytest.mark.slow

MIB = 1 << 20
RESERVATION_CONFLICT = 0x18
WE = 0x1   # Write Exclusive


@pytest.fixture(scope="module")
def net():
    need_root("the gateways' network namespaces")
    why = ceph.available() or gateways.available()
    if why:
        pytest.skip(why)
    try:
        n = gateways.Net()
    except RuntimeError as e:   # a bridge needs CAP_NET_ADMIN
        pytest.skip(f"cannot make the gateways' bridge here ({e})")
    yield n
    n.close()


@pytest.fixture(scope="module")
def cluster(net):
    c = ceph.Cluster(host=net.host).start()
    yield c
    c.stop()


_pairs = itertools.count()


@pytest.fixture
def pair(net, cluster):
    """Gateways A (active: started first) and B (standby) on a fresh image."""
    image = cluster.create_image(f"gw{uuid.uuid4().hex[:8]}", 64 * MIB)
    n = next(_pairs)
    ns_a, ip_a = net.namespace(f"a{n}", 20 + 2 * n)
    ns_b, ip_b = net.namespace(f"b{n}", 21 + 2 * n)
    a = Gateway("A", ns_a, ip_a, 1, [ip_b], image, cluster.conf, cluster.keyring)
    b = Gateway("B", ns_b, ip_b, 2, [ip_a], image, cluster.conf, cluster.keyring)
    try:
        a.start().ready()
        a.wait_for(r"stml: gateway active")
        b.start().ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------- an initiator

class Initiator:
    """A raw iSCSI initiator port (name and ISID fixed), able to log in again
    through another gateway: the same I_T nexus identity on a new path."""

    def __init__(self, name: str) -> None:
        self.name = f"iqn.2026-11.org.test:{name}"
        self.isid = b"\x80" + os.urandom(5)
        self.ini: RawInitiator | None = None

    def login(self, gw: Gateway, timeout: float = 60) -> Initiator:
        """Log in through `gw`, retrying while no STML serves it; unit attentions
        are consumed as an OS initiator does."""
        self.close()
        host, port = gw.portal.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                ini = RawInitiator(host, int(port), self.name, self.isid, timeout=15)
                if ini.login(IQN).status_class == 0:
                    self.ini = ini
                    for _ in range(10):
                        if self.cmd(bytes(6))[0] == 0:
                            return self
                ini.close()
            except (OSError, ConnectionError):
                pass
            assert time.monotonic() < deadline, f"no login through gateway {gw.name}:\n{gw.log()[-3000:]}"
            time.sleep(0.3)

    def cmd(self, cdb: bytes, read: int = 0, write: bytes = b"") -> tuple[int, bytes, bytes]:
        assert self.ini is not None
        return self.ini.command(cdb, 0, read=read, write=write)

    def write(self, lba: int, data: bytes) -> int:
        return self.cmd(struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0), write=data)[0]

    def read(self, lba: int, blocks: int) -> bytes:
        status, sense, data = self.cmd(struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0), read=blocks * 512)
        assert status == 0, (status, sense.hex())
        return data

    def send_write(self, lba: int, data: bytes) -> None:
        """Send a WRITE(16) with its data and do not wait for its status."""
        ini = self.ini
        assert ini is not None
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0)
        ini.send(P.ScsiCommand(ini._next_itt(), P.int_to_lun(0), cdb.ljust(16, b"\0"), len(data),
                               ini.cmd_sn, ini.exp_stat_sn, read=False, write=True,
                               data_length=len(data)), data)
        ini.cmd_sn += 1

    def outcome(self, timeout: float = 30) -> int | None:
        """The status of what send_write sent; None when the session ended first."""
        ini = self.ini
        assert ini is not None
        ini.sock.settimeout(timeout)
        try:
            while True:
                pdu, _ = ini.recv()
                if isinstance(pdu, P.ScsiResponse):
                    return pdu.status
        except (OSError, ConnectionError):
            return None

    def prout(self, sa: int, key: int = 0, sark: int = 0, rtype: int = 0, all_tg_pt: bool = False) -> int:
        param = struct.pack(">QQ4xB3x", key, sark, 0x04 if all_tg_pt else 0)
        cdb = struct.pack(">BBBxxIB", 0x5F, sa, rtype, len(param), 0)
        return self.cmd(cdb, write=param)[0]

    def prin(self, sa: int) -> bytes:
        status, sense, data = self.cmd(struct.pack(">BBxxxxxHx", 0x5E, sa, 4096), read=4096)
        assert status == 0, (status, sense.hex())
        return data

    def keys(self) -> list[int]:
        data = self.prin(0)
        n = struct.unpack_from(">I", data, 4)[0] // 8
        return [struct.unpack_from(">Q", data, 8 + 8 * i)[0] for i in range(n)]

    def reservation(self) -> tuple[int, int] | None:
        data = self.prin(1)
        if struct.unpack_from(">I", data, 4)[0] == 0:
            return None
        return struct.unpack_from(">Q", data, 8)[0], data[21] & 0x0F

    def port_groups(self) -> dict[int, int]:
        """REPORT TARGET PORT GROUPS: {group: asymmetric access state}."""
        status, sense, data = self.cmd(bytes([0xA3, 0x0A, 0, 0, 0, 0]) + struct.pack(">I", 1024) + bytes(2),
                                       read=1024)
        assert status == 0, (status, sense.hex())
        out, off = {}, 4
        while off + 8 <= 4 + struct.unpack_from(">I", data)[0]:
            out[struct.unpack_from(">H", data, off + 2)[0]] = data[off] & 0x0F
            off += 8 + 4 * data[off + 7]
        return out

    def close(self) -> None:
        if self.ini is not None:
            self.ini.close()
            self.ini = None


# ---------------------------------------------------------------- tests

def test_bytes_written_through_a_read_back_through_b(pair, tmp_path):
    a, b = pair
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 * MIB))
    run(["qemu-img", "convert", "-n", "-O", "raw", str(src), a.url()], timeout=300)
    assert "identical" in run(["qemu-img", "compare", str(src), b.url()], timeout=300).stdout


def test_reservation_through_a_conflicts_through_b(pair):
    a, b = pair
    x, y = Initiator("holder"), Initiator("other")
    x.login(a)
    y.login(b)
    assert x.prout(0, sark=0x1111) == 0
    assert x.prout(1, key=0x1111, rtype=WE) == 0
    assert y.reservation() == (0x1111, WE) and y.keys() == [0x1111]
    assert y.write(0, bytes(512)) == RESERVATION_CONFLICT
    y.read(0, 1)                          # Write Exclusive: others still read
    assert x.write(0, b"x" * 512) == 0
    # one LU behind both paths: the same port groups on each, the serving host's optimized
    assert x.port_groups() == y.port_groups() == {1: 0, 2: 1}
    x.close()
    y.close()


SUITES = ["PrinReadKeys", "ProutRegister", "ProutReserve", "ProutPreempt", "ProutClear", "Reserve6",
          "MultipathIO"]


def test_libiscsi_pr_suites_with_a_and_b_as_the_two_paths(pair):
    """The second path (B's URL) is the suites' second initiator (libiscsi's
    mpath_sd2_get_or_clone), so what A's sessions reserve B's must see."""
    a, b = pair
    verdicts: dict[str, str] = {}
    for suite in SUITES:
        p = subprocess.run(["iscsi-test-cu", "-d", "-v", "-t", f"SCSI.{suite}", a.url(), b.url()],
                           capture_output=True, text=True, timeout=600)
        found = cunit_verdicts(p.stdout)
        assert found, p.stdout[-2000:] + p.stderr[-2000:]
        verdicts.update(found)
    failed = sorted(t for t, v in verdicts.items() if v == "failed")
    assert not failed, f"failed with two gateways: {failed}"
    # the multipath tests ran (they skip when the two URLs are not one LU)
    assert verdicts["MultipathIO.Simple"] == "passed" and verdicts["MultipathIO.CompareAndWrite"] == "passed"
    assert sum(v == "passed" for v in verdicts.values()) >= 25


def test_failover_loses_nothing_and_the_old_gateway_writes_nothing(pair):
    a, b = pair
    w, other = Initiator("writer"), Initiator("bystander")
    w.login(a)
    assert w.prout(0, sark=0xABCD, all_tg_pt=True) == 0        # every target port: both gateways
    assert w.prout(1, key=0xABCD, rtype=WE) == 0
    assert w.port_groups() == {1: 0}
    log: dict[int, bytes] = {}                                # LBA -> what got GOOD there last
    for i in range(64):
        data = os.urandom(4096)
        assert w.write(i * 8, data) == 0
        log[i * 8] = data
    # everything of A dies, with a write on its way (it may or may not land: not in the log)
    w.send_write(64 * 8, os.urandom(4096))
    mark = len(b.log())
    a.kill()
    # the writer goes on through B once B has taken over and B's front end uses it
    active = b.wait_for(r"stml: gateway active", timeout=90, since=mark).end()
    b.wait_for(r"front end \S+ \(iscsi\) registered", timeout=60, since=active)
    w.login(b, timeout=90)
    assert w.keys() == [0xABCD] and w.reservation() == (0xABCD, WE)
    for i in range(65, 129):
        data = os.urandom(4096)
        assert w.write(i * 8, data) == 0, "the holder's write through B"
        log[i * 8] = data
    for lba, data in log.items():
        assert w.read(lba, 8) == data, f"a write that got GOOD is lost at LBA {lba}"
    other.login(b)
    assert other.write(0, bytes(4096)) == RESERVATION_CONFLICT
    # A restarted is a standby: its portal leads to B, which holds the lock
    mark = len(b.log())
    a.start().ready()
    a.wait_for(r"STML at ipc://\S+ is a standby")
    b.wait_for(r"front end \S+ \(iscsi\) registered", since=mark)   # A's front end, at B
    other.login(a)
    assert other.write(8, bytes(4096)) == RESERVATION_CONFLICT
    assert other.read(8, 8) == log[8]
    # the port groups follow the takeover: B's are now the optimized ones
    assert other.port_groups() == w.port_groups() == {1: 1, 2: 0}
    status = run(["ip", "netns", "exec", a.ns, sys.executable, "-m", "scsi_target", "status", "--json",
                  "--config", str(a.config)]).stdout
    assert '"role": "standby"' in status and '"mine": false' in status, status
    for lba, data in log.items():
        assert other.read(lba, 8) == data
    w.close()
    other.close()


def test_a_cut_off_gateway_cannot_land_its_write_after_the_takeover(net, pair):
    """A's link to everything slows to a trickle with a write of A's in the
    queue: A's watches expire, B takes over (breaking A's lock, blocklisting
    A's client) and writes the same blocks; when A's write reaches the OSD,
    the OSD refuses it. Without the blocklist it would land last."""
    a, b = pair
    old, stale, new = b"o" * 16384, b"s" * 16384, b"n" * 16384
    w = Initiator("slow-path")
    w.login(a)
    assert w.write(1600, old) == 0
    mark = len(b.log())
    net.throttle(a.ns, "8kbit")           # 16 KiB take 16 s to leave
    try:
        w.send_write(1600, stale)
        active = b.wait_for(r"stml: gateway active", timeout=90, since=mark).end()
        b.wait_for(r"front end \S+ \(iscsi\) registered", timeout=60, since=active)
        other = Initiator("fast-path")
        other.login(b)
        assert other.write(1600, new) == 0
    finally:
        net.throttle(a.ns, "10gbit")      # the queue drains: A's write reaches the OSD now
    assert w.outcome(60) != 0, "the cut-off gateway's write got GOOD after the takeover"
    a.wait_for(r"stml: gateway standby", timeout=60)
    assert other.read(1600, 32) == new, "the cut-off gateway's write landed after the takeover"
    w.close()
    other.close()


def test_a_gateway_fenced_with_writes_in_flight_answers_them_and_stands_by(cluster, pair):
    """A's cluster client is blocklisted (what a takeover does to a live
    holder) while an initiator keeps 16 writes in flight through A: librbd
    ends them through A's one librados completion thread (0409) with
    ESHUTDOWN. Each write is answered GOOD only if it is on the image, or
    with the path error of 0404, or its session ends; A stands down without
    losing a process; a gateway serves again (A with a new client or B) and
    every write that got GOOD is on the image, read through both portals."""
    a, b = pair
    path = re.search(r'path = "([^"]+)"', a.config.read_text())
    assert path is not None
    w = Initiator("fenced-busy")
    w.login(a)
    processes = len(a.processes())
    # A's client: the watcher on the image from A's address (B, a standby, watches it too)
    status = cluster.run("rbd", "status", path.group(1))
    client = re.search(rf"watcher=({re.escape(a.addr)}:\d+/\d+)", status)
    assert client is not None, status
    ini = w.ini
    assert ini is not None
    ini.sock.settimeout(60)
    sent: dict[int, tuple[int, bytes]] = {}      # ITT -> LBA, data
    good: dict[int, bytes] = {}                  # LBA -> data answered GOOD
    failed: list[tuple[int, bytes]] = []         # (status, sense) of the others
    fence: threading.Thread | None = None
    lba = 0
    while True:
        try:
            # 16 writes in flight, new ones until one fails (A was fenced) or the session ends
            while not failed and len(sent) < 16 and ini.cmd_sn <= ini.max_cmd_sn:
                assert lba < 64 * MIB // 512, "the writes went on though A's client was blocklisted"
                itt, data = ini._next_itt(), os.urandom(4096)
                sent[itt] = (lba, data)
                cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, 8, 0, 0)
                ini.send(P.ScsiCommand(itt, P.int_to_lun(0), cdb.ljust(16, b"\0"), 4096, ini.cmd_sn,
                                       ini.exp_stat_sn, read=False, write=True, data_length=4096), data)
                ini.cmd_sn += 1
                lba += 8
            if not sent:
                break
            pdu, seg = ini.recv()
        except (OSError, ConnectionError):
            break                                 # the front end went with the step down
        if isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG:
            ini.send(P.NopOut(P.RESERVED_TAG, pdu.ttt, ini.cmd_sn, ini.exp_stat_sn, immediate=True))
        if not isinstance(pdu, P.ScsiResponse):
            continue
        at, data = sent.pop(pdu.itt)
        if pdu.status == 0:
            good[at] = data
        else:
            failed.append((pdu.status, P.decode_sense_segment(seg) if seg else b""))
        if fence is None and len(good) >= 64:     # well under way: fence A now
            fence = threading.Thread(target=cluster.run, args=("ceph", "osd", "blocklist", "add",
                                                               client.group(1)))
            fence.start()
    assert fence is not None, "A failed writes before it was fenced"
    fence.join(60)
    assert sent or failed, "no write of A's was in flight when it was fenced"
    # each write not GOOD got the path error (NOT READY, ALUA state transition)
    for st, sense in failed:
        assert st == 2 and (sense[2] & 0x0F, sense[12], sense[13]) == (2, 0x04, 0x0A), (st, sense.hex())
    stood_down = a.wait_for(r"stml: gateway standby", timeout=60).end()
    # A's fenced client holds the lock no longer: whichever standby, A's new client
    # or B, takes it first serves (B's in a takeover proper)
    deadline = time.monotonic() + 90
    while "stml: gateway active" not in a.log()[stood_down:] + b.log():
        assert time.monotonic() < deadline, f"no gateway serves after A was fenced:\n{a.log()[-3000:]}"
        time.sleep(0.2)
    assert a.proc is not None and a.proc.poll() is None and len(a.processes()) == processes, a.log()[-3000:]
    w.login(b, timeout=90)
    for lba, data in good.items():
        assert w.read(lba, 8) == data, f"a write that got GOOD through A is not on the image at LBA {lba}"
    other = Initiator("after-fence")
    other.login(a, timeout=90)
    assert other.read(0, 8) == good[0]
    w.close()
    other.close()
