"""Allow-list rules of a Proxy-Client (``<AllowedTargetEndpoints>``): sans-IO, no Twisted.

A rule is one ``<Endpoint host=... port=...>``.  Its ``host`` is one of

* an IP literal (``127.0.0.1``, ``::1``, ``[::1]``): matches that address, and only when the
  target is an IP literal too;
* a CIDR network (``192.168.40.0/24``, ``fd00::/8``): matches IP-literal targets inside it
  (and, with ``checkResolvedAddresses``, the addresses a name resolved to);
* ``*.corp.example``: matches names *under* that suffix, label by label
  (``a.corp.example``, ``b.a.corp.example``; not ``corp.example``, not ``xcorp.example``);
* any other name: matches exactly that name.

and its ``port`` is a list of ports and ranges, ``22,80,8000-8100``; its ``protocol`` is
``tcp`` (the default) or ``udp``, and a rule allows streams of its protocol only.

Hosts, of rules and of requests alike, are compared after one normalisation
(:func:`parse_target`): lower case, IDNA 2008 with UTS 46 for non-ASCII names (so
``Bücher.example`` and ``xn--bcher-kva.example`` are one name), one trailing dot removed,
brackets removed from IPv6 literals, IPv4-mapped IPv6 (``::ffff:10.0.0.1``) taken as its
IPv4 address.  The host that a caller dials is :attr:`Target.host`, the normalised one that
was checked: a request for ``127.0.0.1.`` is checked and dialled as the IP literal
``127.0.0.1`` (never a DNS query for a name that only looks like the entry), and
``localhost.`` is dialled as ``localhost`` (so ``/etc/hosts`` applies).  Names the
resolver would read as numbers in a legacy form (``127.1``, ``0x7f000001``, ``010.0.0.1``,
any name whose last label is all digits) are refused: their meaning would depend on the
resolver, not on this list.

Every :class:`Decision` says which rule allowed it, or which rule came closest and why the
target was refused, for the log line.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import idna

from tcptunnel._frames import MAX_HOST_BYTES, Reason, printable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RuleKind = Literal["address", "network", "name", "suffix"]
ProxyProtocol = Literal["v1", "v2"]
Protocol = Literal["tcp", "udp"]

# ::ffff:0:0/96: IPv4-mapped IPv6 addresses, which a dual-stack socket dials as IPv4.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_PORT_ITEM = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
# A DNS name as resolvers take it, after IDNA: letters, digits, '-' and '_' (SRV-style and
# some internal names) in dot-separated labels.  Anything else (':', '%', '@', '*', ...)
# is no name getaddrinfo should see.
_NAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")
# A config attribute is a few KiB at most; a port list longer than this is a mistake.
MAX_PORT_ITEMS = 1024


class AllowListError(ValueError):
    """A rule (``<Endpoint>``) cannot be used; the message says why."""


class TargetError(ValueError):
    """A requested target host is malformed; the message says why (for INVALID_TARGET)."""


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it stands for; others unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_address(text: str) -> IPAddress | None:
    """The IP address ``text`` spells (``[v6]`` brackets allowed, IPv4-mapped made IPv4), or
    None when ``text`` is not an IP literal.  Zone indices (``fe80::1%eth0``) are refused."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        if "%" in inner:
            raise TargetError(f"{printable(text)!r}: a zone index is not allowed")
        try:
            return _unmapped(ipaddress.IPv6Address(inner))
        except ValueError:
            raise TargetError(f"{printable(text)!r} is not an IPv6 address") from None
    if "%" in text:
        raise TargetError(f"{printable(text[:64])!r}: a zone index is not allowed")
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def _legacy_numeric(name: str) -> bool:
    """True if a resolver could read ``name`` as an IPv4 address in a legacy numeric form
    (``inet_aton``: ``127.1``, ``0x7f000001``, octal) or its last label is all digits (no
    top-level domain is, RFC 3696 §2)."""
    if name.rsplit(".", 1)[-1].isdigit():
        return True
    try:
        socket.inet_aton(name)  # pure: parses, no I/O
    except OSError:
        return False
    return True


