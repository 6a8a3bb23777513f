"""Tests for tcptunnel.tls: certificate loading errors, client verification modes, and the
reloadable server TLS of listeners (interface, ALPN, certificate swap)."""

from __future__ import annotations

import datetime
import os
import re
from typing import Any, cast

from OpenSSL import crypto
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.protocols._tls_legacy import LegacyContextFactoryWarning
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
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
        for link in links:
            transport = link.transport
            self.assertIsInstance(transport, TLSMemoryBIOProtocol)
            self.assertNotIsInstance(transport, BufferingTLSTransport)

    async def assert_refused_at_tls(self, tunnel: Tunnel, *proxies: Any) -> None:
        """Wait until each proxy's first try ended in a failed TLS handshake (the reason its
        link gives), then check that none logged in and that the Gateway saw no login."""
        failures: list[Any] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            # A name mismatch (service_identity's VerificationError) ends the link after the
            # handshake and is logged by its repr; every other refusal is an SSL.Error.
            if re.search("TLS handshake with the Gateway failed|VerificationError",
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
