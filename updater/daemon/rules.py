"""When the daemon builds, and every other decision it makes: a pure state machine (no
I/O, no clock).

In the style of h11 and ``smtp.session``: the driver (``driver``) turns what happens
into typed events — a read of the FIFO, a signal, a watched file's change, a finished
build with its ``BuildOutcome``, the answer to a look at the files, a tick — and hands
each to ``Scheduler.handle`` with the time (``now``, monotonic seconds, and
``wall``, the epoch seconds the status file shows).  What comes back is a list of
actions (build, check files, check the live cdb, write the status, log, publish,
re-watch, exit), and ``next_deadline()`` says when to tick next if nothing happens.

The rules:

* A full build is due once no request came for ``quiet`` seconds, or ``max_delay``
  after the first pending one, whichever is first; an immediate request (a signal, a
  deleted live cdb) makes it due at once.  When every pending request came through the
  FIFO (which others may write), it also waits until ``floor`` seconds after the
  previous full build started: a stream of triggers costs one full build per ``floor``
  (incremental builds do not move it: a stream of them must not starve it).
* A *targeted* request names domains.  A fast one (an addition) is due ``fast_quiet``
  after the last fast request, at most ``fast_max_delay`` after the first; a slow one
  (a removal, which vpopmail may report before making it, or a watched file's change)
  waits ``quiet`` / ``max_delay``.  After an incremental build the next waits
  ``fast_floor`` seconds, or half that build's duration if longer, from its end: the
  daemon is busy at most two thirds of the time.  A pending full build includes every
  targeted request.
* A watched file's request is settled by any build that starts after it and redoes
  its domain; when only such requests are due, the driver is asked whether the files
  still are what the list was built from (``CheckFiles``) and a build is skipped if so.
* A failed build is retried after ``backoff`` (``retry_min`` doubling to ``retry_max``),
  after ``SPACE_RETRY`` seconds when it lacked disk space; so is a domain held because
  its source failed (``InstallReport.held``: built alone, until it reads whole; each hold is
  logged when it starts and ends).  A safety-net full build runs ``interval`` after
  the last full one.
* A FIFO read's lines become requests (``onchange.fifo_requests``); an onchange line's
  addresses are what a database source reads again and what the gate takes as a named
  removal (``Pending.note_rows``).  An incremental build that cannot be done (no
  snapshot fits, the live cdb changed under it) is followed at once by a full one.
* The live cdb or its .sources file found other than the last build left them (deleted,
  replaced by hand) is an immediate full-build request that says why.
* The status file is rewritten after every build, every ``HEARTBEAT`` seconds, and
  when the pending count changes (at most once a second; at once when the floor starts
  or stops holding a build); a failure to write it is logged once, and so is its end;
  the live cdb is looked at every ``LIVE_CHECK`` seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, assert_never

from ..install.liverecord import Held, hold_changes
from ..install.outcome import InstallReport
from ..limits import HEARTBEAT, LIVE_CHECK, SPACE_LOG, SPACE_RETRY, STATUS_EVERY
from ..retry import backoff
from .events import (
    Action,
    Build,
    BuildDone,
    BuildOutcome,
    CheckFiles,
    CheckLive,
    DirectoryPolled,
    Event,
    Exit,
    FifoRead,
    FileChanged,
    FilesChecked,
    HeldUntil,
    LiveFiles,
    LiveSeen,
    Log,
    Publish,
    Requested,
    Rewatch,
    Rewatched,
    StatusNews,
    StatusRecord,
    StatusWritten,
    Stop,
    Targeted,
    Tick,
    Timing,
    WriteStatus,
)
from .onchange import fifo_requests
from .pending import Pending, Rows
from .pollclock import PollClock
from .window import why as _why


@dataclass
class Scheduler:
    timing: Timing
    poll: PollClock = field(init=False)  # when to ask a directory (LDAP / AD) what changed
    pending: Pending = field(init=False)  # what waits to be built
    full_started: float | None = None    # the last full build's start (the FIFO floor's)
    last_full: float = 0.0               # the last full build's end (the safety net's)
    last_end: float | None = None        # the last incremental build's end
    last_seconds: float = 0.0            # and its duration
    failures: int = 0
    retry_at: float | None = None
    held_domains: dict[str, Held] = field(default_factory=dict)   # as last built
    held_failures: int = 0
    space_failures: int = 0              # builds failed in a row for want of space
    held_retry_at: float | None = None   # when to build the failed-source domains again
    builds: int = 0
    incremental_builds: int = 0
    status: StatusRecord | None = None
    status_written: float = 0.0
    status_due: float | None = None
    status_failing: bool = False         # the last write of the status file failed
    live_due: float = 0.0
    live: LiveFiles | None = None        # what the last build left as the live files
    why: str = ""                        # the reasons of the build in progress
    rows: Rows = field(default_factory=dict)   # ... and the rows it reads again
    stopping: bool = False

    def __post_init__(self) -> None:
        self.poll = PollClock(self.timing)
        self.pending = Pending(self.timing)

    # ---- the one entry point
    def handle(self, event: Event, now: float, wall: float) -> list[Action]:
        match event:
            case Tick():
                return self._tick(now, wall)
            case BuildDone(outcome):
                return self._done(outcome, wall)
            case Requested() | Targeted() | FileChanged():
                return self._request(event, now, wall)
            case FifoRead(data, dropped):
                return [a for r in fifo_requests(data, dropped, self.timing.incremental)
                        for a in self._request(r, now, wall)]
            case FilesChecked(domains, changed):
                if changed:
                    return [self._build_targeted(now)]
                self.pending.settle(now, set(domains))
                return self._pending(now, wall, "")
            case DirectoryPolled():
                return self._polled(event, now, wall)
            case LiveSeen(files):
                return self._live_seen(files, now, wall)
            case Rewatched(moved):
                return self._moved(moved, now, wall)
            case StatusWritten(error):
                return self._status_written(error)
            case StatusNews():
                return [WriteStatus(self.status)] if self.status is not None else []
            case Stop():
                self.stopping = True
                return [Exit()]
            case _:
                assert_never(event)

    def _request(self, event: Requested | Targeted | FileChanged, now: float,
                 wall: float) -> list[Action]:
        match event:
            case Targeted(reason, domains, fast, addresses):
                self.pending.note_rows(domains, addresses)
                self.pending.target(now, reason, set(domains), fast, False)
            case FileChanged(reason, _, domains) if domains:
                self.pending.target(now, reason, set(domains), False, True)
            case FileChanged(reason):
                self.pending.add(now, reason, False, False)
            case Requested(reason, immediate, fifo):
                self.pending.add(now, reason, immediate, fifo)
        return self._pending(now, wall, event.reason)

    def start(self) -> list[Action]:
        """The first build, at start."""
        self.pending.full_count = 1
        return [self._build_full(["start"])]

    def _polled(self, event: DirectoryPolled, now: float, wall: float) -> list[Action]:
        out: list[Action] = [Log(line) for line in self.poll.answered(event, now)]
        if not event.domains:
            return out
        names = ", ".join(sorted(event.domains)[:3])
        self.pending.target(now, f"directory changed: {names}", set(event.domains), True,
                            False)
        return out + self._pending(now, wall, "directory")

    def _live_seen(self, seen: LiveFiles, now: float, wall: float) -> list[Action]:
        """The live cdb (or its .sources file) is no longer what the last build left
        there: deleted or replaced by hand.  A full build, at once, says why."""
        if self.live is None or seen == self.live:
            return []
        same_cdb = seen[0] == self.live[0]
        what = ("the live cdb", "its .sources file")[same_cdb]
        how = "deleted" if seen[same_cdb] is None else "replaced"
        self.live = seen                         # asked once; a failed build retries
        return self._request(Requested(f"{what} was {how}", immediate=True), now, wall)

    def _moved(self, moved: frozenset[str], now: float, wall: float) -> list[Action]:
        """What changed while the full build read it is asked for at once."""
        if not moved:
            return []
        names = ", ".join(sorted(moved)[:3]) + (", ..." if len(moved) > 3 else "")
        return self._request(Targeted(f"changed since the build read it: {names}", moved,
                                      fast=False), now, wall)

    def _status_written(self, error: str | None) -> list[Action]:
        """One line when writing the status file starts failing, one when it works."""
        was, self.status_failing = self.status_failing, error is not None
        if error is not None and not was:
            return [Log(f"cannot write the status file: {error}")]
        if error is None and was:
            return [Log("the status file is written again")]
        return []

    @property
    def waiting(self) -> int:
        return self.pending.waiting

    # ---- deadlines
    def full_due(self) -> float | None:
        return self.pending.full_due(self.full_started)

    def targeted_due(self) -> float | None:
        after = None if self.last_end is None else \
            self.last_end + max(self.timing.fast_floor, self.last_seconds / 2)
        return self.pending.targeted_due(after)

    def held(self) -> float | None:
        return self.pending.held(self.full_started)

    def safety_due(self) -> float | None:
        return self.last_full + self.timing.interval if self.timing.interval > 0 else None

    def next_deadline(self) -> float | None:
        """When to tick if no event comes first (None: nothing is due; wait for one)."""
        beat = self.status_written + HEARTBEAT if self.status is not None else None
        dues = [d for d in (self.full_due(), self.targeted_due(), self.retry_at,
                            self.held_retry_at, self.status_due, self.live_due,
                            self.safety_due(), self.poll.due, beat)
                if d is not None]
        return min(dues) if dues else None

    # ---- what is due
    def _tick(self, now: float, wall: float) -> list[Action]:
        actions: list[Action] = []
        if self.status_due is not None and self.status_due <= now or \
                self.status is not None and self.status_written + HEARTBEAT <= now:
            actions.append(self._write_status(now))
        if self.live_due <= now:
            self.live_due = now + LIVE_CHECK
            actions.append(CheckLive())
        poll = self.poll.take(now)
        if poll is not None:
            actions.append(poll)
        full, targeted = self.full_due(), self.targeted_due()
        if full is not None and full <= now:
            actions.append(self._build_full(self.pending.take_full()))
        elif targeted is not None and targeted <= now:
            settling = self.pending.settling(now)
            actions.append(CheckFiles(frozenset(settling)) if settling is not None
                           else self._build_targeted(now))
        elif self.retry_at is not None and self.retry_at <= now:
            actions.append(self._build_full([f"retry {self.failures}"]))
        elif self.held_retry_at is not None and self.held_retry_at <= now:
            self.held_retry_at = None
            failed = sorted(d for d, h in self.held_domains.items() if h.failed)
            actions.append(self._build(
                [f"held domain retry {self.held_failures}: " + ", ".join(failed)],
                frozenset(failed)))
        elif (safety := self.safety_due()) is not None and safety <= now:
            actions.append(self._build_full(["safety net"]))
        return actions

    def _build_full(self, reasons: list[str]) -> Build:
        self.pending.full_count = 0
        return self._build(reasons, None)

    def _build_targeted(self, now: float) -> Build:
        reasons, domains = self.pending.take_targeted(now)
        return self._build(reasons, frozenset(domains))

    def _build(self, reasons: list[str], domains: frozenset[str] | None) -> Build:
        self.why = _why(reasons)
        self.rows = self.pending.take_rows(domains)
        return Build(self.why, domains, dict(self.rows), self.pending.intended())

    # ---- a build is done
    def _done(self, o: BuildOutcome, wall: float) -> list[Action]:
        if o.refused is not None:        # no incremental build: a full one, at once
            self.pending.built(None, self.rows, ok=False)
            self.rows = self.pending.take_rows(None)
            out: list[Action] = [Log(line) for line in o.lines]
            out.append(Log(f"incremental build not possible ({o.refused}): full build"))
            return out + [Build(self.why, None, {}, self.pending.intended())]
        self.builds += 1
        self.pending.built(o.redone, self.rows, ok=o.report is not None)
        self.rows = {}
        if o.live is not None:
            self.live = o.live
        lines = list(o.lines)
        actions: list[Action] = []
        if o.report is None:
            record = self._failed(o, lines)
        else:
            record, actions = self._succeeded(o, o.report, lines)
        if o.redone is not None:
            self.last_end, self.last_seconds = o.ended, o.ended - o.started
            self.pending.settle(o.started, set(o.redone))
        else:
            self.last_full, self.full_started = o.ended, o.started
            if o.report is not None:
                self.poll.started(o.ended)
        self.status = StatusRecord(
            time=o.wall, reason=self.why, builds=self.builds,
            seconds=round(o.ended - o.started, 3), incremental=o.redone is not None,
            incremental_builds=self.incremental_builds, **record)
        self._count_pending(o.ended, wall)
        actions.append(self._write_status(o.ended))
        actions += [Log(line) for line in lines]
        if o.redone is None:       # an incremental build changes no directory to watch
            actions.append(Rewatch(fresh=o.report is not None))
        return actions

    def _failed(self, o: BuildOutcome, lines: list[str]) -> dict[str, Any]:
        self.failures += 1
        delay = SPACE_RETRY if o.space else \
            backoff(self.failures, self.timing.retry_min, self.timing.retry_max)
        self.retry_at = o.ended + delay
        self.space_failures = self.space_failures + 1 if o.space else 0
        if self.space_failures <= 1 or self.space_failures % SPACE_LOG == 0:
            again = f" ({self.space_failures} times)" if self.space_failures > 1 else ""
            lines.append(f"build failed ({self.why}): {o.error}; live cdb kept; "
                         f"retry in {delay:g}s{again}")
        last = self.status
        return {"result": "failed", "error": o.error, "last_error": o.error,
                "failures": self.failures,
                "entries": None if last is None else last.entries,
                "held": None if last is None else last.held,
                "last_success": None if last is None else last.last_success}

    def _succeeded(self, o: BuildOutcome, report: InstallReport,
                   lines: list[str]) -> tuple[dict[str, Any], list[Action]]:
        if self.space_failures:
            lines.append(f"there is room again after {self.space_failures} failed build(s)")
        self.failures, self.retry_at, self.space_failures = 0, None, 0
        scope, phases = "", None
        if o.redone is not None:
            self.incremental_builds += 1
            names = ", ".join(sorted(o.redone)[:3]) + (", ..." if len(o.redone) > 3 else "")
            plural = "s" if len(o.redone) != 1 else ""
            scope = f" [incremental: {len(o.redone)} domain{plural}" \
                f"{': ' + names if names else ''}]"
            phases = {k: round(v, 4) for k, v in report.phases.items()}
        lines.append(f"build ({self.why}): {report.line()}{scope}")
        lines += self._holds(o, report)
        changes = report.changes_line()
        if changes:
            lines.append(changes)
        record = {"result": report.status, "entries": report.entries,
                  "added": len(report.added), "removed": len(report.removed),
                  "held": dict(sorted(self.held_domains.items())), "phases": phases,
                  "last_success": o.wall}
        # every install goes out; so does the first list (a receiver may be stale)
        publish: list[Action] = [Publish()] if report.status == "installed" or \
            self.builds == 1 else []
        return record, publish

    def _holds(self, o: BuildOutcome, report: InstallReport) -> list[str]:
        """The held domains after this build: a line for each hold that starts or
        ends; the failed-source ones are built again after the backoff."""
        now = dict(report.held)
        lines, self.held_domains = hold_changes(self.held_domains, now), now
        if not any(h.failed for h in now.values()):
            self.held_failures, self.held_retry_at = 0, None
        elif self.held_retry_at is None:     # (other builds meanwhile never push it back)
            self.held_failures += 1
            self.held_retry_at = o.ended + backoff(self.held_failures, self.timing.retry_min,
                                                   self.timing.retry_max)
        return lines

    # ---- the status file
    def _count_pending(self, now: float, wall: float) -> None:
        assert self.status is not None
        held = self.held()
        self.status = dataclasses.replace(
            self.status, pending=self.waiting,
            held_until=None if held is None else round(wall + held - now, 3))

    def _pending(self, now: float, wall: float, reason: str) -> list[Action]:
        """A request arrived: the status counts it (one write a second at most), and a
        build held by the FIFO floor is logged once with the time it is held until."""
        if self.status is None:
            return []
        was_held = self.status.held_until is not None
        self._count_pending(now, wall)
        until = self.status.held_until
        actions: list[Action] = []
        if until is not None and not was_held:
            actions.append(HeldUntil(until, self.timing.floor, reason))
        changed = (until is None) == was_held
        self.status_due = now if changed else max(now, self.status_written + STATUS_EVERY)
        if self.status_due <= now:
            actions.append(self._write_status(now))
        return actions

    def _write_status(self, now: float) -> WriteStatus:
        assert self.status is not None
        self.status_written, self.status_due = now, None
        return WriteStatus(self.status)
