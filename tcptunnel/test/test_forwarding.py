"""Forwarding beyond one fixed target (issue 17): socks5 and http-connect Bindings, the
Proxy-Client's allow-list rules, and PROXY protocol headers to targets.

Two layers.  The unit layer drives a Proxy-Server's RequestBindingConnection and a
Proxy-Client's stream requests over StringTransport and MemoryReactorClock, with the
hand-driven Gateway of test_proxyunits: what OPEN carries, when the client hears its reply,
the handshake deadline, the header before early data, checkResolvedAddresses.  The real
layer runs whole tunnels on loopback and drives them with programs nobody here wrote:
``curl --socks5-hostname``, ``curl -x`` (-p), ``ssh`` with ``nc -X 5`` as its ProxyCommand,
and Debian's nginx and HAProxy as targets that read the PROXY header and log the client's
address.  Each program missing is a skip that says how to install it (``make test`` does).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel import _frames as fr
from tcptunnel._frames import FrameType, Reason
from tcptunnel._httpconnect import MAX_HEAD_BYTES
from tcptunnel._proxyproto import (
    ClientAddress,
    build_v1,
    build_v2,
    client_address_from_fields,
    encode_client_address,
)
from tcptunnel._socks import MAX_HANDSHAKE_BYTES
from tcptunnel.config import ConfigError, ProxyConfig, parse_settings
from tcptunnel.proxyclient import ProxyClientService, TargetConnection
from tcptunnel.proxyserver import (
    BindingConnection,
    BindingFactory,
    ProxyServerService,
    RequestBindingConnection,
)
from tcptunnel.test._harness import NS, ChildProcess, Tunnel, reserve_port, wait_until
from tcptunnel.test.test_proxyunits import FakeGateway, Logs


def _program(name: str) -> str | None:
    """A program on PATH or in /usr/sbin (where Debian puts daemons)."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


# OpenBSD's nc by its own name: the "nc" alternative may be netcat-traditional, without -X.
CURL, SSH, SSHD, NC = _program("curl"), _program("ssh"), _program("sshd"), _program("nc.openbsd")
SSH_KEYGEN, NGINX, HAPROXY = _program("ssh-keygen"), _program("nginx"), _program("haproxy")
BODY = b"hello from the target\n"
EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "200"))


def _config(role: str, inner: str, extra: str = "") -> ProxyConfig:
    """One proxy instance for session 1 (passwords pc / ps) of a Gateway at 192.0.2.9."""
    password = "pc" if role == "proxy-client" else "ps"
    body = (f'<Session id="1" password="{password}"/>{inner}' if role == "proxy-client"
            else f'<Session id="1" password="{password}">{inner}</Session>')
    settings = parse_settings(
        f'<Settings {NS}><Instance type="{role}" host="192.0.2.9" port="4433" {extra}>'
        f"{body}</Instance></Settings>".encode())
    config = settings.instances[0]
    assert isinstance(config, ProxyConfig)
    return config


def socks_connect(host: str, port: int) -> bytes:
    """A SOCKS5 greeting (no authentication) and a CONNECT to a domain name."""
    name = host.encode()
    return b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + \
        port.to_bytes(2, "big")


# -- settings ---------------------------------------------------------------------------


class SettingsTests(SynchronousTestCase):
    """The Binding types, Endpoint rules and checkResolvedAddresses as the reader takes them."""

    def error(self, role: str, inner: str) -> str:
        """The ConfigError message for one proxy instance."""
        with self.assertRaises(ConfigError) as caught:
            _config(role, inner)
        return str(caught.exception)

    def test_socks5_and_http_connect_bindings(self) -> None:
        """type, username and password are read; the target comes from each request."""
        config = _config("proxy-server",
                         '<Binding type="socks5" listenIp="127.0.0.1" listenPort="1080"/>'
                         '<Binding type="http-connect" listenIp="::1" listenPort="3128" '
                         'username="alice" password="s3cret"/>')
        socks, http = config.bindings
        self.assertEqual((socks.type, socks.target_host, socks.credentials),
                         ("socks5", None, None))
        self.assertEqual((http.type, http.credentials), ("http-connect", ("alice", "s3cret")))
        self.assertEqual(http.describe(), "[::1]:3128 -> the target of each CONNECT request")
        self.assertNotIn("s3cret", repr(http))
        self.assertEqual(config.warnings, ())

    def test_binding_mistakes(self) -> None:
        """A target on a socks5 Binding, none on a tcp one, half a login, a login on a tcp
        Binding, an http-connect user name with ':' and udp on socks5 are each refused,
        naming the attribute."""
        cases = {
            '<Binding type="socks5" listenPort="1" targetHost="t" targetPort="2"/>':
                "attribute 'targetHost': a type=\"socks5\" Binding takes its target from each",
            '<Binding listenPort="1" targetPort="2"/>': "missing required attribute 'targetHost'",
            '<Binding type="socks5" listenPort="1" username="a"/>':
                "attribute 'username': a username needs a password too",
            '<Binding type="socks5" listenPort="1" password="a"/>':
                "attribute 'password': a password needs a username too",
            '<Binding listenPort="1" targetHost="t" targetPort="2" username="a" password="b"/>':
                'username and password apply to type="socks5" and type="http-connect"',
            '<Binding type="http-connect" listenPort="1" username="a:b" password="c"/>':
                "cannot contain ':'",
            '<Binding type="socks5" listenPort="1" username="a" password="' + "p" * 256 + '"/>':
                "password is 1 to 255 bytes",
            '<Binding type="socks5" listenPort="1" protocol="udp"/>': "attribute 'protocol'",
            '<Binding type="socks4" listenPort="1"/>':
                'expected "tcp", "socks5" or "http-connect"',
        }
        for binding, message in cases.items():
            self.assertIn(message, self.error("proxy-server", binding), binding)

    def test_open_proxy_warning(self) -> None:
        """A socks5 Binding beyond loopback without a login is started with a warning."""
        config = _config("proxy-server", '<Binding type="socks5" listenPort="1080"/>')
        (warning,) = config.warnings
        self.assertIn("a socks5 proxy on every address of this machine without username and "
                      "password", warning)

    def test_endpoint_rules(self) -> None:
        """Networks, suffixes, port lists, proxyProtocol and checkResolvedAddresses are read
        into _allow rules; an old single out-of-range port is still dropped with a warning."""
        config = _config("proxy-client", '<AllowedTargetEndpoints checkResolvedAddresses="yes">'
                         '<Endpoint host="192.168.40.0/24" port="22, 8000-8100"/>'
                         '<Endpoint host="*.Corp.Example." port="443" proxyProtocol="v2"/>'
                         '<Endpoint host="t" port="70000"/></AllowedTargetEndpoints>')
        assert config.allowed_targets is not None
        network, suffix = (e.rule for e in config.allowed_targets)
        self.assertEqual((network.kind, str(network.ports)), ("network", "22,8000-8100"))
        self.assertEqual((suffix.kind, suffix.name, suffix.proxy_protocol),
                         ("suffix", "corp.example", "v2"))
        self.assertTrue(config.check_resolved_addresses)
        self.assertIn("port 70000 is no TCP port", config.warnings[0])

    def test_endpoint_mistakes(self) -> None:
        """Bad networks, wildcards, port lists and proxyProtocol values are errors naming
        the attribute."""
        cases = {
            '<Endpoint host="10.0.0.0/33" port="1"/>': "attribute 'host'",
            '<Endpoint host="a.*.example" port="1"/>': "attribute 'host'",
            '<Endpoint host="t" port="22,x"/>': "attribute 'port'",
            '<Endpoint host="t" port="90-80"/>': "attribute 'port'",
            '<Endpoint host="t" port="1" proxyProtocol="v3"/>': "attribute 'proxyProtocol'",
            '<Endpoint host="t" port="1" protocol="udp" proxyProtocol="v1"/>':
                "proxyProtocol applies to tcp Endpoints only",
        }
        for endpoint, message in cases.items():
            self.assertIn(message, self.error(
                "proxy-client", f"<AllowedTargetEndpoints>{endpoint}</AllowedTargetEndpoints>"),
                endpoint)


