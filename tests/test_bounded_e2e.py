"""Bounded work per request through real front ends (issue 18): hostile but
legal requests sent by fetd_loopback clients to a real STML process, or over
iSCSI to `scsi-target run`, end with the right sense or a capped answer, cost
no memory in proportion to the LUN, and leave another initiator's commands
on another LU completing meanwhile.

Work is counted, not timed. System calls of the STML process are counted
(lseek) or held back (fdatasync) with strace attached to it: the count is
the kernel's, needs no hook in the STML, and holding one LU's syncs makes a
slow backend on demand (.ci/run installs strace)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from backends.file import FileBackend
from stml.sense import parse_sense
from support.rawiscsi import RawInitiator
from support.sbc_harness import fragment, unmap
from support.target import Target

BS = 512
GOOD, CHECK = 0x00, 0x02
MAX_XFER = (8 << 20) // BS


def sense_of(r) -> tuple[int, int, int]:
    assert r.status == CHECK, r
    return parse_sense(r.sense)


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process, in bytes."""
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert m
    return int(m.group(1)) << 10


class Strace:
    """strace attached to every thread of a process we started (and to the
    threads it starts), stopped by its PID (SIGINT: it detaches)."""

    def __init__(self, pid: int, *args: str, out: Path) -> None:
        assert shutil.which("strace"), "strace is needed (.ci/run installs it)"
        self.out = out
        self.proc = subprocess.Popen(["strace", "-f", "-p", str(pid), "-o", str(out), *args],
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        # "Process N attached [with M threads]": every thread is traced before anything is sent
        line = self.proc.stderr.readline()
        if "attached" not in line:
            self.proc.kill()
            raise AssertionError(f"strace did not attach: {line!r}")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()   # never a full pipe

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            self.proc.wait(30)
        return self.out.read_text()


def syscall_count(summary: str, name: str) -> int:
    """Calls of one system call in a `strace -c` summary (0 when absent)."""
    for line in summary.splitlines():
        cols = line.split()
        if cols and cols[-1] == name:
            return int(cols[3])
    return 0


def _gls(lba: int, alloc: int) -> bytes:
    return bytes([0x9E, 0x12]) + struct.pack(">QI", lba, alloc) + bytes(2)


# ---------------------------------------------------------------- GET LBA STATUS

def test_get_lba_status_lseeks_are_bounded_by_the_descriptors_asked(stml_factory, client_factory, tmp_short):
    d = tmp_short()
    path = d / "frag.img"
    fragment(str(path), 5000)   # 10,000 runs: an unbounded walk costs ~10,000 lseeks
    stml = stml_factory(f"file:{path}", data_dir=d)
    c = client_factory(stml.endpoint)
    c.capacity(0)   # unit attentions consumed
    for descriptors, lo, hi in ((100, 99, 101), (1, 1, 2)):
        trace = Strace(stml.pid, "-c", "-e", "trace=lseek", out=d / f"lseek{descriptors}.txt")
        try:
            r = c.execute(0, _gls(0, 8 + 16 * descriptors), data_in=8 + 16 * descriptors)
        finally:
            seeks = syscall_count(trace.stop(), "lseek")
        assert r.status == GOOD
        n = struct.unpack_from(">I", r.data)[0]
        assert n == 4 + 16 * descriptors                      # the descriptors asked for, no more
        first = struct.unpack_from(">QIB", r.data, 8)
        assert first == (0, 8, 0)                             # 4 KiB mapped at LBA 0
        assert lo <= seeks <= hi, (descriptors, seeks)


# ---------------------------------------------------------------- VERIFY, UNMAP, WRITE SAME

def test_verify_of_a_whole_thin_lun_costs_no_memory_and_limits_hold(stml_factory, client_factory, tmp_short):
    d = tmp_short()
    stml = stml_factory(f"file:{d / 'big.img'},size=2GiB", data_dir=d)
    c = client_factory(stml.endpoint)
    blocks, _ = c.capacity(0)
    before = vm_hwm(stml.pid)
    r = c.execute(0, struct.pack(">BBQIBB", 0x8F, 0, 0, blocks, 0, 0))     # VERIFY(16) BYTCHK=0
    assert r.status == GOOD
    assert vm_hwm(stml.pid) - before < 32 << 20          # not a buffer the size of the LUN
    # BYTCHK=3 (one block compared with every block): held to the maximum transfer length
    r = c.execute(0, struct.pack(">BBQIBB", 0x8F, 0x06, 0, MAX_XFER + 1, 0, 0), data_out=bytes(BS))
    assert sense_of(r) == (0x5, 0x24, 0x00)
    r = c.execute(0, struct.pack(">BBQIBB", 0x8F, 0x06, 0, MAX_XFER, 0, 0), data_out=bytes(BS))
    assert r.status == GOOD                               # an unwritten thin LUN reads zeros
    # WRITE SAME to the end of a LUN larger than MAXIMUM WRITE SAME LENGTH
    r = c.execute(0, struct.pack(">BBQIBB", 0x93, 0, 0, 0, 0, 0), data_out=b"\x01" * BS)
    assert sense_of(r) == (0x5, 0x24, 0x00)
    # UNMAP: MAXIMUM UNMAP LBA COUNT is the command's total, checked before any discard
    c.write(0, 0, b"\x5A" * 4096)
    cdb, params = unmap((0, (1 << 19) + 1), (1 << 20, 1 << 19))
    assert sense_of(c.execute(0, cdb, data_out=params)) == (0x5, 0x26, 0x00)
    assert c.read(0, 0, 8) == b"\x5A" * 4096
    assert vm_hwm(stml.pid) - before < 32 << 20


# ---------------------------------------------------------------- SANITIZE

def test_sanitize_runs_as_one_job_while_other_lus_work_and_stops_with_the_stml(
        stml_factory, client_factory, tmp_short):
    d = tmp_short()
    # 8 TiB sparse: a block erase of 131,072 chunks, each one turn of the loop
    stml = stml_factory(f"file:{d / 'huge.img'},size=8TiB", "ram:16MiB", data_dir=d)
    a = client_factory(stml.endpoint)
    b = client_factory(stml.endpoint)
    a.capacity(0)
    b.capacity(1)
    erase = bytes([0x48, 0x80 | 0x02, 0, 0, 0, 0, 0, 0, 0, 0])   # BLOCK ERASE, IMMED
    assert a.execute(0, erase).status == GOOD
    assert sense_of(a.execute(0, erase)) == (0x2, 0x04, 0x1B)    # one at a time
    for i in range(20):   # another initiator, another LU: its commands complete meanwhile
        b.write(1, i * 8, bytes([i]) * 4096)
        assert b.read(1, i * 8, 8) == bytes([i]) * 4096
    r = a.execute(0, bytes([0x03, 0, 0, 0, 18, 0]), data_in=18)   # REQUEST SENSE
    assert r.status == GOOD and parse_sense(r.data) == (0x2, 0x04, 0x1B)
    assert r.data[15] & 0x80 and struct.unpack_from(">H", r.data, 16)[0] < 0xFFFF   # progress
    assert sense_of(a.execute(0, bytes(6))) == (0x2, 0x04, 0x1B)  # still under way
    os.kill(stml.pid, signal.SIGTERM)                             # the job stops with the STML
    assert stml.proc.wait(30) == 0
    assert "Traceback" not in stml.log()


# ---------------------------------------------------------------- worker threads

def _on_disk(path: Path) -> bool:
    """Would a file LUN there do its I/O (and fdatasync) in worker threads? Asked
    of the backend itself: on tmpfs or ramfs it runs in place and never syncs."""
    probe = path / "probe.img"
    try:
        backend = FileBackend(str(probe), size=1 << 20)
    except OSError:
        return False
    try:
        return not backend._in_memory
    finally:
        backend.close()
        probe.unlink()


@pytest.fixture
def disk_dir():
    """A private directory on a disk file system (/tmp may be tmpfs; then /var/tmp
    or the tests' own directory), removed at teardown; skips when there is none."""
    made: list[Path] = []
    for base in ("/tmp", "/var/tmp", str(Path(__file__).resolve().parent)):
        try:
            d = Path(tempfile.mkdtemp(prefix="st-disk", dir=base))
        except OSError:
            continue
        made.append(d)
        if _on_disk(d):
            break
    else:
        d = None
    try:
        if d is None:
            pytest.skip("no disk file system to put a file LUN on (/tmp, /var/tmp and tests/ are "
                        "tmpfs or read-only): a LU's fdatasync cannot be held")
        yield d
    finally:
        for m in made:
            shutil.rmtree(m, ignore_errors=True)


# held until strace detaches (Strace.stop), so nothing rests on a margin of time
HOLD_US = 3600 * 1_000_000


def test_a_stuck_lu_leaves_threads_for_the_others(stml_factory, client_factory, tmp_short, disk_dir):
    d = tmp_short()   # the data dir: short, for its ipc socket; the images on a disk file system
    stml = stml_factory(f"file:{disk_dir / 'slow.img'},size=64MiB",
                        f"file:{disk_dir / 'fast.img'},size=64MiB,wc", data_dir=d)
    a = client_factory(stml.endpoint)
    b = client_factory(stml.endpoint)
    a.capacity(0)
    b.capacity(1)
    # LU 0 is write-through: each write ends in fdatasync, which strace holds until it detaches
    stuck = Strace(stml.pid, "-e", "trace=fdatasync", "-e", f"inject=fdatasync:delay_enter={HOLD_US}",
                   out=d / "strace.txt")
    try:
        slow = [a.submit(0, struct.pack(">BBQIBB", 0x8A, 0, i * 8, 8, 0, 0), data_out=bytes([i + 1]) * 4096)
                for i in range(12)]   # more than the STML's eight threads
        for i in range(20):           # LU 1 (write-back: no fdatasync) needs threads too
            b.write(1, i * 8, bytes([0x80 + i]) * 4096)
        assert not any(f.done() for f in slow)   # all of LU 1's writes ended while LU 0's hang
    finally:
        stuck.stop()                  # detaching lets the held fdatasyncs return
    assert all(f.result(30).status == GOOD for f in slow)
    assert a.read(0, 11 * 8, 8) == bytes([12]) * 4096
    assert b.read(1, 19 * 8, 8) == bytes([0x93]) * 4096


# ---------------------------------------------------------------- EXTENDED COPY

def test_extended_copy_parameter_list_too_long_is_refused_before_transfer(stml, client_factory):
    c = client_factory(stml.endpoint)
    c.capacity(0)
    asked = []
    real = c.rdy_to_xfer
    c.rdy_to_xfer = lambda tag, offset, length: (asked.append(length), real(tag, offset, length))
    cdb = bytes([0x83, 0]) + bytes(8) + struct.pack(">I", 8 << 20) + bytes(2)
    assert sense_of(c.execute(0, cdb, data_out=bytes(8 << 20))) == (0x5, 0x1A, 0x00)
    assert asked == []                          # not one byte of the 8 MiB was asked for


A, B = "iqn.2026-11.org.test:a", "iqn.2026-11.org.test:b"
MALLORY, BOB = "iqn.2026-11.org.test:mallory", "iqn.2026-11.org.test:bob"


def _naa(ini: RawInitiator, lun: int = 0) -> bytes:
    status, sense, page = ini.command(bytes([0x12, 1, 0x83, 0, 255, 0]), lun, read=255)
    assert status == GOOD, sense
    pos = 4
    while page[pos + 1] & 0x0F != 3:
        pos += 4 + page[pos + 3]
    return page[pos + 4:pos + 20]


def _ready(ini: RawInitiator, lun: int = 0) -> None:
    for _ in range(4):
        if ini.command(bytes(6), lun)[0] == GOOD:
            return
    raise AssertionError("unit attentions never cleared")


def test_extended_copy_cannot_reach_another_targets_lun(tmp_path):
    cfg = tmp_path / "two.toml"
    cfg.write_text(f'[[target]]\nname = "{A}"\nacl = ["{MALLORY}"]\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n'
                   f'[[target]]\nname = "{B}"\nacl = ["{BOB}"]\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    with Target(config=str(cfg)) as t:
        host, port = t.portal.rsplit(":", 1)
        bob = RawInitiator(host, int(port), initiator=BOB)
        assert bob.login(B).status_class == 0
        _ready(bob)
        secret = os.urandom(4096)
        bob.write16(0, secret)
        naa_b = _naa(bob)   # a designator the attacker learned somehow: isolation must not rest on secrecy
        mallory = RawInitiator(host, int(port), initiator=MALLORY)
        assert mallory.login(A).status_class == 0
        _ready(mallory)
        naa_a = _naa(mallory)
        cscd = lambda naa: (bytes([0xE4, 0, 0, 0, 0x01, 0x03, 0, 16]) + naa + bytes(5) + BS.to_bytes(3, "big"))
        for src, dst in ((1, 0), (0, 1)):   # B's LUN as source, then as destination
            seg = struct.pack(">BBHHHHHQQ", 0x02, 0, 24, src, dst, 0, 8, 0, 0)
            params = struct.pack(">BBH4xII", 1, 0, 64, len(seg), 0) + cscd(naa_a) + cscd(naa_b) + seg
            status, sense, _ = mallory.command(bytes([0x83, 0]) + bytes(8) + struct.pack(">I", len(params))
                                               + bytes(2), 0, write=params)
            assert status == CHECK and parse_sense(sense) == (0xA, 0x08, 0x04)
        assert mallory.read16(0, 8) == bytes(4096)      # nothing of B's came over
        assert bob.read16(0, 8) == secret               # and B's data is unchanged
        mallory.close()
        bob.close()
        denied = RawInitiator(host, int(port), initiator=MALLORY)
        assert denied.login(B).status_class != 0        # the ACL, for the record
        denied.close()


def test_extended_copy_between_block_sizes_leaves_the_files_as_they_were(tmp_path):
    """Over iSCSI, from a 4096-byte file LUN into a 512-byte one: the segment
    is refused whole, and the destination's file keeps its size (the copy
    wrote 4 MiB at 8 x the destination LBA, growing a 4 MiB file to 32 MiB)."""
    big, small = tmp_path / "big.img", tmp_path / "small.img"
    cfg = tmp_path / "mixed.toml"
    cfg.write_text(f'[[target]]\nname = "{A}"\n'
                   f'[[target.lun]]\nbackend = "file"\npath = "{big}"\nsize = "4MiB"\nblock_size = 4096\n'
                   f'[[target.lun]]\nbackend = "file"\npath = "{small}"\nsize = "4MiB"\n')
    with Target(config=str(cfg)) as t:
        host, port = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(port), initiator=MALLORY)
        assert ini.login(A).status_class == 0
        _ready(ini)
        _ready(ini, 1)
        naa_big, naa_small = _naa(ini), _naa(ini, 1)
        cscd = lambda naa, bs: (bytes([0xE4, 0, 0, 0, 0x01, 0x03, 0, 16]) + naa + bytes(5) + bs.to_bytes(3, "big"))
        seg = struct.pack(">BBHHHHHQQ", 0x02, 0, 24, 0, 1, 0, 1000, 0, 7000)   # in range of each, in its blocks
        params = struct.pack(">BBH4xII", 1, 0, 64, len(seg), 0) + cscd(naa_big, 4096) + cscd(naa_small, BS) + seg
        status, sense, _ = ini.command(bytes([0x83, 0]) + bytes(8) + struct.pack(">I", len(params)) + bytes(2),
                                       0, write=params)
        assert status == CHECK and parse_sense(sense) == (0x5, 0x26, 0x00)
        ini.close()
    assert small.stat().st_size == big.stat().st_size == 4 << 20
