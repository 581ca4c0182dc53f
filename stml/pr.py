"""Reservations: SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations.

`PrState` is the per-logical-unit state machine, pure and socket-free: it
takes I_T nexus identities (anything with `initiator`, `target`, `tpg` and
`key`, like stml.task.Nexus) and decoded parameters, and returns the
unit attentions to establish and the nexuses whose tasks a PREEMPT AND ABORT
must abort. The OpEntry handlers at the bottom decode CDBs and parameter
lists, call it, and apply its effects through the engine's services
(stml.task.Services). Which commands a reservation lets through is the
opcode table's to say: each row's `conflicts` rule (stml.ops.Conflict).

Identities: a registration names an initiator port ("IQN,i,0xISID" for
iSCSI, or a bare name that stands for every port of that name, from a
TransportID of format 00b) and a target port (target name and portal group
tag, the relative target port identifier), or every target port (ALL_TG_PT).
A TransportID (SPEC_I_PT, REGISTER AND MOVE) names a port that may never have
logged in: when the target has an ACL, it must name an initiator the ACL admits.

APTPL: when the last REGISTER / REGISTER AND MOVE asked for it, the state is
written to its store after every change, and read back at start or when the
LU is added: by default `<data_dir>/pr/<id>_<lun>.json` (the LU's identity; see
state_path; write, fsync, rename, fsync of the directory; an LU renumbered
finds it under its old number, find_state), removed with the LU;
a store shared by several STMLs (`always`, e.g. an RBD image's metadata) takes
every change, APTPL or not, so that another STML can take over with it. A file that
cannot be read back refuses the start with a one-line error. The writes run
in a thread of their own (one for files, one for shared stores: a hung
cluster does not hold up files), one per LU at a time, each covering every
change made before it began: a PERSISTENT RESERVE OUT answers GOOD once a
write that covers it is on disk, and only then applies its unit attentions
and aborts; a burst of them costs a few writes, not one each, and no fsync
on the event loop. A write that fails puts the state back as it was before
the changes it covered (and any made since), and each of those commands
fails: what an initiator was told failed is not in force
(docs/decisions/0405-failed-reservation-saves-roll-back.md).

Costs: a parameter list is validated whole (lengths, names, the count
against MAX_REGISTRATIONS) before anything changes, in time linear in its
length; READ KEYS and READ FULL STATUS build only what the allocation length
can hold; registrations are found through an index by initiator name.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import re
import struct
import weakref
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from scsi_runtime.files import atomic_write, fsync_dir
from stml.api import DataDir
from stml.cdb import u16, u32
from stml.lu import LogicalUnit, legacy_id
from stml.ops import Conflict, OpEntry, relative_port_id, unit
from stml.sense import (
    ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES, INVALID_RELEASE, MANUAL_INTERVENTION_REQUIRED,
    NOT_READY, PARAMETER_LIST_LENGTH_ERROR, REGISTRATIONS_PREEMPTED, RESERVATION_CONFLICT, RESERVATIONS_PREEMPTED, RESERVATIONS_RELEASED,
    CheckCondition, StatusError, invalid_field, invalid_param,
)
from stml.task import FANOUT_STEP, Nexus, Task, must_finish, nexus_key

log = logging.getLogger("stml.pr")

# a failed save by errno, when not the STML's usual backend answer (a MEDIUM ERROR;
# a path error when fenced, 0404): no room for the state is no room for the
# registration (SPC-4's answer to a REGISTER it cannot keep), not the LU's
# medium out of space (decision 0271)
SAVE_ERRORS = {errno.ENOSPC: (ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES),
               errno.EDQUOT: (ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES)}

# reservation types (SPC-4 table 180)
WE, EA, WERO, EARO, WEAR, EAAR = 0x1, 0x3, 0x5, 0x6, 0x7, 0x8
TYPES = (WE, EA, WERO, EARO, WEAR, EAAR)
ALL_REGISTRANTS = (WEAR, EAAR)
REGISTRANTS_ONLY = (WERO, EARO)
WRITE_EXCLUSIVE = (WE, WERO, WEAR)

# PERSISTENT RESERVE OUT service actions
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_IGNORE, REGISTER_AND_MOVE = range(8)
# PERSISTENT RESERVE IN service actions
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)

# the conflict rules as plain ints: an enum member costs an attribute hook per command
_NONE, _SPC2, _WRITE = int(Conflict.NONE), int(Conflict.SPC2), int(Conflict.WRITE)

ISCSI_PROTOCOL = 0x5
MAX_REGISTRATIONS = 1024
MAX_NAME = 223          # bytes of an iSCSI name (RFC 7143 6.1)
# the longest iSCSI TransportID body: a name, ",i,0x", 12 ISID digits, NUL, padded to 4
MAX_TID_LENGTH = MAX_NAME + 5 + 12 + 1 + 3


class PrStoreError(Exception):
    """The APTPL file exists but cannot be used; str() is one line."""


class PrStore(Protocol):
    """Where an LU's reservation state is kept. Calls block (run off the loop)."""
    always: bool     # every change is written, not only under APTPL
    where: str       # for messages

    def read(self) -> Any: ...                    # the document, or None
    def write(self, doc: dict[str, Any] | None) -> bool: ...   # None: remove; whether one is left


class FileStore:
    """The APTPL file under the data directory."""

    always = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"file {path}"

    def read(self) -> Any:
        return json.loads(self.path.read_text()) if self.path.exists() else None

    def write(self, doc: dict[str, Any] | None) -> bool:
        return _write_state(self.path, doc)


def _name(initiator: str) -> str:
    return initiator.split(",i,", 1)[0]


def name_key(initiator: str) -> str:
    """The initiator name of a port or bare name, lowercased: what registrations
    and nexuses are indexed by (names compare without case)."""
    return _name(initiator).lower()


