"""The Gateway: the Twisted adapter around the relay core, login, throttle and service.

Each accepted connection is a :class:`GatewayLink`, a thin adapter that drives a
:class:`tcptunnel._relay.RelayLink`.  Login frames arrive as typed events from the link core;
the login logic here adds what needs a clock and the secrets: the SCRAM exchange
(:mod:`tcptunnel.auth`), the login deadline, the throttle and the unauthenticated-slot limits
(:mod:`tcptunnel.throttle`).  Once a link has logged in, its stream frames go to the sans-IO
:class:`tcptunnel._relay.RelayCore`, which owns sessions and routes and says which links to
write and which to close (``docs/protocol.md`` §6, ``docs/security.md``).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from twisted.application import service
from twisted.internet import defer, interfaces
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcptunnel import _frames as fr
from tcptunnel._frames import GoAway, LinkError, Reason
from tcptunnel._link import (
    AuthProofReceived,
    AuthStartReceived,
    GoAwayReceived,
    LinkState,
)
from tcptunnel._relay import (
    ROLE_NAMES,
    RelayCore,
    RelayLimits,
    RelayLink,
    Route,
    Session,
    StreamEnded,
    StreamFrameReceived,
    kind_label,
    kind_name,
)
from tcptunnel.auth import (
    AuthInfo,
    GatewayAuth,
    LoginFailed,
    auth_info_for,
    decoy_iteration_table,
    same_password,
    scram_username,
)
from tcptunnel.config import (
    GatewayConfig,
    GatewayLimits,
    ListenerConfig,
    format_address,
)
from tcptunnel.mux import LinkProtocol
from tcptunnel.ports import AddressKey, address_keys, listen
from tcptunnel.throttle import LoginThrottle, UnauthenticatedSlots

__all__ = ["ROLE_NAMES", "Gateway", "GatewayFactory", "GatewayLink", "GatewayService", "Route",
           "Session"]

# A link still logging in may not keep its socket after being closed: TLS close_notify and
# unsent bytes get this long, then the connection is aborted.
UNAUTHENTICATED_CLOSE_GRACE = 1.0


def relay_limits(limits: GatewayLimits) -> RelayLimits:
    """The relay's bounds from the configured limits."""
    return RelayLimits(
        max_links_per_session=limits.max_links_per_session,
        max_streams_per_link=limits.max_streams_per_link,
        max_queued_bytes_per_link=limits.max_queued_bytes_per_link,
        max_queued_bytes_per_session=limits.max_queued_bytes_per_session,
        max_queued_bytes=limits.max_queued_bytes,
    )


