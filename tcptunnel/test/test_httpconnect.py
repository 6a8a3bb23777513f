"""Tests for the HTTP CONNECT request parser (tcptunnel._httpconnect)."""

from __future__ import annotations

import base64
import ipaddress
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel import _httpconnect as hc
from tcptunnel._allow import AllowList, parse_rule
from tcptunnel._frames import Reason
from tcptunnel._httpconnect import ConnectParser, ConnectRequested, EarlyData, HttpConnectError
from tcptunnel.test.test_socks import (
    _CURL,
    TARGET_BODY,
    TunnelAdapter,
    _Target,
    curl,
    listen,
    split,
)

EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "200"))

CURL_HEAD = (b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n"
             b"User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n")


def basic(user: str, password: str) -> bytes:
    """A Proxy-Authorization header line."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}\r\n".encode()


def head(target: bytes, *headers: bytes, method: bytes = b"CONNECT",
         version: bytes = b"HTTP/1.1") -> bytes:
    """A request head."""
    return method + b" " + target + b" " + version + b"\r\n" + b"".join(headers) + b"\r\n"


def status_of(response: bytes) -> int:
    """The status code of a response."""
    return int(response.split(b" ", 2)[1])


class ParserTests(SynchronousTestCase):
    """Requests as clients send them, and the answers to bad ones."""

    def test_curl_connect(self) -> None:
        """curl's CONNECT gives host and port; nothing is answered before the dial."""
        parser = ConnectParser()
        self.assertEqual(parser.receive_data(CURL_HEAD), [ConnectRequested("example.org", 443)])
        self.assertTrue(parser.done)

    def test_ipv6_and_ipv4_literals(self) -> None:
        """``[v6]:port`` is unbracketed and compressed; IPv4 literals pass as written."""
        parser = ConnectParser()
        self.assertEqual(parser.receive_data(head(b"[2001:DB8:0::1]:22")),
                         [ConnectRequested("2001:db8::1", 22)])
        self.assertEqual(ConnectParser().receive_data(head(b"192.0.2.1:8080")),
                         [ConnectRequested("192.0.2.1", 8080)])

    def test_bare_lf_and_leading_empty_line(self) -> None:
        """Bare LF line ends and one empty line before the request are accepted (RFC 9112)."""
        data = b"\r\nCONNECT h.example:80 HTTP/1.0\nHost: h.example\n\n"
        self.assertEqual(ConnectParser().receive_data(data), [ConnectRequested("h.example", 80)])

    def test_early_data(self) -> None:
        """Bytes after the head are early data, in the same read and later ones."""
        parser = ConnectParser()
        events = parser.receive_data(CURL_HEAD + b"\x16\x03\x01")
        self.assertEqual(events[1], EarlyData(b"\x16\x03\x01"))
        self.assertEqual(parser.receive_data(b"more"), [EarlyData(b"more")])

    def test_other_methods_405(self) -> None:
        """GET, POST and lower-case connect are 405 with Allow: CONNECT."""
        for method in (b"GET", b"POST", b"connect", b"OPTIONS"):
            with self.assertRaises(HttpConnectError) as caught:
                ConnectParser().receive_data(head(b"http://example.org/", method=method))
            self.assertEqual(caught.exception.status, 405)
            self.assertIn(b"\r\nAllow: CONNECT\r\n", caught.exception.response)
            self.assertIn(b"\r\nConnection: close\r\n", caught.exception.response)

    def test_malformed_400(self) -> None:
        """Malformed request lines, targets and headers are 400."""
        cases = [
            b"CONNECT example.org:443\r\n\r\n",
            b"CONNECT  example.org:443 HTTP/1.1\r\n\r\n",
            b"CONNECT example.org:443 HTTP/1.1 x\r\n\r\n",
            b"CONNECT example.org:443 HTTX/1.1\r\n\r\n",
            head(b"example.org"),
            head(b"example.org:"),
            head(b"example.org:0"),
            head(b"example.org:65536"),
            head(b"example.org:+443"),
            head(b"example.org:123456"),
            head(b"::1:443"),
            head(b"[::1]443"),
            head(b"[::1"),
            head(b"[example.org]:443"),
            head(b"[fe80::1%25eth0]:443"),
            head(b"user@example.org:443"),
            head(b"exa%6Dple.org:443"),
            head(b"/etc:443"),
            head(b"http://example.org:443"),
            head(b"example.org:443", b" folded\r\n"),
            head(b"example.org:443", b"X-A\r\n"),
            head(b"example.org:443", b"X A: b\r\n"),
            head(b"example.org:443", b"X-A: b\x00c\r\n"),
            head(b"example.org:443", b"X-A: b\rc\r\n"),
            head(b"example.org:443", basic("a", "b"), basic("a", "b")),
            b"\r\n\r\n",
        ]
        for data in cases:
            with self.assertRaises(HttpConnectError, msg=data) as caught:
                ConnectParser(("a", "b")).receive_data(data)
            self.assertEqual(caught.exception.status, 400, data)

    def test_version_505(self) -> None:
        """HTTP/2.0 on this port is 505."""
        with self.assertRaises(HttpConnectError) as caught:
            ConnectParser().receive_data(head(b"h.example:1", version=b"HTTP/2.0"))
        self.assertEqual(caught.exception.status, 505)

    def test_head_bound_431(self) -> None:
        """A head longer than the bound is 431 and the parser stops holding it."""
        parser = ConnectParser(max_head_bytes=1024)
        parser.receive_data(b"CONNECT h.example:1 HTTP/1.1\r\n")
        with self.assertRaises(HttpConnectError) as caught:
            for _ in range(100):
                parser.receive_data(b"X-Padding: " + b"a" * 30 + b"\r\n")
                self.assertLessEqual(parser.buffered, 1024 + 43)
        self.assertEqual(caught.exception.status, 431)
        self.assertEqual(parser.buffered, 0)
        self.assertEqual(parser.receive_data(b"\r\n"), [])
        long_line = head(b"h.example:1", b"X: " + b"a" * hc.MAX_HEAD_BYTES + b"\r\n")
        with self.assertRaises(HttpConnectError) as caught:
            ConnectParser().receive_data(long_line)
        self.assertEqual(caught.exception.status, 431)
        many = head(b"h.example:1", *[b"X: a\r\n"] * (hc.MAX_HEADERS + 1))
        with self.assertRaises(HttpConnectError) as caught:
            ConnectParser().receive_data(many)
        self.assertEqual(caught.exception.status, 431)


