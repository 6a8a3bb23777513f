"""One Gateway, many sessions: memory, idle CPU, a reconnect storm and one stream among idle ones.

``make bench-sessions`` runs this (``python bench/sessions.py --sessions 1000``). On loopback,
in a temporary folder, it starts

* an echo server (the target of every session);
* the *big* Gateway: one twistd process with N sessions on one TLS listener;
* the *load generator*: ONE twistd process whose settings file holds a Proxy-Client and a
  Proxy-Server ``<Instance>`` for each of the sessions 2..N (2N-2 TLS links; each Proxy-Server
  has one Binding to the echo server, so every session's first stream can be checked);
* session 1's Proxy-Client and Proxy-Server as two processes of their own, the way
  ``bench/run.py`` runs them, so that the measured stream passes through processes that carry
  nothing else;
* the *small* Gateway with one session, with its own two proxies: the same round trip
  against a Gateway that holds nothing else, measured in the same run, interleaved.

It measures the big Gateway's RSS before any link and with all 2N links logged in (memory per
link), the CPU of the Gateway and of the load generator over ``--idle-seconds`` of idle links
(keepalives only), the 1-byte round trip p50 / p99 through session 1 against the small
Gateway's (round-robin repeats), and a reconnect storm: the big Gateway is stopped and started
again on the same port, and the run waits (up to ``--storm-deadline``) for every link to log in
again, counting the GOAWAY LIMIT and authentication failures the proxies log, the Gateway's
"limit reached" lines and the kernel's listen-queue overflows, and then checks the first stream
of every session. The Gateway's limits are the product defaults unless ``--nat`` sets the
unauthenticated-link limits a deployment with every proxy behind one address needs.

Results: printed, and as JSON with ``--json FILE``; docs/benchmarks.md's "One Gateway, many
sessions" section quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # bench/run.py: the helpers, the systems and the ping-pong client

from tcptunnel.config import NAMESPACE
from tcptunnel.heap import DEFAULT_INTERVAL

NS = f'xmlns="{NAMESPACE}"'
TWISTD = [bench.PY, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
# What the proxies log (tcptunnel/proxy.py): one line per event, no budget, so the counts are
# exact (the Gateway's lines about unauthenticated links share a budget and may be dropped).
LOGGED_IN = re.compile(r"\[(\d+)\] Authentication succeeded")
LIMIT = re.compile(r"\[(\d+)\] The Gateway closes the link: LIMIT")
AUTH_FAILED = re.compile(r"\[(\d+)\] Authentication failed")
UNREACHABLE = re.compile(r"\[(\d+)\] Unable to connect to the Gateway")
# A link over the Gateway's unauthenticated-link limits is closed before the TLS handshake
# ends: the proxy sees its connection attempt fail (and retries within 3 s, not maxRetryDelay).
RESET = re.compile(r"\[(\d+)\] Unable to connect to the Gateway \S+: .*reset by peer")
GATEWAY_LIMIT = re.compile(r"Link \S+: limit of (.+) reached")
GATEWAY_SUPPRESSED = re.compile(r"(\d+) log lines about unauthenticated links were suppressed")
# A deployment whose proxies all come from one address (one NAT, or this benchmark): every
# link of the storm may be logging in at once (2 per session), a few more for slack.
NAT_HEADROOM = 64


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    result = subprocess.run(["nstat", "-az", "TcpExtListenOverflows", "TcpExtListenDrops"],
                            capture_output=True, text=True, check=False)
    total = 0
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("TcpExtListenOverflows", "TcpExtListenDrops"):
            total = max(total, int(parts[1]))  # drops include the overflows
    return total


@dataclass
class Layout:
    """The ports and passwords of one run."""

    sessions: int
    gateway_port: int
    small_gateway_port: int
    echo_port: int
    entrances: dict[int, int]  # session id -> its Proxy-Server's Binding port
    small_entrance: int


def gateway_xml(port: int, sessions: int, certs: Any, nat: bool) -> str:
    """A Gateway with ``sessions`` sessions on one listener, TLS unless ``certs`` is None
    (product limits unless ``nat``)."""
    limits = ""
    if nat:
        links = 2 * sessions + NAT_HEADROOM
        limits = (f' maxUnauthenticatedLinks="{links}"'
                  f' maxUnauthenticatedLinksPerAddress="{links}"')
    body = "".join(f'<Session id="{i}" proxyClientPassword="pc{i}" proxyServerPassword="ps{i}"/>'
                   for i in range(1, sessions + 1))
    return (f'<Settings {NS}><Instance type="gateway"{limits}>'
            f'<Listener ip="127.0.0.1" port="{port}"{tls_listener(certs)}/>{body}'
            '</Instance></Settings>')


def tls_listener(certs: Any) -> str:
    """The Listener's certificate attributes (none: plain links, ``--plain``)."""
    if certs is None:
        return ""
    return (f' certificatePemFilePath="{certs.cert}" '
            f'certificatePemKeyFilePath="{certs.key}"')


