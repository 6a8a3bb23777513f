"""Splice a local TCP connection to a :class:`tcptunnel.mux.MuxStream`.

Producers are registered both ways (the portforward / transit-relay
pattern): a full local socket pauses the stream (credit is withheld), a
spent window pauses reading the local socket.  Half-close is real: local
EOF becomes FIN, a FIN from the far end becomes ``loseWriteConnection``, and
only when both directions are done is the socket closed.  A reset or a lost
link aborts the local socket (TCP RST), never a clean EOF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import interfaces
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
    description ("closed", "reset by ...") for the stream's log event.
    """

    log = Logger()
    # One per tunneled connection: attributes in slots (Twisted's own, such as
    # ``transport``, still go to the instance dict of Protocol).
    __slots__ = ("_done", "_local_eof", "_on_end", "_remote_eof", "end_description", "stream")

    def __init__(self, on_end: Callable[[SpliceProtocol, str], None] | None = None) -> None:
        self.stream: MuxStream | None = None
        self._on_end = on_end
        self._local_eof = False
        self._remote_eof = False
        self._done = False
        self.end_description = ""

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
        self._local_eof = True
        if self.stream is not None:
            self.stream.loseWriteConnection()
        self._close_if_done()

    def writeConnectionLost(self) -> None:  # noqa: N802
        """Our half-close of the local socket completed."""

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """The local socket is gone; an unfinished stream is reset."""
        if self._done:
            return
        stream = self.stream
        if stream is not None and not stream.finished:
            from twisted.internet.error import ConnectionDone

            how = (Reason.CANCELLED if reason.check(ConnectionDone) else Reason.CONNECTION_RESET)
            stream.abortConnection(how, f"the local connection ended: {reason.getErrorMessage()}")
            self._finish(f"reset here ({how.name}: {reason.getErrorMessage()})")
        else:
            self._finish("local connection lost before the stream existed")

    # -- stream -> local socket (StreamEndpoint) -----------------------------

    def stream_data(self, data: bytes) -> None:
        """Bytes from the far end go to the local socket."""
        if self.transport is not None and not self._done:
            self.transport.write(data)

    def stream_ended(self) -> None:
        """FIN from the far end: half-close the local socket."""
        self._remote_eof = True
        transport: Any = self.transport
        if transport is not None and not self._done:
            # loseWriteConnection waits for a registered producer to go away.
            transport.unregisterProducer()
            transport.loseWriteConnection()
        self._close_if_done()

    def stream_closed(self) -> None:
        """Both directions finished cleanly."""
        self._remote_eof = True
        self._local_eof = True
        self._close_if_done()

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Abort the local socket so the application sees a reset, never a clean EOF."""
        by = "the far end" if remote else "this end"
        self._finish(f"reset by {by} ({reason.name}{': ' + message if message else ''})")
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _close_if_done(self) -> None:
        if self._local_eof and self._remote_eof and not self._done:
            self._finish("closed (FIN both ways)")
            if self.transport is not None:
                self.transport.loseConnection()

    def _finish(self, how: str) -> None:
        if self._done:
            return
        self._done = True
        self.end_description = how
        if self._on_end is not None:
            self._on_end(self, how)
