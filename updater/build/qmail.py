"""Readers for qmail's own files, and the rules qmail applies to them.

One reader per file format, used everywhere: the generator, the daemon's watch list and
the SMTP server all come here to learn where a file is and what it says.  Parsers are
pure functions over lines; the ``read_*`` helpers are the only file I/O.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import namedtuple
from collections.abc import Iterable
from typing import Any, AnyStr, NamedTuple

from ..errors import SourceError

ENCODING = "utf-8"
ERRORS = "surrogateescape"     # never fail on 8-bit bytes; write them back unchanged

# Only ASCII A-Z are lowercased, by qmail-smtpd and therefore by us (REFERENCE §1.6).
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def part_of(key: AnyStr, bare: AnyStr | None) -> AnyStr:
    """The domain a key belongs to (its incremental unit): the part after the last
    ``@``, lowercased; a key without ``@`` belongs to the envnoathost domain (``bare``),
    whose keys make it.  For the generator's text keys and the list's bytes alike."""
    if isinstance(key, str):
        at = key.rfind("@")
        return lower_ascii(key[at + 1:]) if at >= 0 else (bare or "")
    at = key.rfind(b"@")
    return key[at + 1:].lower() if at >= 0 else (bare or b"")


def lower_ascii(text: str) -> str:
    """Lowercase A-Z only; leave every other character alone."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


# --------------------------------------------------------------------------- file I/O

# The largest file the generator reads (UPDATER_MAX_FILE_SIZE; set by generate()).
LIMITS = {"max_file_size": 1 << 30}


class Unreadable(SourceError):
    """Permission denied (as opposed to a file that is odd or broken)."""


