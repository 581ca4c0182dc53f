"""Per LUN, per session (I_T nexus) and per front end counters, kept where
the STML's messages pass (rx_cmnd in, xmit_response out), so the command
engine does not change. Per command: one dict insert and pop, a few integer
additions and one slot of a ring of recent latencies; nothing is formatted
or logged. Percentiles are computed only when someone asks (status, a
Prometheus scrape)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("stml.metrics")

RING = 1024          # recent latencies kept per counter set
READ, WRITE = 2, 1   # DataDir bits of rx_cmnd's "dir"
QUANTILES = (0.5, 0.9, 0.99)


class Counters:
    __slots__ = ("commands", "read_bytes", "write_bytes", "errors", "inflight", "ring", "pos")

    def __init__(self) -> None:
        self.commands = self.read_bytes = self.write_bytes = self.errors = self.inflight = 0
        self.ring = [0.0] * RING
        self.pos = 0

    def percentiles(self) -> dict[str, float]:
        """Latency percentiles (microseconds) of the last RING commands."""
        n = min(self.pos, RING)
        if not n:
            return {f"p{int(q * 100)}": 0.0 for q in QUANTILES}
        recent = sorted(self.ring[:n])
        return {f"p{int(q * 100)}": round(recent[min(n - 1, int(q * n))] * 1e6, 1) for q in QUANTILES}

    def as_dict(self) -> dict[str, Any]:
        return {"commands": self.commands, "read_bytes": self.read_bytes,
                "write_bytes": self.write_bytes, "errors": self.errors, "in_flight": self.inflight,
                "latency_us": self.percentiles()}


class Metrics:
    def __init__(self) -> None:
        self.luns: dict[tuple[str, int], Counters] = {}
        self.sessions: dict[tuple[bytes, int], Counters] = {}
        self.front_ends: dict[bytes, Counters] = {}
        self._inflight: dict[tuple[bytes, int], tuple] = {}
        self.started = time.time()

    def rx_cmnd(self, ident: bytes, h: dict[str, Any], fe: Any) -> None:
        nexus = fe.nexuses.get(h.get("nexus")) if fe is not None else None
        if nexus is None:
            return
        lun_key = (nexus.target, h.get("lun"))
        sets = (self.luns.get(lun_key) or self.luns.setdefault(lun_key, Counters()),
                self.sessions.get((ident, nexus.id)) or self.sessions.setdefault((ident, nexus.id), Counters()),
                self.front_ends.get(ident) or self.front_ends.setdefault(ident, Counters()))
        for c in sets:
            c.inflight += 1
        old = self._inflight.get((ident, h["tag"]))
        if old is not None:   # a tag reused without a response (aborted): that one is over
            self._end(old, None, 0)
        self._inflight[(ident, h["tag"])] = (time.monotonic(), h.get("dir", 0), h.get("len", 0), sets)

    def xmit_response(self, ident: bytes, h: dict[str, Any]) -> None:
        entry = self._inflight.pop((ident, h.get("tag")), None)
        if entry is not None:
            self._end(entry, h.get("status", 0), h.get("resid", 0))

    def aborted(self, ident: bytes, tags: list[int]) -> None:
        for tag in tags:
            entry = self._inflight.pop((ident, tag), None)
            if entry is not None:
                self._end(entry, None, 0)

    def front_end_gone(self, ident: bytes) -> None:
        for key in [k for k in self._inflight if k[0] == ident]:
            self._end(self._inflight.pop(key), None, 0)

    @staticmethod
    def _end(entry: tuple, status: int | None, resid: int) -> None:
        t0, direction, length, sets = entry
        latency = time.monotonic() - t0
        moved = length - resid if resid > 0 else length
        for c in sets:
            c.inflight -= 1
            c.commands += 1
            if status != 0:
                c.errors += 1
            elif direction & READ:
                c.read_bytes += moved
            elif direction & WRITE:
                c.write_bytes += moved
            c.ring[c.pos & (RING - 1)] = latency
            c.pos += 1

    # ------------------------------------------------------------ reports
    def snapshot(self, emulator: Any) -> dict[str, Any]:
        """Status of everything the STML serves, with counters (JSON-ready)."""
        empty = Counters().as_dict
        luns = []
        for t in list(emulator.targets.values()):
            for lu in list(t.luns.values()):
                c = self.luns.get((t.name, lu.lun))
                luns.append({"target": t.name, "lun": lu.lun, "blocks": lu.blocks,
                             "block_size": lu.block_size, "backend": lu.options.kind,
                             "path": lu.options.path, **(c.as_dict() if c else empty())})
        sessions, fes = [], []
        for fe in list(emulator.front_ends.values()):
            c = self.front_ends.get(fe.ident)
            fes.append({"name": fe.name, "kind": fe.kind, "nexuses": len(fe.nexuses),
                        "last_seen_s": round(time.monotonic() - fe.last_seen, 2),
                        **(c.as_dict() if c else empty())})
            for n in list(fe.nexuses.values()):
                c = self.sessions.get((fe.ident, n.id))
                sessions.append({"front_end": fe.name, "nexus": n.id, "initiator": n.initiator,
                                 "target": n.target, "tpg": n.tpg, **(c.as_dict() if c else empty())})
        live = {(fe.ident, n) for fe in emulator.front_ends.values() for n in fe.nexuses}
        for key in [k for k in self.sessions if k not in live]:   # forget gone sessions
            del self.sessions[key]
        return {"stml": emulator.name, "uptime_s": round(time.time() - self.started, 1),
                "luns": luns, "sessions": sessions, "front_ends": fes}


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
            return self.metrics.snapshot(self.emulator)
        fut = asyncio.run_coroutine_threadsafe(self._async_snapshot(), self.loop)
        return fut.result(5)

    async def _async_snapshot(self) -> dict[str, Any]:
        return self.metrics.snapshot(self.emulator)

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        snap = self._snapshot()
        scopes = (("lun", ["target", "lun"], snap["luns"], lambda r: [r["target"], str(r["lun"])]),
                  ("session", ["front_end", "initiator", "target"], snap["sessions"],
                   lambda r: [r["front_end"], r["initiator"], r["target"]]),
                  ("front_end", ["front_end", "kind"], snap["front_ends"], lambda r: [r["name"], r["kind"]]))
        for scope, labels, rows, values in scopes:
            fams = {
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
        yield GaugeMetricFamily("scsi_target_uptime_seconds", "seconds since the STML started",
                                value=snap["uptime_s"])
