"""AUTH PLAIN and AUTH LOGIN (RFC 4954): the base64 the client sends, decoded (pure).
Imported only when a client says AUTH."""

from __future__ import annotations

import binascii

PROMPT_PLAIN = b"334 \r\n"
PROMPT_USER = b"334 VXNlcm5hbWU6\r\n"          # "Username:"
PROMPT_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"      # "Password:"


def b64(data: bytes) -> bytes | None:
    """Strict base64, or None."""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def plain(data: bytes) -> tuple[bytes, bytes] | None:
    """AUTH PLAIN's ``authzid NUL authcid NUL password``: (user, password), or None
    when it is not that (or the user is empty)."""
    raw = b64(data)
    parts = raw.split(b"\0") if raw is not None else []
    if len(parts) != 3 or not parts[1]:
        return None
    return parts[1], parts[2]


def usable(user: bytes, password: bytes) -> bool:
    """checkpassword reads NUL-terminated fields: a NUL inside one is malformed."""
    return b"\0" not in user and b"\0" not in password
