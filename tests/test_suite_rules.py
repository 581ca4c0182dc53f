"""The suite's own layout, so a newcomer finds their way: tests/ holds
conftest.py and test modules only, what tests share lives in tests/support/,
and no test module imports another (nor conftest, which pytest loads itself).
Every test is of one kind, unit, process or system (tests/support/kinds.py),
and a unit test that starts a process fails."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from support.ci import CI_VAR
from support.kinds import KIND_OF_MODULE, KIND_OF_TEST, KINDS

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    return name == "conftest" or name.split(".")[-1].startswith("test_")


def imported_test_modules(source: str) -> list[str]:
    """The test modules (and conftest) a module's source imports, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _is_test_module(node.module):
                found.append(node.module)
            elif node.module == "support" or node.module.startswith("support."):
                continue
            else:
                found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("test_")]
    return found


def test_no_test_module_imports_another() -> None:
    offenders = {}
    for path in sorted([*TESTS.glob("*.py"), *(TESTS / "support").glob("*.py")]):
        found = imported_test_modules(path.read_text())
        if found:
            offenders[str(path.relative_to(TESTS))] = found
    assert not offenders, f"move what they share to tests/support/: {offenders}"


def test_the_import_check_sees_every_form() -> None:
    """The check above cannot pass by missing an import form."""
    for source in ("from test_faults import children", "import test_faults",
                   "def f():\n    from conftest import need_root\n", "import test_mgmt as m",
                   "from conftest import stop_pid"):
        assert imported_test_modules(source), source
    for source in ("from support.target import Target", "import pytest", "from stml.api import Op",
                   "from support import fuzzgen as G"):
        assert not imported_test_modules(source), source


def test_tests_holds_test_modules_and_conftest_only() -> None:
    """A helper module beside the tests looks like a test module that lost its tests."""
    stray = [p.name for p in TESTS.glob("*.py") if not _is_test_module(p.stem)]
    assert not stray, f"helpers belong in tests/support/: {stray}"
    helpers = {p.stem for p in (TESTS / "support").glob("*.py")}
    assert not {h for h in helpers if _is_test_module(h)}, "tests/support/ holds no tests"


def _functions(module: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(module.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_kind_tables_name_every_module_and_only_real_tests() -> None:
    modules = {p.name for p in TESTS.glob("test_*.py")}
    assert not modules - set(KIND_OF_MODULE), f"add to tests/support/kinds.py: {sorted(modules - set(KIND_OF_MODULE))}"
    assert not set(KIND_OF_MODULE) - modules, f"no such module: {sorted(set(KIND_OF_MODULE) - modules)}"
    stale = [name for name in KIND_OF_TEST
             if name.split("::")[1] not in _functions(TESTS / name.split("::")[0])]
    assert not stale, f"no such test (renamed?): {stale}"
    assert set(KIND_OF_MODULE.values()) | set(KIND_OF_TEST.values()) <= set(KINDS)


# selects a test with no kind, with two, or a guest test that is not `system`
NOT_ONE_KIND = ("not (unit or process or system) or (unit and process) or (unit and system) "
                "or (process and system) or (guest and not system)")


def test_every_test_has_exactly_one_kind() -> None:
    """Collected as the README's command collects them: each test carries one
    of the three markers, so -m unit, -m process and -m system split the suite."""
    env = {k: v for k, v in os.environ.items() if k != CI_VAR}
    p = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                        "-m", NOT_ONE_KIND], cwd=TESTS.parent, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 5, f"tests without exactly one kind:\n{p.stdout[-5000:]}{p.stderr[-2000:]}"
    m = re.search(r"(\d+) deselected", p.stdout)
    assert m and int(m.group(1)) > 900, p.stdout[-2000:]


GUARDED = """
import subprocess
import pytest

@pytest.mark.unit
def test_unit_that_starts_a_process():
    subprocess.run(["true"], check=True)

@pytest.mark.process
def test_process_that_starts_one():
    subprocess.run(["true"], check=True)

@pytest.mark.unit
def test_unit_that_starts_none():
    pass
"""


def test_a_unit_test_that_starts_a_process_fails(pytester) -> None:
    pytester.makepyfile(test_inner=GUARDED)
    r = pytester.runpytest("-p", "conftest")
    r.assert_outcomes(passed=2, failed=1)
    r.stdout.fnmatch_lines(["*test_unit_that_starts_a_process*",
                            "*a test marked unit started a process (subprocess.Popen*mark it process*"])
