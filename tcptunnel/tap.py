"""twistd glue: ``twistd tcptunnel --config settings.xml``.

``Options.postOptions`` loads and checks the settings (a bad file is a
``UsageError`` with one precise message); ``makeService`` returns a
MultiService with one child per ``Instance``, in file order, so they start
in that order and stop in reverse.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from tcptunnel.config import (
    ConfigError,
    GatewayConfig,
    InstanceConfig,
    Settings,
    StartupError,
    load_settings,
)
from tcptunnel.heap import HeapTrimmer, glibc_allocator
from tcptunnel.tls import TlsSetupError

# Children of TunnelService that are not Instances (no config, not reloaded).
AUXILIARY_SERVICES = frozenset({"status", "heap-trimmer"})


class Options(usage.Options):
    """Command-line options of the tcptunnel plugin."""

    synopsis = "[--config settings.xml]"
    longdesc = ("Run the Gateway / Proxy-Server / Proxy-Client instances of a TcpTunnel "
                "settings.xml file (see docs/configuration.md).")
    optParameters = [  # noqa: N815 - Twisted attribute name
        ["config", "c", "settings.xml", "Path of the settings file."],
    ]

    settings: Settings

    def postOptions(self) -> None:  # noqa: N802
        """Load the settings file; any problem is a UsageError naming file and line."""
        try:
            self.settings = load_settings(self["config"])
            if not self.settings.instances:
                raise ConfigError(f"{self['config']}: the file defines no <Instance>")
        except ConfigError as e:
            # twistd prints usage errors, with the whole help text, on stdout; put the one
            # line that matters on stderr too, where scripts and service managers look.
            sys.stderr.write(f"tcptunnel: {e}\n")
            raise usage.UsageError(str(e)) from None


def make_instance_service(instance: InstanceConfig, reactor: Any) -> service.IService:
    """The service for one Instance."""
    if isinstance(instance, GatewayConfig):
        from tcptunnel.gateway import GatewayService

        return GatewayService(instance, reactor)
    if instance.role == "proxy-server":
        from tcptunnel.proxyserver import ProxyServerService

        return ProxyServerService(instance, reactor)
    from tcptunnel.proxyclient import ProxyClientService

    return ProxyClientService(instance, reactor)


class TunnelService(service.MultiService):
    """All instances of one settings file; SIGHUP reloads it."""

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self._previous_sighup: Any = None
        for instance in settings.instances:
            self._add_instance(instance)
        if settings.status is not None:
            from tcptunnel.status import StatusService

            status = StatusService(settings.status, self, reactor)
            status.setName("status")
            status.setServiceParent(self)
        trimmer = HeapTrimmer(reactor, glibc_allocator())
        trimmer.setName("heap-trimmer")
        trimmer.setServiceParent(self)

    def _add_instance(self, instance: InstanceConfig) -> Any:
        child = make_instance_service(instance, self.reactor)
        child.setName(f"{instance.index}:{instance.role}")
        child.setServiceParent(self)
        return child

    @defer.inlineCallbacks
    def reload(self) -> Any:
        """Re-read the settings file and apply what changed (see docs/operations.md).

        An invalid file is logged and ignored: everything keeps running as it was.
        Instances are matched by position and role; unchanged parts keep their links and
        streams.  Fires with True when the new settings were applied.
        """
        path = self.settings.path
        self.log.info("Reloading {path}", path=path)
        try:
            settings = load_settings(path)
        except ConfigError as e:
            self.log.error("Reload failed, keeping the running configuration: {error}",
                           error=str(e))
            return False
        current = {(child.config.index, child.config.role): child for child in self
                   if child.name not in AUXILIARY_SERVICES}
        if settings.status != self.settings.status:
            self.log.warn("<Status> changed: that takes effect at the next restart")
        for instance in settings.instances:
            child = current.pop((instance.index, instance.role), None)
            name = f"{instance.index}:{instance.role}"
            try:
                if child is None:
                    self.log.info("[{name}] added", name=name)
                    self._add_instance(instance)
                elif not (yield defer.maybeDeferred(child.apply_config, instance)):
                    self.log.info("[{name}] link settings changed: restarting it", name=name)
                    yield defer.maybeDeferred(child.disownServiceParent)
                    child = None
                    self._add_instance(instance)
            except (StartupError, TlsSetupError) as e:
                state = "not changed" if child is not None else "could not be started"
                self.log.error("[{name}] {state}: {error}", name=name, state=state,
                               error=str(e))
        for child in current.values():
            self.log.info("[{name}] removed", name=child.name)
            yield defer.maybeDeferred(child.disownServiceParent)
        self.settings = settings
        self.log.info("Reloaded {path}", path=path)
        return True

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def _install_log_reopen(self) -> None:
        """Make SIGUSR1 reopen twistd's log file, as logrotate expects.

        twistd's own SIGUSR1 handler rotates the file itself (and does nothing once
        logrotate has moved it away); the LogFile it rotates is in that handler's closure.
        """
        handler = signal.getsignal(signal.SIGUSR1)
        cells = getattr(handler, "__closure__", None) or ()
        log_file = next((c.cell_contents for c in cells
                         if callable(getattr(c.cell_contents, "reopen", None))), None)
        if log_file is None:
            return  # logging to stdout or syslog: nothing to reopen
        reactor = self.reactor

        def reopen(signum: int, frame: Any) -> None:
            reactor.callFromThread(log_file.reopen)

        signal.signal(signal.SIGUSR1, reopen)

    def startService(self) -> None:  # noqa: N802
        """Start the instances in file order; if one fails, stop those already started."""
        self.log.info("Starting {n} instance(s) from {path}", n=len(self.settings.instances),
                      path=self.settings.path)
        service.Service.startService(self)
        started: list[service.IService] = []
        for child in self:
            try:
                child.startService()
            except (StartupError, TlsSetupError) as e:
                for done in reversed(started):
                    done.stopService()
                self.running = False
                self.log.critical("Start-up failed: {error}", error=str(e))
                # twistd has not started the reactor yet: exit with the message
                # alone rather than a traceback.
                raise SystemExit(f"tcptunnel: start-up failed: {e}") from None
            started.append(child)
            self.log.info("[{name}] started", name=child.name)
        if threading.current_thread() is threading.main_thread():
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
            self._install_log_reopen()
        self.log.info("Started. Send SIGHUP to reload, SIGTERM or Ctrl+C to stop.")

    def stopService(self) -> Any:  # noqa: N802
        """Stop the instances in reverse order."""
        self.log.info("Stopping")
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        # twistd ends itself with the signal that stopped it; a stop on SIGTERM is our
        # normal, graceful shutdown, and process managers should see exit status 0.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        return super().stopService()


def makeService(options: Options) -> service.IService:  # noqa: N802
    """The twistd entry point."""
    from twisted.internet import reactor

    try:
        return TunnelService(options.settings, reactor)
    except TlsSetupError as e:
        raise SystemExit(f"tcptunnel: {options.settings.path}: {e}") from None
