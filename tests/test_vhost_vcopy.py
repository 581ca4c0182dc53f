"""fetd_vhost's C copy helper (fetd_vhost/vcopy.c, decisions 0313, 0314),
built here as scripts/build-accel builds it (or the build's own, in
test_accel's compiled run): the same bytes as the Python copies over a
chain's runs of guest memory, and a bad run refused before anything is
written."""
from __future__ import annotations

import array
import importlib.machinery
import importlib.util
import mmap
import os
import shutil
import struct
import subprocess
import sysconfig
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fetd_vhost import scsi
from fetd_vhost import virtqueue as V
from fetd_vhost.scsi import Buffers
from support.vhost_master import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, GuestRam
from support.vhost_ring import served_ring

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vcopy(tmp_path_factory):
    """The compiled build's helper when this run loaded one (test_accel's
    run against a real build), else vcopy.c built here with cc."""
    if scsi._vcopy is not None:
        return scsi._vcopy
    if shutil.which("cc") is None:
        pytest.fail("cc is not installed (apt-get install gcc)")
    so = tmp_path_factory.mktemp("vcopy") / ("_vcopy" + importlib.machinery.EXTENSION_SUFFIXES[0])
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", "-o", str(so),
                    str(ROOT / "fetd_vhost" / "vcopy.c")], check=True)
    spec = importlib.util.spec_from_file_location("fetd_vhost._vcopy", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _packed(runs: list[int]) -> array.array:
    """Runs as the helper's walk makes them (decision 0316)."""
    return array.array("q", runs)


# the two forms of runs: a list from Python's walk, an array('q') from the helper's
FORMS = pytest.mark.parametrize("form", [list, _packed], ids=["list", "array"])


def _scattered(sizes: list[int]) -> tuple[list[memoryview], list[int]]:
    """Two regions, and runs of `sizes` bytes alternating between them, one
    page apart: a chain's buffers as the walk hands them over."""
    regions = [memoryview(bytearray(len(sizes) * 8192)), memoryview(bytearray(len(sizes) * 8192))]
    runs: list[int] = []
    for i, n in enumerate(sizes):
        runs += [i % 2, i // 2 * 8192 + 5, n]
    return regions, runs


def _python_copies(monkeypatch) -> None:
    monkeypatch.setattr(scsi, "_vcopy", None)


SIZES = [108, 4096, 1000, 4096, 7, 4096]
DATA = bytes(range(256)) * 60        # 15,360 bytes: more than the runs from 108 on hold


@pytest.mark.parametrize("offset,data", [(108, DATA), (0, DATA[:50]), (5000, DATA[:3000]), (20000, DATA),
                                         (4204, DATA[:1])])
@FORMS
def test_scatter_and_gather_move_what_the_python_copies_move(vcopy, monkeypatch, offset, data, form):
    _python_copies(monkeypatch)
    pure, runs = _scattered(SIZES)
    fast, _ = _scattered(SIZES)
    runs = form(runs)
    done = Buffers(runs, sum(SIZES), pure).write(offset, data)
    assert vcopy.scatter(memoryview(data), fast, runs, offset) == done
    assert [bytes(r) for r in fast] == [bytes(r) for r in pure]
    assert done == max(0, min(len(data), sum(SIZES) - offset))
    want, got = bytearray(len(data)), bytearray(len(data))
    n = Buffers(runs, sum(SIZES), pure).read_into(offset, memoryview(want))
    assert vcopy.gather(memoryview(got), fast, runs, offset) == n == done and got == want


def test_gather_reads_the_runs_in_order(vcopy):
    regions, runs = _scattered(SIZES)
    Buffers(runs, sum(SIZES), regions).write(0, DATA[:sum(SIZES)])
    dst = bytearray(sum(SIZES) + 10)
    assert vcopy.gather(memoryview(dst), regions, runs, 0) == sum(SIZES)
    assert bytes(dst) == DATA[:sum(SIZES)] + bytes(10)


@pytest.mark.parametrize("bad,error", [
    ([2, 0, 100], "region 2 is not in a table of 2"),
    ([-1, 0, 100], "region -1 is not in a table of 2"),
    ([1, 2 * 8192 - 99, 100], "outside its region"),   # one byte past its end
    ([1, 2 * 8192 - 100, 101], "outside its region"),
    ([1, -1, 100], "outside its region"),
    ([1, 0, -100], "negative length"),
    ([1, 2 ** 62, 2 ** 62], "outside its region"),
])
@FORMS
def test_a_bad_run_is_refused_before_anything_is_written(vcopy, bad, error, form):
    """A run that names no region, or leaves its region (past its end,
    negative, overflowing): ValueError, and not one byte moved, in either
    direction, though the runs before it were good."""
    regions, runs = _scattered([4096, 4096])
    runs = form(runs + bad)
    with pytest.raises(ValueError, match=error):
        vcopy.scatter(b"\xff" * 9000, regions, runs, 0)
    assert all(bytes(r) == bytes(len(r)) for r in regions)
    dst = bytearray(b"\xcc" * 9000)
    with pytest.raises(ValueError, match=error):
        vcopy.gather(memoryview(dst), regions, runs, 0)
    assert dst == b"\xcc" * 9000


def test_bad_arguments_are_refused_before_anything_is_written(vcopy):
    """A read-only region to scatter into, a region that is no buffer, runs
    that are not ints or not three each (a list, or an array that is not of
    int64s), a negative offset, a tuple for a list: an exception, and
    nothing written."""
    regions, runs = _scattered([4096, 4096])
    cases = [(BufferError, [regions[0], memoryview(bytes(8192 * 2))], runs, 0),
             (TypeError, [regions[0], 12345], runs, 0),
             (TypeError, regions, [0, 0, "4096"], 0),
             (ValueError, regions, runs[:-1], 0),
             (ValueError, regions, _packed(runs[:-1]), 0),
             (TypeError, regions, array.array("i", runs), 0),
             (TypeError, regions, array.array("d", runs), 0),
             (TypeError, regions, tuple(runs), 0),
             (ValueError, regions, runs, -1),
             (TypeError, tuple(regions), runs, 0)]
    for error, regs, rs, offset in cases:
        with pytest.raises(error):
            vcopy.scatter(b"\xff" * 9000, regs, rs, offset)
    assert all(bytes(r) == bytes(len(r)) for r in regions)


def test_only_the_regions_copied_are_pinned(vcopy):
    """Runs past the data's end are not looked at: a region only they name
    is not acquired (here one that cannot be), and the copy goes through."""
    regions, runs = _scattered([4096, 4096])
    gone = memoryview(bytearray(10))
    gone.release()
    regions.append(gone)
    assert vcopy.scatter(b"\xaa" * 4096, regions, [*runs[:3], 2, 0, 10], 0) == 4096
    assert vcopy.gather(memoryview(bytearray(4096)), regions, [*runs[:3], 2, 0, 10], 0) == 4096
    with pytest.raises(ValueError):   # named by a run that is copied: refused
        vcopy.scatter(b"\xaa" * 4097, regions, [*runs[:3], 2, 0, 10], 0)
    assert bytes(regions[0][5:4101]) == b"\xaa" * 4096 and bytes(regions[0][4101:4102]) == b"\0"


def test_scatter_never_reaches_past_a_mapped_region(vcopy):
    """Runs of a mapping (a region as GuestMemory maps it): data beyond
    them stays unwritten, the mapping's other bytes are untouched."""
    m = mmap.mmap(-1, 8192)
    view = memoryview(m)
    assert vcopy.scatter(b"\xaa" * 1000, [view], [0, 0, 100, 0, 4096, 100], 0) == 200
    assert bytes(view[0:100]) == b"\xaa" * 100 and bytes(view[4096:4196]) == b"\xaa" * 100
    assert bytes(view[100:4096]) == bytes(3996) and bytes(view[4196:]) == bytes(8192 - 4196)
    with pytest.raises(ValueError, match="outside its region"):
        vcopy.scatter(b"\xaa" * 1000, [view[:4096]], [0, 4000, 200], 0)
    assert bytes(view[4000:4096]) == bytes(96)
    view.release()
    m.close()


@FORMS
def test_the_device_copies_through_the_helper_with_the_same_results(vcopy, monkeypatch, form):
    """Buffers.write and the write data gathered for the STML take the helper
    when it is there: the same bytes and counts as without it, from runs in
    either form."""
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
        regions, runs = _scattered(sizes)
        out = Buffers(form(runs), sum(sizes), regions)
        written = out.write(108, data)
        shared = bytearray(out.size - 108)
        req = scsi.Request(V.Virtqueue(2), 0, out.tail(108), Buffers([], 0, regions), 0, 1, out.size - 108)

        class Port:
            def buffer(self, size: int) -> memoryview:
                return memoryview(shared)[:size]
        dev = scsi.VirtioScsiDevice(Port())   # type: ignore[arg-type]
        sent, held = dev._gather(req, 0, req.data_out.size)
        assert held is not None and sent == [held]
        results.append((written, [bytes(r) for r in regions], bytes(shared)))
    assert results[0] == results[1]
    assert calls == ["scatter", "gather"]
    assert results[0][0] == sum(sizes) - 108 and results[0][2] == data[:sum(sizes) - 108]


# ---------------------------------------------------------------- an indirect table's chain (0315)

KIB = 1024
# three regions over one memfd: A and B adjacent in guest memory (a run may
# cross from one into the other), C after a gap
LAYOUT = [(0, 512 * KIB, 4096), (512 * KIB, 256 * KIB, 4096 + 512 * KIB), (2048 * KIB, 256 * KIB, 4096 + 768 * KIB)]


@pytest.fixture
def split_ring():
    ram = GuestRam(1 << 20)
    dq, vq, mem = served_ring(ram, LAYOUT)
    yield dq, vq, mem
    for fd in (dq.kick, dq.call, ram.fd):
        os.close(fd)


def _pop(vq: V.Virtqueue) -> tuple:
    try:
        chain = vq.pop()
    except V.ChainError as e:
        return ("refused", str(e))
    assert chain is not None   # (runs: a list from Python's walk, an array('q') from the helper's)
    return (chain.head, list(chain.readable), list(chain.writable), chain.readable_size, chain.writable_size)


def _walked_both_ways(dq, vq: V.Virtqueue, monkeypatch, vcopy, take: Callable[[V.Virtqueue], Any]) -> list:
    """Head 0 offered twice: what `take` makes of Python's walk, then of the helper's."""
    got = []
    for helper in (None, vcopy):
        monkeypatch.setattr(V, "_vcopy", helper)
        dq.offer(0)
        dq.publish(kick=False)
        got.append(take(vq))
    return got


EDGES = [0, 4096, 512 * KIB - 4096, 512 * KIB - 100, 512 * KIB, 768 * KIB - 4096, 768 * KIB, 2048 * KIB,
         2304 * KIB - 4096, 2304 * KIB, -4096, (1 << 64) - 4096 - GuestRam.GPA_BASE]   # the last: wraps
ENTRY = st.tuples(st.one_of(st.sampled_from(EDGES), st.integers(0, 768 * KIB), st.integers(-8192, 3 << 20)),
                  st.one_of(st.sampled_from([0, 1, 100, 4096, 4096, 512 * KIB]), st.integers(0, (1 << 32) - 1)),
                  st.sampled_from([0, 1, 1, 1, 2, 3, 3, 3, 3, 4]), st.integers(0, 14))


@settings(max_examples=600, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ENTRY, min_size=1, max_size=12), st.one_of(st.none(), st.integers(0, 12)))
def test_the_helper_walks_an_indirect_table_as_python_does(vcopy, split_ring, monkeypatch, entries, split):
    """Random indirect tables (adjacent buffers, region edges and gaps, any
    flags and next index, addresses that wrap), or well-formed ones (a split
    into device-readable then device-writable buffers): the helper's chain
    is Python's, run for run and size for size, or the same refusal."""
    dq, vq, mem = split_ring
    table = dq.ram.alloc(16 * len(entries))
    for k, (off, length, flags, nxt) in enumerate(entries):
        if split is not None:   # in order, device-writable from `split` on
            more = k + 1 < len(entries)
            flags, nxt = (DESC_F_NEXT if more else 0) | (DESC_F_WRITE if k >= split else 0), k + 1
        dq.ram.write(table + 16 * k, struct.pack("<QIHH", (dq.ram.GPA_BASE + off) % (1 << 64), length, flags, nxt))
    dq.write_desc(0, table, 16 * len(entries), DESC_F_INDIRECT)
    got = _walked_both_ways(dq, vq, monkeypatch, vcopy, _pop)
    assert got[0] == got[1]
    dq.ram.top -= 16 * len(entries)


def test_the_helpers_walk_of_many_runs_hands_them_over_packed(vcopy, split_ring, monkeypatch):
    """Linux's 1 MiB read: a header, a response and scattered pages. The
    helper's walk gives the pages' runs as one array('q') (no Python int per
    run, decision 0316) and a direction of a few runs as a list; both the
    runs Python's walk makes, and the read data lands in the pages."""
    dq, vq, mem = split_ring
    ram = dq.ram
    pages = [ram.alloc(4096, 4096) for _ in range(2 * 12)][::2]      # no two adjacent
    req, resp = ram.alloc(51), ram.alloc(108)
    table = ram.alloc(16 * (2 + len(pages)))
    bufs = [(req, 51, 0), (resp, 108, DESC_F_WRITE)] + [(p, 4096, DESC_F_WRITE) for p in pages]
    for k, (addr, n, flags) in enumerate(bufs):
        more = DESC_F_NEXT if k + 1 < len(bufs) else 0
        ram.write(table + 16 * k, struct.pack("<QIHH", addr, n, flags | more, k + 1))
    dq.write_desc(0, table, 16 * len(bufs), DESC_F_INDIRECT)
    python, packed = _walked_both_ways(dq, vq, monkeypatch, vcopy, V.Virtqueue.pop)
    assert type(packed.readable) is list and type(packed.writable) is array.array
    assert packed.writable.typecode == "q" and len(packed.writable) == 3 * (1 + len(pages))
    assert list(packed.writable) == python.writable and packed.readable == python.readable
    monkeypatch.setattr(scsi, "_vcopy", vcopy)
    data = bytes(range(256)) * 16 * len(pages)
    inb = Buffers(packed.writable, packed.writable_size, packed.regions)
    assert inb.write(108, data) == len(data)
    assert b"".join(ram.read(p, 4096) for p in pages) == data
