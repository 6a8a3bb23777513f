"""UDP through the tunnel, side by side with socat's UDP relay over the same three hops.

``python bench/udp.py [--json bench-udp.json]`` (a ``udp`` section for ``make bench``: see
:func:`measure_udp`, which ``bench/run.py`` can call with its own ``Processes``).  It starts
an iperf3 server and a UDP echo server, then two systems with an entrance per target:

* tcptunnel (plain links: Gateway, Proxy-Server, Proxy-Client as three twistd processes), with
  a UDP Binding for each target (plus a TCP Binding on the iperf3 entrance's port number for
  iperf3's control connection);
* socat, three chained relays per target (``UDP4-LISTEN:...,fork`` to ``UDP4:...``, one child
  per sender, and the same for iperf3's TCP control connection).

and measures, taken round-robin across the systems:

* **throughput at 1 % loss**: the highest iperf3 ``-u`` rate (1,400-byte datagrams, 2 s runs)
  whose receiver-side loss stays at or below 1 %, found by bisection between 1 and 2,000
  Mbit/s;
* **request/response latency**: ``--pings`` sequential 64-byte datagrams echoed through the
  entrance (one sender, one flow), median and 99th percentile round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # bench/run.py: Processes, free_port, the systems' helpers


def role_udp_echo(port: int) -> None:
    """Echo every datagram to its sender (the latency target)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        while True:
            data, addr = s.recvfrom(65536)
            s.sendto(data, addr)


def free_udp_and_tcp_port() -> int:
    """A port number free for both TCP and UDP a moment ago (racy; bench only)."""
    for _ in range(50):
        port = bench.free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")


def start_tcptunnel_udp(procs: bench.Processes, work: str, iperf_port: int,
                        echo_port: int) -> dict[str, int]:
    """The three roles with UDP Bindings; the entrance per target."""
    os.makedirs(work, exist_ok=True)
    gateway_port = bench.free_port()
    iperf_entrance = free_udp_and_tcp_port()
    echo_entrance = free_udp_and_tcp_port()
    tcp_control = bench.free_port()
    allow = (f'<AllowedTargetEndpoints><Endpoint host="127.0.0.1" port="{iperf_port}"/>'
             f'<Endpoint protocol="udp" host="127.0.0.1" port="{iperf_port}"/>'
             f'<Endpoint protocol="udp" host="127.0.0.1" port="{echo_port}"/>'
             '</AllowedTargetEndpoints>')
    files = {
        "gateway": f'<Instance type="gateway"><Listener ip="127.0.0.1" port="{gateway_port}"/>'
                   '<Session id="1" proxyClientPassword="a" proxyServerPassword="b"/></Instance>',
        "proxy-client": f'<Instance type="proxy-client" host="127.0.0.1" port="{gateway_port}" '
                        f'maxRetryDelay="1"><Session id="1" password="a"/>{allow}</Instance>',
        "proxy-server": f'<Instance type="proxy-server" host="127.0.0.1" port="{gateway_port}" '
                        'maxRetryDelay="1"><Session id="1" password="b">'
                        f'<Binding listenIp="127.0.0.1" listenPort="{iperf_entrance}" '
                        f'targetHost="127.0.0.1" targetPort="{iperf_port}"/>'
                        f'<Binding protocol="udp" listenIp="127.0.0.1" '
                        f'listenPort="{iperf_entrance}" targetHost="127.0.0.1" '
                        f'targetPort="{iperf_port}"/>'
                        f'<Binding protocol="udp" listenIp="127.0.0.1" '
                        f'listenPort="{echo_entrance}" targetHost="127.0.0.1" '
                        f'targetPort="{echo_port}"/>'
                        # A TCP Binding to the iperf3 server, only to see the tunnel is up.
                        f'<Binding listenIp="127.0.0.1" listenPort="{tcp_control}" '
                        f'targetHost="127.0.0.1" targetPort="{iperf_port}"/>'
                        '</Session></Instance>',
    }
    env = dict(os.environ, PYTHONPATH=bench.ROOT)
    for role, body in files.items():
        path = os.path.join(work, f"{role}.xml")
        with open(path, "w") as f:
            f.write(f"<Settings {bench.NS}>{body}</Settings>")
        procs.start([bench.PY, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                     "--pidfile=", "--logfile", os.path.join(work, f"{role}.log"), "tcptunnel",
                     "--config", path], env=env, cwd=work)
        if role == "gateway":
            bench.wait_port(gateway_port)
    wait_udp_echo(echo_entrance)
    return {"iperf": iperf_entrance, "echo": echo_entrance}


