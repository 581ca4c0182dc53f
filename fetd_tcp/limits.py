"""Resource limits of the iSCSI front end, with safe defaults, each overridable by an
environment variable (inherited through `scsi-target run`, so the supervisor passes
them on to fetd_tcp):

    SCSI_TARGET_LOGIN_TIMEOUT           seconds a connection has to finish login (15)
    SCSI_TARGET_MAX_CONN_PER_PORTAL     TCP connections open on one portal (1024)
    SCSI_TARGET_MAX_CONN_PER_HOST       TCP connections from one initiator address (128)
    SCSI_TARGET_MAX_SESSIONS_PER_TARGET normal sessions logged in to one target (256)

Outstanding commands are bounded by the CmdSN window (MaxCmdSN), and a task's write
data by the negotiated FirstBurstLength (unsolicited) and R2Ts (solicited), so the
write data one session can make the front end hold is at most
window * (FirstBurstLength + MaxBurstLength * MaxOutstandingR2T).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

PREFIX = "SCSI_TARGET_"
_ENV = {"login_timeout": "LOGIN_TIMEOUT", "max_conn_per_portal": "MAX_CONN_PER_PORTAL",
        "max_conn_per_host": "MAX_CONN_PER_HOST", "max_sessions_per_target": "MAX_SESSIONS_PER_TARGET"}


class LimitError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    login_timeout: float = 15.0
    max_conn_per_portal: int = 1024
    max_conn_per_host: int = 128
    max_sessions_per_target: int = 256

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Limits:
        kw: dict[str, float | int] = {}
        for f in fields(cls):
            name = PREFIX + _ENV[f.name]
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                value = float(raw) if f.type in ("float", float) else int(raw)
            except ValueError:
                raise LimitError(f"{name}: {raw!r} is not a number") from None
            if value <= 0:
                raise LimitError(f"{name}: must be positive")
            kw[f.name] = value
        return cls(**kw)
