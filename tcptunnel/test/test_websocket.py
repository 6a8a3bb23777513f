"""Tests for WebSocket links (issue 19): request routing and X-Forwarded-For (pure), the
adapter transport, the end-to-end tests of test_endtoend over ws:// and wss://, the plain
web server everyone else sees (404), ALPN for browser-like clients, and Debian's nginx in
front of a plain WebSocket Listener."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import ProcessProtocol
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tcptunnel._websocket import (
    BAD_REQUEST,
    HEAD_TOO_LARGE,
    NOT_FOUND,
    forwarded_client,
    parse_networks,
    parse_request_head,
    route_request,
)
from tcptunnel.config import ConfigError, parse_settings
from tcptunnel.test._harness import (
    NS,
    EchoProtocol,
    Tunnel,
    binding_port,
    connect,
    listen,
    reserve_port,
    wait_until,
)
from tcptunnel.test.test_endtoend import TunnelTestsMixin

UPGRADE = (b"GET /tunnel HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\n"
           b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


class RouteRequestTests(SynchronousTestCase):
    """Which requests a WebSocket Listener upgrades (the rest get a plain answer)."""

    def test_upgrade_on_the_path(self) -> None:
        """A GET with Upgrade: websocket and Connection: upgrade on the path goes on to the
        handshake; a query string does not change the path."""
        request, response = route_request(UPGRADE, "/tunnel")
        self.assertIsNone(response)
        assert request is not None
        self.assertEqual(request.header("host"), "gw.example")
        self.assertIsNone(route_request(UPGRADE.replace(b"/tunnel", b"/tunnel?x=1"),
                                        "/tunnel")[1])

    def test_everything_else_is_404(self) -> None:
        """Another path, a plain GET, a POST, a missing Connection: upgrade: 404; garbage
        (TLS bytes on a plain Listener, a non-HTTP line) is 400."""
        for head in [UPGRADE.replace(b"/tunnel", b"/"),
                     UPGRADE.replace(b"/tunnel", b"/tunnelx"),
                     b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n",
                     UPGRADE.replace(b"GET", b"POST"),
                     UPGRADE.replace(b"keep-alive, Upgrade", b"keep-alive")]:
            self.assertEqual(route_request(head, "/tunnel")[1], NOT_FOUND, head)
        for head in [b"\x16\x03\x01\x02\x00\x01\r\n\r\n", b"SSH-2.0-x\r\n\r\n",
                     b"GET /tunnel\r\n\r\n", "GET /é HTTP/1.1\r\n\r\n".encode()]:
            self.assertEqual(route_request(head, "/tunnel")[1], BAD_REQUEST, head)
        self.assertTrue(NOT_FOUND.startswith(b"HTTP/1.1 404 Not Found\r\n"))
        self.assertTrue(HEAD_TOO_LARGE.startswith(b"HTTP/1.1 431 "))

    @given(st.binary(max_size=300))
    @settings(max_examples=500)
    def test_any_bytes(self, head: bytes) -> None:
        """Any bytes give an answer or an upgrade, never an exception."""
        request, response = route_request(head + b"\r\n\r\n", "/tunnel")
        self.assertTrue(response in (NOT_FOUND, BAD_REQUEST) or request is not None)

    def test_repeated_headers_join(self) -> None:
        """Repeated headers are one comma-separated value (X-Forwarded-For from two
        proxies)."""
        head = parse_request_head(b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\n"
                                  b"x-forwarded-for: 2.2.2.2\r\n\r\n")
        self.assertEqual(head.header("x-forwarded-for"), "1.1.1.1,2.2.2.2")


class ForwardedForTests(SynchronousTestCase):
    """X-Forwarded-For is believed only from trusted proxies."""

    trusted = parse_networks("127.0.0.1/32, 10.0.0.0/8, ::1")

    def test_untrusted_peer(self) -> None:
        """A peer outside the trusted networks cannot claim an address."""
        self.assertIsNone(forwarded_client("192.0.2.9", "203.0.113.7", self.trusted))
        self.assertIsNone(forwarded_client("127.0.0.1", None, self.trusted))

    def test_trusted_chain_is_read_from_the_right(self) -> None:
        """Trusted proxies are skipped from the right; the first other address is the
        client, whatever the client wrote to its left; only trusted hops give the
        leftmost; garbage stops the walk."""
        self.assertEqual(forwarded_client("127.0.0.1", "203.0.113.7", self.trusted),
                         "203.0.113.7")
        self.assertEqual(forwarded_client("127.0.0.1", "6.6.6.6, 203.0.113.7, 10.1.1.1",
                                          self.trusted), "203.0.113.7")
        self.assertEqual(forwarded_client("::1", "10.2.2.2, 10.1.1.1", self.trusted),
                         "10.2.2.2")
        self.assertEqual(forwarded_client("::ffff:127.0.0.1", "[2001:db8::5]:4711",
                                          self.trusted), "2001:db8::5")
        self.assertEqual(forwarded_client("127.0.0.1", "unknown, 203.0.113.7:80",
                                          self.trusted), "203.0.113.7")
        self.assertIsNone(forwarded_client("127.0.0.1", "unknown", self.trusted))

    def test_networks(self) -> None:
        """Addresses and networks, host bits allowed; a bad entry is named."""
        self.assertEqual(parse_networks("10.1.2.3/8,::1"),
                         (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")))
        with self.assertRaises(ValueError) as raised:
            parse_networks("10.0.0.0/8, localhost")
        self.assertIn("'localhost'", str(raised.exception))


class ConfigTests(SynchronousTestCase):
    """webSocketPath and trustedProxies in the settings."""

    def parse(self, instance: str) -> Any:
        return parse_settings(f"<Settings {NS}>{instance}</Settings>".encode()).instances[0]

    def gateway(self, attributes: str) -> Any:
        return self.parse(f'<Instance type="gateway"><Listener port="1" {attributes}/>'
                          '<Session id="1" proxyClientPassword="a" proxyServerPassword="b"/>'
                          "</Instance>")

    def test_listener(self) -> None:
        """A Listener's path and trusted proxies are read; trustedProxies alone, a path
        without its slash or with a query are errors naming the attribute."""
        listener = self.gateway('webSocketPath="/tunnel" trustedProxies="127.0.0.1"'
                                ).listeners[0]
        self.assertEqual(listener.websocket_path, "/tunnel")
        self.assertEqual(listener.trusted_proxies, (ipaddress.ip_network("127.0.0.1/32"),))
        self.assertIsNone(self.gateway("").listeners[0].websocket_path)
        for attributes, needle in [('trustedProxies="127.0.0.1"', "needs webSocketPath"),
                                   ('webSocketPath="tunnel"', "webSocketPath"),
                                   ('webSocketPath="/t?x=1"', "webSocketPath"),
                                   ('webSocketPath="/t" trustedProxies="x"', "trustedProxies")]:
            with self.assertRaises(ConfigError) as raised:
                self.gateway(attributes)
            self.assertIn(needle, str(raised.exception))

    def test_proxy(self) -> None:
        """A proxy's path is read; serverName is allowed without useSsl on a WebSocket link
        (it is the Host header), and still refused on a plain one."""
        config = self.parse('<Instance type="proxy-client" host="gw" port="1" '
                            'webSocketPath="/ws" serverName="gw.example">'
                            '<Session id="1" password="x"/></Instance>')
        self.assertEqual((config.websocket_path, config.server_name), ("/ws", "gw.example"))
        with self.assertRaises(ConfigError):
            self.parse('<Instance type="proxy-client" host="gw" port="1" '
                       'serverName="gw.example"><Session id="1" password="x"/></Instance>')


class _FakeWebSocket:
    """Just what WebSocketLinkTransport reads of its WebSocket."""

    def __init__(self) -> None:
        from autobahn.websocket.protocol import WebSocketProtocol

        self.transport = StringTransport()
        self.state = WebSocketProtocol.STATE_OPEN
        self.sent: list[bytes] = []
        self.closed: list[int] = []

    def sendMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        assert isBinary
        self.sent.append(payload)

    def sendClose(self, code: int) -> None:  # noqa: N802
        self.closed.append(code)


class AdapterTests(SynchronousTestCase):
    """WebSocketLinkTransport: what the link protocol runs on."""

    def test_flow_control_passes_through(self) -> None:
        """The link's producer is registered on the socket beneath, so a full socket
        pauses it; reads pause and resume the socket; a flush is one binary message;
        loseConnection is a close frame, then nothing more is sent."""
        from tcptunnel.websocket import WebSocketLinkTransport

        websocket = _FakeWebSocket()
        transport = WebSocketLinkTransport(websocket)
        producer = object()
        transport.registerProducer(producer, True)
        self.assertIs(websocket.transport.producer, producer)
        self.assertTrue(websocket.transport.streaming)
        transport.unregisterProducer()
        self.assertIsNone(websocket.transport.producer)
        transport.pauseProducing()
        self.assertEqual(websocket.transport.producerState, "paused")
        transport.resumeProducing()
        self.assertEqual(websocket.transport.producerState, "producing")
        transport.writeSequence([b"ab", b"cd"])
        self.assertEqual(websocket.sent, [b"abcd"])
        self.assertEqual(transport.getPeer(), websocket.transport.getPeer())
        self.assertIs(transport.transport, websocket.transport)
        transport.loseConnection()
        transport.write(b"late")
        self.assertEqual((websocket.sent, websocket.closed), ([b"abcd"], [1000]))
        transport.abortConnection()
        self.assertTrue(websocket.transport.disconnecting)


class WebSocketTunnel(Tunnel):
    """A Tunnel whose Listener takes WebSockets on /tunnel and whose proxies use them."""

    path = "/tunnel"
    listener_extra = ""

    def gateway_xml(self, port: int) -> str:
        """The Listener with webSocketPath (and what ``listener_extra`` adds)."""
        xml = super().gateway_xml(port)
        return xml.replace("<Listener ", f'<Listener webSocketPath="{self.path}" '
                           f"{self.listener_extra} ", 1)

    def _proxy_attributes(self, extra: str) -> str:
        return f'{super()._proxy_attributes(extra)} webSocketPath="{self.path}"'


class WebSocketTunnelTestsMixin(TunnelTestsMixin):
    """test_endtoend's tests with the link as a WebSocket."""

    def make_tunnel(self) -> Tunnel:
        tunnel = WebSocketTunnel(self, tls=self.tls)  # type: ignore[arg-type]
        self.addCleanup(tunnel.close)  # type: ignore[attr-defined]
        tunnel.start_gateway()
        return tunnel

    async def test_bulk_5mb_each_way_at_once(self) -> None:
        """5 MB each way at the same time (the target writes its own 5 MB while reading):
        both arrive exact; both links saw WebSocket traffic."""
        from tcptunnel.test._harness import RecordingClient

        blob = os.urandom(5 * 1024 * 1024)

        class Sender(EchoProtocol):
            def connectionMade(self) -> None:  # noqa: N802
                self.got = hashlib.sha256()
                self.transport.write(blob)  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:  # noqa: N802
                self.got.update(data)

            def readConnectionLost(self) -> None:  # noqa: N802
                self.transport.write(self.got.hexdigest().encode())  # type: ignore[union-attr]
                self.transport.loseWriteConnection()  # type: ignore[union-attr]

        target = await listen(self, Sender)  # type: ignore[arg-type]
        tunnel = self.make_tunnel()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", target)])
        await tunnel.ready(pc, ps)
        client: RecordingClient = await connect(binding_port(ps))
        upload = os.urandom(5 * 1024 * 1024)
        client.transport.write(upload)
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")  # type: ignore[attr-defined]
        received = bytes(client.received)
        self.assertEqual(received[:len(blob)], blob)  # type: ignore[attr-defined]
        self.assertEqual(received[len(blob):].decode(),  # type: ignore[attr-defined]
                         hashlib.sha256(upload).hexdigest())
        from tcptunnel.websocket import WebSocketLinkTransport

        for proxy in (pc, ps):
            self.assertIsInstance(proxy.link.transport,  # type: ignore[attr-defined]
                                  WebSocketLinkTransport)


class WsTunnelTests(WebSocketTunnelTestsMixin, TestCase):
    """End to end over ws:// (a plain WebSocket Listener)."""

    timeout = 60


class WssTunnelTests(WebSocketTunnelTestsMixin, TestCase):
    """End to end over wss:// (TLS, then WebSocket)."""

    tls = True
    timeout = 60
