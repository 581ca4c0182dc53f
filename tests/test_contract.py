"""The STML <-> front end contract (stml.api), spoken over a raw ZeroMQ DEALER
socket to a real STML process: registration, version handshake, nexuses,
data transfer, malformed input, heartbeats and front-end loss."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest

from stml.api import CONTRACT_VERSION
from stml.config import host_iqn
from stml.sense import parse_sense

from support.procs import stop_pid
from support.rawfe import RawFrontEnd

TUR = bytes(6)
INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])


@pytest.fixture
def raw_fe():
    made: list[RawFrontEnd] = []

    def make(endpoint: str, name: str | None = None) -> RawFrontEnd:
        fe = RawFrontEnd(endpoint, name)
        made.append(fe)
        return fe

    yield make
    for fe in made:
        fe.close()


def assert_serving(stml, raw_fe) -> None:
    """The STML is alive and answers a properly registered front end."""
    assert stml.alive(), stml.log()
    fe = raw_fe(stml.endpoint)
    assert "error" not in fe.register()
    assert "error" not in fe.nexus()
    h, frames = fe.command(99, INQUIRY, direction=2, length=96)
    assert h["status"] == 0
    assert frames[0][8:16] == b"SCSITGT "


# ---------------------------------------------------------------- registration

def test_detect_lists_version_targets_luns_limits(stml_factory, raw_fe):
    stml = stml_factory("ram:64MiB", "ram:1MiB,ro")
    fe = raw_fe(stml.endpoint)
    d = fe.register()
    assert "error" not in d
    assert d["version"] == list(CONTRACT_VERSION)
    assert isinstance(d["stml"], str) and d["stml"]
    assert d["heartbeat_ms"] > 0
    assert [t["name"] for t in d["targets"]] == [host_iqn()]
    luns = d["targets"][0]["luns"]
    assert luns == [
        {"lun": 0, "block_size": 512, "blocks": 131072, "ro": False, "removable": False},
        {"lun": 1, "block_size": 512, "blocks": 2048, "ro": True, "removable": False},
    ]
    assert d["targets"][0]["access"] == {"acl": [], "chap": None, "mutual": None, "erl": 0, "cmdsn_depth": 128}
    limits = d["limits"]
    assert limits["max_transfer"] >= 1 << 20
    assert limits["queue_depth"] >= 1


def test_major_version_mismatch_is_refused(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    d = fe.register(version=(2, 0))
    assert "2.0" in d["error"]
    assert "targets" not in d
    # not registered: anything else it sends is answered by `release`
    fe.cmnd(1, TUR)
    h, _ = fe.expect("release")
    assert "register" in h["reason"]
    fe.send({"op": "register_nexus", "nexus": 1, "initiator": "iqn.2026-01.x:y,i,0x1",
             "target": host_iqn(), "tpg": 1})
    fe.expect("release")
    assert "refused" in stml.log()


@pytest.mark.parametrize("version", [None, "1.0", [1], ["1", "0"]])
def test_malformed_version_is_refused(stml, raw_fe, version):
    fe = raw_fe(stml.endpoint)
    fe.send({"op": "register_target_front_end", "version": version, "kind": "raw", "name": "x",
             "heartbeat_ms": 1000, "aen": False})
    d, _ = fe.expect("detect")
    assert "version" in d["error"]
    fe.cmnd(1, TUR)
    fe.expect("release")


def test_minor_version_difference_is_accepted(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    d = fe.register(version=(CONTRACT_VERSION[0], CONTRACT_VERSION[1] + 7))
    assert "error" not in d
    assert d["targets"][0]["luns"][0]["blocks"] == 131072
    ready = fe.nexus()
    assert ready["nexus"] == 1 and "error" not in ready
    h, frames = fe.command(5, INQUIRY, direction=2, length=96)
    assert h["status"] == 0 and frames[0][8:16] == b"SCSITGT "


def test_register_nexus_to_unknown_target_gets_error(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    fe.register()
    ready = fe.nexus(nexus=7, target="iqn.2026-01.org.example:nope")
    assert ready["nexus"] == 7
    assert "iqn.2026-01.org.example:nope" in ready["error"]
    # the nexus does not exist: a command on it fails with LOGICAL UNIT COMMUNICATION FAILURE
    fe.cmnd(1, TUR, nexus=7)
    h, _ = fe.expect("xmit_response")
    assert h["status"] == 0x02
    assert parse_sense(h["sense"]) == (0x0B, 0x08, 0x00)


def test_command_on_unknown_or_released_nexus(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.cmnd(1, TUR, nexus=42)
    h, _ = fe.expect("xmit_response")
    assert (h["tag"], h["status"]) == (1, 0x02)
    assert parse_sense(h["sense"]) == (0x0B, 0x08, 0x00)
    fe.nexus(nexus=3)
    h, _ = fe.command(2, TUR, nexus=3)
    assert h["status"] == 0
    fe.send({"op": "scsi_release", "nexus": 3})
    fe.cmnd(3, TUR, nexus=3)
    h, _ = fe.expect("xmit_response")
    assert parse_sense(h["sense"]) == (0x0B, 0x08, 0x00)


def test_deregister_releases_front_end(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.nexus()
    fe.send({"op": "deregister_target_front_end"})
    stml.wait_log(f"releasing front end {fe.name}: deregistered")
    fe.cmnd(1, TUR)
    fe.expect("release")


# ---------------------------------------------------------------- data transfer

def test_write_solicited_then_read_back(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.nexus()
    fe.command(1, TUR)  # consume any unit attention
    payload = bytes(range(256)) * 4
    cdb = struct.pack(">BBIBHB", 0x2A, 0, 10, 0, 2, 0)
    fe.cmnd(2, cdb, direction=1, length=1024)
    r, _ = fe.expect("rdy_to_xfer")
    assert (r["tag"], r["offset"], r["length"]) == (2, 0, 1024)
    fe.send({"op": "scsi_rx_data", "tag": 2, "offset": 0}, [payload[:512]])
    fe.send({"op": "scsi_rx_data", "tag": 2, "offset": 512}, [payload[512:]])
    h, frames = fe.expect("xmit_response")
    assert (h["tag"], h["status"], h["resid"]) == (2, 0, 0)
    assert frames == []
    fe.send({"op": "scsi_target_done", "tags": [2]})
    h, frames = fe.command(3, struct.pack(">BBIBHB", 0x28, 0, 10, 0, 2, 0), direction=2, length=1024)
    assert (h["status"], h["resid"]) == (0, 0)
    assert b"".join(frames) == payload


def test_write_with_immediate_data_needs_no_rdy_to_xfer(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.nexus()
    fe.command(1, TUR)
    payload = os.urandom(512)
    fe.cmnd(2, struct.pack(">BBIBHB", 0x2A, 0, 3, 0, 1, 0), direction=1, length=512, unsol=512,
            frames=[payload])
    h, _ = fe.expect("xmit_response")  # a rdy_to_xfer here would fail this
    assert (h["tag"], h["status"]) == (2, 0)
    h, frames = fe.command(3, struct.pack(">BBIBHB", 0x28, 0, 3, 0, 1, 0), direction=2, length=512)
    assert frames[0] == payload


def test_read_underflow_reports_residual(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.nexus()
    h, frames = fe.command(1, INQUIRY, direction=2, length=200)  # INQUIRY allocates only 96
    assert h["status"] == 0
    assert h["resid"] == 200 - len(frames[0]) > 0


def test_rx_data_with_error_aborts_command(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.nexus()
    fe.command(1, TUR)
    fe.cmnd(2, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), direction=1, length=512)
    fe.expect("rdy_to_xfer")
    fe.send({"op": "scsi_rx_data", "tag": 2, "offset": 0, "error": "DataSN gap"}, [bytes(512)])
    h, _ = fe.expect("xmit_response")
    assert h["status"] == 0x02
    assert parse_sense(h["sense"]) == (0x0B, 0x4B, 0x00)


# ---------------------------------------------------------------- bad input

def test_malformed_messages_do_not_kill_the_stml(stml, raw_fe):
    bad = raw_fe(stml.endpoint)
    # before registering
    bad.send_raw(b"\xc1\xff not msgpack")
    bad.send_raw(msgpack.packb([1, 2, 3]))
    bad.send_raw(msgpack.packb({"no": "op"}))
    bad.send_raw(msgpack.packb({"op": 17}))
    bad.send_raw(b"")
    bad.send({"op": "no_such_op"})
    assert bad.recv()[0]["op"] == "release"  # an unknown front end is told to register
    bad.register()
    bad.nexus()
    # after registering
    for frame in (b"\xc1", msgpack.packb("just a string"), msgpack.packb(None), b""):
        bad.send_raw(frame)
    bad.send({"op": "no_such_op", "tag": 1})
    bad.send({"op": "rx_cmnd"})                                      # no fields at all
    bad.send({"op": "rx_cmnd", "tag": 1, "nexus": 1, "lun": 0})      # no cdb
    bad.send({"op": "rx_cmnd", "tag": 2, "nexus": 1, "lun": 0, "cdb": "not bytes"})
    bad.send({"op": "rx_cmnd", "tag": 3, "nexus": 1, "lun": 0, "cdb": b""})
    bad.send({"op": "rx_cmnd", "tag": [1], "nexus": 1, "lun": 0, "cdb": TUR})
    bad.send({"op": "rx_cmnd", "tag": 4, "nexus": {"a": 1}, "lun": 0, "cdb": TUR})
    bad.send({"op": "register_nexus", "nexus": "one"})
    bad.send({"op": "register_nexus"})
    bad.send({"op": "scsi_rx_data", "tag": "x"})
    bad.send({"op": "scsi_release"})
    bad.send({"op": "rx_task_mgmt_fn", "tag": 9, "nexus": 1, "fn": "abort"})
    bad.send({"op": "scsi_target_done"})
    time.sleep(0.3)
    assert stml.alive(), stml.log()
    # the misbehaving front end itself is still served
    h, frames = bad.command(50, INQUIRY, direction=2, length=96)
    assert h["status"] == 0 and frames[0][8:16] == b"SCSITGT "
    # and so is a new one
    assert_serving(stml, raw_fe)
    assert "malformed" in stml.log() or "refused" in stml.log()


def test_bad_cdb_fields_get_check_condition_not_a_crash(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.nexus()
    # a CDB shorter than its opcode needs
    h, _ = fe.command(1, bytes([0x28, 0, 0]), direction=2, length=512)
    assert h["status"] == 0x02 and parse_sense(h["sense"])[0] == 0x05
    # a LUN number that is not an int is no LUN at all
    h, _ = fe.command(2, TUR, lun="zero")
    assert h["status"] == 0x02 and parse_sense(h["sense"]) == (0x05, 0x25, 0x00)
    assert_serving(stml, raw_fe)


@pytest.mark.parametrize("bad", [{"attr": 4}, {"attr": 255}, {"attr": -1}, {"length": -1},
                                 {"direction": True}])
def test_bad_transport_fields_are_refused_as_such(stml, raw_fe, bad):
    """A task attribute outside TaskAttr (or any other bad rx_cmnd count) is
    not the initiator's CDB: ILLEGAL REQUEST, INVALID FIELD IN COMMAND
    INFORMATION UNIT, before the command reaches a task set."""
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.nexus()
    h, _ = fe.command(1, TUR, **bad)
    assert h["status"] == 0x02 and parse_sense(h["sense"]) == (0x05, 0x0E, 0x03)
    for attr in (0, 1, 2):                     # SIMPLE, ORDERED, HEAD OF QUEUE still run
        h, _ = fe.command(2 + attr, TUR, attr=attr)
        assert h["status"] == 0, h
    h, _ = fe.command(9, TUR, attr=3)          # ACA: no ACA (NACA=0), INVALID MESSAGE ERROR
    assert h["status"] == 0x02 and parse_sense(h["sense"]) == (0x05, 0x49, 0x00)


def test_headers_that_break_the_table_are_refused_with_a_log_line(stml, raw_fe):
    """The STML checks every header against stml.api.messages.MESSAGES: one
    that does not fit is refused with a log line naming the field; where the
    sender would otherwise wait, it gets an answer that says so."""
    fe = raw_fe(stml.endpoint)
    fe.send({"op": "register_target_front_end", "version": "1.3", "kind": "raw", "name": fe.name})
    d, _ = fe.expect("detect")
    assert d["error"] == "malformed register_target_front_end: version is str, not [int, int]"
    fe.register()
    fe.nexus()
    fe.command(1, TUR)
    fe.send({"op": "register_nexus", "nexus": "two", "initiator": "iqn.2026-01.x:y,i,0x2",
             "target": host_iqn(), "tpg": 1})
    fe.send({"op": "scsi_target_done", "tags": [1, "x"]})
    fe.send({"op": "heartbeat", "usage": [1, 2]})
    fe.send({"op": "portal_state", "follows": "yes", "portals": []})
    # a registered front end may not manage at all (decision 0242): a malformed
    # request comes from a peer that did not register, as a management client's
    manager = raw_fe(stml.endpoint)
    manager.send({"op": "mgmt", "id": 7, "cmd": 5})
    h, _ = manager.expect("mgmt_reply")
    assert h == {"op": "mgmt_reply", "id": 7, "ok": False, "error": "malformed mgmt: cmd is int, not str"}
    h, _ = fe.command(2, TUR, lun=True)        # a bool is no LUN number
    assert h["status"] == 0x02 and parse_sense(h["sense"]) == (0x05, 0x25, 0x00)
    text = stml.wait_log("malformed rx_cmnd: lun is bool, not int: refused")
    for line in ("malformed register_nexus: nexus is str, not int: refused",
                 "malformed scsi_target_done: tags is not [int] (an item is of another type): refused",
                 "malformed heartbeat: usage is list, not map: refused",
                 "malformed portal_state: follows is str, not bool"):
        assert line in text, line
    assert stml.alive()
    h, frames = fe.command(3, INQUIRY, direction=2, length=96)
    assert h["status"] == 0 and frames[0][8:16] == b"SCSITGT "


# ---------------------------------------------------------------- liveness

def test_silent_front_end_is_released(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    d = fe.register(heartbeat_ms=200)
    fe.nexus()
    # the STML heartbeats us; we never answer
    text = stml.wait_log(f"releasing front end {fe.name}: silent", timeout=6 * d["heartbeat_ms"] / 1000 + 5)
    assert "silent" in text
    fe.cmnd(1, TUR)
    h, _ = fe.recv()
    assert h["op"] == "release"


def test_stml_sends_heartbeats(stml, raw_fe):
    fe = raw_fe(stml.endpoint)
    d = fe.register()
    h, _ = fe.recv(timeout=3 * d["heartbeat_ms"] / 1000 + 2, skip_heartbeats=False)
    assert h == {"op": "heartbeat"}


WRITER = textwrap.dedent("""
    import os, struct, sys
    from fetd_loopback import LoopbackClient
    c = LoopbackClient(sys.argv[1], timeout=10).open()
    c.capacity(0)
    data = os.urandom(64 * 1024)
    futs = []
    lba = 0
    announced = False
    while True:
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0)
        futs.append(c.submit(0, cdb, data_out=data))
        lba = (lba + 128) % 100000
        if len(futs) >= 16:
            futs.pop(0).result(10)
            if not announced:
                print("writing", flush=True)
                announced = True
