"""The pure parts of ``make bench`` (bench/run.py): the targets' verdicts, the report's new
sections (end-to-end on against off, WebSocket against TLS links, UDP against socat), the
Gateway CPU-per-byte summary and its /proc reader."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from types import ModuleType
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import tcptunnel

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(tcptunnel.__file__))),
                     "bench", "run.py")


def load_bench() -> ModuleType:
    """bench/run.py as a module of its own name (it is a script, not in a package)."""
    spec = importlib.util.spec_from_file_location("tcptunnel_bench_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def figure(median: float) -> dict[str, float]:
    """A figure as the bench keeps it: min / median / max over repeats."""
    return {"min": median * 0.9, "median": median, "max": median * 1.1}


def system(throughput: float, ping_ms: float, gateway_ns: float | None = None,
           **extra: Any) -> dict[str, Any]:
    """One system's figures, every row of the main table (the Gateway's CPU per byte only
    with ``gateway_ns``)."""
    out = {"throughput_1_MBps": figure(throughput), "throughput_8_MBps": figure(throughput),
           "ping_p50_ms": figure(ping_ms), "ping_p99_ms": figure(ping_ms * 3),
           "loaded_ping_p50_ms": figure(10.0), "loaded_ping_p99_ms": figure(30.0),
           "connrate_seq": figure(500.0), "connrate_50": figure(1500.0)}
    if gateway_ns is not None:
        out["gateway_ns_per_byte_1"] = figure(gateway_ns)
        out["gateway_ns_per_byte_8"] = figure(gateway_ns)
    out.update(extra)
    return out


def memory(mib: float) -> dict[str, Any]:
    """A memory result of one process called ``p``."""
    return {"fresh": {"p": mib}, "idle": {"p": mib}, "idle_connections": {"p": mib + 1},
            "idle_connections_file_backed": {"p": 20.0}, "bulk_peak": {"p": mib + 5},
            "bytes_per_idle_connection": {"p": 1000.0},
            "largest_process_idle_connections": mib + 1}


def results(e2e_throughput: float = 90.0, e2e_gateway_ns: float = 10.5) -> dict[str, Any]:
    """A whole run's results: tcptunnel TLS at 100 MB/s, 1 ms, 10 ns/byte at the Gateway;
    end-to-end on at ``e2e_throughput`` MB/s, 1.1 ms (measured on its three figures only),
    ``e2e_gateway_ns``; WebSocket links at 70 MB/s (below 0.8x), 1.5 ms (above 1.2x)."""
    e2e = system(e2e_throughput, 1.1, e2e_gateway_ns)
    for key in ("loaded_ping_p50_ms", "loaded_ping_p99_ms"):
        del e2e[key]
    udp_socat = {"mbit_at_1pct_loss": figure(100.0), "rtt_ms_median": 0.2,
                 "rtt_ms_p99": 1.0, "pings_answered": 1998, "pings_sent": 1998}
    return {
        "started": "2026-01-01T00:00:00+00:00", "duration_s": 600.0, "idle_connections": 1000,
        "versions": {"machine": "2 cores", "python": "3.11", "twisted": "26",
                     "openssh": "OpenSSH_9", "iperf3": "iperf 3.12"},
        "systems": {"direct": system(2000.0, 0.02),
                    bench.TLS: system(100.0, 1.0, 10.0, memory_MiB=memory(50.0)),
                    bench.WSS: system(70.0, 1.5, 12.0),
                    bench.PLAIN: system(200.0, 0.7, 5.0),
                    "OpenSSH": system(110.0, 0.5, memory_MiB=memory(8.0)),
                    "socat 3 hops": system(300.0, 0.25),
                    bench.E2E: e2e},
        "long_path": {"delay_each_way_ms": 20.0, "window growth (default)": figure(100.0),
                      "fixed 384 KiB window": figure(4.0), "ratio": 25.0},
        "udp": {bench.PLAIN: {**udp_socat, "mbit_at_1pct_loss": figure(150.0),
                              "rtt_ms_median": 0.5, "rtt_ms_p99": 5.0},
                "socat 3 hops": udp_socat},
    }


def row(text: str, label: str) -> str:
    """The Markdown table row of ``text`` that starts with ``label``."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, (label, rows)
    return rows[0]


