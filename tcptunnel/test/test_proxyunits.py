"""Unit layer of the proxy side: ProxyLink, ProxyClientService / TargetConnection and
BindingConnection over StringTransport, MemoryReactorClock and Clock; no real sockets.

A :class:`FakeGateway` answers the link's login with the real SCRAM server code
(:class:`tcptunnel.auth.GatewayAuth`) and frames everything else by hand, so each test says
exactly what the Gateway sent and reads exactly what the proxy sent back.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet import error as neterror
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tcptunnel import _frames as fr
from tcptunnel._frames import FrameType, GoAway, Reason
from tcptunnel._link import LinkState
from tcptunnel.auth import GatewayAuth, make_auth_info, scram_username
from tcptunnel.config import ProxyConfig, parse_settings
from tcptunnel.proxy import ProxyLink, ProxyService
from tcptunnel.proxyclient import (
    MAX_DIALS_IN_PROGRESS,
    ProxyClientService,
    TargetConnection,
    reason_for_dial_failure,
)
from tcptunnel.proxyserver import BindingConnection, ProxyServerService
from tcptunnel.test._harness import NS

TARGET = ("127.0.0.1", 7000)


def proxy_config(role: str, inner: str = "", extra: str = "") -> ProxyConfig:
    """A proxy config for session 1 (password pc / ps) talking to a Gateway at 192.0.2.9."""
    password = "pc" if role == "proxy-client" else "ps"
    if role == "proxy-client":
        body = f'<Session id="1" password="{password}"/>{inner}'
    else:
        body = (f'<Session id="1" password="{password}">'
                f'<Binding listenIp="127.0.0.1" listenPort="0" targetHost="{TARGET[0]}" '
                f'targetPort="{TARGET[1]}"/></Session>')
    settings = parse_settings(
        f'<Settings {NS}><Instance type="{role}" host="192.0.2.9" port="4433" {extra}>'
        f'{body}</Instance></Settings>'.encode())
    config = settings.instances[0]
    assert isinstance(config, ProxyConfig)
    return config


class HalfCloseTransport(StringTransport):
    """A StringTransport that records a half-close (loseWriteConnection)."""

    write_closed = False

    def loseWriteConnection(self) -> None:  # noqa: N802
        """Shut our sending direction."""
        self.write_closed = True


@implementer(ILogObserver)
class Logs:
    """The formatted log lines of one test."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        """Keep the event."""
        self.events.append(event)

    def text(self) -> str:
        """Every event's text, one a line."""
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) or "" for e in self.events)

    def stream_ends(self) -> list[str]:
        """``how`` of each stream_ended event."""
        return [e["how"] for e in self.events if e.get("event") == "stream_ended"]


class FakeGateway:
    """The Gateway end of one proxy link, driven by hand."""

    def __init__(self, service: ProxyService, password: str) -> None:
        self.service = service
        self.link = service.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 4433))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 4433))
        role = fr.ROLE_PROXY_SERVER if service.config.role == "proxy-server" else \
            fr.ROLE_PROXY_CLIENT
        self.auth = GatewayAuth(make_auth_info(password, iterations=4096),
                                scram_username(1, role), b"k" * 32)
        self._decoder = fr.FrameDecoder(expect_magic=True)
        self.received: list[fr.Frame] = []
        self.link.makeConnection(self.transport)

    def read(self) -> list[fr.Frame]:
        """Frames the proxy sent since the last read."""
        frames = self._decoder.feed(self.transport.value())
        self.transport.clear()
        self.received.extend(frames)
        return frames

    def send(self, data: bytes) -> None:
        """Bytes from the Gateway to the proxy."""
        self.link.dataReceived(data)

    def challenge(self) -> None:
        """HELLO and the SCRAM challenge for the proxy's AUTH_START."""
        (start,) = self.of_type(FrameType.AUTH_START)
        _role, _session, client_first = fr.parse_auth_start(start.payload)
        self.send(fr.build_hello() + fr.build_auth_message(
            FrameType.AUTH_CHALLENGE, self.auth.challenge(client_first)))

    def proof(self) -> str:
        """The proxy's AUTH_PROOF, checked: the server-final to send back."""
        (proof,) = self.of_type(FrameType.AUTH_PROOF)
        return self.auth.finish(proof.payload.decode())

    def login(self, partners: int = 1) -> ProxyLink:
        """A complete, successful login, then PARTNER."""
        self.challenge()
        self.send(fr.build_auth_result(True, self.proof()) + fr.build_partner(partners))
        self.read()
        return self.link

    def sent_types(self) -> list[int]:
        """Types of every frame the proxy sent so far."""
        self.read()
        return [f.type for f in self.received]

    def goaway(self) -> tuple[GoAway, str] | None:
        """The GOAWAY the proxy sent, if any."""
        self.read()
        for frame in self.received:
            if frame.type == FrameType.GOAWAY:
                return fr.parse_goaway(frame.payload)
        return None

    def expect_goaway(self) -> tuple[GoAway, str]:
        """The GOAWAY the proxy must have sent."""
        goaway = self.goaway()
        assert goaway is not None, "no GOAWAY sent"
        return goaway

    def of_type(self, frame_type: int) -> list[fr.Frame]:
        """Frames of one type the proxy sent so far."""
        self.read()
        return [f for f in self.received if f.type == frame_type]


