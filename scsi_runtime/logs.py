"""Logging for every process of the target: one line format, and a rate limit
so that one misbehaving initiator cannot flood the log (a traceback per
failing command, a line per bad PDU or refused connection).

Audit lines (logins, logouts, sessions ended, management changes) are not
cut by message template: each one matters. They carry `extra=audit(peer)`.
A network peer's lines are bounded per peer address and all peers' together
(a peer need not authenticate to log in); the local operator's never are."""
from __future__ import annotations

import json
import logging
import sys
import time
from collections import OrderedDict
from typing import Callable

# a message template may repeat this often per window before it is held back
BURST = 10
WINDOW = 60.0
# templates tracked at once: the limiter's own memory is bounded too
MAX_KEYS = 1024
# audit lines per peer address, and of all peers together, per window: far above
# what a host's sessions log when they all reconnect, far below a login flood
AUDIT_BURST = 120
AUDIT_TOTAL = 2400


def audit(peer: str | None = None) -> dict[str, str]:
    """`extra` for an audit line. `peer`: the network address whose doing it is
    (bounded per peer); None: the local operator's (never held back)."""
    return {"audit": peer or ""}


class RateLimit(logging.Filter):
    """Pass at most BURST records per (logger, level, message template) in each
    WINDOW seconds; when a held-back template shows up again in a new window,
    one line says how many were suppressed. Keyed by the template, not the
    formatted text, so lines differing only in an address or tag count as one."""

    def __init__(self, burst: int = BURST, window: float = WINDOW, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic, audit_burst: int = AUDIT_BURST,
                 audit_total: int = AUDIT_TOTAL) -> None:
        super().__init__()
        self.burst, self.window, self.max_keys, self.clock = burst, window, max_keys, clock
        self.audit_burst, self.audit_total = audit_burst, audit_total
        # key -> [window start, records passed in it, records suppressed in it]
        self._seen: OrderedDict[tuple[str, int, str], list] = OrderedDict()
        # audit lines: peer -> the same; and all peers' lines: [window start, passed]
        self._peers: OrderedDict[str, list] = OrderedDict()
        self._audit_window = [float("-inf"), 0]

    def filter(self, record: logging.LogRecord) -> bool:
        peer = getattr(record, "audit", None)
        if peer is not None:
            return self._audit(record, peer)
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        state = self._seen.get(key)
        if state is None or now - state[0] >= self.window:
            suppressed = state[2] if state else 0
            self._seen[key] = [now, 1, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            if suppressed:
                record.msg = f"{record.msg} [{suppressed} similar line(s) suppressed in the last " \
                             f"{self.window:.0f}s]"
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False

    def _audit(self, record: logging.LogRecord, peer: str) -> bool:
        """An audit line passes unless its peer logged audit_burst of them in this
        window, or all peers audit_total; the next one of that peer to pass says
        how many of its lines were held back."""
        if not peer:
            return True
        now = self.clock()
        total = self._audit_window
        if now - total[0] >= self.window:
            total[:] = [now, 0]
        state = self._peers.get(peer)
        if state is None or now - state[0] >= self.window:
            state = self._peers[peer] = [now, 0, state[2] if state else 0]
            while len(self._peers) > self.max_keys:
                self._peers.popitem(last=False)
        self._peers.move_to_end(peer)
        if state[1] >= self.audit_burst or total[1] >= self.audit_total:
            state[2] += 1
            return False
        state[1] += 1
        total[1] += 1
        if state[2]:
            who = peer.replace("%", "%%")   # an IPv6 scope (fe80::1%eth0): not a format
            record.msg = f"{record.msg} [{state[2]} audit line(s) of {who} suppressed before this one]"
            state[2] = 0
        return True


TEXT_FORMAT = "%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors: the text format's fields
    under stable keys."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "process": self.name, "pid": record.process,
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if getattr(record, "audit", None) is not None:
            out["audit"] = True     # collectors can keep these apart
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def formatter(name: str, fmt: str = "text") -> logging.Formatter:
    """The one log format of every process (`run` relays its children's lines in it too)."""
    return JsonFormatter(name) if fmt == "json" else logging.Formatter(TEXT_FORMAT.format(name=name))


def setup_logging(level: str, name: str, fmt: str = "text") -> None:
    """One format for every process: time, process name and PID, level, logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(name, fmt))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
