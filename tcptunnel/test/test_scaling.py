"""More than one Gateway (issue 20), in one process on loopback: a proxy's ``<Gateway>``
failover list (first down: the next; first back: back to it) and draining (sessions move
whole to the next Gateway once their streams end; running streams finish)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel import _frames as fr
from tcptunnel.config import NAMESPACE, ConfigError, ProxyConfig, parse_settings
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.test._harness import (
    EchoProtocol,
    Tunnel,
    binding_port,
    reserve_port,
    wait_until,
)


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
    whose list is A then B, and an echo target."""

    def __init__(self, test: TestCase) -> None:
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
            '<Session id="1" password="client-pw"/><AllowedTargetEndpoints>'
            f'<Endpoint host="127.0.0.1" port="{echo_port}"/></AllowedTargetEndpoints>'))
        self.server = self.b._start_proxy(ProxyServerService, proxy_xml(
            "proxy-server", self.a_port, fallbacks,
            '<Session id="1" password="server-pw"><Binding listenIp="127.0.0.1" '
            f'listenPort="0" targetHost="127.0.0.1" targetPort="{echo_port}"/></Session>'))
        for proxy in (self.client, self.server):
            proxy.failback_interval = 0.3  # 30 s in production; the mechanism is the same

    def on(self, gateway: Tunnel) -> bool:
        """Whether both proxies are logged in to ``gateway`` and see each other."""
        service = gateway.gateway
        return (service is not None and len(service.gateway.links) == 2
                and self.client.partner_available and self.server.partner_available)

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
    """A Gateway told to drain."""

    async def test_drain_moves_after_streams_end(self) -> None:
        """Draining the first Gateway closes its listener; the session, whose stream is
        running, stays until that stream ends (it keeps echoing, and ends cleanly), then
        moves to the second Gateway at once (GOAWAY DRAINING) and works there."""
        fixture = Fixture(self)
        fixture.a.start_gateway(fixture.a_port)
        await wait_until(lambda: fixture.on(fixture.a), 15, "both proxies on the first")
        echoer = await fixture.talk()
        gateway_a = fixture.a.gateway
        assert gateway_a is not None
        await gateway_a.drain()
        self.assertTrue(gateway_a.gateway.draining)
        self.assertEqual(gateway_a.ports, [])
        # The running stream still works.
        echoer.transport.write(b" again")  # type: ignore[union-attr]
        await wait_until(lambda: echoer.received == b"hello again", 10, "the echo while draining")
        self.assertEqual(len(gateway_a.gateway.links), 2)
        echoer.transport.loseConnection()  # type: ignore[union-attr]
        await wait_until(lambda: echoer.ended is not None, 10, "the stream to end")
        self.assertEqual(echoer.ended, "ConnectionDone")
        started = reactor.seconds()
        await wait_until(lambda: fixture.on(fixture.b), 10, "both proxies on the second")
        # At once: the drain check (0.25 s) plus a reconnect without backoff (1 s otherwise).
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertEqual(fixture.client.stats["links_lost",], 1)
        again = await fixture.talk()
        again.transport.loseConnection()  # type: ignore[union-attr]

    async def test_drain_deadline(self) -> None:
        """A stream still running at drainTimeout is reset and the session moves."""
        fixture = Fixture(self)
        fixture.a.gateway_attributes = 'drainTimeout="0.5"'
        fixture.a.start_gateway(fixture.a_port)
        await wait_until(lambda: fixture.on(fixture.a), 15, "both proxies on the first")
        echoer = await fixture.talk()
        assert fixture.a.gateway is not None
        await fixture.a.gateway.drain()
        await wait_until(lambda: echoer.ended is not None, 10, "the stream to be reset")
        self.assertNotEqual(echoer.ended, "ConnectionDone")
        await wait_until(lambda: fixture.on(fixture.b), 10, "both proxies on the second")


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
