"""The contract's message table (stml.api.messages.MESSAGES): it is complete,
docs/contract.md is generated from it, it is the one place headers are
written, and both sides refuse what does not fit it with a log line."""
from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stml.api import FrontEndLink
from stml.api.messages import FROM_STML, MESSAGES, TO_STML, Direction, Message, Op, check
from support.aio import until
from support.fakestml import FakeStml

ROOT = Path(__file__).resolve().parent.parent
NO_FIELD = object()


def test_every_op_has_its_message_and_every_message_its_op() -> None:
    ops = {m.op for m in MESSAGES}
    assert ops == set(Op)
    # one entry per op and direction (heartbeat goes both ways, with different fields)
    keys = [(m.op, m.direction) for m in MESSAGES]
    assert len(keys) == len(set(keys))
    assert set(TO_STML) | set(FROM_STML) == {op.value for op in Op} - {Op.BATCH}


def test_docs_contract_md_is_what_the_table_generates() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "contractdoc.py"), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = (ROOT / "docs" / "contract.md").read_text()
    for m in MESSAGES:     # and the table's contents are there (the check compares the whole part)
        assert f"#### `{m.op.value}`" in text


def test_a_changed_table_makes_the_doc_check_fail(tmp_path: Path) -> None:
    """The check is real: a table with one more field than the doc fails it."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv = ['x', '--check']\n"
            "from stml.api import messages as M\n"
            "m = M.MESSAGES[0]\n"
            "M.MESSAGES = (M.Message(m.op, m.direction, m.group, m.doc, "
            "m.fields + (M.Field('extra', M.INT, 'new'),)),) + M.MESSAGES[1:]\n"
            f"import runpy; runpy.run_path({str(ROOT / 'scripts' / 'contractdoc.py')!r}, run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1 and "differs from stml.api.messages" in p.stderr, p.stdout + p.stderr


SAMPLES: list[Any] = [0, 7, -1, True, "s", b"b", None, [1, 2], ["a"], [{}], {"k": 1}, 1.5, NO_FIELD]


def reference(m: Message, header: dict[str, Any]) -> bool:
    """What the table says, written out plainly (the checker compiles a fast path).
    A field the table marks unchecked is left to the code that reads it (stage
    timing's stamps: test_timing feeds that code malformed ones)."""
    for f in m.fields:
        if not f.checked:
            continue
        if f.name not in header:
            if f.required:
                return False
            continue
        v = header[f.name]
        if f.kind.types and type(v) not in f.kind.types:
            return False
        if f.kind.items is not None and type(v) is list and any(type(i) not in f.kind.items for i in v):
            return False
    return True


@pytest.mark.parametrize("m", MESSAGES, ids=lambda m: f"{m.op.value}-{m.direction.name}")
def test_check_accepts_exactly_what_the_table_describes(m: Message) -> None:
    """Every field set in turn to every sample value (or left out), the others
    well-formed: the compiled check agrees with a plain reading of the table,
    and so does the table walk that explains a refusal."""
    good = {f.name: {"int": 1, "str": "s", "bytes": b"b", "bool": True, "map": {}, "any": 1,
                     "int|nil": None, "bytes|nil": b"x", "[int]": [1], "[str]": ["s"], "[map]": [{}],
                     "[int, int]": [1, 3]}[f.kind.name] for f in m.fields}
    received = TO_STML if m.direction is Direction.TO_STML else FROM_STML
    base = {"op": m.op.value, **good}
    if m.op is not Op.BATCH:
        assert check(base, received) is None
    for f in m.fields:
        for value in SAMPLES:
            h = dict(base)
            if value is NO_FIELD:
                del h[f.name]
            else:
                h[f.name] = value
            error = m.verdict(h)          # the compiled check
            assert (error is None) == reference(m, h), (f.name, value, error)
            assert (m.check(h) is None) == (error is None)
            if error is not None:
                assert error.startswith(f"malformed {m.op.value}: {f.name} ")


def test_only_the_link_module_writes_headers() -> None:
    """No module of the STML, the front ends or the CLI writes a contract header
    as a dict literal: stml.api.link (and the ZeroMQ carrier's batch) do."""
    allowed = {ROOT / "stml" / "api" / "link.py", ROOT / "stml" / "api" / "zmq_carrier.py"}
    found = []
    for package in ("stml", "fetd_tcp", "fetd_loopback", "fetd_vhost", "fetd_spi", "scsi_target", "backends",
                    "scsi_runtime"):
        for path in (ROOT / package).rglob("*.py"):
            if path not in allowed and re.search(r"""\{\s*["']op["']\s*:""", path.read_text()):
                found.append(str(path.relative_to(ROOT)))
    assert not found


def test_rx_cmnd_headers_in_the_fixed_layout_read_back_as_the_dict() -> None:
    """FrontEndLink packs rx_cmnd in one fixed msgpack layout (stml.api.link):
    it decodes to the header pack() writes from the dict, at the edges of the
    layout too, and passes the STML's check; a header that does not fit the
    layout (an extended CDB, a number past 32 bits) is packed from the dict."""
    from stml.api.link import _RX_CMND_FIXED
    from stml.api.messages import pack, unpack

    sent: list[list] = []

    class Channel:
        def send(self, frames: list) -> None:
            sent.append(frames)

    link = FrontEndLink("ipc:///nonexistent/fixed", "test", Recorder())
    link._channel = Channel()   # type: ignore[assignment]
    cdb = bytes(range(0xF0, 0x100))
    cases = [  # (tag, nexus, lun, cdb, attr, dir, len, unsol, fits the layout)
        (1, 1, 0, cdb, 0, 2, 4096, 0, True),
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFF, bytes(16), 3, 3, 0xFFFFFFFF, 0xFFFFFFFF, True),
        (1 << 32, 1, 0, cdb, 0, 2, 4096, 0, False),
        (5, 1, 0, cdb + bytes(16), 0, 1, 512, 512, False),
        (6, 1, 2, cdb[:10], 1, 0, 0, 0, False),
    ]
    for tag, nexus, lun, c, attr, direction, length, unsol, fits in cases:
        data = [b"x" * unsol] if unsol else ()
        link.rx_cmnd(tag, nexus, lun, c, attr, direction, length, unsol, data)
        frames = sent.pop()
        want = {"op": "rx_cmnd", "tag": tag, "nexus": nexus, "lun": lun, "cdb": c, "attr": attr,
                "dir": direction, "len": length, "unsol": unsol}
        header = unpack(frames[0])
        assert header == want and type(header["cdb"]) is bytes
        assert TO_STML[Op.RX_CMND].verdict(header) is None
        assert frames[1:] == list(data)
        assert (frames[0] != pack(want) and len(frames[0]) == _RX_CMND_FIXED.size) == fits


