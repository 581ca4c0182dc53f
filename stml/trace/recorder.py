"""Recording a trace: a tap on the STML (stml.api.tap) that writes every
contract message to a file, in the format of stml.trace.format.

The event loop only packs each record (a few hundred nanoseconds, and a
crc32c of the data it does not keep) and gathers them into chunks; a thread
of its own writes the chunks, so no message waits for the disk. The queue
between them is bounded: when the disk falls behind, chunks are dropped and
a "gap" note says how many records were lost. The file is capped: the record
that would pass the cap ends it with an "end" note ("cap"), and the tap goes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gzip
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Protocol

import msgpack

from crc32c import crc32c

from stml.api import CONTRACT_VERSION, Op, pack
from stml.api.tap import FROM_STML, TO_STML, Peer
from stml.trace.format import FORMAT, MAGIC, digest

log = logging.getLogger("stml.trace")

DEFAULT_MAX_BYTES = 256 << 20
CHUNK = 256 << 10          # bytes gathered on the loop before they go to the writer
QUEUE_CHUNKS = 32          # chunks waiting for the writer at most (8 MiB)
FLUSH_S = 0.2              # a partial chunk goes to the writer this often
END_RESERVE = 4096         # room kept under the cap for the end note
REDACTED = "(redacted)"

_DETECT, _MGMT, _MGMT_REPLY = Op.DETECT.value, Op.MGMT.value, Op.MGMT_REPLY.value
_REDACT = frozenset({_DETECT, _MGMT, _MGMT_REPLY})  # what may carry a secret
_MANAGEMENT = frozenset({_MGMT, _MGMT_REPLY})      # recorded, not counted by `count`


def _redact_creds(creds: Any) -> Any:
    return {**creds, "secret": REDACTED} if isinstance(creds, dict) and "secret" in creds else creds


def redact(header: dict[str, Any]) -> dict[str, Any]:
    """A header without the CHAP secrets detect and management carry: a trace
    is shared (tests/data), a secret must not travel with it."""
    op = header.get("op")
    if op == _DETECT:
        h = dict(header)
        if isinstance(h.get("targets"), list):
            h["targets"] = [{**t, "access": {k: _redact_creds(v) for k, v in t["access"].items()}}
                            if isinstance(t, dict) and isinstance(t.get("access"), dict) else t
                            for t in h["targets"]]
        if isinstance(h.get("discovery"), dict):
            h["discovery"] = {k: _redact_creds(v) for k, v in h["discovery"].items()}
        return h
    if op == _MGMT and isinstance(header.get("args"), dict):
        args = header["args"]
        if any("secret" in k for k in args):
            return {**header, "args": {k: REDACTED if "secret" in k else v for k, v in args.items()}}
    if op == _MGMT_REPLY and header.get("result") is not None:
        # a reply may quote the configuration (config show, diff), secrets and all;
        # replay needs none of it
        return {**header, "result": REDACTED}
    return header


def configuration(em: Any) -> dict[str, Any]:
    """What replay needs to build the same STML: targets, LUNs (sizes, options,
    identities), limits (an Emulator). No secrets: whether CHAP is on, not how."""
    targets = []
    for t in em.targets.values():
        luns = []
        for lu in t.luns.values():
            o = dataclasses.asdict(lu.options)
            for key in ("ceph_conf", "ceph_user", "ceph_keyring"):
                o.pop(key, None)
            luns.append({**o, "lun": lu.lun, "size": lu.backend.size(), "naa": lu.naa.hex(),
                         "serial": lu.serial})
        access = t.access
        targets.append({"name": t.name, "alias": t.alias, "target_reset": t.target_reset,
                        "acl": list(access.get("acl") or []), "chap": bool(access.get("chap")),
                        "mutual_chap": bool(access.get("mutual")), "erl": access.get("erl", 0),
                        "cmdsn_depth": access.get("cmdsn_depth"), "luns": luns})
    return {"stml": em.name, "heartbeat_ms": int(em.heartbeat * 1000),
            "limits": {"max_transfer": em.max_transfer, "queue_depth": em.queue_depth},
            "portals": em.portals, "portal_groups": sorted(em.configured_tpgs),
            "local_portal_groups": None if em.local_tpgs is None else sorted(em.local_tpgs),
            "seen_portal_groups": {k: sorted(v) for k, v in em._seen_tpgs.items()},
            "targets": targets}


def state(em: Any) -> dict[str, Any]:
    """What the STML holds that commands see and replay must start from: the
    front ends and their nexuses (traced from their next message on), the
    tasks in flight (their answers are not checked), and per LU the mode
    page state, pending unit attentions and reservations. The cost is that of
    `status`: the sessions and LUs there are, once, when a trace starts."""
    fes = [{"peer": fe.ident, "name": fe.name, "kind": fe.kind, "aen": fe.aen,
            "heartbeat_ms": int(fe.heartbeat * 1000), "caps": sorted(fe.caps),
            "nexuses": [{"nexus": n.id, "initiator": n.initiator, "target": n.target, "tpg": n.tpg}
                        for n in fe.nexuses.values()],
            "tasks": list(fe.tasks)}
           for fe in em.front_ends.values()]
    luns = []
    for t in em.targets.values():
        for lu in t.luns.values():
            luns.append({"target": t.name, "lun": lu.lun,
                         "mode": {"wce": lu.mode.wce, "d_sense": lu.mode.d_sense, "swp": lu.mode.swp},
                         "started": lu.started, "medium_present": lu.medium_present,
                         "prevent": sorted(lu.prevent),
                         "unit_attentions": {k: [list(ua) for ua in v] for k, v in lu.unit_attentions.items()},
                         "pr": lu.pr.to_json() if lu.pr is not None else None})
    return {"front_ends": fes, "luns": luns}


def first_record(em: Any, *, from_start: bool, with_data: bool, max_bytes: int) -> dict[str, Any]:
    return {"trace": MAGIC, "format": list(FORMAT), "contract": list(CONTRACT_VERSION),
            "t0": time.monotonic_ns(), "wall": time.time(), "from_start": from_start,
            "with_data": with_data, "max_bytes": max_bytes,
            "config": configuration(em), "state": state(em)}


class Traces:
    """The STML's traces: at most one recorded at a time (started by `--trace`
    or management), through a tap on the server (stml.api.tap). What
    management needs of tracing, and nothing more of the server."""

    def __init__(self, engine: Any, add_tap: Callable[[Recorder], None],
                 remove_tap: Callable[[Recorder], None]) -> None:
        self.em = engine
        self._add_tap, self._remove_tap = add_tap, remove_tap
        self.current: Recorder | None = None   # the trace being recorded, or the last one

    async def start(self, path: str, *, with_data: bool = False, max_bytes: int | None = None,
                    count: int | None = None, lease_s: float | None = None, force: bool = False,
                    from_start: bool = False) -> Recorder:
        """Record every message from now on; OSError when the file cannot be
        made, RuntimeError while another trace is being recorded. The file is
        made in the engine's executor, as management's other file I/O (0267):
        a path on a hung mount holds up no session (0299). The first record is
        gathered in the step the tap goes in, so that it is the state the
        first recorded message meets."""
        self._idle()   # (still so after the open: management's lock runs one start at a
        cap = max_bytes or DEFAULT_MAX_BYTES   # time, and `--trace` runs before anything else)
        out = await asyncio.get_running_loop().run_in_executor(self.em.executor, open_output, path, force)
        first = first_record(self.em, from_start=from_start, with_data=with_data, max_bytes=cap)
        recorder = Recorder(out, path, first, with_data=with_data, max_bytes=cap, count=count,
                            lease_s=lease_s, on_stop=self._remove_tap)
        self.current = recorder
        self._add_tap(recorder)
        log.info("recording a trace to %s (cap %d bytes%s)", path, cap, ", with read data" if with_data else "")
        return recorder

    def _idle(self) -> None:
        if self.current is not None and self.current.reason is None:
            raise RuntimeError(f"a trace is being recorded to {self.current.path}: stop it first")

    def stop(self, reason: str, why: str) -> asyncio.Future:
        """End the trace being recorded, if one is; done once its file is closed."""
        if self.current is None:
            done: asyncio.Future = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self.current.stop(reason, why)

    async def stop_at_exit(self, reason: str, why: str, wait: float) -> None:
        """End the trace as the STML stops, waiting at most `wait` seconds for
        its file to close (a hung disk must not hold the stop); one line says
        so when the file is still open: its end may be missing."""
        try:
            await asyncio.wait_for(asyncio.shield(self.stop(reason, why)), wait)
        except asyncio.TimeoutError:
            assert self.current is not None   # (nothing to wait for without a trace)
            log.warning("trace %s: its file is not closed after %gs (the disk is slow or hung): "
                        "the STML stops without it, and the file may lack its end", self.current.path, wait)


class Output(Protocol):
    """Where the writer thread puts the trace: a file, a GzipFile."""

    def write(self, data: bytes, /) -> Any: ...

    def close(self) -> None: ...


def open_output(path: str, force: bool) -> Output:
    """The trace file, mode 0600 (it holds the data written through the
    target); an existing file only with `force`. gzip when it ends in .gz."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
             | (os.O_TRUNC if force else os.O_EXCL))
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)   # a file written over keeps its mode otherwise
    f = os.fdopen(fd, "wb")
    return _Gzip(f) if path.endswith(".gz") else f


