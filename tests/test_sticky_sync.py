"""A failed sync of a file LUN is sticky (decision 0256): Linux may drop the
pages an fdatasync could not write and mark them clean, so the next fdatasync
"succeeds" with acknowledged writes gone. Through the real Emulator and LU:
after one failed fdatasync (EIO or ENOSPC alike) every SYNCHRONIZE CACHE, FUA write and
write-through write answers MEDIUM ERROR, WRITE ERROR (reads and write-back
writes go on) until `lun reset-error`; `lun list` and `status` say so.
WRITE SAME, SANITIZE and EXTENDED COPY into a write-through LU are refused
before they change a block (0257). Of concurrent fdatasyncs, Linux tells a
lost write-back to one: a sync that returned 0 counts only if none of those
under way with it failed (0258), driven in order by support.faults.Fdatasyncs."""
from __future__ import annotations

import errno
import os
import struct
import threading

import pytest

import backends.file as file_mod
from backends.file import FileBackend
from scsi_target.mgmt import render_status
from stml.lu import LunOptions
from stml.metrics import Metrics
from stml.mgmt import Management
from stml.sense import CHECK_CONDITION, GOOD, ILLEGAL_REQUEST
from support.faults import Fdatasyncs, on_disk
from support.sbc_harness import Harness, cscd, run

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

    def __init__(self, err: int = errno.EIO) -> None:
        self.calls = 0
        self.err = err
        self.real = os.fdatasync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            raise OSError(self.err, os.strerror(self.err))
        self.real(fd)


def _file_lu(h: Harness, path: str, monkeypatch, lun: int = 0) -> None:
    on_disk(monkeypatch)   # a file LU that syncs, wherever tmp_path is (on tmpfs none would)
    lu = h.lu(lun)
    lu.backend = FileBackend(path, 1 << 20)
    assert lu.backend._in_memory is False


def test_a_failed_sync_fails_every_later_sync_until_reset(tmp_path, monkeypatch, caplog):
    syncs = FailOnce()
    monkeypatch.setattr(file_mod.os, "fdatasync", syncs)

    async def go():
        h = Harness([LunOptions("ram", size=1 << 20, write_cache=True)])
        _file_lu(h, str(tmp_path / "d.img"), monkeypatch)
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


@pytest.mark.parametrize("wce", [True, False], ids=["sync-cache", "write-through"])
def test_no_space_from_a_sync_is_a_lost_write_not_a_full_lu(tmp_path, monkeypatch, wce):
    """ENOSPC from fdatasync (write-back on NFS, thin LVM, ...): the data was
    acknowledged, or just landed in the page cache, and may now be lost. That
    is MEDIUM ERROR, WRITE ERROR and sticky (0256), not the DATA PROTECT,
    SPACE ALLOCATION FAILED a write refused before it landed answers (0271)."""
    syncs = FailOnce(errno.ENOSPC)
    monkeypatch.setattr(file_mod.os, "fdatasync", syncs)

    async def go():
        h = Harness([LunOptions("ram", size=1 << 20, write_cache=wce)])
        _file_lu(h, str(tmp_path / "d.img"), monkeypatch)
        r = await h.cmd(_write10(0, 1), b"A" * BS)
        if wce:
            assert r.status == GOOD
            r = await h.cmd(SYNC_CACHE10, no_data=True)
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        assert h.lu().backend.sync_error == "fdatasync: No space left on device"
        r = await h.cmd(_write10(1, 1, fua=True), b"F" * BS)   # sticky: refused, no sync tried
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        assert syncs.calls == 1
        h.lu().backend.close()
    run(go())


# ---------------------------------------------------------------- refused before writing (0257)

def _write_same(lba: int, n: int, unmap: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x93, 0x08 if unmap else 0, lba, n, 0, 0)


def _xcopy(src: bytes, dst: bytes, n: int, slba: int, dlba: int) -> tuple[bytes, bytes]:
    """EXTENDED COPY (LID1) of one block-to-block segment between two LUs."""
    c = cscd(src) + cscd(dst)
    seg = struct.pack(">BBHHHHHQQ", 0x02, 0, 24, 0, 1, 0, n, slba, dlba)
    data = struct.pack(">BBH4xII", 1, 0, len(c), len(seg), 0) + c + seg
    return bytes([0x83, 0]) + bytes(8) + struct.pack(">I", len(data)) + bytes(2), data


