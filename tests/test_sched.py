"""Task-set dispatch policies (stml/sched.py): SAM-5's task attribute rules
hold under every policy; the fair one shares an LU among I_T nexuses."""
from __future__ import annotations

import asyncio
import tomllib

import pytest

from stml.api import TaskAttr
from stml.sched import COMMAND_COST, POLICIES, FairTaskSet, Queued

S, O, H = TaskAttr.SIMPLE, TaskAttr.ORDERED, TaskAttr.HEAD_OF_QUEUE


class FakeNexus:
    def __init__(self, key: str) -> None:
        self.key = key


A, B = FakeNexus("a"), FakeNexus("b")


class FakeTask(Queued):
    def __init__(self, name: str, attr: TaskAttr, nexus: FakeNexus = A, exp_len: int = 4096) -> None:
        self.name = name
        self.attr = attr
        self.nexus = nexus
        self.exp_len = exp_len
        self.seq = 0

    def nexus_key(self) -> str:
        return self.nexus.key

    def __repr__(self) -> str:
        return self.name


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def _entered(ts, task: FakeTask) -> asyncio.Task:
    """Start `enter` and let it run as far as it can."""
    t = asyncio.ensure_future(ts.enter(task))
    await settle()
    return t


# ---------------------------------------------------------------- SAM rules, every policy

@pytest.fixture(params=sorted(POLICIES))
def policy(request):
    return POLICIES[request.param]


def test_simple_tasks_run_together(policy):
    async def main():
        ts = policy()
        a, b, c = (FakeTask(n, S) for n in "abc")
        for t in (a, b, c):
            ts.add(t)
        for t in (c, b, a):
            assert (await _entered(ts, t)).done()
    run(main())


def test_at_once_only_while_every_task_is_simple():
    """FIFO's shortcut (the emulator then skips enter): a task starts at once
    only while the LU holds nothing but SIMPLE tasks, the task itself counted;
    the fair policy never takes it (its enter() keeps the books)."""
    fifo, fair = POLICIES["fifo"](), POLICIES["fair"]()
    a, o, b, h = FakeTask("a", S), FakeTask("o", O), FakeTask("b", S), FakeTask("h", H)
    fifo.add(a)
    assert fifo.at_once(a)
    fifo.add(o)
    assert not fifo.at_once(o)                  # itself ORDERED
    fifo.add(b)
    assert not fifo.at_once(b)                  # an ORDERED one is in the set
    fifo.remove(o)
    assert fifo.at_once(b)
    fifo.add(h)
    assert not fifo.at_once(h)                  # HEAD OF QUEUE goes through enter() too
    for t in (a, b, h):
        fair.add(t)
        assert not fair.at_once(t)


def test_ordered_waits_for_older_tasks(policy):
    async def main():
        ts = policy()
        s1, s2, o = FakeTask("s1", S), FakeTask("s2", S), FakeTask("o", O, B)
        for t in (s1, s2, o):
            ts.add(t)
        assert (await _entered(ts, s1)).done()
        assert (await _entered(ts, s2)).done()
        wait = await _entered(ts, o)
        assert not wait.done()
        ts.remove(s1)
        await settle()
        assert not wait.done()          # s2 is still older and running
        ts.remove(s2)
        await asyncio.wait_for(wait, 1)
    run(main())


def test_simple_waits_behind_older_ordered(policy):
    async def main():
        ts = policy()
        s0, o, s1 = FakeTask("s0", S), FakeTask("o", O), FakeTask("s1", S, B)
        for t in (s0, o, s1):
            ts.add(t)
        assert (await _entered(ts, s0)).done()     # older than the ORDERED task: not held
        wait_o = await _entered(ts, o)
        wait_s1 = await _entered(ts, s1)
        assert not wait_o.done() and not wait_s1.done()
        ts.remove(s0)
        await asyncio.wait_for(wait_o, 1)
        await settle()
        assert not wait_s1.done()                  # the ORDERED task is still running
        ts.remove(o)
        await asyncio.wait_for(wait_s1, 1)
    run(main())


def test_head_of_queue_never_waits(policy):
    async def main():
        ts = policy()
        o, s, h = FakeTask("o", O), FakeTask("s", S), FakeTask("h", H, B)
        for t in (o, s, h):
            ts.add(t)
        assert (await _entered(ts, o)).done()
        wait_s = await _entered(ts, s)
        assert not wait_s.done()
        assert (await _entered(ts, h)).done()
        ts.remove(o)                               # s is older than the HEAD OF QUEUE task:
        await asyncio.wait_for(wait_s, 1)          # h running does not hold it back
    run(main())