# -- unit layer: the Proxy-Server --------------------------------------------------------


class RequestBindingTests(SynchronousTestCase):
    """A socks5 / http-connect Binding's connection, with a hand-driven Gateway."""

    def service(self, binding: str) -> ProxyServerService:
        """A Proxy-Server with one Binding (its attributes given)."""
        self.reactor = MemoryReactorClock()
        service = ProxyServerService(_config(
            "proxy-server", f'<Binding listenIp="127.0.0.1" listenPort="1080" {binding}/>'),
            self.reactor)
        self.logs = Logs(self)
        return service

    def accept(self, service: ProxyServerService,
               login: bool = True) -> tuple[BindingConnection, StringTransport, FakeGateway]:
        """A link (logged in, with a partner) and one accepted local client."""
        gateway = FakeGateway(service, "ps")
        if login:
            gateway.login()
        factory = BindingFactory(service, service.config.bindings[0])
        connection = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        local = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 1080),
                                peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        connection.makeConnection(local)
        return connection, local, gateway

    def open_request(self, gateway: FakeGateway) -> tuple[int, fr.OpenRequest]:
        """The one OPEN the Proxy-Server sent."""
        (frame,) = gateway.of_type(FrameType.OPEN)
        return frame.stream_id, fr.parse_open(frame.payload)

    def test_socks_request_opens_a_stream_with_the_client_address(self) -> None:
        """A SOCKS5 CONNECT to a name becomes OPEN for that name, unresolved, with the
        client's address; the client hears nothing until OPEN_RESULT, then success, and
        then the tunnel carries its bytes both ways."""
        service = self.service('type="socks5"')
        connection, local, gateway = self.accept(service)
        self.assertIsInstance(connection, RequestBindingConnection)
        self.assertEqual(gateway.of_type(FrameType.OPEN), [])
        connection.dataReceived(socks_connect("db.corp.example", 5432) + b"early")
        self.assertEqual(local.value(), b"\x05\x00")  # the method choice only
        stream_id, request = self.open_request(gateway)
        self.assertEqual((request.host, request.port), ("db.corp.example", 5432))
        self.assertEqual(client_address_from_fields(request.fields),
                         ClientAddress.from_hosts("127.0.0.1", 50000, "127.0.0.1", 1080))
        early = [f.payload for f in gateway.of_type(FrameType.DATA)]
        self.assertEqual(early, [b"early"])
        gateway.send(fr.build_open_result(stream_id, Reason.OK, 1 << 20))
        self.assertEqual(local.value(), b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6))
        gateway.send(fr.encode(FrameType.DATA, stream_id, b"from the target"))
        self.assertTrue(local.value().endswith(b"from the target"))
        connection.dataReceived(b"more")
        self.assertEqual(gateway.of_type(FrameType.DATA)[-1].payload, b"more")

    def test_socks_failure_reply_then_clean_close(self) -> None:
        """OPEN_RESULT DENIED is heard as reply 2 (not allowed by ruleset), REFUSED as 5,
        TIMEOUT as 6; the connection closes after the reply, not with a reset."""
        for reason, code in ((Reason.DENIED, 2), (Reason.REFUSED, 5), (Reason.TIMEOUT, 6)):
            service = self.service('type="socks5"')
            connection, local, gateway = self.accept(service)
            connection.dataReceived(socks_connect("db.corp.example", 5432))
            stream_id, _request = self.open_request(gateway)
            gateway.send(fr.build_open_result(stream_id, reason, 0, "no"))
            self.assertEqual(local.value()[2:4], bytes([5, code]))
            self.assertTrue(local.disconnecting)
            self.assertEqual(self.logs.stream_ends()[-1], f"failed to open ({reason.name}: no)")

    def test_http_connect_statuses(self) -> None:
        """CONNECT is answered 200 only after OPEN_RESULT OK; 403 for a denial, 502 for a
        refusal, 504 for a timeout."""
        for reason, status in ((Reason.OK, b"200"), (Reason.DENIED, b"403"),
                               (Reason.REFUSED, b"502"), (Reason.TIMEOUT, b"504")):
            service = self.service('type="http-connect"')
            connection, local, gateway = self.accept(service)
            connection.dataReceived(b"CONNECT [2001:db8::7]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            stream_id, request = self.open_request(gateway)
            self.assertEqual((request.host, request.port), ("2001:db8::7", 443))
            self.assertEqual(local.value(), b"")
            gateway.send(fr.build_open_result(stream_id, reason, 1 << 20 if reason is
                                              Reason.OK else 0))
            self.assertTrue(local.value().startswith(b"HTTP/1.1 " + status), local.value())
            self.assertEqual(local.disconnecting, reason is not Reason.OK)

    def test_handshake_deadline(self) -> None:
        """A client that does not complete its request within 10 s is closed: 408 for an
        HTTP client, a plain close for a SOCKS client; no stream is opened."""
        for binding, answer in (('type="http-connect"', b"HTTP/1.1 408"),
                                ('type="socks5"', b"")):
            service = self.service(binding)
            connection, local, gateway = self.accept(service)
            connection.dataReceived(b"C" if "http" in binding else b"\x05")
            self.reactor.advance(9.9)
            self.assertFalse(local.disconnecting)
            self.reactor.advance(0.2)
            self.assertTrue(local.disconnecting)
            self.assertTrue(local.value().startswith(answer))
            self.assertEqual(gateway.of_type(FrameType.OPEN), [])
            self.assertIn("did not arrive within 10 s", self.logs.stream_ends()[-1])

    def test_request_cancels_the_deadline(self) -> None:
        """Once the request is complete the handshake deadline is gone: the dial's own
        deadline (the Proxy-Client's connectTimeout) decides, and the client hears it."""
        service = self.service('type="socks5"')
        connection, local, gateway = self.accept(service)
        assert isinstance(connection, RequestBindingConnection)
        self.assertIsNotNone(connection.deadline)
        connection.dataReceived(socks_connect("slow.example", 80))
        self.assertIsNone(connection.deadline)
        self.reactor.advance(12)  # past the 10 s handshake deadline (before keepalive's 15)
        self.assertFalse(local.disconnecting)
        self.assertEqual(len(gateway.of_type(FrameType.OPEN)), 1)

    def test_no_partner_is_a_general_failure(self) -> None:
        """Without a link (or a Proxy-Client) a SOCKS client hears reply 1 and an HTTP
        client 503, and no stream is opened."""
        for binding, answer in (('type="socks5"', b"\x05\x00\x05\x01"),
                                ('type="http-connect"', b"HTTP/1.1 503")):
            service = self.service(binding)
            connection, local, _gateway = self.accept(service, login=False)
            connection.dataReceived(socks_connect("a.example", 80) if "socks" in binding
                                    else b"CONNECT a.example:80 HTTP/1.1\r\n\r\n")
            self.assertTrue(local.value().startswith(answer), local.value())
            self.assertTrue(local.disconnecting)
            self.assertIn("no link to the Gateway", self.logs.text())

    def test_login_required(self) -> None:
        """A Binding with username/password refuses a client without them (SOCKS: no
        acceptable method; HTTP: 407) and admits one with them."""
        service = self.service('type="http-connect" username="alice" password="s3cret"')
        connection, local, gateway = self.accept(service)
        connection.dataReceived(b"CONNECT a.example:80 HTTP/1.1\r\n\r\n")
        self.assertTrue(local.value().startswith(b"HTTP/1.1 407"))
        connection, local, gateway = self.accept(service)
        connection.dataReceived(b"CONNECT a.example:80 HTTP/1.1\r\n"
                                b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n")
        self.assertEqual(self.open_request(gateway)[1].host, "a.example")
        service = self.service('type="socks5" username="alice" password="s3cret"')
        connection, local, gateway = self.accept(service)
        connection.dataReceived(b"\x05\x01\x00")
        self.assertEqual(local.value(), b"\x05\xff")
        self.assertTrue(local.disconnecting)

    def test_bind_is_not_supported(self) -> None:
        """SOCKS BIND is answered "command not supported" (7) and closed."""
        service = self.service('type="socks5"')
        connection, local, _gateway = self.accept(service)
        connection.dataReceived(b"\x05\x01\x00\x05\x02\x00\x01" + bytes(6))
        self.assertEqual(local.value(), b"\x05\x00\x05\x07\x00\x01" + bytes(6))
        self.assertTrue(local.disconnecting)
        self.assertIn("SOCKS5 BIND is not supported", self.logs.text())

    def test_tcp_binding_sends_the_client_address(self) -> None:
        """A fixed-target Binding's OPEN carries the client's address too (IPv6 here)."""
        self.reactor = MemoryReactorClock()
        service = ProxyServerService(_config(
            "proxy-server", '<Binding listenIp="::1" listenPort="2222" targetHost="t" '
            'targetPort="22"/>'), self.reactor)
        gateway = FakeGateway(service, "ps")
        gateway.login()
        connection = BindingConnection(service, service.config.bindings[0])
        connection.makeConnection(StringTransport(
            hostAddress=IPv6Address("TCP", "::1", 2222),
            peerAddress=IPv6Address("TCP", "::1", 40000)))
        _stream_id, request = self.open_request(gateway)
        self.assertEqual(client_address_from_fields(request.fields),
                         ClientAddress.from_hosts("::1", 40000, "::1", 2222))


class RequestBindingFuzzTests(SynchronousTestCase):
    """Arbitrary bytes in arbitrary reads at a socks5 / http-connect Binding."""

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.sampled_from(["socks5", "http-connect"]),
           st.lists(st.one_of(st.binary(max_size=64),
                              st.sampled_from([b"\x05\x01\x00", b"\x05\x01\x00\x03\x05a.bcd",
                                               b"CONNECT a:1 HTTP/1.1\r\n", b"\r\n"])),
                    max_size=40))
    def test_no_input_misbehaves(self, kind: str, chunks: list[bytes]) -> None:
        """No input raises, the handshake buffer stays within its bound, at most one stream
        is opened, and a refused connection reads nothing more."""
        reactor = MemoryReactorClock()
        service = ProxyServerService(_config(
            "proxy-server", f'<Binding type="{kind}" listenIp="127.0.0.1" listenPort="1"/>'),
            reactor)
        gateway = FakeGateway(service, "ps")
        gateway.login()
        connection = BindingFactory(service, service.config.bindings[0]).buildProtocol(None)
        assert isinstance(connection, RequestBindingConnection)
        local = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 1),
                                peerAddress=IPv4Address("TCP", "127.0.0.1", 2))
        connection.makeConnection(local)
        for chunk in chunks:
            connection.dataReceived(chunk)
            parser = connection.socks or connection.http
            assert parser is not None
            self.assertLessEqual(parser.buffered, MAX_HANDSHAKE_BYTES if kind == "socks5"
                                 else MAX_HEAD_BYTES + len(chunk))
            if connection.done and local.disconnecting:
                written, opened = local.value(), len(gateway.of_type(FrameType.OPEN))
                connection.dataReceived(b"\x05\x01\x00CONNECT a:1 HTTP/1.1\r\n\r\n")
                self.assertEqual(local.value(), written)
                self.assertEqual(len(gateway.of_type(FrameType.OPEN)), opened)
        self.assertLessEqual(len(gateway.of_type(FrameType.OPEN)), 1)
        reactor.advance(11)
        self.assertTrue(connection.stream is not None or local.disconnecting)