def initiator_matches(registered: str, port: str) -> bool:
    """A registration for "IQN,i,0xISID" names one port; a bare name names them all."""
    if ",i," in registered:
        return registered.lower() == port.lower()
    return registered.lower() == _name(port).lower()


@dataclass(eq=False)
class Registration:
    key: int
    initiator: str
    target: str
    tpg: int | None          # None: every target port (ALL_TG_PT)

    def matches(self, n: Any) -> bool:
        return (self.target == n.target and (self.tpg is None or self.tpg == n.tpg)
                and initiator_matches(self.initiator, n.initiator))

    def nexus_key(self) -> str | None:
        """The one I_T nexus this registration names, or None when it names several."""
        if self.tpg is None or ",i," not in self.initiator:
            return None
        return nexus_key(self.initiator, self.target, self.tpg)

    @functools.cached_property
    def tid_length(self) -> int:
        """Bytes of its TransportID (READ FULL STATUS sizes its answer without building it)."""
        return 4 + _tid_body_length(self.initiator)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "initiator": self.initiator, "target": self.target, "tpg": self.tpg}


@dataclass(frozen=True, slots=True)
class Port:
    """An I_T nexus identity, for unit tests and REGISTER AND MOVE."""
    initiator: str
    target: str
    tpg: int

    @property
    def key(self) -> str:
        return nexus_key(self.initiator, self.target, self.tpg)


@dataclass
class Effects:
    """What a PR change asks of the emulator: unit attentions per registration
    (or nexus key), and the registrations whose nexuses' tasks are aborted."""
    ua: list[tuple[Registration | str, tuple[int, int]]] = field(default_factory=list)
    aborted: list[Registration] = field(default_factory=list)


def conflict() -> StatusError:
    return StatusError(RESERVATION_CONFLICT)


@dataclass
class PrParams:
    """A decoded PERSISTENT RESERVE OUT basic parameter list."""
    rk: int = 0
    sark: int = 0
    spec_i_pt: bool = False
    all_tg_pt: bool = False
    aptpl: bool = False
    transport_ids: list[str] = field(default_factory=list)
    tid_at: list[int] = field(default_factory=list)   # where each starts in the list (field pointers)
    # the initiator names (lower case) the target's ACL admits, None: any. A
    # TransportID names a port that may never have logged in: it takes a key
    # only if it could (LIO wants a node ACL for it)
    acl: Container[str] | None = None
    # REGISTER AND MOVE
    unreg: bool = False
    rel_port: int = 0


