"""The log rate limit: a flood of one message template is cut to a burst per
window, the suppressed count is reported, and its own memory is bounded.
Writes refused for lack of space: a line, then a count."""
from __future__ import annotations

import errno
import logging
import struct

from scsi_runtime.logs import RateLimit, audit
from stml.emulator import NOSPACE_LOG_INTERVAL
from support.sbc_harness import Harness, run


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, name: str = "fetd_tcp", level: int = logging.WARNING,
           extra: dict | None = None) -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    r.__dict__.update(extra or {})
    return r


LOGIN = "login: %s 0x%s -> %s via %s tpgt %d, TSIH %d CID %d (%s)"


def login(peer: str | None, i: int = 0) -> logging.LogRecord:
    return record(LOGIN, f"iqn.2026-11.org.test:i{i}", "800000000000", "iqn.t", "10.0.0.1:3260", 1, i, 0,
                  "new session", level=logging.INFO, extra=audit(peer))


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


def test_audit_lines_are_not_cut_by_template() -> None:
    """Every login of many initiators is logged, though all share one template."""
    f = RateLimit(burst=10, window=60, clock=Clock(), audit_burst=20, audit_total=1000)
    assert all(f.filter(login(f"10.0.{i // 250}.{i % 250}", i)) for i in range(500))


def test_a_peers_audit_lines_are_bounded_and_the_rest_counted() -> None:
    """A peer that logs in and out in a loop (no authentication needed) cannot
    flood the log: its burst passes, the next window says how many were held."""
    clock = Clock()
    f = RateLimit(burst=10, window=60, clock=clock, audit_burst=20, audit_total=1000)
    assert sum(f.filter(login("10.9.9.9", i)) for i in range(5000)) == 20
    assert f.filter(login("10.1.1.1"))              # another peer is not held back
    clock.now = 61
    r = login("10.9.9.9")
    assert f.filter(r)
    assert "4980 audit line(s) of 10.9.9.9 suppressed" in r.getMessage()
    assert r.getMessage().startswith("login: iqn.2026-11.org.test:i0 0x800000000000")


def test_all_peers_audit_lines_together_are_bounded() -> None:
    """Many addresses (an IPv6 prefix has plenty): the total per window holds."""
    f = RateLimit(clock=Clock(), audit_burst=20, audit_total=300, max_keys=50)
    passed = sum(f.filter(login(f"fe80::{i:x}%eth0", i)) for i in range(10_000))
    assert passed == 300 and len(f._peers) == 50
    r = login("fe80::270f%eth0")                    # the last one, held back once
    f.audit_total = 10_000                          # room again: the note formats despite the %
    assert f.filter(r) and "1 audit line(s) of fe80::270f%eth0 suppressed" in r.getMessage()


def test_the_operators_audit_lines_are_never_held_back() -> None:
    f = RateLimit(burst=1, window=60, clock=Clock(), audit_burst=1, audit_total=1)
    mgmt = [record("management: %s %s", "lun_add", {"lun": i}, name="stml", level=logging.INFO,
                   extra=audit()) for i in range(1000)]
    assert all(f.filter(r) for r in mgmt)


def test_writes_refused_for_space_log_a_line_then_a_count(caplog) -> None:
    """A full file system fails every write: the LU's first refusal is logged,
    the next ones are counted, and the next line (at most one a
    NOSPACE_LOG_INTERVAL) says how many (decision 0271)."""
    def full(*args: object) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def go() -> None:
        h = Harness()
        lu = h.lu()
        lu.backend.write_from = lu.backend.write_nowait = full   # type: ignore[method-assign]
        write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
        for _ in range(30):
            r = await h.cmd(write, bytes(512))
            assert r.key_asc == (0x7, 0x27, 0x07)
        assert lu.space_refused == 29
        assert lu.space_logged is not None
        lu.space_logged -= NOSPACE_LOG_INTERVAL   # as if the interval passed
        await h.cmd(write, bytes(512))
        assert lu.space_refused == 0
    run(go())
    lines = [r.getMessage() for r in caplog.records if "no space for writes" in r.getMessage()]
    assert len(lines) == 2
    assert "1 refused with DATA PROTECT" in lines[0] and "30 refused with DATA PROTECT" in lines[1]