def test_ordered_waits_for_older_head_of_queue(policy):
    # "an ORDERED task waits for every older task" (SAM-5 8.6)
    async def main():
        ts = policy()
        h, o = FakeTask("h", H), FakeTask("o", O)
        ts.add(h)
        ts.add(o)
        assert (await _entered(ts, h)).done()
        wait = await _entered(ts, o)
        done_early = wait.done()
        ts.remove(h)
        await asyncio.wait_for(wait, 1)
        assert not done_early, "ORDERED task entered while an older HEAD OF QUEUE task ran"
    run(main())


def test_removed_waiter_does_not_block_others(policy):
    async def main():
        ts = policy()
        o1, o2, s = FakeTask("o1", O), FakeTask("o2", O), FakeTask("s", S, B)
        for t in (o1, o2, s):
            ts.add(t)
        assert (await _entered(ts, o1)).done()
        w2 = await _entered(ts, o2)
        ws = await _entered(ts, s)
        w2.cancel()                                 # o2 aborted while waiting
        ts.remove(o2)
        await settle()
        assert not ws.done()
        ts.remove(o1)
        await asyncio.wait_for(ws, 1)
    run(main())


# ---------------------------------------------------------------- the fair policy

class Recorder:
    """Enter tasks of a FairTaskSet and note the order they start in."""

    def __init__(self, depth: int) -> None:
        self.ts = FairTaskSet(depth)
        self.started: list[FakeTask] = []
        self.waits: dict[str, asyncio.Task] = {}

    async def submit(self, *tasks: FakeTask) -> None:
        for t in tasks:
            self.ts.add(t)
            self.waits[t.name] = asyncio.ensure_future(self._enter(t))
        await settle()

    async def _enter(self, t: FakeTask) -> None:
        await self.ts.enter(t)
        self.started.append(t)

    async def finish(self, t: FakeTask) -> None:
        self.ts.remove(t)
        await settle()

    def running(self) -> list[FakeTask]:
        return [t for t in self.started if t.seq in self.ts.tasks]


def test_fair_gives_a_free_place_to_the_nexus_that_waited_least_served():
    """Depth 2: nexus a fills the LU with 6 commands; b's single command,
    which arrived last, starts at the first free place, not after a's four."""
    async def main():
        r = Recorder(depth=2)
        a = [FakeTask(f"a{i}", S, A) for i in range(6)]
        b0 = FakeTask("b0", S, B)
        await r.submit(*a, b0)
        assert r.started == a[:2]
        await r.finish(a[0])
        assert r.started == [*a[:2], b0]
        for t in (a[1], b0, *a[2:]):
            await r.finish(t)
        assert r.started == [*a[:2], b0, *a[2:]]   # a's own commands keep their order
        assert not r.ts.tasks
    run(main())


def test_fair_shares_bytes_not_commands():
    """Both nexuses always have work waiting; a moves 64 KiB a command, b 4 KiB.
    Start-time fair queueing keeps the service they got (bytes + COMMAND_COST)
    within one largest command of each other at every point."""
    async def main():
        r = Recorder(depth=1)
        big = [FakeTask(f"a{i}", S, A, 64 << 10) for i in range(12)]
        small = [FakeTask(f"b{i}", S, B, 4 << 10) for i in range(120)]
        await r.submit(*big, *small)
        served = {"a": 0, "b": 0}
        bound = (64 << 10) + (4 << 10) + 2 * COMMAND_COST
        await r.finish(big[0])             # it started on an idle LU, before anything waited
        while r.running():
            t = r.running()[0]
            served[t.nexus.key] += t.exp_len + COMMAND_COST
            if any(x.seq in r.ts.tasks and x not in r.started for x in big) and \
                    any(x.seq in r.ts.tasks and x not in r.started for x in small):
                assert abs(served["a"] - served["b"]) <= bound, served
            await r.finish(t)
        assert len(r.started) == 132
        # in commands the split is far from even: b gets about 8 for each of a's
        first_24 = [t.nexus.key for t in r.started[:24]]
        assert first_24.count("b") >= 3 * first_24.count("a")
    run(main())


