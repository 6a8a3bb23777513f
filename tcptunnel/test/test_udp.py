"""Unit tests of UDP through the tunnel: datagram streams in the multiplexer (framing,
boundaries, drops), each bound at its documented number, the Proxy-Server's flow table
(tcptunnel._udp: limits, eviction, idle timeout, request/response), the flow adapter's idle
timer on a Clock, and sealed datagrams (DATAGRAM records, SealedDatagramStream)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _e2e, _mux, _udp
from tcptunnel import _frames as fr
from tcptunnel._e2e import DatagramCipher, DatagramRejectedError
from tcptunnel._frames import FrameDecoder, FrameType, Reason, StreamError
from tcptunnel._udp import FlowPolicy, FlowTable, policy_for
from tcptunnel.e2e import SealedDatagramStream, _open_raw
from tcptunnel.test.test_mux import Pair
from tcptunnel.test.test_muxprotocol import Ends
from tcptunnel.udp import DatagramEndpoint

FUZZ_EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "100"))


def open_udp(pair: Pair, accept: bool = True) -> int:
    """Open a ``udp`` stream from the Proxy-Server end (and accept it)."""
    stream_id = pair.server.open_stream("127.0.0.1", 5353, fr.KIND_UDP)
    pair.pump()
    request = pair.client_events.pop()
    assert isinstance(request, _mux.StreamOpenRequested), request
    assert request.request.kind == fr.KIND_UDP
    if accept:
        pair.client.accept_stream(stream_id)
        pair.pump()
        opened = pair.server_events.pop()
        assert isinstance(opened, _mux.StreamOpened), opened
    return stream_id


def datagrams_of(events: list[object], stream_id: int) -> list[bytes]:
    """The DataReceived payloads of one stream, one per datagram."""
    return [e.data for e in events
            if isinstance(e, _mux.DataReceived) and e.stream_id == stream_id]


class OpenKindTests(SynchronousTestCase):
    """The ``udp`` kind in OPEN."""

    def test_udp_kind_round_trips(self) -> None:
        """An OPEN of kind udp (1) parses with its HOST and PORT, like tcp."""
        payload = fr.open_payload(1000, 3, fr.KIND_UDP, fr.target_fields("dns.example", 53))
        request = fr.parse_open(payload)
        self.assertEqual((request.kind, request.host, request.port, request.origin),
                         (fr.KIND_UDP, "dns.example", 53, 3))
        self.assertEqual(fr.KIND_NAMES[fr.KIND_UDP], "udp")

    def test_unknown_kind_still_unsupported(self) -> None:
        """Kinds other than tcp and udp stay UNSUPPORTED."""
        with self.assertRaises(StreamError) as caught:
            fr.parse_open(fr.open_payload(1000, 0, 9, fr.target_fields("h", 1)))
        self.assertIs(caught.exception.reason, Reason.UNSUPPORTED)


class DatagramStreamTests(SynchronousTestCase):
    """Datagram streams of _mux: one DATA frame per datagram, drops instead of queues."""

    def test_each_datagram_is_one_frame(self) -> None:
        """Datagrams of 0, 1, 40,000 and 65,507 bytes leave as one DATA frame each, an empty
        one as an empty DATA frame, and arrive as one event each."""
        pair = Pair()
        stream_id = open_udp(pair)
        sent = [b"", b"a", b"b" * 40000, b"c" * 65507]
        for datagram in sent:
            self.assertIsNone(pair.server.send_datagram(stream_id, datagram))
        wire = b"".join(pair.server.data_to_send())
        decoder = FrameDecoder(expect_magic=False)
        frames = [f for f in decoder.feed(wire) if f.type == FrameType.DATA]
        self.assertEqual([f.payload for f in frames], sent)
        pair.client_events.extend(pair.client.receive_data(wire))
        self.assertEqual(datagrams_of(pair.client_events, stream_id), sent)

    def test_replies_keep_boundaries(self) -> None:
        """The acceptor's datagrams come back one event each, the empty one too."""
        pair = Pair()
        stream_id = open_udp(pair)
        for datagram in (b"x" * 700, b"", b"y"):
            self.assertIsNone(pair.client.send_datagram(stream_id, datagram))
        pair.pump()
        self.assertEqual(datagrams_of(pair.server_events, stream_id), [b"x" * 700, b"", b"y"])

    def test_empty_data_on_a_tcp_stream_is_no_event(self) -> None:
        """An empty DATA frame means an empty datagram only on a udp stream."""
        pair = Pair()
        stream_id = pair.open()
        events = pair.client.receive_data(fr.encode(FrameType.DATA, stream_id, b""))
        self.assertEqual(events, [])

    def test_early_datagrams_within_the_early_window(self) -> None:
        """Before OPEN_RESULT only the early window (16 KiB) may be sent: a datagram beyond
        it is dropped for credit, and the next frame carries BLOCKED."""
        pair = Pair()
        stream_id = open_udp(pair, accept=False)
        self.assertIsNone(pair.server.send_datagram(stream_id, b"e" * 10000))
        self.assertEqual(pair.server.send_datagram(stream_id, b"f" * 10000),
                         _mux.DROP_NO_CREDIT)
        self.assertIsNone(pair.server.send_datagram(stream_id, b"g" * 6384))
        wire = b"".join(pair.server.data_to_send())
        frames = [f for f in FrameDecoder(expect_magic=False).feed(wire)
                  if f.type == FrameType.DATA]
        self.assertEqual([len(f.payload) for f in frames], [10000, 6384])
        self.assertEqual([f.flags & fr.FLAG_BLOCKED for f in frames], [fr.FLAG_BLOCKED, 0])
        pair.client_events.extend(pair.client.receive_data(wire))
        self.assertEqual(len(datagrams_of(pair.client_events, stream_id)), 2)

    def test_acceptor_cannot_send_before_accepting(self) -> None:
        """The acceptor's datagrams before its OPEN_RESULT are dropped (not open)."""
        pair = Pair()
        stream_id = open_udp(pair, accept=False)
        self.assertEqual(pair.client.send_datagram(stream_id, b"no"), _mux.DROP_NOT_OPEN)

    def test_flow_queue_bound(self) -> None:
        """A flow whose datagrams the link does not take holds at most 64 of them; more
        are dropped (flow_queue), and none of them is lost silently."""
        pair = Pair()
        stream_id = open_udp(pair)
        results = [pair.server.send_datagram(stream_id, b"d") for _ in range(100)]
        self.assertEqual(results.count(None), _mux.MAX_FLOW_DATAGRAMS)
        self.assertEqual(results.count(_mux.DROP_FLOW_QUEUE), 100 - _mux.MAX_FLOW_DATAGRAMS)
        pair.pump()
        self.assertEqual(len(datagrams_of(pair.client_events, stream_id)),
                         _mux.MAX_FLOW_DATAGRAMS)

    def test_link_queue_bound(self) -> None:
        """All flows of a link together queue at most the link bound; beyond it each new
        datagram is dropped (link_queue) while TCP data still queues."""
        pair = Pair()
        pair.server.max_link_datagram_bytes = 100_000
        flows = [open_udp(pair) for _ in range(4)]
        tcp = pair.open()
        results = [pair.server.send_datagram(flow, b"q" * 30000) for flow in flows]
        self.assertEqual(results, [None, None, None, _mux.DROP_LINK_QUEUE])
        self.assertEqual(pair.server.datagram_queued, 90000)
        pair.server.send_data(tcp, b"t" * 1000)
        self.assertEqual(pair.server.send_buffered(tcp), 1000)
        pair.pump()
        self.assertEqual(pair.server.datagram_queued, 0)

    def test_too_large_and_no_credit(self) -> None:
        """A datagram above the frame limit is dropped (too_large); one above the credit
        left is dropped (no_credit), and credit comes back as the far end consumes."""
        pair = Pair(initial_window=64 * 1024)
        stream_id = open_udp(pair)
        self.assertEqual(pair.server.send_datagram(stream_id, b"z" * (fr.MAX_PAYLOAD + 1)),
                         _mux.DROP_TOO_LARGE)
        for _ in range(4):
            self.assertIsNone(pair.server.send_datagram(stream_id, b"w" * 16000))
        self.assertEqual(pair.server.send_datagram(stream_id, b"w" * 16000),
                         _mux.DROP_NO_CREDIT)
        pair.pump()
        for _ in datagrams_of(pair.client_events, stream_id):
            pair.client.data_consumed(stream_id, 16000)
        pair.pump()
        self.assertIsNone(pair.server.send_datagram(stream_id, b"w" * 16000))

    def test_starved_flow_window_grows_to_the_datagram_cap(self) -> None:
        """A flow that keeps running out of credit gets a bigger window, up to 1 MiB (the
        Gateway may then hold at most that for it), not a byte stream's 16 MiB."""
        pair = Pair(initial_window=64 * 1024)
        stream_id = open_udp(pair)
        for _ in range(60):
            # Send until the credit runs out (the link taking what the flow queued).
            while (why := pair.server.send_datagram(stream_id, b"s" * 8000)) is not (
                    _mux.DROP_NO_CREDIT):
                if why == _mux.DROP_FLOW_QUEUE:
                    pair.pump()
            pair.pump()
            for datagram in datagrams_of(pair.client_events, stream_id):
                pair.client.data_consumed(stream_id, len(datagram), 1.0)
            pair.client_events.clear()
            pair.pump()
        window = pair.client.streams[stream_id].recv_window
        self.assertEqual(window, _mux.MAX_DATAGRAM_WINDOW)

    def test_fin_after_queued_datagrams(self) -> None:
        """Ending a flow sends its FIN after the datagrams queued before it; the far end's
        FIN closes the stream; datagrams after the end are dropped (not open)."""
        pair = Pair()
        stream_id = open_udp(pair)
        pair.server.send_datagram(stream_id, b"last")
        pair.server.end_stream(stream_id)
        self.assertEqual(pair.server.send_datagram(stream_id, b"late"), _mux.DROP_NOT_OPEN)
        pair.pump()
        self.assertEqual(datagrams_of(pair.client_events, stream_id), [b"last"])
        self.assertIsInstance(pair.client_events[-1], _mux.StreamEnded)
        pair.client.end_stream(stream_id)
        pair.pump()
        self.assertIsNone(pair.server.stream_state(stream_id))
        self.assertIsNone(pair.client.stream_state(stream_id))

    def test_reset_releases_the_link_queue(self) -> None:
        """A reset flow's queued datagrams leave the link's datagram count at once."""
        pair = Pair()
        stream_id = open_udp(pair)
        pair.server.send_datagram(stream_id, b"r" * 5000)
        self.assertEqual(pair.server.datagram_queued, 5000)
        pair.server.reset_stream(stream_id, Reason.CANCELLED)
        self.assertEqual(pair.server.datagram_queued, 0)

    def test_send_datagram_on_tcp_stream_is_a_bug(self) -> None:
        """send_datagram on a byte stream raises (a programming error, not a drop)."""
        pair = Pair()
        stream_id = pair.open()
        self.assertRaises(RuntimeError, pair.server.send_datagram, stream_id, b"x")

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(sizes=st.lists(st.integers(0, 3000), max_size=40),
           cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=20))
    def test_boundaries_survive_any_read_split(self, sizes: list[int],
                                               cuts: list[int]) -> None:
        """Whatever the sizes and however the bytes are cut into reads, the acceptor sees
        exactly the datagrams that were queued, in order (and the drops are the rest)."""
        pair = Pair()
        stream_id = open_udp(pair)
        queued = []
        for i, size in enumerate(sizes):
            datagram = bytes([i % 256]) * size
            if pair.server.send_datagram(stream_id, datagram) is None:
                queued.append(datagram)
        wire = b"".join(pair.server.data_to_send())
        offset, events, turn = 0, [], 0
        while offset < len(wire):
            step = cuts[turn % len(cuts)]
            events.extend(pair.client.receive_data(wire[offset : offset + step]))
            offset += step
            turn += 1
        self.assertEqual(datagrams_of(events, stream_id), queued)


