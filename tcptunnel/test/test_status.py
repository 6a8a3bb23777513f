"""Observability: /metrics, /status, the status page (in headless Chromium), JSON logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tcptunnel.config import load_settings, parse_settings
from tcptunnel.status import StatusService, host_allowed
from tcptunnel.tap import TunnelService
from tcptunnel.test._harness import (
    NS,
    EchoProtocol,
    TwistdProcess,
    child_environment,
    connect,
    listen,
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

    async def start(self) -> tuple[TunnelService, int, int]:
        echo = await listen(self, EchoProtocol)
        gateway, binding = reserve_port(self), reserve_port(self)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                f'<Settings {NS}><Status listenPort="0"/>'
                f'<Instance type="gateway"><Listener ip="127.0.0.1" port="{gateway}"/>'
                '<Session id="7" proxyClientPassword="secret-pc" proxyServerPassword="secret-ps"/>'
                f'</Instance><Instance type="proxy-client" host="127.0.0.1" port="{gateway}">'
                '<Session id="7" password="secret-pc"/></Instance>'
                f'<Instance type="proxy-server" host="127.0.0.1" port="{gateway}">'
                f'<Session id="7" password="secret-ps"><Binding listenIp="127.0.0.1" '
                f'listenPort="{binding}" targetHost="127.0.0.1" targetPort="{echo}"/>'
                "</Session></Instance></Settings>")
        service = TunnelService(load_settings(path), reactor)
        service.startService()
        self.addCleanup(lambda: defer.maybeDeferred(service.stopService))
        await wait_until(lambda: all(getattr(c, "partner_available", True) for c in service),
                         15, "login")
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
        _out, err, code = await getProcessOutputAndValue(
            browser, [*flags, f"--screenshot={screenshot}", "--window-size=1100,700",
                      f"http://127.0.0.1:{port}/"], env=dict(os.environ))
        self.assertEqual(code, 0, err.decode()[-2000:])
        with open(screenshot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


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
            self.assertEqual((code, json.loads(body)), (200, {"instances": []}), host)
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
