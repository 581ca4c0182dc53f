"""CHAP for iSCSI (RFC 1994, RFC 7143 §12.1.3), one-way and mutual.

Pure functions plus a small target-side exchange object.  Secrets live in
:class:`Secret`, whose repr and str never show the bytes, and no exception
here ever includes a secret or a computed response.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# CHAP_A values: IANA "PPP Authentication Algorithms" numbers.
ALGORITHMS: dict[int, str] = {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}
DEFAULT_PREFERENCE = (8, 7, 6, 5)  # strongest first; we pick from the initiator's order
MAX_CHALLENGE = 1024  # RFC 7143: CHAP_C longer than this is refused


class ChapError(Exception):
    """Authentication failed or the exchange was malformed (no secrets inside)."""


class Secret:
    """Secret bytes that never show up in repr, str or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes):
        self._value = value.encode() if isinstance(value, str) else bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(Secret)


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    secret: Secret

    def __post_init__(self):
        if not isinstance(self.secret, Secret):
            object.__setattr__(self, "secret", Secret(self.secret))


def decode_binary(text: str) -> bytes:
    """Bytes of an RFC 7143 binary value: ``0x`` hex or ``0b`` base64."""
    prefix, body = text[:2].lower(), text[2:]
    try:
        if prefix == "0x":
            if len(body) % 2:
                body = "0" + body
            data = bytes.fromhex(body)
        elif prefix == "0b":
            data = base64.b64decode(body, validate=True)
        else:
            raise ChapError("binary value must start with 0x or 0b")
    except (ValueError, binascii.Error):
        raise ChapError("malformed binary value") from None
    if not data:
        raise ChapError("empty binary value")
    return data


def encode_binary(data: bytes, use_base64: bool = False) -> str:
    """``0x`` hex (what every initiator reads) or ``0b`` base64."""
    return "0b" + base64.b64encode(data).decode() if use_base64 else "0x" + data.hex()


def response(algorithm: int, identifier: int, secret: Secret, challenge: bytes) -> bytes:
    """CHAP response: H(identifier octet || secret || challenge)."""
    h = hashlib.new(ALGORITHMS[algorithm])
    h.update(bytes((identifier,)))
    h.update(secret.reveal())
    h.update(challenge)
    return h.digest()


def verify(algorithm: int, identifier: int, secret: Secret, challenge: bytes,
           received: bytes) -> bool:
    """Constant-time check of a received CHAP response."""
    return hmac.compare_digest(response(algorithm, identifier, secret, challenge), received)


def choose_algorithm(offered: str, allowed: tuple[int, ...] = DEFAULT_PREFERENCE) -> int | None:
    """First CHAP_A value in the initiator's list that we allow."""
    for item in offered.split(","):
        if item.isdigit() and int(item) in allowed:
            return int(item)
    return None


def challenge_length(algorithm: int) -> int:
    """At least the digest size and never under 16 bytes."""
    return max(16, hashlib.new(ALGORITHMS[algorithm]).digest_size)


class TargetChap:
    """Target side of one CHAP exchange.

    ``offer(CHAP_A)`` answers the initiator's algorithm list with CHAP_A,
    CHAP_I, CHAP_C; ``check(keys)`` verifies CHAP_N/CHAP_R and, for mutual
    CHAP, answers CHAP_I/CHAP_C with CHAP_N/CHAP_R.  Failures raise ChapError.
    """

    def __init__(self, initiator: Credentials, target: Credentials | None = None,
                 allowed: tuple[int, ...] = DEFAULT_PREFERENCE,
                 random: Callable[[int], bytes] = _secrets.token_bytes):
        self._initiator = initiator
        self._target = target
        self._allowed = allowed
        self._random = random
        self.algorithm: int | None = None
        self._identifier = 0
        self._challenge = b""

    def offer(self, chap_a: str) -> list[tuple[str, str]]:
        algorithm = choose_algorithm(chap_a, self._allowed)
        if algorithm is None:
            raise ChapError("no acceptable CHAP algorithm offered")
        self.algorithm = algorithm
        self._identifier = self._random(1)[0]
        self._challenge = self._random(challenge_length(algorithm))
        return [("CHAP_A", str(algorithm)), ("CHAP_I", str(self._identifier)),
                ("CHAP_C", encode_binary(self._challenge))]

    def check(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        if self.algorithm is None:
            raise ChapError("CHAP response before challenge")
        name, received = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or received is None:
            raise ChapError("CHAP_N and CHAP_R are required")
        if not hmac.compare_digest(name.encode(), self._initiator.user.encode()):
            raise ChapError("unknown CHAP user")
        if not verify(self.algorithm, self._identifier, self._initiator.secret,
                      self._challenge, decode_binary(received)):
            raise ChapError("CHAP response does not match")
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        return self._mutual(keys.get("CHAP_I"), keys.get("CHAP_C"))

    def _mutual(self, chap_i: str | None, chap_c: str | None) -> list[tuple[str, str]]:
        if self._target is None:
            raise ChapError("mutual CHAP requested but not configured")
        if chap_i is None or chap_c is None:
            raise ChapError("CHAP_I and CHAP_C must come together")
        if not chap_i.isdigit() or int(chap_i) > 255:
            raise ChapError("malformed CHAP_I")
        challenge = decode_binary(chap_c)
        if len(challenge) > MAX_CHALLENGE:
            raise ChapError("CHAP_C too long")
        if hmac.compare_digest(challenge, self._challenge):
            raise ChapError("reflected CHAP challenge")
        if hmac.compare_digest(self._target.secret.reveal(), self._initiator.secret.reveal()):
            raise ChapError("mutual CHAP secrets must differ")
        algorithm = self.algorithm
        assert algorithm is not None   # check() refuses a response before our challenge
        answer = response(algorithm, int(chap_i), self._target.secret, challenge)
        return [("CHAP_N", self._target.user), ("CHAP_R", encode_binary(answer))]
