"""HTTP CONNECT proxy requests (RFC 9110 §9.3.6, RFC 9112), sans-IO: bytes in, events out.

For the Proxy-Server's ``<Binding type="http-connect">``, used by ``curl -x``, browsers, git
and package managers.  :class:`ConnectParser` reads one request head, at most
:data:`MAX_HEAD_BYTES` (the adapter also closes a head that takes longer than
:data:`HEAD_TIMEOUT`, answering :func:`timeout_response`), and yields
:class:`ConnectRequested` for ``CONNECT host:port HTTP/1.x`` (IPv6 literals in brackets);
bytes after the head are :class:`EarlyData`.  Everything else raises
:class:`HttpConnectError` carrying the complete response to write before closing: 405 for
another method, 400 for a malformed head, 431 for one too large, 505 for HTTP/2+, 407 when the
Binding has a user name and password and ``Proxy-Authorization: Basic`` is missing or wrong.

The answer to a CONNECT is the caller's, once the stream's OPEN_RESULT is known:
:func:`response_for_reason` gives 200 only for OK (the Proxy-Client's dial succeeded), 403 for
a denial, 504 for a timeout, 503 when the tunnel itself cannot take the stream, 502 for the
other dial failures.  Error responses carry a short text body and ``Connection: close``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from dataclasses import dataclass

from tcptunnel._frames import Reason, StreamError, printable, validate_target

# A CONNECT head is a request line and a few headers (curl: ~100 bytes; browsers with
# their proxy headers: under 1 KiB); 16 KiB is what nginx's large_client_header_buffers
# allows per line by default and bounds what one client can make us hold.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
HEAD_TIMEOUT = 10.0
REALM = "tcptunnel"

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# reg-name without percent-encoding (RFC 3986 §3.2.2): what a DNS name or an IPv4 literal
# can be; percent-encoded names would need decoding, and no client sends them.
_REG_NAME = re.compile(rb"[A-Za-z0-9._~!$&'()*+,;=-]+")
_PORT = re.compile(rb"[0-9]{1,5}")
# Field values: visible ASCII, space, tab and obs-text; no CR, LF, NUL or other controls.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")

_STATUS_TEXT = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def build_response(status: int, message: str = "",
                   headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete response.  200 has no body and keeps the connection (the tunnel starts
    after it); any other status has ``message`` as a text body and ``Connection: close``."""
    line = f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
    if status == 200:
        return line.encode("ascii") + b"\r\n"
    body = (printable(message) + "\n").encode("utf-8") if message else b""
    lines = [line]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append("Content-Type: text/plain; charset=utf-8\r\n")
    lines.append(f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return "".join(lines).encode("utf-8") + body


def status_for_reason(reason: Reason) -> int:
    """The status for a stream's OPEN_RESULT reason."""
    if reason is Reason.OK:
        return 200
    if reason in (Reason.DENIED, Reason.INVALID_TARGET):
        return 403
    if reason is Reason.TIMEOUT:
        return 504
    if reason in (Reason.NO_PARTNER, Reason.LIMIT, Reason.SHUTDOWN, Reason.LINK_LOST):
        return 503  # the tunnel, not the target, cannot take the stream now
    return 502


def response_for_reason(reason: Reason, message: str = "") -> bytes:
    """The response to a CONNECT once its stream's OPEN_RESULT is known."""
    return build_response(status_for_reason(reason), message)


def timeout_response() -> bytes:
    """408, for a client whose head did not arrive within HEAD_TIMEOUT."""
    return build_response(408, f"the request head did not arrive within {HEAD_TIMEOUT:g} s")


class HttpConnectError(Exception):
    """The request cannot be served; ``response`` is the complete answer to send, then close."""

    def __init__(self, status: int, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.response = build_response(status, message, headers)


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """``CONNECT host:port``: ``host`` without brackets; ``username`` when one logged in."""

    host: str
    port: int
    username: str | None = None


@dataclass(frozen=True, slots=True)
class EarlyData:
    """Bytes after the head: the beginning of the client's stream."""

    data: bytes


Event = ConnectRequested | EarlyData


def parse_authority(target: bytes) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of a CONNECT (raises HttpConnectError 400)."""
    if target.startswith(b"["):
        close = target.find(b"]")
        host_bytes, rest = target[1:close], target[close + 1 :]
        if close < 0 or not rest.startswith(b":") or b"%" in host_bytes:  # no zone index
            raise HttpConnectError(400, "CONNECT needs host:port ([address]:port for IPv6)")
        try:
            host = ipaddress.IPv6Address(host_bytes.decode("ascii")).compressed
        except (ValueError, UnicodeDecodeError):
            raise HttpConnectError(400, "the bracketed host is not an IPv6 address") from None
        port_bytes = rest[1:]
    else:
        host_bytes, colon, port_bytes = target.rpartition(b":")
        if not colon or not _REG_NAME.fullmatch(host_bytes):
            raise HttpConnectError(400, "CONNECT needs host:port ([address]:port for IPv6)")
        host = host_bytes.decode("ascii")
    if not _PORT.fullmatch(port_bytes):
        raise HttpConnectError(400, "the port is not a number")
    port = int(port_bytes)
    try:
        validate_target(host, port)
    except StreamError as e:
        raise HttpConnectError(400, e.message) from None
    return host, port


class ConnectParser:
    """One client's CONNECT request head.

    ``credentials`` (user name, password) requires ``Proxy-Authorization: Basic``; they are
    compared as ``user:password`` in UTF-8, in constant time."""

    def __init__(self, credentials: tuple[str, str] | None = None,
                 max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._expected = (None if credentials is None
                          else f"{credentials[0]}:{credentials[1]}".encode())
        self._username = None if credentials is None else credentials[0]
        self._max = max_head_bytes
        self._buffer = bytearray()
        self._searched = 0  # where the search for the end of the head resumes
        self.done = False  # the head was read: later bytes are early data
        self.failed = False

    @property
    def buffered(self) -> int:
        """Bytes held while the head is incomplete (at most max_head_bytes)."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the client; raises HttpConnectError once, then reads nothing."""
        if self.failed or not data:
            return []
        if self.done:
            return [EarlyData(bytes(data))]
        self._buffer += data
        # Resume a little before the end: the blank line may straddle two reads.
        match = _END_OF_HEAD.search(self._buffer, max(0, self._searched - 3))
        if match is None:
            self._searched = len(self._buffer)
            if len(self._buffer) > self._max:
                self._fail()
                raise HttpConnectError(431, f"the request head is longer than {self._max} "
                                       "bytes")
            return []
        if match.start() > self._max:
            self._fail()
            raise HttpConnectError(431, f"the request head is longer than {self._max} bytes")
        head, rest = bytes(self._buffer[: match.start()]), bytes(self._buffer[match.end() :])
        self._buffer.clear()
        try:
            event = self._parse(head)
        except HttpConnectError:
            self._fail()
            raise
        self.done = True
        return [event, EarlyData(rest)] if rest else [event]

    def _fail(self) -> None:
        self.failed = True
        self._buffer.clear()

    def _parse(self, head: bytes) -> ConnectRequested:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
        while lines and not lines[0]:  # RFC 9112 §2.2: empty lines before the request
            lines.pop(0)
        if not lines:
            raise HttpConnectError(400, "empty request")
        if any(b"\r" in line for line in lines):
            raise HttpConnectError(400, "a bare CR in the request head")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
            raise HttpConnectError(400, "the request line is not METHOD target HTTP/1.1")
        method, target, version = parts
        version_match = _VERSION.fullmatch(version)
        if version_match is None:
            raise HttpConnectError(400, "the request line is not METHOD target HTTP/1.1")
        if version_match.group(1) != b"1":
            raise HttpConnectError(505, "this proxy speaks HTTP/1.0 and HTTP/1.1")
        if method != b"CONNECT":
            raise HttpConnectError(
                405, "this is a tunnel for CONNECT host:port; use it as an HTTPS proxy",
                (("Allow", "CONNECT"),))
        headers = self._headers(lines[1:])
        host, port = parse_authority(target)
        self._authorise(headers.get(b"proxy-authorization"))
        return ConnectRequested(host, port, self._username)

    @staticmethod
    def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
        if len(lines) > MAX_HEADERS:
            raise HttpConnectError(431, f"more than {MAX_HEADERS} header fields")
        headers: dict[bytes, bytes] = {}
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                raise HttpConnectError(400, "obsolete line folding in the request head")
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise HttpConnectError(400, "a malformed header field")
            value = value.strip(b" \t")
            if not _FIELD_VALUE.fullmatch(value):
                raise HttpConnectError(400, "a control character in a header field")
            key = name.lower()
            if key == b"proxy-authorization" and key in headers:
                raise HttpConnectError(400, "Proxy-Authorization given twice")
            headers[key] = value
        return headers

    def _authorise(self, value: bytes | None) -> None:
        if self._expected is None:
            return  # a Binding without credentials ignores the header, as proxies do
        challenge = (("Proxy-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),)
        if value is None:
            raise HttpConnectError(407, "this proxy needs a user name and password",
                                   challenge)
        scheme, _, token = value.partition(b" ")
        try:
            given = base64.b64decode(token.strip(b" "), validate=True)
        except (binascii.Error, ValueError):
            given = b""
        # compare_digest takes as long for any wrong value of a given length; the scheme
        # check does not depend on the secret.
        if scheme.lower() != b"basic" or not hmac.compare_digest(given, self._expected):
            raise HttpConnectError(407, "wrong user name or password", challenge)
