"""iSNS (RFC 4171) with open-isns's server started on loopback by the test:
`isnsadm --query` shows the target and its portal while fetd_tcp runs, a target
added live shows up, and after shutdown nothing is left."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.procs import free_port, stop_pid
from support.target import Target

IQN = "iqn.2026-11.org.scsi-target:isns"


@pytest.fixture
def isnsd(tmp_path, request):
    if not (shutil.which("isnsd") and shutil.which("isnsadm")):
        pytest.skip("open-isns-server / open-isns-utils are not installed")
    port = free_port()
    d = tmp_path / "isns"
    d.mkdir()
    (d / "isnsd.conf").write_text(
        f"SourceName = isns.server.test\nBindAddress = 127.0.0.1:{port}\nPIDFile = {d}/isnsd.pid\n"
        f"ControlSocket = {d}/control\nSecurity = 0\nAuthKeyFile = {d}/auth_key\n"
        + (getattr(request, "param", None) or "RegistrationPeriod = 0\n")
        + "DefaultDiscoveryDomain = 1\n")
    (d / "client.conf").write_text(f"SourceName = iqn.2026-11.org.test:isns-query\n"
                                   f"ServerAddress = 127.0.0.1:{port}\nSecurity = 0\n")
    # in the foreground (-f), so the PID we hold is the server's own: a daemonised
    # isnsd forks after writing its pid file and would outlive the test
    proc = subprocess.Popen(["isnsd", "-c", str(d / "isnsd.conf"), "-4", "-f"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (d / "isnsd.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port, d / "client.conf"
    stop_pid(proc)


def query(client_conf: Path, *args: str) -> str:
    p = subprocess.run(["isnsadm", "-c", str(client_conf), *args], capture_output=True, text=True,
                       timeout=30)
    return p.stdout + p.stderr


def wait_for(client_conf: Path, args: tuple[str, ...], needle: str, present: bool = True) -> str:
    deadline = time.monotonic() + 15
    while True:
        out = query(client_conf, *args)
        if (needle in out) == present or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def test_isns_registration_and_deregistration(isnsd, tmp_path):
    port, client = isnsd
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'isns = "127.0.0.1:{port}"\n[[target]]\nname = "{IQN}"\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n')
    t = Target(config=str(cfg))
    try:
        out = wait_for(client, ("--query", f"iscsi-name={IQN}"), IQN)
        assert IQN in out and "Target" in out, out
        host, tport = t.portal.rsplit(":", 1)
        portals = wait_for(client, ("--list", "portals"), f"{tport}/tcp")
        assert f"Portal IP address = {host}" in portals and f"{tport}/tcp" in portals, portals

        other = "iqn.2026-11.org.scsi-target:isns-two"
        subprocess.run([sys.executable, "-m", "scsi_target", "target", "add", other,
                        "--data-dir", t.data_dir], check=True, capture_output=True, timeout=60)
        out = wait_for(client, ("--query", "iscsi-node-type=Target"), other)
        assert other in out and IQN in out, out
    finally:
        t.stop()
    out = wait_for(client, ("--query", "iscsi-node-type=Target"), IQN, present=False)
    assert IQN not in out, out
    assert f"{t.portal.rsplit(':', 1)[1]}/tcp" not in query(client, "--list", "portals")


def _fetd_tcp_pid(supervisor: int) -> int:
    for p in Path("/proc").iterdir():
        try:
            if (p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == supervisor
                    and b"fetd_tcp" in (p / "cmdline").read_bytes()):
                return int(p.name)
        except OSError:
            continue
    raise AssertionError("no fetd_tcp child")


def _listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process `pid` listens on (its socket inodes found in
    /proc/net/tcp and tcp6, state LISTEN)."""
    import ipaddress
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)   # host-order 32-bit words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))
            out.add((str(ipaddress.ip_address(raw)), int(hexport, 16)))
    return out


@pytest.mark.parametrize("isnsd", ["RegistrationPeriod = 3600\nESIMinInterval = 1\n"],
                         indirect=True)
def test_esi_listens_only_where_portals_are_registered(isnsd, tmp_path):
    """The ESI port listened on `::` (every address, both families) even with
    loopback portals only: a port nobody asked for on every network. It
    listens on the registered portals' addresses only (decision 0210): here
    127.0.0.1, the address the 0.0.0.0 portal is registered by too."""
    port, client = isnsd
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'isns = "127.0.0.1:{port}"\n[[target]]\nname = "{IQN}"\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n')
    wild = free_port()
    with Target(config=str(cfg), portals=("127.0.0.1:0", f"0.0.0.0:{wild}")) as t:
        wait_for(client, ("--list", "portals"), "ESI port")
        fetd = _fetd_tcp_pid(t.proc.pid)
        portal = int(t.portals[0].rsplit(":", 1)[1])
        listening = _listening(fetd)
        esi = {a for a in listening if a[1] not in (portal, wild)}
        assert esi and {host for host, _ in esi} == {"127.0.0.1"}, listening
        portals = query(client, "--list", "portals")
        assert f"ESI port = {esi.pop()[1]}/tcp" in portals, portals


ESI_SERVER = "RegistrationPeriod = 3600\nESIMinInterval = 1\nESIMaxInterval = 60\nESIRetries = 2\n"


