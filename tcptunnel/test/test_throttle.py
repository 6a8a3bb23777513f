"""Tests for tcptunnel.throttle: the login throttle's bounds, decay and refunds, address
grouping, and the unauthenticated-slot limits."""

from __future__ import annotations

import copy
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel.throttle import (
    ADDRESS_RATE,
    PAIR_RATE,
    SESSION_RATE,
    LoginThrottle,
    Rate,
    UnauthenticatedSlots,
    address_group,
)

EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "150"))
T0 = 1_700_000_000.0  # a reactor.seconds()-sized clock, so float rounding is realistic
EPS = 1e-6
HOST = "198.51.100.7"
SESSION = 123
RATES = (PAIR_RATE, ADDRESS_RATE, SESSION_RATE)
# The longest time from the debt floor to full, over the three default buckets.
REFILL = max(rate.burst / rate.per_second for rate in RATES) + 5.0

# Hosts chosen so that several share an address group: two IPv6 addresses in one /64, an
# IPv4 address and its IPv4-mapped form, and a host that is no IP literal.
HOSTS = ["198.51.100.7", "::ffff:198.51.100.7", "198.51.100.8", "2001:db8:1:2::1",
         "2001:db8:1:2::ff", "2001:db8:1:3::1", "?"]
SESSIONS = [1, 2, -7]


def bucket_keys(host: str, session_id: int) -> list[tuple[str, object]]:
    """The three buckets an attempt from ``host`` for ``session_id`` is charged to."""
    group = address_group(host)
    return [("pair", (group, session_id)), ("address", group), ("session", session_id)]


RATE_OF = {"pair": PAIR_RATE, "address": ADDRESS_RATE, "session": SESSION_RATE}


