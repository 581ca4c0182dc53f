"""Shared fixtures: real STML processes on private ipc endpoints, and loopback
clients; and the suite's rules (CI turns skips into failures). The helpers the
fixtures use live in tests/support/ (procs: ports, dirs, stopping by PID;
target: the project's own processes).

Every process a fixture starts is stopped by its PID at teardown (SIGTERM, wait,
SIGKILL on timeout), so nothing outlives the test that started it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

# the pure-Python tree is what the suite tests, even where a compiled build is
# built (`scsi-target run` would use it); SCSI_TARGET_ACCEL=DIR runs the suite
# on DIR's build (tests/test_accel.py does, on a part of it; decisions/0830)
os.environ.setdefault("SCSI_TARGET_ACCEL", "0")

from fetd_loopback import LoopbackClient  # noqa: E402
from support.ci import CI_VAR
from support.kinds import KINDS, kind_of
from support.procs import SESSION_SHM, SESSION_TMP, shm_dir, short_dir
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


# ---------------------------------------------------------------- kinds of test
# Every test is unit, process or system, from the tables of tests/support/kinds.py
# (docs/testing.md); tests/test_suite_rules.py checks that each test has one.

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "originalname", item.name)
        kind = kind_of(item.path.name, function)
        if kind is not None and not any(item.get_closest_marker(k) for k in KINDS):
            item.add_marker(kind)


# The unit marker cannot lie: while a unit test sets up or runs, starting a
# process from its thread (or a thread it started) raises. An audit hook sees
# every way Python starts one; threads left running by earlier tests are not
# the unit test's doing and are let be.
SPAWNS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                    "os.exec", "os.system"})


class _UnitGuard:
    active = False
    older_threads: frozenset[int] = frozenset()


def _no_process_in_a_unit_test(event: str, args: tuple) -> None:
    if event in SPAWNS and _UnitGuard.active and (
            threading.current_thread() is threading.main_thread()
            or threading.get_ident() not in _UnitGuard.older_threads):
        raise RuntimeError(f"a test marked unit started a process ({event} {args[:2]!r}); "
                           f"mark it process (tests/support/kinds.py)")


sys.addaudithook(_no_process_in_a_unit_test)


@contextlib.contextmanager
def _unit_guard(item: pytest.Item) -> Iterator[None]:
    saved = _UnitGuard.active, _UnitGuard.older_threads
    _UnitGuard.active = item.get_closest_marker("unit") is not None
    _UnitGuard.older_threads = frozenset(t.ident for t in threading.enumerate() if t.ident is not None)
    try:
        yield
    finally:
        _UnitGuard.active, _UnitGuard.older_threads = saved


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _unit_guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _unit_guard(item):
        yield


# ---------------------------------------------------------------- nothing left behind
# The session makes one parent in /tmp and one in /dev/shm for what its tests make
# (support.procs short_dir, shm_dir); anything still inside at the end was leaked
# by one of them, and fails the session. A pytest run inside this one (pytester,
# a script's) finds the names set and leaves the parents to their owner.

PARENTS = pytest.StashKey[dict[str, str]]()


def pytest_configure(config: pytest.Config) -> None:
    if any(var in os.environ for var in (SESSION_TMP, SESSION_SHM)):
        return
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    made = {SESSION_TMP: tempfile.mkdtemp(prefix="st", dir="/tmp"),
            SESSION_SHM: tempfile.mkdtemp(prefix="st", dir=shm)}
    config.stash[PARENTS] = made
    os.environ.update(made)
    # a SIGTERM (a runner's timeout) unwinds like ^C, so fixtures still stop their
    # processes and remove their directories instead of leaving both behind
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def leftovers(parents: dict[str, str]) -> list[str]:
    """What is inside the session's parents."""
    return sorted(os.path.join(d, name) for d in parents.values() if os.path.isdir(d)
                  for name in os.listdir(d))


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session: pytest.Session):
    yield   # after every other hook: the last fixtures are torn down by now
    made = session.config.stash.get(PARENTS, None)
    if made is None:
        return
    left = leftovers(made)
    for d in made.values():
        shutil.rmtree(d, ignore_errors=True)
    if left:
        sys.stderr.write("tests left these behind (a fixture or helper that does not remove what "
                         "it made):\n" + "".join(f"  {p}\n" for p in left))
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    for var in config.stash.get(PARENTS, {}):
        os.environ.pop(var, None)


# ---------------------------------------------------------------- failed futures left
# A future or task whose exception nobody took is logged by asyncio when it is
# collected, from wherever the collection then runs: on CPython 3.11 inside the
# traceback module's ast.parse, which crashed a session's end (decision 0418,
# 0715). Each test's garbage is collected as it ends; a test that left one fails,
# naming it (an error in its teardown).

class _Unretrieved(logging.Handler):
    """asyncio's "... exception was never retrieved" lines, as they come."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "exception was never retrieved" in text:
            self.seen.append(" ".join(text.splitlines()[:2]))


UNRETRIEVED = _Unretrieved()
logging.getLogger("asyncio").addHandler(UNRETRIEVED)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection made (modules, test items) stays to the end: frozen out of
    later collections, so each test's teardown collects only what came since."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _no_failed_future_left() -> Iterator[None]:
    """Autouse, so set up first and torn down last: after the test's fixtures."""
    UNRETRIEVED.seen.clear()   # (what an earlier module's fixtures left is not this test's)
    yield
    gc.collect()
    left, UNRETRIEVED.seen[:] = list(UNRETRIEVED.seen), []
    if left:
        pytest.fail("the test left a future whose exception nobody retrieved (handle or retrieve it "
                    "where it is made):\n  " + "\n  ".join(left), pytrace=False)


# ---------------------------------------------------------------- fixtures

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
def tmp_shm() -> Iterator[Path]:
    """A private directory in /dev/shm (big images in memory), removed at teardown."""
    d = shm_dir()
    yield Path(d)
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
