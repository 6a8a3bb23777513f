"""Operations: reload (in process and by SIGHUP), SIGTERM, SIGUSR1, daemon mode, systemd units."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcptunnel.config import load_settings
from tcptunnel.proxy import ProxyService
from tcptunnel.tap import TunnelService
from tcptunnel.test._harness import (
    CONF,
    NS,
    ROOT,
    EchoProtocol,
    TwistdProcess,
    child_environment,
    connect,
    listen,
    reserve_port,
    twistd_command,
    wait_until,
)


def settings_text(gateway_port: int, bindings: list[tuple[int, int]], allowed: list[int],
                  server_password: str = "ps", extra_session: bool = False) -> str:
    """A three-role settings file on loopback."""
    binding_xml = "".join(
        f'<Binding listenIp="127.0.0.1" listenPort="{listen_port}" targetHost="127.0.0.1" '
        f'targetPort="{target}"/>' for listen_port, target in bindings)
    allowed_xml = "".join(f'<Endpoint host="127.0.0.1" port="{p}"/>' for p in allowed)
    second = ('<Session id="2" proxyClientPassword="x2" proxyServerPassword="y2"/>'
              if extra_session else "")
    return (
        f'<Settings {NS}>\n'
        f'<Instance type="gateway"><Listener ip="127.0.0.1" port="{gateway_port}"/>'
        f'<Session id="1" proxyClientPassword="pc" proxyServerPassword="{server_password}"/>'
        f"{second}</Instance>\n"
        f'<Instance type="proxy-client" host="127.0.0.1" port="{gateway_port}" '
        f'maxRetryDelay="1"><Session id="1" password="pc"/>'
        f"<AllowedTargetEndpoints>{allowed_xml}</AllowedTargetEndpoints></Instance>\n"
        f'<Instance type="proxy-server" host="127.0.0.1" port="{gateway_port}" '
        f'maxRetryDelay="1"><Session id="1" password="{server_password}">{binding_xml}'
        f"</Session></Instance>\n</Settings>\n")


class ReloadTests(TestCase):
    """TunnelService.reload applies changes and leaves untouched streams running."""

    timeout = 60

    async def start(self, text: str) -> tuple[TunnelService, str]:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        service = TunnelService(load_settings(path), reactor)
        service.startService()
        self.addCleanup(lambda: defer.maybeDeferred(service.stopService))
        return service, path

    async def echo_once(self, port: int, data: bytes) -> bytes:
        client = await connect(port)
        client.transport.write(data)
        client.transport.loseWriteConnection()
        self.assertEqual(await client.ended, "clean")
        return bytes(client.received)

    def proxies_ready(self, service: TunnelService) -> bool:
        return all(getattr(child, "partner_available", True) for child in service)

    async def test_reload_keeps_streams(self) -> None:
        """Adding a Binding, a session and an allowed target applies at once; a live stream
        keeps flowing; an invalid file is ignored."""
        echo1 = await listen(self, EchoProtocol)
        echo2 = await listen(self, EchoProtocol)
        gateway, bind1, bind2 = reserve_port(self), reserve_port(self), reserve_port(self)
        service, path = await self.start(settings_text(gateway, [(bind1, echo1)], [echo1]))
        await wait_until(lambda: self.proxies_ready(service), 15, "login")
        live = await connect(bind1)
        live.transport.write(b"before ")
        await wait_until(lambda: bytes(live.received) == b"before ", what="echo")

        with open(path, "w") as f:
            f.write(settings_text(gateway, [(bind1, echo1), (bind2, echo2)], [echo1, echo2],
                                  extra_session=True))
        self.assertTrue(await service.reload())
        self.assertEqual(await self.echo_once(bind2, b"new binding"), b"new binding")
        gateway_service = next(iter(service))
        self.assertIn(2, gateway_service.gateway.sessions)

        with open(path, "w") as f:
            f.write("<Settings broken")
        self.assertFalse(await service.reload())
        self.assertEqual(await self.echo_once(bind2, b"still"), b"still")

        live.transport.write(b"after")
        live.transport.loseWriteConnection()
        self.assertEqual(await live.ended, "clean")
        self.assertEqual(bytes(live.received), b"before after")

    async def test_removed_binding_and_allowed_target(self) -> None:
        """Removing a Binding stops its listener; removing a target denies new streams."""
        echo = await listen(self, EchoProtocol)
        gateway, bind1, bind2 = reserve_port(self), reserve_port(self), reserve_port(self)
        service, path = await self.start(settings_text(gateway, [(bind1, echo), (bind2, echo)],
                                                       [echo]))
        await wait_until(lambda: self.proxies_ready(service), 15, "login")
        with open(path, "w") as f:
            f.write(settings_text(gateway, [(bind1, echo)], []))
        self.assertTrue(await service.reload())
        client = await connect(bind1)
        client.transport.write(b"x")
        self.assertEqual(await client.ended, "reset")  # denied by the new, empty allow-list
        with self.assertRaises(ConnectionRefusedError):  # bind2 stays reserved: no one else
            await connect(bind2)

    async def test_changed_password_closes_session_links(self) -> None:
        """A changed Proxy-Server password closes that role's link only: the Proxy-Server comes
        back with the new settings and tunnels again, while the Proxy-Client keeps its link."""
        echo = await listen(self, EchoProtocol)
        gateway, bind = reserve_port(self), reserve_port(self)
        service, path = await self.start(settings_text(gateway, [(bind, echo)], [echo]))
        await wait_until(lambda: self.proxies_ready(service), 15, "login")
        old_links = {child.config.role: child.link for child in service
                     if isinstance(child, ProxyService)}
        with open(path, "w") as f:
            f.write(settings_text(gateway, [(bind, echo)], [echo], server_password="new-ps"))
        self.assertTrue(await service.reload())

        def proxies() -> dict[str, ProxyService]:
            return {child.config.role: child for child in service
                    if isinstance(child, ProxyService)}

        def server_back() -> bool:
            server = proxies().get("proxy-server")
            return (server is not None and server.link is not None
                    and server.link is not old_links["proxy-server"]
                    and self.proxies_ready(service))

        await wait_until(server_back, 20, "the Proxy-Server to log in again after the reload")
        self.assertIs(proxies()["proxy-client"].link, old_links["proxy-client"])
        self.assertEqual(await self.echo_once(bind, b"new password"), b"new password")


class ProcessTests(TestCase):
    """Signals and daemon mode of a real twistd process."""

    timeout = 60

    def write_settings(self) -> tuple[str, int]:
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        bind = reserve_port(self)
        path = os.path.join(work, "settings.xml")
        with open(path, "w") as f:
            f.write(settings_text(reserve_port(self), [(bind, 9)], [9]))
        return path, bind

    def spawn(self, *args: str, cwd: str) -> TwistdProcess:
        process = TwistdProcess()
        reactor.spawnProcess(process, twistd_command()[0],
                             twistd_command(*args), env=child_environment(), path=cwd)
        self.addCleanup(process.kill)
        return process

    async def test_sighup_invalid_then_sigterm(self) -> None:
        """SIGHUP with a broken file logs the error and keeps running; SIGTERM then stops the
        process gracefully with exit status 0 within a few seconds."""
        path, bind = self.write_settings()
        process = self.spawn("-n", "--pidfile=", "--logfile=-", "tcptunnel", "--config", path,
                             cwd=os.path.dirname(path))
        await wait_until(lambda: "Started." in process.log(), 20, "start-up")
        with open(path, "a") as f:
            f.write("<garbage")
        process.transport.signalProcess("HUP")  # type: ignore[union-attr]
        await wait_until(lambda: "Reload failed" in process.log(), 10, "reload error")
        self.assertFalse(process.ended.called)
        # The binding still listens.  With no partner it resets what it accepts, and under
        # load that reset can beat the connect's completion: reset is listening, refused not.
        try:
            client = await connect(bind)
        except ConnectError as e:
            self.assertNotIsInstance(e, ConnectionRefusedError)
            self.assertIn("104", str(e))
        else:
            client.transport.loseConnection()
        started = time.monotonic()
        process.stop()
        await process.ended
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((process.exit_code, process.exit_signal), (0, None), process.log())
        self.assertIn("Server Shut Down.", process.log())

    async def test_daemon_pidfile_logfile_and_sigusr1(self) -> None:
        """Without -n twistd daemonizes with the pidfile and logfile given; SIGUSR1 reopens
        the log file (logrotate); SIGTERM removes the pidfile."""
        path, _bind = self.write_settings()
        work = os.path.dirname(path)
        pidfile, logfile = os.path.join(work, "t.pid"), os.path.join(work, "t.log")
        launcher = self.spawn("--pidfile", pidfile, "--logfile", logfile, "tcptunnel",
                              "--config", path, cwd=work)
        await launcher.ended  # the launcher exits once the daemon is running
        await wait_until(lambda: os.path.exists(pidfile), 10, "pidfile")
        with open(pidfile) as f:
            pid = int(f.read().strip())
        self.addCleanup(lambda: _kill_quietly(pid))
        await wait_until(lambda: "Started." in read_text(logfile), 20, "daemon start-up")
        os.rename(logfile, logfile + ".1")
        os.kill(pid, signal.SIGUSR1)
        await wait_until(lambda: os.path.exists(logfile), 10, "log reopened")
        os.kill(pid, signal.SIGHUP)  # something to log into the new file
        await wait_until(lambda: "Reload" in read_text(logfile), 10, "log line in new file")
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: not os.path.exists(pidfile), 10, "pidfile removed")


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def read_text(path: str) -> str:
    """A file's text, or "" while it does not exist."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


