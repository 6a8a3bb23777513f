"""Tests for links through outbound proxies: the HTTP CONNECT and SOCKS5 clients, the wrapping
factory, and real tunnels through Debian's tinyproxy and microsocks."""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any
from unittest.mock import Mock

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tcptunnel._outbound import (
    MAX_HTTP_HEAD,
    HttpConnectClient,
    OutboundProxyError,
    ProxyUrl,
    Socks5Client,
    parse_proxy_url,
    proxy_from_environment,
)
from tcptunnel.config import ConfigError
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.test._harness import (
    NS,
    ChildProcess,
    EchoProtocol,
    Tunnel,
    binding_port,
    connect,
    listen,
    reserve_port,
    wait_until,
)

HTTP = ProxyUrl("http", "proxy.example", 3128)
SOCKS = ProxyUrl("socks5", "127.0.0.1", 1080, "user", "pa:ss")


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated, within bounds)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


async def assert_echo(test: TestCase, ps: Any) -> None:
    """A stream through the Proxy-Server's Binding to the echo target: exact bytes back, a
    clean end."""
    client = await connect(binding_port(ps))
    client.transport.write(b"through the outbound proxy")
    client.transport.loseWriteConnection()
    test.assertEqual(await client.ended, "clean")
    test.assertEqual(bytes(client.received), b"through the outbound proxy")


async def fail_over_and_back(test: TestCase, proxy_attribute: str,
                             tunnels: tuple[type[Tunnel], type[Tunnel]] | None = None,
                             fallback_attributes: str = "") -> None:
    """Both proxies, TLS (over this module's ``Tunnel``: a WebSocket one in test_websocket,
    or the ``tunnels`` given for A and B) and ``proxy_attribute`` (an outbound proxy, or
    none), with Gateway A (down) first in their list and B second (its <Gateway> entry with
    ``fallback_attributes``): they log in to B and a stream works; A starts: the failback
    probes (through the outbound proxy too) find it, both proxies move back to A, and a
    stream works there."""
    echo = await listen(test, EchoProtocol)
    first, second = tunnels if tunnels is not None else (Tunnel, Tunnel)
    a, b = first(test, tls=True), second(test, tls=True)
    b.certs = a.certs  # one certificate (and caFile) for both Gateways
    test.addCleanup(a.close)
    test.addCleanup(b.close)  # first: it stops the proxies too
    a.gateway_port = reserve_port(test)
    b.start_gateway()
    attributes = a._proxy_attributes(proxy_attribute)  # host and port: A's
    fallback = (f'<Gateway host="127.0.0.1" port="{b.gateway_port}" serverName="localhost" '
                f"{fallback_attributes}/>")
    pc = b._start_proxy(ProxyClientService, (
        f'<Instance type="proxy-client" {attributes}>{fallback}'
        '<Session id="1" password="client-pw"/></Instance>'))
    ps = b._start_proxy(ProxyServerService, (
        f'<Instance type="proxy-server" {attributes}>{fallback}<Session id="1" '
        f'password="server-pw"><Binding listenIp="127.0.0.1" listenPort="0" '
        f'targetHost="127.0.0.1" targetPort="{echo}"/></Session></Instance>'))
    for proxy in (pc, ps):
        proxy.failback_interval = 0.3  # 30 s in production; the mechanism is the same

    def on(tunnel: Tunnel) -> bool:
        gateway = tunnel.gateway
        return (gateway is not None and len(gateway.gateway.links) == 2
                and pc.partner_available and ps.partner_available)

    await wait_until(lambda: on(b), 20, "both proxies on the second Gateway")
    test.assertEqual((pc.target_index, ps.target_index), (1, 1))
    await assert_echo(test, ps)
    a.start_gateway(a.gateway_port)
    await wait_until(lambda: on(a), 20, "both proxies back on the first Gateway")
    test.assertEqual((pc.target_index, ps.target_index), (0, 0))
    assert b.gateway is not None
    test.assertEqual(len(b.gateway.gateway.links), 0)
    await assert_echo(test, ps)


