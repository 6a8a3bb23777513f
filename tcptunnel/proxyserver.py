"""The Proxy-Server role: listen on each Binding, turn each connection into a stream."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from tcptunnel._frames import StreamError
from tcptunnel.config import BindingConfig, ProxyConfig, StartupError, format_address
from tcptunnel.ports import AddressKey, address_keys, listen
from tcptunnel.proxy import ProxyService
from tcptunnel.splice import SpliceProtocol


class BindingConnection(SpliceProtocol):
    """An accepted local connection: kept paused until its stream is open."""

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
        self.client = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
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
        self._listening: dict[AddressKey, tuple[Any, BindingFactory]] = {}

    @staticmethod
    def _keys(config: ProxyConfig) -> list[AddressKey]:
        return address_keys([(b.listen_ip, b.listen_port) for b in config.bindings])

    @property
    def ports(self) -> list[Any]:
        """Listening ports, in the order of the Bindings."""
        return [self._listening[key][0] for key in self._keys(self.config)
                if key in self._listening]

    def _listen(self, binding: BindingConfig, key: AddressKey) -> None:
        factory = BindingFactory(self, binding)
        port = listen(self.reactor, binding.listen_ip, binding.listen_port, factory,
                      f"[{self.config.index}] Binding", binding.location)
        self._listening[key] = (port, factory)
        self.log.info("[{index}] Binding {listen} -> {target} listening",
                      index=self.config.index,
                      listen=format_address(binding.listen_ip, port.getHost().port),
                      target=format_address(binding.target_host, binding.target_port))

    def startService(self) -> None:  # noqa: N802
        """Listen on every Binding first (a failure stops start-up), then connect."""
        try:
            for binding, key in zip(self.config.bindings, self._keys(self.config), strict=True):
                self._listen(binding, key)
        except StartupError:
            for port, _factory in self._listening.values():
                port.stopListening()
            self._listening.clear()
            raise
        super().startService()

    def apply_config(self, new: ProxyConfig) -> bool:
        """Reload: Bindings are added, removed or re-targeted; open streams are untouched."""
        if not super().apply_config(new):
            return False
        wanted = dict(zip(self._keys(new), new.bindings, strict=True))
        for key in set(self._listening) - set(wanted):
            port, _factory = self._listening.pop(key)
            port.stopListening()
            self.log.info("[{index}] Binding on {listen} removed", index=new.index,
                          listen=format_address(key[0], max(key[1], 0)))
        for key, binding in wanted.items():
            if key in self._listening:
                self._listening[key][1].binding = binding  # new target for new connections
                continue
            try:
                self._listen(binding, key)
            except StartupError as e:
                self.log.error("{error}", error=str(e))
        return True

    def stopService(self) -> Any:  # noqa: N802
        """Stop listening, then close the link; fires when the ports are closed."""
        from twisted.internet.defer import gatherResults, maybeDeferred

        closing = [maybeDeferred(port.stopListening) for port, _ in self._listening.values()]
        self._listening.clear()
        closing.append(maybeDeferred(super().stopService))
        return gatherResults(closing)
