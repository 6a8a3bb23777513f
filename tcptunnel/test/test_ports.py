"""Tests for tcptunnel.ports.ListenerSet: start, rollback and all-or-nothing reload, alone and
in the Gateway and Proxy-Server services."""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel.config import Location, StartupError, load_settings
from tcptunnel.gateway import GatewayService
from tcptunnel.ports import AddressKey, ListenerSet, listen
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.tap import TunnelService
from tcptunnel.test._harness import NS, reserve_port, wait_until

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


class BindingReactor(MemoryReactorClock):
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
        # Held for the test by a socket that never listens: only a listener (SO_REUSEADDR)
        # can open it, so no other process takes it between here and the reload.
        free = reserve_port(self)
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


def _settings_text(gateway_port: int, listener_ports: list[int], binding_ports: list[int],
                   target: int = 7, session_password: str = "ps") -> str:
    """A Gateway with Listeners and a Proxy-Server with Bindings, one element a line."""
    listeners = "".join(f'<Listener ip="127.0.0.1" port="{p}"/>\n' for p in listener_ports)
    bindings = "".join(f'<Binding listenIp="127.0.0.1" listenPort="{p}" targetHost="t" '
                       f'targetPort="{target}"/>\n' for p in binding_ports)
    return (f'<Settings {NS}>\n<Instance type="gateway">\n{listeners}'
            f'<Session id="1" proxyClientPassword="pc" proxyServerPassword="{session_password}"/>'
            f'\n</Instance>\n<Instance type="proxy-server" host="127.0.0.1" '
            f'port="{gateway_port}"><Session id="1" password="ps">\n{bindings}</Session>'
            "</Instance>\n</Settings>\n")


class ServiceReloadTests(SynchronousTestCase):
    """GatewayService, ProxyServerService and TunnelService over the ListenerSet: a reload
    with a busy port changes nothing in that instance and says what it could not apply."""

    def setUp(self) -> None:
        self.reactor = BindingReactor()
        self.path = os.path.abspath(self.mktemp())
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def write(self, text: str) -> None:
        # Private, as settings holding passwords should be: a reload logs the file's
        # warnings again, and errors() is about what the reload could not apply.
        with open(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)

    def start(self, text: str) -> TunnelService:
        self.write(text)
        tunnel = TunnelService(load_settings(self.path), self.reactor)
        tunnel.startService()
        self.addCleanup(tunnel.stopService)
        return tunnel

    def reload(self, tunnel: TunnelService) -> Any:
        results: list[Any] = []
        tunnel.reload().addBoth(results.append)
        self.assertEqual(len(results), 1, "the reload should have finished")
        return results[0]

    def errors(self) -> list[str]:
        """The reload's error and warning lines (not the start-up warnings)."""
        return [formatEvent(e) for e in self.events
                if e["log_level"] in (LogLevel.error, LogLevel.warn)
                and "plain TCP" not in formatEvent(e)]

    def test_busy_binding_port_keeps_the_proxy_server_as_it_was(self) -> None:
        """A reload that moves a Binding to a busy port and changes its target: the old
        Binding still listens with its old target, the error names the address and line,
        and the last line says the reload was not complete; the Gateway's change (a new
        Listener) applied."""
        tunnel = self.start(_settings_text(6000, [6000], [5000], target=7))
        gateway, server = (tunnel.getServiceNamed("0:gateway"),
                           tunnel.getServiceNamed("1:proxy-server"))
        assert isinstance(server, ProxyServerService)
        old_factory = server.bindings.entries()[0][3]
        self.reactor.busy.add(5001)
        self.write(_settings_text(6000, [6000, 6001], [5001], target=8))
        self.assertIs(self.reload(tunnel), False)
        self.assertIn(("127.0.0.1", 5000), self.reactor.addresses())
        self.assertNotIn(("127.0.0.1", 5001), self.reactor.addresses())
        self.assertEqual(server.bindings.entries()[0][3], old_factory)
        self.assertEqual(old_factory.binding.target_port, 7)
        self.assertEqual(server.config.bindings[0].listen_port, 5000)
        self.assertEqual([p.getHost().port for p in gateway.ports], [6000, 6001])
        self.assertEqual(self.errors(), [
            f"[1:proxy-server] not changed: [1] Binding could not listen on 127.0.0.1:5001 "
            f"({self.path}:8): [Errno 98] Address already in use",
            f"Reloaded {self.path} except 1:proxy-server (see above)"])

    def test_busy_listener_port_keeps_the_gateway_as_it_was(self) -> None:
        """A reload that adds a session password change and a Listener on a busy port: the
        Gateway keeps its configuration (gateway.update is not called) and its Listener."""
        tunnel = self.start(_settings_text(6000, [6000], [5000]))
        gateway = tunnel.getServiceNamed("0:gateway")
        assert isinstance(gateway, GatewayService)
        before = gateway.config
        updates: list[Any] = []
        self.patch(gateway.gateway, "update", updates.append)
        self.reactor.busy.add(6001)
        self.write(_settings_text(6000, [6000, 6001], [5000], session_password="new"))
        self.assertIs(self.reload(tunnel), False)
        self.assertEqual((updates, gateway.config), ([], before))
        self.assertEqual([p.getHost().port for p in gateway.ports], [6000])
        self.assertIn(f"[0:gateway] not changed: [0] Gateway could not listen on "
                      f"127.0.0.1:6001 ({self.path}:4): [Errno 98] Address already in use",
                      self.errors())
        # Once the port is free, the same file applies.
        self.reactor.busy.clear()
        self.assertIs(self.reload(tunnel), True)
        self.assertEqual(len(updates), 1)
        self.assertEqual([p.getHost().port for p in gateway.ports], [6000, 6001])

    def test_an_added_instance_that_cannot_listen_is_not_left_behind(self) -> None:
        """An instance added by a reload whose Binding port is busy is reported as not
        started and is not kept half-started: the next reload, once the port is free, adds
        and starts it."""
        text = _settings_text(6000, [6000], [5000])
        tunnel = self.start(text)
        extra = ('<Instance type="proxy-server" host="127.0.0.1" port="6000"><Session id="1" '
                 'password="ps"><Binding listenIp="127.0.0.1" listenPort="5002" '
                 'targetHost="t" targetPort="7"/></Session></Instance>\n</Settings>\n')
        self.write(text.replace("</Settings>\n", extra))
        self.reactor.busy.add(5002)
        self.assertIs(self.reload(tunnel), False)
        self.assertNotIn("2:proxy-server", [child.name for child in tunnel])
        self.assertIn("[2:proxy-server] could not be started", " ".join(self.errors()))
        self.reactor.busy.clear()
        self.assertIs(self.reload(tunnel), True)
        added = tunnel.getServiceNamed("2:proxy-server")
        self.assertTrue(added.running)
        self.assertIn(("127.0.0.1", 5002), self.reactor.addresses())
