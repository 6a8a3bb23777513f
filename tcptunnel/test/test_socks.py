"""Tests for the SOCKS5 server-side parser (tcptunnel._socks)."""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _socks as socks
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
        self.assertRaises(SocksError, server.reply, Reply.SUCCEEDED)

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
