"""The optional compiled build (scripts/build-accel, scsi_runtime.accel,
decisions/0830): a build is loaded only while it matches every source it was
compiled from, `scsi-target run` uses a fresh one by itself, and the hot-path
tests pass against it (hostile input included: mypyc's run-time type checks
turn a wrong annotation into a TypeError)."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scsi_runtime import accel
from support.procs import children_by_module
from support.target import Target

ROOT = Path(__file__).resolve().parent.parent


def _build_dir(tmp_path: Path, **change: str) -> Path:
    """A build directory whose manifest is this tree's, with `change`d hashes."""
    manifest = accel.manifest_for(ROOT)
    manifest["sources"].update(change)
    build = tmp_path / "accel"
    build.mkdir(parents=True)
    (build / accel.MANIFEST).write_text(json.dumps(manifest))
    return build


def test_a_build_matches_only_the_sources_it_was_compiled_from(tmp_path):
    assert accel.stale(_build_dir(tmp_path)) is None
    stale = accel.stale(_build_dir(tmp_path / "b", **{"stml.sbc": "0" * 64}))
    assert stale is not None and stale.endswith("is stale (stml/sbc.py changed)")
    stale = accel.stale(_build_dir(tmp_path / "v", **{"fetd_vhost._vcopy": "0" * 64}))
    assert stale is not None and stale.endswith("is stale (fetd_vhost/vcopy.c changed)")
    (tmp_path / "c").mkdir()
    assert accel.stale(tmp_path / "c") == f"no compiled build in {tmp_path / 'c'}"


def test_a_build_for_another_python_is_stale(tmp_path):
    build = _build_dir(tmp_path)
    manifest = json.loads((build / accel.MANIFEST).read_text())
    manifest["python"] = "cpython-399"
    (build / accel.MANIFEST).write_text(json.dumps(manifest))
    assert "was built for cpython-399" in (accel.stale(build) or "")


