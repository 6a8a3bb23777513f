"""The link layer shared by proxies and the Gateway, sans-IO.

A :class:`LinkCore` owns one end of a link: it checks the peer's magic and
HELLO, enforces the login phase (only login frames, small frames), answers
PING, and schedules outbound frames: control frames first, then the streams
that have data, round-robin in bounded chunks.  Subclasses add what a link
carries after login: :class:`tcptunnel._mux.MuxConnection` (proxies, which
terminate streams) and the Gateway's relay, which forwards them.

No Twisted here: bytes in via :meth:`LinkCore.receive_data`, events out;
bytes out via :meth:`LinkCore.data_to_send`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass

from tcptunnel import _frames as fr
from tcptunnel._frames import Frame, FrameType, GoAway, LinkError


class LinkState(enum.Enum):
    """Where a link is in its life."""

    HELLO = "waiting for HELLO"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


_AUTH_TYPES = frozenset(
    {FrameType.AUTH_START, FrameType.AUTH_CHALLENGE, FrameType.AUTH_PROOF, FrameType.AUTH_RESULT}
)
_ALWAYS_ALLOWED = frozenset({FrameType.PING, FrameType.PONG, FrameType.GOAWAY})


@dataclass(frozen=True, slots=True)
class AuthStartReceived:
    """A proxy asks to log in (Gateway end)."""

    role: int
    session_id: int
    client_first: str


@dataclass(frozen=True, slots=True)
class AuthChallengeReceived:
    """The Gateway's SCRAM server-first (proxy end)."""

    server_first: str


@dataclass(frozen=True, slots=True)
class AuthProofReceived:
    """The proxy's SCRAM client-final (Gateway end)."""

    client_final: str


@dataclass(frozen=True, slots=True)
class AuthResultReceived:
    """The Gateway's verdict, with its SCRAM server-final when ``ok`` (proxy end)."""

    ok: bool
    server_final: str


