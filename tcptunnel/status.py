"""Observability: ``/metrics`` (Prometheus), ``/status`` (JSON) and ``/`` (a status page).

Enabled by a ``<Status listenIp="127.0.0.1" listenPort="9100"/>`` element in the settings
file (one per process; loopback unless another address is given).  Everything is read from
the live services when asked for: gauges from the current links and streams, counters from the
event counts each instance keeps (``stats``) plus, for the proxies' bytes, what the live
streams carried so far, so the tunnel code carries no metrics library calls and the data path
no extra work.  ``/status`` keeps raw numbers (bytes, seconds); the page shows them in human
units.
"""

from __future__ import annotations

import datetime
import html
import ipaddress
import json
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application import service
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tcptunnel import __version__
from tcptunnel import _frames as fr
from tcptunnel._relay import Session, kind_label, kind_name
from tcptunnel.config import StatusConfig, format_address, normalise_host
from tcptunnel.gateway import GatewayLink, GatewayService
from tcptunnel.ports import listen
from tcptunnel.proxy import ProxyService

#: A proxy's state in ``/status``: no link; logged in, but the session has no partner (a
#: Proxy-Server refuses every local connection then); logged in with a partner.
DISCONNECTED, NO_PARTNER, READY = "disconnected", "no_partner", "ready"


def _address(transport: Any) -> str:
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", "?")
    return format_address(host, getattr(peer, "port", 0))


def proxy_state(child: ProxyService) -> str:
    """:data:`DISCONNECTED`, :data:`NO_PARTNER` or :data:`READY`."""
    if child.link is None:
        return DISCONNECTED
    return READY if child.link.partners > 0 else NO_PARTNER


def proxy_bytes(child: ProxyService) -> tuple[int, int]:
    """Bytes a proxy's streams sent and received so far: the finished streams' counts plus
    the live streams' (summed here, at read time, so the data path counts nothing twice)."""
    sent, received = child.stats["bytes_sent",], child.stats["bytes_received",]
    for link in (child.link, child.draining_link):
        if link is not None:
            for stream in link.streams.values():
                sent += stream.bytes_out
                received += stream.bytes_in
    return sent, received


def link_transport(tls: bool, websocket_path: str | None) -> str:
    """What a link runs on: ``tls`` or ``tcp``, ``wss`` or ``ws`` as a WebSocket."""
    if websocket_path is not None:
        return "wss" if tls else "ws"
    return "tls" if tls else "tcp"


def _transport_text(item: dict[str, Any]) -> str:
    """``TLS`` / ``plain``, and the WebSocket path if any (the page's words)."""
    text = "TLS" if item["tls"] else "plain"
    if item.get("websocket_path") is not None:
        text += f", WebSocket {item['websocket_path']}"
    return text


def process_info(started: float, now: float) -> dict[str, Any]:
    """Version, host name, process id and start time (``started``, seconds since the epoch)."""
    when = datetime.datetime.fromtimestamp(started, datetime.UTC)
    return {
        "version": __version__,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "started_unix": round(started, 3),
        "uptime_s": round(now - started, 1),
    }


#: The streams ``/status`` lists one by one per session (the counts cover all of them): a
#: session may have 1024 per link, and the page refreshes every 5 s.
MAX_LISTED_STREAMS = 100
#: The kinds a Gateway counts per session; a kind it does not know counts as ``other``.
STREAM_KINDS = ("tcp", "udp", "sealed", "pake", "other")


