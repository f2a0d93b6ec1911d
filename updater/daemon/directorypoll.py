"""The daemon's directory polls (LDAP / Active Directory): ask what changed since the
kept mark, in a thread of its own, and apply the answer to the kept entries in the main
thread (``applied``: the domains it changed)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..build.sources.ldap import LdapCache
from ..build.sources.ldapconn import Server
from ..config import Settings
from ..errors import UpdaterError
from .events import DirectoryPolled


@dataclass(frozen=True)
class Ask:
    """What one poll asks, taken from the kept directory in the daemon's own thread (the
    poll's thread never reads what that thread changes)."""
    full: bool                        # a full read
    mark: str = ""
    server: Server | None = None
    kept: frozenset[str] | None = None    # the identities kept, when it is a sweep too
    now: float = 0.0                  # (monotonic)


def ask(settings: Settings, kept: LdapCache | None, full: bool, now: float) -> Ask:
    """Every UPDATER_LDAP_SWEEP seconds a poll is a sweep too: it lists every entry's
    identity, so a deletion no tombstone reports is seen."""
    mark = kept.mark if kept is not None else ""
    if kept is None or full or not mark:            # no stamp seen: a full read
        return Ask(True, "", kept.server if kept else None, None, now)
    sweep = settings.ldap_sweep > 0 and now - kept.swept >= settings.ldap_sweep
    return Ask(False, mark, kept.server, frozenset(kept.entries) if sweep else None, now)


def poll(settings: Settings, q: Ask) -> DirectoryPolled:
    """The directory's answer as an event (a failure is one too: the list is kept)."""
    from ..build.sources import ldap
    was = q.server
    try:
        if q.full:
            fresh = ldap.read_all(settings, was.uri if was else "")
            return DirectoryPolled(frozenset(), None, True, fresh.entries, fresh.mark,
                                   dict(fresh.future), fresh.server, swept=q.now)
        updates, mark, count = ldap.poll(settings, q.mark, was,
                                         set(q.kept) if q.kept is not None else None)
        note = ""
        if count.complete and was is not None and count.server is not None:
            note = (f"directory polls answered by {count.server.dc} ({count.server.uri}), "
                    f"not {was.dc}: its change stamps are its own, so a full read")
        swept = q.now if q.kept is not None or count.complete else None
        return DirectoryPolled(frozenset(), None, count.complete, updates, mark,
                               dict(count.future), count.server, note, swept=swept)
    except UpdaterError as err:
        return DirectoryPolled(frozenset(), str(err), q.full)
    except Exception as err:            # a bug: logged, the daemon goes on
        return DirectoryPolled(frozenset(), f"internal error: {type(err).__name__}: {err}",
                               q.full)


def applied(kept: LdapCache | None, event: DirectoryPolled) -> DirectoryPolled:
    """A poll's answer applied to the kept directory (the domains it changed)."""
    from ..build.sources.ldap import apply
    if kept is not None:            # while the polls fail, a build may not serve from it
        kept.failing = event.error
    if event.updates is None or kept is None:
        return event
    changed = apply(kept, event.updates, event.mark, whole=event.full)
    if event.server is not None:
        kept.server = event.server
    if event.swept is not None:
        kept.swept = event.swept
    fresh = {dn: s for dn, s in event.future.items() if kept.future.get(dn) != s}
    kept.future.update(fresh)                     # each logged once
    return dataclasses.replace(event, domains=frozenset(changed), updates=None,
                               future=fresh)
