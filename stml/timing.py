"""Stage timing (`scsi-target run --timing`): where a command's time goes,
from the front end's receipt of it to the delivery of its response.

A timed command carries nine CLOCK_MONOTONIC stamps (POINTS, ns): two the
front end takes and sends with rx_cmnd (`ts`), six the STML takes and sends
with xmit_response (`ts`, so a trace has them), and the delivery the front
end reports with scsi_target_done (`ts`). A stage is the time from the
latest earlier stamp the command has to its own (a command that never
reaches the backend has no backend stamps: its `xmit` stage runs from its
dispatch). Stamps of a front end on another host are moved onto the STML's
clock by the offset its heartbeat round trips give (ClockOffset); one with
the STML's boot id shares its clock.

Memory is bounded: a histogram is a fixed list of log-scale buckets (BOUNDS),
one per stage per LUN and per front end (at most MAX_KEYS of each), and the
commands between rx_cmnd and scsi_target_done are held in a table of at
most MAX_PENDING (the oldest goes first: an aborted command never gets its
scsi_target_done). Nothing here runs unless timing is on: the STML then
routes its messages through the timed entry points (stml.emulator)."""
from __future__ import annotations

import bisect
import collections
from collections.abc import Iterable
from time import monotonic_ns
from typing import Any

# the stamps of a command, in order: [0:2] the front end's (rx_cmnd ts),
# [2:8] the STML's (xmit_response ts), [8] the front end's delivery (done ts)
POINTS = ("fe_received", "rx_cmnd_sent", "stml_received", "queued", "dispatched",
          "backend_start", "backend_end", "xmit_sent", "delivered")
FE_RECEIVED, RX_SENT, STML_RECEIVED, QUEUED, DISPATCHED, BACKEND_START, BACKEND_END, XMIT_SENT, \
    DELIVERED = range(len(POINTS))
FRONT_END_POINTS = (FE_RECEIVED, RX_SENT, DELIVERED)   # on the front end's clock
# a stage ends at its point; "total" is front end received -> delivered (or the
# STML's received -> xmit sent for a front end that does not stamp)
STAGES = ("front_end", "to_stml", "to_queue", "ordering", "to_backend", "backend", "to_response",
          "delivery", "total")
# bucket upper bounds (ns): half-octave steps from ~1.4 us to ~69 s; one more bucket: beyond
# (ints: bisecting an int among floats compares through floats, several times slower)
BOUNDS = tuple(int(2 ** ((j + 21) / 2)) for j in range(52))
QUANTILES = (0.5, 0.9, 0.99)
MAX_KEYS = 1024       # LUNs, and front ends, with histograms of their own
MAX_PENDING = 65536   # commands between rx_cmnd and scsi_target_done
OFFSET_SAMPLES = 8    # heartbeat round trips the offset estimate keeps (the best one counts)


class Histogram:
    """Counts per bucket of BOUNDS (and one beyond), their sum and number
    (Timing.count adds to them)."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.count = 0
        self.sum = 0

    def quantile(self, q: float) -> float:
        """The q-quantile in ns, interpolated in its bucket on the log scale
        (the bucket bounds: the error is at most a factor of sqrt(2))."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                if i == len(BOUNDS):
                    return BOUNDS[-1]
                low = BOUNDS[i - 1] if i else BOUNDS[0] / 2 ** 0.5
                return low * (BOUNDS[i] / low) ** ((rank - seen) / n)
            seen += n
        return BOUNDS[-1]

    def percentiles(self) -> dict[str, float]:
        """p50/p90/p99 in microseconds."""
        return {f"p{int(q * 100)}": round(self.quantile(q) / 1000, 1) for q in QUANTILES}


