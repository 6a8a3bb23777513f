"""Tests for tcptunnel.tls: certificate loading errors, client verification modes, and the
reloadable server TLS of listeners (interface, ALPN, certificate swap)."""

from __future__ import annotations

import datetime
import itertools
import os
import re
import ssl as stdlib_ssl
import tempfile
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import defer, error, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.protocols._tls_legacy import LegacyContextFactoryWarning
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer, provider
from zope.interface.verify import verifyObject

from tcptunnel.config import Location, TlsFiles
from tcptunnel.ports import listen
from tcptunnel.proxy import ProxyService
from tcptunnel.test._certs import mint
from tcptunnel.test._harness import (
    EchoProtocol,
    Tunnel,
    binding_port,
    connect,
    wait_until,
)
from tcptunnel.test._harness import listen as listen_app
from tcptunnel.tls import (
    ALPN_PROTOCOL,
    ReloadableServerTls,
    TlsSetupError,
    certificate_pin,
    client_connection_creator,
    load_server_identity,
    server_context_factory,
    server_tls,
    tls_factory,
)
from tcptunnel.tlslink import (
    MAX_RECORD_BODY,
    LinkTLSFactory,
    LinkTLSProtocol,
    RecordCounter,
    StdlibLinkTLSProtocol,
    StdlibTLS,
    is_name_mismatch,
    use_pyopenssl_tls,
    use_twisted_tls,
    using_own_tls,
    using_stdlib_tls,
)


class LoadingTests(SynchronousTestCase):
    """Server certificates from PEM and PKCS#12, and every way they can be wrong."""

    def setUp(self) -> None:
        self.certs = mint(os.path.abspath(self.mktemp()))

    def test_pem(self) -> None:
        """A PEM certificate and key give a usable context."""
        server_context_factory(TlsFiles(pem_certificate=self.certs.cert, pem_key=self.certs.key))

    def test_pkcs12(self) -> None:
        """A PKCS#12 file with its password gives a usable context (chain included)."""
        _key, _cert, chain = load_server_identity(
            TlsFiles(pfx_file=self.certs.pfx, pfx_password=self.certs.pfx_password))
        self.assertEqual(len(chain), 1)
        server_context_factory(TlsFiles(pfx_file=self.certs.pfx,
                                        pfx_password=self.certs.pfx_password))

    def test_pkcs12_wrong_password(self) -> None:
        """A wrong PKCS#12 password is reported as such, naming the file."""
        with self.assertRaises(TlsSetupError) as raised:
            load_server_identity(TlsFiles(pfx_file=self.certs.pfx, pfx_password="wrong"))
        self.assertIn("wrong password", str(raised.exception))
        self.assertIn(self.certs.pfx, str(raised.exception))

    def test_mismatched_key(self) -> None:
        """A key that does not belong to the certificate is refused."""
        other = mint(os.path.abspath(self.mktemp()))
        with self.assertRaises(TlsSetupError) as raised:
            load_server_identity(TlsFiles(pem_certificate=self.certs.cert, pem_key=other.key))
        self.assertIn("does not match", str(raised.exception))

    def test_expired(self) -> None:
        """An expired certificate is refused with its expiry date."""
        old = mint(os.path.abspath(self.mktemp()), not_after=datetime.datetime(
            2020, 1, 2, tzinfo=datetime.UTC))
        with self.assertRaises(TlsSetupError) as raised:
            load_server_identity(TlsFiles(pem_certificate=old.cert, pem_key=old.key))
        self.assertIn("expired on 2020-01-02", str(raised.exception))

    def test_missing_file(self) -> None:
        """A missing file is named."""
        with self.assertRaises(TlsSetupError) as raised:
            load_server_identity(TlsFiles(pem_certificate="/nonexistent.pem", pem_key="/k"))
        self.assertIn("/nonexistent.pem", str(raised.exception))