class ProxyUrlTests(SynchronousTestCase):
    """httpProxy / socksProxy values and the proxy environment."""

    def test_urls(self) -> None:
        """User, password (percent-escaped), IPv6 hosts and default ports are read; other
        schemes, paths and missing hosts are refused with the reason."""
        url = parse_proxy_url("http://u%3Ax:p%40ss@[2001:db8::1]:3128", "http")
        self.assertEqual((url.host, url.port, url.username, url.password),
                         ("2001:db8::1", 3128, "u:x", "p@ss"))
        self.assertEqual(url.describe(), "http://[2001:db8::1]:3128")
        self.assertNotIn("p@ss", repr(url))
        self.assertEqual(parse_proxy_url("socks5h://h", "socks5").port, 1080)
        self.assertEqual(parse_proxy_url("http://h", "http").port, 8080)
        for text, kind, needle in [("socks5://h:1", "http", "http://"),
                                   ("http://h:1", "socks5", "socks5://"),
                                   ("http://h:1/path", "http", "no path"),
                                   ("http://:1", "http", "no host"),
                                   ("http://h:99999", "http", "range")]:
            with self.assertRaises(ValueError) as raised:
                parse_proxy_url(text, kind)
            self.assertIn(needle, str(raised.exception))

    def test_environment_and_no_proxy(self) -> None:
        """HTTPS_PROXY (or https_proxy, which wins) names the proxy unless NO_PROXY covers
        the Gateway: names, .suffixes, *, IPs and networks."""
        env = {"HTTPS_PROXY": "proxy:3128", "https_proxy": "http://lower:8000"}
        proxy = proxy_from_environment(env, "gw.example.org")
        assert proxy is not None
        self.assertEqual((proxy.host, proxy.port), ("lower", 8000))
        self.assertIsNone(proxy_from_environment({}, "gw.example.org"))
        for no_proxy, host, exempt in [("example.org", "gw.example.org", True),
                                       (".example.org", "gw.example.org", True),
                                       ("example.org", "badexample.org", False),
                                       ("*", "anything", True),
                                       ("10.0.0.0/8", "10.1.2.3", True),
                                       ("10.0.0.0/8", "11.1.2.3", False),
                                       ("::1", "::1", True)]:
            result = proxy_from_environment({"HTTPS_PROXY": "p:1", "NO_PROXY": no_proxy}, host)
            self.assertEqual(result is None, exempt, (no_proxy, host))
        with self.assertRaises(ValueError) as raised:
            proxy_from_environment({"HTTPS_PROXY": "http://p:x"}, "gw")
        self.assertIn("HTTPS_PROXY", str(raised.exception))

    def test_config_attributes(self) -> None:
        """httpProxy and socksProxy are read into the proxy's settings; both at once, or a
        bad URL, is an error naming the attribute."""
        from tcptunnel.config import parse_settings

        def instance(attributes: str) -> Any:
            return parse_settings(
                f'<Settings {NS}><Instance type="proxy-client" host="gw" port="1" {attributes}>'
                '<Session id="1" password="x"/></Instance></Settings>'.encode()).instances[0]

        self.assertEqual(instance('socksProxy="socks5://127.0.0.1:9"').outbound_proxy,
                         ProxyUrl("socks5", "127.0.0.1", 9))
        self.assertIsNone(instance("").outbound_proxy)
        with self.assertRaises(ConfigError) as raised:
            instance('httpProxy="http://a:1" socksProxy="socks5://b:2"')
        self.assertIn("only one", str(raised.exception))
        with self.assertRaises(ConfigError) as raised:
            instance('httpProxy="ftp://a:1"')
        self.assertIn("httpProxy", str(raised.exception))


