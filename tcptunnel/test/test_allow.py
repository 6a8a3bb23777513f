"""Tests for the allow-list rules (tcptunnel._allow)."""

from __future__ import annotations

import ipaddress
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tcptunnel._allow import (
    AllowList,
    AllowListError,
    PortSet,
    TargetError,
    parse_rule,
    parse_target,
)
from tcptunnel._frames import Reason

EXAMPLES = int(os.environ.get("TCPTUNNEL_FUZZ_EXAMPLES", "200"))

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not s.isdigit())
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)
_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(
    lambda a: a.ipv4_mapped is None)


def _mapped(address: ipaddress.IPv4Address) -> str:
    return f"::ffff:{address}"


class PortSetTests(SynchronousTestCase):
    """Port lists and ranges."""

    def test_list_and_ranges(self) -> None:
        """``22,80,8000-8100`` holds exactly those ports."""
        ports = PortSet.parse("22, 80,8000-8100")
        self.assertEqual([p for p in range(1, 65536) if p in ports],
                         [22, 80, *range(8000, 8101)])
        self.assertEqual(str(ports), "22,80,8000-8100")

    def test_bad_port_lists_refused(self) -> None:
        """Empty items, 0, 65536, reversed ranges, signs and words are refused."""
        for text in ("", "22,", "0", "65536", "100-99", "+22", "22-", "-5", "ssh", "1_000",
                     "٢٢"):
            self.assertRaises(AllowListError, PortSet.parse, text)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 300)), min_size=1,
                    max_size=8), st.lists(st.integers(1, 65535), max_size=20))
    def test_membership_matches_naive_set(self, items: list[tuple[int, int]],
                                          probes: list[int]) -> None:
        """Any list of ports and ranges holds exactly the ports it names (merging included)."""
        text = ",".join(str(low) if not extra else f"{low}-{min(low + extra, 65535)}"
                        for low, extra in items)
        naive = {p for low, extra in items for p in range(low, min(low + extra, 65535) + 1)}
        ports = PortSet.parse(text)
        for port in probes + [low for low, _ in items] + [low - 1 for low, _ in items]:
            self.assertEqual(port in ports, port in naive, (text, port))
        self.assertEqual(PortSet.parse(str(ports)), ports)


class TargetTests(SynchronousTestCase):
    """Normalisation of requested hosts: what is checked is what is dialled."""

    def test_trailing_dot_ip_is_the_literal(self) -> None:
        """``127.0.0.1.`` is the IP literal 127.0.0.1, dialled as such (never a DNS name)."""
        target = parse_target("127.0.0.1.")
        self.assertEqual((target.host, target.is_name), ("127.0.0.1", False))
        self.assertEqual(parse_target("::1.").host, "::1")

    def test_names_normalised(self) -> None:
        """Case, one trailing dot and IDNA are normalised; ``localhost.`` dials ``localhost``."""
        self.assertEqual(parse_target("localhost.").host, "localhost")
        self.assertEqual(parse_target("WWW.Example.ORG").host, "www.example.org")
        self.assertEqual(parse_target("Bücher.Example.").host, "xn--bcher-kva.example")
        self.assertEqual(parse_target("xn--bcher-kva.example").host, "xn--bcher-kva.example")
        # IDNA 2008, as clients send it (IDNA 2003 would make this strasse.de)
        self.assertEqual(parse_target("straße.de").host, "xn--strae-oqa.de")
        self.assertEqual(parse_rule("straße.de", "443").name, "xn--strae-oqa.de")

    def test_mapped_and_bracketed(self) -> None:
        """IPv4-mapped IPv6 is its IPv4 address; ``[::1]`` is ``::1``."""
        self.assertEqual(parse_target("::ffff:10.0.0.1").host, "10.0.0.1")
        self.assertEqual(parse_target("::FFFF:a00:1").host, "10.0.0.1")
        self.assertEqual(parse_target("[::1]").host, "::1")
        self.assertEqual(parse_target("2001:DB8:0:0::1").host, "2001:db8::1")

    def test_malformed_refused(self) -> None:
        """Legacy numbers, zone indices, empty labels, two dots and odd characters are refused."""
        for host in ("127.1", "0x7f000001", "2130706433", "010.0.0.1", "1.2.3.4.5", "a.123",
                     "fe80::1%eth0", "[fe80::1%25eth0]", "a..b", "a.b..", ".", "", "a b",
                     "a/b", "a:b", "user@host", "*.example", "a" * 64 + ".example",
                     "a\x1b[2J", "[example.org]"):
            self.assertRaises(TargetError, parse_target, host)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.text(max_size=300))
    def test_arbitrary_text(self, host: str) -> None:
        """Any text is a Target or a TargetError, and a Target's host is stable and bounded."""
        try:
            target = parse_target(host)
        except TargetError:
            return
        self.assertLessEqual(len(target.host), 253)
        self.assertFalse(target.host.endswith("."))
        self.assertEqual(parse_target(target.host), target)