# -- unit layer: the Proxy-Client ---------------------------------------------------------


class _Resolver:
    """A name resolver with fixed answers (IResolutionReceiver calls, synchronously)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, host: str, port: int = 0,  # noqa: N802
                        *args: Any) -> Any:
        """Answer from the table (no answer: no address)."""
        self.asked.append(host)
        receiver.resolutionBegan(None)
        for address in self.answers.get(host, []):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, port))
        receiver.resolutionComplete()
        return None


class AllowListAtTheProxyClientTests(SynchronousTestCase):
    """Stream requests at a Proxy-Client: the rules, the dialled host, the PROXY header."""

    def client(self, endpoints: str, attributes: str = "") -> None:
        """A Proxy-Client with these Endpoints, logged in."""
        self.reactor = MemoryReactorClock()
        self.resolver = _Resolver({"db.corp.example": ["10.9.9.9", "192.168.40.7"],
                                   "evil.corp.example": ["10.9.9.9"]})
        self.reactor.nameResolver = self.resolver  # type: ignore[assignment]
        self.service = ProxyClientService(_config(
            "proxy-client", f"<AllowedTargetEndpoints {attributes}>{endpoints}"
            "</AllowedTargetEndpoints>"), self.reactor)
        self.gateway = FakeGateway(self.service, "pc")
        self.gateway.login()
        self.logs = Logs(self)
        self.next_id = 1

    def open(self, host: str, port: int, fields: tuple[tuple[int, bytes], ...] = (),
             early: bytes = b"") -> int:
        """The Gateway forwards an OPEN; returns its stream id."""
        stream_id, self.next_id = self.next_id, self.next_id + 1
        data = fr.build_open(stream_id, fr.OpenRequest(65536, 3, host, port, fr.KIND_TCP,
                                                       fields))
        if early:
            data += fr.encode(FrameType.DATA, stream_id, early)
        self.gateway.send(data)
        return stream_id

    def result(self, stream_id: int) -> tuple[Reason, int, str] | None:
        """The OPEN_RESULT sent for a stream, if any."""
        for frame in self.gateway.of_type(FrameType.OPEN_RESULT):
            if frame.stream_id == stream_id:
                return fr.parse_open_result(frame.payload)
        return None

    def dialled(self) -> list[tuple[str, int]]:
        """host, port of every connect started."""
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def test_networks_ranges_and_suffixes(self) -> None:
        """A network with a port range, and a *. suffix, allow what they cover and deny the
        rest (DENIED, logged with the rule that came closest)."""
        self.client('<Endpoint host="192.168.40.0/24" port="22,8000-8100"/>'
                    '<Endpoint host="*.corp.example" port="443"/>')
        self.open("192.168.40.80", 8050)
        self.assertTrue(self.service.is_allowed("b.a.corp.example", 443))
        denied = [self.open("192.168.41.1", 22), self.open("192.168.40.80", 23),
                  self.open("corp.example", 443)]
        self.assertEqual(self.dialled(), [("192.168.40.80", 8050)])
        self.assertEqual([self.result(s)[0] for s in denied],  # type: ignore[index]
                         [Reason.DENIED] * 3)
        self.assertIn('port 23 of 192.168.40.80 (an IP literal) is not allowed: <Endpoint '
                      'host="192.168.40.0/24" port="22,8000-8100"> at ', self.logs.text())

    def test_trailing_dot_is_the_literal(self) -> None:
        """127.0.0.1. matches the entry 127.0.0.1 and is dialled as that literal, never
        looked up; 127.1 (a resolver's number) is refused as an invalid target."""
        self.client('<Endpoint host="127.0.0.1" port="22"/>')
        self.open("127.0.0.1.", 22)
        stream_id = self.open("127.1", 22)
        self.assertEqual(self.dialled(), [("127.0.0.1", 22)])
        self.assertEqual(self.result(stream_id)[0], Reason.INVALID_TARGET)  # type: ignore[index]
        self.assertEqual(self.resolver.asked, [])

    def test_proxy_header_before_early_data(self) -> None:
        """proxyProtocol="v1"/"v2": the header with the client's address is the first thing
        the target receives, before the early data; without the field, UNKNOWN / LOCAL."""
        address = ClientAddress.from_hosts("203.0.113.5", 51000, "127.0.0.1", 1080)
        for version, build in (("v1", build_v1), ("v2", build_v2)):
            for fields, client in (((encode_client_address(address),), address), ((), None)):
                self.client(f'<Endpoint host="127.0.0.1" port="25" proxyProtocol="{version}"/>')
                self.open("127.0.0.1", 25, fields, early=b"EHLO x\r\n")
                _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
                connection = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
                assert isinstance(connection, TargetConnection)
                target = StringTransport()
                connection.makeConnection(target)
                self.assertEqual(target.value(), build(client) + b"EHLO x\r\n")

    def test_no_header_without_proxy_protocol(self) -> None:
        """An Endpoint without proxyProtocol sends the target only the stream's bytes."""
        self.client('<Endpoint host="127.0.0.1" port="25"/>')
        address = ClientAddress.from_hosts("203.0.113.5", 51000, "127.0.0.1", 1080)
        self.open("127.0.0.1", 25, (encode_client_address(address),), early=b"EHLO x\r\n")
        connection = self.reactor.tcpClients[-1][2].buildProtocol(None)
        assert connection is not None
        target = StringTransport()
        connection.makeConnection(target)
        self.assertEqual(target.value(), b"EHLO x\r\n")

    def test_malformed_client_address_is_a_protocol_error(self) -> None:
        """A CLIENT_ADDRESS that does not decode refuses the stream with PROTOCOL_ERROR."""
        self.client('<Endpoint host="127.0.0.1" port="25"/>')
        stream_id = self.open("127.0.0.1", 25, ((fr.FIELD_CLIENT_ADDRESS, b"\x04\x01"),))
        self.assertEqual(self.result(stream_id)[0], Reason.PROTOCOL_ERROR)  # type: ignore[index]
        self.assertEqual(self.dialled(), [])

    def test_check_resolved_addresses(self) -> None:
        """checkResolvedAddresses: a name allowed by a name rule is dialled only at its
        addresses inside a network rule (192.168.40.7, not 10.9.9.9); a name whose
        addresses are all outside is denied without a dial."""
        self.client('<Endpoint host="*.corp.example" port="5432"/>'
                    '<Endpoint host="192.168.40.0/24" port="5432"/>',
                    'checkResolvedAddresses="true"')
        self.open("db.corp.example", 5432)
        self.assertEqual(self.dialled(), [("192.168.40.7", 5432)])
        stream_id = self.open("evil.corp.example", 5432)
        self.assertEqual(self.result(stream_id),
                         (Reason.DENIED, 0, "evil.corp.example:5432 resolved to no allowed "
                          "address"))
        self.assertEqual(len(self.dialled()), 1)
        self.assertIn("10.9.9.9 refused: no address or network rule allows it for port 5432",
                      self.logs.text())
        self.assertEqual(self.service.dials_in_progress, 1)  # db.corp.example's, still going

    def test_check_resolved_addresses_never_looks_up_other_names(self) -> None:
        """A name no name rule allows is denied before any lookup."""
        self.client('<Endpoint host="192.168.40.0/24" port="5432"/>',
                    'checkResolvedAddresses="true"')
        stream_id = self.open("db.corp.example", 5432)
        self.assertEqual(self.result(stream_id)[0], Reason.DENIED)  # type: ignore[index]
        self.assertEqual(self.resolver.asked, [])

    def test_udp_rule_does_not_allow_tcp(self) -> None:
        """A udp Endpoint never allows a tcp stream; the denial says so."""
        self.client('<Endpoint host="127.0.0.1" port="53" protocol="udp"/>')
        stream_id = self.open("127.0.0.1", 53)
        self.assertEqual(self.result(stream_id)[0], Reason.DENIED)  # type: ignore[index]
        self.assertIn('allows udp only', self.logs.text())


# -- real layer --------------------------------------------------------------------------


def spawn(test: TestCase, argv: list[str], cwd: str | None = None) -> ChildProcess:
    """Start a child (its standard error kept apart); at the test's end it is stopped with
    SIGTERM (nginx's and sshd's workers go with their master) and waited for."""
    child = ChildProcess(stderr_apart=True)
    reactor.spawnProcess(child, argv[0], argv, env=dict(os.environ), path=cwd)
    test.addCleanup(child.kill, "TERM")
    return child


async def run(test: TestCase, argv: list[str], timeout: float = 30) -> ChildProcess:
    """Run a child to its end (killed after ``timeout`` seconds: a hung client fails)."""
    child = spawn(test, argv)
    killer = reactor.callLater(timeout, child.kill)
    await child.ended
    if killer.active():
        killer.cancel()
    return child


async def listening(port: int, host: str = "127.0.0.1", what: str = "server") -> None:
    """Wait until something accepts connections on host:port."""
    def accepts() -> bool:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            return s.connect_ex((host, port)) == 0

    await wait_until(accepts, 15, f"{what} to listen on port {port}")


class _HttpTarget(Protocol):
    """Answers one HTTP request with BODY and closes."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Answer once the head is complete."""
        self.received += data
        if b"\r\n\r\n" in self.received:
            transport: Any = self.transport
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n"
                            b"\r\n%s" % (len(BODY), BODY))
            transport.loseConnection()


