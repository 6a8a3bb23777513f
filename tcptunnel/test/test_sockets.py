"""Connections that send what an event wrote at the end of that event, on real sockets; the
canary over the Twisted internals they rely on; the switch back to Twisted's own transports."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any, cast

from twisted.internet import abstract, base, defer, reactor, tcp
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorPluggableNameResolver
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tcptunnel.sockets import (
    MAX_LISTEN_BACKLOG,
    TWISTED_INTERNALS,
    _Mode,
    _pending,
    _SendAtEventEnd,
    check_twisted_internals,
    connect_tcp,
    dialing_reactor,
    listen_backlog,
    listen_tcp,
    use_twisted_transports,
    using_own_transports,
)
from tcptunnel.test._harness import (
    EchoProtocol,
    Tunnel,
    binding_port,
    connect,
    listen,
    tcp_connections,
    wait_until,
)


@implementer(IHalfCloseableProtocol)
class Scripted(Protocol):
    """Runs ``on_data`` (if set) for each read and records what it received and how it
    ended.  ``after_event`` records, from a call the reactor makes once the current event
    is over, whether the transport still waits for the reactor to send."""

    def __init__(self) -> None:
        self.received = b""
        self.on_data: Any = None
        self.on_connect: Any = None
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.checks: list[tuple[bool, int]] = []

    def after_event(self) -> None:
        """Record (waiting to write, bytes buffered) once the reactor is past this event."""
        transport: Any = self.transport

        def check() -> None:
            buffered = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            self.checks.append((transport in reactor.getWriters(), buffered))

        reactor.callLater(0, check)

    def connectionMade(self) -> None:  # noqa: N802
        if self.on_connect is not None:
            self.on_connect(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        if self.on_data is not None:
            self.on_data(self, data)

    def readConnectionLost(self) -> None:  # noqa: N802
        """The peer half-closed; keep the connection (the half-close tests write on)."""

    def writeConnectionLost(self) -> None:  # noqa: N802
        """Half-closed our side; nothing to do."""

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.reason = reason
        self.lost.callback(None)


class Peer:
    """A stdlib socket on the other end, read only when the test says so (non-blocking,
    polled, so the reactor keeps running)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setblocking(False)
        self.data = b""
        self.eof = False

    def _pull(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return False
        self.data += chunk
        self.eof = not chunk
        return True

    async def read(self, size: int | None = None) -> bytes:
        """``size`` bytes, or everything until EOF when ``size`` is None."""
        def enough() -> bool:
            while not self.eof and self._pull():
                pass
            return self.eof if size is None else len(self.data) >= size

        await wait_until(enough, 10, "the peer's bytes")
        taken = len(self.data) if size is None else size
        data, self.data = self.data[:taken], self.data[taken:]
        return data


class SendAtEventEndTests(TestCase):
    """What a handler writes leaves at the end of its event; everything else is Twisted's."""

    async def serve(self, listen: Any = listen_tcp) -> tuple[Scripted, Peer]:
        """A server protocol (listening with ``listen``) and a connected stdlib peer."""
        accepted: list[Scripted] = []

        def build() -> Scripted:
            accepted.append(Scripted())
            return accepted[-1]

        port = listen(reactor, 0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = Peer(port.getHost().port)
        self.addCleanup(peer.sock.close)
        await wait_until(lambda: bool(accepted), 5, "the accept")
        server = accepted[0]
        transport: Any = server.transport
        self.addCleanup(transport.abortConnection)
        return server, peer

    @staticmethod
    def reply(text: bytes) -> Any:
        def on_data(protocol: Scripted, data: bytes) -> None:
            protocol.transport.write(text)  # type: ignore[union-attr]
            protocol.after_event()
        return on_data

    def tearDown(self) -> None:
        self.assertEqual((_pending.depth, _pending.connections), (0, []))

    async def state_after_reply(self, listen: Any) -> tuple[bool, int]:
        """(waiting to write, bytes buffered) of a server connection (listening with
        ``listen``) once the read event in which it wrote a 4-byte reply is over."""
        server, peer = await self.serve(listen)
        server.on_data = self.reply(b"pong")
        peer.sock.sendall(b"ping")
        self.assertEqual(await peer.read(4), b"pong")
        await wait_until(lambda: bool(server.checks), 5, "the check after the event")
        return server.checks[0]

    async def test_reply_sent_within_the_read_event(self) -> None:
        """A reply written while handling a read is on the wire when the event ends; with
        Twisted's own transport it is still buffered at that point (so this check would
        catch the difference)."""
        self.assertEqual(await self.state_after_reply(listen_tcp), (False, 0))
        self.assertEqual(await self.state_after_reply(
            lambda r, *args, **kwargs: r.listenTCP(*args, **kwargs)), (True, 4))

    async def serve_many(self, count: int) -> list[tuple[Scripted, Peer]]:
        """``count`` accepted connections, each with its stdlib peer."""
        return [await self.serve() for _ in range(count)]

    async def test_one_event_writing_to_many_connections(self) -> None:
        """A read on one connection that writes to twenty others (a link fanning out to its
        streams): every peer has its bytes when the event ends, none waits for the reactor."""
        pairs = await self.serve_many(21)
        (source, source_peer), targets = pairs[0], pairs[1:]

        def fan_out(protocol: Scripted, data: bytes) -> None:
            for target, _ in targets:
                target.transport.write(data)  # type: ignore[union-attr]
                target.after_event()

        source.on_data = fan_out
        source_peer.sock.sendall(b"all")
        for _, peer in targets:
            self.assertEqual(await peer.read(3), b"all")
        await wait_until(lambda: all(target.checks for target, _ in targets), 5,
                         "the checks after the event")
        self.assertEqual({(False, 0)}, {check for target, _ in targets for check in target.checks})

    async def test_a_failing_send_leaves_the_others_and_the_reactor_working(self) -> None:
        """If sending for one connection raises, it is logged and that connection goes back
        to the reactor (which sends its bytes later); the other connection written in the
        same event is still sent at once."""
        (source, source_peer), (broken, broken_peer), (fine, fine_peer) = \
            await self.serve_many(3)
        broken_transport: Any = broken.transport

        def fail_once() -> None:
            del broken_transport.doWrite  # the reactor's later call is Twisted's own
            raise RuntimeError("injected")

        def write_both(protocol: Scripted, data: bytes) -> None:
            broken_transport.doWrite = fail_once
            broken_transport.write(b"late")
            fine.transport.write(b"now")  # type: ignore[union-attr]
            fine.after_event()

        source.on_data = write_both
        source_peer.sock.sendall(b"x")
        self.assertEqual(await fine_peer.read(3), b"now")
        await wait_until(lambda: bool(fine.checks), 5, "the check after the event")
        self.assertEqual(fine.checks, [(False, 0)])
        self.assertEqual(await broken_peer.read(4), b"late")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_connection_lost_in_the_same_event_is_skipped(self) -> None:
        """A connection written to and then torn down within the same event is left alone at
        the event's end (no send, no error, nothing registered with the reactor)."""
        (source, source_peer), (doomed, _doomed_peer) = await self.serve_many(2)
        doomed_transport: Any = doomed.transport

        def write_then_lose(protocol: Scripted, data: bytes) -> None:
            doomed_transport.write(b"never")
            doomed_transport.connectionLost(Failure(ConnectionDone()))
            protocol.transport.write(b"ok")  # type: ignore[union-attr]

        source.on_data = write_then_lose
        source_peer.sock.sendall(b"x")
        self.assertEqual(await source_peer.read(2), b"ok")
        self.assertNotIn(doomed_transport, reactor.getWriters())
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_write_outside_an_event_goes_through_the_reactor(self) -> None:
        """A write from a timer waits for the reactor as in Twisted, and arrives."""
        server, peer = await self.serve()
        transport: Any = server.transport
        states: list[bool] = []

        def later() -> None:
            transport.write(b"tick")
            states.append(transport in reactor.getWriters())

        reactor.callLater(0, later)
        self.assertEqual(await peer.read(4), b"tick")
        self.assertEqual(states, [True])

    async def test_what_the_socket_cannot_take_is_sent_later(self) -> None:
        """8 MiB written in one event: the socket takes part, the rest waits for the reactor
        and arrives complete and in order once the peer reads."""
        payload = bytes(range(256)) * (8 * 4096)
        server, peer = await self.serve()
        server.on_data = self.reply(payload)
        peer.sock.sendall(b"go")
        await wait_until(lambda: bool(server.checks), 5, "the check after the event")
        waiting, buffered = server.checks[0]
        self.assertTrue(waiting)
        self.assertTrue(0 < buffered < len(payload))
        self.assertEqual(await peer.read(len(payload)), payload)

    async def test_close_after_writing_in_the_event(self) -> None:
        """write then loseConnection in one handler: the peer gets the bytes, then EOF."""
        server, peer = await self.serve()

        def on_data(protocol: Scripted, data: bytes) -> None:
            protocol.transport.write(b"bye")  # type: ignore[union-attr]
            protocol.transport.loseConnection()  # type: ignore[union-attr]

        server.on_data = on_data
        peer.sock.sendall(b"x")
        self.assertEqual(await peer.read(), b"bye")
        await server.lost
        assert server.reason is not None
        server.reason.trap(ConnectionDone)

    async def test_half_close_after_writing_in_the_event(self) -> None:
        """write then loseWriteConnection: the peer gets the bytes and EOF, and can still
        send."""
        server, peer = await self.serve()

        def on_data(protocol: Scripted, data: bytes) -> None:
            if data == b"x":
                protocol.transport.write(b"half")  # type: ignore[union-attr]
                protocol.transport.loseWriteConnection()  # type: ignore[union-attr]

        server.on_data = on_data
        peer.sock.sendall(b"x")
        self.assertEqual(await peer.read(), b"half")
        peer.sock.sendall(b"more")
        await wait_until(lambda: server.received == b"xmore", 5, "the peer's later bytes")
        self.assertFalse(server.lost.called)

    async def test_write_error_at_the_end_of_the_event(self) -> None:
        """A send that fails at the end of the event loses the connection the usual way,
        with ConnectionLost and no error escaping."""
        server, peer = await self.serve()

        def on_data(protocol: Scripted, data: bytes) -> None:
            transport: Any = protocol.transport
            transport.socket.shutdown(socket.SHUT_WR)  # the next send fails with EPIPE
            transport.write(b"into the void")

        server.on_data = on_data
        peer.sock.sendall(b"x")
        await server.lost
        assert server.reason is not None
        server.reason.trap(ConnectionLost)

    async def test_connection_made_writes_leave_with_the_accept_and_the_connect(self) -> None:
        """What connectionMade writes, on an accepted and on an outgoing connection, is sent
        in the accept and connect events."""
        servers: list[Scripted] = []

        def greet(protocol: Scripted) -> None:
            protocol.transport.write(b"hello")  # type: ignore[union-attr]
            protocol.after_event()

        def build() -> Scripted:
            servers.append(Scripted())
            servers[-1].on_connect = greet
            return servers[-1]

        port = listen_tcp(reactor, 0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = Scripted()
        client.on_connect = greet
        factory = ClientFactory.forProtocol(lambda: client)
        connector = connect_tcp(reactor, "127.0.0.1", port.getHost().port, factory)
        self.addCleanup(connector.disconnect)
        await wait_until(lambda: client.received == b"hello" and bool(servers)
                         and servers[0].received == b"hello", 5, "both greetings")
        server_transport: Any = servers[0].transport
        self.addCleanup(server_transport.abortConnection)
        await wait_until(lambda: bool(client.checks and servers[0].checks), 5, "the checks")
        self.assertEqual((client.checks[0], servers[0].checks[0]), ((False, 0), (False, 0)))


class DialingReactorTests(TestCase):
    """Code that connects through a reactor (HostnameEndpoint) gets these connections too."""

    async def test_hostname_endpoint_connection_sends_at_event_end(self) -> None:
        """HostnameEndpoint over dialing_reactor resolves "localhost", connects with a
        connection of ours, and what connectionMade wrote is sent in the connect event."""
        server = Scripted()
        port = listen_tcp(reactor, 0, Factory.forProtocol(lambda: server),
                          interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = Scripted()

        def greet(protocol: Scripted) -> None:
            protocol.transport.write(b"hi")  # type: ignore[union-attr]
            protocol.after_event()

        client.on_connect = greet
        view = dialing_reactor(reactor)
        self.assertTrue(IReactorPluggableNameResolver.providedBy(view))
        endpoint = HostnameEndpoint(view, "localhost", port.getHost().port)
        await endpoint.connect(Factory.forProtocol(lambda: client))
        transport: Any = client.transport
        self.addCleanup(transport.abortConnection)
        self.assertIsInstance(transport, _SendAtEventEnd)
        await wait_until(lambda: server.received == b"hi" and bool(client.checks), 5,
                         "the greeting")
        self.assertEqual(client.checks, [(False, 0)])
        server_transport: Any = server.transport
        self.addCleanup(server_transport.abortConnection)


class FallbackTests(SynchronousTestCase):
    """Reactors other than Twisted's socket reactors get the plain calls."""

    def test_memory_reactor_gets_listen_and_connect(self) -> None:
        """listen_tcp / connect_tcp on a MemoryReactor record ordinary listenTCP /
        connectTCP calls with the same arguments."""
        memory = MemoryReactor()
        factory = ClientFactory()
        listen_tcp(memory, 1234, factory, backlog=7, interface="127.0.0.1")
        connect_tcp(memory, "127.0.0.1", 5678, factory, timeout=3.0)
        self.assertEqual(memory.tcpServers, [(1234, factory, 7, "127.0.0.1")])
        self.assertEqual(memory.tcpClients, [("127.0.0.1", 5678, factory, 3.0, None)])


# Every Twisted internal sockets.py relies on, by name: a check dropped from
# TWISTED_INTERNALS (or one added without a test here) fails test_every_internal_is_named.
RELIED_ON = [
    "twisted.internet.posixbase.PosixReactorBase",
    "twisted.internet.tcp.Port.__init__",
    "twisted.internet.tcp.Port.transport",
    "twisted.internet.tcp.Port.doRead",
    "twisted.internet.tcp.Connector.__init__",
    "twisted.internet.tcp.Connector._makeTransport",
    "twisted.internet.tcp.Client.__init__",
    "twisted.internet.tcp.BaseClient.doConnect",
    "twisted.internet.tcp.Connection.doRead",
    "twisted.internet.abstract.FileDescriptor.doWrite",
    "twisted.internet.abstract.FileDescriptor.startWriting",
    "twisted.internet.abstract.FileDescriptor.dataBuffer/_tempDataBuffer/connected/"
    "disconnecting",
]


_DO_CONNECT = tcp.BaseClient.doConnect


def _replace(test: SynchronousTestCase, owner: Any, name: str, value: Any = None) -> None:
    """Replace (or, with value None, delete) ``owner.name`` for the rest of the test."""
    missing = object()
    original = owner.__dict__.get(name, missing)

    def restore() -> None:
        if original is missing:
            if name in owner.__dict__:
                delattr(owner, name)
        else:
            setattr(owner, name, original)

    test.addCleanup(restore)
    if value is None:
        delattr(owner, name)
    else:
        setattr(owner, name, value)


class TwistedInternalsTests(SynchronousTestCase):
    """The canary: each Twisted internal sockets.py relies on is still there and still
    behaves as relied on (here without sockets; SendAtEventEndTests and DialingReactorTests
    check the same behaviour on real loopback).  When this fails after a Twisted upgrade, the
    message names what changed; sockets.py then falls back to Twisted's transports on its
    own, and setup.cfg's upper bound on Twisted should stay until sockets.py is adapted."""

    def test_every_internal_is_named(self) -> None:
        """The list of checks is exactly the list of internals named here."""
        self.assertEqual([name for name, _why, _check in TWISTED_INTERNALS], RELIED_ON)

    def test_each_internal_holds(self) -> None:
        """Each check passes on the installed Twisted; a failure names the internal."""
        for name, why, check in TWISTED_INTERNALS:
            self.assertIsNone(check(), f"Twisted changed {name} ({why}), which "
                                       "tcptunnel/sockets.py relies on")
        self.assertEqual(check_twisted_internals(), [])

    def test_a_missing_method_is_named(self) -> None:
        """Deleting BaseClient.doConnect, or a connect() that no longer builds its transport
        with _makeTransport, is reported by name."""
        _replace(self, tcp.BaseClient, "doConnect")
        self.assertEqual(check_twisted_internals(),
                         ["twisted.internet.tcp.BaseClient.doConnect is missing"])
        _replace(self, tcp.BaseClient, "doConnect", _DO_CONNECT)

        def connect(self: Any) -> None:
            """A connect that builds its transport some other way."""

        _replace(self, base.BaseConnector, "connect", connect)
        self.assertEqual(check_twisted_internals(), [
            "twisted.internet.tcp.Connector._makeTransport (via "
            "TwistedInternalsTests.test_a_missing_method_is_named.<locals>.connect) is no "
            "longer called"])

    def test_a_changed_signature_is_named(self) -> None:
        """A doConnect that takes an argument, and a Client built from other arguments, are
        each reported with the parameters found."""
        _replace(self, tcp.BaseClient, "doConnect", lambda self, now: None)
        original_init = tcp.Client.__init__
        _replace(self, tcp.Client, "__init__",
                 lambda self, host, port, connector, reactor: original_init(
                     self, host, port, None, connector, reactor))
        self.assertEqual(check_twisted_internals(), [
            "twisted.internet.tcp.Client.__init__ takes (self, host, port, connector, "
            "reactor), expected (self, host, port, bindAddress, connector, reactor)",
            "twisted.internet.tcp.BaseClient.doConnect takes (self, now), expected (self)"])

    def test_another_accepted_connection_class_is_named(self) -> None:
        """A Port whose accepted connections are not tcp.Server (or are not built from
        self.transport) is reported."""
        _replace(self, tcp.Port, "transport", object)
        self.assertEqual(check_twisted_internals(), [
            "twisted.internet.tcp.Port.transport is no longer the class of accepted "
            "connections"])
        _replace(self, tcp.Port, "transport", tcp.Server)

        def do_read(self: Any) -> None:
            """An accept loop that builds connections some other way."""

        _replace(self, tcp.Port, "doRead", do_read)
        self.assertEqual(check_twisted_internals(), [
            "twisted.internet.tcp.Port.doRead (via TwistedInternalsTests."
            "test_another_accepted_connection_class_is_named.<locals>.do_read) is no longer "
            "called"])

    def test_a_changed_write_path_is_named(self) -> None:
        """A write() that no longer calls startWriting, and a doWrite() that reports
        success differently, are each reported."""
        original_write = abstract.FileDescriptor.write

        def silent_write(self: Any, data: bytes) -> None:
            self._tempDataBuffer.append(data)
            self._tempDataLen += len(data)

        _replace(self, abstract.FileDescriptor, "write", silent_write)
        self.assertEqual(check_twisted_internals(), [
            "twisted.internet.abstract.FileDescriptor.dataBuffer/_tempDataBuffer/connected/"
            "disconnecting write() no longer buffers the bytes and calls startWriting()"])
        _replace(self, abstract.FileDescriptor, "write", original_write)
        original_do_write = abstract.FileDescriptor.doWrite
        _replace(self, abstract.FileDescriptor, "doWrite",
                 lambda self: original_do_write(self) or 0)
        self.assertEqual(len(check_twisted_internals()), 1)
        self.assertIn("doWrite() no longer returns None", check_twisted_internals()[0])


class _LogCapture:
    """Log events of tcptunnel.sockets during a test."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self) -> list[tuple[LogLevel, str]]:
        """(level, text) of each event logged by sockets.py."""
        return [(event["log_level"], formatEvent(event)) for event in self.events
                if event.get("log_namespace", "").startswith("tcptunnel.sockets")]


class TransportSwitchTests(TestCase):
    """Twisted's own transports: by switch, by environment, and as the automatic fallback."""

    timeout = 60

    def setUp(self) -> None:
        saved = _Mode.own
        self.addCleanup(setattr, _Mode, "own", saved)
        _Mode.own = None  # decide again, in this test

    async def accepted_transport(self) -> Any:
        """The transport of a connection accepted by listen_tcp (the peer is a stdlib
        socket, so no Twisted connector is involved)."""
        accepted: list[Scripted] = []

        def build() -> Scripted:
            accepted.append(Scripted())
            return accepted[-1]

        port = listen_tcp(reactor, 0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = Peer(port.getHost().port)
        self.addCleanup(peer.sock.close)
        await wait_until(lambda: bool(accepted), 5, "the accept")
        transport: Any = accepted[0].transport
        self.addCleanup(transport.abortConnection)
        return transport

    async def test_our_transports_by_default(self) -> None:
        """Without the switch, the checks pass and accepted connections are ours."""
        self.assertIsInstance(await self.accepted_transport(), _SendAtEventEnd)
        self.assertTrue(using_own_transports())

    async def test_environment_variable(self) -> None:
        """TCPTUNNEL_TWISTED_TRANSPORTS=1: Twisted's own tcp.Server, one info line."""
        log = _LogCapture(self)
        self.patch(os, "environ", {**os.environ, "TCPTUNNEL_TWISTED_TRANSPORTS": "1"})
        self.assertIs(type(await self.accepted_transport()), tcp.Server)
        self.assertEqual(log.lines(), [(LogLevel.info, "TCPTUNNEL_TWISTED_TRANSPORTS=1: using "
                                                       "Twisted's own TCP transports")])

    async def test_fallback_when_an_internal_is_missing(self) -> None:
        """With BaseClient.doConnect gone, the first listen falls back to Twisted's own
        transports and logs one warning naming it; later listens say nothing more.  (No
        Twisted client connects meanwhile: the peers are stdlib sockets.)"""
        log = _LogCapture(self)
        _replace(self, tcp.BaseClient, "doConnect")
        self.assertIs(type(await self.accepted_transport()), tcp.Server)
        self.assertIs(type(await self.accepted_transport()), tcp.Server)
        self.assertIs(dialing_reactor(reactor), reactor)
        lines = log.lines()
        self.assertEqual(len(lines), 1, lines)
        level, text = lines[0]
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("twisted.internet.tcp.BaseClient.doConnect is missing", text)
        self.assertIn("using Twisted's own TCP transports instead", text)

    async def test_tunnel_over_twisted_transports(self) -> None:
        """use_twisted_transports(): Gateway, Proxy-Client and Proxy-Server tunnel end to end
        on real loopback, every link and local connection on Twisted's own classes."""
        use_twisted_transports()
        self.assertFalse(using_own_transports())
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self)
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        client = await connect(binding_port(ps))
        data = b"over Twisted's own transports" * 1000
        client.transport.write(data)
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")
        self.assertEqual(bytes(client.received), data)
        for proxy in (pc, ps):
            self.assertIs(type(proxy.link.transport), tcp.Client)  # type: ignore[union-attr]
        self.assertEqual([c for c in tcp_connections() if isinstance(c, _SendAtEventEnd)], [])
        use_twisted_transports(False)
        self.assertTrue(using_own_transports())


class ListenBacklogTests(SynchronousTestCase):
    """The accept queue of listening sockets: net.core.somaxconn, at most 4,096."""

    def somaxconn(self, text: str | None) -> int:
        path = self.mktemp()
        if text is not None:
            with open(path, "w") as f:
                f.write(text)
        return listen_backlog(path)

    def test_follows_somaxconn_up_to_4096(self) -> None:
        """The backlog is somaxconn when it is between 50 and 4,096, else the nearer bound;
        4,096 when somaxconn cannot be read."""
        self.assertEqual(self.somaxconn("128\n"), 128)
        self.assertEqual(self.somaxconn("4096\n"), 4096)
        self.assertEqual(self.somaxconn("65535\n"), MAX_LISTEN_BACKLOG)
        self.assertEqual(self.somaxconn("10\n"), 50)
        self.assertEqual(self.somaxconn(None), 4096)
        self.assertEqual(self.somaxconn("garbage"), 4096)

    def test_listen_tcp_asks_for_it(self) -> None:
        """listen_tcp without a backlog asks the reactor for listen_backlog()'s."""
        memory = MemoryReactor()
        listen_tcp(memory, 1234, ClientFactory(), interface="127.0.0.1")
        self.assertEqual(memory.tcpServers[0][2], listen_backlog())
        self.assertGreater(listen_backlog(), 50)  # this machine's somaxconn: 4,096

    def test_gateway_listener_socket_has_it(self) -> None:
        """A listener made as Gateway Listeners and Bindings are (ports.listen) has that
        accept queue in the kernel (ss shows a listening socket's backlog as Send-Q)."""
        from tcptunnel.config import Location
        from tcptunnel.ports import listen as listen_port

        port = listen_port(reactor, "127.0.0.1", 0, Factory.forProtocol(Protocol), "test",
                           Location("t.xml", 1))
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        output = subprocess.run(["ss", "-ltnH", f"sport = :{number}"], capture_output=True,
                                text=True, check=True).stdout.split()
        self.assertEqual(int(output[2]), listen_backlog(), output)
