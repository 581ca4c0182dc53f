"""LUN add/remove inside the STML, with the real Management and Emulator:
the REPORTED LUNS DATA CHANGED unit attentions go out through the engine's
fan-out (bounded work per turn of the loop, one asynchronous event per
nexus), and a removed LU's backend is closed only once no call of it can run,
after which its descriptor number is never used again (docs/decisions/0254);
and config saves run in a thread of their own, in order, before their replies."""
from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends import open_backend
from backends.file import FileBackend
from stml import emulator as emulator_mod
from stml.api import Op
from stml.config import Config, LunConfig, TargetConfig
from stml.emulator import Emulator, Target
from stml.lu import LogicalUnit, LunOptions
from stml.mgmt import Management
from stml.task import Task

IQN = "iqn.2026-11.org.test:luns"
LUNS, NEXUSES, STEP = 40, 100, 1000
REPORTED_LUNS_DATA_CHANGED = (0x3F, 0x0E)


def setup(sent: list, luns: int = LUNS, nexuses: int = NEXUSES) -> tuple[Emulator, Management]:
    """An emulator with `luns` RAM LUs and `nexuses` I_T nexuses of one front
    end that takes asynchronous events, and the Management that changes it."""
    emu = Emulator([], lambda ident, h, f: sent.append(h), ThreadPoolExecutor(2))
    lus = {n: LogicalUnit(IQN, n, open_backend("ram", 1 << 20), LunOptions(kind="ram", size=1 << 20),
                          emu.templates["disk"]) for n in range(luns)}
    emu.targets[IQN] = Target(IQN, lus, "", {"acl": []})
    config = Config(Path("/nonexistent"), [TargetConfig(IQN, [LunConfig(n, lu.options) for n, lu in lus.items()])],
                    "ipc:///nonexistent", [])
    m = Management(emu, config, gateway=None, metrics=None, portals=None,   # type: ignore[arg-type]
                   endpoints=[], traces=None)   # type: ignore[arg-type]
    emu.handle(b"fe", {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": "t",
                       "heartbeat_ms": 1000, "aen": True}, [])
    for n in range(1, nexuses + 1):
        emu.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": n, "initiator": f"iqn.2026-11.org.test:{n}",
                           "target": IQN, "tpg": 1}, [])
    sent.clear()
    return emu, m


def saved_ram_lu(tmp_path: Path, ident: str, fill: bytes) -> tuple[Emulator, Management, LogicalUnit]:
    """One RAM LU with one nexus, its id `ident`, its first 4 KiB `fill`, in
    a config file saved in `tmp_path`: what a reload that moves it starts from."""
    from stml import persist
    emu, m = setup([], luns=1, nexuses=1)
    lu = emu.targets[IQN].luns[0]
    lu.options.id = ident
    lu.backend.write_from(0, [memoryview(fill * 4096)], sync=False)
    m.config.path = tmp_path / "scsi-target.toml"
    m.config.data_dir = tmp_path
    persist.save(m.config)
    return emu, m, lu


def counted_steps(emu: Emulator, change) -> list[int]:
    """Run `change` (a coroutine) and count the unit attentions stored on the
    target's LUs after each turn of the event loop until it is done."""
    async def run() -> list[int]:
        job = asyncio.get_running_loop().create_task(change)
        steps = [0]
        while not job.done():
            await asyncio.sleep(0)
            steps.append(sum(len(lu.unit_attentions) for lu in emu.targets[IQN].luns.values()))
        job.result()
        return steps
    return asyncio.run(run())


@pytest.mark.parametrize("verb", ["lun_add", "lun_remove"])
def test_lun_change_uas_fan_out_in_bounded_steps_with_one_event_per_nexus(verb, monkeypatch):
    monkeypatch.setattr(emulator_mod, "FANOUT_STEP", STEP)
    sent: list = []
    emu, m = setup(sent)
    change = m.lun_add("ram:1MiB", IQN) if verb == "lun_add" else m.lun_remove(LUNS - 1, IQN)
    steps = counted_steps(emu, change)
    others = [lu for lu in emu.targets[IQN].luns.values() if lu.lun < LUNS - 1]
    assert all(lu.unit_attentions == {k: [REPORTED_LUNS_DATA_CHANGED] for k in emu.nexus_keys(IQN)}
               for lu in others)
    growth = max(b - a for a, b in zip(steps, steps[1:]))
    assert 0 < growth <= STEP                  # never the whole 3,900 in one turn
    aens = [h for h in sent if h["op"] == Op.REPORT_AEN]
    assert len(aens) == NEXUSES and len({h["nexus"] for h in aens}) == NEXUSES   # one per nexus, not per LU


