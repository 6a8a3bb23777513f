"""Dialling targets: IP literals straight through connectTCP, and cancellation."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel.proxyclient import _DirectDial, dial_target


class StopRecordingReactor(MemoryReactorClock):
    """A MemoryReactorClock whose connectors record stopConnecting()."""

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        connector = super().connectTCP(*args, **kwargs)
        connector.stopped = False

        def stop() -> None:
            connector.stopped = True

        connector.stopConnecting = stop
        return connector


class DirectDialTests(SynchronousTestCase):
    """An IP literal is dialled with connectTCP and our protocol is the socket's protocol."""

    def test_ipv4_and_ipv6_literals_connect_directly(self) -> None:
        """No resolver and no wrapper: the factory hands out the splice protocol itself."""
        for host in ("127.0.0.1", "::1"):
            reactor = StopRecordingReactor()
            connection = Protocol()
            dial = dial_target(reactor, host, 22, 7.5, connection)
            (target_host, port, factory, timeout, _bind), = reactor.tcpClients
            self.assertEqual((target_host, port, timeout), (host, 22, 7.5))
            self.assertNoResult(dial)
            self.assertIs(factory.buildProtocol(None), connection)
            self.assertIs(self.successResultOf(dial), connection)

    def test_failure_is_reported(self) -> None:
        """A refused connect fails the dial with the connect error."""
        reactor = StopRecordingReactor()
        dial = dial_target(reactor, "127.0.0.1", 22, 5.0, Protocol())
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(reactor.connectors[0],
                                       Failure(neterror.ConnectionRefusedError()))
        self.failureResultOf(dial, neterror.ConnectionRefusedError)

    def test_cancel_stops_connecting_and_is_not_a_failure(self) -> None:
        """Cancelling stops the connect attempt; the UserError that stopConnecting reports
        afterwards is swallowed, so the dial fails only with CancelledError."""
        reactor = StopRecordingReactor()
        dial = dial_target(reactor, "127.0.0.1", 22, 5.0, Protocol())
        dial.cancel()
        self.assertTrue(reactor.connectors[0].stopped)
        self.failureResultOf(dial, CancelledError)
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(reactor.connectors[0], Failure(neterror.UserError()))

    def test_names_go_through_the_resolver(self) -> None:
        """A host name is not passed to connectTCP as is: HostnameEndpoint resolves it and
        connects to the address."""
        reactor = StopRecordingReactor()
        dial = dial_target(reactor, "target.example", 22, 5.0, Protocol())
        # MemoryReactorClock's resolver answers 127.0.0.1 for every name: the connect
        # goes to the resolved address, through the endpoint's factory.
        self.assertEqual([host for host, *_ in reactor.tcpClients], ["127.0.0.1"])
        self.assertNotIsInstance(reactor.tcpClients[0][2], _DirectDial)
        dial.cancel()  # leave no attempt running into the next test
        self.failureResultOf(dial)
