"""When the daemon builds: every timing rule, as a pure state machine (no I/O, no clock).

In the style of h11 and ``smtp.session``: the driver (``daemon``) turns what happens into
typed events — a request through the FIFO or a signal, an onchange line naming its
domains, a watched file's change, a finished build with its ``BuildOutcome``, a tick —
and hands each to ``Scheduler.handle`` with the time (``now``, monotonic seconds, and
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
  its source failed (``Report.held``: built alone, until it reads whole; each hold is
  logged when it starts and ends).  A safety-net full build runs ``interval`` after
  the last full one.
* The status file is rewritten after every build, every ``HEARTBEAT`` seconds, and
  when the pending count changes (at most once a second; at once when the floor starts
  or stops holding a build); the live cdb is looked at every ``LIVE_CHECK`` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .buildevents import (
    Action,
    Build,
    BuildDone,
    BuildOutcome,
    CheckFiles,
    CheckLive,
    DirectoryPolled,
    Event,
    Exit,
    FileChanged,
    FilesChecked,
    Log,
    Publish,
    Rewatch,
    StatusNews,
    Stop,
    Targeted,
    Tick,
    Timing,
    WriteStatus,
)
from .install import Report
from .limits import LIVE_CHECK, MAX_REASONS, SPACE_LOG, SPACE_RETRY, STATUS_EVERY
from .liverecord import hold_changes
from .pollclock import PollClock
from .retry import backoff
from .status import HEARTBEAT
from .window import Window
from .window import why as _why


@dataclass
class Scheduler:
    timing: Timing
    poll: PollClock = field(init=False)  # when to ask a directory (LDAP / AD) what changed
    full: Window = field(init=False)
    full_reasons: list[str] = field(default_factory=list)
    full_count: int = 0                # full-build requests since the last full build
    immediate: bool = False
    only_fifo: bool = True
    fast: Window = field(init=False)
    fast_domains: set[str] = field(default_factory=set)
    slow: Window = field(init=False)
    slow_domains: dict[str, tuple[float, bool]] = field(default_factory=dict)  # (when, settles)
    targeted_reasons: list[str] = field(default_factory=list)
    full_started: float | None = None    # the last full build's start (the FIFO floor's)
    last_full: float = 0.0               # the last full build's end (the safety net's)
    last_end: float | None = None        # the last incremental build's end
    last_seconds: float = 0.0            # and its duration
    failures: int = 0
    retry_at: float | None = None
    held_domains: dict[str, Any] = field(default_factory=dict)   # domain -> Held, as last built
    held_failures: int = 0
    space_failures: int = 0              # builds failed in a row for want of space
    held_retry_at: float | None = None   # when to build the failed-source domains again
    builds: int = 0
    incremental_builds: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    status_written: float = 0.0
    status_due: float | None = None
    live_due: float = 0.0
    why: str = ""                        # the reasons of the build in progress
    stopping: bool = False

    def __post_init__(self) -> None:
        t = self.timing
        self.poll = PollClock(t)
        self.full = Window(t.quiet, t.max_delay)
        self.fast = Window(t.fast_quiet, t.fast_max_delay)
        self.slow = Window(t.quiet, t.max_delay)

    # ---- the one entry point
    def handle(self, event: Event, now: float, wall: float) -> list[Action]:
        if isinstance(event, Tick):
            return self._tick(now, wall)
        if isinstance(event, BuildDone):
            return self._done(event.outcome, wall)
        if isinstance(event, FilesChecked):
            if event.changed:
                return [self._build_targeted(now)]
            self.settle(now, set(event.domains))
            return self._pending(now, wall, "")
        if isinstance(event, DirectoryPolled):
            out: list[Action] = [Log(line) for line in self.poll.answered(event, now)]
            if not event.domains:
                return out
            names = ", ".join(sorted(event.domains)[:3])
            self._target(now, f"directory changed: {names}", set(event.domains), True, False)
            return out + self._pending(now, wall, "directory")
        if isinstance(event, StatusNews):
            return [WriteStatus(dict(self.status))] if self.status else []
        if isinstance(event, Stop):
            self.stopping = True
            return [Exit()]
        if isinstance(event, Targeted):
            self._target(now, event.reason, set(event.domains), event.fast, False)
        elif isinstance(event, FileChanged) and event.domains:
            self._target(now, event.reason, set(event.domains), False, True)
        elif isinstance(event, FileChanged):
            self._add(now, event.reason, False, False)
        else:
            self._add(now, event.reason, event.immediate, event.fifo)
        return self._pending(now, wall, event.reason)

    def start(self) -> list[Action]:
        """The first build, at start."""
        self.full_count = 1
        return [self._build_full(["start"])]

    # ---- requests
    def _add(self, now: float, reason: str, immediate: bool, fifo: bool) -> None:
        self.full.note(now)
        self.full_count += 1
        self.immediate = self.immediate or immediate
        self.only_fifo = self.only_fifo and fifo
        if len(self.full_reasons) < MAX_REASONS:
            self.full_reasons.append(reason)

    def _target(self, now: float, reason: str, domains: set[str], fast: bool,
                settles: bool) -> None:
        if fast:
            self.fast.note(now)
            self.fast_domains |= domains
        else:
            self.slow.note(now)
            for d in domains:
                was = self.slow_domains.get(d)
                self.slow_domains[d] = (now, settles and (was is None or was[1]))
        if len(self.targeted_reasons) < MAX_REASONS:
            self.targeted_reasons.append(reason)

    @property
    def waiting(self) -> int:
        """Full-build requests and domains waiting for an incremental build."""
        return self.full_count + len(self.fast_domains | self.slow_domains.keys())

    # ---- deadlines
    def full_due(self) -> float | None:
        due = self.full.due()
        if due is None or self.full.first is None:
            return None
        if self.immediate:
            return self.full.first
        if self.only_fifo and self.full_started is not None:
            due = max(due, self.full_started + self.timing.floor)
        return due

    def targeted_due(self) -> float | None:
        dues = [d for d in (self.fast.due(), self._slow_due()) if d is not None]
        if not dues:
            return None
        due = min(dues)
        if self.last_end is not None:
            due = max(due, self.last_end + max(self.timing.fast_floor, self.last_seconds / 2))
        return due

    def _slow_due(self) -> float | None:
        return self.slow.due() if self.slow_domains else None

    def held(self) -> float | None:
        """The time the pending full build is held until by the FIFO floor (when that,
        not the quiet period, is what it waits for), else None."""
        quiet = self.full.due()
        if quiet is None or self.immediate or not self.only_fifo or \
                self.full_started is None:
            return None
        floor = self.full_started + self.timing.floor
        return floor if floor > quiet else None

    def safety_due(self) -> float | None:
        return self.last_full + self.timing.interval if self.timing.interval > 0 else None

    def next_deadline(self) -> float | None:
        """When to tick if no event comes first (None: nothing is due; wait for one)."""
        beat = self.status_written + HEARTBEAT if self.status else None
        dues = [d for d in (self.full_due(), self.targeted_due(), self.retry_at,
                            self.held_retry_at, self.status_due, self.live_due,
                            self.safety_due(), self.poll.due, beat)
                if d is not None]
        return min(dues) if dues else None

    # ---- what is due
    def _tick(self, now: float, wall: float) -> list[Action]:
        actions: list[Action] = []
        if self.status_due is not None and self.status_due <= now or \
                self.status and self.status_written + HEARTBEAT <= now:
            actions.append(self._write_status(now))
        if self.live_due <= now:
            self.live_due = now + LIVE_CHECK
            actions.append(CheckLive())
        poll = self.poll.take(now)
        if poll is not None:
            actions.append(poll)
        full, targeted = self.full_due(), self.targeted_due()
        if full is not None and full <= now:
            actions.append(self._build_full(self._take()))
        elif targeted is not None and targeted <= now:
            settling = self._settling(now)
            actions.append(CheckFiles(frozenset(settling)) if settling is not None
                           else self._build_targeted(now))
        elif self.retry_at is not None and self.retry_at <= now:
            actions.append(self._build_full([f"retry {self.failures}"]))
        elif self.held_retry_at is not None and self.held_retry_at <= now:
            self.held_retry_at = None
            failed = sorted(d for d, h in self.held_domains.items() if h.failed)
            self.why = _why([f"held domain retry {self.held_failures}: " + ", ".join(failed)])
            actions.append(Build(self.why, frozenset(failed)))
        elif (safety := self.safety_due()) is not None and safety <= now:
            actions.append(self._build_full(["safety net"]))
        return actions

    def _take(self) -> list[str]:
        reasons = self.full_reasons + self.targeted_reasons
        self.full.clear()
        self.full_reasons, self.immediate, self.only_fifo = [], False, True
        self._take_targeted(None)
        return reasons

    def _take_targeted(self, now: float | None) -> tuple[list[str], set[str]]:
        domains: set[str] = set()
        fast_due, slow_due = self.fast.due(), self._slow_due()
        if fast_due is not None and (now is None or fast_due <= now):
            domains |= self.fast_domains
            self.fast_domains = set()
            self.fast.clear()
        if slow_due is not None and (now is None or slow_due <= now):
            domains |= set(self.slow_domains)
            self.slow_domains = {}
            self.slow.clear()
        reasons, self.targeted_reasons = self.targeted_reasons, []
        return reasons, domains

    def _settling(self, now: float) -> set[str] | None:
        fast_due, slow_due = self.fast.due(), self._slow_due()
        if slow_due is None or slow_due > now or (fast_due is not None and fast_due <= now):
            return None
        if not all(settles for _, settles in self.slow_domains.values()):
            return None
        return set(self.slow_domains)

    def settle(self, started: float, redone: set[str]) -> None:
        """A build that started at ``started`` redid ``redone``: the watched-file
        requests for those domains made before it are answered."""
        for d in redone & self.slow_domains.keys():
            when, settles = self.slow_domains[d]
            if settles and when < started:
                del self.slow_domains[d]
        if not self.slow_domains:
            self.slow.clear()

    def _build_full(self, reasons: list[str]) -> Build:
        self.full_count = 0
        self.why = _why(reasons)
        return Build(self.why)

    def _build_targeted(self, now: float) -> Build:
        reasons, domains = self._take_targeted(now)
        self.why = _why(reasons)
        return Build(self.why, frozenset(domains))

    # ---- a build is done
    def _done(self, o: BuildOutcome, wall: float) -> list[Action]:
        self.builds += 1
        actions: list[Action] = []
        lines = list(o.lines)
        record: dict[str, Any] = {"time": o.wall, "reason": self.why, "builds": self.builds}
        if o.report is None:
            self.failures += 1
            delay = SPACE_RETRY if o.space else \
                backoff(self.failures, self.timing.retry_min, self.timing.retry_max)
            self.retry_at = o.ended + delay
            self.space_failures = self.space_failures + 1 if o.space else 0
            if self.space_failures <= 1 or self.space_failures % SPACE_LOG == 0:
                again = f" ({self.space_failures} times)" if self.space_failures > 1 else ""
                lines.append(f"build failed ({self.why}): {o.error}; live cdb kept; "
                             f"retry in {delay:g}s{again}")
            record.update(result="failed", error=o.error, last_error=o.error, added=0,
                          removed=0, failures=self.failures,
                          entries=self.status.get("entries"), held=self.status.get("held"))
        else:
            actions += self._succeeded(o, o.report, record, lines)
        if "last_success" not in record and "last_success" in self.status:
            record["last_success"] = self.status["last_success"]
        if o.redone is not None:
            self.last_end, self.last_seconds = o.ended, o.ended - o.started
            self.settle(o.started, set(o.redone))
        else:
            self.last_full, self.full_started = o.ended, o.started
            if o.report is not None:
                self.poll.started(o.ended)
        record.update(seconds=round(o.ended - o.started, 3), incremental=o.redone is not None,
                      incremental_builds=self.incremental_builds)
        self.status = record
        self._count_pending(o.ended, wall)
        actions.append(self._write_status(o.ended))
        actions += [Log(line) for line in lines]
        if o.redone is None:       # an incremental build changes no directory to watch
            actions.append(Rewatch())
        return actions

    def _succeeded(self, o: BuildOutcome, report: Report, record: dict[str, Any],
                   lines: list[str]) -> list[Action]:
        if self.space_failures:
            lines.append(f"there is room again after {self.space_failures} failed build(s)")
        self.failures, self.retry_at, self.space_failures = 0, None, 0
        scope = ""
        if o.redone is not None:
            self.incremental_builds += 1
            names = ", ".join(sorted(o.redone)[:3]) + (", ..." if len(o.redone) > 3 else "")
            plural = "s" if len(o.redone) != 1 else ""
            scope = f" [incremental: {len(o.redone)} domain{plural}" \
                f"{': ' + names if names else ''}]"
            record["phases"] = {k: round(v, 4) for k, v in report.phases.items()}
        lines.append(f"build ({self.why}): {report.line()}{scope}")
        lines += self._holds(o, report)
        record["held"] = {d: {"reason": h.reason, "since": h.since, "failed": h.failed}
                          for d, h in sorted(self.held_domains.items())}
        changes = report.changes_line()
        if changes:
            lines.append(changes)
        record.update(result=report.status, entries=report.entries, added=len(report.added),
                      removed=len(report.removed), error=None, failures=0,
                      last_success=o.wall)
        # every install goes out; so does the first list (a receiver may be stale)
        return [Publish()] if report.status == "installed" or self.builds == 1 else []

    def _holds(self, o: BuildOutcome, report: Report) -> list[str]:
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
        held = self.held()
        self.status["pending"] = self.waiting
        self.status["held_until"] = None if held is None else round(wall + held - now, 3)

    def _pending(self, now: float, wall: float, reason: str) -> list[Action]:
        """A request arrived: the status counts it (one write a second at most), and a
        build held by the FIFO floor is logged once with the time it is held until."""
        if not self.status:
            return []
        was_held = self.status.get("held_until") is not None
        self._count_pending(now, wall)
        until = self.status["held_until"]
        actions: list[Action] = []
        if until is not None and not was_held:
            clock = time.strftime("%H:%M:%S", time.localtime(until))
            actions.append(Log(f"held until {clock} (min-interval "
                               f"{self.timing.floor:g}s): {reason}"))
        changed = (until is None) == was_held
        self.status_due = now if changed else max(now, self.status_written + STATUS_EVERY)
        if self.status_due <= now:
            actions.append(self._write_status(now))
        return actions

    def _write_status(self, now: float) -> WriteStatus:
        self.status_written, self.status_due = now, None
        return WriteStatus(dict(self.status))
