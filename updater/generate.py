"""mkvalidrcptto: classify every domain we receive mail for, run the sources, normalise.

The domain universe is control/rcpthosts plus control/morercpthosts.cdb.  Each domain
is, first match wins: local (control/locals, or control/me when locals is absent),
virtual or alias (control/virtualdomains), or routed (control/smtproutes, written as
``@domain``).  A domain that fits none is a fatal error: listing it as a catch-all
would quietly accept mail this server cannot deliver, and dropping it would reject
all of its mail.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .config import Settings
from .errors import SourceError
from .qmail import (ENCODING, ERRORS, Account, MapEntry, accounts as load_accounts, assign_index,
                    cdb_keys, control_lines, first_line, lower_ascii, map_index, map_lookup,
                    parse_assign, parse_domain_map, read_text)
from .sources import Found, Notes
from .sources.aliases import alias_entries
from .sources.site import site_entries
from .sources.system import local_accounts
from .sources.virtual import file_users, find_home, virtual_entries


# --------------------------------------------------------------------------- rules (pure)

@dataclass
class Plan:
    """Which domain is handled how."""
    local: list[str] = field(default_factory=list)
    alias: list[str] = field(default_factory=list)                # virtualdomains d:alias
    virtual: list[tuple[str, MapEntry]] = field(default_factory=list)
    routed: list[tuple[str, MapEntry]] = field(default_factory=list)
    singles: list[MapEntry] = field(default_factory=list)        # user@domain:prepend
    ldap: list[str] = field(default_factory=list)                 # listed from LDAP


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
            if vd.right == "alias":
                plan.alias.append(domain)
            else:
                plan.virtual.append((domain, vd))
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
    plan.singles = [e for e in virtualdomains
                    if "@" in e.left and e.left.rpartition("@")[2] in domains and e.right]
    return plan


_BAD = re.compile(rb"[\x00-\x09\x0b-\x20\x7f]")          # \n separates the keys
REJECT_VALUE = b"-"


def normalise(keys: list, origin: str, notes: Notes) -> list[bytes]:
    """Keys as bytes, lowercased (A-Z only), without keys no SMTP client can send
    unquoted (white space, control characters): one pass over all of a group's keys."""
    if not keys:
        return []
    if isinstance(keys[0], str):
        data = "\n".join(keys).encode(ENCODING, ERRORS)
    else:
        data = b"\n".join(keys)
    if _BAD.search(data) or data.count(b"\n") != len(keys) - 1:
        raw = [k.encode(ENCODING, ERRORS) if isinstance(k, str) else k for k in keys]
        good = [k for k in raw if not _BAD.search(k) and b"\n" not in k]
        notes.warn(f"{origin}: skipped {len(keys) - len(good)} name(s) with white space "
                   "or control characters")
        if not good:
            return []
        data = b"\n".join(good)
    return data.lower().split(b"\n")


@dataclass
class Result:
    keys: dict[bytes, int]          # key -> index into origins
    origins: list[str]
    rejects: set[bytes]
    warnings: list[str]
    seconds: float = 0.0
    domains: frozenset[bytes] = frozenset()   # the domain universe (for the install gate)

    def sorted_keys(self) -> list[bytes]:
        return sorted(self.keys)

    def value(self, key: bytes) -> bytes:
        """``-`` for a rejecting key, else empty."""
        return REJECT_VALUE if key in self.rejects else b""

    def items(self) -> list[tuple[bytes, bytes]]:
        return [(k, self.value(k)) for k in self.sorted_keys()]

    def origin(self, key: bytes) -> str:
        return self.origins[self.keys[key]]


def merge(groups: Iterable[Found], notes: Notes, bare_domain: str | None) -> Result:
    """Dedupe; excluded keys win over everything; an excluded ``@domain`` removes the
    domain's other keys.  Keys at ``bare_domain`` (control/envnoathost) also get a bare
    local-part key, since qmail delivers an address without ``@`` there."""
    keys: dict[bytes, int] = {}
    origins: list[str] = []
    excluded: list[tuple[list[bytes], int]] = []
    for found in groups:
        index = len(origins)
        origins.append(found.origin)
        ks = found.keys if found.clean else normalise(found.keys, found.origin, notes)
        if found.reject:
            excluded.append((ks, index))
        else:
            keys.update(dict.fromkeys(ks, index))
    rejects: set[bytes] = set()
    for ks, index in excluded:
        for k in ks:
            if k.startswith(b"@"):
                for other in [o for o in keys if o.endswith(k)]:
                    del keys[other]
            keys[k] = index
            rejects.add(k)
    if bare_domain:
        suffix = b"@" + bare_domain.encode(ENCODING, ERRORS)
        if suffix not in keys:
            bare = {k[: -len(suffix)]: k for k in keys
                    if k.endswith(suffix) and not k.startswith(b"@")}
            for local, full in bare.items():
                if local not in keys:
                    keys[local] = keys[full]
                    if full in rejects:
                        rejects.add(local)
    return Result(keys, origins, rejects, notes.warnings)


# --------------------------------------------------------------------------- the build

