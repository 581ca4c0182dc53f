"""The front end's memory budget for buffered data, without I/O.

Everything fetd_tcp holds because an initiator asked for it is counted here,
by the connection it belongs to (an Account) and by kind:

    read   read data a command may still bring (its transfer, reserved when
           the command is admitted, until the STML answers it)
    write  write data reserved for a command: immediate and unsolicited data
           when the command arrives, solicited data when R2Ts are granted,
           until the STML answers it
    ooo    data of PDUs waiting for an earlier CmdSN
    text   a Text request being continued, a Text response being continued
    out    PDUs queued toward a socket that has not taken them yet
    keep   ErrorRecoveryLevel >= 1: read data and responses kept until the
           initiator acknowledges them (a SNACK or TASK REASSIGN may ask again)

Why reserve rather than count what is held: read data arrives from the STML
whether or not there is room, so the only way never to hold more than the
limit is to admit a command only when its whole transfer fits. Past the limit
the connection pushes back instead of growing: TASK SET FULL for a command
that does not fit, R2Ts held back (`wait`), its CmdSN window held shut.

Fairness, at three levels:
- every account is guaranteed `reserve` bytes that no other account can take,
  so every connection has room for a write's unsolicited burst (the
  FirstBurstLength the target offers, 256 KiB) or a 256 KiB read;
- `shares` accounts (a quarter of the limit) can always be opened: what
  accounts hold beyond their reserve (their excess) comes out of the rest,
  `room` = limit - max(accounts, shares) * reserve, so excess can never take
  the last shares and keep initiators from logging in;
- an initiator (the owner of its connections' accounts) may hold at most half
  of the room the other initiators leave it: excess + its excess + 2 * grow <= room,
  whatever number of connections it opens. One initiator alone gets half the
  room; a second one then still finds a quarter of it for itself. An owner
  that holds no excess may take one reservation as long as it fits the room,
  so a transfer bigger than its share is never refused forever.
Formally: max(accounts, shares) * reserve + the sum over accounts of
max(0, held - reserve) stays within `limit`.

Progress: R2T grants wait in a queue ordered by task tag (the order the STML
saw the tasks). A task may wait in the STML for an older one (ORDERED), so
when no write older than the first waiter is in flight (`hold`: from its
admission to its answer) it is granted even past the limit: without that,
newer tasks holding the budget could wait forever for it. Reads are not
counted there: an older read finishes without more room, so granting past it
only comes sooner. At most one such grant is outstanding at a time (it is then
the oldest write in flight), so the budget is exceeded by at most one task's
transfer. A grant its owner's share does not allow is parked with that owner
(in tag order) instead of holding up everyone's grants behind it: it is looked
at again when the owner gives something back, or when the progress rule
applies to it.
"""
from __future__ import annotations

import collections
import heapq
import itertools
from typing import Callable, Final

KINDS: Final = ("read", "write", "ooo", "text", "out", "keep")
# A kind is its index in KINDS: what an account holds is a list indexed by it,
# not a dict keyed by the name (several updates per command; in the compiled
# build a list's item costs a fraction of a dict's string lookup, decision 0841).
# Its items are updated as `k[i] = k[i] + n`: mypyc compiles `k[i] += n` to
# the generic in-place operator, the spelled-out form to int arithmetic.
READ: Final = 0
WRITE: Final = 1
OOO: Final = 2
TEXT: Final = 3
OUT: Final = 4
KEEP: Final = 5
# guaranteed to every connection: a write's unsolicited burst (keys.TargetKeys'
# first_burst_length) or a 256 KiB read, with its PDUs' headers, always fits
RESERVE = 320 << 10
LOGIN_SHARES = 4      # 1/LOGIN_SHARES of the limit is kept for the reserves of new connections
_FITS, _OVER_SHARE, _NO_ROOM = 0, 1, 2


class Grant:
    """A reservation waiting for room (`Budget.wait`); `cancel` withdraws it."""

    __slots__ = ("account", "kind", "n", "tag", "on_grant", "live", "parked", "listed")

    def __init__(self, account: Account, kind: int, n: int, tag: int, on_grant: Callable[[], None]) -> None:
        self.account, self.kind, self.n, self.tag, self.on_grant = account, kind, n, tag, on_grant
        self.live = True
        self.parked = False     # waiting in its owner's queue, not in the budget's
        self.listed = False     # in Budget._parked (the oldest parked, for the progress rule)

    def cancel(self) -> None:
        if self.live:
            self.live = False
            b = self.account.budget
            b._waiting_live -= 1
            if self.parked:
                b._parked_live -= 1


