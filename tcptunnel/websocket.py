"""WebSocket links (RFC 6455, autobahn): a wrapping layer between TLS (or TCP) and the link.

The link protocol does not change: binary WebSocket messages carry our frames, as a byte
stream (message boundaries mean nothing; each flush of the link is one message).  Two
wrapping factories put the layer into the stack:

- :class:`GatewayWebSocketFactory` wraps a Listener's :class:`~tcptunnel.gateway.GatewayFactory`:
  a request that upgrades the Listener's ``webSocketPath`` becomes a link; any other request
  gets a plain 404 (:mod:`tcptunnel._websocket` decides).  ``X-Forwarded-For`` is honoured
  only from the Listener's ``trustedProxies``: the link's ``getPeer()`` is then the
  forwarded client, which the login throttle, the slot limits and the logs use.
- :class:`ProxyWebSocketFactory` wraps the proxy's :class:`~tcptunnel.proxy.ProxyLinkFactory`:
  the link starts once the Gateway accepted the upgrade; a refused upgrade (a 404, a
  reverse proxy's 502) is reported to it as a failed connection naming the answer, so the
  normal backoff applies.

:class:`WebSocketLinkTransport` is what the link protocol runs on: an ITransport over the
WebSocket whose producer registration goes straight through to the TLS or TCP transport
beneath, so a full socket buffer pauses the link protocol exactly as it does on a plain
link (autobahn's own frames, pongs and closes, are small and go out regardless).  Received
binary frames are handed to the link as their bytes arrive, never gathered into whole
messages, so a peer's message size costs no memory here.

Data frames do not go through autobahn's general frame layer: a flush of the link is written
as one frame (:func:`~tcptunnel._websocket.binary_frame_header`, masked from a proxy), and an
open WebSocket's reads go through :class:`~tcptunnel._websocket.FrameReader`, which hands
control frames and anything it does not take to autobahn (see there).  That took ~25 µs of
CPU per frame and hop off a round trip; RFC 6455 is kept to the letter (a proxy's frames are
masked with a fresh random key each, as reverse proxies expect).

The module imports autobahn (~300 ms and 4.4 MiB of RSS in a proxy process), so it is
imported only where a Listener or an Instance has ``webSocketPath``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from autobahn.twisted.util import peer2str
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.wamp.types import TransportDetails
from autobahn.websocket import USES_NVX
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import interfaces
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from tcptunnel import __version__
from tcptunnel._frames import MAGIC
from tcptunnel._websocket import (
    BAD_REQUEST,
    HEAD_TOO_LARGE,
    MAX_REQUEST_HEAD,
    ControlFrame,
    FrameReader,
    MaskingKeys,
    Network,
    RequestHead,
    Unhandled,
    XorUnmasker,
    binary_frame_header,
    could_be_http,
    forwarded_client,
    route_request,
    small_frame,
    xor_mask,
)
from tcptunnel.config import format_address
from tcptunnel.outbound import WrappingClientFactory
from tcptunnel.tlslink import TLS_ERRORS

# RFC 6455 §7.4.1: 1003, "received a type of data it cannot accept" (a text message).
_CLOSE_UNSUPPORTED_DATA = 1003
_CLOSE_NORMAL = 1000
_DONE = Failure(ConnectionDone())
_OPEN, _CLOSING = WebSocketProtocol.STATE_OPEN, WebSocketProtocol.STATE_CLOSING

def _nvx_library() -> Any:
    """autobahn's compiled masker itself (``_nvx_xormasker``: its ``lib`` and ``ffi``), or
    None to use its public masker objects.

    Private to autobahn (its NVX extension module, not its API); used because the public
    ``create_xor_masker(key).process(data)`` allocates a zeroed copy, copies the data in and
    copies the result out (3 passes over 64 KiB: 9.3 against 4.9 µs for the XOR in place,
    measured).  test_websocket.NvxCanaryTests names what is used;
    ``TCPTUNNEL_WS_PUBLIC_MASKER=1`` switches back to the public path."""
    if not USES_NVX or os.environ.get("TCPTUNNEL_WS_PUBLIC_MASKER", "") not in ("", "0"):
        return None
    try:
        import _nvx_xormasker  # type: ignore[import-not-found]
    except ImportError:
        return None
    lib = _nvx_xormasker.lib
    if not all(hasattr(lib, name) for name in
               ("nvx_xormask_new", "nvx_xormask_free", "nvx_xormask_process")):
        return None
    return _nvx_xormasker


_NVX = _nvx_library()

# From this payload size on a C masker beats the big-integer XOR on bytes: autobahn's C loop
# (its per-call cost ~1.2 µs; the XOR 0.4-0.8 µs up to 256 bytes, 1.2 at 512, 2.0 at 1 KiB:
# measured; 5 against 170 µs at 64 KiB), its public masker objects, with their copies, from
# 2 KiB (4.7 against 4.5 µs at 1.4 KB); its pure-Python fallback, a loop per byte, never.
_C_MASKER_FROM = 512 if _NVX is not None else 2048 if USES_NVX else 1 << 62


class _NvxUnmasker:
    """One frame's unmasking by autobahn's C loop, in place (it keeps its place in the key
    from piece to piece)."""

    __slots__ = ("_masker",)

    def __init__(self, key: bytes, length: int = 0) -> None:
        ffi, lib = _NVX.ffi, _NVX.lib
        masker = lib.nvx_xormask_new(key)
        if masker == ffi.NULL:
            raise MemoryError("autobahn's masker: no memory for its 24 bytes")
        self._masker = ffi.gc(masker, lib.nvx_xormask_free)

    def __call__(self, data: bytes | memoryview) -> bytes:
        """The next piece, unmasked (one copy, the XOR in place)."""
        buffer = bytearray(data)
        self.into(buffer, 0, len(buffer))
        return bytes(buffer)

    def into(self, buffer: bytearray, start: int, end: int) -> None:
        """Unmask ``buffer[start:end]`` in place."""
        view = _NVX.ffi.from_buffer(buffer)  # (held while the C loop writes through it)
        _NVX.lib.nvx_xormask_process(self._masker, view + start, end - start)


class _PublicUnmasker:
    """One frame's unmasking by autobahn's public masker object (the switch back)."""

    __slots__ = ("_masker",)

    def __init__(self, key: bytes, length: int = 0) -> None:
        self._masker = create_xor_masker(key, length)

    def __call__(self, data: bytes | memoryview) -> bytes:
        """The next piece, unmasked."""
        unmasked: bytes = self._masker.process(bytes(data))
        return unmasked

    def into(self, buffer: bytearray, start: int, end: int) -> None:
        """Unmask ``buffer[start:end]`` in place."""
        buffer[start:end] = self(memoryview(buffer)[start:end])


_CUnmasker = _NvxUnmasker if _NVX is not None else _PublicUnmasker


def mask_in_place(key: bytes, buffer: bytearray, start: int = 0) -> None:
    """Mask (or unmask) ``buffer[start:]`` with ``key``, by the faster masker for its size."""
    size = len(buffer) - start
    if size < _C_MASKER_FROM:
        XorUnmasker(key).into(buffer, start, start + size)
    else:
        _CUnmasker(key, size).into(buffer, start, start + size)


def mask(key: bytes, data: bytes) -> bytes:
    """``data`` masked (or unmasked) with ``key``, by the faster masker for its size."""
    if len(data) < _C_MASKER_FROM:
        return xor_mask(key, data)
    return _CUnmasker(key, len(data))(data)


def unmasker(key: bytes, length: int) -> Any:
    """A received frame's unmasking, piece by piece in place: autobahn's C masker for a
    frame of :data:`_C_MASKER_FROM` bytes or more (one per frame: it keeps its place in the
    key), else the big-integer XOR."""
    if length < _C_MASKER_FROM:
        return XorUnmasker(key)
    return _CUnmasker(key, length)


# A proxy's masking keys: os.urandom read 4 KiB at a time (one syscall per 1,024 frames, not
# one per frame), dropped in a forked child (twistd forks to daemonize: the child must not
# send the keys its parent may also send).
_masking_key = MaskingKeys(os.urandom)
os.register_at_fork(after_in_child=_masking_key.forget)


class WebSocketHandshakeError(ConnectError):
    """The Gateway (or a reverse proxy in front of it) did not upgrade to a WebSocket."""


@implementer(interfaces.ITransport, interfaces.IPushProducer, interfaces.IConsumer)
class WebSocketLinkTransport:
    """The link protocol's transport: writes are binary messages, reads the bytes of
    received binary messages (handed over by the WebSocket protocol).

    ``transport`` is the TCP transport underneath (TLS unwrapped), which is where
    :func:`tcptunnel.mux.set_socket_options` sets the socket options.
    """

    def __init__(self, websocket: Any, peer: Any = None) -> None:
        self._websocket = websocket
        self._peer = peer
        self.connected = True
        self.disconnecting = False

    @property
    def _below(self) -> Any:
        """The transport the WebSocket runs on (TLS or TCP)."""
        return self._websocket.transport

    @property
    def transport(self) -> Any:
        """The TCP transport at the bottom of the stack."""
        below = self._below
        return getattr(below, "transport", None) or below

    # -- ITransport ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` as one binary message (dropped once closing, like TCP's)."""
        if data and not self.disconnecting and self._websocket.state == _OPEN:
            self._websocket.send_link_data((bytes(data),))

    def writeSequence(self, data: Iterable[bytes]) -> None:  # noqa: N802
        """One flush of the link, one message."""
        if not self.disconnecting and self._websocket.state == _OPEN:
            parts = list(data)
            if any(parts):
                self._websocket.send_link_data(parts)

    def loseConnection(self) -> None:  # noqa: N802
        """Close the WebSocket (close frame, then TCP) once what was written is sent."""
        if self.disconnecting:
            return
        self.disconnecting = True
        websocket = self._websocket
        if websocket.state == WebSocketProtocol.STATE_OPEN:
            websocket.sendClose(code=_CLOSE_NORMAL)
        else:
            self._below.loseConnection()

    def abortConnection(self) -> None:  # noqa: N802
        """Drop the connection now (TCP RST)."""
        self.disconnecting = True
        self._below.abortConnection()

    def getPeer(self) -> Any:  # noqa: N802
        """The forwarded client behind a trusted reverse proxy, else the TCP peer."""
        return self._peer if self._peer is not None else self._below.getPeer()

    def getHost(self) -> Any:  # noqa: N802
        """Our end of the TCP connection."""
        return self._below.getHost()

    def getHandle(self) -> Any:  # noqa: N802
        """The TLS connection (for the cipher in logs), or the socket."""
        return self._below.getHandle()

    # -- IConsumer: the link protocol registers itself here -------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        """Straight through: the socket beneath pauses the link protocol when full."""
        self._below.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:  # noqa: N802
        """Straight through."""
        self._below.unregisterProducer()

    # -- IPushProducer: reading ------------------------------------------------

    def pauseProducing(self) -> None:  # noqa: N802
        """Stop reading the socket."""
        self._below.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        """Read the socket again."""
        self._below.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        """Close the connection."""
        self.abortConnection()


