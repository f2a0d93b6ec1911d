"""``qmail-updater run``: rebuild validrcptto.cdb when something changes.

Events come from the trigger FIFO (a reader thread), from file watches (``watch``),
from signals (SIGHUP / SIGALRM: build now) and from the publish workers; they go into
one queue as ``buildevents``.  The main thread hands each to the pure ``Scheduler``
(every timing rule: debounce, floors, retries, the safety net, the status file's pace)
and carries out its actions, running the builds, full or incremental
(``incremental``), itself: a build is never interrupted, SIGTERM / SIGINT let the build
in progress finish, then exit 0.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from errno import ENOSPC
from types import FrameType
from typing import Any

from . import incremental
from . import status as status_file
from .buildevents import (
    Action,
    Build,
    BuildDone,
    BuildOutcome,
    CheckFiles,
    CheckLive,
    DirectoryPolled,
    Event,
    FileChanged,
    FilesChecked,
    Log,
    PollDirectory,
    Publish,
    Requested,
    Rewatch,
    StatusNews,
    Stop,
    Targeted,
    Tick,
    Timing,
    WriteStatus,
)
from .config import Settings
from .directorypoll import Ask, applied, ask, poll
from .errors import InstallError, UpdaterError
from .fifo import Reader
from .generate import generate
from .ident import Ident, identity
from .incremental import Snapshot
from .inputs import Inputs
from .install import LiveChanged, Report, install_result, no_room
from .limits import DAEMON_IDLE, MAX_FIFO_LINES, MAX_ROWS
from .liverecord import sources_path
from .onchange import onchange_target
from .publish import Publisher
from .qmail import ENCODING, ERRORS
from .schedule import Scheduler
from .sources.mysql import Rows
from .targets import parse_targets
from .textsafe import printable
from .verdict import Intent
from .watch import Watcher


class Daemon:
    """The driver: threads (the FIFO reader, the file watcher, the publish workers) and
    signal handlers put typed events on one queue; the main thread hands each to the
    ``Scheduler`` and carries out the actions it returns, builds included."""

    def __init__(self, settings: Settings, log: Callable[[str], None]):
        self.s = settings
        self.log = log
        # SimpleQueue.put is reentrant: the signal handlers may call it at any moment
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.scheduler = Scheduler(Timing.of(settings))
        self.snapshot: Snapshot | None = None   # what an incremental build starts from
        self.record: Inputs | None = None       # what the last full build read
        self.fresh = False                      # ... made by the build just done
        self.rows: Rows = {}                    # per domain, the addresses requests named
        # ... and for the gate: whose removal is intended (None: too many to name)
        self.named: dict[str, frozenset[str] | None] = {}
        self.needs = 0                          # bytes a build needs after ENOSPC
        self.status_failing = False
        self.stop_event = threading.Event()
        self.publisher: Publisher | None = None
        cdb = settings.cdb or ""
        # what the last build left as the live cdb and its .sources file: anything else
        # there later (an admin's rm, a file copied over it) is put right by a full build
        self.live: tuple[Ident | None, Ident | None] | None = None
        if settings.publish:
            self.publisher = Publisher(settings, cdb, log,
                                       lambda: self.events.put(StatusNews()),
                                       parse_targets(settings.publish))
        ignore = {os.path.abspath(p) for p in (
            cdb, cdb + ".lock", cdb + ".daemon", settings.status, settings.fifo,
            settings.prom_file) if p}
        self.watcher = Watcher(settings, log, lambda kind, path: self.events.put(
            FileChanged(f"{kind} {path}", path)), ignore)

    # ---- the FIFO
    def fifo_events(self, data: bytes, dropped: int = 0) -> None:
        """One read of the FIFO: an onchange line naming its domain is a targeted
        request; the other lines make one request for a full build.  A line never
        goes silently: what a burst pushed out of the read (``dropped`` bytes, or the
        lines past MAX_FIFO_LINES) becomes a full build request, which the FIFO floor
        paces like any other."""
        lines = data.split(b"\n")
        if dropped:
            lines = lines[1:]                   # the first one lost its beginning
        others = []
        for raw in lines[:MAX_FIFO_LINES]:
            line = raw.strip()
            if not line:
                continue
            target = onchange_target(line[:300].decode("ascii", "replace")) \
                if self.s.incremental else None
            if target is not None:
                self.events.put(Targeted("fifo: " + printable(line[:200]), *target))
            else:
                others.append(line)
        if dropped or len(lines) > MAX_FIFO_LINES:
            others.insert(0, b"a burst of lines, some not read (%d bytes)" % (
                dropped + sum(len(x) + 1 for x in lines[MAX_FIFO_LINES:])))
        if others or not data.strip():
            text = printable(b"; ".join(others)[:200])
            self.events.put(Requested("fifo: " + (text or "(empty)"), fifo=True))

    def fifo_thread(self, reader: Reader) -> None:
        import select
        while not self.scheduler.stopping:
            if reader.fd < 0:                   # reported by the reader; retried there
                time.sleep(1.0)
                reader.check()
                continue
            try:
                ready, _, _ = select.select([reader.fd], [], [], 1.0)
                if ready:
                    data, dropped = reader.read()
                    if data or dropped:
                        self.fifo_events(data, dropped)
                reader.check()
            except (OSError, ValueError) as err:
                self.log(f"trigger FIFO error: {err}; reopening")
                time.sleep(1)
                reader.open()

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

    # ---- builds
    def intent(self) -> Intent:
        """What the next build's gate is told: the addresses onchange lines named."""
        return Intent(named={d.encode(ENCODING, ERRORS): frozenset(
            a.rpartition("@")[0].encode(ENCODING, ERRORS) for a in names)
            for d, names in self.named.items() if names is not None})

    def run_build(self, domains: frozenset[str] | None,
                  lines: list[str]) -> tuple[Report, frozenset[str] | None]:
        """The build itself: incremental when ``domains`` is given and there is a
        snapshot to start from, else full.  Returns (report, domains redone or None).
        A failed full build keeps the snapshot: incremental builds go on from it."""
        if domains is not None and self.snapshot is not None:
            rows = {d: self.rows.pop(d) for d in domains if d in self.rows}
            try:
                report, snap, warnings, redone = incremental.build(
                    self.s, self.snapshot, set(domains), self.stop_event, self.s.force, rows,
                    self.intent())
            except (incremental.NeedFull, LiveChanged) as why:
                lines.append(f"incremental build not possible ({why}): full build")
                for d, kept in rows.items():      # asked again by the full build below
                    self.rows.setdefault(d, kept)
            else:
                lines[:0] = [f"warning: {w}" for w in warnings]
                self.snapshot = snap
                for d in redone:
                    self.named.pop(d, None)
                return report, frozenset(redone)
        if not self.s.incremental:
            record = Inputs()
            result = generate(self.s, tracer=record, partial=True)
            self.record, self.fresh = record, True
            lines[:0] = [f"warning: {w}" for w in result.warnings]
            report = install_result(result, self.s.cdb or "", self.s, self.s.force,
                                    stop=self.stop_event, intent=self.intent())
            self.named.clear()
            return report, None
        report, full_snap, warnings = incremental.full(self.s, self.stop_event, self.s.force,
                                                       self.intent())
        lines[:0] = [f"warning: {w}" for w in warnings]
        if full_snap.ldap is not None and not full_snap.ldap.complete and \
                self.snapshot is not None and self.snapshot.ldap is not None:
            full_snap.ldap = self.snapshot.ldap   # the directory failed: keep what it gave,
            full_snap.ldap.failing = next(        # but serve nothing from it until a poll
                (h.reason for h in report.held.values() if h.failed), "the directory failed")
        self.snapshot, self.record, self.fresh = full_snap, full_snap.inputs, True
        self.rows.clear()                       # a full build read everything again
        self.named.clear()
        return report, None

    def build(self, domains: frozenset[str] | None) -> BuildOutcome:
        wall, started = time.time(), time.monotonic()
        lines: list[str] = []
        try:
            full_disk = no_room(self.s.cdb, self.needs) if self.needs else None
            if full_disk:
                raise InstallError(full_disk, self.s.cdb, errno=ENOSPC)
            report, redone = self.run_build(domains, lines)
        except Exception as err:            # a source error, or a bug: the daemon keeps running
            text = str(err) if isinstance(err, UpdaterError) else \
                f"internal error: {type(err).__name__}: {err}"
            space = getattr(err, "errno", None) == ENOSPC
            size = identity(self.s.cdb)
            self.needs = (self.needs or (size[2] if size else 0) * 2 or 1) if space else 0
            outcome = BuildOutcome(started, time.monotonic(), wall,
                                   error=text.strip() or type(err).__name__,
                                   lines=tuple(lines), space=space)
        else:
            self.needs = 0
            outcome = BuildOutcome(started, time.monotonic(), wall, report, None, redone,
                                   tuple(lines))
        self.live = self.live_files()
        return outcome

    # ---- the live files
    def live_files(self) -> tuple[Ident | None, Ident | None]:
        cdb = self.s.cdb or ""
        return identity(cdb), identity(sources_path(cdb))

    def check_live(self) -> None:
        """The live cdb (or its .sources file) is no longer what the last build left
        there: deleted or replaced by hand.  A full build, at once, says why."""
        if self.live is None:
            return
        seen = self.live_files()
        if seen == self.live:
            return
        what = ("the live cdb", "its .sources file")[seen[0] == self.live[0]]
        how = "deleted" if seen[seen[0] == self.live[0]] is None else "replaced"
        self.live = seen                         # asked once; a failed build retries
        self.events.put(Requested(f"{what} was {how}", immediate=True))

    # ---- carrying out the actions
    def write_status(self, record: dict[str, Any]) -> None:
        record["written"] = time.time()          # ``status`` knows a stale file by it
        if self.publisher is not None:
            record["publish"] = self.publisher.report()
        try:
            status_file.write(self.s.status or "", record, self.s.prom_file)
        except OSError as err:             # one line until it works again
            if not self.status_failing:
                self.log(f"cannot write the status file: {err}")
            self.status_failing = True
        else:
            if self.status_failing:
                self.log("the status file is written again")
            self.status_failing = False

    def feed(self, event: Event) -> None:
        """Hand one event to the scheduler and carry out what it says, answering the
        actions that need an answer (a build, a look at the files) with their events."""
        todo = [event]
        while todo and not self.scheduler.stopping:
            actions = self.scheduler.handle(todo.pop(0), time.monotonic(), time.time())
            for action in actions:
                answer = self.act(action)
                if answer is not None:
                    todo.append(answer)

    def act(self, action: Action) -> Event | None:
        if isinstance(action, Build):
            return BuildDone(self.build(action.domains))
        if isinstance(action, CheckFiles):
            snap = self.snapshot
            changed = snap is None or bool(action.domains & snap.inputs.changed())
            return FilesChecked(action.domains, changed)
        if isinstance(action, PollDirectory):
            snap = self.snapshot
            if snap is None or snap.ldap is None:     # nothing kept to poll against (a
                return DirectoryPolled(frozenset())   # full build is failing): skip it
            threading.Thread(target=self.poll_directory,
                             args=(ask(self.s, snap.ldap, action.full, time.monotonic()),),
                             daemon=True).start()
        elif isinstance(action, CheckLive):
            self.check_live()
            self.watcher.check()
        elif isinstance(action, WriteStatus):
            self.write_status(action.record)
        elif isinstance(action, Log):
            self.log(action.line)
        elif isinstance(action, Publish):
            if self.publisher is not None:
                self.publisher.installed()
        elif isinstance(action, Rewatch):
            self.rewatch()
        return None

    def rewatch(self) -> None:
        """Watch what the last full build read; what changed while it read (before the
        watches were in place) is asked for at once (only after the build that made the
        record: an older one has changed, or the build would not have been asked for)."""
        record = self.record
        self.watcher.start(record)
        if record is None or not self.fresh:
            return
        self.fresh = False
        moved = record.changed()
        if moved:
            names = ", ".join(sorted(moved)[:3]) + (", ..." if len(moved) > 3 else "")
            self.events.put(Targeted(f"changed since the build read it: {names}",
                                     frozenset(moved), fast=False))

    # ---- main loop
    def run(self) -> int:
        from .lock import take_lock
        cdb = self.s.cdb or ""
        try:                        # one daemon per tree: the second exits at once
            instance = take_lock(cdb + ".daemon", 0, what="qmail-updater run")
        except UpdaterError as err:
            raise UpdaterError(f"{err}: exiting") from None
        reader = Reader(self.s.fifo, self.s.fifo_mode, self.log, group=self.s.fifo_group)

        def stop(n: int, f: FrameType | None) -> None:
            self.stop_event.set()
            self.events.put(Stop())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        for sig in (signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, lambda n, f: self.events.put(
                Requested(f"signal {signal.Signals(n).name}", immediate=True)))
        threading.Thread(target=self.fifo_thread, args=(reader,), daemon=True).start()
        self.log(f"started: cdb {cdb}, trigger {self.s.fifo}, quiet {self.s.quiet:g}s, "
                 f"max delay {self.s.max_delay:g}s, safety net {self.s.interval:g}s")
        self.watcher.start()             # before the first build: no change slips between
        for action in self.scheduler.start():
            answer = self.act(action)
            if answer is not None:
                self.feed(answer)
        while not self.scheduler.stopping:
            self.step()
        self.watcher.stop()
        if self.publisher is not None:
            self.publisher.stop()
        reader.close()
        os.close(instance)
        self.log("stopped")
        return 0

    def poll_directory(self, q: Ask) -> None:
        """(A thread of its own: a slow directory never holds a build back; what it asks
        was taken in this one.)"""
        self.events.put(poll(self.s, q))

    def applied(self, event: DirectoryPolled) -> DirectoryPolled:
        snap = self.snapshot
        return applied(snap.ldap if snap is not None else None, event)

    def note_rows(self, event: Targeted) -> None:
        """What the next build of these domains must read again from a database: the
        addresses the request names, or (none named, or more than MAX_ROWS waiting: a
        FIFO writer's flood costs one read of the domain, not a query per line) the
        whole domain."""
        for d in event.domains:
            mine = {a for a in event.addresses if a.endswith("@" + d)}
            had = self.rows.get(d, frozenset())
            both = None if not mine or had is None else had | mine
            self.rows[d] = both if both is not None and len(both) <= MAX_ROWS else None
            if mine:                             # named for the gate, as many as bounded
                was = self.named.get(d, frozenset())
                named = None if was is None else was | mine
                self.named[d] = named if named is not None and len(named) <= MAX_ROWS \
                    else None

    def step(self) -> None:
        """Wait for the next event or deadline, and handle it."""
        deadline = self.scheduler.next_deadline()
        timeout = DAEMON_IDLE if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            event = self.events.get(timeout=min(timeout, DAEMON_IDLE))
        except queue.Empty:
            event = Tick()
        if isinstance(event, FileChanged):
            event = self.resolve(event)
        elif isinstance(event, Targeted):
            self.note_rows(event)
        elif isinstance(event, DirectoryPolled):
            event = self.applied(event)
        self.feed(event)
        if not isinstance(event, Tick) and deadline is not None and \
                deadline <= time.monotonic():
            self.feed(Tick())           # a stream of events never holds back what is due
