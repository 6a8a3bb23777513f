"""Tests for ``python -m tcptunnel`` commands."""

from __future__ import annotations

import datetime
import io
import os
import shutil

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel.__main__ import main
from tcptunnel.auth import GatewayAuth, ProxyAuth, parse_verifier, scram_username
from tcptunnel.config import TlsFiles
from tcptunnel.test._harness import CONF, NS
from tcptunnel.tls import server_context_factory


class CommandTests(SynchronousTestCase):
    """hash-password, check-config, make-cert."""

    def run_main(self, *argv: str, stdin: str = "") -> tuple[int, str]:
        """Run a command; its exit code and standard output (standard error is kept in
        self.stderr)."""
        out, self.err = io.StringIO(), io.StringIO()
        code = main(list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=self.err)
        return code, out.getvalue()

    @property
    def stderr(self) -> str:
        """What the last command wrote on standard error."""
        return self.err.getvalue()

    def directory(self) -> str:
        """A new empty directory."""
        path = self.mktemp()
        os.makedirs(path)
        return path

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

    def test_hash_password_iterations(self) -> None:
        """--iterations below 4096 is refused saying it is weak, without blaming the
        password; above the maximum it is refused saying why."""
        code, out = self.run_main("hash-password", "--iterations", "1", stdin="s3cret\n")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("--iterations 1", self.stderr)
        self.assertIn("fewer than 4096", self.stderr)
        self.assertIn("cheap", self.stderr)
        self.assertNotIn("cannot use this password", self.stderr.lower())
        self.assertEqual(self.run_main("hash-password", "--iterations", "10000001",
                                       stdin="s3cret\n")[0], 1)
        self.assertIn("at most 10000000", self.stderr)
        code, out = self.run_main("hash-password", "--iterations", "4096", stdin="a\tb\n")
        self.assertEqual(code, 0)
        self.assertEqual(parse_verifier(out.strip()).iterations, 4096)

    def gateway_files(self) -> tuple[str, str, str]:
        """conf/gateway.xml copied into a new directory with a certificate and key made by
        make-cert next to it: (settings, certificate, key)."""
        folder = self.directory()
        settings = os.path.join(folder, "gateway.xml")
        shutil.copy(os.path.join(CONF, "gateway.xml"), settings)
        os.chmod(settings, 0o600)
        cert, key = (os.path.join(folder, n) for n in ("gateway-cert.pem", "gateway-key.pem"))
        self.assertEqual(self.run_main("make-cert", "--cert", cert, "--key", key)[0], 0)
        return settings, cert, key

    def test_check_config_ok(self) -> None:
        """A file that can start: exit 0, a summary without passwords, and the note that
        ports were not bound."""
        settings, _, _ = self.gateway_files()
        code, out = self.run_main("check-config", settings)
        self.assertEqual(code, 0, self.stderr)
        self.assertIn("listener *:25201 TLS", out)
        self.assertIn("session 123", out)
        self.assertNotIn("change-me", out)
        self.assertIn("binds no port", out)
        self.assertTrue(out.endswith("OK\n"))

    def test_check_config_bad(self) -> None:
        """An invalid file: exit 1."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("<nope/>")
        self.assertEqual(self.run_main("check-config", path)[0], 1)

    def assertCertificateError(self, settings: str, attribute: str,  # noqa: N802
                               *fragments: str) -> None:
        """check-config fails on ``settings``, naming file, line, <Listener>, ``attribute``
        and ``fragments``."""
        with open(settings) as f:
            line = next(n for n, text in enumerate(f, 1) if "<Listener" in text)
        code, out = self.run_main("check-config", settings)
        self.assertEqual((code, out), (1, ""))
        for fragment in (f"{settings}:{line}:", "<Listener>", f"attribute {attribute!r}",
                         *fragments):
            self.assertIn(fragment, self.stderr)

    def test_check_config_missing_certificate(self) -> None:
        """A missing certificate file fails check-config as it fails start-up."""
        settings, cert, _ = self.gateway_files()
        os.unlink(cert)
        self.assertCertificateError(settings, "certificatePemFilePath", cert,
                                    "No such file")

    def test_check_config_not_pem(self) -> None:
        """A certificate file that is not PEM fails check-config."""
        settings, cert, _ = self.gateway_files()
        with open(cert, "w") as f:
            f.write("not a certificate\n")
        self.assertCertificateError(settings, "certificatePemFilePath", "no PEM certificate")

    def test_check_config_key_mismatch(self) -> None:
        """A key that does not belong to the certificate fails check-config, naming the key
        attribute."""
        settings, _, key = self.gateway_files()
        other = self.directory()
        self.assertEqual(self.run_main("make-cert", "--cert", os.path.join(other, "c.pem"),
                                       "--key", key, "--force")[0], 0)
        self.assertCertificateError(settings, "certificatePemKeyFilePath", "does not match")

    def test_check_config_pfx(self) -> None:
        """A PFX file that cannot be opened fails check-config, naming its attribute."""
        folder = self.directory()
        path, pfx = os.path.join(folder, "g.xml"), os.path.join(folder, "g.pfx")
        with open(pfx, "wb") as f:
            f.write(b"not PKCS#12")
        os.chmod(pfx, 0o600)
        with open(path, "w") as f:
            f.write(f'<Settings {NS}>\n<Instance type="gateway">\n<Listener port="1" '
                    f'certificatePfxFilePath="{pfx}" certificatePfxPassword="x"/>'
                    "</Instance></Settings>")
        self.assertEqual(self.run_main("check-config", path), (1, ""))
        for fragment in (f"{path}:3:", "<Listener> attribute 'certificatePfxFilePath'", pfx,
                         "PKCS#12"):
            self.assertIn(fragment, self.stderr)

    def test_check_config_ca_file(self) -> None:
        """A proxy's unreadable caFile fails check-config, naming the attribute."""
        path = os.path.join(self.directory(), "p.xml")
        with open(path, "w") as f:
            f.write(f'<Settings {NS}>\n<Instance type="proxy-client" host="h" port="1" '
                    'useSsl="true" caFile="ca.pem"><Session id="1" password="p"/></Instance>'
                    "</Settings>")
        self.assertEqual(self.run_main("check-config", path)[0], 1)
        for fragment in (f"{path}:2:", "<Instance> attribute 'caFile'", "ca.pem"):
            self.assertIn(fragment, self.stderr)

    def test_check_config_warnings_and_empty_file(self) -> None:
        """An empty <Settings> is OK (nothing runs, and it says so); warnings are printed
        with their file and line."""
        path = os.path.join(self.directory(), "empty.xml")
        with open(path, "w") as f:
            f.write(f'<Settings {NS} comment="x"/>')
        code, out = self.run_main("check-config", path)
        self.assertEqual(code, 0, self.stderr)
        self.assertIn("nothing runs", out)
        self.assertIn(f"warning: {path}:1: <Settings> attribute 'comment'", out)
        self.assertTrue(out.endswith("OK\n"))

    def test_make_cert_usable(self) -> None:
        """make-cert writes a certificate and key a Gateway listener can use, and its pin."""
        directory = self.directory()
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        code, out = self.run_main("make-cert", "--cert", cert, "--key", key)
        self.assertEqual(code, 0)
        self.assertRegex(out, r"pin:\s+[0-9a-f]{64}")
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)
        server_context_factory(TlsFiles(pem_certificate=cert, pem_key=key))
        self.assertEqual(self.run_main("make-cert", "--cert", cert, "--key", key)[0], 1)

    def assertMakeCertRefused(self, *argv: str) -> str:  # noqa: N802
        """make-cert with ``argv`` exits 1 with one line on stderr, no traceback, and
        writes nothing; returns that line."""
        directory = self.directory()
        code, _ = self.run_main("make-cert", "--cert", os.path.join(directory, "c.pem"),
                                "--key", os.path.join(directory, "k.pem"), *argv)
        self.assertEqual(code, 1)
        self.assertEqual(self.stderr.count("\n"), 1, self.stderr)
        self.assertNotIn("Traceback", self.stderr)
        self.assertEqual(os.listdir(directory), [])
        return self.stderr

    def test_make_cert_bad_names(self) -> None:
        """Empty names, names over 64 characters and names that are no host name are
        refused clearly."""
        self.assertIn("empty", self.assertMakeCertRefused("--name", ""))
        long_name = ".".join(["a" * 20] * 4)
        self.assertIn("at most 64", self.assertMakeCertRefused("--name", long_name))
        self.assertIn("not a host name", self.assertMakeCertRefused("--name", "bad name/x"))
        self.assertIn("not a host name", self.assertMakeCertRefused("--name", "a..b"))

    def test_make_cert_idn(self) -> None:
        """An IDN name is written as its IDNA A-label, with a note saying so."""
        directory = self.directory()
        cert = os.path.join(directory, "c.pem")
        code, out = self.run_main("make-cert", "--name", "bücher.example", "--cert", cert,
                                  "--key", os.path.join(directory, "k.pem"))
        self.assertEqual(code, 0, self.stderr)
        self.assertIn("xn--bcher-kva.example", out)
        with open(cert, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(names.value.get_values_for_type(x509.DNSName),
                         ["xn--bcher-kva.example"])

    def test_make_cert_days(self) -> None:
        """--days below 1 (an expired certificate) and absurdly large values are refused;
        a valid value gives that validity."""
        self.assertIn("expired", self.assertMakeCertRefused("--days", "0"))
        self.assertIn("at least 1", self.assertMakeCertRefused("--days", "-10"))
        self.assertIn("at most", self.assertMakeCertRefused("--days", "999999999"))
        directory = self.directory()
        cert = os.path.join(directory, "c.pem")
        self.assertEqual(self.run_main("make-cert", "--days", "2", "--cert", cert, "--key",
                                       os.path.join(directory, "k.pem"))[0], 0)
        with open(cert, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        left = certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        self.assertTrue(datetime.timedelta(days=1) < left <= datetime.timedelta(days=2), left)

    def test_make_cert_unwritable(self) -> None:
        """An unwritable path is a clear error, and no half of the pair is left behind."""
        directory = self.directory()
        key = os.path.join(directory, "k.pem")
        code, _ = self.run_main("make-cert", "--cert", os.path.join(directory, "c.pem"),
                                "--key", os.path.join(directory, "missing", "k.pem"))
        self.assertEqual(code, 1)
        self.assertIn("cannot write", self.stderr)
        self.assertIn("No such file or directory", self.stderr)
        self.assertEqual(os.listdir(directory), [])
        self.assertFalse(os.path.exists(key))
