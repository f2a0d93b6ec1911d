"""The gate's verdict on a candidate list, for both install paths (full and
incremental): per domain, which keep their live entries and why (``settle``).  Pure but
for ``make``, which the install path hands in to build a candidate."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..build.qmail import ENCODING, ERRORS, part_of
from ..checker import REJECT
from ..errors import InstallRefused
from .cdbdiff import Changes
from .gate import DomainChange, Getter, Peak, carried, judge_domain, lost
from .liverecord import Held, LiveRecord

if TYPE_CHECKING:
    import mmap


@dataclass
class Candidate:
    """A list about to be installed and what it changes against the live one: what the
    one ``judge`` needs, made by either install path (``against_live`` reads the live
    file; an incremental build knows its changes)."""
    keys: list[bytes]                     # sorted
    rejects: AbstractSet[bytes]           # keys with the value ``-``
    domains: frozenset[bytes]             # the domains still served
    sources: dict[str, Any] | None        # what each source gave per domain (``vanished``)
    changes: Changes                      # against the live list
    removed: list[bytes]                  # removed / added keys local users do not control
    added: list[bytes]
    old: Getter | None                    # lookups in the live list and in the new one
    new: Getter
    under: Callable[[bytes, bytes], bool]  # ``gate.accepting_under`` of the new list
    # domain -> accepting keys local users do not control, in the new list, for these
    count: Callable[[AbstractSet[bytes]], dict[bytes, int]] = lambda ds: {}
    bare: bytes | None = None
    image: mmap.mmap | None = None        # the full path's cdb, made from ``keys``
    same: bool | None = None              # ... and whether the live file holds it already
    whole: bool = False                   # a whole list (the full path), not a delta


@dataclass(frozen=True)
class Intent:
    """What the gate is told besides the lists: the local parts onchange lines named per
    domain (their removal is intended), the domains an admin accepts as they are now
    (``qmail-updater accept``), the domains whose source failed (held, why), and the
    domains the control files still configure (locals, virtualdomains)."""
    named: dict[bytes, frozenset[bytes]] = field(default_factory=dict)
    accepted: frozenset[bytes] = frozenset()
    failed: dict[bytes, str] = field(default_factory=dict)
    configured: frozenset[bytes] = frozenset()
    now: float = 0.0
    kept: frozenset[str] = frozenset()     # held before and not built again: still held


NO_INTENT = Intent()


@dataclass
class Verdict:
    refused: str | None                   # the whole list refused (an empty list)
    doubts: dict[bytes, str]              # domains that keep their live entries
    peaks: dict[str, Peak]                # the record's peaks after this list


def counts_of(keys: Iterable[bytes], rejects: AbstractSet[bytes], bare: bytes | None,
              is_user: Callable[[bytes], bool] | None = None
              ) -> Callable[[AbstractSet[bytes]], dict[bytes, int]]:
    """``Candidate.count`` over a whole list: one pass, only when asked."""
    def count(domains: AbstractSet[bytes]) -> dict[bytes, int]:
        out = dict.fromkeys(domains, 0)
        for k in keys:
            d = part_of(k, bare)
            if d in out and k not in rejects and not (is_user is not None and is_user(k)):
                out[d] += 1
        return out
    return count


def domain_changes(c: Candidate, lost_keys: list[bytes], live_sources: dict[str, Any],
                   configured: frozenset[bytes]) -> dict[bytes, DomainChange]:
    """Each changed domain's side of ``c``: what it accepted, accepts, and lost."""
    def dom(k: bytes) -> bytes:
        return part_of(k, c.bare)
    # only a domain that lost keys (or whose keys now refuse) can have lost an address:
    # one that only gained costs nothing here (a whole list's counts are one pass)
    touched = {dom(k) for k in (*c.removed, *c.changes.changed)}
    touched |= {dom(k) for k in c.added if k in c.rejects}
    if not touched:
        return {}
    new = c.count(touched)
    old = dict(new)
    for k in c.added:
        if k not in c.rejects and (d := dom(k)) in old:
            old[d] -= 1
    for k in c.removed:
        if c.old is None or (c.old(k) or b"")[:1] != REJECT:
            old[dom(k)] += 1
    for k in c.changes.changed:
        old[dom(k)] += 1 if k in c.rejects else -1
    out = {d: DomainChange(max(old[d], 0), new[d], [], d in c.domains, d in configured)
           for d in touched}
    for k in lost_keys:
        out[dom(k)].lost.append(k)
    for k in c.removed:
        out[dom(k)].removed.append(k)
    for d, change in out.items():
        name = d.decode(ENCODING, ERRORS)
        change.sources_old = live_sources.get(name)
        change.sources_new = (c.sources or {}).get(name)
    return out


