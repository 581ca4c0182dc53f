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

ROOT = Path(__file__).resolve().parent.parent


def bench(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """scripts/bench.py ARGS with its temporary directories in one of the test's
    own, which must be empty afterwards: the run removed what it made."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert p.returncode == 0, p.stdout + p.stderr
    assert not list(tmp.iterdir()), f"bench.py left {list(tmp.iterdir())}"
    return p


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-utils is not installed")
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--runs", "1", "--scale", "0.002", "--cpu", "--out", str(out)]
    if shutil.which("tgtd"):
        args.append("--compare-tgtd")
    bench(args, tmp_path)
    results = json.loads(out.read_text())["workloads"]
    assert set(results) == {"4k-read-qd1", "4k-read-qd16", "4k-write-qd16", "64k-read-qd8",
                            "1m-seqread-qd8", "1m-seqwrite-qd8"}
    for row in results.values():
        assert row["scsi-target"]["iops"] > 0
        # --cpu found both of our processes (the supervisor itself is left out)
        assert set(row["scsi-target"]["cpu"]) == {"stml", "fetd_tcp"}
        for use in row["scsi-target"]["cpu"].values():
            assert set(use) == {"user_us", "system_us", "sleeps"} and min(use.values()) >= 0
        if shutil.which("tgtd"):
            assert row["ratio"] > 0
            assert set(row["tgtd"]["cpu"]) == {"tgtd"}
    if shutil.which("tgtd"):   # the chart of the ratios, beside the JSON
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_loopback_smoke(tmp_path):
    out = tmp_path / "loop.json"
    bench(["--loopback", "--scale", "0.002", "--out", str(out)], tmp_path)
    assert all(r["scsi-target"]["iops"] > 0 for r in json.loads(out.read_text())["workloads"].values())


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-utils is not installed")
def test_bench_thin_smoke(tmp_path):
    """--thin: both targets get a sparse file, the same scattered writes leave
    them equally fragmented, then the 64 KiB reads run."""
    out = tmp_path / "thin.json"
    args = ["--thin", "--thin-dir", str(tmp_path), "--runs", "1", "--scale", "0.002", "--out", str(out)]
    if shutil.which("tgtd"):
        args.append("--compare-tgtd")
    bench(args, tmp_path)
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
def test_bench_trace_smoke(tmp_path):
    """--trace: the same reads on an untraced and a traced target; the traced
    one wrote a trace, and both report IOPS and CPU per read per process."""
    out = tmp_path / "trace.json"
    bench(["--trace", "--runs", "1", "--scale", "0.002", "--out", str(out)], tmp_path)
    r = json.loads(out.read_text())
    assert r["mode"] == "trace" and r["plain_iops"] > 0 and r["traced_iops"] > 0 and r["ratio"] > 0
    assert r["trace_bytes"] > 0 and r["ios"] == 200
    assert set(r["cpu_us_per_io"]) == {"plain", "traced"}
    assert all(set(procs) == {"stml", "fetd_tcp"} for procs in r["cpu_us_per_io"].values())
