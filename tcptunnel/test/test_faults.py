"""Faults: killed processes, silent links, misbehaving targets and clients, churn, floods.

Each test says what the local application sees and what recovers. Processes that must die are
real ``twistd -n tcptunnel`` processes; the rest runs in this process on loopback.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tcptunnel import _frames as fr
from tcptunnel._frames import FrameType, Reason
from tcptunnel.test._harness import (
    NS,
    EchoProtocol,
    RecordingClient,
    Tunnel,
    TwistdProcess,
    binding_port,
    child_environment,
    connect,
    listen,
    raw_peer,
    reserve_port,
    sleep,
    twistd_command,
    wait_until,
)


def open_fds(pid: int) -> int:
    """Number of open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class ThreeProcesses:
    """Gateway, Proxy-Client and Proxy-Server as separate twistd processes."""

    def __init__(self, test: TestCase, target: int) -> None:
        self.test = test
        self.work = os.path.abspath(test.mktemp())
        os.makedirs(self.work)
        self.gateway_port = reserve_port(test)
        self.binding = reserve_port(test)
        timing = 'keepaliveInterval="1" keepaliveTimeout="2"'
        proxy = (f'host="127.0.0.1" port="{self.gateway_port}" maxRetryDelay="2" {timing}')
        self.files = {
            "gateway": f'<Instance type="gateway" {timing}><Listener ip="127.0.0.1" '
                       f'port="{self.gateway_port}"/><Session id="1" proxyClientPassword="a" '
                       'proxyServerPassword="b"/></Instance>',
            "proxy-client": f'<Instance type="proxy-client" {proxy}><Session id="1" '
                            'password="a"/></Instance>',
            "proxy-server": f'<Instance type="proxy-server" {proxy}><Session id="1" '
                            f'password="b"><Binding listenIp="127.0.0.1" '
                            f'listenPort="{self.binding}" targetHost="127.0.0.1" '
                            f'targetPort="{target}"/></Session></Instance>',
        }
        self.processes: dict[str, TwistdProcess] = {}
        for role in self.files:
            self.start(role)

    def start(self, role: str) -> TwistdProcess:
        path = os.path.join(self.work, f"{role}.xml")
        with open(path, "w") as f:
            f.write(f"<Settings {NS}>{self.files[role]}</Settings>")
        process = TwistdProcess()
        reactor.spawnProcess(
            process, twistd_command()[0],
            twistd_command("-n", "--pidfile=", "--logfile=-", "tcptunnel", "--config", path),
            env=child_environment(), path=self.work)
        self.test.addCleanup(process.kill)
        self.processes[role] = process
        return process

    def pid(self, role: str) -> int:
        return int(self.processes[role].transport.pid)  # type: ignore[union-attr]

    async def kill(self, role: str) -> None:
        process = self.processes[role]
        process.transport.signalProcess("KILL")  # type: ignore[union-attr]
        await process.ended

    async def working(self, timeout: float = 30.0) -> float:
        """Wait until a connection through the tunnel echoes; return the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            # A poll with a deadline: each probe is a new connection, refused while the
            # binding is not listening and reset while the link is down.
            try:
                client = await connect(self.binding)
            except Exception:  # the binding is not listening yet
                await sleep(0.05)
                continue
            client.transport.write(b"probe")
            client.transport.loseWriteConnection()
            if await client.ended == "clean" and bytes(client.received) == b"probe":
                return time.monotonic() - started
            await sleep(0.05)
        raise AssertionError("the tunnel did not come back:\n" + "\n".join(
            f"--- {role}\n{p.log()[-3000:]}" for role, p in self.processes.items()))

    def logs(self) -> str:
        return "\n".join(f"--- {r}\n{p.log()[-2000:]}" for r, p in self.processes.items())

    def mark(self) -> dict[str, int]:
        """How much each process has printed so far (for ``logged``)."""
        return {role: len(process.output) for role, process in self.processes.items()}

    async def logged(self, role: str, text: str, since: dict[str, int],
                     timeout: float = 20.0) -> None:
        """Wait until ``role`` prints ``text`` after the ``mark()`` ``since``."""
        await wait_until(lambda: text.encode() in self.processes[role].output[since[role]:],
                         timeout, f"{role} to log {text!r}")


class KillTests(TestCase):
    """A role killed with SIGKILL and restarted."""

    timeout = 120

    async def bulk_clients(self, port: int, count: int, size: int) -> list[tuple[Any, bytes]]:
        clients = []
        for _ in range(count):
            client = await connect(port)
            payload = os.urandom(size)
            client.transport.write(payload)
            clients.append((client, payload))
        return clients

    def assert_no_truncation(self, clients: list[tuple[Any, bytes]]) -> None:
        """Every connection is either complete (clean close, exact bytes) or reset; what it
        received is always an exact prefix of what was sent."""
        for client, payload in clients:
            received = bytes(client.received)
            self.assertEqual(received, payload[: len(received)], "corrupted bytes")
            if client.how == "clean":
                self.assertEqual(len(received), len(payload), "clean EOF with truncated data")
            else:
                self.assertEqual(client.how, "reset")

    async def kill_and_restart(self, role: str) -> None:
        echo = await listen(self, EchoProtocol)
        tunnel = ThreeProcesses(self, echo)
        await tunnel.working()
        watched = [r for r in ("gateway", "proxy-client", "proxy-server") if r != role]
        # The probe's sockets may still be closing here: at most one more descriptor per
        # process in the baseline, against 20 streams' worth of a leak.
        before = {r: (open_fds(tunnel.pid(r)), rss_mib(tunnel.pid(r))) for r in watched}
        clients = await self.bulk_clients(tunnel.binding, 20, 4 * 1024 * 1024)
        await wait_until(lambda: all(c.received for c, _ in clients), 20,
                         "every transfer to be under way")
        mark = tunnel.mark()
        await tunnel.kill(role)
        for client, _ in clients:
            if not client.ended.called:  # some are reset already
                client.transport.loseWriteConnection()
        await wait_until(lambda: all(c.ended.called for c, _ in clients), 20, "clients to end")
        self.assert_no_truncation(clients)
        self.assertTrue(any(c.how == "reset" for c, _ in clients), "nothing was interrupted")
        # Restart only once the others have noticed: proxies retrying a dead Gateway, or the
        # Proxy-Server told its partner left.
        if role == "gateway":
            for proxy in ("proxy-client", "proxy-server"):
                await tunnel.logged(proxy, "Unable to connect to the Gateway", mark)
        else:
            await tunnel.logged("proxy-server", "Partner available: no", mark)
        tunnel.start(role)
        took = await tunnel.working(timeout=30)
        self.assertLess(took, 15, tunnel.logs())

        def leaks() -> list[str]:
            found = []
            for r in watched:
                fds, rss = open_fds(tunnel.pid(r)), rss_mib(tunnel.pid(r))
                if fds > before[r][0] + 2:
                    found.append(f"{r} leaks file descriptors: {before[r][0]} -> {fds}")
                if rss >= before[r][1] + 40:
                    found.append(f"{r} grew from {before[r][1]:.0f} to {rss:.0f} MiB")
            return found

        # The interrupted streams' sockets close within a few reactor turns of each process.
        try:
            await wait_until(lambda: not leaks(), 10, "descriptors and memory to settle")
        except AssertionError:
            self.fail("; ".join(leaks()))

    async def test_gateway_killed(self) -> None:
        """Gateway SIGKILLed during 20 bulk transfers and restarted 2 s later: interrupted
        connections are reset, never cut cleanly; both proxies reconnect; no fd leak."""
        await self.kill_and_restart("gateway")

    async def test_proxy_client_killed(self) -> None:
        """The same with the Proxy-Client killed and restarted."""
        await self.kill_and_restart("proxy-client")

    async def test_proxy_server_killed(self) -> None:
        """Proxy-Server killed: its local clients see resets; after a restart it works."""
        echo = await listen(self, EchoProtocol)
        tunnel = ThreeProcesses(self, echo)
        await tunnel.working()
        clients = await self.bulk_clients(tunnel.binding, 5, 2 * 1024 * 1024)
        mark = tunnel.mark()
        await tunnel.kill("proxy-server")
        await wait_until(lambda: all(c.ended.called for c, _ in clients), 20, "clients to end")
        self.assert_no_truncation(clients)
        await tunnel.logged("proxy-client", "Partner available: no", mark)
        tunnel.start("proxy-server")
        self.assertLess(await tunnel.working(timeout=30), 15)


class Freezer(Protocol):
    """One direction-pair of a relay that can stop forwarding without closing."""

    peer: Freezer | None = None
    frozen = False

    def __init__(self) -> None:
        self.early: list[bytes] = []  # what arrives before the other side is connected

    def connectionMade(self) -> None:  # noqa: N802
        if self.peer is not None and self.peer.early:
            self.peer.dataReceived(b"".join(self.peer.early))
            self.peer.early.clear()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if Freezer.frozen:
            return
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


async def freezing_relay(test: TestCase, target: int) -> tuple[int, list[Freezer]]:
    """A relay to ``target`` whose connections can all be frozen (Freezer.frozen = True)."""
    fronts: list[Freezer] = []

    def build() -> Freezer:
        front = Freezer()
        fronts.append(front)

        async def dial() -> None:
            back = Freezer()
            back.peer = front
            front.peer = back
            await TCP4ClientEndpoint(reactor, "127.0.0.1", target).connect(
                Factory.forProtocol(lambda: back))

        front.dialing = defer.ensureDeferred(dial())  # type: ignore[attr-defined]
        return front

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(build))
    test.addCleanup(port.stopListening)
    return port.getHost().port, fronts


class SilentLinkTests(TestCase):
    """A link that stops carrying bytes without closing."""

    timeout = 60

    async def test_silent_link_detected(self) -> None:
        """Keepalive detects a frozen link within interval + timeout at both ends; the proxy
        reconnects and the tunnel works again."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self, gateway_attributes='keepaliveInterval="1" keepaliveTimeout="1"')
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        relay, fronts = await freezing_relay(self, tunnel.gateway_port)
        real_port = tunnel.gateway_port
        tunnel.gateway_port = relay  # the Proxy-Server goes through the relay
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)],
                                       extra='keepaliveInterval="1" keepaliveTimeout="1"')
        tunnel.gateway_port = real_port
        pc = tunnel.start_proxy_client()
        await tunnel.ready(pc, ps)
        first_link = ps.link
        assert tunnel.gateway is not None
        gateway = tunnel.gateway.gateway
        gateway_side = next(lk for lk in gateway.links if lk.role_name == "proxy-server")
        client = await connect(binding_port(ps))
        Freezer.frozen = True
        self.addCleanup(setattr, Freezer, "frozen", False)
        started = time.monotonic()
        await wait_until(lambda: ps.link is not first_link, 10, "the frozen link to be dropped")
        detected = time.monotonic() - started
        self.assertLess(detected, 4.5)
        self.assertEqual(await client.ended, "reset")
        assert first_link is not None
        await wait_until(lambda: gateway_side not in gateway.links, 5,
                         "the Gateway to drop its side")
        # Whichever end's deadline fired first closed the link; the other saw it close.
        self.assertIn("KEEPALIVE_TIMEOUT",
                      first_link.close_reason + " " + gateway_side.close_reason)
        Freezer.frozen = False
        await tunnel.ready(pc, ps, timeout=15)
        again = await connect(binding_port(ps))
        again.transport.write(b"back")
        again.transport.loseWriteConnection()
        self.assertEqual(await again.ended, "clean")
        self.assertGreaterEqual(len(fronts), 2)
        await wait_until(lambda: len(gateway.links) == 2, 10, "the Gateway to drop the old link")


