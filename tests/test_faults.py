"""Faults with a write log: SIGKILL of fetd_tcp, of the STML (both restarted by the
`scsi-target run` supervisor) and of a loopback client in the middle of writes.
Every write that got GOOD before a kill reads back intact afterwards (file LUN, write
cache off); a write in doubt is either wholly there or wholly absent in every logical
block. A corrupt configuration or reservation file is refused with a clear message."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rawiscsi import RawInitiator
from targetproc import IQN, Target

import fuzzgen as G

BS = 512
UNIT = 4            # blocks per write


def block(lba: int, tag: str) -> bytes:
    return hashlib.sha256(f"{lba}:{tag}".encode()).digest() * (BS // 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> dict[str, int]:
    """{'stml': pid, 'fetd_tcp': pid} among the supervisor's children."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        if b"fetd_tcp" in cmd:
            out["fetd_tcp"] = int(p.name)
        elif b"stml" in cmd:
            out["stml"] = int(p.name)
    return out


class WriteLog:
    """Per LBA: the block last acknowledged, and blocks written without an answer since."""

    def __init__(self) -> None:
        self.acked: dict[int, bytes] = {}
        self.doubt: dict[int, list[bytes]] = {}
        self.lock = threading.Lock()

    def begin(self, lba: int, blocks: list[bytes]) -> None:
        with self.lock:
            for i, b in enumerate(blocks):
                self.doubt.setdefault(lba + i, []).append(b)

    def good(self, lba: int, blocks: list[bytes]) -> None:
        with self.lock:
            for i, b in enumerate(blocks):
                self.acked[lba + i] = b
                self.doubt.pop(lba + i, None)

    def verify(self, read) -> int:
        checked = 0
        for lba in sorted(set(self.acked) | set(self.doubt)):
            got = read(lba)
            allowed = ([self.acked[lba]] if lba in self.acked else [bytes(BS)]) + self.doubt.get(lba, [])
            assert got in allowed, f"LBA {lba}: not an acknowledged or in-doubt block (torn or lost write)"
            checked += 1
        return checked


class IscsiWriter(threading.Thread):
    """Writes 4-block units to its own LBA range, reconnecting whenever the target goes away."""

    def __init__(self, portal: str, wid: int, wlog: WriteLog, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.portal, self.wid, self.wlog, self.stop = portal, wid, wlog, stop
        self.good = self.errors = 0

    def run(self) -> None:
        rnd = random.Random(self.wid)
        seq = 0
        ini = None
        while not self.stop.is_set():
            try:
                if ini is None:
                    ini = RawInitiator(*G.host_port(self.portal), timeout=5,
                                       initiator=f"iqn.2026-11.org.test:w{self.wid}")
                    if ini.login(IQN).status_class != 0:
                        raise ConnectionError("login refused")
                    ini.command(bytes(6))
                lba = self.wid * 1000 + rnd.randrange(0, 200, UNIT)
                seq += 1
                blocks = [block(lba + i, f"{self.wid}.{seq}") for i in range(UNIT)]
                self.wlog.begin(lba, blocks)
                ini.write16(lba, b"".join(blocks))
                self.wlog.good(lba, blocks)
                self.good += 1
            except (OSError, AssertionError, ValueError):
                self.errors += 1
                if ini is not None:
                    ini.close()
                ini = None
                time.sleep(0.1)
        if ini is not None:
            ini.close()


def _read_all(portal: str):
    ini = RawInitiator(*G.host_port(portal), initiator="iqn.2026-11.org.test:verify")
    deadline = time.monotonic() + 20
    while ini.login(IQN).status_class != 0:
        ini.close()
        assert time.monotonic() < deadline, "no login after the restart"
        time.sleep(0.3)
        ini = RawInitiator(*G.host_port(portal), initiator="iqn.2026-11.org.test:verify")
    while ini.command(bytes(6))[0] != 0:
        pass
    return ini


@pytest.fixture
def file_target(tmp_path):
    port = free_port()
    d = tempfile_dir()
    t = Target("--lun", f"file:{d}/disk.img,size=16MiB", data_dir=d, portals=(f"127.0.0.1:{port}",))
    yield t
    t.stop()


def tempfile_dir() -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="st", dir="/tmp")


