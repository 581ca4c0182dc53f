"""Load: 64 concurrent iSCSI sessions over 2 targets and 4 LUNs doing mixed verified
writes and reads, with ABORT TASK and LUN RESET now and then, for a bounded time
(SCSI_TARGET_LOAD_SECONDS, 20 in CI). No errors, no hung task (every command is answered
within the socket timeout), and the RSS of the STML and fetd_tcp does not keep growing."""
from __future__ import annotations

import os
import random
import struct
import threading
import time
from pathlib import Path

from fetd_tcp import pdu as P
from support import fuzzgen as G
from support.procs import children_by_module
from support.rawiscsi import RawInitiator
from support.target import Target

SECONDS = float(os.environ.get("SCSI_TARGET_LOAD_SECONDS", "20"))
SESSIONS = 64
T0, T1 = "iqn.2026-11.org.scsi-target:load0", "iqn.2026-11.org.scsi-target:load1"
CONFIG = f"""
[[target]]
name = "{T0}"
[[target.lun]]
backend = "ram"
size = "64MiB"
[[target.lun]]
backend = "file"
path = "load0.img"
size = "64MiB"

[[target]]
name = "{T1}"
[[target.lun]]
backend = "ram"
size = "64MiB"
[[target.lun]]
backend = "ram"
size = "8MiB"
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Worker(threading.Thread):
    def __init__(self, portal: str, n: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.portal, self.n, self.stop = portal, n, stop
        self.target = T0 if n % 2 == 0 else T1
        self.resetter = n == 1           # the only user of T1 LUN 1: LUN RESET harms no one else
        self.lun = 1 if self.resetter else (0 if n % 2 else (n // 2) % 2)
        self.ops = 0
        self.error: str | None = None

    def tmf(self, ini: RawInitiator, fn: int, rtt: int = P.RESERVED_TAG) -> int:
        itt = ini._next_itt()
        ini.send(P.TaskMgmtRequest(itt, fn, P.int_to_lun(self.lun), rtt, ini.cmd_sn, ini.exp_stat_sn,
                                   ini.cmd_sn, 0, immediate=True))
        while True:
            pdu, _ = ini.recv()
            if isinstance(pdu, P.TaskMgmtResponse) and pdu.itt == itt:
                return pdu.response

    def cmd(self, ini: RawInitiator, cdb: bytes, **kw) -> bytes:
        """A command, retried after a unit attention (a LUN RESET raises one), as initiators do."""
        for _ in range(3):
            status, sense, data = ini.command(cdb, self.lun, **kw)
            if status == 0:
                return data
            assert status == 2 and sense[2] & 0xF == 6, (status, sense.hex())
        raise AssertionError("unit attention three times in a row")

    def run(self) -> None:
        rnd = random.Random(self.n)
        try:
            ini = RawInitiator(*G.host_port(self.portal), timeout=15,
                               initiator=f"iqn.2026-11.org.test:load{self.n}")
            r = ini.login(self.target)
            assert r.status_class == 0, f"login {r.status_class}/{r.status_detail}"
            while ini.command(bytes(6))[0] != 0:
                pass
            base = self.n * 520 if not self.resetter else 0   # a private LBA range per worker
            while not self.stop.is_set():
                lba = base + rnd.randrange(0, 500)
                blocks = rnd.choice((1, 2, 8, 12))
                data = rnd.randbytes(blocks * 512)
                self.cmd(ini, struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0), write=data,
                         immediate_data=rnd.random() < 0.5)
                got = self.cmd(ini, struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0), read=len(data))
                assert got == data, f"LBA {lba}: read back differs"
                self.ops += 2
                x = rnd.random()
                if x < 0.05:
                    assert self.tmf(ini, P.TMF_ABORT_TASK, ini.itt) in (P.TMF_RESP_COMPLETE, P.TMF_RESP_NO_TASK)
                elif self.resetter and x < 0.15:
                    assert self.tmf(ini, P.TMF_LOGICAL_UNIT_RESET) == P.TMF_RESP_COMPLETE
            ini.logout()
            ini.close()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = f"worker {self.n}: {type(e).__name__}: {e}"


def test_64_sessions_mixed_io(tmp_short):
    d = tmp_short()
    cfg = Path(d) / "load.toml"
    cfg.write_text(CONFIG)
    t = Target(config=str(cfg), data_dir=str(d))
    try:
        stop = threading.Event()
        workers = [Worker(t.portal, i, stop) for i in range(SESSIONS)]
        for w in workers:
            w.start()
        pids = children_by_module(t.proc.pid)
        samples = []
        start = time.monotonic()
        while time.monotonic() - start < SECONDS:
            time.sleep(1)
            samples.append({k: rss_kib(p) for k, p in pids.items()})
            if any(w.error for w in workers):
                break
        stop.set()
        for w in workers:
            w.join(30)
        errors = [w.error for w in workers if w.error]
        assert not errors, errors[:5]
        assert not any(w.is_alive() for w in workers), "a worker hung"
        total = sum(w.ops for w in workers)
        assert total > SESSIONS * 4, total
        assert children_by_module(t.proc.pid) == pids, "a process died under load"
        # memory: after warm-up (a quarter of the run), growth stays small
        warm = samples[len(samples) // 4]
        end = samples[-1]
        for name in pids:
            assert end[name] < warm[name] * 1.5 + 32 * 1024, (name, warm[name], end[name])
        print(f"load: {total} commands in {SECONDS:.0f}s over {SESSIONS} sessions; RSS {samples[0]} -> {end}")
    finally:
        t.stop()