class Calls:
    """Counts the calls of a backend that change its blocks."""

    def __init__(self, backend) -> None:
        self.n = 0
        for name in ("write_from", "write_nowait", "discard"):
            real = getattr(backend, name)
            setattr(backend, name, self._counted(real))

    def _counted(self, real):
        def call(*args):
            self.n += 1
            return real(*args)
        return call


async def _failed_sync(h: Harness, lun: int = 0) -> None:
    """A write-back write of A to blocks 0..7, then the SYNCHRONIZE CACHE whose fdatasync fails."""
    assert (await h.cmd(_write10(0, 8), b"A" * 8 * BS, lun=lun)).status == GOOD
    r = await h.cmd(SYNC_CACHE10, no_data=True, lun=lun)
    assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)


async def _after_a_failed_sync(tmp_path, monkeypatch, luns: int = 1) -> Harness:
    """`luns` write-back LUs, LU 0 on a file whose sync has failed (_failed_sync)."""
    h = Harness([LunOptions("ram", size=1 << 20, write_cache=True) for _ in range(luns)])
    _file_lu(h, str(tmp_path / "d.img"), monkeypatch)
    await _failed_sync(h)
    return h


def test_write_same_written_through_after_a_failed_sync_is_refused_before_writing(tmp_path, monkeypatch):
    """WRITE SAME on a write-through file LU after a failed sync: MEDIUM ERROR,
    WRITE ERROR, as a write-through WRITE gets, and the blocks are as they
    were (the refusal used to come after the blocks were written, or, for an
    unmap, not at all). On a write-back LU it goes on, as writes do: its
    UNMAP bit (bit 3 of byte 1, where other writes have FUA) asks for no sync."""
    monkeypatch.setattr(file_mod.os, "fdatasync", FailOnce())

    async def go():
        h = await _after_a_failed_sync(tmp_path, monkeypatch)
        lu = h.lu()
        calls = Calls(lu.backend)
        lu.mode.wce = False
        for cdb in (_write_same(0, 4), _write_same(4, 4, unmap=True)):   # written, and deallocated (thin)
            r = await h.cmd(cdb, b"S" * BS)
            assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        lu.options.thin = False   # thick: its UNMAP bit is refused as a field (LBPWS=0, 0295)
        r = await h.cmd(_write_same(4, 4, unmap=True), b"S" * BS)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0) and r.field == (1, 3)
        assert calls.n == 0
        assert (await h.cmd(_read10(0, 8))).data == b"A" * 8 * BS
        lu.mode.wce = True
        assert (await h.cmd(_write_same(4, 4), b"S" * BS)).status == GOOD
        assert (await h.cmd(_read10(0, 8))).data == b"A" * 4 * BS + b"S" * 4 * BS
        lu.options.thin = True
        assert (await h.cmd(_write_same(4, 4, unmap=True), b"S" * BS)).status == GOOD
        assert (await h.cmd(_read10(0, 8))).data == b"A" * 4 * BS + bytes(4 * BS)
        lu.backend.close()
    run(go())


def test_write_same_unmap_written_through_is_durable_at_good(tmp_path, monkeypatch):
    """WRITE SAME with UNMAP on a write-through thin file LU deallocates, then
    syncs once before GOOD (the hole read back as zeros must survive a power
    loss as written zeros would); written back, it does not sync."""
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(file_mod.os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])

    async def go():
        h = Harness([LunOptions("ram", size=1 << 20, write_cache=True)])
        _file_lu(h, str(tmp_path / "d.img"), monkeypatch)
        lu = h.lu()
        lu.options.thin = True
        assert (await h.cmd(_write10(0, 8), b"A" * 8 * BS)).status == GOOD
        assert (await h.cmd(SYNC_CACHE10, no_data=True)).status == GOOD
        lu.mode.wce = False
        before = len(calls)
        assert (await h.cmd(_write_same(0, 4, unmap=True), b"S" * BS)).status == GOOD
        assert len(calls) == before + 1 and not lu.backend.dirty
        lu.mode.wce = True
        assert (await h.cmd(_write_same(4, 4, unmap=True), b"S" * BS)).status == GOOD
        assert len(calls) == before + 1 and lu.backend.dirty
        assert (await h.cmd(_read10(0, 8))).data == bytes(8 * BS)
        lu.backend.close()
    run(go())