def proxy_instances(port: int, session: int, entrance: int, echo: int, certs: Any,
                    roles: tuple[str, ...] = ("proxy-client", "proxy-server")) -> str:
    """A Proxy-Client and/or a Proxy-Server ``<Instance>`` of ``session`` (product defaults:
    keepalives, retry delays)."""
    tls = f'useSsl="true" caFile="{certs.ca}" serverName="localhost"' if certs else ""
    out = []
    if "proxy-client" in roles:
        out.append(f'<Instance type="proxy-client" host="127.0.0.1" port="{port}" {tls}>'
                   f'<Session id="{session}" password="pc{session}"/></Instance>')
    if "proxy-server" in roles:
        out.append(f'<Instance type="proxy-server" host="127.0.0.1" port="{port}" {tls}>'
                   f'<Session id="{session}" password="ps{session}">'
                   f'<Binding listenIp="127.0.0.1" listenPort="{entrance}" '
                   f'targetHost="127.0.0.1" targetPort="{echo}"/></Session></Instance>')
    return "".join(out)


def write(path: str, text: str) -> str:
    """Write ``text`` to ``path``; returns the path."""
    with open(path, "w") as f:
        f.write(text)
    return path


def twistd(procs: bench.Processes, work: str, name: str, settings: str) -> int:
    """Start one twistd tcptunnel process logging to ``<work>/<name>.log``; its pid."""
    config = write(os.path.join(work, f"{name}.xml"), settings)
    process = procs.start([*TWISTD, "--logfile", os.path.join(work, f"{name}.log"),
                           "tcptunnel", "--config", config],
                          env=dict(os.environ, PYTHONPATH=bench.ROOT), cwd=work)
    return process.pid


def read_log(path: str, offset: int = 0) -> str:
    """A log file's text from ``offset`` on (empty while it does not exist yet)."""
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return ""


