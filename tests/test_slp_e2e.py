"""SLP discovery end to end, in a network namespace the test makes (multicast
on its loopback): an independent client (pyslp's codec) finds the target's
portals and name by multicast and reads its attributes; a portal added live is
in the next reply; a directory agent (pyslp's slpd) gets the registrations and
loses them when the target stops. A target with an ACL is not told (no
slp_auth), as SendTargets tells it only to its initiators."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from support.ci import need_root
from support.cli import mgmt
from support.procs import stop_pid
from support.target import IQN, Target

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("ip"), reason="iproute2 is not installed")]

DA = "127.0.0.2"

# a user agent: one request (pyslp builds it, pyslp parses the answer), by multicast or to a DA
CLIENT = r"""
import json, socket, sys
from pyslp import creator, parse
kind, arg, to = sys.argv[1:4]
msg = creator.create_request(arg) if kind == "srv" else creator.create_attr_request(arg)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
s.settimeout(3)
s.sendto(msg, (to, 427))
data, _ = s.recvfrom(65536)
if kind == "srv":
    _, error, entries = parse.parse_reply(data)
    print(json.dumps({"error": error, "urls": [e["url"] for e in entries]}))
else:
    _, error, attrs = parse.parse_attr_reply(data)
    print(json.dumps({"error": error, "attrs": attrs}))
"""

# a directory agent: pyslp's slpd registry behind a socket of ours (its own asyncio
# helpers use asyncio.coroutine, gone since Python 3.11; the decorated ones are not called)
DIRECTORY_AGENT = r"""
import asyncio, socket, sys, types
asyncio.coroutine = types.coroutine
from pyslp.slpd import SLPDServer, Receiver
host = sys.argv[1]
async def main():
    slpd = SLPDServer()
    slpd.services[host], slpd.url_entries[host], slpd.lifetime[host] = {}, {}, {}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 427))
    await asyncio.get_running_loop().create_datagram_endpoint(lambda: Receiver(slpd, host), sock=sock)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.fixture
def netns():
    need_root("a network namespace (multicast on its loopback, UDP port 427)")
    name = f"st-slp-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot create network namespaces here (ip netns add: {made.stderr.strip()})")
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "set", "lo", "multicast", "on"],
                    ["route", "add", "224.0.0.0/4", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def ask(ns: str, kind: str, arg: str, to: str = "239.255.255.253") -> dict:
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, kind, arg, to],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def until(check, what: str, timeout: float = 15):
    """Poll `check` until it returns something true (a datagram may still be on its way)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.2)


def test_slp_finds_the_target_by_multicast_and_follows_portal_changes(netns, tmp_path):
    da = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", DIRECTORY_AGENT, DA],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = None
    try:
        assert da.stdout.readline().strip() == "ready"
        cfg = tmp_path / "target.toml"
        cfg.write_text(f'portals = ["127.0.0.1:3260"]\nslp = true\nslp_da = ["{DA}"]\n\n'
                       f'[[target]]\nname = "{IQN}"\nalias = "slp disk"\n\n'
                       f'[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n\n'
                       f'[[target]]\nname = "{IQN}-private"\nacl = ["iqn.2026-11.org.test:only"]\n\n'
                       f'[[target.lun]]\nbackend = "ram"\nsize = "8MiB"\n')
        t = Target(config=str(cfg), portals=(), expect_portals=1, wrap=("ip", "netns", "exec", netns))
        t.wait_log("fetd_tcp: SLP service agent on UDP 427 (scopes DEFAULT) at 127.0.0.1")  # not 0.0.0.0
        url = f"service:iscsi:target://127.0.0.1:3260/{IQN}"
        found = ask(netns, "srv", "service:iscsi:target")
        assert found == {"error": 0, "urls": [url]}    # not the target with an ACL (no slp_auth)
        attrs = ask(netns, "attr", url)
        assert attrs["error"] == 0
        for pair in (f"(iscsi-name={IQN})", "(portal-group=1)", "(transports=tcp)", "(alias=slp disk)",
                     "(auth-name=any)", "(auth-cred=any)"):
            assert pair in attrs["attrs"]
        until(lambda: ask(netns, "srv", "service:iscsi:target", DA)["urls"] == [url], "registered with the DA")

        mgmt(t.data_dir, "portal", "add", "127.0.0.1:3262,2")
        t.wait_log("fetd_tcp: listening on 127.0.0.1:3262 (tpgt 2)")
        second = f"service:iscsi:target://127.0.0.1:3262/{IQN}"
        assert ask(netns, "srv", "service:iscsi:target")["urls"] == [url, second]
        assert "(portal-group=2)" in ask(netns, "attr", second)["attrs"]
        until(lambda: sorted(ask(netns, "srv", "service:iscsi:target", DA)["urls"]) == [url, second],
              "the new portal registered with the DA")

        t.stop()
        t = None
        until(lambda: ask(netns, "srv", "service:iscsi:target", DA)["urls"] == [], "deregistered at shutdown")
    finally:
        if t is not None:
            t.stop()
        stop_pid(da)
