"""Tests for tcptunnel.config: samples load, and every class of error is precise."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tcptunnel.__main__ import main
from tcptunnel.config import (
    ConfigError,
    GatewayConfig,
    ProxyConfig,
    load_settings,
    parse_settings,
)
from tcptunnel.test._harness import CONF, NS, ROOT

ORIGINAL_SAMPLE = f"""<?xml version="1.0" encoding="utf-8"?>
<Settings {NS}>
  <Instance type="gateway">
    <Listener port="25201" certificatePfxFilePath="c.pfx" />
    <Session id="123" proxyClientPassword="a" proxyServerPassword="b" />
  </Instance>
  <Instance type="proxy-server" host="gw.example.org" port="25201" useSsl="1">
    <Session id="123" password="b">
      <Binding listenPort="5920" targetHost="192.168.40.80" targetPort="5900" />
    </Session>
  </Instance>
  <Instance type="Proxy-Client" host="gw.example.org" port="25201" useSsl="yes">
    <Session id="-7" password="a" />
    <AllowedTargetEndpoints>
      <Endpoint host="Host.Example.ORG." port="5900" />
    </AllowedTargetEndpoints>
  </Instance>
</Settings>
"""


def mint_pem(certificate: str | None, key: str) -> None:
    """Write a self-signed certificate and its key at these paths (make-cert)."""
    assert certificate is not None
    code = main(["make-cert", "--cert", certificate, "--key", key],
                stdout=io.StringIO(), stderr=io.StringIO())
    assert code == 0


def settings_with(body: str) -> bytes:
    """A settings document with ``body`` inside <Settings>, starting on line 2."""
    return f'<?xml version="1.0"?>\n<Settings {NS}>\n{body}\n</Settings>\n'.encode()


class SampleTests(SynchronousTestCase):
    """Valid files load to the expected objects."""

    def test_original_sample(self) -> None:
        """The original program's sample layout loads unchanged, in file order."""
        settings = parse_settings(ORIGINAL_SAMPLE.encode(), "/etc/t/settings.xml")
        gateway, server, client = settings.instances
        assert isinstance(gateway, GatewayConfig)
        self.assertEqual(gateway.index, 0)
        self.assertEqual(gateway.listeners[0].port, 25201)
        self.assertIsNone(gateway.listeners[0].ip)
        assert gateway.listeners[0].tls is not None
        self.assertEqual(gateway.listeners[0].tls.pfx_file, "/etc/t/c.pfx")
        self.assertEqual(gateway.sessions[0].id, 123)
        self.assertEqual(gateway.sessions[0].proxy_client.cleartext, "a")
        assert isinstance(server, ProxyConfig)
        self.assertEqual(server.role, "proxy-server")
        self.assertTrue(server.use_tls)
        self.assertEqual(server.bindings[0].target_host, "192.168.40.80")
        self.assertEqual(server.bindings[0].listen_port, 5920)
        self.assertIsNone(server.allowed_targets)
        assert isinstance(client, ProxyConfig)
        self.assertEqual(client.role, "proxy-client")
        self.assertEqual(client.session_id, -7)
        assert client.allowed_targets is not None
        self.assertEqual(client.allowed_targets[0].rule.name, "host.example.org")

    def test_conf_samples(self) -> None:
        """Every sample in conf/ loads."""
        conf = CONF
        names = [n for n in os.listdir(conf) if n.endswith(".xml")]
        self.assertIn("demo.xml", names)
        for name in names:
            settings = load_settings(os.path.join(conf, name))
            self.assertTrue(settings.instances, name)

    def test_samples_match_schema(self) -> None:
        """Every sample in conf/ validates against conf/settings.xsd, and the schema rejects
        an obvious mistake."""
        samples = [os.path.join(CONF, n) for n in os.listdir(CONF) if n.endswith(".xml")]
        self.assertGreaterEqual(len(samples), 4)
        mistake = settings_with('<Instance type="gateway"><Listener port="99999"/></Instance>')
        # In a fresh interpreter: once zope.interface has declared what an abc.ABC subclass
        # provides (Twisted does so in passing), abc.ABC carries a __provides__ that its
        # subclasses cannot read, and xmlschema's class introspection trips over it.
        script = (
            "import sys, xmlschema\n"
            "schema = xmlschema.XMLSchema(sys.argv[1])\n"
            "for sample in sys.argv[3:]:\n"
            "    schema.validate(sample)\n"
            "print('mistake accepted' if schema.is_valid(sys.argv[2]) else 'ok')\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, os.path.join(CONF, "settings.xsd"), mistake, *samples],
            capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "ok"), result.stderr)

    def test_documentation_samples(self) -> None:
        """Every XML sample in README.md and docs/configuration.md is a whole settings file
        that check-config accepts once the certificates it names exist; every twistd
        command in README.md names its own pid file (two roles can run in one folder)."""
        samples = []
        for name in ("README.md", os.path.join("docs", "configuration.md")):
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                text = f.read()
            found = re.findall(r"```xml\n(.*?)```", text, re.DOTALL)
            self.assertTrue(found, name)
            samples += [(name, sample) for sample in found]
            if name == "README.md":
                commands = re.findall(r"twistd [^`\n]*", text)
                self.assertTrue(commands)
                for command in commands:
                    self.assertIn("--pidfile=", command)
        for number, (name, sample) in enumerate(samples):
            folder = os.path.abspath(self.mktemp())
            os.makedirs(folder)
            path = os.path.join(folder, "settings.xml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(sample)
            os.chmod(path, 0o600)
            settings = load_settings(path)
            self.assertTrue(settings.instances, (name, number))
            for instance in settings.instances:
                for listener in getattr(instance, "listeners", ()):
                    assert listener.tls is not None and listener.tls.pem_key is not None
                    mint_pem(listener.tls.pem_certificate, listener.tls.pem_key)
            out, err = io.StringIO(), io.StringIO()
            code = main(["check-config", path], stdout=out, stderr=err)
            self.assertEqual(code, 0, (name, number, err.getvalue()))

    def test_empty_allow_list(self) -> None:
        """A present but empty AllowedTargetEndpoints means nothing is allowed (empty tuple)."""
        settings = parse_settings(settings_with(
            '<Instance type="proxy-client" host="h" port="1"><Session id="1" password="p"/>'
            "<AllowedTargetEndpoints/></Instance>"))
        instance = settings.instances[0]
        assert isinstance(instance, ProxyConfig)
        self.assertEqual(instance.allowed_targets, ())

    def test_use_ssl_spellings(self) -> None:
        """useSsl accepts 1/true/yes (any case) as true and 0/false/no as false."""
        for text, expected in [("1", True), ("TRUE", True), ("Yes", True), ("0", False),
                               ("false", False), ("no", False)]:
            settings = parse_settings(settings_with(
                f'<Instance type="proxy-client" host="h" port="1" useSsl="{text}">'
                '<Session id="1" password="p"/></Instance>'))
            instance = settings.instances[0]
            assert isinstance(instance, ProxyConfig)
            self.assertEqual(instance.use_tls, expected, text)

    def test_password_from_env_and_file(self) -> None:
        """A proxy password may come from an environment variable or a file."""
        os.environ["TCPTUNNEL_TEST_PW"] = "from-env"
        self.addCleanup(os.environ.pop, "TCPTUNNEL_TEST_PW")
        settings = parse_settings(settings_with(
            '<Instance type="proxy-client" host="h" port="1">'
            '<Session id="1" passwordEnv="TCPTUNNEL_TEST_PW"/></Instance>'))
        instance = settings.instances[0]
        assert isinstance(instance, ProxyConfig)
        self.assertEqual(instance.password.cleartext, "from-env")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from-file\n")
        settings = parse_settings(settings_with(
            f'<Instance type="proxy-client" host="h" port="1">'
            f'<Session id="1" passwordFile="{os.path.abspath(path)}"/></Instance>'))
        instance = settings.instances[0]
        assert isinstance(instance, ProxyConfig)
        self.assertEqual(instance.password.cleartext, "from-file")

    def test_windows(self) -> None:
        """initialWindow / maxWindow are read, defaulted, and checked against each other."""
        settings = parse_settings(settings_with(
            '<Instance type="proxy-client" host="h" port="1" initialWindow="65536" '
            'maxWindow="65536"><Session id="1" password="p"/></Instance>'))
        instance = settings.instances[0]
        assert isinstance(instance, ProxyConfig)
        self.assertEqual((instance.initial_window, instance.max_window), (65536, 65536))
        with self.assertRaises(ConfigError) as raised:
            parse_settings(settings_with(
                '<Instance type="proxy-client" host="h" port="1" initialWindow="65536" '
                'maxWindow="20000"><Session id="1" password="p"/></Instance>'))
        self.assertIn("maxWindow must not be smaller", str(raised.exception))

    def test_gateway_unauthenticated_per_address_limit(self) -> None:
        """maxUnauthenticatedLinksPerAddress is read, defaults to 32 and refuses 0."""
        default = parse_settings(settings_with('<Instance type="gateway"/>')).instances[0]
        assert isinstance(default, GatewayConfig)
        self.assertEqual(default.limits.max_unauthenticated_links_per_address, 32)
        given = parse_settings(settings_with(
            '<Instance type="gateway" maxUnauthenticatedLinksPerAddress="4"/>')).instances[0]
        assert isinstance(given, GatewayConfig)
        self.assertEqual(given.limits.max_unauthenticated_links_per_address, 4)
        with self.assertRaises(ConfigError) as raised:
            parse_settings(settings_with(
                '<Instance type="gateway" maxUnauthenticatedLinksPerAddress="0"/>'), "s.xml")
        self.assertIn("s.xml:3:", str(raised.exception))
        self.assertIn("'maxUnauthenticatedLinksPerAddress'", str(raised.exception))

    def test_gateway_queued_bytes_limits(self) -> None:
        """The three queue bounds are read and defaulted; 0, negative, below one frame and
        per link > per session > total are refused naming file:line and the attribute."""
        default = parse_settings(settings_with('<Instance type="gateway"/>')).instances[0]
        assert isinstance(default, GatewayConfig)
        self.assertEqual(
            (default.limits.max_queued_bytes_per_link,
             default.limits.max_queued_bytes_per_session, default.limits.max_queued_bytes),
            (64 * 2**20, 256 * 2**20, 2**30))
        given = parse_settings(settings_with(
            '<Instance type="gateway" maxQueuedBytesPerLink="100000" '
            'maxQueuedBytesPerSession="100000" maxQueuedBytes="300000"/>')).instances[0]
        assert isinstance(given, GatewayConfig)
        self.assertEqual(
            (given.limits.max_queued_bytes_per_link,
             given.limits.max_queued_bytes_per_session, given.limits.max_queued_bytes),
            (100000, 100000, 300000))
        for attributes, fragments in [
            ('maxQueuedBytesPerLink="0"', ("'maxQueuedBytesPerLink'", "'0'", "65545")),
            ('maxQueuedBytesPerSession="-5"', ("'maxQueuedBytesPerSession'", "'-5'")),
            ('maxQueuedBytes="65544"', ("'maxQueuedBytes'", "'65544'")),
            ('maxQueuedBytesPerLink="1.5e6"', ("'maxQueuedBytesPerLink'", "'1.5e6'")),
            ('maxQueuedBytesPerLink="300000000"',
             ("'maxQueuedBytesPerLink'", "must not be larger than maxQueuedBytesPerSession",
              "268435456")),
            ('maxQueuedBytesPerSession="2000000000"',
             ("'maxQueuedBytesPerSession'", "must not be larger than maxQueuedBytes",
              "1073741824")),
        ]:
            with self.assertRaises(ConfigError) as raised:
                parse_settings(settings_with(
                    f'<Instance type="gateway" {attributes}/>'), "s.xml")
            message = str(raised.exception)
            self.assertIn("s.xml:3:", message)
            for fragment in fragments:
                self.assertIn(fragment, message)

    def test_secrets_not_in_repr(self) -> None:
        """Passwords never show up in the repr of a parsed configuration."""
        settings = parse_settings(ORIGINAL_SAMPLE.encode())
        self.assertNotIn("password='a'", repr(settings))
        self.assertNotIn("'b'", repr(settings.instances[1]))


class ErrorTests(SynchronousTestCase):
    """Each class of error names file, line, element and attribute."""

    def assertError(self, body: str, *fragments: str) -> str:  # noqa: N802
        with self.assertRaises(ConfigError) as raised:
            parse_settings(settings_with(body), "s.xml")
        message = str(raised.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_missing_attribute(self) -> None:
        """A missing required attribute is named with its element and line."""
        self.assertError('<Instance type="gateway">\n<Listener />\n</Instance>',
                         "s.xml:4:", "<Listener>", "'port'")

    def test_unknown_attribute(self) -> None:
        """A near miss of an attribute whose loss is unsafe (ip: the listen address) is an
        error; a missing required attribute names the unknown one that resembles it."""
        self.assertError('<Instance type="gateway"><Listener port="1" ipp="::1"/></Instance>',
                         "s.xml:3:", "<Listener>", "unknown attribute 'ipp'", "typo of 'ip'")
        self.assertError('<Instance type="gateway"><Listener prot="1"/></Instance>',
                         "s.xml:3:", "missing required attribute 'port'", "'prot' a typo")

    def test_unknown_element(self) -> None:
        """An unknown element is skipped with a warning naming its line and what is
        allowed there, with a typo hint."""
        settings = parse_settings(settings_with(
            '<Instance type="gateway">\n\n<Listner port="1"/></Instance>'), "s.xml")
        gateway = settings.instances[0]
        assert isinstance(gateway, GatewayConfig)
        self.assertEqual(gateway.listeners, ())
        [warning] = gateway.warnings
        for fragment in ("s.xml:5:", "<Listner>", "ignored", "a typo of <Listener>?"):
            self.assertIn(fragment, warning)

    def test_bad_port(self) -> None:
        """Ports outside 1-65535 (0 only for listeners) are refused with the value."""
        self.assertError('<Instance type="gateway"><Listener port="70000"/></Instance>',
                         "'port'", "70000", "0 to 65535")
        self.assertError('<Instance type="proxy-client" host="h" port="0">'
                         '<Session id="1" password="p"/></Instance>', "'port'", "1 to 65535")
        self.assertError('<Instance type="proxy-server" host="h" port="1"><Session id="1" '
                         'password="p"><Binding listenPort="1" targetHost="t" targetPort="x"/>'
                         "</Session></Instance>", "<Binding>", "'targetPort'", "'x'")

    def test_bad_ip(self) -> None:
        """A listen address must be an IP literal."""
        self.assertError('<Instance type="gateway"><Listener ip="localhost" port="1"/></Instance>',
                         "'ip'", "'localhost'", "IPv4 or IPv6")

    def test_duplicate_session(self) -> None:
        """Two sessions with one id are refused, naming both lines."""
        self.assertError(
            '<Instance type="gateway">\n'
            '<Session id="5" proxyClientPassword="a" proxyServerPassword="b"/>\n'
            '<Session id="5" proxyClientPassword="a" proxyServerPassword="b"/>\n</Instance>',
            "s.xml:5:", "duplicate session id 5", "s.xml:4")

    def test_two_bindings_same_address(self) -> None:
        """Two Bindings on one address (or any-address and a specific one) clash."""
        self.assertError(
            '<Instance type="proxy-server" host="h" port="1"><Session id="1" password="p">\n'
            '<Binding listenPort="80" targetHost="t" targetPort="1"/>\n'
            '<Binding listenIp="127.0.0.1" listenPort="80" targetHost="t" targetPort="2"/>\n'
            "</Session></Instance>", "s.xml:5:", "port 80", "s.xml:4")

    def test_wrong_root(self) -> None:
        """A wrong root element names the expected one."""
        with self.assertRaises(ConfigError) as raised:
            parse_settings(f"<Config {NS}/>".encode(), "s.xml")
        self.assertIn("root element must be <Settings", str(raised.exception))

    def test_wrong_namespace(self) -> None:
        """A root element outside the TcpTunnel namespace is refused with a hint (the
        original fails too)."""
        with self.assertRaises(ConfigError) as raised:
            parse_settings(b"<Settings/>", "s.xml")
        self.assertIn("namespace", str(raised.exception))

    def test_unknown_type(self) -> None:
        """An unknown instance type lists the valid ones."""
        self.assertError('<Instance type="relay"/>', "'relay'", "gateway, proxy-client")

    def test_windows_store(self) -> None:
        """certificateHash explains that the Windows store is not supported."""
        self.assertError('<Instance type="gateway"><Listener port="1" certificateHash="ab"/>'
                         "</Instance>", "Windows certificate store is not supported",
                         "PEM or PFX")

    def test_pem_without_key(self) -> None:
        """A PEM certificate needs its key file."""
        self.assertError('<Instance type="gateway"><Listener port="1" '
                         'certificatePemFilePath="c.pem"/></Instance>', "certificatePemKeyFilePath")

    def test_xml_bomb(self) -> None:
        """Entity expansion (billion laughs) is refused before it expands."""
        bomb = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
                b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">]>\n'
                b'<Settings xmlns="https://github.com/kpreisser/TcpTunnel">&lol2;</Settings>')
        with self.assertRaises(ConfigError) as raised:
            parse_settings(bomb, "s.xml")
        self.assertIn("DTD", str(raised.exception))

    def test_external_entity(self) -> None:
        """External entities are refused."""
        xxe = (b'<?xml version="1.0"?>\n<!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
               b'<Settings xmlns="https://github.com/kpreisser/TcpTunnel">&x;</Settings>')
        with self.assertRaises(ConfigError):
            parse_settings(xxe, "s.xml")

    def test_not_well_formed(self) -> None:
        """Broken XML reports its line."""
        with self.assertRaises(ConfigError) as raised:
            parse_settings(f"<Settings {NS}>\n<Instance>\n</Settings>".encode(), "s.xml")
        self.assertIn("s.xml:3:", str(raised.exception))
        self.assertIn("not well-formed", str(raised.exception))

    def test_unreadable_file(self) -> None:
        """A missing file is one clear message."""
        with self.assertRaises(ConfigError) as raised:
            load_settings("/nonexistent/settings.xml")
        self.assertIn("cannot read the settings file", str(raised.exception))

    def test_missing_session(self) -> None:
        """A proxy without <Session> is refused."""
        self.assertError('<Instance type="proxy-client" host="h" port="1"/>',
                         "missing required child element <Session")

    def test_missing_env_variable(self) -> None:
        """passwordEnv naming an unset variable is an error naming it."""
        self.assertError('<Instance type="proxy-client" host="h" port="1">'
                         '<Session id="1" passwordEnv="TCPTUNNEL_SURELY_UNSET"/></Instance>',
                         "TCPTUNNEL_SURELY_UNSET", "not set")

    def test_bad_verifier(self) -> None:
        """A malformed ...PasswordHash is refused with the expected format."""
        self.assertError('<Instance type="gateway"><Session id="1" proxyClientPasswordHash="x" '
                         'proxyServerPassword="b"/></Instance>', "SCRAM-SHA-256$")


class StartupWarningTests(SynchronousTestCase):
    """Risks worth a warning at start-up: files other users can read, open Bindings."""

    def write(self, name: str, text: str, mode: int) -> str:
        """Write ``text`` to a new file ``name`` with ``mode``; its path."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_settings_file_readable_by_others(self) -> None:
        """A settings file holding passwords that other users may read is named with its
        mode and the chmod that fixes it; at 0600, or without secrets, nothing is said."""
        body = ('<Instance type="gateway"><Session id="1" proxyClientPassword="a" '
                'proxyServerPassword="b"/></Instance>')
        path = self.write("s.xml", settings_with(body).decode(), 0o644)
        [warning] = load_settings(path).warnings
        for fragment in (path, "mode 0644", f"chmod o-rwx {path}"):
            self.assertIn(fragment, warning)
        os.chmod(path, 0o640)
        self.assertEqual(load_settings(path).warnings, ())
        empty = self.write("e.xml", settings_with('<Status listenPort="0"/>').decode(), 0o644)
        self.assertEqual([w for w in load_settings(empty).warnings if "mode" in w], [])

    def test_password_file_readable_by_others(self) -> None:
        """A passwordFile other users may read gets a warning on its <Session> line."""
        secret = self.write("pw", "s3cret\n", 0o604)
        settings = parse_settings(settings_with(
            '<Instance type="proxy-client" host="h" port="1">\n'
            f'<Session id="1" passwordFile="{secret}"/></Instance>'), "s.xml")
        [warning] = settings.instances[0].warnings
        for fragment in ("s.xml:4:", "'passwordFile'", secret, "mode 0604", "chmod o-rwx"):
            self.assertIn(fragment, warning)

    def test_private_key_readable_by_others(self) -> None:
        """A Listener's private key (PEM key or PFX) other users may read gets a warning."""
        key = self.write("k.pem", "key", 0o644)
        pfx = self.write("g.pfx", "pfx", 0o600)
        settings = parse_settings(settings_with(
            f'<Instance type="gateway">\n<Listener port="1" certificatePemFilePath="/c.pem" '
            f'certificatePemKeyFilePath="{key}"/>\n'
            f'<Listener port="2" certificatePfxFilePath="{pfx}"/></Instance>'), "s.xml")
        [warning] = settings.instances[0].warnings
        for fragment in ("s.xml:4:", "private key file", key, "mode 0644"):
            self.assertIn(fragment, warning)

    def test_binding_without_listen_ip(self) -> None:
        """A Binding without listenIp warns that it listens on every address; one with
        listenIp does not."""
        settings = parse_settings(settings_with(
            '<Instance type="proxy-server" host="h" port="1"><Session id="1" password="p">\n'
            '<Binding listenPort="2222" targetHost="t" targetPort="22"/>\n'
            '<Binding listenIp="127.0.0.1" listenPort="2223" targetHost="t" targetPort="22"/>'
            "</Session></Instance>"), "s.xml")
        [warning] = settings.instances[0].warnings
        for fragment in ("s.xml:4:", "<Binding>", "every address", "port 2222", "t:22",
                         'listenIp="127.0.0.1"'):
            self.assertIn(fragment, warning)