def judge(c: Candidate, record: LiveRecord, max_shrink: float, force: bool,
          intent: Intent = NO_INTENT) -> Verdict:
    """The gate's questions for ``c``, per domain, for both install paths: an empty list
    is refused whole; each changed domain is judged on its own (``gate.judge_domain``)."""
    peaks = dict(record.peaks)
    if not force and len(c.keys) == 0:
        return Verdict("refusing to install an empty list (--force installs it anyway)",
                       {}, peaks)
    asked = c.removed + c.changes.changed + [k for k in c.added if k in c.rejects]
    lost_keys = lost(asked, c.old, c.new, c.under) if asked and c.old is not None else []
    doubts: dict[bytes, str] = {}
    for d, change in domain_changes(c, lost_keys, record.sources, intent.configured).items():
        name = d.decode(ENCODING, ERRORS)
        if force or d in intent.accepted:
            peaks.pop(name, None)
            continue
        why, peak = judge_domain(name, change, intent.named.get(d, frozenset()),
                                 record.peaks.get(name), intent.now, max_shrink)
        if peak is None:
            peaks.pop(name, None)
        else:
            peaks[name] = peak
        if why is not None:
            doubts[d] = why
    for accepted in intent.accepted:
        peaks.pop(accepted.decode(ENCODING, ERRORS), None)
    return Verdict(None, doubts, peaks)


def settle(make: Callable[[frozenset[bytes]], Candidate], record: LiveRecord,
           max_shrink: float, force: bool, intent: Intent, path: str
           ) -> tuple[Candidate, LiveRecord]:
    """The list to install and the record to keep with it: ``make(held)`` gives the
    candidate in which the ``held`` domains keep their live entries.  The domains whose
    source failed are held from the start; the domains the gate doubts are added and
    the candidate made again (held domains change nothing, so this ends).  Raises
    InstallRefused for a list refused whole."""
    doubts: dict[bytes, str] = {}
    peaks: dict[str, Peak] = {}
    while True:
        c = make(frozenset(intent.failed) | frozenset(doubts))
        v = judge(c, record, max_shrink, force, intent)
        if v.refused:
            raise InstallRefused(v.refused, path)
        fresh = {d: why for d, why in v.doubts.items() if d not in doubts}
        peaks.update(v.peaks)
        if not fresh:
            break
        doubts.update(fresh)
    held = {d: h for d, h in record.held.items() if d in intent.kept}
    for d, why in [*intent.failed.items(), *doubts.items()]:
        name = d.decode(ENCODING, ERRORS)
        was = record.held.get(name)
        failed = d in intent.failed
        held[name] = Held(why, was.since if was is not None and was.failed == failed
                          else intent.now, failed)
    if c.sources is None:
        sources = dict(record.sources)
    else:                           # a held domain keeps what its last good list had
        sources = {name: carried(record.sources.get(name), counts)
                   for name, counts in c.sources.items() if name not in held}
        # a served domain no source was read for this time (a catch-all) keeps its counts
        sources.update((name, counts) for name, counts in record.sources.items()
                       if name not in sources and name.encode(ENCODING, ERRORS) in c.domains)
        sources.update((name, record.sources[name]) for name in held
                       if name in record.sources)
    return c, LiveRecord(sources, peaks, held, catch_alls(c, record.catchall))


def catch_alls(c: Candidate, before: list[str]) -> list[str]:
    """The domains whose ``@domain`` accepts (vpopmail 5.6's vadddomain makes each new
    domain one; status shows them): one lookup a domain for a whole list, and for a
    delta only the ``@domain`` keys it changed."""
    def accepts(d: bytes) -> bool:
        value = c.new(b"@" + d)
        return value is not None and value[:1] != REJECT
    if c.whole:
        return sorted(d.decode(ENCODING, ERRORS) for d in c.domains if accepts(d))
    out = set(before)
    for k in (*c.changes.added, *c.changes.removed, *c.changes.changed):
        if k[:1] == b"@":
            name = k[1:].decode(ENCODING, ERRORS)
            out.discard(name)
            if accepts(k[1:]):
                out.add(name)
    return sorted(out)
