"""Twisted adapters for a link: :class:`LinkProtocol`, :class:`MuxProtocol`, :class:`MuxStream`.

``LinkProtocol`` is the IProtocol on a link and the one streaming producer
registered on its transport: it writes only while the transport is not
paused, and keeps the link alive with PINGs.  ``MuxProtocol`` adds the
streams of a proxy; each :class:`MuxStream` is the transport, consumer and
producer for one local TCP connection (see :mod:`tcptunnel.splice`).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcptunnel import _frames as fr
from tcptunnel import _mux
from tcptunnel._frames import GoAway, LinkError, Reason
from tcptunnel._link import GoAwayReceived, LinkCore, LinkState, PongReceived
from tcptunnel.config import format_address

_UNKNOWN_ADDRESS = IPv4Address("TCP", "0.0.0.0", 0)
# How long a closed link may take to send its GOAWAY before it is aborted.
CLOSE_GRACE = 10.0
TOO_SLOW_CLOSE_GRACE = 1.0


@implementer(interfaces.IPushProducer, interfaces.IHandshakeListener)
class LinkProtocol(Protocol):
    """Drive a :class:`LinkCore` from a Twisted transport.

    Subclasses handle events in :meth:`handle_events`.  ``clock`` is the
    reactor (or a ``Clock`` in tests) used for keepalive timers.
    """

    log = Logger()
    core: LinkCore

    def __init__(
        self,
        core: LinkCore,
        clock: interfaces.IReactorTime,
        keepalive_interval: float = 15.0,
        keepalive_timeout: float = 30.0,
    ) -> None:
        self.core = core
        self.clock = clock
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self._paused = False
        self._flushing = False
        self._closing = False
        self.connected_at = 0.0
        self.last_received = 0.0
        self.rtt: float | None = None
        self.bytes_sent = 0
        self._ping_sent_at: dict[bytes, float] = {}
        self._keepalive_call: interfaces.IDelayedCall | None = None
        self._abort_call: interfaces.IDelayedCall | None = None
        self._pinged_for = -1.0  # last_received value of the idle period we pinged in
        self.close_reason = "connection lost"
        self._peer_went_away = False
        self.peer_description = "?"
        self.tls_description = ""
        # The index of the <Instance> this link belongs to, set by the role's subclass: every
        # log line about the link starts with "[index]" like the role's own lines.
        self.instance_index: int | None = None

    # -- IProtocol ----------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        """Register as the link transport's producer and send magic + HELLO."""
        self.connected_at = self.last_received = self.clock.seconds()
        peer = self.transport.getPeer() if self.transport is not None else None
        self.peer_description = describe_address(peer)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        set_socket_options(self.transport)
        self._schedule_keepalive()
        self.flush()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Feed the core; act on its events; send what it queued."""
        if self._closing:
            return
        self.last_received = self.clock.seconds()
        try:
            events = self.core.receive_data(data)
        except LinkError as e:
            self.fail(e.code, e.message)
            return
        for event in events:
            if isinstance(event, PongReceived):
                sent = self._ping_sent_at.pop(event.opaque, None)
                if sent is not None:
                    self.rtt = self.clock.seconds() - sent
            elif isinstance(event, GoAwayReceived):
                if event.final:  # a first DRAINING leaves the link open (tcptunnel._link)
                    self.close_reason = f"peer sent GOAWAY {event.code.name}: {event.message}"
                    self._peer_went_away = True
                self.handle_go_away(event)
        self.handle_events(events)
        if self.core.state is LinkState.CLOSED:
            self._close_transport()
            return
        self.flush()

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """Stop timers; subclasses reset their streams."""
        self._closing = True
        for call in (self._keepalive_call, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._keepalive_call = self._abort_call = None

    def handshakeCompleted(self) -> None:  # noqa: N802
        """TLS is up: log its version and cipher."""
        connection: Any = getattr(self.transport, "getHandle", lambda: None)()
        try:
            version, cipher = connection.get_protocol_version_name(), connection.get_cipher_name()
        except AttributeError:
            return
        self.tls_description = f"{version}, {cipher}"
        if self.log_allowed():
            self.log_link(self.log.info, "TLS established ({version}, {cipher})",
                          version=version, cipher=cipher)

    # -- IPushProducer ------------------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        """The link transport's buffer is full: stop writing."""
        self._paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        """The link transport drained: write what is queued."""
        self._paused = False
        self.flush()

    def stopProducing(self) -> None:  # noqa: N802
        """The transport is going away; connectionLost follows."""
        self._paused = True

    # -- sending ------------------------------------------------------------

    def flush(self) -> None:
        """Write queued frames while the transport accepts them."""
        if self._flushing or self._closing or self.transport is None:
            return
        self._flushing = True
        try:
            core = self.core
            while not self._paused and core.wants_to_send:
                frames = core.data_to_send()
                if frames:
                    self.bytes_sent += sum(map(len, frames))
                    self.transport.writeSequence(frames)
                self.after_flush()
        finally:
            self._flushing = False

    def after_flush(self) -> None:
        """Hook: the core framed data (streams may have drained)."""

    def fail(self, code: GoAway, message: str, abort_after: float | None = None) -> None:
        """Close the link because of a violation or a local decision, telling the peer why.

        The socket is aborted if it is still open ``abort_after`` seconds later (by default
        10 s: a peer that never reads must not keep it for ever; 1 s for TOO_SLOW, since a
        peer that does not read will not read its GOAWAY either).
        """
        if self._closing:
            return
        if not self._peer_went_away:
            # A peer that sent GOAWAY (in the same read as the frame that broke a rule) is
            # closing anyway and is owed no answer: its reason stays the link's.
            self.close_reason = f"{code.name}: {message}"
        if self.log_allowed():
            # A normal close (shutdown) is news, not a problem.
            emit = self.log.info if code is GoAway.NORMAL else self.log.warn
            self.log_link(emit, "closing ({code}): {message}", code=code.name, message=message)
        self.core.go_away(code, message)
        if abort_after is None:
            abort_after = TOO_SLOW_CLOSE_GRACE if code is GoAway.TOO_SLOW else CLOSE_GRACE
        self._close_transport(abort_after)

    def log_link(self, emit: Any, text: str, **fields: Any) -> None:
        """Log ``"[index] Link <peer>: " + text`` with ``emit`` (``self.log.info`` ...);
        ``text`` is a format string over ``fields``."""
        if self.instance_index is None:
            emit("Link {peer}: " + text, peer=self.peer_description, **fields)
        else:
            emit("[{index}] Link {peer}: " + text, index=self.instance_index,
                 peer=self.peer_description, **fields)

    def log_allowed(self) -> bool:
        """Hook: whether a log line about this link may be written now (the Gateway limits
        lines about peers that have not logged in)."""
        return True

    def abort(self) -> None:
        """Drop the connection now, with nothing more sent (a TCP RST)."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.abortConnection()

    def _close_transport(self, abort_after: float = 10.0) -> None:
        """Send whatever is queued (GOAWAY included), ignoring pauses, then close."""
        if self._closing or self.transport is None:
            return
        frames = self.core.data_to_send(limit=0)
        self._closing = True
        transport: Any = self.transport
        transport.unregisterProducer()
        if frames:
            transport.writeSequence(frames)
        transport.loseConnection()
        self._abort_call = self.clock.callLater(abort_after, self._abort_if_open)

    def _abort_if_open(self) -> None:
        self._abort_call = None
        transport: Any = self.transport
        if transport is not None and getattr(transport, "connected", False):
            transport.abortConnection()

    def handle_events(self, events: list[object]) -> None:
        """Hook for subclasses."""

    def handle_go_away(self, event: GoAwayReceived) -> None:
        """Hook: the peer closes the link (or, ``event.final`` False, drains it)."""

    # -- keepalive ----------------------------------------------------------

    def _schedule_keepalive(self) -> None:
        """Wake up exactly when the next keepalive decision is due."""
        now = self.clock.seconds()
        if self._pinged_for == self.last_received:
            due = self.last_received + self.keepalive_interval + self.keepalive_timeout
        else:
            due = self.last_received + self.keepalive_interval
        self._keepalive_call = self.clock.callLater(max(0.01, due - now), self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive_call = None
        if self._closing:
            return
        idle = self.clock.seconds() - self.last_received
        if idle >= self.keepalive_interval + self.keepalive_timeout:
            # Declared dead: its streams are reset now (docs/reliability.md promises
            # interval + timeout), not after the grace a living peer gets for its GOAWAY.
            self.fail(GoAway.KEEPALIVE_TIMEOUT,
                      f"nothing received for {idle:.0f} s (keepalive timeout)", abort_after=0.0)
            return
        if idle >= self.keepalive_interval and self._pinged_for != self.last_received:
            # One PING per idle period; any frame from the peer ends the period.
            self._pinged_for = self.last_received
            self.send_ping()
        self._schedule_keepalive()

    def send_ping(self) -> None:
        """Send a PING now; its PONG updates :attr:`rtt`."""
        opaque = os.urandom(8)
        if len(self._ping_sent_at) > 16:
            self._ping_sent_at.clear()
        self._ping_sent_at[opaque] = self.clock.seconds()
        self.core.ping(opaque)
        self.flush()


def describe_address(address: Any) -> str:
    """``host:port`` of a Twisted address (IPv6 in brackets, as config.format_address writes
    every address in our logs), or its str() when it has no host (a UNIX socket, tests)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return str(address)
    return format_address(host, port)