def session_streams(session: Session, now: float) -> dict[str, Any]:
    """A Gateway session's streams as ``/status`` shows them: counts by kind, how many are
    end-to-end (sealed or pairing), and the first :data:`MAX_LISTED_STREAMS` one by one.

    A stream in clear shows its target; an end-to-end one shows ``target`` None and
    ``end_to_end`` true: its kind, target and fields travel encrypted, the Gateway sees
    only that it exists, its size and its timing.
    """
    counts = dict.fromkeys(STREAM_KINDS, 0)
    rows: list[dict[str, Any]] = []
    end_to_end = 0
    for server in session.servers.values():
        for route in server.routes.values():
            counts[kind_name(route.kind)] += 1
            end_to_end += route.sealed
            if len(rows) < MAX_LISTED_STREAMS:
                rows.append({
                    "proxy_server": server.number, "stream": route.server_stream,
                    "kind": kind_name(route.kind), "label": kind_label(route.kind),
                    "end_to_end": route.sealed, "target": route.target,
                    "open": route.open, "since": round(now - route.opened_at, 1),
                    "bytes_to_client": route.bytes_to_client,
                    "bytes_to_server": route.bytes_to_server,
                })
    return {"streams_by_kind": counts, "end_to_end_streams": end_to_end,
            "streams": rows, "streams_not_listed": sum(counts.values()) - len(rows)}


def _gateway_snapshot(child: GatewayService, now: float) -> dict[str, Any]:
    gateway = child.gateway
    # What the Gateway would itself forget or free at its next attempt; done here so that
    # the sizes shown are those of the buckets and slots that still matter.
    gateway.throttle.sweep(now)
    gateway.slots.expire(now)
    sessions = []
    for session in gateway.sessions.values():
        peers = []
        for core in session.all_links():
            link = core.adapter
            if not isinstance(link, GatewayLink):
                continue
            peers.append({
                "role": link.role_name,
                "number": link.number if link.role == fr.ROLE_PROXY_SERVER else None,
                "address": link.peer_description,
                "since": round(now - link.connected_at, 1),
                "streams": len(link.routes),
                "bytes_in": link.core.bytes_received,
                "bytes_out": link.bytes_sent,
                "queued_bytes": link.core.queued_bytes,
                "rtt_ms": round(link.rtt * 1e3, 3) if link.rtt is not None else None,
                "tls": link.tls_description or None,
                "draining": core.retiring,
            })
        sessions.append({
            "id": session.id,
            "proxy_client": session.client is not None,
            "proxy_servers": len(session.servers),
            "bytes_to_client": gateway.stats["bytes", session.id, "to_client"],
            "bytes_to_server": gateway.stats["bytes", session.id, "to_server"],
            "queued_bytes": session.budget.queued,
            "peers": peers,
            **session_streams(session, now),
        })
    slots = gateway.slots
    return {
        "index": child.config.index, "role": "gateway",
        "draining": gateway.draining,
        "listeners": [
            {"address": format_address(listener.ip, port.getHost().port),
             "tls": listener.tls is not None,
             # Links arrive as WebSockets on this path (issue 19), else None.
             "websocket_path": listener.websocket_path,
             "transport": link_transport(listener.tls is not None, listener.websocket_path)}
            for listener, port in zip(child.config.listeners, child.ports, strict=False)],
        "unauthenticated_links": len(gateway.unauthenticated),
        "unauthenticated_slots": {
            "taken": len(slots), "held": slots.held(), "limit": slots.total,
            "limit_per_address": slots.per_address},
        "login_throttle": {"buckets": gateway.throttle.sizes(),
                           "capacity": gateway.throttle.capacity},
        "queued_bytes": gateway.relay.total.queued,
        "sessions": sessions,
    }


