"""The Gateway's login throttle and its unauthenticated-slot accounting, as pure logic.

Anyone on the internet can connect to the Gateway and try a password.  This module decides
how fast: it takes no Twisted import and reads no clock (every method is given ``now``), so
the Gateway adapter only asks it and acts on the answer.

**Login throttle** (:class:`LoginThrottle`).  Three token buckets are charged at AUTH_START,
before the outcome is known (so a batch of parallel guesses counts in full):

* per (address group, session id): burst 5, then 0.5 per second;
* per address group, over all sessions: burst 20, then 2 per second;
* per session id, over all addresses (distributed guessing): burst 30, then 3 per second.

An *address group* (:func:`address_group`) is an IPv4 address, or the /64 of an IPv6
address (one subscriber usually holds a whole /64; counting single IPv6 addresses would give
an attacker 2**64 fresh buckets).

A bucket that is empty goes into debt: the attempt reserves the next token and may be
answered as *failed* only when the bucket has refilled to it, so parallel attempts are spaced
1/rate apart.  A reservation is never more than ``max_delay`` (5 s, at most half the login
deadline) in the future, and the debt never grows beyond ``rate * max_delay`` tokens: an
attack that goes on only keeps the bucket at that floor, and ``burst / rate + max_delay``
seconds (15 s for each of the three defaults) after it stops every bucket is full again.
Nothing is ever locked out: the Gateway answers a *correct* proof at once, whatever the
buckets say, and a wrong one at most ``max_delay`` late, well inside the login deadline.

**What that bounds.**  A reservation only costs an attacker time if the link keeps its
unauthenticated slot until the reservation: the Gateway answers a correct proof at once, so a
peer that sees no success within a round trip knows the guess was wrong and could close the
link and try again.  So the slot of a link that did not log in stays taken until its
reservation even after the link closed (:meth:`UnauthenticatedSlots.release` with
``hold_until``).  Then, over any T seconds, with B/R a bucket's burst and rate, m =
``max_delay`` and S the slots the attempts can use (``maxUnauthenticatedLinksPerAddress`` for
one address group, ``maxUnauthenticatedLinks`` for all), the failed guesses a bucket admits
are at most ``B + R*(T + m)`` (those that took a whole token) plus ``S*(T/m + 1)`` (those at
the debt floor, each of which holds a slot for m seconds).  With the defaults (m = 5 s, 32
slots per address group, 256 in all) that is, in the long run:

* per (address group, session): 0.5 + 32/5 = 6.9 guesses/s;
* per address group, over all sessions: 2 + 32/5 = 8.4 guesses/s;
* per session, over all addresses: 3 + 256/5 = 54.2 guesses/s.

The slot term dominates; a smaller ``maxUnauthenticatedLinksPerAddress`` lowers it.

**Refunds.**  A correct login gives back exactly what its own attempt took from each bucket
(:meth:`LoginThrottle.succeeded`): it does not clear anything, so a batch of guesses plus one
good login of the attacker's own session gets back one token, not the batch.  An attempt made
at the debt floor took less than a token (the floor forgives the rest); a bucket remembers the
amount it forgave and pays that off first from refunds, so parallel good logins at the floor
cannot pump a bucket up.

**Memory.**  Each of the three tables holds at most ``capacity`` (4,096) buckets, least
recently used forgotten first; a full bucket is the same as no bucket and is dropped early.
Forgetting a bucket that is not full makes it full again, so to erase the debt of one bucket
an attacker must touch ``capacity`` other keys of that table, each still in debt, after its
own last attempt on it.

**Unauthenticated slots** (:class:`UnauthenticatedSlots`): at most ``total`` links logging
in at once, and at most ``per_address`` of them from one address group, so that one address
cannot refuse every other login.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

__all__ = [
    "ADDRESS_RATE",
    "DEFAULT_CAPACITY",
    "DEFAULT_MAX_DELAY",
    "PAIR_RATE",
    "SESSION_RATE",
    "LoginThrottle",
    "Rate",
    "UnauthenticatedSlots",
    "address_group",
]

_K = TypeVar("_K", bound=Hashable)


class Rate(NamedTuple):
    """A token bucket's shape: ``burst`` tokens when full, refilled at ``per_second``."""

    burst: int
    per_second: float


