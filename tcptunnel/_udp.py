"""The Proxy-Server's UDP flow table, sans-IO.

UDP has no connections; the tunnel makes one up per sender.  Each sender address (ip:port) at
a UDP Binding is one *flow*, carried by one ``udp`` stream (docs/protocol.md §5.2): opened on
the sender's first datagram, ended when it has been idle for the Binding's idle timeout, when
a request/response flow has every request answered, when the far end resets it (the target
answered with ICMP), or when it is evicted to make room.

Limits: at most ``max_flows`` flows per Binding (:class:`FlowPolicy`) and per link
(:class:`FlowTable`).  A new sender at a full Binding or link evicts the flow that has been
idle longest (of that Binding, or of the whole link), so a burst of spoofed senders costs the
oldest idle flows their stream, never memory without bound.

Activity in either direction (a datagram from the sender, a reply to it) keeps a flow alive.
Each Binding keeps its flows in order of last activity, so the flows to expire or evict are
always at the front: every operation is O(1) per Binding.

No Twisted and no clock here: each call takes ``now``; the adapter (:mod:`tcptunnel.udp`)
arms one timer for :meth:`FlowTable.next_expiry`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

#: Idle timeout of a flow, unless its Binding says otherwise (``idleTimeout``).
DEFAULT_IDLE_TIMEOUT = 60.0
#: Flows per Binding and per link.  A link carries at most 1,024 streams (the Gateway's
#: ``maxStreamsPerLink`` default and the proxies' own table): UDP may take half of them, so
#: a flood of senders never keeps TCP connections of the same link from opening.
DEFAULT_MAX_FLOWS_PER_BINDING = 256
DEFAULT_MAX_FLOWS_PER_LINK = 512
#: DNS (target port 53) is request/response: a flow ends once each query has its reply, and
#: idles out after at most this long (a resolver retries after 1-5 s, on a new port or the
#: same; either way it opens a new flow if this one is gone).
DNS_PORT = 53
DNS_IDLE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class FlowPolicy:
    """How the flows of one Binding live."""

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_flows: int = DEFAULT_MAX_FLOWS_PER_BINDING
    #: End a flow as soon as every datagram from the sender was answered by one reply.
    request_response: bool = False


def policy_for(target_port: int, idle_timeout: float | None = None,
               max_flows: int = DEFAULT_MAX_FLOWS_PER_BINDING) -> FlowPolicy:
    """The policy of a Binding: ``idle_timeout`` (None: the default); a Binding to port 53
    (DNS) is request/response and idles out after at most :data:`DNS_IDLE_TIMEOUT`."""
    timeout = DEFAULT_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
    if target_port == DNS_PORT:
        return FlowPolicy(min(timeout, DNS_IDLE_TIMEOUT), max_flows, request_response=True)
    return FlowPolicy(timeout, max_flows)


class Flow:
    """One sender at one Binding.  ``handle`` is the adapter's (its stream); opaque here."""

    __slots__ = ("binding", "handle", "last_active", "opened_at", "sender", "unanswered")

    def __init__(self, binding: Hashable, sender: Hashable, now: float) -> None:
        self.binding = binding
        self.sender = sender
        self.opened_at = now
        self.last_active = now
        self.unanswered = 0  # datagrams from the sender not yet answered (request/response)
        self.handle: Any = None

    def __repr__(self) -> str:
        return f"<Flow {self.binding!r} {self.sender!r} last={self.last_active}>"


@dataclass(frozen=True, slots=True)
class Arrival:
    """What :meth:`FlowTable.datagram_from` did: the flow the datagram belongs to, whether
    it is new (the adapter opens its stream), and the flows evicted to make room (the
    adapter ends their streams; they are already out of the table)."""

    flow: Flow
    new: bool
    evicted: tuple[Flow, ...] = ()


class _Binding:
    __slots__ = ("flows", "policy")

    def __init__(self, policy: FlowPolicy) -> None:
        self.policy = policy
        # sender -> flow, least recently active first.
        self.flows: OrderedDict[Hashable, Flow] = OrderedDict()


