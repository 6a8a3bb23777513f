"""Where one round trip's time goes, per hop (Proxy-Server, Gateway, Proxy-Client), TLS and plain.

``make bench-hops`` runs this (``python bench/hops.py``). For tcptunnel over TLS and over plain
links (three twistd processes each, started as ``bench/run.py`` starts them, against the
same echo server) it takes, over ``--pings`` 1-byte round trips:

* **CPU per round trip** of each process, user and kernel, from ``/proc/<pid>/stat``, with
  nothing attached to the processes (the figure the other columns are shares of);
* **syscalls per round trip** of each process (``strace -c -f``, a separate run: strace slows
  every syscall, so its times are not used, only its counts);
* **context switches** per round trip (``perf stat -e task-clock,context-switches``);
* **a cProfile of each process** (twistd's ``--profile``), taken twice, with ``--pings`` round
  trips and with none, and subtracted, so start-up, login and handshake drop out. Each
  function's own time (``tottime``) goes to one of: *our code* (``tcptunnel/``), *TLS*
  (our TLS protocol ``tcptunnel/tlslink.py``, Twisted's ``twisted/protocols/tls.py``,
  pyOpenSSL, cryptography, cffi and the OpenSSL functions they call; the standard library's
  ``ssl.py`` and its ``_ssl`` methods), *Twisted dispatch* (the rest of ``twisted/``: the reactor,
  ``callWithLogger``/``callWithContext``, the TCP transport), *syscalls* (the socket methods
  ``send``, ``recv`` ...), *other* (the standard library, builtins); ``epoll.poll``, which is
  waiting, is left out.

cProfile measures wall time, and on loopback a ``send`` runs the receiver's TCP stack and
wakes it, and on two cores the woken process often preempts the sender inside the call: the
profile's syscall times are inflated several-fold. So the table takes the kernel's share from
``/proc/<pid>/stat`` (measured, not profiled), and splits only the user CPU by the profile's
shares of the Python-side columns (cProfile inflates Python calls more than C calls, so the
Python columns are upper bounds and the TLS column, mostly C, a lower bound).

The result is a table per system and per hop, printed and (``--json``) written; the per-hop
section of docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # bench/run.py: the helpers, the systems and the ping-pong client

ROLES = ("proxy-server", "gateway", "proxy-client")  # the order a request crosses them
HOP_NAMES = {"proxy-server": "Proxy-Server", "gateway": "Gateway",
             "proxy-client": "Proxy-Client"}
CATEGORIES = ("our code", "Twisted dispatch", "TLS", "syscalls", "other")
# The columns the user CPU is split into (the kernel's share is measured, not profiled).
USER_CATEGORIES = ("our code", "Twisted dispatch", "TLS", "other")
SOCKET_METHODS = {"send", "recv", "recv_into", "sendall", "sendmsg", "recvmsg", "getsockopt",
                  "setsockopt", "shutdown", "close", "accept", "connect", "connect_ex"}
TLS_FUNCTION = re.compile(r"^(SSL_|ERR_|BIO_|X509|EVP_|OPENSSL_)")


def category(key: tuple[str, int, str]) -> str | None:
    """The column a profiled function's own time belongs to (None: waiting, left out)."""
    filename, _line, name = key
    path = filename.replace("\\", "/")
    if path.endswith(("tcptunnel/tlslink.py", "twisted/protocols/tls.py", "/ssl.py")) \
            or "/OpenSSL/" in path or "/cryptography/" in path or "cffi" in path:
        return "TLS"
    if "/tcptunnel/" in path:
        return "our code"
    if "/twisted/" in path:
        return "Twisted dispatch"
    if filename == "~":  # a builtin: "<method 'recv' of '_socket.socket' objects>" ...
        if "select.epoll" in name and "poll" in name:
            return None
        method = re.match(r"<(?:built-in )?method '?(\w+)'?", name)
        if method and ("_socket.socket" in name or "socket" in name) and \
                method.group(1) in SOCKET_METHODS:
            return "syscalls"
        function = re.match(r"<built-in method (?:_openssl\.)?(\w+)>", name)
        if function and TLS_FUNCTION.match(function.group(1)):
            return "TLS"
        if "_cffi_backend" in name or "CompiledLib" in name or "_openssl." in name \
                or "'_ssl." in name:  # <method 'read' of '_ssl._SSLSocket' objects>, MemoryBIO
            return "TLS"
    return "other"