class DatagramBoundTests(SynchronousTestCase):
    """Each UDP bound of docs/security.md at its documented number."""

    def test_documented_numbers(self) -> None:
        """The bounds are the numbers docs/security.md lists."""
        from tcptunnel import udp

        self.assertEqual((_mux.MAX_FLOW_DATAGRAMS, _mux.MAX_FLOW_QUEUED,
                          _mux.MAX_LINK_DATAGRAM_BYTES, _mux.MAX_DATAGRAM_WINDOW),
                         (64, 256 * 1024, 512 * 1024, 1024 * 1024))
        self.assertEqual((_udp.DEFAULT_MAX_FLOWS_PER_BINDING, _udp.DEFAULT_MAX_FLOWS_PER_LINK),
                         (256, 512))
        self.assertEqual((udp.MAX_EARLY_DATAGRAMS, udp.MAX_EARLY_BYTES, udp.MAX_DATAGRAM),
                         (64, 128 * 1024, 65536))
        self.assertEqual((fr.MAX_PAYLOAD, _e2e.MAX_SEALED_DATAGRAM), (65536, 65511))
        self.assertEqual((udp.MOVE_LINGER, udp.DRAIN_SWEEP_INTERVAL), (2.0, 0.5))

    def test_flow_queue_byte_bound(self) -> None:
        """A flow holds at most 256 KiB of datagrams waiting for the link: four of 60,000
        bytes queue, the fifth is dropped (flow_queue) although credit would cover it."""
        pair = Pair()
        stream_id = open_udp(pair)
        results = [pair.server.send_datagram(stream_id, b"b" * 60000) for _ in range(5)]
        self.assertEqual(results, [None] * 4 + [_mux.DROP_FLOW_QUEUE])
        self.assertGreaterEqual(pair.server.streams[stream_id].send.credit, 60000)

    def test_default_flow_limits(self) -> None:
        """At the defaults, the 257th sender at a Binding evicts that Binding's longest
        idle flow, and the 513th of a link the longest idle of any Binding."""
        table = FlowTable()
        for binding in ("b", "c", "d"):
            table.add_binding(binding, policy_for(5353))
        first_b = table.datagram_from("b", 0, 0.0).flow
        for sender in range(1, 256):
            table.datagram_from("b", sender, 1.0 + sender)
        self.assertEqual(table.datagram_from("b", 256, 300.0).evicted, (first_b,))
        first_c = table.datagram_from("c", 0, 0.5).flow  # now the longest idle of the link
        for sender in range(1, 256):
            table.datagram_from("c", sender, 400.0)
        self.assertEqual(len(table), 512)
        self.assertEqual(table.datagram_from("d", 0, 500.0).evicted, (first_c,))
        self.assertEqual(len(table), 512)

    def test_largest_datagram_over_ipv4(self) -> None:
        """65,507 bytes (the largest IPv4 UDP payload) fit one frame, clear and sealed; one
        byte past the frame, or past a sealed frame, is dropped whole (too_large)."""
        pair = Pair(initial_window=1024 * 1024)
        stream_id = open_udp(pair)
        self.assertIsNone(pair.server.send_datagram(stream_id, b"m" * 65507))
        self.assertEqual(pair.server.send_datagram(stream_id, b"m" * 65537),
                         _mux.DROP_TOO_LARGE)
        ends = SealedDatagramEnds()
        near, far = ends.open_flow()
        self.assertIsNone(near.stream.send_datagram(b"m" * 65507))
        self.assertEqual(near.stream.send_datagram(b"m" * (_e2e.MAX_SEALED_DATAGRAM + 1)),
                         _mux.DROP_TOO_LARGE)
        ends.pump.flush()
        self.assertEqual(far.received, [b"m" * 65507])

    def test_proxy_server_early_queue(self) -> None:
        """Before the OPEN_RESULT, datagrams the early window cannot take wait in order, at
        most 64 and 128 KiB (then early_queue); they leave in order once it comes."""
        from tcptunnel.udp import MAX_EARLY_DATAGRAMS, ServerFlow, ServerFlows

        stream = _ScriptedStream(_mux.DROP_NO_CREDIT)
        flow = ServerFlow(ServerFlows(_FakeProxy(Clock())), None, None)  # type: ignore[arg-type]
        flow.stream = stream  # type: ignore[assignment]
        results = [flow.send(b"%03d" % i) for i in range(MAX_EARLY_DATAGRAMS + 3)]
        self.assertEqual(results, [None] * MAX_EARLY_DATAGRAMS + ["early_queue"] * 3)
        big = ServerFlow(ServerFlows(_FakeProxy(Clock())), None, None)  # type: ignore[arg-type]
        big.stream = _ScriptedStream(_mux.DROP_NO_CREDIT)  # type: ignore[assignment]
        self.assertEqual([big.send(b"B" * 60000) for _ in range(3)],
                         [None, None, "early_queue"])
        stream.answer = None
        flow.binding = _Binding()  # type: ignore[assignment]
        flow.stream_opened()
        self.assertEqual(stream.sent[1:], [b"%03d" % i for i in range(MAX_EARLY_DATAGRAMS)])

    def test_proxy_client_early_datagrams(self) -> None:
        """While the Proxy-Client's socket is set up a flow keeps at most 64 datagrams;
        the rest are dropped (early_queue) and counted."""
        from tcptunnel.udp import MAX_EARLY_DATAGRAMS, ClientFlow

        proxy = _FakeProxy(Clock())
        request = fr.parse_open(fr.open_payload(16384, 1, fr.KIND_UDP,
                                                fr.target_fields("127.0.0.1", 5353)))
        flow = ClientFlow(proxy, request, lambda flow, how: None)
        for i in range(MAX_EARLY_DATAGRAMS + 6):
            flow.stream_data(b"%d" % i)
        self.assertEqual(len(flow.early), MAX_EARLY_DATAGRAMS)
        self.assertEqual(proxy.stats["udp_dropped", "early_queue"], 6)


class _ScriptedStream:
    """A stream stand-in whose send_datagram answers ``answer`` (and records what it took)."""

    def __init__(self, answer: str | None) -> None:
        self.answer = answer
        self.sent: list[bytes] = []
        self.finished = False

    def send_datagram(self, data: bytes) -> str | None:
        self.sent.append(data)
        return self.answer