@pytest.mark.parametrize("isnsd", [ESI_SERVER], indirect=True)
def test_isns_esi(isnsd, tmp_path):
    """The server sends ESI every 5 s (the interval fetd_tcp asks for; this server's
    minimum is 1 s): fetd_tcp answers, so it stays listed (an unanswered ESI drops
    the entity after two retries); a front end that stops answering (SIGSTOP)
    is dropped by the server long before its registration would expire."""
    port, client = isnsd
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'isns = "127.0.0.1:{port}"\n[[target]]\nname = "{IQN}"\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n')
    t = Target(config=str(cfg))
    fetd = _fetd_tcp_pid(t.proc.pid)
    try:
        assert IQN in wait_for(client, ("--query", f"iscsi-name={IQN}"), IQN)
        time.sleep(12)                   # two ESI rounds or more, all answered
        assert IQN in query(client, "--query", f"iscsi-name={IQN}")
        os.kill(fetd, signal.SIGSTOP)    # alive but silent: ESI goes unanswered
        try:
            out = wait_for(client, ("--query", f"iscsi-name={IQN}"), IQN, present=False)   # <= 15 s
            assert IQN not in out, out
        finally:
            os.kill(fetd, signal.SIGCONT)
    finally:
        t.stop()


def test_isns_tells_only_what_sendtargets_tells_anyone(isnsd, tmp_path):
    """Any iSNS client may query the default discovery domain: a target with an
    ACL is not registered (SendTargets hides it from initiators its ACL does
    not admit), nor any behind discovery CHAP, unless `isns_auth = true`. A
    portal bound to 0.0.0.0 is registered with the address that reaches the
    server, never as 0.0.0.0 (which would send initiators to themselves)."""
    port, client = isnsd
    closed = "iqn.2026-11.org.scsi-target:isns-closed"
    wild = free_port()
    cfg = tmp_path / "t.toml"
    body = (f'[[target]]\nname = "{IQN}"\n[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n'
            f'[[target]]\nname = "{closed}"\nacl = ["iqn.2026-11.org.test:only"]\n'
            f'[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n')
    cfg.write_text(f'isns = "127.0.0.1:{port}"\n{body}')
    with Target(config=str(cfg), portals=("127.0.0.1:0", f"0.0.0.0:{wild}")) as t:
        out = wait_for(client, ("--query", "iscsi-node-type=Target"), IQN)
        assert IQN in out and closed not in out, out
        portals = wait_for(client, ("--list", "portals"), f"{wild}/tcp")
        assert "Portal IP address = 0.0.0.0" not in portals, portals
        assert f"Portal IP address = 127.0.0.1\n  0011  uint32      : Portal TCP/UDP port = {wild}/tcp" \
            in portals, portals
        assert "1 target(s) not registered" in t.wait_log("not registered")
        cfg.write_text(f'isns = "127.0.0.1:{port}"\n'
                       f'discovery_chap = {{user = "d", secret = "discovery-secret"}}\n{body}')
        subprocess.run([sys.executable, "-m", "scsi_target", "config", "reload", "--data-dir", t.data_dir],
                       check=True, capture_output=True, timeout=60)
        out = wait_for(client, ("--query", "iscsi-node-type=Target"), IQN, present=False)
        assert IQN not in out and closed not in out, out
    cfg.write_text(f'isns = "127.0.0.1:{port}"\nisns_auth = true\n{body}')
    with Target(config=str(cfg)):
        out = wait_for(client, ("--query", "iscsi-node-type=Target"), closed)
        assert IQN in out and closed in out, out


def test_esi_listeners_follow_the_registered_addresses():
    """ESI listeners are opened for the registered portal addresses and closed
    when an address is no longer registered; an address this host cannot
    listen on (192.0.2.1, TEST-NET-1) gets no ESI port, and its portal is
    registered without ESI attributes (the server relies on re-registration)."""
    import asyncio
    import struct as st

    from fetd_tcp import isns

    def esi_ports(body: bytes) -> list[int]:
        out, at = [], 12
        while at + 8 <= len(body):
            tag, length = st.unpack(">II", body[at:at + 8])
            if tag == isns.ESI_PORT:
                out.append(st.unpack(">I", body[at + 8:at + 12])[0])
            at += 8 + length
        return out

    async def main() -> None:
        client = isns.IsnsClient("127.0.0.1:9", "iqn.2026-11.org.test:entity")
        ports = await client.esi_follow({"127.0.0.1", "192.0.2.1"})
        assert set(ports) == {"127.0.0.1"}
        old = ports["127.0.0.1"]
        _, w = await asyncio.open_connection("127.0.0.1", old)      # listening
        w.close()
        portals = [isns.Portal("127.0.0.1", 3260, 1), isns.Portal("192.0.2.1", 3260, 1)]
        body = isns.encode_register("e", [("iqn.t", "")], portals, 1, 60, ports, 5)
        assert esi_ports(body) == [old]
        held = client.esi_listeners["127.0.0.1"]
        assert held is not None
        try:
            assert await client.esi_follow({"192.0.2.1"}) == {}
            assert not held[0].is_serving() and "127.0.0.1" not in client.esi_listeners   # closed
        finally:
            await client.esi_follow(set())

    asyncio.run(main())