AuthEvent = AuthStartReceived | AuthChallengeReceived | AuthProofReceived | AuthResultReceived


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The answer to one of our PINGs."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class PartnerChanged:
    """The Gateway says how many partners are present."""

    count: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is closing the link, and says why.

    ``final`` is False for the one GOAWAY that does not close: a Gateway's first
    ``DRAINING`` to a logged-in proxy (h2's GOAWAY: no new streams on this link, the running
    ones finish; the Gateway closes the link when the last one ended, or at its deadline).
    """

    code: GoAway
    message: str
    final: bool = True


# Control frames are few and small; a peer that keeps them from being sent (by not reading)
# while provoking more (PINGs, bad OPENs) is not worth the memory: past this many unsent
# control frames after a read, the link is closed with TOO_SLOW.
MAX_QUEUED_CONTROL_FRAMES = 1024
DEFAULT_CHUNK = 32 * 1024

# The login frames each end accepts, in order (docs/protocol.md §3).
GATEWAY_LOGIN = (FrameType.AUTH_START, FrameType.AUTH_PROOF)
PROXY_LOGIN = (FrameType.AUTH_CHALLENGE, FrameType.AUTH_RESULT)


def _parse_auth(frame: Frame) -> AuthEvent:
    """The typed event of a login frame (raises LinkError for a malformed payload)."""
    frame_type = frame.type
    if frame_type == FrameType.AUTH_START:
        return AuthStartReceived(*fr.parse_auth_start(frame.payload))
    if frame_type == FrameType.AUTH_PROOF:
        return AuthProofReceived(fr.parse_auth_message(frame.payload, "AUTH_PROOF"))
    if frame_type == FrameType.AUTH_CHALLENGE:
        return AuthChallengeReceived(fr.parse_auth_message(frame.payload, "AUTH_CHALLENGE"))
    return AuthResultReceived(*fr.parse_auth_result(frame.payload))


class LinkCore:
    """One end of a link: handshake, login phase, PING, outbound scheduling."""

    # Which login frames this end takes, in order; set by the subclass for its side.
    login_sequence: tuple[FrameType, ...] = PROXY_LOGIN
    max_control_frames = MAX_QUEUED_CONTROL_FRAMES
    # Whether the peer's first GOAWAY DRAINING after login leaves the link open (a proxy's
    # end: the Gateway lets running streams finish); the Gateway's end takes no DRAINING.
    draining_keeps_link = True

    def __init__(self, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.state = LinkState.HELLO
        self._login_step = 0
        self.peer_version: int | None = None
        self._decoder = fr.FrameDecoder(expect_magic=True, max_payload=fr.MAX_PAYLOAD_BEFORE_LOGIN)
        self._control: deque[bytes] = deque([fr.build_hello()])
        # Streams with something to send, in round-robin order.
        self._ready: OrderedDict[int, None] = OrderedDict()
        self.chunk_size = chunk_size
        self.bytes_received = 0
        self.peer_draining = False  # the peer's GOAWAY DRAINING came; the link stays open

    # -- inbound ----------------------------------------------------------

    def receive_data(self, data: bytes) -> list[object]:
        """Process bytes from the peer; return events.  Raises :class:`LinkError`."""
        if self.state is LinkState.CLOSED:
            return []
        self.bytes_received += len(data)
        events: list[object] = []
        decoder = self._decoder
        if self.state is LinkState.READY:
            for frame in decoder.feed(data):
                self._handle(frame, events)
                if self.state is LinkState.CLOSED:
                    break
        else:
            # One frame at a time until login: a successful AUTH_RESULT raises the frame
            # limit for the frames that follow it in the same read.
            frames = decoder.feed(data, max_frames=1)
            while frames:
                self._handle(frames[0], events)
                if self.state is LinkState.CLOSED:
                    break
                if self.state is LinkState.READY:
                    for frame in decoder.feed(b""):
                        self._handle(frame, events)
                        if self.state is LinkState.CLOSED:
                            break
                    break
                frames = decoder.feed(b"", max_frames=1)
        if len(self._control) > self.max_control_frames and self.state is not LinkState.CLOSED:
            raise LinkError(GoAway.TOO_SLOW,
                            f"the peer does not read: {len(self._control)} control frames "
                            "unsent")
        return events

    def _handle(self, frame: Frame, events: list[object]) -> None:
        frame_type = frame.type
        if self.state is LinkState.HELLO:
            if frame_type != FrameType.HELLO or frame.stream_id:
                raise LinkError(GoAway.PROTOCOL_ERROR, "the first frame must be HELLO")
            version, _settings = fr.parse_hello(frame.payload)
            if version != fr.PROTOCOL_VERSION:
                raise LinkError(
                    GoAway.UNSUPPORTED_VERSION,
                    f"protocol version {version} is not supported; this end speaks "
                    f"{fr.PROTOCOL_VERSION}",
                )
            self.peer_version = version
            self.state = LinkState.AUTHENTICATING
            return
        if frame_type in fr.STREAM_FRAME_TYPES:
            if frame.stream_id == 0:
                raise LinkError(GoAway.PROTOCOL_ERROR,
                                f"{FrameType(frame_type).name} frame on stream 0")
            if self.state is not LinkState.READY:
                raise LinkError(GoAway.PROTOCOL_ERROR,
                                f"{FrameType(frame_type).name} frame before login")
            self._handle_stream_frame(frame, events)
            return
        if frame_type in fr.LINK_FRAME_TYPES and frame.stream_id:
            raise LinkError(GoAway.PROTOCOL_ERROR,
                            f"{FrameType(frame_type).name} frame on stream {frame.stream_id}")
        if frame_type == FrameType.PING:
            self.queue_control(fr.build_ping(fr.check_ping(frame.payload), pong=True))
        elif frame_type == FrameType.PONG:
            events.append(PongReceived(fr.check_ping(frame.payload)))
        elif frame_type == FrameType.GOAWAY:
            code, message = fr.parse_goaway(frame.payload)
            if (code is GoAway.DRAINING and self.draining_keeps_link
                    and self.state is LinkState.READY and not self.peer_draining):
                # Running streams go on; the next GOAWAY (or the close) ends the link.
                self.peer_draining = True
                events.append(GoAwayReceived(code, message, final=False))
                return
            events.append(GoAwayReceived(code, message))
            self.state = LinkState.CLOSED
        elif frame_type in _AUTH_TYPES:
            if self.state is not LinkState.AUTHENTICATING:
                raise LinkError(GoAway.PROTOCOL_ERROR,
                                f"{FrameType(frame_type).name} after login")
            sequence = self.login_sequence
            if self._login_step >= len(sequence) or frame_type != sequence[self._login_step]:
                raise LinkError(GoAway.PROTOCOL_ERROR,
                                f"unexpected {FrameType(frame_type).name} during login")
            self._login_step += 1
            event = _parse_auth(frame)
            events.append(event)
            if isinstance(event, AuthResultReceived) and event.ok:
                # Frames after a successful AUTH_RESULT in the same read belong
                # to the logged-in link.  The proxy still verifies the
                # Gateway's proof and closes the link (before acting on any
                # later event) if it is wrong.
                self.mark_ready()
        elif frame_type == FrameType.PARTNER and self.state is LinkState.READY:
            events.append(PartnerChanged(fr.parse_partner(frame.payload)))
        elif frame_type == FrameType.HELLO:
            raise LinkError(GoAway.PROTOCOL_ERROR, "a second HELLO")
        elif self.state is not LinkState.READY:
            raise LinkError(GoAway.PROTOCOL_ERROR,
                            f"frame type {frame_type:#04x} before login")
        # Anything else after login is an unknown frame type: ignored, so
        # that later versions can add frames old peers skip.

    def _handle_stream_frame(self, frame: Frame, events: list[object]) -> None:
        raise LinkError(GoAway.PROTOCOL_ERROR, "this end takes no stream frames")

    def mark_ready(self) -> None:
        """Login succeeded: allow stream frames and full-size frames."""
        self.state = LinkState.READY
        self._decoder.max_payload = fr.MAX_PAYLOAD

    # -- outbound ---------------------------------------------------------

    def queue_control(self, frame: bytes) -> None:
        """Queue a control frame; it goes out before any DATA."""
        self._control.append(frame)

    @property
    def queued_control_frames(self) -> int:
        """Control frames not yet handed to the transport."""
        return len(self._control)

    def ping(self, opaque: bytes) -> None:
        """Queue a PING with 8 opaque bytes (the adapter measures the RTT)."""
        self.queue_control(fr.build_ping(opaque))

    def go_away(self, code: GoAway, message: str) -> None:
        """Queue GOAWAY; the adapter closes the transport after sending it."""
        if self.state is not LinkState.CLOSED:
            self.queue_control(fr.build_goaway(code, message))
            self.state = LinkState.CLOSED

    def _mark_ready_stream(self, stream_id: int) -> None:
        self._ready[stream_id] = None

    def _pull(self, stream_id: int, budget: int, out: list[bytes]) -> tuple[int, bool]:
        """Append at most one chunk of ``stream_id`` to ``out``.

        Returns (bytes appended, whether the stream still has something to send).
        """
        raise NotImplementedError

    def data_to_send(self, limit: int = 256 * 1024) -> list[bytes]:
        """Frames to write now, about ``limit`` bytes at most (control frames always)."""
        out: list[bytes] = []
        control = self._control
        while control:
            out.append(control.popleft())
        size = 0
        ready = self._ready
        while ready and size < limit:
            stream_id = next(iter(ready))
            added, more = self._pull(stream_id, self.chunk_size, out)
            size += added
            # _pull may have removed a stream that its FIN closed.
            if more and stream_id in ready:
                ready.move_to_end(stream_id)
            else:
                ready.pop(stream_id, None)
        return out

    @property
    def wants_to_send(self) -> bool:
        """Whether :meth:`data_to_send` would return anything."""
        return bool(self._control or self._ready)
