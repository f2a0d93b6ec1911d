"""The rebuild daemon's vocabulary: the events its driver hands to ``rules.Scheduler``,
the actions it gets back and the status record they carry (plain data, no behaviour),
as h11's events are to its connection."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..ident import Ident
from ..install.liverecord import Held
from ..install.outcome import InstallReport

LiveFiles = tuple[Ident | None, Ident | None]     # the live cdb's and its .sources file's


# ---- events: what happened
@dataclass(frozen=True)
class FifoRead:
    """One read of the trigger FIFO, as it came (``dropped``: bytes a burst pushed out of
    the read); what its lines ask for is the rules' to say (``onchange.fifo_requests``)."""
    data: bytes
    dropped: int = 0


@dataclass(frozen=True)
class Requested:
    """A request for a full build (a FIFO line that names nothing, a signal, the live cdb
    deleted); ``fifo``: it came through the FIFO, which others may write."""
    reason: str
    immediate: bool = False
    fifo: bool = False


@dataclass(frozen=True)
class Targeted:
    """An onchange line naming the domains it changes; ``fast``: an addition;
    ``addresses``: the user or alias it names (a database source reads just that row
    again; none: the whole domain)."""
    reason: str
    domains: frozenset[str]
    fast: bool
    addresses: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FileChanged:
    """A watched file changed; ``domains``: the ones the list's record says depend on
    it (none: a file every domain depends on, so a full build)."""
    reason: str
    path: str
    domains: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BuildOutcome:
    """What a build did.  ``report`` on success, ``error`` on failure; ``redone``: the
    domains an incremental build redid (None: it was a full build); ``lines``: its
    warnings and notes, logged before the result."""
    started: float                        # monotonic
    ended: float
    wall: float                           # when it started, epoch seconds
    report: InstallReport | None = None
    error: str | None = None
    redone: frozenset[str] | None = None
    lines: tuple[str, ...] = ()
    space: bool = False                   # failed for want of disk space (ENOSPC)
    live: LiveFiles | None = None         # what the build left as the live files
    refused: str | None = None            # an incremental build could not be done: why


@dataclass(frozen=True)
class BuildDone:
    outcome: BuildOutcome


@dataclass(frozen=True)
class FilesChecked:
    """The answer to ``CheckFiles``: whether any of those domains' files changed."""
    domains: frozenset[str]
    changed: bool


@dataclass(frozen=True)
class DirectoryPolled:
    """The answer to ``PollDirectory``: the domains whose addresses changed, or why the
    poll failed (the list is kept).  ``updates``, ``mark``: what the poll read (DN ->
    addresses, the newest change stamp), applied by the driver, which fills
    ``domains``."""
    domains: frozenset[str]
    error: str | None = None
    full: bool = False
    updates: dict[str, list[str]] | None = None
    mark: str = ""
    future: dict[str, str] = field(default_factory=dict)   # DN -> a stamp to come
    server: Any = None              # (sources.ldapconn.Server) the one that answered
    note: str = ""                  # a line to log (another DC answered: a full read)
    swept: float | None = None      # (monotonic) it listed every identity: when


@dataclass(frozen=True)
class LiveSeen:
    """The answer to ``CheckLive``: the live files as they are now."""
    files: LiveFiles


@dataclass(frozen=True)
class Rewatched:
    """The answer to ``Rewatch``: the domains whose files changed while the full build
    that made the record read them (before the watches were in place)."""
    moved: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StatusWritten:
    """The answer to ``WriteStatus``: None, or why the file could not be written."""
    error: str | None = None


@dataclass(frozen=True)
class StatusNews:
    """A publish worker has news for the status file."""


@dataclass(frozen=True)
class Tick:
    """Time passed (a deadline came)."""


@dataclass(frozen=True)
class Stop:
    """SIGTERM / SIGINT: exit once the build in progress is done."""


Event = (FifoRead | Requested | Targeted | FileChanged | BuildDone | FilesChecked
         | DirectoryPolled | LiveSeen | Rewatched | StatusWritten | StatusNews | Tick | Stop)


