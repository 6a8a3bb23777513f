"""Observability: /metrics, /status, the status page (in headless Chromium), JSON logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import sys
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from zope.interface import provider

from tcptunnel import __version__
from tcptunnel import _frames as fr
from tcptunnel.config import GatewayConfig, load_settings, parse_settings
from tcptunnel.gateway import GatewayService
from tcptunnel.proxy import ProxyService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.status import (
    StatusService,
    TunnelCollector,
    host_allowed,
    human_bytes,
    human_duration,
    render_page,
    snapshot,
)
from tcptunnel.tap import TunnelService
from tcptunnel.test._harness import (
    NS,
    EchoProtocol,
    TwistdProcess,
    child_environment,
    connect,
    listen,
    raw_peer,
    reserve_port,
    twistd_command,
    wait_until,
)


async def get(url: str) -> tuple[int, bytes]:
    """GET a URL on loopback: (status code, body)."""
    response = await Agent(reactor).request(b"GET", url.encode())
    return response.code, await readBody(response)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class StatusTests(TestCase):
    """The status server of a process running all three roles."""

    timeout = 60

    async def start(self, proxy_client: bool = True,
                    refused_target: int | None = None) -> tuple[TunnelService, int, int]:
        """A process running a Gateway, a Proxy-Server with a Binding to an echo target (and
        a second Binding to ``refused_target`` when given) and, unless ``proxy_client`` is
        False, the session's Proxy-Client; logged in.  (service, status port, Binding port)"""
        echo = await listen(self, EchoProtocol)
        gateway, binding = reserve_port(self), reserve_port(self)
        client = (f'<Instance type="proxy-client" host="127.0.0.1" port="{gateway}">'
                  '<Session id="7" password="secret-pc"/></Instance>') if proxy_client else ""
        refused = (f'<Binding listenIp="127.0.0.1" listenPort="0" targetHost="127.0.0.1" '
                   f'targetPort="{refused_target}"/>') if refused_target is not None else ""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                f'<Settings {NS}><Status listenPort="0"/>'
                f'<Instance type="gateway"><Listener ip="127.0.0.1" port="{gateway}"/>'
                '<Session id="7" proxyClientPassword="secret-pc" proxyServerPassword="secret-ps"/>'
                f'</Instance>{client}'
                f'<Instance type="proxy-server" host="127.0.0.1" port="{gateway}">'
                f'<Session id="7" password="secret-ps"><Binding listenIp="127.0.0.1" '
                f'listenPort="{binding}" targetHost="127.0.0.1" targetPort="{echo}"/>{refused}'
                "</Session></Instance></Settings>")
        service = TunnelService(load_settings(path), reactor)
        service.startService()
        self.addCleanup(lambda: defer.maybeDeferred(service.stopService))
        proxies = [c for c in service if isinstance(c, ProxyService)]
        if proxy_client:
            await wait_until(lambda: all(c.partner_available for c in proxies), 15, "login")
        else:
            await wait_until(lambda: all(c.link is not None for c in proxies), 15, "login")
        status = service.getServiceNamed("status")
        return service, status.port.getHost().port, binding

    async def transfer(self, binding: int, size: int) -> None:
        client = await connect(binding)
        client.transport.write(b"m" * size)
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")

    async def test_metrics_move(self) -> None:
        """/metrics counts logins, streams and bytes, and the counters move with traffic."""
        _service, port, binding = await self.start()
        code, body = await get(f"http://127.0.0.1:{port}/metrics")
        self.assertEqual(code, 200)
        before = body.decode()
        self.assertEqual(metric(before, "tcptunnel_links", role="proxy-client", state="ready",
                                instance="0"), 1)
        self.assertEqual(metric(before, "tcptunnel_sessions_with_proxy_client"), 1)
        self.assertEqual(metric(before, "tcptunnel_logins_total", result="ok", instance="0"), 2)
        live = await connect(binding)
        live.transport.write(b"l" * 200_000)
        await wait_until(lambda: len(live.received) == 200_000, 10, "the echo")
        during = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        self.assertEqual(metric(during, "tcptunnel_streams_open", role="gateway"), 1)
        self.assertEqual(metric(during, "tcptunnel_streams_open", role="proxy-server"), 1)
        self.assertEqual(metric(during, "tcptunnel_session_bytes_total", session="7",
                                direction="to_client"), 200_000)
        live.transport.loseWriteConnection()
        self.assertEqual(await live.ended, "clean")
        await self.transfer(binding, 100_000)
        after = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        self.assertEqual(metric(after, "tcptunnel_streams_open", role="gateway"), 0)
        self.assertEqual(metric(after, "tcptunnel_streams_opened_total", session="7")
                         - metric(before, "tcptunnel_streams_opened_total", session="7"), 2)
        self.assertEqual(metric(after, "tcptunnel_session_bytes_total", session="7",
                                direction="to_client"), 300_000)
        self.assertEqual(metric(after, "tcptunnel_session_bytes_total", session="7",
                                direction="to_server"), 300_000)
        self.assertEqual(metric(after, "tcptunnel_streams_ended_total", role="proxy-server",
                                how="closed"), 2)
        self.assertEqual(metric(after, "tcptunnel_proxy_bytes_total", role="proxy-server",
                                direction="sent"), 300_000)
        self.assertNotIn("secret", after)

    async def test_links_drained(self) -> None:
        """A drained link counts in tcptunnel_links_drained_total, next to links_lost: 0 for
        both proxies at first, 1 each once their Gateway drained them, and links_lost stays
        0 (a drained link is not a lost one)."""
        service, port, _binding = await self.start()
        before = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        for index, role in ((1, "proxy-client"), (2, "proxy-server")):
            self.assertIn(f'tcptunnel_links_drained_total{{instance="{index}",role="{role}"}} '
                          "0.0", before)
        proxies = [c for c in service if isinstance(c, ProxyService)]
        (gateway,) = [c for c in service if isinstance(c, GatewayService)]
        await gateway.drain()
        await wait_until(lambda: all(p.stats["links_drained",] == 1 and p.draining_link is None
                                     for p in proxies), 15, "both proxies' links drained")
        after = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        for role in ("proxy-client", "proxy-server"):
            self.assertEqual(metric(after, "tcptunnel_links_drained_total", role=role), 1)
            self.assertEqual(metric(after, "tcptunnel_links_lost_total", role=role), 0)

    async def test_status_json(self) -> None:
        """/status lists instances, listeners, the session and its peers, without secrets."""
        _service, port, binding = await self.start()
        await self.transfer(binding, 1000)
        code, body = await get(f"http://127.0.0.1:{port}/status")
        self.assertEqual(code, 200)
        self.assertNotIn(b"secret", body)
        status = json.loads(body)
        gateway, client, server = status["instances"]
        self.assertEqual([gateway["role"], client["role"], server["role"]],
                         ["gateway", "proxy-client", "proxy-server"])
        (session,) = gateway["sessions"]
        self.assertEqual((session["id"], session["proxy_client"], session["proxy_servers"]),
                         (7, True, 1))
        self.assertEqual(sorted(p["role"] for p in session["peers"]),
                         ["proxy-client", "proxy-server"])
        self.assertTrue(all(p["address"].startswith("127.0.0.1:") for p in session["peers"]))
        self.assertEqual(session["bytes_to_client"], 1000)
        self.assertTrue(client["connected"] and server["connected"])
        self.assertEqual(server["bindings"][0]["listen"], f"127.0.0.1:{binding}")
        self.assertEqual(server["bytes_sent"], 1000)
        self.assertEqual((client["state"], server["state"]), ("ready", "ready"))
        self.assertEqual((gateway["unauthenticated_slots"]["taken"], gateway["queued_bytes"]),
                         (0, 0))

    async def test_proxy_server_without_partner(self) -> None:
        """A Proxy-Server logged in to a session without Proxy-Client is "no_partner" in
        /status, amber "no Proxy-Client" on the page (not green) and 0 partners in /metrics;
        with the partner it is "ready"."""
        _service, port, _binding = await self.start(proxy_client=False)
        status = json.loads((await get(f"http://127.0.0.1:{port}/status"))[1])
        (server,) = [i for i in status["instances"] if i["role"] == "proxy-server"]
        self.assertEqual((server["connected"], server["partners"], server["state"]),
                         (True, 0, "no_partner"))
        page = (await get(f"http://127.0.0.1:{port}/"))[1].decode()
        self.assertIn('<span class="warn">connected, no Proxy-Client (local connections are '
                      "refused)</span>", page)
        self.assertNotIn('<span class="ok">connected</span>', page)
        metrics = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        self.assertIn('tcptunnel_proxy_partners{instance="1",role="proxy-server"} 0.0', metrics)
        _service, port, _binding = await self.start()
        page = (await get(f"http://127.0.0.1:{port}/"))[1].decode()
        self.assertEqual(page.count('<span class="ok">connected</span>'), 2)  # both proxies
        self.assertNotIn('class="warn"', page)
        metrics = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        self.assertEqual(metric(metrics, "tcptunnel_proxy_partners", role="proxy-server"), 1)

    async def test_live_streams_count_their_bytes(self) -> None:
        """The proxies' byte counts include a stream still open, in /status and /metrics,
        and its bytes are not counted again once it ends."""
        service, port, binding = await self.start()
        live = await connect(binding)
        live.transport.write(b"l" * 200_000)
        await wait_until(lambda: len(live.received) == 200_000, 10, "the echo")
        status = json.loads((await get(f"http://127.0.0.1:{port}/status"))[1])
        _gateway, client, server = status["instances"]
        self.assertEqual(server["streams"], 1)
        self.assertEqual((server["bytes_sent"], server["bytes_received"]), (200_000, 200_000))
        self.assertEqual((client["bytes_sent"], client["bytes_received"]), (200_000, 200_000))
        during = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        self.assertEqual(metric(during, "tcptunnel_proxy_bytes_total", role="proxy-server",
                                direction="received"), 200_000)
        live.transport.loseWriteConnection()
        self.assertEqual(await live.ended, "clean")
        await wait_until(lambda: all(c.link is not None and not c.link.streams for c in service
                                     if isinstance(c, ProxyService)),
                         10, "both ends of the stream to finish")
        after = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        for role in ("proxy-server", "proxy-client"):
            for direction in ("sent", "received"):
                self.assertEqual(metric(after, "tcptunnel_proxy_bytes_total", role=role,
                                        direction=direction), 200_000, (role, direction))

    async def test_stream_end_labels_are_codes(self) -> None:
        """tcptunnel_streams_ended_total says how with a code and the Reason name apart: a
        clean close, a client's RST (reset here, reset by the far end) and a refused target
        (open failed at the Proxy-Client, reset by the far end at the Proxy-Server); no
        label value is a sentence, and every real end has a code (never "other")."""
        ends: list[str] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("event") == "stream_ended":
                ends.append(event["how"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        service, port, binding = await self.start(refused_target=reserve_port(self))
        await self.transfer(binding, 1000)
        app = await connect(binding)
        app.transport.write(b"r" * 100_000)
        await wait_until(lambda: len(app.received) > 0, 10, "the first echoed bytes")
        app.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                             struct.pack("ii", 1, 0))
        app.transport.abortConnection()  # a TCP RST
        server = next(c for c in service if isinstance(c, ProxyServerService))
        refused = await connect(int(server.ports[1].getHost().port))
        self.assertEqual(await refused.ended, "reset")
        await wait_until(lambda: len(ends) == 6, 10, "both ends of three streams")
        text = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        samples = {tuple(re.findall(r'(\w+)="([^"]*)"', line)): float(line.rsplit(" ", 1)[1])
                   for line in text.splitlines()
                   if line.startswith("tcptunnel_streams_ended_total{")}
        seen = {(dict(labels)["role"], dict(labels)["how"], dict(labels)["reason"]): count
                for labels, count in samples.items()}
        self.assertEqual(seen, {
            ("proxy-server", "closed", ""): 1, ("proxy-client", "closed", ""): 1,
            ("proxy-server", "reset_local", "CONNECTION_RESET"): 1,
            ("proxy-client", "reset_remote", "CONNECTION_RESET"): 1,
            ("proxy-client", "open_failed", "REFUSED"): 1,
            ("proxy-server", "reset_remote", "REFUSED"): 1,
        }, ends)
        for labels in samples:
            for name, value in labels:
                self.assertRegex(value, r"^[A-Za-z0-9_.-]*$", f"{name}={value!r}")

    async def test_process_info(self) -> None:
        """/status and the page name the version, host name and start time of the process;
        /metrics has tcptunnel_info and the standard process_* metrics."""
        before = time.time()
        _service, port, _binding = await self.start()
        status = json.loads((await get(f"http://127.0.0.1:{port}/status"))[1])
        process = status["process"]
        self.assertEqual((process["version"], process["host"], process["pid"]),
                         (__version__, socket.gethostname(), os.getpid()))
        self.assertTrue(before - 1 <= process["started_unix"] <= time.time(), process)
        self.assertRegex(process["started"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertGreaterEqual(process["uptime_s"], 0)
        page = (await get(f"http://127.0.0.1:{port}/"))[1].decode()
        self.assertIn(f"version {__version__} on {socket.gethostname()}", page)
        self.assertIn(process["started"].replace("T", " ").replace("Z", " UTC"), page)
        metrics = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        self.assertEqual(metric(metrics, "tcptunnel_info", version=__version__), 1)
        self.assertGreater(metric(metrics, "process_resident_memory_bytes"), 1e6)
        self.assertGreater(metric(metrics, "process_open_fds"), 0)
        # This process (trial) started before the test, and not a day before.
        self.assertTrue(before - 86400 < metric(metrics, "process_start_time_seconds") <= before)

    async def test_page_shows_human_units(self) -> None:
        """The page shows sizes in KiB/MiB and durations in s/min; /status keeps the raw
        numbers."""
        _service, port, binding = await self.start()
        await self.transfer(binding, 300_000)
        page = (await get(f"http://127.0.0.1:{port}/"))[1].decode()
        self.assertIn("293 KiB / 293 KiB", page)  # the session, to client / to server
        self.assertIn("293 KiB sent, 293 KiB received", page)  # each proxy
        self.assertRegex(page, r"up \d+\.\d s")
        self.assertNotIn("300,000", page)
        self.assertNotIn("300000", page)
        status = json.loads((await get(f"http://127.0.0.1:{port}/status"))[1])
        self.assertEqual(status["instances"][2]["bytes_sent"], 300_000)

    async def test_unauthenticated_link_takes_a_slot(self) -> None:
        """A connection that has not logged in shows as a taken unauthenticated slot in
        /status and /metrics, and the slot is free again once it is gone."""
        service, port, _binding = await self.start()
        gateway = next(c for c in service if isinstance(c, GatewayService))
        peer = await raw_peer(gateway.ports[0].getHost().port)
        await wait_until(lambda: len(gateway.gateway.slots) == 1, 10, "the slot")
        status = json.loads((await get(f"http://127.0.0.1:{port}/status"))[1])
        self.assertEqual(status["instances"][0]["unauthenticated_slots"],
                         {"taken": 1, "held": 0, "limit": 256, "limit_per_address": 32})
        self.assertEqual(status["instances"][0]["unauthenticated_links"], 1)
        metrics = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        self.assertEqual(metric(metrics, "tcptunnel_unauthenticated_slots", state="open"), 1)
        self.assertEqual(metric(metrics, "tcptunnel_unauthenticated_slots_limit"), 256)
        peer.transport.loseConnection()
        await peer.closed
        await wait_until(lambda: len(gateway.gateway.slots) == 0, 10, "the slot to be freed")
        metrics = (await get(f"http://127.0.0.1:{port}/metrics"))[1].decode()
        self.assertEqual(metric(metrics, "tcptunnel_unauthenticated_slots", state="open"), 0)

    async def test_page_in_chromium(self) -> None:
        """The status page renders in headless Chromium and shows the connected session."""
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            raise self.skipTest("Chromium is not installed and could not be installed "
                                "(make test installs Debian's chromium when it can)")
        _service, port, _binding = await self.start()
        code, page = await get(f"http://127.0.0.1:{port}/")
        self.assertEqual(code, 200)
        self.assertIn(b'http-equiv="refresh"', page)
        profile = os.path.abspath(self.mktemp())
        screenshot = os.path.abspath(self.mktemp()) + ".png"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]
        out, err, code = await getProcessOutputAndValue(
            browser, [*flags, "--dump-dom", f"http://127.0.0.1:{port}/"], env=dict(os.environ))
        dom = out.decode()
        self.assertEqual(code, 0, err.decode()[-2000:])
        self.assertIn("Proxy-Client connected", dom)
        self.assertRegex(dom, r"<td>7</td>")
        self.assertIn("proxy-server 127.0.0.1:", dom)
        self.assertIn(f"version {__version__} on ", dom)
        _out, err, code = await getProcessOutputAndValue(
            browser, [*flags, f"--screenshot={screenshot}", "--window-size=1100,700",
                      f"http://127.0.0.1:{port}/"], env=dict(os.environ))
        self.assertEqual(code, 0, err.decode()[-2000:])
        with open(screenshot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


def gateway_process(clock: Clock) -> tuple[MultiService, GatewayService]:
    """A process with one Gateway (session 7) that is built but not listening."""
    settings = parse_settings(
        f'<Settings {NS}><Instance type="gateway"><Listener ip="127.0.0.1" port="0"/>'
        '<Session id="7" proxyClientPassword="pc" proxyServerPassword="ps"/></Instance>'
        "</Settings>".encode())
    config = settings.instances[0]
    assert isinstance(config, GatewayConfig)
    tunnel = MultiService()
    gateway = GatewayService(config, clock)
    gateway.setServiceParent(tunnel)
    return tunnel, gateway


def scrape(tunnel: MultiService) -> str:
    """What /metrics would answer for ``tunnel``."""
    registry = CollectorRegistry()
    registry.register(TunnelCollector(tunnel))
    return generate_latest(registry).decode()


class GatewayCountersTests(SynchronousTestCase):
    """The Gateway's login throttle, unauthenticated slots and queued bytes in /status and
    /metrics, driven through the Gateway's own objects on a Clock."""

    def test_throttle_tables(self) -> None:
        """Each login attempt's buckets show in both; buckets that refilled are forgotten
        before they are counted."""
        clock = Clock()
        clock.advance(1000)
        tunnel, service = gateway_process(clock)
        throttle = service.gateway.throttle
        throttle.attempt("198.51.100.7", 7, clock.seconds())
        throttle.attempt("2001:db8:1:2::5", 7, clock.seconds())
        (instance,) = snapshot(tunnel, clock.seconds())["instances"]
        self.assertEqual(instance["login_throttle"]["buckets"],
                         {"address_sessions": 2, "addresses": 2, "sessions": 1})
        text = scrape(tunnel)
        self.assertEqual(metric(text, "tcptunnel_login_throttle_buckets", table="addresses"), 2)
        self.assertEqual(metric(text, "tcptunnel_login_throttle_buckets", table="sessions"), 1)
        clock.advance(3600)  # every bucket is full again
        (instance,) = snapshot(tunnel, clock.seconds())["instances"]
        self.assertEqual(instance["login_throttle"]["buckets"],
                         {"address_sessions": 0, "addresses": 0, "sessions": 0})
        self.assertEqual(metric(scrape(tunnel), "tcptunnel_login_throttle_buckets"), 0)

    def test_slots_open_and_held(self) -> None:
        """Slots of links logging in are "open", slots kept after a failed login "held",
        until their time; the limit is shown."""
        clock = Clock()
        tunnel, service = gateway_process(clock)
        slots = service.gateway.slots
        self.assertIsNone(slots.acquire("198.51.100.7", clock.seconds()))
        self.assertIsNone(slots.acquire("198.51.100.8", clock.seconds()))
        slots.release("198.51.100.8", clock.seconds(), hold_until=clock.seconds() + 3)
        (instance,) = snapshot(tunnel, clock.seconds())["instances"]
        self.assertEqual(instance["unauthenticated_slots"],
                         {"taken": 2, "held": 1, "limit": 256, "limit_per_address": 32})
        text = scrape(tunnel)
        self.assertEqual(metric(text, "tcptunnel_unauthenticated_slots", state="open"), 1)
        self.assertEqual(metric(text, "tcptunnel_unauthenticated_slots", state="held"), 1)
        clock.advance(3)
        (instance,) = snapshot(tunnel, clock.seconds())["instances"]
        self.assertEqual((instance["unauthenticated_slots"]["taken"],
                          instance["unauthenticated_slots"]["held"]), (1, 0))
        self.assertEqual(metric(scrape(tunnel), "tcptunnel_unauthenticated_slots",
                                state="held"), 0)

    def test_queued_bytes(self) -> None:
        """What the relay queued toward a session's Proxy-Client is the Gateway's and the
        session's queued bytes, and nothing once the link took it."""
        clock = Clock()
        tunnel, service = gateway_process(clock)
        relay = service.gateway.relay
        link = relay.new_link()
        link.mark_ready()
        relay.attach(link, 7, fr.ROLE_PROXY_CLIENT)
        link.queue_control(fr.encode(fr.FrameType.PING, payload=b"12345678"))
        queued = link.queued_bytes
        self.assertGreaterEqual(queued, fr.HEADER_SIZE + 8)
        (instance,) = snapshot(tunnel, clock.seconds())["instances"]
        self.assertEqual((instance["queued_bytes"], instance["sessions"][0]["queued_bytes"]),
                         (queued, queued))
        text = scrape(tunnel)
        self.assertEqual(metric(text, "tcptunnel_queued_bytes", role="gateway"), queued)
        self.assertEqual(metric(text, "tcptunnel_session_queued_bytes", session="7"), queued)
        while link.data_to_send():
            pass
        (instance,) = snapshot(tunnel, clock.seconds())["instances"]
        self.assertEqual(instance["queued_bytes"], 0)
        self.assertEqual(metric(scrape(tunnel), "tcptunnel_queued_bytes", role="gateway"), 0)

    def test_page_shows_them(self) -> None:
        """The page names the slots taken and held, the throttle's tables and the queue."""
        clock = Clock()
        tunnel, service = gateway_process(clock)
        service.gateway.slots.acquire("198.51.100.7", 0)
        service.gateway.throttle.attempt("198.51.100.7", 7, 0)
        page = render_page(snapshot(tunnel, clock.seconds()))
        self.assertIn("unauthenticated slots 1 of 256 taken (0 held", page)
        self.assertIn("login throttle remembers 1 address/session, 1 address and 1 session "
                      "bucket(s); 0 B queued", page)


class HumanUnitsTests(SynchronousTestCase):
    """The page's units."""

    def test_bytes(self) -> None:
        """Bytes below 1 KiB are counted; above, binary units with about three digits, and
        a value that rounds up to 1024 of a unit moves to the next unit."""
        cases = {0: "0 B", 1023: "1023 B", 1024: "1.00 KiB", 1536: "1.50 KiB",
                 10 * 1024 - 1: "10.0 KiB", 300_000: "293 KiB", 1024**2 - 1: "1.00 MiB",
                 5 * 1024**3 + 1024**3 // 4: "5.25 GiB", 3 * 1024**4: "3.00 TiB"}
        for count, text in cases.items():
            self.assertEqual(human_bytes(count), text, count)

    def test_durations(self) -> None:
        """Seconds below a minute with one decimal, then the two largest units."""
        cases = {0: "0.0 s", 4.24: "4.2 s", 59.96: "1 min 0 s", 200: "3 min 20 s",
                 3600: "1 h 0 min", 18060: "5 h 1 min",
                 12 * 86400 + 3 * 3600 + 5: "12 d 3 h"}
        for seconds, text in cases.items():
            self.assertEqual(human_duration(seconds), text, seconds)


class EndLabelsTests(SynchronousTestCase):
    """ProxyService.end_labels: the label values of tcptunnel_streams_ended_total."""

    CODES = {"closed", "reset_remote", "reset_local", "open_failed", "refused",
             "lost_before_open", "lost_after_end", "other"}

    @given(st.text(max_size=80), st.sampled_from(
        ["", "closed ", "reset by the far end (", "reset by this end (", "reset here (",
         "failed to open (", "refused here ("]))
    def test_bounded(self, text: str, prefix: str) -> None:
        """Whatever the description (a peer chooses its message part), the code is one of
        a fixed set and the reason a Reason name, "" or "other"."""
        code, reason = ProxyService.end_labels(prefix + text)
        self.assertIn(code, self.CODES)
        self.assertIn(reason, {*fr.Reason.__members__, "", "other"})

    def test_peer_text_is_not_a_label(self) -> None:
        """A reason name the peer made up is "other", not its text."""
        self.assertEqual(ProxyService.end_labels("reset by the far end (EVIL)"),
                         ("reset_remote", "other"))
        self.assertEqual(ProxyService.end_labels("reset by the far end (LINK_LOST: x (y))"),
                         ("reset_remote", "LINK_LOST"))


class HostHeaderTests(TestCase):
    """Every resource answers only to IP literals, localhost and configured names (DNS
    rebinding)."""

    timeout = 30

    async def serve(self, attributes: str = "") -> int:
        """Start a status server for an empty process; its port."""
        settings = parse_settings(
            f'<Settings {NS}><Status listenPort="0" {attributes}/></Settings>'.encode())
        assert settings.status is not None
        status = StatusService(settings.status, MultiService(), reactor)
        status.startService()
        self.addCleanup(status.stopService)
        return int(status.port.getHost().port)

    async def request(self, port: int, path: str, host: str) -> tuple[int, bytes]:
        """GET ``path`` from 127.0.0.1:``port`` with the given Host header."""
        response = await Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{port}{path}".encode(),
            Headers({b"host": [host.encode()]}))
        return response.code, await readBody(response)

    async def test_foreign_names_are_refused_everywhere(self) -> None:
        """Host: evil.example (with or without a port, or dressed as a literal or as
        localhost) gets 421 and no content on /, /status and /metrics."""
        port = await self.serve('hostNames="status.example.org"')
        for path in ("/", "/status", "/metrics", "/nothing"):
            for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                         "localhost.evil.example", "example.org", "status.example.org.evil",
                         "[evil]", ""):
                code, body = await self.request(port, path, host)
                self.assertEqual(code, 421, f"{host!r} {path}")
                self.assertIn(b"Misdirected Request", body)
                self.assertNotIn(b"instances", body)
                self.assertNotIn(b"tcptunnel_", body)

    async def test_literals_localhost_and_configured_names_are_served(self) -> None:
        """IP literals (v4, bracketed v6, with ports), localhost and the configured names
        in any case are served on every resource."""
        port = await self.serve('hostNames="Status.Example.org, other"')
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}", "[::1]", "10.1.2.3",
                     "localhost", f"LocalHost:{port}", "localhost.", "status.example.org",
                     f"STATUS.example.org.:{port}", "other"):
            code, body = await self.request(port, "/status", host)
            self.assertEqual((code, json.loads(body)["instances"]), (200, []), host)
            code, body = await self.request(port, "/", host)
            self.assertEqual(code, 200, host)
            self.assertIn(b"<h1>tcptunnel</h1>", body)
            code, body = await self.request(port, "/metrics", host)
            self.assertEqual(code, 200, host)
            self.assertIn(b"tcptunnel_links", body)

    async def test_without_names_only_literals_and_localhost(self) -> None:
        """Without hostNames a name other than localhost is refused."""
        port = await self.serve()
        self.assertEqual((await self.request(port, "/status", "status.example.org"))[0], 421)
        self.assertEqual((await self.request(port, "/status", f"localhost:{port}"))[0], 200)