def http_target(test: TestCase) -> int:
    """An HTTP target on 127.0.0.1 for this test; its port."""
    factory: Any = Factory.forProtocol(_HttpTarget)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    address: Any = port.getHost()
    return int(address.port)


class RealTunnelMixin:
    """A Gateway, a Proxy-Client with an allow-list and a Proxy-Server with Bindings."""

    async def tunnel(self, bindings: str, endpoints: str, allow_attributes: str = "",
                     ) -> ProxyServerService:
        """Start the three roles; returns the Proxy-Server (its ports in Binding order)."""
        test: Any = self
        tunnel = Tunnel(test)
        test.addCleanup(tunnel.close)
        tunnel.start_gateway()
        client = tunnel._start_proxy(
            ProxyClientService,
            f'<Instance type="proxy-client" {tunnel._proxy_attributes("")}>'
            f'<Session id="1" password="client-pw"/><AllowedTargetEndpoints '
            f"{allow_attributes}>{endpoints}</AllowedTargetEndpoints></Instance>")
        server = tunnel._start_proxy(
            ProxyServerService,
            f'<Instance type="proxy-server" {tunnel._proxy_attributes("")}>'
            f'<Session id="1" password="server-pw">{bindings}</Session></Instance>')
        await tunnel.ready(client, server)
        self.proxy_client = client
        return server

    def port_of(self, server: ProxyServerService, index: int = 0) -> int:
        """The port a Binding (listenPort="0") got."""
        return int(server.ports[index].getHost().port)

    async def curl(self, *args: str) -> ChildProcess:
        """curl -sS with a 10 s limit."""
        assert CURL is not None
        return await run(self, [CURL, "-sS", "--max-time", "10", *args])  # type: ignore[arg-type]


