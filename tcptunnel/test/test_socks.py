"""Tests for the SOCKS5 server-side parser (tcptunnel._socks)."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel import _socks as socks
from tcptunnel._allow import AllowList, parse_rule
from tcptunnel._frames import Reason
from tcptunnel._socks import (
    Authenticated,
    AuthenticationFailed,
    CommandRefused,
    ConnectRequested,
    EarlyData,
    Event,
    Reply,
    SocksError,
    SocksServer,
)

EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "200"))


def greeting(*methods: int) -> bytes:
    """A client's method offer."""
    return bytes([5, len(methods), *methods])


def login(user: bytes, password: bytes) -> bytes:
    """An RFC 1929 username/password request."""
    return bytes([1, len(user)]) + user + bytes([len(password)]) + password


def request(host: str | bytes, port: int, command: int = 1) -> bytes:
    """A request: IPv4/IPv6 given as packed bytes (4/16), a domain name as str."""
    if isinstance(host, bytes):
        atyp = 1 if len(host) == 4 else 4
        address = host
    else:
        atyp = 3
        address = bytes([len(host.encode())]) + host.encode()
    return bytes([5, command, 0, atyp]) + address + struct.pack(">H", port)


def feed(server: SocksServer, chunks: list[bytes]) -> list[Event]:
    """All events of feeding ``chunks`` in order, merging consecutive early data."""
    events: list[Event] = []
    for chunk in chunks:
        for event in server.receive_data(chunk):
            if isinstance(event, EarlyData) and events and isinstance(events[-1], EarlyData):
                events[-1] = EarlyData(events[-1].data + event.data)
            else:
                events.append(event)
        assert server.buffered <= socks.MAX_HANDSHAKE_BYTES
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class HandshakeTests(SynchronousTestCase):
    """Method negotiation, login and CONNECT, each answered as RFC 1928/1929 say."""

    def test_no_auth_connect_domain(self) -> None:
        """No-auth CONNECT to a name: method 0 chosen, the name passed on unresolved."""
        server = SocksServer()
        events = server.receive_data(greeting(0, 2))
        self.assertEqual(events, [Authenticated(None)])
        self.assertEqual(server.data_to_send(), b"\x05\x00")
        events = server.receive_data(request("Example.ORG", 443))
        self.assertEqual(events, [ConnectRequested("Example.ORG", 443, True)])
        self.assertEqual(server.data_to_send(), b"")

    def test_connect_ipv4_and_ipv6(self) -> None:
        """IPv4 and IPv6 addresses become literals (IPv6 compressed), not names."""
        server = SocksServer()
        events = server.receive_data(greeting(0) + request(bytes([192, 0, 2, 7]), 22))
        self.assertEqual(events, [Authenticated(None), ConnectRequested("192.0.2.7", 22, False)])
        server = SocksServer()
        v6 = bytes.fromhex("20010db8000000000000000000000001")
        events = server.receive_data(greeting(0) + request(v6, 80))
        self.assertEqual(events[1], ConnectRequested("2001:db8::1", 80, False))

    def test_reply_and_early_data(self) -> None:
        """Bytes after the request are early data, before and after the reply."""
        server = SocksServer()
        events = server.receive_data(greeting(0) + request("a.example", 80) + b"GET /")
        self.assertEqual(events[-1], EarlyData(b"GET /"))
        self.assertEqual(server.receive_data(b" HTTP/1.0"), [EarlyData(b" HTTP/1.0")])
        sent = server.reply(Reply.SUCCEEDED)
        self.assertEqual(sent, b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        self.assertEqual(server.data_to_send(), b"\x05\x00" + sent)
        self.assertEqual(server.state, socks.State.OPEN)
        self.assertEqual(server.receive_data(b"\r\n\r\n"), [EarlyData(b"\r\n\r\n")])
        self.assertRaises(RuntimeError, server.reply, Reply.SUCCEEDED)

    def test_failure_reply_closes(self) -> None:
        """A failure reply ends the handshake: must_close, and later bytes are not read."""
        server = SocksServer()
        server.receive_data(greeting(0) + request("a.example", 80))
        server.reply(Reply.NOT_ALLOWED)
        self.assertTrue(server.must_close)
        self.assertEqual(server.receive_data(b"more"), [])
        self.assertEqual(server.data_to_send()[-10:], b"\x05\x02\x00\x01" + bytes(6))

    def test_username_password(self) -> None:
        """With credentials, method 2 is chosen and the right login is admitted."""
        server = SocksServer(("alice", "s3cret"))
        events = server.receive_data(greeting(0, 2))
        self.assertEqual(events, [])
        self.assertEqual(server.data_to_send(), b"\x05\x02")
        events = server.receive_data(login(b"alice", b"s3cret") + request("h.example", 22))
        self.assertEqual(events, [Authenticated("alice"), ConnectRequested("h.example", 22, True)])
        self.assertEqual(server.data_to_send(), b"\x01\x00")

    def test_wrong_credentials(self) -> None:
        """A wrong user or password is answered status 1 and the request is not read."""
        for user, password in ((b"alice", b"wrong"), (b"bob", b"s3cret"), (b"", b""),
                               (b"alice", b"s3cret\x00")):
            server = SocksServer(("alice", "s3cret"))
            events = server.receive_data(greeting(2) + login(user, password)
                                         + request("h.example", 22))
            self.assertEqual(len(events), 1)
            self.assertIsInstance(events[0], AuthenticationFailed)
            self.assertEqual(server.data_to_send(), b"\x05\x02\x01\x01")
            self.assertTrue(server.must_close)

    def test_no_acceptable_method(self) -> None:
        """A client without the configured method hears 0xFF: no-auth is never a fallback."""
        for credentials, offered in ((("u", "p"), (0,)), (None, (2,)), (None, ())):
            server = SocksServer(credentials)
            events = server.receive_data(greeting(*offered))
            self.assertIsInstance(events[0], AuthenticationFailed)
            self.assertEqual(server.data_to_send(), b"\x05\xff")
            self.assertTrue(server.must_close)

    def test_bind_and_udp_refused(self) -> None:
        """BIND, UDP ASSOCIATE and unknown commands are "command not supported"."""
        for command in (2, 3, 9):
            server = SocksServer()
            events = server.receive_data(greeting(0) + request("h.example", 1, command))
            self.assertEqual(events[-1], CommandRefused(command))
            self.assertEqual(server.data_to_send(),
                             b"\x05\x00" + socks.build_reply(Reply.COMMAND_NOT_SUPPORTED))
            self.assertTrue(server.must_close)
        self.assertEqual(CommandRefused(3).name, "UDP ASSOCIATE")

    def test_malformed(self) -> None:
        """Bad versions, address types, names and ports raise SocksError with the reply due."""
        cases = [
            (b"\x04\x01\x00\x50", b""),  # SOCKS4
            (greeting(0) + b"\x04\x01\x00\x01", socks.build_reply(Reply.GENERAL_FAILURE)),
            (greeting(0) + b"\x05\x01\x00\x05" + bytes(6),
             socks.build_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED)),
            (greeting(0) + request("", 80), socks.build_reply(Reply.GENERAL_FAILURE)),
            (greeting(0) + request("a b", 80), socks.build_reply(Reply.GENERAL_FAILURE)),
            (greeting(0) + request("a\x1b[2J", 80), socks.build_reply(Reply.GENERAL_FAILURE)),
            (greeting(0) + request("h.example", 0), socks.build_reply(Reply.GENERAL_FAILURE)),
            (greeting(0) + b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50",
             socks.build_reply(Reply.GENERAL_FAILURE)),
        ]
        for data, reply in cases:
            server = SocksServer()
            with self.assertRaises(SocksError) as caught:
                server.receive_data(data)
            self.assertEqual(caught.exception.reply, reply, data)
            self.assertTrue(server.must_close)
            self.assertEqual(server.receive_data(b"x"), [])
        server = SocksServer(("u", "p"))
        with self.assertRaises(SocksError) as caught:
            server.receive_data(greeting(2) + b"\x05\x01u\x01p")
        self.assertEqual(caught.exception.reply, b"\x01\x01")

    def test_reply_codes_for_reasons(self) -> None:
        """Each OPEN_RESULT reason has the SOCKS reply code the issue names."""
        expected = {
            Reason.OK: Reply.SUCCEEDED, Reason.DENIED: Reply.NOT_ALLOWED,
            Reason.REFUSED: Reply.CONNECTION_REFUSED, Reason.TIMEOUT: Reply.TTL_EXPIRED,
            Reason.UNREACHABLE: Reply.NETWORK_UNREACHABLE,
            Reason.DNS_FAILURE: Reply.HOST_UNREACHABLE,
            Reason.NO_PARTNER: Reply.GENERAL_FAILURE, Reason.LIMIT: Reply.GENERAL_FAILURE,
            Reason.UNKNOWN: Reply.GENERAL_FAILURE,
        }
        for reason, code in expected.items():
            self.assertEqual(socks.reply_for_reason(reason), code, reason)
        self.assertEqual(socks.build_reply(Reply.SUCCEEDED, "::1", 1080),
                         b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x04\x38")


_valid_hosts = st.one_of(
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=16, max_size=16),
    st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,5}", fullmatch=True),
)


