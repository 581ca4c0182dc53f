"""A seconds-long run of scripts/bench.py: it starts, measures every workload
(and, with --cpu, each target process's CPU and sleeps per I/O) and writes its
JSON. Numbers are not asserted (performance is measured, not tested)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.procs import run

ROOT = Path(__file__).resolve().parent.parent


def bench(args: list[str], tmp_path: Path, shm: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """scripts/bench.py ARGS with its temporary directories in one of the test's
    own and its images in `shm`, both empty afterwards: the run removed what it made."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args, "--shm-dir", str(shm)],
            timeout=timeout, env={**os.environ, "TMPDIR": str(tmp)})
    assert not list(tmp.iterdir()), f"bench.py left {list(tmp.iterdir())}"
    assert not list(shm.iterdir()), f"bench.py left {list(shm.iterdir())}"
    return p


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-utils is not installed")
def test_bench_smoke(tmp_path, tmp_shm):
    out = tmp_path / "bench.json"
    args = ["--runs", "1", "--scale", "0.002", "--cpu", "--out", str(out)]
    if shutil.which("tgtd"):
        args.append("--compare-tgtd")
    bench(args, tmp_path, tmp_shm)
    results = json.loads(out.read_text())["workloads"]
    assert set(results) == {"4k-read-qd1", "4k-read-qd16", "4k-write-qd16", "64k-read-qd8",
                            "1m-seqread-qd8", "1m-seqwrite-qd8"}
    for row in results.values():
        assert row["scsi-target"]["iops"] > 0
        # --cpu found both of our processes and the supervisor, the initiator, the
        # kernel's softirq threads (where /proc shows them), and the whole machine (0417)
        cpu = row["scsi-target"]["cpu"]
        softirq = {name for name in cpu if name.startswith("ksoftirqd/")}
        assert bool(softirq) == _softirq_threads_shown()
        assert set(cpu) - softirq == {"stml", "fetd_tcp", "supervisor", "initiator", "machine"}
        for name, use in cpu.items():
            if name != "machine":
                assert set(use) == {"user_us", "system_us", "sleeps", "cpu_us"} and min(use.values()) >= 0
        assert cpu["initiator"]["cpu_us"] > 0 and cpu["machine"]["busy_us"] > 0
        if shutil.which("tgtd"):
            assert row["ratio"] > 0
            assert set(row["tgtd"]["cpu"]) - softirq == {"tgtd", "initiator", "machine"}
    if shutil.which("tgtd"):   # the chart of the ratios, beside the JSON
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _softirq_threads_shown() -> bool:
    """Whether /proc shows the kernel's ksoftirqd threads (not in a PID namespace)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith("ksoftirqd/"):
                return True
        except OSError:
            continue   # (ended meanwhile)
    return False


def test_bench_loopback_smoke(tmp_path, tmp_shm):
    out = tmp_path / "loop.json"
    bench(["--loopback", "--scale", "0.002", "--out", str(out)], tmp_path, tmp_shm)
    assert all(r["scsi-target"]["iops"] > 0 for r in json.loads(out.read_text())["workloads"].values())


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-utils is not installed")
def test_bench_thin_smoke(tmp_path, tmp_shm):
    """--thin: both targets get a sparse file, the same scattered writes leave
    them equally fragmented, then the 64 KiB reads run."""
    out = tmp_path / "thin.json"
    args = ["--thin", "--thin-dir", str(tmp_path), "--runs", "1", "--scale", "0.002", "--out", str(out)]
    if shutil.which("tgtd"):
        args.append("--compare-tgtd")
    bench(args, tmp_path, tmp_shm)
    results = json.loads(out.read_text())
    assert results["lun"] == "thin"
    assert set(results["workloads"]) == {"64k-read-qd8-thin"}
    assert results["workloads"]["64k-read-qd8-thin"]["scsi-target"]["iops"] > 0
    # 100 writes 20 KiB apart: one extent each, on both targets' files
    assert results["fragment"]["scsi-target"]["extents"] == 100
    if shutil.which("tgtd"):
        assert results["fragment"]["tgtd"]["extents"] == 100
    assert not list(tmp_path.glob("bench*/*.img"))   # the sparse files are removed


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-utils is not installed")
def test_bench_trace_smoke(tmp_path, tmp_shm):
    """--trace: the same reads on an untraced and a traced target; the traced
    one wrote a trace, and both report IOPS and CPU per read per process."""
    out = tmp_path / "trace.json"
    bench(["--trace", "--runs", "1", "--scale", "0.002", "--out", str(out)], tmp_path, tmp_shm)
    r = json.loads(out.read_text())
    assert r["mode"] == "trace" and r["plain_iops"] > 0 and r["traced_iops"] > 0 and r["ratio"] > 0
    assert r["trace_bytes"] > 0 and r["ios"] == 200
    assert set(r["cpu_us_per_io"]) == {"plain", "traced"}
    assert all(set(procs) == {"stml", "fetd_tcp"} for procs in r["cpu_us_per_io"].values())


@pytest.mark.skipif(not (shutil.which("cc") and Path("/usr/include/iscsi/iscsi.h").exists()),
                    reason="sessionload needs gcc and libiscsi-dev (scripts/test-deps installs them)")
def test_bench_sessions_smoke(tmp_path, tmp_shm):
    """--sessions: the scaling curve's every workload, spread and count runs,
    with latency percentiles, CPU per I/O of each process and RSS; its
    LUN files are removed."""
    out = tmp_path / "sessions.json"
    args = ["--sessions", "1,2", "--runs", "1", "--scale", "0.05", "--out", str(out)]
    tgtd = shutil.which("tgtd") is not None
    if tgtd:
        args.append("--compare-tgtd")
    bench(args, tmp_path, tmp_shm)   # its LUN files are gone from tmp_shm
    results = json.loads(out.read_text())
    assert results["session_counts"] == [1, 2]
    names = ["scsi-target", "tgtd"] if tgtd else ["scsi-target"]
    for workload in ("4k-randread-qd4", "64k-randread-qd4"):
        spreads = results["sessions"][workload]
        assert set(spreads["1-lun"]) == {"1", "2"} and set(spreads["n-luns"]) == {"2"}
        for row in [*spreads["1-lun"].values(), *spreads["n-luns"].values()]:
            for name in names:
                r = row[name]
                assert r["iops"] > 0 and 0 < r["p50_us"] <= r["p99_us"]
                procs = {"stml", "fetd_tcp"} if name == "scsi-target" else {"tgtd"}
                assert set(r["cpu"]) == procs | {"initiator"}
                assert set(r["rss_kib"]) == procs and min(r["rss_kib"].values()) > 0
            if tgtd:
                assert row["ratio"] > 0 and row["p99_ratio"] > 0
    assert set(results["rss_kib_at_most_sessions"]) == set(names)
    if tgtd:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_sessions_refuses_bad_counts():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--sessions", "0,2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "expected session counts from 1 to 1024 like 1,2,4, not '0,2'" in p.stderr.splitlines()[-1]


# what tgtd's bs_rbd does with its client's configuration (tgt usr/bs_rbd.c):
# rados_create as client.admin, the environment (CEPH_ARGS), then the conf= file
TGTD_LIBRADOS = """
import ctypes, sys
lib = ctypes.CDLL("librados.so.2")
c = ctypes.c_void_p()
assert lib.rados_create(ctypes.byref(c), None) == 0
assert lib.rados_conf_parse_env(c, None) == 0
assert lib.rados_conf_read_file(c, sys.argv[1].encode()) == 0
value = ctypes.create_string_buffer(64)
assert lib.rados_conf_get(c, b"rbd_cache", value, 64) == 0
print(value.value.decode())
"""


def test_bench_turns_tgtds_rbd_cache_off_whatever_the_conf_says(tmp_path):
    """bench.py --rbd runs tgtd's librbd without its cache (0411) even when
    the cluster's conf turns it on for tgtd's user in `[client.admin]`, which
    wins over a `[client]` section: librados itself (as tgtd's bs_rbd calls
    it, on the environment bench.py gives tgtd) reads rbd_cache false."""
    import ctypes.util
    import importlib.util
    if ctypes.util.find_library("rados") is None:
        pytest.fail("librados is not installed (apt-get install librados2)")
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_mod)
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:1\n[client.admin]\nrbd cache = true\n")
    images = bench_mod.RbdImages(str(conf), None, tmp_path)
    plain = {k: v for k, v in os.environ.items() if k != "CEPH_ARGS"}

    def rbd_cache(path: Path, env: dict[str, str]) -> str:
        return run([sys.executable, "-c", TGTD_LIBRADOS, str(path)], env=env, timeout=60).stdout.strip()
    copy = tmp_path / "copy.conf"     # the first way: a copy with the cache off in [client]
    copy.write_text(conf.read_text() + "\n[client]\nrbd cache = false\n")
    assert rbd_cache(copy, plain) == "true"
    assert rbd_cache(conf, images.tgtd_env()) == "false"


def test_each_target_is_warmed_up_once_then_who_goes_first_alternates():
    """A round's ratio compares two runs of that round; neither target always
    goes first after a workload change (decision 0423)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_order", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_mod)
    warmed: list[str] = []
    order = list(bench_mod.schedule(["ours", "tgtd"], 4, warmed.append))
    assert warmed == ["ours", "tgtd"]
    assert order == ["ours", "tgtd", "tgtd", "ours", "ours", "tgtd", "tgtd", "ours"]
