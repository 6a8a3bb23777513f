"""Hostile peers for the attack tests (``test_hostile``), on Twisted and real loopback sockets.

:class:`HostilePeer` speaks the link protocol with the builders and the decoder of
``tcptunnel._frames`` and logs in with a real SCRAM exchange (``tcptunnel.auth.ProxyAuth``),
but then does what no proxy does: grants any window, stops reading, floods, sends malformed
frames.  :class:`FakeGateway` is the other way round: a server that completes the login as
the Gateway would (``GatewayAuth`` with ``make_auth_info``) and then misbehaves towards a real
proxy process.  :class:`GatewayProcess` runs the real Gateway as a ``twistd`` process (port 0,
the actual port read from its log) and :class:`HealthySession` is the bystander session whose
echo must keep working while the attack runs.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tcptunnel import _frames as fr
from tcptunnel._frames import FrameType
from tcptunnel.auth import GatewayAuth, LoginFailed, ProxyAuth, make_auth_info, scram_username
from tcptunnel.test._certs import CertFiles
from tcptunnel.test._harness import (
    EchoProtocol,
    RawPeer,
    Tunnel,
    TwistdProcess,
    binding_port,
    child_environment,
    connect,
    listen,
    spawn_twistd,
    wait_until,
)

MIB = 1024 * 1024
# Linux tcp_states.h: what TCP_INFO's first byte says about a socket we do not read.
TCP_ESTABLISHED = 1
_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (``VmRSS`` of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    """One DATA frame."""
    return fr.encode(FrameType.DATA, stream_id, payload, flags)


def abort_all() -> None:
    """Abort every hostile connection still open (at cleanup, before the harness's Tunnel
    cleanup, which waits for every connection of this process to end)."""
    for peer in list(HostilePeer.live):
        peer.transport.abortConnection()
    for link in list(FakeGatewayLink.live):
        link.transport.abortConnection()


class HostilePeer(RawPeer):
    """A link to the Gateway that does whatever the test says.

    It records when each frame type first arrived (``arrived``) and when the connection
    ended (``closed_at``); :meth:`begin_login` runs SCRAM with any password, answering the
    challenge at once unless told to hold the proof back.
    """

    live: set[HostilePeer] = set()  # connected now; see abort_all

    def __init__(self) -> None:
        super().__init__()
        self.started_at = reactor.seconds()
        self.arrived: dict[int, float] = {}
        self.closed_at: float | None = None
        self._auth: ProxyAuth | None = None
        self._auto_proof = False  # RawPeer.login answers by itself
        self.proof_sent = False
        self.local_port = 0

    # -- events ---------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        """Note our port (the Gateway's log names the peer by it)."""
        self.local_port = int(self.transport.getHost().port)
        HostilePeer.live.add(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Decode; note first arrivals; answer a challenge when told to."""
        seen = len(self.frames)
        super().dataReceived(data)
        now = reactor.seconds()
        for frame in self.frames[seen:]:
            self.arrived.setdefault(frame.type, now)
        if self._auto_proof and self.challenged and not self.proof_sent:
            self.send_proof()

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """Note when the connection ended."""
        self.closed_at = reactor.seconds()
        HostilePeer.live.discard(self)
        super().connectionLost(reason)

    # -- sending --------------------------------------------------------------

    def send(self, *frames: bytes) -> None:
        """Write frames (or any bytes) in one write."""
        if not self.closed.called:
            self.transport.write(b"".join(frames))

    def begin_login(self, session: int, role: int, password: str, auto_proof: bool = True,
                    hello: bool = True) -> None:
        """Send (HELLO and) AUTH_START; the proof follows the challenge unless held back."""
        self._auth = ProxyAuth(session, role, password)
        self._auto_proof = auto_proof
        self.started_at = reactor.seconds()
        start = fr.build_auth_start(role, session, self._auth.start())
        self.send(fr.build_hello(), start) if hello else self.send(start)

    def send_proof(self) -> None:
        """Answer the AUTH_CHALLENGE received."""
        assert self._auth is not None and self.challenged
        self.proof_sent = True
        challenge = self.of_type(FrameType.AUTH_CHALLENGE)[0].payload.decode()
        self.send(fr.build_auth_message(FrameType.AUTH_PROOF, self._auth.proof(challenge)))

    def open_stream(self, stream_id: int, window: int, host: str, port: int,
                    early: bytes = b"") -> None:
        """OPEN (with ``window`` granted to the far side) and optional early DATA."""
        self.send(fr.build_open(stream_id, fr.OpenRequest(window, 0, host, port)),
                  data_frame(stream_id, early) if early else b"")

    def stop_reading(self) -> None:
        """Never read again (until :meth:`resume_reading`): the kernel buffers fill."""
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read again."""
        self.transport.resumeProducing()

    # -- state ----------------------------------------------------------------

    @property
    def challenged(self) -> bool:
        """Whether an AUTH_CHALLENGE arrived."""
        return FrameType.AUTH_CHALLENGE in self.arrived

    def login_result(self) -> bool | None:
        """True / False from AUTH_RESULT, None while there is none."""
        results = self.of_type(FrameType.AUTH_RESULT)
        return fr.parse_auth_result(results[0].payload)[0] if results else None

    def answered_within(self, seconds: float) -> bool:
        """Whether AUTH_RESULT arrived within ``seconds`` of the login's start."""
        at = self.arrived.get(FrameType.AUTH_RESULT)
        return at is not None and at - self.started_at <= seconds

    def ended(self) -> bool:
        """Whether the Gateway ended this link (closed, as far as a non-reader can tell)."""
        return self.closed_called() or self.tcp_state() != TCP_ESTABLISHED

    def tcp_state(self) -> int:
        """The kernel's TCP state of our socket: seen without reading (a FIN that the peer
        sent makes it CLOSE_WAIT, an RST makes it CLOSE)."""
        if self.closed.called:
            return 7
        sock = self.transport.getHandle()
        return int(struct.unpack_from("B", sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8))[0])

    def open_results(self) -> dict[int, fr.Reason]:
        """stream id -> OPEN_RESULT reason received."""
        return {f.stream_id: fr.parse_open_result(f.payload)[0]
                for f in self.of_type(FrameType.OPEN_RESULT)}


async def hostile_peer(port: int, source: str | None = None) -> HostilePeer:
    """Connect a HostilePeer to 127.0.0.1:port, from ``source`` (127.0.0.x) if given."""
    peer = HostilePeer()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port,
                                  bindAddress=(source, 0) if source else None)
    await endpoint.connect(Factory.forProtocol(lambda: peer))
    return peer


