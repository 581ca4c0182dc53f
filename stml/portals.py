"""The STML's portal list, as detect carries it and ALUA counts it, and what
the front ends that follow the list report about their listeners.

Management changes the list (stml.mgmt) and the server passes the reports
on (stml.server): the list's helpers live here, below both, so neither
imports the other for them.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Container
from typing import Any

from scsi_runtime.portals import parse_portal
from stml.config import Config


def portal_groups(config: Config) -> list[int]:
    """Portal group tags of the configured portals ("HOST:PORT[,TPGT]", default 1)."""
    tags = set()
    for p in config.portals:
        m = re.search(r",(\d+)$", p)
        tags.add(int(m.group(1)) if m else 1)
    return sorted(tags)


def portal_entries(portals: list[str]) -> list[dict[str, Any]]:
    """The `portals` field of detect: {host, port, tpgt} per configured portal."""
    return [dict(zip(("host", "port", "tpgt"), parse_portal(p))) for p in portals]


# A gateway's front end listens on the portals `run` gave it, whichever
# gateway's STML serves, and reports them to none (docs/decisions/0414)
GATEWAY_STATE = "set at the gateway's start"
GATEWAY_FIXED = ("this is a gateway ([stml] peers): its front end listens on the portals it started "
                 "with, whichever gateway serves")


class PortalStates:
    """What each front end that follows the portal list last said about its
    listeners (contract: portal_state), kept while it is registered."""

    def __init__(self, registered: Container[bytes]) -> None:
        self.registered = registered   # the idents of the front ends registered now
        self._states: dict[bytes, list[dict[str, Any]]] = {}
        self._news: asyncio.Event | None = None

    def report(self, ident: bytes, header: dict[str, Any]) -> None:
        """A front end that follows the portal list says which it listens on."""
        if not header["follows"]:
            self._states.pop(ident, None)
        else:
            self._states[ident] = header["portals"][:1024]
        if self._news is not None:
            self._news.set()

    def reports(self) -> list[list[dict[str, Any]]]:
        """The reports of the front ends registered now."""
        for ident in [i for i in self._states if i not in self.registered]:
            del self._states[ident]
        return list(self._states.values())

    async def wait(self, key: tuple[str, int, int], timeout: float) -> list[str]:
        """After a portal was added: wait until every following front end has
        reported on it; its errors ([] when all listen, or none follows)."""
        deadline = time.monotonic() + timeout
        while True:
            reports = self.reports()
            states = [[r for r in rep if (r.get("host"), r.get("port"), r.get("tpgt")) == key]
                      for rep in reports]
            if all(states):
                return [str(r.get("error")) for st in states for r in st if not r.get("listening")]
            left = deadline - time.monotonic()
            if left <= 0:
                return [f"no answer from {len([s for s in states if not s])} front end(s) in {timeout:g}s"]
            self._news = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._news.wait(), left)