class _Gzip:
    """gzip onto the file already opened (never reopened by name), closing both."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.z = gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6)

    def write(self, data: bytes, /) -> int:
        return self.z.write(data)

    def close(self) -> None:
        try:
            self.z.close()
        finally:
            self.f.close()


class Recorder:
    """The trace tap (stml.api.tap.Tap). Front-end -> STML data (write data)
    is kept whole, so replay can write it again; STML -> front-end data (read
    data) as a digest, or whole with `with_data`. `count`: stop after that
    many front-end messages (management messages, the `trace record` client's
    own among them, are recorded but not counted). `lease_s`: stop when
    renew() has not been called for that long (a `trace record` client that
    died)."""

    def __init__(self, out: Output, path: str, first: dict[str, Any], *, with_data: bool = False,
                 max_bytes: int = DEFAULT_MAX_BYTES, count: int | None = None,
                 lease_s: float | None = None, on_stop: Callable[[Recorder], None] = lambda r: None) -> None:
        self.path = path
        self.with_data = with_data
        self.max_bytes = max_bytes
        self.count = count
        self.lease_s = lease_s
        self.on_stop = on_stop
        self.counted = 0          # front-end messages recorded (what `count` counts; with a count only)
        self.lost = 0             # records dropped because the writer fell behind
        self.bytes = 0            # bytes handed to the writer, and gathered for it
        self.reason: str | None = None   # why it stopped; None while recording
        self.error: str | None = None    # the writer's, if writing failed
        self.renewed = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._chunk: list[bytes] = []
        self._flushed = 0         # message records the writer took
        self._gap = 0             # records lost since the last chunk the writer took
        # per record, one comparison each: past _limit the trace ends (the cap; -1
        # once it ended), past _next_flush the gathered chunk goes to the writer
        self._limit = max_bytes - END_RESERVE
        self._next_flush = CHUNK
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_CHUNKS)
        self._closed = self._loop.create_future()
        self._out = out
        self._thread = threading.Thread(target=self._write, name="trace-writer", daemon=True)
        self._thread.start()
        self._timer = self._loop.call_later(FLUSH_S, self._tick)
        head = self._pack(first)
        self._chunk.append(head)
        self._flushed = -1        # (the first record is not a message)
        self.bytes = len(head)

    @property
    def records(self) -> int:
        """Message records taken (not lost)."""
        return self._flushed + len(self._chunk)

    # ------------------------------------------------------------ the tap
    # Per message: a timestamp, one small pack (the header goes in as the bytes
    # that crossed the link, not packed again), a crc32c of read data, and two
    # comparisons of bookkeeping; inbound and outbound each do it in one call
    # (a shared helper cost a Python call per message: 6% of the trace's cost).
    def inbound(self, peer: Peer, header: dict[str, Any], packed: bytes, frames: list,
                now: Callable[[], int] = time.monotonic_ns) -> bool:
        op = header["op"]
        if op in _REDACT:
            packed = pack(redact(header))
        record = self._pack((now(), TO_STML, peer, packed, b"".join(frames) if frames else None))
        size = self.bytes + len(record)
        if size > self._limit:
            self._full()
            return True
        self.bytes = size
        self._chunk.append(record)
        if size >= self._next_flush:
            self._flush()
        if self.count is not None and op not in _MANAGEMENT:
            self._counted()
        return True

    def outbound(self, peer: Peer, header: dict[str, Any], packed: bytes, frames: list,
                 now: Callable[[], int] = time.monotonic_ns) -> bool:
        if not frames:
            data: Any = None
        elif self.with_data:
            data = b"".join(frames)
        elif len(frames) == 1:
            data = (len(frames[0]), crc32c(frames[0]))
        else:
            data = digest(frames)
        op = header["op"]
        if op in _REDACT:
            packed = pack(redact(header))
        record = self._pack((now(), FROM_STML, peer, packed, data))
        size = self.bytes + len(record)
        if size > self._limit:
            self._full()
            return True
        self.bytes = size
        self._chunk.append(record)
        if size >= self._next_flush:
            self._flush()
        if self.count is not None and op not in _MANAGEMENT:
            self._counted()
        return True

    def _full(self) -> None:
        """The record in hand would pass the cap (or the trace has ended)."""
        self._end("cap", f"trace stopped at {self.bytes} bytes: the next record would pass "
                         f"the cap of {self.max_bytes}")

    def _counted(self) -> None:
        self.counted += 1
        if self.count is not None and self.counted >= self.count:
            self._end("count", f"{self.counted} front-end messages, as asked")

    def _flush(self) -> None:
        """Hand the gathered records to the writer; dropped (and counted) when
        its queue is full: the loop never waits for the disk."""
        chunk = self._chunk
        if not chunk:
            self._next_flush = self.bytes + CHUNK
            return
        records = len(chunk) if self._flushed >= 0 else len(chunk) - 1
        size = sum(map(len, chunk))   # what self.bytes counts of it (not a gap note)
        if self._gap:
            chunk.insert(0, self._pack({"note": "gap", "lost": self._gap, "t": time.monotonic_ns()}))
        data = b"".join(chunk)
        self._chunk = []
        if self._flushed < 0:
            self._flushed = 0
        try:
            self._queue.put_nowait(data)
            self._gap = 0
            self._flushed += records
        except queue.Full:
            self._gap += records
            self.lost += records
            self.bytes -= size
        self._next_flush = self.bytes + CHUNK   # after a drop too: the next chunk is no bigger

    def _tick(self) -> None:
        if self.reason is not None:
            return
        if self.lease_s is not None and time.monotonic() - self.renewed > self.lease_s:
            self._end("lease", f"no word for {self.lease_s:g}s from the client that started it")
            return
        self._flush()
        self._timer = self._loop.call_later(FLUSH_S, self._tick)

    def renew(self) -> None:
        self.renewed = time.monotonic()

    # ------------------------------------------------------------ the end
    def stop(self, reason: str = "stopped", why: str = "stopped by management") -> asyncio.Future:
        """End the trace (the end note, the rest to the writer); the future is
        done once the file is closed."""
        self._end(reason, why)
        return self._closed

    def _end(self, reason: str, why: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        self._limit = -1          # no record after the end
        self._timer.cancel()
        self._flush()
        note = {"note": "end", "reason": reason, "why": why, "records": self.records, "lost": self.lost,
                "bytes": self.bytes, "t": time.monotonic_ns()}
        if self._gap:   # records lost since the last chunk the writer took: said before the end
            self._chunk.append(self._pack({"note": "gap", "lost": self._gap, "t": time.monotonic_ns()}))
        self._chunk.append(self._pack(note))
        chunk = b"".join(self._chunk)
        self._chunk = []
        self.bytes += len(chunk)
        # the end note must not be dropped: a full queue is waited out in the writer's terms
        threading.Thread(target=self._put_last, args=(chunk,), name="trace-end", daemon=True).start()
        (log.warning if reason in ("cap", "lease") else log.info)("trace %s: %s (%d records, %d bytes%s)",
                                                                  self.path, why, self.records, self.bytes,
                                                                  f", {self.lost} lost" if self.lost else "")
        self.on_stop(self)

    def _put_last(self, chunk: bytes) -> None:
        self._queue.put(chunk)
        self._queue.put(None)

    def _write(self) -> None:
        """The writer thread: chunks to the file until the end."""
        out = self._out
        try:
            while (chunk := self._queue.get()) is not None:
                if self.error is None:
                    try:
                        out.write(chunk)
                    except OSError as e:
                        self.error = f"cannot write {self.path}: {e.strerror or e}"
                        log.error("trace %s", self.error)
            out.close()
        except OSError as e:
            self.error = self.error or f"cannot close {self.path}: {e.strerror or e}"
        finally:
            try:
                self._loop.call_soon_threadsafe(self._closed_now)
            except RuntimeError:   # the loop is gone (the STML stopped without waiting)
                pass

    def _closed_now(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    def status(self) -> dict[str, Any]:
        return {"path": self.path, "records": self.records, "bytes": self.bytes, "lost": self.lost,
                "recording": self.reason is None, "reason": self.reason, "error": self.error,
                "with_data": self.with_data, "max_bytes": self.max_bytes}