class SystemdUnitTests(SynchronousTestCase):
    """The shipped systemd units."""

    def test_units_verify(self) -> None:
        """systemd-analyze verify accepts both units (when systemd-analyze is installed)."""
        analyze = shutil.which("systemd-analyze")
        units = [os.path.join(CONF, "tcptunnel.service"), os.path.join(CONF, "tcptunnel@.service")]
        for unit in units:
            with open(unit) as f:
                text = f.read()
            self.assertIn("twistd -n --pidfile= tcptunnel --config", text)
            self.assertIn("NoNewPrivileges=yes", text)
            self.assertIn("ExecReload=/bin/kill -HUP $MAINPID", text)
        if analyze is None:
            raise self.skipTest("systemd-analyze is not installed; the unit texts were checked")
        result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True,
                                cwd=ROOT, check=False)
        relevant = [line for line in (result.stdout + result.stderr).splitlines()
                    if "tcptunnel" in line and "Command" not in line and "not executable"
                    not in line and "No such file" not in line]
        self.assertEqual(relevant, [])


class CertificateRenewalTests(TestCase):
    """A renewed certificate applies to new links on reload; established links stay."""

    timeout = 60

    async def test_renewed_certificate(self) -> None:
        """After the certificate files are replaced and the settings reloaded, a proxy that
        pins the new certificate logs in, while the link made with the old one keeps
        working."""
        from tcptunnel.test._certs import mint

        echo = await listen(self, EchoProtocol)
        work = os.path.abspath(self.mktemp())
        old, new = mint(os.path.join(work, "old")), mint(os.path.join(work, "new"))
        cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
        shutil.copy(old.cert, cert)
        shutil.copy(old.key, key)
        gateway, bind_old, bind_new = reserve_port(self), reserve_port(self), reserve_port(self)

        def proxy_server(pin: str, bind: int) -> str:
            return (f'<Instance type="proxy-server" host="127.0.0.1" port="{gateway}" '
                    f'useSsl="1" certificatePin="{pin}" maxRetryDelay="1"><Session id="1" '
                    f'password="ps"><Binding listenIp="127.0.0.1" listenPort="{bind}" '
                    f'targetHost="127.0.0.1" targetPort="{echo}"/></Session></Instance>')

        def settings(*proxy_servers: str) -> str:
            return (f'<Settings {NS}><Instance type="gateway"><Listener ip="127.0.0.1" '
                    f'port="{gateway}" certificatePemFilePath="{cert}" '
                    f'certificatePemKeyFilePath="{key}"/><Session id="1" '
                    f'proxyClientPassword="pc" proxyServerPassword="ps"/></Instance>'
                    f'<Instance type="proxy-client" host="127.0.0.1" port="{gateway}" '
                    f'useSsl="1" certificatePin="{old.pin_hex}"><Session id="1" '
                    f'password="pc"/></Instance>{"".join(proxy_servers)}</Settings>')

        path = os.path.join(work, "settings.xml")
        with open(path, "w") as f:
            f.write(settings(proxy_server(old.pin_hex, bind_old)))
        service = TunnelService(load_settings(path), reactor)
        service.startService()
        self.addCleanup(lambda: defer.maybeDeferred(service.stopService))
        await wait_until(lambda: all(getattr(c, "partner_available", True) for c in service),
                         15, "login with the old certificate")
        live = await connect(bind_old)
        live.transport.write(b"old ")
        await wait_until(lambda: bytes(live.received) == b"old ", what="echo")

        shutil.copy(new.cert, cert)
        shutil.copy(new.key, key)
        with open(path, "w") as f:
            f.write(settings(proxy_server(old.pin_hex, bind_old),
                             proxy_server(new.pin_hex, bind_new)))
        self.assertTrue(await service.reload())
        newcomer = service.getServiceNamed("3:proxy-server")
        await wait_until(lambda: newcomer.partner_available, 15,
                         "login with the renewed certificate")
        live.transport.write(b"link")
        live.transport.loseWriteConnection()
        self.assertEqual(await live.ended, "clean")
        self.assertEqual(bytes(live.received), b"old link")
