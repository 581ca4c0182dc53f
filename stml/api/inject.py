"""Fault injection at the contract: rules that drop, delay, duplicate or reorder
messages of one kind, kill the process, or stall a LUN's backend, applied by an
Injector, a tap (stml.api.tap) on one side of the link.

A rule is one line (docs/research.md, "Fault injection"):

    SIDE:KIND OP [at=N | p=P [seed=S]] [ms=MS] [hold=N] [hold_kib=K] [lun=L] [s=SECONDS]

- SIDE: `stml` (the STML's tap) or `fetd` (every front end's link tap).
- KIND: drop, delay, duplicate, reorder, kill, stall (KINDS below).
- OP: a message type (stml.api.messages.Op value, e.g. xmit_response) or `*`.
- at=N fires at the Nth message of OP this side sees (1-based, either
  direction); p=P fires on each with probability P, drawn from a generator
  seeded with `seed` (default 0), so a run repeats.
- hold=N, hold_kib=K: what one delay rule holds at once, at most (default
  HOLD and HOLD_KIB); a message past either passes on at once, counted in
  `Injector.passed` and logged, so an injector never becomes a memory leak.
  A reorder rule holds one message at a time.

Rules are parsed into dataclasses and refused with one line (RuleError) when
wrong; the side that applies them logs each at WARNING when it starts. Without
rules no Injector exists and no tap is installed.
"""
from __future__ import annotations

import logging
import os
import random
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

from scsi_runtime.logs import audit
from stml.api.messages import Op
from stml.api.tap import Peer

log = logging.getLogger("inject")

SIDES = ("stml", "fetd")
# `scsi-target run` tells its children how often they were started (scsi_target.supervise):
# a kill rule fires in the first start only, so a restarted process serves on
START_ENV = "SCSI_TARGET_START"


@dataclass(frozen=True)
class Kind:
    """What a rule of this kind may and must say."""
    needs: frozenset[str]          # keys it must have
    allows: frozenset[str]         # keys it may have beyond the trigger's
    sides: tuple[str, ...] = SIDES
    help: str = ""


TRIGGER = frozenset({"at", "p", "seed"})
KINDS: dict[str, Kind] = {
    "drop": Kind(frozenset(), frozenset(), help="the message is not handled or sent"),
    "delay": Kind(frozenset({"ms"}), frozenset({"ms", "hold", "hold_kib"}),
                  help="held for ms milliseconds, then handed on (at most hold messages, hold_kib KiB)"),
    "duplicate": Kind(frozenset(), frozenset(), help="handed on twice"),
    "reorder": Kind(frozenset(), frozenset({"ms"}),
                    help="held until the next message of OP has gone (at most ms, default 1000)"),
    "kill": Kind(frozenset(), frozenset(), help="SIGKILL of this process before the message is handled"),
    "stall": Kind(frozenset({"lun", "s"}), frozenset({"lun", "s"}), sides=("stml",),
                  help="LUN lun's backend calls wait s seconds (0: until SIGUSR2)"),
}
# key -> (parser, what it must be)
VALUES: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], str]] = {
    "at": (int, lambda v: v >= 1, "a message number >= 1"),
    "p": (float, lambda v: 0.0 < v <= 1.0, "a probability in (0, 1]"),
    "seed": (int, lambda v: True, "an integer"),
    "ms": (int, lambda v: 0 <= v <= 600_000, "milliseconds, 0..600000"),
    "lun": (int, lambda v: 0 <= v < 16384, "a LUN number"),
    "s": (float, lambda v: 0.0 <= v <= 3600.0, "seconds, 0..3600"),
    "hold": (int, lambda v: 1 <= v <= 1 << 20, "a message count, 1..1048576"),
    "hold_kib": (int, lambda v: 1 <= v <= 1 << 22, "KiB, 1..4194304 (4 GiB)"),
}
OPS = frozenset(o.value for o in Op) | {"*"}
REORDER_MS = 1000   # a reordered message waits at most this long for its successor
HOLD = 1024         # messages one delay rule holds at once, unless its hold= says
HOLD_KIB = 64 << 10  # and their header and frame bytes (64 MiB), unless its hold_kib= says