def normalise_name(text: str) -> str:
    """A host name as compared and dialled: lower case, IDNA (ASCII), no trailing dot.

    Raises TargetError for what cannot be a DNS name (empty labels, a label over 63 bytes,
    more than 253 bytes, spaces, controls, ``/``)."""
    if not text or not text.isprintable() or any(c in text for c in " /\\"):
        raise TargetError(f"invalid host {printable(text[:64])!r}")
    name = text[:-1] if text.endswith(".") else text
    if name.isascii():
        ascii_name = name.lower()  # "xn--" labels are compared as they are sent
    else:
        # IDNA 2008 with the UTS 46 mapping, as browsers and curl (libidn2) convert names
        # before they send them: "straße.de" is xn--strae-oqa.de, not Python's IDNA 2003
        # "strasse.de", so a rule and the request a client sends for it agree.
        try:
            ascii_name = idna.encode(name, uts46=True).decode("ascii").lower()
        except UnicodeError:  # idna.IDNAError is one
            raise TargetError(f"invalid host name {printable(text[:64])!r}") from None
    if len(ascii_name) > MAX_HOST_BYTES or not _NAME.fullmatch(ascii_name):
        raise TargetError(f"invalid host name {printable(text[:64])!r}")
    return ascii_name


@dataclass(frozen=True, slots=True)
class Target:
    """A requested host after normalisation: what is checked is what is dialled.

    ``host`` is the IP literal in its compressed form (IPv4 for IPv4-mapped) or the
    normalised name; ``address`` is the IP address, None for a name."""

    host: str
    address: IPAddress | None

    @property
    def is_name(self) -> bool:
        """True when dialling needs the resolver."""
        return self.address is None


def parse_target(host: str) -> Target:
    """Normalise a requested host (raises TargetError)."""
    if not host:
        raise TargetError("empty host")
    if len(host.encode("utf-8", errors="replace")) > MAX_HOST_BYTES + 2:
        raise TargetError(f"host of more than {MAX_HOST_BYTES} bytes")
    address = parse_address(host)
    if address is None and host.endswith(".") and not host.endswith(".."):
        # "127.0.0.1." is the IP literal 127.0.0.1: checked and dialled as that, so a DNS
        # answer for a name that looks like the entry cannot redirect it.
        address = parse_address(host[:-1])
    if address is not None:
        return Target(address.compressed, address)
    name = normalise_name(host)
    if _legacy_numeric(name):
        raise TargetError(f"{printable(host[:64])!r} is a number, not an IP literal or a "
                          "host name (write the address as a.b.c.d)")
    return Target(name, None)


