"""Faults with a write log: SIGKILL of fetd_tcp, of the STML (both restarted by the
`scsi-target run` supervisor) and of a loopback client in the middle of writes.
Every write that got GOOD before a kill reads back intact afterwards (file LUN, write
cache off); a write in doubt is either wholly there or wholly absent in every logical
block. A corrupt configuration or reservation file is refused with a clear message."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from support import fuzzgen as G
from support.faults import BS, UNIT, IscsiWriter, WriteLog, block, read_all
from support.procs import children_by_module, free_port
from support.target import IQN, Target


@pytest.fixture
def file_target(tmp_short):
    port = free_port()   # fixed: the restarted fetd_tcp listens where the writers reconnect
    d = str(tmp_short())
    t = Target("--lun", f"file:{d}/disk.img,size=16MiB", data_dir=d, portals=(f"127.0.0.1:{port}",))
    yield t
    t.stop()


@pytest.mark.parametrize("victim", ["fetd_tcp", "stml"])
def test_sigkill_mid_writes_loses_no_acknowledged_write(file_target, victim):
    t = file_target
    wlog, stop = WriteLog(), threading.Event()
    writers = [IscsiWriter(t.portal, i, wlog, stop) for i in range(4)]
    for w in writers:
        w.start()
    time.sleep(1.5)
    before = sum(w.good for w in writers)
    pid = children_by_module(t.proc.pid)[victim]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while children_by_module(t.proc.pid).get(victim) in (None, pid):
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
    ini = read_all(t.portal)
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
    ini = read_all(t.portal)
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
    assert children_by_module(t.proc.pid).keys() == {"stml", "fetd_tcp"}


def test_corrupt_config_is_refused_clearly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[target]\nname = 'iqn.2026-11.x:y'\n")
    r = subprocess.run([sys.executable, "-m", "scsi_target", "run", "--config", str(bad),
                        "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "config error" in r.stderr and "not valid TOML" in r.stderr


def test_corrupt_reservation_file_is_refused_not_reset(tmp_short):
    d = str(tmp_short())
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
