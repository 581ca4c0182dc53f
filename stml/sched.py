"""Task-set dispatch policies: when a task of a logical unit starts executing.

Every policy keeps SAM-5's task attribute rules (8.6): a HEAD OF QUEUE task
starts at once; an ORDERED task waits for every older task of the LU; a
SIMPLE task waits for older ORDERED and HEAD OF QUEUE tasks. (ACA tasks are
refused before they get here: NACA is not supported.) Within those rules a
policy decides when the SIMPLE tasks that may start actually do:

- `fifo` (the default): at once. Every task that may start runs, and the
  backend calls of an LU's tasks queue in arrival order for its worker
  threads (stml/workers.py), so one initiator's deep queue is served before
  another initiator's single command that arrived after it.
- `fair`: at most DEPTH tasks of the LU run at once; the others wait in one
  queue per I_T nexus, and a free place goes to the nexus that has had the
  least service (start-time fair queueing over the bytes the commands move),
  so an initiator at queue depth 1 waits for about one command, not for the
  whole queue of an initiator at depth 64 (docs/decisions/0700).

A policy is the object `LogicalUnit.task_set` holds: FifoTaskSet or a class
derived from it; the LUN setting `scheduler` names it (POLICIES).
"""
from __future__ import annotations

import asyncio
import collections
import heapq
from typing import Any, Final

from stml.api import TaskAttr

# plain ints: a TaskAttr member read through its class costs an enum lookup per command
# (Final: statics in the compiled build, not the module's dict, per command)
_SIMPLE: Final = int(TaskAttr.SIMPLE)
_ORDERED: Final = int(TaskAttr.ORDERED)
_HOQ: Final = int(TaskAttr.HEAD_OF_QUEUE)


class Queued:
    """What a policy needs of a task: its place in the set, its attribute, its
    size and its I_T nexus. stml.task.Task derives from it (that module sits
    above this one: a task names its LU, whose task set this is) and sets them.
    A base class, not a Protocol: the compiled build reads and sets `seq` and
    `attr` (per command) as native attributes, not by name (decision 0842)."""

    __slots__ = ("seq", "attr", "exp_len")

    seq: int
    attr: int
    exp_len: int

    def nexus_key(self) -> str:
        """The key of the task's I_T nexus (the fair policy's queues)."""
        raise NotImplementedError


# tasks of one LU the fair policy runs at once: the worker threads an LU may hold
# (stml/workers.py, per_key: half of stml.server's 8). More would only wait again,
# in arrival order, in front of the threads, where no policy chooses among them.
FAIR_DEPTH = 4
# what a command costs the fair policy beyond its bytes: a TEST UNIT READY is not free
COMMAND_COST = 4096


class FifoTaskSet:
    """SAM-5 task ordering and nothing else: a task starts as soon as its
    attribute allows (HEAD OF QUEUE at once; ORDERED after every older task;
    SIMPLE after older ORDERED and HEAD OF QUEUE tasks, alongside other SIMPLE
    ones). The per-command path is this class's fast path: keep it short."""

    def __init__(self) -> None:
        # insertion order = arrival order; stml.task.Task objects, which the
        # emulator's TMFs walk (that module sits above this one: Any here)
        self.tasks: dict[int, Any] = {}
        # tasks that are not SIMPLE: every policy counts them so, as _may_run and
        # the fair policy's barrier see them (a count that disagrees wedges the LU)
        self._ordered = 0
        self._waiters: list[tuple[Queued, asyncio.Future]] = []
        self._seq = 0

    def add(self, task: Queued) -> None:
        """The task joined the set (it counts for ordering from now on)."""
        self._seq += 1
        task.seq = self._seq
        self.tasks[task.seq] = task
        if task.attr != _SIMPLE:
            self._ordered += 1

    def remove(self, task: Queued) -> None:
        """The task left the set: done, failed or aborted, started or not."""
        if self.tasks.pop(task.seq, None) is None:
            return
        if task.attr != _SIMPLE:
            self._ordered -= 1
        if self._waiters:
            self._wake()

    def _may_run(self, task: Queued) -> bool:
        if task.attr == _HOQ:
            return True
        for other in self.tasks.values():
            if other.seq >= task.seq:
                return True
            if task.attr == _ORDERED or other.attr != _SIMPLE:
                return False
        return True

    def at_once(self, task: Queued) -> bool:
        """No task of the LU but SIMPLE ones (the task itself counted): it starts now."""
        return self._ordered == 0

    async def enter(self, task: Queued) -> bool:
        """Return when the task may execute: True when it had to wait."""
        if (self._ordered == 0 and task.attr != _ORDERED) or self._may_run(task):
            return False
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((task, fut))
        await fut
        return True

    def _wake(self) -> None:
        still = []
        for task, fut in self._waiters:
            if fut.done():
                continue
            if self._may_run(task):
                fut.set_result(None)
            else:
                still.append((task, fut))
        self._waiters = still


_Entry = tuple[int, "Queued", asyncio.Future]   # (start tag, task, its wake-up)


