"""More than one Gateway (issue 20), in one process on loopback: a proxy's ``<Gateway>``
failover list (first down: the next; first back: back to it) and draining (sessions move
to the next Gateway at once, make-before-break, while their running streams finish on the
draining one); the draining link's bookkeeping in the proxy and the relay core; the
``drain`` setting on reload."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel import _frames as fr
from tcptunnel._e2e import ServerState
from tcptunnel._frames import FrameType, GoAway, Reason
from tcptunnel.config import NAMESPACE, ConfigError, ProxyConfig, load_settings, parse_settings
from tcptunnel.e2e import ServerEndToEnd
from tcptunnel.gateway import GatewayService
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.status import _gateway_snapshot, _proxy_snapshot, process_info, render_page
from tcptunnel.tap import TunnelService
from tcptunnel.test._harness import (
    EchoProtocol,
    Tunnel,
    binding_port,
    reserve_port,
    wait_until,
)
from tcptunnel.test.test_e2e_tunnel import E2E_PASSWORD
from tcptunnel.test.test_proxyunits import TARGET, FakeGateway, Logs, proxy_config
from tcptunnel.test.test_relay import Relay, data, of_type, open_frame


def proxy_xml(role: str, port: int, fallbacks: list[int], inner: str,
              extra: str = "") -> str:
    """A proxy Instance on 127.0.0.1:port with <Gateway> entries for ``fallbacks``."""
    gateways = "".join(f'<Gateway host="127.0.0.1" port="{p}"/>' for p in fallbacks)
    return (f'<Instance type="{role}" host="127.0.0.1" port="{port}" maxRetryDelay="1" '
            f'{extra}>{gateways}{inner}</Instance>')


class Echoer(Protocol):
    """A local client of a Binding: sends when asked, records the echo and its end."""

    def __init__(self) -> None:
        self.received = b""
        self.ended: str | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: N802, B008
        self.ended = type(reason.value).__name__


class Fixture:
    """Two Gateways (A on a reserved port, B), one session's Proxy-Client and Proxy-Server
    whose list is A then B, and an echo target; ``session`` is added to both proxies'
    <Session> (e.g. an endToEndPassword)."""

    def __init__(self, test: TestCase, session: str = "") -> None:
        self.test = test
        self.a = Tunnel(test)
        self.b = Tunnel(test)
        test.addCleanup(self.a.close)
        test.addCleanup(self.b.close)
        self.a_port = reserve_port(test)
        self.b.start_gateway()
        listen: Any = reactor.listenTCP
        self.echo = listen(0, Factory.forProtocol(EchoProtocol), interface="127.0.0.1")
        test.addCleanup(self.echo.stopListening)
        echo_port = self.echo.getHost().port
        fallbacks = [self.b.gateway_port]
        self.client = self.b._start_proxy(ProxyClientService, proxy_xml(
            "proxy-client", self.a_port, fallbacks,
            f'<Session id="1" password="client-pw" {session}/><AllowedTargetEndpoints>'
            f'<Endpoint host="127.0.0.1" port="{echo_port}"/></AllowedTargetEndpoints>'))
        self.server = self.b._start_proxy(ProxyServerService, proxy_xml(
            "proxy-server", self.a_port, fallbacks,
            f'<Session id="1" password="server-pw" {session}><Binding listenIp="127.0.0.1" '
            f'listenPort="0" targetHost="127.0.0.1" targetPort="{echo_port}"/></Session>'))
        for proxy in (self.client, self.server):
            proxy.failback_interval = 0.3  # 30 s in production; the mechanism is the same

    def on(self, gateway: Tunnel) -> bool:
        """Whether both proxies are logged in to ``gateway`` and see each other."""
        service = gateway.gateway
        return (service is not None and len(service.gateway.links) == 2
                and self.client.partner_available and self.server.partner_available)

    def paired(self) -> bool:
        """Whether the Proxy-Server has end-to-end keys on its link (True without e2e)."""
        e2e = self.server.e2e
        return not isinstance(e2e, ServerEndToEnd) or e2e.pairing.state is ServerState.PAIRED

    async def talk(self) -> Echoer:
        """A connection through the Binding, with a first echo received."""
        echoer = Echoer()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", binding_port(self.server)).connect(
            Factory.forProtocol(lambda: echoer))
        assert echoer.transport is not None
        echoer.transport.write(b"hello")
        await wait_until(lambda: echoer.received == b"hello", 10, "the first echo")
        return echoer


class FailoverTests(TestCase):
    """A proxy's <Gateway> list without a balancer."""

    async def test_first_down_then_back(self) -> None:
        """First Gateway down: both proxies use the second and the session works; first
        back: both go back to it (within a few failback intervals) and it works there."""
        fixture = Fixture(self)
        await wait_until(lambda: fixture.on(fixture.b), 15, "both proxies on the second")
        self.assertEqual((fixture.client.target_index, fixture.server.target_index), (1, 1))
        echoer = await fixture.talk()
        echoer.transport.loseConnection()  # type: ignore[union-attr]
        fixture.a.start_gateway(fixture.a_port)
        await wait_until(lambda: fixture.on(fixture.a), 15, "both proxies back on the first")
        self.assertEqual(len(fixture.b.gateway.gateway.links), 0)  # type: ignore[union-attr]
        again = await fixture.talk()
        again.transport.loseConnection()  # type: ignore[union-attr]