def test_a_removed_lus_backend_closes_only_when_no_call_of_it_runs(tmp_path):
    """A call of the LU in a worker thread (as another LU's EXTENDED COPY makes
    one) keeps its backend open after `lun remove`; it closes once the call
    ended."""
    sent: list = []
    emu, m = setup(sent, luns=1, nexuses=1)
    release = threading.Event()

    async def run() -> None:
        await m.lun_add(f"file:{tmp_path}/a.img,size=1MiB", IQN, 1)
        lu = emu.targets[IQN].luns[1]
        backend = lu.backend
        assert isinstance(backend, FileBackend)
        call = emu.workers.run(id(lu), release.wait)
        await m.lun_remove(1, IQN)
        for _ in range(20):                      # the closer polls: give it many turns
            await asyncio.sleep(0.01)
        assert backend._fd >= 0 and emu.workers.pending(id(lu)) == 1
        release.set()
        await call
        await asyncio.gather(*m._closing.values())
        assert backend._fd == -1
    try:
        asyncio.run(run())
    finally:
        release.set()


def test_a_closed_file_backend_never_uses_its_old_descriptor_number(tmp_path):
    """After close, a late write fails (EBADF) instead of landing in the file
    that the process opened next under the same number."""
    b = FileBackend(str(tmp_path / "a.img"), 1 << 20)
    number = b._fd
    b.close()
    other = tmp_path / "b.img"
    fd = os.open(other, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 4096)
        assert fd == number                       # the number is reused at once
        with pytest.raises(OSError):
            b.write_from(0, [memoryview(b"EVIL" * 1024)], sync=False)
        with pytest.raises(OSError):
            b.read_into(0, memoryview(bytearray(512)))
        b.close()                                 # a second close does nothing
        assert os.pread(fd, 4096, 0) == bytes(4096)
    finally:
        os.close(fd)


def test_config_saves_run_off_the_loop_in_order_before_their_replies(tmp_path, monkeypatch):
    """Two changes sent at once: each save runs in the saver thread (its fsyncs
    never on the loop), the second after the first, and each reply leaves
    after its own save."""
    from stml import persist
    sent: list = []
    emu, m = setup(sent, luns=1, nexuses=1)
    m.config.path = tmp_path / "scsi-target.toml"
    m.config.data_dir = tmp_path
    persist.save(m.config)
    events: list = []
    real = persist.atomic_write

    def write(path, data, secret):
        real(path, data, secret)
        events.append(("saved", threading.current_thread() is threading.main_thread(), data.decode()))
    monkeypatch.setattr(persist, "atomic_write", write)
    emu.out.mgmt_reply = lambda ident, rid, ok, result, error: events.append(("reply", rid, ok, error))

    async def run() -> None:
        m.handle(b"cli", {"op": "mgmt", "id": 1, "cmd": "lun_add", "args": {"spec": "ram:1MiB", "target": IQN}})
        m.handle(b"cli", {"op": "mgmt", "id": 2, "cmd": "acl_add",
                          "args": {"initiator": "iqn.2026-11.org.test:allowed", "target": IQN}})
        while len([e for e in events if e[0] == "reply"]) < 2:
            await asyncio.sleep(0.01)
    asyncio.run(run())
    assert [e[:2] for e in events] == [("saved", False), ("reply", 1), ("saved", False), ("reply", 2)]
    assert [e[2] for e in events if e[0] == "reply"] == [True, True]
    first, second = events[0][2], events[2][2]
    assert "lun = 1" in first and "allowed" not in first
    assert "lun = 1" in second and "iqn.2026-11.org.test:allowed" in second