class StdlibServerContextTests(SynchronousTestCase):
    """The standard library's server context gets the listener's key and chain."""

    def test_without_memfd_a_private_file_removed_at_once(self) -> None:
        """Where there is no memfd, the PEM goes through a mode-0600 temporary file that is
        gone once the context is loaded; the context then serves the PKCS#12 listener's
        certificate (a handshake with a pinning client completes)."""
        certs = mint(os.path.abspath(self.mktemp()))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.patch(os, "memfd_create", None)
        self.patch(tempfile, "tempdir", directory)
        made: list[tuple[str, int]] = []
        mkstemp = tempfile.mkstemp

        def recording(*args: Any, **kwargs: Any) -> tuple[int, str]:
            fd, path = mkstemp(*args, **kwargs)
            made.append((path, os.stat(path).st_mode & 0o777))
            return fd, path

        self.patch(tempfile, "mkstemp", recording)
        tls = server_tls(TlsFiles(pfx_file=certs.pfx, pfx_password=certs.pfx_password))
        self.assertEqual([(os.path.dirname(path), mode) for path, mode in made],
                         [(directory, 0o600)])
        self.assertEqual(os.listdir(directory), [])
        creator = client_connection_creator("localhost", None, bytes.fromhex(certs.pin_hex))
        server = LinkTLSFactory(tls, False, Factory.forProtocol(_TlsApp),
                                stdlib=True).buildProtocol(None)
        client = LinkTLSFactory(creator, True, Factory.forProtocol(_TlsApp),
                                stdlib=True).buildProtocol(None)
        self.assertIs(type(server), StdlibLinkTLSProtocol)
        iosim.connect(server, iosim.FakeTransport(server, True),
                      client, iosim.FakeTransport(client, False))
        self.assertEqual(cast(_TlsApp, client.wrappedProtocol).handshakes, 1)

    def test_options_without_pem_refused(self) -> None:
        """CertificateOptions not made by server_context_factory (no identity_pem) are
        refused with a TlsSetupError that says so."""
        certs = mint(os.path.abspath(self.mktemp()))
        with open(certs.key, "rb") as key, open(certs.cert, "rb") as cert:
            plain = ssl.CertificateOptions(
                privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key.read()),
                certificate=crypto.load_certificate(crypto.FILETYPE_PEM, cert.read()))
        with self.assertRaises(TlsSetupError) as raised:
            ReloadableServerTls(plain)  # type: ignore[arg-type]
        self.assertIn("server_context_factory", str(raised.exception))


@implementer(IOpenSSLServerConnectionCreator)
class _AnyCertificateServer:
    """A server creator for the standard library's engine serving any certificate (an
    expired one, which server_tls refuses to load)."""

    def __init__(self, certs: Any) -> None:
        context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.cert, certs.key)
        self.spec = StdlibTLS(context)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:  # noqa: N802, N803
        raise AssertionError("the standard library's engine does not ask for this")

    def stdlib_tls(self) -> StdlibTLS:
        return self.spec


class StdlibErrorMessageTests(SynchronousTestCase):
    """On the standard library's ssl a refused certificate's error names the problem."""

    def refusal(self, certs: Any, ca: str | None, name: str = "localhost") -> str:
        """The message a client verifying against ``ca`` ends with."""
        server: Any = LinkTLSFactory(_AnyCertificateServer(certs), False,
                                     Factory.forProtocol(_TlsApp), stdlib=True)
        client: Any = LinkTLSFactory(client_connection_creator(name, ca, None), True,
                                     Factory.forProtocol(_TlsApp), stdlib=True)
        server, client = server.buildProtocol(None), client.buildProtocol(None)
        app = cast(_TlsApp, client.wrappedProtocol)
        iosim.connect(server, iosim.FakeTransport(server, True),
                      client, iosim.FakeTransport(client, False))
        self.assertEqual(app.handshakes, 0)
        app.lost.trap(stdlib_ssl.SSLCertVerificationError)
        return str(app.lost.getErrorMessage())

    def test_expired_unknown_ca_wrong_name(self) -> None:
        """An expired certificate, one from a CA not trusted, one for another name: each
        message says which."""
        old = mint(os.path.abspath(self.mktemp()), not_after=datetime.datetime(
            2020, 1, 2, tzinfo=datetime.UTC))
        self.assertIn("certificate has expired", self.refusal(old, old.ca))
        certs = mint(os.path.abspath(self.mktemp()))
        # The system store (no CA file) does not hold the test CA.
        self.assertIn("unable to get local issuer certificate", self.refusal(certs, None))
        self.assertIn("not valid for 'other.example'",
                      self.refusal(certs, certs.ca, "other.example"))


