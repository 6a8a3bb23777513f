"""Tests for the twistd plugin, tap options, the service tree, and real twistd processes."""

from __future__ import annotations

import os
import sys

from twisted.application.service import IServiceMaker
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel import tap
from tcptunnel.gateway import GatewayService
from tcptunnel.heap import HeapTrimmer
from tcptunnel.proxyclient import ProxyClientService
from tcptunnel.proxyserver import ProxyServerService
from tcptunnel.status import StatusService
from tcptunnel.test._certs import mint
from tcptunnel.test._harness import (
    CONF,
    ROOT,
    EchoProtocol,
    TwistdProcess,
    child_environment,
    connect,
    free_port,
    listen,
    sleep,
    twistd_command,
)


class PluginTests(SynchronousTestCase):
    """The plugin and the options."""

    def test_plugin_found(self) -> None:
        """getPlugins(IServiceMaker) finds tcptunnel, pointing at tcptunnel.tap."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("tcptunnel", makers)
        self.assertEqual(makers["tcptunnel"].module, "tcptunnel.tap")  # type: ignore[attr-defined]

    def test_help(self) -> None:
        """--help describes --config."""
        self.assertIn("--config", str(tap.Options()))
        self.assertIn("settings.xml", str(tap.Options()))

    def test_default_path(self) -> None:
        """Without --config, settings.xml in the working directory is read."""
        options = tap.Options()
        self.assertEqual(options["config"], "settings.xml")
        empty = self.mktemp()
        os.makedirs(empty)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(empty)
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions([])
        self.assertIn("settings.xml: cannot read the settings file", str(raised.exception))

    def test_bad_file_is_usage_error(self) -> None:
        """A broken settings file is a UsageError carrying the precise message."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('<Settings xmlns="https://github.com/kpreisser/TcpTunnel">\n'
                    '<Instance type="gateway"><Listener port="99999"/></Instance></Settings>')
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--config", path])
        self.assertIn(f"{path}:2:", str(raised.exception))
        self.assertIn("'port'", str(raised.exception))

    def test_make_service_children(self) -> None:
        """makeService builds one child per Instance, in file order, named index:role, and
        the status server when <Status> is given (conf/demo.xml has one), then the heap
        trimmer."""
        options = tap.Options()
        options.parseOptions(["--config", os.path.join(CONF, "demo.xml")])
        service = tap.makeService(options)
        children = list(service)  # type: ignore[call-overload]
        self.assertEqual([c.name for c in children],
                         ["0:gateway", "1:proxy-client", "2:proxy-server", "status",
                          "heap-trimmer"])
        self.assertEqual([type(c) for c in children],
                         [GatewayService, ProxyClientService, ProxyServerService, StatusService,
                          HeapTrimmer])


class TwistdProcessTests(TestCase):
    """Real ``twistd -n tcptunnel`` processes."""

    timeout = 90

    async def test_bad_config_exits_nonzero(self) -> None:
        """A broken settings file: non-zero exit and the precise message on stderr."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('<Settings xmlns="https://github.com/kpreisser/TcpTunnel">\n'
                    '<Instance type="proxy-server" host="h" port="1">\n'
                    '<Session id="1" password="p"><Binding listenPort="1" targetHost="t"/>'
                    "</Session></Instance></Settings>")
        _out, err, code = await getProcessOutputAndValue(
            sys.executable, twistd_command("-n", "--pidfile=", "tcptunnel", "--config", path)[1:],
            env=child_environment(), path=ROOT)
        self.assertNotEqual(code, 0)
        self.assertIn(f"{path}:3: <Binding>: missing required attribute 'targetPort'".encode(),
                      err)

    async def test_sample_configs_forward(self) -> None:
        """conf/gateway.xml, proxy-client.xml and proxy-server.xml, each run by its own twistd
        with minted certificates and PYTHONOPTIMIZE=2 (as the systemd units run them: no
        docstrings, no asserts), forward a real connection."""
        work = os.path.abspath(self.mktemp())
        certs = mint(os.path.join(work, "certs"))
        echo = await listen(self, EchoProtocol)
        gateway_port, binding_port = free_port(), free_port()

        def adapt(name: str, replacements: list[tuple[str, str]]) -> str:
            with open(os.path.join(CONF, name)) as f:
                text = f.read()
            for old, new in replacements:
                self.assertIn(old, text, f"{name} should contain {old!r}")
                text = text.replace(old, new)
            path = os.path.join(work, name)
            with open(path, "w") as f:
                f.write(text)
            return path

        common = [('host="gw.example.org"', 'host="localhost"'),
                  ('port="25201" useSsl="true"',
                   f'port="{gateway_port}" useSsl="true" caFile="{certs.ca}"')]
        gateway = adapt("gateway.xml", [
            ('port="25201"', f'ip="127.0.0.1" port="{gateway_port}"'),
            ("gateway-cert.pem", certs.cert), ("gateway-key.pem", certs.key)])
        client = adapt("proxy-client.xml", [
            *common, ('<Endpoint host="192.168.40.80" port="5900" />',
                      f'<Endpoint host="127.0.0.1" port="{echo}" />')])
        server = adapt("proxy-server.xml", [
            *common, ('listenPort="5920" targetHost="192.168.40.80" targetPort="5900"',
                      f'listenPort="{binding_port}" targetHost="127.0.0.1" '
                      f'targetPort="{echo}"'),
            ('listenPort="2222"', f'listenPort="{free_port()}"')])
        processes = [self.spawn(path, work) for path in (gateway, client, server)]
        data = b"through three processes" * 1000
        received = b""
        for _ in range(100):
            await sleep(0.2)
            try:
                probe = await connect(binding_port)
            except Exception:  # not listening yet
                continue
            probe.transport.write(data)
            probe.transport.loseWriteConnection()
            how = await probe.ended
            if how == "clean":
                received = bytes(probe.received)
                break
        self.assertEqual(received, data, "logs:\n" + "\n".join(p.log() for p in processes))
        for process in processes:
            process.stop()
        await defer.gatherResults([p.ended for p in processes])
        for process in processes:
            # twistd stops cleanly on SIGTERM, then ends itself with that signal so that
            # its exit status says why it stopped.
            self.assertIn((process.exit_code, process.exit_signal), [(0, None), (None, 15)],
                          process.log())
            self.assertIn("Server Shut Down.", process.log())
            self.assertNotIn("Traceback", process.log())

    def spawn(self, config: str, work: str) -> TwistdProcess:
        """twistd with PYTHONOPTIMIZE=2, as conf/tcptunnel.service runs it."""
        process = TwistdProcess()
        env = dict(child_environment(), PYTHONOPTIMIZE="2")
        reactor.spawnProcess(
            process, sys.executable,
            twistd_command("-n", "--pidfile=", "--logfile=-", "tcptunnel", "--config", config),
            env=env, path=work)
        self.addCleanup(process.kill)
        return process
