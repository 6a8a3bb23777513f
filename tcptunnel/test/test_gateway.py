"""Tests for the Gateway: login, limits, hostile input, routing, isolation, memory bounds."""

from __future__ import annotations

import os
from typing import Any, cast

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides

from tcptunnel import _frames as fr
from tcptunnel._frames import FrameType, GoAway, Reason
from tcptunnel._relay import FRAME_COST
from tcptunnel.auth import ProxyAuth, format_verifier, make_auth_info
from tcptunnel.config import GatewayConfig, parse_settings
from tcptunnel.gateway import Gateway, GatewayLink, GatewayService
from tcptunnel.test._harness import (
    NS,
    EchoProtocol,
    RawPeer,
    Tunnel,
    binding_port,
    connect,
    listen,
    raw_peer,
    wait_until,
)


def gateway_config(extra: str = "", session: str = "") -> GatewayConfig:
    """A gateway config with session 1 (passwords pc / ps) unless ``session`` is given."""
    session = session or '<Session id="1" proxyClientPassword="pc" proxyServerPassword="ps"/>'
    settings = parse_settings(
        f'<Settings {NS}><Instance type="gateway" {extra}>'
        f'<Listener ip="127.0.0.1" port="0"/>{session}</Instance></Settings>'.encode())
    config = settings.instances[0]
    assert isinstance(config, GatewayConfig)
    return config


