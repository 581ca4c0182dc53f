"""Memory the carriers share or reuse: SharedRegion (a memfd one side fills
and lends to the other) and BufferPool (receive buffers used again)."""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
from typing import Any

from stml.api.sizes import BIG_FRAME


class SharedRegion:
    """Memory one side of a stream fills and lends to the other: the STML reads
    data into it for a same-host front end to send, a front end receives write
    data into it for the STML to write.

    A memfd of `size` bytes, carved into slots by size class (powers of two
    from 64 KiB). A slot is a ctypes array over the mapping, so every view
    of it holds a reference to it: it is free again when nothing but this
    region refers to it (CPython's reference count tells, as in BufferPool)
    and the peer has handed it back. Bounded: when no slot fits, `get`
    returns None and the caller uses ordinary memory (the data then travels
    through the socket).
    The size is sealed: the peer maps it only when it cannot shrink.
    """

    MIN_SLOT = BIG_FRAME

    def __init__(self, size: int = 64 << 20, name: str = "scsi-target-read-data") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self._map = mmap.mmap(self.fd, size)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._top = 0
        self._by_class: dict[int, list] = {}
        self.slots: dict[int, int] = {}    # id(slot) -> offset (slots live as long as the region)
        self._lent: dict[int, Any] = {}               # offset -> slot, until the peer frees it

    def get(self, size: int) -> memoryview | None:
        """A writable view of `size` bytes in a free slot, or None."""
        cls = max(self.MIN_SLOT, 1 << (size - 1).bit_length())
        slots = self._by_class.setdefault(cls, [])
        if (slot := _take_unused(slots)) is not None:
            return memoryview(slot).cast("B")[:size]
        if self._top + cls > self.size:
            return None
        slot = (ctypes.c_char * cls).from_buffer(self._map, self._top)
        slots.append(slot)
        self.slots[id(slot)] = self._top
        self._top += cls
        return memoryview(slot).cast("B")[:size]

    def lend_slot(self, frame: Any) -> tuple[int, int] | None:
        """(offset, length) of a frame that is a view of one of our slots, now
        lent to the peer; None for any other frame."""
        if type(frame) is memoryview and id(frame.obj) in self.slots:
            return self.lend(frame)
        return None

    def lend(self, view: memoryview) -> tuple[int, int]:
        """(offset, length) of a view of one of our slots, now lent to the peer."""
        offset = ctypes.addressof(ctypes.c_char.from_buffer(view)) - self._base
        self._lent[offset] = view.obj
        return offset, len(view)

    def free(self, offsets: tuple[int, ...]) -> None:
        for offset in offsets:
            self._lent.pop(offset, None)

    def close(self) -> None:
        """Release the descriptor (the mapping goes with the last view of it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _take_unused(objs: list) -> Any:
    """The first object of `objs` that only the list refers to (CPython's
    reference count tells), or None; it moves to the end of the list, so
    the list stays in the order they were handed out and the next one is
    usually free at the front (a scan from the front of a fixed order looked
    at 6.5 of 16 slots per 64 KiB read)."""
    for i in range(len(objs)):
        if sys.getrefcount(objs[i]) == 2:   # the list and getrefcount's argument
            obj = objs.pop(i)
            objs.append(obj)
            return obj
    return None



class BufferPool:
    """Receive buffers for big frames, used again once their data is consumed.

    A fresh 1 MiB bytearray costs a zero-fill (and often page faults): a
    quarter of the STML's time on 1 MiB writes. Consumers keep only
    memoryviews (the backend writes from them, the iSCSI front end sends
    from them), and every view holds a reference to its buffer, so a buffer
    whose only reference is the pool's is free again: CPython's reference
    count tells, without the consumers knowing about the pool. At most
    `limit` bytes are kept; past that, buffers are plain allocations.
    """

    def __init__(self, limit: int = 64 << 20) -> None:
        self.limit = limit
        self.kept = 0
        self._by_size: dict[int, list[bytearray]] = {}

    def get(self, size: int) -> bytearray:
        bufs = self._by_size.setdefault(size, [])
        if (buf := _take_unused(bufs)) is not None:
            return buf
        buf = bytearray(size)
        if self.kept + size <= self.limit:
            bufs.append(buf)
            self.kept += size
        return buf