class SocksCurlTests(RealTunnelMixin, TestCase):
    """curl --socks5-hostname through a socks5 Binding and a real tunnel."""

    if CURL is None:
        skip = "curl is not installed (Debian: apt-get install curl)"

    async def test_allowed_denied_refused(self) -> None:
        """An allowed name reaches the target (resolved at the Proxy-Client); a port or a
        name outside the list is heard as reply 2 (not allowed by ruleset); an allowed
        target that refuses is heard as reply 5 (connection refused)."""
        target, closed = http_target(self), reserve_port(self)
        server = await self.tunnel(
            '<Binding type="socks5" listenIp="127.0.0.1" listenPort="0"/>',
            f'<Endpoint host="localhost" port="{target},{closed}"/>')
        proxy = f"127.0.0.1:{self.port_of(server)}"
        ok = await self.curl("--socks5-hostname", proxy, f"http://localhost:{target}/")
        self.assertEqual((bytes(ok.output), ok.exit_code), (BODY, 0), bytes(ok.errors))
        for url, reply in ((f"http://localhost:{target + 1}/", b"(2)"),
                           (f"http://denied.example:{target}/", b"(2)"),
                           (f"http://127.0.0.1:{target}/", b"(2)"),  # a literal: no name rule
                           (f"http://localhost:{closed}/", b"(5)")):
            failed = await self.curl("--socks5-hostname", proxy, url)
            self.assertEqual((bytes(failed.output), failed.exit_code), (b"", 97),
                             bytes(failed.errors))
            self.assertIn(reply, bytes(failed.errors), url)
        await wait_until(lambda: "TCP stream to denied.example" in self.logs.text(), 5,
                         "the denial's log line")
        self.assertIn("denied: denied.example is not in AllowedTargetEndpoints: no name rule "
                      "(exact or *.) matches", self.logs.text())

    def setUp(self) -> None:
        """Collect the log lines (the Proxy-Client's denials)."""
        self.logs = Logs(self)

    async def test_login(self) -> None:
        """A Binding with username/password admits curl's RFC 1929 login, refuses a wrong
        password and a client without one."""
        target = http_target(self)
        server = await self.tunnel(
            '<Binding type="socks5" listenIp="127.0.0.1" listenPort="0" username="alice" '
            'password="s3cret"/>', f'<Endpoint host="localhost" port="{target}"/>')
        proxy, url = f"127.0.0.1:{self.port_of(server)}", f"http://localhost:{target}/"
        ok = await self.curl("--socks5-hostname", proxy, "--proxy-user", "alice:s3cret", url)
        self.assertEqual((bytes(ok.output), ok.exit_code), (BODY, 0), bytes(ok.errors))
        for extra in (["--proxy-user", "alice:wrong"], []):
            failed = await self.curl("--socks5-hostname", proxy, *extra, url)
            self.assertEqual((bytes(failed.output), failed.exit_code), (b"", 97),
                             bytes(failed.errors))

    async def test_network_rule_and_check_resolved_addresses(self) -> None:
        """With checkResolvedAddresses, localhost (allowed by name) goes through when a
        network rule holds its address, and is refused (reply 2) when none does; an IP
        literal inside a network rule goes through."""
        target = http_target(self)
        server = await self.tunnel(
            '<Binding type="socks5" listenIp="127.0.0.1" listenPort="0"/>',
            f'<Endpoint host="localhost" port="{target}"/>'
            f'<Endpoint host="127.0.0.0/8" port="{target - 1}-{target}"/>',
            'checkResolvedAddresses="true"')
        proxy = f"127.0.0.1:{self.port_of(server)}"
        for url in (f"http://localhost:{target}/", f"http://127.0.0.1:{target}/"):
            ok = await self.curl("--socks5-hostname", proxy, url)
            self.assertEqual((bytes(ok.output), ok.exit_code), (BODY, 0), bytes(ok.errors))
        self.assertTrue(self.proxy_client.apply_config(_reconfigured(
            self.proxy_client.config, f'<Endpoint host="localhost" port="{target}"/>'
            f'<Endpoint host="10.0.0.0/8" port="{target}"/>')))
        failed = await self.curl("--socks5-hostname", proxy, f"http://localhost:{target}/")
        self.assertEqual(failed.exit_code, 97, bytes(failed.errors))
        self.assertIn(b"(2)", bytes(failed.errors))


