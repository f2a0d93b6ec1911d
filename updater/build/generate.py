"""mkvalidrcptto: classify every domain we receive mail for, run the sources, normalise.

The domain universe is control/rcpthosts plus control/morercpthosts.cdb.  Each domain
is, first match wins: local (control/locals, or control/me when locals is absent),
virtual or alias (control/virtualdomains), or routed (control/smtproutes, written as
``@domain``).  A domain that fits none is a fatal error: listing it as a catch-all
would quietly accept mail this server cannot deliver, and dropping it would reject
all of its mail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..errors import SourceError
from .inputs import Inputs
from .localdelivery import TAIL
from .merge import Result, merge
from .qmail import (
    ENCODING,
    ERRORS,
    LIMITS,
    Account,
    MapEntry,
    UsersDb,
    cdb_keys,
    control_lines,
    first_line,
    lower_ascii,
    map_index,
    map_lookup,
    parse_assign,
    parse_domain_map,
    part_of,
    read_text,
    read_users_cdb,
    users_db,
)
from .qmail import accounts as load_accounts
from .routing import DomainKeys, Router
from .sources import Found, Notes, at
from .sources.ldap import LdapCache
from .sources.mysql import MysqlCache
from .sources.qmailtree import DiskView
from .sources.site import site_entries
from .sources.vpopmail import read_users

# --------------------------------------------------------------------------- rules (pure)

@dataclass
class Plan:
    """Which domain is handled how."""
    local: list[str] = field(default_factory=list)
    virtual: list[tuple[str, MapEntry]] = field(default_factory=list)
    routed: list[tuple[str, MapEntry]] = field(default_factory=list)
    singles: list[MapEntry] = field(default_factory=list)        # user@domain:prepend
    ldap: list[str] = field(default_factory=list)                 # listed from LDAP
    # every domain locals or virtualdomains name, served or not: a domain gone from
    # rcpthosts but still here is not a removal anyone finished
    configured: frozenset[str] = frozenset()


def universe(rcpthosts: list[tuple[int, str]], rcpthosts_path: str,
             more: Iterable[str], more_path: str) -> dict[str, tuple[str, int | None]]:
    """domain -> (file, line) where it is listed.  A ``.domain`` wildcard cannot be
    expressed in validrcptto.cdb (the checker matches exact domains): an error."""
    out: dict[str, tuple[str, int | None]] = {}
    listed: list[tuple[str, tuple[str, int | None]]] = \
        [(lower_ascii(d.strip()), (rcpthosts_path, n)) for n, d in rcpthosts]
    listed += [(lower_ascii(d), (more_path, None)) for d in more]
    for domain, where in listed:
        if domain.startswith("."):
            raise SourceError(f"{domain!r} matches every subdomain, but validrcptto.cdb can "
                              "only list exact domains: list the subdomains you accept", *where)
        if not domain or "@" in domain or any(c.isspace() for c in domain):
            raise SourceError(f"not a domain: {domain!r}", *where)
        out.setdefault(domain, where)
    return out


def classify(domains: dict[str, tuple[str, int | None]], locals_: set[str],
             virtualdomains: list[MapEntry], smtproutes: list[MapEntry],
             ldap_domains: frozenset[str] = frozenset()) -> Plan:
    plan = Plan()
    vd_index = map_index(e for e in virtualdomains if "@" not in e.left)
    sr_index = map_index(smtproutes)
    unhandled = []
    for domain in domains:                            # in the order they are listed
        if domain in ldap_domains:
            plan.ldap.append(domain)
            continue
        if domain in locals_:
            plan.local.append(domain)
            continue
        vd = map_lookup(vd_index, domain)
        if vd is not None and vd.right:               # "domain:" is an exception, not virtual
            plan.virtual.append((domain, vd))    # "domain:alias" too: qmail-getpw finds alias
            continue
        sr = map_lookup(sr_index, domain)
        if sr is not None:
            plan.routed.append((domain, sr))
            continue
        unhandled.append(domain)
    if unhandled:
        first = unhandled[0]
        more = f" (and {len(unhandled) - 1} more: {', '.join(unhandled[1:6])})" \
            if len(unhandled) > 1 else ""
        raise SourceError(f"{first} is listed but not handled by this server: not in locals, "
                          f"virtualdomains or smtproutes{more}", *domains[first])
    # user@domain lines: qmail-send checks locals first, so they never apply at a
    # local domain; "user@domain:" (empty) sends that address out to qmail-remote
    plan.singles = [e for e in virtualdomains
                    if "@" in e.left and e.left.rpartition("@")[2] in domains]
    return plan


# --------------------------------------------------------------------------- the build

def file_users(vuserinfo: str | None) -> Callable[[str, str], tuple[str, list[Any]]]:
    """The default user lookup: the domain's vpasswd files (``vpopmail.read_users``)."""
    return lambda home, domain: read_users(home, domain, vuserinfo)


