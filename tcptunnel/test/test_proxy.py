"""Tests for the proxies' link to the Gateway: the reconnect policy."""

from __future__ import annotations

from unittest.mock import Mock

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase


class ReconnectPolicyTests(SynchronousTestCase):
    """ProxyLinkFactory: how long the proxy waits before the next try, by why the last ended."""

    def setUp(self) -> None:
        from tcptunnel.proxy import ProxyLinkFactory

        self.reactor = MemoryReactorClock()
        proxy = Mock()
        proxy.reactor = self.reactor
        proxy.config.max_retry_delay = 30
        proxy.config.index = 1
        proxy.gateway_address = "127.0.0.1:1"
        self.factory = ProxyLinkFactory(proxy)
        self.connector = Mock()

    def waits(self, count: int, lost: bool = False) -> list[float]:
        """The delays of ``count`` failed tries in a row (each retry scheduled, then run)."""
        delays = []
        for _ in range(count):
            if lost:
                self.factory.clientConnectionLost(self.connector, Failure(ConnectionDone()))
            else:
                self.factory.clientConnectionFailed(self.connector,
                                                    Failure(ConnectionRefusedError()))
            call = self.reactor.getDelayedCalls()[-1]
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        return delays

    def test_refused_connections_retry_within_seconds(self) -> None:
        """While the Gateway refuses connections (it is down), tries stay at most ~3 s apart,
        so the tunnel is back within seconds of the Gateway's return (a 40 s outage once
        took 24 s more with a 30 s cap)."""
        delays = self.waits(20)
        self.assertLessEqual(max(delays), 3.0 * 1.2 + 1e-9)
        self.assertGreater(min(delays), 0.5)
        self.assertGreater(delays[-1], 3.0 * 0.8 - 1e-9)  # grown to the cap

    def test_refused_login_waits_longest_until_a_login_succeeds(self) -> None:
        """After a refused login (or a limit), every try waits the longest delay, however the
        following tries end; a successful login brings the short waits back."""
        self.factory.wait_longest()
        for delay in self.waits(3) + self.waits(2, lost=True):
            self.assertGreaterEqual(delay, 30 * 0.8 - 0.01)
        self.factory.resetDelay()
        self.assertLessEqual(max(self.waits(5)), 3.0 * 1.2 + 1e-9)

    def test_lost_link_retries_soon(self) -> None:
        """A logged-in link that is lost is retried after about a second, not the cap."""
        self.factory.resetDelay()
        (delay,) = self.waits(1, lost=True)
        self.assertLessEqual(delay, 1.0 * 1.2 + 1e-9)


class DeadPeerTests(SynchronousTestCase):
    """A link whose peer is declared dead by keepalive."""

    def test_dead_peer_aborted_at_once(self) -> None:
        """At interval + timeout of silence the link is aborted in the same reactor turn's
        next iteration: its streams are reset then, not after the 10 s a living peer gets
        to read its GOAWAY (a SIGSTOPped peer once kept streams 10 s past the 45 s)."""
        from tcptunnel import _mux
        from tcptunnel.mux import MuxProtocol

        clock = Clock()
        link = MuxProtocol(_mux.MuxConnection(opener=True), clock, keepalive_interval=15,
                           keepalive_timeout=30)
        transport = StringTransport()
        aborted: list[float] = []
        transport.abortConnection = lambda: aborted.append(clock.seconds())  # type: ignore[method-assign]
        link.makeConnection(transport)
        clock.advance(15)
        clock.advance(29.9)
        self.assertEqual(aborted, [])
        clock.advance(0.1)
        clock.advance(0)
        self.assertEqual(aborted, [45.0])

