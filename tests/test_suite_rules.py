"""The suite's own layout, so a newcomer finds their way: tests/ holds
conftest.py and test modules only, what tests share lives in tests/support/,
and no test module imports another (nor conftest, which pytest loads itself)."""
from __future__ import annotations

import ast
from pathlib import Path

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