def start_socat_udp(procs: bench.Processes, iperf_port: int,
                    echo_port: int) -> dict[str, int]:
    """Three chained socat relays per target, UDP (and TCP for iperf3's control)."""
    entrances = {}
    for name, target in (("iperf", iperf_port), ("echo", echo_port)):
        hops = [free_udp_and_tcp_port() for _ in range(3)]
        for listen, forward in zip(hops, [*hops[1:], target], strict=True):
            procs.start(["socat", "-T", "30", f"UDP4-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr",
                         f"UDP4:127.0.0.1:{forward}"])
            if name == "iperf":
                procs.start(["socat", f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr",
                             f"TCP:127.0.0.1:{forward}"])
        entrances[name] = hops[0]
    time.sleep(0.5)  # socat has no readiness signal; the echo check below retries anyway
    wait_udp_echo(entrances["echo"])
    return entrances


def wait_udp_echo(port: int, timeout: float = 30.0) -> None:
    """Wait until a datagram comes back through ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            try:
                s.sendto(b"?", ("127.0.0.1", port))
                if s.recvfrom(16)[0] == b"?":
                    return
            except OSError:
                time.sleep(0.1)
    raise RuntimeError(f"no UDP echo through port {port}")


def udp_pings(port: int, count: int) -> list[float]:
    """Round-trip times (s) of ``count`` sequential 64-byte datagrams, one flow."""
    times = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect(("127.0.0.1", port))
        payload = b"p" * 64
        for _ in range(count):
            started = time.perf_counter()
            s.send(payload)
            try:
                s.recv(65536)
            except TimeoutError:
                continue  # a lost datagram: not a round trip
            times.append(time.perf_counter() - started)
    return times


def iperf_udp(port: int, mbit: float, seconds: float = 2.0) -> tuple[float, float]:
    """(loss %, received Mbit/s) of one iperf3 -u run at ``mbit``."""
    end = bench.iperf_client(port, "-u", "-b", f"{mbit}M", "-l", "1400",
                             seconds=seconds)["end"]["sum"]
    return float(end["lost_percent"]), float(end["bits_per_second"]) / 1e6 * (
        1 - float(end["lost_percent"]) / 100)


def rate_at_loss(port: int, target_loss: float = 1.0, low: float = 1.0,
                 high: float = 2000.0, steps: int = 7) -> float:
    """The highest rate (Mbit/s, bisected) whose loss is at most ``target_loss`` %."""
    best = 0.0
    for _ in range(steps):
        rate = (low * high) ** 0.5  # bisect on a log scale
        loss, _received = iperf_udp(port, rate)
        if loss <= target_loss:
            best, low = rate, rate
        else:
            high = rate
    return best


def measure_udp(procs: bench.Processes, work: str, repeats: int = 3,
                pings: int = 2000) -> dict[str, Any]:
    """The UDP figures of both systems (the ``udp`` section of ``make bench``)."""
    iperf_port = free_udp_and_tcp_port()
    procs.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)])
    bench.wait_port(iperf_port)
    echo_port = free_udp_and_tcp_port()
    procs.start([bench.PY, os.path.abspath(__file__), "--role", "udp-echo", str(echo_port)])
    systems = {
        "tcptunnel plain": start_tcptunnel_udp(procs, os.path.join(work, "udp-tcptunnel"),
                                               iperf_port, echo_port),
        "socat 3 hops": start_socat_udp(procs, iperf_port, echo_port),
    }
    rates: dict[str, list[float]] = {name: [] for name in systems}
    rtts: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, entrance in systems.items():  # round-robin: a slow moment hits both
            rates[name].append(rate_at_loss(entrance["iperf"]))
            rtts[name] += udp_pings(entrance["echo"], pings // repeats)
    result: dict[str, Any] = {}
    for name in systems:
        samples = sorted(rtts[name])
        result[name] = {
            "mbit_at_1pct_loss": bench.spread(rates[name]),
            "rtt_ms_median": bench.percentile(samples, 0.5) * 1e3 if samples else None,
            "rtt_ms_p99": bench.percentile(samples, 0.99) * 1e3 if samples else None,
            "pings_answered": len(samples),
            "pings_sent": pings // repeats * repeats,
        }
    ours, theirs = result["tcptunnel plain"], result["socat 3 hops"]
    result["ratios"] = {
        "throughput_vs_socat": ours["mbit_at_1pct_loss"]["median"]
        / max(theirs["mbit_at_1pct_loss"]["median"], 1e-9),
        "rtt_median_vs_socat": (ours["rtt_ms_median"] or 0) / max(theirs["rtt_ms_median"] or 0,
                                                                   1e-9),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.role:
        if args.role[0] == "udp-echo":
            role_udp_echo(int(args.role[1]))
        return
    procs = bench.Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="tcptunnel-bench-udp-") as work:
            result = measure_udp(procs, work, args.repeats, args.pings)
    finally:
        procs.stop_all()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
