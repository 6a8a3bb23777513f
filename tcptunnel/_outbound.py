"""Reaching the Gateway through an outbound proxy, sans-IO: HTTP CONNECT and SOCKS5 clients.

A proxy inside a network that reaches the internet only through an HTTP or SOCKS proxy opens
its link as a tunnel through it: TCP to the outbound proxy, a CONNECT (HTTP, RFC 9110 §9.3.6)
or a SOCKS5 CONNECT (RFC 1928, with RFC 1929 user name and password), then TLS and the link
protocol inside, so the outbound proxy sees only the Gateway's name and port.  The Gateway's
certificate is still verified against its name.

:func:`parse_proxy_url` reads ``httpProxy`` / ``socksProxy`` values (and ``HTTPS_PROXY`` with
``NO_PROXY`` for ``httpProxy="environment"``).  :class:`HttpConnectClient` and
:class:`Socks5Client` are handshakes: :meth:`start` gives the first bytes to send,
:meth:`receive` takes bytes and returns more to send; once :attr:`done`, :attr:`leftover`
holds bytes that already belong to the tunnel.  Failures raise :class:`OutboundProxyError`
with a message that says what the proxy answered.  No Twisted here.
"""

from __future__ import annotations

import base64
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

# An HTTP proxy's answer to CONNECT is a status line and a few headers; more than this
# before the blank line is not a proxy worth waiting for.
MAX_HTTP_HEAD = 16 * 1024


class OutboundProxyError(Exception):
    """The outbound proxy refused or broke the tunnel; the message says how."""


@dataclass(frozen=True)
class ProxyUrl:
    """Where the outbound proxy is and how to log in to it."""

    scheme: str  # "http" or "socks5"
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """``scheme://host:port`` without the credentials, for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


_DEFAULT_PORTS = {"http": 8080, "socks5": 1080, "socks5h": 1080}


def parse_proxy_url(text: str, kind: str) -> ProxyUrl:
    """A ``http://[user:password@]host:port`` (``kind`` "http") or ``socks5://...`` (``kind``
    "socks5"; ``socks5h`` is the same: names are always resolved by the proxy).  Raises
    ValueError naming what is wrong."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    allowed = ("http",) if kind == "http" else ("socks5", "socks5h")
    if scheme not in allowed:
        raise ValueError(f"{text!r} is not a {' or '.join(s + '://' for s in allowed)} URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text!r}: a proxy URL has no path, query or fragment")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:  # a port that is not a number, or out of range
        raise ValueError(f"{text!r}: {e}") from None
    if not host:
        raise ValueError(f"{text!r} names no host")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if scheme != "http" and username is not None and (
            len(username.encode()) > 255 or len((password or "").encode()) > 255):
        raise ValueError("SOCKS5 user names and passwords are at most 255 bytes")
    return ProxyUrl("socks5" if scheme != "http" else "http", host,
                    port or _DEFAULT_PORTS[scheme], username, password)


