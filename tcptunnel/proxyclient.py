"""The Proxy-Client role: check each requested target, dial it, splice."""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Any, Literal

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcptunnel._allow import AllowList, Decision
from tcptunnel._frames import KIND_UDP, OpenRequest, Reason
from tcptunnel._proxyproto import ClientAddressError, build_header, client_address_from_fields
from tcptunnel.config import ProxyConfig, format_address
from tcptunnel.mux import MuxProtocol
from tcptunnel.proxy import ProxyService
from tcptunnel.sockets import connect_tcp, dialing_reactor
from tcptunnel.splice import SpliceProtocol
from tcptunnel.udp import ClientFlow, reason_for_udp_failure

MAX_DIALS_IN_PROGRESS = 64
# TCP OPENs past MAX_DIALS_IN_PROGRESS wait for a free dial, first come first served, instead
# of being refused: a burst of 100 connections to a Binding (the kernel's accept queue lets all
# of them through at once since the backlog is somaxconn) must all work.  At most this many
# wait (each is a stream the link's own limit already counts); an OPEN that waited
# connectTimeout is answered TIMEOUT when its turn comes, so no wait exceeds about twice
# connectTimeout (a dial in progress frees its slot within connectTimeout).
MAX_WAITING_DIALS = 1024


class _DeniedError(Exception):
    """checkResolvedAddresses: no resolved address of the name is allowed."""


def reason_for_dial_failure(failure: Failure) -> Reason:
    """Map a connect error to the wire reason."""
    if failure.check(_DeniedError):
        return Reason.DENIED
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


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what the reactor's resolver finds for a name (checkResolvedAddresses)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.found: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:  # noqa: N802
        """Nothing to do."""

    def addressResolved(self, address: Any) -> None:  # noqa: N802
        """One address (IPv4Address / IPv6Address), kept in the resolver's order."""
        if address.host not in self.found:
            self.found.append(address.host)

    def resolutionComplete(self) -> None:  # noqa: N802
        """All addresses are in; none is a DNS failure."""
        if self.done.called:
            return
        if self.found:
            self.done.callback(self.found)
        else:
            self.done.errback(neterror.DNSLookupError(f"{self.host}: no address"))


def resolve_addresses(reactor: Any, host: str, port: int) -> Deferred[list[str]]:
    """The addresses of ``host`` (through the reactor's resolver: getaddrinfo in the thread
    pool), for checking before anything is dialled."""
    receiver = _Addresses(host)
    reactor.nameResolver.resolveHostName(receiver, host, port)
    return receiver.done


@inlineCallbacks
def dial_addresses(reactor: Any, addresses: Sequence[str], port: int, timeout: float,
                   connection: Protocol) -> Any:
    """Dial IP literals in order until one connects, within ``timeout`` in all (what
    HostnameEndpoint does for a name, but only to addresses the allow-list checked)."""
    deadline = reactor.seconds() + timeout
    failure: Failure | None = None
    for address in addresses:
        remaining = deadline - reactor.seconds()
        if remaining <= 0:
            break
        try:
            result = yield dial_target(reactor, address, port, remaining, connection)
        except CancelledError:
            raise
        except Exception:  # refused, unreachable: the next address may answer
            failure = Failure()
            continue
        return result
    if failure is not None:
        failure.raiseException()
    raise neterror.TimeoutError(f"no address of the target answered within {timeout:g} s")


