"""Read ``settings.xml`` into frozen, typed dataclasses.

The format is the original TcpTunnel's (root ``Settings`` in the namespace
``https://github.com/kpreisser/TcpTunnel``, ``Instance`` elements of type
gateway / proxy-client / proxy-server), so an existing file loads unchanged.
Our additions are optional attributes; ``docs/configuration.md`` lists them.

Unlike the original, unknown elements and attributes are errors: a typo must
not silently turn a setting off.  Every error is a single :class:`ConfigError`
whose message names the file, line, element and attribute and says what was
expected.  Parsing goes through defusedxml with DTDs forbidden, so entity
bombs and external entities are refused before they expand.

This module has no Twisted imports.
"""

from __future__ import annotations

import base64
import difflib
import io
import ipaddress
import os
import re
import xml.sax
import xml.sax.handler
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import defusedxml
import defusedxml.sax

from tcptunnel._saslprep import saslprep

NAMESPACE = "https://github.com/kpreisser/TcpTunnel"
# Attributes in the XML Schema instance namespace (xsi:schemaLocation) are
# there for editors, not for us; they are accepted and ignored.
_XSI_NAMESPACE = "http://www.w3.org/2001/XMLSchema-instance"
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


@dataclass(frozen=True)
class GatewayConfig:
    """A ``<Instance type="gateway">``."""

    index: int
    listeners: tuple[ListenerConfig, ...]
    sessions: tuple[GatewaySessionConfig, ...]
    limits: GatewayLimits
    location: Location = field(compare=False)
    role: Role = "gateway"


@dataclass(frozen=True)
class BindingConfig:
    """A Proxy-Server ``<Binding>``: a local listener and the target it leads to."""

    listen_ip: str | None
    listen_port: int
    target_host: str
    target_port: int
    location: Location = field(compare=False)

    def describe(self) -> str:
        """``listen -> target`` for log lines."""
        return (
            f"{format_address(self.listen_ip, self.listen_port)} -> "
            f"{format_address(self.target_host, self.target_port)}"
        )


@dataclass(frozen=True)
class EndpointConfig:
    """An allowed target of a Proxy-Client, host normalised for comparison."""

    host: str
    port: int
    location: Location = field(compare=False)


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
        """Record an element with its attributes and line; refuse foreign namespaces."""
        uri, local = name
        line = self._line()
        if uri != NAMESPACE:
            shown = f"{{{uri}}}{local}" if uri else local
            raise ConfigError(
                f"{self._path}:{line}: element <{shown}> is not in the namespace "
                f"{NAMESPACE!r}; every element needs xmlns=\"{NAMESPACE}\" (set on <Settings>)"
            )
        attributes: dict[str, str] = {}
        for (attr_uri, attr_local), value in attrs.items():
            if attr_uri == _XSI_NAMESPACE:
                continue
            if attr_uri:
                raise ConfigError(
                    f"{self._path}:{line}: <{local}> has attribute {attr_local!r} in the "
                    f"foreign namespace {attr_uri!r}; attributes take no namespace prefix"
                )
            attributes[attr_local] = value
        node = _Node(local, attributes, line)
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
    """One element being read: typed getters that record which attributes were used."""

    def __init__(self, path: str, node: _Node) -> None:
        self.path = path
        self.node = node
        self.location = Location(path, node.line)
        self._used: set[str] = set()

    def error(self, message: str, attribute: str | None = None) -> ConfigError:
        """A ConfigError located at this element (and attribute, if named)."""
        where = f"<{self.node.name}>"
        if attribute is not None:
            where += f" attribute {attribute!r}"
        return ConfigError(f"{self.location}: {where}: {message}")

    def raw(self, name: str) -> str | None:
        """An attribute's text, or None; marks it as known."""
        self._used.add(name)
        return self.node.attributes.get(name)

    def required(self, name: str) -> str:
        """An attribute's text; missing is an error (with a typo hint)."""
        value = self.raw(name)
        if value is None:
            typo = difflib.get_close_matches(name, list(self.node.attributes), n=1)
            hint = f" (is the unknown attribute {typo[0]!r} a typo?)" if typo else ""
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
        """Refuse attributes that no getter asked for (typos)."""
        unknown = sorted(set(self.node.attributes) - self._used)
        if unknown:
            raise self.error(
                f"unknown attribute {unknown[0]!r} (known here: {', '.join(sorted(self._used))})"
            )

    def children(self, allowed: Mapping[str, str]) -> Iterator[_Element]:
        """Child elements; a name not in ``allowed`` is an error naming what is allowed."""
        for child in self.node.children:
            if child.name not in allowed:
                expected = ", ".join(f"<{n}>" for n in allowed) or "no child elements"
                raise ConfigError(
                    f"{self.path}:{child.line}: unknown element <{child.name}> inside "
                    f"<{self.node.name}> (expected {expected})"
                )
            yield _Element(self.path, child)


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        value = int(text.strip(), 10)
        if not low <= value <= high:
            raise ValueError(text)
        return value

    return convert


