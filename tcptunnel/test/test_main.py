"""Tests for ``python -m tcptunnel`` commands."""

from __future__ import annotations

import io
import os

from twisted.trial.unittest import SynchronousTestCase

from tcptunnel.__main__ import main
from tcptunnel.auth import GatewayAuth, ProxyAuth, parse_verifier, scram_username
from tcptunnel.config import TlsFiles
from tcptunnel.test._harness import CONF
from tcptunnel.tls import server_context_factory


class CommandTests(SynchronousTestCase):
    """hash-password, check-config, make-cert."""

    def run_main(self, *argv: str, stdin: str = "") -> tuple[int, str]:
        out = io.StringIO()
        code = main(list(argv), stdin=io.StringIO(stdin), stdout=out)
        return code, out.getvalue()

    def test_hash_password_round_trip(self) -> None:
        """The printed verifier authenticates the password read from stdin, and only it."""
        code, out = self.run_main("hash-password", stdin="s3cret\n")
        self.assertEqual(code, 0)
        info = parse_verifier(out.strip())
        for password, ok in (("s3cret", True), ("wrong", False)):
            user = scram_username(1, 0)
            server = GatewayAuth(info, user, b"k" * 32)
            client = ProxyAuth(1, 0, password)
            server_first = server.challenge(client.start())
            try:
                client.verify(server.finish(client.proof(server_first)))
                result = True
            except Exception:
                result = False
            self.assertEqual(result, ok)

    def test_hash_password_empty(self) -> None:
        """An empty password is refused."""
        self.assertEqual(self.run_main("hash-password", stdin="\n")[0], 1)

    def test_check_config_ok(self) -> None:
        """A valid file: exit 0 and a summary without passwords."""
        code, out = self.run_main("check-config", os.path.join(CONF, "gateway.xml"))
        self.assertEqual(code, 0)
        self.assertIn("listener *:25201 TLS", out)
        self.assertIn("session 123", out)
        self.assertNotIn("change-me", out)

    def test_check_config_bad(self) -> None:
        """An invalid file: exit 1."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("<nope/>")
        self.assertEqual(self.run_main("check-config", path)[0], 1)

    def test_make_cert_usable(self) -> None:
        """make-cert writes a certificate and key a Gateway listener can use, and its pin."""
        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        code, out = self.run_main("make-cert", "--cert", cert, "--key", key)
        self.assertEqual(code, 0)
        self.assertRegex(out, r"pin:\s+[0-9a-f]{64}")
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)
        server_context_factory(TlsFiles(pem_certificate=cert, pem_key=key))
        self.assertEqual(self.run_main("make-cert", "--cert", cert, "--key", key)[0], 1)
