"""End-to-end encryption through a real tunnel (issue 16, docs/protocol.md §9).

Gateway, Proxy-Servers and Proxy-Clients on loopback sockets, with plain TCP links that run
through relays between the Gateway and each proxy: a recording relay (what a Gateway's host
sees) and a malicious one that changes the Proxy-Client's DATA frames of sealed streams.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel import _e2e
from tcptunnel import _frames as fr
from tcptunnel._e2e import ServerState
from tcptunnel.config import ConfigError
from tcptunnel.e2e import SEALED_READ_SIZE, SealedStream, ServerEndToEnd, _open_raw
from tcptunnel.mux import MuxStream
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.splice import SpliceProtocol
from tcptunnel.test._harness import (
    NS,
    EchoProtocol,
    Tunnel,
    binding_port,
    connect,
    listen,
    reserve_port,
    spawn_twistd,
    wait_until,
)
from tcptunnel.test._hostile import LogCapture
from tcptunnel.test.test_muxprotocol import Ends, LocalSocket

E2E_PASSWORD = "correct horse battery staple e2e"
MARKER = b"MARKER-7f3a-the-secret-payload"
TARGET_NAME = "localhost"

# A frame-level change the relay makes to the Proxy-Client's DATA frames of one sealed
# stream: given the frames seen so far (0-based index) returns the frames to forward.
Tamper = Callable[[int, fr.Frame], list[fr.Frame]]


class _RelayHalf(Protocol):
    """One side of a relayed link: records what it receives and forwards it, frame by frame
    when the relay changes frames, else byte for byte."""

    def __init__(self, relay: Relay, inbound: bool) -> None:
        self.relay = relay
        self.inbound = inbound  # from the proxy (True) or from the Gateway (False)
        self.peer: _RelayHalf | None = None
        self.pending: list[bytes] = []
        self.decoder = fr.FrameDecoder(expect_magic=True, max_payload=fr.MAX_PAYLOAD)
        self.sent_magic = False

    def connectionMade(self) -> None:  # noqa: N802
        if self.inbound:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            relay, inbound = self.relay, self

            class Outbound(ClientFactory):
                def buildProtocol(self, addr: Any) -> _RelayHalf:  # noqa: N802
                    half = _RelayHalf(relay, False)
                    half.peer, inbound.peer = inbound, half
                    return half

            reactor.connectTCP("127.0.0.1", relay.gateway_port, Outbound())
        else:
            assert self.peer is not None
            for data in self.peer.pending:
                self.transport.write(data)  # type: ignore[union-attr]
            self.peer.pending.clear()
            self.peer.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.relay.recorded.append(data)
        if self.relay.tamper is None and not self.relay.decode:
            self.forward(data)
            return
        frames = self.decoder.feed(data)
        out = [] if self.sent_magic else [fr.MAGIC]
        self.sent_magic = True
        for frame in frames:
            for changed in self.relay.change(frame, self):
                out.append(fr.encode(changed.type, changed.stream_id, changed.payload,
                                     changed.flags))
        self.forward(b"".join(out))

    def forward(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        elif data:
            peer.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        self.relay.halves.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class Relay:
    """A TCP relay in front of the Gateway that keeps every byte of its links (both
    directions) and may change the DATA frames a Proxy-Client sends on sealed streams."""

    def __init__(self, gateway_port: int, tamper: Tamper | None = None,
                 decode: bool = False) -> None:
        self.gateway_port = gateway_port
        self.tamper = tamper
        self.decode = decode  # frame by frame even without tampering (for holding)
        self.pake: set[int] = set()  # pake stream ids
        self.holding = False  # keep the proxy's pake frames back
        self.held: list[tuple[_RelayHalf, fr.Frame]] = []
        self.recorded: list[bytes] = []
        self.halves: set[_RelayHalf] = set()
        self.sealed: dict[int, int] = {}  # stream id -> DATA frames seen from the proxy
        self.port = 0

    async def start(self, test: TestCase) -> int:
        """Listen on 127.0.0.1; return the port the proxies connect to."""
        def build() -> _RelayHalf:
            half = _RelayHalf(self, True)
            self.halves.add(half)
            return half

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build))
        test.addCleanup(port.stopListening)
        self.port = int(port.getHost().port)
        return self.port

    def change(self, frame: fr.Frame, half: _RelayHalf) -> list[fr.Frame]:
        """The frames to forward for ``frame``, which ``half`` received."""
        if not half.inbound:
            if frame.type == fr.FrameType.OPEN and frame.payload[8:9] == bytes(
                    [fr.KIND_SEALED]):
                self.sealed[frame.stream_id] = 0
            if frame.type == fr.FrameType.OPEN and frame.payload[8:9] == bytes([fr.KIND_PAKE]):
                self.pake.add(frame.stream_id)
            return [frame]
        if self.holding and frame.stream_id in self.pake:
            self.held.append((half, frame))
            return []
        count = self.sealed.get(frame.stream_id)
        if count is None or frame.type != fr.FrameType.DATA or self.tamper is None:
            return [frame]
        self.sealed[frame.stream_id] = count + 1
        return self.tamper(count, frame)

    def release(self) -> None:
        """Forward the frames held back, and hold no more."""
        self.holding = False
        held, self.held = self.held, []
        for half, frame in held:
            half.forward(fr.encode(frame.type, frame.stream_id, frame.payload, frame.flags))

    def bytes(self) -> bytes:
        """Everything recorded, both directions."""
        return b"".join(self.recorded)


class _Sender(Protocol):
    """A target that answers its first bytes with ``body`` and then closes (FIN)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.body:
            body, self.body = self.body, b""
            self.transport.write(body)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]