class HttpConnectClientTests(SynchronousTestCase):
    """The HTTP CONNECT handshake."""

    def test_request(self) -> None:
        """The request names the Gateway (IPv6 in brackets) and carries Basic credentials."""
        request = HttpConnectClient(ProxyUrl("http", "p", 1, "Aladdin", "open sesame"),
                                    "2001:db8::7", 443).start()
        self.assertTrue(request.startswith(b"CONNECT [2001:db8::7]:443 HTTP/1.1\r\n"))
        self.assertIn(b"Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n", request)
        self.assertTrue(request.endswith(b"\r\n\r\n"))

    @given(st.lists(st.integers(0, 200), max_size=6))
    @settings(max_examples=200)
    def test_answer_in_any_split(self, cuts: list[int]) -> None:
        """However the answer is cut, the tunnel opens once the head is complete, and bytes
        after it are kept for the tunnel."""
        answer = b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nTcpTnl\r\n"
        client = HttpConnectClient(HTTP, "gw", 443)
        pieces = splits(answer, cuts)
        while not client.done:
            client.receive(pieces.pop(0))
        # What came with the end of the head is kept; later bytes go to the tunnel itself.
        self.assertEqual(client.leftover + b"".join(pieces), b"TcpTnl\r\n")

    def test_refusals_say_what_the_proxy_answered(self) -> None:
        """407, 403 and 502 are errors with the status and a hint; garbage and an endless
        head are errors too."""
        for answer, needle in [(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                                "407 Proxy Authentication Required (the proxy wants a user"),
                               (b"HTTP/1.0 403 Forbidden\r\n\r\n", "not allow this destination"),
                               (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "could not reach"),
                               (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP")]:
            with self.assertRaises(OutboundProxyError) as raised:
                HttpConnectClient(HTTP, "gw", 443).receive(answer)
            self.assertIn(needle, str(raised.exception))
            self.assertIn("http://proxy.example:3128", str(raised.exception))
        client = HttpConnectClient(HTTP, "gw", 443)
        with self.assertRaises(OutboundProxyError):
            for _ in range(MAX_HTTP_HEAD // 1000 + 2):
                client.receive(b"X" * 1000)


class Socks5ClientTests(SynchronousTestCase):
    """The SOCKS5 handshake."""

    def run_handshake(self, client: Socks5Client, server_bytes: list[bytes]) -> list[bytes]:
        sent = [client.start()]
        for piece in server_bytes:
            out = client.receive(piece)
            if out:
                sent.append(out)
        return sent

    def test_name_with_password(self) -> None:
        """With credentials: methods 0 and 2, RFC 1929 login, then CONNECT by name (the
        proxy resolves it); bytes after the reply belong to the tunnel."""
        client = Socks5Client(SOCKS, "gw.example", 443)
        sent = self.run_handshake(client, [b"\x05\x02", b"\x01\x00",
                                           b"\x05\x00\x00\x01\x7f\x00\x00\x01\x01\xbbTcp"])
        self.assertEqual(sent, [b"\x05\x02\x00\x02", b"\x01\x04user\x05pa:ss",
                                b"\x05\x01\x00\x03\x0agw.example\x01\xbb"])
        self.assertTrue(client.done)
        self.assertEqual(client.leftover, b"Tcp")

    def test_ip_literals(self) -> None:
        """IPv4 and IPv6 Gateways are sent as addresses, not names."""
        for host, atyp, packed in [("192.0.2.1", b"\x01", bytes([192, 0, 2, 1])),
                                   ("2001:db8::1", b"\x04", bytes.fromhex(
                                       "20010db8000000000000000000000001"))]:
            client = Socks5Client(ProxyUrl("socks5", "p", 1), host, 80)
            sent = self.run_handshake(client, [b"\x05\x00"])
            self.assertEqual(sent[1], b"\x05\x01\x00" + atyp + packed + b"\x00\x50")

    @given(st.lists(st.integers(0, 40), max_size=8))
    @settings(max_examples=200)
    def test_any_split(self, cuts: list[int]) -> None:
        """However the proxy's bytes are cut, the same requests go out and the tunnel opens
        with the same leftover (an IPv6 bound address in the reply)."""
        reply = (b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x04" + bytes(16) + b"\x00\x01"
                 + b"rest")
        client = Socks5Client(SOCKS, "gw.example", 443)
        pieces = splits(reply, cuts)
        out = client.start()
        while not client.done:
            out += client.receive(pieces.pop(0))
        self.assertEqual(out, b"\x05\x02\x00\x02\x01\x04user\x05pa:ss"
                              b"\x05\x01\x00\x03\x0agw.example\x01\xbb")
        self.assertEqual(client.leftover + b"".join(pieces), b"rest")

    def test_failures(self) -> None:
        """Refused methods, a wrong password and each CONNECT failure are errors that name
        what the proxy said."""
        cases = [([b"\x05\xff"], "accepts none", ProxyUrl("socks5", "p", 1)),
                 ([b"\x05\x02", b"\x01\x01"], "refused the user name and password", SOCKS),
                 ([b"\x05\x00", b"\x05\x05\x00\x01" + bytes(6)], "connection refused", SOCKS),
                 ([b"\x05\x00", b"\x05\x02\x00\x01" + bytes(6)], "not allowed by ruleset",
                  SOCKS),
                 ([b"\x04\x00"], "does not speak SOCKS5", SOCKS)]
        for answers, needle, proxy in cases:
            client = Socks5Client(proxy, "gw", 1)
            with self.assertRaises(OutboundProxyError) as raised:
                self.run_handshake(client, answers)
            self.assertIn(needle, str(raised.exception))


class RealProxyTests(TestCase):
    """Links through Debian's tinyproxy (HTTP CONNECT) and microsocks (SOCKS5), over TLS: the
    Gateway's certificate is still verified against its name inside the tunnel."""

    timeout = 60

    def run_daemon(self, argv: list[str]) -> None:
        if shutil.which(argv[0]) is None and not os.path.exists(f"/usr/bin/{argv[0]}"):
            raise SkipTest(f"{argv[0]} is not installed (Debian package {argv[0]}; `make test` "
                           "installs it when run as root): this test could not run")
        daemon = ChildProcess()
        reactor.spawnProcess(daemon, shutil.which(argv[0]) or f"/usr/bin/{argv[0]}", argv,
                             env=dict(os.environ))
        self.addCleanup(daemon.kill)

    def tinyproxy(self, credentials: tuple[str, str] | None = None) -> int:
        port = reserve_port(self)
        path = os.path.abspath(self.mktemp())
        lines = [f"Port {port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "MaxClients 20",
                 # No ConnectPort line: CONNECT to any port (the Gateway's is not 443).
                 "LogLevel Info", "DisableViaHeader Yes"]
        if os.getuid() == 0:
            lines += ["User nobody", "Group nogroup"]
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.run_daemon(["tinyproxy", "-d", "-c", path])
        return port

    def microsocks(self, credentials: tuple[str, str] | None = None) -> int:
        port = reserve_port(self)
        argv = ["microsocks", "-i", "127.0.0.1", "-p", str(port)]
        if credentials is not None:
            argv += ["-u", credentials[0], "-P", credentials[1]]
        self.run_daemon(argv)
        return port

    async def wait_listening(self, port: int) -> None:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        await wait_until(listening, 15, f"the outbound proxy to listen on {port}")

    async def tunnel_through(self, proxy_attribute: str) -> tuple[Tunnel, Any, Any]:
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self, tls=True)
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client(extra=proxy_attribute)
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)], extra=proxy_attribute)
        return tunnel, pc, ps

    async def test_tinyproxy_with_authentication(self) -> None:
        """Both proxies reach a TLS Gateway through tinyproxy with Basic authentication, and a
        stream tunnels end to end."""
        port = self.tinyproxy(("tunnel", "s3cret"))
        await self.wait_listening(port)
        _tunnel, pc, ps = await self.tunnel_through(
            f'httpProxy="http://tunnel:s3cret@127.0.0.1:{port}"')
        await _tunnel.ready(pc, ps)
        await assert_echo(self, ps)

    async def test_tinyproxy_wrong_password_is_reported(self) -> None:
        """A wrong proxy password is logged as the proxy's refusal, with the hint to check the
        credentials (tinyproxy answers 401 where RFC 9110 says 407), and retried."""
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, events.append)  # type: ignore[arg-type]
        port = self.tinyproxy(("tunnel", "s3cret"))
        await self.wait_listening(port)
        await self.tunnel_through(f'httpProxy="http://tunnel:wrong@127.0.0.1:{port}"')

        def reported() -> bool:
            return sum("check the user name and password in httpProxy" in str(e.get("why", ""))
                       for e in events) >= 2  # two tries: it is retried

        await wait_until(reported, 15, "the refusal to be logged, twice")

    async def test_microsocks_with_authentication(self) -> None:
        """Both proxies reach a TLS Gateway through microsocks with a user name and password
        (the Gateway's name resolved by the SOCKS proxy), and a stream tunnels end to end."""
        port = self.microsocks(("tunnel", "s3cret"))
        await self.wait_listening(port)
        _tunnel, pc, ps = await self.tunnel_through(
            f'socksProxy="socks5://tunnel:s3cret@127.0.0.1:{port}"')
        await _tunnel.ready(pc, ps)
        await assert_echo(self, ps)

    async def test_failback_through_tinyproxy(self) -> None:
        """Failover and failback with the link and the failback probe through tinyproxy
        (HTTP CONNECT)."""
        port = self.tinyproxy()
        await self.wait_listening(port)
        await fail_over_and_back(self, f'httpProxy="http://127.0.0.1:{port}"')

    async def test_failback_through_microsocks(self) -> None:
        """Failover and failback with the link and the failback probe through microsocks
        (SOCKS5, with a password)."""
        port = self.microsocks(("tunnel", "s3cret"))
        await self.wait_listening(port)
        await fail_over_and_back(self, f'socksProxy="socks5://tunnel:s3cret@127.0.0.1:{port}"')