class DrainTests(TestCase):
    """A Gateway told to drain: its sessions move at once, its running streams finish."""

    async def drain_while_streaming(self, fixture: Fixture) -> None:
        """With a stream running through A, drain A: both proxies are on B within 2 s while
        that stream still runs on A, and a new stream goes through B at once; the running
        stream then carries 1 MiB each way (many WINDOW_UPDATEs) and a half-close on A and
        ends clean with exactly its bytes; then A closes the draining links, B's stream is
        untouched, and no proxy counts a lost link."""
        fixture.a.start_gateway(fixture.a_port)
        await wait_until(lambda: fixture.on(fixture.a), 15, "both proxies on the first")
        if isinstance(fixture.server.e2e, ServerEndToEnd):
            await wait_until(lambda: fixture.paired(), 15, "the end-to-end pairing on A")
        echoer = await fixture.talk()
        gateway_a = fixture.a.gateway
        assert gateway_a is not None
        started = reactor.seconds()
        await gateway_a.drain()
        self.assertTrue(gateway_a.gateway.draining)
        self.assertEqual(gateway_a.ports, [])
        await wait_until(lambda: fixture.on(fixture.b), 10,
                         "both proxies on the second while the stream runs")
        # At once: a reconnect without backoff (1 s otherwise), while the stream runs.
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertIsNone(echoer.ended)
        self.assertEqual(len(gateway_a.gateway.links), 2)
        for proxy in (fixture.client, fixture.server):
            draining = proxy.draining_link
            assert draining is not None
            self.assertEqual(len(draining.streams), 1)
            self.assertEqual(proxy.stats["links_drained",], 1)
        self.check_status(fixture)
        if isinstance(fixture.server.e2e, ServerEndToEnd):
            await wait_until(lambda: fixture.paired(), 15, "a new pairing on B")
        again = await fixture.talk()
        gateway_b = fixture.b.gateway
        assert gateway_b is not None
        (b_server,) = [link for link in gateway_b.gateway.links
                       if link.role == fr.ROLE_PROXY_SERVER]
        # The new stream (and, end to end, the new pairing's pake stream).
        self.assertEqual(len(b_server.routes), 1 + isinstance(fixture.server.e2e, ServerEndToEnd))

        payload = bytes(range(256)) * 4096
        assert echoer.transport is not None
        echoer.transport.write(payload)
        echoer.transport.loseWriteConnection()  # type: ignore[attr-defined]
        await wait_until(lambda: echoer.ended is not None, 20, "the running stream's end")
        self.assertEqual(echoer.ended, "ConnectionDone")
        self.assertEqual(echoer.received, b"hello" + payload)
        await wait_until(lambda: not gateway_a.gateway.links
                         and fixture.client.draining_link is None
                         and fixture.server.draining_link is None, 10,
                         "the draining links to close")
        self.assertTrue(gateway_a.gateway.drained)
        assert again.transport is not None
        again.transport.write(b" again")
        await wait_until(lambda: again.received == b"hello again", 10, "the echo through B")
        for proxy in (fixture.client, fixture.server):
            self.assertEqual(proxy.stats["links_lost",], 0)
            assert proxy.link is not None
            self.assertEqual(proxy.link.gateway, proxy.gateway_address)
        again.transport.loseConnection()

    def check_status(self, fixture: Fixture) -> None:
        """The status of a drain in progress: the proxy lists its draining link (to A, one
        stream) beside its link to B; A shows itself and its peers draining."""
        now = reactor.seconds()
        proxy = _proxy_snapshot(fixture.server, now)
        self.assertEqual(proxy["gateway"], f"127.0.0.1:{fixture.b.gateway_port}")
        self.assertEqual(proxy["draining_link"]["gateway"], f"127.0.0.1:{fixture.a_port}")
        self.assertEqual(proxy["draining_link"]["streams"], 1)
        assert fixture.a.gateway is not None
        gateway = _gateway_snapshot(fixture.a.gateway, now)
        self.assertTrue(gateway["draining"])
        (session,) = gateway["sessions"]
        self.assertEqual([peer["draining"] for peer in session["peers"]], [True, True])
        page = render_page({"process": process_info(now, now), "instances": [gateway, proxy]})
        self.assertIn(f'<span class="warn">draining</span> link to the Gateway '
                      f'127.0.0.1:{fixture.a_port}', page)
        self.assertIn('<span class="warn">draining</span>: no new logins', page)

    async def test_drain_moves_at_once(self) -> None:
        """The session moves to the second Gateway at once while its stream runs; the stream
        finishes on the first, cleanly, with exactly its bytes (see drain_while_streaming)."""
        await self.drain_while_streaming(Fixture(self))

    async def test_drain_moves_at_once_end_to_end(self) -> None:
        """The same with end-to-end encryption: the new link pairs afresh on B (another
        pairing id), and the sealed stream on A keeps its keys to its end."""
        fixture = Fixture(self, f'endToEndPassword="{E2E_PASSWORD}"')
        pairings: list[str] = []

        def paired() -> bool:
            e2e = fixture.server.e2e
            assert isinstance(e2e, ServerEndToEnd)
            pairing = e2e.pairing.pairing
            if pairing is None or e2e.pairing.state is not ServerState.PAIRED:
                return False
            if pairing.pairing_id.hex() not in pairings:
                pairings.append(pairing.pairing_id.hex())
            return True

        fixture.paired = paired  # type: ignore[method-assign]
        await self.drain_while_streaming(fixture)
        self.assertEqual(len(pairings), 2)

    async def test_drain_deadline(self) -> None:
        """A stream still running at drainTimeout is reset; the session moved at once, and
        the proxies count no lost link."""
        fixture = Fixture(self)
        fixture.a.gateway_attributes = 'drainTimeout="2"'
        fixture.a.start_gateway(fixture.a_port)
        await wait_until(lambda: fixture.on(fixture.a), 15, "both proxies on the first")
        echoer = await fixture.talk()
        assert fixture.a.gateway is not None
        await fixture.a.gateway.drain()
        await wait_until(lambda: fixture.on(fixture.b), 10, "both proxies on the second")
        self.assertIsNone(echoer.ended)
        await wait_until(lambda: echoer.ended is not None, 10, "the stream to be reset")
        self.assertNotEqual(echoer.ended, "ConnectionDone")
        await wait_until(lambda: fixture.client.draining_link is None
                         and fixture.server.draining_link is None, 10,
                         "the draining links to close")
        self.assertEqual([p.stats["links_lost",] for p in (fixture.client, fixture.server)],
                         [0, 0])
        self.assertTrue(fixture.on(fixture.b))