@pytest.mark.parametrize("victim", ["fetd_tcp", "stml"])
def test_sigkill_mid_writes_loses_no_acknowledged_write(file_target, victim):
    t = file_target
    wlog, stop = WriteLog(), threading.Event()
    writers = [IscsiWriter(t.portal, i, wlog, stop) for i in range(4)]
    for w in writers:
        w.start()
    time.sleep(1.5)
    before = sum(w.good for w in writers)
    pid = children(t.proc.pid)[victim]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while children(t.proc.pid).get(victim) in (None, pid):
        assert time.monotonic() < deadline, f"{victim} was not restarted"
        time.sleep(0.1)
    time.sleep(4)    # writers reconnect and go on
    stop.set()
    for w in writers:
        w.join(15)
    after = sum(w.good for w in writers)
    assert before > 0 and after > before, (before, after, t.log()[-3000:])
    assert sum(w.errors for w in writers) > 0          # the kill was felt
    assert f"{victim} exited with -9; restarting" in t.log()
    ini = _read_all(t.portal)
    try:
        n = wlog.verify(lambda lba: ini.read16(lba, 1))
    finally:
        ini.close()
    assert n >= UNIT * 4


LOOP_WRITER = textwrap.dedent("""
    import hashlib, sys
    from fetd_loopback import LoopbackClient
    c = LoopbackClient(sys.argv[1], timeout=10, initiator="iqn.2026-11.org.test:loopkill").open()
    seq = 0
    while True:
        seq += 1
        lba = 5000 + (seq * 4) % 400
        data = b"".join(hashlib.sha256(f"{lba + i}:L{seq}".encode()).digest() * 16 for i in range(4))
        c.write(0, lba, data)
        print(lba, seq, flush=True)
""")


def test_sigkill_of_a_loopback_client(file_target):
    t = file_target
    endpoint = f"ipc://{t.data_dir}/stml.sock"
    p = subprocess.Popen([sys.executable, "-c", LOOP_WRITER, endpoint], stdout=subprocess.PIPE, text=True)
    acked: dict[int, int] = {}
    deadline = time.monotonic() + 20
    try:
        for line in p.stdout:
            lba, seq = map(int, line.split())
            acked[lba] = seq
            if len(acked) >= 50 or time.monotonic() > deadline:
                break
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(5)
    assert acked, "the loopback writer wrote nothing"
    ini = _read_all(t.portal)
    try:
        for lba, seq in acked.items():
            data = ini.read16(lba, UNIT)
            # the last write acknowledged, or one later that was in flight when it died
            for i in range(UNIT):
                blk = data[i * BS:(i + 1) * BS]
                assert blk in {block(lba + i, f"L{s}") for s in range(seq, seq + 200, 100)}, lba
    finally:
        ini.close()
    G.healthy_io(t.portal)
    assert children(t.proc.pid).keys() == {"stml", "fetd_tcp"}


def test_corrupt_config_is_refused_clearly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[target]\nname = 'iqn.2026-11.x:y'\n")
    r = subprocess.run([sys.executable, "-m", "scsi_target", "run", "--config", str(bad),
                        "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "config error" in r.stderr and "not valid TOML" in r.stderr


def test_corrupt_reservation_file_is_refused_not_reset(tmp_path):
    d = tempfile_dir()
    pr_dir = Path(d) / "pr"
    pr_dir.mkdir()
    from stml import pr
    path = pr.state_path(d, IQN, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"registrations": [ {"key": ')       # half-written JSON
    r = subprocess.run([sys.executable, "-m", "stml", "--data-dir", d, "--iqn", IQN, "--lun", "ram:4MiB"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "persistent reservations" in r.stderr
    assert path.read_text().startswith('{"registrations"')   # left for a human, not reset
