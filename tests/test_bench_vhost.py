"""A seconds-long run of `scripts/bench.py --vhost`: it boots its guest with
both disks, runs every workload on each, and writes its JSON. Numbers are
not asserted (performance is measured, not tested)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from support import guest as G
from support.procs import run

pytestmark = pytest.mark.guest
ROOT = Path(__file__).resolve().parent.parent


def test_bench_vhost_smoke(tmp_path, tmp_shm):
    try:
        G.kernel()
        G.qemu_binary()
    except G.GuestUnavailable as e:
        pytest.skip(str(e))
    if not shutil.which("cc"):
        pytest.skip("no C compiler for scripts/guestio.c")
    out = tmp_path / "vhost.json"
    # past the timeout, SIGTERM: bench.py stops its guest and target and removes its images
    run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--vhost", "--runs", "2", "--scale", "0.01",
         "--shm-dir", str(tmp_shm), "--out", str(out)], timeout=600)
    assert not list(tmp_shm.iterdir())
    results = json.loads(out.read_text())
    assert results["accel"] in ("kvm", "tcg")
    assert set(results["workloads"]) == {"1m-seqread", "1m-seqwrite", "4k-randread"}
    for row in results["workloads"].values():
        assert len(row["scsi-target"]["samples"]) == len(row["qemu"]["samples"]) == 2
        assert row["ratio"] > 0
    # the guest's own count of the commands each disk completed: every I/O is
    # at least one command (QEMU 7.2's vhost-user-scsi-pci allows 126 segments
    # per command, so a 1 MiB read of scattered pages may take two)
    for name, row in results["workloads"].items():
        for t in ("scsi-target", "qemu"):
            assert row[t]["commands_per_io"] >= 1.0, (name, t, row[t])
    assert results["workloads"]["4k-randread"]["scsi-target"]["commands_per_io"] == pytest.approx(1.0, abs=0.05)