def _reconfigured(config: ProxyConfig, endpoints: str) -> ProxyConfig:
    """The same Proxy-Client with other Endpoints (checkResolvedAddresses on)."""
    import dataclasses

    parsed = _config("proxy-client", '<AllowedTargetEndpoints checkResolvedAddresses="true">'
                     f"{endpoints}</AllowedTargetEndpoints>")
    return dataclasses.replace(config, allowed_targets=parsed.allowed_targets,
                               check_resolved_addresses=True)


class HttpConnectCurlTests(RealTunnelMixin, TestCase):
    """curl -x (-p: CONNECT) through an http-connect Binding and a real tunnel."""

    if CURL is None:
        skip = "curl is not installed (Debian: apt-get install curl)"

    async def test_allowed_denied_refused(self) -> None:
        """CONNECT to an allowed target is answered 200 once it is connected; a denial is
        403, a refused target 502, and a plain proxy GET 405."""
        target, closed = http_target(self), reserve_port(self)
        server = await self.tunnel(
            '<Binding type="http-connect" listenIp="127.0.0.1" listenPort="0"/>',
            f'<Endpoint host="localhost" port="{target},{closed}"/>')
        proxy = f"http://127.0.0.1:{self.port_of(server)}"
        ok = await self.curl("-p", "-x", proxy, f"http://localhost:{target}/")
        self.assertEqual((bytes(ok.output), ok.exit_code), (BODY, 0), bytes(ok.errors))
        for url, status in ((f"http://localhost:{target + 1}/", b"403"),
                            (f"http://localhost:{closed}/", b"502")):
            failed = await self.curl("-p", "-x", proxy, url)
            self.assertEqual((bytes(failed.output), failed.exit_code), (b"", 56),
                             bytes(failed.errors))
            self.assertIn(b"response " + status, bytes(failed.errors))
        plain = await self.curl("--fail", "-x", proxy, f"http://localhost:{target}/")
        self.assertEqual(plain.exit_code, 22, bytes(plain.errors))
        self.assertIn(b"405", bytes(plain.errors))

    async def test_login(self) -> None:
        """With username/password, curl --proxy-user gets through and a client without is
        answered 407."""
        target = http_target(self)
        server = await self.tunnel(
            '<Binding type="http-connect" listenIp="127.0.0.1" listenPort="0" '
            'username="alice" password="s3cret"/>', f'<Endpoint host="localhost" port="{target}"/>')
        proxy, url = f"http://127.0.0.1:{self.port_of(server)}", f"http://localhost:{target}/"
        ok = await self.curl("-p", "-x", proxy, "--proxy-user", "alice:s3cret", url)
        self.assertEqual((bytes(ok.output), ok.exit_code), (BODY, 0), bytes(ok.errors))
        failed = await self.curl("-p", "-x", proxy, url)
        self.assertEqual(failed.exit_code, 56, bytes(failed.errors))
        self.assertIn(b"407", bytes(failed.errors))


