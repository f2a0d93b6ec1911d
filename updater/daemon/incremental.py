"""Incremental builds: redo only the domains that changed, and install the new list from
the previous one plus the delta.

The keys of one domain depend only on that domain's own inputs (its home, its vpasswd,
its ``.qmail`` files, its valias table) and on the *global* inputs every domain shares
(the control files, users/cdb, passwd, the site files).  So after a full build the
daemon keeps a ``Snapshot`` of the live list: its keys, sorted, grouped by domain, with
what each domain was derived from (``inputs.Inputs``) and the identity of every global
input.  An incremental build then

1. stat()s the global inputs: any change means a full build (``NeedFull``);
2. takes the domains named by the requests, plus every domain whose recorded inputs are
   no longer what they were, plus the domains that share a user list with those (vpopmail
   alias domains);
3. runs the ordinary generator on just those domains (``generate(only=...)``, the same
   code as a full build) and diffs their keys against the snapshot's;
4. splices the delta into the sorted list and writes the cdb from it, through the same
   gate as a full build, if the live file is still the one the snapshot describes.

The cdb written is the one a full build of the same tree writes, byte for byte: both are
made from the same sorted keys by the same writer (tests/test_incremental.py holds them
to it over generated sequences of changes).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from ..build.generate import generate, global_inputs
from ..build.inputs import Inputs
from ..build.merge import Result
from ..build.qmail import ENCODING, ERRORS, part_of
from ..build.sources.ldap import LdapCache
from ..build.sources.mysql import MysqlCache, Rows
from ..config import Settings
from ..ident import Ident, identities
from ..install.cdbdiff import Changes
from ..install.gate import accepting_under, sorted_getter
from ..install.installer import install_delta
from ..install.liverecord import Held
from ..install.outcome import InstallReport
from ..install.verdict import Candidate, Intent
from ..limits import INCREMENTAL_MAX_DOMAINS, SPLICE_LIMIT


def live_path(settings: Settings) -> str:
    return settings.cdb                            # (Settings.resolve() sets it)


class NeedFull(Exception):
    """The incremental path cannot answer: the reason, for the log."""


def split(keys: list[bytes], bare: bytes | None) -> dict[bytes, list[bytes]]:
    """The sorted keys grouped by domain (``qmail.part_of``), each group sorted."""
    parts: defaultdict[bytes, list[bytes]] = defaultdict(list)
    default = bare or b""
    for k in keys:
        _, at, d = k.rpartition(b"@")
        parts[d if at else default].append(k)
    return dict(parts)


@dataclass
class Snapshot:
    """The live list as the last build installed it, and what it was derived from."""
    keys: list[bytes]                       # sorted
    rejects: set[bytes]
    parts: dict[bytes, list[bytes]]         # domain -> its keys
    user: set[bytes]                        # keys local users' own files decide
    sources: dict[str, dict[str, int]]      # domain -> source kind -> names it gave
    domains: frozenset[bytes]
    bare: bytes | None
    globals: dict[str, Ident | None]
    inputs: Inputs
    live: Ident | None                      # the installed file's identity
    builds: int = 0                         # incremental builds since the full one
    mysql: MysqlCache | None = None         # the database's answers (vpopmail on MySQL)
    ldap: LdapCache | None = None           # the directory's (kept current by polls)
    held: dict[str, Held] = field(default_factory=dict)   # domains kept as they were

    @classmethod
    def of(cls, result: Result, keys: list[bytes], inputs: Inputs,
           globals_: dict[str, Ident | None], live: Ident | None,
           mysql: MysqlCache | None = None, ldap: LdapCache | None = None) -> Snapshot:
        user = {k for k, i in result.keys.items() if i in result.user_origins} \
            if result.user_origins else set()
        return cls(keys, set(result.rejects), split(keys, result.bare), user,
                   dict(result.sources), result.domains, result.bare, globals_, inputs, live,
                   0, mysql, ldap)


@dataclass
class Delta:
    keys: list[bytes]
    rejects: set[bytes]
    parts: dict[bytes, list[bytes]]
    user: set[bytes]
    changes: Changes
    new_keys: set[bytes] = field(default_factory=set)     # the redone domains' keys now

    @property
    def empty(self) -> bool:
        c = self.changes
        return not (c.added or c.removed or c.changed)


def diff(snap: Snapshot, redone: AbstractSet[bytes], result: Result,
         held: AbstractSet[bytes] = frozenset()) -> Delta:
    """The new list: the snapshot with the ``redone`` domains' keys replaced by those
    of ``result`` (a build of just those domains); the ``held`` ones keep the
    snapshot's, or ``@domain`` where it has none (as ``install.live_entries``).  Pure."""
    fresh: dict[bytes, list[bytes]] = {d: [] for d in redone if d not in held}
    fresh.update((d, [b"@" + d]) for d in held if d not in snap.parts and d)
    for k in result.keys:
        d = part_of(k, snap.bare)
        if d in held:
            continue
        if d not in fresh:
            raise NeedFull(f"the build of {len(redone)} domain(s) gave a key of another: "
                           f"{k.decode(ENCODING, ERRORS)!r}")
        fresh[d].append(k)
    added: list[bytes] = []
    removed: list[bytes] = []
    changed: list[bytes] = []
    rejects = snap.rejects
    new_keys: set[bytes] = set()
    for d, ks in fresh.items():
        old = set(snap.parts.get(d, ()))
        new = set(ks)
        new_keys |= new
        added += new - old
        removed += old - new
        changed += [k for k in new & old if (k in rejects) != (k in result.rejects)]
    added.sort()
    removed.sort()
    changed.sort()
    parts = dict(snap.parts)
    for d, ks in fresh.items():
        if ks:
            parts[d] = sorted(ks)
        else:
            parts.pop(d, None)
    new_rejects = set(rejects)
    new_rejects.difference_update(removed)
    for k in new_keys:
        if k in result.rejects:
            new_rejects.add(k)
        else:
            new_rejects.discard(k)
    user = set(snap.user)
    user.difference_update(removed)
    for k in new_keys:
        if result.is_user_key(k):
            user.add(k)
        else:
            user.discard(k)
    return Delta(splice(snap.keys, added, removed), new_rejects, parts, user,
                 Changes(added, removed, changed), new_keys)