class ClockOffset:
    """A front end's clock minus the STML's, from heartbeat round trips (NTP's
    on-wire estimate): the STML sends at t1, the front end receives at t2 and
    answers at t3, the STML receives at t4. offset = ((t2-t1) + (t3-t4)) / 2
    is off by at most half the round trip (t4-t1) - (t3-t2); the sample with
    the shortest round trip of the last OFFSET_SAMPLES is the estimate."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[int, int]] = collections.deque(maxlen=OFFSET_SAMPLES)

    def sample(self, t1: int, t2: int, t3: int, t4: int) -> bool:
        """Take one round trip; False (and nothing kept) for one that cannot be."""
        rtt = (t4 - t1) - (t3 - t2)
        if rtt < 0 or t3 < t2 or t4 < t1:
            return False
        self.samples.append((rtt, ((t2 - t1) + (t3 - t4)) // 2))
        return True

    def best(self) -> tuple[int, int] | None:
        """(offset, error bound) in ns, or None before the first round trip."""
        if not self.samples:
            return None
        rtt, offset = min(self.samples)
        return offset, (rtt + 1) // 2


def stages(stamps: list[int], offset: int | None) -> Iterable[tuple[int, int]]:
    """(stage index, ns) of one command's stamps (0: not reached). Front-end
    stamps are moved onto the STML's clock by `offset` (front end minus
    STML); with None (a remote front end not estimated yet) the stages that
    cross clocks are left out."""
    points = list(stamps)
    if offset is not None:
        for i in FRONT_END_POINTS:
            if points[i]:
                points[i] -= offset
    last = -1
    for i, t in enumerate(points):
        if not t:
            continue
        if last >= 0 and (offset is not None or (i in FRONT_END_POINTS) == (last in FRONT_END_POINTS)):
            yield i - 1, t - points[last]
        last = i
    first, end = (FE_RECEIVED, DELIVERED) if stamps[FE_RECEIVED] and stamps[DELIVERED] else \
        (STML_RECEIVED, XMIT_SENT)
    if stamps[first] and stamps[end]:
        yield len(STAGES) - 1, stamps[end] - stamps[first]   # each pair on one clock


class FrontEndClock:
    """What the STML knows of a front end's clock."""

    __slots__ = ("name", "same_host", "offset")

    def __init__(self, name: str, same_host: bool) -> None:
        self.name, self.same_host, self.offset = name, same_host, ClockOffset()

    def estimate(self) -> int | None:
        if self.same_host:
            return 0
        best = self.offset.best()
        return None if best is None else best[0]

    def report(self) -> dict[str, Any]:
        best = self.offset.best()
        if self.same_host:
            return {"clock": "same host", "offset_ns": 0, "error_ns": 0}
        if best is None:
            return {"clock": "remote, no round trip yet", "offset_ns": None, "error_ns": None}
        return {"clock": "remote", "offset_ns": best[0], "error_ns": best[1]}


