"""End-to-end: Gateway, Proxy-Server and Proxy-Client on real loopback sockets."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tcptunnel.test._harness import (
    AnswerAfterEofProtocol,
    EchoProtocol,
    Tunnel,
    binding_port,
    connect,
    listen,
    reserve_port,
    wait_until,
)


class TunnelTestsMixin:
    """The same end-to-end checks, over plain TCP and over TLS."""

    tls = False

    def make_tunnel(self) -> Tunnel:
        tunnel = Tunnel(self, tls=self.tls)  # type: ignore[arg-type]
        self.addCleanup(tunnel.close)  # type: ignore[attr-defined]
        tunnel.start_gateway()
        return tunnel

    async def echo_tunnel(self) -> tuple[Tunnel, int]:
        """A running tunnel whose only binding leads to an echo target."""
        echo = await listen(self, EchoProtocol)  # type: ignore[arg-type]
        tunnel = self.make_tunnel()
        client = tunnel.start_proxy_client(allowed=f'<Endpoint host="127.0.0.1" port="{echo}"/>')
        server = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(client, server)
        return tunnel, binding_port(server)

    async def test_bulk_both_ways(self) -> None:
        """10 MiB through an echo target arrive back exact (SHA-256), then a clean close."""
        _tunnel, port = await self.echo_tunnel()
        client = await connect(port)
        payload = os.urandom(10 * 1024 * 1024)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        how = await client.ended
        self.assertEqual(how, "clean")  # type: ignore[attr-defined]
        self.assertEqual(hashlib.sha256(client.received).hexdigest(),  # type: ignore[attr-defined]
                         hashlib.sha256(payload).hexdigest())

    async def test_many_concurrent(self) -> None:
        """100 concurrent connections with interleaved writes each get exactly their bytes."""
        _tunnel, port = await self.echo_tunnel()
        clients = await defer.gatherResults([defer.ensureDeferred(connect(port))
                                             for _ in range(100)])
        expected: dict[int, bytes] = {}
        for round_ in range(3):
            for i, client in enumerate(clients):
                chunk = f"[{i}:{round_}]".encode() * (50 + i)
                expected[i] = expected.get(i, b"") + chunk
                client.transport.write(chunk)
            # Each round goes out once the last one came back: rounds of all 100 streams
            # interleave on the link instead of one stream's bytes arriving in one piece.
            await wait_until(lambda: all(len(c.received) == len(expected[i])
                                         for i, c in enumerate(clients)),
                             10, f"round {round_} to come back")
        for client in clients:
            client.transport.loseWriteConnection()
        results = await defer.gatherResults([c.ended for c in clients])
        self.assertEqual(set(results), {"clean"})  # type: ignore[attr-defined]
        for i, client in enumerate(clients):
            self.assertEqual(bytes(client.received), expected[i])  # type: ignore[attr-defined]

    async def test_half_close(self) -> None:
        """The client shuts down its write side; the target answers after EOF; all arrives."""
        target = await listen(self, AnswerAfterEofProtocol)  # type: ignore[arg-type]
        tunnel = self.make_tunnel()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", target)])
        await tunnel.ready(pc, ps)
        client = await connect(binding_port(ps))
        request = os.urandom(300_000)
        client.transport.write(request)
        client.transport.loseWriteConnection()
        how = await client.ended
        self.assertEqual(how, "clean")  # type: ignore[attr-defined]
        digest, _, body = bytes(client.received).partition(b"\n")
        self.assertEqual(digest.decode(), hashlib.sha256(request).hexdigest())  # type: ignore[attr-defined]
        self.assertEqual(body, b"z" * (1024 * 1024))  # type: ignore[attr-defined]

    async def test_refused_target_resets_client(self) -> None:
        """A target that refuses the connection makes the local client see a reset."""
        refusing = reserve_port(self)  # type: ignore[arg-type]
        tunnel = self.make_tunnel()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", refusing)])
        await tunnel.ready(pc, ps)
        client = await connect(binding_port(ps))
        how = await client.ended
        self.assertEqual(how, "reset")  # type: ignore[attr-defined]

    async def test_denied_target_resets_client(self) -> None:
        """A target outside the allow-list is refused: the local client sees a reset."""
        echo = await listen(self, EchoProtocol)  # type: ignore[arg-type]
        tunnel = self.make_tunnel()
        pc = tunnel.start_proxy_client(allowed='<Endpoint host="10.0.0.1" port="22"/>')
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        client = await connect(binding_port(ps))
        client.transport.write(b"never delivered")
        how = await client.ended
        self.assertEqual(how, "reset")  # type: ignore[attr-defined]
        self.assertEqual(bytes(client.received), b"")  # type: ignore[attr-defined]

    async def test_two_proxy_servers(self) -> None:
        """Two Proxy-Servers of one session tunnel at the same time."""
        echo = await listen(self, EchoProtocol)  # type: ignore[arg-type]
        tunnel = self.make_tunnel()
        pc = tunnel.start_proxy_client()
        ps1 = tunnel.start_proxy_server([("127.0.0.1", echo)])
        ps2 = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps1, ps2)
        a, b = await connect(binding_port(ps1)), await connect(binding_port(ps2))
        a.transport.write(b"from one")
        b.transport.write(b"from two")
        a.transport.loseWriteConnection()
        b.transport.loseWriteConnection()
        await defer.gatherResults([a.ended, b.ended])
        self.assertEqual((bytes(a.received), bytes(b.received)),  # type: ignore[attr-defined]
                         (b"from one", b"from two"))

    async def test_gateway_restart(self) -> None:
        """After the Gateway restarts, both proxies reconnect by themselves and tunnel again."""
        echo = await listen(self, EchoProtocol)  # type: ignore[arg-type]
        tunnel = self.make_tunnel()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        open_client = await connect(binding_port(ps))
        open_client.transport.write(b"x")
        await wait_until(lambda: bool(open_client.received), what="echo")
        await tunnel.stop_gateway()
        how = await open_client.ended
        self.assertEqual(how, "reset")  # type: ignore[attr-defined]
        await wait_until(lambda: not ps.partner_available, what="the link to go down")
        tunnel.start_gateway()
        await tunnel.ready(pc, ps, timeout=20)
        client = await connect(binding_port(ps))
        client.transport.write(b"after restart")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")  # type: ignore[attr-defined]
        self.assertEqual(bytes(client.received), b"after restart")  # type: ignore[attr-defined]

    async def test_proxy_client_away(self) -> None:
        """Without a Proxy-Client new local connections are reset; they work once it is back."""
        echo = await listen(self, EchoProtocol)  # type: ignore[arg-type]
        tunnel = self.make_tunnel()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        await tunnel.stop(pc)
        await wait_until(lambda: not ps.partner_available, what="the partner to leave")
        client = await connect(binding_port(ps))
        self.assertEqual(await client.ended, "reset")  # type: ignore[attr-defined]
        pc2 = tunnel.start_proxy_client()
        await tunnel.ready(pc2, ps)
        client = await connect(binding_port(ps))
        client.transport.write(b"back")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")  # type: ignore[attr-defined]
        self.assertEqual(bytes(client.received), b"back")  # type: ignore[attr-defined]


class PlainTunnelTests(TunnelTestsMixin, TestCase):
    """Links over plain TCP."""

    timeout = 60


class TlsTunnelTests(TunnelTestsMixin, TestCase):
    """Links over TLS with certificates minted at test time (CA file + hostname check)."""

    tls = True
    timeout = 60
