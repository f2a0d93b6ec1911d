"""AUTH PLAIN and AUTH LOGIN (RFC 4954), as the qmail AUTH patches answer them: the
command, the client's base64 responses, and the checkpassword program's verdict.  The
session (``session.Session``) imports this only when a client says AUTH."""

from __future__ import annotations

import binascii
from typing import TYPE_CHECKING, Any

from ..textsafe import escape
from .events import AUTH, CHECKING_PASSWORD, COMMAND, DONE, CheckPassword, Close, Log, Reply
from .replies import (R_AUTH_AGAIN, R_AUTH_BAD, R_AUTH_CANCELLED, R_AUTH_INMAIL,
                      R_AUTH_MALFORMED, R_AUTH_NEEDTLS, R_AUTH_OK, R_AUTH_TEMP, R_AUTH_TOOMANY,
                      R_AUTH_TYPE, R_UNIMPL)

if TYPE_CHECKING:
    from .session import Session

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

def command(s: Session, arg: bytes, ev: list[Any]) -> None:
    """``AUTH MECH [initial response]``."""
    if not s.policy.auth:
        ev.append(Reply(R_UNIMPL))
        return
    if not s.auth_offered():
        ev.append(Reply(R_AUTH_NEEDTLS))
        return
    if s.user is not None:
        ev.append(Reply(R_AUTH_AGAIN))
        return
    if s.seenmail:
        ev.append(Reply(R_AUTH_INMAIL))
        return
    mech, _, initial = arg.partition(b" ")
    mech, initial = mech.lower(), initial.strip()
    if mech == b"plain":
        if initial:
            _plain(s, initial, ev)
        else:
            s.auth_step, s.mode = ("plain",), AUTH
            ev.append(Reply(PROMPT_PLAIN))
    elif mech == b"login":
        if initial:
            _login_user(s, initial, ev)
        else:
            s.auth_step, s.mode = ("user",), AUTH
            ev.append(Reply(PROMPT_USER))
    else:
        ev.append(Reply(R_AUTH_TYPE))


def response(s: Session, line: bytes, ev: list[Any]) -> None:
    """A line the client sent in answer to a 334 prompt (``*`` cancels)."""
    line = line.rstrip(b"\r").strip()
    step, s.mode = s.auth_step, COMMAND
    if line == b"*":
        s.auth_step = ()
        ev.append(Reply(R_AUTH_CANCELLED))
    elif step[0] == "plain":
        _plain(s, line, ev)
    elif step[0] == "user":
        _login_user(s, line, ev)
    else:
        password = b64(line)
        if password is None:
            s.auth_step = ()
            ev.append(Reply(R_AUTH_MALFORMED))
        else:
            _check(s, step[1], password, ev)


def _plain(s: Session, data: bytes, ev: list[Any]) -> None:
    got = plain(data)
    if got is None:
        s.auth_step = ()
        ev.append(Reply(R_AUTH_MALFORMED))
        return
    _check(s, got[0], got[1], ev)


def _login_user(s: Session, data: bytes, ev: list[Any]) -> None:
    user = b64(data)
    if not user:
        s.auth_step = ()
        ev.append(Reply(R_AUTH_MALFORMED))
        return
    s.auth_step, s.mode = ("pass", user), AUTH
    ev.append(Reply(PROMPT_PASSWORD))


def _check(s: Session, user: bytes, password: bytes, ev: list[Any]) -> None:
    if not usable(user, password):
        s.auth_step = ()
        ev.append(Reply(R_AUTH_MALFORMED))
        return
    s.auth_step = ("check", user)
    s.mode = CHECKING_PASSWORD
    ev.append(CheckPassword(user, password))


def result(s: Session, code: int | None) -> list[Any]:
    """The checkpassword program's exit code: 0 ok, 1 wrong, else (or None) a
    temporary failure; AUTH_MAX_FAILURES wrong ones hang up."""
    ev: list[Any] = []
    user, s.auth_step = s.auth_step[1], ()
    s.mode = COMMAND
    who = escape(user, 64)
    s.count("auth.ok" if code == 0 else "auth.failed" if code == 1 else "auth.tempfail")
    if code == 0:
        s.user = user
        s.relay = b""
        ev += [Log(f"AUTH ok user {who} [{s.remote}]"), Reply(R_AUTH_OK)]
    elif code == 1:
        s.auth_failures += 1
        ev.append(Log(f"AUTH failed user {who} [{s.remote}]"))
        if s.auth_failures >= s.policy.auth_failures:
            s.count("hangup.auth_failures")
            s.end = "limit"
            ev += [Log(f"AUTH too many authentication failures [{s.remote}], "
                       "hanging up"), Reply(R_AUTH_TOOMANY), Close()]
            s.mode = DONE
            s.buf = b""
            return ev
        ev.append(Reply(R_AUTH_BAD))
    else:
        ev += [Log(f"AUTH temporary failure user {who} [{s.remote}]: "
                   f"{'no answer' if code is None else f'exit {code}'}"),
               Reply(R_AUTH_TEMP)]
    return ev