class HostAllowedTests(SynchronousTestCase):
    """host_allowed, the check behind HostHeaderTests."""

    def test_cases(self) -> None:
        """Literals, localhost and listed names pass; anything else fails."""
        names = ("status.example.org",)
        for host in ("127.0.0.1", "::1", "[::1]", "fe80::1%eth0", "0.0.0.0", "LOCALHOST",
                     "status.example.org.", "Status.Example.Org"):
            self.assertTrue(host_allowed(host, names), host)
        for host in ("", "evil.example", "localhost.evil", "1.2.3.4.example", "127.1",
                     "status.example.org..", "[status.example.org]", "::1.example"):
            self.assertFalse(host_allowed(host, names), host)

    def test_config(self) -> None:
        """hostNames is read as normalised names; a port or an empty item is refused."""
        from tcptunnel.config import ConfigError

        settings = parse_settings(f'<Settings {NS}><Status listenPort="1" '
                                  'hostNames="A.example., b,Bücher.de"/></Settings>'.encode())
        assert settings.status is not None
        self.assertEqual(settings.status.host_names, ("a.example", "b", "xn--bcher-kva.de"))
        for bad in ("a:80", "a,,b", "", "[::1]"):
            with self.assertRaisesRegex(ConfigError, "hostNames", msg=bad):
                parse_settings(f'<Settings {NS}><Status listenPort="1" hostNames="{bad}"/>'
                               "</Settings>".encode())