# -- sealed datagrams (tcptunnel._e2e, tcptunnel.e2e) -------------------------------------


def _pairing() -> tuple[_e2e.Pairing, _e2e.Pairing]:
    """The Proxy-Server's and the Proxy-Client's Pairing of one CPace handshake."""
    initiator = _e2e.PakeInitiator("pw", 1)
    responder = _e2e.PakeResponder("pw", 1)
    answer = responder.receive_open(initiator.message)
    responder.receive_data(initiator.receive_data(answer))
    assert initiator.pairing is not None and responder.pairing is not None
    return initiator.pairing, responder.pairing


def _datagram_ciphers(stream_number: int = 1, pairings: Any = None
                      ) -> tuple[DatagramCipher, DatagramCipher]:
    """(Proxy-Server's, Proxy-Client's) datagram ciphers of one sealed udp stream."""
    server, client = pairings or _pairing()
    value, _ = server.open_stream(stream_number, _e2e.inner_open(
        fr.KIND_UDP, fr.target_fields("dns.example", 53)))
    details, _ = client.accept_stream(value)
    assert details[0] == fr.KIND_UDP
    return server.datagram_cipher(stream_number), client.datagram_cipher(stream_number)


class SealedDatagramTests(SynchronousTestCase):
    """DATAGRAM records: one per datagram, its sequence sent; a datagram that does not
    open is dropped with a reason, and the ones after it still open."""

    def setUp(self) -> None:
        self.server, self.client = _datagram_ciphers()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(size=st.integers(1, 65507), to_client=st.booleans())
    def test_any_size_round_trips(self, size: int, to_client: bool) -> None:
        """Every datagram of 1..65,507 bytes seals into one frame of its size + 25 bytes
        (within 64 KiB) and opens to itself, in either direction."""
        sender, receiver = ((self.server, self.client) if to_client
                            else (self.client, self.server))
        datagram = os.urandom(min(size, 64)) * (size // 64) + os.urandom(size % 64)
        frame = sender.sealer.seal(datagram)
        self.assertEqual(len(frame), size + _e2e.DATAGRAM_OVERHEAD)
        self.assertLessEqual(len(frame), fr.MAX_PAYLOAD)
        self.assertEqual(receiver.opener.open(frame), datagram)

    def test_limits(self) -> None:
        """The empty datagram and the largest (65,511 bytes: one full frame) open; one byte
        more is refused by the sealer."""
        for datagram in (b"", b"l" * _e2e.MAX_SEALED_DATAGRAM):
            frame = self.server.sealer.seal(datagram)
            self.assertEqual(self.client.opener.open(frame), datagram)
        self.assertEqual(len(frame), fr.MAX_PAYLOAD)
        self.assertRaises(ValueError, self.server.sealer.seal,
                          b"l" * (_e2e.MAX_SEALED_DATAGRAM + 1))

    def rejected(self, payload: bytes, opener: _e2e.DatagramOpener | None = None) -> str:
        """Why ``payload`` does not open (the test fails if it does)."""
        with self.assertRaises(DatagramRejectedError) as caught:
            (opener or self.client.opener).open(payload)
        return caught.exception.why

    def test_every_changed_bit_is_dropped(self) -> None:
        """A bit flipped anywhere (type, sequence, ciphertext, tag) is never delivered: the
        frame is dropped, and the next datagram still opens."""
        datagram = b"a 40-byte datagram for the bit flipping!"
        frame = self.server.sealer.seal(datagram)
        for bit in range(len(frame) * 8):
            changed = bytearray(frame)
            changed[bit // 8] ^= 1 << (bit % 8)
            self.assertIn(self.rejected(bytes(changed)),
                          (_e2e.DATAGRAM_INTEGRITY, _e2e.DATAGRAM_REPLAYED))
        self.assertEqual(self.client.opener.open(frame), datagram)

    def test_replay_policy(self) -> None:
        """Strictly increasing per direction: a gap is accepted (a sender's drop), a repeat
        or an older one is dropped as replayed; a forged number above the bar that does
        not authenticate does not move it."""
        frames = [self.server.sealer.seal(b"%d" % i) for i in range(6)]
        opener = self.client.opener
        self.assertEqual(opener.open(frames[0]), b"0")
        self.assertEqual(opener.open(frames[2]), b"2")  # 1 was lost: fine
        self.assertEqual(self.rejected(frames[2]), _e2e.DATAGRAM_REPLAYED)
        self.assertEqual(self.rejected(frames[1]), _e2e.DATAGRAM_REPLAYED)  # late
        forged = bytearray(frames[3])
        forged[1:9] = (2**64 - 2).to_bytes(8, "big")
        self.assertEqual(self.rejected(bytes(forged)), _e2e.DATAGRAM_INTEGRITY)
        self.assertEqual(opener.open(frames[3]), b"3")
        self.assertEqual(opener.open(frames[5]), b"5")
        self.assertEqual(self.rejected(frames[4]), _e2e.DATAGRAM_REPLAYED)
        self.assertEqual(opener.next_sequence, 6)

    def test_bound_to_stream_direction_and_pairing(self) -> None:
        """A datagram reflected back to its sender, moved to another stream of the same
        pairing, or to the same stream number of another pairing, does not open."""
        pairings = _pairing()
        server, client = _datagram_ciphers(1, pairings)
        other_server, other_client = _datagram_ciphers(2, pairings)
        elsewhere_server, elsewhere_client = _datagram_ciphers(1)
        frame = server.sealer.seal(b"for stream 1, to the Proxy-Client")
        self.assertEqual(self.rejected(frame, server.opener), _e2e.DATAGRAM_INTEGRITY)
        self.assertEqual(self.rejected(frame, other_client.opener), _e2e.DATAGRAM_INTEGRITY)
        self.assertEqual(self.rejected(frame, elsewhere_client.opener),
                         _e2e.DATAGRAM_INTEGRITY)
        self.assertEqual(client.opener.open(frame), b"for stream 1, to the Proxy-Client")
        del other_server, elsewhere_server

    def test_not_a_byte_stream_record(self) -> None:
        """Datagram keys are not the stream's record keys: a byte-stream DATA record is no
        datagram, and a datagram frame is a malformed record to the byte-stream decoder."""
        server_pairing, client_pairing = _pairing()
        value, record_cipher = server_pairing.open_stream(1, _e2e.inner_open(
            fr.KIND_UDP, fr.target_fields("h", 1)))
        _, client_records = client_pairing.accept_stream(value)
        server = server_pairing.datagram_cipher(1)
        client = client_pairing.datagram_cipher(1)
        record = record_cipher.sealer.seal(_e2e.RecordType.DATA, b"x" * 40)
        self.assertEqual(self.rejected(record, client.opener), _e2e.DATAGRAM_INTEGRITY)
        as_datagram = bytes([_e2e.RecordType.DATAGRAM]) + record[1:]
        self.assertEqual(self.rejected(as_datagram, client.opener), _e2e.DATAGRAM_INTEGRITY)
        with self.assertRaises(_e2e.IntegrityError):
            client_records.decoder.feed(server.sealer.seal(b"y" * 40))

    def test_malformed_frames(self) -> None:
        """Empty, short, wrongly typed and oversized frames are dropped as integrity."""
        good = self.server.sealer.seal(b"ok")
        for payload in (b"", good[:24], bytes([_e2e.RecordType.DATA]) + good[1:],
                        good + bytes(fr.MAX_PAYLOAD)):
            self.assertEqual(self.rejected(payload), _e2e.DATAGRAM_INTEGRITY)
        self.assertEqual(self.client.opener.open(good), b"ok")

    def test_integrity_limit(self) -> None:
        """Forgeries are dropped one by one until the key's integrity limit (2^36; here 3):
        the one that reaches it, and everything after, raise IntegrityError (the flow is
        reset); authentic datagrams in between still open, replays do not count."""
        self.assertEqual(self.client.opener.integrity_limit, 2**36)
        opener = self.client.opener
        opener.integrity_limit = 3
        frames = [self.server.sealer.seal(b"%d" % i) for i in range(3)]
        forged = bytes([_e2e.RecordType.DATAGRAM]) + (10**6).to_bytes(8, "big") + bytes(40)
        self.assertEqual(self.rejected(forged), _e2e.DATAGRAM_INTEGRITY)
        self.assertEqual(opener.open(frames[0]), b"0")
        self.assertEqual(self.rejected(frames[0]), _e2e.DATAGRAM_REPLAYED)
        self.assertEqual(self.rejected(forged), _e2e.DATAGRAM_INTEGRITY)
        with self.assertRaises(_e2e.IntegrityError) as caught:
            opener.open(forged)
        self.assertIn("3 sealed datagrams did not authenticate", caught.exception.message)
        self.assertRaises(_e2e.IntegrityError, opener.open, frames[1])

    def test_keys_only_for_the_latest_stream(self) -> None:
        """Datagram keys are made right after the sealed OPEN: not for an older stream, nor
        one never opened."""
        server, client = _pairing()
        _datagram_ciphers(1, (server, client))
        _datagram_ciphers(2, (server, client))
        for pairing in (server, client):
            self.assertRaises(ValueError, pairing.datagram_cipher, 1)
            self.assertRaises(ValueError, pairing.datagram_cipher, 3)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(script=st.lists(st.tuples(st.sampled_from(["pass", "drop", "flip", "repeat",
                                                      "hold", "release"]),
                                     st.integers(0, 63)), max_size=40))
    def test_whatever_the_gateway_does(self, script: list[tuple[str, int]]) -> None:
        """Whatever a Gateway does to a flow's frames (pass, drop, flip a bit, repeat, hold
        back and release later), what is delivered is a strictly increasing subsequence of
        what was sent, each datagram unchanged, and every frame that arrived and was not
        delivered was dropped with a reason."""
        server, client = _datagram_ciphers()
        arrived: list[bytes] = []
        held: list[bytes] = []
        sent = []
        for i, (action, where) in enumerate(script):
            datagram = b"datagram %d" % i
            sent.append(datagram)
            frame = server.sealer.seal(datagram)
            if action == "pass":
                arrived.append(frame)
            elif action == "flip":
                changed = bytearray(frame)
                changed[where % len(frame)] ^= 0x80
                arrived.append(bytes(changed))
            elif action == "repeat":
                arrived += [frame, frame]
            elif action == "hold":
                held.append(frame)
            elif action == "release":
                arrived += [*held, frame]
                held.clear()
        delivered, dropped = [], 0
        for frame in arrived:
            try:
                delivered.append(client.opener.open(frame))
            except DatagramRejectedError:
                dropped += 1
        indices = [sent.index(d) for d in delivered]
        self.assertEqual(indices, sorted(set(indices)))
        self.assertEqual(len(delivered) + dropped, len(arrived))


class _Flow(DatagramEndpoint):
    """A DatagramEndpoint that records what reaches it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.dropped: list[str] = []
        self.ended: list[str] = []
        self.stream: Any = None

    def describe(self) -> str:
        return "udp test flow"

    def datagram_dropped(self, why: str) -> None:
        self.dropped.append(why)

    def stream_data(self, data: bytes) -> None:
        self.received.append(data)

    def stream_ended(self) -> None:
        self.ended.append("fin")

    def stream_reset(self, reason: Reason, message: str, remote: bool) -> None:
        self.ended.append(f"reset {reason.name}")

    def stream_closed(self) -> None:
        self.ended.append("closed")


class SealedDatagramEnds(Ends):
    """Two MuxProtocols over iosim whose udp streams are SealedDatagramStreams."""

    def __init__(self, initial_window: int = 64 * 1024) -> None:
        self.server_pairing, self.client_pairing = _pairing()
        self.flows: list[_Flow] = []
        super().__init__(initial_window)

    def _open_requested(self, stream_id: int, request: Any) -> None:
        value = request.fields[0][1]
        details, _ = self.client_pairing.accept_stream(value)
        assert details[0] == fr.KIND_UDP
        flow = _Flow()
        flow.stream = SealedDatagramStream(self.acceptor, stream_id, flow,
                                           self.client_pairing.datagram_cipher(stream_id))
        self.acceptor.streams[stream_id] = flow.stream
        self.acceptor.accept_stream(stream_id)
        self.flows.append(flow)

    def open_flow(self) -> tuple[_Flow, _Flow]:
        """Open a sealed udp stream: (the Proxy-Server's flow, the Proxy-Client's)."""
        flow = _Flow()
        stream_id = self.opener.core.next_stream_id
        value, _ = self.server_pairing.open_stream(stream_id, _e2e.inner_open(
            fr.KIND_UDP, fr.target_fields("127.0.0.1", 5353)))
        cipher = self.server_pairing.datagram_cipher(stream_id)
        flow.stream = _open_raw(self.opener, fr.KIND_SEALED, ((_e2e.FIELD_SEALED, value),),
                                lambda sid: SealedDatagramStream(self.opener, sid, flow, cipher))
        self.pump.flush()
        return flow, self.flows[-1]


class SealedDatagramStreamTests(SynchronousTestCase):
    """SealedDatagramStream over an in-memory link: datagram framing at both ends, drops
    counted, the flow going on, credit returned for what was dropped."""

    def test_datagram_flag_and_both_ways(self) -> None:
        """The outer kind is sealed, yet both ends frame the stream as datagrams: each
        datagram whole, the empty one too, both ways; byte counts are plaintext."""
        ends = SealedDatagramEnds()
        near, far = ends.open_flow()
        self.assertTrue(near.stream.record.datagram and far.stream.record.datagram)
        for datagram in (b"q1", b"", b"q" * 20000):
            self.assertIsNone(near.stream.send_datagram(datagram))
        ends.pump.flush()
        self.assertEqual(far.received, [b"q1", b"", b"q" * 20000])
        self.assertIsNone(far.stream.send_datagram(b"answer"))
        ends.pump.flush()
        self.assertEqual(near.received, [b"answer"])
        self.assertEqual((near.stream.bytes_out, far.stream.bytes_in), (20002, 20002))
        self.assertRaises(RuntimeError, near.stream.write, b"bytes in clear")

    def test_forged_and_replayed_frames_dropped_flow_goes_on(self) -> None:
        """Forged DATA frames beyond the whole window and a replayed one, injected on the
        link, are dropped and counted, never delivered; the stream is not reset (their
        bytes were credited) and the next datagram arrives."""
        ends = SealedDatagramEnds(initial_window=fr.EARLY_WINDOW)
        near, far = ends.open_flow()
        stream_id = far.stream.stream_id
        for _ in range(40):  # 40,000 bytes through a 16 KiB window
            ends.acceptor.dataReceived(fr.encode(FrameType.DATA, stream_id,
                                                 bytes([4]) + os.urandom(999)))
            ends.pump.flush()
        replayed = near.stream.cipher.sealer.seal(b"once")
        for _ in range(2):
            ends.acceptor.dataReceived(fr.encode(FrameType.DATA, stream_id, replayed))
        ends.pump.flush()
        self.assertEqual(far.received, [b"once"])
        self.assertEqual(far.dropped, ["integrity"] * 40 + ["replayed"])
        self.assertIsNone(near.stream.send_datagram(b"still flowing"))
        ends.pump.flush()
        self.assertEqual(far.received, [b"once", b"still flowing"])
        self.assertEqual(far.ended, [])
        self.assertFalse(far.stream.finished)

    def test_integrity_limit_resets_the_flow(self) -> None:
        """The forgery that reaches the key's integrity limit resets the flow INTEGRITY at
        both ends (a new flow gets new keys); the ones before it were only dropped."""
        ends = SealedDatagramEnds()
        near, far = ends.open_flow()
        far.stream.cipher.opener.integrity_limit = 5
        for _ in range(5):
            ends.acceptor.dataReceived(fr.encode(FrameType.DATA, far.stream.stream_id,
                                                 bytes([4]) + os.urandom(99)))
        ends.pump.flush()
        self.assertEqual(far.dropped, ["integrity"] * 4)
        self.assertEqual(far.ended, ["reset INTEGRITY"])
        self.assertEqual(near.ended, ["reset INTEGRITY"])
        self.assertTrue(near.stream.finished and far.stream.finished)

    def test_fin_ends_the_flow_without_end_record(self) -> None:
        """A flow ends with FIN both ways (no END record); after it datagrams are dropped
        as not open, without sealing."""
        ends = SealedDatagramEnds()
        near, far = ends.open_flow()
        near.stream.loseWriteConnection()
        ends.pump.flush()
        self.assertEqual(far.ended, ["fin"])
        sequence = near.stream.cipher.sealer.sequence
        self.assertEqual(near.stream.send_datagram(b"late"), _mux.DROP_NOT_OPEN)
        self.assertEqual(near.stream.cipher.sealer.sequence, sequence)
        far.stream.loseWriteConnection()
        ends.pump.flush()
        self.assertEqual((near.ended, far.ended), (["fin", "closed"], ["fin", "closed"]))


class UdpConfigTests(SynchronousTestCase):
    """<Binding protocol="udp"> and its idleTimeout in the settings file."""

    def _bindings(self, inner: str) -> Any:
        from tcptunnel.config import NAMESPACE, parse_settings

        xml = (f'<Settings xmlns="{NAMESPACE}"><Instance type="proxy-server" host="gw" '
               f'port="1"><Session id="1" password="p">{inner}</Session></Instance></Settings>')
        instance: Any = parse_settings(xml.encode(), "udp.xml").instances[0]
        return instance.bindings

    def test_udp_binding(self) -> None:
        """protocol="udp" and idleTimeout are read; tcp stays the default; a udp Binding
        may share a tcp Binding's port."""
        tcp, udp = self._bindings(
            '<Binding listenIp="127.0.0.1" listenPort="53" targetHost="h" targetPort="53"/>'
            '<Binding protocol="udp" idleTimeout="2.5" listenIp="127.0.0.1" listenPort="53" '
            'targetHost="h" targetPort="53"/>')
        self.assertEqual((tcp.protocol, tcp.idle_timeout), ("tcp", None))
        self.assertEqual((udp.protocol, udp.idle_timeout), ("udp", 2.5))

    def test_refusals(self) -> None:
        """An unknown protocol, idleTimeout on a tcp Binding, and two udp Bindings on one
        port are refused."""
        from tcptunnel.config import ConfigError

        for inner in (
            '<Binding protocol="sctp" listenPort="1" targetHost="h" targetPort="1"/>',
            '<Binding idleTimeout="5" listenPort="1" targetHost="h" targetPort="1"/>',
            '<Binding protocol="udp" listenIp="127.0.0.1" listenPort="7" targetHost="h" '
            'targetPort="1"/><Binding protocol="udp" listenIp="127.0.0.1" listenPort="7" '
            'targetHost="h" targetPort="2"/>',
        ):
            self.assertRaises(ConfigError, self._bindings, inner)


class FlowTableTests(SynchronousTestCase):
    """The Proxy-Server's flow table."""

    def test_one_flow_per_sender(self) -> None:
        """A sender's datagrams share its flow; another sender gets another."""
        table = FlowTable()
        table.add_binding("b", FlowPolicy())
        first = table.datagram_from("b", ("10.0.0.1", 1000), 0.0)
        again = table.datagram_from("b", ("10.0.0.1", 1000), 1.0)
        other = table.datagram_from("b", ("10.0.0.1", 1001), 1.0)
        self.assertTrue(first.new)
        self.assertFalse(again.new)
        self.assertIs(again.flow, first.flow)
        self.assertTrue(other.new)
        self.assertEqual(len(table), 2)

    def test_idle_timeout(self) -> None:
        """A flow expires when idle for its Binding's timeout; a reply counts as activity."""
        table = FlowTable()
        table.add_binding("b", FlowPolicy(idle_timeout=30.0))
        flow = table.datagram_from("b", "s", 0.0).flow
        self.assertEqual(table.next_expiry(), 30.0)
        table.reply_to(flow, 20.0)
        self.assertEqual(table.expire(49.9), [])
        self.assertEqual(table.expire(50.0), [flow])
        self.assertIsNone(table.next_expiry())

    def test_binding_limit_evicts_its_longest_idle(self) -> None:
        """At a full Binding a new sender evicts that Binding's longest-idle flow."""
        table = FlowTable()
        table.add_binding("b", FlowPolicy(max_flows=2))
        table.add_binding("c", FlowPolicy(max_flows=2))
        a = table.datagram_from("b", "a", 0.0).flow
        table.datagram_from("c", "old-in-c", -1.0)
        b = table.datagram_from("b", "b", 1.0).flow
        table.datagram_from("b", "a", 2.0)  # a is now the more recent
        arrival = table.datagram_from("b", "n", 3.0)
        self.assertEqual(arrival.evicted, (b,))
        self.assertEqual({f.sender for f in table.flows("b")}, {"a", "n"})
        self.assertIsNotNone(table.lookup("c", "old-in-c"))
        del a

    def test_link_limit_evicts_the_longest_idle_anywhere(self) -> None:
        """At a full link a new sender evicts the longest-idle flow of any Binding."""
        table = FlowTable(max_flows=3)
        table.add_binding("b", FlowPolicy())
        table.add_binding("c", FlowPolicy())
        table.datagram_from("b", "b1", 5.0)
        oldest = table.datagram_from("c", "c1", 1.0).flow
        table.datagram_from("b", "b2", 6.0)
        arrival = table.datagram_from("b", "b3", 7.0)
        self.assertEqual(arrival.evicted, (oldest,))
        self.assertEqual(len(table), 3)

    def test_request_response_closes_on_answer(self) -> None:
        """A request/response flow (DNS) is done once each request has its reply."""
        table = FlowTable()
        table.add_binding("dns", policy_for(53))
        flow = table.datagram_from("dns", "s", 0.0).flow
        table.datagram_from("dns", "s", 0.1)
        self.assertFalse(table.reply_to(flow, 0.2))
        self.assertTrue(table.reply_to(flow, 0.3))
        self.assertEqual(len(table), 0)
        self.assertFalse(table.reply_to(flow, 0.4))

    def test_policy_for(self) -> None:
        """Port 53 is request/response with at most 10 s idle; others take the setting or
        60 s."""
        self.assertEqual(policy_for(53), FlowPolicy(_udp.DNS_IDLE_TIMEOUT, 256, True))
        self.assertEqual(policy_for(53, 3.0).idle_timeout, 3.0)
        self.assertEqual(policy_for(51820), FlowPolicy(60.0, 256, False))
        self.assertEqual(policy_for(51820, 120.0).idle_timeout, 120.0)

    def test_remove_binding_returns_its_flows(self) -> None:
        """Removing a Binding hands back its flows and frees their places."""
        table = FlowTable(max_flows=2)
        table.add_binding("b", FlowPolicy())
        table.add_binding("c", FlowPolicy())
        flow = table.datagram_from("b", "x", 0.0).flow
        table.datagram_from("c", "y", 0.0)
        self.assertEqual(table.remove_binding("b"), [flow])
        self.assertEqual(len(table), 1)
        self.assertFalse(table.datagram_from("c", "z", 1.0).evicted)

    def test_invalid_policies_refused(self) -> None:
        """A policy without flows or with a non-positive timeout is refused."""
        table = FlowTable()
        self.assertRaises(ValueError, table.add_binding, "b", FlowPolicy(max_flows=0))
        self.assertRaises(ValueError, table.add_binding, "b", FlowPolicy(idle_timeout=0))
        self.assertRaises(ValueError, FlowTable, 0)


class FlowTableMachine(RuleBasedStateMachine):
    """The flow table against a model: limits always kept, eviction takes the longest idle
    (of the Binding, then of the link), expiry exactly the idle ones."""

    BINDINGS = ("b0", "b1", "b2")

    def __init__(self) -> None:
        super().__init__()
        self.table = FlowTable(max_flows=5)
        self.limits = {"b0": 2, "b1": 3, "b2": 4}
        self.timeouts = {"b0": 5.0, "b1": 10.0, "b2": 30.0}
        for name in self.BINDINGS:
            self.table.add_binding(name, FlowPolicy(self.timeouts[name], self.limits[name],
                                                    request_response=name == "b2"))
        self.now = 0.0
        # (binding, sender) -> [last_active, unanswered]
        self.model: dict[tuple[str, int], list[float]] = {}
        # (binding, sender) -> when it was last touched, in order: among flows of the same
        # age (no time passed between them) the table's longest idle is the least recently
        # touched one.
        self.touched: dict[tuple[str, int], int] = {}
        self.serial = 0

    def _touch(self, key: tuple[str, int]) -> None:
        self.serial += 1
        self.touched[key] = self.serial

    def _oldest(self, keys: list[tuple[str, int]]) -> tuple[str, int]:
        return min(keys, key=lambda k: (self.model[k][0], self.touched[k]))

    @rule(binding=st.sampled_from(BINDINGS), sender=st.integers(0, 6))
    def datagram(self, binding: str, sender: int) -> None:
        key = (binding, sender)
        arrival = self.table.datagram_from(binding, sender, self.now)
        evicted: set[Any] = {(f.binding, f.sender) for f in arrival.evicted}
        expected: set[Any] = set()
        if key in self.model:
            assert not arrival.new
            self.model[key][0] = self.now
            self.model[key][1] += 1
            self._touch(key)
        else:
            assert arrival.new
            mine = [k for k in self.model if k[0] == binding]
            if len(mine) >= self.limits[binding]:
                expected.add(self._oldest(mine))
            rest = [k for k in self.model if k not in expected]
            if len(rest) >= 5:
                # Ties between Bindings: the table may pick either flow of the same age.
                candidate = self._oldest(rest)
                age = self.model[candidate][0]
                tied = {k for k in rest if self.model[k][0] == age}
                chosen = evicted - expected
                assert len(chosen) == 1 and chosen <= tied, (chosen, tied)
                expected |= chosen
            for k in expected:
                del self.model[k]
            self.model[key] = [self.now, 1]
            self._touch(key)
        assert evicted == expected, (evicted, expected)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def reply(self, data: Any) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        flow = self.table.lookup(*key)
        assert flow is not None
        done = self.table.reply_to(flow, self.now)
        entry = self.model[key]
        entry[0] = self.now
        entry[1] = max(0, entry[1] - 1)
        self._touch(key)
        assert done == (key[0] == "b2" and entry[1] == 0)
        if done:
            del self.model[key]

    @rule(step=st.floats(0.0, 12.0))
    def advance(self, step: float) -> None:
        self.now += step
        expired = {(f.binding, f.sender) for f in self.table.expire(self.now)}
        expected = {k for k, (last, _n) in self.model.items()
                    if last + self.timeouts[k[0]] <= self.now}
        assert expired == expected, (expired, expected)
        for k in expected:
            del self.model[k]

    @invariant()
    def matches_model(self) -> None:
        live = {(f.binding, f.sender) for f in self.table.flows()}
        assert live == set(self.model), (live, set(self.model))
        assert len(self.table) == len(self.model) <= 5
        for name in self.BINDINGS:
            assert len(self.table.flows(name)) <= self.limits[name]
        expiry = self.table.next_expiry()
        if self.model:
            assert expiry == min(last + self.timeouts[k[0]]
                                 for k, (last, _n) in self.model.items())
        else:
            assert expiry is None


class FlowTableMachineTests(SynchronousTestCase):
    """The flow table's state machine, run by trial (hypothesis's own ``Machine.TestCase``
    lives in hypothesis's module, where trial's loader does not look: it never ran)."""

    def test_against_the_model(self) -> None:
        """See FlowTableMachine."""
        run_state_machine_as_test(FlowTableMachine, settings=settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, stateful_step_count=40))


class _FakeProxy:
    """What ServerFlows needs of a ProxyServerService: a clock, stats, no link."""

    def __init__(self, clock: Clock) -> None:
        from collections import Counter

        self.reactor = clock
        self.stats: Counter[tuple[str, ...]] = Counter()
        self.link = None
        self.partner_available = False
        self.e2e = None


class ServerFlowsTimerTests(SynchronousTestCase):
    """The adapter's one idle timer, on a Clock."""

    def test_one_timer_at_the_next_expiry(self) -> None:
        """ServerFlows keeps one timer at the table's next deadline; when it fires the idle
        flows are ended and it re-arms for the next one; with no flows, no timer."""
        from tcptunnel.udp import ServerFlows

        clock = Clock()
        flows = ServerFlows(_FakeProxy(clock))
        flows.table.add_binding("b", FlowPolicy(idle_timeout=10.0))
        flows.table.datagram_from("b", "early", 0.0)
        clock.advance(4.0)
        flows.table.datagram_from("b", "late", 4.0)
        flows.arm()
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [10.0])
        clock.advance(6.0)
        self.assertEqual([f.sender for f in flows.table.flows()], ["late"])
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [14.0])
        clock.advance(4.0)
        self.assertEqual(len(flows.table), 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_link_drops_and_counts(self) -> None:
        """Without a link a datagram is dropped, counted (no_link), and opens no flow."""
        from tcptunnel.udp import ServerFlows

        clock = Clock()
        proxy = _FakeProxy(clock)
        proxy.log = _NullLog()  # type: ignore[attr-defined]
        proxy.config = _Config()  # type: ignore[attr-defined]
        flows = ServerFlows(proxy)
        binding = _Binding()
        flows.datagram_received(binding, b"x", ("127.0.0.1", 9))  # type: ignore[arg-type]
        flows.datagram_received(binding, b"y", ("127.0.0.1", 9))  # type: ignore[arg-type]
        self.assertEqual(proxy.stats["udp_dropped", "no_link"], 2)
        self.assertEqual(len(flows.table), 0)
        self.assertEqual(proxy.log.lines, 1)  # type: ignore[attr-defined]


class _RefusingLink:
    """A link whose every stream is refused (as with endToEndPassword and no pairing)."""

    def open_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise StreamError(Reason.E2E_UNAVAILABLE, "end-to-end: no end-to-end pairing yet")


class ServerFlowsRefusalTests(SynchronousTestCase):
    """A stream the link refuses costs the flow, a counted drop, and a rate-limited line."""

    def test_refused_streams_logged_once_per_interval(self) -> None:
        """Three senders whose streams are refused: three drops (stream_refused), no flow
        left, one log line within DROP_LOG_INTERVAL, another after it."""
        from tcptunnel.udp import DROP_LOG_INTERVAL, ServerFlows

        clock = Clock()
        proxy = _FakeProxy(clock)
        proxy.link = _RefusingLink()  # type: ignore[assignment]
        proxy.partner_available = True
        proxy.log = _NullLog()  # type: ignore[attr-defined]
        proxy.config = _Config()  # type: ignore[attr-defined]
        flows = ServerFlows(proxy)
        binding: Any = _Binding()
        binding.config = _UdpConfig()
        flows.add_binding(binding)
        for port in (1, 2, 3):
            flows.datagram_received(binding, b"q", ("127.0.0.1", port))
        self.assertEqual(proxy.stats["udp_dropped", "stream_refused"], 3)
        self.assertEqual(len(flows.table), 0)
        self.assertEqual(proxy.log.lines, 1)  # type: ignore[attr-defined]
        clock.advance(DROP_LOG_INTERVAL)
        flows.datagram_received(binding, b"q", ("127.0.0.1", 4))
        self.assertEqual(proxy.log.lines, 2)  # type: ignore[attr-defined]


class _UdpConfig:
    fixed_target = ("127.0.0.1", 5353)
    target = "127.0.0.1:5353"
    idle_timeout = None
    listen_ip = "127.0.0.1"
    listen_port = 0

    @staticmethod
    def describe() -> str:
        return "127.0.0.1:0 -> 127.0.0.1:5353"


class _NullLog:
    def __init__(self) -> None:
        self.lines = 0

    def warn(self, *args: Any, **kwargs: Any) -> None:
        self.lines += 1


class _Config:
    index = 0


class _Binding:
    last_drop_log = -1e9

    class config:  # noqa: N801
        @staticmethod
        def describe() -> str:
            return "127.0.0.1:9 -> 127.0.0.1:53"



# -- datagrams waiting for the end-to-end pairing (HeldDatagrams, ServerFlows) -------------


class HeldDatagramsTests(SynchronousTestCase):
    """The queue of the flows that wait for the pairing, at its documented bounds."""

    def test_documented_numbers(self) -> None:
        """64 datagrams and 128 KiB per flow, 1,024 datagrams and 1 MiB in all, as
        docs/security.md's UDP bounds say."""
        self.assertEqual((_udp.MAX_HELD_DATAGRAMS_PER_FLOW, _udp.MAX_HELD_BYTES_PER_FLOW,
                          _udp.MAX_HELD_DATAGRAMS, _udp.MAX_HELD_BYTES),
                         (64, 128 * 1024, 1024, 1024 * 1024))
        held = _udp.HeldDatagrams()
        for i in range(64):
            self.assertTrue(held.hold("a", bytes([i])))
        self.assertFalse(held.hold("a", b"65th"))
        self.assertTrue(held.hold("b", b"x" * 65536))
        self.assertTrue(held.hold("b", b"x" * 65536))
        self.assertFalse(held.hold("b", b"x"))  # 128 KiB held for it
        self.assertEqual(held.release("a"), [bytes([i]) for i in range(64)])
        self.assertEqual((held.count, held.bytes, len(held)), (2, 131072, 1))

    def test_total_bounds(self) -> None:
        """The total bounds hold across flows: 16 flows of 64 fill 1,024 datagrams; 8
        flows of two 64 KiB datagrams fill 1 MiB; a release makes room again."""
        held = _udp.HeldDatagrams()
        for flow in range(16):
            for _ in range(64):
                self.assertTrue(held.hold(flow, b"q"))
        self.assertFalse(held.hold(99, b"q"))
        held.release(0)
        self.assertTrue(held.hold(99, b"q"))
        big = _udp.HeldDatagrams()
        for flow in range(8):
            self.assertTrue(big.hold(flow, b"x" * 65536))
            self.assertTrue(big.hold(flow, b"x" * 65536))
        self.assertFalse(big.hold(8, b"x"))
        self.assertRaises(ValueError, _udp.HeldDatagrams, 0)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 3), st.one_of(
        st.none(), st.integers(0, 70000))), max_size=80),
        st.tuples(st.integers(1, 8), st.integers(1, 200000), st.integers(1, 20),
                  st.integers(1, 300000)))
    def test_against_a_model(self, ops: list[tuple[int, int | None]],
                             bounds: tuple[int, int, int, int]) -> None:
        """Any holds (size) and releases (None) of four flows under any bounds: a datagram is
        kept exactly when every bound still holds with it, never more is kept than the
        bounds allow, and a release gives back exactly the flow's datagrams in order."""
        held = _udp.HeldDatagrams(*bounds)
        per_count, per_bytes, total_count, total_bytes = bounds
        model: dict[int, list[bytes]] = {}
        for serial, (flow, size) in enumerate(ops):
            if size is None:
                self.assertEqual(held.release(flow), model.pop(flow, []))
            else:
                datagram = serial.to_bytes(4, "big")[: size] + bytes(max(0, size - 4))
                mine = model.get(flow, [])
                fits = (len(mine) < per_count and sum(map(len, mine)) + size <= per_bytes
                        and sum(map(len, model.values())) < total_count
                        and sum(len(d) for m in model.values() for d in m) + size
                        <= total_bytes)
                self.assertEqual(held.hold(flow, datagram), fits)
                if fits:
                    model.setdefault(flow, []).append(datagram)
            self.assertEqual(held.count, sum(len(m) for m in model.values()))
            self.assertEqual(held.bytes, sum(len(d) for m in model.values() for d in m))
            self.assertLessEqual(held.count, total_count)
            self.assertLessEqual(held.bytes, total_bytes)
            self.assertEqual(len(held), len(model))


