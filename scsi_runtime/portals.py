"""Portal addresses as the configuration and the command lines write them."""
from __future__ import annotations

import re


def parse_portal(value: str) -> tuple[str, int, int]:
    """(host, port, tpgt) of "HOST:PORT[,TPGT]", "[V6ADDR]:PORT[,TPGT]" or "HOST"
    (port 3260, TPGT 1); IPv6 is never split on ':'. Raises ValueError."""
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.%\w]+)\]|([^:\[\],]+))(?::(\d+))?(?:,(\d+))?", value.strip())
    if not m:
        raise ValueError(f"portal {value!r} is not HOST:PORT[,TPGT] or [IPv6]:PORT[,TPGT]")
    port = int(m.group(3) or 3260)
    tpgt = int(m.group(4) or 1)
    if port > 65535 or not 1 <= tpgt <= 65534:   # (65535 names tag 0's SCSI port: stml.ops)
        raise ValueError(f"portal {value!r}: port out of 0-65535 or TPGT out of 1-65534")
    return m.group(1) or m.group(2), port, tpgt

