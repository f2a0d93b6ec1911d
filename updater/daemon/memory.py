"""What the daemon keeps between builds, and the builds that change it: the snapshot an
incremental build starts from (the MySQL and LDAP caches are in it), the record of what
the last full build read (what the watches follow), and the room a build needs after
one failed for want of disk space.  One owner: only the driver's thread touches it; a
directory poll's thread gets what it asks taken here (``ask``)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Mapping
from errno import ENOSPC

from ..build.generate import generate
from ..build.inputs import Inputs
from ..build.qmail import ENCODING, ERRORS
from ..config import Settings
from ..errors import InstallError, UpdaterError
from ..ident import identity
from ..install.installer import LiveChanged, install_result, no_room
from ..install.liverecord import sources_path
from ..install.outcome import InstallReport
from ..install.verdict import Intent
from . import incremental
from .directorypoll import Ask, applied, ask
from .events import Build, BuildOutcome, DirectoryPolled, FileChanged, LiveFiles
from .incremental import Snapshot


def live_files(cdb: str) -> LiveFiles:
    """The live cdb's and its .sources file's identities, as they are now."""
    return identity(cdb), identity(sources_path(cdb))


def intent_of(named: Mapping[str, frozenset[str]]) -> Intent:
    """What a build's gate is told: the local parts onchange lines named, per domain."""
    return Intent(named={d.encode(ENCODING, ERRORS): frozenset(
        a.rpartition("@")[0].encode(ENCODING, ERRORS) for a in names)
        for d, names in named.items()})


class Memory:
    def __init__(self, settings: Settings):
        self.s = settings
        self.snapshot: Snapshot | None = None   # what an incremental build starts from
        self.record: Inputs | None = None       # what the last full build read
        self.needs = 0                          # bytes a build needs after ENOSPC

    # ---- what the driver asks of it
    def resolve(self, event: FileChanged) -> FileChanged:
        """The domains a watched file's change concerns, from the last build's record
        (none: a full build)."""
        snap = self.snapshot
        if not self.s.incremental or snap is None:
            return event
        path = os.path.abspath(event.path)
        if path in snap.globals:
            return event
        return dataclasses.replace(event, domains=frozenset(snap.inputs.domains_of(path)))

    def files_changed(self, domains: frozenset[str]) -> bool:
        snap = self.snapshot
        return snap is None or bool(domains & snap.inputs.changed())

    def moved(self) -> frozenset[str]:
        """The domains whose files changed since the last full build read them."""
        return frozenset(self.record.changed()) if self.record is not None else frozenset()

    def ask(self, full: bool, now: float) -> Ask | None:
        """What a directory poll asks, or None: nothing kept to poll against (a full
        build is failing)."""
        snap = self.snapshot
        if snap is None or snap.ldap is None:
            return None
        return ask(self.s, snap.ldap, full, now)

    def applied(self, event: DirectoryPolled) -> DirectoryPolled:
        snap = self.snapshot
        return applied(snap.ldap if snap is not None else None, event)

    # ---- builds
    def build(self, action: Build, stop: threading.Event) -> BuildOutcome:
        """Run the build ``action`` asks for; never raises: a source error or a bug is
        the outcome's error, and the daemon keeps running."""
        wall, started = time.time(), time.monotonic()
        lines: list[str] = []
        cdb = self.s.cdb or ""
        try:
            full_disk = no_room(self.s.cdb, self.needs) if self.needs else None
            if full_disk:
                raise InstallError(full_disk, self.s.cdb, errno=ENOSPC)
            report, redone = self.run(action, stop, lines)
        except _Refused as why:
            return BuildOutcome(started, time.monotonic(), wall, lines=tuple(lines),
                                refused=str(why))
        except Exception as err:
            text = str(err) if isinstance(err, UpdaterError) else \
                f"internal error: {type(err).__name__}: {err}"
            space = getattr(err, "errno", None) == ENOSPC
            size = identity(cdb)
            self.needs = (self.needs or (size[2] if size else 0) * 2 or 1) if space else 0
            return BuildOutcome(started, time.monotonic(), wall,
                                error=text.strip() or type(err).__name__,
                                lines=tuple(lines), space=space, live=live_files(cdb))
        self.needs = 0
        return BuildOutcome(started, time.monotonic(), wall, report, None, redone,
                            tuple(lines), live=live_files(cdb))

    def run(self, action: Build, stop: threading.Event,
            lines: list[str]) -> tuple[InstallReport, frozenset[str] | None]:
        """Incremental when the action names domains and there is a snapshot to start
        from (else full); (report, domains redone or None).  A failed full build keeps
        the snapshot: incremental builds go on from it."""
        intent = intent_of(action.named)
        if action.domains is not None and self.snapshot is not None:
            try:
                report, snap, warnings, redone = incremental.build(
                    self.s, self.snapshot, set(action.domains), stop, self.s.force,
                    dict(action.rows), intent)
            except (incremental.NeedFull, LiveChanged) as why:
                raise _Refused(str(why)) from None
            lines[:0] = [f"warning: {w}" for w in warnings]
            self.snapshot = snap
            return report, frozenset(redone)
        if not self.s.incremental:
            record = Inputs()
            result = generate(self.s, tracer=record, partial=True)
            self.record = record
            lines[:0] = [f"warning: {w}" for w in result.warnings]
            return install_result(result, self.s.cdb or "", self.s, self.s.force,
                                  stop=stop, intent=intent), None
        report, full_snap, warnings = incremental.full(self.s, stop, self.s.force, intent)
        lines[:0] = [f"warning: {w}" for w in warnings]
        if full_snap.ldap is not None and not full_snap.ldap.complete and \
                self.snapshot is not None and self.snapshot.ldap is not None:
            full_snap.ldap = self.snapshot.ldap   # the directory failed: keep what it gave,
            full_snap.ldap.failing = next(        # but serve nothing from it until a poll
                (h.reason for h in report.held.values() if h.failed), "the directory failed")
        self.snapshot, self.record = full_snap, full_snap.inputs
        return report, None


class _Refused(Exception):
    """An incremental build cannot be done (the rules follow it with a full one)."""
