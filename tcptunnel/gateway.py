"""The Gateway: listeners, login, sessions, and routing of streams between proxies.

Each authenticated link belongs to one session in one role.  A session has
at most one Proxy-Client (the last one to log in wins; the one it replaces
is told GOAWAY REPLACED and closed) and any number of Proxy-Servers.  A
stream opened by a Proxy-Server becomes a *route* to a stream id on the
Proxy-Client's link; the Gateway checks each direction's credit on the way
and queues forwarded frames per stream, so a slow peer only ever holds up
its own streams (``docs/protocol.md`` §6).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import interfaces
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcptunnel import _frames as fr
from tcptunnel._frames import Frame, FrameType, GoAway, Reason, StreamError
from tcptunnel._link import MAX_QUEUED_CONTROL_FRAMES, AuthFrameReceived, LinkCore, LinkState
from tcptunnel.auth import (
    FailureThrottle,
    GatewayAuth,
    LoginFailed,
    auth_info_for,
    same_password,
    scram_username,
)
from tcptunnel.config import (
    GatewayConfig,
    GatewayLimits,
    ListenerConfig,
    StartupError,
    format_address,
)
from tcptunnel.mux import LinkProtocol
from tcptunnel.ports import AddressKey, address_keys, listen

ROLE_NAMES = {fr.ROLE_PROXY_CLIENT: "proxy-client", fr.ROLE_PROXY_SERVER: "proxy-server"}
MAX_QUEUED_BYTES_PER_LINK = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StreamFrameReceived:
    """A stream frame for the router."""

    frame: Frame


class GatewayLinkCore(LinkCore):
    """The Gateway's end of a link: stream frames go to the router; forwarded
    frames wait in per-stream queues served round-robin."""

    def __init__(self) -> None:
        super().__init__()
        self._queues: dict[int, deque[bytes]] = {}
        self.queued_bytes = 0

    def _handle_stream_frame(self, frame: Frame, events: list[object]) -> None:
        events.append(StreamFrameReceived(frame))

    def forward(self, stream_id: int, frame_type: int, flags: int, payload: bytes) -> None:
        """Queue a stream frame behind earlier frames of the same stream."""
        queue = self._queues.get(stream_id)
        if queue is None:
            queue = self._queues[stream_id] = deque()
        queue.append(fr.encode_header(frame_type, flags, stream_id, len(payload)))
        queue.append(payload)
        self.queued_bytes += len(payload) + fr.HEADER_SIZE
        self._mark_ready_stream(stream_id)

    def drop_stream(self, stream_id: int) -> None:
        """Forget queued frames of a stream that was reset."""
        queue = self._queues.pop(stream_id, None)
        if queue is not None:
            self.queued_bytes -= sum(map(len, queue))
        self._ready.pop(stream_id, None)

    def _pull(self, stream_id: int, budget: int, out: list[bytes]) -> tuple[int, bool]:
        queue = self._queues.get(stream_id)
        if not queue:
            return 0, False
        header = queue.popleft()
        payload = queue.popleft()
        out.append(header)
        out.append(payload)
        size = len(header) + len(payload)
        self.queued_bytes -= size
        if not queue:
            del self._queues[stream_id]
            return size, False
        return size, True


@dataclass(eq=False, slots=True)  # one per tunneled connection: no per-instance dict
class Route:
    """One stream across the Gateway: (Proxy-Server link, id) <-> (Proxy-Client link, id)."""

    server_link: GatewayLink
    server_stream: int
    client_link: GatewayLink
    client_stream: int
    open: bool = False
    # Credit for DATA travelling towards each side (granted by that side).
    credit_to_server: int = 0
    credit_to_client: int = 0
    fin_from_server: bool = False
    fin_from_client: bool = False

    def other(self, link: GatewayLink) -> tuple[GatewayLink, int]:
        """The link and stream id on the far side of ``link``."""
        if link is self.server_link:
            return self.client_link, self.client_stream
        return self.server_link, self.server_stream

    def own_id(self, link: GatewayLink) -> int:
        """This route's stream id on ``link``."""
        return self.server_stream if link is self.server_link else self.client_stream


