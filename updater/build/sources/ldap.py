"""Addresses from LDAP / Active Directory (driver: ldap3), for the domains named in
the LDAP domains file (``control/validrcptto.ldapdomains``: one domain per line).

This is what a qmail front-end MX for Exchange needs: every ``mail`` value and every
``smtp:`` proxyAddress (either case; ``X400:``, ``SIP:``... are not mail addresses) of
mail-enabled users, groups, contacts and public folders, read with a paged search.
Addresses outside the LDAP domains are ignored.  Any failure (server down, bind
refused, time-out, a search error) fails the build; the bind password comes from a
file and is never logged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import SourceError
from ...limits import FUTURE_MARGIN
from ..qmail import lower_ascii
from . import Found
from .ldapconn import Server, session

if TYPE_CHECKING:
    from ...config import Settings


PROXY = "proxyaddresses"


def addresses(values: dict[str, list[Any]], attrs: list[str], rule: str = "all"
              ) -> list[str]:
    """The mail addresses in one entry's attributes (pure).  ``rule`` (the setting
    UPDATER_LDAP_ADDRESSES): "all" lists every attribute's; "proxy" only the smtp:
    proxyAddresses (Exchange routes by them: an entry without is no recipient of its,
    MS-ADA3 2.169); "proxy-first" those where the entry has any proxyAddresses, else
    its other attributes (a directory without Exchange's, such as OpenLDAP's mail)."""
    proxies = [a for a in attrs if a.lower() == PROXY]
    if rule == "proxy" or (rule == "proxy-first" and proxies
                           and any(values.get(a) for a in proxies)):
        attrs = proxies
    out = []
    for attr in attrs:
        for value in values.get(attr, []) or []:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            value = str(value).strip()
            if attr.lower() == PROXY:
                if value[:5].lower() != "smtp:":
                    continue
                value = value[5:]
            if "@" in value:
                out.append(lower_ascii(value))
    return out


PAGED = "1.2.840.113556.1.4.319"
# Active Directory keeps a deleted object as a tombstone (isDeleted, whenChanged,
# objectGUID kept; mail and proxyAddresses stripped) in the naming context's Deleted
# Objects container, readable with this control; sent non-critical, so a directory
# without it (OpenLDAP) ignores it and finds no entry with isDeleted
SHOW_DELETED = "1.2.840.113556.1.4.417"
# an entry's stable identity, asked for explicitly (operational): OpenLDAP's entryUUID,
# Active Directory's objectGUID; an entry keeps it when it is moved or renamed
IDENTITY = ("entryUUID", "objectGUID")


def entry_key(dn: str, values: dict[str, Any]) -> str:
    """What the kept entries are keyed by (pure): the entry's UUID or GUID, so a moved
    or renamed entry replaces its old self; the DN only where the directory has neither."""
    for attr in IDENTITY:
        v = values.get(attr)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, bytes) and v:
            return f"{attr}:{v.hex()}"
        if isinstance(v, str) and v:
            return f"{attr}:{v.lower()}"
    return dn
_GENERALIZED = re.compile(r"[0-9]{10,14}([.,][0-9]{1,6})?(Z|[+-][0-9]{4})?")


@dataclass
class LdapCache:
    """The directory as the daemon last read it: each entry's addresses (every domain),
    and the newest change stamp seen (``UPDATER_LDAP_STAMP``), where the next poll
    starts.  A poll asks only for the entries changed since (``poll``), Active
    Directory's tombstones included; an entry deleted from OpenLDAP (which keeps no
    tombstones) is noticed by the next full read."""
    entries: dict[str, list[str]] = field(default_factory=dict)     # entry_key -> addresses
    mark: str = ""                                                  # generalized time
    future: dict[str, str] = field(default_factory=dict)            # DN -> a stamp to come
    failing: str | None = None      # the last poll's error: builds hold, not serve from it
    complete: bool = False                                          # a full read filled it
    searches: int = 0                                               # (tests, benchmarks)
    server: Server | None = None    # the one that answered the read the mark is from
    swept: float = 0.0              # (monotonic) when a poll last listed every identity

    def addresses(self, wanted: set[str]) -> list[str]:
        return [a for addrs in self.entries.values() for a in addrs
                if a.rpartition("@")[2] in wanted]


def ldap_entries(settings: Settings, domains: list[str],
                 cache: LdapCache | None = None) -> list[Found]:
    """The addresses of ``domains``: from ``cache`` when a full read filled it (the
    daemon's polls keep it current), else a paged search of the whole directory
    (which fills ``cache``)."""
    where = f"ldap {settings.ldap_uri}"
    origin = f"{where} base {settings.ldap_base}"
    if cache is not None and cache.complete:
        if cache.failing:           # the directory is down: its domains stay held
            raise SourceError(cache.failing)
        return [Found(origin, cache.addresses(set(domains)))]
    fresh = read_all(settings, cache.server.uri if cache and cache.server else "")
    if cache is not None:
        cache.entries, cache.mark, cache.complete = fresh.entries, fresh.mark, True
        cache.searches += fresh.searches
        cache.server = fresh.server
    return [Found(origin, fresh.addresses(set(domains)))]


def read_all(settings: Settings, prefer: str = "") -> LdapCache:
    """Every entry the filter selects, with its addresses (a paged search)."""
    with session(settings, prefer) as (conn, attrs, server):
        return everything(conn, settings, attrs, server)


def everything(conn: Any, settings: Settings, attrs: list[str], server: Server
               ) -> LdapCache:
    out = LdapCache(server=server)
    key = settings.ldap_stamp
    ceiling = stamp_ceiling()
    for ident, dn, values in search(conn, settings, settings.ldap_filter, attrs + [key],
                                    out):
        out.entries[ident] = addresses(values, attrs, settings.ldap_addresses)
        out.mark = later(out.mark, stamp(values, key), dn, out.future, ceiling)
    out.complete = True
    return out




def stamp_ceiling(now: float | None = None) -> str:
    """The latest change stamp a poll's mark may take: our clock plus FUTURE_MARGIN."""
    import time
    when = (time.time() if now is None else now) + FUTURE_MARGIN
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(when))