@implementer(IHalfCloseableProtocol)
class Misbehaving(Protocol):
    """Targets that misbehave in one of several ways, chosen by the first byte received."""

    # Connections still open; a target that never reads never learns that the far end
    # closed, and a paused socket is not among the reactor's readers, so nothing else sees it.
    open: set[Misbehaving] = set()

    def connectionMade(self) -> None:  # noqa: N802
        self.mode: bytes | None = None
        Misbehaving.open.add(self)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        Misbehaving.open.discard(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        transport: Any = self.transport
        if self.mode is None:
            self.mode = data[:1]
            if self.mode == b"N":  # never read again
                transport.pauseProducing()
            elif self.mode == b"R":  # send 1 MiB, then reset
                transport.write(RESET_PAYLOAD)
                reactor.callLater(0.2, transport.abortConnection)
            elif self.mode == b"H":  # answer and half-close first
                transport.write(b"early answer")
                transport.loseWriteConnection()
            data = data[1:]
        if self.mode == b"H":
            self.received = getattr(self, "received", b"") + data

    def readConnectionLost(self) -> None:  # noqa: N802
        if self.mode == b"H":
            HALF_CLOSE_RESULTS.append(getattr(self, "received", b""))
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass


async def close_misbehaving() -> None:
    """Abort the misbehaving targets still open and wait until they are closed."""
    for target in list(Misbehaving.open):
        target.transport.abortConnection()  # type: ignore[union-attr]
    await wait_until(lambda: not Misbehaving.open, 5, "the misbehaving targets to close")


RESET_PAYLOAD = os.urandom(1024 * 1024)
HALF_CLOSE_RESULTS: list[bytes] = []


class StreamFaultTests(TestCase):
    """Faults of one stream touch only that stream."""

    timeout = 60

    async def tunnel(self) -> tuple[Tunnel, int, int]:
        bad = await listen(self, Misbehaving)
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self)
        self.addCleanup(tunnel.close)
        self.addCleanup(close_misbehaving)  # before the tunnel closes (cleanups run LIFO)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", bad), ("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        return tunnel, binding_port(ps, 0), binding_port(ps, 1)

    async def echo_works(self, port: int) -> None:
        client = await connect(port)
        payload = os.urandom(500_000)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")
        self.assertEqual(hashlib.sha256(client.received).digest(),
                         hashlib.sha256(payload).digest())

    async def test_target_never_reads(self) -> None:
        """A target that never reads stalls only its stream; closing the client resets it."""
        tunnel, bad, echo = await self.tunnel()
        ps = tunnel.services[-1]
        stuck = await connect(bad)
        stuck.transport.write(b"N" + b"x" * 8_000_000)
        # The stream has spent its window: it is stalled when the echo runs.
        await wait_until(lambda: ps.link is not None and ps.link.core.blocked_sent > 0, 10,
                         "the stuck stream to spend its window")
        await self.echo_works(echo)
        self.assertFalse(stuck.ended.called, f"the stalled stream ended ({stuck.how}) after "
                         f"{len(stuck.received)} bytes")
        stuck.transport.abortConnection()
        await stuck.ended

    async def test_target_resets_mid_transfer(self) -> None:
        """A target that resets mid-transfer: the client sees a reset; what it got is an exact
        prefix of what the target sent."""
        _tunnel, bad, echo = await self.tunnel()
        client = await connect(bad)
        client.transport.write(b"R")
        self.assertEqual(await client.ended, "reset")
        received = bytes(client.received)
        self.assertEqual(received, RESET_PAYLOAD[: len(received)])
        await self.echo_works(echo)

    async def test_target_half_closes_first(self) -> None:
        """A target that half-closes first: the client gets the answer and EOF and can still
        send; the target receives it all."""
        _tunnel, bad, _echo = await self.tunnel()
        client = await connect(bad, close_on_eof=False)
        client.transport.write(b"H")
        await wait_until(lambda: client.eof, 10, "EOF from the target")
        self.assertEqual(bytes(client.received), b"early answer")
        HALF_CLOSE_RESULTS.clear()
        client.transport.write(b"late request")
        client.transport.loseWriteConnection()
        await wait_until(lambda: bool(HALF_CLOSE_RESULTS), 10, "the target to get EOF")
        self.assertEqual(HALF_CLOSE_RESULTS, [b"late request"])
        self.assertEqual(await client.ended, "clean")

    async def test_client_disappears(self) -> None:
        """A local client that aborts mid-transfer resets its stream only."""
        _tunnel, _bad, echo = await self.tunnel()
        leaving = await connect(echo)
        leaving.transport.write(os.urandom(3_000_000))
        await wait_until(lambda: bool(leaving.received), 10, "the echo to flow")
        leaving.transport.abortConnection()
        await self.echo_works(echo)

    def idle(self, tunnel: Tunnel) -> bool:
        """Whether no stream is left at the Gateway or either proxy."""
        assert tunnel.gateway is not None
        return (all(not link.routes for link in tunnel.gateway.gateway.links)
                and all(service.link is not None and not service.link.streams
                        and not service.link.core.streams for service in tunnel.services[1:]))

    async def test_churn_leaves_nothing_behind(self) -> None:
        """500 connections opened and closed: stream tables and file descriptors return to
        their idle values."""
        tunnel, _bad, echo = await self.tunnel()
        await self.echo_works(echo)
        await wait_until(lambda: self.idle(tunnel), 10, "the first stream to end everywhere")
        fds_before = len(os.listdir("/proc/self/fd"))
        for batch in range(10):
            clients: list[RecordingClient] = await defer.gatherResults(
                [defer.ensureDeferred(connect(echo)) for _ in range(50)])
            for i, client in enumerate(clients):
                client.transport.write(b"%d-%d" % (batch, i))
                if i % 3 == 0:
                    client.transport.abortConnection()
                else:
                    client.transport.loseWriteConnection()
            await defer.gatherResults([c.ended for c in clients])
        # The last resets and FINs cross the tunnel after the clients' ends; then the tables
        # are checked one by one below, for the message.
        await wait_until(lambda: self.idle(tunnel) and len(os.listdir("/proc/self/fd"))
                         <= fds_before + 2, 10, "stream tables and descriptors to settle")
        assert tunnel.gateway is not None
        for link in tunnel.gateway.gateway.links:
            self.assertEqual(link.routes, {})
        for service in tunnel.services[1:]:
            assert service.link is not None
            self.assertEqual(service.link.streams, {})
            self.assertEqual(service.link.core.streams, {})
        self.assertLessEqual(len(os.listdir("/proc/self/fd")), fds_before + 2)


