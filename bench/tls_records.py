"""What one TLS record costs in Python, by way of reading and writing it (issue 21).

Two TLS endpoints on memory BIOs, no sockets, no reactor: a client and a server with the
certificates and options the links use (tcptunnel.tls: the Gateway's CertificateOptions, the
proxy's verifying client creator, ALPN), handshaken once, then ``--count`` records back and
forth (ping-pong: one side writes, the other reads and writes it back), 1-byte or 16 KiB.
For each path it prints the CPU time (``time.thread_time``: this thread on a CPU, so other
work on the machine does not count) per record, i.e. per write plus the read of it:

* ``twisted``: Twisted's ``TLSMemoryBIOProtocol`` (what links use today), between two
  minimal transports that keep what is written;
* ``tlslink``: tcptunnel.tlslink.LinkTLSProtocol on pyOpenSSL (``TCPTUNNEL_PYOPENSSL_TLS=1``:
  the ``counted`` way);
* ``tlslink-stdlib``: tcptunnel.tlslink.StdlibLinkTLSProtocol, the same protocol on the
  standard library's ``ssl.SSLObject`` (what links use by default);
* ``lean``: pyOpenSSL's public API only, in Twisted's order: ``bio_write``, ``recv`` until
  ``WantReadError``, ``bio_read`` of what the read may have produced (catching its
  ``WantReadError``); ``send`` then ``bio_read``;
* ``lean-into``: the same with ``recv_into`` a preallocated buffer;
* ``counted``: ``bio_write``, then ``recv`` exactly as many times as the bytes fed complete
  TLS records (their 5-byte headers: type, version, length), the send BIO read only when a
  record carried no application data (a ticket, a key update), so neither the read path's
  ``WantReadError`` nor the empty ``bio_read`` is raised;
* ``stdlib``: bare ``ssl.MemoryBIO`` / ``SSLObject`` calls, reading until
  ``SSLWantReadError`` (the floor under ``tlslink-stdlib``).

    .venv/bin/python bench/tls_records.py [--count 20000] [--repeats 5]
    .venv/bin/python bench/tls_records.py --memory stdlib|pyopenssl  # KiB per link end

The paths run interleaved, ``--repeats`` times each; the table shows the median and the range.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, cast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from tcptunnel.config import TlsFiles
from tcptunnel.test._certs import mint
from tcptunnel.tls import client_connection_creator, server_tls
from tcptunnel.tlslink import LinkTLSFactory


class _Wire:
    """A transport that keeps what is written until the driver takes it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        self.chunks.extend(data)

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data

    def loseConnection(self) -> None:  # noqa: N802
        self.disconnecting = True

    def abortConnection(self) -> None:  # noqa: N802
        self.disconnecting = True

    def getPeer(self) -> Any:  # noqa: N802
        return None

    getHost = getPeer  # noqa: N815


class _Echo(Protocol):
    """The server's application: writes back what it reads."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(data)  # type: ignore[union-attr]


class _Count(Protocol):
    """The client's application: counts the bytes it reads."""

    received = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += len(data)


class Setup:
    """The two sides' connection creators, as the links make them."""

    def __init__(self, directory: str) -> None:
        certs = mint(directory)
        self.server = server_tls(TlsFiles(pem_certificate=certs.cert, pem_key=certs.key))
        self.client = client_connection_creator("localhost", certs.ca, None)
        self.ca = certs.ca
        self.cert, self.key = certs.cert, certs.key


def twisted_path(setup: Setup, payload: bytes, count: int, own: bool = False,
                 stdlib: bool = False) -> float:
    """CPU seconds for ``count`` ping-pongs through two TLSMemoryBIOProtocols (``own``: two
    tcptunnel.tlslink.LinkTLSProtocols, on the standard library's ssl if ``stdlib``)."""
    server_factory: Any
    client_factory: Any
    if own:
        server_factory = LinkTLSFactory(setup.server, False, Factory.forProtocol(_Echo),
                                        stdlib=stdlib)
        client_factory = LinkTLSFactory(setup.client, True, Factory.forProtocol(_Count),
                                        stdlib=stdlib)
    else:
        server_factory = TLSMemoryBIOFactory(setup.server, False, Factory.forProtocol(_Echo))
        server_factory.protocol = TLSMemoryBIOProtocol
        client_factory = TLSMemoryBIOFactory(setup.client, True, Factory.forProtocol(_Count))
        client_factory.protocol = TLSMemoryBIOProtocol
    server = server_factory.buildProtocol(None)
    client = client_factory.buildProtocol(None)
    server_wire, client_wire = _Wire(), _Wire()
    server.makeConnection(server_wire)
    client.makeConnection(client_wire)
    for _ in range(10):  # the handshake, and the tickets after it
        if data := client_wire.take():
            server.dataReceived(data)
        if data := server_wire.take():
            client.dataReceived(data)
    app: Any = client.wrappedProtocol
    assert all(p.negotiatedProtocol for p in (client, server))
    start = time.thread_time()
    for _ in range(count):
        client.write(payload)
        server.dataReceived(client_wire.take())
        client.dataReceived(server_wire.take())
    elapsed = time.thread_time() - start
    assert app.received == count * len(payload), app.received
    return elapsed


