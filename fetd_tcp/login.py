"""Sans-IO iSCSI login state machine (RFC 7143 §6, §11.12-11.13) and SendTargets.

One :class:`LoginMachine` per connection.  Feed it each Login Request header
and its (complete, unpadded) data segment; it answers with an event:

* :class:`Send` — a Login Response to send; the login continues.
* :class:`Decide` — negotiation is over.  The caller checks the session side
  (allocate a TSIH for a new session, find the session for TSIH != 0, count
  connections) and calls :meth:`LoginMachine.accept` or :meth:`LoginMachine.refuse`.
* :class:`Complete` — the final response; after sending it the connection is
  in the full feature phase with ``outcome``.
* :class:`Fail` — a failure response; send it and close the connection.
"""

from __future__ import annotations

import ipaddress
import secrets as _secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from . import chap, pdu
from .chap import ChapError, Credentials, TargetChap
from .keys import (ConnectionParams, NegotiationError, Negotiator, SessionParams, Stage,
                   TargetKeys)
from .pdu import LoginRequest, LoginResponse, PDUError
from stml.api import MAX_NAME_LEN

# Status-Class << 8 | Status-Detail (§11.13.5).
SUCCESS = 0x0000
TARGET_MOVED_TEMPORARILY = 0x0101
TARGET_MOVED_PERMANENTLY = 0x0102
INITIATOR_ERROR = 0x0200
AUTHENTICATION_FAILURE = 0x0201
AUTHORIZATION_FAILURE = 0x0202
NOT_FOUND = 0x0203
TARGET_REMOVED = 0x0204
UNSUPPORTED_VERSION = 0x0205
TOO_MANY_CONNECTIONS = 0x0206
MISSING_PARAMETER = 0x0207
CANT_INCLUDE_IN_SESSION = 0x0208
SESSION_TYPE_NOT_SUPPORTED = 0x0209
SESSION_DOES_NOT_EXIST = 0x020A
INVALID_DURING_LOGIN = 0x020B
TARGET_ERROR = 0x0300
SERVICE_UNAVAILABLE = 0x0301
OUT_OF_RESOURCES = 0x0302

MAX_LOGIN_TEXT = 65536  # accumulated C-bit text we are willing to hold
_STAGE = {pdu.STAGE_SECURITY: Stage.SECURITY, pdu.STAGE_OPERATIONAL: Stage.OPERATIONAL}
# Legal (CSG, NSG) pairs when T=1.
_TRANSITIONS = frozenset(((0, 1), (0, 3), (1, 3)))


@dataclass(frozen=True, slots=True)
class TargetConfig:
    name: str
    alias: str = ""
    allowed_initiators: frozenset[str] = frozenset()  # empty: every initiator; names in lower case
    chap: Credentials | None = None  # the initiator must prove this
    mutual_chap: Credentials | None = None  # we prove this when asked
    erl: int = 0              # the highest ErrorRecoveryLevel offered (config `error_recovery_level`)
    cmdsn_depth: int = 128    # the CmdSN window of its sessions (config `cmdsn_depth`)

    def allows(self, initiator: str) -> bool:
        """iSCSI names compare without case (RFC 3722 folds them): `acl add`
        keeps an entry in lower case, an initiator may send capitals, and the
        STML admits the nexus either way (Emulator.admitted)."""
        return not self.allowed_initiators or initiator.lower() in self.allowed_initiators


@dataclass(frozen=True, slots=True)
class LoginConfig:
    targets: tuple[TargetConfig, ...]
    portal_group_tag: int = 1
    keys: TargetKeys = field(default_factory=TargetKeys)
    discovery_chap: Credentials | None = None
    discovery_mutual_chap: Credentials | None = None
    chap_algorithms: tuple[int, ...] = chap.DEFAULT_PREFERENCE
    cmd_window: int = 32  # MaxCmdSN - ExpCmdSN + 1 given at login

    def target(self, name: str) -> TargetConfig | None:
        """The target `name` names, whatever its case (the STML keeps names in
        lower case; RFC 3722 folds case)."""
        name = name.lower()
        return next((t for t in self.targets if t.name == name), None)


