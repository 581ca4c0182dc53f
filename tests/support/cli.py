"""The management CLI as tests call it: `scsi-target ARGS` to its end, and its
--json answers (`mgmt`, `status`) parsed."""
from __future__ import annotations

import json
import subprocess
import sys


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`scsi-target ARGS`; with `check`, a non-zero exit fails the test with its output."""
    p = subprocess.run([sys.executable, "-m", "scsi_target", *args], capture_output=True, text=True,
                       timeout=60)
    if check and p.returncode:
        raise AssertionError(f"scsi-target {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def mgmt(data_dir: str, *args: str) -> dict | list:
    """A management command on the target of `data_dir`, its --json answer."""
    return json.loads(cli(*args, "--data-dir", data_dir, "--json").stdout)


def status(data_dir: str) -> dict:
    """`scsi-target status --json` of the target of `data_dir`."""
    return json.loads(cli("status", "--data-dir", data_dir, "--json").stdout)
