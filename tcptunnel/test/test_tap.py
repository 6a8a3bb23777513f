"""Tests for the twistd plugin, tap options, the service tree, and real twistd processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import sys

from twisted.application.service import IServiceMaker
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP6ClientEndpoint
from twisted.internet.protocol import Factory
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
    NS,
    EchoProtocol,
    RecordingClient,
    TwistdProcess,
    child_environment,
    connect,
    listen,
    reserve_port,
    twistd_command,
    wait_until,
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
        with self.assertRaises(tap.ConfigFileError) as raised:
            tap.Options().parseOptions([])
        self.assertIn("settings.xml: cannot read the settings file", str(raised.exception))

    def test_bad_file_exits_with_the_message(self) -> None:
        """A broken settings file is a SystemExit (not a UsageError, which twistd answers with
        its help text) whose message is the precise error and the check-config hint."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('<Settings xmlns="https://github.com/kpreisser/TcpTunnel">\n'
                    '<Instance type="gateway"><Listener port="99999"/></Instance></Settings>')
        with self.assertRaises(SystemExit) as raised:
            tap.Options().parseOptions(["--config", path])
        self.assertNotIsInstance(raised.exception, usage.UsageError)
        message = str(raised.exception.code)
        self.assertTrue(message.startswith(f"tcptunnel: {path}:2: <Listener> attribute 'port'"),
                        message)
        self.assertTrue(message.endswith(
            f"(check the whole file with: python -m tcptunnel check-config {path})"), message)

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


class StartupWarningTests(SynchronousTestCase):
    """What the settings reader accepts with a warning is logged at start-up."""

    def start(self, body: str) -> list[str]:
        """Start the settings ``body`` through tap.Options on a MemoryReactor; the text of
        each warning logged."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f"<Settings {NS}>\n{body}</Settings>")
        os.chmod(path, 0o600)  # not the warning about a file others can read
        options = tap.Options()
        options.parseOptions(["--config", path])
        tunnel = tap.TunnelService(options.settings, MemoryReactorClock())
        with capturedLogs() as events:
            tunnel.startService()
        self.addCleanup(tunnel.stopService)
        return [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]

    def test_binding_without_listen_ip(self) -> None:
        """A Binding without listenIp: one warning, with the instance's [0], the file and
        line, saying it listens on every address."""
        warnings = self.start(
            '<Instance type="proxy-server" host="127.0.0.1" port="1"><Session id="1" '
            'password="p">\n<Binding listenPort="2" targetHost="127.0.0.1" targetPort="3"/>'
            "</Session></Instance>")
        listen_ip = [w for w in warnings if "listenIp" in w]
        self.assertEqual(len(listen_ip), 1, warnings)
        self.assertRegex(listen_ip[0], r"^\[0\] \S+:3: .*every address")

    def test_empty_settings_run(self) -> None:
        """An empty <Settings> is not refused (the original runs it): it starts, runs
        nothing, and says so."""
        warnings = self.start("")
        self.assertTrue(any("nothing runs" in w for w in warnings), warnings)


class TwistdProcessTests(TestCase):
    """Real ``twistd -n tcptunnel`` processes."""

    timeout = 90

    async def test_bad_config_exits_nonzero(self) -> None:
        """A broken settings file, in the foreground and as a daemon: exit status 1, nothing
        on stdout (no twistd help text), and on stderr the error once, naming file and line,
        with the check-config hint; no pidfile, no log file."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        path = os.path.join(work, "settings.xml")
        with open(path, "w") as f:
            f.write('<Settings xmlns="https://github.com/kpreisser/TcpTunnel">\n'
                    '<Instance type="proxy-server" host="h" port="1">\n'
                    '<Session id="1" password="p"><Binding listenPort="1" targetHost="t"/>'
                    "</Session></Instance></Settings>")
        for mode in (["-n"], []):
            out, err, code = await getProcessOutputAndValue(
                sys.executable, twistd_command(*mode, "--pidfile=t.pid", "--logfile=t.log",
                                               "tcptunnel", "--config", path)[1:],
                env=child_environment(), path=work)
            self.assertEqual((code, out.decode()), (1, ""), mode)
            lines = err.decode().splitlines()
            self.assertEqual(len(lines), 2, lines)
            self.assertTrue(lines[0].startswith(
                f"tcptunnel: {path}:3: <Binding>: missing required attribute 'targetPort'"),
                lines)
            self.assertEqual(
                lines[1], f"(check the whole file with: python -m tcptunnel check-config {path})")
            self.assertEqual(sorted(os.listdir(work)), ["settings.xml"], mode)

    async def test_sample_configs_forward(self) -> None:
        """conf/gateway.xml, proxy-client.xml and proxy-server.xml, each run by its own twistd
        with minted certificates and PYTHONOPTIMIZE=2 (as the systemd units run them: no
        docstrings, no asserts), forward a real connection."""
        work = os.path.abspath(self.mktemp())
        certs = mint(os.path.join(work, "certs"))
        echo = await listen(self, EchoProtocol)
        gateway_port, binding_port = reserve_port(self), reserve_port(self)

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
            ('listenPort="2222"', f'listenPort="{reserve_port(self)}"')])
        processes = [self.spawn(path, work) for path in (gateway, client, server)]
        data = b"through three processes" * 1000
        # Its Bindings listen before it connects; a partner means the Proxy-Client is in.
        try:
            await wait_until(lambda: re.search("(?i)partner available: yes", processes[2].log())
                             is not None, 60, "the Proxy-Server to have its partner")
        except AssertionError as e:
            self.fail(f"{e}; logs:\n" + "\n".join(p.log() for p in processes))
        probe = await connect(binding_port)
        probe.transport.write(data)
        probe.transport.loseWriteConnection()
        how = await probe.ended
        received = bytes(probe.received) if how == "clean" else b""
        self.assertEqual(received, data, "logs:\n" + "\n".join(p.log() for p in processes))
        for process in processes:
            process.stop()
        await defer.gatherResults([p.ended for p in processes])
        for process in processes:
            # A stop on SIGTERM is the normal, graceful one: exit status 0 (twistd on its
            # own would end itself with the signal).
            self.assertEqual((process.exit_code, process.exit_signal), (0, None),
                             process.log())
            self.assertIn("Server Shut Down.", process.log())
            self.assertNotIn("Traceback", process.log())
            # Over TLS too, lines about a link carry the instance's [N] and no object address.
            self.assertIn("TLS established (TLSv1.3", process.log())
            for line in process.log().splitlines():
                self.assertNotRegex(line, r"0x[0-9a-f]{6,}")
                if line.startswith("[tcptunnel.") and "Link " in line:
                    self.assertRegex(line, r"^\S+ \[0\] Link ", line)

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


