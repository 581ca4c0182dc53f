"""Logical units and their task sets."""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Coroutine, Final, Protocol, Sequence

from backends import Backend, BackendError, open_backend
from stml import sched
from stml.locks import WriteGate
from stml.sense import I_T_NEXUS_LOSS, RESET_UAS

log = logging.getLogger("stml")

VENDOR = "SCSITGT"
PRODUCT = "PY-STML DISK"
REVISION = "0001"
IEEE_COMPANY_ID = 0x5CA510  # vendor-specific identifiers are derived under this id


@dataclass
class LunOptions:
    """What a LUN spec/config says about one logical unit."""
    kind: str                    # backend kind: "file", "ram" or "rbd"
    size: int | None = None      # bytes; for file: create size, None = the file's size
    path: str | None = None      # file: its path; rbd: POOL/IMAGE
    ro: bool = False
    removable: bool = False
    block_size: int = 512
    write_cache: bool = False    # WCE default: write-through, every write durable at GOOD
    thin: bool = True
    physical_block_exp: int | None = None   # logical blocks per physical block (log2); None: 0
    id: str | None = None        # 32 hex digits: the LU's identity (designators); None: legacy_id()
    # rbd: the identity its image had when last opened (32 hex digits), which
    # the LU shows while the image cannot open (docs/decisions/0281)
    image_identity: str | None = None
    # rbd: how librados reaches the cluster (None: ceph.conf's defaults, client.admin)
    ceph_conf: str | None = None
    ceph_user: str | None = None
    ceph_keyring: str | None = None
    scheduler: str = sched.DEFAULT_POLICY   # the task set's dispatch policy (stml.sched.POLICIES)

    def backend_options(self) -> dict[str, str]:
        """What open_backend takes besides kind, size, path and ro."""
        return {k: v for k, v in (("conf", self.ceph_conf), ("user", self.ceph_user),
                                  ("keyring", self.ceph_keyring)) if v}

    def store(self) -> tuple[Any, ...] | None:
        """What holds the data, however the path spells it (a symlink, a hard
        link, `..`): a file's device and inode, a block device's number, an
        RBD image's name; a file still to be created, its resolved path. None
        for RAM. Two LUs on one store are two disks sharing a medium (0277).
        Blocking (a stat): not for the event loop."""
        if self.kind == "rbd":
            return ("rbd", self.path)
        if self.kind != "file" or self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return ("path", os.path.realpath(self.path))
        if stat.S_ISBLK(st.st_mode):
            return ("block", st.st_rdev)
        return ("file", st.st_dev, st.st_ino)


# LunOptions fields the STML records in a LUN's entry, not settings: an entry
# that lacks one (a file the STML cannot write) is not a changed LUN
RECORDED = frozenset({"image_identity"})


class Offline:
    """The backend of an LU served offline: its store could not open. The LU
    keeps its number and identity, and every command that needs the medium
    answers NOT READY (disk.medium_error) before reaching this; what does
    reach it (a stop's flush and close) has nothing to do."""

    inline = True
    can_discard = False
    can_resize = False
    aio = None
    dirty = False
    sync_error: str | None = None

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def size(self) -> int:
        return 0

    # each refusal is a method of its own: mypyc compiles stml.lu (decision
    # 0830) and refuses a class attribute bound to several names at once
    def _refused(self) -> BackendError:
        return BackendError(f"offline: {self.reason}")

    def read_into(self, offset: int, buf: memoryview) -> None:
        raise self._refused()

    def write_from(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> None:
        raise self._refused()

    def discard(self, offset: int, length: int) -> None:
        raise self._refused()

    def mapped_extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]:
        raise self._refused()

    def resize(self, size: int) -> None:
        raise self._refused()

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        return False

    def write_nowait(self, offset: int, bufs: Sequence[memoryview], sync: bool) -> bool:
        return False

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        return None

    def mapped_extents_nowait(self, offset: int, length: int,
                              limit: int) -> list[tuple[int, int, bool]] | None:
        return None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class CannotOpen(Exception):
    """Why a LUN's store cannot open: str() is the reason an admin reads."""


def served_before(o: LunOptions) -> bool:
    """Whether a file or RBD LUN of a saved config was served before: a file
    LUN's entry carries an id once it has been (a first start creates the
    files of the config it writes, `lun add` saves the id after the open), an
    RBD LUN's the identity of its image. Its store is then never created
    anew: a missing file or image is a disk not mounted, renamed or lost, not
    a new disk (docs/decisions/0280)."""
    if o.kind == "rbd":
        return o.image_identity is not None
    return o.kind == "file" and o.id is not None


def missing_file(o: LunOptions) -> str | None:
    """Why a start would serve this file LUN offline for want of its file, or
    None: what `config check` and `run`'s banner say before the STML does.
    Blocking (a stat)."""
    if o.kind != "file" or not o.path or os.path.exists(o.path):
        return None
    if served_before(o):
        return "its file is missing; it was served before"
    return None if o.size is not None else "its file does not exist and no size is given to create it"