@dataclass(frozen=True, slots=True)
class LoginOutcome:
    session_type: str  # "Normal" or "Discovery"
    initiator_name: str
    initiator_alias: str
    target: TargetConfig | None  # None for Discovery
    isid: bytes
    tsih: int  # as requested in Decide (0: new session); as assigned in Complete
    cid: int
    cmd_sn: int  # the session's next expected CmdSN
    stat_sn: int  # StatSN for the connection's next response
    exp_stat_sn: int  # the first request's: for a reinstated connection, the old one's acknowledgement
    auth_method: str
    session: SessionParams
    connection: ConnectionParams


@dataclass(frozen=True, slots=True)
class Send:
    header: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Decide:
    outcome: LoginOutcome


@dataclass(frozen=True, slots=True)
class Complete:
    header: bytes
    data: bytes
    outcome: LoginOutcome


@dataclass(frozen=True, slots=True)
class Fail:
    header: bytes
    data: bytes
    status: int
    reason: str


class _Failure(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class LoginMachine:
    """Login phase of one connection.  ``stat_sn`` is the connection's first
    StatSN (the caller picks it, e.g. at random)."""

    def __init__(self, config: LoginConfig, stat_sn: int, *,
                 random: Callable[[int], bytes] = _secrets.token_bytes):
        self.config = config
        self.stat_sn = stat_sn
        self._random = random
        self._first: LoginRequest | None = None
        self._stage = pdu.STAGE_SECURITY
        self._text = bytearray()  # C-bit fragments
        self._neg: Negotiator | None = None
        self._target: TargetConfig | None = None
        self._session_type = "Normal"
        self._auth_required = False
        self._auth_done = False
        self._chap: TargetChap | None = None
        self._creds: Credentials | None = None
        self._mutual: Credentials | None = None
        self._pending: tuple[LoginRequest, list, int] | None = None
        self._accepted: LoginRequest | None = None   # the request accept() answered
        self._finished = False

    # -- public --------------------------------------------------------------

    def receive(self, req: LoginRequest, data: bytes) -> Send | Decide | Fail:
        if self._finished or self._pending is not None:
            return self._fail(req, INITIATOR_ERROR, "login request after the login ended")
        try:
            return self._receive(req, bytes(data))
        except _Failure as f:
            return self._fail(req, f.status, f.reason)

    def accept(self, tsih: int) -> Complete:
        """Finish a login that ended in :class:`Decide`; ``tsih`` is the
        session's (new or existing) TSIH."""
        pending = self._pending
        assert pending is not None, "accept() without a Decide"
        req, pairs, nsg = pending
        self._pending = None
        self._finished = True
        self._accepted = req
        header, data = self._response(req, pairs, transit=True, nsg=nsg, tsih=tsih)
        outcome = replace(self._outcome(req), tsih=tsih, stat_sn=self.stat_sn)
        return Complete(header, data, outcome)

    def refuse(self, status: int, reason: str = "") -> Fail:
        """End a login that ended in :class:`Decide` with a failure status."""
        pending = self._pending
        assert pending is not None, "refuse() without a Decide"
        req = pending[0]
        self._pending = None
        return self._fail(req, status, reason or f"refused with status 0x{status:04x}")

    def withdraw(self, status: int, reason: str) -> Fail:
        """Fail a login accept() finished whose response is not sent: the
        session it made cannot be used after all (the STML refused its nexus)."""
        req = self._accepted
        assert req is not None, "withdraw() without accept()"
        return self._fail(req, status, reason)

    # -- the stages ----------------------------------------------------------

    def _receive(self, req: LoginRequest, data: bytes) -> Send | Decide:
        self._check_header(req)
        if req.cont:
            if req.transit:
                raise _Failure(INITIATOR_ERROR, "T and C both set")
            self._buffer(data)
            return Send(*self._response(req, [], transit=False, nsg=0))
        self._buffer(data)
        text, self._text = bytes(self._text), bytearray()
        try:
            pairs = pdu.decode_text(text)
        except PDUError as e:
            raise _Failure(INITIATOR_ERROR, e.reason) from None
        first = self._neg is None
        if first:
            self._start(req, pairs)
        neg = self._neg
        assert neg is not None   # made by _start
        stage = _STAGE[req.csg]
        try:
            answers = neg.negotiate(pairs, stage)
        except NegotiationError as e:
            raise _Failure(INITIATOR_ERROR, str(e)) from None
        if first and self._session_type == "Normal":
            answers.append(("TargetPortalGroupTag", str(self.config.portal_group_tag)))
            target = self._target
            assert target is not None   # _start found it, or the login failed
            if target.alias:
                answers.append(("TargetAlias", target.alias))
        if req.csg == pdu.STAGE_SECURITY:
            answers += self._security(dict(pairs))
        return self._advance(req, answers)

    def _check_header(self, req: LoginRequest) -> None:
        first = self._first
        if first is None:
            self._first = req
            if req.version_min > 0:
                raise _Failure(UNSUPPORTED_VERSION, "only version 0 is supported")
            if req.csg not in _STAGE:
                raise _Failure(INITIATOR_ERROR, "first login request must be in a login stage")
            self._stage = req.csg
            return
        if (req.isid, req.tsih, req.cid, req.cmd_sn) != (first.isid, first.tsih, first.cid,
                                                         first.cmd_sn):
            raise _Failure(INITIATOR_ERROR, "ISID, TSIH, CID or CmdSN changed during login")
        if req.exp_stat_sn != self.stat_sn:
            raise _Failure(INITIATOR_ERROR, "ExpStatSN does not acknowledge our last response")
        if req.csg != self._stage:
            raise _Failure(INITIATOR_ERROR, "CSG does not match the current stage")

    def _buffer(self, data: bytes) -> None:
        if len(self._text) + len(data) > MAX_LOGIN_TEXT:
            raise _Failure(OUT_OF_RESOURCES, "login text too long")
        self._text += data

    def _start(self, req: LoginRequest, pairs: list[tuple[str, str]]) -> None:
        """First complete text: names, session type, target and ACL."""
        keys = dict(pairs)
        initiator = keys.get("InitiatorName")
        if not initiator:
            raise _Failure(MISSING_PARAMETER, "InitiatorName missing")
        if len(initiator.encode()) > MAX_NAME_LEN:   # it flows into logs, metrics and keys
            raise _Failure(INITIATOR_ERROR, f"InitiatorName longer than {MAX_NAME_LEN} bytes")
        self._session_type = keys.get("SessionType", "Normal")
        if self._session_type not in ("Normal", "Discovery"):
            raise _Failure(SESSION_TYPE_NOT_SUPPORTED, "unknown SessionType")
        cfg = self.config
        if self._session_type == "Discovery":
            if req.tsih:
                raise _Failure(INITIATOR_ERROR, "discovery sessions have one connection")
            creds, self._mutual = cfg.discovery_chap, cfg.discovery_mutual_chap
        else:
            name = keys.get("TargetName")
            if not name:
                raise _Failure(MISSING_PARAMETER, "TargetName missing")
            self._target = cfg.target(name)
            if self._target is None:
                raise _Failure(NOT_FOUND, "unknown target")
            if not self._target.allows(initiator):
                raise _Failure(AUTHORIZATION_FAILURE, "initiator not allowed")
            creds, self._mutual = self._target.chap, self._target.mutual_chap
        self._creds = creds
        self._auth_required = creds is not None
        ours = cfg.keys
        if self._target is not None:   # each target offers its own ErrorRecoveryLevel
            ours = replace(ours, error_recovery_level=self._target.erl)
        self._neg = Negotiator(ours, leading=req.tsih == 0,
                               auth_methods=("CHAP",) if creds else ("None",))
        self._neg.discovery = self._session_type == "Discovery"

    def _security(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """AuthMethod result and the CHAP exchange."""
        neg = self._neg
        assert neg is not None   # made by _start, before any stage is handled
        method = neg.results.get("AuthMethod")
        if "AuthMethod" in keys and method is None:
            raise _Failure(AUTHENTICATION_FAILURE, "no acceptable AuthMethod")
        if method == "None":
            self._auth_done = True
        has_chap = any(k.startswith("CHAP_") for k in keys)
        if method != "CHAP" or not has_chap:
            if has_chap:
                raise _Failure(INITIATOR_ERROR, "CHAP keys without AuthMethod=CHAP")
            return []
        try:
            if self._chap is None:
                if "CHAP_A" not in keys:
                    raise ChapError("expected CHAP_A")
                creds = self._creds
                assert creds is not None   # AuthMethod=CHAP is agreed only with credentials
                self._chap = TargetChap(creds, self._mutual, self.config.chap_algorithms,
                                        self._random)
                return self._chap.offer(keys["CHAP_A"])
            if self._auth_done:
                raise ChapError("CHAP keys after authentication")
            answers = self._chap.check(keys)
        except ChapError as e:
            raise _Failure(AUTHENTICATION_FAILURE, str(e)) from None
        self._auth_done = True
        return answers

    def _advance(self, req: LoginRequest, answers: list) -> Send | Decide:
        """Apply the transit rules and build the response or the decision."""
        neg = self._neg
        assert neg is not None   # made by _start
        if req.transit and (req.csg, req.nsg) not in _TRANSITIONS:
            raise _Failure(INITIATOR_ERROR, "illegal stage transition")
        if req.csg == pdu.STAGE_OPERATIONAL and self._auth_required and not self._auth_done:
            raise _Failure(AUTHENTICATION_FAILURE, "authentication required")
        transit, nsg = req.transit, req.nsg
        if req.csg == pdu.STAGE_SECURITY and transit and not self._auth_done:
            started = "AuthMethod" in neg.results
            if self._auth_required and not started:
                raise _Failure(AUTHENTICATION_FAILURE, "authentication required")
            if started:
                transit = False  # the CHAP exchange is still going
            else:
                self._auth_done = True  # nothing offered, nothing required
        if req.csg == pdu.STAGE_OPERATIONAL or (transit and nsg == pdu.STAGE_FULL_FEATURE):
            answers += neg.offers()
            if neg.awaiting_answers and transit:
                if req.csg == pdu.STAGE_SECURITY:
                    nsg = pdu.STAGE_OPERATIONAL  # the initiator answers our offers there
                else:
                    transit = False
        if transit and nsg == pdu.STAGE_FULL_FEATURE:
            self._pending = (req, answers, nsg)
            return Decide(self._outcome(req))
        if transit:
            self._stage = nsg
        return Send(*self._response(req, answers, transit=transit, nsg=nsg if transit else 0))

    # -- building ------------------------------------------------------------

    def _response(self, req: LoginRequest, pairs: list, *, transit: bool, nsg: int,
                  tsih: int | None = None, status: int = SUCCESS) -> tuple[bytes, bytes]:
        data = pdu.encode_text(pairs)
        header = LoginResponse(
            itt=req.itt, isid=req.isid, tsih=req.tsih if tsih is None else tsih,
            stat_sn=self.stat_sn, exp_cmd_sn=req.cmd_sn,
            max_cmd_sn=(req.cmd_sn + self.window - 1) & 0xFFFFFFFF,
            csg=req.csg, nsg=nsg, transit=transit, status_class=status >> 8,
            status_detail=status & 0xFF, data_length=len(data)).encode()
        self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF
        return header, data

    @property
    def window(self) -> int:
        """The CmdSN window given at login: the target's, once it is known."""
        t = self._target
        return min(self.config.cmd_window, t.cmdsn_depth) if t is not None else self.config.cmd_window

    def _fail(self, req: LoginRequest, status: int, reason: str) -> Fail:
        self._finished = True
        header, data = self._response(req, [], transit=False, nsg=0, status=status)
        return Fail(header, data, status, reason)

    def _outcome(self, req: LoginRequest) -> LoginOutcome:
        neg = self._neg
        assert neg is not None   # made by _start
        return LoginOutcome(
            session_type=self._session_type,
            # names compare without case (RFC 3722 maps them to lower case): one spelling for
            # the session's identity, its reinstatement and its nexus (decision 0214)
            initiator_name=neg.declared.get("InitiatorName", "").lower(),
            initiator_alias=neg.declared.get("InitiatorAlias", ""),
            target=self._target, isid=req.isid, tsih=req.tsih, cid=req.cid,
            cmd_sn=req.cmd_sn, stat_sn=self.stat_sn,
            exp_stat_sn=(self._first or req).exp_stat_sn,
            auth_method=neg.results.get("AuthMethod", "None"),
            session=neg.session_params(), connection=neg.connection_params())


# -- discovery -----------------------------------------------------------------

_WILDCARDS = frozenset(("", "0.0.0.0", "::", "*"))


def format_address(host: str, port: int, tpgt: int) -> str:
    """TargetAddress value: ``host:port,tpgt`` with IPv6 in brackets."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        ip = None  # a DNS name
    if ip is not None and ip.version == 6:
        if ip.ipv4_mapped is not None:
            host = str(ip.ipv4_mapped)
        else:
            host = f"[{host}]"
    return f"{host}:{port},{tpgt}"


def send_targets(value: str, initiator_name: str, targets: Iterable[TargetConfig],
                 portals_by_tpgt: Mapping[int, Sequence[tuple[str, int]]],
                 local_addr: tuple[str, int], *, discovery: bool = True,
                 session_target: str | None = None) -> list[tuple[str, str]]:
    """Text response pairs for ``SendTargets=value``: TargetName then its
    TargetAddress lines, for the targets this initiator may see.  In a
    Normal session only the session's own target (an empty value or its
    name; "All" is reserved, RFC 7143 Appendix C), so a session opened
    without discovery CHAP tells no more than its login did (decision 0212).
    Wildcard-bound portals report ``local_addr``, the address the
    connection arrived on."""
    wanted: tuple[str, ...] | None
    if not discovery:
        own = session_target or ""
        wanted = (own,) if own and value.lower() in ("", own) else ()
    elif value == "All":
        wanted = None
    else:
        wanted = (value.lower(),)    # names fold case (RFC 3722); ours are kept in lower case
    out = []
    for target in targets:
        if wanted is not None and target.name not in wanted:
            continue
        if not target.allows(initiator_name):
            continue
        out.append(("TargetName", target.name))
        for tpgt, portals in sorted(portals_by_tpgt.items()):
            for host, port in portals:
                told = advertised(host, local_addr[0])
                if told is not None:
                    out.append(("TargetAddress", format_address(told, port, tpgt)))
    return out


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` spells (an IPv4-mapped one as IPv4), None for a DNS name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def advertised(host: str, local: str) -> str | None:
    """How a portal bound to `host` is named to an initiator whose connection
    came to our address `local`, or None when that initiator cannot use it:
    a wildcard portal by `local` when it listens there (0.0.0.0 takes IPv4,
    :: IPv6 only: asyncio binds it IPV6_V6ONLY); a loopback portal only over
    loopback, since elsewhere 127.0.0.1 names the initiator's own host."""
    here = _ip(local)
    if host in _WILDCARDS:
        if here is None:
            return local
        # :: took this connection itself when `local` is IPv6 (an IPv4-mapped one too)
        came_v6 = ":" in local
        if host == "0.0.0.0" and here.version != 4 or host == "::" and not came_v6:
            return None
        return local
    bound = _ip(host)
    if (bound is not None and bound.is_loopback or host == "localhost") and not (here and here.is_loopback):
        return None
    return host


def fit_targets(pairs: Sequence[tuple[str, str]], max_bytes: int) -> tuple[list[tuple[str, str]], int]:
    """The leading targets of a SendTargets answer (each TargetName with its
    TargetAddress lines) whose text fits in `max_bytes`, and how many targets
    were left out: an answer has a bound whatever the configuration holds."""
    groups: list[list[tuple[str, str]]] = []
    for pair in pairs:
        if pair[0] == "TargetName" or not groups:
            groups.append([])
        groups[-1].append(pair)
    out: list[tuple[str, str]] = []
    size = 0
    for i, group in enumerate(groups):
        size += sum(len(k) + len(v.encode()) + 2 for k, v in group)
        if size > max_bytes:
            return out, len(groups) - i
        out += group
    return out, 0