class DrainSettingTests(TestCase):
    """``<Instance type="gateway" drain="true">`` (issue 20): a reload that sets it drains
    the Gateway as SIGUSR2 does."""

    async def test_reload_drains(self) -> None:
        """A running TunnelService's Gateway A: the reload with drain="true" closes its
        Listener and moves the session to B at once; a reload without it keeps it
        draining (with a warning), its Listener closed."""
        fixture = Fixture(self)
        path = os.path.abspath(self.mktemp())

        def write(attributes: str) -> None:
            fixture.a.gateway_attributes = attributes
            with open(path, "w") as f:
                f.write(f'<Settings xmlns="{NAMESPACE}">{fixture.a.gateway_xml(fixture.a_port)}'
                        '</Settings>')

        write("")
        tunnel = TunnelService(load_settings(path), reactor)
        tunnel.startService()
        self.addCleanup(lambda: defer.maybeDeferred(tunnel.stopService))
        (gateway,) = [child for child in tunnel if isinstance(child, GatewayService)]
        await wait_until(lambda: len(gateway.gateway.links) == 2
                         and fixture.client.partner_available
                         and fixture.server.partner_available, 15, "both proxies on A")
        logs = Logs(self)
        write('drain="true"')
        self.assertTrue(await tunnel.reload())
        self.assertTrue(gateway.gateway.draining)
        self.assertEqual(gateway.ports, [])
        await wait_until(lambda: fixture.on(fixture.b), 10, "both proxies on B")
        await wait_until(lambda: gateway.gateway.drained, 10, "A drained")
        self.assertIn('drain="true" set by the reload', logs.text())
        write("")
        self.assertTrue(await tunnel.reload())
        self.assertEqual(gateway.ports, [])
        self.assertIn("Still draining", logs.text())

    def test_start_drained(self) -> None:
        """A Gateway started while drain="true" is set listens nowhere and takes no login."""
        xml = (f'<Settings xmlns="{NAMESPACE}"><Instance type="gateway" drain="yes">'
               '<Listener ip="127.0.0.1" port="0"/><Session id="1" '
               'proxyClientPassword="aaaaaaaaaaaa" proxyServerPassword="bbbbbbbbbbbb"/>'
               '</Instance></Settings>')
        tunnel = TunnelService(parse_settings(xml.encode(), "/tmp/x.xml"), MemoryReactorClock())
        tunnel.startService()
        self.addCleanup(tunnel.stopService)
        (gateway,) = [child for child in tunnel if isinstance(child, GatewayService)]
        self.assertTrue(gateway.gateway.draining)
        self.assertEqual(gateway.ports, [])

    def test_setting(self) -> None:
        """drain is a flag (default false); any other value is an error naming it."""
        def parse(attribute: str) -> Any:
            xml = (f'<Settings xmlns="{NAMESPACE}"><Instance type="gateway" {attribute}>'
                   '</Instance></Settings>')
            return parse_settings(xml.encode(), "/tmp/x.xml").instances[0]

        self.assertFalse(parse("").drain)
        self.assertTrue(parse('drain="true"').drain)
        self.assertFalse(parse('drain="0"').drain)
        with self.assertRaises(ConfigError) as caught:
            parse('drain="later"')
        self.assertIn("drain", str(caught.exception))