@implementer(interfaces.IHandshakeListener)
class _LinkWebSocket:
    """What the Gateway's and the proxy's WebSocket protocols share: the link on top."""

    factory: Any
    transport: Any
    state: int
    failedByMe: bool  # noqa: N815 - autobahn's attribute
    # autobahn's reading state, which the reader hands over to (see _give_back).
    data: bytes
    current_frame: Any
    inside_message: bool
    _isMessageCompressed: bool  # noqa: N815
    utf8validateIncomingCurrentMessage: bool  # noqa: N815

    link: Any = None
    link_transport: WebSocketLinkTransport | None = None
    # Reads of the open WebSocket; None before it opened, and once autobahn reads again.
    _reader: FrameReader | None = None
    _reader_done = False
    _tls_done = False
    _refused = False  # a text message came: closing, nothing more for the link
    _deadline: Any = None
    _timed_out = False

    def connectionMade(self) -> None:  # noqa: N802
        """The TLS and WebSocket handshakes must be done by the deadline (our own timer on
        the factory's clock: autobahn's batched timers leave their buckets behind).

        What autobahn's Twisted adapter does here, but for the TLS channel binding it reads
        (``tls-unique``, for WAMP's authentication, nothing of ours): it refuses any TLS
        transport that is not Twisted's TLSMemoryBIOProtocol, and links run on
        :mod:`tcptunnel.tlslink`'s (fewer pyOpenSSL calls per record)."""
        transport = self.transport
        secure = ISSLTransport.providedBy(transport)
        self._transport_details = TransportDetails(
            channel_type=(TransportDetails.CHANNEL_TYPE_TLS if secure
                          else TransportDetails.CHANNEL_TYPE_TCP),
            channel_framing=TransportDetails.CHANNEL_FRAMING_WEBSOCKET,
            peer=peer2str(transport), is_server=self.factory.isServer, is_secure=secure)
        self.peer = self._transport_details.peer
        # (TCP_NODELAY: the link sets it, mux.set_socket_options.)
        self._connectionMade()  # type: ignore[attr-defined]
        self._deadline = self.factory.clock.callLater(self.factory.handshake_timeout,
                                                      self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        self._timed_out = True
        self.wasNotCleanReason = (f"no WebSocket upgrade within "
                                  f"{self.factory.handshake_timeout:g} s")
        self.transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _onOpen(self) -> None:  # noqa: N802
        """Open: no TLS channel binding to read (see connectionMade)."""
        self.onOpen()  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:  # noqa: N802
        """TLS is up (before the WebSocket handshake): the link logs it once it exists."""
        self._tls_done = True

    def _open_link(self, peer: Any = None) -> None:
        """The WebSocket is open: build the link on it."""
        self._cancel_deadline()
        transport = WebSocketLinkTransport(self, peer)
        link = self.factory.wrapped.buildProtocol(transport.getPeer())
        if link is None:
            self.sendClose(code=_CLOSE_NORMAL)  # type: ignore[attr-defined]
            return
        self.link, self.link_transport = link, transport
        link.makeConnection(transport)
        if self._tls_done:
            link.handshakeCompleted()

    def send_link_data(self, parts: Sequence[bytes]) -> None:
        """One flush of the link as one binary message of one frame, written at once (the
        caller checked that the WebSocket is open): a proxy's masked with a fresh key
        (RFC 6455 §5.3: from a strong source of entropy, os.urandom read 4 KiB at a time),
        the Gateway's as they are.  A frame below 126 bytes (a ping-pong's) is made whole by
        one call and written as one piece.

        A proxy's frame is built in one bytearray (header and payload: one copy, which the
        TLS layer's join of a sequence would make anyway), masked there in place, and
        written as bytes (what ITransport.write takes)."""
        length = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        if length < 126:  # (a ping-pong's frame: whole in one call, one write)
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            self.transport.write(small_frame(payload) if self.factory.isServer
                                 else small_frame(payload, _masking_key()))
            return
        if self.factory.isServer:
            self.transport.writeSequence([binary_frame_header(length), *parts])
            return
        key = _masking_key()
        header = binary_frame_header(length, key)
        if length < _C_MASKER_FROM:  # (a small frame: quicker as bytes)
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            self.transport.writeSequence([header, xor_mask(key, payload)])
            return
        frame = bytearray().join([header, *parts])
        mask_in_place(key, frame, len(header))
        self.transport.write(bytes(frame))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """An open WebSocket's data frames are read by our FrameReader; the handshake, and
        everything after a frame the reader does not take, by autobahn's parser (directly:
        its adapter's dataReceived only adds a debug line whose arguments it formats
        eagerly, ``hltype``: ~10 % of the Gateway's time in a bulk run)."""
        reader = self._reader
        if reader is None:
            if (self._reader_done or self.state != _OPEN or self.link is None
                    or self.current_frame is not None or self.data or self.inside_message):
                self._dataReceived(data)  # type: ignore[attr-defined]
                return
            # The first read with nothing left of autobahn's: ours from here on.
            reader = self._reader = FrameReader(masked=self.factory.isServer,
                                                     unmasker=unmasker)
        elif self.state not in (_OPEN, _CLOSING) or self.failedByMe:
            self._dataReceived(data)  # type: ignore[attr-defined]  # (closed: dropped)
            return
        events = reader.feed(data)
        while events:
            for event in events:
                if type(event) is bytes:
                    link = self.link
                    if link is not None:
                        link.dataReceived(event)
                elif isinstance(event, ControlFrame):
                    self.data = event.raw
                    self.consumeData()  # type: ignore[attr-defined]
                    if self.state != _OPEN:  # a close: autobahn ends it
                        self._give_back(reader.rest())
                        return
                    events = reader.feed(b"")
                    break
                else:
                    assert isinstance(event, Unhandled)
                    self._give_back(event)
                    return
            else:
                return

    def _give_back(self, rest: Unhandled) -> None:
        """autobahn reads from here on, starting with ``rest``; it knows what we read."""
        self._reader, self._reader_done = None, True
        self.inside_message = rest.inside_message
        # (What autobahn sets at a message's first frame: never compressed, never text.)
        self._isMessageCompressed = False
        self.utf8validateIncomingCurrentMessage = False
        if rest.raw:
            self._dataReceived(rest.raw)  # type: ignore[attr-defined]

    def sendData(self, data: bytes, sync: bool = False,  # noqa: N802
                 chopsize: int | None = None) -> None:
        """Straight to the transport (autobahn's own adds an eagerly formatted debug line
        per frame, and traffic counters nobody reads); its queued and chopped modes stay."""
        if sync or chopsize or self.send_queue:  # type: ignore[attr-defined]
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        else:
            self.transport.write(data)

    # Received messages are streamed: each piece of a binary frame goes to the link as it
    # arrives (autobahn's defaults would gather whole messages in memory first).

    def onMessageBegin(self, isBinary: bool) -> None:  # noqa: N802, N803
        """Text messages are not ours: close with 1003 (nothing more reaches the link)."""
        if not isBinary and not self._refused:
            self._refused = True
            # (sendClose allows only application codes; 1003 is the protocol's own.)
            self.sendCloseFrame(  # type: ignore[attr-defined]
                code=_CLOSE_UNSUPPORTED_DATA,
                reasonUtf8=b"only binary messages carry a tcptunnel link")

    def onPing(self, payload: bytes) -> None:  # noqa: N802
        """Pong only while the socket takes writes: a peer that sends pings and never reads
        must not grow our buffer (pongs are optional to wait for; our keepalive is the
        link's own PING). The link protocol is the socket's producer, so its pause state is
        the socket's."""
        link = self.link
        if link is not None and getattr(link, "_paused", False):
            return
        super().onPing(payload)  # type: ignore[misc]

    def onMessageFrameBegin(self, length: int) -> None:  # noqa: N802
        """Nothing to gather."""

    def onMessageFrameData(self, payload: bytes) -> None:  # noqa: N802
        """Bytes of the link."""
        if self.link is not None and not self.failedByMe and not self._refused:
            self.link.dataReceived(payload)

    def onMessageFrameEnd(self) -> None:  # noqa: N802
        """Nothing gathered."""

    def onMessageEnd(self) -> None:  # noqa: N802
        """Nothing gathered."""

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        """Tear the WebSocket down, then tell the link."""
        # autobahn's own connectionLost only logs before calling this (a TLS error at
        # level error: any stranger's garbage would reach the Gateway's log); the link
        # logs how it ended.
        self._cancel_deadline()
        self._connectionLost(reason)  # type: ignore[attr-defined]
        if self.link_transport is not None:
            self.link_transport.connected = False
        link, self.link = self.link, None
        if link is not None:
            link.connectionLost(reason)


def _address(host: str) -> Any:
    """A Twisted address for a forwarded client (its port is not known: 0)."""
    if ":" in host:
        return IPv6Address("TCP", host, 0)
    return IPv4Address("TCP", host, 0)


# (autobahn's own base classes disagree on some attribute types: its problem, not ours.)
class GatewayWebSocket(_LinkWebSocket, WebSocketServerProtocol):  # type: ignore[misc]
    """A connection to a WebSocket Listener: 404 unless it upgrades the tunnel path."""

    factory: GatewayWebSocketFactory
    _request: RequestHead | None = None
    _forwarded: Any = None
    _pending = False  # counted in factory.pending

    def connectionMade(self) -> None:  # noqa: N802
        """Refuse at once beyond the cap on connections still upgrading (they hold no
        unauthenticated slot until the link exists); else count this one."""
        factory = self.factory
        if factory.pending >= factory.max_pending:
            self.transport.abortConnection()
            return
        factory.pending += 1
        self._pending = True
        super().connectionMade()

    def _done_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.factory.pending -= 1

    def processHandshake(self) -> None:  # noqa: N802
        """Route the request before autobahn sees it: only the tunnel path upgrades."""
        data: bytes = self.data
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_REQUEST_HEAD:
                self._answer(HEAD_TOO_LARGE)
            elif not could_be_http(data):
                self._answer(BAD_REQUEST)  # e.g. a proxy without webSocketPath: at once
            return
        if self._request is None:
            request, response = route_request(data[:end + 4], self.factory.path)
            if response is not None:
                self._answer(response)
                return
            self._request = request
        super().processHandshake()

    def _answer(self, response: bytes) -> None:
        """A plain HTTP answer, then close."""
        self.sendData(response)
        self.dropConnection(abort=False)

    def failHandshake(self, reason: str, code: int = 400,  # noqa: N802
                      responseHeaders: Any = None) -> None:  # noqa: N803
        """A malformed upgrade: the HTTP error, without autobahn's log line (anyone can
        send one; the Gateway logs only links)."""
        self.wasNotCleanReason = reason
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        self.dropConnection(abort=False)

    def onConnect(self, request: Any) -> None:  # noqa: N802
        """Accept (no subprotocol); remember the forwarded client if the peer is trusted."""
        head = self._request
        tcp_peer = self.transport.getPeer()
        client = forwarded_client(str(getattr(tcp_peer, "host", "")),
                                  head.header("x-forwarded-for") if head else None,
                                  self.factory.trusted)
        self._forwarded = _address(client) if client is not None else None
        return None

    def onOpen(self) -> None:  # noqa: N802
        """The upgrade succeeded: the link starts (login deadline, slot, HELLO)."""
        self._done_pending()
        self._open_link(self._forwarded)

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        """No longer upgrading, if it still was."""
        self._done_pending()
        if getattr(self, "state", None) is None:
            return  # refused in connectionMade: autobahn never started
        super().connectionLost(reason)


class GatewayWebSocketFactory(WebSocketServerFactory):
    """Wraps a Listener's link factory: links arrive as WebSockets on ``path``."""

    protocol = GatewayWebSocket  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrapped: Any, path: str, trusted: tuple[Network, ...],
                 handshake_timeout: float, reactor: Any, max_pending: int = 256) -> None:
        super().__init__(server=None, reactor=reactor)
        # Connections accepted whose upgrade has not completed, and how many may be.
        self.pending = 0
        self.max_pending = max_pending
        self.wrapped = wrapped
        self.clock = reactor
        # The TLS and WebSocket handshakes must end within the login deadline (issue 14:
        # no connection holds the Gateway's resources past it).
        self.handshake_timeout = handshake_timeout
        self.path = path
        self.trusted = trusted
        self.setProtocolOptions(
            webStatus=False,
            # Our frames bound themselves; received frames are streamed, not gathered.
            maxFramePayloadSize=0, maxMessagePayloadSize=0,
            # Deadlines are ours: the handshake's above, the close's the link's (its
            # abort after CLOSE_GRACE).
            openHandshakeTimeout=0, closeHandshakeTimeout=0,
            perMessageCompressionAccept=lambda offers: None,
            tcpNoDelay=True, failByDrop=True)

    def update(self, path: str, trusted: tuple[Network, ...], max_pending: int) -> None:
        """A reload: new connections use the new path, trusted proxies and cap."""
        self.path, self.trusted, self.max_pending = path, trusted, max_pending


