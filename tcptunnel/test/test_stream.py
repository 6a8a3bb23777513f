"""Tests for :mod:`tcptunnel._stream`: the stream transition table and the per-direction rules.

The table is checked against an independent statement of the rules of ``docs/protocol.md`` §5
(:class:`RuleModel`, written with flags the way the multiplexer used to compute its state),
exhaustively over every reachable state and by a hypothesis state machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _frames as fr
from tcptunnel._frames import Reason, StreamError
from tcptunnel._stream import (
    CAN_SEND_FIN,
    OPENING_STATES,
    TRANSITIONS,
    CreditRtt,
    Direction,
    StreamEvent,
    StreamState,
    advance,
)

S = StreamState
E = StreamEvent


#: What each event changes in :class:`RuleModel` (DATA changes nothing).
_CHANGES: dict[StreamEvent, dict[str, object]] = {
    E.SEND_OPEN: {"role": "opener"},
    E.RECV_OPEN: {"role": "acceptor"},
    E.SEND_OPEN_OK: {"answered": True},
    E.RECV_OPEN_OK: {"answered": True},
    E.SEND_FIN: {"fin_sent": True},
    E.RECV_FIN: {"fin_received": True},
    E.SEND_OPEN_FAILED: {"reset": True},
    E.RECV_OPEN_FAILED: {"reset": True},
    E.SEND_RESET: {"reset": True},
    E.RECV_RESET: {"reset": True},
}


@dataclass(frozen=True)
class RuleModel:
    """The stream rules stated with flags, independently of the table."""

    role: str = ""  # "" before OPEN, then "opener" or "acceptor"
    answered: bool = False  # OPEN_RESULT ok crossed
    fin_sent: bool = False
    fin_received: bool = False
    reset: bool = False

    @property
    def closed(self) -> bool:
        return self.fin_sent and self.fin_received

    def allows(self, event: StreamEvent) -> bool:
        """Whether the protocol allows ``event`` now."""
        if self.reset or self.closed:
            return False
        if event in (E.SEND_OPEN, E.RECV_OPEN):
            return not self.role
        if not self.role:
            return False
        opener = self.role == "opener"
        if event in (E.SEND_OPEN_OK, E.SEND_OPEN_FAILED):
            return not opener and not self.answered
        if event in (E.RECV_OPEN_OK, E.RECV_OPEN_FAILED):
            return opener and not self.answered
        if event in (E.SEND_DATA, E.SEND_FIN):
            # The opener may send early data and a FIN before OPEN_RESULT; the acceptor
            # sends nothing before it accepted.
            return not self.fin_sent and (self.answered or opener)
        if event in (E.RECV_DATA, E.RECV_FIN):
            return not self.fin_received and (self.answered or not opener)
        return True  # SEND_RESET, RECV_RESET on a live stream

    def apply(self, event: StreamEvent) -> RuleModel:
        """The model after an allowed ``event``."""
        return replace(self, **_CHANGES.get(event, {}))  # type: ignore[arg-type]

    def state(self) -> StreamState:
        """The table's name for this model state."""
        if self.reset:
            return S.RESET
        if not self.role:
            return S.IDLE
        if not self.answered:
            if self.role == "opener":
                return S.OPEN_SENT_FIN_SENT if self.fin_sent else S.OPEN_SENT
            return S.OPEN_RECEIVED_FIN_RECEIVED if self.fin_received else S.OPEN_RECEIVED
        if self.closed:
            return S.CLOSED
        if self.fin_sent:
            return S.HALF_CLOSED_LOCAL
        return S.HALF_CLOSED_REMOTE if self.fin_received else S.OPEN


def reachable_models() -> list[RuleModel]:
    """Every model state reachable from a fresh stream."""
    seen = {RuleModel()}
    todo = [RuleModel()]
    while todo:
        model = todo.pop()
        for event in StreamEvent:
            if model.allows(event):
                after = model.apply(event)
                if after not in seen:
                    seen.add(after)
                    todo.append(after)
    return sorted(seen, key=repr)