class _FakeStream:
    """A flow's stream as ServerFlow uses it: records what it sends, and its end."""

    def __init__(self, link: _FakeLink, endpoint: Any) -> None:
        self.mux = link
        self.endpoint = endpoint
        self.sent: list[bytes] = []
        self.finished = False
        self.fin = False

    def send_datagram(self, data: bytes) -> str | None:
        if self.fin:
            return _mux.DROP_NOT_OPEN
        self.sent.append(data)
        return None

    def loseWriteConnection(self) -> None:  # noqa: N802
        self.fin = True

    def abortConnection(self, reason: Reason = Reason.CANCELLED,  # noqa: N802
                        message: str = "") -> None:
        self.finished = True

    def close(self) -> None:
        """The far end's FIN back: the stream closes both ways."""
        self.finished = True
        self.endpoint.stream_closed()


class _FakeLink:
    """A link that opens fake streams (or refuses them), and may be draining."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.draining = False
        self.streams: list[_FakeStream] = []

    def open_stream(self, host: str, port: int, endpoint: Any, kind: int = 0) -> _FakeStream:
        if self.refuse:
            raise StreamError(Reason.E2E_UNAVAILABLE, "end-to-end: no end-to-end pairing yet")
        stream = _FakeStream(self, endpoint)
        self.streams.append(stream)
        return stream


class _FakeE2E:
    """A Proxy-Server's end-to-end state: a handshake in progress holds, ``done`` retries."""

    def __init__(self) -> None:
        self.handshaking = True
        self.paired = False
        self.held: list[tuple[Any, Any]] = []

    def hold(self, connection: Any, retry: Any) -> bool:
        if not self.handshaking:
            return False
        self.held.append((connection, retry))
        return True

    def ready(self, link: Any) -> bool:
        return self.paired

    def done(self, paired: bool) -> None:
        self.handshaking, self.paired = False, paired
        held, self.held = self.held, []
        for connection, retry in held:
            if not connection.done:
                retry()


