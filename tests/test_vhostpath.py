"""scripts/vhostpath.py drives the real fetd_vhost and STML processes with
the Python master at QD1 (its own checks assert every command completes
GOOD with the bytes written the device must report) and prints the cost per
command. Numbers are printed, never asserted against a bound; what is
asserted is the notification pattern: one kick and one interrupt per
command (event index), never more."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "vhostpath.py"
LINE = re.compile(r"(\S+) +(scattered|contiguous) +cpu +[0-9.]+ us  wall +[0-9.]+ us  wake-ups [0-9.]+  "
                  r"STML cpu +[0-9.]+ us wake-ups [0-9.]+  "
                  r"kicks ([0-9.]+)  interrupts ([0-9.]+)(?:  ([0-9,]+) instructions \(fetd_vhost\))? per command")


@pytest.mark.parametrize("layout", [(), ("--contiguous",)])
def test_every_workload_runs_with_one_kick_and_one_interrupt_per_command(layout):
    p = subprocess.run([sys.executable, str(SCRIPT), "--count", "40", "--warmup", "5", *layout],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [LINE.fullmatch(line) for line in p.stdout.splitlines()]
    assert all(rows) and [m.group(1) for m in rows if m] == ["4k-read", "1m-read", "1m-write"], p.stdout
    for m in rows:
        assert m is not None and m.group(2) == ("contiguous" if layout else "scattered")
        assert (m.group(3), m.group(4)) == ("1.00", "1.00"), p.stdout


def test_instructions_are_counted_under_callgrind():
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is not installed (apt-get install valgrind)")
    p = subprocess.run([sys.executable, str(SCRIPT), "--instructions", "--workload", "4k-read",
                        "--count", "10", "--warmup", "5"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    m = LINE.fullmatch(p.stdout.strip())
    assert m and m.group(1) == "4k-read" and int(m.group(5).replace(",", "")) > 0, p.stdout


def test_a_callgrind_dump_counts_only_once_written_whole(tmp_path):
    """--instructions reads the dump once callgrind has written it whole (its
    `totals:` line is the last it writes), not after a fixed sleep: a dump
    cut anywhere before its end counts as not there yet. The count is the
    dump's `summary:` (what ran since the counters were zeroed). A real
    dump, of /bin/true."""
    import importlib.util
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is not installed (apt-get install valgrind)")
    out = tmp_path / "cg.out"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "/bin/true"],
                   capture_output=True, check=True, timeout=120)
    spec = importlib.util.spec_from_file_location("vhostpath", SCRIPT)
    assert spec is not None and spec.loader is not None
    vhostpath = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vhostpath)
    text = out.read_text()
    whole = int(re.findall(r"^summary: (\d+)$", text, re.M)[-1])
    assert whole > 0 and vhostpath.totals(str(out)) == whole
    cut = tmp_path / "cut"
    for end in (len(text) // 2, text.rindex("totals:"), len(text) - 3, len(text) - 1):
        cut.write_text(text[:end])
        assert vhostpath.totals(str(cut)) is None, end