class PrState:
    """Reservations of one logical unit."""

    def __init__(self, target: str = "", lun: int = 0) -> None:
        self.target = target
        self.lun = lun
        self.regs: list[Registration] = []
        self.type: int | None = None          # None: no persistent reservation
        self.holder: Registration | None = None   # None with a type: all registrants hold it
        self.generation = 0
        self.aptpl = False
        self.spc2: str | None = None          # nexus key holding an SPC-2 reservation
        self.store: PrStore | None = None      # where the state is kept (APTPL)
        self._index: dict[str, list[Registration]] | None = None   # by name_key, in regs order
        self.changes = 0                      # changes to persist (APTPL), and how many are written
        self.written = 0
        self.saves = 0                        # files written or removed (status shows it)
        self.stored = False                   # the store holds a document
        self._writer: asyncio.Task | None = None
        self._waiters: list[tuple[int, asyncio.Future]] = []
        # the state before the changes not yet written (what a failed write restores)
        self._base: dict[str, Any] | None = None

    # ---------------------------------------------------------------- queries
    def _changed(self) -> None:
        """The registration list changed: the index is made again on next use."""
        self._index = None

    def reg_of(self, n: Any) -> Registration | None:
        index = self._index
        if index is None:
            index = self._index = {}
            for r in self.regs:
                index.setdefault(name_key(r.initiator), []).append(r)
        exact = None
        for r in index.get(name_key(n.initiator), ()):
            if r.matches(n):
                if r.tpg is not None and ",i," in r.initiator:
                    return r
                exact = exact or r
        return exact

    def is_holder(self, n: Any) -> bool:
        if self.type is None:
            return False
        if self.type in ALL_REGISTRANTS:
            return self.reg_of(n) is not None
        return self.holder is not None and self.holder.matches(n)

    def conflicts(self, n: Any, rule: int) -> bool:
        """Whether a command whose opcode-table row has this conflict rule
        (stml.ops.Conflict) conflicts for nexus n. Per command on an LU with
        reservation state: the common case (none held) is two tests."""
        if self.spc2 is not None and self.spc2 != n.key:
            return rule != _NONE
        if self.type is None or rule <= _SPC2:
            return False
        if self.is_holder(n):
            return False
        if self.type in REGISTRANTS_ONLY + ALL_REGISTRANTS and self.reg_of(n) is not None:
            return False
        if self.type in WRITE_EXCLUSIVE:
            return rule == _WRITE
        return True

    # ---------------------------------------------------------------- SPC-2
    def reserve6(self, n: Any) -> None:
        if self.regs or (self.spc2 is not None and self.spc2 != n.key):
            raise conflict()
        self.spc2 = n.key

    def release6(self, n: Any) -> None:
        if self.regs:
            raise conflict()
        if self.spc2 == n.key:
            self.spc2 = None

    def drop_spc2(self, key: str | None = None) -> None:
        """LUN reset, target reset, I_T nexus loss: the SPC-2 reservation goes."""
        if key is None or self.spc2 == key:
            self.spc2 = None

    # ---------------------------------------------------------------- PROUT
    def _others(self, n: Any, ua: tuple[int, int], effects: Effects,
                regs: Iterable[Registration] | None = None) -> None:
        for r in (self.regs if regs is None else regs):
            if not r.matches(n):
                effects.ua.append((r, ua))

    def _remove(self, r: Registration, effects: Effects) -> None:
        """Unregister r; a reservation it held goes with it (or, for all
        registrants, with the last registrant)."""
        self.regs.remove(r)
        self._changed()
        if self.type is None:
            return
        if self.type in ALL_REGISTRANTS:
            if not self.regs:
                self._release_reservation()
        elif self.holder is r:
            released_type = self.type
            self._release_reservation()
            if released_type in REGISTRANTS_ONLY:
                for other in self.regs:
                    effects.ua.append((other, RESERVATIONS_RELEASED))

    def _release_reservation(self) -> None:
        self.type = None
        self.holder = None

    def prout(self, n: Any, sa: int, scope: int, rtype: int, p: PrParams) -> Effects:
        """One PERSISTENT RESERVE OUT service action from nexus n."""
        if self.spc2 is not None and self.spc2 != n.key:
            raise conflict()
        handler = {
            REGISTER: self._register, REGISTER_IGNORE: self._register,
            RESERVE: self._reserve, RELEASE: self._release, CLEAR: self._clear,
            PREEMPT: self._preempt, PREEMPT_AND_ABORT: self._preempt,
            REGISTER_AND_MOVE: self._register_and_move,
        }.get(sa)
        if handler is None:
            raise invalid_field(1, 4)
        return handler(n, sa, scope, rtype, p)

    def _register(self, n: Any, sa: int, scope: int, rtype: int, p: PrParams) -> Effects:
        effects = Effects()
        reg = self.reg_of(n)
        if sa == REGISTER_IGNORE and p.spec_i_pt:
            raise invalid_param(20, 3)
        if reg is None:
            if sa == REGISTER and p.rk != 0:
                raise conflict()
            if p.sark == 0:
                return effects   # unregistering what is not registered: nothing changes
            tpg = None if p.all_tg_pt else n.tpg
            new = [Registration(p.sark, n.initiator, n.target, tpg)]
            # one pass with a set of the names already there: linear in the list,
            # refused at the first registration past the cap, before any change
            seen = {r.initiator for r in self.regs if r.target == n.target}
            seen.add(n.initiator)
            full = len(self.regs) + 1 > MAX_REGISTRATIONS
            for i, tid in enumerate(p.transport_ids):
                if p.acl is not None and name_key(tid) not in p.acl:
                    raise invalid_param(p.tid_at[i])
                if full:
                    break
                if tid not in seen:
                    seen.add(tid)
                    full = len(self.regs) + len(new) >= MAX_REGISTRATIONS
                    new.append(Registration(p.sark, tid, n.target, tpg))
            if full:
                raise CheckCondition(ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES)
            self.regs.extend(new)
            self._changed()
        else:
            if sa == REGISTER and p.rk != reg.key:
                raise conflict()
            if p.spec_i_pt:
                raise invalid_param(20, 3)
            if p.sark == 0:
                self._remove(reg, effects)
            else:
                reg.key = p.sark
        self.aptpl = p.aptpl
        self.generation += 1
        return effects

    def _registered(self, n: Any, rk: int) -> Registration:
        reg = self.reg_of(n)
        if reg is None or reg.key != rk:
            raise conflict()
        return reg

    @staticmethod
    def _check_type(scope: int, rtype: int) -> None:
        if scope != 0:
            raise invalid_field(2, 7)
        if rtype not in TYPES:
            raise invalid_field(2, 3)

    def _reserve(self, n: Any, sa: int, scope: int, rtype: int, p: PrParams) -> Effects:
        reg = self._registered(n, p.rk)
        self._check_type(scope, rtype)
        if self.type is not None:
            if self.is_holder(n) and self.type == rtype:
                return Effects()
            raise conflict()
        self.type = rtype
        self.holder = None if rtype in ALL_REGISTRANTS else reg
        return Effects()

    def _release(self, n: Any, sa: int, scope: int, rtype: int, p: PrParams) -> Effects:
        self._registered(n, p.rk)
        effects = Effects()
        if self.type is None or not self.is_holder(n):
            return effects
        if scope != 0 or rtype != self.type:
            raise CheckCondition(ILLEGAL_REQUEST, INVALID_RELEASE)
        released = self.type
        self._release_reservation()
        if released not in (WE, EA):
            self._others(n, RESERVATIONS_RELEASED, effects)
        return effects

    def _clear(self, n: Any, sa: int, scope: int, rtype: int, p: PrParams) -> Effects:
        self._registered(n, p.rk)
        effects = Effects()
        self._others(n, RESERVATIONS_PREEMPTED, effects)
        self.regs.clear()
        self._changed()
        self._release_reservation()
        self.generation += 1
        return effects

    def _preempt(self, n: Any, sa: int, scope: int, rtype: int, p: PrParams) -> Effects:
        mine = self._registered(n, p.rk)
        effects = Effects()
        abort = sa == PREEMPT_AND_ABORT

        def remove(gone: list[Registration]) -> list[Registration]:
            """Unregister these, in one pass over the list (not one per registration)."""
            if gone:
                going = set(map(id, gone))
                self.regs = [r for r in self.regs if id(r) not in going]
                self._changed()
                effects.ua.extend((r, REGISTRATIONS_PREEMPTED) for r in gone)
            return gone

        def remove_keyed(key: int) -> list[Registration]:
            return remove([r for r in self.regs if r.key == key and r is not mine])

        if self.type is None:
            # no reservation: remove the registrations SARK names
            if not any(r.key == p.sark for r in self.regs):
                raise conflict()
            gone = remove_keyed(p.sark)
        elif self.type in ALL_REGISTRANTS:
            if p.sark == 0:
                self._check_type(scope, rtype)
                gone = remove([r for r in self.regs if r is not mine])
                self.type, self.holder = rtype, (None if rtype in ALL_REGISTRANTS else mine)
            else:
                if not any(r.key == p.sark for r in self.regs):
                    raise conflict()
                gone = remove_keyed(p.sark)
                if not self.regs:
                    self._release_reservation()
        else:
            holder = self.holder
            if holder is not None and p.sark == holder.key:
                self._check_type(scope, rtype)
                gone = remove_keyed(p.sark)
                old_type = self.type
                self.type = rtype
                self.holder = None if rtype in ALL_REGISTRANTS else mine
                if old_type != rtype:
                    for r in self.regs:
                        if r is not mine:
                            effects.ua.append((r, RESERVATIONS_RELEASED))
            else:
                if p.sark == 0:
                    raise invalid_param(8)
                if not any(r.key == p.sark for r in self.regs):
                    raise conflict()
                gone = remove_keyed(p.sark)
        if abort:
            effects.aborted = gone
        self.generation += 1
        return effects

    def _register_and_move(self, n: Any, sa: int, scope: int, rtype: int, p: PrParams) -> Effects:
        mine = self._registered(n, p.rk)
        if self.type is None or self.type in ALL_REGISTRANTS or self.holder is not mine:
            raise conflict()
        self._check_type(scope, rtype)
        if p.sark == 0:
            raise invalid_param(8)
        if len(p.transport_ids) != 1 or ",i," not in p.transport_ids[0]:
            raise invalid_param(24)
        dest = Port(p.transport_ids[0], n.target, p.rel_port)
        if dest.initiator == n.initiator and dest.tpg == n.tpg:
            raise invalid_param(24)
        if p.acl is not None and name_key(dest.initiator) not in p.acl:
            raise invalid_param(24)
        reg = self.reg_of(dest)
        if reg is None:
            if len(self.regs) >= MAX_REGISTRATIONS:
                raise CheckCondition(ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES)
            reg = Registration(p.sark, dest.initiator, dest.target, dest.tpg)
            self.regs.append(reg)
            self._changed()
        else:
            reg.key = p.sark
        self.type, self.holder = rtype, reg
        effects = Effects()
        if p.unreg:
            self.regs.remove(mine)
            self._changed()
        self.aptpl = p.aptpl
        self.generation += 1
        return effects

    # ---------------------------------------------------------------- PRIN
    def read_keys(self, alloc: int) -> bytes:
        """The keys that `alloc` bytes can hold; ADDITIONAL LENGTH counts them all."""
        room = max(0, alloc - 8 + 7) // 8
        keys = b"".join(struct.pack(">Q", r.key) for r in self.regs[:room])
        return struct.pack(">II", self.generation, 8 * len(self.regs)) + keys

    def read_reservation(self) -> bytes:
        if self.type is None:
            return struct.pack(">II", self.generation, 0)
        if self.type in ALL_REGISTRANTS:
            key = 0
        else:
            assert self.holder is not None   # every reservation of one holder names it
            key = self.holder.key
        return struct.pack(">IIQIBBH", self.generation, 16, key, 0, 0, self.type & 0xF, 0)

    @staticmethod
    def report_capabilities() -> bytes:
        # CRH 0, SIP_C, ATP_C, PTPL_C; TMV, ALLOW COMMANDS 001b; all six types
        mask = 0x80 | 0x40 | 0x20 | 0x08 | 0x02
        return struct.pack(">HBBBBH", 8, 0x08 | 0x04 | 0x01, 0x80 | 0x10, mask, 0x01, 0)

    def read_full_status(self, alloc: int) -> bytes:
        """The descriptors that `alloc` bytes can hold (the last maybe cut);
        ADDITIONAL LENGTH is that of them all, from their sizes alone."""
        total = sum(24 + r.tid_length for r in self.regs)
        out = bytearray(struct.pack(">II", self.generation, total))
        rtype = self.type & 0xF if self.type is not None else 0   # the TYPE field of holders
        for r in self.regs:
            if len(out) >= alloc:
                break
            holder = self.type is not None and (self.type in ALL_REGISTRANTS or self.holder is r)
            tid = transport_id(r.initiator)
            out += struct.pack(">QIBBIHI", r.key, 0, (0x02 if r.tpg is None else 0) | (1 if holder else 0),
                               rtype if holder else 0, 0, 0 if r.tpg is None else relative_port_id(r.tpg), len(tid))
            out += tid
        return bytes(out)

    # ---------------------------------------------------------------- APTPL
    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "target": self.target, "lun": self.lun, "generation": self.generation,
                "aptpl": self.aptpl,
                "registrations": [r.to_json() for r in self.regs],
                "reservation": None if self.type is None else {
                    "type": self.type,
                    "holder": None if self.holder is None else self.regs.index(self.holder)}}

    def load_json(self, doc: Any) -> None:
        """Restore from a document; raises ValueError/KeyError/TypeError when malformed."""
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("unknown format version")
        if doc["target"] != self.target or doc["lun"] != self.lun:
            raise ValueError(f"belongs to {doc['target']} LUN {doc['lun']}")
        regs = []
        for r in doc["registrations"]:
            tpg = r["tpg"]
            if not isinstance(r["key"], int) or not isinstance(r["initiator"], str) \
                    or not (tpg is None or isinstance(tpg, int)) or not 0 < r["key"] < 1 << 64:
                raise ValueError("bad registration")
            regs.append(Registration(r["key"], r["initiator"], r["target"], tpg))
        res = doc["reservation"]
        rtype, holder = None, None
        if res is not None:
            rtype = res["type"]
            if rtype not in TYPES:
                raise ValueError(f"bad reservation type {rtype!r}")
            if rtype not in ALL_REGISTRANTS:
                holder = regs[int(res["holder"])]
        if not isinstance(doc["generation"], int):
            raise ValueError("bad generation")
        if len(regs) > MAX_REGISTRATIONS:
            raise ValueError(f"{len(regs)} registrations, more than {MAX_REGISTRATIONS}")
        self.regs, self.type, self.holder = regs, rtype, holder
        self._changed()
        self.generation = doc["generation"]
        self.aptpl = doc.get("aptpl", True) is not False   # a file exists only under APTPL

    def load(self, path: Path) -> None:
        """Keep the state in this APTPL file, and restore what it holds.
        Blocking (a read): for a start, before the STML serves."""
        self.restore(*read_file_state(path))

    def restore(self, store: PrStore, doc: Any) -> None:
        """Keep the state in `store` from now on; `doc` is what it holds, read
        off the loop (read_file_state, a shared store's read), None: nothing
        yet. Nothing is read here: the loop never waits for a disk (0204)."""
        self.store = store
        if doc is None:
            return
        try:
            self.stored = True
            self.load_json(doc)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise _unusable(store.where, e) from None

    async def forget(self, keep: bool = False) -> None:
        """The LU is removed: its APTPL file goes (once a write in progress is
        done), and nothing writes one again; `keep`: it stays, for the LU
        that takes this one's identity under another number (a reload that
        renumbers it, 0218). A shared store (an RBD image's
        metadata) keeps its state: the image, and its reservations, outlive
        this STML's LU; the changes waiting for a write are still written (or
        fail), so no command waits for ever."""
        store = self.store
        if store is not None and not store.always and not keep:
            self.checkpoint(False)
            self.aptpl = False
            await self.persisted()
        elif self._writer is not None:
            await asyncio.wait([self._writer])   # not cancelled should this wait be
        self.store = None

    def checkpoint(self, aptpl: bool) -> None:
        """Before a change that will be written (`aptpl`: the command asks for
        APTPL): keep the state to put back should its write fail. Taken only
        when every change before is written; else the last write's is the one."""
        store = self.store
        if store is None or self.written < self.changes or self._writer is not None:
            return
        if store.always or self.aptpl or self.stored or aptpl:
            self._base = self.to_json()

    async def persisted(self) -> None:
        """Return once the state as it is now is on disk: when APTPL asks for
        it, else with no file left. One writer per LU, in the saver thread;
        each write takes every change made before it began, so a burst of
        PERSISTENT RESERVE OUTs waits for one or two writes between them.
        A write that fails raises OSError in every command it covered."""
        store = self.store
        if store is None or not (store.always or self.aptpl or self.stored or self._writer):
            return   # nothing on disk, nothing to put there
        self.changes += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((self.changes, fut))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_changes())
        await fut

    async def _write_changes(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.written < self.changes:
                upto = self.changes
                store = self.store
                assert store is not None   # persisted() starts a writer, and forget() waits for it
                # taken here: the loop owns the state
                state = self.to_json()
                doc = state if self.aptpl or store.always else None
                error: OSError | None = None
                try:
                    if loop in _STOPPING:   # queued after the stop's wait for the savers: not written
                        raise OSError(errno.ESHUTDOWN, "the STML is stopping")
                    self.stored = await loop.run_in_executor(_saver(store.always), store.write, doc)
                    self.saves += 1
                    self._base = state
                except OSError as e:
                    error = e
                    upto = self.changes   # every change since the one restored goes: they all fail
                    log.error("reservations not saved, %d change(s) taken back: %s",
                              upto - self.written, e)
                    if self._base is not None:
                        self.load_json(self._base)
                self.written = upto
                still = []
                for n, fut in self._waiters:
                    if n > upto:
                        still.append((n, fut))
                    elif not fut.done():
                        if error is None:
                            fut.set_result(None)
                        else:
                            fut.set_exception(_save_failed(error))
                self._waiters = still
        finally:
            self._writer = None


def read_file_state(path: Path) -> tuple[FileStore, Any]:
    """An APTPL file's store and what it holds (None: no file yet), for
    PrState.restore. Blocking: in a thread once the STML serves."""
    store = FileStore(path)
    try:
        return store, store.read()
    except (OSError, ValueError) as e:
        raise _unusable(store.where, e) from None


def _unusable(where: str, error: Exception) -> PrStoreError:
    return PrStoreError(f"persistent reservations in {where} are unusable ({type(error).__name__}: "
                        f"{error}); move them away to start without them")


def _save_failed(error: OSError) -> Exception:
    """What a command whose change was not saved ends with."""
    sense = SAVE_ERRORS.get(error.errno or 0)
    if sense is not None:
        return CheckCondition(*sense)
    return OSError(error.errno, f"saving reservations: {error}")


_SAVERS: dict[bool, ThreadPoolExecutor] = {}


def _saver(shared: bool) -> ThreadPoolExecutor:
    """The thread reservations are written in: not the backends' pool, where a
    save would wait behind (and hold up) medium I/O; shared stores (a cluster)
    have their own, so a cluster that hangs does not hold up APTPL files."""
    pool = _SAVERS.get(shared)
    if pool is None:
        pool = _SAVERS[shared] = ThreadPoolExecutor(1, thread_name_prefix="pr-save-shared" if shared else "pr-save")
    return pool


# loops whose STML is stopping: their reservation writers queue no more saves
_STOPPING: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def stop_saving() -> None:
    """On the stopping STML's loop, before wait_for_saves starts: a change still
    waiting for its save then fails (its command was not answered) instead of
    queueing a save behind the wait."""
    _STOPPING.add(asyncio.get_running_loop())


def wait_for_saves() -> None:
    """Block until every reservation save queued so far has ended (a stop
    waits for them, bounded, like for the backends' flushes: a PROUT answers
    only once its save is done, and a save hung on its store must not hang
    the process's exit, which would join its thread)."""
    for pool in list(_SAVERS.values()):
        pool.submit(lambda: None).result()


def _write_state(path: Path, doc: dict[str, Any] | None) -> bool:
    """Write the document atomically, never readable by others; None: remove
    the file, if any. Whether a file is left."""
    if doc is None:
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=1).encode(), secret=True)
    return True


