"""What validrcptto-policyd's listeners need besides the protocol: the listening
sockets (a unix socket made where others may write, never through a name) and a log
whose rate a flood cannot drive."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable

from .netsock import listen_tcp


class RateLog:
    """At most ``rate`` lines a second; the rest are counted and summed up in one line
    (``flush``, from the once-a-second sweep): a flood cannot flood the log."""

    def __init__(self, rate: int, log: Callable[[str], None]):
        self.rate, self.second, self.lines, self.dropped = rate, 0, 0, 0
        self.log = log

    def line(self, text: str) -> None:
        now = int(time.monotonic())
        if now != self.second:
            self.flush()
            self.second, self.lines = now, 0
        self.lines += 1
        if self.lines <= self.rate:
            self.log(text)
        else:
            self.dropped += 1

    def flush(self) -> None:
        if self.dropped:
            self.log(f"{self.dropped} more log lines in the last second left out "
                     f"(at most {self.rate} a second)")
            self.dropped = 0


def parse_listen(text: str, unix: bool = True) -> tuple[str, str, int]:
    """("unix", PATH, 0) or ("inet", HOST, PORT) ([::] and [::1] as IPv6; an empty host
    is 0.0.0.0), for both servers (``unix``: whether unix:PATH is allowed)."""
    if unix and text.startswith("unix:"):
        return "unix", text[5:], 0
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT{' or unix:PATH' if unix else ''}, got {text!r}")
    return "inet", host.strip("[]") or "0.0.0.0", int(port)


def bind(spec: str, mode: int, owner: str) -> socket.socket:
    kind, where, port = parse_listen(spec)
    if kind == "unix":
        sock = bind_unix(where, mode, owner)
    else:
        return listen_tcp(where, port, 256)
    sock.listen(256)
    sock.setblocking(False)
    return sock


def bind_unix(path: str, mode: int, owner: str) -> socket.socket:
    """A unix socket at ``path``, in a directory others (postfix) may write: nothing at
    the path is followed or changed through a name.  A stale socket is removed; a
    symlink (dangling or not) or any other file is refused, saying what is there.  The
    mode comes from the umask at bind() (no chmod), the owner by lchown (a socket
    swapped for a link after bind() gets only the link's owner changed)."""
    import stat as st_
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if st_.S_ISSOCK(st.st_mode):
            os.unlink(path)                          # a stale socket (ours, last time)
        elif st_.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            dangling = "" if os.path.exists(path) else ", dangling"
            raise OSError(errno.EEXIST, f"is a symbolic link (to {target!r}{dangling}): "
                                        "refusing to bind there", path)
        else:
            what = "a regular file" if st_.S_ISREG(st.st_mode) else \
                "a directory" if st_.S_ISDIR(st.st_mode) else "not a socket"
            raise OSError(errno.EEXIST, f"exists and is {what}: refusing to replace it",
                          path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(~mode & 0o777)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    if owner:
        import grp
        import pwd
        user, _, group = owner.partition(":")
        uid = pwd.getpwnam(user).pw_uid if user else -1
        gid = grp.getgrnam(group).gr_gid if group else -1
        os.chown(path, uid, gid, follow_symlinks=False)
    return sock
