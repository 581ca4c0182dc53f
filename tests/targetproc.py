"""Start a whole target (`scsi-target run`) for end-to-end tests and stop it by PID."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

IQN = "iqn.2026-11.org.scsi-target:disk0"


class Target:
    """`scsi-target run` on an ephemeral loopback port, in its own process group."""

    def __init__(self, *args: str, data_dir: str | None = None, portals: tuple[str, ...] = ("127.0.0.1:0",),
                 config: str | None = None, expect_portals: int | None = None,
                 env: dict[str, str] | None = None, wrap: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="st", dir="/tmp")
        # `wrap`: a command that runs it, e.g. ("ip", "netns", "exec", NS): it execs, so the PID stays
        cmd = [*wrap, sys.executable, "-m", "scsi_target", "run", "--data-dir", self.data_dir, *args]
        if config:
            cmd += ["--config", config]
        for p in portals:
            cmd += ["--portal", p]
        self.log_path = Path(self.data_dir) / "target.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.portals: list[str] = []
        self._ready = threading.Event()
        self._attached = False
        self._expected = len(portals) if expect_portals is None else expect_portals
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
                # the children's lines, as `run` relays them in its log format
                m = re.search(r"fetd_tcp: listening on (\S+)", line)
                if m:
                    self.portals.append(m.group(1))
                self._attached = self._attached or "fetd_tcp: attached to STML" in line
                if self._attached and len(self.portals) >= self._expected or line.startswith("Ready. "):
                    self._ready.set()

    @property
    def portal(self) -> str:
        return self.portals[0]

    def url(self, lun: int = 0, iqn: str = IQN, auth: str = "", query: str = "") -> str:
        return f"iscsi://{auth}{self.portal}/{iqn}/{lun}{query}"

    def log(self) -> str:
        return "".join(self.lines)

    def wait_log(self, needle: str, timeout: float = 20.0) -> str:
        """The log once it holds `needle` (the banner follows readiness)."""
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{needle!r} not in the target's log:\n{self.log()}")
            time.sleep(0.05)
        return self.log()

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


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def children_by_module(pid: int) -> dict[str, int]:
    """The children of `pid` by the module each one runs (`python -m NAME`)."""
    found = {}
    for child in children_of(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue    # gone meanwhile
        if b"-m" in argv:   # not a zombie not yet reaped, nor a child between fork and exec
            found[argv[argv.index(b"-m") + 1].decode()] = child
    return found


def run(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def _load_conformance():
    """scripts/conformance.py holds the one parser of iscsi-test-cu output."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "scripts" / "conformance.py"
    spec = importlib.util.spec_from_file_location("conformance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cunit_verdicts = _load_conformance().verdicts
