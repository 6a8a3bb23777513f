"""Gateways behind Debian's HAProxy (issue 20): three ``twistd`` Gateway processes behind
HAProxy in ``mode tcp``, hashing on the TLS server name (``balance hash req.ssl_sni``,
``hash-type consistent``) and sending PROXY v2 headers from 127.0.0.2, with every proxy in
this process connecting to HAProxy from 127.0.0.1, each session under its own name
(``s<id>.gw.test``) and a wildcard certificate.

Sessions: twelve (a Proxy-Client and two Proxy-Servers each) for the sharding test, six
for the kill and drain test, to keep the module near 30 s on two cores.  The failover list
without a balancer is tested in test_scaling (in one process, the same code).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tcptunnel._proxyproto import ClientAddress, build_v2
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.test._certs import mint
from tcptunnel.test._harness import (
    ChildProcess,
    EchoProtocol,
    Tunnel,
    TwistdProcess,
    binding_port,
    reserve_port,
    spawn_twistd,
    wait_until,
)
from tcptunnel.test.test_scaling import Echoer


def _program(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


HAPROXY = _program("haproxy")

HAPROXY_CONF = """\
global
  log stdout format raw local0
defaults
  mode tcp
  log global
  option redispatch
  retries 3
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  timeout check 1s
frontend tunnel
  bind 127.0.0.1:{port}
  tcp-request inspect-delay 5s
  # The condition makes HAProxy wait for the whole ClientHello before reading its name.
  tcp-request content set-var(sess.sni) req.ssl_sni if {{ req.ssl_hello_type 1 }}
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
  log-format "sni=%[var(sess.sni)] server=%s client=%ci:%cp"
  default_backend gateways
