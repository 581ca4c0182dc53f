"""The event loop every process runs on."""
from __future__ import annotations

import asyncio
import os
from typing import Any


def run_loop(main: Any) -> Any:
    """asyncio.run, on uvloop when it is installed (a faster event loop for both
    the STML and front ends; optional: `pip install uvloop`), unless
    SCSI_TARGET_LOOP=asyncio asks for the standard one."""
    try:
        if os.environ.get("SCSI_TARGET_LOOP") == "asyncio":
            raise ImportError
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)

