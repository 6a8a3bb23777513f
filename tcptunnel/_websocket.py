"""WebSocket links, sans-IO: which HTTP requests a WebSocket Listener upgrades, who the
peer is behind a trusted reverse proxy, and the data frames of an open link.

A WebSocket Listener is an HTTP server to everyone who is not a proxy of ours: a request for
any other path, a plain ``GET`` without the Upgrade headers, or any other method gets a plain
404 (a health check or a browser sees a normal web server); a request head that does not end
within :data:`MAX_REQUEST_HEAD` bytes gets 431.  :func:`route_request` decides that from the
request head alone; the RFC 6455 handshake itself is autobahn's (:mod:`tcptunnel.websocket`).

``X-Forwarded-For`` is honoured only when the TCP peer is one of the Listener's trusted
proxies (:func:`forwarded_client`): otherwise anyone could claim any address and escape the
login throttle and the per-address slot limits.

A link's data frames (RFC 6455 §5.2: binary messages, their continuations, and the control
frames between them) are written by :func:`binary_frame_header` / :func:`mask_payload` and read
by :class:`FrameReader`, our own small codec for the one kind of traffic a link carries.
autobahn's general frame layer costs ~25 µs of Python per frame and hop (profiled: frame
parse 2 calls, a new C masker object per frame, message and frame callbacks, traffic
counters), a third of a TLS hop's whole CPU per round trip.  Everything else stays
autobahn's: the opening handshake, every control frame (the reader hands them over whole),
the closing handshake, and any frame the reader does not take (text, reserved bits or
opcodes, wrong masking, non-minimal lengths): from there on autobahn reads, and fails the
connection as RFC 6455 says.  No Twisted here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

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


# -- data frames (RFC 6455 §5.2) ----------------------------------------------------------

OP_CONTINUATION = 0x0
OP_BINARY = 0x2
# Control frames (§5.5): opcodes 0x8 and up; close, ping and pong are defined, the rest are
# reserved.  They are never fragmented and carry at most 125 bytes.
OP_CONTROL = 0x8
OP_PONG = 0xA
MAX_CONTROL_PAYLOAD = 125
# The longest data frame header: 2 bytes, an 8-byte length, a 4-byte masking key.
MAX_HEADER = 14

class Unmasker(Protocol):
    """A frame's unmasking, piece by piece (it keeps its place in the key from piece to
    piece): a piece as new bytes, or in place in a bytearray (where the reader gathers
    the payload of several frames of one read)."""

    def __call__(self, data: bytes | memoryview) -> bytes:
        """The payload's next piece, unmasked."""

    def into(self, buffer: bytearray, start: int, end: int) -> None:
        """Unmask the payload's next piece, ``buffer[start:end]``, in place."""


# Makes a frame's Unmasker from its key and payload length.
UnmaskerFactory = Callable[[bytes, int], Unmasker]


