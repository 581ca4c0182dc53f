"""tests/support/guest.py's own bookkeeping, without booting anything."""
from __future__ import annotations

import sys
from pathlib import Path

from support import guest as G


class EchoGuest(G.Guest):
    """A "guest" that prints one mark and exits: Python in QEMU's place."""

    def argv(self) -> list[str]:
        return [sys.executable, "-c", "print('@@ PROBE ok')"]


def test_a_guest_without_a_console_file_removes_the_one_it_made():
    g = EchoGuest(G.Kernel(Path("/nonexistent/vmlinuz"), Path("/nonexistent/modules")), Path("/nonexistent"))
    g.start()
    try:
        assert g.wait("PROBE", timeout=30) == "ok"
        made = g.log_path
        assert made is not None and made.exists()
    finally:
        g.stop()
    assert not made.exists()


def test_a_console_file_the_caller_named_is_kept(tmp_path):
    log = tmp_path / "console.log"
    g = EchoGuest(G.Kernel(Path("/nonexistent/vmlinuz"), Path("/nonexistent/modules")), Path("/nonexistent"),
                  log_path=log)
    g.start()
    try:
        assert g.wait("PROBE", timeout=30) == "ok"
    finally:
        g.stop()
    assert "@@ PROBE ok" in log.read_text()