def _vpopmail_dir(settings: Settings, accts: dict[str, Account]) -> str:
    if settings.vpopmail_dir:
        return settings.vpopmail_dir
    if "vpopmail" in accts:
        return str(accts["vpopmail"].home)
    return "/home/vpopmail"


def plan_for(settings: Settings) -> tuple[Plan, dict[str, tuple[str, int | None]]]:
    """Read the control files and classify the domain universe."""
    rcpthosts = settings.control("rcpthosts")
    more_path = settings.control("morercpthosts.cdb")
    domains = universe(control_lines(read_text(rcpthosts, required=True)), rcpthosts,
                       cdb_keys(more_path) or [], more_path)
    locals_text = read_text(settings.control("locals"))
    if locals_text is None:
        me = first_line(settings.control("me"))
        locals_ = {lower_ascii(me)} if me else set()
    else:
        locals_ = {lower_ascii(line) for _, line in control_lines(locals_text)}
    vd_path, sr_path = settings.control("virtualdomains"), settings.control("smtproutes")
    vd = parse_domain_map(control_lines(read_text(vd_path)), vd_path)
    sr = parse_domain_map(control_lines(read_text(sr_path)), sr_path)
    ldap_domains: frozenset[str] = frozenset()
    if settings.ldap_uri:
        path = settings.ldap_domains
        ldap_domains = frozenset(lower_ascii(line) for _, line in
                                 control_lines(read_text(path, required=True)))
        if not ldap_domains:
            raise SourceError("LDAP is configured (UPDATER_LDAP_URI) but this file names "
                              "no domain to list from it", path)
    plan = classify(domains, locals_, vd, sr, ldap_domains)
    plan.configured = frozenset(locals_) | {lower_ascii(e.left) for e in vd
                                            if "@" not in e.left and e.right}
    return plan, domains


def users_database(settings: Settings, notes: Notes) -> UsersDb:
    """users/cdb, as qmail-lspawn reads it; users/assign only when there is no cdb."""
    users = os.path.join(settings.qmail_dir, "users")
    db = read_users_cdb(os.path.join(users, "cdb"))
    if db is not None:
        return db
    assign_path = os.path.join(users, "assign")
    entries = parse_assign(read_text(assign_path), assign_path)
    if entries:
        notes.warn(f"{users}/cdb does not exist: using {assign_path} as qmail-newu would "
                   "compile it (qmail itself ignores users/assign until qmail-newu runs)")
    return users_db(entries, assign_path)


def router_for(settings: Settings, notes: Notes, tracer: Inputs,
               mysql: MysqlCache | None = None) -> tuple[Router, DiskView]:
    """The delivery chain over this tree, recording what it reads in ``tracer``:
    (router, view); ``router.close()`` releases the database.  ``mysql``: what the
    database gave before, kept by the daemon (filled by a full build)."""
    accts = load_accounts(settings.passwd)
    by_name: dict[str, Account] = {}
    for a in accts:
        by_name.setdefault(a.name, a)
    users = users_database(settings, notes)
    vpop = _vpopmail_dir(settings, by_name)
    vuserinfo = os.path.join(vpop, "bin", "vuserinfo") if settings.vuserinfo else None
    users_of: Callable[[str, str], tuple[str, list[Any]]] = file_users(vuserinfo)
    aliases_of: Callable[[str], list[str] | None] | None = None
    db = None
    if settings.mysql:
        from .sources.mysql import MysqlUsers
        db = MysqlUsers(dataclasses.replace(settings, vpopmail_dir=vpop), notes, mysql)
        users_of, aliases_of = (lambda home, domain: db.users(domain)), db.valiases
    view = DiskView(accts, users, settings.qmail_dir, notes.warn, users_of, aliases_of,
                    settings.qmail_ext, tracer)
    router = Router(users, view, accts, settings.uid_min, settings.uid_max, notes.warn)
    router.close = db.close if db is not None else (lambda: None)
    return router, view


