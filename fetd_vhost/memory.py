"""Guest memory as the vhost-user master shares it: regions of memfds (or
other files), each known by its guest-physical and its master-virtual
(QEMU's) address. Every address a guest hands us is translated here and
checked against the table: nothing outside a mapped region is reachable."""
from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import MutableSequence
from dataclasses import dataclass
from typing import TypeAlias

MAX_REGIONS = 8          # VHOST_MEMORY_MAX_NREGIONS: what SET_MEM_TABLE can carry

# A chain's buffers in one direction: three ints per run of guest memory
# (region index, offset in the region, length). A list, or from the compiled
# build's walk of many runs an array('q') (decision 0316): the same
# operations on both.
Runs: TypeAlias = MutableSequence[int]


class BadAddress(Exception):
    """An address range that is not wholly inside the memory table."""


@dataclass(frozen=True, slots=True)
class RegionSpec:
    gpa: int       # guest physical address
    size: int
    uva: int       # the master's (QEMU's) virtual address of the region
    offset: int    # where the region starts in its file


class Region:
    __slots__ = ("spec", "view", "_map", "gpa", "gpa_end")

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        """Map `spec` of `fd` (the caller closes fd). Raises OSError or
        ValueError for a region the file cannot back: touching a page past a
        file's end would kill us with SIGBUS, so that is checked first."""
        if spec.size <= 0 or spec.offset < 0:
            raise ValueError("empty region or negative offset")
        if os.fstat(fd).st_size < spec.offset + spec.size:
            raise ValueError("region larger than its file")
        start = spec.offset - spec.offset % mmap.ALLOCATIONGRANULARITY
        self._map = mmap.mmap(fd, spec.offset + spec.size - start, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        self.view = memoryview(self._map)[spec.offset - start:]
        self.spec = spec
        self.gpa, self.gpa_end = spec.gpa, spec.gpa + spec.size


class GuestMemory:
    """The memory table: translation of guest-physical (descriptors) and
    master-virtual (ring addresses) ranges. A chain's buffers become runs
    (region index, offset, length: ints, checked here) of `views`, the
    regions' mappings in guest-physical order; rings become views."""

    def __init__(self, regions: list[Region]) -> None:
        if len(regions) > MAX_REGIONS:
            raise ValueError(f"{len(regions)} memory regions (at most {MAX_REGIONS})")
        self.by_gpa = sorted(regions, key=lambda r: r.spec.gpa)
        self.by_uva = sorted(regions, key=lambda r: r.spec.uva)
        self.views = [r.view for r in self.by_gpa]    # what a run's region index names
        self.gpa_starts = [r.spec.gpa for r in self.by_gpa]
        self.gpa_sizes = [r.spec.size for r in self.by_gpa]
        self._uva_starts = [r.spec.uva for r in self.by_uva]
        self._last = self.by_gpa[0] if self.by_gpa else None   # where the last buffer was
        self._last_index = 0

    @staticmethod
    def _find(starts: list[int], addr: int) -> int:
        """The index of the region (by `starts`) that `addr` may be in, or -1."""
        return bisect.bisect_right(starts, addr) - 1

    def uva(self, addr: int, length: int) -> memoryview:
        """A contiguous view of [addr, addr+length) in the master's address space."""
        i = self._find(self._uva_starts, addr)
        r = self.by_uva[i] if i >= 0 else None
        if r is None or addr - r.spec.uva >= r.spec.size:
            raise BadAddress(f"address 0x{addr:x} is outside guest memory")
        off = addr - r.spec.uva
        if length < 0 or off + length > r.spec.size:
            raise BadAddress(f"range 0x{addr:x}+{length} leaves its memory region")
        return r.view[off:off + length]

    def translate(self, runs: Runs, addr: int, length: int) -> None:
        """The guest-physical range [addr, addr+length) as runs appended to
        `runs` (a chain's buffers, one call per range): more than one when it
        crosses into an adjacent region. Raises BadAddress for any byte
        outside the table. Ints only: the copies make no view per run."""
        r = self._last
        if r is not None and r.gpa <= addr and addr + length <= r.gpa_end and length >= 0:
            runs.append(self._last_index)    # the usual case: where the previous buffer was
            runs.append(addr - r.gpa)
            runs.append(length)
            return
        if length < 0 or addr < 0 or addr + length > 1 << 64:
            raise BadAddress(f"range 0x{addr:x}+{length} wraps")
        while length:
            i = self._find(self.gpa_starts, addr)
            r = self.by_gpa[i] if i >= 0 else None
            if r is None or addr >= r.gpa_end:
                raise BadAddress(f"address 0x{addr:x} is outside guest memory")
            n = min(length, r.gpa_end - addr)
            runs.append(i)    # (three appends: cheaper than a tuple, interpreted or compiled)
            runs.append(addr - r.gpa)
            runs.append(n)
            self._last, self._last_index = r, i
            addr += n
            length -= n

    def gpa_contiguous(self, addr: int, length: int) -> memoryview:
        """One view of a guest-physical range that must lie in one region
        (an indirect descriptor table)."""
        runs: list[int] = []
        self.translate(runs, addr, length)
        if len(runs) != 3:
            raise BadAddress(f"range 0x{addr:x}+{length} is not in one memory region")
        return self.views[runs[0]][runs[1]:runs[1] + runs[2]]
