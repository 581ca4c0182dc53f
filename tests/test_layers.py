"""The import structure: the contracts in pyproject.toml ([tool.importlinter])
hold, a broken one is reported, and no import cycle exists anywhere; and
the rules the layering moved into one place stay there (sense codes in
stml.sense, reservation conflicts in the opcode table)."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stml import pr
from stml.api import Tmf
from stml.disk import DiskTemplate
from stml.emulator import Emulator
from stml.ops import Conflict, OpEntry

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["stml", "fetd_tcp", "fetd_vhost", "fetd_spi", "fetd_loopback", "backends", "scsi_target",
            "scsi_runtime"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under `root`, with pyproject.toml's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}   # one line per contract
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(root / "pyproject.toml"),
                           "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def import_graph(root: Path) -> dict[str, list[str]]:
    """Module -> the modules it imports, as grimp (import-linter's graph
    builder) finds them under `root`, in a process of its own: this one has
    the packages imported from elsewhere."""
    code = (f"import grimp, json; g = grimp.build_graph(*{PACKAGES!r}, cache_dir=None); "
            "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one
    module (Tarjan). A package's __init__ is a module of the graph, so a
    package and a module of its own that import each other are found too,
    which the acyclic_siblings contract, looking at siblings, does not see."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return sorted(found)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The packages and pyproject.toml, copied: a test breaks a rule in the copy."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_hold():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout


def test_no_import_cycle_in_any_package():
    graph = import_graph(ROOT)
    assert len(graph) > 80 and "stml.emulator" in graph["stml.server"]   # the whole graph, edges and all
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": ["e"], "e": ["d"], "f": ["a"]}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]


# (file in the copy, line added to it, the contract the report names as broken)
VIOLATIONS = [
    ("fetd_tcp/server.py", "from stml.emulator import Emulator",
     "Front ends and backends import nothing from stml but stml.api BROKEN"),
    ("backends/ram.py", "from stml import sense",
     "Front ends and backends import nothing from stml but stml.api BROKEN"),
    ("stml/sense.py", "from stml import ops",
     "The STML's layers: each imports only from the layers below it BROKEN"),
    ("stml/spc.py", "from stml import emulator",
     "The STML's layers: each imports only from the layers below it BROKEN"),
    ("scsi_runtime/logs.py", "import stml.api",
     "The CLI composes the front ends, which sit on the STML; process plumbing below all BROKEN"),
    ("stml/cdb.py", "from stml import ops",
     "No import cycles among the modules of any package BROKEN"),
]


@pytest.mark.parametrize("path,line,broken", VIOLATIONS, ids=[v[0] + ": " + v[1] for v in VIOLATIONS])
def test_a_forbidden_import_is_reported(copy, path, line, broken):
    assert lint_imports(copy).returncode == 0   # the copy as it is: kept
    target = copy / path
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    r = lint_imports(copy)
    assert r.returncode == 1, r.stdout
    assert broken in r.stdout
    importer = path.removesuffix(".py").replace("/", ".")
    assert importer in r.stdout   # the report names the import that breaks it


def test_a_new_stml_module_must_be_given_a_layer(copy):
    (copy / "stml" / "newthing.py").write_text("from stml import sense\n")
    r = lint_imports(copy)
    assert r.returncode == 1 and "stml.newthing" in r.stdout


def test_a_cycle_through_a_package_init_is_found(copy):
    """backends/__init__ imports backends.file (open_backend); a backends.file
    that imported the package back made the cycle this layering removed."""
    assert cycles(import_graph(copy)) == []
    f = copy / "backends" / "file.py"
    f.write_text(f.read_text().replace("from backends.base import BackendError",
                                       "from backends import BackendError"))
    assert cycles(import_graph(copy)) == [["backends", "backends.file"]]


# ------------------------------------------------------------- one place for each rule

def _sense_like(node: ast.AST, source: str) -> bool:
    """An (asc, ascq) pair as the STML writes them: two hex literals, (0x29, 0x07)."""
    return (isinstance(node, ast.Tuple) and len(node.elts) == 2
            and all(isinstance(e, ast.Constant) and type(e.value) is int
                    and (ast.get_source_segment(source, e) or "").lower().startswith("0x") for e in node.elts))


def sense_codes_outside_sense() -> list[str]:
    """Module-level names bound to (asc, ascq) pairs, or to sets, dicts and
    tuples holding them, in stml modules other than stml.sense."""
    found = []
    for path in sorted((ROOT / "stml").rglob("*.py")):
        if path.name == "sense.py" and path.parent.name == "stml":
            continue
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                if any(_sense_like(n, source) for n in ast.walk(node.value)):
                    names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                             if isinstance(t, ast.Name)]
                    found.append(f"{path.relative_to(ROOT)}: {', '.join(names)}")
    return found


def test_every_sense_code_is_defined_in_stml_sense():
    assert sense_codes_outside_sense() == []


def test_the_sense_code_check_finds_one_defined_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "stml").mkdir()
    shutil.copy(ROOT / "stml" / "sense.py", tmp_path / "stml" / "sense.py")
    (tmp_path / "stml" / "emulator.py").write_text("NEXUS_UNKNOWN = (0x08, 0x00)\nX = {1: (0x2C, 0x07)}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert sense_codes_outside_sense() == ["stml/emulator.py: NEXUS_UNKNOWN", "stml/emulator.py: X"]


def test_every_opcode_table_row_names_its_conflict_rule():
    """The table is the one source of reservation conflicts: a row cannot be
    made without a rule, and every row of the disk template has one."""
    rows = DiskTemplate().entries
    assert {e.opcode for e in rows} >= {0x28, 0x2A, 0x5E, 0x5F, 0xA3}   # pr's and alua's rows too
    assert all(isinstance(e.conflicts, Conflict) for e in rows)
    with pytest.raises(TypeError, match="conflicts"):
        OpEntry(0xC0, "VENDOR", bytes(6), DiskTemplate().entries[0].handler)   # type: ignore[call-arg]


def test_stml_pr_holds_no_opcode_sets():
    """Reservation rules were opcode sets in stml.pr that drifted from the table
    (they named opcodes it does not have): none is left there."""
    sets = [name for name, value in vars(pr).items()
            if isinstance(value, (set, frozenset)) and value and all(type(v) is int for v in value)]
    assert sets == []


@pytest.mark.parametrize("rtype,rule,conflicts", [
    (pr.WE, Conflict.READ, False), (pr.WE, Conflict.WRITE, True), (pr.EA, Conflict.READ, True),
    (pr.EA, Conflict.WRITE, True), (pr.EA, Conflict.SPC2, False), (pr.EA, Conflict.NONE, False),
])
def test_a_rule_meets_a_persistent_reservation_of_another_nexus(rtype, rule, conflicts):
    holder, other = pr.Port("iqn.a,i,0x1", "t", 1), pr.Port("iqn.b,i,0x2", "t", 1)
    st = pr.PrState("t", 0)
    st.prout(holder, pr.REGISTER, 0, 0, pr.PrParams(sark=1))
    st.prout(holder, pr.RESERVE, 0, rtype, pr.PrParams(rk=1))
    assert st.conflicts(other, rule) is conflicts
    assert st.conflicts(holder, rule) is False


@pytest.mark.parametrize("rule,conflicts", [
    (Conflict.NONE, False), (Conflict.SPC2, True), (Conflict.READ, True), (Conflict.WRITE, True)])
def test_a_rule_meets_an_spc2_reservation_of_another_nexus(rule, conflicts):
    holder, other = pr.Port("iqn.a,i,0x1", "t", 1), pr.Port("iqn.b,i,0x2", "t", 1)
    st = pr.PrState("t", 0)
    st.reserve6(holder)
    assert st.conflicts(other, rule) is conflicts


def test_task_management_dispatch_is_a_table():
    """Every function of the contract has a row but TASK REASSIGN (a
    transport's own, answered NOT SUPPORTED here)."""
    assert set(Tmf) - set(Emulator.TMFS) == {Tmf.TASK_REASSIGN}
    lun_scoped = {fn for fn, row in Emulator.TMFS.items() if row.lun_scoped}
    assert lun_scoped == {Tmf.ABORT_TASK_SET, Tmf.CLEAR_TASK_SET, Tmf.LUN_RESET, Tmf.QUERY_TASK_SET,
                          Tmf.QUERY_ASYNC_EVENT, Tmf.CLEAR_ACA}