def profile_seconds(path: str) -> dict[tuple[str, int, str], tuple[int, float]]:
    """Per function: (calls, own seconds) from a pstats file."""
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    return {key: (int(value[1]), float(value[2])) for key, value in stats.items()}


def profile_shares(loaded: str, empty: str, pings: int) -> dict[str, Any]:
    """The profiled own time per round trip by category (``loaded`` minus ``empty``), the
    shares, and the functions taking most of it."""
    with_pings, without = profile_seconds(loaded), profile_seconds(empty)
    per_category = dict.fromkeys(CATEGORIES, 0.0)
    functions: list[tuple[float, int, str, str]] = []
    for key, (calls, seconds) in with_pings.items():
        base_calls, base_seconds = without.get(key, (0, 0.0))
        what = category(key)
        if what is None:
            continue
        own = max(0.0, seconds - base_seconds) / pings
        per_category[what] += own
        name = f"{os.path.basename(key[0])}:{key[1]}({key[2]})" if key[0] != "~" else key[2]
        functions.append((own, calls - base_calls, what, name))
    total = sum(per_category.values()) or 1.0
    functions.sort(reverse=True)
    return {
        "profiled_us_per_round_trip": {k: v * 1e6 for k, v in per_category.items()},
        "shares": {k: v / total for k, v in per_category.items()},
        "top": [{"us": own * 1e6, "calls_per_round_trip": calls / pings, "category": what,
                 "function": name} for own, calls, what, name in functions[:15]],
    }


