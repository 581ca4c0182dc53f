"""A failed sync of a file LUN is sticky (decision 0256): Linux may drop the
pages an fdatasync could not write and mark them clean, so the next fdatasync
"succeeds" with acknowledged writes gone. Through the real Emulator and LU:
after one failed fdatasync every SYNCHRONIZE CACHE, FUA write and
write-through write answers MEDIUM ERROR, WRITE ERROR (reads and write-back
writes go on) until `lun reset-error`; `lun list` and `status` say so."""
from __future__ import annotations

import errno
import os
import struct
from types import SimpleNamespace

import backends.file as file_mod
from backends.file import FileBackend
from scsi_target.mgmt import render_status
from stml.lu import LunOptions
from stml.metrics import Metrics
from stml.mgmt import Management
from stml.sense import CHECK_CONDITION, GOOD
from support.sbc_harness import Harness, run

BS = 512
WRITE_ERROR = (0x3, 0x0C, 0x00)   # MEDIUM ERROR, WRITE ERROR
SYNC_CACHE10 = bytes([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def _write10(lba: int, n: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, n, 0)


def _read10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0)


class FailOnce:
    """os.fdatasync whose first call fails with EIO, as after a lost write-back;
    later calls succeed, as Linux's do once the error was reported."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = os.fdatasync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.EIO, "Input/output error")
        self.real(fd)


def _file_lu(h: Harness, path: str) -> None:
    lu = h.lu()
    lu.backend = FileBackend(path, 1 << 20)    # /tmp here: a disk file system
    assert lu.backend._in_memory is False


def test_a_failed_sync_fails_every_later_sync_until_reset(tmp_path, monkeypatch, caplog):
    syncs = FailOnce()
    monkeypatch.setattr(file_mod.os, "fdatasync", syncs)

    async def go():
        h = Harness([LunOptions("ram", size=1 << 20, write_cache=True)])
        _file_lu(h, str(tmp_path / "d.img"))
        lu = h.lu()
        m = Management(h.emulator, None, gateway=None, metrics=None, portals=None,   # type: ignore[arg-type]
                       endpoints=[], traces=None)   # type: ignore[arg-type]
        assert (await h.cmd(_write10(0, 1), b"A" * BS)).status == GOOD     # write-back: cached
        r = await h.cmd(SYNC_CACHE10, no_data=True)
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        assert syncs.calls == 1
        # the kernel reported the error once; a sync now would succeed with A maybe gone
        r = await h.cmd(SYNC_CACHE10, no_data=True)
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        r = await h.cmd(_write10(1, 1, fua=True), b"F" * BS)
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        lu.mode.wce = False                                                  # write-through
        r = await h.cmd(_write10(2, 1), b"T" * BS)
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        lu.mode.wce = True
        assert syncs.calls == 1                   # refused before any fdatasync
        assert (await h.cmd(_write10(3, 1), b"B" * BS)).status == GOOD     # write-back goes on
        r = await h.cmd(_read10(0, 4))
        assert r.status == GOOD and r.data == b"A" * BS + bytes(2 * BS) + b"B" * BS
        # said in lun list and status
        listed = await m.lun_list()
        assert listed[0]["sync_error"] == "fdatasync: Input/output error"
        snap = Metrics(lambda t, n: None).snapshot(h.emulator)
        assert snap["luns"][0]["sync_error"] == "fdatasync: Input/output error"
        snap.update(config=None, endpoints=["x"], portals=[])
        assert "LUN 0 of iqn.2026-11.org.test:disk: SYNC FAILED (fdatasync: Input/output error)" \
            in render_status(snap, wide=True)
        # the administrator clears it: syncs run again
        assert (await m.lun_reset_error(0))["cleared"] == "fdatasync: Input/output error"
        assert (await m.lun_list())[0]["sync_error"] is None
        assert (await m.lun_reset_error(0))["cleared"] is None              # nothing left: no error
        assert (await h.cmd(SYNC_CACHE10, no_data=True)).status == GOOD
        assert syncs.calls == 2 and not lu.backend.dirty
        assert (await h.cmd(_write10(1, 1, fua=True), b"F" * BS)).status == GOOD
        lu.backend.close()
    run(go())
    sticky = [r.getMessage() for r in caplog.records if r.name == "backends.file"]
    assert len(sticky) == 1 and "every later sync, FUA and write-through write" in sticky[0]
