"""Tests for the sans-IO multiplexer (tcptunnel._mux), two ends wired back to back."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _frames as fr
from tcptunnel import _mux
from tcptunnel._frames import FrameDecoder, FrameType, GoAway, LinkError, Reason
from tcptunnel._link import LinkState, PongReceived

FUZZ_EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "100"))


class Pair:
    """A Proxy-Server end (opener) and a Proxy-Client end, logged in, with event logs."""

    def __init__(self, **kwargs: int) -> None:
        self.server = _mux.MuxConnection(opener=True, **kwargs)
        self.client = _mux.MuxConnection(opener=False, **kwargs)
        self.server_events: list[object] = []
        self.client_events: list[object] = []
        self.pump()
        self.server.mark_ready()
        self.client.mark_ready()

    def pump(self, limit: int = 10**9) -> None:
        """Move bytes both ways until both ends are quiet."""
        moved = True
        while moved:
            moved = False
            for src, dst, log in ((self.server, self.client, self.client_events),
                                  (self.client, self.server, self.server_events)):
                data = b"".join(src.data_to_send(limit))
                if data:
                    moved = True
                    log.extend(dst.receive_data(data))

    def open(self, host: str = "target", port: int = 22) -> int:
        """Open a stream from the server end and accept it at the client end."""
        stream_id = self.server.open_stream(host, port)
        self.pump()
        request = self.client_events.pop()
        assert isinstance(request, _mux.StreamOpenRequested), request
        self.client.accept_stream(stream_id)
        self.pump()
        opened = self.server_events.pop()
        assert isinstance(opened, _mux.StreamOpened), opened
        return stream_id


def data_of(events: list[object], stream_id: int) -> bytes:
    """All DataReceived bytes for one stream."""
    return b"".join(e.data for e in events
                    if isinstance(e, _mux.DataReceived) and e.stream_id == stream_id)


def types_of(events: list[object]) -> list[type]:
    """Event classes, in order."""
    return [type(e) for e in events]


class StreamLifecycleTests(SynchronousTestCase):
    """Open, data, half-close, reset."""

    def test_open_carries_target(self) -> None:
        """OPEN reaches the acceptor with host, port and the opener's window."""
        pair = Pair()
        stream_id = pair.server.open_stream("db.internal", 5432)
        pair.pump()
        (event,) = pair.client_events
        assert isinstance(event, _mux.StreamOpenRequested)
        self.assertEqual((event.stream_id, event.request.host, event.request.port),
                         (stream_id, "db.internal", 5432))
        self.assertEqual(event.request.window, _mux.INITIAL_WINDOW)

    def test_open_refused(self) -> None:
        """A rejected OPEN reaches the opener with its reason and removes the stream."""
        pair = Pair()
        stream_id = pair.server.open_stream("x", 1)
        pair.pump()
        pair.client.reject_stream(stream_id, Reason.DENIED, "nope")
        pair.pump()
        (event,) = pair.server_events
        assert isinstance(event, _mux.StreamOpenFailed)
        self.assertEqual((event.reason, event.message), (Reason.DENIED, "nope"))
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.client.streams, {})

    def test_data_both_ways(self) -> None:
        """Bytes arrive exactly, in order, in both directions."""
        pair = Pair()
        sid = pair.open()
        pair.server.send_data(sid, b"hello ")
        pair.server.send_data(sid, b"world")
        pair.client.send_data(sid, b"answer")
        pair.pump()
        self.assertEqual(data_of(pair.client_events, sid), b"hello world")
        self.assertEqual(data_of(pair.server_events, sid), b"answer")

    def test_half_close_server_first(self) -> None:
        """FIN one way; the other direction keeps flowing; both FINs close the stream."""
        pair = Pair()
        sid = pair.open()
        pair.server.send_data(sid, b"request")
        pair.server.end_stream(sid)
        pair.pump()
        self.assertEqual(types_of(pair.client_events),
                         [_mux.DataReceived, _mux.StreamEnded])
        self.assertEqual(pair.client.streams[sid].state, _mux.StreamState.HALF_CLOSED_REMOTE)
        pair.client.send_data(sid, b"response after EOF")
        pair.client.end_stream(sid)
        pair.pump()
        self.assertEqual(data_of(pair.server_events, sid), b"response after EOF")
        self.assertIn(_mux.StreamEnded, types_of(pair.server_events))
        self.assertIn(_mux.StreamClosed, types_of(pair.server_events))
        self.assertEqual(pair.client.closed_by_send, [sid])
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.client.streams, {})
        self.assertEqual(pair.server.granted_total, 0)

    def test_half_close_client_first(self) -> None:
        """Half-close works in the other order too."""
        pair = Pair()
        sid = pair.open()
        pair.client.end_stream(sid)
        pair.pump()
        self.assertEqual(types_of(pair.server_events), [_mux.StreamEnded])
        pair.server.send_data(sid, b"late")
        pair.server.end_stream(sid)
        pair.pump()
        self.assertEqual(data_of(pair.client_events, sid), b"late")
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.client.streams, {})

    def test_fin_waits_for_buffered_data(self) -> None:
        """FIN is sent only after every buffered byte, even when the window is short."""
        pair = Pair(initial_window=20_000)
        sid = pair.open()
        pair.server.send_data(sid, b"x" * 50_000)
        pair.server.end_stream(sid)
        pair.pump()
        self.assertNotIn(_mux.StreamEnded, types_of(pair.client_events))
        pair.client.data_consumed(sid, len(data_of(pair.client_events, sid)))
        pair.pump()
        pair.client.data_consumed(sid, 50_000 - 20_000)
        pair.pump()
        self.assertEqual(len(data_of(pair.client_events, sid)), 50_000)
        self.assertEqual(types_of(pair.client_events)[-1], _mux.StreamEnded)

    def test_reset_mid_transfer(self) -> None:
        """A reset ends the stream at once at both ends; buffered data is dropped."""
        pair = Pair(initial_window=16_384)
        sid = pair.open()
        pair.server.send_data(sid, b"y" * 100_000)
        pair.pump()
        pair.server.reset_stream(sid, Reason.CANCELLED, "app went away")
        pair.pump()
        event = pair.client_events[-1]
        assert isinstance(event, _mux.StreamReset)
        self.assertEqual((event.reason, event.remote), (Reason.CANCELLED, True))
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.client.streams, {})
        self.assertEqual(pair.server.send_buffered(sid), 0)

    def test_reset_all(self) -> None:
        """reset_all (shutdown / link loss) resets every stream at the peer."""
        pair = Pair()
        ids = [pair.open() for _ in range(3)]
        self.assertEqual(pair.server.reset_all(Reason.SHUTDOWN), ids)
        pair.pump()
        self.assertEqual(types_of(pair.client_events), [_mux.StreamReset] * 3)
        self.assertEqual(pair.client.streams, {})