# Per (address group, session): one client retrying a wrong password (a password just
# changed, a typo) gets a few answers at once and then one every 2 s; this is the bucket an
# attacker guessing one session from one address runs into first.
PAIR_RATE = Rate(5, 0.5)
# Per address group, over all sessions: a NAT or one host running many proxies (up to ~20
# restarting together with stale passwords) is not slowed; 2/s sustained.
ADDRESS_RATE = Rate(20, 2.0)
# Per session, over all addresses: guessing one session from many addresses.  A session has
# one Proxy-Client and up to maxLinksPerSession (64) Proxy-Servers; their good logins are
# refunded, so 30 failures at once covers many of them misconfigured after a change.
SESSION_RATE = Rate(30, 3.0)
# The most a failed answer is held: well under the 10 s login deadline (and clamped to half
# of whatever deadline is configured), so a client that knows the password is never locked
# out, and a wrong password is still told as "authentication failed", not as a timeout.
DEFAULT_MAX_DELAY = 5.0
# Buckets remembered per table; all three full of IPv6 keys hold 3.2 MiB (tracemalloc,
# 3 x 4,096 buckets, ~270 bytes each with key and table slot).
DEFAULT_CAPACITY = 4096


def address_group(host: str) -> str:
    """The key under which logins from ``host`` are counted as "one address".

    An IPv4 literal as it is; an IPv6 literal by its /64 (``2001:db8:1:2::/64``), zone
    dropped; an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack listener
    reports for IPv4 peers) as the IPv4 address; anything else (``"?"``, a UNIX socket path)
    as itself.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    prefix = int(address) >> 64 << 64
    return str(ipaddress.IPv6Network((prefix, 64)))


class _Bucket:
    """One token bucket; ``level`` may be negative (reserved tokens), never below the floor."""

    __slots__ = ("forgiven", "last_clamp", "level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp
        # Tokens the floor let attempts keep (paid off first by refunds), and when it last did.
        self.forgiven = 0.0
        self.last_clamp = 0.0


class _Table(Generic[_K]):
    """Buckets of one shape by key, least recently used first, at most ``capacity``."""

    def __init__(self, rate: Rate, max_delay: float, capacity: int, pending: float) -> None:
        if rate.burst < 1 or rate.per_second <= 0:
            raise ValueError(f"a bucket needs a burst of at least 1 and a positive rate: {rate}")
        self.burst = float(rate.burst)
        self.rate = float(rate.per_second)
        self.floor = -self.rate * max_delay
        self.max_delay = max_delay
        self.capacity = capacity
        # How long an attempt may still succeed (the login deadline): forgiven tokens are
        # kept that long after the last clamp, or a late refund could pay them out.
        self.pending = pending
        self.buckets: collections.OrderedDict[_K, _Bucket] = collections.OrderedDict()

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = now - bucket.stamp
        if elapsed > 0:  # a clock that steps back refills nothing and keeps the stamp
            bucket.level = min(self.burst, bucket.level + elapsed * self.rate)
            bucket.stamp = now

    def _droppable(self, bucket: _Bucket, now: float) -> bool:
        """Whether forgetting ``bucket`` changes nothing: full, and no forgiven token left
        that a still-pending attempt's refund could pay out."""
        elapsed = max(0.0, now - bucket.stamp)
        if bucket.level + elapsed * self.rate < self.burst:
            return False
        return bucket.forgiven == 0 or now >= bucket.last_clamp + self.pending

    def sweep(self, now: float, limit: int | None = None) -> None:
        """Drop droppable buckets from the least recently used end (at most ``limit``)."""
        buckets = self.buckets
        dropped = 0
        while buckets and (limit is None or dropped < limit):
            key, bucket = next(iter(buckets.items()))
            if not self._droppable(bucket, now):
                break
            del buckets[key]
            dropped += 1

    def forget_full(self, now: float) -> None:
        """Drop every droppable bucket, wherever it is in the table."""
        buckets = self.buckets
        for key in [k for k, b in buckets.items() if self._droppable(b, now)]:
            del buckets[key]

    def take(self, key: _K, now: float) -> float:
        """Take one token for ``key``; return when a failed outcome may be answered."""
        buckets = self.buckets
        bucket = buckets.get(key)
        if bucket is None:
            # Two per call keeps the table free of full buckets without a full scan.
            self.sweep(now, limit=2)
            while len(buckets) >= self.capacity:
                buckets.popitem(last=False)
            bucket = buckets[key] = _Bucket(self.burst, now)
        else:
            buckets.move_to_end(key)
            self._refill(bucket, now)
        level = bucket.level - 1.0
        if level < self.floor:
            # The debt stops at the floor, so the bucket is full again burst/rate + max_delay
            # after the last attempt; the part of the token not taken is remembered.
            bucket.forgiven += self.floor - level
            bucket.last_clamp = now
            level = self.floor
        bucket.level = level
        if level >= 0:
            return now
        return now + min(self.max_delay, -level / self.rate)

    def refund(self, key: _K, now: float) -> None:
        """Give back one token taken for ``key``, less what the floor forgave."""
        bucket = self.buckets.get(key)
        if bucket is None:
            return  # forgotten: as good as full
        self._refill(bucket, now)
        if bucket.forgiven and now >= bucket.last_clamp + self.pending:
            # No attempt made at the floor can still log in (its deadline has passed), so
            # this refund is for a whole token.
            bucket.forgiven = 0.0
        amount = 1.0
        paid = min(amount, bucket.forgiven)
        bucket.forgiven -= paid
        amount -= paid
        bucket.level = min(self.burst, bucket.level + amount)

    def tokens(self, key: _K, now: float) -> float:
        """The tokens ``key`` has at ``now`` (negative: reserved ahead), without changing
        anything."""
        bucket = self.buckets.get(key)
        if bucket is None:
            return self.burst
        elapsed = max(0.0, now - bucket.stamp)
        return min(self.burst, bucket.level + elapsed * self.rate)


