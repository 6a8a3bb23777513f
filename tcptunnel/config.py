"""Read ``settings.xml`` into frozen, typed dataclasses.

The format is the original TcpTunnel's (root ``Settings`` in the namespace
``https://github.com/kpreisser/TcpTunnel``, ``Instance`` elements of type
gateway / proxy-client / proxy-server), so an existing file loads unchanged.
Our additions are optional attributes; ``docs/configuration.md`` lists them.

What the original accepts and ignores (unknown attributes and elements, elements in
another or no namespace, a second ``<Session>`` in a proxy, ...) is accepted here too, with
a warning that names file and line and, for a near miss, the setting it resembles; the
warnings travel with the parsed objects (``Settings.warnings``, ``GatewayConfig.warnings``,
``ProxyConfig.warnings``) for the services to log at start-up.  A near miss of a setting
whose loss would be unsafe (``useSsl``, ``listenIp``, ``AllowedTargetEndpoints``, ...) is an
error, as are values the original reads differently from us in an unsafe way
(``useSsl="on"``).  Every error is a single :class:`ConfigError` whose message names the
file, line, element and attribute and says what was expected.  Parsing goes through
defusedxml with DTDs forbidden, so entity bombs and external entities are refused before
they expand.  ``docs/configuration.md`` lists every case.

This module has no Twisted imports.
"""

from __future__ import annotations

import base64
import difflib
import io
import ipaddress
import os
import re
import shlex
import socket
import stat
import xml.sax
import xml.sax.handler
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import defusedxml
import defusedxml.sax

from tcptunnel._allow import AllowListError, AllowRule, PortSet, parse_rule
from tcptunnel._outbound import ProxyUrl, parse_proxy_url, proxy_from_environment
from tcptunnel._websocket import Network, parse_networks

NAMESPACE = "https://github.com/kpreisser/TcpTunnel"
# Attributes in the XML Schema instance namespace (xsi:schemaLocation) are there for
# editors, and xml:lang / xml:space are XML's own annotations: all accepted silently.
_SILENT_ATTRIBUTE_NAMESPACES = frozenset({
    "http://www.w3.org/2001/XMLSchema-instance",
    "http://www.w3.org/XML/1998/namespace",
})
# Near misses of these attributes and elements are errors, not warnings: ignoring the
# misspelt setting, as the original does, would run without TLS or its verification,
# listen on every address, or let the Proxy-Client dial any target.
_GUARDED_ATTRIBUTES = frozenset({
    "useSsl", "caFile", "serverName", "certificatePin", "listenIp", "ip",
    "certificatePemFilePath", "certificatePemKeyFilePath", "certificatePfxFilePath",
})
_GUARDED_ELEMENTS = frozenset({"AllowedTargetEndpoints"})
# A settings file is a few KiB; anything far larger is a mistake or an attack.
MAX_CONFIG_BYTES = 4 * 1024 * 1024

Role = Literal["gateway", "proxy-client", "proxy-server"]
ROLES: tuple[Role, ...] = ("gateway", "proxy-client", "proxy-server")

_T = TypeVar("_T")


class ConfigError(Exception):
    """A settings file cannot be used; the message says where and why."""


class StartupError(Exception):
    """An instance cannot start (a port is taken, a certificate is unusable, ...)."""


@dataclass(frozen=True)
class Location:
    """Where something was written: file and 1-based line."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class TlsFiles:
    """The certificate source of a TLS listener: PEM pair or PKCS#12 file."""

    pem_certificate: str | None = None
    pem_key: str | None = None
    pfx_file: str | None = None
    pfx_password: str | None = None


@dataclass(frozen=True)
class Secret:
    """A password for one role, as cleartext or as a SCRAM-SHA-256 verifier.

    ``verifier`` is PostgreSQL's format:
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``.
    """

    cleartext: str | None = None
    verifier: str | None = None

    def __repr__(self) -> str:
        # Keep secrets out of logs and tracebacks.
        kind = "cleartext" if self.cleartext is not None else "verifier"
        return f"Secret(<{kind}>)"


@dataclass(frozen=True)
class ListenerConfig:
    """A Gateway ``<Listener>``: address, port and optional TLS files."""

    ip: str | None
    port: int
    tls: TlsFiles | None
    location: Location = field(compare=False)
    # Links arrive as WebSockets on this path (ours; None: the link protocol on TCP/TLS).
    websocket_path: str | None = None
    # Reverse proxies whose X-Forwarded-For is believed (ours; WebSocket Listeners only).
    trusted_proxies: tuple[Network, ...] = ()
    # Sources that must start each connection with a PROXY header (v1/v2), refused from
    # anyone else (ours, issue 20: Gateways behind a load balancer).
    accept_proxy_protocol: tuple[Network, ...] = ()

    def describe(self) -> str:
        """Human-readable address, as used in log lines and errors."""
        return format_address(self.ip, self.port)


@dataclass(frozen=True)
class GatewaySessionConfig:
    """A Gateway ``<Session>``: id and the secret for each proxy role."""

    id: int
    proxy_client: Secret
    proxy_server: Secret
    location: Location = field(compare=False)


@dataclass(frozen=True)
class GatewayLimits:
    """Abuse limits and deadlines of a Gateway (our addition; all optional)."""

    login_timeout: float = 10.0
    max_unauthenticated_links: int = 256
    # One address (an IPv6 /64) may hold only an eighth of the unauthenticated
    # slots, so a single host cannot refuse every other login (issue 14, item 3).
    max_unauthenticated_links_per_address: int = 32
    max_links_per_session: int = 64
    max_streams_per_link: int = 1024
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 30.0
    # Bytes the Gateway may queue toward one link, toward all links of one
    # session, and in the whole instance (issue 14, item 1): per link <= per
    # session <= total, checked when the settings are read.
    max_queued_bytes_per_link: int = 64 * 1024 * 1024
    max_queued_bytes_per_session: int = 256 * 1024 * 1024
    max_queued_bytes: int = 1024 * 1024 * 1024
    # Draining (SIGUSR2, issue 20): how long running streams may still finish before the
    # links left are closed.
    drain_timeout: float = 60.0


@dataclass(frozen=True)
class GatewayConfig:
    """A ``<Instance type="gateway">``."""

    index: int
    listeners: tuple[ListenerConfig, ...]
    sessions: tuple[GatewaySessionConfig, ...]
    limits: GatewayLimits
    location: Location = field(compare=False)
    role: Role = "gateway"
    # drain="true" (issue 20): the Gateway drains when a reload sets it (as SIGUSR2 does),
    # and starts without listening while it is set.
    drain: bool = False
    # Start-up warnings about this instance ("file:line: ..."), for the service to log.
    warnings: tuple[str, ...] = field(default=(), compare=False)


BindingType = Literal["tcp", "socks5", "http-connect"]
BINDING_TYPES: tuple[BindingType, ...] = ("tcp", "socks5", "http-connect")


