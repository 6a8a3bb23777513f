"""Tests for the Gateway's sans-IO relay core (:mod:`tcptunnel._relay`), with no reactor and no
adapter: links are driven the way :mod:`tcptunnel.gateway` drives them (HELLO, ``mark_ready``,
``refusal``/``attach``, stream frames through ``RelayCore.stream_frame``, ``fail`` for a
LinkError), and what each link would send is decoded from ``data_to_send``.

Unit tests first, then a hypothesis state machine of two sessions with hostile links, which
also retires links and drains the Gateway (``check_drained`` called where gateway.py calls
it).  ``TCPTUNNEL_FUZZ_EXAMPLES`` sets its examples (200 by default, about 4 s of CPU).
"""

from __future__ import annotations

import os
import struct
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _frames as fr
from tcptunnel._frames import Frame, FrameType, GoAway, LinkError, Reason, StreamError
from tcptunnel._link import GoAwayReceived
from tcptunnel._relay import (
    CLEAR_KINDS,
    RelayCore,
    RelayLimits,
    RelayLink,
    Route,
    StreamEnded,
    StreamFrameReceived,
)
from tcptunnel._stream import StreamEvent, StreamState, advance

EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "200"))
ROLE_CLIENT = fr.ROLE_PROXY_CLIENT
ROLE_SERVER = fr.ROLE_PROXY_SERVER
# The biggest single frame the relay can queue toward a link in one step: a full DATA frame
# (a forwarded OPEN or OPEN_RESULT is never bigger, the link's frame limit caps them too).
LARGEST_FRAME = fr.HEADER_SIZE + fr.MAX_PAYLOAD


class Relay:
    """A RelayCore driven as gateway.py drives it, with a decoder per link for what it sends."""

    def __init__(self, limits: RelayLimits | None = None,
                 sessions: tuple[int, ...] = (1, 2)) -> None:
        self.now = 0.0
        self.core = RelayCore(list(sessions), limits or RelayLimits(), clock=lambda: self.now)
        self.ended: list[StreamEnded] = []  # what take_ended said, in order
        self.seen_routes: set[Route] = set()  # every route record_routes saw
        self.decoders: dict[RelayLink, fr.FrameDecoder] = {}
        self.gone: set[RelayLink] = set()  # the adapter stopped feeding these (closed or lost)
        self.failed: list[tuple[RelayLink, GoAway, str]] = []
        self.peer_goaway: set[RelayLink] = set()  # links whose proxy sent GOAWAY
        # Every (link, stream id) each route ever joined, seen after each stream frame.
        self.partners: dict[tuple[RelayLink, int], set[tuple[RelayLink, int]]] = {}

    def new_link(self) -> RelayLink:
        """A link whose magic and HELLO went out (GatewayLink.connectionMade flushes them)
        and whose peer's HELLO came in."""
        link = self.core.new_link()
        self.decoders[link] = fr.FrameDecoder(expect_magic=True)
        (hello,) = self.read(link)
        assert hello.type == FrameType.HELLO, hello
        self.feed(link, fr.build_hello())
        return link

    def login(self, session_id: int, role: int) -> RelayLink:
        """A link that passed HELLO and a (proven) login; attached to its session."""
        link = self.new_link()
        refusal = self.core.refusal(session_id, role)
        assert refusal is None, refusal
        link.mark_ready()
        self.core.attach(link, session_id, role)
        self.effects()
        return link

    def feed(self, link: RelayLink, data: bytes) -> None:
        """Bytes from ``link``'s proxy, handled as GatewayLink.dataReceived/handle_events do."""
        if link in self.gone or link.detached:
            return
        try:
            events = link.receive_data(data)
        except LinkError as e:
            self.core.fail(link, e.code, e.message)
            self.effects()
            return
        core = self.core
        if any(isinstance(event, GoAwayReceived) for event in events):
            self.peer_goaway.add(link)
        try:
            for event in events:
                if link.detached:
                    break
                if isinstance(event, GoAwayReceived):
                    core.detach(link, Reason.LINK_LOST, "closed by its proxy")
                elif isinstance(event, StreamFrameReceived):
                    try:
                        core.stream_frame(link, event.frame)
                    finally:
                        self.record_routes(link)
        except LinkError as e:
            core.fail(link, e.code, e.message)
        self.after_read(link)

    def after_read(self, link: RelayLink) -> None:
        """What GatewayLink.handle_events does once a read was handled: the effects."""
        self.effects()

    def record_routes(self, link: RelayLink) -> None:
        """Remember the routes through ``link`` (both ends), for checking what is sent."""
        for route in link.routes.values():
            self.seen_routes.add(route)
            server = (route.server, route.server_stream)
            client = (route.client, route.client_stream)
            self.partners.setdefault(server, set()).add(client)
            self.partners.setdefault(client, set()).add(server)

    def effects(self) -> None:
        """Take the relay's effects: failed links are closed (no more input)."""
        for failed in self.core.take_failed():
            self.failed.append(failed)
            self.gone.add(failed[0])
        self.core.take_dirty()
        self.ended.extend(self.core.take_ended())

    def close(self, link: RelayLink) -> None:
        """The link's connection is lost (connectionLost)."""
        self.gone.add(link)
        self.core.detach(link, Reason.LINK_LOST, "lost")
        self.effects()

    def read(self, link: RelayLink, limit: int = 256 * 1024) -> list[Frame]:
        """The frames ``link`` would write now (one data_to_send call)."""
        data = b"".join(link.data_to_send(limit))
        return self.decoders[link].feed(data)

    def read_all(self, link: RelayLink) -> list[Frame]:
        """Everything ``link`` has queued."""
        frames: list[Frame] = []
        while True:
            more = self.read(link)
            if not more:
                return frames
            frames.extend(more)


def open_frame(stream_id: int, window: int = 100_000, kind: int = fr.KIND_TCP,
               fields: tuple[tuple[int, bytes], ...] | None = None) -> bytes:
    """An OPEN as a Proxy-Server sends it."""
    if fields is None:
        fields = tuple(fr.target_fields("target.example", 22))
    return fr.encode(FrameType.OPEN, stream_id, fr.open_payload(window, 0, kind, fields))


