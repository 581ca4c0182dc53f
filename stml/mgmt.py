"""Live management: the `mgmt` message family of the contract (see stml.api).

A management client connects to the STML's endpoint like a front end (over
TCP, with a CURVE key in `[stml] allowed_managers`), never registers (a front
end may not manage: stml.roles) and sends {op: "mgmt", id, cmd, args};
the answer is {op: "mgmt_reply", id, ok, result | error}. Changes apply to
the running STML at once (front ends get a new `detect`, initiators the unit
attentions SPC names), then the whole running configuration is saved to the
config file (stml.persist: atomically, keeping its comments); a file edited
by hand since the STML loaded it is not overwritten (`config_reload` applies
the edit, and SIGHUP does the same; what it cannot apply stays in the file
through later saves). A change whose save fails stays live and its result
carries `save_error` (the CLI exits 1: docs/decisions/0232).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import functools
import logging
import secrets
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, TypeVar

from backends import Backend, BackendError
from scsi_runtime.logs import audit
from scsi_runtime.portals import parse_portal
from stml import pr
from stml.config import (MUTUAL_NEEDS_CHAP, Config, ConfigError, LunConfig, TargetConfig, check_iqn, parse_chap,
                         file_digest, load, lun_options, parse_lun_spec, parse_size, ram_overcommit)
from stml.emulator import CHAP_KINDS, Emulator, Target
from stml.gateway import Gateway
from stml.lu import RECORDED, CannotOpen, LogicalUnit, LunOptions, open_store, record_image, served_before
from stml.lunmap import LunMap
from stml.metrics import Metrics
from stml.persist import (SECRET_DIFFERS, EditedError, hide_secrets, hold, model, new_id, read_document, render,
                          save)
from stml.portals import GATEWAY_FIXED, GATEWAY_STATE, PortalStates, portal_entries, portal_groups
from stml.sense import CAPACITY_DATA_CHANGED, NOT_READY_TO_READY_CHANGE, REPORTED_LUNS_DATA_CHANGED
from stml.task import FANOUT_STEP, Nexus, must_finish
from stml.trace.recorder import Recorder, Traces

log = logging.getLogger("stml.mgmt")
T = TypeVar("T")


class MgmtError(Exception):
    """A refused management request; str() is what the user sees."""


class StillServed(MgmtError):
    """An add whose id another LU still serves: a reload kept that LU (its
    target has sessions), and the file gave its id to this entry (0716)."""


PORTAL_WAIT = 8.0   # `portal add` waits this long for the listeners' report (clients wait 10 s)
LUN_DRAIN = 3.0     # a removed LUN's commands in flight have this long to finish (0219)
# a LUN added on a removed LUN's store (or identity) waits this long for its close: its drain, then its flush
CLOSE_WAIT = LUN_DRAIN + 5.0
DRAIN_POLL = 0.05   # how often the drain looks at the removed LU's task set
# `trace stop` answers once the trace's file is closed, or says it is not after this
# long: within the client's default timeout (10 s), and the lock is held meanwhile (0722)
TRACE_CLOSE_WAIT = 5.0


class Management:
    """The management commands. Each change is applied live and to the running
    configuration (self.config, the Config model: its targets, LUNs and
    portals are kept in step with the emulator), then the whole running
    configuration is saved (stml.persist).

    Its collaborators are handed to it (stml.server makes them): the engine,
    whose public calls it makes, the running configuration, the gateway of
    shared storage, the counters, the front ends' portal reports, and the
    endpoints the STML serves (for status)."""

    def __init__(self, engine: Emulator, config: Config, *, gateway: Gateway, metrics: Metrics,
                 portals: PortalStates, endpoints: list[str], traces: Traces) -> None:
        self.em = engine
        self.traces = traces
        self.config = config
        self.gateway = gateway
        self.metrics = metrics
        self.portals = portals
        self.endpoints = endpoints
        self._lock = asyncio.Lock()   # one change at a time (config file writes in order)
        self._batch = False           # a reload: the file is the source, nothing is saved
        self._identified = False      # a reload gave a LUN an id, or recorded an image's: saved after it
        # LUN numbers whose LU was removed, by target: an LU added at one is news there too
        self._retired: dict[str, set[int]] = {}
        self._closing: dict[LogicalUnit, asyncio.Task] = {}   # removed LUs' backends waiting to close
        self.closing_lus: set[LogicalUnit] = set()   # their LUs: the STML's stop flushes them too
        # a reload's renumbered RAM LUs' stores, by id, for the add at their new number (0205)
        # or in the target they moved to (0249)
        self._moving: dict[tuple[str, str], Backend] = {}   # (target, id) -> a removed RAM LU's store
        self._homes: dict[str, str] = {}   # during a reload: LU id -> the target of its entry
        self._reloading = False
        self._pending: list[str] = []   # a reload's lines of what it did not apply
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="config-save")   # (its thread: at first use)
        # a save whose command waits for it (in the saver thread or just done), and its file
        self._under_way: tuple[Future, Path] | None = None
        self._stopping = False        # the STML stops: saves under way finish, none begins (0259)
        self._save_error: str | None = None   # the change being answered is live but unsaved
        self._cmds: dict[str, Callable] = {
            "status": self.status, "target_list": self.target_list, "target_add": self.target_add,
            "target_remove": self.target_remove, "lun_list": self.lun_list, "lun_add": self.lun_add,
            "lun_remove": self.lun_remove, "lun_resize": self.lun_resize, "lun_reset_error": self.lun_reset_error,
            "portal_list": self.portal_list, "portal_add": self.portal_add,
            "portal_remove": self.portal_remove, "acl_add": self.acl_add, "acl_remove": self.acl_remove,
            "chap_set": self.chap_set, "session_list": self.session_list,
            "session_drop": self.session_drop, "frontend_list": self.frontend_list,
            "config_show": self.config_show, "config_save": self.config_save,
            "config_diff": self.config_diff, "config_reload": self.config_reload,
            "latency": self.latency,
            "trace_start": self.trace_start, "trace_status": self.trace_status, "trace_stop": self.trace_stop,
        }

    # ------------------------------------------------------------ transport
    def handle(self, ident: bytes, header: dict[str, Any]) -> None:
        asyncio.get_running_loop().create_task(self._answer(ident, header))

    async def _answer(self, ident: bytes, h: dict[str, Any]) -> None:
        rid = h.get("id")
        cmd = h.get("cmd")
        fn = self._cmds.get(cmd) if isinstance(cmd, str) else None
        result: Any = None
        try:
            if fn is None:
                raise MgmtError(f"unknown management command {cmd!r} (known: {', '.join(sorted(self._cmds))})")
            args = h.get("args") or {}
            if not isinstance(args, dict):
                raise MgmtError("args must be a map")
            async with self._lock:
                self._save_error = None
                result = await fn(**args)
                if self._save_error is not None and isinstance(result, dict):
                    result["save_error"] = self._save_error   # the client exits 1 (an I/O error)
            ok, error = True, None
        except (MgmtError, ConfigError) as e:
            ok, error = False, str(e)
        except TypeError as e:
            ok, error = False, f"bad arguments for {cmd}: {e}"
        except Exception as e:  # a management call must never take the STML down
            log.exception("management command %s failed", cmd)
            ok, error = False, f"internal error: {e}"
        if ok and isinstance(cmd, str) and cmd not in ("status", "trace_status", "latency") \
                and not cmd.endswith(("_list", "_show", "_diff")):
            log.info("management: %s %s", cmd, {k: v for k, v in (h.get("args") or {}).items()
                                                 if k != "secret"}, extra=audit())
        try:
            self.em.out.mgmt_reply(ident, rid, ok, result, error)
        except (TypeError, OverflowError) as e:   # a result the codec cannot pack: the client still hears
            log.error("management command %s: its result cannot be sent: %s", cmd, e)
            self.em.out.mgmt_reply(ident, rid, False, None, f"internal error: the result cannot be sent: {e}")

    # ------------------------------------------------------------ helpers
    def _target(self, name: str | None) -> Target:
        if name is None:
            if not self.em.targets:
                raise MgmtError("the STML has no targets")
            return next(iter(self.em.targets.values()))
        t = self.em.targets.get(str(name).lower())
        if t is None:
            raise MgmtError(f"no target {name} (targets: {', '.join(self.em.targets) or 'none'})")
        return t

    def _tc(self, name: str) -> TargetConfig:
        """The running configuration's entry of a live target (every one has
        one: the emulator's targets are built from it and changed with it)."""
        return next(tc for tc in self.config.targets if tc.name == name)

    def _lu(self, target: str | None, lun: int) -> tuple[Target, LogicalUnit]:
        t = self._target(target)
        lu = t.luns.get(int(lun))
        if lu is None:
            raise MgmtError(f"target {t.name} has no LUN {lun} (LUNs: {', '.join(map(str, t.luns)) or 'none'})")
        return t, lu

    async def _sessions(self, target: str) -> int:
        """Live nexuses of the target, one per front end holding a key (the
        engine's index, not a walk of every front end's nexuses), in steps."""
        return sum([len(self.em.nexuses_of(key)) async for key in _stepped(self.em.nexus_keys(target))])

    async def _redetect(self) -> None:
        """Front ends learn the new inventory (contract: detect, sent unasked),
        described once for all of them, FANOUT_STEP LUs per turn of the loop."""
        targets = []
        for t in self.em.targets.values():
            targets.append(self.em.describe_target(t, [lu.describe() for lu in await self._lus([t])]))
        for fe in list(self.em.front_ends.values()):
            self.em.send_detect(fe, targets)

    def _each_lu(self, targets: Iterable[Target] | None = None) -> AsyncIterator[LogicalUnit]:
        """The LUs of `targets` (all), FANOUT_STEP per turn of the loop. No
        copy of the dicts: only management changes the inventory, and its
        callers hold the management lock (none changes it while walking)."""
        ts = self.em.targets.values() if targets is None else targets
        return _stepped(lu for t in ts for lu in t.luns.values())

    async def _lus(self, targets: Iterable[Target] | None = None, kind: str | None = None) -> list[LogicalUnit]:
        """The LUs of `targets` (all) of backend `kind` (any), gathered in steps."""
        return [lu async for lu in self._each_lu(targets) if kind is None or lu.options.kind == kind]

    async def _ua(self, luns: list[LogicalUnit], asc: tuple[int, int], target: str, events: bool = True) -> None:
        """A unit attention for every nexus of the target on these LUs, through
        the engine's fan-out (as a TARGET RESET's): bounded work per turn of
        the loop, one asynchronous event per nexus however many LUs (none
        without `events`: one change told in two fan-outs is one event)."""
        await self.em.fan_out_ua(luns, asc, self.em.nexus_keys(target), events=events)

    async def _check_file(self) -> None:
        """Refuse a change when the file changed on disk since it was loaded or
        saved: saving would lose the edit. `config reload` applies it. The
        file is read in a thread (a hung NFS mount must not stop the STML)."""
        path = self.config.path
        if path is None or self._batch:
            return
        if await self._in_thread(file_digest, path) != self.config.digest:
            raise MgmtError(f"{path} was edited since the STML loaded it: apply the edit with "
                            f"`scsi-target config reload` (see `config diff`), then retry")

    async def _persist(self) -> str:
        """Save the whole running configuration (after a live change) in the
        saver thread: its write and two fsyncs never hold up the loop. Callers
        hold the management lock, so saves stay in order, nothing changes the
        configuration while it is written, and the reply follows the save."""
        path = self.config.path
        if self._batch:
            return "applied from the file"
        if path is None:
            return "not saved: the STML has no config file"
        try:
            await self._saving(path)
        except (OSError, EditedError) as e:
            log.error("the change is live but was not saved to %s: %s", path, e)
            self._save_error = (f"applied, but NOT saved to {path}: {e}; a restart loses it unless "
                                f"`scsi-target config save` succeeds first")
            return f"NOT saved to {path}: {e}"
        return f"saved to {path}"

    async def _in_thread(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.em.executor, fn, *args)

    async def _saving(self, target: Path) -> None:
        """Save the running configuration to `target` in a thread of its own:
        not the backends' pool, where it would wait behind (and hold up)
        medium I/O. Once the STML stops none begins (OSError): finish_saves
        has already waited for the one under way."""
        if self._stopping:
            raise OSError("the STML is stopping")
        future = self._saver.submit(save, self.config, target)
        self._under_way = (future, target)
        try:
            await asyncio.wrap_future(future)
        finally:
            self._under_way = None   # its command answers in this loop step

    async def finish_saves(self, bound: float) -> bool:
        """At stop: let the save under way end, so the change it saves is not
        lost with the process, and its command answer (it holds the lock
        until then); none begins after. A save still running after `bound`
        seconds (a hung file system) is abandoned with one line, and False
        tells the STML to exit without joining its thread; the file is then
        whole, from before or after that save (stml.persist writes
        atomically)."""
        self._stopping = True
        if self._under_way is None:
            return True
        future, target = self._under_way
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        try:
            # (must_finish: a save abandoned here that fails later is said, not left
            # in a future nobody reads for the GC to log, 0722)
            await asyncio.wait_for(must_finish(asyncio.wrap_future(future),
                                               functools.partial(_abandoned_save_failed, target)), bound)
        except asyncio.TimeoutError:
            log.error("stopping: saving %s still running after %gs, abandoned: the change it saves "
                      "may be missing from the file", target, bound)
            return False
        except Exception:   # noqa: BLE001 - its command said why (the change is live, not saved)
            pass
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._lock.acquire(), max(0.0, deadline - loop.time()))
            self._lock.release()   # its command has answered
        return True

    @contextlib.contextmanager
    def _batched(self) -> Iterator[None]:
        self._batch = True
        try:
            yield
        finally:
            self._batch = False

    # ------------------------------------------------------------ reads
    async def status(self) -> dict[str, Any]:
        snap = await self._snapshot()
        snap["endpoints"] = self.endpoints
        snap["config"] = str(self.config.path) if self.config.path else None
        snap["data_dir"] = str(self.config.data_dir)
        snap["targets"] = len(self.em.targets)
        snap["gateway"] = await self.gateway.status()
        snap["portals"] = await self.portal_list()
        gone = await self._in_thread(_unlinked, await self._lus())
        async for r in _stepped(snap["luns"]):
            r["unlinked"] = (r["target"], r["lun"]) in gone
        return snap

    async def _snapshot(self) -> dict[str, Any]:
        """The counters' report (stml.metrics), built in steps."""
        snap: dict[str, Any] = {}
        async for _ in _stepped(self.metrics.build(self.em, snap)):
            pass
        return snap

    async def target_list(self) -> list[dict[str, Any]]:
        return [{"name": t.name, "alias": t.alias, "luns": len(t.luns),
                 "acl": list(t.access.get("acl") or []), "chap": bool(t.access.get("chap")),
                 "sessions": await self._sessions(t.name)}
                async for t in _stepped(self.em.targets.values())]

    async def lun_list(self, target: str | None = None) -> list[dict[str, Any]]:
        lus = await self._lus([self._target(target)] if target else None)
        return [{"target": lu.target, "lun": lu.lun, "backend": lu.options.kind,
                 "path": lu.options.path, "size": lu.blocks * lu.block_size,
                 "block_size": lu.block_size, "ro": lu.options.ro, "sync_error": lu.backend.sync_error,
                 "offline": lu.offline}
                for lu in lus]

    async def portal_list(self) -> list[dict[str, Any]]:
        """The configured portals, each with what the front ends that follow
        the list report about its listener."""
        out = []
        reports = self.portals.reports()
        for p in self.config.portals:
            key = parse_portal(p)
            states = [r for rep in reports for r in rep if (r.get("host"), r.get("port"), r.get("tpgt")) == key]
            if not reports:
                state = GATEWAY_STATE if self.config.stml.peers else "no front end"
            elif states and all(r.get("listening") for r in states):
                bound = sorted({str(r.get("bound_port", key[1])) for r in states})
                state = "listening" + (f" on port {','.join(bound)}" if key[1] == 0 else "")
            elif states:
                state = "error: " + "; ".join(str(r.get("error")) for r in states if not r.get("listening"))
            else:
                state = "opening"
            out.append(dict(zip(("host", "port", "tpgt"), key), portal=p, state=state))
        return out

    async def session_list(self) -> list[dict[str, Any]]:
        return (await self._snapshot())["sessions"]

    async def frontend_list(self) -> list[dict[str, Any]]:
        return (await self._snapshot())["front_ends"]

    async def latency(self) -> dict[str, Any]:
        """Stage timing (stml.timing): per LUN and front end, each stage's p50/p90/p99."""
        timing = self.em.timing
        if timing is None:
            raise MgmtError("stage timing is off: start the target with --timing "
                            "(or [stml] timing = true)")
        return timing.report()

    # ------------------------------------------------------------ traces
    async def trace_start(self, path: str, with_data: bool = False, max_bytes: int | None = None,
                          count: int | None = None, force: bool = False,
                          lease_s: float | None = None) -> dict[str, Any]:
        """Record every contract message to `path` (on the STML's host) until
        trace_stop, `count` message records, the `max_bytes` cap, or `lease_s`
        seconds without a trace_status from the client (one that died)."""
        if not isinstance(path, str) or not Path(path).is_absolute():
            raise MgmtError(f"{path!r} is not an absolute path (the file is made by the STML, "
                            f"whose working directory is not the client's)")
        for name, value in (("max_bytes", max_bytes), ("count", count)):
            if value is not None and (type(value) is not int or value < 1):
                raise MgmtError(f"{name} must be a positive number, not {value!r}")
        if lease_s is not None and (not isinstance(lease_s, (int, float)) or not 1 <= lease_s <= 3600):
            raise MgmtError(f"lease_s must be 1-3600 seconds, not {lease_s!r}")
        try:
            recorder = await self.traces.start(path, with_data=bool(with_data), max_bytes=max_bytes,
                                               count=count, lease_s=lease_s, force=bool(force))
        except RuntimeError as e:
            raise MgmtError(str(e)) from None
        except FileExistsError:
            raise MgmtError(f"{path} exists (pass --force to replace it)") from None
        except OSError as e:
            raise MgmtError(f"cannot make {path}: {e.strerror or e}") from None
        return recorder.status()

    def _recorder(self) -> Recorder:
        recorder = self.traces.current
        if recorder is None:
            raise MgmtError("no trace has been recorded since the STML started")
        return recorder

    async def trace_status(self) -> dict[str, Any]:
        """The trace being recorded (or the last one); renews its lease."""
        recorder = self._recorder()
        recorder.renew()
        return recorder.status()

    async def trace_stop(self) -> dict[str, Any]:
        """End the trace; the answer comes once its file is whole and closed."""
        recorder = self._recorder()
        try:
            await asyncio.wait_for(asyncio.shield(recorder.stop()), TRACE_CLOSE_WAIT)
        except asyncio.TimeoutError:
            raise MgmtError(f"trace {recorder.path} stopped, but its file is not closed after "
                            f"{TRACE_CLOSE_WAIT:g}s (the disk is slow or hung): its writer goes on "
                            f"as the disk allows") from None
        return recorder.status()

    # ------------------------------------------------------------ the config file
    async def config_show(self) -> dict[str, Any]:
        """The running configuration, written into the file's text (its comments):
        read and rendered in a thread, as a save is (the lock keeps it still)."""
        path = self.config.path
        return {"path": str(path) if path else None, "text": await self._in_thread(_shown, self.config)}

    async def config_save(self, path: str | None = None, force: bool = False) -> dict[str, Any]:
        """Save the running configuration to its file, or to `path`. `force`
        overwrites a file edited by hand since it was loaded."""
        target = Path(path).absolute() if path else self.config.path
        if target is None:
            raise MgmtError("the STML has no config file: give a file name")
        if force and target == self.config.path:
            self.config.digest = await self._in_thread(file_digest, target)
            self.config.held = None   # the file becomes what runs, unapplied edits and all
        try:
            await self._saving(target)
        except EditedError as e:
            raise MgmtError(f"{e}: `config reload` applies the edit, `config save --force` "
                            f"overwrites it, `config diff` shows it") from None
        except OSError as e:    # an I/O error, not a refusal: the client exits 1
            self._save_error = f"cannot write {target}: {e.strerror or e}"
            return {"saved": f"NOT saved to {target}", "path": str(target)}
        return {"saved": f"saved to {target}", "path": str(target)}

    async def config_diff(self) -> dict[str, Any]:
        """What differs between the file on disk and the running configuration
        (as a unified diff from the file to what a save would write)."""
        path = self.config.path
        if path is None:
            raise MgmtError("the STML has no config file")
        return await self._in_thread(_diff, self.config, path)

    async def config_reload(self) -> dict[str, Any]:
        """Apply the file to the running STML where that can be done live; say
        what needs a restart (or a forced command) instead."""
        path = self.config.path
        if path is None:
            raise MgmtError("the STML has no config file to reload")
        # off the loop: loading stats every file LUN (a hung NFS mount must not stop the STML)
        new = await self._in_thread(load, str(path), str(self.config.data_dir), None, (),
                                    self.config.stml_endpoint, ())
        applied: list[str] = []
        pending: list[str] = []
        self._identified = False
        self._reloading = True
        self._pending = pending
        # (an id names one LU in a file: the load refuses it in two entries)
        self._homes = {lc.options.id: tc.name for tc in new.targets for lc in tc.luns if lc.options.id is not None}
        try:
            with self._batched():
                await self._reload(new, applied, pending)
        finally:   # a moved RAM store no add took (its add failed): nothing serves it any more
            self._reloading = False
            self._homes = {}
            left, self._moving = self._moving, {}
            for (target, ident), backend in left.items():
                log.warning("reload: RAM LU %s was not added to target %s: its data is freed", ident, target)
                await self._in_thread(backend.close)
        self.config.digest = new.digest
        self.config.raw = new.raw
        # what was not applied stays in the file through saves; two models of
        # every LUN: built in a thread, as a save's (the lock keeps them still)
        await self._in_thread(_hold, self.config, new)
        if self._identified:   # entries added by hand: the file keeps the ids they are served with (0281)
            said = await self._persist()
            if self._save_error is not None:   # the reload's edits are the file's own: only ids are unsaved
                self._save_error = None
                log.warning("reload: the ids given to LUNs added by hand are %s; the next start derives "
                            "them again (docs/decisions/0281)", said)
        for line in applied:
            log.info("reload: %s", line)
        for line in pending:
            log.warning("reload: not applied: %s", line)
        return {"path": str(path), "applied": applied, "not_applied": pending}

    async def reload_on_signal(self) -> None:
        """SIGHUP: a reload, logged (there is no one to answer)."""
        async with self._lock:
            try:
                r = await self.config_reload()
            except (MgmtError, ConfigError) as e:
                log.error("reload refused: %s", e)
                return
        log.info("reloaded %s: %d change(s) applied, %d not", r["path"], len(r["applied"]),
                 len(r["not_applied"]))

    async def _reload(self, new: Config, applied: list[str], pending: list[str]) -> None:
        old = self.config
        # [[vhost]]: the VM sockets are `run`'s children, started with it
        for key in ("data_dir", "stml_endpoint", "stml", "isns", "isns_auth", "slp", "slp_da", "slp_auth",
                    "vhost"):
            if old.raw.get(key) != new.raw.get(key):
                pending.append(f"`{key}` changed: restart to apply it")
        if new.discovery_chap != old.discovery_chap:
            old.discovery_chap = new.discovery_chap
            self.em.discovery = {**self.em.discovery, "chap": new.discovery_chap}
            await self._redetect()
            applied.append("discovery_chap")
        if new.portals != old.portals and old.stml.peers:
            pending.append(f"`portals` changed: {GATEWAY_FIXED}: restart it to apply them")
        elif new.portals != old.portals:
            await self._set_portals(new.portals)
            applied.append(f"portals: {', '.join(new.portals)}")
        wanted = {t.name: t for t in new.targets}
        for name in [n for n in self.em.targets if n not in wanted]:
            if await self._sessions(name):
                pending.append(f"target {name} has sessions: `scsi-target target remove --force {name}` "
                               f"removes it")
                continue
            await self.target_remove(name)
            applied.append(f"target {name} removed")
        # every target's removed LUNs first: a LUN moved to a target earlier in
        # the file then finds its file no longer backing the one it left
        for tc in new.targets:
            if tc.name in self.em.targets:
                await self._remove_gone_luns(tc, applied)
        for tc in new.targets:
            if tc.name not in self.em.targets:
                await self.target_add(tc.name, tc.alias)
                applied.append(f"target {tc.name} added")
            await self._reload_target(tc, applied, pending)

    async def _remove_gone_luns(self, want: TargetConfig, applied: list[str]) -> None:
        t = self.em.targets[want.name]
        numbers = {lc.lun for lc in want.luns}
        ids = {lc.options.id for lc in want.luns if lc.options.id is not None}
        for gone in [lu for lu in await self._lus([t]) if lu.lun not in numbers]:
            # (an LU moved to another number keeps its reservations: 0218)
            await self._remove_lun(gone.lun, t.name, renumbered=gone.options.id in ids)
            applied.append(f"target {t.name} LUN {gone.lun} removed")

    async def _reload_target(self, want: TargetConfig, applied: list[str], pending: list[str]) -> None:
        t = self.em.targets[want.name]
        have = self._tc(t.name)
        for f in dataclasses.fields(TargetConfig):
            value = getattr(want, f.name)
            if f.name in ("name", "luns") or value == getattr(have, f.name):
                continue
            setter = _TARGET_SETTERS.get(f.name)
            if setter is None:   # a setting added to TargetConfig without a live setter here
                pending.append(f"target {t.name} {f.name}: restart to apply it")
                continue
            await setter(self, t, value)
            applied.append(f"target {t.name} {f.name}")
        luns = {lc.lun: lc.options for lc in want.luns}
        async for number, o in _stepped(luns.items()):
            lu = t.luns.get(number)
            if lu is None:
                try:   # a served-before file is never made anew, blank, under its identity (0280)
                    await self._add_lun(t, number, o, create=not served_before(o))
                except StillServed as e:   # (a kept target's LU: the file no longer has it)
                    pending.append(f"target {t.name} LUN {number}: {e}: reload again once that LU is gone, "
                                   f"or restart")
                    continue
                except MgmtError as e:   # kept in the file (0231), where a start meets it too
                    pending.append(f"target {t.name} LUN {number}: {e}; a start with this file serves it "
                                   f"offline until it is fixed there")
                    continue
                applied.append(f"target {t.name} LUN {number} added")
                continue
            if o.kind == "rbd" and lu.offline is None and o.size is not None:
                _image_sized(t.name, lu, o, pending)
            same = not _differs_beyond_size(o, lu.options)
            id_edited = o.id is not None and lu.options.id is not None and o.id != lu.options.id
            if lu.offline is not None and not id_edited and (same or _path_corrected(o, lu.options)):
                if lu.options.id is None:   # never served: it opens under the id its entry now gives (0298)
                    lu.options.id = o.id
                await self._retry_offline(t, lu, applied, pending, o.path)
            elif id_edited:   # another identity is another disk to initiators: never in place (0298)
                others = ", ".join(_changed(o, lu.options))
                pending.append(f"target {t.name} LUN {number}: its id changed (served as {lu.options.id}, "
                               f"the file says {o.id}){f'; so did {others}' if others else ''}: restart "
                               f"to serve it under the new id (or remove and add the LUN)")
            elif not same:
                pending.append(f"target {t.name} LUN {number}: settings other than its size changed: "
                               f"restart to apply them (or remove and add the LUN)")
            elif o.size is not None and o.size != lu.options.size:
                # an edited size (0278): a file's `size` created it, and an existing
                # file of another size is served at its own, which no reload changes
                try:
                    await self.lun_resize(number, o.size, t.name, force=False)
                    applied.append(f"target {t.name} LUN {number} resized to {o.size} bytes")
                except MgmtError as e:
                    pending.append(f"target {t.name} LUN {number}: {e}")
            if o.id is None and lu.options.id is not None and not _differs_beyond_size(o, lu.options):
                o.id = lu.options.id   # the entry of a served LU, its id lost: kept (0281)
                self._identified = True

    # ------------------------------------------------------------ portals
    async def _set_portals(self, portals: list[str]) -> str:
        """The STML's portal list changes: front ends that follow it open or close
        listeners (detect), ALUA learns the portal groups, the file keeps it."""
        await self._check_file()
        self.config.portals = portals
        self.em.portals = portal_entries(portals)
        self.em.configured_tpgs = set(portal_groups(self.config))
        await self._redetect()
        return await self._persist()

    def _portals_not_fixed(self) -> None:
        """A gateway's portals change by a restart only: saying a new one
        listens, when none does, would be worse than refusing."""
        if self.config.stml.peers:
            raise MgmtError(f"{GATEWAY_FIXED}: edit `portals` in {self.config.path} and restart it")

    async def portal_add(self, portal: str) -> dict[str, Any]:
        """Add a portal; the reply waits for the front ends that follow the list
        to say whether they could listen on it, and a portal none can open is
        taken back out and refused."""
        try:
            host, port, tpgt = key = parse_portal(str(portal))
        except ValueError as e:
            raise MgmtError(str(e)) from None
        self._portals_not_fixed()
        for p in self.config.portals:
            h, pt, t = parse_portal(p)
            if (h, pt) == (host, port) and port != 0:
                raise MgmtError(f"portal {p} already listens on {portal.split(',')[0]}")
        await self._check_file()
        before = list(self.config.portals)
        self.config.portals = [*before, portal]
        self.em.portals = portal_entries(self.config.portals)
        self.em.configured_tpgs = set(portal_groups(self.config))
        await self._redetect()
        errors = await self.portals.wait(key, PORTAL_WAIT)
        if errors:   # taken back out, unsaved
            self.config.portals = before
            self.em.portals = portal_entries(before)
            self.em.configured_tpgs = set(portal_groups(self.config))
            await self._redetect()
            raise MgmtError(f"cannot listen on {portal}: {'; '.join(errors)}")
        saved = await self._persist()
        return {"portal": portal, "host": host, "port": port, "tpgt": tpgt, "saved": saved}

    async def portal_remove(self, portal: str) -> dict[str, Any]:
        try:
            key = parse_portal(str(portal))
        except ValueError as e:
            raise MgmtError(str(e)) from None
        # "HOST:PORT" names the portal whatever its TPGT; "HOST:PORT,TPGT" must match it
        matches = [p for p in self.config.portals if parse_portal(p)[:2] == key[:2]
                   and ("," not in portal or parse_portal(p)[2] == key[2])]
        if not matches:
            raise MgmtError(f"no portal {portal} (portals: {', '.join(self.config.portals) or 'none'})")
        self._portals_not_fixed()
        saved = await self._set_portals([p for p in self.config.portals if p not in matches])
        return {"portal": matches[0], "saved": saved}

    # ------------------------------------------------------------ sessions
    async def session_drop(self, nexus: int, front_end: str | None = None) -> dict[str, Any]:
        """End one I_T nexus: the STML releases it (its tasks are aborted) and
        tells the owning front end to end the session (contract: drop_nexus)."""
        # each front end's nexuses by number: one look-up per front end, not a walk of every session
        found = [n for fe in self.em.front_ends.values() if front_end in (None, fe.name)
                 for n in (fe.nexuses.get(int(nexus)),) if n is not None]
        if not found:
            raise MgmtError(f"no session {nexus}" + (f" on front end {front_end}" if front_end else "")
                            + " (see `session list`)")
        if len(found) > 1:
            raise MgmtError(f"session {nexus} exists on several front ends "
                            f"({', '.join(n.fe.name for n in found)}): give --front-end")
        n = found[0]
        self.em.out.drop_nexus(n.fe.ident, n.id, "dropped by management")
        self.em.drop_nexus(n, lost=True)   # (not its initiator's doing: it hears of it, 0234)
        return {"front_end": n.fe.name, "nexus": n.id, "initiator": n.initiator, "target": n.target}

    # ------------------------------------------------------------ targets
    async def target_add(self, name: str, alias: str = "") -> dict[str, Any]:
        name = check_iqn(name, "target name")
        if name in self.em.targets:
            raise MgmtError(f"target {name} exists")
        await self._check_file()
        t = Target(name, LunMap(), alias, {"acl": [], "chap": None, "mutual": None})
        self.em.targets[name] = t
        self.config.targets.append(TargetConfig(name, [], alias))
        await self._redetect()
        return {"target": name, "saved": await self._persist()}

    async def target_remove(self, name: str, force: bool = False) -> dict[str, Any]:
        t = self._target(name)
        live = await self._sessions(t.name)
        if live and not force:
            raise MgmtError(f"target {t.name} has {live} session(s); pass --force to drop them")
        await self._check_file()
        del self.em.targets[t.name]
        self._retired.pop(t.name, None)   # its sessions end: no nexus saw its LUs
        async for lu in self._each_lu([t]):
            self._close_later(lu)
        await self._end_sessions(t.name, f"target {t.name} removed")
        self.config.targets = [tc for tc in self.config.targets if tc.name != t.name]
        await self._redetect()
        return {"target": t.name, "saved": await self._persist()}

    async def _end_sessions(self, target: str, why: str, admitted: frozenset[str] | None = frozenset(),
                            kinds: frozenset[str] | None = None) -> int:
        """The sessions of a removed target end (docs/decisions/0265), or those
        of initiators its new ACL leaves out (0275; `admitted` as
        Emulator.admitted, None: all stay; `kinds`: only those of front ends of
        these kinds, None: all): each front end is told to drop its
        nexus (fetd_tcp closes the session's connections), then the STML
        releases it, and its tasks end silently. FANOUT_STEP nexuses between
        turns of the loop; the target (or the ACL) has changed already, so
        nothing new reaches it meanwhile (a command finds no LU, a new nexus
        no target or no ACL entry). Each nexus aborts its own tasks (0239).
        Returns how many nexuses it dropped."""
        if admitted is None:
            return 0
        chunk: list[Nexus] = []
        ended = 0
        for n in self.em.nexuses(target):
            if pr.name_key(n.initiator) in admitted or kinds is not None and n.fe.kind not in kinds:
                continue
            chunk.append(n)
            if len(chunk) == FANOUT_STEP:
                ended += self._drop_nexuses(chunk, why)
                chunk = []
                await asyncio.sleep(0)
        return ended + self._drop_nexuses(chunk, why)

    def _drop_nexuses(self, nexuses: list[Nexus], why: str) -> int:
        live = [n for n in nexuses if n.fe.nexuses.get(n.id) is n]   # (not released meanwhile)
        for n in live:
            self.em.out.drop_nexus(n.fe.ident, n.id, why)
            self.em.drop_nexus(n, lost=True)   # (with its own tasks: no walk of its front end's, 0239)
        return len(live)

    # ------------------------------------------------------------ LUNs
    async def lun_add(self, spec: str, target: str | None = None, lun: int | None = None) -> dict[str, Any]:
        t = self._target(target)
        raw_lun = parse_lun_spec(spec, "lun spec")
        # a new LU's identity (its NAA and serial): random, and saved with it; an
        # RBD LU's is its image's, the same on every gateway (docs/decisions/0400)
        if raw_lun["backend"] != "rbd":
            raw_lun["id"] = secrets.token_hex(16)
        number = int(lun) if lun is not None else await _free_lun(t)
        if not 0 <= number < 16384:
            raise MgmtError(f"{number} is not a LUN number (0-16383)")
        if number in t.luns:
            raise MgmtError(f"target {t.name} already has LUN {number}")
        # off the loop: it looks for the file (a hung NFS mount must not stop the STML)
        opts = await self._in_thread(lun_options, raw_lun, f"LUN {number}", self.config.data_dir)
        await self._check_file()
        lu = await self._add_lun(t, number, opts)
        # the path as resolved (a relative one is in the data dir, not the caller's directory)
        return {"target": t.name, "lun": number, "size": lu.blocks * lu.block_size,
                **({"path": opts.path} if opts.path else {}), "saved": await self._persist()}

    async def _ram(self) -> int:
        """Bytes of the RAM LUNs served, the most their pages can take."""
        return sum(lu.blocks * lu.block_size for lu in await self._lus(kind="ram"))

    async def _add_lun(self, t: Target, number: int, opts: LunOptions, create: bool = True) -> LogicalUnit:
        """`create`: a missing file may be made (a LUN never served before)."""
        why = ram_overcommit(await self._ram() + (opts.size or 0)) if opts.kind == "ram" else None
        if why:
            raise MgmtError(why)
        if opts.id is not None:   # one id, one LU: two served would be one disk to initiators, twice
            twin = next((lu for lu in await self._lus() if lu.options.id == opts.id), None)
            if twin is not None:
                raise StillServed(f"its id {opts.id} is still served by target {twin.target} LUN {twin.lun}")
        if opts.kind in ("file", "rbd"):
            owner = await self._in_thread(_serving, opts, await self._lus(kind=opts.kind))   # stats: off the loop
            if owner is not None:
                raise MgmtError(f"{opts.path} already backs target {owner.target} LUN {owner.lun}")
        why = await self._closed(opts)
        if why:
            raise MgmtError(why)
        others = await self._lus([t])   # walked before the change: a walk yields
        try:
            backend = await self._moved_ram(t.name, number, opts) or await self._in_thread(open_store, opts, create)
        except CannotOpen as e:
            raise MgmtError(f"cannot open the backend: {e}") from None
        await self._identify(t.name, number, opts, backend)
        lu = LogicalUnit(t.name, number, backend, opts, self.em.templates["disk"])
        if getattr(backend, "lock_acquire", None) is not None:
            try:   # shared storage: served once this gateway holds its lock
                await self.gateway.adopt(lu)
            except BackendError as e:
                await self._in_thread(backend.close)
                raise MgmtError(f"cannot serve {opts.path}: {e}") from None
        elif self.em.data_dir is not None:   # where APTPL keeps this LU's reservations
            try:   # (a renumbered LU's, found by its identity, 0218: a listing and a read, in a thread)
                pr.state(lu).restore(*await self._in_thread(_read_state, self.em.data_dir, t.name, number,
                                                            opts.id, others))
            except (pr.PrStoreError, OSError) as e:
                await self._in_thread(backend.close)
                raise MgmtError(str(e)) from None
        # a LUN number never used was never seen: nothing about it changed. One
        # whose LU was removed was: a nexus that addressed that LU is told on
        # this one too, before its next command reaches another disk (0254):
        # all of them, before it is reachable (a fan-out takes loop turns)
        reused = number in self._retired.get(t.name, ())
        if reused:
            await self._ua([lu], REPORTED_LUNS_DATA_CHANGED, t.name)
        t.luns[number] = lu
        self._tc(t.name).luns.append(LunConfig(number, opts))
        # the others' begin in the step of the change (one asynchronous event
        # per nexus in all: a guest's event queue is short), detect follows
        await self._ua(others, REPORTED_LUNS_DATA_CHANGED, t.name, events=not reused)
        await self._redetect()
        return lu

    async def _moved_ram(self, target: str, lun: int, o: LunOptions) -> Backend | None:
        """The store of a RAM LU this reload removed at another number of the
        same target, or from another target, its id this one's: its data goes
        with its identity, as a file's does (0205, 0249); an edited size that grows it is applied, a shrink
        is not (it would lose data, which only `lun resize --force` may)."""
        backend = self._moving.pop((target, o.id), None) if o.kind == "ram" and o.id is not None else None
        if backend is None:
            return None
        old = backend.size()
        if o.size is not None and o.size > old:
            await self._in_thread(backend.resize, o.size)   # (pages: in a thread)
        elif o.size is not None and o.size < old:
            self._pending.append(f"target {target} LUN {lun}: kept at {old} bytes: shrinking it to {o.size} "
                                 f"loses data: `scsi-target lun resize --force` does that")
            o.size = old   # (what is served, as `lun list` and the next save say it)
        log.info("target %s LUN %d: RAM LU %s keeps its data at its new number", target, lun, o.id)
        return backend

    async def _identify(self, target: str, lun: int, o: LunOptions, backend: Any) -> None:
        """A LUN entry without `id` (`lun add`, or added by hand) gets one once
        its store opened (persist.new_id: a stat, in a thread); an RBD LU
        records its image's (0281)."""
        if o.kind != "rbd" and o.id is None:
            o.id = await self._in_thread(new_id, target, lun, o)
            self._identified = True
        elif record_image(o, backend, f"target {target} LUN {lun}"):
            self._identified = True

    async def _retry_offline(self, t: Target, lu: LogicalUnit, applied: list[str], pending: list[str],
                             path: str | None) -> None:
        """A reload opens an offline LU's store again (the disk mounted, the
        file restored, or `path` corrected in its entry): once it opens, the
        LU is served, under its identity, and its nexuses learn it as a newly
        loaded medium (06/28/00), then its capacity (06/2A/09) (0280, 0281)."""
        o = lu.options
        want = o if path == o.path else dataclasses.replace(o, path=path)
        if want is not o:   # one store, one LU (0277)
            lus = [x for x in await self._lus() if x is not lu]
            owner = await self._in_thread(_serving, want, lus)
            if owner is not None:
                pending.append(f"target {t.name} LUN {lu.lun}: {path} already backs target {owner.target} "
                               f"LUN {owner.lun}")
                return
        why = await self._closed(want)
        if why:
            pending.append(f"target {t.name} LUN {lu.lun} is still offline: {why}")
            return
        try:
            backend = await self._in_thread(open_store, want, not served_before(want))
        except CannotOpen as e:
            pending.append(f"target {t.name} LUN {lu.lun} is still offline: {e}")
            return
        if getattr(backend, "lock_acquire", None) is not None:
            # shared storage is served only with its lock and reservations, which
            # the gateway takes before an LU is visible (0403): not in place
            await self._in_thread(backend.close)
            pending.append(f"target {t.name} LUN {lu.lun} opens now: restart, or `lun remove` and "
                           f"`lun add` it, to serve it")
            return
        o.path = want.path
        await self._identify(t.name, lu.lun, o, backend)   # a file the start could not create
        lu.go_online(backend)
        self.em.target_luns(t.name).renamed(lu)   # its designator may be new: EXTENDED COPY finds it by that (0296)
        log.info("target %s LUN %d (%s %s) is online", t.name, lu.lun, o.kind, o.path or "")
        await self._ua([lu], NOT_READY_TO_READY_CHANGE, t.name)
        # and its capacity, 0 while offline: Linux's sd acts on this one (a
        # capacity change event), not on a non-removable disk's 28/00
        await self._ua([lu], CAPACITY_DATA_CHANGED, t.name)
        await self._redetect()   # (after: its walk yields, and no command may find the LU before its UA)
        applied.append(f"target {t.name} LUN {lu.lun} online")

    async def lun_remove(self, lun: int, target: str | None = None) -> dict[str, Any]:
        return await self._remove_lun(lun, target)

    async def _remove_lun(self, lun: int, target: str | None, renumbered: bool = False) -> dict[str, Any]:
        """`renumbered`: the LU's identity is added again under another number
        (a reload): its reservations stay for it (0218)."""
        t, lu = self._lu(target, lun)
        await self._check_file()
        others = [o for o in await self._lus([t]) if o is not lu]   # walked before the change: a walk yields
        del t.luns[lu.lun]
        self._retired.setdefault(t.name, set()).add(lu.lun)
        tc = self._tc(t.name)
        tc.luns = [lc for lc in tc.luns if lc.lun != lu.lun]
        self._close_later(lu, renumbered)
        await self._ua(others, REPORTED_LUNS_DATA_CHANGED, t.name)
        await self._redetect()
        return {"target": t.name, "lun": lu.lun, "saved": await self._persist()}

    async def _closed(self, opts: LunOptions) -> str | None:
        """Wait (CLOSE_WAIT at most) for a removed LU on the store `opts` names,
        or of its identity, to close: until then the STML itself holds it, and
        a block device held refuses a new open (O_EXCL, 0273), a file too (its
        lock, 0216), and its reservations are still being saved (0218), as a
        LUN moved to another number by one reload would find. Why not, when it
        is still closing."""
        if not self._closing:
            return None
        lu = next((x for x in self._closing if opts.id is not None and x.options.id == opts.id), None)
        if lu is None and opts.kind in ("file", "rbd"):
            lu = await self._in_thread(_serving, opts, list(self._closing))
        closing = self._closing.get(lu) if lu is not None else None
        if lu is None or closing is None:
            return None
        await asyncio.wait([closing], timeout=CLOSE_WAIT)
        if not closing.done() and opts.kind == "ram":   # its store waits for this entry (0708)
            return (f"RAM LU {opts.id}: removed from target {lu.target} LUN {lu.lun}, whose commands are still "
                    f"ending: reload again once it is closed (its data is kept for this LUN)")
        if not closing.done():
            return (f"{opts.path or f'LU {opts.id}'}: removed from target {lu.target} LUN {lu.lun}, whose "
                    f"backend is still closing (a flush under way): try again once it is closed")
        return None

    def _close_later(self, lu: LogicalUnit, renumbered: bool = False) -> None:
        """A removed LU (out of its target: no new command reaches it): its
        commands in flight finish, as LIO lets them, for LUN_DRAIN at most;
        those still there then are aborted, as a LUN RESET's are (TASK
        ABORTED; the front end drops their later data), and its backend
        closes once nothing can call it (docs/decisions/0254, 0219)."""
        if Gateway.is_shared(lu):   # (every removal comes here: the gateway's index follows)
            self.gateway.forget(lu)
        # where a RAM LU's store goes is decided now, while the reload that
        # removes it runs: its close may outlast that reload (0708)
        home = self._ram_home(lu)
        closing = asyncio.get_running_loop().create_task(self._close_when_idle(lu, renumbered, home))
        self.closing_lus.add(lu)
        self._closing[lu] = closing
        closing.add_done_callback(lambda _: self._closing.pop(lu, None))

    async def _close_when_idle(self, lu: LogicalUnit, renumbered: bool, home: tuple[str, str] | None) -> None:
        """Flush and close once no backend call of the LU runs or can start:
        its tasks have finished or were aborted (each waits for the call it
        had under way), its job is over, and no other LU's EXTENDED COPY has
        a call of it queued or running (one checks that the LU is still there
        before each call). No time limit on that last wait: a call hung in
        the backend keeps it open, as it must."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LUN_DRAIN
        t = self.em.targets.get(lu.target)
        draining = t.draining if t is not None else set()
        draining.add(lu)
        try:
            while lu.task_set.tasks and loop.time() < deadline:   # none new: the LU is out of its target
                await asyncio.sleep(DRAIN_POLL)
        finally:
            draining.discard(lu)
        runners = self.em.abort_lu(lu)
        if runners:
            log.warning("%s LUN %d removed: %d command(s) still in flight after %gs aborted (TASK ABORTED)",
                        lu.target, lu.lun, len(runners), LUN_DRAIN)
        await lu.stop_jobs()   # a background SANITIZE ends with its LUN
        if runners:
            await asyncio.wait(runners)
        while self.em.workers.pending(id(lu)):
            await asyncio.sleep(0.05)

        def flush_and_close() -> None:
            try:
                lu.backend.flush()
            except (BackendError, OSError) as e:
                log.error("%s LUN %d removed: its last flush failed: %s", lu.target, lu.lun, e)
            try:
                lu.backend.close()
            except (BackendError, OSError) as e:   # e.g. EIO from close(2) on NFS
                log.error("%s LUN %d removed: closing its backend failed: %s", lu.target, lu.lun, e)

        if home is not None:   # its pages are its data: kept for its new place (0205, 0249)
            self._moving[home] = lu.backend
            self.closing_lus.discard(lu)
            where = "" if home[0] == lu.target else f" to target {home[0]}"
            if self._reloading:
                log.info("%s LUN %d removed: its RAM moves with its id%s", lu.target, lu.lun, where)
            else:   # its add was refused as still closing: the next reload takes it (0708)
                log.warning("%s LUN %d removed: its RAM moves with its id%s at the next reload (it "
                            "closed after the last one ended)", lu.target, lu.lun, where)
        else:
            await self._in_thread(flush_and_close)
            self.closing_lus.discard(lu)
            log.info("%s LUN %d removed: its backend is closed", lu.target, lu.lun)
        if lu.pr is not None:   # a later LU is another LU: it starts with no reservations (0218)
            await pr.state(lu).forget(keep=renumbered)

    def _ram_home(self, lu: LogicalUnit) -> tuple[str, str] | None:
        """(target, id) of the add to take the store of a RAM LU the reload
        under way removed, or None (it is freed): the target of the entry
        that names its id, its own (renumbered, 0205) or another (moved,
        0249)."""
        o = lu.options
        if not self._reloading or o.kind != "ram" or o.id is None:
            return None
        home = self._homes.get(o.id)
        return (home, o.id) if home is not None else None

    async def lun_resize(self, lun: int, size: Any, target: str | None = None,
                         force: bool = False) -> dict[str, Any]:
        """Grow a LUN, or shrink it with `force` (the data past the new end is lost)."""
        t, lu = self._lu(target, lun)
        nbytes = parse_size(size, "size")
        if nbytes % lu.block_size:
            raise MgmtError(f"{nbytes} is not a multiple of the block size {lu.block_size}")
        if lu.offline is not None:
            raise MgmtError(f"{t.name} LUN {lu.lun} is offline ({lu.offline}): fix it and `config reload` first")
        if not getattr(lu.backend, "can_resize", False):
            raise MgmtError(f"the backend of {t.name} LUN {lu.lun} cannot be resized")
        old = lu.blocks * lu.block_size
        why = ram_overcommit(await self._ram() - old + nbytes) if lu.options.kind == "ram" and nbytes > old else None
        if why:
            raise MgmtError(why)
        if nbytes < old and not force:
            raise MgmtError(f"shrinking {t.name} LUN {lu.lun} from {old} to {nbytes} bytes loses the data "
                            f"past the new end: pass --force")
        await self._check_file()
        try:
            await self._in_thread(lu.backend.resize, nbytes)
        except (BackendError, OSError) as e:
            raise MgmtError(f"resize failed: {e}") from None
        # what is served: a block device whole, in whole blocks, the size asked for within a
        # block of it (0284); saved and reported as served
        nbytes = lu.backend.size() // lu.block_size * lu.block_size
        if lu.options.kind != "rbd":   # an image's size is its own, on every gateway (0208)
            lu.options.size = nbytes   # the running configuration's LunOptions (shared with its LunConfig)
        await self._ua([lu], CAPACITY_DATA_CHANGED, t.name)
        await self._redetect()
        return {"target": t.name, "lun": lu.lun, "old_size": old, "size": nbytes, "saved": await self._persist()}

    async def lun_reset_error(self, lun: int, target: str | None = None) -> dict[str, Any]:
        """Let a LUN whose sync failed sync again: the administrator has seen
        that writes acknowledged before the failure may be lost (and dealt
        with it: restored, checked, or accepted). Until then every sync, FUA
        and write-through write fails (decision 0256). Nothing to clear is no
        error: scripts may clear unconditionally."""
        t, lu = self._lu(target, lun)
        error, lu.backend.sync_error = lu.backend.sync_error, None
        if error is not None:
            log.warning("%s LUN %d: sync error cleared by the administrator (%s); syncs run again",
                        t.name, lu.lun, error)
        return {"target": t.name, "lun": lu.lun, "cleared": error}

    # ------------------------------------------------------------ access
    async def _set_access(self, t: Target, key: str, value: Any) -> str:
        """key: the detect/access name (acl, chap, mutual); the running
        configuration's field is named as the file names it."""
        await self._check_file()
        t.access = {**t.access, key: value}
        setattr(self._tc(t.name), {"mutual": "mutual_chap"}.get(key, key), value)
        await self._redetect()
        return await self._persist()

    async def acl_add(self, initiator: str, target: str | None = None) -> dict[str, Any]:
        t = self._target(target)
        name = check_iqn(initiator, "initiator")
        acl = list(t.access.get("acl") or [])
        if name in acl:
            raise MgmtError(f"{name} is already in the ACL of {t.name}")
        acl.append(name)
        saved, ended = await self._set_acl(t, acl)
        return {"target": t.name, "acl": acl, "sessions_ended": ended, "saved": saved}

    async def acl_remove(self, initiator: str, target: str | None = None,
                         allow_any: bool = False) -> dict[str, Any]:
        """An empty ACL admits any initiator, so taking out the last entry
        needs `allow_any`: whoever removes a host to keep it out must not let
        every host in instead (0276)."""
        t = self._target(target)
        acl = list(t.access.get("acl") or [])
        if initiator.lower() not in acl:
            raise MgmtError(f"{initiator} is not in the ACL of {t.name}")
        if acl == [initiator.lower()] and not allow_any:
            raise MgmtError(f"{initiator} is the last entry in the ACL of {t.name}: without it any "
                            f"initiator may log in; pass --allow-any to open the target to all")
        acl.remove(initiator.lower())
        saved, ended = await self._set_acl(t, acl)
        return {"target": t.name, "acl": acl, "sessions_ended": ended, "saved": saved}

    async def _set_acl(self, t: Target, acl: list[str]) -> tuple[str, int]:
        """A new ACL applies to the sessions that exist too (0275): those of
        initiators it leaves out end before the save, as they would at their
        next login; (the save's answer, how many sessions ended)."""
        await self._check_file()
        t.access = {**t.access, "acl": acl}
        self._tc(t.name).acl = acl
        await self._redetect()
        ended = await self._end_sessions(t.name, f"initiator not in the ACL of {t.name}",
                                         self.em.admitted(t.name))
        if ended:
            log.info("%s: ended %d session(s) of initiators the ACL no longer admits", t.name, ended,
                     extra=audit())
        return await self._persist(), ended

    async def chap_set(self, target: str | None = None, user: str | None = None,
                       secret: str | None = None, mutual: bool = False) -> dict[str, Any]:
        """Set (user and secret) or clear (neither) a target's CHAP credentials."""
        t = self._target(target)
        if (user is None) != (secret is None):
            raise MgmtError("give both --user and --secret, or neither to turn CHAP off")
        creds = parse_chap({"user": user, "secret": secret}, "chap") if user is not None else None
        if mutual and creds and not t.access.get("chap"):
            raise MgmtError(f"mutual CHAP of {t.name} {MUTUAL_NEEDS_CHAP}: "
                            f"`chap set --user U --secret S` first")
        if not mutual and not creds and t.access.get("mutual"):
            raise MgmtError(f"{t.name} has mutual CHAP, which needs CHAP: turn it off first "
                            f"(`chap set --mutual`)")
        if mutual:
            return {"target": t.name, "mutual_chap": "set" if creds else "off",
                    "saved": await self._set_access(t, "mutual", creds)}
        saved, ended = await self._set_chap(t, creds)
        return {"target": t.name, "chap": "set" if creds else "off", "sessions_ended": ended, "saved": saved}

    async def _set_chap(self, t: Target, creds: dict[str, str] | None) -> tuple[str, int]:
        """CHAP turned on applies to the sessions that exist too (0288): the
        target asked none of them to authenticate, so all its iSCSI ones end, before
        the save, as an ACL change ends those it leaves out (0275). New
        credentials for a target that had CHAP leave its sessions be: they
        authenticated with the credentials of their time (0275)."""
        await self._check_file()
        was, t.access = t.access.get("chap"), {**t.access, "chap": creds}
        self._tc(t.name).chap = creds
        await self._redetect()
        ended = 0
        if creds and not was:   # CHAP is iSCSI's: a VM's (vhost) or a loopback client's nexus stays
            ended = await self._end_sessions(t.name, f"{t.name} now requires CHAP", frozenset(), CHAP_KINDS)
            if ended:
                log.info("%s: ended %d session(s) that logged in without CHAP", t.name, ended, extra=audit())
        return await self._persist(), ended


