"""The iSCSI portals: the listening sockets, either the front end's own (given
at start) or the STML's list (detect), opened and closed to match it, with
what is open and what could not be reported back (contract: portal_state)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Awaitable, Callable

log = logging.getLogger("fetd_tcp")

Accept = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "PortalSpec"], Awaitable[None]]


def _reason(e: OSError) -> str:
    """Why a listener could not open: the errno's text (asyncio rewords
    bind's error), or a resolver error's own (a gaierror's errno, e.g. -2,
    is no errno: os.strerror makes "Unknown error -2" of it)."""
    if isinstance(e, socket.gaierror) or not e.errno:
        return e.strerror or str(e)
    return os.strerror(e.errno)


class PortalSpec:
    def __init__(self, host: str, port: int, tpgt: int) -> None:
        self.host, self.port, self.tpgt = host, port, tpgt
        self.requested = (host, port, tpgt)   # as configured (port may be 0: any free port)


class Portals:
    """Where initiators connect. Each accepted connection goes to `accept`,
    its StreamReader limited to `read_limit`; `report` tells the STML the
    state of its list, `changed` runs once the listeners match a new list
    (discovery services announce them); `waiting` is what a `listening on`
    line adds while no STML answers."""

    def __init__(self, own: list[PortalSpec], accept: Accept, read_limit: int,
                 report: Callable[[list[dict[str, Any]]], None], changed: Callable[[], None],
                 waiting: Callable[[], str]) -> None:
        self.listening = own            # listening now
        self.read_limit = read_limit
        self.follow_stml = not own      # no portals of our own: listen on the STML's list (detect)
        self._accept, self._report, self._changed, self._waiting = accept, report, changed, waiting
        self._wanted: tuple[tuple[str, int, int], ...] = ()
        self._syncing: asyncio.Task | None = None
        self.servers: dict[PortalSpec, asyncio.AbstractServer] = {}
        self.errors: dict[tuple[str, int, int], str] = {}   # wanted portals we could not open
        self.synced = False               # the STML's portal list was applied once
        # set (with the OSError) when a portal of the STML's list cannot be opened at start:
        # a listener that cannot exist makes the start fail, it is not only logged
        self.failed: asyncio.Future | None = None

    async def start(self) -> None:
        """Open our own portals (an error names the portal: "HOST:PORT (tpgt N): reason")."""
        self.failed = asyncio.get_running_loop().create_future()
        own, self.listening = self.listening, []
        for p in own:
            try:
                await self._listen(p)
            except OSError as e:   # as for the STML's list: "HOST:PORT (tpgt N): reason"
                raise OSError(e.errno, f"{hostport(p.host, p.port)} (tpgt {p.tpgt}): {_reason(e)}") from None

    def follow(self, wanted: tuple[tuple[str, int, int], ...]) -> None:
        """The STML's portal list (every detect): listen on it, when we have no own portals."""
        if not self.follow_stml:
            return
        if wanted != self._wanted or self._syncing is None:
            self._wanted = wanted
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.get_running_loop().create_task(self._sync())
        elif self._syncing.done():
            self.report()    # e.g. a restarted STML: it has not heard from us yet

    def addresses(self) -> dict[int, list[tuple[str, int]]]:
        """Listening addresses by portal group tag (SendTargets answers)."""
        out: dict[int, list[tuple[str, int]]] = {}
        for p in self.listening:
            out.setdefault(p.tpgt, []).append((p.host, p.port))
        return out

    def close(self) -> None:
        """Stop listening (connections go on)."""
        if self._syncing is not None:
            self._syncing.cancel()
        for server in self.servers.values():
            server.close()

    async def _sync(self) -> None:
        """Open and close listeners until they match the STML's portal list
        (existing connections on a closed portal go on until they end)."""
        while True:
            wanted = self._wanted
            for p in [p for p in self.listening if p.requested not in wanted]:
                server = self.servers.pop(p, None)
                if server is not None:
                    server.close()
                self.listening.remove(p)
                print(f"fetd_tcp: stopped listening on {hostport(p.host, p.port)} (tpgt {p.tpgt})",
                      flush=True)
            have = {p.requested for p in self.listening}
            for key in wanted:
                if key not in have:
                    try:
                        await self._listen(PortalSpec(*key))
                        self.errors.pop(key, None)
                    except OSError as e:
                        where = f"{hostport(*key[:2])} (tpgt {key[2]})"
                        self.errors[key] = _reason(e)
                        log.error("cannot listen on %s: %s", where, self.errors[key])
                        if not self.synced and self.failed is not None and not self.failed.done():
                            self.failed.set_exception(OSError(e.errno, f"{where}: {self.errors[key]}"))
            if self._wanted is wanted:
                break
        self.synced = True
        self.report()
        self._changed()

    def report(self) -> None:
        """Tell the STML which portals of its list we listen on (contract: portal_state)."""
        states: list[dict[str, Any]] = [
            {"host": p.requested[0], "port": p.requested[1], "tpgt": p.tpgt, "listening": True,
             "bound_port": p.port} for p in self.listening]
        states += [{"host": k[0], "port": k[1], "tpgt": k[2], "listening": False, "error": err}
                   for k, err in self.errors.items() if k in self._wanted]
        self._report(states)

    async def _listen(self, p: PortalSpec) -> None:
        server = await asyncio.start_server(
            lambda r, w: self._accept(r, w, p), p.host, p.port,
            reuse_address=True, limit=self.read_limit)
        self.servers[p] = server
        self.listening.append(p)
        for sock in server.sockets:
            addr = sock.getsockname()
            p.port = addr[1]
            print(f"fetd_tcp: listening on {hostport(addr[0], addr[1])} (tpgt {p.tpgt}){self._waiting()}",
                  flush=True)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