def test_sanitize_after_a_failed_sync_is_refused_before_it_erases(tmp_path, monkeypatch):
    """SANITIZE ends with a flush, which would fail: it is refused before its
    job overwrites or deallocates a block (it used to erase the LU first)."""
    monkeypatch.setattr(file_mod.os, "fdatasync", FailOnce())

    async def go():
        h = await _after_a_failed_sync(tmp_path, monkeypatch)
        lu = h.lu()
        calls = Calls(lu.backend)
        params = bytes([0x01, 0]) + struct.pack(">H", 4) + b"ERAS"
        overwrite = bytes([0x48, 0x01, 0, 0, 0, 0, 0]) + struct.pack(">H", len(params)) + b"\0"
        r = await h.cmd(overwrite, params)
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        r = await h.cmd(bytes([0x48, 0x02]) + bytes(8), alloc=0)                 # BLOCK ERASE
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        assert calls.n == 0 and lu.job is None
        assert (await h.cmd(_read10(0, 8))).data == b"A" * 8 * BS
        lu.backend.close()
    run(go())


def test_extended_copy_into_a_write_through_lu_after_a_failed_sync_is_refused_before_writing(
        tmp_path, monkeypatch):
    """EXTENDED COPY into a write-through file LU whose sync failed: MEDIUM
    ERROR, WRITE ERROR before its backend is called, the blocks unchanged
    (its writes were synced, and failed, after they landed). Into the same LU
    written back, the copy goes on, as write-back writes do."""
    monkeypatch.setattr(file_mod.os, "fdatasync", FailOnce())

    async def go():
        h = await _after_a_failed_sync(tmp_path, monkeypatch, luns=2)
        dst, src = h.lu(0), h.lu(1)
        assert (await h.cmd(_write10(0, 8), b"C" * 8 * BS, lun=1)).status == GOOD
        calls = Calls(dst.backend)
        dst.mode.wce = False
        cdb, data = _xcopy(src.naa, dst.naa, 8, 0, 0)
        r = await h.cmd(cdb, data, lun=1)
        assert (r.status, r.key_asc) == (CHECK_CONDITION, WRITE_ERROR)
        assert calls.n == 0
        assert (await h.cmd(_read10(0, 8))).data == b"A" * 8 * BS
        dst.mode.wce = True
        assert (await h.cmd(cdb, data, lun=1)).status == GOOD
        assert (await h.cmd(_read10(0, 8))).data == b"C" * 8 * BS
        dst.backend.close()
    run(go())


# ---------------------------------------------------------------- concurrent syncs (0258)

def _flush_in_thread(f: FileBackend, name: str, outcome: dict[str, str]) -> threading.Thread:
    def flush() -> None:
        try:
            f.flush()
            outcome[name] = "ok"
        except OSError as e:
            outcome[name] = os.strerror(e.errno) if e.errno else str(e)
    t = threading.Thread(target=flush, name=name, daemon=True)
    t.start()
    return t


@pytest.fixture
def written_back(tmp_path, monkeypatch):
    """A disk file (as the backend sees it) with one write-back write on it."""
    on_disk(monkeypatch)
    f = FileBackend(str(tmp_path / "d.img"), 1 << 20)
    f.write_from(0, [memoryview(b"A" * BS)], sync=False)
    assert f.dirty
    yield f
    f.close()