@dataclass(frozen=True, slots=True)
class PortSet:
    """Ports of a rule: ``22``, ``22,80,8000-8100`` (sorted, merged ranges)."""

    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, text: str) -> PortSet:
        """Parse a comma-separated list of ports and ``low-high`` ranges (1-65535)."""
        items = text.split(",")
        if len(items) > MAX_PORT_ITEMS:
            raise AllowListError(f"more than {MAX_PORT_ITEMS} ports or ranges")
        ranges: list[tuple[int, int]] = []
        for item in items:
            match = _PORT_ITEM.fullmatch(item.strip())
            if match is None:
                raise AllowListError(f"{item.strip()!r} is not a port (1-65535) or a range "
                                     "of ports (low-high)")
            low = int(match.group(1))
            high = int(match.group(2)) if match.group(2) is not None else low
            if not 1 <= low <= high <= 65535:
                raise AllowListError(f"{item.strip()!r}: ports are 1-65535, low before high")
            ranges.append((low, high))
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for low, high in ranges:
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
            else:
                merged.append((low, high))
        return cls(tuple(merged))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(low <= port <= high for low, high in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in self.ranges)


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One ``<Endpoint>``: a host pattern and its ports, with where it was written."""

    kind: RuleKind
    # "address"/"network": the IPv4/IPv6 network (an address is a /32 or /128);
    # "name": the normalised name; "suffix": the normalised suffix after "*.".
    network: IPNetwork | None
    name: str
    ports: PortSet
    written: str  # the host attribute as written, for logs
    where: str = field(default="", compare=False)  # "file:line", for logs
    # proxyProtocol="v1"|"v2": the header to send to targets this rule allowed
    # (tcptunnel._proxyproto.build_header); the rule of the Decision decides.
    proxy_protocol: ProxyProtocol | None = None
    # protocol="tcp"|"udp" (<Endpoint protocol=...>): a tcp rule never allows a udp stream,
    # nor a udp rule a tcp one.
    protocol: Protocol = "tcp"

    def describe(self) -> str:
        """``host="..." port="..."`` and where, for log lines."""
        place = f" at {self.where}" if self.where else ""
        udp = ' protocol="udp"' if self.protocol == "udp" else ""
        return f'<Endpoint host="{self.written}" port="{self.ports}"{udp}>{place}'

    def matches_host(self, target: Target) -> bool:
        """Whether the host part of this rule covers ``target`` (ports aside)."""
        if target.address is not None:
            return self.network is not None and _in_network(target.address, self.network)
        if self.kind == "name":
            return target.host == self.name
        if self.kind == "suffix":
            return target.host.endswith("." + self.name)  # both normalised: label-wise
        return False


def _in_network(address: IPAddress, network: IPNetwork) -> bool:
    return address.version == network.version and address in network


def parse_rule(host: str, ports: str, where: str = "",
               proxy_protocol: str | None = None, protocol: str = "tcp") -> AllowRule:
    """An ``<Endpoint host=... port=... [proxyProtocol=...] [protocol=...]>`` as a rule
    (raises AllowListError)."""
    rule = _parse_rule(host, ports, where, proxy_protocol)
    if protocol not in ("tcp", "udp"):
        raise AllowListError(f"protocol is tcp or udp, not {printable(protocol)!r}")
    if protocol == "udp" and proxy_protocol is not None:
        # A PROXY header is the first bytes of a TCP connection; a UDP flow has none.
        raise AllowListError("proxyProtocol applies to tcp Endpoints only")
    return replace(rule, protocol=cast("Protocol", protocol))


def _parse_rule(host: str, ports: str, where: str, proxy_protocol: str | None) -> AllowRule:
    port_set = PortSet.parse(ports)
    if proxy_protocol not in (None, "v1", "v2"):
        raise AllowListError(f"proxyProtocol is v1 or v2, not {printable(proxy_protocol)!r}")
    pp = cast("ProxyProtocol | None", proxy_protocol)  # checked just above
    written = printable(host)
    if "/" in host:
        try:
            network = ipaddress.ip_network(host.strip("[]") if host.startswith("[") else host)
        except ValueError as e:
            raise AllowListError(f"{written!r} is not a network (a.b.c.d/n or x::/n): "
                                 f"{e}") from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            # ::ffff:10.0.0.0/104 is 10.0.0.0/8: targets are compared as IPv4 (see _unmapped).
            network = ipaddress.IPv4Network(
                (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
        return AllowRule("network", network, "", port_set, written, where, pp)
    if host.startswith("*."):
        try:
            suffix = normalise_name(host[2:])
        except TargetError:
            raise AllowListError(f"{written!r}: after '*.' comes a host name") from None
        if "*" in suffix:
            raise AllowListError(f"{written!r}: '*' is allowed only as the whole first label")
        return AllowRule("suffix", None, suffix, port_set, written, where, pp)
    if "*" in host:
        raise AllowListError(f"{written!r}: '*' is allowed only as the whole first label "
                             "(*.example.org)")
    try:
        target = parse_target(host)  # the same normalisation as a request's host
    except TargetError as e:
        raise AllowListError(str(e)) from None
    if target.address is not None:
        return AllowRule("address", ipaddress.ip_network(target.address), "", port_set,
                         written, where, pp)
    return AllowRule("name", None, target.host, port_set, written, where, pp)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check.

    ``reason`` is OK, DENIED or INVALID_TARGET (the OPEN_RESULT to send when not OK);
    ``rule`` the rule that allowed it, or, for a denial, the rule whose host matched but
    not its port (None when no rule came near); ``why`` a sentence for the log.  With
    ``resolve`` the target is a name that must be resolved and its addresses passed to
    :meth:`AllowList.check_addresses` before anything is dialled."""

    reason: Reason
    target: Target | None
    port: int
    rule: AllowRule | None
    why: str
    resolve: bool = False

    @property
    def allowed(self) -> bool:
        """True when the stream may go on (to a dial, or to resolution first)."""
        return self.reason is Reason.OK


