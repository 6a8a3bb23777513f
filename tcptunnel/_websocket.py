"""WebSocket links, sans-IO: which HTTP requests a WebSocket Listener upgrades, and who the
peer is behind a trusted reverse proxy.

A WebSocket Listener is an HTTP server to everyone who is not a proxy of ours: a request for
any other path, a plain ``GET`` without the Upgrade headers, or any other method gets a plain
404 (a health check or a browser sees a normal web server); a request head that does not end
within :data:`MAX_REQUEST_HEAD` bytes gets 431.  :func:`route_request` decides that from the
request head alone; the RFC 6455 handshake itself is autobahn's (:mod:`tcptunnel.websocket`).

``X-Forwarded-For`` is honoured only when the TCP peer is one of the Listener's trusted
proxies (:func:`forwarded_client`): otherwise anyone could claim any address and escape the
login throttle and the per-address slot limits.  No Twisted here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

# Browsers send 1-3 KiB of request head, nginx's large_client_header_buffers default is
# 4 x 8 KiB; a head longer than this is not a WebSocket client of ours.
MAX_REQUEST_HEAD = 16 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _response(status: str, body: bytes = b"") -> bytes:
    body = body or status.encode() + b"\n"
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


NOT_FOUND = _response("404 Not Found")
BAD_REQUEST = _response("400 Bad Request")
HEAD_TOO_LARGE = _response("431 Request Header Fields Too Large")


@dataclass(frozen=True)
class RequestHead:
    """An HTTP/1.1 request line and its headers (names lower-cased, repeats in order)."""

    method: str
    target: str
    version: str
    headers: dict[str, list[str]] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """A header's value, repeats joined with ``,`` (RFC 9110 §5.3), or None."""
        values = self.headers.get(name)
        return ",".join(values) if values is not None else None

    def tokens(self, name: str) -> set[str]:
        """A comma-separated header's tokens, lower-cased."""
        value = self.header(name) or ""
        return {token.strip().lower() for token in value.split(",") if token.strip()}

    @property
    def path(self) -> str:
        """The target without its query (an absolute-form target keeps only its path)."""
        target = self.target
        if "://" in target:
            rest = target.split("://", 1)[1]
            target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        return target.split("?", 1)[0]


def parse_request_head(head: bytes) -> RequestHead:
    """The request line and headers of ``head`` (up to and including the blank line).
    Raises ValueError when it is not an HTTP/1.x request."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("the request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError(f"not a header line: {line[:80]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    return RequestHead(parts[0], parts[1], parts[2], headers)


def could_be_http(data: bytes) -> bool:
    """Whether ``data``, the start of what a client sent, can still become an HTTP request
    line (``METHOD SP ...``): anything else (a plain link's magic, TLS on a plain Listener,
    SSH) is answered at once instead of at the deadline."""
    method, space, _ = data[:16].partition(b" ")
    if not method:
        return not space  # nothing yet: wait; a leading space: not HTTP
    return len(method) <= 10 and method.isalpha() and method.isupper()


def route_request(head: bytes, path: str) -> tuple[RequestHead | None, bytes | None]:
    """``(request, None)`` when ``head`` asks to upgrade ``path`` to a WebSocket (the
    handshake goes on), else ``(request or None, response)`` with the plain answer to send
    before closing: 400 for what is not HTTP, 404 for anything else."""
    try:
        request = parse_request_head(head)
    except ValueError:
        return None, BAD_REQUEST
    if (request.method == "GET" and request.path == path
            and "websocket" in request.tokens("upgrade")
            and "upgrade" in request.tokens("connection")):
        return request, None
    return request, NOT_FOUND


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"127.0.0.1/32, 10.0.0.0/8, ::1"`` as networks (a bare address is a /32 or /128).
    Raises ValueError naming the entry that is not an address or network."""
    networks: list[Network] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network "
                             "(e.g. 127.0.0.1/32, 10.0.0.0/8, ::1)") from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(host: str, trusted: tuple[Network, ...]) -> bool:
    """Whether ``host`` (an IP literal) lies in one of the ``trusted`` networks."""
    address = _address(host)
    return address is not None and any(address in network for network in trusted)


def forwarded_client(peer: str, forwarded_for: str | None,
                     trusted: tuple[Network, ...]) -> str | None:
    """The client's address when ``peer`` is a trusted proxy and ``X-Forwarded-For`` names
    one, else None (use ``peer``).

    Each proxy appends the address it heard from, so the list is read from the right:
    trusted proxies are skipped, and the first address that is not one is the client (every
    address further left was written by that client, and can be anything).  A list of
    trusted proxies only gives its leftmost; a value that is not an address ends the walk
    at the last good one.
    """
    if forwarded_for is None or not is_trusted(peer, trusted):
        return None
    found: str | None = None
    for entry in reversed(forwarded_for.split(",")):
        address = _address(entry)
        if address is None:
            break
        found = str(address)
        if not any(address in network for network in trusted):
            break
    return found