def test_xmit_responses_in_the_fixed_layout_reach_the_handler_undecoded(monkeypatch) -> None:
    """A response in the STML's fixed layout (stml.api.messages) is read by
    FrontEndLink without the header decoder, and reaches the handler as the
    same header packed from its dict does, at the layout's edges; bytes of
    the layout's size whose constant parts differ (another key, another op)
    take the decoder's way and its refusals."""
    import stml.api.link as link_module
    from stml.api.messages import XMIT_RESPONSE_FIXED, pack, pack_xmit_response

    decoded: list[Any] = []
    real_unpack = link_module.unpack

    def counting_unpack(frame: Any) -> dict[str, Any]:
        decoded.append(frame)
        return real_unpack(frame)

    monkeypatch.setattr(link_module, "unpack", counting_unpack)
    handler = Recorder()
    link = FrontEndLink("ipc:///nonexistent/fixed", "test", handler)
    for tag, status, resid in [(0, 0, 0), (0xFFFFFFFF, 0xFF, -(1 << 63)), (7, 0x28, (1 << 63) - 1)]:
        want = {"op": "xmit_response", "tag": tag, "status": status, "sense": None, "resid": resid}
        fixed = pack_xmit_response(tag, status, resid)
        link._on_message([fixed, b"data"])
        assert decoded == [] and handler.calls.pop() == ("xmit_response", (tag, status, None, resid, [b"data"]))
        link._on_message([pack(want), b"data"])   # (at the widest values, the same bytes)
        assert len(decoded) == (pack(want) != fixed)
        assert handler.calls.pop() == ("xmit_response", (tag, status, None, resid, [b"data"]))
        decoded.clear()
    raw = pack_xmit_response(5, 0, 0)
    for odd in (raw.replace(b"status", b"statuz"), raw.replace(b"xmit_response", b"xmit_responsf")):
        assert len(odd) == XMIT_RESPONSE_FIXED.size
        link._on_message([odd])
        assert decoded == [odd] and handler.calls == []   # refused: status missing, unknown op
        decoded.clear()