class Owner:
    """One initiator's accounts together: the excess they hold (its fair share
    is computed from it) and its grants that wait for that share."""

    __slots__ = ("key", "excess", "accounts", "parked")

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.excess = 0
        self.accounts = 0
        self.parked: list[tuple[int, int, Grant]] = []   # (tag, seq, grant) heap


class Account:
    """What one connection holds, by kind."""

    __slots__ = ("budget", "owner", "held", "kinds", "closed")

    def __init__(self, budget: Budget, owner: Owner) -> None:
        self.budget = budget
        self.owner = owner
        self.held = 0
        self.kinds = [0] * len(KINDS)   # by kind (READ ... KEEP)
        self.closed = False

    def fit(self, n: int) -> int:
        """Could `n` more bytes be taken now? _FITS within the account's guaranteed
        share always (whatever others forced in); beyond it, when the room and its
        owner's fair share allow; else _OVER_SHARE or _NO_ROOM."""
        b = self.budget
        r, held = b.reserve, self.held
        if held + n <= r:
            return _FITS
        grow = held + n - r - (held - r if held > r else 0)
        owned = self.owner.excess
        if owned and b.excess + owned + 2 * grow > b.room:
            return _OVER_SHARE
        return _FITS if b.excess + grow <= b.room else _NO_ROOM

    def take(self, kind: int, n: int, force: bool = False) -> bool:
        """Count `n` bytes of `kind`: False, and nothing counted, when they do not
        fit (unless `force`: for what is already in memory). Per command: kept lean."""
        if self.closed or n <= 0:
            return not self.closed
        b = self.budget
        r, held = b.reserve, self.held
        new = held + n
        if new > r:
            grow = new - r - (held - r if held > r else 0)
            owner = self.owner
            if not force and (b.excess + grow > b.room
                              or (owner.excess and b.excess + owner.excess + 2 * grow > b.room)):
                return False
            b.excess += grow
            owner.excess += grow
        self.held = new
        self.kinds[kind] = self.kinds[kind] + n
        b.used += n
        b.kinds[kind] = b.kinds[kind] + n
        if b.used > b.peak:
            b.peak = b.used
        return True

    def give(self, kind: int, n: int) -> None:
        """`n` bytes of `kind` are no longer held."""
        if self.closed or n <= 0:
            return
        kinds = self.kinds
        if n > kinds[kind]:
            n = kinds[kind]
        kinds[kind] = kinds[kind] - n
        b = self.budget
        b.kinds[kind] = b.kinds[kind] - n
        self._let_go(n)

    def _let_go(self, n: int) -> None:
        """`n` held bytes go (their kinds counted by the caller): the owner's
        share past the guaranteed one shrinks with them, and whoever waits for
        room may go on."""
        b = self.budget
        r, held = b.reserve, self.held
        if held > r:
            shrink = held - r - (held - n - r if held - n > r else 0)
            b.excess -= shrink
            owner = self.owner
            owner.excess -= shrink
            if owner.parked:
                b._unpark(owner)
        self.held = held - n
        b.used -= n
        if b._waiting_live:
            b._pump()

    def move(self, src: int, dst: int, n: int, reserved: int) -> None:
        """`n` bytes held as `src` (up to `reserved` of them) are now held as `dst`:
        read data that arrived is output now; beyond its reservation it is taken."""
        kinds = self.kinds
        # min(n, reserved, kinds[src]) without the builtin's call (per read command)
        moved = n if n < reserved else reserved
        if kinds[src] < moved:
            moved = kinds[src]
        if moved > 0 and not self.closed:
            kinds[src] = kinds[src] - moved
            kinds[dst] = kinds[dst] + moved
            b = self.budget
            b.kinds[src] = b.kinds[src] - moved
            b.kinds[dst] = b.kinds[dst] + moved
        if n > moved:
            self.take(dst, n - moved, force=True)

    def answered(self, n: int, reserved: int) -> None:
        """A read's response: its `n` bytes of data are output now, and the rest
        of its reservation (`reserved`, as READ) goes. move(READ, OUT, n,
        reserved) and give(READ, reserved - n) in one, for the usual read whose
        data fits its reservation (per command: one call, four counts updated
        instead of six)."""
        kinds = self.kinds
        if n > reserved or kinds[READ] < reserved or self.closed:
            self.move(READ, OUT, n, reserved)
            if reserved > n:
                self.give(READ, reserved - n)
            return
        kinds[READ] = kinds[READ] - reserved
        kinds[OUT] = kinds[OUT] + n
        b = self.budget
        b.kinds[READ] = b.kinds[READ] - reserved
        b.kinds[OUT] = b.kinds[OUT] + n
        if reserved > n:
            self._let_go(reserved - n)   # (give(READ, ...)'s part: its kinds counted above)

    def set(self, kind: int, n: int) -> None:
        """`kind` is now `n` bytes (what a sample of a socket's buffer says)."""
        now = self.kinds[kind]
        if n > now:
            self.take(kind, n - now, force=True)
        elif n < now:
            self.give(kind, now - n)

    def close(self) -> None:
        """The connection is gone: everything it held is free, its guarantee too."""
        if self.closed:
            return
        b, r, owner = self.budget, self.budget.reserve, self.owner
        excess = max(0, self.held - r)
        b.excess -= excess
        owner.excess -= excess
        b.used -= self.held
        for kind, n in enumerate(self.kinds):
            b.kinds[kind] = b.kinds[kind] - n
        self.held = 0
        self.closed = True
        b._closed(owner)
        if owner.parked:
            b._unpark(owner)
        if b._waiting_live:
            b._pump()


