"""MuxProtocol / MuxStream / SpliceProtocol over iosim: producers, stalls, half-close, loss;
and how a local connection's end reaches the far end, on real sockets through a real tunnel."""

from __future__ import annotations

import struct
from socket import SO_LINGER, SOL_SOCKET
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tcptunnel import _mux
from tcptunnel._frames import FrameDecoder, FrameType, Reason
from tcptunnel.mux import MuxProtocol
from tcptunnel.proxy import ProxyService
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.splice import SpliceProtocol
from tcptunnel.test._harness import EchoProtocol, Tunnel, binding_port, connect, listen, wait_until


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

    def test_credit_round_trips_timed_with_the_reactor_clock(self) -> None:
        """The core's credit round trips are timed with the protocol's reactor clock: a bulk
        transfer whose credit comes back 10 ms later gives 10 ms samples."""
        ends = Ends(initial_window=64 * 1024)
        splice, _socket, _far_splice, far_socket = ends.open()
        for _ in range(6):
            splice.dataReceived(b"r" * 64 * 1024)
            ends.clock.advance(0.01)
            ends.pump.flush()
        rtt = ends.acceptor.core.credit_rtt
        self.assertGreater(rtt.samples, 0)
        self.assertAlmostEqual(rtt.min_rtt or 0.0, 0.01)
        self.assertEqual(len(far_socket.value()), 6 * 64 * 1024)

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
        """A local connection that dies uncleanly aborts the far socket (RST, not EOF), with
        CONNECTION_RESET and a message saying what happened, at both ends."""
        ends = Ends()
        splice, _socket, far_splice, far_socket = ends.open()
        lost = Failure(ConnectionLost("Connection reset by peer"))
        splice.connectionLost(lost)
        ends.pump.flush()
        self.assertTrue(far_socket.aborted)
        message = f"the local connection was lost: {lost.getErrorMessage()}"
        self.assertIn("Connection reset by peer", message)
        self.assertEqual(splice.end_description, f"reset here (CONNECTION_RESET: {message})")
        self.assertEqual(far_splice.end_description,
                         f"reset by the far end (CONNECTION_RESET: {message})")

    def test_stream_state_read_from_the_core(self) -> None:
        """MuxStream's state, write_closed, remote_ended and finished follow the core's record,
        also after the stream left the core's table."""
        ends = Ends()
        splice, _socket, far_splice, _far_socket = ends.open()
        stream, far = splice.stream, far_splice.stream
        assert stream is not None and far is not None
        self.assertIs(stream.state, _mux.StreamState.OPEN)
        splice.readConnectionLost()
        ends.pump.flush()
        self.assertTrue(stream.write_closed and far.remote_ended)
        self.assertIs(stream.state, _mux.StreamState.HALF_CLOSED_LOCAL)
        self.assertFalse(stream.finished)
        far.abortConnection(Reason.CANCELLED, "done")
        ends.pump.flush()
        self.assertTrue(stream.finished and far.finished)
        self.assertIs(stream.state, _mux.StreamState.RESET)
        self.assertEqual(ends.opener.core.streams, {})

    def test_teardown_order_stop_producing_first(self) -> None:
        """Twisted's order (the transport's stopProducing, then the protocol's connectionLost)
        still resets with CONNECTION_RESET, not CANCELLED."""
        ends = Ends()
        splice, socket, far_splice, _far_socket = ends.open()
        assert socket.producer is not None
        socket.producer.stopProducing()  # what FileDescriptor.connectionLost does first
        ends.pump.flush()
        self.assertEqual(far_splice.end_description, "")
        splice.connectionLost(Failure(ConnectionLost()))
        ends.pump.flush()
        self.assertTrue(far_splice.end_description.startswith(
            "reset by the far end (CONNECTION_RESET: the local connection was lost"),
            far_splice.end_description)

    def test_clean_local_close_is_fin(self) -> None:
        """A local connection that closes cleanly ends its direction with FIN: the far socket
        is half-closed, not aborted; the far end's FIN then closes the stream."""
        ends = Ends()
        splice, socket, far_splice, far_socket = ends.open()
        splice.dataReceived(b"last words")
        socket.connected = False  # what the transport's connectionLost sets first
        splice.connectionLost(Failure(ConnectionDone()))
        ends.pump.flush()
        self.assertEqual(far_socket.value(), b"last words")
        self.assertTrue(far_socket.write_closed)
        self.assertFalse(far_socket.aborted)
        far_splice.readConnectionLost()
        ends.pump.flush()
        self.assertEqual(splice.end_description, "closed (FIN both ways)")
        self.assertEqual(far_splice.end_description, "closed (FIN both ways)")
        self.assertEqual(ends.opener.streams, {})
        self.assertEqual(ends.acceptor.core.streams, {})

    def test_data_after_clean_local_close_resets(self) -> None:
        """Data for a local connection that closed cleanly resets the stream, as a closed
        TCP socket answers with a RST: the far application learns it was not delivered."""
        ends = Ends()
        splice, socket, far_splice, far_socket = ends.open()
        socket.connected = False
        splice.connectionLost(Failure(ConnectionDone()))
        ends.pump.flush()
        far_splice.dataReceived(b"nobody reads this")
        ends.pump.flush()
        self.assertTrue(far_socket.aborted)
        self.assertEqual(
            far_splice.end_description,
            "reset by the far end (CONNECTION_RESET: data arrived after the local connection "
            "closed)")

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