# ---- actions: what the driver does
@dataclass(frozen=True)
class Build:
    """Build now: the ``domains`` given (incremental), or everything (None).  ``rows``:
    per domain, the addresses a database source reads again (None: the whole domain);
    ``named``: per domain, the local parts requests named, whose removal the gate takes
    as intended."""
    why: str
    domains: frozenset[str] | None = None
    rows: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    named: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckFiles:
    domains: frozenset[str]


@dataclass(frozen=True)
class CheckLive:
    """Look whether the live cdb and its .sources file are still what the last build
    left there (if not: a ``Requested(immediate=True)`` saying why)."""


@dataclass(frozen=True)
class PollDirectory:
    """Ask the directory what changed since the last poll (``full``: read it all and
    compare, which also finds deleted entries)."""
    full: bool = False


@dataclass(frozen=True)
class WriteStatus:
    record: StatusRecord


@dataclass(frozen=True)
class Log:
    line: str


@dataclass(frozen=True)
class HeldUntil:
    """Log that the pending full build waits for the FIFO floor until ``until`` (epoch
    seconds: the driver words the local time)."""
    until: float
    floor: float
    reason: str


@dataclass(frozen=True)
class Publish:
    """Push the live list to the other MX hosts."""


@dataclass(frozen=True)
class Rewatch:
    """A full build may have changed what to watch: start the watches again; ``fresh``:
    that build read the files (answer with what changed since it read them)."""
    fresh: bool = False


@dataclass(frozen=True)
class Exit:
    """Stop: the build in progress (if any) is done; leave the main loop."""


Action = (Build | CheckFiles | CheckLive | PollDirectory | WriteStatus | Log | HeldUntil
          | Publish | Rewatch | Exit)


# ---- the status record
@dataclass(frozen=True)
class StatusRecord:
    """What the status file says of the last build and of what waits (the driver adds
    when it wrote it and the publish targets' state)."""
    time: float                            # when the last build started, epoch seconds
    reason: str
    builds: int
    result: Literal["installed", "unchanged", "failed"]
    seconds: float = 0.0
    incremental: bool = False
    incremental_builds: int = 0
    entries: int | None = None
    added: int = 0
    removed: int = 0
    failures: int = 0
    error: str | None = None
    last_error: str | None = None          # (a failed build)
    last_success: float | None = None
    held: Mapping[str, Held] | None = None
    phases: Mapping[str, float] | None = None   # (an incremental build)
    pending: int = 0
    held_until: float | None = None        # the FIFO floor holds a full build until

    def as_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["held"] = None if self.held is None else {
            d: {"reason": h.reason, "since": h.since, "failed": h.failed}
            for d, h in sorted(self.held.items())}
        out["phases"] = None if self.phases is None else dict(self.phases)
        return {k: v for k, v in out.items()
                if v is not None or k not in ("last_error", "phases", "last_success")}


@dataclass(frozen=True)
class Timing:
    """The settings the rules use, under the rules' names (``Timing.of`` takes them from
    ``config.Settings``, where they and their defaults are declared)."""
    quiet: float
    max_delay: float
    floor: float                         # UPDATER_MIN_INTERVAL: the FIFO floor
    fast_quiet: float
    fast_max_delay: float
    fast_floor: float                    # UPDATER_TARGET_INTERVAL
    interval: float
    retry_min: float
    retry_max: float
    directory_poll: float                # LDAP / AD: seconds between polls (0: none)
    directory_full: float                # ... and between full reads (deletions)
    incremental: bool = True             # UPDATER_INCREMENTAL: onchange lines target domains

    @classmethod
    def of(cls, s: Any) -> Timing:
        poll = s.ldap_poll if s.ldap_uri and s.incremental else 0.0
        return cls(s.quiet, s.max_delay, s.min_interval, s.target_quiet,
                   max(s.target_interval, s.target_quiet), s.target_interval, s.interval,
                   s.retry_min, s.retry_max, poll, s.ldap_full, s.incremental)

