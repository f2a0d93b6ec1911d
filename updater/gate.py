"""The sanity gate: why a new list must not replace the live one (pure).

The gate judges what the list **accepts**, not how many keys it has.  A list that is
empty, that refuses more than ``--max-shrink`` percent of the addresses the live list
accepted (not counting the keys local users make with their own ``.qmail`` files), that
takes every key from a domain we still serve, or that lost what one source gave for a
domain (a vpasswd emptied, a valias table or LDAP search that returned nothing, where
the source was consulted both times) is refused; ``--force`` installs it anyway.

What a key accepted is asked of both lists with one *probe* address that the key
decides (``probe``): ``joe@d`` for itself, ``joe-\x01@d`` for ``joe-default@d``,
``\x01@d`` for ``@d`` (no key holds a control character).  Only the keys that changed
are asked (removed, value changed, or added with ``-``), so the cost follows the size
of the change.  A domain switched to a catch-all loses keys and refuses nothing: never
refused.
"""

from __future__ import annotations


from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence, Set as AbstractSet
from typing import Any

from .checker import check
from .qmail import ENCODING, ERRORS

Getter = Callable[[bytes], "bytes | None"]
TAIL = b"\x01"                # a local part no listed name contains
REJECT = b"-"


def probe(key: bytes) -> bytes:
    """An address whose lookup ``key`` decides in any list that holds it."""
    at = key.rfind(b"@")
    if at < 0:
        return key                                   # a bare local part: exact only
    user = key[:at]
    if not user:
        return TAIL + key                            # @domain
    if user.endswith(b"-default"):
        return user[:-7] + TAIL + key[at:]           # PREFIX-default@domain
    return key


def scope(key: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, @domain) of the addresses a wildcard key (``@d``, ``P-default@d``)
    stands for; None for a key of one address."""
    at = key.rfind(b"@")
    if at < 0:
        return None
    user = key[:at]
    if not user:
        return b"", key[at:]
    if user.endswith(b"-default"):
        return user[:-7], key[at:]
    return None


def accepts(get: Getter, address: bytes) -> bool:
    return bool(check(get, address).accepted)


def lost(keys: Iterable[bytes], old: Getter, new: Getter,
         narrowed: Callable[[bytes, bytes], bool] | None = None) -> list[bytes]:
    """The changed ``keys`` whose addresses the ``old`` list accepted and the ``new`` one
    refuses (pure).  A wildcard (``@d``, ``P-default@d``) under which the new list still
    accepts some address (``narrowed(prefix, @domain)``) was narrowed, not lost: a
    catch-all turned into a list of mailboxes is an admin's choice, not a source that
    returned nothing (which the domain and source checks catch)."""
    out = []
    for key in keys:
        address = probe(key)
        if accepts(old, address) and not accepts(new, address):
            where = scope(key)
            if where is not None and narrowed is not None and narrowed(*where):
                continue
            out.append(key)
    return out


def sorted_getter(keys: Sequence[bytes], rejects: AbstractSet[bytes]) -> Getter:
    """A lookup over a sorted list of keys (``rejects`` have the value ``-``)."""
    def get(key: bytes) -> bytes | None:
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return REJECT if key in rejects else b""
        return None
    return get


def set_getter(keys: Any, rejects: AbstractSet[bytes]) -> Getter:
    """A lookup over any container of the keys."""
    return lambda key: (REJECT if key in rejects else b"") if key in keys else None


def accepting_under(keys: Iterable[bytes], rejects: AbstractSet[bytes]
                    ) -> Callable[[bytes, bytes], bool]:
    """``narrowed`` for ``lost``: whether some key of ``keys`` that accepts lies under
    PREFIX at @DOMAIN.  The keys are grouped by domain once, at the first question
    (only a lost wildcard asks), so many lost wildcards cost one pass, not one each."""
    by_domain: dict[bytes, list[bytes]] | None = None

    def under(prefix: bytes, domain: bytes) -> bool:
        nonlocal by_domain
        if by_domain is None:
            by_domain = {}
            for k in keys:
                at = k.rfind(b"@")
                if at > 0 and k not in rejects:
                    by_domain.setdefault(k[at:], []).append(k[:at])
        return any(user.startswith(prefix) for user in by_domain.get(domain, ()))
    return under


def gate(new_count: int, old_count: int | None, max_shrink: float, force: bool,
         empty: bool | None = None, users: tuple[int, int] | None = None,
         refused: int | None = None) -> str | None:
    """Why a new list must not replace the live one, or None (pure).  The counts are of
    the keys the admin controls; ``users``: (new, old) keys local users control, left
    out of the counts; ``empty``: the whole new list is empty; ``refused``: how many of
    the addresses the old list accepted the new one refuses (``lost``), which is what
    the shrink limit measures (without it, the fall in the key count)."""
    if force:
        return None
    if (new_count == 0) if empty is None else empty:
        return "refusing to install an empty list (--force installs it anyway)"
    if old_count and max_shrink > 0:
        gone = old_count - new_count if refused is None else refused
        shrink = gone * 100.0 / old_count
        if shrink > max_shrink:
            mine = f", not counting {users[1]} -> {users[0]} keys of local users' own " \
                ".qmail files" if users and (users[0] or users[1]) else ""
            return (f"refusing to install: the list shrinks by {shrink:.1f}% (it refuses "
                    f"{gone} of the {old_count} entries it accepted{mine}), more than the "
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
    (pure).  ``old``/``new``: domain -> kind of source -> names it gave; a source only
    counts when it was consulted both times (a domain switched to a catch-all no longer
    reads its vpasswd: that is not a loss)."""
    for domain in sorted(old):
        if domain.encode(ENCODING, ERRORS) not in domains or not isinstance(old[domain], dict):
            continue
        now = new.get(domain, {})
        for kind, had in sorted(old[domain].items()):
            if isinstance(had, int) and had > 0 and kind in now and now[kind] == 0:
                return (f"refusing to install: the {KIND_WORDS.get(kind, kind)} of {domain} "
                        f"are gone ({had} last time, none now); did a source return nothing? "
                        "(--force installs it anyway)")
    return None
