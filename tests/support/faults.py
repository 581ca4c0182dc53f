"""Writers that keep a log of what the target acknowledged, for fault tests
(tests/test_faults.py, test_faults_wce.py): after a kill, every acknowledged
write must read back intact and a write in doubt must be wholly there or
wholly absent in every logical block. And the faults of file LUNs' syncs
(on_disk, Fdatasyncs) for tests of sync bookkeeping."""
from __future__ import annotations

import collections
import errno
import hashlib
import os
import random
import threading
import time
from typing import Any, Callable

import backends.file as file_mod

from support import fuzzgen as G
from support.rawiscsi import RawInitiator
from support.target import IQN

BS = 512
UNIT = 4            # blocks per write


def block(lba: int, tag: str) -> bytes:
    return hashlib.sha256(f"{lba}:{tag}".encode()).digest() * (BS // 32)


class WriteLog:
    """Per LBA: the block last acknowledged, and blocks written without an answer since."""

    def __init__(self) -> None:
        self.acked: dict[int, bytes] = {}
        self.doubt: dict[int, list[bytes]] = {}
        self.lock = threading.Lock()

    def begin(self, lba: int, blocks: list[bytes]) -> None:
        with self.lock:
            for i, b in enumerate(blocks):
                self.doubt.setdefault(lba + i, []).append(b)

    def good(self, lba: int, blocks: list[bytes]) -> None:
        with self.lock:
            for i, b in enumerate(blocks):
                self.acked[lba + i] = b
                self.doubt.pop(lba + i, None)

    def verify(self, read) -> int:
        checked = 0
        for lba in sorted(set(self.acked) | set(self.doubt)):
            got = read(lba)
            allowed = ([self.acked[lba]] if lba in self.acked else [bytes(BS)]) + self.doubt.get(lba, [])
            assert got in allowed, f"LBA {lba}: not an acknowledged or in-doubt block (torn or lost write)"
            checked += 1
        return checked


class ReconnectingWriter(threading.Thread):
    """Runs step() on a logged-in session until `stop`; whenever the target goes
    away (any failure) it counts an error, waits a little and logs in again.
    `seq` counts steps (a unique tag for each write's blocks)."""

    prefix = "w"   # of its initiator name, one per writer kind

    def __init__(self, portal: str, wid: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.portal, self.wid, self.stop = portal, wid, stop
        self.good = self.errors = self.seq = 0
        self.rnd = random.Random(wid)

    def step(self, ini: RawInitiator) -> None:
        raise NotImplementedError

    def run(self) -> None:
        ini = None
        while not self.stop.is_set():
            try:
                if ini is None:
                    ini = RawInitiator(*G.host_port(self.portal), timeout=5,
                                       initiator=f"iqn.2026-11.org.test:{self.prefix}{self.wid}")
                    if ini.login(IQN).status_class != 0:
                        raise ConnectionError("login refused")
                    ini.command(bytes(6))
                self.seq += 1
                self.step(ini)
            except (OSError, AssertionError, ValueError):
                self.errors += 1
                if ini is not None:
                    ini.close()
                ini = None
                time.sleep(0.1)
        if ini is not None:
            ini.close()


class IscsiWriter(ReconnectingWriter):
    """Writes 4-block units to its own LBA range."""

    def __init__(self, portal: str, wid: int, wlog: WriteLog, stop: threading.Event) -> None:
        super().__init__(portal, wid, stop)
        self.wlog = wlog

    def step(self, ini: RawInitiator) -> None:
        lba = self.wid * 1000 + self.rnd.randrange(0, 200, UNIT)
        blocks = [block(lba + i, f"{self.wid}.{self.seq}") for i in range(UNIT)]
        self.wlog.begin(lba, blocks)
        ini.write16(lba, b"".join(blocks))
        self.wlog.good(lba, blocks)
        self.good += 1


def read_all(portal: str) -> RawInitiator:
    """A logged-in session for reading back, once the target takes logins again."""
    ini = RawInitiator(*G.host_port(portal), initiator="iqn.2026-11.org.test:verify")
    deadline = time.monotonic() + 20
    while ini.login(IQN).status_class != 0:
        ini.close()
        assert time.monotonic() < deadline, "no login after the restart"
        time.sleep(0.3)
        ini = RawInitiator(*G.host_port(portal), initiator="iqn.2026-11.org.test:verify")
    while ini.command(bytes(6))[0] != 0:
        pass
    return ini


# ---------------------------------------------------------------- file LUN syncs

EXT4_SUPER_MAGIC = 0xEF53


def on_disk(monkeypatch: Any) -> None:
    """FileBackends opened from now on take their file to be on ext4, wherever
    it is. On tmpfs or ramfs a FileBackend never syncs (nothing there is more
    durable after one), so a test of its sync bookkeeping in a tmp_path on a
    tmpfs /tmp would fail or test nothing. Creating that condition, rather
    than hunting for a directory on a disk, makes the test the same on every
    machine: fdatasync of a tmpfs file is a real call that succeeds, and the
    tests fake or count it anyway."""
    monkeypatch.setattr(file_mod, "_fs_type", lambda fd: EXT4_SUPER_MAGIC)


class Fdatasyncs:
    """os.fdatasync (patched into backends.file) whose calls return in the
    order a test decides, as concurrent syncs of one file may in the kernel.
    A call in a thread named in `held` waits for that name's gate; one in a
    thread named in `fail` then raises OSError(EIO), as the one fdatasync
    Linux reports a lost write-back to does; the others run the real call.
    `log` has ("start" | "end" | "fail", thread name) in order, and
    event(what, name) is set once that entry is logged."""

    def __init__(self, monkeypatch: Any, held: tuple[str, ...] = (), fail: tuple[str, ...] = ()) -> None:
        self.real: Callable[[int], None] = os.fdatasync
        self.fail = fail
        self.gates = {name: threading.Event() for name in held}
        self._events: collections.defaultdict[tuple[str, str], threading.Event] = \
            collections.defaultdict(threading.Event)
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        monkeypatch.setattr(file_mod.os, "fdatasync", self)

    def event(self, what: str, name: str) -> threading.Event:
        with self._lock:
            return self._events[what, name]

    def _note(self, what: str, name: str) -> None:
        with self._lock:
            self.log.append((what, name))
            self._events[what, name].set()

    def __call__(self, fd: int) -> None:
        name = threading.current_thread().name
        self._note("start", name)
        gate = self.gates.get(name)
        if gate is not None:
            gate.wait()
        if name in self.fail:
            self._note("fail", name)
            raise OSError(errno.EIO, "Input/output error")
        self.real(fd)
        self._note("end", name)

    def calls(self) -> int:
        return sum(1 for what, _ in self.log if what == "start")

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()


# ---------------------------------------------------------------- config saves

def hang_config_saves(fifo: str, started: str, bound: float) -> None:
    """Run in an STML process before its main (python -c): every config save
    creates `started`, then waits to read `fifo` to its end (until the test
    opens it for writing and closes it), as on a file system that hangs; a
    stop waits `bound` seconds for a save under way (server.STOP_SAVE)."""
    from pathlib import Path

    from stml import persist, server
    real = persist.atomic_write

    def hung(path: Any, data: bytes, secret: bool) -> None:
        Path(started).touch()
        with open(fifo, "rb") as f:
            f.read()
        real(path, data, secret)
    persist.atomic_write = hung
    server.STOP_SAVE = bound   # type: ignore[attr-defined]


def release_fifo(fifo: str) -> None:
    """Let a reader waiting in hang_config_saves go on (no reader: nothing to do)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