ALLOWED = f'<AllowedTargetEndpoints><Endpoint host="{TARGET[0]}" port="{TARGET[1]}"/>' \
    '</AllowedTargetEndpoints>'


class DrainingLinkTests(SynchronousTestCase):
    """A proxy's draining link (make-before-break) over StringTransport and a Clock: at most
    one, bounded in time, its end neither reconnects nor touches the new link."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        # A Gateway that answers PINGs keeps a link for ever: the keepalive (here above the
        # 1 h bound) must not be what ends it.
        self.service = ProxyClientService(proxy_config(
            "proxy-client", ALLOWED, 'keepaliveInterval="5000" keepaliveTimeout="5000"'),
            self.reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.logs = Logs(self)

    def dials(self) -> int:
        """Connections the proxy started to the Gateway (192.0.2.9:4433) so far."""
        return sum(1 for client in self.reactor.tcpClients if client[1] == 4433)

    def login(self, age: float = 5.0) -> tuple[FakeGateway, Any]:
        """The connection dialled last, its link logged in ``age`` seconds ago."""
        connector = self.reactor.connectors[-1]
        gateway = FakeGateway(self.service, "pc")
        gateway.login()
        self.reactor.advance(age)
        return gateway, connector

    def open(self, gateway: FakeGateway, stream_id: int) -> None:
        """An OPEN from the Gateway to the allowed target (its dial never completes)."""
        gateway.send(fr.encode(FrameType.OPEN, stream_id, fr.open_payload(
            65536, 1, fr.KIND_TCP, fr.target_fields(*TARGET))))

    def drain(self, gateway: FakeGateway, message: str = "the Gateway is draining") -> None:
        """The Gateway's GOAWAY DRAINING; the reactor turns once (a retry at once is due)."""
        gateway.send(fr.build_goaway(GoAway.DRAINING, message))
        self.reactor.advance(0)

    def lose(self, gateway: FakeGateway, connector: Any) -> None:
        """The connection ends as Twisted ends one: the protocol, then the factory."""
        reason = Failure(ConnectionDone())
        gateway.link.connectionLost(reason)
        self.service.factory.clientConnectionLost(connector, reason)

    def test_draining_link_keeps_streams_and_reconnects_once(self) -> None:
        """DRAINING: the link stays (its stream, PING answered), a new OPEN on it is refused
        SHUTDOWN, a second connection starts at once and becomes the link; the draining
        link's end reconnects nothing and leaves the new link alone; nothing is "lost"."""
        first, connector = self.login()
        self.open(first, 1)
        self.drain(first)
        link = first.link
        self.assertIsNone(self.service.link)
        self.assertIs(self.service.draining_link, link)
        self.assertFalse(first.transport.disconnecting)
        self.assertIn(1, link.streams)
        self.assertEqual(self.dials(), 2)
        self.assertEqual(self.service.factory.last_wait, 0.0)
        first.send(fr.build_ping(b"12345678"))
        self.assertEqual(len(first.of_type(FrameType.PONG)), 1)
        self.open(first, 2)
        (refused,) = [f for f in first.of_type(FrameType.OPEN_RESULT) if f.stream_id == 2]
        self.assertIs(fr.parse_open_result(refused.payload)[0], Reason.SHUTDOWN)

        second, _ = self.login()
        self.assertIs(self.service.link, second.link)
        self.assertIs(self.service.draining_link, link)
        first.send(fr.build_goaway(GoAway.DRAINING, "the last stream of this link ended"))
        self.assertTrue(first.transport.disconnecting)
        self.lose(first, connector)
        self.reactor.advance(60)
        self.assertEqual(self.dials(), 2)
        self.assertIs(self.service.link, second.link)
        self.assertFalse(second.transport.disconnecting)
        self.assertIsNone(self.service.draining_link)
        self.assertEqual(self.service.stats["links_lost",], 0)
        self.assertEqual(self.service.stats["links_drained",], 1)
        self.assertIn("The draining link to the Gateway 192.0.2.9:4433 closed",
                      self.logs.text())

    def test_one_draining_link_at_most(self) -> None:
        """A DRAINING on the new link while the first still drains closes the first (its
        stream reset SHUTDOWN, saying why) and starts a third connection."""
        first, _ = self.login()
        self.open(first, 1)
        self.drain(first)
        second, _ = self.login()
        self.open(second, 1)
        self.drain(second)
        self.assertTrue(first.transport.disconnecting)
        (reset,) = first.of_type(FrameType.RESET)
        reason, message = fr.parse_reset(reset.payload)
        self.assertIs(reason, Reason.SHUTDOWN)
        self.assertIn("at most one", message)
        self.assertIs(self.service.draining_link, second.link)
        self.assertFalse(second.transport.disconnecting)
        self.assertEqual(self.dials(), 3)

    def test_draining_bound(self) -> None:
        """A Gateway that says DRAINING and never closes: the proxy closes the draining link
        after max_draining (1 h), with a reason, and does not reconnect for it."""
        self.assertEqual(self.service.max_draining, 3600.0)
        first, connector = self.login()
        self.open(first, 1)
        self.drain(first)
        second, _ = self.login()
        self.reactor.advance(3600 - 6)
        self.assertFalse(first.transport.disconnecting)
        self.reactor.advance(2)
        self.assertTrue(first.transport.disconnecting)
        code, message = first.expect_goaway()
        self.assertIs(code, GoAway.NORMAL)
        self.assertIn("3600 s, the most this proxy allows", message)
        self.lose(first, connector)
        self.reactor.advance(60)
        self.assertEqual(self.dials(), 2)
        self.assertIs(self.service.link, second.link)
        self.assertEqual(self.service.stats["links_lost",], 0)

    def test_drain_right_after_login_backs_off(self) -> None:
        """DRAINING within a second of the login: the new connection waits the normal
        backoff (about 1 s), so a Gateway that drains every login cannot make the proxy
        log in as fast as it can."""
        first, _ = self.login(age=0.1)
        self.drain(first)
        self.assertGreater(self.service.factory.last_wait, 0.5)
        self.assertEqual(self.dials(), 1)
        self.reactor.advance(1.3)
        self.assertEqual(self.dials(), 2)

    def test_drain_while_logging_in_closes(self) -> None:
        """DRAINING before the login completed closes the link, as any GOAWAY does."""
        gateway = FakeGateway(self.service, "pc")
        gateway.challenge()
        gateway.send(fr.build_goaway(GoAway.DRAINING, "the Gateway is draining"))
        self.assertTrue(gateway.transport.disconnecting)
        self.assertIsNone(self.service.draining_link)


