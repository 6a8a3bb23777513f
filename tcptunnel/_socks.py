"""SOCKS5 server side (RFC 1928, RFC 1929 username/password), sans-IO: bytes in, events out.

For the Proxy-Server's ``<Binding type="socks5">``: a client connects, negotiates a method,
optionally logs in with a user name and password, and asks to CONNECT to an IPv4 or IPv6
address or a domain name.  :class:`SocksServer` turns the bytes it receives into events
(:class:`Authenticated`, :class:`AuthenticationFailed`, :class:`ConnectRequested`,
:class:`CommandRefused`, :class:`EarlyData`) and queues what it answers itself (the method
choice, the login status, "command not supported") in :meth:`SocksServer.data_to_send`.
The CONNECT's reply is the caller's, once the stream's OPEN_RESULT is known:
:meth:`SocksServer.reply` with :func:`reply_for_reason`, so the client hears the truth
(succeeded only when the Proxy-Client's dial succeeded).

Malformed input raises :class:`SocksError`, whose ``reply`` is what to write before closing
(it may be empty: RFC 1928 has no answer to a greeting of another version).  The parser
holds at most :data:`MAX_HANDSHAKE_BYTES` before the request is complete, and bytes that
follow the request are :class:`EarlyData`, never buffered here.

Why not the ``socksio`` library: it implements the *client* side only (its
``SOCKS5Connection`` builds requests and parses a server's replies, one whole message per
call), and its last release is from 2020; a server-side parser over arbitrary splits is the
part we need, and it is small.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import struct
from dataclasses import dataclass

from tcptunnel._frames import Reason, StreamError, printable, validate_target

VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF
AUTH_VERSION = 1  # RFC 1929's subnegotiation version
CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3
ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4
COMMAND_NAMES = {CMD_CONNECT: "CONNECT", CMD_BIND: "BIND", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}

# The longest valid messages before the stream: greeting (2 + 255 methods), login
# (3 + 255 + 255), request (4 + 1 + 255 + 2 for the longest domain name); 1,032 bytes in
# all.  A client that has not completed its request has sent less than this, and the
# parser never holds more.
MAX_GREETING = 2 + 255
MAX_LOGIN = 3 + 255 + 255
MAX_REQUEST = 4 + 1 + 255 + 2
MAX_HANDSHAKE_BYTES = MAX_GREETING + MAX_LOGIN + MAX_REQUEST
# A SOCKS handshake is a round trip or two; the adapter closes one that takes longer.
HANDSHAKE_TIMEOUT = 10.0

_PORT = struct.Struct(">H")


class Reply(enum.IntEnum):
    """REP codes of a SOCKS5 reply (RFC 1928 §6)."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2  # "connection not allowed by ruleset"
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


# What a client hears for each OPEN_RESULT / RESET reason.  Our UNREACHABLE is "no route"
# (the dial's EHOSTUNREACH/ENETUNREACH), DNS_FAILURE a name that did not resolve at the
# Proxy-Client, which a client should see as that host being unreachable; TIMEOUT is the
# connect deadline, for which RFC 1928's nearest code is "TTL expired" (issue 17 asks for
# it).  A target refused by the allow-list, or one it calls malformed (INVALID_TARGET,
# e.g. "127.1"), is "not allowed by ruleset".  Everything that is not about the target (no
# Proxy-Client, limits, links lost, protocol errors) is a general failure.
_REPLY_FOR_REASON = {
    Reason.OK: Reply.SUCCEEDED,
    Reason.DENIED: Reply.NOT_ALLOWED,
    Reason.INVALID_TARGET: Reply.NOT_ALLOWED,
    Reason.REFUSED: Reply.CONNECTION_REFUSED,
    Reason.CONNECTION_RESET: Reply.CONNECTION_REFUSED,
    Reason.UNREACHABLE: Reply.NETWORK_UNREACHABLE,
    Reason.DNS_FAILURE: Reply.HOST_UNREACHABLE,
    Reason.TIMEOUT: Reply.TTL_EXPIRED,
}


def reply_for_reason(reason: Reason) -> Reply:
    """The SOCKS reply code for a stream's OPEN_RESULT reason."""
    return _REPLY_FOR_REASON.get(reason, Reply.GENERAL_FAILURE)


