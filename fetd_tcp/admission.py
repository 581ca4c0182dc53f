"""Admission limits: what may connect and log in. Open TCP connections per
portal and per initiator address, a guaranteed share of the buffer budget
per logged-in connection, normal sessions per target, connections per
session (MaxConnections); the limits are fetd_tcp.limits'."""
from __future__ import annotations

import logging
from typing import Any

from fetd_tcp import login as L
from fetd_tcp.budget import Account, Budget
from fetd_tcp.limits import Limits
from fetd_tcp.registry import SessionRegistry

log = logging.getLogger("fetd_tcp")


class Admission:
    def __init__(self, limits: Limits, registry: SessionRegistry) -> None:
        self.limits, self.registry = limits, registry
        self.budget = Budget(limits.max_buffered)   # every byte a connection makes us hold
        self.open_conns: dict[Any, int] = {}        # portal / peer host -> open connections

    def connect(self, portal: Any, peer: Any) -> tuple[Any, ...] | None:
        """Count a new TCP connection from `peer` (its address) on `portal`:
        the keys to give back to `disconnect`, or None past a limit."""
        host = ("host", peer[0] if peer else None)
        lim, counts = self.limits, self.open_conns
        if counts.get(portal, 0) >= lim.max_conn_per_portal or counts.get(host, 0) >= lim.max_conn_per_host:
            log.warning("connection from %s refused: too many connections", peer)
            return None
        counts[portal] = counts.get(portal, 0) + 1
        counts[host] = counts.get(host, 0) + 1
        return portal, host

    def disconnect(self, keys: tuple[Any, ...]) -> None:
        counts = self.open_conns
        for key in keys:
            counts[key] -= 1
            if not counts[key]:
                del counts[key]

    def account(self, initiator: str) -> Account | None:
        """Every connection is guaranteed a share of the buffer budget: none
        left (None), no login; what it holds beyond counts toward its
        initiator's fair share."""
        return self.budget.open(initiator)

    def decide(self, machine: L.LoginMachine, o: L.LoginOutcome) -> L.Complete | L.Fail:
        """The session side of a finished negotiation: a new session gets a
        TSIH; a connection joining one must name a live session of this
        initiator and stay within MaxConnections."""
        reg = self.registry
        tpgt = machine.config.portal_group_tag
        if o.tsih == 0:
            if o.session_type == "Normal" and o.target is not None \
                    and reg.per_target.get(o.target.name, 0) >= self.limits.max_sessions_per_target \
                    and (o.initiator_name, o.isid, o.target.name, tpgt) not in reg.by_name:   # reinstatement
                return machine.refuse(L.OUT_OF_RESOURCES, "too many sessions on this target")
            return machine.accept(reg.new_tsih())
        s = reg.sessions.get(o.tsih)
        # a session's connections all come through portals of its portal group (RFC 7143 4.4)
        if s is None or s.initiator != o.initiator_name or s.isid != o.isid or s.tpgt != tpgt:
            return machine.refuse(L.SESSION_DOES_NOT_EXIST, "no such session to join")
        if o.cid not in s.connections and len(s.connections) >= s.params.max_connections:
            return machine.refuse(L.TOO_MANY_CONNECTIONS, "MaxConnections reached")
        return machine.accept(o.tsih)
