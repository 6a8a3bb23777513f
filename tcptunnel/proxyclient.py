"""The Proxy-Client role: check each requested target, dial it, splice."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcptunnel._frames import KIND_UDP, OpenRequest, Reason
from tcptunnel.config import ProxyConfig, format_address, normalise_host
from tcptunnel.mux import MuxProtocol
from tcptunnel.proxy import ProxyService
from tcptunnel.sockets import connect_tcp, dialing_reactor
from tcptunnel.splice import SpliceProtocol
from tcptunnel.udp import ClientFlow, reason_for_udp_failure

MAX_DIALS_IN_PROGRESS = 64


def reason_for_dial_failure(failure: Failure) -> Reason:
    """Map a connect error to the wire reason."""
    if failure.check(neterror.ConnectionRefusedError):
        return Reason.REFUSED
    if failure.check(neterror.DNSLookupError):
        return Reason.DNS_FAILURE
    if failure.check(neterror.TimeoutError, neterror.UserError):
        return Reason.TIMEOUT
    if failure.check(neterror.NoRouteError):
        return Reason.UNREACHABLE
    message = failure.getErrorMessage().lower()
    if "unreachable" in message or "no route" in message:
        return Reason.UNREACHABLE
    return Reason.REFUSED


class _DirectDial(ClientFactory):
    """Dial an IP literal with ``connectTCP``: no resolver, and, unlike an endpoint, no
    wrapping protocol between the socket and the splice for the life of the stream."""

    noisy = False  # no "Starting factory" log lines for every stream
    # The connector keeps its factory for the life of the connection: keep it small.
    __slots__ = ("connection", "connector", "deferred")

    def __init__(self, connection: Protocol) -> None:
        self.connection: Protocol | None = connection
        self.connector: Any = None
        self.deferred: Deferred[Protocol] | None = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred[Protocol]) -> None:
        # Deferred.cancel() then errbacks with CancelledError; letting go of the
        # Deferred first means the UserError that stopConnecting() reports is not
        # taken for a failure to connect.
        self.connection = self.deferred = None
        self.connector.stopConnecting()

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        """The splice's own protocol is the socket's protocol."""
        connection, deferred = self.connection, self.deferred
        assert connection is not None and deferred is not None
        self.connection = self.deferred = None  # the dialler holds the Deferred
        deferred.callback(connection)
        return connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:  # noqa: N802
        """Refused, unreachable, timed out (or cancelled: already reported)."""
        deferred, self.deferred, self.connection = self.deferred, None, None
        if deferred is not None:  # None: connected, or cancelled
            deferred.errback(reason)


def dial_target(reactor: Any, host: str, port: int, timeout: float,
                connection: Protocol) -> Deferred[Any]:
    """Connect ``connection`` to a target: IP literals directly, names through the
    resolver (HostnameEndpoint: all addresses, happy eyeballs).  Skipping the resolver
    for literals saves a thread-pool round trip per stream."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        from twisted.internet.endpoints import HostnameEndpoint

        factory = Factory.forProtocol(lambda: connection)
        factory.noisy = False
        resolved: Deferred[Any] = HostnameEndpoint(dialing_reactor(reactor), host, port,
                                                   timeout=timeout).connect(factory)
        return resolved
    direct = _DirectDial(connection)
    dial = direct.deferred
    assert dial is not None
    direct.connector = connect_tcp(reactor, host, port, direct, timeout=timeout)
    return dial