def routed_keys(domain: str, keys: DomainKeys, notes: Notes) -> Iterator[Found]:
    """One domain's answers as Found groups: one per origin, refusals apart."""
    groups: dict[tuple[str, bool, bool], list[str]] = {}
    for u, ans in keys.exact.items():
        groups.setdefault((ans.origin, ans.ok, ans.user), []).append(f"{u}@{domain}")
    for p, ans in keys.prefix.items():
        groups.setdefault((ans.origin, ans.ok, ans.user), []).append(
            f"{p}default@{domain}" if p else "@" + domain)
    root = keys.prefix.get("")
    if root is not None and root.ok:
        notes.warn(f"{root.origin} accepts every address at {domain}: @{domain} is a "
                   "catch-all")
    for (origin, ok, user), ks in groups.items():
        yield Found(origin, ks, deny=not ok, user=user)
    for origin, names in keys.bulk:
        yield Found(origin, at(names, domain), clean=bool(names) and isinstance(names[0], bytes))
    if not keys.bulk and not any(ans.ok for ans in keys.exact.values()) and \
            not any(ans.ok for ans in keys.prefix.values()):
        notes.warn(f"{domain}: qmail delivers no address there (its mail ends at "
                   "~alias or bounces)")


def split_singles(plan: Plan, notes: Notes, want: Callable[[str], bool]
                  ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, MapEntry]]]:
    """The ``user@domain:prepend`` lines: domain -> user -> local part, and the
    ``user@domain:`` (empty) lines, which qmail delivers remotely."""
    singles: dict[str, dict[str, str]] = {}
    remote: dict[str, dict[str, MapEntry]] = {}
    local = set(plan.local)
    for e in plan.singles:                           # the last of equal lines wins
        user, _, domain = e.left.rpartition("@")
        if domain in local:
            notes.warn(f"{e.path}:{e.line}: {e.left} never applies: {domain} is in "
                       "locals, which qmail-send checks first")
        elif not want(domain):
            continue
        elif e.right:
            remote.get(domain, {}).pop(user, None)
            singles.setdefault(domain, {})[user] = lower_ascii(e.right) + "-" + user
        else:
            singles.get(domain, {}).pop(user, None)
            remote.setdefault(domain, {})[user] = e
    return singles, remote


@contextlib.contextmanager
def tracing(router: Router, domain: str) -> Iterator[None]:
    """What the router reads meanwhile is recorded for ``domain`` (incremental builds)."""
    tracer = router.view.tracer
    tracer.domain = domain
    try:
        yield
    finally:
        tracer.domain = None


def chain_keys(plan: Plan, notes: Notes, router: Router, singles: dict[str, dict[str, str]],
               want: Callable[[str], bool], counts: dict[str, dict[str, int]] | None,
               failed: dict[str, str]) -> Iterator[Found]:
    """The local and virtual domains through qmail's delivery chain, then the single
    ``user@domain:prepend`` addresses of the other domains.  A source error in one
    domain (a bad vpasswd line, an unreadable home, the database failing) goes into
    ``failed`` for that domain, whose keys are then left out whole; the others go on."""
    def domain_keys(domain: str, prepend: str, only: dict[str, str] | None = None
                    ) -> list[Found]:
        try:
            with tracing(router, domain):
                keys = router.domain(domain, prepend, only)
            found = list(routed_keys(domain, keys, notes))
        except SourceError as err:
            failed[domain] = str(err)
            return []
        if counts is not None and keys.sources:
            counts[domain] = keys.sources
        return found

    for domain in plan.local:
        if want(domain):
            yield from domain_keys(domain, "")
    for domain, entry in plan.virtual:
        if want(domain):
            yield from domain_keys(domain, lower_ascii(entry.right) + "-",
                                   singles.pop(domain, None))
    routed = {d for d, _ in plan.routed}
    for domain, by_user in singles.items():      # routed or LDAP domains
        found: list[Found] = []
        try:
            for user, local_part in by_user.items():
                with tracing(router, domain):
                    ans = router.resolve(local_part, domain)
                if not ans.ok or domain not in routed:     # routed: @domain says yes
                    found.append(Found(ans.origin, [f"{user}@{domain}"], deny=not ans.ok))
        except SourceError as err:
            failed[domain] = str(err)
            continue
        yield from found


def sources(settings: Settings, plan: Plan, notes: Notes, router: Router | None = None,
            counts: dict[str, dict[str, int]] | None = None,
            only: frozenset[str] | None = None, bare: str | None = None,
            ldap_cache: LdapCache | None = None,
            failed: dict[str, str] | None = None) -> Iterator[Found]:
    """Every source, in a fixed order (the output does not depend on it: it is sorted).
    ``only``: just the keys of these domains (an incremental build); the keys of one
    domain never depend on another domain's sources."""
    def want(domain: str) -> bool:
        return only is None or domain in only

    failed = {} if failed is None else failed
    singles, remote = split_singles(plan, notes, want)
    if router is not None:
        try:
            yield from chain_keys(plan, notes, router, singles, want, counts, failed)
        finally:
            router.close()
    for domain, by_user in remote.items():           # the far side decides: accept
        for user, e in by_user.items():
            yield Found(f"{e.path}:{e.line} (delivered remotely)", [f"{user}@{domain}"])
    ldap = [d for d in plan.ldap if want(d)]
    if ldap:
        from .sources.ldap import ldap_keys
        yield from ldap_keys(settings, ldap, counts, failed, ldap_cache)
    for domain, entry in plan.routed:
        if want(domain):
            yield Found(f"smtproutes {entry.path}:{entry.line}", ["@" + domain])
    for found in site_entries(settings.include, settings.exclude):
        if only is not None:
            keys = [k for k in found.keys if part_of(k, bare) in only]
            if not keys:
                continue
            found = dataclasses.replace(found, keys=keys)
        yield found