def test_fair_ordered_still_waits_for_every_older_task():
    """Fairness would pick b's ORDERED task (b has had nothing), but SAM puts
    it after every older task, running or waiting; a's newer task waits for it."""
    async def main():
        r = Recorder(depth=1)
        a1, a2 = FakeTask("a1", S, A), FakeTask("a2", S, A)
        o = FakeTask("o", O, B)
        a3 = FakeTask("a3", S, A)
        await r.submit(a1, a2, o, a3)
        assert r.started == [a1]
        await r.finish(a1)
        assert r.started == [a1, a2]        # older than o: it goes first
        await r.finish(a2)
        assert r.started == [a1, a2, o]
        await r.finish(o)
        assert r.started == [a1, a2, o, a3]
    run(main())


def test_fair_head_of_queue_starts_beyond_the_depth():
    async def main():
        r = Recorder(depth=1)
        a1, a2 = FakeTask("a1", S, A), FakeTask("a2", S, A)
        h = FakeTask("h", H, B)
        await r.submit(a1, a2, h)
        assert r.started == [a1, h]
        await r.finish(a1)
        assert r.started == [a1, h]         # a2 is newer than the HEAD OF QUEUE task
        await r.finish(h)
        assert r.started == [a1, h, a2]
    run(main())


def test_fair_aborted_waiters_leave_nothing_behind():
    """Tasks aborted while they wait (the head of a queue, one behind it, one
    waiting alone) leave no trace: the others start, and once the set is
    empty so is every per-nexus structure."""
    async def main():
        r = Recorder(depth=1)
        a = [FakeTask(f"a{i}", S, A) for i in range(4)]
        b0 = FakeTask("b0", S, B)
        await r.submit(*a, b0)
        assert r.started == [a[0]]
        for t in (a[1], a[3], b0):
            r.waits[t.name].cancel()
            await settle()
            await r.finish(t)
        await r.finish(a[0])
        assert r.started == [a[0], a[2]]
        await r.finish(a[2])
        ts = r.ts
        assert not ts.tasks and not ts._running and not ts._queues and not ts._finish and not ts._queued \
            and not ts._count
    run(main())


def test_fair_new_task_is_not_stranded_by_an_abort():
    """A head aborted while nothing runs leaves a heap entry behind; a task
    arriving then still starts (the place is free)."""
    async def main():
        r = Recorder(depth=1)
        a0, a1 = FakeTask("a0", S, A), FakeTask("a1", S, A)
        await r.submit(a0, a1)
        r.waits["a1"].cancel()
        await settle()
        await r.finish(a1)
        await r.finish(a0)
        b0 = FakeTask("b0", S, B)
        await r.submit(b0)
        assert r.started == [a0, b0]
    run(main())


# ---------------------------------------------------------------- the setting

def test_scheduler_setting_is_validated_and_saved(tmp_path):
    """`scheduler` is one LUN key: the TOML file and a --lun spec set it, a bad
    value is one line naming the field, and a save writes it (the default is
    left out) so a reload brings the same policy back."""
    import textwrap

    from stml import config, persist
    from stml.lu import LogicalUnit
    from backends.ram import RamBackend
    src = tmp_path / "in.toml"
    src.write_text(textwrap.dedent("""
        [[target]]
        name = "iqn.2026-01.org.example:a"
        [[target.lun]]
        backend = "ram"
        size = "1MiB"
        scheduler = "fair"
        [[target.lun]]
        backend = "ram"
        size = "1MiB"
    """))
    cfg = config.load(str(src), data_dir=str(tmp_path))
    fair, fifo = (lc.options for lc in cfg.targets[0].luns)
    assert (fair.scheduler, fifo.scheduler) == ("fair", "fifo")
    lus = [LogicalUnit("t", n, RamBackend(1 << 20), o, None) for n, o in enumerate((fair, fifo))]
    assert [type(lu.task_set).__name__ for lu in lus] == ["FairTaskSet", "FifoTaskSet"]

    fifo.scheduler = "fair"                  # the running model changes; a save records it
    out = tmp_path / "out.toml"
    persist.save(cfg, out)
    text = out.read_text()
    assert text.count('scheduler = "fair"') == 2
    again = config.load(str(out), data_dir=str(tmp_path))
    assert [lc.options.scheduler for lc in again.targets[0].luns] == ["fair", "fair"]
    fair.scheduler = fifo.scheduler = "fifo"
    persist.save(cfg, out)
    saved = tomllib.loads(out.read_text())   # back to the default: the key goes
    assert all("scheduler" not in lun for lun in saved["target"][0]["lun"])

    spec = config.load(None, str(tmp_path), luns=("ram:1MiB,scheduler=fair",))
    assert spec.targets[0].luns[0].options.scheduler == "fair"
    for bad in ('scheduler = "round-robin"', "scheduler = 3", 'scheduler = ["fair"]'):
        src.write_text(textwrap.dedent(f"""
            [[target]]
            name = "iqn.2026-01.org.example:a"
            [[target.lun]]
            backend = "ram"
            size = "1MiB"
            {bad}
        """))
        with pytest.raises(config.ConfigError) as e:
            config.load(str(src), data_dir=str(tmp_path))
        assert str(e.value).startswith("target[0].lun[0].scheduler: ") and "\n" not in str(e.value)


