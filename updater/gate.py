"""The sanity gate: why a new list must not replace the live one (pure).

A list that is empty, shrinks by more than ``--max-shrink`` percent (not counting the
keys local users make with their own ``.qmail`` files), takes every key from a domain
we still serve, or lost what one source gave for a domain (a vpasswd emptied, a valias
table or LDAP search that returned nothing) is refused; ``--force`` installs it anyway.
"""

from __future__ import annotations


from collections.abc import Iterable
from typing import Any

from .qmail import ENCODING, ERRORS


def gate(new_count: int, old_count: int | None, max_shrink: float, force: bool,
         empty: bool | None = None, users: tuple[int, int] | None = None) -> str | None:
    """Why a new list must not replace the live one, or None (pure).  The counts are of
    the keys the admin controls; ``users``: (new, old) keys local users control, left
    out of the counts; ``empty``: the whole new list is empty."""
    if force:
        return None
    if (new_count == 0) if empty is None else empty:
        return "refusing to install an empty list (--force installs it anyway)"
    if old_count and max_shrink > 0:
        shrink = (old_count - new_count) * 100.0 / old_count
        if shrink > max_shrink:
            mine = f", not counting {users[1]} -> {users[0]} keys of local users' own " \
                ".qmail files" if users and (users[0] or users[1]) else ""
            return (f"refusing to install: the list shrinks by {shrink:.1f}% "
                    f"({old_count} -> {new_count} entries{mine}), more than the "
                    f"{max_shrink:g}% allowed (--max-shrink; --force installs it anyway)")
    return None


def emptied(removed: list[bytes], new: Iterable[bytes], domains: frozenset[bytes]) -> str | None:
    """Why a list must not be installed because a domain we still receive mail for lost
    all of its keys (a source returned nothing for it), or None (pure).  ``removed``:
    the live keys not in the new list; ``new``: any container of the new keys."""
    lost = {k.rpartition(b"@")[2] for k in removed if b"@" in k} & domains
    if not lost:
        return None
    gone = sorted(lost - {k.rpartition(b"@")[2] for k in new if b"@" in k})
    if not gone:
        return None
    had = sum(1 for k in removed if k.rpartition(b"@")[2] == gone[0])   # all of them went
    more = f" (and {len(gone) - 1} more domains)" if len(gone) > 1 else ""
    name = gone[0].decode(ENCODING, ERRORS)
    return (f"refusing to install: {name} had {had} entries and now has none{more}; "
            "did a source return nothing? (--force installs it anyway)")


KIND_WORDS = {"users": "vpopmail users", "valias": "valias entries", "ldap": "LDAP addresses",
              "fastforward": "fastforward entries"}


def vanished(old: dict[str, Any], new: dict[str, Any], domains: frozenset[bytes]) -> str | None:
    """Why a list must not be installed because a source gave nothing for a domain we
    still serve where it gave entries last time (a vpasswd emptied, a valias table or an
    LDAP search returning nothing), although the domain keeps other keys; or None
    (pure).  ``old``/``new``: domain -> kind of source -> names it gave."""
    for domain in sorted(old):
        if domain.encode(ENCODING, ERRORS) not in domains or not isinstance(old[domain], dict):
            continue
        for kind, had in sorted(old[domain].items()):
            if isinstance(had, int) and had > 0 and new.get(domain, {}).get(kind, 0) == 0:
                return (f"refusing to install: the {KIND_WORDS.get(kind, kind)} of {domain} "
                        f"are gone ({had} last time, none now); did a source return nothing? "
                        "(--force installs it anyway)")
    return None
