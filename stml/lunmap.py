"""A target's LUs by number, indexed by designator (decision 0296). Not in
the compiled build (scsi_runtime.accel.HOT): a compiled subclass of dict
would not keep its own pop/update/clear refusals."""
from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any

from stml.lu import LogicalUnit


class LunMap(dict[int, LogicalUnit]):
    """A target's LUs by number, indexed by NAA designator as well: EXTENDED
    COPY names its copy targets by designator, and a walk of the LUs per CSCD
    descriptor would cost a command MAX_CSCD x the target's LUs (0296). The
    index changes with the map itself, so no code that adds or removes a LU
    can leave it behind; only a LU's own new identity (`LogicalUnit.go_online`)
    needs `renamed`. It keeps its numbers in order too, so REPORT LUNS slices
    what its allocation length holds instead of sorting up to 16,384 numbers
    per call (0223). The engine's per-command `get` is dict's own."""

    __slots__ = ("_by_naa", "_naa_of", "_numbers")

    def __init__(self, luns: dict[int, LogicalUnit] | None = None) -> None:
        super().__init__()
        self._by_naa: dict[bytes, LogicalUnit] = {}
        self._naa_of: dict[int, bytes] = {}   # the key each LU is indexed under
        self._numbers: list[int] = []          # the LUN numbers, ascending
        for number, lu in (luns or {}).items():
            self[number] = lu

    def __setitem__(self, number: int, lu: LogicalUnit) -> None:
        if number in self:
            self._forget(number)
        else:
            insort(self._numbers, number)
        super().__setitem__(number, lu)
        self._by_naa.setdefault(lu.naa, lu)   # ids are unique (config); a duplicate: the first
        self._naa_of[number] = lu.naa

    def __delitem__(self, number: int) -> None:
        self._forget(number)
        super().__delitem__(number)
        del self._numbers[bisect_left(self._numbers, number)]

    def _forget(self, number: int) -> None:
        naa = self._naa_of.pop(number)
        if self._by_naa.get(naa) is self[number]:
            del self._by_naa[naa]

    def renamed(self, lu: LogicalUnit) -> None:
        """`lu` has a new identity (an offline LU just opened): index it by it."""
        if self.get(lu.lun) is lu:
            self[lu.lun] = lu

    def numbers(self, first: int) -> list[int]:
        """The `first` LUN numbers in ascending order: a slice of the kept
        order, never a sort."""
        return self._numbers[:first]

    def by_naa(self, naa: bytes) -> LogicalUnit | None:
        """The LU with this designator, in one dict lookup."""
        lu = self._by_naa.get(naa)
        return lu if lu is not None and lu.naa == naa and self.get(lu.lun) is lu else None

    def _unsupported(self, *args: Any, **kw: Any) -> Any:
        raise TypeError("LunMap changes one LU at a time (item assignment, del): the index follows")

    pop = popitem = clear = update = setdefault = __ior__ = _unsupported