class SplitTests(SynchronousTestCase):
    """Arbitrary splits and arbitrary garbage."""

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(_valid_hosts, st.integers(1, 65535), st.booleans(),
           st.binary(max_size=64), st.lists(st.integers(0, 2000), max_size=12))
    def test_any_split_same_events(self, host: str | bytes, port: int, with_login: bool,
                                   early: bytes, cuts: list[int]) -> None:
        """A valid handshake split anywhere gives the same events and answers as in one piece."""
        credentials = ("user", "pass") if with_login else None
        data = (greeting(0, 1, 2) + (login(b"user", b"pass") if with_login else b"")
                + request(host, port) + early)
        whole = SocksServer(credentials)
        expected = feed(whole, [data])
        pieces = SocksServer(credentials)
        self.assertEqual(feed(pieces, split(data, cuts)), expected)
        self.assertEqual(pieces.data_to_send(), whole.data_to_send())
        connect = [e for e in expected if isinstance(e, ConnectRequested)]
        self.assertEqual(len(connect), 1)
        self.assertEqual(connect[0].port, port)
        self.assertEqual(b"".join(e.data for e in expected if isinstance(e, EarlyData)), early)

    @settings(max_examples=EXAMPLES * 2, deadline=None)
    @given(st.booleans(), st.lists(st.binary(max_size=600), max_size=8))
    def test_garbage(self, with_login: bool, chunks: list[bytes]) -> None:
        """Any bytes: only SocksError escapes, the parser holds at most its bound, and it
        answers at most a few small messages."""
        server = SocksServer(("user", "pass") if with_login else None)
        for chunk in chunks:
            try:
                server.receive_data(chunk)
            except SocksError as e:
                self.assertLessEqual(len(e.reply), 22)
                self.assertTrue(server.must_close)
            self.assertLessEqual(server.buffered, socks.MAX_HANDSHAKE_BYTES)
        self.assertLessEqual(len(server.data_to_send()), 2 + 2 + 22)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.binary(min_size=1, max_size=5000))
    def test_garbage_after_greeting(self, data: bytes) -> None:
        """Garbage where the request belongs never makes the parser hold more than a request."""
        server = SocksServer()
        server.receive_data(greeting(0))
        try:
            for i in range(0, len(data), 7):
                server.receive_data(data[i : i + 7])
                self.assertLess(server.buffered, socks.MAX_REQUEST)
        except SocksError:
            self.assertTrue(server.must_close)