class FloodTests(TestCase):
    """Floods at the Gateway while a healthy session keeps working."""

    timeout = 60

    async def test_silent_connections(self) -> None:
        """300 connections that never speak: those beyond the unauthenticated limit are closed
        at once, the rest at the login deadline; a healthy session works throughout."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self, gateway_attributes='loginTimeout="1.5" maxUnauthenticatedLinks="200"')
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        started = reactor.seconds()
        peers = [await raw_peer(tunnel.gateway_port) for _ in range(300)]
        # "At once": 100 are closed while even the first peer is 0.3 s short of its 1.5 s
        # login deadline, so none of these closes can be the deadline's.
        await wait_until(lambda: sum(p.closed.called for p in peers) >= 100,
                         max(0.0, started + 1.2 - reactor.seconds()),
                         "the links over the limit to be closed")
        client = await connect(binding_port(ps))
        client.transport.write(b"still fine")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")
        await wait_until(lambda: all(p.closed.called for p in peers), 5, "the login deadline")

    async def test_data_after_fin_resets_stream(self) -> None:
        """An authenticated peer sending DATA after its FIN gets that stream reset."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self)
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        await wait_until(lambda: pc.link is not None, what="login")
        peer = await raw_peer(tunnel.gateway_port)
        self.assertTrue(await peer.login(1, fr.ROLE_PROXY_SERVER, "server-pw"))
        peer.transport.write(fr.build_open(1, fr.OpenRequest(65536, 0, "127.0.0.1", echo)))
        await wait_until(lambda: bool(peer.of_type(FrameType.OPEN_RESULT)), what="open")
        peer.transport.write(fr.build_fin(1) + fr.encode(FrameType.DATA, 1, b"late"))
        await wait_until(lambda: bool(peer.of_type(FrameType.RESET)), what="RESET")
        self.assertEqual(fr.parse_reset(peer.of_type(FrameType.RESET)[0].payload)[0],
                         Reason.PROTOCOL_ERROR)
        self.assertFalse(peer.closed.called)
        peer.transport.loseConnection()

    async def test_plain_bytes_on_tls_listener(self) -> None:
        """Plain tcptunnel bytes on a TLS listener are closed; TLS links keep working."""
        echo = await listen(self, EchoProtocol)
        tunnel = Tunnel(self, tls=True)
        self.addCleanup(tunnel.close)
        tunnel.start_gateway()
        pc = tunnel.start_proxy_client()
        ps = tunnel.start_proxy_server([("127.0.0.1", echo)])
        await tunnel.ready(pc, ps)
        peer = await raw_peer(tunnel.gateway_port)
        peer.transport.write(fr.build_hello() + b"\x00" * 100)
        await wait_until(peer.closed_called, 10, "the plain peer to be closed")
        client = await connect(binding_port(ps))
        client.transport.write(b"tls ok")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")



