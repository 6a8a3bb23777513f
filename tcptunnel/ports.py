"""Listening sockets whose start-up errors name the address and the settings line, and the
set of them one instance keeps (:class:`ListenerSet`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from tcptunnel.config import Location, StartupError, format_address
from tcptunnel.sockets import listen_tcp

AddressKey = tuple[str | None, int]


def address_keys(addresses: list[tuple[str | None, int]]) -> list[AddressKey]:
    """What identifies each configured listening address across reloads: the address
    itself.  Addresses on port 0 (any free port) have no stable identity; each is its own."""
    return [(ip, port or -1 - i) for i, (ip, port) in enumerate(addresses)]


def listen(reactor: Any, ip: str | None, port: int, factory: Any, what: str,
           location: Location, tls: Any = None) -> Any:
    """Listen on ip:port (all addresses, dual-stack, when ``ip`` is None), TLS if given.

    Raises StartupError "<what> could not listen on <address> (<file:line>): <reason>".
    ``factory`` is made quiet (``noisy = False``): the caller logs its listener itself, and
    Twisted's "Starting factory <... object at 0x...>" lines would only repeat it, with a
    memory address.
    """
    interface = ip if ip is not None else "::"
    if isinstance(factory, Factory):
        factory.noisy = False
    try:
        if tls is not None:
            from tcptunnel.tls import tls_factory

            factory = tls_factory(tls, factory, is_client=False)
        return listen_tcp(reactor, port, factory, interface=interface)
    except CannotListenError as e:
        raise StartupError(f"{what} could not listen on {format_address(ip, port)} "
                           f"({location}): {e.socketError}") from None


S = TypeVar("S")  # one listener's settings (a ListenerConfig, a BindingConfig)
E = TypeVar("E")  # what the owner keeps beside each port (its factory, its TLS context)


@dataclass
class _Entry(Generic[S, E]):
    spec: S
    port: Any
    state: E


class ListenerSet(Generic[S, E]):
    """The listening ports of one instance (a Gateway's Listeners, a Proxy-Server's
    Bindings), started together and reloaded all or nothing.

    The owner says how to listen for one entry (``open_one(key, spec) -> (port, state)``,
    raising StartupError), how to announce a new one (``announce(spec, port, state)``, once
    it is committed) and where each entry listens (``address(spec) -> (ip, port)``).

    - :meth:`start` listens on every entry; if one fails, the ports already opened are
      closed and the StartupError is raised: nothing is left half-started.
    - :meth:`reload` binds the added entries first, and only when every one of them is
      listening closes the removed ones and hands the kept ones their new settings.  When
      one cannot listen, what it opened is closed and the running set stays exactly as it
      was; the StartupError says which address failed and that nothing was changed.  An
      added entry on the port number of a removed one (the same port, another address)
      cannot be bound while the old socket is open: the old one is closed first, and put
      back if the new one then fails.
    """

    log = Logger()

    def __init__(self, name: str, address: Callable[[S], tuple[str | None, int]],
                 open_one: Callable[[AddressKey, S], tuple[Any, E]],
                 announce: Callable[[S, Any, E], None] | None = None) -> None:
        self.name = name  # "[0] Listener", "[1] Binding": starts each log line and error
        self._address = address
        self._open_one = open_one
        self._announce = announce
        self._entries: dict[AddressKey, _Entry[S, E]] = {}
        self._order: list[AddressKey] = []
        self.running = False

    def keys(self, specs: Sequence[S]) -> list[AddressKey]:
        """The identity of each entry across reloads (see :func:`address_keys`)."""
        return address_keys([self._address(spec) for spec in specs])

    @property
    def ports(self) -> list[Any]:
        """Listening ports, in the order of the settings."""
        return [self._entries[key].port for key in self._order if key in self._entries]

    def entries(self) -> list[tuple[AddressKey, S, Any, E]]:
        """(key, settings, port, state) of every listening entry, in the order of the
        settings."""
        return [(key, self._entries[key].spec, self._entries[key].port,
                 self._entries[key].state) for key in self._order if key in self._entries]

    def _describe(self, spec: S, port: Any = None) -> str:
        ip, number = self._address(spec)
        if port is not None and not number:
            number = port.getHost().port
        return format_address(ip, number)

    def _open_all(self, pairs: list[tuple[AddressKey, S]],
                  into: dict[AddressKey, _Entry[S, E]]) -> None:
        """Open each entry into ``into``; on a failure close those this call opened and
        raise."""
        opened: list[AddressKey] = []
        try:
            for key, spec in pairs:
                port, state = self._open_one(key, spec)
                into[key] = _Entry(spec, port, state)
                opened.append(key)
        except StartupError:
            for key in opened:
                into.pop(key).port.stopListening()
            raise

    def start(self, specs: Sequence[S]) -> None:
        """Listen on every entry, or on none (the StartupError names the address)."""
        keys = self.keys(specs)
        entries: dict[AddressKey, _Entry[S, E]] = {}
        self._open_all(list(zip(keys, specs, strict=True)), entries)
        self._entries, self._order, self.running = entries, keys, True
        for key in keys:
            entry = entries[key]
            if self._announce is not None:
                self._announce(entry.spec, entry.port, entry.state)

    @defer.inlineCallbacks
    def reload(self, specs: Sequence[S],
               update: Callable[[AddressKey, E, S], None] | None = None) -> Any:
        """Apply new settings all or nothing; fires when the removed ports are closed.

        ``update(key, state, spec)`` is called for each kept entry, only once the whole
        reload is certain to apply.  Fails with StartupError, everything unchanged, when an
        added entry cannot listen.  Before :meth:`start` (or after :meth:`stop`) only the
        order is recorded: nothing listens.
        """
        keys = self.keys(specs)
        wanted = dict(zip(keys, specs, strict=True))
        if not self.running:
            return None
        added = [key for key in keys if key not in self._entries]
        removed = [key for key in self._order if key in self._entries and key not in wanted]
        freed = {key[1] for key in removed if key[1] > 0}
        direct = [key for key in added if key[1] not in freed]
        swapped = [key for key in added if key[1] in freed]
        opened: dict[AddressKey, _Entry[S, E]] = {}
        self._open_all([(key, wanted[key]) for key in direct], opened)
        if swapped:
            yield self._swap(swapped, removed, wanted, opened)
        closing = []
        for key in removed:
            entry = self._entries.pop(key)
            if entry.port is not None:  # None: already closed by _swap
                closing.append(defer.maybeDeferred(entry.port.stopListening))
            self.log.info("{name} {address} removed", name=self.name,
                          address=self._describe(entry.spec, entry.port))
        for key, entry in self._entries.items():
            if update is not None:
                update(key, entry.state, wanted[key])
            entry.spec = wanted[key]
        self._entries.update(opened)
        self._order = keys
        for key in added:
            entry = opened[key]
            if self._announce is not None:
                self._announce(entry.spec, entry.port, entry.state)
        yield defer.gatherResults(closing)
        return None

    @defer.inlineCallbacks
    def _swap(self, swapped: list[AddressKey], removed: list[AddressKey],
              wanted: dict[AddressKey, S], opened: dict[AddressKey, _Entry[S, E]]) -> Any:
        """Close the removed entries on the port numbers of ``swapped``, then open those;
        if one fails, close what this reload opened and reopen the removed ones."""
        numbers = {key[1] for key in swapped}
        making_way = [key for key in removed if key[1] in numbers]
        yield defer.gatherResults([defer.maybeDeferred(self._entries[key].port.stopListening)
                                   for key in making_way])
        for key in making_way:
            self._entries[key].port = None
        try:
            self._open_all([(key, wanted[key]) for key in swapped], opened)
        except StartupError as e:
            yield defer.gatherResults([defer.maybeDeferred(entry.port.stopListening)
                                       for entry in opened.values()])
            opened.clear()
            lost = []
            for key in making_way:
                entry = self._entries[key]
                try:
                    entry.port, entry.state = self._open_one(key, entry.spec)
                except StartupError as again:
                    del self._entries[key]
                    lost.append(str(again))
            if lost:
                raise StartupError(f"{e}; and putting back what it replaced failed: "
                                   + "; ".join(lost)) from None
            raise

    def stop(self) -> Any:
        """Stop listening everywhere; fires when every port is closed."""
        ports = [entry.port for entry in self._entries.values() if entry.port is not None]
        self._entries.clear()
        self.running = False
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
