"""A trace as commands: one row per SCSI command (its rx_cmnd joined with its
xmit_response, or the TMF that aborted it), for CSV export and statistics.
Latency is the STML's: from rx_cmnd received to xmit_response sent, on the
STML's clock."""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from typing import IO, Any, Iterator

from stml.api import Op
from stml.api.tap import FROM_STML, TO_STML
from stml.cdb import trim_cdb
from stml.timing import DELIVERED, POINTS, STAGES, STML_RECEIVED, stages
from stml.trace.format import Message, Note, TraceReader, data_digest

_RX_CMND, _RX_DATA, _RDY, _XMIT, _TMF_DONE = (Op.RX_CMND.value, Op.RX_DATA.value, Op.RDY_TO_XFER.value,
                                              Op.XMIT_RESPONSE.value, Op.TMF_DONE.value)
_DONE = Op.DONE.value

# where the LBA and the transfer length (in blocks) sit in the CDBs that carry them:
# opcode -> (LBA offset, LBA bytes, length offset, length bytes); READ(6)/WRITE(6) apart
_LBA_FIELDS: dict[int, tuple[int, int, int, int]] = {
    **{op: (2, 4, 7, 2) for op in (0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x41)},   # 10-byte
    **{op: (2, 4, 6, 4) for op in (0xA8, 0xAA, 0xAE, 0xAF)},                     # 12-byte
    **{op: (2, 8, 10, 4) for op in (0x88, 0x8A, 0x8B, 0x8E, 0x8F, 0x90, 0x91, 0x93)},   # 16-byte
    0x89: (2, 8, 13, 1),                                                          # COMPARE AND WRITE
}

STATUS_NAMES = {0x00: "GOOD", 0x02: "CHECK CONDITION", 0x04: "CONDITION MET", 0x08: "BUSY",
                0x18: "RESERVATION CONFLICT", 0x28: "TASK SET FULL", 0x30: "ACA ACTIVE",
                0x40: "TASK ABORTED"}


def _names() -> dict[tuple[int, int | None], str]:
    """Command names by (opcode, service action), from the STML's own table."""
    from stml.disk import DiskTemplate
    names: dict[tuple[int, int | None], str] = {}
    for opcode, entry in DiskTemplate().by_opcode.items():
        if isinstance(entry, dict):
            for sa, e in entry.items():
                names[(opcode, sa)] = e.name
        else:
            names[(opcode, None)] = entry.name
    return names


_NAMES: dict[tuple[int, int | None], str] | None = None


def command_name(cdb: bytes) -> str:
    global _NAMES
    if _NAMES is None:
        _NAMES = _names()
    if not cdb:
        return "(empty CDB)"
    name = _NAMES.get((cdb[0], None)) or (_NAMES.get((cdb[0], cdb[1] & 0x1F)) if len(cdb) > 1 else None)
    return name or f"opcode 0x{cdb[0]:02x}"


def lba_blocks(cdb: bytes) -> tuple[int | None, int | None]:
    """(LBA, blocks) of a command that addresses the medium, else (None, None)."""
    if not cdb:
        return None, None
    if cdb[0] in (0x08, 0x0A) and len(cdb) >= 6:   # READ(6), WRITE(6)
        return ((cdb[1] & 0x1F) << 16) | int.from_bytes(cdb[2:4], "big"), cdb[4] or 256
    where = _LBA_FIELDS.get(cdb[0])
    if where is None:
        return None, None
    lo, ln, no, nn = where
    if len(cdb) < max(lo + ln, no + nn):
        return None, None
    return int.from_bytes(cdb[lo:lo + ln], "big"), int.from_bytes(cdb[no:no + nn], "big")


def sense_fields(sense: bytes | None) -> tuple[int, int, int] | None:
    """(key, ASC, ASCQ) of fixed or descriptor sense data."""
    if not sense or len(sense) < 4:
        return None
    if sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0x0F, sense[2], sense[3]
    if len(sense) < 14:
        return sense[2] & 0x0F if len(sense) > 2 else 0, 0, 0
    return sense[2] & 0x0F, sense[12], sense[13]