def state_path(data_dir: Path, target: str, lun: int, ident: str | None = None) -> Path:
    """Where an LU's APTPL state is kept: `<id>_<lun>.json`, named by its
    identity (`id`), so an LU added later under a removed LU's number never
    inherits its registrations (the number stays in the name, as in the
    file: what `ls pr/` shows). An LU with the legacy identity (no `id`, or
    the one a LUN that existed before ids was given) is the LU the old name
    `<target>_<lun>.json` meant."""
    if ident is None or ident == legacy_id(target, lun):
        return Path(data_dir) / "pr" / f"{_safe(target)}_{lun}.json"
    return Path(data_dir) / "pr" / f"{ident}_{lun}.json"


class StateFiles:
    """The APTPL files of a data dir by the identity they are named after,
    from one listing (state_path's names: `<id>_<n>.json`, or the legacy
    `<target>_<n>.json`): a start that looks up every LU lists `pr/` once,
    not once per LU. Blocking (a listing): off the loop."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "pr"
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            names = []
        self._named: dict[str, list[Path]] = {}       # by the prefix of the name: an id, or a legacy target
        for name in names:
            m = re.fullmatch(r"(.+)_(\d+)\.json", name)
            if m is not None:
                self._named.setdefault(m[1], []).append(self.dir / name)
        self._legacy: dict[str, dict[str, list[Path]]] = {}   # per target: by the legacy id of each number

    def of(self, target: str, ident: str) -> list[Path]:
        """The files of LU `ident` of `target`, under any number."""
        legacy = self._legacy.get(target)
        if legacy is None:
            legacy = self._legacy[target] = {}
            for f in self._named.get(_safe(target), ()):
                legacy.setdefault(legacy_id(target, int(f.stem.rpartition("_")[2])), []).append(f)
        return [*self._named.get(ident, ()), *legacy.get(ident, ())]

    def moved(self, old: Path, new: Path) -> None:
        for files in (*self._named.values(), *(f for t in self._legacy.values() for f in t.values())):
            if old in files:
                files.remove(old)
        self._named.setdefault(new.name.rpartition("_")[0], []).append(new)


def find_state(data_dir: Path, target: str, lun: int, ident: str | None,
               others: Container[Path] = (), files: StateFiles | None = None) -> Path:
    """Where the LU's APTPL state is (state_path), after moving it there when
    the file is found under another number: the state belongs to the LU's
    identity, and an LU renumbered by an edited config keeps its
    registrations, its file renamed so that `pr/` names what is served
    (docs/decisions/0218). `others`: the files of the target's other LUs,
    never taken; `files`: the data dir's, listed once for many LUs. Blocking
    (a stat, a listing, a write): off the loop."""
    path = state_path(data_dir, target, lun, ident)
    if ident is None or path.exists():
        return path
    found = []
    for old in (files or StateFiles(data_dir)).of(target, ident):
        if old == path or old in others:
            continue
        try:
            doc = json.loads(old.read_text())
        except (OSError, ValueError) as e:
            raise _unusable(f"file {old}", e) from None
        if isinstance(doc, dict) and doc.get("target") == target:
            found.append((old, doc))
    if not found:
        return path
    if len(found) > 1:
        raise PrStoreError(f"persistent reservations of target {target} LU {ident} are in "
                           f"{len(found)} files ({', '.join(str(f) for f, _ in found)}): move away all but "
                           f"the one of its LUN {lun}")
    old, doc = found[0]
    doc["lun"] = lun
    atomic_write(path, json.dumps(doc, indent=1).encode(), secret=True)
    old.unlink()
    fsync_dir(path.parent)
    if files is not None:
        files.moved(old, path)
    log.info("persistent reservations of target %s moved from LUN %s to LUN %d (%s -> %s): the LU "
             "was renumbered", target, old.stem.rpartition("_")[2], lun, old.name, path.name)
    return path


def _safe(target: str) -> str:
    """A target name as the legacy file names spell it."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", target)