class EndToEndTunnelTests(TestCase):
    """Sealed streams between two proxies through a Gateway that cannot read them."""

    timeout = 60

    def setUp(self) -> None:
        self.tunnel = Tunnel(self)
        self.addCleanup(self.tunnel.close)
        self.tunnel.start_gateway()
        self.logs = LogCapture(self)

    # -- roles --------------------------------------------------------------------------

    def client(self, e2e: str | None = E2E_PASSWORD, port: int = 0,
               allowed: str = '<Endpoint host="0.0.0.0/0" port="1-65535"/>'
                              '<Endpoint host="localhost" port="1-65535"/>'
               ) -> ProxyClientService:
        """A Proxy-Client (through a relay on ``port`` if given)."""
        extra = f'endToEndPassword="{e2e}"' if e2e is not None else ""
        return self.tunnel._start_proxy(
            ProxyClientService,
            f'<Instance type="proxy-client" host="127.0.0.1" '
            f'port="{port or self.tunnel.gateway_port}" maxRetryDelay="1">'
            f'<Session id="1" password="client-pw" {extra}/>'
            f'<AllowedTargetEndpoints>{allowed}</AllowedTargetEndpoints></Instance>')

    def server(self, target_port: int, e2e: str | None = E2E_PASSWORD, port: int = 0,
               host: str = "127.0.0.1") -> ProxyServerService:
        """A Proxy-Server with one Binding to host:target_port."""
        extra = f'endToEndPassword="{e2e}"' if e2e is not None else ""
        return self.tunnel._start_proxy(
            ProxyServerService,
            f'<Instance type="proxy-server" host="127.0.0.1" '
            f'port="{port or self.tunnel.gateway_port}" maxRetryDelay="1">'
            f'<Session id="1" password="server-pw" {extra}>'
            f'<Binding listenIp="127.0.0.1" listenPort="0" targetHost="{host}" '
            f'targetPort="{target_port}"/></Session></Instance>')

    async def paired(self, *servers: ProxyServerService) -> None:
        """Wait until every Proxy-Server has end-to-end keys."""
        def done() -> bool:
            return all(isinstance(s.e2e, ServerEndToEnd)
                       and s.e2e.pairing.state is ServerState.PAIRED for s in servers)
        await wait_until(done, 15, "the end-to-end pairing")

    async def echo_round(self, port: int, payload: bytes) -> bytes:
        """Send ``payload`` to an echo target through the Binding on ``port``, half-close,
        and return what came back (after a clean close)."""
        app = await connect(port)
        app.transport.write(payload)
        app.transport.loseWriteConnection()
        how = await app.ended
        self.assertEqual(how, "clean")
        return bytes(app.received)

    # -- the recording Gateway -----------------------------------------------------------

    async def recorded_tunnel(self, e2e: str | None) -> tuple[Relay, bytes]:
        """The link bytes of both proxies while MARKER goes to an echo target named
        localhost and back."""
        echo = await listen(self, EchoProtocol)
        relay = Relay(self.tunnel.gateway_port)
        port = await relay.start(self)
        client = self.client(e2e, port)
        server = self.server(echo, e2e, port, host=TARGET_NAME)
        await self.tunnel.ready(client, server)
        if e2e is not None:
            await self.paired(server)
        got = await self.echo_round(binding_port(server), MARKER * 100)
        self.assertEqual(got, MARKER * 100)
        return relay, relay.bytes()

    async def test_recorded_links_hold_no_plaintext(self) -> None:
        """With end-to-end on, neither link's bytes hold the marker, the target's name or
        the end-to-end password."""
        _relay, recorded = await self.recorded_tunnel(E2E_PASSWORD)
        self.assertGreater(len(recorded), 2 * len(MARKER) * 100)  # the stream did go through
        self.assertNotIn(MARKER, recorded)
        self.assertNotIn(TARGET_NAME.encode(), recorded)
        self.assertNotIn(E2E_PASSWORD.encode(), recorded)

    async def test_recorded_links_control_in_clear(self) -> None:
        """The control: with end-to-end off, the marker and the target's name are in the
        recorded link bytes (so the recorder does see the stream)."""
        _relay, recorded = await self.recorded_tunnel(None)
        self.assertIn(MARKER, recorded)
        self.assertIn(TARGET_NAME.encode(), recorded)

    # -- a malicious Gateway ---------------------------------------------------------------

    async def tampered(self, tamper: Tamper) -> None:
        """A target sends 300 KB; the relay on the Proxy-Client's link applies ``tamper``:
        the application sees a reset, having received an exact prefix, and both proxies
        end the stream with INTEGRITY."""
        body = hashlib.sha256(b"seed").digest() * (300_000 // 32)
        target = await listen(self, lambda: _Sender(body))
        relay = Relay(self.tunnel.gateway_port, tamper)
        port = await relay.start(self)
        client = self.client(port=port)
        server = self.server(target)
        await self.tunnel.ready(client, server)
        await self.paired(server)
        app = await connect(binding_port(server))
        app.transport.write(b"GET")
        how = await app.ended
        self.assertEqual(how, "reset")
        self.assertLess(len(app.received), len(body))
        self.assertEqual(bytes(app.received), body[: len(app.received)])
        await wait_until(lambda: server.stats[("streams_ended", "reset_local",
                                               "INTEGRITY")] == 1, 10, "INTEGRITY at the server")
        await wait_until(lambda: client.stats[("streams_ended", "reset_remote",
                                               "INTEGRITY")] == 1, 10, "INTEGRITY at the client")
        self.assertIn("end-to-end integrity check failed", self.logs.text())

    async def test_flipped_bit(self) -> None:
        """One flipped bit in a DATA frame ends the stream with INTEGRITY."""
        def flip(index: int, frame: fr.Frame) -> list[fr.Frame]:
            if index != 1:
                return [frame]
            payload = bytearray(frame.payload)
            payload[len(payload) // 2] ^= 0x10
            return [fr.Frame(frame.type, frame.flags, frame.stream_id, bytes(payload))]
        await self.tampered(flip)

    async def test_dropped_record(self) -> None:
        """A dropped DATA frame (its records) ends the stream with INTEGRITY."""
        await self.tampered(lambda index, frame: [] if index == 1 else [frame])

    async def test_replayed_record(self) -> None:
        """A DATA frame sent twice ends the stream with INTEGRITY."""
        await self.tampered(lambda index, frame: [frame, frame] if index == 1 else [frame])

    async def test_reordered_records(self) -> None:
        """Two DATA frames swapped end the stream with INTEGRITY."""
        held: list[fr.Frame] = []

        def swap(index: int, frame: fr.Frame) -> list[fr.Frame]:
            if index == 1:
                held.append(frame)
                return []
            if index == 2:
                return [frame, *held]
            return [frame]
        await self.tampered(swap)

    async def test_truncated_stream(self) -> None:
        """DATA dropped from the second frame on, FIN passed: truncation is INTEGRITY,
        never a clean EOF."""
        await self.tampered(lambda index, frame: [] if index >= 1 else [frame])

    # -- policy ---------------------------------------------------------------------------

    async def refused_at_once(self, server: ProxyServerService) -> None:
        """A local connection is reset at once (no stream in clear, no hang)."""
        app = await connect(binding_port(server))
        app.transport.write(MARKER)
        how = await app.ended
        self.assertEqual(how, "reset")
        self.assertEqual(bytes(app.received), b"")

    async def test_password_mismatch(self) -> None:
        """Different end-to-end passwords: both ends log the mismatch by their own check,
        and local connections are refused at once."""
        echo = await listen(self, EchoProtocol)
        client = self.client("another end-to-end password")
        server = self.server(echo)
        await self.tunnel.ready(client, server)
        assert isinstance(server.e2e, ServerEndToEnd)
        e2e = server.e2e
        await wait_until(lambda: e2e.pairing.failure == _e2e.MESSAGE_MISMATCH, 10,
                         "the mismatch at the server")
        await wait_until(lambda: "Session 1: end-to-end handshake with Proxy-Server #1 "
                         "failed: end-to-end password mismatch; the two proxies' "
                         "endToEndPassword values differ: set the same one on both"
                         in self.logs.text(), 10, "the mismatch at the client")
        await self.refused_at_once(server)
        self.assertIn("Session 1: no end-to-end pairing with the Proxy-Client: end-to-end "
                      "password mismatch; the two proxies' endToEndPassword values differ: "
                      "set the same one on both", self.logs.text())

    async def test_partner_without_password(self) -> None:
        """A Proxy-Client without an end-to-end password refuses the handshake with
        E2E_UNAVAILABLE; both ends log what happened in their session and what to set, and
        the Proxy-Server refuses local connections."""
        echo = await listen(self, EchoProtocol)
        client = self.client(None)
        server = self.server(echo)
        await self.tunnel.ready(client, server)
        assert isinstance(server.e2e, ServerEndToEnd)
        e2e = server.e2e
        await wait_until(lambda: (e2e.pairing.failure or "").startswith(
            _e2e.MESSAGE_NO_PASSWORD), 10, "the refusal at the server")
        self.assertIn("Session 1: Proxy-Server #1 requires end-to-end encryption, but this "
                      "Proxy-Client has no end-to-end password: its streams are refused; set "
                      "endToEndPassword on this proxy (the same as the Proxy-Server's)",
                      self.logs.text())
        await wait_until(lambda: "Session 1: no end-to-end pairing with the Proxy-Client: the "
                         "Proxy-Client has no end-to-end password; set endToEndPassword on "
                         "the Proxy-Client too" in self.logs.text(), 10,
                         "the Proxy-Server's line")
        await self.refused_at_once(server)

    async def test_clear_stream_to_a_client_that_requires_it(self) -> None:
        """A Proxy-Server without a password opens in clear; a Proxy-Client with one refuses
        it E2E_REQUIRED before any dial; both ends log what happened and what to set."""
        dialled: list[int] = []

        class Counting(EchoProtocol):
            def connectionMade(self) -> None:  # noqa: N802
                dialled.append(1)

        echo = await listen(self, Counting)
        client = self.client()
        server = self.server(echo, e2e=None)
        await self.tunnel.ready(client, server)
        await self.refused_at_once(server)
        await wait_until(lambda: server.stats[("streams_ended", "reset_remote",
                                               "E2E_REQUIRED")] == 1, 10, "E2E_REQUIRED")
        self.assertEqual(dialled, [])
        self.assertIn("Session 1: refused a stream in clear from Proxy-Server #1, which has no "
                      "end-to-end password (this Proxy-Client requires end-to-end encryption): "
                      "set endToEndPassword on the Proxy-Server too", self.logs.text())
        self.assertIn("reset by the far end (E2E_REQUIRED: the Proxy-Client requires end-to-end "
                      "encryption and this stream came in clear: set endToEndPassword on this "
                      "Proxy-Server (the same as the Proxy-Client's))", self.logs.text())

    # -- pairings -------------------------------------------------------------------------

    async def test_half_close_and_early_data(self) -> None:
        """Early data (sent before the stream opened) and a half-close work sealed: the
        target answers after EOF, through the other direction still open."""
        from tcptunnel.test._harness import AnswerAfterEofProtocol

        target = await listen(self, AnswerAfterEofProtocol)
        client = self.client()
        server = self.server(target)
        await self.tunnel.ready(client, server)
        await self.paired(server)
        payload = os.urandom(200_000)
        got = await self.echo_round(binding_port(server), payload)
        digest = hashlib.sha256(payload).hexdigest().encode() + b"\n"
        self.assertEqual(got, digest + b"z" * (1024 * 1024))

    async def test_connection_waits_for_the_handshake(self) -> None:
        """A local connection made while the handshake runs is held unread, then goes
        through sealed once the keys are there (its early bytes included)."""
        echo = await listen(self, EchoProtocol)
        relay = Relay(self.tunnel.gateway_port, decode=True)
        relay.holding = True
        port = await relay.start(self)
        client = self.client(port=port)
        server = self.server(echo)
        await self.tunnel.ready(client, server)
        assert isinstance(server.e2e, ServerEndToEnd)
        e2e = server.e2e
        await wait_until(lambda: bool(relay.held), 10, "the Proxy-Client's answer")
        self.assertIs(e2e.pairing.state, ServerState.HANDSHAKING)
        app = await connect(binding_port(server))
        app.transport.write(MARKER)
        app.transport.loseWriteConnection()
        await wait_until(lambda: len(e2e._held) == 1, 10, "the connection to be held")
        self.assertIsNone(app.how)
        relay.release()
        self.assertEqual(await app.ended, "clean")
        self.assertEqual(bytes(app.received), MARKER)

    async def test_bulk_sealed(self) -> None:
        """8 MiB through a sealed echo stream arrive back exact (windows count records)."""
        echo = await listen(self, EchoProtocol)
        client = self.client()
        server = self.server(echo)
        await self.tunnel.ready(client, server)
        await self.paired(server)
        payload = os.urandom(8 * 1024 * 1024)
        got = await self.echo_round(binding_port(server), payload)
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())

    async def test_status_shows_the_pairing(self) -> None:
        """/status of each proxy says end-to-end is on, the Proxy-Server's pairing state and
        public id; never the password."""
        import json

        from tcptunnel.status import _proxy_snapshot

        echo = await listen(self, EchoProtocol)
        client = self.client()
        server = self.server(echo)
        await self.tunnel.ready(client, server)
        await self.paired(server)
        assert isinstance(server.e2e, ServerEndToEnd) and server.e2e.pairing.pairing
        ours = _proxy_snapshot(server, 0.0)["end_to_end"]
        self.assertEqual(ours, {"enabled": True, "state": "paired", "failure": None,
                                "pairing": server.e2e.pairing.pairing.pairing_id.hex(),
                                "held_connections": 0})
        await wait_until(lambda: _proxy_snapshot(client, 0.0)["end_to_end"] == {
            "enabled": True, "pairings": 1}, 10, "the client's pairing in /status")
        for proxy in (client, server):
            self.assertNotIn(E2E_PASSWORD, json.dumps(_proxy_snapshot(proxy, 0.0)))

    async def test_concurrent_sealed_streams(self) -> None:
        """Nine 2 MB echo streams at once arrive back exact: the last records of a stream
        delivered in the same read as the FIN that closed it are not lost (found by the
        bench's 8-stream iperf)."""
        echo = await listen(self, EchoProtocol)
        client = self.client()
        server = self.server(echo)
        await self.tunnel.ready(client, server)
        await self.paired(server)
        payloads = [os.urandom(2_000_000) for _ in range(9)]
        got = await defer.gatherResults([
            defer.ensureDeferred(self.echo_round(binding_port(server), payload))
            for payload in payloads])
        self.assertEqual([hashlib.sha256(g).digest() for g in got],
                         [hashlib.sha256(p).digest() for p in payloads])

    async def test_two_proxy_servers(self) -> None:
        """Two Proxy-Servers pair with one Proxy-Client at once, each with its own keys."""
        echo = await listen(self, EchoProtocol)
        client = self.client()
        first, second = self.server(echo), self.server(echo)
        await self.tunnel.ready(client, first, second)
        await self.paired(first, second)
        assert isinstance(first.e2e, ServerEndToEnd) and isinstance(second.e2e, ServerEndToEnd)
        ids = {e2e.pairing.pairing.pairing_id  # type: ignore[union-attr]
               for e2e in (first.e2e, second.e2e)}
        self.assertEqual(len(ids), 2)
        results = await defer.gatherResults([
            defer.ensureDeferred(self.echo_round(binding_port(s), MARKER * (i + 1)))
            for i, s in enumerate((first, second))])
        self.assertEqual(results, [MARKER, MARKER * 2])

    async def test_proxy_client_replaced(self) -> None:
        """A new Proxy-Client replaces the old mid-session: a new pairing with new keys,
        and streams work again."""
        echo = await listen(self, EchoProtocol)
        old = self.client()
        server = self.server(echo)
        await self.tunnel.ready(old, server)
        await self.paired(server)
        assert isinstance(server.e2e, ServerEndToEnd)
        e2e = server.e2e
        assert e2e.pairing.pairing is not None
        before = e2e.pairing.pairing.pairing_id
        new = self.client()
        await wait_until(lambda: e2e.pairing.pairing is not None
                         and e2e.pairing.pairing.pairing_id != before, 15, "a new pairing")
        await self.tunnel.ready(new, server)
        self.assertEqual(await self.echo_round(binding_port(server), MARKER), MARKER)
        await self.tunnel.stop(old)

    async def test_reconnect_after_gateway_restart(self) -> None:
        """After the Gateway restarts, both proxies reconnect and pair again."""
        echo = await listen(self, EchoProtocol)
        client = self.client()
        server = self.server(echo)
        await self.tunnel.ready(client, server)
        await self.paired(server)
        await self.tunnel.stop_gateway()
        await wait_until(lambda: not server.partner_available, 10, "the link to go")
        self.tunnel.start_gateway()
        await self.tunnel.ready(client, server)
        await self.paired(server)
        self.assertEqual(await self.echo_round(binding_port(server), MARKER), MARKER)


class EndToEndConfigTests(TestCase):
    """The settings of end-to-end encryption."""

    def parse(self, instance: str) -> Any:
        tunnel = Tunnel(self)
        return tunnel._parse(instance)

    def proxy(self, session_attributes: str, role: str = "proxy-client") -> Any:
        return self.parse(f'<Instance type="{role}" host="127.0.0.1" port="1">'
                          f'<Session id="1" password="login-pw" {session_attributes}/>'
                          '</Instance>')

    def test_read_inline_file_env(self) -> None:
        """endToEndPassword, endToEndPasswordFile and endToEndPasswordEnv are read as the
        login password is; without them there is none."""
        self.assertEqual(self.proxy('endToEndPassword="s3cret"').e2e_password.cleartext,
                         "s3cret")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from-file\n")
        os.chmod(path, 0o600)
        self.assertEqual(self.proxy(f'endToEndPasswordFile="{os.path.abspath(path)}"')
                         .e2e_password.cleartext, "from-file")
        os.environ["TCPTUNNEL_TEST_E2E"] = "from-env"
        self.addCleanup(os.environ.pop, "TCPTUNNEL_TEST_E2E")
        self.assertEqual(self.proxy('endToEndPasswordEnv="TCPTUNNEL_TEST_E2E"')
                         .e2e_password.cleartext, "from-env")
        self.assertIsNone(self.proxy("").e2e_password)
        self.assertNotIn("s3cret", repr(self.proxy('endToEndPassword="s3cret"')))

    def test_refusals(self) -> None:
        """Empty, equal to the login password, two sources at once, or on a Gateway: each
        refused with a clear message."""
        cases = [('endToEndPassword=""', "the end-to-end password is empty"),
                 ('endToEndPassword="login-pw"', "must not be the login password"),
                 ('endToEndPassword="a" endToEndPasswordEnv="X"', "give only one of")]
        for attributes, text in cases:
            with self.assertRaises(ConfigError) as caught:
                self.proxy(attributes, "proxy-server")
            self.assertIn(text, str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.parse('<Instance type="gateway"><Listener port="0"/>'
                       '<Session id="1" proxyClientPassword="a" proxyServerPassword="b" '
                       'endToEndPassword="c"/></Instance>')
        self.assertIn("never on the Gateway", str(caught.exception))


class MakePasswordTests(SynchronousTestCase):
    """``python -m tcptunnel make-password``."""

    def test_prints_a_fresh_strong_secret(self) -> None:
        """Each run prints a different 32-character URL-safe secret (192 bits) and the
        attribute it goes in; check-config then says the proxy is end-to-end encrypted."""
        from tcptunnel.__main__ import main

        secrets = []
        for _ in range(2):
            out = io.StringIO()
            self.assertEqual(main(["make-password"], stdout=out, stderr=io.StringIO()), 0)
            first, second = out.getvalue().splitlines()
            self.assertRegex(first, r"^[A-Za-z0-9_-]{32}$")
            self.assertIn(f'endToEndPassword="{first}"', second)
            secrets.append(first)
        self.assertNotEqual(secrets[0], secrets[1])
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f'<Settings {NS}><Instance type="proxy-client" host="127.0.0.1" '
                    f'port="1"><Session id="1" password="pw" endToEndPassword="{secrets[0]}"/>'
                    "</Instance></Settings>")
        out = io.StringIO()
        self.assertEqual(main(["check-config", path], stdout=out, stderr=io.StringIO()), 0)
        self.assertIn("session 1, end-to-end encrypted", out.getvalue())
        self.assertNotIn(secrets[0], out.getvalue())


class SealedEnds(Ends):
    """Two MuxProtocols over iosim whose streams are SealedStreams of one pairing."""

    def __init__(self, initial_window: int = 64 * 1024) -> None:
        initiator = _e2e.PakeInitiator("pw", 1)
        responder = _e2e.PakeResponder("pw", 1)
        answer = responder.receive_open(initiator.message)
        responder.receive_data(initiator.receive_data(answer))
        assert initiator.pairing is not None and responder.pairing is not None
        self.server_pairing, self.client_pairing = initiator.pairing, responder.pairing
        self.requests: list[fr.OpenRequest] = []  # the clear OPENs the acceptor read
        super().__init__(initial_window)

    def _open_requested(self, stream_id: int, request: Any) -> None:
        details, cipher = self.client_pairing.accept_stream(request.fields[0][1])
        self.requests.append(fr.parse_open(_e2e.clear_open_payload(
            fr.open_payload(request.window, request.origin, request.kind,
                            list(request.fields)), details)))
        splice = SpliceProtocol()
        socket = LocalSocket()
        splice.makeConnection(socket)
        splice.stream = SealedStream(self.acceptor, stream_id, splice, cipher)
        self.acceptor.streams[stream_id] = splice.stream
        self.acceptor.accept_stream(stream_id)
        splice.attach(splice.stream)
        self.accepted.append((splice, socket))

    def open(self) -> tuple[SpliceProtocol, LocalSocket, SpliceProtocol, LocalSocket]:
        """Open a sealed stream: (local splice, local socket, far splice, far socket)."""
        splice = SpliceProtocol()
        socket = LocalSocket()
        splice.makeConnection(socket)
        stream_id = self.opener.core.next_stream_id
        value, cipher = self.server_pairing.open_stream(
            stream_id, _e2e.inner_open(fr.KIND_TCP, fr.target_fields("target", 1)))
        splice.stream = _open_raw(self.opener, fr.KIND_SEALED, ((_e2e.FIELD_SEALED, value),),
                                  lambda sid: SealedStream(self.opener, sid, splice, cipher))
        self.pump.flush()
        splice.attach(splice.stream)
        far_splice, far_socket = self.accepted[-1]
        return splice, socket, far_splice, far_socket


class SealedStreamTests(SynchronousTestCase):
    """SealedStream over an in-memory link: windows count record bytes, END before FIN."""

    def test_least_window_both_ways(self) -> None:
        """With the least window (16 KiB, one full record) 1 MB goes each way exact, with
        the far reader paused and resumed: a whole record always fits what is granted."""
        ends = SealedEnds(initial_window=fr.EARLY_WINDOW)
        splice, socket, far_splice, far_socket = ends.open()
        self.assertEqual((ends.requests[0].host, ends.requests[0].port), ("target", 1))
        payload = os.urandom(1_000_000)
        assert far_socket.producer is not None
        for i in range(0, len(payload), 7_000):
            splice.dataReceived(payload[i:i + 7_000])
            if i % 70_000 == 0:
                far_socket.producer.pauseProducing()
                ends.pump.flush()
                far_socket.producer.resumeProducing()
            ends.pump.flush()
        self.assertEqual(far_socket.value(), payload)
        far_splice.dataReceived(payload[::-1])
        ends.pump.flush()
        self.assertEqual(socket.value(), payload[::-1])
        stream = splice.stream
        assert isinstance(stream, SealedStream)
        self.assertEqual((stream.bytes_out, stream.bytes_in), (len(payload), len(payload)))

    def test_full_read_is_two_frames_of_whole_records(self) -> None:
        """A sealed stream has its local TCP socket read SEALED_READ_SIZE at a time, and one
        such read leaves as exactly two 32 KiB DATA frames of two whole 16 KiB records each:
        no small third frame, no record cut by a frame (65,536-byte reads made three frames,
        the third of 95 bytes, and cut every later record)."""
        ends = SealedEnds(initial_window=384 * 1024)
        splice, socket, _far_splice, far_socket = ends.open()
        stream = splice.stream
        assert stream is not None
        tcp_like = LocalSocket()
        tcp_like.bufferSize = 65536  # type: ignore[attr-defined]  # Twisted's default
        stream.registerProducer(tcp_like, True)
        self.assertEqual(tcp_like.bufferSize, SEALED_READ_SIZE)  # type: ignore[attr-defined]
        stream.registerProducer(socket, True)
        payload = os.urandom(SEALED_READ_SIZE)
        for _ in range(3):
            splice.dataReceived(payload)
            assert ends.opener.transport is not None
            wire = ends.opener.transport.getOutBuffer()  # type: ignore[attr-defined]
            frames = fr.FrameDecoder(expect_magic=False).feed(wire)
            self.assertEqual([(f.type, len(f.payload)) for f in frames],
                             [(fr.FrameType.DATA, 32 * 1024)] * 2)
            for frame in frames:  # two whole records: the second header right after the first
                self.assertEqual(struct.unpack_from(">BH", frame.payload, 0), (2, 16381))
                self.assertEqual(struct.unpack_from(">BH", frame.payload, 16384), (2, 16381))
            ends.acceptor.dataReceived(wire)
            ends.pump.flush()
        self.assertEqual(far_socket.value(), payload * 3)

    def test_a_frame_of_records_is_one_local_write(self) -> None:
        """The two records of a full DATA frame reach the far local socket as one write of
        their plaintexts joined (one write path per frame, as for a clear frame), in
        order."""
        ends = SealedEnds(initial_window=384 * 1024)
        splice, _socket, _far_splice, far_socket = ends.open()
        calls: list[tuple[str, list[int]]] = []
        write, write_sequence = far_socket.write, far_socket.writeSequence

        def recording_write(data: bytes) -> None:
            calls.append(("write", [len(data)]))
            write(data)

        def recording_sequence(data: list[bytes]) -> None:
            calls.append(("writeSequence", [len(piece) for piece in data]))
            write_sequence(data)

        far_socket.write = recording_write  # type: ignore[method-assign]
        far_socket.writeSequence = recording_sequence  # type: ignore[method-assign]
        payload = os.urandom(SEALED_READ_SIZE)
        splice.dataReceived(payload)
        ends.pump.flush()
        self.assertEqual(far_socket.value(), payload)
        self.assertEqual(calls, [("write", [2 * _e2e.MAX_PLAINTEXT])] * 2)

    def test_sequence_takes_the_stream_data_paths(self) -> None:
        """A splice handed several pieces at once does what stream_data does for each when
        it would not simply write them: a target still being dialled keeps them as early
        data (TargetConnection), a local socket that closed resets the stream once."""

        class Dialling(SpliceProtocol):
            def __init__(self) -> None:
                super().__init__()
                self.early: list[bytes] = []

            def stream_data(self, data: bytes) -> None:
                self.early.append(data)

        dialling = Dialling()
        dialling.stream_data_sequence([b"one", b"two"])
        self.assertEqual(dialling.early, [b"one", b"two"])
        ends = SealedEnds()
        splice, socket, _far_splice, _far_socket = ends.open()
        socket.connected = False
        splice.stream_data_sequence([b"one", b"two"])
        self.assertEqual(socket.value(), b"")
        assert splice.stream is not None
        self.assertTrue(splice.stream.finished)
        self.assertIn("data arrived after the local connection closed", splice.end_description)

    def test_half_close_is_end_then_fin(self) -> None:
        """A local EOF sends END then FIN: the far socket half-closes cleanly, the other
        direction keeps flowing, and both close without an abort."""
        ends = SealedEnds()
        splice, socket, far_splice, far_socket = ends.open()
        splice.dataReceived(b"request")
        splice.readConnectionLost()
        ends.pump.flush()
        self.assertEqual(far_socket.value(), b"request")
        self.assertTrue(far_socket.write_closed)
        far_splice.dataReceived(b"answer")
        far_splice.readConnectionLost()
        ends.pump.flush()
        self.assertEqual(socket.value(), b"answer")
        self.assertTrue(socket.disconnecting and far_socket.disconnecting)
        self.assertFalse(socket.aborted or far_socket.aborted)

    def test_fin_without_end_is_a_reset(self) -> None:
        """A FIN with no END record before it (what a truncating Gateway sends) resets the
        stream INTEGRITY at both ends: the local socket is aborted, never half-closed."""
        ends = SealedEnds()
        splice, socket, far_splice, far_socket = ends.open()
        far_splice.dataReceived(b"partial")
        ends.pump.flush()
        far_stream = far_splice.stream
        assert far_stream is not None
        MuxStream.loseWriteConnection(far_stream)  # FIN alone, as a Gateway could forge
        ends.pump.flush()
        self.assertEqual(socket.value(), b"partial")
        self.assertTrue(socket.aborted)
        self.assertFalse(socket.write_closed)
        self.assertIn("INTEGRITY", splice.end_description)
        self.assertIn("INTEGRITY", far_splice.end_description)
        self.assertTrue(far_socket.aborted)


class GatewayViewTests(TestCase):
    """What a real Gateway process (twistd, with a status page) shows of streams: an
    end-to-end encrypted one as such, never its target; a clear one with its target."""

    timeout = 60

    async def test_status_and_log_name_no_target_of_a_sealed_stream(self) -> None:
        """Session 1 end-to-end, session 2 in clear (the control), each with one stream to
        an echo target named localhost, held open while /status is read: the Gateway's
        status JSON lists session 1's stream as end-to-end encrypted without a target and
        its log line at the stream's end says so, and neither holds the target's host or
        port; session 2's stream shows localhost:port in both."""
        from tcptunnel.test.test_status import get

        tunnel = Tunnel(self, sessions=((1, "client-pw", "server-pw"),
                                        (2, "client-pw2", "server-pw2")))
        self.addCleanup(tunnel.close)
        status_port, gateway_port = reserve_port(self), reserve_port(self)
        gateway = spawn_twistd(self, f'<Status listenIp="127.0.0.1" listenPort="{status_port}"/>'
                               + tunnel.gateway_xml(gateway_port))
        await wait_until(lambda: b"Status page on" in gateway.output
                         and b"Gateway listener started" in gateway.output, 20,
                         "the Gateway process to listen")
        tunnel.gateway_port = gateway_port
        echo = await listen(self, EchoProtocol)
        proxies: list[Any] = []
        for session, e2e in ((1, f'endToEndPassword="{E2E_PASSWORD}"'), (2, "")):
            proxies.append(tunnel._start_proxy(ProxyClientService, (
                f'<Instance type="proxy-client" {tunnel._proxy_attributes("")}>'
                f'<Session id="{session}" password="{tunnel._password(session, 1)}" {e2e}/>'
                '<AllowedTargetEndpoints><Endpoint host="localhost" port="1-65535"/>'
                "</AllowedTargetEndpoints></Instance>")))
            proxies.append(tunnel._start_proxy(ProxyServerService, (
                f'<Instance type="proxy-server" {tunnel._proxy_attributes("")}>'
                f'<Session id="{session}" password="{tunnel._password(session, 2)}" {e2e}>'
                f'<Binding listenIp="127.0.0.1" listenPort="0" targetHost="{TARGET_NAME}" '
                f'targetPort="{echo}"/></Session></Instance>')))
        await tunnel.ready(*proxies)
        sealed_server, clear_server = proxies[1], proxies[3]
        assert isinstance(sealed_server, ProxyServerService)
        assert isinstance(clear_server, ProxyServerService)
        await wait_until(lambda: isinstance(sealed_server.e2e, ServerEndToEnd)
                         and sealed_server.e2e.pairing.state is ServerState.PAIRED, 15,
                         "the end-to-end pairing")
        apps = [await connect(binding_port(server)) for server in (sealed_server, clear_server)]
        for app in apps:
            app.transport.write(MARKER)
        await wait_until(lambda: all(bytes(app.received) == MARKER for app in apps), 10,
                         "the echoes")

        code, body = await get(f"http://127.0.0.1:{status_port}/status")
        self.assertEqual(code, 200)
        (instance,) = json.loads(body)["instances"]
        sessions = {session["id"]: session for session in instance["sessions"]}
        sealed, clear = sessions[1], sessions[2]
        # The stream, and the pairing's own stream (held while the pairing lasts).
        self.assertEqual((sealed["end_to_end_streams"], sealed["streams_by_kind"]["sealed"],
                          sealed["streams_by_kind"]["pake"], sealed["streams_by_kind"]["tcp"]),
                         (2, 1, 1, 0))
        rows = {row["kind"]: row for row in sealed["streams"]}
        self.assertEqual([(row["label"], row["end_to_end"], row["target"])
                          for row in (rows["sealed"], rows["pake"])],
                         [("end-to-end encrypted", True, None),
                          ("end-to-end pairing", True, None)])
        self.assertGreater(rows["sealed"]["bytes_to_client"], len(MARKER))  # and overhead
        self.assertEqual(clear["streams_by_kind"]["tcp"], 1)
        self.assertEqual(clear["streams"][0]["target"], f"{TARGET_NAME}:{echo}")
        target_port = re.compile(rf"\b{echo}\b")
        self.assertNotIn(TARGET_NAME, json.dumps(sealed))
        self.assertIsNone(target_port.search(json.dumps(sealed)))

        for app in apps:
            app.transport.loseWriteConnection()
            self.assertEqual(await app.ended, "clean")
        await wait_until(lambda: gateway.log().count(" closed after ") >= 2, 10,
                         "the Gateway's log lines of both streams' ends")
        lines = gateway.log().splitlines()
        (sealed_line,) = [line for line in lines if "Session 1, Proxy-Server" in line
                          and "closed after" in line]
        self.assertIn("end-to-end encrypted stream closed after", sealed_line)
        session_1 = "\n".join(line for line in lines if "Session 2" not in line
                              and "session 2" not in line)
        self.assertNotIn(TARGET_NAME, session_1)
        self.assertIsNone(target_port.search(session_1))
        (clear_line,) = [line for line in lines if "Session 2, Proxy-Server" in line
                         and "closed after" in line]
        self.assertIn(f"TCP stream to {TARGET_NAME}:{echo} closed after", clear_line)
