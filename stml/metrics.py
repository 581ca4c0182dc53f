"""Per LUN, per session (I_T nexus) and per front end counters, kept where
the STML's messages pass (rx_cmnd in, xmit_response out), so the command
engine does not change.

Commands are many and reports (status, a Prometheus scrape) are rare, so a
command updates one set of counters, that of its (front end, session, LUN)
triple, usually the only one its session has: one dict insert and pop, two
clock reads, a few integer additions and a slot of the latency ring. Reports
add the sets up per LUN, per session and per front end; commands in flight
are counted from the table of unfinished commands, and latency percentiles
come from the sets' samples merged by when the commands ended. Nothing is
formatted or logged per command."""
from __future__ import annotations

import collections
import heapq
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from itertools import chain, islice
from time import monotonic
from typing import Any, Final

from stml.task import FANOUT_STEP, FrontEnd

# (Final: the compiled build uses them in place, not through the module's dict)
RING: Final = 1024     # recent latencies kept per set (a power of two)
READ: Final = 2        # DataDir bits of rx_cmnd's "dir"
WRITE: Final = 1
QUANTILES = (0.5, 0.9, 0.99)


class Counters:
    """What the commands of one session to one LUN did. The labels say where
    a report adds them up: `fe` (a front-end ident) and `lun` ((target,
    LUN), LUN None for commands to LUNs that do not exist); a set whose
    session ended is added into its front end's set for the LUN (`into`),
    and that one, when the front end ends, into the LUN's set of gone front
    ends. The latency ring grows with the commands up to RING samples, so a
    set costs memory in proportion to what its session did."""

    __slots__ = ("fe", "lun", "commands", "read_bytes", "write_bytes", "errors",
                 "latency", "ended", "into")

    def __init__(self, fe: bytes | None, lun: tuple[str, Any]) -> None:
        self.fe, self.lun = fe, lun
        self.commands = self.read_bytes = self.write_bytes = self.errors = 0
        self.latency: list[float] = []   # command n's latency at n % RING,
        self.ended: list[float] = []     # and when it ended: sets merge by recency
        self.into: Counters | None = None   # retired: where its counts went

    def recent(self) -> Iterator[tuple[float, float]]:
        """(ended, latency) of the last RING commands, newest first (lazily:
        merging many sets reads only the samples it keeps)."""
        n, i = min(self.commands, RING), self.commands % RING
        order = chain(range(i - 1, -1, -1), range(n - 1, i - 1, -1))
        return ((self.ended[j], self.latency[j]) for j in order)

    def add(self, other: Counters) -> None:
        """Take another set's counts in; the latency ring keeps the most
        recent RING samples of both, oldest where the next one goes."""
        recent = newest([self, other])
        self.commands += other.commands
        self.read_bytes += other.read_bytes
        self.write_bytes += other.write_bytes
        self.errors += other.errors
        n = len(recent)
        size = RING if n == RING else self.commands   # fewer than RING samples: fewer commands
        self.latency, self.ended = [0.0] * size, [0.0] * size
        for i, (ended, latency) in enumerate(reversed(recent), self.commands - n):
            self.ended[i % RING], self.latency[i % RING] = ended, latency

    def final(self) -> Counters:
        """The set its counts live in now."""
        c = self
        while c.into is not None:
            c = c.into
        return c


def newest(sets: list[Counters]) -> list[tuple[float, float]]:
    """(ended, latency) of the last RING commands of these sets, newest first."""
    return list(islice(heapq.merge(*(c.recent() for c in sets), reverse=True), RING))


def percentiles(recent: list[float]) -> dict[str, float]:
    """Latency percentiles (microseconds) of these samples (sorted in place)."""
    n = len(recent)
    if not n:
        return {f"p{int(q * 100)}": 0.0 for q in QUANTILES}
    recent.sort()
    return {f"p{int(q * 100)}": round(recent[min(n - 1, int(q * n))] * 1e6, 1) for q in QUANTILES}


def summed(sets: list[Counters], in_flight: collections.Counter, row: dict[str, Any]) -> Iterator[None]:
    """Fill `row` with the counters of a LUN, session or front end, the sum of
    its sets, yielding once per set: a front end of thousands of sessions is
    added up over as many steps, not in one (0225). Latency samples are
    merged FANOUT_STEP sets at a time into the newest RING so far."""
    commands = read_bytes = write_bytes = errors = flying = 0
    recent: list[tuple[float, float]] = []   # (ended, latency), newest first
    for start in range(0, len(sets), FANOUT_STEP):
        chunk = sets[start:start + FANOUT_STEP]
        for c in chunk:
            commands += c.commands
            read_bytes += c.read_bytes
            write_bytes += c.write_bytes
            errors += c.errors
            flying += in_flight[c]
        if len(sets) > 1:
            recent = list(islice(heapq.merge(recent, *(c.recent() for c in chunk), reverse=True), RING))
        for _ in chunk:
            yield
    if len(sets) == 1:   # one set's ring is its last RING samples already
        latencies = sets[0].latency[:min(sets[0].commands, RING)]
    else:
        latencies = [latency for _, latency in recent]
    row.update({"commands": commands, "read_bytes": read_bytes, "write_bytes": write_bytes,
                "errors": errors, "in_flight": flying, "latency_us": percentiles(latencies)})