class VerificationTests(TestCase):
    """How a proxy verifies the Gateway: CA file, pin; never nothing."""

    timeout = 60

    async def tunnel_with(self, proxy_tls: str, listener_tls: str | None = None) -> tuple[
            Tunnel, object, object, int]:
        echo = await listen_app(self, EchoProtocol)
        tunnel = Tunnel(self, tls=True)
        self.addCleanup(tunnel.close)
        certs = tunnel.certs
        assert certs is not None
        if listener_tls is not None:
            tunnel.gateway_xml = lambda port: (  # type: ignore[method-assign]
                f'<Instance type="gateway"><Listener ip="127.0.0.1" port="{port}" '
                f'{listener_tls.format(c=certs)}/><Session id="1" proxyClientPassword="client-pw" '
                'proxyServerPassword="server-pw"/></Instance>')
        tunnel.start_gateway()
        tunnel.certs = None  # the proxies get exactly the TLS attributes given here
        pc = tunnel.start_proxy_client(extra=proxy_tls.format(c=certs))
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)],
                                       extra=proxy_tls.format(c=certs))
        return tunnel, pc, ps, echo

    async def test_pkcs12_listener_and_pin(self) -> None:
        """A PKCS#12 listener and proxies that pin its certificate tunnel end to end."""
        tunnel, pc, ps, _ = await self.tunnel_with(
            'useSsl="1" certificatePin="{c.pin_hex}"',
            listener_tls='certificatePfxFilePath="{c.pfx}" '
                         'certificatePfxPassword="{c.pfx_password}"')
        await tunnel.ready(pc, ps)
        client = await connect(binding_port(ps))  # type: ignore[arg-type]
        client.transport.write(b"pinned")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")
        self.assertEqual(bytes(client.received), b"pinned")
        # Both ends of the links write through TLS without Twisted's write aggregation,
        # which would hold each batch of frames for a reactor iteration.
        assert tunnel.gateway is not None
        links = [pc.link, ps.link, *tunnel.gateway.gateway.links]  # type: ignore[attr-defined]
        self.assertEqual(len(links), 4)
        # They are tcptunnel.tlslink's protocol, on the standard library's ssl unless
        # TCPTUNNEL_PYOPENSSL_TLS=1, or Twisted's with TCPTUNNEL_TWISTED_TLS=1 (the suite
        # runs all three ways).
        expected: type = (TLSMemoryBIOProtocol if not using_own_tls()
                          else StdlibLinkTLSProtocol if using_stdlib_tls() else LinkTLSProtocol)
        for link in links:
            self.assertIs(type(link.transport), expected)

    async def assert_refused_at_tls(self, tunnel: Tunnel, *proxies: Any) -> None:
        """Wait until each proxy's first try ended in a failed TLS handshake (the reason its
        link gives), then check that none logged in and that the Gateway saw no login."""
        failures: list[Any] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            # A name mismatch (service_identity's VerificationError on pyOpenSSL) ends the
            # link after the handshake and is logged by its repr; on the standard library's
            # ssl the proxy says "does not name"; every other refusal is a TLS error.
            if re.search("TLS handshake with the Gateway failed|VerificationError|does not name",
                         str(event.get("why", ""))):
                failures.append(event.get("log_source"))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await wait_until(lambda: all(p in failures and p.factory.retries >= 1 for p in proxies),
                         10, "a failed TLS handshake at each proxy")
        for proxy in proxies:
            self.assertIsNone(proxy.link)
            self.assertEqual(proxy.stats["logins_ok",], 0)
        assert tunnel.gateway is not None
        self.assertEqual([key for key in tunnel.gateway.gateway.stats
                          if str(key[0]).startswith("logins")], [])

    async def test_wrong_pin_never_logs_in(self) -> None:
        """A proxy whose pin does not match never logs in."""
        tunnel, pc, ps, _ = await self.tunnel_with('useSsl="1" certificatePin="' + "ab" * 32
                                                  + '"')
        await self.assert_refused_at_tls(tunnel, pc, ps)

    async def test_untrusted_certificate_never_logs_in(self) -> None:
        """Without a CA file the system store does not trust a test CA: no login."""
        tunnel, pc, _ps, _ = await self.tunnel_with('useSsl="1" serverName="localhost"')
        await self.assert_refused_at_tls(tunnel, pc)

    async def test_wrong_hostname_never_logs_in(self) -> None:
        """A certificate for another name is refused even when its CA is trusted, and the
        proxy says which name it wanted (not a raw VerificationError repr)."""
        tunnel, pc, _ps, _ = await self.tunnel_with(
            'useSsl="1" caFile="{c.ca}" serverName="other.example"')
        reasons: list[str] = []
        proxy = cast(ProxyService, pc)
        link_lost = proxy.link_lost

        def record(link: Any, why: str) -> None:
            reasons.append(why)
            link_lost(link, why)

        proxy.link_lost = record  # type: ignore[method-assign]
        await self.assert_refused_at_tls(tunnel, pc)
        await wait_until(lambda: bool(reasons), 10, "the proxy to say why the link ended")
        self.assertIn("certificate does not name 'other.example'", reasons[0])
        self.assertIn("check serverName", reasons[0])


