"""qmail's own rules for a local part (pure): how qmail-getpw finds the account a local
part belongs to, and how qmail-local finds the ``.qmail`` file for an extension."""

from __future__ import annotations

from collections.abc import Callable

from .qmail import ENCODING, ERRORS, lower_ascii

TAIL = "/"              # "any other local part": no file, account or vpopmail user has a /
GETPW_USERLEN = 32      # qmail-getpw: a user name is shorter than this, in bytes


def getpw(local: str, is_account: Callable[[str], bool]) -> tuple[str, str, str] | None:
    """qmail-getpw: (user, dash, ext) for the longest account name that the local part
    begins with, cut at a ``-`` (or the whole local part); None means ``alias``."""
    end = len(local)
    while True:
        if end == len(local) or local[end] == "-":
            name = local[:end]
            if name and len(name.encode(ENCODING, ERRORS)) < GETPW_USERLEN and is_account(name):
                if end == len(local):
                    return name, "", ""
                return name, "-", local[end + 1:]
        if end == 0:
            return None
        end -= 1


def safe_ext(ext: str) -> str:
    """qmail-local's file-name form of an extension: lowercased, ``.`` written ``:``."""
    return lower_ascii(ext).replace(".", ":")


def qmail_search(dash: str, ext: str, names: frozenset[str]) -> tuple[str, int | None] | None:
    """qmail-local's search: ``.qmail{dash}{ext}``, then ``.qmail{dash}{ext[:i]}default``
    for each ``i`` at a ``-`` (longest first) and 0.  Returns the file name and where
    $DEFAULT starts in ext (None when the file is not a default file)."""
    safe = safe_ext(ext)
    base = ".qmail" + dash
    name = base + safe
    if name in names:
        return name, (len(safe) - 7 if safe.endswith("default") else None)
    for i in range(len(safe), -1, -1):
        if i == 0 or safe[i - 1] == "-":
            name = base + safe[:i] + "default"
            if name in names:
                return name, i
    return None


MAX_COLONS = 4


def spellings(safe: str) -> list[str]:
    """The extensions qmail-local turns into file-name form ``safe``: each ``:`` may have
    been a ``.`` or a ``:`` (up to MAX_COLONS of them; past that, all dots or all colons)."""
    parts = safe.split(":")
    if len(parts) == 1:
        return [safe]
    if len(parts) - 1 > MAX_COLONS:
        return [".".join(parts), safe]
    out = [parts[0]]
    for part in parts[1:]:
        out = [o + sep + part for o in out for sep in ".:"]
    return out
