"""MuxProtocol / MuxStream / SpliceProtocol over iosim: producers, stalls, half-close, loss."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _mux
from tcptunnel._frames import FrameDecoder, FrameType, Reason
from tcptunnel.mux import MuxProtocol
from tcptunnel.splice import SpliceProtocol


class LocalSocket(StringTransport):
    """A local TCP socket stand-in that records half-close and abort."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:  # noqa: N802
        self.write_closed = True

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True
        super().abortConnection()


class Ends:
    """Two MuxProtocols (Proxy-Server side opens, Proxy-Client side accepts) over iosim."""

    def __init__(self, initial_window: int = 64 * 1024) -> None:
        self.clock = Clock()
        self.opener = MuxProtocol(_mux.MuxConnection(True, initial_window=initial_window,
                                                     max_window=initial_window), self.clock)
        self.acceptor = MuxProtocol(_mux.MuxConnection(False, initial_window=initial_window,
                                                       max_window=initial_window), self.clock)
        self.accepted: list[tuple[SpliceProtocol, LocalSocket]] = []
        self.acceptor.on_open_requested = self._open_requested
        self.pump = iosim.connect(self.acceptor, iosim.makeFakeServer(self.acceptor),
                                  self.opener, iosim.makeFakeClient(self.opener), greet=False)
        self.pump.flush()
        self.opener.core.mark_ready()
        self.acceptor.core.mark_ready()

    def _open_requested(self, stream_id: int, request: Any) -> None:
        splice = SpliceProtocol()
        socket = LocalSocket()
        splice.makeConnection(socket)
        splice.stream = self.acceptor.attach_stream(stream_id, splice)
        self.acceptor.accept_stream(stream_id)
        splice.attach(splice.stream)
        self.accepted.append((splice, socket))

    def open(self) -> tuple[SpliceProtocol, LocalSocket, SpliceProtocol, LocalSocket]:
        """Open a stream: (local splice, local socket, far splice, far socket)."""
        splice = SpliceProtocol()
        socket = LocalSocket()
        splice.makeConnection(socket)
        splice.stream = self.opener.open_stream("target", 1, splice)
        self.pump.flush()
        splice.attach(splice.stream)  # what BindingConnection.stream_opened does
        far_splice, far_socket = self.accepted[-1]
        return splice, socket, far_splice, far_socket