def record_image(o: LunOptions, backend: Backend, where: str) -> bool:
    """Keep in `o` (and so in the config) the identity of the RBD image just
    opened, which the LU shows while the image cannot open (0281), and no
    `size`: the image's own is the size every gateway serves, which a resize
    anywhere changes (a `size` only made the image, 0208). True when `o`
    changed: the file is to be saved. An image whose identity is not the
    recorded one was removed and made again (or another cluster's): it is
    another disk, and its own identity is the one served."""
    own = getattr(backend, "identity", None)
    if o.kind != "rbd" or not isinstance(own, bytes):
        return False
    sized, o.size = o.size is not None, None
    if own.hex() == o.image_identity:
        return sized
    if o.image_identity is not None:
        log.warning("%s: the RBD image %s is not the one recorded (identity %s, now %s): served as "
                    "another disk", where, o.path, o.image_identity, own.hex())
    o.image_identity = own.hex()
    return True


def open_store(o: LunOptions, create: bool) -> Backend:
    """Open a LUN's backend (blocking: not on the event loop). `create`: a
    missing file may be created (a LUN served for the first time)."""
    if not create and o.kind == "file" and o.path is not None and not os.path.exists(o.path):
        raise CannotOpen(f"its file {o.path} is missing; it was served before: restore it or remove the LUN")
    # an RBD image is made only with a size: an image served before is never made again
    size = None if o.kind == "rbd" and not create else o.size
    try:
        backend = open_backend(o.kind, size, o.path, o.ro, **o.backend_options())
    except (BackendError, ValueError, OSError) as e:
        raise CannotOpen(str(e)) from None
    if backend.size() < o.block_size:
        backend.close()
        raise CannotOpen("backing store smaller than one block")
    return backend


def legacy_id(target: str, lun: int) -> str:
    """The identity of a LUN whose config has no `id` (configs older than it):
    the hash its designators were derived from before, so they stay the same."""
    return hashlib.sha256(f"{target}/{lun}".encode()).digest()[:16].hex()


def naa_designator(ident: bytes) -> bytes:
    """NAA 6 (IEEE registered extended): the company id, then 100 bits of the
    LU's 16-byte identity."""
    tail = int.from_bytes(ident[:13], "big") >> 4
    return ((0x6 << 124) | (IEEE_COMPANY_ID << 100) | tail).to_bytes(16, "big")


def unit_serial(ident: bytes) -> str:
    """PRODUCT SERIAL NUMBER (VPD 0x80): 16 hex digits of the identity."""
    return ident[:8].hex()


@dataclass
class ModeState:
    """Current values of the changeable mode page fields."""
    wce: bool = False
    d_sense: bool = False
    swp: bool = False            # control page software write protect


class CopyResults:
    """What RECEIVE COPY STATUS reports, per I_T nexus and list identifier.
    Bounded: a nexus keeps its last PER_NEXUS lists, and its entries go with
    the nexus (I_T nexus loss discards them, SPC-4 6.23)."""

    PER_NEXUS: Final = 16

    def __init__(self) -> None:
        self._by_nexus: dict[str, collections.OrderedDict[int, dict[str, Any]]] = {}

    def get(self, key: str, list_id: int) -> dict[str, Any] | None:
        lists = self._by_nexus.get(key)
        return lists.get(list_id) if lists is not None else None

    def put(self, key: str, list_id: int, state: dict[str, Any]) -> None:
        lists = self._by_nexus.setdefault(key, collections.OrderedDict())
        lists.pop(list_id, None)
        lists[list_id] = state
        while len(lists) > self.PER_NEXUS:
            lists.popitem(last=False)

    def drop(self, key: str) -> None:
        self._by_nexus.pop(key, None)

    def __len__(self) -> int:
        return sum(map(len, self._by_nexus.values()))


class Reservations(Protocol):
    """What the engine asks of an LU's reservation state (stml.pr.PrState,
    a command set above this module, made by stml.pr.state())."""

    spc2: str | None   # the key of the nexus holding an SPC-2 reservation
    type: int | None   # the persistent reservation's type; None: none held

    def conflicts(self, n: Any, rule: int) -> bool:
        """Whether a command with this conflict rule (stml.ops.Conflict) from nexus n conflicts."""
        ...

    def drop_spc2(self, key: str | None = None) -> None:
        """LUN reset, target reset, I_T nexus loss: the SPC-2 reservation goes."""

    async def forget(self) -> None:
        """The LU is removed: what it kept on disk goes."""


# I_T nexuses one LU keeps unit attentions for. The emulator stores them only
# for nexuses that exist and registrations of one I_T nexus (at most 1024), so
# this is a last line, far above what a front end's session limits allow
MAX_UA_NEXUSES = 16384


