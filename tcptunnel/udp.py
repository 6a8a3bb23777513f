"""UDP through the tunnel: the Twisted adapters at both proxies.

At the Proxy-Server, a UDP Binding is one listening socket (:class:`UdpBinding`); each sender
address is one flow (:mod:`tcptunnel._udp` keeps the table) carried by one ``udp`` stream
(:class:`ServerFlow`).  At the Proxy-Client, each ``udp`` stream gets its own connected UDP
socket to the target (:class:`ClientFlow`), so the target's replies (and its ICMP errors) are
told apart per flow and travel back through the stream to the sender's address.

Datagrams keep their boundaries (one DATA frame each) and are dropped, never queued without
bound, whenever the tunnel cannot take them at once: every drop is counted in the instance's
``stats`` under ``("udp_dropped", why)`` (``/metrics`` and the status page show them).  With
``endToEndPassword`` each flow's stream is a :class:`tcptunnel.e2e.SealedDatagramStream`: the
same flows, each datagram sealed, and one that does not open is dropped and counted too
(``integrity``, ``replayed``); while the pairing is being made a new flow's datagrams wait
for it (:class:`tcptunnel._udp.HeldDatagrams`, bounded), as TCP connections wait unread.

When the Gateway drains a link (GOAWAY DRAINING), its flows go on there until the new link can
take them, then move at their sender's next datagram: a new stream on the new link for the
same flow (same Binding socket, same sender), the old one ending :data:`MOVE_LINGER` later, so
that UDP never holds a draining link up to the Gateway's drainTimeout (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcptunnel import _frames as fr
from tcptunnel import _mux
from tcptunnel._frames import OpenRequest, Reason, StreamError
from tcptunnel._udp import DROP_PAIRING_QUEUE, Flow, FlowTable, HeldDatagrams, policy_for
from tcptunnel.config import BindingConfig, format_address
from tcptunnel.mux import MuxProtocol, MuxStream, StreamEndpoint

#: Datagrams are read whole: a UDP payload is at most 65,507 bytes over IPv4 (65,527 over
#: IPv6), within a frame (65,536); Twisted's default buffer, 8,192, would cut them.
MAX_DATAGRAM = 65536
#: Before OPEN_RESULT a flow may send only the early-data window (16 KiB).  At the
#: Proxy-Server, datagrams beyond it wait for the OPEN_RESULT in a queue of at most
#: MAX_EARLY_DATAGRAMS and MAX_EARLY_BYTES (two datagrams of the largest size), then leave
#: in order; beyond that they are dropped ("early_queue").  At the Proxy-Client, the
#: datagrams that arrived while its socket is being set up (resolving the target's name)
#: wait likewise, bounded by the same count and the early window.
MAX_EARLY_DATAGRAMS = 64
MAX_EARLY_BYTES = 2 * MAX_DATAGRAM
#: How long a flow that sent its FIN may wait for the far end's FIN before it is reset.
FLOW_CLOSE_GRACE = 5.0
#: At most one "dropped: no link" line per Binding in this many seconds (a flood would
#: otherwise write one per datagram).
DROP_LOG_INTERVAL = 10.0
#: When the Gateway drains a link (GOAWAY DRAINING) and the new link can take UDP (logged
#: in, the Proxy-Client present, paired end to end where required), a flow on the draining
#: link moves at its sender's next datagram: a new stream on the new link, the same Binding
#: socket and sender (the sender sees nothing; the target sees a new source port, as after a
#: NAT rebinding).  Its stream on the draining link ends (FIN) this long after its last
#: datagram from the sender, or after the move, whichever is later: replies to what it
#: carried still reach the sender meanwhile (a target answers within a round trip; 2 s also
#: covers a resolver's first retry, 1-5 s), and then the draining link is free to close.  A
#: flow whose sender is silent ends likewise (its next datagram opens a flow on the new
#: link), so the draining link closes within MOVE_LINGER + 2 DRAIN_SWEEP_INTERVAL (3 s) of the
#: new link's readiness once its TCP streams are done, not at the Gateway's drainTimeout.
MOVE_LINGER = 2.0
#: How often the flows of a draining link are looked at (only while there are some).
DRAIN_SWEEP_INTERVAL = 0.5


def count_drop(stats: Any, why: str) -> None:
    """Count one dropped datagram under ``("udp_dropped", why)``."""
    stats["udp_dropped", why] += 1


def count_flow_end(stats: Any, how: str) -> None:
    """Count one ended flow under ``("udp_flows_ended", closed|reset_local|reset_remote|
    open_failed)`` (fixed labels: ``how`` holds peer text)."""
    code = ("closed" if how.startswith("closed") else
            "reset_remote" if how.startswith("reset by the far end") else
            "open_failed" if how.startswith("failed to open") else "reset_local")
    stats["udp_flows_ended", code] += 1


def _remove_port(port: Any) -> None:
    """Close a UDP socket (once)."""
    if port is not None and getattr(port, "connected", False):
        port.stopListening()


class DatagramEndpoint(StreamEndpoint):
    """The local side of a ``udp`` stream at either proxy (ServerFlow, ClientFlow)."""

    def describe(self) -> str:
        """The flow, for log lines."""
        raise NotImplementedError

    def datagram_dropped(self, why: str) -> None:
        """A datagram from the far end was not delivered (a sealed one that did not open:
        ``integrity``, ``replayed``): count it under ``why``."""
        raise NotImplementedError


# -- Proxy-Server -------------------------------------------------------------------------


class ServerFlow(DatagramEndpoint):
    """One sender at a UDP Binding: its stream, and its replies back to the sender."""

    __slots__ = ("binding", "close_timer", "closed", "drain_since", "ending", "flow", "flows",
                 "held", "last_sent", "pending", "pending_bytes", "started", "stream")

    def __init__(self, flows: ServerFlows, binding: UdpBinding, flow: Flow) -> None:
        self.flows = flows
        self.binding = binding
        self.flow = flow
        self.stream: MuxStream | None = None
        self.started = flows.proxy.reactor.seconds()
        self.ending = ""  # why we ended it (idle, answered, evicted), once we did
        self.close_timer: Any = None
        # Datagrams waiting for the OPEN_RESULT (None once it came).
        self.pending: list[bytes] | None = []
        self.pending_bytes = 0
        # Waiting for the end-to-end pairing (no stream yet; its datagrams in flows.held).
        self.held = False
        # The last datagram from the sender into this stream: kept from the drain on.
        self.last_sent = self.started
        # On a draining link: since when it may end there (see MOVE_LINGER), once known.
        self.drain_since: float | None = None
        self.closed = False  # its stream ended (counted and logged once)

    def send(self, datagram: bytes) -> str | None:
        """A datagram from the sender into the stream: None when it was sent or waits for
        the OPEN_RESULT (or for the pairing), else why it was dropped."""
        stream = self.stream
        if stream is None:
            if self.held:
                return None if self.flows.held.hold(self, datagram) else DROP_PAIRING_QUEUE
            return "not_open"
        pending = self.pending
        if pending is None:
            return stream.send_datagram(datagram)
        if not pending:
            why = stream.send_datagram(datagram)  # early data, within the early window
            if why != _mux.DROP_NO_CREDIT:
                return why
        if (len(pending) >= MAX_EARLY_DATAGRAMS
                or self.pending_bytes + len(datagram) > MAX_EARLY_BYTES):
            return "early_queue"
        pending.append(datagram)  # behind the others: the order is kept
        self.pending_bytes += len(datagram)
        return None

    @property
    def sender(self) -> tuple[str, int]:
        """The sender's (ip, port)."""
        sender: tuple[str, int] = self.flow.sender  # type: ignore[assignment]
        return sender

    @property
    def target(self) -> str:
        """host:port of the target."""
        return str(self.binding.config.target)

    def describe(self) -> str:
        """``udp sender -> target``, for the stream's log event."""
        return f"udp {format_address(*self.sender)} -> {self.target}"

    def datagram_dropped(self, why: str) -> None:
        """A reply that must not reach the sender: counted."""
        count_drop(self.flows.proxy.stats, why)

    def end(self, why: str) -> None:
        """End the flow (FIN); the far end's FIN closes the stream, or the grace runs out.
        A flow still waiting for the pairing drops what it holds."""
        if self.held:
            self.flows.give_up(self, "stream_refused")
            return
        if self.ending or self.stream is None or self.stream.finished:
            return
        self.ending = why
        self.stream.loseWriteConnection()
        if not self.stream.finished:
            self.close_timer = self.flows.proxy.reactor.callLater(
                FLOW_CLOSE_GRACE, self._close_overdue)

    def _close_overdue(self) -> None:
        self.close_timer = None
        if self.stream is not None and not self.stream.finished:
            self.stream.abortConnection(Reason.CANCELLED, "no FIN for an ended UDP flow")
            self._done(f"reset here (CANCELLED: no FIN within {FLOW_CLOSE_GRACE:g} s)")

    # -- StreamEndpoint ------------------------------------------------------------------

    def stream_opened(self) -> None:
        """The Proxy-Client has its socket: what waited for the OPEN_RESULT goes now."""
        pending, self.pending = self.pending or [], None
        self.pending_bytes = 0
        stats = self.flows.proxy.stats
        for datagram in pending:
            why = self.send(datagram)
            if why is not None:
                count_drop(stats, why)

    def stream_data(self, data: bytes) -> None:
        """A reply: to the sender's address, whole."""
        flows = self.flows
        stats = flows.proxy.stats
        transport = self.binding.transport
        if transport is None:
            count_drop(stats, "binding_closed")
            return
        try:
            transport.write(data, self.sender)
        except (OSError, neterror.MessageLengthError):
            count_drop(stats, "send_error")
            return
        stats["udp_datagrams", "to_senders"] += 1
        if flows.table.reply_to(self.flow, flows.proxy.reactor.seconds()):
            self.end("answered")
            current = self.flow.handle  # the flow moved off this stream (a draining link)
            if current is not self and isinstance(current, ServerFlow):
                current.end("answered")
        flows.arm()

    def stream_ended(self) -> None:
        """The Proxy-Client ended the flow: end ours too."""
        if self.flow.handle is self:
            self.flows.table.remove(self.flow)
        self.end(self.ending or "ended by the far end")

    def stream_closed(self) -> None:
        """FIN both ways."""
        self._done(f"closed (FIN both ways{', ' + self.ending if self.ending else ''})")

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Reset (the target answered ICMP, the link was lost, ...): forget the flow."""
        by = "the far end" if remote else "this end"
        self._done(f"reset by {by} ({reason.name}{': ' + message if message else ''})")

    def _done(self, how: str) -> None:
        self.pending = None
        if self.close_timer is not None and self.close_timer.active():
            self.close_timer.cancel()
        self.close_timer = None
        if self.closed:
            return
        self.closed = True
        self.flows.draining.discard(self)
        if self.flow.handle is self:  # not a stream the flow moved off (it goes on)
            self.flows.table.remove(self.flow)
            self.flow.handle = None
        count_flow_end(self.flows.proxy.stats, how)
        self.flows.proxy.stream_ended(self, how)


class UdpBinding(DatagramProtocol):
    """The socket of one UDP Binding at the Proxy-Server."""

    noisy = False

    def __init__(self, flows: ServerFlows, config: BindingConfig) -> None:
        self.flows = flows
        self.config = config
        self.last_drop_log = -DROP_LOG_INTERVAL

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:  # noqa: N802
        """A datagram from a sender: into its flow's stream, or dropped."""
        self.flows.datagram_received(self, datagram, (addr[0], addr[1]))

    def stopProtocol(self) -> None:  # noqa: N802
        """The socket closed (the Binding was removed, the instance stops): end its flows."""
        self.flows.remove_binding(self)


