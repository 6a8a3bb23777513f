"""Attacks on the links' TLS, as a hostile peer or a malicious Gateway / man in the middle
would make them, on real loopback sockets, on the standard library's engine (the default,
tcptunnel.tlslink.StdlibLinkTLSProtocol) and on pyOpenSSL (TCPTUNNEL_PYOPENSSL_TLS=1,
tcptunnel.tlslink.LinkTLSProtocol), which must give the same outcome.

* A proxy facing a fake Gateway (a pyOpenSSL server of its own, independent of the engine
  under test) that presents a certificate for another name, without SAN, signed by an
  unknown CA, expired, not yet valid, self-signed, behind a non-CA intermediate, for an IP
  address, or one that does not match the pin: the link fails with a reason naming the
  problem, and the fake Gateway receives no byte of the link (no login) after the handshake.
* The Gateway's TLS listener against old protocol versions, weak cipher suites,
  renegotiation, ALPN offers, absent or huge SNI, garbage, oversized record headers, 1-byte
  fragments, a peer that never finishes the handshake, EOF without close_notify, and a flood
  while the link is paused (what the TLS layer buffers stays bounded).
* Certificate reloads: new links get the new certificate, old links keep theirs, a broken
  file keeps the old one, and 20 reloads leave no file descriptor and no file behind.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gc
import ipaddress
import os
import ssl as stdlib_ssl
import struct
import tempfile
import termios
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import defer, error, reactor
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

import tcptunnel.tls
from tcptunnel import _frames as fr
from tcptunnel.config import Location, TlsFiles, load_settings
from tcptunnel.ports import listen
from tcptunnel.proxy import ProxyService
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.tap import TunnelService
from tcptunnel.test._certs import mint
from tcptunnel.test._harness import NS, RawPeer, Tunnel, tcp_connections, wait_until
from tcptunnel.test.test_ports import BindingReactor
from tcptunnel.tls import (
    ALPN_HTTP_1_1,
    ReloadableServerTls,
    TlsSetupError,
    client_connection_creator,
    server_context_factory,
    tls_factory,
)
from tcptunnel.tlslink import (
    TLS_ERRORS,
    LinkTLSProtocol,
    RecordCounter,
    StdlibLinkTLSProtocol,
    use_pyopenssl_tls,
    use_twisted_tls,
)

_NOW = datetime.datetime.now(datetime.UTC)
# OpenSSL's SSL_OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION (pyOpenSSL does not name it): a
# renegotiation is then a full handshake, with a certificate.
_NO_RESUMPTION_ON_RENEGOTIATION = 0x00010000
_DAY = datetime.timedelta(days=1)


# -- certificates ------------------------------------------------------------------------


class _Pki:
    """Mints keys and certificates of any shape (CA or not, any names, any validity) and
    writes them as PEM files under ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._count = 0

    @staticmethod
    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def certificate(self, common_name: str, *, sans: list[str] | None = None,
                    issuer: tuple[Any, x509.Certificate] | None = None, ca: bool = False,
                    not_before: datetime.datetime | None = None,
                    not_after: datetime.datetime | None = None,
                    rsa_key: bool = False) -> tuple[Any, x509.Certificate]:
        """(key, certificate): self-signed unless ``issuer`` (key, certificate) is given;
        ``sans`` are DNS names, or IP addresses when they parse as one (None: no SAN
        extension at all); ``ca`` sets BasicConstraints CA:TRUE (else CA:FALSE)."""
        key = (rsa.generate_private_key(65537, 2048) if rsa_key
               else ec.generate_private_key(ec.SECP256R1()))
        subject = self.name(common_name)
        issuer_key, issuer_name = (key, subject) if issuer is None else (issuer[0],
                                                                          issuer[1].subject)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or _NOW - _DAY)
                   .not_valid_after(not_after or _NOW + 30 * _DAY)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if sans is not None:
            names: list[x509.GeneralName] = []
            for san in sans:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(san)))
                except ValueError:
                    names.append(x509.DNSName(san))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(issuer_key, hashes.SHA256())

    def ca(self, common_name: str = "attack test CA") -> tuple[Any, x509.Certificate]:
        """A self-signed CA."""
        return self.certificate(common_name, ca=True)

    def pem_file(self, *certificates: x509.Certificate) -> str:
        """A new PEM file holding ``certificates``; its path."""
        self._count += 1
        path = os.path.join(self.directory, f"c{self._count}.pem")
        with open(path, "wb") as f:
            f.write(b"".join(c.public_bytes(serialization.Encoding.PEM)
                             for c in certificates))
        return path

    def key_file(self, key: Any) -> str:
        """A new PEM file holding ``key``; its path."""
        self._count += 1
        path = os.path.join(self.directory, f"k{self._count}.pem")
        with open(path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return path


def _pin_hex(certificate: x509.Certificate) -> str:
    import hashlib

    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- a fake Gateway ------------------------------------------------------------------------


@implementer(IHandshakeListener)
class _Recorder(Protocol):
    """What a fake Gateway's connection sees: the handshake, the bytes after it, the SNI."""

    transport: Any

    def __init__(self, owner: _FakeGateway) -> None:
        self.owner = owner
        self.handshakes = 0
        self.received = bytearray()
        self.lost: Failure | None = None

    def connectionMade(self) -> None:  # noqa: N802
        self.owner.connections.append(self)

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshakes += 1
        handle = cast(Any, self.transport).getHandle()
        self.owner.sni.append(handle.get_servername())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008, N802
        self.lost = reason


@implementer(IOpenSSLServerConnectionCreator)
class _FakeGateway:
    """A TLS server on 127.0.0.1 presenting any chain (pyOpenSSL under Twisted's TLS
    protocol: not the engine under test), selecting tcptunnel/1 when offered."""

    def __init__(self, key: Any, chain: list[x509.Certificate],
                 max_version: int | None = None) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        # Whatever the certificate: the fake Gateway serves what the test asks it to.
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        context.use_privatekey(crypto.PKey.from_cryptography_key(key))
        context.use_certificate(crypto.X509.from_cryptography(chain[0]))
        for extra in chain[1:]:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        if max_version is not None:
            context.set_min_proto_version(SSL.TLS1_VERSION)
            context.set_max_proto_version(max_version)
        context.set_alpn_select_callback(
            lambda connection, offered: b"tcptunnel/1" if b"tcptunnel/1" in offered
            else SSL.NO_OVERLAPPING_PROTOCOLS)
        context.set_tlsext_servername_callback(lambda connection: None)
        self.context = context
        self.connections: list[_Recorder] = []
        self.sni: list[bytes | None] = []

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        return SSL.Connection(self.context, None)

    def listen(self, test: TestCase) -> int:
        factory = TLSMemoryBIOFactory(self, False, Factory.forProtocol(lambda: _Recorder(self)))
        port = reactor.listenTCP(0, cast(Any, factory), interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        return int(cast(Any, port.getHost()).port)

    def link_bytes(self) -> bytes:
        """Every byte of the link any connection received after its handshake."""
        return b"".join(bytes(c.received) for c in self.connections)


class _Engine(TestCase):
    """Runs a test class on one TLS engine of tcptunnel.tlslink, whatever the environment
    says: "stdlib" (the default) or "pyopenssl" (TCPTUNNEL_PYOPENSSL_TLS=1)."""

    engine = "stdlib"

    def setUp(self) -> None:
        test = self
        test.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k not in ("TCPTUNNEL_TWISTED_TLS",
                                                "TCPTUNNEL_PYOPENSSL_TLS")})
        use_twisted_tls(False)
        use_pyopenssl_tls(self.engine == "pyopenssl")
        test.addCleanup(use_pyopenssl_tls, False)
        self.pki = _Pki(os.path.abspath(test.mktemp()))

    @property
    def link_protocol(self) -> type:
        return StdlibLinkTLSProtocol if self.engine == "stdlib" else LinkTLSProtocol


# -- the proxy verifies the Gateway ----------------------------------------------------------


