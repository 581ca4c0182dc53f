"""RAM backend: a sparse set of fixed-size pages, so discard frees memory."""
from __future__ import annotations

from typing import Sequence

PAGE = 1 << 20


class RamBackend:
    """Pages are allocated on first write; unwritten pages read as zeros."""

    inline = True
    can_discard = True
    can_resize = True
    aio = None          # blocking calls only (see Backend.aio)
    discard_granularity = PAGE   # only whole pages are given back

    def __init__(self, size: int) -> None:
        self._size = size
        self._pages: dict[int, bytearray] = {}

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
                buf[pos:pos + n] = bytes(n)
            else:
                buf[pos:pos + n] = page[in_page:in_page + n]

    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None:
        for b in bufs:
            mv = memoryview(b).cast("B")
            for idx, in_page, n, pos in self._spans(offset, len(mv)):
                page = self._pages.get(idx)
                if page is None:
                    page = self._pages[idx] = bytearray(PAGE)
                page[in_page:in_page + n] = mv[pos:pos + n]
            offset += len(mv)

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        self.read_into(offset, buf)
        return True

    def write_nowait(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> bool:
        self.write_from(offset, bufs, sync)
        return True

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        for idx, in_page, n, _ in self._spans(offset, length):
            page = self._pages.get(idx)
            if page is None:
                continue
            if n == PAGE:
                del self._pages[idx]
            else:
                page[in_page:in_page + n] = bytes(n)
                if page.count(0) == PAGE:
                    del self._pages[idx]   # nothing left in the page: free it

    def resize(self, size: int) -> None:
        if size < self._size:
            self.discard(size, self._size - size)
        self._size = size

    def mapped_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, mapped) runs covering [offset, offset+length): a page
        is mapped from its first write until a discard frees it whole."""
        runs: list[tuple[int, int, bool]] = []
        for idx, in_page, n, pos in self._spans(offset, length):
            mapped = idx in self._pages
            if runs and runs[-1][2] == mapped:
                o, l, m = runs[-1]
                runs[-1] = (o, l + n, m)
            else:
                runs.append((offset + pos, n, mapped))
        return runs

    def allocated(self) -> int:
        """Bytes of RAM held (for thin-provisioning accounting)."""
        return len(self._pages) * PAGE

    def close(self) -> None:
        self._pages.clear()