class LoginUnitTests(SynchronousTestCase):
    """The login state machine with a Clock and StringTransport."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = Gateway(gateway_config('loginTimeout="5"'), self.clock)

    def connect(self, host: str = "192.0.2.1") -> tuple[GatewayLink, StringTransport]:
        link = GatewayLink(self.gateway)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 4000))
        link.makeConnection(transport)
        return link, transport

    def frames(self, transport: StringTransport) -> list[fr.Frame]:
        return fr.FrameDecoder().feed(transport.value())

    def login(self, link: GatewayLink, transport: StringTransport, password: str,
              role: int = fr.ROLE_PROXY_CLIENT, session: int = 1) -> bool:
        auth = ProxyAuth(session, role, password)
        link.dataReceived(fr.build_hello() + fr.build_auth_start(role, session, auth.start()))
        challenges = [f for f in self.frames(transport) if f.type == FrameType.AUTH_CHALLENGE]
        if not challenges:
            return False
        link.dataReceived(fr.build_auth_message(FrameType.AUTH_PROOF,
                                                auth.proof(challenges[0].payload.decode())))
        results = [f for f in self.frames(transport) if f.type == FrameType.AUTH_RESULT]
        ok, final = fr.parse_auth_result(results[0].payload)
        if ok:
            auth.verify(final)
        return ok

    def test_login_each_role(self) -> None:
        """Each role logs in with its own password and is told about its partner."""
        link, transport = self.connect()
        self.assertTrue(self.login(link, transport, "pc", fr.ROLE_PROXY_CLIENT))
        self.assertEqual(link.role_name, "proxy-client")
        link2, transport2 = self.connect()
        self.assertTrue(self.login(link2, transport2, "ps", fr.ROLE_PROXY_SERVER))
        partner = [f for f in self.frames(transport2) if f.type == FrameType.PARTNER]
        self.assertEqual(fr.parse_partner(partner[0].payload), 1)

    def test_wrong_role_password(self) -> None:
        """The Proxy-Server password does not log in as Proxy-Client (uniform failure)."""
        link, transport = self.connect()
        self.assertFalse(self.login(link, transport, "ps", fr.ROLE_PROXY_CLIENT))
        goaway = [f for f in self.frames(transport) if f.type == FrameType.GOAWAY]
        self.assertEqual(fr.parse_goaway(goaway[0].payload)[0], GoAway.AUTH_FAILED)
        self.assertTrue(transport.disconnecting)

    def test_unknown_session_looks_the_same(self) -> None:
        """An unknown session id gets a challenge and the same failure as a wrong password."""
        link, transport = self.connect()
        self.assertFalse(self.login(link, transport, "pc", session=999))
        types = [f.type for f in self.frames(transport)]
        self.assertEqual(types, [FrameType.HELLO, FrameType.AUTH_CHALLENGE,
                                 FrameType.AUTH_RESULT, FrameType.GOAWAY])

    def test_hashed_password(self) -> None:
        """A ...PasswordHash verifier in the config authenticates the same password."""
        verifier = format_verifier(make_auth_info("secret-pc"))
        self.gateway = Gateway(gateway_config(session=(
            f'<Session id="1" proxyClientPasswordHash="{verifier}" proxyServerPassword="x"/>')),
            self.clock)
        link, transport = self.connect()
        self.assertTrue(self.login(link, transport, "secret-pc"))
        link, transport = self.connect()
        self.assertFalse(self.login(link, transport, "wrong"))

    def test_login_deadline(self) -> None:
        """A link that does not log in within the deadline is closed with LOGIN_TIMEOUT."""
        _link, transport = self.connect()
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        goaway = [f for f in self.frames(transport) if f.type == FrameType.GOAWAY]
        self.assertEqual(fr.parse_goaway(goaway[0].payload)[0], GoAway.LOGIN_TIMEOUT)

    def test_non_login_frame_before_login(self) -> None:
        """Any frame but the login sequence before login closes the link."""
        for frame in (fr.build_open(1, fr.OpenRequest(100, 0, "h", 1)), fr.build_partner(1),
                      fr.encode(0x0E, 0, b"?")):
            link, transport = self.connect()
            link.dataReceived(fr.build_hello() + frame)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(fr.parse_goaway(self.frames(transport)[-1].payload)[0],
                             GoAway.PROTOCOL_ERROR)

    def test_big_frame_before_login(self) -> None:
        """Before login a frame header over 4 KiB closes the link at once."""
        link, transport = self.connect()
        link.dataReceived(fr.build_hello() + fr.encode_header(FrameType.AUTH_START, 0, 0, 5000))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(fr.parse_goaway(self.frames(transport)[-1].payload)[0],
                         GoAway.FRAME_TOO_LARGE)

    def login_frames(self, link: GatewayLink, transport: StringTransport, password: str,
                     role: int = fr.ROLE_PROXY_CLIENT, session: int = 1) -> None:
        """Send HELLO, AUTH_START and (after the challenge) AUTH_PROOF; no result read."""
        auth = ProxyAuth(session, role, password)
        link.dataReceived(fr.build_hello() + fr.build_auth_start(role, session, auth.start()))
        (challenge,) = [f for f in self.frames(transport) if f.type == FrameType.AUTH_CHALLENGE]
        link.dataReceived(fr.build_auth_message(FrameType.AUTH_PROOF,
                                                auth.proof(challenge.payload.decode())))

    def test_wrong_guesses_held_right_login_at_once(self) -> None:
        """Past the burst, a wrong proof is answered only when the throttle's reservation is
        due (the slot held until then, below the login deadline), while the right password
        from the same address logs in at once."""
        links = []
        for _ in range(12):
            link, transport = self.connect("198.51.100.7")
            self.login_frames(link, transport, "nope")
            links.append(transport)
        answered = [t for t in links if FrameType.AUTH_RESULT in
                    [f.type for f in self.frames(t)]]
        self.assertLess(len(answered), 12)  # some are held back
        self.assertGreater(len(answered), 0)  # the burst is answered at once
        link, transport = self.connect("198.51.100.7")
        self.assertTrue(self.login(link, transport, "pc"))  # never delayed
        self.clock.advance(self.gateway.limits.login_timeout / 2)
        for t in links:
            types = [f.type for f in self.frames(t)]
            self.assertIn(FrameType.AUTH_RESULT, types)
            self.assertEqual(fr.parse_goaway(self.frames(t)[-1].payload)[0], GoAway.AUTH_FAILED)

    def test_lockout_decays(self) -> None:
        """Thirty wrong guesses at once (about the address's slot limit) do not lock it out:
        once they are answered and the buckets have refilled, a wrong guess is answered at
        once again."""
        for _ in range(30):
            link, transport = self.connect("198.51.100.9")
            self.login_frames(link, transport, "nope")
        self.clock.advance(60)
        link, transport = self.connect("198.51.100.9")
        self.login_frames(link, transport, "nope")
        self.assertIn(FrameType.AUTH_RESULT, [f.type for f in self.frames(transport)])
        link, transport = self.connect("198.51.100.9")
        self.assertTrue(self.login(link, transport, "pc"))

    def test_malformed_login_payloads(self) -> None:
        """AUTH_START of one byte, with bad UTF-8 or an unknown role, and AUTH_PROOF with bad
        UTF-8 or out of order, each end in GOAWAY PROTOCOL_ERROR, with nothing logged as an
        unhandled error."""
        auth = ProxyAuth(1, fr.ROLE_PROXY_CLIENT, "pc")
        start = fr.build_auth_start(0, 1, auth.start())
        cases = [
            fr.encode(FrameType.AUTH_START, 0, b"\x00"),
            fr.encode(FrameType.AUTH_START, 0, b"\x00\x00\x00\x00\x01\xff\xfe"),
            fr.encode(FrameType.AUTH_START, 0, b"\x07\x00\x00\x00\x01n,,n=1:0,r=x"),
            start + fr.encode(FrameType.AUTH_PROOF, 0, b"\xff"),
            fr.encode(FrameType.AUTH_PROOF, 0, b"c=biws,r=x,p=y"),
            start + start,
        ]
        for frames in cases:
            link, transport = self.connect()
            link.dataReceived(fr.build_hello() + frames)
            self.assertTrue(transport.disconnecting, frames)
            last = self.frames(transport)[-1]
            self.assertEqual(last.type, FrameType.GOAWAY)
            self.assertEqual(fr.parse_goaway(last.payload)[0], GoAway.PROTOCOL_ERROR, frames)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_link_limit_keeps_the_proxy_client_slot(self) -> None:
        """Proxy-Servers cannot fill a session: the last slot is the Proxy-Client's, and a
        Proxy-Server over the limit hears GOAWAY LIMIT (not AUTH_RESULT 0, which would read
        as a wrong password)."""
        self.gateway = Gateway(gateway_config('maxLinksPerSession="3"'), self.clock)
        for _ in range(2):
            link, transport = self.connect()
            self.assertTrue(self.login(link, transport, "ps", fr.ROLE_PROXY_SERVER))
        link, transport = self.connect()
        auth = ProxyAuth(1, fr.ROLE_PROXY_SERVER, "ps")
        link.dataReceived(fr.build_hello() + fr.build_auth_start(1, 1, auth.start()))
        (challenge,) = [f for f in self.frames(transport) if f.type == FrameType.AUTH_CHALLENGE]
        link.dataReceived(fr.build_auth_message(FrameType.AUTH_PROOF,
                                                auth.proof(challenge.payload.decode())))
        types = [f.type for f in self.frames(transport)]
        self.assertNotIn(FrameType.AUTH_RESULT, types)
        goaway = self.frames(transport)[-1]
        self.assertEqual(fr.parse_goaway(goaway.payload)[0], GoAway.LIMIT)
        for _ in range(2):  # the Proxy-Client always gets in (and replaces its old link)
            link, transport = self.connect()
            self.assertTrue(self.login(link, transport, "pc"))

    def test_unauthenticated_limit(self) -> None:
        """Links beyond the unauthenticated limit are closed at once with GOAWAY BUSY (a
        transient limit: the proxy retries soon, not after its longest wait)."""
        self.gateway = Gateway(gateway_config('maxUnauthenticatedLinks="2"'), self.clock)
        (_, t1), (_, t2), (_, t3) = self.connect(), self.connect(), self.connect()
        self.assertFalse(t1.disconnecting or t2.disconnecting)
        self.assertTrue(t3.disconnecting)
        self.assertEqual(fr.parse_goaway(self.frames(t3)[-1].payload)[0], GoAway.BUSY)

    def test_unauthenticated_limit_per_address(self) -> None:
        """One address cannot hold every unauthenticated slot: past its own cap it is
        refused, while another address still gets in and logs in."""
        self.gateway = Gateway(gateway_config('maxUnauthenticatedLinksPerAddress="3"'),
                               self.clock)
        held = [self.connect("203.0.113.5") for _ in range(4)]
        self.assertEqual([t.disconnecting for _, t in held], [False, False, False, True])
        link, transport = self.connect("203.0.113.6")
        self.assertTrue(self.login(link, transport, "pc"))
        held[0][0].connectionLost(Failure(ConnectionDone()))  # a slot comes free
        _, again = self.connect("203.0.113.5")
        self.assertFalse(again.disconnecting)

    def test_pending_tls_handshake_aborted_at_the_deadline(self) -> None:
        """A TLS connection that never completes its handshake is aborted at the login
        deadline, not closed gracefully (which would wait for the handshake)."""
        link = GatewayLink(self.gateway)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 4000))
        directlyProvides(transport, ISSLTransport)
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        link.makeConnection(transport)
        self.clock.advance(self.gateway.limits.login_timeout + 0.01)
        self.assertEqual(aborted, [True])

    def test_unauthenticated_close_is_aborted_soon(self) -> None:
        """A link closed before login that does not go away is aborted after a second, not
        the ten seconds an authenticated link gets."""
        link, transport = self.connect()
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        transport.connected = True
        link.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.clock.advance(1.1)
        self.assertEqual(aborted, [True])

    def test_log_lines_of_unauthenticated_peers_are_limited(self) -> None:
        """Hundreds of hostile connections produce a bounded number of log lines, then a
        line that says how many were suppressed."""
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        for _ in range(300):
            link, _transport = self.connect()
            link.dataReceived(b"\x16\x03\x01 not a tcptunnel peer")
            link.connectionLost(Failure(ConnectionDone()))
        ours = [e for e in events if "Link" in e.get("log_format", "")]
        self.assertLess(len(ours), 100)
        self.clock.advance(30)
        self.connect()
        self.assertTrue(any("suppressed" in e.get("log_format", "") for e in events))

    def test_password_change_closes_that_role_only(self) -> None:
        """A reload that changes the Proxy-Server password closes the Proxy-Server links with
        SESSION_CLOSED and leaves the Proxy-Client's link up; the new password logs in."""
        client, client_transport = self.connect()
        self.assertTrue(self.login(client, client_transport, "pc"))
        server, server_transport = self.connect()
        self.assertTrue(self.login(server, server_transport, "ps", fr.ROLE_PROXY_SERVER))
        self.gateway.update(gateway_config(
            'loginTimeout="5"',
            '<Session id="1" proxyClientPassword="pc" proxyServerPassword="new"/>'))
        self.assertTrue(server_transport.disconnecting)
        self.assertEqual(fr.parse_goaway(self.frames(server_transport)[-1].payload)[0],
                         GoAway.SESSION_CLOSED)
        self.assertFalse(client_transport.disconnecting)
        server, server_transport = self.connect()
        self.assertFalse(self.login(server, server_transport, "ps", fr.ROLE_PROXY_SERVER))
        server, server_transport = self.connect()
        self.assertTrue(self.login(server, server_transport, "new", fr.ROLE_PROXY_SERVER))

    def test_same_password_warning(self) -> None:
        """Equal passwords for both roles produce a start-up warning naming the session."""
        gateway = Gateway(gateway_config(session=(
            '<Session id="4" proxyClientPassword="same" proxyServerPassword="same"/>')),
            self.clock)
        (warning,) = gateway.warnings()
        self.assertIn("session 4", warning)


class NeverReads(Protocol):
    """A target that sends forever: fills any tunnel that lets it."""

    def connectionMade(self) -> None:  # noqa: N802
        self.chunk = os.urandom(65536)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._paused = False
        self.resumeProducing()

    def pauseProducing(self) -> None:  # noqa: N802
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        while not self._paused and self.transport is not None and self.transport.connected:  # type: ignore[attr-defined]
            self.transport.write(self.chunk)

    def stopProducing(self) -> None:  # noqa: N802
        self._paused = True


class StopsReadingAfterOpen(RawPeer):
    """A Proxy-Server peer that stops reading in the read that brings its OPEN_RESULT."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        super().dataReceived(data)
        if self.of_type(FrameType.OPEN_RESULT):
            self.transport.pauseProducing()


class GatewayNetworkTests(TestCase):
    """Hostile and unusual peers on real sockets, while a healthy session keeps working."""

    timeout = 60

    async def healthy(self) -> tuple[Tunnel, int]:
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self, sessions=((1, "pc", "ps"), (2, "pc2", "ps2")))
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        return tunnel, binding_port(ps)

    async def assert_echo_works(self, port: int, size: int = 200_000) -> None:
        client = await connect(port)
        payload = os.urandom(size)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")
        self.assertEqual(bytes(client.received), payload)

    async def test_garbage_and_wrong_protocols(self) -> None:
        """Random bytes, a TLS ClientHello, HTTP and truncated frames are closed; the
        healthy session keeps working."""
        tunnel, port = await self.healthy()
        inputs = [
            os.urandom(3000),
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(100),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            fr.build_hello() + fr.encode(FrameType.AUTH_START, 0, b"\x00\x00\x00\x00\x01n,,")[:7],
            fr.build_hello() + fr.encode_header(FrameType.DATA, 0, 1, 16_000_000),
        ]
        peers = []
        for data in inputs:
            peer = await raw_peer(tunnel.gateway_port)
            peer.transport.write(data)
            peers.append(peer)
        await self.assert_echo_works(port)
        # All but the truncated frame are closed at once; that one at the login deadline.
        for i, peer in enumerate(peers):
            if i != 3:
                await wait_until(peer.closed_called, what=f"input {i} to be closed")
        peers[3].transport.loseConnection()

    async def test_login_deadline_real(self) -> None:
        """A silent connection is closed at the login deadline."""
        tunnel = Tunnel(self, gateway_attributes='loginTimeout="0.5"')
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        peer = await raw_peer(tunnel.gateway_port)
        started = reactor.seconds()
        await peer.closed
        self.assertLess(reactor.seconds() - started, 5)
        goaway = peer.goaway()
        self.assertEqual(goaway[0] if goaway else None, GoAway.LOGIN_TIMEOUT)

    async def test_proxy_client_replaced(self) -> None:
        """A second Proxy-Client replaces the first: old link GOAWAY REPLACED and its streams
        reset; new streams go through the new one."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self)
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc1 = tunnel.start_proxy_client(extra='maxRetryDelay="60"')
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc1, ps)
        old_client = await connect(binding_port(ps))
        old_client.transport.write(b"ping")
        await wait_until(lambda: bytes(old_client.received) == b"ping", what="echo")
        old_link = pc1.link
        pc2 = tunnel.start_proxy_client()
        await wait_until(lambda: pc2.link is not None and pc1.link is None, what="replacement")
        self.assertEqual(await old_client.ended, "reset")
        assert old_link is not None
        self.assertIn("REPLACED", old_link.close_reason)
        await tunnel.ready(ps, pc2)
        await self.assert_echo_works(binding_port(ps))
        assert tunnel.gateway is not None
        session = tunnel.gateway.gateway.sessions[1]
        assert session.client is not None and pc2.link is not None
        link_transport: Any = pc2.link.transport
        self.assertTrue(cast(GatewayLink, session.client.adapter).peer_description.endswith(
            f":{link_transport.getHost().port}"))

    async def test_foreign_stream_ids_are_ignored(self) -> None:
        """A peer of another session sending frames for stream ids in use elsewhere cannot
        touch those streams."""
        tunnel, port = await self.healthy()
        client = await connect(port)
        client.transport.write(b"first half ")
        await wait_until(lambda: bytes(client.received) == b"first half ", what="echo")
        attacker = await raw_peer(tunnel.gateway_port)
        self.assertTrue(await attacker.login(2, fr.ROLE_PROXY_SERVER, "ps2"))
        for stream_id in range(1, 5):
            attacker.transport.write(
                fr.encode(FrameType.DATA, stream_id, b"INJECTED")
                + fr.build_window_update(stream_id, 1000)
                + fr.build_reset(stream_id, Reason.CANCELLED)
                + fr.build_fin(stream_id))
        # The Gateway handles a link's frames in order: its PONG means it has seen them all.
        attacker.transport.write(fr.build_ping(b"barrier!"))
        await wait_until(lambda: any(f.payload == b"barrier!"
                                     for f in attacker.of_type(FrameType.PONG))
                         or attacker.closed.called, what="the PONG after the injected frames")
        client.transport.write(b"second half")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")
        self.assertEqual(bytes(client.received), b"first half second half")
        attacker.transport.loseConnection()

    async def test_window_violation_resets_only_that_stream(self) -> None:
        """DATA beyond the window from a peer resets that stream; the link survives."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self)
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        pc.initial_window = 16_384  # the window the Proxy-Client grants per stream
        await wait_until(lambda: pc.link is not None, what="login")
        peer = await raw_peer(tunnel.gateway_port)
        self.assertTrue(await peer.login(1, fr.ROLE_PROXY_SERVER, "server-pw"))
        peer.transport.write(fr.build_open(1, fr.OpenRequest(65536, 0, "127.0.0.1", echo)))
        await wait_until(lambda: bool(peer.of_type(FrameType.OPEN_RESULT)), what="OPEN_RESULT")
        reason, window, _ = fr.parse_open_result(peer.of_type(FrameType.OPEN_RESULT)[0].payload)
        self.assertEqual((reason, window), (Reason.OK, 16_384))
        peer.transport.write(fr.encode(FrameType.DATA, 1, b"x" * 16_000)
                             + fr.encode(FrameType.DATA, 1, b"x" * 16_000))
        await wait_until(lambda: bool(peer.of_type(FrameType.RESET)), what="RESET")
        self.assertEqual(fr.parse_reset(peer.of_type(FrameType.RESET)[0].payload)[0],
                         Reason.FLOW_CONTROL)
        self.assertFalse(peer.closed.called)
        peer.transport.loseConnection()

    async def test_stalled_proxy_server_is_bounded(self) -> None:
        """While a Proxy-Server that stops reading is stalled, the Gateway's queue toward it
        stays within what it granted (security.md), sampled all along, while another
        Proxy-Server of the session keeps flowing."""
        source = await listen(self, NeverReads)
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self)
        self.addCleanup(tunnel.close)
        gateway = tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        stalled = StopsReadingAfterOpen()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel.gateway_port).connect(
            Factory.forProtocol(lambda: stalled))
        self.assertTrue(await stalled.login(1, fr.ROLE_PROXY_SERVER, "server-pw"))
        link = next(lk for lk in gateway.gateway.links if lk.role == fr.ROLE_PROXY_SERVER
                    and lk.peer_description.endswith(f":{stalled.transport.getHost().port}"))
        # Far more than loopback's socket buffers hold while nobody reads (a few hundred KiB),
        # so most of the grant must wait in the Gateway's queue: the bound is really tested.
        window = 4 * 1024 * 1024
        stalled.transport.write(fr.build_open(1, fr.OpenRequest(window, 0, "127.0.0.1",
                                                                source)))
        await wait_until(lambda: bool(stalled.of_type(FrameType.OPEN_RESULT)), what="open")
        self.assertLess(sum(len(f.payload) for f in stalled.of_type(FrameType.DATA)), 256 * 1024)
        # The grant plus, per DATA frame (frames carry 1 KiB or more), its 9-byte header and
        # the queue's per-frame object cost, and a few control frames.
        bound = window + window // 1024 * (fr.HEADER_SIZE + FRAME_COST) + 4096
        samples: list[int] = []

        def sample() -> None:
            samples.append(link.core.queued_bytes)

        sampler = task.LoopingCall(sample)
        sampler.start(0.005)
        try:
            await wait_until(lambda: link.core.queued_bytes >= window // 2, 10,
                             "the stalled stream's grant to pile up at the Gateway")
            stalled_at = len(samples)
            await self.assert_echo_works(binding_port(ps), size=3_000_000)
            during = samples[stalled_at:]
        finally:
            sampler.stop()
        # A 3 MB echo can take only tens of milliseconds: a few samples are all there are.
        self.assertGreater(len(during), 1, "too few samples during the healthy transfer")
        self.assertLessEqual(max(samples), bound, f"{max(samples)} bytes queued, "
                             f"grant {window}")
        self.assertGreaterEqual(min(during), window // 2, "the stall ended during the echo")
        self.assertFalse(stalled.closed.called, "a peer within its grant is not closed")
        stalled.transport.resumeProducing()
        stalled.transport.loseConnection()

    async def test_stream_limit(self) -> None:
        """OPEN beyond the per-link stream limit is answered LIMIT."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self, gateway_attributes='maxStreamsPerLink="2"')
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        await wait_until(lambda: pc.link is not None, what="login")
        peer = await raw_peer(tunnel.gateway_port)
        self.assertTrue(await peer.login(1, fr.ROLE_PROXY_SERVER, "server-pw"))
        for stream_id in (1, 2, 3):
            peer.transport.write(fr.build_open(stream_id, fr.OpenRequest(65536, 0, "127.0.0.1",
                                                                         echo)))
        await wait_until(lambda: len(peer.of_type(FrameType.OPEN_RESULT)) == 3, what="results")
        reasons = {f.stream_id: fr.parse_open_result(f.payload)[0]
                   for f in peer.of_type(FrameType.OPEN_RESULT)}
        self.assertEqual(reasons, {1: Reason.OK, 2: Reason.OK, 3: Reason.LIMIT})
        peer.transport.loseConnection()

    async def test_two_sessions_are_isolated(self) -> None:
        """Streams of each session reach that session's Proxy-Client only."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self, sessions=((1, "a1", "b1"), (2, "a2", "b2")))
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pcs = [tunnel.start_proxy_client(session=s) for s in (1, 2)]
        pss = [tunnel.start_proxy_server([("127.0.0.1", echo)], session=s) for s in (1, 2)]
        await tunnel.ready(*pcs, *pss)
        opened = {1: 0, 2: 0}
        for session, pc in zip((1, 2), pcs, strict=True):
            original = pc.open_requested

            def counting(link, stream_id, request, _s=session, _o=original):
                opened[_s] += 1
                _o(link, stream_id, request)

            pc.open_requested = counting  # type: ignore[method-assign]
            assert pc.link is not None
            pc.link_ready(pc.link)
        await defer.gatherResults([defer.ensureDeferred(self.assert_echo_works(
            binding_port(pss[0]), 1000)) for _ in range(3)])
        await self.assert_echo_works(binding_port(pss[1]), 1000)
        self.assertEqual(opened, {1: 3, 2: 1})


class ChallengeCatcher(RawPeer):
    """A peer whose ``challenged`` fires at the first AUTH_CHALLENGE (or the close)."""

    def __init__(self) -> None:
        super().__init__()
        self.challenged: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        super().dataReceived(data)
        if self.of_type(FrameType.AUTH_CHALLENGE) and not self.challenged.called:
            self.challenged.callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802, B008
        if not self.challenged.called:
            self.challenged.callback(None)
        super().connectionLost(reason)


class DecoyOverTheWireTests(TestCase):
    """The Gateway's challenges do not tell unknown sessions from configured ones by i=."""

    timeout = 60

    async def challenge(self, port: int, session_id: int, role: int) -> tuple[str, int]:
        """The salt and iteration count the Gateway challenges a login with."""
        peer = ChallengeCatcher()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(lambda: peer))
        auth = ProxyAuth(session_id, role, "a guess")
        peer.transport.write(fr.build_hello() + fr.build_auth_start(role, session_id,
                                                                    auth.start()))
        await peer.challenged
        self.assertTrue(peer.of_type(FrameType.AUTH_CHALLENGE), f"closed: {peer.goaway()}")
        peer.transport.loseConnection()
        await peer.closed
        _nonce, salt, count = peer.of_type(FrameType.AUTH_CHALLENGE)[0].payload.decode().split(",")
        return salt[2:], int(count[2:])

    async def test_unknown_sessions_answer_the_configured_counts(self) -> None:
        """With session 5 of 5 at 100,000 iterations for both roles, the real session answers
        100,000; unknown sessions answer 100,000 for both roles or 4096 for both, stable
        across probes, and some of 60 do answer 100,000."""
        strong = [format_verifier(make_auth_info(password, 100_000))
                  for password in ("strong-pc", "strong-ps")]
        sessions = "".join(f'<Session id="{n}" proxyClientPassword="pc{n}" '
                           f'proxyServerPassword="ps{n}"/>' for n in range(1, 5))
        sessions += (f'<Session id="5" proxyClientPasswordHash="{strong[0]}" '
                     f'proxyServerPasswordHash="{strong[1]}"/>')
        # Abandoned logins keep their slot until the throttle's time: room for all 140.
        limits = 'maxUnauthenticatedLinks="1000" maxUnauthenticatedLinksPerAddress="1000"'
        service = GatewayService(gateway_config(limits, session=sessions), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.ports[0].getHost().port
        roles = (fr.ROLE_PROXY_CLIENT, fr.ROLE_PROXY_SERVER)
        self.assertEqual([(await self.challenge(port, 5, role))[1] for role in roles],
                         [100_000, 100_000])
        self.assertEqual([(await self.challenge(port, 1, role))[1] for role in roles],
                         [4096, 4096])
        answers = {}
        for session_id in range(100, 160):
            answers[session_id] = [await self.challenge(port, session_id, role)
                                   for role in roles]
            counts = {count for _salt, count in answers[session_id]}
            self.assertIn(counts, ({4096}, {100_000}), f"session {session_id}")
        for session_id in range(100, 110):
            self.assertEqual([await self.challenge(port, session_id, role) for role in roles],
                             answers[session_id], "a second probe gets the same answer")
        # 1 session in 5 is at 100,000: none of 60 unknown ones is a 1-in-650,000 chance.
        self.assertTrue(any(pair[0][1] == 100_000 for pair in answers.values()))


class BindFailureTests(TestCase):
    """Start-up fails clearly when an address is taken."""

    async def test_port_in_use(self) -> None:
        """A Listener or Binding on a port in use fails start-up naming address and line."""
        from tcptunnel.config import ProxyConfig, StartupError
        from tcptunnel.gateway import GatewayService
        from tcptunnel.proxyserver import ProxyServerService

        blocker = await listen(self, EchoProtocol)
        settings = parse_settings(
            f'<Settings {NS}>\n<Instance type="gateway"><Listener ip="127.0.0.1" '
            f'port="{blocker}"/></Instance>\n<Instance type="proxy-server" host="h" port="1">'
            f'<Session id="1" password="p">\n<Binding listenIp="127.0.0.1" '
            f'listenPort="{blocker}" targetHost="t" targetPort="1"/></Session></Instance>'
            "</Settings>".encode(), "s.xml")
        gateway_config, server_config = settings.instances
        assert isinstance(gateway_config, GatewayConfig)
        assert isinstance(server_config, ProxyConfig)
        with self.assertRaises(StartupError) as raised:
            GatewayService(gateway_config, reactor).startService()
        self.assertIn(f"Gateway could not listen on 127.0.0.1:{blocker} (s.xml:2)",
                      str(raised.exception))
        with self.assertRaises(StartupError) as raised:
            ProxyServerService(server_config, reactor).startService()
        self.assertIn(f"Binding could not listen on 127.0.0.1:{blocker} (s.xml:4)",
                      str(raised.exception))
