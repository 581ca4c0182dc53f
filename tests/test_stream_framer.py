"""The stream carrier's framer (stml.api.stream.StreamFramer), without sockets:
wire bytes as the contract documents them (encoded here, independently of
the code under test) go in, in reads of any size; messages, shared-frame
references and control messages come out, or FramingError."""
from __future__ import annotations

import random
import struct
from typing import Any, Iterable

import pytest

from stml.api.shm import SharedRegion
from stml.api.stream import (CONTROL_FREE, CONTROL_REGION, MAX_FRAMES, Control, FramingError, SharedRef,
                             StreamFramer, encode)

BIG = 64 << 10
SHARED = 0x80000000


def wire(frames: list) -> bytes:
    """u32 count, u32 lengths, frames (LE); a (offset, length) tuple is a shared frame."""
    lengths = [SHARED | f[1] if isinstance(f, tuple) else len(f) for f in frames]
    body = [struct.pack("<2I", *f) if isinstance(f, tuple) else f for f in frames]
    return struct.pack(f"<{len(frames) + 1}I", len(frames), *lengths) + b"".join(body)


def control(kind: int, *values: int) -> bytes:
    return struct.pack(f"<{3 + len(values)}I", 0, kind, len(values), *values)


def run(framer: StreamFramer, data: bytes, sizes: Iterable[int]) -> list[Any]:
    """Feed `data` in reads of the given sizes (never more than get_buffer
    offers); everything next() returns, in order."""
    out: list[Any] = []
    pos, sizes = 0, iter(sizes)
    while pos < len(data):
        buf = framer.get_buffer()
        n = min(len(buf), next(sizes), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        framer.received(n)
        pos += n
        while (item := framer.next()) is not None:
            out.append(item)
    return out


def plain(items: list[Any]) -> list[Any]:
    """Messages as lists of bytes (SharedRefs kept), controls as they are."""
    return [item if isinstance(item, Control) else
            [f if isinstance(f, SharedRef) else bytes(f) for f in item[0]] for item in items]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_messages_controls_and_references_in_reads_of_any_size(seed: int) -> None:
    rng = random.Random(seed)
    stream = [
        [b"h0"],
        [b"", b"x", b""],
        [b"big", rng.randbytes(BIG), rng.randbytes(BIG - 1), rng.randbytes(3 * BIG + 5)],
        Control(CONTROL_FREE, (65536, 131072)),
        [b"shared", (4096, 70000), b"tail", (0, 1)],
        [b"many", *(rng.randbytes(rng.randrange(0, 200)) for _ in range(100))],
        Control(CONTROL_REGION, (1 << 26,)),
        [b"end"],
    ]
    data = b"".join(control(i.kind, *i.values) if isinstance(i, Control) else wire(i) for i in stream)
    sizes = iter(lambda: rng.choice([1, 2, 3, 5, 11, 4093, BIG - 3, BIG + 9, 1 << 20]), None)
    items = run(StreamFramer(), data, sizes)
    expect = [i if isinstance(i, Control) else [SharedRef(*f) if isinstance(f, tuple) else f for f in i]
              for i in stream]
    assert plain(items) == expect
    # `special` names exactly the frames received in place and the references
    specials = [i[1] for i in items if not isinstance(i, Control)]
    assert specials == [None, None, [1, 3], [1, 3], None, None]
    big = items[2][0]
    assert [type(f) for f in big] == [bytes, memoryview, bytes, memoryview]


@pytest.mark.parametrize("read", [1 << 20, 1, 7])
def test_a_read_response_with_shared_data_comes_out_the_same_whole_or_in_pieces(read: int) -> None:
    """A header and a reference (a read's response, its data in the STML's
    region), all here at once (framed in one pass, decisions/0865) or a few
    bytes at a time (kept state): the same frames, the reference a SharedRef,
    `special` naming it; a big frame beside a reference still goes in place."""
    big = bytes(range(256)) * (BIG // 256)
    data = wire([b"head", (65536, 65536)]) + wire([b"h", (0, 8), b"t"]) + wire([b"x", (8, 4), big])
    items = run(StreamFramer(), data, iter(lambda: read, None))
    assert plain(items) == [[b"head", SharedRef(65536, 65536)], [b"h", SharedRef(0, 8), b"t"],
                            [b"x", SharedRef(8, 4), big]]
    assert [i[1] for i in items] == [[1], [1], [1, 2]]
    assert all(type(i[0][1]) is SharedRef for i in items)


def test_big_frames_are_received_in_place_into_what_alloc_gives() -> None:
    """get_buffer hands out the rest of a big frame's own buffer, so the
    socket writes it there; the buffer comes from `alloc`."""
    made: list[bytearray] = []

    def alloc(n: int) -> bytearray:
        made.append(bytearray(n))
        return made[-1]

    framer = StreamFramer(alloc)
    payload = random.Random(7).randbytes(5 * BIG)
    data = wire([b"h", payload])
    items = run(framer, data, [100] + [BIG] * 10)
    assert len(made) == 1 and bytes(made[0]) == payload
    frames, special = items[0]
    assert special == [1] and frames[1].obj is made[0]


@pytest.mark.parametrize("bad, reason", [
    (struct.pack("<I", MAX_FRAMES + 1), "frames"),
    (struct.pack("<2I", 1, (1 << 30) + 1), "bytes"),
    (struct.pack("<3I", 2, 5, (1 << 30) + 1) + b"hello", "bytes"),
    (control(99), "unexpected control"),
    (struct.pack("<3I", 0, CONTROL_FREE, MAX_FRAMES + 1), "values"),
])
def test_framing_errors(bad: bytes, reason: str) -> None:
    """Over the limits, or an unknown control message: FramingError, after
    the messages before it were returned."""
    framer = StreamFramer()
    data = wire([b"good"]) + bad
    buf = framer.get_buffer()
    buf[:len(data)] = data
    framer.received(len(data))
    assert framer.next() == ([b"good"], None)
    with pytest.raises(FramingError, match=reason):
        framer.next()


def test_encode_lends_the_slots_of_its_region() -> None:
    """encode() writes the documented format and counts its bytes; a frame
    that is a view of a slot someone holds becomes an (offset, length)
    reference, and the slot is lent; a view of other memory is sent as it is."""
    region = SharedRegion(1 << 20)
    first, second = region.get(100), region.get(BIG)
    assert first is not None and second is not None
    second[:100] = b"L" * 100
    other = memoryview(bytearray(b"o" * 10))
    msg = [b"head", second[:100], other, b"x"]
    parts, size = encode(msg, region)
    want = wire([b"head", (BIG, 100), b"o" * 10, b"x"])
    assert b"".join(bytes(b) for b in parts) == want and size == len(want)
    assert region.in_use() == 2
    region.release(second)
    assert region.in_use() == 2          # the peer still holds it
    region.give_back([BIG])
    assert region.in_use() == 1
    for plain in ([b"a", b"bc"], [b"a"], [b"a", b"bc", b"def"], [b"a", second[:3]]):
        parts, size = encode(plain, None)
        assert b"".join(bytes(b) for b in parts) == wire(plain) and size == len(wire(plain))


def test_a_message_over_the_receivers_bound_is_refused_before_any_allocation() -> None:
    """`max_bytes` bounds what one message brings, all its frames together
    (many frames under a per-frame limit add up): refused on its header, before
    alloc is asked for a buffer; shared references (their bytes stay in the
    peer's region) do not count."""
    made: list[int] = []

    def alloc(n: int) -> bytearray:
        made.append(n)
        return bytearray(n)
    framer = StreamFramer(alloc, big=512, max_bytes=1000)
    data = wire([b"h", bytes(599), bytes(400)]) + wire([b"h", (0, 4096)])
    ok, shared = run(framer, data, [100] * 100)
    assert [len(f) for f in ok[0]] == [1, 599, 400] and made == [599]
    assert shared[1] == [1] and isinstance(shared[0][1], SharedRef)
    with pytest.raises(FramingError, match="a message of 1001 bytes"):
        run(framer, struct.pack("<4I", 3, 1, 600, 400), [100])
    assert made == [599]