@implementer(IHandshakeListener)
class _Handshaker(Protocol):
    """Records the negotiated ALPN protocol and the server certificate's pin once the TLS
    handshake completes (then aborts), or how the connection ended before that."""

    def __init__(self) -> None:
        self.done: defer.Deferred[tuple[bytes | None, bytes]] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:  # noqa: N802
        transport: Any = self.transport
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, transport.getPeerCertificate())
        self.done.callback((transport.negotiatedProtocol, certificate_pin(der)))
        transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.done.called:
            self.done.errback(reason)
        self.lost.callback(None)


class _Accepted(Protocol):
    """A server-side connection; counts its end."""

    def __init__(self, ended: list[None]) -> None:
        self.ended = ended

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.ended.append(None)


class ServerTlsTests(TestCase):
    """ReloadableServerTls: no legacy warning, ALPN offers, certificate swaps."""

    timeout = 30

    def setUp(self) -> None:
        self.certs = mint(os.path.abspath(self.mktemp()))

    def files(self, certs: Any) -> TlsFiles:
        return TlsFiles(pem_certificate=certs.cert, pem_key=certs.key)

    def start(self, tls: ReloadableServerTls) -> int:
        """A TLS listener on 127.0.0.1 port 0 (as the Gateway listens); its port."""
        self.accepted = 0
        self.ended: list[None] = []

        def accept() -> Protocol:
            self.accepted += 1
            return _Accepted(self.ended)

        port = listen(reactor, "127.0.0.1", 0, Factory.forProtocol(accept), "test",
                      Location("s.xml", 1), tls)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def handshake(self, port: int, creator: Any) -> tuple[bytes | None, bytes]:
        """(negotiated ALPN protocol, server certificate pin) of one client handshake."""
        client = _Handshaker()
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await endpoint.connect(Factory.forProtocol(lambda: client))
        result = await client.done
        await client.lost
        await wait_until(lambda: len(self.ended) == self.accepted, 5, "the server side's end")
        return result

    def offering(self, protocols: list[bytes] | None) -> Any:
        """A client verifying the test CA that offers ``protocols`` over ALPN."""
        with open(self.certs.ca, "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS("localhost", trustRoot=ca,
                                       acceptableProtocols=protocols)

    def test_declares_server_connection_creator(self) -> None:
        """ReloadableServerTls provides IOpenSSLServerConnectionCreator and starting a TLS
        listener emits no LegacyContextFactoryWarning (a bare getContext object did)."""
        tls = server_tls(self.files(self.certs))
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, tls))
        self.start(tls)
        self.assertEqual([w for w in self.flushWarnings()
                          if w["category"] is LegacyContextFactoryWarning], [])

        class Bare:
            def getContext(self) -> Any:  # noqa: N802
                return tls.options.getContext()

        tls_factory(Bare(), Factory.forProtocol(Protocol), is_client=False)
        self.assertEqual(len([w for w in self.flushWarnings()
                              if w["category"] is LegacyContextFactoryWarning]), 1)

    async def test_alpn_offers_complete_the_handshake(self) -> None:
        """A client offering other protocols (h2, http/1.1) completes the handshake with no
        protocol selected; one offering ours gets it; one offering none gets none.  The
        proxies' creators (pin and CA file) offer ours."""
        port = self.start(server_tls(self.files(self.certs)))
        pin = bytes.fromhex(self.certs.pin_hex)
        self.assertEqual(await self.handshake(port, self.offering([b"h2", b"http/1.1"])),
                         (None, pin))
        self.assertEqual(await self.handshake(port, self.offering([b"h2", ALPN_PROTOCOL])),
                         (ALPN_PROTOCOL, pin))
        self.assertEqual(await self.handshake(port, self.offering(None)), (None, pin))
        for creator in (client_connection_creator("localhost", None, pin),
                        client_connection_creator("localhost", self.certs.ca, None)):
            self.assertEqual(await self.handshake(port, creator), (ALPN_PROTOCOL, pin))

    async def test_update_swaps_the_certificate_for_new_connections(self) -> None:
        """After update(), new handshakes present the new certificate."""
        tls = server_tls(self.files(self.certs))
        port = self.start(tls)
        renewed = mint(os.path.abspath(self.mktemp()))
        old_pin, new_pin = bytes.fromhex(self.certs.pin_hex), bytes.fromhex(renewed.pin_hex)
        self.assertEqual(await self.handshake(
            port, client_connection_creator("localhost", None, old_pin)),
            (ALPN_PROTOCOL, old_pin))
        tls.update(server_context_factory(self.files(renewed)))
        self.assertEqual(await self.handshake(
            port, client_connection_creator("localhost", None, new_pin)),
            (ALPN_PROTOCOL, new_pin))


