"""The link a proxy keeps to the Gateway: connect, log in, keep alive, reconnect.

Shared by the Proxy-Server and the Proxy-Client.  A
``ReconnectingClientFactory`` with a short cap (30 s by default instead of
Twisted's hour) redials after any loss; its backoff is reset only after a
successful login; a rejected login (or a limit) waits the longest delay, while a Gateway that
does not answer is asked again every few seconds (``ProxyLinkFactory``).
"""

from __future__ import annotations

import dataclasses
import random
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

from service_identity import CertificateError, VerificationError
from twisted.application import service
from twisted.internet import interfaces
from twisted.internet.protocol import ClientFactory, Protocol, ReconnectingClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcptunnel import _frames as fr
from tcptunnel import _mux
from tcptunnel._frames import FrameType, GoAway, Reason
from tcptunnel._link import (
    AuthChallengeReceived,
    AuthResultReceived,
    GoAwayReceived,
    LinkState,
    PartnerChanged,
)
from tcptunnel.auth import LoginFailed, ProxyAuth
from tcptunnel.config import GatewayAddress, ProxyConfig, format_address
from tcptunnel.mux import MuxProtocol, MuxStream, StreamEndpoint
from tcptunnel.sockets import connect_tcp
from tcptunnel.tlslink import TLS_ERRORS, is_name_mismatch

if TYPE_CHECKING:
    from tcptunnel.e2e import EndToEnd


# A link the Gateway drains (GOAWAY DRAINING, issue 20) keeps its running streams while a
# new link takes the new ones; the Gateway closes it when they ended, at its drainTimeout at
# the latest (60 s by default).  A Gateway that never does (a bug, or hostile) cannot keep it
# for ever: the proxy closes a draining link after this long, resetting what still runs
# (docs/scaling.md).  An hour: above any sensible drainTimeout, below "for ever".
MAX_DRAINING = 3600.0
# A link told DRAINING less than this long after its login reconnects after the normal
# backoff, not at once: a Gateway that drains every link as soon as it logs in must not
# make the proxy log in again and again as fast as it can.
DRAIN_RECONNECT_MIN_AGE = 1.0

# A proxy that failed over to a later <Gateway> asks the first one again this often, and
# goes back to it once it answers (issue 20, docs/scaling.md): every proxy of a session
# has the same list, so they meet again on the first within one interval.
FAILBACK_INTERVAL = 30.0