class LogBudget:
    """A token bucket for log lines about unauthenticated peers: anyone can connect, so
    anyone could otherwise fill the log.  Lines past the budget are counted, and the count is
    reported by the next line that is allowed."""

    def __init__(self, rate: float = 10.0, burst: int = 50) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = 0.0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        """Whether one more line may be logged at ``now``."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """How many lines were suppressed since the last call."""
        count, self.suppressed = self.suppressed, 0
        return count


class GatewayLink(LinkProtocol):
    """One proxy's link at the Gateway: login here, then the relay core routes."""

    log = Logger()
    core: RelayLink

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(gateway.relay.new_link(), gateway.clock,
                         gateway.limits.keepalive_interval, gateway.limits.keepalive_timeout)
        self.core.adapter = self
        self.gateway = gateway
        self.instance_index = gateway.config.index
        self._auth: GatewayAuth | None = None
        self._auth_session_id = 0
        self._auth_role = 0
        self._failure_not_before = 0.0
        self._login_call: interfaces.IDelayedCall | None = None
        self._failure_call: interfaces.IDelayedCall | None = None
        self._slot_host: str | None = None  # holds an unauthenticated slot for this host

    # -- what the status page and tests read ----------------------------------

    @property
    def session(self) -> Session | None:
        """The session this link logged in to."""
        return self.core.session

    @property
    def role(self) -> int | None:
        """fr.ROLE_PROXY_CLIENT / fr.ROLE_PROXY_SERVER once logged in."""
        return self.core.role

    @property
    def role_name(self) -> str:
        """proxy-client / proxy-server / unauthenticated."""
        return self.core.role_name

    @property
    def number(self) -> int:
        """The Proxy-Server's number within its session."""
        return self.core.number

    @property
    def routes(self) -> dict[int, Route]:
        """Streams through this link."""
        return self.core.routes

    @property
    def peer_host(self) -> str:
        """The peer's IP address, for the throttle and the slot limits."""
        peer = self.transport.getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", "?"))

    @property
    def _authenticated(self) -> bool:
        return self.core.role is not None

    def log_allowed(self) -> bool:
        """Log lines about unauthenticated peers share a budget; say what was dropped."""
        if self._authenticated:
            return True
        budget = self.gateway.log_budget
        if not budget.allow(self.clock.seconds()):
            return False
        suppressed = budget.take_suppressed()
        if suppressed:
            self.log.warn("[{index}] {count} log lines about unauthenticated links were "
                          "suppressed (too many)", index=self.gateway.config.index,
                          count=suppressed)
        return True

    # -- life cycle ---------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        """Take an unauthenticated slot (or refuse at once) and start the login deadline."""
        super().connectionMade()
        gateway = self.gateway
        gateway.unauthenticated.add(self)
        host = self.peer_host
        refusal = gateway.slots.acquire(host, self.clock.seconds())
        if refusal is not None:
            gateway.stats["limits_hit", "unauthenticated_links"] += 1
            if self.log_allowed():
                self.log.warn("[{index}] Link {peer}: limit of {limit} reached; closing",
                              index=gateway.config.index, peer=self.peer_description,
                              limit=refusal)
            self.close_reason = f"LIMIT: {refusal}"
            self._refuse(GoAway.BUSY, f"too many unauthenticated links ({refusal})")
            return
        self._slot_host = host
        if self.log_allowed():
            self.log.info("[{index}] Link {peer}: accepted", index=gateway.config.index,
                          peer=self.peer_description)
        self._login_call = self.clock.callLater(gateway.limits.login_timeout, self._login_timeout)

    def _handshake_pending(self) -> bool:
        """Whether the link is TLS and its handshake has not completed (nothing can be said
        to the peer then: the connection can only be aborted)."""
        return interfaces.ISSLTransport.providedBy(self.transport) and not self.tls_description

    def _refuse(self, code: GoAway, message: str) -> None:
        """Close a link that is still logging in, at once: abort it when TLS has not even
        completed its handshake, else GOAWAY with a short grace before the abort."""
        if self._handshake_pending():
            self.gateway.relay.detach(self.core, Reason.LINK_LOST, message)
            self.close_reason = f"{code.name}: {message}"
            self.abort()
            return
        self.fail(code, message, abort_after=UNAUTHENTICATED_CLOSE_GRACE)

    def _login_timeout(self) -> None:
        self._login_call = None
        if self.core.state is not LinkState.READY:
            self._refuse(GoAway.LOGIN_TIMEOUT,
                         f"no login within {self.gateway.limits.login_timeout:g} s")

    def _release_slot(self) -> None:
        """Give the unauthenticated slot back; a link that did not log in keeps it taken
        until its failure could have been answered, so closing early buys no faster guess."""
        if self._slot_host is not None:
            hold = None if self._authenticated else self._failure_not_before
            self.gateway.slots.release(self._slot_host, self.clock.seconds(), hold_until=hold)
            self._slot_host = None
        self.gateway.unauthenticated.discard(self)

    def fail(self, code: GoAway, message: str, abort_after: float | None = None) -> None:
        """Close the link: the relay forgets it at once (its queues stop costing memory),
        then GOAWAY and close."""
        if self._closing:
            return
        self.gateway.relay.detach(self.core, Reason.LINK_LOST,
                                  f"the {self.core.role_name} link was closed ({message})")
        if abort_after is None and not self._authenticated:
            abort_after = UNAUTHENTICATED_CLOSE_GRACE
        super().fail(code, message, abort_after=abort_after)

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """Leave the relay (resetting every route through this link) and log the link's end."""
        closed_here = self._closing
        super().connectionLost(reason)
        for call in (self._login_call, self._failure_call):
            if call is not None and call.active():
                call.cancel()
        self._login_call = self._failure_call = None
        self._release_slot()
        gateway = self.gateway
        gateway.links.discard(self)
        why = self.close_reason if closed_here else reason.getErrorMessage()
        gateway.relay.detach(self.core, Reason.LINK_LOST,
                             f"the {self.core.role_name} link was lost ({why})")
        gateway.apply_effects()
        gateway.drain_progress()
        if self.log_allowed():
            session = self.core.session
            self.log.info(
                "[{index}] Link {peer} ({role}, session {session}): closed after {duration:.1f} "
                "s, {received} bytes in, {sent} bytes out ({why})",
                index=gateway.config.index, peer=self.peer_description, role=self.role_name,
                session=session.id if session is not None else "-",
                duration=self.clock.seconds() - self.connected_at,
                received=self.core.bytes_received, sent=self.bytes_sent, why=why)

    # -- events -------------------------------------------------------------


    def handle_events(self, events: list[object]) -> None:
        """One dispatch per batch: stream frames to the relay, login events to the login
        logic; each handler runs only while the link is open."""
        gateway = self.gateway
        relay = gateway.relay
        core = self.core
        try:
            for event in events:
                if self._closing or core.detached:
                    break
                if type(event) is StreamFrameReceived:
                    relay.stream_frame(core, event.frame)
                elif isinstance(event, GoAwayReceived):
                    # In its place among the frames of the read: what the proxy sent before
                    # its GOAWAY (the last DATA, a FIN, RESET SHUTDOWN) is routed first.
                    relay.detach(core, Reason.LINK_LOST,
                                 f"the {core.role_name} link was closed by its proxy")
                elif isinstance(event, AuthStartReceived):
                    self._auth_start(event)
                elif isinstance(event, AuthProofReceived):
                    self._auth_proof(event)
        except LinkError as e:
            self.fail(e.code, e.message)
        # A retiring link whose last stream this read ended (its FIN, RESET or refusal).
        relay.check_drained(core)
        gateway.apply_effects()

    def resumeProducing(self) -> None:  # noqa: N802
        """As LinkProtocol's; a retiring link may have written its last queued frames."""
        super().resumeProducing()
        if self.core.retiring:
            self.gateway.relay.check_drained(self.core)
            self.gateway.apply_effects()

    def _auth_start(self, event: AuthStartReceived) -> None:
        gateway = self.gateway
        self._auth_role, self._auth_session_id = event.role, event.session_id
        # Counted now, before the outcome is known, so a batch of parallel guesses counts.
        self._failure_not_before = gateway.throttle.attempt(
            self.peer_host, event.session_id, self.clock.seconds())
        self._auth = GatewayAuth(
            gateway.auth_infos.get((event.session_id, event.role)),
            scram_username(event.session_id, event.role), gateway.decoy_secret,
            decoy_iterations=gateway.decoy_iterations.get(event.role, ()))
        try:
            server_first = self._auth.challenge(event.client_first)
        except LoginFailed as e:
            self._login_failed(str(e))
            return
        self.core.queue_control(fr.build_auth_message(fr.FrameType.AUTH_CHALLENGE,
                                                      server_first))

    def _auth_proof(self, event: AuthProofReceived) -> None:
        assert self._auth is not None  # the core takes AUTH_PROOF only after AUTH_START
        try:
            server_final = self._auth.finish(event.client_final)
        except LoginFailed as e:
            self._login_failed(str(e))
            return
        self._login_ok(server_final)

    def _login_failed(self, why: str) -> None:
        """A wrong proof (or a malformed exchange): answered no earlier than the throttle
        allows, the slot held until then; a right one is never delayed."""
        gateway = self.gateway
        gateway.stats["logins_failed", ROLE_NAMES.get(self._auth_role, "?")] += 1
        if self.log_allowed():
            self.log.warn(
                "[{index}] Link {peer}: login failed for session {session} as {role}: {why}",
                index=gateway.config.index, peer=self.peer_description,
                session=self._auth_session_id, role=ROLE_NAMES.get(self._auth_role, "?"),
                why=why)
        delay = self._failure_not_before - self.clock.seconds()
        if delay > 0:
            self._failure_call = self.clock.callLater(delay, self._send_failure)
        else:
            self._send_failure()

    def _send_failure(self) -> None:
        self._failure_call = None
        if self._closing:
            return
        # Detached first (which drops what is still queued), so the AUTH_RESULT stays.
        self.gateway.relay.detach(self.core, Reason.LINK_LOST, "authentication failed")
        self.core.queue_control(fr.build_auth_result(False))
        self.fail(GoAway.AUTH_FAILED, "authentication failed")

    def _login_ok(self, server_final: str) -> None:
        gateway = self.gateway
        relay = gateway.relay
        session_id, role = self._auth_session_id, self._auth_role
        gateway.throttle.succeeded(self.peer_host, session_id, self.clock.seconds())
        if gateway.draining:
            # Proven, so told the truth: log in elsewhere (issue 20).
            self.fail(GoAway.DRAINING, "the Gateway is draining: log in to another")
            return
        refusal = relay.refusal(session_id, role)
        if refusal is not None:
            # Told as what it is: a limit, not a wrong password (no AUTH_RESULT 0).
            self.log.warn("[{index}] Link {peer}: login as {role} of session {session} "
                          "refused: {why}", index=gateway.config.index,
                          peer=self.peer_description, role=ROLE_NAMES.get(role, "?"),
                          session=session_id, why=refusal)
            self.fail(GoAway.LIMIT, refusal)
            return
        gateway.stats["logins_ok", ROLE_NAMES.get(role, "?")] += 1
        if self._login_call is not None and self._login_call.active():
            self._login_call.cancel()
        self._login_call = None
        self._release_slot()
        gateway.links.add(self)
        # AUTH_RESULT before the PARTNER frames that attach queues.
        self.core.queue_control(fr.build_auth_result(True, server_final))
        self.core.mark_ready()
        relay.attach(self.core, session_id, role)
        self.log.info("[{index}] Link {peer}: authenticated for session {session} as {role}",
                      index=gateway.config.index, peer=self.peer_description,
                      session=session_id, role=self.role_name)


