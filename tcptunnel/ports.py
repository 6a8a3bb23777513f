"""Listening sockets whose start-up errors name the address and the settings line."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import CannotListenError

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
    """
    interface = ip if ip is not None else "::"
    try:
        if tls is not None:
            from tcptunnel.tls import tls_factory

            factory = tls_factory(tls, factory, is_client=False)
        return listen_tcp(reactor, port, factory, interface=interface)
    except CannotListenError as e:
        raise StartupError(f"{what} could not listen on {format_address(ip, port)} "
                           f"({location}): {e.socketError}") from None