class TransitionTableTests(SynchronousTestCase):
    """The table says exactly what the protocol allows."""

    def test_table_matches_rules_exhaustively(self) -> None:
        """From every reachable state, each event moves as the rules say or raises."""
        models = reachable_models()
        self.assertEqual({m.state() for m in models}, set(StreamState))
        for model in models:
            for event in StreamEvent:
                state = model.state()
                if model.allows(event):
                    self.assertEqual(advance(state, event), model.apply(event).state(),
                                     (state, event))
                else:
                    with self.assertRaises(StreamError) as raised:
                        advance(state, event)
                    self.assertEqual(raised.exception.reason, Reason.PROTOCOL_ERROR)
                    self.assertEqual(raised.exception.message,
                                     f"{event.name} in state {state.value}")

    def test_no_unreachable_entries(self) -> None:
        """Every entry of the table is used by some reachable state (no dead rules)."""
        used = {(m.state(), e) for m in reachable_models() for e in StreamEvent if m.allows(e)}
        self.assertEqual(set(TRANSITIONS), used)

    def test_terminal_states(self) -> None:
        """CLOSED and RESET have no way out; every other state has a way to a terminal one."""
        for state in (S.CLOSED, S.RESET):
            self.assertTrue(state.terminal)
            self.assertEqual([e for (s, e) in TRANSITIONS if s is state], [])
        for state in StreamState:
            if not state.terminal and state is not S.IDLE:
                self.assertIs(TRANSITIONS[state, E.SEND_RESET], S.RESET)
                self.assertIs(TRANSITIONS[state, E.RECV_RESET], S.RESET)

    def test_opener_early_fin(self) -> None:
        """The opener may FIN before OPEN_RESULT; the answer then leaves it half-closed."""
        state = advance(advance(S.IDLE, E.SEND_OPEN), E.SEND_DATA)
        state = advance(state, E.SEND_FIN)
        self.assertIs(state, S.OPEN_SENT_FIN_SENT)
        self.assertTrue(state.opening)
        self.assertIs(advance(state, E.RECV_OPEN_OK), S.HALF_CLOSED_LOCAL)

    def test_opener_receives_nothing_before_result(self) -> None:
        """DATA or FIN reaching the opener before OPEN_RESULT is a protocol error."""
        for event in (E.RECV_DATA, E.RECV_FIN):
            with self.assertRaises(StreamError) as raised:
                advance(S.OPEN_SENT, event)
            self.assertEqual(raised.exception.message,
                             f"{event.name} in state opening (OPEN sent)")

    def test_acceptor_takes_early_fin_sends_nothing(self) -> None:
        """The acceptor may receive the early FIN, but sends no DATA or FIN before accepting."""
        state = advance(advance(S.IDLE, E.RECV_OPEN), E.RECV_DATA)
        for event in (E.SEND_DATA, E.SEND_FIN):
            self.assertRaises(StreamError, advance, state, event)
        state = advance(state, E.RECV_FIN)
        self.assertIs(state, S.OPEN_RECEIVED_FIN_RECEIVED)
        self.assertIs(advance(state, E.SEND_OPEN_OK), S.HALF_CLOSED_REMOTE)
        self.assertIs(advance(S.HALF_CLOSED_REMOTE, E.SEND_FIN), S.CLOSED)

    def test_closed_after_fin_both_ways(self) -> None:
        """An open stream is closed once FIN went both ways, in either order."""
        self.assertIs(advance(advance(S.OPEN, E.SEND_FIN), E.RECV_FIN), S.CLOSED)
        self.assertIs(advance(advance(S.OPEN, E.RECV_FIN), E.SEND_FIN), S.CLOSED)

    def test_derived_sets(self) -> None:
        """OPENING_STATES and CAN_SEND_FIN agree with the table and the OPENING alias."""
        self.assertEqual(CAN_SEND_FIN, {S.OPEN_SENT, S.OPEN, S.HALF_CLOSED_REMOTE})
        self.assertEqual(OPENING_STATES, {s for s in StreamState if s.value.startswith("opening")})
        self.assertIs(S.OPENING, S.OPEN_RECEIVED)

    def test_values_are_readable(self) -> None:
        """Each state has a distinct human-readable value for logs."""
        values = [s.value for s in StreamState]
        self.assertEqual(len(values), len(set(values)))
        self.assertTrue(all(v and v[0].islower() for v in values))


