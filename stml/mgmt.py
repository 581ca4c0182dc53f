"""Live management: the `mgmt` message family of the contract (see stml.api).

A management client connects to the STML's endpoint like a front end (over
TCP, with a CURVE key the STML lists) and sends {op: "mgmt", id, cmd, args};
the answer is {op: "mgmt_reply", id, ok, result | error}. Changes apply to
the running STML at once (front ends get a new `detect`, initiators the unit
attentions SPC names) and are written to the config file atomically; a file
edited by hand since the STML loaded it is not overwritten.
"""
from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from backends import BackendError, open_backend
from stml.config import (ConfigError, _chap, _check_iqn, file_digest, holds_secrets, lun_options,
                         parse_lun_spec, parse_size)
from stml.emulator import Target
from stml.lu import LogicalUnit

log = logging.getLogger("stml.mgmt")

REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
CAPACITY_CHANGED = (0x2A, 0x09)
INQUIRY_DATA_CHANGED = (0x3F, 0x03)


class MgmtError(Exception):
    """A refused management request; str() is what the user sees."""


def atomic_write(path: Path, data: bytes, secret: bool) -> None:
    """Replace `path` with `data` atomically. The temporary file is created afresh
    (O_EXCL: never a stale file or a symlink) with mode 0600, so secrets are never
    readable by others, not even for a moment; it then takes the old file's mode,
    without group/other bits when `data` holds secrets. A new file stays 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)          # left by a crash: O_EXCL below must create it anew
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o600
        os.fchmod(fd, mode & 0o700 if secret else mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Management:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.em = server.emulator
        self.config = server.config
        self._lock = asyncio.Lock()   # one change at a time (config file writes in order)
        self._cmds: dict[str, Callable] = {
            "status": self.status, "target_list": self.target_list, "target_add": self.target_add,
            "target_remove": self.target_remove, "lun_list": self.lun_list, "lun_add": self.lun_add,
            "lun_remove": self.lun_remove, "lun_resize": self.lun_resize,
            "portal_list": self.portal_list, "portal_add": self.portal_add,
            "portal_remove": self.portal_remove, "acl_add": self.acl_add, "acl_remove": self.acl_remove,
            "chap_set": self.chap_set, "session_list": self.session_list,
            "session_drop": self.session_drop, "frontend_list": self.frontend_list,
        }

    # ------------------------------------------------------------ transport
    def handle(self, ident: bytes, header: dict[str, Any]) -> None:
        asyncio.get_running_loop().create_task(self._answer(ident, header))

    async def _answer(self, ident: bytes, h: dict[str, Any]) -> None:
        rid = h.get("id")
        cmd = h.get("cmd")
        fn = self._cmds.get(cmd) if isinstance(cmd, str) else None
        try:
            if fn is None:
                raise MgmtError(f"unknown management command {cmd!r} (known: {', '.join(sorted(self._cmds))})")
            args = h.get("args") or {}
            if not isinstance(args, dict):
                raise MgmtError("args must be a map")
            async with self._lock:
                result = await fn(**args)
            reply = {"op": "mgmt_reply", "id": rid, "ok": True, "result": result}
        except (MgmtError, ConfigError) as e:
            reply = {"op": "mgmt_reply", "id": rid, "ok": False, "error": str(e)}
        except TypeError as e:
            reply = {"op": "mgmt_reply", "id": rid, "ok": False, "error": f"bad arguments for {cmd}: {e}"}
        except Exception as e:  # a management call must never take the STML down
            log.exception("management command %s failed", cmd)
            reply = {"op": "mgmt_reply", "id": rid, "ok": False, "error": f"internal error: {e}"}
        if reply["ok"] and isinstance(cmd, str) and cmd not in ("status",) and not cmd.endswith("_list"):
            log.info("management: %s %s", cmd, {k: v for k, v in (h.get("args") or {}).items()
                                                 if k != "secret"})
        self.server._send(ident, reply, [])

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

    def _lu(self, target: str | None, lun: int) -> tuple[Target, LogicalUnit]:
        t = self._target(target)
        lu = t.luns.get(int(lun))
        if lu is None:
            raise MgmtError(f"target {t.name} has no LUN {lun} (LUNs: {', '.join(map(str, t.luns)) or 'none'})")
        return t, lu

    def _nexus_keys(self, target: str) -> list[str]:
        return [n.key for fe in self.em.front_ends.values() for n in fe.nexuses.values()
                if n.target == target]

    def _redetect(self) -> None:
        """Front ends learn the new inventory (contract: detect, sent unasked)."""
        header = self.em.detect_header()
        for fe in list(self.em.front_ends.values()):
            self.em.send(fe.ident, header, [])

    def _ua(self, lu: LogicalUnit, asc: tuple[int, int], target: str) -> None:
        keys = self._nexus_keys(target)
        if keys:
            self.em.establish_ua(lu, asc, keys)

    def _check_file(self) -> None:
        """Refuse when the config file changed on disk since it was loaded."""
        path = self.config.path
        if path is None:
            return
        if file_digest(path) != self.config.digest:
            raise MgmtError(f"{path} was edited since the STML loaded it: refusing to overwrite it "
                            f"(restart the STML to load the edit, or undo it)")

    def _persist(self, change: Callable[[dict[str, Any]], None]) -> str:
        """Apply `change` to the file's TOML and write it atomically."""
        import tomli_w
        path = self.config.path
        if path is None:
            return "not saved: the STML runs without --config"
        self._check_file()
        raw = copy.deepcopy(self.config.raw)
        change(raw)
        text = tomli_w.dumps(raw)
        atomic_write(path, text.encode(), holds_secrets(raw))
        self.config.raw = raw
        self.config.digest = hashlib.sha256(text.encode()).hexdigest()
        return f"saved to {path}"

    @staticmethod
    def _raw_target(raw: dict[str, Any], name: str) -> dict[str, Any]:
        for t in raw.setdefault("target", []):
            if str(t.get("name", "")).lower() == name:
                return t
        t = {"name": name}
        raw["target"].append(t)
        return t

    async def _in_thread(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.em.executor, fn, *args)

    # ------------------------------------------------------------ reads
    async def status(self) -> dict[str, Any]:
        snap = self.server.metrics.snapshot(self.em)
        snap["endpoints"] = self.server.endpoints
        snap["config"] = str(self.config.path) if self.config.path else None
        snap["targets"] = len(self.em.targets)
        snap["gateway"] = await self.server.gateway.status()
        return snap

    async def target_list(self) -> list[dict[str, Any]]:
        return [{"name": t.name, "alias": t.alias, "luns": len(t.luns),
                 "acl": list(t.access.get("acl") or []), "chap": bool(t.access.get("chap")),
                 "sessions": len([k for k in self._nexus_keys(t.name)])}
                for t in self.em.targets.values()]

    async def lun_list(self, target: str | None = None) -> list[dict[str, Any]]:
        ts = [self._target(target)] if target else list(self.em.targets.values())
        return [{"target": t.name, "lun": lu.lun, "backend": lu.options.kind,
                 "path": lu.options.path, "size": lu.blocks * lu.block_size,
                 "block_size": lu.block_size, "ro": lu.options.ro}
                for t in ts for lu in t.luns.values()]

    async def portal_list(self) -> list[dict[str, Any]]:
        from stml.api import parse_portal
        return [dict(zip(("host", "port", "tpgt"), parse_portal(p)), portal=p) for p in self.config.portals]

    async def session_list(self) -> list[dict[str, Any]]:
        return self.server.metrics.snapshot(self.em)["sessions"]

    async def frontend_list(self) -> list[dict[str, Any]]:
        return self.server.metrics.snapshot(self.em)["front_ends"]

    # ------------------------------------------------------------ portals
    def _set_portals(self, portals: list[str]) -> str:
        """The STML's portal list changes: front ends that follow it open or close
        listeners (detect), ALUA learns the portal groups, the file keeps it."""
        from stml.server import portal_entries, portal_groups
        self._check_file()
        self.config.portals = portals
        self.em.portals = portal_entries(portals)
        self.em.configured_tpgs = set(portal_groups(self.config))
        self._redetect()
        return self._persist(lambda raw: raw.__setitem__("portals", list(portals)))

    async def portal_add(self, portal: str) -> dict[str, Any]:
        from stml.api import parse_portal
        try:
            host, port, tpgt = parse_portal(str(portal))
        except ValueError as e:
            raise MgmtError(str(e)) from None
        for p in self.config.portals:
            h, pt, t = parse_portal(p)
            if (h, pt) == (host, port) and port != 0:
                raise MgmtError(f"portal {p} already listens on {portal.split(',')[0]}")
        saved = self._set_portals([*self.config.portals, portal])
        return {"portal": portal, "host": host, "port": port, "tpgt": tpgt, "saved": saved}

    async def portal_remove(self, portal: str) -> dict[str, Any]:
        from stml.api import parse_portal
        try:
            key = parse_portal(str(portal))
        except ValueError as e:
            raise MgmtError(str(e)) from None
        # "HOST:PORT" names the portal whatever its TPGT; "HOST:PORT,TPGT" must match it
        matches = [p for p in self.config.portals if parse_portal(p)[:2] == key[:2]
                   and ("," not in portal or parse_portal(p)[2] == key[2])]
        if not matches:
            raise MgmtError(f"no portal {portal} (portals: {', '.join(self.config.portals) or 'none'})")
        saved = self._set_portals([p for p in self.config.portals if p not in matches])
        return {"portal": matches[0], "saved": saved}

    # ------------------------------------------------------------ sessions
    async def session_drop(self, nexus: int, front_end: str | None = None) -> dict[str, Any]:
        """End one I_T nexus: the STML releases it (its tasks are aborted) and
        tells the owning front end to end the session (contract: drop_nexus)."""
        found = [n for fe in self.em.front_ends.values() for n in fe.nexuses.values()
                 if n.id == int(nexus) and front_end in (None, fe.name)]
        if not found:
            raise MgmtError(f"no session {nexus}" + (f" on front end {front_end}" if front_end else "")
                            + " (see `session list`)")
        if len(found) > 1:
            raise MgmtError(f"session {nexus} exists on several front ends "
                            f"({', '.join(n.fe.name for n in found)}): give --front-end")
        n = found[0]
        self.em.send(n.fe.ident, {"op": "drop_nexus", "nexus": n.id, "reason": "dropped by management"}, [])
        self.em._drop_nexus(n)
        return {"front_end": n.fe.name, "nexus": n.id, "initiator": n.initiator, "target": n.target}

    # ------------------------------------------------------------ targets
    async def target_add(self, name: str, alias: str = "") -> dict[str, Any]:
        name = _check_iqn(name, "target name")
        if name in self.em.targets:
            raise MgmtError(f"target {name} exists")
        self._check_file()
        t = Target(name, {}, alias, {"acl": [], "chap": None, "mutual": None})
        self.em.targets[name] = t
        self._redetect()
        saved = self._persist(lambda raw: self._raw_target(raw, name).update(
            {"alias": alias} if alias else {}))
        return {"target": name, "saved": saved}

    async def target_remove(self, name: str, force: bool = False) -> dict[str, Any]:
        t = self._target(name)
        live = self._nexus_keys(t.name)
        if live and not force:
            raise MgmtError(f"target {t.name} has {len(live)} session(s); pass --force to drop them")
        self._check_file()
        for fe in list(self.em.front_ends.values()):
            for n in [n for n in fe.nexuses.values() if n.target == t.name]:
                self.em._drop_nexus(n)
        del self.em.targets[t.name]
        self._redetect()
        for lu in t.luns.values():
            asyncio.get_running_loop().create_task(self._close_when_idle(lu))

        def change(raw: dict[str, Any]) -> None:
            raw["target"] = [x for x in raw.get("target", []) if str(x.get("name", "")).lower() != t.name]
        return {"target": t.name, "saved": self._persist(change)}

    # ------------------------------------------------------------ LUNs
    async def lun_add(self, spec: str, target: str | None = None, lun: int | None = None) -> dict[str, Any]:
        t = self._target(target)
        raw_lun = parse_lun_spec(spec, "lun spec")
        number = int(lun) if lun is not None else next(n for n in range(16384) if n not in t.luns)
        if not 0 <= number < 16384:
            raise MgmtError(f"{number} is not a LUN number (0-16383)")
        if number in t.luns:
            raise MgmtError(f"target {t.name} already has LUN {number}")
        opts = lun_options(raw_lun, f"LUN {number}", self.config.data_dir)
        if opts.kind in ("file", "rbd") and any(lu.options.kind == opts.kind and lu.options.path == opts.path
                                                for x in self.em.targets.values() for lu in x.luns.values()):
            raise MgmtError(f"{opts.path} already backs a LUN")
        self._check_file()
        try:
            backend = await self._in_thread(functools.partial(open_backend, opts.kind, opts.size, opts.path,
                                                              opts.ro, **(opts.ceph or {})))
        except (BackendError, ValueError, OSError) as e:
            raise MgmtError(f"cannot open the backend: {e}") from None
        if backend.size() < opts.block_size:
            backend.close()
            raise MgmtError("backing store smaller than one block")
        lu = LogicalUnit(t.name, number, backend, opts, self.em.templates["disk"])
        if getattr(backend, "lock_acquire", None) is not None:
            try:   # shared storage: served once this gateway holds its lock
                await self.server.gateway.adopt(lu)
            except BackendError as e:
                await self._in_thread(backend.close)
                raise MgmtError(f"cannot serve {opts.path}: {e}") from None
        t.luns[number] = lu
        self._redetect()
        for other in t.luns.values():
            if other is not lu:   # the new LUN was never seen: nothing about it changed
                self._ua(other, REPORTED_LUNS_CHANGED, t.name)
        entry = {"lun": number, **{k: v for k, v in raw_lun.items()}}
        saved = self._persist(lambda raw: self._raw_target(raw, t.name).setdefault("lun", []).append(entry))
        return {"target": t.name, "lun": number, "size": lu.blocks * lu.block_size, "saved": saved}

    async def lun_remove(self, lun: int, target: str | None = None) -> dict[str, Any]:
        t, lu = self._lu(target, lun)
        self._check_file()
        del t.luns[lu.lun]
        self._redetect()
        for other in t.luns.values():
            self._ua(other, REPORTED_LUNS_CHANGED, t.name)
        asyncio.get_running_loop().create_task(self._close_when_idle(lu))

        def change(raw: dict[str, Any]) -> None:
            rt = self._raw_target(raw, t.name)
            rt["lun"] = [x for i, x in enumerate(rt.get("lun", [])) if x.get("lun", i) != lu.lun]
        return {"target": t.name, "lun": lu.lun, "saved": self._persist(change)}

    async def _close_when_idle(self, lu: LogicalUnit) -> None:
        deadline = time.monotonic() + 60
        while lu.task_set.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        def flush_and_close() -> None:
            lu.backend.flush()
            lu.backend.close()

        await self._in_thread(flush_and_close)

    async def lun_resize(self, lun: int, size: Any, target: str | None = None) -> dict[str, Any]:
        t, lu = self._lu(target, lun)
        nbytes = parse_size(size, "size")
        if nbytes % lu.block_size:
            raise MgmtError(f"{nbytes} is not a multiple of the block size {lu.block_size}")
        if not getattr(lu.backend, "can_resize", False):
            raise MgmtError(f"the backend of {t.name} LUN {lu.lun} cannot be resized")
        self._check_file()
        old = lu.blocks * lu.block_size
        try:
            await self._in_thread(lu.backend.resize, nbytes)
        except (BackendError, OSError) as e:
            raise MgmtError(f"resize failed: {e}") from None
        self._redetect()
        self._ua(lu, CAPACITY_CHANGED, t.name)

        def change(raw: dict[str, Any]) -> None:
            rt = self._raw_target(raw, t.name)
            luns = rt.setdefault("lun", [])
            for i, x in enumerate(luns):
                if x.get("lun", i) == lu.lun:
                    x["size"] = nbytes
                    return
            o = lu.options   # a LUN the file does not describe (it came from --lun)
            luns.append({"lun": lu.lun, "backend": o.kind, "size": nbytes,
                         **({"path": o.path} if o.path else {})})
        return {"target": t.name, "lun": lu.lun, "old_size": old, "size": nbytes,
                "saved": self._persist(change)}

    # ------------------------------------------------------------ access
    def _set_access(self, t: Target, key: str, value: Any, raw_key: str, raw_value: Any) -> str:
        self._check_file()
        t.access = {**t.access, key: value}
        self._redetect()

        def change(raw: dict[str, Any]) -> None:
            rt = self._raw_target(raw, t.name)
            if raw_value is None:
                rt.pop(raw_key, None)
            else:
                rt[raw_key] = raw_value
        return self._persist(change)

    async def acl_add(self, initiator: str, target: str | None = None) -> dict[str, Any]:
        t = self._target(target)
        name = _check_iqn(initiator, "initiator")
        acl = list(t.access.get("acl") or [])
        if name in acl:
            raise MgmtError(f"{name} is already in the ACL of {t.name}")
        acl.append(name)
        return {"target": t.name, "acl": acl, "saved": self._set_access(t, "acl", acl, "acl", acl)}

    async def acl_remove(self, initiator: str, target: str | None = None) -> dict[str, Any]:
        t = self._target(target)
        acl = list(t.access.get("acl") or [])
        if initiator.lower() not in acl:
            raise MgmtError(f"{initiator} is not in the ACL of {t.name}")
        acl.remove(initiator.lower())
        return {"target": t.name, "acl": acl,
                "saved": self._set_access(t, "acl", acl, "acl", acl or None)}

    async def chap_set(self, target: str | None = None, user: str | None = None,
                       secret: str | None = None, mutual: bool = False) -> dict[str, Any]:
        """Set (user and secret) or clear (neither) a target's CHAP credentials."""
        t = self._target(target)
        if (user is None) != (secret is None):
            raise MgmtError("give both --user and --secret, or neither to turn CHAP off")
        creds = _chap({"user": user, "secret": secret}, "chap") if user is not None else None
        key, raw_key = ("mutual", "mutual_chap") if mutual else ("chap", "chap")
        saved = self._set_access(t, key, creds, raw_key, creds)
        return {"target": t.name, "chap" if not mutual else "mutual_chap": "set" if creds else "off",
                "saved": saved}
