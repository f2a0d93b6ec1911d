"""What a long-running server (--listen, validrcptto-policyd) reads from control files,
kept current without a signal: ``Watched`` looks at the files' identities at most every
CONTROL_RECHECK seconds and reads them again when one changed, keeping the last good copy when
the new one cannot be trusted."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ..ident import Ident, of_stat
from ..limits import CONTROL_RECHECK, CONTROL_SETTLE
from .controlfiles import ControlError

# the control files qmail-smtpd reads (morercpthosts.cdb is a cdb snapshot of its own)
CONTROL_FILES = ("me", "smtpgreeting", "localiphost", "timeoutsmtpd", "rcpthosts",
                 "badmailfrom", "databytes")
T = TypeVar("T")
FileIdent = Ident | None


def file_ident(path: str) -> FileIdent:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, -1, -1, -1, -1)             # unreadable: read_controls says why
    return of_stat(st)


class Watched(Generic[T]):
    """What a long-running server reads from some files, read again when one of them
    changes: looked at (a stat each) at most every CONTROL_RECHECK seconds, so a new session
    sees a changed file within a second, with no signal.  A file that cannot be read,
    that changed while it was read, or a list (rcpthosts, badmailfrom) still being
    written (no final newline, younger than CONTROL_SETTLE seconds) keeps the last good copy
    and logs one line; with no good copy yet, the error is raised (421)."""

    def __init__(self, paths: list[str], read: Callable[[], T], log: Callable[[str], None],
                 what: str, clock: Callable[[], float] = time.monotonic):
        self.paths, self.read, self.log, self.what, self.clock = paths, read, log, what, clock
        self.value: T | None = None
        self.have = False
        self.idents: list[FileIdent] | None = None
        self.failed: list[FileIdent] | None = None
        self.checked = float("-inf")

    def forget(self) -> None:
        """SIGHUP: read again at the next look, whatever the files say."""
        self.idents = None
        self.checked = float("-inf")

    def current(self) -> T:
        now = self.clock()
        if self.have and now < self.checked + CONTROL_RECHECK:
            return self.value                   # type: ignore[return-value]
        self.checked = now
        before = [file_ident(p) for p in self.paths]
        if self.have and before == self.idents:
            return self.value                   # type: ignore[return-value]
        try:
            fresh = self.read()
            if [file_ident(p) for p in self.paths] != before:
                raise ControlError("a file changed while it was read")
            if self.have:
                self._settled(before)
        except ControlError as err:
            if not self.have:
                raise
            if before != self.failed:
                self.failed = before
                self.log(f"cannot read {self.what}: {err}; keeping the previous ones")
            return self.value                   # type: ignore[return-value]
        self.value, self.have, self.idents, self.failed = fresh, True, before, None
        return fresh

    def _settled(self, idents: list[FileIdent]) -> None:
        """A list caught mid-write keeps the last good copy: emptied in place (the first
        step of ``cat new > rcpthosts``) or without its final newline, and changed less
        than CONTROL_SETTLE seconds ago (an mtime in the future is not "being written": such a
        file would never settle)."""
        for path, ident in zip(self.paths, idents):
            if ident is None or ident[2] < 0 or \
                    not path.endswith(("rcpthosts", "badmailfrom")):
                continue
            if 0 <= time.time() - ident[3] / 1e9 < CONTROL_SETTLE:
                if ident[2] == 0:
                    raise ControlError(f"{path}: being written (emptied just now)")
                try:                            # (never blocks: O_NONBLOCK)
                    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    last = os.pread(fd, 1, ident[2] - 1)
                except OSError:
                    continue
                finally:
                    os.close(fd)
                if last != b"\n":
                    raise ControlError(f"{path}: being written (no final newline yet)")