class RuleError(ValueError):
    """A rule that cannot be applied: the message is the one line to print."""


@dataclass(frozen=True)
class Rule:
    side: str
    kind: str
    op: str
    at: int | None = None
    p: float | None = None
    seed: int = 0
    ms: int | None = None
    lun: int | None = None
    s: float | None = None
    hold: int = HOLD
    hold_kib: int = HOLD_KIB
    text: str = ""


def parse_rule(text: str) -> Rule:
    """One rule (module doc); RuleError says what is wrong with it."""
    words = text.split()
    if len(words) < 2 or ":" not in words[0]:
        raise RuleError(f"inject rule {text!r}: expected SIDE:KIND OP [key=value ...]")
    side, _, kind = words[0].partition(":")
    if side not in SIDES:
        raise RuleError(f"inject rule {text!r}: side {side!r} is not one of {', '.join(SIDES)}")
    spec = KINDS.get(kind)
    if spec is None:
        raise RuleError(f"inject rule {text!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if side not in spec.sides:
        raise RuleError(f"inject rule {text!r}: {kind} applies on the {'/'.join(spec.sides)} side only")
    op = words[1]
    if op not in OPS:
        raise RuleError(f"inject rule {text!r}: {op!r} is not a message type (e.g. rx_cmnd, xmit_response, *)")
    values: dict[str, Any] = {}
    for word in words[2:]:
        key, eq, raw = word.partition("=")
        if not eq or key not in TRIGGER | spec.allows:
            allowed = ", ".join(sorted(TRIGGER | spec.allows))
            raise RuleError(f"inject rule {text!r}: {word!r} is not key=value with a key of {allowed}")
        parse, ok, what = VALUES[key]
        try:
            value = parse(raw)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise RuleError(f"inject rule {text!r}: {key} must be {what}")
        values[key] = value
    if ("at" in values) == ("p" in values):
        raise RuleError(f"inject rule {text!r}: give exactly one of at=N or p=P")
    missing = spec.needs - values.keys()
    if missing:
        raise RuleError(f"inject rule {text!r}: {kind} needs {', '.join(sorted(missing))}=")
    return Rule(side, kind, op, text=" ".join(words), **values)


def load_rules(texts: tuple[str, ...] | list[str], files: tuple[str, ...] | list[str] = ()) -> list[Rule]:
    """The rules of --inject flags and --inject-file files (one a line, `#`
    comments); RuleError for the first wrong one, or a file that cannot be read."""
    lines = list(texts)
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines += [line.split("#", 1)[0] for line in f]
        except OSError as e:
            raise RuleError(f"inject file {path}: {e.strerror or e}") from None
    return [parse_rule(line) for line in lines if line.strip()]


def front_end_rules(texts: tuple[str, ...], files: tuple[str, ...]) -> list[Rule]:
    """A front end's --inject/--inject-file: fetd rules only (RuleError else)."""
    rules = load_rules(texts, files)
    for r in rules:
        if r.side != "fetd":
            raise RuleError(f"inject rule {r.text!r}: a front end applies fetd rules only")
    return rules


def for_side(rules: list[Rule], side: str) -> list[Rule]:
    return [r for r in rules if r.side == side]


def rule_args(rules: list[Rule]) -> list[str]:
    """The rules as flags for a child process (scsi-target run)."""
    return [a for r in rules for a in ("--inject", r.text)]


# what the side does with a message the injector handed back: (peer, header, frames),
# the peer as that side names it (bytes on the STML, str on a front end)
HandOn = Callable[[Any, dict[str, Any], list], None]


@dataclass
class _State:
    """A rule as it runs: how many of its messages passed, its generator, a
    message reorder holds."""
    rule: Rule
    seen: int = 0
    rng: random.Random = field(default_factory=random.Random)
    held: Any = None    # (hand_on, peer, header, frames, timer)
    holding: int = 0    # messages a delay holds now, and their bytes
    holding_bytes: int = 0

    def fires(self) -> bool:
        self.seen += 1
        r = self.rule
        if r.at is not None:
            return self.seen == r.at
        assert r.p is not None
        return self.rng.random() < r.p


class Injector:
    """A tap that applies one side's rules. `deliver`/`transmit` hand a held
    message on past the tap (inbound/outbound); `stall(lun, seconds)` stalls a
    backend (the STML's). `counts` says how often each rule acted, by its text;
    `passed` how often a delay let a message through at once for its cap."""

    def __init__(self, rules: list[Rule], deliver: HandOn, transmit: HandOn,
                 stall: Callable[[int, float], None] | None = None, start: int | None = None) -> None:
        if start is None:
            start = int(os.environ.get(START_ENV, "1") or 1)
        if start > 1:   # a kill at message N again would kill each restart too
            rules = [r for r in rules if r.kind != "kill"]
        self.by_op: dict[str, list[_State]] = {}
        for r in rules:
            self.by_op.setdefault(r.op, []).append(_State(r, rng=random.Random(r.seed)))
        self.deliver, self.transmit, self.stall = deliver, transmit, stall
        self.counts: dict[str, int] = {r.text: 0 for r in rules}
        self.passed: dict[str, int] = {r.text: 0 for r in rules}
        self.size = 0   # bytes of the message being seen

    @property
    def held(self) -> int:
        """Messages held now, by every rule."""
        return sum(st.holding + (st.held is not None) for states in self.by_op.values() for st in states)

    def inbound(self, peer: Peer, header: dict[str, Any], packed: bytes, frames: list) -> bool:
        return self._see(self.deliver, peer, header, packed, frames)

    def outbound(self, peer: Peer, header: dict[str, Any], packed: bytes, frames: list) -> bool:
        return self._see(self.transmit, peer, header, packed, frames)

    def _see(self, hand_on: HandOn, peer: Peer, header: dict[str, Any], packed: bytes, frames: list) -> bool:
        states = self.by_op.get(header["op"])
        wild = self.by_op.get("*")
        if states is None and wild is None:
            return True
        self.size = len(packed) + sum(len(f) for f in frames)   # what holding this message costs
        for st in (states or []) + (wild or []):
            if st.held is not None and st.rule.kind == "reorder":
                self._release_after(st)   # this one goes first, then the one held
                continue
            if st.fires():
                self.counts[st.rule.text] += 1
                if not ACTIONS[st.rule.kind](self, st, hand_on, peer, header, frames):
                    return False
        return True

    # -- the kinds ------------------------------------------------------------
    def _drop(self, st: _State, hand_on: HandOn, peer: Peer, header: dict[str, Any], frames: list) -> bool:
        _say(st, "dropped %s #%d (%s)", header["op"], st.seen, st.rule.text)
        return False

    def _delay(self, st: _State, hand_on: HandOn, peer: Peer, header: dict[str, Any], frames: list) -> bool:
        import asyncio
        r = st.rule
        assert r.ms is not None   # a delay needs ms (parse_rule)
        size = self.size
        if st.holding >= r.hold or st.holding_bytes + size > r.hold_kib << 10:
            self.passed[r.text] += 1
            _say(st, "passing %s #%d on at once: rule holds %d messages, %d bytes (cap hold=%d hold_kib=%d; %s)",
                 header["op"], st.seen, st.holding, st.holding_bytes, r.hold, r.hold_kib, r.text)
            return True
        _say(st, "delaying %s #%d by %d ms (%s)", header["op"], st.seen, r.ms, r.text)
        st.holding += 1
        st.holding_bytes += size
        asyncio.get_running_loop().call_later(r.ms / 1000, self._late, st, st.seen, size, hand_on, peer, header,
                                              _copy(frames))
        return False

    def _late(self, st: _State, n: int, size: int, hand_on: HandOn, peer: Peer, header: dict[str, Any],
              frames: list) -> None:
        st.holding -= 1
        st.holding_bytes -= size
        _say(st, "handing on delayed %s #%d", header["op"], n)
        hand_on(peer, header, frames)

    def _duplicate(self, st: _State, hand_on: HandOn, peer: Peer, header: dict[str, Any],
                   frames: list) -> bool:
        import asyncio
        _say(st, "duplicating %s #%d (%s)", header["op"], st.seen, st.rule.text)
        asyncio.get_running_loop().call_soon(hand_on, peer, header, _copy(frames))
        return True

    def _reorder(self, st: _State, hand_on: HandOn, peer: Peer, header: dict[str, Any], frames: list) -> bool:
        import asyncio
        ms = REORDER_MS if st.rule.ms is None else st.rule.ms
        _say(st, "holding %s #%d for the next one (%s)", header["op"], st.seen, st.rule.text)
        timer = asyncio.get_running_loop().call_later(ms / 1000, self._release, st, f"none came in {ms} ms")
        st.held = (hand_on, peer, header, _copy(frames), timer, st.seen)
        return False

    def _release_after(self, st: _State) -> None:
        import asyncio
        st.seen += 1
        asyncio.get_running_loop().call_soon(self._release, st, f"after #{st.seen}")

    def _release(self, st: _State, why: str) -> None:
        if st.held is None:
            return
        hand_on, peer, header, frames, timer, n = st.held
        st.held = None
        timer.cancel()
        _say(st, "handing on held %s #%d %s", header["op"], n, why)
        hand_on(peer, header, frames)

    def _kill(self, st: _State, hand_on: HandOn, peer: Peer, header: dict[str, Any], frames: list) -> bool:
        _say(st, "SIGKILL at %s #%d (%s)", header["op"], st.seen, st.rule.text)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        return False   # (not reached)

    def _stall(self, st: _State, hand_on: HandOn, peer: Peer, header: dict[str, Any], frames: list) -> bool:
        r = st.rule
        assert r.lun is not None and r.s is not None and self.stall is not None   # parse_rule, the STML
        _say(st, "stalling LUN %d's backend at %s #%d (%s)", r.lun, header["op"], st.seen, r.text)
        self.stall(r.lun, r.s)
        return True


ACTIONS: dict[str, Callable[..., bool]] = {
    "drop": Injector._drop, "delay": Injector._delay, "duplicate": Injector._duplicate,
    "reorder": Injector._reorder, "kill": Injector._kill, "stall": Injector._stall,
}
assert ACTIONS.keys() == KINDS.keys()


def _say(st: _State, msg: str, *args: Any) -> None:
    """A line per act: an at=N rule acts once and its line always shows; a
    p=P rule may act on every message, so its lines are rate-limited as any
    repeated line is (scsi_runtime.logs)."""
    log.warning(msg, *args, extra=audit() if st.rule.at is not None else None)


def _copy(frames: list) -> list:
    """Frames are the carrier's memory during the tap call only (stml.api.tap)."""
    return [bytes(f) for f in frames]


def announce(rules: list[Rule], where: str) -> None:
    """Loudly, at start: one line per rule."""
    for r in rules:
        log.warning("%s applies rule %r", where, r.text, extra=audit())


def tap_link(rules: list[Rule], link: Any, where: str) -> None:
    """Put an Injector for these rules on a front end's FrontEndLink (its
    deliver/transmit take no peer), saying so loudly; no rules, no tap."""
    if not rules:
        return
    announce(rules, where)
    link.add_tap(Injector(rules, lambda peer, header, frames: link.deliver(header, frames),
                          lambda peer, header, frames: link.transmit(header, frames)))