# Unsent bytes the kernel may hold for a link socket.  Beyond this, data
# waits in our own queues, where control frames and other streams can
# overtake it; without it a bulk stream could park megabytes in the kernel
# ahead of a keystroke.
LINK_NOTSENT_LOWAT = 128 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform == "linux" else None)


def set_socket_options(transport: Any) -> None:
    """TCP_NODELAY, SO_KEEPALIVE and TCP_NOTSENT_LOWAT on a TCP socket (link or local)."""
    # Under TLS the TCP transport is the wrapper's own transport.
    tcp = getattr(transport, "transport", None) or transport
    try:
        tcp.setTcpNoDelay(True)
        tcp.setTcpKeepAlive(True)
        handle = tcp.getHandle()
        if _TCP_NOTSENT_LOWAT is not None and isinstance(handle, socket.socket):
            handle.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, LINK_NOTSENT_LOWAT)
    except (AttributeError, OSError):
        pass  # not a TCP socket (tests, other transports)


# The states in which a stream has ended (nothing moves it any more).
_ENDED = frozenset(state for state in _mux.StreamState if state.terminal)


class StreamEndpoint:
    """What a :class:`MuxStream` delivers to: the local side of a splice.

    The endpoint is also the protocol of the local socket that the stream is the producer
    for: its ``connectionLost`` must end the stream (see :meth:`MuxStream.stopProducing`).
    """

    def stream_data(self, data: bytes) -> None:
        """Bytes from the far end."""
        raise NotImplementedError

    def stream_opened(self) -> None:
        """The far end accepted the stream."""

    def stream_ended(self) -> None:
        """The far end half-closed (FIN)."""
        raise NotImplementedError

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """The stream ended abruptly (or failed to open)."""
        raise NotImplementedError

    def stream_closed(self) -> None:
        """Both directions finished cleanly."""
        raise NotImplementedError