def open_checked(path: str, *, nofollow: bool = False, sized: bool = True) -> int | None:
    """Open a file root reads on others' behalf: O_NONBLOCK (a FIFO planted under the
    name never hangs the build), a regular file only, owned by root, by us or by the
    owner of its directory (as qmail-local's owners are), and not larger than the limit.
    ``nofollow``: a symlink is refused too (vpopmail never makes one).  None when the
    file does not exist; otherwise a SourceError that never quotes the file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if nofollow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as err:
        if nofollow and err.errno == errno.ELOOP:
            raise SourceError("is a symbolic link: not read", path) from None
        kind = Unreadable if err.errno in (errno.EACCES, errno.EPERM) else SourceError
        raise kind(f"cannot read: {err.strerror}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError("is not a regular file: not read", path)
        if st.st_uid not in (0, os.geteuid()):
            try:
                owner = os.stat(os.path.dirname(os.path.abspath(path))).st_uid
            except OSError:
                owner = None
            if st.st_uid != owner:
                raise SourceError(f"is owned by uid {st.st_uid}, neither root nor the owner "
                                  "of its directory: not read", path)
        limit = LIMITS["max_file_size"]
        if sized and st.st_size > limit:
            raise SourceError(f"is {st.st_size} bytes, more than UPDATER_MAX_FILE_SIZE "
                              f"({limit}): not read", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str, *, required: bool = False, nofollow: bool = False,
               head: int | None = None) -> bytes | None:
    """A whole file (checked by ``open_checked``), or None when it does not exist;
    ``head``: only its first ``head`` bytes, whatever its size."""
    fd = open_checked(path, nofollow=nofollow, sized=head is None)
    if fd is None:
        if required:
            raise SourceError("missing", path)
        return None
    limit = LIMITS["max_file_size"] if head is None else head - 1
    try:
        with open(fd, "rb", closefd=True) as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise SourceError(f"cannot read: {err.strerror}", path) from None
    if len(data) > limit and head is None:
        raise SourceError(f"grew past UPDATER_MAX_FILE_SIZE ({limit}) while read", path)
    return data[:head] if head is not None else data


def read_text(path: str, *, required: bool = False) -> str | None:
    """A whole file as text, or None when it does not exist (unless required)."""
    data = read_bytes(path, required=required)
    return None if data is None else data.decode(ENCODING, ERRORS)


def control_lines(text: str | None) -> list[tuple[int, str]]:
    """qmail control-file lines: (line number, text) without blanks and # comments,
    trailing white space removed (as qmail's control_readfile does)."""
    if not text:
        return []
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip(" \t\r")
        if line and not line.startswith("#"):
            out.append((number, line))
    return out


def read_control(path: str, *, required: bool = False) -> list[tuple[int, str]]:
    return control_lines(read_text(path, required=required))


def first_line(path: str) -> str | None:
    """The first line of a control file (control/me, control/smtpgreeting), or None."""
    lines = read_control(path)
    return lines[0][1] if lines else None


def open_cdb_checked(path: str, nofollow: bool = False) -> Any:
    """A cdbx.CDB over a file checked by ``open_checked``; None when it does not exist."""
    import cdbx
    fd = open_checked(path, nofollow=nofollow)
    if fd is None:
        return None
    try:
        return cdbx.CDB(fd, close=True)
    except OSError as err:
        os.close(fd)
        raise SourceError(f"cannot read cdb: {err.strerror or err}", path) from None
    except Exception as err:
        os.close(fd)
        raise SourceError(f"corrupt cdb: {err}", path) from None


def cdb_keys(path: str, raw: bool = False, nofollow: bool = False
             ) -> list[Any] | None:
    """Every key of a cdb file (as bytes if ``raw``, else str), or None when it does not exist."""
    db = open_cdb_checked(path, nofollow)
    if db is None:
        return None
    try:
        return list(db) if raw else [k.decode(ENCODING, ERRORS) for k in db]
    except Exception as err:            # corrupt file: cdbx raises its own errors
        raise SourceError(f"corrupt cdb: {err}", path) from None
    finally:
        db.close()


def list_dir(path: str) -> list[str] | None:
    """Names in a directory, or None when it does not exist; unreadable is an error."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise SourceError(f"cannot read directory: {err.strerror}", path) from None


# --------------------------------------------------------------------------- domain maps

# One ``left:right`` line of virtualdomains or smtproutes.  left: domain, .suffix,
# user@domain or "" (everything); right: the prepend (virtualdomains) or relay (smtproutes).
# (namedtuples rather than dataclasses: validrcptto-smtpd imports this module per
# connection, and dataclasses costs more to import than the whole SMTP session.)
MapEntry = namedtuple("MapEntry", "left right path line")


def parse_domain_map(lines: Iterable[tuple[int, str]], path: str) -> list[MapEntry]:
    out = []
    for number, line in lines:
        left, sep, right = line.partition(":")
        if not sep:
            raise SourceError(f"malformed line (expected 'domain:value'): {line!r}",
                              path, number)
        left = lower_ascii(left.strip())
        if " " in left or "\t" in left:
            raise SourceError(f"malformed domain {left!r}", path, number)
        out.append(MapEntry(left, right.strip(), path, number))
    return out


def map_index(entries: Iterable[MapEntry]) -> dict[str, MapEntry]:
    """The last of equal keys wins, as in qmail's constmap (each entry is put at the
    head of its hash chain, and a lookup walks the chain from the head)."""
    return {e.left: e for e in entries}


def map_lookup(index: dict[str, MapEntry], domain: str) -> MapEntry | None:
    """qmail's lookup order: the domain, then each .parent suffix, then the empty key."""
    hit = index.get(domain)
    if hit is not None:
        return hit
    dot = domain.find(".")
    while dot != -1:
        hit = index.get(domain[dot:])
        if hit is not None:
            return hit
        dot = domain.find(".", dot + 1)
    return index.get("")


# --------------------------------------------------------------------------- users/assign

# One users/assign line: ``=local:user:uid:gid:home:dash:ext:`` (exact=True) or
# ``+prefix:user:uid:gid:home:dash:pre:`` (a wildcard).
Assign = namedtuple("Assign", "exact local user uid home dash ext line raw_last")


def parse_assign(text: str | None, path: str) -> list[Assign]:
    if not text:
        return []
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line == ".":
            break
        if not line.strip():
            continue
        kind = line[0]
        if kind not in "=+":
            raise SourceError(f"line must start with '=', '+' or be '.': {line!r}",
                              path, number)
        fields = line[1:].split(":")
        if len(fields) < 7:
            raise SourceError(f"expected 7 ':'-separated fields: {line!r}", path, number)
        local, user, uid, _gid, home, dash, ext = fields[:7]
        try:
            uid_n = int(uid)
        except ValueError:
            raise SourceError(f"uid is not a number: {uid!r}", path, number) from None
        out.append(Assign(kind == "=", lower_ascii(local), user, uid_n, home, dash, ext,
                          number, local[-1:]))
    return out


