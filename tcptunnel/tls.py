"""TLS for links: server certificates from PEM or PKCS#12, client verification.

Every creator here holds two equal setups: pyOpenSSL's (Twisted's CertificateOptions and
ClientTLSOptions, or our pinning context) and the standard library's ``ssl.SSLContext``
(``stdlib_tls()``), which links use by default (:mod:`tcptunnel.tlslink`).

The same policy on both engines, clients and servers: TLS 1.2 minimum; for TLS 1.2 only
ECDHE with an AEAD cipher (:data:`TLS12_CIPHERS`; TLS 1.3's suites are OpenSSL's); no
renegotiation (``OP_NO_RENEGOTIATION``: a pin or a name is checked at the one handshake
there is).  A certificate that cannot be used (missing file, wrong password, a key that does
not match or that OpenSSL finds too small, expired) raises :class:`TlsSetupError` with a
message that names the file, before the listener uses it.  Clients verify the Gateway
against the system trust store by default, or a CA file, or a SHA-256 pin of its
certificate; never nothing.  Host names are checked on the subject alternative names only
(an IP address against IP SANs only), and any error of that check refuses the certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
import ssl as stdlib_ssl
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tcptunnel.config import ListenerConfig, ProxyConfig, TlsFiles
from tcptunnel.tlslink import LinkTLSFactory, StdlibTLS, using_own_tls

# TLS 1.2 suites, on every engine, client and server: forward secrecy (ECDHE) and AEAD
# (AES-GCM, ChaCha20-Poly1305) only; no RSA key exchange, no CBC, no SHA-1 MAC.  OpenSSL
# 3.0 (ssl's) and 4.0 (pyOpenSSL's) expand it to the same 6 suites, ECDHE-{ECDSA,RSA}-
# {AES128-GCM,AES256-GCM,CHACHA20}.  TLS 1.3 suites are set apart by OpenSSL (all AEAD
# with forward secrecy): its defaults stay.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


class _UnbufferedTLSFactory(TLSMemoryBIOFactory):
    """TLS without Twisted's small-write aggregation.

    ``listenSSL`` / ``connectSSL`` use BufferingTLSTransport, which holds every write
    until a ``callLater(0)`` in the next reactor iteration, and only then encrypts
    it.  A link already writes one batch of frames per flush, so that costs a reactor
    iteration per hop and direction (tens of microseconds of latency) and a copy,
    for nothing.
    """

    protocol = TLSMemoryBIOProtocol
    noisy = False  # as Twisted's: the wrapped factory says (or not) that it starts


def tls_factory(creator: Any, wrapped: IProtocolFactory, is_client: bool) -> Any:
    """Wrap ``wrapped`` in TLS for listenTCP / connectTCP; ``creator`` is an
    IOpenSSLServerConnectionCreator (:class:`ReloadableServerTls`) or an
    IOpenSSLClientConnectionCreator.

    Links get :class:`tcptunnel.tlslink.LinkTLSFactory` (fewer calls per record), on the
    standard library's ``ssl`` for the creators this module makes (``stdlib_tls()``), on
    pyOpenSSL for others or with ``TCPTUNNEL_PYOPENSSL_TLS=1``; Twisted's
    TLSMemoryBIOProtocol (without its write aggregation) with ``TCPTUNNEL_TWISTED_TLS=1`` or
    after :func:`tcptunnel.tlslink.use_twisted_tls`, and for a creator of the legacy
    ``getContext`` kind.  WebSocket links too: their protocol does
    not ask for autobahn's TLS channel binding, which only a TLSMemoryBIOProtocol gives
    (``tcptunnel.websocket._LinkWebSocket.connectionMade``).
    """
    interface = IOpenSSLClientConnectionCreator if is_client else IOpenSSLServerConnectionCreator
    if using_own_tls() and interface.providedBy(creator):
        return LinkTLSFactory(creator, is_client, wrapped)
    return _UnbufferedTLSFactory(creator, is_client, wrapped)


class TlsSetupError(Exception):
    """A certificate or key cannot be used; the message says which and why."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsSetupError(f"cannot read the {what} {path!r}: {e.strerror}") from None


