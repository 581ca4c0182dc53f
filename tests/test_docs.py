"""The docs hold together: every relative link resolves, and every decision
record is listed in the decisions index."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_relative_links_resolve() -> None:
    broken = []
    for doc in doc_files():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue   # a URL or an anchor in the same page
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_every_decision_is_indexed() -> None:
    folder = ROOT / "docs" / "decisions"
    index = (folder / "README.md").read_text()
    missing = [p.name for p in folder.glob("[0-9]*.md") if f"({p.name})" not in index]
    assert not missing, f"not in docs/decisions/README.md: {missing}"


def _fenced_commands(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", text, re.S)


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    """The README starts with two commands; CI runs the second, verbatim."""
    readme = (ROOT / "README.md").read_text()
    install, tests = _fenced_commands(readme)[:2]
    assert "scsi-target run" in install
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests.strip() in [line.strip() for line in ci if not line.startswith("#")]


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