""")


def test_killed_front_end_is_released_and_others_are_served(stml, client_factory, tmp_short):
    other = client_factory(stml.endpoint)
    other.write(0, 120000, b"\xab" * 4096)
    out = tmp_short() / "writer.out"
    with open(out, "wb") as f:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, stml.endpoint], stdout=f,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while b"writing" not in out.read_bytes():
            assert writer.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.02)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(5)
    finally:
        stop_pid(writer)
    # its stream closed with it: released at once, not after missed heartbeats
    name = f"loopback-{os.uname().nodename}-{writer.pid}"
    text = stml.wait_log(f"releasing front end {name}: deregistered")
    assert f"front end {name} closed its stream" in text
    # the STML keeps serving the other client, which its heartbeats kept registered
    assert stml.alive()
    assert f"releasing front end loopback-{os.uname().nodename}-{os.getpid()}" not in stml.log()
    assert other.read(0, 120000, 8) == b"\xab" * 4096
    other.write(0, 120008, b"\xcd" * 512)
    assert other.read(0, 120008, 1) == b"\xcd" * 512


def test_headers_only_msgspec_decodes_are_refused_by_the_table(stml, raw_fe):
    """msgspec decodes what msgpack's decoder refused or kept opaque: array map
    keys (as tuples), Ext types (as msgspec Ext) and the Timestamp ext (as a
    datetime). The table's check refuses them where a field belongs, with a log
    line (a command that names its task gets CHECK CONDITION), and the STML
    serves on; a key of another type beside the fields is ignored like any
    field the table does not name."""
    fe = raw_fe(stml.endpoint)
    fe.register()
    fe.nexus()
    ext, stamp = msgpack.ExtType(5, b"\x01"), msgpack.Timestamp(1, 0)
    cmnd = {"op": "rx_cmnd", "nexus": 1, "lun": 0, "cdb": TUR}

    def raw(header: dict) -> bytes:
        return msgpack.packb(header, use_bin_type=True)   # tuples: msgpack arrays, keys too

    fe.send_raw(raw({"op": stamp, "tag": 1}))
    fe.send_raw(raw({"op": ext, "tag": 1}))
    fe.send_raw(raw({**cmnd, "tag": ext}))
    fe.send_raw(raw({"op": "register_nexus", (1, 2): 2, "initiator": "i", "target": host_iqn(), "tpg": 1}))
    fe.send_raw(raw({**cmnd, "tag": 3, "lun": stamp}))
    h, _ = fe.expect("xmit_response")
    assert (h["tag"], h["status"], parse_sense(h["sense"])) == (3, 0x02, (0x05, 0x25, 0x00))
    fe.send_raw(raw({**cmnd, "tag": 4, (0, 1): b"x"}))
    h, _ = fe.expect("xmit_response")
    assert (h["tag"], h["status"]) == (4, 0)
    assert stml.alive(), stml.log()
    log = stml.log()
    assert log.count("header is not a map with an 'op'") == 2
    assert "malformed rx_cmnd: tag is Ext, not int: refused" in log
    assert "malformed register_nexus: nexus is missing: refused" in log
    assert "malformed rx_cmnd: lun is datetime, not int: refused" in log
    assert_serving(stml, raw_fe)