def load_server_identity(
    files: TlsFiles, now: datetime.datetime | None = None
) -> tuple[Any, Any, list[Any]]:
    """(private key, certificate, chain) as cryptography objects, checked."""
    if files.pfx_file is not None:
        data = _read(files.pfx_file, "PKCS#12 file")
        password = files.pfx_password.encode("utf-8") if files.pfx_password else None
        from cryptography.hazmat.primitives.serialization import pkcs12  # PFX listeners only

        try:
            key, certificate, chain = pkcs12.load_key_and_certificates(data, password)
        except ValueError as e:
            raise TlsSetupError(
                f"cannot open the PKCS#12 file {files.pfx_file!r}: wrong password or not a "
                f"PKCS#12 file ({e})"
            ) from None
        if key is None or certificate is None:
            raise TlsSetupError(f"the PKCS#12 file {files.pfx_file!r} holds no key and certificate")
        where = files.pfx_file
        extra = list(chain)
    else:
        assert files.pem_certificate is not None and files.pem_key is not None
        cert_data = _read(files.pem_certificate, "certificate file")
        key_data = _read(files.pem_key, "key file")
        try:
            certificates = x509.load_pem_x509_certificates(cert_data)
        except ValueError:
            raise TlsSetupError(
                f"{files.pem_certificate!r} holds no PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError) as e:
            raise TlsSetupError(f"cannot load the private key {files.pem_key!r}: {e}") from None
        certificate, extra = certificates[0], certificates[1:]
        where = files.pem_certificate
    public_of_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_of_cert = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if public_of_key != public_of_cert:
        raise TlsSetupError(f"the private key does not match the certificate in {where!r}")
    now = now or datetime.datetime.now(datetime.UTC)
    if certificate.not_valid_after_utc < now:
        raise TlsSetupError(
            f"the certificate in {where!r} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    return key, certificate, extra


class ServerOptions(ssl.CertificateOptions):
    """Twisted's CertificateOptions of a Gateway listener, which also keep their key and
    certificate chain as PEM (``identity_pem``) for the standard library's context: the
    documented way to give a key to ``ssl`` is a file, and CertificateOptions does not
    document its attributes."""

    identity_pem: bytes = b""
    # The file(s) the key and certificate came from, for error messages.
    source: str = "the listener's certificate"
    # The standard library's contexts made from these options, per ALPN protocol id: made
    # (and so checked) by server_context_factory, used by ReloadableServerTls.update.
    stdlib_contexts: dict[bytes, stdlib_ssl.SSLContext]


def _describe(files: TlsFiles) -> str:
    """The file(s) of a listener's key and certificate, quoted, for error messages."""
    if files.pfx_file is not None:
        return f"the PKCS#12 file {files.pfx_file!r}"
    return f"{files.pem_certificate!r} (key {files.pem_key!r})"


def _openssl_reason(e: BaseException) -> str:
    """What pyOpenSSL's error queue says (e.g. 'ee key too small'), else the error."""
    queue = e.args[0] if isinstance(e, SSL.Error) and e.args else None
    if isinstance(queue, list) and queue:
        return "; ".join(str(entry[-1]) for entry in queue)
    return str(e) or type(e).__name__


def server_context_factory(files: TlsFiles, alpn: bytes | None = None) -> ServerOptions:
    """CertificateOptions for a Gateway listener (TLS 1.2 minimum, :data:`TLS12_CIPHERS`),
    with both engines' contexts made now, the standard library's for ``alpn``
    (:data:`ALPN_PROTOCOL` by default): anything OpenSSL refuses (a key too small for its
    security level, 'ee key too small' for RSA-1024) is a TlsSetupError naming the files
    here, not at the first connection nor in the middle of a reload."""
    key, certificate, chain = load_server_identity(files)
    source = _describe(files)
    try:
        options = ServerOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(certificate),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        )
        options.getContext()  # fail now, not at the first connection
    except (SSL.Error, ValueError) as e:
        raise TlsSetupError(f"OpenSSL cannot use the key and certificate of {source}: "
                            f"{_openssl_reason(e)}") from None
    options.source = source
    options.identity_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()) + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in [certificate, *chain])
    alpn = ALPN_PROTOCOL if alpn is None else alpn
    options.stdlib_contexts = {alpn: stdlib_server_context(options, alpn)}
    return options