class _Outputs(TwistdProcess):
    """A child process whose stdout and stderr are kept apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stderr = bytearray()

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        self.stderr += data


def _processes_running(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (a test's unique config path)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


class StartupFailureTests(TestCase):
    """Real twistd processes whose start-up fails once twistd runs (a Listener port in use)."""

    timeout = 60

    async def start_on_busy_port(self, *mode: str) -> tuple[_Outputs, str, str]:
        """twistd ``mode`` with a pidfile and a log file, its Gateway Listener on a port
        that another socket listens on; returns once it ended (15 s at most)."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        busy = await listen(self, EchoProtocol)
        config = os.path.join(work, "settings.xml")
        with open(config, "w") as f:
            f.write(f'<Settings {NS}><Instance type="gateway"><Listener ip="127.0.0.1" '
                    f'port="{busy}"/><Session id="1" proxyClientPassword="a" '
                    'proxyServerPassword="b"/></Instance></Settings>')
        process = _Outputs()
        reactor.spawnProcess(
            process, sys.executable,
            twistd_command(*mode, "--pidfile=t.pid", "--logfile=t.log", "tcptunnel",
                           "--config", config),
            env=child_environment(), path=work)
        self.addCleanup(process.kill)
        # Processes of this test (a hung daemon, the starter's zombie child) are killed.
        def kill_leftovers() -> None:
            for pid in _processes_running(config):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        self.addCleanup(kill_leftovers)
        await wait_until(lambda: process.ended.called, 15, "twistd to give up")
        with open(os.path.join(work, "t.log")) as f:
            log = f.read()
        self.assertFalse(os.path.exists(os.path.join(work, "t.pid")), "pidfile left behind")
        reason = (f"[0] Gateway could not listen on 127.0.0.1:{busy} ({config}:1): "
                  "[Errno 98] Address already in use")
        # Logged once, as ours (the message is not also logged as "stderr" output).
        self.assertEqual(log.count("could not listen"), 1, log)
        self.assertIn(f"[tcptunnel.tap.TunnelService#critical] Start-up failed: {reason}", log)
        self.assertNotIn("Traceback", log)
        return process, reason, config

    async def test_daemon_exits_at_once(self) -> None:
        """As a daemon (twistd without -n): the command returns with status 1 within
        seconds (it hung for ever), the reason whole on stderr, no pidfile, and no process
        left behind."""
        process, reason, config = await self.start_on_busy_port()
        self.assertEqual(process.exit_code, 1)
        lines = process.stderr.decode().splitlines()
        self.assertEqual(lines[0], f"tcptunnel: start-up failed: {reason}", lines)
        # twistd's own report of the daemon's failure follows, pointing at that line.
        self.assertIn("StartupFailed: the reason is on the line above", lines[1])
        self.assertEqual(process.output.decode(), "")
        await wait_until(lambda: not _processes_running(config), 10, "the daemon to exit")

    async def test_foreground_exits_with_the_reason(self) -> None:
        """In the foreground (-n): status 1, the reason alone on stderr (no traceback), the
        pidfile removed."""
        process, reason, _config = await self.start_on_busy_port("-n")
        self.assertEqual(process.exit_code, 1)
        self.assertEqual(process.stderr.decode(), f"tcptunnel: start-up failed: {reason}\n")
        self.assertEqual(process.output.decode(), "")


