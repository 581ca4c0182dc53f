"""A front end on another host: the STML in one network namespace, fetd_tcp in
another, joined by a veth pair and ZeroMQ CURVE; an initiator (qemu-io,
libiscsi) in the front end's namespace. Plain TCP off loopback is refused."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scsi_target.keys import write_key_pair
from support.ci import need_root
from support.procs import Proc

IQN = "iqn.2026-11.org.scsi-target:remote"
HB_MS = 500


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


class Netns:
    """Two namespaces made for this test, a veth pair, a private /30 inside them."""

    def __init__(self) -> None:
        n = os.getpid() % 250
        self.stml_ns, self.fe_ns = f"st-stml-{os.getpid()}", f"st-fe-{os.getpid()}"
        self.stml_ip, self.fe_ip = f"10.250.{n}.1", f"10.250.{n}.2"
        self.made: list[str] = []

    def create(self) -> None:
        for ns in (self.stml_ns, self.fe_ns):
            r = _ip("netns", "add", ns)
            if r.returncode:
                self.destroy()
                pytest.skip(f"cannot create network namespaces here (ip netns add: {r.stderr.strip()})")
            self.made.append(ns)
        veth_a, veth_b = f"vst{os.getpid() % 100000}a", f"vst{os.getpid() % 100000}b"
        steps = [
            ["link", "add", veth_a, "netns", self.stml_ns, "type", "veth", "peer", "name", veth_b,
             "netns", self.fe_ns],
            ["-n", self.stml_ns, "addr", "add", f"{self.stml_ip}/30", "dev", veth_a],
            ["-n", self.fe_ns, "addr", "add", f"{self.fe_ip}/30", "dev", veth_b],
            ["-n", self.stml_ns, "link", "set", veth_a, "up"],
            ["-n", self.fe_ns, "link", "set", veth_b, "up"],
            ["-n", self.stml_ns, "link", "set", "lo", "up"],
            ["-n", self.fe_ns, "link", "set", "lo", "up"],
        ]
        for step in steps:
            r = _ip(*step)
            if r.returncode:
                self.destroy()
                pytest.skip(f"cannot set up the veth pair here (ip {' '.join(step)}: {r.stderr.strip()})")

    def destroy(self) -> None:
        for ns in self.made:
            _ip("netns", "del", ns)   # the veth ends go with their namespace
        self.made = []

    def exec(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


@pytest.fixture
def netns():
    need_root("network namespaces")
    if not shutil.which("ip"):
        pytest.skip("iproute2 is not installed")
    ns = Netns()
    ns.create()
    yield ns
    ns.destroy()


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    for name in ("stml", "fe", "stranger"):
        write_key_pair(d, name)
    return d


def _stml_config(tmp_path: Path, data: Path, listen: str, keys: Path | None) -> Path:
    lines = [f'data_dir = "{data}"', "[stml]", f'listen = ["{listen}"]', f"heartbeat_ms = {HB_MS}"]
    if keys is not None:
        lines += [f'curve_secret_key_file = "{keys / "stml.key_secret"}"',
                  f'allowed_front_ends = ["{keys / "fe.key"}"]']
    lines += ["[[target]]", f'name = "{IQN}"', "[[target.lun]]", 'backend = "file"',
              'path = "remote.img"', 'size = "64MiB"']
    cfg = tmp_path / "stml.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


@pytest.mark.parametrize("where", ["0.0.0.0", "127.0.0.1"])
def test_plain_tcp_refused_unless_insecure(tmp_path, tmp_short, where):
    """Loopback too (decision 0246): any local user can reach a loopback port."""
    cfg = _stml_config(tmp_path, tmp_short(), f"tcp://{where}:0", None)
    p = subprocess.run([sys.executable, "-m", "stml", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2
    reason = "a non-loopback address" if where == "0.0.0.0" else "any local user can reach"
    assert f"is plain TCP ({reason})" in p.stderr and "--insecure" in p.stderr
    assert "stml.listen: tcp://" in p.stderr      # the key the file used, not stml_endpoint
    proc = Proc([sys.executable, "-m", "stml", "--config", str(cfg), "--insecure"], tmp_path / "insecure.log")
    try:
        proc.wait_line(r"stml: listening on tcp://")
        assert "WITHOUT encryption" in proc.log()
        assert ("any local user may manage" in proc.log()) == (where == "127.0.0.1")
    finally:
        proc.stop()


def test_management_over_insecure_tcp_only_from_this_host(netns, tmp_path, tmp_short):
    """--insecure plain TCP (decision 0244): another host's front end still
    registers, but its management is refused in one line; on the STML's
    host, loopback TCP still manages."""
    port = 5556
    cfg = _stml_config(tmp_path, tmp_short(), f"tcp://0.0.0.0:{port}", None)
    stml = Proc(netns.exec(netns.stml_ns) + [sys.executable, "-m", "stml", "--config", str(cfg), "--insecure"],
                tmp_path / "stml.log")
    try:
        stml.wait_line(r"stml: listening on tcp://")
        remote = f"tcp://{netns.stml_ip}:{port}"
        p = subprocess.run(netns.exec(netns.fe_ns) + [sys.executable, "-m", "scsi_target", "acl", "add",
                                                      "iqn.2026-11.org.example:intruder", "--stml", remote],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2
        assert p.stderr == (f"scsi-target: acl add refused: management refused: plain TCP from {netns.fe_ip}, "
                            "not this host (manage over ipc:// or loopback, or over CURVE with a key in "
                            "[stml] allowed_managers)\n")
        register = ("import sys; sys.path.insert(0, %r); from support.rawfe import RawFrontEnd; "
                    "fe = RawFrontEnd(%r); print(fe.register().get('error')); fe.close()"
                    % (str(Path(__file__).parent), remote))
        p = subprocess.run(netns.exec(netns.fe_ns) + [sys.executable, "-c", register],
                           capture_output=True, text=True, timeout=60)
        assert p.stdout == "None\n", p.stderr
        p = subprocess.run(netns.exec(netns.stml_ns) + [sys.executable, "-m", "scsi_target", "target", "list",
                                                        "--stml", f"tcp://127.0.0.1:{port}", "--json"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert [t["name"] for t in json.loads(p.stdout)] == [IQN]
        assert [t["acl"] for t in json.loads(p.stdout)] == [[]]
        assert stml.log().count("refused mgmt from") == 1
    finally:
        stml.stop()


def test_remote_front_end_over_curve(netns, keys, tmp_path, tmp_short):
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io (qemu-utils) is not installed")
    port = 5555
    cfg = _stml_config(tmp_path, tmp_short(), f"tcp://{netns.stml_ip}:{port}", keys)
    stml = Proc(netns.exec(netns.stml_ns) + [sys.executable, "-m", "stml", "--config", str(cfg)],
                tmp_path / "stml.log")
    procs = [stml]

    def fetd(key: str, log: str, portal_port: int = 3260) -> Proc:
        p = Proc(netns.exec(netns.fe_ns) + [
            sys.executable, "-m", "fetd_tcp", "--stml", f"tcp://{netns.stml_ip}:{port}",
            "--stml-key", str(keys / "stml.key"), "--key", str(keys / key),
            "--portal", f"{netns.fe_ip}:{portal_port}"], tmp_path / log)
        procs.append(p)
        return p

    url = f"iscsi://{netns.fe_ip}:3260/{IQN}/0"

    def qemu_io(*cmds: str, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = netns.exec(netns.fe_ns) + ["qemu-io", "-f", "raw"]
        for c in cmds:
            argv += ["-c", c]
        return subprocess.run(argv + [url], capture_output=True, text=True, timeout=timeout)

    try:
        stml.wait_line(rf"stml: listening on tcp://{re.escape(netns.stml_ip)}")
        fe = fetd("fe.key_secret", "fe1.log")
        fe.wait_line(r"fetd_tcp: attached to STML")
        fe.wait_line(r"fetd_tcp: listening on")

        # an initiator in the front end's namespace writes and reads through it
        r = qemu_io("write -P 0xa5 0 4M", "read -P 0xa5 0 4M")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr

        # a front end whose key the STML does not list is refused, and both sides say so
        stranger = fetd("stranger.key_secret", "stranger.log", 3261)
        stranger.wait_line(r"refused our key")
        assert "refused a peer with unknown CURVE key" in stml.log()
        assert len(re.findall(r"front end \S+ \(iscsi\) registered", stml.log())) == 1
        stranger.stop()

        # kill -9 of the front end during I/O: the STML releases it when its
        # connection ends (decision 0243); a restarted front end serves the LUN
        # again and the acknowledged data is intact
        # the same 56 MiB twenty times over: still writing when the kill comes
        passes = ["-c", "write -P 0x3c 8M 56M"] * 20
        io = subprocess.Popen(netns.exec(netns.fe_ns) + ["qemu-io", "-f", "raw", *passes, url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.3)
        assert io.poll() is None, "the I/O ended before the kill: make it longer"
        fe.kill()
        stml.wait_line(r"releasing front end \S+: its connection closed", timeout=10)
        fe2 = fetd("fe.key_secret", "fe2.log")
        fe2.wait_line(r"fetd_tcp: attached to STML")
        fe2.wait_line(r"fetd_tcp: listening on")
        # the initiator that was writing reconnects (libiscsi) and finishes its writes
        out = io.communicate(timeout=90)[0].decode(errors="replace")
        assert io.returncode == 0 and "wrote" in out, out
        r = qemu_io("read -P 0x3c 8M 56M")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
        r = qemu_io("read -P 0xa5 0 4M")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
        r = subprocess.run(netns.exec(netns.fe_ns) + ["iscsi-inq", url], capture_output=True, text=True,
                           timeout=30)
        assert "DIRECT_ACCESS" in r.stdout, r.stdout + r.stderr
    finally:
        for p in reversed(procs):
            p.stop()