def build_reply(code: Reply, address: str | None = None, port: int = 0) -> bytes:
    """A reply (``VER REP RSV ATYP BND.ADDR BND.PORT``); the bound address defaults to
    0.0.0.0:0, as the tunnel has no local address of its own that means anything to the
    client."""
    bound = ipaddress.ip_address(address or "0.0.0.0")
    atyp = ATYP_IPV4 if bound.version == 4 else ATYP_IPV6
    return bytes([VERSION, code, 0, atyp]) + bound.packed + _PORT.pack(port)


class SocksError(Exception):
    """The client broke RFC 1928/1929; ``reply`` is what to send before closing."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The client is admitted: no authentication (``username`` None) or RFC 1929."""

    username: str | None


@dataclass(frozen=True, slots=True)
class AuthenticationFailed:
    """No acceptable method or wrong credentials: the answer is queued; close after it."""

    why: str


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """A CONNECT to ``host``:``port``; ``is_name`` for ATYP domain name (resolve it at the
    Proxy-Client, like ``socks5h``).  Answer with :meth:`SocksServer.reply`."""

    host: str
    port: int
    is_name: bool


@dataclass(frozen=True, slots=True)
class CommandRefused:
    """BIND, UDP ASSOCIATE or an unknown command: "command not supported" is queued."""

    command: int

    @property
    def name(self) -> str:
        """The command's name for the log."""
        return COMMAND_NAMES.get(self.command, f"command {self.command}")


@dataclass(frozen=True, slots=True)
class EarlyData:
    """Bytes after the request: the beginning of the client's stream."""

    data: bytes


Event = Authenticated | AuthenticationFailed | ConnectRequested | CommandRefused | EarlyData


class State(enum.Enum):
    """Where the handshake is."""

    GREETING = "greeting"
    LOGIN = "login"
    REQUEST = "request"
    REQUESTED = "requested"  # waiting for reply(); later bytes are early data
    OPEN = "open"  # replied SUCCEEDED: bytes are the stream's
    CLOSED = "closed"  # refused or failed: nothing more is read