class RecordCounterTests(SynchronousTestCase):
    """tlslink.RecordCounter: whole TLS records in bytes fed in any pieces."""

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(0, 2**14 + 300), max_size=12), st.data())
    def test_counts_whole_records_however_cut(self, lengths: list[int], data: Any) -> None:
        """Records of any length, cut anywhere (in headers too): after each piece the sum of
        the counts is the number of records whose last byte was fed."""
        stream = b"".join(bytes([23, 3, 3]) + n.to_bytes(2, "big") + b"r" * n for n in lengths)
        ends = list(itertools.accumulate(5 + n for n in lengths))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        counter, counted, start = RecordCounter(), 0, 0
        for cut in [*cuts, len(stream)]:
            counted += counter.feed(stream[start:cut])
            start = cut
            self.assertEqual(counted, sum(1 for end in ends if end <= cut))

    def test_oversized_record_counted_at_its_header(self) -> None:
        """A header announcing more than OpenSSL accepts counts as a record at once, so that
        recv() reports the error instead of waiting for 64 KiB."""
        header = bytes([23, 3, 3]) + (MAX_RECORD_BODY + 1).to_bytes(2, "big")
        self.assertEqual(RecordCounter().feed(header), 1)
        self.assertEqual(RecordCounter().feed(bytes([23, 3, 3, 0, 0])), 1)  # empty: whole


@implementer(IHandshakeListener)
class _TlsApp(Protocol):
    """Records what a TLS transport delivers: the handshake, bytes, how it ended."""

    def __init__(self, on_handshake: bytes = b"", echo: bool = False) -> None:
        self.handshakes = 0
        self.received = bytearray()
        self.deliveries = 0
        self.lost: Any = None
        self.on_handshake = on_handshake
        self.echo = echo

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshakes += 1
        if self.on_handshake:
            cast(Any, self.transport).write(self.on_handshake)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        self.deliveries += 1
        if self.echo:
            cast(Any, self.transport).write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost = reason