def later(mark: str, seen: str, dn: str, future: dict[str, str], ceiling: str) -> str:
    """The mark after an entry stamped ``seen`` (pure): the newer of the two, unless
    ``seen`` lies past ``ceiling`` (an entry from the future, or a server whose clock
    runs ahead): that one is noted in ``future`` and never moves the mark, so the polls
    that follow still ask for everything changed since the last true stamp."""
    if seen[:14] > ceiling[:14]:
        future[dn] = seen
        return mark
    return max(mark, seen)


Updates = dict[str, list[str]]          # entry_key -> its addresses now ([]: gone)


def poll(settings: Settings, mark: str, server: Server | None = None,
         kept: set[str] | None = None) -> tuple[Updates, str, LdapCache]:
    """What changed in the directory since ``mark`` (a change stamp): the entries the
    filter selects that changed since (their addresses now), and those changed since
    that it no longer selects (gone); the new mark; what it counted (``searches``, the
    entries stamped in the ``future``, which ``later`` keeps out of the mark).  Pure of the
    cache, so it can run beside a build.  The cost follows the changes, not the
    directory's size, where ``modifyTimestamp`` is indexed (OpenLDAP: ``index
    modifyTimestamp eq``; Active Directory indexes its own change stamps).  The poll
    goes to ``server`` (the one the mark is from) first; when another one answers, the
    mark means nothing there (each DC stamps its own changes): it reads everything
    instead, and says so (the count is ``complete``, its ``server`` the new one).
    ``kept``: the identities of the entries kept; then it also lists every entry's
    identity alone (a sweep), and each kept one the directory no longer has is gone."""
    key = settings.ldap_stamp
    since = f"({key}>={mark or '19700101000000Z'})"
    updates: Updates = {}
    ceiling = stamp_ceiling()
    with session(settings, server.uri if server else "") as (conn, attrs, now):
        count = LdapCache(server=now)
        if server is not None and now.dc != server.dc:
            whole = everything(conn, settings, attrs, now)
            return whole.entries, whole.mark, whole
        for ident, dn, values in search(conn, settings, f"(&{settings.ldap_filter}{since})",
                                        attrs + [key], count):
            updates[ident] = addresses(values, attrs, settings.ldap_addresses)
            mark = later(mark, stamp(values, key), dn, count.future, ceiling)
        for ident, dn, values in search(conn, settings,
                                        f"(&(!{settings.ldap_filter}){since})", [key], count):
            updates.setdefault(ident, [])
            mark = later(mark, stamp(values, key), dn, count.future, ceiling)
        # entries deleted since (AD's tombstones, keyed by the GUID the entry had)
        for ident, dn, values in search(conn, settings, f"(&(isDeleted=TRUE){since})", [key],
                                        count, naming_context(settings.ldap_base),
                                        [(SHOW_DELETED, False, None)]):
            updates.setdefault(ident, [])
            mark = later(mark, stamp(values, key), dn, count.future, ceiling)
        if kept is not None:
            present = {ident for ident, _, _ in search(conn, settings, settings.ldap_filter,
                                                       [], count)}
            updates.update((ident, []) for ident in kept - present - updates.keys())
    return updates, mark, count


