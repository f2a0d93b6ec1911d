"""vpopmail users of one domain, read directly from the domain's own files.

vpopmail keeps a domain's users in ``DOMAIN_DIR/vpasswd`` (the master; ``vuserinfo -D``
reads it) and compiles it into ``vpasswd.cdb`` (keys are the user names).  We read the
text file, fall back to the cdb, and only when asked (``--vuserinfo``) run
``vuserinfo -n -D DOMAIN`` for a domain whose files we may not read.

Names are returned as lowercased bytes, checked for white space and control
characters: at a million addresses, per-line Python work is what a build costs.

A user whose entry carries vpopmail's ``BOUNCE_MAIL`` flag (0x10 in the gid field, set
by ``vmoduser -b``) is left out: vdelivermail bounces that account's mail ("account is
locked").  The field is read as vpopmail reads it, with C's ``atoi``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable

from ...errors import SourceError
from ..qmail import ENCODING, Unreadable, open_cdb_checked, read_bytes

_NAME = re.compile(rb"\n([^:\n]+):")      # a line's first field, if it has one
_BAD = re.compile(rb"[\x00-\x20\x7f]")
BOUNCE_MAIL = 0x10                          # vpopmail.h: vdelivermail bounces the account
# a line whose gid field (atoi: blanks, a sign, digits) is not zero: only those can carry
# the flag, so the common line costs the regex engine alone
# (possessive: a line whose gid is 0 fails at once instead of backtracking its fields)
_FLAGGED = re.compile(rb"\n([^:\n]++):[^:\n]*+:[^:\n]*+:[ \t\v\f\r]*+([+-]?0*+[1-9][0-9]*)")
_ATOI = re.compile(rb"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def atoi(field: bytes) -> int:
    """C's atoi, as vpopmail reads pw_gid (no digits: 0)."""
    m = _ATOI.match(field)
    return int(m.group(1)) if m else 0


def locked(gid: int) -> bool:
    return bool(gid & BOUNCE_MAIL)


def parse_vpasswd(data: bytes, path: str) -> list[bytes]:
    """User names from vpasswd lines ``name:pass:uid:gid:gecos:dir:quota[:clear]``,
    lowercased.  A non-empty line without a ``name:`` field is an error naming it."""
    data = b"\n" + data.lower()                    # every line now starts after a newline
    names = _NAME.findall(data)
    lines = data.count(b"\n") - data.endswith(b"\n")
    if len(names) != lines or b"\n#" in data:
        _check_lines(data[1:], path)                # blank/comment lines, or an error
        names = [n for n in names if not n.startswith(b"#")]
    gone = {n for n, gid in _FLAGGED.findall(data) if locked(int(gid))}
    return [n for n in names if n not in gone] if gone else names


def _check_lines(data: bytes, path: str) -> None:
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line or line.startswith(b"#"):
            continue
        name, sep, _ = line.partition(b":")
        if not sep or not name:
            text = line[:80].decode(ENCODING, "replace")
            raise SourceError(f"expected 'name:pass:uid:gid:gecos:dir:quota': {text!r}",
                              path, number)


def check_names(names: list[bytes], origin: str, warn: Callable[[str], None]) -> list[bytes]:
    """Drop names no SMTP client can send unquoted (white space, control characters)."""
    if _BAD.search(b"".join(names)):
        good = [n for n in names if not _BAD.search(n)]
        warn(f"{origin}: skipped {len(names) - len(good)} name(s) with white space or "
             "control characters")
        return good
    return names


def read_users(domain_dir: str, domain: str, vuserinfo: str | None) -> tuple[str, list[bytes]]:
    """(origin, lowercased user names) for one vpopmail domain."""
    path = os.path.join(domain_dir, "vpasswd")
    denied: SourceError | None = None
    try:
        data = read_bytes(path, nofollow=True)
    except Unreadable as err:
        denied, data = err, None
    if data is not None:
        return f"vpasswd {path}", parse_vpasswd(data, path)
    if denied is None:
        cdb_path = path + ".cdb"
        try:
            keys = vpasswd_cdb_users(cdb_path)
        except SourceError as err:
            if vuserinfo is None or not os.path.exists(cdb_path):
                raise
            denied = err
        else:
            if keys is not None:
                return f"vpasswd.cdb {cdb_path}", [k.lower() for k in keys]
            if vuserinfo is None:
                raise SourceError("vpopmail domain has neither vpasswd nor vpasswd.cdb "
                                  "(bounce-no-mailbox would reject every address)", domain_dir)
    if vuserinfo is None:
        assert denied is not None
        raise denied
    return f"vuserinfo -D {domain}", run_vuserinfo(vuserinfo, domain)


def vpasswd_cdb_users(path: str) -> list[bytes] | None:
    """The users of a vpasswd.cdb (key: the name; value: ``pass:uid:gid:...``), the
    locked ones left out; None when there is no such file."""
    db = open_cdb_checked(path, nofollow=True)
    if db is None:
        return None
    try:
        return [k.lower() for k, v in db.items()
                if not locked(atoi(v.split(b":", 3)[2] if v.count(b":") >= 2 else b""))]
    except Exception as err:            # corrupt file: cdbx raises its own errors
        raise SourceError(f"corrupt cdb: {err}", path) from None
    finally:
        db.close()


def run_vuserinfo(program: str, domain: str) -> list[bytes]:
    argv = [program, "-n", "-D", domain]
    try:
        done = subprocess.run(argv, capture_output=True,
                              timeout=300, check=False)
    except OSError as err:
        raise SourceError(f"cannot run: {err.strerror}", program) from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"timed out listing {domain}", program) from None
    if done.returncode != 0:
        detail = done.stderr.decode(ENCODING, "replace").strip().splitlines()
        why = f": {detail[-1][:200]}" if detail else ""
        raise SourceError(f"-D {domain} exited {done.returncode}{why}", program)
    return done.stdout.lower().split()