# ---------------------------------------------------------------------------
# Real clients.  A minimal adapter (test-only: the Binding's own is for proxyserver.py)
# runs the parser on a real socket, checks the request with _allow and dials it directly,
# so that curl, which no one here wrote, talks to our parsers.

_CURL = shutil.which("curl")
TARGET_BODY = b"hello from the target\n"


class _Target(Protocol):
    """Answers one HTTP request with TARGET_BODY and closes."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Answer once the request head is complete."""
        self.received += data
        if b"\r\n\r\n" in self.received:
            transport: Any = self.transport
            transport.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(TARGET_BODY), TARGET_BODY))
            transport.loseConnection()


class _Pipe(Protocol):
    """The dialled side: what the target sends goes to the client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Pass on to the client."""
        self.client.write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        """The target closed: close the client."""
        self.client.loseConnection()


class TunnelAdapter(Protocol):
    """Common to the SOCKS and CONNECT test adapters: check, dial, answer, splice."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self.target: Any = None
        self.pending: list[bytes] = []

    def answer(self, reason: Reason) -> bytes:
        """The parser's answer for ``reason``."""
        raise NotImplementedError

    def fail(self, reason: Reason) -> None:
        """Answer a failure and close."""
        transport: Any = self.transport
        transport.write(self.answer(reason))
        transport.loseConnection()

    def connect(self, host: str, port: int) -> None:
        """Check the target like a Proxy-Client would, then dial it."""
        decision = self.allow.check(host, port)
        if not decision.allowed or decision.target is None:
            self.fail(decision.reason)
            return
        transport: Any = self.transport
        transport.pauseProducing()
        endpoint = HostnameEndpoint(reactor, decision.target.host, port, timeout=5)

        def connected(pipe: _Pipe) -> None:
            self.target = pipe.transport
            transport.write(self.answer(Reason.OK))
            for data in self.pending:
                self.target.write(data)
            transport.resumeProducing()

        def failed(failure: Any) -> None:
            self.fail(Reason.REFUSED)

        endpoint.connect(Factory.forProtocol(lambda: _Pipe(transport))).addCallbacks(
            connected, failed)

    def forward(self, data: bytes) -> None:
        """Early data waits for the dial; later data goes straight to the target."""
        if self.target is None:
            self.pending.append(data)
        else:
            self.target.write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        """The client went away: close the target."""
        if self.target is not None:
            self.target.loseConnection()