def cpu_times(pid: int) -> tuple[float, float]:
    """User and kernel CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def on_cpu_seconds(pid: int) -> float:
    """Seconds a process has run on a CPU so far (``/proc/<pid>/schedstat``, nanoseconds:
    finer than the 10 ms ticks of ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def strace_counts(pids: dict[str, int], run: Any, pings: int) -> dict[str, dict[str, float]]:
    """Syscalls per round trip of each process while ``run()`` runs (``strace -c -f``)."""
    tracers = {}
    for role, pid in pids.items():
        tracers[role] = subprocess.Popen(
            ["strace", "-c", "-f", "-q", "-p", str(pid), "-o", "/dev/fd/1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1.0)  # attached
    run()
    out: dict[str, dict[str, float]] = {}
    for role, tracer in tracers.items():
        tracer.send_signal(signal.SIGINT)
        text, _ = tracer.communicate(timeout=30)
        counts: dict[str, float] = {}
        for line in text.splitlines():
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3]) / pings
        out[role] = dict(sorted(counts.items(), key=lambda item: -item[1]))
    return out


def perf_counts(pids: dict[str, int], run: Any, pings: int) -> dict[str, dict[str, float]]:
    """Task clock (µs) and context switches per round trip of each process (``perf stat``)."""
    watchers = {}
    for role, pid in pids.items():
        watchers[role] = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", "task-clock,context-switches", "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    run()
    out: dict[str, dict[str, float]] = {}
    for role, watcher in watchers.items():
        watcher.send_signal(signal.SIGINT)
        _, text = watcher.communicate(timeout=30)
        figures: dict[str, float] = {}
        for line in text.splitlines():
            parts = line.split(",")
            if len(parts) >= 3 and parts[0].replace(".", "", 1).isdigit():
                event = parts[2]
                value = float(parts[0])
                if event.startswith("task-clock"):
                    figures["task_clock_us"] = value * 1e3 / pings  # msec -> µs
                elif event.startswith("context-switches"):
                    figures["context_switches"] = value / pings
        out[role] = figures
    return out


# The ping-pong client makes this many warm-up round trips before the ``count`` it times.
WARM_UP = 50


def trips(count: int) -> int:
    """The round trips one ping-pong run of ``count`` makes (what the counters see)."""
    return count + WARM_UP


def pings(port: int, count: int) -> list[float]:
    """``count`` timed 1-byte round trips through ``port`` (seconds each)."""
    samples: list[float] = bench.helper_output("pingpong", port, count)
    return samples


def measure_system(tls: bool, args: argparse.Namespace, work: str,
                   echo_port: int) -> dict[str, Any]:
    """All figures of one system (TLS or plain links)."""
    label = "tls" if tls else "plain"
    result: dict[str, Any] = {}
    procs = bench.Processes()
    try:
        system = bench.start_tcptunnel(procs, os.path.join(work, label), tls, echo_port,
                                       echo_port)
        pids = {role: system.pids[role] for role in ROLES}
        pings(system.echo_port, 500)  # warm-up
        before = {role: (*cpu_times(pid), on_cpu_seconds(pid)) for role, pid in pids.items()}
        samples = pings(system.echo_port, args.pings)
        after = {role: (*cpu_times(pid), on_cpu_seconds(pid)) for role, pid in pids.items()}
        result["round_trip_p50_us"] = bench.percentile(samples, 0.5) * 1e6
        result["cpu_us_per_round_trip"] = {}
        for role in ROLES:
            # The total from schedstat (ns); its user/kernel split from the ticks of stat.
            user, kernel = (after[role][i] - before[role][i] for i in (0, 1))
            total = (after[role][2] - before[role][2]) / trips(args.pings) * 1e6
            user_share = user / (user + kernel) if user + kernel else 0.5
            result["cpu_us_per_round_trip"][role] = {
                "total": total, "user": total * user_share, "kernel": total * (1 - user_share)}
        result["perf"] = perf_counts(pids, lambda: pings(system.echo_port, args.pings),
                                     trips(args.pings))
        result["syscalls_per_round_trip"] = strace_counts(
            pids, lambda: pings(system.echo_port, args.strace_pings), trips(args.strace_pings))
    finally:
        procs.stop_all()
    profiles = os.path.join(work, "profiles")
    for count in (args.pings, 0):
        procs = bench.Processes()
        try:
            system = bench.start_tcptunnel(procs, os.path.join(work, f"{label}-{count}"), tls,
                                           echo_port, echo_port, profile=profiles)
            if count:
                pings(system.echo_port, count)
            else:
                time.sleep(1.0)  # as long as the loaded run's pings take, roughly
        finally:
            procs.stop_all()  # twistd writes its profile as it exits
    result["profile"] = {
        role: profile_shares(os.path.join(profiles, f"{label}-{args.pings}-{role}.prof"),
                             os.path.join(profiles, f"{label}-0-{role}.prof"),
                             trips(args.pings))
        for role in ROLES}
    return result


def table(name: str, result: dict[str, Any]) -> list[str]:
    """Markdown rows: per hop, the CPU per round trip, its kernel part (syscalls) and its user
    part split by the profile's shares."""
    lines = [f"**{name}** (round trip p50 {result['round_trip_p50_us']:.0f} µs):", "",
             "| hop | CPU per round trip | " + " | ".join(USER_CATEGORIES)
             + " | kernel (syscalls) | syscalls per round trip | context switches |",
             "|---|---|" + "---|" * len(USER_CATEGORIES) + "---|---|---|"]
    for role in ROLES:
        cpu = result["cpu_us_per_round_trip"][role]
        profiled = result["profile"][role]["profiled_us_per_round_trip"]
        python = sum(profiled[c] for c in USER_CATEGORIES) or 1.0
        calls = result["syscalls_per_round_trip"][role]
        shown = ", ".join(f"{calls[c]:.1f} {c}" for c in list(calls)[:3])
        switches = result["perf"][role].get("context_switches", float("nan"))
        lines.append(f"| {HOP_NAMES[role]} | {cpu['total']:.0f} µs | "
                     + " | ".join(f"{profiled[c] / python * cpu['user']:.0f} µs"
                                  for c in USER_CATEGORIES)
                     + f" | {cpu['kernel']:.0f} µs | {shown} | {switches:.1f} |")
    return lines


def main() -> None:
    """Measure the systems asked for; print the tables (and write the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pings", type=int, default=5000)
    parser.add_argument("--strace-pings", type=int, default=1000)
    parser.add_argument("--systems", nargs="+", default=["tls", "plain"],
                        choices=["tls", "plain"])
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="tcptunnel-hops-")
    procs = bench.Processes()
    results: dict[str, Any] = {"pings": args.pings}
    try:
        echo_port = bench.free_port()
        procs.helper("echo-server", echo_port)
        bench.wait_port(echo_port)
        results["direct_p50_us"] = bench.percentile(pings(echo_port, args.pings), 0.5) * 1e6
        for label in args.systems:
            print(f"measuring tcptunnel {label} ...", flush=True)
            results[label] = measure_system(label == "tls", args, work, echo_port)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    print(f"\ndirect (client + echo server) p50 {results['direct_p50_us']:.1f} µs\n")
    for label in args.systems:
        print("\n".join(table(f"tcptunnel {label}", results[label])) + "\n")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
