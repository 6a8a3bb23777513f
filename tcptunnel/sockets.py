"""TCP ports and connectors whose connections send what an event wrote at the end of that event.

Twisted's TCP transport never sends in ``write()``: it buffers the bytes and asks the reactor to
report the socket writable, so they leave one reactor iteration later (``epoll_ctl`` to watch
for writability, ``epoll_wait``, a dispatch, ``send``, ``epoll_ctl`` to stop watching).  A relay
writes in nearly every event it handles, so that extra iteration is paid at every hop of every
round trip and of every connection set-up.  The transports here note the connections written to
while one of their events (data readable, socket writable, connect finished, connection
accepted) is handled, and when the handler returns they send what those connections hold:
one ``send`` per connection per event, as many as before (all writes of an event still go out
together, so bulk transfer keeps its large sends), but no extra reactor iteration.

What cannot be sent at once (the socket buffer is full), a write made outside such an event
(a timer, a Deferred fired from elsewhere), and every close or half-close take Twisted's usual
path through the reactor, so the connections behave exactly as Twisted's own; only the moment
of the ``send`` moves.  Reactors that are not Twisted's POSIX socket reactors (tests'
``MemoryReactor``) get plain ``listenTCP`` / ``connectTCP``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from zope.interface import directlyProvides, providedBy


class _PendingSends:
    """The connections written to during the event being handled.

    One per process: the reactor handles one event at a time on one thread, so no two
    events' sends can interleave.
    """

    log = Logger()

    def __init__(self) -> None:
        self.depth = 0  # > 0 while an event (or the sending at its end) is being handled
        self.connections: list[_SendAtEventEnd] = []

    def add(self, connection: _SendAtEventEnd) -> None:
        """Send for ``connection`` at the end of the current event."""
        if not connection.send_queued:  # a flag, not a list scan: one event may write to
            connection.send_queued = True  # every stream of a link
            self.connections.append(connection)

    def run(self, handler: Any) -> Any:
        """Run an event handler; when the outermost one returns, send what it wrote."""
        self.depth += 1
        try:
            return handler()
        finally:
            if self.depth == 1:
                self._send_all()
            self.depth -= 1

    def _send_all(self) -> None:
        # A send can resume a producer that writes again: those writes join the list.
        connections = self.connections
        index = 0
        while index < len(connections):
            connection = connections[index]
            index += 1
            connection.send_queued = False
            try:
                connection.send_pending()
            except Exception:
                # Not expected (Twisted's doWrite reports socket errors by its return
                # value); the reactor gets the connection back and meets it again.
                self.log.failure("Sending at the end of an event failed")
                if connection.connected:
                    connection.wait_until_writable()
        connections.clear()


_pending = _PendingSends()


class _SendAtEventEnd:
    """Mixin for Twisted's TCP connections: defer the wait for writability to the end of the
    event being handled, and send then.  Must come before the Twisted class in the bases."""

    send_queued = False  # in _pending's list

    # What the mixin reads of the Twisted connection it is mixed into (Twisted's names).
    connected: int
    disconnecting: int
    dataBuffer: bytes  # noqa: N815
    _tempDataBuffer: list[bytes]  # noqa: N815

    def startWriting(self) -> None:  # noqa: N802
        """Called by ``write`` with bytes to send: during an event, send at its end."""
        if _pending.depth and self.connected and not self.disconnecting:
            _pending.add(self)
            return
        self.wait_until_writable()

    def wait_until_writable(self) -> None:
        """Twisted's own startWriting: the reactor calls doWrite when the socket can take
        more."""
        super().startWriting()  # type: ignore[misc]

    def send_pending(self) -> None:
        """Send now; leave to the reactor what does not go out, and any close or error."""
        if not self.connected:
            return  # lost meanwhile (as with Twisted's own path, nothing is left to send)
        if (not self.disconnecting and self.doWrite() is None
                and not (self.dataBuffer or self._tempDataBuffer)):
            return
        # Unsent bytes, a close begun in the handler, or a write error (the reactor's
        # doWrite meets it again and tears the connection down the usual way).
        self.wait_until_writable()

    def doRead(self) -> Any:  # noqa: N802
        """Readable: handle it, then send what the handler wrote."""
        return _pending.run(super().doRead)  # type: ignore[misc]

    def doWrite(self) -> Any:  # noqa: N802
        """Writable: send, and what a resumed producer writes goes out in the same event."""
        return _pending.run(super().doWrite)  # type: ignore[misc]


class _Server(_SendAtEventEnd, tcp.Server):
    """An accepted connection."""


class _Client(_SendAtEventEnd, tcp.Client):
    """An outgoing connection."""

    def doConnect(self) -> Any:  # noqa: N802
        """Connect finished (or failed): what ``connectionMade`` wrote goes out now."""
        return _pending.run(super().doConnect)


class _Port(tcp.Port):
    """A listening port whose accepted connections are ``_Server``."""

    transport = _Server

    def doRead(self) -> Any:  # noqa: N802
        """Accept: what the new connections' ``connectionMade`` wrote goes out now."""
        return _pending.run(super().doRead)


class _Connector(tcp.Connector):
    """A connector whose connections are ``_Client``."""

    def _makeTransport(self) -> _Client:  # noqa: N802
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


def listen_tcp(reactor: Any, port: int, factory: Any, backlog: int = 50,
               interface: str = "") -> Any:
    """Like ``reactor.listenTCP``; accepted connections send at the end of each event."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = _Port(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def connect_tcp(reactor: Any, host: str, port: int, factory: Any, timeout: float = 30.0,
                bind_address: Any = None) -> Any:
    """Like ``reactor.connectTCP``; the connection sends at the end of each event."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.connectTCP(host, port, factory, timeout=timeout,
                                  bindAddress=bind_address)
    connector = _Connector(host, port, factory, timeout, bind_address, reactor)
    connector.connect()
    return connector


class _DialingReactor:
    """A view of a reactor whose ``connectTCP`` is ``connect_tcp``; everything else, and
    every interface the reactor provides, is the reactor's own."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30.0,  # noqa: N802
                   bindAddress: Any = None) -> Any:  # noqa: N803
        """``connect_tcp`` on the reactor."""
        return connect_tcp(self._reactor, host, port, factory, timeout, bindAddress)


def dialing_reactor(reactor: Any) -> Any:
    """``reactor`` for code that connects through it (``HostnameEndpoint``), such that its
    connections send at the end of each event too."""
    return _DialingReactor(reactor)