class _FailbackProbe(ClientFactory):
    """A TCP connect to the first Gateway, closed at once: does it answer again?  Through
    the outbound proxy when there is one (:meth:`ProxyService._dial`): the tunnel to the
    Gateway opened is the answer, a refusal by the outbound proxy (its 502, a SOCKS
    "connection refused") is "still down"."""

    noisy = False

    def __init__(self, proxy: ProxyService) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        """Close as soon as connected, and report the Gateway back."""
        proxy = self.proxy

        class Probe(Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                assert self.transport is not None
                self.transport.abortConnection()  # type: ignore[attr-defined]
                proxy.first_gateway_back()

        return Probe()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:  # noqa: N802
        """Still down."""
        self.proxy.first_gateway_still_down()


class ProxyLink(MuxProtocol):
    """A proxy's link: login with SCRAM, then streams."""

    log = Logger()

    def __init__(self, proxy: ProxyService) -> None:
        config = proxy.config
        core = _mux.MuxConnection(opener=config.role == "proxy-server",
                                  initial_window=proxy.initial_window,
                                  max_window=config.max_window)
        super().__init__(core, proxy.reactor, config.keepalive_interval, config.keepalive_timeout)
        self.proxy = proxy
        self.instance_index = config.index
        role = fr.ROLE_PROXY_SERVER if config.role == "proxy-server" else fr.ROLE_PROXY_CLIENT
        assert config.password.cleartext is not None
        self._auth = ProxyAuth(config.session_id, role, config.password.cleartext)
        self._role = role
        self._login_call: interfaces.IDelayedCall | None = None
        self._rejected = False
        self.partners = 0
        # Where it leads (the Gateway of the try that built it) and when it logged in.
        self.gateway = proxy.gateway_address
        self.logged_in_at: float | None = None
        # Since when the Gateway drains it (GOAWAY DRAINING): no new streams on it, its
        # running ones finish; None while it is the proxy's link for new streams.
        self.draining_since: float | None = None

    @property
    def draining(self) -> bool:
        """Whether the Gateway drains this link (it carries only the streams it had)."""
        return self.draining_since is not None

    def connectionMade(self) -> None:  # noqa: N802
        """Send HELLO and AUTH_START at once; the login must finish before the deadline."""
        super().connectionMade()
        self.log.info("[{index}] Connected to the Gateway {gateway}; logging in to session "
                      "{session} as {role}", index=self.proxy.config.index,
                      gateway=self.proxy.gateway_address, session=self.proxy.config.session_id,
                      role=self.proxy.config.role)
        self.core.queue_control(fr.build_auth_start(self._role, self.proxy.config.session_id,
                                                    self._auth.start()))
        self._login_call = self.clock.callLater(self.proxy.config.keepalive_timeout,
                                                self._login_timeout)
        self.flush()

    def open_stream(self, host: str, port: int, endpoint: StreamEndpoint,
                    kind: int = fr.KIND_TCP,
                    fields: tuple[tuple[int, bytes], ...] = ()) -> MuxStream:
        """As MuxProtocol's; with endToEndPassword the stream is sealed (tcptunnel.e2e) or
        refused with StreamError, never opened in clear."""
        e2e = self.proxy.e2e
        stream = e2e.open_stream(self, host, port, endpoint, kind, fields) if e2e else None
        if stream is not None:
            return stream
        return super().open_stream(host, port, endpoint, kind, fields)

    def attach_stream(self, stream_id: int, endpoint: StreamEndpoint) -> MuxStream:
        """As MuxProtocol's; a sealed OPEN gets its SealedStream (tcptunnel.e2e)."""
        e2e = self.proxy.e2e
        stream = e2e.attach_stream(self, stream_id, endpoint) if e2e else None
        if stream is not None:
            return stream
        return super().attach_stream(stream_id, endpoint)

    def _login_timeout(self) -> None:
        self._login_call = None
        if self.core.state is not LinkState.READY:
            self.fail(GoAway.LOGIN_TIMEOUT, "the Gateway did not complete the login in time")

    def handle_link_event(self, event: object) -> None:
        """Login frames and partner changes (in wire order among the stream events; a login
        failure closes the link before any later event of the same read is acted on)."""
        if isinstance(event, AuthChallengeReceived | AuthResultReceived):
            self._auth_event(event)
        elif isinstance(event, PartnerChanged):
            self.partners = event.count
            self.proxy.partner_changed(self, event.count)

    def _auth_event(self, event: AuthChallengeReceived | AuthResultReceived) -> None:
        try:
            if isinstance(event, AuthChallengeReceived):
                self.core.queue_control(fr.build_auth_message(
                    FrameType.AUTH_PROOF, self._auth.proof(event.server_first)))
            elif not event.ok:
                self._login_rejected()
                self.fail(GoAway.AUTH_FAILED, "the Gateway rejected the login")
            else:
                self._auth.verify(event.server_final)
                self._logged_in()
        except LoginFailed as e:
            self._login_rejected()
            self.fail(GoAway.AUTH_FAILED, str(e))

    def _login_rejected(self) -> None:
        # AUTH_RESULT 0 and the GOAWAY AUTH_FAILED after it are one rejection.
        if not self._rejected:
            self._rejected = True
            self.proxy.login_rejected()

    def _logged_in(self) -> None:
        if self._login_call is not None and self._login_call.active():
            self._login_call.cancel()
        self._login_call = None
        self.logged_in_at = self.clock.seconds()
        self.core.mark_ready()
        # Logged with the partner count that follows at once (ProxyService.partner_changed).
        self.proxy.link_ready(self)

    def handle_go_away(self, event: GoAwayReceived) -> None:
        """Log why the Gateway closes the link; a first DRAINING makes it a draining link."""
        if self.draining:
            # The end of a draining link is no news for the reconnects (a new link runs).
            if self.streams:
                self.reset_all_streams(Reason.SHUTDOWN, f"the draining Gateway closed the "
                                       f"link ({event.code.name}: {event.message})")
            self.log.info("[{index}] The Gateway {gateway} closes the draining link: {code} "
                          "({why})", index=self.proxy.config.index, gateway=self.gateway,
                          code=event.code.name, why=event.message)
            return
        if not event.final:  # DRAINING after the login: the link stays for its streams
            self.log.info("[{index}] The Gateway {gateway} is draining ({why}): new streams "
                          "go to a new link; the {count} running on this one may finish",
                          index=self.proxy.config.index, gateway=self.gateway,
                          why=event.message, count=len(self.streams))
            self.proxy.link_draining(self)
            return
        if event.code is GoAway.AUTH_FAILED:
            self._login_rejected()
        elif event.code is GoAway.LIMIT:
            # A limit, not a wrong password; asking again at once would meet it again.
            self.proxy.stats["limits_hit",] += 1
            self.proxy.factory.wait_longest()
        elif event.code is GoAway.BUSY:
            # Too many links logging in at the Gateway right now (a reconnect storm):
            # the normal short backoff, not the longest wait.
            self.proxy.stats["limits_hit",] += 1
        elif event.code is GoAway.REPLACED:
            # Another Proxy-Client took the session.  Coming straight back
            # would only throw it out again: wait the longest delay.
            self.proxy.factory.wait_longest()
        elif event.code is GoAway.DRAINING:
            # Told while logging in: the Gateway is going away on purpose; the next one in
            # the list (or, behind a balancer, the same address, which leads elsewhere).
            self.proxy.gateway_draining()
        # Not "message": legacy log observers take that field for the event's own text.
        self.log.warn("[{index}] The Gateway closes the link: {code} ({why})",
                      index=self.proxy.config.index, code=event.code.name, why=event.message)

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:  # noqa: N802, B008
        """Reset every stream and let the factory reconnect."""
        if self._login_call is not None and self._login_call.active():
            self._login_call.cancel()
        closed_here = self._closing
        super().connectionLost(reason)
        if closed_here:
            why = self.close_reason
        elif (reason.check(VerificationError, CertificateError) is not None
              or is_name_mismatch(reason.value)):
            # service_identity's (the standard library's, on its TLS): the certificate is
            # valid but names another host, or no host at all (no SAN: CertificateError).
            why = (f"the Gateway's certificate does not name "
                   f"{self.proxy.config.server_name or self.proxy.config.host!r} "
                   f"({reason.value}): check serverName (or host) against the certificate")
        elif reason.check(*TLS_ERRORS) is not None:
            why = (f"TLS handshake with the Gateway failed ({reason.getErrorMessage()}): the "
                   "Gateway did not answer with TLS (plain Listener?) or its certificate did "
                   "not verify (check caFile, serverName, certificatePin)")
        else:
            why = reason.getErrorMessage()
        self.proxy.link_lost(self, why)


class ProxyLinkFactory(ReconnectingClientFactory):
    """Reconnects with capped exponential backoff and jitter, capped by why the last try ended.

    A Gateway that refuses connections (or does not answer) costs nothing to ask again, and it
    should be found again within seconds of coming back: the wait stays under
    ``REFUSED_MAX_DELAY``.  A refused login, a limit or a newer Proxy-Client would only be
    refused again: those wait the configured longest delay (``maxRetryDelay``).  A link that
    was logged in and is lost starts again from ``initialDelay``.
    """

    log = Logger()
    noisy = False  # we log each retry ourselves, once, with its reason and delay
    initialDelay = 1.0  # noqa: N815 - Twisted attribute names
    factor = 1.6
    jitter = 0.2
    REFUSED_MAX_DELAY = 3.0

    def __init__(self, proxy: ProxyService) -> None:
        self.proxy = proxy
        self.long_delay = float(proxy.config.max_retry_delay)
        self.maxDelay = min(self.long_delay, self.REFUSED_MAX_DELAY)  # type: ignore[assignment]
        self.clock = proxy.reactor
        self.delay = self.initialDelay
        self.last_wait = 0.0  # the wait before the try now scheduled
        self._refused_login = False
        self.retry_now = False  # the next try without a wait (a draining Gateway)
        # Connectors of draining links (issue 20): their loss is not retried (one or two at
        # most: the draining link's, and an older one whose close is under way).
        self._drained_connectors: list[Any] = []

    def buildProtocol(self, addr: Any) -> ProxyLink:  # noqa: N802
        """A new link (the backoff is reset only after login)."""
        link = ProxyLink(self.proxy)
        link.factory = self
        return link

    def retry(self, connector: Any = None) -> None:
        """Connect again after the current delay, then grow it (Twisted's ``retry``, with the
        jitter drawn uniformly within ±``jitter`` of the delay and not carried into the next
        one: Twisted's normal-distributed jitter can exceed the cap without bound and drifts)."""
        if not self.continueTrying:
            return
        # ``connector`` is not reused: each try dials through a new one (ProxyService.connect).
        self.retries += 1
        self.last_wait = self.delay * random.uniform(1 - self.jitter, 1 + self.jitter)
        if self.retry_now:
            self.retry_now = False
            self.last_wait = 0.0

        def reconnector() -> None:
            self._callID = None
            # A new connector per try: the target may have changed (failover, issue 20).
            self.proxy.connect()

        clock: Any = self.clock
        self._callID = clock.callLater(self.last_wait, reconnector)
        self.delay = min(self.delay * self.factor, self.maxDelay)

    def connect_beside(self, connector: Any) -> None:
        """Make-before-break: connect a new link now (or after the backoff, see ``retry``)
        while the connection of ``connector`` stays open for its streams and is forgotten.

        ReconnectingClientFactory connects again only from clientConnectionLost/Failed, one
        connection at a time.  Here the draining connection's connector is remembered (its
        loss, in clientConnectionLost, is then not retried) and ``retry()`` is called at
        once; our retry() dials through a fresh connector (ProxyService.connect) instead of
        reusing the old one, so both connections coexist, and the factory goes on handling
        the new one's ends as usual."""
        if connector is not None:
            self._drained_connectors.append(connector)
        self.retry(connector)

    def _drained(self, connector: Any) -> bool:
        """Whether ``connector`` carried a draining link (forgotten now)."""
        for index, drained in enumerate(self._drained_connectors):
            if drained is connector:
                del self._drained_connectors[index]
                return True
        return False

    def wait_longest(self) -> None:
        """The Gateway refused the login (or a limit, or replaced us): retry only after the
        longest delay, whatever ends the next tries, until a login succeeds."""
        self._refused_login = True
        self.delay = self.maxDelay = self.long_delay  # type: ignore[assignment]
        if self._callID is not None and self._callID.active():
            # A retry was scheduled before we knew (the close came first): move it.
            self._callID.reset(self.long_delay * random.uniform(1 - self.jitter, 1 + self.jitter))

    def resetDelay(self) -> None:  # noqa: N802
        """A login succeeded: the next loss retries soon again."""
        super().resetDelay()
        self._refused_login = False
        self.maxDelay = min(self.long_delay, self.REFUSED_MAX_DELAY)  # type: ignore[assignment]

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:  # noqa: N802
        """Nothing answered: retry soon (the short cap), saying so once; the next try goes
        to the next Gateway of the list."""
        if not self._refused_login:
            self.maxDelay = min(self.long_delay, self.REFUSED_MAX_DELAY)  # type: ignore[assignment]
        failed = self.proxy.gateway_address
        self.proxy.target_failed()
        super().clientConnectionFailed(connector, reason)
        self.log.warn("[{index}] Unable to connect to the Gateway {gateway}: {why}; retrying "
                      "in {delay:.1f} s", index=self.proxy.config.index,
                      gateway=failed,
                      why=reason.getErrorMessage().rstrip("."),
                      delay=self.last_wait)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:  # noqa: N802
        """Retry (the link already logged why it ended), saying when; a link that never
        logged in (TLS failed, the Gateway closed it) moves on to the next Gateway.  The end
        of a draining link's connection is not retried: a new link was started when the
        Gateway said DRAINING (:meth:`ProxyService.link_draining`)."""
        if self._drained(connector):
            return
        if not self.proxy.logged_in_since_connect:
            self.proxy.target_failed()
        super().clientConnectionLost(connector, reason)
        if self.continueTrying:
            self.log.info("[{index}] Reconnecting to the Gateway {gateway} in {delay:.1f} s",
                          index=self.proxy.config.index, gateway=self.proxy.gateway_address,
                          delay=self.last_wait)


class ProxyService(service.MultiService):
    """What both proxy roles share: the link to the Gateway and its state."""

    log = Logger()

    def __init__(self, config: ProxyConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.initial_window = config.initial_window
        self.reactor = reactor
        self.gateway_address = format_address(config.host, config.port) + (
            f" via the {'HTTP' if config.outbound_proxy.scheme == 'http' else 'SOCKS5'} proxy "
            f"{config.outbound_proxy.describe()}" if config.outbound_proxy is not None else "")
        self.link: ProxyLink | None = None
        self.link_since = 0.0
        # The link and partner count partner_changed logged last.
        self._partners_logged: tuple[weakref.ref[ProxyLink], int] | None = None
        # Event counters for /metrics: (name, label...) -> count.
        self.stats: Counter[tuple[str, ...]] = Counter()
        self.factory = ProxyLinkFactory(self)
        # End-to-end encryption (issue 16): pairing and sealing, or None (streams in clear).
        from tcptunnel.e2e import end_to_end

        self.e2e: EndToEnd | None = end_to_end(self)
        self._connecting_factory: Any = self._link_stack(config)
        self._connector: Any = None
        # The Gateways to try, in order: host/port, then each <Gateway> (issue 20).
        self.targets: list[GatewayAddress] = [
            GatewayAddress(config.host, config.port, config.server_name, config.location,
                           config.websocket_path),
            *config.gateways]
        self.target_index = 0
        self._stacks: dict[int, Any] = {0: self._connecting_factory}
        self.logged_in_since_connect = False
        self._moved_since_connect = False  # the target was advanced for this connection
        self.failback_interval = FAILBACK_INTERVAL
        self._failback_call: interfaces.IDelayedCall | None = None
        # Make-before-break (issue 20): the link the Gateway drains, kept for its running
        # streams while self.link takes the new ones; at most one (a second DRAINING closes
        # the older), and for at most max_draining seconds.
        self.draining_link: ProxyLink | None = None
        self.max_draining = MAX_DRAINING
        self._draining_call: interfaces.IDelayedCall | None = None

    def _link_stack(self, config: ProxyConfig) -> Any:
        """What connectTCP is given: the link factory, wrapped in a WebSocket and then TLS
        when configured (TCP -> [outbound proxy] -> [TLS] -> [WebSocket] -> link)."""
        stack: Any = self.factory
        if config.websocket_path is not None:
            from tcptunnel.websocket import ProxyWebSocketFactory, websocket_url  # autobahn

            url = websocket_url(config.use_tls, config.server_name or config.host,
                                config.port, config.websocket_path)
            stack = ProxyWebSocketFactory(self.factory, url, config.connect_timeout,
                                          self.reactor)
        if config.use_tls:
            from tcptunnel.tls import proxy_connection_creator, tls_factory

            creator = proxy_connection_creator(config)
            stack = tls_factory(creator, stack, is_client=True)
        return stack

    @property
    def partner_available(self) -> bool:
        """Whether a logged-in link reports at least one partner."""
        return self.link is not None and self.link.partners > 0

    def link_ready(self, link: ProxyLink) -> None:
        """Login succeeded: reset the backoff."""
        self.link = link
        self.link_since = self.reactor.seconds()
        self.stats["logins_ok",] += 1
        self.factory.resetDelay()
        self.logged_in_since_connect = True
        self._schedule_failback()
        if self.e2e is not None:
            self.e2e.link_ready(link)

    def login_rejected(self) -> None:
        """Wait the longest delay before the next try."""
        self.stats["logins_failed",] += 1
        self.factory.wait_longest()
        self.log.error("[{index}] Authentication failed for session {session}: check the "
                       "session id and password", index=self.config.index,
                       session=self.config.session_id)

    def partner_changed(self, link: ProxyLink, count: int) -> None:
        """Log partner availability: with the login the first time a link hears it (the
        Gateway tells each link its count right after AUTH_RESULT), then each real change.
        A draining link's counts are not the session's any more: ignored."""
        if link.draining:
            return
        logged = self._partners_logged
        self._partners_logged = (weakref.ref(link), count)  # a lost link may go
        if logged is None or logged[0]() is not link:
            self.log.info("[{index}] Authentication succeeded: session {session} as {role}, "
                          "partner available: {yes} ({count})", index=self.config.index,
                          session=self.config.session_id, role=self.config.role,
                          yes="yes" if count else "no", count=count)
        elif logged[1] != count:
            self.log.info("[{index}] Partner available: {yes} ({count})",
                          index=self.config.index, yes="yes" if count else "no", count=count)
        if self.e2e is not None:
            self.e2e.partner_changed(link, count)

    def link_lost(self, link: ProxyLink, why: str) -> None:
        """Forget the link; the factory reconnects (a draining link's end is not a lost
        link: a new one runs already)."""
        if link.draining:
            self._draining_ended(link, why)
            return
        if self.link is link:
            self.link = None
            self.stats["links_lost",] += 1
            self.stats["window_stalls",] += link.core.blocked_sent
        if self.e2e is not None:
            self.e2e.link_lost(link)
        if self.running:
            self.log.warn("[{index}] Link to the Gateway lost ({why}); reconnecting",
                          index=self.config.index, why=why)

    # -- draining (issue 20): make-before-break --------------------------------------

    def link_draining(self, link: ProxyLink) -> None:
        """The Gateway drains ``link`` (GOAWAY DRAINING after the login): it keeps its running
        streams, both ways, until the Gateway closes it; new streams (Bindings, UDP flows, a
        new end-to-end pairing) wait for a new link, started now, to the next Gateway of the
        list or the same address behind a balancer (ProxyLinkFactory.connect_beside says how
        a second connection runs beside the first)."""
        if link is not self.link or link.draining:
            return
        now = self.reactor.seconds()
        older = self.draining_link
        if older is not None:
            # At most one draining link: the new link's Gateway drains too.
            self.log.warn("[{index}] Closing the older draining link to the Gateway {gateway}: "
                          "{count} streams on it are reset (at most one draining link)",
                          index=self.config.index, gateway=older.gateway,
                          count=len(older.streams))
            self._close_draining(older, "a newer link is draining too: the older draining "
                                 "link is closed (at most one)")
        link.draining_since = now
        self.draining_link = link
        self.link = None
        self.stats["links_drained",] += 1
        if self.e2e is not None:
            self.e2e.link_draining(link)
        self._draining_call = self.reactor.callLater(self.max_draining,
                                                     self._draining_too_long, link)
        connector, self._connector = self._connector, None
        if len(self.targets) > 1:
            self._set_target((self.target_index + 1) % len(self.targets))
        if link.logged_in_at is not None and now - link.logged_in_at >= DRAIN_RECONNECT_MIN_AGE:
            self.factory.retry_now = True
        self.factory.connect_beside(connector)
        self.log.info("[{index}] Connecting a new link to the Gateway {gateway} in {delay:.1f} "
                      "s", index=self.config.index, gateway=self.gateway_address,
                      delay=self.factory.last_wait)

    def _close_draining(self, link: ProxyLink, why: str) -> None:
        """Close a draining link now, resetting what still runs on it (SHUTDOWN, ``why``)."""
        if link is self.draining_link:
            self.draining_link = None
            if self._draining_call is not None and self._draining_call.active():
                self._draining_call.cancel()
            self._draining_call = None
        link.reset_all_streams(Reason.SHUTDOWN, why)
        link.fail(GoAway.NORMAL, why)

    def _draining_too_long(self, link: ProxyLink) -> None:
        self._draining_call = None
        if link is not self.draining_link:
            return
        self.log.warn("[{index}] The Gateway {gateway} has not closed its draining link after "
                      "{limit:g} s: closing it, {count} streams are reset",
                      index=self.config.index, gateway=link.gateway, limit=self.max_draining,
                      count=len(link.streams))
        self._close_draining(link, f"the Gateway kept the draining link open for "
                             f"{self.max_draining:g} s, the most this proxy allows")

    def _draining_ended(self, link: ProxyLink, why: str) -> None:
        """A draining link is gone (its streams ended, or were reset with it)."""
        if link is self.draining_link:
            self.draining_link = None
            if self._draining_call is not None and self._draining_call.active():
                self._draining_call.cancel()
            self._draining_call = None
        self.stats["window_stalls",] += link.core.blocked_sent
        if self.e2e is not None:
            self.e2e.link_lost(link)
        since = link.draining_since or 0.0
        self.log.info("[{index}] The draining link to the Gateway {gateway} closed after "
                      "{duration:.1f} s of draining ({why})", index=self.config.index,
                      gateway=link.gateway, duration=self.reactor.seconds() - since, why=why)

    # What a reload cannot change without a new link to the Gateway.
    _LINK_SETTINGS = ("host", "port", "use_tls", "session_id", "password", "ca_file",
                      "server_name", "certificate_pin", "keepalive_interval",
                      "keepalive_timeout", "connect_timeout", "max_retry_delay",
                      "initial_window", "max_window", "outbound_proxy", "websocket_path",
                      "e2e_password", "gateways")

    def apply_config(self, new: ProxyConfig) -> bool:
        """Reload in place if the link settings are unchanged; False asks for a restart."""
        if any(getattr(self.config, name) != getattr(new, name)
               for name in self._LINK_SETTINGS):
            return False
        for warning in new.warnings:
            self.log.warn("[{index}] {problem}", index=new.index, problem=warning)
        self.config = new
        return True

    # How a stream ended (the start of SpliceProtocol's description) -> the code counted for
    # /metrics.  Codes and Reason names only: the description's message part can come from
    # the peer and is unbounded, so it never becomes a label value.
    _END_CODES = (
        ("closed", "closed"),
        ("reset by the far end", "reset_remote"),
        ("reset by this end", "reset_local"),
        ("reset here", "reset_local"),
        ("failed to open", "open_failed"),
        ("refused here", "refused"),
    )

    @classmethod
    def end_labels(cls, how: str) -> tuple[str, str]:
        """``(code, reason)`` for a stream end description: a code of ``_END_CODES`` (or
        ``lost_before_open``, ``lost_after_end``, ``other``) and the Reason name given in
        brackets (``""`` when none: a refusal here, a clean close)."""
        code = next((code for prefix, code in cls._END_CODES if how.startswith(prefix)), "")
        if not code:
            if how.endswith("lost before its stream was opened"):
                return "lost_before_open", ""
            if " lost after the stream ended" in how:
                return "lost_after_end", ""
            return "other", ""
        if code in ("closed", "refused"):
            return code, ""
        name = how.partition("(")[2].partition(":")[0].partition(")")[0]
        return code, name if name in Reason.__members__ else "other"

    def stream_ended(self, connection: Any, how: str) -> None:
        """One structured log event per finished stream, and its counts for /metrics.

        ``connection`` is the local side (a SpliceProtocol subclass) with ``describe()``,
        ``started`` and ``stream``.
        """
        stream = connection.stream
        sent, received = (stream.bytes_out, stream.bytes_in) if stream else (0, 0)
        self.stats[("streams_ended", *self.end_labels(how))] += 1
        self.stats["bytes_sent",] += sent
        self.stats["bytes_received",] += received
        self.log.info(
            "[{index}] Stream {stream} (session {session}) ended after {duration:.3f} s: "
            "{how}; {sent} bytes sent, {received} bytes received",
            index=self.config.index, session=self.config.session_id,
            stream=connection.describe(), target=connection.target,
            duration=self.reactor.seconds() - connection.started, how=how, sent=sent,
            received=received, event="stream_ended",
        )

    def startService(self) -> None:  # noqa: N802
        """Start the children (Bindings), then connect to the Gateway; the factory
        reconnects from then on.  (Done here rather than with twisted.application's
        TCPClient, whose module pulls in ClientService and automat: 0.3 MiB unused.)"""
        for warning in self.config.warnings:
            self.log.warn("[{index}] {problem}", index=self.config.index, problem=warning)
        super().startService()
        self.connect()

    # -- the Gateway list (issue 20) ------------------------------------------------

    def connect(self) -> None:
        """Dial the current target: its host and port, TLS checked against its serverName,
        a WebSocket to its webSocketPath or none (the Instance's caFile and pin for all)."""
        config = self.config
        index = self.target_index
        target = self.targets[index]
        factory = self._stacks.get(index)
        if factory is None:
            factory = self._stacks[index] = self._link_stack(dataclasses.replace(
                config, host=target.host, port=target.port, server_name=target.server_name,
                websocket_path=target.websocket_path))
        self.logged_in_since_connect = False
        self._moved_since_connect = False
        self._connector = self._dial(target, factory)

    def _dial(self, target: GatewayAddress, factory: Any) -> Any:
        """Connect ``factory`` to ``target``, through the outbound proxy when there is one
        (TCP to it, its CONNECT or SOCKS5 handshake to the target's host and port, then
        ``factory`` inside the tunnel).  The link and the failback probe both dial here, so
        the probe asks the way the link goes: a network that needs the proxy allows nothing
        else.  Every step has the connect timeout as its deadline."""
        config = self.config
        host, port = target.host, target.port
        if config.outbound_proxy is not None:
            from tcptunnel.outbound import ProxiedClientFactory

            # TCP to the outbound proxy; TLS and the link run inside its tunnel.
            factory = ProxiedClientFactory(factory, config.outbound_proxy, host, port,
                                           self.reactor, timeout=config.connect_timeout)
            host, port = config.outbound_proxy.host, config.outbound_proxy.port
        return connect_tcp(self.reactor, host, port, factory, timeout=config.connect_timeout)

    def _set_target(self, index: int) -> None:
        config = self.config
        self.target_index = index
        self._moved_since_connect = True
        self.gateway_address = self.targets[index].describe() + (
            f" via the {'HTTP' if config.outbound_proxy.scheme == 'http' else 'SOCKS5'} proxy "
            f"{config.outbound_proxy.describe()}" if config.outbound_proxy is not None else "")

    def target_failed(self) -> None:
        """The connection to the current Gateway failed (refused, timed out, TLS, closed
        before login): the next try goes to the next one of the list, round."""
        if self._moved_since_connect or len(self.targets) == 1:
            return
        self._set_target((self.target_index + 1) % len(self.targets))
        self.log.info("[{index}] Trying the next Gateway of the list: {gateway}",
                      index=self.config.index, gateway=self.gateway_address)

    def gateway_draining(self) -> None:
        """GOAWAY DRAINING: reconnect at once, to the next Gateway when there is a list.
        (Told so while still logging in, the normal short backoff: a balancer that has not
        yet seen the Gateway go would only send us back to it.)"""
        if self.logged_in_since_connect:
            self.factory.retry_now = True
        if len(self.targets) > 1 and not self._moved_since_connect:
            self._set_target((self.target_index + 1) % len(self.targets))

    def _schedule_failback(self) -> None:
        if self._failback_call is None and self.target_index != 0 and self.running:
            self._failback_call = self.reactor.callLater(self.failback_interval,
                                                         self._probe_first)

    def _probe_first(self) -> None:
        """Logged in to a later Gateway: does the first answer again?  A TCP connect
        (through the outbound proxy when there is one) that is closed at once; when it
        succeeds, the link moves back (its streams are reset, as on any Gateway change)."""
        self._failback_call = None
        if not self.running or self.target_index == 0:
            return
        self._dial(self.targets[0], _FailbackProbe(self))

    def first_gateway_back(self) -> None:
        """The probe reached the first Gateway: move the link back to it."""
        if not self.running or self.target_index == 0:
            return
        self._set_target(0)
        self.log.info("[{index}] The first Gateway {gateway} answers again: moving back to it",
                      index=self.config.index, gateway=self.gateway_address)
        self.factory.retry_now = True
        link = self.link
        if link is not None:
            link.reset_all_streams(Reason.LINK_LOST, "the link moves back to the first Gateway")
            link.fail(GoAway.NORMAL, "moving back to the first Gateway")

    def first_gateway_still_down(self) -> None:
        """The probe failed: ask again after the interval."""
        self._schedule_failback()

    def stopService(self) -> Any:  # noqa: N802
        """Stop retrying, close the link with GOAWAY (streams reset), stop children."""
        self.factory.stopTrying()
        if self._failback_call is not None and self._failback_call.active():
            self._failback_call.cancel()
        self._failback_call = None
        if self.e2e is not None:
            self.e2e.stop()
        link = self.link
        if link is not None:
            link.reset_all_streams(Reason.SHUTDOWN, "the proxy is stopping")
            link.fail(GoAway.NORMAL, "the proxy is stopping")
        if self.draining_link is not None:
            self._close_draining(self.draining_link, "the proxy is stopping")
        if self._connector is not None:
            self._connector.disconnect()  # stops a connection attempt in progress
            self._connector = None
        return super().stopService()
