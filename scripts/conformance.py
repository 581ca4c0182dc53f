#!/usr/bin/env python3
"""Run libiscsi's conformance suite (iscsi-test-cu) against a target this
script starts, and print a verdict per test and a summary line.

    scripts/conformance.py [--families SCSI,iSCSI] [--json out.json] [--log out.log]
    scripts/conformance.py --lun0 rbd:rbd/img,conf=/etc/ceph/ceph.conf   # LUN 0 from a spec

The target: LUN 0 a writable thin RAM LUN, LUN 1 read-only, LUN 2 removable,
LUN 3 with 8 logical blocks per physical block, and two portals in two portal groups (the second is the multipath URL).
Suites that need a read-only or removable medium run against those LUNs;
SANITIZE tests run with -S, one by one. Verdicts are CUnit's own final word
per test ("passed"/"FAILED"; a test that passes after printing [SKIPPED]
counts as skipped): tests that expect a command to fail print "[FAILED] ..."
lines and still pass. Exit status 1 when any test failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import tomlkit

IQN = "iqn.2026-11.org.scsi-target:disk0"
LUN_RO, LUN_REMOVABLE, LUN_4K_PHYSICAL = 1, 2, 3
# suites whose tests need a LUN with a property LUN 0 does not have
SPECIAL = {"SCSI.ReadOnly": LUN_RO, "SCSI.PreventAllow": LUN_REMOVABLE,
           "SCSI.StartStopUnit": LUN_REMOVABLE}
# tests this target cannot satisfy, and why (printed as skips, listed in the README)
# tests that need several logical blocks per physical block (LBPPB > 1)
NEED_LBPPB = ["SCSI.CompareAndWrite.InvalidDataOutSize", "SCSI.WriteSame10.InvalidDataOutSize",
              "SCSI.WriteSame10.UnmapUnaligned", "SCSI.WriteSame16.InvalidDataOutSize",
              "SCSI.WriteSame16.UnmapUnaligned"]
CANNOT = {
    "Sanitize.Reset": "needs a SANITIZE still running seconds after it started (a slow medium); "
                      "RAM and file LUNs finish at once",
}


def verdicts(text: str) -> dict[str, str]:
    """Per-test verdict from `iscsi-test-cu -v` output (see the module docstring)."""
    out: dict[str, str] = {}
    suite = test = None
    body: list[str] = []

    def close() -> None:
        if test is None:
            return
        final, skipped = "failed", False   # no verdict at all: the tool crashed
        for line in body:
            m = re.match(r"\s*(passed|FAILED)\b", line)
            if m:
                final = m.group(1).lower()
                break   # text after the verdict belongs to the next test's setup
            skipped = skipped or "[SKIPPED]" in line
        out[f"{suite}.{test}"] = "skipped" if final == "passed" and skipped else final

    for line in text.splitlines():
        m = re.match(r"^Suite: (\S+)", line)
        if m:
            close()
            suite, test, body = m.group(1), None, []
            continue
        m = re.match(r"^  Test: (\S+) \.\.\.(.*)$", line)
        if m:
            close()
            test, body = m.group(1), [m.group(2)]
            continue
        if line.startswith("Run Summary"):
            close()
            test, body = None, []
            continue
        if test is not None:
            body.append(line)
    close()
    return out


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_target(work: Path, lun0: str | None = None) -> tuple[subprocess.Popen, int, int]:
    p1, p2 = free_port(), free_port()
    # the suites send TARGET WARM/COLD RESET, which a target refuses unless allowed; a
    # config file that names the target names its LUNs too
    config = work / "conformance.toml"
    luns: list[dict[str, Any]] = [{"size": "128MiB"}, {"size": "16MiB", "ro": True}, {"size": "16MiB", "removable": True},
            {"size": "16MiB", "physical_block_exp": 3}]
    config.write_text(tomlkit.dumps({"target": [{
        "name": IQN, "target_reset": True,
        "lun": [{"lun": n, "backend": "ram", **lun} for n, lun in enumerate(luns)]}]}))
    if lun0:   # LUN 0 as a LUN spec says (e.g. an RBD image), the others as above
        from stml.config import parse_lun_spec
        doc = tomlkit.parse(config.read_text())
        doc["target"][0]["lun"][0] = {"lun": 0, **parse_lun_spec(lun0, "--lun0")}
        config.write_text(tomlkit.dumps(doc))
    cmd = [sys.executable, "-m", "scsi_target", "run", "--data-dir", str(work), "--config", str(config),
           "--portal", f"127.0.0.1:{p1}", "--portal", f"127.0.0.1:{p2},2", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    # ready once `run` says so: attached to the STML and listening on both
    # portals (the listeners open after attaching: a login before that is refused)
    for line in proc.stdout:
        if line.startswith("Ready. "):
            break
    else:
        raise RuntimeError("the target did not start")
    # keep reading its output so a chatty target never blocks on a full pipe
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, p1, p2


def cu(args: list[str], log: list[str], timeout: int) -> dict[str, str]:
    p = subprocess.run(["iscsi-test-cu", "-d", "-v", *args], capture_output=True, text=True,
                       timeout=timeout)
    log.append(f"$ iscsi-test-cu -d -v {' '.join(args)}\n{p.stdout}{p.stderr}")
    return verdicts(p.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="SCSI,iSCSI")
    ap.add_argument("--json", help="write {test: verdict} here")
    ap.add_argument("--log", help="write the full iscsi-test-cu output here")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--lun0", metavar="SPEC", help="LUN 0 from this LUN spec instead of 128 MiB of RAM")
    args = ap.parse_args()
    listing = subprocess.run(["iscsi-test-cu", "-l"], capture_output=True, text=True).stdout.split()
    work = Path(tempfile.mkdtemp(prefix="cu"))
    proc, p1, p2 = start_target(work, args.lun0)
    url = lambda port, lun: f"iscsi://127.0.0.1:{port}/{IQN}/{lun}"  # noqa: E731
    log: list[str] = []
    results: dict[str, str] = {}
    try:
        families = args.families.split(",")
        if "SCSI" in families:
            # first, before the family's resets leave unit attentions on every I_T nexus
            # single path: PreventAllow.2ITNexuses opens its own second nexus, and with a
            # multipath URL it would use that path, which still holds the unit attention
            # of the suite's earlier LUN reset (as MultipathIO.Reset requires)
            for spec, lun in SPECIAL.items():
                results.update(cu(["-t", spec, url(p1, lun)], log, args.timeout))
        for family in families:
            found = cu(["-t", family, url(p1, 0), url(p2, 0)], log, args.timeout)
            results.update({t: v for t, v in found.items() if t not in results or v != "skipped"})
        if "SCSI" in families:
            for name in NEED_LBPPB:
                found = cu(["-t", name, url(p1, LUN_4K_PHYSICAL)], log, args.timeout)
                results.update({t: v for t, v in found.items() if v != "skipped"})
            for name in listing:
                if name.startswith("SCSI.Sanitize.") and name.count(".") == 2:
                    short = name.split(".", 1)[1]
                    if short in CANNOT:
                        continue
                    results.update(cu(["-S", "-t", name, url(p1, 0)], log, args.timeout))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    for name, reason in CANNOT.items():
        if name in results or any(t.endswith(name) for t in listing):
            results[name] = "skipped"
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for name in sorted(results):
        v = results[name]
        counts[v] += 1
        note = f"  ({CANNOT[name]})" if name in CANNOT else ""
        print(f"{v.upper():8s} {name}{note}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.log:
        Path(args.log).write_text("\n".join(log))
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