@dataclass(frozen=True, slots=True)
class AddressDecision:
    """Which of a name's resolved addresses may be dialled, and why the others may not."""

    allowed: tuple[tuple[IPAddress, AllowRule], ...]
    refused: tuple[tuple[str, str], ...]

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """The addresses to dial, in the resolver's order."""
        return tuple(address for address, _ in self.allowed)

    def why(self) -> str:
        """A sentence for the log."""
        parts = [f"{address} allowed by {rule.describe()}" for address, rule in self.allowed]
        parts += [f"{address} refused: {why}" for address, why in self.refused]
        return "; ".join(parts) or "the name resolved to no address"


class AllowList:
    """The rules of one Proxy-Client, in file order; ``rules=None`` allows every target.

    With ``check_resolved_addresses`` a name must match a name rule (exact or ``*.``) as
    always, *and* it is dialled only at those of its resolved addresses that an address
    or network rule allows for the port (no DNS answer leads past the list)."""

    def __init__(self, rules: Sequence[AllowRule] | None,
                 check_resolved_addresses: bool = False) -> None:
        self.rules = None if rules is None else tuple(rules)
        self.check_resolved_addresses = check_resolved_addresses
        if self.rules is None and check_resolved_addresses:
            raise AllowListError("checkResolvedAddresses needs an allow-list")

    def check(self, host: str, port: int, protocol: Protocol = "tcp") -> Decision:
        """Check a requested ``host``/``port`` for a stream of ``protocol``; dial
        ``decision.target.host`` if allowed."""
        if not 1 <= port <= 65535:
            return Decision(Reason.INVALID_TARGET, None, port, None, f"invalid port {port}")
        try:
            target = parse_target(host)
        except TargetError as e:
            return Decision(Reason.INVALID_TARGET, None, port, None, str(e))
        if self.rules is None:
            return Decision(Reason.OK, target, port, None,
                            "no AllowedTargetEndpoints: every target is allowed")
        near: AllowRule | None = None
        other: AllowRule | None = None  # host and port match, of the other protocol
        for rule in self.rules:
            if not rule.matches_host(target):
                continue
            if port not in rule.ports:
                near = near or rule
                continue
            if rule.protocol != protocol:
                other = other or rule
                continue
            if target.is_name and self.check_resolved_addresses:
                if not any(port in r.ports for r in self.rules
                           if r.network is not None and r.protocol == protocol):
                    return Decision(
                        Reason.DENIED, target, port, rule,
                        f"{rule.describe()} allows the name, but with checkResolvedAddresses "
                        f"its addresses must be in a network allowed for port {port}, and "
                        "there is none")
                return Decision(Reason.OK, target, port, rule,
                                f"name allowed by {rule.describe()}; its addresses are "
                                "checked when resolved", resolve=True)
            return Decision(Reason.OK, target, port, rule, f"allowed by {rule.describe()}")
        shown = target.host if target.is_name else target.host + " (an IP literal)"
        if other is not None:
            return Decision(Reason.DENIED, target, port, other,
                            f"{protocol} to port {port} of {shown} is not allowed: "
                            f"{other.describe()} allows {other.protocol} only")
        if near is not None:
            return Decision(Reason.DENIED, target, port, near,
                            f"port {port} of {shown} is not allowed: {near.describe()} "
                            f"allows only ports {near.ports}")
        what = ("no name rule (exact or *.) matches" if target.is_name
                else "no address or network rule contains it")
        return Decision(Reason.DENIED, target, port, None,
                        f"{shown} is not in AllowedTargetEndpoints: {what}")

    def check_addresses(self, port: int, addresses: Iterable[str | IPAddress],
                        protocol: Protocol = "tcp") -> AddressDecision:
        """Which resolved ``addresses`` an address or network rule allows for ``port``
        (and ``protocol``)."""
        allowed: list[tuple[IPAddress, AllowRule]] = []
        refused: list[tuple[str, str]] = []
        rules = () if self.rules is None else self.rules
        for item in addresses:
            try:
                address = item if not isinstance(item, str) else parse_address(item)
            except TargetError:
                address = None
            if address is None:
                refused.append((printable(str(item)[:64]), "not an IP address"))
                continue
            address = _unmapped(address)
            rule = next((r for r in rules if r.network is not None and port in r.ports
                         and r.protocol == protocol and _in_network(address, r.network)),
                        None)
            if rule is None:
                refused.append((address.compressed,
                                f"no address or network rule allows it for port {port}"))
            else:
                allowed.append((address, rule))
        return AddressDecision(tuple(allowed), tuple(refused))
