"""The scsi-target command line, as a user runs it: real processes only."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fetd_loopback import LoopbackClient

from support.procs import children_by_module, children_of, pid_alive, stop_pid, wait_for_line
from support.target import LISTENING, Target

READY = re.compile(r"^Ready\. ", re.M)

_SCRIPT = Path(sys.executable).parent / "scsi-target"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "scsi_target"]


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class Run:
    def __init__(self, proc: subprocess.Popen, out: Path, data_dir: Path, endpoint: str) -> None:
        self.proc, self.out, self.data_dir, self.endpoint = proc, out, data_dir, endpoint


def start_run(d: Path):
    """`scsi-target run --no-iscsi --data-dir D --lun ram:64MiB`, stopped by PID afterwards."""
    out = d / "run.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([*CLI, "run", "--no-iscsi", "--data-dir", str(d), "--lun", "ram:64MiB"],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        m = wait_for_line(out, LISTENING, proc)
        wait_for_line(out, READY, proc)
        kids = children_of(proc.pid)
        yield Run(proc, out, d, m.group(1))
    finally:
        kids = kids or children_of(proc.pid)
        stop_pid(proc)
        for pid in kids:  # never leave the STML child behind, even if `run` misbehaved
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def run(tmp_short):
    """A `run` of this test's own."""
    yield from start_run(tmp_short())


@pytest.fixture(scope="module")
def shared_run(tmp_short_module):
    """One `run` for the tests that only talk to it (each uses its own LBAs)."""
    yield from start_run(tmp_short_module())


def test_run_prints_its_plan(shared_run):
    text = shared_run.out.read_text()
    assert "LUN 0: 64 MiB RAM" in text
    assert f"STML endpoint: ipc://{shared_run.data_dir / 'stml.sock'}" in text
    assert "Ctrl-C" in text
    assert shared_run.endpoint == f"ipc://{shared_run.data_dir / 'stml.sock'}"
    assert "iSCSI portals" not in text