class ProxyWebSocket(_LinkWebSocket, WebSocketClientProtocol):  # type: ignore[misc]
    """The proxy's end: upgrade, then the link."""

    factory: ProxyWebSocketFactory

    def onOpen(self) -> None:  # noqa: N802
        """The Gateway upgraded: the link logs in."""
        self._open_link()

    def connectionLost(self, reason: Failure = _DONE) -> None:  # noqa: N802
        """A connection that never became a link is a failed connection: say why."""
        opened = self.link is not None or self.link_transport is not None
        super().connectionLost(reason)
        if opened:
            return
        factory = self.factory
        if reason.check(*TLS_ERRORS) is not None:
            why = (f"TLS handshake with the Gateway failed ({reason.getErrorMessage()}): the "
                   "Gateway did not answer with TLS (plain Listener?) or its certificate did "
                   "not verify (check caFile, serverName, certificatePin)")
        elif bytes(getattr(self, "data", b"")).startswith(MAGIC[:6]):
            why = (f"the Gateway answered {factory.url} with the link protocol, not HTTP: its "
                   "Listener has no webSocketPath (set it there, or remove it here)")
        elif self._timed_out:
            why = (f"the Gateway did not answer the WebSocket upgrade to {factory.url} within "
                   f"{factory.handshake_timeout:g} s")
        elif self.wasNotCleanReason:
            why = (f"the WebSocket upgrade to {factory.url} was refused "
                   f"({self.wasNotCleanReason}): check webSocketPath and any reverse proxy "
                   "in front of the Gateway")
        else:
            why = (f"the connection closed before the WebSocket upgrade to {factory.url} "
                   f"({reason.getErrorMessage()})")
        factory.handshake_failed = Failure(WebSocketHandshakeError(string=why))