class ProxyLinkTests(SynchronousTestCase):
    """Login, GOAWAY and keepalive of the link a proxy keeps to the Gateway."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.service = ProxyClientService(
            proxy_config("proxy-client", extra='keepaliveInterval="15" keepaliveTimeout="30" '
                         'maxRetryDelay="20"'), self.reactor)
        self.logs = Logs(self)

    def test_login_success(self) -> None:
        """HELLO + AUTH_START go out at once; a good challenge, proof and server-final log in:
        the link is the service's link, the backoff is reset and PARTNER is taken."""
        gateway = FakeGateway(self.service, "pc")
        self.assertEqual(gateway.sent_types()[:2], [FrameType.HELLO, FrameType.AUTH_START])
        self.service.factory.delay = 17.0
        link = gateway.login(partners=2)
        self.assertIs(link.core.state, LinkState.READY)
        self.assertIs(self.service.link, link)
        self.assertEqual(self.service.stats["logins_ok",], 1)
        self.assertEqual(self.service.factory.delay, self.service.factory.initialDelay)
        self.assertEqual(link.partners, 2)
        self.assertTrue(self.service.partner_available)
        self.assertIn("Authentication succeeded", self.logs.text())
        self.assertFalse(gateway.transport.disconnecting)

    def test_wrong_gateway_proof(self) -> None:
        """An AUTH_RESULT 1 whose server-final does not prove the password closes the link with
        AUTH_FAILED, and a PARTNER in the same read is not acted on."""
        gateway = FakeGateway(self.service, "pc")
        gateway.challenge()
        gateway.proof()
        gateway.send(fr.build_auth_result(True, "v=" + "A" * 44) + fr.build_partner(1))
        code, _message = gateway.expect_goaway()
        self.assertEqual(code, GoAway.AUTH_FAILED)
        self.assertTrue(gateway.transport.disconnecting)
        self.assertIsNone(self.service.link)
        self.assertEqual(gateway.link.partners, 0)
        self.assertEqual(self.service.stats["logins_failed",], 1)
        self.assertEqual(self.service.factory.delay, self.service.factory.long_delay)
        self.assertNotIn("Partner available", self.logs.text())

    def test_auth_result_zero(self) -> None:
        """AUTH_RESULT 0 closes the link with AUTH_FAILED: the longest retry delay and one
        error line naming the password."""
        gateway = FakeGateway(self.service, "pc")
        gateway.challenge()
        gateway.send(fr.build_auth_result(False))
        self.assertEqual(gateway.goaway(), (GoAway.AUTH_FAILED, "the Gateway rejected the login"))
        self.assertTrue(gateway.transport.disconnecting)
        gateway.send(fr.build_goaway(GoAway.AUTH_FAILED, "wrong password"))  # ignored: closing
        self.assertEqual(self.service.stats["logins_failed",], 1)
        self.assertEqual(self.service.factory.delay, self.service.factory.long_delay)
        self.assertEqual(self.logs.text().count("Authentication failed for session 1"), 1)

    def test_auth_result_zero_and_goaway_in_one_read(self) -> None:
        """AUTH_RESULT 0 and the Gateway's GOAWAY AUTH_FAILED in one read are one rejection."""
        gateway = FakeGateway(self.service, "pc")
        gateway.challenge()
        gateway.send(fr.build_auth_result(False)
                     + fr.build_goaway(GoAway.AUTH_FAILED, "wrong password"))
        self.assertEqual(self.service.stats["logins_failed",], 1)
        self.assertEqual(self.logs.text().count("Authentication failed for session 1"), 1)
        self.assertTrue(gateway.transport.disconnecting)

    def test_login_deadline(self) -> None:
        """A Gateway that never answers the login is left with LOGIN_TIMEOUT after the
        keepalive timeout."""
        gateway = FakeGateway(self.service, "pc")
        self.reactor.advance(29.9)
        self.assertIsNone(gateway.goaway())
        self.reactor.advance(0.2)
        self.assertEqual(gateway.goaway(),
                         (GoAway.LOGIN_TIMEOUT, "the Gateway did not complete the login in time"))
        self.assertTrue(gateway.transport.disconnecting)

    def test_goaway_busy_retries_soon(self) -> None:
        """GOAWAY BUSY (too many links logging in at the Gateway: a reconnect storm) counts a
        limit and keeps the short backoff, unlike LIMIT (a storm through one NAT once took
        38 s when the slot limit read as LIMIT)."""
        gateway = FakeGateway(self.service, "pc")
        gateway.send(fr.build_hello() + fr.build_goaway(GoAway.BUSY,
                                                        "too many unauthenticated links"))
        self.assertEqual(self.service.stats["limits_hit",], 1)
        self.assertEqual(self.service.stats["logins_failed",], 0)
        self.assertLessEqual(self.service.factory.maxDelay,
                             self.service.factory.REFUSED_MAX_DELAY)

    def test_goaway_limit_is_not_a_login_failure(self) -> None:
        """GOAWAY LIMIT counts a limit, not a failed login, and waits the longest delay (the
        same limit would refuse a quick retry)."""
        gateway = FakeGateway(self.service, "pc")
        gateway.login()
        gateway.send(fr.build_goaway(GoAway.LIMIT, "too many links"))
        self.assertEqual(self.service.stats["limits_hit",], 1)
        self.assertEqual(self.service.stats["logins_failed",], 0)
        self.assertEqual(self.service.factory.delay, self.service.factory.long_delay)
        (line,) = [e for e in self.logs.events if e.get("code") == "LIMIT"]
        self.assertTrue(line["log_format"].startswith("[{index}] The Gateway closes the link"))
        self.assertTrue(gateway.transport.disconnecting)
        self.assertIn("LIMIT", gateway.link.close_reason)

    def test_goaway_replaced_waits_longest(self) -> None:
        """GOAWAY REPLACED (another Proxy-Client took the session) waits the longest delay."""
        gateway = FakeGateway(self.service, "pc")
        gateway.login()
        gateway.send(fr.build_goaway(GoAway.REPLACED, "replaced"))
        self.assertEqual(self.service.factory.delay, self.service.factory.long_delay)
        self.assertEqual(self.service.stats["logins_failed",], 0)

    def test_goaway_auth_failed_is_a_rejection(self) -> None:
        """GOAWAY AUTH_FAILED during login is a rejection of the password."""
        gateway = FakeGateway(self.service, "pc")
        gateway.send(fr.build_hello() + fr.build_goaway(GoAway.AUTH_FAILED, "no"))
        self.assertEqual(self.service.stats["logins_failed",], 1)

    def test_keepalive_timeout(self) -> None:
        """A silent Gateway is pinged after the interval and left with KEEPALIVE_TIMEOUT after
        interval + timeout; any frame from it restarts the count."""
        gateway = FakeGateway(self.service, "pc")
        gateway.login()
        self.reactor.advance(14)
        self.assertEqual(gateway.of_type(FrameType.PING), [])
        self.reactor.advance(1.5)
        (ping,) = gateway.of_type(FrameType.PING)
        self.reactor.advance(10)
        gateway.send(fr.build_ping(ping.payload, pong=True))  # the PONG: alive again
        self.assertIsNotNone(gateway.link.rtt)
        self.reactor.advance(40)
        self.assertIsNone(gateway.goaway())
        self.reactor.advance(10)
        code, message = gateway.expect_goaway()
        self.assertEqual(code, GoAway.KEEPALIVE_TIMEOUT)
        self.assertIn("keepalive timeout", message)
        self.assertTrue(gateway.transport.disconnecting)

    def test_link_lost_forgets_link(self) -> None:
        """Losing a logged-in link makes the service forget it (no partner any more)."""
        gateway = FakeGateway(self.service, "pc")
        link = gateway.login()
        link.connectionLost(Failure(neterror.ConnectionLost()))
        self.assertIsNone(self.service.link)
        self.assertFalse(self.service.partner_available)
        self.assertEqual(self.service.stats["links_lost",], 1)


