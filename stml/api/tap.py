"""The one place each side of the link lets an instrument see its messages.

A tap is installed on the STML (`StmlServer.tap`) or on a front end's link
(`FrontEndLink.tap`). It is called for every contract message that side
receives (`inbound`, once the header is decoded, before anything handles
it) and for every message it sends (`outbound`, before it is queued), with
the peer, the header (decoded and packed) and the data frames. Management
messages and heartbeats pass it too. Returning True lets the message go
on; False swallows it (the side then does nothing more with it).

What a tap sees:
- `peer`: on the STML, the front end's (or management client's) routing
  id, bytes; on a front end, the STML endpoint it is linked to, a str.
- `header`: the decoded header (a dict; a tap must not change it).
- `packed`: the header as it crosses the link (msgpack bytes): each side has
  it at no cost (received, or packed once to send), and a recorder keeps it
  as it is instead of packing the header again.
- `frames`: the data frames (bytes or memoryviews). They are the carrier's
  memory, valid only during the call: a tap that keeps data copies it.

A tap that holds messages back and lets them go later (fault injection:
delay, reorder, duplicate) hands them on with the side's `deliver` (an
inbound message, handled as if just received) or `transmit` (an outbound
one, sent past the tap). Unset (None, the default), a tap costs the two
paths one attribute test each (scripts/pathcost.py --instructions).
"""
from __future__ import annotations

from typing import Any, Protocol

Peer = bytes | str   # a front end's routing id on the STML; the STML endpoint on a front end

# the direction of a message on the link (trace records carry these numbers)
TO_STML = 0
FROM_STML = 1


class Tap(Protocol):
    """See the module doc. Both methods run on the side's event loop."""

    def inbound(self, peer: Peer, header: dict[str, Any], packed: bytes, frames: list) -> bool: ...

    def outbound(self, peer: Peer, header: dict[str, Any], packed: bytes, frames: list) -> bool: ...


class Taps:
    """Several taps on one side, called in order; the first that swallows a
    message hides it from those after it (put an injector before a recorder
    to record what really crossed, after it to record what was offered)."""

    def __init__(self, *taps: Tap) -> None:
        self.taps = taps

    def inbound(self, peer: Peer, header: dict[str, Any], packed: bytes, frames: list) -> bool:
        return all(t.inbound(peer, header, packed, frames) for t in self.taps)

    def outbound(self, peer: Peer, header: dict[str, Any], packed: bytes, frames: list) -> bool:
        return all(t.outbound(peer, header, packed, frames) for t in self.taps)


class TapPoint:
    """Where taps are added and removed, on either side: the side keeps them in
    `_taps` and swaps its entry points in `_set_taps`."""

    _taps: list[Tap]

    def _set_taps(self) -> None:
        raise NotImplementedError

    def add_tap(self, tap: Tap) -> None:
        """See every message from now on, after the taps already there."""
        self._taps.append(tap)
        self._set_taps()

    def remove_tap(self, tap: Tap) -> None:
        if tap in self._taps:
            self._taps.remove(tap)
        self._set_taps()


def combine(taps: list[Tap]) -> Tap | None:
    """What a side's `tap` attribute holds for these taps: None for none (the
    paths' one test), the tap itself for one, else Taps."""
    if not taps:
        return None
    return taps[0] if len(taps) == 1 else Taps(*taps)
