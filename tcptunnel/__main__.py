"""Command-line helpers: ``python -m tcptunnel <command>``.

* ``hash-password``: read a password (prompt, or stdin when not a terminal; never argv) and
  print a SCRAM-SHA-256 verifier for a ``proxyClientPasswordHash`` / ``proxyServerPasswordHash``
  attribute.
* ``check-config FILE``: check a settings file as start-up does (certificates, keys and CA
  files included), except that it binds no port, and print what would run (no secrets) and
  every warning; exit code 0 when it can start, 1 otherwise.
* ``make-cert``: write a self-signed certificate and key for testing and print its SHA-256 pin.
* ``make-password``: print a strong random secret (192 bits) for ``endToEndPassword``, the
  same on both proxies of a session (docs/protocol.md §9).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import ipaddress
import os
import re
import sys
from typing import TextIO

from tcptunnel.auth import (
    DEFAULT_ITERATIONS,
    MAX_ITERATIONS,
    format_verifier,
    make_auth_info,
    same_password,
)
from tcptunnel.config import (
    ConfigError,
    GatewayConfig,
    Settings,
    StartupError,
    format_address,
    load_settings,
)


def hash_password(args: argparse.Namespace, stdin: TextIO, stdout: TextIO,
                  stderr: TextIO) -> int:
    """Print a verifier for a password read from a prompt or stdin."""
    if args.iterations < DEFAULT_ITERATIONS:
        print(f"hash-password: --iterations {args.iterations}: fewer than {DEFAULT_ITERATIONS} "
              "PBKDF2 iterations (RFC 7677's minimum) make guessing the password from a "
              f"stolen verifier cheap; give {DEFAULT_ITERATIONS} or more", file=stderr)
        return 1
    if args.iterations > MAX_ITERATIONS:
        print(f"hash-password: --iterations {args.iterations}: at most {MAX_ITERATIONS} (both "
              "ends run PBKDF2 at every login; more would stall each one for many seconds)",
              file=stderr)
        return 1
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("The two passwords differ.", file=stderr)
            return 1
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        print("The password is empty.", file=stderr)
        return 1
    try:
        info = make_auth_info(password, args.iterations)
    except ValueError as e:
        print(f"Cannot use this password: {e}.", file=stderr)
        return 1
    print(format_verifier(info), file=stdout)
    return 0


def describe_settings(settings: Settings) -> list[str]:
    """A summary of what a settings file runs, without secrets."""
    lines = [f"{settings.path}: {len(settings.instances)} instance(s)"]
    if settings.status is not None:
        lines.append(f"status page, /metrics and /status on http://"
                     f"{format_address(settings.status.listen_ip, settings.status.listen_port)}/")
    for instance in settings.instances:
        if isinstance(instance, GatewayConfig):
            lines.append(f"[{instance.index}] gateway (line {instance.location.line})")
            for listener in instance.listeners:
                tls = "TLS" if listener.tls else "plain TCP (not encrypted)"
                lines.append(f"    listener {listener.describe()} {tls}")
            for session in instance.sessions:
                kinds = "/".join("hashed" if s.verifier else "cleartext"
                                 for s in (session.proxy_client, session.proxy_server))
                warn = (" WARNING: both roles share one password"
                        if same_password(session.proxy_client, session.proxy_server) else "")
                lines.append(f"    session {session.id} (passwords: {kinds}){warn}")
        else:
            tls = "TLS" if instance.use_tls else "plain TCP (not encrypted)"
            lines.append(f"[{instance.index}] {instance.role} -> gateway "
                         f"{format_address(instance.host, instance.port)} {tls}, "
                         f"session {instance.session_id}"
                         + (", end-to-end encrypted" if instance.e2e_password else ""))
            for binding in instance.bindings:
                lines.append(f"    binding {binding.describe()}")
            if instance.role == "proxy-client":
                if instance.allowed_targets is None:
                    lines.append("    allowed targets: any")
                else:
                    targets = ", ".join(e.describe() for e in instance.allowed_targets) \
                        or "none"
                    lines.append(f"    allowed targets: {targets}")
    return lines


def check_startup(settings: Settings) -> None:
    """Everything start-up checks but listening: each TLS Listener's certificate and key
    (readable, PEM or PKCS#12, matching, not expired), each TLS proxy's CA file, and the
    construction of every instance's service (verifiers, limits).  Raises TlsSetupError or
    StartupError naming file, line, element and attribute."""
    from twisted.internet.testing import MemoryReactorClock

    from tcptunnel.tap import make_instance_service
    from tcptunnel.tls import listener_context_factory, proxy_connection_creator

    for instance in settings.instances:
        if isinstance(instance, GatewayConfig):
            for listener in instance.listeners:
                if listener.tls is not None:
                    listener_context_factory(listener)
        elif instance.use_tls:
            proxy_connection_creator(instance)
        try:
            # Built on a reactor that never runs: nothing listens, connects or waits.
            make_instance_service(instance, MemoryReactorClock())
        except ValueError as e:
            raise StartupError(f"{instance.location}: <Instance>: {e}") from None


def check_config(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Check a settings file as start-up would, without binding ports; summarise it."""
    from tcptunnel.tls import TlsSetupError

    try:
        settings = load_settings(args.file)
        check_startup(settings)
    except (ConfigError, StartupError, TlsSetupError) as e:
        print(f"error: {e}", file=stderr)
        return 1
    for line in describe_settings(settings):
        print(line, file=stdout)
    for warning in settings.all_warnings():
        print(f"warning: {warning}", file=stdout)
    print("Not checked: whether the ports are free (check-config binds no port).", file=stdout)
    print("OK", file=stdout)
    return 0


# Certificates made here are for tests and small setups; a century is more than enough, and
# far-future dates overflow datetime (year 9999) long before --days 999999999.
MAX_DAYS = 36500
# RFC 5280's upper bound of a common name (ub-common-name).
MAX_COMMON_NAME = 64
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


def certificate_name(text: str) -> tuple[str, str | None]:
    """The name make-cert writes for ``--name`` (an IP literal, or a DNS name with IDN
    labels as their IDNA A-labels), and a note when it differs from ``text``; raises
    ValueError saying why a name cannot be used."""
    if not text:
        raise ValueError("the name is empty: give the Gateway's host name or IP address, as "
                         "the proxies' host (or serverName) attribute names it")
    try:
        return str(ipaddress.ip_address(text)), None
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    note = None
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ValueError(f"{text!r} is not a valid internationalised name ({e})") from None
        note = (f"{text!r} is written as its IDNA A-label {name!r} (the form proxies send "
                "and verify)")
    if not _DNS_NAME.fullmatch(name):
        raise ValueError(f"{text!r} is not a host name or IP address: a host name is labels "
                         "of letters, digits and hyphens (not at either end) separated by dots")
    if len(name) > MAX_COMMON_NAME:
        raise ValueError(f"{name!r} has {len(name)} characters: a certificate's common name "
                         f"holds at most {MAX_COMMON_NAME} (RFC 5280)")
    return name, note


def make_cert(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """Write a self-signed certificate and key; print the pin."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tcptunnel.tls import certificate_pin

    try:
        common_name, note = certificate_name(args.name)
    except ValueError as e:
        print(f"make-cert: --name: {e}", file=stderr)
        return 1
    if args.days < 1:
        print(f"make-cert: --days {args.days}: give at least 1 (a certificate valid for "
              f"{args.days} days has expired when it is written)", file=stderr)
        return 1
    if args.days > MAX_DAYS:
        print(f"make-cert: --days {args.days}: give at most {MAX_DAYS} (100 years)",
              file=stderr)
        return 1
    if os.path.abspath(args.cert) == os.path.abspath(args.key):
        print("make-cert: --cert and --key name the same file", file=stderr)
        return 1
    for path in (args.cert, args.key):
        if os.path.exists(path) and not args.force:
            print(f"{path} exists; use --force to overwrite it", file=stderr)
            return 1
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(common_name)))
    except ValueError:
        names.append(x509.DNSName(common_name))
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=args.days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    contents = (
        (args.cert, 0o644, certificate.public_bytes(serialization.Encoding.PEM)),
        (args.key, 0o600, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())),
    )
    written: list[str] = []
    for path, mode, data in contents:
        try:
            existed = os.path.exists(path)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            if not existed:
                written.append(path)
            with os.fdopen(descriptor, "wb") as f:
                if mode == 0o600:
                    os.fchmod(f.fileno(), mode)  # an existing key file (--force) too
                f.write(data)
        except OSError as e:
            print(f"make-cert: cannot write {path}: {e.strerror}", file=stderr)
            for done in written:
                with contextlib.suppress(OSError):
                    os.unlink(done)
            return 1
    if note is not None:
        print(f"note: {note}", file=stdout)
    pin = certificate_pin(certificate.public_bytes(serialization.Encoding.DER)).hex()
    print(f"certificate: {args.cert}\nkey:         {args.key}\npin:         {pin}", file=stdout)
    print(f'Proxies: useSsl="true" certificatePin="{pin}"', file=stdout)
    return 0


def make_password(stdout: TextIO) -> int:
    """Print a random end-to-end password and where it goes."""
    from tcptunnel._e2e import make_password as random_password

    password = random_password()
    print(password, file=stdout)
    print(f'Both proxies, in <Session>: endToEndPassword="{password}" (or put it in a file '
          "for endToEndPasswordFile, or a variable for endToEndPasswordEnv); never on the "
          "Gateway", file=stdout)
    return 0


def main(argv: list[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one command; return the exit code."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = argparse.ArgumentParser(prog="python -m tcptunnel")
    commands = parser.add_subparsers(dest="command", required=True)
    hashing = commands.add_parser("hash-password", help="print a SCRAM-SHA-256 verifier")
    hashing.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                         help=f"PBKDF2 iterations, {DEFAULT_ITERATIONS} to {MAX_ITERATIONS}")
    checking = commands.add_parser("check-config", help="validate a settings file")
    checking.add_argument("file")
    minting = commands.add_parser("make-cert", help="create a self-signed test certificate")
    minting.add_argument("--name", default="localhost", help="host name or IP of the Gateway")
    minting.add_argument("--cert", default="gateway-cert.pem")
    minting.add_argument("--key", default="gateway-key.pem")
    minting.add_argument("--days", type=int, default=365, help=f"validity, 1 to {MAX_DAYS}")
    minting.add_argument("--force", action="store_true")
    commands.add_parser("make-password",
                        help="print a random secret for endToEndPassword (both proxies)")
    args = parser.parse_args(argv)
    if args.command == "hash-password":
        return hash_password(args, stdin, stdout, stderr)
    if args.command == "check-config":
        return check_config(args, stdout, stderr)
    if args.command == "make-password":
        return make_password(stdout)
    return make_cert(args, stdout, stderr)


if __name__ == "__main__":
    sys.exit(main())
