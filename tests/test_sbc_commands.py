"""SBC/SPC command behaviour through the emulator: EXTENDED COPY within and
across LUNs, removable media, ORWRITE, SANITIZE, LOG SENSE, mode pages, and
the write gate that makes COMPARE AND WRITE atomic."""
from __future__ import annotations

import asyncio
import struct

from stml.locks import WriteGate
from stml.lu import LunOptions
from stml.sense import CHECK_CONDITION, GOOD, ILLEGAL_REQUEST
from support.sbc_harness import Harness, cscd, run

BS = 512


def _write10(lba: int, n: int) -> bytes:
    return bytes([0x2A, 0]) + struct.pack(">IBH", lba, 0, n) + b"\0"


def _read10(lba: int, n: int) -> bytes:
    return bytes([0x28, 0]) + struct.pack(">IBH", lba, 0, n) + b"\0"


def _b2b(src: int, dst: int, n: int, slba: int, dlba: int) -> bytes:
    return struct.pack(">BBHHHHHQQ", 0x02, 0, 24, src, dst, 0, n, slba, dlba)


def _xcopy(cscds: list[bytes], segs: list[bytes], list_id: int = 1) -> tuple[bytes, bytes]:
    c, s = b"".join(cscds), b"".join(segs)
    data = struct.pack(">BBH4xII", list_id, 0, len(c), len(s), 0) + c + s
    return bytes([0x83, 0]) + bytes(8) + struct.pack(">I", len(data)) + bytes(2), data


def test_extended_copy_within_and_across_luns():
    async def go():
        h = Harness([LunOptions("ram", size=4 << 20), LunOptions("ram", size=4 << 20)])
        pattern = bytes(range(256)) * 2 * 8
        assert (await h.cmd(_write10(10, 8), pattern)).status == GOOD
        a, b = h.lu(0).naa, h.lu(1).naa
        cdb, data = _xcopy([cscd(a), cscd(b)], [_b2b(0, 0, 8, 10, 100), _b2b(0, 1, 8, 10, 200)])
        assert (await h.cmd(cdb, data)).status == GOOD
        assert (await h.cmd(_read10(100, 8))).data == pattern
        assert (await h.cmd(_read10(200, 8), lun=1)).data == pattern
        # RECEIVE COPY RESULTS: copy status of list 1
        r = await h.cmd(bytes([0x84, 0x00, 1]) + bytes(7) + struct.pack(">I", 64) + bytes(2))
        assert r.status == GOOD and r.data[4] == 1 and struct.unpack_from(">H", r.data, 5)[0] == 2
        r = await h.cmd(bytes([0x84, 0x03]) + bytes(8) + struct.pack(">I", 256) + bytes(2))
        assert r.status == GOOD and struct.unpack_from(">H", r.data, 8)[0] >= 2
        # an unknown designator: COPY ABORTED, UNREACHABLE COPY TARGET
        cdb, data = _xcopy([cscd(bytes(16))], [_b2b(0, 0, 1, 0, 1)])
        r = await h.cmd(cdb, data)
        assert r.key_asc == (0xA, 0x08, 0x04)
        # too many segment descriptors
        cdb, data = _xcopy([cscd(a)], [_b2b(0, 0, 1, 0, 1)] * 9)
        assert (await h.cmd(cdb, data)).key_asc == (ILLEGAL_REQUEST, 0x26, 0x08)
    run(go())


def test_removable_prevent_eject_load():
    async def go():
        h = Harness([LunOptions("ram", size=1 << 20, removable=True)])
        eject, load = bytes([0x1B, 0, 0, 0, 0x02, 0]), bytes([0x1B, 0, 0, 0, 0x03, 0])
        assert (await h.cmd(bytes([0x1E, 0, 0, 0, 1, 0]), alloc=0)).status == GOOD
        assert (await h.cmd(eject, alloc=0)).key_asc == (ILLEGAL_REQUEST, 0x53, 0x02)
        assert (await h.cmd(bytes([0x1E, 0, 0, 0, 0, 0]), alloc=0)).status == GOOD
        assert (await h.cmd(eject, alloc=0)).status == GOOD
        assert (await h.cmd(bytes(6), alloc=0)).key_asc == (0x2, 0x3A, 0)
        assert (await h.cmd(_read10(0, 1))).key_asc == (0x2, 0x3A, 0)
        assert (await h.cmd(bytes([0x12, 0, 0, 0, 36, 0]))).status == GOOD
        assert (await h.cmd(load, alloc=0)).status == GOOD
        assert (await h.cmd(bytes(6), alloc=0)).status == GOOD
        # a LUN reset clears the prevent state
        await h.cmd(bytes([0x1E, 0, 0, 0, 1, 0]), alloc=0)
        h.lu().add_ua((0x29, 0x03), ["someone"])
        assert (await h.cmd(eject, alloc=0)).status == GOOD
    run(go())


