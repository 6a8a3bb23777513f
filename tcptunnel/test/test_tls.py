"""Tests for tcptunnel.tls: certificate loading errors and client verification modes."""

from __future__ import annotations

import datetime
import os

from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel.config import TlsFiles
from tcptunnel.test._certs import mint
from tcptunnel.test._harness import EchoProtocol, Tunnel, binding_port, connect, listen, sleep
from tcptunnel.tls import TlsSetupError, load_server_identity, server_context_factory


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
        echo = await listen(self, EchoProtocol)
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

    async def test_wrong_pin_never_logs_in(self) -> None:
        """A proxy whose pin does not match never logs in."""
        _tunnel, pc, ps, _ = await self.tunnel_with('useSsl="1" certificatePin="' + "ab" * 32
                                                   + '"')
        await sleep(1.5)
        self.assertIsNone(pc.link)  # type: ignore[attr-defined]
        self.assertIsNone(ps.link)  # type: ignore[attr-defined]

    async def test_untrusted_certificate_never_logs_in(self) -> None:
        """Without a CA file the system store does not trust a test CA: no login."""
        _tunnel, pc, _ps, _ = await self.tunnel_with('useSsl="1" serverName="localhost"')
        await sleep(1.5)
        self.assertIsNone(pc.link)  # type: ignore[attr-defined]

    async def test_wrong_hostname_never_logs_in(self) -> None:
        """A certificate for another name is refused even when its CA is trusted."""
        _tunnel, pc, _ps, _ = await self.tunnel_with(
            'useSsl="1" caFile="{c.ca}" serverName="other.example"')
        await sleep(1.5)
        self.assertIsNone(pc.link)  # type: ignore[attr-defined]
