"""scripts/rbdpath.py builds its stand-in librbd, runs reads and writes through
the RBD backend's aio path and through the STML's whole receive path (its own
checks assert the reads brought their data and the commands succeed) and
prints a cost per command. Numbers are printed, never asserted against a
bound."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rbdpath.py"


@pytest.mark.parametrize("stml", [False, True])
@pytest.mark.parametrize("write", [False, True])
def test_the_path_runs_and_reports_time(write, stml):
    if shutil.which("cc") is None:
        pytest.fail("cc is not installed (apt-get install gcc)")
    p = subprocess.run([sys.executable, str(SCRIPT), "--count", "256", *(["--write"] if write else []),
                        *(["--stml"] if stml else [])], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.fullmatch(r"(stml )?4 KiB (read|write): ([0-9.]+) us per command\n", p.stdout)
    assert m and bool(m.group(1)) == stml and m.group(2) == ("write" if write else "read"), p.stdout
    assert float(m.group(3)) > 0