def test_orwrite_and_sanitize_overwrite():
    async def go():
        h = Harness([LunOptions("ram", size=1 << 20)])
        await h.cmd(_write10(0, 1), b"\x0F" * BS)
        orw = bytes([0x8B, 0]) + struct.pack(">QI", 0, 1) + bytes(2)
        assert (await h.cmd(orw, b"\xF0" * BS)).status == GOOD
        assert (await h.cmd(_read10(0, 1))).data == b"\xFF" * BS
        params = bytes([0x01, 0]) + struct.pack(">H", 4) + b"ABCD"
        r = await h.cmd(bytes([0x48, 0x01, 0, 0, 0, 0, 0]) + struct.pack(">H", len(params)) + b"\0", params)
        assert r.status == GOOD
        assert (await h.cmd(_read10(100, 1))).data == b"ABCD" * (BS // 4)
        bad = bytes([0x00, 0]) + struct.pack(">H", 4) + b"ABCD"      # overwrite count 0
        r = await h.cmd(bytes([0x48, 0x01, 0, 0, 0, 0, 0]) + struct.pack(">H", len(bad)) + b"\0", bad)
        assert r.status == CHECK_CONDITION
        r = await h.cmd(bytes([0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]), alloc=0)   # block erase
        assert r.status == GOOD and h.lu().backend.allocated() == 0
    run(go())


def test_log_sense_and_mode_pages():
    async def go():
        h = Harness()
        r = await h.cmd(bytes([0x4D, 0, 0x00, 0, 0, 0, 0, 0, 255, 0]))
        assert r.status == GOOD and r.data[:4] == bytes([0, 0, 0, 1]) and r.data[4] == 0
        r = await h.cmd(bytes([0x4D, 0, 0x0D, 0, 0, 0, 0, 0, 255, 0]))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x24, 0)
        r = await h.cmd(bytes([0x5A, 0x08, (3 << 6) | 0x3F, 0, 0, 0, 0, 0x10, 0, 0]))
        assert r.key_asc == (ILLEGAL_REQUEST, 0x39, 0)
        for pc in range(3):
            r = await h.cmd(bytes([0x5A, 0x08, (pc << 6) | 0x3F, 0, 0, 0, 0, 0x10, 0, 0]))
            assert r.status == GOOD
            pages, pos = [], 8
            while pos < len(r.data):
                pages.append(r.data[pos] & 0x3F)
                pos += 2 + r.data[pos + 1]
            assert pages == [0x01, 0x08, 0x0A, 0x1C]
        # SWP through MODE SELECT: writes then fail with DATA PROTECT
        ctl = bytearray((await h.cmd(bytes([0x1A, 0x08, 0x0A, 0, 255, 0]))).data[4:])
        ctl[4] |= 0x08
        assert (await h.cmd(bytes([0x15, 0x10, 0, 0, 4 + len(ctl), 0]), bytes(4) + ctl)).status == GOOD
        assert (await h.cmd(_write10(0, 1), bytes(BS))).key_asc == (0x7, 0x27, 0x02)
        ms = (await h.cmd(bytes([0x1A, 0x08, 0x3F, 0, 255, 0]))).data
        assert ms[2] & 0x80
    run(go())


def test_write_gate_exclusive_waits_for_shared_and_blocks_new():
    async def go():
        gate, order = WriteGate(), []

        async def writer(name, hold):
            async with gate.shared():
                order.append(f"{name}+")
                await asyncio.sleep(hold)
                order.append(f"{name}-")

        async def atomic():
            async with gate.exclusive():
                order.append("X+")
                await asyncio.sleep(0.02)
                order.append("X-")

        t1 = asyncio.create_task(writer("a", 0.02))
        await asyncio.sleep(0)
        t2 = asyncio.create_task(atomic())
        await asyncio.sleep(0)
        t3 = asyncio.create_task(writer("b", 0))
        await asyncio.gather(t1, t2, t3)
        assert order == ["a+", "a-", "X+", "X-", "b+", "b-"]
    run(go())


def test_a_write_waits_for_an_exclusive_section_and_leaves_the_gate_free():
    """write_blocks enters the LU's write gate in place: a WRITE sent while an
    exclusive section holds the gate lands only after it, and leaves the gate
    so that the next exclusive section enters without waiting."""
    async def go():
        h = Harness()
        gate = h.lu().write_gate
        held, release = asyncio.Event(), asyncio.Event()

        async def atomic():
            async with gate.exclusive():
                held.set()
                await release.wait()

        section = asyncio.create_task(atomic())
        await held.wait()
        write = asyncio.create_task(h.cmd(_write10(3, 1), b"\xa5" * BS))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not write.done()
        assert (await h.cmd(_read10(3, 1), alloc=BS)).data == bytes(BS)
        release.set()
        assert (await write).status == GOOD
        await section
        assert (await h.cmd(_read10(3, 1), alloc=BS)).data == b"\xa5" * BS
        assert not gate.exclusive_pending
        async def enter() -> None:
            async with gate.exclusive():
                pass
        after = asyncio.create_task(enter())
        await asyncio.sleep(0)
        assert after.done()   # nothing was left in shared: it entered without waiting
    run(go())