class RuleTests(SynchronousTestCase):
    """Parsing of ``<Endpoint>`` rules."""

    def test_kinds(self) -> None:
        """Literals, networks, ``*.`` suffixes and names become the right kind of rule."""
        self.assertEqual(parse_rule("127.0.0.1", "22").kind, "address")
        self.assertEqual(parse_rule("127.0.0.1.", "22").kind, "address")
        self.assertEqual(parse_rule("[::1]", "22").kind, "address")
        self.assertEqual(parse_rule("192.168.40.0/24", "22").kind, "network")
        self.assertEqual(parse_rule("fd00::/8", "22").kind, "network")
        self.assertEqual(parse_rule("*.Corp.Example.", "22").name, "corp.example")
        self.assertEqual(parse_rule("Intranet.", "80").name, "intranet")

    def test_mapped_network_is_ipv4(self) -> None:
        """``::ffff:10.0.0.0/104`` is the IPv4 network 10.0.0.0/8."""
        rule = parse_rule("::ffff:10.0.0.0/104", "22")
        self.assertEqual(rule.network, ipaddress.IPv4Network("10.0.0.0/8"))

    def test_bad_rules_refused(self) -> None:
        """Host bits set, bad prefixes, misplaced ``*`` and bad names are errors."""
        for host in ("192.168.40.1/24", "10.0.0.0/33", "fd00::/129", "a.b/8", "*", "a.*.b",
                     "*corp.example", "*.", "*.*.x", "x*.example", "127.1", "a..b"):
            self.assertRaises(AllowListError, parse_rule, host, "22")

    def test_proxy_protocol(self) -> None:
        """proxyProtocol v1/v2 is kept on the rule that allows the target; others refused."""
        allow = AllowList([parse_rule("10.0.0.0/8", "25", "", "v2"), parse_rule("*.x", "25")])
        decision = allow.check("10.1.2.3", 25)
        self.assertEqual(decision.rule and decision.rule.proxy_protocol, "v2")
        other = allow.check("mail.x", 25)
        self.assertIsNone(other.rule and other.rule.proxy_protocol)
        self.assertRaises(AllowListError, parse_rule, "10.0.0.0/8", "25", "", "v3")

    def test_describe_names_rule_and_place(self) -> None:
        """A rule describes itself as written, with its file and line."""
        rule = parse_rule("10.0.0.0/8", "8000-8100,22", "s.xml:12")
        self.assertEqual(rule.describe(),
                         '<Endpoint host="10.0.0.0/8" port="22,8000-8100"> at s.xml:12')