class ViolationTests(SynchronousTestCase):
    """Each violation has its documented outcome."""

    def inject(self, pair: Pair, frame: bytes) -> list[object]:
        """Deliver a hand-made frame to the client end."""
        return pair.client.receive_data(frame)

    def test_data_beyond_window(self) -> None:
        """DATA beyond the window resets only that stream (FLOW_CONTROL)."""
        pair = Pair(initial_window=16_384)
        sid, other = pair.open(), pair.open()
        events = self.inject(pair, fr.encode(FrameType.DATA, sid, b"z" * 16_385))
        (event,) = events
        assert isinstance(event, _mux.StreamReset)
        self.assertEqual((event.reason, event.remote), (Reason.FLOW_CONTROL, False))
        self.assertNotIn(sid, pair.client.streams)
        self.assertIn(other, pair.client.streams)
        sent = FrameDecoder(expect_magic=False).feed(b"".join(pair.client.data_to_send()))
        self.assertEqual([(f.type, f.stream_id) for f in sent], [(FrameType.RESET, sid)])

    def test_data_after_fin(self) -> None:
        """DATA after FIN resets the stream (PROTOCOL_ERROR)."""
        pair = Pair()
        sid = pair.open()
        self.inject(pair, fr.build_fin(sid))
        (event,) = self.inject(pair, fr.encode(FrameType.DATA, sid, b"late"))
        assert isinstance(event, _mux.StreamReset)
        self.assertEqual(event.reason, Reason.PROTOCOL_ERROR)

    def test_unknown_stream_ignored(self) -> None:
        """Frames for unknown streams are ignored (a RESET may have crossed them)."""
        pair = Pair()
        for frame in (fr.encode(FrameType.DATA, 99, b"x"), fr.build_window_update(99, 5),
                      fr.build_fin(99), fr.build_reset(99, Reason.CANCELLED)):
            self.assertEqual(self.inject(pair, frame), [])
        self.assertEqual(pair.client.data_to_send(), [])

    def test_unknown_frame_type_ignored_after_login(self) -> None:
        """An unknown frame type after login is ignored."""
        pair = Pair()
        self.assertEqual(self.inject(pair, fr.encode(0x0E, 0, b"future")), [])
        self.assertEqual(pair.client.state, LinkState.READY)

    def test_open_from_wrong_side(self) -> None:
        """OPEN sent to the opener closes the link."""
        pair = Pair()
        with self.assertRaises(LinkError) as raised:
            pair.server.receive_data(
                fr.build_open(1, fr.OpenRequest(1000, 0, "h", 1)))
        self.assertEqual(raised.exception.code, GoAway.PROTOCOL_ERROR)

    def test_open_id_must_rise(self) -> None:
        """Reusing a stream id closes the link."""
        pair = Pair()
        pair.open()
        with self.assertRaises(LinkError):
            self.inject(pair, fr.build_open(1, fr.OpenRequest(1000, 0, "h", 1)))

    def test_invalid_target(self) -> None:
        """An OPEN with a malformed target is answered INVALID_TARGET."""
        pair = Pair()
        bad = fr.encode(FrameType.OPEN, 5, fr.open_payload(1000, 0, fr.KIND_TCP,
                                                         fr.target_fields("h", 0)))
        self.assertEqual(self.inject(pair, bad), [])
        (frame,) = FrameDecoder(expect_magic=False).feed(b"".join(pair.client.data_to_send()))
        self.assertEqual(fr.parse_open_result(frame.payload)[0], Reason.INVALID_TARGET)

    def test_stream_limit(self) -> None:
        """OPEN beyond the stream limit is answered LIMIT."""
        pair = Pair(max_streams=2)
        pair.open()
        pair.open()
        with self.assertRaises(fr.StreamError):
            pair.server.open_stream("h", 1)
        self.inject(pair, fr.build_open(10, fr.OpenRequest(1000, 0, "h", 1)))
        (frame,) = FrameDecoder(expect_magic=False).feed(b"".join(pair.client.data_to_send()))
        self.assertEqual(fr.parse_open_result(frame.payload)[0], Reason.LIMIT)

    def test_stream_frame_before_login(self) -> None:
        """Stream frames before login close the link."""
        core = _mux.MuxConnection(opener=False)
        core.receive_data(fr.build_hello())
        with self.assertRaises(LinkError):
            core.receive_data(fr.build_open(1, fr.OpenRequest(1000, 0, "h", 1)))

    def test_first_frame_must_be_hello(self) -> None:
        """Anything before HELLO closes the link; so does a wrong version."""
        core = _mux.MuxConnection(opener=False)
        with self.assertRaises(LinkError):
            core.receive_data(fr.MAGIC + fr.build_ping(b"12345678"))
        core = _mux.MuxConnection(opener=False)
        with self.assertRaises(LinkError) as raised:
            core.receive_data(fr.build_hello(version=fr.PROTOCOL_VERSION + 1))
        self.assertEqual(raised.exception.code, GoAway.UNSUPPORTED_VERSION)
        self.assertIn(f"version {fr.PROTOCOL_VERSION + 1} is not supported",
                      raised.exception.message)

    def test_ping_answered(self) -> None:
        """PING is answered with PONG carrying the same bytes."""
        pair = Pair()
        pair.server.ping(b"ABCDEFGH")
        pair.pump()
        self.assertEqual(pair.server_events, [PongReceived(b"ABCDEFGH")])


