"""Settings files written to the original TcpTunnel's schema, each read as the original
reads it (issue 15; /work/shared/reference/original-tcptunnel.md, section 8.1).

What the original accepts and ignores loads here with a warning naming file and line; what
it uses is used the same way; a file is refused only where the original fails too, or where
running it as the original would is unsafe, and the error says why.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tcptunnel._saslprep import prepare_password, saslprep
from tcptunnel.auth import GatewayAuth, LoginFailed, ProxyAuth, auth_info_for, scram_username
from tcptunnel.config import (
    ConfigError,
    GatewayConfig,
    ProxyConfig,
    Secret,
    Settings,
    parse_settings,
)
from tcptunnel.test._harness import NS

GATEWAY = ('<Instance type="gateway"><Listener port="25201"/>'
           '<Session id="123" proxyClientPassword="a" proxyServerPassword="b"/></Instance>')
CLIENT = ('<Instance type="proxy-client" host="gw.example.org" port="25201">'
          '<Session id="123" password="a"/></Instance>')


def load(body: str, root_attributes: str = "") -> Settings:
    """Parse ``body`` inside <Settings> (which starts on line 2) from /etc/t/settings.xml."""
    data = f'<?xml version="1.0"?>\n<Settings {NS}{root_attributes}>\n{body}\n</Settings>\n'
    return parse_settings(data.encode(), "/etc/t/settings.xml")


def login(gateway_password: str, proxy_password: str) -> bool:
    """Whether a proxy with ``proxy_password`` logs in to a Gateway holding
    ``gateway_password`` (both ends' real SCRAM code)."""
    info = auth_info_for(Secret(cleartext=gateway_password))
    server = GatewayAuth(info, scram_username(1, 0), b"k" * 32)
    client = ProxyAuth(1, 0, proxy_password)
    try:
        client.verify(server.finish(client.proof(server.challenge(client.start()))))
    except LoginFailed:
        return False
    return True


class IgnoredWithWarningTests(SynchronousTestCase):
    """What the original ignores runs here, with a warning naming file and line."""

    def assertWarned(self, warnings: tuple[str, ...] | list[str],  # noqa: N802
                     *fragments: str) -> str:
        """One of ``warnings`` holds every fragment; return it."""
        for warning in warnings:
            if all(fragment in warning for fragment in fragments):
                return warning
        self.fail(f"no warning with {fragments} in {warnings}")

    def test_unknown_attributes(self) -> None:
        """Unknown attributes on <Settings>, <Instance name=...>, <Session comment=...>
        are ignored, each with its line."""
        settings = load('<Instance type="gateway" name="public">\n'
                        '<Session id="1" proxyClientPassword="a" proxyServerPassword="b" '
                        'comment="office"/></Instance>', ' version="2"')
        self.assertWarned(settings.warnings, "settings.xml:2:", "<Settings>", "'version'",
                          "ignored")
        [gateway] = settings.instances
        assert isinstance(gateway, GatewayConfig)
        self.assertEqual(gateway.sessions[0].id, 1)
        self.assertWarned(gateway.warnings, "settings.xml:3:", "<Instance>", "'name'")
        self.assertWarned(gateway.warnings, "settings.xml:4:", "<Session>", "'comment'")

    def test_typo_hint(self) -> None:
        """An unknown attribute that resembles a known one gets the typo hint."""
        settings = load('<Instance type="gateway" loginTimout="5"><Listener port="1"/>'
                        "</Instance>")
        self.assertWarned(settings.instances[0].warnings, "'loginTimout'",
                          "a typo of 'loginTimeout'?")
        self.assertEqual(settings.instances[0].limits.login_timeout, 10.0)  # type: ignore

    def test_other_namespaces(self) -> None:
        """Elements in another namespace or in none are skipped with a warning, as the
        original skips them: a <Listener xmlns=""> listens nowhere."""
        settings = load('<Instance type="gateway" xmlns:x="urn:example">\n'
                        '<x:Note text="hi"><Listener port="2"/></x:Note>\n'
                        '<Listener xmlns="" port="1"/>\n'
                        '<Listener port="3" x:color="red"/></Instance>')
        gateway = settings.instances[0]
        assert isinstance(gateway, GatewayConfig)
        self.assertEqual([listener.port for listener in gateway.listeners], [3])
        self.assertWarned(gateway.warnings, "settings.xml:4:", "{urn:example}Note",
                          "ignored")
        self.assertWarned(gateway.warnings, "settings.xml:5:", "<Listener>",
                          "in no namespace", "ignored", "to use it")
        self.assertWarned(gateway.warnings, "settings.xml:6:", "{urn:example}color")

    def test_unknown_children(self) -> None:
        """<Description> anywhere, and children of <Endpoint>, are skipped with a warning."""
        settings = load('<Description>office tunnel</Description>\n'
                        '<Instance type="proxy-client" host="h" port="1">\n'
                        '<Description/><Session id="1" password="a"/>\n'
                        '<AllowedTargetEndpoints><Endpoint host="t" port="22">\n'
                        '<Note/></Endpoint></AllowedTargetEndpoints></Instance>')
        self.assertWarned(settings.warnings, "settings.xml:3:", "<Description>", "ignored")
        client = settings.instances[0]
        assert isinstance(client, ProxyConfig)
        assert client.allowed_targets is not None
        self.assertEqual([(e.rule.name, str(e.rule.ports)) for e in client.allowed_targets],
                         [("t", "22")])
        self.assertWarned(client.warnings, "settings.xml:5:", "<Description>")
        self.assertWarned(client.warnings, "settings.xml:7:", "<Note>", "inside <Endpoint>")

    def test_xml_attributes(self) -> None:
        """xml:lang and xml:space are XML's own annotations: accepted without a word."""
        settings = load(f'<Instance type="gateway" xml:lang="de" xml:space="preserve">'
                        f'<Listener port="1" xml:lang="en"/></Instance>\n{CLIENT}',
                        ' xml:lang="en"')
        self.assertEqual(settings.all_warnings(), [])

    def test_second_session_in_proxy(self) -> None:
        """A proxy uses its first <Session>, like the original; the second is ignored
        with a warning, Bindings and all."""
        settings = load('<Instance type="proxy-server" host="h" port="1">\n'
                        '<Session id="1" password="a"><Binding listenIp="127.0.0.1" '
                        'listenPort="5" targetHost="t" targetPort="6"/></Session>\n'
                        '<Session id="2" password="b"><Binding listenIp="127.0.0.1" '
                        'listenPort="7" targetHost="t" targetPort="8"/></Session></Instance>')
        server = settings.instances[0]
        assert isinstance(server, ProxyConfig)
        self.assertEqual((server.session_id, server.password.cleartext), (1, "a"))
        self.assertEqual([b.listen_port for b in server.bindings], [5])
        self.assertWarned(server.warnings, "settings.xml:5:", "second <Session>",
                          "settings.xml:4")

    def test_allow_list_placement(self) -> None:
        """<AllowedTargetEndpoints> in a Proxy-Server is ignored; a Proxy-Client's second
        one is ignored and its first is used, as in the original."""
        settings = load('<Instance type="proxy-server" host="h" port="1">'
                        '<Session id="1" password="a"/>\n'
                        '<AllowedTargetEndpoints/></Instance>\n'
                        '<Instance type="proxy-client" host="h" port="1">'
                        '<Session id="1" password="a"/>\n'
                        '<AllowedTargetEndpoints><Endpoint host="t" port="1"/>'
                        '</AllowedTargetEndpoints>\n'
                        '<AllowedTargetEndpoints/></Instance>')
        server, client = settings.instances
        assert isinstance(server, ProxyConfig) and isinstance(client, ProxyConfig)
        self.assertIsNone(server.allowed_targets)
        self.assertWarned(server.warnings, "settings.xml:4:", "<AllowedTargetEndpoints>",
                          "only a Proxy-Client")
        assert client.allowed_targets is not None
        self.assertEqual([e.rule.name for e in client.allowed_targets], ["t"])
        self.assertWarned(client.warnings, "settings.xml:7:", "second <AllowedTargetEndpoints>")

    def test_binding_in_proxy_client(self) -> None:
        """A Proxy-Client does not listen: a <Binding> there is ignored with a warning,
        and so is one written directly inside a Proxy-Server's <Instance>."""
        binding = '<Binding listenIp="127.0.0.1" listenPort="5" targetHost="t" targetPort="6"/>'
        settings = load(f'<Instance type="proxy-client" host="h" port="1">\n'
                        f'<Session id="1" password="a">{binding}</Session></Instance>\n'
                        f'<Instance type="proxy-server" host="h" port="1">'
                        f'<Session id="1" password="a"/>\n{binding}</Instance>')
        client, server = settings.instances
        assert isinstance(client, ProxyConfig) and isinstance(server, ProxyConfig)
        self.assertEqual((client.bindings, server.bindings), ((), ()))
        self.assertWarned(client.warnings, "settings.xml:4:", "no Bindings")
        self.assertWarned(server.warnings, "settings.xml:6:", "belongs inside <Session>")

    def test_pfx_and_pem(self) -> None:
        """With both a PFX file and PEM files the original uses the PFX; a PFX password
        without a PFX is ignored."""
        settings = load('<Instance type="gateway">\n'
                        '<Listener port="1" certificatePfxFilePath="/c/g.pfx" '
                        'certificatePemFilePath="/c/g.pem" certificatePemKeyFilePath="/c/k.pem"/>\n'
                        '<Listener port="2" certificatePfxPassword="x"/></Instance>')
        gateway = settings.instances[0]
        assert isinstance(gateway, GatewayConfig)
        first, second = gateway.listeners
        assert first.tls is not None
        self.assertEqual((first.tls.pfx_file, first.tls.pem_certificate), ("/c/g.pfx", None))
        self.assertIsNone(second.tls)
        self.assertWarned(gateway.warnings, "settings.xml:4:", "the PFX file is used")
        self.assertWarned(gateway.warnings, "settings.xml:5:", "'certificatePfxPassword'",
                          "ignored")

    def test_short_ipv4(self) -> None:
        """ip="127.1" is 127.0.0.1, as .NET's IPAddress.Parse reads it, with a warning."""
        settings = load('<Instance type="gateway"><Listener ip="127.1" port="1"/></Instance>\n'
                        '<Instance type="proxy-server" host="h" port="1"><Session id="1" '
                        'password="a"><Binding listenIp="0x7f.1" listenPort="5" targetHost="t" '
                        'targetPort="6"/></Session></Instance>')
        gateway, server = settings.instances
        assert isinstance(gateway, GatewayConfig) and isinstance(server, ProxyConfig)
        self.assertEqual(gateway.listeners[0].ip, "127.0.0.1")
        self.assertEqual(server.bindings[0].listen_ip, "127.0.0.1")
        self.assertWarned(gateway.warnings, "settings.xml:3:", "'127.1' is read as 127.0.0.1")
        with self.assertRaises(ConfigError):
            load('<Instance type="gateway"><Listener ip="127.0.0.1 x" port="1"/></Instance>')

    def test_empty_settings(self) -> None:
        """An empty <Settings> is valid: nothing runs, and a warning says so."""
        settings = load("")
        self.assertEqual(settings.instances, ())
        self.assertWarned(settings.warnings, "settings.xml:2:", "no <Instance>",
                          "nothing runs")

    def test_type_with_spaces(self) -> None:
        """type=" gateway " runs a Gateway (the original refuses it: there is no other
        reading, so we accept it and warn)."""
        settings = load('<Instance type=" Gateway "><Listener port="1"/></Instance>')
        self.assertIsInstance(settings.instances[0], GatewayConfig)
        self.assertWarned(settings.instances[0].warnings, "'type'", "read as 'gateway'")

    def test_relative_certificate_paths(self) -> None:
        """A relative certificate path names the file next to the settings file (the
        original used its working directory); a warning says which file that is."""
        settings = load('<Instance type="gateway"><Listener port="1" '
                        'certificatePemFilePath="gw.pem" certificatePemKeyFilePath="/k/gw.key"/>'
                        "</Instance>")
        gateway = settings.instances[0]
        assert isinstance(gateway, GatewayConfig)
        assert gateway.listeners[0].tls is not None
        self.assertEqual(gateway.listeners[0].tls.pem_certificate, "/etc/t/gw.pem")
        self.assertWarned(gateway.warnings, "'certificatePemFilePath'", "'gw.pem'",
                          "/etc/t/gw.pem", "working directory")
        self.assertEqual(len(gateway.warnings), 1)  # the absolute key path needs no note

    def test_endpoint_port_out_of_range(self) -> None:
        """The original reads an Endpoint port as any int32, which never matches outside
        1-65535: such an entry is dropped with a warning, not refused."""
        settings = load('<Instance type="proxy-client" host="h" port="1"><Session id="1" '
                        'password="a"/><AllowedTargetEndpoints><Endpoint host="t" port="70000"/>'
                        "</AllowedTargetEndpoints></Instance>")
        client = settings.instances[0]
        assert isinstance(client, ProxyConfig)
        self.assertEqual(client.allowed_targets, ())
        self.assertWarned(client.warnings, "'port'", "70000", "never match")

    def test_original_sample(self) -> None:
        """The reference's sample file loads; its only warning is the Binding's missing
        listenIp."""
        settings = load(
            '<Instance type="gateway"> <Listener port="25201" certificatePfxFilePath="c.pfx"/> '
            '<Session id="123" proxyClientPassword="a" proxyServerPassword="b"/> </Instance>\n'
            '<Instance type="proxy-server" host="gw.example.org" port="25201" useSsl="1"> '
            '<Session id="123" password="b"> <Binding listenPort="5920" '
            'targetHost="192.168.40.80" targetPort="5900"/> </Session> </Instance>\n'
            '<Instance type="proxy-client" host="gw.example.org" port="25201" useSsl="1"> '
            '<Session id="123" password="a"/> <AllowedTargetEndpoints> <Endpoint '
            'host="192.168.40.80" port="5900"/> </AllowedTargetEndpoints> </Instance>')
        self.assertEqual([i.role for i in settings.instances],
                         ["gateway", "proxy-server", "proxy-client"])
        warnings = settings.all_warnings()
        self.assertEqual(len(warnings), 2, warnings)
        self.assertWarned(warnings, "'certificatePfxFilePath'", "relative path")
        self.assertWarned(warnings, "[1] ", "<Binding>", "no listenIp")


class PasswordTests(SynchronousTestCase):
    """Passwords the original accepts keep working."""

    def test_empty_passwords(self) -> None:
        """Empty passwords load (the original accepts them) with a loud warning, and log in."""
        settings = load('<Instance type="gateway"><Listener port="1"/><Session id="1" '
                        'proxyClientPassword="" proxyServerPassword="b"/></Instance>\n'
                        '<Instance type="proxy-client" host="h" port="1">'
                        '<Session id="1" password=""/></Instance>')
        gateway, client = settings.instances
        assert isinstance(gateway, GatewayConfig) and isinstance(client, ProxyConfig)
        self.assertEqual(gateway.sessions[0].proxy_client.cleartext, "")
        self.assertIn("THE PASSWORD IS EMPTY", gateway.warnings[0])
        self.assertIn("anyone", gateway.warnings[0])
        self.assertIn("THE PASSWORD IS EMPTY", client.warnings[0])
        self.assertTrue(login("", ""))
        self.assertFalse(login("", "x"))

    def test_passwords_saslprep_refuses(self) -> None:
        """Passwords SASLprep refuses (tab, newline, emoji, an unassigned code point, mixed
        bidi) load without error and log in, both ends hashing the raw UTF-8."""
        for password in ("a\tb", "a\nb", "pass\U0001f600", "x\u0221y", "\u0627 1", "a\x7fb"):
            with self.assertRaises(ValueError, msg=repr(password)):
                saslprep(password)
            self.assertEqual(prepare_password(password), password.encode("utf-8"))
            self.assertTrue(login(password, password), repr(password))
            self.assertFalse(login(password, password + "x"), repr(password))
        escaped = "a&#9;b&#10;c&#x1F600;"
        settings = load(f'<Instance type="proxy-client" host="h" port="1">'
                        f'<Session id="1" password="{escaped}"/></Instance>')
        client = settings.instances[0]
        assert isinstance(client, ProxyConfig)
        self.assertEqual(client.password.cleartext, "a\tb\nc\U0001f600")
        self.assertEqual(client.warnings, ())

    def test_prepared_passwords_unchanged(self) -> None:
        """Passwords SASLprep accepts are still prepared (U+00AA is "a"), so verifiers made
        before keep working."""
        self.assertEqual(prepare_password("\u00aa"), b"a")
        self.assertTrue(login("\u00aa", "a"))
        self.assertEqual(prepare_password("\u2168"), b"IX")


class ValuesTests(SynchronousTestCase):
    """Values read as the original reads them, or refused where its reading is unsafe."""

    def proxy(self, attributes: str) -> ProxyConfig:
        """A Proxy-Client instance with extra ``attributes``."""
        settings = load(f'<Instance type="proxy-client" host="h" port="1" {attributes}>'
                        '<Session id="1" password="a"/></Instance>')
        instance = settings.instances[0]
        assert isinstance(instance, ProxyConfig)
        return instance

    def assertRefused(self, body: str, *fragments: str) -> None:  # noqa: N802
        """Loading ``body`` raises a ConfigError holding every fragment."""
        with self.assertRaises(ConfigError) as raised:
            load(body)
        for fragment in fragments:
            self.assertIn(fragment, str(raised.exception))

    def test_use_ssl_like_the_original(self) -> None:
        """TRUE, yes, 1 are TLS; 0, false, no, none are plain, as in the original."""
        for text, tls in (("TRUE", True), ("yes", True), ("1", True), ("0", False),
                          ("False", False), ("no", False), ("", False)):
            self.assertEqual(self.proxy(f'useSsl="{text}"').use_tls, tls, text)
        self.assertFalse(self.proxy("").use_tls)

    def test_use_ssl_read_differently_refused(self) -> None:
        """useSsl="true " and "on" are plain TCP in the original, which is not what their
        author meant: refused with the reason."""
        self.assertRefused('<Instance type="proxy-client" host="h" port="1" useSsl="true ">'
                           '<Session id="1" password="a"/></Instance>',
                           "settings.xml:3:", "'useSsl'", "white space", "plain TCP")
        self.assertRefused('<Instance type="proxy-client" host="h" port="1" useSsl="on">'
                           '<Session id="1" password="a"/></Instance>',
                           "'useSsl'", "'on'", "reads any other value as false")

    def test_guarded_near_misses_refused(self) -> None:
        """A misspelt useSsl or AllowedTargetEndpoints would, ignored as in the original,
        run without TLS or let the Proxy-Client dial anything: refused, saying so."""
        self.assertRefused('<Instance type="proxy-client" host="h" port="1" useSSL="true">'
                           '<Session id="1" password="a"/></Instance>',
                           "'useSSL'", "typo of 'useSsl'")
        self.assertRefused('<Instance type="proxy-client" host="h" port="1" useTls="true">'
                           '<Session id="1" password="a"/></Instance>',
                           "'useTls'", "typo of 'useSsl'")
        self.assertRefused('<Instance type="proxy-client" host="h" port="1">'
                           '<Session id="1" password="a"/><AllowedTargetEndpoint/></Instance>',
                           "<AllowedTargetEndpoint>", "dial any target")

    def test_port_numbers(self) -> None:
        """Ports are read as .NET's int.Parse reads them: "2_5990" and other scripts'
        digits are refused; white space and a plus sign are accepted."""
        self.assertRefused('<Instance type="gateway"><Listener port="2_5990"/></Instance>',
                           "'port'", "'2_5990'")
        self.assertRefused('<Instance type="gateway"><Listener port="\u0662\u0665"/></Instance>',
                           "'port'")
        settings = load('<Instance type="gateway"><Listener port=" +25990 "/></Instance>')
        self.assertEqual(settings.instances[0].listeners[0].port, 25990)  # type: ignore

    def test_original_failures_still_fail(self) -> None:
        """Where the original fails to start, so do we: a duplicate session id, a missing
        <Session> in a proxy, an unknown type, a PEM certificate without its key."""
        self.assertRefused('<Instance type="gateway"><Session id="1" proxyClientPassword="a" '
                           'proxyServerPassword="b"/><Session id="1" proxyClientPassword="a" '
                           'proxyServerPassword="b"/></Instance>', "duplicate session id")
        self.assertRefused('<Instance type="proxy-client" host="h" port="1"/>', "<Session")
        self.assertRefused('<Instance type="relay"/>', "unknown instance type")
        self.assertRefused('<Instance type="gateway"><Listener port="1" '
                           'certificatePemFilePath="/c"/></Instance>', "KeyFilePath")

    def test_key_without_certificate_refused(self) -> None:
        """A key file without a certificate is refused: the original would run that
        listener as plain TCP, unencrypted."""
        self.assertRefused('<Instance type="gateway"><Listener port="1" '
                           'certificatePemKeyFilePath="/k"/></Instance>', "plain TCP")

    def test_instances_share_numbering_with_warnings(self) -> None:
        """all_warnings() prefixes each instance's warnings with its [N], in file order."""
        settings = load(f'{GATEWAY}\n<Instance type="proxy-client" host="h" port="1" a="1">'
                        '<Session id="1" password="a"/></Instance>')
        self.assertEqual([w[:4] for w in settings.all_warnings()], ["[1] "])
        self.assertTrue(os.path.isabs(settings.path))