class _Port:
    connected = 1

    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.written.append((data, addr))


def _server_flows(link: Any = None, e2e: Any = None) -> tuple[Any, Any, Any, Clock]:
    """ServerFlows of a fake proxy on a Clock, with one Binding; (flows, proxy, binding)."""
    from tcptunnel.udp import ServerFlows

    clock = Clock()
    proxy: Any = _FakeProxy(clock)
    proxy.link = link
    proxy.partner_available = link is not None
    proxy.e2e = e2e
    proxy.log = _NullLog()
    proxy.config = _Config()
    proxy.ended = []
    proxy.stream_ended = lambda endpoint, how: proxy.ended.append(how)
    flows = ServerFlows(proxy)
    binding: Any = _Binding()
    binding.config = _UdpConfig()
    binding.transport = _Port()
    flows.add_binding(binding)
    return flows, proxy, binding, clock


class PairingHoldTests(SynchronousTestCase):
    """A new UDP flow while the end-to-end pairing is being made waits for it, bounded."""

    def test_held_then_sent_in_order(self) -> None:
        """During the handshake a new flow's datagrams wait (no stream, no drop); once the
        pairing is made its stream opens and they leave in order (as early data, within
        the early window); later datagrams follow on the stream."""
        link = _FakeLink()
        e2e = _FakeE2E()
        flows, proxy, binding, _clock = _server_flows(link, e2e)
        for datagram in (b"one", b"two", b"three"):
            flows.datagram_received(binding, datagram, ("127.0.0.1", 5000))
        self.assertEqual(link.streams, [])
        self.assertEqual((flows.held.count, len(e2e.held)), (3, 1))
        e2e.done(paired=True)
        (stream,) = link.streams
        self.assertEqual(stream.sent, [b"one", b"two", b"three"])
        stream.endpoint.stream_opened()
        flows.datagram_received(binding, b"four", ("127.0.0.1", 5000))
        self.assertEqual(stream.sent[-1], b"four")
        self.assertEqual(proxy.stats["udp_flows_opened",], 1)
        self.assertEqual({k: n for k, n in proxy.stats.items() if k[0] == "udp_dropped"}, {})
        self.assertEqual(flows.held.count, 0)

    def test_over_the_bound_dropped_and_counted(self) -> None:
        """Past 64 datagrams a held flow drops and counts (pairing_queue); the 64 leave."""
        link = _FakeLink()
        e2e = _FakeE2E()
        flows, proxy, binding, _clock = _server_flows(link, e2e)
        for i in range(70):
            flows.datagram_received(binding, bytes([i]), ("127.0.0.1", 5000))
        self.assertEqual(proxy.stats["udp_dropped", _udp.DROP_PAIRING_QUEUE], 6)
        e2e.done(paired=True)
        (stream,) = link.streams
        stream.endpoint.stream_opened()
        self.assertEqual(stream.sent, [bytes([i]) for i in range(64)])

    def test_pairing_failed_drops_and_counts(self) -> None:
        """A pairing that fails (the link refuses the stream): every held datagram is
        dropped and counted stream_refused, the flow is gone; the next datagram tries
        again (and, with no handshake now, is refused as before)."""
        link = _FakeLink(refuse=True)
        e2e = _FakeE2E()
        flows, proxy, binding, _clock = _server_flows(link, e2e)
        for datagram in (b"a", b"b"):
            flows.datagram_received(binding, datagram, ("127.0.0.1", 5000))
        e2e.done(paired=False)
        self.assertEqual(proxy.stats["udp_dropped", "stream_refused"], 2)
        self.assertEqual((len(flows.table), flows.held.count, len(flows.held)), (0, 0, 0))
        flows.datagram_received(binding, b"c", ("127.0.0.1", 5000))
        self.assertEqual(proxy.stats["udp_dropped", "stream_refused"], 3)

    def test_link_lost_while_held(self) -> None:
        """The link is lost during the handshake: the held datagrams are dropped as
        no_link."""
        link = _FakeLink()
        e2e = _FakeE2E()
        flows, proxy, binding, _clock = _server_flows(link, e2e)
        flows.datagram_received(binding, b"a", ("127.0.0.1", 5000))
        proxy.link = None
        proxy.partner_available = False
        e2e.done(paired=False)
        self.assertEqual(proxy.stats["udp_dropped", "no_link"], 1)
        self.assertEqual((len(flows.table), flows.held.count), (0, 0))

    def test_idle_while_held(self) -> None:
        """A held flow that idles out (the Binding's timeout, a second deadline beside
        the pairing's) drops what it held; the pairing's end does not retry it."""
        link = _FakeLink()
        e2e = _FakeE2E()
        flows, proxy, binding, clock = _server_flows(link, e2e)
        flows.datagram_received(binding, b"a", ("127.0.0.1", 5000))
        clock.advance(_udp.DEFAULT_IDLE_TIMEOUT)
        self.assertEqual(proxy.stats["udp_dropped", "stream_refused"], 1)
        self.assertEqual((len(flows.table), flows.held.count), (0, 0))
        e2e.done(paired=True)
        self.assertEqual(link.streams, [])