class LoginThrottle:
    """When a failed login may be answered: token buckets per (address group, session), per
    address group and per session, charged at AUTH_START (see the module docstring for the
    guarantees and the guess rates they bound).

    The Gateway calls :meth:`attempt` at AUTH_START and keeps the time it returns; it answers
    a correct proof at once and calls :meth:`succeeded`; it answers a wrong one (or a
    malformed exchange) no earlier than that time, and keeps the link's unauthenticated slot
    taken until then even if the link closes first.
    """

    def __init__(
        self,
        login_timeout: float = 10.0,
        max_delay: float = DEFAULT_MAX_DELAY,
        capacity: int = DEFAULT_CAPACITY,
        pair: Rate = PAIR_RATE,
        address: Rate = ADDRESS_RATE,
        session: Rate = SESSION_RATE,
    ) -> None:
        """``max_delay`` is clamped to half of ``login_timeout``, so that a failed answer
        always leaves the client time before the deadline."""
        if login_timeout <= 0 or max_delay <= 0:
            raise ValueError("login_timeout and max_delay must be positive")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.login_timeout = login_timeout
        self.max_delay = min(max_delay, login_timeout / 2)
        self.capacity = capacity
        self._pairs: _Table[tuple[str, int]] = _Table(pair, self.max_delay, capacity,
                                                       login_timeout)
        self._addresses: _Table[str] = _Table(address, self.max_delay, capacity, login_timeout)
        self._sessions: _Table[int] = _Table(session, self.max_delay, capacity, login_timeout)

    def attempt(self, host: str, session_id: int, now: float) -> float:
        """A login attempt (AUTH_START) from ``host`` for ``session_id``: take a token from
        each of the three buckets and return the earliest time, in ``[now, now +
        max_delay]``, at which a failed outcome may be answered."""
        group = address_group(host)
        answer_at = max(
            self._pairs.take((group, session_id), now),
            self._addresses.take(group, now),
            self._sessions.take(session_id, now),
        )
        return min(answer_at, now + self.max_delay)

    def succeeded(self, host: str, session_id: int, now: float) -> None:
        """The attempt from ``host`` for ``session_id`` logged in: give back what it took
        from each bucket (one token each, less what a bucket at its floor forgave).  Call it
        once per successful :meth:`attempt`, never without one."""
        group = address_group(host)
        self._pairs.refund((group, session_id), now)
        self._addresses.refund(group, now)
        self._sessions.refund(session_id, now)

    def tokens(self, host: str, session_id: int, now: float) -> tuple[float, float, float]:
        """Tokens left at ``now`` in the (address group, session), address group and session
        buckets; negative means reserved ahead.  For tests and the status page."""
        group = address_group(host)
        return (
            self._pairs.tokens((group, session_id), now),
            self._addresses.tokens(group, now),
            self._sessions.tokens(session_id, now),
        )

    def sweep(self, now: float) -> None:
        """Forget every bucket that is as good as full (a status page may call this before
        reading :meth:`sizes`; attempts do a little of it on their own)."""
        for table in (self._pairs, self._addresses, self._sessions):
            table.forget_full(now)

    def sizes(self) -> dict[str, int]:
        """Buckets remembered per table (each at most ``capacity``)."""
        return {
            "address_sessions": len(self._pairs.buckets),
            "addresses": len(self._addresses.buckets),
            "sessions": len(self._sessions.buckets),
        }

    def __len__(self) -> int:
        """Buckets remembered in all three tables."""
        return sum(self.sizes().values())


