"""TCP ports and connectors whose connections send what an event wrote at the end of that event.

Twisted's TCP transport never sends in ``write()``: it buffers the bytes and asks the reactor to
report the socket writable, so they leave one reactor iteration later (``epoll_ctl`` to watch
for writability, ``epoll_wait``, a dispatch, ``send``, ``epoll_ctl`` to stop watching).  A relay
writes in nearly every event it handles, so that extra iteration is paid at every hop of every
round trip and of every connection set-up.  The transports here note the connections written to
while one of their events (data readable, socket writable, connect finished, connection
accepted) is handled, and when the handler returns they send what those connections hold:
one ``send`` per connection per event, as many as before (all writes of an event still go out
together, so bulk transfer keeps its large sends), but no extra reactor iteration.

What cannot be sent at once (the socket buffer is full), a write made outside such an event
(a timer, a Deferred fired from elsewhere), and every close or half-close take Twisted's usual
path through the reactor, so the connections behave exactly as Twisted's own; only the moment
of the ``send`` moves.  Reactors that are not Twisted's POSIX socket reactors (tests'
``MemoryReactor``) get plain ``listenTCP`` / ``connectTCP``.

These classes rely on Twisted internals, each named in ``TWISTED_INTERNALS`` and checked at
the first use; if the installed Twisted changed one, or ``TCPTUNNEL_TWISTED_TRANSPORTS=1`` is
set, or :func:`use_twisted_transports` was called, Twisted's own transports are used instead.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, cast

from twisted.copyright import version as twisted_version
from twisted.internet import abstract, base, tcp
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from zope.interface import directlyProvides, providedBy


class _PendingSends:
    """The connections written to during the event being handled.

    One per process: the reactor handles one event at a time on one thread, so no two
    events' sends can interleave.
    """

    log = Logger()

    def __init__(self) -> None:
        self.depth = 0  # > 0 while an event (or the sending at its end) is being handled
        self.connections: list[_SendAtEventEnd] = []

    def add(self, connection: _SendAtEventEnd) -> None:
        """Send for ``connection`` at the end of the current event."""
        if not connection.send_queued:  # a flag, not a list scan: one event may write to
            connection.send_queued = True  # every stream of a link
            self.connections.append(connection)

    def run(self, handler: Any) -> Any:
        """Run an event handler; when the outermost one returns, send what it wrote."""
        self.depth += 1
        try:
            return handler()
        finally:
            if self.depth == 1:
                self._send_all()
            self.depth -= 1

    def _send_all(self) -> None:
        # A send can resume a producer that writes again: those writes join the list.
        connections = self.connections
        index = 0
        while index < len(connections):
            connection = connections[index]
            index += 1
            connection.send_queued = False
            try:
                connection.send_pending()
            except Exception:
                # Not expected (Twisted's doWrite reports socket errors by its return
                # value); the reactor gets the connection back and meets it again.
                self.log.failure("Sending at the end of an event failed")
                if connection.connected:
                    connection.wait_until_writable()
        connections.clear()


_pending = _PendingSends()


class _SendAtEventEnd:
    """Mixin for Twisted's TCP connections: defer the wait for writability to the end of the
    event being handled, and send then.  Must come before the Twisted class in the bases."""

    send_queued = False  # in _pending's list

    # What the mixin reads of the Twisted connection it is mixed into (Twisted's names).
    connected: int
    disconnecting: int
    dataBuffer: bytes  # noqa: N815
    _tempDataBuffer: list[bytes]  # noqa: N815

    def startWriting(self) -> None:  # noqa: N802
        """Called by ``write`` with bytes to send: during an event, send at its end."""
        if _pending.depth and self.connected and not self.disconnecting:
            _pending.add(self)
            return
        self.wait_until_writable()

    def wait_until_writable(self) -> None:
        """Twisted's own startWriting: the reactor calls doWrite when the socket can take
        more."""
        super().startWriting()  # type: ignore[misc]

    def send_pending(self) -> None:
        """Send now; leave to the reactor what does not go out, and any close or error."""
        if not self.connected:
            return  # lost meanwhile (as with Twisted's own path, nothing is left to send)
        if (not self.disconnecting and self.doWrite() is None
                and not (self.dataBuffer or self._tempDataBuffer)):
            return
        # Unsent bytes, a close begun in the handler, or a write error (the reactor's
        # doWrite meets it again and tears the connection down the usual way).
        self.wait_until_writable()

    def doRead(self) -> Any:  # noqa: N802
        """Readable: handle it, then send what the handler wrote."""
        return _pending.run(super().doRead)  # type: ignore[misc]

    def doWrite(self) -> Any:  # noqa: N802
        """Writable: send, and what a resumed producer writes goes out in the same event."""
        return _pending.run(super().doWrite)  # type: ignore[misc]


class _Server(_SendAtEventEnd, tcp.Server):
    """An accepted connection."""


class _Client(_SendAtEventEnd, tcp.Client):
    """An outgoing connection."""

    def doConnect(self) -> Any:  # noqa: N802
        """Connect finished (or failed): what ``connectionMade`` wrote goes out now."""
        return _pending.run(super().doConnect)


class _Port(tcp.Port):
    """A listening port whose accepted connections are ``_Server``."""

    transport = _Server

    def doRead(self) -> Any:  # noqa: N802
        """Accept: what the new connections' ``connectionMade`` wrote goes out now."""
        return _pending.run(super().doRead)