def log_size(path: str) -> int:
    """A log file's size now (0 while it does not exist yet): where a later read starts."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def wait_logins(logs: list[str], offsets: list[int], expected: int, deadline: float,
                progress: str) -> tuple[float | None, dict[str, int]]:
    """Poll the proxies' logs (from ``offsets``) until ``expected`` distinct (log, instance)
    pairs logged in, or ``deadline`` (monotonic); returns the time it took (None: not all
    came back) and the counts of LIMIT, authentication failures and unreachable tries."""
    started = time.monotonic()
    last_print = started
    while True:
        texts = [read_log(path, offset) for path, offset in zip(logs, offsets, strict=True)]
        logged = {(n, m) for n, text in enumerate(texts) for m in LOGGED_IN.findall(text)}
        now = time.monotonic()
        if len(logged) >= expected or now >= deadline:
            counts = {
                "logged_in": len(logged),
                "goaway_limit": sum(len(LIMIT.findall(t)) for t in texts),
                "auth_failed": sum(len(AUTH_FAILED.findall(t)) for t in texts),
                "unable_to_connect": sum(len(UNREACHABLE.findall(t)) for t in texts),
                "reset_while_connecting": sum(len(RESET.findall(t)) for t in texts),
            }
            return (now - started if len(logged) >= expected else None), counts
        if now - last_print >= 5:
            print(f"  {progress}: {len(logged)}/{expected} links logged in after "
                  f"{now - started:.0f} s", flush=True)
            last_print = now
        time.sleep(0.25)


def check_streams(entrances: list[int], parallel: int = 50,
                  timeout: float = 10.0) -> tuple[int, list[int]]:
    """Open one stream through each entrance (1-byte echo), ``parallel`` at a time; returns
    the number that worked and the ports that did not."""

    async def one(port: int, gate: asyncio.Semaphore) -> bool:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), timeout)
                writer.write(b"s")
                await writer.drain()
                ok = await asyncio.wait_for(reader.read(1), timeout) == b"s"
                writer.close()
                return ok
            except (TimeoutError, OSError):
                return False

    async def main() -> list[bool]:
        gate = asyncio.Semaphore(parallel)
        return list(await asyncio.gather(*(one(p, gate) for p in entrances)))

    results = asyncio.run(main())
    failed = [p for p, ok in zip(entrances, results, strict=True) if not ok]
    return len(entrances) - len(failed), failed


def round_trips(big: int, small: int, repeats: int, pings: int) -> dict[str, Any]:
    """1-byte ping-pong p50/p99 (µs) through ``big`` and ``small``, round-robin repeats."""
    runs: dict[str, list[list[float]]] = {"big": [], "small": []}
    for repeat in range(repeats):
        order = [("big", big), ("small", small)]
        for name, port in order if repeat % 2 == 0 else order[::-1]:
            runs[name].append(bench.helper_output("pingpong", port, pings))
    out: dict[str, Any] = {}
    for name, samples in runs.items():
        out[name] = {
            "p50_us": bench.spread([bench.percentile(s, 0.5) * 1e6 for s in samples]),
            "p99_us": bench.spread([bench.percentile(s, 0.99) * 1e6 for s in samples]),
        }
    out["p50_ratio"] = out["big"]["p50_us"]["median"] / out["small"]["p50_us"]["median"]
    return out


def entrance_ports(count: int) -> list[int]:
    """``count`` ports below the kernel's ephemeral range that are free now, for the Proxy-
    Servers' Bindings: inside the range, the load generator's own 2N outgoing links (and any
    other test on this machine) may take one of them between the choice and the listen."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports: list[int] = []
    candidate = 10000 + (os.getpid() * 7919) % 5000  # runs side by side pick apart
    while len(ports) < count:
        if candidate >= ephemeral_low:
            raise RuntimeError(f"not {count} free ports below {ephemeral_low}")
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
                ports.append(candidate)
            except OSError:
                pass
        candidate += 1
    return ports