def test_a_stale_build_asked_for_refuses_to_start_in_one_line(tmp_path):
    """An edited .py never runs silently as its old compiled self."""
    build = _build_dir(tmp_path, **{"fetd_tcp.pdu": "0" * 64})
    p = subprocess.run([sys.executable, "-c", "import fetd_tcp.pdu"], capture_output=True, text=True,
                       env={**os.environ, accel.ENV: str(build)}, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr == (f"{accel.ENV}: {build} is stale (fetd_tcp/pdu.py changed): "
                        f"run scripts/build-accel, or unset {accel.ENV}\n")


def test_run_uses_a_fresh_build_and_names_a_stale_one(tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "DEFAULT", tmp_path / "accel")
    environ: dict[str, str] = {}
    assert accel.for_children(environ) is None and environ == {}       # none built
    _build_dir(tmp_path)
    assert accel.for_children(environ) == (True, f"compiled build: {tmp_path / 'accel'}")
    assert environ == {accel.ENV: str(tmp_path / "accel")}
    assert accel.for_children({accel.ENV: "0"}) is None                  # asked for none
    shutil.rmtree(tmp_path / "accel")
    _build_dir(tmp_path, **{"stml.emulator": "0" * 64})
    environ = {}
    used = accel.for_children(environ)
    assert used is not None and not used[0] and "stml/emulator.py changed" in used[1]
    assert environ == {}


# ---- against a real build -------------------------------------------------------

# the hot-path tests, hostile input (both fuzzers), raw iSCSI sessions and libiscsi
# through `scsi-target run`: what mypyc's type checks and native classes could break
COMPILED_RUN = [
    "tests/test_stml_hot_path.py", "tests/test_pdu.py", "tests/test_pdu_framer.py",
    "tests/test_fuzz_pdu.py", "tests/test_fuzz_stml.py", "tests/test_sbc_commands.py",
    "tests/test_iscsi_session.py", "tests/test_contract.py",
    # the compiled carrier and link: framing, shared regions, taps, stage timing
    "tests/test_stream_channel.py", "tests/test_tap.py", "tests/test_timing.py", "tests/test_metrics.py",
    # the link's table checks, and its fixed-layout responses read without the decoder (0841)
    "tests/test_contract_table.py",
    # fetd_tcp's budget, its counts by kind in a list (0842) and the session core's bounds
    "tests/test_budget.py",
    "tests/test_iscsi_e2e.py::test_inquiry_and_capacity",
    "tests/test_iscsi_e2e.py::test_header_and_data_digest",
    "tests/test_iscsi_e2e.py::test_conformance_iscsi_family",
    # fetd_vhost: hostile descriptor tables and messages, the Python master through real processes
    "tests/test_vhost_core.py", "tests/test_vhost_harness.py",
    # its C copy helper, the build's own (not one built with cc): runs checked, bytes moved (0314)
    "tests/test_vhost_vcopy.py",
    # a refusal that ends fetd_vhost's run survives its cleanup (decisions/0840 addendum)
    "tests/test_roles.py::test_fetd_vhost_with_a_managers_key_says_it_is_refused_and_exits",
    # the RBD backend's aio path (0412), and its C helper against a real cluster's librbd (0421)
    "tests/test_rbd_aio.py",
    "tests/test_rbd.py::test_qemu_img_round_trip_and_the_image_holds_the_bytes",
    "tests/test_rbd.py::test_closing_an_image_ends_its_reads_in_flight_with_their_data",
    "tests/test_rbd.py::test_an_aio_write_goes_out_from_its_own_buffer_not_a_copy",
]
# Left out: a test that replaces Emulator.handle (a compiled class's methods are
# read-only), the ConnectionProtocol tests that hand it a stand-in for a
# Connection (the compiled class checks its arguments' types), a test that
# replaces stml.api.link.boot_id or one that counts stml.metrics.summed's rows
# (compiled callers do not look them up), of fetd_vhost's, one that replaces a
# compiled Virtqueue's pop and one that hands VhostFrontEnd a stand-in link and
# connection; three that call Task.io_on, Task.io or Task.read_into with a
# stand-in for the Task. The RBD collection's failure injection runs: its
# hand-over makes no int or tuple, whose failed allocation mypyc's runtime
# answers with abort() (decision 0722).
NOT_COMPILED_RUN = ["test_commands_take_the_typed_path", "test_protocol_",
                    "test_one_call_takes_at_most_a_ring_of_chains",
                    "test_a_read_slot_goes_back_only_once_the_data_is_in_guest_memory",
                    "test_a_front_end_on_another_host_gets_its_offset_from_heartbeats",
                    "test_management_reports_rows_a_bounded_number_per_loop_turn",
                    "test_an_aborted_command_waits_for_librbd_to_end_its_write",
                    "test_task_io_hands_back_the_aio_calls_future_itself",
                    "test_task_read_into_starts_the_aio_read_itself_and_falls_back_to_io_on"]


def _cached_build() -> Path:
    """A build of this tree's sources, kept in the test cache by their hashes:
    the build takes minutes, and a cached one cannot be stale (the loader
    checks every hash)."""
    key = hashlib.sha256(json.dumps(accel.manifest_for(ROOT), sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scsi-target" / "accel"
    build = cache / key
    if accel.stale(build) is not None:
        # Other trees' builds (worktrees of this repository test at the same time) stay
        # until they are a day old; build-accel puts this one in place in one rename.
        for old in cache.glob("*") if cache.is_dir() else ():
            if old.stat().st_mtime < time.time() - 86400:
                shutil.rmtree(old, ignore_errors=True)
        p = subprocess.run([sys.executable, str(ROOT / "scripts" / "build-accel"), "--out", str(build)],
                           capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return build


@pytest.mark.slow
def test_the_hot_path_tests_pass_against_the_compiled_build(tmp_short):
    build = _cached_build()
    env = {**os.environ, accel.ENV: str(build)}
    probe = ("import fetd_vhost.scsi, stml.server, fetd_tcp.session, backends._rbdaio, fetd_vhost._vcopy, "
             "scsi_runtime.accel as a; "
             "print(a.loaded(), stml.server.__file__, fetd_tcp.session.__file__, fetd_vhost.scsi.__file__, "
             "backends._rbdaio.__file__, fetd_vhost._vcopy.__file__)")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(build), str(build / "stml" / f"server{accel._ext()}"),
                                str(build / "fetd_tcp" / f"session{accel._ext()}"),
                                str(build / "fetd_vhost" / f"scsi{accel._ext()}"),
                                str(build / "backends" / f"_rbdaio{accel._ext()}"),
                                str(build / "fetd_vhost" / f"_vcopy{accel._ext()}")]
    # `scsi-target run` hands the build to its children: all map mypyc's library
    with Target("--lun", "ram:16MiB", "--vhost", str(tmp_short() / "vm.sock"), env={accel.ENV: str(build)}) as t:
        t.wait_log("fetd_vhost: attached to STML", timeout=60)
        kids = children_by_module(t.proc.pid)
        lib = f"{accel.GROUP}__mypyc{accel._ext()}"
        mapped = {k for k in ("stml", "fetd_tcp", "fetd_vhost") if lib in Path(f"/proc/{kids[k]}/maps").read_text()}
        assert mapped == {"stml", "fetd_tcp", "fetd_vhost"}, kids
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *COMPILED_RUN,
                        "-k", " and ".join(f"not {k}" for k in NOT_COMPILED_RUN)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    assert p.returncode == 0 and re.search(r"\d+ passed", summary), p.stdout[-6000:] + p.stderr[-2000:]
    assert "failed" not in summary and "error" not in summary, summary


def _handler_names(tree: ast.AST) -> list[str]:
    """'function: name bound to A and B' for every function of `tree` in which
    one `except ... as name` catches different types (nested functions apart)."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        types: dict[str, set[str]] = {}
        todo = list(ast.iter_child_nodes(fn))
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                types.setdefault(node.name, set()).add(ast.unparse(node.type))
            todo.extend(ast.iter_child_nodes(node))
        found += [f"{fn.name}: {name} bound to {' and '.join(sorted(t))}" for name, t in types.items() if len(t) > 1]
    return found


def test_compiled_modules_name_each_caught_type_once_per_function() -> None:
    """mypyc gives `except X as e` one type per function: a second handler of
    another type under the same name raises TypeError inside the handler (a
    refused PDU became an internal error, 0830). The rule, checked on every
    module the build compiles."""
    root = Path(__file__).resolve().parents[1]
    bad = {m: _handler_names(ast.parse((root / (m.replace(".", "/") + ".py")).read_text()))
           for m in accel.HOT}
    assert {m: b for m, b in bad.items() if b} == {}


def test_the_handler_rule_sees_a_reused_name() -> None:
    src = ("def f():\n    try: pass\n    except OSError as e: pass\n"
           "    try: pass\n    except ValueError as e: pass\n")
    assert _handler_names(ast.parse(src)) == ["f: e bound to OSError and ValueError"]


_SUSPENDS = (ast.Await, ast.AsyncFor, ast.AsyncWith)


def _suspensions_in_handlers(tree: ast.AST) -> list[str]:
    """'line: code' for every await, async for or async with inside an except
    or finally block of `tree`."""
    found = []
    for node in ast.walk(tree):
        blocks = [node.body] if isinstance(node, ast.ExceptHandler) else \
            [node.finalbody] if isinstance(node, ast.Try) else []
        for block in blocks:
            for stmt in block:
                found += [f"{s.lineno}: {ast.unparse(s).splitlines()[0]}"
                          for s in ast.walk(stmt) if isinstance(s, _SUSPENDS)]
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def test_compiled_modules_never_suspend_inside_an_except_or_finally_block() -> None:
    """mypyc keeps the exception a handler is handling in the thread's state,
    not the coroutine's: a compiled coroutine that suspends inside an except
    or finally block and then re-raises corrupts memory once a compiled caller
    awaits it (an ABORT TASK of a write that waits for its worker thread
    segfaulted the STML, decisions/0840 addendum). The rule, on every module
    the build compiles; an `async with` (whose __aexit__ runs in such a
    handler) must be on a manager whose exit never waits (stml.locks)."""
    bad = {m: _suspensions_in_handlers(ast.parse((ROOT / (m.replace(".", "/") + ".py")).read_text()))
           for m in accel.HOT}
    assert {m: b for m, b in bad.items() if b} == {}


def test_the_suspension_rule_sees_an_await_in_a_handler() -> None:
    src = ("async def f(x):\n    try: await x\n    except E:\n        await x\n        raise\n"
           "    try: pass\n    finally:\n        async with x: pass\n")
    assert _suspensions_in_handlers(ast.parse(src)) == ["4: await x", "8: async with x:"]