def test_copy_in_copy_out_round_trip(shared_run, tmp_short):
    d = tmp_short()
    src, dst = d / "random.bin", d / "out.bin"
    data = os.urandom((3 << 20) + 1000)   # not a whole number of blocks or chunks
    src.write_bytes(data)
    r = cli("loop", "--data-dir", str(shared_run.data_dir), "copy-in", str(src))
    assert r.returncode == 0, r.stderr
    assert f"copied {len(data)} bytes (3.0 MiB) into LUN 0 in " in r.stdout
    r = cli("loop", "--data-dir", str(shared_run.data_dir), "copy-out", str(dst), "--size", str(len(data)))
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == data
    assert dst.stat().st_mode & 0o777 == 0o600     # a LUN's data, readable by its owner only
    # the padding of the last block was written as zeros
    with LoopbackClient(shared_run.endpoint, timeout=10) as c:
        tail = c.read(0, len(data) // 512, 1)
    assert tail == data[len(data) // 512 * 512:] + bytes(512 - len(data) % 512)


def test_loop_inquiry(shared_run):
    r = cli("loop", "--data-dir", str(shared_run.data_dir), "inquiry")
    assert r.returncode == 0, r.stderr
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", r.stdout, re.M))
    assert fields["vendor"] == "SCSITGT"
    assert fields["product"] == "PY-STML DISK"
    assert fields["revision"] == "0001"
    assert fields["type"] == "0x00"
    assert re.fullmatch(r"[0-9a-f]{16}", fields["serial"])
    assert re.fullmatch(r"0x6[0-9a-f]{31}", fields["naa"])


def test_loop_capacity(shared_run):
    r = cli("loop", "--stml", shared_run.endpoint, "capacity")
    assert r.returncode == 0, r.stderr
    assert "blocks: 131072" in r.stdout.splitlines()
    assert "block size: 512" in r.stdout.splitlines()
    assert "bytes: 67108864 (64.0 MiB)" in r.stdout


def test_loop_write_then_read(shared_run, tmp_short):
    d = tmp_short()
    src, back = d / "in.bin", d / "back.bin"
    data = os.urandom(1000)
    src.write_bytes(data)
    r = cli("loop", "--data-dir", str(shared_run.data_dir), "write", "100000", str(src))
    assert r.returncode == 0, r.stderr
    assert "wrote 2 blocks at LBA 100000" in r.stdout
    r = cli("loop", "--data-dir", str(shared_run.data_dir), "read", "100000", "2", "--out", str(back))
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == data + bytes(24)
    r = cli("loop", "--data-dir", str(shared_run.data_dir), "read", "100000", "1")
    assert r.stdout.splitlines()[0] == "00000000  " + data[:16].hex(" ")


def test_loop_read_out_of_range_fails(shared_run):
    r = cli("loop", "--data-dir", str(shared_run.data_dir), "read", "131071", "2")
    assert r.returncode == 1
    assert "0x21/0x00" in r.stderr
    # decoded as sg3_utils prints it, after the verb's own options too
    r = cli("loop", "read", "131071", "2", "--data-dir", str(shared_run.data_dir))
    assert r.returncode == 1
    assert r.stderr.strip() == ("scsi-target loop: status 0x02, Illegal Request: Logical block address "
                                "out of range (sense key 0x5, asc/ascq 0x21/0x00)")


def test_loop_without_stml(tmp_short):
    d = tmp_short()
    r = cli("loop", "--data-dir", str(d), "--timeout", "1", "capacity")
    assert r.returncode == 1
    assert r.stderr == f"scsi-target loop: no target is running in {d} (started with: scsi-target run --data-dir {d})\n"


def test_sigterm_stops_run_and_its_stml(run):
    kids = children_of(run.proc.pid)
    assert len(kids) == 1
    stml_pid = kids[0]
    assert "-m stml" in " ".join(Path(f"/proc/{stml_pid}/cmdline").read_text().split("\0"))
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.proc.wait(15) == 0
    deadline = time.monotonic() + 10
    while pid_alive(stml_pid):
        assert time.monotonic() < deadline, "the STML child outlived `scsi-target run`"
        time.sleep(0.05)
    # and nothing answers on its endpoint any more
    with pytest.raises((TimeoutError, ConnectionError)):
        LoopbackClient(run.endpoint, timeout=1).open()


@pytest.mark.parametrize("command,spec,field", [
    (["run", "--no-iscsi"], "ram:12XB", "size"),
    (["run", "--no-iscsi"], "floppy:1", "floppy"),
    (["stml"], "ram:1MiB,bs=1024", "block_size"),
    (["stml"], "floppy:1", "floppy"),
])
def test_bad_lun_spec_exits_2_with_one_line(tmp_short, command, spec, field):
    d = tmp_short()
    r = cli(*command, "--data-dir", str(d), "--lun", spec, timeout=20)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("scsi-target: config error: --lun")
    assert field in lines[0]
    assert not (d / "stml.sock").exists()


def test_stml_module_bad_lun(tmp_short):
    d = tmp_short()
    r = subprocess.run([sys.executable, "-m", "stml", "--data-dir", str(d), "--lun", "ram:12XB"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "size" in r.stderr


def test_second_stml_on_same_endpoint_is_refused(shared_run):
    r = cli("stml", "--data-dir", str(shared_run.data_dir), "--lun", "ram:64MiB", timeout=20)
    assert r.returncode == 2
    assert "another STML" in r.stderr
    # the first one still serves
    with LoopbackClient(shared_run.endpoint, timeout=10) as c:
        assert c.capacity(0) == (131072, 512)


def test_run_with_no_arguments_creates_its_data_dir(tmp_path):
    """The README's first command on a fresh machine: no flags at all, no data
    directory yet. Only HOME is redirected (and the portal, to stay off 3260)."""
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    env.pop("XDG_DATA_HOME", None)
    proc = subprocess.Popen([sys.executable, "-m", "scsi_target", "run", "--portal", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        attached = False
        for line in proc.stdout:
            if "fetd_tcp: attached" in line:
                attached = True
                break
        assert attached
        disk = tmp_path / "home" / ".local" / "share" / "scsi-target" / "disk0.img"
        assert disk.stat().st_size == 1 << 30
        assert disk.stat().st_blocks == 0  # sparse
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


# ------------------------------------------------------------------ CPU affinity

@pytest.mark.parametrize("allowed, expected", [
    ({0}, {}),                                          # fewer CPUs than children: no pinning
    ({0, 1}, {"stml": {0}, "fetd_tcp": {1}}),
    ({2, 5, 7}, {"stml": {2}, "fetd_tcp": {5, 7}}),     # the last child takes the remainder
    (set(range(8)), {"stml": {0, 1, 2, 3}, "fetd_tcp": {4, 5, 6, 7}}),
])
def test_cpu_split_gives_disjoint_shares(allowed, expected):
    from scsi_target.cli import cpu_split
    assert cpu_split(["stml", "fetd_tcp"], allowed) == expected


def test_cpu_split_leaves_a_lone_child_alone():
    from scsi_target.cli import cpu_split
    assert cpu_split(["stml"], set(range(4))) == {}


@pytest.mark.parametrize("names, allowed, expected", [
    (["stml"], {0, 1}, {"stml": {1}, "v": {1}}),                 # the first CPU left to the VMs
    (["stml", "fetd_tcp"], {0, 1}, {"stml": {0}, "fetd_tcp": {1}}),   # three shares do not go round
    (["stml", "fetd_tcp"], set(range(6)), {"stml": {2, 3}, "fetd_tcp": {4, 5}, "v": {2, 3}}),
    (["stml"], {3}, {}),
])
def test_placement_puts_vhost_front_ends_on_the_stmls_share(names, allowed, expected):
    from scsi_target.cli import cpu_split, placement
    assert placement(names, ["v"], allowed) == expected
    assert placement(names, [], allowed) == cpu_split(names, allowed)    # no vhost: as before


@pytest.mark.parametrize("cpus, text", [({0}, "0"), ({0, 1, 2, 3}, "0-3"), ({0, 1, 3, 8, 9}, "0-1,3,8-9")])
def test_cpu_list_is_written_as_linux_does(cpus, text):
    from scsi_target.cli import cpu_list
    assert cpu_list(cpus) == text


def _allowed(pid: int) -> list[str]:
    """Cpus_allowed_list of every thread of `pid`."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        out.append(re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M).group(1))
    return out


def _cpus(text: str) -> set[int]:
    """A Cpus_allowed_list ("0-3,8") as a set."""
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


@pytest.mark.parametrize("mode", ["split", "none"])
def test_run_places_the_stml_and_the_front_end_on_their_own_cpus(mode):
    """The default splits the CPUs `run` may use between the STML and fetd_tcp
    (every thread of each, set before it started) and says so; `none` leaves
    both on all of them."""
    from scsi_target.cli import cpu_list
    from support.target import Target
    allowed = cpu_list(os.sched_getaffinity(0))
    with Target("--lun", "ram:16MiB", "--cpu-affinity", mode) as t:
        kids = children_by_module(t.proc.pid)
        stml, fetd = _allowed(kids["stml"]), _allowed(kids["fetd_tcp"])
        assert len(stml) > 1   # its ZeroMQ threads, which must inherit the set
        stml_argv = Path(f"/proc/{kids['stml']}/cmdline").read_bytes().split(b"\0")
        if mode == "split" and len(os.sched_getaffinity(0)) >= 2:
            assert len(set(stml)) == 1 and len(set(fetd)) == 1
            assert (f"CPUs: stml {stml[0]}, fetd_tcp {fetd[0]}; the STML polls 200 us before sleeping\n"
                    in t.wait_log("Ready. "))
            s, f = _cpus(stml[0]), _cpus(fetd[0])
            assert s and f and not s & f and s | f == os.sched_getaffinity(0)
            assert stml_argv[stml_argv.index(b"--poll-us") + 1] == b"200"   # on CPUs of its own
        else:
            assert set(stml) == set(fetd) == {allowed}
            assert "CPUs:" not in t.wait_log("Ready. ")
            assert b"--poll-us" not in stml_argv   # sharing CPUs with the front end: it sleeps at once


def test_run_passes_an_explicit_poll_window_on():
    from support.target import Target
    with Target("--lun", "ram:16MiB", "--poll-us", "0") as t:
        argv = Path(f"/proc/{children_by_module(t.proc.pid)['stml']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--poll-us") + 1] == b"0"
        assert "polls" not in t.log()


def test_busy_poll_keeps_the_loop_turning_for_its_window_then_lets_it_sleep():
    """After touch() the loop runs its zero-timeout turns (counted by a
    callback that re-queues itself only while the poller spins) until the
    window has passed since the last touch, and not after. The poller reads the
    test's clock, moved by hand between counted turns: nothing here is timed."""
    import asyncio
    from stml.server import BusyPoll

    async def main() -> None:
        now = 0.0
        poll = BusyPoll(0.02, clock=lambda: now)
        turns = 0

        def count() -> None:
            nonlocal turns
            turns += 1
            if poll.spinning:
                asyncio.get_running_loop().call_soon(count)

        async def turn(n: int) -> None:
            for _ in range(n):
                await asyncio.sleep(0)

        poll.touch()                      # polls until 0.02
        asyncio.get_running_loop().call_soon(count)
        await turn(200)
        assert poll.spinning and turns >= 100   # it kept the loop busy, not asleep
        now = 0.01
        poll.touch()                      # more traffic: the window starts again, until 0.03
        now = 0.025
        await turn(5)
        assert poll.spinning              # past the first window, inside the second
        now = 0.03
        await turn(5)
        assert not poll.spinning          # the window has passed: it lets the loop sleep
        done = turns
        await turn(50)
        assert turns <= done + 1

    asyncio.run(main())


def test_a_cpu_set_that_cannot_be_applied_still_starts_the_child(tmp_path):
    """A share naming a CPU that is not there (taken away between the split
    and the start): the child runs unpinned instead of the supervisor failing."""
    from scsi_target.cli import Supervisor
    sup = Supervisor({"child": [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]},
                     {"child": {100000}})
    sup.start("child")
    assert sup.procs["child"].wait(20) == 0


def test_a_config_served_from_another_data_dir_finds_its_target(tmp_path, tmp_short):
    """`run --config F --data-dir D` with an F that names no data dir: `status
    --config F` looked in the default data dir ("no target is running") and
    `config show --file --data-dir D` printed D's own file (absent), not F.
    `run` now records D in F, and `config show --file` reads the file the
    running target serves (decision 0215)."""
    cfg = tmp_path / "f.toml"
    cfg.write_text('# mine\n[[target]]\nname = "iqn.2026-11.org.test:six"\n'
                   '[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    d = str(tmp_short())
    with Target(config=str(cfg), data_dir=d):
        assert f'data_dir = "{d}"' in cfg.read_text() and "# mine" in cfg.read_text()
        assert json.loads(cli("status", "--config", str(cfg), "--json").stdout)["data_dir"] == d
        shown = cli("config", "show", "--file", "--data-dir", d).stdout
        assert "iqn.2026-11.org.test:six" in shown and "# mine" in shown
        added = cli("lun", "add", "--config", str(cfg), "ram:4MiB").stdout
        assert f"saved to {cfg}" in added


def test_wait_ready_says_in_one_line_that_it_cannot_read_another_users_run_lock(tmp_path, monkeypatch):
    """run.lock is 0600: another user's `run` leaves it unreadable. That was
    "no `run` to ask", so wait-ready went by the STML's word alone (or timed
    out as "not ready"); it is now one line and exit 2, apart from not ready
    (1), before any STML is asked (0707). A live PID of another user still
    counts as running (0237)."""
    from click.testing import CliRunner

    from scsi_target import cli
    lock = tmp_path / cli.RUN_LOCK
    lock.write_text(f"{os.getpid()} ready\n")
    assert cli.run_serves(tmp_path) is True
    lock.write_text(f"{os.getpid()}\n")
    assert cli.run_serves(tmp_path) is False
    lock.unlink()
    assert cli.run_serves(tmp_path) is None   # no `run` yet

    lock.write_text(f"{os.getpid()}\n")
    asked: list[str] = []
    monkeypatch.setattr(cli, "require_running", asked.append)

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "read_text", denied)
    result = CliRunner().invoke(cli.main, ["wait-ready", "--data-dir", str(tmp_path), "--timeout", "5"])
    assert result.exit_code == 2 and asked == []
    assert result.stderr == (f"scsi-target: wait-ready: cannot read {lock} (Permission denied): its `run` is "
                             "another user's; run wait-ready as that user, or with --stml to ask the STML "
                             "alone\n")
    monkeypatch.undo()

    def other_users(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    lock.write_text("1 ready\n")
    monkeypatch.setattr(os, "kill", other_users)
    assert cli.run_serves(tmp_path) is True


def test_loop_names_an_initiator_a_targets_acl_admits(run):
    """With an ACL (as Security advises) the loopback's own PID-based name is
    never admitted, so `loop copy-out` (Troubleshooting's way to save a LUN's
    data) needs `--initiator NAME` naming one the ACL admits (trial UT)."""
    admitted = "iqn.1994-05.com.redhat:client1"
    d = str(run.data_dir)
    assert cli("acl", "add", "--data-dir", d, admitted).returncode == 0
    refused = cli("loop", "--data-dir", d, "capacity")
    assert refused.returncode == 1
    assert "is not in the ACL of" in refused.stderr and "--initiator" in refused.stderr
    r = cli("loop", "--data-dir", d, "--initiator", admitted, "capacity")
    assert (r.returncode, r.stdout.splitlines()[0]) == (0, "blocks: 131072"), r
    r = cli("loop", "capacity", "--data-dir", d, "--initiator", admitted)   # after the verb too
    assert r.returncode == 0, r