def _reserve_ipv6_port(test: TestCase) -> int:
    """A port on ::1 held (bound, not listening) until the test's cleanup (see
    _harness.reserve_port)."""
    holder = socket.socket(socket.AF_INET6)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("::1", 0))
    test.addCleanup(holder.close)
    return int(holder.getsockname()[1])


# "<time> [<namespace>#<level>] <text>": twistd's text log format.
_LOG_LINE = re.compile(r"(?P<time>\S+) \[(?P<namespace>[^\]#]+)#?\w*\] (?P<text>.*)")
# Our lines about the whole process rather than one <Instance>.
_PROCESS_WIDE = ("tcptunnel.tap.", "tcptunnel.status.")


class LogLinesTests(TestCase):
    """The log of a normal start, one tunnelled connection and a stop of conf/demo.xml."""

    timeout = 60

    async def test_demo_log_lines(self) -> None:
        """conf/demo.xml under twistd (ports reserved, the links and the Binding on ::1, one
        connection through the tunnel, SIGTERM): no line shows an object address (0x...),
        every line of ours about an instance starts with its [N], IPv6 addresses are always
        bracketed, no line repeats the one before it, and Twisted's own port lines are
        gone; the partner state is logged with the login, then only when it changes."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        echo = await listen(self, EchoProtocol)
        gateway, binding, status = (_reserve_ipv6_port(self), _reserve_ipv6_port(self),
                                    reserve_port(self))
        with open(os.path.join(CONF, "demo.xml")) as f:
            text = f.read()
        for old, new in [('<Listener ip="127.0.0.1" port="25201" />',
                          f'<Listener ip="::1" port="{gateway}" />'),
                         ('host="127.0.0.1" port="25201"', f'host="::1" port="{gateway}"'),
                         ('listenIp="127.0.0.1" listenPort="18022"',
                          f'listenIp="::1" listenPort="{binding}"'),
                         ('port="18080"', f'port="{echo}"'),
                         ('targetPort="18080"', f'targetPort="{echo}"'),
                         ('listenPort="18090"', f'listenPort="{status}"')]:
            self.assertIn(old, text)
            text = text.replace(old, new)
        config = os.path.join(work, "demo.xml")
        with open(config, "w") as f:
            f.write(text)
        process = TwistdProcess()
        reactor.spawnProcess(
            process, sys.executable,
            twistd_command("-n", "--pidfile=", "tcptunnel", "--config", config),
            env=child_environment(), path=work)
        self.addCleanup(process.kill)
        await wait_until(lambda: process.output.count(b"vailable: yes (1)") == 2, 20,
                         "both proxies to see their partner")
        client = RecordingClient()
        await TCP6ClientEndpoint(reactor, "::1", binding).connect(
            Factory.forProtocol(lambda: client))
        client.transport.write(b"through the demo")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")
        await wait_until(lambda: b"Stream " in process.output, 10, "the stream's log line")
        process.stop()
        await process.ended
        self.assertEqual(process.exit_code, 0, process.log())

        lines = process.output.decode().splitlines()
        self.assertTrue(any("Stream [::1]:" in line for line in lines), process.log())
        previous = None
        for line in lines:
            self.assertNotRegex(line, r"0x[0-9a-f]{6,}")
            self.assertNotRegex(line, r"(?<![\[\w:])::1:\d")  # [::1]:port, never ::1:port
            self.assertNotRegex(line, r"starting on \d+$|Port \d+ Closed")
            match = _LOG_LINE.fullmatch(line)
            assert match is not None, f"not a log line: {line!r}"
            namespace, body = match["namespace"], match["text"]
            if namespace.startswith("tcptunnel.") and not namespace.startswith(_PROCESS_WIDE):
                self.assertRegex(body, r"^\[\d+\] ", line)
            self.assertNotEqual((namespace, body), previous, f"repeated: {line}")
            previous = (namespace, body)
        client_lines = [line for line in lines if "[1] " in line and "artner" in line]
        self.assertEqual(len(client_lines), 2, client_lines)
        self.assertIn("[1] Authentication succeeded: session 1 as proxy-client, partner "
                      "available: no (0)", client_lines[0])
        self.assertIn("[1] Partner available: yes (1)", client_lines[1])
        self.assertIn("Stopping (SIGTERM)", process.log())
        self.assertNotIn("Received SIGTERM", process.log())


def _umask(test: SynchronousTestCase, value: int) -> None:
    """Set the process umask for the rest of the test."""
    previous = os.umask(value)
    test.addCleanup(os.umask, previous)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class LogFileTests(SynchronousTestCase):
    """Our log file: appends, and reopens after logrotate moved it, with the first mode."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "t.log")

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def test_reopen_after_rename_keeps_the_first_mode(self) -> None:
        """A new log file is 0o640; moved away and reopened under twistd's daemon umask
        (0o077), the new file is 0o640 again and gets the lines written after the reopen."""
        _umask(self, 0o022)
        log = tap.LogFile(self.path)
        self.addCleanup(log.close)
        log.write("first\n")
        log.flush()
        self.assertEqual(_mode(self.path), 0o640)
        _umask(self, 0o077)
        os.rename(self.path, self.path + ".1")
        log.write("still the moved file\n")
        log.reopen()
        log.write("second\n")
        log.flush()
        self.assertEqual(_mode(self.path), 0o640)
        self.assertEqual(self.read(self.path + ".1"), "first\nstill the moved file\n")
        self.assertEqual(self.read(self.path), "second\n")

    def test_an_existing_file_keeps_its_mode(self) -> None:
        """An existing log file is appended to, and its mode (here 0o600) is the mode of
        the files reopened after it, whatever the umask."""
        with open(self.path, "w") as f:
            f.write("old\n")
        os.chmod(self.path, 0o600)
        _umask(self, 0o002)
        log = tap.LogFile(self.path)
        self.addCleanup(log.close)
        log.write("appended\n")
        log.flush()
        self.assertEqual(self.read(self.path), "old\nappended\n")
        os.rename(self.path, self.path + ".1")
        log.reopen()
        self.assertEqual(_mode(self.path), 0o600)

    def test_a_file_logrotate_created_is_used_as_it_is(self) -> None:
        """If logrotate ("create 0644") made the new file before the reopen, it is
        appended to and keeps the mode logrotate gave it."""
        log = tap.LogFile(self.path)
        self.addCleanup(log.close)
        os.rename(self.path, self.path + ".1")
        with open(self.path, "w") as f:
            f.write("made by logrotate\n")
        os.chmod(self.path, 0o644)
        log.reopen()
        log.write("ours\n")
        log.flush()
        self.assertEqual((_mode(self.path), self.read(self.path)),
                         (0o644, "made by logrotate\nours\n"))