class UsersDb(NamedTuple):
    """users/cdb as qmail-lspawn reads it: ``=`` entries by exact local part, ``+``
    entries by prefix (both lowercased, the first of duplicate keys wins), and the
    characters that ``+`` prefixes end in, as qmail-newu records them (unlowered: a
    prefix ending in a capital is never tried, as in qmail)."""
    exact: dict[str, Assign]
    prefix: dict[str, Assign]
    wild: frozenset[str]
    source: str                       # users/cdb or users/assign, for messages


def users_db(entries: list[Assign], source: str) -> UsersDb:
    """What qmail-newu compiles from users/assign lines."""
    exact: dict[str, Assign] = {}
    prefix: dict[str, Assign] = {}
    wild = set()
    for e in entries:
        (exact if e.exact else prefix).setdefault(e.local, e)
        if not e.exact and e.raw_last:
            wild.add(e.raw_last)
    return UsersDb(exact, prefix, frozenset(wild), source)


def read_users_cdb(path: str) -> UsersDb | None:
    """users/cdb (what qmail-lspawn really reads), or None when it does not exist."""
    db = open_cdb_checked(path)
    if db is None:
        return None
    exact: dict[str, Assign] = {}
    prefix: dict[str, Assign] = {}
    wild: frozenset[str] = frozenset()
    try:
        for key, value in db.items():
            key = key.decode(ENCODING, ERRORS)
            value = value.decode(ENCODING, ERRORS)
            if key == "":
                wild = frozenset(value)
                continue
            if not key.startswith("!"):
                continue
            fields = value.split("\0")
            if len(fields) < 6:
                raise SourceError(f"entry {key!r} has {len(fields)} fields, not 6", path)
            user, uid, _gid, home, dash, ext = fields[:6]
            is_exact = key.endswith("\0")
            local = key[1:-1] if is_exact else key[1:]
            entry = Assign(is_exact, local, user, _scan_ulong(uid), home, dash, ext, None,
                           local[-1:])
            (exact if is_exact else prefix).setdefault(local, entry)
    except SourceError:
        raise
    except Exception as err:            # corrupt file: cdbx raises its own errors
        raise SourceError(f"corrupt cdb: {err}", path) from None
    finally:
        db.close()
    return UsersDb(exact, prefix, wild, path)


def _scan_ulong(text: str) -> int:
    digits = len(text) - len(text.lstrip("0123456789"))
    return int(text[:digits]) if digits else 0


def lspawn_lookup(db: UsersDb, local: str) -> tuple[Assign, str] | None:
    """qmail-lspawn's users/cdb lookup of a (lowercased) local part: the exact ``=``
    entry, else the longest ``+`` prefix whose last character qmail-newu recorded (the
    empty prefix is always tried).  Returns the entry and the rest of the local part."""
    hit = db.exact.get(local)
    if hit is not None:
        return hit, ""
    if not db.prefix:
        return None
    for end in range(len(local), -1, -1):
        if end == 0 or local[end - 1] in db.wild:
            hit = db.prefix.get(local[:end])
            if hit is not None:
                return hit, local[end:]
    return None


# --------------------------------------------------------------------------- passwd

Account = namedtuple("Account", "name uid home")


def parse_passwd(text: str, path: str) -> list[Account]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 7 or not fields[0]:
            raise SourceError(f"expected 7 ':'-separated fields: {line!r}", path, number)
        try:
            uid = int(fields[2])
        except ValueError:
            raise SourceError(f"uid is not a number: {fields[2]!r}", path, number) from None
        out.append(Account(fields[0], uid, fields[5]))
    return out


def accounts(passwd_file: str) -> list[Account]:
    """The passwd database: a passwd-format file when given, else the system's."""
    if passwd_file:
        return parse_passwd(read_text(passwd_file, required=True) or "", passwd_file)
    import pwd
    return [Account(p.pw_name, p.pw_uid, p.pw_dir) for p in pwd.getpwall()]