def splice(keys: list[bytes], added: list[bytes], removed: list[bytes]) -> list[bytes]:
    """``keys`` (sorted) without ``removed`` and with ``added`` (both sorted), as a new
    sorted list: a few keys are moved in place (one memmove each), many by one pass."""
    if not added and not removed:
        return keys
    if len(added) + len(removed) <= SPLICE_LIMIT:
        out = list(keys)
        for k in removed:
            i = bisect_left(out, k)
            if i < len(out) and out[i] == k:
                del out[i]
        for k in added:
            out.insert(bisect_left(out, k), k)
        return out
    gone = set(removed)
    out = [k for k in keys if k not in gone] if gone else list(keys)
    out += added
    out.sort()                       # two sorted runs: timsort merges them in one pass
    return out


def build(settings: Settings, snap: Snapshot, named: set[str],
          stop: threading.Event | None = None, force: bool = False,
          rows: Rows | None = None, intent: Intent | None = None
          ) -> tuple[InstallReport, Snapshot, list[str], set[str]]:
    """Redo the ``named`` domains and whatever else changed; install.  Returns (report,
    the new snapshot, warnings, the domains redone); NeedFull when only a full build
    can tell.  ``rows``: for a database source, the addresses the requests named per
    domain (a named domain not there is read again whole)."""
    started = time.monotonic()
    path = live_path(settings)
    todo = to_redo(settings, snap, named)
    if not todo:
        return unchanged(snap, path, started, {"check": time.monotonic() - started}), \
            snap, [], set()
    checked = time.monotonic()
    if snap.mysql is not None:
        snap.mysql.ask({d: (rows or {}).get(d) for d in todo & named})
    tracer = Inputs()
    result = generate(settings, only=frozenset(todo), tracer=tracer, mysql=snap.mysql,
                      ldap=snap.ldap, partial=True)
    read = time.monotonic()
    if result.bare != snap.bare or result.domains != snap.domains:
        raise NeedFull("the domains we serve changed")
    redone = {d.encode(ENCODING, ERRORS) for d in todo}
    failed = {d.encode(ENCODING, ERRORS): why for d, why in result.failed.items()}
    sources = {**{d: c for d, c in snap.sources.items() if d not in todo}, **result.sources}
    inputs = snap.inputs.replace(tracer, todo)
    phases = {"check": checked - started, "read": read - checked}
    made: dict[frozenset[bytes], Delta] = {}
    last: list[Delta] = []                  # the one ``settle`` ended with

    def make(held: frozenset[bytes]) -> Candidate:
        if held not in made:
            made[held] = diff(snap, redone, result, held)
        last.append(made[held])
        return candidate(snap, made[held], sources)

    first = made[frozenset(failed)] = diff(snap, redone, result, frozenset(failed))
    phases["merge"] = time.monotonic() - read
    if first.empty and not failed and not snap.held.keys() & todo:
        new = dataclasses.replace(snap, sources=sources, inputs=inputs, builds=snap.builds + 1)
        return unchanged(snap, path, started, phases), new, result.warnings, todo
    intent = dataclasses.replace(intent or Intent(), failed=failed, now=time.time(),
                                 kept=frozenset(snap.held.keys() - todo))
    report, _ = install_delta(
        make, path, expect=snap.live, max_shrink=settings.max_shrink,
        force=force or settings.force, lock_timeout=settings.lock_timeout, stop=stop,
        started=started, intent=intent)
    delta = last[-1]
    report.phases = {**phases, **report.phases}
    sources.update((d, snap.sources[d]) for d in report.held if d in snap.sources)
    new = Snapshot(delta.keys, delta.rejects, delta.parts, delta.user, sources, snap.domains,
                   snap.bare, snap.globals, inputs, report.identity, snap.builds + 1,
                   snap.mysql, snap.ldap, dict(report.held))
    return report, new, result.warnings, todo