class TargetTests(SynchronousTestCase):
    """``Target.judge``: the verdicts of the Targets table."""

    def test_ratio_met_and_missed(self) -> None:
        """A ratio of medians is judged against its goal in its direction: 0.9x meets
        ">= 0.85x", 0.8x does not; 1.1x meets "<= 1.2x", 1.3x does not."""
        at_least = bench.Target("t", "l", ">=", 0.85, "ref", "sub")
        at_most = bench.Target("t", "l", "<=", 1.2, "ref", "sub")

        def systems(ratio: float) -> dict[str, Any]:
            return {"ref": {"t": figure(10.0)}, "sub": {"t": figure(10.0 * ratio)}}

        self.assertEqual(at_least.judge(systems(0.9)), ("0.90x", ">= 0.85x", "yes"))
        self.assertEqual(at_least.judge(systems(0.8)), ("0.80x", ">= 0.85x", "NO"))
        self.assertEqual(at_most.judge(systems(1.1)), ("1.10x", "<= 1.2x", "yes"))
        self.assertEqual(at_most.judge(systems(1.3)), ("1.30x", "<= 1.2x", "NO"))

    def test_noise_allowance(self) -> None:
        """With a 10 % noise allowance, 1.08x against "<= 1.0x" is met and the verdict says
        it is within the noise; 1.12x is not met; the goal names the allowance."""
        target = bench.Target("t", "l", "<=", 1.0, "ref", "sub", noise=0.10)

        def judged(ratio: float) -> tuple[str, str, str] | None:
            result: tuple[str, str, str] | None = target.judge(
                {"ref": {"t": figure(10.0)}, "sub": {"t": figure(10.0 * ratio)}})
            return result

        self.assertEqual(judged(0.95), ("0.95x", "<= 1.0x (±10% noise)", "yes"))
        self.assertEqual(judged(1.08), ("1.08x", "<= 1.0x (±10% noise)",
                                        "yes, within the ±10% noise"))
        self.assertEqual(judged(1.12), ("1.12x", "<= 1.0x (±10% noise)", "NO"))

    def test_paired_rounds(self) -> None:
        """With each repeat's values kept, a ratio is the median of the per-round ratios, not
        the ratio of the medians: a slow round that slows both systems alike cancels out.
        Here the medians' ratio would be 100/90 = 1.11x (met), but in every round the subject
        is below 0.9x its reference: 0.89x, judged NO against ">= 1.0x"; a figure without
        per-round values (an older run's) falls back to the medians."""
        target = bench.Target("t", "l", ">=", 1.0, "ref", "sub")
        ref = bench.spread([100.0, 90.0, 112.0, 60.0, 180.0])
        sub = bench.spread([89.0, 80.0, 100.0, 53.0, 160.0])
        self.assertEqual(ref["values"], [100.0, 90.0, 112.0, 60.0, 180.0])
        self.assertEqual(target.judge({"ref": {"t": ref}, "sub": {"t": sub}}),
                         ("0.89x", ">= 1.0x", "NO"))
        self.assertAlmostEqual(bench.ratio(sub, ref), 0.89, places=2)
        self.assertAlmostEqual(bench.ratio(figure(90.0), figure(100.0)), 0.9)
        # Rounds of different counts (a figure re-measured alone) cannot be paired.
        self.assertAlmostEqual(bench.ratio(bench.spread([1.0, 3.0]), ref), 2.0 / 100.0)

    def test_missing_system_or_figure(self) -> None:
        """A target whose subject, reference or figure the run lacks gives no row (a
        partial run, or results written before the figure existed)."""
        target = bench.Target("t", "l", ">=", 1.0, "ref", "sub")
        self.assertIsNone(target.judge({"sub": {"t": figure(1.0)}}))
        self.assertIsNone(target.judge({"ref": {"t": figure(1.0)}, "sub": {}}))

    def test_absolute(self) -> None:
        """Without a reference the subject's median itself is judged, in ms."""
        target = bench.Target("t", "l", "<=", 2.0, None, "sub")
        self.assertEqual(target.judge({"sub": {"t": figure(1.5)}}), ("1.5", "<= 2 ms", "yes"))


