"""SCRAM-SHA-256: RFC 7677's example, interoperability with scramp, hostile messages."""

from __future__ import annotations

import base64

import scramp
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel.auth import (
    MAX_ITERATIONS,
    AuthInfo,
    GatewayAuth,
    LoginFailed,
    ProxyAuth,
    decoy_iteration_table,
    format_verifier,
    make_auth_info,
    parse_verifier,
    saslprep,
    scram_username,
)

# RFC 7677, section 3.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = ("r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
RFC_CLIENT_FINAL = ("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

USER = scram_username(7, 0)


def login(server: GatewayAuth, client: ProxyAuth) -> None:
    """Run the whole exchange; raises LoginFailed on either side."""
    client.verify(server.finish(client.proof(server.challenge(client.start()))))


class RfcExampleTests(SynchronousTestCase):
    """Byte for byte the exchange of RFC 7677, section 3."""

    def test_client(self) -> None:
        """The proxy side produces the RFC's client messages and accepts its server-final."""
        client = ProxyAuth(0, 0, "pencil", nonce="rOprNGfwEbeRWgbNEkqO", username="user")
        self.assertEqual(client.start(), RFC_CLIENT_FIRST)
        self.assertEqual(client.proof(RFC_SERVER_FIRST), RFC_CLIENT_FINAL)
        client.verify(RFC_SERVER_FINAL)

    def test_server(self) -> None:
        """The Gateway side produces the RFC's server messages from the RFC's password."""
        info = make_auth_info("pencil", 4096, salt=RFC_SALT)
        server = GatewayAuth(info, "user", b"k" * 32, nonce=RFC_SERVER_NONCE)
        self.assertEqual(server.challenge(RFC_CLIENT_FIRST), RFC_SERVER_FIRST)
        self.assertEqual(server.finish(RFC_CLIENT_FINAL), RFC_SERVER_FINAL)

    def test_verifier_text_round_trip(self) -> None:
        """A verifier survives PostgreSQL's text form unchanged."""
        info = make_auth_info("pencil", 4096, salt=RFC_SALT)
        self.assertEqual(parse_verifier(format_verifier(info)), info)


class ScrampInteropTests(SynchronousTestCase):
    """Against an independent implementation, in both directions."""

    def test_our_proxy_with_scramp_server(self) -> None:
        """Our client logs in to scramp's server, and checks its signature."""
        mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
        stored = mechanism.make_auth_info("päss wörd", iteration_count=4096)
        server = mechanism.make_server(lambda _user: stored)
        client = ProxyAuth(7, 0, "päss wörd")
        server.set_client_first(client.start())
        server_first = server.get_server_first()
        server.set_client_final(client.proof(server_first))
        client.verify(server.get_server_final())

    def test_scramp_client_with_our_server(self) -> None:
        """scramp's client logs in to our Gateway side and accepts its signature."""
        server = GatewayAuth(make_auth_info("päss wörd"), USER, b"k" * 32)
        client = scramp.ScramClient(["SCRAM-SHA-256"], USER, "päss wörd")
        server_first = server.challenge(client.get_client_first())
        client.set_server_first(server_first)
        client.set_server_final(server.finish(client.get_client_final()))

    def test_scramp_verifier_accepted(self) -> None:
        """A verifier made by scramp authenticates with our code, and a wrong one fails."""
        salt, stored, server_key, count = scramp.ScramMechanism(
            "SCRAM-SHA-256").make_auth_info("pencil", iteration_count=4096)
        info = make_auth_info("pencil", count, salt=salt)
        self.assertEqual((info.stored_key, info.server_key), (stored, server_key))


class ExchangeTests(SynchronousTestCase):
    """Wrong passwords, unknown sessions and hostile messages fail with LoginFailed."""

    def test_right_and_wrong_password(self) -> None:
        """Only the right password logs in."""
        info = make_auth_info("right")
        login(GatewayAuth(info, USER, b"k" * 32), ProxyAuth(7, 0, "right"))
        with self.assertRaisesRegex(LoginFailed, "wrong password"):
            login(GatewayAuth(info, USER, b"k" * 32), ProxyAuth(7, 0, "wrong"))

    def test_unknown_session_looks_like_a_wrong_password(self) -> None:
        """The decoy answers with the same salt for the same name, and the login fails."""
        first = GatewayAuth(None, USER, b"k" * 32).challenge(ProxyAuth(7, 0, "x").start())
        second = GatewayAuth(None, USER, b"k" * 32).challenge(ProxyAuth(7, 0, "y").start())
        self.assertEqual(first.split(",")[1:], second.split(",")[1:])
        with self.assertRaises(LoginFailed):
            login(GatewayAuth(None, USER, b"k" * 32), ProxyAuth(7, 0, "x"))

    def test_unknown_session_looks_like_a_wrong_password_at_any_count(self) -> None:
        """A decoy drawing from configured counts still fails the login, like a wrong password."""
        for user in (scram_username(n, 0) for n in range(20)):
            with self.assertRaisesRegex(LoginFailed, "wrong password"):
                login(GatewayAuth(None, user, b"k" * 32, decoy_iterations=(1, 2, 3)),
                      ProxyAuth(int(user.split(":")[0]), 0, "x"))

    def test_user_name_must_match_the_frame(self) -> None:
        """A proof for another session's name is refused before any key work."""
        server = GatewayAuth(make_auth_info("pw"), scram_username(8, 0), b"k" * 32)
        with self.assertRaisesRegex(LoginFailed, "user name"):
            server.challenge(ProxyAuth(7, 0, "pw").start())

    def test_malformed_client_messages(self) -> None:
        """Each malformed client message is refused with a reason, never an exception
        of another kind."""
        for client_first in ("", "p=tls-server-end-point,,n=7:0,r=abc", "n,a=admin,n=7:0,r=a",
                             "n,,r=abc,n=7:0", "n,,n=7:0", "n,,n=7:0,r=", "n,,n=7=:0,r=x",
                             "n,,m=ext,n=7:0,r=x"):
            with self.assertRaises(LoginFailed, msg=client_first):
                GatewayAuth(make_auth_info("pw"), USER, b"k" * 32).challenge(client_first)
        client = ProxyAuth(7, 0, "pw")
        server = GatewayAuth(make_auth_info("pw"), USER, b"k" * 32)
        server_first = server.challenge(client.start())
        good = client.proof(server_first)
        nonce = server_first.split(",")[0][2:]
        for client_final in ("", "c=biws", f"c=biws,r={nonce}", f"c=eSws,r={nonce},p=AAAA",
                             f"c=biws,r={nonce}x,p=AAAA", f"c=biws,r={nonce},p=!!",
                             f"c=biws,r={nonce},p=AAAA", "r=x,c=biws,p=AAAA",
                             good.replace("c=biws", "c=bi*s")):
            with self.assertRaises(LoginFailed, msg=client_final):
                GatewayAuth(make_auth_info("pw"), USER, b"k" * 32).finish(client_final)
            with self.assertRaises(LoginFailed, msg=client_final):
                server.finish(client_final)
        self.assertTrue(server.finish(good).startswith("v="), "failed attempts change nothing")

    def test_hostile_gateway_messages(self) -> None:
        """A challenge that does not extend our nonce, asks for absurd work, or a
        server-final with a wrong signature, is refused."""
        client = ProxyAuth(7, 0, "pw", nonce="abc")
        for server_first in ("", "r=abc,s=AAAA,i=4096", "r=xyzdef,s=AAAA,i=4096",
                             f"r=abcdef,s=AAAA,i={MAX_ITERATIONS + 1}", "r=abcdef,s=AAAA,i=-1",
                             "r=abcdef,s=AAAA,i=4\u00b2",
                             "r=abcdef,s=A!,i=4096", "s=AAAA,r=abcdef,i=4096"):
            with self.assertRaises(LoginFailed, msg=server_first):
                client.proof(server_first)
        with self.assertRaisesRegex(LoginFailed, "before server-first"):
            ProxyAuth(7, 0, "pw").verify("v=AAAA")
        server = GatewayAuth(make_auth_info("pw"), USER, b"k" * 32)
        client = ProxyAuth(7, 0, "pw")
        server.finish(client.proof(server.challenge(client.start())))
        for server_final in ("e=invalid-proof", "v=" + "A" * 44, "v=!!", "x=1"):
            with self.assertRaises(LoginFailed, msg=server_final):
                client.verify(server_final)


def _salt_and_count(server_first: str) -> tuple[str, int]:
    """The ``s=`` and ``i=`` values of a server-first message."""
    _nonce, salt, count = server_first.split(",")
    return salt[2:], int(count[2:])


class DecoyIterationTests(SynchronousTestCase):
    """The decoy's ``i=`` does not tell which sessions exist (issue 14, item 7)."""

    def probe(self, session_id: int, counts: tuple[int, ...],
              secret: bytes = b"k" * 32) -> tuple[str, int]:
        """The salt and count the Gateway answers for an unknown session."""
        server = GatewayAuth(None, scram_username(session_id, 0), secret,
                             decoy_iterations=counts)
        return _salt_and_count(server.challenge(ProxyAuth(session_id, 0, "guess").start()))

    def test_probes_are_stable_and_drawn_from_the_configured_counts(self) -> None:
        """Repeated probes of one id get one salt and count, always one configured."""
        counts = (4096, 4096, 20_000, 100_000)
        seen = set()
        for session_id in range(200):
            first = self.probe(session_id, counts)
            self.assertEqual(self.probe(session_id, counts), first)
            self.assertIn(first[1], counts)
            seen.add(first[1])
        self.assertEqual(seen, set(counts))

    def test_salt_does_not_depend_on_the_counts(self) -> None:
        """Adding verifiers with other counts leaves every decoy salt as it was."""
        for session_id in range(50):
            self.assertEqual(self.probe(session_id, (4096,))[0],
                             self.probe(session_id, (4096, 100_000, 7))[0])

    def test_a_rare_count_is_as_common_among_decoys_as_among_sessions(self) -> None:
        """With 1 verifier of 5 at 100,000 iterations, about 1 unknown id in 5 answers
        100,000, for each of several process secrets."""
        counts = (4096, 4096, 4096, 4096, 100_000)
        probes = 2000
        for secret in (b"k" * 32, b"\x00" * 32, bytes(range(32))):
            rare = sum(self.probe(n, counts, secret)[1] == 100_000 for n in range(probes))
            # Binomial(2000, 0.2): mean 400, standard deviation 17.9; 4.5 deviations either way.
            self.assertTrue(320 <= rare <= 480, f"{rare} of {probes} decoys at 100,000")

    def test_roles_of_an_unknown_session_come_together(self) -> None:
        """A session at 100,000 for both roles among sessions at 4096: decoys answer
        100,000 for both roles or for neither, in the configured proportion."""
        verifiers = {}
        for session_id, iterations in enumerate((4096, 4096, 4096, 100_000)):
            info = AuthInfo(b"s" * 16, b"k" * 32, b"k" * 32, iterations)
            verifiers[session_id, 0] = verifiers[session_id, 1] = info
        table = decoy_iteration_table(verifiers)
        reversed_table = decoy_iteration_table(dict(reversed(verifiers.items())))
        self.assertEqual(table, reversed_table, "the order of the verifiers does not matter")
        self.assertEqual(table, {0: (4096, 4096, 4096, 100_000), 1: (4096, 4096, 4096, 100_000)})
        both = 0
        for session_id in range(1000, 3000):
            pair = [_salt_and_count(GatewayAuth(
                None, scram_username(session_id, role), b"k" * 32,
                decoy_iterations=table[role]).challenge(
                    ProxyAuth(session_id, role, "guess").start()))[1] for role in (0, 1)]
            self.assertEqual(pair[0], pair[1], f"session {session_id}")
            both += pair[0] == 100_000
        # Binomial(2000, 0.25): mean 500, standard deviation 19.4; 4.5 deviations either way.
        self.assertTrue(413 <= both <= 587, f"{both} of 2000 decoys at 100,000")

    def test_table_pairs_each_sessions_counts(self) -> None:
        """Entry k of every role's list belongs to one session; incomplete sessions drop out."""
        def info(iterations: int) -> AuthInfo:
            return AuthInfo(b"s" * 16, b"k" * 32, b"k" * 32, iterations)
        table = decoy_iteration_table({(1, 0): info(9000), (1, 1): info(10),
                                       (2, 0): info(20), (2, 1): info(8000),
                                       (3, 0): info(5)})
        self.assertEqual(table, {0: (20, 9000), 1: (8000, 10)})
        self.assertEqual(decoy_iteration_table({}), {})

    def test_default_is_the_default_count(self) -> None:
        """Without configured counts (or with none at all) the decoy asks for 4096."""
        self.assertEqual(_salt_and_count(GatewayAuth(None, USER, b"k" * 32).challenge(
            ProxyAuth(7, 0, "x").start()))[1], 4096)
        self.assertEqual(self.probe(7, ())[1], 4096)

    def test_real_sessions_answer_their_own_count_and_log_in(self) -> None:
        """A real session keeps its verifier's count and logs in whatever the decoys draw."""
        counts = (4096, 4096, 100_000)
        for iterations in (4096, 100_000):
            info = make_auth_info("right", iterations)
            server = GatewayAuth(info, USER, b"k" * 32, decoy_iterations=counts)
            client = ProxyAuth(7, 0, "right")
            server_first = server.challenge(client.start())
            self.assertEqual(_salt_and_count(server_first)[1], iterations)
            client.verify(server.finish(client.proof(server_first)))


class SaslPrepTests(SynchronousTestCase):
    """RFC 4013's examples."""

    def test_examples(self) -> None:
        """Mapping, normalisation and prohibited characters as in RFC 4013, section 3."""
        self.assertEqual(saslprep("I\u00adX"), "IX")
        self.assertEqual(saslprep("user"), "user")
        self.assertEqual(saslprep("\u00aa"), "a")
        self.assertEqual(saslprep("\u2168"), "IX")
        self.assertEqual(saslprep("a\u00a0b"), "a b")
        for bad in ("\u0007", "a\x7fb", "\u0627\u0031"):
            with self.assertRaises(ValueError, msg=repr(bad)):
                saslprep(bad)