# ---------------------------------------------------------------- TransportIDs

def transport_id(initiator: str) -> bytes:
    """An iSCSI TransportID (SPC-4 7.6.4.6): format 01b with an ISID, else 00b."""
    fmt = 0x40 if ",i," in initiator else 0x00
    name = initiator.encode()
    name += bytes(_tid_body_length(initiator) - len(name))
    return bytes([fmt | ISCSI_PROTOCOL, 0]) + struct.pack(">H", len(name)) + name


_PORT_NAME = re.compile(r"([^,]+),i,0x([0-9a-f]{1,12})", re.I)


def parse_transport_ids(data: bytes, base: int) -> tuple[list[str], list[int]]:
    """Decode a list of iSCSI TransportIDs; `base` is their offset in the
    parameter list. Each is checked as it is read (format, a length no longer
    than the longest iSCSI port name needs, a name of at most 223 bytes, an
    ISID of hex digits), so a bad list costs one pass and changes nothing.
    The names, and where each starts in the parameter list."""
    out: list[str] = []
    at: list[int] = []
    off = 0
    while off < len(data):
        if len(data) - off < 4:
            raise invalid_param(base + off)
        b0 = data[off]
        if b0 & 0x0F != ISCSI_PROTOCOL or b0 >> 6 not in (0, 1):
            raise invalid_param(base + off)
        n = u16(data, off + 2)
        if n % 4 or n > MAX_TID_LENGTH or off + 4 + n > len(data):
            raise invalid_param(base + off + 2)
        raw = bytes(data[off + 4:off + 4 + n]).split(b"\0", 1)[0]
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise invalid_param(base + off + 4) from None
        if b0 >> 6 == 1:
            m = _PORT_NAME.fullmatch(name)
            if m is None or len(m.group(1).encode()) > MAX_NAME:
                raise invalid_param(base + off + 4)
            name = f"{m.group(1)},i,0x{m.group(2).lower().zfill(12)}"
        elif not name or "," in name or len(raw) > MAX_NAME:
            raise invalid_param(base + off + 4)
        out.append(name)
        at.append(base + off)
        off += 4 + n
    return out, at