class ProxyClientUnitTests(SynchronousTestCase):
    """Stream requests at a Proxy-Client: allow-list, dial, accept."""

    allowed = f'<AllowedTargetEndpoints><Endpoint host="{TARGET[0]}" port="{TARGET[1]}"/>' \
              '<Endpoint host="target.example" port="22"/></AllowedTargetEndpoints>'

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.service = ProxyClientService(
            proxy_config("proxy-client", self.allowed, 'connectTimeout="7"'), self.reactor)
        self.gateway = FakeGateway(self.service, "pc")
        self.link = self.gateway.login()
        self.logs = Logs(self)
        self.next_id = 1

    def open(self, host: str = TARGET[0], port: int = TARGET[1], early: bytes = b"",
             fin: bool = False) -> int:
        """The Gateway forwards OPEN (with early data and FIN); returns the stream id."""
        stream_id, self.next_id = self.next_id, self.next_id + 1
        data = fr.build_open(stream_id, fr.OpenRequest(65536, 3, host, port))
        if early:
            data += fr.encode(FrameType.DATA, stream_id, early)
        if fin:
            data += fr.build_fin(stream_id)
        self.gateway.send(data)
        return stream_id

    def result(self, stream_id: int) -> tuple[Reason, int, str] | None:
        """The OPEN_RESULT the proxy sent for a stream, if any."""
        for frame in self.gateway.of_type(FrameType.OPEN_RESULT):
            if frame.stream_id == stream_id:
                return fr.parse_open_result(frame.payload)
        return None

    def answer(self, stream_id: int) -> tuple[Reason, int, str]:
        """The OPEN_RESULT the proxy must have sent for a stream."""
        result = self.result(stream_id)
        assert result is not None, f"no OPEN_RESULT for stream {stream_id}"
        return result

    def dial(self, index: int = -1) -> tuple[Any, Any, float]:
        """(connector, factory, timeout) of a connect the proxy started."""
        _host, _port, factory, timeout, _bind = self.reactor.tcpClients[index]
        return self.reactor.connectors[index], factory, timeout

    def test_allow_list_denial(self) -> None:
        """A target not in AllowedTargetEndpoints is answered DENIED without a dial."""
        stream_id = self.open("10.0.0.1", 22)
        self.assertEqual(self.result(stream_id),
                         (Reason.DENIED, 0, "10.0.0.1:22 is not an allowed target"))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIn("denied: 10.0.0.1 (an IP literal) is not in AllowedTargetEndpoints: no "
                      "address or network rule contains it", self.logs.text())
        self.assertEqual(self.link.core.streams, {})

    def test_allow_list_names_and_ports(self) -> None:
        """Names match case-insensitively with a trailing dot; ports must match exactly."""
        self.assertTrue(self.service.is_allowed("Target.Example.", 22))
        self.assertFalse(self.service.is_allowed("target.example", 23))
        self.assertTrue(self.service.is_allowed(*TARGET))

    def test_dial_uses_connect_timeout_and_times_out(self) -> None:
        """An allowed target is dialled with the configured timeout; a timed-out connect is
        answered TIMEOUT and the stream forgotten."""
        stream_id = self.open()
        connector, factory, timeout = self.dial()
        self.assertEqual(timeout, 7)
        self.assertIsNone(self.result(stream_id))  # no answer while dialling
        self.assertEqual(self.service.dials_in_progress, 1)
        factory.clientConnectionFailed(connector, Failure(neterror.TimeoutError()))
        reason, _window, message = self.answer(stream_id)
        self.assertEqual(reason, Reason.TIMEOUT)
        self.assertIn(f"cannot connect to {TARGET[0]}:{TARGET[1]}", message)
        self.assertIn(f"Stream to {TARGET[0]}:{TARGET[1]}: {message}", self.logs.text())
        self.assertEqual(self.service.dials_in_progress, 0)
        self.assertEqual(self.link.core.streams, {})
        self.assertEqual(self.logs.stream_ends(), ["failed to open (TIMEOUT)"])

    def test_dial_failure_reasons(self) -> None:
        """Each connect error maps to its wire reason."""
        cases = [
            (neterror.ConnectionRefusedError(), Reason.REFUSED),
            (neterror.DNSLookupError(), Reason.DNS_FAILURE),
            (neterror.TimeoutError(), Reason.TIMEOUT),
            (neterror.UserError(), Reason.TIMEOUT),
            (neterror.NoRouteError(), Reason.UNREACHABLE),
            (neterror.ConnectError("Network is unreachable"), Reason.UNREACHABLE),
            (neterror.ConnectError("something else"), Reason.REFUSED),
        ]
        for exception, reason in cases:
            self.assertEqual(reason_for_dial_failure(Failure(exception)), reason, exception)
        stream_id = self.open()
        connector, factory, _timeout = self.dial()
        factory.clientConnectionFailed(connector, Failure(neterror.ConnectionRefusedError()))
        self.assertEqual(self.answer(stream_id)[0], Reason.REFUSED)

    def test_accept_on_connect_with_early_data_and_fin(self) -> None:
        """Nothing is answered until the target connects; then OPEN_RESULT OK goes out, the
        early data reaches the target, the early FIN half-closes it, and its credit returns."""
        stream_id = self.open(early=b"GET / HTTP/1.0\r\n\r\n", fin=True)
        self.assertIsNone(self.result(stream_id))
        _connector, factory, _timeout = self.dial()
        connection = factory.buildProtocol(IPv4Address("TCP", *TARGET))
        self.assertIsInstance(connection, TargetConnection)
        target = HalfCloseTransport()
        connection.makeConnection(target)
        self.assertEqual(self.answer(stream_id)[0], Reason.OK)
        self.assertEqual(target.value(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(target.write_closed)
        self.assertEqual(self.service.dials_in_progress, 0)
        assert connection.stream is not None
        self.assertTrue(connection.stream.remote_ended)
        connection.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n")
        connection.readConnectionLost()
        data = [f for f in self.gateway.of_type(FrameType.DATA) if f.stream_id == stream_id]
        self.assertEqual(b"".join(f.payload for f in data), b"HTTP/1.0 200 OK\r\n\r\n")
        self.assertEqual(self.logs.stream_ends(), ["closed (FIN both ways)"])
        self.assertTrue(target.disconnecting)

    def test_reset_while_dialling_cancels_the_dial(self) -> None:
        """A RESET from the Gateway while the target is being dialled stops the connect."""
        stream_id = self.open()
        connector, _factory, _timeout = self.dial()
        self.gateway.send(fr.build_reset(stream_id, Reason.CANCELLED, "client gone"))
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(self.service.dials_in_progress, 0)
        self.assertEqual(self.logs.stream_ends(),
                         ["reset by the far end (CANCELLED: client gone)"])
        self.assertIsNone(self.result(stream_id))

    def test_dials_past_the_limit_wait_their_turn(self) -> None:
        """Past MAX_DIALS_IN_PROGRESS connects at once, a stream waits (no answer, no dial)
        with its early data kept, and is dialled, oldest first, when a dial ends; a waiting
        stream reset by the far end is skipped."""
        for _ in range(MAX_DIALS_IN_PROGRESS):
            self.open()
        waiting = self.open(early=b"first")
        reset_while_waiting = self.open()
        last = self.open()
        self.assertEqual(self.service.dials_in_progress, MAX_DIALS_IN_PROGRESS)
        self.assertEqual(len(self.reactor.tcpClients), MAX_DIALS_IN_PROGRESS)
        self.assertEqual(len(self.service.waiting_dials), 3)
        self.assertIsNone(self.result(waiting))
        self.gateway.send(fr.build_reset(reset_while_waiting, Reason.CANCELLED, "client gone"))
        connector, factory, _timeout = self.dial(0)
        factory.clientConnectionFailed(connector, Failure(neterror.ConnectionRefusedError()))
        self.assertEqual(len(self.reactor.tcpClients), MAX_DIALS_IN_PROGRESS + 1)
        connector, factory, timeout = self.dial()
        self.assertEqual(timeout, 7)
        protocol = factory.buildProtocol(None)
        target = StringTransport()
        protocol.makeConnection(target)
        self.assertEqual(target.value(), b"first")  # the early data that waited with it
        self.assertEqual(self.answer(waiting)[0], Reason.OK)
        connector, factory, _timeout = self.dial(1)
        factory.clientConnectionFailed(connector, Failure(neterror.ConnectionRefusedError()))
        # The reset one is skipped: the next slot goes to the last.
        self.assertEqual(len(self.reactor.tcpClients), MAX_DIALS_IN_PROGRESS + 2)
        self.assertEqual(self.service.waiting_dials, collections.deque())
        self.assertIsNone(self.result(reset_while_waiting))
        self.assertIsNone(self.result(last))

    def test_waiting_dial_has_a_deadline(self) -> None:
        """A stream that waited connectTimeout for a free dial is answered TIMEOUT when its
        turn comes; one that waited less is dialled with what is left of it."""
        for _ in range(MAX_DIALS_IN_PROGRESS):
            self.open()
        late = self.open()
        self.reactor.advance(4)
        in_time = self.open()
        self.reactor.advance(3)
        connector, factory, _timeout = self.dial(0)
        factory.clientConnectionFailed(connector, Failure(neterror.ConnectionRefusedError()))
        reason, _window, message = self.answer(late)
        self.assertEqual(reason, Reason.TIMEOUT)
        self.assertIn("no free dial", message)
        self.assertEqual(len(self.reactor.tcpClients), MAX_DIALS_IN_PROGRESS + 1)
        _connector, _factory, timeout = self.dial()
        self.assertAlmostEqual(timeout, 4)
        self.assertIsNone(self.result(in_time))

    def test_waiting_dials_are_bounded(self) -> None:
        """With max_waiting_dials streams waiting, the next is answered LIMIT at once."""
        self.service.max_waiting_dials = 2
        for _ in range(MAX_DIALS_IN_PROGRESS + 2):
            self.open()
        refused = self.open()
        self.assertEqual(self.answer(refused)[0], Reason.LIMIT)
        self.assertEqual(len(self.service.waiting_dials), 2)
        self.assertIn("dials in progress and 2 waiting (limit)", self.logs.text())


class BindingConnectionTests(SynchronousTestCase):
    """An accepted local connection at a Proxy-Server becomes a stream."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.service = ProxyServerService(proxy_config("proxy-server"), self.reactor)
        self.logs = Logs(self)

    def accept(self) -> tuple[BindingConnection, StringTransport]:
        """A local client connects to the Binding."""
        connection = BindingConnection(self.service, self.service.config.bindings[0])
        local = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        connection.makeConnection(local)
        return connection, local

    def test_no_link_refuses(self) -> None:
        """Without a link to the Gateway the connection is aborted at once, and logged."""
        connection, local = self.accept()
        self.assertEqual(local.producerState, "paused")
        self.assertTrue(local.disconnecting)
        self.assertIsNone(connection.stream)
        self.assertEqual(self.logs.stream_ends(), ["refused here (no link to the Gateway)"])

    def test_no_partner_refuses(self) -> None:
        """A link without a Proxy-Client in the session refuses the connection here."""
        FakeGateway(self.service, "ps").login(partners=0)
        _connection, local = self.accept()
        self.assertTrue(local.disconnecting)
        self.assertEqual(self.logs.stream_ends(),
                         ["refused here (no Proxy-Client in the session)"])

    def test_open_and_early_data(self) -> None:
        """OPEN goes out at once with the binding's target; the first bytes follow as early
        data (16 KiB at most) before any OPEN_RESULT, the rest after it."""
        gateway = FakeGateway(self.service, "ps")
        gateway.login()
        connection, local = self.accept()
        (open_frame,) = gateway.of_type(FrameType.OPEN)
        request = fr.parse_open(open_frame.payload)
        self.assertEqual((request.host, request.port), TARGET)
        self.assertEqual(local.producerState, "producing")  # read at once: early data
        connection.dataReceived(b"e" * (fr.EARLY_WINDOW + 1000))
        early = gateway.of_type(FrameType.DATA)
        self.assertEqual(sum(len(f.payload) for f in early), fr.EARLY_WINDOW)
        gateway.send(fr.build_open_result(open_frame.stream_id, Reason.OK, 1 << 20))
        data = gateway.of_type(FrameType.DATA)
        self.assertEqual(sum(len(f.payload) for f in data), fr.EARLY_WINDOW + 1000)

    def test_paused_until_open_result(self) -> None:
        """A client that writes more than the early window is paused once the stream's buffer
        is full, and resumed when OPEN_RESULT grants the window."""
        gateway = FakeGateway(self.service, "ps")
        gateway.login()
        connection, local = self.accept()
        (open_frame,) = gateway.of_type(FrameType.OPEN)
        for _ in range(8):
            connection.dataReceived(b"p" * 16384)
        self.assertEqual(local.producerState, "paused")
        gateway.send(fr.build_open_result(open_frame.stream_id, Reason.OK, 1 << 20))
        self.assertEqual(local.producerState, "producing")
        self.assertEqual(sum(len(f.payload) for f in gateway.of_type(FrameType.DATA)), 8 * 16384)

    def test_gateway_no_partner_resets_local(self) -> None:
        """OPEN_RESULT NO_PARTNER from the Gateway aborts the local connection (RST, never a
        clean close) and logs the reason."""
        gateway = FakeGateway(self.service, "ps")
        gateway.login()
        connection, local = self.accept()
        (open_frame,) = gateway.of_type(FrameType.OPEN)
        connection.dataReceived(b"hello")
        gateway.send(fr.build_open_result(open_frame.stream_id, Reason.NO_PARTNER, 0,
                                          "the session has no Proxy-Client"))
        self.assertTrue(local.disconnecting)
        assert connection.stream is not None
        self.assertTrue(connection.stream.finished)
        self.assertEqual(self.logs.stream_ends(),
                         ["reset by the far end (NO_PARTNER: the session has no Proxy-Client)"])

    def test_client_reset_sends_connection_reset(self) -> None:
        """A local client lost by an error resets the stream with CONNECTION_RESET naming the
        client connection, in the Twisted order (stopProducing first)."""
        gateway = FakeGateway(self.service, "ps")
        gateway.login()
        connection, local = self.accept()
        (open_frame,) = gateway.of_type(FrameType.OPEN)
        gateway.send(fr.build_open_result(open_frame.stream_id, Reason.OK, 1 << 20))
        assert local.producer is not None
        local.producer.stopProducing()
        connection.connectionLost(Failure(neterror.ConnectionLost()))
        (reset,) = gateway.of_type(FrameType.RESET)
        reason, message = fr.parse_reset(reset.payload)
        self.assertEqual(reason, Reason.CONNECTION_RESET)
        self.assertTrue(message.startswith("the client connection was lost: "), message)
        (how,) = self.logs.stream_ends()
        self.assertTrue(how.startswith("reset here (CONNECTION_RESET: the client connection"))