def test_fair_lun_serves_two_initiators(stml_factory, client_factory, tmp_short):
    """A file LUN (its backend calls wait for worker threads) under the fair
    policy: two initiators keep many writes in flight at once, with an
    ORDERED write among them; every command ends GOOD and every block reads
    back as written."""
    import struct
    img = tmp_short() / "lun.img"
    stml = stml_factory(f"file:{img},size=8MiB,scheduler=fair")
    a, b = client_factory(stml.endpoint), client_factory(stml.endpoint)
    a.capacity()
    b.capacity()

    def write(lba: int, fill: int) -> bytes:
        return struct.pack(">BBQIBB", 0x8A, 0, lba, 8, 0, 0), bytes([fill]) * 4096

    futures = []
    for i in range(48):
        cdb, data = write(i * 8, i + 1)
        futures.append(a.submit(0, cdb, data_out=data))
        if i % 8 == 0:
            cdb, data = write(1024 + i * 8, 0xB0 + i // 8)
            attr = TaskAttr.ORDERED if i == 24 else TaskAttr.SIMPLE
            futures.append(b.submit(0, cdb, data_out=data, attr=attr))
    for f in futures:
        f.result(30).check()
    for i in range(48):
        assert a.read(0, i * 8, 8) == bytes([i + 1]) * 4096
    for i in range(0, 48, 8):
        assert b.read(0, 1024 + i * 8, 8) == bytes([0xB0 + i // 8]) * 4096


def test_fair_lun_survives_aborts_of_waiting_tasks(stml_factory, client_factory, tmp_short):
    """LUN RESET and ABORT TASK SET while many tasks wait in the fair policy's
    queues: every command ends (GOOD or aborted), and the LU serves on."""
    import concurrent.futures
    import struct

    from fetd_loopback.client import TaskAborted
    from stml.api import Tmf, TmfResponse
    img = tmp_short() / "lun.img"
    stml = stml_factory(f"file:{img},size=8MiB,scheduler=fair")
    a, b = client_factory(stml.endpoint), client_factory(stml.endpoint)
    a.capacity()
    b.capacity()
    for fn, who in ((Tmf.ABORT_TASK_SET, a), (Tmf.LUN_RESET, b)):
        futures = [c.submit(0, struct.pack(">BBQIBB", 0x8A, 0, i * 64, 64, 0, 0), data_out=bytes(32768))
                   for i in range(32) for c in (a, b)]
        assert who.task_mgmt(fn, 0) == TmfResponse.COMPLETE
        for f in futures:
            try:
                f.result(30).check()
            except TaskAborted:
                pass
            except concurrent.futures.TimeoutError:
                raise AssertionError("a command never ended") from None
            except Exception as e:   # the other nexus's tasks after a LUN RESET: a unit attention or TASK ABORTED
                assert "status" in str(e)
    for c in (a, b):
        c.write(0, 8, bytes([7]) * 4096)
        assert c.read(0, 8, 8) == bytes([7]) * 4096
    assert stml.alive()


def test_every_policy_counts_a_non_simple_task_in_and_out_alike(policy):
    """A task whose attribute is not SIMPLE, ORDERED or HEAD OF QUEUE (ACA:
    the STML refuses it before any task set, but a policy must not depend on
    that) leaves the ordering count as it found it: later tasks still start,
    also those the fair policy had to queue."""
    async def main():
        ts = policy()
        if isinstance(ts, FairTaskSet):
            ts.depth = 1
        x = FakeTask("x", TaskAttr.ACA)
        ts.add(x)
        assert (await _entered(ts, x)).done()
        ts.remove(x)
        s1, s2 = FakeTask("s1", S, A), FakeTask("s2", S, B)
        ts.add(s1)
        ts.add(s2)
        assert (await _entered(ts, s1)).done()
        wait = await _entered(ts, s2)
        ts.remove(s1)
        await asyncio.wait_for(wait, 1)
        ts.remove(s2)
        o = FakeTask("o", O)
        ts.add(o)
        assert (await _entered(ts, o)).done()      # nothing older: an ORDERED task starts at once
    run(main())