class AllowListTests(SynchronousTestCase):
    """Decisions, with the rule that made them."""

    def setUp(self) -> None:
        self.rules = [
            parse_rule("127.0.0.1", "22", "s.xml:1"),
            parse_rule("192.168.40.0/24", "22,80,8000-8100", "s.xml:2"),
            parse_rule("2001:db8::/32", "443", "s.xml:3"),
            parse_rule("*.corp.example", "443", "s.xml:4"),
            parse_rule("localhost", "8080", "s.xml:5"),
        ]
        self.allow = AllowList(self.rules)

    def test_exact_entries_keep_working(self) -> None:
        """Exact host and port entries allow just that pair, names case-insensitively."""
        decision = self.allow.check("LocalHost", 8080)
        self.assertEqual((decision.reason, decision.rule, decision.target and decision.target.host),
                         (Reason.OK, self.rules[4], "localhost"))
        self.assertEqual(self.allow.check("127.0.0.1", 22).rule, self.rules[0])
        self.assertEqual(self.allow.check("127.0.0.1", 23).reason, Reason.DENIED)
        self.assertEqual(self.allow.check("localhost", 22).reason, Reason.DENIED)

    def test_literal_entry_does_not_allow_a_name(self) -> None:
        """The entry 127.0.0.1 does not allow the name ``localhost``, nor 127.0.0.1 the
        entry ``localhost``: IP-literal entries match IP literals only."""
        self.assertEqual(self.allow.check("localhost", 22).reason, Reason.DENIED)
        self.assertEqual(self.allow.check("127.0.0.1", 8080).reason, Reason.DENIED)

    def test_trailing_dot_ip_checked_and_dialled_as_literal(self) -> None:
        """``127.0.0.1.`` passes the entry 127.0.0.1 only as that literal, which is dialled."""
        decision = self.allow.check("127.0.0.1.", 22)
        assert decision.target is not None
        self.assertEqual((decision.reason, decision.target.host, decision.target.is_name,
                          decision.resolve), (Reason.OK, "127.0.0.1", False, False))
        dotted = self.allow.check("localhost.", 8080)
        assert dotted.target is not None
        self.assertEqual((dotted.reason, dotted.target.host), (Reason.OK, "localhost"))

    def test_networks(self) -> None:
        """A CIDR rule allows IP literals inside it on its ports, IPv4 and IPv6."""
        self.assertEqual(self.allow.check("192.168.40.7", 8050).rule, self.rules[1])
        self.assertEqual(self.allow.check("192.168.41.7", 22).reason, Reason.DENIED)
        self.assertEqual(self.allow.check("2001:db8:1::5", 443).rule, self.rules[2])
        self.assertEqual(self.allow.check("[2001:db8::5]", 443).rule, self.rules[2])
        self.assertEqual(self.allow.check("2001:db9::5", 443).reason, Reason.DENIED)

    def test_mapped_ipv6_is_ipv4(self) -> None:
        """``::ffff:192.168.40.7`` is allowed as 192.168.40.7 and dialled as IPv4."""
        decision = self.allow.check("::ffff:192.168.40.7", 22)
        assert decision.target is not None
        self.assertEqual((decision.reason, decision.target.host), (Reason.OK, "192.168.40.7"))
        self.assertEqual(self.allow.check("::ffff:127.0.0.1", 22).rule, self.rules[0])

    def test_network_does_not_allow_names(self) -> None:
        """A name is never allowed by a network rule (it is not resolved to be checked)."""
        decision = self.allow.check("router.lan", 80)
        self.assertEqual((decision.reason, decision.rule), (Reason.DENIED, None))
        self.assertIn("no name rule", decision.why)

    def test_wildcard_label_wise(self) -> None:
        """``*.corp.example`` allows names under it, not itself, not a string suffix."""
        self.assertEqual(self.allow.check("git.corp.example", 443).rule, self.rules[3])
        self.assertEqual(self.allow.check("a.b.CORP.example.", 443).rule, self.rules[3])
        for host in ("corp.example", "xcorp.example", "corp.example.evil", "corp-example",
                     "git.corp.example.evil.org"):
            self.assertEqual(self.allow.check(host, 443).reason, Reason.DENIED, host)

    def test_denial_names_nearest_rule(self) -> None:
        """A wrong port is refused naming the rule whose host matched and its ports."""
        decision = self.allow.check("192.168.40.9", 23)
        self.assertEqual((decision.reason, decision.rule), (Reason.DENIED, self.rules[1]))
        self.assertIn("allows only ports 22,80,8000-8100", decision.why)
        self.assertIn("s.xml:2", decision.why)

    def test_invalid_targets(self) -> None:
        """Malformed hosts and ports are INVALID_TARGET, not DENIED."""
        for host, port in (("127.1", 22), ("a..b", 443), ("x.corp.example", 0),
                           ("x.corp.example", 65536)):
            self.assertEqual(self.allow.check(host, port).reason, Reason.INVALID_TARGET)

    def test_no_list_allows_everything(self) -> None:
        """Without AllowedTargetEndpoints every valid target is allowed, still normalised."""
        decision = AllowList(None).check("Example.ORG.", 1)
        assert decision.target is not None
        self.assertEqual((decision.reason, decision.target.host), (Reason.OK, "example.org"))
        self.assertEqual(AllowList(None).check("127.1", 1).reason, Reason.INVALID_TARGET)

    def test_empty_list_allows_nothing(self) -> None:
        """An empty AllowedTargetEndpoints refuses every target."""
        self.assertEqual(AllowList([]).check("127.0.0.1", 22).reason, Reason.DENIED)