class AddressGroupTests(SynchronousTestCase):
    """address_group: what counts as one address."""

    def test_ipv4_as_is(self) -> None:
        """An IPv4 literal is its own group."""
        self.assertEqual(address_group("198.51.100.7"), "198.51.100.7")
        self.assertNotEqual(address_group("198.51.100.7"), address_group("198.51.100.8"))

    def test_ipv6_by_64(self) -> None:
        """IPv6 literals are grouped by their /64, in canonical form, zone dropped."""
        self.assertEqual(address_group("2001:db8:1:2::1"), "2001:db8:1:2::/64")
        self.assertEqual(address_group("2001:0db8:0001:0002:ffff:ffff:ffff:ffff"),
                         "2001:db8:1:2::/64")
        self.assertEqual(address_group("2001:db8:1:3::1"), "2001:db8:1:3::/64")
        self.assertEqual(address_group("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(address_group("::1"), "::/64")

    def test_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 address (dual-stack listener) counts as the IPv4 address."""
        self.assertEqual(address_group("::ffff:198.51.100.7"), "198.51.100.7")

    def test_not_an_ip(self) -> None:
        """Anything that is not an IP literal is its own group, unchanged."""
        for host in ["?", "/run/tcptunnel.sock", "", "gw.example.org"]:
            self.assertEqual(address_group(host), host)


class LoginThrottleTests(SynchronousTestCase):
    """LoginThrottle: reservations, the delay cap, decay, refunds, grouping, memory."""

    def test_first_attempts_free(self) -> None:
        """Up to the smallest burst, attempts from one address are answered at once; the
        next reserves the next token of the (address, session) bucket, 1/rate apart."""
        throttle = LoginThrottle()
        for _ in range(PAIR_RATE.burst):
            self.assertEqual(throttle.attempt(HOST, SESSION, T0), T0)
        self.assertEqual(throttle.attempt(HOST, SESSION, T0), T0 + 2.0)
        self.assertEqual(throttle.attempt(HOST, SESSION, T0), T0 + 4.0)

    def test_part_of_a_token_waits(self) -> None:
        """An attempt that finds less than a whole token waits until the rest has refilled:
        half a token at T0 + 1 s means an answer at T0 + 2 s."""
        throttle = LoginThrottle()
        for _ in range(PAIR_RATE.burst):
            throttle.attempt(HOST, SESSION, T0)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0 + 1.0)[0], 0.5)
        self.assertEqual(throttle.attempt(HOST, SESSION, T0 + 1.0), T0 + 2.0)
        self.assertEqual(throttle.attempt(HOST, SESSION, T0 + 5.0), T0 + 5.0)

    def test_seven_at_once_then_quiet(self) -> None:
        """Seven attempts at once from one address (the old lockout) are answered within
        max_delay, and once the bucket has refilled (here 14 s) a new one is answered at
        once: no lockout, the count decays."""
        throttle = LoginThrottle()
        answers = [throttle.attempt(HOST, SESSION, T0) for _ in range(7)]
        self.assertEqual(answers, [T0] * 5 + [T0 + 2.0, T0 + 4.0])
        # 5 - 7 = -2 tokens; full again after (5 + 2) / 0.5 = 14 s.
        self.assertLess(throttle.tokens(HOST, SESSION, T0 + 13.9)[0], PAIR_RATE.burst)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0 + 14.0),
                         (PAIR_RATE.burst, ADDRESS_RATE.burst, SESSION_RATE.burst))
        self.assertEqual(throttle.attempt(HOST, SESSION, T0 + 14.0), T0 + 14.0)

    def test_hundred_at_once_then_quiet(self) -> None:
        """A hundred attempts at once are all answered within max_delay; the debt stops at
        rate * max_delay, so a new attempt is answered at once 7 s later and every bucket is
        full burst/rate + max_delay (15 s) after the attack, not before."""
        throttle = LoginThrottle()
        answers = [throttle.attempt(HOST, SESSION, T0) for _ in range(100)]
        self.assertTrue(all(T0 <= a <= T0 + 5.0 for a in answers))
        self.assertEqual(answers[-1], T0 + 5.0)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0), (-2.5, -10.0, -15.0))
        for rate, tokens in zip(RATES, throttle.tokens(HOST, SESSION, T0 + 14.9), strict=True):
            self.assertLess(tokens, rate.burst)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0 + 15.0),
                         (PAIR_RATE.burst, ADDRESS_RATE.burst, SESSION_RATE.burst))
        # From -2.5 the (address, session) bucket has a whole token again after 7 s.
        self.assertEqual(throttle.attempt(HOST, SESSION, T0 + 7.0), T0 + 7.0)

    def test_long_attack_then_quiet(self) -> None:
        """An attack of 10 attempts/s for an hour still leaves every bucket full 15 s after
        it stops."""
        throttle = LoginThrottle()
        now = T0
        for _ in range(36_000):
            self.assertLessEqual(throttle.attempt(HOST, SESSION, now), now + 5.0)
            now += 0.1
        self.assertEqual(throttle.tokens(HOST, SESSION, now + 15.0),
                         (PAIR_RATE.burst, ADDRESS_RATE.burst, SESSION_RATE.burst))
        self.assertEqual(throttle.attempt(HOST, SESSION, now + 15.0), now + 15.0)

    def test_max_delay_clamped_to_half_the_login_deadline(self) -> None:
        """max_delay is at most half the login deadline, and answers keep to it."""
        self.assertEqual(LoginThrottle().max_delay, 5.0)
        self.assertEqual(LoginThrottle(login_timeout=4.0).max_delay, 2.0)
        self.assertEqual(LoginThrottle(login_timeout=60.0, max_delay=3.0).max_delay, 3.0)
        throttle = LoginThrottle(login_timeout=4.0)
        answers = [throttle.attempt(HOST, SESSION, T0) for _ in range(50)]
        self.assertEqual(max(answers), T0 + 2.0)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0)[0], -1.0)

    def test_bad_parameters(self) -> None:
        """Nonsense parameters are refused at construction."""
        for kwargs in [{"login_timeout": 0.0}, {"max_delay": -1.0}, {"capacity": 0},
                       {"pair": Rate(0, 1.0)}, {"session": Rate(5, 0.0)}]:
            with self.assertRaises(ValueError):
                LoginThrottle(**kwargs)  # type: ignore[arg-type]

    def test_batch_plus_one_success_refunds_one_token(self) -> None:
        """A batch of six guesses plus one good login gets back exactly one token in each
        bucket: the count is not cleared."""
        throttle = LoginThrottle()
        for _ in range(6):
            throttle.attempt(HOST, SESSION, T0)
        throttle.attempt(HOST, SESSION, T0)  # the good login's own attempt
        self.assertEqual(throttle.tokens(HOST, SESSION, T0), (-2.0, 13.0, 23.0))
        throttle.succeeded(HOST, SESSION, T0)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0), (-1.0, 14.0, 24.0))
        # The next guess still waits for its reservation.
        self.assertEqual(throttle.attempt(HOST, SESSION, T0), T0 + 4.0)

    def test_good_logins_at_the_floor_do_not_pump(self) -> None:
        """Thirty parallel good logins made while the buckets sit at their floor give back
        nothing they did not take: no bucket ends fuller than before them."""
        throttle = LoginThrottle()
        for _ in range(100):
            throttle.attempt(HOST, SESSION, T0)
        before = throttle.tokens(HOST, SESSION, T0)
        for _ in range(30):
            throttle.attempt(HOST, SESSION, T0)
        for _ in range(30):
            throttle.succeeded(HOST, SESSION, T0)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0), before)

    def test_forgiveness_ends_after_the_login_deadline(self) -> None:
        """Once no attempt made at the floor can still log in, a good login gets its whole
        token back again."""
        throttle = LoginThrottle()
        for _ in range(100):
            throttle.attempt(HOST, SESSION, T0)
        now = T0 + 10.5  # past the 10 s login deadline of every attempt made at T0
        throttle.attempt(HOST, SESSION, now)
        before = throttle.tokens(HOST, SESSION, now)
        throttle.succeeded(HOST, SESSION, now)
        after = throttle.tokens(HOST, SESSION, now)
        self.assertEqual([a - b for a, b in zip(after, before, strict=True)], [1.0, 1.0, 1.0])

    def test_success_of_a_forgotten_bucket(self) -> None:
        """A good login whose buckets were forgotten (full, or evicted) changes nothing."""
        throttle = LoginThrottle()
        throttle.succeeded(HOST, SESSION, T0)
        self.assertEqual(len(throttle), 0)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0),
                         (PAIR_RATE.burst, ADDRESS_RATE.burst, SESSION_RATE.burst))

    def test_ipv6_64_shares_buckets(self) -> None:
        """Two IPv6 hosts in one /64 drain the same buckets; another /64 does not."""
        throttle = LoginThrottle()
        for _ in range(PAIR_RATE.burst):
            throttle.attempt("2001:db8:1:2::1", SESSION, T0)
        self.assertEqual(throttle.attempt("2001:db8:1:2::abcd", SESSION, T0), T0 + 2.0)
        self.assertEqual(throttle.attempt("2001:db8:1:3::1", SESSION, T0), T0)
        self.assertEqual(throttle.tokens("2001:db8:1:3::1", SESSION, T0)[:2],
                         (PAIR_RATE.burst - 1, ADDRESS_RATE.burst - 1))

    def test_ipv4_mapped_shares_buckets(self) -> None:
        """An IPv4-mapped IPv6 peer and the same IPv4 peer drain the same buckets."""
        throttle = LoginThrottle()
        for _ in range(PAIR_RATE.burst):
            throttle.attempt("::ffff:198.51.100.7", SESSION, T0)
        self.assertEqual(throttle.attempt("198.51.100.7", SESSION, T0), T0 + 2.0)
        self.assertEqual(throttle.attempt("198.51.100.8", SESSION, T0), T0)

    def test_address_bucket_over_sessions(self) -> None:
        """One address trying many sessions runs into its per-address bucket (20)."""
        throttle = LoginThrottle()
        answers = [throttle.attempt(HOST, session_id, T0) for session_id in range(21)]
        self.assertEqual(answers, [T0] * 20 + [T0 + 0.5])

    def test_session_bucket_over_addresses(self) -> None:
        """Many addresses guessing one session run into its per-session bucket (30)."""
        throttle = LoginThrottle()
        answers = [throttle.attempt(f"203.0.113.{i}", SESSION, T0) for i in range(31)]
        self.assertEqual(answers, [T0] * 30 + [T0 + 1 / 3])

    def test_capacity_bound(self) -> None:
        """Ten thousand addresses, each trying one session, keep every table at most at its
        capacity; after the attack, a sweep forgets every full bucket."""
        throttle = LoginThrottle(capacity=1000)
        now = T0
        for i in range(10_000):
            throttle.attempt(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", i % 3000, now)
            now += 0.001
            for size in throttle.sizes().values():
                self.assertLessEqual(size, 1000)
        throttle.sweep(now + REFILL + 10.0)
        self.assertEqual(throttle.sizes(), {"address_sessions": 0, "addresses": 0,
                                            "sessions": 0})

    def test_default_capacity(self) -> None:
        """The default tables stay at 4,096 buckets each under 20,000 fresh IPv6 /64s."""
        throttle = LoginThrottle()
        for i in range(20_000):
            throttle.attempt(f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1", i, T0)
        self.assertEqual(throttle.sizes(), {"address_sessions": 4096, "addresses": 4096,
                                            "sessions": 4096})
        self.assertEqual(len(throttle), 3 * 4096)

    def test_recently_used_survives_eviction(self) -> None:
        """Eviction forgets the least recently used bucket: a session under attack keeps its
        debt while other keys churn through the table."""
        throttle = LoginThrottle(capacity=10)
        for _ in range(50):
            throttle.attempt(HOST, SESSION, T0)
        for i in range(9):  # the session table is full now
            throttle.attempt(HOST, i, T0)
        throttle.attempt(HOST, SESSION, T0)  # the attack goes on
        throttle.attempt(HOST, 9, T0)  # a new key: the least recently used one goes
        self.assertEqual(throttle.tokens(HOST, SESSION, T0)[2], -15.0)
        self.assertEqual(throttle.tokens(HOST, 0, T0)[2], SESSION_RATE.burst)
        self.assertEqual(throttle.tokens(HOST, 1, T0)[2], SESSION_RATE.burst - 1)
        # Only after ten other keys, all still in debt, is the attacked session forgotten.
        for i in range(10, 20):
            throttle.attempt(HOST, i, T0)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0)[2], SESSION_RATE.burst)

    def test_full_buckets_are_dropped_early(self) -> None:
        """Buckets that refilled are dropped by later attempts, without a sweep."""
        throttle = LoginThrottle()
        for i in range(50):
            throttle.attempt(f"198.51.100.{i}", i, T0)
        now = T0 + 1.0  # one token is back after 1/rate <= 2 s
        for i in range(50, 100):
            now += 1.0
            throttle.attempt(f"198.51.100.{i}", i, now)
        self.assertLessEqual(max(throttle.sizes().values()), 10)

    def test_clock_stepping_back(self) -> None:
        """A clock that steps back refills nothing and never yields an answer before now."""
        throttle = LoginThrottle()
        for _ in range(10):
            throttle.attempt(HOST, SESSION, T0)
        answer = throttle.attempt(HOST, SESSION, T0 - 100.0)
        self.assertTrue(T0 - 100.0 <= answer <= T0 - 95.0)
        self.assertEqual(throttle.tokens(HOST, SESSION, T0)[0], -2.5)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """Operations: ("attempt", host, session) repeated ``n`` times at once,
    ("success", index of an earlier attempt, 0) and ("advance", milliseconds, 0)."""
    ops: list[tuple[str, int, int]] = []
    attempts = 0
    for _ in range(draw(st.integers(min_value=1, max_value=60))):
        kind = draw(st.sampled_from(["attempt", "attempt", "burst", "success", "advance"]))
        if kind == "success" and attempts:
            ops.append(("success", draw(st.integers(0, attempts - 1)), 0))
        elif kind == "advance":
            ops.append(("advance", draw(st.sampled_from(
                [0, 1, 100, 250, 333, 500, 1000, 2000, 6000])), 0))
        else:
            count = draw(st.integers(1, 40)) if kind == "burst" else 1
            host = draw(st.integers(0, len(HOSTS) - 1))
            session = draw(st.integers(0, len(SESSIONS) - 1))
            ops.extend([("attempt", host, session)] * count)
            attempts += count
    return ops


class LoginThrottlePropertyTests(SynchronousTestCase):
    """Properties over arbitrary interleavings of attempts, good logins and time."""

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(histories())
    def test_bounds(self, ops: list[tuple[str, int, int]]) -> None:
        """Answers are in [now, now + max_delay]; per bucket, attempts answered at once in
        any window of T seconds are at most burst + rate * T (plus one per good login in the
        window); and burst/rate + max_delay after the last operation every bucket is full
        and an attempt is answered at once."""
        throttle = LoginThrottle()
        now = T0
        attempts: list[tuple[float, str, int, bool]] = []  # time, host, session, at once
        succeeded: set[int] = set()
        successes: list[tuple[float, str, int]] = []
        for kind, a, b in ops:
            if kind == "advance":
                now += a / 1000
            elif kind == "attempt":
                host, session_id = HOSTS[a], SESSIONS[b]
                answer = throttle.attempt(host, session_id, now)
                self.assertGreaterEqual(answer, now)
                self.assertLessEqual(answer, now + throttle.max_delay)
                attempts.append((now, host, session_id, answer == now))
            elif a not in succeeded:  # a good login, once per attempt
                succeeded.add(a)
                _, host, session_id, _ = attempts[a]
                throttle.succeeded(host, session_id, now)
                successes.append((now, host, session_id))
            for host in HOSTS:
                for session_id in SESSIONS:
                    for rate, tokens in zip(RATES, throttle.tokens(host, session_id, now),
                                            strict=True):
                        self.assertGreaterEqual(tokens,
                                                -rate.per_second * throttle.max_delay - EPS)
                        self.assertLessEqual(tokens, rate.burst)
        # The window bound, per bucket.
        keys = {key for _, host, session_id, _ in attempts
                for key in bucket_keys(host, session_id)}
        for key in keys:
            rate = RATE_OF[key[0]]
            free = [t for t, host, session_id, at_once in attempts
                    if at_once and key in bucket_keys(host, session_id)]
            refunds = [t for t, host, session_id in successes
                       if key in bucket_keys(host, session_id)]
            for i, start in enumerate(free):
                for j in range(i, len(free)):
                    end = free[j]
                    in_window = j - i + 1
                    refunded = sum(1 for t in refunds if start <= t <= end)
                    self.assertLessEqual(
                        in_window, rate.burst + rate.per_second * (end - start) + refunded + EPS)
        # Decay: full again, and the next attempt is answered at once.
        quiet = now + REFILL
        for host in HOSTS:
            for session_id in SESSIONS:
                self.assertEqual(throttle.tokens(host, session_id, quiet),
                                 (PAIR_RATE.burst, ADDRESS_RATE.burst, SESSION_RATE.burst))
        for host in HOSTS:
            self.assertEqual(throttle.attempt(host, SESSIONS[0], quiet), quiet)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(histories(), st.integers(0, len(HOSTS) - 1), st.integers(0, len(SESSIONS) - 1),
           st.integers(1, 40))
    def test_good_logins_never_add(self, ops: list[tuple[str, int, int]], host_index: int,
                                   session_index: int, count: int) -> None:
        """After any history, ``count`` attempts that all log in at one instant leave no
        bucket fuller than it was before them, and exactly as full when they all found a
        token and no bucket forgave anything within the login deadline."""
        throttle = LoginThrottle()
        now = T0
        floored_at: float | None = None  # when a bucket last sat at its floor
        for kind, a, b in ops:
            if kind == "advance":
                now += a / 1000
            elif kind == "attempt":
                throttle.attempt(HOSTS[a], SESSIONS[b], now)
                tokens = throttle.tokens(HOSTS[a], SESSIONS[b], now)
                if any(t <= -rate.per_second * throttle.max_delay + EPS
                       for rate, t in zip(RATES, tokens, strict=True)):
                    floored_at = now
        host, session_id = HOSTS[host_index], SESSIONS[session_index]
        before = copy.deepcopy(throttle)
        for _ in range(count):
            throttle.attempt(host, session_id, now)
        for _ in range(count):
            throttle.succeeded(host, session_id, now)
        for other_host in HOSTS:
            for other_session in SESSIONS:
                old = before.tokens(other_host, other_session, now)
                new = throttle.tokens(other_host, other_session, now)
                for old_tokens, new_tokens in zip(old, new, strict=True):
                    self.assertLessEqual(new_tokens, old_tokens + EPS)
        old = before.tokens(host, session_id, now)
        forgiving = floored_at is not None and now < floored_at + throttle.login_timeout
        if all(tokens >= count for tokens in old) and not forgiving:
            self.assertEqual(throttle.tokens(host, session_id, now), old)


class UnauthenticatedSlotsTests(SynchronousTestCase):
    """UnauthenticatedSlots: the total and per-address caps, release, grouping, holds."""

    def test_total_cap(self) -> None:
        """Beyond ``total`` slots, acquire names the total limit; a release makes room."""
        slots = UnauthenticatedSlots(total=3, per_address=32)
        for i in range(3):
            self.assertIsNone(slots.acquire(f"198.51.100.{i}"))
        self.assertEqual(slots.acquire("198.51.100.9"), "3 unauthenticated links")
        self.assertEqual(len(slots), 3)
        slots.release("198.51.100.1")
        self.assertIsNone(slots.acquire("198.51.100.9"))

    def test_per_address_cap(self) -> None:
        """Beyond ``per_address`` slots from one address, acquire names that address; other
        addresses still get slots."""
        slots = UnauthenticatedSlots(total=256, per_address=32)
        for _ in range(32):
            self.assertIsNone(slots.acquire(HOST))
        self.assertEqual(slots.acquire(HOST), "32 unauthenticated links from 198.51.100.7")
        self.assertIsNone(slots.acquire("198.51.100.8"))
        self.assertEqual((slots.count(HOST), slots.count("198.51.100.8"), len(slots)),
                         (32, 1, 33))
        slots.release(HOST)
        self.assertIsNone(slots.acquire(HOST))

    def test_grouping(self) -> None:
        """One IPv6 /64 is one address; an IPv4-mapped peer is its IPv4 address."""
        slots = UnauthenticatedSlots(total=256, per_address=2)
        self.assertIsNone(slots.acquire("2001:db8:1:2::1"))
        self.assertIsNone(slots.acquire("2001:db8:1:2::2"))
        self.assertEqual(slots.acquire("2001:db8:1:2::3"),
                         "2 unauthenticated links from 2001:db8:1:2::/64")
        self.assertIsNone(slots.acquire("2001:db8:1:3::1"))
        self.assertIsNone(slots.acquire("::ffff:198.51.100.7"))
        self.assertIsNone(slots.acquire("198.51.100.7"))
        self.assertIsNotNone(slots.acquire("::ffff:198.51.100.7"))
        slots.release("::ffff:198.51.100.7")
        self.assertEqual(slots.count("198.51.100.7"), 1)

    def test_never_negative(self) -> None:
        """A release without an acquire is ignored: counts never go negative."""
        slots = UnauthenticatedSlots(total=2, per_address=1)
        slots.release(HOST)
        self.assertEqual((len(slots), slots.count(HOST)), (0, 0))
        self.assertIsNone(slots.acquire(HOST))
        slots.release(HOST)
        slots.release(HOST)
        self.assertEqual((len(slots), slots.count(HOST)), (0, 0))
        self.assertIsNone(slots.acquire(HOST))

    def test_hold_until(self) -> None:
        """A slot released with a later ``hold_until`` stays taken until then, and is freed
        by the first call given a ``now`` at or after it."""
        slots = UnauthenticatedSlots(total=256, per_address=1)
        self.assertIsNone(slots.acquire(HOST, T0))
        slots.release(HOST, T0, hold_until=T0 + 5.0)
        self.assertEqual((len(slots), slots.count(HOST), slots.held()), (1, 1, 1))
        self.assertEqual(slots.next_expiry(), T0 + 5.0)
        self.assertEqual(slots.acquire(HOST, T0 + 4.9), "1 unauthenticated links from "
                         "198.51.100.7")
        self.assertIsNone(slots.acquire(HOST, T0 + 5.0))
        self.assertEqual((len(slots), slots.held(), slots.next_expiry()), (1, 0, None))

    def test_hold_in_the_past_releases_at_once(self) -> None:
        """A ``hold_until`` that has passed (a correct login's, or none) frees at once."""
        slots = UnauthenticatedSlots(total=256, per_address=1)
        slots.acquire(HOST, T0)
        slots.release(HOST, T0 + 1.0, hold_until=T0 + 1.0)
        self.assertEqual((len(slots), slots.held()), (0, 0))

    def test_held_slots_count_toward_the_total(self) -> None:
        """Held slots count toward the total cap, and expire() frees them."""
        slots = UnauthenticatedSlots(total=2, per_address=32)
        slots.acquire("198.51.100.1", T0)
        slots.acquire("198.51.100.2", T0)
        slots.release("198.51.100.1", T0, hold_until=T0 + 3.0)
        self.assertEqual(slots.acquire("198.51.100.3", T0 + 1.0), "2 unauthenticated links")
        slots.expire(T0 + 3.0)
        self.assertEqual(len(slots), 1)
        self.assertIsNone(slots.acquire("198.51.100.3", T0 + 3.0))

    def test_limits_changed(self) -> None:
        """Lowering a limit on the instance refuses new slots until enough are released;
        slots already taken are kept."""
        slots = UnauthenticatedSlots(total=256, per_address=32)
        for _ in range(4):
            slots.acquire(HOST)
        slots.per_address = 2
        self.assertIsNotNone(slots.acquire(HOST))
        self.assertEqual(slots.count(HOST), 4)
        for _ in range(3):
            slots.release(HOST)
        self.assertIsNone(slots.acquire(HOST))

    def test_bad_limits(self) -> None:
        """Limits below one are refused."""
        with self.assertRaises(ValueError):
            UnauthenticatedSlots(total=0, per_address=1)
        with self.assertRaises(ValueError):
            UnauthenticatedSlots(total=1, per_address=0)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["acquire", "release", "hold", "advance"]),
                              st.integers(0, len(HOSTS) - 1)), max_size=120))
    def test_model(self, ops: list[tuple[str, int]]) -> None:
        """Against a plain model over arbitrary acquires, releases, holds and time: both
        caps always hold, counts never go negative, and refusals name the right limit."""
        slots = UnauthenticatedSlots(total=6, per_address=3)
        now = T0
        active: dict[str, int] = {}
        holds: list[tuple[float, str]] = []
        for kind, index in ops:
            group = address_group(HOSTS[index])
            holds = [(until, g) for until, g in holds if until > now]
            if kind == "advance":
                now += 1.0
                continue
            held = sum(1 for _, g in holds if g == group)
            if kind == "acquire":
                total = sum(active.values()) + len(holds)
                refusal = slots.acquire(HOSTS[index], now)
                if total >= 6:
                    self.assertEqual(refusal, "6 unauthenticated links")
                elif active.get(group, 0) + held >= 3:
                    self.assertEqual(refusal, f"3 unauthenticated links from {group}")
                else:
                    self.assertIsNone(refusal)
                    active[group] = active.get(group, 0) + 1
            else:
                hold_until = now + 2.5 if kind == "hold" else None
                slots.release(HOSTS[index], now, hold_until)
                if active.get(group, 0):
                    active[group] -= 1
                    if hold_until is not None:
                        holds.append((hold_until, group))
            self.assertEqual(len(slots), sum(active.values()) + len(holds))
            self.assertLessEqual(len(slots), 6)
            for host in HOSTS:
                g = address_group(host)
                count = active.get(g, 0) + sum(1 for _, h in holds if h == g)
                self.assertEqual(slots.count(host), count)
                self.assertLessEqual(count, 3)
