"""When the daemon polls an LDAP / Active Directory server for changes (pure, the clock
passed in): a part of ``schedule.Scheduler``'s rules, kept apart."""

from __future__ import annotations

from dataclasses import dataclass

from .buildevents import DirectoryPolled, PollDirectory, Timing
from .retry import backoff


@dataclass
class PollClock:
    """When to poll the directory (pure): every ``directory_poll`` seconds once a full
    build has read it, a full read every ``directory_full``; a failed poll is retried
    with backoff (up to 300 s) and logged when it starts and when it ends."""
    timing: Timing
    due: float | None = None
    full_due: float | None = None
    failures: int = 0

    def started(self, now: float) -> None:
        """A full build read the directory."""
        if self.timing.directory_poll > 0:
            self.due = now + self.timing.directory_poll
            self.full_due = now + self.timing.directory_full

    def take(self, now: float) -> PollDirectory | None:
        if self.due is None or self.due > now:
            return None
        self.due = None
        return PollDirectory(self.full_due is not None and self.full_due <= now)

    def answered(self, ev: DirectoryPolled, now: float) -> str | None:
        """Schedules the next poll; a line to log, if any."""
        poll = self.timing.directory_poll
        if ev.error is not None:
            self.failures += 1
            delay = backoff(self.failures, poll, max(poll, 300.0))
            self.due = now + delay
            if self.failures == 1:
                return f"directory poll failed: {ev.error}; list kept; retry in {delay:g}s"
            return None
        line = f"directory poll works again after {self.failures} failure(s)" \
            if self.failures else None
        self.failures, self.due = 0, now + poll
        if ev.full:
            self.full_due = now + self.timing.directory_full
        return line
