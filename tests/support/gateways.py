"""Gateway hosts for tests: network namespaces on a bridge, each running a
whole target (`scsi-target run`) on the same RBD image.

The bridge (in this namespace) carries the test's own private subnet; the
cluster listens on the bridge's address, each gateway namespace gets one
address on it, and initiators in this namespace reach the gateways' portals
through it. Nothing else is addressed. Every process is started here and
stopped by its process group (a gateway's supervisor and its children).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from support.procs import session_members, stop_pid

IQN = "iqn.2026-11.org.scsi-target:gw"
STML_PORT = 7100
ISCSI_PORT = 3260


def _ip(*args: str, check: bool = True) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")


def available() -> str | None:
    """Why namespaces cannot be made here, or None. A probe namespace is made
    and deleted: listing them works where adding one does not (root without
    CAP_SYS_ADMIN, as in an unprivileged container)."""
    probe = f"f23probe{os.getpid() % 100000:05d}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode:
        return f"cannot create network namespaces here (ip netns add: {p.stderr.strip()})"
    _ip("netns", "del", probe, check=False)
    return None


class Net:
    """A bridge with an address of a subnet private to this test process,
    and namespaces hanging off it (names and subnet from our PID, so that
    concurrent test runs do not meet)."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.tag = f"{pid % 100000:05d}"
        self.prefix = f"10.{230 + pid % 20}.{(pid // 20) % 250}"
        self.bridge = f"f23b{self.tag}"
        self.host = f"{self.prefix}.1"
        self.namespaces: list[str] = []
        self.devices: dict[str, str] = {}   # namespace -> its end of the veth pair
        self._throttled: set[str] = set()
        _ip("link", "add", "name", self.bridge, "type", "bridge")
        try:
            _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def namespace(self, name: str, index: int) -> tuple[str, str]:
        """A namespace with one address on the bridge: (its name, the address)."""
        ns = f"f23{name}{self.tag}"
        veth, peer = f"f23v{name}{self.tag}", f"f23p{name}{self.tag}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        addr = f"{self.prefix}.{index}"
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", peer)
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.devices[ns] = peer
        return ns, addr

    def throttle(self, ns: str, rate: str) -> None:
        """Send the namespace's traffic out at `rate` (a token bucket): what
        it sends waits in the queue, as on a congested or failing link."""
        verb = "change" if ns in self._throttled else "add"
        self._throttled.add(ns)
        _ip("netns", "exec", ns, "tc", "qdisc", verb, "dev", self.devices[ns], "root", "tbf", "rate", rate,
            "burst", "64kb" if rate.endswith("gbit") else "1600", "limit", "4mb")

    def close(self) -> None:
        for ns in self.namespaces:   # a namespace takes its end of the veth pair along
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        _ip("link", "del", self.bridge, check=False)


class Gateway:
    """One gateway host: `scsi-target run` in namespace `ns` with address
    `addr`, portal group `tpg`, exporting `image` as LUN 0 of IQN, with the
    other gateways' STMLs as peers."""

    def __init__(self, name: str, ns: str, addr: str, tpg: int, peers: list[str], image: str,
                 conf: Path, keyring: Path) -> None:
        self.name, self.ns, self.addr, self.tpg = name, ns, addr, tpg
        self.dir = Path(tempfile.mkdtemp(prefix=f"gw{name}", dir="/tmp"))
        self.config = self.dir / "gateway.toml"
        peer_list = ", ".join(f'"tcp://{p}:{STML_PORT}"' for p in peers)
        self.config.write_text(f"""data_dir = "{self.dir}"
portals = ["{addr}:{ISCSI_PORT},{tpg}"]

[stml]
listen = ["tcp://{addr}:{STML_PORT}"]
insecure = true
peers = [{peer_list}]

[[target]]
name = "{IQN}"
target_reset = true

[[target.lun]]
backend = "rbd"
path = "{image}"
ceph_conf = "{conf}"
ceph_keyring = "{keyring}"
""")
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.generation = 0

    @property
    def portal(self) -> str:
        return f"{self.addr}:{ISCSI_PORT}"

    def url(self, lun: int = 0) -> str:
        return f"iscsi://{self.portal}/{IQN}/{lun}"

    def start(self) -> Gateway:
        self.generation += 1
        self.lines = []
        log = open(self.dir / f"run{self.generation}.log", "w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "scsi_target", "run",
             "--config", str(self.config), "--cpu-affinity", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line)
                log.write(line)
                log.flush()
            log.close()
        threading.Thread(target=pump, daemon=True).start()
        return self

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30, since: int = 0) -> re.Match:
        """The first match of `pattern` in the output from offset `since` on."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.log(), since)
            if m:
                return m
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway {self.name}: no {pattern!r}:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def ready(self, timeout: float = 40) -> Gateway:
        """Listening, and attached to the STML that serves."""
        self.wait_for(r"fetd_tcp: listening on", timeout)
        self.wait_for(r"fetd_tcp: attached to STML", timeout)
        return self

    def processes(self) -> list[int]:
        """Every process of this gateway: its session (`run` gives each child a
        process group of its own, in the session it leads)."""
        return [] if self.proc is None else session_members(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL everything of this gateway at once: nothing of it says goodbye."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM `run` (it stops its children), SIGKILL what is left; the
        gateway's directory goes."""
        if self.proc is not None:
            stop_pid(self.proc, 15, session=True)
        shutil.rmtree(self.dir, ignore_errors=True)