class ProtocolTests(SynchronousTestCase):
    """A rule's protocol: tcp (the default) or udp, one never allowing the other."""

    def test_protocol_of_rules(self) -> None:
        """A udp rule allows udp streams only, a tcp rule tcp only; the denial names the
        rule of the other protocol."""
        allow = AllowList([parse_rule("10.0.0.53", "53", protocol="udp"),
                           parse_rule("10.0.0.0/8", "22")])
        self.assertTrue(allow.check("10.0.0.53", 53, "udp").allowed)
        tcp = allow.check("10.0.0.53", 53)
        self.assertEqual((tcp.reason, tcp.rule), (Reason.DENIED, allow.rules[0]))  # type: ignore[index]
        self.assertIn("allows udp only", tcp.why)
        self.assertFalse(allow.check("10.0.0.1", 22, "udp").allowed)
        self.assertTrue(allow.check("10.0.0.1", 22).allowed)
        self.assertIn('protocol="udp"', allow.rules[0].describe())  # type: ignore[index]

    def test_resolved_addresses_by_protocol(self) -> None:
        """checkResolvedAddresses takes only networks of the stream's protocol."""
        allow = AllowList([parse_rule("dns.corp.example", "53", protocol="udp"),
                           parse_rule("10.0.0.0/8", "53", protocol="udp"),
                           parse_rule("192.168.0.0/16", "53")], check_resolved_addresses=True)
        self.assertTrue(allow.check("dns.corp.example", 53, "udp").resolve)
        checked = allow.check_addresses(53, ["10.1.1.1", "192.168.1.1"], "udp")
        self.assertEqual([a.compressed for a in checked.addresses], ["10.1.1.1"])

    def test_bad_protocol(self) -> None:
        """Only tcp and udp; proxyProtocol is for tcp rules only."""
        self.assertRaises(AllowListError, parse_rule, "h", "1", protocol="sctp")
        self.assertRaises(AllowListError, parse_rule, "h", "1", "", "v1", "udp")


class ResolvedAddressTests(SynchronousTestCase):
    """checkResolvedAddresses: a name's addresses must be in the networks."""

    def setUp(self) -> None:
        self.rules = [
            parse_rule("*.corp.example", "22,443", "s.xml:1"),
            parse_rule("10.0.0.0/8", "22", "s.xml:2"),
            parse_rule("fd00::/8", "22", "s.xml:3"),
            parse_rule("192.0.2.10", "443", "s.xml:4"),
        ]
        self.allow = AllowList(self.rules, check_resolved_addresses=True)

    def test_name_must_be_resolved_first(self) -> None:
        """An allowed name comes back with resolve=True and the name rule."""
        decision = self.allow.check("git.corp.example", 22)
        self.assertEqual((decision.reason, decision.resolve, decision.rule),
                         (Reason.OK, True, self.rules[0]))
        literal = self.allow.check("10.1.1.1", 22)
        self.assertEqual((literal.reason, literal.resolve), (Reason.OK, False))

    def test_only_addresses_in_networks_are_dialled(self) -> None:
        """A DNS answer outside the networks (rebinding to 127.0.0.1) is not dialled."""
        result = self.allow.check_addresses(
            22, ["10.2.3.4", "127.0.0.1", "::ffff:10.9.9.9", "fd12::1", "2001:db8::1",
                 "not-an-address"])
        self.assertEqual([a.compressed for a in result.addresses],
                         ["10.2.3.4", "10.9.9.9", "fd12::1"])
        self.assertEqual([a for a, _ in result.refused],
                         ["127.0.0.1", "2001:db8::1", "not-an-address"])
        self.assertEqual([r for _, r in result.allowed],
                         [self.rules[1], self.rules[1], self.rules[2]])
        self.assertIn("127.0.0.1 refused", result.why())

    def test_port_of_address_rule(self) -> None:
        """Resolved addresses are checked with the port: 192.0.2.10 only for 443."""
        self.assertEqual(len(self.allow.check_addresses(443, ["192.0.2.10"]).addresses), 1)
        self.assertEqual(len(self.allow.check_addresses(22, ["192.0.2.10"]).addresses), 0)
        self.assertEqual(self.allow.check_addresses(22, []).why(),
                         "the name resolved to no address")

    def test_name_without_network_for_port_denied_early(self) -> None:
        """A name allowed for a port that no network allows is refused before any lookup."""
        allow = AllowList([parse_rule("*.corp.example", "80")], check_resolved_addresses=True)
        decision = allow.check("a.corp.example", 80)
        self.assertEqual((decision.reason, decision.resolve), (Reason.DENIED, False))
        self.assertIn("checkResolvedAddresses", decision.why)

    def test_names_still_need_a_name_rule(self) -> None:
        """A name matching no name rule is refused unresolved (no lookups for any name)."""
        self.assertEqual(self.allow.check("evil.example", 22).reason, Reason.DENIED)

    def test_needs_a_list(self) -> None:
        """checkResolvedAddresses without a list is a configuration error."""
        self.assertRaises(AllowListError, AllowList, None, True)