class TwistdLoggingTests(SynchronousTestCase):
    """Which twistd command lines give us the log file, and how twistd gets its observer."""

    def parse(self, *args: str) -> tap.Options:
        from twisted.scripts.twistd import ServerOptions

        options = ServerOptions()
        options.parseOptions([*args, "tcptunnel", "--config",
                              os.path.join(CONF, "demo.xml")])
        sub = options.subOptions
        assert isinstance(sub, tap.Options)
        return sub

    def test_which_command_lines_log_to_our_file(self) -> None:
        """--logfile PATH (daemon or -n) and a daemon without --logfile (twistd.log) log to
        our file; stdout (-n, --logfile=-), --syslog and --logger are left to twistd."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "t.log")
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        for args, expected in [
                (["--logfile", path], path), (["-n", "--logfile", path], path),
                ([], os.path.join(directory, "twistd.log")), (["-n"], None),
                (["-n", "--logfile=-"], None), (["--syslog"], None),
                (["--logger", "twisted.logger.jsonFileLogObserver"], None)]:
            log = tap.twistd_log_file(self.parse(*args))
            if log is not None:
                log.close()
            self.assertEqual(None if log is None else log.path, expected, args)
        self.assertIsNone(tap.twistd_log_file(tap.Options()))  # not under twistd

    def test_observer_is_the_application_component(self) -> None:
        """The service makeService returns, added to twistd's Application, sets our
        observer as its ILogObserver (what twistd's AppLogger uses before its own)."""
        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        path = os.path.join(os.path.abspath(self.mktemp()))
        options = self.parse("--logfile", path)
        service = tap.makeService(options)
        assert isinstance(service, tap.TunnelService) and service.log_file is not None
        self.addCleanup(service.log_file.close)
        application = Application("tcptunnel")
        service.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIsNotNone(observer)
        observer({"log_format": "hello {who}", "who": "log", "log_time": 0.0,
                  "log_level": None, "log_namespace": "test"})
        with open(path) as f:
            self.assertIn("hello log", f.read())


class TwistdLogReopenTests(TestCase):
    """A real twistd process: SIGUSR1 after logrotate's rename, and SIGTERM."""

    timeout = 60

    async def test_sigusr1_reopens_with_the_first_mode_and_sigterm_exits_0(self) -> None:
        """twistd -n --umask=077 --logfile t.log (the daemon's umask, in the foreground to
        see the exit status): t.log is 0o640; after a rename and SIGUSR1 the new t.log is
        0o640 too (twistd's own reopen made it 0o600) and gets the next lines; SIGTERM then
        stops with exit status 0, the stop logged as ours."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        config, logfile = os.path.join(work, "settings.xml"), os.path.join(work, "t.log")
        with open(config, "w") as f:
            f.write(f'<Settings {NS}><Instance type="gateway"><Listener ip="127.0.0.1" '
                    f'port="{reserve_port(self)}"/><Session id="1" proxyClientPassword="a" '
                    'proxyServerPassword="b"/></Instance></Settings>')
        process = TwistdProcess()
        reactor.spawnProcess(
            process, sys.executable,
            twistd_command("-n", "--pidfile=", "--umask=077", "--logfile", logfile,
                           "tcptunnel", "--config", config),
            env=child_environment(), path=work)
        self.addCleanup(process.kill)

        def text(path: str) -> str:
            try:
                with open(path) as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        await wait_until(lambda: "Started." in text(logfile), 20, "start-up")
        self.assertEqual(_mode(logfile), 0o640)
        os.rename(logfile, logfile + ".1")
        process.transport.signalProcess(signal.SIGUSR1)  # type: ignore[union-attr]
        await wait_until(lambda: "reopened the log file" in text(logfile), 10,
                         "the reopened log file")
        self.assertEqual(_mode(logfile), 0o640)
        self.assertNotIn("reopened", text(logfile + ".1"))
        process.stop()
        await process.ended
        self.assertEqual((process.exit_code, process.exit_signal), (0, None),
                         text(logfile + ".1") + text(logfile) + process.log())
        self.assertIn("Stopping (SIGTERM)", text(logfile))
        self.assertIn("Server Shut Down.", text(logfile))
        self.assertNotIn("Traceback", text(logfile + ".1") + text(logfile))
