"""`run`'s supervisor: starts the STML and the front end, relays what they
say, knows when they are ready, restarts one that dies, and makes sure none
outlives it.

- Children run in a process group of their own, so a Ctrl-C in the terminal
  reaches the supervisor alone, which stops the front end first (initiators
  are asked to log out) and the STML last: no "link lost" on a clean stop.
- Each child asks the kernel for SIGTERM when the supervisor dies, however it
  dies (PR_SET_PDEATHSIG); a busy STML then stops within its grace (StopGuard).
- The children's stdout carries their machine-readable lines ("fetd_tcp:
  listening on ..."); the supervisor reads them without threads (a selector;
  preexec_fn must not run beside threads) and relays them in the one log
  format, so the terminal shows one kind of line. Their logs (stderr) go
  straight to ours.
- Readiness: once the STML listens, and the front end is attached and
  listens on every portal, the banner is printed and systemd is told
  (sd_notify READY=1).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from typing import IO, Any, Callable

from scsi_runtime.logs import formatter
from stml.api.inject import START_ENV

log = logging.getLogger("scsi-target")

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT = 10.0     # a child that has not stopped this long after SIGTERM is killed
MARKER = re.compile(r"^(stml|fetd_tcp|fetd_vhost): (.*)$")


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about our state, if it started us: a
    datagram to $NOTIFY_SOCKET (a path, or @ for the abstract namespace).
    The protocol is these few lines, so no library is needed for it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], e)
        return False
    return True


def _prepare_child(parent: int, cpus: set[int] | None, libc: Any) -> None:
    """In the child, before exec: die with the supervisor, and run on `cpus`."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:      # the supervisor died before prctl: nobody would tell us
        os._exit(1)
    if cpus is not None:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:   # a CPU taken away meanwhile (hotplug, cpuset): run unpinned rather than not at all
            pass


class Child:
    def __init__(self, name: str, proc: subprocess.Popen) -> None:
        self.name, self.proc = name, proc
        self.buf = b""


class Supervisor:
    """Starts child processes (each on its CPU set, if given), relays their
    stdout, restarts one that dies, stops all on a signal."""

    def __init__(self, children: dict[str, list[str]], cpus: dict[str, set[int]] | None = None,
                 log_format: str = "text", on_line: Callable[[str, str], None] | None = None,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.children = children
        self.cpus = cpus or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}     # how often each child was started
        self.live: dict[int, Child] = {}     # stdout fd -> child
        self.stopping = False
        self.reload = False
        self.log_format = log_format
        self.on_line = on_line or (lambda name, text: None)
        self.ready = ready       # whether the children served (before: their own error line is all)
        self.sel = selectors.DefaultSelector()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.out: IO[str] = sys.stderr

    def start(self, name: str) -> None:
        prepare = functools.partial(_prepare_child, os.getpid(), self.cpus.get(name), self.libc)
        self.starts[name] = self.starts.get(name, 0) + 1
        # (fault injection: a kill rule fires in the first start only, stml.api.inject)
        env = {**os.environ, START_ENV: str(self.starts[name])}
        proc = subprocess.Popen(self.children[name], preexec_fn=prepare, process_group=0,
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        assert proc.stdout is not None   # PIPE
        os.set_blocking(proc.stdout.fileno(), False)
        child = Child(name, proc)
        self.live[proc.stdout.fileno()] = child
        self.sel.register(proc.stdout.fileno(), selectors.EVENT_READ, child)
        self.procs[name] = proc

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def hup(self, *_: Any) -> None:
        self.reload = True

    # ------------------------------------------------------------ output
    def pump(self, timeout: float) -> None:
        """Relay what the children wrote, waiting up to `timeout` for it."""
        try:
            events = self.sel.select(timeout)
        except InterruptedError:
            return
        for key, _ in events:
            child: Child = key.data
            fd = key.fd
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                self._close(fd)
                continue
            child.buf += data
            *lines, child.buf = child.buf.split(b"\n")
            for line in lines:
                self._line(child, line.decode(errors="replace"))

    def _close(self, fd: int) -> None:
        child = self.live.pop(fd, None)
        self.sel.unregister(fd)
        if child is not None:
            if child.buf:
                self._line(child, child.buf.decode(errors="replace"))
            assert child.proc.stdout is not None
            child.proc.stdout.close()

    def _line(self, child: Child, text: str) -> None:
        m = MARKER.match(text)
        message = m.group(2) if m else text
        if logging.getLogger().isEnabledFor(logging.INFO):    # --log-level applies to them too
            record = logging.LogRecord(child.name, logging.INFO, "", 0, message, None, None)
            record.process = child.proc.pid
            self.out.write(formatter(child.name, self.log_format).format(record) + "\n")
            self.out.flush()
        self.on_line(child.name, message)

    # ------------------------------------------------------------ life
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.hup)
        for name in self.children:
            self.start(name)
        restarts: dict[str, list[float]] = {n: [] for n in self.children}
        status = 0
        while not self.stopping:
            self.pump(0.2)
            if self.reload:
                self.reload = False
                stml = self.procs.get("stml")
                if stml is not None and stml.poll() is None:
                    log.info("reloading the configuration (SIGHUP)")
                    stml.send_signal(signal.SIGHUP)
            for name, proc in list(self.procs.items()):
                rc = proc.poll()
                if rc is None or self.stopping:
                    continue
                self.pump(0)     # its last words first
                if rc == 2:  # a config or startup error: restarting cannot help
                    if self.ready():
                        log.error("%s refused its configuration; stopping", name)
                    self.stopping, status = True, 2
                    break
                recent = [t for t in restarts[name] if time.monotonic() - t < 60]
                if len(recent) >= 5:
                    log.error("%s keeps failing (exit %d); stopping", name, rc)
                    self.stopping, status = True, 1
                    break
                log.warning("%s exited with %d; restarting", name, rc)
                restarts[name] = recent + [time.monotonic()]
                self.start(name)
        sd_notify("STOPPING=1")
        # front ends first (they ask initiators to log out), the STML last
        for proc in reversed(list(self.procs.values())):
            self._stop_one(proc)
        while self.live:
            self.pump(0.1)
        return status

    def _stop_one(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                break
            self.pump(0.05)
