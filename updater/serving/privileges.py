"""Giving up root once the port is bound: the account's uid and gid, no supplementary
groups.  Shared by validrcptto-smtpd --listen and validrcptto-policyd."""

from __future__ import annotations

import os
import sys


def drop_privileges(user: str) -> None:
    import pwd
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


def become(user: str, prog: str) -> None:
    """``drop_privileges``, or one line on stderr and exit 111 (daemontools: try later)."""
    try:
        drop_privileges(user)
    except (KeyError, OSError) as err:
        sys.stderr.write(f"{prog}: cannot become {user}: {err}\n")
        sys.exit(111)