@dataclass(frozen=True)
class BindingConfig:
    """A Proxy-Server ``<Binding>``: a local listener and the target it leads to."""

    listen_ip: str | None
    listen_port: int
    # The fixed target of a type="tcp" Binding; None for socks5 and http-connect, which take
    # the target from each client's request.
    target_host: str | None
    target_port: int | None
    location: Location = field(compare=False)
    # "tcp" (the default, the original's only kind) or "udp" (datagrams, one flow per sender).
    protocol: str = "tcp"
    # UDP: seconds a flow may stay idle (None: tcptunnel._udp.DEFAULT_IDLE_TIMEOUT).
    idle_timeout: float | None = None
    # type="tcp" (a fixed target, the default), "socks5" (RFC 1928) or "http-connect".
    type: BindingType = "tcp"
    # socks5/http-connect: the login clients must give (RFC 1929 / Proxy-Authorization
    # Basic), both or neither.
    username: str | None = None
    password: Secret | None = None

    @property
    def target(self) -> str:
        """``host:port``, or where a socks5/http-connect Binding's targets come from."""
        if self.target_host is None or self.target_port is None:
            return {"socks5": "the target of each SOCKS5 request",
                    "http-connect": "the target of each CONNECT request"}.get(self.type, "?")
        return format_address(self.target_host, self.target_port)

    @property
    def fixed_target(self) -> tuple[str, int]:
        """(host, port) of a type="tcp" Binding (every UDP Binding is one)."""
        if self.target_host is None or self.target_port is None:
            raise ValueError(f'a type="{self.type}" Binding has no fixed target')
        return self.target_host, self.target_port

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(username, password) clients must give, or None."""
        if self.username is None or self.password is None or self.password.cleartext is None:
            return None
        return self.username, self.password.cleartext

    def describe(self) -> str:
        """``listen -> target`` for log lines."""
        return f"{format_address(self.listen_ip, self.listen_port)} -> {self.target}"


@dataclass(frozen=True)
class EndpointConfig:
    """An allowed target of a Proxy-Client: one rule of :mod:`tcptunnel._allow` (host,
    network or ``*.`` suffix; ports and ranges; protocol; proxyProtocol)."""

    rule: AllowRule
    location: Location = field(compare=False)

    @property
    def protocol(self) -> str:
        """``tcp`` or ``udp``: a tcp entry never allows UDP, and vice versa."""
        return self.rule.protocol

    def describe(self) -> str:
        """``host:ports`` as written, for check-config."""
        host = self.rule.written
        if ":" in host and "/" not in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.rule.ports}" + (" (udp)" if self.rule.protocol == "udp" else "")


@dataclass(frozen=True)
class GatewayAddress:
    """A proxy's ``<Gateway host=... port=... serverName=...>`` (ours, issue 20): another
    Gateway to try, in order, after the Instance's own host and port."""

    host: str
    port: int
    server_name: str | None
    location: Location = field(compare=False)
    # The WebSocket path this Gateway is dialled with, None: the link protocol on TCP/TLS.
    # The Instance's unless the entry says its own (webSocketPath="" for none): a list may
    # mix a plain TLS Gateway and a WebSocket Listener behind a reverse proxy.
    websocket_path: str | None = None

    def describe(self) -> str:
        """host:port as in log lines."""
        return format_address(self.host, self.port)


@dataclass(frozen=True)
class ProxyConfig:
    """A ``<Instance type="proxy-client">`` or ``type="proxy-server"``."""

    index: int
    role: Role
    host: str
    port: int
    use_tls: bool
    session_id: int
    password: Secret
    bindings: tuple[BindingConfig, ...]
    # None: no AllowedTargetEndpoints element (everything allowed);
    # an empty tuple: the element is present and empty (nothing allowed).
    allowed_targets: tuple[EndpointConfig, ...] | None
    ca_file: str | None
    server_name: str | None
    certificate_pin: bytes | None
    location: Location = field(compare=False)
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 30.0
    connect_timeout: float = 10.0
    max_retry_delay: float = 30.0
    # Flow control of the streams this proxy receives (ours): the window granted
    # per stream at open, and how far it may grow for a fast reader on a long path.
    initial_window: int = 384 * 1024
    max_window: int = 16 * 1024 * 1024
    # Start-up warnings about this instance ("file:line: ..."), for the service to log.
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # The outbound HTTP CONNECT or SOCKS5 proxy the link goes through (ours), or None.
    outbound_proxy: ProxyUrl | None = None
    # The link is a WebSocket to this path on the Gateway (ours), or None.
    websocket_path: str | None = None
    # <AllowedTargetEndpoints checkResolvedAddresses="true">: a name is dialled only at
    # resolved addresses that an address or network Endpoint allows (tcptunnel._allow).
    check_resolved_addresses: bool = False
    # <Session endToEndPassword=...> (ours, issue 16): every stream sealed between the two
    # proxies (tcptunnel._e2e, docs/protocol.md §9); None: streams in clear.
    e2e_password: Secret | None = None
    # <Gateway> children (ours, issue 20): the Gateways tried after host/port when a
    # connection fails, in order (tcptunnel.proxy.ProxyService.targets).
    gateways: tuple[GatewayAddress, ...] = ()


InstanceConfig = GatewayConfig | ProxyConfig


@dataclass(frozen=True)
class StatusConfig:
    """``<Status>`` (ours): where the process serves /metrics, /status and its status page."""

    listen_ip: str
    listen_port: int
    location: Location = field(compare=False)
    # Host header names served besides IP literals and localhost (lower case, IDNA, no
    # trailing dot): other names are refused, against DNS rebinding.
    host_names: tuple[str, ...] = ()


def _host_names(text: str) -> tuple[str, ...]:
    """``hostNames``: comma-separated host names, normalised for comparison with Host."""
    names = []
    for item in text.split(","):
        name = normalise_host(_host(item.strip()).encode("idna").decode("ascii"))
        if not name or any(c in name for c in ":[]"):
            raise ValueError(text)
        names.append(name)
    return tuple(names)


_HOST_NAMES_WHAT = "comma-separated host names without ports (e.g. status.example.org,other)"


@dataclass(frozen=True)
class Settings:
    """A whole settings file: its instances in file order, and the optional status server."""

    path: str
    instances: tuple[InstanceConfig, ...] = field(default_factory=tuple)
    status: StatusConfig | None = None
    # Warnings about the file itself (not about one instance): what was ignored outside
    # the instances, a file others can read, no instance at all.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def all_warnings(self) -> list[str]:
        """Every warning, the file's first, then each instance's prefixed ``[N] ``."""
        return list(self.warnings) + [f"[{instance.index}] {warning}"
                                      for instance in self.instances
                                      for warning in instance.warnings]


