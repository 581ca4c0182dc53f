"""Discovery services told about our targets and portals: an iSNS server
(when fetd_tcp is given one) and SLP (when the STML's `slp` setting is on).
Both are updated after every detect and every change of the portals."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Sequence

from fetd_tcp.portals import PortalSpec
from stml.api import Detect

if TYPE_CHECKING:
    from fetd_tcp.isns import IsnsClient

log = logging.getLogger("fetd_tcp")


class Announcer:
    def __init__(self, isns: str | None, name: str) -> None:
        self.isns: IsnsClient | None = None
        self.slp: Any = None     # the SLP service agent's driver (fetd_tcp.slpd), when `slp` is on
        self.slp_settings: tuple = ()    # the settings it was started with (scopes, auth, DAs)
        self.isns_withheld = 0   # targets not told to iSNS (ACL, discovery CHAP), as last logged
        if isns:
            from fetd_tcp.isns import IsnsClient
            self.isns = IsnsClient(isns, name)

    def update(self, info: Detect | None, portals: Sequence[PortalSpec]) -> None:
        if self.isns is not None:
            self._isns_update(info, portals)
        self._slp_update(info, portals)

    async def close(self) -> None:
        if self.isns is not None:
            await self.isns.close()
        if self.slp is not None:
            self.slp.close()     # deregisters from directory agents

    def _isns_update(self, info: Detect | None, portals: Sequence[PortalSpec]) -> None:
        """Tell the iSNS server our targets and portals: those SendTargets shows
        any initiator (no ACL; none behind discovery CHAP), since any iSNS
        client may query the default discovery domain; all with `isns_auth`
        (decision 0287)."""
        from fetd_tcp.isns import Portal
        isns = self.isns
        assert isns is not None   # the caller checks that iSNS is configured
        told = list(info.targets) if info else []
        if info is not None and not info.discovery.get("isns_auth"):
            closed = bool(info.discovery.get("chap"))
            told = [t for t in told if not closed and not t.access.get("acl")]
        withheld = len(info.targets) - len(told) if info else 0
        if withheld != self.isns_withheld:
            self.isns_withheld = withheld
            if withheld:
                log.info("iSNS: %d target(s) not registered: %s (`isns_auth = true` registers them)",
                         withheld, "discovery needs CHAP" if info and info.discovery.get("chap")
                         else "their ACL admits only some initiators")
        isns.update([(t.name, t.alias) for t in told], [Portal(p.host, p.port, p.tpgt) for p in portals])

    def _slp_update(self, info: Detect | None, portals: Sequence[PortalSpec]) -> None:
        """Start, stop or update the SLP service agent as the STML's `slp`
        settings, targets and our portals say."""
        scopes = info.discovery.get("slp") if info is not None else None
        if not scopes or info is None:
            if self.slp is not None:
                self.slp.close()
                self.slp = None
            return
        from fetd_tcp import slp, slpd
        port = int(os.environ.get("SCSI_TARGET_SLP_PORT", slp.SLP_PORT))
        das = list(info.discovery.get("slp_da") or ())
        settings = (tuple(scopes), bool(info.discovery.get("slp_auth")), tuple(das))
        if self.slp is not None and self.slp_settings != settings:
            self.slp.close()
            self.slp = None
        targets = [slp.Target(t.name, t.alias, tuple(t.access.get("acl") or ()),
                              (t.access.get("chap") or {}).get("user")) for t in info.targets]
        addresses = [(p.host, p.port, p.tpgt) for p in portals]
        closed = bool(info.discovery.get("chap"))   # discovery needs CHAP: SLP tells no target (0507)
        if self.slp is None:
            agent = slp.ServiceAgent(list(scopes), auth=settings[1])
            agent.update(targets, addresses, closed)
            driver = slpd.SlpDriver(agent, das, port)
            try:
                driver.start()
            except OSError as e:
                log.error("SLP service agent not started: %s", e)
                return
            self.slp, self.slp_settings = driver, settings
        else:
            self.slp.agent.update(targets, addresses, closed)
            self.slp.update()
