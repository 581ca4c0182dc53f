"""A throwaway single-node Ceph for tests: one monitor, one manager and one
memstore OSD in a private directory with its own ceph.conf, on one address
(127.0.0.1, or the address of a bridge the caller made). Every daemon
is started in the foreground and stopped by its PID. See
/work/shared/notes/ceph.md for the settings and timings this follows.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from support.procs import free_port, stop_pid

DAEMONS = ("ceph-mon", "ceph-osd", "ceph-mgr")


def available() -> str | None:
    """Why a cluster cannot be made here, or None."""
    for tool in (*DAEMONS, "ceph", "rbd", "monmaptool", "ceph-authtool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install ceph-mon ceph-osd ceph-mgr ceph-common)"
    return None


class Cluster:
    """Start with start(), stop with stop(); `conf` and `keyring` are what a
    client passes (`rbd:POOL/IMAGE,conf=...,keyring=...`)."""

    POOL = "rbd"

    def __init__(self, host: str = "127.0.0.1", memstore_bytes: int = 3 << 30, watch_timeout: int = 5) -> None:
        self.host = host
        self.port = free_port(host)
        self.dir = Path(tempfile.mkdtemp(prefix="ceph", dir="/tmp"))
        self.conf = self.dir / "ceph.conf"
        self.keyring = self.dir / "keyring"
        self.fsid = str(uuid.uuid4())
        self.procs: dict[str, subprocess.Popen] = {}
        self.memstore_bytes = memstore_bytes
        self.watch_timeout = watch_timeout

    # ------------------------------------------------------------ commands
    def run(self, tool: str, *argv: str, timeout: float = 60) -> str:
        """Run a Ceph tool (ceph, rbd, rados) against this cluster; its stdout."""
        cmd = [tool, "-c", str(self.conf), *argv]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def _spawn(self, name: str, *argv: str) -> None:
        log = open(self.dir / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen([*argv, "-f", "-c", str(self.conf)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        log.close()

    # ------------------------------------------------------------ life cycle
    def write_conf(self) -> None:
        d = self.dir
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = [v2:{self.host}:{self.port}]
public addr = {self.host}
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.keyring}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd crush initial weight = 1
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd data = {d}/$name
mon data = {d}/$name
mgr data = {d}/$name
run dir = {d}/run
pid file = {d}/run/$name.pid
admin socket = {d}/run/$name.asok
log file = {d}/$name.log
crash dir = {d}/crash
# a gateway that dies loses its watches (and so its RBD lock) this fast
osd client watch timeout = {self.watch_timeout}
mon warn on pool no redundancy = false
osd max object name len = 256
osd max object namespace len = 64
mgr initial modules =
""")

    def start(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        d = self.dir
        (d / "run").mkdir()
        self.write_conf()
        osd_uuid = str(uuid.uuid4())
        # every key the cluster needs, made at once (no cluster round trips)
        keys = [("mon.", ["--cap", "mon", "allow *"]),
                ("client.admin", ["--cap", "mon", "allow *", "--cap", "osd", "allow *",
                                  "--cap", "mgr", "allow *"]),
                ("osd.0", ["--cap", "mon", "allow profile osd", "--cap", "osd", "allow *",
                           "--cap", "mgr", "allow profile osd"]),
                ("mgr.x", ["--cap", "mon", "allow profile mgr", "--cap", "osd", "allow *",
                           "--cap", "mds", "allow *"])]
        for i, (name, caps) in enumerate(keys):
            subprocess.run(["ceph-authtool", str(self.keyring), *(["--create-keyring"] if i == 0 else []),
                            "--gen-key", "-n", name, *caps], check=True, capture_output=True)
        subprocess.run(["monmaptool", "--create", "--addv", "a", f"[v2:{self.host}:{self.port}]",
                        "--fsid", self.fsid, str(d / "monmap")], check=True, capture_output=True)
        (d / "mon.a").mkdir()
        subprocess.run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a",
                        "--monmap", str(d / "monmap"), "--keyring", str(self.keyring)],
                       check=True, capture_output=True)
        self._spawn("mon", "ceph-mon", "-i", "a")
        osd_dir = d / "osd.0"
        osd_dir.mkdir()
        shutil.copy(self.keyring, osd_dir / "keyring")
        self.run("ceph", "osd", "new", osd_uuid, "0")
        subprocess.run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs",
                        "--osd-uuid", osd_uuid], check=True, capture_output=True)
        self._spawn("osd", "ceph-osd", "-i", "0")
        (d / "mgr.x").mkdir()
        self._spawn("mgr", "ceph-mgr", "-i", "x")
        self.run("ceph", "osd", "pool", "create", self.POOL, "8", "8")
        self.run("rbd", "pool", "init", self.POOL)
        self.wait_writable()

    def wait_writable(self, timeout: float = 60) -> None:
        """Return once an object can be written to the pool (the OSD is up and its PGs active)."""
        deadline = time.monotonic() + timeout
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited {p.returncode}: "
                                       f"{(self.dir / f'{name}.out').read_text(errors='replace')[-2000:]}")
            try:
                self.run("rados", "-p", self.POOL, "put", "probe", "/dev/null", timeout=10)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop every daemon by PID, the monitor last; the directory goes."""
        for name in ("mgr", "osd", "mon"):
            p = self.procs.get(name)
            if p is not None:
                stop_pid(p)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ images
    def create_image(self, name: str, size: int, pool: str | None = None) -> str:
        self.run("rbd", "create", "--size", f"{size}B", f"{pool or self.POOL}/{name}")
        return f"{pool or self.POOL}/{name}"

    def spec(self, image: str) -> str:
        """The LUN spec of an image of this cluster."""
        return f"rbd:{image},conf={self.conf},keyring={self.keyring}"