class _Connector(tcp.Connector):
    """A connector whose connections are ``_Client``."""

    def _makeTransport(self) -> _Client:  # noqa: N802
        return _Client(self.host, self.port, self.bindAddress, self, self.reactor)


# The accept queue of every listening socket (Gateway Listeners, Bindings, the status page):
# as deep as the kernel allows (net.core.somaxconn, which silently caps any larger backlog),
# at most 4,096.  Twisted's default of 50 dropped 1,756-1,969 SYNs in each reconnect storm of
# 2,000 links (docs/benchmarks.md), each dropped SYN costing the proxy 1-3 s before its resend.
MAX_LISTEN_BACKLOG = 4096
# When somaxconn cannot be read (not Linux): what Linux has had as its default since 5.4.
DEFAULT_LISTEN_BACKLOG = 4096
_SOMAXCONN = "/proc/sys/net/core/somaxconn"


def listen_backlog(somaxconn_path: str = _SOMAXCONN) -> int:
    """The backlog listen_tcp asks for: ``net.core.somaxconn`` (read from ``somaxconn_path``),
    at most :data:`MAX_LISTEN_BACKLOG`, at least 50 (Twisted's default)."""
    try:
        with open(somaxconn_path) as f:
            somaxconn = int(f.read().strip())
    except (OSError, ValueError):
        somaxconn = DEFAULT_LISTEN_BACKLOG
    return max(50, min(somaxconn, MAX_LISTEN_BACKLOG))