class MuxProtocolTests(SynchronousTestCase):
    """The Twisted adapters, end to end over an in-memory link."""

    def test_bytes_flow_both_ways(self) -> None:
        """Local bytes reach the far socket and back."""
        ends = Ends()
        splice, socket, far_splice, far_socket = ends.open()
        splice.dataReceived(b"hello")
        ends.pump.flush()
        self.assertEqual(far_socket.value(), b"hello")
        far_splice.dataReceived(b"world")
        ends.pump.flush()
        self.assertEqual(socket.value(), b"world")

    def test_window_pauses_local_reader(self) -> None:
        """When the far socket stops taking data, the local socket's reading is paused once the
        window is spent, and resumed when the far end drains."""
        ends = Ends(initial_window=64 * 1024)
        splice, socket, _far_splice, far_socket = ends.open()
        assert far_socket.producer is not None
        far_socket.producer.pauseProducing()  # the far socket's send buffer is full
        for _ in range(10):
            splice.dataReceived(b"p" * 32 * 1024)
            ends.pump.flush()
        self.assertEqual(socket.producerState, "paused")
        self.assertEqual(len(far_socket.value()), 64 * 1024)
        far_socket.producer.resumeProducing()  # it drained: credit goes back
        ends.pump.flush()
        self.assertEqual(socket.producerState, "producing")
        self.assertGreater(len(far_socket.value()), 64 * 1024)

    def test_stalled_stream_does_not_stop_another(self) -> None:
        """A stream whose reader stalls leaves another stream of the link flowing."""
        ends = Ends(initial_window=64 * 1024)
        stalled, _s, _fs, stalled_far = ends.open()
        flowing, _f, _ff, flowing_far = ends.open()
        assert stalled_far.producer is not None
        stalled_far.producer.pauseProducing()
        for _ in range(40):
            stalled.dataReceived(b"s" * 16 * 1024)
            flowing.dataReceived(b"f" * 16 * 1024)
            ends.pump.flush()
        self.assertEqual(len(flowing_far.value()), 40 * 16 * 1024)
        self.assertEqual(len(stalled_far.value()), 64 * 1024)

    def test_half_close(self) -> None:
        """Local EOF half-closes the far socket; the other direction keeps flowing; then both
        close cleanly without any abort."""
        ends = Ends()
        splice, socket, far_splice, far_socket = ends.open()
        splice.dataReceived(b"request")
        splice.readConnectionLost()
        ends.pump.flush()
        self.assertEqual(far_socket.value(), b"request")
        self.assertTrue(far_socket.write_closed)
        far_splice.dataReceived(b"answer")
        far_splice.readConnectionLost()
        ends.pump.flush()
        self.assertEqual(socket.value(), b"answer")
        self.assertTrue(socket.write_closed)
        self.assertTrue(socket.disconnecting and far_socket.disconnecting)
        self.assertFalse(socket.aborted or far_socket.aborted)
        self.assertEqual(ends.opener.streams, {})
        self.assertEqual(ends.acceptor.streams, {})

    def test_local_reset_resets_far_socket(self) -> None:
        """A local connection that dies uncleanly aborts the far socket (RST, not EOF)."""
        ends = Ends()
        splice, _socket, _far_splice, far_socket = ends.open()
        splice.connectionLost(Failure(ConnectionDone()))
        ends.pump.flush()
        self.assertTrue(far_socket.aborted)

    def test_link_loss_resets_every_stream(self) -> None:
        """Losing the link aborts every local socket on both ends."""
        ends = Ends()
        pairs = [ends.open() for _ in range(3)]
        ends.opener.transport.loseConnection()  # type: ignore[union-attr]
        ends.pump.flush()
        for _splice, socket, _far_splice, far_socket in pairs:
            self.assertTrue(socket.aborted)
            self.assertTrue(far_socket.aborted)
        self.assertEqual(ends.opener.core.streams, {})

    def test_shutdown_reset_reason(self) -> None:
        """reset_all_streams sends RESET with the reason to the far end."""
        ends = Ends()
        _splice, socket, far_splice, far_socket = ends.open()
        ends.opener.reset_all_streams(Reason.SHUTDOWN, "stopping")
        ends.pump.flush()
        self.assertTrue(socket.aborted and far_socket.aborted)
        self.assertIn("SHUTDOWN", far_splice.end_description)

    def test_keepalive_closes_silent_link(self) -> None:
        """A silent link is pinged after the interval and closed after interval + timeout."""
        clock = Clock()
        protocol = MuxProtocol(_mux.MuxConnection(True), clock, keepalive_interval=15,
                               keepalive_timeout=30)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.core.mark_ready()
        clock.advance(14)
        self.assertNotIn(FrameType.PING, [f.type for f in FrameDecoder().feed(transport.value())])
        clock.advance(2)
        self.assertIn(FrameType.PING, [f.type for f in FrameDecoder().feed(transport.value())])
        clock.advance(27)
        self.assertFalse(transport.disconnecting)
        clock.advance(5)
        self.assertTrue(transport.disconnecting)
        self.assertIn("KEEPALIVE_TIMEOUT", protocol.close_reason)

    def test_pong_measures_rtt(self) -> None:
        """A PONG for our PING sets the link's round-trip time from the clock."""
        ends = Ends()
        ends.opener.send_ping()
        ends.clock.advance(0.25)
        ends.pump.flush()
        self.assertEqual(ends.opener.rtt, 0.25)
