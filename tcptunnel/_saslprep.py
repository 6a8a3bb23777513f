"""RFC 4013 SASLprep, the password normalisation SCRAM asks for; no Twisted.

Its own module so that the login code (both ends) and the command-line helpers share
one preparation, :func:`prepare_password`.
"""

from __future__ import annotations


def saslprep(password: str) -> str:
    """RFC 4013 SASLprep of a password (raises ValueError for prohibited characters)."""
    if password.isascii():
        # For ASCII, SASLprep maps nothing and only ASCII control characters are prohibited.
        if any(ord(c) < 0x20 or c == "\x7f" for c in password):
            raise ValueError("the password contains a control character")
        return password
    import stringprep  # only for non-ASCII passwords
    import unicodedata

    mapped = "".join(" " if stringprep.in_table_c12(c) else c
                     for c in password if not stringprep.in_table_b1(c))
    text = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
                  stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
                  stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
                  stringprep.in_table_a1)
    for c in text:
        if any(table(c) for table in prohibited):
            raise ValueError(f"the password contains a prohibited character U+{ord(c):04X}")
    if any(stringprep.in_table_d1(c) for c in text) and (
            any(stringprep.in_table_d2(c) for c in text)
            or not stringprep.in_table_d1(text[0]) or not stringprep.in_table_d1(text[-1])):
        raise ValueError("the password mixes right-to-left and left-to-right text")
    return text


def prepare_password(password: str) -> bytes:
    """The bytes PBKDF2 hashes for a password: its SASLprep form in UTF-8, or, for a
    password SASLprep refuses (a tab, a newline, an emoji, an unassigned code point, mixed
    right-to-left and left-to-right text), its UTF-8 bytes unprepared, as PostgreSQL does.

    The original TcpTunnel compares passwords as they are written, so every password it
    accepts must keep working; both ends of a login call this, so they agree.
    """
    try:
        return saslprep(password).encode("utf-8")
    except ValueError:
        return password.encode("utf-8")