class _ProxyAttack(_Engine):
    """A proxy (the real ProxyClientService) against a fake Gateway."""

    timeout = 60

    async def attempt(self, key: Any, chain: list[x509.Certificate], proxy_tls: str,
                      host: str = "127.0.0.1", max_version: int | None = None
                      ) -> tuple[str | None, _FakeGateway, Any]:
        """Start a Proxy-Client towards a fake Gateway presenting ``chain``; wait until
        its first link ends (the reason, as the proxy gives it) or the fake Gateway receives
        link bytes (None)."""
        fake = _FakeGateway(key, chain, max_version)
        port = self.fake_port = fake.listen(self)
        tunnel = Tunnel(self)
        self.addCleanup(tunnel.close)
        proxy = cast(ProxyService, tunnel._start_proxy(
            ProxyClientService,
            f'<Instance type="proxy-client" host="{host}" port="{port}" maxRetryDelay="30" '
            f'{proxy_tls}><Session id="1" password="client-pw"/></Instance>'))
        reasons: list[str] = []
        link_lost = proxy.link_lost

        def record(link: Any, why: str) -> None:
            reasons.append(why)
            link_lost(link, why)

        proxy.link_lost = record  # type: ignore[method-assign]
        await wait_until(lambda: bool(reasons or fake.link_bytes()), 10,
                         "the link to fail or to reach the fake Gateway")
        if reasons:
            # Nothing more arrives after the failure (the connection is gone).
            await wait_until(lambda: all(c.lost is not None for c in fake.connections), 10,
                             "the fake Gateway's connection to end")
            return reasons[0], fake, proxy
        return None, fake, proxy

    async def refused(self, key: Any, chain: list[x509.Certificate], proxy_tls: str,
                      *words: str, host: str = "127.0.0.1",
                      max_version: int | None = None) -> str:
        """Assert that the link fails, with each of ``words`` in its reason (any of the
        alternatives split by '|'), that no byte of it reached the fake Gateway and that the
        proxy never logged in."""
        why, fake, proxy = await self.attempt(key, chain, proxy_tls, host, max_version)
        self.assertIsNotNone(why, "the proxy sent link bytes to a Gateway it must refuse")
        assert why is not None
        self.assertEqual(fake.link_bytes(), b"")
        self.assertEqual(proxy.stats["logins_ok",], 0)
        for word in words:
            self.assertTrue(any(w.lower() in why.lower() for w in word.split("|")),
                            f"{word!r} not in {why!r}")
        return why

    async def accepted(self, key: Any, chain: list[x509.Certificate], proxy_tls: str,
                       host: str = "127.0.0.1") -> _FakeGateway:
        """Assert that the link reaches the fake Gateway (link bytes after the handshake)
        on this test's engine."""
        why, fake, _proxy = await self.attempt(key, chain, proxy_tls, host)
        self.assertIsNone(why)
        self.assertTrue(fake.link_bytes())
        engines = [type(c.protocol) for c in tcp_connections()
                   if c.getPeer().port == self.fake_port]
        self.assertEqual(engines, [self.link_protocol])
        return fake

    def ca_leaf(self, *sans: str, common_name: str = "gateway", **kwargs: Any) -> tuple[
            str, Any, list[x509.Certificate]]:
        """(CA file, leaf key, [leaf]) of a new CA and a leaf it signed for ``sans``."""
        ca = self.pki.ca()
        key, leaf = self.pki.certificate(common_name, sans=list(sans), issuer=ca, **kwargs)
        return self.pki.pem_file(ca[1]), key, [leaf]



class ProxyVerificationAttackTests(_ProxyAttack):
    """A proxy against a fake Gateway: every certificate that must be refused is refused
    with a reason that names the problem, and no byte of the link (HELLO, the login) reaches
    the fake Gateway; the ones that must pass do, and the login's bytes arrive (the recorder
    works)."""

    async def test_valid_certificate_control(self) -> None:
        """Control: a certificate of the CA file naming serverName passes, the login's bytes
        reach the fake Gateway, and the SNI is serverName (not the host dialled)."""
        ca_file, key, chain = self.ca_leaf("gateway.example")
        fake = await self.accepted(key, chain,
                                   f'useSsl="1" caFile="{ca_file}" serverName="gateway.example"')
        self.assertEqual(fake.sni[0], b"gateway.example")

    async def test_san_for_another_name(self) -> None:
        """A valid certificate for another name is refused as a name mismatch naming
        serverName."""
        ca_file, key, chain = self.ca_leaf("other.example")
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="gateway.example"',
                           "gateway.example", "does not name")

    async def test_wildcard_one_label(self) -> None:
        """*.example.test covers a.example.test (control) ..."""
        ca_file, key, chain = self.ca_leaf("*.example.test")
        await self.accepted(key, chain,
                            f'useSsl="1" caFile="{ca_file}" serverName="a.example.test"')

    async def test_wildcard_not_two_labels(self) -> None:
        """... but not a.b.example.test (a wildcard is one label) ..."""
        ca_file, key, chain = self.ca_leaf("*.example.test")
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="a.b.example.test"',
                           "does not name")

    async def test_wildcard_not_the_parent(self) -> None:
        """... nor example.test itself ..."""
        ca_file, key, chain = self.ca_leaf("*.example.test")
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="example.test"',
                           "does not name")

    async def test_partial_wildcard(self) -> None:
        """... and a partial wildcard (gw*.example.test) names no host."""
        ca_file, key, chain = self.ca_leaf("gw*.example.test")
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="gw1.example.test"',
                           "does not name|wildcard")

    async def test_unknown_ca(self) -> None:
        """A certificate signed by a CA other than the CA file's is refused as such."""
        _ca_file, key, chain = self.ca_leaf("gateway.example")
        other = self.pki.pem_file(self.pki.ca("another CA")[1])
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{other}" serverName="gateway.example"',
                           "TLS handshake with the Gateway failed", "certificate verify failed",
                           "unable to get local issuer certificate" if self.engine == "stdlib"
                           else "")

    async def test_expired(self) -> None:
        """An expired certificate is refused as expired."""
        ca_file, key, chain = self.ca_leaf("gateway.example", not_before=_NOW - 10 * _DAY,
                                           not_after=_NOW - _DAY)
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="gateway.example"',
                           "certificate verify failed",
                           "expired" if self.engine == "stdlib" else "")

    async def test_not_yet_valid(self) -> None:
        """A certificate valid only from tomorrow is refused as not yet valid."""
        ca_file, key, chain = self.ca_leaf("gateway.example", not_before=_NOW + _DAY,
                                           not_after=_NOW + 10 * _DAY)
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="gateway.example"',
                           "certificate verify failed",
                           "not yet valid" if self.engine == "stdlib" else "")

    async def test_self_signed(self) -> None:
        """A self-signed certificate for the right name is refused."""
        key, leaf = self.pki.certificate("gateway.example", sans=["gateway.example"])
        ca_file = self.pki.pem_file(self.pki.ca()[1])
        await self.refused(key, [leaf],
                           f'useSsl="1" caFile="{ca_file}" serverName="gateway.example"',
                           "certificate verify failed",
                           "self-signed|self signed" if self.engine == "stdlib" else "")

    async def test_non_ca_intermediate(self) -> None:
        """A leaf signed by an intermediate that is no CA (CA:FALSE), itself signed by the
        trusted root, is refused: a leaf certificate cannot issue others."""
        root = self.pki.ca()
        intermediate = self.pki.certificate("not a CA", sans=["intermediate.example"],
                                            issuer=root, ca=False)
        key, leaf = self.pki.certificate("gateway", sans=["gateway.example"],
                                         issuer=intermediate)
        await self.refused(key, [leaf, intermediate[1]],
                           f'useSsl="1" caFile="{self.pki.pem_file(root[1])}" '
                           'serverName="gateway.example"',
                           "certificate verify failed",
                           "invalid CA certificate" if self.engine == "stdlib" else "")

    async def test_ca_intermediate_control(self) -> None:
        """Control: the same chain through a real intermediate CA passes."""
        root = self.pki.ca()
        intermediate = self.pki.certificate("intermediate CA", issuer=root, ca=True)
        key, leaf = self.pki.certificate("gateway", sans=["gateway.example"],
                                         issuer=intermediate)
        await self.accepted(key, [leaf, intermediate[1]],
                            f'useSsl="1" caFile="{self.pki.pem_file(root[1])}" '
                            'serverName="gateway.example"')

    async def test_ip_server_name_with_ip_san(self) -> None:
        """serverName="127.0.0.1" against a certificate with that IP address as a SAN:
        passes (the IP address check), and no SNI is sent."""
        ca_file, key, chain = self.ca_leaf("127.0.0.1")
        fake = await self.accepted(key, chain,
                                   f'useSsl="1" caFile="{ca_file}" serverName="127.0.0.1"')
        self.assertEqual(fake.sni, [None])  # RFC 6066: no IP address in SNI

    async def test_name_case(self) -> None:
        """Host names compare without case."""
        ca_file, key, chain = self.ca_leaf("gateway.example")
        await self.accepted(key, chain,
                            f'useSsl="1" caFile="{ca_file}" serverName="GateWay.Example"')

    async def test_trailing_dot_is_another_name(self) -> None:
        """serverName="gateway.example." (absolute form) does not match a certificate for
        gateway.example: refused, on both engines alike."""
        ca_file, key, chain = self.ca_leaf("gateway.example")
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="gateway.example."',
                           "does not name 'gateway.example.'")

    async def test_idna(self) -> None:
        """A Unicode serverName is checked (and sent as SNI) in its IDNA form."""
        ca_file, key, chain = self.ca_leaf("xn--bcher-kva.example")
        fake = await self.accepted(key, chain,
                                   f'useSsl="1" caFile="{ca_file}" serverName="bücher.example"')
        self.assertEqual(fake.sni[0], b"xn--bcher-kva.example")

    async def test_ip_server_name_other_ip(self) -> None:
        """serverName="127.0.0.1" against a certificate for 127.0.0.2: refused."""
        ca_file, key, chain = self.ca_leaf("127.0.0.2")
        await self.refused(key, chain, f'useSsl="1" caFile="{ca_file}" serverName="127.0.0.1"',
                           "does not name")

    async def test_host_is_the_name_without_server_name(self) -> None:
        """Without serverName the host dialled is the name checked: host="localhost"
        against a certificate for gateway.example is refused naming 'localhost'; against
        one for localhost it passes with SNI localhost."""
        ca_file, key, chain = self.ca_leaf("gateway.example")
        await self.refused(key, chain, f'useSsl="1" caFile="{ca_file}"', "'localhost'",
                           host="localhost")
        ca_file, key, chain = self.ca_leaf("localhost")
        fake = await self.accepted(key, chain, f'useSsl="1" caFile="{ca_file}"',
                                   host="localhost")
        self.assertEqual(fake.sni[0], b"localhost")

    async def test_server_name_wins_over_host(self) -> None:
        """With serverName set, a certificate naming only the host dialled (127.0.0.1) is
        refused: serverName is the name checked."""
        ca_file, key, chain = self.ca_leaf("127.0.0.1", "localhost")
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="gateway.example"',
                           "gateway.example")

    async def test_right_pin(self) -> None:
        """Control: the pinned certificate passes (self-signed, another name: the pin is the
        check)."""
        key, leaf = self.pki.certificate("whatever", sans=["other.example"])
        await self.accepted(key, [leaf], f'useSsl="1" certificatePin="{_pin_hex(leaf)}"')

    async def test_wrong_pin(self) -> None:
        """A certificate other than the pinned one is refused."""
        key, leaf = self.pki.certificate("gateway", sans=["127.0.0.1"])
        other = self.pki.certificate("gateway", sans=["127.0.0.1"])[1]
        await self.refused(key, [leaf], f'useSsl="1" certificatePin="{_pin_hex(other)}"',
                           "TLS handshake with the Gateway failed",
                           "pin" if self.engine == "stdlib" else "")

    async def test_wrong_pin_with_a_valid_chain(self) -> None:
        """A certificate with a valid chain for the right name, but not the pinned one, is
        refused: the pin is not an alternative to the chain."""
        ca = self.pki.ca()
        key, leaf = self.pki.certificate("gateway", sans=["127.0.0.1"], issuer=ca)
        pinned = self.pki.certificate("gateway", sans=["127.0.0.1"], issuer=ca)[1]
        await self.refused(key, [leaf],
                           f'useSsl="1" certificatePin="{_pin_hex(pinned)}" '
                           f'caFile="{self.pki.pem_file(ca[1])}"',
                           "TLS handshake with the Gateway failed")

    async def test_pin_of_the_ca_is_not_the_leaf(self) -> None:
        """A pin of the CA's certificate does not accept a leaf that CA signed (the pin is of
        the Gateway's own certificate)."""
        ca = self.pki.ca()
        key, leaf = self.pki.certificate("gateway", sans=["127.0.0.1"], issuer=ca)
        await self.refused(key, [leaf, ca[1]], f'useSsl="1" certificatePin="{_pin_hex(ca[1])}"',
                           "TLS handshake with the Gateway failed")

    async def test_system_store(self) -> None:
        """Without caFile the system store is used: a test CA it does not hold is refused;
        the same CA put in the store's file (SSL_CERT_FILE, read by OpenSSL's default
        paths) passes."""
        ca = self.pki.ca()
        key, leaf = self.pki.certificate("gateway", sans=["gateway.example"], issuer=ca)
        await self.refused(key, [leaf], 'useSsl="1" serverName="gateway.example"',
                           "certificate verify failed")
        # The process's environment (os.environ is a copy here: see _Engine.setUp).
        os.putenv("SSL_CERT_FILE", self.pki.pem_file(ca[1]))
        os.putenv("SSL_CERT_DIR", self.pki.directory + "/none")
        self.addCleanup(os.unsetenv, "SSL_CERT_FILE")
        self.addCleanup(os.unsetenv, "SSL_CERT_DIR")
        await self.accepted(key, [leaf], 'useSsl="1" serverName="gateway.example"')

    async def test_gateway_offers_only_tls_1_1(self) -> None:
        """A Gateway (or a man in the middle) that speaks at most TLS 1.1 is refused at
        once: proxies speak TLS 1.2 at least."""
        ca_file, key, chain = self.ca_leaf("gateway.example")
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="gateway.example"',
                           "TLS handshake with the Gateway failed", "version|protocol",
                           max_version=SSL.TLS1_1_VERSION)


