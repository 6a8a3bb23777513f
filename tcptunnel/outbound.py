"""A link to the Gateway through an outbound HTTP CONNECT or SOCKS5 proxy: a wrapping layer.

:class:`ProxiedClientFactory` is what the connector is given instead of the link's own factory
(the TLS factory, or the link factory for plain links): its protocol runs the handshake of
:mod:`tcptunnel._outbound` with the outbound proxy, then builds the wrapped protocol on the same
transport and hands it every byte from then on, so TLS and the link protocol run inside the
tunnel unchanged.  A handshake failure ends the connection and is reported to the wrapped
factory as a failed connection whose reason says what the outbound proxy answered, so the
proxy logs it and retries with its normal backoff.  Handshakes have a deadline.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import interfaces
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

from tcptunnel._outbound import HttpConnectClient, OutboundProxyError, ProxyUrl, Socks5Client


class OutboundProxyFailedError(ConnectError):
    """The outbound proxy did not open the tunnel (the message says what it answered)."""


class _Handshake(Protocol):
    """Talks to the outbound proxy, then relays to the wrapped protocol."""

    def __init__(self, factory: ProxiedClientFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        proxy = factory.proxy
        cls = HttpConnectClient if proxy.scheme == "http" else Socks5Client
        self.client = cls(proxy, factory.host, factory.port)
        self.inner: Any = None
        self.error: str | None = None
        self._deadline: interfaces.IDelayedCall | None = None

    def connectionMade(self) -> None:  # noqa: N802
        """Send the CONNECT request (or the SOCKS greeting) and start the deadline."""
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._timed_out)
        self.transport.write(self.client.start())  # type: ignore[union-attr]

    def _timed_out(self) -> None:
        self._deadline = None
        self._fail(f"the {self.factory.kind} {self.factory.proxy.describe()} did not open the "
                   f"tunnel within {self.factory.timeout:g} s")

    def _fail(self, message: str) -> None:
        self.error = message
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Feed the handshake until the tunnel is open; afterwards pass bytes on."""
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.error is not None:
            return
        try:
            reply = self.client.receive(data)
        except OutboundProxyError as e:
            self._fail(str(e))
            return
        if reply:
            self.transport.write(reply)  # type: ignore[union-attr]
        if self.client.done:
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            self.inner = self.factory.wrapped.buildProtocol(self.addr)
            if self.inner is None:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.inner.makeConnection(self.transport)
            if self.client.leftover:
                self.inner.dataReceived(self.client.leftover)

    def connectionLost(self, reason: Failure = Failure(ConnectError())) -> None:  # noqa: B008, N802
        """Pass the loss on, or report the failed handshake as a failed connection."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.inner is not None:
            self.inner.connectionLost(reason)
            return
        if self.error is None:
            self.error = (f"the {self.factory.kind} {self.factory.proxy.describe()} closed the "
                          f"connection before the tunnel was open ({reason.getErrorMessage()})")
        self.factory.handshake_failed = Failure(OutboundProxyFailedError(string=self.error))


class WrappingClientFactory:
    """What a client factory that runs a handshake layer over ``wrapped`` passes on: the
    connector's callbacks, a handshake that failed (``handshake_failed``) reported to
    ``wrapped`` as a failed connection, and start/stop.  Mixed into the outbound-proxy and
    the WebSocket client factories."""

    wrapped: Any
    handshake_failed: Failure | None

    def startedConnecting(self, connector: Any) -> None:  # noqa: N802
        """Passed on."""
        self.wrapped.startedConnecting(connector)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:  # noqa: N802
        """A layer that never opened is a failed connection; an open one was lost."""
        failed, self.handshake_failed = self.handshake_failed, None
        if failed is not None:
            self.wrapped.clientConnectionFailed(connector, failed)
        else:
            self.wrapped.clientConnectionLost(connector, reason)

    def doStart(self) -> None:  # noqa: N802
        """Start the wrapped factory too."""
        super().doStart()  # type: ignore[misc]
        self.wrapped.doStart()

    def doStop(self) -> None:  # noqa: N802
        """Stop the wrapped factory too."""
        self.wrapped.doStop()
        super().doStop()  # type: ignore[misc]


class ProxiedClientFactory(WrappingClientFactory, ClientFactory):
    """Connects through an outbound proxy to ``host:port``, then runs ``wrapped`` inside.

    The connector is pointed at the outbound proxy (``proxy.host``, ``proxy.port``); the
    connector's callbacks are passed to ``wrapped``, a failed handshake as a failed connection.
    """

    noisy = False

    def __init__(self, wrapped: Any, proxy: ProxyUrl, host: str, port: int,
                 clock: interfaces.IReactorTime, timeout: float = 30.0) -> None:
        self.wrapped = wrapped
        self.proxy = proxy
        self.host = host
        self.port = port
        self.clock = clock
        self.timeout = timeout
        self.kind = "HTTP proxy" if proxy.scheme == "http" else "SOCKS5 proxy"
        self.handshake_failed: Failure | None = None

    def buildProtocol(self, addr: Any) -> _Handshake:  # noqa: N802
        """The handshake protocol for a new connection to the outbound proxy."""
        self.handshake_failed = None
        return _Handshake(self, addr)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:  # noqa: N802
        """The outbound proxy itself could not be reached: say so, and pass it on."""
        self.wrapped.clientConnectionFailed(connector, Failure(OutboundProxyFailedError(
            string=f"cannot reach the {self.kind} {self.proxy.describe()}: "
                   f"{reason.getErrorMessage()}")))