class AuthTests(SynchronousTestCase):
    """Proxy-Authorization: Basic when the Binding has credentials."""

    def test_right_credentials(self) -> None:
        """The right user and password (any scheme case) are admitted, with the user named."""
        parser = ConnectParser(("alice", "pä:ss"))
        header = basic("alice", "pä:ss").replace(b"Basic", b"bAsIc")
        self.assertEqual(parser.receive_data(head(b"h.example:22", header)),
                         [ConnectRequested("h.example", 22, "alice")])

    def test_missing_or_wrong_407(self) -> None:
        """Missing, wrong, non-Basic or undecodable credentials are 407 with a challenge."""
        for headers in ((), (basic("alice", "wrong"),), (basic("bob", "pä:ss"),),
                        (b"Proxy-Authorization: Bearer abc\r\n",),
                        (b"Proxy-Authorization: Basic !!!\r\n",),
                        (b"Proxy-Authorization: Basic\r\n",),
                        (b"Authorization: " + basic("alice", "pä:ss")[21:],)):
            with self.assertRaises(HttpConnectError) as caught:
                ConnectParser(("alice", "pä:ss")).receive_data(head(b"h.example:22", *headers))
            self.assertEqual(caught.exception.status, 407, headers)
            self.assertIn(b'\r\nProxy-Authenticate: Basic realm="tcptunnel", charset="UTF-8"\r\n',
                          caught.exception.response)

    def test_no_credentials_configured(self) -> None:
        """Without credentials, a Proxy-Authorization header is ignored."""
        self.assertEqual(ConnectParser().receive_data(head(b"h.example:22", basic("x", "y"))),
                         [ConnectRequested("h.example", 22)])


class ResponseTests(SynchronousTestCase):
    """Answers to a CONNECT once the dial's outcome is known."""

    def test_status_for_reasons(self) -> None:
        """200 only for OK, 403 for a denial, 504 for a timeout, 502/503 for the rest."""
        expected = {Reason.OK: 200, Reason.DENIED: 403, Reason.INVALID_TARGET: 403,
                    Reason.TIMEOUT: 504, Reason.REFUSED: 502, Reason.UNREACHABLE: 502,
                    Reason.DNS_FAILURE: 502, Reason.CONNECTION_RESET: 502,
                    Reason.NO_PARTNER: 503, Reason.LIMIT: 503, Reason.INTERNAL: 502,
                    Reason.UNKNOWN: 502}
        for reason, status in expected.items():
            self.assertEqual(hc.status_for_reason(reason), status, reason)

    def test_response_bytes(self) -> None:
        """200 is a bare status line; errors have a length, a close and an escaped body."""
        self.assertEqual(hc.response_for_reason(Reason.OK),
                         b"HTTP/1.1 200 Connection established\r\n\r\n")
        response = hc.response_for_reason(Reason.DENIED, "x.example:22 is not allowed\x1b[2J")
        self.assertEqual(response,
                         b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Length: 35\r\nConnection: close\r\n\r\n"
                         b"x.example:22 is not allowed\\x1b[2J\n")
        self.assertEqual(status_of(hc.timeout_response()), 408)


_hosts = st.one_of(
    st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9-]{1,20}){0,4}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)