def _positive_seconds(text: str) -> float:
    value = float(text.strip())
    if not 0 < value <= 86400:
        raise ValueError(text)
    return value


def _ip_literal(text: str) -> str:
    return str(ipaddress.ip_address(text.strip()))


def _bool(text: str) -> bool:
    # The original treats exactly 1/true/yes as true and anything else as
    # false; we keep the true spellings but refuse values that are neither,
    # since "ture" silently meaning "no TLS" is the kind of typo that hurts.
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no", ""):
        return False
    raise ValueError(text)


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


_VERIFIER = re.compile(r"^SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$")


def _verifier(text: str) -> str:
    if not _VERIFIER.match(text.strip()):
        raise ValueError(text)
    return text.strip()


_PORT = _int_in(1, 65535)
_PORT_OR_ZERO = _int_in(0, 65535)
_INT32 = _int_in(-(2**31), 2**31 - 1)
_PORT_WHAT = "a port number from 1 to 65535"
_PORT_OR_ZERO_WHAT = "a port number from 0 to 65535 (0: any free port)"
_IP_WHAT = "an IPv4 or IPv6 address literal (leave the attribute out to listen on all addresses)"
_HOST_WHAT = "a host name or address of 1 to 253 bytes"


# ---------------------------------------------------------------------------
# Element readers.


def _secret(element: _Element, clear_name: str, hash_name: str) -> Secret:
    cleartext = element.raw(clear_name)
    verifier = element.get(hash_name, _verifier, "a SCRAM-SHA-256 verifier "
                           "'SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>' "
                           "(make one with: python -m tcptunnel hash-password)")
    if cleartext is not None and verifier is not None:
        raise element.error(f"give either {clear_name!r} or {hash_name!r}, not both")
    if cleartext is None and verifier is None:
        raise element.error(f"missing required attribute {clear_name!r} (or {hash_name!r})")
    if cleartext == "":
        raise element.error("a password must not be empty", clear_name)
    if cleartext is not None:
        _check_password(element, cleartext, clear_name)
    return Secret(cleartext=cleartext, verifier=verifier)


def _check_password(element: _Element, password: str, attribute: str) -> None:
    """A password SCRAM cannot use (control or unassigned characters) is a config error."""
    try:
        saslprep(password)
    except ValueError as e:
        raise element.error(f"{e} (SASLprep, RFC 4013)", attribute) from None


def _listener(element: _Element) -> ListenerConfig:
    ip = element.get("ip", _ip_literal, _IP_WHAT)
    port = element.get_required("port", _PORT_OR_ZERO, _PORT_OR_ZERO_WHAT)
    if element.raw("certificateHash") is not None:
        raise element.error(
            "the Windows certificate store is not supported, use a PEM or PFX file "
            "(certificatePemFilePath + certificatePemKeyFilePath, or certificatePfxFilePath)",
            "certificateHash",
        )
    pfx = element.raw("certificatePfxFilePath")
    pfx_password = element.raw("certificatePfxPassword")
    pem = element.raw("certificatePemFilePath")
    pem_key = element.raw("certificatePemKeyFilePath")
    tls: TlsFiles | None = None
    if pfx is not None:
        if pem is not None or pem_key is not None:
            raise element.error(
                "give either a PFX file or a PEM certificate and key, not both",
                "certificatePfxFilePath",
            )
        tls = TlsFiles(pfx_file=_relative(element, pfx), pfx_password=pfx_password)
    elif pem is not None:
        if pem_key is None:
            raise element.error(
                "missing required attribute 'certificatePemKeyFilePath' (the private key "
                "file that goes with certificatePemFilePath)"
            )
        tls = TlsFiles(pem_certificate=_relative(element, pem), pem_key=_relative(element, pem_key))
    elif pem_key is not None:
        raise element.error(
            "a key file without a certificate: add certificatePemFilePath",
            "certificatePemKeyFilePath",
        )
    elif pfx_password is not None:
        raise element.error(
            "a PFX password without a PFX file: add certificatePfxFilePath",
            "certificatePfxPassword",
        )
    element.check_unknown_attributes()
    return ListenerConfig(ip=ip, port=port, tls=tls, location=element.location)


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
    element.check_unknown_attributes()
    listeners: list[ListenerConfig] = []
    sessions: list[GatewaySessionConfig] = []
    seen_addresses: dict[tuple[str | None, int], Location] = {}
    seen_ids: dict[int, Location] = {}
    for child in element.children({"Listener": "", "Session": ""}):
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
    )


def _no_children(element: _Element) -> None:
    for _ in element.children({}):
        pass  # pragma: no cover - children() raises on the first one


def _binding(element: _Element) -> BindingConfig:
    binding = BindingConfig(
        listen_ip=element.get("listenIp", _ip_literal, _IP_WHAT),
        listen_port=element.get_required("listenPort", _PORT_OR_ZERO, _PORT_OR_ZERO_WHAT),
        target_host=element.get_required("targetHost", _host, _HOST_WHAT),
        target_port=element.get_required("targetPort", _PORT, _PORT_WHAT),
        location=element.location,
    )
    element.check_unknown_attributes()
    _no_children(element)
    return binding


