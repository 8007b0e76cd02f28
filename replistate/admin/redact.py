"""Passwords and tokens hidden from the URLs and errors the commands print.

A URL is shown in the form it was given, with each password, NATS token and
secret parameter replaced by ``***``. PostgreSQL strings are read the way libpq
reads them: a ``postgresql://`` or ``postgres://`` URL, whose password may contain
``?``, ``#`` or ``@``, or ``key=value`` pairs with quoted and backslash-escaped
values. libpq then parses the redacted string again, and when a secret survives
it, only the user, hosts, ports and database are shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["SECRET_MARK", "is_secret_keyword", "redact_text", "redact_url"]

SECRET_MARK: Final = "***"
"""The text printed in place of a password, token or secret parameter."""

_URI_PREFIXES: Final = ("postgresql://", "postgres://")
"""The prefixes that make libpq read a string as a URL, not as ``key=value``
pairs. libpq compares them case-sensitively."""

_BLANKS: Final = " \t\n\v\f\r"
"""The characters C's isspace() accepts, which separate libpq's pairs."""

_SUMMARY_KEYWORDS: Final = ("host", "hostaddr", "port", "dbname", "user")

_QUOTED: Final = re.compile(r"\"[^\"]*\"|'[^']*'")

_QUOTED_SEPARATORS: Final = frozenset({'"="', '":"', '"/"', '"]"'})
"""The quoted characters of libpq's parse errors that are never secret."""

_URI_PARAMETER: Final = re.compile(r"([?&])([^?&=]*)=([^&]*)")
"""A ``key=value`` parameter of a URL. It is searched for after the password
rather than after the first ``?``, so a parameter that libpq reads as part of a
host name, as in ``postgresql://host?user=me@corp&password=x``, is found too."""


def is_secret_keyword(keyword: str) -> bool:
    """Return whether a libpq keyword names a secret, such as ``password``,
    ``sslpassword`` or ``oauth_client_secret``."""
    lowered = keyword.lower()
    return "password" in lowered or "secret" in lowered


def redact_url(url: str) -> str:
    """Return `url` with every password and token replaced by ``***``.

    A PostgreSQL URL or ``key=value`` string is read as libpq reads it, and one
    that libpq cannot parse is replaced as a whole by ``***``, because the
    position of its password is unknown. Anything else is read as a comma-separated
    list of NATS servers, where ``user:password@`` and ``token@`` are secrets.
    """
    if _is_postgres(url):
        return _redact_postgres(url)
    return ",".join(_redact_server(server) for server in _nats_servers(url))


def redact_text(text: str, url: str) -> str:
    """Return `text`, such as an error about `url`, with the secrets of `url`
    replaced by ``***``.

    The URL itself is replaced by its redacted form, then each secret and each
    quoted token that is part of a secret, such as a port that a parser cut out
    of a password. For a PostgreSQL string that libpq cannot parse, the text is
    hidden from its first quoted token on, separators such as ``"="`` aside,
    because libpq quotes the part it failed on, which may be the whole string.
    """
    if url:
        text = text.replace(url, redact_url(url))
    secrets = _secrets(url)
    if secrets is None:
        return _hide_quoted_tokens(text)

    def hide_token(match: re.Match[str]) -> str:
        quoted = match.group()
        token = quoted[1:-1]
        if token and any(token in secret or secret in token for secret in secrets):
            return f"{quoted[0]}{SECRET_MARK}{quoted[-1]}"
        return quoted

    text = _QUOTED.sub(hide_token, text)
    for secret in secrets:
        text = text.replace(secret, SECRET_MARK)

    return text


def _is_postgres(url: str) -> bool:
    scheme, separator, _ = url.partition("://")
    if separator:
        return scheme.lower() in ("postgres", "postgresql")
    return "=" in url


def _redact_postgres(url: str) -> str:
    try:
        parsed = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return SECRET_MARK
    uri = url.startswith(_URI_PREFIXES)
    redacted = _redact_uri(url) if uri else _redact_pairs(url)
    if _secrets_hidden(redacted):
        return redacted

    return _summary(parsed)


def _split_uri(url: str) -> tuple[int, int]:
    """Return the bounds of the user name and password of a PostgreSQL URL,
    which are empty when it has none.

    libpq ends them at the first ``@`` before the first ``/``. The last ``@``
    before the query is taken here, so that a password containing ``@``, or a ``/``
    that keeps libpq from seeing the password at all, is hidden whole.
    """
    start = url.find("://") + 3
    slash = url.find("/", start)
    query = url.find("?", slash) if slash >= 0 else -1
    at = url.rfind("@", start, query if query >= 0 else len(url))
    return (start, at) if at >= 0 else (start, start)


def _redact_uri(url: str) -> str:
    start, end = _split_uri(url)
    user, colon, _ = url[start:end].partition(":")
    if colon:
        url = f"{url[:start]}{user}:{SECRET_MARK}{url[end:]}"
        end = start + len(user) + 1 + len(SECRET_MARK)

    def hide(match: re.Match[str]) -> str:
        if is_secret_keyword(unquote(match[2])):
            return f"{match[1]}{match[2]}={SECRET_MARK}"
        return match[0]

    return url[:end] + _URI_PARAMETER.sub(hide, url[end:])


