"""Observability: ``/metrics`` (Prometheus), ``/status`` (JSON) and ``/`` (a status page).

Enabled by a ``<Status listenIp="127.0.0.1" listenPort="9100"/>`` element in the settings
file (one per process; loopback unless another address is given).  Everything is read from
the live services when asked for: gauges from the current links and streams, counters from the
event counts each instance keeps (``stats``), so the tunnel code carries no metrics library
calls.
"""

from __future__ import annotations

import html
import ipaddress
import json
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application import service
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tcptunnel import _frames as fr
from tcptunnel.config import StatusConfig, format_address, normalise_host
from tcptunnel.gateway import GatewayLink, GatewayService
from tcptunnel.ports import listen
from tcptunnel.proxy import ProxyService


def _address(transport: Any) -> str:
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", "?")
    return format_address(host, getattr(peer, "port", 0))


def snapshot(tunnel: service.MultiService, now: float) -> dict[str, Any]:
    """What runs, who is connected, and the counters: the content of ``/status``."""
    instances = []
    for child in tunnel:
        if isinstance(child, GatewayService):
            gateway = child.gateway
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
                        "rtt_ms": round(link.rtt * 1e3, 3) if link.rtt is not None else None,
                        "tls": link.tls_description or None,
                    })
                sessions.append({
                    "id": session.id,
                    "proxy_client": session.client is not None,
                    "proxy_servers": len(session.servers),
                    "bytes_to_client": gateway.stats["bytes", session.id, "to_client"],
                    "bytes_to_server": gateway.stats["bytes", session.id, "to_server"],
                    "peers": peers,
                })
            instances.append({
                "index": child.config.index, "role": "gateway",
                "listeners": [
                    {"address": format_address(listener.ip, port.getHost().port),
                     "tls": listener.tls is not None}
                    for listener, port in zip(child.config.listeners, child.ports, strict=False)],
                "unauthenticated_links": len(gateway.unauthenticated),
                "sessions": sessions,
            })
        elif isinstance(child, ProxyService):
            proxy_link = child.link
            entry: dict[str, Any] = {
                "index": child.config.index, "role": child.config.role,
                "gateway": child.gateway_address, "tls": child.config.use_tls,
                "session": child.config.session_id,
                "connected": proxy_link is not None,
                "since": round(now - child.link_since, 1) if proxy_link is not None else None,
                "partners": proxy_link.partners if proxy_link is not None else 0,
                "streams": len(proxy_link.streams) if proxy_link is not None else 0,
                "rtt_ms": (round(proxy_link.rtt * 1e3, 3)
                           if proxy_link is not None and proxy_link.rtt else None),
                "bytes_sent": child.stats["bytes_sent",],
                "bytes_received": child.stats["bytes_received",],
            }
            bindings = getattr(child, "ports", None)
            if child.config.role == "proxy-server" and bindings is not None:
                entry["bindings"] = [
                    {"listen": format_address(b.listen_ip, port.getHost().port),
                     "target": format_address(b.target_host, b.target_port)}
                    for b, port in zip(child.config.bindings, bindings, strict=False)]
            instances.append(entry)
    return {"instances": instances}


class TunnelCollector(Collector):
    """Prometheus metrics computed from the live services at scrape time."""

    def __init__(self, tunnel: service.MultiService) -> None:
        self.tunnel = tunnel

    def collect(self) -> Iterator[Any]:
        """Yield every metric family."""
        links = GaugeMetricFamily("tcptunnel_links", "Links by instance, role and state",
                                  labels=["instance", "role", "state"])
        logins = CounterMetricFamily("tcptunnel_logins", "Logins by result",
                                     labels=["instance", "role", "result"])
        with_client = GaugeMetricFamily("tcptunnel_sessions_with_proxy_client",
                                        "Sessions whose Proxy-Client is connected",
                                        labels=["instance"])
        streams_open = GaugeMetricFamily("tcptunnel_streams_open", "Streams open now",
                                         labels=["instance", "role"])
        streams_opened = CounterMetricFamily("tcptunnel_streams_opened",
                                             "Streams opened at the Gateway",
                                             labels=["instance", "session"])
        streams_ended = CounterMetricFamily("tcptunnel_streams_ended",
                                            "Streams ended at a proxy, by how",
                                            labels=["instance", "role", "how"])
        streams_reset = CounterMetricFamily("tcptunnel_streams_reset",
                                            "Streams reset through the Gateway, by reason",
                                            labels=["instance", "reason"])
        session_bytes = CounterMetricFamily("tcptunnel_session_bytes",
                                            "Bytes relayed per session and direction",
                                            labels=["instance", "session", "direction"])
        proxy_bytes = CounterMetricFamily("tcptunnel_proxy_bytes",
                                          "Bytes of finished streams at a proxy",
                                          labels=["instance", "role", "direction"])
        stalls = CounterMetricFamily("tcptunnel_window_stalls",
                                     "DATA frames that spent a stream's window",
                                     labels=["instance", "role"])
        queued = GaugeMetricFamily("tcptunnel_queued_bytes", "Bytes queued for sending",
                                   labels=["instance", "role"])
        rtt = GaugeMetricFamily("tcptunnel_link_rtt_seconds",
                                "Keepalive round-trip time of a proxy's link",
                                labels=["instance", "role"])
        reconnects = CounterMetricFamily("tcptunnel_links_lost",
                                         "Links to the Gateway lost (then re-established)",
                                         labels=["instance", "role"])
        limits = CounterMetricFamily("tcptunnel_limits_hit", "Limits hit at the Gateway",
                                     labels=["instance", "limit"])
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
                queued.add_metric([index, "gateway"], sum(
                    link.core.queued_bytes for link in gateway.links))
                for key, count in gateway.stats.items():
                    name, *labels = key
                    if name in ("logins_ok", "logins_failed"):
                        logins.add_metric([index, str(labels[0]),
                                           "ok" if name == "logins_ok" else "failed"], count)
                    elif name == "streams_opened":
                        streams_opened.add_metric([index, str(labels[0])], count)
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
                streams_open.add_metric([index, role], len(link.streams) if link else 0)
                queued.add_metric([index, role], sum(
                    s.send_buffered for s in link.core.streams.values()) if link else 0)
                if link is not None and link.rtt is not None:
                    rtt.add_metric([index, role], link.rtt)
                live_stalls = link.core.blocked_sent if link is not None else 0
                stalls.add_metric([index, role], child.stats["window_stalls",] + live_stalls)
                reconnects.add_metric([index, role], child.stats["links_lost",])
                for result in ("ok", "failed"):
                    logins.add_metric([index, role, result], child.stats[f"logins_{result}",])
                proxy_bytes.add_metric([index, role, "sent"], child.stats["bytes_sent",])
                proxy_bytes.add_metric([index, role, "received"],
                                       child.stats["bytes_received",])
                for key, count in child.stats.items():
                    if key[0] == "streams_ended":
                        streams_ended.add_metric([index, role, key[1]], count)
        yield from (links, logins, with_client, streams_open, streams_opened, streams_ended,
                    streams_reset, session_bytes, proxy_bytes, stalls, queued, rtt,
                    reconnects, limits)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>tcptunnel status</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: .3em .7em; text-align: left; }}