class _SocksAdapter(TunnelAdapter):
    def __init__(self, allow: AllowList, credentials: tuple[str, str] | None) -> None:
        super().__init__(allow)
        self.server = SocksServer(credentials)

    def answer(self, reason: Reason) -> bytes:
        self.server.reply(socks.reply_for_reason(reason))
        return self.server.data_to_send()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        transport: Any = self.transport
        try:
            events = self.server.receive_data(data)
        except SocksError as e:
            transport.write(e.reply)
            transport.loseConnection()
            return
        transport.write(self.server.data_to_send())
        for event in events:
            if isinstance(event, ConnectRequested):
                self.connect(event.host, event.port)
            elif isinstance(event, EarlyData):
                self.forward(event.data)
        if self.server.must_close:
            transport.loseConnection()


def listen(test: TestCase, make: Callable[[], Protocol]) -> int:
    """Listen on 127.0.0.1, port 0, until the test ends; the port chosen."""
    factory: Any = ServerFactory.forProtocol(make)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    address: Any = port.getHost()
    return int(address.port)


def curl(*args: str) -> Deferred[tuple[bytes, bytes, int]]:
    """Run curl with a deadline; (stdout, stderr, exit code)."""
    assert _CURL is not None
    run: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        _CURL, ("-sS", "--max-time", "10", *args), env=dict(os.environ), reactor=reactor)
    return run


class CurlSocksTests(TestCase):
    """curl --socks5-hostname through the parser: allowed, denied, with login."""

    if _CURL is None:
        skip = "curl is not installed (Debian: apt-get install curl)"

    def setUp(self) -> None:
        self.target_port = listen(self, _Target)
        self.allow = AllowList([parse_rule("localhost", str(self.target_port))])

    def proxy(self, credentials: tuple[str, str] | None = None) -> int:
        """A SOCKS5 adapter's port."""
        return listen(self, lambda: _SocksAdapter(self.allow, credentials))

    @inlineCallbacks
    def test_allowed_name(self) -> Any:
        """curl's request for a name reaches the target; localhost. is dialled as localhost."""
        proxy = self.proxy()
        for host in ("localhost", "localhost."):
            out, err, code = yield curl("--socks5-hostname", f"127.0.0.1:{proxy}",
                                        f"http://{host}:{self.target_port}/")
            self.assertEqual((out, code), (TARGET_BODY, 0), err)

    @inlineCallbacks
    def test_denied_is_not_allowed_by_ruleset(self) -> Any:
        """A target outside the list makes curl report reply 2 (not allowed by ruleset)."""
        proxy = self.proxy()
        out, err, code = yield curl("--socks5-hostname", f"127.0.0.1:{proxy}",
                                    f"http://127.0.0.1:{self.target_port}/")
        self.assertEqual((out, code), (b"", 97), err)
        self.assertIn(b"(2)", err)

    @inlineCallbacks
    def test_username_password(self) -> Any:
        """curl's RFC 1929 login is admitted with the right password, refused without."""
        proxy = self.proxy(("alice", "s3cret"))
        url = f"http://localhost:{self.target_port}/"
        out, err, code = yield curl("--socks5-hostname", f"127.0.0.1:{proxy}",
                                    "--proxy-user", "alice:s3cret", url)
        self.assertEqual((out, code), (TARGET_BODY, 0), err)
        out, err, code = yield curl("--socks5-hostname", f"127.0.0.1:{proxy}",
                                    "--proxy-user", "alice:wrong", url)
        self.assertEqual((out, code), (b"", 97), err)
        out, err, code = yield curl("--socks5-hostname", f"127.0.0.1:{proxy}", url)
        self.assertEqual((out, code), (b"", 97), err)