class ReportTests(SynchronousTestCase):
    """``report_text``: the generated part of docs/benchmarks.md."""

    def test_new_target_rows(self) -> None:
        """The Targets table has the rows of issues 16 and 19 with same-run ratios: end-to-end
        0.90x throughput (met), 1.10x p50 (met), Gateway CPU 1.05x (met within the noise);
        WebSocket 0.70x throughput and 1.50x p50 (both missed)."""
        text = bench.report_text(results())
        self.assertIn("| 0.90x | >= 0.85x | yes |",
                      row(text, "end-to-end on over off: throughput, 1 stream"))
        self.assertIn("| 0.90x | >= 0.85x | yes |",
                      row(text, "end-to-end on over off: throughput, 8 streams"))
        self.assertIn("| 1.10x | <= 1.2x | yes |",
                      row(text, "end-to-end on over off: ping-pong p50"))
        self.assertIn("| 1.05x | <= 1.0x (±10% noise) | yes, within the ±10% noise |",
                      row(text, "end-to-end on over off: Gateway CPU per byte, 8 streams"))
        self.assertIn("| 0.70x | >= 0.8x | NO |",
                      row(text, "WebSocket over TLS links: throughput, 1 stream"))
        self.assertIn("| 1.50x | <= 1.2x | NO |",
                      row(text, "WebSocket over TLS links: ping-pong p50"))

    def test_missed_e2e_targets(self) -> None:
        """End-to-end at 0.80x throughput and 1.2x Gateway CPU per byte misses both goals."""
        text = bench.report_text(results(e2e_throughput=80.0, e2e_gateway_ns=12.0))
        self.assertIn("| 0.80x | >= 0.85x | NO |",
                      row(text, "end-to-end on over off: throughput, 1 stream"))
        self.assertIn("| 1.20x | <= 1.0x (±10% noise) | NO |",
                      row(text, "end-to-end on over off: Gateway CPU per byte, 1 stream"))

    def test_sections(self) -> None:
        """The end-to-end, WebSocket and UDP sections compare each figure with the same run's
        reference; the main table marks what end-to-end does not measure and gives the
        Gateway's CPU per byte only to systems with a Gateway."""
        text = bench.report_text(results())
        e2e = text.partition("## End-to-end encryption (issue 16)")[2].partition("\n## ")[0]
        self.assertIn("| connections/s, sequential | 500 (450-550) | 500 (450-550) | 1.00x |",
                      e2e)
        self.assertNotIn("under 8 bulk streams", e2e)  # not measured with end-to-end on
        websocket = text.partition("## WebSocket links (issue 19)")[2].partition("\n## ")[0]
        self.assertIn("| ping-pong p50 (ms) | 1 (0.9-1.1) | 1.5 (1.35-1.65) | 1.50x |",
                      websocket)
        udp = text.partition("## UDP (issue 18)")[2].partition("\n## ")[0]
        self.assertIn("| 150 (135-165) | 100 (90-110) | 1.50x |",
                      row(udp, "throughput at <= 1 % loss (Mbit/s)"))
        self.assertIn("| 0.5 | 0.2 | 2.50x |", row(udp, "request/response p50 (ms)"))
        self.assertIn("| 1998 of 1998 | 1998 of 1998 |", row(udp, "requests answered"))
        main = text.partition("## Memory")[0]
        loaded = row(main, "ping-pong p50 under 8 bulk streams (ms)")
        self.assertTrue(loaded.endswith("| \N{EN DASH} |"), loaded)  # E2E is the last column
        cpu = row(main, "Gateway CPU per byte, 1 stream (ns)").split(" | ")
        self.assertEqual(cpu[1], "\N{EN DASH}")  # direct
        self.assertEqual(cpu[2], "10 (9-11)")  # tcptunnel TLS; OpenSSH has none: no ratio
        self.assertIn("in 10 minutes", text)

    def test_older_results(self) -> None:
        """Results written before these figures existed (``--report-only`` on an older
        benchmarks.json: no end-to-end or WebSocket system, no UDP, no Gateway CPU) still
        render, without the sections and rows they lack."""
        old = results()
        del old["udp"], old["duration_s"]
        for name in (bench.E2E, bench.WSS):
            del old["systems"][name]
        for figures in old["systems"].values():
            figures.pop("gateway_ns_per_byte_1", None)
            figures.pop("gateway_ns_per_byte_8", None)
        text = bench.report_text(old)
        for absent in ("## End-to-end", "## WebSocket", "## UDP", "Gateway CPU per byte, 1",
                       "end-to-end on over off", "WebSocket over TLS links"):
            self.assertNotIn(absent, text)
        self.assertIn("| bulk throughput, 1 stream, over OpenSSH | 0.91x | >= 1.0x | NO |", text)


