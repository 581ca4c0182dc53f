"""The optional compiled build of the hot modules (scripts/build-accel, decision 0830).

A build lives in a directory of its own with a manifest of the SHA-256 of
every source it was compiled from. It is loaded all or nothing: mypyc's
modules call each other's functions directly, so one edited module run as
Python beside compiled callers would still not run for them. A build whose
hashes do not all match the tree is never loaded.

SCSI_TARGET_ACCEL=DIR loads DIR's build in any process that imports stml,
fetd_tcp or fetd_vhost (and refuses to start, in one line, if it is stale);
SCSI_TARGET_ACCEL=0 or unset loads none. `scsi-target run` sets it for its
children when this tree's build/accel is fresh (`for_children`).
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

ENV = "SCSI_TARGET_ACCEL"
GROUP = "scsi_target_accel"     # mypyc's shared library: GROUP__mypyc
MANIFEST = "accel.json"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "build" / "accel"

# What a command spends its Python in (pathcost + cProfile, decision 0830): the
# STML's receive path and command handling, the contract's carriers and
# headers, fetd_tcp's PDU codec and session core; fetd_vhost's descriptor walk,
# guest memory translation, copies and request path (vhostpath, decision 0307);
# the RBD backend's aio submit and collect (rbdpath, decision 0412).
HOT = (
    "stml.api.sizes", "stml.api.shm", "stml.api.stream", "stml.api.link",
    "stml.sense", "stml.metrics", "stml.cdb", "stml.workers", "stml.sched", "stml.lu", "stml.task",
    "stml.ops", "stml.sbc", "stml.disk", "stml.emulator", "stml.server",
    "fetd_tcp.pdu", "fetd_tcp.budget", "fetd_tcp.session", "fetd_tcp.wire", "fetd_tcp.server",
    "fetd_vhost.memory", "fetd_vhost.virtqueue", "fetd_vhost.scsi", "fetd_vhost.server",
    "backends.rbd",
)
# C helpers the build compiles beside them (module: source), each a shortcut
# whose module falls back to Python without a build: the RBD aio path's
# foreign calls, one per command (decision 0421); fetd_vhost's copies across
# a chain's guest pages, one per transfer (decision 0313).
C_HELPERS = {"backends._rbdaio": "backends/rbdaio.c", "fetd_vhost._vcopy": "fetd_vhost/vcopy.c"}


def _ext() -> str:
    """The file name ending of this interpreter's extension modules."""
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def source_of(module: str) -> str:
    """The file a compiled module is built from, as the tree names it."""
    return C_HELPERS.get(module) or module.replace(".", "/") + ".py"


def manifest_for(root: Path) -> dict[str, Any]:
    """What a build of `root`'s sources for this interpreter must record."""
    sources = {m: hashlib.sha256((root / source_of(m)).read_bytes()).hexdigest()
               for m in (*HOT, *C_HELPERS)}
    return {"python": sys.implementation.cache_tag, "ext": _ext(),
            "group": GROUP, "sources": sources}


def stale(build: Path, root: Path = ROOT) -> str | None:
    """Why `build` cannot be loaded for `root`'s sources, or None if it can."""
    try:
        recorded = json.loads((build / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no compiled build in {build}"
    want = manifest_for(root)
    if recorded.get("python") != want["python"] or recorded.get("ext") != want["ext"]:
        return f"{build} was built for {recorded.get('python')}, this is {want['python']}"
    changed = sorted(m for m in set(want["sources"]) | set(recorded.get("sources", {}))
                     if recorded.get("sources", {}).get(m) != want["sources"].get(m))
    if changed:
        return f"{build} is stale ({source_of(changed[0])}{' and more' if len(changed) > 1 else ''} changed)"
    return None


class _Finder(importlib.abc.MetaPathFinder):
    """Serves the compiled modules (and mypyc's shared library) from the build
    directory, only while the parent package is this tree's."""

    def __init__(self, build: Path) -> None:
        self.build = build
        ext = _ext()
        self.files = {m: build / (m.replace(".", "/") + ext) for m in (*HOT, *C_HELPERS)}
        self.files[GROUP + "__mypyc"] = build / (GROUP + "__mypyc" + ext)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        if path is not None and Path(path[0]).resolve() != ROOT / fullname.rpartition(".")[0].replace(".", "/"):
            raise ImportError(f"{ENV}: {fullname} is imported from {path[0]}, the build is of {ROOT}")
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def loaded() -> Path | None:
    """The build this process loads its hot modules from, if any."""
    for finder in sys.meta_path:
        if isinstance(finder, _Finder):
            return finder.build
    return None


def install() -> None:
    """Called first thing by the packages holding hot modules (stml, fetd_tcp, fetd_vhost, backends):
    from then on their imports come from the build SCSI_TARGET_ACCEL names."""
    where = os.environ.get(ENV, "")
    if where in ("", "0") or loaded() is not None:
        return
    build = Path(where).resolve()
    early = sorted(m for m in HOT if m in sys.modules)
    if early:
        raise SystemExit(f"{ENV}: {early[0]} was imported before the compiled build was installed")
    why = stale(build)
    if why is not None:
        raise SystemExit(f"{ENV}: {why}: run scripts/build-accel, or unset {ENV}")
    sys.meta_path.insert(0, _Finder(build))


def for_children(environ: dict[str, str] | os._Environ[str]) -> tuple[bool, str] | None:
    """`scsi-target run`: whether its children use a compiled build, and the
    line to log. An explicit SCSI_TARGET_ACCEL stands (None: nothing to say);
    otherwise this tree's build/accel is used when it is fresh, and a stale
    one is named and not used."""
    if environ.get(ENV, "") != "" or not (DEFAULT / MANIFEST).exists():
        return None
    why = stale(DEFAULT)
    if why is not None:
        return False, f"not using the compiled build: {why}; run scripts/build-accel"
    environ[ENV] = str(DEFAULT)
    return True, f"compiled build: {DEFAULT}"
