"""Command-line helpers: ``python -m tcptunnel <command>``.

* ``hash-password``: read a password (prompt, or stdin when not a terminal; never argv) and
  print a SCRAM-SHA-256 verifier for a ``proxyClientPasswordHash`` / ``proxyServerPasswordHash``
  attribute.
* ``check-config FILE``: validate a settings file and print what would run (no secrets);
  exit code 0 when valid, 1 otherwise.
* ``make-cert``: write a self-signed certificate and key for testing and print its SHA-256 pin.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import ipaddress
import os
import sys
from typing import TextIO

from tcptunnel.auth import DEFAULT_ITERATIONS, format_verifier, make_auth_info, same_password
from tcptunnel.config import ConfigError, GatewayConfig, Settings, format_address, load_settings


def hash_password(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    """Print a verifier for a password read from a prompt or stdin."""
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("The two passwords differ.", file=sys.stderr)
            return 1
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        print("The password is empty.", file=sys.stderr)
        return 1
    try:
        info = make_auth_info(password, args.iterations)
    except ValueError as e:
        print(f"Cannot use this password: {e}.", file=sys.stderr)
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
                         f"session {instance.session_id}")
            for binding in instance.bindings:
                lines.append(f"    binding {binding.describe()}")
            if instance.role == "proxy-client":
                if instance.allowed_targets is None:
                    lines.append("    allowed targets: any")
                else:
                    targets = ", ".join(format_address(e.host, e.port)
                                        for e in instance.allowed_targets) or "none"
                    lines.append(f"    allowed targets: {targets}")
    return lines


def check_config(args: argparse.Namespace, stdout: TextIO) -> int:
    """Validate a settings file and summarise it."""
    try:
        settings = load_settings(args.file)
        if not settings.instances:
            raise ConfigError(f"{args.file}: the file defines no <Instance>")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in describe_settings(settings):
        print(line, file=stdout)
    print("OK", file=stdout)
    return 0


def make_cert(args: argparse.Namespace, stdout: TextIO) -> int:
    """Write a self-signed certificate and key; print the pin."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tcptunnel.tls import certificate_pin

    for path in (args.cert, args.key):
        if os.path.exists(path) and not args.force:
            print(f"{path} exists; use --force to overwrite it", file=sys.stderr)
            return 1
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.name)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(args.name)))
    except ValueError:
        names.append(x509.DNSName(args.name))
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=args.days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    with open(args.cert, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    descriptor = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    pin = certificate_pin(certificate.public_bytes(serialization.Encoding.DER)).hex()
    print(f"certificate: {args.cert}\nkey:         {args.key}\npin:         {pin}", file=stdout)
    print(f'Proxies: useSsl="true" certificatePin="{pin}"', file=stdout)
    return 0


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin,
         stdout: TextIO = sys.stdout) -> int:
    """Run one command; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m tcptunnel")
    commands = parser.add_subparsers(dest="command", required=True)
    hashing = commands.add_parser("hash-password", help="print a SCRAM-SHA-256 verifier")
    hashing.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    checking = commands.add_parser("check-config", help="validate a settings file")
    checking.add_argument("file")
    minting = commands.add_parser("make-cert", help="create a self-signed test certificate")
    minting.add_argument("--name", default="localhost", help="host name or IP of the Gateway")
    minting.add_argument("--cert", default="gateway-cert.pem")
    minting.add_argument("--key", default="gateway-key.pem")
    minting.add_argument("--days", type=int, default=365)
    minting.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "hash-password":
        return hash_password(args, stdin, stdout)
    if args.command == "check-config":
        return check_config(args, stdout)
    return make_cert(args, stdout)


if __name__ == "__main__":
    sys.exit(main())
