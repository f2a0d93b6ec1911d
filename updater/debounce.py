"""When to build: the debounce rules and what a request names (pure, no I/O).

A request for a full build and a *targeted* request (one that names the domains it
changes, for an incremental build) are debounced apart; ``onchange_target`` reads the
domain out of a vpopmail onchange line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Debouncer:
    """A full build is due once no request came for ``quiet`` seconds, or ``max_delay``
    seconds after the first pending request, whichever is first.  When every pending
    request came through the FIFO (which others may write), the build also waits until
    ``floor`` seconds after the previous build started: a steady stream of triggers
    costs at most one build per ``floor`` seconds, file changes keep their latency.

    A *targeted* request names domains (an onchange ``add_user joe@example.com``, a
    change in one domain's directory): an incremental build redoes just those.  A fast
    one (an addition) is due ``fast_quiet`` after the last fast request, at most
    ``fast_max_delay`` after the first; a slow one (a removal, which vpopmail may report
    before making it, or a watched file's change) waits ``quiet`` / ``max_delay`` like a
    full build.  After an incremental build, the next one waits ``fast_floor`` seconds,
    or half as long as that build took if longer, from its end: a burst coalesces into a
    build every second or so, which keeps the daemon busy at most two thirds of the
    time, while a lone addition is applied at once.  A slow request from a
    watched file is settled by any build that starts after it and redoes its domain (a
    later write makes a new event); a pending full build includes every targeted
    request."""
    quiet: float
    max_delay: float
    floor: float = 0.0
    first: float | None = None
    last: float | None = None
    reasons: list[str] = field(default_factory=list)
    now_please: bool = False
    only_fifo: bool = True
    count: int = 0                    # full-build requests since the last full build
    fast_quiet: float = 0.05
    fast_max_delay: float = 1.0
    fast_floor: float = 1.0
    fast: set[str] = field(default_factory=set)             # fast requests' domains
    f_first: float | None = None
    f_last: float | None = None
    slow: dict[str, tuple[float, bool]] = field(default_factory=dict)  # -> (when, settles)
    s_first: float | None = None
    t_reasons: list[str] = field(default_factory=list)

    def add(self, now: float, reason: str, immediate: bool = False, fifo: bool = False) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1
        self.now_please = self.now_please or immediate
        self.only_fifo = self.only_fifo and fifo
        if len(self.reasons) < 20:
            self.reasons.append(reason)

    def target(self, now: float, reason: str, domains: set[str], fast: bool,
               settles: bool = False) -> None:
        """A request that names the domains it changes (``settles``: from a watched
        file, so any build that starts later and redoes the domain answers it)."""
        if fast:
            if self.f_first is None:
                self.f_first = now
            self.f_last = now
            self.fast |= domains
        else:
            if self.s_first is None:
                self.s_first = now
            for d in domains:
                was = self.slow.get(d)
                self.slow[d] = (now, settles and (was is None or was[1]))
        if len(self.t_reasons) < 20:
            self.t_reasons.append(reason)

    @property
    def waiting(self) -> int:
        """What is pending now: the full-build requests and the domains waiting for an
        incremental build (what ``status`` shows)."""
        return self.count + len(self.fast | self.slow.keys())

    @property
    def pending(self) -> bool:
        return self.first is not None or self.f_first is not None or bool(self.slow)

    def due(self, last_build: float | None = None, last_end: float | None = None,
            last_seconds: float = 0.0) -> float | None:
        """The time the pending build is due, or None when nothing is pending
        (``last_build``: when the previous build started; ``last_end``: when the last
        incremental build ended, ``last_seconds``: how long it took)."""
        full = self.full_due(last_build)
        targeted = self.targeted_due(last_end, last_seconds)
        if full is None or targeted is None:
            return full if targeted is None else targeted
        return min(full, targeted)

    def full_due(self, last_build: float | None = None) -> float | None:
        if self.first is None or self.last is None:
            return None
        if self.now_please:
            return self.first
        due = min(self.last + self.quiet, self.first + self.max_delay)
        if self.only_fifo and last_build is not None:
            due = max(due, last_build + self.floor)
        return due

    def _fast_due(self) -> float | None:
        if self.f_first is None or self.f_last is None:
            return None
        return min(self.f_last + self.fast_quiet, self.f_first + self.fast_max_delay)

    def _slow_due(self) -> float | None:
        if not self.slow or self.s_first is None:
            return None
        return min(max(t for t, _ in self.slow.values()) + self.quiet,
                   self.s_first + self.max_delay)

    def targeted_due(self, last_end: float | None = None,
                     last_seconds: float = 0.0) -> float | None:
        dues = [d for d in (self._fast_due(), self._slow_due()) if d is not None]
        if not dues:
            return None
        due = min(dues)
        if last_end is not None:
            due = max(due, last_end + max(self.fast_floor, last_seconds / 2))
        return due

    def held(self, last_build: float | None = None) -> float | None:
        """When the floor, not the quiet period, is what the pending full build waits
        for: the time it is held until; else None."""
        if self.first is None or self.last is None or self.now_please or \
                not self.only_fifo or last_build is None:
            return None
        quiet = min(self.last + self.quiet, self.first + self.max_delay)
        floor = last_build + self.floor
        return floor if floor > quiet else None

    def take(self) -> list[str]:
        """Everything pending, for a full build."""
        reasons = self.reasons + self.t_reasons
        self.first = self.last = None
        self.reasons, self.now_please, self.only_fifo = [], False, True
        self.take_targeted()
        self.count = 0
        return reasons

    def take_targeted(self, now: float | None = None) -> tuple[list[str], set[str]]:
        """The targeted requests that are due at ``now`` (all of them when None); a
        full build stays pending."""
        domains: set[str] = set()
        fast_due, slow_due = self._fast_due(), self._slow_due()
        if fast_due is not None and (now is None or fast_due <= now):
            domains |= self.fast
            self.fast, self.f_first, self.f_last = set(), None, None
        if slow_due is not None and (now is None or slow_due <= now):
            domains |= set(self.slow)
            self.slow, self.s_first = {}, None
        reasons, self.t_reasons = self.t_reasons, []
        return reasons, domains

    def settling(self, now: float) -> set[str] | None:
        """When what is due now is only watched-file requests (each answered by the
        previous build if the files are still what it read), their domains; else None."""
        fast_due, slow_due = self._fast_due(), self._slow_due()
        if slow_due is None or slow_due > now or (fast_due is not None and fast_due <= now):
            return None
        if not all(settles for _, settles in self.slow.values()):
            return None
        return set(self.slow)

    def settle(self, started: float, redone: set[str]) -> None:
        """A build that started at ``started`` redid ``redone``: the watched-file
        requests for those domains made before it are answered."""
        for d in redone & self.slow.keys():
            when, settles = self.slow[d]
            if settles and when < started:
                del self.slow[d]
        if not self.slow:
            self.s_first = None


# What vpopmail's onchange lines name.  The hook writes its arguments joined by spaces, so
# one line reads the same from both versions: 5.4 passes the command and one string
# (``valias_insert`` ``sales@d - alice@d``), 5.6 the command and three fields, the last
# empty (``add_user`` ``alice@d`` ``-`` ``''``; ``add_alias_domain`` ``d2`` ``d1`` ``''``).
# A command whose first argument is an address changes that address's domain; the domain
# commands name one domain, or two (``add_alias_domain D R``, ``del_domain D alias of R``).
# Additions are applied at once; removals (``del_user`` and ``valias_delete`` are
# reported before the change is made) after the quiet period.
ADDITIONS = re.compile(r"(add|mod)(_.*)?|.*_(insert|add)|add.*")
DOMAIN_COMMANDS = {"valias_delete_domain", "add_domain", "del_domain", "add_alias_domain"}
MAX_DOMAIN = 253
MAX_WORDS = 64
_DOMAIN = re.compile(r"[a-z0-9][a-z0-9._-]*")


def onchange_target(line: str) -> tuple[frozenset[str], bool] | None:
    """(domains, fast) for an onchange request that names what it changes, else None
    (pure).  ``fast``: an addition, applied without the quiet period."""
    words = line.split(None, MAX_WORDS)
    if words and words[-1] in ("before", "after"):   # the two-stage variant's last word
        words = words[:-1]
    if len(words) < 2 or not words[0].replace("_", "").isalpha():
        return None
    command, first = words[0], words[1]
    if command in DOMAIN_COMMANDS:
        names = [first]
        if command == "add_alias_domain" and len(words) >= 3:
            names.append(words[2])                          # D R: the real domain too
        elif command == "del_domain" and words[2:4] == ["alias", "of"] and len(words) >= 5:
            names.append(words[4])                          # D alias of R
    elif "@" in first:
        names = [first.rpartition("@")[2]]
    else:
        return None
    domains = frozenset(n.translate(_LOWER) for n in names)
    if not all(0 < len(d) <= MAX_DOMAIN and _DOMAIN.fullmatch(d) for d in domains):
        return None
    fast = command != "valias_delete_domain" and ADDITIONS.fullmatch(command) is not None
    return domains, fast


_LOWER = {c: c + 32 for c in range(65, 91)}
