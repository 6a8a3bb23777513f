"""SCRAM-SHA-256 login (RFC 5802 / 7677), sans-IO; no Twisted.

The Gateway keeps, per session and role, a verifier in PostgreSQL's format
(``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``), made from a
cleartext password at start-up or read from the settings file.  The
password itself never crosses the wire, and the proxy checks the Gateway's
final message, so both ends prove they know it.

Written here rather than taken from a library: the exchange is four short
messages over standard-library primitives (``hashlib.pbkdf2_hmac``, ``hmac``),
and the library we used before (scramp) pulled in asn1crypto and
importlib.metadata, 1.5 MiB in every process for channel-binding code we do
not use.  The tests check it against RFC 7677's example and, both ways,
against scramp.  No channel binding: the link is TLS with the Gateway's
certificate verified by the proxy, and SCRAM adds mutual proof of the password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tcptunnel._saslprep import prepare_password
from tcptunnel._saslprep import saslprep as saslprep  # re-exported: tests import it from here
from tcptunnel.config import Secret

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
# PBKDF2 runs once per login on both ends; a verifier (or a Gateway) asking for more
# than this would stall the proxy for many seconds per attempt.
MAX_ITERATIONS = 10_000_000
_GS2_HEADER = "n,,"  # no channel binding, no authorization identity
_NONCE_BYTES = 18


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise LoginFailed(f"{what} is not base64") from None


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _new_nonce() -> str:
    # base64 never contains ',', the attribute separator.
    return _b64(os.urandom(_NONCE_BYTES))


def _escape_username(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _unescape_username(name: str) -> str:
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise LoginFailed("malformed SCRAM user name")
    return name.replace("=2C", ",").replace("=3D", "=")


def _attributes(message: str, names: str, what: str) -> list[str]:
    """The values of ``message``'s leading attributes, which must be ``names`` in order."""
    parts = message.split(",")
    if len(parts) < len(names) or any(not part.startswith(f"{name}=")
                                      for part, name in zip(parts, names, strict=False)):
        raise LoginFailed(f"malformed SCRAM {what} message: expected attributes "
                          f"{', '.join(names)}")
    return [part[2:] for part in parts[:len(names)]]


@dataclass(frozen=True)
class AuthInfo:
    """What the Gateway stores for one password: salt, keys, iterations."""

    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int


@dataclass(frozen=True)
class _Keys:
    client_key: bytes
    stored_key: bytes
    server_key: bytes


def _derive(password: str, salt: bytes, iterations: int) -> _Keys:
    # SASLprep when it accepts the password, its raw UTF-8 otherwise (PostgreSQL's rule).
    salted = hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return _Keys(client_key, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))


def make_auth_info(password: str, iterations: int = DEFAULT_ITERATIONS,
                   salt: bytes | None = None) -> AuthInfo:
    """Salt and derive the keys for a cleartext password (raises ValueError)."""
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be between 1 and {MAX_ITERATIONS}")
    salt = os.urandom(16) if salt is None else salt
    keys = _derive(password, salt, iterations)
    return AuthInfo(salt, keys.stored_key, keys.server_key, iterations)


def format_verifier(info: AuthInfo) -> str:
    """PostgreSQL's text form of a verifier."""
    return (f"{MECHANISM}${info.iterations}:{_b64(info.salt)}$"
            f"{_b64(info.stored_key)}:{_b64(info.server_key)}")


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
    if (len(info.stored_key) != 32 or len(info.server_key) != 32
            or not 1 <= info.iterations <= MAX_ITERATIONS):
        raise ValueError("not a SCRAM-SHA-256 verifier: wrong key size or iteration count "
                         f"(1 to {MAX_ITERATIONS})")
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


def decoy_iteration_table(
        verifiers: Mapping[tuple[int, int], AuthInfo]) -> dict[int, tuple[int, ...]]:
    """Per role, the iteration counts the decoy draws from, for ``GatewayAuth``.

    ``verifiers`` maps (session id, role) to the configured verifier.  Each session with
    every role contributes one entry per role, and the lists of all roles are in the same
    order (sessions sorted by their counts), so entry k of each role belongs to one
    session: the decoy draws one k per session id, and the counts of an unknown session's
    roles come together as a configured session's do (a session at 100,000 for both roles
    among sessions at 4096 gives decoys at 100,000 for both roles or for neither).
    """
    roles = sorted({role for _session, role in verifiers})
    sessions = {session for session, _role in verifiers}
    rows = sorted(tuple(verifiers[session, role].iterations for role in roles)
                  for session in sessions if all((session, role) in verifiers for role in roles))
    return {role: tuple(row[column] for row in rows) for column, role in enumerate(roles)}


def _decoy_info(username: str, decoy_secret: bytes, iterations: Sequence[int]) -> AuthInfo:
    """A verifier for an unknown user name: stable salt and iteration count, random keys.

    Both come from HMACs under the per-process secret, so repeated probes of one name get
    one answer.  The count is entry k of ``iterations`` (see ``decoy_iteration_table``), k drawn
    from the session part of the name (``<id>`` of ``<id>:<role>``) so that both roles of
    one unknown session draw the same k: a count that 1 session in 10 uses answers for 1
    unknown session in 10, so ``i=`` tells a probe nothing about which sessions exist.  k
    scales 64 bits of the HMAC onto the list rather than taking a remainder, so a reload
    that adds or removes one session moves only the names whose draw falls near a
    boundary between counts, not nearly all.
    """
    salt = _hmac(decoy_secret, username.encode())[:16]
    session = username.rpartition(":")[0] or username
    draw = int.from_bytes(_hmac(decoy_secret, session.encode())[16:24], "big")
    counts = iterations or (DEFAULT_ITERATIONS,)
    return AuthInfo(salt, os.urandom(32), os.urandom(32), counts[(draw * len(counts)) >> 64])