def gateway_fds(pid: int) -> int:
    """The file descriptors a process holds open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, take every figure in order, stop everything; the results."""
    from tcptunnel.test._certs import mint

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the children inherit it
    n = args.sessions
    work = tempfile.mkdtemp(prefix="tcptunnel-sessions-")
    procs = bench.Processes()
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    results: dict[str, Any] = {"sessions": n, "links": 2 * n, "nat_limits": args.nat,
                               "tls": not args.plain,
                               "nofile_limit": hard, "somaxconn": somaxconn}
    try:
        certs = None if args.plain else mint(os.path.join(work, "certs"))
        *entrances, small_entrance = entrance_ports(n + 1)
        layout = Layout(n, bench.free_port(), bench.free_port(), bench.free_port(),
                        dict(enumerate(entrances, 1)), small_entrance)
        procs.helper("echo-server", layout.echo_port)
        bench.wait_port(layout.echo_port)

        # The small Gateway and its session, started first: it idles during the rest.
        twistd(procs, work, "small-gateway", gateway_xml(layout.small_gateway_port, 1, certs,
                                                         args.nat))
        bench.wait_port(layout.small_gateway_port)
        for role in ("proxy-client", "proxy-server"):
            twistd(procs, work, f"small-{role}", f"<Settings {NS}>" + proxy_instances(
                layout.small_gateway_port, 1, layout.small_entrance, layout.echo_port, certs,
                (role,)) + "</Settings>")

        gateway_settings = gateway_xml(layout.gateway_port, n, certs, args.nat)
        gateway = twistd(procs, work, "gateway", gateway_settings)
        bench.wait_port(layout.gateway_port)
        time.sleep(DEFAULT_INTERVAL + 1.0)  # one heap-trim interval, as an idle process
        results["gateway_rss_no_links_MiB"] = bench.rss_mib(gateway)
        print(f"big Gateway ({n} sessions) before any link: "
              f"{results['gateway_rss_no_links_MiB']:.1f} MiB", flush=True)

        logs = [os.path.join(work, name + ".log")
                for name in ("session1-proxy-client", "session1-proxy-server", "loader")]
        started = time.monotonic()
        for role in ("proxy-client", "proxy-server"):
            twistd(procs, work, f"session1-{role}", f"<Settings {NS}>" + proxy_instances(
                layout.gateway_port, 1, layout.entrances[1], layout.echo_port, certs,
                (role,)) + "</Settings>")
        loader = twistd(procs, work, "loader", f"<Settings {NS}>" + "".join(
            proxy_instances(layout.gateway_port, i, layout.entrances[i], layout.echo_port,
                            certs) for i in range(2, n + 1)) + "</Settings>")
        took, counts = wait_logins(logs, [0, 0, 0], 2 * n, started + args.start_deadline,
                                   "start")
        start_log = read_log(os.path.join(work, "gateway.log"))
        results["start"] = {"seconds": took, **counts,
                            "gateway_limit_lines": len(GATEWAY_LIMIT.findall(start_log)),
                            "gateway_suppressed_lines": sum(
                                int(m) for m in GATEWAY_SUPPRESSED.findall(start_log))}
        print(f"start: {counts} in {took if took is None else round(took, 1)} s", flush=True)
        if took is None:
            raise RuntimeError(f"only {counts['logged_in']} of {2 * n} links logged in within "
                               f"{args.start_deadline:.0f} s of the start")
        bench.wait_echo(layout.entrances[1])
        bench.wait_echo(layout.small_entrance)

        # Idle: keepalives only.
        time.sleep(DEFAULT_INTERVAL + 1.0)
        cpu_gateway, cpu_loader = cpu_seconds(gateway), cpu_seconds(loader)
        time.sleep(args.idle_seconds)
        idle = {
            "seconds": args.idle_seconds,
            "gateway_cpu_percent": (cpu_seconds(gateway) - cpu_gateway) / args.idle_seconds
            * 100,
            "loader_cpu_percent": (cpu_seconds(loader) - cpu_loader) / args.idle_seconds * 100,
        }
        rss = bench.rss_mib(gateway)
        idle.update({
            "gateway_rss_MiB": rss,
            "gateway_bytes_per_link": (rss - results["gateway_rss_no_links_MiB"]) * 2**20
            / (2 * n),
            "gateway_fds": gateway_fds(gateway),
            "loader_rss_MiB": bench.rss_mib(loader),
        })
        results["idle"] = idle
        print(f"idle: {idle}", flush=True)

        # One stream among the idle sessions, against a Gateway with one session.
        results["round_trip"] = round_trips(layout.entrances[1], layout.small_entrance,
                                            args.repeats, args.pings)
        print(f"round trip: {results['round_trip']}", flush=True)

        # The reconnect storm.
        overflows = listen_overflows()
        offsets = [log_size(path) for path in logs]
        stopped = time.monotonic()
        os.kill(gateway, signal.SIGTERM)
        for process in procs.items:
            if process.pid == gateway:
                process.wait(30)
        down = time.monotonic() - stopped
        restart_log = os.path.join(work, "gateway-restarted.log")
        gateway = twistd(procs, work, "gateway-restarted", gateway_settings)
        bench.wait_port(layout.gateway_port)
        listening = time.monotonic() - stopped
        took, counts = wait_logins(logs, offsets, 2 * n, stopped + args.storm_deadline, "storm")
        gateway_text = read_log(restart_log)
        storm: dict[str, Any] = {
            "deadline_s": args.storm_deadline,
            "seconds_from_stop": took,
            "old_gateway_exit_s": down,
            "listening_after_s": listening,
            **counts,
            "gateway_limit_lines": len(GATEWAY_LIMIT.findall(gateway_text)),
            "gateway_limit_kinds": sorted(set(GATEWAY_LIMIT.findall(gateway_text))),
            "gateway_suppressed_lines": sum(
                int(m) for m in GATEWAY_SUPPRESSED.findall(gateway_text)),
            "listen_overflows": listen_overflows() - overflows,
        }
        if took is None:
            # How long the rest takes, bounded, to report it honestly.
            late, late_counts = wait_logins(logs, offsets, 2 * n,
                                            stopped + args.storm_deadline * 3, "storm (late)")
            storm["all_back_s"] = None if late is None else late + args.storm_deadline
            storm["late_counts"] = late_counts
        results["storm"] = storm
        print(f"storm: {storm}", flush=True)
        ok, failed = check_streams(list(layout.entrances.values()))
        results["first_streams"] = {"ok": ok, "failed": len(failed)}
        print(f"first stream of every session: {ok} worked, {len(failed)} did not", flush=True)
        results["gateway_rss_after_storm_MiB"] = bench.rss_mib(gateway)
        results["loader_rss_after_storm_MiB"] = bench.rss_mib(loader)
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def summary(results: dict[str, Any]) -> list[str]:
    """The figures of docs/benchmarks.md's table, as its Markdown rows (one column)."""
    idle, trip, storm = results["idle"], results["round_trip"], results["storm"]

    def seconds(value: float | None) -> str:
        return "not all" if value is None else f"{value:.1f} s"

    def p50(which: str) -> str:
        spread = trip[which]["p50_us"]
        return f"{spread['median']:.0f} µs ({spread['min']:.0f}-{spread['max']:.0f})"

    n = results["sessions"]
    rows = [
        ("links logged in", f"{results['start']['logged_in']:,}"),
        (f"first start: all {2 * n:,} links logged in", seconds(results["start"]["seconds"])),
        ("Gateway RSS before any link", f"{results['gateway_rss_no_links_MiB']:.1f} MiB"),
        (f"Gateway RSS with {2 * n:,} idle links", f"{idle['gateway_rss_MiB']:.1f} MiB"),
        ("Gateway memory per link", f"{idle['gateway_bytes_per_link'] / 1000:.1f} KB"),
        ("Gateway file descriptors", f"{idle['gateway_fds']:,}"),
        (f"Gateway CPU at idle ({idle['seconds']:.0f} s)", f"{idle['gateway_cpu_percent']:.1f} %"),
        ("load generator RSS / CPU at idle",
         f"{idle['loader_rss_MiB']:.1f} MiB / {idle['loader_cpu_percent']:.1f} %"),
        (f"round trip p50, session 1 of {n:,}", p50("big")),
        ("round trip p50, the one-session Gateway", p50("small")),
        (f"ratio, {n:,} sessions over 1", f"{trip['p50_ratio']:.2f}x"),
        ("storm: old Gateway gone after", seconds(storm["old_gateway_exit_s"])),
        ("storm: new Gateway listening, after the stop", seconds(storm["listening_after_s"])),
        ("storm: all links logged in again, after the stop", seconds(storm["seconds_from_stop"])),
        ("GOAWAY LIMIT received by the proxies", f"{storm['goaway_limit']:,}"),
        ("authentication failures", f"{storm['auth_failed']:,}"),
        ("closed by the Gateway before the TLS handshake ended",
         f"{storm['reset_while_connecting']:,}"),
        ("refused while no Gateway listened",
         f"{storm['unable_to_connect'] - storm['reset_while_connecting']:,}"),
        ("SYNs dropped at the full accept queue", f"{storm['listen_overflows']:,}"),
        ("first stream of every session after the storm",
         f"{results['first_streams']['ok']:,} of {n:,}"),
    ]
    return ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def main() -> None:
    """Parse the options, run, print the results (and write the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--start-deadline", type=float, default=300.0,
                        help="seconds the first logins of all links may take")
    parser.add_argument("--storm-deadline", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--pings", type=int, default=1000)
    parser.add_argument("--nat", action="store_true",
                        help="raise the Gateway's unauthenticated-link limits to 2N+64, as a "
                             "deployment with all proxies behind one address needs")
    parser.add_argument("--plain", action="store_true",
                        help="plain TCP links instead of TLS (what TLS costs per link)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    results = run(args)
    text = json.dumps(results, indent=1)
    print(text)
    print("\n".join(["", *summary(results)]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