async def hostile_peers(port: int, count: int, source: str | None = None) -> list[HostilePeer]:
    """``count`` connections made at once."""
    return list(await defer.gatherResults(
        [defer.ensureDeferred(hostile_peer(port, source)) for _ in range(count)]))


# -- the real Gateway as a process -------------------------------------------------


class GatewayProcess:
    """A ``twistd -n tcptunnel`` Gateway on 127.0.0.1 port 0, one plain or TLS Listener."""

    def __init__(self, test: TestCase, sessions: tuple[tuple[int, str, str], ...],
                 attributes: str = "", certs: CertFiles | None = None) -> None:
        tls = (f'certificatePemFilePath="{certs.cert}" certificatePemKeyFilePath="{certs.key}"'
               if certs is not None else "")
        session_xml = "".join(
            f'<Session id="{sid}" proxyClientPassword="{pc}" proxyServerPassword="{ps}"/>'
            for sid, pc, ps in sessions)
        self.process = spawn_twistd(
            test, f'<Instance type="gateway" {attributes}><Listener ip="127.0.0.1" port="0" '
                  f'{tls}/>{session_xml}</Instance>')
        self.port = 0

    async def started(self) -> GatewayProcess:
        """Wait for the listener; read its port from the log."""
        pattern = re.compile(rb"Gateway listener started on 127\.0\.0\.1:(\d+)")
        await wait_until(lambda: pattern.search(self.process.output) is not None
                         or self.process.ended.called, 20, "the Gateway process to listen")
        found = pattern.search(self.process.output)
        assert found is not None, self.log()
        self.port = int(found.group(1))
        return self

    @property
    def pid(self) -> int:
        """Process id."""
        return int(self.process.transport.pid)  # type: ignore[union-attr]

    def rss(self) -> float:
        """Resident memory in MiB."""
        return rss_mib(self.pid)

    def log(self) -> str:
        """The log so far (no timestamps)."""
        return self.process.log()


def proxy_client_process(test: TestCase, port: int, session: int, password: str,
                         extra: str = "") -> TwistdProcess:
    """A real Proxy-Client ``twistd`` process for a Gateway (or fake) on 127.0.0.1:port."""
    return spawn_twistd(
        test, f'<Instance type="proxy-client" host="127.0.0.1" port="{port}" '
              f'maxRetryDelay="1" {extra}><Session id="{session}" password="{password}"/>'
              "</Instance>")