class PyOpenSSLProxyVerificationAttackTests(ProxyVerificationAttackTests):
    """The same attacks on a proxy on pyOpenSSL (TCPTUNNEL_PYOPENSSL_TLS=1)."""

    engine = "pyopenssl"


class NameEdgeTests(_ProxyAttack):
    """Certificates of the trusted CA whose names service_identity cannot even read (no SAN;
    an IP address written as a DNS name): refused, no link byte sent, on the standard
    library's engine (OpenSSL's host name check) and, in the subclasses, on pyOpenSSL and
    Twisted's TLS protocol.  Those two failed open before tls._VerifyingClientCreator had its
    own verify callback: Twisted 26.10's refuses only on service_identity's
    VerificationError, its CertificateError was logged and the chain's verdict stood, and
    the proxy logged in to whoever held such a certificate."""

    async def test_common_name_only(self) -> None:
        """A certificate that names serverName only in its common name (no SAN) is refused:
        host names are checked on the SAN only."""
        ca = self.pki.ca()
        key, leaf = self.pki.certificate("gateway.example", sans=None, issuer=ca)
        await self.refused(key, [leaf],
                           f'useSsl="1" caFile="{self.pki.pem_file(ca[1])}" '
                           'serverName="gateway.example"',
                           "subjectAltName|does not name")

    async def test_ip_server_name_with_dns_san(self) -> None:
        """serverName="127.0.0.1" against a certificate with "127.0.0.1" only as a DNS
        name: refused (an IP address is matched against IP SANs only)."""
        ca = self.pki.ca()
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder().subject_name(_Pki.name("gateway"))
                .issuer_name(ca[1].subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_NOW - _DAY).not_valid_after(_NOW + _DAY)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("127.0.0.1")]),
                               critical=False)
                .sign(ca[0], hashes.SHA256()))
        await self.refused(key, [leaf],
                           f'useSsl="1" caFile="{self.pki.pem_file(ca[1])}" '
                           'serverName="127.0.0.1"', "does not name|127.0.0.1")


class PyOpenSSLNameEdgeTests(NameEdgeTests):
    """The same on pyOpenSSL (TCPTUNNEL_PYOPENSSL_TLS=1), whose name check is
    tcptunnel.tls's verify callback."""

    engine = "pyopenssl"

    async def test_any_error_of_the_name_check_refuses(self) -> None:
        """A name check that fails with an error of no known kind (service_identity
        replaced by one raising RuntimeError) refuses a certificate that is right in every
        way, with that error as the reason: the callback fails closed."""
        ca_file, key, chain = self.ca_leaf("gateway.example")

        def broken(certificate: Any, hostname: str) -> None:
            raise RuntimeError("the name check broke")

        self.patch(tcptunnel.tls, "verify_certificate_hostname", broken)
        await self.refused(key, chain,
                           f'useSsl="1" caFile="{ca_file}" serverName="gateway.example"',
                           "the name check broke")