def _connections(setup: Setup) -> tuple[SSL.Connection, SSL.Connection]:
    """A handshaken (client, server) pair of memory-BIO connections."""

    class _Owner:  # what ClientTLSOptions and the ALPN callback ask of their app data
        factory = TLSMemoryBIOFactory(setup.client, True, Factory.forProtocol(Protocol))

        def failVerification(self, reason: Any) -> None:  # noqa: N802
            raise AssertionError(reason)

    client = setup.client.clientConnectionForTLS(_Owner())  # type: ignore[arg-type]
    client.set_connect_state()
    client.set_app_data(_Owner())
    server = setup.server.serverConnectionForTLS(None)
    server.set_accept_state()
    server.set_app_data(_Owner())
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                a.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                b.bio_write(a.bio_read(1 << 16))
    # Drain the tickets the server sent after the handshake.
    for connection in (client, server):
        with contextlib.suppress(SSL.WantReadError):
            connection.recv(1 << 14)
    return client, server


class _Lean:
    """One side, public pyOpenSSL only, as Twisted orders the calls."""

    def __init__(self, connection: SSL.Connection, deliver: Callable[[bytes], None],
                 into: bool = False) -> None:
        self.connection = connection
        self.deliver = deliver
        self.out: list[bytes] = []
        self.buffer = bytearray(1 << 14)
        self.view = memoryview(self.buffer)
        self.into = into

    def write(self, data: bytes) -> None:
        self.connection.send(data)
        self.out.append(self.connection.bio_read(len(data) + 1024))

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        connection.bio_write(data)
        while True:
            try:
                if self.into:
                    n = connection.recv_into(self.buffer)
                    received = bytes(self.view[:n])
                else:
                    received = connection.recv(1 << 14)
            except SSL.WantReadError:
                break
            self.deliver(received)
        with contextlib.suppress(SSL.WantReadError):
            self.out.append(connection.bio_read(1 << 15))


class _Counted(_Lean):
    """One side that counts the whole records it was fed and reads exactly that many."""

    def __init__(self, connection: SSL.Connection, deliver: Callable[[bytes], None]) -> None:
        super().__init__(connection, deliver)
        self.header = b""  # a record header cut by the end of the bytes fed
        self.left = 0  # bytes of the current record still to come

    def records_in(self, data: bytes) -> int:
        records, position, end = 0, 0, len(data)
        left = self.left
        if self.header:
            data = self.header + data
            end = len(data)
            self.header = b""
        while True:
            if left:
                if end - position < left:
                    self.left = left - (end - position)
                    return records
                position += left
                records += 1
                left = 0
            if end - position < 5:
                self.header = data[position:]
                self.left = 0
                return records
            left = int.from_bytes(data[position + 3:position + 5], "big")
            position += 5
            if left == 0:
                records += 1

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        connection.bio_write(data)
        records = self.records_in(data)
        delivered = 0
        for _ in range(records):
            try:
                received = connection.recv(1 << 14)
            except SSL.WantReadError:
                break
            delivered += 1
            self.deliver(received)
        if delivered < records:
            with contextlib.suppress(SSL.WantReadError):
                self.out.append(connection.bio_read(1 << 15))


def lean_path(setup: Setup, payload: bytes, count: int, kind: str) -> float:
    """CPU seconds for ``count`` ping-pongs with the public-API sides."""
    client_connection, server_connection = _connections(setup)
    received = [0]

    def count_bytes(data: bytes) -> None:
        received[0] += len(data)

    if kind == "counted":
        client: _Lean = _Counted(client_connection, count_bytes)
        server: _Lean = _Counted(server_connection, lambda data: server.write(data))
    else:
        into = kind == "lean-into"
        client = _Lean(client_connection, count_bytes, into)
        server = _Lean(server_connection, lambda data: server.write(data), into)
    start = time.thread_time()
    for _ in range(count):
        client.write(payload)
        data = b"".join(client.out)
        client.out.clear()
        server.data_received(data)
        data = b"".join(server.out)
        server.out.clear()
        client.data_received(data)
    elapsed = time.thread_time() - start
    assert received[0] == count * len(payload), received[0]
    return elapsed