class PairingHoldSharingTests(SynchronousTestCase):
    """All UDP flows waiting for the pairing take one place among the held connections."""

    def test_one_place_for_all_flows(self) -> None:
        """Five new senders during the handshake: one place in the end-to-end hold (its
        1,024 stay for TCP connections), each flow's datagrams apart; when the pairing is
        made each flow opens, in arrival order, with its own datagrams; a handshake after
        it takes a place again."""
        link = _FakeLink()
        e2e = _FakeE2E()
        flows, _proxy, binding, _clock = _server_flows(link, e2e)
        for port in range(5):
            flows.datagram_received(binding, b"p%d" % port, ("127.0.0.1", 7000 + port))
        self.assertEqual((len(e2e.held), len(flows.held), flows.held.count), (1, 5, 5))
        e2e.done(paired=True)
        self.assertEqual([s.sent for s in link.streams], [[b"p%d" % i] for i in range(5)])
        self.assertEqual([s.endpoint.sender[1] for s in link.streams],
                         list(range(7000, 7005)))
        e2e.handshaking = True  # a new pairing (say, after a reconnect)
        flows.datagram_received(binding, b"late", ("127.0.0.1", 7100))
        self.assertEqual(len(e2e.held), 1)

    def test_stop_drops_what_waits(self) -> None:
        """The instance stops during the handshake: held datagrams are dropped (no_link)
        and the place in the hold is not retried."""
        e2e = _FakeE2E()
        flows, proxy, binding, _clock = _server_flows(_FakeLink(), e2e)
        flows.datagram_received(binding, b"a", ("127.0.0.1", 7000))
        flows.stop()
        self.assertEqual(proxy.stats["udp_dropped", "no_link"], 1)
        self.assertEqual((flows.held.count, len(flows.table), flows.waiting), (0, 0, {}))
        e2e.done(paired=True)
        self.assertEqual(flows.table.flows(), [])