@implementer(ILogObserver)
class StreamEndLog:
    """Collects the ``stream_ended`` log events of the proxies in this process."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        """Keep stream-end events."""
        if event.get("event") == "stream_ended":
            self.events.append(event)

    def how(self, service: ProxyService) -> list[str]:
        """How each stream of one proxy ended, in order."""
        return [e["how"] for e in self.events if e.get("log_source") is service]


class LocalTeardownTests(TestCase):
    """A local application ending its connection, on real loopback sockets through a real
    tunnel (Gateway, Proxy-Server, Proxy-Client in this process)."""

    async def tunnel(self) -> tuple[Tunnel, ProxyServerService, ProxyClientService, int]:
        """A running tunnel to an echo target: (tunnel, Proxy-Server, Proxy-Client, port)."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self)
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        client = tunnel.start_proxy_client(allowed=f'<Endpoint host="127.0.0.1" port="{echo}"/>')
        server = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(client, server)
        return tunnel, server, client, binding_port(server)

    async def test_client_rst_mid_transfer(self) -> None:
        """A client that RSTs mid-transfer (SO_LINGER 0) is reset with CONNECTION_RESET and a
        message naming what happened at both proxies, and both log it so."""
        log = StreamEndLog(self)
        _tunnel, server, client_proxy, port = await self.tunnel()
        app = await connect(port)
        app.transport.write(b"m" * (4 * 1024 * 1024))
        await wait_until(lambda: len(app.received) > 0, 10, "the first echoed bytes")
        handle = app.transport.getHandle()
        handle.setsockopt(SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, 0))
        app.transport.abortConnection()  # close() with SO_LINGER 0: a TCP RST
        await wait_until(lambda: bool(log.how(server) and log.how(client_proxy)), 10,
                         "both proxies to log the end of the stream")
        (here,) = log.how(server)
        (far,) = log.how(client_proxy)
        self.assertTrue(here.startswith(
            "reset here (CONNECTION_RESET: the client connection was lost: "), here)
        self.assertTrue(far.startswith(
            "reset by the far end (CONNECTION_RESET: the client connection was lost: "), far)
        self.assertNotIn("before the stream existed", here)
        self.assertEqual(server.stats["streams_ended", "reset_local", "CONNECTION_RESET"], 1)

    async def test_clean_close_mid_transfer_is_fin(self) -> None:
        """A client that closes cleanly after writing has its data delivered and a FIN sent:
        both proxies log a clean close and the client gets every byte back."""
        log = StreamEndLog(self)
        _tunnel, server, client_proxy, port = await self.tunnel()
        app = await connect(port)
        payload = b"c" * (1024 * 1024)
        app.transport.write(payload)
        app.transport.loseWriteConnection()
        self.assertEqual(await app.ended, "clean")
        self.assertEqual(bytes(app.received), payload)
        await wait_until(lambda: bool(log.how(server) and log.how(client_proxy)), 10,
                         "both proxies to log the end of the stream")
        self.assertEqual(log.how(server), ["closed (FIN both ways)"])
        self.assertEqual(log.how(client_proxy), ["closed (FIN both ways)"])
