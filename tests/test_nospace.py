"""A thin file LUN whose file system fills up (decision 0271), on a real full
file system (support.fullfs: a tmpfs of a few MiB in the STML's own mount
namespace). Every kind of write that needs new space answers DATA PROTECT,
SPACE ALLOCATION FAILED WRITE PROTECT (7/27/07), logged once, not MEDIUM
ERROR; the STML goes on serving, existing data reads back and is
overwritten in place, and once space is freed the same write succeeds. What
else the STML writes there (reservations under APTPL, its config file, a
new LUN's image) fails cleanly too."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from stml.sense import CHECK_CONDITION, GOOD
from support.cli import cli
from support.fullfs import PAGE, SmallFs, StmlOnSmallFs
from support.sbc_harness import cscd, unmap
from support.target import Target

BS = 512
PB = PAGE // BS   # blocks per page: tmpfs allocates a page at a time
NO_SPACE = (CHECK_CONDITION, 0x7, (0x27, 0x07))
LOG_LINE = "no space for writes"


def _write10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, n, 0)


def _write16(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, n, 0, 0)


def _read16(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0)


def _write_same16(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x93, 0, lba, n, 0, 0)   # UNMAP=0: the blocks are written


def _write_verify10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2E, 0x02, lba, 0, n, 0)   # BYTCHK=1: compared after


def _caw(lba: int, n: int) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, 0, lba, n, 0, 0)


def _xcopy(naa: bytes, n: int, slba: int, dlba: int) -> tuple[bytes, bytes]:
    """EXTENDED COPY (LID1) of blocks within one LU."""
    c = cscd(naa) + cscd(naa)
    seg = struct.pack(">BBHHHHHQQ", 0x02, 0, 24, 0, 1, 0, n, slba, dlba)
    data = struct.pack(">BBH4xII", 1, 0, len(c), len(seg), 0) + c + seg
    return bytes([0x83, 0]) + bytes(8) + struct.pack(">I", len(data)) + bytes(2), data


def _naa(client, lun: int) -> bytes:
    page = client.inquiry(lun, 0x83)
    pos = 4
    while page[pos + 1] & 0x0F != 3:
        pos += 4 + page[pos + 3]
    return page[pos + 4:pos + 20]


def _outcome(r) -> tuple:
    return (r.status, r.sense_key, r.asc_ascq) if r.status != GOOD else (GOOD,)


@pytest.fixture(params=["tmpfs", "ext4", "ext4,wc"])
def small(request, tmp_short):
    """An STML with LUN 0 a 64 MiB thin file on a file system of a few MiB
    (tmpfs: written on the event loop; ext4: in worker threads, and synced:
    write-through, or write-back with `wc`); LUNs 1 and 2 `thick` (fully
    provisioned, no LBP) files there too, 1 fully written by the test."""
    kind, _, wc = request.param.partition(",")
    d = tmp_short()
    fs = SmallFs(d / "fs", "4m" if kind == "tmpfs" else "16m", kind=kind)
    opts = ",wc" if wc else ""
    stml = StmlOnSmallFs(fs, d, (f"file:{d / 'fs' / 'thin.img'},size=64MiB{opts}",
                                 f"file:{d / 'fs' / 'thick.img'},size=256KiB,thick{opts}",
                                 f"file:{d / 'fs' / 'unwritten.img'},size=256KiB,thick{opts}"))
    try:    # a start that fails (no line, a mount missing) still stops what it started
        stml.start()
        yield stml
    finally:
        stml.stop()


# one write of each kind to a page nobody wrote: (name, CDB, data out, LBA, what it reads back)
def _writes(naa: bytes) -> list[tuple[str, bytes, bytes, int, bytes]]:
    lba = iter(range(64 * PB, 1 << 15, 2 * PB))
    w10, w16, ws, wv, caw, xc = (next(lba) for _ in range(6))
    xcdb, xdata = _xcopy(naa, PB, 0, xc)   # from LBA 0, written before the fill
    return [
        ("WRITE(10)", _write10(w10, PB), b"\x10" * PAGE, w10, b"\x10" * PAGE),
        ("WRITE(16)", _write16(w16, PB), b"\x16" * PAGE, w16, b"\x16" * PAGE),
        ("WRITE SAME(16)", _write_same16(ws, PB), b"\x55" * BS, ws, b"\x55" * PAGE),
        ("WRITE AND VERIFY(10)", _write_verify10(wv, PB), b"\x2E" * PAGE, wv, b"\x2E" * PAGE),
        ("COMPARE AND WRITE", _caw(caw, 1), bytes(BS) + b"\x89" * BS, caw, b"\x89" * BS),
        ("EXTENDED COPY", xcdb, xdata, xc, b"B" * PAGE),
    ]


def test_every_kind_of_write_answers_space_allocation_failed(small, client_factory):
    """Each kind of write to unwritten blocks of the full thin LUN: 7/27/07
    (was MEDIUM ERROR, WRITE ERROR), one log line for all 26; existing data
    reads back and takes overwrites; with the filler removed each same
    command succeeds and reads back, and no sync failed."""
    c = client_factory(small.endpoint)
    c.write(0, 0, b"A" * PAGE)                       # data that was there before the fill
    c.write(1, 0, b"T" * (256 << 10))                # LUN 1: every block allocated
    assert small.fs.fill() > 0
    assert small.fs.available() == 0
    writes = _writes(_naa(c, 0))
    for name, cdb, data, _, _ in writes:
        assert _outcome(c.execute(0, cdb, data)) == NO_SPACE, name
    for _ in range(20):                              # a storm: still one line
        assert _outcome(c.execute(0, _write10(4000, PB), b"S" * PAGE)) == NO_SPACE
    assert small.alive()
    lines = [x for x in small.log().splitlines() if LOG_LINE in x]
    assert len(lines) == 1, lines
    assert "No space left on device" in lines[0]
    # what is there reads back, and is overwritten in place: it needs no new space
    assert c.read(0, 0, PB) == b"A" * PAGE
    assert _outcome(c.execute(0, _write16(0, PB), b"B" * PAGE)) == (GOOD,)
    assert c.read(0, 0, PB) == b"B" * PAGE
    # thick LUs do as before: their writes land, where their blocks are allocated;
    # else (a sparse file) their medium failed: they promised the space (0271)
    assert _outcome(c.execute(1, _write16(8, PB), b"K" * PAGE)) == (GOOD,)
    assert c.read(1, 8, PB) == b"K" * PAGE
    assert _outcome(c.execute(2, _write16(8, PB), b"K" * PAGE)) == (CHECK_CONDITION, 0x3, (0x0C, 0x00))
    # space freed: the same writes succeed and read back
    small.fs.free_all()
    for name, cdb, data, lba, back in writes:
        assert _outcome(c.execute(0, cdb, data)) == (GOOD,), name
        assert c.read(0, lba, len(back) // BS) == back, name
    # nothing acknowledged was lost: no sync failed (write-through writes and
    # flushes would be refused after one, 0256)
    c.synchronize_cache(0)
    c.synchronize_cache(1)
    assert _outcome(c.execute(2, _write16(8, PB), b"K" * PAGE)) == (GOOD,)


@pytest.mark.parametrize("small", ["tmpfs"], indirect=True)
def test_a_short_write_then_no_space_and_unmap_makes_room(small, client_factory):
    """pwrite writes the part that fits, then ENOSPC: the command still fails
    with 7/27/07 (its blocks are indeterminate, as after any failed write).
    UNMAP of the LU's own blocks gives the room back. (tmpfs: it takes a page
    per page written, where ext4 also reserves blocks for its metadata, so
    what fits in a page freed is not known there.)"""
    c = client_factory(small.endpoint)
    c.write(0, 0, b"A" * 4 * PAGE)
    small.fs.fill()
    small.fs.free(PAGE)                              # room for one page of the next write's four
    lba = 512
    r = c.execute(0, _write16(lba, 4 * PB), b"W" * 4 * PAGE)
    assert _outcome(r) == NO_SPACE
    assert c.read(0, lba, 4 * PB) == b"W" * PAGE + bytes(3 * PAGE)   # the part that fit landed
    assert small.fs.available() == 0
    cdb, data = unmap((0, 4 * PB))
    assert _outcome(c.execute(0, cdb, data)) == (GOOD,)
    assert small.fs.available() == 4 * PAGE
    assert _outcome(c.execute(0, _write16(lba, 4 * PB), b"W" * 4 * PAGE)) == (GOOD,)
    assert c.read(0, lba, 4 * PB) == b"W" * 4 * PAGE
    assert c.read(0, 0, 4 * PB) == bytes(4 * PAGE)


@pytest.mark.parametrize("opts", ["", ",wc", ",thick"])
def test_a_file_system_gone_read_only_write_protects_its_luns(tmp_short, client_factory, opts):
    """ext4 remounts itself read-only on an error (errors=remount-ro): writes
    then answer DATA PROTECT, WRITE PROTECTED (7/27/00), which Linux reports as
    a read-only disk, not MEDIUM ERROR, for which multipath and md would fail
    it; thick or thin, write-through or write-back. Reads go on and the STML
    says so once, not once a command."""
    d = tmp_short()
    fs = SmallFs(d / "fs", "16m", kind="ext4")
    stml = StmlOnSmallFs(fs, d, (f"file:{d / 'fs' / 'lun.img'},size=1MiB{opts}",))
    try:
        stml.start()
        c = client_factory(stml.endpoint)
        c.write(0, 0, b"A" * PAGE)
        fs.fail()
        for lba in range(16, 16 + 5 * PB, PB):
            assert _outcome(c.execute(0, _write10(lba, PB), b"B" * PAGE)) == (CHECK_CONDITION, 0x7, (0x27, 0x00))
        assert c.read(0, 0, PB) == b"A" * PAGE
        assert _outcome(c.execute(0, _read16(0, PB), data_in=PAGE)) == (GOOD,)
    finally:
        stml.stop()
    lines = [line for line in stml.log().splitlines() if "file system is read-only" in line]
    assert len(lines) == 1 and "WRITE PROTECTED" in lines[0], lines


# ---------------------------------------------------------------- reservations under APTPL

REGISTER, RESERVE = 0x00, 0x01
APTPL = 0x01
WE = 0x1   # WRITE EXCLUSIVE
INSUFFICIENT_REGISTRATION_RESOURCES = (CHECK_CONDITION, 0x5, (0x55, 0x04))


def _prout(sa: int, rk: int = 0, sark: int = 0, flags: int = 0, rtype: int = 0) -> tuple[bytes, bytes]:
    params = struct.pack(">QQ", rk, sark) + bytes(4) + bytes([flags]) + bytes(3)
    return bytes([0x5F, sa, rtype, 0, 0]) + struct.pack(">I", len(params)) + b"\0", params


def _keys(client) -> list[int]:
    data = client.execute(0, bytes([0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0]), data_in=256).check().data
    n = struct.unpack_from(">I", data, 4)[0]
    return [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, n, 8)]


def _holder(client) -> tuple[int, int] | None:
    """READ RESERVATION: (key, type) of the reservation, None when none."""
    data = client.execute(0, bytes([0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0]), data_in=64).check().data
    if not struct.unpack_from(">I", data, 4)[0]:
        return None
    return struct.unpack_from(">Q", data, 8)[0], data[21] & 0x0F


def test_a_reservation_that_cannot_be_saved_is_not_granted(tmp_short, client_factory):
    """APTPL: the reservation state is written to DATA_DIR/pr before GOOD. On a
    full file system the PERSISTENT RESERVE OUT answers INSUFFICIENT
    REGISTRATION RESOURCES (5/55/04; was MEDIUM ERROR, WRITE ERROR) and its
    change is taken back; with room again the same command succeeds."""
    d = tmp_short()
    fs = SmallFs(d / "pr", "1m")
    stml = StmlOnSmallFs(fs, d, ("ram:1MiB",))
    try:
        stml.start()
        c = client_factory(stml.endpoint)
        fs.fill()
        cdb, data = _prout(REGISTER, sark=0xAB, flags=APTPL)
        assert _outcome(c.execute(0, cdb, data)) == INSUFFICIENT_REGISTRATION_RESOURCES
        assert _keys(c) == []                                    # taken back: not in force
        assert [p.name for p in fs.path().iterdir()] == ["filler"]   # no file, no temporary left
        fs.free_all()
        assert _outcome(c.execute(0, cdb, data)) == (GOOD,)
        assert _keys(c) == [0xAB]
        saved, = fs.path().glob("*.json")
        assert json.loads(saved.read_text())["aptpl"] is True
        # a registration kept, a RESERVE that cannot be written: not granted either
        fs.fill()
        cdb, data = _prout(RESERVE, rk=0xAB, rtype=WE)
        assert _outcome(c.execute(0, cdb, data)) == INSUFFICIENT_REGISTRATION_RESOURCES
        assert _holder(c) is None
        assert _keys(c) == [0xAB] and json.loads(saved.read_text())["reservation"] is None
        fs.free_all()
        assert _outcome(c.execute(0, cdb, data)) == (GOOD,)
        assert _holder(c) == (0xAB, WE)
        assert stml.alive()
        lines = [x for x in stml.log().splitlines() if "reservations not saved" in x]
        assert len(lines) == 2 and all("No space left on device" in x for x in lines)
    finally:
        stml.stop()


# ---------------------------------------------------------------- the config file, a new LUN's image

def test_a_change_whose_config_save_finds_no_space(tmp_short):
    """The config file on a full file system: `lun add` applies the LUN, says in
    one line that it was not saved and exits 1; the file is as it was, with no
    temporary left. With room again `config save` writes it."""
    d = tmp_short()
    fs = SmallFs(d / "etc", "1m")
    cfg = d / "etc" / "scsi-target.toml"
    stml = StmlOnSmallFs(fs, d, ("ram:1MiB",), ("--config", str(cfg)))
    try:
        stml.start()
        before = fs.path("scsi-target.toml").read_text()
        fs.fill()
        p = cli("lun", "add", "ram:1MiB", "--data-dir", str(d), check=False)
        assert p.returncode == 1, p.stdout + p.stderr
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and "NOT saved" in err[0] and "No space left on device" in err[0], p.stderr
        assert fs.path("scsi-target.toml").read_text() == before
        assert sorted(x.name for x in fs.path().iterdir()) == ["filler", "scsi-target.toml"]
        assert stml.alive()
        fs.free_all()
        cli("config", "save", "--data-dir", str(d))
        assert "lun = 1" in fs.path("scsi-target.toml").read_text()
    finally:
        stml.stop()


def test_a_first_start_that_cannot_write_its_config_exits_in_one_line(tmp_short):
    """The config file is written at the first start (0200): on a file system
    with no inode left the STML exits 2 with one line (0203), serving nothing."""
    d = tmp_short()
    fs = SmallFs(d / "etc", "1m", inodes=1)   # the root directory's: none for a file
    cfg = d / "etc" / "scsi-target.toml"
    p = subprocess.run([*fs.wrap, sys.executable, "-m", "stml", "--data-dir", str(d), "--config", str(cfg),
                        "--lun", "ram:1MiB"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"scsi-target: cannot write {cfg}: No space left on device"]


def test_lun_add_of_a_new_image_on_a_full_file_system(tmp_short, client_factory):
    """A new thin image takes no blocks: on a file system with no block left it
    is made, and its writes answer 7/27/07; with no inode left it cannot be
    made: `lun add` fails with one line, nothing added, nothing left behind."""
    d = tmp_short()
    fs = SmallFs(d / "fs", "1m", inodes=16)
    stml = StmlOnSmallFs(fs, d, ("ram:1MiB",))
    try:
        stml.start()
        fs.fill()
        image = d / "fs" / "new.img"
        added = json.loads(cli("lun", "add", f"file:{image},size=64MiB", "--data-dir", str(d), "--json").stdout)
        c = client_factory(stml.endpoint)
        assert _outcome(c.execute(added["lun"], _write16(0, PB), b"N" * PAGE)) == NO_SPACE
        assert fs.path("new.img").stat().st_size == 64 << 20
        assert fs.fill_inodes() > 0
        p = cli("lun", "add", f"file:{d / 'fs' / 'newer.img'},size=64MiB", "--data-dir", str(d), check=False)
        assert p.returncode == 2                         # refused (exit 1 is an I/O error after applying)
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and "newer.img: No space left on device" in err[0], p.stderr
        assert not fs.path("newer.img").exists()
        assert [x["lun"] for x in json.loads(cli("lun", "list", "--data-dir", str(d), "--json").stdout)] \
            == [0, added["lun"]]
        assert stml.alive()
    finally:
        stml.stop()


# ---------------------------------------------------------------- a real initiator

def test_qemu_img_reports_no_space_left(tmp_short, tmp_path):
    """qemu-img over iSCSI (fetd_tcp) copies 2 MiB onto a thin LUN whose file
    system has 1 MiB left: qemu maps 7/27/07 to ENOSPC and says so (MEDIUM
    ERROR was "Input/output error"). With room again the copy succeeds."""
    d = tmp_short()
    fs = SmallFs(d / "fs", "4m")
    src = tmp_path / "src.raw"
    src.write_bytes((bytes(range(1, 256)) * 8240)[:2 << 20])   # no zero block for qemu to skip
    with Target("--lun", f"file:{d / 'fs' / 'thin.img'},size=16MiB", data_dir=str(d), wrap=fs.wrap) as t:
        fs.pid = t.proc.pid
        assert fs.mounted()
        fs.fill()
        fs.free(1 << 20)
        convert = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url()]
        p = subprocess.run(convert, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and "No space left on device" in p.stderr, p.stderr
        fs.free_all()
        subprocess.run(convert, check=True, capture_output=True, timeout=120)
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), t.url()],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
