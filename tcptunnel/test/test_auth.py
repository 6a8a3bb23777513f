"""SCRAM-SHA-256: RFC 7677's example, interoperability with scramp, hostile messages."""

from __future__ import annotations

import base64

import scramp
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel.auth import (
    MAX_ITERATIONS,
    GatewayAuth,
    LoginFailed,
    ProxyAuth,
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
