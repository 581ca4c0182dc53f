"""RAM backend: a sparse set of fixed-size pages, so discard frees memory."""
from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from typing import Sequence

PAGE = 1 << 20
_ZERO = memoryview(bytes(PAGE))


class RamBackend:
    """Pages are allocated on first write; unwritten pages read as zeros.

    The numbers of the allocated pages are also kept sorted, so a walk of the
    mapped runs or a discard visits allocated pages and run boundaries only,
    never every page of a range (a LUN of 64 GiB has 65,536 of them)."""

    inline = True
    can_discard = True
    can_resize = True
    aio = None          # blocking calls only (see Backend.aio)
    dirty = False                # nothing is more durable after a flush
    sync_error: str | None = None   # never set (see Backend.sync_error)
    discard_granularity = PAGE   # only whole pages are given back

    def __init__(self, size: int) -> None:
        self._size = size
        self._pages: dict[int, bytearray] = {}
        self._order: list[int] = []   # the keys of _pages, ascending

    def size(self) -> int:
        return self._size

    def _spans(self, offset: int, length: int):
        """Yield (page index, offset in page, length, offset in caller's buffer)."""
        pos = 0
        while pos < length:
            idx, in_page = divmod(offset + pos, PAGE)
            n = min(PAGE - in_page, length - pos)
            yield idx, in_page, n, pos
            pos += n

    def read_into(self, offset: int, buf: memoryview) -> None:
        for idx, in_page, n, pos in self._spans(offset, len(buf)):
            page = self._pages.get(idx)
            if page is None:
                buf[pos:pos + n] = _ZERO[:n]
            else:
                buf[pos:pos + n] = page[in_page:in_page + n]

    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None:
        for b in bufs:
            mv = memoryview(b).cast("B")
            for idx, in_page, n, pos in self._spans(offset, len(mv)):
                page = self._pages.get(idx)
                if page is None:
                    page = self._pages[idx] = bytearray(PAGE)
                    insort(self._order, idx)
                page[in_page:in_page + n] = mv[pos:pos + n]
            offset += len(mv)

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        self.read_into(offset, buf)
        return True

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        return None   # read_nowait copies from the pages, into any buffer

    def write_nowait(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> bool:
        self.write_from(offset, bufs, sync)
        return True

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        """Zero the range; a page left all zeros is freed. Visits only the
        allocated pages of the range."""
        if length <= 0:
            return
        end = offset + length
        order = self._order
        lo, hi = bisect_left(order, offset // PAGE), bisect_right(order, (end - 1) // PAGE)
        kept = []
        for idx in order[lo:hi]:
            base = idx * PAGE
            start, stop = max(offset, base) - base, min(end, base + PAGE) - base
            page = self._pages[idx]
            if stop - start < PAGE:
                page[start:stop] = _ZERO[:stop - start]
                if page != _ZERO:
                    kept.append(idx)
                    continue
            del self._pages[idx]   # nothing left in the page: free it
        order[lo:hi] = kept

    def resize(self, size: int) -> None:
        if size < self._size:
            self.discard(size, self._size - size)
        self._size = size

    def _run_end(self, i: int) -> int:
        """The last position in _order of the run of consecutive pages that
        starts at position i (binary search: order[j] - j is non-decreasing)."""
        order = self._order
        base = order[i] - i
        lo, hi = i, len(order) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if order[mid] - mid == base:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def mapped_extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]:
        """(offset, length, mapped) runs from `offset`, at most `limit` of them:
        a page is mapped from its first write until a discard frees it whole.
        Each run costs two binary searches, whatever the size of the range."""
        end = offset + length
        order = self._order
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end and len(runs) < limit:
            i = bisect_left(order, pos // PAGE)
            mapped = i < len(order) and order[i] == pos // PAGE
            if mapped:
                stop = (order[self._run_end(i)] + 1) * PAGE
            else:
                stop = order[i] * PAGE if i < len(order) else end
            stop = min(stop, end)
            runs.append((pos, stop - pos, mapped))
            pos = stop
        return runs

    def mapped_extents_nowait(self, offset: int, length: int,
                              limit: int) -> list[tuple[int, int, bool]] | None:
        return self.mapped_extents(offset, length, limit)

    def allocated(self) -> int:
        """Bytes of RAM held (for thin-provisioning accounting)."""
        return len(self._pages) * PAGE

    def close(self) -> None:
        self._pages.clear()
        self._order.clear()
