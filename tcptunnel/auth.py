"""SCRAM-SHA-256 login (RFC 5802 / 7677) with the ``scramp`` library; no Twisted.

The Gateway keeps, per session and role, a verifier in PostgreSQL's format
(``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``), made from a
cleartext password at start-up or read from the settings file.  The
password itself never crosses the wire, and the proxy checks the Gateway's
final message, so both ends prove they know it.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import os
from dataclasses import dataclass

import scramp

from tcptunnel.config import Secret

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
_mechanism = scramp.ScramMechanism(MECHANISM)


@dataclass(frozen=True)
class AuthInfo:
    """What the Gateway stores for one password: salt, keys, iterations."""

    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def as_tuple(self) -> tuple[bytes, bytes, bytes, int]:
        """The tuple scramp's auth_fn returns."""
        return self.salt, self.stored_key, self.server_key, self.iterations


def make_auth_info(password: str, iterations: int = DEFAULT_ITERATIONS) -> AuthInfo:
    """Salt and derive the keys for a cleartext password."""
    salt, stored_key, server_key, count = _mechanism.make_auth_info(
        password, iteration_count=iterations)
    return AuthInfo(salt, stored_key, server_key, count)


def format_verifier(info: AuthInfo) -> str:
    """PostgreSQL's text form of a verifier."""
    b64 = base64.b64encode
    return (f"{MECHANISM}${info.iterations}:{b64(info.salt).decode()}$"
            f"{b64(info.stored_key).decode()}:{b64(info.server_key).decode()}")


def parse_verifier(text: str) -> AuthInfo:
    """Read PostgreSQL's text form (raises ValueError)."""
    try:
        mechanism, iterations_salt, keys = text.strip().split("$")
        iterations, salt = iterations_salt.split(":")
        stored_key, server_key = keys.split(":")
        if mechanism != MECHANISM:
            raise ValueError(mechanism)
        info = AuthInfo(base64.b64decode(salt, validate=True),
                        base64.b64decode(stored_key, validate=True),
                        base64.b64decode(server_key, validate=True), int(iterations))
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a SCRAM-SHA-256 verifier: {e}") from None
    if len(info.stored_key) != 32 or len(info.server_key) != 32 or info.iterations < 1:
        raise ValueError("not a SCRAM-SHA-256 verifier: wrong key size or iteration count")
    return info


def auth_info_for(secret: Secret) -> AuthInfo:
    """The verifier for a configured secret (derived once for cleartext)."""
    if secret.verifier is not None:
        return parse_verifier(secret.verifier)
    assert secret.cleartext is not None
    return make_auth_info(secret.cleartext)


def same_password(a: Secret, b: Secret) -> bool:
    """Whether two secrets are the same password (cleartext, or identical verifiers)."""
    if a.cleartext is not None and b.cleartext is not None:
        return hmac.compare_digest(a.cleartext.encode(), b.cleartext.encode())
    return a.verifier is not None and a.verifier == b.verifier


def scram_username(session_id: int, role: int) -> str:
    """The SCRAM user name for a session and role: ``<id>:<role>``."""
    return f"{session_id}:{role}"


class LoginFailed(Exception):  # noqa: N818 - reads better at the raise sites
    """A SCRAM exchange failed; the message is for the log only."""


class GatewayAuth:
    """The Gateway side of one login.

    ``lookup`` gives the AuthInfo for (session id, role) or None; for None a
    decoy derived from ``decoy_secret`` answers, so a peer cannot tell an
    unknown session from a wrong password.
    """

    def __init__(self, info: AuthInfo | None, username: str, decoy_secret: bytes) -> None:
        self.known = info is not None
        if info is None:
            digest = hmac.new(decoy_secret, username.encode(), hashlib.sha256).digest()
            info = AuthInfo(digest[:16], os.urandom(32), os.urandom(32), DEFAULT_ITERATIONS)
        answer = info.as_tuple()
        self._server = _mechanism.make_server(lambda _username: answer)

    def challenge(self, client_first: str) -> str:
        """server-first for a client-first (raises LoginFailed)."""
        try:
            self._server.set_client_first(client_first)
            return str(self._server.get_server_first())
        except scramp.ScramException as e:
            raise LoginFailed(f"malformed SCRAM client-first message: {e}") from None

    def finish(self, client_final: str) -> str:
        """server-final for a correct client-final (raises LoginFailed)."""
        try:
            self._server.set_client_final(client_final)
        except scramp.ScramException as e:
            raise LoginFailed(f"wrong password ({e})") from None
        if not self.known:
            raise LoginFailed("unknown session")
        return str(self._server.get_server_final())


class ProxyAuth:
    """The proxy side of one login."""

    def __init__(self, session_id: int, role: int, password: str) -> None:
        self._client = scramp.ScramClient([MECHANISM], scram_username(session_id, role), password)

    def start(self) -> str:
        """client-first."""
        return str(self._client.get_client_first())

    def proof(self, server_first: str) -> str:
        """client-final for the Gateway's server-first (raises LoginFailed)."""
        try:
            self._client.set_server_first(server_first)
            return str(self._client.get_client_final())
        except scramp.ScramException as e:
            raise LoginFailed(f"malformed challenge from the Gateway: {e}") from None

    def verify(self, server_final: str) -> None:
        """Check that the Gateway knows the password (raises LoginFailed)."""
        try:
            self._client.set_server_final(server_final)
        except scramp.ScramException as e:
            raise LoginFailed(
                f"the Gateway could not prove it knows the session password ({e})") from None


class FailureThrottle:
    """Delay logins from addresses that failed before; bounded memory.

    After ``free`` failures, each further one doubles the delay up to
    ``max_delay`` seconds.  At most ``capacity`` addresses are remembered
    (least recently failed are forgotten first).
    """

    def __init__(self, free: int = 3, max_delay: float = 30.0, capacity: int = 4096) -> None:
        self.free = free
        self.max_delay = max_delay
        self.capacity = capacity
        self._failures: collections.OrderedDict[str, int] = collections.OrderedDict()

    def delay_for(self, address: str) -> float:
        """Seconds to wait before answering a login from ``address``."""
        count = self._failures.get(address, 0)
        if count < self.free:
            return 0.0
        return float(min(self.max_delay, 2.0 ** (count - self.free)))

    def failed(self, address: str) -> None:
        """Record a failed login."""
        self._failures[address] = self._failures.pop(address, 0) + 1
        while len(self._failures) > self.capacity:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """Forget an address after a good login."""
        self._failures.pop(address, None)

    def __len__(self) -> int:
        return len(self._failures)
