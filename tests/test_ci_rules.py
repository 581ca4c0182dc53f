"""The suite's own rules (tests/conftest.py): under CI (SCSI_TARGET_CI=1, set
by .ci/run) a test that would skip fails, with its reason; elsewhere it skips
with that reason."""
from __future__ import annotations

import os

import pytest

from conftest import CI_VAR, need_root

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


def test_need_root_skips_with_a_reason_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="network namespaces: needs root"):
        need_root("network namespaces")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    need_root("network namespaces")


def test_ci_sets_the_variable_before_the_readmes_command():
    """.ci/run exports it; the command itself stays the README's (tests/test_docs.py)."""
    from pathlib import Path
    lines = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text().splitlines()
    command = next(i for i, line in enumerate(lines) if line.startswith("scripts/test-deps"))
    assert f"export {CI_VAR}=1" in lines[:command]