@dataclass(eq=False)
class Session:
    """A configured session and its live links."""

    id: int
    client: GatewayLink | None = None
    servers: dict[int, GatewayLink] = field(default_factory=dict)
    next_server_number: int = 1

    @property
    def links(self) -> int:
        """Live authenticated links."""
        return len(self.servers) + (self.client is not None)


class GatewayLink(LinkProtocol):
    """One proxy's link at the Gateway: login, then routing."""

    log = Logger()
    core: GatewayLinkCore

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(GatewayLinkCore(), gateway.clock, gateway.limits.keepalive_interval,
                         gateway.limits.keepalive_timeout)
        self.gateway = gateway
        self.session: Session | None = None
        self.role: int | None = None
        self.number = 0  # Proxy-Server number within its session
        self.routes: dict[int, Route] = {}
        self.next_stream_id = 1  # on a Proxy-Client link the Gateway opens streams
        self.last_opened = 0
        self._auth: GatewayAuth | None = None
        self._login_call: interfaces.IDelayedCall | None = None
        self._auth_session_id = 0
        self._auth_role = 0
        self._throttled = False

    @property
    def role_name(self) -> str:
        """proxy-client / proxy-server / unauthenticated."""
        return ROLE_NAMES.get(self.role, "unauthenticated") if self.role is not None else (
            "unauthenticated")

    # -- life cycle ---------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        """Count the unauthenticated link and start the login deadline."""
        super().connectionMade()
        gateway = self.gateway
        gateway.unauthenticated.add(self)
        self.log.info("[{index}] Link {peer}: accepted", index=gateway.config.index,
                      peer=self.peer_description)
        if len(gateway.unauthenticated) > gateway.limits.max_unauthenticated_links:
            self.log.warn("[{index}] Link {peer}: limit of {limit} unauthenticated links "
                          "reached; closing", index=gateway.config.index,
                          peer=self.peer_description,
                          limit=gateway.limits.max_unauthenticated_links)
            gateway.stats["limits_hit", "unauthenticated_links"] += 1
            self.fail(GoAway.LIMIT, "too many unauthenticated links")
            return
        self._login_call = self.clock.callLater(gateway.limits.login_timeout, self._login_timeout)

    def _login_timeout(self) -> None:
        self._login_call = None
        if self.core.state is not LinkState.READY:
            self.fail(GoAway.LOGIN_TIMEOUT,
                      f"no login within {self.gateway.limits.login_timeout:g} s")

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """Unregister from the session; reset every route through this link."""
        closed_here = self._closing
        super().connectionLost(reason)
        if self._login_call is not None and self._login_call.active():
            self._login_call.cancel()
        self.gateway.unauthenticated.discard(self)
        self.gateway.links.discard(self)
        duration = self.clock.seconds() - self.connected_at
        self.log.info(
            "[{index}] Link {peer} ({role}, session {session}): closed after {duration:.1f} s, "
            "{received} bytes in, {sent} bytes out ({why})",
            index=self.gateway.config.index, peer=self.peer_description, role=self.role_name,
            session=self.session.id if self.session else "-", duration=duration,
            received=self.core.bytes_received, sent=self.bytes_sent,
            why=self.close_reason if closed_here else reason.getErrorMessage(),
        )
        self.gateway.router.link_gone(self)

    # -- events -------------------------------------------------------------

    def handle_events(self, events: list[object]) -> None:
        """Login frames to the login logic, stream frames to the router."""
        router = self.gateway.router
        for event in events:
            if isinstance(event, StreamFrameReceived):
                router.stream_frame(self, event.frame)
            elif isinstance(event, AuthFrameReceived):
                self._auth_frame(event.frame)
            if self._closing:
                return
        if self.core.queued_control_frames > MAX_QUEUED_CONTROL_FRAMES or (
                self.core.queued_bytes > MAX_QUEUED_BYTES_PER_LINK):
            self.fail(GoAway.TOO_SLOW, "the peer does not read what it asked for")

    def _auth_frame(self, frame: Frame) -> None:
        if frame.type == FrameType.AUTH_START and self._auth is None and not self._throttled:
            role, session_id, client_first = fr.parse_auth_start(frame.payload)
            self._auth_role, self._auth_session_id = role, session_id
            delay = self.gateway.throttle.delay_for(self.peer_host)
            if delay:
                # Slow down guessing from this address; the login deadline still runs.
                self._throttled = True
                self.clock.callLater(delay, self._start_auth, role, session_id, client_first)
            else:
                self._start_auth(role, session_id, client_first)
        elif frame.type == FrameType.AUTH_PROOF and self._auth is not None:
            client_final = fr.parse_auth_message(frame.payload, "AUTH_PROOF")
            try:
                server_final = self._auth.finish(client_final)
            except LoginFailed as e:
                self._login_failed(str(e))
                return
            self._login_ok(server_final)
        else:
            self.fail(GoAway.PROTOCOL_ERROR,
                      f"unexpected {FrameType(frame.type).name} during login")

    @property
    def peer_host(self) -> str:
        """The peer's IP address, for throttling."""
        peer = self.transport.getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", "?"))

    def _start_auth(self, role: int, session_id: int, client_first: str) -> None:
        self._throttled = False
        if self._closing:
            return
        info = self.gateway.auth_infos.get((session_id, role))
        self._auth = GatewayAuth(info, scram_username(session_id, role),
                                 self.gateway.decoy_secret)
        try:
            server_first = self._auth.challenge(client_first)
        except LoginFailed as e:
            self._login_failed(str(e))
            return
        self.core.queue_control(fr.build_auth_message(FrameType.AUTH_CHALLENGE, server_first))
        self.flush()

    def _login_failed(self, why: str) -> None:
        gateway = self.gateway
        gateway.throttle.failed(self.peer_host)
        gateway.stats["logins_failed", ROLE_NAMES.get(self._auth_role, "?")] += 1
        self.log.warn(
            "[{index}] Link {peer}: login failed for session {session} as {role}: {why}",
            index=gateway.config.index, peer=self.peer_description,
            session=self._auth_session_id, role=ROLE_NAMES.get(self._auth_role, "?"), why=why,
        )
        self.core.queue_control(fr.build_auth_result(False))
        self.fail(GoAway.AUTH_FAILED, "authentication failed")

    def _login_ok(self, server_final: str) -> None:
        gateway = self.gateway
        session = gateway.sessions.get(self._auth_session_id)
        if session is None:  # removed while the login ran
            self._login_failed("the session no longer exists")
            return
        if session.links >= gateway.limits.max_links_per_session and not (
                self._auth_role == fr.ROLE_PROXY_CLIENT and session.client is not None):
            self.log.warn("[{index}] Link {peer}: session {session} already has {n} links "
                          "(limit)", index=gateway.config.index, peer=self.peer_description,
                          session=session.id, n=session.links)
            gateway.stats["limits_hit", "links_per_session"] += 1
            self.core.queue_control(fr.build_auth_result(False))
            self.fail(GoAway.LIMIT, f"session {session.id} has too many links")
            return
        gateway.throttle.succeeded(self.peer_host)
        gateway.stats["logins_ok", ROLE_NAMES.get(self._auth_role, "?")] += 1
        if self._login_call is not None and self._login_call.active():
            self._login_call.cancel()
        self._login_call = None
        gateway.unauthenticated.discard(self)
        gateway.links.add(self)
        self.session = session
        self.role = self._auth_role
        self.core.queue_control(fr.build_auth_result(True, server_final))
        self.core.mark_ready()
        self.log.info("[{index}] Link {peer}: authenticated for session {session} as {role}",
                      index=gateway.config.index, peer=self.peer_description,
                      session=session.id, role=self.role_name)
        gateway.router.link_ready(self)
        self.flush()

    # -- frames generated here ----------------------------------------------

    def send_control(self, frame: bytes) -> None:
        """Queue a Gateway-made frame and send it."""
        if not self._closing:
            self.core.queue_control(frame)
            self.flush()


