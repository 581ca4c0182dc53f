"""Login/Text key negotiation (RFC 7143 §6.2, §13), as a table plus one engine.

Each key's rule (result function, stage, scope, range, default, when it is
irrelevant) is a row in :data:`KEYS`; :class:`Negotiator` applies the rows to
what an initiator offers and answers the way RFC 7143 requires.  Keys that
the login machine owns (names, SessionType, CHAP_*) pass through untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Kind(Enum):
    AND = "boolean-and"
    OR = "boolean-or"
    MIN = "numeric-min"
    MAX = "numeric-max"
    LIST = "list"
    DECLARE = "declarative"  # each side states its own value; no answer
    NUM_DECLARE = "numeric-declarative"
    AUTH = "authentication"  # CHAP_* values, handled by the login machine
    OBSOLETE = "obsolete"  # RFC 3720 marker intervals: answered Irrelevant


class Stage(Enum):
    SECURITY = "security"  # only in the security stage
    OPERATIONAL = "operational"  # during login (security or operational stage)
    ANY = "any"  # login and full feature phase
    FULL_FEATURE = "full-feature"  # Text requests only


class Scope(Enum):
    SESSION = "session"
    CONNECTION = "connection"


class Sender(Enum):
    INITIATOR = "initiator"
    TARGET = "target"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    kind: Kind
    stage: Stage
    scope: Scope = Scope.SESSION
    sender: Sender = Sender.BOTH
    default: object = None
    lo: int = 0
    hi: int = 0
    values: tuple[str, ...] = ()  # legal values of a list key
    leading_only: bool = False
    discovery_irrelevant: bool = False
    attr: str | None = None  # field in TargetKeys and SessionParams/ConnectionParams


_MAXLEN = 2**24 - 1
_K, _S, _C = Kind, Stage, Scope


def _neg(name, kind, attr, default, lo=0, hi=0, values=(), scope=_C.SESSION, lead=True,
         disc=True):
    return Key(name, kind, _S.OPERATIONAL, scope, Sender.BOTH, default, lo, hi, values, lead,
               disc, attr)


# Order matters: InitialR2T/ImmediateData/MaxBurstLength before FirstBurstLength,
# whose answer depends on them.
KEYS: dict[str, Key] = {k.name: k for k in (
    _neg("HeaderDigest", _K.LIST, "header_digest", "None", values=("CRC32C", "None"),
         scope=_C.CONNECTION, lead=False, disc=False),
    _neg("DataDigest", _K.LIST, "data_digest", "None", values=("CRC32C", "None"),
         scope=_C.CONNECTION, lead=False, disc=False),
    _neg("MaxConnections", _K.MIN, "max_connections", 1, 1, 65535),
    Key("SendTargets", _K.DECLARE, _S.FULL_FEATURE, sender=Sender.INITIATOR),
    Key("TargetName", _K.DECLARE, _S.ANY),
    Key("InitiatorName", _K.DECLARE, _S.OPERATIONAL, sender=Sender.INITIATOR),
    Key("TargetAlias", _K.DECLARE, _S.ANY, sender=Sender.TARGET),
    Key("InitiatorAlias", _K.DECLARE, _S.ANY, sender=Sender.INITIATOR),
    Key("TargetAddress", _K.DECLARE, _S.ANY, sender=Sender.TARGET),
    Key("TargetPortalGroupTag", _K.DECLARE, _S.OPERATIONAL, sender=Sender.TARGET),
    _neg("InitialR2T", _K.OR, "initial_r2t", True),
    _neg("ImmediateData", _K.AND, "immediate_data", True),
    Key("MaxRecvDataSegmentLength", _K.NUM_DECLARE, _S.ANY, _C.CONNECTION, Sender.BOTH, 8192,
        512, _MAXLEN, attr="max_recv_data_segment_length"),
    _neg("MaxBurstLength", _K.MIN, "max_burst_length", 262144, 512, _MAXLEN),
    _neg("FirstBurstLength", _K.MIN, "first_burst_length", 65536, 512, _MAXLEN),
    _neg("DefaultTime2Wait", _K.MAX, "default_time2wait", 2, 0, 3600, disc=False),
    _neg("DefaultTime2Retain", _K.MIN, "default_time2retain", 20, 0, 3600, disc=False),
    _neg("MaxOutstandingR2T", _K.MIN, "max_outstanding_r2t", 1, 1, 65535),
    _neg("DataPDUInOrder", _K.OR, "data_pdu_in_order", True),
    _neg("DataSequenceInOrder", _K.OR, "data_sequence_in_order", True),
    _neg("ErrorRecoveryLevel", _K.MIN, "error_recovery_level", 0, 0, 2, disc=False),
    Key("SessionType", _K.DECLARE, _S.OPERATIONAL, sender=Sender.INITIATOR,
        values=("Discovery", "Normal"), leading_only=True),
    Key("AuthMethod", _K.LIST, _S.SECURITY, _C.CONNECTION, default="None",
        values=("KRB5", "SPKM1", "SPKM2", "SRP", "CHAP", "None"), attr="auth_method"),
    *(Key(n, _K.AUTH, _S.SECURITY, _C.CONNECTION)
      for n in ("CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R")),
    _neg("OFMarker", _K.AND, "of_marker", False, scope=_C.CONNECTION, lead=False, disc=False),
    _neg("IFMarker", _K.AND, "if_marker", False, scope=_C.CONNECTION, lead=False, disc=False),
    Key("OFMarkInt", _K.OBSOLETE, _S.OPERATIONAL, _C.CONNECTION),
    Key("IFMarkInt", _K.OBSOLETE, _S.OPERATIONAL, _C.CONNECTION),
    _neg("TaskReporting", _K.LIST, "task_reporting", "RFC3720",
         values=("RFC3720", "ResponseFence", "FastAbort")),
    _neg("iSCSIProtocolLevel", _K.MIN, "iscsi_protocol_level", 0, 0, 31),
)}

# Keys whose value the login machine interprets itself.
LOGIN_KEYS = frozenset(("TargetName", "InitiatorName", "InitiatorAlias", "SessionType"))

RESERVED_VALUES = frozenset(("Reject", "Irrelevant", "NotUnderstood"))


@dataclass(frozen=True, slots=True)
class TargetKeys:
    """What this target will accept; lists are in order of preference."""

    header_digest: tuple[str, ...] = ("None", "CRC32C")
    data_digest: tuple[str, ...] = ("None", "CRC32C")
    max_connections: int = 1
    initial_r2t: bool = False
    immediate_data: bool = True
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 262144
    first_burst_length: int = 262144
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    task_reporting: tuple[str, ...] = ("RFC3720",)
    iscsi_protocol_level: int = 1
    of_marker: bool = False
    if_marker: bool = False

    def __post_init__(self):
        for key in KEYS.values():
            if key.kind in (Kind.MIN, Kind.MAX, Kind.NUM_DECLARE) and key.attr in _FIELDS:
                value = getattr(self, key.attr)
                if not key.lo <= value <= key.hi:
                    raise ValueError(f"{key.attr}: {value} outside {key.lo}..{key.hi}")
            elif key.kind is Kind.LIST and key.attr in _FIELDS:
                value = getattr(self, key.attr)
                if not value or not set(value) <= set(key.values):
                    raise ValueError(f"{key.attr}: values must be among {key.values}")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("first_burst_length exceeds max_burst_length")


_FIELDS = frozenset(f.name for f in dataclasses.fields(TargetKeys))
_NEGOTIATED = (Kind.AND, Kind.OR, Kind.MIN, Kind.MAX, Kind.LIST)


@dataclass(frozen=True, slots=True)
class SessionParams:
    """Session-wide results of negotiation (defaults are the RFC's)."""

    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    task_reporting: str = "RFC3720"
    iscsi_protocol_level: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionParams:
    """Per-connection results: digests, and the two directions' segment limits."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192  # ours: largest segment we accept
    max_send_data_segment_length: int = 8192  # the initiator's: largest we may send


class NegotiationError(Exception):
    """A protocol error in the offered keys; the login fails with Initiator Error."""


def parse_number(text: str) -> int | None:
    """Decimal or 0x-hex numeric value, or None when malformed."""
    if text[:2] in ("0x", "0X"):
        digits, base = text[2:], 16
    else:
        digits, base = text, 10
    if not digits or not digits.isascii() or not digits.isalnum():
        return None
    try:
        return int(digits, base)
    except ValueError:
        return None


def _yes_no(value: bool) -> str:
    return "Yes" if value else "No"


def _parse_bool(text: str) -> bool | None:
    return {"Yes": True, "No": False}.get(text)


def _combine(key: Key, offered, ours):
    """Result of a negotiation between an offered and our (parsed) value."""
    if key.kind is Kind.AND:
        return offered and ours
    if key.kind is Kind.OR:
        return offered or ours
    if key.kind is Kind.MIN:
        return min(offered, ours)
    if key.kind is Kind.MAX:
        return max(offered, ours)
    return next((v for v in offered if v in ours), None)  # LIST


def _parse(key: Key, text: str):
    """Parsed value of ``text`` for ``key``, or None when it is not legal."""
    if key.kind in (Kind.AND, Kind.OR):
        return _parse_bool(text)
    if key.kind in (Kind.MIN, Kind.MAX, Kind.NUM_DECLARE):
        n = parse_number(text)
        return n if n is not None and key.lo <= n <= key.hi else None
    if key.kind is Kind.LIST:
        items = tuple(text.split(","))
        return None if not all(items) or RESERVED_VALUES & set(items) else items
    return text


def _format(key: Key, value) -> str:
    if key.kind in (Kind.AND, Kind.OR):
        return _yes_no(value)
    return str(value)


class Negotiator:
    """Answers an initiator's keys for one connection's login (or a Text
    exchange), remembering results across PDUs.

    ``ours`` is what the target accepts; ``auth_methods`` what AuthMethod may
    agree to (the login machine sets it once the target is known).
    """

    def __init__(self, ours: TargetKeys, *, leading: bool = True,
                 auth_methods: tuple[str, ...] = ("None",)):
        self.ours = ours
        self.leading = leading
        self.auth_methods = auth_methods
        self.discovery = False
        self.results: dict[str, Any] = {}   # as each key's kind has it: bool, int or str
        self.declared: dict[str, Any] = {}  # the initiator's declarative values (str, or int)
        self._seen: set[str] = set()
        self._offered: dict[str, Any] = {}  # our offers awaiting an answer (as _our_value)
        self._declared_ours = False

    def _our_value(self, key: Key):
        if key.name == "AuthMethod":
            return self.auth_methods
        attr = key.attr
        assert attr is not None   # every negotiated key has its field in TargetKeys
        return getattr(self.ours, attr)

    def _irrelevant(self, key: Key) -> bool:
        if (key.discovery_irrelevant and self.discovery) or (key.leading_only and not self.leading):
            return True
        if key.name == "FirstBurstLength":
            return self.results.get("InitialR2T", True) and not self.results.get(
                "ImmediateData", True)
        return False

    def negotiate(self, pairs, stage: Stage = Stage.OPERATIONAL) -> list[tuple[str, str]]:
        """Answers to ``pairs`` offered in ``stage`` (SECURITY or OPERATIONAL
        during login, FULL_FEATURE for a Text request).  CHAP_* and the keys in
        :data:`LOGIN_KEYS` get no answer here."""
        ordered = sorted(pairs, key=lambda kv: _ORDER.get(kv[0], len(_ORDER)))
        answers = []
        for name, value in ordered:
            if name in self._seen and name not in self._offered:
                raise NegotiationError(f"key {name} offered twice")
            self._seen.add(name)
            key = KEYS.get(name)
            if key is None:
                answers.append((name, "NotUnderstood"))
                continue
            if key.kind is Kind.AUTH or name in LOGIN_KEYS:
                if key.kind is Kind.AUTH and stage is not Stage.SECURITY:
                    raise NegotiationError(f"{name} outside the security stage")
                self.declared[name] = value
                continue
            if name in self._offered:
                self._take_answer(key, value)
                continue
            answer = self._answer(key, value, stage)
            if answer is not None:
                answers.append((name, answer))
        return answers

    def _answer(self, key: Key, value: str, stage: Stage) -> str | None:
        if key.stage is Stage.SECURITY and stage is not Stage.SECURITY:
            raise NegotiationError(f"{key.name} outside the security stage")
        if key.sender is Sender.TARGET:
            return "Irrelevant"
        if key.stage is Stage.FULL_FEATURE and stage is not Stage.FULL_FEATURE:
            return "Irrelevant"
        if stage is Stage.FULL_FEATURE and key.stage is not Stage.ANY:
            return "Reject"  # login-only keys cannot be renegotiated in a Text request
        if key.kind is Kind.OBSOLETE:
            return "Irrelevant"
        if key.kind is Kind.DECLARE:
            self.declared[key.name] = value
            return None
        if self._irrelevant(key):
            return "Irrelevant"
        offered = _parse(key, value)
        if offered is None:
            return "Reject"
        if key.kind is Kind.NUM_DECLARE:
            self.declared[key.name] = offered
            return None
        result = _combine(key, offered, self._our_value(key))
        if key.name == "FirstBurstLength":
            result = min(result, self.results.get("MaxBurstLength", self.ours.max_burst_length))
        if result is None:
            return "Reject"
        self.results[key.name] = result
        return _format(key, result)

    def _take_answer(self, key: Key, value: str) -> None:
        """The initiator's answer to a key we offered: keep the default unless
        it is a legal result of the negotiation."""
        ours = self._offered.pop(key.name)
        answer = _parse(key, value)
        if answer is None:
            return
        if key.kind is Kind.LIST:
            answer = answer[0] if answer[0] in ours else None
        elif _combine(key, answer, ours) != answer:
            answer = None
        if answer is not None:
            self.results[key.name] = answer

    def offers(self) -> list[tuple[str, str]]:
        """Keys the target must send itself, once: its MaxRecvDataSegmentLength
        declaration, and any key whose default it cannot live with and that the
        initiator has not negotiated (e.g. ImmediateData=No on our side)."""
        out = []
        if not self._declared_ours:
            self._declared_ours = True
            out.append(("MaxRecvDataSegmentLength", str(self.ours.max_recv_data_segment_length)))
        for key in KEYS.values():
            if (key.kind not in _NEGOTIATED or key.attr not in _FIELDS or key.name in self._seen
                    or self._irrelevant(key)):
                continue
            ours = self._our_value(key)
            default = (key.default,) if key.kind is Kind.LIST else key.default
            result = _combine(key, default, ours)
            if result != key.default:
                self._seen.add(key.name)
                self._offered[key.name] = ours
                out.append((key.name, ",".join(ours) if key.kind is Kind.LIST
                            else _format(key, ours)))
        return out

    @property
    def awaiting_answers(self) -> bool:
        """True while an offer of ours is unanswered: the target must not
        leave the stage yet."""
        return bool(self._offered)

    def session_params(self) -> SessionParams:
        return _params(SessionParams, self.results)

    def connection_params(self) -> ConnectionParams:
        return ConnectionParams(
            header_digest=self.results.get("HeaderDigest") == "CRC32C",
            data_digest=self.results.get("DataDigest") == "CRC32C",
            max_recv_data_segment_length=self.ours.max_recv_data_segment_length,
            max_send_data_segment_length=self.declared.get("MaxRecvDataSegmentLength", 8192),
        )


_ORDER = {name: i for i, name in enumerate(KEYS)}


def _params(cls, results: dict[str, object]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{attr: v for k, v in results.items() if (attr := KEYS[k].attr) in names})


__all__ = ["KEYS", "Key", "Kind", "Stage", "Scope", "Sender", "TargetKeys", "SessionParams",
           "ConnectionParams", "Negotiator", "NegotiationError", "parse_number"]