class CPUTests(SynchronousTestCase):
    """The Gateway's CPU per byte: the summary and the /proc reader behind it."""

    def test_summary(self) -> None:
        """Runs with a Gateway give the ns-per-byte spread beside the throughput; a system
        without one (None) gives the throughput only."""
        self.assertEqual(bench.bulk_summary([(100.0, 8.0), (120.0, 10.0), (90.0, 9.0)], 8),
                         {"throughput_8_MBps": {"min": 90.0, "median": 100.0, "max": 120.0,
                                                "values": [100.0, 120.0, 90.0]},
                          "gateway_ns_per_byte_8": {"min": 8.0, "median": 9.0, "max": 10.0,
                                                    "values": [8.0, 10.0, 9.0]}})
        self.assertEqual(bench.bulk_summary([(100.0, None)], 1),
                         {"throughput_1_MBps": {"min": 100.0, "median": 100.0,
                                                "max": 100.0, "values": [100.0]}})

    def test_on_cpu_ns_counts_this_process(self) -> None:
        """``on_cpu_ns`` of this process grows by at least the CPU time a busy loop burns
        (``time.thread_time_ns``, the same clock), within 10 %."""
        before, before_thread = bench.on_cpu_ns(os.getpid()), time.thread_time_ns()
        deadline = time.monotonic() + 5.0
        while time.thread_time_ns() - before_thread < 50_000_000:  # 50 ms of CPU
            self.assertLess(time.monotonic(), deadline)
        burnt = time.thread_time_ns() - before_thread
        self.assertGreaterEqual(bench.on_cpu_ns(os.getpid()) - before, burnt * 0.9)

    def test_system_measures(self) -> None:
        """A system with a figure list measures only those; without one, every figure."""
        restricted = bench.System("e2e", 1, 2, figures=bench.E2E_FIGURES)
        self.assertTrue(restricted.measures("throughput"))
        self.assertFalse(restricted.measures("loaded"))
        self.assertFalse(restricted.measures("memory"))
        self.assertTrue(bench.System("tls", 1, 2).measures("memory"))


class ShallowIdleTests(SynchronousTestCase):
    """The PM QoS hold that keeps the CPUs out of deep idle states during a run."""

    def test_holds_zero_while_running(self) -> None:
        """``shallow_idle`` writes a 4-byte 0 (the kernel's format: a native s32 of µs) to the
        file, keeps it open for the body and closes it after (closing is what ends the
        request); it yields True."""
        path = self.mktemp()
        opened: list[Any] = []

        def spy(*args: Any, **kwargs: Any) -> Any:
            handle = open(*args, **kwargs)  # noqa: SIM115 - returned to the code under test
            opened.append(handle)
            return handle

        bench.open = spy  # type: ignore[attr-defined]  # the module's globals before builtins
        self.addCleanup(delattr, bench, "open")
        with bench.shallow_idle(path) as held:
            self.assertTrue(held)
            self.assertEqual(len(opened), 1)
            self.assertFalse(opened[0].closed)
        self.assertTrue(opened[0].closed)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), (0).to_bytes(4, sys.byteorder, signed=True))

    def test_unavailable(self) -> None:
        """Where the file cannot be opened (no root, no such file) the run goes on: it yields
        False and raises nothing."""
        with bench.shallow_idle(os.path.join(self.mktemp(), "missing", "x")) as held:
            self.assertFalse(held)

    def test_report_says_so(self) -> None:
        """The report's first paragraph says whether the idle states were held, and says
        nothing of them for results that predate the hold."""
        sample = results()
        self.assertNotIn("idle states", bench.report_text(sample))
        sample["shallow_idle"] = True
        self.assertIn("kept out of deep idle states", bench.report_text(sample))
        sample["shallow_idle"] = False
        self.assertIn("could not be kept out of deep idle", bench.report_text(sample))