# ---------------------------------------------------------------- a front end refuses

class Recorder:
    """A FrontEndHandler that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("usage", "messages_handled", "drop_nexus"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args))



def test_a_front_end_refuses_malformed_messages_with_a_log_line(tmp_path: Path, caplog) -> None:
    """FrontEndLink checks what the STML sends against the table: a header
    missing a field, or with one of the wrong type, never reaches the handler
    and is logged; well-formed ones around it do."""
    caplog.set_level(logging.WARNING, logger="stml.api")

    async def main() -> None:
        stml = FakeStml(str(tmp_path / "stml"), version=(1, 3), close_on_control=False)
        handler = Recorder()
        link = FrontEndLink(stml.endpoint, "test", handler)
        link.start()
        try:
            await link.wait_ready(10)
            link.register_nexus(1, "iqn.2026-12.test:i,i,0x1", "iqn.2026-12.test:fake", 1)
            await until(lambda: any(c[0] == "nexus_ready" for c in handler.calls), "nexus_ready")
            stml.send({"op": "rdy_to_xfer", "tag": 1, "offset": 0})                 # no length
            stml.send({"op": "xmit_response", "tag": "one", "status": 0})            # tag not an int
            stml.send({"op": "task_mgmt_fn_done", "tag": 2, "response": 0, "aborted": ["x"]})
            stml.send({"op": "no_such_op"})
            stml.send({"op": "rdy_to_xfer", "tag": 3, "offset": 0, "length": 512})  # fine
            await until(lambda: any(c[0] == "rdy_to_xfer" for c in handler.calls), "rdy_to_xfer")
            assert [c for c in handler.calls if c[0] != "detect"] == [
                ("nexus_ready", (1, None)), ("rdy_to_xfer", (3, 0, 512))]
        finally:
            await link.close()
            stml.close()

    asyncio.run(main())
    refused = [r.getMessage() for r in caplog.records if "refused a message from the STML" in r.getMessage()]
    assert refused == [
        "refused a message from the STML: malformed rdy_to_xfer: length is missing",
        "refused a message from the STML: malformed xmit_response: tag is str, not int",
        "refused a message from the STML: malformed task_mgmt_fn_done: aborted is not [int] "
        "(an item is of another type)",
        "refused a message from the STML: unknown op 'no_such_op'",
    ]


def test_a_front_end_refuses_what_only_msgspec_decodes(tmp_path: Path, caplog) -> None:
    """Headers msgpack's decoder refused or kept opaque, which msgspec decodes
    (array map keys as tuples, Ext types, the Timestamp ext as a datetime),
    sent as raw msgpack bytes: FrontEndLink refuses each where a field belongs
    with a log line and goes on; a key of another type beside the fields is
    ignored like any field the table does not name."""
    import struct

    import msgpack
    caplog.set_level(logging.WARNING, logger="stml.api")
    ext, stamp = msgpack.ExtType(5, b"\x01"), msgpack.Timestamp(1, 0)

    async def main() -> None:
        stml = FakeStml(str(tmp_path / "stml"), version=(1, 3), close_on_control=False)
        handler = Recorder()
        link = FrontEndLink(stml.endpoint, "test", handler)
        link.start()

        def send_raw(header: dict[Any, Any]) -> None:
            raw = msgpack.packb(header, use_bin_type=True)   # tuples: msgpack arrays, keys too
            assert stml.conn is not None
            stml.conn.sendall(struct.pack("<2I", 1, len(raw)) + raw)

        try:
            await link.wait_ready(10)
            send_raw({"op": stamp, "tag": 1})
            send_raw({"op": ext, "tag": 1})
            send_raw({"op": "xmit_response", "tag": ext, "status": 0})
            send_raw({"op": "rdy_to_xfer", "tag": 1, "offset": 0, "length": stamp})
            send_raw({"op": "nexus_ready", (1, 2): 1})
            send_raw({"op": "rdy_to_xfer", "tag": 3, "offset": 0, "length": 512, (0, 1): ext})
            await until(lambda: any(c[0] == "rdy_to_xfer" for c in handler.calls), "rdy_to_xfer")
            assert [c for c in handler.calls if c[0] != "detect"] == [("rdy_to_xfer", (3, 0, 512))]
        finally:
            await link.close()
            stml.close()

    asyncio.run(main())
    refused = [r.getMessage() for r in caplog.records if "refused a message from the STML" in r.getMessage()]
    assert refused == [
        "refused a message from the STML: header is not a map with an 'op'",
        "refused a message from the STML: header is not a map with an 'op'",
        "refused a message from the STML: malformed xmit_response: tag is Ext, not int",
        "refused a message from the STML: malformed rdy_to_xfer: length is datetime, not int",
        "refused a message from the STML: malformed nexus_ready: nexus is missing",
    ]


HEADERS = [   # one of each shape the contract sends: ints of every width, bin, str, nil, lists, maps
    {"op": "rx_cmnd", "tag": 7, "nexus": 1, "lun": 300, "cdb": bytes(16), "attr": 0, "dir": 2,
     "len": 1 << 20, "unsol": 0, "ts": [2 ** 63 - 1, 0]},
    {"op": "xmit_response", "tag": 2 ** 32, "status": 2, "sense": b"\x70" + bytes(17), "resid": -512},
    {"op": "detect", "stml": "s" * 300, "heartbeat_ms": 1000, "caps": ["write_region"],
     "limits": {"max_transfer": 8 << 20}, "portals": [{"host": "::1", "port": 3260, "tpgt": 1}],
     "aen": True, "ratio": 0.5, "blob": b"x" * 70000, "none": None, "neg": -2 ** 63},
]


@pytest.mark.parametrize("header", HEADERS, ids=lambda h: h["op"])
def test_headers_are_the_bytes_msgpack_writes(header: dict[str, Any]) -> None:
    """pack (msgspec) writes what msgpack's Packer(use_bin_type=True) wrote, so
    a peer on either codec reads it; unpack reads both back the same."""
    import msgpack

    from stml.api import pack, unpack
    assert pack(header) == msgpack.Packer(use_bin_type=True).pack(header)
    assert unpack(pack(header)) == header


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x91" * 100000 + b"\x01", b"\x81\x81\x01\x02\x03",
                                 b"\xdd\xff\xff\xff\xff", b"\x81\xa2op\xc0", b"\x92\x01\x02"],
                         ids=["empty", "reserved byte", "deep", "map key", "huge array", "nil op", "array"])
def test_undecodable_headers_raise_value_error(raw: bytes) -> None:
    from stml.api import unpack
    with pytest.raises(ValueError):
        unpack(raw)