class StatusConfigTests(SynchronousTestCase):
    """The <Status> element."""

    def test_defaults_to_loopback(self) -> None:
        """Without listenIp the status server listens on 127.0.0.1 only."""
        settings = parse_settings(f'<Settings {NS}><Status listenPort="9100"/></Settings>'.encode())
        assert settings.status is not None
        self.assertEqual((settings.status.listen_ip, settings.status.listen_port),
                         ("127.0.0.1", 9100))

    def test_only_one(self) -> None:
        """Two <Status> elements are an error naming the first."""
        from tcptunnel.config import ConfigError

        with self.assertRaises(ConfigError) as raised:
            parse_settings(f'<Settings {NS}>\n<Status listenPort="1"/>\n<Status listenPort="2"/>'
                           "</Settings>".encode(), "s.xml")
        self.assertIn("s.xml:3:", str(raised.exception))


class JsonLogTests(TestCase):
    """--logger tcptunnel.jsonlog.observer writes one JSON object per event."""

    def test_json_lines(self) -> None:
        """Events become JSON lines carrying their fields."""
        path = os.path.abspath(self.mktemp())
        os.environ["TCPTUNNEL_JSON_LOG"] = path
        self.addCleanup(os.environ.pop, "TCPTUNNEL_JSON_LOG")
        from tcptunnel.jsonlog import observer

        log_observer = observer()
        Logger(observer=log_observer).info("Stream {target} ended", target="h:22", sent=5)
        log_observer._outFile.flush()  # type: ignore[attr-defined]
        with open(path) as f:
            records = [json.loads(line.strip("\x1e")) for line in f if line.strip()]
        self.assertEqual(records[0]["target"], "h:22")
        self.assertEqual(records[0]["sent"], 5)

    async def test_twistd_logger_option(self) -> None:
        """twistd --logger tcptunnel.jsonlog.observer runs and logs JSON."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f'<Settings {NS}><Instance type="gateway"><Listener ip="127.0.0.1" '
                    'port="0"/></Instance></Settings>')
        argv = twistd_command("-n", "--pidfile=", "--logger", "tcptunnel.jsonlog.observer",
                              "tcptunnel", "--config", path)
        process = TwistdProcess()
        reactor.spawnProcess(process, sys.executable, argv,
                             env=child_environment())
        self.addCleanup(process.kill)
        await wait_until(lambda: b"Gateway listener started" in process.output, 20, "start")
        process.transport.signalProcess("TERM")  # type: ignore[union-attr]
        await process.ended
        lines = [json.loads(line.strip("\x1e")) for line in
                 process.output.decode().splitlines() if line.strip().strip("\x1e")]
        self.assertTrue(any(re.search("listener started", r.get("log_format", ""))
                            for r in lines))


class GatewayStreamKindsTests(SynchronousTestCase):
    """What the Gateway shows of each stream: its kind, its target only when it travels in
    clear, and for an end-to-end encrypted stream that it is one and nothing of where it
    goes (issue 16); driven through the Gateway's relay on a Clock."""

    def test_sealed_udp_and_tcp_streams(self) -> None:
        """A sealed, a UDP and a TCP stream of one session: /status counts and lists each
        with its kind (the sealed one end-to-end, without a target, though its sealed field
        holds text that reads like one), the page and /metrics say the same, and the log
        line at each stream's end names the kind, the target of the clear ones only, and
        the bytes relayed."""
        clock = Clock()
        clock.advance(100)
        tunnel, service = gateway_process(clock)
        gateway = service.gateway
        events: list[dict[str, Any]] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            events.append(event)

        gateway.log = Logger(observer=observe)
        relay = gateway.relay
        client, server = relay.new_link(), relay.new_link()
        for link, role in ((client, fr.ROLE_PROXY_CLIENT), (server, fr.ROLE_PROXY_SERVER)):
            link.mark_ready()
            relay.attach(link, 7, role)
        opens = {
            1: fr.open_payload(100_000, 0, fr.KIND_SEALED,
                               [(0x81, b"\x00" * 12 + b"hidden.internal:2222" + b"\x01" * 16)]),
            3: fr.open_payload(100_000, 0, fr.KIND_UDP, fr.target_fields("dns.internal", 53)),
            5: fr.open_payload(100_000, 0, fr.KIND_TCP, fr.target_fields("db.internal", 5432)),
        }
        for stream_id, payload in opens.items():
            relay.stream_frame(server, fr.Frame(fr.FrameType.OPEN, 0, stream_id, payload))
            route = server.routes[stream_id]
            relay.stream_frame(client, fr.Frame(fr.FrameType.OPEN_RESULT, 0, route.client_stream,
                                                fr.build_open_result(0, fr.Reason.OK,
                                                                     100_000)[fr.HEADER_SIZE:]))
            relay.stream_frame(server, fr.Frame(fr.FrameType.DATA, 0, stream_id,
                                                b"q" * (100 * stream_id)))
        clock.advance(2.5)
        (instance,) = snapshot(tunnel, clock.seconds())["instances"]
        (session,) = instance["sessions"]
        self.assertEqual(session["streams_by_kind"],
                         {"tcp": 1, "udp": 1, "sealed": 1, "pake": 0, "other": 0})
        self.assertEqual((session["end_to_end_streams"], session["streams_not_listed"]), (1, 0))
        rows = {row["stream"]: row for row in session["streams"]}
        self.assertEqual(rows[1], {
            "proxy_server": 1, "stream": 1, "kind": "sealed", "label": "end-to-end encrypted",
            "end_to_end": True, "target": None, "open": True, "since": 2.5,
            "bytes_to_client": 100, "bytes_to_server": 0})
        self.assertEqual([(rows[n]["kind"], rows[n]["label"], rows[n]["end_to_end"],
                           rows[n]["target"], rows[n]["bytes_to_client"]) for n in (3, 5)],
                         [("udp", "UDP", False, "dns.internal:53", 300),
                          ("tcp", "TCP", False, "db.internal:5432", 500)])
        self.assertNotIn("hidden", json.dumps(instance))
        page = render_page(snapshot(tunnel, clock.seconds()))
        self.assertIn("<td>1 TCP · 1 UDP · 1 end-to-end encrypted</td>", page)
        self.assertIn("<td>end-to-end encrypted</td><td>end-to-end encrypted (not visible to "
                      "the Gateway)</td>", page)
        self.assertIn("<td>UDP</td><td>dns.internal:53</td>", page)
        self.assertIn("<td>TCP</td><td>db.internal:5432</td>", page)
        self.assertNotIn("hidden", page)
        text = scrape(tunnel)
        for kind, count in (("sealed", 1), ("udp", 1), ("tcp", 1), ("pake", 0)):
            self.assertEqual(metric(text, "tcptunnel_gateway_streams", session="7", kind=kind),
                             count, kind)
        # Each stream ends: reset by the Proxy-Server (the sealed one, INTEGRITY), closed
        # (UDP: FIN both ways), and lost with the Proxy-Client's link (TCP).
        relay.stream_frame(server, fr.Frame(fr.FrameType.RESET, 0, 1, fr.build_reset(
            1, fr.Reason.INTEGRITY, "a record did not authenticate")[fr.HEADER_SIZE:]))
        relay.stream_frame(server, fr.Frame(fr.FrameType.FIN, 0, 3, b""))
        relay.stream_frame(client, fr.Frame(fr.FrameType.FIN, 0, server.routes[3].client_stream,
                                            b""))
        gateway.apply_effects()  # as GatewayLink.handle_events does after each read
        clock.advance(1)
        relay.detach(client, fr.Reason.LINK_LOST, "lost")
        gateway.apply_effects()
        lines = [(event["stream"], event["kind"], event["end_to_end"], event["target"],
                  event["ended"], event["reason"], event["to_client"], event["duration"])
                 for event in events if "stream" in event]
        self.assertEqual(lines, [(1, "sealed", True, None, "reset", "INTEGRITY", 100, 2.5),
                                 (3, "udp", False, "dns.internal:53", "closed", "OK", 300, 2.5),
                                 (5, "tcp", False, "db.internal:5432", "reset", "LINK_LOST",
                                  500, 3.5)])
        texts = [formatEvent(event) for event in events if "stream" in event]
        self.assertEqual(texts[0], "[0] Session 7, Proxy-Server #1, stream 1: end-to-end "
                         "encrypted stream reset (INTEGRITY) after 2.5 s, 100 bytes to the "
                         "Proxy-Client, 0 bytes back")
        self.assertIn("UDP stream to dns.internal:53 closed after 2.5 s", texts[1])
        self.assertIn("TCP stream to db.internal:5432 reset (LINK_LOST) after 3.5 s", texts[2])
        self.assertNotIn("hidden", repr(events))