class SshThroughSocksTests(RealTunnelMixin, TestCase):
    """OpenSSH's ssh with ProxyCommand "nc -X 5 -x" through a socks5 Binding to sshd."""

    if None in (SSH, SSHD, NC, SSH_KEYGEN):
        skip = ("ssh, sshd or nc is not installed (Debian: apt-get install openssh-client "
                "openssh-server netcat-openbsd)")

    async def sshd(self) -> tuple[int, str]:
        """A throw-away sshd on 127.0.0.1 admitting one fresh key; (port, key file)."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        for name in ("host", "client"):
            made = await run(self, [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f",  # type: ignore[list-item]
                                    os.path.join(folder, name)])
            self.assertEqual(made.exit_code, 0, bytes(made.errors))
        shutil.copy(os.path.join(folder, "client.pub"), os.path.join(folder, "authorized"))
        port = reserve_port(self)
        config = os.path.join(folder, "sshd_config")
        with open(config, "w", encoding="ascii") as f:
            f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder}/host\n"
                    f"AuthorizedKeysFile {folder}/authorized\nPidFile none\nUsePAM no\n"
                    "StrictModes no\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n")
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            # sshd as root wants its privilege separation directory, which Debian's unit
            # creates at boot (RuntimeDirectory=sshd); an empty root-owned folder.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        daemon = spawn(self, [SSHD, "-D", "-e", "-f", config])  # type: ignore[list-item]
        await listening(port, what="sshd")
        self.assertFalse(daemon.ended.called, bytes(daemon.errors))
        return port, os.path.join(folder, "client")

    def ssh(self, proxy: int, port: int, key: str, host: str = "localhost") -> list[str]:
        """The ssh command running 'echo' through the SOCKS5 Binding."""
        assert SSH is not None
        return [SSH, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10",
                "-o", f"ProxyCommand={NC} -X 5 -x 127.0.0.1:{proxy} %h %p",
                "-i", key, "-p", str(port), f"{getpass.getuser()}@{host}",
                "echo", "hello through socks"]

    async def test_ssh_allowed_and_denied(self) -> None:
        """ssh reaches sshd by name through the tunnel and runs a command; to a target the
        allow-list does not hold (the address, where only the name is allowed) nc hears the
        refusal and ssh fails before any SSH byte."""
        port, key = await self.sshd()
        server = await self.tunnel(
            '<Binding type="socks5" listenIp="127.0.0.1" listenPort="0"/>',
            f'<Endpoint host="localhost" port="{port}"/>')
        proxy = self.port_of(server)
        ok = await run(self, self.ssh(proxy, port, key))
        self.assertEqual((bytes(ok.output), ok.exit_code), (b"hello through socks\n", 0),
                         bytes(ok.errors))
        denied = await run(self, self.ssh(proxy, port, key, host="127.0.0.1"))
        self.assertEqual((bytes(denied.output), denied.exit_code), (b"", 255), bytes(denied.errors))


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {folder}/tmp;
  proxy_temp_path {folder}/tmp;
  fastcgi_temp_path {folder}/tmp;
  uwsgi_temp_path {folder}/tmp;
  scgi_temp_path {folder}/tmp;
  log_format pp 'client=$proxy_protocol_addr:$proxy_protocol_port peer=$remote_addr:$remote_port';
  server {{
    listen 127.0.0.1:{port} proxy_protocol;
    access_log {folder}/access.log pp;
    location / {{ return 200 "hello from nginx\\n"; }}
  }}
}}
"""