backend gateways
  balance hash var(sess.sni)
  hash-type consistent
{servers}
"""
SERVER_LINE = ("  server g{i} 127.0.0.1:{port} source 127.0.0.2 send-proxy-v2 "
               "check inter 500ms fall 2 rise 1\n")


def accepts(port: int) -> bool:
    """Whether something accepts on 127.0.0.1:port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    """The Gateway processes, HAProxy, an echo target and the sessions' proxies."""

    def __init__(self, test: TestCase, gateways: int, sessions: int) -> None:
        self.test = test
        self.count = gateways
        self.session_ids = list(range(1, sessions + 1))
        self.folder = os.path.abspath(test.mktemp())
        self.certs = mint(os.path.join(self.folder, "certs"), hostname="*.gw.test")
        self.ports = [reserve_port(test) for _ in range(gateways)]
        self.status_ports = [reserve_port(test) for _ in range(gateways)]
        self.front = reserve_port(test)
        self.processes: list[TwistdProcess] = []
        self.tunnel = Tunnel(test)
        test.addCleanup(self.tunnel.close)
        self.clients: dict[int, ProxyClientService] = {}
        self.servers: dict[int, list[ProxyServerService]] = {}

    def gateway_xml(self, i: int) -> str:
        """Gateway i: the same sessions as all, PROXY headers from 127.0.0.2 only."""
        sessions = "".join(
            f'<Session id="{s}" proxyClientPassword="client-{s}-pw" '
            f'proxyServerPassword="server-{s}-pw"/>' for s in self.session_ids)
        return (f'<Instance type="gateway" drainTimeout="20"><Listener ip="127.0.0.1" '
                f'port="{self.ports[i]}" certificatePemFilePath="{self.certs.cert}" '
                f'certificatePemKeyFilePath="{self.certs.key}" '
                f'acceptProxyProtocol="127.0.0.2/32"/>{sessions}</Instance>'
                f'<Status listenIp="127.0.0.1" listenPort="{self.status_ports[i]}"/>')

    async def start(self) -> None:
        """Everything up, every session logged in with its partners."""
        self.processes = [spawn_twistd(self.test, self.gateway_xml(i))
                          for i in range(self.count)]
        # The balancer only once they listen: an HAProxy server whose first checks fail
        # starts DOWN, and sessions would land on the others until it rises.
        await wait_until(lambda: all(accepts(p) for p in (*self.ports, *self.status_ports)),
                         30, "the Gateways and their status pages to listen")
        await self.start_balancer()
        listen: Any = reactor.listenTCP
        self.echo = listen(0, Factory.forProtocol(EchoProtocol), interface="127.0.0.1")
        self.test.addCleanup(self.echo.stopListening)
        port = self.echo.getHost().port
        for s in self.session_ids:
            common = (f'host="127.0.0.1" port="{self.front}" useSsl="true" '
                      f'caFile="{self.certs.ca}" serverName="s{s}.gw.test" maxRetryDelay="2"')
            self.clients[s] = self.tunnel._start_proxy(ProxyClientService, (
                f'<Instance type="proxy-client" {common}><Session id="{s}" '
                f'password="client-{s}-pw"/><AllowedTargetEndpoints><Endpoint '
                f'host="127.0.0.1" port="{port}"/></AllowedTargetEndpoints></Instance>'))
            self.servers[s] = [self.tunnel._start_proxy(ProxyServerService, (
                f'<Instance type="proxy-server" {common}><Session id="{s}" '
                f'password="server-{s}-pw"><Binding listenIp="127.0.0.1" listenPort="0" '
                f'targetHost="127.0.0.1" targetPort="{port}"/></Session></Instance>'))
                for _ in range(2)]
        await self.ready(self.session_ids)

    async def start_balancer(self) -> None:
        """HAProxy in front of the Gateways, listening on ``self.front``."""
        config = os.path.join(self.folder, "haproxy.cfg")
        with open(config, "w", encoding="ascii") as f:
            f.write(HAPROXY_CONF.format(port=self.front, servers="".join(
                SERVER_LINE.format(i=i, port=port) for i, port in enumerate(self.ports))))
        self.haproxy = ChildProcess()
        assert HAPROXY is not None
        reactor.spawnProcess(self.haproxy, HAPROXY, [HAPROXY, "-db", "-f", config],
                             env=dict(os.environ))
        self.test.addCleanup(self.haproxy.kill)
        await wait_until(lambda: accepts(self.front), 30, "HAProxy to listen")

    def balancer_log(self) -> str:
        """The balancer's output, for failure messages."""
        return self.haproxy.output.decode(errors="replace")

    def proxies(self, s: int) -> list[Any]:
        """A session's three proxies."""
        return [self.clients[s], *self.servers[s]]

    async def ready(self, sessions: list[int], timeout: float = 30) -> None:
        """Every proxy of these sessions is logged in and sees a partner (the Gateways'
        and the balancer's output in the failure)."""
        try:
            await wait_until(lambda: all(p.partner_available for s in sessions
                                         for p in self.proxies(s)), timeout,
                             f"the proxies of sessions {sessions} to log in with partners")
        except AssertionError as e:
            logs = "\n".join(f"--- Gateway {i}:\n{p.log()[-3000:]}"
                              for i, p in enumerate(self.processes))
            raise AssertionError(f"{e}\n{logs}\n--- the balancer:\n"
                                 f"{self.balancer_log()[-2000:]}") from None

    async def status(self, i: int) -> dict[str, Any]:
        """Gateway i's /status document."""
        agent = Agent(reactor)
        response = await agent.request(
            b"GET", f"http://127.0.0.1:{self.status_ports[i]}/status".encode())
        document: dict[str, Any] = json.loads(await readBody(response))
        return document

    async def owners(self, alive: list[int]) -> dict[int, list[int]]:
        """Per Gateway index, the sessions its /status shows with links."""
        found: dict[int, list[int]] = {}
        for i in alive:
            instance = next(x for x in (await self.status(i))["instances"]
                            if x["role"] == "gateway")
            found[i] = sorted(s["id"] for s in instance["sessions"] if s["peers"])
        return found

    async def echo_through(self, server: ProxyServerService, text: bytes = b"hello") -> Echoer:
        """A connection through the server's Binding with its first echo."""
        echoer = Echoer()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", binding_port(server)).connect(
            Factory.forProtocol(lambda: echoer))
        assert echoer.transport is not None
        echoer.transport.write(text)
        await wait_until(lambda: echoer.received == text or echoer.ended is not None, 10,
                         "an echo")
        return echoer

    async def works(self, s: int) -> bool:
        """One echo through each Proxy-Server of session s."""
        for server in self.servers[s]:
            echoer = await self.echo_through(server)
            ok = echoer.received == b"hello"
            echoer.transport.loseConnection()  # type: ignore[union-attr]
            if not ok:
                return False
        return True

    async def sharded(self) -> dict[int, list[int]]:
        """Check that every session works, each whole on exactly one Gateway, whose /status
        names only its own sessions, with the proxies' own addresses (127.0.0.1, from the
        PROXY header) as its log does, and no login from the balancer's 127.0.0.2 (HAProxy's
        health checks, a v2 LOCAL header, keep it).  Returns the owners."""
        test = self.test
        for s in self.session_ids:
            test.assertTrue(await self.works(s), f"session {s}")
        everyone = list(range(self.count))
        owners = await self.owners(everyone)
        test.assertEqual(sorted(s for sessions in owners.values() for s in sessions),
                         self.session_ids)  # each session on exactly one Gateway
        local = {s: {f"127.0.0.1:{p.link.transport.getHost().port}" for p in self.proxies(s)}
                 for s in self.session_ids}
        for i in everyone:
            instance = next(x for x in (await self.status(i))["instances"]
                            if x["role"] == "gateway")
            for session in instance["sessions"]:
                if session["peers"]:
                    test.assertEqual((session["proxy_client"], session["proxy_servers"]),
                                     (True, 2))
                    test.assertEqual({p["address"] for p in session["peers"]},
                                     local[session["id"]])
            log = self.processes[i].log()
            for s in owners[i]:
                for address in local[s]:
                    test.assertIn(f"Link {address}: authenticated for session {s}", log)
            test.assertNotRegex(log, r"Link 127\.0\.0\.2:\d+: authenticated")
        return owners

    async def kill_one(self) -> tuple[int, list[int]]:
        """kill -9 the Gateway with the most sessions while a stream runs in every session
        on the others: its sessions work again through another within 35 s, and the
        running streams are not cut.  Returns the victim and the Gateways alive."""
        test = self.test
        owners = await self.owners(list(range(self.count)))
        victim = max(owners, key=lambda i: len(owners[i]))
        others = [i for i in range(self.count) if i != victim and owners[i]]
        test.assertTrue(others, f"{owners}\n{self.balancer_log()[-3000:]}")
        # A running stream in every session not on the victim.
        running = {s: await self.echo_through(self.servers[s][0])
                   for i in others for s in owners[i]}
        moved = owners[victim]
        lost = {p: p.stats["links_lost",] for s in moved for p in self.proxies(s)}
        killed_at = reactor.seconds()
        self.processes[victim].transport.signalProcess("KILL")  # type: ignore[union-attr]
        await self.processes[victim].ended
        # The balancer passes the close on: until each proxy has seen its link go, its old
        # link still counts as logged in with a partner.
        await wait_until(lambda: all(p.stats["links_lost",] > n for p, n in lost.items()), 35,
                         "the killed Gateway's proxies to see their links lost")
        await self.ready(moved, timeout=35 - (reactor.seconds() - killed_at))
        for s in moved:
            test.assertTrue(await self.works(s), f"session {s} after the kill")
        test.assertLess(reactor.seconds() - killed_at, 35)
        for s, echoer in running.items():
            test.assertIsNone(echoer.ended, f"session {s}'s stream was cut")
            echoer.transport.write(b"!")  # type: ignore[union-attr]
        await wait_until(lambda: all(e.received == b"hello!" for e in running.values()), 10,
                         "the running streams to echo after the kill")
        for echoer in running.values():
            echoer.transport.loseConnection()  # type: ignore[union-attr]
        return victim, [i for i in range(self.count) if i != victim]