class ServerFlows:
    """The UDP flows of one Proxy-Server instance: the flow table, its timer, the counts."""

    log = Logger()

    def __init__(self, proxy: Any, max_flows: int | None = None) -> None:
        self.proxy = proxy  # a ProxyServerService
        self.table = FlowTable() if max_flows is None else FlowTable(max_flows)
        self._timer: Any = None
        # The datagrams of new flows waiting for the end-to-end pairing (bounded).
        self.held = HeldDatagrams()
        # The flows waiting for the pairing, in arrival order, and their one place among
        # the Proxy-Server's held connections (tcptunnel.e2e.MAX_HELD, 1,024): a flood of
        # new senders during a handshake takes one place, not one each, so TCP connections
        # still wait for the pairing as they would without UDP.
        self.waiting: dict[ServerFlow, None] = {}
        self._wait = _PairingWait()
        self._registered = False  # in the hold now: the handshake runs
        # Streams on a draining link, to end once the new link can take their flows; and
        # the one timer that looks at them (only while there are some).
        self.draining: set[ServerFlow] = set()
        self._sweep_timer: Any = None

    def add_binding(self, binding: UdpBinding) -> None:
        """Keep flows for a Binding that is listening now."""
        config = binding.config
        self.table.add_binding(binding, policy_for(config.fixed_target[1], config.idle_timeout))

    def retarget(self, binding: UdpBinding, config: BindingConfig) -> None:
        """A reload changed a Binding's target or timeout: new flows use it."""
        binding.config = config
        self.table.add_binding(binding, policy_for(config.fixed_target[1], config.idle_timeout))

    def remove_binding(self, binding: UdpBinding) -> None:
        """A Binding stopped listening: end its flows."""
        for flow in self.table.remove_binding(binding):
            if isinstance(flow.handle, ServerFlow):
                flow.handle.end("the Binding was removed")
        self.arm()

    def datagram_received(self, binding: UdpBinding, datagram: bytes,
                          sender: tuple[str, int]) -> None:
        """Route a datagram from ``sender`` at ``binding`` into its flow, opening one."""
        proxy = self.proxy
        stats = proxy.stats
        stats["udp_datagrams", "from_senders"] += 1
        now = proxy.reactor.seconds()
        if self.draining:  # (one set lookup per datagram, only while a link drains)
            current = self.table.lookup(binding, sender)
            if current is not None and current.handle in self.draining:
                self._from_draining(current.handle, datagram, now)
                return
        link: MuxProtocol | None = proxy.link
        if link is None or not proxy.partner_available:
            count_drop(stats, "no_link" if link is None else "no_partner")
            if now - binding.last_drop_log >= DROP_LOG_INTERVAL:
                binding.last_drop_log = now
                proxy.log.warn("[{index}] UDP Binding {listen}: datagrams dropped: {why}",
                               index=proxy.config.index, listen=binding.config.describe(),
                               why="no link to the Gateway" if link is None
                               else "no Proxy-Client in the session")
            return
        arrival = self.table.datagram_from(binding, sender, now)
        for evicted in arrival.evicted:
            stats["udp_flows_evicted",] += 1
            if isinstance(evicted.handle, ServerFlow):
                evicted.handle.end("evicted: flow limit")
        flow = arrival.flow
        if arrival.new:
            endpoint = ServerFlow(self, binding, flow)
            e2e = proxy.e2e
            if e2e is not None and (self._registered or e2e.hold(self._wait,
                                                                  self._pairing_ended)):
                self._registered = True
                # The pairing is being made: the flow's datagrams wait for it (bounded),
                # at most until its deadline; then they leave in order, or are dropped.
                endpoint.held = True
                self.waiting[endpoint] = None
                flow.handle = endpoint
            else:
                stream = self._open(link, endpoint, binding, now)
                if stream is None:
                    self.table.remove(flow)
                    return
                endpoint.stream = stream
                flow.handle = endpoint
                stats["udp_flows_opened",] += 1
        endpoint = flow.handle
        why = endpoint.send(datagram) if isinstance(endpoint, ServerFlow) else "not_open"
        if why is not None:
            count_drop(stats, why)
        self.arm()

    def _open(self, link: MuxProtocol, endpoint: ServerFlow, binding: UdpBinding,
              now: float, dropped: int = 1) -> MuxStream | None:
        """A flow's stream on ``link``, or None (refused: ``dropped`` datagrams counted,
        logged at most once per interval and Binding)."""
        proxy = self.proxy
        try:
            return link.open_stream(*binding.config.fixed_target, endpoint, kind=fr.KIND_UDP)
        except StreamError as e:
            # LIMIT, or UNSUPPORTED where streams must be sealed end to end: a flood of
            # senders would repeat it once per sender, so at most a line per interval.
            if dropped:
                proxy.stats["udp_dropped", "stream_refused"] += dropped
            if now - binding.last_drop_log >= DROP_LOG_INTERVAL:
                binding.last_drop_log = now
                proxy.log.warn("[{index}] UDP flow {flow} refused: {why}",
                               index=proxy.config.index, flow=endpoint.describe(),
                               why=e.message)
            return None

    # -- waiting for the end-to-end pairing ---------------------------------------------

    def _pairing_ended(self) -> None:
        """The pairing the held flows waited for is made or failed (at most its deadline
        after they came): each opens its stream now, or drops what it held."""
        self._registered = False
        waiting, self.waiting = self.waiting, {}
        for endpoint in waiting:
            self._paired(endpoint)

    def _paired(self, endpoint: ServerFlow) -> None:
        """Open a held flow's stream and send what it held, in order; or drop it all
        (``stream_refused``; ``no_link``, ``no_partner`` when that is gone)."""
        if not endpoint.held:
            return
        proxy = self.proxy
        link: MuxProtocol | None = proxy.link
        if link is None or not proxy.partner_available:
            self.give_up(endpoint, "no_link" if link is None else "no_partner")
            return
        now = proxy.reactor.seconds()
        held = self.held.release(endpoint)
        endpoint.held = False
        stream = self._open(link, endpoint, endpoint.binding, now, dropped=len(held))
        if stream is None:
            self._forget(endpoint)
            return
        endpoint.stream = stream
        proxy.stats["udp_flows_opened",] += 1
        for datagram in held:
            why = endpoint.send(datagram)
            if why is not None:
                count_drop(proxy.stats, why)

    def give_up(self, endpoint: ServerFlow, why: str) -> None:
        """A flow that waited for the pairing ends without a stream: what it held is
        dropped (counted under ``why``)."""
        endpoint.held = False
        self.waiting.pop(endpoint, None)
        for _datagram in self.held.release(endpoint):
            count_drop(self.proxy.stats, why)
        self._forget(endpoint)

    def _forget(self, endpoint: ServerFlow) -> None:
        endpoint.closed = True
        if endpoint.flow.handle is endpoint:
            self.table.remove(endpoint.flow)
            endpoint.flow.handle = None
        self.arm()

    # -- a draining link (GOAWAY DRAINING): flows move to the new link ----------------------

    def _new_link(self) -> MuxProtocol | None:
        """The link a flow of a draining link moves to, once it can take one: logged in,
        not draining, with the Proxy-Client present and (end to end) paired."""
        proxy = self.proxy
        link: MuxProtocol | None = proxy.link
        if link is None or getattr(link, "draining", False) or not proxy.partner_available:
            return None
        e2e = proxy.e2e
        if e2e is not None and not e2e.ready(link):
            return None
        return link

    def _from_draining(self, endpoint: ServerFlow, datagram: bytes, now: float) -> None:
        """A datagram of a flow on a draining link: it moves to the new link once that can
        take it, and until then goes on where it is (with or without a new link yet)."""
        new_link = self._new_link()
        if new_link is not None:
            endpoint = self._move(endpoint, new_link, now)
        self.table.datagram_from(endpoint.binding, endpoint.flow.sender, now)
        endpoint.last_sent = now  # (for the old stream's linger, if it stayed)
        why = endpoint.send(datagram)
        if why is not None:
            count_drop(self.proxy.stats, why)
        self.arm()

    def _move(self, old: ServerFlow, link: MuxProtocol, now: float) -> ServerFlow:
        """A new stream on ``link`` for ``old``'s flow (same Binding socket, same sender);
        ``old``'s stream lingers for replies, then ends.  ``old`` itself when the new
        link refuses the stream (the flow stays where it is and tries again later)."""
        endpoint = ServerFlow(self, old.binding, old.flow)
        stream = self._open(link, endpoint, old.binding, now, dropped=0)
        if stream is None:
            return old
        endpoint.stream = stream
        old.flow.handle = endpoint
        stats = self.proxy.stats
        stats["udp_flows_opened",] += 1
        stats["udp_flows_moved",] += 1
        if old.drain_since is None:  # (a move does not extend it: it carries nothing new)
            old.drain_since = now
        self.draining.add(old)
        self._arm_sweep()
        return endpoint

    def link_draining(self, link: MuxProtocol) -> None:
        """The Gateway drains ``link``: its flows are looked at until they moved or ended."""
        for flow in self.table.flows():
            handle = flow.handle
            if (isinstance(handle, ServerFlow) and handle.stream is not None
                    and handle.stream.mux is link):
                # Its last activity so far (replies included: a little longer linger).
                handle.last_sent = flow.last_active
                self.draining.add(handle)
        self._arm_sweep()

    def _arm_sweep(self) -> None:
        if self.draining and (self._sweep_timer is None or not self._sweep_timer.active()):
            self._sweep_timer = self.proxy.reactor.callLater(DRAIN_SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        """End the streams of a draining link that have lingered MOVE_LINGER since the new
        link could take their flows (or since they moved) and since their last datagram."""
        self._sweep_timer = None
        now = self.proxy.reactor.seconds()
        ready = self._new_link() is not None
        for endpoint in list(self.draining):
            if endpoint.closed or endpoint.ending:
                self.draining.discard(endpoint)
                continue
            if endpoint.drain_since is None:
                if not ready:
                    continue
                endpoint.drain_since = now
            if now < max(endpoint.drain_since, endpoint.last_sent) + MOVE_LINGER:
                continue
            self.draining.discard(endpoint)
            if endpoint.flow.handle is endpoint:
                # Not moved (its sender was silent): its next datagram opens a new flow.
                self.table.remove(endpoint.flow)
                endpoint.end("its link is draining: the next datagram goes to the new link")
            else:
                endpoint.end("moved to the new link")
        self._arm_sweep()
        self.arm()

    # -- the idle timer -------------------------------------------------------------------

    def arm(self) -> None:
        """Keep one timer at the next flow's idle deadline."""
        deadline = self.table.next_expiry()
        timer = self._timer
        if deadline is None:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
            return
        if timer is not None and timer.active():
            if timer.getTime() <= deadline:
                return  # fires first; it re-arms for what is then next
            timer.cancel()
        reactor = self.proxy.reactor
        self._timer = reactor.callLater(max(0.0, deadline - reactor.seconds()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        for flow in self.table.expire(self.proxy.reactor.seconds()):
            if isinstance(flow.handle, ServerFlow):
                flow.handle.end("idle")
        self.arm()

    def stop(self) -> None:
        """The instance stops: no timer left behind, no flow waiting."""
        self._wait.done = True
        for endpoint in list(self.waiting):
            self.give_up(endpoint, "no_link")
        for timer in (self._timer, self._sweep_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._sweep_timer = None


class _PairingWait:
    """The place of all UDP flows waiting for the pairing among the connections that
    :meth:`tcptunnel.e2e.EndToEnd.hold` holds: its contract asks a ``done`` flag and a
    ``transport`` that is ``connected`` (a held connection that ended is not retried)."""

    connected = True

    def __init__(self) -> None:
        self.done = False

    @property
    def transport(self) -> _PairingWait:
        """Itself: the flows' own sockets are the Bindings' (closing one ends its flows)."""
        return self


def listen_udp(reactor: Any, binding: UdpBinding) -> Any:
    """Listen for a UDP Binding (every address, dual-stack, without ``listenIp``)."""
    config = binding.config
    interface = config.listen_ip if config.listen_ip is not None else "::"
    port = reactor.listenUDP(config.listen_port, binding, interface=interface,
                             maxPacketSize=MAX_DATAGRAM)
    _share_reads(port)
    _receive_buffer(port, BINDING_RECEIVE_BUFFER)
    return port


#: The receive buffer a UDP Binding's socket asks for.  One socket takes the datagrams of every
#: sender of the Binding; with Linux's default of 212,992 bytes (about 90 datagrams of 1,400
#: bytes, 0.1 s at 10 Mbit/s) a loaded machine dropped 9-24 % of an iperf3 -u run at 10 Mbit/s
#: in the kernel, before the Proxy-Server could read them (test_udp_e2e, 8 busy loops on 2
#: cores).  The kernel caps the request at ``net.core.rmem_max`` without a word (212,992 on a
#: default Linux; docs/operations.md says how to raise it).  Kernel memory, taken only while
#: the process is behind, one per Binding.
BINDING_RECEIVE_BUFFER = 2 * 1024 * 1024


def _receive_buffer(port: Any, size: int) -> None:
    """Ask the kernel for a ``size``-byte receive buffer on ``port``'s socket, where it has one
    (a real ``twisted.internet.udp.Port``; a test's fake has none)."""
    sock = getattr(port, "socket", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


#: Bytes a UDP socket reads per reactor event.  Twisted reads up to 256 KiB per event from a
#: UDP port but one read (64 KiB at most) from a TCP socket: under a flood, every reactor
#: turn would spend four times as long on the UDP socket as on the link and the local TCP
#: connections sharing the process.
UDP_READ_PER_EVENT = 64 * 1024


def _share_reads(port: Any) -> None:
    if hasattr(port, "maxThroughput"):
        port.maxThroughput = UDP_READ_PER_EVENT


# -- Proxy-Client -------------------------------------------------------------------------


def resolve_udp(reactor: Any, host: str, port: int) -> Deferred[str]:
    """The first address of ``host`` for UDP (an IP literal as it is; a name through
    getaddrinfo in the reactor's thread pool)."""
    try:
        return _succeed(str(ipaddress.ip_address(host)))
    except ValueError:
        pass
    from twisted.internet.threads import deferToThreadPool

    def first(infos: list[Any]) -> str:
        if not infos:
            raise neterror.DNSLookupError(host)
        address: str = infos[0][4][0]
        return address

    def lookup() -> list[Any]:
        try:
            return socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
        except socket.gaierror as e:
            raise neterror.DNSLookupError(f"{host}: {e.strerror}") from None

    found: Deferred[list[Any]] = deferToThreadPool(reactor, reactor.getThreadPool(), lookup)
    return found.addCallback(first)


def _succeed(value: str) -> Deferred[str]:
    done: Deferred[str] = Deferred()
    done.callback(value)
    return done


class ClientFlow(DatagramProtocol, DatagramEndpoint):
    """One ``udp`` stream at the Proxy-Client: a connected UDP socket to the target."""

    noisy = False

    def __init__(self, proxy: Any, request: OpenRequest,
                 on_end: Callable[[ClientFlow, str], None]) -> None:
        self.proxy = proxy  # a ProxyClientService
        self.request = request
        self.stream: MuxStream | None = None
        self.started = proxy.reactor.seconds()
        self.early: list[bytes] = []
        self.port: Any = None
        self.ready = False
        self.end_description = ""
        self._on_end = on_end

    @property
    def target(self) -> str:
        """host:port of the target."""
        return format_address(self.request.host, self.request.port)

    def describe(self) -> str:
        """``udp from Proxy-Server #n to target``, for the stream's log event."""
        return f"udp from Proxy-Server #{self.request.origin} to {self.target}"

    def datagram_dropped(self, why: str) -> None:
        """A datagram that must not reach the target: counted."""
        count_drop(self.proxy.stats, why)

    def start(self, timeout: float) -> Deferred[None]:
        """Resolve the target, open a connected socket, accept the stream.  Fires when the
        flow is ready or refused (errback: the reason the stream is refused with)."""
        reactor = self.proxy.reactor
        resolved = resolve_udp(reactor, self.request.host, self.request.port)
        resolved.addTimeout(timeout, reactor)

        def connect(address: str) -> None:
            if self.stream is None or self.stream.finished:
                return
            family_any = "::" if ":" in address else "0.0.0.0"
            self.port = reactor.listenUDP(0, self, interface=family_any,
                                          maxPacketSize=MAX_DATAGRAM)
            _share_reads(self.port)
            self.port.connect(address, self.request.port)
            self.stream.mux.accept_stream(self.stream.stream_id)
            self.ready = True
            early, self.early = self.early, []
            for datagram in early:
                self._to_target(datagram)
            if self.stream.remote_ended:
                self.stream_ended()
            self.stream.resumeProducing()  # acknowledges the early datagrams

        return resolved.addCallback(connect)

    # -- from the target --------------------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:  # noqa: N802
        """A reply from the target: back through the stream, whole, or dropped."""
        stream = self.stream
        stats = self.proxy.stats
        if stream is None or stream.finished:
            count_drop(stats, "not_open")
            return
        stats["udp_datagrams", "from_targets"] += 1
        why = stream.send_datagram(datagram)
        if why is not None:
            count_drop(stats, why)

    def connectionRefused(self) -> None:  # noqa: N802
        """ICMP port unreachable from the target: the flow ends (RESET REFUSED)."""
        self._icmp_error(errno.ECONNREFUSED)

    def stopProtocol(self) -> None:  # noqa: N802
        """The socket closed.  Not by us: Twisted's epoll reactor drops a connected UDP
        socket with a pending ICMP error (EPOLLERR without EPOLLIN) before any read could
        report it through connectionRefused; SO_ERROR still says which error it was."""
        if self.end_description:
            return
        code = 0
        handle = getattr(self.port, "socket", None)
        if handle is not None:
            with contextlib.suppress(OSError):
                code = handle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._icmp_error(code)

    def _icmp_error(self, code: int) -> None:
        stream = self.stream
        if code == errno.ECONNREFUSED:
            reason, message = Reason.REFUSED, f"{self.target} answered ICMP port unreachable"
        else:
            why = os.strerror(code) if code else "the socket closed"
            reason, message = Reason.UNREACHABLE, f"UDP to {self.target}: {why}"
        if stream is not None and not stream.finished:
            stream.abortConnection(reason, message)
        self._finish(f"reset here ({reason.name}: {message})")

    # -- StreamEndpoint ---------------------------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        """A datagram for the target (kept while the socket is set up)."""
        if not self.ready:
            if len(self.early) >= MAX_EARLY_DATAGRAMS:
                count_drop(self.proxy.stats, "early_queue")
                return
            self.early.append(data)
            return
        self._to_target(data)

    def _to_target(self, data: bytes) -> None:
        stats = self.proxy.stats
        transport = self.transport
        if transport is None:
            count_drop(stats, "not_open")
            return
        try:
            transport.write(data, None)
        except (OSError, neterror.MessageLengthError):
            count_drop(stats, "send_error")
            return
        stats["udp_datagrams", "to_targets"] += 1

    def stream_ended(self) -> None:
        """The Proxy-Server ended the flow: FIN back (the stream closes)."""
        if self.stream is not None and self.ready:
            self.stream.loseWriteConnection()

    def stream_closed(self) -> None:
        """FIN both ways."""
        self._finish("closed (FIN both ways)")

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        """Reset by either end (or refused before it opened)."""
        by = "the far end" if remote else "this end"
        self._finish(f"reset by {by} ({reason.name}{': ' + message if message else ''})")

    def _finish(self, how: str) -> None:
        _remove_port(self.port)
        self.early = []
        if self.end_description:
            return
        self.end_description = how
        count_flow_end(self.proxy.stats, how)
        self._on_end(self, how)


def reason_for_udp_failure(failure: Failure) -> Reason:
    """The wire reason for a flow that could not be set up."""
    if failure.check(neterror.DNSLookupError):
        return Reason.DNS_FAILURE
    if failure.check(neterror.TimeoutError, defer.TimeoutError):
        return Reason.TIMEOUT
    return Reason.UNREACHABLE