th {{ background: #f0f0f0; }} .ok {{ color: #176f2c; font-weight: bold; }}
.down {{ color: #b00020; font-weight: bold; }} small {{ color: #666; }}
</style></head><body>
<h1>tcptunnel</h1><small>refreshes every 5 s &middot; <a href="/status">/status</a>
&middot; <a href="/metrics">/metrics</a></small>
{body}
</body></html>
"""


def render_page(status: dict[str, Any]) -> str:
    """The human-readable status page."""
    e = html.escape
    parts = []
    for instance in status["instances"]:
        title = f"[{instance['index']}] {instance['role']}"
        if instance["role"] == "gateway":
            listeners = ", ".join(f"{e(item['address'])} ({'TLS' if item['tls'] else 'plain'})"
                                  for item in instance["listeners"])
            parts.append(f"<h2>{e(title)}</h2><p>Listening on {listeners}; "
                         f"{instance['unauthenticated_links']} link(s) logging in.</p>")
            rows = []
            for session in instance["sessions"]:
                state = ('<span class="ok">Proxy-Client connected</span>'
                         if session["proxy_client"] else
                         '<span class="down">no Proxy-Client</span>')
                peers = "<br>".join(
                    e(f"{p['role']} {p['address']} · {p['streams']} streams · "
                      f"up {p['since']} s" + (f" · RTT {p['rtt_ms']} ms" if p["rtt_ms"] else ""))
                    for p in session["peers"]) or "—"
                rows.append(f"<tr><td>{session['id']}</td><td>{state}</td>"
                            f"<td>{session['proxy_servers']}</td><td>{peers}</td>"
                            f"<td>{session['bytes_to_client']:,} / "
                            f"{session['bytes_to_server']:,}</td></tr>")
            parts.append("<table><tr><th>session</th><th>state</th><th>Proxy-Servers</th>"
                         "<th>peers</th><th>bytes to client / to server</th></tr>"
                         + "".join(rows) + "</table>")
        else:
            state = ('<span class="ok">connected</span>' if instance["connected"]
                     else '<span class="down">not connected</span>')
            partner = "partner present" if instance["partners"] else "no partner"
            parts.append(
                f"<h2>{e(title)}</h2><p>Gateway {e(instance['gateway'])} "
                f"({'TLS' if instance['tls'] else 'plain'}), session {instance['session']}: "
                f"{state}, {partner}; {instance['streams']} stream(s) open; "
                f"{instance['bytes_sent']:,} bytes sent, {instance['bytes_received']:,} "
                "received by finished streams.</p>")
            if instance.get("bindings"):
                parts.append("<table><tr><th>listen</th><th>target</th></tr>" + "".join(
                    f"<tr><td>{e(b['listen'])}</td><td>{e(b['target'])}</td></tr>"
                    for b in instance["bindings"]) + "</table>")
    return PAGE.format(body="\n".join(parts))


class _SnapshotResource(Resource):
    """Renders the current snapshot with ``render`` as ``content_type``."""

    isLeaf = True  # noqa: N815 - Twisted attribute name

    def __init__(self, tunnel: service.MultiService, clock: Any, content_type: bytes,
                 render: Callable[[dict[str, Any]], str]) -> None:
        super().__init__()
        self.tunnel = tunnel
        self.clock = clock
        self.content_type = content_type
        self.render_snapshot = render

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        """The snapshot, rendered."""
        request.setHeader(b"content-type", self.content_type)
        return self.render_snapshot(snapshot(self.tunnel, self.clock.seconds())).encode()


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
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(TunnelCollector(tunnel))
        root = _HostCheckedRoot(config.host_names)
        root.putChild(b"", _SnapshotResource(tunnel, reactor, b"text/html; charset=utf-8",
                                             render_page))
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        root.putChild(b"status", _SnapshotResource(
            tunnel, reactor, b"application/json", lambda data: json.dumps(data, indent=1)))
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