class StreamLifecycle(RuleBasedStateMachine):
    """Random event sequences: the table and the rule model never disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.state = S.IDLE
        self.model = RuleModel()

    @rule(event=st.sampled_from(StreamEvent))
    def happen(self, event: StreamEvent) -> None:
        """Apply one event; it either moves per the rules or raises PROTOCOL_ERROR."""
        if self.model.allows(event):
            self.state = advance(self.state, event)
            self.model = self.model.apply(event)
        else:
            try:
                advance(self.state, event)
            except StreamError as e:
                assert e.reason is Reason.PROTOCOL_ERROR, e.reason
            else:
                raise AssertionError(f"{event} allowed in {self.state}")

    @invariant()
    def agrees(self) -> None:
        """The state the table reached is the state the rules describe."""
        assert self.state is self.model.state(), (self.state, self.model)

    @invariant()
    def terminal_is_terminal(self) -> None:
        """From CLOSED or RESET every event raises."""
        if self.state.terminal:
            for event in StreamEvent:
                try:
                    advance(self.state, event)
                except StreamError:
                    continue
                raise AssertionError(f"{event} leaves {self.state}")


class StreamLifecycleTests(SynchronousTestCase):
    """Hypothesis drives :class:`StreamLifecycle`."""

    def test_random_lifecycles(self) -> None:
        """Random event sequences keep the table and the rule model in agreement."""
        run_state_machine_as_test(
            StreamLifecycle, settings=settings(max_examples=200, stateful_step_count=20,
                                               deadline=None))


class DirectionTests(SynchronousTestCase):
    """The per-direction checks shared by the multiplexer and the relay."""

    def test_take_within_credit(self) -> None:
        """DATA within the credit spends it, down to zero."""
        direction = Direction(100)
        direction.take(60)
        direction.take(40)
        self.assertEqual(direction.credit, 0)
        direction.take(0)

    def test_take_beyond_credit(self) -> None:
        """DATA beyond the credit is FLOW_CONTROL naming both sizes, and spends nothing."""
        direction = Direction(100)
        with self.assertRaises(StreamError) as raised:
            direction.take(101)
        self.assertEqual(raised.exception.reason, Reason.FLOW_CONTROL)
        self.assertEqual(raised.exception.message,
                         "101 bytes of DATA with only 100 bytes of window")
        self.assertEqual(direction.credit, 100)

    def test_data_after_fin(self) -> None:
        """DATA after FIN is a PROTOCOL_ERROR even with credit left."""
        direction = Direction(100)
        direction.end()
        with self.assertRaises(StreamError) as raised:
            direction.take(1)
        self.assertEqual(raised.exception.reason, Reason.PROTOCOL_ERROR)
        self.assertEqual(raised.exception.message, "DATA after FIN")

    def test_fin_twice(self) -> None:
        """A second FIN in one direction is a PROTOCOL_ERROR."""
        direction = Direction()
        direction.end()
        self.assertTrue(direction.fin)
        with self.assertRaises(StreamError) as raised:
            direction.end()
        self.assertEqual(raised.exception.reason, Reason.PROTOCOL_ERROR)

    def test_grant_up_to_the_limit(self) -> None:
        """Credit may reach 2^31-1 but not pass it; a refused grant changes nothing."""
        direction = Direction(10)
        direction.grant(fr.MAX_WINDOW - 10)
        self.assertEqual(direction.credit, fr.MAX_WINDOW)
        with self.assertRaises(StreamError) as raised:
            direction.grant(1)
        self.assertEqual(raised.exception.reason, Reason.FLOW_CONTROL)
        self.assertIn("past 2^31-1", raised.exception.message)
        self.assertEqual(direction.credit, fr.MAX_WINDOW)

    def test_small(self) -> None:
        """A Direction has no instance dict (two per stream, two per route)."""
        self.assertFalse(hasattr(Direction(), "__dict__"))


class CreditRttTests(SynchronousTestCase):
    """Credit round trips: the windowed minimum, the moving average, the queueing signal."""

    def test_minimum_over_one_to_two_periods(self) -> None:
        """The minimum forgets a sample once two bucket changes passed it, not before."""
        rtt = CreditRtt(period=30.0)
        rtt.sample(0.010, 0.0)
        rtt.sample(0.005, 10.0)
        self.assertEqual(rtt.min_rtt, 0.005)
        rtt.sample(0.020, 31.0)  # a new bucket: the old one's 5 ms is still remembered
        self.assertEqual(rtt.min_rtt, 0.005)
        rtt.sample(0.030, 62.0)  # and again: the 5 ms bucket is gone, 20 ms is the least
        self.assertEqual(rtt.min_rtt, 0.020)

    def test_queueing_allowance_on_a_short_path(self) -> None:
        """With a minimum under the allowance, 4 ms of extra delay is tolerated, not more."""
        rtt = CreditRtt(allowance=0.004)
        rtt.sample(0.001, 0.0)
        rtt.srtt = 0.0049
        self.assertFalse(rtt.queueing())
        rtt.srtt = 0.0052
        self.assertTrue(rtt.queueing())

    def test_queueing_allowance_on_a_long_path(self) -> None:
        """A long path (80 ms) tolerates its own round trip of queue: windows there still
        grow to the bandwidth-delay product."""
        rtt = CreditRtt(allowance=0.004)
        rtt.sample(0.080, 0.0)
        rtt.srtt = 0.150
        self.assertFalse(rtt.queueing())
        rtt.srtt = 0.170
        self.assertTrue(rtt.queueing())

    def test_no_signal_without_samples_or_from_a_clock_going_back(self) -> None:
        """Nothing is known before a sample; a negative one (the clock stepped back) is
        ignored."""
        rtt = CreditRtt()
        self.assertFalse(rtt.queueing())
        self.assertIsNone(rtt.min_rtt)
        rtt.sample(-0.5, 1.0)
        self.assertEqual((rtt.samples, rtt.srtt, rtt.min_rtt), (0, None, None))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 20.0)), min_size=1,
                    max_size=50))
    def test_estimates_stay_within_the_samples(self, steps: list[tuple[float, float]]) -> None:
        """Whatever the samples: the minimum is at most every sample of the last period and
        at least the least sample ever, and the average stays between the extremes."""
        rtt = CreditRtt(period=30.0)
        now = 0.0
        seen: list[tuple[float, float]] = []
        for value, gap in steps:
            now += gap
            rtt.sample(value, now)
            seen.append((now, value))
        least = rtt.min_rtt
        assert least is not None and rtt.srtt is not None
        self.assertGreaterEqual(least, min(v for _t, v in seen))
        self.assertLessEqual(least, min(v for t, v in seen if t >= now - 30.0))
        self.assertGreaterEqual(rtt.srtt, min(v for _t, v in seen) - 1e-12)
        self.assertLessEqual(rtt.srtt, max(v for _t, v in seen) + 1e-12)