def test_reads_and_writes_past_the_advertised_maximum_transfer_are_refused():
    """What VPD 0xB0 advertises as the MAXIMUM TRANSFER LENGTH is what the
    READ and WRITE checks enforce (they compute it in place, for speed): that
    many blocks pass, one more is INVALID FIELD IN CDB on the length field."""
    async def main() -> None:
        h = Harness([LunOptions("ram", size=64 << 20)])
        vpd = await h.cmd(bytes([0x12, 1, 0xB0, 0, 64, 0]), alloc=64)
        most = int.from_bytes(vpd.data[8:12], "big")
        assert vpd.status == 0 and most > 0
        for cdb_of, field in ((lambda n: bytes([0x88, 0]) + (0).to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0", 10),
                              (lambda n: bytes([0x28, 0, 0, 0, 0, 0, 0]) + n.to_bytes(2, "big") + b"\0", 7)):
            if most + 1 >= 1 << (8 * (4 if field == 10 else 2)):
                continue   # the field cannot say one more
            ok = await h.cmd(cdb_of(most), alloc=most * 512)
            assert ok.status == 0 and len(ok.data) == most * 512
            over = await h.cmd(cdb_of(most + 1), alloc=(most + 1) * 512)
            assert over.key_asc == (0x05, 0x24, 0x00) and over.field == (field, None)
        data = bytes((most + 1) * 512)
        over = await h.cmd(bytes([0x8A, 0]) + (0).to_bytes(8, "big") + (most + 1).to_bytes(4, "big") + b"\0\0",
                           data=data)
        assert over.key_asc == (0x05, 0x24, 0x00) and over.field == (10, None)
    run(main())


def test_pre_fetch_has_no_advertised_limit_and_costs_no_io():
    """VPD 0xB0 says what PRE-FETCH enforces: no MAXIMUM PREFETCH LENGTH (0),
    as it stages nothing; the whole LUN (length 0, or more blocks than the
    maximum transfer) is GOOD without one backend call, past its end is not."""
    async def main() -> None:
        h = Harness([LunOptions("ram", size=64 << 20)])
        lu = h.lu()
        vpd = await h.cmd(bytes([0x12, 1, 0xB0, 0, 64, 0]), alloc=64)
        assert struct.unpack_from(">I", vpd.data, 16)[0] == 0   # (byte 12 of the page body)
        calls = []
        lu.backend.read_into = lambda *a: calls.append(a)
        lu.backend.read_nowait = lambda *a: calls.append(a) or True
        for n in (0, lu.blocks):
            r = await h.cmd(bytes([0x90, 0]) + struct.pack(">QI", 0, n) + bytes(2), no_data=True)
            assert r.status == GOOD
        r = await h.cmd(bytes([0x90, 0]) + struct.pack(">QI", 1, lu.blocks) + bytes(2), no_data=True)
        assert r.key_asc == (ILLEGAL_REQUEST, 0x21, 0)
        assert calls == []
    run(main())


def test_set_target_port_groups_refuses_a_state_it_does_not_set():
    """ALUA here is implicit: SET TARGET PORT GROUPS changes no state, so it
    answers GOOD only when each group is asked for the state it is in; a
    transition it would not make (standby, non-optimized) is INVALID FIELD IN
    PARAMETER LIST at that descriptor's state, and REPORT TARGET PORT GROUPS
    still says active/optimized (decision 0289)."""
    def stpg(state: int, group: int) -> tuple[bytes, bytes]:
        param = bytes(4) + bytes([state, 0]) + struct.pack(">H", group)
        return bytes([0xA4, 0x0A, 0, 0, 0, 0]) + struct.pack(">I", len(param)) + bytes(2), param

    async def go():
        h = Harness()
        assert (await h.cmd(*stpg(0x0, 1))).status == GOOD           # active/optimized: as it is
        for state in (0x1, 0x2, 0x3, 0xE):                            # non-optimized, standby, ...
            r = await h.cmd(*stpg(state, 1))
            assert r.key_asc == (ILLEGAL_REQUEST, 0x26, 0) and r.field == (4, 3), (state, r)
        r = await h.cmd(*stpg(0x0, 9))                                # no such group
        assert r.key_asc == (ILLEGAL_REQUEST, 0x26, 0) and r.field == (6, None)
        rtpg = await h.cmd(bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))
        assert rtpg.status == GOOD and rtpg.data[4] & 0x0F == 0 and rtpg.data[6:8] == b"\0\x01"
    run(go())