def pid_of(process: TwistdProcess) -> int:
    """A child's process id."""
    return int(process.transport.pid)  # type: ignore[union-attr]


# -- a target that writes as fast as it can ------------------------------------------

_FIREHOSE = """
import socket, sys, threading
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(128)
print(server.getsockname()[1], flush=True)
chunk = b"x" * (1 << 20)
def pour(connection):
    try:
        while True:
            connection.sendall(chunk)
    except OSError:
        pass
while True:
    connection, _ = server.accept()
    threading.Thread(target=pour, args=(connection,), daemon=True).start()
"""


async def firehose(test: TestCase) -> int:
    """Start a local server (its own process) that writes to every connection as fast as the
    reader takes it; return its port."""
    process = TwistdProcess()
    reactor.spawnProcess(process, sys.executable, [sys.executable, "-c", _FIREHOSE],
                         env=child_environment())
    test.addCleanup(process.kill)
    await wait_until(lambda: b"\n" in process.output, 10, "the firehose to listen")
    return int(process.output.split(b"\n")[0])


# -- the bystander ------------------------------------------------------------------


class HealthySession:
    """A second session (its own Proxy-Client and Proxy-Server, in this process) whose echo
    round trips must keep working while another session or address attacks the Gateway."""

    def __init__(self, test: TestCase, session: int = 2, certs: CertFiles | None = None,
                 others: tuple[tuple[int, str, str], ...] = ()) -> None:
        self.test = test
        # One Tunnel for every proxy of the test in this process (``others``: the sessions
        # under attack): its cleanup waits for every connection of the process to end.
        self.tunnel = Tunnel(test, sessions=((session, f"pc{session}", f"ps{session}"),
                                             *others))
        self.tunnel.certs = certs  # the Gateway's: the proxies then use TLS
        self.session = session
        self.binding = 0
        self.round_trips = 0
        self.failures: list[str] = []
        self._running = False
        self._loop: defer.Deferred[None] | None = None

    @property
    def credentials(self) -> tuple[int, str, str]:
        """(id, Proxy-Client password, Proxy-Server password) for the Gateway's settings."""
        return self.tunnel.sessions[0]

    def proxy_client(self, session: int) -> Any:
        """Another session's real Proxy-Client, in this process (started)."""
        return self.tunnel.start_proxy_client(session)

    def proxy_server(self, session: int, target: int) -> Any:
        """Another session's real Proxy-Server, in this process (started)."""
        return self.tunnel.start_proxy_server([("127.0.0.1", target)], session)

    async def start(self, gateway_port: int) -> None:
        """Start both proxies and wait until they see each other and one echo works."""
        self.tunnel.gateway_port = gateway_port
        echo = await listen(self.test, EchoProtocol)
        pc = self.tunnel.start_proxy_client(self.session)
        ps = self.tunnel.start_proxy_server([("127.0.0.1", echo)], self.session)
        self.test.addCleanup(self.tunnel.close)
        # Cleanups run last-registered first (and before tearDown): the attackers' connections
        # end before the Tunnel's close waits for every connection of this process to end.
        self.test.addCleanup(abort_all)
        await self.tunnel.ready(pc, ps)
        self.binding = binding_port(ps)
        why = await self.round_trip()
        assert why is None, f"the healthy session does not work before the attack: {why}"

    async def round_trip(self, size: int = 4096, timeout: float = 5.0) -> str | None:
        """One echo through the tunnel; None when the same bytes came back in time."""
        payload = os.urandom(size)
        try:
            client = await connect(self.binding)
        except Exception as e:  # the binding is there; a refusal is a failure
            return f"connect failed: {e}"
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        try:
            await wait_until(lambda: client.ended.called, timeout, "the echo")
        except AssertionError:
            client.transport.abortConnection()
            return f"no echo within {timeout:g} s ({len(client.received)} bytes back)"
        if client.how != "clean" or bytes(client.received) != payload:
            return f"echo ended {client.how} with {len(client.received)} of {size} bytes"
        return None

    def begin(self) -> None:
        """Start echoing in a loop (the attack runs meanwhile)."""
        self._running = True
        self._loop = defer.ensureDeferred(self._echo_loop())
        self.test.addCleanup(self._stop)  # runs before the proxies stop (cleanups are LIFO)

    async def _stop(self) -> None:
        self._running = False
        if self._loop is not None:
            await self._loop

    async def _echo_loop(self) -> None:
        while self._running:
            started = reactor.seconds()
            why = await self.round_trip()
            if why is None:
                self.round_trips += 1
            else:
                self.failures.append(f"at +{started:.1f}: {why}")
            # No sleep: the next round trip is the wait; a few per second is plenty.

    async def end(self, at_least: int = 2) -> None:
        """Stop the loop; assert every round trip during the attack came back whole."""
        await self._stop()
        self.test.assertEqual(self.failures, [], "the healthy session's echo failed during the "
                              "attack")
        self.test.assertGreaterEqual(self.round_trips, at_least,
                                     "too few echo round trips during the attack")