def _tid_body_length(initiator: str) -> int:
    """The ADDITIONAL LENGTH `transport_id` gives this name."""
    n = len(initiator.encode()) + 1
    return max(20, n + -n % 4)


def parse_prout(sa: int, data: bytes, plen: int) -> PrParams:
    """Decode the parameter list of a PERSISTENT RESERVE OUT service action."""
    if sa == REGISTER_AND_MOVE:
        if plen < 24:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        rk, sark = struct.unpack_from(">QQ", data, 0)
        flags, rel_port, tlen = data[17], u16(data, 18), u32(data, 20)
        if 24 + tlen > plen:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        tids, at = parse_transport_ids(data[24:24 + tlen], 24)
        return PrParams(rk, sark, aptpl=bool(flags & 1), unreg=bool(flags & 2), rel_port=rel_port,
                        transport_ids=tids, tid_at=at)
    if plen < 24:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    rk, sark = struct.unpack_from(">QQ", data, 0)
    flags = data[20]
    p = PrParams(rk, sark, spec_i_pt=bool(flags & 0x08), all_tg_pt=bool(flags & 0x04),
                 aptpl=bool(flags & 0x01))
    if p.spec_i_pt and sa in (REGISTER, REGISTER_IGNORE):
        if plen < 28:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        tlen = u32(data, 24)
        if 28 + tlen != plen:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        p.transport_ids, p.tid_at = parse_transport_ids(data[28:28 + tlen], 28)
    elif plen != 24:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    if p.all_tg_pt and sa not in (REGISTER, REGISTER_IGNORE):
        raise invalid_param(20, 2)
    return p


