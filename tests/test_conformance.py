"""libiscsi's whole conformance suite (SCSI and iSCSI families, multipath URL,
read-only/removable/4K-physical LUNs) through scripts/conformance.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Known failures (none today), each to be explained in the README's Conformance
# section; the test fails on any other failure, and also when a known one starts
# passing (so the list cannot go stale).
KNOWN_FAILURES: set[str] = set()


@pytest.mark.skipif(not shutil.which("iscsi-test-cu"), reason="libiscsi-bin is not installed")
def test_conformance_runner_has_no_unknown_failures(tmp_path, tmp_short):
    out = tmp_path / "cu.json"
    tmp = tmp_short()   # the runner's temporary directories, which it must remove (short: ipc paths)
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "conformance.py"), "--json", str(out),
                        "--log", str(tmp_path / "cu.log")], capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "TMPDIR": str(tmp)})
    assert not list(tmp.iterdir()), f"conformance.py left {list(tmp.iterdir())}"
    results = json.loads(out.read_text())
    assert len(results) > 200, p.stdout[-2000:]
    failed = {t for t, v in results.items() if v == "failed"}
    assert failed == KNOWN_FAILURES, f"{p.stdout[-4000:]}"
    skipped = {t for t, v in results.items() if v == "skipped"}
    assert skipped == {"Sanitize.Reset"}, skipped
    assert p.stdout.strip().splitlines()[-1].endswith(f"{len(KNOWN_FAILURES)} failed, 1 skipped")
