"""Which failed connections (ErrorRecoveryLevel 2) the front end keeps for a
TASK REASSIGN, without I/O.

A connection that dies with tasks keeps them, its budget share and its
session for a while (RFC 7143 7.2.2). Without a cap per host, one initiator
could cut connection after connection and hold the whole budget: dead
connections are not open connections, so max_conn_per_host does not see them.
Here each host keeps at most `per_host` of them; past that its oldest is given
up (the caller expires it at once), so the cost of a cut is bounded by what the
host's newest failures hold. Connections that are over by themselves (every
task reassigned: `live` says no) do not count and are dropped lazily.
"""
from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T", bound=Hashable)


def retention(time2wait: int, time2retain: int, cap: float) -> float:
    """Seconds a failed connection's tasks are kept: Time2Wait + Time2Retain as
    negotiated, but never more than `cap` (Time2Wait is the larger of both
    offers, so the initiator alone could make it an hour)."""
    return min(float(time2wait + time2retain), cap)


def announced(time2wait: int, time2retain: int, cap: float) -> tuple[int, int]:
    """Time2Wait and Time2Retain a Logout Response tells (RFC 7143 11.15.2-3:
    the target's own, at ERL 2): within `retention`, and Time2Retain kept
    whole, so an initiator that waits as told still finds its tasks (the
    negotiated 3600 + 20 under a cap of 60: wait 40, then 20 to reassign)."""
    retain = min(time2retain, int(cap))
    return min(time2wait, int(cap) - retain), retain


class Retained(Generic[T]):
    """Failed connections kept, oldest first, by the host they came from."""

    def __init__(self, per_host: int, live: Callable[[T], bool]) -> None:
        self.per_host = per_host
        self.live = live
        self.hosts: dict[str, dict[T, None]] = {}
        self.host_of: dict[T, str] = {}

    def keep(self, item: T, host: str) -> list[T]:
        """Keep `item`; returns the host's oldest kept items beyond `per_host`
        (no longer kept: the caller expires them)."""
        kept = self.hosts.setdefault(host, {})
        for old in [c for c in kept if not self.live(c)]:
            self.forget(old)
        kept = self.hosts.setdefault(host, {})
        kept[item] = None
        self.host_of[item] = host
        over = list(kept)[:max(0, len(kept) - self.per_host)]
        for old in over:
            self.forget(old)
        return over

    def forget(self, item: T) -> None:
        host = self.host_of.pop(item, None)
        if host is None:
            return
        kept = self.hosts[host]
        kept.pop(item, None)
        if not kept:
            del self.hosts[host]

    def __len__(self) -> int:
        return len(self.host_of)