def test_a_task_aborted_twice_still_waits_for_its_backend_call(tmp_path):
    """A LUN RESET, then `lun remove` of a task whose backend call runs in a
    worker thread: the task ends only after the call, as after one abort (a
    second cancel used to cut that wait short, and the backend could close
    under the call)."""
    sent: list = []
    emu, _ = setup(sent, luns=1, nexuses=1)
    lu = LogicalUnit(IQN, 1, FileBackend(str(tmp_path / "a.img"), 1 << 20), LunOptions(kind="file"),
                     emu.templates["disk"])
    fe = next(iter(emu.front_ends.values()))
    release = threading.Event()

    async def run() -> None:
        task = Task(emu, fe, fe.nexuses[1], 7, 1, bytes(16), 0, 0, 0, 0, [])
        task.runner = runner = asyncio.get_running_loop().create_task(task.io_on(lu, release.wait))
        lu.task_set.add(task)
        while not emu.workers.running.get(id(lu)):
            await asyncio.sleep(0)                # until the call runs in a thread
        emu._abort(task, None)                    # the LUN RESET
        await asyncio.sleep(0)
        assert emu.abort_lu(lu) == [runner]       # the removal
        for _ in range(5):
            await asyncio.sleep(0)
        assert not runner.done() and emu.workers.pending(id(lu)) == 1
        release.set()
        await asyncio.wait([runner])
        assert runner.cancelled() and task.abort_status == 0x40
    try:
        asyncio.run(run())
    finally:
        release.set()
        lu.backend.close()


def test_target_remove_force_drops_its_nexuses_in_bounded_steps():
    """`target remove --force` tells each nexus's front end to drop it
    (drop_nexus, docs/decisions/0265) and releases it in the STML, at most
    FANOUT_STEP nexuses per turn of the event loop."""
    sent: list = []
    many = 3 * emulator_mod.FANOUT_STEP + 10
    emu, m = setup(sent, luns=2, nexuses=many)

    async def run() -> list[int]:
        job = asyncio.get_running_loop().create_task(m.target_remove(IQN, force=True))
        steps = [0]
        while not job.done():
            await asyncio.sleep(0)
            steps.append(len([h for h in sent if h["op"] == Op.DROP_NEXUS]))
        job.result()
        return steps
    steps = asyncio.run(run())
    drops = [h for h in sent if h["op"] == Op.DROP_NEXUS]
    assert sorted(h["nexus"] for h in drops) == list(range(1, many + 1))
    assert {h["reason"] for h in drops} == {f"target {IQN} removed"}
    assert max(b - a for a, b in zip(steps, steps[1:])) <= emulator_mod.FANOUT_STEP
    assert list(emu.nexuses(IQN)) == [] and emu.front_ends[b"fe"].nexuses == {} and IQN not in emu.targets


def test_target_remove_force_ends_every_front_end_sharing_a_nexus_key():
    """One initiator port through one port group from two front ends is one
    I_T nexus key held twice: both are told to drop it and both let it go
    (dropping the first must not hide the second from the walk)."""
    sent: list = []
    emu, m = setup(sent, luns=1, nexuses=0)
    emu.handle(b"fe2", {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": "t2",
                        "heartbeat_ms": 1000, "aen": True}, [])
    for fe in (b"fe", b"fe2"):
        emu.handle(fe, {"op": Op.REGISTER_NEXUS, "nexus": 1, "initiator": "iqn.2026-11.org.test:1",
                        "target": IQN, "tpg": 1}, [])
    assert len(list(emu.nexuses(IQN))) == 2
    sent.clear()
    asyncio.run(m.target_remove(IQN, force=True))
    assert len([h for h in sent if h["op"] == Op.DROP_NEXUS]) == 2
    assert emu.front_ends[b"fe"].nexuses == {} and emu.front_ends[b"fe2"].nexuses == {}


def test_target_remove_force_visits_no_task_of_a_front_end_but_its_nexuses_own():
    """A front end's tasks (here 5,000 of other targets) are not visited: each
    dropped nexus aborts its own (0239); they were once per step of
    FANOUT_STEP nexuses."""
    sent: list = []
    emu, m = setup(sent, luns=1, nexuses=600)
    visits = [0]

    class Counted(dict):
        def values(self):  # type: ignore[override]
            for v in super().values():
                visits[0] += 1
                yield v
    emu.front_ends[b"fe"].tasks = Counted({i: SimpleNamespace(nexus=None) for i in range(5000)})

    per_turn = visits_per_turn(m.target_remove(IQN, force=True), visits)
    assert sum(per_turn) == 0 and not emu.front_ends[b"fe"].nexuses