class FuzzTests(SynchronousTestCase):
    """Arbitrary splits and garbage."""

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(_hosts, st.integers(1, 65535), st.lists(st.from_regex(
        r"[A-Za-z-]{1,10}: [ -~]{0,40}", fullmatch=True), max_size=5),
        st.binary(max_size=64), st.lists(st.integers(0, 3000), max_size=12), st.booleans())
    def test_any_split_same_events(self, host: str, port: int, extra: list[str], early: bytes,
                                   cuts: list[int], lf_only: bool) -> None:
        """A valid head split anywhere gives the same request and early data."""
        extra = [h for h in extra if not h.lower().startswith("proxy-authorization")]
        eol = b"\n" if lf_only else b"\r\n"
        data = (f"CONNECT {host}:{port} HTTP/1.1".encode() + eol
                + b"".join(h.encode() + eol for h in extra) + basic("u", "p")[:-2] + eol
                + eol + early)
        parser = ConnectParser(("u", "p"))
        events: list[hc.Event] = []
        for piece in split(data, cuts):
            events += parser.receive_data(piece)
            self.assertLessEqual(parser.buffered, len(data))
        expected = str(ipaddress.ip_address(host[1:-1])) if host.startswith("[") else host
        self.assertEqual(events[0], ConnectRequested(expected, port, "u"))
        self.assertEqual(b"".join(e.data for e in events[1:] if isinstance(e, EarlyData)), early)

    @settings(max_examples=EXAMPLES * 2, deadline=None)
    @given(st.booleans(), st.lists(st.binary(max_size=3000), max_size=10))
    def test_garbage(self, with_auth: bool, chunks: list[bytes]) -> None:
        """Any bytes: only HttpConnectError escapes, with a complete response, and the
        parser never holds more than its bound plus one read."""
        parser = ConnectParser(("u", "p") if with_auth else None, max_head_bytes=2048)
        for chunk in chunks:
            try:
                parser.receive_data(chunk)
            except HttpConnectError as e:
                self.assertIn(e.status, (400, 405, 407, 431, 505))
                self.assertTrue(e.response.startswith(f"HTTP/1.1 {e.status} ".encode()))
                self.assertTrue(parser.failed)
            self.assertLessEqual(parser.buffered, 2048 + 3000)


class _ConnectAdapter(TunnelAdapter):
    """The CONNECT parser on a real socket (test-only; see test_socks.TunnelAdapter)."""

    def __init__(self, allow: AllowList, credentials: tuple[str, str] | None) -> None:
        super().__init__(allow)
        self.parser = ConnectParser(credentials)

    def answer(self, reason: Reason) -> bytes:
        return hc.response_for_reason(reason, "test adapter")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        transport: Any = self.transport
        try:
            events = self.parser.receive_data(data)
        except HttpConnectError as e:
            transport.write(e.response)
            transport.loseConnection()
            return
        for event in events:
            if isinstance(event, ConnectRequested):
                self.connect(event.host, event.port)
            elif isinstance(event, EarlyData):
                self.forward(event.data)


class CurlConnectTests(TestCase):
    """curl -x with --proxytunnel through the parser: allowed, denied, login, GET."""

    if _CURL is None:
        skip = "curl is not installed (Debian: apt-get install curl)"

    def setUp(self) -> None:
        self.target_port = listen(self, _Target)
        self.allow = AllowList([parse_rule("localhost", str(self.target_port))])

    def proxy(self, credentials: tuple[str, str] | None = None) -> str:
        """An http-connect adapter's URL."""
        port = listen(self, lambda: _ConnectAdapter(self.allow, credentials))
        return f"http://127.0.0.1:{port}"

    @inlineCallbacks
    def test_allowed(self) -> Any:
        """curl's CONNECT reaches the target and the tunnel carries its request."""
        out, err, code = yield curl("-p", "-x", self.proxy(),
                                    f"http://localhost:{self.target_port}/")
        self.assertEqual((out, code), (TARGET_BODY, 0), err)

    @inlineCallbacks
    def test_denied_403(self) -> Any:
        """A target outside the list makes curl report the proxy's 403."""
        out, err, code = yield curl("-p", "-x", self.proxy(),
                                    f"http://127.0.0.1:{self.target_port}/")
        self.assertEqual((out, code), (b"", 56), err)
        self.assertIn(b"403", err)

    @inlineCallbacks
    def test_login(self) -> Any:
        """curl's Proxy-Authorization Basic is admitted; a wrong password is 407."""
        proxy, url = self.proxy(("alice", "pä:ss")), f"http://localhost:{self.target_port}/"
        out, err, code = yield curl("-p", "-x", proxy, "--proxy-user", "alice:pä:ss", url)
        self.assertEqual((out, code), (TARGET_BODY, 0), err)
        out, err, code = yield curl("-p", "-x", proxy, "--proxy-user", "alice:wrong", url)
        self.assertEqual(code, 56, err)
        self.assertIn(b"407", err)

    @inlineCallbacks
    def test_plain_proxy_request_405(self) -> Any:
        """curl -x without -p sends GET http://...: answered 405, curl --fail exits 22."""
        out, err, code = yield curl("--fail", "-x", self.proxy(),
                                    f"http://localhost:{self.target_port}/")
        self.assertEqual((out, code), (b"", 22), err)
        self.assertIn(b"405", err)
