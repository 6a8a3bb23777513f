"""End-to-end harness: Gateway, Proxy-Servers and Proxy-Clients in one process on loopback.

Everything listens on 127.0.0.1 port 0; configurations go through the real
settings parser.  Local test applications (echo targets, clients that
record how their connection ended) live here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, protocol, reactor, task, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ProcessExitedAlready
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tcptunnel import _frames as fr
from tcptunnel.auth import ProxyAuth
from tcptunnel.config import NAMESPACE, GatewayConfig, ProxyConfig, parse_settings
from tcptunnel.gateway import GatewayService
from tcptunnel.proxy import ProxyService
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.test._certs import CertFiles, mint

_P = TypeVar("_P", bound=ProxyService)

NS = f'xmlns="{NAMESPACE}"'

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONF = os.path.join(ROOT, "conf")


def twistd_command(*args: str) -> list[str]:
    """argv running twistd with this checkout's code and plugin."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


def child_environment() -> dict[str, str]:
    """The environment for child processes: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (racy: prefer reserve_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reserve_port(test: TestCase) -> int:
    """A port on 127.0.0.1 held for ``test`` until its cleanup, with no race.

    The port stays bound by a socket that never listens (Linux semantics): a connection to
    it is refused, nobody else can bind it (not even as an ephemeral client port), and only
    a listener setting SO_REUSEADDR, as every Twisted listener does on POSIX, can listen on
    it; so a Gateway or Binding configured on it can start, stop and start again on it, and
    a target on it refuses for certain.
    """
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    test.addCleanup(holder.close)
    return int(holder.getsockname()[1])


def tcp_connections() -> list[Any]:
    """The TCP connections the real reactor still watches."""
    return [s for s in {*reactor.getReaders(), *reactor.getWriters()}
            if isinstance(s, tcp.Connection)]


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Poll ``predicate`` on the real reactor until true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


def sleep(seconds: float) -> defer.Deferred[None]:
    """A Deferred that fires after ``seconds`` on the real reactor."""
    return task.deferLater(reactor, seconds, lambda: None)


class Tunnel:
    """Builds and tears down tunnel roles for one test."""

    def __init__(self, test: TestCase, tls: bool = False,
                 sessions: tuple[tuple[int, str, str], ...] = ((1, "client-pw", "server-pw"),),
                 gateway_attributes: str = "") -> None:
        self.test = test
        self.tls = tls
        self.sessions = sessions
        self.gateway_attributes = gateway_attributes
        self.certs: CertFiles | None = mint(os.path.abspath(test.mktemp())) if tls else None
        self.gateway: GatewayService | None = None
        self.gateway_port = 0
        self.services: list[Any] = []

    # -- roles ----------------------------------------------------------------

    def gateway_xml(self, port: int) -> str:
        """The gateway instance of this tunnel's settings."""
        tls = ""
        if self.certs is not None:
            tls = (f'certificatePemFilePath="{self.certs.cert}" '
                   f'certificatePemKeyFilePath="{self.certs.key}"')
        sessions = "".join(
            f'<Session id="{sid}" proxyClientPassword="{pc}" proxyServerPassword="{ps}"/>'
            for sid, pc, ps in self.sessions)
        return (f'<Instance type="gateway" {self.gateway_attributes}>'
                f'<Listener ip="127.0.0.1" port="{port}" {tls}/>{sessions}</Instance>')

    def start_gateway(self, port: int = 0) -> GatewayService:
        """Start (or restart, on the same port) the Gateway, by default on a port reserved
        for this test (so a restart finds it free)."""
        self.gateway_port = self.gateway_port or reserve_port(self.test)
        config = self._parse(self.gateway_xml(port or self.gateway_port))
        assert isinstance(config, GatewayConfig)
        service = GatewayService(config, reactor)
        service.startService()
        self.gateway = service
        self.gateway_port = service.ports[0].getHost().port
        self.services.append(service)
        return service

    async def stop_gateway(self) -> None:
        """Stop the Gateway (links are closed with GOAWAY)."""
        assert self.gateway is not None
        await self._stop(self.gateway)
        self.gateway = None

    def _proxy_attributes(self, extra: str) -> str:
        tls = ""
        if self.certs is not None:
            tls = f'useSsl="true" caFile="{self.certs.ca}" serverName="localhost"'
        retry = "" if "maxRetryDelay" in extra else 'maxRetryDelay="1"'
        return f'host="127.0.0.1" port="{self.gateway_port}" {tls} {retry} {extra}'

    def start_proxy_client(self, session: int = 1, password: str | None = None,
                           allowed: str | None = None, extra: str = "") -> ProxyClientService:
        """Start a Proxy-Client; ``allowed`` is the inner XML of AllowedTargetEndpoints."""
        password = password or self._password(session, 1)
        allow = (f"<AllowedTargetEndpoints>{allowed}</AllowedTargetEndpoints>"
                 if allowed is not None else "")
        return self._start_proxy(
            ProxyClientService,
            f'<Instance type="proxy-client" {self._proxy_attributes(extra)}>'
            f'<Session id="{session}" password="{password}"/>{allow}</Instance>')

    def start_proxy_server(self, targets: list[tuple[str, int]], session: int = 1,
                           password: str | None = None, extra: str = "") -> ProxyServerService:
        """Start a Proxy-Server with one Binding (port 0) per target."""
        password = password or self._password(session, 2)
        bindings = "".join(
            f'<Binding listenIp="127.0.0.1" listenPort="0" targetHost="{h}" targetPort="{p}"/>'
            for h, p in targets)
        return self._start_proxy(
            ProxyServerService,
            f'<Instance type="proxy-server" {self._proxy_attributes(extra)}>'
            f'<Session id="{session}" password="{password}">{bindings}</Session></Instance>')

    def _start_proxy(self, kind: type[_P], instance_xml: str) -> _P:
        """Parse one proxy Instance, start it as ``kind``, and stop it at cleanup."""
        config = self._parse(instance_xml)
        assert isinstance(config, ProxyConfig)
        service = kind(config, reactor)
        service.startService()
        self.services.append(service)
        return service

    async def ready(self, *proxies: Any, timeout: float = 15.0) -> None:
        """Wait until every given proxy is logged in and sees a partner."""
        await wait_until(lambda: all(p.partner_available for p in proxies), timeout,
                         "proxies to log in and see their partner")

    def _password(self, session: int, which: int) -> str:
        for sid, pc, ps in self.sessions:
            if sid == session:
                return pc if which == 1 else ps
        return "unknown"

    def _parse(self, instance_xml: str) -> Any:
        path = os.path.join(os.path.abspath(self.test.mktemp()) + ".xml")
        settings = parse_settings(f"<Settings {NS}>{instance_xml}</Settings>".encode(), path)
        return settings.instances[0]

    async def _stop(self, service: Any) -> None:
        # Tests wait for what the stop causes (a reset, a partner gone); close() waits for
        # every connection to end.
        if service.running:
            await defer.maybeDeferred(service.stopService)

    async def stop(self, service: Any) -> None:
        """Stop one role."""
        await self._stop(service)

    async def close(self) -> None:
        """Stop everything (test cleanup)."""
        for service in reversed(self.services):
            await self._stop(service)
        # GOAWAYs, TLS close_notify and the resets they cause take a few reactor turns.
        await wait_until(lambda: not tcp_connections(), 10,
                         "every connection to close after the tunnel stopped")


