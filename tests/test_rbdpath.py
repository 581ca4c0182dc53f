"""scripts/rbdpath.py builds its stand-in librbd, runs reads and writes through
the RBD backend's aio path and through the STML's whole receive path (its own
checks assert the reads brought their data and the commands succeed) and
prints a cost per command. Numbers are printed, never asserted against a
bound."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rbdpath.py"


@pytest.mark.parametrize("stml", [False, True])
@pytest.mark.parametrize("write", [False, True])
def test_the_path_runs_and_reports_time(write, stml):
    if shutil.which("cc") is None:
        pytest.fail("cc is not installed (apt-get install gcc)")
    p = subprocess.run([sys.executable, str(SCRIPT), "--count", "256", *(["--write"] if write else []),
                        *(["--stml"] if stml else [])], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.fullmatch(r"(stml )?4 KiB (read|write): ([0-9.]+) us per command\n", p.stdout)
    assert m and bool(m.group(1)) == stml and m.group(2) == ("write" if write else "read"), p.stdout
    assert float(m.group(3)) > 0


def _fakerbd(tmp_path: Path) -> Path:
    """The stand-in librbd (scripts/fakerbd.c), built here."""
    if shutil.which("cc") is None:
        pytest.fail("cc is not installed (apt-get install gcc)")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import rbdpath
    finally:
        sys.path.pop(0)
    return rbdpath.build(tmp_path)


def _helper(tmp_path: Path):
    """backends/rbdaio.c built here as scripts/build-accel builds it, and the
    stand-in librbd (scripts/fakerbd.c) it calls."""
    import ctypes
    import importlib.machinery
    import importlib.util
    import sysconfig
    lib = ctypes.CDLL(str(_fakerbd(tmp_path)))
    so = tmp_path / ("_rbdaio" + importlib.machinery.EXTENSION_SUFFIXES[0])
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", "-o", str(so),
                    str(SCRIPT.parent.parent / "backends" / "rbdaio.c")], check=True)
    spec = importlib.util.spec_from_file_location("backends._rbdaio", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def addr(name: str) -> int:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    calls = (1, addr("rbd_aio_create_completion"), addr("rbd_aio_release"), addr("rbd_aio_get_return_value"),
             addr("rbd_poll_io_events"), bytearray(mod.CARRY_BYTES), -1)
    return mod, lib, calls, addr


def test_the_c_helper_starts_and_collects_each_call_and_releases_its_completion(tmp_path):
    """The compiled build's shortcut (decision 0421): one C call starts a read
    or a write (its completion created; recorded in the pending calls with a
    pin, a view that holds the buffer), one collects them all with their
    return values; every completion is released, a refused call's too, which
    raises CephError and leaves no entry."""
    import ctypes

    from backends.librbd import CephError
    mod, lib, calls, addr = _helper(tmp_path)
    live = ctypes.c_long.in_dll(lib, "fakerbd_live")
    refuse = ctypes.c_int.in_dll(lib, "fakerbd_refuse")
    start = mod.starter((calls, {"read": addr("rbd_aio_read"), "write": addr("rbd_aio_write")}, CephError))
    bufs = [bytearray(4096) for _ in range(70)]   # more than one poll batch (64)
    pending: dict = {}
    for i, b in enumerate(bufs):
        assert start("read", i * 4096, memoryview(b), True, f"read {i}", pending) is None
    start("write", 0, b"\1" * 512, False, "write", pending)
    comps = list(pending)
    assert live.value == 71 and len(set(comps)) == 71 and min(comps) > 0
    assert [(fut, n) for fut, _, n in pending.values()] == [(f"read {i}", 4096) for i in range(70)] + [("write", 0)]
    with pytest.raises(BufferError):   # held by its pin until the caller drops it
        bufs[0].append(0)
    got = mod.collector(calls)()
    assert got == [(c, 4096) for c in comps[:70]] + [(comps[70], 0)]
    assert all(b == b"\x5a" * 4096 for b in bufs), "the reads' data landed in their buffers"
    assert live.value == 0 and mod.collector(calls)() == []
    pending.clear()
    bufs[0].append(0)   # the pins gone, the buffer is free
    refuse.value = -28
    with pytest.raises(CephError) as e:
        start("write", 0, b"\1" * 512, False, "refused", pending)
    assert (e.value.errno, str(e.value)) == (28, "[Errno 28] rbd_aio_write: No space left on device")
    assert live.value == 0 and not pending, "a refused call's completion is released, its entry gone"
    with pytest.raises(BufferError):   # read data needs memory it may write
        start("read", 0, b"\0" * 512, True, "read", pending)
    assert live.value == 0 and not pending


def test_the_c_helper_reads_the_calls_once_when_bound(tmp_path):
    """starter() and collector() check and read the image's calls when they
    bind them (0424), not on every start and collection: malformed calls are
    refused there, and the bound functions keep what they read, the carry's
    memory with it, whatever the caller drops."""
    import ctypes
    import gc

    from backends.librbd import CephError
    mod, lib, calls, addr = _helper(tmp_path)
    ios = {"read": addr("rbd_aio_read"), "write": addr("rbd_aio_write")}
    for bad in (calls[:6], (*calls[:5], b"carry", -1), (*calls[:5], bytearray(1), -1), ("image", *calls[1:])):
        with pytest.raises(TypeError):
            mod.starter((bad, ios, CephError))
        with pytest.raises(TypeError):
            mod.collector(bad)
    start, collect = mod.starter((calls, ios, CephError)), mod.collector(calls)
    del calls
    gc.collect()
    buf, pending = bytearray(4096), {}
    start("read", 0, memoryview(buf), True, "read", pending)
    (comp,) = pending
    assert collect() == [(comp, 4096)] and buf == b"\x5a" * 4096
    assert ctypes.c_long.in_dll(lib, "fakerbd_live").value == 0


def test_the_c_helper_out_of_memory_never_lets_a_buffer_go_under_librbd(tmp_path):
    """Review 15: whichever allocation fails in a start (CPython's own failure
    injection, one allocation at a time), the call is either recorded in the
    pending calls, pinned, and with librbd, or none of these: no buffer is let
    go while librbd has it, no completion is lost (decision 0422)."""
    import ctypes

    import _testcapi

    from backends.librbd import CephError
    mod, lib, calls, addr = _helper(tmp_path)
    live = ctypes.c_long.in_dll(lib, "fakerbd_live")
    start = mod.starter((calls, {"read": addr("rbd_aio_read"), "write": addr("rbd_aio_write")}, CephError))
    pending: dict = {}
    failed = 0
    for k in range(40):
        buf = bytearray(4096)
        _testcapi.set_nomemory(k, k + 1)   # (only the k-th allocation from here fails)
        try:
            start("read", 0, memoryview(buf), True, k, pending)
            ok = True
        except MemoryError:
            ok = False
        finally:
            _testcapi.remove_mem_hooks()
        failed += not ok
        started = buf == b"\x5a" * 4096
        assert started == ok and (k in [fut for fut, _, _ in pending.values()]) == ok, k
        assert live.value == len(pending), "a completion for every recorded call, none other"
        if ok:
            with pytest.raises(BufferError):   # pinned while librbd has it
                buf.append(0)
        else:
            buf.append(0)   # nothing holds a buffer whose call never started
    assert failed >= 4, "the allocations of a start were reached"

    # a pending dict that cannot take the entry: the call never starts
    class Full(dict):
        def __setitem__(self, key, value):
            raise MemoryError
    buf = bytearray(4096)
    with pytest.raises(MemoryError):
        start("read", 0, memoryview(buf), True, "x", Full())
    assert buf == bytes(4096) and live.value == len(pending)
    buf.append(0)


def _collect_short_of_memory(collect: Callable[[], list], fd: int, live: Any, pending: dict,
                             late: int = 0) -> None:
    """collect() until every call in `pending` is collected, one allocation
    failing in each (CPython's failure injection): what is left is signalled
    on the eventfd `fd` each time, every call is reported once with its value,
    and a completion (`live`: fakerbd's count) is released only once handed
    over. `late`: how many handed over may wait for the next collection's
    release (the ctypes path's, whose release itself needs memory)."""
    import select

    import _testcapi
    got: list = []
    short = 0
    for k in range(0, 600, 5):
        if not live.value:
            break
        assert select.select([fd], [], [], 0)[0], "what is left was signalled"
        _testcapi.set_nomemory(k % 90, k % 90 + 1)   # (only that allocation from here fails)
        try:
            out = collect()
        except MemoryError:
            out = []
        finally:
            _testcapi.remove_mem_hooks()
        got += out
        short += bool(live.value)
        unreported = len(pending) - len(got)
        assert unreported <= live.value <= unreported + late, "released once handed over, not before"
    assert live.value == 0 and short >= 3, "collections ran short of memory and then caught up"
    assert sorted(got) == sorted((c, 4096) for c in pending), "each call reported once, with its value"


def test_the_c_helper_collection_out_of_memory_keeps_what_it_could_not_hand_over(tmp_path):
    """Review 15: a collection that runs out of memory hands over what it
    could, keeps the rest unreleased for the next one and signals the
    eventfd, so that the loop collects again: every call is reported once,
    with its value, its completion released only then (decision 0422)."""
    import ctypes
    import os
    import select

    from backends.librbd import CephError
    mod, lib, calls, addr = _helper(tmp_path)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        calls = (*calls[:-1], fd)
        lib.rbd_set_image_notification(None, fd, 2)   # fakerbd signals it per completion
        live = ctypes.c_long.in_dll(lib, "fakerbd_live")
        start = mod.starter((calls, {"read": addr("rbd_aio_read"), "write": addr("rbd_aio_write")}, CephError))
        pending: dict = {}
        bufs = [bytearray(4096) for _ in range(150)]   # more than two poll batches
        for i, b in enumerate(bufs):
            start("read", 0, memoryview(b), True, i, pending)
        _collect_short_of_memory(lambda: mod.collector(calls)(), fd, live, pending)
        assert not select.select([fd], [], [], 0)[0], "the collection read the eventfd itself"
    finally:
        lib.rbd_set_image_notification(None, -1, 2)
        os.close(fd)


def test_a_ctypes_start_that_raises_before_librbd_has_it_leaves_nothing_behind():
    """Review 17: without the C helper, a foreign call that raises while ctypes
    converts its arguments (out of memory, a bad argument) never reached
    librbd: its entry is gone and its completion released, as for a refused
    call (decision 0422)."""
    import ctypes

    from backends import librbd as L
    image = object.__new__(L.Image)
    released: list[int] = []
    image._comp = ctypes.c_void_p(0x1234)
    image._comp_ref = ctypes.byref(image._comp)
    image._new_comp = lambda cb, arg, ref: 0
    image._release = released.append
    image.handle = ctypes.c_void_p(1)

    def refuse(*args: object) -> int:
        raise MemoryError
    image._aio = {"read": refuse}
    pending: dict = {}
    with pytest.raises(MemoryError):
        image.start("read", (0, 4096, 0), (), "entry", pending)
    assert pending == {} and released == [0x1234]

    # an exception once the call returned (a signal handler's: CPython runs them
    # before the result is stored) may come after librbd took the call: the
    # entry stays for poll() to collect and the completion is not released
    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt
    image._aio = {"read": interrupted}
    with pytest.raises(KeyboardInterrupt):
        image.start("read", (0, 4096, 0), (), "entry", pending)
    assert pending == {0x1234: "entry"} and released == [0x1234]


def test_the_ctypes_collection_out_of_memory_keeps_what_it_could_not_hand_over(tmp_path, monkeypatch):
    """Without the C helper, Image.poll (the ctypes _poll) keeps the helper's
    promise (decision 0422): a collection that runs out of memory hands over
    what it could, keeps the rest unreleased for the next one and signals the
    eventfd; every call is reported once, with its value, its completion
    released only once handed over (one whose release itself ran out of
    memory, at the next collection)."""
    import ctypes
    import os
    import select
    from types import SimpleNamespace

    from backends import librbd as L
    so = _fakerbd(tmp_path)
    monkeypatch.setattr(L, "_load", lambda name: ctypes.CDLL(str(so)))
    monkeypatch.setattr(L, "_lib", None)
    monkeypatch.setattr(L, "_rbdaio", None)   # the pure path, whether a build is loaded or not
    image = L.Image(SimpleNamespace(handle=ctypes.c_void_p(1)), "img")
    lib = L.libs()[1]
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        image.enable_events(fd)
        assert image.poll == image._poll
        live = ctypes.c_long.in_dll(lib, "fakerbd_live")
        pending: dict = {}
        bufs = [bytearray(4096) for _ in range(150)]   # more than two poll batches
        for i, b in enumerate(bufs):
            image.start_buffer("read", 0, memoryview(b), True, i, pending)
        assert live.value == 150
        _collect_short_of_memory(image.poll, fd, live, pending, late=1)
        # (a collection that ran short after the last was handed over signalled
        # the eventfd once more: the next one finds nothing)
        assert image.poll() == [] and live.value == 0
        assert not select.select([fd], [], [], 0)[0], "the collection read the eventfd itself"
    finally:
        lib.rbd_set_image_notification(None, -1, 2)
        os.close(fd)