def listen_tcp(reactor: Any, port: int, factory: Any, backlog: int | None = None,
               interface: str = "") -> Any:
    """Like ``reactor.listenTCP``; accepted connections send at the end of each event.
    ``backlog`` is :func:`listen_backlog` unless given."""
    if backlog is None:
        backlog = listen_backlog()
    if not isinstance(reactor, PosixReactorBase) or not using_own_transports():
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = _Port(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def connect_tcp(reactor: Any, host: str, port: int, factory: Any, timeout: float = 30.0,
                bind_address: Any = None) -> Any:
    """Like ``reactor.connectTCP``; the connection sends at the end of each event."""
    if not isinstance(reactor, PosixReactorBase) or not using_own_transports():
        return reactor.connectTCP(host, port, factory, timeout=timeout,
                                  bindAddress=bind_address)
    connector = _Connector(host, port, factory, timeout, bind_address, reactor)
    connector.connect()
    return connector


class _DialingReactor:
    """A view of a reactor whose ``connectTCP`` is ``connect_tcp``; everything else, and
    every interface the reactor provides, is the reactor's own."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30.0,  # noqa: N802
                   bindAddress: Any = None) -> Any:  # noqa: N803
        """``connect_tcp`` on the reactor."""
        return connect_tcp(self._reactor, host, port, factory, timeout, bindAddress)


def dialing_reactor(reactor: Any) -> Any:
    """``reactor`` for code that connects through it (``HostnameEndpoint``), such that its
    connections send at the end of each event too (the reactor itself when Twisted's own
    transports are in use)."""
    if not isinstance(reactor, PosixReactorBase) or not using_own_transports():
        return reactor
    return _DialingReactor(reactor)


# --- The Twisted internals the classes above rely on, checked (the canary) ------------------
#
# Subclassing Twisted's TCP transports ties this module to names Twisted does not promise to
# keep.  Each is listed here with what it is for; check_twisted_internals() verifies them in
# a few microseconds without a socket, at the first listen or connect.  If one changed, this
# module falls back to Twisted's own transports (one warning naming what changed), which
# costs a reactor iteration per hop but is otherwise the same.  The canary test
# (test_sockets.TwistedInternalsTests) runs these checks and the behaviour on real sockets.

_ENVIRONMENT = "TCPTUNNEL_TWISTED_TRANSPORTS"


def _parameters(function: Any) -> list[str] | None:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def _has_parameters(owner: Any, name: str, expected: list[str]) -> str | None:
    function = owner.__dict__.get(name) if isinstance(owner, type) else None
    if function is None:
        function = getattr(owner, name, None)
    if not callable(function):
        return "is missing" if function is None else "is no longer a method"
    found = _parameters(function)
    if found is not None and found != expected:
        return f"takes ({', '.join(found)}), expected ({', '.join(expected)})"
    return None


def _source_mentions(function: Any, text: str) -> str | None:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None  # no source installed: only the behaviour tests can tell
    where = function.__qualname__
    return None if text in source else f"(via {where}) is no longer called"


def _port_transport() -> str | None:
    transport = getattr(tcp.Port, "transport", None)
    if not (isinstance(transport, type) and issubclass(transport, tcp.Server)):
        return "is no longer the class of accepted connections"
    return _has_parameters(tcp.Server, "__init__",
                           ["self", "sock", "protocol", "client", "server", "sessionno",
                            "reactor"])


class _WriteProbe(tcp.Server):
    """A socketless tcp.Server that runs Twisted's own write / doWrite code: records
    startWriting and takes ``accept`` bytes per send."""

    def __init__(self, accept: int) -> None:  # no socket: FileDescriptor's state only
        abstract.FileDescriptor.__init__(self, reactor=cast(Any, object()))
        self.connected = 1
        self.accept = accept
        self.write_waits = 0

    def startWriting(self) -> None:  # noqa: N802
        self.write_waits += 1

    def stopWriting(self) -> None:  # noqa: N802
        pass

    def writeSomeData(self, data: Any) -> int:  # noqa: N802
        return min(self.accept, len(data))


def _buffered(probe: _WriteProbe) -> int:
    return len(probe.dataBuffer) - probe.offset + sum(map(len, probe._tempDataBuffer))


def _write_path() -> str | None:
    """write() buffers and calls startWriting(); doWrite() returns None whether all or part
    was sent, and what was not sent stays in dataBuffer / _tempDataBuffer."""
    try:
        whole, part = _WriteProbe(accept=1 << 20), _WriteProbe(accept=2)
        for probe in (whole, part):
            probe.write(b"12345")
            if probe.write_waits != 1 or _buffered(probe) != 5:
                return "write() no longer buffers the bytes and calls startWriting()"
            if probe.doWrite() is not None:
                return "doWrite() no longer returns None after a send"
        if _buffered(whole) != 0 or _buffered(part) != 3:
            return "doWrite() no longer leaves exactly the unsent bytes in the buffers"
    except Exception as e:  # any change in how these work
        return f"no longer works as before ({type(e).__name__}: {e})"
    return None


# (name, what sockets.py needs of it, check returning what changed or None)
TWISTED_INTERNALS: list[tuple[str, str, Callable[[], str | None]]] = [
    ("twisted.internet.posixbase.PosixReactorBase", "the reactors whose TCP we subclass",
     lambda: None if isinstance(PosixReactorBase, type) else "is missing"),
    ("twisted.internet.tcp.Port.__init__", "_Port(port, factory, backlog, interface, reactor)",
     lambda: _has_parameters(tcp.Port, "__init__",
                             ["self", "port", "factory", "backlog", "interface", "reactor"])),
    ("twisted.internet.tcp.Port.transport", "the class Port.doRead builds connections from",
     _port_transport),
    ("twisted.internet.tcp.Port.doRead", "accepts, building self.transport(...)",
     lambda: _has_parameters(tcp.Port, "doRead", ["self"])
     or _source_mentions(tcp.Port.doRead, "self.transport(")),
    ("twisted.internet.tcp.Connector.__init__",
     "_Connector(host, port, factory, timeout, bindAddress, reactor)",
     lambda: _has_parameters(tcp.Connector, "__init__",
                             ["self", "host", "port", "factory", "timeout", "bindAddress",
                              "reactor"])),
    ("twisted.internet.tcp.Connector._makeTransport",
     "where BaseConnector.connect builds the Client",
     lambda: _has_parameters(tcp.Connector, "_makeTransport", ["self"])
     or _source_mentions(base.BaseConnector.connect, "self._makeTransport(")),
    ("twisted.internet.tcp.Client.__init__",
     "_Client(host, port, bindAddress, connector, reactor)",
     lambda: _has_parameters(tcp.Client, "__init__",
                             ["self", "host", "port", "bindAddress", "connector", "reactor"])),
    ("twisted.internet.tcp.BaseClient.doConnect", "the connect event (connectionMade)",
     lambda: _has_parameters(tcp.BaseClient, "doConnect", ["self"])),
    ("twisted.internet.tcp.Connection.doRead", "the read event",
     lambda: _has_parameters(tcp.Connection, "doRead", ["self"])),
    ("twisted.internet.abstract.FileDescriptor.doWrite", "the write event, and our send",
     lambda: _has_parameters(abstract.FileDescriptor, "doWrite", ["self"])),
    ("twisted.internet.abstract.FileDescriptor.startWriting",
     "what write() calls to wait for writability",
     lambda: _has_parameters(abstract.FileDescriptor, "startWriting", ["self"])),
    ("twisted.internet.abstract.FileDescriptor.dataBuffer/_tempDataBuffer/connected/"
     "disconnecting", "what write() and doWrite() leave unsent, and the connection state",
     _write_path),
]


def check_twisted_internals() -> list[str]:
    """``"<name> <what changed>"`` for each Twisted internal this module relies on that the
    installed Twisted changed; empty when all hold."""
    problems = []
    for name, _why, check in TWISTED_INTERNALS:
        try:
            changed = check()
        except Exception as e:
            changed = f"could not be checked ({type(e).__name__}: {e})"
        if changed is not None:
            problems.append(f"{name} {changed}")
    return problems


class _Mode:
    """Whether listen_tcp / connect_tcp use the transports above (decided once, at the
    first use, unless use_twisted_transports() decided it before)."""

    log = Logger()
    own: bool | None = None

    @classmethod
    def decide(cls) -> bool:
        if cls.own is None:
            setting = os.environ.get(_ENVIRONMENT, "").strip().lower()
            if setting in ("1", "true", "yes", "on"):
                cls.log.info("{variable}={value}: using Twisted's own TCP transports",
                             variable=_ENVIRONMENT, value=setting)
                cls.own = False
            elif problems := check_twisted_internals():
                cls.log.warn(
                    "Twisted {version} changed what tcptunnel's send-at-event-end transports "
                    "rely on ({problems}); using Twisted's own TCP transports instead (one "
                    "reactor iteration more per hop)",
                    version=twisted_version, problems="; ".join(problems))
                cls.own = False
            else:
                cls.own = True
        return cls.own


def use_twisted_transports(enabled: bool = True) -> None:
    """From now on, listen and connect with Twisted's own TCP transports (``enabled``), or
    with ours again (False; the checks are then run again at the next use).  Connections
    already made keep their transport.  The environment variable
    ``TCPTUNNEL_TWISTED_TRANSPORTS=1`` does the same for a whole process."""
    _Mode.own = False if enabled else None


def using_own_transports() -> bool:
    """Whether listen_tcp / connect_tcp on a socket reactor use this module's transports."""
    return _Mode.decide()