# -- local applications ----------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class EchoProtocol(Protocol):
    """Echo everything; on EOF, half-close back (after echoing all)."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:  # noqa: N802
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.transport.loseConnection()  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol)
class AnswerAfterEofProtocol(Protocol):
    """Read until EOF, then answer with the SHA-256 of what arrived and a 1 MiB body."""

    def connectionMade(self) -> None:  # noqa: N802
        self.received = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received.update(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.transport.write(self.received.hexdigest().encode() + b"\n")  # type: ignore[union-attr]
        self.transport.write(b"z" * (1024 * 1024))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass


async def listen(test: TestCase, protocol: Callable[[], Protocol]) -> int:
    """Start a local target server on 127.0.0.1; return its port."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(protocol))
    test.addCleanup(port.stopListening)
    return int(port.getHost().port)


@implementer(IHalfCloseableProtocol)
class RecordingClient(Protocol):
    """A local application: records bytes and how the connection ended."""

    transport: Any

    def __init__(self, close_on_eof: bool = True) -> None:
        self.close_on_eof = close_on_eof
        self.received = bytearray()
        self.eof = False
        self.write_closed = False
        self.ended: defer.Deferred[str] = defer.Deferred()
        self.how: str | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def readConnectionLost(self) -> None:  # noqa: N802
        self.eof = True
        if self.close_on_eof or self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.write_closed = True
        if self.eof:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802, B008
        # "clean": EOF then close; "closed": closed without EOF first; "reset": TCP RST.
        if reason.check(ConnectionDone) and self.eof:
            self.how = "clean"
        elif reason.check(ConnectionDone):
            self.how = "closed"
        else:
            self.how = "reset"
        self.ended.callback(self.how)


async def connect(port: int, close_on_eof: bool = True) -> RecordingClient:
    """Connect a RecordingClient to 127.0.0.1:port (by default it closes on EOF)."""
    client = RecordingClient(close_on_eof)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(lambda: client))
    return client


def binding_port(proxy_server: ProxyServerService, index: int = 0) -> int:
    """The actual port of a Proxy-Server binding started on port 0."""
    return int(proxy_server.ports[index].getHost().port)