def stdlib_path(setup: Setup, payload: bytes, count: int) -> float:
    """CPU seconds for ``count`` ping-pongs with ssl.SSLObject on MemoryBIOs."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(setup.cert, setup.key)
    client_context = ssl.create_default_context(cafile=setup.ca)
    pairs = []
    for context, side in ((client_context, False), (server_context, True)):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        pairs.append((context.wrap_bio(incoming, outgoing, server_side=side,
                                       server_hostname=None if side else "localhost"),
                      incoming, outgoing))
    (client, c_in, c_out), (server, s_in, s_out) = pairs
    for _ in range(10):
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    for obj in (client, server):
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.read(1 << 14)
    received = 0
    start = time.thread_time()
    for _ in range(count):
        client.write(payload)
        s_in.write(c_out.read())
        while True:
            try:
                data = server.read(1 << 14)
            except ssl.SSLWantReadError:
                break
            server.write(data)
        c_in.write(s_out.read())
        while True:
            try:
                data = client.read(1 << 14)
            except ssl.SSLWantReadError:
                break
            received += len(data)
    elapsed = time.thread_time() - start
    assert received == count * len(payload), received
    return elapsed


def _rss() -> int:
    """This process's resident bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_per_link(setup: Setup, stdlib: bool, links: int = 1000) -> float:
    """Resident KiB per TLS link end (a handshaken LinkTLSProtocol that moved a byte each
    way), from ``links`` client and server pairs kept alive (``stdlib``: on the standard
    library's ssl, else on pyOpenSSL)."""

    def pair() -> tuple[Any, Any]:
        server = LinkTLSFactory(setup.server, False, Factory.forProtocol(_Echo),
                                stdlib=stdlib).buildProtocol(None)
        client = LinkTLSFactory(setup.client, True, Factory.forProtocol(_Count),
                                stdlib=stdlib).buildProtocol(None)
        server_wire, client_wire = _Wire(), _Wire()
        server.makeConnection(server_wire)
        client.makeConnection(client_wire)
        for _ in range(6):  # the handshake, and the tickets after it
            if data := client_wire.take():
                server.dataReceived(data)
            if data := server_wire.take():
                client.dataReceived(data)
        client.write(b"x")
        server.dataReceived(client_wire.take())
        client.dataReceived(server_wire.take())
        assert cast(_Count, client.wrappedProtocol).received == 1
        return server, client

    kept = [pair() for _ in range(20)]  # allocator warm-up
    gc.collect()
    before = _rss()
    kept += [pair() for _ in range(links)]
    gc.collect()
    return (_rss() - before) / links / 2 / 1024


PATHS: dict[str, Callable[[Setup, bytes, int], float]] = {
    "twisted": twisted_path,
    "tlslink": lambda s, p, n: twisted_path(s, p, n, own=True),
    "tlslink-stdlib": lambda s, p, n: twisted_path(s, p, n, own=True, stdlib=True),
    "lean": lambda s, p, n: lean_path(s, p, n, "lean"),
    "lean-into": lambda s, p, n: lean_path(s, p, n, "lean-into"),
    "counted": lambda s, p, n: lean_path(s, p, n, "counted"),
    "stdlib": stdlib_path,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", nargs="+", default=list(PATHS))
    parser.add_argument("--memory", choices=["stdlib", "pyopenssl"],
                        help="print the resident KiB per link end of this engine instead (one "
                             "engine per process: freed memory is not given back)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        setup = Setup(directory)
        if args.memory:
            kib = memory_per_link(setup, args.memory == "stdlib")
            print(f"tlslink on {args.memory}: {kib:.1f} KiB per link end")
            return
        for size in (1, 16384):
            payload = b"x" * size
            count = args.count if size == 1 else max(1, args.count // 10)
            results: dict[str, list[float]] = {name: [] for name in args.paths}
            for _ in range(args.repeats):
                for name in args.paths:
                    # Per record: each ping-pong is two records (one each way).
                    results[name].append(PATHS[name](setup, payload, count) / count / 2 * 1e6)
            base = statistics.median(results[args.paths[0]])
            print(f"\n{size}-byte records, µs CPU per record (write + read), "
                  f"median (min-max) of {args.repeats}, x = over {args.paths[0]}")
            for name, values in results.items():
                median = statistics.median(values)
                print(f"  {name:10} {median:7.2f} ({min(values):.2f}-{max(values):.2f})"
                      f"  {median / base:.2f}x")


if __name__ == "__main__":
    main()