@dataclass
class Command:
    index: int                 # the record of its rx_cmnd
    t: int                     # ns since the trace began
    peer: bytes
    front_end: str
    nexus: int
    tag: int
    lun: int
    cdb: bytes
    attr: int
    direction: int
    length: int                # the initiator's expected transfer length
    r2t: int = 0               # rdy_to_xfer messages
    t_done: int | None = None  # xmit_response (or the aborting TMF's answer), ns since the trace began
    status: int | None = None
    sense: bytes | None = None
    resid: int | None = None
    data: int = 0              # bytes of read data
    outcome: str = "open"      # done, aborted, or open (no answer in the trace)

    @property
    def latency_ns(self) -> int | None:
        return None if self.t_done is None else self.t_done - self.t


def commands(path: str) -> Iterator[Command]:
    """The trace's commands in the order they ended, then those it ends before."""
    with TraceReader(path) as reader:
        t0 = int(reader.first.get("t0", 0))
        names = {fe["peer"]: fe["name"] for fe in (reader.first.get("state") or {}).get("front_ends") or ()}
        open_: dict[tuple[bytes, int], Command] = {}
        for m in reader:
            if isinstance(m, Note):
                continue
            yield from _step(m, t0, names, open_)
        yield from open_.values()


def _step(m: Message, t0: int, names: dict[bytes, str], open_: dict[tuple[bytes, int], Command]) -> Iterator[Command]:
    h = m.header
    op = m.op
    if m.direction == TO_STML:
        if op == Op.REGISTER.value:
            names[m.peer] = str(h.get("name", ""))
        elif op == _RX_CMND and type(h.get("tag")) is int and isinstance(h.get("cdb"), bytes):
            cdb = trim_cdb(h["cdb"]) if h["cdb"] else h["cdb"]
            key = (m.peer, h["tag"])
            stale = open_.pop(key, None)   # a tag reused: the first one's answer is not in the trace
            if stale is not None:
                yield stale
            open_[key] = Command(m.index, m.t - t0, m.peer, names.get(m.peer, ""), int(h.get("nexus", 0)),
                                 h["tag"], int(h.get("lun", 0)), cdb, int(h.get("attr", 0) or 0),
                                 int(h.get("dir", 0) or 0), int(h.get("len", 0) or 0))
        return
    if m.direction != FROM_STML:
        return
    if op == _RDY:
        c = open_.get((m.peer, h.get("tag")))   # type: ignore[arg-type]
        if c is not None:
            c.r2t += 1
    elif op == _XMIT:
        c = open_.pop((m.peer, h.get("tag")), None)   # type: ignore[arg-type]
        if c is not None:
            c.t_done, c.status, c.sense, c.resid = m.t - t0, h.get("status"), h.get("sense"), h.get("resid", 0)
            c.data = data_digest(m.data)[0]
            c.outcome = "done"
            yield c
    elif op == _TMF_DONE:
        for tag in h.get("aborted") or ():
            c = open_.pop((m.peer, tag), None)
            if c is not None:
                c.t_done, c.outcome = m.t - t0, "aborted"
                yield c


CSV_COLUMNS = ["record", "t_us", "front_end", "nexus", "tag", "lun", "opcode", "command", "lba", "blocks",
               "transfer_length", "direction", "attr", "r2t", "outcome", "status", "status_name",
               "sense_key", "asc", "ascq", "resid", "data_bytes", "done_us", "latency_us"]
_DIRS = {0: "none", 1: "write", 2: "read", 3: "bidi"}


