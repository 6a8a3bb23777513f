"""Stream rules shared by the proxies' multiplexer and the Gateway's relay, sans-IO.

Two pieces, both free of Twisted and of any proxy-only concept:

* :data:`TRANSITIONS`, the lifecycle of a stream at one end as one explicit table
  ``(state, event) -> state`` in the manner of h2's ``h2/stream.py`` ``_transitions``.  A pair
  missing from the table is a protocol violation: :func:`advance` raises
  ``StreamError(PROTOCOL_ERROR, "<event> in state <state>")``.  ``docs/protocol.md`` §5 is the
  prose version.
* :class:`Direction`, the rules of one direction of a stream (credit and FIN) that every
  receiver of DATA, WINDOW_UPDATE and FIN checks: the multiplexer keeps one for what it
  receives and one for what it sends; the relay keeps one per direction of a route.

The opener (a Proxy-Server, or the Gateway towards a Proxy-Client) and the acceptor go through
different opening states, because their rules differ before OPEN_RESULT: the opener may send up
to 16 KiB of early data and a FIN, the acceptor may receive them; the acceptor sends nothing but
its OPEN_RESULT until it accepted; the opener receiving DATA or FIN before OPEN_RESULT is an
error.  A FIN that crossed before OPEN_RESULT is kept as its own opening state, not as a flag.
"""

from __future__ import annotations

import enum

from tcptunnel._frames import MAX_WINDOW, Reason, StreamError


class StreamState(enum.Enum):
    """States of a stream at one end; the values are what logs show."""

    # Identity hashing (as for any object compared with ``is``): Enum's default hashes the
    # member name in Python code, which would add a Python call to each table look-up on the
    # DATA path.
    __hash__ = object.__hash__

    IDLE = "idle"
    #: The opener sent OPEN and waits for OPEN_RESULT (early data may follow the OPEN).
    OPEN_SENT = "opening (OPEN sent)"
    #: ... and its early FIN went out too.
    OPEN_SENT_FIN_SENT = "opening (OPEN sent, FIN sent)"
    #: The acceptor received OPEN and has not answered yet (early data may arrive).
    OPEN_RECEIVED = "opening (OPEN received)"
    #: ... and the opener's early FIN arrived too.
    OPEN_RECEIVED_FIN_RECEIVED = "opening (OPEN received, FIN received)"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # our FIN went out
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer's FIN arrived
    CLOSED = "closed"  # FIN sent and received: terminal
    RESET = "reset"  # RESET sent or received, or the OPEN failed: terminal

    #: The acceptor's opening state under the name it had before the opening states were
    #: split by role (``tcptunnel.test.test_fuzz`` and older code use it).
    OPENING = "opening (OPEN received)"

    @property
    def opening(self) -> bool:
        """Whether OPEN_RESULT is still outstanding."""
        return self in OPENING_STATES

    @property
    def terminal(self) -> bool:
        """Whether the stream ended (no event moves it any more)."""
        return self is StreamState.CLOSED or self is StreamState.RESET


class StreamEvent(enum.Enum):
    """What happens to a stream: a frame sent or received, from this end's view."""

    __hash__ = object.__hash__

    SEND_OPEN = "OPEN sent"
    RECV_OPEN = "OPEN received"
    SEND_OPEN_OK = "OPEN_RESULT ok sent"
    RECV_OPEN_OK = "OPEN_RESULT ok received"
    SEND_OPEN_FAILED = "OPEN_RESULT failure sent"
    RECV_OPEN_FAILED = "OPEN_RESULT failure received"
    SEND_DATA = "DATA sent"
    RECV_DATA = "DATA received"
    SEND_FIN = "FIN sent"
    RECV_FIN = "FIN received"
    SEND_RESET = "RESET sent"
    RECV_RESET = "RESET received"


S = StreamState
E = StreamEvent