@implementer(IPushProducer)
class _Producer:
    """Counts pause and resume calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:  # noqa: N802
        self.calls.append("pause")

    def resumeProducing(self) -> None:  # noqa: N802
        self.calls.append("resume")

    def stopProducing(self) -> None:  # noqa: N802
        self.calls.append("stop")


class _TlsBehaviour:
    """The behaviour links need of their TLS protocol, over iosim; run for tlslink's protocol
    on the standard library's ssl (the default), on pyOpenSSL (use_pyopenssl_tls) and for
    Twisted's TLSMemoryBIOProtocol (use_twisted_tls), so the three are shown equal."""

    engine = "stdlib"  # or "pyopenssl", "twisted"

    def setUp(self) -> None:
        test = cast(SynchronousTestCase, self)
        self.certs = mint(os.path.abspath(test.mktemp()))
        self.server_tls = server_tls(TlsFiles(pem_certificate=self.certs.cert,
                                              pem_key=self.certs.key))
        # Each class its engine, whatever the environment says (the suite runs both ways).
        test.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k not in ("TCPTUNNEL_TWISTED_TLS",
                                                "TCPTUNNEL_PYOPENSSL_TLS")})
        use_twisted_tls(self.engine == "twisted")
        use_pyopenssl_tls(self.engine == "pyopenssl")
        test.addCleanup(use_twisted_tls, False)
        test.addCleanup(use_pyopenssl_tls, False)
        stdlib = self.engine == "stdlib"
        self.tls_error: type[BaseException] = stdlib_ssl.SSLError if stdlib else SSL.Error
        self.name_error: type[BaseException] = (stdlib_ssl.SSLCertVerificationError if stdlib
                                                else VerificationError)

    def pair(self, server_app: _TlsApp | None = None, client_app: _TlsApp | None = None,
             hostname: str = "localhost", greet: bool = True,
             client_creator: Any = None) -> tuple[Any, Any, Any]:
        """(client TLS protocol, server TLS protocol, pump) around two _TlsApps."""
        server_app = self.sapp = server_app or _TlsApp()
        client_app = self.capp = client_app or _TlsApp()
        client_creator = client_creator or client_connection_creator(hostname, self.certs.ca,
                                                                     None)
        server_factory = tls_factory(self.server_tls, Factory.forProtocol(lambda: server_app),
                                     is_client=False)
        client_factory = tls_factory(client_creator, Factory.forProtocol(lambda: client_app),
                                     is_client=True)
        expected = TLSMemoryBIOFactory if self.engine == "twisted" else LinkTLSFactory
        cast(SynchronousTestCase, self).assertIsInstance(server_factory, expected)
        server = server_factory.buildProtocol(None)
        client = client_factory.buildProtocol(None)
        kind = {"stdlib": StdlibLinkTLSProtocol, "pyopenssl": LinkTLSProtocol,
                "twisted": TLSMemoryBIOProtocol}[self.engine]
        for side in (server, client):
            cast(SynchronousTestCase, self).assertIs(type(side), kind)
        pump = iosim.connect(server, iosim.FakeTransport(server, True),
                             client, iosim.FakeTransport(client, False), greet=greet)
        return client, server, pump

    def test_handshake_alpn_and_certificate(self) -> None:
        """The handshake completes once on each side, with our ALPN protocol; the client sees
        the server's certificate; the transports are ISSLTransport whose handle names the
        TLS version and cipher (what tcptunnel.mux logs): an SSL.Connection, or on the
        standard library's ssl its SSLObject behind the same two getters."""
        test = cast(SynchronousTestCase, self)
        client, server, _pump = self.pair()
        for side, app in ((client, self.capp), (server, self.sapp)):
            test.assertEqual(app.handshakes, 1)
            test.assertEqual(side.negotiatedProtocol, ALPN_PROTOCOL)
            test.assertTrue(ISSLTransport.providedBy(side))
            handle = side.getHandle()
            if self.engine == "stdlib":
                test.assertIsInstance(handle.ssl_object, stdlib_ssl.SSLObject)
            else:
                test.assertIsInstance(handle, SSL.Connection)
            test.assertEqual(handle.get_protocol_version_name(), "TLSv1.3")
            test.assertTrue(handle.get_cipher_name().startswith("TLS_"))
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, client.getPeerCertificate())
        test.assertEqual(certificate_pin(der).hex(), self.certs.pin_hex)

    def test_pin(self) -> None:
        """A pinning client completes the handshake with the pinned certificate (its chain
        not verified) and moves bytes; with another pin it never completes, delivers and
        sends nothing, and its connection ends with the TLS error."""
        test = cast(SynchronousTestCase, self)
        pin = bytes.fromhex(self.certs.pin_hex)
        client, _server, pump = self.pair(
            server_app=_TlsApp(echo=True),
            client_creator=client_connection_creator("localhost", None, pin))
        client.write(b"pinned")
        pump.flush()
        test.assertEqual((self.capp.handshakes, bytes(self.capp.received)), (1, b"pinned"))
        client, _server, pump = self.pair(
            client_app=_TlsApp(on_handshake=b"leak"),
            client_creator=client_connection_creator("localhost", None, b"\xab" * 32))
        client.write(b"early")
        pump.flush()
        test.assertEqual(self.capp.handshakes, 0)
        test.assertEqual(bytes(self.sapp.received), b"")
        self.capp.lost.trap(self.tls_error)
        test.assertIsNone(client.negotiatedProtocol)

    def test_bytes_both_ways_whole_and_in_order(self) -> None:
        """Writes made before the handshake, 1 byte, and 300 KiB (many records, cut into
        pieces by the transport) arrive whole and in order, both ways."""
        test = cast(SynchronousTestCase, self)
        server_app = _TlsApp(echo=True)
        client, _server, pump = self.pair(server_app, greet=False)
        client.write(b"early ")  # before the server's first flight
        pump.flush()
        big = os.urandom(300 * 1024)
        client.write(b"x")
        client.writeSequence([big, b"end"])
        pump.flush()
        expected = b"early x" + big + b"end"
        test.assertEqual(bytes(server_app.received), expected)
        test.assertEqual(bytes(self.capp.received), expected)

    def test_held_writes_pause_a_producer_until_the_handshake(self) -> None:
        """A write before the handshake is held and pauses a registered streaming producer,
        which is resumed when the handshake lets the write go out."""
        test = cast(SynchronousTestCase, self)
        client, _server, pump = self.pair(greet=False)
        producer = _Producer()
        client.registerProducer(producer, True)
        client.write(b"held")
        test.assertEqual(producer.calls, ["pause"])
        pump.flush()
        test.assertEqual(producer.calls, ["pause", "resume"])
        test.assertEqual(bytes(self.sapp.received), b"held")

    def test_close_notify_both_ways(self) -> None:
        """loseConnection sends close_notify; the peer answers; both sides end cleanly
        (ConnectionDone) and a write after loseConnection goes nowhere."""
        test = cast(SynchronousTestCase, self)
        client, _server, pump = self.pair()
        client.write(b"last")
        client.loseConnection()
        client.write(b"dropped")
        pump.flush()
        test.assertEqual(bytes(self.sapp.received), b"last")
        for app in (self.capp, self.sapp):
            app.lost.trap(error.ConnectionDone)

    def test_lose_connection_waits_for_the_producer(self) -> None:
        """With a producer registered, writes after loseConnection still go out; close_notify
        follows when the producer unregisters."""
        test = cast(SynchronousTestCase, self)
        client, _server, pump = self.pair()
        client.registerProducer(_Producer(), True)
        client.loseConnection()
        client.write(b"still")
        pump.flush()
        test.assertIsNone(self.sapp.lost)
        client.unregisterProducer()
        pump.flush()
        test.assertEqual(bytes(self.sapp.received), b"still")
        self.sapp.lost.trap(error.ConnectionDone)

    def test_eof_without_close_notify_is_connection_lost(self) -> None:
        """The TCP connection closing under TLS (no close_notify) is ConnectionLost: a cut
        link, not a clean end."""
        _client, server, pump = self.pair()
        server.transport.loseConnection()  # under TLS
        pump.flush()
        self.capp.lost.trap(error.ConnectionLost)

    def test_abort_delivers_nothing_more(self) -> None:
        """After abortConnection nothing more reaches the protocol."""
        test = cast(SynchronousTestCase, self)
        client, server, pump = self.pair()
        server.write(b"late")
        client.abortConnection()
        pump.flush()
        test.assertEqual(bytes(self.capp.received), b"")
        test.assertIsNotNone(self.capp.lost)

    def test_corrupt_record_is_a_tls_error(self) -> None:
        """A record that does not decrypt ends the connection with the SSL error."""
        test = cast(SynchronousTestCase, self)
        client, server, pump = self.pair()
        client.write(b"secret")
        data = bytearray(client.transport.getOutBuffer())
        data[-1] ^= 1
        server.dataReceived(bytes(data))
        pump.flush()
        test.assertEqual(bytes(self.sapp.received), b"")
        self.sapp.lost.trap(self.tls_error)

    def test_wrong_hostname_fails_verification(self) -> None:
        """Canary of what ClientTLSOptions expects of the protocol given to
        clientConnectionForTLS: its certificate check calls failVerification, whose reason
        (service_identity's VerificationError) reaches connectionLost; no byte is
        delivered.  On the standard library's ssl, OpenSSL's host name check refuses it in
        the handshake (a name mismatch, as is_name_mismatch tells the proxy)."""
        test = cast(SynchronousTestCase, self)
        client, _server, _pump = self.pair(hostname="other.example")
        client.write(b"never")
        test.assertEqual(self.capp.handshakes, 0)
        self.capp.lost.trap(self.name_error)
        test.assertEqual(is_name_mismatch(self.capp.lost.value), self.engine == "stdlib")
        test.assertEqual(bytes(self.sapp.received), b"")
        test.assertEqual(test.flushLoggedErrors(), [])  # not "while verifying certificate"


