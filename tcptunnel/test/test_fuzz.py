"""Property-based fuzzing of the mux state machine with hostile frame sequences.

``make test`` runs a bounded number of examples; ``make fuzz`` runs many more
(TCPTUNNEL_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import contextlib
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _frames as fr
from tcptunnel import _mux
from tcptunnel._frames import FrameType, LinkError

EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "150"))

stream_ids = st.integers(min_value=0, max_value=6)
payloads = st.binary(max_size=300)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame: well-formed ones of every type, or arbitrary type/flags/payload."""
    sid = draw(stream_ids)
    kind = draw(st.sampled_from(["open", "result", "data", "window", "fin", "reset", "ping",
                                 "partner", "goaway", "raw", "auth"]))
    if kind == "open":
        host = draw(st.sampled_from(["h", "example.org", "", "a b", "x" * 260]))
        port = draw(st.integers(min_value=0, max_value=70000))
        window = draw(st.integers(min_value=0, max_value=2**32 - 1))
        return fr.encode(FrameType.OPEN, sid, fr.open_payload(
            window, 0, draw(st.sampled_from([fr.KIND_TCP, fr.KIND_TCP, 7])),
            fr.target_fields(host, port % 65536)))
    if kind == "result":
        return fr.encode(FrameType.OPEN_RESULT, sid, bytes([draw(st.integers(0, 255))])
                         + draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big"))
    if kind == "data":
        return fr.encode(FrameType.DATA, sid, draw(payloads), draw(st.integers(0, 255)))
    if kind == "window":
        return fr.encode(FrameType.WINDOW_UPDATE, sid,
                         draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big"))
    if kind == "fin":
        return fr.build_fin(sid)
    if kind == "reset":
        return fr.encode(FrameType.RESET, sid, draw(payloads))
    if kind == "ping":
        return fr.encode(FrameType.PING, sid, draw(st.binary(min_size=0, max_size=10)))
    if kind == "partner":
        return fr.encode(FrameType.PARTNER, sid, draw(st.binary(max_size=6)))
    if kind == "goaway":
        return fr.encode(FrameType.GOAWAY, sid, draw(payloads))
    if kind == "auth":
        return fr.encode(draw(st.sampled_from([0x10, 0x11, 0x12, 0x13])), sid, draw(payloads))
    return fr.encode(draw(st.integers(0, 255)), sid, draw(payloads), draw(st.integers(0, 255)))


def check_invariants(test: SynchronousTestCase, core: _mux.MuxConnection) -> None:
    """What must hold whatever the peer sent."""
    test.assertLessEqual(len(core.streams), core.max_streams)
    test.assertEqual(core.granted_total, sum(s.recv_window for s in core.streams.values()))
    for stream in core.streams.values():
        test.assertGreaterEqual(stream.send_window, 0)
        test.assertLessEqual(stream.send_window, fr.MAX_WINDOW)
        test.assertGreaterEqual(stream.recv_available, 0)
        test.assertLessEqual(stream.recv_available, stream.recv_window)
        test.assertEqual(stream.send_buffered, sum(map(len, stream.send_buffer))
                         - stream.send_offset)


class MuxFuzzTests(SynchronousTestCase):
    """Hostile frame sequences: the core raises only LinkError and keeps its invariants."""

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(opener=st.booleans(), sequence=st.lists(frames(), max_size=40),
           splits=st.lists(st.integers(1, 50), max_size=20),
           local=st.lists(st.sampled_from(["open", "send", "consume", "end", "reset", "pull"]),
                          max_size=20))
    def test_hostile_sequences(self, opener: bool, sequence: list[bytes], splits: list[int],
                               local: list[str]) -> None:
        """Any frames, split anywhere, mixed with local actions: no crash, invariants hold."""
        core = _mux.MuxConnection(opener=opener, max_streams=4, initial_window=20_000,
                                  max_window=80_000, receive_budget=100_000)
        core.receive_data(fr.build_hello())
        core.mark_ready()
        data = b"".join(sequence)
        offset = 0
        actions = iter(local)
        try:
            for cut in [*splits, len(data)]:
                events = core.receive_data(data[offset : offset + cut])
                offset += cut
                for event in events:
                    if isinstance(event, _mux.StreamOpenRequested):
                        core.accept_stream(event.stream_id)
                    elif isinstance(event, _mux.DataReceived):
                        core.data_consumed(event.stream_id, len(event.data))
                action = next(actions, "pull")
                live = list(core.streams)
                if action == "open" and opener:
                    with contextlib.suppress(fr.StreamError):  # the stream limit
                        core.open_stream("target", 22)
                elif action == "send" and live:
                    stream = core.streams[live[0]]
                    if stream.state is not _mux.StreamState.OPENING:
                        core.send_data(live[0], b"z" * 5000)
                elif action == "end" and live:
                    core.end_stream(live[-1])
                elif action == "reset" and live:
                    core.reset_stream(live[0], fr.Reason.CANCELLED)
                core.data_to_send()
                check_invariants(self, core)
        except LinkError as e:
            self.assertIsInstance(e.code, fr.GoAway)
            self.assertTrue(e.message)


# Pieces SCRAM messages are made of, valid and hostile, so that generated messages get past
# the first checks often enough to reach the later ones.
_scram_pieces = st.sampled_from([
    "n", "y", "p=tls-unique", "", ",", "=", "==", "n=7:0", "n=7=2C0", "n==3D", "r=", "r=abc",
    "c=biws", "c=eSws", "c=", "p=", "p=AAAA", "p=" + "A" * 44, "s=", "s=AAAA", "s=!!", "i=1",
    "i=0", "i=-1", "i=4096", "i=x", "v=", "v=" + "A" * 44, "e=other-error", "m=ext", "a=admin",
    "\x00", "é",
])
scram_messages = st.one_of(
    st.lists(st.one_of(_scram_pieces, st.text(max_size=12)), max_size=8).map("".join),
    st.text(max_size=80),
)


class ScramFuzzTests(SynchronousTestCase):
    """Hostile SCRAM messages on either side fail with LoginFailed and nothing else: any
    other exception would escape the link's frame handler."""

    def setUp(self) -> None:
        from tcptunnel.auth import make_auth_info

        self.info = make_auth_info("pw", iterations=1)

    @settings(max_examples=EXAMPLES * 2, deadline=None)
    @given(client_first=scram_messages, client_final=scram_messages,
           prefix=st.booleans())
    def test_gateway_side(self, client_first: str, client_final: str, prefix: bool) -> None:
        """Any client-first, then any client-final (or one that starts like the real one)."""
        from tcptunnel.auth import GatewayAuth, LoginFailed, scram_username

        server = GatewayAuth(self.info, scram_username(7, 0), b"k" * 32, nonce="SRV")
        with contextlib.suppress(LoginFailed):
            server.challenge(client_first)
            if prefix:
                client_final = f"c=biws,r={client_first.rpartition('r=')[2]}SRV," + client_final
            server.finish(client_final)

    @settings(max_examples=EXAMPLES * 2, deadline=None)
    @given(nonce_suffix=st.text(max_size=10), salt=st.sampled_from(["AAAA", "", "!!", "QUJD"]),
           iterations=st.one_of(st.integers(-3, 3000).map(str), st.text(max_size=6)),
           extra=scram_messages, server_final=scram_messages)
    def test_proxy_side(self, nonce_suffix: str, salt: str, iterations: str, extra: str,
                        server_final: str) -> None:
        """Any server-first built around our nonce, then any server-final."""
        from tcptunnel.auth import LoginFailed, ProxyAuth

        client = ProxyAuth(7, 0, "pw", nonce="CLI")
        with contextlib.suppress(LoginFailed):
            client.proof(f"r=CLI{nonce_suffix},s={salt},i={iterations}{extra}")
        with contextlib.suppress(LoginFailed):
            client.verify(server_final)
