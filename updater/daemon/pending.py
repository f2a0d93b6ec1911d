"""What waits to be built (pure, the clock passed in): the full-build requests, the
domains targeted requests name (fast: additions; slow: removals and watched files), the
addresses a database source must read again, and the local parts whose removal was
named.  ``rules.Scheduler`` asks it when each is due and takes what a build does."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..limits import MAX_REASONS, MAX_ROWS
from .events import Timing
from .window import Window

Rows = dict[str, frozenset[str] | None]     # per domain: the addresses (None: all of it)


@dataclass
class Pending:
    timing: Timing
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
    rows: Rows = field(default_factory=dict)
    # ... and for the gate: whose removal is intended (None: too many to name)
    named: Rows = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.timing
        self.full = Window(t.quiet, t.max_delay)
        self.fast = Window(t.fast_quiet, t.fast_max_delay)
        self.slow = Window(t.quiet, t.max_delay)

    # ---- requests
    def add(self, now: float, reason: str, immediate: bool, fifo: bool) -> None:
        self.full.note(now)
        self.full_count += 1
        self.immediate = self.immediate or immediate
        self.only_fifo = self.only_fifo and fifo
        if len(self.full_reasons) < MAX_REASONS:
            self.full_reasons.append(reason)

    def target(self, now: float, reason: str, domains: set[str], fast: bool,
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

    def note_rows(self, domains: frozenset[str], addresses: frozenset[str]) -> None:
        """What the next build of these domains must read again from a database: the
        addresses the request names, or (none named, or more than MAX_ROWS waiting: a
        FIFO writer's flood costs one read of the domain, not a query per line) the
        whole domain."""
        for d in domains:
            mine = {a for a in addresses if a.endswith("@" + d)}
            had = self.rows.get(d, frozenset())
            both = None if not mine or had is None else had | mine
            self.rows[d] = both if both is not None and len(both) <= MAX_ROWS else None
            if mine:                             # named for the gate, as many as bounded
                was = self.named.get(d, frozenset())
                named = None if was is None else was | mine
                self.named[d] = named if named is not None and len(named) <= MAX_ROWS \
                    else None

    @property
    def waiting(self) -> int:
        """Full-build requests and domains waiting for an incremental build."""
        return self.full_count + len(self.fast_domains | self.slow_domains.keys())

    # ---- deadlines
    def full_due(self, full_started: float | None) -> float | None:
        due = self.full.due()
        if due is None or self.full.first is None:
            return None
        if self.immediate:
            return self.full.first
        if self.only_fifo and full_started is not None:
            due = max(due, full_started + self.timing.floor)
        return due

    def targeted_due(self, after: float | None) -> float | None:
        """When the targeted requests are due, ``after`` being the earliest the last
        incremental build lets the next start."""
        dues = [d for d in (self.fast.due(), self.slow_due()) if d is not None]
        if not dues:
            return None
        return min(dues) if after is None else max(min(dues), after)

    def slow_due(self) -> float | None:
        return self.slow.due() if self.slow_domains else None

    def held(self, full_started: float | None) -> float | None:
        """The time the pending full build is held until by the FIFO floor (when that,
        not the quiet period, is what it waits for), else None."""
        quiet = self.full.due()
        if quiet is None or self.immediate or not self.only_fifo or full_started is None:
            return None
        floor = full_started + self.timing.floor
        return floor if floor > quiet else None

    # ---- what a build takes
    def take_full(self) -> list[str]:
        reasons = self.full_reasons + self.targeted_reasons
        self.full.clear()
        self.full_reasons, self.immediate, self.only_fifo = [], False, True
        self.take_targeted(None)
        return reasons

    def take_targeted(self, now: float | None) -> tuple[list[str], set[str]]:
        domains: set[str] = set()
        fast_due, slow_due = self.fast.due(), self.slow_due()
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

    def take_rows(self, domains: frozenset[str] | None) -> Rows:
        """The rows an incremental build of ``domains`` reads again (none for a full
        build, which reads everything)."""
        if domains is None:
            return {}
        return {d: self.rows.pop(d) for d in domains if d in self.rows}

    def intended(self) -> dict[str, frozenset[str]]:
        """What the gate is told: the addresses requests named, per domain."""
        return {d: names for d, names in self.named.items() if names is not None}

    def settling(self, now: float) -> set[str] | None:
        fast_due, slow_due = self.fast.due(), self.slow_due()
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

    def built(self, redone: frozenset[str] | None, rows: Rows, ok: bool) -> None:
        """A build is done: a full one that worked read every row and told the gate
        every name; an incremental one told it its domains' names; one that failed (or
        could not be incremental) gives its rows back, to be asked again."""
        if not ok:
            for d, kept in rows.items():
                self.rows.setdefault(d, kept)
        elif redone is None:
            self.rows.clear()
            self.named.clear()
        else:
            for d in redone:
                self.named.pop(d, None)
