"""In-process benchmark of the multiplexer: two MuxProtocols over a real loopback socket.

Reports, each as min / median / max over repeats and as a ratio to a baseline measured in the
same run (this machine is shared and noisy):

* bulk throughput of one stream, against a plain Twisted TCP connection in the same process;
* 1-byte ping-pong round trip on one stream, idle and while 8 other streams of the same link
  move bulk data (head-of-line blocking), against the same ping-pong on a plain connection.

Run: ``make bench`` (everything) or ``python bench/mux_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, cast

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from tcptunnel import _mux
from tcptunnel.mux import MuxProtocol, MuxStream, StreamEndpoint

CHUNK = b"\x5a" * 65536


class Sink(StreamEndpoint):
    """Counts and drops what arrives."""

    def __init__(self) -> None:
        self.count = 0

    def stream_data(self, data: bytes) -> None:
        self.count += len(data)

    def stream_ended(self) -> None:
        pass

    def stream_reset(self, reason: Any, message: str, remote: bool) -> None:
        pass

    def stream_closed(self) -> None:
        pass


class Echo(Sink):
    """Writes back what arrives."""

    stream: MuxStream

    def stream_data(self, data: bytes) -> None:
        self.stream.write(data)


class Pinger(Sink):
    """Sends one byte, waits for it to come back, records the round trip."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[float] = []
        self.sent_at = 0.0
        self.done: defer.Deferred[None] | None = None
        self.remaining = 0
        self.stream: MuxStream | None = None

    def run(self, count: int) -> defer.Deferred[None]:
        self.remaining = count
        self.done = defer.Deferred()
        self._send()
        return self.done

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        assert self.stream is not None
        self.stream.write(b"!")

    def stream_data(self, data: bytes) -> None:
        self.samples.append(time.perf_counter() - self.sent_at)
        self.remaining -= 1
        if self.remaining > 0:
            self._send()
        elif self.done is not None:
            self.done.callback(None)


@implementer(IPushProducer)
class Source:
    """Writes ``total`` bytes into a consumer as fast as it lets us."""

    def __init__(self, consumer: Any, total: int) -> None:
        self.consumer = consumer
        self.remaining = total
        self.paused = False
        self.finished: defer.Deferred[None] = defer.Deferred()
        self._busy = False

    def start(self) -> None:
        self.consumer.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def stopProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        if self._busy:
            return
        self._busy = True
        try:
            while not self.paused and self.remaining > 0:
                piece = CHUNK if self.remaining >= len(CHUNK) else CHUNK[: self.remaining]
                self.remaining -= len(piece)
                self.consumer.write(piece)
            if self.remaining <= 0 and not self.finished.called:
                self.consumer.unregisterProducer()
                self.finished.callback(None)
        finally:
            self._busy = False


async def mux_pair() -> tuple[MuxProtocol, MuxProtocol, Any]:
    """An opener and an acceptor MuxProtocol connected over 127.0.0.1, logged in."""
    acceptors: list[MuxProtocol] = []

    def build() -> MuxProtocol:
        protocol = MuxProtocol(_mux.MuxConnection(False), reactor)
        acceptors.append(protocol)
        return protocol

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(build))
    opener = cast(MuxProtocol, await TCP4ClientEndpoint(
        reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(lambda: MuxProtocol(_mux.MuxConnection(True), reactor))))
    while not acceptors or acceptors[0].core.peer_version is None or (
            opener.core.peer_version is None):
        await task.deferLater(reactor, 0.001, lambda: None)  # HELLOs exchanged
    acceptor = acceptors[0]
    opener.core.mark_ready()
    acceptor.core.mark_ready()
    endpoints: dict[int, Sink] = {}

    def open_requested(stream_id: int, request: Any) -> None:
        endpoint: Sink = Echo() if request.host == "echo" else Sink()
        stream = acceptor.attach_stream(stream_id, endpoint)
        if isinstance(endpoint, Echo):
            endpoint.stream = stream
        endpoints[stream_id] = endpoint
        acceptor.accept_stream(stream_id)

    acceptor.on_open_requested = open_requested
    acceptor.bench_endpoints = endpoints  # type: ignore[attr-defined]
    return opener, acceptor, port


