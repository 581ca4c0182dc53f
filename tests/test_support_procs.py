"""tests/support/procs.py and target.py keep their promises: a stopped process
leaves nothing of its session behind, and a Target removes the data dir it
made itself (not one it was given)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support.procs import pid_alive, run, stop_pid
from support.target import Target


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stop_pid_sweeps_what_a_dead_session_leader_left() -> None:
    """A supervisor SIGKILLed before it could stop its child: stop_pid with
    session=True still finds the child by its session and kills it."""
    proc = subprocess.Popen(["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    assert pid_alive(child)           # orphaned, still running
    try:
        stop_pid(proc, session=True)
        assert _gone(child)
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_target_removes_the_data_dir_it_made_and_keeps_one_it_was_given(tmp_short) -> None:
    args = ("--no-iscsi", "--lun", "ram:4MiB")
    t = Target(*args, portals=(), expect_portals=0)
    made = Path(t.data_dir)
    assert made.is_dir()
    t.stop()
    assert not made.exists()

    given = tmp_short()
    with Target(*args, data_dir=str(given), portals=(), expect_portals=0):
        pass
    assert (given / "scsi-target.toml").exists()


def test_run_past_its_timeout_terminates_so_the_command_cleans_up() -> None:
    """procs.run sends SIGTERM, not SIGKILL, to a command that outlives its
    timeout: the command's own cleanup (here a trap) runs and is reported."""
    script = "sleep 600 & trap \"kill $!; echo cleaned up; exit 3\" TERM; echo started; wait"
    with pytest.raises(AssertionError, match=r"still ran after 5s; stopped:\nstarted\ncleaned up"):
        run(["sh", "-c", script], timeout=5)
