"""Tests for the PROXY protocol headers and the CLIENT_ADDRESS field (tcptunnel._proxyproto)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _frames as fr
from tcptunnel import _proxyproto as pp
from tcptunnel._proxyproto import ClientAddress, ClientAddressError

EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "200"))

V4 = ClientAddress.from_hosts("192.0.2.1", 56324, "198.51.100.7", 443)
V6 = ClientAddress.from_hosts("2001:db8::1", 1, "2001:db8:0:1::2", 65535)

_ports = st.integers(0, 65535)
_addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4), _ports, st.ip_addresses(v=4), _ports),
    st.tuples(st.ip_addresses(v=6), _ports, st.ip_addresses(v=6), _ports),
).map(lambda t: ClientAddress(*t))


class V1Tests(SynchronousTestCase):
    """The text header, byte for byte as proxy-protocol.txt §2.1 shows it."""

    def test_tcp4(self) -> None:
        """TCP4: addresses, then ports, space separated, CRLF."""
        self.assertEqual(pp.build_v1(V4), b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n")

    def test_tcp6(self) -> None:
        """TCP6 uses the compressed form of the addresses."""
        self.assertEqual(pp.build_v1(V6),
                         b"PROXY TCP6 2001:db8::1 2001:db8:0:1::2 1 65535\r\n")

    def test_unknown(self) -> None:
        """No client address: ``PROXY UNKNOWN``."""
        self.assertEqual(pp.build_v1(None), b"PROXY UNKNOWN\r\n")

    def test_longest_fits_the_spec_bound(self) -> None:
        """The longest line we write (TCP6, 104 bytes) is within the spec's 107."""
        full = ClientAddress(ipaddress.IPv6Address("ffff:" * 7 + "ffff"), 65535,
                             ipaddress.IPv6Address("ffff:" * 7 + "ffff"), 65535)
        self.assertEqual(len(pp.build_v1(full)), 104)
        self.assertLessEqual(104, pp.V1_MAX_BYTES)