class ProxyWebSocketFactory(WrappingClientFactory, WebSocketClientFactory):
    """Wraps the proxy's link factory: the link is a WebSocket to ``url``.

    Passes the connector's callbacks on to ``wrapped`` (a ReconnectingClientFactory); a
    connection that ended before the upgrade as a failed connection.
    """

    protocol = ProxyWebSocket  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrapped: Any, url: str, handshake_timeout: float, reactor: Any) -> None:
        super().__init__(url=url, useragent=f"tcptunnel/{__version__}", reactor=reactor)
        self.wrapped = wrapped
        self.clock = reactor
        self.handshake_timeout = handshake_timeout
        self.handshake_failed: Failure | None = None
        self.setProtocolOptions(
            maxFramePayloadSize=0, maxMessagePayloadSize=0,
            openHandshakeTimeout=0, closeHandshakeTimeout=0,
            # After the close frames the Gateway drops the TCP connection; if it does not,
            # we do, a second later.
            serverConnectionDropTimeout=1.0, tcpNoDelay=True, failByDrop=True)

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        """A new connection's WebSocket."""
        self.handshake_failed = None
        return super().buildProtocol(addr)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:  # noqa: N802
        """Passed on."""
        self.wrapped.clientConnectionFailed(connector, reason)


def websocket_url(secure: bool, host: str, port: int, path: str) -> str:
    """``wss://host:port/path`` (``ws://`` when not secure; IPv6 in brackets)."""
    return f"{'wss' if secure else 'ws'}://{format_address(host, port)}{path}"
