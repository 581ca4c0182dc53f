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


def _helper(tmp_path: Path):
    """backends/rbdaio.c built here as scripts/build-accel builds it, and the
    stand-in librbd (scripts/fakerbd.c) it calls."""
    import ctypes
    import importlib.machinery
    import importlib.util
    import sysconfig
    if shutil.which("cc") is None:
        pytest.fail("cc is not installed (apt-get install gcc)")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import rbdpath
    finally:
        sys.path.pop(0)
    lib = ctypes.CDLL(str(rbdpath.build(tmp_path)))
    so = tmp_path / ("_rbdaio" + importlib.machinery.EXTENSION_SUFFIXES[0])
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", "-o", str(so),
                    str(SCRIPT.parent.parent / "backends" / "rbdaio.c")], check=True)
    spec = importlib.util.spec_from_file_location("backends._rbdaio", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def addr(name: str) -> int:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    calls = (1, addr("rbd_aio_create_completion"), addr("rbd_aio_release"), addr("rbd_aio_get_return_value"),
             addr("rbd_poll_io_events"))
    return mod, lib, calls, addr


def test_the_c_helper_starts_and_collects_each_call_and_releases_its_completion(tmp_path):
    """The compiled build's shortcut (decision 0421): one C call starts a read
    or a write (its completion created; the pin a view that holds the
    buffer), one collects them all with their return values; every
    completion is released, a refused call's too, which raises CephError."""
    import ctypes

    from backends.librbd import CephError
    mod, lib, calls, addr = _helper(tmp_path)
    live = ctypes.c_long.in_dll(lib, "fakerbd_live")
    refuse = ctypes.c_int.in_dll(lib, "fakerbd_refuse")
    fast = (calls, {"read": addr("rbd_aio_read"), "write": addr("rbd_aio_write")}, CephError)
    bufs = [bytearray(4096) for _ in range(70)]   # more than one poll batch (64)
    started = [mod.start_buffer(fast, "read", i * 4096, memoryview(b), True) for i, b in enumerate(bufs)]
    started.append(mod.start_buffer(fast, "write", 0, b"\1" * 512, False))
    comps = [c for c, _, _ in started]
    assert live.value == 71 and len(set(comps)) == 71 and min(comps) > 0
    assert [n for _, _, n in started] == [4096] * 70 + [512]
    with pytest.raises(BufferError):   # held by its pin until the caller drops it
        bufs[0].append(0)
    got = mod.collect(calls)
    assert got == [(c, 4096) for c in comps[:70]] + [(comps[70], 0)]
    assert all(b == b"\x5a" * 4096 for b in bufs), "the reads' data landed in their buffers"
    assert live.value == 0 and mod.collect(calls) == []
    del started
    bufs[0].append(0)   # the pins gone, the buffer is free
    refuse.value = -28
    with pytest.raises(CephError) as e:
        mod.start_buffer(fast, "write", 0, b"\1" * 512, False)
    assert (e.value.errno, str(e.value)) == (28, "[Errno 28] rbd_aio_write: No space left on device")
    assert live.value == 0, "a refused call's completion is released"
    with pytest.raises(BufferError):   # read data needs memory it may write
        mod.start_buffer(fast, "read", 0, b"\0" * 512, True)
    assert live.value == 0
