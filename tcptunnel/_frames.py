"""Frame codec of the tcptunnel link protocol (``docs/protocol.md``), sans-IO.

Bytes in, :class:`Frame` objects out; payload builders and parsers for each
frame type.  Nothing here knows about streams, sessions or Twisted.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"TcpTnl\r\n"
# Version 2: OPEN carries a stream kind and extensible fields (docs/protocol.md §2, §5).
PROTOCOL_VERSION = 2
HEADER = struct.Struct(">I B I")  # (length << 8 | type), flags, stream id
HEADER_SIZE = 9
MAX_PAYLOAD = 65536
MAX_PAYLOAD_BEFORE_LOGIN = 4096
MAX_REASON_BYTES = 1024
MAX_HOST_BYTES = 253
MAX_WINDOW = 2**31 - 1
STREAM_ID_MASK = 0x7FFFFFFF

FLAG_BLOCKED = 0x01
# Bytes the opener may send on a stream before its OPEN_RESULT arrives (early data): every
# acceptor can take this much while it dials, so a first request costs no extra round trip.
EARLY_WINDOW = 16 * 1024


class FrameType(enum.IntEnum):
    """Frame types of protocol version 1."""

    HELLO = 0x01
    GOAWAY = 0x02
    PING = 0x03
    PONG = 0x04
    PARTNER = 0x05
    AUTH_START = 0x10
    AUTH_CHALLENGE = 0x11
    AUTH_PROOF = 0x12
    AUTH_RESULT = 0x13
    OPEN = 0x20
    OPEN_RESULT = 0x21
    DATA = 0x22
    WINDOW_UPDATE = 0x23
    FIN = 0x24
    RESET = 0x25


LINK_FRAME_TYPES = frozenset(t for t in FrameType if t < 0x20)
STREAM_FRAME_TYPES = frozenset(t for t in FrameType if t >= 0x20)


class Reason(enum.IntEnum):
    """Why a stream failed to open or was reset (OPEN_RESULT and RESET)."""

    OK = 0
    REFUSED = 1
    UNREACHABLE = 2
    DNS_FAILURE = 3
    TIMEOUT = 4
    DENIED = 5
    NO_PARTNER = 6
    LIMIT = 7
    PROTOCOL_ERROR = 8
    FLOW_CONTROL = 9
    CANCELLED = 10
    LINK_LOST = 11
    CONNECTION_RESET = 12
    INTERNAL = 13
    SHUTDOWN = 14
    INVALID_TARGET = 15
    UNSUPPORTED = 16
    # End-to-end encryption (docs/protocol.md §9.8).
    INTEGRITY = 17  # a record or sealed OPEN did not authenticate, or a stream was cut
    E2E_REQUIRED = 18  # this end requires end-to-end encryption; the stream came in clear
    E2E_UNAVAILABLE = 19  # this end has no end-to-end password
    E2E_MISMATCH = 20  # the pairing handshake's confirmation did not verify
    UNKNOWN = 255

    @classmethod
    def parse(cls, code: int) -> Reason:
        """The reason for a wire code; codes from a newer version map to UNKNOWN."""
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN


class GoAway(enum.IntEnum):
    """Why a link is being closed (GOAWAY)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    REPLACED = 2
    AUTH_FAILED = 3
    LOGIN_TIMEOUT = 4
    KEEPALIVE_TIMEOUT = 5
    LIMIT = 6
    UNSUPPORTED_VERSION = 7
    SESSION_CLOSED = 8
    INTERNAL = 9
    FRAME_TOO_LARGE = 10
    TOO_SLOW = 11
    BUSY = 12  # a transient limit (slots of links logging in): retry soon
    # The Gateway is draining (issue 20): reconnect at once, to the next Gateway if any.
    DRAINING = 13
    UNKNOWN = 255

    @classmethod
    def parse(cls, code: int) -> GoAway:
        """The GOAWAY code for a wire value; unknown values map to UNKNOWN."""
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN


class LinkError(Exception):
    """A violation that ends the whole link (GOAWAY ``code`` then close)."""

    def __init__(self, code: GoAway, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamError(Exception):
    """A violation confined to one stream (RESET with ``reason``)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``type`` is an int so unknown types survive decoding."""

    type: int
    flags: int
    stream_id: int
    payload: bytes


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """The 9-byte header of a frame whose payload is ``length`` bytes."""
    return HEADER.pack((length << 8) | frame_type, flags, stream_id)


def encode(frame_type: int, stream_id: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    """A whole frame as one bytes object (for small frames; DATA uses the header alone)."""
    return HEADER.pack((len(payload) << 8) | frame_type, flags, stream_id) + payload


# The original TcpTunnel's first frame is its LOGIN: a 4-byte big-endian length (4102 bytes
# and the password, at most its 256 KiB frame limit), type 0x00, a role byte, then a fixed
# public 4096-byte block that starts 0f e8 (original-tcptunnel.md, sections 1, 2.1, 2.3).
_ORIGINAL_LOGIN_MIN = 4102
_ORIGINAL_MAX_FRAME = 262144
_ORIGINAL_PREREQUISITE_START = b"\x0f\xe8"


def _is_original_login(prefix: bytes) -> bool:
    """Whether the first 8 bytes are the start of the original program's LOGIN frame."""
    if len(prefix) < 8:
        return False
    length = int.from_bytes(prefix[:4], "big")
    return (_ORIGINAL_LOGIN_MIN <= length <= _ORIGINAL_MAX_FRAME and prefix[4] == 0x00
            and prefix[6:8] == _ORIGINAL_PREREQUISITE_START)


def describe_bad_magic(prefix: bytes) -> str:
    """Say what the peer probably is, from the first bytes that were not our magic."""
    if prefix[:1] == b"\x16" and prefix[1:2] in (b"\x03", b""):
        return "the peer speaks TLS but this end is plain (useSsl / listener TLS mismatch)"
    if prefix.startswith(b"SSH-"):
        return "the peer is an SSH server: wrong port"
    if prefix[:5] in (b"HTTP/", b"GET /", b"POST ", b"HEAD ", b"PUT /") or prefix[:4] == b"GET ":
        return "the peer speaks HTTP: wrong port"
    if _is_original_login(prefix):
        return ("the peer speaks the original TcpTunnel's protocol (C# version): upgrade it "
                "or point it at a matching Gateway")
    return f"not a tcptunnel peer (or an incompatible program): first bytes {prefix[:8].hex()}"


class FrameDecoder:
    """Incremental decoder: accepts any split of the byte stream.

    ``feed`` returns the frames completed so far.  The magic is checked first
    (``expect_magic``); a frame's declared length is checked against
    ``max_payload`` as soon as its header is complete, before its payload is
    kept, so a hostile length costs nothing.

    Frames are cut straight out of the bytes received, each payload copied once; only the
    incomplete frame at the end of a chunk is kept, and its pieces are joined once, when
    the bytes that complete it have arrived (no growing buffer to copy into and shift).
    """

    def __init__(self, expect_magic: bool = True, max_payload: int = MAX_PAYLOAD) -> None:
        self._pending: list[bytes] = []  # the start of an incomplete header or frame
        self._pending_size = 0
        self._needed = 0  # pending bytes that complete that header or frame
        self._need_magic = expect_magic
        self.max_payload = max_payload

    def feed(self, data: bytes, max_frames: int = 0) -> list[Frame]:
        """Add bytes; return complete frames.  Raises :class:`LinkError`.

        With ``max_frames`` set, at most that many frames are cut and the rest is kept for the
        next call (``feed(b"")`` continues): before login the link applies each frame before
        the next one's length is checked, since a successful login raises the limit.
        """
        frames: list[Frame] = []
        offset = 0
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._need_magic or self._needed == HEADER_SIZE:
                # The magic or a header is incomplete: a few bytes, joined with what came.
                if self._pending_size < self._needed and not self._need_magic:
                    return frames
                data = b"".join(self._pending)
                self._pending.clear()
                self._pending_size = 0
            else:
                if self._pending_size < self._needed:
                    return frames
                offset = self._complete_pending(frames)
        if self._need_magic:
            seen = data[: len(MAGIC)]
            if not MAGIC.startswith(seen):
                raise LinkError(GoAway.PROTOCOL_ERROR, describe_bad_magic(bytes(seen)))
            if len(seen) < len(MAGIC):
                self._keep(data, len(MAGIC))
                return frames
            offset = len(MAGIC)
            self._need_magic = False
        available = len(data)
        needed = HEADER_SIZE
        unpack = HEADER.unpack_from
        # Payloads are copied once, out of a view.
        with memoryview(data) as view:
            while available - offset >= HEADER_SIZE:
                word, flags, stream_id = unpack(data, offset)
                length = self._checked_length(word)
                end = offset + HEADER_SIZE + length
                if end > available:
                    needed = HEADER_SIZE + length
                    break
                frames.append(
                    Frame(word & 0xFF, flags, stream_id & STREAM_ID_MASK,
                          bytes(view[offset + HEADER_SIZE : end]))
                )
                offset = end
                if max_frames and len(frames) >= max_frames:
                    break
        if offset < available:
            self._keep(data[offset:] if offset else data, needed)
        return frames

    def _checked_length(self, word: int) -> int:
        length = word >> 8
        if length > self.max_payload:
            raise LinkError(
                GoAway.FRAME_TOO_LARGE,
                f"frame of {length} bytes announced; the limit here is {self.max_payload}",
            )
        return length

    def _complete_pending(self, frames: list[Frame]) -> int:
        """The pending frame is complete: append it, its payload joined straight from the
        pieces; return where the rest starts in the last piece (the bytes just fed)."""
        pieces = self._pending
        first, last = pieces[0], pieces[-1]
        word, flags, stream_id = HEADER.unpack_from(first, 0)
        self._checked_length(word)  # again: the limit may have changed since (login)
        parts: list[Any] = [memoryview(first)[HEADER_SIZE:], *pieces[1:-1]]
        taken = self._needed - (self._pending_size - len(last))  # 0 < taken <= len(last)
        parts.append(memoryview(last)[:taken])
        frames.append(Frame(word & 0xFF, flags, stream_id & STREAM_ID_MASK, b"".join(parts)))
        pieces.clear()
        self._pending_size = 0
        return taken

    def _keep(self, rest: bytes, needed: int) -> None:
        self._pending.append(rest)
        self._pending_size = len(rest)
        self._needed = needed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._pending_size


# ---------------------------------------------------------------------------
# Payloads.

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_SETTING = struct.Struct(">HI")
_OPEN = struct.Struct(">IIB")  # window, origin, kind; then fields
_OPEN_RESULT = struct.Struct(">BI")
_AUTH_START = struct.Struct(">Bi")


def printable(text: str) -> str:
    """``text`` with every character that could move a terminal's cursor or hide text (C0 and C1
    controls, DEL, bidi overrides, line and paragraph separators: whatever ``isprintable``
    refuses, except space) written as a ``\\x..``/``\\u....`` escape, so that peer-supplied text
    reaches a log as one honest line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


def _reason_text(payload: bytes) -> str:
    """A peer's reason text: capped, lenient about bad UTF-8, control characters escaped (it
    is only logged)."""
    return printable(payload[:MAX_REASON_BYTES].decode("utf-8", errors="replace"))


def _reason_bytes(message: str) -> bytes:
    data = message.encode("utf-8")
    if len(data) > MAX_REASON_BYTES:
        data = data[:MAX_REASON_BYTES].decode("utf-8", errors="ignore").encode("utf-8")
    return data


def build_hello(version: int = PROTOCOL_VERSION, settings: dict[int, int] | None = None) -> bytes:
    """Magic + HELLO: the first bytes each end sends."""
    payload = _U16.pack(version) + b"".join(
        _SETTING.pack(k, v) for k, v in (settings or {}).items()
    )
    return MAGIC + encode(FrameType.HELLO, 0, payload)


def parse_hello(payload: bytes) -> tuple[int, dict[int, int]]:
    """(version, settings) of a HELLO; unknown settings are kept for the caller to ignore."""
    if len(payload) < 2 or (len(payload) - 2) % _SETTING.size:
        raise LinkError(GoAway.PROTOCOL_ERROR, f"malformed HELLO of {len(payload)} bytes")
    (version,) = _U16.unpack_from(payload)
    settings = dict(_SETTING.iter_unpack(payload[2:]))
    return version, settings


def build_goaway(code: GoAway, message: str) -> bytes:
    """A GOAWAY frame."""
    return encode(FrameType.GOAWAY, 0, bytes([code]) + _reason_bytes(message))


def parse_goaway(payload: bytes) -> tuple[GoAway, str]:
    """(code, reason) of a GOAWAY."""
    if not payload:
        raise LinkError(GoAway.PROTOCOL_ERROR, "empty GOAWAY")
    return GoAway.parse(payload[0]), _reason_text(payload[1:])


def build_ping(opaque: bytes, pong: bool = False) -> bytes:
    """PING (or PONG) carrying 8 opaque bytes."""
    return encode(FrameType.PONG if pong else FrameType.PING, 0, opaque)


def check_ping(payload: bytes) -> bytes:
    """Validate a PING/PONG payload."""
    if len(payload) != 8:
        raise LinkError(GoAway.PROTOCOL_ERROR, f"PING/PONG of {len(payload)} bytes, not 8")
    return payload


def build_partner(count: int) -> bytes:
    """PARTNER: how many partners are present."""
    return encode(FrameType.PARTNER, 0, _U32.pack(count))


def parse_partner(payload: bytes) -> int:
    """The partner count of a PARTNER frame."""
    if len(payload) != 4:
        raise LinkError(GoAway.PROTOCOL_ERROR, f"PARTNER of {len(payload)} bytes, not 4")
    return int(_U32.unpack(payload)[0])


ROLE_PROXY_CLIENT = 0
ROLE_PROXY_SERVER = 1


def build_auth_start(role: int, session_id: int, client_first: str) -> bytes:
    """AUTH_START: role, session id and the SCRAM client-first message."""
    return encode(FrameType.AUTH_START, 0,
                  _AUTH_START.pack(role, session_id) + client_first.encode("utf-8"))


def parse_auth_start(payload: bytes) -> tuple[int, int, str]:
    """(role, session id, client-first) of an AUTH_START."""
    if len(payload) < _AUTH_START.size + 1:
        raise LinkError(GoAway.PROTOCOL_ERROR, "AUTH_START too short")
    role, session_id = _AUTH_START.unpack_from(payload)
    if role not in (ROLE_PROXY_CLIENT, ROLE_PROXY_SERVER):
        raise LinkError(GoAway.PROTOCOL_ERROR, f"AUTH_START with unknown role {role}")
    return role, session_id, _strict_text(payload[_AUTH_START.size :], "AUTH_START")


def _strict_text(payload: bytes, what: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise LinkError(GoAway.PROTOCOL_ERROR, f"{what} is not valid UTF-8") from None


def build_auth_message(frame_type: FrameType, message: str) -> bytes:
    """AUTH_CHALLENGE or AUTH_PROOF carrying one SCRAM message."""
    return encode(frame_type, 0, message.encode("utf-8"))


def parse_auth_message(payload: bytes, what: str) -> str:
    """The SCRAM message of AUTH_CHALLENGE / AUTH_PROOF."""
    return _strict_text(payload, what)


def build_auth_result(ok: bool, server_final: str = "") -> bytes:
    """AUTH_RESULT: 1 + server-final on success, 0 on failure."""
    return encode(FrameType.AUTH_RESULT, 0,
                  (b"\x01" + server_final.encode("utf-8")) if ok else b"\x00")


def parse_auth_result(payload: bytes) -> tuple[bool, str]:
    """(ok, server-final) of an AUTH_RESULT."""
    if not payload or payload[0] not in (0, 1):
        raise LinkError(GoAway.PROTOCOL_ERROR, "malformed AUTH_RESULT")
    return payload[0] == 1, _strict_text(payload[1:], "AUTH_RESULT")


# Stream kinds (OPEN).  The Gateway forwards the kind and the fields untouched; only the
# acceptor (the Proxy-Client) interprets them, so a new kind needs no change at the Gateway.
KIND_TCP = 0
# A stream of datagrams (docs/protocol.md §5.2): one DATA frame is one datagram, an empty
# DATA frame an empty datagram; HOST and PORT as for ``tcp``.
KIND_UDP = 1
# End-to-end encryption (docs/protocol.md §9.2): a pairing handshake, and a stream whose
# kind, target and fields travel sealed in its one critical field.  Neither has HOST/PORT.
KIND_PAKE = 2
KIND_SEALED = 3
KIND_NAMES = {KIND_TCP: "tcp", KIND_UDP: "udp", KIND_PAKE: "pake", KIND_SEALED: "sealed"}
#: The kinds that carry exactly one critical field of their own instead of a target.
ENVELOPE_FIELDS = {KIND_PAKE: 0x82, KIND_SEALED: 0x81}

# OPEN fields: (tag u8, length u16, value).  Tags below 0x80 may be ignored by a receiver
# that does not know them; a tag from 0x80 up is critical: the stream is refused
# (UNSUPPORTED) rather than opened without it.
FIELD_HOST = 0x01  # UTF-8 host name or IP literal, 1-253 bytes
FIELD_PORT = 0x02  # u16
# The original client's address as the Proxy-Server saw it, for PROXY protocol headers to
# targets (tcptunnel._proxyproto): family u8 (4 or 6) | source address | source port u16 |
# destination address | destination port u16, 13 or 37 bytes.  Non-critical: an older
# Proxy-Client skips it.
FIELD_CLIENT_ADDRESS = 0x03
FIELD_CRITICAL = 0x80
_FIELD = struct.Struct(">BH")


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """The content of an OPEN frame.

    ``fields`` holds the fields this end does not interpret (tag, value), kept in order so
    that they survive a re-encoding.
    """

    window: int
    origin: int
    host: str
    port: int
    kind: int = KIND_TCP
    fields: tuple[tuple[int, bytes], ...] = ()


def validate_target(host: str, port: int) -> None:
    """Raise StreamError(INVALID_TARGET) unless host/port may be dialled."""
    encoded = host.encode("utf-8", errors="replace")
    if not 1 <= len(encoded) <= MAX_HOST_BYTES or any(c in host for c in " /") or (
            not host.isprintable()):
        raise StreamError(Reason.INVALID_TARGET, f"invalid target host {printable(host[:64])!r}")
    if not 1 <= port <= 65535:
        raise StreamError(Reason.INVALID_TARGET, f"invalid target port {port}")


def open_payload(window: int, origin: int, kind: int,
                 fields: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]]) -> bytes:
    """An OPEN payload as given, unchecked (``build_open`` validates; tests build bad ones)."""
    body = [_OPEN.pack(window, origin, kind)]
    for tag, value in fields:
        body.append(_FIELD.pack(tag, len(value)))
        body.append(value)
    return b"".join(body)


def target_fields(host: str, port: int) -> list[tuple[int, bytes]]:
    """The HOST and PORT fields of a ``tcp`` or ``udp`` stream's OPEN."""
    return [(FIELD_HOST, host.encode("utf-8")), (FIELD_PORT, _U16.pack(port))]


def build_open(stream_id: int, request: OpenRequest) -> bytes:
    """An OPEN frame (``tcp`` and ``udp`` carry the target as the HOST and PORT fields;
    ``pake`` and ``sealed`` only their own field, in ``fields``)."""
    if request.kind in ENVELOPE_FIELDS:
        return encode(FrameType.OPEN, stream_id, open_payload(
            request.window, request.origin, request.kind, list(request.fields)))
    validate_target(request.host, request.port)
    return encode(FrameType.OPEN, stream_id, open_payload(
        request.window, request.origin, request.kind,
        target_fields(request.host, request.port) + list(request.fields)))


def parse_open_header(payload: bytes) -> tuple[int, int, int]:
    """(window, origin, kind) of an OPEN, checking only what the Gateway relies on: the
    size of the fixed part and the window (raises StreamError)."""
    if len(payload) < _OPEN.size:
        raise StreamError(Reason.PROTOCOL_ERROR, "OPEN too short")
    window, origin, kind = _OPEN.unpack_from(payload)
    if not 0 < window <= MAX_WINDOW:
        raise StreamError(Reason.FLOW_CONTROL, f"OPEN with window {window}")
    return window, origin, kind


def with_origin(payload: bytes, origin: int) -> bytes:
    """The same OPEN payload with ``origin`` replaced; everything else passes unchanged."""
    return payload[:4] + _U32.pack(origin) + payload[8:]


def parse_open(payload: bytes) -> OpenRequest:
    """Decode and validate an OPEN payload at the acceptor (raises StreamError)."""
    window, origin, kind = parse_open_header(payload)
    if kind not in KIND_NAMES:
        raise StreamError(Reason.UNSUPPORTED, f"stream kind {kind} is not supported here")
    envelope = ENVELOPE_FIELDS.get(kind)
    host: str | None = None
    port: int | None = None
    extra: list[tuple[int, bytes]] = []
    offset = _OPEN.size
    while offset < len(payload):
        if len(payload) - offset < _FIELD.size:
            raise StreamError(Reason.PROTOCOL_ERROR, "OPEN field header cut short")
        tag, length = _FIELD.unpack_from(payload, offset)
        offset += _FIELD.size
        value = payload[offset : offset + length]
        if len(value) != length:
            raise StreamError(Reason.PROTOCOL_ERROR, "OPEN field length does not match the frame")
        offset += length
        if envelope is not None:
            # pake / sealed: the one field of the kind, nothing else (the details are inside).
            if tag != envelope or extra:
                raise StreamError(Reason.PROTOCOL_ERROR,
                                  f"an OPEN of kind {KIND_NAMES[kind]} carries only field "
                                  f"{envelope:#04x}")
            extra.append((tag, value))
        elif tag == FIELD_HOST and host is None:
            try:
                host = value.decode("utf-8")
            except UnicodeDecodeError:
                raise StreamError(Reason.INVALID_TARGET,
                                  "target host is not valid UTF-8") from None
        elif tag == FIELD_PORT and port is None:
            if length != 2:
                raise StreamError(Reason.PROTOCOL_ERROR, "OPEN port field is not 2 bytes")
            (port,) = _U16.unpack(value)
        elif tag in (FIELD_HOST, FIELD_PORT):
            raise StreamError(Reason.PROTOCOL_ERROR, f"OPEN field {tag:#04x} given twice")
        elif tag & FIELD_CRITICAL:
            raise StreamError(Reason.UNSUPPORTED, f"OPEN field {tag:#04x} is not supported here")
        else:
            extra.append((tag, value))
    if envelope is not None:
        if not extra:
            raise StreamError(Reason.PROTOCOL_ERROR,
                              f"an OPEN of kind {KIND_NAMES[kind]} without its field")
        return OpenRequest(window, origin, "", 0, kind, tuple(extra))
    if host is None or port is None:
        raise StreamError(Reason.INVALID_TARGET, "OPEN without a target host and port")
    validate_target(host, port)
    return OpenRequest(window, origin, host, port, kind, tuple(extra))


def build_open_result(stream_id: int, reason: Reason, window: int = 0, message: str = "") -> bytes:
    """OPEN_RESULT: reason OK with the acceptor's window, or a failure reason and message."""
    return encode(FrameType.OPEN_RESULT, stream_id,
                  _OPEN_RESULT.pack(reason, window) + _reason_bytes(message))


def parse_open_result(payload: bytes) -> tuple[Reason, int, str]:
    """(reason, window, message) of an OPEN_RESULT (raises StreamError)."""
    if len(payload) < _OPEN_RESULT.size:
        raise StreamError(Reason.PROTOCOL_ERROR, "OPEN_RESULT too short")
    code, window = _OPEN_RESULT.unpack_from(payload)
    reason = Reason.parse(code)
    if reason is Reason.OK and not 0 < window <= MAX_WINDOW:
        raise StreamError(Reason.FLOW_CONTROL, f"OPEN_RESULT with window {window}")
    return reason, window, _reason_text(payload[_OPEN_RESULT.size :])


def build_window_update(stream_id: int, increment: int) -> bytes:
    """WINDOW_UPDATE returning ``increment`` bytes of credit."""
    return encode(FrameType.WINDOW_UPDATE, stream_id, _U32.pack(increment))


def parse_window_update(payload: bytes) -> int:
    """The increment of a WINDOW_UPDATE (raises StreamError)."""
    if len(payload) != 4:
        raise StreamError(Reason.PROTOCOL_ERROR, "WINDOW_UPDATE must be 4 bytes")
    (increment,) = _U32.unpack(payload)
    if not 0 < increment <= MAX_WINDOW:
        raise StreamError(Reason.FLOW_CONTROL, f"WINDOW_UPDATE of {increment}")
    return int(increment)


def build_fin(stream_id: int) -> bytes:
    """FIN: the sender will send no more DATA on this stream."""
    return encode(FrameType.FIN, stream_id)


def build_reset(stream_id: int, reason: Reason, message: str = "") -> bytes:
    """RESET: the stream ends now in both directions."""
    return encode(FrameType.RESET, stream_id, bytes([reason]) + _reason_bytes(message))


def parse_reset(payload: bytes) -> tuple[Reason, str]:
    """(reason, message) of a RESET; an empty payload counts as UNKNOWN."""
    if not payload:
        return Reason.UNKNOWN, ""
    return Reason.parse(payload[0]), _reason_text(payload[1:])