class Router:
    """Pairs links of a session and moves stream frames between them."""

    log = Logger()

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    # -- links --------------------------------------------------------------

    def link_ready(self, link: GatewayLink) -> None:
        """A link logged in: attach it to its session and tell the partners."""
        session = link.session
        assert session is not None
        index = self.gateway.config.index
        if link.role == fr.ROLE_PROXY_CLIENT:
            old = session.client
            session.client = link
            if old is not None:
                self.log.warn("[{index}] Session {session}: Proxy-Client {old} replaced by {new}",
                              index=index, session=session.id, old=old.peer_description,
                              new=link.peer_description)
                self._reset_routes(old, Reason.LINK_LOST, "the Proxy-Client was replaced")
                old.fail(GoAway.REPLACED, "a newer Proxy-Client logged in to this session")
            link.send_control(fr.build_partner(len(session.servers)))
            for server in session.servers.values():
                server.send_control(fr.build_partner(1))
        else:
            link.number = session.next_server_number
            session.next_server_number += 1
            session.servers[link.number] = link
            link.send_control(fr.build_partner(1 if session.client is not None else 0))
            if session.client is not None:
                session.client.send_control(fr.build_partner(len(session.servers)))

    def link_gone(self, link: GatewayLink) -> None:
        """A link closed: reset its routes and tell the partners."""
        session = link.session
        self._reset_routes(link, Reason.LINK_LOST,
                           f"the {link.role_name} link was lost ({link.close_reason})")
        if session is None:
            return
        if link.role == fr.ROLE_PROXY_CLIENT:
            if session.client is link:
                session.client = None
                for server in session.servers.values():
                    server.send_control(fr.build_partner(0))
        elif session.servers.get(link.number) is link:
            del session.servers[link.number]
            if session.client is not None:
                session.client.send_control(fr.build_partner(len(session.servers)))

    def _reset_routes(self, link: GatewayLink, reason: Reason, message: str) -> None:
        routes = list(link.routes.values())
        link.routes.clear()
        for route in routes:
            other, other_id = route.other(link)
            other.routes.pop(other_id, None)
            other.core.drop_stream(other_id)
            if not route.open and other is route.server_link:
                other.send_control(fr.build_open_result(other_id, Reason.NO_PARTNER, 0, message))
            else:
                other.send_control(fr.build_reset(other_id, reason, message))

    # -- streams ------------------------------------------------------------

    def stream_frame(self, link: GatewayLink, frame: Frame) -> None:
        """Route one stream frame arriving on ``link``."""
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

    def _open(self, link: GatewayLink, frame: Frame) -> None:
        stream_id = frame.stream_id
        if link.role != fr.ROLE_PROXY_SERVER:
            link.fail(GoAway.PROTOCOL_ERROR, "OPEN from a Proxy-Client")
            return
        if stream_id <= link.last_opened:
            link.fail(GoAway.PROTOCOL_ERROR,
                      f"OPEN with stream id {stream_id} not above {link.last_opened}")
            return
        link.last_opened = stream_id
        session = link.session
        assert session is not None
        limits = self.gateway.limits
        try:
            request = fr.parse_open(frame.payload)
        except StreamError as e:
            link.send_control(fr.build_open_result(stream_id, e.reason, 0, e.message))
            return
        client = session.client
        if client is None:
            self.gateway.stats["streams_refused", session.id, "NO_PARTNER"] += 1
            link.send_control(fr.build_open_result(stream_id, Reason.NO_PARTNER, 0,
                                                   "the session has no Proxy-Client"))
            return
        if len(link.routes) >= limits.max_streams_per_link or (
                len(client.routes) >= limits.max_streams_per_link):
            self.log.warn("[{index}] Session {session}: stream limit {limit} reached",
                          index=self.gateway.config.index, session=session.id,
                          limit=limits.max_streams_per_link)
            self.gateway.stats["limits_hit", "streams_per_link"] += 1
            link.send_control(fr.build_open_result(stream_id, Reason.LIMIT, 0,
                                                   "too many streams on this link"))
            return
        client_id = client.next_stream_id
        client.next_stream_id += 1
        route = Route(link, stream_id, client, client_id,
                      credit_to_server=request.window, credit_to_client=fr.EARLY_WINDOW)
        link.routes[stream_id] = route
        client.routes[client_id] = route
        self.gateway.stats["streams_opened", session.id] += 1
        client.send_control(fr.build_open(
            client_id, fr.OpenRequest(request.window, link.number, request.host, request.port)))

    def _forward(self, link: GatewayLink, route: Route, frame: Frame) -> None:
        from_server = link is route.server_link
        other, other_id = route.other(link)
        frame_type = frame.type
        if frame_type == FrameType.DATA:
            if not route.open and not from_server:  # the opener's early data is fine
                raise StreamError(Reason.PROTOCOL_ERROR, "DATA before OPEN_RESULT")
            if route.fin_from_server if from_server else route.fin_from_client:
                raise StreamError(Reason.PROTOCOL_ERROR, "DATA after FIN")
            size = len(frame.payload)
            if from_server:
                if size > route.credit_to_client:
                    raise StreamError(Reason.FLOW_CONTROL, "DATA beyond the window")
                route.credit_to_client -= size
            else:
                if size > route.credit_to_server:
                    raise StreamError(Reason.FLOW_CONTROL, "DATA beyond the window")
                route.credit_to_server -= size
            session_id = link.session.id if link.session is not None else 0
            self.gateway.stats["bytes", session_id,
                               "to_client" if from_server else "to_server"] += size
            other.core.forward(other_id, frame_type, frame.flags, frame.payload)
            other.flush()
            if other.core.queued_bytes > MAX_QUEUED_BYTES_PER_LINK:
                other.fail(GoAway.TOO_SLOW, "the peer does not read what it asked for")
        elif frame_type == FrameType.WINDOW_UPDATE:
            increment = fr.parse_window_update(frame.payload)
            # Credit granted by ``link`` for DATA travelling towards it.
            if from_server:
                route.credit_to_server += increment
                total = route.credit_to_server
            else:
                route.credit_to_client += increment
                total = route.credit_to_client
            if total > fr.MAX_WINDOW:
                raise StreamError(Reason.FLOW_CONTROL, "window grew past 2^31-1")
            other.send_control(fr.build_window_update(other_id, increment))
        elif frame_type == FrameType.FIN:
            if from_server:
                route.fin_from_server = True
            else:
                route.fin_from_client = True
            other.core.forward(other_id, frame_type, 0, b"")
            other.flush()
            if route.fin_from_server and route.fin_from_client:
                self.gateway.stats["streams_closed",] += 1
                self._forget(route)
        elif frame_type == FrameType.RESET:
            reason, message = fr.parse_reset(frame.payload)
            self.gateway.stats["streams_reset", reason.name] += 1
            self._forget(route)
            # Neither side takes more of this stream: drop what waits for either.
            link.core.drop_stream(route.own_id(link))
            other.core.drop_stream(other_id)
            other.send_control(fr.build_reset(other_id, reason, message))
        elif frame_type == FrameType.OPEN_RESULT:
            if from_server or route.open:
                raise StreamError(Reason.PROTOCOL_ERROR, "unexpected OPEN_RESULT")
            reason, window, message = fr.parse_open_result(frame.payload)
            if reason is Reason.OK:
                if window < fr.EARLY_WINDOW:
                    raise StreamError(Reason.FLOW_CONTROL, "OPEN_RESULT window below the "
                                      "early-data window")
                route.open = True
                route.credit_to_client += window - fr.EARLY_WINDOW
            else:
                self._forget(route)
                link.core.drop_stream(route.client_stream)  # early data it will not take
            other.send_control(fr.build_open_result(other_id, reason, window, message))
        # Unknown stream frame types are ignored (docs/protocol.md §5).

    def _forget(self, route: Route) -> None:
        route.server_link.routes.pop(route.server_stream, None)
        route.client_link.routes.pop(route.client_stream, None)

    def _reset_route(self, route: Route, reason: Reason, message: str) -> None:
        """A violation on a route: reset it towards both proxies."""
        self.gateway.stats["streams_reset", reason.name] += 1
        self._forget(route)
        for link, stream_id in ((route.server_link, route.server_stream),
                                (route.client_link, route.client_stream)):
            link.core.drop_stream(stream_id)
            if not route.open and link is route.server_link:
                link.send_control(fr.build_open_result(stream_id, reason, 0, message))
            else:
                link.send_control(fr.build_reset(stream_id, reason, message))