def _no_proxy_matches(host: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` (comma-separated names, ``.suffix``, ``*``, IPs, CIDRs) covers
    ``host``, as curl and Python's urllib read it."""
    host = host.lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy.split(","):
        entry = entry.strip().lower().rstrip(".")
        if not entry:
            continue
        if entry == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip("*").lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def proxy_from_environment(environ: Mapping[str, str], target_host: str) -> ProxyUrl | None:
    """The HTTP proxy ``HTTPS_PROXY`` / ``https_proxy`` names for ``target_host``, unless
    ``NO_PROXY`` / ``no_proxy`` exempts it (None: connect directly).  Raises ValueError for
    a malformed value, naming the variable."""
    for name in ("https_proxy", "HTTPS_PROXY"):
        value = environ.get(name, "").strip()
        if value:
            break
    else:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if _no_proxy_matches(target_host, no_proxy):
        return None
    if "://" not in value:
        value = "http://" + value
    try:
        return parse_proxy_url(value, "http")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpConnectClient:
    """The client side of ``CONNECT host:port`` through an HTTP proxy."""

    def __init__(self, proxy: ProxyUrl, host: str, port: int) -> None:
        self.proxy = proxy
        self.target = _authority(host, port)
        self._buffer = b""
        self.done = False
        self.leftover = b""

    def start(self) -> bytes:
        """The request."""
        lines = [f"CONNECT {self.target} HTTP/1.1", f"Host: {self.target}",
                 "User-Agent: tcptunnel"]
        if self.proxy.username is not None:
            token = base64.b64encode(
                f"{self.proxy.username}:{self.proxy.password or ''}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def receive(self, data: bytes) -> bytes:
        """Take the proxy's answer; raises OutboundProxyError unless it is 2xx."""
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HTTP_HEAD:
                raise OutboundProxyError(f"the HTTP proxy {self.proxy.describe()} sent more "
                                         f"than {MAX_HTTP_HEAD} bytes without ending its answer")
            return b""
        head, self.leftover = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise OutboundProxyError(f"the HTTP proxy {self.proxy.describe()} answered "
                                     f"{status_line[:80]!r}, not HTTP")
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        if not 200 <= status < 300:
            authentication = (
                " (proxy authentication: check the user name and password in httpProxy)"
                if self.proxy.username is not None
                else " (the proxy wants a user name and password in httpProxy)")
            hint = {
                407: authentication,
                401: authentication,  # what some proxies (tinyproxy) answer instead of 407
                403: " (the proxy does not allow this destination or port)",
                502: " (the proxy could not reach the Gateway)",
                504: " (the proxy timed out reaching the Gateway)",
            }.get(status, "")
            raise OutboundProxyError(f"the HTTP proxy {self.proxy.describe()} refused CONNECT "
                                     f"{self.target}: {status} {reason}{hint}")
        self.done = True
        return b""


_SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class Socks5Client:
    """The client side of a SOCKS5 CONNECT (names are resolved by the proxy)."""

    def __init__(self, proxy: ProxyUrl, host: str, port: int) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port
        self._buffer = b""
        self._step = "method"
        self.done = False
        self.leftover = b""

    def start(self) -> bytes:
        """The greeting: no authentication, and user name/password when configured."""
        methods = b"\x00\x02" if self.proxy.username is not None else b"\x00"
        return b"\x05" + bytes([len(methods)]) + methods

    def _request(self) -> bytes:
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            name = self.host.encode("idna")
            if not 1 <= len(name) <= 255:
                raise OutboundProxyError(f"the Gateway's name {self.host!r} is too long for "
                                         "SOCKS5") from None
            target = b"\x03" + bytes([len(name)]) + name
        else:
            target = (b"\x01" if address.version == 4 else b"\x04") + address.packed
        return b"\x05\x01\x00" + target + struct.pack(">H", self.port)

    def _fail(self, what: str) -> OutboundProxyError:
        return OutboundProxyError(f"the SOCKS5 proxy {self.proxy.describe()} {what}")

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the proxy; return what to send next.  Raises OutboundProxyError."""
        self._buffer += data
        out = b""
        while not self.done:
            buffer = self._buffer
            if self._step == "method":
                if len(buffer) < 2:
                    break
                if buffer[0] != 5:
                    raise self._fail("does not speak SOCKS5")
                method = buffer[1]
                self._buffer = buffer[2:]
                if method == 0:
                    self._step = "reply"
                    out += self._request()
                elif method == 2 and self.proxy.username is not None:
                    user = self.proxy.username.encode()
                    password = (self.proxy.password or "").encode()
                    out += (b"\x01" + bytes([len(user)]) + user + bytes([len(password)])
                            + password)
                    self._step = "auth"
                elif method == 0xFF:
                    raise self._fail("accepts none of our authentication methods" + (
                        "" if self.proxy.username is not None else
                        " (it may want a user name and password in socksProxy)"))
                else:
                    raise self._fail(f"chose authentication method {method}, which we did not "
                                     "offer")
            elif self._step == "auth":
                if len(buffer) < 2:
                    break
                self._buffer = buffer[2:]
                if buffer[1] != 0:
                    raise self._fail("refused the user name and password in socksProxy")
                self._step = "reply"
                out += self._request()
            else:  # reply: VER REP RSV ATYP BND.ADDR BND.PORT
                if len(buffer) < 5:
                    break
                if buffer[0] != 5:
                    raise self._fail("sent a malformed reply")
                if buffer[1] != 0:
                    raise self._fail(f"could not connect to {_authority(self.host, self.port)}: "
                                     + _SOCKS_REPLIES.get(buffer[1], f"reply {buffer[1]}"))
                atyp = buffer[3]
                if atyp == 1:
                    size = 4 + 4 + 2
                elif atyp == 4:
                    size = 4 + 16 + 2
                elif atyp == 3:
                    size = 4 + 1 + buffer[4] + 2
                else:
                    raise self._fail(f"replied with address type {atyp}")
                if len(buffer) < size:
                    break
                self.leftover = buffer[size:]
                self._buffer = b""
                self.done = True
        return out