def _uri_secrets(url: str) -> list[str]:
    """Return the password of a PostgreSQL URL and the values of its secret
    parameters, as written."""
    start, end = _split_uri(url)
    secrets = [url[start:end].partition(":")[2]]
    for match in _URI_PARAMETER.finditer(url, end):
        if is_secret_keyword(unquote(match[2])):
            secrets.append(match[3])
    return secrets


def _pairs(text: str) -> Iterable[tuple[str, int, int]]:
    """Yield each keyword of a ``key=value`` string with the bounds of its value,
    quotes included, as libpq's conninfo_parse() splits them.

    Stops at the first keyword without ``=``, which libpq rejects.
    """
    index, length = 0, len(text)
    while index < length:
        if text[index] in _BLANKS:
            index += 1
            continue
        keyword_start = index
        while index < length and text[index] != "=" and text[index] not in _BLANKS:
            index += 1
        keyword = text[keyword_start:index]
        while index < length and text[index] in _BLANKS:
            index += 1
        if index == length or text[index] != "=":
            return
        index += 1
        while index < length and text[index] in _BLANKS:
            index += 1
        value_start = index
        quoted = index < length and text[index] == "'"
        if quoted:
            index += 1
        while index < length:
            character = text[index]
            if character == "\\":
                # A backslash takes the next character as it is, quote or blank.
                index += 2
                continue
            if quoted and character == "'":
                index += 1
                break
            if not quoted and character in _BLANKS:
                break
            index += 1
        index = min(index, length)
        yield keyword, value_start, index


def _redact_pairs(text: str) -> str:
    pieces = []
    copied = 0
    for keyword, start, end in _pairs(text):
        if is_secret_keyword(keyword):
            # A quoted value may run into the next keyword, so its quotes stay.
            mark = f"'{SECRET_MARK}'" if text.startswith("'", start) else SECRET_MARK
            pieces += [text[copied:start], mark]
            copied = end
    pieces.append(text[copied:])

    return "".join(pieces)


def _secrets_hidden(redacted: str) -> bool:
    """Return whether libpq reads every secret of `redacted` as ``***``."""
    try:
        parsed = conninfo_to_dict(redacted)
    except psycopg.ProgrammingError:
        return False
    return all(
        value == SECRET_MARK
        for keyword, value in parsed.items()
        if is_secret_keyword(keyword)
    )


def _summary(parsed: Mapping[str, object]) -> str:
    """Return the user, hosts, ports and database of a parsed string, as
    ``key=value`` pairs, and ``password=***`` when it has a password."""
    summary = {
        keyword: str(parsed[keyword])
        for keyword in _SUMMARY_KEYWORDS
        if keyword in parsed
    }
    if any(is_secret_keyword(keyword) for keyword in parsed):
        summary["password"] = SECRET_MARK
    return make_conninfo("", **summary)


def _nats_servers(url: str) -> list[str]:
    """Split `url` at its commas, as `NatsBus` does, except that a piece with a
    ``@`` but no scheme after a piece without ``@`` is taken as the rest of a
    password containing a comma, such as ``nats://user:pa,ss@host``."""
    servers: list[str] = []
    for piece in url.split(","):
        if servers and "@" not in servers[-1] and "@" in piece and "://" not in piece:
            servers[-1] += "," + piece
        else:
            servers.append(piece)
    return servers


def _split_server(server: str) -> tuple[int, int]:
    """Return the bounds of the user information of one NATS server URL, which
    runs from the scheme, if any, to the last ``@``. The bounds are empty when
    the URL has no ``@``."""
    scheme_end = server.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    at = server.rfind("@", start)
    return (start, at) if at >= 0 else (start, start)


def _redact_server(server: str) -> str:
    start, end = _split_server(server)
    if start == end:
        return server
    user, colon, _ = server[start:end].partition(":")
    # nats://TOKEN@host carries a secret token as the user name.
    userinfo = f"{user}:{SECRET_MARK}" if colon else SECRET_MARK
    return f"{server[:start]}{userinfo}{server[end:]}"


def _secrets(url: str) -> list[str] | None:
    """Return the secrets `url` contains, as written and as decoded, or None for a
    PostgreSQL string that libpq cannot parse."""
    secrets: list[str] = []
    if _is_postgres(url):
        try:
            parsed = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            return None
        secrets += [
            str(value)
            for keyword, value in parsed.items()
            if is_secret_keyword(keyword) and value
        ]
        if url.startswith(_URI_PREFIXES):
            secrets += _uri_secrets(url)
    else:
        for server in _nats_servers(url):
            start, end = _split_server(server)
            userinfo = server[start:end]
            _, colon, password = userinfo.partition(":")
            secrets.append(password if colon else userinfo)
    found = [*secrets, *(unquote(secret) for secret in secrets)]

    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def _hide_quoted_tokens(text: str) -> str:
    """Replace everything from the first double-quoted token that is not a
    separator, such as ``"="``, to the last double quote by ``"***"``.

    The token may itself contain quotes, so everything up to the last one goes.
    """
    for match in re.finditer(r"\"[^\"]*\"", text):
        if match.group() not in _QUOTED_SEPARATORS:
            end = text.rfind('"') + 1
            return f'{text[: match.start()]}"{SECRET_MARK}"{text[end:]}'
    return text
