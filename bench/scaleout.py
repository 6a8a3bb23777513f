"""Scale-out: total throughput of 8 sessions over 2 Gateway processes against 1 (issue 20).

``make bench-scaleout`` runs this. On loopback, in a temporary folder, it starts eight
iperf3 servers (one per session) and, for each layout, fresh processes:

* ``1 gateway``: one Gateway process, the proxies connect to it directly;
* ``1 gateway + haproxy``: the same Gateway behind HAProxy (``mode tcp``, hash on the SNI,
  PROXY v2 headers), to price the balancer hop alone;
* ``2 gateways + haproxy``: two Gateway processes behind HAProxy, the sessions spread by
  their server names (``s<id>.gw.test``, a wildcard certificate), as docs/scaling.md sets
  it up.

The eight Proxy-Clients run in one twistd process and the eight Proxy-Servers in another (as
bench/sessions.py's load generator), TLS links, product defaults. Each layout runs eight
iperf3 clients at once, one through each session's Binding, for ``--seconds``; the figure is
the sum of what the iperf3 servers received (MB/s). Layouts are measured round-robin,
``--repeats`` times, in one run. On a two-core machine every process (iperf3, proxies,
Gateways, HAProxy) shares the same two cores: the figures show the cost of the extra hop
more than the gain of a second Gateway process (docs/benchmarks.md says so with them).

Results: printed, and as JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # bench/run.py: Processes, free_port, wait_port

from tcptunnel.config import NAMESPACE

NS = f'xmlns="{NAMESPACE}"'
TWISTD = [bench.PY, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
# A Proxy-Server instance that sees its Proxy-Client (tcptunnel/proxy.py's lines).
PARTNERED = re.compile(r"\[(\d+)\] (?:Authentication succeeded.*partner available: yes"
                       r"|Partner available: yes)")
SESSIONS = 8
LAYOUTS = ("1 gateway", "1 gateway + haproxy", "2 gateways + haproxy")

HAPROXY_CONF = """\
global
  maxconn 1000
defaults
  mode tcp
  option redispatch
  retries 3
  timeout connect 2s
  timeout client 10m
  timeout server 10m
frontend tunnel
  bind 127.0.0.1:{port}
  tcp-request inspect-delay 5s
  tcp-request content set-var(sess.sni) req.ssl_sni if {{ req.ssl_hello_type 1 }}
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
  default_backend gateways
backend gateways
  balance hash var(sess.sni)
  hash-type consistent
{servers}
"""


def wait_listening(port: int, timeout: float = 20.0) -> None:
    """Until something listens on ``port`` (read from /proc/net/tcp, without connecting:
    iperf3 takes a probe connection for a test client and answers the next one busy)."""
    wanted = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # iperf3 listens on ::
            with open(table) as f:
                rows += [line.split() for line in f.readlines()[1:]]
        if any(row[1].endswith(wanted) and row[3] == "0A" for row in rows):  # 0A: LISTEN
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def write(path: str, text: str) -> str:
    """Write ``text`` to ``path``; returns the path."""
    with open(path, "w") as f:
        f.write(text)
    return path


def twistd(procs: bench.Processes, work: str, name: str, instances: str) -> str:
    """One twistd tcptunnel process for these Instances; its log file."""
    config = write(os.path.join(work, f"{name}.xml"), f"<Settings {NS}>{instances}</Settings>")
    log = os.path.join(work, f"{name}.log")
    procs.start([*TWISTD, "--logfile", log, "tcptunnel", "--config", config],
                env=dict(os.environ, PYTHONPATH=bench.ROOT), cwd=work)
    return log


def gateway(port: int, certs: Any, proxied: bool) -> str:
    """A Gateway with the eight sessions; PROXY headers from 127.0.0.2 behind HAProxy."""
    sessions = "".join(f'<Session id="{i}" proxyClientPassword="pc{i}" '
                       f'proxyServerPassword="ps{i}"/>' for i in range(1, SESSIONS + 1))
    accept = ' acceptProxyProtocol="127.0.0.2/32"' if proxied else ""
    return (f'<Instance type="gateway"><Listener ip="127.0.0.1" port="{port}" '
            f'certificatePemFilePath="{certs.cert}" certificatePemKeyFilePath="{certs.key}"'
            f'{accept}/>{sessions}</Instance>')


def proxies(role: str, port: int, certs: Any, entrances: list[int],
            targets: list[int]) -> str:
    """The eight Proxy-Clients or Proxy-Servers, each session under its own server name."""
    out = []
    for i in range(1, SESSIONS + 1):
        common = (f'host="127.0.0.1" port="{port}" useSsl="true" caFile="{certs.ca}" '
                  f'serverName="s{i}.gw.test"')
        if role == "proxy-client":
            out.append(f'<Instance type="proxy-client" {common}>'
                       f'<Session id="{i}" password="pc{i}"/></Instance>')
        else:
            out.append(f'<Instance type="proxy-server" {common}>'
                       f'<Session id="{i}" password="ps{i}"><Binding listenIp="127.0.0.1" '
                       f'listenPort="{entrances[i - 1]}" targetHost="127.0.0.1" '
                       f'targetPort="{targets[i - 1]}"/></Session></Instance>')
    return "".join(out)


def wait_partners(log: str, timeout: float = 60) -> None:
    """Until every Proxy-Server instance of the log sees its Proxy-Client."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(log, errors="replace") as f:
                if len(set(PARTNERED.findall(f.read()))) >= SESSIONS:
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the sessions did not come up ({log})")


