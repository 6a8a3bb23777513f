"""PROXY protocol headers (v1 and v2) in front of a Gateway Listener (issue 20).

A Listener with ``acceptProxyProtocol="127.0.0.1/32,10.0.0.0/8"`` sits behind a load
balancer (HAProxy ``send-proxy-v2``, nginx ``proxy_protocol on``) that starts every
connection with a PROXY header naming the real client.  From those sources the header is
required; from anyone else it is refused, since whoever can send one could claim any
address (and so dodge the login throttle and the per-address limits).

The header is parsed by Twisted's own :mod:`twisted.protocols.haproxy` (its
``HAProxyProtocolWrapper`` and the v1/v2 parsers it picks); this module adds what the
Gateway needs around it:

- the choice by source (required from trusted networks, refused from others);
- headers split over several reads (Twisted's wrapper decides on the first read alone and
  closes a connection whose first segment is shorter than 8 or 16 bytes);
- a deadline for the header, a cap on connections waiting for one, and a log line saying
  why a connection was closed (Twisted's wrapper closes silently);
- the wrapped protocol (TLS, then the link) is connected only once the header is read, so
  that ``getPeer()`` already returns the client's address when the link starts: the
  unauthenticated-slot limits, the throttle, the logs and the status page all see it.

The wrapper sits outside TLS: the header comes before the TLS handshake, as HAProxy and
nginx send it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import interfaces
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from tcptunnel._websocket import Network, is_trusted
from tcptunnel.mux import describe_address

__all__ = ["ProxyHeaderFactory", "ProxyHeaderProtocol", "header_kind"]

_V1_SIGNATURE = V1Parser.PROXYSTR + b" "  # "PROXY "
_V2_SIGNATURE = V2Parser.PREFIX  # 12 bytes
# A v2 header's fixed part: signature, version/command, family, length.
_V2_FIXED = 16
# Connections from trusted sources still waiting for their header, per Listener.  Only a
# balancer can hold these, and each one for at most the deadline.
DEFAULT_MAX_PENDING = 256


def header_kind(head: bytes) -> str | None:
    """What the first bytes of a connection are: ``"v1"``/``"v2"`` once they start a PROXY
    header (6 or 13 bytes are enough), ``"more"`` while they could still start one,
    ``None`` once they cannot (a TLS ClientHello, the link's magic: their first byte
    already differs)."""
    if head.startswith(_V1_SIGNATURE):
        return "v1"
    if head.startswith(_V2_SIGNATURE) and len(head) > len(_V2_SIGNATURE):
        return "v2"
    if _V1_SIGNATURE.startswith(head) or _V2_SIGNATURE.startswith(head):
        return "more"
    return None


class ProxyHeaderProtocol(HAProxyProtocolWrapper):
    """One accepted connection of a Listener with ``acceptProxyProtocol``.

    From a trusted source: the header first (by its deadline), then the wrapped protocol
    is connected and its ``getPeer()``/``getHost()`` are the header's addresses (Twisted's
    ``HAProxyProtocolWrapper.getPeer``).  A v2 ``LOCAL`` header (a balancer's own health
    check) leaves the balancer's address.  From any other source: the wrapped protocol is
    connected at once, and the connection is closed if its first bytes are a PROXY header.
    """

    factory: ProxyHeaderFactory
    log = Logger()

    def __init__(self, factory: ProxyHeaderFactory, wrapped: interfaces.IProtocol) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._head = b""  # bytes read while deciding; at most _V2_FIXED before a parser
        # "sniff" (untrusted: making sure no header comes), "header" (trusted: waiting for
        # it), "pass" (every byte is the wrapped protocol's), "refused".
        self._mode = "sniff"
        self._connected = False  # the wrapped protocol was connected
        self._deadline: interfaces.IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        """Like ProtocolWrapper's, but the wrapped protocol is connected in
        :meth:`connectionMade`, which may wait for the header."""
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:  # noqa: N802
        """Decide by source: wait for the header, or connect the wrapped protocol now."""
        factory = self.factory
        factory.registerProtocol(self)
        assert self.transport is not None
        peer = self.transport.getPeer()
        if not is_trusted(str(getattr(peer, "host", "")), factory.trusted):
            self._connect()
            return
        self._mode = "header"
        if factory.pending >= factory.max_pending:
            self._refuse(f"{factory.max_pending} connections are already waiting for their "
                         "PROXY header")
            return
        factory.pending += 1
        self._deadline = factory.clock.callLater(factory.timeout, self._timed_out)

    @property
    def waiting(self) -> bool:
        """Whether this connection is still waiting for its header."""
        return self._mode == "header"

    def abort(self) -> None:
        """Close at once, unheard (the Listener is stopping)."""
        self._mode = "refused"
        self._stop_waiting()
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _connect(self) -> None:
        self._connected = True
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]

    def _timed_out(self) -> None:
        self._deadline = None
        self.factory.pending -= 1
        self._refuse(f"no PROXY header within {self.factory.timeout:g} s "
                     "(acceptProxyProtocol requires one from this address)")

    def _stop_waiting(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            self.factory.pending -= 1

    def _refuse(self, why: str) -> None:
        """Close the connection at once, saying why (nothing can be told to the peer)."""
        if self._mode == "refused":
            return
        self._mode = "refused"
        self._stop_waiting()
        factory = self.factory
        factory.refused += 1
        assert self.transport is not None
        if factory.log_allowed():
            self.log.warn("{what}: connection from {peer} refused: {why}", what=factory.what,
                          peer=describe_address(self.transport.getPeer()), why=why)
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Pass bytes on, or gather the first ones until the header is read or refused."""
        mode = self._mode
        if mode == "pass":
            self.wrappedProtocol.dataReceived(data)
        elif mode == "sniff":
            self._untrusted_data(data)
        elif mode == "header":
            self._header_data(data)

    def _untrusted_data(self, data: bytes) -> None:
        head = self._head + data
        kind = header_kind(head[:_V2_FIXED])
        if kind == "more":
            self._head = head
            return
        if kind is not None:
            self._refuse("it sent a PROXY header, but its address is not in the "
                         "Listener's acceptProxyProtocol")
            return
        self._head = b""
        self._mode = "pass"
        self.wrappedProtocol.dataReceived(head)

    def _header_data(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            head = self._head + data
            kind = header_kind(head[:_V2_FIXED])
            if kind == "more" or (kind == "v2" and len(head) < _V2_FIXED):
                self._head = head
                return
            if kind is None or (kind == "v2" and head[12] & 0xF0 != 0x20):
                self._refuse("no PROXY header (acceptProxyProtocol requires one from "
                             "this address)")
                return
            self._head = b""
            self._parser = parser = V1Parser() if kind == "v1" else V2Parser()
            data = head
        try:
            info, remaining = parser.feed(data)
        except (InvalidProxyHeader, KeyError, ValueError) as e:
            # KeyError: Twisted's v2 parser looks the address family up unchecked.
            self._refuse(f"invalid PROXY header ({type(e).__name__})")
            return
        if info is None:
            return
        self._parser = None
        self._stop_waiting()
        self._proxyInfo = info
        self._mode = "pass"
        self._connect()
        if remaining and self._mode == "pass":
            self.wrappedProtocol.dataReceived(remaining)

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """Tell the wrapped protocol, if it was ever connected."""
        self._stop_waiting()
        if self._connected:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class ProxyHeaderFactory(HAProxyWrappingFactory):
    """Wraps a Listener's factory (outside its TLS) to read PROXY headers from ``trusted``
    sources and refuse them from everyone else.

    ``what`` starts the log lines ("[0] Listener 127.0.0.1:7000"); ``timeout`` is the
    header's deadline (the Gateway uses its login timeout); ``log_allowed`` is asked before
    each refusal line (the Gateway's budget for lines about unauthenticated peers).
    """

    protocol = ProxyHeaderProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrapped: Any, trusted: tuple[Network, ...], clock: Any, what: str,
                 timeout: float = 10.0, max_pending: int = DEFAULT_MAX_PENDING,
                 log_allowed: Callable[[], bool] = lambda: True) -> None:
        super().__init__(wrapped)
        self.trusted = trusted
        self.clock = clock
        self.what = what
        self.timeout = timeout
        self.max_pending = max_pending
        self.log_allowed = log_allowed
        self.pending = 0  # trusted connections still waiting for their header
        self.refused = 0  # connections closed for a missing, unwanted or invalid header

    def abort_waiting(self) -> None:
        """Abort the connections still waiting for their header (the Listener stops: they
        have no link yet that the Gateway could close)."""
        for wrapper in list(self.protocols):
            if isinstance(wrapper, ProxyHeaderProtocol) and wrapper.waiting:
                wrapper.abort()