class Gateway:
    """Sessions, limits and secrets of one gateway instance (shared by its listeners)."""

    log = Logger()

    def __init__(self, config: GatewayConfig, clock: interfaces.IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.limits: GatewayLimits = config.limits
        # Event counters for /metrics: (name, label...) -> count.
        self.stats: Counter[tuple[str | int, ...]] = Counter()
        self.relay = RelayCore([s.id for s in config.sessions], relay_limits(config.limits),
                               self.stats, clock=clock.seconds)
        self.auth_infos: dict[tuple[int, int], AuthInfo] = {}
        for session in config.sessions:
            self._add_auth_infos(session.id, session)
        self.decoy_secret = os.urandom(32)
        self.decoy_iterations = decoy_iteration_table(self.auth_infos)
        self.throttle = LoginThrottle(login_timeout=config.limits.login_timeout)
        self.slots = UnauthenticatedSlots(config.limits.max_unauthenticated_links,
                                          config.limits.max_unauthenticated_links_per_address)
        self.log_budget = LogBudget()
        # One line per stream end, like an access log; an authenticated Proxy-Server could
        # still open and reset streams as fast as its link carries OPENs: past 100 lines a
        # second (1000 at once) they are counted, not written.
        self.stream_log_budget = LogBudget(rate=100.0, burst=1000)
        self.unauthenticated: set[GatewayLink] = set()
        self.links: set[GatewayLink] = set()
        # Draining (issue 20): no new logins; every link told GOAWAY DRAINING at once, kept
        # until its running streams end, closed at the deadline.
        self.draining = False
        self.drained = False  # draining, and no link left
        self._drain_call: interfaces.IDelayedCall | None = None

    @property
    def sessions(self) -> dict[int, Session]:
        """The relay's sessions (id -> Session)."""
        return self.relay.sessions

    def _add_auth_infos(self, session_id: int, session_config: Any) -> None:
        self.auth_infos[(session_id, fr.ROLE_PROXY_CLIENT)] = auth_info_for(
            session_config.proxy_client)
        self.auth_infos[(session_id, fr.ROLE_PROXY_SERVER)] = auth_info_for(
            session_config.proxy_server)

    def log_ended(self, ended: list[StreamEnded]) -> None:
        """One line per stream that ended: its session, Proxy-Server and stream id, kind,
        how it ended, how long it ran and the bytes relayed each way.  A sealed stream says
        end-to-end encrypted and names no target: the Gateway cannot know it."""
        budget = self.stream_log_budget
        now = self.clock.seconds()
        for item in ended:
            if not budget.allow(now):
                continue
            suppressed = budget.take_suppressed()
            if suppressed:
                self.log.warn("[{index}] {count} stream log lines were suppressed (too many)",
                              index=self.config.index, count=suppressed)
            route = item.route
            session = route.server.session
            label = kind_label(route.kind)
            what = (f"{label} stream to {route.target}" if route.target is not None
                    else f"{label} stream")
            how = item.how if item.how == "closed" else f"{item.how} ({item.reason})"
            self.log.info(
                "[{index}] Session {session}, Proxy-Server #{server}, stream {stream}: {what} "
                "{how} after {duration:.1f} s, {to_client} bytes to the Proxy-Client, "
                "{to_server} bytes back",
                index=self.config.index, session=session.id if session is not None else "-",
                server=route.server.number, stream=route.server_stream, what=what, how=how,
                kind=kind_name(route.kind), end_to_end=route.sealed, target=route.target,
                ended=item.how, reason=item.reason, duration=now - route.opened_at,
                to_client=route.bytes_to_client, to_server=route.bytes_to_server,
                event="gateway_stream_ended")

    def apply_effects(self) -> None:
        """Carry out what the relay decided: log the streams that ended, close the links it
        failed, write the others."""
        relay = self.relay
        while True:
            self.log_ended(relay.take_ended())
            failed = relay.take_failed()
            for link, code, message in failed:
                adapter = link.adapter
                if isinstance(adapter, GatewayLink):
                    adapter.fail(code, message)
            dirty = relay.take_dirty()
            for link in dirty:
                adapter = link.adapter
                if isinstance(adapter, GatewayLink):
                    adapter.flush()
                    relay.check_unsent(link)
                    relay.check_drained(link)  # a retiring link's last frames are written
            if not failed and not dirty:
                return

    def update(self, new: GatewayConfig) -> None:
        """Apply reloaded sessions and limits; close links of removed or changed sessions."""
        old = {s.id: s for s in self.config.sessions}
        fresh = {s.id: s for s in new.sessions}
        for session_id, session_config in old.items():
            replacement = fresh.get(session_id)
            if replacement is None:
                self.log.info("[{index}] Session {session} removed on reload: closing its links",
                              index=new.index, session=session_id)
                for role in (fr.ROLE_PROXY_CLIENT, fr.ROLE_PROXY_SERVER):
                    self.auth_infos.pop((session_id, role), None)
                self.relay.remove_session(session_id, f"session {session_id} was removed")
                continue
            # A changed password closes the links of that role only.
            for role, before, after in (
                    (fr.ROLE_PROXY_CLIENT, session_config.proxy_client, replacement.proxy_client),
                    (fr.ROLE_PROXY_SERVER, session_config.proxy_server, replacement.proxy_server)):
                if before == after:
                    continue
                self.log.info("[{index}] Session {session}: the {role} password changed on "
                              "reload: closing those links", index=new.index,
                              session=session_id, role=ROLE_NAMES[role])
                self.auth_infos[(session_id, role)] = auth_info_for(after)
                self.relay.close_role(session_id, role,
                                      f"the {ROLE_NAMES[role]} password of session "
                                      f"{session_id} changed")
        for session_id, session_config in fresh.items():
            if session_id not in self.relay.sessions:
                self.relay.add_session(session_id)
                self._add_auth_infos(session_id, session_config)
        self.decoy_iterations = decoy_iteration_table(self.auth_infos)
        if new.limits.login_timeout != self.limits.login_timeout:
            # The throttle's longest delay must stay below the (new) login deadline.
            self.throttle = LoginThrottle(login_timeout=new.limits.login_timeout)
        self.config = new
        self.limits = new.limits
        self.relay.limits = relay_limits(new.limits)
        self.slots.total = new.limits.max_unauthenticated_links
        self.slots.per_address = new.limits.max_unauthenticated_links_per_address
        self.apply_effects()
        for warning in self.warnings():
            self.log.warn("[{index}] {problem}", index=new.index, problem=warning)

    def warnings(self) -> list[str]:
        """Configuration risks worth a warning at start-up (the reader's, then ours)."""
        return list(self.config.warnings) + [
            f"{s.location}: session {s.id} uses the same password for the Proxy-Client and the "
            "Proxy-Server role: a Proxy-Server credential could take the Proxy-Client role"
            for s in self.config.sessions if same_password(s.proxy_client, s.proxy_server)
        ]

    def drain(self) -> None:
        """Stop taking logins and move every session to another Gateway at once, letting
        running streams finish here (make-before-break, as h2's GOAWAY).

        Every logged-in link is told GOAWAY DRAINING now (:meth:`RelayCore.retire`): its
        proxy logs in elsewhere with a new link at once and opens new streams there, while
        this link keeps carrying its running streams both ways; it is closed when its last
        stream ended, a link without streams at once.  At the deadline (``drainTimeout``)
        the links left are closed, their streams reset SHUTDOWN.  Links still logging in are
        told DRAINING once they have proven their password."""
        if self.draining:
            return
        self.draining = True
        timeout = self.limits.drain_timeout
        links = sorted(self.links, key=lambda link: link.connected_at)
        self.log.info("[{index}] Draining: no new logins; {sessions} sessions move to another "
                      "Gateway now; {streams} running streams may finish here (at most "
                      "{timeout:g} s)", index=self.config.index, timeout=timeout,
                      sessions=sum(1 for s in self.relay.sessions.values() if s.links),
                      streams=sum(len(link.routes) for link in links
                                  if link.role == fr.ROLE_PROXY_SERVER))
        for link in links:
            self.relay.retire(link.core, "the Gateway is draining: log in to another one; "
                              "the streams running on this link may finish")
        self.apply_effects()
        self._drain_call = self.clock.callLater(timeout, self._drain_deadline)
        self.drain_progress()

    def drain_progress(self) -> None:
        """A link of a draining Gateway closed: say so once none is left."""
        if not self.draining or self.links or self.drained:
            return
        self.drained = True
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        self.log.info("[{index}] Drained: no links left", index=self.config.index)

    def _drain_deadline(self) -> None:
        self._drain_call = None
        timeout = self.limits.drain_timeout
        for session in self.relay.sessions.values():
            links = session.all_links()
            if not links:
                continue
            streams = sum(len(link.routes) for link in links
                          if link.role == fr.ROLE_PROXY_SERVER)
            self.log.warn("[{index}] Draining: session {session} still has {streams} streams "
                          "after {timeout:g} s: closing them", index=self.config.index,
                          session=session.id, timeout=timeout, streams=streams)
            message = f"the Gateway's drain deadline ({timeout:g} s) passed"
            for link in links:
                self.relay.detach(link, Reason.SHUTDOWN, message)
            self.apply_effects()
            for link in links:
                if isinstance(link.adapter, GatewayLink):
                    link.adapter.fail(GoAway.DRAINING, message)

    def close_all(self) -> None:
        """Close every link with GOAWAY NORMAL (shutdown); streams are reset SHUTDOWN."""
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        for link in list(self.links | self.unauthenticated):
            self.relay.detach(link.core, Reason.SHUTDOWN, "the Gateway is stopping")
        self.apply_effects()
        for link in list(self.links | self.unauthenticated):
            link.fail(GoAway.NORMAL, "the Gateway is stopping")


class GatewayFactory(ServerFactory):
    """Builds a :class:`GatewayLink` per accepted connection."""

    noisy = False  # no "Starting factory <... at 0x...>": GatewayService logs its listeners

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
        # Per WebSocket Listener, its GatewayWebSocketFactory (reloads update it in place).
        self._websockets: dict[AddressKey, Any] = {}
        # Per Listener with acceptProxyProtocol, its ProxyHeaderFactory (reloads update it).
        self._proxy_headers: dict[AddressKey, Any] = {}

    @property
    def ports(self) -> list[Any]:
        """Listening ports, in the order of the Listeners."""
        return self.listeners.ports

    @staticmethod
    def _keys(config: GatewayConfig) -> list[AddressKey]:
        return address_keys([(listener.ip, listener.port) for listener in config.listeners])

    def _load_tls(self, config: GatewayConfig) -> dict[AddressKey, Any]:
        """The CertificateOptions of each TLS Listener (TlsSetupError names a bad file)."""
        from tcptunnel.tls import listener_context_factory

        return {key: listener_context_factory(listener)
                for listener, key in zip(config.listeners, self._keys(config), strict=True)
                if listener.tls is not None}

    def _open_listener(self, key: AddressKey, listener: ListenerConfig) -> tuple[Any, Any]:
        from tcptunnel.tls import ALPN_HTTP_1_1, ALPN_PROTOCOL, ReloadableServerTls

        options = self._tls.get(key)
        alpn = ALPN_PROTOCOL if listener.websocket_path is None else ALPN_HTTP_1_1
        tls = ReloadableServerTls(options, alpn) if options is not None else None
        factory: Any = self.factory
        if listener.websocket_path is not None:
            from tcptunnel.websocket import GatewayWebSocketFactory  # imports autobahn

            factory = GatewayWebSocketFactory(
                self.factory, listener.websocket_path, listener.trusted_proxies,
                self.gateway.limits.login_timeout, self.reactor,
                max_pending=self.gateway.limits.max_unauthenticated_links)
            self._websockets[key] = factory
        layered_tls = tls  # TLS that listen() adds; inside the PROXY header reader if any
        if listener.accept_proxy_protocol:
            factory, layered_tls = self._proxy_header_factory(key, listener, factory, tls), None
        port = listen(self.reactor, listener.ip, listener.port, factory,
                      f"[{self.config.index}] Gateway", listener.location, layered_tls)
        return port, tls

    def _proxy_header_factory(self, key: AddressKey, listener: ListenerConfig, factory: Any,
                              tls: Any) -> Any:
        """The PROXY header reader outside the Listener's TLS (the header comes before the
        handshake), so every link's getPeer() is the client named in the header."""
        from tcptunnel.proxyheader import ProxyHeaderFactory
        from tcptunnel.tls import tls_factory

        inner = tls_factory(tls, factory, is_client=False) if tls is not None else factory
        gateway = self.gateway
        outer = ProxyHeaderFactory(
            inner, listener.accept_proxy_protocol, self.reactor,
            f"[{self.config.index}] Listener {listener.describe()}",
            timeout=gateway.limits.login_timeout,
            max_pending=gateway.limits.max_unauthenticated_links,
            log_allowed=lambda: gateway.log_budget.allow(self.reactor.seconds()))
        self._proxy_headers[key] = outer
        return outer

    def _announce_listener(self, listener: ListenerConfig, port: Any, tls: Any) -> None:
        index = self.config.index
        self.log.info("[{index}] Gateway listener started on {address} (TLS: {tls}{ws})",
                      index=index, address=format_address(listener.ip, port.getHost().port),
                      tls="on" if tls is not None else "off",
                      ws=f", WebSocket: {listener.websocket_path}"
                      if listener.websocket_path is not None else "")
        if tls is None and listener.websocket_path is not None:
            self.log.info("[{index}] Listener {address} is plain WebSocket: links are "
                          "encrypted only if a reverse proxy in front terminates TLS",
                          index=index, address=listener.describe())
        elif tls is None:
            self.log.warn("[{index}] Listener {address} is plain TCP: links through it are "
                          "not encrypted", index=index, address=listener.describe())

    def startService(self) -> None:  # noqa: N802
        """Listen on every Listener; a bind failure fails start-up naming the address."""
        for warning in self.gateway.warnings():
            # "problem", not "warning": legacy observers take that for a Python warning.
            self.log.warn("[{index}] {problem}", index=self.config.index, problem=warning)
        if self.config.drain:
            # Restarted while drain="true" is set: it stays out of service (no Listener).
            self.log.warn("[{index}] drain=\"true\" is set: not listening (remove it and "
                          "restart to take logins again)", index=self.config.index)
            self.gateway.drain()
        else:
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
            websocket = self._websockets.get(key)
            if (websocket is None) != (listener.websocket_path is None):
                self.log.warn("[{index}] Listener {address}: switching webSocketPath on or "
                              "off needs a restart", index=new.index,
                              address=listener.describe())
            elif websocket is not None:
                websocket.update(listener.websocket_path, listener.trusted_proxies,
                                 new.limits.max_unauthenticated_links)
            headers = self._proxy_headers.get(key)
            if (headers is None) != (not listener.accept_proxy_protocol):
                self.log.warn("[{index}] Listener {address}: switching acceptProxyProtocol on "
                              "or off needs a restart", index=new.index,
                              address=listener.describe())
            elif headers is not None:
                headers.trusted = listener.accept_proxy_protocol

        def applied(_: Any) -> Any:
            self.gateway.update(new)
            self.config = new
            if new.drain and not self.gateway.draining:
                self.log.info("[{index}] drain=\"true\" set by the reload",
                              index=new.index)
                return defer.maybeDeferred(self.drain).addCallback(lambda _: True)
            if not new.drain and self.gateway.draining:
                self.log.warn("[{index}] Still draining: a drained Gateway takes logins again "
                              "only after a restart", index=new.index)
            return True

        def failed(reason: Any) -> Any:
            self._tls = previous
            return reason

        return self.listeners.reload(new.listeners, kept).addCallbacks(applied, failed)

    def drain(self) -> Any:
        """SIGUSR2 (issue 20): stop listening (a balancer's health check sees the Gateway
        gone, and new connections go elsewhere), then :meth:`Gateway.drain`.  Fires when
        the listeners are closed."""
        if self.gateway.draining:
            return None
        self.log.info("[{index}] Draining: closing the listeners", index=self.config.index)
        closed = self.listeners.stop()
        self.gateway.drain()
        return closed

    def stopService(self) -> Any:  # noqa: N802
        """Close every link (GOAWAY), then stop listening."""
        super().stopService()
        self.gateway.close_all()
        for headers in self._proxy_headers.values():
            headers.abort_waiting()  # connections whose PROXY header has not come yet
        return self.listeners.stop()