class FailbackProbeTests(SynchronousTestCase):
    """The failback probe of a proxy with an outbound proxy goes through it: the first
    Gateway is asked by a CONNECT through the outbound proxy, never by a direct connect."""

    def setUp(self) -> None:
        from tcptunnel.config import parse_settings
        from tcptunnel.proxyclient import ProxyClientService

        config: Any = parse_settings(
            f'<Settings {NS}><Instance type="proxy-client" host="gw1.test" port="7001" '
            'httpProxy="http://127.0.0.1:3128"><Gateway host="gw2.test" port="7002"/>'
            '<Session id="1" password="x"/></Instance></Settings>'.encode()).instances[0]
        self.reactor = MemoryReactorClock()
        self.proxy = ProxyClientService(config, self.reactor)
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        # The first Gateway fails (the outbound proxy refused the CONNECT): the second next.
        self.proxy.factory.clientConnectionFailed(Mock(), Failure(ConnectionRefusedError()))
        self.assertEqual(self.proxy.target_index, 1)
        self.proxy._schedule_failback()  # as a login to the second Gateway does
        self.reactor.advance(self.proxy.failback_interval)

    def probe(self) -> tuple[Any, StringTransport]:
        """The probe's connection: (its factory, the transport its protocol got)."""
        from tcptunnel.outbound import ProxiedClientFactory

        connection: Any = self.reactor.tcpClients[-1]
        host, port, factory, _timeout, _bind = connection
        self.assertEqual((host, port), ("127.0.0.1", 3128))  # to the outbound proxy
        self.assertIsInstance(factory, ProxiedClientFactory)
        self.assertEqual((factory.host, factory.port), ("gw1.test", 7001))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value().split(b"\r\n")[0],
                         b"CONNECT gw1.test:7001 HTTP/1.1")
        return protocol, transport

    def test_tunnel_opened_moves_back(self) -> None:
        """The outbound proxy opens the tunnel to the first Gateway: the probe closes it at
        once and the next link goes to the first Gateway."""
        protocol, transport = self.probe()
        protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.proxy.target_index, 0)

    def test_refused_asks_again_later(self) -> None:
        """The outbound proxy answers 502 (the first Gateway refused it): the proxy stays
        on the second and probes again one interval later, through the outbound proxy."""
        protocol, transport = self.probe()
        protocol.dataReceived(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        factory: Any = self.reactor.tcpClients[-1][2]
        factory.clientConnectionLost(Mock(), Failure(ConnectionDone()))
        self.assertEqual(self.proxy.target_index, 1)
        before = len(self.reactor.tcpClients)
        self.reactor.advance(self.proxy.failback_interval)
        self.assertEqual(len(self.reactor.tcpClients), before + 1)
        self.probe()