class RawPeer(Protocol):
    """A hand-driven link to the Gateway: sends any bytes, decodes every frame it gets."""

    transport: Any

    def __init__(self) -> None:
        self.decoder = fr.FrameDecoder(expect_magic=True, max_payload=fr.MAX_PAYLOAD)
        self.frames: list[fr.Frame] = []
        self.closed: defer.Deferred[str] = defer.Deferred()
        self.bad_bytes = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            self.frames.extend(self.decoder.feed(data))
        except fr.LinkError:
            self.bad_bytes = True

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802, B008
        self.closed.callback(reason.getErrorMessage())

    def closed_called(self) -> bool:
        """Whether the connection has ended."""
        return bool(self.closed.called)

    def of_type(self, frame_type: int) -> list[fr.Frame]:
        """Received frames of one type."""
        return [f for f in self.frames if f.type == frame_type]

    def goaway(self) -> tuple[fr.GoAway, str] | None:
        """The GOAWAY received, if any."""
        frames = self.of_type(fr.FrameType.GOAWAY)
        return fr.parse_goaway(frames[0].payload) if frames else None

    async def login(self, session: int, role: int, password: str) -> bool:
        """Send HELLO and run SCRAM; True when the Gateway accepted the login."""
        auth = ProxyAuth(session, role, password)
        self.transport.write(fr.build_hello() + fr.build_auth_start(role, session, auth.start()))
        await wait_until(lambda: bool(self.of_type(fr.FrameType.AUTH_CHALLENGE)
                                      or self.closed.called), what="AUTH_CHALLENGE")
        if self.closed.called:
            return False
        challenge = self.of_type(fr.FrameType.AUTH_CHALLENGE)[0].payload.decode()
        self.transport.write(fr.build_auth_message(fr.FrameType.AUTH_PROOF,
                                                   auth.proof(challenge)))
        # A proven login refused for a limit hears GOAWAY LIMIT, not AUTH_RESULT 0.
        await wait_until(lambda: bool(self.of_type(fr.FrameType.AUTH_RESULT)
                                      or self.closed.called), what="AUTH_RESULT")
        if not self.of_type(fr.FrameType.AUTH_RESULT):
            return False
        ok, server_final = fr.parse_auth_result(self.of_type(fr.FrameType.AUTH_RESULT)[0].payload)
        if ok:
            auth.verify(server_final)
        return ok


async def raw_peer(port: int) -> RawPeer:
    """Connect a RawPeer to 127.0.0.1:port (plain TCP)."""
    peer = RawPeer()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(lambda: peer))
    return peer


class ChildProcess(protocol.ProcessProtocol):
    """A child process (twistd, or a third-party program a test drives): collects its
    output and exit code (``exit_code`` None while it runs, and after a signal ended it).

    Standard error goes to ``output`` too, or with ``stderr_apart`` to ``errors`` (for a
    program whose standard output a test compares byte for byte, like curl's).
    """

    def __init__(self, stderr_apart: bool = False) -> None:
        self.output = bytearray()
        self.errors = bytearray() if stderr_apart else self.output
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exit_code: int | None = None
        self.exit_signal: int | None = None

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.errors += data  # ``output`` itself unless stderr_apart

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.exit_code = reason.value.exitCode
        self.exit_signal = reason.value.signal
        self.ended.callback(None)

    def kill(self, signal: str = "KILL") -> defer.Deferred[None] | None:
        """SIGKILL (cleanup), or ``signal`` (TERM: a server whose workers must go with it),
        and wait for the exit."""
        if not self.ended.called:
            # Reaped a moment ago, its pipes not yet closed: it needs no signal then.
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess(signal)  # type: ignore[union-attr]
            return self.ended
        return None


class TwistdProcess(ChildProcess):
    """A child twistd: its log, and a graceful stop."""

    def log(self) -> str:
        """What the process printed, without timestamps."""
        return re.sub(r"(?m)^\S+ ", "", self.output.decode(errors="replace"))

    def stop(self) -> None:
        """SIGTERM."""
        if not self.ended.called:
            self.transport.signalProcess("TERM")  # type: ignore[union-attr]


def spawn_twistd(test: TestCase, instance_xml: str, env: dict[str, str] | None = None
                 ) -> TwistdProcess:
    """Run one ``<Instance>`` in a real ``twistd -n tcptunnel`` process, logging to its stdout;
    it is killed at the test's cleanup."""
    work = os.path.abspath(test.mktemp())
    os.makedirs(work)
    path = os.path.join(work, "settings.xml")
    with open(path, "w") as f:
        f.write(f"<Settings {NS}>{instance_xml}</Settings>")
    process = TwistdProcess()
    reactor.spawnProcess(
        process, twistd_command()[0],
        twistd_command("-n", "--pidfile=", "--logfile=-", "tcptunnel", "--config", path),
        env={**child_environment(), **(env or {})}, path=work)
    test.addCleanup(process.kill)
    return process
