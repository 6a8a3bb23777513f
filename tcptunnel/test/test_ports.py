"""Tests for tcptunnel.ports.ListenerSet: start, rollback and all-or-nothing reload."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel.config import Location, StartupError
from tcptunnel.ports import AddressKey, ListenerSet, listen
from tcptunnel.test._harness import wait_until

_WILDCARDS = ("", "::", "0.0.0.0")


class _Port:
    """A listening port of :class:`BindingReactor`; closes synchronously, or when the
    test fires ``closing`` if the reactor is told to hold closes."""

    def __init__(self, reactor: BindingReactor, interface: str, number: int) -> None:
        self.reactor = reactor
        self.interface = interface
        self.number = number
        self.closing: defer.Deferred[None] | None = None

    def getHost(self) -> Any:  # noqa: N802
        """The bound address."""
        if ":" in self.interface:
            return IPv6Address("TCP", self.interface, self.number)
        return IPv4Address("TCP", self.interface or "0.0.0.0", self.number)

    def stopListening(self) -> defer.Deferred[None] | None:  # noqa: N802
        """Release the address now, or (holding) when ``closing`` fires."""
        if not self.reactor.hold_closes:
            self.reactor.bound.remove(self)
            return None
        self.closing = defer.Deferred()
        self.closing.addCallback(lambda _: self.reactor.bound.remove(self))
        return self.closing


class BindingReactor(MemoryReactor):
    """A MemoryReactor whose listenTCP binds like Linux: an address whose port number is
    held elsewhere (``busy``) or bound by us on the same or a wildcard address is refused
    with EADDRINUSE; port 0 gets the next free number."""

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[int] = set()
        self.bound: list[_Port] = []
        self.hold_closes = False
        self._next = 40000

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,  # noqa: N802
                  interface: str = "") -> _Port:
        """Bind, or raise CannotListenError as Twisted does."""
        if port == 0:
            self._next += 1
            port = self._next
        clash = port in self.busy or any(
            p.number == port and (p.interface == interface or p.interface in _WILDCARDS
                                  or interface in _WILDCARDS) for p in self.bound)
        if clash:
            raise CannotListenError(interface, port, OSError(
                errno.EADDRINUSE, "Address already in use"))
        self.tcpServers.append((port, factory, backlog, interface))
        bound = _Port(self, interface, port)
        self.bound.append(bound)
        return bound

    def addresses(self) -> list[tuple[str, int]]:
        """What is bound now, in binding order."""
        return [(p.interface, p.number) for p in self.bound]


@dataclass(frozen=True)
class Spec:
    """A listener's settings as the tests write them: address plus a payload that may
    change while the address stays (like a Binding's target)."""

    ip: str | None
    port: int
    payload: str = ""
    location: Location = field(default=Location("s.xml", 1), compare=False)


@dataclass
class State:
    """What the owner keeps beside each port; records what the set told it."""

    spec: Spec
    updates: list[Spec] = field(default_factory=list)


class ListenerSetTests(SynchronousTestCase):
    """ListenerSet over a binding MemoryReactor."""

    def setUp(self) -> None:
        self.reactor = BindingReactor()
        self.announced: list[tuple[Spec, int]] = []
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.set: ListenerSet[Spec, State] = ListenerSet(
            "[0] Binding", lambda spec: (spec.ip, spec.port), self.open_one,
            lambda spec, port, state: self.announced.append((spec, port.getHost().port)))

    def open_one(self, key: AddressKey, spec: Spec) -> tuple[Any, State]:
        """Listen as the services do, through ports.listen."""
        port = listen(self.reactor, spec.ip, spec.port, object(), "[0] Binding",
                      spec.location)
        return port, State(spec)

    @staticmethod
    def update(key: AddressKey, state: State, spec: Spec) -> None:
        """Record the new settings handed to a kept entry."""
        state.updates.append(spec)

    def reload(self, specs: list[Spec]) -> Any:
        """Run a reload; return its result, or the Failure it ended with."""
        results: list[Any] = []
        self.set.reload(specs, self.update).addBoth(results.append)
        self.assertEqual(len(results), 1, "the reload should have finished")
        return results[0]

    def log_lines(self) -> list[str]:
        """The log lines emitted so far."""
        return [formatEvent(event) for event in self.events]

    def test_start_listens_on_every_entry_in_order(self) -> None:
        """start binds each entry (None is every address, dual-stack) and announces each,
        in the order of the settings; ports follows the same order."""
        specs = [Spec("127.0.0.1", 5000), Spec(None, 5001), Spec("::1", 0)]
        self.set.start(specs)
        self.assertEqual(self.reactor.addresses(),
                         [("127.0.0.1", 5000), ("::", 5001), ("::1", 40001)])
        self.assertEqual(self.announced, [(specs[0], 5000), (specs[1], 5001),
                                          (specs[2], 40001)])
        self.assertEqual([p.getHost().port for p in self.set.ports], [5000, 5001, 40001])

    def test_start_rolls_back_on_a_busy_port(self) -> None:
        """A busy second entry: StartupError naming address, line and errno text; the first
        entry's port is closed again, nothing announced, nothing listening."""
        self.reactor.busy.add(5001)
        location = Location("s.xml", 7)
        with self.assertRaises(StartupError) as raised:
            self.set.start([Spec("127.0.0.1", 5000), Spec("127.0.0.1", 5001, location=location),
                            Spec("127.0.0.1", 5002)])
        self.assertEqual(str(raised.exception), "[0] Binding could not listen on "
                         "127.0.0.1:5001 (s.xml:7): [Errno 98] Address already in use")
        self.assertEqual(self.reactor.addresses(), [])
        self.assertEqual((self.announced, self.set.ports, self.set.running), ([], [], False))

    def test_reload_adds_removes_and_keeps(self) -> None:
        """A reload keeps an unchanged address (same port object, new settings handed to
        its state), closes a removed one and logs it, and opens and announces an added
        one."""
        self.set.start([Spec("127.0.0.1", 5000, "a"), Spec("127.0.0.1", 5001)])
        kept_port, kept_state = self.set.ports[0], self.set.entries()[0][3]
        self.announced.clear()
        self.assertIsNone(self.reload([Spec("127.0.0.1", 5002), Spec("127.0.0.1", 5000, "b")]))
        self.assertEqual(self.reactor.addresses(), [("127.0.0.1", 5000), ("127.0.0.1", 5002)])
        self.assertEqual([p.getHost().port for p in self.set.ports], [5002, 5000])
        self.assertIs(self.set.ports[1], kept_port)
        self.assertEqual(kept_state.updates, [Spec("127.0.0.1", 5000, "b")])
        self.assertEqual(self.set.entries()[1][1].payload, "b")
        self.assertEqual(self.announced, [(Spec("127.0.0.1", 5002), 5002)])
        self.assertIn("[0] Binding 127.0.0.1:5001 removed", self.log_lines())

    def test_reload_with_a_busy_port_changes_nothing(self) -> None:
        """A reload that removes one entry and adds two, the second on a busy port: it
        fails with StartupError naming that address, the first added port is closed again,
        the removed one still listens, and the kept one got no new settings."""
        self.set.start([Spec("127.0.0.1", 5000, "a"), Spec("127.0.0.1", 5001)])
        before = (self.reactor.addresses(), self.set.ports, self.set.entries())
        kept_state = self.set.entries()[0][3]
        self.reactor.busy.add(5003)
        result = self.reload([Spec("127.0.0.1", 5000, "b"), Spec("127.0.0.1", 5002),
                              Spec("127.0.0.1", 5003, location=Location("s.xml", 9))])
        self.assertIsInstance(result.value, StartupError)
        self.assertEqual(str(result.value), "[0] Binding could not listen on "
                         "127.0.0.1:5003 (s.xml:9): [Errno 98] Address already in use")
        self.assertEqual((self.reactor.addresses(), self.set.ports, self.set.entries()),
                         before)
        self.assertEqual(kept_state.updates, [])
        self.assertNotIn("removed", " ".join(self.log_lines()))
        # Once the port is free the same reload applies.
        self.reactor.busy.clear()
        self.reload([Spec("127.0.0.1", 5000, "b"), Spec("127.0.0.1", 5002),
                     Spec("127.0.0.1", 5003)])
        self.assertEqual([p.getHost().port for p in self.set.ports], [5000, 5002, 5003])

    def test_reload_moving_an_address_on_the_same_port(self) -> None:
        """127.0.0.1:5000 -> every address on 5000: the old socket is closed (and its close
        awaited) before the new one binds, which would clash with it otherwise."""
        self.set.start([Spec("127.0.0.1", 5000)])
        old = self.set.ports[0]
        self.reactor.hold_closes = True
        results: list[Any] = []
        self.set.reload([Spec(None, 5000)]).addBoth(results.append)
        self.assertEqual((results, self.reactor.addresses()), ([], [("127.0.0.1", 5000)]))
        old.closing.callback(None)
        self.assertEqual(results, [None])
        self.assertEqual(self.reactor.addresses(), [("::", 5000)])
        self.assertEqual(self.set.ports[0].getHost().host, "::")

    def test_failed_move_puts_the_old_address_back(self) -> None:
        """If the moved address cannot bind (another program holds it meanwhile), the
        reload fails, what it opened is closed, and the old address listens again."""
        self.set.start([Spec("127.0.0.1", 5000), Spec("127.0.0.1", 6000)])
        original = self.reactor.listenTCP

        def refuse_wildcard(port: int, factory: Any, backlog: int = 50,
                            interface: str = "") -> _Port:
            if interface == "::":
                raise CannotListenError(interface, port, OSError(
                    errno.EADDRINUSE, "Address already in use"))
            return original(port, factory, backlog, interface)

        self.reactor.listenTCP = refuse_wildcard  # type: ignore[method-assign]
        result = self.reload([Spec(None, 5000), Spec("127.0.0.1", 6001)])
        self.assertIsInstance(result.value, StartupError)
        self.assertIn("could not listen on *:5000", str(result.value))
        self.assertEqual(sorted(self.reactor.addresses()),
                         [("127.0.0.1", 5000), ("127.0.0.1", 6000)])
        self.assertEqual([p.getHost().port for p in self.set.ports], [5000, 6000])

    def test_reload_before_start_listens_nowhere(self) -> None:
        """A reload of a set that was never started (or is stopped) binds nothing."""
        self.assertIsNone(self.reload([Spec("127.0.0.1", 5000)]))
        self.assertEqual(self.reactor.addresses(), [])
        self.set.start([Spec("127.0.0.1", 5000)])
        self.set.stop()
        self.assertIsNone(self.reload([Spec("127.0.0.1", 5001)]))
        self.assertEqual(self.reactor.addresses(), [])

    def test_stop_closes_every_port(self) -> None:
        """stop closes every port and fires when they are all closed."""
        self.set.start([Spec("127.0.0.1", 5000), Spec("::1", 0)])
        self.reactor.hold_closes = True
        ports = list(self.set.ports)
        done: list[Any] = []
        self.set.stop().addBoth(done.append)
        self.assertEqual(done, [])
        for port in ports:
            port.closing.callback(None)
        self.assertEqual((len(done), self.reactor.addresses(), self.set.ports), (1, [], []))

    def test_port_zero_entries_are_each_their_own(self) -> None:
        """Two entries on port 0 are two listeners, and a reload with the same two keeps
        both ports (they have no address to compare, only their position)."""
        self.set.start([Spec("127.0.0.1", 0), Spec("127.0.0.1", 0)])
        ports = list(self.set.ports)
        self.assertEqual(len({p.getHost().port for p in ports}), 2)
        self.reload([Spec("127.0.0.1", 0, "x"), Spec("127.0.0.1", 0, "y")])
        self.assertEqual(self.set.ports, ports)


class RealSocketTests(TestCase):
    """The all-or-nothing reload against the kernel's own idea of a busy port."""

    async def test_busy_real_port(self) -> None:
        """A port held by a plain socket fails the reload; the running port stays bound
        and the port the reload had opened is closed again."""
        from twisted.internet import reactor

        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        busy = holder.getsockname()[1]
        listeners: ListenerSet[Spec, None] = ListenerSet(
            "[0] Listener", lambda spec: (spec.ip, spec.port),
            lambda key, spec: (listen(reactor, spec.ip, spec.port, Factory(), "[0] Gateway",
                                      spec.location), None))
        listeners.start([Spec("127.0.0.1", 0)])
        self.addCleanup(listeners.stop)
        port = listeners.ports[0]
        extra = socket.socket()
        extra.bind(("127.0.0.1", 0))
        free = extra.getsockname()[1]
        extra.close()
        with self.assertRaises(StartupError) as raised:
            await listeners.reload([Spec("127.0.0.1", 0), Spec("127.0.0.1", free),
                                    Spec("127.0.0.1", busy)])
        self.assertIn(f"could not listen on 127.0.0.1:{busy}", str(raised.exception))
        self.assertEqual(listeners.ports, [port])
        self.assertTrue(port.connected)
        await wait_until(lambda: _can_bind(free), 5, "the reload's own port closed again")


def _can_bind(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound right now."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