def data(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    """A DATA frame."""
    return fr.encode(FrameType.DATA, stream_id, payload, flags)


def of_type(frames: list[Frame], frame_type: int) -> list[Frame]:
    """The frames of one type."""
    return [f for f in frames if f.type == frame_type]


class RelayUnitTests(SynchronousTestCase):
    """RelayCore driven frame by frame, one behaviour per test."""

    def setUp(self) -> None:
        self.relay = Relay()

    def pair(self, session_id: int = 1) -> tuple[RelayLink, RelayLink]:
        """A Proxy-Client and a Proxy-Server of one session, their PARTNER frames read."""
        client = self.relay.login(session_id, ROLE_CLIENT)
        server = self.relay.login(session_id, ROLE_SERVER)
        self.relay.read_all(client)
        self.relay.read_all(server)
        return client, server

    def route(self, client: RelayLink, server: RelayLink, stream_id: int = 1,
              server_window: int = 100_000, client_window: int | None = 100_000) -> int:
        """Open a stream from ``server`` (accepted with ``client_window`` unless None); the
        Proxy-Client's stream id."""
        relay = self.relay
        relay.feed(server, open_frame(stream_id, server_window))
        (opened,) = of_type(relay.read_all(client), FrameType.OPEN)
        if client_window is not None:
            relay.feed(client, fr.build_open_result(opened.stream_id, Reason.OK, client_window))
            (result,) = of_type(relay.read_all(server), FrameType.OPEN_RESULT)
            self.assertEqual(result.stream_id, stream_id)
        return opened.stream_id

    def test_open_forwarded_with_origin_kind_and_fields_untouched(self) -> None:
        """An OPEN reaches the Proxy-Client on a Gateway-chosen id, with only the origin
        rewritten to the Proxy-Server's number: an unknown kind and unknown (even critical)
        fields pass byte for byte."""
        client, server = self.pair()
        fields = ((0x33, b"optional"), (0x90, b"\x00critical\xff"), (0x01, b"h"))
        payload = fr.open_payload(4096, 12345, 99, fields)
        self.relay.feed(server, fr.encode(FrameType.OPEN, 7, payload))
        (opened,) = self.relay.read_all(client)
        self.assertEqual((opened.type, opened.stream_id), (FrameType.OPEN, 1))
        self.assertEqual(opened.payload, fr.with_origin(payload, server.number))
        self.assertEqual(struct.unpack(">I", opened.payload[4:8])[0], 1)
        self.assertIs(server.routes[7], client.routes[1])

    def test_route_keeps_kind_target_time_and_bytes(self) -> None:
        """A route keeps its OPEN's kind; the target (host:port, IPv6 in brackets) only for a
        tcp or udp stream, None for a sealed or pairing one and for a malformed target; when
        it opened; and the DATA bytes relayed each way."""
        client, server = self.pair()
        relay = self.relay
        relay.now = 12.5
        sealed = ((0x81, b"\x00" * 40),)
        cases = [(fr.KIND_TCP, tuple(fr.target_fields("db.internal", 5432)), "db.internal:5432"),
                 (fr.KIND_UDP, tuple(fr.target_fields("::1", 53)), "[::1]:53"),
                 (fr.KIND_SEALED, sealed, None),
                 (fr.KIND_PAKE, ((0x82, b"\x01" * 32),), None),
                 (fr.KIND_TCP, ((fr.FIELD_HOST, b"no port"),), None),
                 (77, tuple(fr.target_fields("x", 1)), None)]
        for stream_id, (kind, fields, target) in enumerate(cases, start=1):
            relay.feed(server, open_frame(stream_id, kind=kind, fields=fields))
            route = server.routes[stream_id]
            self.assertEqual((route.kind, route.target, route.opened_at), (kind, target, 12.5))
            self.assertEqual(route.sealed, kind in (fr.KIND_SEALED, fr.KIND_PAKE))
        route = server.routes[3]
        relay.feed(client, fr.build_open_result(route.client_stream, Reason.OK, 100_000))
        relay.feed(server, data(3, b"x" * 300))
        relay.feed(client, data(route.client_stream, b"y" * 1200))
        self.assertEqual((route.bytes_to_client, route.bytes_to_server), (300, 1200))

    def test_ended_routes_reported_once_with_how_and_reason(self) -> None:
        """take_ended names each route that ended, once: closed (FIN both ways), refused (the
        Proxy-Client's OPEN_RESULT), reset by a proxy, reset for a broken rule, reset because
        its link was lost."""
        client, server = self.pair()
        relay = self.relay
        routes = {}
        for stream_id in (1, 3, 5, 7, 9):
            relay.feed(server, open_frame(stream_id))
            routes[stream_id] = server.routes[stream_id]
        ids = {stream_id: route.client_stream for stream_id, route in routes.items()}
        for stream_id in (1, 5, 7, 9):
            relay.feed(client, fr.build_open_result(ids[stream_id], Reason.OK, 100_000))
        relay.feed(server, fr.build_fin(1))
        relay.feed(client, fr.build_fin(ids[1]))
        relay.feed(client, fr.build_open_result(ids[3], Reason.DENIED, 0, "no"))
        relay.feed(server, fr.build_reset(5, Reason.INTEGRITY, "bad record"))
        relay.feed(server, data(7, b"z" * 60_000) * 2)  # past the window: FLOW_CONTROL
        relay.close(client)
        self.assertEqual([(e.route, e.how, e.reason) for e in relay.ended], [
            (routes[1], "closed", "OK"), (routes[3], "refused", "DENIED"),
            (routes[5], "reset", "INTEGRITY"), (routes[7], "reset", "FLOW_CONTROL"),
            (routes[9], "reset", "LINK_LOST")])
        self.assertEqual(relay.core.take_ended(), [])

    def test_no_partner(self) -> None:
        """An OPEN in a session without a Proxy-Client is answered NO_PARTNER by the
        Gateway; nothing is routed."""
        server = self.relay.login(1, ROLE_SERVER)
        self.relay.read_all(server)
        self.relay.feed(server, open_frame(1))
        (result,) = self.relay.read_all(server)
        self.assertEqual(result.type, FrameType.OPEN_RESULT)
        self.assertEqual(fr.parse_open_result(result.payload)[0], Reason.NO_PARTNER)
        self.assertEqual(server.routes, {})

    def test_stream_limit(self) -> None:
        """OPENs beyond maxStreamsPerLink are answered LIMIT; a stream that ends frees a
        place."""
        self.relay = Relay(RelayLimits(max_streams_per_link=2))
        client, server = self.pair()
        for stream_id in (1, 3):
            self.route(client, server, stream_id)
        self.relay.feed(server, open_frame(5))
        (result,) = self.relay.read_all(server)
        self.assertEqual((result.stream_id, fr.parse_open_result(result.payload)[0]),
                         (5, Reason.LIMIT))
        self.assertEqual(len(client.routes), 2)
        self.relay.feed(server, fr.build_reset(1, Reason.CANCELLED))
        self.route(client, server, 7)
        self.assertEqual(sorted(server.routes), [3, 7])

    def test_fair_share_between_two_proxy_servers(self) -> None:
        """With two Proxy-Servers, one that opens as many streams as it can still leaves the
        other its capacity // 2; alone, a Proxy-Server may use every stream."""
        capacity = 6
        self.relay = Relay(RelayLimits(max_streams_per_link=capacity))
        client, greedy = self.pair()
        other = self.relay.login(1, ROLE_SERVER)
        self.relay.read_all(other)
        for stream_id in range(1, 2 * capacity, 2):
            self.relay.feed(greedy, open_frame(stream_id))
        self.assertEqual(len(greedy.routes), capacity // 2)
        for stream_id in range(1, 2 * capacity, 2):
            self.relay.feed(other, open_frame(stream_id))
        self.assertEqual(len(other.routes), capacity // 2)
        refused = [fr.parse_open_result(f.payload)[0] for f in
                   of_type(self.relay.read_all(other) + self.relay.read_all(greedy),
                           FrameType.OPEN_RESULT)]
        self.assertEqual(refused, [Reason.LIMIT] * capacity)
        # The other one leaves: the greedy one may now use every stream.
        self.relay.close(other)
        for stream_id in range(101, 101 + 2 * capacity, 2):
            self.relay.feed(greedy, open_frame(stream_id))
        self.assertEqual(len(greedy.routes), capacity)
        self.assertEqual(len(client.routes), capacity)

    def test_early_data_up_to_16_kib(self) -> None:
        """Before OPEN_RESULT the Proxy-Server may send 16 KiB (and FIN), forwarded behind the
        OPEN; one byte more resets the stream: OPEN_RESULT FLOW_CONTROL to the Proxy-Server,
        RESET FLOW_CONTROL to the Proxy-Client, and the early data still queued is dropped."""
        client, server = self.pair()
        self.relay.feed(server, open_frame(1) + data(1, b"a" * 10_000))
        self.relay.feed(server, data(1, b"b" * (fr.EARLY_WINDOW - 10_000)))
        frames = self.relay.read_all(client)
        self.assertEqual([f.type for f in frames],
                         [FrameType.OPEN, FrameType.DATA, FrameType.DATA])
        self.assertEqual(b"".join(f.payload for f in frames[1:]),
                         b"a" * 10_000 + b"b" * (fr.EARLY_WINDOW - 10_000))
        # A second stream: its early data waits unread when the window is exceeded.
        self.relay.feed(server, open_frame(3) + data(3, b"c" * fr.EARLY_WINDOW) + data(3, b"d"))
        (result,) = self.relay.read_all(server)
        self.assertEqual((result.type, result.stream_id), (FrameType.OPEN_RESULT, 3))
        self.assertEqual(fr.parse_open_result(result.payload)[0], Reason.FLOW_CONTROL)
        frames = self.relay.read_all(client)
        self.assertEqual([f.type for f in frames], [FrameType.OPEN, FrameType.RESET])
        self.assertEqual(fr.parse_reset(frames[1].payload)[0], Reason.FLOW_CONTROL)
        self.assertNotIn(3, server.routes)
        self.assertEqual(list(server.routes), [1])

    def test_early_fin_then_open_result(self) -> None:
        """An early FIN is forwarded; the stream then closes when the Proxy-Client's FIN
        follows its OPEN_RESULT."""
        client, server = self.pair()
        self.relay.feed(server, open_frame(1) + data(1, b"x") + fr.build_fin(1))
        frames = self.relay.read_all(client)
        self.assertEqual([f.type for f in frames],
                         [FrameType.OPEN, FrameType.DATA, FrameType.FIN])
        self.relay.feed(client, fr.build_open_result(1, Reason.OK, 50_000) + data(1, b"y")
                        + fr.build_fin(1))
        self.assertEqual([f.type for f in self.relay.read_all(server)],
                         [FrameType.OPEN_RESULT, FrameType.DATA, FrameType.FIN])
        self.assertEqual((server.routes, client.routes), ({}, {}))

    def test_data_beyond_the_window_resets_both_ways(self) -> None:
        """DATA beyond the window the receiver granted resets the stream toward both proxies
        with FLOW_CONTROL, in either direction."""
        client, server = self.pair()
        cid = self.route(client, server, 1, server_window=30_000, client_window=40_000)
        self.relay.feed(server, data(1, b"s" * 40_000))  # exactly the window: fine
        self.assertEqual(len(of_type(self.relay.read_all(client), FrameType.DATA)), 1)
        self.relay.feed(server, data(1, b"s"))
        (reset_s,) = self.relay.read_all(server)
        (reset_c,) = self.relay.read_all(client)
        self.assertEqual((reset_s.type, reset_s.stream_id, reset_c.type, reset_c.stream_id),
                         (FrameType.RESET, 1, FrameType.RESET, cid))
        self.assertEqual({fr.parse_reset(f.payload)[0] for f in (reset_s, reset_c)},
                         {Reason.FLOW_CONTROL})
        # The other direction: the Proxy-Server's OPEN window, topped up once.
        cid = self.route(client, server, 3, server_window=30_000)
        self.relay.feed(server, fr.build_window_update(3, 5_000))
        (update,) = self.relay.read_all(client)
        self.assertEqual((update.type, fr.parse_window_update(update.payload)),
                         (FrameType.WINDOW_UPDATE, 5_000))
        self.relay.feed(client, data(cid, b"c" * 35_000))
        self.assertEqual(len(of_type(self.relay.read_all(server), FrameType.DATA)), 1)
        self.relay.feed(client, data(cid, b"c"))
        self.assertEqual([(f.type, f.stream_id) for f in self.relay.read_all(server)],
                         [(FrameType.RESET, 3)])
        self.assertEqual([(f.type, f.stream_id) for f in self.relay.read_all(client)],
                         [(FrameType.RESET, cid)])
        self.assertEqual((server.routes, client.routes), ({}, {}))

    def test_window_update_past_the_maximum_resets(self) -> None:
        """Credit that would pass 2^31-1 in one direction resets the stream (FLOW_CONTROL)."""
        client, server = self.pair()
        cid = self.route(client, server, 1, client_window=fr.MAX_WINDOW - 10)
        self.relay.feed(client, fr.build_window_update(cid, 10))  # exactly the maximum
        self.assertIn(1, server.routes)
        self.relay.feed(client, fr.build_window_update(cid, 1))
        self.assertNotIn(1, server.routes)
        resets = of_type(self.relay.read_all(server), FrameType.RESET)
        self.assertEqual(fr.parse_reset(resets[0].payload)[0], Reason.FLOW_CONTROL)

    def test_fin_both_ways_closes_the_route(self) -> None:
        """FIN from each side is forwarded; after both the route is gone from both links, and
        DATA after its own FIN resets the stream."""
        client, server = self.pair()
        cid = self.route(client, server)
        self.relay.feed(server, data(1, b"q") + fr.build_fin(1))
        self.assertEqual([f.type for f in self.relay.read_all(client)],
                         [FrameType.DATA, FrameType.FIN])
        self.assertIn(1, server.routes)  # half-closed: the other direction still flows
        self.relay.feed(client, data(cid, b"r") + fr.build_fin(cid))
        self.assertEqual([f.type for f in self.relay.read_all(server)],
                         [FrameType.DATA, FrameType.FIN])
        self.assertEqual((server.routes, client.routes), ({}, {}))
        self.assertEqual(self.relay.core.stats["streams_closed",], 1)
        # A second stream: DATA after FIN is a protocol error for that stream.
        cid = self.route(client, server, 3)
        self.relay.feed(client, fr.build_fin(cid) + data(cid, b"late"))
        types = [(f.type, fr.parse_reset(f.payload)[0]) for f in self.relay.read_all(server)
                 if f.type == FrameType.RESET]
        self.assertEqual(types, [(FrameType.RESET, Reason.PROTOCOL_ERROR)])

    def test_reset_drops_queues_on_both_sides(self) -> None:
        """A RESET from one proxy drops what waits toward both of them for that stream (DATA
        and pending credit); only the RESET itself is left toward the other."""
        client, server = self.pair()
        cid = self.route(client, server)
        self.relay.feed(server, data(1, b"s" * 50_000) + fr.build_window_update(1, 777))
        self.relay.feed(client, data(cid, b"c" * 60_000))
        self.assertGreater(client.queued_bytes, 50_000)
        self.assertGreater(server.queued_bytes, 60_000)
        self.relay.feed(server, fr.build_reset(1, Reason.CONNECTION_RESET, "bye"))
        self.assertEqual(server.queued_bytes, 0)
        reset = fr.build_reset(cid, Reason.CONNECTION_RESET, "bye")
        self.assertEqual(client.queued_bytes, len(reset))
        self.assertEqual(self.relay.read_all(client), fr.FrameDecoder(expect_magic=False)
                         .feed(reset))
        self.assertEqual(self.relay.read_all(server), [])
        session = self.relay.core.sessions[1]
        self.assertEqual((session.budget.queued, self.relay.core.total.queued), (0, 0))

    def test_proxy_client_replaced(self) -> None:
        """A new Proxy-Client replaces the old one: its open routes are reset LINK_LOST, its
        pending OPEN answered NO_PARTNER, the old link gets GOAWAY REPLACED (and nothing
        else), the Proxy-Servers see PARTNER 1 and the new link PARTNER with their count."""
        old, server = self.pair()
        self.route(old, server, 1)
        self.route(old, server, 3, client_window=None)  # not yet accepted
        self.relay.feed(server, data(1, b"x" * 1000))
        new = self.relay.login(1, ROLE_CLIENT)
        self.assertTrue(old.detached)
        self.assertEqual(self.relay.failed[-1][:2], (old, GoAway.REPLACED))
        frames = self.relay.read_all(old)
        self.assertEqual([f.type for f in frames], [FrameType.GOAWAY])
        self.assertEqual(fr.parse_goaway(frames[0].payload)[0], GoAway.REPLACED)
        got = {(f.type, f.stream_id): f for f in self.relay.read_all(server)}
        self.assertEqual(fr.parse_reset(got[FrameType.RESET, 1].payload)[0], Reason.LINK_LOST)
        self.assertEqual(fr.parse_open_result(got[FrameType.OPEN_RESULT, 3].payload)[0],
                         Reason.NO_PARTNER)
        self.assertEqual(fr.parse_partner(got[FrameType.PARTNER, 0].payload), 1)
        (partner,) = of_type(self.relay.read_all(new), FrameType.PARTNER)
        self.assertEqual(fr.parse_partner(partner.payload), 1)
        self.assertEqual((server.routes, old.routes), ({}, {}))
        self.assertIs(self.relay.core.sessions[1].client, new)
        # The new Proxy-Client takes streams again, numbered from 1 on its own link.
        self.assertEqual(self.route(new, server, 5), 1)

    def test_link_limit_keeps_a_slot_for_the_proxy_client(self) -> None:
        """Proxy-Servers may take maxLinksPerSession - 1 links; the last slot is the
        Proxy-Client's, which can always log in (again)."""
        self.relay = Relay(RelayLimits(max_links_per_session=3))
        core = self.relay.core
        self.relay.login(1, ROLE_SERVER)
        self.relay.login(1, ROLE_SERVER)
        self.assertIsNotNone(core.refusal(1, ROLE_SERVER))
        self.assertEqual(core.stats["limits_hit", "links_per_session"], 1)
        for _ in range(3):
            self.assertIsNone(core.refusal(1, ROLE_CLIENT))
            self.relay.login(1, ROLE_CLIENT)
        self.assertEqual(core.sessions[1].links, 3)
        self.assertIsNotNone(core.refusal(1, ROLE_SERVER))
        self.assertIsNone(core.refusal(2, ROLE_SERVER))  # another session is not affected
        self.assertIsNotNone(core.refusal(3, ROLE_SERVER))  # no such session

    def test_window_updates_coalesced(self) -> None:
        """Credit granted in several WINDOW_UPDATEs while the other side does not read leaves
        as one WINDOW_UPDATE per stream, with the sum."""
        client, server = self.pair()
        cid1 = self.route(client, server, 1)
        cid3 = self.route(client, server, 3)
        for increment in (1, 20, 300, 4000):
            self.relay.feed(client, fr.build_window_update(cid1, increment))
            self.relay.feed(client, fr.build_window_update(cid3, increment * 2))
        frames = self.relay.read_all(server)
        self.assertEqual([(f.type, f.stream_id) for f in frames],
                         [(FrameType.WINDOW_UPDATE, 1), (FrameType.WINDOW_UPDATE, 3)])
        self.assertEqual([fr.parse_window_update(f.payload) for f in frames], [4321, 8642])
        self.assertEqual(server.queued_control_frames, 0)
        self.assertEqual(server.queued_bytes, 0)

    def test_stream_ids_toward_the_proxy_client_exhausted(self) -> None:
        """The last id, 2^31-1, is used; the OPEN after it closes the Proxy-Client link with
        GOAWAY NORMAL (it reconnects) and is answered NO_PARTNER, the stream on the last id
        is reset, and the next Proxy-Client link starts again at 1."""
        client, server = self.pair()
        client.next_stream_id = fr.STREAM_ID_MASK
        self.assertEqual(self.route(client, server, 1), fr.STREAM_ID_MASK)
        self.relay.feed(server, open_frame(3))
        self.assertTrue(client.detached)
        self.assertEqual(self.relay.failed[-1][:2], (client, GoAway.NORMAL))
        frames = self.relay.read_all(client)
        self.assertEqual(frames[-1].type, FrameType.GOAWAY)
        self.assertEqual(fr.parse_goaway(frames[-1].payload)[0], GoAway.NORMAL)
        self.assertNotIn(FrameType.OPEN, [f.type for f in frames])
        got = {(f.type, f.stream_id): f for f in self.relay.read_all(server)}
        self.assertEqual(fr.parse_reset(got[FrameType.RESET, 1].payload)[0], Reason.LINK_LOST)
        self.assertEqual(fr.parse_open_result(got[FrameType.OPEN_RESULT, 3].payload)[0],
                         Reason.NO_PARTNER)
        new = self.relay.login(1, ROLE_CLIENT)
        self.relay.read_all(new)
        self.relay.read_all(server)
        self.assertEqual(self.route(new, server, 5), 1)

    def test_per_link_bound_fails_the_slow_link(self) -> None:
        """DATA queued toward a Proxy-Client that granted a huge window but does not read
        fails that link TOO_SLOW once past maxQueuedBytesPerLink; its queue is released at
        once (it leaves every budget, only its GOAWAY is left to send) and the Proxy-Server
        is told LINK_LOST."""
        limit = 200_000
        self.relay = Relay(RelayLimits(max_queued_bytes_per_link=limit))
        client, server = self.pair()
        self.route(client, server, 1, client_window=fr.MAX_WINDOW)
        chunk = data(1, b"z" * fr.MAX_PAYLOAD)
        for _ in range(3):
            self.relay.feed(server, chunk)
        self.assertFalse(client.detached)
        self.assertLessEqual(client.queued_bytes, limit)
        self.relay.feed(server, chunk)
        self.assertTrue(client.detached)
        self.assertEqual(self.relay.failed[-1][:2], (client, GoAway.TOO_SLOW))
        session = self.relay.core.sessions[1]
        goaway = fr.build_goaway(GoAway.TOO_SLOW, self.relay.failed[-1][2])
        self.assertEqual(client.queued_bytes, len(goaway))
        self.assertEqual(session.budget.queued, server.queued_bytes)
        self.assertEqual(self.relay.core.total.queued, server.queued_bytes)
        self.assertEqual([f.type for f in self.relay.read_all(client)], [FrameType.GOAWAY])
        resets = of_type(self.relay.read_all(server), FrameType.RESET)
        self.assertEqual([fr.parse_reset(f.payload)[0] for f in resets], [Reason.LINK_LOST])
        self.assertEqual(self.relay.core.stats["limits_hit", "queued_bytes_per_link"], 1)
        self.assertEqual((session.budget.queued, self.relay.core.total.queued), (0, 0))

    def test_per_session_bound_fails_the_link_with_the_most(self) -> None:
        """Past maxQueuedBytesPerSession, the session's link with the most queued toward it is
        failed TOO_SLOW, not the one that just received; the other session is untouched."""
        self.relay = Relay(RelayLimits(max_queued_bytes_per_session=250_000))
        client, big = self.pair()
        small = self.relay.login(1, ROLE_SERVER)
        self.relay.read_all(client)
        self.relay.read_all(small)
        big_id = self.route(client, big, 1, server_window=fr.MAX_WINDOW)
        small_id = self.route(client, small, 1, server_window=fr.MAX_WINDOW)
        other_client, other_server = self.pair(2)
        other_id = self.route(other_client, other_server, 1, server_window=fr.MAX_WINDOW)
        for _ in range(3):
            self.relay.feed(client, data(big_id, b"b" * fr.MAX_PAYLOAD))
            self.relay.feed(other_client, data(other_id, b"o" * fr.MAX_PAYLOAD))
        self.relay.feed(client, data(small_id, b"s" * 40_000))
        self.assertEqual(self.relay.failed, [])
        self.relay.feed(client, data(small_id, b"s" * 40_000))
        self.assertEqual([(link, code) for link, code, _ in self.relay.failed],
                         [(big, GoAway.TOO_SLOW)])
        self.assertEqual(self.relay.core.sessions[1].budget.queued,
                         small.queued_bytes + client.queued_bytes)
        self.assertLess(client.queued_bytes, 1000)  # the RESET and PARTNER that tell of it
        self.assertEqual(self.relay.core.stats["limits_hit", "queued_bytes_per_session"], 1)
        self.assertFalse(other_server.detached or small.detached or client.detached)

    def test_total_bound_fails_the_link_with_the_most_anywhere(self) -> None:
        """Past maxQueuedBytes, the link with the most queued toward it in the whole relay is
        failed TOO_SLOW, even in another session than the one that went over."""
        self.relay = Relay(RelayLimits(max_queued_bytes=300_000))
        client1, server1 = self.pair(1)
        client2, server2 = self.pair(2)
        id1 = self.route(client1, server1, 1, server_window=fr.MAX_WINDOW)
        id2 = self.route(client2, server2, 1, server_window=fr.MAX_WINDOW)
        for _ in range(3):
            self.relay.feed(client1, data(id1, b"1" * fr.MAX_PAYLOAD))
        self.relay.feed(client2, data(id2, b"2" * fr.MAX_PAYLOAD))
        self.assertEqual(self.relay.failed, [])
        self.relay.feed(client2, data(id2, b"2" * fr.MAX_PAYLOAD))
        self.assertEqual([(link, code) for link, code, _ in self.relay.failed],
                         [(server1, GoAway.TOO_SLOW)])
        self.assertEqual(self.relay.core.total.queued,
                         server2.queued_bytes + client1.queued_bytes)
        self.assertEqual(self.relay.core.sessions[1].budget.queued, client1.queued_bytes)
        self.assertLess(client1.queued_bytes, 1000)  # the RESET and PARTNER that tell of it
        self.assertFalse(server2.detached)

    def test_control_frame_cap(self) -> None:
        """A link that provokes more unsent control frames than the cap (OPENs answered
        NO_PARTNER here) is failed TOO_SLOW, its answers dropped."""
        self.relay = Relay(RelayLimits(max_control_frames=10))
        server = self.relay.login(1, ROLE_SERVER)
        for stream_id in range(1, 23, 2):
            self.relay.feed(server, open_frame(stream_id))
        self.assertTrue(server.detached)
        self.assertEqual(self.relay.failed[-1][:2], (server, GoAway.TOO_SLOW))

    def test_failed_link_releases_its_control_frames(self) -> None:
        """A Proxy-Client failed TOO_SLOW for the OPENs queued toward it (forwarded whole, with
        fields of up to the 4 KiB the Gateway forwards) stops costing them at once: what it
        still holds is its GOAWAY, not the bound's worth of OPENs, uncounted by any budget,
        that the adapter would hand to its transport for the second before the abort; an OPEN
        padded past 4 KiB is refused, not forwarded."""
        limit = 70_000
        self.relay = Relay(RelayLimits(max_queued_bytes_per_link=limit,
                                       max_streams_per_link=100))
        client, server = self.pair()
        self.relay.feed(server, open_frame(1, fields=((0x40, b"p" * 65_000),)))
        (refused,) = self.relay.read_all(server)
        self.assertEqual(fr.parse_open_result(refused.payload)[0], Reason.LIMIT)
        padding = ((0x40, b"p" * 3_900),)
        for stream_id in range(3, 80, 2):
            self.relay.feed(server, open_frame(stream_id, fields=padding))
        self.assertEqual(self.relay.failed[-1][:2], (client, GoAway.TOO_SLOW))
        goaway = fr.build_goaway(GoAway.TOO_SLOW, self.relay.failed[-1][2])
        self.assertEqual(client.queued_bytes, len(goaway))
        self.assertEqual(sum(map(len, client.data_to_send(limit=0))), len(goaway))

    def test_lost_link_leaves_nothing_in_the_total_budget(self) -> None:
        """A link whose connection is lost with PONGs still unsent (its peer sent PINGs and
        did not read) leaves nothing counted in the total budget: nobody will ever drain it."""
        server = self.relay.login(1, ROLE_SERVER)
        self.relay.read_all(server)
        self.relay.feed(server, fr.build_ping(b"12345678") * 100)
        self.assertEqual(server.queued_bytes, 100 * len(fr.build_ping(b"12345678")))
        self.relay.close(server)
        self.assertEqual(self.relay.core.sessions[1].budget.queued, 0)
        self.assertEqual(self.relay.core.total.queued, 0)

    def test_pongs_count_toward_the_link_bound(self) -> None:
        """PONGs a peer provokes and does not read are held to maxQueuedBytesPerLink like
        every other queued frame: the link is failed TOO_SLOW once over it."""
        self.relay = Relay(RelayLimits(max_queued_bytes_per_link=2_000))
        server = self.relay.login(1, ROLE_SERVER)
        self.relay.read_all(server)
        self.relay.feed(server, fr.build_ping(b"12345678") * 200)  # 3,400 bytes of PONG
        self.assertTrue(server.detached)
        self.assertEqual(self.relay.failed[-1][:2], (server, GoAway.TOO_SLOW))

    def test_lost_link_resets_its_routes(self) -> None:
        """A Proxy-Server whose connection is lost: its routes are reset LINK_LOST toward the
        Proxy-Client, which is told PARTNER 0, and its queues stop counting."""
        client, server = self.pair()
        cid = self.route(client, server)
        self.relay.feed(client, data(cid, b"w" * 10_000))
        self.relay.close(server)
        frames = self.relay.read_all(client)
        self.assertEqual([(f.type, f.stream_id) for f in frames],
                         [(FrameType.RESET, cid), (FrameType.PARTNER, 0)])
        self.assertEqual(fr.parse_partner(frames[1].payload), 0)
        self.assertEqual(client.routes, {})
        self.assertEqual(self.relay.core.total.queued, 0)

    def test_open_violations_end_the_link(self) -> None:
        """An OPEN from the Proxy-Client, or with an id not above the last, closes the link
        with PROTOCOL_ERROR; a malformed OPEN is only refused."""
        client, server = self.pair()
        self.relay.feed(server, fr.encode(FrameType.OPEN, 5, b"\x00" * 4))
        (result,) = self.relay.read_all(server)
        self.assertEqual(fr.parse_open_result(result.payload)[0], Reason.PROTOCOL_ERROR)
        self.relay.feed(server, open_frame(5))
        self.assertEqual(self.relay.failed[-1][:2], (server, GoAway.PROTOCOL_ERROR))
        self.relay.feed(client, open_frame(1))
        self.assertEqual(self.relay.failed[-1][:2], (client, GoAway.PROTOCOL_ERROR))
        self.assertEqual(Counter(code for _, code, _ in self.relay.failed),
                         {GoAway.PROTOCOL_ERROR: 2})


class RelayRetireTests(SynchronousTestCase):
    """Regressions the draining rules of :class:`HostileRelay` found."""

    def test_retire_keeps_the_last_frames_of_an_ended_stream(self) -> None:
        """A link whose last stream ended with its final DATA and FIN still queued toward it
        is not closed at once when retired (closing drops the queue: the proxy would see its
        clean end as a reset): it is told GOAWAY DRAINING, those frames follow, and it is
        closed with DRAINING once they were written."""
        relay = DrainingRelay()
        client = relay.login(1, ROLE_CLIENT)
        server = relay.login(1, ROLE_SERVER)
        relay.read_all(client)
        relay.read_all(server)
        relay.feed(server, open_frame(1))
        (opened,) = of_type(relay.read_all(client), FrameType.OPEN)
        relay.feed(client, fr.build_open_result(opened.stream_id, Reason.OK, 100_000))
        relay.read_all(server)
        relay.feed(server, fr.build_fin(1))
        relay.feed(client, data(opened.stream_id, b"last") + fr.build_fin(opened.stream_id))
        self.assertEqual(server.routes, {})  # FIN both ways: the route ended
        relay.core.retire(server, "draining")
        relay.effects()
        self.assertEqual(relay.failed, [])
        # One write of everything queued; DrainingRelay.read then checks it, as
        # GatewayLink.resumeProducing does after a write.
        frames = relay.read(server)
        self.assertEqual([f.type for f in frames],
                         [FrameType.GOAWAY, FrameType.DATA, FrameType.FIN])
        self.assertEqual(fr.parse_goaway(frames[0].payload), (GoAway.DRAINING, "draining"))
        self.assertEqual(frames[1].payload, b"last")
        self.assertEqual([(link, code) for link, code, _message in relay.failed],
                         [(server, GoAway.DRAINING)])
        (closing,) = relay.read_all(server)
        self.assertEqual(fr.parse_goaway(closing.payload)[0], GoAway.DRAINING)

    def test_retired_link_at_its_bound_keeps_its_streams(self) -> None:
        """A retired Proxy-Server two bytes below its byte bound, pushed past it by its own
        GOAWAY DRAINING (which the relay queues without a check), is not closed TOO_SLOW by
        its next frame (a WINDOW_UPDATE of its running stream): the stream keeps flowing.
        Before, every read of such a link failed it, resetting its streams."""
        limits = RelayLimits(max_queued_bytes_per_link=200_000)
        relay = DrainingRelay(limits)
        client = relay.login(1, ROLE_CLIENT)
        server = relay.login(1, ROLE_SERVER)
        relay.read_all(client)
        relay.read_all(server)
        relay.feed(server, open_frame(1, fr.MAX_WINDOW))
        (opened,) = of_type(relay.read_all(client), FrameType.OPEN)
        relay.feed(client, fr.build_open_result(opened.stream_id, Reason.OK, fr.MAX_WINDOW))
        relay.read_all(server)
        for size in (fr.MAX_PAYLOAD, fr.MAX_PAYLOAD, fr.MAX_PAYLOAD):
            relay.feed(client, data(opened.stream_id, b"x" * size))
        # A DATA frame costs its payload, its 9-byte header and FRAME_COST (84) bytes.
        last = limits.max_queued_bytes_per_link - server.queued_bytes - 2 - 9 - 84
        relay.feed(client, data(opened.stream_id, b"y" * last))
        self.assertEqual(server.queued_bytes, limits.max_queued_bytes_per_link - 2)
        relay.core.retire(server, "draining")
        relay.effects()
        self.assertGreater(server.queued_bytes, limits.max_queued_bytes_per_link)
        relay.feed(server, fr.build_window_update(1, 1000))
        self.assertEqual(relay.failed, [])
        self.assertIn(1, server.routes)
        relay.feed(server, data(1, b"up"))
        self.assertEqual([(f.type, f.payload) for f in relay.read_all(client)],
                         [(FrameType.WINDOW_UPDATE, (1000).to_bytes(4, "big")),
                          (FrameType.DATA, b"up")])


# -- the state machine -------------------------------------------------------

class DrainingRelay(Relay):
    """A Relay that also calls ``check_drained`` where gateway.py does: after each read of a
    link, before the effects (GatewayLink.handle_events); after each write to it
    (resumeProducing: here the ``read`` rule, a transport that takes a batch); and on each
    link that got something new, once the adapter flushed it (Gateway.apply_effects, in its
    loop until nothing more is failed or dirty).  The adapter's flush takes nothing here:
    the transport is taken to be paused until a ``read`` rule says otherwise."""

    def after_read(self, link: RelayLink) -> None:
        """GatewayLink.handle_events: the drained check of ``link``, then the effects."""
        self.core.check_drained(link)
        self.effects()

    def read(self, link: RelayLink, limit: int = 256 * 1024) -> list[Frame]:
        """As Relay's, then the drained check of ``link`` (it may have written its last)."""
        frames = super().read(link, limit)
        self.core.check_drained(link)
        self.effects()
        return frames

    def effects(self) -> None:
        """Gateway.apply_effects: the failed links closed, each dirty link flushed (nothing
        taken) and checked, until a round fails nothing and dirties nothing (a closed link's
        PARTNER 0 and RESETs dirty its partners, whose check may close them in turn)."""
        core = self.core
        while True:
            self.ended.extend(core.take_ended())
            failed = core.take_failed()
            for item in failed:
                self.failed.append(item)
                self.gone.add(item[0])
            dirty = core.take_dirty()
            for link in dirty:
                core.check_drained(link)
            if not failed and not dirty:
                return


# Small bounds, so that a few steps reach each of them: a link's bound is three full DATA
# frames, a session's bound two busy links, the instance's both sessions busy.
MACHINE_LIMITS = RelayLimits(
    max_links_per_session=4, max_streams_per_link=6, max_queued_bytes_per_link=200_000,
    max_queued_bytes_per_session=300_000, max_queued_bytes=420_000, max_control_frames=24)
# What the model's retirements say in their GOAWAY DRAINING (check_drained's closing one
# says something else: a GOAWAY with this text is the announcement, frames may follow it).
RETIRE_MESSAGE = "the Gateway is draining"
TAG = struct.Struct(">HI")  # DATA payloads name their sender: (link number, stream id)
windows = st.one_of(st.sampled_from([0, 1, fr.EARLY_WINDOW - 1, fr.EARLY_WINDOW, 70_000,
                                     fr.MAX_WINDOW - 1, fr.MAX_WINDOW, 2**31, 2**32 - 1]),
                    st.integers(0, 2**32 - 1))
sizes = st.sampled_from([0, 1, 7, 1000, fr.EARLY_WINDOW, fr.EARLY_WINDOW + 1, 40_000,
                         fr.MAX_PAYLOAD])
reasons = st.sampled_from([*Reason, 200])
# Weighted toward frames that keep the link up, so that runs get far enough to reach bounds;
# the ones that end a link (before login, or malformed link-level frames) still come often.
frame_kinds = st.sampled_from(["data", "data", "data", "window", "window", "open", "result",
                               "fin", "reset", "ping", "ping", "partner", "goaway", "hello",
                               "auth", "raw"])
good_windows = st.one_of(st.just(fr.MAX_WINDOW), st.integers(fr.EARLY_WINDOW, fr.MAX_WINDOW),
                         windows)


class HostileRelay(RuleBasedStateMachine):
    """Two sessions, up to three hostile links in each (plus unauthenticated ones), doing
    anything in any order: arbitrary frames, well-formed streams with arbitrary windows,
    partial reads, failures, losses, new logins, Proxy-Client replacement, and draining
    (links retired one by one or all at once, the drain deadline)."""

    def __init__(self) -> None:
        super().__init__()
        self.relay = DrainingRelay(MACHINE_LIMITS, sessions=(1, 2))
        # Retired links: the routes they had and, on a Proxy-Client link, the first stream
        # id the Gateway had not yet used, when they were retired.
        self.retired: dict[RelayLink, tuple[frozenset[Route], int]] = {}
        # Retired links told GOAWAY DRAINING while they stay open (they had streams), and
        # those whose (first) DRAINING was read: frames may follow that one.
        self.announced: set[RelayLink] = set()
        self.announcement_read: set[RelayLink] = set()
        self.draining = False  # Gateway.drain ran: proven logins are told DRAINING
        self.deadline_passed = False
        self.refused_logins = 0
        self.links: list[RelayLink] = []
        self.numbers: dict[RelayLink, int] = {}
        self.opened: dict[RelayLink, set[int]] = {}  # ids a link sent OPEN on
        self.after_goaway: set[RelayLink] = set()  # links whose GOAWAY was read
        self.last: dict[RelayLink, Frame] = {}

    # -- helpers --------------------------------------------------------------

    def live(self) -> list[RelayLink]:
        return [link for link in self.links if link not in self.relay.gone
                and not link.detached]

    def routed(self) -> list[tuple[RelayLink, int]]:
        return [(link, stream_id) for link in self.live() for stream_id in sorted(link.routes)]

    def payload(self, link: RelayLink, stream_id: int, size: int) -> bytes:
        tag = TAG.pack(self.numbers[link], stream_id)
        return (tag * (size // len(tag) + 1))[:size]

    def frame(self, data: st.DataObject, link: RelayLink) -> bytes:
        """One hostile frame from ``link``: any type, on a stream id of its own routes, just
        above the last it opened, or anything."""
        draw = data.draw
        own = sorted(link.routes) or [1]
        stream_id = draw(st.one_of(st.sampled_from(own), st.sampled_from(own),
                                   st.integers(link.last_opened + 1, link.last_opened + 3),
                                   st.sampled_from([0, 1, 2, fr.STREAM_ID_MASK]) if
                                   draw(st.integers(0, 4)) == 0 else st.just(1),
                                   st.integers(0, 2**32 - 1)))
        wire_id = stream_id & fr.STREAM_ID_MASK
        kind = draw(frame_kinds)
        if kind == "open":
            self.opened.setdefault(link, set()).add(wire_id)
            fields = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=8)),
                                   max_size=3))
            payload = fr.open_payload(draw(windows), draw(st.integers(0, 2**32 - 1)),
                                      draw(st.integers(0, 255)), fields)
            cut = draw(st.sampled_from([len(payload), len(payload), 8, 3, 0]))
            return fr.encode(FrameType.OPEN, stream_id, payload[:cut])
        if kind == "result":
            return fr.encode(FrameType.OPEN_RESULT, stream_id, struct.pack(
                ">BI", draw(reasons), draw(windows)) + draw(st.binary(max_size=20)))
        if kind == "data":
            return fr.encode(FrameType.DATA, stream_id,
                             self.payload(link, wire_id, draw(sizes)), draw(st.integers(0, 255)))
        if kind == "window":
            return fr.encode(FrameType.WINDOW_UPDATE, stream_id,
                             draw(windows).to_bytes(4, "big")[:draw(st.sampled_from([4, 4, 3]))])
        if kind == "fin":
            return fr.encode(FrameType.FIN, stream_id, draw(st.binary(max_size=2)))
        if kind == "reset":
            return fr.encode(FrameType.RESET, stream_id, draw(st.binary(max_size=12)))
        if kind == "ping":
            return fr.encode(draw(st.sampled_from([FrameType.PING, FrameType.PONG])),
                             draw(st.sampled_from([0, 0, stream_id])),
                             draw(st.sampled_from([b"12345678", b"", b"123456789"])))
        if kind == "partner":
            return fr.encode(FrameType.PARTNER, 0, draw(st.binary(max_size=5)))
        if kind == "goaway":
            return fr.encode(FrameType.GOAWAY, 0, draw(st.binary(max_size=6)))
        if kind == "hello":
            return fr.encode(FrameType.HELLO, 0, b"\x00\x02")
        if kind == "auth":
            return fr.encode(draw(st.sampled_from([0x10, 0x11, 0x12, 0x13])), 0,
                             draw(st.binary(max_size=8)))
        frame_type = draw(st.integers(0, 255))
        if frame_type == FrameType.OPEN:
            self.opened.setdefault(link, set()).add(wire_id)
        payload = (self.payload(link, wire_id, draw(sizes)) if frame_type == FrameType.DATA
                   else draw(st.binary(max_size=16)))
        return fr.encode(frame_type, stream_id, payload, draw(st.integers(0, 255)))

    # -- rules ------------------------------------------------------------------

    @precondition(lambda self: len(self.live()) < 9 and self.refused_logins < 3)
    @rule(session_id=st.sampled_from([1, 2]),
          role=st.sampled_from([ROLE_CLIENT, ROLE_SERVER, ROLE_SERVER, ROLE_SERVER, None]))
    def log_in(self, session_id: int, role: int | None) -> None:
        """A new link: a proven login as either role (a Proxy-Client replaces the session's
        last), or one that stays unauthenticated; while the Gateway drains, a proven login
        is told DRAINING and closed (GatewayLink._login_ok), and changes nothing else."""
        session = self.relay.core.sessions[session_id]
        if self.draining and role is not None:
            self.refused_logins += 1  # (a few: the other rules get the steps)
            before = {link: dict(link.routes) for link in self.live()}
            link = self.relay.new_link()
            self.links.append(link)
            self.numbers[link] = len(self.links)
            self.relay.core.fail(link, GoAway.DRAINING, "the Gateway is draining: log in to "
                                 "another")
            self.relay.effects()
            assert {link: dict(link.routes) for link in self.live()} == before
            return
        if role == ROLE_SERVER and (len(session.servers) >= 3
                                    or self.relay.core.refusal(session_id, role) is not None):
            return  # the adapter closes it with LIMIT before it reaches the relay
        link = self.relay.new_link() if role is None else self.relay.login(session_id, role)
        self.links.append(link)
        self.numbers[link] = len(self.links)

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def hostile_frames(self, data: st.DataObject) -> None:
        """A burst of arbitrary frames from one link, in one read."""
        link = data.draw(st.sampled_from(self.live()))
        frames = [self.frame(data, link) for _ in range(data.draw(st.integers(1, 4)))]
        self.relay.feed(link, b"".join(frames))

    @precondition(lambda self: len(self.live()) < 8)
    @rule(session_id=st.sampled_from([1, 2]), data=st.data())
    def busy_stream(self, session_id: int, data: st.DataObject) -> None:
        """A stream accepted with the largest windows both ways, between a Proxy-Server and
        the Proxy-Client of a session (logged in first where missing): the way to the
        queue bounds."""
        session = self.relay.core.sessions[session_id]
        if session.client is None:
            self.log_in(session_id, ROLE_CLIENT)
        if not session.servers:
            self.log_in(session_id, ROLE_SERVER)
        client = session.client
        if client is None or not session.servers:
            return  # the Gateway drains: no new logins
        server = data.draw(st.sampled_from(list(session.servers.values())))
        stream_id = server.last_opened + 1
        self.opened.setdefault(server, set()).add(stream_id)
        self.relay.feed(server, open_frame(stream_id, fr.MAX_WINDOW))
        route = server.routes.get(stream_id)
        if route is not None and not client.detached:
            self.relay.feed(client, fr.build_open_result(route.client_stream, Reason.OK,
                                                         fr.MAX_WINDOW))

    @precondition(lambda self: any(link.role == ROLE_SERVER for link in self.live()))
    @rule(data=st.data(), window=good_windows)
    def open_stream(self, data: st.DataObject, window: int) -> None:
        """A well-formed OPEN; one refused LIMIT must be above the fair share."""
        server = data.draw(st.sampled_from([link for link in self.live()
                                            if link.role == ROLE_SERVER]))
        stream_id = server.last_opened + data.draw(st.integers(1, 3))
        session = server.session
        assert session is not None
        client = session.client
        used = Counter(route.server for route in client.routes.values()) if client else None
        # OPENs this Proxy-Server sent since the Proxy-Client last took its control frames,
        # and how many the relay allows it (a refusal beyond that is right too).
        toward, epoch, count = server.opens_undrained
        undrained = count if client is not None and toward is client and (
            epoch == client.drains) else 0
        allowance = max(8, MACHINE_LIMITS.max_control_frames
                        // (4 * max(1, len(session.servers))))
        stats = self.relay.core.stats
        key = ("streams_refused", session.id, Reason.LIMIT.name)
        before = stats[key]
        shutdown = ("streams_refused", session.id, Reason.SHUTDOWN.name)
        shutdown_before = stats[shutdown]
        # (A window out of range is refused first, FLOW_CONTROL, uncounted; and a link
        # already holding more unsent control frames than the cap, such as the refusals of
        # its earlier OPENs, is closed TOO_SLOW by the read before the OPEN is looked at.)
        draining = (client is not None and (server.retiring or client.retiring)
                    and 0 < window <= fr.MAX_WINDOW and stream_id <= fr.STREAM_ID_MASK
                    and len(server._control) <= server.max_control_frames)
        self.opened.setdefault(server, set()).add(stream_id)
        failed = len(self.relay.failed)
        self.relay.feed(server, open_frame(stream_id, window))
        # A well-formed OPEN on or toward a retiring link is refused SHUTDOWN, and only such.
        assert stats[shutdown] - shutdown_before == (1 if draining else 0), (
            draining, stats[shutdown] - shutdown_before, self.relay.failed[failed:],
            server.queued_bytes, stream_id, server.last_opened)
        assert not (draining and stream_id in server.routes), "a route on a retiring link"
        if stats[key] > before:
            assert client is not None and used is not None
            capacity = MACHINE_LIMITS.max_streams_per_link
            share = capacity // max(1, len(session.servers))
            assert (len(server.routes) >= capacity or len(client.routes) >= capacity
                    or used[server] >= share or undrained >= allowance), (
                len(server.routes), len(client.routes), used[server], share, undrained)

    @precondition(lambda self: bool(self.routed()))
    @rule(data=st.data(), window=good_windows, reason=reasons)
    def answer_open(self, data: st.DataObject, window: int, reason: int) -> None:
        """The Proxy-Client answers an OPEN: mostly OK with an arbitrary window."""
        link, stream_id = data.draw(st.sampled_from(self.routed()))
        if data.draw(st.booleans()):
            reason = Reason.OK
        self.relay.feed(link, fr.encode(FrameType.OPEN_RESULT, stream_id,
                                        struct.pack(">BI", reason, window)))

    @precondition(lambda self: bool(self.routed()))
    @rule(data=st.data(), size=sizes, count=st.integers(1, 4))
    def send_data(self, data: st.DataObject, size: int, count: int) -> None:
        """DATA on a route from either end, within or beyond its window."""
        link, stream_id = data.draw(st.sampled_from(self.routed()))
        frame = fr.encode(FrameType.DATA, stream_id, self.payload(link, stream_id, size))
        self.relay.feed(link, frame * count)

    @precondition(lambda self: bool(self.routed()))
    @rule(data=st.data(), count=st.integers(1, 3))
    def flood(self, data: st.DataObject, count: int) -> None:
        """Full DATA frames on a route, as fast as the window lets (or not)."""
        link, stream_id = data.draw(st.sampled_from(self.routed()))
        frame = fr.encode(FrameType.DATA, stream_id,
                          self.payload(link, stream_id, fr.MAX_PAYLOAD))
        self.relay.feed(link, frame * count)

    @precondition(lambda self: bool(self.routed()))
    @rule(data=st.data(), increment=good_windows)
    def grant(self, data: st.DataObject, increment: int) -> None:
        """WINDOW_UPDATE on a route, up to 2^31-1 (or beyond)."""
        link, stream_id = data.draw(st.sampled_from(self.routed()))
        self.relay.feed(link, fr.encode(FrameType.WINDOW_UPDATE, stream_id,
                                        increment.to_bytes(4, "big")))

    @precondition(lambda self: bool(self.routed()))
    @rule(data=st.data(), reset=st.booleans())
    def end_stream(self, data: st.DataObject, reset: bool) -> None:
        """FIN or RESET on a route from either end."""
        link, stream_id = data.draw(st.sampled_from(self.routed()))
        self.relay.feed(link, fr.build_reset(stream_id, Reason.CANCELLED, "x") if reset
                        else fr.build_fin(stream_id))

    @precondition(lambda self: bool(self.links))
    @rule(data=st.data(), limit=st.sampled_from([0, 1, 100, 40_000, 256 * 1024]))
    def read(self, data: st.DataObject, limit: int) -> None:
        """One link's transport takes one batch (any link, failed ones included)."""
        link = data.draw(st.sampled_from(self.links))
        detached = link.detached  # the read's drained check may close it after the write
        self.check_sent(link, self.relay.read(link, limit), detached)

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data(), code=st.sampled_from(list(GoAway)), lost=st.booleans())
    def end_link(self, data: st.DataObject, code: GoAway, lost: bool) -> None:
        """A link is lost, or closed by the Gateway for some reason of its own."""
        link = data.draw(st.sampled_from(self.live()))
        if lost:
            self.relay.close(link)
        else:
            self.relay.core.fail(link, code, "closed by the test")
            self.relay.effects()

    def retire(self, links: list[RelayLink]) -> None:
        """RelayCore.retire of each of ``links`` and then the effects, as Gateway.drain does
        it; remembering what each carried then, and checking that nothing else changed:
        no other link is closed or loses or gains a route (a link closed at once for want
        of streams tells its partners PARTNER, nothing more)."""
        core = self.relay.core
        targets = [link for link in links if link.role is not None and not link.detached
                   and not link.retiring]
        others = {link: dict(link.routes) for link in self.live() if link not in targets}
        # What each carries: streams, or the last frames of ended ones (a DATA and the FIN
        # that closed a route wait toward it after the route left the tables).
        busy = {link: bool(link.routes or link.stream_frames_queued) for link in targets}
        for link in targets:
            self.retired[link] = (frozenset(link.routes.values()), link.next_stream_id)
            if busy[link]:
                self.announced.add(link)
            core.retire(link, RETIRE_MESSAGE)
        self.relay.effects()
        for link in targets:
            assert link.retiring
            # Closed at once exactly when it carried nothing: closing drops what is queued.
            assert link.detached == (not busy[link]), ("retired", busy[link], link.detached)
        for link, routes in others.items():
            assert not link.detached, "retiring one link closed another"
            assert link.routes == routes, "retiring one link changed another's streams"

    @precondition(lambda self: any(link.role is not None for link in self.live()))
    @rule(data=st.data())
    def retire_link(self, data: st.DataObject) -> None:
        """GOAWAY DRAINING to one logged-in link, mostly one with streams (retiring one
        again is a no-op)."""
        logged_in = [link for link in self.live() if link.role is not None]
        busy = [link for link in logged_in if link.routes]
        prefer_busy: bool = bool(busy) and data.draw(st.booleans())
        self.retire([data.draw(st.sampled_from(busy if prefer_busy else logged_in))])

    @precondition(lambda self: any(link.role is not None for link in self.live()))
    @rule(session_id=st.sampled_from([1, 2]))
    def retire_session(self, session_id: int) -> None:
        """GOAWAY DRAINING to every link of one session; the other session is unaffected."""
        self.retire(self.relay.core.sessions[session_id].all_links())

    @precondition(lambda self: not self.draining)
    @rule()
    def drain(self) -> None:
        """The Gateway drains (Gateway.drain): every logged-in link is retired at once, oldest
        first, and from now on a proven login is told DRAINING (``log_in``)."""
        self.draining = True
        self.retire(list(self.live()))

    @precondition(lambda self: self.draining and not self.deadline_passed)
    @rule()
    def drain_deadline(self) -> None:
        """drainTimeout passed (Gateway._drain_deadline): every session's links are detached,
        their streams reset SHUTDOWN toward the other end, the effects applied, then each
        still open is closed with GOAWAY DRAINING."""
        self.deadline_passed = True
        relay, core = self.relay, self.relay.core
        message = "the Gateway's drain deadline (60 s) passed"
        for session in core.sessions.values():
            links = session.all_links()
            if not links:
                continue
            ended = len(relay.ended)
            for link in links:
                assert link.retiring, "a logged-in link of a draining Gateway not retiring"
                core.detach(link, Reason.SHUTDOWN, message)
            relay.effects()
            assert {item.reason for item in relay.ended[ended:]} <= {Reason.SHUTDOWN.name}
            for link in links:
                if link not in relay.gone:  # GatewayLink.fail: once closing, no second GOAWAY
                    link.go_away(GoAway.DRAINING, message)
                    relay.failed.append((link, GoAway.DRAINING, message))
                    relay.gone.add(link)
        for link in self.links:
            assert link.role is None or link.detached, "a link left after the drain deadline"

    def draining_routes(self) -> list[tuple[RelayLink, int]]:
        """(link, stream id) of each end of each route with a retiring end."""
        return [(link, stream_id) for link, stream_id in self.routed()
                if link.routes[stream_id].server.retiring
                or link.routes[stream_id].client.retiring]

    @precondition(lambda self: bool(self.draining_routes()))
    @rule(data=st.data(), count=st.integers(1, 4))
    def draining_streams_flow(self, data: st.DataObject, count: int) -> None:
        """A few frames the stream rules allow (DATA within the window, FIN, WINDOW_UPDATE),
        each on a stream of a retiring link from either end, each forwarded as on any link:
        DATA and FIN queued toward the other end, credit passed on; the route stays until
        FIN went both ways (draining changes nothing for running streams)."""
        for _ in range(count):
            self.draining_stream_frame(data, data.draw(st.sampled_from(
                [1, 1000, fr.MAX_PAYLOAD])))

    def draining_stream_frame(self, data: st.DataObject, size: int) -> None:
        """One allowed frame on a stream of a retiring link (see draining_streams_flow)."""
        allowed: list[tuple[RelayLink, int, str]] = []
        for link, stream_id in self.draining_routes():
            route = link.routes[stream_id]
            from_server = link is route.server
            towards_other = route.to_client if from_server else route.to_server
            towards_link = route.to_server if from_server else route.to_client
            if towards_link.credit < fr.MAX_WINDOW:
                allowed.append((link, stream_id, "window"))
            for kind, event in (("data", StreamEvent.SEND_DATA if from_server
                                 else StreamEvent.RECV_DATA),
                                ("fin", StreamEvent.SEND_FIN if from_server
                                 else StreamEvent.RECV_FIN)):
                try:
                    advance(route.state, event)
                except StreamError:
                    continue  # not allowed in this state: the rules' business, not draining's
                if not towards_other.fin and (kind == "fin" or towards_other.credit > 0):
                    allowed.append((link, stream_id, kind))
        if not allowed:
            return
        link, stream_id, frame_kind = data.draw(st.sampled_from(allowed))
        route = link.routes[stream_id]
        from_server = link is route.server
        other, other_id = ((route.client, route.client_stream) if from_server
                           else (route.server, route.server_stream))
        towards_other = route.to_client if from_server else route.to_server
        towards_link = route.to_server if from_server else route.to_client
        if frame_kind == "window":
            frame = fr.build_window_update(stream_id,
                                           min(size, fr.MAX_WINDOW - towards_link.credit))
        elif frame_kind == "data":
            frame = fr.encode(FrameType.DATA, stream_id, self.payload(
                link, stream_id, min(size, towards_other.credit)))
        else:
            frame = fr.build_fin(stream_id)
        failed = len(self.relay.failed)
        self.relay.feed(link, frame)
        if any(item[0] in (link, other) and item[1] is not GoAway.DRAINING
               for item in self.relay.failed[failed:]):
            return  # a queue bound closed one end (bounds_hold says it was right)
        if frame_kind == "window":
            assert other_id in other._updates, "credit not passed on"
        else:
            assert other.has_queued(other_id), "a stream frame of a draining link not forwarded"
        if route.state is StreamState.CLOSED:
            assert stream_id not in link.routes
        else:
            assert link.routes.get(stream_id) is route, "a draining link's stream was dropped"

    # -- checks -----------------------------------------------------------------

    def check_sent(self, link: RelayLink, frames: list[Frame],
                   detached: bool | None = None) -> None:
        """What a link sends names only its own streams, DATA comes from the route's other
        end in the same session, nothing follows GOAWAY (but a retired link's first GOAWAY
        DRAINING, which keeps it open: its streams' frames follow, and PARTNER, PONG), a
        detached link sends no stream content (its queues and pending credit were dropped),
        and no OPEN goes toward a link after it was retired."""
        if frames:
            self.last[link] = frames[-1]
        for frame in frames:
            assert link not in self.after_goaway, ("frame after GOAWAY", frame)
            if frame.type == FrameType.GOAWAY:
                if (link in self.announced and link not in self.announcement_read
                        and fr.parse_goaway(frame.payload) == (GoAway.DRAINING,
                                                               RETIRE_MESSAGE)):
                    self.announcement_read.add(link)
                else:
                    self.after_goaway.add(link)
            if frame.stream_id == 0:
                continue
            assert frame.type in fr.STREAM_FRAME_TYPES, frame
            if link.detached if detached is None else detached:
                assert frame.type not in (FrameType.DATA, FrameType.FIN,
                                          FrameType.WINDOW_UPDATE), ("sent after detach", frame)
            if frame.type == FrameType.OPEN and link in self.retired:
                assert frame.stream_id < self.retired[link][1], ("OPEN toward a retiring link",
                                                                 frame)
            known = (link, frame.stream_id) in self.relay.partners
            assert (known or frame.stream_id in self.opened.get(link, set())
                    or (link.role == ROLE_CLIENT and frame.stream_id < link.next_stream_id)), (
                        "a frame on a stream this link never had", frame)
            if frame.type == FrameType.DATA and len(frame.payload) >= TAG.size:
                number, stream_id = TAG.unpack_from(frame.payload)
                sender = self.links[number - 1]
                assert (sender, stream_id) in self.relay.partners.get(
                    (link, frame.stream_id), set()), ("DATA from elsewhere", frame)
                assert sender.session is link.session

    @invariant()
    def bounds_hold(self) -> None:
        """Queued bytes per link, per session and in total stay within their bounds plus one
        largest frame, and every budget is exactly the sum of its links' queues.

        The slack: the relay checks a bound after queueing, so a frame may take a link (its
        session, the Gateway) past it for the time of one call; at a step's end the bound
        holds again, but for the few control frames the relay makes without a check (PARTNER
        on logins, RESETs for a lost link's routes, PONGs), which their own caps bound."""
        core = self.relay.core
        limits = MACHINE_LIMITS
        for link in self.links:
            assert link.queued_bytes >= 0
            if not link.detached:
                assert link.queued_bytes <= limits.max_queued_bytes_per_link + LARGEST_FRAME, (
                    link.role_name, link.queued_bytes)
        for session in core.sessions.values():
            members = session.all_links()
            assert session.budget.queued == sum(link.queued_bytes for link in members)
            assert session.budget.queued <= limits.max_queued_bytes_per_session + LARGEST_FRAME
        # A detached link counts in no budget (what it still has to send goes with its socket).
        assert core.total.queued == sum(link.queued_bytes for link in self.links
                                        if not link.detached)
        assert core.total.queued <= limits.max_queued_bytes + LARGEST_FRAME

    @invariant()
    def routes_symmetric(self) -> None:
        """Each route is in both links' tables under its own ids, both ends live links of the
        same session: a Proxy-Server and that session's Proxy-Client."""
        core = self.relay.core
        for link in self.links:
            for stream_id, route in link.routes.items():
                assert not route.server.detached and not route.client.detached
                assert route.server.routes.get(route.server_stream) is route
                assert route.client.routes.get(route.client_stream) is route
                assert stream_id == (route.server_stream if link is route.server
                                     else route.client_stream)
                session = route.server.session
                assert session is not None and route.client.session is session
                assert session.client is route.client
                assert session.servers.get(route.server.number) is route.server
                assert session.id in core.sessions

    @invariant()
    def ended_routes_reported_once(self) -> None:
        """Every route that left the tables was reported ended exactly once, none that is
        still in them was; and a route knows a target only if its kind is tcp or udp."""
        relay = self.relay
        ended = [item.route for item in relay.ended]
        assert len(ended) == len(set(ended)), "a route ended twice"
        live = {route for link in self.links for route in link.routes.values()}
        assert not live & set(ended), "a live route reported ended"
        assert relay.seen_routes - live <= set(ended), "a route left without an end"
        for route in relay.seen_routes:
            assert route.target is None or route.kind in CLEAR_KINDS, route.kind

    @invariant()
    def retiring_links_take_no_new_streams(self) -> None:
        """A retiring link carries only routes it had when it was retired: no OPEN on it or
        toward it made a route."""
        for link, (routes, _next_id) in self.retired.items():
            assert link.retiring
            assert set(link.routes.values()) <= routes, "a new stream on a retiring link"

    @invariant()
    def drained_links_close(self) -> None:
        """A retiring link still open carries a stream or has stream frames queued toward it
        (its last DATA or FIN): once both are gone, the adapter's next check closed it."""
        for link in self.links:
            if link.retiring and not link.detached:
                assert link.routes or link.stream_frames_queued, "a drained link left open"

    @invariant()
    def detached_links_hold_no_routes(self) -> None:
        """A detached link has no routes, is in no session, and the relay no longer lists it."""
        core = self.relay.core
        for link in self.links:
            if not link.detached:
                assert link in core.links
                continue
            assert link.routes == {}
            assert link not in core.links
            session = link.session
            if session is not None:
                assert link is not session.client
                assert link not in session.servers.values()

    def teardown(self) -> None:
        """Every link failed: no route is left, every budget is 0, and each failed link's
        last frame is its GOAWAY with the code it was failed with (unless its proxy had sent
        GOAWAY first: then the Gateway says nothing more)."""
        core = self.relay.core
        for link in self.live():
            core.fail(link, GoAway.NORMAL, "teardown")
        self.relay.effects()
        for link in self.links:
            assert link.routes == {}
        self.ended_routes_reported_once()
        for session in core.sessions.values():
            assert session.budget.queued == 0
            assert session.links == 0
        assert core.total.queued == 0
        assert core.links == set()
        codes: dict[RelayLink, GoAway] = {}
        for link, code, _message in self.relay.failed:
            codes.setdefault(link, code)
        for link in self.links:
            self.check_sent(link, self.relay.read_all(link))
            assert not link.wants_to_send
        for link, code in codes.items():
            if link in self.relay.peer_goaway:
                continue
            last = self.last.get(link)
            assert last is not None and last.type == FrameType.GOAWAY, last
            assert fr.parse_goaway(last.payload)[0] == code, (last, code)


class HostileRelayTests(SynchronousTestCase):
    """Hypothesis drives :class:`HostileRelay`."""

    def test_hostile_links(self) -> None:
        """Whatever two sessions' links send, read or suffer, the relay keeps its bounds,
        symmetric routes within one session, and ends every route; and whatever is retired
        or drained when, a retired link takes no new stream, carries its running ones both
        ways and is closed once they ended and their last frames were written, or at the
        drain deadline, leaving the other links alone."""
        run_state_machine_as_test(HostileRelay, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
