"""The STML process: a ZeroMQ ROUTER socket around the Emulator."""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from backends import BackendError, open_backend
from stml.api import Channel, pack, unpack
from stml.config import Config, ConfigError
from stml.emulator import Emulator, Target
from stml.lu import LogicalUnit

log = logging.getLogger("stml")


def build_targets(config: Config, templates: dict[str, Any]) -> list[Target]:
    """Open every LUN's backend; a backend that cannot open is a config error."""
    targets = []
    for t in config.targets:
        luns = {}
        for lc in t.luns:
            o = lc.options
            try:
                backend = open_backend(o.kind, o.size, o.path, o.ro)
            except (BackendError, ValueError, OSError) as e:
                raise ConfigError(f"target {t.name} LUN {lc.lun}", str(e)) from None
            if backend.size() < o.block_size:
                raise ConfigError(f"target {t.name} LUN {lc.lun}", "backing store smaller than one block")
            luns[lc.lun] = LogicalUnit(t.name, lc.lun, backend, o, templates["disk"])
        targets.append(Target(t.name, luns, t.alias, t.access()))
    return targets


def portal_groups(config: Config) -> list[int]:
    """Portal group tags of the configured portals ("HOST:PORT[,TPGT]", default 1)."""
    tags = set()
    for p in config.portals:
        m = re.search(r",(\d+)$", p)
        tags.add(int(m.group(1)) if m else 1)
    return sorted(tags)


class StmlServer:
    def __init__(self, config: Config, heartbeat_ms: int = 1000) -> None:
        self.config = config
        self.endpoint = config.stml_endpoint
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="backend")
        self.emulator = Emulator([], self._send, self.executor, heartbeat_ms=heartbeat_ms,
                                 discovery={"chap": config.discovery_chap},
                                 data_dir=config.data_dir, portal_groups=portal_groups(config))
        for t in build_targets(config, self.emulator.templates):
            self.emulator.targets[t.name] = t
        self.emulator.restore_reservations()   # APTPL state kept under the data dir
        self._lock_fd: int | None = None

    def _send(self, ident: bytes, header: dict[str, Any], frames: list) -> None:
        self.channel.send([ident, pack(header), *frames])

    def _bind(self) -> None:
        if self.endpoint.startswith("ipc://"):
            path = Path(self.endpoint[6:])
            path.parent.mkdir(parents=True, exist_ok=True)
            # one STML per socket path: binding would silently steal a live one's socket
            self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError("stml_endpoint", f"another STML is already serving {self.endpoint}") from None
        try:
            self.sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            raise ConfigError("stml_endpoint", f"cannot bind {self.endpoint}: {e}") from None

    async def serve(self, stop: asyncio.Event) -> None:
        self._bind()
        luns = sum(len(t.luns) for t in self.emulator.targets.values())
        log.info("STML serving %d target(s), %d LUN(s) on %s", len(self.emulator.targets), luns,
                 self.endpoint)
        print(f"stml: listening on {self.endpoint}", flush=True)
        self.channel = Channel(self.sock, self._receive, routed=True)
        beats = asyncio.create_task(self._liveness())
        await stop.wait()
        self.emulator.shutdown()
        beats.cancel()
        await asyncio.sleep(0.05)  # let the release messages leave
        self.channel.close(linger_ms=100)
        self.executor.shutdown(wait=True)
        for t in self.emulator.targets.values():
            for lu in t.luns.values():
                lu.backend.flush()
                lu.backend.close()

    def _receive(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return
        try:
            header = unpack(frames[1].buffer)
        except ValueError as e:
            log.warning("refused a message from %s: %s", frames[0].bytes.hex(), e)
            return
        self.emulator.handle(frames[0].bytes, header, frames[2:])

    async def _liveness(self) -> None:
        while True:
            await asyncio.sleep(self.emulator.heartbeat)
            self.emulator.check_liveness()


async def run_stml(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await StmlServer(config).serve(stop)
