"""When the daemon polls an LDAP / Active Directory server for changes (pure, the clock
passed in): a part of ``rules.Scheduler``'s rules, kept apart."""

from __future__ import annotations

from dataclasses import dataclass

from ..retry import backoff
from .events import DirectoryPolled, PollDirectory, Timing


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

    def answered(self, ev: DirectoryPolled, now: float) -> list[str]:
        """Schedules the next poll; the lines to log (a failure once, the recovery, each
        entry stamped in the future the first time it is seen: at most 10)."""
        poll = self.timing.directory_poll
        if ev.error is not None:
            self.failures += 1
            delay = backoff(self.failures, poll, max(poll, 300.0))
            self.due = now + delay
            if self.failures == 1:
                return [f"directory poll failed: {ev.error}; list kept; retry in {delay:g}s"]
            return []
        lines = [f"directory poll works again after {self.failures} failure(s)"] \
            if self.failures else []
        lines += [ev.note] if ev.note else []
        lines += [f"directory entry stamped in the future ({stamp}): {dn}; polls keep "
                  "asking from the last true stamp" for dn, stamp in sorted(ev.future.items())[:10]]
        self.failures, self.due = 0, now + poll
        if ev.full:
            self.full_due = now + self.timing.directory_full
        return lines
