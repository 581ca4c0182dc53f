"""Waiting inside a test's event loop for what another task brings about."""
from __future__ import annotations

import asyncio
from typing import Any


async def until(cond: Any, what: str, timeout: float = 10) -> None:
    """Return once cond() is true, polling between loop turns; fail naming
    `what` after `timeout` seconds (a bound for a broken build, not a measure)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)
