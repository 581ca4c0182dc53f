"""The gateway pieces that need no Ceph: RBD LUN specs and settings, the ALUA
states of a gateway, a standby STML's refusal, and a front end that moves on
from a standby (or silent) STML to the one that serves."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from stml import alua
from stml.api import CONTRACT_VERSION
from stml.config import ConfigError, load, lun_options, parse_lun_spec


def test_rbd_lun_spec_and_its_settings(tmp_path):
    raw = parse_lun_spec("rbd:pool/ns/img,conf=/etc/ceph/c.conf,id=gw,keyring=/k,size=1GiB,thick")
    o = lun_options(raw, "lun", tmp_path)
    assert (o.kind, o.path, o.size, o.thin) == ("rbd", "pool/ns/img", 1 << 30, False)
    assert o.backend_options() == {"conf": "/etc/ceph/c.conf", "user": "gw", "keyring": "/k"}
    assert lun_options(parse_lun_spec("rbd:rbd/img"), "lun", tmp_path).backend_options() == {}


@pytest.mark.parametrize("text, where", [
    ('backend = "rbd"\npath = "just-an-image"', "target[0].lun[0].path"),
    ('backend = "rbd"\npath = "a/b/c/d"', "target[0].lun[0].path"),
    ('backend = "file"\npath = "x.img"\nsize = "1MiB"\nceph_conf = "/c"', "target[0].lun[0].ceph_conf"),
    ('backend = "rbd"\npath = "rbd/i"\nceph_user = 7', "target[0].lun[0].ceph_user"),
])
def test_bad_rbd_settings_name_their_field(tmp_path, text, where):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[target]]\nname = "iqn.2026-11.org.test:t"\n[[target.lun]]\n{text}\n')
    with pytest.raises(ConfigError) as e:
        load(str(cfg), str(tmp_path))
    assert str(e.value).startswith(where), str(e.value)


def test_one_image_backs_one_lun_per_stml(tmp_path):
    cfg = tmp_path / "c.toml"
    lun = '[[target.lun]]\nbackend = "rbd"\npath = "rbd/img"\n'
    cfg.write_text(f'[[target]]\nname = "iqn.2026-11.org.test:t"\n{lun}{lun}')
    with pytest.raises(ConfigError, match="rbd/img backs two LUNs"):
        load(str(cfg), str(tmp_path))


def test_peers_are_tcp_endpoints(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[stml]\npeers = ["ipc:///x"]\n')
    with pytest.raises(ConfigError, match="stml.peers"):
        load(str(cfg), str(tmp_path))
    cfg.write_text('[stml]\npeers = ["tcp://10.0.0.2:7100"]\nfront_end_key = "fe.key_secret"\n')
    s = load(str(cfg), str(tmp_path)).stml
    assert s.peers == ["tcp://10.0.0.2:7100"] and s.front_end_key == str(tmp_path / "fe.key_secret")


def _rtpg(local: set[int] | None, groups: set[int], tpg: int) -> dict[int, int]:
    import asyncio
    import struct
    emulator = SimpleNamespace(local_tpgs=local, portal_groups=lambda target: groups)
    task = SimpleNamespace(cdb=bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), services=emulator,
                           nexus=SimpleNamespace(target="t", tpg=tpg))
    data = asyncio.run(alua.report_target_port_groups(task))
    out = {}
    for off in range(4, 4 + struct.unpack_from(">I", data)[0], 12):
        assert data[off + 1] == alua.SUPPORTED_STATES == 0x03   # AO and AN supported
        out[struct.unpack_from(">H", data, off + 2)[0]] = data[off] & 0x0F
    return out


def test_a_gateway_optimizes_its_own_port_groups_on_every_path():
    # a standalone STML: every group optimized, as before
    assert _rtpg(None, {1, 2}, 1) == {1: 0, 2: 0}
    # a gateway whose host has group 2: the others' front ends are one hop further
    assert _rtpg({2}, {1, 2}, 1) == _rtpg({2}, {1, 2}, 2) == {1: alua.ACTIVE_NON_OPTIMIZED, 2: 0}


def test_a_standby_stml_refuses_front_ends():
    from concurrent.futures import ThreadPoolExecutor
    from stml.emulator import Emulator
    sent: list[dict] = []
    em = Emulator([], lambda ident, header, frames: sent.append(header), ThreadPoolExecutor(1))
    em.standby = "a standby gateway"
    em.handle(b"fe", {"op": "register_target_front_end", "version": list(CONTRACT_VERSION),
                      "kind": "raw", "name": "x"}, [])
    assert sent == [{"op": "detect", "version": list(CONTRACT_VERSION), "error": "a standby gateway",
                     "standby": True}]
    assert not em.front_ends
    em.standby = None
    em.handle(b"fe", {"op": "register_target_front_end", "version": list(CONTRACT_VERSION),
                      "kind": "raw", "name": "x"}, [])
    assert sent[-1]["op"] == "detect" and "error" not in sent[-1] and em.front_ends


class FakeStml:
    """A ROUTER that answers every registration as a standby STML does (or,
    `silent`, says nothing at all)."""

    def __init__(self, silent: bool = False) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.silent = silent
        self.registrations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, *frames = self.sock.recv_multipart()
            header = msgpack.unpackb(frames[0], raw=False)
            ops = [header["op"]]
            if header["op"] == "batch":
                ops, i = [], 1
                for n in header["n"]:
                    ops.append(msgpack.unpackb(frames[i], raw=False)["op"])
                    i += n
            for op in ops:
                if op == "register_target_front_end":
                    self.registrations += 1
                    if not self.silent:
                        self.sock.send_multipart([ident, msgpack.packb(
                            {"op": "detect", "version": list(CONTRACT_VERSION),
                             "error": "a standby gateway", "standby": True})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.parametrize("silent", [False, True], ids=["standby", "silent"])
def test_a_front_end_uses_the_stml_that_serves(stml, silent):
    """A front end given [a standby (or silent) STML, a serving one] ends up
    with the serving one and runs commands there."""
    from fetd_loopback import LoopbackClient
    fake = FakeStml(silent)
    try:
        with LoopbackClient([fake.endpoint, stml.endpoint], timeout=20) as c:   # type: ignore[arg-type]
            assert c.inquiry(0)[8:16] == b"SCSITGT "
        assert fake.registrations >= 1
    finally:
        fake.close()