class DrainMoveTests(SynchronousTestCase):
    """Flows of a link the Gateway drains move to the new link (same Binding socket and
    sender), and their old streams end soon after, on a Clock."""

    def setUp(self) -> None:
        self.old = _FakeLink()
        self.flows, self.proxy, self.binding, self.clock = _server_flows(self.old)
        for port in (5000, 5001):
            self.flows.datagram_received(self.binding, b"before", ("127.0.0.1", port))
        self.moving, self.silent = self.old.streams
        self.old.draining = True
        self.proxy.link = None  # the new link is being made
        self.proxy.partner_available = False
        self.flows.link_draining(self.old)

    def new_link(self, e2e: Any = None) -> _FakeLink:
        """The new link logs in and sees the Proxy-Client."""
        new = _FakeLink()
        self.proxy.link = new
        self.proxy.partner_available = True
        self.proxy.e2e = e2e
        return new

    def test_stays_until_the_new_link_then_moves(self) -> None:
        """Before the new link, datagrams go on the draining link (not dropped no_link);
        with it, the next datagram opens a stream there and goes on it, a reply on the
        old stream still reaches the sender, the old stream ends MOVE_LINGER later; the
        silent flow's old stream ends too, and its next datagram opens a new flow."""
        from tcptunnel.udp import DRAIN_SWEEP_INTERVAL, MOVE_LINGER

        self.flows.datagram_received(self.binding, b"during", ("127.0.0.1", 5000))
        self.assertEqual(self.moving.sent, [b"before", b"during"])
        self.clock.advance(MOVE_LINGER * 3)
        self.assertFalse(self.moving.fin or self.silent.fin)  # no new link: they stay
        new = self.new_link()
        self.flows.datagram_received(self.binding, b"after", ("127.0.0.1", 5000))
        (moved,) = new.streams
        self.assertEqual(moved.sent, [b"after"])
        self.assertEqual(self.moving.sent, [b"before", b"during"])
        self.moving.endpoint.stream_data(b"late reply")
        self.assertEqual(self.binding.transport.written[-1],
                         (b"late reply", ("127.0.0.1", 5000)))
        self.assertEqual(self.proxy.stats["udp_flows_moved",], 1)
        self.assertEqual(len(self.flows.table), 2)  # one flow each: moved, not doubled
        self.clock.pump([0.05] * round((MOVE_LINGER - 0.1) / 0.05))
        self.assertFalse(self.moving.fin or self.silent.fin)
        # The silent one: a sweep sees the new link ready, then its end due (each at most
        # an interval late).
        self.clock.pump([0.05] * round((0.2 + 2 * DRAIN_SWEEP_INTERVAL) / 0.05))
        self.assertTrue(self.moving.fin and self.silent.fin)
        self.moving.close()
        self.silent.close()
        self.assertEqual(len(self.proxy.ended), 2)
        self.assertEqual(self.flows.draining, set())
        self.assertIsNone(self.flows._sweep_timer)
        # The moved flow goes on; the silent one opens a new flow on the new link.
        (flow,) = self.flows.table.flows()
        self.assertIs(flow.handle, moved.endpoint)
        self.flows.datagram_received(self.binding, b"back", ("127.0.0.1", 5001))
        self.assertEqual(new.streams[1].sent, [b"back"])
        self.assertEqual({k: n for k, n in self.proxy.stats.items()
                          if k[0] == "udp_dropped"}, {})

    def test_waits_for_the_new_pairing(self) -> None:
        """End to end, a flow moves only once the new link has its pairing: until then
        its datagrams stay on the draining link (whose streams keep their keys)."""
        e2e = _FakeE2E()
        new = self.new_link(e2e)
        self.flows.datagram_received(self.binding, b"handshaking", ("127.0.0.1", 5000))
        self.assertEqual((new.streams, self.moving.sent[-1]), ([], b"handshaking"))
        e2e.paired = True
        self.flows.datagram_received(self.binding, b"paired", ("127.0.0.1", 5000))
        self.assertEqual(new.streams[0].sent, [b"paired"])

    def test_refused_on_the_new_link_stays(self) -> None:
        """The new link refuses the stream (LIMIT, say): the flow stays on the draining
        link, nothing dropped, and tries again at its next datagram."""
        new = self.new_link()
        new.refuse = True
        self.flows.datagram_received(self.binding, b"x", ("127.0.0.1", 5000))
        self.assertEqual(self.moving.sent[-1], b"x")
        new.refuse = False
        self.flows.datagram_received(self.binding, b"y", ("127.0.0.1", 5000))
        self.assertEqual(new.streams[0].sent, [b"y"])
        self.assertEqual({k: n for k, n in self.proxy.stats.items()
                          if k[0] == "udp_dropped"}, {})

    def test_answered_on_the_old_stream_ends_both(self) -> None:
        """A request/response flow whose last answer comes on its old stream after the
        move: the flow is done, both its streams end."""
        from tcptunnel._udp import FlowPolicy as Policy

        self.flows.table.add_binding(self.binding, Policy(request_response=True))
        new = self.new_link()
        self.flows.datagram_received(self.binding, b"q2", ("127.0.0.1", 5000))
        self.moving.endpoint.stream_data(b"a1")
        self.assertFalse(self.moving.fin or new.streams[0].fin)
        self.moving.endpoint.stream_data(b"a2")
        self.assertTrue(self.moving.fin and new.streams[0].fin)