def naming_context(base: str) -> str:
    """The domain a base DN lies in (its DC= components: where AD keeps the tombstones
    of everything under it), or the base itself when it has none."""
    from ldap3.utils.dn import to_dn
    try:
        parts = [p for p in to_dn(base) if p[:3].lower() == "dc="]
    except Exception:
        return base
    return ",".join(parts) or base


def apply(cache: LdapCache, updates: Updates, mark: str, whole: bool = False) -> set[str]:
    """Apply a poll's (or, ``whole``, a full read's: an entry it did not return is gone)
    answer to ``cache``; the domains whose addresses changed."""
    changed: set[str] = set()
    if whole:
        updates = {**{dn: [] for dn in cache.entries}, **updates}
    for dn, new in updates.items():
        old = cache.entries.get(dn, [])
        if sorted(old) == sorted(new):
            continue
        if new:
            cache.entries[dn] = new
        else:
            cache.entries.pop(dn, None)
        changed |= {a.rpartition("@")[2] for a in old + new}
    # (a whole read's mark replaces the kept one: it may come from another DC)
    cache.mark = mark if whole else max(cache.mark, mark)
    return changed


def stamp(values: dict[str, Any], key: str = "modifyTimestamp") -> str:
    """An entry's change stamp as generalized time (``YYYYmmddHHMMSSZ``), "" if none."""
    v = values.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    if v is None:
        return ""
    if hasattr(v, "strftime"):
        return str(v.strftime("%Y%m%d%H%M%SZ"))
    # the server's value goes into the next poll's filter: generalized time only
    # (digits, a fraction, Z or an offset), never filter syntax
    text = str(v)
    return text if _GENERALIZED.fullmatch(text) else ""


def search(conn: Any, settings: Settings, query: str, attrs: list[str],
           cache: LdapCache, base: str | None = None, controls: list[Any] | None = None
           ) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(key, DN, attributes) of every entry ``query`` selects under ``base`` (default
    the search base), page by page (``entry_key``: the entry's UUID or GUID where it has
    one)."""
    import ldap3
    cookie = None
    while True:
        cache.searches += 1
        conn.search(settings.ldap_base if base is None else base, query,
                    search_scope=ldap3.SUBTREE, attributes=[*attrs, *IDENTITY],
                    paged_size=settings.ldap_page_size, paged_cookie=cookie,
                    controls=controls)
        for entry in conn.response:
            if entry.get("type") == "searchResEntry":
                dn, values = str(entry.get("dn", "")).lower(), entry.get("attributes", {})
                yield entry_key(dn, values), dn, values
        answered = conn.result.get("controls", {})
        cookie = answered.get(PAGED, {}).get("value", {}).get("cookie")
        if not cookie:
            break


def ldap_keys(settings: Settings, domains: list[str],
              counts: dict[str, dict[str, int]] | None, failed: dict[str, str],
              cache: LdapCache | None = None) -> Iterator[Found]:
    """The LDAP domains' addresses; the directory failing fails each of them."""
    try:
        founds = ldap_entries(settings, domains, cache)
    except SourceError as err:
        failed.update(dict.fromkeys(domains, str(err)))
        return
    for found in founds:
        if counts is not None:
            for domain in domains:
                counts.setdefault(domain, {})["ldap"] = 0
            for key in found.keys:
                domain = key.rpartition("@")[2]
                if domain in counts:
                    counts[domain]["ldap"] = counts[domain].get("ldap", 0) + 1
        yield found
