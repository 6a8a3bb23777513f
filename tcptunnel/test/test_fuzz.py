"""Property-based fuzzing of the mux state machine with hostile frame sequences.

``make test`` runs a bounded number of examples; ``make fuzz`` runs many more
(TCPTUNNEL_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import contextlib
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _frames as fr
from tcptunnel import _mux
from tcptunnel._frames import FrameType, LinkError

EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "150"))

stream_ids = st.integers(min_value=0, max_value=6)
payloads = st.binary(max_size=300)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame: well-formed ones of every type, or arbitrary type/flags/payload."""
    sid = draw(stream_ids)
    kind = draw(st.sampled_from(["open", "result", "data", "window", "fin", "reset", "ping",
                                 "partner", "goaway", "raw", "auth"]))
    if kind == "open":
        host = draw(st.sampled_from(["h", "example.org", "", "a b", "x" * 260]))
        port = draw(st.integers(min_value=0, max_value=70000))
        window = draw(st.integers(min_value=0, max_value=2**32 - 1))
        return fr.encode(FrameType.OPEN, sid, fr.open_payload(
            window, 0, draw(st.sampled_from([fr.KIND_TCP, fr.KIND_TCP, 7])),
            fr.target_fields(host, port % 65536)))
    if kind == "result":
        return fr.encode(FrameType.OPEN_RESULT, sid, bytes([draw(st.integers(0, 255))])
                         + draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big"))
    if kind == "data":
        return fr.encode(FrameType.DATA, sid, draw(payloads), draw(st.integers(0, 255)))
    if kind == "window":
        return fr.encode(FrameType.WINDOW_UPDATE, sid,
                         draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big"))
    if kind == "fin":
        return fr.build_fin(sid)
    if kind == "reset":
        return fr.encode(FrameType.RESET, sid, draw(payloads))
    if kind == "ping":
        return fr.encode(FrameType.PING, sid, draw(st.binary(min_size=0, max_size=10)))
    if kind == "partner":
        return fr.encode(FrameType.PARTNER, sid, draw(st.binary(max_size=6)))
    if kind == "goaway":
        return fr.encode(FrameType.GOAWAY, sid, draw(payloads))
    if kind == "auth":
        return fr.encode(draw(st.sampled_from([0x10, 0x11, 0x12, 0x13])), sid, draw(payloads))
    return fr.encode(draw(st.integers(0, 255)), sid, draw(payloads), draw(st.integers(0, 255)))


def check_invariants(test: SynchronousTestCase, core: _mux.MuxConnection) -> None:
    """What must hold whatever the peer sent."""
    test.assertLessEqual(len(core.streams), core.max_streams)
    test.assertEqual(core.granted_total, sum(s.recv_window for s in core.streams.values()))
    for stream in core.streams.values():
        test.assertGreaterEqual(stream.send_window, 0)
        test.assertLessEqual(stream.send_window, fr.MAX_WINDOW)
        test.assertGreaterEqual(stream.recv_available, 0)
        test.assertLessEqual(stream.recv_available, stream.recv_window)
        test.assertEqual(stream.send_buffered, sum(map(len, stream.send_buffer))
                         - stream.send_offset)


class MuxFuzzTests(SynchronousTestCase):
    """Hostile frame sequences: the core raises only LinkError and keeps its invariants."""

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(opener=st.booleans(), sequence=st.lists(frames(), max_size=40),
           splits=st.lists(st.integers(1, 50), max_size=20),
           local=st.lists(st.sampled_from(["open", "send", "consume", "end", "reset", "pull"]),
                          max_size=20))
    def test_hostile_sequences(self, opener: bool, sequence: list[bytes], splits: list[int],
                               local: list[str]) -> None:
        """Any frames, split anywhere, mixed with local actions: no crash, invariants hold."""
        core = _mux.MuxConnection(opener=opener, max_streams=4, initial_window=20_000,
                                  max_window=80_000, receive_budget=100_000)
        core.receive_data(fr.build_hello())
        core.mark_ready()
        data = b"".join(sequence)
        offset = 0
        actions = iter(local)
        try:
            for cut in [*splits, len(data)]:
                events = core.receive_data(data[offset : offset + cut])
                offset += cut
                for event in events:
                    if isinstance(event, _mux.StreamOpenRequested):
                        core.accept_stream(event.stream_id)
                    elif isinstance(event, _mux.DataReceived):
                        core.data_consumed(event.stream_id, len(event.data))
                action = next(actions, "pull")
                live = list(core.streams)
                if action == "open" and opener:
                    with contextlib.suppress(fr.StreamError):  # the stream limit
                        core.open_stream("target", 22)
                elif action == "send" and live:
                    stream = core.streams[live[0]]
                    if stream.state is not _mux.StreamState.OPENING:
                        core.send_data(live[0], b"z" * 5000)
                elif action == "end" and live:
                    core.end_stream(live[-1])
                elif action == "reset" and live:
                    core.reset_stream(live[0], fr.Reason.CANCELLED)
                core.data_to_send()
                check_invariants(self, core)
        except LinkError as e:
            self.assertIsInstance(e.code, fr.GoAway)
            self.assertTrue(e.message)


# Pieces SCRAM messages are made of, valid and hostile, so that generated messages get past
# the first checks often enough to reach the later ones.
_scram_pieces = st.sampled_from([
    "n", "y", "p=tls-unique", "", ",", "=", "==", "n=7:0", "n=7=2C0", "n==3D", "r=", "r=abc",
    "c=biws", "c=eSws", "c=", "p=", "p=AAAA", "p=" + "A" * 44, "s=", "s=AAAA", "s=!!", "i=1",
    "i=0", "i=-1", "i=4096", "i=x", "v=", "v=" + "A" * 44, "e=other-error", "m=ext", "a=admin",
    "\x00", "é",
])
scram_messages = st.one_of(
    st.lists(st.one_of(_scram_pieces, st.text(max_size=12)), max_size=8).map("".join),
    st.text(max_size=80),
)


class ScramFuzzTests(SynchronousTestCase):
    """Hostile SCRAM messages on either side fail with LoginFailed and nothing else: any
    other exception would escape the link's frame handler."""

    def setUp(self) -> None:
        from tcptunnel.auth import make_auth_info

        self.info = make_auth_info("pw", iterations=1)

    @settings(max_examples=EXAMPLES * 2, deadline=None)
    @given(client_first=scram_messages, client_final=scram_messages,
           prefix=st.booleans())
    def test_gateway_side(self, client_first: str, client_final: str, prefix: bool) -> None:
        """Any client-first, then any client-final (or one that starts like the real one)."""
        from tcptunnel.auth import GatewayAuth, LoginFailed, scram_username

        server = GatewayAuth(self.info, scram_username(7, 0), b"k" * 32, nonce="SRV")
        with contextlib.suppress(LoginFailed):
            server.challenge(client_first)
            if prefix:
                client_final = f"c=biws,r={client_first.rpartition('r=')[2]}SRV," + client_final
            server.finish(client_final)

    @settings(max_examples=EXAMPLES * 2, deadline=None)
    @given(nonce_suffix=st.text(max_size=10), salt=st.sampled_from(["AAAA", "", "!!", "QUJD"]),
           iterations=st.one_of(st.integers(-3, 3000).map(str), st.text(max_size=6)),
           extra=scram_messages, server_final=scram_messages)
    def test_proxy_side(self, nonce_suffix: str, salt: str, iterations: str, extra: str,
                        server_final: str) -> None:
        """Any server-first built around our nonce, then any server-final."""
        from tcptunnel.auth import LoginFailed, ProxyAuth

        client = ProxyAuth(7, 0, "pw", nonce="CLI")
        with contextlib.suppress(LoginFailed):
            client.proof(f"r=CLI{nonce_suffix},s={salt},i={iterations}{extra}")
        with contextlib.suppress(LoginFailed):
            client.verify(server_final)


# -- the Gateway adapter ---------------------------------------------------------------------

from typing import Any, cast  # noqa: E402  (this part came later; its imports stay with it)


class Reader:
    """What a StringTransport received so far, decoded as frames as it comes."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.decoder = fr.FrameDecoder(expect_magic=True)
        self.offset = 0
        self.seen: list[fr.Frame] = []

    def frames(self) -> list[fr.Frame]:
        """The frames written since the last call."""
        value = self.transport.value()
        new = self.decoder.feed(value[self.offset :])
        self.offset = len(value)
        self.seen.extend(new)
        return new


class GatewayAdapterFuzzTests(SynchronousTestCase):
    """The Gateway adapter (GatewayLink over StringTransport, a Clock) fed hostile bytes before
    and after a real login, cut anywhere: nothing escapes ``dataReceived``, a link closed for a
    violation says why in its last frame (a GOAWAY with a documented code), and a healthy
    session on the same Gateway keeps routing an echo, byte for byte."""

    # The codes a link the Gateway closes may carry (docs/protocol.md §4).
    CODES = frozenset(fr.GoAway) - {fr.GoAway.UNKNOWN}

    def setUp(self) -> None:
        from twisted.logger import ILogObserver, globalLogPublisher

        self.failures: list[dict[str, object]] = []

        def observe(event: dict[str, object]) -> None:
            text = str(event.get("log_format", ""))
            if "log_failure" in event or "Unhandled" in text:
                self.failures.append(event)

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def gateway(self) -> Any:
        from twisted.internet.task import Clock

        from tcptunnel.gateway import Gateway
        from tcptunnel.test.test_gateway import gateway_config

        sessions = "".join(f'<Session id="{i}" proxyClientPassword="pc{i}" '
                           f'proxyServerPassword="ps{i}"/>' for i in (1, 2))
        return Gateway(gateway_config('loginTimeout="5"', session=sessions), Clock())

    def connect(self, gateway: Any, host: str = "192.0.2.1") -> tuple[Any, Any]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from tcptunnel.gateway import GatewayLink

        link = GatewayLink(gateway)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 4000))
        link.makeConnection(transport)
        return link, transport

    def login(self, gateway: Any, session: int, role: int) -> tuple[Any, Any, Reader]:
        """A link logged in with the right password (ProxyAuth), its output read so far."""
        from tcptunnel.auth import ProxyAuth

        link, transport = self.connect(gateway)
        reader = Reader(transport)
        password = f"{'pc' if role == fr.ROLE_PROXY_CLIENT else 'ps'}{session}"
        auth = ProxyAuth(session, role, password)
        link.dataReceived(fr.build_hello() + fr.build_auth_start(role, session, auth.start()))
        (challenge,) = [f for f in reader.frames() if f.type == FrameType.AUTH_CHALLENGE]
        link.dataReceived(fr.build_auth_message(FrameType.AUTH_PROOF,
                                                auth.proof(challenge.payload.decode())))
        (result,) = [f for f in reader.frames() if f.type == FrameType.AUTH_RESULT]
        ok, final = fr.parse_auth_result(result.payload)
        self.assertTrue(ok)
        auth.verify(final)
        return link, transport, reader

    def check_closed_with_reason(self, link: Any, transport: Any, reader: Reader) -> None:
        """A link the Gateway closed ends with its GOAWAY (unless its peer sent GOAWAY
        first, which needs no answer); nothing escaped as an unhandled error."""
        reader.frames()
        self.assertEqual(self.failures, [])
        self.assertEqual(self.flushLoggedErrors(), [])
        if not transport.disconnecting:
            return
        if link.close_reason.startswith("peer sent GOAWAY"):
            return
        self.assertTrue(reader.seen, "closed without a word")
        last = reader.seen[-1]
        self.assertEqual(last.type, FrameType.GOAWAY, link.close_reason)
        code, _ = fr.parse_goaway(last.payload)
        self.assertIn(code, self.CODES)
        self.assertTrue(link.close_reason.startswith(code.name), (code, link.close_reason))

    def feed_cut(self, link: Any, data: bytes, splits: list[int]) -> None:
        offset = 0
        for cut in [*splits, len(data)]:
            if offset >= len(data):
                break
            link.dataReceived(data[offset : offset + cut])
            offset += cut

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hello=st.sampled_from([b"", fr.build_hello(), fr.build_hello(version=1),
                                  fr.MAGIC, b"GET / HTTP/1.1\r\n"]),
           raw=st.one_of(st.binary(max_size=200), st.lists(frames(), max_size=12).map(b"".join)),
           splits=st.lists(st.integers(1, 40), max_size=10))
    def test_hostile_bytes_before_login(self, hello: bytes, raw: bytes,
                                        splits: list[int]) -> None:
        """Any bytes or frames before login, cut anywhere: no unhandled error, a closed link
        says why, and the login deadline closes whatever is left."""
        gateway = self.gateway()
        link, transport = self.connect(gateway)
        reader = Reader(transport)
        self.feed_cut(link, hello + raw, splits)
        self.check_closed_with_reason(link, transport, reader)
        gateway.clock.advance(gateway.limits.login_timeout + 1)
        self.assertTrue(transport.disconnecting)
        self.check_closed_with_reason(link, transport, reader)
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        gateway.clock.advance(60)  # every abort timer and throttle hold runs out
        link.connectionLost(Failure(ConnectionDone()))  # what the reactor does next
        self.assertEqual(gateway.unauthenticated, set())
        self.assertEqual(gateway.relay.total.queued, 0)
        self.assertEqual(self.failures, [])

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(role=st.sampled_from([fr.ROLE_PROXY_CLIENT, fr.ROLE_PROXY_SERVER]),
           sequence=st.lists(frames(), max_size=30),
           splits=st.lists(st.integers(1, 60), max_size=12),
           partner=st.booleans())
    def test_hostile_link_after_login_beside_a_healthy_session(
            self, role: int, sequence: list[bytes], splits: list[int], partner: bool) -> None:
        """A logged-in hostile link of session 1 (with or without a partner that never
        reads) sends any frames, cut anywhere, between the rounds of an echo in session 2:
        every round of the echo arrives exactly, nothing escapes, and if the hostile link
        is closed it says why."""
        gateway = self.gateway()
        client, _client_transport, client_reader = self.login(gateway, 2, fr.ROLE_PROXY_CLIENT)
        server, _server_transport, server_reader = self.login(gateway, 2, fr.ROLE_PROXY_SERVER)
        if partner:
            other = fr.ROLE_PROXY_SERVER if role == fr.ROLE_PROXY_CLIENT else (
                fr.ROLE_PROXY_CLIENT)
            self.login(gateway, 1, other)
        hostile, hostile_transport, hostile_reader = self.login(gateway, 1, role)
        # The healthy stream: OPEN from the Proxy-Server, accepted by the Proxy-Client.
        server.dataReceived(fr.build_open(1, fr.OpenRequest(1_000_000, 0, "echo.example", 7)))
        (opened,) = [f for f in client_reader.frames() if f.type == FrameType.OPEN]
        client.dataReceived(fr.build_open_result(opened.stream_id, fr.Reason.OK, 1_000_000))
        self.assertIn(FrameType.OPEN_RESULT, [f.type for f in server_reader.frames()])
        data = b"".join(sequence)
        pieces = []
        offset = 0
        for cut in [*splits, len(data)]:
            pieces.append(data[offset : offset + cut])
            offset += cut
        for round_number, piece in enumerate(pieces):
            hostile.dataReceived(piece)
            message = f"round {round_number} ".encode() * (round_number + 1)
            server.dataReceived(fr.encode(FrameType.DATA, 1, message))
            got = [f for f in client_reader.frames() if f.type == FrameType.DATA]
            self.assertEqual([(f.stream_id, f.payload) for f in got],
                             [(opened.stream_id, message)])
            client.dataReceived(fr.encode(FrameType.DATA, opened.stream_id, message[::-1]))
            back = [f for f in server_reader.frames() if f.type == FrameType.DATA]
            self.assertEqual([(f.stream_id, f.payload) for f in back], [(1, message[::-1])])
            self.check_closed_with_reason(hostile, hostile_transport, hostile_reader)
        self.assertFalse(client.transport.disconnecting or server.transport.disconnecting)

    def test_frames_before_a_goaway_in_the_same_read_are_routed(self) -> None:
        """A Proxy-Server that sends its last bytes and FIN and then closes its link (DATA,
        FIN, GOAWAY in one read) has them delivered before the stream is reset for the lost
        link: frames are handled in wire order, the GOAWAY after them, not first."""
        gateway = self.gateway()
        client, _client_transport, client_reader = self.login(gateway, 2, fr.ROLE_PROXY_CLIENT)
        server, _server_transport, server_reader = self.login(gateway, 2, fr.ROLE_PROXY_SERVER)
        server.dataReceived(fr.build_open(1, fr.OpenRequest(1_000_000, 0, "echo.example", 7)))
        (opened,) = [f for f in client_reader.frames() if f.type == FrameType.OPEN]
        client.dataReceived(fr.build_open_result(opened.stream_id, fr.Reason.OK, 1_000_000))
        server_reader.frames()
        server.dataReceived(fr.encode(FrameType.DATA, 1, b"the last bytes") + fr.build_fin(1)
                            + fr.build_goaway(fr.GoAway.NORMAL, "stopping"))
        got = [(f.type, f.stream_id, f.payload) for f in client_reader.frames()
               if f.stream_id]
        self.assertEqual(got[:2], [(FrameType.DATA, opened.stream_id, b"the last bytes"),
                                   (FrameType.FIN, opened.stream_id, b"")])
        self.assertEqual([frame_type for frame_type, _, _ in got[2:]], [FrameType.RESET])