def _proxy_snapshot(child: ProxyService, now: float) -> dict[str, Any]:
    proxy_link = child.link
    sent, received = proxy_bytes(child)
    entry: dict[str, Any] = {
        "index": child.config.index, "role": child.config.role,
        "gateway": child.gateway_address, "tls": child.config.use_tls,
        "websocket_path": child.config.websocket_path,
        "transport": link_transport(child.config.use_tls, child.config.websocket_path),
        "session": child.config.session_id,
        "state": proxy_state(child),
        "connected": proxy_link is not None,
        "since": round(now - child.link_since, 1) if proxy_link is not None else None,
        "partners": proxy_link.partners if proxy_link is not None else 0,
        "streams": len(proxy_link.streams) if proxy_link is not None else 0,
        "rtt_ms": (round(proxy_link.rtt * 1e3, 3)
                   if proxy_link is not None and proxy_link.rtt else None),
        "bytes_sent": sent,
        "bytes_received": received,
        # The link its Gateway drains (issue 20): only its running streams, until they end.
        "draining_link": None if (draining := child.draining_link) is None else {
            "gateway": draining.gateway,
            "since": round(now - (draining.draining_since or now), 1),
            "streams": len(draining.streams)},
    }
    bindings = getattr(child, "ports", None)
    if child.config.role == "proxy-server" and bindings is not None:
        entry["bindings"] = [
            {"listen": format_address(b.listen_ip, port.getHost().port),
             "target": b.target,
             "protocol": b.protocol,
             "type": b.type}
            for b, port in zip(child.config.bindings, bindings, strict=False)]
    entry["udp"] = _udp_status(child)
    # End-to-end encryption (issue 16): off, or the pairing's state (tcptunnel.e2e).
    entry["end_to_end"] = child.e2e.status() if child.e2e is not None else {"enabled": False}
    return entry


def _udp_status(proxy: ProxyService) -> dict[str, Any]:
    """A proxy's UDP counts (issue 18): live flows, datagrams by direction, drops by reason."""
    link = proxy.link
    return {
        "flows": sum(1 for stream in link.streams.values() if stream.record.datagram)
        if link is not None else 0,
        "flows_opened": proxy.stats["udp_flows_opened",],
        # Flows moved off a draining link to the new one (tcptunnel.udp, issue 20).
        "flows_moved": proxy.stats["udp_flows_moved",],
        "datagrams": {key[1]: n for key, n in proxy.stats.items() if key[0] == "udp_datagrams"},
        "dropped": {key[1]: n for key, n in proxy.stats.items() if key[0] == "udp_dropped"},
    }


def snapshot(tunnel: service.MultiService, now: float,
             started: float | None = None) -> dict[str, Any]:
    """What runs, who is connected, and the counters: the content of ``/status``.

    ``started`` is when the process started (seconds since the epoch, on the clock ``now``
    is read from); without it the ``process`` part says that the process started ``now``.
    """
    instances = []
    for child in tunnel:
        if isinstance(child, GatewayService):
            instances.append(_gateway_snapshot(child, now))
        elif isinstance(child, ProxyService):
            instances.append(_proxy_snapshot(child, now))
    return {"process": process_info(now if started is None else started, now),
            "instances": instances}