@dataclass(eq=False)   # one object per LU: compared and hashed by identity
class LogicalUnit:
    target: str
    lun: int
    backend: Backend
    options: LunOptions
    template: Any
    mode: ModeState = field(default_factory=ModeState)
    # made from options.scheduler: a policy of stml.sched, every one a FifoTaskSet
    # (the class, not a protocol: the compiled build calls its methods natively)
    task_set: sched.FifoTaskSet = field(init=False)
    unit_attentions: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    started: bool = True
    medium_present: bool = True                 # removable media: loaded or ejected
    prevent: set[str] = field(default_factory=set)   # nexus keys preventing medium removal
    write_gate: WriteGate = field(default_factory=WriteGate)   # COMPARE AND WRITE atomicity
    copy_results: CopyResults = field(default_factory=CopyResults)   # EXTENDED COPY
    copies: int = 0                             # EXTENDED COPY commands running (max 1)
    job: asyncio.Task | None = None             # a SANITIZE's work, maybe after its command returned
    progress: tuple[int, int] = (0, 1)          # how far the job got: (done, total)
    pr: Reservations | None = None              # reservation state: stml.pr.state() makes it
    space_refused: int = 0                      # writes refused (space, read-only) since the last line
    space_logged: float | None = None           # when that line was written (time.monotonic)

    def __post_init__(self) -> None:
        self.mode.wce = self.options.write_cache
        if self.offline is not None:   # no medium: commands that need it meet disk.medium_error
            self.medium_present = False
        self.task_set = sched.POLICIES[self.options.scheduler]()
        self._identify()
        self.block_size = self.options.block_size

    def _identify(self) -> None:
        """The designators come from the LU's identity, not from its (public)
        target name and number; they survive restarts because the config keeps
        it. Without one, a backend every gateway opens alike (RBD) names the LU
        itself, so all of them present one identity (docs/decisions/0400); an
        image that cannot open, by the identity it had (0281)."""
        o = self.options
        own = getattr(self.backend, "identity", None)
        ident = bytes.fromhex(o.id) if o.id else own if own is not None else \
            bytes.fromhex(o.image_identity or legacy_id(self.target, self.lun))
        self.naa = naa_designator(ident)
        self.serial = unit_serial(ident)

    @property
    def offline(self) -> str | None:
        """Why the LU is served offline (its store could not open), or None."""
        backend = self.backend
        return backend.reason if isinstance(backend, Offline) else None

    def go_online(self, backend: Backend) -> None:
        """The store opened at last: served from now on, as a medium just loaded
        (under the identity its options now give: one a reload assigned)."""
        self.backend = backend
        self.medium_present = True
        self._identify()

    @property
    def sanitizing(self) -> bool:
        """A SANITIZE is under way: the medium is NOT READY."""
        return self.job is not None and not self.job.done()

    def start_job(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run the LU's one background job (callers check `sanitizing` first)."""
        assert not self.sanitizing
        self.progress = (0, 1)
        self.job = asyncio.get_running_loop().create_task(work)
        return self.job

    async def stop_jobs(self) -> None:
        """The LU goes (LUN removed, STML stopping): its job is cancelled; this
        returns once the job's backend call under way has ended."""
        job = self.job
        if job is not None and not job.done():
            job.cancel()
            await asyncio.wait([job])

    @property
    def blocks(self) -> int:
        return self.backend.size() // self.block_size

    def describe(self) -> dict[str, Any]:
        """The LUN as the contract's `detect` presents it."""
        return {"lun": self.lun, "block_size": self.block_size, "blocks": self.blocks,
                "ro": self.options.ro, "removable": self.options.removable}

    def add_ua(self, asc_ascq: tuple[int, int], nexus_keys: list[str],
               exclude: str | None = None) -> list[str]:
        """Queue a unit attention for these nexuses (once each: a condition
        already pending is not queued twice, so a nexus's queue holds at most
        one of each kind). Returns the keys it is now pending for; past
        MAX_UA_NEXUSES nexuses, new ones are refused with a warning."""
        if asc_ascq in RESET_UAS:       # power on, target/LUN reset: PREVENT state goes (SBC-4 5.15)
            self.prevent.clear()
        elif asc_ascq == I_T_NEXUS_LOSS:   # I_T nexus loss: that nexus's PREVENT goes
            self.prevent.difference_update(nexus_keys)
        uas = self.unit_attentions
        stored = []
        for key in nexus_keys:
            if key == exclude:
                continue
            pending = uas.get(key)
            if pending is None:
                if len(uas) >= MAX_UA_NEXUSES:
                    log.warning("%s LUN %d: unit attentions pending for %d nexuses already; "
                                "%02x/%02x not kept for more", self.target, self.lun, len(uas), *asc_ascq)
                    break
                pending = uas[key] = []
            if asc_ascq not in pending:
                pending.append(asc_ascq)
            stored.append(key)
        return stored

    def take_ua(self, key: str) -> tuple[int, int] | None:
        """The oldest unit attention pending for the nexus of this key, now reported (cleared)."""
        pending = self.unit_attentions.get(key)
        if not pending:
            return None
        ua = pending.pop(0)
        if not pending:
            del self.unit_attentions[key]   # an empty queue keeps no entry
        return ua