class FlowControlTests(SynchronousTestCase):
    """Windows, credit and growth."""

    def test_sender_stops_at_window(self) -> None:
        """The sender never sends more than the window; the rest stays buffered."""
        pair = Pair(initial_window=20_000)
        sid = pair.open()
        pair.server.send_data(sid, b"a" * 50_000)
        pair.pump()
        self.assertEqual(len(data_of(pair.client_events, sid)), 20_000)
        self.assertEqual(pair.server.send_buffered(sid), 30_000)

    def test_no_credit_for_unconsumed_bytes(self) -> None:
        """Credit comes back only for bytes reported consumed, coalesced to a quarter window."""
        pair = Pair(initial_window=40_000, max_window=40_000)
        sid = pair.open()
        pair.server.send_data(sid, b"a" * 100_000)
        pair.pump()
        self.assertEqual(len(data_of(pair.client_events, sid)), 40_000)
        self.assertEqual(pair.server.streams[sid].send_window, 0)
        pair.client.data_consumed(sid, 5_000)  # below a quarter, but the sender is blocked
        pair.pump()
        self.assertEqual(len(data_of(pair.client_events, sid)), 45_000)

    def test_coalescing(self) -> None:
        """Without BLOCKED, small consumption does not produce WINDOW_UPDATE frames."""
        pair = Pair(initial_window=100_000)
        sid = pair.open()
        pair.server.send_data(sid, b"a" * 10_000)
        pair.pump()
        pair.client.data_consumed(sid, 10_000)
        self.assertEqual(pair.client.data_to_send(), [])
        pair.server.send_data(sid, b"a" * 20_000)
        pair.pump()
        pair.client.data_consumed(sid, 20_000)
        frames = FrameDecoder(expect_magic=False).feed(b"".join(pair.client.data_to_send()))
        self.assertEqual([(f.type, fr.parse_window_update(f.payload)) for f in frames],
                         [(FrameType.WINDOW_UPDATE, 30_000)])

    def test_window_grows_when_blocked_and_consumer_keeps_up(self) -> None:
        """A window-limited stream whose reader keeps up doubles its window, up to the max."""
        pair = Pair(initial_window=20_000, max_window=80_000)
        sid = pair.open()
        for _ in range(6):
            pair.server.send_data(sid, b"b" * 200_000)
            pair.pump()
            got = len(data_of(pair.client_events, sid))
            pair.client_events.clear()
            pair.client.data_consumed(sid, got)
            pair.pump()
        self.assertEqual(pair.client.streams[sid].recv_window, 80_000)

    def test_no_growth_when_consumer_paused(self) -> None:
        """A slow local reader does not make the window grow."""
        # Rounds of 1 s in which the reader is paused from 0.1 s to the end: 90 %.
        self.assertEqual(self.window_after_paused_rounds(1.0, 0.1, 1.0), 20_000)

    def test_growth_despite_short_pauses(self) -> None:
        """A window that arrives in one burst pauses a fast reader briefly; it still grows."""
        # Rounds of 0.1 s with a pause from 0.08 s to 0.082 s: 2 %.
        self.assertEqual(self.window_after_paused_rounds(0.1, 0.08, 0.082), 80_000)

    def window_after_paused_rounds(self, round_length: float, pause_at: float,
                                   resume_at: float) -> int:
        """The receive window after four window-limited rounds in which the local reader is
        paused from ``pause_at`` to ``resume_at`` seconds into each round."""
        pair = Pair(initial_window=20_000, max_window=80_000)
        sid = pair.open()
        start = 0.0
        for _ in range(4):
            pair.server.send_data(sid, b"b" * 100_000)
            pair.pump()
            pair.client.set_consumer_paused(sid, True, start + pause_at)
            pair.client.set_consumer_paused(sid, False, start + resume_at)
            start += round_length
            got = len(data_of(pair.client_events, sid))
            pair.client_events.clear()
            pair.client.data_consumed(sid, got, start)
            pair.pump()
        return pair.client.streams[sid].recv_window

    def test_budget_bounds_growth_and_initial_windows(self) -> None:
        """The link budget caps the sum of windows; streams beyond it get the minimum."""
        pair = Pair(initial_window=100_000, max_window=1_000_000, receive_budget=250_000)
        first = pair.open()
        for _ in range(6):
            pair.server.send_data(first, b"c" * 1_000_000)
            pair.pump()
            got = len(data_of(pair.client_events, first))
            pair.client_events.clear()
            pair.client.data_consumed(first, got)
            pair.pump()
        self.assertEqual(pair.client.granted_total, 250_000)
        pair.server.reset_stream(first, Reason.CANCELLED)
        pair.pump()
        sids = [pair.open() for _ in range(4)]
        windows = [pair.server.streams[s].recv_window for s in sids]
        self.assertEqual(windows, [100_000, 100_000, 50_000, _mux.MIN_WINDOW])

    def test_fairness(self) -> None:
        """A small write on one stream goes out within a chunk of another stream's bulk."""
        pair = Pair(initial_window=4_000_000)
        bulk, small = pair.open(), pair.open()
        pair.server.send_data(bulk, b"B" * 3_000_000)
        pair.server.send_data(small, b"!")
        out = pair.server.data_to_send(limit=100_000)
        frames = FrameDecoder(expect_magic=False).feed(b"".join(out))
        order = [f.stream_id for f in frames]
        self.assertLessEqual(order.index(small), 1)
        self.assertTrue(all(len(f.payload) <= pair.server.chunk_size for f in frames))

    def test_control_frames_first(self) -> None:
        """Control frames (here a WINDOW_UPDATE) go out before queued DATA."""
        pair = Pair(initial_window=40_000)
        sid = pair.open()
        pair.server.send_data(sid, b"a" * 40_000)
        pair.pump()
        pair.client.send_data(sid, b"d" * 30_000)
        pair.client.data_consumed(sid, 40_000)
        frames = FrameDecoder(expect_magic=False).feed(b"".join(pair.client.data_to_send()))
        self.assertEqual(frames[0].type, FrameType.WINDOW_UPDATE)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["write", "consume", "pause", "resume", "pump",
                                               "write2"]),
                              st.integers(min_value=1, max_value=70_000)),
                    max_size=60))
    def test_window_invariants(self, steps: list[tuple[str, int]]) -> None:
        """Under random writes, reads and pauses: bytes are exact and in order, no window is
        negative, credit never exceeds the window, and nothing stalls for good."""
        pair = Pair(initial_window=30_000, max_window=120_000, receive_budget=200_000)
        sids = [pair.open(), pair.open()]
        written = {s: bytearray() for s in sids}
        delivered = {s: bytearray() for s in sids}
        unconsumed = {s: 0 for s in sids}
        paused = False
        counter = 0

        def collect() -> None:
            for event in pair.client_events:
                if isinstance(event, _mux.DataReceived):
                    delivered[event.stream_id] += event.data
                    unconsumed[event.stream_id] += len(event.data)
            pair.client_events.clear()

        for action, n in steps:
            if action in ("write", "write2"):
                sid = sids[action == "write2"]
                data = bytes((counter + i) % 251 for i in range(min(n, 5000))) * (n // 5000 + 1)
                data = data[:n]
                counter += n
                pair.server.send_data(sid, data)
                written[sid] += data
            elif action == "consume" and not paused:
                for sid in sids:
                    amount = min(n, unconsumed[sid])
                    unconsumed[sid] -= amount
                    pair.client.data_consumed(sid, amount)
            elif action == "pause":
                paused = True
                for sid in sids:
                    pair.client.set_consumer_paused(sid, True, counter)
            elif action == "resume":
                paused = False
                for sid in sids:
                    pair.client.set_consumer_paused(sid, False, counter)
            else:
                pair.pump(limit=n)
                collect()
            for sid in sids:
                sender = pair.server.streams[sid]
                receiver = pair.client.streams[sid]
                self.assertGreaterEqual(sender.send_window, 0)
                self.assertGreaterEqual(receiver.recv_available, 0)
                self.assertLessEqual(receiver.recv_available, receiver.recv_window)
                self.assertLessEqual(pair.client.granted_total,
                                     max(200_000, 2 * _mux.MIN_WINDOW))
        # Drain: consume everything until all written bytes arrived.
        for _ in range(10_000):
            pair.pump()
            collect()
            if all(len(delivered[s]) == len(written[s]) for s in sids):
                break
            for sid in sids:
                pair.client.data_consumed(sid, unconsumed[sid])
                unconsumed[sid] = 0
        for sid in sids:
            self.assertEqual(bytes(delivered[sid]), bytes(written[sid]))


class EarlyDataTests(SynchronousTestCase):
    """The opener's first bytes travel with the OPEN (docs/protocol.md §5)."""

    def test_early_data_and_fin_before_accept(self) -> None:
        """Up to EARLY_WINDOW bytes and a FIN reach the acceptor before it accepts; the rest
        follows the OPEN_RESULT."""
        pair = Pair()
        sid = pair.server.open_stream("target", 22)
        pair.server.send_data(sid, b"e" * (fr.EARLY_WINDOW + 5000))
        pair.pump()
        self.assertEqual(len(data_of(pair.client_events, sid)), fr.EARLY_WINDOW)
        self.assertEqual(pair.client.streams[sid].state, _mux.StreamState.OPENING)
        pair.client.accept_stream(sid)
        pair.pump()
        self.assertEqual(len(data_of(pair.client_events, sid)), fr.EARLY_WINDOW + 5000)
        self.assertIn(_mux.StreamOpened, types_of(pair.server_events))

    def test_early_fin(self) -> None:
        """A request and FIN sent before the OPEN_RESULT arrive in order; the answer flows."""
        pair = Pair()
        sid = pair.server.open_stream("target", 22)
        pair.server.send_data(sid, b"GET / HTTP/1.0\r\n\r\n")
        pair.server.end_stream(sid)
        pair.pump()
        self.assertEqual(types_of(pair.client_events),
                         [_mux.StreamOpenRequested, _mux.DataReceived, _mux.StreamEnded])
        pair.client.accept_stream(sid)
        pair.client.send_data(sid, b"HTTP/1.0 200 OK\r\n\r\n")
        pair.client.end_stream(sid)
        pair.pump()
        self.assertEqual(data_of(pair.server_events, sid), b"HTTP/1.0 200 OK\r\n\r\n")
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.client.streams, {})

    def test_too_much_early_data(self) -> None:
        """More than EARLY_WINDOW bytes before the OPEN_RESULT resets the stream."""
        pair = Pair()
        sid = pair.server.open_stream("target", 22)
        pair.pump()
        events = pair.client.receive_data(
            fr.encode(FrameType.DATA, sid, b"x" * fr.EARLY_WINDOW)
            + fr.encode(FrameType.DATA, sid, b"y"))
        self.assertEqual(types_of(events), [_mux.DataReceived, _mux.StreamReset])
        self.assertEqual(events[1].reason, Reason.FLOW_CONTROL)  # type: ignore[attr-defined]

    def test_rejected_early_data_dropped(self) -> None:
        """A refused OPEN drops the early data buffered at the opener."""
        pair = Pair()
        sid = pair.server.open_stream("target", 22)
        pair.server.send_data(sid, b"z" * 100_000)
        pair.pump()
        pair.client.reject_stream(sid, Reason.DENIED, "no")
        pair.pump()
        self.assertEqual(types_of(pair.server_events), [_mux.StreamOpenFailed])
        self.assertEqual(pair.server.streams, {})
        self.assertEqual(pair.client.streams, {})