def _vpopmail_dir(settings: Settings, accts: dict[str, Account]) -> str:
    if settings.vpopmail_dir:
        return settings.vpopmail_dir
    if "vpopmail" in accts:
        return accts["vpopmail"].home
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
    return classify(domains, locals_, vd, sr, ldap_domains), domains


def sources(settings: Settings, plan: Plan, notes: Notes) -> Iterator[Found]:
    """Every source, in a fixed order (the output does not depend on it: it is sorted)."""
    accts_list = load_accounts(settings.passwd)
    accts = {}
    for a in accts_list:
        accts.setdefault(a.name, a)
    yield from local_accounts(accts_list, settings.uid_min, settings.uid_max, plan.local, notes)
    alias_home = accts["alias"].home if "alias" in accts else \
        os.path.join(settings.qmail_dir, "alias")
    yield from alias_entries(alias_home, plan.local + plan.alias, notes)
    if plan.virtual:
        assign_path = os.path.join(settings.qmail_dir, "users", "assign")
        assign = assign_index(parse_assign(read_text(assign_path), assign_path))
        vpop = _vpopmail_dir(settings, accts)
        vuserinfo = os.path.join(vpop, "bin", "vuserinfo") if settings.vuserinfo else None
        users_of, aliases_of, db = file_users(vuserinfo), None, None
        if settings.mysql:
            from .sources.mysql import MysqlUsers
            db = MysqlUsers(dataclasses.replace(settings, vpopmail_dir=vpop), notes)
            users_of, aliases_of = (lambda home, domain: db.users(domain)), db.valiases
        try:
            for domain, entry in plan.virtual:
                home = find_home(domain, entry, assign, accts, vpop)
                yield from virtual_entries(domain, home, users_of, settings.qmail_ext, notes,
                                           aliases_of)
        finally:
            if db is not None:
                db.close()
    if plan.ldap:
        from .sources.ldap import ldap_entries
        yield from ldap_entries(settings, plan.ldap)
    for domain, entry in plan.routed:
        yield Found(f"smtproutes {entry.path}:{entry.line}", ["@" + domain])
    for entry in plan.singles:
        yield Found(f"virtualdomains {entry.path}:{entry.line}", [entry.left])
    yield from site_entries(settings.include, settings.exclude)


def generate(settings: Settings) -> Result:
    """The whole list, or a SourceError: never a partial list."""
    started = time.monotonic()
    notes = Notes()
    plan, universe_ = plan_for(settings)
    handled = set(plan.local) | set(plan.alias) | {d for d, _ in plan.virtual}
    bare = first_line(settings.control("envnoathost")) or first_line(settings.control("me"))
    bare = lower_ascii(bare) if bare and lower_ascii(bare) in handled else None
    result = merge(sources(settings, plan, notes), notes, bare)
    result.domains = frozenset(d.encode(ENCODING, ERRORS) for d in universe_)
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- what to watch

CONTROL_FILES = ("rcpthosts", "morercpthosts.cdb", "locals", "me", "virtualdomains",
                 "smtproutes", "envnoathost")


def watch_targets(settings: Settings) -> dict[str, tuple[set[str], tuple[str, ...]]]:
    """directory -> (file names, name prefixes) whose change can change the list.

    Directories rather than files, so a replace-by-rename is seen.  When the control
    files cannot be read (the build is failing), the control, users and alias
    directories are still watched, so fixing them triggers the next build."""
    targets: dict[str, tuple[set[str], tuple[str, ...]]] = {}

    def add(directory: str, names=(), prefixes=()) -> None:
        got_names, got_prefixes = targets.setdefault(os.path.abspath(directory), (set(), ()))
        got_names.update(names)
        targets[os.path.abspath(directory)] = (got_names, tuple(set(got_prefixes) | set(prefixes)))

    add(os.path.join(settings.qmail_dir, "control"), CONTROL_FILES)
    add(os.path.join(settings.qmail_dir, "users"), ("assign", "cdb"))
    for site in (settings.include, settings.exclude):
        add(os.path.dirname(site), (os.path.basename(site),))
    if settings.passwd:
        add(os.path.dirname(os.path.abspath(settings.passwd)), (os.path.basename(settings.passwd),))
    try:
        accts = {}
        for a in load_accounts(settings.passwd):
            accts.setdefault(a.name, a)
        alias_home = accts["alias"].home if "alias" in accts else \
            os.path.join(settings.qmail_dir, "alias")
        add(alias_home, (), (".qmail-",))
        ff = None
        from .qmail import fastforward_cdb, runs
        args = runs(read_text(os.path.join(alias_home, ".qmail-default")), "fastforward")
        if args:
            ff = fastforward_cdb(args)
        if ff:
            add(os.path.dirname(os.path.abspath(ff)), (os.path.basename(ff),))
        plan, _ = plan_for(settings)
        assign_path = os.path.join(settings.qmail_dir, "users", "assign")
        assign = assign_index(parse_assign(read_text(assign_path), assign_path))
        vpop = _vpopmail_dir(settings, accts)
        for domain, entry in plan.virtual:
            try:
                home = find_home(domain, entry, assign, accts, vpop)
            except SourceError:
                continue
            add(home.path, ("vpasswd", "vpasswd.cdb"), (home.prefix,))
    except SourceError:
        pass
    return targets