class Metrics:
    """The counter sets: one per live session and LU it sent commands to (one
    more for its commands to LUNs that do not exist), and per front end and LU
    the counts of its ended sessions. A command to an absent LUN costs no set
    of its own, and sets go when their session ends (`nexus_gone`, told by the
    emulator), so their number is bounded by sessions x real LUs."""

    def __init__(self, lookup_lu: Callable[[str, int], Any]) -> None:
        self.lookup_lu = lookup_lu   # (target, LUN) -> the LU, or None
        self._live: dict[Any, dict[int | None, Counters]] = {}   # Nexus -> LUN -> its set
        # front-end ident (None: front ends gone) -> (target, LUN) -> counts of ended sessions
        self._forgotten: dict[bytes | None, dict[tuple[str, Any], Counters]] = {}
        # ident -> tag -> (start, dir, len, set): each front end's apart, so its end
        # visits its own commands, not every one in flight (0239); typed, so the
        # compiled build reads the set's counters natively (bare tuple: objects)
        self._inflight: dict[bytes, dict[int, tuple[float, int, int, Counters]]] = {}
        self.started = time.time()

    def rx_cmnd(self, ident: bytes, h: dict[str, Any], fe: Any) -> None:
        """A command as a header dict: counted unless the emulator refuses it
        without a response (no front end, a tag or nexus that is not an int);
        a LUN that is not an int counts as absent."""
        nid, lun, tag = h.get("nexus"), h.get("lun"), h.get("tag")
        if fe is None or type(nid) is not int or type(tag) is not int:
            return
        self.command(ident, fe, tag, nid, lun if type(lun) is int else None, h.get("dir", 0), h.get("len", 0))

    def command(self, ident: bytes, fe: FrontEnd, tag: int, nid: int, lun: int | None, direction: int,
                length: int, now: float | None = None) -> None:
        """A command's fields, typed (rx_cmnd, or the STML's decoding of them):
        the usual command finds its set in two lookups. `now`: the clock read
        the emulator takes for it too (one read per command, not two)."""
        try:
            c = self._live[fe.nexuses[nid]][lun]
        except KeyError:
            nexus = fe.nexuses.get(nid)
            if nexus is None:
                return   # the emulator refuses it
            sets = self._live.get(nexus)
            if sets is None:
                sets = self._live[nexus] = {}
            c = self._new_set(ident, nexus, lun, sets)
        inflight = self._inflight.get(ident)
        if inflight is None:
            inflight = self._inflight[ident] = {}
        elif tag in inflight:   # a tag reused without a response (aborted): that one is over
            self.responded(ident, tag, None, 0)
        inflight[tag] = (monotonic() if now is None else now, direction, length, c)

    def _new_set(self, ident: bytes, nexus: Any, lun: Any, sets: dict[int | None, Counters]) -> Counters:
        """Sets are keyed by the Nexus object: a nexus id registered again
        (maybe for another target) gets a set of its own. Commands to a LUN
        with no LU share the session's one set for absent LUNs."""
        if lun is None or self.lookup_lu(nexus.target, lun) is None:
            lun = None
            c = sets.get(None)
            if c is not None:
                return c
        c = sets[lun] = Counters(ident, (nexus.target, lun))
        return c

    def xmit_response(self, ident: bytes, h: dict[str, Any]) -> None:
        """A command ends (status None: it ended without a response)."""
        self.responded(ident, h["tag"], h.get("status", 0), h.get("resid", 0))

    def responded(self, ident: bytes, tag: int, status: int | None, resid: int) -> None:
        """xmit_response's fields (status None: the command ended without a
        response): what the STML's sender passes without a header dict."""
        inflight = self._inflight.get(ident)
        entry = inflight.pop(tag, None) if inflight is not None else None
        if entry is None:
            return
        start, direction, length, c = entry
        if c.into is not None:
            c = c.final()
        now = monotonic()
        n = c.commands
        c.commands = n + 1
        if n < RING:   # the ring is still growing (it holds min(commands, RING) samples)
            c.latency.append(now - start)
            c.ended.append(now)
        else:
            c.latency[n % RING] = now - start
            c.ended[n % RING] = now
        if status != 0:
            c.errors += 1
        elif direction & READ:
            c.read_bytes += length - resid if resid > 0 else length
        elif direction & WRITE:
            c.write_bytes += length - resid if resid > 0 else length

    def aborted(self, ident: bytes, tags: list[int]) -> None:
        for tag in tags:
            self.xmit_response(ident, {"tag": tag, "status": None})

    # ------------------------------------------------------------ forgetting
    def _retire(self, c: Counters) -> None:
        """A set whose session (or front end) ended: its counts stay with its
        LUN and front end (or, with the front end gone, with the LUN alone),
        in one set per such pair; commands still in flight follow `into`."""
        into = self._forgotten.setdefault(c.fe, {}).setdefault(c.lun, c)
        if into is not c:
            into.add(c)
            c.into = into

    def nexus_gone(self, nexus: Any, tags: list[int]) -> None:
        """A session ended, taking these tasks along: its sets go."""
        self.aborted(nexus.fe.ident, tags)
        for c in self._live.pop(nexus, {}).values():
            self._retire(c)

    def front_end_gone(self, ident: bytes) -> None:
        """A front end ended (its sessions already did): its commands in flight
        are over, and its sets are added into those of gone front ends: the
        work of its own commands, whatever other front ends have in flight."""
        for tag in list(self._inflight.get(ident, ())):
            self.responded(ident, tag, None, 0)
        self._inflight.pop(ident, None)
        for c in self._forgotten.pop(ident, {}).values():
            c.fe = None
            self._retire(c)

    # ------------------------------------------------------------ reports
    def snapshot(self, emulator: Any) -> dict[str, Any]:
        """Status of everything the STML serves, with counters (JSON-ready), in one go."""
        snap: dict[str, Any] = {}
        for _ in self.build(emulator, snap):
            pass
        return snap

    def build(self, emulator: Any, snap: dict[str, Any]) -> Iterator[None]:
        """Fill `snap` with the snapshot, yielding after each counter set
        grouped or summed, command in flight, LU, session and front end: a
        management command walks it FANOUT_STEP yields per turn of the event
        loop (stml.mgmt, 0267), not every LU and session in one step, and a
        row that sums many sets (a front end's) takes as many steps (0225).
        Sessions come and go between steps: each walk is over a copy, and
        each row is as of its own step."""
        in_flight: collections.Counter = collections.Counter()
        for commands in list(self._inflight.values()):
            for entry in list(commands.values()):
                in_flight[entry[3].final()] += 1
                yield
        by_lun: dict[tuple[str, Any], list[Counters]] = defaultdict(list)
        all_sets: list[dict[Any, Counters]] = [*self._live.values(), *self._forgotten.values()]
        counted = 0   # how many sets exist (status reports it: it must stay bounded)
        for sets in all_sets:
            for c in list(sets.values()):
                by_lun[c.lun].append(c)
                counted += 1
                yield
        luns = []
        for t in list(emulator.targets.values()):
            for lu in list(t.luns.values()):
                st = lu.pr
                row = {"target": t.name, "lun": lu.lun, "blocks": lu.blocks,
                       "block_size": lu.block_size, "backend": lu.options.kind,
                       "path": lu.options.path,
                       "registrations": len(st.regs) if st is not None else 0,
                       "pr_saves": st.saves if st is not None else 0,
                       "unit_attentions": len(lu.unit_attentions),
                       "sync_error": lu.backend.sync_error,   # syncs fail until lun reset-error
                       "offline": lu.offline}   # why its store could not open (0280)
                yield from summed(by_lun.get((t.name, lu.lun), []), in_flight, row)
                luns.append(row)
                yield
        sessions, fes = [], []
        for fe in list(emulator.front_ends.values()):
            fe_sets: list[Counters] = []
            for c in list(self._forgotten.get(fe.ident, {}).values()):
                fe_sets.append(c)
                yield
            for n in list(fe.nexuses.values()):
                mine = list(self._live.get(n, {}).values())
                fe_sets += mine
                row = {"front_end": fe.name, "nexus": n.id, "initiator": n.initiator,
                       "target": n.target, "tpg": n.tpg}
                yield from summed(mine, in_flight, row)
                sessions.append(row)
                yield
            row = {"name": fe.name, "kind": fe.kind, "nexuses": len(fe.nexuses),
                   "last_seen_s": round(time.monotonic() - fe.last_seen, 2)}
            yield from summed(fe_sets, in_flight, row)
            # what the front end buffers, as its last heartbeat said (contract 1.3)
            row.update({"buffered_bytes": fe.usage.get("used"), "buffer_limit_bytes": fe.usage.get("limit"),
                        "buffers": fe.usage})
            fes.append(row)
            yield
        snap.update({"stml": emulator.name, "uptime_s": round(time.time() - self.started, 1),
                     "counter_sets": counted, "luns": luns, "sessions": sessions, "front_ends": fes})