class NginxProxyProtocolTests(RealTunnelMixin, TestCase):
    """Debian's nginx as a target with "listen ... proxy_protocol": its access log shows the
    client's address, not the Proxy-Client's."""

    if NGINX is None or CURL is None:
        skip = "nginx or curl is not installed (Debian: apt-get install nginx curl)"

    async def nginx(self) -> tuple[int, str]:
        """nginx on 127.0.0.1 in the foreground; (port, access log path)."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "tmp"))
        port = reserve_port(self)
        config = os.path.join(folder, "nginx.conf")
        with open(config, "w", encoding="ascii") as f:
            f.write(NGINX_CONF.format(folder=folder, port=port))
        daemon = spawn(self, [NGINX, "-p", folder, "-e", os.path.join(folder, "error.log"),  # type: ignore[list-item]
                              "-c", config])
        await listening(port, what="nginx")
        self.assertFalse(daemon.ended.called, bytes(daemon.errors))
        return port, os.path.join(folder, "access.log")

    async def logged(self, path: str, count: int) -> list[str]:
        """The access log once it has ``count`` lines."""
        def lines() -> list[str]:
            try:
                with open(path, encoding="ascii") as f:
                    return f.read().splitlines()
            except FileNotFoundError:
                return []

        await wait_until(lambda: len(lines()) >= count, 10, "nginx's access log line")
        return lines()

    async def test_v1_and_v2_show_the_client(self) -> None:
        """Through a fixed-target Binding on 127.0.0.1 (v1) and a socks5 Binding on ::1
        (v2), nginx logs curl's own address and port as the client; the connection itself
        comes from the Proxy-Client (another port; 127.0.0.1 for the ::1 client)."""
        port, log = await self.nginx()
        server = await self.tunnel(
            f'<Binding listenIp="127.0.0.1" listenPort="0" targetHost="127.0.0.1" '
            f'targetPort="{port}"/>'
            '<Binding type="socks5" listenIp="::1" listenPort="0"/>',
            f'<Endpoint host="127.0.0.1" port="{port}" proxyProtocol="v1"/>'
            f'<Endpoint host="localhost" port="{port}" proxyProtocol="v2"/>')
        fixed, socks = self.port_of(server, 0), self.port_of(server, 1)
        first = await self.curl("-w", "\\n%{local_port}", f"http://127.0.0.1:{fixed}/")
        self.assertEqual(first.exit_code, 0, bytes(first.errors))
        body, local_port = bytes(first.output).rsplit(b"\n", 1)
        self.assertEqual(body, b"hello from nginx\n")
        (line,) = await self.logged(log, 1)
        self.assertTrue(line.startswith(f"client=127.0.0.1:{int(local_port)} "), line)
        self.assertNotEqual(line.rpartition(":")[2], local_port.decode())
        second = await self.curl("-w", "\\n%{local_port}", "--socks5-hostname",
                                 f"[::1]:{socks}", f"http://localhost:{port}/")
        self.assertEqual(second.exit_code, 0, bytes(second.errors))
        local_port = bytes(second.output).rsplit(b"\n", 1)[1]
        line = (await self.logged(log, 2))[1]
        self.assertTrue(line.startswith(f"client=::1:{int(local_port)} peer=127.0.0.1:"), line)


HAPROXY_CONF = """\
global
  log stdout format raw local0
defaults
  mode http
  log global
  timeout connect 5s
  timeout client 10s
  timeout server 10s
frontend target
  bind 127.0.0.1:{port} accept-proxy
  log-format "client=%ci:%cp"
  http-request return status 200 content-type text/plain string "hello from haproxy"
"""


class HaproxyProxyProtocolTests(RealTunnelMixin, TestCase):
    """Debian's HAProxy as a target with "accept-proxy" (v1 and v2 both): it logs the
    client's address."""

    if HAPROXY is None or CURL is None:
        skip = "haproxy or curl is not installed (Debian: apt-get install haproxy curl)"

    async def test_v2_shows_the_client(self) -> None:
        """A v2 header through an http-connect Binding: HAProxy's log names curl's port."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        port = reserve_port(self)
        config = os.path.join(folder, "haproxy.cfg")
        with open(config, "w", encoding="ascii") as f:
            f.write(HAPROXY_CONF.format(port=port))
        daemon = spawn(self, [HAPROXY, "-db", "-f", config])  # type: ignore[list-item]
        await listening(port, what="haproxy")
        server = await self.tunnel(
            '<Binding type="http-connect" listenIp="127.0.0.1" listenPort="0"/>',
            f'<Endpoint host="127.0.0.1" port="{port}" proxyProtocol="v2"/>')
        reply = await self.curl("-w", "\\n%{local_port}", "-p", "-x",
                                f"http://127.0.0.1:{self.port_of(server)}",
                                f"http://127.0.0.1:{port}/")
        self.assertEqual(reply.exit_code, 0, bytes(reply.errors))
        body, local_port = bytes(reply.output).rsplit(b"\n", 1)
        self.assertEqual(body, b"hello from haproxy")
        expected = f"client=127.0.0.1:{int(local_port)}".encode()
        await wait_until(lambda: expected in daemon.output, 10, "haproxy's log line")