class RelayDrainTests(SynchronousTestCase):
    """RelayCore.retire and check_drained, driven as gateway.py drives them."""

    def setUp(self) -> None:
        self.relay = Relay()
        self.client = self.relay.login(1, fr.ROLE_PROXY_CLIENT)
        self.server = self.relay.login(1, fr.ROLE_PROXY_SERVER)
        self.relay.read_all(self.client)
        self.relay.read_all(self.server)

    def settle(self) -> None:
        """What GatewayLink does after a read and after writing: check both links."""
        for link in (self.client, self.server):
            self.relay.core.check_drained(link)
        self.relay.effects()

    def test_retire_keeps_streams_then_closes(self) -> None:
        """Retired links get GOAWAY DRAINING and stay: DATA and WINDOW_UPDATE pass both ways,
        a new OPEN is refused SHUTDOWN; after FIN both ways, each link is closed with
        DRAINING only once the FIN queued toward it was read."""
        relay, client, server = self.relay, self.client, self.server
        relay.feed(server, open_frame(1))
        (opened,) = of_type(relay.read_all(client), FrameType.OPEN)
        relay.feed(client, fr.build_open_result(opened.stream_id, Reason.OK, 100_000))
        relay.read_all(server)
        for link in (client, server):
            relay.core.retire(link, "draining")
        relay.effects()
        for link in (client, server):
            (goaway,) = of_type(relay.read_all(link), FrameType.GOAWAY)
            self.assertEqual(fr.parse_goaway(goaway.payload), (GoAway.DRAINING, "draining"))
        self.settle()
        self.assertEqual(relay.failed, [])
        relay.feed(server, data(1, b"up"))
        relay.feed(client, data(opened.stream_id, b"down")
                   + fr.build_window_update(opened.stream_id, 2))
        self.assertEqual([(f.type, f.payload) for f in relay.read_all(client)],
                         [(FrameType.DATA, b"up")])
        self.assertEqual([f.type for f in relay.read_all(server)],
                         [FrameType.WINDOW_UPDATE, FrameType.DATA])
        relay.feed(server, open_frame(3))
        (refused,) = of_type(relay.read_all(server), FrameType.OPEN_RESULT)
        self.assertIs(fr.parse_open_result(refused.payload)[0], Reason.SHUTDOWN)
        relay.feed(server, fr.encode(FrameType.FIN, 1, b""))
        relay.feed(client, fr.encode(FrameType.FIN, opened.stream_id, b""))
        self.settle()
        # Both routes' ends are gone, but a FIN still waits toward each link: not yet.
        self.assertEqual(relay.failed, [])
        self.assertEqual([f.type for f in relay.read_all(client)], [FrameType.FIN])
        self.settle()
        self.assertEqual([link for link, _code, _message in relay.failed], [client])
        # (PARTNER 0 too: the Proxy-Client's link left the session.)
        self.assertEqual(len(of_type(relay.read_all(server), FrameType.FIN)), 1)
        self.settle()
        self.assertEqual([(link, code) for link, code, _message in relay.failed],
                         [(client, GoAway.DRAINING), (server, GoAway.DRAINING)])

    def test_retire_without_streams_closes_at_once(self) -> None:
        """A link without streams is closed at once, with GOAWAY DRAINING."""
        self.relay.core.retire(self.server, "draining")
        self.relay.effects()
        self.assertEqual([(link, code) for link, code, _message in self.relay.failed],
                         [(self.server, GoAway.DRAINING)])
        (goaway,) = of_type(self.relay.read_all(self.server), FrameType.GOAWAY)
        self.assertEqual(fr.parse_goaway(goaway.payload), (GoAway.DRAINING, "draining"))