class AcceptErrorTests(TestCase):
    """Running out of file descriptors at the Gateway."""

    timeout = 60

    async def test_emfile_does_not_spin_or_kill_the_listener(self) -> None:
        """With its descriptor limit exhausted by idle connections, the Gateway neither spins
        the CPU nor stops listening: once they go away, a proxy logs in again."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        port = reserve_port(self)
        path = os.path.join(work, "gateway.xml")
        with open(path, "w") as f:
            f.write(f'<Settings {NS}><Instance type="gateway" loginTimeout="30" '
                    f'maxUnauthenticatedLinks="1000" maxUnauthenticatedLinksPerAddress="1000">'
                    f'<Listener ip="127.0.0.1" port="{port}"/>'
                    '<Session id="1" proxyClientPassword="a" proxyServerPassword="b"/>'
                    "</Instance></Settings>")
        starter = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (80, 80)); "
                   "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()")
        process = TwistdProcess()
        reactor.spawnProcess(
            process, twistd_command()[0],
            [twistd_command()[0], "-c", starter, "-n", "--pidfile=", "--logfile=-",
             "tcptunnel", "--config", path], env=child_environment(), path=work)
        self.addCleanup(process.kill)
        await wait_until(lambda: b"Gateway listener started" in process.output, 20, "start")
        pid = int(process.transport.pid)  # type: ignore[union-attr]
        idle_fds = open_fds(pid)
        hogs = []
        for _ in range(120):  # more than the 80 descriptors the Gateway may open
            hogs.append(await raw_peer(port))
        await wait_until(lambda: b"EMFILE" in process.output, 10, "the Gateway to hit EMFILE")

        def cpu_seconds() -> float:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu_seconds()
        # Here the sleep is the point: nothing may happen for a while.  A Gateway spinning
        # on accept errors burns 0.5-1 CPU second per second even on a busy 2-core machine;
        # an idle one a few milliseconds.
        await sleep(1.0)
        self.assertLess(cpu_seconds() - before, 0.25, "the Gateway spins on accept errors")
        for hog in hogs:
            hog.transport.abortConnection()
        await wait_until(lambda: open_fds(pid) <= idle_fds + 2, 10,
                         "the Gateway to close the hogs' descriptors")
        peer = await raw_peer(port)
        self.assertTrue(await peer.login(1, fr.ROLE_PROXY_CLIENT, "a"))
        peer.transport.loseConnection()