def test_lun_add_refuses_a_file_another_lun_serves_under_another_name(tmp_path):
    """`lun add` of a file a LUN already serves, named through a symlink or a
    hard link, is refused as the same path is: two LUs would serve one medium
    under two identities (docs/decisions/0277)."""
    sent: list = []
    emu, m = setup(sent, luns=0, nexuses=0)
    m.config.data_dir = tmp_path
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    (tmp_path / "link.img").symlink_to(tmp_path / "disk.img")
    (tmp_path / "hard.img").hardlink_to(tmp_path / "disk.img")
    (tmp_path / "other.img").write_bytes(bytes(1 << 20))
    replies: list = []
    emu.out.mgmt_reply = lambda ident, rid, ok, result, error: replies.append((rid, ok, error))

    async def run() -> None:
        for rid, name in enumerate(["disk.img", "link.img", "hard.img", f"../{tmp_path.name}/disk.img",
                                    "other.img"]):
            m.handle(b"cli", {"op": "mgmt", "id": rid, "cmd": "lun_add",
                              "args": {"spec": f"file:{tmp_path / name}", "target": IQN}})
            for _ in range(3000):        # each answer comes within a few turns (the opens are local)
                if len(replies) > rid:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"no answer to lun_add {name}")
    try:
        asyncio.run(run())
        assert [ok for _, ok, _ in replies] == [True, False, False, False, True]
        for _, _, error in replies[1:4]:
            assert error.endswith(f".img already backs target {IQN} LUN 0"), error
        assert sorted(emu.targets[IQN].luns) == [0, 1]
    finally:
        for lu in emu.targets[IQN].luns.values():
            lu.backend.close()


def test_ram_luns_may_not_outgrow_the_hosts_memory(monkeypatch):
    """A RAM LU's pages are allocated as initiators write: `lun add` and
    `lun resize` refuse RAM LUNs that together exceed the host's memory
    (filling them would get the STML killed, every LU with it); shrinking,
    and RAM up to the memory, stay allowed (docs/decisions/0279)."""
    from stml import config as config_mod
    from stml.mgmt import MgmtError
    sent: list = []
    emu, m = setup(sent, luns=4, nexuses=1)          # 4 MiB of RAM LUs
    monkeypatch.setattr(config_mod, "host_memory", lambda: 6 << 20)

    async def run() -> None:
        await m.lun_add("ram:2MiB", IQN)              # 6 MiB: all of it
        with pytest.raises(MgmtError, match="RAM LUNs would total 7 MiB, more than this host's memory"):
            await m.lun_add("ram:1MiB", IQN)
        with pytest.raises(MgmtError, match="use a file LUN"):
            await m.lun_resize(0, "2MiB", IQN)
        await m.lun_resize(4, "1MiB", IQN, force=True)   # a shrink frees room
        await m.lun_resize(0, "2MiB", IQN)
    asyncio.run(run())
    assert sorted(emu.targets[IQN].luns) == [0, 1, 2, 3, 4]
    assert [emu.targets[IQN].luns[n].blocks * 512 for n in (0, 4)] == [2 << 20, 1 << 20]


def test_an_lu_added_at_a_removed_lus_number_carries_the_unit_attention():
    """`lun remove 3` then `lun add --lun 3` of another disk: a nexus that
    addressed the old LU 3 used to reach the new one with no unit attention
    on it (REPORTED LUNS DATA HAS CHANGED waited on the other LUs), so its
    next WRITE to LUN 3 landed on another disk unannounced. The new LU
    carries the UA too; an LU at a number never used does not (0254)."""
    sent: list = []
    emu, m = setup(sent, luns=4, nexuses=2)
    keys = set(emu.nexus_keys(IQN))
    t = emu.targets[IQN]

    async def run() -> None:
        await m.lun_remove(3, IQN)
        await m.lun_add("ram:1MiB", IQN, 3)
        assert set(t.luns[3].unit_attentions) == keys
        assert all(uas == [REPORTED_LUNS_DATA_CHANGED] for uas in t.luns[3].unit_attentions.values())
        await m.lun_add("ram:1MiB", IQN, 7)
        assert t.luns[7].unit_attentions == {}
    asyncio.run(run())