class TargetConnection(SpliceProtocol):
    """The connection to a target, spliced to the stream that asked for it."""

    local_name = "target connection"
    __slots__ = ("dial", "early", "proxy", "request", "started")

    def __init__(self, proxy: ProxyClientService, request: OpenRequest) -> None:
        super().__init__(on_end=proxy.stream_ended)
        self.proxy = proxy
        self.request = request
        self.started = proxy.reactor.seconds()
        self.dial: Deferred[Any] | None = None
        # Early data that arrived while we dialled (at most EARLY_WINDOW bytes).
        self.early: list[bytes] = []

    @property
    def target(self) -> str:
        """host:port of the target."""
        return format_address(self.request.host, self.request.port)

    def describe(self) -> str:
        """``from Proxy-Server #n to target``, for the stream's log event."""
        return f"from Proxy-Server #{self.request.origin} to {self.target}"

    def connectionMade(self) -> None:  # noqa: N802
        """Connected: accept the stream, hand over the early data, start moving bytes."""
        stream = self.stream
        transport: Any = self.transport
        if stream is None or stream.finished:
            # The stream was reset while we dialled.
            transport.abortConnection()
            return
        stream.mux.accept_stream(stream.stream_id)
        self.attach(stream)
        early, self.early = self.early, []
        for data in early:
            transport.write(data)
        if stream.remote_ended:  # the opener's FIN came with its early data
            self.stream_ended()
        stream.resumeProducing()  # acknowledges the early data (the target took it)

    def stream_data(self, data: bytes) -> None:
        """Keep early data until the target is connected."""
        if self.transport is None:
            self.early.append(data)
        else:
            super().stream_data(data)

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Also cancel a dial in progress."""
        super().stream_reset(reason, message, remote)
        if self.dial is not None and self.transport is None:
            self.dial.cancel()


class ProxyClientService(ProxyService):
    """A Proxy-Client instance: accepts streams and dials their targets."""

    log = Logger()

    def __init__(self, config: ProxyConfig, reactor: Any) -> None:
        super().__init__(config, reactor)
        self.allowed = self._allowed_set(config)
        self.dials_in_progress = 0

    @staticmethod
    def _allowed_set(config: ProxyConfig) -> set[tuple[str, int, str]] | None:
        allowed = config.allowed_targets
        return None if allowed is None else {(e.host, e.port, e.protocol) for e in allowed}

    def apply_config(self, new: ProxyConfig) -> bool:
        """Reload: a changed allow-list applies to new streams."""
        if not super().apply_config(new):
            return False
        self.allowed = self._allowed_set(new)
        return True

    def link_ready(self, link: Any) -> None:
        """Take stream requests from this link."""
        link.on_open_requested = lambda stream_id, request: self.open_requested(
            link, stream_id, request)
        super().link_ready(link)

    def is_allowed(self, host: str, port: int, protocol: str = "tcp") -> bool:
        """Allow-list check: names (case-insensitive, trailing dot ignored), exact ports, and
        the protocol (a tcp entry never allows UDP, nor a udp entry TCP)."""
        return self.allowed is None or (normalise_host(host), port, protocol) in self.allowed

    def open_requested(self, link: MuxProtocol, stream_id: int, request: OpenRequest) -> None:
        """Check and dial a target for a new stream."""
        target = format_address(request.host, request.port)
        index = self.config.index
        protocol = "udp" if request.kind == KIND_UDP else "tcp"
        if not self.is_allowed(request.host, request.port, protocol):
            self.log.warn("[{index}] {protocol} stream to {target} from Proxy-Server #{origin} "
                          "denied: not in AllowedTargetEndpoints", index=index, target=target,
                          origin=request.origin, protocol=protocol.upper())
            link.reject_stream(stream_id, Reason.DENIED, f"{target} is not an allowed target")
            return
        if self.dials_in_progress >= MAX_DIALS_IN_PROGRESS:
            self.log.warn("[{index}] Stream to {target} refused: {n} dials in progress (limit)",
                          index=index, target=target, n=self.dials_in_progress)
            link.reject_stream(stream_id, Reason.LIMIT, "too many connects in progress")
            return
        if request.kind == KIND_UDP:
            self._open_udp_flow(link, stream_id, request)
            return
        connection = TargetConnection(self, request)
        connection.stream = link.attach_stream(stream_id, connection)
        # Nothing is consumed (no credit returned) until the target is connected.
        connection.stream.pauseProducing()
        self.dials_in_progress += 1
        dial = dial_target(self.reactor, request.host, request.port,
                           self.config.connect_timeout, connection)
        connection.dial = dial

        def done(result: Any) -> Any:
            self.dials_in_progress -= 1
            connection.dial = None
            return result

        def failed(failure: Failure) -> None:
            stream = connection.stream
            cancelled = failure.check(CancelledError, neterror.ConnectingCancelledError)
            if cancelled or stream is None or stream.finished:
                return
            reason = reason_for_dial_failure(failure)
            message = f"cannot connect to {target}: {failure.getErrorMessage()}"
            # Not "message=": with a legacy observer installed (trial's), Twisted's legacy
            # wrapper replaces a "message" field of a new-style event with ().
            self.log.warn("[{index}] Stream to {target}: {why}", index=index, target=target,
                          why=message)
            link.reject_stream(stream_id, reason, message)
            connection._finish(f"failed to open ({reason.name})")

        dial.addBoth(done).addErrback(failed)

    def _open_udp_flow(self, link: MuxProtocol, stream_id: int, request: OpenRequest) -> None:
        """A ``udp`` stream: a connected UDP socket to the target (tcptunnel.udp)."""
        flow = ClientFlow(self, request, self.stream_ended)
        flow.stream = link.attach_stream(stream_id, flow)
        # Nothing is acknowledged until the socket exists (the early datagrams wait).
        flow.stream.pauseProducing()
        self.dials_in_progress += 1
        self.stats["udp_flows_opened",] += 1

        def done(result: Any) -> Any:
            self.dials_in_progress -= 1
            return result

        def failed(failure: Failure) -> None:
            stream = flow.stream
            if stream is None or stream.finished:
                return
            reason = reason_for_udp_failure(failure)
            message = f"cannot open a UDP flow to {flow.target}: {failure.getErrorMessage()}"
            self.log.warn("[{index}] UDP stream to {target}: {why}", index=self.config.index,
                          target=flow.target, why=message)
            link.reject_stream(stream_id, reason, message)
            flow._finish(f"failed to open ({reason.name})")

        flow.start(self.config.connect_timeout).addBoth(done).addErrback(failed)