class HaproxyShardingTests(TestCase):
    """Sessions sharded by SNI over three Gateway processes."""

    if HAPROXY is None:
        skip = ("haproxy is not installed (Debian: apt-get install haproxy): could not run "
                "the tests with a real balancer")

    timeout = 60

    async def test_sessions_spread_and_addresses(self) -> None:
        """Twelve sessions all work; they spread over all three Gateways, each session
        whole on one; each /status names only its own sessions, with the proxies' own
        addresses (127.0.0.1, from the PROXY header), as the logs do; a header from an
        untrusted address and a missing one from HAProxy's address are refused."""
        cluster = Cluster(self, gateways=3, sessions=12)
        await cluster.start()
        owners = await cluster.sharded()
        self.assertTrue(all(owners[i] for i in range(3)), owners)

        # A PROXY header from 127.0.0.1 (not in acceptProxyProtocol), straight to Gateway 0.
        header = build_v2(ClientAddress.from_hosts("192.0.2.1", 1, "127.0.0.1", 2))
        closed: list[bool] = []

        class Send(Protocol):
            def __init__(self, data: bytes) -> None:
                self.data = data

            def connectionMade(self) -> None:  # noqa: N802
                self.transport.write(self.data)  # type: ignore[union-attr]

            def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
                closed.append(True)

        async def refused(data: bytes, source: str, line: str) -> None:
            # Lines about unauthenticated peers share a budget (10/s, burst 50) that the
            # logins and HAProxy's checks have drawn on: a dropped line is not a failure,
            # so refuse again until the line is seen (each try a real refusal).
            deadline = reactor.seconds() + 15
            while line not in cluster.processes[0].log():
                self.assertLess(reactor.seconds(), deadline, f"no log line {line!r}")
                before = len(closed)
                await TCP4ClientEndpoint(reactor, "127.0.0.1", cluster.ports[0],
                                         bindAddress=(source, 0)).connect(
                    Factory.forProtocol(lambda: Send(data)))
                await wait_until(lambda before=before: len(closed) > before, 10,  # type: ignore[misc]
                                 f"the refusal ({line})")
                await cluster.status(0)  # a round trip to the Gateway: its log is written

        await refused(header, "127.0.0.1", "connection from 127.0.0.1:")
        self.assertIn("it sent a PROXY header, but its address is not in the Listener's "
                      "acceptProxyProtocol", cluster.processes[0].log())
        # No header from 127.0.0.2, HAProxy's address: a TLS ClientHello's first bytes.
        await refused(b"\x16\x03\x01\x00\xa0\x01", "127.0.0.2",
                      "connection from 127.0.0.2:")
        self.assertIn("no PROXY header (acceptProxyProtocol requires one from this address)",
                      cluster.processes[0].log())

    async def test_kill_and_drain(self) -> None:
        """kill -9 one Gateway: its sessions work again through another within 35 s, and a
        running stream of a session on another Gateway is not reset.  Then SIGUSR2 another:
        all its sessions move at once, the one with a running stream too (a new stream goes
        through its new Gateway), while that stream keeps working on the drained one and
        ends cleanly; then the draining links close, and no proxy counts a lost link.
        Restarting the killed one in between moves no session a second time."""
        cluster = Cluster(self, gateways=3, sessions=6)
        await cluster.start()
        victim, alive = await cluster.kill_one()
        owners = await cluster.owners(alive)

        # Restart the killed Gateway on its port: once HAProxy has it up again, no session
        # moves a second time (links stay where they are; only new connections hash to it).
        lost = {s: sum(p.stats["links_lost",] for p in cluster.proxies(s))
                for s in cluster.session_ids}
        cluster.processes[victim] = spawn_twistd(self, cluster.gateway_xml(victim))
        up = f"Server gateways/g{victim} is UP"
        await wait_until(lambda: up in cluster.haproxy.output.decode(errors="replace"), 20,
                         "HAProxy to see the restarted Gateway up")
        self.assertEqual((await cluster.owners([victim]))[victim], [])
        self.assertEqual({s: sum(p.stats["links_lost",] for p in cluster.proxies(s))
                          for s in cluster.session_ids}, lost)

        # Drain the Gateway with most sessions; keep one stream running in one of them.
        drained = max(alive, key=lambda i: len(owners[i]))
        (remaining,) = [i for i in alive if i != drained]
        moving = owners[drained]
        busy = moving[0]
        stream = await cluster.echo_through(cluster.servers[busy][0])
        proxies = [p for s in moving for p in cluster.proxies(s)]
        before = {p: (p.stats["links_drained",], p.stats["links_lost",]) for p in proxies}
        cluster.processes[drained].transport.signalProcess(signal.SIGUSR2)  # type: ignore[union-attr]
        started = reactor.seconds()
        # Every session moves at once, the busy one too (make-before-break): its proxies log
        # in elsewhere while its stream still runs on the drained Gateway.
        await wait_until(lambda: all(p.stats["links_drained",] > before[p][0] for p in proxies),
                         10, "every session of the drained Gateway to be told DRAINING")
        await cluster.ready(moving, timeout=10)
        self.assertLess(reactor.seconds() - started, 8)
        self.assertIsNone(stream.ended)
        self.assertTrue(await cluster.works(busy), "the busy session through its new Gateway")
        stream.transport.write(b" again")  # type: ignore[union-attr]
        await wait_until(lambda: stream.received == b"hello again", 10,
                         "the running stream to echo while draining")
        stream.transport.loseConnection()  # type: ignore[union-attr]
        await wait_until(lambda: stream.ended is not None, 10, "the stream's end")
        self.assertEqual(stream.ended, "ConnectionDone")
        await wait_until(lambda: all(p.draining_link is None for p in proxies), 10,
                         "the draining links to close once the stream ended")
        self.assertEqual({p: p.stats["links_lost",] for p in proxies},
                         {p: lost for p, (_drained, lost) in before.items()})
        await cluster.ready(cluster.session_ids, timeout=15)
        after = await cluster.owners([remaining, victim])
        self.assertEqual(sorted(after[remaining] + after[victim]), cluster.session_ids)
        self.assertEqual((await cluster.owners([drained]))[drained], [])
        for s in cluster.session_ids:
            self.assertTrue(await cluster.works(s), f"session {s} after the drain")
        self.assertIn("Drained: no links left", cluster.processes[drained].log())
        self.assertIn("Draining: no new logins", cluster.processes[drained].log())


