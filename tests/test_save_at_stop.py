"""A config save under way when the STML stops (decision 0259), through the
real StmlServer.serve, the save made slow by a hook in stml.persist's
atomic_write: the stop lets it end (the change it saves is in the file, and
its command answers) before the channel closes; a save hung on its file
system is abandoned after a bound with one line, and the STML exits without
joining the saver thread (a normal exit would wait for it forever: the last
test shows it with a real process)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from stml import config, persist, pr
from stml import server as server_mod
from stml.server import StmlServer
from support.faults import release_fifo
from support.procs import stop_pid
from support.target import StmlProcess


class HookedStml(StmlProcess):
    """`python -m stml`, with support.faults.hang_config_saves(*hook) run first."""

    def __init__(self, data_dir: Path, luns: tuple[str, ...], extra: tuple[str, ...],
                 hook: tuple[str, str, float]) -> None:
        super().__init__(data_dir, luns, extra)
        self.hook = hook

    def argv(self) -> list[str]:
        python, _, _, *args = super().argv()
        tests = str(Path(__file__).parent)   # support/ for the child, however pytest was started
        code = (f"import sys; sys.path.insert(0, {tests!r}); "
                f"from support.faults import hang_config_saves; hang_config_saves(*{self.hook!r}); "
                f"from stml.cli import main; main(prog_name='python -m stml')")
        return [python, "-c", code, *args]


class SlowSave:
    """persist.atomic_write that waits for `release` before it writes, as on
    a file system that hangs; `written` once the file is replaced."""

    def __init__(self, monkeypatch: Any) -> None:
        self.real = persist.atomic_write
        self.entered, self.release, self.written = threading.Event(), threading.Event(), threading.Event()
        monkeypatch.setattr(persist, "atomic_write", self)

    def __call__(self, path: Path, data: bytes, secret: bool) -> None:
        self.entered.set()
        self.release.wait()
        self.real(path, data, secret)
        self.written.set()


def _server(directory: Path) -> StmlServer:
    """An STML with one RAM LUN and a config file of its own."""
    srv = StmlServer(config.load(data_dir=str(directory / "data"), luns=("ram:1MiB",)))
    srv.config.path = directory / "scsi-target.toml"
    persist.save(srv.config)
    return srv


async def _until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(5000):   # (a guard against a hang, not a measure)
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def _stop_during_a_lun_add(srv: StmlServer, slow: SlowSave, replies: list) -> None:
    """Serve; `lun add` whose save is held; stop while it is; wait for the stop."""
    stop = asyncio.Event()
    serving = asyncio.create_task(srv.serve(stop))
    try:
        await _until(lambda: hasattr(srv, "channel"), "the STML serves")
        srv.emulator.out.mgmt_reply = lambda ident, rid, ok, result, error: replies.append((rid, ok, result))
        srv.mgmt.handle(b"cli", {"op": "mgmt", "id": 1, "cmd": "lun_add", "args": {"spec": "ram:1MiB"}})
        await _until(slow.entered.is_set, "the save started")
        stop.set()
        await asyncio.wait_for(serving, 60)
    finally:
        if srv._lock_fd is not None:   # (the process's exit would release the endpoint lock)
            os.close(srv._lock_fd)


def test_a_save_under_way_at_stop_ends_and_answers_before_the_stop_does(tmp_short, monkeypatch, caplog):
    srv = _server(tmp_short())
    slow = SlowSave(monkeypatch)
    replies: list = []
    shutdown = srv.emulator.shutdown

    def first_step_of_the_stop() -> None:
        slow.release.set()     # the save goes on once the stop has begun
        shutdown()
    srv.emulator.shutdown = first_step_of_the_stop   # type: ignore[method-assign]
    try:
        asyncio.run(_stop_during_a_lun_add(srv, slow, replies))
    finally:
        slow.release.set()
    assert slow.written.is_set()
    assert "lun = 1" in srv.config.path.read_text()
    assert replies == [(1, True, {"target": srv.config.targets[0].name, "lun": 1, "size": 1 << 20,
                                  "saved": f"saved to {srv.config.path}"})]
    assert not srv.abandoned
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_save_hung_at_stop_is_abandoned_after_a_bound_with_one_line(tmp_short, monkeypatch, caplog):
    monkeypatch.setattr(server_mod, "STOP_SAVE", 0.2)
    srv = _server(tmp_short())
    before = srv.config.path.read_text()
    slow = SlowSave(monkeypatch)
    replies: list = []
    try:
        asyncio.run(_stop_during_a_lun_add(srv, slow, replies))
        assert srv.abandoned           # run_stml exits by os._exit(1): no join of the hung thread
        assert not slow.written.is_set() and srv.config.path.read_text() == before
        assert replies == []           # its command never finished
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == [f"stopping: saving {srv.config.path} still running after 0.2s, abandoned: "
                          f"the change it saves may be missing from the file"]
    finally:
        slow.release.set()             # the thread ends: the test's directory can go
        assert slow.written.wait(60)


def test_no_save_begins_once_the_stml_stops(tmp_short, caplog):
    """A change whose save would begin after the stop began (its command was
    still applying it) is not saved: the reply and one line say so."""
    from stml.mgmt import Management
    srv = _server(tmp_short())
    before = srv.config.path.read_text()
    srv.mgmt = Management(srv.emulator, srv.config, gateway=None, metrics=None,  # type: ignore[arg-type]
                          portals=None, endpoints=[], traces=None)   # type: ignore[arg-type]
    replies: list = []
    srv.emulator.out.mgmt_reply = lambda ident, rid, ok, result, error: replies.append((rid, ok, result))

    async def run() -> None:
        assert await srv.mgmt.finish_saves(1) is True    # nothing under way
        srv.mgmt.handle(b"cli", {"op": "mgmt", "id": 1, "cmd": "lun_add", "args": {"spec": "ram:1MiB"}})
        await _until(lambda: bool(replies), "the reply")
    try:
        asyncio.run(run())
    finally:
        srv.sock.close(linger=0)
        srv.ctx.term()
    [(rid, ok, result)] = replies
    assert ok and result["saved"] == f"NOT saved to {srv.config.path}: the STML is stopping"
    assert result["save_error"].startswith(f"applied, but NOT saved to {srv.config.path}")
    assert srv.config.path.read_text() == before
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"the change is live but was not saved to {srv.config.path}: the STML is stopping"]


def test_an_stml_whose_config_save_hangs_still_stops(tmp_short):
    """A real STML process, its config save hung (a fault hook: it waits on a
    FIFO) under `scsi-target lun add`: SIGTERM stops it, exit 1, with the one
    line; a normal exit would have joined the saver thread forever."""
    d = tmp_short()
    cfg = d / "target.toml"
    # (ids given: the start has nothing to save, 0281)
    cfg.write_text('legacy_ids = false\n[[target]]\nname = "iqn.2026-11.org.test:hung-save"\n\n'
                   '[[target.lun]]\nbackend = "ram"\nsize = "1MiB"\nid = "' + "ab" * 16 + '"\n')
    fifo, started = d / "hang", d / "started"
    os.mkfifo(fifo)
    stml = HookedStml(d, (), ("--config", str(cfg)), hook=(str(fifo), str(started), 0.2))
    add = None
    try:
        stml.start()
        add = subprocess.Popen([sys.executable, "-m", "scsi_target", "lun", "add", "ram:1MiB",
                                "--data-dir", str(d), "--json"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        for _ in range(3000):          # (a guard against a hang, not a measure)
            if started.exists() or add.poll() is not None:
                break
            time.sleep(0.01)
        assert started.exists(), "the save never started"
        stml.proc.send_signal(signal.SIGTERM)
        assert stml.proc.wait(60) == 1
        line, = [x for x in stml.log().splitlines() if "abandoned" in x]
        assert f"stopping: saving {cfg} still running after 0.2s, abandoned" in line
        assert "ram" in cfg.read_text() and "lun = 1" not in cfg.read_text()
    finally:
        release_fifo(str(fifo))
        stml.stop()
        if add is not None:
            stop_pid(add)


def _unserved(srv: StmlServer) -> None:
    """Close the ZeroMQ socket of a server that never served (serve closes it)."""
    srv.sock.close(0)
    srv.ctx.term()


def test_a_reservation_save_hung_at_stop_is_abandoned_after_the_bound(tmp_short, caplog):
    """A PERSISTENT RESERVE OUT's save hung on its store: the stop waits for it
    as long as for the flushes, then names it in the one line and marks the
    stop abandoned (run_stml then exits without joining the saver thread)."""
    srv = _server(tmp_short())
    release = threading.Event()
    pr._saver(False).submit(release.wait)

    async def go() -> None:
        await srv._finish_backends(0.2)
        assert srv.abandoned
        release.set()   # the stop's own threads end while the loop still runs
        for t in [t for t in threading.enumerate() if t.name == "close backends"]:
            await asyncio.to_thread(t.join, 30)
    try:
        asyncio.run(go())
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        # (the count of backend calls is the process's: other tests' workers may linger)
        assert len(errors) == 1
        assert errors[0].startswith("stopping: after 0.2s still running, abandoned: reservation saves, ")
    finally:
        release.set()
        _unserved(srv)


def test_reservation_saves_that_end_in_time_are_waited_for(tmp_short, monkeypatch, caplog):
    """The save is let go only once the stop waits for the savers: the stop
    returns after it ran."""
    srv = _server(tmp_short())
    release, ran = threading.Event(), threading.Event()
    pr._saver(False).submit(lambda: (release.wait(), ran.set()))
    real_wait = pr.wait_for_saves

    def wait_for_saves() -> None:
        release.set()
        real_wait()
    monkeypatch.setattr(pr, "wait_for_saves", wait_for_saves)
    try:
        asyncio.run(srv._finish_backends(30))
        assert ran.is_set() and not srv.abandoned
    finally:
        release.set()
        _unserved(srv)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_save_abandoned_at_stop_that_fails_later_is_said_once(caplog):
    """A save still running when finish_saves' bound passes (a stand-in that
    never ends in time) and that fails after: one line says the change is
    missing from the file, and no future is left holding the error for the
    GC to log "never retrieved" from wherever it runs (0722)."""
    import gc
    from concurrent.futures import Future
    from types import SimpleNamespace

    from stml.mgmt import Management
    m = Management(SimpleNamespace(), None, gateway=None, metrics=None,
                   portals=None, endpoints=[], traces=None)
    save: Future = Future()
    save.set_running_or_notify_cancel()
    target = Path("/nonexistent/scsi-target.toml")
    m._under_way = (save, target)

    async def run() -> None:
        assert await m.finish_saves(0.05) is False
        save.set_exception(OSError(5, "Input/output error"))
        for _ in range(3):   # (the error crosses to the loop by call_soon_threadsafe)
            await asyncio.sleep(0)
    asyncio.run(run())
    del save, m
    gc.collect()
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert lines == [f"stopping: saving {target} still running after 0.05s, abandoned: the change it saves "
                     f"may be missing from the file",
                     f"stopping: the abandoned save of {target} failed: [Errno 5] Input/output error; "
                     f"the change it saves is missing from the file"]