class FlowTable:
    """The flows of one Proxy-Server link, across its UDP Bindings."""

    def __init__(self, max_flows: int = DEFAULT_MAX_FLOWS_PER_LINK) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.max_flows = max_flows
        self._bindings: dict[Hashable, _Binding] = {}
        self._count = 0

    # -- Bindings ------------------------------------------------------------

    def add_binding(self, binding: Hashable, policy: FlowPolicy) -> None:
        """Start keeping flows for ``binding`` (or change its policy: applies from now)."""
        if policy.max_flows < 1 or policy.idle_timeout <= 0:
            raise ValueError(f"invalid flow policy {policy}")
        entry = self._bindings.get(binding)
        if entry is None:
            self._bindings[binding] = _Binding(policy)
        else:
            entry.policy = policy

    def remove_binding(self, binding: Hashable) -> list[Flow]:
        """Forget a Binding; returns its flows (the adapter ends their streams)."""
        entry = self._bindings.pop(binding, None)
        if entry is None:
            return []
        self._count -= len(entry.flows)
        return list(entry.flows.values())

    def policy(self, binding: Hashable) -> FlowPolicy:
        """The policy of a Binding."""
        return self._bindings[binding].policy

    # -- flows ---------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def flows(self, binding: Hashable | None = None) -> list[Flow]:
        """Live flows (of one Binding), least recently active first per Binding."""
        entries = (self._bindings.values() if binding is None
                   else [self._bindings[binding]] if binding in self._bindings else [])
        return [flow for entry in entries for flow in entry.flows.values()]

    def lookup(self, binding: Hashable, sender: Hashable) -> Flow | None:
        """The live flow of ``sender`` at ``binding``, if any."""
        entry = self._bindings.get(binding)
        return entry.flows.get(sender) if entry is not None else None

    def datagram_from(self, binding: Hashable, sender: Hashable, now: float) -> Arrival:
        """A datagram from ``sender`` arrived at ``binding``: its flow, new or not.  Raises
        KeyError for a Binding the table does not keep."""
        entry = self._bindings[binding]
        flow = entry.flows.get(sender)
        if flow is not None:
            flow.last_active = now
            flow.unanswered += 1
            entry.flows.move_to_end(sender)
            return Arrival(flow, False)
        evicted: list[Flow] = []
        if len(entry.flows) >= entry.policy.max_flows:
            evicted.append(self._pop_oldest(entry))
        if self._count >= self.max_flows:
            oldest = min((e for e in self._bindings.values() if e.flows),
                         key=lambda e: next(iter(e.flows.values())).last_active)
            evicted.append(self._pop_oldest(oldest))
        flow = Flow(binding, sender, now)
        flow.unanswered = 1
        entry.flows[sender] = flow
        self._count += 1
        return Arrival(flow, True, tuple(evicted))

    def reply_to(self, flow: Flow, now: float) -> bool:
        """A reply went to ``flow``'s sender.  True when the flow is done (request/response
        with every request answered): it left the table, the adapter ends its stream."""
        entry = self._bindings.get(flow.binding)
        if entry is None or entry.flows.get(flow.sender) is not flow:
            return False
        flow.last_active = now
        entry.flows.move_to_end(flow.sender)
        if flow.unanswered > 0:
            flow.unanswered -= 1
        if entry.policy.request_response and flow.unanswered == 0:
            self.remove(flow)
            return True
        return False

    def remove(self, flow: Flow) -> bool:
        """Forget a flow (its stream ended); False if it was not in the table."""
        entry = self._bindings.get(flow.binding)
        if entry is None or entry.flows.get(flow.sender) is not flow:
            return False
        del entry.flows[flow.sender]
        self._count -= 1
        return True

    def _pop_oldest(self, entry: _Binding) -> Flow:
        _sender, flow = entry.flows.popitem(last=False)
        self._count -= 1
        return flow

    # -- time ----------------------------------------------------------------

    def next_expiry(self) -> float | None:
        """When the next flow idles out, or None without flows."""
        times = [next(iter(entry.flows.values())).last_active + entry.policy.idle_timeout
                 for entry in self._bindings.values() if entry.flows]
        return min(times) if times else None

    def expire(self, now: float) -> list[Flow]:
        """Remove and return the flows idle for their Binding's timeout or longer."""
        expired: list[Flow] = []
        for entry in self._bindings.values():
            flows = entry.flows
            timeout = entry.policy.idle_timeout
            while flows:
                flow = next(iter(flows.values()))
                if flow.last_active + timeout > now:
                    break
                expired.append(self._pop_oldest(entry))
        return expired