# The ALPN protocol id of a link.  Proxies offer it; a Gateway selects it when offered and
# selects nothing (the handshake goes on, without ALPN) for a client that offers only others.
ALPN_PROTOCOL = b"tcptunnel/1"
# What a WebSocket Listener selects: browsers, curl and reverse proxies offer h2 and
# http/1.1, and a WebSocket upgrade is HTTP/1.1 (RFC 6455; RFC 8441 over h2 is not spoken).
ALPN_HTTP_1_1 = b"http/1.1"


def _alpn_selector(protocol: bytes) -> Any:
    """The ALPN select callback choosing ``protocol`` if the client offers it, else no ALPN
    at all.

    Twisted's own select callback (which CertificateOptions installs on every context since
    Twisted 26) answers a client whose list has no overlap with b"", which OpenSSL turns
    into an internal_error alert: ``openssl s_client -alpn h2,http/1.1`` could not even
    complete a handshake.  NO_OVERLAPPING_PROTOCOLS completes it without ALPN.
    """
    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        return protocol if protocol in offered else SSL.NO_OVERLAPPING_PROTOCOLS

    return select


_select_alpn = _alpn_selector(ALPN_PROTOCOL)


def _load_chain(context: stdlib_ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` from PEM bytes (key, certificate, chain): the standard library
    loads only from a path, so from an anonymous memory file (Linux), else from a private
    temporary file removed at once."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("tcptunnel-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # no /proc: the temporary file below
        finally:
            os.close(fd)
    fd, path = tempfile.mkstemp(prefix="tcptunnel-tls-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        context.load_cert_chain(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def stdlib_server_context(options: ServerOptions, alpn: bytes) -> stdlib_ssl.SSLContext:
    """The standard library's server context with the key and certificates of ``options``
    (TLS 1.2 minimum, the standard library's ciphers); it selects ``alpn`` when the client
    offers it and no ALPN at all otherwise (OpenSSL's NOACK: the handshake goes on, as
    :func:`_alpn_selector`)."""
    if not getattr(options, "identity_pem", b""):
        raise TlsSetupError(f"{options!r} holds no identity_pem: make it with "
                            "server_context_factory")
    context = _stdlib_policy(stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_SERVER))
    context.set_alpn_protocols([alpn.decode("ascii")])
    # No TLS 1.3 session tickets: proxies never resume a session (each link is a full
    # handshake), so tickets are two records a link that no one reads.
    context.num_tickets = 0
    try:
        _load_chain(context, options.identity_pem)
    except (stdlib_ssl.SSLError, OSError, ValueError) as e:
        raise TlsSetupError(f"the standard library's TLS cannot load the key and certificate "
                            f"of {getattr(options, 'source', 'the listener')}: {e}") from None
    return context


def _stdlib_policy(context: stdlib_ssl.SSLContext) -> stdlib_ssl.SSLContext:
    """``context`` with the policy of every link (the module docstring): TLS 1.2 minimum,
    :data:`TLS12_CIPHERS`, no renegotiation."""
    context.minimum_version = stdlib_ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= stdlib_ssl.OP_NO_RENEGOTIATION
    return context


def _pyopenssl_client_context(alpn: bytes) -> SSL.Context:
    """A pyOpenSSL client context with the policy of every link (TLS 1.2 minimum,
    :data:`TLS12_CIPHERS`, no renegotiation) offering ``alpn``; no verification yet."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    context.set_alpn_protos([alpn])
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTls:
    """The server TLS of one listener, whose certificate a reload replaces: new links get
    the new one, established links keep theirs.

    Declares IOpenSSLServerConnectionCreator (a bare ``getContext`` object makes Twisted
    log a LegacyContextFactoryWarning for every listener) and completes handshakes whose
    client offers ALPN (see :func:`_alpn_selector`), selecting ``alpn`` when offered: our
    protocol id, or :data:`ALPN_HTTP_1_1` on a WebSocket Listener.
    """

    def __init__(self, options: ServerOptions, alpn: bytes = ALPN_PROTOCOL) -> None:
        self._select = _select_alpn if alpn == ALPN_PROTOCOL else _alpn_selector(alpn)
        self._alpn = alpn
        self.update(options)

    def update(self, options: ServerOptions) -> None:
        """Use ``options`` (e.g. a renewed certificate) for the connections made from now;
        a TlsSetupError naming the files (the old certificate stays) if they cannot be."""
        try:
            context = options.getContext()
            context.set_alpn_select_callback(self._select)  # replaces Twisted's (see above)
            # Servers refuse renegotiation (OpenSSL 3 already refuses a client's; this
            # also stops a server-side one): the context's options apply to the
            # connections made from it from now on.
            context.set_options(SSL.OP_NO_RENEGOTIATION)
        except (SSL.Error, ValueError) as e:
            raise TlsSetupError(
                f"OpenSSL cannot use the key and certificate of "
                f"{getattr(options, 'source', 'the listener')}: {_openssl_reason(e)}") from None
        made = getattr(options, "stdlib_contexts", {})
        stdlib_context = made.get(self._alpn) or stdlib_server_context(options, self._alpn)
        self.options = options
        self._context = context
        self._stdlib = StdlibTLS(stdlib_context)

    def stdlib_tls(self) -> StdlibTLS:
        """The standard library's context on the current certificate
        (:class:`tcptunnel.tlslink.StdlibLinkTLSProtocol`)."""
        return self._stdlib

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        """A server connection on the current certificate (Twisted sets the accept state
        and the app data)."""
        return SSL.Connection(self._context, None)


def listener_context_factory(listener: ListenerConfig) -> ServerOptions:
    """:func:`server_context_factory` for a Gateway Listener with TLS: a TlsSetupError
    names the settings file, line, element and attribute, like a ConfigError."""
    files = listener.tls
    assert files is not None
    alpn = ALPN_PROTOCOL if listener.websocket_path is None else ALPN_HTTP_1_1
    try:
        return server_context_factory(files, alpn)
    except TlsSetupError as e:
        message = str(e)
        if files.pfx_file is not None:
            attribute = "certificatePfxFilePath"
        elif "private key" in message or "key file" in message:
            attribute = "certificatePemKeyFilePath"
        else:
            attribute = "certificatePemFilePath"
        raise TlsSetupError(
            f"{listener.location}: <Listener> attribute {attribute!r}: {message}") from None


def proxy_connection_creator(config: ProxyConfig) -> IOpenSSLClientConnectionCreator:
    """:func:`client_connection_creator` for a proxy with useSsl: a TlsSetupError (an
    unusable caFile) names the settings file, line, element and attribute."""
    # A WebSocket link offers http/1.1: a reverse proxy in front (nginx) refuses a client
    # whose ALPN list has nothing it speaks ("no application protocol" alert).
    alpn = ALPN_PROTOCOL if config.websocket_path is None else ALPN_HTTP_1_1
    try:
        return client_connection_creator(config.server_name or config.host, config.ca_file,
                                         config.certificate_pin, alpn)
    except TlsSetupError as e:
        raise TlsSetupError(f"{config.location}: <Instance> attribute 'caFile': {e}") from None


def server_tls(files: TlsFiles) -> ReloadableServerTls:
    """The reloadable server TLS of a listener; TlsSetupError when the files are unusable."""
    return ReloadableServerTls(server_context_factory(files))


def certificate_pin(certificate_der: bytes) -> bytes:
    """The SHA-256 pin of a DER certificate."""
    return hashlib.sha256(certificate_der).digest()


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedClientCreator:
    """Accept exactly the Gateway certificate whose SHA-256 is the pin."""

    def __init__(self, pin: bytes, server_name: str, alpn: bytes = ALPN_PROTOCOL) -> None:
        self._pin = pin
        self._server_name = server_name.encode("idna")
        context = _pyopenssl_client_context(alpn)
        context.set_verify(SSL.VERIFY_PEER, self._verify)
        self._context = context
        # The standard library's: no chain or name check (the pin is the check, made by
        # StdlibLinkTLSProtocol once the handshake is done, before any byte goes out; no
        # renegotiation can bring another certificate after it).
        stdlib = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
        stdlib.check_hostname = False
        stdlib.verify_mode = stdlib_ssl.CERT_NONE
        _stdlib_policy(stdlib)
        stdlib.set_alpn_protocols([alpn.decode("ascii")])
        self._stdlib = StdlibTLS(stdlib, server_name, pin)

    def stdlib_tls(self) -> StdlibTLS:
        """The standard library's context, the server name (SNI) and the pin."""
        return self._stdlib

    def _verify(self, connection: SSL.Connection, certificate: crypto.X509, errno: int,
                depth: int, ok: int) -> bool:
        if depth != 0:
            return True  # the chain does not matter; the leaf must match the pin
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
        return certificate_pin(der) == self._pin

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        """A client connection sending the server name (SNI) and checking the pin."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _VerifyingClientCreator:
    """Verify the Gateway's chain (a CA file or the system store) and its name, the same on
    both engines: on pyOpenSSL a context of our own and a verify callback calling
    service_identity's public API; on the standard library's, OpenSSL's host name check.
    Either checks the subject alternative names only (no fallback to the common name) and
    an IP address against IP SANs only.

    Not Twisted's ``ClientTLSOptions``: its verify callback (Twisted 26.10) refuses only on
    service_identity's ``VerificationError``; a ``CertificateError`` (a certificate without
    any SAN, or with an IP address written as a DNS name) was logged and the chain's
    verdict stood, so the proxy logged in to whoever held such a certificate.  Here any
    error of the name check refuses the certificate.
    """

    def __init__(self, server_name: str, trusted: list[x509.Certificate] | None,
                 stdlib: StdlibTLS, alpn: bytes) -> None:
        self._stdlib = stdlib
        try:
            ipaddress.ip_address(server_name)
        except ValueError:
            # DNS names as service_identity and SNI take them: IDNA, as the standard
            # library's (and the pinned creator's) "idna" codec writes them.
            self._name = server_name.encode("idna").decode("ascii")
            self._is_ip = False
        else:
            self._name, self._is_ip = server_name, True  # RFC 6066: no SNI for an IP
        context = _pyopenssl_client_context(alpn)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        if trusted is None:
            context.set_default_verify_paths()  # OpenSSL's default paths (SSL_CERT_FILE...)
        else:
            store = context.get_cert_store()
            assert store is not None
            for certificate in trusted:
                store.add_cert(crypto.X509.from_cryptography(certificate))
        self._context = context

    def _verify(self, connection: SSL.Connection, certificate: crypto.X509, errno: int,
                depth: int, ok: int) -> bool:
        """OpenSSL's verdict on the chain, and at the leaf (depth 0) the name: refused on
        any error of service_identity (VerificationError: another name; CertificateError:
        no SAN, an unreadable one) and on any exception at all (OpenSSL would lose it)."""
        if not ok:
            return False  # the chain (unknown CA, expired...): OpenSSL's reason stands
        if depth != 0:
            return True
        try:
            leaf = certificate.to_cryptography()
            if self._is_ip:
                verify_certificate_ip_address(leaf, self._name)
            else:
                verify_certificate_hostname(leaf, self._name)
        except BaseException:  # fail closed, whatever it was
            reason = Failure()
            protocol = connection.get_app_data()
            fail = getattr(protocol, "failVerification", None)
            if fail is not None:
                with contextlib.suppress(BaseException):  # the verdict is False regardless
                    fail(reason)
            return False
        return True

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        """A client connection sending the server name (SNI, not for an IP address) and
        verifying chain and name."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not self._is_ip:
            connection.set_tlsext_host_name(self._name.encode("ascii"))
        return connection

    def stdlib_tls(self) -> StdlibTLS:
        """The standard library's verifying context and the server name."""
        return self._stdlib


def client_connection_creator(
    server_name: str, ca_file: str | None, pin: bytes | None, alpn: bytes = ALPN_PROTOCOL
) -> IOpenSSLClientConnectionCreator:
    """How a proxy verifies the Gateway: pin, CA file + hostname, or system store + hostname;
    offering ``alpn`` (our protocol id, or http/1.1 for a WebSocket link)."""
    if pin is not None:
        return _PinnedClientCreator(pin, server_name, alpn)
    trusted: list[x509.Certificate] | None = None
    stdlib = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, names
    _stdlib_policy(stdlib)
    stdlib.hostname_checks_common_name = False
    stdlib.set_alpn_protocols([alpn.decode("ascii")])
    if ca_file is not None:
        data = _read(ca_file, "CA file")
        try:
            trusted = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise TlsSetupError(f"{ca_file!r} holds no PEM certificate") from None
        stdlib.load_verify_locations(cadata="".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in trusted))
    else:
        stdlib.load_default_certs()  # OpenSSL's default paths, as the pyOpenSSL context
    return _VerifyingClientCreator(server_name, trusted, StdlibTLS(stdlib, server_name), alpn)
