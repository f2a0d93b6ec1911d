"""A cdb that a long-running server can read whatever happens to the file.

``Snapshot`` copies the file into a private memfd and maps that: a lookup can never
fault (SIGBUS) when the file on disk is truncated or rewritten in place, since nobody
else can touch the copy.  ``CdbCache`` keeps the snapshot of one path and takes a new
one when the file's (dev, inode, size, mtime) change; a copy that is not a whole cdb
(the file was caught mid-write) is not used: the previous snapshot stays until the
file settles.  Sessions keep the snapshot they started with (a cdb is opened once per
connection, as in qmail-smtpd).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from ..checker import CdbGetter, records
from ..checker import whole as is_whole
from ..ident import Ident, of_stat


def snapshot(path: str, strict: bool = False) -> tuple[CdbGetter, Ident, bool]:
    """(getter, identity, whole) for the file at ``path``; OSError when it cannot be
    opened (qmail-smtpd: 421 unable to read controls).  The getter's ``entries`` is the
    number of records of a whole file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(22, "not a regular file", path)
        ident = of_stat(st)
        mfd = os.memfd_create("validrcptto.cdb", os.MFD_CLOEXEC)
        try:
            copied = 0
            while copied < st.st_size:
                n = os.sendfile(mfd, fd, copied, st.st_size - copied)
                if n == 0:
                    break                               # truncated while we copied
                copied += n
            os.lseek(mfd, 0, os.SEEK_SET)
            count = 0
            if copied:
                header = os.pread(mfd, 2048, 0)
                whole = is_whole(header, copied)
                count = records(header) if whole else 0
            else:
                whole = False
            if os.fstat(fd).st_size != st.st_size:
                whole = False
        except BaseException:
            os.close(mfd)
            raise
    finally:
        os.close(fd)
    getter = CdbGetter(mfd, strict=strict)
    getter.entries = count
    return getter, ident, whole


class CdbCache:
    """``strict`` (tcpserver's rules): a file that is not a whole cdb is an error
    (OSError EPROTO, as tcpserver's "protocol error") at every connection until a whole
    one replaces it, and a lookup that fails raises instead of finding nothing.
    Otherwise (validrcptto.cdb, morercpthosts.cdb) a file caught mid-write keeps the
    last whole snapshot; one that was never whole is unavailable (OSError EPROTO: a
    temporary failure, never "not found"), and so is, with ``need_records``
    (validrcptto.cdb, which the installer never writes empty), a cdb with no records."""

    def __init__(self, path: str, log: Callable[[str], None], strict: bool = False,
                 need_records: bool = False):
        self.path, self.log, self.strict = path, log, strict
        self.need_records = need_records
        self.getter: CdbGetter | None = None
        self.ident: Ident | None = None
        self.torn: Ident | None = None
        self.why = "not a whole cdb"

    @property
    def entries(self) -> int:
        """Records in the snapshot in use (0 before the first, or when it was not whole)."""
        return self.getter.entries if self.getter is not None else 0

    @property
    def mtime(self) -> float:
        """When the file the snapshot was copied from was last written."""
        return self.ident[3] / 1e9 if self.ident else 0.0     # mtime

    def current(self) -> CdbGetter:
        """The snapshot for a new connection; OSError when the file cannot be opened or
        there is no whole snapshot to answer with."""
        st = os.stat(self.path)
        ident = of_stat(st)
        if self.strict:
            if ident == self.torn:
                raise OSError(errno.EPROTO, "not a cdb", self.path)
            if ident != self.ident:
                getter, ident, whole = snapshot(self.path, strict=True)
                if not whole:
                    getter.close()
                    self.torn = ident
                    raise OSError(errno.EPROTO, "not a cdb", self.path)
                if self.getter is not None:
                    self.getter.close()
                self.getter, self.ident, self.torn = getter, ident, None
            assert self.getter is not None      # a whole snapshot was taken above, or before
            return self.getter
        if ident != self.ident and ident != self.torn:
            getter, ident, whole = snapshot(self.path)
            empty = whole and self.need_records and getter.entries == 0
            if whole and not empty:
                self.getter, self.ident, self.torn = getter, ident, None
            else:
                getter.close()
                self.torn = ident
                self.why = "a cdb with no records" if empty else "not a whole cdb"
                if empty:                       # never ours: no list to answer with
                    self.getter = self.ident = None
                keep = "; keeping the previous one" if self.getter is not None else \
                    ": unavailable (temporary failure) until a whole one replaces it"
                self.log(f"{self.path} is {self.why}{keep}")
        if self.getter is None:
            raise OSError(errno.EPROTO, self.why, self.path)
        return self.getter

    def forget(self) -> None:
        self.ident = self.torn = None