class FairTaskSet(FifoTaskSet):
    """The LU shared fairly among its I_T nexuses, within SAM's rules.

    At most `depth` tasks run; a SIMPLE task that finds them all busy waits
    in its nexus's FIFO queue. Every SIMPLE task gets a start tag when it
    enters, the larger of the LU's virtual time and the finish tag of its
    nexus's previous task, and a finish tag, start + bytes + COMMAND_COST. A
    free place goes to the queue head with the smallest start tag; the
    virtual time is the start tag of the task that started last (start-time
    fair queueing: Goyal, Vin and Cheng, SIGCOMM 1996). A nexus that used
    little starts near the virtual time and so goes next; a busy one falls
    behind by what it moved; one whose tasks are all gone loses its tag and
    comes back at the virtual time (no credit for idling). One dispatch is a
    heap pop and push, whatever the transfer lengths (deficit round robin
    would loop over rounds).

    SAM's rules stay whole: the tasks that may start are those older than the
    oldest ORDERED or HEAD OF QUEUE task (a queue head newer than it waits,
    whatever its tag); an ORDERED task starts when it is the oldest task of
    the LU (nothing runs then, so it takes no place); HEAD OF QUEUE starts at
    once, beyond `depth`. Everything kept is held by a task in the set, so
    the task set's own limit (TASK SET FULL) bounds it.
    """

    def __init__(self, depth: int = FAIR_DEPTH) -> None:
        super().__init__()
        self.depth = depth
        self._running: set[int] = set()     # seqs of tasks that started
        self._queues: dict[str, collections.deque[_Entry]] = {}   # nexus key -> its waiting SIMPLE tasks
        self._finish: dict[str, int] = {}   # nexus key -> finish tag of its newest SIMPLE task
        self._count: dict[str, int] = {}    # nexus key -> its SIMPLE tasks started or waiting
        self._queued: dict[int, str] = {}   # seq of a waiting SIMPLE task -> its nexus key
        self._heads: list[tuple[int, int, str]] = []   # heap of (start tag, seq, key) of queue heads
        self._vtime = 0

    def at_once(self, task: Queued) -> bool:
        """Never decided here: enter() keeps the books of every task it starts."""
        return False

    async def enter(self, task: Queued) -> bool:
        attr = task.attr
        if attr == _HOQ:
            self._running.add(task.seq)
            return False
        if attr != _SIMPLE:                  # ORDERED: once it is the oldest task
            waited = await super().enter(task)
            self._running.add(task.seq)
            return waited
        key = task.nexus_key()
        vtime = self._vtime
        start = max(vtime, self._finish.get(key, vtime))
        self._finish[key] = start + task.exp_len + COMMAND_COST
        self._count[key] = self._count.get(key, 0) + 1
        if len(self._running) < self.depth and not self._heads and (self._ordered == 0 or self._may_run(task)):
            self._vtime = start
            self._running.add(task.seq)
            return False
        fut = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            heapq.heappush(self._heads, (start, task.seq, key))
        queue.append((start, task, fut))
        self._queued[task.seq] = key
        if len(self._running) < self.depth:   # a place is free: SAM held it, or a stale heap entry
            self._fill()
        waited = not fut.done()
        await fut    # _fill() counted it as running before it woke us
        return waited

    def remove(self, task: Queued) -> None:
        seq = task.seq
        if self.tasks.pop(seq, None) is None:
            return
        if task.attr != _SIMPLE:
            self._ordered -= 1
        if seq in self._running:
            self._running.discard(seq)
            if task.attr == _SIMPLE:
                self._uncount(task.nexus_key())
        else:
            key = self._queued.pop(seq, None)
            if key is not None:              # aborted while it waited
                self._unqueue(key, seq)
                self._uncount(key)
        if self._waiters:
            self._wake()
        self._fill()

    def _unqueue(self, key: str, seq: int) -> None:
        """Take an aborted task out of its queue (a linear search, bounded by
        the task set's limit; aborts are rare). A head removed leaves its heap
        entry behind: _pick discards entries that are no longer a head."""
        queue = self._queues[key]
        for i, entry in enumerate(queue):
            if entry[1].seq == seq:
                del queue[i]
                break
        if not queue:
            del self._queues[key]
        elif i == 0:
            heapq.heappush(self._heads, (queue[0][0], queue[0][1].seq, key))

    def _uncount(self, key: str) -> None:
        """One SIMPLE task of the nexus left; with its last, the nexus's tag
        goes (it comes back at the virtual time: no credit for idling)."""
        left = self._count[key] - 1
        if left:
            self._count[key] = left
        else:
            del self._count[key]
            del self._finish[key]

    def _fill(self) -> None:
        """Start waiting tasks while there are free places."""
        while len(self._running) < self.depth and self._heads:
            entry = self._pick()
            if entry is None:
                return
            start, task, fut = entry
            self._vtime = max(self._vtime, start)
            self._running.add(task.seq)
            fut.set_result(None)

    def _pick(self) -> _Entry | None:
        """The queue head with the smallest start tag that SAM lets start."""
        barrier = None
        if self._ordered:   # only tasks older than the oldest ORDERED / HEAD OF QUEUE task
            barrier = next(seq for seq, t in self.tasks.items() if t.attr != _SIMPLE)
        held = []
        found = None
        heads = self._heads
        while heads:
            start, seq, key = heapq.heappop(heads)
            queue = self._queues.get(key)
            if queue is None or queue[0][1].seq != seq:
                continue                     # left behind by an abort
            if barrier is not None and seq > barrier:
                held.append((start, seq, key))
                continue
            entry = queue.popleft()
            del self._queued[seq]
            if queue:
                heapq.heappush(heads, (queue[0][0], queue[0][1].seq, key))
            else:
                del self._queues[key]
            if entry[2].done():              # cancelled; remove() will not find it queued
                self._uncount(key)
                continue
            found = entry
            break
        for h in held:
            heapq.heappush(heads, h)
        return found


POLICIES: dict[str, type[FifoTaskSet]] = {"fifo": FifoTaskSet, "fair": FairTaskSet}
DEFAULT_POLICY = "fifo"
