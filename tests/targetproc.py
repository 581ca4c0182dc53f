"""Start a whole target (`scsi-target run`) for end-to-end tests and stop it by PID."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

IQN = "iqn.2026-11.org.scsi-target:disk0"


class Target:
    """`scsi-target run` on an ephemeral loopback port, in its own process group."""

    def __init__(self, *args: str, data_dir: str | None = None, portals: tuple[str, ...] = ("127.0.0.1:0",),
                 config: str | None = None) -> None:
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="st", dir="/tmp")
        cmd = [sys.executable, "-m", "scsi_target", "run", "--data-dir", self.data_dir, *args]
        if config:
            cmd += ["--config", config]
        for p in portals:
            cmd += ["--portal", p]
        self.log_path = Path(self.data_dir) / "target.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.portals: list[str] = []
        self._ready = threading.Event()
        self._attached = False
        self._expected = len(portals)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(20):
            self.stop()
            raise RuntimeError("target did not start:\n" + "".join(self.lines))

    def _pump(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                self.lines.append(line)
                log.write(line)
                log.flush()
                m = re.match(r"fetd_tcp: listening on (\S+)", line)
                if m:
                    self.portals.append(m.group(1))
                self._attached = self._attached or line.startswith("fetd_tcp: attached to STML")
                if self._attached and len(self.portals) >= self._expected:
                    self._ready.set()

    @property
    def portal(self) -> str:
        return self.portals[0]

    def url(self, lun: int = 0, iqn: str = IQN, auth: str = "", query: str = "") -> str:
        return f"iscsi://{auth}{self.portal}/{iqn}/{lun}{query}"

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything the supervisor left behind
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def cunit_verdicts(text: str) -> dict[str, str]:
    """Per-test verdict of an `iscsi-test-cu -v` run, by CUnit's own final word
    ("passed" / "FAILED"), plus "skipped" when the test said [SKIPPED] and passed.
    Tests that expect a command to fail print "[FAILED] ..." lines and still pass,
    so the verdict is the word CUnit prints last for the test, not any line."""
    verdicts: dict[str, str] = {}
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
        verdicts[f"{suite}.{test}"] = "skipped" if final == "passed" and skipped else final

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
    return verdicts
