"""Secrets kept out of what the project writes: a URL's password masked in every dump and message, files that
must hold one created private (mode 0600) from the first byte, and a password read from its own file."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from safediff.common.errors import UserInputError

MASK = "***"


def _split(url: str) -> tuple[str, str, str]:
    """(scheme, user-info, rest) of scheme://user-info@rest; user-info is '' when the URL has none."""
    scheme, _, tail = url.partition("://")
    userinfo, at, rest = tail.rpartition("@")  # the last '@': a password may contain one, a host cannot
    return scheme, userinfo if at else "", rest if at else tail


def redact_url(url: str) -> str:
    """`url` with its password masked: redis://:pw@host:6379/0 -> redis://:***@host:6379/0 (the user name, host,
    port and database stay, so a message still says where it connects)."""
    scheme, userinfo, rest = _split(url)
    if ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:{MASK}@{rest}"


def has_password(url: str) -> bool:
    return ":" in _split(url)[1]


def with_password_file(url: str, password_file: Path, field: str) -> str:
    """`url` with the first line of `password_file` as its password (URL-quoted, as redis-py unquotes it).
    Errors name `field`: an unreadable or empty file, or a URL that already carries a password."""
    if has_password(url):
        raise UserInputError(f"{field}: the URL already has a password ({redact_url(url)}); give it in one place")
    try:
        lines = Path(password_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"{field}: cannot read {password_file} ({err.__class__.__name__})") from None
    password = lines[0].strip() if lines else ""
    if not password:
        raise UserInputError(f"{field}: {password_file} has no password on its first line")
    scheme, userinfo, rest = _split(url)
    return f"{scheme}://{userinfo}:{quote(password, safe='')}@{rest}"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only, from the first byte (no window at the umask's mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: narrow it before writing
        f.write(text)
