"""Tests for the frame codec (tcptunnel._frames)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _frames as fr
from tcptunnel._frames import FrameDecoder, FrameType, GoAway, LinkError, Reason, StreamError

FUZZ_EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "200"))


def sample_frames() -> list[bytes]:
    """One frame of every type."""
    return [
        fr.build_goaway(GoAway.REPLACED, "newer client"),
        fr.build_ping(b"12345678"),
        fr.build_ping(b"abcdefgh", pong=True),
        fr.build_partner(3),
        fr.build_auth_start(fr.ROLE_PROXY_SERVER, -5, "n,,n=x,r=abc"),
        fr.build_auth_message(FrameType.AUTH_CHALLENGE, "r=abc,s=QQ==,i=4096"),
        fr.build_auth_result(True, "v=xyz"),
        fr.build_open(7, fr.OpenRequest(393216, 2, "example.org", 22)),
        fr.build_open_result(7, Reason.DENIED, 0, "not allowed"),
        fr.encode(FrameType.DATA, 7, b"hello", fr.FLAG_BLOCKED),
        fr.build_window_update(7, 1000),
        fr.build_fin(7),
        fr.build_reset(7, Reason.CANCELLED, "bye"),
    ]


class CodecTests(SynchronousTestCase):
    """Encode / decode round trips and validation."""

    def test_round_trip_every_type(self) -> None:
        """Each frame type decodes to what was encoded."""
        stream = fr.build_hello() + b"".join(sample_frames())
        frames = FrameDecoder().feed(stream)
        self.assertEqual([f.type for f in frames],
                         [FrameType.HELLO] + [f[3] for f in sample_frames()])
        self.assertEqual(fr.parse_goaway(frames[1].payload), (GoAway.REPLACED, "newer client"))
        self.assertEqual(fr.parse_partner(frames[4].payload), 3)
        self.assertEqual(fr.parse_auth_start(frames[5].payload),
                         (fr.ROLE_PROXY_SERVER, -5, "n,,n=x,r=abc"))
        self.assertEqual(fr.parse_auth_result(frames[7].payload), (True, "v=xyz"))
        self.assertEqual(fr.parse_open(frames[8].payload),
                         fr.OpenRequest(393216, 2, "example.org", 22))
        self.assertEqual(frames[8].stream_id, 7)
        self.assertEqual(fr.parse_open_result(frames[9].payload),
                         (Reason.DENIED, 0, "not allowed"))
        self.assertEqual((frames[10].payload, frames[10].flags), (b"hello", fr.FLAG_BLOCKED))
        self.assertEqual(fr.parse_window_update(frames[11].payload), 1000)
        self.assertEqual(fr.parse_reset(frames[13].payload), (Reason.CANCELLED, "bye"))

    def test_byte_by_byte(self) -> None:
        """Feeding one byte at a time yields the same frames."""
        stream = fr.build_hello() + b"".join(sample_frames())
        whole = FrameDecoder().feed(stream)
        decoder = FrameDecoder()
        pieces = []
        for i in range(len(stream)):
            pieces.extend(decoder.feed(stream[i : i + 1]))
        self.assertEqual(pieces, whole)
        self.assertEqual(decoder.buffered, 0)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=64), max_size=200))
    def test_random_splits(self, cuts: list[int]) -> None:
        """Any split of the byte stream yields the same frames."""
        stream = fr.build_hello() + b"".join(sample_frames())
        whole = FrameDecoder().feed(stream)
        decoder = FrameDecoder()
        got, offset = [], 0
        for cut in cuts:
            got.extend(decoder.feed(stream[offset : offset + cut]))
            offset += cut
        got.extend(decoder.feed(stream[offset:]))
        self.assertEqual(got, whole)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=40_000), min_size=1, max_size=12),
           st.lists(st.integers(min_value=1, max_value=50_000), max_size=40))
    def test_large_frames_across_any_cuts(self, sizes: list[int], cuts: list[int]) -> None:
        """Frames of up to 40,000 bytes, cut anywhere (inside the magic, a header or a payload,
        or exactly at a frame's end), come out whole and in order, and ``buffered`` is always
        the bytes fed that are not yet part of a complete frame."""
        payloads = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
        encoded = [fr.encode(FrameType.DATA, 1 + n, payload) for n, payload in enumerate(payloads)]
        stream = fr.MAGIC + b"".join(encoded)
        ends = [len(fr.MAGIC)]
        for frame in encoded:
            ends.append(ends[-1] + len(frame))
        decoder = FrameDecoder()
        got: list[fr.Frame] = []
        offset = 0
        for cut in [*cuts, len(stream)]:
            got.extend(decoder.feed(stream[offset : offset + cut]))
            offset = min(offset + cut, len(stream))
            complete = max([end for end in ends if end <= offset], default=0)
            self.assertEqual(decoder.buffered, offset - complete)
            if offset == len(stream):
                break
        self.assertEqual([(f.stream_id, f.payload) for f in got],
                         [(1 + n, payload) for n, payload in enumerate(payloads)])

    def test_huge_length_refused_when_a_split_header_completes(self) -> None:
        """A header that arrives in pieces is checked as soon as its last byte arrives."""
        decoder = FrameDecoder(max_payload=fr.MAX_PAYLOAD_BEFORE_LOGIN)
        header = fr.encode_header(FrameType.DATA, 0, 1, 10_000_000)
        self.assertEqual(decoder.feed(fr.MAGIC + header[:3]), [])
        with self.assertRaises(LinkError) as raised:
            decoder.feed(header[3:])
        self.assertEqual(raised.exception.code, GoAway.FRAME_TOO_LARGE)

    def test_huge_length_refused_from_header(self) -> None:
        """A header announcing a huge frame is refused before its payload arrives."""
        decoder = FrameDecoder(max_payload=fr.MAX_PAYLOAD_BEFORE_LOGIN)
        header = fr.encode_header(FrameType.DATA, 0, 1, 10_000_000)
        with self.assertRaises(LinkError) as raised:
            decoder.feed(fr.MAGIC + header)
        self.assertEqual(raised.exception.code, GoAway.FRAME_TOO_LARGE)

    def test_bad_magic_descriptions(self) -> None:
        """A TLS ClientHello, SSH or HTTP instead of the magic is named as such."""
        cases = [
            (b"\x16\x03\x01\x02\x00\x01\x00\x01", "speaks TLS"),
            (b"SSH-2.0-OpenSSH_9.2", "SSH server"),
            (b"GET / HTTP/1.1\r\n", "HTTP"),
            (b"\x00\x00\x01\x00garbage", "not a tcptunnel peer"),
        ]
        for data, expected in cases:
            with self.assertRaises(LinkError) as raised:
                FrameDecoder().feed(data)
            self.assertIn(expected, raised.exception.message)

    def test_original_program_named(self) -> None:
        """A proxy of the original C# TcpTunnel (its LOGIN frame: length, type 00, role,
        the prerequisite block starting 0f e8) is named as such, with what to do; a
        frame that only resembles it is not."""
        prerequisite_start = bytes.fromhex("0fe855f7f503119b216104d304b25c73")
        for role in (b"\x00", b"\x01"):
            login = (4102 + 11).to_bytes(4, "big") + b"\x00" + role + prerequisite_start
            with self.assertRaises(LinkError) as raised:
                FrameDecoder().feed(login)
            self.assertEqual(raised.exception.code, GoAway.PROTOCOL_ERROR)
            self.assertIn("the original TcpTunnel's protocol (C# version)",
                          raised.exception.message)
            self.assertIn("upgrade it", raised.exception.message)
        for other in (bytes.fromhex("0000100000010fe8"),  # shorter than any LOGIN
                      bytes.fromhex("0000101100020fe9")):  # not the prerequisite block
            self.assertIn("not a tcptunnel peer", fr.describe_bad_magic(other))

    def test_open_validation(self) -> None:
        """OPEN refuses bad hosts and ports with INVALID_TARGET, bad windows with FLOW_CONTROL."""
        for host, port in [("", 22), ("a" * 254, 22), ("a b", 22), ("x", 0), ("x", 70000)]:
            with self.assertRaises(StreamError) as raised:
                fr.validate_target(host, port)
            self.assertEqual(raised.exception.reason, Reason.INVALID_TARGET)
        payload = fr.open_payload(0, 0, fr.KIND_TCP, fr.target_fields("x", 22))
        with self.assertRaises(StreamError) as raised:
            fr.parse_open(payload)
        self.assertEqual(raised.exception.reason, Reason.FLOW_CONTROL)
        with self.assertRaises(StreamError):  # a field's length beyond the frame
            fr.parse_open(fr.open_payload(1, 0, fr.KIND_TCP, [(fr.FIELD_HOST, b"x")]) + b"\x02\x00")
        cut = fr.open_payload(1, 0, fr.KIND_TCP, fr.target_fields("x", 22))[:-1]
        with self.assertRaises(StreamError):  # the port field cut short
            fr.parse_open(cut)

    def test_open_kinds_and_fields(self) -> None:
        """OPEN keeps fields it does not know (in order), refuses critical ones and unknown
        kinds as UNSUPPORTED, a missing or doubled target as INVALID_TARGET/PROTOCOL_ERROR, and
        survives a new origin unchanged otherwise."""
        extra = ((0x10, b"future"), (0x11, b""))
        frame = fr.build_open(3, fr.OpenRequest(1000, 0, "h.example", 22, fields=extra))
        (decoded,) = FrameDecoder(expect_magic=False).feed(frame)
        request = fr.parse_open(fr.with_origin(decoded.payload, 7))
        self.assertEqual(request, fr.OpenRequest(1000, 7, "h.example", 22, fr.KIND_TCP, extra))
        cases = [
            (fr.open_payload(1000, 0, 9, fr.target_fields("h", 1)), Reason.UNSUPPORTED),
            (fr.open_payload(1000, 0, fr.KIND_TCP, [*fr.target_fields("h", 1), (0x80, b"")]),
             Reason.UNSUPPORTED),
            (fr.open_payload(1000, 0, fr.KIND_TCP, [(fr.FIELD_PORT, b"\x00\x16")]),
             Reason.INVALID_TARGET),
            (fr.open_payload(1000, 0, fr.KIND_TCP, fr.target_fields("h", 1) * 2),
             Reason.PROTOCOL_ERROR),
            (fr.open_payload(1000, 0, fr.KIND_TCP, [(fr.FIELD_HOST, b"\xff"),
                                                    (fr.FIELD_PORT, b"\x00\x16")]),
             Reason.INVALID_TARGET),
            (fr.open_payload(1000, 0, fr.KIND_TCP, [(fr.FIELD_HOST, b"h\x1b[31m"),
                                                    (fr.FIELD_PORT, b"\x00\x16")]),
             Reason.INVALID_TARGET),
        ]
        for payload, reason in cases:
            with self.assertRaises(StreamError) as raised:
                fr.parse_open(payload)
            self.assertEqual(raised.exception.reason, reason, payload)

    def test_peer_text_escaped(self) -> None:
        """Reason texts from peers reach the log with control characters escaped."""
        payload = fr.build_goaway(fr.GoAway.NORMAL, "a\r\nb\x1b[31mc\u202ed")[fr.HEADER_SIZE:]
        _code, text = fr.parse_goaway(payload)
        self.assertEqual(text, "a\\x0d\\x0ab\\x1b[31mc\\u202ed")
        self.assertTrue(text.isprintable())

    def test_window_update_bounds(self) -> None:
        """WINDOW_UPDATE of 0 or above 2^31-1 is a flow-control error."""
        for value in (0, 2**31):
            with self.assertRaises(StreamError):
                fr.parse_window_update(value.to_bytes(4, "big"))

    def test_reason_text_capped(self) -> None:
        """Reason texts are capped at 1,024 bytes without splitting a character."""
        frame = fr.build_reset(1, Reason.INTERNAL, "é" * 2000)
        decoded = FrameDecoder(expect_magic=False).feed(frame)[0]
        _reason, message = fr.parse_reset(decoded.payload)
        self.assertLessEqual(len(message.encode()), fr.MAX_REASON_BYTES)
        self.assertEqual(set(message), {"é"})

    def test_unknown_codes(self) -> None:
        """Codes from a newer version decode as UNKNOWN instead of failing."""
        self.assertEqual(Reason.parse(200), Reason.UNKNOWN)
        self.assertEqual(GoAway.parse(200), GoAway.UNKNOWN)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.binary(max_size=2000))
    def test_fuzz_decoder(self, data: bytes) -> None:
        """Random bytes after the magic either decode or raise LinkError, nothing else."""
        decoder = FrameDecoder(max_payload=fr.MAX_PAYLOAD_BEFORE_LOGIN)
        try:
            frames = decoder.feed(fr.MAGIC + data)
        except LinkError:
            return
        for frame in frames:
            self.assertLessEqual(len(frame.payload), fr.MAX_PAYLOAD_BEFORE_LOGIN)
