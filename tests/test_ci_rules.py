"""The suite's own rules (tests/conftest.py): under CI (SCSI_TARGET_CI=1, set
by .ci/run) a test that would skip fails, with its reason; elsewhere it skips
with that reason."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.ci import CI_VAR, need_root
from support.procs import SESSION_SHM, SESSION_TMP

INNER = """
import pytest

def test_needs_a_package():
    pytest.skip("frobnicator is not installed")

@pytest.mark.skipif(True, reason="marked: not here")
def test_marked():
    pass

@pytest.fixture
def netns():
    pytest.skip("fixture: no namespaces")

def test_from_a_fixture(netns):
    pass

@pytest.mark.xfail(reason="a known failure is not a skip", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
"""


def test_a_skip_fails_under_ci_and_says_why(pytester, monkeypatch):
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv(CI_VAR, "1")
    r = pytester.runpytest("-p", "conftest")
    r.assert_outcomes(passed=1, failed=1, errors=2, xfailed=1)   # setup skips: errors
    text = r.stdout.str()
    for why in ("frobnicator is not installed", "marked: not here", "fixture: no namespaces"):
        assert f"{CI_VAR}=1: nothing may skip under CI" in text and why in text


def test_without_ci_a_skip_is_a_skip_with_its_reason(pytester, monkeypatch):
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.delenv(CI_VAR, raising=False)
    r = pytester.runpytest("-p", "conftest", "-rs")
    r.assert_outcomes(passed=1, skipped=3, xfailed=1)
    r.stdout.fnmatch_lines(["*frobnicator is not installed*", "*marked: not here*", "*fixture: no namespaces*"])


def test_a_module_that_skips_whole_fails_under_ci(pytester, monkeypatch):
    pytester.makepyfile(test_inner='import pytest\npytest.skip("no tool", allow_module_level=True)\n')
    monkeypatch.setenv(CI_VAR, "1")
    r = pytester.runpytest("-p", "conftest")
    assert r.ret != 0 and "no tool" in r.stdout.str()


LEAKY = """
import os
from support.procs import shm_dir, short_dir

def test_leaves_two_behind():
    open(os.path.join(short_dir(), "target.log"), "w").close()
    shm_dir()

def test_removes_its_own(tmp_short):
    tmp_short()
"""


def test_what_a_session_leaves_behind_fails_it_and_is_removed(pytester, monkeypatch):
    """A session of its own (no parents set yet): its tests pass, but the two
    directories one of them left fail the session, are named, and are gone."""
    for var in (SESSION_TMP, SESSION_SHM):
        monkeypatch.delenv(var)
    pytester.makepyfile(test_inner=LEAKY)
    r = pytester.runpytest("-p", "conftest")
    r.assert_outcomes(passed=2)
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    left = re.findall(r"^  (/\S+)$", r.stderr.str(), re.M)
    assert len(left) == 2 and any(p.startswith("/tmp/st") for p in left), r.stderr.str()
    assert not any(os.path.exists(p) or os.path.exists(os.path.dirname(p)) for p in left)


def test_a_session_that_leaves_nothing_passes(pytester, monkeypatch):
    for var in (SESSION_TMP, SESSION_SHM):
        monkeypatch.delenv(var)
    pytester.makepyfile(test_inner="def test_removes_its_own(tmp_short):\n    tmp_short()\n")
    r = pytester.runpytest("-p", "conftest")
    assert r.ret == pytest.ExitCode.OK and "left these behind" not in r.stderr.str()


FAILED_FUTURES = """
import asyncio

def test_leaves_a_failed_future():
    async def main():
        asyncio.get_running_loop().create_future().set_exception(RuntimeError("nobody took me"))
    asyncio.run(main())

def test_takes_its_own():
    async def main():
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(RuntimeError("taken"))
        fut.exception()
    asyncio.run(main())
"""


def test_a_test_that_leaves_a_failed_future_fails_naming_it(pytester):
    """asyncio logs a future whose exception nobody took when the GC frees it,
    from wherever that runs (on 3.11, inside ast.parse: a crash, 0418): the
    test that left one fails in its teardown, naming the future (0715)."""
    pytester.makepyfile(test_inner=FAILED_FUTURES)
    r = pytester.runpytest("-p", "conftest")
    r.assert_outcomes(passed=2, errors=1)
    r.stdout.fnmatch_lines(["*ERROR at teardown of test_leaves_a_failed_future*",
                            "*left a future whose exception nobody retrieved*",
                            "*RuntimeError('nobody took me')*"])
    assert "test_takes_its_own" not in r.stdout.str()


def test_need_root_skips_with_a_reason_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="network namespaces: needs root"):
        need_root("network namespaces")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    need_root("network namespaces")


def test_ci_sets_the_variable_before_the_readmes_command():
    """.ci/run exports it; the command itself stays the README's (tests/test_docs.py)."""
    lines = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text().splitlines()
    command = next(i for i, line in enumerate(lines) if line.startswith("scripts/test-deps"))
    assert f"export {CI_VAR}=1" in lines[:command]


# every test that makes network namespaces (or binds UDP port 427 in one)
NAMESPACE_TESTS = ("tests/test_slp_e2e.py", "tests/test_rbd_gateways.py",
                   "tests/test_remote_fe.py::test_remote_front_end_over_curve")


def test_tests_that_need_namespaces_skip_without_the_rights_to_make_them():
    """Not root, or root without capabilities (an unprivileged container):
    the namespace tests skip, each with its reason, and none errors (the SLP
    fixture raised CalledProcessError, the gateways' bridge RuntimeError)."""
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *NAMESPACE_TESTS]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")   # util-linux: root, with no capability left
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is not installed")
        argv = [setpriv, "--inh-caps=-all", "--bounding-set=-all", "--", *argv]
    env = {k: v for k, v in os.environ.items() if k != CI_VAR}
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    # every one of them skipped (however many there are): none passed, failed or errored
    assert p.returncode == 0 and re.search(r"^\d+ skipped in ", p.stdout, re.M), p.stdout[-3000:]
    reasons = re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", p.stdout, re.M)
    assert reasons and all(re.search(r"needs root|cannot create|cannot make|not installed", r)
                                     for r in reasons), reasons