class LinkTlsBehaviourTests(_TlsBehaviour, SynchronousTestCase):
    """tcptunnel.tlslink.StdlibLinkTLSProtocol (the default) has the behaviour links need."""

    engine = "stdlib"

    def test_one_delivery_per_transport_read(self) -> None:
        """The records of one transport read reach the protocol in one dataReceived (Twisted's
        delivers each record separately)."""
        server_app = _TlsApp()
        client, _server, pump = self.pair(server_app)
        client.write(b"a" * 100_000)  # 7 records
        pump.flush()
        self.assertEqual(bytes(server_app.received), b"a" * 100_000)
        self.assertEqual(server_app.deliveries, 1)


class PyOpenSSLLinkTlsBehaviourTests(LinkTlsBehaviourTests):
    """tcptunnel.tlslink.LinkTLSProtocol on pyOpenSSL (use_pyopenssl_tls) has the same
    behaviour."""

    engine = "pyopenssl"


class TwistedTlsBehaviourTests(_TlsBehaviour, SynchronousTestCase):
    """Twisted's TLSMemoryBIOProtocol (use_twisted_tls) has the same behaviour."""

    engine = "twisted"


class MixedEngineTests(SynchronousTestCase):
    """The standard library's engine and pyOpenSSL's speak to each other, and the client
    sends the server name (SNI)."""

    def test_stdlib_client_pyopenssl_server(self) -> None:
        """A standard library client against a pyOpenSSL server (and the other way round):
        handshake, ALPN, bytes both ways; the pyOpenSSL server sees the SNI name."""
        certs = mint(os.path.abspath(self.mktemp()))
        tls = server_tls(TlsFiles(pem_certificate=certs.cert, pem_key=certs.key))
        creator = client_connection_creator("localhost", certs.ca, None)
        for client_stdlib in (True, False):
            server: Any = LinkTLSFactory(tls, False, Factory.forProtocol(_TlsApp),
                                         stdlib=not client_stdlib).buildProtocol(None)
            client: Any = LinkTLSFactory(creator, True, Factory.forProtocol(_TlsApp),
                                         stdlib=client_stdlib).buildProtocol(None)
            server_app, client_app = server.wrappedProtocol, client.wrappedProtocol
            server_app.echo = True
            self.assertEqual(type(client) is StdlibLinkTLSProtocol, client_stdlib)
            self.assertEqual(type(server) is StdlibLinkTLSProtocol, not client_stdlib)
            pump = iosim.connect(server, iosim.FakeTransport(server, True),
                                 client, iosim.FakeTransport(client, False))
            client.write(b"mixed")
            pump.flush()
            self.assertEqual(bytes(client_app.received), b"mixed")
            self.assertEqual(server.negotiatedProtocol, ALPN_PROTOCOL)
            if client_stdlib:
                self.assertEqual(server.getHandle().get_servername(), b"localhost")