async def _set_alias(m: Management, t: Target, alias: str) -> None:
    t.alias = m._tc(t.name).alias = alias
    await m._redetect()


async def _set_target_reset(m: Management, t: Target, allowed: bool) -> None:
    """Read by the emulator when a TARGET WARM/COLD RESET arrives: no one to tell."""
    t.target_reset = m._tc(t.name).target_reset = allowed


# the target settings (TargetConfig fields) a reload applies live, and how;
# any other field that changes is reported as needing a restart
_TARGET_SETTERS: dict[str, Callable[[Management, Target, Any], Awaitable[Any]]] = {
    "alias": _set_alias,
    "acl": lambda m, t, v: m._set_acl(t, v),
    "chap": lambda m, t, v: m._set_chap(t, v),
    "mutual_chap": lambda m, t, v: m._set_access(t, "mutual", v),
    "target_reset": _set_target_reset,
}


async def _stepped(items: Iterable[T]) -> AsyncIterator[T]:
    """`items`, FANOUT_STEP between turns of the event loop, as the unit
    attention fan-out walks nexuses (0264): how management walks whatever
    grows with the LUNs or sessions (0267), so none holds up the sessions in
    one step. Each walk starts on a turn of its own (two walks in a row never
    share one)."""
    for i, item in enumerate(items):
        if not i % FANOUT_STEP:
            await asyncio.sleep(0)
        yield item


