"""Real processes for tests: ports, short private directories, and one way to stop.

A test starts a process on an ephemeral port (`free_port`, or port 0 where the
process reports what it bound) in a directory of its own, and its fixture stops
it by PID with `stop_pid`: SIGTERM, a wait, then SIGKILL. A process started in
a session of its own (`scsi-target run`, which gives each child a process group
of its own in that session) is swept whole, so a supervisor that died first
leaves no child behind.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a process that cannot report the one it bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# The test session's own parents of what short_dir and shm_dir make (tests/conftest.py
# makes them and names them here; processes the tests start inherit the names): what is
# left inside at the session's end was leaked by one of its tests, and nobody else's.
SESSION_TMP = "SCSI_TARGET_TEST_TMP"
SESSION_SHM = "SCSI_TARGET_TEST_SHM"


def short_dir() -> str:
    """A new directory whose ipc socket paths stay well under the 107-byte sun_path
    limit (tmp_path's are longer). Whoever makes one removes it: the `tmp_short`
    fixture does, and so does a Target for the data dir it made itself."""
    return tempfile.mkdtemp(prefix="st", dir=os.environ.get(SESSION_TMP, "/tmp"))


def shm_dir() -> str:
    """A new directory on the memory file system (/dev/shm) for big images;
    whoever makes one removes it."""
    return tempfile.mkdtemp(prefix="st", dir=os.environ.get(SESSION_SHM, "/dev/shm"))


def session_members(sid: int) -> list[int]:
    """PIDs in session `sid` (every process a session leader started, at any depth)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                found.append(int(entry))
        except OSError:
            continue   # gone meanwhile
    return found


def stop_pid(proc: subprocess.Popen, timeout: float = 10.0, session: bool = False) -> None:
    """Stop one process we started, by its PID: SIGTERM, wait `timeout`, then SIGKILL.
    With `session` (it was started with start_new_session), SIGKILL whatever is
    left in its session afterwards too."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if session:
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for_line(path: Path, pattern: re.Pattern, proc: subprocess.Popen,
                  timeout: float = START_TIMEOUT) -> re.Match:
    """Wait until `pattern` appears in the file a process writes its output to."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = pattern.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode} before "
                               f"printing {pattern.pattern!r}; output:\n{text}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern.pattern!r} from {proc.args} in {timeout}s:\n{text}")
        time.sleep(0.02)


class Proc:
    """A process whose output goes to a file (stderr to a second one if given),
    stopped by its PID with `stop_pid`."""

    def __init__(self, argv: list[str], out: Path, err: Path | None = None,
                 env: dict[str, str] | None = None, session: bool = False) -> None:
        self.out_path, self.err_path, self.session = out, err, session
        with contextlib.ExitStack() as files:
            o = files.enter_context(open(out, "wb"))
            e = files.enter_context(open(err, "wb")) if err else subprocess.STDOUT
            self.proc = subprocess.Popen(argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=session)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def log(self) -> str:
        """What it wrote to stderr (its log), or all its output if that is one file."""
        path = self.err_path or self.out_path
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_line(self, pattern: str | re.Pattern, timeout: float = START_TIMEOUT) -> re.Match:
        """The first match of `pattern` in its output (stdout)."""
        return wait_for_line(self.out_path, re.compile(pattern), self.proc, timeout)

    def wait_log(self, needle: str, timeout: float = START_TIMEOUT) -> str:
        """Its log once it holds `needle`."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the log of {self.proc.args} after {timeout}s:\n{text}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        stop_pid(self.proc, timeout, self.session)

    def kill(self) -> None:
        """SIGKILL: the process vanishes without telling anyone."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def pid_alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def children_by_module(pid: int) -> dict[str, int]:
    """The children of `pid` by the module each one runs (`python -m NAME`):
    {'stml': PID, 'fetd_tcp': PID} under `scsi-target run`."""
    found = {}
    for child in children_of(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue    # gone meanwhile
        if b"-m" in argv:   # not a zombie not yet reaped, nor a child between fork and exec
            found[argv[argv.index(b"-m") + 1].decode()] = child
    return found


def peak_rss(pid: int) -> int:
    """The peak resident set of a running process (VmHWM), in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def run(cmd: list[str], timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command to its end; with `check`, a non-zero exit fails the test with its output.
    One still running after `timeout` gets SIGTERM first (subprocess.run's SIGKILL
    would skip a script's own cleanup and leave its files and processes behind)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          stdin=subprocess.DEVNULL) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    out, err = proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:   # a process it left holds its output open
                    out, err = "", ""
            raise AssertionError(f"{cmd} still ran after {timeout}s; stopped:\n{out}\n{err}") from None
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p
