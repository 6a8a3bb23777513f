"""The Proxy-Server role: listen on each Binding, turn each connection into a stream."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from tcptunnel._frames import StreamError
from tcptunnel.config import BindingConfig, ProxyConfig, format_address
from tcptunnel.mux import describe_address
from tcptunnel.ports import AddressKey, ListenerSet, listen
from tcptunnel.proxy import ProxyService
from tcptunnel.splice import SpliceProtocol
from tcptunnel.udp import ServerFlows, UdpBinding, listen_udp


class BindingConnection(SpliceProtocol):
    """An accepted local connection: kept paused until its stream is open."""

    local_name = "client connection"
    __slots__ = ("binding", "client", "proxy", "started")

    def __init__(self, proxy: ProxyServerService, binding: BindingConfig) -> None:
        super().__init__(on_end=proxy.stream_ended)
        self.proxy = proxy
        self.binding = binding
        self.started = proxy.reactor.seconds()

    @property
    def target(self) -> str:
        """host:port of the target."""
        return format_address(self.binding.target_host, self.binding.target_port)

    def describe(self) -> str:
        """``client -> target``, for the stream's log event."""
        return f"{getattr(self, 'client', '?')} -> {self.target}"

    def connectionMade(self) -> None:  # noqa: N802
        """Open a stream for this connection, or refuse it at once."""
        transport = self.transport
        assert transport is not None
        transport.pauseProducing()  # type: ignore[attr-defined]
        link = self.proxy.link
        peer = transport.getPeer()
        self.client = describe_address(peer)  # logged: [::1]:port like every address
        if link is None or not self.proxy.partner_available:
            why = "no link to the Gateway" if link is None else "no Proxy-Client in the session"
            self.proxy.log.warn("[{index}] Connection from {client} to {target} refused: {why}",
                                index=self.proxy.config.index, client=self.client,
                                target=self.target, why=why)
            self._finish(f"refused here ({why})")
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        try:
            self.stream = link.open_stream(self.binding.target_host, self.binding.target_port,
                                           self)
            # Read at once: the first bytes travel as early data with the OPEN.
            self.attach(self.stream)
        except StreamError as e:
            self.proxy.log.warn("[{index}] Connection from {client} to {target} refused: {why}",
                                index=self.proxy.config.index, client=self.client,
                                target=self.target, why=e.message)
            self._finish(f"refused here ({e.message})")
            transport.abortConnection()  # type: ignore[attr-defined]



class BindingFactory(ServerFactory):
    """Accepts connections of one Binding."""

    noisy = False  # no "Starting factory <... at 0x...>": the service logs its Bindings

    def __init__(self, proxy: ProxyServerService, binding: BindingConfig) -> None:
        self.proxy = proxy
        self.binding = binding

    def buildProtocol(self, addr: Any) -> BindingConnection:  # noqa: N802
        """A connection to tunnel."""
        return BindingConnection(self.proxy, self.binding)


class ProxyServerService(ProxyService):
    """A Proxy-Server instance: Bindings plus the link to the Gateway."""

    log = Logger()

    def __init__(self, config: ProxyConfig, reactor: Any) -> None:
        super().__init__(config, reactor)
        self.bindings: ListenerSet[BindingConfig, BindingFactory] = ListenerSet(
            f"[{config.index}] Binding", lambda b: (b.listen_ip, b.listen_port),
            self._open_binding, self._announce_binding)
        # UDP Bindings: their own sockets (a UDP port is not a TCP port) and flow table.
        self.udp = ServerFlows(self)
        self.udp_bindings: ListenerSet[BindingConfig, UdpBinding] = ListenerSet(
            f"[{config.index}] UDP Binding", lambda b: (b.listen_ip, b.listen_port),
            self._open_udp_binding, self._announce_binding)

    @property
    def ports(self) -> list[Any]:
        """Listening ports (TCP and UDP), in the order of the Bindings."""
        tcp, udp = iter(self.bindings.ports), iter(self.udp_bindings.ports)
        ports = []
        for binding in self.config.bindings:
            port = next(udp if binding.protocol == "udp" else tcp, None)
            if port is not None:
                ports.append(port)
        return ports

    def _open_udp_binding(self, key: AddressKey, binding: BindingConfig) -> tuple[Any, UdpBinding]:
        from twisted.internet.error import CannotListenError

        from tcptunnel.config import StartupError

        protocol = UdpBinding(self.udp, binding)
        try:
            port = listen_udp(self.reactor, protocol)
        except CannotListenError as e:
            raise StartupError(f"[{self.config.index}] UDP Binding could not listen on "
                               f"{format_address(binding.listen_ip, binding.listen_port)} "
                               f"({binding.location}): {e.socketError}") from None
        self.udp.add_binding(protocol)
        return port, protocol

    def _open_binding(self, key: AddressKey,
                      binding: BindingConfig) -> tuple[Any, BindingFactory]:
        factory = BindingFactory(self, binding)
        port = listen(self.reactor, binding.listen_ip, binding.listen_port, factory,
                      f"[{self.config.index}] Binding", binding.location)
        return port, factory

    def _announce_binding(self, binding: BindingConfig, port: Any,
                          factory: Any) -> None:
        self.log.info("[{index}] Binding {listen} -> {target} listening{udp}",
                      index=self.config.index, udp=" (udp)" if binding.protocol == "udp" else "",
                      listen=format_address(binding.listen_ip, port.getHost().port),
                      target=format_address(binding.target_host, binding.target_port))

    def startService(self) -> None:  # noqa: N802
        """Listen on every Binding first (a failure stops start-up), then connect."""
        self.bindings.start(_of(self.config.bindings, "tcp"))
        try:
            self.udp_bindings.start(_of(self.config.bindings, "udp"))
        except Exception:
            self.bindings.stop()
            raise
        super().startService()

    def apply_config(self, new: ProxyConfig) -> Any:
        """Reload: Bindings are added, removed or re-targeted, all or nothing (a Binding
        that cannot listen fails the reload with StartupError and changes nothing); open
        streams are untouched.  Fires with False when the link settings changed (the
        instance must restart)."""
        def retarget(key: AddressKey, factory: BindingFactory, binding: BindingConfig) -> None:
            factory.binding = binding  # new target for new connections

        def retarget_udp(key: AddressKey, protocol: UdpBinding, binding: BindingConfig) -> None:
            self.udp.retarget(protocol, binding)  # new flows; open flows keep their target

        apply_link_settings = super().apply_config
        # UDP first: when it cannot apply, nothing changed.  (A TCP Binding that then fails
        # leaves the UDP changes applied: the two sets are not one transaction.)
        return self.udp_bindings.reload(_of(new.bindings, "udp"), retarget_udp).addCallback(
            lambda _: self.bindings.reload(_of(new.bindings, "tcp"), retarget)).addCallback(
            lambda _: apply_link_settings(new))

    def stopService(self) -> Any:  # noqa: N802
        """Stop listening, then close the link; fires when the ports are closed."""
        from twisted.internet.defer import gatherResults, maybeDeferred

        self.udp.stop()
        return gatherResults([self.bindings.stop(), self.udp_bindings.stop(),
                              maybeDeferred(super().stopService)])


def _of(bindings: tuple[BindingConfig, ...], protocol: str) -> list[BindingConfig]:
    """The Bindings of one protocol, in their order."""
    return [binding for binding in bindings if binding.protocol == protocol]