def test_a_reused_number_is_reachable_only_once_every_nexus_has_its_unit_attention(monkeypatch):
    """The fan-out of a unit attention takes loop turns (FANOUT_STEP nexus
    entries each): the new LU at a removed LU's number must not be served
    to a nexus before its UA is set for it, in any turn (review 9: it was
    reachable for several turns before the last nexuses had theirs)."""
    monkeypatch.setattr(emulator_mod, "FANOUT_STEP", 2)
    sent: list = []
    emu, m = setup(sent, luns=8, nexuses=4)
    keys = set(emu.nexus_keys(IQN))
    t = emu.targets[IQN]
    unwarned: list[int] = []

    async def run() -> None:
        await m.lun_remove(3, IQN)
        old = t.luns.get(3)
        done = False

        async def watch() -> None:
            while not done:
                lu = t.luns.get(3)
                if lu is not None and lu is not old:
                    unwarned.append(len(keys - set(lu.unit_attentions)))
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        await m.lun_add("ram:1MiB", IQN, 3)
        done = True
        await watcher

    asyncio.run(run())
    assert unwarned and set(unwarned) == {0}


class CountedLuns(dict):
    """A target's LUs that count each LU a walk of them visits."""

    def __init__(self, lus: dict, visits: list[int]) -> None:
        super().__init__(lus)
        self.visits = visits

    def values(self):  # type: ignore[override]
        for v in super().values():
            self.visits[0] += 1
            yield v

    def __contains__(self, key: object) -> bool:   # (a search for a free LUN number)
        self.visits[0] += 1
        return super().__contains__(key)


def visits_per_turn(change, visits: list[int]) -> list[int]:
    """Run `change` (a coroutine) and count what it visits (`visits[0]`) in each turn of the loop."""
    async def run() -> list[int]:
        job = asyncio.get_running_loop().create_task(change)
        per_turn = []
        while not job.done():
            before = visits[0]
            await asyncio.sleep(0)
            per_turn.append(visits[0] - before)
        job.result()
        return per_turn
    return asyncio.run(run())


WALKS = {   # management commands that walk every LU, and how each is called
    "lun_add ram (_ram)": lambda m, tmp: m.lun_add("ram:1MiB", IQN),
    "lun_add file (a duplicate?)": lambda m, tmp: m.lun_add(f"file:{tmp}/new.img,size=1MiB", IQN),
    "lun_resize ram (_ram)": lambda m, tmp: m.lun_resize(0, "2MiB", IQN),
    "lun_remove": lambda m, tmp: m.lun_remove(0, IQN),
    "lun_list": lambda m, tmp: m.lun_list(),
    "target_remove": lambda m, tmp: m.target_remove(IQN, force=True),
    "acl_add (detect)": lambda m, tmp: m.acl_add("iqn.2026-11.org.test:1", IQN),
}


@pytest.mark.parametrize("verb", list(WALKS))
def test_management_walks_its_lus_a_bounded_number_per_loop_turn(verb, tmp_path, monkeypatch):
    """`_ram`, `lun add`'s duplicate check and free number, the unit attention
    lists, `lun list`, `target remove` and every detect (sent after a change) visit at
    most FANOUT_STEP LUs per turn of the event loop, however many the
    target has (0267); before, each walked all of them in one step."""
    from stml import mgmt as mgmt_mod
    step = 16
    monkeypatch.setattr(mgmt_mod, "FANOUT_STEP", step)
    sent: list = []
    emu, m = setup(sent, luns=10 * step, nexuses=2)
    m.config.data_dir = tmp_path
    visits = [0]
    t = emu.targets[IQN]
    t.luns = CountedLuns(t.luns, visits)
    per_turn = visits_per_turn(WALKS[verb](m, tmp_path), visits)
    assert sum(per_turn) >= 10 * step                    # it walked them all
    assert max(per_turn) <= step, per_turn               # never all 160 in one turn
    for lu in t.luns.values():
        lu.backend.close()


