"""The gateway pieces that need no Ceph: RBD LUN specs and settings, the ALUA
states of a gateway, a standby STML's refusal, and a front end that moves on
from a standby (or silent) STML to the one that serves."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from backends.ram import RamBackend
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


class LockedBackend:
    """What the gateway asks of a shared (RBD) backend: a lock another gateway
    may hold, and reservations kept with the image."""

    def __init__(self, held_elsewhere: bool, doc: dict | None = None) -> None:
        self.held_elsewhere = held_elsewhere
        self.doc = doc
        self.spec = "rbd/img"
        self.locked = False
        self.fenced = False

    def size(self) -> int:
        return 1 << 20

    def lock_acquire(self) -> None:
        import errno
        from backends import BackendError
        if self.held_elsewhere:   # as backends.rbd says it
            e = BackendError("rbd:rbd/img: another gateway holds the image's exclusive lock")
            e.errno = errno.EBUSY   # type: ignore[attr-defined]
            raise e
        self.locked = True

    def lock_release(self) -> None:
        self.locked = False

    def pr_store(self):
        return SimpleNamespace(always=True, where="image metadata", read=lambda: self.doc,
                               write=lambda doc: True)


def _adopting(backend: LockedBackend, sent: list | None = None):
    """A standalone STML with a front end connected, and a new shared LU;
    what the STML sends goes to `sent`."""
    from concurrent.futures import ThreadPoolExecutor
    from stml.emulator import Emulator
    from stml.gateway import Gateway
    out = sent if sent is not None else []
    em = Emulator([], lambda ident, header, frames: out.append((ident, header)), ThreadPoolExecutor(1),
                  portal_groups=[2])
    em.handle(b"fe", {"op": "register_target_front_end", "version": list(CONTRACT_VERSION),
                      "kind": "raw", "name": "x"}, [])
    lu = FakeLU(backend)
    return em, Gateway(em, ThreadPoolExecutor(1)), lu


class FakeLU:
    """What the gateway and stml.pr use of a LogicalUnit."""

    def __init__(self, backend: LockedBackend) -> None:
        self.backend = backend
        self.target, self.lun = "iqn.2026-11.org.test:t", 1
        self.pr = None


def test_a_standalone_stml_refuses_an_rbd_lun_another_gateway_holds():
    """lun add of an image whose lock a live gateway holds is refused: the
    STML stays standalone, serving its front ends. It turned 'standby' with
    its front ends still connected and served the image without its lock."""
    import asyncio
    from backends import BackendError
    from stml.gateway import STANDALONE
    backend = LockedBackend(held_elsewhere=True)
    em, gw, lu = _adopting(backend)

    async def run() -> None:
        with pytest.raises(BackendError, match="another gateway holds"):
            await gw.adopt(lu)
    asyncio.run(run())
    assert (gw.role, em.standby, list(em.front_ends)) == (STANDALONE, None, [b"fe"])


def test_a_standalone_stml_takes_an_rbd_luns_lock_and_reservations_before_serving_it():
    """With the lock free, lun add returns with the lock held and the image's
    reservations in force: the STML is the active gateway at once, its front
    ends still connected (a PR OUT through them is not dropped later by a
    takeover that starts from the image again)."""
    import asyncio
    from stml import pr
    from stml.gateway import ACTIVE
    doc = {"version": 1, "target": "iqn.2026-11.org.test:t", "lun": 1, "generation": 3, "aptpl": False,
           "registrations": [{"key": 7, "initiator": "iqn.2026-11.org.test:i", "target": "iqn.2026-11.org.test:t",
                              "tpg": None}], "reservation": None}
    backend = LockedBackend(held_elsewhere=False, doc=doc)
    em, gw, lu = _adopting(backend)
    asyncio.run(gw.adopt(lu))
    assert (gw.role, em.standby, list(em.front_ends)) == (ACTIVE, None, [b"fe"])
    assert backend.locked and [r.key for r in pr.state(lu).regs] == [7] and lu.pr.store is not None


def test_a_gateway_stml_finding_the_lock_held_becomes_the_standby_and_lets_its_front_ends_go():
    """One of several gateways (`[stml] peers`) that serves no image yet, and
    `lun add` of an image another gateway serves: the add stands (the LU is
    that gateway's too), and this STML becomes its standby at once, releasing
    its front ends, which go to the STML that serves. It turned standby with
    its front ends still attached, and served the image without its lock."""
    import asyncio
    from stml.api import Op
    from stml.gateway import STANDBY
    sent: list = []
    backend = LockedBackend(held_elsewhere=True)
    em, gw, lu = _adopting(backend, sent)
    gw.grouped = True
    asyncio.run(gw.adopt(lu))
    assert (gw.role, list(em.front_ends), em.local_tpgs) == (STANDBY, [], {2})
    assert "another gateway holds the lock of image rbd/img" in (em.standby or "")
    assert [(ident, h["op"]) for ident, h in sent if h["op"] == Op.RELEASE] == [(b"fe", Op.RELEASE)]
    assert not backend.locked and lu.pr is None   # nothing taken, no reservations served


def test_a_gateway_starting_walks_its_luns_once(monkeypatch):
    """start() watches every shared LU from one walk of the LUs: it walked
    (and sorted) all of them again for each shared LU, so a start with n RBD
    LUNs cost n walks of n in one step of the loop (0228)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from stml.emulator import Emulator, Target
    from stml.gateway import STANDBY, Gateway
    lus = {}
    for n in range(40):
        lu = FakeLU(LockedBackend(held_elsewhere=True))
        lu.lun, lu.naa = n, bytes([0x60, n]) + bytes(14)   # type: ignore[attr-defined]
        lus[n] = lu
    em = Emulator([Target("iqn.2026-11.org.test:t", lus)], lambda *a: None, ThreadPoolExecutor(1))  # type: ignore[arg-type]
    gw = Gateway(em, ThreadPoolExecutor(1))
    walks = []
    real = Gateway.is_shared
    monkeypatch.setattr(Gateway, "is_shared", staticmethod(lambda lu: (walks.append(lu), real(lu))[1]))

    async def run() -> None:
        gw.start()
        assert len(walks) == 40   # each LU looked at once
        await gw.stop()
    asyncio.run(run())
    assert gw.role == STANDBY and sorted(lu.lun for lu in gw._sizes) == list(range(40))
    assert all(lu.backend.on_change is not None for lu in lus.values())


class PlainRam(RamBackend):
    """Storage no other gateway shares: counts the look-ups of what it lacks
    (a lock), as a walk looking for the shared LUs makes."""

    asked = 0

    def __getattr__(self, name: str):
        PlainRam.asked += 1
        raise AttributeError(name)


def test_the_lock_check_and_status_look_at_the_shared_lus_only():
    """The active gateway's lock check (every second) and `status` walked and
    sorted every LU of every target to find the RBD ones (0228): with 4 RBD
    LUs among 300 they looked at the other 296 each time. They read the
    gateway's index of shared LUs now, in (target, LUN) order (0221)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from stml.emulator import Emulator, Target
    from stml.gateway import ACTIVE, Gateway
    from stml.lu import LogicalUnit, LunOptions
    em = Emulator([], lambda *a: None, ThreadPoolExecutor(1))
    for name in ("iqn.2026-11.org.test:b", "iqn.2026-11.org.test:a"):
        lus = {}
        for n in range(150):
            shared = n in (7, 149) and name.endswith("a") or n == 3
            backend = OwnedRam(f"pool/{name[-1]}{n}") if shared else PlainRam(1 << 20)
            lus[n] = LogicalUnit(name, n, backend, LunOptions("rbd" if shared else "ram", size=1 << 20,
                                                             path=f"pool/{name[-1]}{n}", id=f"{n:030x}{ord(name[-1]):02x}"),
                                 em.templates["disk"])
        em.targets[name] = Target(name, lus)
    gw = Gateway(em, ThreadPoolExecutor(1))

    async def run() -> dict:
        gw.start()
        await gw.stop()
        gw.role = ACTIVE
        PlainRam.asked = 0
        await gw._check()
        status = await gw.status()
        assert PlainRam.asked == 0
        return status
    status = asyncio.run(run())
    assert gw.role == ACTIVE   # every lock still held
    assert [(i["target"][-1], i["lun"]) for i in status["images"]] == [("a", 3), ("a", 7), ("a", 149), ("b", 3)]


class SharedRam:
    """A RAM store that acts as an RBD image: a lock, reservations kept with
    it, a size that can change under the gateway."""

    def __init__(self, spec: str) -> None:
        self.inner = RamBackend(1 << 20)
        self.spec, self.fenced, self.locked, self.grown = spec, False, False, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def lock_acquire(self) -> None:
        self.locked = True

    def lock_release(self) -> None:
        self.locked = False

    def is_lock_owner(self) -> bool:
        return self.locked

    def pr_store(self):
        return SimpleNamespace(always=True, where="image metadata", read=lambda: None, write=lambda doc: True)

    def refresh_size(self) -> int:
        self.grown += 1 << 20
        return self.inner.size() + self.grown


class OwnedRam(SharedRam):
    """A shared image whose lock this gateway holds."""

    def __init__(self, spec: str) -> None:
        super().__init__(spec)
        self.locked = True

    def lock_owners(self) -> list[str]:
        return ["10.0.0.1:0/1"]

    def client_address(self) -> str:
        return "10.0.0.1:0/1"


def test_the_gateways_index_follows_every_change_of_the_luns(monkeypatch, tmp_path):
    """What the gateway's index of shared LUs holds is what a walk of every
    LU finds, after each way a LU comes or goes: the start, `lun add` of an
    RBD LUN and of a file, `lun remove`, `target remove`, a resize of the
    image, and an RBD LUN served offline (its image could not open)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from backends import open_backend
    from stml import mgmt as mgmt_mod
    from stml.config import Config, LunConfig, TargetConfig
    from stml.emulator import Emulator, Target
    from stml.gateway import Gateway
    from stml.lu import LogicalUnit, LunOptions, Offline
    from stml.mgmt import Management
    A, B = "iqn.2026-11.org.test:a", "iqn.2026-11.org.test:b"
    em = Emulator([], lambda *a: None, ThreadPoolExecutor(2))

    def lu(target: str, n: int, backend, kind: str = "rbd") -> LogicalUnit:
        return LogicalUnit(target, n, backend, LunOptions(kind=kind, path=f"pool/{target[-1]}{n}", id=f"{n:032x}"),
                           em.templates["disk"])
    em.targets[A] = Target(A, {0: lu(A, 0, SharedRam("pool/a0")), 1: lu(A, 1, Offline("no cluster")),
                               2: lu(A, 2, open_backend("ram", 1 << 20), "ram")}, "", {"acl": []})
    em.targets[B] = Target(B, {5: lu(B, 5, SharedRam("pool/b5"))}, "", {"acl": []})
    config = Config(tmp_path / "c.toml", [TargetConfig(t, [LunConfig(n, x.options) for n, x in em.targets[t].luns.items()])
                                          for t in (A, B)], "ipc:///nonexistent", [])
    gw = Gateway(em, ThreadPoolExecutor(1))
    m = Management(em, config, gateway=gw, metrics=None, portals=None,   # type: ignore[arg-type]
                   endpoints=[], traces=None)   # type: ignore[arg-type]
    monkeypatch.setattr(mgmt_mod, "open_store", lambda o, create: SharedRam(o.path) if o.kind == "rbd"
                        else open_backend("ram", 1 << 20))

    def walked() -> list[LogicalUnit]:
        every = [x for t in em.targets.values() for x in t.luns.values() if Gateway.is_shared(x)]
        return sorted(every, key=lambda x: (x.target, x.lun))

    async def run() -> list:
        gw.start()
        seen = [[(x.target[-1], x.lun) for x in gw.shared()]]
        assert gw.shared() == walked()
        for change in (m.lun_add("rbd:pool/new", B, 1), m.lun_add("ram:1MiB", A, 3), m.lun_remove(0, A),
                       m.lun_add("rbd:pool/again", A, 0), gw._resized(em.targets[B].luns[5]),
                       m.target_remove(B, force=True)):
            await change
            assert gw.shared() == walked()
            seen.append([(x.target[-1], x.lun) for x in gw.shared()])
        assert gw._sizes == {em.targets[A].luns[0]: 1 << 20}   # removed ones are forgotten
        await gw.stop()
        return seen
    assert asyncio.run(run()) == [[("a", 0), ("b", 5)], [("a", 0), ("b", 1), ("b", 5)], [("a", 0), ("b", 1), ("b", 5)],
                    [("b", 1), ("b", 5)], [("a", 0), ("b", 1), ("b", 5)], [("a", 0), ("b", 1), ("b", 5)],
                    [("a", 0)]]


def test_a_standbys_status_says_where_its_front_ends_are():
    """A standby's STML has no front end: its host's one is attached to the
    active gateway. `status` says so rather than an alarming bare "(none)"."""
    from scsi_target.mgmt import render_status
    image = {"target": "iqn.2026-11.org.test:t", "lun": 0, "image": "rbd/i", "lock_owner": "10.0.0.1:0/1",
             "mine": False}
    snap = {"stml": "stml", "uptime_s": 1.0, "config": None, "endpoints": ["x"], "portals": [], "luns": [],
            "sessions": [], "front_ends": [],
            "gateway": {"role": "standby", "for_s": 1.0, "takeovers": 0, "images": [image]}}
    assert "Front ends\n(none: a standby's front ends attach to the active gateway)\n" in render_status(snap, False)
    snap["gateway"]["role"] = "active"
    assert "Front ends\n(none)\n" in render_status(snap, False)


def test_a_resized_image_describes_every_lu_once_for_all_front_ends():
    """Another gateway resized an image: every front end gets a new detect.
    The inventory was built again for each front end (front ends x LUs in one
    step, 0228); it is built once and sent to each now (0229)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from stml.api import Op
    from stml.emulator import Emulator, Target
    from stml.gateway import Gateway
    from stml.lu import LogicalUnit, LunOptions
    sizes = [0]

    class Counted(RamBackend):
        def size(self) -> int:
            sizes[0] += 1
            return super().size()

    class SharedCounted(SharedRam):
        def size(self) -> int:
            sizes[0] += 1
            return self.inner.size() + self.grown

    sent: list = []
    em = Emulator([], lambda ident, h, frames: sent.append((ident, h)), ThreadPoolExecutor(1))
    o = LunOptions("ram", size=1 << 20)
    t = "iqn.2026-11.org.test:t"
    lus = {n: LogicalUnit(t, n, Counted(1 << 20) if n else SharedCounted("pool/t0"), o, em.templates["disk"])
           for n in range(30)}
    em.targets[t] = Target(t, lus)
    for ident in (b"a", b"b", b"c", b"d"):
        em.handle(ident, {"op": Op.REGISTER, "version": list(CONTRACT_VERSION), "kind": "raw", "name": "x"}, [])
    gw = Gateway(em, ThreadPoolExecutor(1))

    async def run() -> None:
        gw.watch(lus[0])
        sent.clear()
        sizes[0] = 0
        await gw._resized(lus[0])
    asyncio.run(run())
    detects = [h for _, h in sent if h["op"] == Op.DETECT]
    assert len(detects) == 4 and detects[0]["targets"][0]["luns"][0]["blocks"] == (2 << 20) // 512
    assert sizes[0] == 30   # each LU's size read once, for its description