class GatewayListConfigTests(SynchronousTestCase):
    """<Gateway> children of a proxy Instance."""

    def parse(self, inner: str, extra: str = "") -> ProxyConfig:
        """One proxy-client Instance with ``inner`` children."""
        xml = (f'<Settings xmlns="{NAMESPACE}"><Instance type="proxy-client" '
               f'host="gw1.example" port="443" {extra}>{inner}'
               '<Session id="1" password="aaaaaaaaaaaa"/></Instance></Settings>')
        config = parse_settings(xml.encode(), "/tmp/x.xml").instances[0]
        assert isinstance(config, ProxyConfig)
        return config

    def test_list(self) -> None:
        """The entries are read in order with their serverName."""
        config = self.parse('<Gateway host="gw2.example" port="7000" serverName="s1.gw"/>'
                            '<Gateway host="192.0.2.9" port="443"/>', 'useSsl="true"')
        self.assertEqual([(g.host, g.port, g.server_name) for g in config.gateways],
                         [("gw2.example", 7000, "s1.gw"), ("192.0.2.9", 443, None)])

    def test_mistakes(self) -> None:
        """A missing port, a bad one and serverName without TLS are errors naming them."""
        for inner, word in (('<Gateway host="gw2"/>', "port"),
                            ('<Gateway host="gw2" port="0"/>', "port"),
                            ('<Gateway host="gw2" port="1" serverName="x"/>', "useSsl")):
            with self.assertRaises(ConfigError) as caught:
                self.parse(inner)
            self.assertIn(word, str(caught.exception))

    def test_websocket_path_per_gateway(self) -> None:
        """An entry without webSocketPath takes the Instance's, one with a path its own, and
        webSocketPath="" none (plain TLS to that Gateway); under an Instance without one, an
        entry may still be a WebSocket."""
        config = self.parse('<Gateway host="gw2" port="1"/>'
                            '<Gateway host="gw3" port="2" webSocketPath="/other/ws"/>'
                            '<Gateway host="gw4" port="3" webSocketPath=""/>',
                            'useSsl="true" webSocketPath="/tunnel"')
        self.assertEqual(config.websocket_path, "/tunnel")
        self.assertEqual([g.websocket_path for g in config.gateways],
                         ["/tunnel", "/other/ws", None])
        plain = self.parse('<Gateway host="gw2" port="1" webSocketPath="/tunnel"/>'
                           '<Gateway host="gw3" port="2"/>', 'useSsl="true"')
        self.assertEqual((plain.websocket_path, [g.websocket_path for g in plain.gateways]),
                         (None, ["/tunnel", None]))
        self.assertEqual(config.warnings, ())

    def test_websocket_server_name_without_tls(self) -> None:
        """Without useSsl, an entry's serverName is its WebSocket Host header, so it is
        allowed on an entry that is a WebSocket (its own path or the Instance's) and refused
        on one that is not (webSocketPath="")."""
        config = self.parse('<Gateway host="127.0.0.1" port="1" serverName="s1.gw" '
                            'webSocketPath="/ws"/>')
        self.assertEqual((config.gateways[0].server_name, config.gateways[0].websocket_path),
                         ("s1.gw", "/ws"))
        inherited = self.parse('<Gateway host="127.0.0.1" port="1" serverName="s1.gw"/>',
                               'webSocketPath="/ws"')
        self.assertEqual(inherited.gateways[0].websocket_path, "/ws")
        with self.assertRaises(ConfigError) as caught:
            self.parse('\n<Gateway host="127.0.0.1" port="1" serverName="s1.gw" '
                       'webSocketPath=""/>', 'webSocketPath="/ws"')
        self.assertIn("/tmp/x.xml:2: <Gateway> attribute 'serverName': serverName needs "
                      "useSsl=\"true\"", str(caught.exception))

    def test_websocket_path_mistakes(self) -> None:
        """A path without its leading /, with a query or a space is an error naming the file,
        the line, the element and the attribute, and saying what is expected ("" too); on
        the Instance "" stays an error (there is nothing to switch off)."""
        for bad in ("tunnel", "/t?x=1", "/a b", "/" + "a" * 256):
            with self.assertRaises(ConfigError) as caught:
                self.parse(f'\n\n<Gateway host="gw2" port="1" webSocketPath="{bad}"/>',
                           'useSsl="true"')
            message = str(caught.exception)
            self.assertTrue(message.startswith(
                "/tmp/x.xml:3: <Gateway> attribute 'webSocketPath': expected a URL path "
                "starting with /"), message)
            self.assertIn('or "" for none', message)
            self.assertIn(repr(bad), message)
        with self.assertRaises(ConfigError) as caught:
            self.parse("", 'useSsl="true" webSocketPath=""')
        self.assertIn("<Instance> attribute 'webSocketPath': expected a URL path",
                      str(caught.exception))

    def test_draining_code(self) -> None:
        """GOAWAY DRAINING is 13, after BUSY."""
        self.assertEqual(int(fr.GoAway.DRAINING), 13)
        self.assertEqual(fr.GoAway.parse(13), fr.GoAway.DRAINING)


