"""Tests for the end-to-end encryption core (tcptunnel._e2e).

Published vectors first (CPace draft-irtf-cfrg-cpace for X25519/SHA-512, RFC 5869 HKDF,
RFC 8439 §2.8.2 ChaCha20-Poly1305, the GCM specification's AES-256-GCM test case 16), then
the handshake and its suites, the records and the sealed OPEN against every change a Gateway
in the middle can make.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel import _e2e as e2e
from tcptunnel import _frames as fr
from tcptunnel._e2e import (
    Direction,
    E2EError,
    HandshakeBudget,
    IntegrityError,
    Pairing,
    PakeInitiator,
    PakeResponder,
    PasswordMismatchError,
    RecordDecoder,
    RecordSealer,
    RecordType,
)

FUZZ_EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "200"))
SESSION = 7
HOST = "intranet-secret.example"
PORT = 8443


def h(text: str) -> bytes:
    """Bytes from hex written with spaces or line breaks, as the documents print them."""
    return bytes.fromhex("".join(text.split()))


def pair(server_password: str = "correct horse", client_password: str = "correct horse",
         server_session: int = SESSION, client_session: int = SESSION,
         ) -> tuple[Pairing, Pairing, list[bytes]]:
    """Run the handshake between an initiator and a responder; return both pairings and
    every byte the Gateway relayed (the OPEN field, the answer, the confirmation)."""
    initiator = PakeInitiator(server_password, server_session)
    responder = PakeResponder(client_password, client_session)
    answer = responder.receive_open(initiator.message)
    confirmation = initiator.receive_data(answer)
    responder.receive_data(confirmation)
    assert initiator.pairing is not None and responder.pairing is not None
    assert responder.confirmed
    return initiator.pairing, responder.pairing, [initiator.message, answer, confirmation]


def open_stream(server: Pairing, client: Pairing, stream_number: int = 1,
                window: int = 393216) -> tuple[e2e.StreamCipher, e2e.StreamCipher, bytes]:
    """Open one sealed stream to HOST:PORT; return both ends' ciphers and the OPEN payload."""
    inner = e2e.inner_open(fr.KIND_TCP, fr.target_fields(HOST, PORT))
    value, server_cipher = server.open_stream(stream_number, inner)
    payload = e2e.sealed_open_payload(window, value)
    details, client_cipher = client.accept_stream(e2e.parse_sealed_open(payload))
    request = fr.parse_open(e2e.clear_open_payload(payload, details))
    assert (request.host, request.port, request.window) == (HOST, PORT, window)
    return server_cipher, client_cipher, payload


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, sorted)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class CPaceVectorTests(SynchronousTestCase):
    """The CPace glue against draft-irtf-cfrg-cpace's vectors (CPACE-X25519-SHA512)."""

    PRS = b"Password"
    CI = h("0b415f696e69746961746f720b425f726573706f6e646572")
    SID = h("7e4b4791d6a8ef019b936c79fb7f2c57")
    YA_SCALAR = h("21b4f4bd9e64ed355c3eb676a28ebedaf6d8f17bdc365995b319097153044080")
    YB_SCALAR = h("848b0779ff415f0af4ea14df9dd1d3c29ac41d836c7808896c4eba19c51ac40a")
    YA = h("1d13c89278cdadd826f6d8d7f887701430f8380ddc17611cdd6dc989ce0c9f32")
    YB = h("248cccf6d5cdc3646f0ad593f9e6cef4e69d4945f8372e623512ecea32185623")
    K = h("5b067effbdc0b2a0e1d907b21ebb25cfedb96a852179a847c37e43ee71322c6b")

    def test_prepend_len(self) -> None:
        """prepend_len matches the draft's four vectors (LEB128 across 127/128)."""
        self.assertEqual(e2e.prepend_len(b""), h("00"))
        self.assertEqual(e2e.prepend_len(b"1234"), h("0431323334"))
        self.assertEqual(e2e.prepend_len(bytes(range(127))), b"\x7f" + bytes(range(127)))
        self.assertEqual(e2e.prepend_len(bytes(range(128))), b"\x80\x01" + bytes(range(128)))

    def test_lv_cat_and_transcript(self) -> None:
        """lv_cat and transcript_ir match the draft's vectors."""
        self.assertEqual(e2e.lv_cat(b"1234", b"5", b"", b"678"), h("043132333401350003363738"))
        self.assertEqual(e2e.transcript_ir(b"123", b"PartyA", b"234", b"PartyB"),
                         h("03313233065061727479410332333406506172747942"))
        self.assertEqual(e2e.transcript_ir(b"3456", b"PartyA", b"2345", b"PartyB"),
                         h("043334353606506172747941043233343506506172747942"))

    def test_generator(self) -> None:
        """The generator string, its hash, the decoded field element and the generator."""
        gen_str = e2e.generator_string(e2e.DSI, self.PRS, self.CI, self.SID)
        self.assertEqual(len(gen_str), 170)
        self.assertEqual(gen_str[:19], h("0843506163653235350850617373776f72646d"))
        self.assertEqual(gen_str[19:128], bytes(109))  # ZPAD length 109
        self.assertEqual(gen_str[128:], h(
            "180b415f696e69746961746f720b425f726573706f6e646572107e4b4791d6a8ef019b936c79fb7f"
            "2c57"))
        digest = hashlib.sha512(gen_str).digest()[:32]
        self.assertEqual(digest, h(
            "03998087bdb1a2617bbe25ef5a7c18cd4f84f902328701790958755ee4aed1d3"))
        self.assertEqual(e2e.decode_u_coordinate(digest).to_bytes(32, "little"), h(
            "03998087bdb1a2617bbe25ef5a7c18cd4f84f902328701790958755ee4aed153"))
        self.assertEqual(e2e.calculate_generator(self.PRS, self.CI, self.SID), h(
            "d04bf6d41f6a289632a2e929fa29bebd51092512a7829fdde7d314b62f05a73f"))

    def test_messages_and_secret(self) -> None:
        """Ya, Yb and K of the draft, with OpenSSL's X25519 doing the scalar multiplications."""
        g = e2e.calculate_generator(self.PRS, self.CI, self.SID)
        self.assertEqual(e2e.scalar_mult_vfy(self.YA_SCALAR, g), self.YA)
        self.assertEqual(e2e.scalar_mult_vfy(self.YB_SCALAR, g), self.YB)
        self.assertEqual(e2e.scalar_mult_vfy(self.YA_SCALAR, self.YB), self.K)
        self.assertEqual(e2e.scalar_mult_vfy(self.YB_SCALAR, self.YA), self.K)

    def test_isk_and_sid_output(self) -> None:
        """ISK (initiator/responder) and the optional session id output of the draft."""
        transcript = e2e.transcript_ir(self.YA, b"ADa", self.YB, b"ADb")
        self.assertEqual(transcript, h(
            "201d13c89278cdadd826f6d8d7f887701430f8380ddc17611cdd6dc989ce0c9f320341446120248c"
            "ccf6d5cdc3646f0ad593f9e6cef4e69d4945f8372e623512ecea3218562303414462"))
        self.assertEqual(e2e.cpace_isk(self.SID, self.K, transcript), h(
            "6e19b875f7a561d6b3ca3dbb9ef42ac55de3e717881018204b8922b4d5e53bb2aa82c300bea7b65d"
            "2b671da71922ddf6472301b79bc270adfa8bf413285f2263"))
        self.assertEqual(e2e.sid_output(transcript), h(
            "cbc73f62589bbc96ab6a95ec2363df621e93bc3b0cea83ba6b9571d005fa8f5d2d08f7165622777f"
            "a484c02a9e6b20a84ee2dbebae8c53be757dcfc0eebdeb5f"))

    def test_low_order_points(self) -> None:
        """scalar_mult_vfy maps the draft's low-order and non-canonical points as listed."""
        s = h("af46e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449aff")
        zero = bytes(32)
        cases = [
            ("0000000000000000000000000000000000000000000000000000000000000000", zero),
            ("0100000000000000000000000000000000000000000000000000000000000000", zero),
            ("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", zero),
            ("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800", zero),
            ("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157", zero),
            ("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", zero),
            ("daffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
             h("d8e2c776bbacd510d09fd9278b7edcd25fc5ae9adfba3b6e040e8d3b71b21806")),
            ("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", zero),
            ("dbffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
             h("c85c655ebe8be44ba9c0ffde69f2fe10194458d137f09bbff725ce58803cdb38")),
            ("d9ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
             h("db64dafa9b8fdd136914e61461935fe92aa372cb056314e1231bc4ec12417456")),
            ("cdeb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",
             h("e062dcd5376d58297be2618c7498f55baa07d7e03184e8aada20bca28888bf7a")),
            ("4c9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7",
             h("993c6ad11c4c29da9a56f7691fd0ff8d732e49de6250b6c2e80003ff4629a175")),
        ]
        for u, q in cases:
            self.assertEqual(e2e.scalar_mult_vfy(s, h(u)), q, u)

    def test_low_order_messages_abort(self) -> None:
        """A handshake message that is a low-order point (u0..u5, u7 of the draft) aborts
        both roles with an integrity error."""
        for u in ("00" * 32, "01" + "00" * 31,
                  "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
                  "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"):
            responder = PakeResponder("pw", SESSION)
            with self.assertRaises(IntegrityError):
                responder.receive_open(b"\x01" + h(u))
            initiator = PakeInitiator("pw", SESSION)
            with self.assertRaises(IntegrityError):
                initiator.receive_data(h(u) + bytes(64))

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.integers(min_value=0, max_value=2**255 - 20))
    def test_elligator2_lands_on_the_curve(self, r: int) -> None:
        """Elligator 2 maps every field element to a u whose v^2 = u^3 + A u^2 + u has a
        root (on the curve, not its twist), whichever branch the Legendre symbol takes."""
        p = 2**255 - 19
        u = e2e.elligator2(r)
        rhs = (u * u * u + 486662 * u * u + u) % p
        self.assertIn(pow(rhs, (p - 1) // 2, p), (0, 1))


class PrimitiveVectorTests(SynchronousTestCase):
    """The primitives from ``cryptography`` as we call them, against their RFCs."""

    def test_hkdf_rfc5869_case_1(self) -> None:
        """HKDF-SHA-256 test case 1 of RFC 5869 (Appendix A.1)."""
        prk = e2e.hkdf_extract(h("000102030405060708090a0b0c"), b"\x0b" * 22)
        self.assertEqual(prk, h(
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"))
        self.assertEqual(e2e.hkdf_expand(prk, h("f0f1f2f3f4f5f6f7f8f9"), 42), h(
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b88718"
            "5865"))

    def test_hkdf_rfc5869_case_2(self) -> None:
        """HKDF-SHA-256 test case 2 of RFC 5869 (Appendix A.2, longer inputs and outputs)."""
        prk = e2e.hkdf_extract(bytes(range(0x60, 0xB0)), bytes(range(0x50)))
        self.assertEqual(prk, h(
            "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244"))
        self.assertEqual(e2e.hkdf_expand(prk, bytes(range(0xB0, 0x100)), 82), h(
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac78272"
            "71cb41c65e590e09da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f"
            "1d87"))

    def test_hkdf_rfc5869_case_3(self) -> None:
        """HKDF-SHA-256 test case 3 of RFC 5869 (Appendix A.3, empty salt and info)."""
        prk = e2e.hkdf_extract(b"", b"\x0b" * 22)
        self.assertEqual(prk, h(
            "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04"))
        self.assertEqual(e2e.hkdf_expand(prk, b"", 42), h(
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a"
            "96c8"))

    def test_chacha20_poly1305_rfc8439(self) -> None:
        """AEAD_CHACHA20_POLY1305 of RFC 8439 §2.8.2, sealed and opened."""
        key = bytes(range(0x80, 0xA0))
        nonce = h("070000004041424344454647")
        aad = h("50515253c0c1c2c3c4c5c6c7")
        plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one "
                     b"tip for the future, sunscreen would be it.")
        expected = h(
            "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca96712"
            "82fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58"
            "fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116"
            "1ae10b594f09e26a7e902ecbd0600691")
        aead = ChaCha20Poly1305(key)
        self.assertEqual(aead.encrypt(nonce, plaintext, aad), expected)
        self.assertEqual(aead.decrypt(nonce, expected, aad), plaintext)

    def test_aes_256_gcm_test_case_16(self) -> None:
        """AES-256-GCM with a 96-bit IV and associated data: test case 16 of McGrew and
        Viega's GCM specification (also in NIST's GCM test data), sealed and opened."""
        key = h("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
        nonce = h("cafebabefacedbaddecaf888")
        aad = h("feedfacedeadbeeffeedfacedeadbeefabaddad2")
        plaintext = h(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
            "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
        expected = h(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
            "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
            "76fc6ece0f4e1768cddf8853bb2d551b")  # the tag
        aead = AESGCM(key)
        self.assertEqual(aead.encrypt(nonce, plaintext, aad), expected)
        self.assertEqual(aead.decrypt(nonce, expected, aad), plaintext)


class PakeTests(SynchronousTestCase):
    """The pairing handshake between a Proxy-Server and a Proxy-Client."""

    def test_same_password_same_keys(self) -> None:
        """With one password both ends derive the same pairing id and stream keys."""
        server, client, _ = pair()
        self.assertEqual(server.pairing_id, client.pairing_id)
        server_cipher, client_cipher, _ = open_stream(server, client)
        to_client = server_cipher.sealer.seal_data(b"hello")
        self.assertEqual([r.data for r in client_cipher.decoder.feed(to_client)], [b"hello"])
        to_server = client_cipher.sealer.seal_data(b"world")
        self.assertEqual([r.data for r in server_cipher.decoder.feed(to_server)], [b"world"])

    def test_each_pairing_has_fresh_keys(self) -> None:
        """Two handshakes with the same password (a Proxy-Client replaced) give other keys:
        a record of the first pairing does not open under the second."""
        server1, client1, _ = pair()
        server2, client2, _ = pair()
        self.assertNotEqual(server1.pairing_id, server2.pairing_id)
        cipher1, _, _ = open_stream(server1, client1)
        _, cipher2, _ = open_stream(server2, client2)
        with self.assertRaises(IntegrityError):
            cipher2.decoder.feed(cipher1.sealer.seal_data(b"old keys"))

    def test_password_mismatch_at_both_ends(self) -> None:
        """Different passwords fail at both ends with the same PasswordMismatchError; the
        initiator's reply still goes out and the responder decides by its own check."""
        initiator = PakeInitiator("one password", SESSION)
        responder = PakeResponder("another password", SESSION)
        answer = responder.receive_open(initiator.message)
        with self.assertRaises(PasswordMismatchError) as server_error:
            initiator.receive_data(answer)
        self.assertIsNone(initiator.pairing)
        reply = server_error.exception.reply
        self.assertEqual(len(reply), e2e.CONFIRM_SIZE)
        with self.assertRaises(PasswordMismatchError) as client_error:
            responder.receive_data(reply)
        self.assertIsNone(responder.pairing)
        self.assertFalse(responder.confirmed)
        self.assertEqual(str(server_error.exception), str(client_error.exception))
        self.assertEqual(str(server_error.exception), e2e.MESSAGE_MISMATCH)
        self.assertEqual(server_error.exception.reason, "password mismatch")

    def test_other_session_does_not_pair(self) -> None:
        """Proxies of two sessions with one end-to-end password do not pair (the session id
        is in CI): a Gateway cannot connect one session's Proxy-Server to another's client."""
        with self.assertRaises(PasswordMismatchError):
            pair(server_session=1, client_session=2)

    def test_answer_in_any_split(self) -> None:
        """The answer and the confirmation may arrive cut at any point."""
        for cut in range(e2e.RESPONDER_MESSAGE_SIZE + 1):
            initiator = PakeInitiator("pw", SESSION)
            responder = PakeResponder("pw", SESSION)
            answer = responder.receive_open(initiator.message)
            first = initiator.receive_data(answer[:cut])
            second = initiator.receive_data(answer[cut:])
            self.assertEqual(len(first + second), e2e.CONFIRM_SIZE)
            self.assertIn(b"", (first, second))
            for piece in splits(first + second, [cut % (e2e.CONFIRM_SIZE + 1)]):
                responder.receive_data(piece)
            self.assertTrue(responder.confirmed)
            assert initiator.pairing is not None and responder.pairing is not None
            self.assertEqual(initiator.pairing.pairing_id, responder.pairing.pairing_id)

    def test_tampered_handshake_bytes(self) -> None:
        """A bit flipped anywhere in the answer or the confirmation fails the handshake."""
        for position in range(e2e.RESPONDER_MESSAGE_SIZE):
            initiator = PakeInitiator("pw", SESSION)
            responder = PakeResponder("pw", SESSION)
            answer = bytearray(responder.receive_open(initiator.message))
            answer[position] ^= 0x01
            with self.assertRaises(E2EError) as caught:
                initiator.receive_data(bytes(answer))
            self.assertIn(caught.exception.reason, ("integrity", "password mismatch"))
            self.assertIsNone(initiator.pairing)
        for position in range(e2e.CONFIRM_SIZE):
            initiator = PakeInitiator("pw", SESSION)
            responder = PakeResponder("pw", SESSION)
            confirmation = bytearray(initiator.receive_data(
                responder.receive_open(initiator.message)))
            confirmation[position] ^= 0x80
            with self.assertRaises(PasswordMismatchError):
                responder.receive_data(bytes(confirmation))

    def test_tampered_first_message(self) -> None:
        """A bit flipped in the initiator's point makes both ends fail (no shared key)."""
        initiator = PakeInitiator("pw", SESSION)
        responder = PakeResponder("pw", SESSION)
        message = bytearray(initiator.message)
        message[5] ^= 0x04
        answer = responder.receive_open(bytes(message))
        with self.assertRaises(PasswordMismatchError) as caught:
            initiator.receive_data(answer)
        with self.assertRaises(PasswordMismatchError):
            responder.receive_data(caught.exception.reply)

    def test_extra_bytes_are_integrity_errors(self) -> None:
        """Bytes beyond the answer or beyond the confirmation are integrity failures."""
        initiator = PakeInitiator("pw", SESSION)
        responder = PakeResponder("pw", SESSION)
        answer = responder.receive_open(initiator.message)
        with self.assertRaises(IntegrityError):
            initiator.receive_data(answer + b"x")
        initiator = PakeInitiator("pw", SESSION)
        responder = PakeResponder("pw", SESSION)
        confirmation = initiator.receive_data(responder.receive_open(initiator.message))
        with self.assertRaises(IntegrityError):
            initiator.receive_data(b"more")
        with self.assertRaises(IntegrityError):
            responder.receive_data(confirmation + b"x")

    def test_malformed_or_unsupported_first_message(self) -> None:
        """A first message of the wrong size is an integrity error; another suite is
        refused as unsupported."""
        with self.assertRaises(IntegrityError):
            PakeResponder("pw", SESSION).receive_open(b"\x01" + bytes(31))
        with self.assertRaises(e2e.UnsupportedSuiteError):
            PakeResponder("pw", SESSION).receive_open(b"\x09" + bytes(32))
        with self.assertRaises(e2e.UnsupportedSuiteError):
            PakeResponder("pw", SESSION).receive_open(b"\x00" + bytes(32))

    def test_confirmation_replayed_into_another_handshake(self) -> None:
        """The confirmation of one handshake does not confirm another (fresh scalars)."""
        initiator = PakeInitiator("pw", SESSION)
        responder = PakeResponder("pw", SESSION)
        old = initiator.receive_data(responder.receive_open(initiator.message))
        responder2 = PakeResponder("pw", SESSION)
        responder2.receive_open(initiator.message)  # a replayed first message
        with self.assertRaises(PasswordMismatchError):
            responder2.receive_data(old)

    def test_what_the_gateway_sees_has_no_secret(self) -> None:
        """Neither the password, nor the target host, nor the plaintext appear in any byte
        the Gateway relays: handshake, sealed OPEN, records (with the clear OPEN as control:
        there the host appears)."""
        password = "hunter2-very-secret"
        server, client, relayed = pair(password, password)
        server_cipher, client_cipher, payload = open_stream(server, client)
        marker = b"MARKER-7f3a9c"
        records = server_cipher.sealer.seal_data(marker * 100) + server_cipher.sealer.seal_end()
        seen = b"".join(relayed) + payload + records + client_cipher.sealer.seal_data(marker)
        for secret in (password.encode(), HOST.encode(), marker):
            self.assertNotIn(secret, seen)
        clear = fr.build_open(1, fr.OpenRequest(393216, 0, HOST, PORT))
        self.assertIn(HOST.encode(), clear)

    def test_rejects_short_random(self) -> None:
        """A random source that gives fewer bytes than a scalar is refused."""
        with self.assertRaises(ValueError):
            PakeInitiator("pw", SESSION, random_bytes=lambda n: b"\x01" * (n - 1))

    def test_deterministic_with_injected_random(self) -> None:
        """With the same injected scalars, both runs give the same messages and pairing id
        (the randomness is the only source of freshness)."""
        def run() -> tuple[bytes, bytes]:
            initiator = PakeInitiator("pw", SESSION, random_bytes=lambda n: b"\x11" * n)
            responder = PakeResponder("pw", SESSION, random_bytes=lambda n: b"\x22" * n)
            initiator.receive_data(responder.receive_open(initiator.message))
            assert initiator.pairing is not None
            return initiator.message, initiator.pairing.pairing_id
        self.assertEqual(run(), run())


def record_by_the_spec(suite: e2e.Suite, key: bytes, pairing_id: bytes, stream: int,
                       direction: Direction, record_type: RecordType, sequence: int,
                       plaintext: bytes) -> bytes:
    """A record built straight from docs/protocol.md §9.5, not through ``_e2e``'s sealer."""
    length = len(plaintext) + 16
    ad = pairing_id + struct.pack(">IBBHQ", stream, direction, record_type, length, sequence)
    nonce = bytes(4) + struct.pack(">Q", sequence)
    return struct.pack(">BH", record_type, length) + suite.aead(key).encrypt(
        nonce, plaintext, ad)


def update(key: bytes) -> bytes:
    """The next record key as §9.5 defines it."""
    return e2e.hkdf_expand(key, b"tcptunnel-e2e-1 key update", 32)


class SuiteTests(SynchronousTestCase):
    """The cipher suites: what a Proxy-Server proposes and a Proxy-Client follows, that a
    Gateway cannot change the choice, and each suite's records (suite 2: AES-256-GCM, a new
    key every 2^24 records of a direction)."""

    PRK = bytes(range(32))
    PAIRING_ID = b"pairing!"

    def test_proxy_server_proposes_aes_gcm(self) -> None:
        """The Proxy-Server's first message starts with suite 2 and both ends' pairings use
        it; a sealed stream works under it."""
        server, client, relayed = pair()
        self.assertEqual(relayed[0][0], 2)
        self.assertIs(server.suite, e2e.SUITE_AES)
        self.assertIs(client.suite, e2e.SUITE_AES)
        server_cipher, client_cipher, _ = open_stream(server, client)
        self.assertEqual(client_cipher.decoder.feed(server_cipher.sealer.seal_data(b"x"))[0]
                         .data, b"x")

    def test_suite_1_is_followed(self) -> None:
        """A Proxy-Server that proposes suite 1 (ChaCha20-Poly1305, as earlier builds did)
        gets it: the Proxy-Client follows the proposal."""
        initiator = PakeInitiator("pw", SESSION, suite=e2e.SUITE_CHACHA)
        responder = PakeResponder("pw", SESSION)
        self.assertEqual(initiator.message[0], 1)
        responder.receive_data(initiator.receive_data(responder.receive_open(initiator.message)))
        assert initiator.pairing is not None and responder.pairing is not None
        self.assertIs(initiator.pairing.suite, e2e.SUITE_CHACHA)
        self.assertIs(responder.pairing.suite, e2e.SUITE_CHACHA)
        server_cipher, client_cipher, _ = open_stream(initiator.pairing, responder.pairing)
        self.assertEqual(server_cipher.decoder.feed(client_cipher.sealer.seal_data(b"y"))[0]
                         .data, b"y")

    def test_gateway_cannot_change_the_suite(self) -> None:
        """A Gateway that rewrites the suite byte (2 to 1, or 1 to 2) makes the handshake fail
        as a password mismatch at both ends, by each end's own check: the suite byte is
        CPace's ADa, inside both confirmation tags.  No pairing comes of it."""
        for proposed, rewritten in ((e2e.SUITE_AES, e2e.SUITE_CHACHA),
                                    (e2e.SUITE_CHACHA, e2e.SUITE_AES)):
            initiator = PakeInitiator("pw", SESSION, suite=proposed)
            responder = PakeResponder("pw", SESSION)
            answer = responder.receive_open(bytes([rewritten.number]) + initiator.message[1:])
            with self.assertRaises(PasswordMismatchError) as caught:
                initiator.receive_data(answer)
            with self.assertRaises(PasswordMismatchError):
                responder.receive_data(caught.exception.reply)
            self.assertIsNone(initiator.pairing)
            self.assertIsNone(responder.pairing)

    def test_records_by_the_spec(self) -> None:
        """Under each suite a DATA record toward the Proxy-Client and an END record back
        are byte for byte what §9.5 builds: type, length, the suite's AEAD under the stream
        key with the nonce and associated data of its sequence number."""
        for suite in (e2e.SUITE_CHACHA, e2e.SUITE_AES):
            server = Pairing(self.PRK, self.PAIRING_ID, True, suite)
            client = Pairing(self.PRK, self.PAIRING_ID, False, suite)
            server_cipher, client_cipher, _ = open_stream(server, client, stream_number=5)
            down = e2e.stream_key(self.PRK, 5, Direction.TO_CLIENT)
            up = e2e.stream_key(self.PRK, 5, Direction.TO_SERVER)
            self.assertEqual(server_cipher.sealer.seal_data(b"hello"), record_by_the_spec(
                suite, down, self.PAIRING_ID, 5, Direction.TO_CLIENT, RecordType.DATA, 1,
                b"hello"))
            self.assertEqual(client_cipher.sealer.seal_end(), record_by_the_spec(
                suite, up, self.PAIRING_ID, 5, Direction.TO_SERVER, RecordType.END, 0, b""))

    def test_key_update(self) -> None:
        """Suite 2 seals record 2^24 of a direction and each 2^24th after it under the next
        key (HKDF-Expand of the last one); the other end switches in step.  Shown with an
        update every 3 records; suite 1 never updates its key."""
        self.assertEqual(e2e.SUITE_AES.key_update, 2**24)
        self.assertEqual(e2e.SUITE_CHACHA.key_update, 0)
        quick = e2e.Suite(2, "suite 2, key updated every 3 records", AESGCM, 3)
        key = bytes(range(100, 132))
        sealer = RecordSealer(key, self.PAIRING_ID, 9, Direction.TO_CLIENT, 1, quick)
        decoder = RecordDecoder(key, self.PAIRING_ID, 9, Direction.TO_CLIENT, 1, quick)
        keys = [key, update(key), update(update(key)), update(update(update(key)))]
        for sequence in range(1, 10):
            plaintext = b"record %d" % sequence
            record = sealer.seal(RecordType.DATA, plaintext)
            self.assertEqual(record, record_by_the_spec(
                quick, keys[sequence // 3], self.PAIRING_ID, 9, Direction.TO_CLIENT,
                RecordType.DATA, sequence, plaintext))
            self.assertEqual([r.data for r in decoder.feed(record)], [plaintext])
        # A record sealed under a key the receiver has left behind does not open.
        stale = record_by_the_spec(quick, keys[2], self.PAIRING_ID, 9, Direction.TO_CLIENT,
                                   RecordType.DATA, 10, b"old key")
        with self.assertRaises(IntegrityError):
            decoder.feed(stale)
        with self.assertRaises(ValueError):
            RecordSealer(key, self.PAIRING_ID, 9, Direction.TO_CLIENT, 3, quick)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=3000), max_size=8),
           st.lists(st.integers(min_value=0, max_value=10**5), max_size=12),
           st.integers(min_value=1, max_value=4))
    def test_any_split_across_key_updates(self, chunks: list[bytes], cuts: list[int],
                                          every: int) -> None:
        """Whatever split of the byte stream arrives, with a key update every few records,
        the plaintext comes out whole and in order and the END record closes it."""
        quick = e2e.Suite(2, "suite 2, quick key updates", AESGCM, every)
        key = bytes(32)
        sealer = RecordSealer(key, self.PAIRING_ID, 1, Direction.TO_SERVER, 0, quick)
        decoder = RecordDecoder(key, self.PAIRING_ID, 1, Direction.TO_SERVER, 0, quick)
        stream = b"".join(sealer.seal_data(c) for c in chunks) + sealer.seal_end()
        out = []
        for piece in splits(stream, cuts):
            out += decoder.feed(piece)
        decoder.finish()
        self.assertEqual(b"".join(r.data for r in out), b"".join(chunks))
        self.assertEqual(out[-1].type, RecordType.END)

    def test_one_write_of_many_records_across_key_updates(self) -> None:
        """One seal_data call of many records (a 65,460-byte read is four) updates the key
        within the call, at the same records as record-by-record sealing: byte for byte the
        records of §9.5 under each key."""
        quick = e2e.Suite(2, "suite 2, key updated every 3 records", AESGCM, 3)
        key = bytes(range(32))
        sealer = RecordSealer(key, self.PAIRING_ID, 4, Direction.TO_CLIENT, 1, quick)
        data = bytes(range(256)) * 300  # 76,800 bytes: four full records and a short one
        pieces = [data[i : i + e2e.MAX_PLAINTEXT] for i in range(0, len(data),
                                                                e2e.MAX_PLAINTEXT)]
        keys = [key, update(key), update(update(key))]
        expected = b"".join(
            record_by_the_spec(quick, keys[sequence // 3], self.PAIRING_ID, 4,
                               Direction.TO_CLIENT, RecordType.DATA, sequence, piece)
            for sequence, piece in enumerate(pieces, start=1))
        self.assertEqual(sealer.seal_data(data), expected)
        self.assertEqual(sealer.sequence, 1 + len(pieces))

    def test_sequence_numbers_used_up(self) -> None:
        """A write that would need a record past the last sequence number is refused whole
        (nothing sealed, the sequence unchanged)."""
        sealer = RecordSealer(bytes(32), self.PAIRING_ID, 4, Direction.TO_CLIENT,
                              2**64 - 3, e2e.SUITE_CHACHA)
        with self.assertRaises(E2EError):
            sealer.seal_data(bytes(3 * e2e.MAX_PLAINTEXT))
        self.assertEqual(sealer.sequence, 2**64 - 3)
        self.assertEqual(len(sealer.seal_data(bytes(2 * e2e.MAX_PLAINTEXT))), 2 * e2e.MAX_RECORD)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.binary(min_size=0, max_size=40000), max_size=6),
           st.lists(st.integers(min_value=0, max_value=10**6), max_size=12),
           st.integers(min_value=1, max_value=4))
    def test_feed_data_is_feed(self, chunks: list[bytes], cuts: list[int], every: int) -> None:
        """feed_data (what a SealedStream uses) gives, for any split and key updates every
        few records, the DATA plaintexts (in non-empty pieces) and the wire bytes of the
        records that feed gives for the same pieces, read by read."""
        quick = e2e.Suite(2, "suite 2, quick key updates", AESGCM, every)
        key = bytes(32)
        sealer = RecordSealer(key, self.PAIRING_ID, 1, Direction.TO_SERVER, 0, quick)
        stream = b"".join(sealer.seal_data(c) for c in chunks)
        stream += sealer.seal(RecordType.DATA, b"") + sealer.seal_end()
        by_feed = RecordDecoder(key, self.PAIRING_ID, 1, Direction.TO_SERVER, 0, quick)
        by_data = RecordDecoder(key, self.PAIRING_ID, 1, Direction.TO_SERVER, 0, quick)
        for piece in splits(stream, cuts):
            records = by_feed.feed(piece)
            plaintexts, consumed = by_data.feed_data(piece)
            self.assertEqual(b"".join(plaintexts), b"".join(r.data for r in records))
            self.assertTrue(all(plaintexts))
            self.assertEqual(consumed, sum(r.size for r in records))
            self.assertEqual(by_data.buffered, by_feed.buffered)
        by_data.finish()
        self.assertTrue(by_data.ended)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=3 * e2e.MAX_PLAINTEXT + 7), min_size=1,
                    max_size=5),
           st.integers(min_value=1, max_value=3), st.integers(min_value=1, max_value=4),
           st.lists(st.tuples(st.integers(min_value=0, max_value=40),
                              st.integers(min_value=-20, max_value=20)), max_size=6),
           st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)))
    def test_reads_of_whole_records(self, sizes: list[int], per_frame: int, every: int,
                                    cuts: list[tuple[int, int]], flip: int | None) -> None:
        """The bulk paths against the general ones: seal_data_frames gives, joined, the
        bytes seal_data gives, each piece whole records (``per_frame`` of them, the last
        fewer); and reads cut at record boundaries, or a few bytes off them (what frames of
        whole records and a frame cut by the window bring), with DATA, empty DATA and END
        records and key updates every few records, give feed_data the plaintext, wire bytes
        and buffered bytes that feed gives, read by read.  With one bit flipped anywhere,
        both fail at the same read with the same message, after the same plaintext."""
        quick = e2e.Suite(2, "suite 2, quick key updates", AESGCM, every)
        key = bytes(range(32))
        by_frames = RecordSealer(key, self.PAIRING_ID, 3, Direction.TO_CLIENT, 0, quick)
        by_data = RecordSealer(key, self.PAIRING_ID, 3, Direction.TO_CLIENT, 0, quick)
        records: list[bytes] = []
        for index, size in enumerate(sizes):
            data = os.urandom(size)
            frames = by_frames.seal_data_frames(data, per_frame)
            self.assertEqual(b"".join(frames), by_data.seal_data(data))
            count = -(-size // e2e.MAX_PLAINTEXT)
            self.assertEqual(len(frames), -(-count // per_frame))
            for frame in frames:  # each piece is whole records: split it into them
                offset = 0
                while offset < len(frame):
                    _kind, length = struct.unpack_from(">BH", frame, offset)
                    records.append(frame[offset : offset + 3 + length])
                    offset += 3 + length
            if index == 0:  # an empty DATA record among them
                records.append(by_frames.seal(RecordType.DATA, b""))
                by_data.seal(RecordType.DATA, b"")
        self.assertEqual(by_frames.sequence, by_data.sequence)
        records.append(by_frames.seal_end())
        stream = bytearray(b"".join(records))
        if flip is not None:
            stream[flip % len(stream)] ^= 1
        boundaries = list(itertools.accumulate(len(r) for r in records))
        points = {0, len(stream)} | {
            min(len(stream), max(0, boundaries[at % len(boundaries)] + off))
            for at, off in cuts}
        pieces = [bytes(stream[a:b]) for a, b in itertools.pairwise(sorted(points))]
        general = RecordDecoder(key, self.PAIRING_ID, 3, Direction.TO_CLIENT, 0, quick)
        fast = RecordDecoder(key, self.PAIRING_ID, 3, Direction.TO_CLIENT, 0, quick)
        delivered = [b"", b""]
        for piece in pieces:
            try:
                opened = general.feed(piece)
            except IntegrityError as e:
                with self.assertRaises(IntegrityError) as caught:
                    fast.feed_data(piece)
                self.assertEqual(caught.exception.message, e.message)
                self.assertIsNotNone(flip)
                self.assertEqual(delivered[0], delivered[1])
                return
            plaintexts, consumed = fast.feed_data(piece)
            delivered[0] += b"".join(r.data for r in opened)
            delivered[1] += b"".join(plaintexts)
            self.assertTrue(all(plaintexts))
            self.assertEqual(consumed, sum(r.size for r in opened))
            self.assertEqual(fast.buffered, general.buffered)
            self.assertEqual(fast.sequence, general.sequence)
        self.assertEqual(delivered[0], delivered[1])
        # A flipped bit that did not fail a read is one of the END record's that its FIN
        # check meets, or none: every changed byte is in some record.
        if flip is None:
            fast.finish()
            self.assertTrue(fast.ended)
        else:
            with self.assertRaises(IntegrityError):
                fast.finish()

    def test_one_record_reads_across_key_updates(self) -> None:
        """Writes of one record each and reads of one whole record each (the single-record
        paths of seal_data and feed_data, what a ping-pong takes) give the records of §9.5
        byte for byte under each key, open to their plaintexts, and a changed one is an
        integrity failure that every later call raises again."""
        quick = e2e.Suite(2, "suite 2, key updated every 2 records", AESGCM, 2)
        key = bytes(range(32))
        keys = [key, update(key), update(update(key))]
        sealer = RecordSealer(key, self.PAIRING_ID, 4, Direction.TO_CLIENT, 0, quick)
        decoder = RecordDecoder(key, self.PAIRING_ID, 4, Direction.TO_CLIENT, 0, quick)
        for sequence, piece in enumerate([b"a", b"bc", bytes(5000), b"d", b"e"]):
            record = sealer.seal_data(piece)
            self.assertEqual(record, record_by_the_spec(
                quick, keys[sequence // 2], self.PAIRING_ID, 4, Direction.TO_CLIENT,
                RecordType.DATA, sequence, piece))
            self.assertEqual(decoder.feed_data(record), ([piece], len(record)))
        changed = bytearray(sealer.seal_data(b"f"))
        changed[-1] ^= 1
        with self.assertRaises(IntegrityError) as caught:
            decoder.feed_data(bytes(changed))
        self.assertIn("record 5", caught.exception.message)
        with self.assertRaises(IntegrityError):
            decoder.feed_data(sealer.seal_data(b"g"))

    def test_feed_data_refuses_other_records(self) -> None:
        """An OPEN record among a stream's data (a Gateway moving the sealed OPEN there) is an
        integrity failure for feed_data, after the data before it."""
        key = bytes(32)
        sealer = RecordSealer(key, self.PAIRING_ID, 1, Direction.TO_CLIENT, 1, e2e.SUITE_AES)
        decoder = RecordDecoder(key, self.PAIRING_ID, 1, Direction.TO_CLIENT, 1, e2e.SUITE_AES)
        stream = sealer.seal_data(b"before") + sealer.seal(RecordType.OPEN, b"x")
        self.assertEqual(decoder.feed_data(stream[:25]), ([b"before"], 25))
        with self.assertRaises(IntegrityError) as caught:
            decoder.feed_data(stream[25:])
        self.assertIn("OPEN record among the data", caught.exception.message)
        with self.assertRaises(IntegrityError):
            decoder.feed_data(b"")


class RecordTests(SynchronousTestCase):
    """Sealed records on one stream, against what a Gateway can do to them."""

    def setUp(self) -> None:
        self.server, self.client, _ = pair()
        self.server_cipher, self.client_cipher, _ = open_stream(self.server, self.client)

    def sent(self, *chunks: bytes, end: bool = True) -> tuple[list[bytes], bytes]:
        """Seal ``chunks`` (and END): the records one by one, and all of them joined."""
        sealer = self.server_cipher.sealer
        records = [sealer.seal(RecordType.DATA, c) for c in chunks]
        if end:
            records.append(sealer.seal_end())
        return records, b"".join(records)

    def assert_integrity(self, stream: bytes, sent: list[bytes]) -> None:
        """Feeding ``stream`` then FIN fails with reason integrity, and what was delivered
        before the failure is an exact prefix of what was sent."""
        decoder = self.client_cipher.decoder
        delivered: list[bytes] = []
        with self.assertRaises(IntegrityError) as caught:
            for piece in splits(stream, [7, 16384, 20000]):
                delivered += [r.data for r in decoder.feed(piece) if r.type is RecordType.DATA]
            decoder.finish()
        self.assertEqual(caught.exception.reason, "integrity")
        self.assertIn("integrity", str(caught.exception))
        self.assertEqual(delivered, sent[: len(delivered)])
        # A failed stream stays failed.
        with self.assertRaises(IntegrityError):
            decoder.feed(b"\x02")
        with self.assertRaises(IntegrityError):
            decoder.finish()

    def test_round_trip_with_end(self) -> None:
        """Records come out in order, END then FIN is a clean end."""
        records, stream = self.sent(b"a", b"bc", b"d" * 1000)
        out = self.client_cipher.decoder.feed(stream)
        self.assertEqual([r.type for r in out], [RecordType.DATA] * 3 + [RecordType.END])
        self.assertEqual([r.data for r in out[:3]], [b"a", b"bc", b"d" * 1000])
        self.assertEqual([r.size for r in out], [len(r) for r in records])
        self.client_cipher.decoder.finish()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=40000), max_size=5),
           st.lists(st.integers(min_value=0, max_value=10**6), max_size=12))
    def test_any_split(self, chunks: list[bytes], cuts: list[int]) -> None:
        """Whatever split of the byte stream arrives, the plaintext and the wire sizes come
        out whole and in order; every record is at most 16 KiB."""
        server, client, _ = pair()
        server_cipher, client_cipher, _ = open_stream(server, client)
        stream = b"".join(server_cipher.sealer.seal_data(c) for c in chunks)
        stream += server_cipher.sealer.seal_end()
        out = []
        for piece in splits(stream, cuts):
            out += client_cipher.decoder.feed(piece)
            self.assertLess(client_cipher.decoder.buffered, e2e.MAX_RECORD)
        client_cipher.decoder.finish()
        self.assertEqual(b"".join(r.data for r in out), b"".join(chunks))
        self.assertEqual(sum(r.size for r in out), len(stream))
        self.assertTrue(all(r.size <= e2e.MAX_RECORD for r in out))

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @given(st.data())
    def test_bit_flip_anywhere(self, data: st.DataObject) -> None:
        """One bit flipped anywhere in the records (header, ciphertext or tag) is an
        integrity failure; nothing changed is ever delivered."""
        server, client, _ = pair()
        server_cipher, client_cipher, _ = open_stream(server, client)
        chunks = [b"first", b"second" * 500, b"third"]
        stream = bytearray(b"".join(server_cipher.sealer.seal(RecordType.DATA, c)
                                    for c in chunks) + server_cipher.sealer.seal_end())
        position = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
        stream[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        self.client_cipher = client_cipher
        self.assert_integrity(bytes(stream), chunks)

    def test_drop_a_record(self) -> None:
        """A dropped record is detected at the next one."""
        records, _ = self.sent(b"one", b"two", b"three")
        self.assert_integrity(records[0] + records[2] + records[3], [b"one", b"two", b"three"])

    def test_replay_a_record(self) -> None:
        """A record sent twice is detected."""
        records, _ = self.sent(b"one", b"two")
        self.assert_integrity(records[0] + records[1] + records[1] + records[2],
                              [b"one", b"two"])

    def test_reorder_two_records(self) -> None:
        """Two records swapped are detected."""
        records, _ = self.sent(b"one", b"two", b"three")
        self.assert_integrity(records[0] + records[2] + records[1] + records[3],
                              [b"one", b"two", b"three"])

    def test_truncation_is_never_a_clean_end(self) -> None:
        """FIN without the END record, or in the middle of a record, is an integrity failure
        (never a clean EOF); so is a dropped END."""
        records, _ = self.sent(b"one", b"two")
        self.assert_integrity(records[0] + records[1], [b"one", b"two"])  # END dropped
        self.setUp()
        records, _ = self.sent(b"one", b"two")
        self.assert_integrity(records[0] + records[1][:10], [b"one", b"two"])
        self.setUp()
        self.assert_integrity(b"", [])  # FIN at once

    def test_byte_by_byte(self) -> None:
        """Fed one byte at a time (every header and record completed across reads), the
        records come out whole, each at the read that completes it, and nothing more than
        the one incomplete record is ever kept."""
        records, stream = self.sent(b"a", b"b" * 20, b"")
        decoder = self.client_cipher.decoder
        completed_at = []
        out = []
        for position in range(len(stream)):
            got = decoder.feed(stream[position : position + 1])
            out += got
            if got:
                completed_at.append(position + 1)
            self.assertLess(decoder.buffered, e2e.MAX_RECORD)
        self.assertEqual([r.data for r in out], [b"a", b"b" * 20, b"", b""])
        self.assertEqual(completed_at, list(itertools.accumulate(len(r) for r in records)))
        self.assertEqual(decoder.buffered, 0)
        decoder.finish()

    def test_bytes_after_an_end_completed_across_reads(self) -> None:
        """An END record whose last bytes come in the same read as anything more is an
        integrity failure, also when the END record began in an earlier read."""
        _records, stream = self.sent(b"one")
        decoder = self.client_cipher.decoder
        self.assertEqual([r.data for r in decoder.feed(stream[:-5])], [b"one"])
        with self.assertRaises(IntegrityError):
            decoder.feed(stream[-5:] + b"\x02")
        with self.assertRaises(IntegrityError):
            decoder.finish()

    def test_bytes_after_end(self) -> None:
        """Nothing may follow the END record, in the same read or a later one."""
        records, stream = self.sent(b"one")
        extra = self.server_cipher.sealer  # ended: it refuses to seal more
        with self.assertRaises(RuntimeError):
            extra.seal_data(b"more")
        self.assert_integrity(stream + records[0], [b"one"])
        self.setUp()
        records, stream = self.sent(b"one")
        decoder = self.client_cipher.decoder
        decoder.feed(stream)
        with self.assertRaises(IntegrityError):
            decoder.feed(b"\x02\x00\x10")

    def test_cross_stream_splice(self) -> None:
        """A record of another stream of the same pairing does not open here."""
        other_server, _, _ = open_stream(self.server, self.client, stream_number=3)
        spliced = other_server.sealer.seal(RecordType.DATA, b"other stream")
        self.assert_integrity(spliced, [])

    def test_cross_direction_splice(self) -> None:
        """A record sent toward the Proxy-Client, reflected back to the Proxy-Server, does
        not open there (each direction has its key)."""
        record = self.server_cipher.sealer.seal(RecordType.DATA, b"reflected")
        with self.assertRaises(IntegrityError):
            self.server_cipher.decoder.feed(record)

    def test_type_change(self) -> None:
        """A DATA record relabelled END (or the other way) does not authenticate."""
        record = bytearray(self.server_cipher.sealer.seal(RecordType.DATA, b""))
        record[0] = RecordType.END
        self.assert_integrity(bytes(record), [])
        self.setUp()
        end = bytearray(self.server_cipher.sealer.seal_end())
        end[0] = RecordType.DATA
        self.assert_integrity(bytes(end), [])

    def test_malformed_headers(self) -> None:
        """An unknown type, a length below the tag or above 16 KiB fail at the header."""
        for header in (b"\x09\x00\x10", b"\x02\x00\x0f", struct.pack(">BH", 2, 16382)):
            self.setUp()
            with self.assertRaises(IntegrityError):
                self.client_cipher.decoder.feed(header)

    def test_record_size_bound(self) -> None:
        """seal_data cuts big writes into records of at most 16 KiB; seal refuses more."""
        sealer = self.server_cipher.sealer
        stream = sealer.seal_data(b"x" * (3 * e2e.MAX_PLAINTEXT + 5))
        out = self.client_cipher.decoder.feed(stream)
        self.assertEqual([r.size for r in out], [e2e.MAX_RECORD] * 3 + [5 + 19])
        with self.assertRaises(ValueError):
            sealer.seal(RecordType.DATA, b"x" * (e2e.MAX_PLAINTEXT + 1))
        self.assertEqual(sealer.seal_data(b""), b"")

    def test_max_record_fits_the_smallest_window(self) -> None:
        """A whole record fits the early-data window, the least window a stream gets, so a
        receiver that credits only complete records never stalls a sender."""
        self.assertLessEqual(e2e.MAX_RECORD, fr.EARLY_WINDOW)

    def test_both_directions_independent(self) -> None:
        """Both directions run at once with their own sequence numbers (half-close: one
        ends with END while the other keeps flowing)."""
        up = self.client_cipher.sealer
        down = self.server_cipher.sealer
        self.assertEqual(self.server_cipher.decoder.feed(up.seal_data(b"u1") + up.seal_end())[0]
                         .data, b"u1")
        self.server_cipher.decoder.finish()
        self.assertEqual(self.client_cipher.decoder.feed(down.seal_data(b"d1"))[0].data, b"d1")
        self.assertEqual(self.client_cipher.decoder.feed(down.seal_data(b"d2"))[0].data, b"d2")

    def test_sealer_and_decoder_directly(self) -> None:
        """A sealer and a decoder with the same parameters agree; another pairing id in the
        associated data does not."""
        key = bytes(32)
        sealer = RecordSealer(key, b"A" * 8, 1, Direction.TO_SERVER)
        record = sealer.seal(RecordType.DATA, b"x")
        self.assertEqual(RecordDecoder(key, b"A" * 8, 1, Direction.TO_SERVER).feed(record)[0]
                         .data, b"x")
        with self.assertRaises(IntegrityError):
            RecordDecoder(key, b"B" * 8, 1, Direction.TO_SERVER).feed(record)


class SealedOpenTests(SynchronousTestCase):
    """The OPEN of a ``sealed`` stream: what the Gateway reads, and what it cannot change."""

    def setUp(self) -> None:
        self.server, self.client, _ = pair()

    def sealed(self, stream_number: int) -> bytes:
        """The FIELD_SEALED value of a new stream to HOST:PORT."""
        value, _ = self.server.open_stream(stream_number, e2e.inner_open(
            fr.KIND_TCP, fr.target_fields(HOST, PORT)))
        return value

    def test_gateway_reads_only_the_window(self) -> None:
        """The Gateway's parse of the OPEN header works (window, kind), the target is absent."""
        _, _, payload = open_stream(self.server, self.client, window=65536)
        self.assertEqual(fr.parse_open_header(payload), (65536, 0, e2e.KIND_SEALED))
        self.assertNotIn(HOST.encode(), payload)
        # With origin set by the Gateway, the details still authenticate (origin is clear).
        relayed = fr.with_origin(payload, 3)
        server2, client2, _ = pair()
        value, _ = server2.open_stream(5, e2e.inner_open(fr.KIND_TCP,
                                                         fr.target_fields(HOST, PORT)))
        details, _ = client2.accept_stream(e2e.parse_sealed_open(fr.with_origin(
            e2e.sealed_open_payload(65536, value), 3)))
        self.assertEqual(fr.parse_open(e2e.clear_open_payload(relayed, details)).origin, 3)

    def test_old_acceptor_refuses_new_kinds(self) -> None:
        """A Proxy-Client of an earlier release (kinds tcp and udp only) refuses ``sealed``
        and ``pake`` OPENs with UNSUPPORTED (the opener learns it at once, nothing in clear)."""
        self.patch(fr, "KIND_NAMES", {fr.KIND_TCP: "tcp", fr.KIND_UDP: "udp"})
        for payload in (e2e.sealed_open_payload(65536, self.sealed(1)),
                        e2e.pake_open_payload(65536, PakeInitiator("pw", SESSION).message)):
            with self.assertRaises(fr.StreamError) as caught:
                fr.parse_open(payload)
            self.assertEqual(caught.exception.reason, fr.Reason.UNSUPPORTED)

    def test_parse_open_of_the_new_kinds(self) -> None:
        """This release's parse_open gives a ``sealed``/``pake`` OPEN's one field and no
        target; a HOST beside it, another field or none is a PROTOCOL_ERROR."""
        value = self.sealed(1)
        request = fr.parse_open(fr.with_origin(e2e.sealed_open_payload(65536, value), 4))
        self.assertEqual((request.kind, request.host, request.port, request.origin,
                          request.fields), (fr.KIND_SEALED, "", 0, 4,
                                            ((e2e.FIELD_SEALED, value),)))
        for fields in ([(fr.FIELD_HOST, b"db"), (e2e.FIELD_SEALED, value)],
                       [(e2e.FIELD_SEALED, value), (fr.FIELD_PORT, b"\x00\x16")],
                       [(e2e.FIELD_PAKE, value)], []):
            with self.assertRaises(fr.StreamError) as caught:
                fr.parse_open(fr.open_payload(65536, 0, fr.KIND_SEALED, fields))
            self.assertEqual(caught.exception.reason, fr.Reason.PROTOCOL_ERROR)
        built = fr.build_open(7, fr.OpenRequest(65536, 0, "", 0, fr.KIND_PAKE,
                                                ((e2e.FIELD_PAKE, b"m"),)))
        payload = fr.open_payload(65536, 0, fr.KIND_PAKE, [(e2e.FIELD_PAKE, b"m")])
        self.assertTrue(built.endswith(payload))  # the one field, no HOST or PORT
        self.assertEqual(fr.parse_open(payload).fields, ((e2e.FIELD_PAKE, b"m"),))

    def test_pake_open_round_trip(self) -> None:
        """The ``pake`` OPEN carries the initiator's message and nothing else."""
        message = PakeInitiator("pw", SESSION).message
        payload = e2e.pake_open_payload(65536, message)
        self.assertEqual(e2e.parse_pake_open(fr.with_origin(payload, 9)), message)
        with self.assertRaises(IntegrityError):
            e2e.parse_pake_open(payload + b"\x00")
        with self.assertRaises(IntegrityError):
            e2e.parse_sealed_open(payload)

    def test_replayed_open_is_refused(self) -> None:
        """A sealed OPEN forwarded twice (a replay that would dial the target again with the
        same early data) or an older one after a newer is an integrity failure."""
        first = self.sealed(1)
        second = self.sealed(2)
        self.client.accept_stream(first)
        self.client.accept_stream(second)
        for value in (first, second):
            with self.assertRaises(IntegrityError):
                self.client.accept_stream(value)

    def test_tampered_open_is_refused_and_blocks_nothing(self) -> None:
        """A sealed OPEN with a changed stream number, pairing id or byte is refused, and the
        forged number does not move the replay bound: the real next stream still opens."""
        value = self.sealed(5)
        forged_number = value[:8] + struct.pack(">I", 1000) + value[12:]
        flipped = value[:-1] + bytes([value[-1] ^ 1])
        for bad in (forged_number, flipped, b"\x00" * 8 + value[8:], value[:20]):
            with self.assertRaises(IntegrityError):
                self.client.accept_stream(bad)
        details, _ = self.client.accept_stream(value)
        self.assertEqual(details[0], fr.KIND_TCP)

    def test_open_details_do_not_open_as_data(self) -> None:
        """The OPEN record (sequence 0) cannot be slipped into the data of the stream."""
        value = self.sealed(1)
        _, cipher = self.client.accept_stream(value)
        with self.assertRaises(IntegrityError):
            cipher.decoder.feed(value[12:])

    def test_stream_numbers_rise_at_the_opener(self) -> None:
        """The opener refuses to reuse a stream number (a nonce would repeat)."""
        self.sealed(4)
        with self.assertRaises(ValueError):
            self.sealed(4)
        with self.assertRaises(RuntimeError):
            self.client.open_stream(9, b"\x00")
        with self.assertRaises(RuntimeError):
            self.server.accept_stream(self.sealed(6))


class HandshakeBudgetTests(SynchronousTestCase):
    """The Proxy-Client's bound on unconfirmed handshakes (online guesses)."""

    def test_burst_then_rate(self) -> None:
        """A burst of answers, then one per 1/rate seconds."""
        budget = HandshakeBudget(burst=3, per_second=0.5, now=100.0)
        self.assertEqual([budget.take(100.0) for _ in range(4)], [True, True, True, False])
        self.assertFalse(budget.take(101.0))
        self.assertTrue(budget.take(102.0))
        self.assertFalse(budget.take(102.0))

    def test_refund_of_confirmed_handshakes(self) -> None:
        """A confirmed handshake gives its token back, never beyond the burst."""
        budget = HandshakeBudget(burst=2, per_second=0.0)
        self.assertTrue(budget.take(0.0))
        self.assertTrue(budget.take(0.0))
        self.assertFalse(budget.take(0.0))
        budget.refund(0.0)
        self.assertTrue(budget.take(0.0))
        for _ in range(5):
            budget.refund(0.0)
        self.assertEqual(budget.tokens(0.0), 2.0)

    def test_default_daily_bound(self) -> None:
        """The defaults allow at most 64 + 8,640 unconfirmed answers in a day."""
        budget = HandshakeBudget()
        answered = sum(budget.take(t * 1.0) for t in range(86400))
        self.assertEqual(answered, 64 + 8639)


class MakePasswordTests(SynchronousTestCase):
    """make-password's secret."""

    def test_shape_and_entropy(self) -> None:
        """32 URL-safe characters from 24 random bytes; two calls differ."""
        password = e2e.make_password()
        self.assertEqual(len(password), 32)
        self.assertTrue(all(c.isalnum() or c in "-_" for c in password))
        self.assertNotEqual(password, e2e.make_password())
        self.assertEqual(e2e.make_password(lambda n: bytes(n)), "A" * 32)


def handshake(server: e2e.ServerPairing, client: e2e.ClientPairings, stream_id: int,
              now: float) -> None:
    """One handshake between a Proxy-Server link's state and a Proxy-Client's, relayed as the
    Gateway would (origin set, answer and confirmation cut in two)."""
    message = server.start(now)
    assert message is not None
    server.opened(stream_id)
    payload = fr.with_origin(e2e.pake_open_payload(65536, message), 1)
    answer = client.handshake_requested(stream_id, payload, now)
    confirmation = server.receive(answer[:50], now) + server.receive(answer[50:], now)
    client.handshake_data(stream_id, confirmation[:1], now)
    client.handshake_data(stream_id, confirmation[1:], now)


def sealed_payload(server: e2e.ServerPairing, stream_id: int) -> tuple[bytes, e2e.StreamCipher]:
    """A sealed OPEN payload to HOST:PORT under the server's pairing."""
    value, cipher = server.open_stream(stream_id, e2e.inner_open(
        fr.KIND_TCP, fr.target_fields(HOST, PORT)))
    return fr.with_origin(e2e.sealed_open_payload(65536, value), 1), cipher


class ServerPairingTests(SynchronousTestCase):
    """A Proxy-Server link's pairing policy (docs/protocol.md §9.8)."""

    def test_pairs_and_opens(self) -> None:
        """With a partner it starts a handshake, pairs, and new connections open sealed; the
        Proxy-Client's budget is whole again."""
        server = e2e.ServerPairing("pw", SESSION)
        client = e2e.ClientPairings("pw", SESSION)
        self.assertIsNone(server.start(0.0))  # no partner yet
        self.assertEqual(server.admission().action, "refuse")
        server.set_partner(True, 0.0)
        handshake(server, client, 1, 0.0)
        self.assertIs(server.state, e2e.ServerState.PAIRED)
        self.assertIs(server.admission(), e2e.ADMIT_OPEN)
        self.assertIsNone(server.next_timer(0.0))
        payload, server_cipher = sealed_payload(server, 3)
        details, client_cipher = client.accept(payload, 0.0)
        self.assertEqual(fr.parse_open(e2e.clear_open_payload(payload, details)).host, HOST)
        self.assertEqual(client_cipher.decoder.feed(server_cipher.sealer.seal_data(b"x"))[0]
                         .data, b"x")
        self.assertEqual(client.budget.tokens(0.0), client.budget.burst)
        self.assertEqual(server.budget.tokens(0.0), server.budget.burst)

    def test_waits_during_handshake_then_times_out(self) -> None:
        """While a handshake runs, new connections wait; at its deadline it is given up and
        connections are refused with that reason."""
        server = e2e.ServerPairing("pw", SESSION)
        server.set_partner(True, 0.0)
        self.assertIsNotNone(server.start(0.0))
        self.assertIs(server.admission(), e2e.ADMIT_WAIT)
        self.assertIsNone(server.start(1.0))  # one at a time
        self.assertEqual(server.next_timer(1.0), e2e.PAKE_DEADLINE)
        self.assertFalse(server.expire(9.9))
        self.assertTrue(server.expire(10.0))
        admission = server.admission()
        self.assertEqual(admission.action, "refuse")
        self.assertIn("did not finish within 10 s", admission.message)

    def test_mismatch_refuses_with_reason(self) -> None:
        """A mismatch leaves the reply to send and refuses connections with the mismatch."""
        server = e2e.ServerPairing("one", SESSION)
        client = e2e.ClientPairings("two", SESSION)
        server.set_partner(True, 0.0)
        message = server.start(0.0)
        assert message is not None
        answer = client.handshake_requested(1, e2e.pake_open_payload(65536, message), 0.0)
        with self.assertRaises(PasswordMismatchError) as caught:
            server.receive(answer, 0.0)
        with self.assertRaises(PasswordMismatchError):
            client.handshake_data(1, caught.exception.reply, 0.0)
        self.assertEqual(server.admission(), e2e.Admission("refuse", e2e.MESSAGE_MISMATCH))
        self.assertEqual(len(client), 0)

    def test_guesses_bounded_however_the_gateway_plays(self) -> None:
        """A Gateway that alternates good pairings (which it then resets) with handshakes of
        its own, and toggles PARTNER, still gets at most burst + rate * time failures."""
        server = e2e.ServerPairing("pw", SESSION)
        real = e2e.ClientPairings("pw", SESSION)
        fake = e2e.ClientPairings("guess", SESSION, budget=HandshakeBudget(10**6, 0))
        server.set_partner(True, 0.0)
        failures = 0
        stream_id = 1
        for step in range(3600 * 4):  # an hour in 0.25 s steps
            now = step * 0.25
            server.set_partner(step % 3 != 0, now)
            server.set_partner(True, now)
            message = server.start(now)
            if message is None:
                continue
            server.opened(stream_id)
            if stream_id % 2:
                answer = real.handshake_requested(stream_id, e2e.pake_open_payload(
                    65536, message), now)
                real.handshake_data(stream_id, server.receive(answer, now), now)
                server.ended("reset by the Gateway", now)
            else:
                answer = fake.handshake_requested(stream_id, e2e.pake_open_payload(
                    65536, message), now)
                with self.assertRaises(PasswordMismatchError):
                    server.receive(answer, now)
                failures += 1
            stream_id += 1
        self.assertLessEqual(failures, 5 + 60 + 1)
        self.assertGreater(failures, 50)  # the bound is reached: the test can fail

    def test_partner_without_password(self) -> None:
        """A refusal by a partner without a password waits 60 s or a PARTNER change, and
        says so to local connections (UNSUPPORTED adds the old-release hint)."""
        server = e2e.ServerPairing("pw", SESSION)
        server.set_partner(True, 0.0)
        server.start(0.0)
        server.refused(False, 0.0)
        self.assertEqual(server.admission().message, e2e.MESSAGE_NO_PASSWORD)
        self.assertIsNone(server.start(30.0))
        self.assertEqual(server.next_timer(30.0), 60.0)
        server.set_partner(False, 31.0)
        server.set_partner(True, 31.0)
        self.assertIsNotNone(server.start(31.0))
        server.refused(True, 31.0)
        self.assertIn("release without end-to-end", server.admission().message)
        self.assertIsNotNone(server.start(91.0))

    def test_bytes_after_pairing_end_it(self) -> None:
        """Any byte on the pake stream after the confirmation is an integrity failure that
        ends the pairing; so does the stream's end."""
        server = e2e.ServerPairing("pw", SESSION)
        server.set_partner(True, 0.0)
        handshake(server, e2e.ClientPairings("pw", SESSION), 1, 0.0)
        with self.assertRaises(IntegrityError):
            server.receive(b"x", 0.0)
        self.assertIs(server.state, e2e.ServerState.IDLE)
        with self.assertRaises(RuntimeError):
            server.open_stream(5, b"\x00")
        server.set_partner(True, 0.0)
        handshake(server, e2e.ClientPairings("pw", SESSION), 3, 0.0)
        server.ended("link lost", 1.0)
        self.assertIn("pairing ended (link lost)", server.admission().message)


class ClientPairingsTests(SynchronousTestCase):
    """A Proxy-Client link's pairings."""

    def test_budget_bounds_unconfirmed_answers(self) -> None:
        """Answers to handshakes that are never confirmed take tokens; past the budget the
        OPEN is refused LIMIT; a confirmed handshake refunds its own token."""
        client = e2e.ClientPairings("pw", SESSION, budget=HandshakeBudget(2, 0.0))
        for stream_id in (1, 2):
            client.handshake_requested(stream_id, e2e.pake_open_payload(
                65536, PakeInitiator("guess", SESSION).message), 0.0)
        with self.assertRaises(e2e.HandshakeRefusedError) as caught:
            client.handshake_requested(3, e2e.pake_open_payload(
                65536, PakeInitiator("pw", SESSION).message), 0.0)
        self.assertEqual(caught.exception.reason, "limit")
        client.handshake_ended(1)
        client.handshake_ended(2)
        self.assertEqual(client.budget.tokens(0.0), 0.0)  # failures are not refunded

    def test_sealed_open_confirms_implicitly(self) -> None:
        """A sealed OPEN that authenticates before Ta arrives is accepted and refunds."""
        server = e2e.ServerPairing("pw", SESSION)
        client = e2e.ClientPairings("pw", SESSION, budget=HandshakeBudget(1, 0.0))
        server.set_partner(True, 0.0)
        message = server.start(0.0)
        assert message is not None
        answer = client.handshake_requested(1, e2e.pake_open_payload(65536, message), 0.0)
        confirmation = server.receive(answer, 0.0)
        payload, _ = sealed_payload(server, 3)
        client.accept(payload, 0.0)
        self.assertEqual(client.budget.tokens(0.0), 1.0)
        client.handshake_data(1, confirmation, 0.0)  # Ta still checked when it comes
        self.assertEqual(client.budget.tokens(0.0), 1.0)  # refunded once
        self.assertEqual(client.expire(100.0), [])

    def test_unknown_or_ended_pairing(self) -> None:
        """A sealed OPEN for a pairing that ended (or never was) is an integrity refusal."""
        server = e2e.ServerPairing("pw", SESSION)
        client = e2e.ClientPairings("pw", SESSION)
        server.set_partner(True, 0.0)
        handshake(server, client, 1, 0.0)
        payload, _ = sealed_payload(server, 3)
        client.handshake_ended(1)
        with self.assertRaises(IntegrityError):
            client.accept(payload, 0.0)
        with self.assertRaises(IntegrityError):
            e2e.ClientPairings("pw", SESSION).accept(payload, 0.0)

    def test_overdue_confirmation(self) -> None:
        """A handshake whose Ta does not come within 10 s is dropped (reset TIMEOUT)."""
        client = e2e.ClientPairings("pw", SESSION)
        client.handshake_requested(7, e2e.pake_open_payload(
            65536, PakeInitiator("pw", SESSION).message), 0.0)
        self.assertEqual(client.next_timer(), e2e.PAKE_DEADLINE)
        self.assertEqual(client.expire(9.0), [])
        self.assertEqual(client.expire(10.0), [7])
        self.assertEqual(len(client), 0)
        self.assertIsNone(client.next_timer())

    def test_pairing_bound(self) -> None:
        """At most max_pairings handshakes at once; more is refused LIMIT."""
        client = e2e.ClientPairings("pw", SESSION, max_pairings=2)
        for stream_id in (1, 2):
            client.handshake_requested(stream_id, e2e.pake_open_payload(
                65536, PakeInitiator("pw", SESSION).message), 0.0)
        with self.assertRaises(e2e.HandshakeRefusedError):
            client.handshake_requested(3, e2e.pake_open_payload(
                65536, PakeInitiator("pw", SESSION).message), 0.0)

    def test_malformed_pake_open(self) -> None:
        """A pake OPEN with extra fields, or a sealed one, is an integrity refusal and costs
        no token."""
        client = e2e.ClientPairings("pw", SESSION)
        message = PakeInitiator("pw", SESSION).message
        for payload in (e2e.pake_open_payload(65536, message) + b"\x01\x00\x00",
                        e2e.sealed_open_payload(65536, bytes(40))):
            with self.assertRaises(IntegrityError):
                client.handshake_requested(1, payload, 0.0)
        self.assertEqual(client.budget.tokens(0.0), client.budget.burst)
