"""No single command starves the STML's heartbeat: while one initiator runs
the most expensive legal command of each kind, the iSCSI front end never
declares the STML lost, and another initiator's session on another LUN stays
logged in and keeps completing its writes and reads (issue 18)."""
from __future__ import annotations

import os
import struct
import subprocess
import threading

import pytest

from support.rawiscsi import RawInitiator
from support.target import IQN, Target

BIG = 1 << 30           # LUN 0: a thin file, fragmented first
RAM = 256 << 20         # LUN 2: the RAM LUN the SANITIZE overwrites
MAX_XFER_BLOCKS = (8 << 20) // 512


def _cdb16(op: int, flags: int, lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def _unmap_list(ranges: list[tuple[int, int]]) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(descs) + 6, len(descs)) + descs


def _spec_i_pt(count: int) -> bytes:
    tids = b""
    for i in range(count):
        name = f"iqn.2026-11.org.test:never-seen-{i:05d}".encode() + b"\0"
        name += bytes(-len(name) % 4)
        tids += bytes([0x05, 0]) + len(name).to_bytes(2, "big") + name
    return struct.pack(">QQ4xBxHI", 0, 0x1234, 0x08, 0, len(tids)) + tids


def _xcopy(naa: bytes, segments: int) -> bytes:
    cscd = bytes([0xE4, 0, 0, 0, 0x01, 0x03, 0, 16]) + naa + bytes([0, 0, 0, 0, 0]) + (512).to_bytes(3, "big")
    segs = b"".join(struct.pack(">BBHHHxxHQQ", 0x02, 0, 24, 0, 0, 0xFFFF, i * 0xFFFF, (1 << 20) + i * 0xFFFF)
                    for i in range(segments))
    return struct.pack(">BBH4xII", 0, 0, len(cscd), len(segs), 0) + cscd + segs


def _naa(ini: RawInitiator, lun: int) -> bytes:
    status, _, data = ini.command(bytes([0x12, 1, 0x83, 0, 255, 0]), lun, read=255)
    assert status == 0
    pos = 4
    while pos < len(data):
        code_set, kind, length = data[pos] & 0x0F, data[pos + 1] & 0x0F, data[pos + 3]
        if kind == 0x03 and code_set == 0x01 and length == 16:
            return data[pos + 4:pos + 20]
        pos += 4 + length
    raise AssertionError("no NAA designator")


# (what, lun, CDB, data-out, data-in): each the largest the fields and VPD B0 allow
def expensive(naa: bytes) -> list[tuple[str, int, bytes, bytes, int]]:
    blocks = BIG // 512
    return [
        ("VERIFY BYTCHK=0, whole LUN", 0, _cdb16(0x8F, 0, 0, blocks), b"", 0),
        ("VERIFY BYTCHK=3, whole LUN", 0, _cdb16(0x8F, 3 << 1, 0, blocks), bytes(512), 0),
        ("VERIFY BYTCHK=1, max transfer", 0, _cdb16(0x8F, 1 << 1, 0, MAX_XFER_BLOCKS),
         bytes(MAX_XFER_BLOCKS * 512), 0),
        ("GET LBA STATUS, largest allocation", 0, struct.pack(">BBQIBB", 0x9E, 0x12, 0, 0xFFFFFFFF, 0, 0),
         b"", 1 << 20),
        ("PRE-FETCH, whole LUN", 0, _cdb16(0x90, 0, 0, blocks), b"", 0),
        ("SYNCHRONIZE CACHE, whole LUN", 0, _cdb16(0x91, 0, 0, 0), b"", 0),
        ("WRITE SAME, max length", 0, _cdb16(0x93, 0, 0, MAX_XFER_BLOCKS), bytes([0x5A]) * 512, 0),
        ("WRITE SAME UNMAP, whole LUN", 0, _cdb16(0x93, 0x08, 0, 0), bytes(512), 0),
        ("UNMAP, 256 descriptors", 0, struct.pack(">BB4xBHB", 0x42, 0, 0, 8 + 16 * 256, 0),
         _unmap_list([(i * 4096, 4096) for i in range(256)]), 0),
        ("COMPARE AND WRITE, 255 blocks", 0, struct.pack(">BBQ3xBBB", 0x89, 0, 0, 255, 0, 0),
         bytes(2 * 255 * 512), 0),
        ("EXTENDED COPY, 8 segments", 0, struct.pack(">BB8xIBB", 0x83, 0, len(_xcopy(naa, 8)), 0, 0),
         _xcopy(naa, 8), 0),
        ("PR OUT REGISTER SPEC_I_PT, 1,000 TransportIDs", 0,
         struct.pack(">BBBxxIB", 0x5F, 0, 0, len(_spec_i_pt(1000)), 0), _spec_i_pt(1000), 0),
        ("PR IN READ FULL STATUS", 0, struct.pack(">BB5xHB", 0x5E, 0x03, 0xFFFF, 0), b"", 0xFFFF),
        ("REPORT LUNS", 0, struct.pack(">BxB3xIxB", 0xA0, 0, 0xFFFFFFFF, 0), b"", 1 << 16),
        ("SANITIZE OVERWRITE IMMED, 256 MiB RAM LUN", 2,
         struct.pack(">BB5xHB", 0x48, 0x80 | 0x01, 8, 0), struct.pack(">BxH", 1, 4) + b"\xde\xad\xbe\xef", 0),
        ("SANITIZE BLOCK ERASE, whole file LUN", 0, struct.pack(">BB5xHB", 0x48, 0x02, 0, 0), b"", 0),
    ]