class SigUsr2Tests(SynchronousTestCase):
    """What SIGUSR2 reaches: TunnelService.drain."""

    def test_drains_gateways_only(self) -> None:
        """Every Gateway instance of the process drains; a proxy instance is untouched."""
        from twisted.internet.testing import MemoryReactorClock

        from tcptunnel.gateway import GatewayService
        from tcptunnel.proxy import ProxyService
        from tcptunnel.tap import TunnelService

        xml = (f'<Settings xmlns="{NAMESPACE}"><Instance type="gateway">'
               '<Listener ip="127.0.0.1" port="0"/><Session id="1" '
               'proxyClientPassword="aaaaaaaaaaaa" proxyServerPassword="bbbbbbbbbbbb"/>'
               '</Instance><Instance type="proxy-client" host="127.0.0.1" port="9">'
               '<Session id="1" password="aaaaaaaaaaaa"/></Instance></Settings>')
        tunnel = TunnelService(parse_settings(xml.encode(), "/tmp/x.xml"),
                               MemoryReactorClock())
        tunnel.drain()
        gateways = [c for c in tunnel if isinstance(c, GatewayService)]
        self.assertEqual([g.gateway.draining for g in gateways], [True])
        self.assertTrue(any(isinstance(c, ProxyService) for c in tunnel))