class MatchingPropertyTests(SynchronousTestCase):
    """Matching agrees with ipaddress and with label arithmetic for any input."""

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(_v4, st.integers(0, 32), _v4, st.integers(1, 65535))
    def test_ipv4_networks(self, base: ipaddress.IPv4Address, prefix: int,
                           probe: ipaddress.IPv4Address, port: int) -> None:
        """An IPv4 network rule allows exactly its addresses, also written IPv4-mapped."""
        network = ipaddress.IPv4Network((base, prefix), strict=False)
        allow = AllowList([parse_rule(str(network), str(port))])
        inside = probe in network
        for spelled in (str(probe), _mapped(probe), str(probe) + "."):
            self.assertEqual(allow.check(spelled, port).allowed, inside, spelled)
        mapped_rule = parse_rule(f"::ffff:{network.network_address}/{prefix + 96}", str(port))
        self.assertEqual(AllowList([mapped_rule]).check(str(probe), port).allowed, inside)
        self.assertFalse(allow.check(str(probe), port % 65535 + 1).allowed)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(_v6, st.integers(0, 128), _v6)
    def test_ipv6_networks(self, base: ipaddress.IPv6Address, prefix: int,
                           probe: ipaddress.IPv6Address) -> None:
        """An IPv6 network rule allows exactly its addresses, bracketed or not."""
        network = ipaddress.IPv6Network((base, prefix), strict=False)
        allow = AllowList([parse_rule(str(network), "22")])
        inside = probe in network
        self.assertEqual(allow.check(str(probe), 22).allowed, inside)
        self.assertEqual(allow.check(f"[{probe.exploded.upper()}]", 22).allowed, inside)
        self.assertEqual(len(allow.check_addresses(22, [probe]).addresses), int(inside))

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(_names, st.lists(_label, max_size=3), _label, st.booleans(), st.booleans())
    def test_wildcards(self, suffix: str, under: list[str], glued: str, dot: bool,
                       upper: bool) -> None:
        """``*.S`` allows names with more labels ending in S's labels, nothing else."""
        allow = AllowList([parse_rule("*." + suffix, "443")])

        def spell(name: str) -> str:
            name = name.upper() if upper else name
            return name + "." if dot else name

        expected_under = bool(under)
        self.assertEqual(allow.check(spell(".".join([*under, suffix])), 443).allowed,
                         expected_under)
        # glued onto the first label: a string suffix, not a label suffix
        self.assertFalse(allow.check(spell(glued + suffix), 443).allowed)
        # the suffix followed by a label: under S only if its last labels happen to be S's
        labels, wanted = (suffix + "." + glued).split("."), suffix.split(".")
        self.assertEqual(allow.check(spell(suffix + "." + glued), 443).allowed,
                         labels[-len(wanted):] == wanted)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(_names, _names, st.integers(1, 65535))
    def test_exact_names(self, entry: str, probe: str, port: int) -> None:
        """An exact name rule allows that name in any case, with or without one dot."""
        allow = AllowList([parse_rule(entry, str(port))])
        self.assertEqual(allow.check(probe.upper() + ".", port).allowed, probe == entry)
        self.assertTrue(allow.check(entry + ".", port).allowed)
