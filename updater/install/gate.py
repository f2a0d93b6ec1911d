"""The sanity gate: which domains of a new list must keep their last good entries (pure).

The gate judges what the list **accepts**, per domain, not how many keys the whole list
has.  A removal someone named is intended: an address an onchange line named, a domain
the control files no longer serve (gone from rcpthosts / morercpthosts and from locals
and virtualdomains).  A loss nobody named is judged, for that domain alone: a domain
whose new keys refuse more than ``--max-shrink`` percent of the addresses it accepted
(against the largest list it had within the last ``GATE_WINDOW`` seconds, so a stream of
small cuts does not walk past it), that lost every key, or where one source gave nothing
that gave entries before (a vpasswd emptied, a valias table or an LDAP search returning
nothing; a source not consulted meanwhile, say behind a catch-all, is remembered) is
*doubted*.  A doubted domain keeps its last good entries in the new list while every
other domain's changes install (``install``); ``qmail-updater accept DOMAIN`` (or
``--force``) takes its new list.  Only an empty list is refused whole.

What a key accepted is asked of both lists with one *probe* address that the key
decides (``probe``): ``joe@d`` for itself, ``joe-\x01@d`` for ``joe-default@d``,
``\x01@d`` for ``@d`` (no key holds a control character).  Only the keys that changed
are asked (removed, value changed, or added with ``-``), so the cost follows the size
of the change.  A catch-all narrowed to mailboxes loses keys and refuses nothing that a
mailbox list names: not a loss while the domain still accepts some address.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from ..checker import REJECT, check
from ..limits import GATE_WINDOW, MIN_LOSS

Getter = Callable[[bytes], "bytes | None"]
TAIL = b"\x01"                # a local part no listed name contains


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


KIND_WORDS = {"users": "vpopmail users", "valias": "valias entries", "ldap": "LDAP addresses",
              "fastforward": "fastforward entries"}


def vanished(old: dict[str, int], new: dict[str, int]) -> str | None:
    """Which source of one domain gave nothing where it gave entries last time (a
    vpasswd emptied, a valias table or an LDAP search returning nothing), or None
    (pure).  ``old``: kind -> names it gave (remembered while the source was not
    consulted); ``new``: the kinds consulted now.  A kind only counts when consulted now."""
    for kind, had in sorted(old.items()):
        if isinstance(had, int) and had > 0 and new.get(kind) == 0:
            return f"its {KIND_WORDS.get(kind, kind)} are gone ({had} last time, none now)"
    return None


def carried(old: dict[str, int] | None, new: dict[str, int]) -> dict[str, int]:
    """A domain's source counts to remember: those consulted now, and the last known
    count of each source not consulted this time (a vpasswd behind a catch-all), so a
    catch-all switched off over a vpasswd that lost its users is still judged."""
    out = {k: v for k, v in (old or {}).items() if isinstance(v, int) and k not in new}
    out.update(new)
    return out




@dataclass(frozen=True)
class Peak:
    """What a domain's losses are measured against within ``GATE_WINDOW`` of ``since``: the
    most addresses it accepted (``count``) and the addresses nobody named that it has
    lost since (``lost``), so a stream of small cuts adds up."""
    count: int
    lost: int
    since: float


@dataclass
class DomainChange:
    """One domain's side of a new list against the live one: the addresses it accepted
    (``old``) and accepts (``new``), keys local users control left out; the changed keys
    whose addresses it no longer accepts (``lost``); whether it is still served and, if
    not, still configured (in locals or virtualdomains); what each source gave."""
    old: int
    new: int
    lost: list[bytes]
    served: bool = True
    configured: bool = False
    sources_old: dict[str, int] | None = None
    sources_new: dict[str, int] | None = None
    removed: list[bytes] = field(default_factory=list)   # its keys gone from the list


def excused(key: bytes, names: AbstractSet[bytes]) -> bool:
    """Whether an onchange line named ``key``'s address: its local part is a named one,
    or an extension of it (``joe-default`` for ``joe``)."""
    local = key[:key.rfind(b"@")] if b"@" in key else key
    return local in names or any(local.startswith(n + b"-") for n in names)


def judge_domain(domain: str, c: DomainChange, named: AbstractSet[bytes], peak: Peak | None,
                 now: float, max_shrink: float) -> tuple[str | None, Peak | None]:
    """Why ``domain``'s new keys must not replace its live ones (None: they may), and
    the peak to remember for it (pure).  ``named``: the local parts onchange lines named
    since the last build (their losses are intended)."""
    if not c.served:
        if c.configured and c.old:
            return (f"{domain} is no longer in rcpthosts but still in locals or "
                    "virtualdomains: finish removing it, or list it again"), peak
        return None, None                       # the control files removed it: intended
    base = peak if peak is not None and now - peak.since < GATE_WINDOW else None
    named_lost = [k for k in c.lost if excused(k, named)] if named else []
    unnamed = len(c.lost) - len(named_lost)
    reference = max(max(c.old, base.count if base else 0) - len(named_lost), 0)
    loss = (base.lost if base else 0) + unnamed
    since = base.since if base else now
    why = None
    if unnamed and c.new == 0 and c.old:
        why = f"{domain} had {c.old} entries and now has none; did a source return nothing?"
    elif any(not excused(k, named) for k in c.removed) and c.sources_old and \
            c.sources_new is not None and \
            (gone := vanished(c.sources_old, c.sources_new)) is not None:
        why = f"{domain}: {gone}; did a source return nothing?"
    elif max_shrink > 0 and reference and loss >= MIN_LOSS and \
            loss * 100.0 > max_shrink * reference:
        within = f" within {GATE_WINDOW / 3600:g} h" if base else ""
        why = (f"{domain} would refuse {loss} of the {reference} addresses it accepted"
               f"{within}, more than the {max_shrink:g}% allowed (--max-shrink)")
    if why is not None:                   # held: what it lost so far stays counted
        return why, Peak(reference, base.lost if base else 0, since)
    return None, (Peak(reference, loss, since) if loss else None)
