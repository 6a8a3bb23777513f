"""Splice a local TCP connection to a :class:`tcptunnel.mux.MuxStream`.

Producers are registered both ways (the portforward / transit-relay
pattern): a full local socket pauses the stream (credit is withheld), a
spent window pauses reading the local socket.  Half-close is real: local
EOF becomes FIN, a FIN from the far end becomes ``loseWriteConnection``, and
the socket is closed when the stream is closed (FIN sent and received).  A
reset, a lost link or a local connection that ends in an error is a reset
(TCP RST), never a clean EOF.

Where each direction stands is the stream's state (read from the multiplexer's
record through the MuxStream), not flags kept here again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import interfaces
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcptunnel._frames import Reason
from tcptunnel.mux import MuxStream, StreamEndpoint, set_socket_options


@implementer(interfaces.IHalfCloseableProtocol)
class SpliceProtocol(Protocol, StreamEndpoint):
    """The protocol on a local socket whose bytes travel through a stream.

    ``on_end(how)`` is called once when the pair is finished, with a short
    description ("closed ...", "reset here ...", "reset by ...") for the stream's log event;
    :attr:`end_description` keeps it.
    """

    log = Logger()
    #: What the local socket is, in the messages sent to the far end.
    local_name = "local connection"
    # One per tunneled connection: attributes in slots (Twisted's own, such as
    # ``transport``, still go to the instance dict of Protocol).
    __slots__ = ("_on_end", "end_description", "stream")

    def __init__(self, on_end: Callable[[SpliceProtocol, str], None] | None = None) -> None:
        self.stream: MuxStream | None = None
        self._on_end = on_end
        self.end_description = ""

    @property
    def done(self) -> bool:
        """The pair is finished (and ``on_end`` was called)."""
        return bool(self.end_description)

    # -- wiring -------------------------------------------------------------

    def attach(self, stream: MuxStream) -> None:
        """Bind to a stream and register producers both ways; reading starts now."""
        self.stream = stream
        transport: Any = self.transport
        assert transport is not None
        set_socket_options(transport)
        stream.registerProducer(transport, True)
        transport.registerProducer(stream, True)
        transport.resumeProducing()

    # -- local socket -> stream ----------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Bytes from the local socket go to the far end."""
        if self.stream is not None:
            self.stream.write(data)

    def readConnectionLost(self) -> None:  # noqa: N802
        """Local EOF: send FIN, keep receiving."""
        if self.stream is not None:
            self.stream.loseWriteConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        """Our half-close of the local socket completed."""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: N802, B008
        """The local socket is gone: an error resets the stream (CONNECTION_RESET, saying
        what happened); a clean close ends our direction with FIN."""
        if self.done:
            return
        stream = self.stream
        if stream is None:
            self._finish(f"{self.local_name} lost before its stream was opened")
            return
        if stream.finished:
            # The stream ended in the same event, before its endpoint was told.
            self._finish(f"{self.local_name} lost after the stream ended ({stream.state.value})")
            return
        if reason.check(ConnectionDone):
            # As TCP would: FIN now; data that still arrives resets the stream
            # (stream_data), and the far end's FIN closes it.
            stream.loseWriteConnection()
            return
        message = f"the {self.local_name} was lost: {reason.getErrorMessage()}"
        stream.abortConnection(Reason.CONNECTION_RESET, message)
        self._finish(f"reset here (CONNECTION_RESET: {message})")

    # -- stream -> local socket (StreamEndpoint) -----------------------------

    def stream_data(self, data: bytes) -> None:
        """Bytes from the far end go to the local socket."""
        transport: Any = self.transport
        if transport is None or self.done:
            return
        if not getattr(transport, "connected", True) and self.stream is not None:
            # The local socket closed cleanly, but the far end still sends: what a closed
            # TCP socket answers with a RST.
            message = f"data arrived after the {self.local_name} closed"
            self.stream.abortConnection(Reason.CONNECTION_RESET, message)
            self._finish(f"reset here (CONNECTION_RESET: {message})")
            return
        transport.write(data)

    def stream_data_sequence(self, data: list[bytes]) -> None:
        """Several pieces of bytes from the far end, in order (the records one sealed DATA
        frame opened to, tcptunnel.e2e.SealedStream): one ``writeSequence``, one Python
        write path per frame rather than per record.  Whatever :meth:`stream_data` does
        other than writing (early data kept while a target is dialled, a closed socket's
        reset) it still does, piece by piece."""
        transport: Any = self.transport
        if transport is None or self.done or not getattr(transport, "connected", True):
            for piece in data:
                self.stream_data(piece)
            return
        transport.writeSequence(data)

    def stream_ended(self) -> None:
        """FIN from the far end: half-close the local socket."""
        transport: Any = self.transport
        if transport is not None and not self.done:
            # loseWriteConnection waits for a registered producer to go away.
            transport.unregisterProducer()
            transport.loseWriteConnection()

    def stream_closed(self) -> None:
        """Both directions finished cleanly: close the local socket."""
        self._finish("closed (FIN both ways)")
        if self.transport is not None:
            self.transport.loseConnection()

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Abort the local socket so the application sees a reset, never a clean EOF."""
        by = "the far end" if remote else "this end"
        self._finish(f"reset by {by} ({reason.name}{': ' + message if message else ''})")
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _finish(self, how: str) -> None:
        if self.done:
            return
        self.end_description = how
        if self._on_end is not None:
            self._on_end(self, how)