class Timing:
    """The STML's stage timing: the commands in flight and the histograms."""

    def __init__(self, boot_id: str | None) -> None:
        self.boot_id = boot_id
        self.front_ends: dict[bytes, FrontEndClock] = {}
        # (front end ident, tag) -> [stamps, (target, LUN)]
        self.pending: dict[tuple[bytes, int], list] = {}
        self.by_lun: dict[tuple[str, int], list[Histogram]] = {}
        self.by_front_end: dict[str, list[Histogram]] = {}
        self.commands = 0   # commands whose stages were counted
        self.untracked = 0  # ... and those past MAX_KEYS, counted nowhere else

    # ------------------------------------------------------------ front ends
    def front_end(self, ident: bytes, name: str, boot_id: Any) -> None:
        """A front end registered (again) with timing granted."""
        same = isinstance(boot_id, str) and boot_id != "" and boot_id == self.boot_id
        known = self.front_ends.get(ident)
        if known is None or known.same_host != same or known.name != name:
            self.front_ends[ident] = FrontEndClock(name, same)

    def front_end_gone(self, ident: bytes) -> None:
        """Its clock and commands go, and its histograms unless a live front
        end has its name (a restarted one: a name with a new pid would
        otherwise fill MAX_KEYS over restarts)."""
        gone = self.front_ends.pop(ident, None)
        if gone is not None and all(fe.name != gone.name for fe in self.front_ends.values()):
            self.by_front_end.pop(gone.name, None)
        for key in [k for k in self.pending if k[0] == ident]:   # bounded by MAX_PENDING
            del self.pending[key]

    def echo(self, ident: bytes, echo: Any, now: int) -> None:
        """A heartbeat's `echo` [t1, t2, t3], received at `now` (t4)."""
        fe = self.front_ends.get(ident)
        if fe is None or fe.same_host or type(echo) is not list or len(echo) != 3 \
                or not all(type(t) is int for t in echo) or not 0 <= now - echo[0] < 60 * 10 ** 9:
            return
        fe.offset.sample(echo[0], echo[1], echo[2], now)

    # ------------------------------------------------------------ commands
    def received(self, ident: bytes, tag: int, lun: tuple[str, int] | None, ts: Any) -> list[int]:
        """rx_cmnd: the command's stamps from now on (the task fills the STML's)."""
        stamps = [0] * len(POINTS)
        if type(ts) is list and len(ts) == 2 and type(ts[0]) is int and type(ts[1]) is int:
            stamps[FE_RECEIVED], stamps[RX_SENT] = ts
        stamps[STML_RECEIVED] = monotonic_ns()
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            del pending[next(iter(pending))]
        pending[(ident, tag)] = [stamps, lun]
        return stamps

    def stamps(self, ident: bytes, tag: int) -> list[int] | None:
        entry = self.pending.get((ident, tag))
        return None if entry is None else entry[0]

    def responded(self, ident: bytes, tag: int) -> list[int] | None:
        """xmit_response leaves: its stamps for the header, or None when the
        command was not timed (a rx_cmnd refused before it became a task)."""
        entry = self.pending.get((ident, tag))
        if entry is None:
            return None
        stamps = entry[0]
        stamps[XMIT_SENT] = monotonic_ns()
        return stamps[STML_RECEIVED:DELIVERED]

    def delivered(self, ident: bytes, tags: Any, ts: Any) -> None:
        """scsi_target_done: these responses are delivered (at `ts`, one per tag,
        from a front end that stamps); their commands are counted."""
        if type(tags) is not list:
            return
        stamped = type(ts) is list and len(ts) == len(tags)
        fe = self.front_ends.get(ident)
        for i, tag in enumerate(tags):
            entry = self.pending.pop((ident, tag), None) if type(tag) is int else None
            if entry is None:
                continue
            stamps, lun = entry
            if not stamps[XMIT_SENT]:
                continue   # done for a command that got no response here: nothing to count
            if stamped and type(ts[i]) is int:
                stamps[DELIVERED] = ts[i]
            self.count(stamps, lun, fe)

    def count(self, stamps: list[int], lun: tuple[str, int] | None, fe: FrontEndClock | None) -> None:
        """Add a command's stages to its LUN's and its front end's histograms
        (Histogram.add, inlined: each stage's bucket is found once for both)."""
        offset = fe.estimate() if fe is not None else None
        mine = (self._row(self.by_lun, lun), self._row(self.by_front_end, fe.name if fe else None))
        rows = [row for row in mine if row is not None]
        self.commands += 1
        if not rows:
            self.untracked += 1
            return
        for stage, ns in stages(stamps, offset):
            if ns < 0:   # (a remote front end's stamps, corrected by an estimate)
                ns = 0
            i = bisect.bisect_left(BOUNDS, ns)
            for row in rows:
                h = row[stage]
                h.buckets[i] += 1
                h.count += 1
                h.sum += ns

    @staticmethod
    def _row(table: dict, key: Any) -> list[Histogram] | None:
        if key is None:
            return None
        row = table.get(key)
        if row is None:
            if len(table) >= MAX_KEYS:
                return None
            row = table[key] = [Histogram() for _ in STAGES]
        return row

    # ------------------------------------------------------------ reports
    def histograms(self) -> dict[str, list[tuple[list[str], str, tuple[float, ...], list[int], int]]]:
        """Copies of every stage histogram with samples: (labels, stage,
        bucket bounds in ns, counts per bucket with the one beyond, sum in ns)
        per LUN and per front end (stml.metrics exports them)."""
        def rows(table: dict[Any, list[Histogram]], labels: Any) -> list:
            return [(labels(key), STAGES[i], BOUNDS, list(h.buckets), h.sum)
                    for key, row in table.items() for i, h in enumerate(row) if h.count]
        return {"lun": rows(self.by_lun, lambda k: [k[0], str(k[1])]),
                "front_end": rows(self.by_front_end, lambda k: [k])}

    def report(self) -> dict[str, Any]:
        """Per LUN and per front end: each stage's count and p50/p90/p99 (us)."""
        def rows(row: list[Histogram]) -> dict[str, Any]:
            return {STAGES[i]: {"count": h.count, **h.percentiles()} for i, h in enumerate(row)}
        clocks = {fe.name: fe.report() for fe in self.front_ends.values()}
        return {"stages": list(STAGES), "commands": self.commands, "untracked": self.untracked,
                "in_flight": len(self.pending),
                "luns": [{"target": t, "lun": n, "stages": rows(row)}
                         for (t, n), row in sorted(self.by_lun.items())],
                "front_ends": [{"name": name, **clocks.get(name, {}), "stages": rows(row)}
                               for name, row in sorted(self.by_front_end.items())]}

