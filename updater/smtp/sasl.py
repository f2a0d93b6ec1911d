"""AUTH PLAIN and AUTH LOGIN (RFC 4954), as the qmail AUTH patches answer them: the
command, the client's base64 responses, and the checkpassword program's verdict, as a
sub-machine that knows nothing of the session: ``session.Session`` imports it when a
client says AUTH and assigns what it returns."""

from __future__ import annotations

import binascii
import enum
from typing import Any

from ..textsafe import escape
from .events import CheckPassword, Log, Reply
from .replies import (
    R_AUTH_AGAIN,
    R_AUTH_BAD,
    R_AUTH_CANCELLED,
    R_AUTH_INMAIL,
    R_AUTH_MALFORMED,
    R_AUTH_NEEDTLS,
    R_AUTH_OK,
    R_AUTH_TEMP,
    R_AUTH_TOOMANY,
    R_AUTH_TYPE,
    R_UNIMPL,
)

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


# --------------------------------------------------------------------------- the exchange
# A sub-machine: each function takes what it needs and returns its events and the step
# the exchange waits in next (None: back to commands); only the session assigns state.

class Step(enum.Enum):
    PLAIN = "plain"            # waiting for AUTH PLAIN's response
    USER = "user"              # waiting for AUTH LOGIN's user name
    PASSWORD = "password"      # ... and its password
    CHECK = "check"            # the checkpassword program is running


Next = tuple[Step, bytes] | None       # the step and the user named so far


def command(arg: bytes, *, enabled: bool, offered: bool, authed: bool,
            in_mail: bool) -> tuple[list[Any], Next]:
    """``AUTH MECH [initial response]``."""
    if not enabled:
        return [Reply(R_UNIMPL)], None
    if not offered:
        return [Reply(R_AUTH_NEEDTLS)], None
    if authed:
        return [Reply(R_AUTH_AGAIN)], None
    if in_mail:
        return [Reply(R_AUTH_INMAIL)], None
    mech, _, initial = arg.partition(b" ")
    mech, initial = mech.lower(), initial.strip()
    if mech == b"plain":
        return _plain(initial) if initial else ([Reply(PROMPT_PLAIN)], (Step.PLAIN, b""))
    if mech == b"login":
        return _login_user(initial) if initial else ([Reply(PROMPT_USER)], (Step.USER, b""))
    return [Reply(R_AUTH_TYPE)], None


def response(line: bytes, step: Step, user: bytes) -> tuple[list[Any], Next]:
    """A line the client sent in answer to a 334 prompt (``*`` cancels)."""
    line = line.rstrip(b"\r").strip()
    if line == b"*":
        return [Reply(R_AUTH_CANCELLED)], None
    if step is Step.PLAIN:
        return _plain(line)
    if step is Step.USER:
        return _login_user(line)
    password = b64(line)
    if password is None:
        return [Reply(R_AUTH_MALFORMED)], None
    return _check(user, password)


def _plain(data: bytes) -> tuple[list[Any], Next]:
    got = plain(data)
    if got is None:
        return [Reply(R_AUTH_MALFORMED)], None
    return _check(got[0], got[1])


def _login_user(data: bytes) -> tuple[list[Any], Next]:
    user = b64(data)
    if not user:
        return [Reply(R_AUTH_MALFORMED)], None
    return [Reply(PROMPT_PASSWORD)], (Step.PASSWORD, user)


def _check(user: bytes, password: bytes) -> tuple[list[Any], Next]:
    if not usable(user, password):
        return [Reply(R_AUTH_MALFORMED)], None
    return [CheckPassword(user, password)], (Step.CHECK, user)


def verdict(code: int | None, user: bytes, remote: str, last_chance: bool
            ) -> tuple[list[Any], str]:
    """The checkpassword program's exit code: 0 ok, 1 wrong, else (or None) a
    temporary failure.  Returns the events and what it was: ``ok``, ``failed``,
    ``tempfail``, or ``hangup`` (a wrong one when ``last_chance``: the session hangs
    up after these events)."""
    who = escape(user, 64)
    if code == 0:
        return [Log(f"AUTH ok user {who} [{remote}]"), Reply(R_AUTH_OK)], "ok"
    if code == 1:
        ev: list[Any] = [Log(f"AUTH failed user {who} [{remote}]")]
        if last_chance:
            return ev + [Log(f"AUTH too many authentication failures [{remote}], "
                             "hanging up"), Reply(R_AUTH_TOOMANY)], "hangup"
        return ev + [Reply(R_AUTH_BAD)], "failed"
    return [Log(f"AUTH temporary failure user {who} [{remote}]: "
                f"{'no answer' if code is None else f'exit {code}'}"),
            Reply(R_AUTH_TEMP)], "tempfail"
