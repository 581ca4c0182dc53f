"""CRC32C digests and segment padding (RFC 7143 §11.1, Appendix B.4).

iSCSI puts the standard CRC32C value on the wire least-significant byte first
(RFC 3720 B.4 lists 32 zero bytes -> ``aa 36 91 8a``), as Linux and libiscsi do.
"""

from __future__ import annotations

from collections.abc import Iterable

import crc32c as _crc32c

_crc = _crc32c.crc32c
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")

DIGEST_LEN = 4


def crc32c(*bufs) -> int:
    """CRC32C of the concatenation of ``bufs`` without concatenating them."""
    value = 0
    for buf in bufs:
        value = _crc(buf, value)
    return value


def digest(*bufs) -> bytes:
    """The 4 wire bytes of the digest over ``bufs`` (little-endian)."""
    return crc32c(*bufs).to_bytes(4, "little")


def padding(length: int) -> bytes:
    """The zero padding that follows a segment of ``length`` bytes."""
    return _PADS[length & 3]


def check(expected: bytes | memoryview, bufs: Iterable) -> bool:
    """True if ``expected`` (4 wire bytes) is the digest over ``bufs``."""
    return bytes(expected) == digest(*bufs)