class Opened(Sink):
    """An opener-side endpoint that fires when the stream is open."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: defer.Deferred[None] = defer.Deferred()

    def stream_opened(self) -> None:
        self.opened.callback(None)


async def open_stream(opener: MuxProtocol, host: str, endpoint: Opened) -> MuxStream:
    stream = opener.open_stream(host, 1, endpoint)
    await endpoint.opened
    return stream


class PingOpened(Opened, Pinger):
    """Opened + Pinger."""

    def __init__(self) -> None:
        Opened.__init__(self)
        Pinger.__init__(self)


async def mux_bulk(size: int) -> float:
    """Seconds to move ``size`` bytes over one stream."""
    opener, acceptor, port = await mux_pair()
    endpoint = Opened()
    stream = await open_stream(opener, "sink", endpoint)
    sink = acceptor.bench_endpoints[stream.stream_id]  # type: ignore[attr-defined]
    started = time.perf_counter()
    Source(stream, size).start()
    while sink.count < size:
        await task.deferLater(reactor, 0.001, lambda: None)
    elapsed = time.perf_counter() - started
    assert opener.transport is not None
    opener.transport.loseConnection()
    await port.stopListening()
    return elapsed


class PlainSink(Protocol):
    def __init__(self) -> None:
        self.count = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.count += len(data)


class PlainEcho(Protocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(data)  # type: ignore[union-attr]


async def plain_bulk(size: int) -> float:
    """Seconds to move ``size`` bytes over a plain Twisted TCP connection (baseline)."""
    sinks: list[PlainSink] = []

    def new_sink() -> PlainSink:
        sinks.append(PlainSink())
        return sinks[-1]

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(new_sink))
    client = cast(Protocol, await TCP4ClientEndpoint(
        reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(Protocol)))
    assert client.transport is not None
    while not sinks:
        await task.deferLater(reactor, 0.001, lambda: None)
    started = time.perf_counter()
    Source(client.transport, size).start()
    while sinks[0].count < size:
        await task.deferLater(reactor, 0.001, lambda: None)
    elapsed = time.perf_counter() - started
    client.transport.loseConnection()
    await port.stopListening()
    return elapsed


class PlainPinger(Protocol, Pinger):
    def __init__(self) -> None:
        Pinger.__init__(self)

    def connectionMade(self) -> None:  # noqa: N802
        self.stream = self.transport  # type: ignore[assignment]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.stream_data(data)


async def plain_pingpong(count: int) -> list[float]:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(PlainEcho))
    pinger = PlainPinger()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(lambda: pinger))
    pinger.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
    await pinger.run(count)
    pinger.transport.loseConnection()  # type: ignore[union-attr]
    await port.stopListening()
    return pinger.samples


async def mux_pingpong(count: int, bulk_streams: int) -> list[float]:
    """Ping-pong round trips on one stream while ``bulk_streams`` streams move bulk data."""
    opener, _acceptor, port = await mux_pair()
    sources = []
    for _ in range(bulk_streams):
        stream = await open_stream(opener, "sink", Opened())
        source = Source(stream, 10**12)
        sources.append(source)
        source.start()
    pinger = PingOpened()
    pinger.stream = await open_stream(opener, "echo", pinger)
    await task.deferLater(reactor, 0.2, lambda: None)  # let the bulk streams ramp up
    await pinger.run(count)
    for source in sources:
        source.remaining = 0
        source.paused = True
    assert opener.transport is not None
    opener.transport.loseConnection()
    await port.stopListening()
    return pinger.samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


async def run(repeats: int, size: int, pings: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    mux_rates, plain_rates = [], []
    for _ in range(repeats):
        plain_rates.append(size / await plain_bulk(size) / 1e6)
        mux_rates.append(size / await mux_bulk(size) / 1e6)
    results["bulk_MBps"] = {"mux": spread(mux_rates), "plain_tcp": spread(plain_rates),
                            "ratio_median": statistics.median(mux_rates)
                            / statistics.median(plain_rates)}
    for label, bulk in (("idle", 0), ("under_8_bulk_streams", 8)):
        p50s, p99s, base50 = [], [], []
        for _ in range(repeats):
            base50.append(percentile(await plain_pingpong(pings), 0.5) * 1e3)
            samples = await mux_pingpong(pings, bulk)
            p50s.append(percentile(samples, 0.5) * 1e3)
            p99s.append(percentile(samples, 0.99) * 1e3)
        results[f"pingpong_ms_{label}"] = {
            "mux_p50": spread(p50s), "mux_p99": spread(p99s), "plain_tcp_p50": spread(base50),
            "ratio_p50_median": statistics.median(p50s) / statistics.median(base50)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    outcome: dict[str, Any] = {}

    async def go() -> None:
        outcome.update(await run(args.repeats, args.size_mib * 1024 * 1024, args.pings))

    def finish(result: Any) -> Any:
        reactor.stop()
        return result

    def failed(failure: Any) -> None:
        failure.printTraceback(file=sys.stderr)
        outcome["error"] = failure.getErrorMessage()

    reactor.callWhenRunning(
        lambda: defer.ensureDeferred(go()).addErrback(failed).addBoth(finish))
    reactor.run()
    if "error" in outcome:
        raise SystemExit(f"mux benchmark failed: {outcome['error']}")
    print(json.dumps(outcome, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(outcome, f, indent=2)


if __name__ == "__main__":
    main()
