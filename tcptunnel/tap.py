"""twistd glue: ``twistd tcptunnel --config settings.xml``.

``Options.postOptions`` loads and checks the settings (a bad file is a
``UsageError`` with one precise message); ``makeService`` returns a
MultiService with one child per ``Instance``, in file order, so they start
in that order and stop in reverse.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
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
from tcptunnel.tls import TlsSetupError


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
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if not self.settings.instances:
            raise usage.UsageError(f"{self['config']}: the file defines no <Instance>")


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
    """All instances of one settings file."""

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        for instance in settings.instances:
            child = make_instance_service(instance, reactor)
            child.setName(f"{instance.index}:{instance.role}")
            child.setServiceParent(self)

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
        self.log.info("Started. Send SIGTERM or press Ctrl+C to stop.")

    def stopService(self) -> Any:  # noqa: N802
        """Stop the instances in reverse order."""
        self.log.info("Stopping")
        return super().stopService()


def makeService(options: Options) -> service.IService:  # noqa: N802
    """The twistd entry point."""
    from twisted.internet import reactor

    try:
        return TunnelService(options.settings, reactor)
    except TlsSetupError as e:
        raise SystemExit(f"tcptunnel: {options.settings.path}: {e}") from None