class V2Tests(SynchronousTestCase):
    """The binary header, against the layout of proxy-protocol.txt §2.2."""

    def test_tcp4_layout(self) -> None:
        """Signature, ver/cmd 0x21, fam 0x11, len 12, src, dst, sport, dport."""
        self.assertEqual(pp.build_v2(V4), bytes.fromhex(
            "0d0a0d0a000d0a515549540a" "21" "11" "000c"
            "c0000201" "c6336407" "dc04" "01bb"))

    def test_tcp6_layout(self) -> None:
        """fam 0x21 and len 36: 16-byte addresses, then the ports."""
        self.assertEqual(pp.build_v2(V6), bytes.fromhex(
            "0d0a0d0a000d0a515549540a" "21" "21" "0024"
            "20010db8000000000000000000000001" "20010db8000000010000000000000002"
            "0001" "ffff"))

    def test_local_when_unknown(self) -> None:
        """No client address: LOCAL (ver/cmd 0x20), UNSPEC, no address block."""
        self.assertEqual(pp.build_v2(None),
                         bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000"))

    def test_build_header(self) -> None:
        """``proxyProtocol`` values choose the version; others are refused."""
        self.assertEqual(pp.build_header("v1", V4), pp.build_v1(V4))
        self.assertEqual(pp.build_header("v2", None), pp.build_v2(None))
        self.assertRaises(ValueError, pp.build_header, "v3", V4)


class ClientAddressTests(SynchronousTestCase):
    """Addresses from transports, and the OPEN field that carries them."""

    def test_mapped_becomes_ipv4(self) -> None:
        """A dual-stack listener's IPv4 client (``::ffff:a.b.c.d``) is written as TCP4."""
        address = ClientAddress.from_hosts("::ffff:192.0.2.1", 1, "::ffff:127.0.0.1", 2)
        self.assertEqual(pp.build_v1(address), b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n")

    def test_mixed_families_become_ipv6(self) -> None:
        """One IPv4 and one IPv6 end are both written as IPv6 (IPv4-mapped)."""
        address = ClientAddress.from_hosts("192.0.2.1", 1, "2001:db8::2", 2)
        self.assertEqual(pp.build_v1(address),
                         b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 1 2\r\n")

    def test_zone_index_dropped(self) -> None:
        """A link-local zone index (``%eth0``) has no place in the header and is dropped."""
        address = ClientAddress.from_hosts("fe80::1%eth0", 1, "fe80::2%eth0", 2)
        self.assertEqual(address.source, ipaddress.IPv6Address("fe80::1"))

    def test_bad_addresses(self) -> None:
        """Names, out-of-range ports and mixed families given directly are refused."""
        self.assertRaises(ClientAddressError, ClientAddress.from_hosts, "host", 1, "::1", 2)
        self.assertRaises(ClientAddressError, ClientAddress.from_hosts, "::1", 65536, "::1", 2)
        self.assertRaises(ClientAddressError, ClientAddress, ipaddress.IPv4Address("1.2.3.4"),
                          1, ipaddress.IPv6Address("::1"), 2)

    def test_field_layout(self) -> None:
        """CLIENT_ADDRESS is tag 0x03 (not critical): family, src, sport, dst, dport."""
        tag, value = pp.encode_client_address(V4)
        self.assertEqual((tag, tag & fr.FIELD_CRITICAL), (0x03, 0))
        self.assertEqual(value, bytes.fromhex("04" "c0000201" "dc04" "c6336407" "01bb"))
        self.assertEqual(len(pp.encode_client_address(V6)[1]), 37)

    def test_field_travels_in_open(self) -> None:
        """An acceptor's parse_open keeps the field, and it decodes to the address."""
        request = fr.OpenRequest(fr.EARLY_WINDOW, 0, "target.example", 25,
                                 fields=(pp.encode_client_address(V6),))
        parsed = fr.parse_open(fr.build_open(1, request)[fr.HEADER_SIZE :])
        self.assertEqual(pp.client_address_from_fields(parsed.fields), V6)
        self.assertIsNone(pp.client_address_from_fields(()))

    def test_field_twice_refused(self) -> None:
        """Two CLIENT_ADDRESS fields in one OPEN are an error, not a choice."""
        field = pp.encode_client_address(V4)
        self.assertRaises(ClientAddressError, pp.client_address_from_fields, (field, field))

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(_addresses)
    def test_field_round_trip(self, address: ClientAddress) -> None:
        """Any address survives the field; the headers have the spec's sizes."""
        _, value = pp.encode_client_address(address)
        self.assertEqual(pp.decode_client_address(value), address)
        self.assertEqual(len(pp.build_v2(address)), 16 + (12 if address.version == 4 else 36))
        self.assertLessEqual(len(pp.build_v1(address)), pp.V1_MAX_BYTES)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.binary(max_size=64))
    def test_field_garbage(self, value: bytes) -> None:
        """Any field value decodes or raises ClientAddressError, nothing else."""
        try:
            address = pp.decode_client_address(value)
        except ClientAddressError:
            return
        self.assertEqual(pp.encode_client_address(address)[1], value)


_HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
# HAProxy reports what it took from the PROXY header as the connection's addresses.
_HAPROXY_CONFIG = """\
global
    nbthread 1
defaults
    mode http
    timeout client 10s
    timeout connect 10s
    timeout server 10s
frontend proxied
    bind fd@${LISTEN_FD} accept-proxy
    http-request return status 200 content-type text/plain \
lf-string "%[src] %[src_port] %[dst] %[dst_port]"
"""


class HaproxyTests(SynchronousTestCase):
    """Our headers, fed to a real HAProxy frontend with ``accept-proxy``."""

    if _HAPROXY is None:
        skip = "haproxy is not installed (Debian: apt-get install haproxy)"

    def setUp(self) -> None:
        # HAProxy takes our listening socket (bind fd@N): no port is chosen and then hoped
        # to stay free, and connections wait in the backlog until HAProxy accepts them.
        self.listener = socket.socket()
        self.addCleanup(self.listener.close)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(_HAPROXY_CONFIG)
        fd = self.listener.fileno()
        assert _HAPROXY is not None
        self.process = subprocess.Popen(
            [_HAPROXY, "-f", config, "-db"], pass_fds=[fd],
            env={**os.environ, "LISTEN_FD": str(fd)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        self.process.terminate()
        try:
            self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()

    def ask(self, header: bytes) -> tuple[str, str]:
        """Send ``header`` and a request; HAProxy's view of (source, destination), and our
        socket's real (source, destination)."""
        with socket.create_connection(self.listener.getsockname(), timeout=10) as client:
            client.sendall(header + b"GET / HTTP/1.0\r\n\r\n")
            response = b""
            while chunk := client.recv(4096):
                response += chunk
            local, peer = client.getsockname(), client.getpeername()
        if not response:
            assert self.process.stdout is not None
            output = self.process.stdout.read()[-2000:] if self.process.poll() is not None else b""
            self.fail(f"HAProxy closed without an answer to {header!r}: {output!r}")
        src, sport, dst, dport = response.split(b"\r\n\r\n", 1)[1].decode().split()
        real = f"{local[0]} {local[1]} {peer[0]} {peer[1]}"
        return f"{src} {sport} {dst} {dport}", real

    def test_v1_tcp4_and_tcp6(self) -> None:
        """HAProxy reads the client and destination we wrote in v1, IPv4 and IPv6."""
        self.assertEqual(self.ask(pp.build_v1(V4))[0], "192.0.2.1 56324 198.51.100.7 443")
        self.assertEqual(self.ask(pp.build_v1(V6))[0], "2001:db8::1 1 2001:db8:0:1::2 65535")

    def test_v2_tcp4_and_tcp6(self) -> None:
        """HAProxy reads the client and destination we wrote in v2, IPv4 and IPv6."""
        self.assertEqual(self.ask(pp.build_v2(V4))[0], "192.0.2.1 56324 198.51.100.7 443")
        self.assertEqual(self.ask(pp.build_v2(V6))[0], "2001:db8::1 1 2001:db8:0:1::2 65535")

    def test_unknown_keeps_real_addresses(self) -> None:
        """v1 UNKNOWN and v2 LOCAL are accepted, and HAProxy keeps the real addresses."""
        for header in (pp.build_v1(None), pp.build_v2(None)):
            seen, real = self.ask(header)
            self.assertEqual(seen, real)

    def test_mapped_client_as_ipv4(self) -> None:
        """A dual-stack Binding's IPv4 client reaches HAProxy as its IPv4 address."""
        address = ClientAddress.from_hosts("::ffff:203.0.113.9", 40000, "::ffff:10.0.0.1", 22)
        self.assertEqual(self.ask(pp.build_v2(address))[0], "203.0.113.9 40000 10.0.0.1 22")