def test_a_sync_that_returns_0_while_another_fails_does_not_count(written_back, monkeypatch):
    """Two fdatasyncs under way; Linux tells the lost write-back of A to one
    (X) and the other (S) returns 0 first. S's SYNCHRONIZE CACHE must not
    answer GOOD: A may be gone. S waits for X and fails with it; nothing
    counts as synced."""
    f = written_back
    syncs = Fdatasyncs(monkeypatch, held=("X",), fail=("X",))
    outcome: dict[str, str] = {}
    x = _flush_in_thread(f, "X", outcome)
    try:
        assert syncs.event("start", "X").wait(60)
        s = _flush_in_thread(f, "S", outcome)
        assert syncs.event("end", "S").wait(60)     # S's fdatasync returned 0
    finally:
        syncs.release_all()
    x.join()
    s.join()
    assert syncs.log == [("start", "X"), ("start", "S"), ("end", "S"), ("fail", "X")]
    assert outcome == {"X": "Input/output error", "S": "Input/output error"}
    assert f.dirty and f.sync_error == "fdatasync: Input/output error"


def test_a_sync_waiting_for_one_that_fails_fails_though_the_error_was_cleared(written_back, monkeypatch):
    """S's fdatasync returned 0 while X's was under way; X fails; the
    administrator clears the error (`lun reset-error`) before S looks again.
    S must still fail: X's lost pages may be ones S had to cover."""
    f = written_back
    syncs = Fdatasyncs(monkeypatch, held=("X",), fail=("X",))
    cleared = threading.Event()
    real_wait_for = f._sync_returned.wait_for

    def wait_for(predicate, timeout=None):
        def looked_at_after_the_clear() -> bool:
            if threading.current_thread().name == "S" and syncs.event("fail", "X").is_set():
                assert cleared.wait(60)
            return predicate()
        return real_wait_for(looked_at_after_the_clear, timeout)
    monkeypatch.setattr(f._sync_returned, "wait_for", wait_for)
    outcome: dict[str, str] = {}
    x = _flush_in_thread(f, "X", outcome)
    try:
        assert syncs.event("start", "X").wait(60)
        s = _flush_in_thread(f, "S", outcome)
        assert syncs.event("end", "S").wait(60)
        syncs.release_all()
        x.join()
        f.sync_error = None            # what lun_reset_error does
    finally:
        syncs.release_all()
        cleared.set()
    s.join()
    assert outcome == {"X": "Input/output error", "S": "Input/output error"}
    assert f.dirty


def test_a_sync_that_returns_0_after_another_failed_does_not_count(written_back, monkeypatch):
    """S started before X; X failed first; S's fdatasync returns 0 after:
    the error went to X, and S must fail too (it used to count, and raise
    the synced generation over A)."""
    f = written_back
    syncs = Fdatasyncs(monkeypatch, held=("S",), fail=("X",))
    outcome: dict[str, str] = {}
    s = _flush_in_thread(f, "S", outcome)
    try:
        assert syncs.event("start", "S").wait(60)
        x = _flush_in_thread(f, "X", outcome)
        x.join()
    finally:
        syncs.release_all()
    s.join()
    assert syncs.log == [("start", "S"), ("start", "X"), ("fail", "X"), ("end", "S")]
    assert outcome == {"X": "Input/output error", "S": "Input/output error"}
    assert f.dirty


def test_concurrent_syncs_that_all_return_0_all_count(written_back, monkeypatch):
    """No failure: the sync that returned first waits for the other, then
    both count (and a flush after them costs no fdatasync)."""
    f = written_back
    syncs = Fdatasyncs(monkeypatch, held=("S1",))
    s2_waits = threading.Event()
    real_wait_for = f._sync_returned.wait_for

    def wait_for(predicate, timeout=None):
        if threading.current_thread().name == "S2":
            s2_waits.set()
        return real_wait_for(predicate, timeout)
    monkeypatch.setattr(f._sync_returned, "wait_for", wait_for)
    outcome: dict[str, str] = {}
    s1 = _flush_in_thread(f, "S1", outcome)
    try:
        assert syncs.event("start", "S1").wait(60)
        s2 = _flush_in_thread(f, "S2", outcome)
        assert syncs.event("end", "S2").wait(60)
        assert s2_waits.wait(60)                    # for S1, still in the kernel
        assert "S2" not in outcome and s2.is_alive()
    finally:
        syncs.release_all()
    s1.join()
    s2.join()
    assert outcome == {"S1": "ok", "S2": "ok"} and not f.dirty
    f.flush()
    assert syncs.calls() == 2