# -- a fake Gateway ------------------------------------------------------------------


class FakeGatewayLink(Protocol):
    """The Gateway's end of a link, scripted: it answers HELLO and runs SCRAM as the Gateway
    for ``password``; after a correct proof it calls ``after_proof(self, server_final)``,
    which writes the AUTH_RESULT (or not) and whatever misbehaviour the test wants."""

    transport: Any
    live: set[FakeGatewayLink] = set()  # connected now; see abort_all

    def __init__(self, session: int, role: int, password: str,
                 after_proof: Callable[[FakeGatewayLink, str], None]) -> None:
        self.decoder = fr.FrameDecoder(expect_magic=True, max_payload=fr.MAX_PAYLOAD)
        self.auth = GatewayAuth(make_auth_info(password), scram_username(session, role),
                                os.urandom(32))
        self.after_proof = after_proof
        self.frames: list[fr.Frame] = []
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.logged_in = False

    def connectionMade(self) -> None:  # noqa: N802
        """Magic and HELLO, as a Gateway sends them."""
        FakeGatewayLink.live.add(self)
        self.transport.write(fr.build_hello())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Run the Gateway's half of SCRAM; keep every frame."""
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            if frame.type == FrameType.AUTH_START:
                _role, _session, client_first = fr.parse_auth_start(frame.payload)
                self.transport.write(fr.build_auth_message(
                    FrameType.AUTH_CHALLENGE, self.auth.challenge(client_first)))
            elif frame.type == FrameType.AUTH_PROOF:
                try:
                    server_final = self.auth.finish(frame.payload.decode())
                except LoginFailed:
                    self.transport.write(fr.build_auth_result(False))
                    return
                self.logged_in = True
                self.after_proof(self, server_final)

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """Note the end."""
        FakeGatewayLink.live.discard(self)
        if not self.closed.called:
            self.closed.callback(None)

    def of_type(self, frame_type: int) -> list[fr.Frame]:
        """Received frames of one type."""
        return [f for f in self.frames if f.type == frame_type]


class FakeGateway:
    """A listening fake Gateway on 127.0.0.1; ``links`` are the connections it accepted."""

    def __init__(self, session: int, password: str,
                 after_proof: Callable[[FakeGatewayLink, str], None],
                 role: int = fr.ROLE_PROXY_CLIENT) -> None:
        self.links: list[FakeGatewayLink] = []
        self._make = lambda: FakeGatewayLink(session, role, password, after_proof)
        self.port = 0

    async def listen(self, test: TestCase) -> FakeGateway:
        """Start listening (stopped at cleanup)."""
        def build() -> FakeGatewayLink:
            link = self._make()
            self.links.append(link)
            return link

        self.port = await listen(test, build)
        return self


@implementer(IPushProducer)
class Flood:
    """Write ``chunk`` to a transport for as long as it takes bytes, never reading: the
    transport pauses us when its buffer is full and resumes us when the peer read some."""

    def __init__(self, transport: Any, chunk: bytes) -> None:
        self.transport = transport
        self.chunk = chunk
        self.written = 0
        self._paused = False
        self._stopped = False
        transport.registerProducer(self, True)
        reactor.callLater(0, self.resumeProducing)

    def resumeProducing(self) -> None:  # noqa: N802
        """Write until the transport's buffer is full (one chunk fills it)."""
        self._paused = False
        while not (self._paused or self._stopped or self.transport.disconnecting
                   or not self.transport.connected):
            self.transport.write(self.chunk)
            self.written += len(self.chunk)

    def pauseProducing(self) -> None:  # noqa: N802
        """The buffer is full."""
        self._paused = True

    def stopProducing(self) -> None:  # noqa: N802
        """The connection is gone."""
        self._stopped = True


# -- log capture (for proxies run in this process) ------------------------------------


@implementer(ILogObserver)
class LogCapture:
    """The formatted text of every log event emitted while it is installed."""

    def __init__(self, test: TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        """Keep the event's text."""
        self.lines.append(formatEvent(event) or "")

    def text(self) -> str:
        """Everything captured, one event a line."""
        return "\n".join(self.lines)