def unchanged(snap: Snapshot, path: str, started: float,
              phases: dict[str, float]) -> InstallReport:
    """The report of an incremental build that changed nothing."""
    return InstallReport(path, "unchanged", len(snap.keys), seconds=time.monotonic() - started,
                         identity=snap.live, phases=phases, held=dict(snap.held))


def to_redo(settings: Settings, snap: Snapshot, named: set[str]) -> set[str]:
    """The domains an incremental build redoes: those named that we serve, those whose
    recorded inputs changed, and those sharing a user list with them; NeedFull when a
    global input changed or too many are left."""
    now = identities(global_inputs(settings))
    if now != snap.globals:
        moved = sorted(p for p in now.keys() | snap.globals.keys()
                       if now.get(p) != snap.globals.get(p))
        raise NeedFull(f"{moved[0]} changed" if moved else "the global inputs changed")
    # a domain we do not serve has no keys but the site files' (a global input)
    todo = {d for d in named if d.encode(ENCODING, ERRORS) in snap.domains}
    todo |= snap.inputs.changed()
    todo |= snap.inputs.sharing(todo)
    if len(todo) > max(INCREMENTAL_MAX_DOMAINS, len(snap.domains) // 2):
        raise NeedFull(f"{len(todo)} of {len(snap.domains)} domains to redo")
    return todo


def candidate(snap: Snapshot, delta: Delta, sources: dict[str, Any]) -> Candidate:
    """The new list of an incremental build, for the same gate as a full build."""
    removed_admin = [k for k in delta.changes.removed if k not in snap.user]
    added_admin = [k for k in delta.changes.added if k not in delta.user]

    def count(domains: AbstractSet[bytes]) -> dict[bytes, int]:
        return {d: sum(1 for k in delta.parts.get(d, ())
                       if k not in delta.rejects and k not in delta.user) for d in domains}
    return Candidate(
        delta.keys, delta.rejects, snap.domains, sources, delta.changes, removed_admin,
        added_admin, sorted_getter(snap.keys, snap.rejects),
        sorted_getter(delta.keys, delta.rejects),
        accepting_under(delta.new_keys, delta.rejects), count, snap.bare)


def full(settings: Settings, stop: threading.Event | None = None, force: bool = False,
         intent: Intent | None = None) -> tuple[InstallReport, Snapshot, list[str]]:
    """A full build that also records what an incremental build starts from: (report,
    snapshot, warnings).  A refused list raises (the caller keeps no snapshot)."""
    from ..install.installer import install_result, live_entries
    from ..install.liverecord import read_record
    globals_ = identities(global_inputs(settings))     # taken before anything is read
    tracer = Inputs()
    mysql = MysqlCache() if settings.mysql else None
    ldap = LdapCache() if settings.ldap_uri else None
    result = generate(settings, tracer=tracer, mysql=mysql, ldap=ldap, partial=True)
    keys = result.sorted_keys()
    path = live_path(settings)
    report = install_result(result, path, settings, force, stop=stop, keys=keys,
                            intent=intent)
    snap = Snapshot.of(result, keys, tracer, globals_, report.identity, mysql, ldap)
    if report.held:                  # the held domains' entries, as the install kept them
        held = {d.encode(ENCODING, ERRORS) for d in report.held}
        kept, kept_rejects = live_entries(path, held, result.bare)
        keys = sorted([k for k in keys if part_of(k, result.bare) not in held] + kept)
        rejects = {k for k in snap.rejects if part_of(k, result.bare) not in held}
        snap = dataclasses.replace(
            snap, keys=keys, rejects=rejects | kept_rejects, parts=split(keys, result.bare),
            user={k for k in snap.user if part_of(k, result.bare) not in held},
            held=dict(report.held))
    snap.sources = read_record(path).sources
    return report, snap, result.warnings