class SocksServer:
    """One client's SOCKS5 handshake.

    ``credentials`` (user name, password) requires RFC 1929 login; None offers only "no
    authentication".  Credentials are compared as UTF-8 bytes in constant time."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self._credentials = (None if credentials is None else
                             (credentials[0].encode("utf-8"), credentials[1].encode("utf-8")))
        self.state = State.GREETING
        self._buffer = bytearray()
        self._received = 0  # handshake bytes taken so far (the bound)
        self._out = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held while a message is incomplete (at most MAX_HANDSHAKE_BYTES)."""
        return len(self._buffer)

    @property
    def must_close(self) -> bool:
        """True once the handshake has failed: send data_to_send(), then close."""
        return self.state is State.CLOSED

    def data_to_send(self) -> bytes:
        """What this end answered on its own since the last call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, code: Reply, address: str | None = None, port: int = 0) -> bytes:
        """The reply to the CONNECT (also queued in data_to_send); the handshake is over:
        the stream is open on SUCCEEDED, else the client must be closed."""
        if self.state is not State.REQUESTED:
            raise RuntimeError(f"no request to answer in state {self.state.value}")
        data = build_reply(code, address, port)
        self._out += data
        self.state = State.OPEN if code is Reply.SUCCEEDED else State.CLOSED
        return data

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the client; raises SocksError (and is closed) on a violation."""
        if self.state is State.CLOSED or not data:
            return []
        if self.state in (State.REQUESTED, State.OPEN):
            return [EarlyData(bytes(data))]
        self._buffer += data
        events: list[Event] = []
        try:
            while self.state in (State.GREETING, State.LOGIN, State.REQUEST):
                state = self.state
                if state is State.GREETING:
                    event = self._greeting()
                elif state is State.LOGIN:
                    event = self._login()
                else:
                    event = self._request()
                if event is not None:
                    events.append(event)
                elif self.state is state:
                    break  # the next message is not complete yet
        except SocksError:
            self.state = State.CLOSED
            self._buffer.clear()
            raise
        if self._received + len(self._buffer) > MAX_HANDSHAKE_BYTES and self.state in (
                State.GREETING, State.LOGIN, State.REQUEST):
            # Unreachable while every message is length-checked; kept as the bound's guard.
            self.state = State.CLOSED
            self._buffer.clear()
            raise SocksError("handshake longer than any valid one")
        if self.state in (State.REQUESTED, State.OPEN) and self._buffer:
            events.append(EarlyData(bytes(self._buffer)))
            self._buffer.clear()
        elif self.state is State.CLOSED:
            self._buffer.clear()  # bytes after a refusal are not read
        return events

    def _take(self, count: int) -> bytes | None:
        if len(self._buffer) < count:
            return None
        taken = bytes(self._buffer[:count])
        del self._buffer[:count]
        self._received += count
        return taken

    def _greeting(self) -> Event | None:
        buf = self._buffer
        if buf and buf[0] != VERSION:
            raise SocksError(f"not SOCKS5 (version byte {buf[0]})")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return None
        head = self._take(2)
        assert head is not None
        methods = self._take(head[1])
        assert methods is not None
        wanted = METHOD_NO_AUTH if self._credentials is None else METHOD_USERNAME_PASSWORD
        if wanted not in methods:
            self._out += bytes([VERSION, METHOD_NONE_ACCEPTABLE])
            self.state = State.CLOSED
            offered = ", ".join(f"{m:#04x}" for m in methods) or "none"
            need = ("username/password (0x02)" if self._credentials is not None
                    else "no authentication (0x00)")
            return AuthenticationFailed(f"the client offers methods {offered}; this Binding "
                                        f"accepts {need}")
        self._out += bytes([VERSION, wanted])
        if wanted == METHOD_NO_AUTH:
            self.state = State.REQUEST
            return Authenticated(None)
        self.state = State.LOGIN
        return None  # Authenticated comes with the login

    def _login(self) -> Event | None:
        buf = self._buffer
        if buf and buf[0] != AUTH_VERSION:
            raise SocksError(f"username/password version {buf[0]} (RFC 1929 is 1)",
                             bytes([AUTH_VERSION, 1]))
        if len(buf) < 2 or len(buf) < 3 + buf[1] or len(buf) < 3 + buf[1] + buf[2 + buf[1]]:
            return None
        ulen = buf[1]
        plen = buf[2 + ulen]
        message = self._take(3 + ulen + plen)
        assert message is not None and self._credentials is not None
        username, password = message[2 : 2 + ulen], message[3 + ulen :]
        expected_user, expected_password = self._credentials
        # Both compared, always: the time does not tell which one was wrong.
        user_ok = hmac.compare_digest(username, expected_user)
        password_ok = hmac.compare_digest(password, expected_password)
        if not (user_ok and password_ok):
            self._out += bytes([AUTH_VERSION, 1])
            self.state = State.CLOSED
            shown = printable(username.decode("utf-8", errors="replace"))
            return AuthenticationFailed(f"wrong user name or password (user {shown!r})")
        self._out += bytes([AUTH_VERSION, 0])
        self.state = State.REQUEST
        return Authenticated(username.decode("utf-8", errors="replace"))

    def _request(self) -> Event | None:
        buf = self._buffer
        if buf and buf[0] != VERSION:
            raise SocksError(f"request of version {buf[0]}",
                             build_reply(Reply.GENERAL_FAILURE))
        if len(buf) < 5:
            return None
        command, atyp = buf[1], buf[3]  # buf[2] is RSV: ignored, as most servers do
        if atyp == ATYP_IPV4:
            size = 4 + 4 + 2
        elif atyp == ATYP_IPV6:
            size = 4 + 16 + 2
        elif atyp == ATYP_DOMAIN:
            size = 4 + 1 + buf[4] + 2
        else:
            raise SocksError(f"address type {atyp}", build_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED))
        message = self._take(size)
        if message is None:
            return None
        if command != CMD_CONNECT:
            self._out += build_reply(Reply.COMMAND_NOT_SUPPORTED)
            self.state = State.CLOSED
            return CommandRefused(command)
        (port,) = _PORT.unpack_from(message, size - 2)
        if atyp == ATYP_DOMAIN:
            raw = message[5 : size - 2]
            try:
                host = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SocksError("domain name is not UTF-8",
                                 build_reply(Reply.GENERAL_FAILURE)) from None
        else:
            host = ipaddress.ip_address(message[4 : size - 2]).compressed
        try:
            validate_target(host, port)
        except StreamError as e:
            raise SocksError(e.message, build_reply(Reply.GENERAL_FAILURE)) from None
        self.state = State.REQUESTED
        return ConnectRequested(host, port, atyp == ATYP_DOMAIN)
