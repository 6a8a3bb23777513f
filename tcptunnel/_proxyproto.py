"""PROXY protocol headers to targets (HAProxy's ``proxy-protocol.txt``, v1 and v2), and the
OPEN field that carries the original client's address from the Proxy-Server.  Sans-IO.

A Proxy-Server that accepts a local connection knows the client's address and the address
the client connected to (its Binding's); it puts both in the stream's OPEN as the
:data:`FIELD_CLIENT_ADDRESS` field (non-critical, so older Proxy-Clients ignore it; inside
the end-to-end encryption when that is on).  A Proxy-Client whose ``<Endpoint>`` says
``proxyProtocol="v1"`` or ``"v2"`` writes :func:`build_v1` / :func:`build_v2` to the target
before any stream data, so nginx, HAProxy, Postfix and others see the real client.

Without the field (an older Proxy-Server, or a client address that is not TCP over IP) the
header says so and the receiver uses the connection's own addresses: v1 ``PROXY UNKNOWN``,
v2 the ``LOCAL`` command with the ``UNSPEC`` family.  Not v2 ``PROXY`` with ``UNSPEC``,
which the spec lets a receiver refuse and HAProxy 2.6 does (it resets the connection;
tried with Debian's 2.6.12), while every receiver must accept ``LOCAL``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from tcptunnel._frames import FIELD_CLIENT_ADDRESS  # the OPEN field (docs/protocol.md §5.1)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_VERSION = 0x20
V2_LOCAL = 0x00
V2_PROXY = 0x01
V2_UNSPEC = 0x00
V2_TCP4 = 0x11  # AF_INET, SOCK_STREAM
V2_TCP6 = 0x21  # AF_INET6, SOCK_STREAM
# The spec's bound on a v1 line, CRLF included (the longest we write, TCP6 with two full
# IPv6 addresses and ports 65535, is 104).
V1_MAX_BYTES = 107

_V2_HEADER = struct.Struct(">12sBBH")
_PORTS = struct.Struct(">HH")
_FAMILY = {4: V2_TCP4, 6: V2_TCP6}


class ClientAddressError(ValueError):
    """A CLIENT_ADDRESS field that does not decode; the message says why."""


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """The two ends of the client's connection as the Proxy-Server saw them: ``source``
    (the client) and ``destination`` (the Binding's address it connected to), one family."""

    source: IPAddress
    source_port: int
    destination: IPAddress
    destination_port: int

    def __post_init__(self) -> None:
        if self.source.version != self.destination.version:
            raise ClientAddressError("source and destination are of different families")
        for port in (self.source_port, self.destination_port):
            if not 0 <= port <= 65535:
                raise ClientAddressError(f"port {port} out of range")

    @classmethod
    def from_hosts(cls, source: str, source_port: int, destination: str,
                   destination_port: int) -> ClientAddress:
        """From the address strings a transport reports (``getPeer()``/``getHost()``).

        IPv4-mapped IPv6 (a dual-stack listener's IPv4 clients) becomes IPv4; if only one
        end is IPv4, both are written as IPv6 (IPv4-mapped), which loses nothing."""
        try:
            src = _unmapped(ipaddress.ip_address(source.split("%", 1)[0]))
            dst = _unmapped(ipaddress.ip_address(destination.split("%", 1)[0]))
        except ValueError as e:
            raise ClientAddressError(str(e)) from None
        if src.version != dst.version:
            src, dst = (a if a.version == 6 else ipaddress.IPv6Address(f"::ffff:{a}")
                        for a in (src, dst))
        return cls(src, source_port, dst, destination_port)

    @property
    def version(self) -> int:
        """4 or 6."""
        return self.source.version


def encode_client_address(address: ClientAddress) -> tuple[int, bytes]:
    """The OPEN field (tag, value) for ``address``."""
    return FIELD_CLIENT_ADDRESS, (bytes([address.version]) + address.source.packed
                                  + address.source_port.to_bytes(2, "big")
                                  + address.destination.packed
                                  + address.destination_port.to_bytes(2, "big"))


def decode_client_address(value: bytes) -> ClientAddress:
    """A CLIENT_ADDRESS field's value (raises ClientAddressError)."""
    if not value or value[0] not in (4, 6):
        raise ClientAddressError("CLIENT_ADDRESS has no address family 4 or 6")
    size = 4 if value[0] == 4 else 16
    if len(value) != 1 + 2 * (size + 2):
        raise ClientAddressError(f"CLIENT_ADDRESS of family {value[0]} is not "
                                 f"{1 + 2 * (size + 2)} bytes")
    src = ipaddress.ip_address(value[1 : 1 + size])
    dst_at = 3 + size
    dst = ipaddress.ip_address(value[dst_at : dst_at + size])
    return ClientAddress(src, int.from_bytes(value[1 + size : dst_at], "big"),
                         dst, int.from_bytes(value[dst_at + size :], "big"))


def client_address_from_fields(fields: tuple[tuple[int, bytes], ...]) -> ClientAddress | None:
    """The client address among an OpenRequest's uninterpreted ``fields``, None if absent
    (raises ClientAddressError for a malformed or repeated one)."""
    values = [value for tag, value in fields if tag == FIELD_CLIENT_ADDRESS]
    if len(values) > 1:
        raise ClientAddressError("CLIENT_ADDRESS given twice")
    return decode_client_address(values[0]) if values else None


def build_v1(address: ClientAddress | None) -> bytes:
    """The v1 (text) header: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n``, or
    ``PROXY UNKNOWN\\r\\n`` when the client's address is not known."""
    if address is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if address.version == 4 else "TCP6"
    # The spec wants the shortest form of IPv6 addresses and decimal ports, as here.
    line = (f"PROXY {family} {address.source.compressed} {address.destination.compressed} "
            f"{address.source_port} {address.destination_port}\r\n").encode("ascii")
    assert len(line) <= V1_MAX_BYTES
    return line


def build_v2(address: ClientAddress | None) -> bytes:
    """The v2 (binary) header: PROXY with TCP over IPv4/IPv6, or LOCAL with UNSPEC when the
    client's address is not known (the receiver keeps the connection's own).  No TLVs."""
    if address is None:
        return _V2_HEADER.pack(V2_SIGNATURE, V2_VERSION | V2_LOCAL, V2_UNSPEC, 0)
    body = (address.source.packed + address.destination.packed
            + _PORTS.pack(address.source_port, address.destination_port))
    return _V2_HEADER.pack(V2_SIGNATURE, V2_VERSION | V2_PROXY, _FAMILY[address.version],
                           len(body)) + body


def build_header(version: str, address: ClientAddress | None) -> bytes:
    """The header for an ``<Endpoint proxyProtocol="v1"|"v2">``."""
    if version == "v1":
        return build_v1(address)
    if version == "v2":
        return build_v2(address)
    raise ValueError(f"proxyProtocol is v1 or v2, not {version!r}")