def test_a_change_reads_the_config_file_in_a_thread(tmp_path, monkeypatch):
    """The check that the file was not edited by hand (before each change),
    `config show`, `config diff` and `config save --force` read the config
    file in a worker thread, never on the event loop (a hung NFS mount
    must not stop the STML); `config reload` models every LUN there too."""
    from stml import mgmt as mgmt_mod
    from stml import persist
    sent: list = []
    emu, m = setup(sent, luns=2, nexuses=1)
    m.config.path = tmp_path / "scsi-target.toml"
    m.config.data_dir = tmp_path
    persist.save(m.config)
    reads: list[tuple[str, bool]] = []
    loop_thread = threading.main_thread()        # asyncio.run's loop runs here

    def counted(name, real):
        def read(*args):
            reads.append((name, threading.current_thread() is loop_thread))
            return real(*args)
        return read
    for name in ("file_digest", "read_document", "model"):
        monkeypatch.setattr(mgmt_mod, name, counted(name, getattr(mgmt_mod, name)))

    async def run() -> None:
        await m.target_add("iqn.2026-11.org.test:other")
        await m.lun_remove(1, IQN)
        await m.acl_add("iqn.2026-11.org.test:1", IQN)
        assert "iqn.2026-11.org.test:other" in (await m.config_show())["text"]
        assert (await m.config_diff())["same"]
        await m.config_save(force=True)
        await m.config_reload()
    asyncio.run(run())
    assert {name for name, _ in reads} == {"file_digest", "read_document", "model"}
    assert len([r for r in reads if r[0] == "file_digest"]) >= 4   # one per change, diff, save --force
    assert [r for r in reads if r[1]] == []                        # none on the loop's thread


def test_a_recorded_image_identity_is_no_setting_a_reload_must_restart_for():
    """An RBD LUN's entry records its image's identity (0281); a file that
    lacks it (one the STML cannot write, a line deleted) is the same LUN, not
    a change a reload reports as needing a restart."""
    from stml.lu import LunOptions
    from stml.mgmt import _differs_beyond_size
    recorded = LunOptions("rbd", path="rbd/img", image_identity="ab" * 16)
    assert not _differs_beyond_size(LunOptions("rbd", path="rbd/img"), recorded)
    assert _differs_beyond_size(LunOptions("rbd", path="rbd/other"), recorded)


def test_an_added_lus_reservations_file_is_read_in_a_thread(tmp_path, monkeypatch):
    """`lun add` (and a reload's added LUN) found its APTPL file in a thread
    but read it on the event loop (a hung NFS mount would stop the STML): the
    read is the thread's too, and what it read is restored; a file that
    cannot be used still refuses the LUN in one line (0267)."""
    import json

    from stml import persist, pr
    from stml.mgmt import MgmtError
    sent: list = []
    emu, m = setup(sent, luns=1, nexuses=1)
    m.config.path = tmp_path / "scsi-target.toml"
    m.config.data_dir = emu.data_dir = tmp_path
    persist.save(m.config)
    ident = "ab" * 16
    (tmp_path / "pr").mkdir()
    (tmp_path / "pr" / f"{ident}_5.json").write_text(json.dumps({
        "version": 1, "target": IQN, "lun": 5, "generation": 3, "reservation": None,
        "registrations": [{"key": 0xB5, "initiator": "iqn.2026-11.org.test:1", "target": IQN, "tpg": 1}]}))
    (tmp_path / "pr" / f"{'cd' * 16}_6.json").write_text("{not json")
    reads: list[bool] = []
    real = pr.FileStore.read

    def read(self):
        reads.append(threading.current_thread() is threading.main_thread())   # asyncio.run's loop runs there
        return real(self)
    monkeypatch.setattr(pr.FileStore, "read", read)

    async def run() -> None:
        lu = await m._add_lun(emu.targets[IQN], 5, LunOptions(kind="ram", size=1 << 20, id=ident))
        assert [r.key for r in pr.state(lu).regs] == [0xB5]
        with pytest.raises(MgmtError, match="unusable"):
            await m._add_lun(emu.targets[IQN], 6, LunOptions(kind="ram", size=1 << 20, id="cd" * 16))
    asyncio.run(run())
    assert reads == [False, False]   # both read, neither on the loop's thread