class Budget:
    """The limit shared by every connection of the front end."""

    def __init__(self, limit: int, reserve: int = RESERVE, shares: int | None = None) -> None:
        self.limit = limit
        self.reserve = min(reserve, limit)
        # accounts that can always be opened: their reserves are never excess's room
        self.shares = max(1, limit // (LOGIN_SHARES * self.reserve)) if shares is None else shares
        self.accounts = 0
        self.owners: dict[str, Owner] = {}   # initiator name -> its accounts together
        self.room = limit - self.shares * self.reserve   # what excess may take in all
        self.excess = 0              # sum over accounts of max(0, held - reserve)
        self.used = 0
        self.peak = 0
        self.kinds = [0] * len(KINDS)
        # writes in flight, and the same in tag order (tags grow, and a write is entered
        # when it is admitted; gone ones leave the deque lazily)
        self._holders: set[int] = set()
        self._order: collections.deque[int] = collections.deque()
        self._compact_at = 64
        self._waiting: list[tuple[int, int, Grant]] = []   # (tag, seq, grant) heap
        self._waiting_live = 0       # grants not yet given, parked ones too
        # parked grants (over their owner's share), oldest first: the progress rule's
        self._parked: list[tuple[int, int, Grant]] = []
        self._parked_live = 0
        self._seq = itertools.count()
        self._pumping = False
        self._again = False

    def open(self, owner: str | None = None) -> Account | None:
        """An account for a new connection of initiator `owner` (None: an owner
        of its own), or None when its guarantee does not fit: never while fewer
        than `shares` are open."""
        if self.accounts >= self.shares and (self.accounts + 1) * self.reserve + self.excess > self.limit:
            return None
        self.accounts += 1
        self.room = self.limit - max(self.accounts, self.shares) * self.reserve
        o = self.owners.get(owner) if owner is not None else None
        if o is None:
            o = Owner(owner)
            if owner is not None:
                self.owners[owner] = o
        o.accounts += 1
        return Account(self, o)

    def _closed(self, owner: Owner) -> None:
        self.accounts -= 1
        self.room = self.limit - max(self.accounts, self.shares) * self.reserve
        owner.accounts -= 1
        if not owner.accounts and owner.key is not None and self.owners.get(owner.key) is owner:
            del self.owners[owner.key]

    def hold(self, tag: int) -> None:
        """Write `tag` (the newest task so far) is in flight: it holds, or will
        hold, a reservation."""
        self._holders.add(tag)
        order = self._order
        order.append(tag)
        if len(order) > self._compact_at:   # gone ones behind a long-lived one
            self._order = collections.deque(t for t in order if t in self._holders)
            self._compact_at = 2 * len(self._order) + 64

    def unhold(self, tag: int) -> None:
        """Write `tag` is over (answered or aborted)."""
        self._holders.discard(tag)
        if self._waiting_live:
            self._pump()

    def take_now(self, account: Account, kind: int, n: int) -> bool:
        """Reserve at once when it fits and nobody waits before us (the usual
        case, without a Grant), or when it fits in the account's guaranteed
        share: that takes nothing anyone waits for."""
        if self._waiting_live > self._parked_live and account.held + n > self.reserve:
            return False
        if account.owner.parked and account.held + n > self.reserve:
            return False            # behind its owner's parked grants
        return account.take(kind, n)

    def wait(self, account: Account, kind: int, n: int, tag: int, on_grant: Callable[[], None]) -> Grant:
        """Reserve `n` bytes for task `tag` when there is room: `on_grant()` is
        called once they are taken (at once when they fit now)."""
        grant = Grant(account, kind, n, tag, on_grant)
        heapq.heappush(self._waiting, (tag, next(self._seq), grant))
        self._waiting_live += 1
        self._pump()
        return grant

    def report(self) -> dict[str, int]:
        """What `scsi-target status` shows (sent with the front end's heartbeats)."""
        return {"limit": self.limit, "used": self.used, "peak": self.peak,
                "connections": self.accounts, **dict(zip(KINDS, self.kinds))}

    # -- internals -----------------------------------------------------------
    def _oldest_holder(self) -> int | None:
        order, holders = self._order, self._holders
        while order and order[0] not in holders:
            order.popleft()
        return order[0] if order else None

    def _pump(self) -> None:
        """Grant waiting reservations in tag order while they fit (or while
        nothing older holds a reservation: see the module docstring)."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            again = True
            while again:
                self._again = False
                self._grant_ready()
                self._grant_parked()
                again = self._again
            live = self._waiting_live - self._parked_live
            if len(self._waiting) > 2 * live + 64:   # cancelled entries: rebuild
                self._waiting = [w for w in self._waiting if w[2].live]
                heapq.heapify(self._waiting)
            if len(self._parked) > 2 * self._parked_live + 64:
                for w in self._parked:
                    w[2].listed = False
                self._parked = [w for w in self._parked if w[2].live and w[2].parked]
                for w in self._parked:
                    w[2].listed = True
                heapq.heapify(self._parked)
        finally:
            self._pumping = False

    def _grant_ready(self) -> None:
        heap = self._waiting
        while heap:
            entry = heap[0]
            tag, _, grant = entry
            account = grant.account
            if not grant.live or account.closed:
                heapq.heappop(heap)
                if grant.live:
                    grant.cancel()
                continue
            owner = account.owner
            head = self._owner_head(owner)
            fit = _OVER_SHARE if head is not None and head < entry else account.fit(grant.n)
            if fit != _FITS:
                oldest = self._oldest_holder()
                if oldest is not None and oldest < tag:
                    if fit == _NO_ROOM:
                        return          # everyone's grants wait in tag order for room
                    heapq.heappop(heap)   # over its owner's share: only that owner waits
                    self._park(entry)
                    continue
            heapq.heappop(heap)
            self._give(grant)

    def _grant_parked(self) -> None:
        """The progress rule for parked grants: the oldest one goes when nothing
        older holds a reservation (its owner's newer tasks may wait for it)."""
        heap = self._parked
        while heap:
            tag, _, grant = heap[0]
            if not grant.live or not grant.parked or grant.account.closed:
                heapq.heappop(heap)
                grant.listed = False
                if grant.live and grant.parked:
                    grant.cancel()
                continue
            oldest = self._oldest_holder()
            if oldest is not None and oldest < tag:
                return
            heapq.heappop(heap)
            grant.listed = False
            grant.parked = False
            self._parked_live -= 1
            self._give(grant)

    def _give(self, grant: Grant) -> None:
        grant.live = False
        self._waiting_live -= 1
        grant.account.take(grant.kind, grant.n, force=True)
        grant.on_grant()

    def _park(self, entry: tuple[int, int, Grant]) -> None:
        grant = entry[2]
        grant.parked = True
        self._parked_live += 1
        heapq.heappush(grant.account.owner.parked, entry)
        if not grant.listed:
            grant.listed = True
            heapq.heappush(self._parked, entry)

    def _owner_head(self, owner: Owner) -> tuple[int, int, Grant] | None:
        """The owner's oldest parked grant still waiting (dropping those that are not)."""
        parked = owner.parked
        while parked:
            grant = parked[0][2]
            if grant.live and grant.parked and not grant.account.closed:
                return parked[0]
            heapq.heappop(parked)
            if grant.live and grant.parked:
                grant.cancel()
        return None

    def _unpark(self, owner: Owner) -> None:
        """The owner gave something back: its oldest parked grant is looked at
        again (with everyone's, in tag order); the rest follow as it goes."""
        entry = self._owner_head(owner)
        if entry is not None:
            heapq.heappop(owner.parked)
            entry[2].parked = False
            self._parked_live -= 1
            heapq.heappush(self._waiting, entry)


def unlimited() -> Account:
    """An account of a budget of its own without a limit (a Connection made
    without one: tests and tools that drive the sans-IO core)."""
    account = Budget(1 << 62).open()
    assert account is not None   # the first account of an empty budget always fits
    return account