class TargetConnection(SpliceProtocol):
    """The connection to a target, spliced to the stream that asked for it."""

    local_name = "target connection"
    __slots__ = ("dial", "early", "header", "proxy", "request", "started")

    def __init__(self, proxy: ProxyClientService, request: OpenRequest) -> None:
        super().__init__(on_end=proxy.stream_ended)
        self.proxy = proxy
        self.request = request
        self.started = proxy.reactor.seconds()
        self.dial: Deferred[Any] | None = None
        # Early data that arrived while we dialled (at most EARLY_WINDOW bytes).
        self.early: list[bytes] = []
        # A PROXY protocol header (<Endpoint proxyProtocol=...>), written before any data.
        self.header = b""

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
        if self.header:
            transport.write(self.header)
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
        self.allow = self._allow_list(config)
        self.dials_in_progress = 0
        # TCP streams waiting for a free dial: (connection, decision, when it began to wait).
        self.waiting_dials: collections.deque[tuple[TargetConnection, Decision, float]] = (
            collections.deque())
        self._starting_waiting = False  # _next_dial is running (a dial that fails at once)
        self.max_waiting_dials = MAX_WAITING_DIALS

    @staticmethod
    def _allow_list(config: ProxyConfig) -> AllowList:
        targets = config.allowed_targets
        return AllowList(None if targets is None else [e.rule for e in targets],
                         config.check_resolved_addresses)

    def apply_config(self, new: ProxyConfig) -> bool:
        """Reload: a changed allow-list applies to new streams."""
        if not super().apply_config(new):
            return False
        self.allow = self._allow_list(new)
        return True

    def link_ready(self, link: Any) -> None:
        """Take stream requests from this link."""
        link.on_open_requested = lambda stream_id, request: self.open_requested(
            link, stream_id, request)
        super().link_ready(link)

    def is_allowed(self, host: str, port: int, protocol: str = "tcp") -> bool:
        """Allow-list check (tcptunnel._allow): addresses, networks, names and ``*.``
        suffixes, port lists, and the protocol (a tcp entry never allows UDP, nor a udp
        entry TCP)."""
        return self.allow.check(host, port, "udp" if protocol == "udp" else "tcp").allowed

    def open_requested(self, link: MuxProtocol, stream_id: int, request: OpenRequest) -> None:
        """Check and dial a target for a new stream."""
        if getattr(link, "draining", False):
            # The Gateway said DRAINING on this link: it opens nothing more on it.
            link.reject_stream(stream_id, Reason.SHUTDOWN, "this link is draining: new streams "
                               "come on the new link")
            return
        if self.e2e is not None:  # pake / sealed OPENs, the end-to-end policy (tcptunnel.e2e)
            opened = self.e2e.filter_open(link, stream_id, request)  # type: ignore[arg-type]
            if opened is None:
                return
            request = opened
        target = format_address(request.host, request.port)
        index = self.config.index
        protocol: Literal["tcp", "udp"] = "udp" if request.kind == KIND_UDP else "tcp"
        decision = self.allow.check(request.host, request.port, protocol)
        if not decision.allowed or decision.target is None:
            self.log.warn("[{index}] {protocol} stream to {target} from Proxy-Server #{origin} "
                          "denied: {why}", index=index, target=target, why=decision.why,
                          origin=request.origin, protocol=protocol.upper())
            link.reject_stream(stream_id, decision.reason,
                               f"{target} is not an allowed target"
                               if decision.reason is Reason.DENIED else decision.why)
            return
        try:
            client = client_address_from_fields(request.fields)
        except ClientAddressError as e:
            self.log.warn("[{index}] Stream to {target} from Proxy-Server #{origin} refused: "
                          "{why}", index=index, target=target, origin=request.origin, why=str(e))
            link.reject_stream(stream_id, Reason.PROTOCOL_ERROR, str(e))
            return
        rule = decision.rule
        header = b""
        if rule is not None and rule.proxy_protocol is not None and protocol == "tcp":
            header = build_header(rule.proxy_protocol, client)
        # What is dialled is what was checked: "127.0.0.1." as the literal 127.0.0.1,
        # "Host.Example." as "host.example".
        request = dataclasses.replace(request, host=decision.target.host)
        if request.kind == KIND_UDP:
            if self.dials_in_progress >= MAX_DIALS_IN_PROGRESS:
                # Lossy by nature: the flow's next datagram asks again.
                self.log.warn("[{index}] UDP stream to {target} refused: {n} dials in progress "
                              "(limit)", index=index, target=target, n=self.dials_in_progress)
                link.reject_stream(stream_id, Reason.LIMIT, "too many connects in progress")
                return
            self._open_udp_flow(link, stream_id, request, decision)
            return
        busy = self.dials_in_progress >= MAX_DIALS_IN_PROGRESS
        if busy and len(self.waiting_dials) >= self.max_waiting_dials:
            self.log.warn("[{index}] Stream to {target} refused: {n} dials in progress and "
                          "{waiting} waiting (limit)", index=index, target=target,
                          n=self.dials_in_progress, waiting=len(self.waiting_dials))
            link.reject_stream(stream_id, Reason.LIMIT, "too many connects in progress")
            return
        connection = TargetConnection(self, request)
        connection.header = header
        connection.stream = link.attach_stream(stream_id, connection)
        # Nothing is consumed (no credit returned) until the target is connected.
        connection.stream.pauseProducing()
        if busy:
            self.stats["dials_waited",] += 1
            self.waiting_dials.append((connection, decision, self.reactor.seconds()))
            return
        self._dial_target(connection, decision, self.config.connect_timeout)

    def _dial_target(self, connection: TargetConnection, decision: Decision,
                     timeout: float) -> None:
        """Dial the target of ``connection`` (its stream attached and paused)."""
        stream = connection.stream
        assert stream is not None
        link, stream_id = stream.mux, stream.stream_id
        request = connection.request
        target = format_address(request.host, request.port)
        index = self.config.index
        self.dials_in_progress += 1
        if decision.resolve:
            dial = self._resolve_and_dial(decision, request, connection, timeout)
        else:
            dial = dial_target(self.reactor, request.host, request.port, timeout, connection)
        connection.dial = dial

        def done(result: Any) -> Any:
            connection.dial = None
            self._dial_finished()
            return result

        def failed(failure: Failure) -> None:
            stream = connection.stream
            cancelled = failure.check(CancelledError, neterror.ConnectingCancelledError)
            if cancelled or stream is None or stream.finished:
                return
            reason = reason_for_dial_failure(failure)
            if reason is Reason.DENIED:  # logged with the addresses and rules
                message = failure.getErrorMessage()
            else:
                message = f"cannot connect to {target}: {failure.getErrorMessage()}"
                # Not "message=": with a legacy observer installed (trial's), Twisted's legacy
                # wrapper replaces a "message" field of a new-style event with ().
                self.log.warn("[{index}] Stream to {target}: {why}", index=index,
                              target=target, why=message)
            link.reject_stream(stream_id, reason, message)
            connection._finish(f"failed to open ({reason.name})")

        dial.addErrback(failed)
        dial.addBoth(done)

    def _dial_finished(self) -> None:
        """A dial ended (connected or not): its slot goes to the oldest waiting stream."""
        self.dials_in_progress -= 1
        self._next_dial()

    def _next_dial(self) -> None:
        """Start waiting dials while there are free slots; skip streams reset while they
        waited, answer TIMEOUT to those that waited connectTimeout."""
        if self._starting_waiting:  # a dial that ended at once, inside the loop below
            return
        self._starting_waiting = True
        try:
            timeout = self.config.connect_timeout
            while self.waiting_dials and self.dials_in_progress < MAX_DIALS_IN_PROGRESS:
                connection, decision, since = self.waiting_dials.popleft()
                stream = connection.stream
                if stream is None or stream.finished:
                    continue
                remaining = timeout - (self.reactor.seconds() - since)
                if remaining <= 0:
                    target = connection.target
                    self.log.warn("[{index}] Stream to {target} refused: no free dial within "
                                  "connectTimeout ({timeout} s)", index=self.config.index,
                                  target=target, timeout=timeout)
                    stream.mux.reject_stream(stream.stream_id, Reason.TIMEOUT,
                                             f"no free dial to {target} within {timeout:g} s")
                    connection._finish("failed to open (TIMEOUT)")
                    continue
                self._dial_target(connection, decision, remaining)
        finally:
            self._starting_waiting = False

    def _resolve_and_dial(self, decision: Decision, request: OpenRequest,
                          connection: Protocol, timeout: float) -> Deferred[Any]:
        """checkResolvedAddresses: resolve the name, keep the addresses an address or
        network Endpoint allows, dial those (never the name), all within ``timeout`` (what
        is left of connectTimeout)."""
        started = self.reactor.seconds()

        def dial(addresses: list[str]) -> Deferred[Any]:
            remaining = timeout - (self.reactor.seconds() - started)
            return dial_addresses(self.reactor, addresses, request.port, remaining, connection)

        return self._allowed_addresses(request, "tcp", timeout).addCallback(dial)

    def _allowed_addresses(self, request: OpenRequest, protocol: Literal["tcp", "udp"],
                           timeout: float) -> Deferred[list[str]]:
        """The resolved addresses of the request's name that the allow-list allows, in the
        resolver's order (errback _DeniedError when there is none, logged with why)."""
        resolved = resolve_addresses(self.reactor, request.host, request.port)
        resolved.addTimeout(timeout, self.reactor)
        target = format_address(request.host, request.port)

        def check(addresses: list[str]) -> list[str]:
            checked = self.allow.check_addresses(request.port, addresses, protocol)
            if not checked.allowed:
                self.log.warn("[{index}] {protocol} stream to {target} from Proxy-Server "
                              "#{origin} denied after resolution: {why}",
                              index=self.config.index, target=target, origin=request.origin,
                              why=checked.why(), protocol=protocol.upper())
                raise _DeniedError(f"{target} resolved to no allowed address")
            return [address.compressed for address in checked.addresses]

        return resolved.addCallback(check)

    def _open_udp_flow(self, link: MuxProtocol, stream_id: int, request: OpenRequest,
                       decision: Decision | None = None) -> None:
        """A ``udp`` stream: a connected UDP socket to the target (tcptunnel.udp)."""
        flow = ClientFlow(self, request, self.stream_ended)
        flow.stream = link.attach_stream(stream_id, flow)
        # Nothing is acknowledged until the socket exists (the early datagrams wait).
        flow.stream.pauseProducing()
        self.dials_in_progress += 1
        self.stats["udp_flows_opened",] += 1

        def done(result: Any) -> Any:
            self._dial_finished()
            return result

        def failed(failure: Failure) -> None:
            stream = flow.stream
            if stream is None or stream.finished:
                return
            if failure.check(_DeniedError):  # logged with the addresses and rules
                link.reject_stream(stream_id, Reason.DENIED, failure.getErrorMessage())
                flow._finish("failed to open (DENIED)")
                return
            reason = reason_for_udp_failure(failure)
            message = f"cannot open a UDP flow to {flow.target}: {failure.getErrorMessage()}"
            self.log.warn("[{index}] UDP stream to {target}: {why}", index=self.config.index,
                          target=flow.target, why=message)
            link.reject_stream(stream_id, reason, message)
            flow._finish(f"failed to open ({reason.name})")

        timeout = self.config.connect_timeout
        if decision is not None and decision.resolve:
            # checkResolvedAddresses: the flow goes to the first allowed address, not the name.
            started = self.reactor.seconds()

            def start(addresses: list[str]) -> Deferred[None]:
                flow.request = dataclasses.replace(request, host=addresses[0])
                return flow.start(timeout - (self.reactor.seconds() - started))

            ready = self._allowed_addresses(request, "udp", timeout).addCallback(start)
        else:
            ready = flow.start(timeout)
        ready.addBoth(done).addErrback(failed)