def _proxy_password(session: _Element) -> Secret:
    """The proxy's password: inline, from a file, or from an environment variable."""
    inline = session.raw("password")
    from_file = session.raw("passwordFile")
    from_env = session.raw("passwordEnv")
    given = [n for n, v in (("password", inline), ("passwordFile", from_file),
                            ("passwordEnv", from_env)) if v is not None]
    if not given:
        raise session.error("missing required attribute 'password' (or 'passwordFile' or "
                            "'passwordEnv')")
    if len(given) > 1:
        raise session.error(f"give only one of {', '.join(repr(g) for g in given)}")
    if from_file is not None:
        file_path = _relative(session, from_file)
        try:
            with open(file_path, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as e:
            raise session.error(f"cannot read the password file: {e.strerror}",
                                "passwordFile") from None
    elif from_env is not None:
        env_value = os.environ.get(from_env)
        if env_value is None:
            raise session.error(f"the environment variable {from_env!r} is not set",
                                "passwordEnv")
        password = env_value
    else:
        assert inline is not None
        password = inline
    if not password:
        raise session.error("the password is empty", given[0])
    _check_password(session, password, given[0])
    return Secret(cleartext=password)


def _proxy(index: int, role: Role, element: _Element) -> ProxyConfig:
    host = element.get_required("host", _host, _HOST_WHAT)
    port = element.get_required("port", _PORT, _PORT_WHAT)
    use_tls = element.get("useSsl", _bool, "1/true/yes or 0/false/no") or False
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
    element.check_unknown_attributes()
    if not use_tls and (ca_file or server_name or pin):
        raise element.error("caFile, serverName and certificatePin need useSsl=\"true\"")

    session_element: _Element | None = None
    allowed: tuple[EndpointConfig, ...] | None = None
    allowed_children = {"Session": ""}
    if role == "proxy-client":
        allowed_children["AllowedTargetEndpoints"] = ""
    for child in element.children(allowed_children):
        if child.node.name == "Session":
            # The original reads only the first Session of a proxy; a second
            # one would be ignored there, so we refuse it rather than guess.
            if session_element is not None:
                raise child.error(
                    "a proxy has exactly one <Session> "
                    f"(the first is at {session_element.location})"
                )
            session_element = child
        else:
            if allowed is not None:
                raise child.error("only one <AllowedTargetEndpoints> element is allowed")
            child.check_unknown_attributes()
            endpoints: list[EndpointConfig] = []
            for endpoint in child.children({"Endpoint": ""}):
                endpoints.append(
                    EndpointConfig(
                        host=normalise_host(endpoint.get_required("host", _host, _HOST_WHAT)),
                        port=endpoint.get_required("port", _PORT, _PORT_WHAT),
                        location=endpoint.location,
                    )
                )
                endpoint.check_unknown_attributes()
                _no_children(endpoint)
            allowed = tuple(endpoints)
    if session_element is None:
        raise element.error("missing required child element <Session id=\"...\" password=\"...\">")
    session_id = session_element.get_required("id", _INT32, "a 32-bit whole number")
    password = _proxy_password(session_element)
    session_element.check_unknown_attributes()
    bindings: list[BindingConfig] = []
    seen: dict[tuple[str | None, int], Location] = {}
    binding_children = {"Binding": ""} if role == "proxy-server" else {}
    for child in session_element.children(binding_children):
        binding = _binding(child)
        key = (binding.listen_ip, binding.listen_port)
        clash = next(
            (loc for (ip, p), loc in seen.items()
             if p == binding.listen_port and binding.listen_port != 0
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
        **timing,
    )


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
    for element in settings.children({"Instance": "", "Status": ""}):
        if element.node.name == "Status":
            if status is not None:
                raise element.error(f"only one <Status> is allowed (the first is at "
                                    f"{status.location})")
            status = StatusConfig(
                listen_ip=element.get("listenIp", _ip_literal, _IP_WHAT) or "127.0.0.1",
                listen_port=element.get_required("listenPort", _PORT_OR_ZERO,
                                                 _PORT_OR_ZERO_WHAT),
                location=element.location,
                host_names=element.get("hostNames", _host_names, _HOST_NAMES_WHAT) or (),
            )
            element.check_unknown_attributes()
            _no_children(element)
            continue
        type_text = element.required("type")
        role = type_text.strip().lower()
        if role == "gateway":
            instances.append(_gateway(index, element))
        elif role in ("proxy-client", "proxy-server"):
            instances.append(_proxy(index, role, element))  # type: ignore[arg-type]
        else:
            raise element.error(
                f"unknown instance type {type_text!r} (expected gateway, proxy-client or "
                "proxy-server)",
                "type",
            )
        index += 1
    return Settings(path=path, instances=tuple(instances), status=status)


def load_settings(path: str) -> Settings:
    """Read and parse a settings file; every failure is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the settings file: {e.strerror}") from None
    return parse_settings(data, path)