class StreamStateTests(SynchronousTestCase):
    """The core moves each stream through the table of tcptunnel._stream, opening sub-states
    included."""

    def test_opener_early_fin_states(self) -> None:
        """An early FIN puts the opener in 'opening (OPEN sent, FIN sent)' and the acceptor in
        'opening (OPEN received, FIN received)'; the OPEN_RESULT half-closes both."""
        pair = Pair()
        sid = pair.server.open_stream("target", 22)
        self.assertIs(pair.server.stream_state(sid), _mux.StreamState.OPEN_SENT)
        pair.server.send_data(sid, b"req")
        pair.server.end_stream(sid)
        pair.pump()
        self.assertIs(pair.server.stream_state(sid), _mux.StreamState.OPEN_SENT_FIN_SENT)
        self.assertIs(pair.client.stream_state(sid),
                      _mux.StreamState.OPEN_RECEIVED_FIN_RECEIVED)
        pair.client.accept_stream(sid)
        pair.pump()
        self.assertIs(pair.server.stream_state(sid), _mux.StreamState.HALF_CLOSED_LOCAL)
        self.assertIs(pair.client.stream_state(sid), _mux.StreamState.HALF_CLOSED_REMOTE)
        pair.client.end_stream(sid)
        pair.pump()
        self.assertIsNone(pair.server.stream_state(sid))
        self.assertIsNone(pair.client.stream_state(sid))
        self.assertIn(_mux.StreamClosed, types_of(pair.server_events))
        self.assertEqual(pair.client.closed_by_send, [sid])  # closed by its own FIN

    def test_fin_moves_state_when_framed(self) -> None:
        """A FIN queued behind unsent data leaves the state alone until the FIN goes out."""
        pair = Pair(initial_window=16_384)
        sid = pair.open()
        pair.server.send_data(sid, b"d" * 40_000)
        pair.server.end_stream(sid)
        pair.pump()
        self.assertIs(pair.server.stream_state(sid), _mux.StreamState.OPEN)
        pair.server.send_data(sid, b"ignored after end_stream")
        self.assertEqual(pair.server.send_buffered(sid), 40_000 - 16_384)
        pair.client.data_consumed(sid, 16_384)
        pair.pump()
        pair.client.data_consumed(sid, 16_384)
        pair.pump()
        self.assertIs(pair.server.stream_state(sid), _mux.StreamState.HALF_CLOSED_LOCAL)
        self.assertEqual(len(data_of(pair.client_events, sid)), 40_000)

    def test_acceptor_sends_nothing_before_accepting(self) -> None:
        """Before it accepted, the acceptor's FIN is ignored and its data refused."""
        pair = Pair()
        sid = pair.server.open_stream("target", 22)
        pair.pump()
        self.assertIs(pair.client.stream_state(sid), _mux.StreamState.OPEN_RECEIVED)
        pair.client.end_stream(sid)
        self.assertEqual(pair.client.data_to_send(), [])
        with self.assertRaises(RuntimeError):
            pair.client.send_data(sid, b"too soon")
        self.assertIs(pair.client.stream_state(sid), _mux.StreamState.OPEN_RECEIVED)

    def test_opener_fin_before_result_is_violation(self) -> None:
        """A FIN reaching the opener before OPEN_RESULT resets the stream, naming the state."""
        pair = Pair()
        sid = pair.server.open_stream("target", 22)
        pair.server.data_to_send()
        (event,) = pair.server.receive_data(fr.build_fin(sid))
        assert isinstance(event, _mux.StreamReset)
        self.assertEqual((event.reason, event.message, event.remote),
                         (Reason.PROTOCOL_ERROR, "RECV_FIN in state opening (OPEN sent)", False))
        self.assertIsNone(pair.server.stream_state(sid))

    def test_second_open_result(self) -> None:
        """A second OPEN_RESULT resets the stream (PROTOCOL_ERROR)."""
        pair = Pair()
        sid = pair.open()
        (event,) = pair.server.receive_data(fr.build_open_result(sid, Reason.OK, 65536))
        assert isinstance(event, _mux.StreamReset)
        self.assertEqual((event.reason, event.message),
                         (Reason.PROTOCOL_ERROR, "RECV_OPEN_OK in state open"))

    def test_open_result_window_overflow(self) -> None:
        """Credit granted before OPEN_RESULT plus its window may not pass 2^31-1."""
        pair = Pair()
        sid = pair.server.open_stream("target", 22)
        pair.server.data_to_send()
        self.assertEqual(pair.server.receive_data(
            fr.build_window_update(sid, fr.MAX_WINDOW - fr.EARLY_WINDOW)), [])
        (event,) = pair.server.receive_data(
            fr.build_open_result(sid, Reason.OK, fr.EARLY_WINDOW + 1))
        assert isinstance(event, _mux.StreamReset)
        self.assertEqual(event.reason, Reason.FLOW_CONTROL)
        self.assertIsNone(pair.server.stream_state(sid))

    def test_open_result_at_the_acceptor(self) -> None:
        """An OPEN_RESULT sent to the acceptor resets the stream, naming the event it was."""
        pair = Pair()
        sid = pair.open()
        (event,) = pair.client.receive_data(fr.build_open_result(sid, Reason.DENIED, 0, "no"))
        assert isinstance(event, _mux.StreamReset)
        self.assertEqual((event.reason, event.message),
                         (Reason.PROTOCOL_ERROR, "RECV_OPEN_FAILED in state open"))