#: The stream lifecycle: ``(state, event) -> next state``.  Everything not listed is a
#: protocol violation.  WINDOW_UPDATE is not an event of the lifecycle: it is accepted in every
#: live state and checked by :meth:`Direction.grant`.
TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    # Opening, opener side: early data and an early FIN may follow the OPEN.
    (S.IDLE, E.SEND_OPEN): S.OPEN_SENT,
    (S.OPEN_SENT, E.SEND_DATA): S.OPEN_SENT,
    (S.OPEN_SENT, E.SEND_FIN): S.OPEN_SENT_FIN_SENT,
    (S.OPEN_SENT, E.RECV_OPEN_OK): S.OPEN,
    (S.OPEN_SENT, E.RECV_OPEN_FAILED): S.RESET,
    (S.OPEN_SENT, E.SEND_RESET): S.RESET,
    (S.OPEN_SENT, E.RECV_RESET): S.RESET,
    (S.OPEN_SENT_FIN_SENT, E.RECV_OPEN_OK): S.HALF_CLOSED_LOCAL,
    (S.OPEN_SENT_FIN_SENT, E.RECV_OPEN_FAILED): S.RESET,
    (S.OPEN_SENT_FIN_SENT, E.SEND_RESET): S.RESET,
    (S.OPEN_SENT_FIN_SENT, E.RECV_RESET): S.RESET,
    # Opening, acceptor side: it takes the early data and FIN, sends only its answer.
    (S.IDLE, E.RECV_OPEN): S.OPEN_RECEIVED,
    (S.OPEN_RECEIVED, E.RECV_DATA): S.OPEN_RECEIVED,
    (S.OPEN_RECEIVED, E.RECV_FIN): S.OPEN_RECEIVED_FIN_RECEIVED,
    (S.OPEN_RECEIVED, E.SEND_OPEN_OK): S.OPEN,
    (S.OPEN_RECEIVED, E.SEND_OPEN_FAILED): S.RESET,
    (S.OPEN_RECEIVED, E.SEND_RESET): S.RESET,
    (S.OPEN_RECEIVED, E.RECV_RESET): S.RESET,
    (S.OPEN_RECEIVED_FIN_RECEIVED, E.SEND_OPEN_OK): S.HALF_CLOSED_REMOTE,
    (S.OPEN_RECEIVED_FIN_RECEIVED, E.SEND_OPEN_FAILED): S.RESET,
    (S.OPEN_RECEIVED_FIN_RECEIVED, E.SEND_RESET): S.RESET,
    (S.OPEN_RECEIVED_FIN_RECEIVED, E.RECV_RESET): S.RESET,
    # Open: data both ways; a FIN ends one direction.
    (S.OPEN, E.SEND_DATA): S.OPEN,
    (S.OPEN, E.RECV_DATA): S.OPEN,
    (S.OPEN, E.SEND_FIN): S.HALF_CLOSED_LOCAL,
    (S.OPEN, E.RECV_FIN): S.HALF_CLOSED_REMOTE,
    (S.OPEN, E.SEND_RESET): S.RESET,
    (S.OPEN, E.RECV_RESET): S.RESET,
    (S.HALF_CLOSED_LOCAL, E.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, E.RECV_FIN): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, E.SEND_RESET): S.RESET,
    (S.HALF_CLOSED_LOCAL, E.RECV_RESET): S.RESET,
    (S.HALF_CLOSED_REMOTE, E.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, E.SEND_FIN): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, E.SEND_RESET): S.RESET,
    (S.HALF_CLOSED_REMOTE, E.RECV_RESET): S.RESET,
    # CLOSED and RESET are terminal: nothing leaves them.
}

del S, E

#: States in which OPEN_RESULT is outstanding.
OPENING_STATES = frozenset({
    StreamState.OPEN_SENT, StreamState.OPEN_SENT_FIN_SENT,
    StreamState.OPEN_RECEIVED, StreamState.OPEN_RECEIVED_FIN_RECEIVED,
})
#: States from which a FIN may still be sent (derived from the table).
CAN_SEND_FIN = frozenset(state for state, event in TRANSITIONS if event is StreamEvent.SEND_FIN)