@pytest.mark.skipif(not os.path.exists("/usr/bin/qemu-img"), reason="qemu-utils is not installed")
def test_no_command_starves_the_heartbeat(tmp_path):
    img = tmp_path / "big.img"
    with Target("--lun", f"file:{img},size={BIG}", "--lun", "ram:16MiB", "--lun", f"ram:{RAM}") as t:
        try:
            # a VM's scattered writes: the thin LUN's file in 20,000 extents
            subprocess.run(["qemu-img", "bench", "-f", "raw", "-w", "-d", "16", "-s", "4k", "-S", "20k",
                            "-c", "20000", t.url(0)], check=True, capture_output=True, timeout=300)
            host, port = t.portal.rsplit(":", 1)
            hog = RawInitiator(host, int(port), "iqn.2026-11.org.test:hog", timeout=120)
            other = RawInitiator(host, int(port), "iqn.2026-11.org.test:other", timeout=30)
            assert hog.login(IQN).status_class == 0
            assert other.login(IQN).status_class == 0
            naa = _naa(hog, 0)
            outcomes: dict[str, int] = {}
            failure: list[BaseException] = []

            def run_hog() -> None:
                try:
                    for what, lun, cdb, out, inn in expensive(naa):
                        # big parameter lists go solicited (R2T), as an initiator sends them
                        status, _, _ = hog.command(cdb, lun, read=inn, write=out,
                                                   immediate_data=len(out) <= 8192)
                        outcomes[what] = status
                except BaseException as e:   # reported by the main thread
                    failure.append(e)

            worker = threading.Thread(target=run_hog)
            worker.start()
            done = 0
            while worker.is_alive() or done == 0:
                payload = os.urandom(4096)
                lba = (done * 8) % ((16 << 20) // 512 - 8)
                other.write16(lba, payload, lun=1)
                assert other.read16(lba, 8, lun=1) == payload
                done += 1
            worker.join()
            assert not failure, failure
            # every expensive command got its status: GOOD, or CHECK CONDITION for the two that
            # ask for more than VPD B0 allows in one command (VERIFY BYTCHK=3 and WRITE SAME of
            # the whole LUN); never a lost link
            refused = {"VERIFY BYTCHK=3, whole LUN", "WRITE SAME UNMAP, whole LUN"}
            assert outcomes == {e[0]: 0x02 if e[0] in refused else 0x00 for e in expensive(naa)}
            # the other initiator's session is the same one it logged in with, still working
            payload = os.urandom(4096)
            other.write16(0, payload, lun=1)
            assert other.read16(0, 8, lun=1) == payload
            hog.close()
            other.close()
            log = t.log()
        except BaseException:
            print(t.log()[-6000:])   # the target's side of the story
            raise
        assert "link lost" not in log and "silent for" not in log, log[-4000:]
