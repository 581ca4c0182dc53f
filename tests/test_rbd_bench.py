"""bench.py --rbd --cpu's accounting (decision 0417): what each target asks
of the cluster per I/O, from the OSD's and the target's own librbd perf
counters, and what every process on the machine spent on it.

The counters are read through Ceph's admin socket protocol (tested against
a stand-in socket); against a throwaway cluster, the counts themselves are
the finding to keep: an RBD LUN costs the OSD one op per read and never a
flush, lock or watch op per write, as tgtd's bs_rbd does.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from support import ceph

ROOT = Path(__file__).resolve().parent.parent


def bench() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DUMP = {
    "AsyncMessenger::Worker-0": {"msgr_recv_messages": 10, "msgr_running_total_time": 0.5},
    "AsyncMessenger::Worker-1": {"msgr_recv_messages": 5, "msgr_running_total_time": 0.25},
    "librbd-1014ccfc58c0-rbd-img": {"wr": 7, "wr_latency": {"avgcount": 7, "sum": 0.1, "avgtime": 0.014}},
    "objecter": {"op_w": 3, "oplen_avg": {"avgcount": 3, "sum": 3}},
    "osd": {"op": 4},
    "mempool": {"osd_bytes": 1 << 20},
}


def test_perf_dump_reads_counters_through_the_admin_socket_protocol():
    """The command goes as JSON ended by a NUL; the answer is a 4-byte
    big-endian length and JSON (read however the socket splits it). A
    messenger's workers are summed, every librbd image's section is
    `librbd`, averages and sections not kept are left out."""
    b = bench()
    with tempfile.TemporaryDirectory(prefix="asok", dir="/tmp") as d:
        path = Path(d) / "x.asok"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen(1)
        asked: list[bytes] = []

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                data = b""
                while not data.endswith(b"\0"):
                    data += conn.recv(4096)
                asked.append(data)
                body = json.dumps(DUMP).encode()
                reply = struct.pack(">I", len(body)) + body
                for i in range(0, len(reply), 7):   # in small pieces
                    conn.sendall(reply[i:i + 7])
        t = threading.Thread(target=answer)
        t.start()
        got = b.perf_dump(path)
        t.join(30)
        server.close()
        assert asked == [b'{"prefix": "perf dump"}\0']
        assert got == {"msgr.msgr_recv_messages": 15, "msgr.msgr_running_total_time": 0.75,
                       "librbd.wr": 7, "objecter.op_w": 3, "osd.op": 4}
        assert b.perf_dump(Path(d) / "nobody.asok") == {}


def test_counters_and_the_machine_are_taken_per_io():
    """Only counters that moved are kept, per I/O; the machine's busy CPU that
    no counted process ran is `others` (a shared machine's other work)."""
    b = bench()
    before = {"osd": {"osd.op": 10, "osd.op_w": 5}, "client": {"librbd.wr": 0}}
    after = {"osd": {"osd.op": 110, "osd.op_w": 5, "osd.op_r": 100}, "client": {"librbd.wr": 100}}
    assert b.counters_per_io(before, after, 100) == {"osd": {"osd.op": 1.0, "osd.op_r": 1.0},
                                                     "client": {"librbd.wr": 1.0}}
    cols = dict.fromkeys(b.STAT_COLUMNS, 0.0)
    later = {**cols, "user": 0.6, "nice": 0.1, "system": 0.2, "softirq": 0.1, "idle": 1.0}
    m = b.machine_per_io(cols, later, 1000, counted_us=700.0)
    assert m == pytest.approx({"busy_us": 1000.0, "nice_us": 100.0, "irq_us": 100.0, "others_us": 300.0,
                               "idle_share": 0.5})


@pytest.mark.slow
def test_the_cluster_is_asked_one_op_per_read_and_no_flush_per_write(tmp_short):
    """Against a throwaway cluster, counted by the OSD and by each target's
    librbd: every 4 KiB read is one OSD read from either target; our writes
    cost at most one OSD write each (librbd merges adjacent ones) and no
    flush, lock, watch or class call; the cluster's daemons and the
    initiator are in the CPU accounting."""
    why = ceph.available() or (None if shutil.which("tgtd") and Path(
        "/usr/lib/tgt/backing-store/bs_rbd.so").exists() else "tgtd's rbd backing store is not installed "
        "(apt-get install tgt tgt-rbd)")
    if why:
        pytest.fail(why)
    b = bench()
    b.RBD_SIZE = 16 << 20
    work = tmp_short()   # the STML's socket path must be short
    rbd = b.RbdImages(None, None, work)
    targets: list[Any] = []
    try:
        targets = [b.Ours(work, None, False, rbd), b.Tgtd(work, None, False, rbd)]
        for t in targets:
            _, read = b.measured(t, rbd, ["-d", "16", "-s", "4k"], 400)
            # (tgtd's librbd now and then re-reads the image's header: not ours to count)
            reads = read["counters"]["osd"]["osd.op_r"]
            assert reads == 1.0 if t.name != "tgtd" else 1.0 <= reads <= 1.01, (t.name, reads)
            assert read["counters"]["osd"].get("osd.op_w", 0) == 0, t.name
            assert read["counters"]["client"]["librbd.rd"] == 1.0, t.name
            ops = read["counters"]["client"]["objecter.op"]
            assert ops == 1.0 if t.name != "tgtd" else 1.0 <= ops <= 1.01, (t.name, ops)
            assert {"ceph-osd", "ceph-mon", "ceph-mgr", "initiator", "machine"} <= set(read["cpu"])
            assert read["cpu"]["ceph-osd"]["cpu_us"] > 0 and read["cpu"]["initiator"]["cpu_us"] > 0
        _, write = b.measured(targets[0], rbd, ["-d", "16", "-s", "4k", "-w"], 400)
        client = write["counters"]["client"]
        assert client["librbd.wr"] == 1.0
        assert 0 < write["counters"]["osd"]["osd.op_w"] <= 1.0
        assert client["objecter.op"] == client["objecter.osdop_write"] == write["counters"]["osd"]["osd.op"]
        assert not {k for k in client if k in ("librbd.flush", "librbd.aio_flush") or k.startswith(
            ("objecter.osdop_call", "objecter.osdop_stat", "objecter.osdop_watch", "objecter.linger"))}
    finally:
        for t in targets:
            t.stop()
        rbd.close()