class TunnelCollector(Collector):
    """Prometheus metrics computed from the live services at scrape time.

    Label values are codes, Reason names, session ids and instance numbers, never text a
    peer chose: each metric has a bounded number of series.
    """

    def __init__(self, tunnel: service.MultiService) -> None:
        self.tunnel = tunnel

    def collect(self) -> Iterator[Any]:
        """Yield every metric family."""
        info = GaugeMetricFamily("tcptunnel_info", "The tcptunnel version (always 1)",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        links = GaugeMetricFamily("tcptunnel_links", "Links by instance, role and state",
                                  labels=["instance", "role", "state"])
        logins = CounterMetricFamily("tcptunnel_logins", "Logins by result",
                                     labels=["instance", "role", "result"])
        with_client = GaugeMetricFamily("tcptunnel_sessions_with_proxy_client",
                                        "Sessions whose Proxy-Client is connected",
                                        labels=["instance"])
        partners = GaugeMetricFamily(
            "tcptunnel_proxy_partners",
            "Partners a proxy's session has (0 at a Proxy-Server: local connections are "
            "refused)", labels=["instance", "role"])
        streams_open = GaugeMetricFamily("tcptunnel_streams_open", "Streams open now",
                                         labels=["instance", "role"])
        streams_opened = CounterMetricFamily("tcptunnel_streams_opened",
                                             "Streams opened at the Gateway",
                                             labels=["instance", "session"])
        streams_refused = CounterMetricFamily("tcptunnel_streams_refused",
                                              "Streams the Gateway refused to open, by reason",
                                              labels=["instance", "session", "reason"])
        streams_ended = CounterMetricFamily(
            "tcptunnel_streams_ended",
            "Streams ended at a proxy, by how (closed, reset_remote, reset_local, open_failed, "
            "refused, lost_before_open, lost_after_end) and Reason name",
            labels=["instance", "role", "how", "reason"])
        streams_reset = CounterMetricFamily("tcptunnel_streams_reset",
                                            "Streams reset through the Gateway, by reason",
                                            labels=["instance", "reason"])
        session_bytes = CounterMetricFamily("tcptunnel_session_bytes",
                                            "Bytes relayed per session and direction",
                                            labels=["instance", "session", "direction"])
        proxy_bytes_total = CounterMetricFamily(
            "tcptunnel_proxy_bytes", "Bytes carried by a proxy's streams, finished and live",
            labels=["instance", "role", "direction"])
        stalls = CounterMetricFamily("tcptunnel_window_stalls",
                                     "DATA frames that spent a stream's window",
                                     labels=["instance", "role"])
        queued = GaugeMetricFamily("tcptunnel_queued_bytes", "Bytes queued for sending",
                                   labels=["instance", "role"])
        relayed = GaugeMetricFamily(
            "tcptunnel_gateway_streams", "Streams open now through the Gateway, by session "
            "and kind (tcp, udp, sealed: end-to-end encrypted, pake: end-to-end pairing, "
            "other)", labels=["instance", "session", "kind"])
        session_queued = GaugeMetricFamily("tcptunnel_session_queued_bytes",
                                           "Bytes the Gateway queued toward a session's links",
                                           labels=["instance", "session"])
        rtt = GaugeMetricFamily("tcptunnel_link_rtt_seconds",
                                "Keepalive round-trip time of a proxy's link",
                                labels=["instance", "role"])
        reconnects = CounterMetricFamily("tcptunnel_links_lost",
                                         "Links to the Gateway lost (then re-established)",
                                         labels=["instance", "role"])
        drained = CounterMetricFamily(
            "tcptunnel_links_drained", "Links to the Gateway it drained (GOAWAY DRAINING after "
            "the login: a new link started beside it at once; not counted as lost)",
            labels=["instance", "role"])
        limits = CounterMetricFamily("tcptunnel_limits_hit", "Limits hit at the Gateway",
                                     labels=["instance", "limit"])
        udp_flows = GaugeMetricFamily("tcptunnel_udp_flows", "UDP flows open now at a proxy",
                                      labels=["instance", "role"])
        udp_datagrams = CounterMetricFamily(
            "tcptunnel_udp_datagrams", "UDP datagrams at a proxy, by direction (from_senders, "
            "to_senders at a Proxy-Server; to_targets, from_targets at a Proxy-Client)",
            labels=["instance", "role", "direction"])
        udp_dropped = CounterMetricFamily(
            "tcptunnel_udp_dropped", "UDP datagrams dropped at a proxy, by reason",
            labels=["instance", "role", "reason"])
        udp_moved = CounterMetricFamily(
            "tcptunnel_udp_flows_moved", "UDP flows a Proxy-Server moved off a draining link "
            "to the new one (at the flow's next datagram)", labels=["instance", "role"])
        slots = GaugeMetricFamily(
            "tcptunnel_unauthenticated_slots",
            "Unauthenticated slots taken at the Gateway: by links logging in (open) and kept "
            "after a failed login's link closed (held)", labels=["instance", "state"])
        slots_limit = GaugeMetricFamily("tcptunnel_unauthenticated_slots_limit",
                                        "maxUnauthenticatedLinks", labels=["instance"])
        throttle = GaugeMetricFamily(
            "tcptunnel_login_throttle_buckets",
            "Token buckets the login throttle remembers, per table", labels=["instance", "table"])
        for child in self.tunnel:
            if isinstance(child, GatewayService):
                gateway = child.gateway
                index = str(child.config.index)
                links.add_metric([index, "unauthenticated", "authenticating"],
                                 len(gateway.unauthenticated))
                for role in ("proxy-client", "proxy-server"):
                    links.add_metric([index, role, "ready"], sum(
                        1 for link in gateway.links if link.role_name == role))
                with_client.add_metric([index], sum(
                    1 for s in gateway.sessions.values() if s.client is not None))
                streams_open.add_metric([index, "gateway"], sum(
                    len(link.routes) for link in gateway.links if link.role_name
                    == "proxy-server"))
                queued.add_metric([index, "gateway"], gateway.relay.total.queued)
                for session in gateway.sessions.values():
                    session_queued.add_metric([index, str(session.id)], session.budget.queued)
                    by_kind = Counter(kind_name(route.kind) for server in
                                      session.servers.values() for route in server.routes.values())
                    for kind in STREAM_KINDS:
                        relayed.add_metric([index, str(session.id), kind], by_kind[kind])
                gateway.slots.expire(child.reactor.seconds())
                held = gateway.slots.held()
                slots.add_metric([index, "open"], len(gateway.slots) - held)
                slots.add_metric([index, "held"], held)
                slots_limit.add_metric([index], gateway.slots.total)
                gateway.throttle.sweep(child.reactor.seconds())
                for table, size in gateway.throttle.sizes().items():
                    throttle.add_metric([index, table], size)
                for key, count in gateway.stats.items():
                    name, *labels = key
                    if name in ("logins_ok", "logins_failed"):
                        logins.add_metric([index, str(labels[0]),
                                           "ok" if name == "logins_ok" else "failed"], count)
                    elif name == "streams_opened":
                        streams_opened.add_metric([index, str(labels[0])], count)
                    elif name == "streams_refused":
                        streams_refused.add_metric([index, str(labels[0]), str(labels[1])],
                                                   count)
                    elif name == "streams_reset":
                        streams_reset.add_metric([index, str(labels[0])], count)
                    elif name == "bytes":
                        session_bytes.add_metric([index, str(labels[0]), str(labels[1])],
                                                 count)
                    elif name == "limits_hit":
                        limits.add_metric([index, str(labels[0])], count)
            elif isinstance(child, ProxyService):
                index, role = str(child.config.index), child.config.role
                link = child.link
                links.add_metric([index, role, "ready"], 1 if link is not None else 0)
                links.add_metric([index, role, "draining"],
                                 1 if child.draining_link is not None else 0)
                partners.add_metric([index, role], link.partners if link is not None else 0)
                streams_open.add_metric([index, role], len(link.streams) if link else 0)
                queued.add_metric([index, role], sum(
                    s.send_buffered for s in link.core.streams.values()) if link else 0)
                if link is not None and link.rtt is not None:
                    rtt.add_metric([index, role], link.rtt)
                live_stalls = link.core.blocked_sent if link is not None else 0
                stalls.add_metric([index, role], child.stats["window_stalls",] + live_stalls)
                reconnects.add_metric([index, role], child.stats["links_lost",])
                drained.add_metric([index, role], child.stats["links_drained",])
                for result in ("ok", "failed"):
                    logins.add_metric([index, role, result], child.stats[f"logins_{result}",])
                sent, received = proxy_bytes(child)
                proxy_bytes_total.add_metric([index, role, "sent"], sent)
                proxy_bytes_total.add_metric([index, role, "received"], received)
                for key, count in child.stats.items():
                    if key[0] == "streams_ended":
                        streams_ended.add_metric([index, role, *key[1:]], count)
                    elif key[0] == "udp_datagrams":
                        udp_datagrams.add_metric([index, role, key[1]], count)
                    elif key[0] == "udp_dropped":
                        udp_dropped.add_metric([index, role, key[1]], count)
                udp_flows.add_metric([index, role], _udp_status(child)["flows"])
                udp_moved.add_metric([index, role], child.stats["udp_flows_moved",])
        yield from (info, links, logins, with_client, partners, streams_open, streams_opened,
                    streams_refused, streams_ended, streams_reset, session_bytes,
                    proxy_bytes_total, stalls, queued, relayed, session_queued, rtt, reconnects,
                    drained, limits,
                    slots, slots_limit, throttle, udp_flows, udp_datagrams, udp_dropped,
                    udp_moved)


# -- the page -----------------------------------------------------------------

_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(count: int) -> str:
    """``count`` bytes in binary units with about three significant digits: ``512 B``,
    ``1.50 KiB``, ``293 KiB``, ``1.21 GiB``."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in _BYTE_UNITS:
        value /= 1024
        # Two decimals below 10, one below 100, none above (chosen after rounding, so that
        # 9.999 reads "10.0").
        text = f"{value:.2f}"
        if float(text) >= 10:
            text = f"{value:.1f}"
        if float(text) >= 100:
            text = f"{value:.0f}"
        # 1023.9 KiB reads "1024 KiB": go on to "1.00 MiB".
        if float(text) < 1024 or unit == _BYTE_UNITS[-1]:
            break
    return f"{text} {unit}"


def human_duration(seconds: float) -> str:
    """A duration in the two largest units that matter: ``4.2 s``, ``3 min 20 s``,
    ``5 h 1 min``, ``12 d 3 h``."""
    if seconds < 59.95:  # what rounds to "60.0 s" reads "1 min 0 s"
        return f"{seconds:.1f} s"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>tcptunnel status</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: .3em .7em; text-align: left; }}
th {{ background: #f0f0f0; }} .ok {{ color: #176f2c; font-weight: bold; }}
.warn {{ color: #9a5b00; font-weight: bold; }}
.down {{ color: #b00020; font-weight: bold; }} small {{ color: #666; }}
</style></head><body>
<h1>tcptunnel</h1><p>{process}</p><small>refreshes every 5 s &middot;
<a href="/status">/status</a> &middot; <a href="/metrics">/metrics</a></small>
{body}
</body></html>
"""

def _proxy_state_html(instance: dict[str, Any]) -> str:
    """A proxy's state as the page shows it: green, amber without a partner (a Proxy-Server
    then refuses every local connection), red without a link."""
    state = instance["state"]
    if state == READY:
        css, text = "ok", "connected"
    elif state == NO_PARTNER:
        css, text = "warn", ("connected, no Proxy-Client (local connections are refused)"
                             if instance["role"] == "proxy-server" else
                             "connected, no Proxy-Server")
    else:
        css, text = "down", "not connected"
    return f'<span class="{css}">{html.escape(text)}</span>'


_KIND_WORDS = (("tcp", "TCP"), ("udp", "UDP"), ("sealed", "end-to-end encrypted"),
               ("pake", "end-to-end pairing"), ("other", "of other kinds"))


def _stream_counts_text(counts: dict[str, int]) -> str:
    """``2 TCP · 1 end-to-end encrypted``, or ``none``."""
    return " · ".join(f"{counts[key]} {word}" for key, word in _KIND_WORDS
                      if counts.get(key)) or "none"


def _stream_rows_html(instance: dict[str, Any]) -> str:
    """The table of a Gateway's streams: a stream in clear with its target, an end-to-end
    one as end-to-end encrypted (the Gateway cannot know its target)."""
    e = html.escape
    rows = []
    not_listed = 0
    for session in instance["sessions"]:
        not_listed += session["streams_not_listed"]
        for item in session["streams"]:
            target = ("end-to-end encrypted (not visible to the Gateway)" if item["end_to_end"]
                      else item["target"] or "?")
            rows.append(
                f"<tr><td>{session['id']}</td><td>#{item['proxy_server']}</td>"
                f"<td>{item['stream']}</td><td>{e(item['label'])}</td><td>{e(target)}</td>"
                f"<td>{e(human_duration(item['since']))}</td>"
                f"<td>{e(human_bytes(item['bytes_to_client']))} / "
                f"{e(human_bytes(item['bytes_to_server']))}</td></tr>")
    if not rows:
        return ""
    more = f"<p><small>and {not_listed} more stream(s)</small></p>" if not_listed else ""
    return ("<table><tr><th>session</th><th>Proxy-Server</th><th>stream</th><th>kind</th>"
            "<th>target</th><th>up</th><th>to client / to server</th></tr>"
            + "".join(rows) + "</table>" + more)


def render_page(status: dict[str, Any]) -> str:
    """The human-readable status page."""
    e = html.escape
    process = status["process"]
    parts = []
    for instance in status["instances"]:
        title = f"[{instance['index']}] {instance['role']}"
        if instance["role"] == "gateway":
            listeners = ", ".join(f"{e(item['address'])} ({e(_transport_text(item))})"
                                  for item in instance["listeners"])
            slots = instance["unauthenticated_slots"]
            buckets = instance["login_throttle"]["buckets"]
            draining_text = ('<span class="warn">draining</span>: no new logins; '
                             if instance.get("draining") else "")
            parts.append(
                f"<h2>{e(title)}</h2><p>{draining_text}Listening on {listeners or 'nothing'}; "
                f"{instance['unauthenticated_links']} link(s) logging in; unauthenticated "
                f"slots {slots['taken']} of {slots['limit']} taken ({slots['held']} held "
                f"after failed logins); login throttle remembers "
                f"{buckets['address_sessions']} address/session, {buckets['addresses']} "
                f"address and {buckets['sessions']} session bucket(s); "
                f"{e(human_bytes(instance['queued_bytes']))} queued.</p>")
            rows = []
            for session in instance["sessions"]:
                state = ('<span class="ok">Proxy-Client connected</span>'
                         if session["proxy_client"] else
                         '<span class="down">no Proxy-Client</span>')
                peers = "<br>".join(
                    e(f"{p['role']} {p['address']} · {p['streams']} streams · "
                      + ("draining · " if p.get("draining") else "")
                      + f"up {human_duration(p['since'])} · in {human_bytes(p['bytes_in'])}, "
                      f"out {human_bytes(p['bytes_out'])}"
                      + (f" · RTT {p['rtt_ms']} ms" if p["rtt_ms"] else ""))
                    for p in session["peers"]) or "—"
                rows.append(f"<tr><td>{session['id']}</td><td>{state}</td>"
                            f"<td>{session['proxy_servers']}</td><td>{peers}</td>"
                            f"<td>{e(_stream_counts_text(session['streams_by_kind']))}</td>"
                            f"<td>{e(human_bytes(session['bytes_to_client']))} / "
                            f"{e(human_bytes(session['bytes_to_server']))}</td>"
                            f"<td>{e(human_bytes(session['queued_bytes']))}</td></tr>")
            parts.append("<table><tr><th>session</th><th>state</th><th>Proxy-Servers</th>"
                         "<th>peers</th><th>streams</th><th>to client / to server</th>"
                         "<th>queued</th></tr>" + "".join(rows) + "</table>")
            parts.append(_stream_rows_html(instance))
        else:
            up = (f" for {e(human_duration(instance['since']))}"
                  if instance["since"] is not None else "")
            parts.append(
                f"<h2>{e(title)}</h2><p>Gateway {e(instance['gateway'])} "
                f"({e(_transport_text(instance))}), session {instance['session']}: "
                f"{_proxy_state_html(instance)}{up}; {instance['streams']} stream(s) open; "
                f"{e(human_bytes(instance['bytes_sent']))} sent, "
                f"{e(human_bytes(instance['bytes_received']))} received.</p>")
            draining = instance.get("draining_link")
            if draining:
                parts.append(
                    f"<p><span class=\"warn\">draining</span> link to the Gateway "
                    f"{e(draining['gateway'])} for {e(human_duration(draining['since']))}: "
                    f"{draining['streams']} stream(s) finishing there.</p>")
            if instance.get("bindings"):
                parts.append("<table><tr><th>listen</th><th>target</th></tr>" + "".join(
                    f"<tr><td>{e(b['listen'])}</td><td>{e(b['target'])}</td></tr>"
                    for b in instance["bindings"]) + "</table>")
    started = process["started"].replace("T", " ").replace("Z", " UTC")
    about = (f"version {e(process['version'])} on {e(process['host'])} (pid "
             f"{process['pid']}), started {e(started)}, up "
             f"{e(human_duration(process['uptime_s']))}")
    return PAGE.format(process=about, body="\n".join(parts))


class _SnapshotResource(Resource):
    """Renders the current snapshot with ``render`` as ``content_type``."""

    isLeaf = True  # noqa: N815 - Twisted attribute name

    def __init__(self, tunnel: service.MultiService, clock: Any, started: float,
                 content_type: bytes, render: Callable[[dict[str, Any]], str]) -> None:
        super().__init__()
        self.tunnel = tunnel
        self.clock = clock
        self.started = started
        self.content_type = content_type
        self.render_snapshot = render

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        """The snapshot, rendered."""
        request.setHeader(b"content-type", self.content_type)
        status = snapshot(self.tunnel, self.clock.seconds(), self.started)
        return self.render_snapshot(status).encode()


def host_allowed(host: str, names: tuple[str, ...]) -> bool:
    """Whether a Host header's host part (no port) may be served: an IP literal,
    ``localhost``, or one of ``names`` (normalised as ``config._host_names`` does)."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(literal)
        return True
    except ValueError:
        pass
    name = normalise_host(host)
    return name == "localhost" or name in names


class _Misdirected(Resource):
    """421 for a request whose Host names nothing this page answers to."""

    isLeaf = True  # noqa: N815 - Twisted attribute name

    def render(self, request: Request) -> bytes:
        """A short plain-text refusal, whatever the method."""
        request.setResponseCode(421, b"Misdirected Request")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (b"421 Misdirected Request: this status page answers only to IP addresses, "
                b"localhost and the names in <Status hostNames>.\n")


class _HostCheckedRoot(Resource):
    """The root resource: every path below it is served only for an allowed Host header.

    A browser on this host can be led by a page whose name resolves to 127.0.0.1 (DNS
    rebinding) to read the page under the attacker's name; that name reaches us in Host.
    """

    def __init__(self, host_names: tuple[str, ...]) -> None:
        super().__init__()
        self.host_names = host_names
        self.refusal = _Misdirected()

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:  # noqa: N802
        """The child for ``path``, or the 421 refusal for a Host we do not answer to."""
        # Without a Host header (HTTP/1.0) this is our own address: a literal, allowed; a
        # browser always sends one.
        host = request.getRequestHostname().decode("latin-1")
        if not host_allowed(host, self.host_names):
            return self.refusal
        return super().getChildWithDefault(path, request)


class StatusService(service.Service):
    """Serves /metrics, /status and / for all instances of the process."""

    log = Logger()

    def __init__(self, config: StatusConfig, tunnel: service.MultiService, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        # The service is built as the process starts (twistd's makeService): its time is the
        # process's start time for the page, on the reactor's clock like every other time.
        self.started = reactor.seconds()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(TunnelCollector(tunnel))
        # The standard process_* metrics (CPU, memory, file descriptors, start time) from
        # /proc; on a system without /proc it yields nothing.
        ProcessCollector(registry=self.registry)
        root = _HostCheckedRoot(config.host_names)
        root.putChild(b"", _SnapshotResource(tunnel, reactor, self.started,
                                             b"text/html; charset=utf-8", render_page))
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        root.putChild(b"status", _SnapshotResource(
            tunnel, reactor, self.started, b"application/json",
            lambda data: json.dumps(data, indent=1)))
        self.site = Site(root)
        self.site.displayTracebacks = False
        self.port: Any = None

    def startService(self) -> None:  # noqa: N802
        """Listen (loopback unless configured otherwise)."""
        self.port = listen(self.reactor, self.config.listen_ip, self.config.listen_port,
                           self.site, "The status page", self.config.location)
        address = format_address(self.config.listen_ip, self.port.getHost().port)
        self.log.info("Status page on http://{address}/ (metrics at /metrics)",
                      address=address)
        if self.config.listen_ip not in ("127.0.0.1", "::1"):
            self.log.warn("The status page listens on {address}, not only on loopback: it "
                          "shows peers and sessions to whoever can reach it", address=address)
        super().startService()

    def stopService(self) -> Any:  # noqa: N802
        """Stop listening."""
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
