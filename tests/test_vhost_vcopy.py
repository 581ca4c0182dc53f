"""fetd_vhost's C copy helper (fetd_vhost/vcopy.c, decision 0313), built
here as scripts/build-accel builds it: the same bytes as the Python copies,
and a bad segment refused before anything is written."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import mmap
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from fetd_vhost import scsi
from fetd_vhost.scsi import Buffers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vcopy(tmp_path_factory):
    if shutil.which("cc") is None:
        pytest.fail("cc is not installed (apt-get install gcc)")
    so = tmp_path_factory.mktemp("vcopy") / ("_vcopy" + importlib.machinery.EXTENSION_SUFFIXES[0])
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", "-o", str(so),
                    str(ROOT / "fetd_vhost" / "vcopy.c")], check=True)
    spec = importlib.util.spec_from_file_location("fetd_vhost._vcopy", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pages(memory: memoryview, sizes: list[int]) -> list[memoryview]:
    """Scattered views of `memory`: one page apart, each `sizes[i]` long."""
    return [memory[i * 8192:i * 8192 + n] for i, n in enumerate(sizes)]


SIZES = [108, 4096, 1000, 4096, 7, 4096]
DATA = bytes(range(256)) * 60        # 15,360 bytes: more than the pages from 108 on hold


@pytest.mark.parametrize("offset,data", [(108, DATA), (0, DATA[:50]), (5000, DATA[:3000]), (20000, DATA)])
def test_scatter_writes_what_the_python_copy_writes(vcopy, offset, data):
    pure, fast = bytearray(len(SIZES) * 8192), bytearray(len(SIZES) * 8192)
    done = Buffers(_pages(memoryview(pure), SIZES), sum(SIZES)).write(offset, data)
    assert vcopy.scatter(memoryview(data), _pages(memoryview(fast), SIZES), offset) == done
    assert fast == pure
    assert done == max(0, min(len(data), sum(SIZES) - offset))


def test_gather_reads_the_pages_in_order(vcopy):
    src = bytearray(DATA) + bytearray(len(SIZES) * 8192 - len(DATA))
    views = _pages(memoryview(src), SIZES)
    dst = bytearray(sum(SIZES) + 10)
    assert vcopy.gather(views, memoryview(dst)) == sum(SIZES)
    assert bytes(dst[:sum(SIZES)]) == b"".join(views) and dst[sum(SIZES):] == bytes(10)


def test_bad_segments_are_refused_before_anything_is_written(vcopy):
    """A read-only segment among writable ones, a non-buffer, a negative
    offset, or more data than the destination holds: an exception, and not
    one byte moved (every buffer is pinned first)."""
    mem = bytearray(3 * 8192)
    good = _pages(memoryview(mem), [4096, 4096])
    with pytest.raises(BufferError):
        vcopy.scatter(b"\xff" * 9000, [*good, memoryview(b"\0" * 4096)], 0)
    with pytest.raises(TypeError):
        vcopy.scatter(b"\xff" * 9000, [*good, 12345], 0)
    with pytest.raises(ValueError):
        vcopy.scatter(b"\xff" * 100, good, -1)
    with pytest.raises(TypeError):
        vcopy.scatter(b"\xff" * 100, tuple(good), 0)
    assert mem == bytearray(len(mem))
    dst = bytearray(8000)
    with pytest.raises(ValueError, match="do not fit"):
        vcopy.gather(good, memoryview(dst))
    assert dst == bytearray(8000)


def test_scatter_never_reaches_past_a_mapped_view(vcopy):
    """Views of a mapping clipped at its end (what GuestMemory hands out):
    data beyond them stays unwritten, the mapping's tail is untouched."""
    m = mmap.mmap(-1, 8192)
    view = memoryview(m)
    pages = [view[0:100], view[4096:4196]]
    assert vcopy.scatter(b"\xaa" * 1000, pages, 0) == 200
    assert bytes(view[0:100]) == b"\xaa" * 100 and bytes(view[4096:4196]) == b"\xaa" * 100
    assert bytes(view[100:4096]) == bytes(3996) and bytes(view[4196:]) == bytes(8192 - 4196)
    for v in (*pages, view):
        v.release()
    m.close()


def test_the_device_copies_through_the_helper_with_the_same_results(vcopy, monkeypatch):
    """Buffers.write and the write data gathered for the STML take the helper
    when it is there: the same bytes and counts as without it."""
    sizes = [108, *[4096] * 20, 1000]           # past SHARED_MIN: gathered into the STML's memory
    data = bytes(range(251)) * 400
    calls: list[str] = []

    class Counted:   # the helper, its calls counted: the device must go through it
        @staticmethod
        def scatter(*args):
            calls.append("scatter")
            return vcopy.scatter(*args)

        @staticmethod
        def gather(*args):
            calls.append("gather")
            return vcopy.gather(*args)
    results = []
    for helper in (None, Counted):
        monkeypatch.setattr(scsi, "_vcopy", helper)
        mem = bytearray(len(sizes) * 8192)
        out = Buffers(_pages(memoryview(mem), sizes), sum(sizes))
        written = out.write(108, data)
        shared = bytearray(out.size - 108)
        req = scsi.Request.__new__(scsi.Request)
        req.data_out = out.tail(108)

        class Port:
            def buffer(self, size: int) -> memoryview:
                return memoryview(shared)[:size]
        dev = scsi.VirtioScsiDevice.__new__(scsi.VirtioScsiDevice)
        dev.port = Port()   # type: ignore[assignment]
        sent, held = dev._gather(req, 0, req.data_out.size)
        assert held is not None and sent == [held]
        results.append((written, bytes(mem), bytes(shared)))
    assert results[0] == results[1]
    assert calls == ["scatter", "gather"]
    assert results[0][0] == sum(sizes) - 108 and results[0][2] == data[:sum(sizes) - 108]