def xor_mask(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """``data`` XOR the 4-byte ``key`` repeated (§5.3: masking and unmasking are the same).

    One big-integer XOR in C: 0.3-0.8 µs up to 200 bytes, ~4.5 µs at 1.4 KB, but ~2.6 µs
    per KiB beyond (measured: 170 µs for 64 KiB, against 5 µs for autobahn's SIMD loop in
    place, which :func:`tcptunnel.websocket.mask_in_place` uses at every size): the
    reader's default, and the links' masker only where autobahn has no C masker."""
    size = len(data)
    if not size:
        return b""
    words = (size + 3) >> 2
    masked = int.from_bytes(data, "little") ^ int.from_bytes(key * words, "little")
    return masked.to_bytes(words << 2, "little")[:size]


class XorUnmasker:
    """One frame's :func:`xor_mask`, piece by piece (the key turned to each piece's first
    byte)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes, length: int = 0) -> None:
        self._key = key

    def __call__(self, data: bytes | memoryview) -> bytes:
        """The payload's next piece, unmasked."""
        key = self._key
        turn = len(data) & 3
        if turn:
            self._key = key[turn:] + key[:turn]
        return xor_mask(key, data)

    def into(self, buffer: bytearray, start: int, end: int) -> None:
        """Unmask the payload's next piece, ``buffer[start:end]``, in place."""
        buffer[start:end] = self(memoryview(buffer)[start:end])


class MaskingKeys:
    """Masking keys for a client's frames (RFC 6455 §5.3: each frame a fresh key, "derived
    from a strong source of entropy"), taken 4 bytes at a time from ``source(4096)`` (e.g.
    ``os.urandom``): one getrandom(2) syscall per 1,024 frames instead of one per frame
    (~0.3-0.6 µs each).  Every byte of ``source`` is used once, as one key's; the buffer
    holds at most 4 KiB.  :meth:`forget` drops what is held (a forked child must not
    reuse its parent's keys)."""

    __slots__ = ("_buffer", "_position", "_source")

    REFILL = 4096

    def __init__(self, source: Callable[[int], bytes]) -> None:
        self._source = source
        self._buffer = b""
        self._position = 0

    def __call__(self) -> bytes:
        """The next 4-byte key."""
        position = self._position
        if position >= len(self._buffer):
            self._buffer, position = self._source(self.REFILL), 0
            if len(self._buffer) < 4:
                raise ValueError("the entropy source gave fewer than 4 bytes")
        self._position = position + 4
        return self._buffer[position:position + 4]

    def forget(self) -> None:
        """Drop the keys held (after a fork)."""
        self._buffer, self._position = b"", 0


def small_frame(payload: bytes, key: bytes = b"") -> bytes:
    """One unfragmented binary message of fewer than 126 bytes, whole: the 2-byte header,
    the ``key`` and the payload masked with it, or the payload as it is without a key (what
    :func:`binary_frame_header` and :func:`xor_mask` give, in one call: a 1-byte ping's
    frame)."""
    length = len(payload)
    if key:
        return bytes((0x80 | OP_BINARY, 0x80 | length)) + key + xor_mask(key, payload)
    return bytes((0x80 | OP_BINARY, length)) + payload


def binary_frame_header(length: int, key: bytes = b"") -> bytes:
    """The header of one unfragmented binary message of ``length`` bytes: FIN, opcode 2, the
    length in the fewest bytes (§5.2), then the masking ``key`` if any (a client's frames
    carry one, a server's none)."""
    second = 0x80 if key else 0
    if length < 126:
        return bytes((0x80 | OP_BINARY, second | length)) + key
    if length < 0x10000:
        return bytes((0x80 | OP_BINARY, second | 126)) + length.to_bytes(2, "big") + key
    return bytes((0x80 | OP_BINARY, second | 127)) + length.to_bytes(8, "big") + key


@dataclass(frozen=True)
class ControlFrame:
    """A whole control frame (close, ping or pong), as received: for autobahn to act on."""

    raw: bytes


@dataclass(frozen=True)
class Unhandled:
    """Where the reader stops for good: ``raw`` from the first byte of a frame it does not
    take, to be read by a full WebSocket implementation from there, ``inside_message``
    telling it whether a fragmented binary message is open."""

    raw: bytes
    inside_message: bool


ReadEvent = bytes | ControlFrame | Unhandled


class FrameReader:
    """Reads the frames of an open link: the bytes of binary messages as they arrive (a
    message's boundaries mean nothing to the link, so nothing is gathered), whole control
    frames, and :class:`Unhandled` at the first frame that is not one of those.

    The payload of all data frames a read holds is one event, not one per frame: a 64 KiB
    read of a bulk link holds the end of one frame and the start of the next, and every
    event is a pass through the link and the mux (a flush downstream, so smaller frames on
    the next hop too: 1.7 deliveries per read at the Proxy-Client before, profiled).

    ``masked``: whether frames must be masked (a server reads a client's, which must be,
    §5.1; a client reads a server's, which must not be); a frame that is not is
    :class:`Unhandled` (the full implementation fails the connection).  ``unmasker`` makes
    each masked frame's unmasking (:class:`XorUnmasker`, or a faster one of the same result:
    one per frame, not per piece, as a C masker costs ~1-3 µs to set up; a read that is one
    whole frame of fewer than 126 bytes is unmasked by :func:`xor_mask`, the quickest at that
    size).  Masked payload is copied once into a bytearray, unmasked there in place, and
    handed over as bytes.

    Holds at most one incomplete header or control frame: :data:`MAX_HEADER` +
    :data:`MAX_CONTROL_PAYLOAD` bytes.
    """

    def __init__(self, masked: bool, unmasker: UnmaskerFactory = XorUnmasker) -> None:
        self._masked = 0x80 if masked else 0
        self._unmasker = unmasker
        self._buffer = b""
        self._remaining = 0  # payload bytes of the current data frame still to come
        self._unmask: Unmasker | None = None  # its unmasking, if masked
        self._inside = False  # a fragmented message is open (its FIN frame not yet begun)
        self.stopped = False  # an Unhandled was returned: no more reading here

    @property
    def buffered(self) -> int:
        """Bytes held: the start of a header or of a control frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[ReadEvent]:
        """Read ``data``: payload bytes (unmasked, those of consecutive frames as one),
        control frames, or an Unhandled, in order.  A control frame is always the last event
        of its call: call ``feed(b"")`` after acting on it, to read on (so that what follows
        a close is not read here)."""
        if self.stopped:
            raise RuntimeError("the reader stopped at an unhandled frame")
        if not (self._buffer or self._remaining or self._inside) and len(data) >= 2:
            # A read that is one whole small binary message (a ping-pong's, an interactive
            # stream's): its payload at once, without the general walk (1-byte masked
            # frame 1.5 -> 0.9 µs, measured).  Anything else takes the general path.
            size = data[1] ^ self._masked  # (the length if the mask bit is as it must be)
            if data[0] == 0x80 | OP_BINARY and 0 < size < 126:
                if not self._masked:
                    if len(data) == 2 + size:
                        return [data[2:]]
                elif len(data) == 6 + size:  # (below 126 bytes the XOR is the quickest)
                    return [xor_mask(data[2:6], data[6:])]
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        end = len(buffer)
        events: list[ReadEvent] = []
        # The payload read so far and not yet an event: (start, end, unmasking) in buffer.
        spans: list[tuple[int, int, Unmasker | None]] = []
        position = self._payload(buffer, 0, end, spans) if self._remaining else 0
        masked = self._masked
        while position < end:
            if end - position < 2:
                break
            first, second = buffer[position], buffer[position + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            if first & 0x70 or second & 0x80 != masked:
                return self._stop(events, spans, buffer, position)  # reserved bits, masking
            if opcode >= OP_CONTROL:
                if opcode > OP_PONG or not first & 0x80 or length > MAX_CONTROL_PAYLOAD:
                    return self._stop(events, spans, buffer, position)
                size = (6 if masked else 2) + length
                if end - position < size:
                    break
                if spans:
                    events.append(self._gather(buffer, spans))
                events.append(ControlFrame(buffer[position:position + size]))
                self._buffer = buffer[position + size:]
                return events
            if opcode != (OP_CONTINUATION if self._inside else OP_BINARY):
                # text, reserved, out of order
                return self._stop(events, spans, buffer, position)
            start = position + 2
            header = (6 if masked else 2) + (2 if length == 126 else 8 if length == 127 else 0)
            if end - position < header:
                break
            if length == 126:
                length = int.from_bytes(buffer[start:start + 2], "big")
                if length < 126:
                    return self._stop(events, spans, buffer, position)  # not the fewest bytes
            elif length == 127:
                length = int.from_bytes(buffer[start:start + 8], "big")
                if length < 0x10000 or length >> 63:
                    return self._stop(events, spans, buffer, position)
            position += header
            self._inside = not first & 0x80
            if length:
                self._remaining = length
                self._unmask = self._unmasker(buffer[position - 4:position],
                                              length) if masked else None
                if position < end:
                    position = self._payload(buffer, position, end, spans)
        if position < end:
            self._buffer = buffer[position:]
        if len(spans) == 1:  # (most reads: inline, ~0.3 µs a read less than _gather)
            start, stop, unmask = spans[0]
            if unmask is None:
                events.append(buffer if stop - start == end else buffer[start:stop])
            elif stop - start == end:
                events.append(unmask(buffer))
            elif stop - start < 4096:
                events.append(unmask(buffer[start:stop]))
            else:
                events.append(unmask(memoryview(buffer)[start:stop]))  # (into a copy)
        elif spans:
            events.append(self._gather(buffer, spans))
        return events

    def _payload(self, buffer: bytes, position: int, end: int,
                 spans: list[tuple[int, int, Unmasker | None]]) -> int:
        """Note what ``buffer`` holds of the current frame's payload from ``position`` on
        (at least a byte) in ``spans``; where it ended."""
        remaining = self._remaining
        take = min(remaining, end - position)
        spans.append((position, position + take, self._unmask))
        self._remaining = remaining - take
        return position + take

    @staticmethod
    def _gather(buffer: bytes, spans: list[tuple[int, int, Unmasker | None]]) -> bytes:
        """The payload of ``spans`` as one piece of bytes, unmasked (one copy: none when it
        is all of an unmasked ``buffer``)."""
        if spans[0][2] is None:  # a server's frames: none is masked
            if len(spans) == 1:
                start, stop, _ = spans[0]
                return buffer if stop - start == len(buffer) else buffer[start:stop]
            view = memoryview(buffer)
            return b"".join([view[start:stop] for start, stop, _ in spans])
        view = memoryview(buffer)
        if len(spans) == 1:  # (the XOR of a small frame is quicker on bytes)
            start, stop, unmask = spans[0]
            assert unmask is not None
            return unmask(view[start:stop])
        gathered = bytearray().join([view[start:stop] for start, stop, _ in spans])
        offset = 0
        for start, stop, unmask in spans:
            assert unmask is not None
            unmask.into(gathered, offset, offset + stop - start)
            offset += stop - start
        return bytes(gathered)

    def _stop(self, events: list[ReadEvent], spans: list[tuple[int, int, Unmasker | None]],
              buffer: bytes, position: int) -> list[ReadEvent]:
        self.stopped = True
        if spans:
            events.append(self._gather(buffer, spans))
        events.append(Unhandled(buffer[position:], self._inside))
        return events

    def rest(self) -> Unhandled:
        """Stop here (after a control frame that began the closing handshake): what is held
        and not read, for the full implementation to read from; nothing more is read."""
        self.stopped = True
        rest, self._buffer = self._buffer, b""
        return Unhandled(rest, self._inside)