def row(c: Command) -> dict[str, Any]:
    lba, blocks = lba_blocks(c.cdb)
    sense = sense_fields(c.sense)
    latency = c.latency_ns
    return {"record": c.index, "t_us": f"{c.t / 1000:.3f}", "front_end": c.front_end, "nexus": c.nexus,
            "tag": c.tag, "lun": c.lun, "opcode": f"0x{c.cdb[0]:02x}" if c.cdb else "",
            "command": command_name(c.cdb), "lba": "" if lba is None else lba,
            "blocks": "" if blocks is None else blocks, "transfer_length": c.length,
            "direction": _DIRS.get(c.direction, str(c.direction)), "attr": c.attr, "r2t": c.r2t,
            "outcome": c.outcome, "status": "" if c.status is None else f"0x{c.status:02x}",
            "status_name": "" if c.status is None else STATUS_NAMES.get(c.status, ""),
            "sense_key": "" if sense is None else f"0x{sense[0]:x}",
            "asc": "" if sense is None else f"0x{sense[1]:02x}", "ascq": "" if sense is None else f"0x{sense[2]:02x}",
            "resid": "" if c.resid is None else c.resid, "data_bytes": c.data,
            "done_us": "" if c.t_done is None else f"{c.t_done / 1000:.3f}",
            "latency_us": "" if latency is None else f"{latency / 1000:.3f}"}


def export_csv(path: str, out: IO[str]) -> int:
    """One row per command (CSV_COLUMNS); returns how many."""
    writer = csv.DictWriter(out, CSV_COLUMNS)
    writer.writeheader()
    n = 0
    for c in commands(path):
        writer.writerow(row(c))
        n += 1
    return n


PERCENTILES = (50, 90, 99)


