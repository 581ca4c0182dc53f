"""Resource limits of the iSCSI front end, with safe defaults, each overridable by an
environment variable (inherited through `scsi-target run`, so the supervisor passes
them on to fetd_tcp):

    SCSI_TARGET_LOGIN_TIMEOUT           seconds a connection has to finish login (15)
    SCSI_TARGET_MAX_CONN_PER_PORTAL     TCP connections open on one portal (1024)
    SCSI_TARGET_MAX_CONN_PER_HOST       TCP connections from one initiator address (128)
    SCSI_TARGET_MAX_SESSIONS_PER_TARGET normal sessions logged in to one target (256)
    SCSI_TARGET_MAX_WRITE_BUFFER        bytes of write data per connection (64 MiB)
    SCSI_TARGET_MAX_READ_BUFFER         bytes of read data and unsent output per connection (64 MiB)
    SCSI_TARGET_MAX_BUFFERED            bytes fetd_tcp buffers for all connections together (256 MiB)
    SCSI_TARGET_MAX_FAILED_PER_HOST     ERL 2: failed connections kept for TASK REASSIGN per host (16)
    SCSI_TARGET_MAX_RETAIN              ERL 2: seconds at most they are kept, whatever was negotiated (60)

Write data buffer. fetd_tcp hands write data to the STML link at once, but the link's
ZeroMQ queue is unbounded (SNDHWM=0), and the CmdSN window slides as commands arrive,
not as they complete; so a stalled STML and a fast initiator could make fetd_tcp hold
any amount. Each connection therefore counts the write data it has handed over or
solicited (immediate and unsolicited data as each command arrives, solicited data as
each R2T goes out) until the STML answers the task (xmit_response, or an abort). Past
SCSI_TARGET_MAX_WRITE_BUFFER:
  - R2Ts wait, except for the oldest task waiting for them (so one task always
    completes and frees its data: no deadlock), and go out as answers free room;
  - MaxCmdSN stops advancing, so the window closes as commands arrive; commands
    beyond it are discarded unread (RFC 7143 3.2.2.1), and an immediate write gets
    TASK SET FULL.
The write data one connection can make fetd_tcp hold is thus at most
MAX_WRITE_BUFFER + window * FirstBurstLength + the oldest task's transfer length
(window <= 128, FirstBurstLength <= 256 KiB as offered, a transfer <= the STML's
max_transfer).

Read data buffer. Read data arrives from the STML whether or not the initiator reads
its socket, so a read command reserves its transfer when it arrives; its data then
counts until the socket takes it. Past SCSI_TARGET_MAX_READ_BUFFER (reserved plus
unsent) a read gets TASK SET FULL, unless it is the connection's only one, and MaxCmdSN
stops advancing; a connection whose output keeps backing up also stops being read.

All of it together. SCSI_TARGET_MAX_BUFFERED bounds what every connection makes fetd_tcp
hold: read and write data as above, PDUs waiting for an earlier CmdSN, Text requests
and answers being continued, unsent output (fetd_tcp/budget.py). Each connection is
guaranteed a share (budget.RESERVE) that the others cannot take, and a quarter of the
budget is kept for the shares of new connections, so what connections hold beyond their
share never refuses a login (Out of resources only once no share is left). One initiator,
over all its connections, holds at most half of what the others leave it beyond their
shares, so the per-connection bounds above do not let a few of its connections fill the
budget. Past the budget or the initiator's part, commands get TASK SET FULL and R2Ts
wait. `scsi-target status` shows what is held (front end "buffered").

Failed connections (ErrorRecoveryLevel 2). A connection that dies with tasks keeps
them, and its share, for a TASK REASSIGN; one with no task keeps nothing. Dead
connections are not open ones, so SCSI_TARGET_MAX_CONN_PER_HOST does not bound them:
each host keeps at most SCSI_TARGET_MAX_FAILED_PER_HOST (its oldest is given up, its
tasks aborted), a session at most MaxConnections (one per CID), each for Time2Wait +
Time2Retain but never more than SCSI_TARGET_MAX_RETAIN seconds (the initiator alone
picks Time2Wait, up to an hour; a Logout Response tells the capped times). See
fetd_tcp/retain.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from fetd_tcp.budget import RESERVE

PREFIX = "SCSI_TARGET_"
MIN_BUFFERED = 8 * RESERVE   # room for a few connections' guaranteed shares
_ENV = {"login_timeout": "LOGIN_TIMEOUT", "max_conn_per_portal": "MAX_CONN_PER_PORTAL",
        "max_conn_per_host": "MAX_CONN_PER_HOST", "max_sessions_per_target": "MAX_SESSIONS_PER_TARGET",
        "max_write_buffer": "MAX_WRITE_BUFFER", "max_read_buffer": "MAX_READ_BUFFER",
        "max_buffered": "MAX_BUFFERED", "max_failed_per_host": "MAX_FAILED_PER_HOST",
        "max_retain": "MAX_RETAIN"}


class LimitError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    login_timeout: float = 15.0
    max_conn_per_portal: int = 1024
    max_conn_per_host: int = 128
    max_sessions_per_target: int = 256
    max_write_buffer: int = 64 << 20
    max_read_buffer: int = 64 << 20
    max_buffered: int = 256 << 20
    max_failed_per_host: int = 16
    max_retain: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Limits:
        kw: dict[str, Any] = {}   # float or int, as each field's type
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
        limits = cls(**kw)
        if limits.max_buffered < MIN_BUFFERED:
            raise LimitError(f"{PREFIX}MAX_BUFFERED: at least {MIN_BUFFERED} bytes")
        return limits