class Gateway:
    """Sessions, limits and secrets of one gateway instance (shared by its listeners)."""

    log = Logger()

    def __init__(self, config: GatewayConfig, clock: interfaces.IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.limits: GatewayLimits = config.limits
        self.sessions: dict[int, Session] = {s.id: Session(s.id) for s in config.sessions}
        self.auth_infos = {}
        for session in config.sessions:
            self.auth_infos[(session.id, fr.ROLE_PROXY_CLIENT)] = auth_info_for(
                session.proxy_client)
            self.auth_infos[(session.id, fr.ROLE_PROXY_SERVER)] = auth_info_for(
                session.proxy_server)
        self.decoy_secret = os.urandom(32)
        # Event counters for /metrics: (name, label...) -> count.
        self.stats: Counter[tuple[str | int, ...]] = Counter()
        self.throttle = FailureThrottle()
        self.unauthenticated: set[GatewayLink] = set()
        self.links: set[GatewayLink] = set()
        self.router = Router(self)

    def update(self, new: GatewayConfig) -> None:
        """Apply reloaded sessions and limits; close links of removed or changed sessions."""
        old = {s.id: s for s in self.config.sessions}
        fresh = {s.id: s for s in new.sessions}
        for session_id, session_config in old.items():
            replacement = fresh.get(session_id)
            if replacement is not None and (
                    replacement.proxy_client == session_config.proxy_client
                    and replacement.proxy_server == session_config.proxy_server):
                continue
            why = "removed" if replacement is None else "given new passwords"
            self.log.info("[{index}] Session {session} {why} on reload: closing its links",
                          index=new.index, session=session_id, why=why)
            session = self.sessions.pop(session_id, None)
            for role in (fr.ROLE_PROXY_CLIENT, fr.ROLE_PROXY_SERVER):
                self.auth_infos.pop((session_id, role), None)
            if session is not None:
                links = [*session.servers.values(), *([session.client] if session.client else [])]
                for link in links:
                    link.fail(GoAway.SESSION_CLOSED, f"session {session_id} was {why}")
        for session_id, session_config in fresh.items():
            if session_id not in self.sessions:
                self.sessions[session_id] = Session(session_id)
                self.auth_infos[(session_id, fr.ROLE_PROXY_CLIENT)] = auth_info_for(
                    session_config.proxy_client)
                self.auth_infos[(session_id, fr.ROLE_PROXY_SERVER)] = auth_info_for(
                    session_config.proxy_server)
        self.config = new
        self.limits = new.limits
        for warning in self.warnings():
            self.log.warn("[{index}] {warning}", index=new.index, warning=warning)

    def warnings(self) -> list[str]:
        """Configuration risks worth a warning at start-up."""
        return [
            f"{s.location}: session {s.id} uses the same password for the Proxy-Client and the "
            "Proxy-Server role: a Proxy-Server credential could take the Proxy-Client role"
            for s in self.config.sessions if same_password(s.proxy_client, s.proxy_server)
        ]

    def close_all(self) -> None:
        """Close every link with GOAWAY NORMAL (shutdown)."""
        for link in list(self.links | self.unauthenticated):
            for route in list(link.routes.values()):
                other, other_id = route.other(link)
                other.send_control(fr.build_reset(other_id, Reason.SHUTDOWN,
                                                  "the Gateway is stopping"))
            link.fail(GoAway.NORMAL, "the Gateway is stopping")


class GatewayFactory(ServerFactory):
    """Builds a :class:`GatewayLink` per accepted connection."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def buildProtocol(self, addr: Any) -> GatewayLink:  # noqa: N802
        """A new link."""
        return GatewayLink(self.gateway)


class GatewayService(service.Service):
    """One gateway instance: a listening port per Listener, sharing one Gateway."""

    log = Logger()

    def __init__(self, config: GatewayConfig, reactor: Any) -> None:
        from tcptunnel.ports import ListenerSet

        self.config = config
        self.reactor = reactor
        self.gateway = Gateway(config, reactor)
        self.factory = GatewayFactory(self.gateway)
        # Per listener, its ReloadableServerTls (None for plain TCP).
        self.listeners: ListenerSet[ListenerConfig, Any] = ListenerSet(
            f"[{config.index}] Listener", lambda listener: (listener.ip, listener.port),
            self._open_listener, self._announce_listener)
        # Load certificates now so that a bad one fails start-up with its name.
        self._tls = self._load_tls(config)

    @property
    def ports(self) -> list[Any]:
        """Listening ports, in the order of the Listeners."""
        return self.listeners.ports

    @staticmethod
    def _keys(config: GatewayConfig) -> list[AddressKey]:
        return address_keys([(listener.ip, listener.port) for listener in config.listeners])

    def _load_tls(self, config: GatewayConfig) -> dict[AddressKey, Any]:
        """The CertificateOptions of each TLS Listener (TlsSetupError names a bad file)."""
        from tcptunnel.tls import server_context_factory

        return {key: server_context_factory(listener.tls)
                for listener, key in zip(config.listeners, self._keys(config), strict=True)
                if listener.tls is not None}

    def _open_listener(self, key: AddressKey, listener: ListenerConfig) -> tuple[Any, Any]:
        from tcptunnel.tls import ReloadableServerTls

        options = self._tls.get(key)
        tls = ReloadableServerTls(options) if options is not None else None
        port = listen(self.reactor, listener.ip, listener.port, self.factory,
                      f"[{self.config.index}] Gateway", listener.location, tls)
        return port, tls

    def _announce_listener(self, listener: ListenerConfig, port: Any, tls: Any) -> None:
        index = self.config.index
        self.log.info("[{index}] Gateway listener started on {address} (TLS: {tls})",
                      index=index, address=format_address(listener.ip, port.getHost().port),
                      tls="on" if tls is not None else "off")
        if tls is None:
            self.log.warn("[{index}] Listener {address} is plain TCP: links through it are "
                          "not encrypted", index=index, address=listener.describe())

    def startService(self) -> None:  # noqa: N802
        """Listen on every Listener; a bind failure fails start-up naming the address."""
        for warning in self.gateway.warnings():
            self.log.warn("[{index}] {warning}", index=self.config.index, warning=warning)
        self.listeners.start(self.config.listeners)
        super().startService()

    def apply_config(self, new: GatewayConfig) -> Any:
        """Reload: sessions, limits, listeners and certificates change in place, all or
        nothing.

        Certificates are re-read even when the settings are unchanged (renewals).  Raises
        TlsSetupError, or fails with StartupError when a new Listener cannot listen, before
        changing anything.  Fires with True once applied.
        """
        tls = self._load_tls(new)
        previous, self._tls = self._tls, tls  # what new Listeners open with

        def kept(key: AddressKey, holder: Any, listener: ListenerConfig) -> None:
            if (holder is None) != (key not in tls):
                self.log.warn("[{index}] Listener {address}: switching TLS on or off needs a "
                              "restart", index=new.index, address=listener.describe())
            elif holder is not None:
                holder.update(tls[key])  # renewed certificate for new links

        def applied(_: Any) -> bool:
            self.gateway.update(new)
            self.config = new
            return True

        def failed(reason: Any) -> Any:
            self._tls = previous
            return reason

        return self.listeners.reload(new.listeners, kept).addCallbacks(applied, failed)

    def stopService(self) -> Any:  # noqa: N802
        """Close every link (GOAWAY), then stop listening."""
        super().stopService()
        self.gateway.close_all()
        return self.listeners.stop()