def percentile(values: list[int], p: float) -> int:
    """The nearest-rank percentile of sorted values."""
    k = max(0, min(len(values) - 1, int(-(-p * len(values) // 100)) - 1))
    return values[k]


def stats(path: str) -> dict[str, Any]:
    """Per command name: how many, their outcomes and statuses, bytes, and
    latency percentiles (us); the trace's span and totals."""
    per: dict[str, dict[str, Any]] = {}
    first = last = None
    total = 0
    for c in commands(path):
        total += 1
        s = per.setdefault(command_name(c.cdb), {"count": 0, "latencies": [], "statuses": {}, "outcomes": {},
                                                 "bytes": 0})
        s["count"] += 1
        s["outcomes"][c.outcome] = s["outcomes"].get(c.outcome, 0) + 1
        if c.status is not None:
            name = STATUS_NAMES.get(c.status, f"0x{c.status:02x}")
            s["statuses"][name] = s["statuses"].get(name, 0) + 1
        if c.latency_ns is not None and c.outcome == "done":
            s["latencies"].append(c.latency_ns)
        s["bytes"] += c.data + (c.length if c.direction & 1 and c.outcome == "done" else 0)
        first = c.t if first is None else min(first, c.t)
        end = c.t_done if c.t_done is not None else c.t
        last = end if last is None else max(last, end)
    out: dict[str, Any] = {"commands": total, "span_s": ((last or 0) - (first or 0)) / 1e9, "by_command": {}}
    for name, s in sorted(per.items(), key=lambda kv: -kv[1]["count"]):
        lat = sorted(s.pop("latencies"))
        s["latency_us"] = {f"p{p}": percentile(lat, p) / 1000 for p in PERCENTILES} if lat else {}
        if lat:
            s["latency_us"]["max"] = lat[-1] / 1000
            s["latency_us"]["mean"] = statistics.fmean(lat) / 1000
        out["by_command"][name] = s
    breakdown = stage_stats(path)
    if breakdown:
        out["stages"] = breakdown
    return out


def stamped(path: str) -> Iterator[tuple[int, list[int]]]:
    """(t since the trace began, the nine stamps of stml.timing) of each timed
    command: a trace of `run --timing` holds them in its headers (rx_cmnd,
    xmit_response and scsi_target_done `ts`). Its commands are counted when
    their scsi_target_done comes; those whose front end does not stamp, when
    their xmit_response does."""
    with TraceReader(path) as reader:
        t0 = int(reader.first.get("t0", 0))
        open_: dict[tuple[bytes, int], list[int]] = {}
        for m in reader:
            if not isinstance(m, Message):
                continue
            h, op = m.header, m.op
            ts = h.get("ts")
            if type(ts) is not list or not all(type(t) is int for t in ts):
                continue
            if op == _RX_CMND and m.direction == TO_STML and type(h.get("tag")) is int and len(ts) == 2:
                open_[(m.peer, h["tag"])] = [*ts, *([0] * (len(POINTS) - 2))]
            elif op == _XMIT and m.direction == FROM_STML and len(ts) == DELIVERED - STML_RECEIVED:
                st = open_.get((m.peer, h.get("tag")))   # type: ignore[arg-type]
                if st is not None:
                    st[STML_RECEIVED:DELIVERED] = ts
            elif op == _DONE and m.direction == TO_STML and type(h.get("tags")) is list \
                    and len(ts) == len(h["tags"]):
                for tag, t in zip(h["tags"], ts):
                    st = open_.pop((m.peer, tag), None)
                    if st is not None and st[DELIVERED - 1]:
                        st[DELIVERED] = t
                        yield (st[STML_RECEIVED] - t0, st)


def stage_stats(path: str) -> dict[str, Any]:
    """Per stage (stml.timing.STAGES): how many commands reached it and its
    p50/p90/p99 (us, nearest rank); {} for a trace without stamps. The
    stamps of a front end on another host are used as they are (the trace
    does not keep its clock offset): read its cross-host stages with that in mind."""
    per: dict[int, list[int]] = {}
    for _, st in stamped(path):
        for stage, ns in stages(st, 0):
            per.setdefault(stage, []).append(ns)
    out: dict[str, Any] = {}
    for i, name in enumerate(STAGES):
        values = sorted(per.get(i, []))
        if values:
            out[name] = {"count": len(values), **{f"p{p}": percentile(values, p) / 1000 for p in PERCENTILES}}
    return out


def plot(path: str, png: str) -> None:
    """Latency distributions per command (CDF) and the timeline of latencies."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: dict[str, tuple[list[float], list[float]]] = {}
    for c in commands(path):
        if c.latency_ns is None or c.outcome != "done":
            continue
        ts, lats = series.setdefault(command_name(c.cdb), ([], []))
        ts.append(c.t / 1e9)
        lats.append(c.latency_ns / 1000)
    per_stage: dict[str, tuple[list[float], list[float]]] = {}
    for t, st in stamped(path):
        for stage, ns in stages(st, 0):
            ts_, values = per_stage.setdefault(STAGES[stage], ([], []))
            ts_.append(t / 1e9)
            values.append(max(ns, 1) / 1000)
    rows = 2 if per_stage else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.5 * rows), squeeze=False)
    cdf, timeline = axes[0]
    for name, (ts, lats) in sorted(series.items(), key=lambda kv: -len(kv[1][0]))[:10]:
        ordered = sorted(lats)
        cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=f"{name} ({len(lats)})")
        timeline.scatter(ts, lats, s=4, label=name)
    timeline.set_yscale("log")
    cdf.set_xscale("log")
    cdf.set_xlabel("latency in the STML (us, rx_cmnd to xmit_response)")
    cdf.set_ylabel("fraction of commands")
    cdf.set_title("Latency distribution per command")
    cdf.legend(fontsize=7)
    timeline.set_xlabel("time since the trace began (s)")
    timeline.set_ylabel("latency (us)")
    timeline.set_title("Timeline")
    if per_stage:   # a trace of `run --timing`: where the time went, stage by stage
        stage_cdf, stage_timeline = axes[1]
        for name in STAGES:
            if name not in per_stage:
                continue
            ts_, values = per_stage[name]
            ordered = sorted(values)
            stage_cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
            stage_timeline.scatter(ts_, values, s=4, label=name)
        stage_cdf.set_xscale("log")
        stage_cdf.set_xlabel("stage time (us; run --timing stamps)")
        stage_cdf.set_ylabel("fraction of commands")
        stage_cdf.set_title("Distribution per stage")
        stage_cdf.legend(fontsize=7)
        stage_timeline.set_yscale("log")
        stage_timeline.set_xlabel("time since the trace began (s)")
        stage_timeline.set_ylabel("stage time (us)")
        stage_timeline.set_title("Stage timeline")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
