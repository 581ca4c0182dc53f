"""Storage backends: RAM pages and files, through the Backend interface."""
from __future__ import annotations

import errno
import os
import resource
import threading

import pytest

import backends.file as file_mod
from backends import BackendError, open_backend
from backends.file import FileBackend
from backends.ram import PAGE, RamBackend
from support.faults import Fdatasyncs, on_disk


def read(backend, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    backend.read_into(offset, memoryview(buf))
    return bytes(buf)


@pytest.fixture(params=["ram", "file"])
def backend(request, tmp_path):
    size = 4 * PAGE
    b = RamBackend(size) if request.param == "ram" else FileBackend(str(tmp_path / "d.img"), size)
    yield b
    b.close()


# ---------------------------------------------------------------- both kinds

def test_unwritten_reads_zeros(backend):
    assert backend.size() == 4 * PAGE
    assert read(backend, 0, 4096) == bytes(4096)
    assert read(backend, 4 * PAGE - 512, 512) == bytes(512)


@pytest.mark.parametrize("offset", [0, 512, PAGE - 100, 2 * PAGE, 4 * PAGE - 1024])
def test_write_read_at_edges(backend, offset):
    data = os.urandom(1024)
    backend.write_from(offset, [memoryview(data)], sync=False)
    assert read(backend, offset, 1024) == data
    # neighbours untouched
    if offset:
        assert read(backend, offset - 16, 16) == bytes(16)
    if offset + 1024 < backend.size():
        assert read(backend, offset + 1024, 16) == bytes(16)


def test_multi_buffer_write_is_contiguous(backend):
    parts = [os.urandom(n) for n in (512, 1, 4095, PAGE, 7)]
    bufs = [memoryview(parts[0]), memoryview(bytearray(parts[1])), memoryview(parts[2]),
            memoryview(parts[3]), memoryview(parts[4])]
    offset = PAGE - 300
    backend.write_from(offset, bufs, sync=True)
    assert read(backend, offset, sum(map(len, parts))) == b"".join(parts)


def test_many_buffers(backend):
    parts = [os.urandom(512) for _ in range(1500)]   # more than IOV_MAX iovecs
    backend.write_from(4096, [memoryview(p) for p in parts], sync=False)
    assert read(backend, 4096, 1500 * 512) == b"".join(parts)


def test_discard_zeroes_the_range(backend):
    data = os.urandom(3 * PAGE)
    backend.write_from(0, [memoryview(data)], sync=True)
    backend.discard(PAGE // 2, PAGE * 2)
    got = read(backend, 0, 3 * PAGE)
    assert got[:PAGE // 2] == data[:PAGE // 2]
    assert got[PAGE // 2:PAGE // 2 + 2 * PAGE] == bytes(2 * PAGE)
    assert got[PAGE // 2 + 2 * PAGE:] == data[PAGE // 2 + 2 * PAGE:]
    assert backend.size() == 4 * PAGE


def test_resize(backend):
    data = os.urandom(PAGE)
    backend.write_from(2 * PAGE, [memoryview(data)], sync=False)
    backend.resize(2 * PAGE + 4096)
    assert backend.size() == 2 * PAGE + 4096
    assert read(backend, 2 * PAGE, 4096) == data[:4096]
    backend.resize(4 * PAGE)
    assert backend.size() == 4 * PAGE
    # what was cut off does not come back
    assert read(backend, 2 * PAGE + 4096, PAGE - 4096) == bytes(PAGE - 4096)
    assert read(backend, 2 * PAGE, 4096) == data[:4096]


# ---------------------------------------------------------------- RAM

def test_ram_pages_allocated_on_write_and_freed_by_discard():
    b = RamBackend(8 * PAGE)
    assert b.allocated() == 0
    read(b, 0, PAGE)                      # reading allocates nothing
    assert b.allocated() == 0
    b.write_from(PAGE - 10, [memoryview(b"\x01" * 20)], sync=False)
    assert b.allocated() == 2 * PAGE      # the write straddles two pages
    b.write_from(3 * PAGE, [memoryview(b"x" * (2 * PAGE))], sync=False)
    assert b.allocated() == 4 * PAGE
    b.discard(3 * PAGE, 2 * PAGE)         # whole pages: freed
    assert b.allocated() == 2 * PAGE
    b.discard(PAGE - 10, 5)               # part of a page still holding data: zeroed, kept
    assert b.allocated() == 2 * PAGE
    assert read(b, PAGE - 10, 20) == bytes(5) + b"\x01" * 15
    b.resize(PAGE)                        # shrinking frees the pages beyond
    assert b.allocated() == PAGE
    assert b.inline and b.can_discard and b.can_resize


# ---------------------------------------------------------------- file

def test_missing_file_is_created_sparse(tmp_path):
    path = tmp_path / "new.img"
    b = FileBackend(str(path), 64 << 20)
    try:
        st = os.stat(path)
        assert st.st_size == 64 << 20 == b.size()
        assert st.st_blocks * 512 < 1 << 20
        assert b.allocated() < 1 << 20
        assert not b.inline
    finally:
        b.close()


def test_missing_file_without_size_is_refused(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        FileBackend(str(tmp_path / "nope.img"))
    assert not (tmp_path / "nope.img").exists()


def test_new_file_that_cannot_take_its_size_is_not_left(tmp_path):
    """ftruncate fails (EFBIG: here the process's file size limit, on ext4 past
    16 TiB): a one-line BackendError, and the file it made is gone."""
    path = tmp_path / "big.img"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))   # (Python ignores SIGXFSZ)
    try:
        with pytest.raises(BackendError, match="big.img: cannot be made 2097152 bytes long: File too large"):
            FileBackend(str(path), 2 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not path.exists()


def test_existing_file_keeps_its_size_and_data(tmp_path):
    path = tmp_path / "old.img"
    content = os.urandom(8192)
    path.write_bytes(content)
    b = FileBackend(str(path), 1 << 20)
    try:
        assert b.size() == 8192
        assert read(b, 0, 8192) == content
    finally:
        b.close()


def test_empty_existing_file_is_grown_to_size(tmp_path):
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    b = FileBackend(str(path), 1 << 20)
    b.close()
    assert os.path.getsize(path) == 1 << 20


def test_file_reads_past_end_as_zeros(tmp_path):
    path = tmp_path / "short.img"
    path.write_bytes(b"\xff" * 1024)
    b = FileBackend(str(path))
    try:
        assert read(b, 512, 1024) == b"\xff" * 512 + bytes(512)
    finally:
        b.close()


def test_file_discard_punches_a_hole(tmp_path):
    path = tmp_path / "thin.img"
    b = FileBackend(str(path), 16 << 20)
    try:
        data = os.urandom(4 << 20)
        b.write_from(4 << 20, [memoryview(data)], sync=True)
        before = os.stat(path).st_blocks
        assert before * 512 >= 4 << 20
        b.discard(4 << 20, 4 << 20)
        after = os.stat(path).st_blocks
        assert after < before
        assert after * 512 <= before * 512 - (3 << 20)
        assert read(b, 4 << 20, 4 << 20) == bytes(4 << 20)
        assert b.size() == 16 << 20
        assert b.can_discard and b.can_resize
    finally:
        b.close()


def test_file_data_is_in_the_file(tmp_path):
    path = tmp_path / "plain.img"
    b = FileBackend(str(path), 1 << 20)
    data = os.urandom(4096)
    b.write_from(12345, [memoryview(data)], sync=True)
    b.flush()
    b.close()
    with open(path, "rb") as f:
        f.seek(12345)
        assert f.read(4096) == data


def test_readonly_file_refuses_writes(tmp_path):
    path = tmp_path / "ro.img"
    content = os.urandom(4096)
    path.write_bytes(content)
    b = FileBackend(str(path), readonly=True)
    try:
        assert not b.can_discard and not b.can_resize
        with pytest.raises((OSError, BackendError)):
            b.write_from(0, [memoryview(bytes(512))], sync=False)
        assert read(b, 0, 4096) == content
    finally:
        b.close()
    assert path.read_bytes() == content


def test_readonly_missing_file_is_not_created(tmp_path):
    path = tmp_path / "absent.img"
    with pytest.raises(BackendError):
        FileBackend(str(path), 1 << 20, readonly=True)
    assert not path.exists()


def test_directory_is_refused(tmp_path):
    with pytest.raises(BackendError):
        FileBackend(str(tmp_path), readonly=True)
    with pytest.raises(BackendError):
        FileBackend(str(tmp_path))


def test_a_file_is_locked_while_open_read_only_ones_share_it(tmp_path):
    """An open file description lock (0216): a second read-write open of the
    file is refused in one line naming it, and so is a read-only one while
    a writer holds it; read-only opens share it; the lock ends with close."""
    path = str(tmp_path / "d.img")
    a = FileBackend(path, 1 << 20)
    for readonly in (False, True):
        with pytest.raises(BackendError, match=f"^{path}: in use by this STML .*served by one target at a time\\)$"):
            FileBackend(path, readonly=readonly)
    a.resize(2 << 20)   # the lock covers the file whatever its size
    with pytest.raises(BackendError, match="in use"):
        FileBackend(path)
    a.close()
    r1, r2 = FileBackend(path, readonly=True), FileBackend(path, readonly=True)
    with pytest.raises(BackendError, match="in use"):
        FileBackend(path)
    r1.close()
    r2.close()
    FileBackend(path).close()


def test_a_file_system_without_locks_serves_the_file_with_a_warning(tmp_path, monkeypatch, caplog):
    """ENOLCK (NFSv3 without lockd): the LUN is served, and the log says it
    is unlocked (0216)."""
    import backends.file as file_mod
    real = file_mod.fcntl.fcntl

    def no_locks(fd, cmd, arg=0):
        if cmd == file_mod.fcntl.F_OFD_SETLK:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real(fd, cmd, arg)
    monkeypatch.setattr(file_mod.fcntl, "fcntl", no_locks)
    path = str(tmp_path / "d.img")
    with caplog.at_level("WARNING", logger="backends.file"):
        a, b = FileBackend(path, 1 << 20), FileBackend(path)
    a.close()
    b.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: served without a lock (No locks available): nothing keeps a second target off it"] * 2


# ---------------------------------------------------------------- file: flush and concurrent syncs

@pytest.fixture
def held_sync(tmp_path, monkeypatch):
    """A file on a disk (as far as the backend knows: on_disk), a write-back
    write A on it, and a FUA write B in a thread whose fdatasync has started
    and is held until the test releases it."""
    on_disk(monkeypatch)
    syncs = Fdatasyncs(monkeypatch, held=("FUA-B",))
    f = FileBackend(str(tmp_path / "d.img"), 1 << 20)
    assert f._in_memory is False
    f.write_from(0, [memoryview(b"A" * 512)], sync=False)    # GOOD with WCE=1: cached
    assert f.dirty
    fua = threading.Thread(target=f.write_from, args=(512, [memoryview(b"B" * 512)], True),
                           name="FUA-B", daemon=True)
    fua.start()
    try:
        assert syncs.event("start", "FUA-B").wait(60)   # (a guard against a hang, not a measure)
        yield f, syncs, fua
    finally:
        syncs.release_all()
        fua.join()
        f.close()


def test_flush_does_not_answer_on_a_sync_still_running(held_sync):
    """SYNCHRONIZE CACHE while another command's fdatasync runs: that sync may
    not have reached the disk when power fails, so the flush runs one of its
    own, started after A was written. Linux tells a lost write-back to one of
    two concurrent fdatasyncs only, so its own counts once B's has returned
    too, without failing (0258)."""
    f, syncs, fua = held_sync
    flushed: list[str] = []
    sc = threading.Thread(target=lambda: (f.flush(), flushed.append("SC")), name="SC", daemon=True)
    sc.start()
    assert syncs.event("end", "SC").wait(60)
    assert syncs.log == [("start", "FUA-B"), ("start", "SC"), ("end", "SC")]
    assert not flushed                # its fdatasync returned; B's has not
    syncs.release_all()
    sc.join()
    fua.join()
    assert syncs.log[-1] == ("end", "FUA-B") and flushed == ["SC"]
    assert not f.dirty
    f.flush()                         # nothing written since those syncs ended: no fdatasync
    assert syncs.calls() == 2 and not f.dirty


def test_flush_after_a_completed_sync_costs_no_fdatasync(held_sync):
    f, syncs, fua = held_sync
    syncs.release_all()
    fua.join()                      # B's sync started after A was written, and ended
    assert not f.dirty
    f.flush()
    assert syncs.calls() == 1


def test_write_landing_during_a_sync_is_left_to_the_next_flush(held_sync):
    f, syncs, fua = held_sync
    f.write_from(1024, [memoryview(b"C" * 512)], sync=False)   # after B's sync started
    syncs.release_all()
    fua.join()
    assert f.dirty                  # B's sync may have missed C
    f.flush()
    assert syncs.log[-2:] == [("start", "MainThread"), ("end", "MainThread")]
    assert syncs.calls() == 2 and not f.dirty


def test_failed_flush_leaves_the_writes_owed_and_fails_later_syncs(tmp_path, monkeypatch):
    """A failed fdatasync syncs nothing, and every later sync fails without
    calling fdatasync (which would succeed with the writes maybe gone: 0256)
    until the error is reset; reads and write-back writes go on."""
    calls = []

    def eio(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "I/O error")
    on_disk(monkeypatch)
    f = FileBackend(str(tmp_path / "d.img"), 1 << 20)
    assert f._in_memory is False
    try:
        f.write_from(0, [memoryview(b"A" * 512)], sync=False)
        monkeypatch.setattr(file_mod.os, "fdatasync", eio)
        with pytest.raises(OSError):
            f.flush()
        assert f.dirty and f.sync_error == "fdatasync: I/O error"
        monkeypatch.undo()
        with pytest.raises(OSError, match="an earlier sync failed"):
            f.flush()
        with pytest.raises(OSError, match="an earlier sync failed"):
            f.write_from(512, [memoryview(b"B" * 512)], sync=True)   # refused before it lands (0257)
        f.write_from(1024, [memoryview(b"C" * 512)], sync=False)
        assert read(f, 0, 1536) == b"A" * 512 + bytes(512) + b"C" * 512
        assert len(calls) == 1
        f.sync_error = None             # `lun reset-error`
        f.flush()
        assert not f.dirty
    finally:
        f.close()


# ---------------------------------------------------------------- open_backend

def test_open_backend(tmp_path):
    r = open_backend("ram", 1 << 20)
    assert isinstance(r, RamBackend) and r.size() == 1 << 20
    f = open_backend("file", 1 << 20, str(tmp_path / "x.img"))
    assert isinstance(f, FileBackend) and f.size() == 1 << 20
    f.close()
    with pytest.raises(ValueError):
        open_backend("ram")
    with pytest.raises(ValueError):
        open_backend("file", 1 << 20)
    with pytest.raises(ValueError, match="floppy"):
        open_backend("floppy", 1 << 20)


def test_a_file_deleted_or_replaced_under_its_backend_is_seen(tmp_path):
    """`status` says so (it serves a nameless file a restart will not find):
    deleted, or another file renamed over it; a file in place is not."""
    for how in ("deleted", "replaced"):
        path = tmp_path / f"{how}.img"
        b = FileBackend(str(path), 1 << 20)
        assert not b.unlinked()
        if how == "deleted":
            path.unlink()
        else:
            other = tmp_path / "other.img"
            other.write_bytes(bytes(1 << 20))
            os.replace(other, path)
        assert b.unlinked(), how
        b.close()