class TlsChoiceTests(SynchronousTestCase):
    """Which TLS protocol tls_factory gives, and the switches back to Twisted's."""

    def setUp(self) -> None:
        certs = mint(os.path.abspath(self.mktemp()))
        self.creator = client_connection_creator("localhost", certs.ca, None)
        self.addCleanup(use_twisted_tls, False)
        self.addCleanup(use_pyopenssl_tls, False)
        self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k not in ("TCPTUNNEL_TWISTED_TLS",
                                                "TCPTUNNEL_PYOPENSSL_TLS")})

    def kind(self, wrapped: Any = None) -> type:
        return type(tls_factory(self.creator, wrapped or Factory.forProtocol(Protocol),
                                is_client=True))

    def test_default_is_tlslink(self) -> None:
        """By default links use tlslink's factory, on the standard library's ssl."""
        self.assertIs(self.kind(), LinkTLSFactory)
        factory = tls_factory(self.creator, Factory.forProtocol(Protocol), is_client=True)
        self.assertIs(factory.protocol, StdlibLinkTLSProtocol)

    def test_pyopenssl_switch(self) -> None:
        """TCPTUNNEL_PYOPENSSL_TLS=1, or use_pyopenssl_tls(), keeps tlslink's protocol on
        pyOpenSSL; use_pyopenssl_tls(False) lets the environment decide again."""
        def protocol() -> type:
            factory = tls_factory(self.creator, Factory.forProtocol(Protocol), is_client=True)
            return cast(type, factory.protocol)

        self.patch(os, "environ", {**os.environ, "TCPTUNNEL_PYOPENSSL_TLS": "1"})
        self.assertIs(protocol(), LinkTLSProtocol)
        self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k != "TCPTUNNEL_PYOPENSSL_TLS"})
        self.assertIs(protocol(), StdlibLinkTLSProtocol)
        use_pyopenssl_tls()
        self.assertIs(protocol(), LinkTLSProtocol)
        use_pyopenssl_tls(False)
        self.assertIs(protocol(), StdlibLinkTLSProtocol)

    def test_environment_switches_back(self) -> None:
        """TCPTUNNEL_TWISTED_TLS=1 gives Twisted's TLS protocol, without its write
        aggregation (no BufferingTLSTransport)."""
        self.patch(os, "environ", {**os.environ, "TCPTUNNEL_TWISTED_TLS": "1"})
        factory = tls_factory(self.creator, Factory.forProtocol(Protocol), is_client=True)
        self.assertIsInstance(factory, TLSMemoryBIOFactory)
        self.assertIs(factory.protocol, TLSMemoryBIOProtocol)
        self.assertNotEqual(factory.protocol, BufferingTLSTransport)

    def test_use_twisted_tls(self) -> None:
        """use_twisted_tls() switches, use_twisted_tls(False) switches back."""
        use_twisted_tls()
        self.assertTrue(issubclass(self.kind(), TLSMemoryBIOFactory))
        use_twisted_tls(False)
        self.assertIs(self.kind(), LinkTLSFactory)

    def test_websocket_links_too(self) -> None:
        """Under WebSocket the TLS is ours too (its protocol does not ask autobahn for the
        TLS channel binding that only a TLSMemoryBIOProtocol gives; test_websocket runs
        wss:// end to end)."""
        from tcptunnel.websocket import ProxyWebSocketFactory

        factory = ProxyWebSocketFactory(Factory.forProtocol(Protocol), "wss://localhost/t",
                                        5.0, reactor)
        self.assertIs(self.kind(factory), LinkTLSFactory)
