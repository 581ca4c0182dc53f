"""The log rate limit: a flood of one message template is cut to a burst per
window, the suppressed count is reported, and its own memory is bounded."""
from __future__ import annotations

import logging

from scsi_runtime.logs import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, name: str = "fetd_tcp", level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_flood_of_one_template_is_cut_to_the_burst() -> None:
    clock = Clock()
    f = RateLimit(burst=5, window=60, clock=clock)
    passed = [f.filter(record("bad Data-Out from %s", f"10.0.0.{i}")) for i in range(1000)]
    assert sum(passed) == 5
    assert passed[:5] == [True] * 5


def test_other_templates_and_levels_are_not_held_back() -> None:
    f = RateLimit(burst=2, window=60, clock=Clock())
    for _ in range(10):
        f.filter(record("flood %d", 1))
    assert f.filter(record("something else"))
    assert f.filter(record("flood %d", 1, level=logging.ERROR))


def test_next_window_reports_what_was_suppressed() -> None:
    clock = Clock()
    f = RateLimit(burst=3, window=60, clock=clock)
    for _ in range(13):
        f.filter(record("refused connection from %s", "x"))
    clock.now = 61
    r = record("refused connection from %s", "y")
    assert f.filter(r)
    assert "10 similar line(s) suppressed" in r.getMessage()
    assert r.getMessage().startswith("refused connection from y")


def test_tracked_templates_are_capped() -> None:
    f = RateLimit(burst=1, window=60, max_keys=50, clock=Clock())
    for i in range(10_000):
        f.filter(record(f"distinct template {i}"))
    assert len(f._seen) == 50
