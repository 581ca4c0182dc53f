"""Logging for every process of the target: one line format, and a rate limit
so that one misbehaving initiator cannot flood the log (a traceback per
failing command, a line per bad PDU or refused connection)."""
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


class RateLimit(logging.Filter):
    """Pass at most BURST records per (logger, level, message template) in each
    WINDOW seconds; when a held-back template shows up again in a new window,
    one line says how many were suppressed. Keyed by the template, not the
    formatted text, so lines differing only in an address or tag count as one."""

    def __init__(self, burst: int = BURST, window: float = WINDOW, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.max_keys, self.clock = burst, window, max_keys, clock
        # key -> [window start, records passed in it, records suppressed in it]
        self._seen: OrderedDict[tuple[str, int, str], list] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
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