def _image_sized(target: str, lu: LogicalUnit, o: LunOptions, pending: list[str]) -> None:
    """An RBD entry's `size` once its image is served: no reload applies it
    (the image's size is the truth, which any gateway may have changed), and
    the next save drops it from the file (0208)."""
    served = lu.blocks * lu.block_size
    if o.size != served:
        pending.append(f"target {target} LUN {lu.lun}: an RBD LUN's size is its image's ({served} bytes), not "
                       f"its entry's `size` (dropped from the file): `scsi-target lun resize` resizes the image")
    o.size = None


def _abandoned_save_failed(target: Path, error: BaseException) -> None:
    """A save the stop abandoned (finish_saves) failed later: the file is
    from before it, which the stop's line said only may be so."""
    log.error("stopping: the abandoned save of %s failed: %s; the change it saves is missing "
              "from the file", target, error)


def _hold(config: Config, new: Config) -> None:
    hold(config, model(new))


async def _free_lun(t: Target) -> int:
    """The lowest LUN number the target does not use, found in steps: a target
    may use all 16,384."""
    async for n in _stepped(range(16384)):
        if n not in t.luns:
            return n
    raise MgmtError(f"target {t.name} uses every LUN number (0-16383)")


def _shown(config: Config) -> str:
    """config_show's text, secrets hidden (0286). Reads the file: off the loop."""
    return hide_secrets(render(config, read_document(config.path) if config.path is not None else None))


