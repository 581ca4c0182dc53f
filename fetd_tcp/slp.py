"""SLPv2 service agent (RFC 2608) for iSCSI targets (RFC 4018), without I/O.

`ServiceAgent.handle(datagram, source, local_host, multicast)` answers what a
user agent asks: SrvRqst (with an LDAPv3 predicate), AttrRqst, SrvTypeRqst,
and SrvRqst for service:service-agent (SAAdvert); a DAAdvert makes it register
with that directory agent. It returns the datagrams to send. Each target and
portal is one `service:iscsi:target://HOST:PORT/IQN` URL with the template's
attributes (iscsi-name, portal-group, transports, alias, auth-name, auth-cred).

Anything malformed is dropped (`parse` raises SlpError, which `handle` turns
into no answer; a unicast request that parses but asks for what we do not do
gets an error code). What one request costs is bounded, since anyone may send
one: a datagram is at most MAX_DATAGRAM bytes; its predicate is parsed once,
at most MAX_PREDICATE bytes, MAX_ITEMS comparisons and MAX_DEPTH deep, and
tried on at most MAX_REQUEST_COST / items services (the services and their
folded attributes are built once per change, not per request); an answer is
at most REPLY_MTU bytes (the overflow flag says when URLs were left out).
`ServiceAgent.work` counts what requests cost, for the driver's rate limit.

What it tells: targets every initiator may log in to (no ACL: those SendTargets
shows anyone), and none when discovery sessions need CHAP (SendTargets shows
nothing without it), unless `auth` (config `slp_auth = true`) also lists targets
with an ACL and says who may log in (auth-name, the ACL) and the CHAP user name
(auth-cred). Directory agents: with `das` configured only those are accepted;
else at most MAX_DAS discovered ones (a DAAdvert can come from anyone).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable

from fetd_tcp.login import advertised

SLP_PORT = 427
MULTICAST = "239.255.255.253"
MAX_DATAGRAM = 8192     # what we read; a longer request is not answered
REPLY_MTU = 1400        # an answer over UDP stays within this (RFC 2608 6.1)
MAX_DEPTH = 16          # predicate nesting
MAX_PREDICATE = 1024    # characters of predicate (RFC 4018's examples use ~200); longer: PARSE_ERROR
MAX_ITEMS = 64          # comparisons in a predicate
MAX_REQUEST_COST = 4096    # comparisons one request may cost in all (items x services tried): ~2 ms
MAX_DAS = 4             # directory agents learnt from DAAdverts when none is configured
LIFETIME = 10800        # seconds a URL is registered for with a directory agent (refreshed at half)
SERVICE_TYPE = "service:iscsi:target"

# function ids (RFC 2608 8)
SRV_RQST, SRV_RPLY, SRV_REG, SRV_DEREG, SRV_ACK = 1, 2, 3, 4, 5
ATTR_RQST, ATTR_RPLY, DA_ADVERT, SRV_TYPE_RQST, SRV_TYPE_RPLY, SA_ADVERT = 6, 7, 8, 9, 10, 11
# error codes (RFC 2608 7)
LANGUAGE_NOT_SUPPORTED, PARSE_ERROR, SCOPE_NOT_SUPPORTED = 1, 2, 4
# flags
OVERFLOW, FRESH, MCAST = 0x8000, 0x4000, 0x2000

_HDR = struct.Struct(">BB3sH3sHH")      # version, function, length, flags, next ext, XID, lang len
_U16 = struct.Struct(">H")
_URL = struct.Struct(">BHH")            # reserved, lifetime, URL length
_RESERVED = frozenset("(),\\!<=>~")       # escaped in attribute values (RFC 2608 5)


class SlpError(ValueError):
    """A datagram that is not a well-formed SLPv2 message we take."""


@dataclass(frozen=True)
class Header:
    function: int
    flags: int
    xid: int
    lang: str


# ---------------------------------------------------------------- the codec

class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise SlpError("message shorter than its fields")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def string(self) -> str:
        try:
            return self.take(self.u16()).decode("utf-8")
        except UnicodeDecodeError:
            raise SlpError("a string that is not UTF-8") from None

    def url_entry(self) -> tuple[int, str]:
        _, lifetime, n = _URL.unpack(self.take(_URL.size))
        try:
            url = self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise SlpError("a URL that is not UTF-8") from None
        for _ in range(self.take(1)[0]):     # authentication blocks: skipped
            self.take(2)
            self.take(max(0, self.u16() - 4))
        return lifetime, url


def parse(data: bytes) -> tuple[Header, list]:
    """(header, fields) of one message; the fields by function id:
    SrvRqst/AttrRqst: [PRList, service type or URL, scopes, predicate or tags, SPI];
    SrvTypeRqst: [PRList, naming authority or None (all), scopes];
    DAAdvert: [error, boot timestamp, URL, scopes]; SrvAck: [error]."""
    if len(data) < _HDR.size or len(data) > MAX_DATAGRAM:
        raise SlpError("not an SLP message length")
    version, function, length, flags, _, xid, lang_len = _HDR.unpack_from(data)
    if version != 2:
        raise SlpError(f"SLP version {version}")
    if int.from_bytes(length, "big") != len(data):
        raise SlpError("length field does not match the datagram")
    r = _Reader(data, _HDR.size)
    try:
        lang = r.take(lang_len).decode("ascii")
    except UnicodeDecodeError:
        raise SlpError("a language tag that is not ASCII") from None
    header = Header(function, flags, xid, lang)
    if function in (SRV_RQST, ATTR_RQST):
        return header, [r.string() for _ in range(5)]
    if function == SRV_TYPE_RQST:
        prlist = r.string()
        n = r.u16()
        authority = None if n == 0xFFFF else r.take(n).decode("utf-8", "replace")
        return header, [prlist, authority, r.string()]
    if function == DA_ADVERT:
        error = r.u16()
        boot = struct.unpack(">I", r.take(4))[0]
        return header, [error, boot, r.string(), r.string()]
    if function == SRV_ACK:
        return header, [r.u16()]
    raise SlpError(f"function {function} is not one a service agent takes")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return _U16.pack(len(b)) + b


def _message(function: int, xid: int, body: bytes, flags: int = 0, lang: str = "en") -> bytes:
    tag = lang.encode("ascii")
    total = _HDR.size + len(tag) + len(body)
    return _HDR.pack(2, function, total.to_bytes(3, "big"), flags, bytes(3), xid, len(tag)) + tag + body


def _url_entry(url: str, lifetime: int) -> bytes:
    b = url.encode("utf-8")
    return _URL.pack(0, lifetime, len(b)) + b + b"\0"


def escape(value: str) -> str:
    return "".join(f"\\{ord(c):02X}" if c in _RESERVED or ord(c) < 0x20 else c for c in value)


def unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and _ishex(value[i + 1:i + 3]):
            out.append(chr(int(value[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _ishex(s: str) -> bool:
    return len(s) == 2 and all(c in "0123456789abcdefABCDEF" for c in s)


# ---------------------------------------------------------------- predicates (RFC 2254 as 2608 8.1 uses it)

Attrs = dict[str, list[str]]     # tag (lower case) -> values


def matches(predicate: str, attrs: Attrs) -> bool:
    """Whether `attrs` satisfy an LDAPv3 search filter; raises SlpError when it does not parse."""
    return Predicate(predicate)(fold(attrs))


def fold(attrs: Attrs) -> Attrs:
    """Attribute values as predicates compare them (unescaped, blanks folded, lower case)."""
    return {tag: [_fold(v) for v in values] for tag, values in attrs.items()}


# a parsed filter: ("&" | "|", [nodes]), ("!", node), or (op, tag, operand): op "=", "~=",
# ">=", "<=" with the folded value, "*" (present) with None, "glob" with the folded parts
_Node = tuple


class Predicate:
    """An LDAPv3 search filter (RFC 2254 as RFC 2608 8.1 uses it), parsed once
    per request and then tried on each service's folded attributes: a request
    costs `items` comparisons per service, not a parse per service. Raises
    SlpError when it does not parse or is over MAX_PREDICATE / MAX_ITEMS."""

    def __init__(self, text: str) -> None:
        text = text.strip()
        if len(text) > MAX_PREDICATE:
            raise SlpError("predicate too long")
        self.items = 0
        self.root: _Node | None = None
        if text:
            pos, self.root = self._filter(text, 0, 0)
            if text[pos:].strip():
                raise SlpError("text after the predicate")

    def __call__(self, folded: Attrs) -> bool:
        return True if self.root is None else _eval(self.root, folded)

    def _filter(self, s: str, pos: int, depth: int) -> tuple[int, _Node]:
        if depth > MAX_DEPTH:
            raise SlpError("predicate nested too deep")
        pos = _skip(s, pos)
        if pos >= len(s) or s[pos] != "(":
            raise SlpError("'(' expected in predicate")
        pos = _skip(s, pos + 1)
        if pos < len(s) and s[pos] in "&|":
            op, pos = s[pos], pos + 1
            children = []
            while True:
                pos = _skip(s, pos)
                if pos < len(s) and s[pos] == ")":
                    break
                pos, child = self._filter(s, pos, depth + 1)
                children.append(child)
            if not children:
                raise SlpError("empty filter list")
            return pos + 1, (op, children)
        if pos < len(s) and s[pos] == "!":
            pos, child = self._filter(s, pos + 1, depth + 1)
            pos = _skip(s, pos)
            if pos >= len(s) or s[pos] != ")":
                raise SlpError("')' expected after a negation")
            return pos + 1, ("!", child)
        end = s.find(")", pos)
        if end < 0:
            raise SlpError("')' missing")
        self.items += 1
        if self.items > MAX_ITEMS:
            raise SlpError("too many comparisons in the predicate")
        return end + 1, _item(s[pos:end])


def _skip(s: str, pos: int) -> int:
    while pos < len(s) and s[pos].isspace():
        pos += 1
    return pos


def _fold(v: str) -> str:
    return " ".join(unescape(v).split()).lower()


def _item(item: str) -> _Node:
    for op in ("~=", ">=", "<=", "="):
        at = item.find(op)
        if at > 0:
            break
    else:
        raise SlpError("no operator in a predicate item")
    tag, want = _fold(item[:at]), item[at + len(op):]
    if op == "=" and want.strip() == "*":
        return ("*", tag, None)
    if op == "=" and "*" in want:
        return ("glob", tag, [_fold(p) for p in want.split("*")])
    return (op, tag, _fold(want))


def _eval(node: _Node, attrs: Attrs) -> bool:
    op = node[0]
    if op == "&":
        return all(_eval(c, attrs) for c in node[1])
    if op == "|":
        return any(_eval(c, attrs) for c in node[1])
    if op == "!":
        return not _eval(node[1], attrs)
    values = attrs.get(node[1])
    if values is None:
        return False
    w = node[2]
    if op == "*":
        return True
    if op == "glob":
        return any(_glob(w, v) for v in values)
    if op in ("=", "~="):
        return w in values
    for fv in values:
        a, b = (int(fv), int(w)) if fv.lstrip("-").isdigit() and w.lstrip("-").isdigit() else (fv, w)
        if (op == ">=" and a >= b) or (op == "<=" and a <= b):   # type: ignore[operator]
            return True
    return False


def _glob(parts: list[str], value: str) -> bool:
    if not value.startswith(parts[0]) or not value.endswith(parts[-1]):
        return False
    pos = len(parts[0])
    for p in parts[1:-1]:
        at = value.find(p, pos)
        if at < 0:
            return False
        pos = at + len(p)
    return pos <= len(value) - len(parts[-1])


# ---------------------------------------------------------------- the service agent

@dataclass(frozen=True)
class Target:
    """What SLP says about one target: its name and who may log in."""
    name: str
    alias: str = ""
    acl: tuple[str, ...] = ()          # initiator names; empty: any
    chap_user: str | None = None       # CHAP_N it expects (sent in the clear at login anyway)


@dataclass(frozen=True)
class Service:
    url: str
    attrs: Attrs = field(hash=False)
    folded: Attrs = field(hash=False, compare=False, default_factory=dict)   # for predicates

    def attr_list(self, tags: Iterable[str] = ()) -> str:
        wanted = [t.strip().lower() for t in tags if t.strip()]
        out = []
        for tag, values in self.attrs.items():
            if wanted and not any(_glob([p.lower() for p in w.split("*")], tag) if "*" in w else w == tag
                                  for w in wanted):
                continue
            out.append(f"({tag}={','.join(escape(v) for v in values)})")
        return ",".join(out)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServiceAgent:
    """The SA's state: scopes, targets and portals (set again whenever they
    change), and the directory agents it registers with. `auth`: also list
    targets with an ACL, and say who may log in; `das`: the only directory
    agent hosts accepted (none: up to MAX_DAS that announce themselves)."""

    SERVICE_CACHE = 16     # local addresses whose service lists are kept (ours: few)

    def __init__(self, scopes: list[str], boot: int = 0, auth: bool = False, das: Iterable[str] = ()) -> None:
        self.scopes = [s.lower() for s in scopes] or ["default"]
        self.scope_text = ",".join(scopes) or "DEFAULT"
        self.auth = auth
        self.allowed_das = frozenset(das)
        self.targets: tuple[Target, ...] = ()
        self.portals: tuple[tuple[str, int, int], ...] = ()   # (host, port, tpgt)
        self.discovery_chap = False      # discovery sessions need CHAP: nothing is told without `auth`
        self.das: dict[str, int] = {}    # directory agent host -> its boot timestamp
        self.xids: Callable[[], int] = iter(range(1, 1 << 62)).__next__
        self.boot = boot
        self.work = 0                    # what requests cost so far: comparisons and services looked at
        self._services: dict[str, list[Service]] = {}    # local address -> its services
        self._merged: dict[str, Attrs] = {}              # local address -> every service's attributes

    def update(self, targets: Iterable[Target], portals: Iterable[tuple[str, int, int]],
               discovery_chap: bool = False) -> None:
        self.targets = tuple(targets)
        self.portals = tuple(portals)
        self.discovery_chap = discovery_chap
        self._services.clear()
        self._merged.clear()

    def services(self, local_host: str) -> list[Service]:
        """One URL per target and portal the asker can use, named as SendTargets
        names them to one that reached us on `local_host` (fetd_tcp.login.advertised:
        a wildcard portal by that address, a loopback one only over loopback).
        Built once per change."""
        out = self._services.get(local_host)
        if out is None:
            if len(self._services) >= self.SERVICE_CACHE:
                self._services.clear()
            out = self._services[local_host] = self._build(local_host)
        return out

    def _build(self, local_host: str) -> list[Service]:
        if self.discovery_chap and not self.auth:
            return []        # SendTargets names no target without CHAP: SLP names none either
        self.work += len(self.targets) * max(1, len(self.portals))   # once per change, unless thrashed
        out = []
        for t in self.targets:
            if t.acl and not self.auth:
                continue     # SendTargets shows it only to its ACL: SLP knows no initiator
            attrs: Attrs = {"iscsi-name": [t.name], "transports": ["tcp"]}
            if t.alias:
                attrs["alias"] = [t.alias]
            attrs["auth-name"] = list(t.acl) or ["any"]
            if not t.chap_user:
                attrs["auth-cred"] = ["any"]
            elif self.auth:
                attrs["auth-cred"] = [f"chap/{t.chap_user}"]
            for bound, port, tpgt in self.portals:
                host = advertised(bound, local_host)   # as SendTargets names it to this asker
                if host is None:
                    continue
                full = {**attrs, "portal-group": [str(tpgt)]}
                out.append(Service(f"{SERVICE_TYPE}://{_hostport(host, port)}/{t.name}", full, fold(full)))
        return out

    # -- answers
    def handle(self, data: bytes, local_host: str, multicast: bool) -> bytes | None:
        """The answer to one datagram (None: nothing to say, e.g. a multicast
        request that is not for us, or anything malformed)."""
        self.work += 1
        try:
            header, fields = parse(data)
        except SlpError:
            return None
        if header.function == DA_ADVERT:
            return None   # the driver asks `da_advert` (it needs the sender's address)
        if header.function not in (SRV_RQST, ATTR_RQST, SRV_TYPE_RQST):
            return None
        error = self._refusal(header, fields)
        if error is not None:
            return None if multicast else self._error_reply(header, error)
        prlist = fields[0]
        if multicast and local_host in [p.strip() for p in prlist.split(",")]:
            return None   # we answered this one before (previous responder list)
        try:
            if header.function == SRV_RQST:
                return self._srv_rply(header, fields, local_host, multicast)
            if header.function == ATTR_RQST:
                return self._attr_rply(header, fields, local_host, multicast)
            return self._type_rply(header, fields, local_host, multicast)
        except SlpError:
            return None if multicast else self._error_reply(header, PARSE_ERROR)

    def _refusal(self, header: Header, fields: list) -> int | None:
        if header.lang and not header.lang.lower().startswith("en"):
            return LANGUAGE_NOT_SUPPORTED
        scopes = [s.strip().lower() for s in fields[2].split(",") if s.strip()] or ["default"]
        if not set(scopes) & set(self.scopes):
            return SCOPE_NOT_SUPPORTED
        return None

    def _error_reply(self, header: Header, error: int) -> bytes:
        reply = {SRV_RQST: SRV_RPLY, ATTR_RQST: ATTR_RPLY, SRV_TYPE_RQST: SRV_TYPE_RPLY}[header.function]
        tail = {SRV_RPLY: b"\0\0", ATTR_RPLY: b"\0\0\0", SRV_TYPE_RPLY: b"\0\0"}[reply]
        return _message(reply, header.xid, _U16.pack(error) + tail, lang=header.lang or "en")

    def _srv_rply(self, header: Header, fields: list, local_host: str, multicast: bool) -> bytes | None:
        stype = fields[1].strip().lower()
        if stype == "service:service-agent":
            body = (_string(f"service:service-agent://{local_host}") + _string(self.scope_text)
                    + _string("") + b"\0")
            return _message(SA_ADVERT, header.xid, body, lang=header.lang or "en")
        if stype not in (SERVICE_TYPE, "service:iscsi"):
            return None if multicast else _message(SRV_RPLY, header.xid, b"\0\0\0\0", lang=header.lang)
        predicate = Predicate(fields[3])
        cost = max(1, predicate.items)
        room = REPLY_MTU - _HDR.size - len(header.lang or "en") - 4
        entries, size, overflow = [], 0, False
        services = self.services(local_host)
        for n, s in enumerate(services):
            if (n + 1) * cost > MAX_REQUEST_COST:
                overflow = True   # the rest is not looked at: this request has cost enough
                break
            self.work += cost
            if predicate(s.folded):
                e = _url_entry(s.url, LIFETIME)
                if size + len(e) > room:
                    overflow = True
                    break
                entries.append(e)
                size += len(e)
        if multicast and not entries:
            return None
        body = b"\0\0" + _U16.pack(len(entries)) + b"".join(entries)
        return _message(SRV_RPLY, header.xid, body, OVERFLOW if overflow else 0, header.lang or "en")

    def _attr_rply(self, header: Header, fields: list, local_host: str, multicast: bool) -> bytes | None:
        url, tags = fields[1].strip().lower(), fields[3].split(",")[:MAX_ITEMS]
        services = self.services(local_host)
        self.work += len(services)
        if url in (SERVICE_TYPE, "service:iscsi"):
            merged = self._merged.get(local_host)
            if merged is None:
                merged = self._merged[local_host] = _merge(services)
        else:
            merged = _merge([s for s in services if s.url.lower() == url])
        if not merged:
            return None if multicast else _message(ATTR_RPLY, header.xid, b"\0\0\0\0\0", lang=header.lang)
        text = Service("", merged).attr_list(tags).encode("utf-8")
        flags = 0
        if len(text) > REPLY_MTU - 64:
            text, flags = text[:REPLY_MTU - 64].rsplit(b"),", 1)[0] + b")", OVERFLOW
        body = b"\0\0" + _U16.pack(len(text)) + text + b"\0"
        return _message(ATTR_RPLY, header.xid, body, flags, header.lang or "en")

    def _type_rply(self, header: Header, fields: list, local_host: str, multicast: bool) -> bytes | None:
        authority = fields[1]
        if authority not in (None, ""):   # IANA's (empty) or all (None) name ours
            return None if multicast else _message(SRV_TYPE_RPLY, header.xid, b"\0\0\0\0", lang=header.lang)
        if not self.services(local_host):
            return None if multicast else _message(SRV_TYPE_RPLY, header.xid, b"\0\0\0\0", lang=header.lang)
        return _message(SRV_TYPE_RPLY, header.xid, b"\0\0" + _string(SERVICE_TYPE), lang=header.lang or "en")

    # -- directory agents
    def da_advert(self, data: bytes, da_host: str) -> bool:
        """A DAAdvert from `da_host`: True when it is a DA we accept, of one of our
        scopes, that is new or rebooted (register everything with it now). A DA
        going down (boot timestamp 0) is forgotten."""
        if self.allowed_das and da_host not in self.allowed_das:
            return False      # only the configured ones: anyone can send a DAAdvert
        try:
            header, fields = parse(data)
        except SlpError:
            return False
        if header.function != DA_ADVERT or fields[0] != 0:
            return False
        error, boot, url, scopes = fields
        if boot == 0:
            self.das.pop(da_host, None)
            return False
        theirs = {s.strip().lower() for s in scopes.split(",") if s.strip()}
        if not theirs & set(self.scopes):
            return False
        if da_host not in self.das and not self.allowed_das and len(self.das) >= MAX_DAS:
            return False
        new = self.das.get(da_host) != boot
        self.das[da_host] = boot
        return new

    def registration(self, service: Service, fresh: bool = True) -> bytes:
        body = (_url_entry(service.url, LIFETIME) + _string(SERVICE_TYPE) + _string(self.scope_text)
                + _string(service.attr_list()) + b"\0")
        return _message(SRV_REG, self.xids() & 0xFFFF, body, FRESH if fresh else 0)

    def deregistration(self, url: str) -> bytes:
        body = _string(self.scope_text) + _url_entry(url, 0) + _string("")
        return _message(SRV_DEREG, self.xids() & 0xFFFF, body)

    def da_discovery(self) -> bytes:
        """A multicast SrvRqst for directory agents (active discovery, RFC 2608 12.2.1)."""
        body = _string("") + _string("service:directory-agent") + _string(self.scope_text) + _string("") + _string("")
        return _message(SRV_RQST, self.xids() & 0xFFFF, body, MCAST)


def _merge(services: list[Service]) -> Attrs:
    """Every value of every tag of `services`, each once, in order."""
    merged: dict[str, dict[str, None]] = {}
    for s in services:
        for tag, values in s.attrs.items():
            merged.setdefault(tag, {}).update(dict.fromkeys(values))
    return {tag: list(values) for tag, values in merged.items()}
