"""A seconds-long run of scripts/sched_bench.py: both policies, the table,
the JSON and the chart. Latencies are measured, never asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from support.procs import run

ROOT = Path(__file__).resolve().parent.parent


def test_sched_bench_smoke(tmp_path):
    out = tmp_path / "sched.json"
    p = run([sys.executable, str(ROOT / "scripts" / "sched_bench.py"), "--runs", "1",
             "--scale", "0.05", "--size-mib", "64", "--dir", str(tmp_path), "--out", str(out)], timeout=600)
    assert "QD1 loaded p50" in p.stdout
    results = json.loads(out.read_text())
    assert set(results["policies"]) == {"fifo", "fair"}
    for row in results["policies"].values():
        assert row["p50"] > 0 and row["alone_p50"] > 0 and row["deep_iops"] > 0
        assert len(row["rounds"]) == 1
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("sched-bench-*.img"))     # the image is gone