def _slot_groups(host: str, per_address: int) -> list[tuple[str, int]]:
    """The groups a link from ``host`` counts in, with each one's cap: its address group
    and, for IPv6, also its /56 (what an ISP gives one home) and /48 (one site) at twice and
    four times the cap, so that one customer's many /64s cannot hold every slot."""
    group = address_group(host)
    if not group.endswith("/64"):
        return [(group, per_address)]
    prefix = int(ipaddress.IPv6Network(group).network_address)
    return [(group, per_address),
            (str(ipaddress.IPv6Network((prefix >> 72 << 72, 56))), 2 * per_address),
            (str(ipaddress.IPv6Network((prefix >> 80 << 80, 48))), 4 * per_address)]


class UnauthenticatedSlots:
    """Links still logging in: at most ``total`` at once, and at most ``per_address`` from
    one address group (:func:`address_group`; for IPv6 also 2 x per /56 and 4 x per /48).

    Both limits may be changed on the instance (a configuration reload); slots already taken
    stay taken.  A slot can be kept after its link closed until a given time (``hold_until``
    in :meth:`release`): the Gateway does that until the throttle's answer time of a link
    that did not log in, so closing early does not buy a faster next guess.  Held slots are
    freed by the first call given a ``now`` at or after their time.
    """

    def __init__(self, total: int, per_address: int) -> None:
        if total < 1 or per_address < 1:
            raise ValueError("slot limits must be at least 1")
        self.total = total
        self.per_address = per_address
        self._active: dict[str, int] = {}  # group -> slots of open links
        self._held: dict[str, int] = {}  # group -> slots kept after their link closed
        self._holds: list[tuple[float, int, str]] = []  # heap of (until, order, host)
        self._order = 0
        self._count = 0

    def acquire(self, host: str, now: float | None = None) -> str | None:
        """Take a slot for a new link from ``host``: None when granted, else which limit
        refused it (e.g. ``"32 unauthenticated links from 198.51.100.7"``).  Pass ``now``
        whenever slots are held, so that expired holds are freed first."""
        if now is not None:
            self.expire(now)
        if self._count >= self.total:
            return f"{self.total} unauthenticated links"
        groups = _slot_groups(host, self.per_address)
        for group, cap in groups:
            if self._active.get(group, 0) + self._held.get(group, 0) >= cap:
                return f"{cap} unauthenticated links from {group}"
        for group, _cap in groups:
            self._active[group] = self._active.get(group, 0) + 1
        self._count += 1
        return None

    def release(self, host: str, now: float | None = None,
                hold_until: float | None = None) -> None:
        """Give back the slot of a link from ``host`` (at once, or, given ``now`` and a later
        ``hold_until``, at that time).  A release without a matching acquire is ignored, so
        counts never go negative."""
        if now is not None:
            self.expire(now)
        groups = [group for group, _cap in _slot_groups(host, self.per_address)]
        if self._active.get(groups[0], 0) == 0:
            return
        for group in groups:
            active = self._active[group]
            if active == 1:
                del self._active[group]
            else:
                self._active[group] = active - 1
        if hold_until is not None and now is not None and hold_until > now:
            for group in groups:
                self._held[group] = self._held.get(group, 0) + 1
            self._order += 1
            heapq.heappush(self._holds, (hold_until, self._order, host))
            return
        self._count -= 1

    def expire(self, now: float) -> None:
        """Free the held slots whose time has come."""
        holds = self._holds
        while holds and holds[0][0] <= now:
            _, _, host = heapq.heappop(holds)
            for group, _cap in _slot_groups(host, self.per_address):
                held = self._held[group]
                if held == 1:
                    del self._held[group]
                else:
                    self._held[group] = held - 1
            self._count -= 1

    def next_expiry(self) -> float | None:
        """When the next held slot is freed (None: none held)."""
        return self._holds[0][0] if self._holds else None

    def count(self, host: str) -> int:
        """Slots taken by ``host``'s address group (open links and held slots)."""
        group = address_group(host)
        return self._active.get(group, 0) + self._held.get(group, 0)

    def held(self) -> int:
        """Slots kept after their links closed."""
        return len(self._holds)

    def __len__(self) -> int:
        """Slots taken in all (open links and held slots)."""
        return self._count