class TwistedNameEdgeTests(PyOpenSSLNameEdgeTests):
    """The same on Twisted's TLSMemoryBIOProtocol (TCPTUNNEL_TWISTED_TLS=1), which takes
    the same connection creator."""

    engine = "pyopenssl"

    def setUp(self) -> None:
        super().setUp()
        use_twisted_tls(True)
        self.addCleanup(use_twisted_tls, False)

    @property
    def link_protocol(self) -> type:
        return TLSMemoryBIOProtocol



# -- hostile clients of the Gateway's listener ------------------------------------------------


@implementer(IHandshakeListener)
class _Peer(Protocol):
    """One end of a TLS connection made by the test: records the handshake, the bytes, how
    it ended; ``pause_on_data`` pauses the transport at the first bytes (a link whose
    consumer is slow); ``on_handshake`` is written when the handshake completes."""

    transport: Any

    def __init__(self, pause_on_data: bool = False, on_handshake: bytes = b"") -> None:
        self.handshakes = 0
        self.received = bytearray()
        self.received_at_pause = -1
        self.lost: Failure | None = None
        self.pause_on_data = pause_on_data
        self.on_handshake = on_handshake
        self.made: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.made.callback(None)

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshakes += 1
        if self.on_handshake:
            self.transport.write(self.on_handshake)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        if self.pause_on_data and self.received_at_pause < 0:
            self.received_at_pause = len(self.received)
            cast(Any, self.transport).pauseProducing()

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008, N802
        self.lost = reason

    @property
    def negotiated(self) -> bytes | None:
        return cast(Any, self.transport).negotiatedProtocol


@implementer(IOpenSSLClientConnectionCreator)
class _HostileClient:
    """A TLS client of the test's own (pyOpenSSL under Twisted's TLS protocol: not the
    engine under test) with any versions, ciphers, ALPN offer, SNI; verifies nothing."""

    def __init__(self, *, versions: tuple[int, int] = (SSL.TLS1_2_VERSION, 0),
                 ciphers: bytes | None = None, alpn: list[bytes] | None = None,
                 sni: bytes | None = b"localhost") -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(versions[0])
        if versions[1]:
            context.set_max_proto_version(versions[1])
        # @SECLEVEL=0: what the client may offer is the attack; the server decides.
        context.set_cipher_list(ciphers or b"DEFAULT:@SECLEVEL=0")
        if alpn:
            context.set_alpn_protos(alpn)
        context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        self.context = context
        self.sni = sni

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803
        connection = SSL.Connection(self.context, None)
        if self.sni is not None:
            connection.set_tlsext_host_name(self.sni)
        return connection

    async def connect(self, port: int, peer: _Peer | None = None) -> _Peer:
        """Connect to 127.0.0.1:``port``; the peer once TCP is up."""
        peer = peer or _Peer()
        factory = TLSMemoryBIOFactory(self, True, ClientFactory.forProtocol(lambda: peer))
        reactor.connectTCP("127.0.0.1", port, cast(Any, factory))
        await peer.made
        return peer


class _RawClient(Protocol):
    """Plain TCP: sends what it is told, records what comes back and when it ended."""

    transport: Any

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Failure | None = None
        self.made: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008, N802
        self.lost = reason


async def _raw_connect(port: int) -> _RawClient:
    raw = _RawClient()
    reactor.connectTCP("127.0.0.1", port, cast(Any, ClientFactory.forProtocol(lambda: raw)))
    await raw.made
    return raw


