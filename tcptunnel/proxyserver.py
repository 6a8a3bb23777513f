"""The Proxy-Server role: listen on each Binding, turn each connection into a stream."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from tcptunnel import _httpconnect, _socks
from tcptunnel._frames import Reason, StreamError
from tcptunnel._proxyproto import ClientAddress, ClientAddressError, encode_client_address
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
        return self.binding.target

    def client_fields(self) -> tuple[tuple[int, bytes], ...]:
        """The OPEN fields about the client: CLIENT_ADDRESS (its address and the one it
        connected to), for a PROXY protocol header at the target; none when the
        transport's addresses are not IP (tests' fakes, UNIX sockets)."""
        transport: Any = self.transport
        peer, host = transport.getPeer(), transport.getHost()
        try:
            address = ClientAddress.from_hosts(peer.host, peer.port, host.host, host.port)
        except (AttributeError, ClientAddressError):
            return ()
        return (encode_client_address(address),)

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
        e2e = self.proxy.e2e
        if e2e is not None and e2e.hold(self, self.connectionMade):
            return  # unread until the end-to-end handshake in progress ends (<= 10 s)
        try:
            host, port = self.binding.fixed_target
            self.stream = link.open_stream(host, port, self, fields=self.client_fields())
            # Read at once: the first bytes travel as early data with the OPEN.
            self.attach(self.stream)
        except StreamError as e:
            self.proxy.log.warn("[{index}] Connection from {client} to {target} refused: {why}",
                                index=self.proxy.config.index, client=self.client,
                                target=self.target, why=e.message)
            self._finish(f"refused here ({e.message})")
            transport.abortConnection()  # type: ignore[attr-defined]


class RequestBindingConnection(BindingConnection):
    """A connection to a ``type="socks5"`` or ``type="http-connect"`` Binding: the client
    names its target in a handshake (tcptunnel._socks, tcptunnel._httpconnect), which
    becomes the stream's OPEN; the client hears success only once the Proxy-Client's dial
    succeeded (OPEN_RESULT ok), else the reason it failed.  Then it is the same splice."""

    __slots__ = ("deadline", "http", "opened", "requested", "socks")

    def __init__(self, proxy: ProxyServerService, binding: BindingConfig) -> None:
        super().__init__(proxy, binding)
        self.socks: _socks.SocksServer | None = None
        self.http: _httpconnect.ConnectParser | None = None
        self.requested: tuple[str, int] | None = None
        self.opened = False
        self.deadline: Any = None

    @property
    def target(self) -> str:
        """host:port the client asked for (or what is still awaited)."""
        if self.requested is None:
            return "(no request yet)"
        return format_address(*self.requested)

    def connectionMade(self) -> None:  # noqa: N802
        """Start the handshake, with a deadline; the stream waits for the request."""
        transport: Any = self.transport
        self.client = describe_address(transport.getPeer())
        credentials = self.binding.credentials
        if self.binding.type == "socks5":
            self.socks = _socks.SocksServer(credentials)
            timeout = _socks.HANDSHAKE_TIMEOUT
        else:
            self.http = _httpconnect.ConnectParser(credentials)
            timeout = _httpconnect.HEAD_TIMEOUT
        self.deadline = self.proxy.reactor.callLater(timeout, self._handshake_timeout)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Handshake bytes to the parser; once the stream exists, straight to it."""
        if self.stream is not None:
            super().dataReceived(data)
            return
        if self.done:
            return
        try:
            if self.socks is not None:
                events: list[Any] = self.socks.receive_data(data)
                self._write(self.socks.data_to_send())
            else:
                assert self.http is not None
                events = self.http.receive_data(data)
        except _socks.SocksError as e:
            self._refuse(f"SOCKS5: {e.message}", e.reply)
            return
        except _httpconnect.HttpConnectError as e:
            self._refuse(f"HTTP {e.status}: {e.message}", e.response)
            return
        for event in events:
            if self.done:
                return
            if isinstance(event, _socks.ConnectRequested | _httpconnect.ConnectRequested):
                self._request(event.host, event.port)
            elif isinstance(event, _socks.EarlyData | _httpconnect.EarlyData):
                if self.stream is not None:  # bytes after the request: early data
                    super().dataReceived(event.data)
            elif isinstance(event, _socks.AuthenticationFailed):
                self._refuse(f"SOCKS5 login refused: {event.why}", b"")
            elif isinstance(event, _socks.CommandRefused):
                self._refuse(f"SOCKS5 {event.name} is not supported (CONNECT only)", b"")

    def _request(self, host: str, port: int) -> None:
        """The client asked for host:port: open the stream (names unresolved: the
        Proxy-Client resolves them, where the target network's DNS is)."""
        self._cancel_deadline()  # from here the dial's own deadline runs, at the Proxy-Client
        self.requested = (host, port)
        link = self.proxy.link
        if link is None or not self.proxy.partner_available:
            why = "no link to the Gateway" if link is None else "no Proxy-Client in the session"
            self._refuse(why, self._answer(Reason.NO_PARTNER, why))
            return
        e2e = self.proxy.e2e
        if e2e is not None and e2e.hold(self, lambda: self._request(host, port)):
            return  # the end-to-end handshake in progress ends within 10 s
        try:
            stream = link.open_stream(host, port, self, fields=self.client_fields())
        except StreamError as e:
            self._refuse(e.message, self._answer(e.reason, e.message))
            return
        self.stream = stream
        self.attach(stream)

    def _answer(self, reason: Reason, message: str = "") -> bytes:
        """The client's reply for a stream's OPEN_RESULT (or a refusal here)."""
        if self.socks is not None:
            return self.socks.reply(_socks.reply_for_reason(reason))
        return _httpconnect.response_for_reason(reason, message)

    def stream_opened(self) -> None:
        """The target is connected: tell the client, then the tunnel carries its bytes."""
        self.opened = True
        self._write(self._answer(Reason.OK))
        super().stream_opened()

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Before the open: the client hears why (refused, unreachable, denied, ...) and the
        connection closes cleanly after it; after it, a reset as for any stream."""
        if self.opened or self.done:
            super().stream_reset(reason, message, remote)
            return
        self._write(self._answer(reason, message))
        self._finish(f"failed to open ({reason.name}{': ' + message if message else ''})")
        self._close()

    def _refuse(self, why: str, answer: bytes) -> None:
        """The handshake failed or was refused here: answer, log, close."""
        self._cancel_deadline()
        self.proxy.log.warn("[{index}] {kind} connection from {client} to {target} refused: "
                            "{why}", index=self.proxy.config.index, kind=self.binding.type,
                            client=self.client, target=self.target, why=why)
        self._write(answer)
        self._finish(f"refused here ({why})")
        self._close()

    def _handshake_timeout(self) -> None:
        self.deadline = None
        if self.done or self.requested is not None:
            return
        answer = _httpconnect.timeout_response() if self.http is not None else b""
        what = "SOCKS5 handshake" if self.socks is not None else "CONNECT request head"
        timeout = (_socks.HANDSHAKE_TIMEOUT if self.socks is not None
                   else _httpconnect.HEAD_TIMEOUT)
        self._refuse(f"the {what} did not arrive within {timeout:g} s", answer)

    def _cancel_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def _write(self, data: bytes) -> None:
        transport: Any = self.transport
        if data and transport is not None:
            transport.write(data)

    def _close(self) -> None:
        """Close after what was written (a paused producer would hold the close back)."""
        transport: Any = self.transport
        if transport is not None:
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()
            transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        """Also stop the handshake deadline."""
        self._cancel_deadline()
        if reason is None:
            super().connectionLost()
        else:
            super().connectionLost(reason)


class BindingFactory(ServerFactory):
    """Accepts connections of one Binding."""

    noisy = False  # no "Starting factory <... at 0x...>": the service logs its Bindings

    def __init__(self, proxy: ProxyServerService, binding: BindingConfig) -> None:
        self.proxy = proxy
        self.binding = binding

    def buildProtocol(self, addr: Any) -> BindingConnection:  # noqa: N802
        """A connection to tunnel (a handshake first on socks5 / http-connect Bindings)."""
        if self.binding.type == "tcp":
            return BindingConnection(self.proxy, self.binding)
        return RequestBindingConnection(self.proxy, self.binding)


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
                      target=binding.target)

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

    def link_draining(self, link: Any) -> None:
        """The Gateway drains ``link``: its UDP flows move to the new link (tcptunnel.udp:
        at each flow's next datagram, once the new link can take it)."""
        super().link_draining(link)
        if link.draining:
            self.udp.link_draining(link)

    def stopService(self) -> Any:  # noqa: N802
        """Stop listening, then close the link; fires when the ports are closed."""
        from twisted.internet.defer import gatherResults, maybeDeferred

        self.udp.stop()
        return gatherResults([self.bindings.stop(), self.udp_bindings.stop(),
                              maybeDeferred(super().stopService)])


def _of(bindings: tuple[BindingConfig, ...], protocol: str) -> list[BindingConfig]:
    """The Bindings of one protocol, in their order."""
    return [binding for binding in bindings if binding.protocol == protocol]
