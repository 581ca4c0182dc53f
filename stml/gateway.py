"""The STML's role among gateways that export the same RBD images.

Each gateway host runs an STML and a front end configured for the same
images; one STML serves (active) and the others wait (standby). The active
one holds every shared image's exclusive lock, which a live holder never
hands over; a standby tries to take them every second and succeeds only
once the holder is dead (its watches expired), breaking the locks and
blocklisting the dead holder's client, so nothing it still had in flight
can land. Taking over, it reads the reservations the previous holder wrote
to the images (stml.pr with backends.rbd.PrStore) and starts to serve. A
standby refuses front ends; every front end lists every gateway's STML and
uses the one that serves (stml.api.FrontEndLink), so all paths reach one
STML and SCSI state (reservations, unit attentions, task sets) is whole
there. An active STML that finds itself fenced (on any call, on the loop or
in a worker thread) or without a lock stands down: its front ends are
released, its images reopened with a fresh client. A shared LU added to a
running STML that is not a standby is served only once its lock and
reservations are taken, as a takeover takes them; a standalone STML then
becomes the active gateway. While another gateway holds the lock, a
standalone STML with peers becomes its standby (its front ends go to the one
that serves) and any other refuses the add.
See docs/decisions/0400-rbd-gateways.md (and what a partition does) and 0403.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from bisect import bisect_left, insort
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from backends import BackendError
from stml import pr
from stml.sense import CAPACITY_DATA_CHANGED

if TYPE_CHECKING:
    from stml.emulator import Emulator
    from stml.lu import LogicalUnit

log = logging.getLogger("stml.gateway")

STANDALONE, STANDBY, ACTIVE = "standalone", "standby", "active"
TRY_EVERY = 1.0    # seconds between a standby's attempts, and an active one's lock checks


class Gateway:
    def __init__(self, emulator: Emulator, executor: Executor, grouped: bool = False) -> None:
        self.em = emulator
        self.executor = executor
        # one of several gateways (`[stml] peers`): its front ends know the others' STMLs
        self.grouped = grouped
        self.role = STANDALONE
        self.since = time.monotonic()
        self.takeovers = 0
        # the shared LUs, watched since start or adopt until `forget`: by (target,
        # LUN), in that order, so that the lock check and `status` never walk every
        # LU to find them (0221); each LU's last known image size
        self._index: dict[tuple[str, int], LogicalUnit] = {}
        self._order: list[tuple[str, int]] = []
        self._sizes: dict[LogicalUnit, int] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._let_go = False   # stood down: the locks go (in _run, before any new attempt)

    def shared(self) -> list[LogicalUnit]:
        """The LUs on storage other gateways share (RBD) that are served, in a
        fixed order: from the index, without a walk of every LU. One adopted
        but not in its target yet (or no longer) is not served: left out."""
        lookup = self.em.lookup_lu
        index = self._index
        return [lu for key in self._order for lu in (index[key],) if lookup(*key) is lu]

    @staticmethod
    def is_shared(lu: LogicalUnit) -> bool:
        """On storage other gateways share: its backend has an exclusive lock."""
        return getattr(lu.backend, "lock_acquire", None) is not None

    def start(self) -> None:
        """Begin (as a standby when there is shared storage); call on the loop.
        The one walk of every LU: the LUs added later are watched by `adopt`."""
        lus = [lu for t in self.em.targets.values() for lu in t.luns.values() if self.is_shared(lu)]
        for lu in lus:
            self.watch(lu)
        if lus:
            self._set(STANDBY, "a standby gateway: taking over the images' locks")
            self.em.local_tpgs = set(self.em.configured_tpgs)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def forget(self, lu: LogicalUnit) -> None:
        """A shared LU left its target (`lun remove`, `target remove`, a reload):
        out of the index; a change of its image is no longer news."""
        self._sizes.pop(lu, None)
        key = (lu.target, lu.lun)
        if self._index.get(key) is lu:
            del self._index[key]
            del self._order[bisect_left(self._order, key)]

    def watch(self, lu: LogicalUnit) -> None:
        """Index the LU; hear of its image changing (a resize) and of its client being fenced."""
        loop = asyncio.get_running_loop()
        backend: Any = lu.backend
        key = (lu.target, lu.lun)
        if key not in self._index:
            insort(self._order, key)
        self._index[key] = lu   # (one LU per number: a newer one replaces an older)
        self._sizes[lu] = backend.size()
        backend.on_change = lambda: _tell(loop, self._changed, lu)
        backend.on_fenced = lambda: _tell(loop, self.step_down, f"fenced on image {backend.spec}")

    def _set(self, role: str, why: str | None = None) -> None:
        self.role = role
        self.since = time.monotonic()
        self.em.standby = why if role == STANDBY else None

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------ the loop
    async def _run(self) -> None:
        """The one place that takes and lets go of locks (in worker threads,
        one call at a time: a backend is never reopened twice at once)."""
        while True:
            try:
                if self._let_go:
                    self._let_go = False
                    await self.em.releases_done()   # (its front ends' tasks aborted first: 0222)
                    await self._call(self._release_all, self.shared())
                if self.role == STANDBY:
                    await self._take_over()
                elif self.role == ACTIVE:
                    await self._check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gateway: unexpected error")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), TRY_EVERY)
            except asyncio.TimeoutError:
                pass

    @staticmethod
    def _backends(lus: list[LogicalUnit]) -> list[Any]:
        """The LUs' backends, as the RBD backend they are (stml knows no backend class)."""
        return [lu.backend for lu in lus]

    @staticmethod
    def _acquire_all(lus: list[LogicalUnit]) -> None:
        """Every image's lock, or none (a live gateway holds one): blocking."""
        taken: list[Any] = []
        try:
            for lu in lus:
                backend: Any = lu.backend
                if backend.fenced:
                    backend.reopen()   # a fenced client can do nothing: a new one
                backend.lock_acquire()
                taken.append(backend)
        except BaseException:
            for backend in taken:
                try:
                    backend.lock_release()
                except BackendError:
                    pass
            raise

    async def _take_over(self) -> None:
        lus = self.shared()
        if not lus:
            self._set(STANDALONE)
            self.em.local_tpgs = None
            return
        try:
            await self._call(self._acquire_all, lus)
            stores = [backend.pr_store() for backend in self._backends(lus)]
            docs = await self._call(lambda: [store.read() for store in stores])
        except (BackendError, OSError) as e:
            log.debug("gateway: not taking over yet: %s", e)
            return
        try:
            for lu, store, doc in zip(lus, stores, docs):
                lu.pr = None   # whatever this STML knew is stale: the images say
                pr.state(lu).restore(store, doc)
                lu.unit_attentions.clear()
        except pr.PrStoreError as e:
            log.error("gateway: cannot take over: %s", e)
            await self._call(self._release_all, lus)
            return
        self.takeovers += 1
        self._set(ACTIVE)
        regs = sum(len(pr.state(lu).regs) for lu in lus)
        log.info("gateway: active, holding the locks of %d image(s), %d registration(s)", len(lus), regs)
        print(f"stml: gateway active ({len(lus)} image(s), {regs} registration(s))", flush=True)

    async def _check(self) -> None:
        """Still holding every lock? (fenced clients fail the question)"""
        for lu in self.shared():
            backend: Any = lu.backend
            try:
                ok = not backend.fenced and await self._call(backend.is_lock_owner)
            except BackendError:
                ok = False
            if not ok and self.role == ACTIVE:
                self.step_down(f"no longer holds the lock of image {backend.spec}")
                return

    @staticmethod
    def _release_all(lus: list[LogicalUnit]) -> None:
        """Let every lock go, with a new client where the old one was fenced: blocking."""
        for lu in lus:
            backend: Any = lu.backend
            try:
                if backend.fenced:
                    backend.reopen()
                elif backend.is_lock_owner():
                    backend.lock_release()
            except BackendError as e:
                log.warning("gateway: %s", e)

    def step_down(self, why: str) -> None:
        """Stop serving at once: front ends go (they find the gateway that
        serves) and their tasks are aborted, the locks are let go. Calls librbd
        has end as librbd ends them (a fenced client's are refused by the
        OSDs), not before: their buffers are librbd's until then."""
        if self.role != ACTIVE:
            return
        log.error("gateway: %s: standing down", why)
        self._stand_by(why)
        self._let_go = True

    def _stand_by(self, why: str) -> None:
        """Serve nothing from now on: every front end is released (and goes
        to the gateway that serves); the loop tries to take over."""
        print(f"stml: gateway standby ({why})", flush=True)
        self._set(STANDBY, f"a standby gateway ({why})")
        self.em.local_tpgs = set(self.em.configured_tpgs)
        for fe in list(self.em.front_ends.values()):
            self.em.out.release(fe.ident, why)
            self.em.release_front_end(fe, why)
        self._wake.set()

    async def adopt(self, lu: LogicalUnit) -> None:
        """A shared LU added while running: its lock and reservations are
        taken before it is served. A standalone STML, whose front ends stay,
        becomes the active gateway; a standby takes it over with the rest.
        While another gateway holds the lock (EBUSY), a standalone STML with
        peers becomes its standby; otherwise the add is refused (BackendError):
        nothing is served without its lock and reservations."""
        self.watch(lu)
        if self.role == STANDBY:
            return
        backend: Any = lu.backend
        try:
            try:
                await self._call(backend.lock_acquire)
            except BackendError as e:
                if self.grouped and self.role == STANDALONE and getattr(e, "errno", None) == errno.EBUSY:
                    self._stand_by(f"another gateway holds the lock of image {backend.spec}")
                    return
                raise
            store = backend.pr_store()
            try:
                pr.state(lu).restore(store, await self._call(store.read))
            except (OSError, pr.PrStoreError) as e:
                await self._call(backend.lock_release)
                raise BackendError(str(e)) from None
        except BackendError:
            self.forget(lu)
            raise
        if self.role == STANDBY:   # stood down meanwhile: the LU goes with the rest at the next takeover
            await self._call(self._release_all, [lu])
        elif self.role == STANDALONE:
            self.em.local_tpgs = set(self.em.configured_tpgs)
            self.takeovers += 1
            self._set(ACTIVE)
            regs = len(pr.state(lu).regs)
            log.info("gateway: active, holding the lock of image %s, %d registration(s)", backend.spec, regs)
            print(f"stml: gateway active (1 image(s), {regs} registration(s))", flush=True)
            self._wake.set()

    # ------------------------------------------------------------ changes
    def _changed(self, lu: LogicalUnit) -> None:
        asyncio.get_running_loop().create_task(self._resized(lu))

    async def _resized(self, lu: LogicalUnit) -> None:
        """The image's header changed (any gateway resized it): a new size
        is CAPACITY DATA HAS CHANGED for every I_T nexus, and a new detect."""
        try:
            size = await self._call(lu.backend.refresh_size)  # type: ignore[attr-defined]
        except BackendError:
            return
        if size == self._sizes.get(lu) or lu not in self._sizes:
            return
        self._sizes[lu] = size
        log.info("image %s is now %d bytes", lu.backend.spec, size)  # type: ignore[attr-defined]
        inventory = self.em.describe_all()   # once for every front end, not once each (0229)
        for fe in list(self.em.front_ends.values()):
            self.em.send_detect(fe, inventory)
        # the target's nexuses from its index, not a walk of every front end's,
        # in bounded steps (docs/decisions/0264)
        await self.em.fan_out_ua([lu], CAPACITY_DATA_CHANGED, self.em.nexus_keys(lu.target))

    # ------------------------------------------------------------ status
    async def status(self) -> dict[str, Any]:
        """Role, and per shared image the lock's owner (a cluster round trip)."""
        images = []
        for lu in self.shared():
            backend: Any = lu.backend
            try:
                owners = await self._call(backend.lock_owners)
                mine = await self._call(backend.client_address)
            except BackendError as e:
                owners, mine = [f"unknown ({e})"], ""
            images.append({"target": lu.target, "lun": lu.lun, "image": backend.spec,
                           "lock_owner": ", ".join(owners) or "nobody", "mine": mine in owners,
                           "fenced": backend.fenced})
        return {"role": self.role, "for_s": round(time.monotonic() - self.since, 1),
                "takeovers": self.takeovers, "images": images}


def _tell(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """fn(*args) on the loop, from any thread (librbd's, a worker's, the loop's
    own); nothing once the loop is closed (the STML is gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)