def test_a_ram_lu_whose_close_outlasts_the_reload_moving_it_keeps_its_data(tmp_path, monkeypatch, caplog):
    """A reload moves a RAM LU to another target (0249) while a call of it
    is still under way: its close outlasts the add's wait, and the add is
    refused. Its store used to be freed when the close ended (the
    move was decided then, and the reload was over): the next reload served
    the LU empty under its identity. The move is decided at the removal
    (0708): the store waits for the next reload, which serves it with its
    data, and the logs say so."""
    import tomlkit

    from stml import mgmt as mgmt_mod
    monkeypatch.setattr(mgmt_mod, "CLOSE_WAIT", 0.0)   # the add does not wait for the call
    other = "iqn.2026-11.org.test:other"
    emu, m, lu = saved_ram_lu(tmp_path, "ab" * 16, b"\x5a")
    release = threading.Event()

    def move() -> None:
        doc = tomlkit.parse(m.config.path.read_text())
        first = next(t for t in doc["target"] if t["name"] == IQN)
        second = next(t for t in doc["target"] if t["name"] == other)
        entry = first["lun"][0]
        first["lun"].remove(entry)
        second["lun"] = tomlkit.aot()
        second["lun"].append(entry)
        m.config.path.write_text(tomlkit.dumps(doc))

    async def run() -> tuple[dict, dict]:
        await m.target_add(other)
        # another LU's EXTENDED COPY has a call of it running (a RAM LU's own
        # calls are made in place): the removed LU closes once it is over
        call = emu.workers.run(id(lu), release.wait)
        move()
        first = await m.config_reload()
        release.set()
        await call
        await asyncio.gather(*m._closing.values())
        return first, await m.config_reload()
    try:
        first, second = asyncio.run(run())
    finally:
        release.set()
    assert [line for line in first["not_applied"] if "commands are still ending: reload again" in line], first
    assert f"target {other} LUN 0 added" in second["applied"] and second["not_applied"] == [], second
    moved = emu.targets[other].luns[0]
    assert moved.backend is lu.backend
    out = bytearray(4096)
    moved.backend.read_into(0, memoryview(out))
    assert out == b"\x5a" * 4096
    assert f"{IQN} LUN 0 removed: its RAM moves with its id to target {other} at the next reload" in caplog.text
    assert "its data is freed" not in caplog.text


def test_a_reload_never_serves_one_id_in_two_targets(tmp_path):
    """A reload keeps a target the file removed while it has sessions; the
    file gave its RAM LU's entry to another target. Adding it there opened a
    new, empty store under the same id: one disk to initiators, served twice,
    once blank. The add is refused and said (0716); the kept LU keeps its
    data, and a reload once its session ended moves it (0249)."""
    import tomlkit
    other = "iqn.2026-11.org.test:other"
    emu, m, _ = saved_ram_lu(tmp_path, "cd" * 16, b"\xa5")

    async def run() -> tuple[dict, bool, dict]:
        doc = tomlkit.parse(m.config.path.read_text())
        entry = doc["target"][0]["lun"][0]
        doc["target"] = tomlkit.aot()
        doc["target"].append(tomlkit.table())
        doc["target"][0]["name"] = other
        doc["target"][0]["lun"] = tomlkit.aot()
        doc["target"][0]["lun"].append(entry)
        m.config.path.write_text(tomlkit.dumps(doc))
        first = await m.config_reload()
        twice = 0 in emu.targets[other].luns
        emu.handle(b"fe", {"op": Op.RELEASE_NEXUS, "nexus": 1}, [])   # its session ends
        return first, twice, await m.config_reload()
    first, twice, second = asyncio.run(run())
    assert any(f"target {IQN} has sessions" in line for line in first["not_applied"]), first
    assert (f"target {other} LUN 0: its id {'cd' * 16} is still served by target {IQN} LUN 0: "
            f"reload again once that LU is gone, or restart") in first["not_applied"], first
    assert not twice
    assert f"target {other} LUN 0 added" in second["applied"], second
    out = bytearray(4096)
    emu.targets[other].luns[0].backend.read_into(0, memoryview(out))
    assert out == b"\xa5" * 4096