def start_layout(procs: bench.Processes, work: str, layout: str, certs: Any,
                 targets: list[int], haproxy: str) -> tuple[list[int], dict[int, str]]:
    """The Gateway(s), HAProxy if any, and the proxies of one layout; the Binding ports and
    (for the spread) each Gateway's log."""
    os.makedirs(work, exist_ok=True)
    # Fresh iperf3 servers per layout: one that just ended a test may still answer "busy".
    for port in targets:
        procs.start(["iperf3", "-s", "-p", str(port)])
    for port in targets:
        wait_listening(port)
    count = 2 if layout.startswith("2") else 1
    behind = "haproxy" in layout
    ports = [bench.free_port() for _ in range(count)]
    gateway_logs = {i: twistd(procs, work, f"gateway{i}", gateway(port, certs, behind))
                    for i, port in enumerate(ports)}
    for port in ports:
        bench.wait_port(port)
    entry = ports[0]
    if behind:
        entry = bench.free_port()
        servers = "".join(f"  server g{i} 127.0.0.1:{port} source 127.0.0.2 send-proxy-v2\n"
                          for i, port in enumerate(ports))
        config = write(os.path.join(work, "haproxy.cfg"),
                       HAPROXY_CONF.format(port=entry, servers=servers))
        procs.start([haproxy, "-db", "-f", config])
        bench.wait_port(entry)
    entrances = [bench.free_port() for _ in range(SESSIONS)]
    logs = [twistd(procs, work, "proxy-clients",
                   proxies("proxy-client", entry, certs, entrances, targets)),
            twistd(procs, work, "proxy-servers",
                   proxies("proxy-server", entry, certs, entrances, targets))]
    wait_partners(logs[1])
    for port in entrances:
        wait_listening(port)
    return entrances, gateway_logs


def total_throughput(entrances: list[int], seconds: float) -> float:
    """Eight iperf3 clients at once, one per Binding; the sum received, in MB/s."""
    clients = [subprocess.Popen(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t",
                                 str(seconds), "-J"], stdout=subprocess.PIPE, text=True)
               for port in entrances]
    total = 0.0
    for client in clients:
        out, _ = client.communicate(timeout=seconds + 60)
        data = json.loads(out)
        if "error" in data:
            raise RuntimeError(data["error"])
        total += float(data["end"]["sum_received"]["bits_per_second"]) / 8 / 1e6
    return total


def spread(gateway_logs: dict[int, str]) -> list[int]:
    """Sessions per Gateway (the Proxy-Clients' logins each one logged)."""
    counts = []
    for path in gateway_logs.values():
        with open(path, errors="replace") as f:
            counts.append(len(re.findall(r"authenticated for session \d+ as proxy-client",
                                         f.read())))
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every layout, round-robin, ``args.repeats`` times."""
    from tcptunnel.test._certs import mint

    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK) or shutil.which("iperf3") is None:
        raise SystemExit("bench-scaleout needs haproxy and iperf3 (Debian: apt-get install "
                         "haproxy iperf3)")
    results: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    spreads: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="tcptunnel-scaleout-") as folder:
        certs = mint(os.path.join(folder, "certs"), hostname="*.gw.test")
        targets = [bench.free_port() for _ in range(SESSIONS)]
        for repeat in range(args.repeats):
            for layout in LAYOUTS:
                procs = bench.Processes()
                try:
                    work = os.path.join(folder, f"{repeat}-{layout.replace(' ', '')}")
                    entrances, logs = start_layout(procs, work, layout, certs, targets,
                                                   haproxy)
                    try:
                        figure = total_throughput(entrances, args.seconds)
                    except RuntimeError:
                        for name in sorted(os.listdir(work)):
                            if name.endswith(".log"):
                                with open(os.path.join(work, name), errors="replace") as f:
                                    print(f"--- {name}:", *f.readlines()[-15:], sep="",
                                          file=sys.stderr)
                        raise
                    results[layout].append(figure)
                    spreads[layout] = spread(logs)
                    print(f"{layout:>22}: {figure:8.1f} MB/s (sessions per Gateway: "
                          f"{spreads[layout]})", flush=True)
                finally:
                    procs.stop_all()
    return {
        "sessions": SESSIONS, "seconds": args.seconds, "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "layouts": {layout: {"runs": runs, "median": statistics.median(runs)}
                    for layout, runs in results.items()},
        "sessions_per_gateway": spreads,
    }


def main() -> None:
    """Command line: ``--seconds``, ``--repeats``, ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 time per run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the layouts")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = run(args)
    one = results["layouts"]["1 gateway"]["median"]
    for layout, figures in results["layouts"].items():
        print(f"{layout:>22}: median {figures['median']:8.1f} MB/s "
              f"({figures['median'] / one:.2f} x 1 gateway)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