class QueueDelayTests(SynchronousTestCase):
    """Windows sized by the credit round trip (docs/protocol.md §6, "Queueing")."""

    def clocked_pair(self, **kwargs: int) -> tuple[Pair, Clock]:
        """A Pair whose receiving end times credit round trips with a Clock."""
        pair = Pair(**kwargs)
        clock = Clock()
        pair.client.clock = clock.seconds
        return pair, clock

    def test_first_byte_past_the_old_credit_times_the_round_trip(self) -> None:
        """Bytes the sender sent on credit it had before an update make no sample; the first
        byte beyond it gives the time since the update."""
        pair, clock = self.clocked_pair(initial_window=40_000, max_window=40_000)
        sid = pair.open()
        pair.server.send_data(sid, b"a" * 20_000)
        pair.pump()
        clock.advance(1.0)
        pair.client.data_consumed(sid, 20_000, clock.seconds())  # update; 20,000 left
        clock.advance(0.05)
        pair.server.send_data(sid, b"b" * 15_000)  # leaves before the update arrives
        pair.pump()
        self.assertEqual(pair.client.credit_rtt.samples, 0)
        clock.advance(0.05)
        pair.server.send_data(sid, b"c" * 10_000)  # 5,000 of it past the old credit
        pair.pump()
        self.assertEqual(pair.client.credit_rtt.samples, 1)
        self.assertAlmostEqual(pair.client.credit_rtt.srtt or 0.0, 0.1)
        self.assertEqual(len(data_of(pair.client_events, sid)), 45_000)

    def bulk_rounds(self, pair: Pair, clock: Clock, sids: list[int], rounds: int,
                    rtt: tuple[float, float] | None) -> bytes:
        """``rounds`` of window-limited bulk on ``sids``, the reader taking everything 0.1 s
        later; before each read, ``rtt`` (minimum, current) is what the path shows (the
        in-memory pump's own round trips, 0 s, are not sampled).  Returns the bytes of the
        first stream."""
        pair.client.clock = None
        got = b""
        for _ in range(rounds):
            for sid in sids:
                pair.server.send_data(sid, bytes([sid]) * 2_000_000)
            pair.pump()
            clock.advance(0.1)
            if rtt is not None:
                pair.client.credit_rtt.sample(rtt[0], clock.seconds())
                pair.client.credit_rtt.srtt = rtt[1]
            for sid in sids:
                data = data_of(pair.client_events, sid)
                got += data if sid == sids[0] else b""
                pair.client.data_consumed(sid, len(data), clock.seconds())
            pair.client_events.clear()
            pair.pump()
        return got

    def test_windows_shrink_while_bytes_queue(self) -> None:
        """Credit round trips 20 ms above a 1 ms minimum cut each window-limited stream's
        window by a quarter per round trip, down to two chunks, and the link's granted total
        follows; the streams keep flowing."""
        pair, clock = self.clocked_pair(initial_window=256 * 1024, max_window=1024 * 1024)
        sids = [pair.open(), pair.open()]
        got = self.bulk_rounds(pair, clock, sids, 12, rtt=(0.001, 0.021))
        windows = [pair.client.streams[s].recv_window for s in sids]
        self.assertEqual(windows, [_mux.SHRINK_FLOOR] * 2)
        self.assertEqual(pair.client.granted_total, sum(windows))
        self.assertGreater(pair.client.windows_shrunk, 0)
        self.assertEqual(got, bytes([sids[0]]) * len(got))
        self.assertGreater(len(got), 12 * _mux.SHRINK_FLOOR)
        for sid in sids:
            receiver = pair.client.streams[sid]
            self.assertLessEqual(receiver.recv_available, receiver.recv_window)

    def test_no_growth_while_bytes_queue_growth_on_a_long_path(self) -> None:
        """A blocked sender whose reader keeps up gets no larger window while bytes queue;
        with 70 ms of queueing over an 80 ms path (below the path's own round trip) it still
        doubles to the maximum."""
        pair, clock = self.clocked_pair(initial_window=64 * 1024, max_window=1024 * 1024)
        sid = pair.open()
        self.bulk_rounds(pair, clock, [sid], 6, rtt=(0.001, 0.010))
        self.assertLessEqual(pair.client.streams[sid].recv_window, 64 * 1024)
        pair, clock = self.clocked_pair(initial_window=64 * 1024, max_window=1024 * 1024)
        sid = pair.open()
        self.bulk_rounds(pair, clock, [sid], 6, rtt=(0.080, 0.150))
        self.assertEqual(pair.client.streams[sid].recv_window, 1024 * 1024)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["write", "consume", "pump", "tick", "rtt"]),
                              st.integers(min_value=1, max_value=70_000)),
                    max_size=80))
    def test_invariants_under_shrinking(self, steps: list[tuple[str, int]]) -> None:
        """Random writes, reads, clock ticks and round-trip samples (some far above the
        minimum): bytes arrive exact and in order, credit never exceeds a window, no window
        falls below two chunks, the granted total is the sum of the windows within the
        budget, and nothing stalls for good."""
        budget = 300_000
        pair, clock = self.clocked_pair(initial_window=100_000, max_window=200_000,
                                        receive_budget=budget)
        sids = [pair.open(), pair.open()]
        written = {s: bytearray() for s in sids}
        delivered = {s: bytearray() for s in sids}
        unconsumed = {s: 0 for s in sids}

        def collect() -> None:
            for event in pair.client_events:
                if isinstance(event, _mux.DataReceived):
                    delivered[event.stream_id] += event.data
                    unconsumed[event.stream_id] += len(event.data)
            pair.client_events.clear()

        for index, (action, n) in enumerate(steps):
            sid = sids[index % 2]
            if action == "write":
                data = bytes((len(written[sid]) + i) % 251 for i in range(n))
                pair.server.send_data(sid, data)
                written[sid] += data
            elif action == "consume":
                amount = min(n, unconsumed[sid])
                unconsumed[sid] -= amount
                pair.client.data_consumed(sid, amount, clock.seconds())
            elif action == "tick":
                clock.advance(n / 1e6)
            elif action == "rtt":
                pair.client.credit_rtt.sample(n / 1e6, clock.seconds())
            else:
                pair.pump(limit=n)
                collect()
            for s in sids:
                receiver = pair.client.streams[s]
                self.assertGreaterEqual(pair.server.streams[s].send_window, 0)
                self.assertLessEqual(receiver.recv_available, receiver.recv_window)
                self.assertGreaterEqual(receiver.recv_window, _mux.SHRINK_FLOOR)
            self.assertEqual(pair.client.granted_total,
                             sum(pair.client.streams[s].recv_window for s in sids))
            self.assertLessEqual(pair.client.granted_total, budget)
        for _ in range(10_000):
            pair.pump()
            collect()
            if all(len(delivered[s]) == len(written[s]) for s in sids):
                break
            clock.advance(0.01)
            for s in sids:
                pair.client.data_consumed(s, unconsumed[s], clock.seconds())
                unconsumed[s] = 0
        for s in sids:
            self.assertEqual(bytes(delivered[s]), bytes(written[s]))

    def test_a_sender_with_little_to_send_gives_no_sample(self) -> None:
        """A stream that uses less than half its window (interactive traffic) times nothing:
        its next bytes come when its user types, and that is no round trip of the path."""
        pair, clock = self.clocked_pair(initial_window=40_000, max_window=40_000)
        sid = pair.open()
        pair.server.send_data(sid, b"k" * 15_000)
        pair.pump()
        pair.client.data_consumed(sid, 15_000, clock.seconds())  # an update: 25,000 unused
        clock.advance(30.0)
        pair.server.send_data(sid, b"k" * 30_000)  # past the old credit, 30 s later
        pair.pump()
        self.assertEqual(pair.client.credit_rtt.samples, 0)
        self.assertEqual(len(data_of(pair.client_events, sid)), 45_000)

    def test_a_dawdling_sender_shrinks_only_its_own_window(self) -> None:
        """Slow round trips on one stream (a sender that waits before using new credit) cut
        that stream's window, not the window of a stream whose round trips stay short."""
        pair, clock = self.clocked_pair(initial_window=256 * 1024, max_window=256 * 1024)
        slow, fast = pair.open(), pair.open()
        pair.server.send_data(fast, b"f" * 4 * 1024 * 1024)  # always more to send
        for _ in range(8):
            pair.server.send_data(slow, b"x" * 256 * 1024)
            pair.pump()  # both windows spent
            clock.advance(0.001)
            for sid in (slow, fast):
                pair.client.data_consumed(sid, len(data_of(pair.client_events, sid)),
                                          clock.seconds())
            pair.client_events.clear()
            pair.pump()  # the fast stream's sender uses its new credit at once: 1 ms
            clock.advance(0.05)  # the slow one's 50 ms later
            pair.server.send_data(slow, b"y" * 1024)
            pair.pump()
        self.assertEqual(pair.client.streams[fast].recv_window, 256 * 1024)
        self.assertLess(pair.client.streams[slow].recv_window, 256 * 1024)