class WebSocketListenersTests(SynchronousTestCase):
    """WebSocket Listeners and WebSocket links are shown as such (issue 19)."""

    def test_listeners_and_proxies_name_their_transport(self) -> None:
        """A Gateway with a plain, a TLS-less WebSocket Listener and a proxy whose link is a
        WebSocket: /status gives each its transport (tcp, ws) and path, the page says
        "plain, WebSocket /tunnel" for the Listener and the proxy's Gateway."""
        from twisted.internet.testing import MemoryReactorClock

        settings = parse_settings(
            f'<Settings {NS}><Instance type="gateway"><Listener ip="127.0.0.1" port="0"/>'
            '<Listener ip="::1" port="0" webSocketPath="/tunnel"/>'
            '<Session id="7" proxyClientPassword="pc" proxyServerPassword="ps"/></Instance>'
            '<Instance type="proxy-client" host="127.0.0.1" port="1" webSocketPath="/t">'
            '<Session id="7" password="pc"/></Instance></Settings>'.encode())
        reactor_ = MemoryReactorClock()
        tunnel = MultiService()
        gateway_config, proxy_config = settings.instances
        assert isinstance(gateway_config, GatewayConfig)
        gateway = GatewayService(gateway_config, reactor_)
        gateway.setServiceParent(tunnel)
        gateway.startService()  # listens on the memory reactor
        ProxyService(proxy_config, reactor_).setServiceParent(tunnel)  # type: ignore[arg-type]
        status = snapshot(tunnel, reactor_.seconds())
        listed, proxy = status["instances"]
        self.assertEqual(
            [(item["transport"], item["websocket_path"]) for item in listed["listeners"]],
            [("tcp", None), ("ws", "/tunnel")])
        self.assertEqual((proxy["transport"], proxy["websocket_path"]), ("ws", "/t"))
        page = render_page(status)
        self.assertIn("Listening on 127.0.0.1:0 (plain), [::1]:0 (plain, WebSocket /tunnel);",
                      page)
        self.assertIn("Gateway 127.0.0.1:1 (plain, WebSocket /t), session 7", page)

    def test_transport_names(self) -> None:
        """tcp, tls, ws and wss, by TLS and WebSocket path."""
        from tcptunnel.status import link_transport

        self.assertEqual([link_transport(False, None), link_transport(True, None),
                          link_transport(False, "/t"), link_transport(True, "/t")],
                         ["tcp", "tls", "ws", "wss"])