def _diff(config: Config, path: Path) -> dict[str, Any]:
    """config_diff's answer. Reads the file: off the loop."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    running = render(config, read_document(path) if text else None)
    diff = "".join(difflib.unified_diff(hide_secrets(text).splitlines(True), hide_secrets(running).splitlines(True),
                                        f"{path} (file)", "running configuration"))
    if not diff and text != running:   # they differ only in a secret: say so, not what (0286)
        diff = SECRET_DIFFERS
    return {"path": str(path), "same": not diff, "diff": diff, "edited": file_digest(path) != config.digest}


def _unlinked(lus: list[LogicalUnit]) -> set[tuple[str, int]]:
    """(target, LUN) of the LUs whose file was deleted or replaced under them
    (`mv` over it): served from the open file still. An fstat each: off the loop."""
    return {(lu.target, lu.lun) for lu in lus if getattr(lu.backend, "unlinked", lambda: False)()}


def _read_state(data_dir: Path, target: str, lun: int, ident: str | None,
                others: list[LogicalUnit]) -> tuple[pr.FileStore, Any]:
    """An added LU's APTPL file (pr.find_state, never taking the files of the
    target's `others`) and what it holds. Blocking: a listing and a read."""
    own = {pr.state_path(data_dir, lu.target, lu.lun, lu.options.id) for lu in others}
    return pr.read_file_state(pr.find_state(data_dir, target, lun, ident, own))


def _serving(opts: LunOptions, lus: list[LogicalUnit]) -> LogicalUnit | None:
    """The LU already on the store `opts` names, however either path spells it (0277)."""
    store = opts.store()
    return next((lu for lu in lus if lu.options.path == opts.path or lu.options.store() == store), None)


def _path_corrected(a: LunOptions, b: LunOptions) -> bool:
    """Whether a file LUN's entry differs from what runs in its path alone
    (and size): an offline LU's path corrected in the file (0281)."""
    return a.kind == b.kind == "file" and not _differs_beyond_size(dataclasses.replace(a, path=b.path), b)


def _changed(a: LunOptions, b: LunOptions) -> list[str]:
    """The settings two LUN entries differ in, beyond the size, the id and
    what the STML records itself (RECORDED)."""
    return [f.name for f in dataclasses.fields(LunOptions)
            if f.name not in ("size", "id") and f.name not in RECORDED
            and getattr(a, f.name) != getattr(b, f.name)]


def _differs_beyond_size(a: LunOptions, b: LunOptions) -> bool:
    """Whether two LUN settings differ in more than the size (and the identity,
    which a reload compares on its own: 0281, 0298)."""
    return bool(_changed(a, b))
