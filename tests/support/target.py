"""The project's own processes for end-to-end tests, stopped by PID: a whole
target (`scsi-target run`, `Target`) and a bare STML (`python -m stml`,
`StmlProcess`; the conftest fixtures `stml_factory`, `stml` start these)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from stml.config import host_iqn
from support.procs import START_TIMEOUT, Proc, children_by_module, short_dir, stop_pid, wait_for_line

IQN = host_iqn()   # the default target's name in a new data dir on this host (0207)
LISTENING = re.compile(r"stml: listening on (\S+)")


class Target:
    """`scsi-target run` on an ephemeral loopback port, in a session of its own.
    Without a `data_dir` it makes a short one and removes it when stopped; a
    data dir it is given belongs to the caller (tmp_path, tmp_short)."""

    def __init__(self, *args: str, data_dir: str | None = None, portals: tuple[str, ...] = ("127.0.0.1:0",),
                 config: str | None = None, expect_portals: int | None = None,
                 env: dict[str, str] | None = None, wrap: tuple[str, ...] = ()) -> None:
        self.own_dir = data_dir is None
        self.data_dir = data_dir or short_dir()
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
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
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

    def kill_stml(self) -> None:
        """SIGKILL `run`'s STML (a crash) and wait until `run` has started
        another and it answers management (front ends may still be attaching:
        `wait-ready` waits for them)."""
        old = children_by_module(self.proc.pid)["stml"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while children_by_module(self.proc.pid).get("stml") in (None, old):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log()
            time.sleep(0.05)
        while subprocess.run([sys.executable, "-m", "scsi_target", "lun", "list", "--data-dir", self.data_dir],
                             capture_output=True, timeout=60, stdin=subprocess.DEVNULL).returncode != 0:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log()
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM `run` (it stops its children), SIGKILL what is left of its
        session; then the data dir goes if this Target made it."""
        stop_pid(self.proc, 15, session=True)
        self._pump_thread.join(5)   # the log file is closed before its directory goes
        if self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StmlProcess:
    """One STML process: `python -m stml --data-dir D --lun ...`, restartable
    (each generation logs to its own files under D/logs)."""

    START_TIMEOUT = START_TIMEOUT    # seconds to say it listens (a subclass under valgrind: longer)

    def __init__(self, data_dir: Path, luns: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.luns = luns
        self.extra = extra
        self.current: Proc | None = None
        self.endpoint: str | None = None
        self.generation = 0
        self.old_logs: list[str] = []

    @property
    def proc(self) -> subprocess.Popen:
        assert self.current is not None, "not started"
        return self.current.proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "stml", "--data-dir", str(self.data_dir)]
        for spec in self.luns:
            argv += ["--lun", spec]
        return argv + list(self.extra)

    def start(self) -> StmlProcess:
        self.generation += 1
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.current = Proc(self.argv(), logs / f"stml{self.generation}.out",
                            logs / f"stml{self.generation}.err")
        m = wait_for_line(self.current.out_path, LISTENING, self.current.proc, self.START_TIMEOUT)
        self.endpoint = m.group(1)
        return self

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()

    def kill(self) -> None:
        """SIGKILL: the STML vanishes without telling anyone."""
        if self.current is not None:
            self.current.kill()

    def restart(self) -> StmlProcess:
        """Stop (SIGTERM) and start again with the same arguments and data dir."""
        self.stop()
        self.old_logs.append(self.log())
        return self.start()

    def alive(self) -> bool:
        return self.current is not None and self.current.alive()

    def log(self) -> str:
        """What this generation of the process wrote to stderr (its log)."""
        return self.current.log() if self.current else ""

    def wait_log(self, needle: str, timeout: float = 15.0) -> str:
        assert self.current is not None, "not started"
        return self.current.wait_log(needle, timeout)


def _load_conformance():
    """scripts/conformance.py holds the one parser of iscsi-test-cu output."""
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "scripts" / "conformance.py"
    spec = importlib.util.spec_from_file_location("conformance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cunit_verdicts = _load_conformance().verdicts