# -- datagrams waiting for the end-to-end pairing ------------------------------------------

#: While the Proxy-Server's end-to-end pairing is being made (CPace and its confirmation,
#: two or three one-way trips through the Gateway, at most the pairing's 10 s deadline), a
#: new flow's datagrams wait for it, as TCP connections wait unread.  Per flow the early
#: queue's bounds (64 datagrams, 128 KiB: two datagrams of the largest size), so that a flow
#: that waited leaves in the shape of one waiting for its OPEN_RESULT; in all 1,024
#: datagrams and 1 MiB, so that a burst of spoofed senders during a handshake holds at most
#: 1 MiB, never 512 flows' worth (64 MiB).
MAX_HELD_DATAGRAMS_PER_FLOW = 64
MAX_HELD_BYTES_PER_FLOW = 2 * 65536
MAX_HELD_DATAGRAMS = 1024
MAX_HELD_BYTES = 1024 * 1024
#: The drop reason of a datagram over those bounds (``udp_dropped``).
DROP_PAIRING_QUEUE = "pairing_queue"


class HeldDatagrams:
    """The datagrams of the flows that wait for the pairing, in arrival order per flow,
    bounded per flow and in all.  ``key`` is the adapter's (its flow); opaque here."""

    def __init__(self, per_flow_count: int = MAX_HELD_DATAGRAMS_PER_FLOW,
                 per_flow_bytes: int = MAX_HELD_BYTES_PER_FLOW,
                 total_count: int = MAX_HELD_DATAGRAMS,
                 total_bytes: int = MAX_HELD_BYTES) -> None:
        if min(per_flow_count, per_flow_bytes, total_count, total_bytes) < 1:
            raise ValueError("every bound must be at least 1")
        self.per_flow_count = per_flow_count
        self.per_flow_bytes = per_flow_bytes
        self.total_count = total_count
        self.total_bytes = total_bytes
        self._flows: dict[Hashable, tuple[list[bytes], list[int]]] = {}
        self.count = 0  # datagrams held, all flows
        self.bytes = 0  # their bytes

    def __len__(self) -> int:
        """Flows with datagrams held."""
        return len(self._flows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flows

    def hold(self, key: Hashable, datagram: bytes) -> bool:
        """Keep ``datagram`` behind the others of ``key``; False (not kept: the adapter drops
        and counts it, :data:`DROP_PAIRING_QUEUE`) when that would pass a bound."""
        size = len(datagram)
        entry = self._flows.get(key)
        held, used = entry if entry is not None else ([], [0])
        if (len(held) >= self.per_flow_count or used[0] + size > self.per_flow_bytes
                or self.count >= self.total_count or self.bytes + size > self.total_bytes):
            return False
        if entry is None:
            self._flows[key] = (held, used)
        held.append(datagram)
        used[0] += size
        self.count += 1
        self.bytes += size
        return True

    def release(self, key: Hashable) -> list[bytes]:
        """The datagrams of ``key`` in arrival order, no longer held (to send or drop)."""
        entry = self._flows.pop(key, None)
        if entry is None:
            return []
        held, used = entry
        self.count -= len(held)
        self.bytes -= used[0]
        return held