@implementer(interfaces.ITransport, interfaces.IConsumer, interfaces.IPushProducer)
class MuxStream:
    """One stream of a :class:`MuxProtocol`, seen as a transport by the local side.

    ``write`` sends DATA (buffered within the window), ``loseWriteConnection``
    sends FIN, ``abortConnection`` sends RESET.  As an IPushProducer it is
    registered on the local socket's transport, which pauses it when its
    buffer is full; as an IConsumer it takes the local socket as its own
    producer and pauses it when the window is spent.

    Where the stream stands (:attr:`state`, :attr:`finished`, :attr:`write_closed`,
    :attr:`remote_ended`) is read from the core's record of the stream, never kept twice.
    """

    # One per tunneled connection: no per-instance dict.
    __slots__ = ("_consumer_paused", "_producer_paused", "_unacknowledged", "bytes_in",
                 "bytes_out", "endpoint", "mux", "producer", "record", "stream_id")

    def __init__(self, mux: MuxProtocol, stream_id: int, endpoint: StreamEndpoint) -> None:
        self.mux = mux
        self.stream_id = stream_id
        # The core's record outlives the stream's place in the core's table, with its
        # terminal state.
        self.record = mux.core.streams[stream_id]
        self.endpoint = endpoint
        self.producer: interfaces.IPushProducer | None = None
        self._producer_paused = False
        self._consumer_paused = False
        self._unacknowledged = 0
        self.bytes_in = 0
        self.bytes_out = 0

    # -- state (from the core) ----------------------------------------------

    @property
    def state(self) -> _mux.StreamState:
        """The stream's state in the transition table."""
        return self.record.state

    @property
    def finished(self) -> bool:
        """The stream ended: CLOSED or RESET (also when the OPEN failed)."""
        return self.record.state in _ENDED

    @property
    def write_closed(self) -> bool:
        """Our direction ended: FIN is sent, or queued behind the data buffered before it."""
        return self.record.send.fin

    @property
    def remote_ended(self) -> bool:
        """The far end's FIN arrived."""
        return self.record.recv.fin

    # -- ITransport ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes to the far end (after the window allows)."""
        if self.record.state in _ENDED or not data:
            return
        core = self.mux.core
        self.bytes_out += len(data)
        core.send_data(self.stream_id, data)
        self.mux.flush()
        if (
            self.producer is not None
            and not self._producer_paused
            and core.send_buffered(self.stream_id) >= core.send_low_water
        ):
            self._producer_paused = True
            self.producer.pauseProducing()

    def send_datagram(self, data: bytes) -> str | None:
        """Send one datagram of a ``udp`` stream whole, or drop it: None when it was
        queued, else why it was dropped (``tcptunnel._mux.DROP_*``).  Never pauses anyone."""
        why = self.mux.core.send_datagram(self.stream_id, data)
        if why is None:
            self.bytes_out += len(data)
            self.mux.flush()
        return why

    def writeSequence(self, data: Iterable[bytes]) -> None:  # noqa: N802
        """Send several byte strings."""
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:  # noqa: N802
        """Half-close: FIN after the buffered data."""
        if not self.finished:
            self.mux.core.end_stream(self.stream_id)
            self.mux.flush()

    def loseConnection(self) -> None:  # noqa: N802
        """Same as :meth:`loseWriteConnection`: the far end decides when to close."""
        self.loseWriteConnection()

    def abortConnection(self, reason: Reason = Reason.CANCELLED, message: str = "") -> None:  # noqa: N802
        """Reset the stream in both directions."""
        if not self.finished:
            self.mux.core.reset_stream(self.stream_id, reason, message)
            self.mux.forget(self.stream_id)
            self.mux.flush()

    def getPeer(self) -> Any:  # noqa: N802
        """The link's peer (the Gateway)."""
        transport = self.mux.transport
        return transport.getPeer() if transport is not None else _UNKNOWN_ADDRESS

    def getHost(self) -> Any:  # noqa: N802
        """The link's local address."""
        transport = self.mux.transport
        return transport.getHost() if transport is not None else _UNKNOWN_ADDRESS

    # -- IConsumer ----------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        """Take the local socket as the producer of this stream's outgoing bytes."""
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        """Forget the local producer."""
        self.producer = None

    def resume_producer_if_drained(self) -> None:
        """Called by the mux when this stream's send buffer drained."""
        if self.producer is not None and self._producer_paused and not self.finished:
            self._producer_paused = False
            self.producer.resumeProducing()

    # -- IPushProducer (the local socket's buffer is full / drained) --------

    def pauseProducing(self) -> None:  # noqa: N802
        """The local socket stopped taking data: withhold credit."""
        if not self._consumer_paused:
            self._consumer_paused = True
            self.mux.core.set_consumer_paused(self.stream_id, True, self.mux.clock.seconds())

    def resumeProducing(self) -> None:  # noqa: N802
        """The local socket drained: return the withheld credit."""
        if self._consumer_paused:
            self._consumer_paused = False
            now = self.mux.clock.seconds()
            self.mux.core.set_consumer_paused(self.stream_id, False, now)
            if self._unacknowledged and not self.finished:
                count, self._unacknowledged = self._unacknowledged, 0
                self.mux.core.data_consumed(self.stream_id, count, now)
                self.mux.flush()

    def stopProducing(self) -> None:  # noqa: N802
        """The local socket is going away: withhold credit for what it can no longer take.

        Twisted calls this from the transport's connectionLost *before* the protocol's
        connectionLost, which alone knows how the socket ended (a clean close, or an error
        such as a reset) and ends the stream accordingly.  Resetting here would end every
        such stream as CANCELLED with no message.
        """
        self.pauseProducing()

    # -- from the mux -------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        """Hand bytes to the local side; acknowledge them if it took them."""
        self.bytes_in += len(data)
        self.endpoint.stream_data(data)
        if self._consumer_paused:
            self._unacknowledged += len(data)
        elif self.record.state not in _ENDED:
            self.mux.core.data_consumed(self.stream_id, len(data), self.mux.clock.seconds())


