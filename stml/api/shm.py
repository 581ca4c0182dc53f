"""Memory the carriers share or reuse: SharedRegion (a memfd one side fills
and lends to the other) and BufferPool (receive buffers used again).

Nothing here asks the interpreter whether memory is still referenced: every
buffer goes back through an explicit call by whoever holds it
(docs/contract.md, "Buffer ownership")."""
from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
from typing import Any, Final

from stml.api.sizes import BIG_FRAME

log = logging.getLogger("stml.api")


class SharedRegion:
    """Memory one side of a stream fills and lends to the other: the STML reads
    data into it for a same-host front end to send, a front end receives write
    data into it for the STML to write.

    A memfd of `size` bytes, carved into slots by size class (powers of two
    from 64 KiB). A slot has two holders, each of which lets go explicitly:
    the code that took it with get() (until release()) and the peer it was
    lent to (from lend(), when its carrier sent a reference, until the peer
    hands it back: give_back()). It is free again when neither holds it.
    Bounded: when no slot fits, get() returns None and the caller uses
    ordinary memory (the data then travels through the socket).
    The size is sealed: the peer maps it only when it cannot shrink.
    """

    MIN_SLOT: Final = BIG_FRAME

    def __init__(self, size: int = 64 << 20, name: str = "scsi-target-read-data") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self._map = mmap.mmap(self.fd, size)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._top = 0
        # a slot is a ctypes array over the mapping: views of it name it (view.obj)
        self.slots: dict[int, int] = {}            # id(slot) -> offset (slots live as long as the region)
        self._slot: dict[int, Any] = {}            # offset -> slot
        self._view: dict[int, memoryview] = {}     # offset -> a byte view of the whole slot
        self._free: dict[int, list[int]] = {}      # size class -> offsets of free slots
        self._home: dict[int, list[int]] = {}      # offset -> its size class's free list (_put)
        self._taken: dict[int, memoryview] = {}    # offset -> the view get() handed out, not yet released
        self._lent: set[int] = set()               # offsets the peer holds
        self._lent_at: dict[int, int] = {}         # where a lent view starts -> its slot's offset

    def get(self, size: int) -> memoryview | None:
        """A writable view of `size` bytes in a free slot, yours until release(); or None."""
        cls = self.MIN_SLOT if size <= self.MIN_SLOT else 1 << (size - 1).bit_length()
        free = self._free.get(cls)
        # (Any: compiled, the dicts' own int object, not unboxed and boxed again per use)
        offset: Any
        if free:
            offset = free.pop()
        elif self._top + cls <= self.size:
            offset, self._top = self._top, self._top + cls
            slot = (ctypes.c_char * cls).from_buffer(self._map, offset)
            self.slots[id(slot)] = offset
            self._slot[offset] = slot
            self._view[offset] = memoryview(slot).cast("B")
            self._home[offset] = self._free.setdefault(cls, [])
        else:
            return None
        # a read of the slot's size (64 KiB, 1 MiB) gets the slot's own view:
        # no slice made per command (decision 0426)
        view = self._view[offset]
        if size != cls:
            view = view[:size]
        self._taken[offset] = view
        return view

    def owns(self, view: Any) -> bool:
        """The view is of one of our slots."""
        return type(view) is memoryview and id(view.obj) in self.slots

    def release(self, view: memoryview) -> None:
        """The holder from get() is done with the slot of this view."""
        offset: Any = self.slots.get(id(view.obj))   # (Any: as in get)
        taken = self._taken
        if offset is not None and offset in taken:   # (not pop(offset, None): a method call, compiled)
            del taken[offset]
            if offset not in self._lent:
                self._home[offset].append(offset)   # (_put, in place)

    def lend_slot(self, frame: Any) -> tuple[int, int] | None:
        """(offset, length) of a frame that is a view of a slot someone holds,
        now also held by the peer; None for any other frame (it is sent as
        bytes). A slot is lent once at a time."""
        if type(frame) is not memoryview:
            return None
        start = self.slots.get(id(frame.obj))
        if start is None:
            return None
        given = self._taken.get(start)
        if given is None or start in self._lent:
            log.error("a shared slot was sent while nobody held it, or twice: sent as a copy")
            return None
        # get()'s own view starts at its slot; another view of it (a slice) is found by its address
        offset = start if frame is given else ctypes.addressof(ctypes.c_char.from_buffer(frame)) - self._base
        self._lent.add(start)
        self._lent_at[offset] = start
        return offset, len(frame)

    def give_back(self, offsets: tuple[int, ...] | list[int]) -> None:
        """The peer no longer uses these (offsets of views it was lent)."""
        for offset in offsets:
            start = self._lent_at.pop(offset, None)
            if start is not None:
                self._lent.discard(start)
                if start not in self._taken:
                    self._put(start)

    def peer_gone(self) -> None:
        """The peer can hand nothing back any more: what it held is free once
        its other holder lets go."""
        for start in self._lent:
            if start not in self._taken:
                self._put(start)
        self._lent.clear()
        self._lent_at.clear()

    def in_use(self) -> int:
        """Slots someone holds (not free)."""
        return len(self._taken.keys() | self._lent)

    def _put(self, offset: int) -> None:
        self._home[offset].append(offset)

    def close(self) -> None:
        """Release the descriptor (the mapping goes with the last view of it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BufferPool:
    """Receive buffers for big frames, used again once their holder releases them.

    A fresh 1 MiB bytearray costs a zero-fill (and often page faults): a
    quarter of the STML's time on 1 MiB writes. A carrier receives a big
    frame into a buffer from get(); whoever ends up holding the frame gives
    the buffer back with release() when done with it (the STML: when the
    command ends). At most `limit` bytes are kept; past that, buffers are
    plain allocations that release() ignores.
    """

    def __init__(self, limit: int = 64 << 20) -> None:
        self.limit = limit
        self.kept = 0
        self._free: dict[int, list[bytearray]] = {}
        self._out: dict[int, bytearray] = {}   # id -> buffers of ours handed out

    def get(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            buf = free.pop()
        else:
            buf = bytearray(size)
            if self.kept + size > self.limit:
                return buf
            self.kept += size
            if free is None:
                self._free[size] = []
        self._out[id(buf)] = buf
        return buf

    def release(self, buf: Any) -> None:
        """A buffer from get() (or a view of one) is free again."""
        mine = self._out.pop(id(buf.obj if type(buf) is memoryview else buf), None)
        if mine is not None:
            self._free[len(mine)].append(mine)

    def in_use(self) -> int:
        """Kept buffers handed out and not released."""
        return len(self._out)