class GatewayAuth:
    """The Gateway side of one login.

    ``info`` is the verifier for the user name the proxy will send, or None; for
    None a decoy derived from ``decoy_secret`` answers, so a peer cannot tell an
    unknown session from a wrong password.  ``decoy_iterations`` are the iteration
    counts the decoy draws its ``i=`` from: ``decoy_iteration_table(verifiers)[role]`` (one
    entry per configured session, repeats included); empty means DEFAULT_ITERATIONS.
    """

    def __init__(self, info: AuthInfo | None, username: str, decoy_secret: bytes,
                 nonce: str | None = None,
                 decoy_iterations: Sequence[int] = (DEFAULT_ITERATIONS,)) -> None:
        self.known = info is not None
        # Derived for every login, used only for unknown ones: the time to the challenge
        # must not tell a configured session from an unknown one (12.8 against 3.4 us).
        decoy = _decoy_info(username, decoy_secret, decoy_iterations)
        self._info = decoy if info is None else info
        self._username = username
        self._server_nonce = nonce or _new_nonce()
        self._nonce = ""
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""

    def challenge(self, client_first: str) -> str:
        """server-first for a client-first (raises LoginFailed)."""
        if self._server_first:
            raise LoginFailed("second SCRAM client-first message")
        flag, authzid, bare = [*client_first.split(",", 2), "", ""][:3]
        if flag not in ("n", "y") or authzid:
            raise LoginFailed("malformed SCRAM client-first message: channel binding or "
                              "an authorization identity is not supported")
        username, client_nonce = _attributes(bare, "nr", "client-first")
        if _unescape_username(username) != self._username:
            raise LoginFailed("the SCRAM user name does not match the session and role")
        if not client_nonce or not client_nonce.isprintable() or "," in client_nonce:
            raise LoginFailed("malformed SCRAM client-first message: bad nonce")
        self._gs2_header = f"{flag},,"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = (f"r={self._nonce},s={_b64(self._info.salt)},"
                              f"i={self._info.iterations}")
        return self._server_first

    def finish(self, client_final: str) -> str:
        """server-final for a correct client-final (raises LoginFailed)."""
        if not self._server_first:
            raise LoginFailed("SCRAM client-final message before client-first")
        channel, nonce = _attributes(client_final, "cr", "client-final")
        without_proof, separator, proof_text = client_final.rpartition(",p=")
        if not separator or "," in proof_text:
            raise LoginFailed("malformed SCRAM client-final message: no proof")
        if _unb64(channel, "channel binding").decode("latin-1") != self._gs2_header:
            raise LoginFailed("SCRAM channel binding differs from the client-first message")
        if not hmac.compare_digest(nonce.encode(), self._nonce.encode()):
            raise LoginFailed("SCRAM nonce differs from the one sent")
        proof = _unb64(proof_text, "SCRAM proof")
        auth_message = ",".join((self._client_first_bare, self._server_first,
                                 without_proof)).encode()
        signature = _hmac(self._info.stored_key, auth_message)
        if len(proof) != len(signature):
            raise LoginFailed("wrong password (proof of the wrong size)")
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._info.stored_key):
            raise LoginFailed("wrong password")
        if not self.known:
            raise LoginFailed("unknown session")
        return f"v={_b64(_hmac(self._info.server_key, auth_message))}"


class ProxyAuth:
    """The proxy side of one login."""

    def __init__(self, session_id: int, role: int, password: str,
                 nonce: str | None = None, username: str | None = None) -> None:
        self._password = password
        name = scram_username(session_id, role) if username is None else username
        self._client_nonce = nonce or _new_nonce()
        self._client_first_bare = f"n={_escape_username(name)},r={self._client_nonce}"
        self._expected_server_signature = b""

    def start(self) -> str:
        """client-first."""
        return _GS2_HEADER + self._client_first_bare

    def proof(self, server_first: str) -> str:
        """client-final for the Gateway's server-first (raises LoginFailed)."""
        nonce, salt_text, iterations_text = _attributes(server_first, "rsi", "server-first")
        if not nonce.startswith(self._client_nonce) or nonce == self._client_nonce:
            raise LoginFailed("malformed challenge from the Gateway: the nonce does not "
                              "extend ours")
        # isdigit() alone accepts digits int() refuses, such as superscripts.
        if not (iterations_text.isascii() and iterations_text.isdigit()) or not (
                1 <= int(iterations_text) <= MAX_ITERATIONS):
            raise LoginFailed(f"the Gateway asks for {iterations_text!r} PBKDF2 iterations "
                              f"(at most {MAX_ITERATIONS})")
        salt = _unb64(salt_text, "the Gateway's salt")
        try:
            keys = _derive(self._password, salt, int(iterations_text))
        except ValueError as e:
            raise LoginFailed(str(e)) from None
        without_proof = f"c={_b64(_GS2_HEADER.encode())},r={nonce}"
        auth_message = ",".join((self._client_first_bare, server_first, without_proof)).encode()
        proof = _xor(keys.client_key, _hmac(keys.stored_key, auth_message))
        self._expected_server_signature = _hmac(keys.server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}"

    def verify(self, server_final: str) -> None:
        """Check that the Gateway knows the password (raises LoginFailed)."""
        if server_final.startswith("e="):
            raise LoginFailed(f"the Gateway refused the login: {server_final[2:]}")
        if not self._expected_server_signature:
            raise LoginFailed("SCRAM server-final message before server-first")
        (signature_text,) = _attributes(server_final, "v", "server-final")
        signature = _unb64(signature_text, "the Gateway's signature")
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise LoginFailed("the Gateway could not prove it knows the session password")
