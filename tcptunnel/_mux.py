"""The stream multiplexer of a proxy's link, sans-IO.

:class:`MuxConnection` terminates streams: it keeps the stream table, each
stream's explicit state, its send buffer and both windows, and turns frames
into events.  Every change of a stream's state goes through the transition
table of :mod:`tcptunnel._stream`, and the credit and FIN of each direction
through its :class:`~tcptunnel._stream.Direction` (the rules the Gateway's
relay checks too).  Flow control follows ``docs/protocol.md`` §6: credit is
returned only for bytes the adapter reports as consumed, coalesced, and a
window grows when the sender reports it was blocked while our consumer kept
up, within the link's receive budget, unless credit round trips show bytes
queueing on the path: then windows shrink (``tcptunnel._stream.CreditRtt``,
§6 "Queueing").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tcptunnel import _frames as fr
from tcptunnel._frames import Frame, FrameType, GoAway, LinkError, OpenRequest, Reason, StreamError
from tcptunnel._link import DEFAULT_CHUNK, MAX_QUEUED_CONTROL_FRAMES, LinkCore

# StreamState lives in tcptunnel._stream; ``_mux.StreamState`` stays importable.
from tcptunnel._stream import (
    CAN_SEND_FIN,
    TRANSITIONS,
    CreditRtt,
    Direction,
    StreamEvent,
    StreamState,
    advance,
)

INITIAL_WINDOW = 384 * 1024
MAX_STREAM_WINDOW = 16 * 1024 * 1024
LINK_RECEIVE_BUDGET = 32 * 1024 * 1024
MIN_WINDOW = fr.EARLY_WINDOW  # a stream's window always covers its early data
# While bytes queue on the path (tcptunnel._stream.CreditRtt), a byte stream's window shrinks
# by a quarter per credit round trip, down to two chunks: credit then still comes back in
# 16 KiB updates (a quarter window) and DATA in whole chunks, where a 32 KiB floor made 8 KiB
# frames and cost throughput on a CPU-bound path (A/B, 3 repeats: 1 stream 0.81x -> 1.21x
# the old code, 8 streams 1.01x -> 1.17x; very noisy).  8 streams keep at least 512 KiB in
# flight, less than the ~1 MB they settle at over loopback.
SHRINK_FLOOR = 2 * DEFAULT_CHUNK
DEFAULT_MAX_STREAMS = 1024

# Datagram (``udp``) streams, docs/protocol.md §5.2.  A datagram is sent whole or dropped:
# dropped when the stream's credit does not cover it, when its flow already has
# MAX_FLOW_DATAGRAMS (or MAX_FLOW_QUEUED bytes) waiting for the link, or when the link's
# datagram queue holds MAX_LINK_DATAGRAM_BYTES.  The queues only smooth over a link that is
# briefly busy: at 100 Mbit/s, 256 KiB is 20 ms of traffic, and UDP's users (DNS, games,
# VoIP, WireGuard) prefer a loss to a late datagram.  Under a flood the link queue stays
# full (test_udp_e2e's flood: ~7,000 drops in 2 s), so its size is the latency a flood adds
# to every datagram of the link: 512 KiB is 40 ms at 100 Mbit/s.
MAX_FLOW_DATAGRAMS = 64
MAX_FLOW_QUEUED = 256 * 1024
MAX_LINK_DATAGRAM_BYTES = 512 * 1024
# A datagram stream's window grows to at most this (a byte stream's to max_window): what the
# Gateway may queue for one flow stays a few milliseconds of traffic, not 16 MiB.
MAX_DATAGRAM_WINDOW = 1024 * 1024
# What a datagram stream sends in its round-robin turn (at least one datagram).
DATAGRAM_CHUNK = 4096
#: Why :meth:`MuxConnection.send_datagram` dropped a datagram (the keys of the drop counts).
DROP_NO_CREDIT = "no_credit"
DROP_FLOW_QUEUE = "flow_queue"
DROP_LINK_QUEUE = "link_queue"
DROP_TOO_LARGE = "too_large"
DROP_NOT_OPEN = "not_open"  # not open yet (acceptor), or ended


class StreamIdsExhaustedError(StreamError):
    """Every stream id of this link was used: the link must be replaced."""


_SEND_DATA = StreamEvent.SEND_DATA
_RECV_DATA = StreamEvent.RECV_DATA
_SEND_FIN = StreamEvent.SEND_FIN
_CLOSED = StreamState.CLOSED


# -- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpenRequested:
    """The peer asks us to open a stream to a target (Proxy-Client side)."""

    stream_id: int
    request: OpenRequest


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """Our OPEN was accepted; DATA may flow."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamOpenFailed:
    """Our OPEN was refused."""

    stream_id: int
    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes for a stream; report them with ``data_consumed`` once taken."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: no more data will arrive on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream ended abruptly: by the peer (``remote``) or by a violation here."""

    stream_id: int
    reason: Reason
    message: str
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Both directions finished cleanly (FIN sent and received)."""

    stream_id: int


class StreamRecord:
    """Per-stream bookkeeping; only :class:`MuxConnection` changes it.

    The adapter (:class:`tcptunnel.mux.MuxStream`) keeps a reference to read the state from:
    a record keeps its terminal state (CLOSED or RESET) after the stream left the table.

    ``state`` changes only through the transition table.  ``recv`` is the direction the peer
    sends in: its credit is the window the peer has left, its ``fin`` the peer's FIN.  ``send``
    is ours: its credit is our send window, its ``fin`` says that ``end_stream`` closed our
    writes; the FIN frame itself goes out after the data buffered before it, and only then
    does the state move (``SEND_FIN``).
    """

    __slots__ = (
        "blocked_seen",
        "datagram",
        "id",
        "last_shrink",
        "last_update",
        "paused_at",
        "paused_total",
        "recv",
        "recv_to_ack",
        "recv_window",
        "send",
        "send_buffer",
        "send_buffered",
        "send_offset",
        "srtt",
        "starved",
        "state",
        "update_old_credit",
        "update_sent_at",
    )

    def __init__(self, stream_id: int, event: StreamEvent, recv_window: int) -> None:
        self.id = stream_id
        self.state = TRANSITIONS[StreamState.IDLE, event]
        self.send = Direction()
        # A list, not a deque: an empty deque takes ~600 bytes, and idle streams are many.
        self.send_buffer: list[bytes] = []
        self.send_buffered = 0
        self.send_offset = 0  # bytes of send_buffer[0] already framed
        self.recv_window = recv_window
        self.recv = Direction(recv_window)
        self.recv_to_ack = 0
        self.blocked_seen = False
        self.last_update = 0.0  # time of the last credit update (or the open)
        self.paused_at: float | None = None  # since when the local socket is paused
        self.paused_total = 0.0  # paused time since the last credit update
        # A ``udp`` stream: send_buffer holds whole datagrams (their credit already taken),
        # each leaves as one DATA frame; an empty DATA frame received is an empty datagram.
        self.datagram = False
        self.starved = False  # a datagram was dropped for want of credit: flag the next
        # When a WINDOW_UPDATE of ours started timing a credit round trip (CreditRtt): the
        # first byte past the peer's old credit ends it.  None while none is being timed.
        self.update_sent_at: float | None = None
        # The peer's credit before that update: the first byte past it used the new credit.
        self.update_old_credit = 0
        self.last_shrink = float("-inf")  # time of the last window cut
        self.srtt: float | None = None  # this stream's smoothed credit round trip

    def move(self, event: StreamEvent) -> StreamState:
        """Apply ``event`` per the table (raises StreamError PROTOCOL_ERROR)."""
        self.state = state = advance(self.state, event)
        return state

    @property
    def fin_pending(self) -> bool:
        """Writes are closed and the FIN frame has not gone out yet."""
        return self.send.fin and self.state in CAN_SEND_FIN

    # Read-only views under the names the windows had before Direction (tests use them).
    @property
    def send_window(self) -> int:
        """Bytes we may still send."""
        return self.send.credit

    @property
    def recv_available(self) -> int:
        """Bytes the peer may still send."""
        return self.recv.credit


class MuxConnection(LinkCore):
    """A proxy's end of a link: streams, windows and events.

    ``opener`` is True on a Proxy-Server (it opens streams) and False on a
    Proxy-Client (it accepts them).
    """

    def __init__(
        self,
        opener: bool,
        initial_window: int = INITIAL_WINDOW,
        max_window: int = MAX_STREAM_WINDOW,
        receive_budget: int = LINK_RECEIVE_BUDGET,
        max_streams: int = DEFAULT_MAX_STREAMS,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        super().__init__(chunk_size)
        self.opener = opener
        self.initial_window = initial_window
        self.max_window = max(max_window, initial_window)
        self.receive_budget = receive_budget
        self.max_streams = max_streams
        # Unsent control frames a read may leave before the link is closed TOO_SLOW: a few
        # per stream (OPEN_RESULT, WINDOW_UPDATE, FIN, RESET) while the Gateway is slow to
        # read, plus the PONGs and answers to bad frames a hostile Gateway could provoke.
        self.max_control_frames = MAX_QUEUED_CONTROL_FRAMES + 4 * max_streams
        self.streams: dict[int, StreamRecord] = {}
        self._next_stream_id = 1
        self._last_peer_stream_id = 0
        self.granted_total = 0  # sum of recv_window over live streams
        # Streams whose send buffer drained below the low-water mark; the
        # adapter resumes their local producers.
        self.drained: set[int] = set()
        self.send_low_water = 2 * chunk_size
        # Streams that became CLOSED because our FIN went out (in data_to_send),
        # for the adapter to collect.
        self.closed_by_send: list[int] = []
        self.blocked_sent = 0  # DATA frames that spent the window with more waiting
        self.datagram_queued = 0  # bytes of datagrams waiting for the link, all streams
        self.max_link_datagram_bytes = MAX_LINK_DATAGRAM_BYTES
        # The time source for credit round trips (the adapter sets the reactor's
        # ``seconds``); without one no round trip is sampled and windows grow on blocking
        # alone.
        self.clock: Callable[[], float] | None = None
        self.credit_rtt = CreditRtt()
        self.windows_shrunk = 0  # windows cut because bytes queue on the path

    # -- helpers ----------------------------------------------------------

    def _grant_initial(self) -> int:
        room = self.receive_budget - self.granted_total
        return max(MIN_WINDOW, min(self.initial_window, room))

    def _add_stream(self, stream_id: int, event: StreamEvent) -> StreamRecord:
        stream = StreamRecord(stream_id, event, self._grant_initial())
        self.granted_total += stream.recv_window
        self.streams[stream_id] = stream
        return stream

    def _remove(self, stream: StreamRecord) -> None:
        """Forget a stream that reached a terminal state."""
        if self.streams.pop(stream.id, None) is not None:
            self.granted_total -= stream.recv_window
        self._ready.pop(stream.id, None)
        self.drained.discard(stream.id)
        if stream.datagram:
            self.datagram_queued -= stream.send_buffered
        stream.send_buffer.clear()
        stream.send_buffered = 0
        stream.send_offset = 0

    def _reset(self, stream: StreamRecord, reason: Reason, message: str) -> None:
        self.queue_control(fr.build_reset(stream.id, reason, message))
        stream.move(StreamEvent.SEND_RESET)
        self._remove(stream)

    # -- commands from the adapter -----------------------------------------

    def open_stream(self, host: str, port: int, kind: int = fr.KIND_TCP,
                    fields: tuple[tuple[int, bytes], ...] = ()) -> int:
        """Queue OPEN for a new stream of ``kind`` (``tcp`` or ``udp``) with extra OPEN
        ``fields`` (tag, value), such as CLIENT_ADDRESS; return its id.  Raises StreamError."""
        if not self.opener:
            raise RuntimeError("only the Proxy-Server end opens streams")
        if len(self.streams) >= self.max_streams:
            raise StreamError(Reason.LIMIT, f"{len(self.streams)} streams already open")
        if kind not in fr.ENVELOPE_FIELDS:  # pake / sealed: no target in clear (§9)
            fr.validate_target(host, port)
        stream_id = self._next_stream_id
        if stream_id > fr.STREAM_ID_MASK:
            raise StreamIdsExhaustedError(Reason.LIMIT, "stream ids of this link are used up")
        self._next_stream_id += 1
        stream = self._add_stream(stream_id, StreamEvent.SEND_OPEN)
        stream.datagram = kind == fr.KIND_UDP
        stream.send.credit = fr.EARLY_WINDOW  # early data, before OPEN_RESULT
        self.queue_control(
            fr.build_open(stream_id, OpenRequest(stream.recv_window, 0, host, port, kind,
                                                 fields))
        )
        return stream_id

    @property
    def next_stream_id(self) -> int:
        """The id :meth:`open_stream` gives next (a sealed OPEN binds it, §9.4)."""
        return self._next_stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Answer a StreamOpenRequested with OPEN_RESULT ok."""
        stream = self.streams.get(stream_id)
        if stream is None or (stream.state, StreamEvent.SEND_OPEN_OK) not in TRANSITIONS:
            return
        stream.move(StreamEvent.SEND_OPEN_OK)
        # Until now the opener could only send its early data.
        stream.recv.credit += stream.recv_window - fr.EARLY_WINDOW
        self.queue_control(fr.build_open_result(stream_id, Reason.OK, stream.recv_window))

    def reject_stream(self, stream_id: int, reason: Reason, message: str = "") -> None:
        """Answer a StreamOpenRequested with a failure."""
        stream = self.streams.get(stream_id)
        if stream is None or (stream.state, StreamEvent.SEND_OPEN_FAILED) not in TRANSITIONS:
            return
        self.queue_control(fr.build_open_result(stream_id, reason, 0, message))
        stream.move(StreamEvent.SEND_OPEN_FAILED)
        self._remove(stream)

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Buffer bytes for a stream; they leave as its window allows."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.send.fin or not data:
            return
        if (stream.state, _SEND_DATA) not in TRANSITIONS:
            raise RuntimeError(f"data for a stream in state {stream.state.value}")
        stream.send_buffer.append(data)
        stream.send_buffered += len(data)
        if stream.send.credit > 0:
            self._mark_ready_stream(stream_id)

    def send_datagram(self, stream_id: int, data: bytes) -> str | None:
        """Queue one datagram of a ``udp`` stream to leave whole as one DATA frame; None
        when queued, else why it was dropped (``DROP_*``).  Never blocks, never splits."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.send.fin or (stream.state, _SEND_DATA) not in TRANSITIONS:
            return DROP_NOT_OPEN
        if not stream.datagram:
            raise RuntimeError("send_datagram on a byte stream")
        size = len(data)
        if size > fr.MAX_PAYLOAD:
            return DROP_TOO_LARGE
        send = stream.send
        if size > send.credit:
            stream.starved = True
            return DROP_NO_CREDIT
        if (len(stream.send_buffer) >= MAX_FLOW_DATAGRAMS
                or stream.send_buffered + size > MAX_FLOW_QUEUED):
            return DROP_FLOW_QUEUE
        if self.datagram_queued + size > self.max_link_datagram_bytes:
            return DROP_LINK_QUEUE
        # The credit is taken now: what waits is covered by the window, as for byte streams.
        send.credit -= size
        stream.send_buffer.append(data)
        stream.send_buffered += size
        self.datagram_queued += size
        self._mark_ready_stream(stream_id)
        return None

    def send_buffered(self, stream_id: int) -> int:
        """Bytes buffered for a stream and not yet framed."""
        stream = self.streams.get(stream_id)
        return stream.send_buffered if stream is not None else 0

    def end_stream(self, stream_id: int) -> None:
        """Half-close: FIN goes out after the buffered data.

        Ignored where the table allows no FIN (the acceptor before it accepted, or after a
        FIN already)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.send.fin or stream.state not in CAN_SEND_FIN:
            return
        stream.send.end()
        self._mark_ready_stream(stream_id)

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The state of a live stream; None once it ended (CLOSED or RESET) or never existed."""
        stream = self.streams.get(stream_id)
        return stream.state if stream is not None else None

    def reset_stream(self, stream_id: int, reason: Reason, message: str = "") -> None:
        """End a stream abruptly in both directions."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._reset(stream, reason, message)

    def reset_all(self, reason: Reason, message: str = "") -> list[int]:
        """Reset every stream (shutdown); return their ids."""
        ids = list(self.streams)
        for stream_id in ids:
            self._reset(self.streams[stream_id], reason, message)
        return ids

    def set_consumer_paused(self, stream_id: int, paused: bool, now: float = 0.0) -> None:
        """The local socket of a stream stopped (or resumed) taking data at time ``now``."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if paused and stream.paused_at is None:
            stream.paused_at = now
        elif not paused and stream.paused_at is not None:
            stream.paused_total += now - stream.paused_at
            stream.paused_at = None

    def _consumer_keeps_up(self, stream: StreamRecord, now: float) -> bool:
        """Whether the local socket was paused for at most half the time since the last
        credit update.  A window arriving in one burst pauses a fast socket briefly; a slow
        reader is paused most of the time, and more window would only buffer more."""
        paused = stream.paused_total
        if stream.paused_at is not None:
            paused += now - stream.paused_at
        return paused <= 0.5 * (now - stream.last_update)

    def data_consumed(self, stream_id: int, count: int, now: float = 0.0) -> None:
        """``count`` received bytes were taken by the local socket: maybe return credit."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.recv.fin or count <= 0:
            return
        stream.recv_to_ack += count
        if stream.recv_to_ack * 4 < stream.recv_window and not stream.blocked_seen:
            return
        increment = stream.recv_to_ack
        if self.credit_rtt.queueing(stream.srtt):
            # What the sender sent already waits in queues on the path: a larger window
            # would only lengthen the queue (ahead of every other stream's bytes), so the
            # window shrinks instead, once per round trip.
            if not stream.datagram and now - stream.last_shrink >= (stream.srtt or 0.0):
                stream.last_shrink = now
                increment -= self._shrink(stream, increment)
        elif stream.blocked_seen and self._consumer_keeps_up(stream, now):
            increment += self._grow(stream)
        if (stream.update_sent_at is None and not stream.datagram
                and stream.recv.credit * 2 <= stream.recv_window):
            # The first byte past the sender's old credit was sent after this update
            # arrived: it times the round trip.  Only while the sender has used at least
            # half its window: an interactive stream (an SSH session, most of its window
            # unused) would time its user's typing, not the path, and shrink every window
            # of the link.
            stream.update_sent_at = now
            stream.update_old_credit = stream.recv.credit
        stream.blocked_seen = False
        stream.paused_total = 0.0
        if stream.paused_at is not None:
            stream.paused_at = now
        stream.last_update = now
        stream.recv_to_ack = 0
        if increment <= 0:
            # All was withheld: the bytes still unconsumed bring credit when taken (a window
            # never shrinks below SHRINK_FLOOR, so a drained stream always gets some).
            return
        # Our own grant, within recv_window (at most max_window): it cannot pass 2^31-1.
        stream.recv.credit += increment
        self.queue_control(fr.build_window_update(stream_id, increment))

    def _shrink(self, stream: StreamRecord, returning: int) -> int:
        """Take a quarter off a stream's window (not below SHRINK_FLOOR, nor more than the
        ``returning`` credit being returned); return the bytes withheld."""
        window = stream.recv_window
        cut = min(window // 4, window - max(SHRINK_FLOOR, MIN_WINDOW), returning)
        if cut <= 0:
            return 0
        stream.recv_window = window - cut
        self.granted_total -= cut
        self.windows_shrunk += 1
        return cut

    def _grow(self, stream: StreamRecord) -> int:
        """Double a stream's window within its cap and the link's receive budget; return the
        bytes it grew by."""
        room = self.receive_budget - self.granted_total
        cap = MAX_DATAGRAM_WINDOW if stream.datagram else self.max_window
        grown = min(stream.recv_window * 2, cap, stream.recv_window + room)
        if grown <= stream.recv_window:
            return 0
        added = grown - stream.recv_window
        self.granted_total += added
        stream.recv_window = grown
        return added

    # -- inbound ----------------------------------------------------------

    def _handle_stream_frame(self, frame: Frame, events: list[object]) -> None:
        stream_id = frame.stream_id
        frame_type = frame.type
        if frame_type == FrameType.OPEN:
            self._on_open(frame, events)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # unknown or closed: a RESET may have crossed it
        try:
            if frame_type == FrameType.DATA:
                self._on_data(stream, frame, events)
            elif frame_type == FrameType.WINDOW_UPDATE:
                stream.send.grant(fr.parse_window_update(frame.payload))
                if stream.send_buffered or stream.fin_pending:
                    self._mark_ready_stream(stream_id)
            elif frame_type == FrameType.OPEN_RESULT:
                self._on_open_result(stream, frame, events)
            elif frame_type == FrameType.FIN:
                state = stream.move(StreamEvent.RECV_FIN)
                stream.recv.end()
                events.append(StreamEnded(stream_id))
                if state is _CLOSED:
                    self._remove(stream)
                    events.append(StreamClosed(stream_id))
            elif frame_type == FrameType.RESET:
                reason, message = fr.parse_reset(frame.payload)
                stream.move(StreamEvent.RECV_RESET)
                self._remove(stream)
                events.append(StreamReset(stream_id, reason, message, remote=True))
        except StreamError as e:
            self._reset(stream, e.reason, e.message)
            events.append(StreamReset(stream_id, e.reason, e.message, remote=False))

    def _on_open(self, frame: Frame, events: list[object]) -> None:
        stream_id = frame.stream_id
        if self.opener:
            raise LinkError(GoAway.PROTOCOL_ERROR, "OPEN sent to the end that opens streams")
        if stream_id <= self._last_peer_stream_id:
            raise LinkError(
                GoAway.PROTOCOL_ERROR,
                f"OPEN with stream id {stream_id} not above {self._last_peer_stream_id}")
        self._last_peer_stream_id = stream_id
        try:
            request = fr.parse_open(frame.payload)
        except StreamError as e:
            self.queue_control(fr.build_open_result(stream_id, e.reason, 0, e.message))
            return
        if len(self.streams) >= self.max_streams:
            self.queue_control(fr.build_open_result(
                stream_id, Reason.LIMIT, 0, f"{len(self.streams)} streams already open"))
            return
        stream = self._add_stream(stream_id, StreamEvent.RECV_OPEN)
        stream.datagram = request.kind == fr.KIND_UDP
        stream.send.credit = request.window
        stream.recv.credit = fr.EARLY_WINDOW  # all the opener may send before we accept
        events.append(StreamOpenRequested(stream_id, request))

    def _on_open_result(self, stream: StreamRecord, frame: Frame, events: list[object]) -> None:
        reason, window, message = fr.parse_open_result(frame.payload)
        ok = reason is Reason.OK
        # Raises at the acceptor's end, or for a second OPEN_RESULT.
        after = advance(stream.state,
                        StreamEvent.RECV_OPEN_OK if ok else StreamEvent.RECV_OPEN_FAILED)
        if ok:
            if window < fr.EARLY_WINDOW:
                raise StreamError(Reason.FLOW_CONTROL,
                                  f"OPEN_RESULT window {window} below the early-data window")
            # The early window is part of the acceptor's window.
            stream.send.grant(window - fr.EARLY_WINDOW)
            stream.state = after
            if stream.send_buffered or stream.fin_pending:
                self._mark_ready_stream(stream.id)
            events.append(StreamOpened(stream.id))
        else:
            stream.state = after
            self._remove(stream)
            events.append(StreamOpenFailed(stream.id, reason, message))

    def _on_data(self, stream: StreamRecord, frame: Frame, events: list[object]) -> None:
        if (stream.state, _RECV_DATA) not in TRANSITIONS:
            stream.move(_RECV_DATA)  # raises: the opener before OPEN_RESULT, or after FIN
        size = len(frame.payload)
        stream.recv.take(size)
        if stream.update_sent_at is not None:
            stream.update_old_credit -= size
            if stream.update_old_credit < 0:
                clock = self.clock
                if clock is not None:
                    now = clock()
                    rtt = now - stream.update_sent_at
                    self.credit_rtt.sample(rtt, now)
                    if rtt >= 0.0:
                        stream.srtt = CreditRtt.smooth(stream.srtt, rtt)
                stream.update_sent_at = None
        if frame.flags & fr.FLAG_BLOCKED:
            stream.blocked_seen = True
        if size or stream.datagram:  # an empty DATA frame is an empty datagram
            events.append(DataReceived(stream.id, frame.payload))

    # -- outbound ---------------------------------------------------------

    def _pull(self, stream_id: int, budget: int, out: list[bytes]) -> tuple[int, bool]:
        stream = self.streams.get(stream_id)
        if stream is None:
            return 0, False
        if stream.datagram:
            return self._pull_datagrams(stream, budget, out)
        size = 0
        send = stream.send
        amount = min(budget, send.credit, stream.send_buffered)
        if amount > 0:
            # Cut chunks out of the buffered writes through memoryviews and an offset
            # into the first one, so a huge write costs one copy, not one per chunk.
            buffer = stream.send_buffer
            offset = stream.send_offset
            first = buffer[0]
            if offset == 0 and len(first) == amount:
                payload = buffer.pop(0)
            elif len(first) - offset >= amount:
                payload = bytes(memoryview(first)[offset : offset + amount])
                offset += amount
                if offset == len(first):
                    del buffer[0]
                    offset = 0
            else:
                parts = []
                need = amount
                while need:
                    piece = memoryview(buffer[0])[offset:]
                    if len(piece) <= need:
                        parts.append(piece)
                        del buffer[0]
                        offset = 0
                        need -= len(piece)
                    else:
                        parts.append(piece[:need])
                        offset += need
                        need = 0
                payload = b"".join(parts)
            stream.send_offset = offset
            stream.send_buffered -= amount
            send.credit -= amount
            blocked = send.credit == 0 and stream.send_buffered > 0
            self.blocked_sent += blocked
            out.append(fr.encode_header(FrameType.DATA, fr.FLAG_BLOCKED if blocked else 0,
                                        stream_id, amount))
            out.append(payload)
            size = amount + fr.HEADER_SIZE
            if stream.send_buffered < self.send_low_water:
                self.drained.add(stream_id)
        if stream.send_buffered == 0 and send.fin and stream.state in CAN_SEND_FIN:
            out.append(fr.build_fin(stream_id))
            if stream.move(_SEND_FIN) is _CLOSED:
                self._remove(stream)
                self.closed_by_send.append(stream_id)
            return size + fr.HEADER_SIZE, False
        return size, stream.send_buffered > 0 and send.credit > 0

    def _pull_datagrams(self, stream: StreamRecord, budget: int,
                        out: list[bytes]) -> tuple[int, bool]:
        """Whole datagrams of a ``udp`` stream, one DATA frame each: at least one, and about
        DATAGRAM_CHUNK bytes (a 64 KiB datagram is never cut).  A smaller turn than a byte
        stream's: with many flows ready, a TCP stream's next chunk waits behind one or two
        datagrams per flow, not 32 KiB of each."""
        size = 0
        buffer = stream.send_buffer
        stream_id = stream.id
        budget = min(budget, DATAGRAM_CHUNK)
        while buffer and (size == 0 or size < budget):
            datagram = buffer.pop(0)
            flags = 0
            if stream.starved:
                # The receiver grows the window of a flow that ran out of it.
                stream.starved = False
                flags = fr.FLAG_BLOCKED
                self.blocked_sent += 1
            out.append(fr.encode_header(FrameType.DATA, flags, stream_id, len(datagram)))
            out.append(datagram)
            stream.send_buffered -= len(datagram)
            self.datagram_queued -= len(datagram)
            size += len(datagram) + fr.HEADER_SIZE
        if not buffer and stream.send.fin and stream.state in CAN_SEND_FIN:
            out.append(fr.build_fin(stream_id))
            if stream.move(_SEND_FIN) is _CLOSED:
                self._remove(stream)
                self.closed_by_send.append(stream_id)
            return size + fr.HEADER_SIZE, False
        return size, bool(buffer)
