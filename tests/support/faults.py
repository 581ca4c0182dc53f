"""Writers that keep a log of what the target acknowledged, for fault tests
(tests/test_faults.py, test_faults_wce.py): after a kill, every acknowledged
write must read back intact and a write in doubt must be wholly there or
wholly absent in every logical block."""
from __future__ import annotations

import hashlib
import random
import threading
import time

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


class IscsiWriter(threading.Thread):
    """Writes 4-block units to its own LBA range, reconnecting whenever the target goes away."""

    def __init__(self, portal: str, wid: int, wlog: WriteLog, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.portal, self.wid, self.wlog, self.stop = portal, wid, wlog, stop
        self.good = self.errors = 0

    def run(self) -> None:
        rnd = random.Random(self.wid)
        seq = 0
        ini = None
        while not self.stop.is_set():
            try:
                if ini is None:
                    ini = RawInitiator(*G.host_port(self.portal), timeout=5,
                                       initiator=f"iqn.2026-11.org.test:w{self.wid}")
                    if ini.login(IQN).status_class != 0:
                        raise ConnectionError("login refused")
                    ini.command(bytes(6))
                lba = self.wid * 1000 + rnd.randrange(0, 200, UNIT)
                seq += 1
                blocks = [block(lba + i, f"{self.wid}.{seq}") for i in range(UNIT)]
                self.wlog.begin(lba, blocks)
                ini.write16(lba, b"".join(blocks))
                self.wlog.good(lba, blocks)
                self.good += 1
            except (OSError, AssertionError, ValueError):
                self.errors += 1
                if ini is not None:
                    ini.close()
                ini = None
                time.sleep(0.1)
        if ini is not None:
            ini.close()


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