def generate(settings: Settings, only: frozenset[str] | None = None,
             tracer: Inputs | None = None, mysql: MysqlCache | None = None,
             ldap: LdapCache | None = None, partial: bool = False) -> Result:
    """The whole list but the domains whose source failed (``Result.failed``: the install
    keeps their last good entries), or a SourceError for what every domain depends on
    (control files, users/cdb, passwd, site files); without ``partial`` (a printed list:
    nothing to hold from) a failed domain fails it all.  ``only``: just these domains'
    keys (``part_of``); ``tracer``: the record of what each domain read; ``mysql`` /
    ``ldap``: the database's and the directory's answers kept between builds."""
    started = time.monotonic()
    LIMITS["max_file_size"] = settings.max_file_size
    notes = Notes()
    if settings.ldap_uri and settings.ldap_insecure and only is None:
        notes.warn(f"UPDATER_LDAP_INSECURE: {settings.ldap_uri}'s certificate is not verified")
    plan, universe_ = plan_for(settings)
    handled = set(plan.local) | {d for d, _ in plan.virtual}
    bare = first_line(settings.control("envnoathost")) or first_line(settings.control("me"))
    bare = lower_ascii(bare) if bare and lower_ascii(bare) in handled else None
    router = None
    if plan.local or plan.virtual or plan.singles:
        router, _ = router_for(settings, notes,
                               tracer if tracer is not None else Inputs(recording=False), mysql)
    counts: dict[str, dict[str, int]] = {}
    failed: dict[str, str] = {}
    result = merge(sources(settings, plan, notes, router, counts, only, bare, ldap, failed),
                   notes, bare)
    if failed and not partial:
        first = sorted(failed)[0]
        more = f" (and {len(failed) - 1} more domains)" if len(failed) > 1 else ""
        raise SourceError(failed[first] + more)
    result.failed = failed
    result.configured = frozenset(d.encode(ENCODING, ERRORS) for d in plan.configured)
    result.domains = frozenset(d.encode(ENCODING, ERRORS) for d in universe_)
    result.sources = counts
    result.bare = bare.encode(ENCODING, ERRORS) if bare else None
    if router is not None:
        prepends = {d: "" for d in plan.local}
        prepends.update((d, lower_ascii(e.right) + "-") for d, e in plan.virtual)
        result.user_key = user_key_test(router, prepends, bare)
    result.seconds = time.monotonic() - started
    return result


CONTROL_FILES = ("rcpthosts", "morercpthosts.cdb", "locals", "me", "virtualdomains",
                 "smtproutes", "envnoathost")
GLOBAL_USERS = ("users/assign", "users/cdb")


def global_inputs(settings: Settings) -> list[str]:
    """The files every domain's keys may depend on: a change to one of them means a
    full build (the control files, users/assign and users/cdb, passwd, the site files,
    the LDAP domain list)."""
    paths = [settings.control(name) for name in CONTROL_FILES]
    paths += [os.path.join(settings.qmail_dir, rel) for rel in GLOBAL_USERS]
    paths += [p for p in (settings.passwd or "/etc/passwd", settings.include, settings.exclude,
                          settings.ldap_domains if settings.ldap_uri else None) if p]
    return [os.path.abspath(p) for p in paths]


def user_key_test(router: Router, prepends: dict[str, str], bare: str | None
                  ) -> Callable[[bytes], bool]:
    """key -> whether a local user's own files decide it (for the install gate, which
    must not be moved by what users create and delete in their homes)."""
    def user_key(key: bytes) -> bool:
        text = key.decode(ENCODING, ERRORS)
        local, at, domain = text.rpartition("@")
        if not at:
            local, domain = text, bare or ""
        prepend = prepends.get(domain)
        if prepend is None or not local:
            return False
        if local.endswith("-default"):
            local = local[:-7] + TAIL
        return router.user_owned(prepend + local)
    return user_key