def advance(state: StreamState, event: StreamEvent) -> StreamState:
    """The state after ``event``; a pair the table does not list raises PROTOCOL_ERROR."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise StreamError(Reason.PROTOCOL_ERROR,
                          f"{event.name} in state {state.value}") from None


class Direction:
    """One direction of a stream: the sender's remaining credit and whether it sent FIN.

    ``credit`` is what the sender may still send in DATA; the receiver of that direction
    granted it (in OPEN, OPEN_RESULT and WINDOW_UPDATE).  Each check raises the StreamError
    that resets the stream, as ``docs/protocol.md`` §5 lists them.
    """

    # Two per stream at each proxy and two per route at the Gateway.
    __slots__ = ("credit", "fin")

    def __init__(self, credit: int = 0) -> None:
        self.credit = credit
        self.fin = False

    def take(self, size: int) -> None:
        """DATA of ``size`` bytes travels in this direction."""
        if self.fin:
            raise StreamError(Reason.PROTOCOL_ERROR, "DATA after FIN")
        if size > self.credit:
            raise StreamError(Reason.FLOW_CONTROL,
                              f"{size} bytes of DATA with only {self.credit} bytes of window")
        self.credit -= size

    def grant(self, increment: int) -> None:
        """WINDOW_UPDATE (or an OPEN_RESULT window) adds ``increment`` (1..2^31-1) of credit."""
        credit = self.credit + increment
        if credit > MAX_WINDOW:
            raise StreamError(Reason.FLOW_CONTROL,
                              f"window grew past 2^31-1 ({self.credit} + {increment})")
        self.credit = credit

    def end(self) -> None:
        """FIN travels in this direction: no DATA may follow."""
        if self.fin:
            raise StreamError(Reason.PROTOCOL_ERROR, "FIN after FIN")
        self.fin = True

    def __repr__(self) -> str:
        return f"<Direction credit={self.credit}{' fin' if self.fin else ''}>"


#: How much queueing delay window growth tolerates above the path's own round trip, at least
#: (seconds).  The 8-stream bulk run on loopback (docs/benchmarks.md, "Latency under load")
#: put 18 ms of bytes ahead of every keystroke when windows grew on sender blocking alone;
#: 4 ms is 0.8 MB at 200 MB/s, as much as the kernel's receive queues need to keep a busy
#: receiver fed, and on a long path the allowance is the path's own round trip (below).
QUEUE_DELAY_ALLOWANCE = 0.004
#: The minimum round trip is the least sample of the last one to two of these periods (s):
#: long enough that a 30 s bulk transfer keeps the unloaded figure, short enough that a link
#: whose route got longer recovers within a minute.
MIN_RTT_PERIOD = 30.0


class CreditRtt:
    """Round trips of window credit on one link, and whether bytes queue on the path.

    A sample is the time from a WINDOW_UPDATE to the first byte the sender could send only
    after it arrived: the path's round trip plus the queueing ahead of new data in the data's
    direction, which is what a keystroke on another stream of the same link waits for.  No
    sender can make one shorter than the path's round trip, so the link-wide minimum is
    safe; each stream's own average (:meth:`smooth`) decides for that stream alone, so a
    sender that dawdles on one stream shrinks no other stream's window.  ``min_rtt`` is the
    least sample over the last :data:`MIN_RTT_PERIOD` to twice that (two buckets: O(1) per
    sample), ``srtt`` the link's moving average (1/4 per sample; the fallback for a stream
    with no sample of its own).  :meth:`queueing` says the smoothed round trip exceeds the
    minimum by more than ``max(min_rtt, allowance)``: TCP Vegas' and LEDBAT's signal that a
    larger window would only lengthen the queue, not speed the transfer.  A long path (min
    80 ms) tolerates 80 ms of queue, so its windows still grow to its bandwidth-delay
    product; loopback (min well under 1 ms) tolerates ``allowance``.
    """

    __slots__ = ("_bucket_min", "_bucket_start", "_previous_min", "allowance", "period",
                 "samples", "srtt")

    def __init__(self, allowance: float = QUEUE_DELAY_ALLOWANCE,
                 period: float = MIN_RTT_PERIOD) -> None:
        self.allowance = allowance
        self.period = period
        self.srtt: float | None = None
        self.samples = 0
        self._bucket_min = float("inf")
        self._previous_min = float("inf")
        self._bucket_start: float | None = None

    def sample(self, rtt: float, now: float) -> None:
        """One credit round trip of ``rtt`` seconds, measured at time ``now``."""
        if rtt < 0.0:
            return  # a clock that went back: no information
        self.samples += 1
        if self._bucket_start is None:
            self._bucket_start = now
        elif now - self._bucket_start >= self.period:
            # The older bucket is forgotten: a minimum is at most two periods old.
            self._previous_min = self._bucket_min
            self._bucket_min = float("inf")
            self._bucket_start = now
        self._bucket_min = min(self._bucket_min, rtt)
        self.srtt = self.smooth(self.srtt, rtt)

    @staticmethod
    def smooth(srtt: float | None, rtt: float) -> float:
        """The moving average ``srtt`` after a sample ``rtt`` (1/4 per sample, as TCP's
        RFC 6298 uses 1/8: samples here are fewer, one per stream and round trip)."""
        return rtt if srtt is None else srtt + (rtt - srtt) / 4

    @property
    def min_rtt(self) -> float | None:
        """The least recent sample (None before the first)."""
        least = min(self._bucket_min, self._previous_min)
        return None if least == float("inf") else least

    def queueing(self, srtt: float | None = None) -> bool:
        """Whether bytes wait on the path: the smoothed round trip (``srtt``, by default the
        link's) is above the minimum by more than ``max(min_rtt, allowance)`` (False before
        the first sample)."""
        least = self.min_rtt
        if srtt is None:
            srtt = self.srtt
        if least is None or srtt is None:
            return False
        return srtt - least > max(least, self.allowance)

    def __repr__(self) -> str:
        return f"<CreditRtt srtt={self.srtt} min={self.min_rtt} samples={self.samples}>"