class PrometheusExporter:
    """Serves the snapshot in Prometheus text format (prometheus-client). The
    HTTP server runs in its own thread; each scrape asks the event loop for a
    snapshot, so the counters are read where they are written."""

    def __init__(self, metrics: Metrics, emulator: Any, loop: Any) -> None:
        self.metrics, self.emulator, self.loop = metrics, emulator, loop

    def start(self, address: str) -> None:
        from prometheus_client import start_http_server
        from prometheus_client.core import CollectorRegistry
        host, _, port = address.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self.server, self.thread = start_http_server(int(port), host.strip("[]") or "0.0.0.0",
                                                     registry=registry)

    def stop(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()

    def _snapshot(self) -> dict[str, Any]:
        import asyncio
        if threading.current_thread() is threading.main_thread():
            return self._read()
        fut = asyncio.run_coroutine_threadsafe(self._async_snapshot(), self.loop)
        return fut.result(5)

    async def _async_snapshot(self) -> dict[str, Any]:
        """A scrape's snapshot, built in steps as management builds it (0267):
        a scrape holds up no session for every LU and session at once."""
        import asyncio
        snap: dict[str, Any] = {}
        # FANOUT_STEP rows a turn, as stml.mgmt._stepped walks (an async
        # generator: this module is compiled, and mypyc builds none)
        for i, _ in enumerate(self.metrics.build(self.emulator, snap)):
            if not i % FANOUT_STEP:
                await asyncio.sleep(0)
        return self._stages(snap)

    def _read(self) -> dict[str, Any]:
        """The snapshot in one go: only where there is no loop to yield to
        (a scrape on the main thread, as tests make)."""
        return self._stages(self.metrics.snapshot(self.emulator))

    def _stages(self, snap: dict[str, Any]) -> dict[str, Any]:
        """The stage histograms when commands are timed (copied here, on the
        event loop that writes them: a fixed number of stages)."""
        timing = self.emulator.timing
        if timing is not None:
            snap["stage_histograms"] = timing.histograms()
        return snap

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        snap = self._snapshot()
        scopes = (("lun", ["target", "lun"], snap["luns"], lambda r: [r["target"], str(r["lun"])]),
                  ("session", ["front_end", "initiator", "target"], snap["sessions"],
                   lambda r: [r["front_end"], r["initiator"], r["target"]]),
                  ("front_end", ["front_end", "kind"], snap["front_ends"], lambda r: [r["name"], r["kind"]]))
        for scope, labels, rows, values in scopes:
            fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
                "commands": CounterMetricFamily(f"scsi_target_{scope}_commands", f"SCSI commands completed per {scope}", labels=labels),
                "read_bytes": CounterMetricFamily(f"scsi_target_{scope}_read_bytes", f"bytes read per {scope}", labels=labels),
                "write_bytes": CounterMetricFamily(f"scsi_target_{scope}_write_bytes", f"bytes written per {scope}", labels=labels),
                "errors": CounterMetricFamily(f"scsi_target_{scope}_errors", f"commands ended with a status other than GOOD per {scope}", labels=labels),
                "in_flight": GaugeMetricFamily(f"scsi_target_{scope}_in_flight", f"commands in flight per {scope}", labels=labels),
            }
            lat = GaugeMetricFamily(f"scsi_target_{scope}_latency_seconds",
                                    f"command latency percentiles (last {RING} commands) per {scope}",
                                    labels=labels + ["quantile"])
            for r in rows:
                v = values(r)
                for key, fam in fams.items():
                    fam.add_metric(v, r[key])
                for q in QUANTILES:
                    lat.add_metric(v + [str(q)], r["latency_us"][f"p{int(q * 100)}"] / 1e6)
            yield from fams.values()
            yield lat
        yield from stage_families(snap.get("stage_histograms"))
        yield GaugeMetricFamily("scsi_target_uptime_seconds", "seconds since the STML started",
                                value=snap["uptime_s"])


def stage_families(hists: dict[str, Any] | None) -> Iterator[Any]:
    """Stage timing (stml.timing) as Prometheus histograms, in seconds:
    scsi_target_lun_stage_seconds{target,lun,stage} and
    scsi_target_front_end_stage_seconds{front_end,stage}."""
    if hists is None:
        return
    from prometheus_client.core import HistogramMetricFamily
    for scope, labels in (("lun", ["target", "lun", "stage"]), ("front_end", ["front_end", "stage"])):
        fam = HistogramMetricFamily(f"scsi_target_{scope}_stage_seconds",
                                    f"time of each command stage per {scope} (scsi-target run --timing)",
                                    labels=labels)
        for key, stage, bounds, buckets, total in hists[scope]:
            cumulative, running = [], 0
            for le, n in zip([*(f"{b / 1e9:.9g}" for b in bounds), "+Inf"], buckets):
                running += n
                cumulative.append((le, running))
            fam.add_metric([*key, stage], cumulative, total / 1e9)
        yield fam