# ---------------------------------------------------------------- handlers

def state(lu: LogicalUnit) -> PrState:
    """The LU's reservation state (made on first use)."""
    st = lu.pr
    if st is None:
        st = lu.pr = PrState(lu.target, lu.lun)
    assert isinstance(st, PrState)   # the only kind (stml.lu.Reservations is its engine-side view)
    return st


def _data(task: Task) -> bytes:
    return b"".join(bytes(b) for b in task.data_out)


async def reserve(task: Task) -> None:
    cdb = task.cdb
    if len(cdb) == 10 and cdb[1] & 0x12:
        raise invalid_field(1, 4)   # third-party reservations are not supported
    lu = unit(task)
    state(lu).reserve6(task.nexus)
    task.services.spc2_reserved(lu)   # so that the holder's nexus loss finds it


async def release(task: Task) -> None:
    cdb = task.cdb
    if len(cdb) == 10 and cdb[1] & 0x12:
        raise invalid_field(1, 4)
    state(unit(task)).release6(task.nexus)


async def prin(task: Task) -> bytes:
    cdb, lu = task.cdb, unit(task)
    st = state(lu)
    sa = cdb[1] & 0x1F
    alloc = u16(cdb, 7)
    return _PRIN[sa](st, alloc)[:alloc]


# what each service action answers, given the allocation length (the lists
# that grow with registrations stop where it does)
_PRIN: dict[int, Callable[[PrState, int], bytes]] = {
    READ_KEYS: PrState.read_keys,
    READ_RESERVATION: lambda st, alloc: st.read_reservation(),
    REPORT_CAPABILITIES: lambda st, alloc: st.report_capabilities(),
    READ_FULL_STATUS: PrState.read_full_status,
}


def prout_out_len(task: Task) -> int:
    return u32(task.cdb, 5)


def online(task: Task) -> None:
    """Reservations of an offline LU (its store could not open, 0280) are not
    to be had: an RBD image keeps them in the image, shared by the gateways,
    so a local answer would disagree with the others'. NOT READY, as its
    medium commands get."""
    lu = task.lu
    if lu is not None and lu.offline is not None:
        raise CheckCondition(NOT_READY, MANUAL_INTERVENTION_REQUIRED)


def prout_check(task: Task) -> None:
    online(task)
    cdb = task.cdb
    plen = u32(cdb, 5)
    if plen < 24 or plen > 1 << 16:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


async def prout(task: Task) -> None:
    cdb, lu = task.cdb, unit(task)
    sa = cdb[1] & 0x1F
    scope, rtype = cdb[2] >> 4, cdb[2] & 0x0F
    plen = u32(cdb, 5)
    data = _data(task)
    if len(data) < plen:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    params = parse_prout(sa, data, plen)
    if params.transport_ids:
        params.acl = task.services.admitted(lu.target)
    if sa == REGISTER_AND_MOVE:
        params.rel_port = _move_to_group(task, params.rel_port)
    st = state(lu)
    if sa in (REGISTER, REGISTER_IGNORE, REGISTER_AND_MOVE) and params.aptpl and st.store is None:
        raise invalid_param(20 if sa != REGISTER_AND_MOVE else 17, 0)   # nowhere to persist
    st.checkpoint(params.aptpl)
    effects = st.prout(task.nexus, sa, scope, rtype, params)
    # the change is made; an abort of the command (which may come while
    # the save or the fan-out yields) must not leave registrants untold or the
    # tasks PREEMPT AND ABORT names running
    await must_finish(_commit(task, st, effects), _log_failure)


