"""Shared fixtures: real STML processes on private ipc endpoints, and loopback
clients; and the suite's rules (CI turns skips into failures). The helpers the
fixtures use live in tests/support/ (procs: ports, dirs, stopping by PID;
target: the project's own processes).

Every process a fixture starts is stopped by its PID at teardown (SIGTERM, wait,
SIGKILL on timeout), so nothing outlives the test that started it.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fetd_loopback import LoopbackClient
from support.ci import CI_VAR
from support.procs import short_dir
from support.target import StmlProcess

pytest_plugins = ["pytester"]   # tests/test_ci_rules.py runs pytest on the hooks below

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


def _short_dirs() -> Iterator[Callable[[], Path]]:
    made: list[str] = []

    def make() -> Path:
        d = short_dir()
        made.append(d)
        return Path(d)

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmp_short() -> Iterator[Callable[[], Path]]:
    """Factory of short private directories under /tmp (ipc socket paths fit),
    removed at teardown."""
    yield from _short_dirs()


@pytest.fixture(scope="module")
def tmp_short_module() -> Iterator[Callable[[], Path]]:
    """tmp_short for a module-scoped fixture: removed after the module's last test."""
    yield from _short_dirs()


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
