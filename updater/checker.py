"""The validrcptto lookup of qmail-smtpd (REFERENCE §1, rules 6-8).

Pure rules over bytes, given a ``get(key) -> value | None`` function; ``open_cdb`` is the
only I/O, done once per connection.  Kept free of heavy imports: validrcptto-smtpd
runs one process per SMTP connection.
"""

from __future__ import annotations

import errno
import os
from collections import namedtuple
from collections.abc import Callable, Iterator

REJECT = b"-"       # the value of a key that refuses: any value whose first byte is ``-``
                    # refuses (rule 8); the list writes this one

# accepted: bool; key: the key that decided (None when nothing was found); value: its
# value; tried: every key looked up, in order.
Verdict = namedtuple("Verdict", "accepted key value tried")


def lower(address: bytes) -> bytes:
    """Only ASCII A-Z are lowercased (bytes.lower does exactly that)."""
    return address.lower()


def candidates(address: bytes) -> Iterator[bytes]:
    """Keys to try, in order, for an already lowercased address:
    the address; then, split at the last ``@``, ``user-up-to-each-dash`` + ``default``
    from the last dash to the first; then ``@domain``.  No ``@``: the address only."""
    yield address
    at = address.rfind(b"@")
    if at == -1:
        return
    user, domain = address[:at], address[at:]
    end = len(user)
    while True:
        end = user.rfind(b"-", 0, end)
        if end == -1:
            break
        yield user[: end + 1] + b"default" + domain
    yield domain


def check(get: Callable[[bytes], bytes | None], address: bytes) -> Verdict:
    """The first key found decides: a value starting with ``-`` rejects, anything else
    (the empty value included) accepts; no key found rejects."""
    tried = []
    for key in candidates(lower(address)):
        tried.append(key)
        value = get(key)
        if value is not None:
            return Verdict(not value.startswith(REJECT), key, value, tuple(tried))
    return Verdict(False, None, None, tuple(tried))


class CdbGetter:
    """A lookup function over one open cdb.  A file that opens but is empty or corrupt
    finds nothing (every recipient is then rejected, never deferred), as in qmail-smtpd.
    ``strict``: a lookup that fails raises OSError (EPROTO) instead (tcpserver's rules:
    an unreadable rule must not become "allow")."""

    def __init__(self, fd: int, strict: bool = False):
        import cdbx
        self._db = None
        self.strict = strict
        self.entries = 0                    # records, when the opener counted them
        try:
            self._db = cdbx.CDB(fd, close=True)
        except Exception:
            os.close(fd)

    def __call__(self, key: bytes) -> bytes | None:
        try:
            if self._db is None:
                raise ValueError("not open")
            value: bytes | None = self._db.get(key)
            return value
        except Exception:
            if self.strict:
                raise OSError(errno.EPROTO, "not a cdb") from None
            return None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def whole(header: bytes, size: int) -> bool:
    """Whether a cdb's 2048-byte ``header`` is that of a whole file of ``size`` bytes:
    its 256 hash tables lie after the header and end exactly at the end of the file
    (the empty file, which cdb tools never write, is not whole either)."""
    import struct
    if size < 2048 or len(header) < 2048:
        return False
    end = 2048
    for pos, slots in struct.iter_unpack("<LL", header[:2048]):
        if pos < 2048 or pos + slots * 8 > size:
            return False
        end = max(end, pos + slots * 8)
    return end == size


def records(header: bytes) -> int:
    """The records of a whole cdb, from its header (two hash slots per record)."""
    import struct
    return int(sum(slots for _, slots in struct.iter_unpack("<LL", header[:2048])) // 2)


def unusable(fd: int, need_records: bool = True) -> str | None:
    """Why the cdb open on ``fd`` cannot answer (not a whole cdb, or, with
    ``need_records``, one with no records, which the installer never writes), or None.
    A broken file is a temporary failure, never a reason to refuse a listed address."""
    header = os.pread(fd, 2048, 0)
    if not whole(header, os.fstat(fd).st_size):
        return "not a whole cdb"
    if need_records and records(header) == 0:
        return "a cdb with no records"
    return None


def open_cdb(path: str) -> CdbGetter:
    """Open the cdb (raises OSError when it cannot be opened at all)."""
    return CdbGetter(os.open(path, os.O_RDONLY))