def format_address(host: str | None, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed and ``*`` for "any"."""
    if host is None:
        return f"*:{port}"
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def normalise_host(host: str) -> str:
    """Lower-case a host name and drop one trailing dot, for comparisons."""
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


# ---------------------------------------------------------------------------
# A minimal element tree that remembers line numbers.


@dataclass
class _Node:
    name: str
    attributes: dict[str, str]
    line: int
    children: list[_Node] = field(default_factory=list)
    namespace: str | None = NAMESPACE
    # Attributes in a namespace other than xsi: / xml: ("{uri}name"), ignored with a warning.
    foreign_attributes: list[str] = field(default_factory=list)


class _TreeBuilder(xml.sax.handler.ContentHandler):
    """Build :class:`_Node` objects from namespace-aware SAX events."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path
        self._stack: list[_Node] = []
        self.root: _Node | None = None
        self._locator: xml.sax.xmlreader.Locator | None = None

    def setDocumentLocator(self, locator: xml.sax.xmlreader.Locator) -> None:  # noqa: N802
        """Keep the locator: it gives each element's line number."""
        self._locator = locator

    def _line(self) -> int:
        return int(self._locator.getLineNumber() or 0) if self._locator is not None else 0

    def startElementNS(  # noqa: N802
        self,
        name: tuple[str | None, str],
        qname: str | None,
        attrs: xml.sax.xmlreader.AttributesNSImpl,
    ) -> None:
        """Record an element with its namespace, attributes and line; the root must be
        in our namespace (the original fails otherwise too); other elements outside it are
        kept for the reader to warn about and skip."""
        uri, local = name
        line = self._line()
        if uri != NAMESPACE and not self._stack:
            shown = f"{{{uri}}}{local}" if uri else local
            raise ConfigError(
                f"{self._path}:{line}: element <{shown}> is not in the namespace "
                f"{NAMESPACE!r}; every element needs xmlns=\"{NAMESPACE}\" (set on <Settings>)"
            )
        attributes: dict[str, str] = {}
        foreign: list[str] = []
        for (attr_uri, attr_local), value in attrs.items():
            if attr_uri in _SILENT_ATTRIBUTE_NAMESPACES:
                continue
            if attr_uri:
                foreign.append(f"{{{attr_uri}}}{attr_local}")
                continue
            attributes[attr_local] = value
        node = _Node(local, attributes, line, namespace=uri, foreign_attributes=foreign)
        if self._stack:
            self._stack[-1].children.append(node)
        else:
            self.root = node
        self._stack.append(node)

    def endElementNS(self, name: tuple[str | None, str], qname: str | None) -> None:  # noqa: N802
        """Close the current element."""
        self._stack.pop()


def _parse_tree(path: str, data: bytes) -> _Node:
    builder = _TreeBuilder(path)
    parser = defusedxml.sax.make_parser()
    parser.forbid_dtd = True
    parser.setFeature(xml.sax.handler.feature_namespaces, True)
    parser.setContentHandler(builder)
    source = xml.sax.xmlreader.InputSource(path)
    source.setByteStream(io.BytesIO(data))
    try:
        parser.parse(source)
    except ConfigError:
        raise
    except defusedxml.DTDForbidden as e:
        raise ConfigError(
            f"{path}:{parser.getLineNumber()}: a DTD (<!DOCTYPE ...>) is not allowed in a "
            "settings file: it could define entities that expand or load external files"
        ) from e
    except defusedxml.DefusedXmlException as e:
        raise ConfigError(f"{path}:{parser.getLineNumber()}: refused unsafe XML: {e}") from e
    except xml.sax.SAXParseException as e:
        raise ConfigError(
            f"{path}:{e.getLineNumber()}: not well-formed XML: {e.getMessage()}"
        ) from e
    if builder.root is None:  # pragma: no cover - expat reports an empty document itself
        raise ConfigError(f"{path}:1: the file holds no XML element")
    return builder.root


# ---------------------------------------------------------------------------
# Typed attribute access.


class _Element:
    """One element being read: typed getters that record which attributes were used, and
    a sink for the warnings about it (shared with its children)."""

    def __init__(self, path: str, node: _Node, sink: list[str] | None = None) -> None:
        self.path = path
        self.node = node
        self.location = Location(path, node.line)
        self.sink: list[str] = [] if sink is None else sink
        self._used: set[str] = set()

    def _where(self, attribute: str | None) -> str:
        where = f"<{self.node.name}>"
        if attribute is not None:
            where += f" attribute {attribute!r}"
        return where

    def error(self, message: str, attribute: str | None = None) -> ConfigError:
        """A ConfigError located at this element (and attribute, if named)."""
        return ConfigError(f"{self.location}: {self._where(attribute)}: {message}")

    def warn(self, message: str, attribute: str | None = None) -> None:
        """Record a warning located at this element (and attribute, if named)."""
        self.sink.append(f"{self.location}: {self._where(attribute)}: {message}")

    def raw(self, name: str) -> str | None:
        """An attribute's text, or None; marks it as known."""
        self._used.add(name)
        return self.node.attributes.get(name)

    def required(self, name: str) -> str:
        """An attribute's text; missing is an error (with a typo hint)."""
        value = self.raw(name)
        if value is None:
            typo = _near_miss(name, self.node.attributes)
            hint = f" (is the unknown attribute {typo!r} a typo?)" if typo else ""
            raise self.error(f"missing required attribute {name!r}{hint}")
        return value

    def get(self, name: str, convert: Callable[[str], _T], what: str) -> _T | None:
        """An optional attribute converted; a bad value is an error saying ``what`` was
        expected."""
        value = self.raw(name)
        if value is None:
            return None
        try:
            return convert(value)
        except ValueError:
            raise self.error(f"expected {what}, got {value!r}", name) from None

    def get_required(self, name: str, convert: Callable[[str], _T], what: str) -> _T:
        """A required attribute converted."""
        self.required(name)
        result = self.get(name, convert, what)
        assert result is not None
        return result

    def check_unknown_attributes(self) -> None:
        """Warn about attributes that no getter asked for, as the original ignores them; a
        near miss of a guarded attribute (see ``_GUARDED_ATTRIBUTES``) is an error."""
        known = sorted(self._used)
        for name in sorted(set(self.node.attributes) - self._used):
            typo = _near_miss(name, known)
            if typo is None and "useSsl" in known and re.search("ssl|tls", name, re.I):
                typo = "useSsl"  # useTls="true", ssl="1": meant to switch TLS on
            if typo in _GUARDED_ATTRIBUTES:
                raise self.error(
                    f"unknown attribute {name!r}: is it a typo of {typo!r}? Ignoring it, as "
                    f"the original would, could run without the protection {typo!r} "
                    "gives, so it is refused",
                    name)
            hint = f", a typo of {typo!r}?" if typo else ""
            self.warn(f"unknown, ignored{hint} (known here: {', '.join(known) or 'none'})",
                      name)
        for name in self.node.foreign_attributes:
            self.warn(f"attribute {name} is in a foreign namespace and is ignored "
                      "(attributes take no namespace prefix)")

    def children(self, allowed: Collection[str],
                 ignored: Mapping[str, str] | None = None) -> Iterator[_Element]:
        """Child elements named in ``allowed``.  Others are skipped with a warning, as the
        original skips them: ``ignored`` maps a name to the reason given for skipping it;
        elements outside our namespace, and unknown names, get a generic one (with a typo
        hint); a near miss of a guarded element (``_GUARDED_ELEMENTS``) is an error."""
        for child in self.node.children:
            element = _Element(self.path, child, self.sink)
            if child.namespace != NAMESPACE:
                shown = f"{{{child.namespace}}}{child.name}" if child.namespace else child.name
                where = f"in the namespace {child.namespace!r}" if child.namespace else \
                    "in no namespace"
                hint = (f"; to use it, put it in xmlns=\"{NAMESPACE}\"" if child.name in allowed
                        else "")
                self.sink.append(f"{element.location}: element <{shown}> inside "
                                 f"<{self.node.name}> is {where} and is ignored{hint}")
                continue
            if child.name in allowed:
                yield element
                continue
            if ignored and child.name in ignored:
                element.warn(f"ignored: {ignored[child.name]}")
                continue
            typo = _near_miss(child.name, allowed)
            if typo in _GUARDED_ELEMENTS:
                raise element.error(
                    f"unknown element inside <{self.node.name}>: is it a typo of <{typo}>? "
                    f"Ignoring it, as the original would, would run without <{typo}>: the "
                    "Proxy-Client would dial any target a Proxy-Server asks for")
            expected = ", ".join(f"<{n}>" for n in allowed) or "no child elements"
            hint = f", a typo of <{typo}>?" if typo else ""
            element.warn(f"unknown element inside <{self.node.name}> ignored (expected "
                         f"{expected}{hint})")


def _near_miss(name: str, candidates: Collection[str]) -> str | None:
    """The candidate ``name`` is probably a misspelling of (any case), or None."""
    folded = {c.lower(): c for c in candidates}
    if name.lower() in folded:
        return folded[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.75)
    return folded[close[0]] if close else None


# The original reads numbers with .NET's int.Parse: ASCII digits, an optional sign, white
# space around; Python's int() would also take "2_5990" and other scripts' digits.
_INTEGER = re.compile(r"[\t\n\v\f\r ]*[+-]?[0-9]+[\t\n\v\f\r ]*")
_DECIMAL = re.compile(r"\s*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*", re.ASCII)


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not _INTEGER.fullmatch(text):
            raise ValueError(text)  # "2_5990", other scripts' digits: the original refuses
        value = int(text.strip(), 10)
        if not low <= value <= high:
            raise ValueError(text)
        return value

    return convert


def _positive_seconds(text: str) -> float:
    if not _DECIMAL.fullmatch(text):
        raise ValueError(text)  # float() would take "1_0", "inf", other scripts' digits
    value = float(text.strip())
    if not 0 < value <= 86400:
        raise ValueError(text)
    return value


def _ip_literal(text: str) -> str:
    """An IP literal in its canonical form; also the short and numeric IPv4 forms .NET's
    IPAddress.Parse (so the original) reads as inet_aton does: 127.1, 0x7f.0.0.1."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        # inet_aton stops at white space and ignores what follows: check the text first.
        if not re.fullmatch(r"[0-9A-Fa-fXx.]+", text.strip()):
            raise
        try:
            return str(ipaddress.IPv4Address(socket.inet_aton(text.strip())))
        except OSError:
            raise ValueError(text) from None


def _ip(element: _Element, name: str) -> str | None:
    """An optional IP attribute; a short IPv4 form gets a warning saying how it was read."""
    value = element.get(name, _ip_literal, _IP_WHAT)
    text = element.raw(name)
    if value is not None and text is not None and text.strip() != value:
        try:
            ipaddress.ip_address(text.strip())
        except ValueError:
            element.warn(f"{text!r} is read as {value}, as the original reads it; write "
                         f"{value}", name)
    return value


_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no", "")


def _bool(text: str) -> bool:
    """useSsl.  The original reads exactly 1/true/yes (any case) as true and every other
    value as false.  Values both readings agree on are accepted; the others are refused
    (see _bool_what): "true " is plain TCP there, and "on" is too, which is not what
    whoever wrote it meant."""
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered.strip() in _FALSE:
        return False
    raise ValueError(text)


def _bool_what(text: str) -> str:
    """Why a useSsl value is refused."""
    if text.strip().lower() in _TRUE:
        return (f"exactly 1, true or yes (or 0, false, no): {text!r} has white space "
                "around it, which the original reads as false (plain TCP, no encryption), "
                "so it is refused rather than guessed")
    return ("1/true/yes or 0/false/no: the original reads any other value as false (plain "
            "TCP, no encryption), so it is refused rather than guessed")


def _host(text: str) -> str:
    encoded = text.encode("idna") if not text.isascii() else text.encode("ascii")
    if not 1 <= len(encoded) <= 253 or any(c in text for c in " \t\r\n/\x00"):
        raise ValueError(text)
    return text


def _sha256_pin(text: str) -> bytes:
    cleaned = re.sub(r"[:\s]", "", text.strip())
    if cleaned.lower().startswith("sha256/"):
        digest = base64.b64decode(cleaned[7:], validate=True)
    else:
        digest = bytes.fromhex(cleaned)
    if len(digest) != 32:
        raise ValueError(text)
    return digest


_VERIFIER = re.compile(
    r"SCRAM-SHA-256\$([0-9]+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)")
# auth.MAX_ITERATIONS (spelt out: auth imports this module).
_MAX_ITERATIONS = 10_000_000


def _verifier(text: str) -> str:
    """A SCRAM-SHA-256 verifier, checked as the Gateway will read it at start-up."""
    match = _VERIFIER.fullmatch(text.strip())
    if not match:
        raise ValueError(text)
    try:
        keys = [base64.b64decode(part, validate=True) for part in match.groups()[1:]]
    except (ValueError, TypeError):
        raise ValueError(text) from None
    if not 1 <= int(match.group(1)) <= _MAX_ITERATIONS or len(keys[1]) != 32 \
            or len(keys[2]) != 32 or not keys[0]:
        raise ValueError(text)
    return text.strip()


_PORT = _int_in(1, 65535)
_PORT_OR_ZERO = _int_in(0, 65535)
_INT32 = _int_in(-(2**31), 2**31 - 1)
_PORT_WHAT = "a port number from 1 to 65535"
_PORT_OR_ZERO_WHAT = "a port number from 0 to 65535 (0: any free port)"
_IP_WHAT = "an IPv4 or IPv6 address literal (leave the attribute out to listen on all addresses)"
_HOST_WHAT = "a host name or address of 1 to 253 bytes"
_ROLE_NAMES = {"proxyClientPassword": "Proxy-Client", "proxyServerPassword": "Proxy-Server"}


# ---------------------------------------------------------------------------
# File permissions.


def others_access_warning(path: str, what: str) -> str | None:
    """A warning when users other than the owner and group may read or write ``path``
    (a file holding a secret), naming its mode and the chmod that fixes it; None when
    they may not, or the file cannot be examined (reading it reports that)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if not mode & 0o006:
        return None
    return (f"the {what} {path} is open to other users (mode {mode:04o}), who can read "
            f"the secret in it: run chmod o-rwx {shlex.quote(path)}")


# ---------------------------------------------------------------------------
# Element readers.


def _secret(element: _Element, clear_name: str, hash_name: str) -> Secret:
    cleartext = element.raw(clear_name)
    verifier = element.get(hash_name, _verifier, "a SCRAM-SHA-256 verifier "
                           "'SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>' "
                           "with 1 to 10000000 iterations and 32-byte keys "
                           "(make one with: python -m tcptunnel hash-password)")
    if cleartext is not None and verifier is not None:
        raise element.error(f"give either {clear_name!r} or {hash_name!r}, not both")
    if cleartext is None and verifier is None:
        raise element.error(f"missing required attribute {clear_name!r} (or {hash_name!r})")
    if cleartext == "":
        # The original accepts an empty password; so do we, loudly.
        element.warn(
            f"THE PASSWORD IS EMPTY: anyone who can reach the Gateway can log in to this "
            f"session as its {_ROLE_NAMES[clear_name]} (set a long random password, or "
            f"{hash_name})", clear_name)
    return Secret(cleartext=cleartext, verifier=verifier)


def _tls_file(element: _Element, name: str) -> str | None:
    """A certificate or key file attribute of the original, resolved against the settings
    file's folder; a relative one gets a note saying which file that is (the original
    resolved it against its working directory)."""
    value = element.raw(name)
    if value is None:
        return None
    resolved = _relative(element, value)
    if not os.path.isabs(value):
        element.warn(f"the relative path {value!r} names {resolved} (relative to the folder "
                     "of the settings file; the original looked in its working directory)",
                     name)
    return resolved


def _listener(element: _Element) -> ListenerConfig:
    ip = _ip(element, "ip")
    port = element.get_required("port", _PORT_OR_ZERO, _PORT_OR_ZERO_WHAT)
    if element.raw("certificateHash") is not None:
        raise element.error(
            "the Windows certificate store is not supported (the original, too, fails "
            "with it outside Windows): use a PEM or PFX file (certificatePemFilePath + "
            "certificatePemKeyFilePath, or certificatePfxFilePath)",
            "certificateHash",
        )
    pfx = _tls_file(element, "certificatePfxFilePath")
    pfx_password = element.raw("certificatePfxPassword")
    pem = _tls_file(element, "certificatePemFilePath")
    pem_key = _tls_file(element, "certificatePemKeyFilePath")
    tls: TlsFiles | None = None
    if pfx is not None:
        if pem is not None or pem_key is not None:
            element.warn("both a PFX file and PEM files are given: the PFX file is used and "
                         "the PEM attributes are ignored, as in the original",
                         "certificatePemFilePath" if pem is not None
                         else "certificatePemKeyFilePath")
        tls = TlsFiles(pfx_file=pfx, pfx_password=pfx_password)
        key_file = pfx
    elif pem is not None:
        if pem_key is None:
            raise element.error(
                "missing required attribute 'certificatePemKeyFilePath' (the private key "
                "file that goes with certificatePemFilePath; the original fails here too)"
            )
        tls = TlsFiles(pem_certificate=pem, pem_key=pem_key)
        key_file = pem_key
    elif pem_key is not None:
        raise element.error(
            "a key file without a certificate: add certificatePemFilePath. (The original "
            "would run this listener as plain TCP, unencrypted, which the key says was not "
            "meant.)",
            "certificatePemKeyFilePath",
        )
    if pfx_password is not None and pfx is None:
        element.warn("a PFX password without a PFX file is ignored, as in the original",
                     "certificatePfxPassword")
    if tls is not None:
        mode_warning = others_access_warning(key_file, "private key file")
        if mode_warning is not None:
            element.warn(mode_warning)
    websocket_path = element.get("webSocketPath", _websocket_path, _WEBSOCKET_PATH_WHAT)
    trusted = element.get("trustedProxies", parse_networks,
                          "IP addresses or networks separated by commas") or ()
    if trusted and websocket_path is None:
        raise element.error("trustedProxies needs webSocketPath (X-Forwarded-For is read "
                            "only from WebSocket requests)", "trustedProxies")
    accept_proxy = element.get("acceptProxyProtocol", parse_networks,
                               "IP addresses or networks separated by commas") or ()
    element.check_unknown_attributes()
    _no_children(element)
    return ListenerConfig(ip=ip, port=port, tls=tls, location=element.location,
                          websocket_path=websocket_path, trusted_proxies=trusted,
                          accept_proxy_protocol=accept_proxy)


_WEBSOCKET_PATH_WHAT = "a URL path starting with / (e.g. /tunnel), without query or spaces"


def _websocket_path(text: str) -> str:
    """An absolute URL path: printable ASCII, no query, fragment or spaces."""
    if (not text.startswith("/") or len(text) > 256 or any(c in text for c in "?# ")
            or not all("!" <= c <= "~" for c in text)):
        raise ValueError(text)
    return text


def _relative(element: _Element, path: str) -> str:
    """Resolve a file named in the settings relative to the settings file's folder."""
    return os.path.join(os.path.dirname(os.path.abspath(element.path)), path)


# A queue bound must hold at least one largest frame (_frames.MAX_PAYLOAD 65536
# + HEADER_SIZE 9; spelt out here to keep this module free of wire imports), or
# a frame the peer may legally send could never be forwarded.
_QUEUED_BYTES = _int_in(65536 + 9, 2**62)
_QUEUED_BYTES_WHAT = "a number of bytes from 65545 (one largest frame)"


def _gateway(index: int, element: _Element) -> GatewayConfig:
    defaults = GatewayLimits()
    limits = GatewayLimits(
        login_timeout=element.get("loginTimeout", _positive_seconds,
                                  "a number of seconds") or defaults.login_timeout,
        drain_timeout=element.get("drainTimeout", _positive_seconds,
                                  "a number of seconds") or defaults.drain_timeout,
        max_unauthenticated_links=element.get(
            "maxUnauthenticatedLinks", _int_in(1, 1_000_000), "a whole number from 1"
        ) or defaults.max_unauthenticated_links,
        max_links_per_session=element.get(
            "maxLinksPerSession", _int_in(1, 1_000_000), "a whole number from 1"
        ) or defaults.max_links_per_session,
        max_streams_per_link=element.get(
            "maxStreamsPerLink", _int_in(1, 1_000_000), "a whole number from 1"
        ) or defaults.max_streams_per_link,
        keepalive_interval=element.get("keepaliveInterval", _positive_seconds,
                                       "a number of seconds") or defaults.keepalive_interval,
        keepalive_timeout=element.get("keepaliveTimeout", _positive_seconds,
                                      "a number of seconds") or defaults.keepalive_timeout,
        max_unauthenticated_links_per_address=element.get(
            "maxUnauthenticatedLinksPerAddress", _int_in(1, 1_000_000), "a whole number from 1"
        ) or defaults.max_unauthenticated_links_per_address,
        max_queued_bytes_per_link=element.get(
            "maxQueuedBytesPerLink", _QUEUED_BYTES, _QUEUED_BYTES_WHAT
        ) or defaults.max_queued_bytes_per_link,
        max_queued_bytes_per_session=element.get(
            "maxQueuedBytesPerSession", _QUEUED_BYTES, _QUEUED_BYTES_WHAT
        ) or defaults.max_queued_bytes_per_session,
        max_queued_bytes=element.get(
            "maxQueuedBytes", _QUEUED_BYTES, _QUEUED_BYTES_WHAT
        ) or defaults.max_queued_bytes,
    )
    if limits.max_queued_bytes_per_link > limits.max_queued_bytes_per_session:
        raise element.error(
            f"maxQueuedBytesPerLink ({limits.max_queued_bytes_per_link}) must not be larger "
            f"than maxQueuedBytesPerSession ({limits.max_queued_bytes_per_session})",
            "maxQueuedBytesPerLink",
        )
    if limits.max_queued_bytes_per_session > limits.max_queued_bytes:
        raise element.error(
            f"maxQueuedBytesPerSession ({limits.max_queued_bytes_per_session}) must not be "
            f"larger than maxQueuedBytes ({limits.max_queued_bytes})",
            "maxQueuedBytesPerSession",
        )
    drain = element.get("drain", _bool, "1/true/yes or 0/false/no") or False
    element.raw("type")
    element.check_unknown_attributes()
    listeners: list[ListenerConfig] = []
    sessions: list[GatewaySessionConfig] = []
    seen_addresses: dict[tuple[str | None, int], Location] = {}
    seen_ids: dict[int, Location] = {}
    ignored = {"AllowedTargetEndpoints": "a Gateway has no allow-list (it belongs in a "
               "Proxy-Client)"}
    for child in element.children(("Listener", "Session"), ignored):
        if child.node.name == "Listener":
            listener = _listener(child)
            key = (listener.ip, listener.port)
            if listener.port and key in seen_addresses:
                raise child.error(
                    f"a second listener on {listener.describe()} (the first is at "
                    f"{seen_addresses[key]})"
                )
            seen_addresses[key] = child.location
            listeners.append(listener)
        else:
            session_id = child.get_required("id", _INT32, "a 32-bit whole number")
            if session_id in seen_ids:
                raise child.error(
                    f"duplicate session id {session_id} (first defined at {seen_ids[session_id]})",
                    "id",
                )
            seen_ids[session_id] = child.location
            for name in ("endToEndPassword", "endToEndPasswordFile", "endToEndPasswordEnv"):
                if child.raw(name) is not None:
                    raise child.error("the end-to-end password belongs on both proxies' "
                                      "<Session>, never on the Gateway: it must not know it",
                                      name)
            sessions.append(
                GatewaySessionConfig(
                    id=session_id,
                    proxy_client=_secret(child, "proxyClientPassword", "proxyClientPasswordHash"),
                    proxy_server=_secret(child, "proxyServerPassword", "proxyServerPasswordHash"),
                    location=child.location,
                )
            )
            child.check_unknown_attributes()
            _no_children(child)
    return GatewayConfig(
        index=index,
        listeners=tuple(listeners),
        sessions=tuple(sessions),
        limits=limits,
        location=element.location,
        drain=drain,
        warnings=_in_line_order(element.sink),
    )


def _in_line_order(warnings: list[str]) -> tuple[str, ...]:
    """Warnings ("path:line: ...") sorted by line, as they were found within a line."""
    def line(warning: str) -> int:
        match = re.match(r".*?:([0-9]+): ", warning)
        return int(match.group(1)) if match else 0

    return tuple(sorted(warnings, key=line))


def _no_children(element: _Element) -> None:
    """Warn about (and skip) any child element: the original ignores them."""
    for _ in element.children(()):
        pass  # pragma: no cover - children() yields nothing when nothing is allowed


def _protocol(text: str) -> str:
    if text not in ("tcp", "udp"):
        raise ValueError(text)
    return text


_PROTOCOL_WHAT = '"tcp" or "udp"'


def _binding_type(text: str) -> BindingType:
    for kind in BINDING_TYPES:
        if text == kind:
            return kind
    raise ValueError(text)


# RFC 1929 carries each of user name and password in 1-255 bytes; a Proxy-Authorization
# header is bounded by the head size (16 KiB), of which these are a small part.
_CREDENTIAL_BYTES = {"socks5": 255, "http-connect": 1024}


def _binding_credentials(element: _Element,
                         kind: BindingType) -> tuple[str | None, Secret | None]:
    """``username`` with ``password`` / ``passwordFile`` / ``passwordEnv`` (read as the
    Session's password is): both or neither, on socks5 and http-connect Bindings only."""
    username = element.raw("username")
    given = [n for n in ("password", "passwordFile", "passwordEnv") if element.raw(n) is not None]
    if username is None and not given:
        return None, None
    if kind == "tcp":
        raise element.error('username and password apply to type="socks5" and '
                            'type="http-connect" Bindings only',
                            "username" if username is not None else given[0])
    if username is None:
        raise element.error("a password needs a username too", given[0])
    if not given:
        raise element.error("a username needs a password too (password, passwordFile or "
                            "passwordEnv)", "username")
    if element.raw("password") == "":
        raise element.error("the password is empty", "password")
    secret = _proxy_password(element)
    assert secret.cleartext is not None
    limit = _CREDENTIAL_BYTES[kind]
    for name, value in (("username", username), (given[0], secret.cleartext)):
        what = "username" if name == "username" else "password"
        if not 1 <= len(value.encode("utf-8")) <= limit:
            raise element.error(f"a {kind} Binding's {what} is 1 to {limit} bytes (UTF-8)",
                                name)
    if kind == "http-connect" and ":" in username:
        # Basic authentication sends "user:password": the first ':' ends the user name.
        raise element.error("an http-connect Binding's username cannot contain ':'",
                            "username")
    return username, secret


def _binding(element: _Element) -> BindingConfig:
    protocol = element.get("protocol", _protocol, _PROTOCOL_WHAT) or "tcp"
    kind = element.get("type", _binding_type, '"tcp", "socks5" or "http-connect"') or "tcp"
    idle_timeout = element.get("idleTimeout", _positive_seconds,
                               "a number of seconds greater than 0")
    target_host: str | None = None
    target_port: int | None = None
    if kind == "tcp":
        target_host = element.get_required("targetHost", _host, _HOST_WHAT)
        target_port = element.get_required("targetPort", _PORT, _PORT_WHAT)
    else:
        for name in ("targetHost", "targetPort"):
            if element.raw(name) is not None:
                raise element.error(f'a type="{kind}" Binding takes its target from each '
                                    "client's request: leave out targetHost and targetPort",
                                    name)
        if protocol != "tcp":
            raise element.error(f'a type="{kind}" Binding is TCP: protocol="udp" applies to '
                                'type="tcp" Bindings only', "protocol")
    username, password = _binding_credentials(element, kind)
    binding = BindingConfig(
        listen_ip=_ip(element, "listenIp"),
        listen_port=element.get_required("listenPort", _PORT_OR_ZERO, _PORT_OR_ZERO_WHAT),
        target_host=target_host,
        target_port=target_port,
        location=element.location,
        protocol=protocol,
        idle_timeout=idle_timeout,
        type=kind,
        username=username,
        password=password,
    )
    if idle_timeout is not None and protocol != "udp":
        raise element.error('idleTimeout applies to protocol="udp" Bindings only',
                            "idleTimeout")
    element.check_unknown_attributes()
    _no_children(element)
    if kind != "tcp":
        if username is None and not _is_loopback(binding.listen_ip):
            where = ("every address of this machine" if binding.listen_ip is None
                     else binding.listen_ip)
            element.warn(
                f"a {kind} proxy on {where} without username and password: anyone who can "
                f"reach port {binding.listen_port} here can reach every target the "
                "Proxy-Client allows; set username and password, or listenIp=\"127.0.0.1\"")
    elif binding.listen_ip is None:
        element.warn(
            f"no listenIp: it listens on every address of this machine, so anyone who can "
            f"reach port {binding.listen_port} here can use the tunnel to "
            f"{binding.target}; add "
            "listenIp=\"127.0.0.1\" to accept only local connections")
    return binding


def _is_loopback(ip: str | None) -> bool:
    """Whether a listenIp accepts only local connections."""
    if ip is None:
        return False
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _proxy_password(session: _Element, name: str = "password") -> Secret:
    """The proxy's password: inline, from a file, or from an environment variable (the
    attributes ``name``, ``name + "File"``, ``name + "Env"``)."""
    inline = session.raw(name)
    from_file = session.raw(name + "File")
    from_env = session.raw(name + "Env")
    given = [n for n, v in ((name, inline), (name + "File", from_file),
                            (name + "Env", from_env)) if v is not None]
    if not given:
        raise session.error(f"missing required attribute '{name}' (or '{name}File' or "
                            f"'{name}Env')")
    if len(given) > 1:
        raise session.error(f"give only one of {', '.join(repr(g) for g in given)}")
    if from_file is not None:
        file_path = _relative(session, from_file)
        try:
            with open(file_path, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as e:
            raise session.error(f"cannot read the password file: {e.strerror}",
                                name + "File") from None
        except UnicodeDecodeError:
            raise session.error(f"the password file {file_path} is not UTF-8 text",
                                name + "File") from None
        mode_warning = others_access_warning(file_path, "password file")
        if mode_warning is not None:
            session.warn(mode_warning, name + "File")
    elif from_env is not None:
        env_value = os.environ.get(from_env)
        if env_value is None:
            raise session.error(f"the environment variable {from_env!r} is not set",
                                name + "Env")
        password = env_value
    else:
        assert inline is not None
        password = inline
    if not password:
        if inline is None:
            # Ours: an empty file or variable is a deployment mistake (a secret not
            # mounted), not a choice.
            raise session.error("the password is empty", given[0])
        session.warn("THE PASSWORD IS EMPTY: it logs in only to a Gateway session whose "
                     "password is empty, which anyone can use", "password")
    return Secret(cleartext=password)


def _end_to_end_password(session: _Element, login: Secret) -> Secret | None:
    """``endToEndPassword`` / ``endToEndPasswordFile`` / ``endToEndPasswordEnv`` of a proxy's
    ``<Session>`` (docs/protocol.md §9), read as the login password is; None when not set.

    Refused when empty (a Gateway could then guess it in one try) or equal to the login
    password (which the Gateway knows, or can test against its verifier offline)."""
    names = ("endToEndPassword", "endToEndPasswordFile", "endToEndPasswordEnv")
    if all(session.raw(n) is None for n in names):
        return None
    if session.raw("endToEndPassword") == "":
        raise session.error("the end-to-end password is empty", "endToEndPassword")
    secret = _proxy_password(session, "endToEndPassword")
    if not secret.cleartext:
        raise session.error("the end-to-end password is empty", "endToEndPassword")
    if login.cleartext is not None and secret.cleartext == login.cleartext:
        raise session.error("the end-to-end password must not be the login password: the "
                            "Gateway knows that one (use python -m tcptunnel make-password)",
                            "endToEndPassword")
    return secret


def _outbound_proxy(element: _Element, gateway_host: str) -> ProxyUrl | None:
    """``httpProxy`` (a URL, or ``environment``: HTTPS_PROXY with NO_PROXY) or ``socksProxy``."""
    http = element.raw("httpProxy")
    socks = element.raw("socksProxy")
    if http is not None and socks is not None:
        raise element.error("give only one of 'httpProxy' and 'socksProxy'")
    try:
        if http is not None and http.strip().lower() == "environment":
            return proxy_from_environment(os.environ, gateway_host)
        if http is not None:
            return parse_proxy_url(http, "http")
        if socks is not None:
            return parse_proxy_url(socks, "socks5")
    except ValueError as e:
        raise element.error(str(e), "httpProxy" if http is not None else "socksProxy") from None
    return None


def _proxy(index: int, role: Role, element: _Element) -> ProxyConfig:
    host = element.get_required("host", _host, _HOST_WHAT)
    port = element.get_required("port", _PORT, _PORT_WHAT)
    use_ssl_text = element.raw("useSsl")
    use_tls = element.get("useSsl", _bool, _bool_what(use_ssl_text or "")) or False
    ca_file_raw = element.raw("caFile")
    ca_file = _relative(element, ca_file_raw) if ca_file_raw is not None else None
    server_name = element.get("serverName", _host, _HOST_WHAT)
    pin = element.get("certificatePin", _sha256_pin,
                      "a SHA-256 fingerprint (64 hex digits, colons allowed, or sha256/<base64>)")
    defaults = ProxyConfig.__dataclass_fields__
    timing: dict[str, Any] = {
        name: element.get(attr, _positive_seconds, "a number of seconds greater than 0")
        or float(defaults[name].default)  # type: ignore[arg-type]
        for attr, name in (
            ("keepaliveInterval", "keepalive_interval"),
            ("keepaliveTimeout", "keepalive_timeout"),
            ("connectTimeout", "connect_timeout"),
            ("maxRetryDelay", "max_retry_delay"),
        )
    }
    initial_window = element.get("initialWindow", _int_in(16384, 2**31 - 1),
                                 "a number of bytes from 16384 to 2147483647")
    max_window = element.get("maxWindow", _int_in(16384, 2**31 - 1),
                             "a number of bytes from 16384 to 2147483647")
    initial_window = initial_window or ProxyConfig.initial_window
    max_window = max_window or ProxyConfig.max_window
    if max_window < initial_window:
        raise element.error("maxWindow must not be smaller than initialWindow", "maxWindow")
    outbound_proxy = _outbound_proxy(element, host)
    websocket_path = element.get("webSocketPath", _websocket_path, _WEBSOCKET_PATH_WHAT)
    element.raw("type")
    element.check_unknown_attributes()
    # A plain WebSocket link still sends serverName, as its Host header.
    if not use_tls and (ca_file or pin or (server_name and websocket_path is None)):
        raise element.error("caFile, serverName and certificatePin need useSsl=\"true\"")

    session_element: _Element | None = None
    allowed: tuple[EndpointConfig, ...] | None = None
    allowed_at: Location | None = None
    check_resolved_addresses = False
    if role == "proxy-client":
        wanted: tuple[str, ...] = ("Session", "AllowedTargetEndpoints", "Gateway")
        ignored = {"Binding": "a Proxy-Client has no Bindings (they belong in a "
                   "Proxy-Server's <Session>)"}
    else:
        wanted = ("Session", "Gateway")
        ignored = {"AllowedTargetEndpoints": "only a Proxy-Client checks targets; a "
                   "Proxy-Server ignores this element, as the original does",
                   "Binding": "a <Binding> belongs inside <Session>, as in the original"}
    gateways: list[GatewayAddress] = []
    for child in element.children(wanted, ignored):
        if child.node.name == "Gateway":
            gateways.append(_gateway_address(child, use_tls, websocket_path))
            continue
        if child.node.name == "Session":
            if session_element is not None:
                child.warn(f"a second <Session> is ignored, with what it holds: the original "
                           f"uses only the first (at {session_element.location})")
                continue
            session_element = child
        else:
            if allowed is not None:
                child.warn(f"a second <AllowedTargetEndpoints> is ignored: the original uses "
                           f"only the first (at {allowed_at})")
                continue
            check_resolved = child.get("checkResolvedAddresses", _bool,
                                       _bool_what(child.raw("checkResolvedAddresses") or ""))
            child.check_unknown_attributes()
            allowed_at = child.location
            allowed = tuple(_endpoints(child))
            check_resolved_addresses = bool(check_resolved)
    if session_element is None:
        raise element.error("missing required child element <Session id=\"...\" password=\"...\">")
    session_id = session_element.get_required("id", _INT32, "a 32-bit whole number")
    password = _proxy_password(session_element)
    e2e_password = _end_to_end_password(session_element, password)
    session_element.check_unknown_attributes()
    bindings: list[BindingConfig] = []
    seen: dict[tuple[str | None, int, str], Location] = {}
    binding_children: tuple[str, ...] = ("Binding",) if role == "proxy-server" else ()
    session_ignored = {"Binding": "a Proxy-Client has no Bindings (they belong in a "
                       "Proxy-Server)"} if role == "proxy-client" else {}
    for child in session_element.children(binding_children, session_ignored):
        binding = _binding(child)
        # TCP and UDP ports are separate: a udp Binding may share a tcp Binding's port.
        key = (binding.listen_ip, binding.listen_port, binding.protocol)
        clash = next(
            (loc for (ip, p, proto), loc in seen.items()
             if p == binding.listen_port and binding.listen_port != 0
             and proto == binding.protocol
             and (ip == binding.listen_ip or ip is None or binding.listen_ip is None)),
            None,
        )
        if clash is not None:
            raise child.error(
                f"a second binding on port {binding.listen_port} overlapping the one at {clash}"
            )
        seen[key] = child.location
        bindings.append(binding)
    return ProxyConfig(
        index=index,
        role=role,
        host=host,
        port=port,
        use_tls=use_tls,
        session_id=session_id,
        password=password,
        bindings=tuple(bindings),
        allowed_targets=allowed,
        ca_file=ca_file,
        server_name=server_name,
        certificate_pin=pin,
        location=element.location,
        initial_window=initial_window,
        max_window=max_window,
        outbound_proxy=outbound_proxy,
        websocket_path=websocket_path,
        check_resolved_addresses=check_resolved_addresses,
        e2e_password=e2e_password,
        gateways=tuple(gateways),
        warnings=_in_line_order(element.sink),
        **timing,
    )


def _gateway_address(child: _Element, use_tls: bool,
                     instance_websocket_path: str | None) -> GatewayAddress:
    """A ``<Gateway>`` failover entry: host and port required; serverName with useSsl, or
    with a WebSocket (its Host header, as on the Instance); webSocketPath its own or, when
    absent, the Instance's (``""``: none for this entry).  TLS and certificate checks are
    the Instance's."""
    host = child.get_required("host", _host, _HOST_WHAT)
    port = child.get_required("port", _PORT, _PORT_WHAT)
    server_name = child.get("serverName", _host, _HOST_WHAT)
    websocket_path = instance_websocket_path
    if child.raw("webSocketPath") is not None:
        websocket_path = child.get("webSocketPath", _websocket_path_or_none,
                                   _GATEWAY_WEBSOCKET_PATH_WHAT) or None
    child.check_unknown_attributes()
    _no_children(child)
    if server_name is not None and not use_tls and websocket_path is None:
        raise child.error("serverName needs useSsl=\"true\" on the Instance (or a "
                          "webSocketPath: then it is the Host header)", "serverName")
    return GatewayAddress(host, port, server_name, child.location, websocket_path)


_GATEWAY_WEBSOCKET_PATH_WHAT = (f"{_WEBSOCKET_PATH_WHAT}, or \"\" for none (this Gateway "
                                "then takes the link protocol on TCP/TLS)")


def _websocket_path_or_none(text: str) -> str:
    """A ``<Gateway>``'s webSocketPath: a URL path, or ``""`` (no WebSocket to this one)."""
    return text if text == "" else _websocket_path(text)


def _endpoints(allow_list: _Element) -> Iterator[EndpointConfig]:
    """The Endpoints of an AllowedTargetEndpoints element, as tcptunnel._allow rules: host
    an IP literal, a network (CIDR), ``*.suffix`` or a name; port a list of ports and
    ranges (``22,80,8000-8100``).  The original reads the port as any int32 and never
    matches one outside 1-65535: such an entry (one number) is dropped with a warning."""
    for endpoint in allow_list.children(("Endpoint",)):
        host = endpoint.required("host")
        ports = endpoint.required("port")
        protocol = endpoint.get("protocol", _protocol, _PROTOCOL_WHAT) or "tcp"
        proxy_protocol = endpoint.raw("proxyProtocol")
        endpoint.check_unknown_attributes()
        _no_children(endpoint)
        try:
            number = _INT32(ports.strip())
        except ValueError:
            number = None
        if number is not None and not 1 <= number <= 65535:
            endpoint.warn(f"port {number} is no TCP port: this entry can never match and is "
                          "ignored", "port")
            continue
        try:
            PortSet.parse(ports)
        except AllowListError as e:
            raise endpoint.error(str(e), "port") from None
        if proxy_protocol not in (None, "v1", "v2"):
            raise endpoint.error(f'expected "v1" or "v2", got {proxy_protocol!r}',
                                 "proxyProtocol")
        if proxy_protocol is not None and protocol == "udp":
            raise endpoint.error("proxyProtocol applies to tcp Endpoints only (a PROXY "
                                 "header starts a TCP connection)", "proxyProtocol")
        try:
            rule = parse_rule(host, ports, str(endpoint.location), proxy_protocol, protocol)
        except AllowListError as e:
            raise endpoint.error(str(e), "host") from None
        yield EndpointConfig(rule=rule, location=endpoint.location)


def _status(element: _Element) -> StatusConfig:
    status = StatusConfig(
        listen_ip=_ip(element, "listenIp") or "127.0.0.1",
        listen_port=element.get_required("listenPort", _PORT_OR_ZERO, _PORT_OR_ZERO_WHAT),
        location=element.location,
        host_names=element.get("hostNames", _host_names, _HOST_NAMES_WHAT) or (),
    )
    element.check_unknown_attributes()
    _no_children(element)
    return status


def _holds_secrets(settings: Settings) -> bool:
    """Whether the file itself holds a password, verifier or PFX password."""
    for instance in settings.instances:
        if isinstance(instance, GatewayConfig):
            if instance.sessions or any(
                    listener.tls is not None and listener.tls.pfx_password
                    for listener in instance.listeners):
                return True
        elif instance.password.cleartext is not None:
            return True
    return False


def parse_settings(data: bytes, path: str = "settings.xml") -> Settings:
    """Parse the bytes of a settings file; ``path`` is used in messages and
    to resolve relative file names."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: the file is {len(data)} bytes; a settings file may "
                          f"have at most {MAX_CONFIG_BYTES}")
    root = _parse_tree(path, data)
    if root.name != "Settings":
        raise ConfigError(
            f"{path}:{root.line}: the root element must be <Settings "
            f"xmlns=\"{NAMESPACE}\">, found <{root.name}>"
        )
    settings = _Element(path, root)
    settings.check_unknown_attributes()
    instances: list[InstanceConfig] = []
    status: StatusConfig | None = None
    index = 0
    for element in settings.children(("Instance", "Status")):
        if element.node.name == "Status":
            if status is not None:
                raise element.error(f"only one <Status> is allowed (the first is at "
                                    f"{status.location})")
            status = _status(element)
            continue
        instance_element = _Element(path, element.node, [])  # the instance's own warnings
        type_text = instance_element.required("type")
        role = type_text.strip().lower()
        if role != type_text.lower() and role in ROLES:
            instance_element.warn(f"{type_text!r} is read as {role!r} (the original refuses "
                                  "white space around the type)", "type")
        if role == "gateway":
            instances.append(_gateway(index, instance_element))
        elif role in ("proxy-client", "proxy-server"):
            instances.append(_proxy(index, role, instance_element))  # type: ignore[arg-type]
        else:
            raise instance_element.error(
                f"unknown instance type {type_text!r} (expected gateway, proxy-client or "
                "proxy-server)",
                "type",
            )
        index += 1
    if not instances:
        settings.sink.append(f"{settings.location}: <Settings> defines no <Instance>: "
                             "nothing runs" + (" but the status page" if status else ""))
    return Settings(path=path, instances=tuple(instances), status=status,
                    warnings=_in_line_order(settings.sink))


def load_settings(path: str) -> Settings:
    """Read and parse a settings file; every failure is a :class:`ConfigError`.  A file
    that holds secrets and that other users may read gets a warning."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the settings file: {e.strerror}") from None
    settings = parse_settings(data, path)
    mode_warning = others_access_warning(path, "settings file") if _holds_secrets(
        settings) else None
    if mode_warning is not None:
        settings = Settings(path=settings.path, instances=settings.instances,
                            status=settings.status,
                            warnings=(mode_warning, *settings.warnings))
    return settings