class DrainMachine(RuleBasedStateMachine):
    """ServerFlows across a drain, on a Clock, whatever the order of datagrams, replies, the
    far end's FINs, the new link's readiness and time: a datagram of a flow is never dropped
    (only a new sender's, between the drain and the new link: no_link), each goes to the
    stream its flow has now (the new link's, once it is ready), a sender has at most one flow,
    every reply reaches its sender, and once the new link is ready every stream on the
    draining link ends (FIN) within MOVE_LINGER + 2 sweep intervals of its last datagram or
    of the readiness, whichever is later."""

    SENDERS = 4

    def __init__(self) -> None:
        super().__init__()
        self.old = _FakeLink()
        self.flows, self.proxy, self.binding, self.clock = _server_flows(self.old)
        self.new: _FakeLink | None = None
        self.drained = False
        self.ready_at: float | None = None
        self.last_sent: dict[int, float] = {}  # id(old stream) -> its last datagram's time
        self.no_link = 0  # new senders' datagrams in the gap: dropped

    def streams(self) -> list[_FakeStream]:
        return self.old.streams + (self.new.streams if self.new is not None else [])

    @rule(sender=st.integers(0, SENDERS - 1))
    def datagram(self, sender: int) -> None:
        address = ("127.0.0.1", 6000 + sender)
        known = self.flows.table.lookup(self.binding, address) is not None
        self.flows.datagram_received(self.binding, b"d", address)
        flow = self.flows.table.lookup(self.binding, address)
        if self.proxy.link is None and not known:
            assert flow is None
            self.no_link += 1
            return
        assert flow is not None
        stream = flow.handle.stream
        assert stream.sent[-1:] == [b"d"] and not stream.fin
        stream.sent.append(b"seen")  # so that the next check sees only the next datagram
        if stream.mux is self.old:
            self.last_sent[id(stream)] = self.clock.seconds()
        if self.ready_at is not None:
            assert stream.mux is self.new  # a ready new link takes every datagram

    @rule(data=st.data())
    def reply(self, data: Any) -> None:
        live = [s for s in self.streams() if not s.finished]
        if not live:
            return
        stream = data.draw(st.sampled_from(live))
        before = len(self.binding.transport.written)
        stream.endpoint.stream_data(b"r")
        assert len(self.binding.transport.written) == before + 1
        assert self.binding.transport.written[-1][1] == stream.endpoint.sender

    @rule()
    def far_end_fins(self) -> None:
        for stream in self.streams():
            if stream.fin and not stream.finished:
                stream.close()

    @precondition(lambda self: not self.drained)
    @rule()
    def drain(self) -> None:
        self.drained = True
        self.old.draining = True
        self.proxy.link = None
        self.proxy.partner_available = False
        self.flows.link_draining(self.old)

    @precondition(lambda self: self.drained and self.new is None)
    @rule()
    def new_link_ready(self) -> None:
        self.new = _FakeLink()
        self.proxy.link = self.new
        self.proxy.partner_available = True
        self.ready_at = self.clock.seconds()

    @rule(steps=st.integers(1, 60))
    def advance(self, steps: int) -> None:
        # 50 ms at a time: timers fire on time, as in a reactor that is not overloaded.
        self.clock.pump([0.05] * steps)

    @invariant()
    def holds(self) -> None:
        from tcptunnel.udp import DRAIN_SWEEP_INTERVAL, MOVE_LINGER

        drops = {k: n for k, n in self.proxy.stats.items() if k[0] == "udp_dropped" and n}
        assert drops == ({("udp_dropped", "no_link"): self.no_link} if self.no_link else {})
        assert len(self.flows.table) <= self.SENDERS
        now = self.clock.seconds()
        if self.ready_at is None:
            return
        # Each sweep is armed from when the last one ran, so each of the (at most 6) sweeps
        # in between may be late by the clock's step (50 ms).
        bound = MOVE_LINGER + 2 * DRAIN_SWEEP_INTERVAL + 6 * 0.05 + 1e-6
        for stream in self.old.streams:
            if not stream.fin and not stream.finished:
                since = max(self.ready_at, self.last_sent.get(id(stream), 0.0))
                assert now < since + bound, (now, since)


class DrainMachineTests(SynchronousTestCase):
    """The drain state machine, run by trial."""

    def test_any_order(self) -> None:
        """See DrainMachine."""
        run_state_machine_as_test(DrainMachine, settings=settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, stateful_step_count=40))
