"""Shared fixtures: real STML processes on private ipc endpoints, and loopback clients.

Every process a fixture starts is stopped by its PID at teardown (SIGTERM, wait,
SIGKILL on timeout), so nothing outlives the test that started it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from fetd_loopback import LoopbackClient

pytest_plugins = ["pytester"]   # tests/test_ci_rules.py runs pytest on the hooks below

START_TIMEOUT = 15.0
LISTENING = re.compile(r"stml: listening on (\S+)")
# set by .ci/run: CI runs as root with every package of scripts/test-deps, so a
# test that skips there did not check what it claims, and is a failure
CI_VAR = "SCSI_TARGET_CI"


def need_root(what: str) -> None:
    """Skip unless we are root (a failure under CI, as every skip is)."""
    if os.geteuid() != 0:
        pytest.skip(f"{what}: needs root (the suite runs as root: docs/testing.md)")


def _skip_is_failure(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Under CI (SCSI_TARGET_CI=1) a skip becomes a failure that says why it skipped."""
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get(CI_VAR) == "1":
        longrepr = report.longrepr
        why = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{CI_VAR}=1: nothing may skip under CI (root, every package of "
                           f"scripts/test-deps): {why}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _skip_is_failure(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _skip_is_failure(outcome.get_result())


def stop_pid(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate one process we started, by its PID; kill it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_for_line(path: Path, pattern: re.Pattern, proc: subprocess.Popen,
                  timeout: float = START_TIMEOUT) -> re.Match:
    """Wait until `pattern` appears in the file a process writes its output to."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = pattern.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode} before "
                               f"printing {pattern.pattern!r}; output:\n{text}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern.pattern!r} from {proc.args} in {timeout}s:\n{text}")
        time.sleep(0.02)


def short_dir() -> str:
    """A directory whose ipc socket path stays well under the 107-byte sun_path limit."""
    return tempfile.mkdtemp(prefix="st", dir="/tmp")


class StmlProcess:
    """One STML process: `python -m stml --data-dir D --lun ...`."""

    def __init__(self, data_dir: Path, luns: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.luns = luns
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.endpoint: str | None = None
        self.generation = 0
        self.stdout_path: Path | None = None
        self.stderr_path: Path | None = None
        self.old_logs: list[str] = []

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
        self.stdout_path = logs / f"stml{self.generation}.out"
        self.stderr_path = logs / f"stml{self.generation}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        m = wait_for_line(self.stdout_path, LISTENING, self.proc)
        self.endpoint = m.group(1)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)

    def kill(self) -> None:
        """SIGKILL: the STML vanishes without telling anyone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def restart(self) -> StmlProcess:
        """Stop (SIGTERM) and start again with the same arguments and data dir."""
        self.stop()
        self.old_logs.append(self.log())
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """What this generation of the process wrote to stderr (its log)."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def wait_log(self, needle: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the STML log after {timeout}s:\n{text}")
            time.sleep(0.05)


@pytest.fixture
def tmp_short() -> Callable[[], Path]:
    """Factory of short private directories under /tmp, removed at teardown."""
    made: list[str] = []

    def make() -> Path:
        d = short_dir()
        made.append(d)
        return Path(d)

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def stml_factory(tmp_short) -> Callable[..., StmlProcess]:
    """start(*lun_specs, data_dir=None, extra=()) -> a running StmlProcess."""
    started: list[StmlProcess] = []

    def start(*luns: str, data_dir: Path | None = None, extra: tuple[str, ...] = ()) -> StmlProcess:
        # a config file names its LUNs itself (flags may then only repeat them)
        default = () if "--config" in extra else ("ram:64MiB",)
        p = StmlProcess(data_dir or tmp_short(), luns or default, extra)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def stml(stml_factory) -> StmlProcess:
    """An STML with one 64 MiB RAM LUN."""
    return stml_factory("ram:64MiB")


@pytest.fixture
def client_factory() -> Callable[..., LoopbackClient]:
    clients: list[LoopbackClient] = []

    def make(endpoint: str, **kw) -> LoopbackClient:
        kw.setdefault("timeout", 10)
        # a fresh initiator port per client: a fresh I_T nexus, never one left by another test
        kw.setdefault("initiator", f"iqn.2026-01.org.scsi-target.test:{uuid.uuid4().hex[:12]}")
        c = LoopbackClient(endpoint, **kw)
        c.open()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(stml, client_factory) -> LoopbackClient:
    """A loopback client on the `stml` fixture's STML."""
    return client_factory(stml.endpoint)