def _move_to_group(task: Task, rel_port: int) -> int:
    """The port group (portal group tag) a REGISTER AND MOVE's RELATIVE TARGET
    PORT IDENTIFIER names: one of the nexus's target, by the identifier VPD
    page 0x83 reports for it (tag 0 is 0xFFFF: stml.spc.relative_port). Any
    other is INVALID FIELD IN PARAMETER LIST: a reservation moved to a port
    the target does not have is held by no I_T nexus that can ever exist."""
    tpg = 0 if rel_port == 0xFFFF else rel_port
    target = task.nexus.target
    if rel_port == 0 or (tpg != task.nexus.tpg and tpg not in task.services.portal_groups(target)):
        raise invalid_param(18)
    return tpg


async def _commit(task: Task, st: PrState, effects: Effects) -> None:
    await st.persisted()   # on disk first (APTPL): a failed write puts the state back, with no effects
    await apply_effects(task, st, effects)


def _log_failure(error: BaseException) -> None:
    """The commit of an aborted command, which nobody answers: a failed save is
    logged here (a command still waiting gets it as its error)."""
    log.warning("a reservation change of an aborted command was not saved: %s", error)


async def apply_effects(task: Task, st: PrState, effects: Effects) -> None:
    """Unit attentions of a PERSISTENT RESERVE OUT, and the tasks PREEMPT
    AND ABORT aborts (it completes only once they are gone). Registrations
    are matched against the target's live nexuses grouped by initiator
    name once, so the work is linear in registrations plus sessions, and
    both the walk and the unit attentions go FANOUT_STEP nexuses per turn of
    the loop (0264: up to 4,096 sessions a target). A change without effects
    (REGISTER of a new key, most RESERVEs) does none of it: it removed no
    registration but maybe the issuing nexus's own, which is logged in, so
    no unit attention kept for a logged-out nexus loses the registration
    that keeps it (drop_offline_uas would find none)."""
    if not effects.ua and not effects.aborted:
        return
    lu = unit(task)
    services = task.services
    by_name: dict[str, list[Nexus]] = {}
    walked = 0
    for walked, n in enumerate(services.nexuses(lu.target), 1):
        if not walked % FANOUT_STEP:
            await asyncio.sleep(0)
        by_name.setdefault(name_key(n.initiator), []).append(n)

    def nexus_keys(who: Registration) -> Iterator[str]:
        for n in by_name.get(name_key(who.initiator), ()):
            if who.matches(n):
                yield n.key

    # keys of single I_T nexuses still registered may hold a UA while logged out
    held = {k for k in (r.nexus_key() for r in st.regs) if k is not None}
    by_asc: dict[tuple[int, int], dict[str, None]] = {}
    for who, asc in effects.ua:
        keys = by_asc.setdefault(asc, {})
        if isinstance(who, str):
            keys[who] = None
            continue
        keys.update(dict.fromkeys(nexus_keys(who)))
        exact = who.nexus_key()
        if exact is not None:
            keys[exact] = None
    for asc, keys in by_asc.items():
        if walked >= FANOUT_STEP:   # a big target: each fan-out starts on a turn of its own
            await asyncio.sleep(0)
        await services.fan_out_ua([lu], asc, list(keys), exclude=task.nexus.key, offline=held)
    # registrations may have changed while the fan-out yielded: keep what is held now
    services.drop_offline_uas(lu, {k for k in (r.nexus_key() for r in st.regs) if k is not None})
    if effects.aborted:
        victims = {k for r in effects.aborted for k in nexus_keys(r)}
        victims.discard(task.nexus.key)
        await services.abort_tasks(lu, victims, task)


def _prin_entry(sa: int, name: str) -> OpEntry:
    return OpEntry(0x5E, name, bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0]), prin,
                   DataDir.READ, check=online, sa=sa, ua_exempt=False, conflicts=Conflict.NONE)


def _prout_entry(sa: int, name: str) -> OpEntry:
    # its service actions judge conflicts themselves (PrState.prout)
    return OpEntry(0x5F, name, bytes([0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0]), prout,
                   DataDir.WRITE, prout_out_len, prout_check, sa=sa, conflicts=Conflict.NONE)


OPCODES: list[OpEntry] = [
    OpEntry(0x16, "RESERVE(6)", bytes([0x16, 0, 0, 0, 0, 0]), reserve, check=online, conflicts=Conflict.NONE),
    OpEntry(0x17, "RELEASE(6)", bytes([0x17, 0, 0, 0, 0, 0]), release, check=online, conflicts=Conflict.NONE),
    OpEntry(0x56, "RESERVE(10)", bytes([0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]), reserve, check=online,
            conflicts=Conflict.NONE),
    OpEntry(0x57, "RELEASE(10)", bytes([0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]), release, check=online,
            conflicts=Conflict.NONE),
    _prin_entry(READ_KEYS, "PERSISTENT RESERVE IN / READ KEYS"),
    _prin_entry(READ_RESERVATION, "PERSISTENT RESERVE IN / READ RESERVATION"),
    _prin_entry(REPORT_CAPABILITIES, "PERSISTENT RESERVE IN / REPORT CAPABILITIES"),
    _prin_entry(READ_FULL_STATUS, "PERSISTENT RESERVE IN / READ FULL STATUS"),
    _prout_entry(REGISTER, "PERSISTENT RESERVE OUT / REGISTER"),
    _prout_entry(RESERVE, "PERSISTENT RESERVE OUT / RESERVE"),
    _prout_entry(RELEASE, "PERSISTENT RESERVE OUT / RELEASE"),
    _prout_entry(CLEAR, "PERSISTENT RESERVE OUT / CLEAR"),
    _prout_entry(PREEMPT, "PERSISTENT RESERVE OUT / PREEMPT"),
    _prout_entry(PREEMPT_AND_ABORT, "PERSISTENT RESERVE OUT / PREEMPT AND ABORT"),
    _prout_entry(REGISTER_IGNORE, "PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY"),
    _prout_entry(REGISTER_AND_MOVE, "PERSISTENT RESERVE OUT / REGISTER AND MOVE"),
]