class MuxProtocol(LinkProtocol):
    """The link protocol of a proxy: a :class:`tcptunnel._mux.MuxConnection` plus streams."""

    core: _mux.MuxConnection

    def __init__(self, core: _mux.MuxConnection, clock: interfaces.IReactorTime,
                 keepalive_interval: float = 15.0, keepalive_timeout: float = 30.0) -> None:
        super().__init__(core, clock, keepalive_interval, keepalive_timeout)
        # Credit round trips are timed with the reactor's clock (tcptunnel._stream.CreditRtt).
        core.clock = clock.seconds
        self.streams: dict[int, MuxStream] = {}
        self.on_open_requested: Callable[[int, fr.OpenRequest], None] | None = None

    def open_stream(self, host: str, port: int, endpoint: StreamEndpoint,
                    kind: int = fr.KIND_TCP,
                    fields: tuple[tuple[int, bytes], ...] = ()) -> MuxStream:
        """Open a stream of ``kind`` (``tcp``, or ``udp``: datagrams) to host:port, with
        extra OPEN ``fields`` (e.g. CLIENT_ADDRESS); raises StreamError (e.g. LIMIT)."""
        try:
            stream_id = self.core.open_stream(host, port, kind, fields)
        except _mux.StreamIdsExhaustedError:
            # Ids never repeat on a link: start a new one (the proxy reconnects).
            self.fail(GoAway.NORMAL, "stream ids of this link are used up; reconnecting")
            raise
        stream = MuxStream(self, stream_id, endpoint)
        self.streams[stream_id] = stream
        self.flush()
        return stream

    def attach_stream(self, stream_id: int, endpoint: StreamEndpoint) -> MuxStream:
        """Create the MuxStream for a stream the peer asked to open."""
        stream = MuxStream(self, stream_id, endpoint)
        self.streams[stream_id] = stream
        return stream

    def accept_stream(self, stream_id: int) -> None:
        """Answer OPEN with ok."""
        self.core.accept_stream(stream_id)
        self.flush()

    def reject_stream(self, stream_id: int, reason: Reason, message: str) -> None:
        """Answer OPEN with a failure."""
        self.core.reject_stream(stream_id, reason, message)
        self.streams.pop(stream_id, None)
        self.flush()

    def forget(self, stream_id: int) -> None:
        """Drop a finished stream from the table."""
        self.streams.pop(stream_id, None)

    def handle_events(self, events: list[object]) -> None:
        """Route stream events to their MuxStreams, link events to :meth:`handle_link_event`."""
        streams = self.streams
        for event in events:
            if self._closing:
                return
            if isinstance(event, _mux.DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.deliver(event.data)
            elif isinstance(event, _mux.StreamOpenRequested):
                if event.stream_id not in self.core.streams:
                    continue  # reset in the same read, before anyone saw it
                if self.on_open_requested is None:
                    self.core.reject_stream(event.stream_id, Reason.INTERNAL, "not accepting")
                else:
                    self.on_open_requested(event.stream_id, event.request)
            elif isinstance(event, _mux.StreamOpened):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.endpoint.stream_opened()
            elif isinstance(event, _mux.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.endpoint.stream_ended()
            elif isinstance(event, _mux.StreamClosed):
                self._finish(event.stream_id, None)
            elif isinstance(event, _mux.StreamOpenFailed | _mux.StreamReset):
                remote = getattr(event, "remote", True)
                self._finish(event.stream_id, (event.reason, event.message, remote))
            else:
                self.handle_link_event(event)

    def handle_link_event(self, event: object) -> None:
        """Hook: a link-level event (login, partner count), in its place among the stream
        events of the same read: one dispatch per batch, stopped once the link closes."""

    def _finish(self, stream_id: int, reset: tuple[Reason, str, bool] | None) -> None:
        """Tell a stream's endpoint how it ended (once: the table entry goes first)."""
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if reset is None:
            stream.endpoint.stream_closed()
        else:
            stream.endpoint.stream_reset(*reset)

    def after_flush(self) -> None:
        """Resume local producers of drained streams; finish streams our FIN closed."""
        core = self.core
        if core.drained:
            drained, core.drained = core.drained, set()
            for stream_id in drained:
                stream = self.streams.get(stream_id)
                if stream is not None:
                    stream.resume_producer_if_drained()
        if core.closed_by_send:
            closed, core.closed_by_send = core.closed_by_send, []
            for stream_id in closed:
                self._finish(stream_id, None)

    def reset_all_streams(self, reason: Reason, message: str) -> None:
        """Reset every stream: RESET to the peer, RST to every local socket.

        A stream our FIN closed in a last write that skipped :meth:`after_flush` (a link
        closing) ended cleanly and is reported so."""
        self.core.reset_all(reason, message)
        for stream_id, stream in list(self.streams.items()):
            closed = stream.state is _mux.StreamState.CLOSED
            self._finish(stream_id, None if closed else (reason, message, False))
        self.flush()

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """The link is gone: every stream is reset (never a clean EOF)."""
        super().connectionLost(reason)
        self.reset_all_streams(Reason.LINK_LOST, "the link to the Gateway was lost")