class ListenerTlsAttackTests(_Engine):
    """A TLS listener as the Gateway makes it (tcptunnel.ports.listen with the listener's
    ReloadableServerTls, on this test's engine) against hostile clients."""

    timeout = 60
    # TLS 1.2 suites the listener must refuse (3DES and RC4 are gone from the OpenSSL the
    # test client runs on): RSA key exchange (no forward secrecy), SHA-1 MACs, CBC with
    # SHA-256 (no AEAD), no encryption, Camellia.
    weak_suites = [b"AES128-GCM-SHA256", b"AES256-SHA256", b"AES128-SHA",
                   b"ECDHE-RSA-AES128-SHA", b"ECDHE-RSA-AES256-SHA",
                   b"ECDHE-RSA-AES128-SHA256", b"NULL-SHA256",
                   b"ECDHE-RSA-NULL-SHA", b"ECDHE-RSA-CAMELLIA128-SHA256"]

    def setUp(self) -> None:
        super().setUp()
        ca = self.pki.ca()
        # RSA: the RSA key exchange and ECDHE-RSA suites can be offered at all.
        self.key, self.leaf = self.pki.certificate("gateway", sans=["localhost"], issuer=ca,
                                                   rsa_key=True)
        self.tls = ReloadableServerTls(server_context_factory(TlsFiles(
            pem_certificate=self.pki.pem_file(self.leaf), pem_key=self.pki.key_file(self.key))))
        self.peers: list[_Peer] = []
        self.clients: list[Any] = []
        self.addCleanup(lambda: defer.ensureDeferred(self.close_all()))

    async def close_all(self) -> None:
        """Abort every connection the test left open; wait until none is left."""
        for end in [*self.clients, *self.peers]:
            if end.lost is None and end.transport is not None:
                cast(Any, end.transport).abortConnection()
        await wait_until(lambda: not tcp_connections(), 10, "every connection to close")

    async def client(self, port: int, peer: _Peer | None = None, **options: Any) -> _Peer:
        """A _HostileClient(**options) connected to ``port``."""
        peer = await _HostileClient(**options).connect(port, peer)
        self.clients.append(peer)
        return peer

    async def raw(self, port: int) -> _RawClient:
        """A plain TCP client connected to ``port``."""
        raw = await _raw_connect(port)
        self.clients.append(raw)
        return raw

    def start(self, **peer: Any) -> int:
        """The listener on 127.0.0.1 port 0; each connection a _Peer(**peer)."""
        def accept() -> _Peer:
            self.peers.append(_Peer(**peer))
            return self.peers[-1]

        port = listen(reactor, "127.0.0.1", 0, Factory.forProtocol(accept), "attack",
                      Location("attack.xml", 1), self.tls)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def ended(self, *peers: Any) -> None:
        await wait_until(lambda: all(p.lost is not None for p in peers), 10,
                         "the connections to end")

    def server_engine(self) -> None:
        """The listener's connections run on this test's engine."""
        self.assertEqual({type(p.transport) for p in self.peers}, {self.link_protocol})

    async def test_tls_1_0_and_1_1_refused(self) -> None:
        """A client offering at most TLS 1.0 or 1.1 (with any cipher) is refused with a
        protocol version alert, no handshake at the server; TLS 1.2 completes (control)."""
        port = self.start()
        for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION):
            client = await self.client(port, versions=(version, version))
            await self.ended(client, *self.peers)
            cast(Failure, client.lost).trap(SSL.Error)
            self.assertIn("protocol version", str(cast(Failure, client.lost).value))
        self.assertEqual([p.handshakes for p in self.peers], [0, 0])
        client = await self.client(port, versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION))
        await wait_until(lambda: client.handshakes == 1, 10, "a TLS 1.2 handshake")
        self.server_engine()

    async def test_weak_cipher_suites_refused(self) -> None:
        """TLS 1.2 clients offering only RSA key exchange, SHA-1 MACs, CBC, Camellia or no
        encryption are refused (handshake failure); ECDHE with AES-GCM or ChaCha20
        completes.  (On pyOpenSSL the listener had Twisted's cipher list, which took RSA key
        exchange, CBC and SHA-1 suites, until tls.TLS12_CIPHERS was set on every
        engine.)"""
        port = self.start()
        weak = self.weak_suites
        outcomes = {}
        for cipher in [*weak, b"ECDHE-RSA-AES128-GCM-SHA256", b"ECDHE-RSA-CHACHA20-POLY1305"]:
            client = await self.client(port, versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
                                       ciphers=cipher + b":@SECLEVEL=0")
            await wait_until(lambda c=client: c.handshakes or c.lost is not None, 10,  # type: ignore[misc]
                             "the handshake to end")
            outcomes[cipher] = client.handshakes == 1
        self.assertEqual(outcomes, {**{c: False for c in weak},
                                    b"ECDHE-RSA-AES128-GCM-SHA256": True,
                                    b"ECDHE-RSA-CHACHA20-POLY1305": True})

    async def test_client_renegotiation_refused(self) -> None:
        """A TLS 1.2 client that asks to renegotiate after the handshake is answered with an
        alert record and gets no second handshake (OpenSSL 3 refuses client-initiated
        renegotiation, so a renegotiation flood costs no key exchange)."""
        port = self.start()
        client = await self.client(port, versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION))
        await wait_until(lambda: client.handshakes == 1 and bool(self.peers), 10,
                         "the handshake")
        client.transport.write(b"before")
        await wait_until(lambda: bytes(self.peers[0].received) == b"before", 10, "the bytes")
        tls_client = cast(Any, client.transport)
        answers: list[bytes] = []
        read = tls_client.dataReceived

        def recording(data: bytes) -> None:
            answers.append(data)
            read(data)

        tls_client.dataReceived = recording  # the TCP transport calls its protocol's
        handle = tls_client.getHandle()
        handle.renegotiate()
        with self.assertRaises(SSL.WantReadError):
            handle.do_handshake()
        tls_client.transport.write(handle.bio_read(2**16))  # the new ClientHello
        await wait_until(lambda: bool(answers), 10, "the listener's answer")
        self.assertEqual(answers[0][0], 21)  # an alert record (no_renegotiation)
        # The client gives up with a fatal alert, which ends the link as a TLS error.
        await self.ended(*self.peers)
        cast(Failure, self.peers[0].lost).trap(*TLS_ERRORS)
        self.assertEqual([p.handshakes for p in self.peers], [1])
        self.assertEqual(bytes(self.peers[0].received), b"before")

    async def test_alpn_on_a_link_listener(self) -> None:
        """A link listener completes handshakes offering h2,http/1.1 (no protocol chosen),
        never selects http/1.1 for a plain link, selects tcptunnel/1 when offered among
        others."""
        port = self.start()
        offers = ([b"h2", b"http/1.1"], [b"http/1.1"], [b"http/1.1", b"tcptunnel/1"], None)
        chosen = []
        for offer in offers:
            client = await self.client(port, alpn=offer)
            await wait_until(lambda c=client: c.handshakes or c.lost is not None, 10,  # type: ignore[misc]
                             "the handshake")
            chosen.append(client.negotiated if client.handshakes else "refused")
        self.assertEqual(chosen, [None, None, b"tcptunnel/1", None])
        self.server_engine()

    async def test_alpn_on_a_websocket_listener(self) -> None:
        """A WebSocket listener's TLS (ALPN http/1.1) selects http/1.1 from h2,http/1.1 and
        completes a handshake offering only tcptunnel/1 without ALPN."""
        self.tls = ReloadableServerTls(self.tls.options, ALPN_HTTP_1_1)
        port = self.start()
        chosen = []
        for offer in ([b"h2", b"http/1.1"], [b"tcptunnel/1"]):
            client = await self.client(port, alpn=offer)
            await wait_until(lambda c=client: c.handshakes or c.lost is not None, 10,  # type: ignore[misc]
                             "the handshake")
            chosen.append(client.negotiated if client.handshakes else "refused")
        self.assertEqual(chosen, [b"http/1.1", None])

    async def test_sni_absent_or_long(self) -> None:
        """Without SNI, and with the longest name a client can send (253 characters), the
        handshake completes and bytes move."""
        port = self.start(on_handshake=b"hello")
        long_name = b".".join([b"a" * 63] * 3 + [b"b" * 61])
        self.assertEqual(len(long_name), 253)
        for sni in (None, long_name):
            client = await self.client(port, sni=sni)
            await wait_until(lambda c=client: bytes(c.received) == b"hello",  # type: ignore[misc]
                             10, "hello")
        self.server_engine()

    async def test_huge_sni_refused(self) -> None:
        """A ClientHello whose SNI name is 300 or 60,000 bytes (more than the 255 a host name
        may have; the second spread over four records) is refused with the connection
        closed; the same ClientHello with SNI "localhost" is answered with a ServerHello
        (control: the hand-made ClientHello is valid)."""
        port = self.start()
        control = await self.raw(port)
        control.transport.write(_client_hello(sni=b"localhost"))
        await wait_until(lambda: len(control.received) > 5, 10, "the ServerHello")
        self.assertEqual(control.received[0], 22)  # a handshake record
        self.assertIsNone(control.lost)
        for size in (300, 60000):
            self.peers.clear()
            raw = await self.refused_raw(port, _client_hello(sni=b"a" * size))
            self.assertFalse(raw.received[:1] == b"\x16" and len(raw.received) > 7
                             and raw.received[5] == 2, "a ServerHello to a huge SNI")

    async def refused_raw(self, port: int, data: bytes) -> _RawClient:
        """Send ``data`` on plain TCP; the listener must close the connection by itself
        (without waiting for more bytes) and its protocol end with a TLS error."""
        raw = await self.raw(port)
        raw.transport.write(data)
        await wait_until(lambda: raw.lost is not None, 10, "the listener to close")
        await self.ended(*self.peers)
        for peer in self.peers:
            self.assertEqual(peer.handshakes, 0)
            cast(Failure, peer.lost).trap(*TLS_ERRORS, error.ConnectionLost)
        return raw

    async def test_garbage_before_the_handshake(self) -> None:
        """An HTTP request instead of a ClientHello: the listener closes the connection."""
        port = self.start()
        await self.refused_raw(port, b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")

    async def test_oversized_record_before_the_handshake(self) -> None:
        """A handshake record header announcing 2^14 + 2048 + 1 bytes: closed at the
        header, the body never awaited."""
        port = self.start()
        await self.refused_raw(port, bytes([22, 3, 1]) + (2**14 + 2048 + 1).to_bytes(2, "big"))

    async def established(self, **peer: Any) -> tuple[_Peer, Any]:
        """A client whose handshake and first bytes (b"hi") went through; (client, the TCP
        transport under its TLS)."""
        port = self.start(**peer)
        client = await self.client(port)
        client.transport.write(b"hi")
        await wait_until(lambda: bool(self.peers) and bytes(self.peers[0].received) == b"hi",
                         10, "the first bytes")
        return client, cast(Any, client.transport).transport

    async def test_oversized_record_after_the_handshake(self) -> None:
        """After the handshake, an application-data header announcing 2^14 + 2048 + 1 bytes
        ends the connection with a TLS error at once (no body awaited, nothing delivered)."""
        _client, tcp = await self.established()
        tcp.write(bytes([23, 3, 3]) + (2**14 + 2048 + 1).to_bytes(2, "big"))
        await self.ended(*self.peers)
        cast(Failure, self.peers[0].lost).trap(*TLS_ERRORS)
        self.assertEqual(bytes(self.peers[0].received), b"hi")

    async def test_garbage_after_the_handshake(self) -> None:
        """Bytes that are no TLS record after the handshake: a TLS error at once, nothing of
        them delivered.  (pyOpenSSL's engine counts whole records before it calls recv:
        until RecordCounter refused an impossible header, "GET / ..." read as a header
        announcing 0x202f = 8,239 bytes and was refused only once that many had come.)"""
        _client, tcp = await self.established()
        tcp.write(b"GET / HTTP/1.1\r\n\r\n")
        await self.ended(*self.peers)
        cast(Failure, self.peers[0].lost).trap(*TLS_ERRORS)
        self.assertEqual(bytes(self.peers[0].received), b"hi")

    async def test_eof_without_close_notify(self) -> None:
        """The peer's TCP FIN without close_notify after whole records is ConnectionLost
        (a cut stream, never a clean end), the bytes before it delivered."""
        _client, tcp = await self.established()
        tcp.loseConnection()  # under TLS: no close_notify
        await self.ended(*self.peers)
        cast(Failure, self.peers[0].lost).trap(error.ConnectionLost)
        self.assertEqual(bytes(self.peers[0].received), b"hi")

    async def test_eof_in_the_middle_of_a_record(self) -> None:
        """The TCP FIN after half a record: ConnectionLost, the half record not delivered."""
        client, tcp = await self.established()
        handle = cast(Any, client.transport).getHandle()
        handle.send(b"cut short")  # encrypted into the memory BIO, not yet sent
        record = handle.bio_read(4096)
        tcp.write(record[: len(record) // 2])
        tcp.loseConnection()
        await self.ended(*self.peers)
        cast(Failure, self.peers[0].lost).trap(error.ConnectionLost, *TLS_ERRORS)
        self.assertFalse(cast(Failure, self.peers[0].lost).check(error.ConnectionDone))
        self.assertEqual(bytes(self.peers[0].received), b"hi")

    async def test_close_notify_is_a_clean_end(self) -> None:
        """Control: close_notify then FIN is ConnectionDone."""
        client, _tcp = await self.established()
        client.transport.loseConnection()
        await self.ended(*self.peers)
        cast(Failure, self.peers[0].lost).trap(error.ConnectionDone)

    async def test_flood_while_paused_is_not_buffered(self) -> None:
        """A link that pauses its transport at the first bytes while the peer floods 32 MiB
        of records: the listener stops reading (the flood waits in the kernel's socket
        buffers: 64 KiB at least unread at the listener, 64 KiB unsent at the client), and
        what reached the link after the pause, or waits
        in the TLS layer, stays under one transport read (64 KiB) plus a record."""
        client, tcp = await self.established(pause_on_data=True)
        server = self.peers[0]
        self.assertEqual(server.received_at_pause, 2)
        chunk = os.urandom(2**20)
        for _ in range(32):
            client.transport.write(chunk)
        server_socket = cast(Any, server.transport).transport.getHandle()  # TCP under TLS

        def queued() -> int:
            # Bytes the kernel holds unread in the listener's socket (FIONREAD).
            return struct.unpack("i", fcntl.ioctl(server_socket.fileno(), termios.FIONREAD,
                                                  b"\0\0\0\0"))[0]

        client_socket = tcp.getHandle()

        def unsent() -> int:
            # Bytes the kernel holds unsent in the flooding client's socket (TIOCOUTQ).
            return struct.unpack("i", fcntl.ioctl(client_socket.fileno(), termios.TIOCOUTQ,
                                                  b"\0\0\0\0"))[0]

        await wait_until(lambda: queued() >= 2**16 and unsent() >= 2**16, 20,
                         "the flood to wait in the kernel's buffers")
        bound = 2**16 + 2**14 + 2048 + 5
        self.assertLessEqual(len(server.received) - server.received_at_pause, bound)
        tls = server.transport
        if isinstance(tls, StdlibLinkTLSProtocol):
            self.assertLessEqual(tls._in.pending, bound)


class PyOpenSSLListenerTlsAttackTests(ListenerTlsAttackTests):
    """The same attacks on a listener on pyOpenSSL (TCPTUNNEL_PYOPENSSL_TLS=1), with the
    same outcomes (the same TLS 1.2 suites refused, garbage refused at once)."""

    engine = "pyopenssl"


class RecordCounterHeaderTests(SynchronousTestCase):
    """tlslink.RecordCounter counts a header no TLS record has as a whole record at once
    (so that pyOpenSSL's recv meets the error without waiting for the body)."""

    def test_impossible_headers_count_at_once(self) -> None:
        """Content types outside 20-24, a major version other than 3, and a length over
        2^14 + 2048 count as a record at their header, whole or cut; the valid headers
        next to them (types 20 and 24, 2^14 + 2048 bytes) wait for their body."""
        for header in (b"GET /", bytes([19, 3, 3, 0, 9]), bytes([25, 3, 3, 0, 9]),
                       bytes([23, 2, 3, 0, 9]), bytes([23, 4, 3, 0, 9]),
                       bytes([23, 3, 3]) + (2**14 + 2048 + 1).to_bytes(2, "big")):
            self.assertEqual(RecordCounter().feed(header), 1, header)
            counter = RecordCounter()
            self.assertEqual((counter.feed(header[:2]), counter.feed(header[2:])), (0, 1))
        for header in (bytes([20, 3, 3, 0, 1]), bytes([24, 3, 1, 0, 9]),
                       bytes([23, 3, 3]) + (2**14 + 2048).to_bytes(2, "big")):
            self.assertEqual(RecordCounter().feed(header), 0, header)


# -- the Gateway: handshake deadline, certificate reloads ---------------------------------------


class GatewayTlsAttackTests(_Engine):
    """The real Gateway (GatewayService, TLS listener) on this test's engine."""

    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        self.clients: list[Any] = []
        self.addCleanup(lambda: defer.ensureDeferred(self.abort_clients()))

    async def abort_clients(self) -> None:
        for client in self.clients:
            if client.transport is not None and client.transport.connected:
                client.transport.abortConnection()

    def gateway(self, attributes: str = "") -> Tunnel:
        tunnel = Tunnel(self, tls=True, gateway_attributes=attributes)
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        return tunnel

    async def tls_peer(self, tunnel: Tunnel, pin_hex: str) -> RawPeer:
        """A hand-driven link over TLS (the project's pinning client creator, on this test's
        engine), once its handshake is done."""
        peer = _HandshakePeer()
        creator = client_connection_creator("localhost", None, bytes.fromhex(pin_hex))
        reactor.connectTCP("127.0.0.1", tunnel.gateway_port, cast(Any, tls_factory(
            creator, ClientFactory.forProtocol(lambda: peer), is_client=True)))
        self.clients.append(peer)
        await wait_until(lambda: peer.handshakes == 1 or peer.closed_called(), 10,
                         "the handshake")
        self.assertEqual(peer.handshakes, 1)
        self.assertIs(type(peer.transport), self.link_protocol)
        return peer

    async def test_handshake_deadline(self) -> None:
        """Peers that open TCP and send nothing, half a ClientHello, or a ClientHello and
        then nothing more are aborted at loginTimeout (1 s here): within 1-5 s, none
        before."""
        tunnel = self.gateway('loginTimeout="1"')
        hello = _client_hello()
        raws = []
        started = reactor.seconds()
        for data in (b"", hello[: len(hello) // 2], hello):
            raw = await _raw_connect(tunnel.gateway_port)
            self.clients.append(raw)
            raw.transport.write(data)
            raws.append(raw)
        await wait_until(lambda: all(r.lost is not None for r in raws), 10,
                         "the Gateway to abort them")
        elapsed = reactor.seconds() - started
        self.assertGreaterEqual(elapsed, 1.0)
        self.assertLess(elapsed, 5.0)
        # The full ClientHello was answered (ServerHello...), the others got nothing.
        self.assertEqual([bool(r.received) for r in raws], [False, False, True])

    async def test_reload_new_certificate_old_links_kept(self) -> None:
        """A reload with a renewed certificate: new handshakes see the new one; a link whose
        handshake was made before logs in after the reload on the old one."""
        tunnel = self.gateway()
        assert tunnel.certs is not None and tunnel.gateway is not None
        old = await self.tls_peer(tunnel, tunnel.certs.pin_hex)
        renewed = mint(os.path.abspath(self.mktemp()))
        _replace(tunnel.certs.cert, renewed.cert)
        _replace(tunnel.certs.key, renewed.key)
        self.assertTrue(await tunnel.gateway.apply_config(
            tunnel._parse(tunnel.gateway_xml(tunnel.gateway_port))))
        self.assertTrue(await old.login(1, fr.ROLE_PROXY_CLIENT, "client-pw"))
        new = await self.tls_peer(tunnel, renewed.pin_hex)
        self.assertTrue(await new.login(1, fr.ROLE_PROXY_SERVER, "server-pw"))
        stale = _HandshakePeer()
        creator = client_connection_creator("localhost", None,
                                            bytes.fromhex(tunnel.certs.pin_hex))
        reactor.connectTCP("127.0.0.1", tunnel.gateway_port, cast(Any, tls_factory(
            creator, ClientFactory.forProtocol(lambda: stale), is_client=True)))
        await stale.closed
        self.assertEqual(stale.handshakes, 0)  # the old pin no longer matches

    async def test_reload_with_a_broken_certificate_keeps_the_old(self) -> None:
        """A reload whose certificate file is not PEM, or whose key does not match, fails
        with a TlsSetupError naming the file (and the problem); new handshakes still get the
        old certificate."""
        tunnel = self.gateway()
        assert tunnel.certs is not None and tunnel.gateway is not None
        config = tunnel._parse(tunnel.gateway_xml(tunnel.gateway_port))
        with open(tunnel.certs.cert, "rb") as f:
            good = f.read()
        with open(tunnel.certs.cert, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        with self.assertRaises(TlsSetupError) as raised:
            await defer.maybeDeferred(tunnel.gateway.apply_config, config)
        self.assertIn(tunnel.certs.cert, str(raised.exception))
        other = mint(os.path.abspath(self.mktemp()))
        _replace(tunnel.certs.cert, other.cert)  # a certificate of another key
        with self.assertRaises(TlsSetupError) as raised:
            await defer.maybeDeferred(tunnel.gateway.apply_config, config)
        self.assertIn("does not match", str(raised.exception))
        self.assertIn("certificatePem", str(raised.exception))
        with open(tunnel.certs.cert, "wb") as f:
            f.write(good)
        peer = await self.tls_peer(tunnel, tunnel.certs.pin_hex)
        self.assertTrue(await peer.login(1, fr.ROLE_PROXY_CLIENT, "client-pw"))

    async def test_weak_key_reload_is_a_setup_error(self) -> None:
        """A reload with a renewed certificate whose key OpenSSL refuses (RSA-1024 under
        security level 2: 'ee key too small') fails with a TlsSetupError naming the file,
        the Listener attribute and the problem; new handshakes still get the old
        certificate.  (It was a bare OpenSSL.SSL.Error, which the SIGHUP reload does not
        catch: ReloadSkipsWeakKeyTests.)"""
        tunnel = self.gateway()
        assert tunnel.certs is not None and tunnel.gateway is not None
        config = tunnel._parse(tunnel.gateway_xml(tunnel.gateway_port))
        with open(tunnel.certs.cert, "rb") as f:
            good_cert = f.read()
        with open(tunnel.certs.key, "rb") as f:
            good_key = f.read()
        cert, key = _rsa1024(self.pki)
        _replace(tunnel.certs.cert, cert)
        _replace(tunnel.certs.key, key)
        with self.assertRaises(TlsSetupError) as raised:
            await defer.maybeDeferred(tunnel.gateway.apply_config, config)
        message = str(raised.exception)
        self.assertIn(tunnel.certs.cert, message)
        self.assertIn("too small", message)
        self.assertIn("<Listener> attribute 'certificatePem", message)
        for path, data in ((tunnel.certs.cert, good_cert), (tunnel.certs.key, good_key)):
            with open(path, "wb") as f:
                f.write(data)
        peer = await self.tls_peer(tunnel, tunnel.certs.pin_hex)
        self.assertTrue(await peer.login(1, fr.ROLE_PROXY_CLIENT, "client-pw"))

    async def test_reloads_leave_no_descriptor_or_file(self) -> None:
        """20 reloads (each loads the key and chain through a close-on-exec memfd) leave as
        many open file descriptors as before, none of them a memfd, and no tcptunnel-tls
        file in the temporary directory; the last certificate is served."""
        tunnel = self.gateway()
        assert tunnel.certs is not None and tunnel.gateway is not None
        config = tunnel._parse(tunnel.gateway_xml(tunnel.gateway_port))

        def descriptors() -> list[str]:
            entries = []
            for name in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):  # the listing's own descriptor
                    entries.append(os.readlink(f"/proc/self/fd/{name}"))
            return sorted(entries)

        made: list[int] = []
        memfd_create = os.memfd_create

        def counting(name: str, flags: int = 0) -> int:
            made.append(flags)
            return memfd_create(name, flags)

        self.patch(os, "memfd_create", counting)
        before = descriptors()
        temporary = set(os.listdir(tempfile.gettempdir()))
        last = tunnel.certs
        for _ in range(20):
            last = mint(os.path.abspath(self.mktemp()))
            _replace(tunnel.certs.cert, last.cert)
            _replace(tunnel.certs.key, last.key)
            self.assertTrue(await tunnel.gateway.apply_config(config))
        gc.collect()
        after = descriptors()
        self.assertEqual(after, before)
        self.assertEqual([d for d in after if "memfd" in d], [])
        # Each reload went through a close-on-exec memfd (not the temporary-file path).
        self.assertEqual(made, [os.MFD_CLOEXEC] * 20)
        self.assertEqual([n for n in set(os.listdir(tempfile.gettempdir())) - temporary
                          if n.startswith("tcptunnel-tls")], [])
        await self.tls_peer(tunnel, last.pin_hex)


class PyOpenSSLGatewayTlsAttackTests(GatewayTlsAttackTests):
    """The same on pyOpenSSL (TCPTUNNEL_PYOPENSSL_TLS=1)."""

    engine = "pyopenssl"


def _rsa1024(pki: _Pki) -> tuple[str, str]:
    """(certificate, key) PEM files of a self-signed RSA-1024 certificate for localhost,
    which OpenSSL's default security level (2: 112-bit keys) refuses to serve."""
    key = rsa.generate_private_key(65537, 1024)
    cert = (x509.CertificateBuilder().subject_name(_Pki.name("localhost"))
            .issuer_name(_Pki.name("localhost")).public_key(key.public_key())
            .serial_number(1).not_valid_before(_NOW - _DAY).not_valid_after(_NOW + 3 * _DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    return pki.pem_file(cert), pki.key_file(key)


class ReloadSkipsWeakKeyTests(_Engine):
    """The whole process's reload (TunnelService.reload, what SIGHUP runs) with two Gateway
    instances, the first renewed with an RSA-1024 certificate, the second with a good one:
    the first keeps its old certificate and says why, the second is reloaded."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_weak_key_keeps_the_old_and_reloads_the_others(self) -> None:
        """The reload returns False; the first Gateway's listener keeps its ServerOptions,
        the error line names the instance, the settings file's line, the attribute, the
        certificate file and 'ee key too small', and the last line names the instance not
        reloaded; the second Gateway's listener serves the renewed certificate."""
        files = []
        for name in ("a", "b"):
            key, leaf = self.pki.certificate(name, sans=["localhost"])
            files.append([self.pki.pem_file(leaf), self.pki.key_file(key)])
        path = os.path.join(self.pki.directory, "settings.xml")

        def write() -> None:
            for _cert, key in files:
                os.chmod(key, 0o600)  # else the reload warns that others can read it
            instances = "".join(
                f'<Instance type="gateway">\n<Listener ip="127.0.0.1" port="{port}" '
                f'certificatePemFilePath="{cert}" certificatePemKeyFilePath="{key}"/>\n'
                '<Session id="1" proxyClientPassword="pc" proxyServerPassword="ps"/>\n'
                "</Instance>\n" for port, (cert, key) in zip((6000, 6001), files, strict=True))
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(f"<Settings {NS}>\n{instances}</Settings>\n")

        write()
        tunnel = TunnelService(load_settings(path), BindingReactor())
        tunnel.startService()
        self.addCleanup(tunnel.stopService)

        def holders() -> list[Any]:
            return [cast(Any, tunnel.getServiceNamed(f"{i}:gateway")).listeners.entries()[0][3]
                    for i in (0, 1)]

        before = [h.options for h in holders()]
        weak_cert, weak_key = _rsa1024(self.pki)
        renewed_key, renewed = self.pki.certificate("b renewed", sans=["localhost"])
        files[0] = [weak_cert, weak_key]
        files[1] = [self.pki.pem_file(renewed), self.pki.key_file(renewed_key)]
        write()
        del self.events[:]
        results: list[Any] = []
        tunnel.reload().addBoth(results.append)
        self.assertEqual(results, [False])
        after = holders()
        self.assertIs(after[0].options, before[0])
        self.assertIsNot(after[1].options, before[1])
        self.assertIn(renewed.public_bytes(serialization.Encoding.PEM),
                      after[1].options.identity_pem)
        lines = [formatEvent(e) for e in self.events
                 if e["log_level"] in (LogLevel.error, LogLevel.warn)]
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith(f"[0:gateway] not changed: {path}:"), lines[0])
        for part in ("<Listener> attribute 'certificatePem", weak_cert, "ee key too small"):
            self.assertIn(part, lines[0])
        self.assertEqual(lines[1], f"Reloaded {path} except 0:gateway (see above)")


@implementer(IHandshakeListener)
class _HandshakePeer(RawPeer):
    """A RawPeer that counts its TLS handshakes."""

    handshakes = 0

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshakes += 1


async def _close(*ends: Any) -> None:
    """Abort the connections of ``ends`` still open; wait until no TCP connection is left."""
    for end in ends:
        if end.lost is None and end.transport is not None:
            end.transport.abortConnection()
    await wait_until(lambda: not tcp_connections(), 10, "every connection to close")


def _replace(path: str, source: str) -> None:
    """Write ``source``'s bytes over ``path`` (a renewal in place)."""
    with open(source, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data)


def _client_hello(sni: bytes | None = None) -> bytes:
    """A TLS ClientHello as the standard library writes it (without SNI), with a
    server_name extension for ``sni`` spliced in when given (any length up to 65,530: the
    handshake message is then cut into records of 2^14 bytes)."""
    context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = stdlib_ssl.CERT_NONE
    incoming, outgoing = stdlib_ssl.MemoryBIO(), stdlib_ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(stdlib_ssl.SSLWantReadError):
        tls.do_handshake()
    record = outgoing.read()
    if sni is None:
        return record
    body = record[5 + 4:]  # past the record header and the handshake header
    position = 2 + 32  # legacy version, random
    position += 1 + body[position]  # session id
    position += 2 + int.from_bytes(body[position:position + 2], "big")  # cipher suites
    position += 1 + body[position]  # compression methods
    extensions = body[position + 2:]
    names = b"\x00" + len(sni).to_bytes(2, "big") + sni  # host_name(0), length, name
    server_name = b"\x00\x00" + (len(names) + 2).to_bytes(2, "big") + \
        len(names).to_bytes(2, "big") + names
    extensions = server_name + extensions
    body = body[:position] + len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"".join(bytes([22, 3, 1]) + len(message[i:i + 2**14]).to_bytes(2, "big")
                    + message[i:i + 2**14] for i in range(0, len(message), 2**14))


# -- 1-byte fragments; a client's truncated stream ------------------------------------------------


class FragmentAndTruncationTests(_Engine):
    """Records cut into 1-byte reads (server side), and an EOF without close_notify seen by
    a proxy's TLS client, on this test's engine."""

    timeout = 30

    def test_one_byte_fragments(self) -> None:
        """A listener's TLS protocol fed every byte of the handshake and of three records
        (40 KiB) in its own dataReceived completes the handshake once and delivers the
        bytes whole and in order; its answer reaches the client."""
        certs = mint(os.path.abspath(self.mktemp()))
        tls = ReloadableServerTls(server_context_factory(TlsFiles(pem_certificate=certs.cert,
                                                                  pem_key=certs.key)))
        app = _Peer(on_handshake=b"welcome")
        server = tls_factory(tls, Factory.forProtocol(lambda: app), is_client=False
                             ).buildProtocol(None)
        self.assertIs(type(server), self.link_protocol)
        transport = StringTransport()
        server.makeConnection(transport)
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        client = SSL.Connection(context, None)
        client.set_connect_state()
        client.set_tlsext_host_name(b"localhost")

        def exchange() -> None:
            """The client's pending bytes to the server one at a time, the answer back."""
            with contextlib.suppress(SSL.WantReadError):
                while True:
                    for byte in client.bio_read(2**16):
                        server.dataReceived(bytes([byte]))
            answer = transport.value()
            transport.clear()
            if answer:
                client.bio_write(answer)

        for _ in range(10):
            try:
                client.do_handshake()
                break
            except SSL.WantReadError:
                exchange()
        exchange()  # the client's Finished
        self.assertEqual(app.handshakes, 1)
        data = os.urandom(40 * 1024)
        client.sendall(data)
        exchange()
        self.assertEqual(bytes(app.received), data)
        self.assertEqual(app.lost, None)
        received = b""
        with contextlib.suppress(SSL.WantReadError):
            while len(received) < 7:
                received += client.recv(100)
        self.assertEqual(received, b"welcome")

    async def connected(self) -> tuple[_Peer, _Recorder]:
        """A proxy's TLS client (the pinning creator, this engine) connected to a fake
        Gateway; (client, the fake Gateway's side) once b"hello" came through."""
        key, leaf = self.pki.certificate("gateway", sans=["localhost"])
        fake = _FakeGateway(key, [leaf])
        port = fake.listen(self)
        client = _Peer()
        creator = client_connection_creator("localhost", None,
                                            bytes.fromhex(_pin_hex(leaf)))
        reactor.connectTCP("127.0.0.1", port, cast(Any, tls_factory(
            creator, ClientFactory.forProtocol(lambda: client), is_client=True)))
        await wait_until(lambda: client.handshakes == 1 and bool(fake.connections), 10,
                         "the handshake")
        self.assertIs(type(client.transport), self.link_protocol)
        gateway = fake.connections[0]
        gateway.transport.write(b"hello")
        await wait_until(lambda: bytes(client.received) == b"hello", 10, "hello")
        return client, gateway

    async def test_client_sees_eof_without_close_notify_as_lost(self) -> None:
        """The Gateway's side closing TCP without close_notify: the proxy's link sees
        ConnectionLost (a cut stream), never a clean end."""
        client, gateway = await self.connected()
        cast(Any, gateway.transport).transport.loseConnection()  # TCP under TLS
        await wait_until(lambda: client.lost is not None, 10, "the end")
        cast(Failure, client.lost).trap(error.ConnectionLost)

    async def test_client_sees_close_notify_as_done(self) -> None:
        """Control: close_notify from the Gateway's side is a clean end (ConnectionDone)."""
        client, gateway = await self.connected()
        gateway.transport.loseConnection()
        await wait_until(lambda: client.lost is not None, 10, "the end")
        cast(Failure, client.lost).trap(error.ConnectionDone)
        await wait_until(lambda: gateway.lost is not None, 10, "the Gateway side's end")


class PyOpenSSLFragmentAndTruncationTests(FragmentAndTruncationTests):
    """The same on pyOpenSSL (TCPTUNNEL_PYOPENSSL_TLS=1)."""

    engine = "pyopenssl"



class ServerRenegotiationTests(_Engine):
    """A Gateway side (TLS 1.2) that renegotiates with a proxy's TLS client to present
    another certificate in a second handshake, on this test's engine: the client refuses
    to renegotiate at all (OP_NO_RENEGOTIATION), so a pin or a name is checked at the one
    handshake there is."""

    timeout = 30

    async def renegotiate(self, creator: Any, first: tuple[Any, x509.Certificate],
                          second: tuple[Any, x509.Certificate]) -> tuple[_Peer, _Recorder]:
        """Handshake on ``first``, then a server-initiated renegotiation (no resumption) on
        ``second``, then b"after" if it completed; (client, Gateway side) once the client got
        b"after" or its connection ended."""
        fake = _FakeGateway(first[0], [first[1]], max_version=SSL.TLS1_2_VERSION)
        port = fake.listen(self)
        client = _Peer()
        reactor.connectTCP("127.0.0.1", port, cast(Any, tls_factory(
            creator, ClientFactory.forProtocol(lambda: client), is_client=True)))
        self.addCleanup(lambda: defer.ensureDeferred(_close(client)))
        await wait_until(lambda: client.handshakes == 1 and bool(fake.connections), 10,
                         "the first handshake")
        self.assertIs(type(client.transport), self.link_protocol)
        gateway = fake.connections[0]
        handle = gateway.transport.getHandle()
        handle.set_options(_NO_RESUMPTION_ON_RENEGOTIATION)  # a full handshake
        handle.use_certificate(crypto.X509.from_cryptography(second[1]))
        handle.use_privatekey(crypto.PKey.from_cryptography_key(second[0]))
        handle.renegotiate()
        with contextlib.suppress(SSL.WantReadError):
            handle.do_handshake()
        gateway.transport.transport.write(handle.bio_read(2**16))  # the HelloRequest
        await wait_until(lambda: client.lost is not None or not handle.renegotiate_pending(),
                         10, "the second handshake's outcome")
        if client.lost is None:
            gateway.transport.write(b"after")  # under the second handshake's keys
            await wait_until(lambda: client.lost is not None
                             or bytes(client.received) == b"after", 10, "b'after'")
        return client, gateway

    async def test_verified_client_checks_the_new_certificate(self) -> None:
        """A CA-verified proxy refuses a renegotiation onto a certificate of its CA that
        names another host: the second certificate is verified like the first."""
        ca = self.pki.ca()
        first = self.pki.certificate("gateway", sans=["gateway.example"], issuer=ca)
        second = self.pki.certificate("evil", sans=["evil.example"], issuer=ca)
        ca_file = self.pki.pem_file(ca[1])
        client, _gateway = await self.renegotiate(
            client_connection_creator("gateway.example", ca_file, None), first, second)
        self.assertIsNotNone(client.lost)
        cast(Failure, client.lost).trap(*TLS_ERRORS)
        self.assertEqual(bytes(client.received), b"")

    async def test_pinned_client_refuses_a_new_certificate(self) -> None:
        """A pinned proxy refuses a renegotiation onto another, unpinned, self-signed
        certificate: nothing after it is delivered.  (The standard library's engine checks
        the pin once, after the first handshake; it took the second certificate and went on
        moving bytes until every context had OP_NO_RENEGOTIATION.)"""
        first = self.pki.certificate("gateway", sans=["localhost"])
        second = self.pki.certificate("swapped", sans=["evil.example"])
        client, _gateway = await self.renegotiate(
            client_connection_creator("localhost", None, bytes.fromhex(_pin_hex(first[1]))),
            first, second)
        self.assertIsNotNone(client.lost)
        cast(Failure, client.lost).trap(*TLS_ERRORS)
        self.assertEqual(bytes(client.received), b"")


class PyOpenSSLServerRenegotiationTests(ServerRenegotiationTests):
    """The same on pyOpenSSL (TCPTUNNEL_PYOPENSSL_TLS=1)."""

    engine = "pyopenssl"
