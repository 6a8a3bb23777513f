"""The Gateway's relay core, sans-IO: sessions, routes, and the queues toward each link.

:class:`RelayLink` is the Gateway's end of one link (a :class:`tcptunnel._link.LinkCore`):
it takes the login frames in order, hands stream frames on, and keeps what waits to be sent
toward its proxy: control frames, coalesced window updates and per-stream queues served
round-robin.  :class:`RelayCore` owns the sessions and routes: each stream frame a link
delivers goes through :meth:`RelayCore.stream_frame`, which checks the stream rules of its
direction (credit, FIN, DATA before OPEN_RESULT), queues what must be forwarded, and records
its effects: the links that now have something to send (:meth:`RelayCore.take_dirty`) and
the links it had to close (:meth:`RelayCore.take_failed`).  No Twisted here; the adapter in
:mod:`tcptunnel.gateway` turns effects into writes and closes.

Memory is bounded three ways (``docs/security.md``): what is queued toward one link, toward
all links of one session, and toward every link of the instance.  Everything queued toward a
link counts: forwarded DATA and FIN, forwarded and Gateway-made control frames, pending
window credit.  A link past its own bound is closed with GOAWAY ``TOO_SLOW``; past a session
or instance bound, the link with the most queued toward it is.  A link that is closed stops
costing memory at once: its queues and routes are dropped when it is failed, not when its
socket finally goes away.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tcptunnel import _frames as fr
from tcptunnel._frames import Frame, FrameType, GoAway, LinkError, Reason, StreamError
from tcptunnel._link import GATEWAY_LOGIN, MAX_QUEUED_CONTROL_FRAMES, LinkCore, LinkState
from tcptunnel._stream import Direction, StreamEvent, StreamState, advance

ROLE_NAMES = {fr.ROLE_PROXY_CLIENT: "proxy-client", fr.ROLE_PROXY_SERVER: "proxy-server"}
_WINDOW_UPDATE_SIZE = fr.HEADER_SIZE + 4
# What a queued stream frame costs beyond its wire size: its header and payload are two
# bytes objects (33 bytes of object each) and two deque slots; tracemalloc measured 92 bytes
# for a 1-byte DATA frame charged 10, so one-byte frames held 9x what the bounds allowed.
FRAME_COST = 84
# The largest OPEN payload the Gateway forwards (fields included): a target, a client
# address and a sealed end-to-end OPEN fit many times over.
MAX_FORWARDED_OPEN = 4096
# How the Gateway names a stream's kind on its status page and in its log lines.  Sealed
# and pairing streams carry no target the Gateway can read (their kind, target and fields
# travel end-to-end encrypted): it shows what they are, never where they go.
KIND_LABELS = {fr.KIND_TCP: "TCP", fr.KIND_UDP: "UDP", fr.KIND_PAKE: "end-to-end pairing",
               fr.KIND_SEALED: "end-to-end encrypted"}
#: The kinds whose target the Gateway reads from the OPEN (in clear): the others' it cannot.
CLEAR_KINDS = frozenset((fr.KIND_TCP, fr.KIND_UDP))


def kind_name(kind: int) -> str:
    """A stream kind's short name (``tcp``, ``udp``, ``pake``, ``sealed``), or ``other`` for
    a kind the Gateway does not know (it forwards those too): a bounded label set."""
    return fr.KIND_NAMES.get(kind, "other")


def kind_label(kind: int) -> str:
    """A stream kind as people read it: TCP, UDP, end-to-end encrypted, end-to-end pairing."""
    return KIND_LABELS.get(kind, f"kind {kind}")


_OPEN_FIXED = 9  # window u32, origin u32, kind u8 (tcptunnel._frames)
_FIELD_HEADER = struct.Struct(">BH")


def clear_target(payload: bytes) -> str | None:
    """``host:port`` of a tcp or udp OPEN, for the status page and the log (IPv6 in
    brackets, anything unprintable escaped), or None when its fields name none.

    Only the HOST and PORT fields are looked for, nothing is validated (the Proxy-Client
    does that, and refuses what it cannot dial): ``fr.parse_open`` takes 3.8 us, this
    1.3 us, of the about 38 us the relay spends on a stream's four frames (measured with
    and without it in one run: 0.97-1.06x, noise).
    """
    host: bytes | None = None
    port: int | None = None
    offset, end = _OPEN_FIXED, len(payload)
    while offset + 3 <= end and (host is None or port is None):
        tag, length = _FIELD_HEADER.unpack_from(payload, offset)
        offset += 3
        if offset + length > end:
            return None
        if tag == fr.FIELD_HOST and host is None and 0 < length <= fr.MAX_HOST_BYTES:
            host = payload[offset:offset + length]
        elif tag == fr.FIELD_PORT and port is None and length == 2:
            port = payload[offset] << 8 | payload[offset + 1]
        offset += length
    if host is None or not port:
        return None
    text = fr.printable(host.decode("utf-8", errors="replace"))
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """The bounds the relay keeps (from ``GatewayLimits``)."""

    max_links_per_session: int = 64
    max_streams_per_link: int = 1024
    max_queued_bytes_per_link: int = 64 * 1024 * 1024
    max_queued_bytes_per_session: int = 256 * 1024 * 1024
    max_queued_bytes: int = 1024 * 1024 * 1024
    max_control_frames: int = MAX_QUEUED_CONTROL_FRAMES


@dataclass(frozen=True, slots=True)
class StreamFrameReceived:
    """A stream frame, for :meth:`RelayCore.stream_frame`."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """A route that ended, for the Gateway's log line (:meth:`RelayCore.take_ended`).

    ``how`` is ``closed`` (FIN both ways), ``refused`` (the Proxy-Client's OPEN_RESULT) or
    ``reset`` (a RESET from either proxy, a broken stream rule, or a lost link); ``reason``
    is the Reason's name (``OK`` when closed).  The peers' reason texts are left out: they
    are theirs, and what a Proxy-Client says of a sealed stream may name its target.
    """

    route: Route
    how: str
    reason: str


class Budget:
    """Bytes queued toward a group of links (one session's, or the whole instance's)."""

    __slots__ = ("queued",)

    def __init__(self) -> None:
        self.queued = 0


class RelayLink(LinkCore):
    """The Gateway's end of one link: login frames in order, then stream frames for the relay;
    outbound, control frames first, then coalesced window updates, then the streams with
    queued frames, round-robin."""

    login_sequence = GATEWAY_LOGIN
    draining_keeps_link = False  # only the Gateway drains: a proxy's DRAINING closes

    def __init__(self, total: Budget, max_control_frames: int = MAX_QUEUED_CONTROL_FRAMES,
                 max_queued_bytes: int = 64 * 1024 * 1024) -> None:
        super().__init__()
        self.max_control_frames = max_control_frames
        self.max_queued_bytes = max_queued_bytes
        self.session: Session | None = None
        self.role: int | None = None
        self.number = 0  # Proxy-Server number within its session (1, 2, ...)
        self.routes: dict[int, Route] = {}
        self.next_stream_id = 1  # on a Proxy-Client link the Gateway opens the streams
        self.last_opened = 0  # on a Proxy-Server link: the highest id it opened
        self.detached = False  # failed or gone: takes and receives nothing more
        self.queued_bytes = 0  # everything queued toward this link
        self._budgets: list[Budget] = [total]
        self._control_bytes = 0
        self._queues: dict[int, deque[bytes]] = {}
        self._updates: dict[int, int] = {}
        # Times its control queue was handed to the transport; and, on a Proxy-Server link,
        # the OPENs it sent since the Proxy-Client's queue was last drained (epoch, count).
        self.drains = 0
        # (toward which Proxy-Client link, its drains then, OPENs since).
        self.opens_undrained: tuple[RelayLink | None, int, int] = (None, 0, 0)
        self.adapter: object = None  # the Twisted protocol driving this core (opaque here)
        # Told GOAWAY DRAINING (RelayCore.retire): no new streams, closed once drained.
        self.retiring = False

    @property
    def role_name(self) -> str:
        """proxy-client / proxy-server / unauthenticated."""
        return ROLE_NAMES.get(self.role, "unauthenticated") if self.role is not None else (
            "unauthenticated")

    def _handle_stream_frame(self, frame: Frame, events: list[object]) -> None:
        events.append(StreamFrameReceived(frame))

    def receive_data(self, data: bytes) -> list[object]:
        """As LinkCore's, and what the peer provoked here (PONGs) is held to the link's byte
        bound like everything else queued toward it (raises LinkError TOO_SLOW).  Only what
        this read queued is judged: a link a few bytes past its bound by frames the Gateway
        queued without a check (its GOAWAY DRAINING, a PARTNER: at most a largest frame's
        worth) is not closed by its next frame, e.g. a WINDOW_UPDATE of a draining stream,
        which would reset every stream it still carries."""
        before = self.queued_bytes
        events = super().receive_data(data)
        if (self.queued_bytes > self.max_queued_bytes and self.queued_bytes > before
                and self.state is not LinkState.CLOSED):
            raise LinkError(GoAway.TOO_SLOW,
                            f"the peer does not read what it asked for ({self.queued_bytes} "
                            f"bytes queued, limit {self.max_queued_bytes})")
        return events

    # -- accounting -------------------------------------------------------

    def _charge(self, size: int) -> None:
        self.queued_bytes += size
        for budget in self._budgets:
            budget.queued += size

    def queue_control(self, frame: bytes) -> None:
        """Queue a control frame (counted toward the link's bounds)."""
        self._control.append(frame)
        self._control_bytes += len(frame)
        self._charge(len(frame))

    @property
    def queued_control_frames(self) -> int:
        """Control frames and window updates not yet handed to the transport."""
        return len(self._control) + len(self._updates)

    # -- outbound ---------------------------------------------------------

    def forward(self, stream_id: int, frame_type: int, flags: int, payload: bytes) -> None:
        """Queue a stream frame behind earlier frames of the same stream."""
        queue = self._queues.get(stream_id)
        if queue is None:
            queue = self._queues[stream_id] = deque()
        queue.append(fr.encode_header(frame_type, flags, stream_id, len(payload)))
        queue.append(payload)
        self._charge(len(payload) + fr.HEADER_SIZE + FRAME_COST)
        self._mark_ready_stream(stream_id)

    def add_credit(self, stream_id: int, increment: int) -> None:
        """Pass window credit on; increments for one stream leave as one WINDOW_UPDATE while
        their sum fits one (1..2^31-1: credit is spent meanwhile, so the sum of increments
        can pass what one frame carries); a sum that would not fit goes out as it is and a
        new one starts."""
        pending = self._updates.get(stream_id)
        if pending is None:
            self._updates[stream_id] = increment
            self._charge(_WINDOW_UPDATE_SIZE)
        elif pending + increment > fr.MAX_WINDOW:
            self.queue_control(fr.build_window_update(stream_id, pending))
            self._updates[stream_id] = increment
        else:
            self._updates[stream_id] = pending + increment

    @property
    def stream_frames_queued(self) -> bool:
        """Whether stream frames (of any stream) wait to be sent toward this link."""
        return bool(self._queues)

    def has_queued(self, stream_id: int) -> bool:
        """Whether stream frames for ``stream_id`` wait to be sent."""
        return stream_id in self._queues

    def drop_stream(self, stream_id: int) -> None:
        """Forget what waits for a stream that ended abruptly."""
        queue = self._queues.pop(stream_id, None)
        if queue is not None:
            self._charge(-sum(map(len, queue)) - FRAME_COST * (len(queue) // 2))
        if self._updates.pop(stream_id, None) is not None:
            self._charge(-_WINDOW_UPDATE_SIZE)
        self._ready.pop(stream_id, None)

    def drop_all(self) -> None:
        """Forget every queued stream frame and credit (the link is being closed)."""
        for stream_id in list(self._queues):
            self.drop_stream(stream_id)
        for stream_id in list(self._updates):
            self.drop_stream(stream_id)

    def drop_control(self) -> None:
        """Forget the control frames not yet sent (a link that is closing: nothing it was
        still owed matters once its streams are reset; only its GOAWAY is sent, after the
        magic and HELLO if even those were not)."""
        hello = [frame for frame in self._control if frame.startswith(fr.MAGIC)]
        self._control.clear()
        self._control.extend(hello)
        self._charge(-self._control_bytes)
        self._control_bytes = 0

    def leave_budget(self, budget: Budget) -> None:
        """Stop counting this link's queue in ``budget`` (it left its session)."""
        if budget in self._budgets:
            self._budgets.remove(budget)
            budget.queued -= self.queued_bytes

    def join_budget(self, budget: Budget) -> None:
        """Count this link's queue in ``budget`` too (it joined a session)."""
        self._budgets.append(budget)
        budget.queued += self.queued_bytes

    def data_to_send(self, limit: int = 256 * 1024) -> list[bytes]:
        """Frames to write now: control frames, window updates, then stream chunks."""
        if self._updates:
            updates = self._updates
            self._updates = {}
            self._charge(-_WINDOW_UPDATE_SIZE * len(updates))
            for stream_id, increment in updates.items():
                self.queue_control(fr.build_window_update(stream_id, increment))
        if self._control_bytes:
            self._charge(-self._control_bytes)
            self._control_bytes = 0
        if self._control:
            self.drains += 1
        return super().data_to_send(limit)

    @property
    def wants_to_send(self) -> bool:
        """Whether :meth:`data_to_send` would return anything."""
        return bool(self._control or self._updates or self._ready)

    def _pull(self, stream_id: int, budget: int, out: list[bytes]) -> tuple[int, bool]:
        queue = self._queues.get(stream_id)
        if not queue:
            return 0, False
        header = queue.popleft()
        payload = queue.popleft()
        out.append(header)
        out.append(payload)
        size = len(header) + len(payload)
        self._charge(-size - FRAME_COST)
        if not queue:
            del self._queues[stream_id]
            return size, False
        return size, True


class Route:
    """One stream across the Gateway: (Proxy-Server link, id) <-> (Proxy-Client link, id).

    It keeps what the Gateway can know of the stream for its status page and log lines: the
    kind from the OPEN, the target only for a stream in clear (``None`` for an end-to-end
    encrypted one: the Gateway cannot read it), when it opened, and the DATA bytes relayed
    each way.
    """

    # One per tunneled connection: no per-instance dict.
    __slots__ = ("bytes_to_client", "bytes_to_server", "client", "client_stream", "kind",
                 "opened_at", "server", "server_stream", "state", "target", "to_client",
                 "to_server")
    state: StreamState

    @property
    def open(self) -> bool:
        """Whether the Proxy-Client accepted the stream."""
        return not self.state.opening

    def advance(self, from_server: bool, sent: StreamEvent, received: StreamEvent) -> None:
        """Move the lifecycle for a frame from the Proxy-Server (``sent``) or the Proxy-Client
        (``received``); raises StreamError for a frame the table does not allow."""
        self.state = advance(self.state, sent if from_server else received)

    def __init__(self, server: RelayLink, server_stream: int, client: RelayLink,
                 client_stream: int, server_window: int, kind: int = fr.KIND_TCP,
                 target: str | None = None, opened_at: float = 0.0) -> None:
        self.server = server
        self.server_stream = server_stream
        self.client = client
        self.client_stream = client_stream
        self.kind = kind
        self.target = target
        self.opened_at = opened_at
        self.bytes_to_client = 0
        self.bytes_to_server = 0
        # The lifecycle as the opener (the Proxy-Server) sees it: its frames are "sent", the
        # Proxy-Client's "received"; one table (tcptunnel._stream) for every end.
        self.state = StreamState.OPEN_SENT
        # DATA from the Proxy-Server: until the OPEN_RESULT only the early-data window.
        self.to_client = Direction(fr.EARLY_WINDOW)
        self.to_server = Direction(server_window)

    @property
    def sealed(self) -> bool:
        """Whether the stream is end-to-end (sealed or pairing): the Gateway relays what it
        cannot read, and knows no target."""
        return self.kind in (fr.KIND_SEALED, fr.KIND_PAKE)


@dataclass(eq=False)
class Session:
    """A configured session and its live links."""

    id: int
    client: RelayLink | None = None
    servers: dict[int, RelayLink] = field(default_factory=dict)
    next_server_number: int = 1
    budget: Budget = field(default_factory=Budget)

    @property
    def links(self) -> int:
        """Live authenticated links."""
        return len(self.servers) + (self.client is not None)

    def all_links(self) -> list[RelayLink]:
        """The Proxy-Client (if any), then the Proxy-Servers."""
        return ([self.client] if self.client is not None else []) + list(self.servers.values())


class RelayCore:
    """Sessions and routes of one Gateway instance; see the module docstring."""

    def __init__(self, session_ids: list[int], limits: RelayLimits,
                 stats: Counter[tuple[str | int, ...]] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.limits = limits
        # When routes open (for how long a stream ran); the adapter passes its reactor's.
        self.clock: Callable[[], float] = clock if clock is not None else (lambda: 0.0)
        self.sessions: dict[int, Session] = {sid: Session(sid) for sid in session_ids}
        self.total = Budget()
        self.stats: Counter[tuple[str | int, ...]] = Counter() if stats is None else stats
        self.links: set[RelayLink] = set()  # every link not yet detached
        self._dirty: dict[RelayLink, None] = {}
        self._failed: list[tuple[RelayLink, GoAway, str]] = []
        # Routes ended since take_ended (at most the routes of the links one call touched).
        self._ended: list[StreamEnded] = []

    # -- effects ------------------------------------------------------------

    def take_dirty(self) -> list[RelayLink]:
        """Links that have something new to send, in the order they got it."""
        dirty = list(self._dirty)
        self._dirty.clear()
        return dirty

    def take_failed(self) -> list[tuple[RelayLink, GoAway, str]]:
        """Links the relay closed (already detached, GOAWAY queued): close their transports."""
        failed, self._failed = self._failed, []
        return failed

    def take_ended(self) -> list[StreamEnded]:
        """Routes that ended since the last call, in the order they ended: log them."""
        ended, self._ended = self._ended, []
        return ended

    def _send(self, link: RelayLink, frame: bytes) -> None:
        link.queue_control(frame)
        self._dirty[link] = None

    # -- links --------------------------------------------------------------

    def new_link(self) -> RelayLink:
        """The core for a newly accepted link."""
        link = RelayLink(self.total, self.limits.max_control_frames,
                         self.limits.max_queued_bytes_per_link)
        self.links.add(link)
        return link

    def refusal(self, session_id: int, role: int) -> str | None:
        """Why a proven login for ``session_id`` as ``role`` cannot join now, or None.

        One of the session's ``max_links_per_session`` slots is kept for the Proxy-Client:
        Proxy-Servers can never fill the session so that its Proxy-Client cannot come back.
        """
        session = self.sessions.get(session_id)
        if session is None:
            return "the session no longer exists"
        if role == fr.ROLE_PROXY_SERVER:
            room = max(1, self.limits.max_links_per_session - 1)
            if len(session.servers) >= room:
                self.stats["limits_hit", "links_per_session"] += 1
                return (f"session {session_id} already has {len(session.servers)} Proxy-Server "
                        "links (limit)")
        return None

    def attach(self, link: RelayLink, session_id: int, role: int) -> None:
        """A proven login (``refusal`` said None): the link joins its session; partners are
        told.  A new Proxy-Client replaces the old one, which is closed with REPLACED."""
        session = self.sessions[session_id]
        link.session = session
        link.role = role
        link.join_budget(session.budget)
        if role == fr.ROLE_PROXY_CLIENT:
            old = session.client
            session.client = link
            if old is not None:
                self._reset_routes(old, Reason.LINK_LOST, "the Proxy-Client was replaced")
                self.fail(old, GoAway.REPLACED, "a newer Proxy-Client logged in to this session")
            self._send(link, fr.build_partner(len(session.servers)))
            for server in session.servers.values():
                self._send(server, fr.build_partner(1))
        else:
            link.number = session.next_server_number
            session.next_server_number += 1
            session.servers[link.number] = link
            self._send(link, fr.build_partner(1 if session.client is not None else 0))
            if session.client is not None:
                self._send(session.client, fr.build_partner(len(session.servers)))

    def detach(self, link: RelayLink, reason: Reason, message: str) -> None:
        """The link is closing or gone: reset its routes toward the partners, drop what waits
        for it, leave the session.  Idempotent."""
        if link.detached:
            return
        link.detached = True
        self.links.discard(link)
        self._dirty.pop(link, None)
        self._reset_routes(link, reason, message)
        link.drop_all()
        link.drop_control()
        # What is left (a GOAWAY, an AUTH_RESULT, a few control frames) is small and goes
        # with the socket; it no longer counts against any budget, so nothing a link that
        # is gone once queued can hold the session's or the Gateway's budget.
        link.leave_budget(self.total)
        session = link.session
        if session is None:
            return
        link.leave_budget(session.budget)
        if link.role == fr.ROLE_PROXY_CLIENT:
            if session.client is link:
                session.client = None
                for server in session.servers.values():
                    self._send(server, fr.build_partner(0))
        elif session.servers.get(link.number) is link:
            del session.servers[link.number]
            if session.client is not None:
                self._send(session.client, fr.build_partner(len(session.servers)))

    def fail(self, link: RelayLink, code: GoAway, message: str) -> None:
        """Close ``link``: detach it now and queue its GOAWAY; the adapter closes it."""
        if link.detached:
            return
        self.detach(link, Reason.LINK_LOST, f"the {link.role_name} link was closed ({message})")
        link.go_away(code, message)
        self._failed.append((link, code, message))

    def retire(self, link: RelayLink, message: str) -> None:
        """Drain ``link`` (issue 20, h2's GOAWAY): GOAWAY ``DRAINING`` now, and the link
        stays open: its running streams keep flowing both ways (DATA, FIN, WINDOW_UPDATE),
        new OPENs on it or toward it are refused (``SHUTDOWN``), and it is closed once its
        last stream ended and what was queued toward it was written (:meth:`check_drained`).
        The proxy meanwhile logs in elsewhere with a new link.  A link without streams and
        without stream frames still queued toward it is closed at once, with the same
        GOAWAY."""
        if link.detached or link.retiring or link.role is None:
            return
        link.retiring = True
        if not link.routes and not link.stream_frames_queued:
            self.fail(link, GoAway.DRAINING, message)
            return
        # Streams, or the last frames of ended ones (the DATA and FIN that closed a route,
        # a lost partner's last DATA and its RESET): closing now would drop those, and a
        # stream that ended cleanly would reach the proxy reset (GOAWAY resets every stream
        # it still has).  check_drained closes the link once they are written.
        self._send(link, fr.build_goaway(GoAway.DRAINING, message))

    def check_drained(self, link: RelayLink) -> None:
        """Close a retiring link that carries no stream any more and has no stream frame
        left queued toward it (its last DATA and FIN are written first: closing drops what
        is queued).  Called after each read of the link and after each write to it.  The
        closing GOAWAY is ``DRAINING`` again, so that a proxy that never got the first
        (it was still queued) reconnects at once too."""
        if (link.retiring and not link.detached and not link.routes
                and not link.stream_frames_queued):
            self.fail(link, GoAway.DRAINING, "the Gateway is draining and the last stream "
                      "of this link ended")

    def remove_session(self, session_id: int, message: str) -> list[RelayLink]:
        """A session left the configuration: close its links (SESSION_CLOSED)."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return []
        links = session.all_links()
        for link in links:
            self.fail(link, GoAway.SESSION_CLOSED, message)
        return links

    def close_role(self, session_id: int, role: int, message: str) -> list[RelayLink]:
        """Close the links of one role of a session (its password changed: SESSION_CLOSED);
        the other role's links stay."""
        session = self.sessions.get(session_id)
        if session is None:
            return []
        links = [link for link in session.all_links() if link.role == role]
        for link in links:
            self.fail(link, GoAway.SESSION_CLOSED, message)
        return links

    def add_session(self, session_id: int) -> None:
        """A session joined the configuration."""
        self.sessions.setdefault(session_id, Session(session_id))

    def _reset_routes(self, link: RelayLink, reason: Reason, message: str) -> None:
        routes = list(link.routes.values())
        link.routes.clear()
        for route in routes:
            other, other_id = ((route.client, route.client_stream) if link is route.server
                               else (route.server, route.server_stream))
            other.routes.pop(other_id, None)
            link.drop_stream(route.server_stream if link is route.server else route.client_stream)
            self.stats["streams_reset", reason.name] += 1
            self._ended.append(StreamEnded(route, "reset", reason.name))
            if not route.open and other is route.server:
                other.drop_stream(other_id)
                self._send(other, fr.build_open_result(other_id, Reason.NO_PARTNER, 0, message))
            elif other.has_queued(other_id):
                # What the lost link sent before it went (its last DATA, a FIN) is already
                # queued toward ``other``: it is delivered, then the RESET (a truncated
                # direction still ends in a reset, never a clean EOF).
                other.forward(other_id, FrameType.RESET, 0,
                              fr.build_reset(other_id, reason, message)[fr.HEADER_SIZE:])
                self._dirty[other] = None
            else:
                self._send(other, fr.build_reset(other_id, reason, message))

    # -- streams ------------------------------------------------------------

    def stream_frame(self, link: RelayLink, frame: Frame) -> None:
        """Route one stream frame that arrived on ``link``.  Raises LinkError for a violation
        that ends the link; a violation of one stream's rules resets that stream."""
        if link.detached:
            return
        if frame.type == FrameType.OPEN:
            self._open(link, frame)
            return
        route = link.routes.get(frame.stream_id)
        if route is None:
            return  # unknown or finished: a RESET may have crossed it
        try:
            self._forward(link, route, frame)
        except StreamError as e:
            self._reset_route(route, e.reason, e.message)

    def _open_allowance_refusal(self, session: Session, server: RelayLink,
                                client: RelayLink) -> str | None:
        """Why ``server`` may not send one more OPEN toward a Proxy-Client that has not yet
        taken its earlier ones, or None.

        Each OPEN (and the RESET that may follow it) queues control frames toward the
        Proxy-Client that the Proxy-Client never asked for; a Proxy-Server must not be able
        to fill that queue past the Proxy-Client's bound and so close it (and every other
        Proxy-Server's streams).  So each Proxy-Server may have at most its part of that
        bound in OPENs toward the Proxy-Client between two drains of its queue.
        """
        allowance = max(8, self.limits.max_control_frames // (4 * max(1, len(session.servers))))
        toward, epoch, count = server.opens_undrained
        if toward is not client or epoch != client.drains:
            count = 0
        if count >= allowance:
            return (f"the Proxy-Client has not yet taken this Proxy-Server's last {count} "
                    "OPENs; retry")
        server.opens_undrained = (client, client.drains, count + 1)
        return None

    def _fair_share_refusal(self, session: Session, server: RelayLink,
                            client: RelayLink) -> str | None:
        """Why ``server`` may not open one more stream on the Proxy-Client link, or None.

        The Proxy-Client link's streams are shared by the session's Proxy-Servers: each is
        guaranteed ``capacity // n`` of them (n Proxy-Servers connected), and may use more
        only while that leaves every other one room for its guaranteed share.
        """
        capacity = self.limits.max_streams_per_link
        used_total = len(client.routes)
        if used_total >= capacity:
            return f"the Proxy-Client link has {used_total} streams (limit)"
        servers = session.servers
        share = capacity // max(1, len(servers))
        if len(servers) <= 1:
            return None
        # Every route of a Proxy-Server link goes to the session's current Proxy-Client (a
        # replaced one takes its routes with it), so a link's share is its route count: no
        # scan of the Proxy-Client's routes per OPEN.
        if len(server.routes) < share:
            return None
        reserved = sum(max(0, share - len(other.routes)) for other in servers.values()
                       if other is not server)
        if capacity - used_total > reserved:
            return None
        return (f"this Proxy-Server holds {len(server.routes)} of the Proxy-Client link's "
                f"{capacity} streams, shared fairly with {len(servers) - 1} other "
                "Proxy-Server(s)")

    def _open(self, link: RelayLink, frame: Frame) -> None:
        stream_id = frame.stream_id
        if link.role != fr.ROLE_PROXY_SERVER:
            raise LinkError(GoAway.PROTOCOL_ERROR, "OPEN from a Proxy-Client")
        if stream_id <= link.last_opened:
            raise LinkError(GoAway.PROTOCOL_ERROR,
                            f"OPEN with stream id {stream_id} not above {link.last_opened}")
        link.last_opened = stream_id
        session = link.session
        assert session is not None
        try:
            window, _origin, kind = fr.parse_open_header(frame.payload)
        except StreamError as e:
            self._send(link, fr.build_open_result(stream_id, e.reason, 0, e.message))
            return
        client = session.client
        refusal: tuple[Reason, str] | None = None
        if len(frame.payload) > MAX_FORWARDED_OPEN:
            # Forwarded unread: what a Proxy-Server may make the Gateway queue toward its
            # Proxy-Client without the Proxy-Client asking stays small (OPENs and early data
            # of at most maxStreamsPerLink streams: about 20 MiB by default).
            refusal = Reason.LIMIT, (f"an OPEN of {len(frame.payload)} bytes; the Gateway "
                                     f"forwards at most {MAX_FORWARDED_OPEN}")
        elif client is None:
            refusal = Reason.NO_PARTNER, "the session has no Proxy-Client"
        elif link.retiring or client.retiring:
            # An OPEN that crossed our GOAWAY DRAINING: the proxy opens it again (or the
            # next one) on its new link, to another Gateway.
            refusal = Reason.SHUTDOWN, ("the Gateway is draining: new streams go through "
                                        "the proxies' new link")
        elif (why := self._open_allowance_refusal(session, link, client)) is not None:
            refusal = Reason.LIMIT, why
        elif len(link.routes) >= self.limits.max_streams_per_link:
            refusal = Reason.LIMIT, f"this link has {len(link.routes)} streams (limit)"
        elif (why := self._fair_share_refusal(session, link, client)) is not None:
            refusal = Reason.LIMIT, why
        elif client.next_stream_id > fr.STREAM_ID_MASK:
            # Ids never repeat on a link: the Proxy-Client must come back on a new one.
            self.fail(client, GoAway.NORMAL, "stream ids of this link are used up; reconnect")
            refusal = Reason.NO_PARTNER, "the Proxy-Client link is being renewed"
        if refusal is not None:
            reason, message = refusal
            self.stats["streams_refused", session.id, reason.name] += 1
            if reason is Reason.LIMIT:
                self.stats["limits_hit", "streams_per_link"] += 1
            self._send(link, fr.build_open_result(stream_id, reason, 0, message))
            return
        assert client is not None
        client_id = client.next_stream_id
        client.next_stream_id += 1
        # The target of a stream in clear, for the status page and the log; a sealed
        # stream's travels encrypted (docs/security.md): the Gateway does not look for it.
        target = clear_target(frame.payload) if kind in CLEAR_KINDS else None
        route = Route(link, stream_id, client, client_id, window, kind, target, self.clock())
        link.routes[stream_id] = route
        client.routes[client_id] = route
        self.stats["streams_opened", session.id] += 1
        # Forwarded as it came (kind and fields untouched), with the Proxy-Server's number.
        self._send(client, fr.encode(FrameType.OPEN, client_id,
                                     fr.with_origin(frame.payload, link.number)))
        self._check(client)

    def _forward(self, link: RelayLink, route: Route, frame: Frame) -> None:
        from_server = link is route.server
        if from_server:
            other, other_id, towards_other, towards_link = (
                route.client, route.client_stream, route.to_client, route.to_server)
        else:
            other, other_id, towards_other, towards_link = (
                route.server, route.server_stream, route.to_server, route.to_client)
        frame_type = frame.type
        if frame_type == FrameType.DATA:
            route.advance(from_server, StreamEvent.SEND_DATA, StreamEvent.RECV_DATA)
            size = len(frame.payload)
            towards_other.take(size)
            if from_server:
                route.bytes_to_client += size
            else:
                route.bytes_to_server += size
            session = link.session
            self.stats["bytes", session.id if session is not None else 0,
                       "to_client" if from_server else "to_server"] += size
            other.forward(other_id, frame_type, frame.flags, frame.payload)
            self._dirty[other] = None
            self._check(other)
        elif frame_type == FrameType.WINDOW_UPDATE:
            increment = fr.parse_window_update(frame.payload)
            towards_link.grant(increment)  # credit granted by ``link`` for DATA toward it
            other.add_credit(other_id, increment)
            self._dirty[other] = None
            self._check(other)
        elif frame_type == FrameType.FIN:
            route.advance(from_server, StreamEvent.SEND_FIN, StreamEvent.RECV_FIN)
            towards_other.end()
            other.forward(other_id, frame_type, 0, b"")
            self._dirty[other] = None
            if route.state is StreamState.CLOSED:
                self.stats["streams_closed",] += 1
                self._forget(route)
                self._ended.append(StreamEnded(route, "closed", Reason.OK.name))
            self._check(other)
        elif frame_type == FrameType.RESET:
            route.state = StreamState.RESET
            reason, message = fr.parse_reset(frame.payload)
            self.stats["streams_reset", reason.name] += 1
            self._forget(route)
            self._ended.append(StreamEnded(route, "reset", reason.name))
            # Neither side takes more of this stream: drop what waits for either.
            link.drop_stream(route.server_stream if from_server else route.client_stream)
            other.drop_stream(other_id)
            self._send(other, fr.build_reset(other_id, reason, message))
            self._check(other)
        elif frame_type == FrameType.OPEN_RESULT:
            if from_server:
                raise StreamError(Reason.PROTOCOL_ERROR, "OPEN_RESULT from the opener")
            reason, window, _message = fr.parse_open_result(frame.payload)
            if reason is Reason.OK:
                if window < fr.EARLY_WINDOW:
                    raise StreamError(Reason.FLOW_CONTROL, "OPEN_RESULT window below the "
                                      "early-data window")
                route.advance(False, StreamEvent.SEND_OPEN_OK, StreamEvent.RECV_OPEN_OK)
                route.to_client.grant(window - fr.EARLY_WINDOW)
            else:
                route.advance(False, StreamEvent.SEND_OPEN_FAILED, StreamEvent.RECV_OPEN_FAILED)
                self._forget(route)
                self._ended.append(StreamEnded(route, "refused", reason.name))
                link.drop_stream(route.client_stream)  # early data it will not take
            # Passed on as it came: the reason text is the Proxy-Client's.
            self._send(other, fr.encode(FrameType.OPEN_RESULT, other_id, frame.payload))
            self._check(other)
        # Unknown stream frame types are ignored (docs/protocol.md §5).

    def _forget(self, route: Route) -> None:
        route.server.routes.pop(route.server_stream, None)
        route.client.routes.pop(route.client_stream, None)

    def _reset_route(self, route: Route, reason: Reason, message: str) -> None:
        """A violation on a route: reset it toward both proxies."""
        self.stats["streams_reset", reason.name] += 1
        self._forget(route)
        self._ended.append(StreamEnded(route, "reset", reason.name))
        for link, stream_id in ((route.server, route.server_stream),
                                (route.client, route.client_stream)):
            link.drop_stream(stream_id)
            if not route.open and link is route.server:
                self._send(link, fr.build_open_result(stream_id, reason, 0, message))
            else:
                self._send(link, fr.build_reset(stream_id, reason, message))
            self._check(link)

    # -- bounds -------------------------------------------------------------

    def check_unsent(self, link: RelayLink) -> None:
        """After ``link`` was written to as far as its transport took: too many control
        frames left unsent means its peer does not read (TOO_SLOW).  Judged only here, not
        while a read is being handled: one read of another link may queue hundreds of
        frames toward a link that reads everything (one 26 KiB write of OPEN+RESET pairs
        once closed a session's Proxy-Client)."""
        if not link.detached and link.queued_control_frames > self.limits.max_control_frames:
            self.stats["limits_hit", "queued_control_frames"] += 1
            self.fail(link, GoAway.TOO_SLOW,
                      f"the peer does not read ({link.queued_control_frames} control frames "
                      "unsent)")

    def _check(self, link: RelayLink) -> None:
        """Keep the memory bounds after something was queued toward ``link``."""
        limits = self.limits
        if link.detached:
            return
        if link.queued_bytes > limits.max_queued_bytes_per_link:
            self.stats["limits_hit", "queued_bytes_per_link"] += 1
            self.fail(link, GoAway.TOO_SLOW,
                      f"the peer does not read what it asked for ({link.queued_bytes} bytes "
                      f"queued, limit {limits.max_queued_bytes_per_link})")
        session = link.session
        if session is not None and session.budget.queued > limits.max_queued_bytes_per_session:
            self.stats["limits_hit", "queued_bytes_per_session"] += 1
            worst = max(session.all_links(), key=lambda candidate: candidate.queued_bytes)
            self.fail(worst, GoAway.TOO_SLOW,
                      f"session {session.id} has {session.budget.queued} bytes queued toward "
                      f"its links (limit {limits.max_queued_bytes_per_session}); this link "
                      f"holds the most ({worst.queued_bytes})")
        if self.total.queued > limits.max_queued_bytes:
            self.stats["limits_hit", "queued_bytes"] += 1
            worst = max(self.links, key=lambda candidate: candidate.queued_bytes)
            self.fail(worst, GoAway.TOO_SLOW,
                      f"the Gateway has {self.total.queued} bytes queued (limit "
                      f"{limits.max_queued_bytes}); this link holds the most "
                      f"({worst.queued_bytes})")
